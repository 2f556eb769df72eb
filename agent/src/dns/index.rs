//! The cluster zone as a hashed index, built from one [`AgentState`].
//!
//! ```text
//!  AgentState ──build──▶ DnsIndex { names: lower-cased name ─▶ records, reverse: arpa name ─▶ PTR }
//!  previous index + next AgentState ──next──▶ DnsIndex   (only what changed)
//! ```
//!
//! Each Service contributes parts: one made from the Service itself (its
//! namespace's name, cluster IPs, named ports, an SRV per port on its own
//! name, ExternalName target) and, when headless, one per endpoint
//! address (its A records, host name, PTR, an SRV per named port of its
//! slice and one per port on the Service's name). Every record is counted by the
//! parts that give it, and every name by its records, its marks (a
//! namespace a Service is in, `svc`, `pod`) and the names just below it,
//! so a name goes with the last thing that needs it, empty non-terminals
//! too. [`DnsIndex::next`] compares each changed Service's parts before
//! and after and puts in and takes out only the parts that differ: a
//! one-endpoint change to a headless Service of 2,000 endpoints and 50
//! named ports writes about 50 records, not 100,000. The maps are split
//! into shards that an update copies only where it writes: the index being
//! replaced keeps answering, unchanged, until the new one is in force.
//!
//! Every name that exists holds its records; empty non-terminals (such as
//! `svc.<zone>`, `<ns>.svc.<zone>` and `_tcp.<svc>...`) are present with no
//! records, so a miss is one hash lookup (NXDOMAIN) and never a scan.
//! Pod names (`10-244-1-2.<ns>.pod.<zone>`, CoreDNS's default `pods
//! insecure` mode) are not stored: the name is the address, so a miss under
//! `pod.<zone>` is answered from the name itself.
//! An index is immutable: a new snapshot makes a new one.
//!
//! Records of the cluster zone: `<svc>.<ns>.svc.<zone>` A/AAAA (cluster IPs;
//! for headless, ready endpoints, or all with `publishNotReadyAddresses`),
//! `<host>.<svc>...` per headless endpoint (hostname or dashed IP), SRV
//! `_<port>._<proto>.<svc>...` for named ports, PTR (in-addr.arpa and
//! nibble ip6.arpa), ExternalName CNAME, `dns-version` TXT
//! [`SCHEMA_VERSION`], apex SOA and NS. The SOA serial is the second of the
//! zone's last change, as CoreDNS's `kubernetes` gives it, and always ahead
//! of the index before when the zone's names changed, patched or rebuilt.
//! Pod names: IPv4 dashed, IPv6 as `fd00--1...`, any namespace, no pod
//! check; `<ns>.pod.<zone>` and `pod.<zone>` are NODATA.
//!
//! The same maps hold the `clusterset.local` zone (the MCS DNS
//! specification fixes that name), built from the `clusterset/…` imports:
//! `<svc>.<ns>.svc.clusterset.local` with the ClusterSet IP (PTR too) or,
//! headless, the ready endpoints of every cluster, each also at
//! `<hostname>.<cluster-id>.<svc>...` (the `<cluster-id>.<svc>...` level
//! itself is absent, as the specification requires), SRV for named ports,
//! `dns-version` TXT [`CLUSTERSET_SCHEMA_VERSION`] and its own SOA.
//!
//! Sizes: 1,024 shards per map; a name's records in chunks of up to 64 of
//! one type behind `Arc`s, so a write copies its shard's table and the one
//! or two chunks it changes; a record is found among its name's by a hash
//! of its data (foldhash, seeded per process). A change of more than a
//! quarter of the Services builds whole. The large headless case above
//! (2,000 endpoints, 50 named ports) copies about 100 chunks; the earlier
//! index rebuilt all 100,000 SRV records and de-duplicated them with
//! `Vec::contains`, quadratic in one name's records (times: BENCHMARKS.md,
//! "Large headless Service in the DNS index").

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType};
use switchyard_model::{EndpointPort, ServiceState, ServiceType};

use crate::state::AgentState;

/// The schema version of the Kubernetes DNS specification we implement.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// The zone of the clusterset's imports; the MCS DNS specification says it
/// "must be `clusterset.local`".
pub const CLUSTERSET_ZONE: &str = "clusterset.local.";

/// The schema version of the MCS DNS specification we implement.
pub const CLUSTERSET_SCHEMA_VERSION: &str = "1.0.0";

/// The records of one name (none for an empty non-terminal).
#[derive(Debug, Default, Clone)]
pub(crate) struct Node {
    /// Grouped by type, in chunks of one type each that successive indexes
    /// share: a write copies the chunk it changes, not thousands of records.
    chunks: Vec<Arc<Chunk>>,
    /// What keeps the name: its records (each as often as it is given),
    /// its marks, and the names just below it that hold it. It goes at zero.
    refs: u32,
    /// Whether the name holds its parent: every name below a zone's apex
    /// but an import's host names, whose `<cluster-id>` level must not exist.
    holds_parent: bool,
}

/// Up to [`CHUNK`] records of one type, with how many parts give each.
#[derive(Debug, Clone)]
struct Chunk {
    records: Vec<Data>,
    counts: Vec<Count>,
}

