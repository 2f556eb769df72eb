//! Versioned snapshots and the differences between them.
//!
//! A [`Snapshot`] is immutable and shared by every agent stream through an
//! `Arc`. Resources that did not change between two snapshots are the same
//! `Arc<Resource>`, so a new snapshot costs only what changed, and a stream
//! remembers what an agent holds by keeping the `Arc<Snapshot>` it last
//! ACKed: no per-agent copy of any resource.
//!
//! Differences are computed once per (view, base version) and cached on the
//! newer snapshot, so a thousand agents at the same version share one
//! [`Delta`]. The resource map is persistent (`imbl`): a snapshot made by
//! changing a few resources of the previous one shares the rest of its
//! structure, and the difference between the two costs what changed, not
//! the size of the fleet.
//!
//! ```text
//!  Snapshot { version "<epoch>-<sequence>", changed_at, ready clusters, exported names,
//!             resources: OrdMap "cluster/namespace/name" ─▶ Arc<Resource> }
//!  Resource { name, version = hex of the first 8 bytes of SHA-256(payload), payload: Bytes }
//!                                                        (the encoded ServiceState, like xDS's Any)
//!  agent of C:  C/…  +  clusterset/… (once every source synced)
//!  delta(view, base) = the maps' diff in the view's ranges (shared subtrees skipped), cached on the newer
//! ```
//!
//! A payload is encoded once, when its Service changes, and every stream
//! sends those same `Bytes`. When readiness or the exported set differs
//! between the two snapshots, the delta is a merge walk of both ranges
//! rather than the maps' diff. An agent that reconnects is diffed once
//! against the name -> version map it announced ([`Announcement`]), after
//! which its stream tracks it by snapshot again. Announced names are looked
//! up in a hash of the snapshot's names, made on the first Hello read
//! against it; an agent that holds nothing gets the view's whole list, made
//! once per snapshot and shared by every such agent. Snapshot versions carry no
//! order between processes; resource versions are what make resumption
//! work.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use switchyard_model::{CLUSTERSET, ServiceState};
use switchyard_proto::convert::encode_state_bytes;
use switchyard_proto::v1;

/// One resource as it goes on the wire, with its content version.
pub type Resource = v1::Resource;

/// Every resource by name, as a persistent map.
pub type Resources = imbl::OrdMap<Arc<str>, Arc<Resource>>;

/// The names of exported resources, as a persistent set.
pub type Names = imbl::OrdSet<Arc<str>>;

/// The immutable state at one version.
#[derive(Debug)]
pub struct Snapshot {
    /// Unique across control-plane restarts: `<epoch>-<sequence>`.
    pub version: String,
    /// When the oldest source change folded into this snapshot was seen
    /// (Unix nanoseconds); carried to agents for programming latency.
    pub changed_at_unix_nanos: i64,
    /// Every resource by name (`cluster/namespace/name`), in name order, so a
    /// cluster's resources form one contiguous range; the clusterset's
    /// imports are the range of cluster [`CLUSTERSET`].
    pub resources: Resources,
    /// The clusters whose view is complete and may be sent to agents (all
    /// their sources synced), and [`CLUSTERSET`] once every source has.
    pub ready: BTreeSet<String>,
    /// The resources that are exported to the clusterset (what a relay
    /// collecting a cluster's exports receives).
    pub exported: Names,
    deltas: Mutex<HashMap<DeltaKey, Arc<Delta>>>,
    /// Each view's whole content, as sent to agents that hold nothing: a
    /// thousand new agents share one list (800 KB at 100,000 resources).
    fulls: Mutex<HashMap<View, Arc<Delta>>>,
    /// Every resource by name, hashed: what the names of a Hello are looked
    /// up in, made by the first Hello read against this snapshot. Looking
    /// each name up in `resources` (a B-tree of long names that share their
    /// prefixes) cost 0.75 s of CPU for a Hello of 100,000 names, most of
    /// it comparing names (perf, 7 Dec 2026).
    by_name: std::sync::OnceLock<foldhash::HashMap<Arc<str>, Arc<Resource>>>,
}

