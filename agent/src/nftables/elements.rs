//! What a Service is in our table: elements of the sets and maps of
//! [`super::layout`], written from the backend-neutral
//! [`crate::endpoints`] plans; and the record of what is programmed, from
//! which a change becomes element operations only. Pure: nothing runs here.
//!
//! ```text
//!  ServiceState ─▶ endpoints::plan ─▶ per port: frontends ─▶ set elements (cluster_ips, no_endpoints, ...)
//!                                               endpoints ─▶ map elements (ip_main_slots { FE . offset(N) + slot : endpoint })
//!  Programmed: hash(set, key) ─▶ owner id(s)   in force: the first owner's (by name) data
//!  partial(old, new, changed) ─▶ the changed Services' elements in old and new ─▶ per touched key:
//!      before/after in force ─▶ Batch (deletes, then adds) ─▶ netlink messages (one batch) or nft text
//! ```
//!
//! Two Services may contribute the same element (the hairpin pair of an
//! endpoint both serve, a health-check port): the record counts owners, so
//! the element goes only with its last owner.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::hash::BuildHasher as _;
use std::net::{IpAddr, SocketAddr};

use switchyard_model::{Protocol, ServiceState, affinity_timeout_or_default};

use super::layout::{self, Balance, Words};
use super::netlink::{Encoder, NetlinkError, Op};
use super::owners::{ByHash, ElementHash, Owners};
use crate::conntrack::{Desired, Frontend};
use crate::dataplane::{Family, NodeConfig};
use crate::endpoints::{self, Backend, PortPlan};
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
    adds: BTreeMap<String, Vec<(String, String)>>,
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
        self.adds
            .entry(set.to_owned())
            .or_default()
            .push((key.to_owned(), data.to_owned()));
        self.operations += 1;
    }

    /// The `delete element` / `add element` lines for table `table`.
    pub fn write(&self, out: &mut String, table: &str) {
        for (set, items) in &self.deletes {
            for chunk in items.chunks(2048) {
                let _ = writeln!(
                    out,
                    "delete element {table} {set} {{ {} }}",
                    chunk.join(", ")
                );
            }
        }
        for (set, items) in &self.adds {
            // Long lines are fine for nft; chunks keep each one readable in errors.
            for chunk in items.chunks(2048) {
                let items: Vec<String> = chunk.iter().map(|(k, d)| element_text(k, d)).collect();
                let _ = writeln!(out, "add element {table} {set} {{ {} }}", items.join(", "));
            }
        }
    }

    /// The same operations as netlink messages, into one batch.
    pub fn encode(&self, enc: &mut Encoder) -> Result<(), NetlinkError> {
        for (set, items) in &self.deletes {
            for key in items {
                enc.push(Op::Delete, set, key, "")?;
            }
        }
        for (set, items) in &self.adds {
            for (key, data) in items {
                enc.push(Op::Add, set, key, data)?;
            }
        }
        Ok(())
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.operations == 0
    }

    /// Adds an element to add.
    pub fn add_element(&mut self, set: &str, key: &str, data: &str) {
        self.add(set, key, data);
    }

    /// Whether it touches a set whose elements go through text only.
    pub fn has_ranged(&self) -> bool {
        self.deletes
            .keys()
            .chain(self.adds.keys())
            .any(|s| super::netlink::ranged(s))
    }
}

/// `KEY` or `KEY : DATA`, as `add element` takes it.
pub fn element_text(key: &str, data: &str) -> String {
    if data.is_empty() {
        key.to_owned()
    } else {
        format!("{key} : {data}")
    }
}

/// What the record keeps of one Service: no elements (they are computed
/// again from the state when it changes), only what the clean-ups and
/// `/status` ask about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceRecord {
    id: u32,
    /// The affinity timeout (seconds) of its ports, if sticky.
    pub affinity: Option<u32>,
    /// Sticky in the Service but balanced per connection here.
    pub affinity_unsupported: bool,
    /// Its UDP frontends with the endpoints serving them.
    udp: Vec<(Frontend, BTreeSet<SocketAddr>)>,
}