/// A record as the index holds it: its data alone. Its owner is the name
/// it is held under, its class IN and its TTL the index's; hickory's
/// `Record` repeats the owner in each (272 bytes, of which `RData` 184):
/// held as `Record`s, the index at 100,000 Services took half as much
/// again (246 MiB against 164, `bench_dns`). The data names
/// hold is an address (4 or 16 bytes) or a target name (80): 88 bytes at
/// most, the rest boxed. [`Data::record`] makes the `Record` an answer
/// sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Data {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: Name,
    },
    Ptr(Name),
    Cname(Name),
    /// The apex's SOA, NS and TXT.
    Other(Box<RData>),
}

impl Data {
    pub(crate) fn new(data: RData) -> Self {
        match data {
            RData::A(a) => Self::A(a.0),
            RData::AAAA(a) => Self::Aaaa(a.0),
            RData::SRV(s) => Self::Srv {
                priority: s.priority,
                weight: s.weight,
                port: s.port,
                target: s.target,
            },
            RData::PTR(p) => Self::Ptr(p.0),
            RData::CNAME(c) => Self::Cname(c.0),
            other => Self::Other(Box::new(other)),
        }
    }

    pub(crate) fn record_type(&self) -> RecordType {
        match self {
            Self::A(_) => RecordType::A,
            Self::Aaaa(_) => RecordType::AAAA,
            Self::Srv { .. } => RecordType::SRV,
            Self::Ptr(_) => RecordType::PTR,
            Self::Cname(_) => RecordType::CNAME,
            Self::Other(data) => data.record_type(),
        }
    }

    /// Whether this is `data` (names compared as DNS compares them,
    /// without regard to case, as `RData`'s own equality does).
    pub(crate) fn is(&self, data: &RData) -> bool {
        match (self, data) {
            (Self::A(a), RData::A(b)) => *a == b.0,
            (Self::Aaaa(a), RData::AAAA(b)) => *a == b.0,
            (
                Self::Srv {
                    priority,
                    weight,
                    port,
                    target,
                },
                RData::SRV(s),
            ) => {
                *priority == s.priority
                    && *weight == s.weight
                    && *port == s.port
                    && *target == s.target
            }
            (Self::Ptr(a), RData::PTR(b)) => *a == b.0,
            (Self::Cname(a), RData::CNAME(b)) => *a == b.0,
            (Self::Other(a), b) => **a == *b,
            _ => false,
        }
    }

    /// The data as hickory holds it.
    pub(crate) fn rdata(&self) -> RData {
        match self {
            Self::A(a) => RData::A(A(*a)),
            Self::Aaaa(a) => RData::AAAA(AAAA(*a)),
            Self::Srv {
                priority,
                weight,
                port,
                target,
            } => RData::SRV(SRV::new(*priority, *weight, *port, target.clone())),
            Self::Ptr(name) => RData::PTR(PTR(name.clone())),
            Self::Cname(name) => RData::CNAME(CNAME(name.clone())),
            Self::Other(data) => (**data).clone(),
        }
    }

    /// The record of this data at `owner`, with `ttl`, class IN.
    pub(crate) fn record(&self, owner: &Name, ttl: u32) -> Record {
        Record::from_rdata(owner.clone(), ttl, self.rdata())
    }
}

/// Records per chunk: a one-record change copies one or two chunks. Tests
/// use tiny chunks, so that small zones have names of several.
const CHUNK: usize = if cfg!(test) { 3 } else { 64 };

/// How many parts give a record, beside a hash of its data that finds it
/// among thousands without comparing names.
#[derive(Debug, Clone, Copy)]
struct Count {
    hash: u64,
    n: u32,
}

/// Above this many records written to one name at once, they are found
/// through a map of the name's hashes instead of one scan each (tests: two,
/// so that both ways are taken).
const SCAN_LIMIT: usize = if cfg!(test) { 2 } else { 16 };

/// Records of one name (of one type, or all of them), in chunks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Records<'a>(&'a [Arc<Chunk>]);

impl<'a> Records<'a> {
    pub(crate) fn iter(self) -> impl Iterator<Item = &'a Data> + Clone {
        self.0.iter().flat_map(|c| c.records.iter())
    }

    /// The records as `Record`s owned by `owner`, with `ttl`.
    pub(crate) fn to_records(self, owner: &Name, ttl: u32) -> Vec<Record> {
        self.iter().map(|d| d.record(owner, ttl)).collect()
    }

    /// The records as one slice, when they are in one chunk (nearly always).
    pub(crate) fn as_slice(self) -> Option<&'a [Data]> {
        match self.0 {
            [] => Some(&[]),
            [one] => Some(&one.records),
            _ => None,
        }
    }

    pub(crate) fn last(self) -> Option<&'a Data> {
        self.0.last().and_then(|c| c.records.last())
    }
}

/// Where a record is: its chunk and its place in it.
type At = (usize, usize);

/// Up to this many, a name's records (and its chunks) are held in exactly
/// the room they take: most names hold one to three records, and `Vec`'s
/// growth gives a second one room for four.
const EXACT: usize = 8;

/// Makes room for one more in `v`: exactly, while `v` is small.
fn grow<T>(v: &mut Vec<T>) {
    if v.len() < EXACT {
        v.reserve_exact(1);
    }
}

