//! The cluster zone as a hashed index, built from one [`AgentState`].
//!
//! ```text
//!  AgentState ──build──▶ DnsIndex { names: lower-cased name ─▶ records, reverse: arpa name ─▶ PTR }
//!  previous index + next AgentState ──next──▶ DnsIndex   (only the Services that changed)
//! ```
//!
//! Each Service contributes a set of names (its own, the empty non-terminals
//! above them, its reverse names); a name counts the Services that contribute
//! it and goes when the last one does. [`DnsIndex::next`] takes the previous
//! contribution of every changed Service out and puts the new one in, so an
//! update costs what changed. The maps are split into shards that an update
//! copies only where it writes: the index being replaced keeps answering,
//! unchanged, until the new one is in force.
//!
//! Every name that exists holds its records; empty non-terminals (such as
//! `svc.<zone>`, `<ns>.svc.<zone>` and `_tcp.<svc>...`) are present with no
//! records, so a miss is one hash lookup (NXDOMAIN) and never a scan.
//! Pod names (`10-244-1-2.<ns>.pod.<zone>`, CoreDNS's default `pods
//! insecure` mode) are not stored: the name is the address, so a miss under
//! `pod.<zone>` is answered from the name itself.
//! An index is immutable: a new snapshot makes a new one.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use switchyard_model::{Endpoint, ServiceState, ServiceType};

use crate::state::AgentState;

/// The schema version of the Kubernetes DNS specification we implement.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// The zone of the clusterset's imports; the MCS DNS specification says it
/// "must be `clusterset.local`".
pub const CLUSTERSET_ZONE: &str = "clusterset.local.";

/// The schema version of the MCS DNS specification we implement.
pub const CLUSTERSET_SCHEMA_VERSION: &str = "1.0.0";

/// The records of one name (empty for an empty non-terminal).
#[derive(Debug, Default, Clone)]
pub(crate) struct Node {
    pub(crate) records: Vec<Record>,
    /// How many Services contribute this name (the apex names: one more).
    refs: u32,
}

/// Shards per map: at 10,000 Services (about 100,000 names) an update that
/// writes a name copies a shard of about a hundred.
const SHARDS: usize = 1024;

/// A map from names, in shards shared between successive indexes: a write
/// copies its shard only if an older index still holds it.
#[derive(Debug, Clone)]
pub(crate) struct Names<V> {
    shards: Vec<Arc<HashMap<LowerName, V>>>,
    len: usize,
}

impl<V: Clone> Names<V> {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Arc::new(HashMap::new())).collect(),
            len: 0,
        }
    }

    fn shard(name: &LowerName) -> usize {
        // SipHash with fixed keys: the same shard for a name in every index.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        (h.finish() % SHARDS as u64) as usize
    }

    pub(crate) fn get(&self, name: &LowerName) -> Option<&V> {
        self.shards[Self::shard(name)].get(name)
    }

    fn contains(&self, name: &LowerName) -> bool {
        self.get(name).is_some()
    }

    fn insert(&mut self, name: LowerName, value: V) {
        let shard = Arc::make_mut(&mut self.shards[Self::shard(&name)]);
        if shard.insert(name, value).is_none() {
            self.len += 1;
        }
    }

    fn get_mut(&mut self, name: &LowerName) -> Option<&mut V> {
        let shard = &mut self.shards[Self::shard(name)];
        if !shard.contains_key(name) {
            return None;
        }
        Arc::make_mut(shard).get_mut(name)
    }

    fn entry_or_default(&mut self, name: &LowerName) -> &mut V
    where
        V: Default,
    {
        if !self.contains(name) {
            self.insert(name.clone(), V::default());
        }
        self.get_mut(name).expect("just inserted")
    }

    fn remove(&mut self, name: &LowerName) {
        let shard = &mut self.shards[Self::shard(name)];
        if shard.contains_key(name) {
            Arc::make_mut(shard).remove(name);
            self.len -= 1;
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&LowerName, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    #[cfg(test)]
    pub(crate) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }
}

