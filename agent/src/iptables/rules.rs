//! Rule text: pure functions from a Service (and this node's settings) to
//! the iptables lines that proxy it, in one address family. What goes
//! where (endpoints, policy, topology, firewall) is decided by the
//! backend-neutral [`crate::endpoints::plan`]; this module only writes
//! each port's plan in iptables syntax, by frontend (cluster IP, external
//! and LB IPs, node port), then the chains that balance and translate.
//!
//! The layout follows kube-proxy's iptables mode with our own prefix:
//!
//! ```text
//! nat    PREROUTING, OUTPUT ─▶ SWY-SERVICES ─┬─▶ SWY-SB-<XX> ─▶ SWY-SVC-<h> | SWY-SVL-<h> | SWY-EXT-<h> | SWY-FW-<h> ─▶ SWY-SEP-<h> (DNAT)
//!                                            └─▶ (dst LOCAL, --nodeport-addresses) SWY-NODEPORTS ─▶ SWY-EXT-<h>
//! nat    POSTROUTING ─▶ SWY-POSTROUTING (MASQUERADE --random-fully what SWY-MARK-MASQ marked)
//! filter INPUT, FORWARD, OUTPUT (ctstate NEW) ─▶ SWY-SERVICES ─┬─▶ SWY-FB-<XX> (REJECT no endpoints (TCP: tcp-reset), DROP no local endpoints, LB firewall DROP)
//!                                                              └─▶ (dst LOCAL) SWY-NODEPORTS (the same for node ports; healthCheckNodePort ACCEPT)
//! filter FORWARD ─▶ SWY-FORWARD (INVALID drop, marked and established accept)
//! nat, filter: SWY-CANARY (one rule)
//! ```
//!
//! `<XX>` is the last byte of the destination address, `<h>` 16 base32
//! characters of SHA-256 over the chain's stable name and its rules (see
//! `rename`): one name always holds the same rules.
//!
//! The one departure from kube-proxy is the second dispatch level.
//! kube-proxy rewrites `KUBE-SERVICES` whole on every sync, O(services).
//! We measured the two ways to avoid it on top of a 20,000-rule dispatch
//! chain: deleting one rule by spec (`-D CHAIN spec` in a `--noflush`
//! restore) took 0.44 s, because iptables-nft fetches and compares the
//! whole chain; rewriting a 40-rule chain took 0.02 s. So a Service's
//! dispatch rules live in a bucket chain chosen by the last byte of the
//! destination address (`-d 0.0.0.XX/0.0.0.255`, `::XX/::ff` for IPv6; 256
//! buckets per table), and `SWY-SERVICES` holds one jump per non-empty
//! bucket plus the NodePort jump. A packet (only the first of a connection
//! reaches nat) crosses at most 256 bucket jumps and then its bucket,
//! instead of every Service. `SWY-NODEPORTS` is rewritten whole when a
//! node-port rule changes; it is bounded by the node-port range, not by the
//! number of Services.
//!
//! What the rules do with a [`crate::endpoints::PortPlan`]:
//! - The external chain `SWY-EXT-` exists whenever the port has endpoints
//!   anywhere: with `externalTrafficPolicy: Local`, pod sources (the
//!   cluster CIDRs) and the node itself (`--src-type LOCAL`, masqueraded)
//!   go to the Cluster endpoints, the rest to the local ones; a node with
//!   none drops only outside traffic (the filter rule matches what is
//!   still addressed to the frontend).
//! - With `loadBalancerSourceRanges`, `SWY-FW-` admits the ranges, and the
//!   LB IPs as sources only when a range holds one of this node's
//!   addresses (kube-proxy's `allowFromNode`; the addresses are read at
//!   start).
//! - Service ranges as kube-proxy's nftables mode treats them: the filter
//!   table sees packets after nat translated them, so what is still
//!   addressed to a cluster IP is for a port its Service does not have;
//!   each proxied Service's bucket ends with a REJECT for its cluster IP,
//!   and `SWY-SERVICES` drops what is addressed to `--service-cidr` after
//!   the buckets (an address no Service holds). A partial sync rewrites a
//!   shared chain only when the changed Service's rules in it changed, so
//!   an endpoint change still touches no filter chain.
//! - Localhost node ports (kube-proxy's `--iptables-localhost-nodeports`,
//!   on by default when loopback is a node-port address): the `LOCAL`
//!   destination match already sends 127.0.0.1 to `SWY-NODEPORTS`; a full
//!   sync sets `net.ipv4.conf.all.route_localnet=1` so the DNATed packet
//!   may leave, and the filter `SWY-SERVICES` tail (before its node-port
//!   jump) holds kube-proxy's guard against other hosts reaching
//!   127.0.0.0/8 (CVE-2020-8558). When they are off, and always for IPv6,
//!   the node-port jump excludes loopback (`! -d 127.0.0.0/8`, `! -d
//!   ::1/128`), so a process on the node's loopback is not shadowed.
//!   Turning them off does not reset `route_localnet`.
//! - `--nodeport-addresses primary` is resolved once at start to the
//!   source address of each family's default route. Session affinity uses
//!   `-m recent`, whose list names keep the stable names.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use sha2::{Digest, Sha256};
use switchyard_model::{Protocol, Service, ServiceState, affinity_timeout_or_default};