impl Node {
    /// Every record of the name.
    pub(crate) fn records(&self) -> Records<'_> {
        Records(&self.chunks)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// The records of `rtype`.
    pub(crate) fn of_type(&self, rtype: RecordType) -> Records<'_> {
        Records(&self.chunks[self.run(rtype)])
    }

    /// The chunks of `rtype` (empty, at the end, when it has none).
    fn run(&self, rtype: RecordType) -> std::ops::Range<usize> {
        let start = self
            .chunks
            .iter()
            .position(|c| c.records[0].record_type() == rtype)
            .unwrap_or(self.chunks.len());
        let len = self.chunks[start..]
            .iter()
            .take_while(|c| c.records[0].record_type() == rtype)
            .count();
        start..start + len
    }

    fn find(&self, run: &std::ops::Range<usize>, hash: u64, data: &RData) -> Option<At> {
        run.clone().find_map(|c| {
            let chunk = &self.chunks[c];
            (0..chunk.counts.len())
                .find(|&i| chunk.counts[i].hash == hash && chunk.records[i].is(data))
                .map(|i| (c, i))
        })
    }

    /// The records of a run by hash, for a batch too large to scan for.
    fn by_hash(&self, run: &std::ops::Range<usize>) -> HashMap<u64, At, FastState> {
        let mut at = HashMap::with_hasher(fast_state());
        for c in run.clone() {
            for (i, k) in self.chunks[c].counts.iter().enumerate() {
                at.entry(k.hash).or_insert((c, i));
            }
        }
        at
    }

    /// Where `data` is in `run`: through `map` when there is one, where a
    /// miss means absent unless `scan_on_miss`.
    fn locate(
        &self,
        run: &std::ops::Range<usize>,
        map: Option<&HashMap<u64, At, FastState>>,
        (hash, data): (u64, &RData),
        scan_on_miss: bool,
    ) -> Option<At> {
        let Some(map) = map else {
            return self.find(run, hash, data);
        };
        match map.get(&hash) {
            Some(&(c, i)) if self.chunks[c].records[i].is(data) => Some((c, i)),
            // Two records with one hash: the long way.
            Some(_) => self.find(run, hash, data),
            None if scan_on_miss => self.find(run, hash, data),
            None => None,
        }
    }

    /// Counts each record `n` more times, adding those it did not hold at
    /// the end of their type's run.
    fn add(&mut self, mut adds: Counted) {
        adds.sort_by_key(|(d, _, _)| u16::from(d.record_type()));
        let mut adds = adds.into_iter().peekable();
        while let Some(first) = adds.peek() {
            let rtype = first.0.record_type();
            let mut run = self.run(rtype);
            let batch: Vec<_> =
                std::iter::from_fn(|| adds.next_if(|a| a.0.record_type() == rtype)).collect();
            // A map of what the run held before: a batch has no duplicates.
            let map = (batch.len() > SCAN_LIMIT).then(|| self.by_hash(&run));
            for (data, hash, n) in batch {
                if let Some((c, i)) = self.locate(&run, map.as_ref(), (hash, &data), false) {
                    Arc::make_mut(&mut self.chunks[c]).counts[i].n += n;
                    continue;
                }
                let record = Data::new(data);
                let count = Count { hash, n };
                if !run.is_empty() && self.chunks[run.end - 1].records.len() < CHUNK {
                    let chunk = Arc::make_mut(&mut self.chunks[run.end - 1]);
                    grow(&mut chunk.records);
                    grow(&mut chunk.counts);
                    chunk.records.push(record);
                    chunk.counts.push(count);
                } else {
                    let chunk = Chunk {
                        records: vec![record],
                        counts: vec![count],
                    };
                    grow(&mut self.chunks);
                    self.chunks.insert(run.end, Arc::new(chunk));
                    run.end += 1;
                }
            }
        }
    }

    /// Counts each record `n` fewer times; one no part gives any more is
    /// replaced by the last of its type's run, so nothing behind it moves.
    fn take(&mut self, mut takes: Counted) {
        takes.sort_by_key(|(d, _, _)| u16::from(d.record_type()));
        let mut takes = takes.into_iter().peekable();
        while let Some(first) = takes.peek() {
            let rtype = first.0.record_type();
            let mut run = self.run(rtype);
            let batch: Vec<_> =
                std::iter::from_fn(|| takes.next_if(|a| a.0.record_type() == rtype)).collect();
            let mut map = (batch.len() > SCAN_LIMIT).then(|| self.by_hash(&run));
            for (data, hash, n) in batch {
                if run.is_empty() {
                    break;
                }
                let Some((c, i)) = self.locate(&run, map.as_ref(), (hash, &data), true) else {
                    continue;
                };
                let count = &mut Arc::make_mut(&mut self.chunks[c]).counts[i].n;
                *count = count.saturating_sub(n);
                if *count > 0 {
                    continue;
                }
                let last = run.end - 1;
                let j = self.chunks[last].records.len() - 1;
                let tail = Arc::make_mut(&mut self.chunks[last]);
                let (Some(moved), Some(moved_count)) = (tail.records.pop(), tail.counts.pop())
                else {
                    continue;
                };
                let emptied = tail.records.is_empty();
                if let Some(m) = map.as_mut()
                    && m.get(&hash) == Some(&(c, i))
                {
                    m.remove(&hash);
                }
                if (c, i) != (last, j) {
                    let chunk = Arc::make_mut(&mut self.chunks[c]);
                    chunk.records[i] = moved;
                    chunk.counts[i] = moved_count;
                    if let Some(m) = map.as_mut()
                        && m.get(&moved_count.hash) == Some(&(last, j))
                    {
                        m.insert(moved_count.hash, (c, i));
                    }
                }
                if emptied {
                    self.chunks.remove(last);
                    run.end -= 1;
                }
            }
        }
    }

    /// Replaces `old` with `new` (the apex's SOA, stamped anew).
    fn replace(&mut self, old: &Record, new: &Record) {
        let run = self.run(old.record_type());
        if let Some((c, i)) = self.find(&run, fast_hash(&old.data), &old.data) {
            let chunk = Arc::make_mut(&mut self.chunks[c]);
            chunk.records[i] = Data::new(new.data.clone());
            chunk.counts[i].hash = fast_hash(&new.data);
        }
    }
}