/// The cluster zone and the reverse names of one agent state.
#[derive(Debug)]
pub struct DnsIndex {
    /// The snapshot version the index was built from (empty: no snapshot yet).
    pub version: String,
    /// The state the index was built from; queries compare it with the state in force.
    pub(crate) source: Arc<AgentState>,
    pub(crate) zone: LowerName,
    /// `clusterset.local.`: the imports of the clusterset (MCS).
    pub(crate) clusterset_zone: LowerName,
    /// Names of both zones (they do not overlap).
    pub(crate) names: Names<Node>,
    pub(crate) reverse: Names<Vec<Record>>,
    pub(crate) soa: Record,
    pub(crate) clusterset_soa: Record,
    ttl: u32,
    /// How long the build took.
    pub build_time: Duration,
    /// Services whose contribution changed to make this index from the
    /// previous one (`None`: built whole).
    pub changed: Option<usize>,
}

impl DnsIndex {
    /// Builds the index of `state` for `zone` with records of `ttl` seconds.
    pub fn build(state: Arc<AgentState>, zone: &Name, ttl: u32) -> Self {
        let started = Instant::now();
        let zone = zone.to_lowercase();
        let clusterset = Name::from_ascii(CLUSTERSET_ZONE).expect("a valid name");
        let mut names = Names::new();
        let mut reverse = Names::new();
        let mut apex = |apex: &Name, schema: &str| {
            let mut b = Builder::new(apex, ttl);
            let soa = b.apex(schema);
            if apex == &zone {
                b.ensure(&b.sub(&["pod"]));
            }
            b.merge_into(&mut names, &mut reverse, 1);
            soa
        };
        let soa = apex(&zone, SCHEMA_VERSION);
        let clusterset_soa = apex(&clusterset, CLUSTERSET_SCHEMA_VERSION);
        let mut index = Self {
            version: state.version.clone(),
            source: state.clone(),
            zone: LowerName::new(&zone),
            clusterset_zone: LowerName::new(&clusterset),
            names,
            reverse,
            soa,
            clusterset_soa,
            ttl,
            build_time: Duration::ZERO,
            changed: None,
        };
        let mut touched = HashSet::new();
        for held in state.resources.values() {
            index
                .contribution(&held.state)
                .add_to(&mut index, &mut touched);
        }
        index.sort(&touched);
        index.build_time = started.elapsed();
        index
    }

    /// The index of `state`, made from `self` (the index of an earlier
    /// state): only the Services whose state differs are taken out and put
    /// back. Builds whole when most of them changed.
    pub fn next(&self, state: Arc<AgentState>) -> Self {
        let started = Instant::now();
        let changed = changed_services(&self.source, &state);
        if changed.len() > state.resources.len() / 4 + 64 {
            let mut index = Self::build(state, &Name::from(&self.zone), self.ttl);
            // Within the same second as `self`: a serial ahead of its own.
            index.restamp(Zone::Cluster, serial(&self.soa));
            index.restamp(Zone::Clusterset, serial(&self.clusterset_soa));
            return index;
        }
        let mut index = Self {
            version: state.version.clone(),
            source: state.clone(),
            zone: self.zone.clone(),
            clusterset_zone: self.clusterset_zone.clone(),
            names: self.names.clone(),
            reverse: self.reverse.clone(),
            soa: self.soa.clone(),
            clusterset_soa: self.clusterset_soa.clone(),
            ttl: self.ttl,
            build_time: Duration::ZERO,
            changed: Some(changed.len()),
        };
        let mut touched = HashSet::new();
        let (mut cluster, mut clusterset) = (false, false);
        for (old, new) in &changed {
            for st in [old, new].into_iter().flatten() {
                if st.service.key.cluster == switchyard_model::CLUSTERSET {
                    clusterset = true;
                } else {
                    cluster = true;
                }
            }
            if let Some(old) = old {
                index.contribution(old).remove_from(&mut index);
            }
            if let Some(new) = new {
                index.contribution(new).add_to(&mut index, &mut touched);
            }
        }
        index.sort(&touched);
        // A zone whose names changed gets a new serial, as on a whole build.
        if cluster {
            index.restamp(Zone::Cluster, serial(&self.soa));
        }
        if clusterset {
            index.restamp(Zone::Clusterset, serial(&self.clusterset_soa));
        }
        index.build_time = started.elapsed();
        index
    }