use crate::dataplane::{Family, NodeConfig};
use crate::endpoints::{self, Backend, Frontend, PortPlan};

/// Every chain we own starts with this.
pub const PREFIX: &str = "SWY-";
/// Dispatch chain (nat and filter).
pub const SERVICES: &str = "SWY-SERVICES";
/// NodePort dispatch (nat and filter).
pub const NODEPORTS: &str = "SWY-NODEPORTS";
/// Marks a packet for masquerading.
pub const MARK_MASQ: &str = "SWY-MARK-MASQ";
/// Masquerades marked packets.
pub const POSTROUTING: &str = "SWY-POSTROUTING";
/// Marks packets whose source is outside every cluster CIDR.
pub const OFF_CLUSTER: &str = "SWY-OFF-CLUSTER";
/// Accepts forwarded service traffic (filter).
pub const FORWARD: &str = "SWY-FORWARD";
/// Holds one rule; if it is gone, someone flushed our rules.
pub const CANARY: &str = "SWY-CANARY";

/// The two tables we program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// `nat`: dispatch, load balancing, DNAT, masquerade.
    Nat,
    /// `filter`: REJECT/DROP for Services without endpoints, firewalls.
    Filter,
}

impl Table {
    /// Both tables, in the order a transaction writes them.
    pub const ALL: [Table; 2] = [Table::Nat, Table::Filter];

    /// The name iptables uses.
    pub fn name(self) -> &'static str {
        match self {
            Table::Nat => "nat",
            Table::Filter => "filter",
        }
    }
}

/// A shared dispatch chain that Services contribute rules to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// The bucket of destinations whose last address byte is this.
    Bucket(u8),
    /// `SWY-NODEPORTS`.
    NodePorts,
}

impl Slot {
    /// The chain holding this slot's rules in `table`.
    pub fn chain(self, table: Table) -> String {
        match (self, table) {
            (Slot::Bucket(b), Table::Nat) => format!("SWY-SB-{b:02X}"),
            (Slot::Bucket(b), Table::Filter) => format!("SWY-FB-{b:02X}"),
            (Slot::NodePorts, _) => NODEPORTS.to_owned(),
        }
    }
}

/// The bucket a destination address falls in.
pub fn bucket_of(ip: &IpAddr) -> u8 {
    match ip {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    }
}

/// The `SWY-SERVICES` rule spec that sends a bucket's destinations to its chain.
pub fn bucket_jump(family: Family, table: Table, bucket: u8) -> String {
    let m = match family {
        Family::V4 => format!("0.0.0.{bucket}/0.0.0.255"),
        Family::V6 => format!("::{bucket:x}/::ff"),
    };
    format!("-d {m} -j {}", Slot::Bucket(bucket).chain(table))
}

/// A chain we own, with its complete content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedChain {
    /// Its table.
    pub table: Table,
    /// Its name.
    pub name: String,
    /// Rule specs, in order, without the `-A <chain>` head.
    pub rules: Vec<String>,
}

impl OwnedChain {
    fn new(table: Table, name: impl Into<String>) -> Self {
        Self {
            table,
            name: name.into(),
            rules: Vec::new(),
        }
    }

    fn push(&mut self, spec: impl Into<String>) {
        self.rules.push(spec.into());
    }
}