/// Everything we programmed in one family, compactly: each element in
/// force is a 64-bit hash of its set and key with the id of the Service
/// that owns it (12 bytes in a sorted array, [`Owners`]; elements as
/// strings with owners by name cost some 500 bytes each, 1.1 GiB at
/// 100,000 Services x 10 endpoints). A
/// Service's elements are computed again from the state when it changes,
/// so the record never holds them. Two elements whose hashes collide would
/// be taken for one: at 2.3 million elements the odds are about 1 in 7
/// million per record.
#[derive(Debug, Clone)]
pub struct Programmed {
    family: Family,
    hasher: foldhash::quality::RandomState,
    /// Element ─▶ its one owner (almost every element).
    single: Owners,
    /// Element ─▶ its owners, when more than one Service contributes it.
    shared: ByHash<Vec<u32>>,
    services: HashMap<String, ServiceRecord>,
    /// Service id ─▶ name (empty when free).
    names: Vec<String>,
    free: Vec<u32>,
    /// How many of `services` have UDP frontends (stale-flow clean-up
    /// walks every Service only when one has: that walk was 3.5% of the
    /// CPU of an endpoint change at 10,000 TCP Services).
    udp_services: usize,
    /// Affinity timeouts whose sets and rules exist.
    timeouts: BTreeSet<u32>,
    /// The digest of the skeleton this record was built on.
    base: u128,
    /// The sum of [`element_digest`] over every element in force.
    elements_digest: u128,
}

/// Seeds of the two 64-bit halves of [`element_digest`]: fixed, so another
/// process of the same build computes the same digest.
const DIGEST_SEEDS: [u64; 2] = [0x5377_6974_6368_7961, 0x7264_2064_6967_6573];

/// A 128-bit hash of one element, the same in every process of this
/// build (fixed seeds; another build may differ, which only costs a full
/// sync).
fn element_digest(set: &str, key: &str, data: &str) -> u128 {
    let [a, b] = DIGEST_SEEDS
        .map(|s| foldhash::quality::FixedState::with_seed(s).hash_one((set, key, data)));
    (u128::from(a) << 64) | u128::from(b)
}

/// The digest of a table's skeleton text, with the agent's version (a new
/// version may write the same elements differently).
fn skeleton_digest(text: &str) -> u128 {
    element_digest(env!("CARGO_PKG_VERSION"), text, "")
}

/// The marker element of [`layout::DIGEST_SET`] for a digest: the digest
/// as the set's one IPv6 address.
pub fn digest_key(digest: u128) -> String {
    std::net::Ipv6Addr::from(digest).to_string()
}

/// The affinity timeouts the Services of `state` use in `family`: what
/// the skeleton declares sets and rules for.
pub fn timeouts(state: &AgentState, family: Family) -> BTreeSet<u32> {
    if family != Family::V4 {
        return BTreeSet::new();
    }
    state
        .resources
        .values()
        .filter_map(|h| h.state.service.session_affinity_timeout)
        .map(|t| affinity_timeout_or_default(Some(t)))
        .collect()
}

/// The transaction that replaces our table in `family` by its skeleton:
/// sets, maps, chains and rules, and the node's CIDR sets (libnftables).
pub fn skeleton(family: Family, cfg: &NodeConfig, timeouts: &BTreeSet<u32>) -> String {
    let table = Words::of(family).table();
    let mut text = format!("add table {table}\ndelete table {table}\n");
    text.push_str(&layout::table(family, cfg, timeouts));
    let mut batch = Batch::default();
    config_elements(&mut batch, family, cfg);
    batch.write(&mut text, &table);
    text
}

impl Programmed {
    /// Nothing programmed yet.
    pub fn new(family: Family) -> Self {
        Self {
            family,
            hasher: foldhash::quality::RandomState::default(),
            single: Owners::default(),
            shared: ByHash::default(),
            services: HashMap::new(),
            names: Vec::new(),
            free: Vec::new(),
            udp_services: 0,
            timeouts: BTreeSet::new(),
            base: 0,
            elements_digest: 0,
        }
    }

    /// What the table holds when the kernel has exactly this record: the
    /// skeleton's digest plus the sum of every element's (an order-free
    /// sum, so a change moves it by its own elements only). Written to the
    /// kernel as [`layout::DIGEST_SET`]'s one element, in the same
    /// transaction as every sync; an agent starting over a table whose
    /// marker equals what its persisted state makes keeps the table.
    pub fn digest(&self) -> u128 {
        self.base.wrapping_add(self.elements_digest)
    }

    fn count_in(&mut self, set: &str, key: &str, data: &str) {
        self.elements_digest = self
            .elements_digest
            .wrapping_add(element_digest(set, key, data));
    }

    fn count_out(&mut self, set: &str, key: &str, data: &str) {
        self.elements_digest = self
            .elements_digest
            .wrapping_sub(element_digest(set, key, data));
    }

    /// The family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Elements in force.
    pub fn element_count(&self) -> usize {
        self.single.len() + self.shared.len()
    }

    /// Affinity timeouts whose sets and rules exist.
    pub fn timeouts(&self) -> &BTreeSet<u32> {
        &self.timeouts
    }