    /// Gives `zone`'s SOA, here and at its apex, a serial ahead of
    /// `after`: the current second, as a whole build stamps it (CoreDNS's
    /// `kubernetes` gives the time of its last change), or `after + 1` when
    /// the clock has not passed `after`.
    fn restamp(&mut self, zone: Zone, after: u32) {
        let soa = match zone {
            Zone::Cluster => &mut self.soa,
            Zone::Clusterset => &mut self.clusterset_soa,
        };
        let old = soa.clone();
        if let RData::SOA(data) = &mut soa.data {
            data.serial = now_serial().max(after.saturating_add(1));
        }
        let stamped = soa.clone();
        if let Some(apex) = self.names.get_mut(&LowerName::new(&old.name)) {
            for r in apex.records.iter_mut().filter(|r| **r == old) {
                *r = stamped.clone();
            }
        }
    }

    /// What one Service puts in the index.
    fn contribution(&self, st: &ServiceState) -> Builder {
        if st.service.key.cluster == switchyard_model::CLUSTERSET {
            let mut b = Builder::new(&Name::from(&self.clusterset_zone), self.ttl);
            b.import(st);
            b
        } else {
            let mut b = Builder::new(&Name::from(&self.zone), self.ttl);
            b.service(st);
            b
        }
    }

    /// Groups the records of the names an update wrote by type.
    fn sort(&mut self, touched: &HashSet<LowerName>) {
        for name in touched {
            if let Some(node) = self.names.get_mut(name) {
                sort_by_type(&mut node.records);
            }
        }
    }

    /// Names answered: zone names (empty non-terminals included) and reverse names.
    pub fn len(&self) -> usize {
        self.names.len() + self.reverse.len()
    }

    /// Whether the index holds no name at all (never true: the apex exists).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a snapshot was in force when the index was built.
    pub fn has_snapshot(&self) -> bool {
        !self.version.is_empty()
    }
}

/// The names and records of one Service (or of a zone's apex), before they
/// join an index.
struct Builder {
    zone: Name,
    ttl: u32,
    names: HashMap<LowerName, Node>,
    reverse: HashMap<LowerName, Vec<Record>>,
}

impl Builder {
    fn new(zone: &Name, ttl: u32) -> Self {
        Self {
            zone: zone.clone(),
            ttl,
            names: HashMap::new(),
            reverse: HashMap::new(),
        }
    }

    /// Adds these names to the index, each counted once more.
    fn merge_into(self, names: &mut Names<Node>, reverse: &mut Names<Vec<Record>>, refs: u32) {
        for (name, node) in self.names {
            let into = names.entry_or_default(&name);
            into.refs += refs;
            for r in node.records {
                if !into.records.contains(&r) {
                    into.records.push(r);
                }
            }
        }
        for (name, records) in self.reverse {
            let into = reverse.entry_or_default(&name);
            for r in records {
                if !into.contains(&r) {
                    into.push(r);
                }
            }
        }
    }

    fn add_to(self, index: &mut DnsIndex, touched: &mut HashSet<LowerName>) {
        touched.extend(
            self.names
                .iter()
                .filter(|(_, n)| !n.records.is_empty())
                .map(|(k, _)| k.clone()),
        );
        self.merge_into(&mut index.names, &mut index.reverse, 1);
    }

    /// Takes these names out of the index: their records, and the names no
    /// other Service contributes. Records of one name come from one Service
    /// (its names are under its own), and a PTR names its Service, so no
    /// record taken out belongs to another.
    fn remove_from(self, index: &mut DnsIndex) {
        for (name, node) in self.names {
            let Some(into) = index.names.get_mut(&name) else {
                continue;
            };
            into.records.retain(|r| !node.records.contains(r));
            into.refs = into.refs.saturating_sub(1);
            if into.refs == 0 {
                index.names.remove(&name);
            }
        }
        for (name, records) in self.reverse {
            let Some(into) = index.reverse.get_mut(&name) else {
                continue;
            };
            into.retain(|r| !records.contains(r));
            if into.is_empty() {
                index.reverse.remove(&name);
            }
        }
    }

    /// The zone's apex (SOA, NS), its `dns-version` TXT and `svc`; returns the SOA.
    fn apex(&mut self, schema: &str) -> Record {
        let zone = self.zone.clone();
        let soa = Record::from_rdata(
            zone.clone(),
            self.ttl,
            RData::SOA(SOA::new(
                self.sub(&["ns", "dns"]),
                self.sub(&["hostmaster"]),
                now_serial(),
                7200,
                1800,
                86400,
                self.ttl,
            )),
        );
        self.add(&zone, soa.data.clone());
        self.add(&zone, RData::NS(NS(self.sub(&["ns", "dns"]))));
        self.add(
            &self.sub(&["dns-version"]),
            RData::TXT(TXT::new(vec![schema.into()])),
        );
        self.ensure(&self.sub(&["svc"]));
        soa
    }