/// One rule a Service puts in a shared dispatch chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchRule {
    /// Its table.
    pub table: Table,
    /// Which shared chain.
    pub slot: Slot,
    /// The rule spec, without the `-A <chain>` head.
    pub spec: String,
}

/// Everything one Service contributes in one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// Chains only this Service uses.
    pub chains: Vec<OwnedChain>,
    /// Its rules in shared dispatch chains.
    pub dispatch: Vec<DispatchRule>,
    /// Its UDP frontends with the endpoints serving them, for stale-flow
    /// clean-up.
    pub udp: Vec<(Frontend, BTreeSet<SocketAddr>)>,
}

/// First 16 characters of base32(sha256(input)), as kube-proxy names chains.
fn hash16(input: &str) -> String {
    base32_16(&Sha256::digest(input.as_bytes()))
}

/// The first 16 base32 characters of a digest.
fn base32_16(digest: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    // 16 base32 characters are 80 bits: the first 10 bytes.
    let mut bits: u128 = 0;
    for b in &digest[..10] {
        bits = (bits << 8) | u128::from(*b);
    }
    (0..16)
        .rev()
        .map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
        .collect()
}

fn proto_match(p: Protocol, port: u16) -> String {
    let p = p.as_lowercase();
    format!("-p {p} -m {p} --dport {port}")
}

/// The rules of every port of `state` in `family` (nothing when the
/// Service is not proxied or has no address of the family).
pub fn service_rules(state: &ServiceState, family: Family, cfg: &NodeConfig) -> ServiceRules {
    let svc = &state.service;
    let mut out = ServiceRules::default();
    let plans = endpoints::plan(state, family.address_type(), &cfg.view());
    for plan in &plans {
        port_rules(&mut out, svc, plan, family, cfg);
        out.udp.extend(plan.udp_flows());
    }
    if let Some(first) = plans.first() {
        unknown_ports(&mut out, svc, first.cluster_ip, family);
    }
    if let (Some(hc), Some(_)) = (svc.health_check_node_port, plans.first()) {
        // Load balancers ask every node; the healthcheck server answers.
        out.dispatch.push(DispatchRule {
            table: Table::Filter,
            slot: Slot::NodePorts,
            spec: format!(
                "-p tcp -m tcp --dport {hc} -m comment --comment \"{}/{} health check node port\" -j ACCEPT",
                svc.key.namespace, svc.key.name
            ),
        });
    }
    name_by_content(&mut out);
    out
}

/// After the Service's own filter rules in its bucket: what is still
/// addressed to its cluster IP (its ports were translated before the filter
/// table) is for a port it does not serve, and is refused, as kube-proxy's
/// nftables mode does ("Reject traffic to invalid ports of ClusterIPs").
fn unknown_ports(out: &mut ServiceRules, svc: &Service, ip: IpAddr, family: Family) {
    let comment = format!(
        "-m comment --comment \"{}/{} has no such port\"",
        svc.key.namespace, svc.key.name
    );
    let cip = family.host(&ip);
    // TCP with a reset, as for a Service without endpoints (see `verdicts`).
    for (proto, target) in [
        ("-p tcp ", "REJECT --reject-with tcp-reset"),
        ("", "REJECT"),
    ] {
        out.dispatch.push(DispatchRule {
            table: Table::Filter,
            slot: Slot::Bucket(bucket_of(&ip)),
            spec: format!("-d {cip} {proto}{comment} -j {target}"),
        });
    }
}

/// Renames the Service's chains after their content: the kind
/// (`SWY-SEP-`, `SWY-SVC-`, ...) and 16 base32 characters of SHA-256 over
/// the stable name (service port, protocol, endpoint) and the rules, whose
/// jumps already name the renamed targets. One name therefore always holds
/// the same rules: a sync leaves a chain alone when that name is in the
/// kernel already, and a changed chain is written under a new name and the
/// old one deleted once nothing jumps to it. `-m recent` list names keep
/// the stable names, so affinity survives endpoint changes.
fn name_by_content(out: &mut ServiceRules) {
    let index: HashMap<String, usize> = out
        .chains
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.clone(), i))
        .collect();
    let mut renamed = HashMap::with_capacity(index.len());
    for i in 0..out.chains.len() {
        rename(i, &mut out.chains, &index, &mut renamed);
    }
    for d in &mut out.dispatch {
        retarget(&mut d.spec, &renamed);
    }
    for c in &mut out.chains {
        if let Some(n) = renamed.get(&c.name) {
            c.name.clone_from(n);
        }
    }
}