/// The hasher of the index's own maps and of record hashes: hickory's
/// `Name` feeds a hash one byte at a time, which made SipHash the largest
/// cost of building a large Service's records. Seeded once per process, so
/// every index of this process agrees and no one outside can predict it.
type FastState = foldhash::fast::FixedState;

fn fast_state() -> FastState {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    foldhash::fast::FixedState::with_seed(*SEED.get_or_init(rand::random))
}

/// The hash a record's data is found by.
fn fast_hash(data: &RData) -> u64 {
    fast_state().hash_one(data)
}

/// Shards per map: at 10,000 Services (about 100,000 names) an update that
/// writes a name copies a shard of about a hundred.
const SHARDS: usize = 1024;

/// A map from names, in shards shared between successive indexes: a write
/// copies its shard only if an older index still holds it. Names hash with
/// foldhash, seeded once per process (the shard of a name is the same in
/// every index): each query hashed its name twice with SipHash, about 4% of
/// the stub's CPU at 100,000 Services (perf, docs/benchmarks-history.md
/// "DNS hit path at 100,000 Services (target 6)").
#[derive(Debug, Clone)]
pub(crate) struct Names<V> {
    shards: Vec<Arc<HashMap<LowerName, V, FastState>>>,
    len: usize,
}

impl<V: Clone> Names<V> {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Arc::new(HashMap::with_hasher(fast_state())))
                .collect(),
            len: 0,
        }
    }

    fn shard(name: &LowerName) -> usize {
        // A seed of its own: with the maps' own, the names of a shard would
        // share the bits their map places and tags them by.
        static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let state = FastState::with_seed(*SEED.get_or_init(rand::random));
        (state.hash_one(name) % SHARDS as u64) as usize
    }

    pub(crate) fn get(&self, name: &LowerName) -> Option<&V> {
        self.shards[Self::shard(name)].get(name)
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
}

impl Names<Node> {
    /// Counts `name` `by` more times; a new name holds its parent, and so
    /// on up, unless it is a `leaf` or a zone's apex (`floor` labels).
    fn hold(&mut self, name: &LowerName, by: u32, leaf: bool, floor: u8) {
        let (mut name, mut by, mut leaf) = (name.clone(), by, leaf);
        loop {
            if let Some(node) = self.get_mut(&name) {
                node.refs += by;
                return;
            }
            let holds_parent = !leaf && name.num_labels() > floor;
            self.insert(
                name.clone(),
                Node {
                    refs: by,
                    holds_parent,
                    ..Node::default()
                },
            );
            if !holds_parent {
                return;
            }
            (name, by, leaf) = (name.base_name(), 1, false);
        }
    }

    /// Counts `name` `by` fewer times; at zero it goes, and lets its parent go.
    fn release(&mut self, name: &LowerName, by: u32) {
        let (mut name, mut by) = (name.clone(), by);
        loop {
            let Some(node) = self.get_mut(&name) else {
                return;
            };
            node.refs = node.refs.saturating_sub(by);
            if node.refs > 0 {
                return;
            }
            let holds_parent = node.holds_parent;
            self.remove(&name);
            if !holds_parent {
                return;
            }
            (name, by) = (name.base_name(), 1);
        }
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
    pub(crate) reverse: Names<Node>,
    pub(crate) soa: Record,
    pub(crate) clusterset_soa: Record,
    ttl: u32,
    /// How long the build took.
    pub build_time: Duration,
    /// Services whose contribution changed to make this index from the
    /// previous one (`None`: built whole).
    pub changed: Option<usize>,
    /// Records and marks put in or taken out to make it (from the previous
    /// index, or from nothing when built whole).
    changed_records: usize,
    /// Headless endpoints without a hostname are named after their Pod
    /// (CoreDNS's `endpoint_pod_names`), else after their address.
    pod_names: bool,
}

impl DnsIndex {
    /// Builds the index of `state` for `zone` with records of `ttl` seconds.
    pub fn build(state: Arc<AgentState>, zone: &Name, ttl: u32) -> Self {
        Self::build_naming(state, zone, ttl, false)
    }

