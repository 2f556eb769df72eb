//! What a Service is in our table: elements of the sets and maps of
//! [`super::layout`], written from the backend-neutral
//! [`crate::endpoints`] plans; and the record of what is programmed, from
//! which a change becomes element operations only. Pure: nothing runs here.
//!
//! ```text
//!  ServiceState ─▶ endpoints::plan ─▶ per port: frontends ─▶ set elements (cluster_ips, no_endpoints, ...)
//!                                               endpoints ─▶ map elements (ip_main_slots { FE . offset(N) + slot : endpoint })
//!  Programmed: (set, key) ─▶ { owner ─▶ data }   in force: the first owner's data
//!  partial(changed) ─▶ per touched key: before/after in force ─▶ "delete element" + "add element" (one batch)
//! ```
//!
//! Two Services may contribute the same element (the hairpin pair of an
//! endpoint both serve, a health-check port): the record counts owners, so
//! the element goes only with its last owner.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use switchyard_model::{Protocol, ServiceState, affinity_timeout_or_default};

use super::layout::{self, Balance, Words};
use crate::conntrack::{Desired, Frontend};
use crate::endpoints::{self, Backend, PortPlan};
use crate::iptables::{Family, NodeConfig};
use crate::state::{AgentState, ChangeSet};

/// One element: its set or map, its key and (maps only) its data.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Element {
    /// The set or map.
    pub set: String,
    /// The key, in nft syntax (`10.96.0.10 . tcp . 80`).
    pub key: String,
    /// The data (`10.244.1.2 . 8080`), empty for a set.
    pub data: String,
}

/// Everything one Service contributes in one family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceElements {
    /// Its elements.
    pub elements: Vec<Element>,
    /// The affinity timeout (seconds) of its ports, if sticky.
    pub affinity: Option<u32>,
    /// Sticky in the Service but balanced per connection here (IPv6, see
    /// [`service_elements`]).
    pub affinity_unsupported: bool,
    /// Its UDP frontends with the endpoints serving them (stale-flow clean-up).
    pub udp: Vec<(Frontend, BTreeSet<SocketAddr>)>,
}

fn proto(p: Protocol) -> &'static str {
    p.as_lowercase()
}

/// `ADDR . PROTO . PORT`.
fn frontend_key(ip: &IpAddr, p: Protocol, port: u16) -> String {
    format!("{ip} . {} . {port}", proto(p))
}

/// `PROTO . PORT`.
fn node_port_key(p: Protocol, port: u16) -> String {
    format!("{} . {port}", proto(p))
}

fn endpoint(b: &Backend) -> String {
    format!("{} . {}", b.ip, b.port)
}