/// Names chain `i` after renaming the chains it jumps to (depth first; the
/// chains of one Service form a DAG at most four deep).
fn rename(
    i: usize,
    chains: &mut [OwnedChain],
    index: &HashMap<String, usize>,
    renamed: &mut HashMap<String, String>,
) {
    if renamed.contains_key(&chains[i].name) {
        return;
    }
    let targets: Vec<usize> = chains[i]
        .rules
        .iter()
        .filter_map(|r| index.get(jump_target(r)?).copied())
        .filter(|&j| j != i)
        .collect();
    for j in targets {
        rename(j, chains, index, renamed);
    }
    let c = &mut chains[i];
    let mut h = Sha256::new();
    h.update(c.name.as_bytes());
    for r in &mut c.rules {
        retarget(r, renamed);
        h.update(b"\n");
        h.update(r.as_bytes());
    }
    let kind = &c.name[..c.name.rfind('-').map_or(0, |d| d + 1)];
    let name = format!("{kind}{}", base32_16(&h.finalize()));
    renamed.insert(c.name.clone(), name);
}

/// The chain a rule jumps to: the word after its last `-j`.
fn jump_target(rule: &str) -> Option<&str> {
    let at = rule.rfind("-j ")? + 3;
    rule[at..].split(' ').next()
}

fn retarget(rule: &mut String, renamed: &HashMap<String, String>) {
    if let Some(at) = rule.rfind("-j ").map(|a| a + 3) {
        let end = rule[at..].find(' ').map_or(rule.len(), |e| at + e);
        if let Some(n) = renamed.get(&rule[at..end]) {
            rule.replace_range(at..end, n);
        }
    }
}

/// The rules of one Service port, written from its plan: dispatch by
/// frontend (cluster IP, external and LB IPs, node port), then the chains
/// that balance and translate.
struct PortRules<'p, 'a> {
    plan: &'p PortPlan<'a>,
    family: Family,
    cfg: &'p NodeConfig,
    /// `namespace/name:port`, for comments.
    name: String,
    /// The port's stable name (`cluster/namespace/name:port` + protocol).
    base: String,
    /// `-p PROTO -m PROTO --dport PORT` for the Service port.
    pm: String,
    svc_chain: String,
    svl_chain: String,
    ext_chain: String,
    fw_chain: String,
    /// ClientIP affinity timeout, seconds.
    session_affinity: Option<u32>,
}

/// A filter verdict and why, for traffic that cannot be served.
type Verdict = (&'static str, &'static str);

impl<'p, 'a> PortRules<'p, 'a> {
    fn new(svc: &Service, plan: &'p PortPlan<'a>, family: Family, cfg: &'p NodeConfig) -> Self {
        let sp = plan.port;
        let name = if sp.name.is_empty() {
            format!("{}/{}", svc.key.namespace, svc.key.name)
        } else {
            format!("{}/{}:{}", svc.key.namespace, svc.key.name, sp.name)
        };
        let base = format!("{}:{}{}", svc.key, sp.name, sp.protocol.as_lowercase());
        let h = hash16(&base);
        Self {
            plan,
            family,
            cfg,
            name,
            pm: proto_match(sp.protocol, sp.port),
            svc_chain: format!("SWY-SVC-{h}"),
            svl_chain: format!("SWY-SVL-{h}"),
            ext_chain: format!("SWY-EXT-{h}"),
            fw_chain: format!("SWY-FW-{h}"),
            base,
            session_affinity: svc
                .session_affinity_timeout
                .map(|t| affinity_timeout_or_default(Some(t))),
        }
    }

    fn dispatch(out: &mut ServiceRules, table: Table, slot: Slot, spec: String) {
        out.dispatch.push(DispatchRule { table, slot, spec });
    }

