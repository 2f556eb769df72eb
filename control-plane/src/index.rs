//! The index: merges every source's state into one snapshot.
//!
//! ```text
//!  watch<SourceState> × N ──▶ (a build as soon as one changes) ──▶ merge (crate::merge) ─▶ allocate cluster IPs
//!        ─▶ per Service: validate + encode (cached by input pointers)
//!        ─▶ per export group: import (cached) ─▶ allocate ClusterSet IPs ─▶ validate + encode
//!        ─▶ Snapshot::from_resources (version moves only with content or readiness)
//!        ─▶ watch<Arc<Snapshot>>
//! ```
//!
//! A cluster is served once every source of that cluster has synced, so an
//! agent never receives a partial view of its own cluster that a later
//! sync would have to repair, and one unreachable API server does not hold
//! back the other clusters. The clusterset view is served once every source
//! has synced (an import missing a cluster's endpoints would remove them
//! from every agent). Sources coalesce their bursts before they publish
//! (`crate::source::debounce`, the one debounce on a change's path); the
//! index builds as soon as one publishes, and whatever is published while a
//! build runs makes one more build right after it. A rebuild that changes
//! nothing keeps the version.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use switchyard_model::{
    CLUSTERSET, Service, ServiceExport, ServiceKey, ServiceState, ValidationError,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterDown;
use crate::ipam::{ClusterIpAllocator, IpamError};
use crate::merge::{self, ClustersetIssue, Exported, Input};
use crate::metrics::Metrics;
use crate::snapshot::{Contents, Resource, Snapshot, VersionSource, make_resource};
use crate::source::{ObjectError, SourceSlice, SourceState};
use crate::status::{ClusterStatus, ServiceSummary, SourceStatus, Status};

/// How the index builds snapshots.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// Ranges for cluster IPs of Services that name none, at most one per family.
    pub service_cidrs: Vec<IpNet>,
    /// Ranges for the ClusterSet IPs of imports.
    pub clusterset_cidrs: Vec<IpNet>,
    /// Every Service counts as exported.
    pub export_all: bool,
    /// What happens to the exports of a cluster whose sources all fail.
    pub cluster_down: ClusterDown,
    /// Where allocated cluster IPs are remembered; `None` keeps them in memory.
    pub state_dir: Option<PathBuf>,
}

impl IndexConfig {
    /// A configuration for tests and benchmarks: one service range, no
    /// clusterset range beyond the default, nothing persisted.
    pub fn in_memory(service_cidr: IpNet) -> Self {
        Self {
            service_cidrs: vec![service_cidr],
            clusterset_cidrs: vec!["10.112.0.0/12".parse().expect("a CIDR")],
            export_all: false,
            cluster_down: ClusterDown::Keep,
            state_dir: None,
        }
    }
}

/// An allocator that remembers its last answer: while the same keys want
/// addresses (only endpoints changed), a build costs one comparison per key.
#[derive(Debug)]
struct StickyAllocator {
    allocator: ClusterIpAllocator,
    last: Vec<(ServiceKey, IpAddr)>,
}

impl StickyAllocator {
    fn new(range: IpNet, state_dir: Option<&PathBuf>, prefix: &str) -> Self {
        let file = state_dir.map(|d| {
            d.join(format!(
                "{prefix}-{}.json",
                range.to_string().replace(['/', ':'], "_")
            ))
        });
        Self {
            allocator: ClusterIpAllocator::new(range, file),
            last: Vec::new(),
        }
    }

    /// An address for each of `wanting` (in key order), never one of `taken`.
    fn assign(
        &mut self,
        wanting: &[&ServiceKey],
        taken: &HashSet<IpAddr>,
    ) -> Vec<Result<IpAddr, IpamError>> {
        let unchanged = self.last.len() == wanting.len()
            && self
                .last
                .iter()
                .zip(wanting)
                .all(|((k, ip), w)| k == *w && !taken.contains(ip));
        if unchanged {
            return self.last.iter().map(|(_, ip)| Ok(*ip)).collect();
        }
        let results = self.allocator.assign(wanting, taken);
        self.last = wanting
            .iter()
            .zip(&results)
            .filter_map(|(k, r)| r.as_ref().ok().map(|ip| ((*k).clone(), *ip)))
            .collect();
        if self.last.len() != wanting.len() {
            // Ask the allocator again next time rather than trust a partial list.
            self.last.clear();
        }
        results
    }
}

