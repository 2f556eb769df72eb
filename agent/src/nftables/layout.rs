//! The fixed part of our table: sets, maps, chains and rules, a pure
//! function of the family, this node's settings and the affinity timeouts
//! in use. No rule names a Service or an endpoint; those are elements
//! ([`super::elements`]), so changing them never adds a rule, and a commit
//! never makes the kernel revalidate the table (REFERENCE: nf_tables marks
//! a table for validation only for new rules and new jump elements).
//!
//! ```text
//!  nat prerouting/output ─▶ services ─┬─ FE @firewalled ─▶ firewall (FE . saddr @fw_allow) ─┐
//!                                     ├─ FE @external_ips ──────────────────────────────────┴▶ external ─┬─ FE @ext_local ─▶ external_local ─┬─ pods, LOCAL ─▶ ip_short
//!                                     │                                                              │                                   └─ others ─────▶ ip_main
//!                                     ├─ FE @cluster_ips ─▶ cluster_ip (masquerade off-cluster) ─────┴─ (masquerade) ─────────────────────────────────▶ ip_main
//!                                     └─ dst LOCAL, NP @node_ports ─▶ node_port ─ the same with np_local ─▶ np_short / np_main
//!  ip_main: dnat to saddr . FE map @affinity_ip, then per class N: dnat to FE . numgen random mod N offset O(N) map @ip_main_slots
//!  filter prerouting+1/output (new, DNATed): affinity_update ─ update @affinity_ip / @affinity_np with the chosen endpoint
//!  filter input/forward/output (new) ─▶ filter_services: FE @no_endpoints reject, FE @no_local_endpoints drop, FE @firewalled drop,
//!                                      daddr @allocated_ips reject (a port not served), daddr @service_cidrs drop (unallocated), node ports
//!  nat postrouting: hairpin (saddr . daddr @hairpin) marks, the mark is masqueraded
//!  FE = daddr . l4proto . dport   NP = l4proto . dport
//! ```
//!
//! Endpoint-count classes: a frontend with N endpoints has its endpoints
//! as elements of its group's one map, keyed by the frontend and a slot of
//! its class's own range, `offset(N)..offset(N) + slots(N)`; the class
//! rules try each class in turn (`numgen random mod N offset O`, a miss
//! falls through to the next). Up to [`EXACT_CLASSES`] endpoints the class
//! is N itself (an exact spread); beyond, the endpoints are laid over a
//! larger number of slots (see [`slots`]): 1,024 or 4,096, so no share
//! differs from another by more than one slot in eight. A count that
//! changes class replaces its elements by the other class's in the same
//! transaction.
//!
//! One map per group, not one per class and group: before every element
//! command libnftables 1.0.6 fetches and parses every set of the ruleset
//! (its cache; the generation changes with each of our commits, so it is
//! fetched again each time). With 144 class maps that cost 0.77 ms per
//! endpoint change at 10,000 Services, with the 4 group maps 0.19 ms
//! (libnftables alone, same machine and load: BENCHMARKS.md).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use crate::dataplane::{Family, NodeConfig};

/// Our table's name, in the `ip` and the `ip6` family.
pub const TABLE: &str = "switchyard";

/// Classes 1..=EXACT_CLASSES spread exactly (slot count = endpoint count).
pub const EXACT_CLASSES: usize = 32;

/// Slot counts for frontends with more endpoints than [`EXACT_CLASSES`]:
/// the smallest holding at least eight slots per endpoint, so no endpoint
/// gets more than 9/8 of another's share (and the last for more than 512
/// endpoints, where the share is uneven by at most one slot in 4096).
pub const WIDE_CLASSES: [usize; 2] = [1024, 4096];

/// Every class's slot count, in the order the rules try them.
pub fn classes() -> impl Iterator<Item = usize> {
    (1..=EXACT_CLASSES).chain(WIDE_CLASSES)
}

/// Where the slots of class `slots` start in its group's map: after every
/// class tried before it, so no two classes share a key.
pub fn offset(slots: usize) -> usize {
    classes().take_while(|&m| m != slots).sum()
}

/// The slot count of a frontend with `n` endpoints (`n > 0`).
pub fn slots(n: usize) -> usize {
    if n <= EXACT_CLASSES {
        return n;
    }
    WIDE_CLASSES
        .into_iter()
        .find(|&m| m >= 8 * n)
        .unwrap_or(WIDE_CLASSES[WIDE_CLASSES.len() - 1])
}

