//! The node-local listen address: a dummy interface holding the link-local
//! address, and raw-table NOTRACK rules so DNS to and from it skips
//! conntrack (as NodeLocal DNSCache does, against the conntrack races of
//! kubernetes#56903). Every `ip` command line is made here; the NOTRACK
//! rules go through the `iptables` crate, one idempotent rule at a time.
//! Used for a link-local `--dns-listen` when the agent has CAP_NET_ADMIN:
//! six rules (PREROUTING dport, OUTPUT sport and dport, for UDP and TCP);
//! without the dummy driver the address goes on `lo`.
//!
//! ```text
//!  start:   ip link add nodelocaldns (or lo) + ip addr replace ─▶ raw -S PREROUTING/OUTPUT ─▶ append what is missing,
//!                                                                                            delete duplicates of ours
//!  cleanup: every raw rule commented switchyard-dns (both families) ─▶ ip link del nodelocaldns ─▶ the address off lo
//! ```
//!
//! Presence is judged by the rule as `iptables -S` prints it back, not by
//! `iptables -C`: the listing is what a person sees, and a rule we wrote
//! twice (an earlier agent's bug) is found and removed rather than
//! confirmed.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

/// The dummy interface's name (NodeLocal DNSCache's own).
pub const INTERFACE: &str = "nodelocaldns";

/// The comment on every NOTRACK rule of ours: what cleanup looks for.
pub const NOTRACK_COMMENT: &str = "switchyard-dns";

/// Setting up or removing the listen address failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A command could not be started.
    #[error("running {command}")]
    Spawn {
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("{command}: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it said.
        stderr: String,
    },
    /// iptables (through the `iptables` crate) failed.
    #[error("{tool} -t raw {what}: {message}")]
    Iptables {
        /// `iptables` or `ip6tables`.
        tool: &'static str,
        /// What was asked.
        what: String,
        /// The crate's error.
        message: String,
    },
}

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
    // IPv6: no duplicate address detection, or the address stays tentative
    // (unbindable) for a second.
    let nodad = if addr.is_ipv6() { " nodad" } else { "" };
    [
        format!("ip link add {INTERFACE} type dummy"),
        format!("ip addr replace {} dev {INTERFACE}{nodad}", host(addr)),
        format!("ip link set {INTERFACE} up"),
    ]
    .iter()
    .map(|c| c.split(' ').map(String::from).collect())
    .collect()
}

fn host(addr: IpAddr) -> String {
    let prefix = if addr.is_ipv4() { 32 } else { 128 };
    format!("{addr}/{prefix}")
}

/// The raw-table NOTRACK rules for `listen`: (chain, rule spec), the spec
/// exactly as `iptables -S` prints it after `-A CHAIN `.
pub fn notrack_rules(listen: SocketAddr) -> Vec<(&'static str, String)> {
    let (ip, port) = (host(listen.ip()), listen.port());
    let mut rules = Vec::new();
    for proto in ["udp", "tcp"] {
        for (chain, dir, pdir) in [
            ("PREROUTING", "-d", "--dport"),
            ("OUTPUT", "-s", "--sport"),
            ("OUTPUT", "-d", "--dport"),
        ] {
            rules.push((
                chain,
                format!(
                    "{dir} {ip} -p {proto} -m {proto} {pdir} {port} -m comment --comment {NOTRACK_COMMENT} -j NOTRACK"
                ),
            ));
        }
    }
    rules
}

/// What to change in one chain: the specs to append (wanted, not listed)
/// and the listed specs of ours to delete (not wanted, or listed twice).
pub fn notrack_changes(
    chain: &str,
    listed: &[String],
    wanted: &[String],
) -> (Vec<String>, Vec<String>) {
    let head = format!("-A {chain} ");
    let ours: Vec<&str> = listed
        .iter()
        .filter_map(|l| l.strip_prefix(&head))
        .filter(|spec| is_ours(spec))
        .collect();
    let append = wanted
        .iter()
        .filter(|w| !ours.contains(&w.as_str()))
        .cloned()
        .collect();
    let mut seen: Vec<&str> = Vec::new();
    let mut delete = Vec::new();
    for spec in ours {
        if wanted.iter().any(|w| w == spec) && !seen.contains(&spec) {
            seen.push(spec);
        } else {
            delete.push(spec.to_owned());
        }
    }
    (append, delete)
}

fn is_ours(spec: &str) -> bool {
    spec.contains(&format!("--comment {NOTRACK_COMMENT} "))
}

/// Creates the interface and the NOTRACK rules for `listen`; returns the
/// interface holding the address. A kernel without the dummy driver gets
/// the address on `lo` instead. Running it again changes nothing. NOTRACK
/// rules of ours for other addresses than these and `keep` (an earlier
/// run's) are removed.
pub fn install(listen: SocketAddr, keep: &[SocketAddr]) -> Result<&'static str, LinkError> {
    let interface = put_address(listen.ip())?;
    let wanted: Vec<SocketAddr> = std::iter::once(listen)
        .chain(keep.iter().copied().filter(|k| *k != listen))
        .collect();
    notrack(&wanted)?;
    Ok(interface)
}