/// The merging state carried between builds.
#[derive(Debug)]
pub struct Index {
    cluster_ips: Option<StickyAllocator>,
    clusterset_ips: Option<StickyAllocator>,
    export_all: bool,
    versions: VersionSource,
    current: Arc<Snapshot>,
    /// What each Service was built from last time, and the result, so a
    /// rebuild re-validates and re-encodes only the Services whose inputs
    /// changed: its cost is a comparison per Service plus the changes.
    cache: HashMap<ServiceKey, Built>,
    /// The same for the clusterset's imports, by (namespace, name).
    imports: HashMap<(String, String), BuiltImport>,
    /// Imports taken from a hub by a relay, by name, with what they became.
    relayed: HashMap<String, (Arc<ServiceState>, Encoded)>,
    build_id: u64,
}

/// One Service's inputs and what they produced.
#[derive(Debug)]
struct Built {
    /// The Service as its source gave it (before IP allocation).
    service: Arc<Service>,
    /// The address allocated to it, if it named none.
    allocated: Option<IpAddr>,
    /// Its export to the clusterset, if exported.
    export: Option<ServiceExport>,
    /// Its slices, ordered by name.
    slices: Vec<Arc<SourceSlice>>,
    /// The resource, or why the Service is invalid.
    result: Encoded,
    /// The build that last saw this Service.
    seen: u64,
}