    /// Filter verdicts for cluster-IP and for outside traffic that has
    /// nowhere to go. Without any endpoint: REJECT (TCP with a reset: in
    /// the IPv6 packet test the ICMPv6 error reached the client but its
    /// connect failed only when the SYN was retransmitted a second later; a
    /// reset refuses at once in both families). With endpoints elsewhere
    /// only: DROP what a Local policy cannot serve here; the EXT chain has
    /// already sent pods and the node itself to the Cluster endpoints.
    fn verdicts(&self) -> (Option<Verdict>, Option<Verdict>) {
        let p = self.plan;
        if !p.has_endpoints {
            let reject = if p.port.protocol == Protocol::Tcp {
                "REJECT --reject-with tcp-reset"
            } else {
                "REJECT"
            };
            let v = Some((reject, "has no endpoints"));
            return (v, v);
        }
        let drop = ("DROP", "has no local endpoints");
        (
            (!p.has_internal_endpoints()).then_some(drop),
            (!p.has_external_endpoints()).then_some(drop),
        )
    }

    fn cluster_ip(&self, out: &mut ServiceRules, internal: Option<Verdict>) {
        let (name, pm) = (&self.name, &self.pm);
        let ip = self.plan.cluster_ip;
        let cip = self.family.host(&ip);
        let slot = Slot::Bucket(bucket_of(&ip));
        match internal {
            None => {
                let chain = if self.plan.internal_local {
                    &self.svl_chain
                } else {
                    &self.svc_chain
                };
                Self::dispatch(
                    out,
                    Table::Nat,
                    slot,
                    format!("-d {cip} {pm} -m comment --comment \"{name} cluster IP\" -j {chain}"),
                );
            }
            Some((verdict, why)) => Self::dispatch(
                out,
                Table::Filter,
                slot,
                format!("-d {cip} {pm} -m comment --comment \"{name} {why}\" -j {verdict}"),
            ),
        }
    }

    fn external_ips(&self, out: &mut ServiceRules, external: Option<Verdict>) {
        let p = self.plan;
        let (name, pm) = (&self.name, &self.pm);
        let lb_target = if self.uses_firewall() {
            &self.fw_chain
        } else {
            &self.ext_chain
        };
        let frontends = p
            .external_ips
            .iter()
            .map(|ip| (ip, "external IP", &self.ext_chain))
            .chain(
                p.load_balancer_ips
                    .iter()
                    .map(|ip| (ip, "loadbalancer IP", lb_target)),
            );
        for (ip, what, target) in frontends {
            let d = self.family.host(ip);
            let slot = Slot::Bucket(bucket_of(ip));
            if p.has_endpoints {
                Self::dispatch(
                    out,
                    Table::Nat,
                    slot,
                    format!("-d {d} {pm} -m comment --comment \"{name} {what}\" -j {target}"),
                );
            }
            if let Some((verdict, why)) = external {
                Self::dispatch(
                    out,
                    Table::Filter,
                    slot,
                    format!("-d {d} {pm} -m comment --comment \"{name} {why}\" -j {verdict}"),
                );
            }
        }
        if self.uses_firewall() {
            // Whatever the FW chain did not send on keeps the LB address and is dropped here.
            for ip in &p.load_balancer_ips {
                Self::dispatch(
                    out,
                    Table::Filter,
                    Slot::Bucket(bucket_of(ip)),
                    format!(
                        "-d {} {pm} -m comment --comment \"{name} traffic outside loadBalancerSourceRanges\" -j DROP",
                        self.family.host(ip)
                    ),
                );
            }
        }
    }

    fn node_port(&self, out: &mut ServiceRules, external: Option<Verdict>) {
        let Some(np) = self.plan.node_port else {
            return;
        };
        let name = &self.name;
        let npm = proto_match(self.plan.port.protocol, np);
        if self.plan.has_endpoints {
            Self::dispatch(
                out,
                Table::Nat,
                Slot::NodePorts,
                format!(
                    "{npm} -m comment --comment \"{name}\" -j {}",
                    self.ext_chain
                ),
            );
        }
        if let Some((verdict, why)) = external {
            Self::dispatch(
                out,
                Table::Filter,
                Slot::NodePorts,
                format!("{npm} -m comment --comment \"{name} {why}\" -j {verdict}"),
            );
        }
    }

    fn uses_firewall(&self) -> bool {
        self.plan.has_endpoints && self.plan.firewall.is_some()
    }