    /// An import of the clusterset (MCS DNS specification):
    /// `<svc>.<ns>.svc.clusterset.local` answers the ClusterSet IP (PTR too)
    /// or, headless, the ready endpoints of every exporting cluster, each
    /// also at `<hostname>.<cluster-id>.<svc>.<ns>.svc.clusterset.local`;
    /// SRV for named ports. `<cluster-id>.<svc>...` itself must not exist.
    fn import(&mut self, st: &ServiceState) {
        let svc = &st.service;
        let ns = self.sub(&[&svc.key.namespace, "svc"]);
        self.ensure(&ns);
        let Ok(base) = ns.prepend_label(svc.key.name.as_str()) else {
            return;
        };
        if !svc.headless {
            self.ensure(&base);
            for ip in &svc.cluster_ips {
                self.add_address(&base, *ip);
                self.add_ptr(*ip, &base);
            }
            for p in svc.ports.iter().filter(|p| !p.name.is_empty()) {
                if let Some(srv) = srv_name(&base, &p.name, p.protocol.as_lowercase()) {
                    self.add(&srv, RData::SRV(SRV::new(0, 100, p.port, base.clone())));
                }
            }
            return;
        }
        let publish_all = svc.publish_not_ready_addresses;
        for slice in &st.slices {
            let cluster = slice.cluster.as_deref().unwrap_or(&svc.key.cluster);
            let Ok(in_cluster) = base.prepend_label(cluster) else {
                continue;
            };
            for ep in slice
                .endpoints
                .iter()
                .filter(|e| publish_all || e.conditions.ready)
            {
                for ip in &ep.addresses {
                    let Ok(host) = in_cluster.prepend_label(host_label(ep, *ip).as_str()) else {
                        continue;
                    };
                    self.add_address(&base, *ip);
                    // Not `add`: the `<cluster-id>` level stays absent.
                    self.add_leaf(&host, RData::from(*ip));
                    for p in slice.ports.iter().filter(|p| !p.name.is_empty()) {
                        if let Some(srv) = srv_name(&base, &p.name, p.protocol.as_lowercase()) {
                            self.add(&srv, RData::SRV(SRV::new(0, 100, p.port, host.clone())));
                        }
                    }
                }
            }
        }
    }

    /// A record at `name` whose parent need not exist as a name.
    fn add_leaf(&mut self, name: &Name, data: RData) {
        let record = Record::from_rdata(name.clone(), self.ttl, data);
        let node = self.names.entry(LowerName::new(name)).or_default();
        if !node.records.contains(&record) {
            node.records.push(record);
        }
    }

    /// `labels` (most specific first) under the zone.
    fn sub(&self, labels: &[&str]) -> Name {
        let mut name = self.zone.clone();
        for l in labels.iter().rev() {
            name = name.prepend_label(*l).unwrap_or_else(|_| self.zone.clone());
        }
        name
    }

    /// Makes `name` and every ancestor down to the zone exist.
    fn ensure(&mut self, name: &Name) {
        let mut n = name.clone();
        while n.num_labels() >= self.zone.num_labels() {
            let key = LowerName::new(&n);
            if self.names.contains_key(&key) {
                break;
            }
            self.names.insert(key, Node::default());
            if n.num_labels() == 0 {
                break;
            }
            n = n.base_name();
        }
    }

    fn add(&mut self, name: &Name, data: RData) {
        self.ensure(name);
        let record = Record::from_rdata(name.clone(), self.ttl, data);
        let node = self.names.entry(LowerName::new(name)).or_default();
        if !node.records.contains(&record) {
            node.records.push(record);
        }
    }