    /// A fresh record of `state`; every element in force goes to `sink`
    /// (set, key, data), each once, in the Services' name order (of two
    /// Services giving one map key different data, the first one's is in
    /// force). What goes before it is [`skeleton`] with [`timeouts`].
    pub fn full<E>(
        state: &AgentState,
        cfg: &NodeConfig,
        family: Family,
        mut sink: impl FnMut(&str, &str, &str) -> Result<(), E>,
    ) -> Result<Self, E> {
        let mut me = Self::new(family);
        for (name, held) in &state.resources {
            let e = service_elements(&held.state, family, cfg);
            let id = me.intern(name, &e);
            for el in &e.elements {
                if me.own(&el.set, &el.key, id) {
                    me.count_in(&el.set, &el.key, &el.data);
                    sink(&el.set, &el.key, &el.data)?;
                }
            }
        }
        me.timeouts = timeouts(state, family);
        me.base = skeleton_digest(&skeleton(family, cfg, &me.timeouts));
        Ok(me)
    }

    /// [`Programmed::full`] as one libnftables text (skeleton and every
    /// element): what `nft -f` takes, for tests and the benchmarks' floor.
    pub fn full_text(state: &AgentState, cfg: &NodeConfig, family: Family) -> (Self, String) {
        let mut batch = Batch::default();
        let me = Self::full(state, cfg, family, |s, k, d| {
            batch.add(s, k, d);
            Ok::<(), std::convert::Infallible>(())
        })
        .unwrap_or_else(|e| match e {});
        batch.add(layout::DIGEST_SET, &digest_key(me.digest()), "");
        let mut text = skeleton(family, cfg, &me.timeouts);
        batch.write(&mut text, &Words::of(family).table());
        (me, text)
    }

    fn hash(&self, set: &str, key: &str) -> ElementHash {
        ElementHash::new(self.hasher.hash_one((set, key)))
    }

    /// Records Service `name` (a new id, or its old one) with what it holds.
    fn intern(&mut self, name: &str, e: &ServiceElements) -> u32 {
        let id = match self.services.get(name) {
            Some(r) => r.id,
            None => match self.free.pop() {
                Some(id) => {
                    name.clone_into(&mut self.names[id as usize]);
                    id
                }
                None => {
                    self.names.push(name.to_owned());
                    u32::try_from(self.names.len() - 1).expect("under 4 billion Services")
                }
            },
        };
        let record = ServiceRecord {
            id,
            affinity: e.affinity,
            affinity_unsupported: e.affinity_unsupported,
            udp: e.udp.clone(),
        };
        self.udp_services += usize::from(!record.udp.is_empty());
        if let Some(old) = self.services.insert(name.to_owned(), record) {
            self.udp_services -= usize::from(!old.udp.is_empty());
        }
        id
    }

    fn forget(&mut self, name: &str) {
        if let Some(old) = self.services.remove(name) {
            self.udp_services -= usize::from(!old.udp.is_empty());
            self.names[old.id as usize].clear();
            self.free.push(old.id);
        }
    }

    /// Adds `id` to the element's owners; whether the element is new.
    fn own(&mut self, set: &str, key: &str, id: u32) -> bool {
        let h = self.hash(set, key);
        if let Some(owners) = self.shared.get_mut(&h) {
            if let Err(i) = owners.binary_search(&id) {
                owners.insert(i, id);
            }
            return false;
        }
        match self.single.get_or_insert(h, id) {
            None => true,
            Some(o) if o == id => false,
            Some(o) => {
                self.single.remove(h);
                let mut v = vec![o, id];
                v.sort_unstable();
                self.shared.insert(h, v);
                false
            }
        }
    }

    /// Removes `id` from the element's owners.
    fn disown(&mut self, set: &str, key: &str, id: u32) {
        let h = self.hash(set, key);
        if self.single.get(h) == Some(id) {
            self.single.remove(h);
            return;
        }
        if let Some(owners) = self.shared.get_mut(&h) {
            if let Ok(i) = owners.binary_search(&id) {
                owners.remove(i);
            }
            if owners.len() == 1 {
                let last = owners[0];
                self.shared.remove(&h);
                self.single.insert(h, last);
            }
        }
    }

    /// The Service whose data is in force for an element (the first by
    /// name), if any owns it.
    fn first_owner(&self, set: &str, key: &str) -> Option<&str> {
        let h = self.hash(set, key);
        if let Some(o) = self.single.get(h) {
            return Some(&self.names[o as usize]);
        }
        self.shared
            .get(&h)?
            .iter()
            .map(|&o| self.names[o as usize].as_str())
            .min()
    }