fn host(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

impl ServiceElements {
    fn set(&mut self, set: &str, key: impl Into<String>) {
        self.elements.push(Element {
            set: set.to_owned(),
            key: key.into(),
            data: String::new(),
        });
    }

    /// The frontend `key`'s endpoints in balance group `b`: one element
    /// per slot of the endpoint count's class.
    fn balance(&mut self, b: Balance, key: &str, eps: &[Backend]) {
        if eps.is_empty() {
            return;
        }
        let m = layout::slots(eps.len());
        let offset = layout::offset(m);
        for s in 0..m {
            self.elements.push(Element {
                set: b.map().to_owned(),
                key: format!("{key} . {}", offset + s),
                data: endpoint(&eps[s % eps.len()]),
            });
        }
    }

    /// The elements of one port's plan, by frontend.
    fn port(&mut self, p: &PortPlan<'_>) {
        let pr = p.port.protocol;
        let (internal, external) = (p.has_internal_endpoints(), p.has_external_endpoints());
        // The cluster IP: to its policy's endpoints, or refused / dropped.
        let cip = frontend_key(&p.cluster_ip, pr, p.port.port);
        if !p.has_endpoints {
            self.set("no_endpoints", cip);
        } else if !internal {
            self.set("no_local_endpoints", cip);
        } else {
            let eps = if p.internal_local {
                &p.local_endpoints
            } else {
                &p.cluster_endpoints
            };
            self.balance(Balance::IpMain, &cip, eps);
            self.sticky(false, &cip);
            self.set("ip_frontends", cip.clone());
            self.set("cluster_ips", cip);
        }
        // External and LB IPs, and the node port: the external policy.
        let lb = p.load_balancer_ips.iter().map(|ip| (ip, true));
        for (ip, is_lb) in p.external_ips.iter().map(|ip| (ip, false)).chain(lb) {
            let fe = frontend_key(ip, pr, p.port.port);
            if !p.has_endpoints {
                self.set("no_endpoints", fe);
                continue;
            }
            if !external {
                self.set("no_local_endpoints", fe.clone());
            }
            match (&p.firewall, is_lb) {
                (Some(fw), true) => {
                    for range in &fw.source_ranges {
                        self.set("fw_allow", format!("{fe} . {range}"));
                    }
                    if fw.allow_from_load_balancer {
                        // A VIP routed on the node makes the node's own requests come from it.
                        for lb_ip in &p.load_balancer_ips {
                            self.set("fw_allow", format!("{fe} . {}", host(lb_ip)));
                        }
                    }
                    self.set("firewalled", fe.clone());
                }
                _ => self.set("external_ips", fe.clone()),
            }
            self.external(p, &fe, false);
            self.set("ip_frontends", fe);
        }
        if let Some(np) = p.node_port {
            let key = node_port_key(pr, np);
            if !p.has_endpoints {
                self.set("np_no_endpoints", key);
            } else {
                if !external {
                    self.set("np_no_local_endpoints", key.clone());
                }
                self.external(p, &key, true);
                self.set("node_ports", key);
            }
        }
        for b in p.reachable() {
            // An endpoint reaching itself through the Service is masqueraded.
            self.set("hairpin", format!("{} . {}", b.ip, b.ip));
        }
    }

    /// The balancing elements of an outside frontend (`key` is a node port's when `node_port`).
    fn external(&mut self, p: &PortPlan<'_>, key: &str, node_port: bool) {
        let (main, short) = if node_port {
            (Balance::NpMain, Balance::NpShort)
        } else {
            (Balance::IpMain, Balance::IpShort)
        };
        if p.external_local {
            self.set(if node_port { "np_local" } else { "ext_local" }, key);
            self.balance(main, key, &p.local_endpoints);
            self.balance(short, key, &p.cluster_endpoints);
        } else {
            self.balance(main, key, &p.cluster_endpoints);
        }
        self.sticky(node_port, key);
    }

    fn sticky(&mut self, node_port: bool, key: &str) {
        if let Some(t) = self.affinity {
            let set = if node_port {
                layout::np_affinity_set(t)
            } else {
                layout::affinity_set(t)
            };
            self.set(&set, key);
        }
    }
}

/// The elements of every port of `state` in `family` (nothing when the
/// Service is not proxied or has no address of the family).
pub fn service_elements(state: &ServiceState, family: Family, cfg: &NodeConfig) -> ServiceElements {
    let svc = &state.service;
    let plans = endpoints::plan(state, family.address_type(), &cfg.view());
    let mut out = ServiceElements {
        // IPv6 affinity is not programmed: nft 1.0.6 aborts linearizing any
        // ip6 `update @map { key : data }` (netlink_linearize.c:799), so an
        // IPv6 sticky Service is balanced per connection (ARCHITECTURE.md).
        affinity: svc
            .session_affinity_timeout
            .filter(|_| family == Family::V4)
            .map(|t| affinity_timeout_or_default(Some(t))),
        ..ServiceElements::default()
    };
    out.affinity_unsupported =
        family == Family::V6 && svc.session_affinity_timeout.is_some() && !plans.is_empty();
    for p in &plans {
        out.port(p);
        out.udp.extend(p.udp_flows());
    }
    if let Some(p) = plans.first() {
        out.set("allocated_ips", p.cluster_ip.to_string());
    }
    if let (Some(hc), Some(_)) = (svc.health_check_node_port, plans.first()) {
        out.set("health_checks", hc.to_string());
    }
    out
}

/// Element commands for one transaction: deletions first (so a map
/// element can be replaced), then additions, grouped by set.
#[derive(Debug, Default)]
pub struct Batch {
    deletes: BTreeMap<String, Vec<String>>,
    adds: BTreeMap<String, Vec<String>>,
    /// Element operations in this batch.
    pub operations: usize,
}

impl Batch {
    fn delete(&mut self, set: &str, key: &str) {
        self.deletes
            .entry(set.to_owned())
            .or_default()
            .push(key.to_owned());
        self.operations += 1;
    }

    fn add(&mut self, set: &str, key: &str, data: &str) {
        let e = if data.is_empty() {
            key.to_owned()
        } else {
            format!("{key} : {data}")
        };
        self.adds.entry(set.to_owned()).or_default().push(e);
        self.operations += 1;
    }

    /// The `delete element` / `add element` lines for table `table`.
    pub fn write(&self, out: &mut String, table: &str) {
        for (verb, sets) in [("delete", &self.deletes), ("add", &self.adds)] {
            for (set, items) in sets {
                // Long lines are fine for nft; chunks keep each one readable in errors.
                for chunk in items.chunks(2048) {
                    let _ = writeln!(
                        out,
                        "{verb} element {table} {set} {{ {} }}",
                        chunk.join(", ")
                    );
                }
            }
        }
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.operations == 0
    }
}

/// The Services that contribute one element, each with its data, by
/// name; the first one's data is in force. Almost every element has one
/// owner: a sorted vector costs 48 bytes per owner where a `BTreeMap` node
/// cost about 500, which at 10,000 Services (220,000 elements) was most
/// of the record's memory.
#[derive(Debug, Clone, Default)]
struct Owners(Vec<(String, String)>);

impl Owners {
    fn insert(&mut self, owner: &str, data: &str) {
        match self.0.binary_search_by(|(o, _)| o.as_str().cmp(owner)) {
            Ok(i) => data.clone_into(&mut self.0[i].1),
            Err(i) => self.0.insert(i, (owner.to_owned(), data.to_owned())),
        }
    }

    fn remove(&mut self, owner: &str) {
        if let Ok(i) = self.0.binary_search_by(|(o, _)| o.as_str().cmp(owner)) {
            self.0.remove(i);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn in_force(&self) -> Option<&String> {
        self.0.first().map(|(_, d)| d)
    }
}

/// Everything we programmed in one family.
#[derive(Debug, Clone)]
pub struct Programmed {
    family: Family,
    /// (set, key) ─▶ owner ─▶ data.
    owners: HashMap<(String, String), Owners>,
    services: HashMap<String, ServiceElements>,
    /// How many of `services` have UDP frontends (stale-flow clean-up
    /// walks every Service only when one has: that walk was 3.5% of the
    /// CPU of an endpoint change at 10,000 TCP Services).
    udp_services: usize,
    /// Affinity timeouts whose sets and rules exist.
    timeouts: BTreeSet<u32>,
}

impl Programmed {
    /// Nothing programmed yet.
    pub fn new(family: Family) -> Self {
        Self {
            family,
            owners: HashMap::new(),
            services: HashMap::new(),
            udp_services: 0,
            timeouts: BTreeSet::new(),
        }
    }

    /// The family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Elements in force.
    pub fn element_count(&self) -> usize {
        self.owners.len()
    }

    /// Affinity timeouts whose sets and rules exist.
    pub fn timeouts(&self) -> &BTreeSet<u32> {
        &self.timeouts
    }

    /// A fresh record of `state` and the one transaction that puts it in
    /// force over whatever our table held: the table replaced whole (the
    /// packets of the instant see the old table or the new one), because
    /// nft 1.0.6 cannot add rules that refer to a map it reads back (see
    /// [`layout`]). The clients the affinity maps remembered are written
    /// back by the data plane ([`super::NftablesDataPlane`]) in the same
    /// transaction.
    pub fn full(state: &AgentState, cfg: &NodeConfig, family: Family) -> (Self, String) {
        let mut me = Self::new(family);
        for (name, held) in &state.resources {
            let e = service_elements(&held.state, family, cfg);
            me.record(name, &e);
            me.udp_services += usize::from(!e.udp.is_empty());
            me.services.insert(name.clone(), e);
        }
        me.timeouts = me.services.values().filter_map(|s| s.affinity).collect();
        let w = Words::of(family);
        let table = w.table();
        let mut text = format!("add table {table}\ndelete table {table}\n");
        text.push_str(&layout::table(family, cfg, &me.timeouts));
        let mut batch = Batch::default();
        for ((set, key), owners) in &me.owners {
            if let Some(data) = owners.in_force() {
                batch.add(set, key, data);
            }
        }
        config_elements(&mut batch, family, cfg);
        batch.write(&mut text, &table);
        (me, text)
    }

    fn record(&mut self, name: &str, e: &ServiceElements) {
        for el in &e.elements {
            self.owners
                .entry((el.set.clone(), el.key.clone()))
                .or_default()
                .insert(name, &el.data);
        }
    }

    /// Moves the record to `state` for the Services in `changes`, and
    /// returns the one transaction that does the same in the kernel:
    /// element operations only. `None` when an affinity timeout no Service
    /// used before appears: its rules need a full sync.
    pub fn partial(
        &mut self,
        state: &AgentState,
        changes: &ChangeSet,
        cfg: &NodeConfig,
    ) -> Option<String> {
        let family = self.family;
        let mut before: HashMap<(String, String), Option<String>> = HashMap::new();
        let names: BTreeSet<&String> = changes.changed.iter().chain(&changes.removed).collect();
        let mut new_timeout = false;
        for name in names {
            let old = self.services.remove(name).unwrap_or_default();
            self.udp_services -= usize::from(!old.udp.is_empty());
            for el in &old.elements {
                let k = (el.set.clone(), el.key.clone());
                let in_force = self.in_force(&k);
                before.entry(k.clone()).or_insert(in_force);
                if let Some(o) = self.owners.get_mut(&k) {
                    o.remove(name);
                    if o.is_empty() {
                        self.owners.remove(&k);
                    }
                }
            }
            let Some(held) = state.resources.get(name) else {
                continue;
            };
            let new = service_elements(&held.state, family, cfg);
            for el in &new.elements {
                let k = (el.set.clone(), el.key.clone());
                let in_force = self.in_force(&k);
                before.entry(k).or_insert(in_force);
            }
            self.record(name, &new);
            self.udp_services += usize::from(!new.udp.is_empty());
            if let Some(t) = new.affinity
                && self.timeouts.insert(t)
            {
                new_timeout = true;
            }
            self.services.insert(name.clone(), new);
        }
        if new_timeout {
            return None;
        }
        let table = Words::of(family).table();
        let mut text = String::new();
        let mut batch = Batch::default();
        let mut keys: Vec<_> = before.into_iter().collect();
        keys.sort();
        for (k, was) in keys {
            let now = self.in_force(&k);
            match (was, now) {
                (None, Some(d)) => batch.add(&k.0, &k.1, &d),
                (Some(_), None) => batch.delete(&k.0, &k.1),
                (Some(a), Some(b)) if a != b => {
                    batch.delete(&k.0, &k.1);
                    batch.add(&k.0, &k.1, &b);
                }
                _ => {}
            }
        }
        batch.write(&mut text, &table);
        Some(text)
    }

    fn in_force(&self, k: &(String, String)) -> Option<String> {
        self.owners.get(k).and_then(|o| o.in_force().cloned())
    }

    /// Every UDP frontend programmed, with the endpoints serving it: what
    /// stale-flow clean-up keeps.
    pub fn udp_frontends(&self) -> Desired {
        let mut out = Desired::new();
        if self.udp_services == 0 {
            return out;
        }
        for (frontend, serving) in self.services.values().flat_map(|p| &p.udp) {
            out.entry(*frontend).or_default().extend(serving);
        }
        out
    }

    /// What every Service holds.
    pub fn services(&self) -> impl Iterator<Item = &ServiceElements> {
        self.services.values()
    }

    /// What one Service holds, for `/status?service=`.
    pub fn service(&self, name: &str) -> Option<&ServiceElements> {
        self.services.get(name)
    }
}

/// The elements that come from this node's settings.
fn config_elements(batch: &mut Batch, family: Family, cfg: &NodeConfig) {
    for c in cfg.cluster_cidrs.iter().filter(|c| family.has_net(c)) {
        batch.add("cluster_cidrs", &c.trunc().to_string(), "");
    }
    for c in cfg.nodeport_addresses.iter().filter(|c| family.has_net(c)) {
        batch.add("nodeport_cidrs", &c.trunc().to_string(), "");
    }
    for c in cfg.service_cidrs.iter().filter(|c| family.has_net(c)) {
        batch.add("service_cidrs", &c.trunc().to_string(), "");
    }
}

#[cfg(test)]
mod tests;