    fn add_address(&mut self, name: &Name, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => self.add(name, RData::A(A(v4))),
            IpAddr::V6(v6) => self.add(name, RData::AAAA(AAAA(v6))),
        }
    }

    fn add_ptr(&mut self, ip: IpAddr, target: &Name) {
        let Ok(arpa) = Name::from_ascii(reverse_name(ip)) else {
            return;
        };
        let record = Record::from_rdata(arpa.clone(), self.ttl, RData::PTR(PTR(target.clone())));
        let v = self.reverse.entry(LowerName::new(&arpa)).or_default();
        if !v.contains(&record) {
            v.push(record);
        }
    }

    fn service(&mut self, st: &ServiceState) {
        let svc = &st.service;
        let ns = self.sub(&[&svc.key.namespace, "svc"]);
        self.ensure(&ns);
        let Ok(base) = ns.prepend_label(svc.key.name.as_str()) else {
            return;
        };
        if svc.service_type == ServiceType::ExternalName {
            if let Some(target) = svc
                .external_name
                .as_deref()
                .and_then(|n| Name::from_ascii(n).ok())
            {
                let mut target = target.to_lowercase();
                target.set_fqdn(true);
                self.add(&base, RData::CNAME(CNAME(target)));
            }
            return;
        }
        if !svc.headless {
            for ip in &svc.cluster_ips {
                self.add_address(&base, *ip);
                self.add_ptr(*ip, &base);
            }
            let named = svc.ports.iter().filter(|p| !p.name.is_empty());
            for p in named {
                if let Some(srv) = srv_name(&base, &p.name, p.protocol.as_lowercase()) {
                    self.add(&srv, RData::SRV(SRV::new(0, 100, p.port, base.clone())));
                }
            }
            return;
        }
        // Headless: the endpoints themselves, each under its own host name.
        let publish_all = svc.publish_not_ready_addresses;
        let mut srvs: Vec<(Name, u16, Name)> = Vec::new();
        for slice in &st.slices {
            for ep in slice
                .endpoints
                .iter()
                .filter(|e| publish_all || e.conditions.ready)
            {
                for ip in &ep.addresses {
                    let Ok(host) = base.prepend_label(host_label(ep, *ip).as_str()) else {
                        continue;
                    };
                    self.add_address(&base, *ip);
                    self.add_address(&host, *ip);
                    self.add_ptr(*ip, &host);
                    for p in slice.ports.iter().filter(|p| !p.name.is_empty()) {
                        if let Some(srv) = srv_name(&base, &p.name, p.protocol.as_lowercase()) {
                            srvs.push((srv, p.port, host.clone()));
                        }
                    }
                }
            }
        }
        for (srv, port, host) in srvs {
            self.add(&srv, RData::SRV(SRV::new(0, 100, port, host)));
        }
    }
}

/// The Services of `before` and `after` whose state differs, as
/// (before, after); `None` where a side does not hold it. The maps are
/// persistent B-trees: the subtrees the two states share are skipped, so
/// this costs about the changes times the tree's depth.
fn changed_services<'a>(
    before: &'a AgentState,
    after: &'a AgentState,
) -> Vec<(Option<&'a ServiceState>, Option<&'a ServiceState>)> {
    use imbl::ordmap::DiffItem;
    before
        .resources
        .diff(&after.resources)
        .filter_map(|d| match d {
            DiffItem::Add(_, new) => Some((None, Some(&*new.state))),
            DiffItem::Remove(_, old) => Some((Some(&*old.state), None)),
            DiffItem::Update { old, new } => {
                // A new version of equal content changes no name.
                (old.1.state != new.1.state).then_some((Some(&*old.1.state), Some(&*new.1.state)))
            }
        })
        .collect()
}

/// The two zones of an index.
#[derive(Debug, Clone, Copy)]
enum Zone {
    Cluster,
    Clusterset,
}

/// A zone's serial: the current second (Unix time).
fn now_serial() -> u32 {
    u32::try_from(crate::unix_nanos() / 1_000_000_000).unwrap_or(u32::MAX)
}

/// The serial of `soa` (0 for a record that is not an SOA).
fn serial(soa: &Record) -> u32 {
    match &soa.data {
        RData::SOA(data) => data.serial,
        _ => 0,
    }
}

/// Groups a name's records by type (stable), so a lookup returns one slice.
fn sort_by_type(records: &mut [Record]) {
    records.sort_by_key(|r| u16::from(r.record_type()));
}

fn srv_name(base: &Name, port: &str, proto: &str) -> Option<Name> {
    base.prepend_label(format!("_{proto}"))
        .and_then(|n| n.prepend_label(format!("_{port}")))
        .ok()
}

/// An endpoint's label: its hostname, else its address with dashes
/// (`10-1-2-3`, `fd00--1`).
fn host_label(ep: &Endpoint, ip: IpAddr) -> String {
    match &ep.hostname {
        Some(h) => h.clone(),
        None => ip.to_string().replace(['.', ':'], "-"),
    }
}