    /// [`DnsIndex::build`]; with `pod_names`, a headless endpoint without a
    /// hostname is named after the Pod its targetRef names, when that is a
    /// DNS label (CoreDNS's `endpoint_pod_names`), and this index's
    /// successors do the same.
    pub fn build_naming(state: Arc<AgentState>, zone: &Name, ttl: u32, pod_names: bool) -> Self {
        let started = Instant::now();
        let zone = zone.to_lowercase();
        let clusterset = Name::from_ascii(CLUSTERSET_ZONE).expect("a valid name");
        let mut apex = Builder::new(&zone, ttl, 1);
        let soa = apex.apex(SCHEMA_VERSION);
        apex.mark(&apex.sub(&["pod"]));
        let mut clusterset_apex = Builder::new(&clusterset, ttl, 1);
        let clusterset_soa = clusterset_apex.apex(CLUSTERSET_SCHEMA_VERSION);
        let mut index = Self {
            version: state.version.clone(),
            source: state.clone(),
            zone: LowerName::new(&zone),
            clusterset_zone: LowerName::new(&clusterset),
            names: Names::new(),
            reverse: Names::new(),
            soa,
            clusterset_soa,
            ttl,
            build_time: Duration::ZERO,
            changed: None,
            changed_records: 0,
            pod_names,
        };
        index.apply(apex);
        index.apply(clusterset_apex);
        for held in state.resources.values() {
            let mut b = index.builder(&held.state, 1);
            b.service(&held.state);
            b.endpoints(&held.state, &mut Groups::default(), None);
            index.apply(b);
        }
        index.build_time = started.elapsed();
        index
    }

    /// The index of `state`, made from `self` (the index of an earlier
    /// state): only the parts of the Services whose state differs are taken
    /// out and put back. Builds whole when most Services changed.
    pub fn next(&self, state: Arc<AgentState>) -> Self {
        let started = Instant::now();
        let changed = changed_services(&self.source, &state);
        if changed.len() > state.resources.len() / 4 + 64 {
            let mut index =
                Self::build_naming(state, &Name::from(&self.zone), self.ttl, self.pod_names);
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
            changed_records: 0,
            pod_names: self.pod_names,
        };
        let (mut cluster, mut clusterset) = (false, false);
        for (old, new) in &changed {
            let Some(st) = new.or(*old) else { continue };
            let mut b = index.builder(st, 1);
            match (old, new) {
                (Some(old), Some(new)) => {
                    if old.service != new.service {
                        b.sign = -1;
                        b.service(old);
                        b.sign = 1;
                        b.service(new);
                    }
                    let mut groups = Groups::default();
                    b.endpoints(new, &mut groups, Some(old));
                }
                (None, Some(new)) => {
                    b.service(new);
                    b.endpoints(new, &mut Groups::default(), None);
                }
                (Some(old), None) => {
                    b.sign = -1;
                    b.service(old);
                    b.endpoints(old, &mut Groups::default(), None);
                }
                (None, None) => {}
            }
            if b.is_empty() {
                continue;
            }
            if st.service.key.cluster == switchyard_model::CLUSTERSET {
                clusterset = true;
            } else {
                cluster = true;
            }
            index.apply(b);
        }
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

    /// Records and marks put in or taken out to make this index: about the
    /// size of what changed, not of the Services it changed in.
    pub fn changed_records(&self) -> usize {
        self.changed_records
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
            apex.replace(&old, &stamped);
        }
    }

    /// A builder for the parts of `st`, in its zone.
    fn builder(&self, st: &ServiceState, sign: i32) -> Builder {
        let zone = if st.service.key.cluster == switchyard_model::CLUSTERSET {
            &self.clusterset_zone
        } else {
            &self.zone
        };
        let mut b = Builder::new(&Name::from(zone), self.ttl, sign);
        b.pod_names = self.pod_names;
        b
    }