    /// Moves the record from `old` to `state` for the Services in
    /// `changes`, and returns the element operations that do the same in
    /// the kernel. `None` when an affinity timeout no Service used before
    /// appears: its rules need a full sync.
    pub fn partial(
        &mut self,
        old: &AgentState,
        state: &AgentState,
        changes: &ChangeSet,
        cfg: &NodeConfig,
    ) -> Option<Batch> {
        let family = self.family;
        let names: BTreeSet<&String> = changes.changed.iter().chain(&changes.removed).collect();
        let digest_before = self.digest();
        // Each changed Service's elements before and after.
        let mut cache: HashMap<(String, bool), ServiceElements> = HashMap::new();
        let mut touched: BTreeSet<(String, String)> = BTreeSet::new();
        let mut new_timeout = false;
        for &name in &names {
            for (st, after) in [(old, false), (state, true)] {
                let Some(held) = st.resources.get(name) else {
                    continue;
                };
                let e = service_elements(&held.state, family, cfg);
                touched.extend(e.elements.iter().map(|el| (el.set.clone(), el.key.clone())));
                if after && e.affinity.is_some_and(|t| !self.timeouts.contains(&t)) {
                    new_timeout = true;
                }
                cache.insert((name.clone(), after), e);
            }
        }
        let before: Vec<Option<String>> = touched
            .iter()
            .map(|(s, k)| self.in_force(s, k, old, false, &mut cache, cfg))
            .collect();
        for &name in &names {
            let id = self.services.get(name.as_str()).map(|r| r.id);
            if let (Some(id), Some(e)) = (id, cache.get(&(name.clone(), false))) {
                let els: Vec<(String, String)> = e
                    .elements
                    .iter()
                    .map(|el| (el.set.clone(), el.key.clone()))
                    .collect();
                for (s, k) in els {
                    self.disown(&s, &k, id);
                }
            }
            match cache.get(&(name.clone(), true)) {
                Some(e) => {
                    let e = e.clone();
                    let id = self.intern(name, &e);
                    for el in &e.elements {
                        self.own(&el.set, &el.key, id);
                    }
                }
                None => self.forget(name),
            }
        }
        if new_timeout {
            self.timeouts = timeouts(state, family);
            return None;
        }
        let mut batch = Batch::default();
        for ((set, key), was) in touched.iter().zip(before) {
            let now = self.in_force(set, key, state, true, &mut cache, cfg);
            match (was, now) {
                (None, Some(d)) => {
                    self.count_in(set, key, &d);
                    batch.add(set, key, &d);
                }
                (Some(a), None) => {
                    self.count_out(set, key, &a);
                    batch.delete(set, key);
                }
                (Some(a), Some(b)) if a != b => {
                    self.count_out(set, key, &a);
                    self.count_in(set, key, &b);
                    batch.delete(set, key);
                    batch.add(set, key, &b);
                }
                _ => {}
            }
        }
        // The marker moves in the same transaction as the elements.
        let digest = self.digest();
        if digest != digest_before {
            batch.delete(layout::DIGEST_SET, &digest_key(digest_before));
            batch.add(layout::DIGEST_SET, &digest_key(digest), "");
        }
        Some(batch)
    }

    /// The data in force for an element in `st` (empty for a set
    /// element), `None` when no Service owns it. A Service's elements are
    /// computed once per state and kept in `cache`.
    fn in_force(
        &self,
        set: &str,
        key: &str,
        st: &AgentState,
        after: bool,
        cache: &mut HashMap<(String, bool), ServiceElements>,
        cfg: &NodeConfig,
    ) -> Option<String> {
        let owner = self.first_owner(set, key)?.to_owned();
        let slot = (owner, after);
        if !cache.contains_key(&slot) {
            let e = st
                .resources
                .get(&slot.0)
                .map(|h| service_elements(&h.state, self.family, cfg))
                .unwrap_or_default();
            cache.insert(slot.clone(), e);
        }
        cache[&slot]
            .elements
            .iter()
            .find(|el| el.set == set && el.key == key)
            .map(|el| el.data.clone())
            .or(Some(String::new()))
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

    /// The names of the sticky Services.
    pub fn sticky_services(&self) -> impl Iterator<Item = &str> {
        self.services
            .iter()
            .filter(|(_, r)| r.affinity.is_some())
            .map(|(n, _)| n.as_str())
    }

    /// What the record keeps of one Service.
    pub fn service(&self, name: &str) -> Option<&ServiceRecord> {
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