/// `4.3.2.1.in-addr.arpa.` or the full-nibble `ip6.arpa.` name of `ip`.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0])
        }
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(73);
            for b in v6.octets().iter().rev() {
                s.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
                s.push('.');
                s.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
                s.push('.');
            }
            s.push_str("ip6.arpa.");
            s
        }
    }
}

/// What a name holds for a query type.
#[derive(Debug)]
pub(crate) enum Lookup<'a> {
    /// Records of the asked type (or a CNAME standing for any type).
    Records(&'a [Record], RecordType),
    /// The name exists, without records of that type.
    NoData,
    /// A record made from the name itself (a pod's dashed address).
    Synthesized(Box<Record>),
    /// The name does not exist in the zone.
    NxDomain,
}

impl DnsIndex {
    pub(crate) fn in_zone(&self, name: &LowerName) -> bool {
        self.zone.zone_of(name) || self.clusterset_zone.zone_of(name)
    }

    /// The SOA of the zone `name` is in (the cluster zone's otherwise).
    pub(crate) fn soa_for(&self, name: &LowerName) -> &Record {
        if self.clusterset_zone.zone_of(name) {
            &self.clusterset_soa
        } else {
            &self.soa
        }
    }

    pub(crate) fn node(&self, name: &LowerName) -> Option<&Node> {
        self.names.get(name)
    }

    pub(crate) fn ptr(&self, name: &LowerName) -> Option<&[Record]> {
        self.reverse.get(name).map(Vec::as_slice)
    }

    /// Records of `name` and `qtype`; an empty answer is `NoData`.
    pub(crate) fn lookup(&self, name: &LowerName, qtype: RecordType) -> Lookup<'_> {
        let Some(node) = self.names.get(name) else {
            return self.pod(name, qtype);
        };
        if node.records.is_empty() {
            return Lookup::NoData;
        }
        if qtype == RecordType::ANY {
            return Lookup::Records(&node.records, qtype);
        }
        // Records of one name are grouped by type at build, see `sort_by_type`.
        if let Some(first) = node.records.iter().position(|r| r.record_type() == qtype) {
            let len = node.records[first..]
                .iter()
                .take_while(|r| r.record_type() == qtype)
                .count();
            return Lookup::Records(&node.records[first..first + len], qtype);
        }
        if let Some(c) = node
            .records
            .iter()
            .position(|r| r.record_type() == RecordType::CNAME)
        {
            return Lookup::Records(&node.records[c..=c], RecordType::CNAME);
        }
        Lookup::NoData
    }

    #[cfg(test)]
    pub(crate) fn soa(&self) -> &Record {
        &self.soa
    }

    /// `<dashed address>.<namespace>.pod.<zone>`: A (or AAAA) of the
    /// address the first label spells, in any namespace, without checking
    /// that a pod has it (CoreDNS `pods insecure`, its default). Three
    /// dashes and no `--` spell IPv4 (`10-244-1-2`); otherwise dashes are
    /// colons (`fd00--1`). `<namespace>.pod.<zone>` exists with no records.
    fn pod(&self, name: &LowerName, qtype: RecordType) -> Lookup<'_> {
        let depth = name.num_labels().checked_sub(self.zone.num_labels());
        let labels: Vec<&[u8]> = name.iter().collect();
        if !self.zone.zone_of(name) {
            return Lookup::NxDomain;
        }
        match depth {
            Some(2) if labels[1] == b"pod" => Lookup::NoData,
            Some(3) if labels[2] == b"pod" => {
                let Some(ip) = pod_address(labels[0]) else {
                    return Lookup::NxDomain;
                };
                let (rtype, data) = match ip {
                    IpAddr::V4(v4) => (RecordType::A, RData::A(A(v4))),
                    IpAddr::V6(v6) => (RecordType::AAAA, RData::AAAA(AAAA(v6))),
                };
                if qtype != rtype && qtype != RecordType::ANY {
                    return Lookup::NoData;
                }
                Lookup::Synthesized(Box::new(Record::from_rdata(
                    Name::from(name.clone()),
                    self.ttl,
                    data,
                )))
            }
            _ => Lookup::NxDomain,
        }
    }
}

/// The address a pod name's first label spells, CoreDNS's way.
fn pod_address(label: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(label).ok()?;
    let text = if s.matches('-').count() == 3 && !s.contains("--") {
        s.replace('-', ".")
    } else {
        s.replace('-', ":")
    };
    text.parse().ok()
}