    /// Puts what `b` adds in first, then takes out what it takes out, so a
    /// name that keeps something never goes and comes back.
    fn apply(&mut self, b: Builder) {
        let floor = b.zone.num_labels();
        let mut takes = Vec::new();
        for delta in b.names {
            let name = delta.name;
            let (adds, gone) = delta.records.split();
            let held = adds.iter().map(|a| a.2).sum::<u32>() + delta.marks.max(0).unsigned_abs();
            let released =
                gone.iter().map(|a| a.2).sum::<u32>() + delta.marks.min(0).unsigned_abs();
            self.changed_records += adds.len() + gone.len() + usize::from(delta.marks != 0);
            if held > 0 {
                self.names.hold(&name, held, delta.leaf, floor);
                if !adds.is_empty()
                    && let Some(node) = self.names.get_mut(&name)
                {
                    node.add(adds);
                }
            }
            if released > 0 {
                takes.push((name, gone, released));
            }
        }
        let mut reverse_takes = Vec::new();
        for (name, records) in b.reverse {
            let (adds, gone) = records.split();
            self.changed_records += adds.len() + gone.len();
            let held = adds.iter().map(|a| a.2).sum::<u32>();
            if held > 0 {
                self.reverse.hold(&name, held, true, 0);
                if let Some(node) = self.reverse.get_mut(&name) {
                    node.add(adds);
                }
            }
            if !gone.is_empty() {
                reverse_takes.push((name, gone));
            }
        }
        for (name, gone, released) in takes {
            if !gone.is_empty()
                && let Some(node) = self.names.get_mut(&name)
            {
                node.take(gone);
            }
            self.names.release(&name, released);
        }
        for (name, gone) in reverse_takes {
            let released = gone.iter().map(|a| a.2).sum::<u32>();
            if let Some(node) = self.reverse.get_mut(&name) {
                node.take(gone);
            }
            self.reverse.release(&name, released);
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

/// The records of a delta to put in and to take out, each with the hash
/// it is found by and how many times.
type Counted = Vec<(RData, u64, u32)>;

/// Records one name gains (positive) or loses (negative), each with the
/// hash it is found by: its data is hashed once, and moved as little as
/// it can be (an `RData` is large).
#[derive(Debug, Default)]
struct RecordDeltas {
    entries: Vec<(RData, u64, i32)>,
    /// Where each hash's entry is, once there are more than a few.
    at: Option<HashMap<u64, usize, FastState>>,
}

impl RecordDeltas {
    fn add(&mut self, data: RData, n: i32) {
        let hash = fast_hash(&data);
        let found = match &self.at {
            Some(at) => at
                .get(&hash)
                .copied()
                .filter(|&i| self.entries[i].0 == data)
                // Two records with one hash (in theory): the long way.
                .or_else(|| {
                    at.contains_key(&hash)
                        .then(|| self.position(hash, &data))
                        .flatten()
                }),
            None => self.position(hash, &data),
        };
        if let Some(i) = found {
            self.entries[i].2 += n;
            return;
        }
        self.entries.push((data, hash, n));
        let last = self.entries.len() - 1;
        match &mut self.at {
            Some(at) => {
                at.entry(hash).or_insert(last);
            }
            None if self.entries.len() > SCAN_LIMIT => {
                let mut at =
                    HashMap::with_capacity_and_hasher(self.entries.len() * 2, fast_state());
                for (i, e) in self.entries.iter().enumerate() {
                    at.entry(e.1).or_insert(i);
                }
                self.at = Some(at);
            }
            None => {}
        }
    }

    fn position(&self, hash: u64, data: &RData) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.1 == hash && e.0 == *data)
    }

    fn is_empty(&self) -> bool {
        self.entries.iter().all(|e| e.2 == 0)
    }

    /// The records to put in and those to take out.
    fn split(self) -> (Counted, Counted) {
        let mut adds = Vec::with_capacity(self.entries.len());
        let mut gone = Vec::new();
        for (data, hash, n) in self.entries {
            match n {
                0 => {}
                n if n > 0 => adds.push((data, hash, n.unsigned_abs())),
                n => gone.push((data, hash, n.unsigned_abs())),
            }
        }
        (adds, gone)
    }
}

/// What one name gains (positive) or loses (negative).
#[derive(Debug)]
struct NameDelta {
    name: LowerName,
    marks: i32,
    /// An import's host name: it does not hold its parent.
    leaf: bool,
    records: RecordDeltas,
}

/// What the endpoint records of a slice depend on besides the endpoint:
/// the cluster it is in (imports) and its named ports. Slices alike share
/// one, in both states compared.
#[derive(Debug)]
struct Group<'a> {
    cluster: Option<&'a str>,
    ports: Vec<&'a EndpointPort>,
    /// Its names, made once.
    names: Option<GroupNames>,
}

/// The names of a group under one Service.
#[derive(Debug)]
struct GroupNames {
    /// SRV owner names (their place in the builder) with their ports.
    srvs: Vec<(usize, u16)>,
    /// Every port of the group, once: the SRV records of the Service's own
    /// name (one per port and endpoint).
    ports: Vec<u16>,
    /// `<cluster-id>.<svc>...`, the parent of an import's host names.
    cluster: Option<Name>,
}

/// The groups of the slices seen so far.
#[derive(Debug, Default)]
struct Groups<'a>(Vec<Group<'a>>);

impl<'a> Groups<'a> {
    fn id(&mut self, cluster: Option<&'a str>, ports: &'a [EndpointPort]) -> usize {
        if let Some(i) = self.0.iter().position(|g| {
            g.cluster == cluster
                && g.ports.len() == ports.len()
                && g.ports.iter().zip(ports).all(|(a, b)| *a == b)
        }) {
            return i;
        }
        self.0.push(Group {
            cluster,
            ports: ports.iter().collect(),
            names: None,
        });
        self.0.len() - 1
    }
}

/// One endpoint address of a headless Service: everything its records
/// depend on, so the parts of two states can be matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct EndpointPart<'a> {
    group: usize,
    hostname: Option<&'a str>,
    ip: IpAddr,
}

