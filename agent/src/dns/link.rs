//! The node-local listen address: a dummy interface holding the link-local
//! address, and raw-table NOTRACK rules so DNS to and from it skips
//! conntrack (as NodeLocal DNSCache does, against the conntrack races of
//! kubernetes#56903). Every `ip` and `iptables` command line is made here.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

/// The dummy interface's name (NodeLocal DNSCache's own).
pub const INTERFACE: &str = "nodelocaldns";

/// Whether this process has CAP_NET_ADMIN (bit 12 of CapEff).
pub fn has_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

/// The commands that put `addr` on the dummy interface, idempotently.
pub fn interface_commands(addr: IpAddr) -> Vec<Vec<String>> {
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    [
        format!("ip link add {INTERFACE} type dummy"),
        format!("ip addr replace {addr}/{prefix} dev {INTERFACE}"),
        format!("ip link set {INTERFACE} up"),
    ]
    .iter()
    .map(|c| c.split(' ').map(String::from).collect())
    .collect()
}

/// The raw-table NOTRACK rules for `listen`, each as the arguments after
/// `iptables -t raw -{C,A}`.
pub fn notrack_rules(listen: SocketAddr) -> Vec<Vec<String>> {
    let (ip, port) = (listen.ip(), listen.port());
    let mut rules = Vec::new();
    for proto in ["udp", "tcp"] {
        for (chain, dir, pdir) in [
            ("PREROUTING", "-d", "--dport"),
            ("OUTPUT", "-s", "--sport"),
            ("OUTPUT", "-d", "--dport"),
        ] {
            rules.push(
                format!(
                    "{chain} {dir} {ip} -p {proto} -m {proto} {pdir} {port} -m comment --comment switchyard-dns -j NOTRACK"
                )
                .split(' ')
                .map(String::from)
                .collect(),
            );
        }
    }
    rules
}

/// Creates the interface and the NOTRACK rules for `listen`; returns the
/// interface holding the address. A kernel without the dummy driver gets
/// the address on `lo` instead.
pub fn install(listen: SocketAddr) -> Result<&'static str, String> {
    let interface = match put_on_dummy(listen.ip()) {
        Ok(()) => INTERFACE,
        Err(e) if e.contains("Unknown device type") || e.contains("not supported") => {
            let prefix = if listen.is_ipv4() { "32" } else { "128" };
            let args: Vec<String> = [
                "addr",
                "replace",
                &format!("{}/{prefix}", listen.ip()),
                "dev",
                "lo",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let out = run("ip", &args)?;
            if !out.status.success() {
                return Err(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            "lo"
        }
        Err(e) => return Err(e),
    };
    notrack(listen)?;
    Ok(interface)
}

fn put_on_dummy(addr: IpAddr) -> Result<(), String> {
    for (i, cmd) in interface_commands(addr).iter().enumerate() {
        let out = run(&cmd[0], &cmd[1..])?;
        // The interface may exist from an earlier run.
        let exists = i == 0 && String::from_utf8_lossy(&out.stderr).contains("File exists");
        if !out.status.success() && !exists {
            return Err(format!(
                "{}: {}",
                cmd.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

fn notrack(listen: SocketAddr) -> Result<(), String> {
    let iptables = if listen.is_ipv4() {
        "iptables"
    } else {
        "ip6tables"
    };
    for rule in notrack_rules(listen) {
        let mut check = vec!["-w".to_owned(), "-t".into(), "raw".into(), "-C".into()];
        check.extend(rule.iter().cloned());
        if run(iptables, &check)?.status.success() {
            continue;
        }
        check[3] = "-A".into();
        let out = run(iptables, &check)?;
        if !out.status.success() {
            return Err(format!(
                "{iptables} {}: {}",
                check.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

fn run(program: &str, args: &[String]) -> Result<std::process::Output, String> {
    Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("running {program}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_cover_both_protocols_and_directions() {
        let rules = notrack_rules("169.254.20.10:53".parse().unwrap());
        assert_eq!(rules.len(), 6);
        assert_eq!(
            rules[0].join(" "),
            "PREROUTING -d 169.254.20.10 -p udp -m udp --dport 53 -m comment --comment switchyard-dns -j NOTRACK"
        );
        assert_eq!(
            interface_commands("169.254.20.10".parse().unwrap())[1].join(" "),
            "ip addr replace 169.254.20.10/32 dev nodelocaldns"
        );
    }
}