/// Puts `ip` on the dummy interface (created when missing), or on `lo`
/// where the kernel has no dummy driver; returns which.
pub fn put_address(ip: IpAddr) -> Result<&'static str, LinkError> {
    match put_on_dummy(ip) {
        Ok(()) => Ok(INTERFACE),
        Err(LinkError::Failed { stderr, .. })
            if stderr.contains("Unknown device type") || stderr.contains("not supported") =>
        {
            let host = host(ip);
            let mut args = vec!["addr", "replace", host.as_str(), "dev", "lo"];
            if ip.is_ipv6() {
                args.push("nodad");
            }
            run("ip", &args)?;
            Ok("lo")
        }
        Err(e) => Err(e),
    }
}

/// Takes `ip` off `interface` (what [`put_address`] returned); an address
/// already gone is no error.
pub fn remove_address(ip: IpAddr, interface: &str) -> Result<(), LinkError> {
    let host = host(ip);
    let out = command("ip", &["addr", "del", &host, "dev", interface])?;
    let gone = String::from_utf8_lossy(&out.stderr).contains("Cannot assign");
    if out.status.success() || gone {
        return Ok(());
    }
    Err(LinkError::Failed {
        command: format!("ip addr del {host} dev {interface}"),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// Makes the raw-table NOTRACK rules of ours exactly those of `wanted`, in
/// both families: appends what is missing, deletes duplicates and the rules
/// of addresses no longer wanted. IPv6 is skipped when ip6tables does not
/// work and no IPv6 address is wanted.
pub fn notrack(wanted: &[SocketAddr]) -> Result<(), LinkError> {
    for ipv6 in [false, true] {
        let family: Vec<SocketAddr> = wanted
            .iter()
            .filter(|w| w.is_ipv6() == ipv6)
            .copied()
            .collect();
        let ipt = match Raw::new(ipv6) {
            Ok(ipt) => ipt,
            Err(_) if ipv6 && family.is_empty() => continue,
            Err(e) => return Err(e),
        };
        let rules: Vec<(&str, String)> = family.iter().flat_map(|l| notrack_rules(*l)).collect();
        for chain in ["PREROUTING", "OUTPUT"] {
            let listed = match ipt.list(chain) {
                Ok(l) => l,
                Err(_) if ipv6 && family.is_empty() => continue,
                Err(e) => return Err(e),
            };
            let specs: Vec<String> = rules
                .iter()
                .filter(|(c, _)| *c == chain)
                .map(|(_, s)| s.clone())
                .collect();
            let (append, delete) = notrack_changes(chain, &listed, &specs);
            for spec in delete {
                ipt.delete(chain, &spec)?;
            }
            for spec in append {
                ipt.append(chain, &spec)?;
            }
        }
    }
    Ok(())
}

/// What [`uninstall`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Removed {
    /// NOTRACK rules deleted, both families.
    pub rules: usize,
    /// Whether the dummy interface was deleted.
    pub interface: bool,
    /// Whether the listen address was taken off `lo`.
    pub loopback_address: bool,
}

/// `switchyard-agent cleanup`: deletes every NOTRACK rule of ours (found by
/// their comment, whatever address they name), the dummy interface, and
/// `listen`'s address from `lo` when it is link-local (where [`install`]
/// puts it without the dummy driver).
pub fn uninstall(listen: Option<SocketAddr>) -> Result<Removed, LinkError> {
    let mut removed = Removed::default();
    for ipv6 in [false, true] {
        let ipt = match Raw::new(ipv6) {
            Ok(ipt) => ipt,
            // No ip6tables on this node: nothing of ours there either.
            Err(_) if ipv6 => continue,
            Err(e) => return Err(e),
        };
        for chain in ["PREROUTING", "OUTPUT"] {
            let listed = match ipt.list(chain) {
                Ok(l) => l,
                Err(_) if ipv6 => continue,
                Err(e) => return Err(e),
            };
            let (_, delete) = notrack_changes(chain, &listed, &[]);
            for spec in delete {
                ipt.delete(chain, &spec)?;
                removed.rules += 1;
            }
        }
    }
    let link = command("ip", &["link", "show", INTERFACE])?;
    if link.status.success() {
        run("ip", &["link", "del", INTERFACE])?;
        removed.interface = true;
    }
    if let Some(listen) = listen.filter(|l| is_link_local(l.ip())) {
        let on_lo = command("ip", &["-o", "addr", "show", "dev", "lo"])?;
        if String::from_utf8_lossy(&on_lo.stdout).contains(&format!(" {} ", host(listen.ip()))) {
            run("ip", &["addr", "del", &host(listen.ip()), "dev", "lo"])?;
            removed.loopback_address = true;
        }
    }
    Ok(removed)
}

/// Whether `ip` is link-local (where the stub makes its own address).
pub fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// The raw table of one family, through the `iptables` crate.
struct Raw {
    ipt: iptables::IPTables,
    tool: &'static str,
}

impl Raw {
    fn new(ipv6: bool) -> Result<Self, LinkError> {
        let tool = if ipv6 { "ip6tables" } else { "iptables" };
        let ipt = iptables::new(ipv6).map_err(|e| LinkError::Iptables {
            tool,
            what: "--version".into(),
            message: e.to_string(),
        })?;
        Ok(Self { ipt, tool })
    }

    fn fail(&self, what: String) -> impl FnOnce(Box<dyn std::error::Error>) -> LinkError {
        let tool = self.tool;
        move |e| LinkError::Iptables {
            tool,
            what,
            message: e.to_string(),
        }
    }

    fn list(&self, chain: &str) -> Result<Vec<String>, LinkError> {
        self.ipt
            .list("raw", chain)
            .map_err(self.fail(format!("-S {chain}")))
    }

    fn append(&self, chain: &str, spec: &str) -> Result<(), LinkError> {
        self.ipt
            .append("raw", chain, spec)
            .map_err(self.fail(format!("-A {chain} {spec}")))
    }

    fn delete(&self, chain: &str, spec: &str) -> Result<(), LinkError> {
        self.ipt
            .delete("raw", chain, spec)
            .map_err(self.fail(format!("-D {chain} {spec}")))
    }
}

fn put_on_dummy(addr: IpAddr) -> Result<(), LinkError> {
    for (i, cmd) in interface_commands(addr).iter().enumerate() {
        let args: Vec<&str> = cmd[1..].iter().map(String::as_str).collect();
        let out = command(&cmd[0], &args)?;
        // The interface may exist from an earlier run.
        let exists = i == 0 && String::from_utf8_lossy(&out.stderr).contains("File exists");
        if !out.status.success() && !exists {
            return Err(LinkError::Failed {
                command: cmd.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
    }
    Ok(())
}

fn command(program: &str, args: &[&str]) -> Result<std::process::Output, LinkError> {
    Command::new(program)
        .args(args)
        .output()
        .map_err(|source| LinkError::Spawn {
            command: format!("{program} {}", args.join(" ")),
            source,
        })
}

fn run(program: &str, args: &[&str]) -> Result<(), LinkError> {
    let out = command(program, args)?;
    if out.status.success() {
        return Ok(());
    }
    Err(LinkError::Failed {
        command: format!("{program} {}", args.join(" ")),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_cover_both_protocols_and_directions() {
        let rules = notrack_rules("169.254.20.10:53".parse().unwrap());
        assert_eq!(rules.len(), 6);
        assert_eq!(rules[0].0, "PREROUTING");
        assert_eq!(
            rules[0].1,
            "-d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment switchyard-dns -j NOTRACK"
        );
        assert_eq!(
            interface_commands("169.254.20.10".parse().unwrap())[1].join(" "),
            "ip addr replace 169.254.20.10/32 dev nodelocaldns"
        );
    }

    #[test]
    fn changes_append_what_is_missing_and_delete_duplicates() {
        let wanted: Vec<String> = notrack_rules("169.254.20.10:53".parse().unwrap())
            .into_iter()
            .filter(|(c, _)| *c == "OUTPUT")
            .map(|(_, s)| s)
            .collect();
        let a = |s: &str| format!("-A OUTPUT {s}");
        let listed = vec![
            "-P OUTPUT ACCEPT".to_owned(),
            a(&wanted[0]),
            a(&wanted[0]),
            a("-d 10.0.0.1/32 -j DROP"),
            a(
                "-d 169.254.20.11/32 -p udp -m udp --dport 53 -m comment --comment switchyard-dns -j NOTRACK",
            ),
        ];
        let (append, delete) = notrack_changes("OUTPUT", &listed, &wanted);
        assert_eq!(append, wanted[1..].to_vec());
        assert_eq!(
            delete,
            [
                wanted[0].clone(),
                "-d 169.254.20.11/32 -p udp -m udp --dport 53 -m comment --comment switchyard-dns -j NOTRACK".to_owned()
            ]
        );
        // In place: nothing to do.
        let listed: Vec<String> = wanted.iter().map(|w| a(w)).collect();
        let (append, delete) = notrack_changes("OUTPUT", &listed, &wanted);
        assert!(append.is_empty() && delete.is_empty());
        // Cleanup: every rule of ours goes, others stay.
        let (_, delete) = notrack_changes("OUTPUT", &listed, &[]);
        assert_eq!(delete.len(), 4);
    }
}