    /// The balancing, external, firewall and endpoint chains.
    fn chains(&self, out: &mut ServiceRules) {
        let p = self.plan;
        let mut endpoints: Vec<(String, Backend)> = Vec::new();
        if !p.cluster_endpoints.is_empty() {
            // The off-cluster masquerade rule goes on the chain cluster-IP traffic takes.
            let masq = !p.internal_local;
            let c = self.balance(&self.svc_chain, &p.cluster_endpoints, masq, &mut endpoints);
            out.chains.push(c);
        }
        if !p.local_endpoints.is_empty() {
            let masq = p.internal_local;
            let c = self.balance(&self.svl_chain, &p.local_endpoints, masq, &mut endpoints);
            out.chains.push(c);
        }
        if p.has_endpoints && p.externally_accessible() {
            out.chains.push(self.external_chain());
        }
        if self.uses_firewall() {
            out.chains.push(self.firewall_chain());
        }
        for (sep, b) in endpoints {
            out.chains.push(self.endpoint_chain(&sep, &b));
        }
    }

    /// `SWY-EXT-`: every outside frontend jumps here. It is written whenever
    /// the port has endpoints anywhere: with externalTrafficPolicy Local,
    /// pods and the node itself short-circuit to the Cluster endpoints
    /// (traffic from the node is masqueraded, since its source would be
    /// the frontend address), and only what comes from outside goes on to
    /// the local endpoints, or to the filter DROP when there are none here.
    fn external_chain(&self) -> OwnedChain {
        let p = self.plan;
        let name = &self.name;
        let mut c = OwnedChain::new(Table::Nat, &self.ext_chain);
        let to_cluster = !p.cluster_endpoints.is_empty();
        if !p.external_local {
            c.push(format!(
                "-m comment --comment \"masquerade traffic for {name} external destinations\" -j {MARK_MASQ}"
            ));
            if to_cluster {
                c.push(format!("-j {}", self.svc_chain));
            }
            return c;
        }
        if to_cluster {
            for cidr in self.cfg.cidrs(self.family) {
                c.push(format!(
                    "-s {cidr} -m comment --comment \"pod traffic for {name} external destinations\" -j {}",
                    self.svc_chain
                ));
            }
        }
        c.push(format!(
            "-m addrtype --src-type LOCAL -m comment --comment \"masquerade LOCAL traffic for {name} external destinations\" -j {MARK_MASQ}"
        ));
        if to_cluster {
            c.push(format!(
                "-m addrtype --src-type LOCAL -m comment --comment \"route LOCAL traffic for {name} external destinations\" -j {}",
                self.svc_chain
            ));
        }
        if !p.local_endpoints.is_empty() {
            c.push(format!("-j {}", self.svl_chain));
        }
        c
    }

    /// `SWY-FW-`: the LB IPs' sources within loadBalancerSourceRanges go on
    /// to the external chain; the rest stays un-translated and meets the
    /// filter DROP.
    fn firewall_chain(&self) -> OwnedChain {
        let name = &self.name;
        let mut fw = OwnedChain::new(Table::Nat, &self.fw_chain);
        let Some(firewall) = &self.plan.firewall else {
            return fw;
        };
        for src in &firewall.source_ranges {
            fw.push(format!(
                "-s {src} -m comment --comment \"{name} loadbalancer IP\" -j {}",
                self.ext_chain
            ));
        }
        if firewall.allow_from_load_balancer {
            for ip in &self.plan.load_balancer_ips {
                // A VIP routed on the node makes the node's own requests come from it.
                fw.push(format!(
                    "-s {} -m comment --comment \"{name} loadbalancer IP\" -j {}",
                    self.family.host(ip),
                    self.ext_chain
                ));
            }
        }
        fw
    }

    /// A balancing chain over `eps`, collecting the endpoint chains it jumps to.
    fn balance(
        &self,
        chain: &str,
        eps: &[Backend],
        masq: bool,
        endpoints: &mut Vec<(String, Backend)>,
    ) -> OwnedChain {
        let (family, cfg) = (self.family, self.cfg);
        let mut c = OwnedChain::new(Table::Nat, chain);
        if masq && let Some(m) = self.masquerade_off_cluster(cfg) {
            c.push(m);
        }
        let seps: Vec<String> = eps
            .iter()
            .map(|b| {
                let sep = format!(
                    "SWY-SEP-{}",
                    hash16(&format!("{}{}", self.base, family.socket(&b.ip, b.port)))
                );
                if !endpoints.iter().any(|(n, _)| *n == sep) {
                    endpoints.push((sep.clone(), *b));
                }
                sep
            })
            .collect();
        if let Some(t) = self.session_affinity {
            for sep in &seps {
                c.push(format!(
                    "-m recent --name {sep} --rcheck --seconds {t} --reap -j {sep}"
                ));
            }
        }
        let n = seps.len();
        for (i, sep) in seps.iter().enumerate() {
            if i + 1 < n {
                c.push(format!(
                    "-m statistic --mode random --probability {:.10} -j {sep}",
                    1.0 / (n - i) as f64
                ));
            } else {
                c.push(format!("-j {sep}"));
            }
        }
        c
    }