/// The four groups of balancing maps: by frontend kind (an address, or a
/// node port on any local address) and by which endpoints (the frontend's
/// own policy, or the Cluster endpoints pods and the node short-circuit to
/// under externalTrafficPolicy Local).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Balance {
    /// Address frontends, endpoints of their policy.
    IpMain,
    /// Address frontends with externalTrafficPolicy Local: Cluster endpoints.
    IpShort,
    /// Node ports, endpoints of their policy.
    NpMain,
    /// Node ports with externalTrafficPolicy Local: Cluster endpoints.
    NpShort,
}

impl Balance {
    /// All four.
    pub const ALL: [Balance; 4] = [
        Balance::IpMain,
        Balance::IpShort,
        Balance::NpMain,
        Balance::NpShort,
    ];

    /// The chain that balances, and the prefix of its class maps.
    pub fn chain(self) -> &'static str {
        match self {
            Balance::IpMain => "ip_main",
            Balance::IpShort => "ip_short",
            Balance::NpMain => "np_main",
            Balance::NpShort => "np_short",
        }
    }

    /// Its map: every frontend's slots, each class in its own range.
    pub fn map(self) -> &'static str {
        match self {
            Balance::IpMain => "ip_main_slots",
            Balance::IpShort => "ip_short_slots",
            Balance::NpMain => "np_main_slots",
            Balance::NpShort => "np_short_slots",
        }
    }

    fn node_port(self) -> bool {
        matches!(self, Balance::NpMain | Balance::NpShort)
    }
}

/// The element sets every sync fills, with their key type (`A` stands for
/// the family's address type); maps are [`Balance`] maps.
pub const SETS: [(&str, &str); 18] = [
    ("cluster_ips", "A . inet_proto . inet_service"),
    // Every proxied Service's cluster IP, whatever its ports.
    ("allocated_ips", "A"),
    ("external_ips", "A . inet_proto . inet_service"),
    ("firewalled", "A . inet_proto . inet_service"),
    ("ip_frontends", "A . inet_proto . inet_service"),
    ("ext_local", "A . inet_proto . inet_service"),
    ("no_endpoints", "A . inet_proto . inet_service"),
    ("no_local_endpoints", "A . inet_proto . inet_service"),
    ("node_ports", "inet_proto . inet_service"),
    ("np_local", "inet_proto . inet_service"),
    ("np_no_endpoints", "inet_proto . inet_service"),
    ("np_no_local_endpoints", "inet_proto . inet_service"),
    ("health_checks", "inet_service"),
    ("hairpin", "A . A"),
    // Interval sets: a concatenation whose last part is a range.
    ("fw_allow", "A . inet_proto . inet_service . A"),
    ("cluster_cidrs", "A"),
    ("nodeport_cidrs", "A"),
    ("service_cidrs", "A"),
];

/// The set whose one element marks what the table holds: a digest of its
/// skeleton and elements, as an IPv6 address (128 bits), written in the
/// same transaction as every sync (`elements::Programmed::digest`).
pub const DIGEST_SET: &str = "programmed";

/// Whether a set of [`SETS`] holds ranges.
fn interval(set: &str) -> bool {
    matches!(
        set,
        "fw_allow" | "cluster_cidrs" | "nodeport_cidrs" | "service_cidrs"
    )
}

/// The set of frontends with affinity timeout `t` seconds (address frontends).
pub fn affinity_set(t: u32) -> String {
    format!("affinity_{t}")
}

/// The set of node ports with affinity timeout `t` seconds.
pub fn np_affinity_set(t: u32) -> String {
    format!("np_affinity_{t}")
}

/// The most clients with affinity one map remembers (per family and kind).
pub const AFFINITY_SIZE: u32 = 1 << 20;

/// The family's words in nft syntax.
#[derive(Debug, Clone, Copy)]
pub struct Words {
    /// `ip` or `ip6`.
    pub family: &'static str,
    /// `ipv4_addr` or `ipv6_addr`.
    pub addr: &'static str,
}

impl Words {
    /// The words of `family`.
    pub fn of(family: Family) -> Self {
        match family {
            Family::V4 => Words {
                family: "ip",
                addr: "ipv4_addr",
            },
            Family::V6 => Words {
                family: "ip6",
                addr: "ipv6_addr",
            },
        }
    }