/// What one snapshot holds, as the index built it.
#[derive(Debug, Default)]
pub struct Contents {
    /// Every resource by name.
    pub resources: Resources,
    /// The clusters that may be served, and [`CLUSTERSET`] when complete.
    pub ready: BTreeSet<String>,
    /// The names of exported resources.
    pub exported: Names,
}

/// What one stream receives of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum View {
    /// An agent of this cluster: its cluster's Services and the imports.
    Agent(String),
    /// A relay collecting this cluster's exported Services (a hub).
    Exports(String),
    /// A relay following the clusterset's imports (a cluster's control plane).
    Clusterset,
}

impl View {
    /// The cluster whose readiness the stream waits for.
    pub fn cluster(&self) -> &str {
        match self {
            View::Agent(c) | View::Exports(c) => c,
            View::Clusterset => CLUSTERSET,
        }
    }

    /// The ranges the view reads, and whether it keeps only exported names.
    fn ranges(&self) -> Vec<(&str, bool)> {
        match self {
            View::Agent(c) => vec![(c.as_str(), false), (CLUSTERSET, false)],
            View::Exports(c) => vec![(c.as_str(), true)],
            View::Clusterset => vec![(CLUSTERSET, false)],
        }
    }
}

/// What an agent announced it holds, taken in against one snapshot as the
/// Hello's parts arrive ([`Snapshot::take_in`]), so that a Hello of 10,000
/// names is never held whole: a name held at the snapshot's version costs a
/// pointer to the snapshot's own name, only other names are copied. Holding
/// every announced name as a string of its own, for a thousand agents at
/// once, left the control plane's heap too fragmented to give the memory
/// back after a reconnect storm (1 Dec 2026).
#[derive(Debug, Default)]
pub struct Announcement<'s> {
    /// Names held at the snapshot's version: the snapshot's own, by
    /// [`address`].
    current: foldhash::HashMap<usize, &'s Arc<str>>,
    /// The snapshot it was taken in against.
    against: Option<&'s Snapshot>,
    /// Names held at another version, or that the snapshot does not have.
    other: Vec<Arc<str>>,
    /// Entries announced, repeats included.
    entries: usize,
}

/// The address of one of a snapshot's own names. An announcement is only
/// used with the snapshot it was taken in against, whose names are the
/// same `Arc`s, so a name is found again without reading its bytes (at
/// 100,000 names, hashing each again was a cache miss apiece).
fn address(name: &Arc<str>) -> usize {
    Arc::as_ptr(name).cast::<u8>() as usize
}