impl Built {
    /// Sources hand out the same `Arc` for an unchanged object, so pointer
    /// equality is the test. (An equal object in a new `Arc` only costs a
    /// rebuild, which then finds the resource unchanged and keeps it.)
    fn same_inputs(
        &self,
        service: &Arc<Service>,
        allocated: Option<IpAddr>,
        export: Option<ServiceExport>,
        slices: &[&Arc<SourceSlice>],
    ) -> bool {
        self.allocated == allocated
            && self.export == export
            && Arc::ptr_eq(&self.service, service)
            && self.slices.len() == slices.len()
            && self
                .slices
                .iter()
                .zip(slices)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// One import's inputs (the exporting clusters' resources, oldest export
/// first) and what they produced.
#[derive(Debug)]
struct BuiltImport {
    inputs: Vec<(String, Arc<Resource>)>,
    /// The merged Service before its ClusterSet IP, and what disagreed.
    plan: Option<ServiceState>,
    issues: Vec<ClustersetIssue>,
    /// The ClusterSet IP the result was made with, and the result.
    result: Option<(Option<IpAddr>, Encoded)>,
    seen: u64,
}

impl BuiltImport {
    fn same_inputs(&self, inputs: &[(&str, &Arc<Resource>)]) -> bool {
        self.inputs.len() == inputs.len()
            && self
                .inputs
                .iter()
                .zip(inputs)
                .all(|((c, r), (c2, r2))| c == c2 && Arc::ptr_eq(r, r2))
    }
}

/// A resource, or why its Service is invalid.
type Encoded = Result<Valid, Vec<ValidationError>>;

/// A valid Service's resource, under its name, and its `/status` line.
#[derive(Debug)]
struct Valid {
    name: Arc<str>,
    resource: Arc<Resource>,
    summary: Arc<ServiceSummary>,
}

/// What one build produced.
#[derive(Debug)]
pub struct Build {
    /// The new snapshot, if the content (or what is served) changed.
    pub snapshot: Option<Arc<Snapshot>>,
    /// Objects skipped, with the reason.
    pub invalid: Vec<ObjectError>,
    /// Every Service in the snapshot, in key order, as `/status` lists them
    /// (the clusterset's imports included).
    pub services: Vec<Arc<ServiceSummary>>,
    /// What did not agree between the exports of the clusterset.
    pub issues: Vec<ClustersetIssue>,
}

/// Which clusters a build serves, and whose exports it leaves out.
#[derive(Debug, Clone, Default)]
pub struct Serving {
    /// Clusters whose sources have all synced; [`CLUSTERSET`] once every
    /// source has.
    pub ready: BTreeSet<String>,
    /// Clusters down for longer than `--cluster-down drop-after` allows:
    /// their exports leave the clusterset.
    pub dropped: BTreeSet<String>,
}

impl Serving {
    /// Every cluster of `inputs` and the clusterset ready, nothing dropped.
    pub fn all(inputs: &[Input<'_>]) -> Self {
        let mut ready: BTreeSet<String> = inputs.iter().map(|i| i.cluster.to_owned()).collect();
        ready.insert(CLUSTERSET.to_owned());
        Self {
            ready,
            dropped: BTreeSet::new(),
        }
    }
}

impl Index {
    /// A fresh index.
    pub fn new(config: &IndexConfig) -> Self {
        let state_dir = config.state_dir.as_ref();
        Self {
            cluster_ips: config
                .service_cidrs
                .first()
                .map(|r| StickyAllocator::new(*r, state_dir, "cluster-ips")),
            clusterset_ips: config
                .clusterset_cidrs
                .first()
                .map(|r| StickyAllocator::new(*r, state_dir, "clusterset-ips")),
            export_all: config.export_all,
            versions: VersionSource::new(),
            current: Arc::new(Snapshot::empty(String::new())),
            cache: HashMap::new(),
            imports: HashMap::new(),
            relayed: HashMap::new(),
            build_id: 0,
        }
    }

    /// Builds the next snapshot from every source's state (in source order:
    /// the first source to name an object wins). Returns a snapshot only when
    /// the content or what is served changed; the first build always returns one.
    pub fn build(
        &mut self,
        inputs: &[Input<'_>],
        serving: &Serving,
        changed_at_unix_nanos: i64,
    ) -> Build {
        self.build_id += 1;
        let build_id = self.build_id;
        let mut merged = merge::merge(inputs, self.export_all);
        let mut invalid = std::mem::take(&mut merged.errors);
        let allocated = self.allocate_cluster_ips(&mut merged.services, inputs, &mut invalid);

        let exports: HashMap<&ServiceKey, ServiceExport> = merged
            .exports
            .values()
            .flatten()
            .map(|e| {
                (
                    e.key,
                    ServiceExport {
                        created_unix: e.created_unix,
                    },
                )
            })
            .collect();
        let mut resources = BTreeMap::new();
        let mut exported = BTreeSet::new();
        let mut summaries = Vec::with_capacity(merged.services.len());
        for (key, (src, service)) in &merged.services {
            let group = merged.slices.remove(key).unwrap_or_default();
            let ip = allocated.get(key).copied();
            let export = exports.get(key).copied();
            let built = match self.cache.get_mut(*key) {
                Some(b) if b.same_inputs(service, ip, export, &group) => b,
                _ => {
                    let fresh = self.rebuild(service, ip, export, &group);
                    self.cache.insert((*key).clone(), fresh);
                    self.cache.get_mut(*key).expect("just inserted")
                }
            };
            built.seen = build_id;
            match &built.result {
                Ok(valid) => {
                    resources.insert(valid.name.clone(), valid.resource.clone());
                    if export.is_some() {
                        exported.insert(valid.name.clone());
                    }
                    summaries.push(valid.summary.clone());
                }
                Err(errs) => invalid.extend(errs.iter().map(|e| ObjectError {
                    source: inputs[*src].name.to_owned(),
                    object: e.object.clone(),
                    field: e.field.clone(),
                    message: e.message.clone(),
                })),
            }
        }
        self.cache.retain(|_, b| b.seen == build_id);

        let mut issues = std::mem::take(&mut merged.issues);
        // A relay following a hub's clusterset replaces the local merge: the
        // first one that follows its hub, else the first one.
        let relayed = inputs
            .iter()
            .filter_map(|i| i.state.imports.as_ref().map(|imports| (i, imports)))
            .min_by_key(|(i, _)| i.state.last_error.is_some() || !i.state.synced);
        match relayed {
            Some((input, imports)) => self.relayed_imports(
                input.name,
                imports,
                &mut resources,
                &mut summaries,
                &mut invalid,
            ),
            None => {
                self.relayed.clear();
                self.build_imports(
                    &merged,
                    serving,
                    &mut resources,
                    &mut summaries,
                    &mut issues,
                )
            }
        }

        let snapshot = Snapshot::from_resources(
            &self.current,
            Contents {
                resources,
                ready: serving.ready.clone(),
                exported,
            },
            &mut self.versions,
            changed_at_unix_nanos,
        )
        .map(Arc::new);
        if let Some(s) = &snapshot {
            self.current = s.clone();
        }
        Build {
            snapshot,
            invalid,
            services: summaries,
            issues,
        }
    }

    /// Validates and encodes one Service whose inputs changed. A resource
    /// whose content turns out equal to the current one keeps its `Arc`.
    fn rebuild(
        &self,
        service: &Arc<Service>,
        allocated: Option<IpAddr>,
        export: Option<ServiceExport>,
        slices: &[&Arc<SourceSlice>],
    ) -> Built {
        let mut state = ServiceState {
            service: (**service).clone(),
            slices: slices.iter().map(|s| s.resolved(service)).collect(),
        };
        state.service.cluster_ips.extend(allocated);
        state.service.export = export;
        Built {
            service: Arc::clone(service),
            allocated,
            export,
            slices: slices.iter().map(|s| Arc::clone(s)).collect(),
            result: self.encode(&state),
            seen: 0,
        }
    }

    /// Validates and encodes `state`, keeping the current `Arc` when equal.
    fn encode(&self, state: &ServiceState) -> Encoded {
        state.validate().map_err(|e| e.0)?;
        let fresh = make_resource(state);
        let summary = Arc::new(ServiceSummary::of(state));
        let (name, resource) = match self.current.resources.get_key_value(fresh.name.as_str()) {
            Some((name, old)) if **old == fresh => (name.clone(), old.clone()),
            _ => (Arc::from(fresh.name.as_str()), Arc::new(fresh)),
        };
        Ok(Valid {
            name,
            resource,
            summary,
        })
    }

    /// The imports a relay took from a hub, validated and encoded as they
    /// are (the hub merged them and gave them their ClusterSet IPs).
    fn relayed_imports(
        &mut self,
        source: &str,
        imports: &[Arc<ServiceState>],
        resources: &mut BTreeMap<Arc<str>, Arc<Resource>>,
        summaries: &mut Vec<Arc<ServiceSummary>>,
        invalid: &mut Vec<ObjectError>,
    ) {
        self.imports.clear();
        let mut next = HashMap::with_capacity(imports.len());
        for state in imports {
            let name = state.service.key.to_string();
            let encoded = match self.relayed.remove(&name) {
                Some((held, encoded)) if Arc::ptr_eq(&held, state) => encoded,
                _ => self.encode(state),
            };
            match &encoded {
                Ok(valid) => {
                    resources.insert(valid.name.clone(), valid.resource.clone());
                    summaries.push(valid.summary.clone());
                }
                Err(errs) => invalid.extend(errs.iter().map(|e| ObjectError {
                    source: source.to_owned(),
                    object: e.object.clone(),
                    field: e.field.clone(),
                    message: e.message.clone(),
                })),
            }
            next.insert(name, (Arc::clone(state), encoded));
        }
        self.relayed = next;
    }

    /// The clusterset's imports: one per exported namespace/name whose
    /// exporting clusters built valid Services, merged by
    /// [`merge::import`], with a ClusterSet IP unless headless.
    fn build_imports(
        &mut self,
        merged: &merge::Merged<'_>,
        serving: &Serving,
        resources: &mut BTreeMap<Arc<str>, Arc<Resource>>,
        summaries: &mut Vec<Arc<ServiceSummary>>,
        issues: &mut Vec<ClustersetIssue>,
    ) {
        let build_id = self.build_id;
        let mut plans: Vec<(String, String)> = Vec::new();
        for ((namespace, name), exporters) in &merged.exports {
            let inputs: Vec<(&str, &Arc<Resource>)> = exporters
                .iter()
                .filter(|e| !serving.dropped.contains(&e.key.cluster))
                .filter_map(|e| match self.cache.get(e.key).map(|b| &b.result) {
                    Some(Ok(valid)) => Some((e.key.cluster.as_str(), &valid.resource)),
                    _ => None,
                })
                .collect();
            if inputs.is_empty() {
                continue;
            }
            let key = ((*namespace).to_owned(), (*name).to_owned());
            let reuse = self
                .imports
                .get(&key)
                .is_some_and(|b| b.same_inputs(&inputs));
            if !reuse {
                let states: Vec<(&str, ServiceState)> = inputs
                    .iter()
                    .filter_map(|(cluster, r)| {
                        switchyard_proto::convert::decode_state_bytes(&r.name, &r.service_state)
                            .ok()
                            .map(|s| (*cluster, s))
                    })
                    .collect();
                let exported: Vec<Exported<'_>> = states
                    .iter()
                    .map(|(cluster, state)| Exported { cluster, state })
                    .collect();
                let (plan, found) = merge::import(namespace, name, &exported);
                self.imports.insert(
                    key.clone(),
                    BuiltImport {
                        inputs: inputs
                            .iter()
                            .map(|(c, r)| ((*c).to_owned(), Arc::clone(r)))
                            .collect(),
                        plan,
                        issues: found,
                        result: None,
                        seen: 0,
                    },
                );
            }
            let built = self.imports.get_mut(&key).expect("present");
            built.seen = build_id;
            issues.extend(built.issues.iter().cloned());
            if built.plan.is_some() {
                plans.push(key);
            }
        }
        self.imports.retain(|_, b| b.seen == build_id);

        let keys: Vec<ServiceKey> = plans
            .iter()
            .filter(|k| {
                self.imports[*k]
                    .plan
                    .as_ref()
                    .is_some_and(|p| !p.service.headless)
            })
            .map(|(ns, n)| ServiceKey::new(CLUSTERSET, ns, n))
            .collect();
        let wanting: Vec<&ServiceKey> = keys.iter().collect();
        let mut ips: HashMap<(String, String), Result<IpAddr, IpamError>> = HashMap::new();
        if let Some(alloc) = &mut self.clusterset_ips {
            for (key, r) in wanting.iter().zip(alloc.assign(&wanting, &HashSet::new())) {
                ips.insert((key.namespace.clone(), key.name.clone()), r);
            }
        }
        for key in plans {
            let ip = match ips.remove(&key) {
                Some(Ok(ip)) => Some(ip),
                Some(Err(e)) => {
                    issues.push(ClustersetIssue {
                        service: format!("{}/{}", key.0, key.1),
                        cluster: CLUSTERSET.to_owned(),
                        reason: "NoClusterSetIP",
                        message: e.to_string(),
                    });
                    continue;
                }
                None => None,
            };
            let built = self.imports.get(&key).expect("present");
            let fresh = match &built.result {
                Some((made_with, _)) if *made_with == ip => None,
                _ => {
                    let mut state = built.plan.clone().expect("a plan");
                    state.service.cluster_ips = ip.into_iter().collect();
                    Some(self.encode(&state))
                }
            };
            let built = self.imports.get_mut(&key).expect("present");
            if let Some(result) = fresh {
                built.result = Some((ip, result));
            }
            match built.result.as_ref().map(|(_, r)| r) {
                Some(Ok(valid)) => {
                    resources.insert(valid.name.clone(), valid.resource.clone());
                    summaries.push(valid.summary.clone());
                }
                Some(Err(errs)) => issues.extend(errs.iter().map(|e| ClustersetIssue {
                    service: format!("{}/{}", key.0, key.1),
                    cluster: CLUSTERSET.to_owned(),
                    reason: "Invalid",
                    message: format!("{}: {}", e.field, e.message),
                })),
                None => {}
            }
        }
    }

    /// Gives each proxied Service without an address one from the range of
    /// the primary family (the merge already refused conflicting explicit
    /// addresses). Returns the allocated addresses.
    fn allocate_cluster_ips<'a>(
        &mut self,
        services: &mut BTreeMap<&'a ServiceKey, (usize, &'a Arc<Service>)>,
        inputs: &[Input<'_>],
        invalid: &mut Vec<ObjectError>,
    ) -> HashMap<&'a ServiceKey, IpAddr> {
        let mut allocated = HashMap::new();
        let Some(alloc) = &mut self.cluster_ips else {
            return allocated;
        };
        let taken: HashSet<IpAddr> = services
            .values()
            .flat_map(|(_, s)| s.cluster_ips.iter().copied())
            .collect();
        let wanting: Vec<&ServiceKey> = services
            .iter()
            .filter(|(_, (_, s))| s.wants_cluster_ip() && s.cluster_ips.is_empty())
            .map(|(k, _)| *k)
            .collect();
        let results = alloc.assign(&wanting, &taken);
        for (key, result) in wanting.into_iter().zip(results) {
            match result {
                Ok(ip) => {
                    allocated.insert(key, ip);
                }
                Err(e) => {
                    if let Some((src, svc)) = services.remove(key) {
                        invalid.push(ObjectError {
                            source: inputs[src].name.to_owned(),
                            object: svc.object_name(),
                            field: "spec.clusterIP".into(),
                            message: e.to_string(),
                        });
                    }
                }
            }
        }
        allocated
    }
}

/// One source, as the index follows it.
#[derive(Debug)]
pub struct SourceFeed {
    /// Its name.
    pub name: String,
    /// The cluster of its objects.
    pub cluster: String,
    /// Its states.
    pub state: watch::Receiver<SourceState>,
}

/// Since when each cluster's sources have been failing, for `/status` and
/// `--cluster-down`.
#[derive(Debug, Default)]
struct ClusterHealth {
    down_since: HashMap<String, (Instant, SystemTime)>,
}

impl ClusterHealth {
    /// Updates from the sources' states; returns the status of each cluster.
    fn observe(&mut self, inputs: &[Input<'_>], policy: ClusterDown) -> Vec<ClusterStatus> {
        let mut by_cluster: BTreeMap<&str, Vec<&Input<'_>>> = BTreeMap::new();
        for i in inputs {
            by_cluster.entry(i.cluster).or_default().push(i);
        }
        self.down_since
            .retain(|c, _| by_cluster.contains_key(c.as_str()));
        by_cluster
            .into_iter()
            .map(|(cluster, sources)| {
                let errors: Vec<String> = sources
                    .iter()
                    .filter_map(|i| {
                        i.state
                            .last_error
                            .as_ref()
                            .map(|e| format!("{}: {e}", i.name))
                    })
                    .collect();
                // Down: every source of the cluster fails (one healthy source
                // still brings news of it).
                let down = errors.len() == sources.len();
                if down {
                    self.down_since
                        .entry(cluster.to_owned())
                        .or_insert((Instant::now(), SystemTime::now()));
                } else {
                    self.down_since.remove(cluster);
                }
                let since = self.down_since.get(cluster);
                ClusterStatus {
                    cluster: cluster.to_owned(),
                    synced: sources.iter().all(|i| i.state.synced),
                    healthy: !down,
                    last_error: (!errors.is_empty()).then(|| errors.join("; ")),
                    down_since_unix: since.map(|(_, t)| {
                        t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
                    }),
                    stale_seconds: since.map_or(0, |(t, _)| t.elapsed().as_secs()),
                    exports_dropped: matches!(policy, ClusterDown::DropAfter(d) if since.is_some_and(|(t, _)| t.elapsed() >= d)),
                }
            })
            .collect()
    }

    /// When the next cluster's exports are due to be dropped.
    fn next_drop(&self, policy: ClusterDown) -> Option<Instant> {
        let ClusterDown::DropAfter(d) = policy else {
            return None;
        };
        self.down_since
            .values()
            .map(|(t, _)| *t + d)
            .filter(|at| *at > Instant::now())
            .min()
    }
}

/// The inputs of a build from copied source states (name, cluster, state).
fn as_inputs(states: &[(String, String, SourceState)]) -> Vec<Input<'_>> {
    states
        .iter()
        .map(|(name, cluster, state)| Input {
            name,
            cluster,
            state,
        })
        .collect()
}

/// Runs the index until `shutdown`: rebuilds after each debounced burst of
/// source changes and publishes snapshots whose content changed.
pub async fn run(
    config: IndexConfig,
    sources: Vec<SourceFeed>,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut index = Index::new(&config);
    let mut health = ClusterHealth::default();
    // Each source's watch channel wakes one shared Notify: a burst of
    // changes leaves at most one stored permit, and no state is cloned until
    // the index actually rebuilds.
    let changes = Arc::new(tokio::sync::Notify::new());
    for feed in &sources {
        let mut rx = feed.state.clone();
        let changes = changes.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
                changes.notify_one();
            }
        });
    }
    let mut pending = true;
    let mut changed_at = unix_nanos();
    loop {
        if std::mem::take(&mut pending) {
            // Copy each source's state out of its channel (a copy is one
            // reference count per object) and build on the blocking pool:
            // a source publishing meanwhile never waits for a build, and
            // no runtime thread is held for its length.
            let states: Vec<(String, String, SourceState)> = sources
                .iter()
                .map(|f| (f.name.clone(), f.cluster.clone(), f.state.borrow().clone()))
                .collect();
            let inputs = as_inputs(&states);
            status.set_sources(
                inputs
                    .iter()
                    .map(|i| SourceStatus {
                        name: i.name.to_owned(),
                        cluster: i.cluster.to_owned(),
                        synced: i.state.synced,
                        last_error: i.state.last_error.clone(),
                        nodes: i.state.nodes.clone(),
                        warnings: i.state.warnings.clone(),
                    })
                    .collect(),
            );
            let clusters = health.observe(&inputs, config.cluster_down);
            let all_synced = inputs.iter().all(|i| i.state.synced);
            drop(inputs);
            let mut serving = Serving::default();
            for c in &clusters {
                // The clusterset (a relay following a hub) is served once
                // every source has synced, below.
                if c.synced && c.cluster != CLUSTERSET {
                    serving.ready.insert(c.cluster.clone());
                }
                if c.exports_dropped {
                    serving.dropped.insert(c.cluster.clone());
                }
            }
            if all_synced {
                serving.ready.insert(CLUSTERSET.to_owned());
            }
            metrics
                .clusters_down
                .set(clusters.iter().filter(|c| !c.healthy).count() as i64);
            status.set_clusters(clusters, all_synced);
            let build = if serving.ready.is_empty() {
                None
            } else {
                let metrics = metrics.clone();
                let mut moved = index;
                let built = tokio::task::spawn_blocking(move || {
                    let inputs = as_inputs(&states);
                    let t = Instant::now();
                    let build = moved.build(&inputs, &serving, changed_at);
                    metrics
                        .snapshot_build_seconds
                        .observe(t.elapsed().as_secs_f64());
                    (moved, build)
                })
                .await;
                match built {
                    Ok((back, build)) => {
                        index = back;
                        Some(build)
                    }
                    Err(e) => {
                        tracing::error!("snapshot build failed: {e}");
                        return;
                    }
                }
            };
            if let Some(build) = build {
                metrics.invalid_objects.set(build.invalid.len() as i64);
                metrics.clusterset_conflicts.set(
                    build
                        .issues
                        .iter()
                        .filter(|i| i.reason.ends_with("Conflict"))
                        .count() as i64,
                );
                for e in &build.invalid {
                    tracing::warn!(source = %e.source, object = %e.object, field = %e.field, "skipped: {}", e.message);
                }
                for i in &build.issues {
                    tracing::warn!(service = %i.service, cluster = %i.cluster, reason = i.reason, "clusterset: {}", i.message);
                }
                match build.snapshot {
                    Some(snapshot) => {
                        tracing::info!(version = %snapshot.version, resources = snapshot.resources.len(), "snapshot built");
                        metrics.snapshots.inc();
                        metrics.resources.set(snapshot.resources.len() as i64);
                        status.set_snapshot(
                            &snapshot.version,
                            snapshot.resources.len(),
                            build.invalid,
                            build.services,
                            build.issues,
                        );
                        snapshots.send_replace(Some(snapshot));
                    }
                    None => status.set_invalid(build.invalid, build.issues),
                }
            }
        }
        let next_drop = health.next_drop(config.cluster_down);
        tokio::select! {
            _ = changes.notified() => {}
            _ = tokio::time::sleep_until(next_drop.unwrap_or_else(Instant::now).into()), if next_drop.is_some() => {}
            _ = shutdown.cancelled() => return,
        }
        pending = true;
        changed_at = unix_nanos();
    }
}