/// The endpoint parts of `st` (none unless headless), each counted `sign`.
fn endpoint_parts<'a>(
    st: &'a ServiceState,
    groups: &mut Groups<'a>,
    parts: &mut HashMap<EndpointPart<'a>, i32, FastState>,
    sign: i32,
    pod_names: bool,
) {
    let svc = &st.service;
    let import = svc.key.cluster == switchyard_model::CLUSTERSET;
    if !svc.headless || (!import && svc.service_type == ServiceType::ExternalName) {
        return;
    }
    for slice in &st.slices {
        let cluster = import.then(|| slice.cluster.as_deref().unwrap_or(&svc.key.cluster));
        let group = groups.id(cluster, &slice.ports);
        for ep in slice
            .endpoints
            .iter()
            .filter(|e| svc.publish_not_ready_addresses || e.conditions.ready)
        {
            for ip in &ep.addresses {
                // CoreDNS's `endpoint_pod_names`: the Pod's name when it
                // is a DNS label (at most 63 characters), else the address.
                let pod = ep
                    .pod_name
                    .as_deref()
                    .filter(|p| pod_names && switchyard_model::is_dns_label(p));
                let part = EndpointPart {
                    group,
                    hostname: ep.hostname().or(pod),
                    ip: *ip,
                };
                *parts.entry(part).or_default() += sign;
            }
        }
    }
}

/// The names and records parts give or take (a zone's apex, a Service, an
/// endpoint address), before they join an index.
#[derive(Debug)]
struct Builder {
    zone: Name,
    ttl: u32,
    /// Name headless endpoints without a hostname after their Pod.
    pod_names: bool,
    /// 1 to put what follows in, -1 to take it out.
    sign: i32,
    /// Where each name's delta is in `names`.
    slots: HashMap<LowerName, usize, FastState>,
    names: Vec<NameDelta>,
    reverse: HashMap<LowerName, RecordDeltas, FastState>,
}

impl Builder {
    fn new(zone: &Name, ttl: u32, sign: i32) -> Self {
        Self {
            zone: zone.clone(),
            ttl,
            pod_names: false,
            sign,
            slots: HashMap::with_hasher(fast_state()),
            names: Vec::new(),
            reverse: HashMap::with_hasher(fast_state()),
        }
    }

    fn is_empty(&self) -> bool {
        self.names
            .iter()
            .all(|d| d.marks == 0 && d.records.is_empty())
            && self.reverse.values().all(RecordDeltas::is_empty)
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
        self.mark(&self.sub(&["svc"]));
        soa
    }

    /// `labels` (most specific first) under the zone.
    fn sub(&self, labels: &[&str]) -> Name {
        let mut name = self.zone.clone();
        for l in labels.iter().rev() {
            name = name.prepend_label(*l).unwrap_or_else(|_| self.zone.clone());
        }
        name
    }

    /// Where `name`'s delta is, made if new: parts that write one name
    /// many times (an SRV name, per endpoint) look it up once.
    fn slot(&mut self, name: &Name) -> usize {
        let name = LowerName::new(name);
        if let Some(&slot) = self.slots.get(&name) {
            return slot;
        }
        self.names.push(NameDelta {
            name: name.clone(),
            marks: 0,
            leaf: false,
            records: RecordDeltas::default(),
        });
        self.slots.insert(name, self.names.len() - 1);
        self.names.len() - 1
    }

    /// Makes `name` exist (with its ancestors) even without records.
    fn mark(&mut self, name: &Name) {
        let slot = self.slot(name);
        self.names[slot].marks += self.sign;
    }

    fn add(&mut self, name: &Name, data: RData) {
        let slot = self.slot(name);
        self.add_in(slot, data);
    }

    fn add_in(&mut self, slot: usize, data: RData) {
        self.names[slot].records.add(data, self.sign);
    }

    /// A record at `name` whose parent need not exist as a name.
    fn add_leaf(&mut self, name: &Name, data: RData) {
        let slot = self.slot(name);
        self.names[slot].leaf = true;
        self.add_in(slot, data);
    }

    fn add_address(&mut self, name: &Name, ip: IpAddr) {
        let slot = self.slot(name);
        self.add_address_in(slot, ip);
    }