    fn ty(self, t: &str) -> String {
        t.replace('A', self.addr)
    }

    /// `ip switchyard` / `ip6 switchyard`.
    pub fn table(self) -> String {
        format!("{} {TABLE}", self.family)
    }
}

/// The sets of affinity timeout `t`: (name, type) for address frontends
/// and for node ports.
pub fn affinity_sets(w: Words, t: u32) -> [(String, String); 2] {
    [
        (affinity_set(t), w.ty("A . inet_proto . inet_service")),
        (np_affinity_set(t), "inet_proto . inet_service".to_owned()),
    ]
}

/// The rules that remember, for affinity timeout `t`, which endpoint a new
/// connection was sent to: the address-frontend ones go first in
/// `affinity_update`, the node-port ones last. Each
/// names its protocol: nft 1.0.6 types `ct original proto-dst` in a
/// concatenation only in a protocol's context.
pub fn affinity_rules(w: Words, t: u32) -> (Vec<String>, Vec<String>) {
    let f = w.family;
    let (mut ip, mut np) = (Vec::new(), Vec::new());
    for p in ["tcp", "udp", "sctp"] {
        ip.push(format!(
            "meta l4proto {p} ct original {f} daddr . meta l4proto . ct original proto-dst @{} update @affinity_ip {{ {f} saddr . ct original {f} daddr . meta l4proto . ct original proto-dst timeout {t}s : {f} daddr . th dport }} return",
            affinity_set(t)
        ));
        np.push(format!(
            "meta l4proto {p} meta l4proto . ct original proto-dst @{} update @affinity_np {{ {f} saddr . meta l4proto . ct original proto-dst timeout {t}s : {f} daddr . th dport }}",
            np_affinity_set(t)
        ));
    }
    (ip, np)
}