    fn masquerade_off_cluster(&self, cfg: &NodeConfig) -> Option<String> {
        let (name, pm) = (&self.name, &self.pm);
        let cip = self.family.host(&self.plan.cluster_ip);
        let cidrs: Vec<&IpNet> = cfg.cidrs(self.family).collect();
        match cidrs.as_slice() {
            [] => None,
            [one] => Some(format!(
                "! -s {one} -d {cip} {pm} -m comment --comment \"{name} cluster IP\" -j {MARK_MASQ}"
            )),
            _ => Some(format!(
                "-d {cip} {pm} -m comment --comment \"{name} cluster IP\" -j {OFF_CLUSTER}"
            )),
        }
    }

    fn endpoint_chain(&self, sep: &str, b: &Backend) -> OwnedChain {
        let mut c = OwnedChain::new(Table::Nat, sep);
        c.push(format!("-s {} -j {MARK_MASQ}", self.family.host(&b.ip)));
        let p = self.plan.port.protocol.as_lowercase();
        let set = if self.session_affinity.is_some() {
            format!(" -m recent --name {sep} --set")
        } else {
            String::new()
        };
        c.push(format!(
            "-p {p} -m {p}{set} -j DNAT --to-destination {}",
            self.family.socket(&b.ip, b.port)
        ));
        c
    }
}

fn port_rules(
    out: &mut ServiceRules,
    svc: &Service,
    plan: &PortPlan<'_>,
    family: Family,
    cfg: &NodeConfig,
) {
    let port = PortRules::new(svc, plan, family, cfg);
    let (internal, external) = port.verdicts();
    port.cluster_ip(out, internal);
    port.external_ips(out, external);
    port.node_port(out, external);
    port.chains(out);
}

/// The chains every node has, whatever the Services: masquerading, the
/// off-cluster check, forwarding accepts, the canary, and the heads of the
/// dispatch chains (their bucket jumps come from the sync).
pub fn static_chains(family: Family, cfg: &NodeConfig) -> Vec<OwnedChain> {
    let mark = format!("{:#x}", cfg.masquerade_mark);
    let mut masq = OwnedChain::new(Table::Nat, MARK_MASQ);
    masq.push(format!("-j MARK --or-mark {mark}"));
    let mut post = OwnedChain::new(Table::Nat, POSTROUTING);
    post.push(format!("-m mark ! --mark {mark}/{mark} -j RETURN"));
    // Clear the bit so a packet re-traversing the stack is not masqueraded twice.
    post.push(format!("-j MARK --xor-mark {mark}"));
    post.push("-m comment --comment \"switchyard service traffic requiring SNAT\" -j MASQUERADE --random-fully");
    let mut off = OwnedChain::new(Table::Nat, OFF_CLUSTER);
    for cidr in cfg.cidrs(family) {
        off.push(format!("-s {cidr} -j RETURN"));
    }
    off.push(format!("-j {MARK_MASQ}"));
    let mut fwd = OwnedChain::new(Table::Filter, FORWARD);
    fwd.push("-m conntrack --ctstate INVALID -j DROP");
    fwd.push(format!(
        "-m mark --mark {mark}/{mark} -m comment --comment \"switchyard forwarding rules\" -j ACCEPT"
    ));
    fwd.push("-m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment \"switchyard forwarding conntrack rule\" -j ACCEPT");
    let mut out = vec![masq, post, off, fwd];
    for table in Table::ALL {
        let mut canary = OwnedChain::new(table, CANARY);
        canary.push(CANARY_RULE);
        out.push(canary);
    }
    out
}

/// The one rule of each canary chain.
pub const CANARY_RULE: &str = "-m comment --comment \"switchyard canary\" -j RETURN";