    fn add_address_in(&mut self, slot: usize, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => self.add_in(slot, RData::A(A(v4))),
            IpAddr::V6(v6) => self.add_in(slot, RData::AAAA(AAAA(v6))),
        }
    }

    fn add_ptr(&mut self, ip: IpAddr, target: &Name) {
        let Ok(arpa) = Name::from_ascii(reverse_name(ip)) else {
            return;
        };
        self.reverse
            .entry(LowerName::new(&arpa))
            .or_default()
            .add(RData::PTR(PTR(target.clone())), self.sign);
    }

    /// `<svc>.<ns>.svc.<zone>`, the base of a Service's names.
    fn base(&self, st: &ServiceState) -> Option<Name> {
        self.sub(&[&st.service.key.namespace, "svc"])
            .prepend_label(st.service.key.name.as_str())
            .ok()
    }

    /// The part made from the Service itself: its namespace's name, and
    /// its cluster IPs (with PTR) and named ports, or its ExternalName
    /// target. An import (MCS DNS specification) gives its ClusterSet IP
    /// the same way at `<svc>.<ns>.svc.clusterset.local`, which exists even
    /// without one.
    fn service(&mut self, st: &ServiceState) {
        let svc = &st.service;
        self.mark(&self.sub(&[&svc.key.namespace, "svc"]));
        let Some(base) = self.base(st) else {
            return;
        };
        let import = svc.key.cluster == switchyard_model::CLUSTERSET;
        if !import && svc.service_type == ServiceType::ExternalName {
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
        if svc.headless {
            return;
        }
        if import {
            self.mark(&base);
        }
        for ip in &svc.cluster_ips {
            self.add_address(&base, *ip);
            self.add_ptr(*ip, &base);
        }
        for p in svc.ports.iter().filter(|p| !p.name.is_empty()) {
            if let Some(srv) = srv_name(&base, &p.name, p.protocol.as_lowercase()) {
                self.add(&srv, RData::SRV(SRV::new(0, 100, p.port, base.clone())));
            }
        }
        // SRV on the Service's own name: one per port (a port number of
        // two protocols is one record), as CoreDNS answers and the MCS
        // conformance suite queries.
        let mut numbers: Vec<u16> = svc.ports.iter().map(|p| p.port).collect();
        numbers.sort_unstable();
        numbers.dedup();
        for port in numbers {
            self.add(&base, RData::SRV(SRV::new(0, 100, port, base.clone())));
        }
    }

    /// The endpoint parts of a headless `st` (or of `before`'s, counted
    /// the other way, those that differ): each ready endpoint address (all
    /// with `publishNotReadyAddresses`) gives the Service's name an A or
    /// AAAA, a host name of its own (its hostname, else the dashed
    /// address) with a PTR back, and an SRV per named port of its slice
    /// targeting that host name. An import's endpoints are named
    /// `<hostname>.<cluster-id>.<svc>...` and have no PTR; the
    /// `<cluster-id>.<svc>...` level itself does not exist.
    fn endpoints<'a>(
        &mut self,
        st: &'a ServiceState,
        groups: &mut Groups<'a>,
        before: Option<&'a ServiceState>,
    ) {
        let Some(base) = self.base(st) else {
            return;
        };
        let mut parts = HashMap::with_hasher(fast_state());
        endpoint_parts(st, groups, &mut parts, self.sign, self.pod_names);
        if let Some(before) = before {
            endpoint_parts(before, groups, &mut parts, -self.sign, self.pod_names);
        }
        parts.retain(|_, n| *n != 0);
        if parts.is_empty() {
            return;
        }
        let base_slot = self.slot(&base);
        let sign = self.sign;
        for (part, n) in parts {
            let group = &mut groups.0[part.group];
            if group.names.is_none() {
                let srvs = group
                    .ports
                    .iter()
                    .filter(|p| !p.name.is_empty())
                    .filter_map(|p| {
                        srv_name(&base, &p.name, p.protocol.as_lowercase())
                            .map(|n| (self.slot(&n), p.port))
                    })
                    .collect();
                let cluster = group.cluster.and_then(|c| base.prepend_label(c).ok());
                let mut ports: Vec<u16> = group.ports.iter().map(|p| p.port).collect();
                ports.sort_unstable();
                ports.dedup();
                group.names = Some(GroupNames {
                    srvs,
                    ports,
                    cluster,
                });
            }
            let Some(GroupNames {
                srvs,
                ports,
                cluster,
            }) = &group.names
            else {
                continue;
            };
            let label = match part.hostname {
                Some(h) => h.to_owned(),
                None => part.ip.to_string().replace(['.', ':'], "-"),
            };
            let import = group.cluster.is_some();
            let under = if import {
                cluster.as_ref()
            } else {
                Some(&base)
            };
            let Some(host) = under.and_then(|u| u.prepend_label(label.as_str()).ok()) else {
                continue;
            };
            self.sign = n;
            self.add_address_in(base_slot, part.ip);
            if import {
                self.add_leaf(&host, RData::from(part.ip));
            } else {
                self.add_address(&host, part.ip);
                self.add_ptr(part.ip, &host);
            }
            for (srv, port) in srvs.iter() {
                self.add_in(*srv, RData::SRV(SRV::new(0, 100, *port, host.clone())));
            }
            for port in ports {
                self.add_in(base_slot, RData::SRV(SRV::new(0, 100, *port, host.clone())));
            }
        }
        self.sign = sign;
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

fn srv_name(base: &Name, port: &str, proto: &str) -> Option<Name> {
    base.prepend_label(format!("_{proto}"))
        .and_then(|n| n.prepend_label(format!("_{port}")))
        .ok()
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
    Records(Records<'a>, RecordType),
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

    /// The TTL of every record of the index.
    pub(crate) fn ttl(&self) -> u32 {
        self.ttl
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

    pub(crate) fn ptr(&self, name: &LowerName) -> Option<Records<'_>> {
        self.reverse.get(name).map(Node::records)
    }

    /// Records of `name` and `qtype`; an empty answer is `NoData`.
    pub(crate) fn lookup(&self, name: &LowerName, qtype: RecordType) -> Lookup<'_> {
        let Some(node) = self.names.get(name) else {
            return self.pod(name, qtype);
        };
        if node.is_empty() {
            return Lookup::NoData;
        }
        if qtype == RecordType::ANY {
            // RFC 8482 section 4.1: one RRset, not all of them (ANY is the
            // largest answer for the smallest question).
            let first = node.records().iter().next().map(Data::record_type);
            return match first {
                Some(rtype) => Lookup::Records(node.of_type(rtype), qtype),
                None => Lookup::NoData,
            };
        }
        let records = node.of_type(qtype);
        if records.last().is_some() {
            return Lookup::Records(records, qtype);
        }
        let cname = node.of_type(RecordType::CNAME);
        if cname.last().is_some() {
            return Lookup::Records(cname, RecordType::CNAME);
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