/// The whole table block (declarations and rules), for a full sync.
pub fn table(family: Family, cfg: &NodeConfig, timeouts: &BTreeSet<u32>) -> String {
    let w = Words::of(family);
    let f = w.family;
    let mark = format!("{:#x}", cfg.masquerade_mark);
    let fe = format!("{f} daddr . meta l4proto . th dport");
    let np = "meta l4proto . th dport";
    let mut t = String::new();
    let _ = writeln!(t, "table {} {{", w.table());
    for (name, ty) in SETS {
        let flags = if interval(name) {
            " flags interval;"
        } else {
            ""
        };
        let _ = writeln!(t, "set {name} {{ type {};{flags} }}", w.ty(ty));
    }
    let _ = writeln!(t, "set {DIGEST_SET} {{ type ipv6_addr; }}");
    let slot_key = |node_port: bool| {
        if node_port {
            "meta l4proto . th dport . numgen random mod 2".to_owned()
        } else {
            format!("{fe} . numgen random mod 2")
        }
    };
    // Map data is `th dport` (typed `tcp dport`, nft would add a TCP-only
    // dependency to every dnat). nft 1.0.6 cannot read `ip daddr . th
    // dport` back from the kernel ("conflicting protocols") when a new rule
    // refers to the map, so the table is replaced whole on a full sync
    // (elements::Programmed::full) and rules are never added to it.
    for b in Balance::ALL {
        let _ = writeln!(
            t,
            "map {} {{ typeof {} : {f} daddr . th dport; }}",
            b.map(),
            slot_key(b.node_port())
        );
    }
    let _ = writeln!(
        t,
        "map affinity_ip {{ typeof {f} saddr . {fe} : {f} daddr . th dport; flags timeout; size {AFFINITY_SIZE}; }}"
    );
    let _ = writeln!(
        t,
        "map affinity_np {{ typeof {f} saddr . {np} : {f} daddr . th dport; flags timeout; size {AFFINITY_SIZE}; }}"
    );
    for &to in timeouts {
        for (name, ty) in affinity_sets(w, to) {
            let _ = writeln!(t, "set {name} {{ type {ty}; }}");
        }
    }

    let mut chain = |name: &str, head: Option<&str>, rules: &[String]| {
        let _ = writeln!(t, "chain {name} {{");
        if let Some(h) = head {
            let _ = writeln!(t, "{h}");
        }
        for r in rules {
            let _ = writeln!(t, "{r}");
        }
        let _ = writeln!(t, "}}");
    };
    let has_cidrs = cfg.cluster_cidrs.iter().any(|c| family.has_net(c));
    chain(
        "mark_masq",
        None,
        &[format!("meta mark set meta mark | {mark}")],
    );
    chain(
        "nat_prerouting",
        Some("type nat hook prerouting priority dstnat; policy accept;"),
        &["jump services".into()],
    );
    chain(
        "nat_output",
        Some("type nat hook output priority -100; policy accept;"),
        &["jump services".into()],
    );
    chain(
        "nat_postrouting",
        Some("type nat hook postrouting priority srcnat; policy accept;"),
        &[
            format!("ct status dnat {f} saddr . {f} daddr @hairpin jump mark_masq"),
            format!("meta mark & {mark} != {mark} return"),
            // Clear the bit so a packet re-traversing the stack is not masqueraded twice.
            format!("meta mark set meta mark ^ {mark}"),
            "masquerade fully-random".into(),
        ],
    );
    let mut services = vec![
        format!("{fe} @firewalled goto firewall"),
        format!("{fe} @external_ips goto external"),
        format!("{fe} @cluster_ips goto cluster_ip"),
    ];
    services.extend(
        node_port_guards(family, cfg)
            .into_iter()
            .map(|g| format!("{g}{np} @node_ports goto node_port")),
    );
    chain("services", None, &services);
    chain(
        "firewall",
        None,
        &[format!("{fe} . {f} saddr @fw_allow goto external")],
    );
    let mut cluster_ip = Vec::new();
    if has_cidrs {
        cluster_ip.push(format!("{f} saddr != @cluster_cidrs jump mark_masq"));
    }
    cluster_ip.push("goto ip_main".into());
    chain("cluster_ip", None, &cluster_ip);
    for (name, key, local_set, main, short) in [
        ("external", fe.as_str(), "ext_local", "ip_main", "ip_short"),
        ("node_port", np, "np_local", "np_main", "np_short"),
    ] {
        chain(
            name,
            None,
            &[
                format!("{key} @{local_set} goto {name}_local"),
                "jump mark_masq".into(),
                format!("goto {main}"),
            ],
        );
        // externalTrafficPolicy Local: pods and the node itself short-circuit
        // to the Cluster endpoints (the node masqueraded: its source would be
        // the frontend address); only outside traffic keeps its source.
        let mut local = Vec::new();
        if has_cidrs {
            local.push(format!("{f} saddr @cluster_cidrs goto {short}"));
        }
        local.push("fib saddr type local jump mark_masq".into());
        local.push(format!("fib saddr type local goto {short}"));
        local.push(format!("goto {main}"));
        chain(&format!("{name}_local"), None, &local);
    }
    for b in Balance::ALL {
        let key = if b.node_port() { np } else { fe.as_str() };
        let affinity = if b.node_port() {
            "affinity_np"
        } else {
            "affinity_ip"
        };
        // IPv6: no affinity (see `elements::service_elements`).
        let mut rules = Vec::new();
        if family == Family::V4 {
            rules.push(format!("dnat {f} to {f} saddr . {key} map @{affinity}"));
        }
        rules.extend(classes().map(|m| {
            format!(
                "dnat {f} to {key} . numgen random mod {m} offset {} map @{}",
                offset(m),
                b.map()
            )
        }));
        chain(b.chain(), None, &rules);
    }

    // After the translation: remember the endpoint for sticky frontends.
    chain(
        "affinity",
        Some("type filter hook prerouting priority dstnat + 1; policy accept;"),
        &["ct state new ct status dnat jump affinity_update".into()],
    );
    chain(
        "affinity_output",
        Some("type filter hook output priority -99; policy accept;"),
        &["ct state new ct status dnat jump affinity_update".into()],
    );
    let mut update = Vec::new();
    let mut np_update = Vec::new();
    for &to in timeouts {
        let (ip, np) = affinity_rules(w, to);
        update.extend(ip);
        np_update.extend(np);
    }
    for p in ["tcp", "udp", "sctp"] {
        update.push(format!(
            "meta l4proto {p} ct original {f} daddr . meta l4proto . ct original proto-dst @ip_frontends return"
        ));
    }
    update.extend(np_update);
    chain("affinity_update", None, &update);

    for (name, hook) in [
        ("filter_input", "input"),
        ("filter_forward", "forward"),
        ("filter_output", "output"),
    ] {
        let mut rules = vec!["ct state new jump filter_services".to_owned()];
        if hook == "forward" {
            rules.push("ct state invalid drop".into());
        }
        chain(
            name,
            Some(&format!(
                "type filter hook {hook} priority filter; policy accept;"
            )),
            &rules,
        );
    }
    let mut filter = vec![
        // Without any endpoint: refused at once (TCP with a reset, see the
        // iptables data plane), not a time-out.
        format!("{fe} @no_endpoints meta l4proto tcp reject with tcp reset"),
        format!("{fe} @no_endpoints reject"),
        format!("{fe} @no_local_endpoints drop"),
        // Still addressed to the LB IP: the firewall chain did not admit it.
        format!("{fe} @firewalled drop"),
        // Still addressed to a cluster IP (its ports were translated): a
        // port the Service does not serve. Then an address in a Service
        // range that no Service holds (kube-proxy's nftables mode).
        format!("{f} daddr @allocated_ips meta l4proto tcp reject with tcp reset"),
        format!("{f} daddr @allocated_ips reject"),
        format!("{f} daddr @service_cidrs drop"),
    ];
    if family == Family::V4 && cfg.localhost_node_ports() {
        // route_localnet would otherwise let other hosts reach 127.0.0.1.
        filter
            .push("ip daddr 127.0.0.0/8 ip saddr != 127.0.0.0/8 ct status & dnat == 0 drop".into());
    }
    filter.extend(
        node_port_guards(family, cfg)
            .into_iter()
            .map(|g| format!("{g}jump filter_node_ports")),
    );
    chain("filter_services", None, &filter);
    chain(
        "filter_node_ports",
        None,
        &[
            format!("{np} @np_no_endpoints meta l4proto tcp reject with tcp reset"),
            format!("{np} @np_no_endpoints reject"),
            format!("{np} @np_no_local_endpoints drop"),
            // Load balancers ask every node; the healthcheck server answers.
            "tcp dport @health_checks accept".into(),
        ],
    );
    let _ = writeln!(t, "}}");
    t
}