/// Now, in Unix nanoseconds.
pub fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SlicePorts;
    use switchyard_model::{Endpoint, EndpointSlice, Protocol, ServicePort, TargetPort};

    fn source(n: usize) -> SourceState {
        let mut state = SourceState {
            synced: true,
            ..SourceState::default()
        };
        for i in 0..n {
            let key = ServiceKey::new("default", "ns", format!("s{i}"));
            state.services.push(Arc::new(Service {
                ports: vec![ServicePort {
                    name: String::new(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target_port: TargetPort::Number(8080),
                    node_port: None,
                }],
                ..Service::new(key.clone())
            }));
            state.slices.push(Arc::new(SourceSlice {
                service: key,
                slice: EndpointSlice {
                    name: format!("s{i}-1"),
                    endpoints: vec![Endpoint {
                        addresses: vec![format!("10.244.0.{}", i + 1).parse().expect("ip")],
                        ..Endpoint::default()
                    }],
                    ..EndpointSlice::default()
                },
                ports: SlicePorts::AsGiven,
            }));
        }
        state
    }

    fn index() -> Index {
        Index::new(&IndexConfig::in_memory(
            "10.96.0.0/16".parse().expect("cidr"),
        ))
    }

    /// Builds from `(source name, state)`s of cluster `default`, everything served.
    fn build(idx: &mut Index, sources: &[(&str, &SourceState)], at: i64) -> Build {
        let inputs: Vec<Input<'_>> = sources
            .iter()
            .map(|(name, state)| Input {
                name,
                cluster: "default",
                state,
            })
            .collect();
        idx.build(&inputs, &Serving::all(&inputs), at)
    }

    #[test]
    fn a_rebuild_touches_only_what_changed() {
        let mut idx = index();
        let mut state = source(20);
        let first = build(&mut idx, &[("t", &state)], 1)
            .snapshot
            .expect("first snapshot");
        assert_eq!(first.resources.len(), 20);
        assert!(
            build(&mut idx, &[("t", &state)], 2).snapshot.is_none(),
            "no change, no version"
        );

        Arc::make_mut(&mut state.slices[7]).slice.endpoints[0].addresses =
            vec!["10.244.9.9".parse().expect("ip")];
        let second = build(&mut idx, &[("t", &state)], 3)
            .snapshot
            .expect("a change");
        for (name, r) in &second.resources {
            let same = Arc::ptr_eq(r, &first.resources[name]);
            assert_eq!(same, &**name != "default/ns/s7", "{name}");
        }
        // Allocated cluster IPs do not move.
        let ips = |snap: &Snapshot, name: &str| {
            switchyard_proto::convert::decode_state_bytes(name, &snap.resources[name].service_state)
                .expect("decodes")
                .service
                .cluster_ips
        };
        for name in first.resources.keys() {
            assert_eq!(ips(&first, name), ips(&second, name), "{name}");
            assert_eq!(ips(&first, name).len(), 1);
        }
    }

    #[test]
    fn slices_of_another_source_take_the_services_target_ports() {
        let mut idx = index();
        let files = source(1);
        let key = files.services[0].key.clone();
        let docker = SourceState {
            synced: true,
            slices: vec![Arc::new(SourceSlice {
                service: key,
                slice: EndpointSlice {
                    name: "s0-docker-ipv4".into(),
                    endpoints: vec![Endpoint {
                        addresses: vec!["172.30.0.5".parse().expect("ip")],
                        ..Endpoint::default()
                    }],
                    ..EndpointSlice::default()
                },
                ports: SlicePorts::FromServiceTargets,
            })],
            ..SourceState::default()
        };
        let build = build(&mut idx, &[("file", &files), ("docker", &docker)], 1);
        let snap = build.snapshot.expect("snapshot");
        let name = "default/ns/s0";
        let state = switchyard_proto::convert::decode_state_bytes(
            name,
            &snap.resources[name].service_state,
        )
        .expect("decodes");
        let slice = state
            .slices
            .iter()
            .find(|s| s.name == "s0-docker-ipv4")
            .expect("the docker slice");
        assert_eq!(slice.port_for("", Protocol::Tcp), Some(8080));
        assert_eq!(build.services.len(), 1);
        assert_eq!(build.services[0].endpoints, 2);
        assert_eq!(build.services[0].ready_endpoints, 2);
    }

    /// `source(1)` moved into cluster `cluster`, exporting its Service.
    fn exporting(cluster: &str, endpoint: &str, created: i64) -> SourceState {
        let mut st = source(1);
        let key = ServiceKey::new(cluster, "ns", "s0");
        let svc = Arc::make_mut(&mut st.services[0]);
        svc.key = key.clone();
        let slice = Arc::make_mut(&mut st.slices[0]);
        slice.service = key.clone();
        slice.slice.endpoints[0].addresses = vec![endpoint.parse().expect("ip")];
        st.exports.push(crate::source::Export {
            key,
            created_unix: Some(created),
        });
        st
    }

    #[test]
    fn exports_of_two_clusters_become_one_import_with_a_clusterset_ip() {
        let mut idx = index();
        let east = exporting("east", "10.1.0.1", 20);
        let west = exporting("west", "10.2.0.1", 10);
        let inputs = [
            Input {
                name: "kube=east",
                cluster: "east",
                state: &east,
            },
            Input {
                name: "kube=west",
                cluster: "west",
                state: &west,
            },
        ];
        let first = idx.build(&inputs, &Serving::all(&inputs), 1);
        let snap = first.snapshot.expect("snapshot");
        let name = "clusterset/ns/s0";
        let import = switchyard_proto::convert::decode_state_bytes(
            name,
            &snap.resources[name].service_state,
        )
        .expect("an import");
        let ip = import.service.cluster_ips[0];
        assert!(
            "10.112.0.0/12"
                .parse::<IpNet>()
                .expect("cidr")
                .contains(&ip),
            "{ip}"
        );
        let mut clusters: Vec<_> = import.slices.iter().map(|s| s.cluster.clone()).collect();
        clusters.sort();
        assert_eq!(clusters, [Some("east".to_owned()), Some("west".to_owned())]);
        assert!(first.issues.is_empty(), "{:?}", first.issues);
        let summary = first
            .services
            .iter()
            .find(|s| s.cluster == CLUSTERSET)
            .expect("listed");
        assert_eq!(summary.endpoints, 2);

        // Unchanged inputs: same resource, no new version.
        assert!(
            idx.build(&inputs, &Serving::all(&inputs), 2)
                .snapshot
                .is_none()
        );

        // East down past --cluster-down drop-after: its endpoints leave the
        // clusterset; its own view stays; the ClusterSet IP stays.
        let mut serving = Serving::all(&inputs);
        serving.dropped.insert("east".into());
        let dropped = idx.build(&inputs, &serving, 3).snapshot.expect("a change");
        let import = switchyard_proto::convert::decode_state_bytes(
            name,
            &dropped.resources[name].service_state,
        )
        .expect("an import");
        assert_eq!(import.slices.len(), 1);
        assert_eq!(import.service.cluster_ips[0], ip);
        assert!(dropped.resources.contains_key("east/ns/s0"));

        // Before every source synced, the clusterset is not served.
        let mut partial = Serving::all(&inputs);
        partial.ready.remove(CLUSTERSET);
        let s = idx
            .build(&inputs, &partial, 4)
            .snapshot
            .expect("readiness changed");
        assert!(s.serves("east") && !s.complete());
    }

    #[test]
    fn an_equal_object_in_a_new_arc_keeps_the_version() {
        let mut idx = index();
        let state = source(3);
        let first = build(&mut idx, &[("t", &state)], 1)
            .snapshot
            .expect("first snapshot");
        let copy = SourceState {
            services: state
                .services
                .iter()
                .map(|s| Arc::new((**s).clone()))
                .collect(),
            slices: state
                .slices
                .iter()
                .map(|s| Arc::new((**s).clone()))
                .collect(),
            ..state.clone()
        };
        assert!(build(&mut idx, &[("t", &copy)], 2).snapshot.is_none());
        assert_eq!(idx.current.version, first.version);
    }
}