/// The last rules of `SWY-SERVICES` in `table`: NodePort traffic (to a local
/// address, within `--nodeport-addresses`) goes to `SWY-NODEPORTS`.
pub fn services_tail(family: Family, table: Table, cfg: &NodeConfig) -> Vec<String> {
    let mut out = Vec::new();
    if family == Family::V4 && table == Table::Filter && cfg.localhost_node_ports() {
        // route_localnet would otherwise let other hosts reach 127.0.0.1.
        out.push("-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -m comment --comment \"switchyard: block incoming localnet connections\" -j DROP".to_owned());
    }
    if table == Table::Filter {
        // Not translated, not refused by a Service's own rules above, yet
        // in a Service range: an address no Service holds.
        out.extend(
            cfg.service_cidrs
                .iter()
                .filter(|n| family.has_net(n))
                .map(|n| format!("-d {n} -m comment --comment \"switchyard: unallocated service IPs\" -j DROP")),
        );
    }
    let comment = "-m comment --comment \"switchyard service nodeports; NOTE: this must be the last rule in this chain\"";
    if cfg.nodeport_addresses.is_empty() {
        // Loopback is LOCAL too: keep it out unless node ports are served
        // there (never for IPv6, where route_localnet does not exist), so a
        // node's own process on 127.0.0.1 is not shadowed.
        let not_loopback = match family {
            Family::V6 => "! -d ::1/128 ",
            Family::V4 if !cfg.localhost_node_ports() => "! -d 127.0.0.0/8 ",
            Family::V4 => "",
        };
        out.push(format!(
            "{not_loopback}-m addrtype --dst-type LOCAL {comment} -j {NODEPORTS}"
        ));
    } else {
        out.extend(
            cfg.nodeport_addresses
                .iter()
                .filter(|n| family.has_net(n))
                .map(|c| format!("-d {c} -m addrtype --dst-type LOCAL {comment} -j {NODEPORTS}")),
        );
    }
    out
}

/// A rule we place in a built-in chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinJump {
    /// Its table.
    pub table: Table,
    /// The built-in chain.
    pub chain: &'static str,
    /// Our chain it jumps to (unique per built-in chain, so it identifies the rule).
    pub target: &'static str,
    /// The rule spec.
    pub spec: &'static str,
}

/// Every rule outside our chains, inserted at the top of its built-in chain.
pub const BUILTIN_JUMPS: [BuiltinJump; 7] = [
    BuiltinJump {
        table: Table::Nat,
        chain: "PREROUTING",
        target: SERVICES,
        spec: "-m comment --comment \"switchyard service portals\" -j SWY-SERVICES",
    },
    BuiltinJump {
        table: Table::Nat,
        chain: "OUTPUT",
        target: SERVICES,
        spec: "-m comment --comment \"switchyard service portals\" -j SWY-SERVICES",
    },
    BuiltinJump {
        table: Table::Nat,
        chain: "POSTROUTING",
        target: POSTROUTING,
        spec: "-m comment --comment \"switchyard postrouting rules\" -j SWY-POSTROUTING",
    },
    BuiltinJump {
        table: Table::Filter,
        chain: "INPUT",
        target: SERVICES,
        spec: "-m conntrack --ctstate NEW -m comment --comment \"switchyard service portals\" -j SWY-SERVICES",
    },
    BuiltinJump {
        table: Table::Filter,
        chain: "FORWARD",
        target: SERVICES,
        spec: "-m conntrack --ctstate NEW -m comment --comment \"switchyard service portals\" -j SWY-SERVICES",
    },
    BuiltinJump {
        table: Table::Filter,
        chain: "OUTPUT",
        target: SERVICES,
        spec: "-m conntrack --ctstate NEW -m comment --comment \"switchyard service portals\" -j SWY-SERVICES",
    },
    BuiltinJump {
        table: Table::Filter,
        chain: "FORWARD",
        target: FORWARD,
        spec: "-m comment --comment \"switchyard forwarding rules\" -j SWY-FORWARD",
    },
];

/// Appends `-A chain spec` lines.
pub fn write_chain(out: &mut String, chain: &str, rules: &[String]) {
    for r in rules {
        let _ = writeln!(out, "-A {chain} {r}");
    }
}

#[cfg(test)]
pub(crate) mod tests;