/// The matches that make a packet node-port traffic: addressed to this
/// node (within `--nodeport-addresses` when given). Loopback is LOCAL too:
/// it is left out unless node ports are served there (never for IPv6).
fn node_port_guards(family: Family, cfg: &NodeConfig) -> Vec<String> {
    let f = Words::of(family).family;
    if !cfg.nodeport_addresses.is_empty() {
        return if cfg.nodeport_addresses.iter().any(|n| family.has_net(n)) {
            vec![format!("{f} daddr @nodeport_cidrs fib daddr type local ")]
        } else {
            Vec::new()
        };
    }
    let not_loopback = match family {
        Family::V6 => "ip6 daddr != ::1 ",
        Family::V4 if !cfg.localhost_node_ports() => "ip daddr != 127.0.0.0/8 ",
        Family::V4 => "",
    };
    vec![format!("{not_loopback}fib daddr type local ")]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_exact_then_wide() {
        assert_eq!(slots(1), 1);
        assert_eq!(slots(32), 32);
        assert_eq!(slots(33), 1024);
        assert_eq!(slots(128), 1024);
        assert_eq!(slots(129), 4096);
        assert_eq!(slots(5000), 4096);
        assert!(classes().any(|m| m == slots(700)));
    }

    #[test]
    fn class_ranges_do_not_overlap() {
        let ranges: Vec<(usize, usize)> = classes().map(|m| (offset(m), offset(m) + m)).collect();
        assert_eq!(ranges[0], (0, 1));
        assert_eq!(ranges[1], (1, 3));
        assert_eq!(offset(1024), (1..=32).sum::<usize>());
        for w in ranges.windows(2) {
            assert_eq!(w[0].1, w[1].0, "{w:?}");
        }
        let t = table(
            Family::V4,
            &crate::dataplane::fixtures::cfg(),
            &BTreeSet::new(),
        );
        assert_eq!(t.matches("map ip_main_slots").count(), 1, "{t}");
        assert!(
            t.contains("numgen random mod 4096 offset 1552 map @ip_main_slots"),
            "{t}"
        );
    }
}