impl Announcement<'_> {
    /// Entries announced so far, repeats included (what Hello bounds count).
    pub fn entries(&self) -> usize {
        self.entries
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DeltaKey {
    view: View,
    base_version: String,
}

/// What to send to move an agent from one state to another.
#[derive(Debug, Default)]
pub struct Delta {
    /// Resources added or changed.
    pub changed: Vec<Arc<Resource>>,
    /// Names removed.
    pub removed: Vec<Arc<str>>,
}

impl Delta {
    /// Whether the two states were equal.
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Makes snapshot versions: a per-process epoch and a sequence number.
#[derive(Debug)]
pub struct VersionSource {
    epoch: String,
    next: u64,
}

impl VersionSource {
    /// A new epoch from the clock and randomness, so versions never repeat
    /// across restarts or replicas.
    pub fn new() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let salt: u16 = rand::random();
        Self {
            epoch: format!("{:x}{:04x}", nanos / 1_000_000, salt),
            next: 1,
        }
    }

    /// The next version of this epoch.
    pub fn next_version(&mut self) -> String {
        let v = format!("{}-{}", self.epoch, self.next);
        self.next += 1;
        v
    }
}

impl Default for VersionSource {
    fn default() -> Self {
        Self::new()
    }
}

/// The content version of a resource payload: a hash of its deterministic
/// encoding (prost encodes fields in tag order and the message has no maps).
pub fn content_version(payload: &[u8]) -> String {
    let digest = Sha256::digest(payload);
    hex::encode(&digest[..8])
}

/// Wraps one Service state as a wire resource with its version. The payload
/// is encoded here once; every stream sends these same bytes.
pub fn make_resource(state: &ServiceState) -> Resource {
    let payload = encode_state_bytes(state);
    v1::Resource {
        name: state.service.key.to_string(),
        version: content_version(&payload),
        service_state: payload,
    }
}

impl Snapshot {
    /// An empty snapshot (used before the first build, and in tests).
    pub fn empty(version: String) -> Self {
        Self {
            version,
            changed_at_unix_nanos: 0,
            resources: Resources::new(),
            ready: BTreeSet::new(),
            exported: Names::new(),
            deltas: Mutex::default(),
            fulls: Mutex::default(),
            by_name: std::sync::OnceLock::new(),
        }
    }

    /// Builds the next snapshot from the full desired state, reusing the
    /// previous snapshot's `Arc` for every resource whose content is equal.
    /// Returns `None` when nothing changed. Every cluster named, and the
    /// clusterset, are ready. (The index uses [`Snapshot::from_resources`]
    /// with its own cache; this is the simple form.)
    pub fn next(
        previous: &Snapshot,
        states: impl IntoIterator<Item = ServiceState>,
        versions: &mut VersionSource,
        changed_at_unix_nanos: i64,
    ) -> Option<Snapshot> {
        let resources: Resources = states
            .into_iter()
            .map(|state| {
                let fresh = make_resource(&state);
                let name: Arc<str> = Arc::from(fresh.name.as_str());
                match previous.resources.get_key_value(&name) {
                    Some((n, old)) if **old == fresh => (n.clone(), old.clone()),
                    _ => (name, Arc::new(fresh)),
                }
            })
            .collect();
        let mut ready: BTreeSet<String> = resources
            .keys()
            .filter_map(|n| n.split('/').next())
            .map(str::to_owned)
            .collect();
        ready.insert(CLUSTERSET.to_owned());
        let contents = Contents {
            resources,
            ready,
            exported: Names::new(),
        };
        Self::from_resources(previous, contents, versions, changed_at_unix_nanos)
    }

    /// Wraps `contents` as the next snapshot unless every resource is the
    /// very `Arc` the previous snapshot holds under the same name and the
    /// same clusters are ready. (Exporting changes a resource's content.)
    pub fn from_resources(
        previous: &Snapshot,
        contents: Contents,
        versions: &mut VersionSource,
        changed_at_unix_nanos: i64,
    ) -> Option<Snapshot> {
        let Contents {
            resources,
            ready,
            exported,
        } = contents;
        // Derived maps compare in what differs; a resource equal in content
        // but in a new `Arc` compares equal too, and is then the same bytes.
        let unchanged = ready == previous.ready
            && exported == previous.exported
            && resources == previous.resources;
        if unchanged && !previous.version.is_empty() {
            return None;
        }
        Some(Snapshot {
            version: versions.next_version(),
            changed_at_unix_nanos,
            resources,
            ready,
            exported,
            deltas: Mutex::default(),
            fulls: Mutex::default(),
            by_name: std::sync::OnceLock::new(),
        })
    }

    /// Whether the view of `cluster` is complete and may be sent.
    pub fn serves(&self, cluster: &str) -> bool {
        self.ready.contains(cluster)
    }

    /// Whether every source has synced (the clusterset is served).
    pub fn complete(&self) -> bool {
        self.serves(CLUSTERSET)
    }

    /// The resources of one cluster's range (`cluster/…`).
    pub fn range<'a>(
        &'a self,
        cluster: &str,
    ) -> impl Iterator<Item = (&'a Arc<str>, &'a Arc<Resource>)> + 'a {
        let prefix = format!("{cluster}/");
        self.resources
            .range::<_, str>((
                std::ops::Bound::Included(prefix.as_str()),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(name, _)| name.starts_with(&prefix))
    }

    /// The range of `cluster` if this snapshot serves it (only its exported
    /// resources with `exported_only`), else nothing.
    fn served_range<'a>(
        &'a self,
        cluster: &str,
        exported_only: bool,
    ) -> impl Iterator<Item = (&'a Arc<str>, &'a Arc<Resource>)> + 'a {
        let served = self.serves(cluster);
        self.range(cluster)
            .filter(move |(name, _)| served && (!exported_only || self.exported.contains(*name)))
    }

    /// Whether `name` is part of what `view` receives now.
    pub fn in_view(&self, view: &View, name: &str) -> bool {
        view.ranges().into_iter().any(|(c, exported_only)| {
            self.serves(c)
                && name.len() > c.len()
                && name.starts_with(c)
                && name.as_bytes()[c.len()] == b'/'
                && (!exported_only || self.exported.contains(name))
        })
    }

    /// How many resources `view` receives now (counted once per snapshot:
    /// every Hello is bounded by it).
    pub fn view_len(&self, view: &View) -> usize {
        self.full(view).changed.len()
    }

    /// The difference from `base` (an older snapshot the stream ACKed) to
    /// this snapshot, restricted to `view`. Cached per view and base version.
    pub fn delta_from(&self, base: &Snapshot, view: &View) -> Arc<Delta> {
        let key = DeltaKey {
            view: view.clone(),
            base_version: base.version.clone(),
        };
        if let Some(d) = self.lock_deltas().get(&key) {
            return d.clone();
        }
        let mut delta = Delta::default();
        let same_view = view
            .ranges()
            .iter()
            .all(|(c, _)| base.serves(c) == self.serves(c))
            && base.exported == self.exported;
        if same_view {
            // What the view holds is decided the same way in both: the
            // persistent maps' difference, restricted to the view.
            use imbl::ordmap::DiffItem;
            for d in base.resources.diff(&self.resources) {
                match d {
                    DiffItem::Add(name, r) if self.in_view(view, name) => {
                        delta.changed.push(r.clone());
                    }
                    DiffItem::Update {
                        old: (_, o),
                        new: (name, r),
                    } if o.version != r.version && self.in_view(view, name) => {
                        delta.changed.push(r.clone());
                    }
                    DiffItem::Remove(name, _) if base.in_view(view, name) => {
                        delta.removed.push(name.clone());
                    }
                    _ => {}
                }
            }
        } else {
            for (c, exported_only) in view.ranges() {
                let part = diff(
                    base.served_range(c, exported_only),
                    self.served_range(c, exported_only),
                );
                delta.changed.extend(part.changed);
                delta.removed.extend(part.removed);
            }
        }
        let delta = Arc::new(delta);
        let mut cache = self.lock_deltas();
        // A handful of base versions is normal; a large cache means agents are
        // spread over many versions, where recomputing is cheaper than memory.
        if cache.len() >= 64 {
            cache.clear();
        }
        cache.insert(key, delta.clone());
        delta
    }

    /// The difference from the versions an agent announced on (re)connect,
    /// taken in at once (the tests' shorthand for one whole Hello).
    #[cfg(test)]
    pub fn delta_from_versions(&self, held: &HashMap<String, String>, view: &View) -> Delta {
        let mut announced = Announcement::default();
        self.take_in(&mut announced, held.iter());
        self.delta_from_announcement(&announced, view)
    }

    /// Takes in announced `(name, version)` entries, a Hello part at a
    /// time: a name this snapshot holds at that version is kept as the
    /// snapshot's own `Arc` (no copy of the name); only others are copied.
    pub fn take_in<'s, 'a>(
        &'s self,
        announced: &mut Announcement<'s>,
        entries: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) {
        let mut entries = entries.into_iter().peekable();
        if entries.peek().is_none() {
            return;
        }
        let against = *announced.against.get_or_insert(self);
        debug_assert!(
            std::ptr::eq(against, self),
            "an announcement is taken in against one snapshot"
        );
        let by_name = self.by_name();
        for (name, version) in entries {
            announced.entries += 1;
            match by_name.get_key_value(name.as_str()) {
                Some((key, res)) if res.version == *version => {
                    announced.current.insert(address(key), key);
                }
                _ => announced.other.push(Arc::from(name.as_str())),
            }
        }
    }

    /// The difference from what an agent announced, restricted to `view`:
    /// every resource of the view it does not hold at this snapshot's
    /// version, and every name it holds that the view does not have.
    pub fn delta_from_announcement(&self, announced: &Announcement, view: &View) -> Delta {
        debug_assert!(
            announced.against.is_none_or(|a| std::ptr::eq(a, self)),
            "an announcement is used with the snapshot it was taken in against"
        );
        let mut delta = Delta::default();
        let ranges = view.ranges();
        // Names held at this version that the view serves.
        let mut served_held = 0;
        for (c, exported_only) in &ranges {
            for (name, res) in self.served_range(c, *exported_only) {
                if announced.current.contains_key(&address(name)) {
                    served_held += 1;
                } else {
                    delta.changed.push(res.clone());
                }
            }
        }
        let in_range = |n: &str, c: &str| {
            n.len() > c.len() && n.starts_with(c) && n.as_bytes()[c.len()] == b'/'
        };
        // Whether the agent must drop `n`; `current`: it is held at this
        // snapshot's version, so the snapshot has it.
        let gone = |n: &str, current: bool| match ranges.iter().find(|(c, _)| in_range(n, c)) {
            // A range not served yet (the clusterset before every
            // source synced) keeps what the agent holds.
            Some((c, _)) if !self.serves(c) => false,
            Some((_, true)) => !self.exported.contains(n),
            Some((_, false)) => !current && !self.by_name().contains_key(n),
            // Another cluster's resource: not the agent's.
            None => true,
        };
        // When the view serves every name held at this version, none of
        // them is looked at again.
        let current_gone = (served_held < announced.current.len()).then(|| {
            announced
                .current
                .values()
                .copied()
                .filter(|n| gone(n, true))
        });
        let mut removed: Vec<Arc<str>> = (current_gone.into_iter().flatten())
            .chain(announced.other.iter().filter(|n| gone(n, false)))
            .cloned()
            .collect();
        removed.sort();
        removed.dedup();
        delta.removed = removed;
        delta
    }

    /// Every resource by name, hashed (made on first use).
    fn by_name(&self) -> &foldhash::HashMap<Arc<str>, Arc<Resource>> {
        self.by_name.get_or_init(|| {
            self.resources
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
    }

    /// The whole of `view`, as a delta from nothing; made once per snapshot
    /// and view.
    pub fn full(&self, view: &View) -> Arc<Delta> {
        let mut fulls = self.fulls.lock().unwrap_or_else(|e| e.into_inner());
        fulls
            .entry(view.clone())
            .or_insert_with(|| {
                Arc::new(self.delta_from_announcement(&Announcement::default(), view))
            })
            .clone()
    }

    fn lock_deltas(&self) -> std::sync::MutexGuard<'_, HashMap<DeltaKey, Arc<Delta>>> {
        self.deltas.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Merge-walks two name-ordered views.
fn diff<'a>(
    old: impl Iterator<Item = (&'a Arc<str>, &'a Arc<Resource>)>,
    new: impl Iterator<Item = (&'a Arc<str>, &'a Arc<Resource>)>,
) -> Delta {
    let mut delta = Delta::default();
    let mut old = old.peekable();
    let mut new = new.peekable();
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some((on, _)), None) => {
                delta.removed.push((*on).clone());
                old.next();
            }
            (None, Some((_, nr))) => {
                delta.changed.push((*nr).clone());
                new.next();
            }
            (Some((on, or)), Some((nn, nr))) => match on.cmp(nn) {
                std::cmp::Ordering::Less => {
                    delta.removed.push((*on).clone());
                    old.next();
                }
                std::cmp::Ordering::Greater => {
                    delta.changed.push((*nr).clone());
                    new.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(or, nr) && or.version != nr.version {
                        delta.changed.push((*nr).clone());
                    }
                    old.next();
                    new.next();
                }
            },
        }
    }
    delta
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_model::{Protocol, Service, ServiceKey, ServicePort, TargetPort};

    fn state(cluster: &str, name: &str, port: u16) -> ServiceState {
        ServiceState::new(Service {
            cluster_ips: vec!["10.96.0.1".parse().expect("ip")],
            ports: vec![ServicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port,
                target_port: TargetPort::Number(port),
                node_port: None,
            }],
            ..Service::new(ServiceKey::new(cluster, "ns", name))
        })
    }

    #[test]
    fn version_moves_only_with_content() {
        let mut vs = VersionSource::new();
        let s0 = Snapshot::empty("0".into());
        let s1 = Snapshot::next(&s0, [state("c", "a", 80), state("c", "b", 80)], &mut vs, 1)
            .expect("changed");
        assert!(
            Snapshot::next(&s1, [state("c", "a", 80), state("c", "b", 80)], &mut vs, 2).is_none()
        );
        let s2 = Snapshot::next(&s1, [state("c", "a", 80), state("c", "b", 81)], &mut vs, 3)
            .expect("changed");
        assert_ne!(s1.version, s2.version);
        assert!(
            Arc::ptr_eq(&s1.resources["c/ns/a"], &s2.resources["c/ns/a"]),
            "unchanged resource is shared"
        );
        let s3 =
            Snapshot::next(&s2, [state("c", "a", 80)], &mut vs, 4).expect("removal is a change");
        let d = s3.delta_from(&s2, &View::Agent("c".into()));
        assert!(d.changed.is_empty());
        assert_eq!(d.removed, vec![Arc::<str>::from("c/ns/b")]);
    }

    #[test]
    fn delta_is_per_cluster_and_cached() {
        let mut vs = VersionSource::new();
        let s0 = Snapshot::empty("0".into());
        let s1 = Snapshot::next(
            &s0,
            [state("c1", "a", 80), state("c2", "a", 80)],
            &mut vs,
            1,
        )
        .expect("changed");
        let s2 = Snapshot::next(
            &s1,
            [state("c1", "a", 81), state("c2", "a", 80)],
            &mut vs,
            2,
        )
        .expect("changed");
        let d1 = s2.delta_from(&s1, &View::Agent("c1".into()));
        assert_eq!(d1.changed.len(), 1);
        assert!(s2.delta_from(&s1, &View::Agent("c2".into())).is_empty());
        assert!(
            Arc::ptr_eq(&d1, &s2.delta_from(&s1, &View::Agent("c1".into()))),
            "cached"
        );
        assert_eq!(s2.view_len(&View::Agent("c1".into())), 1);
        assert_eq!(
            s2.view_len(&View::Agent("c".into())),
            0,
            "prefix must be a whole cluster id"
        );
    }

    #[test]
    fn delta_from_announced_versions() {
        let mut vs = VersionSource::new();
        let s1 = Snapshot::next(
            &Snapshot::empty("0".into()),
            [state("c", "a", 80), state("c", "b", 80)],
            &mut vs,
            1,
        )
        .expect("changed");
        let mut held = HashMap::new();
        held.insert("c/ns/a".to_owned(), s1.resources["c/ns/a"].version.clone());
        held.insert("c/ns/gone".to_owned(), "x".to_owned());
        let d = s1.delta_from_versions(&held, &View::Agent("c".into()));
        let changed: Vec<_> = d.changed.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(changed, ["c/ns/b"]);
        assert_eq!(d.removed, vec![Arc::<str>::from("c/ns/gone")]);
        assert_eq!(s1.full(&View::Agent("c".into())).changed.len(), 2);
    }

    #[test]
    fn an_announcement_taken_in_parts_gives_the_delta_of_the_whole() {
        let mut vs = VersionSource::new();
        let s1 = Snapshot::next(
            &Snapshot::empty("0".into()),
            [
                state("c", "a", 80),
                state("c", "b", 80),
                state("c", "d", 80),
                state("other", "x", 80),
            ],
            &mut vs,
            1,
        )
        .expect("changed");
        let v = |n: &str| s1.resources[n].version.clone();
        let held: HashMap<String, String> = [
            ("c/ns/a".to_owned(), v("c/ns/a")),
            ("c/ns/b".to_owned(), "stale".to_owned()),
            ("c/ns/gone".to_owned(), "x".to_owned()),
            // Held at the current version, but another cluster's.
            ("other/ns/x".to_owned(), v("other/ns/x")),
        ]
        .into();
        let view = View::Agent("c".into());
        let whole = s1.delta_from_versions(&held, &view);
        // The same entries in two parts, one of them repeated.
        let mut announced = Announcement::default();
        let entries: Vec<(&String, &String)> = held.iter().collect();
        s1.take_in(&mut announced, entries[..2].iter().copied());
        s1.take_in(&mut announced, entries[1..].iter().copied());
        assert_eq!(announced.entries(), 5);
        let parts = s1.delta_from_announcement(&announced, &view);
        let names = |d: &Delta| d.changed.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&parts), names(&whole));
        assert_eq!(parts.removed, whole.removed);
        assert_eq!(names(&whole), ["c/ns/b", "c/ns/d"]);
        assert_eq!(
            whole.removed,
            vec![Arc::<str>::from("c/ns/gone"), Arc::from("other/ns/x")]
        );
    }

    #[test]
    fn an_agent_gets_its_cluster_and_the_clusterset_once_each_is_ready() {
        let mut vs = VersionSource::new();
        let resources = |states: &[ServiceState]| -> Resources {
            states
                .iter()
                .map(|s| {
                    let r = make_resource(s);
                    (Arc::from(r.name.as_str()), Arc::new(r))
                })
                .collect()
        };
        let all = [
            state("east", "a", 80),
            state("west", "a", 80),
            state(CLUSTERSET, "a", 80),
        ];
        let ready = |cs: &[&str]| cs.iter().map(|c| (*c).to_owned()).collect::<BTreeSet<_>>();
        let contents = |resources, ready| Contents {
            resources,
            ready,
            exported: Names::new(),
        };
        let s1 = Snapshot::from_resources(
            &Snapshot::empty(String::new()),
            contents(resources(&all), ready(&["east"])),
            &mut vs,
            1,
        )
        .expect("first");
        assert!(s1.serves("east") && !s1.serves("west") && !s1.complete());
        let names = |d: &Delta| d.changed.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&s1.full(&View::Agent("east".into()))), ["east/ns/a"]);
        // A reconnecting agent keeps the imports it holds while the
        // clusterset is not served yet.
        let mut held = HashMap::new();
        held.insert("clusterset/ns/a".to_owned(), "old".to_owned());
        held.insert("north/ns/x".to_owned(), "v".to_owned());
        let d = s1.delta_from_versions(&held, &View::Agent("east".into()));
        assert_eq!(d.removed, vec![Arc::<str>::from("north/ns/x")]);
        // Readiness alone is a new version.
        let s2 = Snapshot::from_resources(
            &s1,
            contents(s1.resources.clone(), ready(&["east", "west", CLUSTERSET])),
            &mut vs,
            2,
        )
        .expect("readiness changed");
        assert_eq!(
            names(&s2.delta_from(&s1, &View::Agent("east".into()))),
            ["clusterset/ns/a"]
        );
        assert_eq!(names(&s2.full(&View::Clusterset)), ["clusterset/ns/a"]);
        assert_eq!(s2.view_len(&View::Agent("west".into())), 2);
        assert!(
            Snapshot::from_resources(
                &s2,
                contents(s2.resources.clone(), s2.ready.clone()),
                &mut vs,
                3
            )
            .is_none()
        );
    }

    #[test]
    fn a_relay_gets_a_clusters_exports_or_the_clusterset() {
        let mut vs = VersionSource::new();
        let all = [
            state("east", "a", 80),
            state("east", "b", 80),
            state(CLUSTERSET, "a", 80),
        ];
        let resources: Resources = all
            .iter()
            .map(|s| {
                let r = make_resource(s);
                (Arc::from(r.name.as_str()), Arc::new(r))
            })
            .collect();
        let exported: Arc<str> = Arc::from("east/ns/a");
        let s = Snapshot::from_resources(
            &Snapshot::empty(String::new()),
            Contents {
                resources,
                ready: ["east", CLUSTERSET].map(String::from).into(),
                exported: Names::unit(exported),
            },
            &mut vs,
            1,
        )
        .expect("first");
        let names = |d: Arc<Delta>| d.changed.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(s.full(&View::Exports("east".into()))), ["east/ns/a"]);
        assert_eq!(names(s.full(&View::Clusterset)), ["clusterset/ns/a"]);
        // A relay resuming with an unexported name is told to drop it.
        let mut held = HashMap::new();
        held.insert("east/ns/b".to_owned(), "v".to_owned());
        let d = s.delta_from_versions(&held, &View::Exports("east".into()));
        assert_eq!(d.removed, vec![Arc::<str>::from("east/ns/b")]);
    }

    #[test]
    fn versions_are_content_hashes() {
        let a = make_resource(&state("c", "a", 80));
        let b = make_resource(&state("c", "a", 80));
        let c = make_resource(&state("c", "a", 81));
        assert_eq!(a.version, b.version);
        assert_ne!(a.version, c.version);
        assert_eq!(a.version.len(), 16);
    }
}
