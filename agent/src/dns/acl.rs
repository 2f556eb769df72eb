//! Who may query: the stub is not an open resolver.

use std::net::IpAddr;

use ipnet::IpNet;

/// Allowed source ranges.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    allowed: Vec<IpNet>,
}

impl Acl {
    /// Allows exactly `allowed`.
    pub fn new(allowed: Vec<IpNet>) -> Self {
        Self { allowed }
    }

    /// The default: loopback, every address of this node, and `cluster_cidrs`.
    pub fn node_local(cluster_cidrs: &[IpNet]) -> Self {
        let mut allowed: Vec<IpNet> = vec![
            "127.0.0.0/8".parse().expect("literal"),
            "::1/128".parse().expect("literal"),
        ];
        allowed.extend(local_addresses().into_iter().map(IpNet::from));
        allowed.extend(cluster_cidrs.iter().copied());
        allowed.sort();
        allowed.dedup();
        Self { allowed }
    }

    /// Whether `src` may query. IPv4-mapped IPv6 sources count as IPv4.
    pub fn allows(&self, src: IpAddr) -> bool {
        let src = match src {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(src, IpAddr::V4),
            v4 => v4,
        };
        self.allowed.iter().any(|n| n.contains(&src))
    }

    /// The ranges allowed.
    pub fn ranges(&self) -> &[IpNet] {
        &self.allowed
    }
}

/// This node's own addresses, read from procfs (IPv4 `LOCAL` routes of
/// `/proc/net/fib_trie`, every line of `/proc/net/if_inet6`).
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    if let Ok(trie) = std::fs::read_to_string("/proc/net/fib_trie") {
        out.extend(parse_fib_trie(&trie));
    }
    if let Ok(v6) = std::fs::read_to_string("/proc/net/if_inet6") {
        out.extend(parse_if_inet6(&v6));
    }
    out.sort();
    out.dedup();
    out
}

fn parse_fib_trie(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut last: Option<IpAddr> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("|-- ") {
            last = rest.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL")
            && let Some(ip) = last
        {
            out.push(ip);
        }
    }
    out
}

fn parse_if_inet6(text: &str) -> Vec<IpAddr> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|h| h.len() == 32)
        .filter_map(|h| u128::from_str_radix(h, 16).ok())
        .map(|n| IpAddr::V6(n.into()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_local_addresses_from_procfs_text() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.0.0.5\n        /32 host LOCAL\n     |-- 10.0.0.255\n        /32 link BROADCAST\n";
        assert_eq!(
            parse_fib_trie(trie),
            ["10.0.0.5".parse::<IpAddr>().unwrap()]
        );
        let v6 = "fe800000000000000000000000000001 02 40 20 80     eth0\n";
        assert_eq!(parse_if_inet6(v6), ["fe80::1".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn default_allows_loopback_and_the_cluster_only() {
        let acl = Acl::node_local(&["10.244.0.0/16".parse().unwrap()]);
        assert!(acl.allows("127.0.0.1".parse().unwrap()));
        assert!(acl.allows("10.244.3.4".parse().unwrap()));
        assert!(acl.allows("::ffff:10.244.3.4".parse().unwrap()));
        assert!(!acl.allows("203.0.113.9".parse().unwrap()));
    }
}
