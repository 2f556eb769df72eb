//! The index: merges every source's state into one snapshot.
//!
//! ```text
//!  watch<SourceState> × N ──▶ (a build as soon as one changes) ──▶ merge (crate::merge)
//!        ─▶ allocate cluster IPs (crate::ipam: per family, a function of the Services wanting one)
//!        ─▶ per Service: validate + encode (cached by input pointers)
//!        ─▶ per export group: import (cached) ─▶ ClusterSet IPs per family (the ServiceImports'
//!           record, else allocated as cluster IPs are) ─▶ validate + encode
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
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use switchyard_model::{
    CLUSTERSET, IpFamily, Service, ServiceExport, ServiceKey, ServiceState, ValidationError,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterDown;
use crate::ipam::{self, IpamError, Ranges, RecordNote};
use crate::merge::{self, ClustersetIssue, Exported, Input};
use crate::metrics::Metrics;
use crate::snapshot::{Contents, Names, Resource, Snapshot, VersionSource, make_resource};
use crate::source::{ExportedMeta, ObjectError, SourceSlice, SourceState};
use crate::status::{ClusterStatus, ServiceSummary, SourceStatus, Status};

/// How the index builds snapshots.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// Ranges for cluster IPs of Services that name none, at most one per
    /// family (the first of each is used), the first the primary family.
    pub service_cidrs: Vec<IpNet>,
    /// Ranges for the ClusterSet IPs of imports, at most one per family.
    pub clusterset_cidrs: Vec<IpNet>,
    /// Every Service counts as exported.
    pub export_all: bool,
    /// What happens to the exports of a cluster whose sources all fail.
    pub cluster_down: ClusterDown,
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
        }
    }
}

/// The cluster IPs of one family, with the last answer remembered: while
/// the same keys want addresses and the same are taken (only endpoints or
/// other fields changed), a build costs one comparison per key.
#[derive(Debug)]
struct FamilyAllocator {
    range: IpNet,
    wanting: Vec<ServiceKey>,
    taken: HashSet<IpAddr>,
    answer: Vec<Result<IpAddr, IpamError>>,
}

impl FamilyAllocator {
    fn new(range: IpNet) -> Self {
        Self {
            range,
            wanting: Vec::new(),
            taken: HashSet::new(),
            answer: Vec::new(),
        }
    }

    /// An address for each of `wanting` (in key order), never one of `taken`.
    fn assign(
        &mut self,
        wanting: &[&ServiceKey],
        taken: &HashSet<IpAddr>,
    ) -> Vec<Result<IpAddr, IpamError>> {
        let taken: HashSet<IpAddr> = taken
            .iter()
            .copied()
            .filter(|ip| self.range.contains(ip))
            .collect();
        let unchanged = self.wanting.len() == wanting.len()
            && self.wanting.iter().zip(wanting).all(|(a, b)| a == *b)
            && self.taken == taken;
        if !unchanged {
            self.answer = ipam::allocate(self.range, wanting, &taken);
            self.wanting = wanting.iter().map(|k| (*k).clone()).collect();
            self.taken = taken;
        }
        self.answer.clone()
    }
}

/// What an import asks of the ClusterSet IP allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wants {
    /// Nothing: it is headless.
    Nothing,
    /// An address of each family, primary first.
    Ips(Vec<IpFamily>),
    /// Addresses of families (those of its exports) no `--clusterset-cidr` serves.
    NoRange(Vec<IpFamily>),
}

/// The families an import wants ClusterSet IPs of, and the addresses it
/// was given (`None`: one could not be).
type WantedIps = (Vec<IpFamily>, Option<Vec<IpAddr>>);

/// Each import's ClusterSet IPs, or why it has none, by (namespace, name).
type ClustersetIps = HashMap<(String, String), Result<Vec<IpAddr>, String>>;

/// Clusterset issues by import (namespace, name).
type IssuesByImport = BTreeMap<(String, String), Vec<ClustersetIssue>>;

/// The ClusterSet IPs each cluster's ServiceImports record, by import
/// (`clusterset/<namespace>/<name>`): (cluster, `spec.ips`), clusters in order.
type Records = BTreeMap<ServiceKey, Vec<(String, Vec<IpAddr>)>>;

/// What a ServiceImport carries beyond the import's Service, for the
/// writer of ServiceImports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportMeta {
    /// The oldest export's exported labels and annotations.
    pub exported: ExportedMeta,
    /// The exporting clusters whose Services make the import, oldest export
    /// first (`status.clusters`).
    pub clusters: Vec<String>,
}

/// [`ImportMeta`] of every import the snapshot holds (not those a relay
/// takes from a hub), by (namespace, name), as a persistent map.
pub type ImportMetas = imbl::OrdMap<(String, String), Arc<ImportMeta>>;

/// The merging state carried between builds.
#[derive(Debug)]
pub struct Index {
    service_ranges: Ranges,
    clusterset_ranges: Ranges,
    cluster_ips: BTreeMap<IpFamily, FamilyAllocator>,
    /// The ServiceImports' records, as the last full build found them (a
    /// patch needs them unchanged).
    records: Records,
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
    /// What the last build was made from and what its merge decided, so
    /// that a change of endpoints alone is patched in (see [`Index::patch`]).
    last: Option<LastBuild>,
}

/// Every Service's `/status` line, by resource name, as a persistent map.
pub type Summaries = imbl::OrdMap<Arc<str>, Arc<ServiceSummary>>;

/// The most Services one patch rebuilds; a larger change takes the full
/// build, whose cost per Service is lower.
const PATCH_LIMIT: usize = 1024;

/// The last build's inputs and the decisions of its merge.
#[derive(Debug)]
struct LastBuild {
    /// Each source's state (copies: persistent maps are shared).
    states: Vec<SourceState>,
    /// The sources' names and clusters, in order.
    names: Vec<(String, String)>,
    ready: BTreeSet<String>,
    dropped: BTreeSet<String>,
    /// The Services the merge admitted, with their address and export.
    admitted: HashMap<ServiceKey, Admitted>,
    /// Objects the merge and the allocation refused.
    refused: Vec<ObjectError>,
    /// The validation errors of admitted Services, by key.
    service_errors: BTreeMap<ServiceKey, Vec<ObjectError>>,
    /// Every clusterset issue, as [`LastImports::issues`] orders them.
    issues: Vec<ClustersetIssue>,
    summaries: Summaries,
    /// What the build knew of the clusterset's imports.
    imports: LastImports,
}

/// The imports of the last build (none when a relay brought them), so that
/// a patch rebuilds only those of the exported Services it touches.
#[derive(Debug, Default)]
struct LastImports {
    /// The exporting Services of each (namespace, name) with their
    /// exported labels and annotations, oldest export first, as the merge
    /// ordered them.
    groups: HashMap<(String, String), Vec<(ServiceKey, ExportedMeta)>>,
    /// The merge's own issues (exports without a Service).
    merged: Vec<ClustersetIssue>,
    /// What [`merge::import`] found wrong, by import (only those with issues).
    found: BTreeMap<(String, String), Vec<ClustersetIssue>>,
    /// An import without a ClusterSet IP or invalid, by import (the same).
    failed: BTreeMap<(String, String), Vec<ClustersetIssue>>,
    /// Records that could not be kept as they are, by import (the same).
    recorded: BTreeMap<(String, String), Vec<ClustersetIssue>>,
    /// The imports that want ClusterSet IPs of families there are ranges
    /// of: the families, and the addresses they were given (`None`: one
    /// could not be).
    ips: BTreeMap<(String, String), WantedIps>,
    /// What the ServiceImport of each import in the snapshot carries.
    metas: ImportMetas,
}

impl LastImports {
    /// Every clusterset issue in the order of a full build: the merge's,
    /// then each import's from [`merge::import`], then each import's
    /// missing ClusterSet IP or validation errors, then the records not
    /// kept as they are, imports in name order.
    fn issues(&self) -> Vec<ClustersetIssue> {
        self.merged
            .iter()
            .chain(self.found.values().flatten())
            .chain(self.failed.values().flatten())
            .chain(self.recorded.values().flatten())
            .cloned()
            .collect()
    }
}

/// A Service the merge admitted: from which source, with what addresses
/// allocated and whether it is exported.
#[derive(Debug)]
struct Admitted {
    source: usize,
    service: Arc<Service>,
    ips: Vec<IpAddr>,
    export: Option<ServiceExport>,
}

/// One Service's inputs and what they produced.
#[derive(Debug)]
struct Built {
    /// The Service as its source gave it (before IP allocation).
    service: Arc<Service>,
    /// The addresses allocated to it, if it named none.
    allocated: Vec<IpAddr>,
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
        allocated: &[IpAddr],
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

/// One import's inputs (the exporting clusters' resources with their
/// exported labels and annotations, oldest export first) and what they
/// produced.
#[derive(Debug)]
struct BuiltImport {
    inputs: Vec<(String, Arc<Resource>, ExportedMeta)>,
    /// The merged import before its ClusterSet IPs, and what disagreed.
    plan: Option<merge::Import>,
    issues: Vec<ClustersetIssue>,
    /// The ClusterSet IPs the result was made with, and the result.
    result: Option<(Vec<IpAddr>, Encoded)>,
    seen: u64,
}

impl BuiltImport {
    fn same_inputs(&self, inputs: &[(&str, &Arc<Resource>, &ExportedMeta)]) -> bool {
        self.inputs.len() == inputs.len()
            && self
                .inputs
                .iter()
                .zip(inputs)
                .all(|((c, r, m), (c2, r2, m2))| c == c2 && Arc::ptr_eq(r, r2) && m == *m2)
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
    /// Every Service in the snapshot, by name, as `/status` lists them
    /// (the clusterset's imports included).
    pub services: Summaries,
    /// What did not agree between the exports of the clusterset.
    pub issues: Vec<ClustersetIssue>,
    /// What the ServiceImport of each import carries beyond its resource.
    pub imports: ImportMetas,
    /// Whether the build patched the last one (a change of endpoints alone).
    pub patched: bool,
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
        let service_ranges = Ranges::first_of_each("--service-cidr", &config.service_cidrs);
        let clusterset_ranges =
            Ranges::first_of_each("--clusterset-cidr", &config.clusterset_cidrs);
        Self {
            cluster_ips: service_ranges
                .families()
                .filter_map(|f| Some((f, FamilyAllocator::new(service_ranges.get(f)?))))
                .collect(),
            service_ranges,
            clusterset_ranges,
            records: Records::new(),
            export_all: config.export_all,
            versions: VersionSource::new(),
            current: Arc::new(Snapshot::empty(String::new())),
            cache: HashMap::new(),
            imports: HashMap::new(),
            relayed: HashMap::new(),
            build_id: 0,
            last: None,
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
        if let Some(build) = self.patch(inputs, serving, changed_at_unix_nanos) {
            return build;
        }
        self.full_build(inputs, serving, changed_at_unix_nanos)
    }

    /// A build after a change of endpoints alone. When every source's
    /// Services, exports and errors are the very maps and lists of the last
    /// build, no relay brings imports, and the same clusters are served, the
    /// merge, the address allocation and the imports of the last build
    /// stand: only the Services whose slices changed (found by diffing the
    /// persistent slice maps) are rebuilt, then the clusterset imports of
    /// those that are exported (see [`Index::patch_imports`]), and the
    /// snapshot is the last one with those resources replaced. Its cost is
    /// that of the change, at any fleet size. `None` when the change is of
    /// another kind, touches more than [`PATCH_LIMIT`] Services, or leaves
    /// an import that only a full build can tell.
    fn patch(
        &mut self,
        inputs: &[Input<'_>],
        serving: &Serving,
        changed_at_unix_nanos: i64,
    ) -> Option<Build> {
        let last = self.last.as_ref()?;
        if inputs.len() != last.states.len()
            || serving.ready != last.ready
            || serving.dropped != last.dropped
        {
            return None;
        }
        let mut affected: BTreeSet<ServiceKey> = BTreeSet::new();
        for ((input, before), (name, cluster)) in inputs.iter().zip(&last.states).zip(&last.names) {
            let now = input.state;
            let same = input.name == name
                && input.cluster == cluster
                && now.synced == before.synced
                && now.imports.is_none()
                && before.imports.is_none()
                && now.services.same(&before.services)
                && now.errors == before.errors
                && now.exports == before.exports
                && now.service_imports == before.service_imports;
            if !same {
                return None;
            }
            for (service, _) in before.slices.changed_keys(&now.slices) {
                affected.insert(service.clone());
                if affected.len() > PATCH_LIMIT {
                    return None;
                }
            }
        }
        let mut last = self.last.take().expect("checked above");
        let mut resources = self.current.resources.clone();
        let mut exported = self.current.exported.clone();
        // The imports of the exported Services among them.
        let mut groups: BTreeSet<(String, String)> = BTreeSet::new();
        for key in &affected {
            let Some(admitted) = last.admitted.get(key) else {
                // Slices of a Service the snapshot does not hold.
                continue;
            };
            let mut group: Vec<&Arc<SourceSlice>> = inputs
                .iter()
                .flat_map(|i| {
                    i.state
                        .slices
                        .range((key.clone(), String::new())..)
                        .take_while(|s| s.service == *key)
                })
                .collect();
            group.sort_by(|a, b| a.slice.name.cmp(&b.slice.name));
            let name: Arc<str> = Arc::from(key.to_string());
            if admitted.export.is_some() {
                groups.insert((key.namespace.clone(), key.name.clone()));
            }
            match self.built(key, admitted, &group) {
                Ok(valid) => {
                    resources.insert(valid.name.clone(), valid.resource.clone());
                    if admitted.export.is_some() {
                        exported.insert(valid.name.clone());
                    }
                    last.summaries
                        .insert(valid.name.clone(), valid.summary.clone());
                    last.service_errors.remove(key);
                }
                Err(errs) => {
                    resources.remove(&name);
                    exported.remove(&name);
                    last.summaries.remove(&name);
                    let errors = errs
                        .iter()
                        .map(|e| object_error(inputs[admitted.source].name, e))
                        .collect();
                    last.service_errors.insert(key.clone(), errors);
                }
            }
        }
        if !groups.is_empty()
            && self
                .patch_imports(&groups, &serving.dropped, &mut last, &mut resources)
                .is_none()
        {
            // The caches hold what was rebuilt: the full build reuses it.
            self.last = Some(last);
            return None;
        }
        for (before, input) in last.states.iter_mut().zip(inputs) {
            // The rest of each state is what was compared above (the exports
            // equal, not copied again).
            before.slices = input.state.slices.clone();
        }
        Some(self.finish(
            last,
            Contents {
                resources,
                ready: serving.ready.clone(),
                exported,
            },
            changed_at_unix_nanos,
            true,
        ))
    }

    /// Rebuilds the imports `groups` after a patch rebuilt exporters of
    /// theirs, as [`Index::build_imports`] would: the exporters the last
    /// merge found, in its order; the same ClusterSet IPs; their issues in
    /// place of the old ones. When an import comes or goes (or the families
    /// it wants change), the allocation runs again for every import, as in
    /// a full build. `None` when the result could differ from a full
    /// build's (an import that had no ClusterSet IP left, an allocation
    /// that would move another import).
    fn patch_imports(
        &mut self,
        groups: &BTreeSet<(String, String)>,
        dropped: &BTreeSet<String>,
        last: &mut LastBuild,
        resources: &mut crate::snapshot::Resources,
    ) -> Option<()> {
        let imports = &mut last.imports;
        let mut plans: Vec<(&(String, String), Wants)> = Vec::with_capacity(groups.len());
        let mut moved = false;
        for key in groups {
            let exporters = imports.groups.get(key)?;
            let name: Arc<str> = Arc::from(ServiceKey::new(CLUSTERSET, &key.0, &key.1).to_string());
            resources.remove(&name);
            last.summaries.remove(&name);
            imports.metas.remove(key);
            imports.found.remove(key);
            imports.failed.remove(key);
            let planned = self.plan_import(key, exporters, dropped, &mut imports.found);
            let families = match &planned {
                Some(Wants::Ips(families)) => Some(families),
                _ => None,
            };
            if families != imports.ips.get(key).map(|(f, _)| f) {
                moved = true;
                match families {
                    Some(f) => {
                        imports.ips.insert(key.clone(), (f.clone(), None));
                    }
                    None => {
                        imports.ips.remove(key);
                    }
                }
            }
            if let Some(wants) = planned {
                plans.push((key, wants));
            }
        }
        let mut ips = ClustersetIps::new();
        if moved {
            let wanting: BTreeMap<(String, String), Vec<IpFamily>> = imports
                .ips
                .iter()
                .map(|(k, (f, _))| (k.clone(), f.clone()))
                .collect();
            let (mut assigned, recorded) = self.assign_clusterset_ips(&wanting);
            for (key, (_, ip)) in &mut imports.ips {
                let r = assigned.remove(key)?;
                if groups.contains(key) {
                    *ip = r.as_ref().ok().cloned();
                    ips.insert(key.clone(), r);
                } else if *ip != r.ok() {
                    return None;
                }
            }
            imports.recorded = recorded;
        }
        for (key, wants) in plans {
            let ip = match (ips.remove(key), wants) {
                (Some(r), _) => Some(r),
                (None, Wants::Ips(_)) => Some(Ok(imports.ips.get(key)?.1.clone()?)),
                (None, Wants::NoRange(families)) => Some(Err(no_range(&families))),
                (None, Wants::Nothing) => None,
            };
            if let Some(valid) = self.finish_import(key, ip, &mut imports.failed) {
                resources.insert(valid.name.clone(), valid.resource.clone());
                last.summaries
                    .insert(valid.name.clone(), valid.summary.clone());
                if let Some(meta) = self.import_meta(key) {
                    imports.metas.insert(key.clone(), meta);
                }
            }
        }
        last.issues = imports.issues();
        Some(())
    }

    /// The cached result for an admitted Service, rebuilt if its inputs changed.
    fn built(
        &mut self,
        key: &ServiceKey,
        admitted: &Admitted,
        slices: &[&Arc<SourceSlice>],
    ) -> &Encoded {
        let fresh = match self.cache.get(key) {
            Some(b) if b.same_inputs(&admitted.service, &admitted.ips, admitted.export, slices) => {
                None
            }
            _ => Some(self.rebuild(
                &admitted.service,
                admitted.ips.clone(),
                admitted.export,
                slices,
            )),
        };
        if let Some(fresh) = fresh {
            self.cache.insert(key.clone(), fresh);
        }
        let built = self.cache.get_mut(key).expect("present");
        built.seen = self.build_id;
        &built.result
    }

    /// The build from scratch: merges every source, allocates addresses,
    /// builds the imports; unchanged Services cost a pointer comparison.
    fn full_build(
        &mut self,
        inputs: &[Input<'_>],
        serving: &Serving,
        changed_at_unix_nanos: i64,
    ) -> Build {
        let build_id = self.build_id;
        let mut merged = merge::merge(inputs, self.export_all);
        let mut refused = std::mem::take(&mut merged.errors);
        let allocated = self.allocate_cluster_ips(&mut merged.services, inputs, &mut refused);

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
        let mut exported = Names::new();
        let mut summaries = BTreeMap::new();
        let mut admitted = HashMap::with_capacity(merged.services.len());
        let mut service_errors = BTreeMap::new();
        for (key, (src, service)) in &merged.services {
            let group = merged.slices.remove(key).unwrap_or_default();
            let this = Admitted {
                source: *src,
                service: Arc::clone(service),
                ips: allocated.get(key).cloned().unwrap_or_default(),
                export: exports.get(key).copied(),
            };
            match self.built(key, &this, &group) {
                Ok(valid) => {
                    resources.insert(valid.name.clone(), valid.resource.clone());
                    if this.export.is_some() {
                        exported.insert(valid.name.clone());
                    }
                    summaries.insert(valid.name.clone(), valid.summary.clone());
                }
                Err(errs) => {
                    let errors = errs
                        .iter()
                        .map(|e| object_error(inputs[*src].name, e))
                        .collect();
                    service_errors.insert((*key).clone(), errors);
                }
            }
            admitted.insert((*key).clone(), this);
        }
        self.cache.retain(|_, b| b.seen == build_id);

        let mut imports = LastImports {
            merged: std::mem::take(&mut merged.issues),
            ..LastImports::default()
        };
        self.records = records(inputs);
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
                &mut refused,
            ),
            None => {
                self.relayed.clear();
                self.build_imports(
                    &merged,
                    serving,
                    &mut imports,
                    &mut resources,
                    &mut summaries,
                )
            }
        }

        let resources = derive(&self.current.resources, resources);
        let last_summaries = self.last.take().map(|l| l.summaries).unwrap_or_default();
        let last = LastBuild {
            states: inputs.iter().map(|i| i.state.clone()).collect(),
            names: inputs
                .iter()
                .map(|i| (i.name.to_owned(), i.cluster.to_owned()))
                .collect(),
            ready: serving.ready.clone(),
            dropped: serving.dropped.clone(),
            admitted,
            refused,
            service_errors,
            issues: imports.issues(),
            summaries: derive(&last_summaries, summaries),
            imports,
        };
        self.finish(
            last,
            Contents {
                resources,
                ready: serving.ready.clone(),
                exported,
            },
            changed_at_unix_nanos,
            false,
        )
    }

    /// Makes the next snapshot of `contents` (when it changed) and the
    /// build's report, and keeps `last` for the next build.
    fn finish(
        &mut self,
        last: LastBuild,
        contents: Contents,
        changed_at_unix_nanos: i64,
        patched: bool,
    ) -> Build {
        let snapshot = Snapshot::from_resources(
            &self.current,
            contents,
            &mut self.versions,
            changed_at_unix_nanos,
        )
        .map(Arc::new);
        if let Some(s) = &snapshot {
            self.current = s.clone();
        }
        let build = Build {
            snapshot,
            invalid: last.invalid(),
            services: last.summaries.clone(),
            issues: last.issues.clone(),
            imports: last.imports.metas.clone(),
            patched,
        };
        self.last = Some(last);
        build
    }

    /// Validates and encodes one Service whose inputs changed. A resource
    /// whose content turns out equal to the current one keeps its `Arc`.
    fn rebuild(
        &self,
        service: &Arc<Service>,
        allocated: Vec<IpAddr>,
        export: Option<ServiceExport>,
        slices: &[&Arc<SourceSlice>],
    ) -> Built {
        let mut state = ServiceState {
            service: (**service).clone(),
            slices: slices.iter().map(|s| s.resolved(service)).collect(),
        };
        state.service.cluster_ips.extend(allocated.iter().copied());
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
        summaries: &mut BTreeMap<Arc<str>, Arc<ServiceSummary>>,
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
                    summaries.insert(valid.name.clone(), valid.summary.clone());
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
    /// [`merge::import`], with a ClusterSet IP of each of its families
    /// unless headless. Keeps in `last` what a patch needs to rebuild one
    /// of them alone.
    fn build_imports(
        &mut self,
        merged: &merge::Merged<'_>,
        serving: &Serving,
        last: &mut LastImports,
        resources: &mut BTreeMap<Arc<str>, Arc<Resource>>,
        summaries: &mut BTreeMap<Arc<str>, Arc<ServiceSummary>>,
    ) {
        let build_id = self.build_id;
        let mut plans: Vec<((String, String), Wants)> = Vec::new();
        for ((namespace, name), exporters) in &merged.exports {
            let key = ((*namespace).to_owned(), (*name).to_owned());
            let exporters: Vec<(ServiceKey, ExportedMeta)> = exporters
                .iter()
                .map(|e| (e.key.clone(), e.exported.clone()))
                .collect();
            if let Some(wants) =
                self.plan_import(&key, &exporters, &serving.dropped, &mut last.found)
            {
                plans.push((key.clone(), wants));
            }
            last.groups.insert(key, exporters);
        }
        self.imports.retain(|_, b| b.seen == build_id);

        let wanting: BTreeMap<(String, String), Vec<IpFamily>> = plans
            .iter()
            .filter_map(|(k, wants)| match wants {
                Wants::Ips(families) => Some((k.clone(), families.clone())),
                _ => None,
            })
            .collect();
        let (mut ips, recorded) = self.assign_clusterset_ips(&wanting);
        last.recorded = recorded;
        let mut metas = BTreeMap::new();
        for (key, wants) in plans {
            let ip = match wants {
                Wants::Ips(families) => {
                    let r = ips.remove(&key).expect("assigned");
                    last.ips
                        .insert(key.clone(), (families, r.as_ref().ok().cloned()));
                    Some(r)
                }
                Wants::NoRange(families) => Some(Err(no_range(&families))),
                Wants::Nothing => None,
            };
            if let Some(valid) = self.finish_import(&key, ip, &mut last.failed) {
                resources.insert(valid.name.clone(), valid.resource.clone());
                summaries.insert(valid.name.clone(), valid.summary.clone());
                if let Some(meta) = self.import_meta(&key) {
                    metas.insert(key, meta);
                }
            }
        }
        let previous = self
            .last
            .as_ref()
            .map(|l| l.imports.metas.clone())
            .unwrap_or_default();
        last.metas = derive(&previous, metas);
    }

    /// What the ServiceImport of import `key` carries, from its plan
    /// (the last build's `Arc` while it is the same).
    fn import_meta(&self, key: &(String, String)) -> Option<Arc<ImportMeta>> {
        let plan = self.imports.get(key)?.plan.as_ref()?;
        let meta = ImportMeta {
            exported: plan.exported.clone(),
            clusters: plan.clusters.clone(),
        };
        match self.last.as_ref().and_then(|l| l.imports.metas.get(key)) {
            Some(old) if **old == meta => Some(Arc::clone(old)),
            _ => Some(Arc::new(meta)),
        }
    }

    /// Merges import `key` from the valid resources of `exporters` (oldest
    /// export first), leaving out those of `dropped` clusters; the last
    /// merge stands while those resources (and the exports' labels and
    /// annotations) are the same. What the merge found wrong goes in
    /// `found`. Returns what the import asks of the ClusterSet IP
    /// allocation (the families of its exports there is a range of), or
    /// `None` when nothing is imported (no exporter valid, or none usable).
    fn plan_import(
        &mut self,
        key: &(String, String),
        exporters: &[(ServiceKey, ExportedMeta)],
        dropped: &BTreeSet<String>,
        found: &mut BTreeMap<(String, String), Vec<ClustersetIssue>>,
    ) -> Option<Wants> {
        let inputs: Vec<(&str, &Arc<Resource>, &ExportedMeta)> = exporters
            .iter()
            .filter(|(k, _)| !dropped.contains(&k.cluster))
            .filter_map(|(k, meta)| match self.cache.get(k).map(|b| &b.result) {
                Some(Ok(valid)) => Some((k.cluster.as_str(), &valid.resource, meta)),
                _ => None,
            })
            .collect();
        if inputs.is_empty() {
            self.imports.remove(key);
            return None;
        }
        let reuse = self
            .imports
            .get(key)
            .is_some_and(|b| b.same_inputs(&inputs));
        if !reuse {
            let states: Vec<(&str, ServiceState, &ExportedMeta)> = inputs
                .iter()
                .filter_map(|(cluster, r, meta)| {
                    switchyard_proto::convert::decode_state_bytes(&r.name, &r.service_state)
                        .ok()
                        .map(|s| (*cluster, s, *meta))
                })
                .collect();
            let exported: Vec<Exported<'_>> = states
                .iter()
                .map(|(cluster, state, exported)| Exported {
                    cluster,
                    state,
                    exported,
                })
                .collect();
            let (plan, issues) = merge::import(&key.0, &key.1, &exported);
            self.imports.insert(
                key.clone(),
                BuiltImport {
                    inputs: inputs
                        .iter()
                        .map(|(c, r, m)| ((*c).to_owned(), Arc::clone(r), (*m).clone()))
                        .collect(),
                    plan,
                    issues,
                    result: None,
                    seen: 0,
                },
            );
        }
        let built = self.imports.get_mut(key).expect("present");
        built.seen = self.build_id;
        if !built.issues.is_empty() {
            found.insert(key.clone(), built.issues.clone());
        }
        let plan = built.plan.as_ref()?;
        if plan.state.service.headless {
            return Some(Wants::Nothing);
        }
        let served: Vec<IpFamily> = plan
            .families
            .iter()
            .copied()
            .filter(|f| self.clusterset_ranges.get(*f).is_some())
            .collect();
        Some(if served.is_empty() {
            Wants::NoRange(plan.families.clone())
        } else {
            Wants::Ips(served)
        })
    }

    /// ClusterSet IPs for the imports `wanting` them, one per family given
    /// (primary first): per family, the ServiceImports' record and then
    /// [`ipam::allocate_recorded`]. Returns each import's addresses (or why
    /// one could not be given), and the records not kept as they are.
    fn assign_clusterset_ips(
        &self,
        wanting: &BTreeMap<(String, String), Vec<IpFamily>>,
    ) -> (ClustersetIps, IssuesByImport) {
        let keys: BTreeMap<&(String, String), ServiceKey> = wanting
            .keys()
            .map(|k| (k, ServiceKey::new(CLUSTERSET, &k.0, &k.1)))
            .collect();
        // (import, family) -> its address, or why it has none.
        let mut given = HashMap::new();
        let mut notes = Vec::new();
        for family in self.clusterset_ranges.families() {
            let Some(range) = self.clusterset_ranges.get(family) else {
                continue;
            };
            let of_family: Vec<&(String, String)> = wanting
                .iter()
                .filter(|(_, f)| f.contains(&family))
                .map(|(k, _)| k)
                .collect();
            if of_family.is_empty() {
                continue;
            }
            // Each cluster's first address of this family in the range.
            let mut recorded: BTreeMap<&ServiceKey, Vec<ipam::Recorded<'_>>> = BTreeMap::new();
            let mut reserved: HashSet<IpAddr> = HashSet::new();
            for (key, records) in &self.records {
                for (cluster, ips) in records {
                    if let Some(ip) = ips
                        .iter()
                        .find(|ip| IpFamily::of(ip) == family && range.contains(*ip))
                    {
                        recorded
                            .entry(key)
                            .or_default()
                            .push((cluster.as_str(), *ip));
                        reserved.insert(*ip);
                    }
                }
            }
            let service_keys: Vec<&ServiceKey> = of_family.iter().map(|k| &keys[k]).collect();
            let (answers, family_notes) =
                ipam::allocate_recorded(range, &service_keys, &recorded, &reserved);
            for (key, answer) in of_family.into_iter().zip(answers) {
                given.insert((key, family), answer);
            }
            notes.extend(family_notes);
        }
        let mut out = HashMap::with_capacity(wanting.len());
        for (key, families) in wanting {
            let answer: Result<Vec<IpAddr>, String> = families
                .iter()
                .map(|f| match given.remove(&(key, *f)) {
                    Some(r) => r.map_err(|e| e.to_string()),
                    None => Err(format!("no --clusterset-cidr of {f}")),
                })
                .collect();
            out.insert(key.clone(), answer);
        }
        let mut issues = IssuesByImport::new();
        for note in notes {
            let (key, lines) = match note {
                RecordNote::Disagrees {
                    key,
                    kept,
                    differing,
                } => {
                    let lines: Vec<(String, String)> = differing
                        .into_iter()
                        .map(|(cluster, ip)| {
                            (
                                cluster,
                                format!(
                                    "its ServiceImport records {ip}, other clusters' {kept}, which is used \
                                     (recorded by the most clusters, then by the lowest cluster id)"
                                ),
                            )
                        })
                        .collect();
                    (key, lines)
                }
                RecordNote::HeldByAnother {
                    key,
                    ip,
                    holder,
                    clusters,
                } => {
                    let lines = clusters
                        .into_iter()
                        .map(|cluster| {
                            (
                                cluster,
                                format!(
                                    "its ServiceImport records {ip}, which {}/{} keeps (recorded by \
                                     more clusters, or the smaller name); this import gets another",
                                    holder.namespace, holder.name
                                ),
                            )
                        })
                        .collect();
                    (key, lines)
                }
            };
            let entry = issues
                .entry((key.namespace.clone(), key.name.clone()))
                .or_default();
            for (cluster, message) in lines {
                entry.push(ClustersetIssue {
                    service: format!("{}/{}", key.namespace, key.name),
                    cluster,
                    reason: merge::RECORD_MISMATCH,
                    message,
                });
            }
        }
        (out, issues)
    }

    /// The resource of planned import `key` with its ClusterSet IPs (`None`:
    /// headless), encoded again only when the plan or the addresses
    /// changed. Why it has none goes in `failed`.
    fn finish_import(
        &mut self,
        key: &(String, String),
        ips: Option<Result<Vec<IpAddr>, String>>,
        failed: &mut BTreeMap<(String, String), Vec<ClustersetIssue>>,
    ) -> Option<&Valid> {
        let service = format!("{}/{}", key.0, key.1);
        let ips = match ips {
            Some(Ok(ips)) => ips,
            Some(Err(message)) => {
                failed.insert(
                    key.clone(),
                    vec![ClustersetIssue {
                        service,
                        cluster: CLUSTERSET.to_owned(),
                        reason: merge::NO_CLUSTERSET_IP,
                        message,
                    }],
                );
                return None;
            }
            None => Vec::new(),
        };
        let built = self.imports.get(key).expect("present");
        let fresh = match &built.result {
            Some((made_with, _)) if *made_with == ips => None,
            _ => {
                let mut state = built.plan.as_ref().expect("a plan").state.clone();
                state.service.cluster_ips.clone_from(&ips);
                Some(self.encode(&state))
            }
        };
        let built = self.imports.get_mut(key).expect("present");
        if let Some(result) = fresh {
            built.result = Some((ips, result));
        }
        match built.result.as_ref().map(|(_, r)| r) {
            Some(Ok(valid)) => Some(valid),
            Some(Err(errs)) => {
                failed.insert(
                    key.clone(),
                    errs.iter()
                        .map(|e| ClustersetIssue {
                            service: service.clone(),
                            cluster: CLUSTERSET.to_owned(),
                            reason: merge::INVALID_IMPORT,
                            message: format!("{}: {}", e.field, e.message),
                        })
                        .collect(),
                );
                None
            }
            None => None,
        }
    }

    /// Gives each proxied Service without an address one of each family
    /// its `spec.ipFamilies` and `spec.ipFamilyPolicy` ask for
    /// ([`ipam::families_for`]), from that family's `--service-cidr` (the
    /// merge already refused conflicting explicit addresses). A Service
    /// that cannot have them is refused, naming the field. Returns the
    /// allocated addresses, primary first.
    fn allocate_cluster_ips<'a>(
        &mut self,
        services: &mut BTreeMap<&'a ServiceKey, (usize, &'a Arc<Service>)>,
        inputs: &[Input<'_>],
        invalid: &mut Vec<ObjectError>,
    ) -> HashMap<&'a ServiceKey, Vec<IpAddr>> {
        let mut allocated = HashMap::new();
        let mut wants: Vec<(&'a ServiceKey, Vec<IpFamily>)> = Vec::new();
        let mut refused: Vec<(&'a ServiceKey, String, String)> = Vec::new();
        for (key, (_, svc)) in services.iter() {
            if !svc.wants_cluster_ip() || !svc.cluster_ips.is_empty() {
                continue;
            }
            match ipam::families_for(svc, &self.service_ranges, "--service-cidr") {
                Ok(families) => wants.push((*key, families)),
                Err(e) => refused.push((*key, e.field, e.message)),
            }
        }
        if !wants.is_empty() {
            let taken: HashSet<IpAddr> = services
                .values()
                .flat_map(|(_, s)| s.cluster_ips.iter().copied())
                .collect();
            let mut given: HashMap<(&ServiceKey, IpFamily), Result<IpAddr, IpamError>> =
                HashMap::new();
            for (family, alloc) in &mut self.cluster_ips {
                let keys: Vec<&ServiceKey> = wants
                    .iter()
                    .filter(|(_, f)| f.contains(family))
                    .map(|(k, _)| *k)
                    .collect();
                if keys.is_empty() {
                    continue;
                }
                let answers = alloc.assign(&keys, &taken);
                for (key, answer) in keys.into_iter().zip(answers) {
                    given.insert((key, *family), answer);
                }
            }
            for (key, families) in wants {
                let mut ips = Vec::with_capacity(families.len());
                for (i, family) in families.iter().enumerate() {
                    match given.remove(&(key, *family)) {
                        Some(Ok(ip)) => ips.push(ip),
                        Some(Err(e)) => {
                            let field = if i == 0 {
                                "spec.clusterIP".to_owned()
                            } else {
                                format!("spec.clusterIPs[{i}]")
                            };
                            refused.push((key, field, e.to_string()));
                            break;
                        }
                        None => unreachable!("every family asked for has an allocator"),
                    }
                }
                if ips.len() == families.len() {
                    allocated.insert(key, ips);
                }
            }
        }
        for (key, field, message) in refused {
            if let Some((src, svc)) = services.remove(key) {
                invalid.push(ObjectError {
                    source: inputs[src].name.to_owned(),
                    object: svc.object_name(),
                    field,
                    message,
                });
            }
        }
        allocated
    }
}

/// Why an import whose exports have `families` gets no ClusterSet IP.
fn no_range(families: &[IpFamily]) -> String {
    if families.is_empty() {
        return "its exports have no cluster IP to take a family from".to_owned();
    }
    let families: Vec<String> = families.iter().map(ToString::to_string).collect();
    format!(
        "no --clusterset-cidr of {}, the families its exports have in common",
        families.join(" or ")
    )
}

/// The ClusterSet IPs recorded by the ServiceImports Switchyard manages
/// (`RecordedImport::ours`) in each source's cluster, by import; a
/// cluster's first source with a record of an import counts.
fn records(inputs: &[Input<'_>]) -> Records {
    let mut out = Records::new();
    for input in inputs {
        for r in input.state.service_imports.iter().filter(|r| r.ours) {
            let list = out
                .entry(ServiceKey::new(CLUSTERSET, &r.namespace, &r.name))
                .or_default();
            if !list.iter().any(|(c, _)| c == input.cluster) {
                list.push((input.cluster.to_owned(), r.ips.clone()));
            }
        }
    }
    for list in out.values_mut() {
        list.sort_by(|a, b| a.0.cmp(&b.0));
    }
    out
}

impl LastBuild {
    /// What the build skipped: the merge's refusals, then the invalid
    /// Services in key order.
    fn invalid(&self) -> Vec<ObjectError> {
        self.refused
            .iter()
            .chain(self.service_errors.values().flatten())
            .cloned()
            .collect()
    }
}

/// A Service's validation error, reported against its source.
fn object_error(source: &str, e: &ValidationError) -> ObjectError {
    ObjectError {
        source: source.to_owned(),
        object: e.object.clone(),
        field: e.field.clone(),
        message: e.message.clone(),
    }
}

/// `fresh` as a persistent map derived from `previous`: what did not change
/// stays shared with it, so the next difference between the two costs only
/// what changed.
fn derive<K: Ord + Clone, V>(
    previous: &imbl::OrdMap<K, Arc<V>>,
    fresh: BTreeMap<K, Arc<V>>,
) -> imbl::OrdMap<K, Arc<V>> {
    let mut out = previous.clone();
    for name in previous.keys() {
        if !fresh.contains_key(name) {
            out.remove(name);
        }
    }
    for (name, value) in fresh {
        if !previous.get(&name).is_some_and(|v| Arc::ptr_eq(v, &value)) {
            out.insert(name, value);
        }
    }
    out
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
    outputs: Outputs,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    run_with(config, sources, outputs, status, metrics, shutdown, None).await;
}

/// Where the index publishes what it builds.
#[derive(Debug)]
pub struct Outputs {
    /// Every snapshot whose content changed.
    pub snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    /// What the member clusters' API servers should hold (made only while
    /// someone writes it back: see [`crate::mcs`]).
    pub clusterset: watch::Sender<Option<Arc<crate::mcs::Clusterset>>>,
}

/// Called on the build's thread as each build starts (tests hold a build there).
type BuildHook = Arc<dyn Fn() + Send + Sync>;

async fn run_with(
    config: IndexConfig,
    sources: Vec<SourceFeed>,
    outputs: Outputs,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    hook: Option<BuildHook>,
) {
    let Outputs {
        snapshots,
        clusterset,
    } = outputs;
    let mut index = Index::new(&config);
    let mut imports_decoded = crate::mcs::ImportCache::default();
    let mut health = ClusterHealth::default();
    let mut signals = crate::signals::SourceSignals::default();
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
            let sources: Vec<SourceStatus> = inputs
                .iter()
                .map(|i| SourceStatus {
                    name: i.name.to_owned(),
                    cluster: i.cluster.to_owned(),
                    synced: i.state.synced,
                    last_error: i.state.last_error.clone(),
                    nodes: i.state.nodes.clone(),
                    warnings: i.state.warnings.clone(),
                    dns: i.state.dns.clone(),
                })
                .collect();
            signals.observe(&sources, &metrics);
            status.set_sources(sources);
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
                let mut cache = imports_decoded;
                let write_back = clusterset.receiver_count() > 0;
                let hook = hook.clone();
                let built = tokio::task::spawn_blocking(move || {
                    if let Some(hook) = hook {
                        hook();
                    }
                    let inputs = as_inputs(&states);
                    let t = Instant::now();
                    let build = moved.build(&inputs, &serving, changed_at);
                    metrics
                        .snapshot_build_seconds
                        .observe(t.elapsed().as_secs_f64());
                    let wanted = write_back.then(|| {
                        crate::mcs::Clusterset::of(
                            &moved.current,
                            &build.issues,
                            inputs.iter().flat_map(|i| &i.state.exports),
                            &mut cache,
                        )
                    });
                    (moved, cache, build, wanted)
                })
                .await;
                match built {
                    Ok((back, cache, build, wanted)) => {
                        index = back;
                        imports_decoded = cache;
                        if let Some(wanted) = wanted {
                            clusterset.send_if_modified(|c| {
                                let changed = c.as_deref() != Some(&wanted);
                                if changed {
                                    *c = Some(Arc::new(wanted));
                                }
                                changed
                            });
                        }
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
                        .filter(|i| merge::CONFLICT_REASONS.contains(&i.reason))
                        .count() as i64,
                );
                // Logged once per cause, not on every rebuild.
                signals.skipped(&build.invalid);
                signals.clusterset_issues(&build.issues);
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
    use crate::snapshot::View;
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

    /// The key of the one slice of Service `s{i}` in [`source`].
    fn slice_key(i: usize) -> crate::source::SliceKey {
        (
            ServiceKey::new("default", "ns", format!("s{i}")),
            format!("s{i}-1"),
        )
    }

    /// Name -> content version of every resource.
    fn versions(snap: &Snapshot) -> Vec<(String, String)> {
        snap.resources
            .iter()
            .map(|(n, r)| (n.to_string(), r.version.clone()))
            .collect()
    }

    #[test]
    fn an_endpoint_change_is_patched_in_as_a_full_build_would_make_it() {
        let mut idx = index();
        let mut state = source(50);
        let first = build(&mut idx, &[("t", &state)], 1);
        assert!(!first.patched, "the first build is a full one");
        let first = first.snapshot.expect("first snapshot");

        // An endpoint moves: patched, and the same as a fresh index makes it.
        state.slices.modify(&slice_key(7), |s| {
            s.slice.endpoints[0].addresses = vec!["10.244.9.9".parse().expect("ip")];
        });
        let b = build(&mut idx, &[("t", &state)], 2);
        assert!(b.patched, "an endpoint change is patched in");
        let second = b.snapshot.expect("a change");
        let fresh = build(&mut index(), &[("t", &state)], 2)
            .snapshot
            .expect("a snapshot");
        assert_eq!(versions(&second), versions(&fresh));
        for (name, r) in &second.resources {
            let same = Arc::ptr_eq(r, &first.resources[name]);
            assert_eq!(same, &**name != "default/ns/s7", "{name}");
        }
        let delta = second.delta_from(&first, &View::Agent("default".into()));
        let changed: Vec<&str> = delta.changed.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(changed, ["default/ns/s7"]);
        assert!(delta.removed.is_empty());

        // An endpoint without addresses makes its Service invalid: it leaves
        // the snapshot with an error naming the field, and comes back.
        state
            .slices
            .modify(&slice_key(3), |s| s.slice.endpoints[0].addresses.clear());
        let b = build(&mut idx, &[("t", &state)], 3);
        assert!(b.patched);
        let third = b.snapshot.expect("a change");
        assert!(!third.resources.contains_key("default/ns/s3"));
        assert_eq!(b.invalid.len(), 1, "{:?}", b.invalid);
        assert_eq!(b.invalid[0].field, "endpoints[0].addresses");
        assert_eq!(b.services.len(), 49);
        let delta = third.delta_from(&second, &View::Agent("default".into()));
        assert_eq!(delta.removed, vec![Arc::<str>::from("default/ns/s3")]);
        state.slices.modify(&slice_key(3), |s| {
            s.slice.endpoints[0].addresses = vec!["10.244.0.4".parse().expect("ip")];
        });
        let b = build(&mut idx, &[("t", &state)], 4);
        assert!(b.patched && b.invalid.is_empty() && b.services.len() == 50);
        let fourth = b.snapshot.expect("a change");
        assert_eq!(
            fourth.resources["default/ns/s3"].version,
            first.resources["default/ns/s3"].version
        );

        // A removed slice, and a slice of a Service no source has: patched.
        state.slices.remove(&slice_key(9));
        state.slices.push(Arc::new(SourceSlice {
            service: ServiceKey::new("default", "ns", "nobody"),
            ..(**state.slices.get(&slice_key(1)).expect("a slice")).clone()
        }));
        let b = build(&mut idx, &[("t", &state)], 5);
        assert!(b.patched);
        let fifth = b.snapshot.expect("a change");
        let fresh = build(&mut index(), &[("t", &state)], 5)
            .snapshot
            .expect("a snapshot");
        assert_eq!(versions(&fifth), versions(&fresh));

        // A Service change takes the full build.
        let key = ServiceKey::new("default", "ns", "s2");
        state.services.modify(&key, |s| s.ports[0].port = 81);
        let b = build(&mut idx, &[("t", &state)], 6);
        assert!(!b.patched, "a Service change is a full build");
        assert_eq!(
            versions(&b.snapshot.expect("a change")),
            versions(
                &build(&mut index(), &[("t", &state)], 6)
                    .snapshot
                    .expect("a snapshot")
            )
        );
    }

    /// While a build runs, a source publishes without waiting for it and the
    /// runtime thread stays free: the build holds no source's lock and runs
    /// off the runtime (this test runs on a one-thread runtime).
    #[tokio::test]
    async fn a_build_holds_no_source_lock_and_no_runtime_thread() {
        let (tx, rx) = watch::channel(source(10));
        let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
        let (go_tx, go) = std::sync::mpsc::channel::<()>();
        let go = Arc::new(std::sync::Mutex::new(go));
        let builds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // Set when the held build was let go by the test, not by its timeout:
        // a build on the runtime thread would stall the test until then.
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hook: BuildHook = {
            let (builds, released) = (builds.clone(), released.clone());
            Arc::new(move || {
                // The second build (after the first change) waits for the test.
                if builds.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                    started_tx.send(()).expect("test alive");
                    let go = go
                        .lock()
                        .expect("lock")
                        .recv_timeout(std::time::Duration::from_secs(30));
                    released.store(go.is_ok(), std::sync::atomic::Ordering::SeqCst);
                }
            })
        };
        let (snap_tx, mut snaps) = watch::channel(None);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_with(
            IndexConfig::in_memory("10.96.0.0/16".parse().expect("cidr")),
            vec![SourceFeed {
                name: "t".into(),
                cluster: "default".into(),
                state: rx,
            }],
            Outputs {
                snapshots: snap_tx,
                clusterset: watch::Sender::new(None),
            },
            Arc::new(Status::default()),
            Arc::new(Metrics::default()),
            shutdown.clone(),
            Some(hook),
        ));
        let wait = std::time::Duration::from_secs(10);
        tokio::time::timeout(wait, snaps.wait_for(Option::is_some))
            .await
            .expect("a first snapshot within 10 s")
            .expect("index alive");
        tx.send_modify(|s| {
            s.slices.modify(&slice_key(1), |s| {
                s.slice.endpoints[0].addresses = vec!["10.244.7.7".parse().expect("ip")];
            });
        });
        // This one-thread runtime goes on while the build waits in the hook.
        tokio::time::timeout(wait, started.recv())
            .await
            .expect("the runtime thread is free while a build runs")
            .expect("hook alive");
        // A source publishing meanwhile does not wait for the build.
        let publisher = std::thread::spawn(move || {
            tx.send_modify(|s| {
                s.slices.modify(&slice_key(2), |s| {
                    s.slice.endpoints[0].addresses = vec!["10.244.8.8".parse().expect("ip")];
                });
            });
            tx
        });
        let deadline = Instant::now() + wait;
        while !publisher.is_finished() {
            assert!(
                Instant::now() < deadline,
                "a source could not publish while a build ran"
            );
            tokio::task::yield_now().await;
        }
        let _tx = publisher.join().expect("publisher");
        go_tx.send(()).expect("hook waiting");
        // Both changes arrive, the second by the build after the held one.
        let both = |s: &Option<Arc<Snapshot>>| {
            s.as_ref().is_some_and(|s| {
                let has = |name: &str, ip: &str| {
                    switchyard_proto::convert::decode_state_bytes(
                        name,
                        &s.resources[name].service_state,
                    )
                    .expect("decodes")
                    .slices[0]
                        .endpoints[0]
                        .addresses[0]
                        .to_string()
                        == ip
                };
                has("default/ns/s1", "10.244.7.7") && has("default/ns/s2", "10.244.8.8")
            })
        };
        tokio::time::timeout(wait, snaps.wait_for(both))
            .await
            .expect("both changes published within 10 s")
            .expect("index alive");
        assert!(
            released.load(std::sync::atomic::Ordering::SeqCst),
            "the held build was released by its timeout: the test could not run while it was held"
        );
        shutdown.cancel();
        task.await.expect("index task");
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

        state.slices.modify(&slice_key(7), |s| {
            s.slice.endpoints[0].addresses = vec!["10.244.9.9".parse().expect("ip")];
        });
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
        let key = files.services.first().expect("a Service").key.clone();
        let docker = SourceState {
            synced: true,
            slices: [Arc::new(SourceSlice {
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
            })]
            .into_iter()
            .collect(),
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
        assert_eq!(build.services.values().next().expect("one").endpoints, 2);
        assert_eq!(
            build.services.values().next().expect("one").ready_endpoints,
            2
        );
    }

    /// `source(1)` moved into cluster `cluster`, exporting its Service.
    fn exporting(cluster: &str, endpoint: &str, created: i64) -> SourceState {
        let mut st = source(1);
        let key = ServiceKey::new(cluster, "ns", "s0");
        // Keys change: the objects go in again under their new keys.
        let mut svc = (**st.services.first().expect("a Service")).clone();
        let mut slice = (**st.slices.first().expect("a slice")).clone();
        svc.key = key.clone();
        slice.service = key.clone();
        slice.slice.endpoints[0].addresses = vec![endpoint.parse().expect("ip")];
        st.services = [Arc::new(svc)].into_iter().collect();
        st.slices = [Arc::new(slice)].into_iter().collect();
        st.exports.push(crate::source::Export {
            key,
            created_unix: Some(created),
            exported: Default::default(),
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
            .values()
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

    /// Builds the clusterset of `east` and `west` (sources `kube=east` and
    /// `kube=west`), with the exports of the `dropped` clusters left out.
    fn build_two(
        idx: &mut Index,
        east: &SourceState,
        west: &SourceState,
        dropped: &[&str],
        at: i64,
    ) -> Build {
        let inputs = [
            Input {
                name: "kube=east",
                cluster: "east",
                state: east,
            },
            Input {
                name: "kube=west",
                cluster: "west",
                state: west,
            },
        ];
        let mut serving = Serving::all(&inputs);
        serving.dropped = dropped.iter().map(|c| (*c).to_owned()).collect();
        idx.build(&inputs, &serving, at)
    }

    /// `b` patched the last build into `snap`, and a fresh index's full
    /// build of the same inputs makes the same: resources (the imports with
    /// their endpoints and ClusterSet IPs), clusterset issues, invalid
    /// objects, `/status` lines and exported names.
    fn assert_patched_as_fresh(
        b: &Build,
        snap: &Snapshot,
        east: &SourceState,
        west: &SourceState,
        dropped: &[&str],
    ) {
        assert!(b.patched, "patched");
        let fresh = build_two(&mut index(), east, west, dropped, 0);
        assert!(!fresh.patched);
        let fresh_snap = fresh.snapshot.expect("a first snapshot");
        assert_eq!(versions(snap), versions(&fresh_snap));
        for (name, r) in &fresh_snap.resources {
            assert_eq!(**r, *snap.resources[name], "{name}");
        }
        assert_eq!(b.issues, fresh.issues);
        assert_eq!(b.imports, fresh.imports);
        assert_eq!(b.invalid, fresh.invalid);
        assert_eq!(b.services, fresh.services);
        assert_eq!(snap.exported, fresh_snap.exported);
    }

    /// The import `clusterset/ns/<service>` of `snap`: its ClusterSet IPs
    /// and each slice's cluster with its endpoints' addresses.
    fn import_of(snap: &Snapshot, service: &str) -> (Vec<IpAddr>, Vec<(String, Vec<IpAddr>)>) {
        let name = format!("clusterset/ns/{service}");
        let state = switchyard_proto::convert::decode_state_bytes(
            &name,
            &snap.resources[name.as_str()].service_state,
        )
        .expect("an import");
        let mut slices: Vec<(String, Vec<IpAddr>)> = state
            .slices
            .iter()
            .map(|s| {
                let addresses = s.endpoints.iter().flat_map(|e| e.addresses.clone());
                (s.cluster.clone().unwrap_or_default(), addresses.collect())
            })
            .collect();
        slices.sort();
        (state.service.cluster_ips, slices)
    }

    /// The key of `cluster`'s one slice of Service `s0`, as [`exporting`] makes it.
    fn exported_slice(cluster: &str) -> crate::source::SliceKey {
        (ServiceKey::new(cluster, "ns", "s0"), "s0-1".to_owned())
    }

    fn set_endpoint(state: &mut SourceState, cluster: &str, addresses: &[&str]) {
        state.slices.modify(&exported_slice(cluster), |s| {
            s.slice.endpoints[0].addresses =
                addresses.iter().map(|a| a.parse().expect("ip")).collect();
        });
    }

    #[test]
    fn an_endpoint_change_of_an_exported_service_patches_its_import() {
        let mut idx = index();
        let mut east = exporting("east", "10.1.0.1", 20);
        let mut west = exporting("west", "10.2.0.1", 10);
        // Issues: east's session affinity disagrees with the older export
        // (west's), and east exports a Service it does not have.
        east.services
            .modify(&ServiceKey::new("east", "ns", "s0"), |s| {
                s.session_affinity_timeout = Some(60);
            });
        east.exports.push(crate::source::Export {
            key: ServiceKey::new("east", "ns", "ghost"),
            created_unix: Some(5),
            exported: Default::default(),
        });
        // A second exported Service, whose import must not move.
        let other = exporting("west", "10.2.0.9", 10);
        let svc = other.services.first().expect("a Service");
        let slice = other.slices.first().expect("a slice");
        let key = ServiceKey::new("west", "ns", "s1");
        west.services.push(Arc::new(Service {
            key: key.clone(),
            ..(**svc).clone()
        }));
        west.slices.push(Arc::new(SourceSlice {
            service: key.clone(),
            ..(**slice).clone()
        }));
        west.exports.push(crate::source::Export {
            key,
            created_unix: Some(10),
            exported: Default::default(),
        });
        let first = build_two(&mut idx, &east, &west, &[], 1);
        assert!(!first.patched);
        let reasons: Vec<(&str, &str)> = first
            .issues
            .iter()
            .map(|i| (i.cluster.as_str(), i.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("east", merge::NO_SERVICE),
                ("west", merge::SESSION_AFFINITY_CONFLICT),
                ("east", merge::SESSION_AFFINITY_CONFLICT)
            ]
        );
        let first = first.snapshot.expect("a first snapshot");
        let (ip, _) = import_of(&first, "s0");
        assert_eq!(ip.len(), 1);

        // East's endpoint moves: patched into east's Service and the import.
        set_endpoint(&mut east, "east", &["10.1.0.7"]);
        let b = build_two(&mut idx, &east, &west, &[], 2);
        let snap = b.snapshot.clone().expect("a change");
        assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
        let ep = |a: &str| a.parse::<IpAddr>().expect("ip");
        assert_eq!(
            import_of(&snap, "s0"),
            (
                ip.clone(),
                vec![
                    ("east".to_owned(), vec![ep("10.1.0.7")]),
                    ("west".to_owned(), vec![ep("10.2.0.1")]),
                ]
            )
        );
        assert_eq!(b.issues.len(), 3, "{:?}", b.issues);
        assert!(Arc::ptr_eq(
            &snap.resources["clusterset/ns/s1"],
            &first.resources["clusterset/ns/s1"]
        ));
        let delta = snap.delta_from(&first, &View::Agent("east".into()));
        let mut changed: Vec<&str> = delta.changed.iter().map(|r| r.name.as_str()).collect();
        changed.sort_unstable();
        assert_eq!(changed, ["clusterset/ns/s0", "east/ns/s0"]);

        // West's (the oldest export's) too.
        set_endpoint(&mut west, "west", &["10.2.0.8", "10.2.0.9"]);
        let b = build_two(&mut idx, &east, &west, &[], 3);
        let snap = b.snapshot.clone().expect("a change");
        assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
        assert_eq!(import_of(&snap, "s0").1[1].1.len(), 2);
        assert_eq!(import_of(&snap, "s0").0, ip);

        // East's Service made invalid: its disagreement goes with it, the
        // merge's issue stays; and both come back with it.
        set_endpoint(&mut east, "east", &[]);
        let b = build_two(&mut idx, &east, &west, &[], 4);
        let snap = b.snapshot.clone().expect("a change");
        assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
        let reasons: Vec<&str> = b.issues.iter().map(|i| i.reason).collect();
        assert_eq!(reasons, [merge::NO_SERVICE]);
        set_endpoint(&mut east, "east", &["10.1.0.1"]);
        let b = build_two(&mut idx, &east, &west, &[], 5);
        let snap = b.snapshot.clone().expect("a change");
        assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
        let reasons: Vec<&str> = b.issues.iter().map(|i| i.reason).collect();
        assert_eq!(
            reasons,
            [
                merge::NO_SERVICE,
                merge::SESSION_AFFINITY_CONFLICT,
                merge::SESSION_AFFINITY_CONFLICT
            ]
        );
    }

    /// With more imports than ClusterSet IPs, an import that leaves frees
    /// an address another one was waiting for: the patch cannot tell that
    /// one's resource, so the full build runs. Once the ServiceImports
    /// record it, the one that comes back waits, patched, with the issue a
    /// full build reports; without the record, the set of imports decides.
    #[test]
    fn an_import_waiting_for_a_clusterset_ip_takes_the_full_build() {
        let mut config = IndexConfig::in_memory("10.96.0.0/16".parse().expect("cidr"));
        // Five addresses (offsets 2 to 6) for six imports.
        config.clusterset_cidrs = vec!["10.112.0.0/29".parse().expect("cidr")];
        let mut idx = Index::new(&config);
        let mut state = source(6);
        state.exports = state
            .services
            .iter()
            .map(|s| crate::source::Export {
                key: s.key.clone(),
                created_unix: Some(1),
                exported: Default::default(),
            })
            .collect();
        let waiting = |b: &Build| -> Vec<String> {
            b.issues
                .iter()
                .filter(|i| i.reason == merge::NO_CLUSTERSET_IP)
                .map(|i| i.service.clone())
                .collect()
        };
        let first = build(&mut idx, &[("t", &state)], 1);
        let [waits] = waiting(&first)
            .try_into()
            .expect("one import without an address");
        let waits = waits.strip_prefix("ns/").expect("ns/").to_owned();
        let snap = first.snapshot.expect("a first snapshot");
        assert!(
            !snap
                .resources
                .contains_key(format!("clusterset/ns/{waits}").as_str())
        );
        let leaves = if waits == "s0" { 1 } else { 0 };

        state.slices.modify(&slice_key(leaves), |s| {
            s.slice.endpoints[0].addresses.clear()
        });
        let b = build(&mut idx, &[("t", &state)], 2);
        assert!(!b.patched, "another import's address moved: a full build");
        assert!(waiting(&b).is_empty(), "{:?}", b.issues);
        let snap = b.snapshot.expect("a change");
        assert!(
            snap.resources
                .contains_key(format!("clusterset/ns/{waits}").as_str())
        );
        assert!(
            !snap
                .resources
                .contains_key(format!("clusterset/ns/s{leaves}").as_str())
        );

        let back = |state: &mut SourceState| {
            state.slices.modify(&slice_key(leaves), |s| {
                s.slice.endpoints[0].addresses =
                    vec![format!("10.244.0.{}", leaves + 1).parse().expect("ip")];
            });
        };
        // Without a record: the same six imports, the same answer as the
        // first build, whatever happened in between.
        let mut unrecorded = state.clone();
        back(&mut unrecorded);
        let mut replica = Index::new(&config);
        build(&mut replica, &[("t", &state)], 2);
        let b = build(&mut replica, &[("t", &unrecorded)], 3);
        assert_eq!(waiting(&b), [format!("ns/{waits}")]);

        // The writer records the addresses in the ServiceImports.
        state.service_imports = recorded(&snap);
        let b = build(&mut idx, &[("t", &state)], 3);
        assert!(!b.patched, "the record changed: a full build");
        assert!(b.snapshot.is_none(), "the record is what was served");
        back(&mut state);
        let b = build(&mut idx, &[("t", &state)], 4);
        assert!(b.patched, "the one that came back waits: patched");
        assert_eq!(waiting(&b), [format!("ns/s{leaves}")]);
        let snap = b.snapshot.expect("a change");
        assert!(
            snap.resources
                .contains_key(format!("default/ns/s{leaves}").as_str())
        );
        assert!(
            !snap
                .resources
                .contains_key(format!("clusterset/ns/s{leaves}").as_str())
        );
        assert!(
            snap.resources
                .contains_key(format!("clusterset/ns/{waits}").as_str())
        );
        assert_eq!(
            snap.resources
                .keys()
                .filter(|n| n.starts_with("clusterset/"))
                .count(),
            5
        );
        // A replica that starts now reads the record and agrees.
        let fresh = build(&mut Index::new(&config), &[("t", &state)], 4);
        assert_eq!(
            versions(&fresh.snapshot.expect("a first snapshot")),
            versions(&snap)
        );
    }

    /// The cluster IPs of every Service of `snap`, by name.
    fn cluster_ips(snap: &Snapshot) -> BTreeMap<String, Vec<IpAddr>> {
        snap.resources
            .iter()
            .map(|(n, r)| {
                let state = switchyard_proto::convert::decode_state_bytes(n, &r.service_state)
                    .expect("decodes");
                (n.to_string(), state.service.cluster_ips)
            })
            .collect()
    }

    #[test]
    fn cluster_ips_are_a_function_of_the_services_not_of_what_an_index_saw() {
        let all = source(60);
        let mut fewer = all.clone();
        for i in 40..60 {
            fewer
                .services
                .remove(&ServiceKey::new("default", "ns", format!("s{i}")));
        }
        let mut other = all.clone();
        for i in (0..60).step_by(3) {
            other
                .services
                .remove(&ServiceKey::new("default", "ns", format!("s{i}")));
        }
        // One index sees 40 Services, then 60, then every third one goes;
        // another starts with the last set.
        let mut seen = index();
        let first = cluster_ips(
            &build(&mut seen, &[("t", &fewer)], 1)
                .snapshot
                .expect("a snapshot"),
        );
        let grown = cluster_ips(
            &build(&mut seen, &[("t", &all)], 2)
                .snapshot
                .expect("a change"),
        );
        let last = cluster_ips(
            &build(&mut seen, &[("t", &other)], 3)
                .snapshot
                .expect("a change"),
        );
        let fresh = cluster_ips(
            &build(&mut index(), &[("t", &other)], 3)
                .snapshot
                .expect("a snapshot"),
        );
        assert_eq!(last, fresh, "two replicas agree whatever they saw before");
        // And here nobody moved while others came and went (no two of these
        // names hash onto neighbouring addresses of the /16).
        for (name, ips) in &first {
            assert_eq!(grown.get(name), Some(ips), "{name}");
            assert_eq!(ips.len(), 1);
        }
        for (name, ips) in &last {
            assert_eq!(grown.get(name), Some(ips), "{name}");
        }
    }

    /// `source(n)` with Service `s{i}` asking for `families` under `policy`.
    fn asking(
        state: &mut SourceState,
        i: usize,
        families: &[IpFamily],
        policy: Option<switchyard_model::IpFamilyPolicy>,
    ) {
        state
            .services
            .modify(&ServiceKey::new("default", "ns", format!("s{i}")), |s| {
                s.requested_ip_families = families.to_vec();
                s.ip_family_policy = policy;
            });
    }

    #[test]
    fn each_service_gets_an_address_of_each_family_it_asks_for() {
        use IpFamily::{V4, V6};
        use switchyard_model::IpFamilyPolicy::{PreferDualStack, RequireDualStack, SingleStack};
        let mut state = source(5);
        asking(&mut state, 1, &[V6], Some(SingleStack));
        asking(&mut state, 2, &[], Some(PreferDualStack));
        asking(&mut state, 3, &[V6, V4], Some(RequireDualStack));
        asking(&mut state, 4, &[V6], None);
        let v4: IpNet = "10.96.0.0/16".parse().expect("cidr");
        let v6: IpNet = "fd00:96::/112".parse().expect("cidr");
        let mut config = IndexConfig::in_memory(v4);
        config.service_cidrs = vec![v4, v6];
        let b = build(&mut Index::new(&config), &[("t", &state)], 1);
        assert!(b.invalid.is_empty(), "{:?}", b.invalid);
        let ips = cluster_ips(&b.snapshot.expect("a snapshot"));
        let families = |i: usize| -> Vec<IpFamily> {
            let ips = &ips[&format!("default/ns/s{i}")];
            for ip in ips {
                assert!(v4.contains(ip) || v6.contains(ip), "{ip}");
            }
            ips.iter().map(IpFamily::of).collect()
        };
        assert_eq!(families(0), [V4], "the default: the first range's family");
        assert_eq!(families(1), [V6]);
        assert_eq!(families(2), [V4, V6]);
        assert_eq!(families(3), [V6, V4]);
        assert_eq!(families(4), [V6]);

        // On an IPv4-only control plane: PreferDualStack is IPv4, the rest
        // are refused with the field at fault.
        let b = build(&mut index(), &[("t", &state)], 1);
        let refused: Vec<(&str, &str)> = b
            .invalid
            .iter()
            .map(|e| (e.object.as_str(), e.field.as_str()))
            .collect();
        assert_eq!(
            refused,
            [
                ("Service ns/s1", "spec.ipFamilies[0]"),
                ("Service ns/s3", "spec.ipFamilies[0]"),
                ("Service ns/s4", "spec.ipFamilies[0]"),
            ]
        );
        assert!(
            b.invalid[0]
                .message
                .contains("--service-cidr has no IPv6 range")
        );
        asking(&mut state, 3, &[V4, V6], Some(RequireDualStack));
        let b = build(&mut index(), &[("t", &state)], 1);
        assert!(
            b.invalid
                .iter()
                .any(|e| e.object == "Service ns/s3" && e.field == "spec.ipFamilies[1]"),
            "{:?}",
            b.invalid
        );
        let ips = cluster_ips(&b.snapshot.expect("a snapshot"));
        assert_eq!(
            ips["default/ns/s2"].len(),
            1,
            "PreferDualStack on IPv4 only"
        );
    }

    /// `exporting(..)` with the Service's cluster IPs set to `ips`.
    fn exporting_with(cluster: &str, created: i64, ips: &[&str]) -> SourceState {
        let mut st = exporting(cluster, "10.1.0.1", created);
        st.services
            .modify(&ServiceKey::new(cluster, "ns", "s0"), |s| {
                s.cluster_ips = ips.iter().map(|ip| ip.parse().expect("ip")).collect();
            });
        st
    }

    #[test]
    fn an_import_gets_a_clusterset_ip_of_each_family_its_exports_have() {
        use IpFamily::{V4, V6};
        let v4: IpNet = "10.112.0.0/16".parse().expect("cidr");
        let v6: IpNet = "fd00:112::/112".parse().expect("cidr");
        let mut dual = IndexConfig::in_memory("10.96.0.0/16".parse().expect("cidr"));
        dual.clusterset_cidrs = vec![v4, v6];
        type Case<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [IpFamily]);
        let cases: [Case<'_>; 4] = [
            ("IPv6 only", &["fd00:96::5"], &["fd00:96::6"], &[V6]),
            (
                "dual-stack",
                &["10.96.0.5", "fd00:96::5"],
                &["10.96.0.6", "fd00:96::6"],
                &[V4, V6],
            ),
            (
                "IPv6 primary",
                &["fd00:96::5", "10.96.0.5"],
                &["10.96.0.6", "fd00:96::6"],
                &[V6, V4],
            ),
            (
                "narrowed",
                &["10.96.0.5", "fd00:96::5"],
                &["10.96.0.6"],
                &[V4],
            ),
        ];
        for (what, west_ips, east_ips, want) in cases {
            let west = exporting_with("west", 10, west_ips);
            let east = exporting_with("east", 20, east_ips);
            let b = build_two(&mut Index::new(&dual), &east, &west, &[], 1);
            assert!(b.issues.is_empty(), "{what}: {:?}", b.issues);
            let (ips, _) = import_of(&b.snapshot.expect("a snapshot"), "s0");
            let families: Vec<IpFamily> = ips.iter().map(IpFamily::of).collect();
            assert_eq!(families, want, "{what}");
            assert!(
                ips.iter().all(|ip| v4.contains(ip) || v6.contains(ip)),
                "{what}"
            );
        }
        // An IPv6-only import on a control plane with an IPv4 clusterset
        // range only: no ClusterSet IP, said.
        let west = exporting_with("west", 10, &["fd00:96::5"]);
        let east = exporting_with("east", 20, &["fd00:96::6"]);
        let b = build_two(&mut index(), &east, &west, &[], 1);
        let snap = b.snapshot.expect("a snapshot");
        assert!(!snap.resources.contains_key("clusterset/ns/s0"));
        assert_eq!(b.issues.len(), 1, "{:?}", b.issues);
        assert_eq!(b.issues[0].reason, merge::NO_CLUSTERSET_IP);
        assert!(
            b.issues[0].message.contains("no --clusterset-cidr of IPv6"),
            "{:?}",
            b.issues
        );
    }

    #[test]
    fn the_serviceimports_record_is_kept_and_clusters_that_disagree_are_named() {
        use crate::source::RecordedImport;
        let record = |ips: &[&str], ours: bool| RecordedImport {
            namespace: "ns".into(),
            name: "s0".into(),
            ips: ips.iter().map(|ip| ip.parse().expect("ip")).collect(),
            ours,
        };
        let mut east = exporting("east", "10.1.0.1", 20);
        let mut west = exporting("west", "10.2.0.1", 10);
        let bare = build_two(&mut index(), &east, &west, &[], 1);
        let (allocated, _) = import_of(&bare.snapshot.expect("a snapshot"), "s0");
        // Another manager's ServiceImport and an address outside the range
        // are not the record.
        east.service_imports = vec![record(&["10.112.0.77"], false)];
        west.service_imports = vec![record(&["192.0.2.1"], true)];
        let b = build_two(&mut index(), &east, &west, &[], 1);
        assert_eq!(
            import_of(&b.snapshot.expect("a snapshot"), "s0").0,
            allocated
        );
        assert!(b.issues.is_empty(), "{:?}", b.issues);
        // One cluster's record is kept.
        west.service_imports = vec![record(&["10.112.0.9"], true)];
        east.service_imports = Vec::new();
        let b = build_two(&mut index(), &east, &west, &[], 1);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            import_of(&b.snapshot.expect("a snapshot"), "s0").0,
            [ip("10.112.0.9")]
        );
        // Two clusters disagree: a tie goes to the lowest cluster id, and
        // the other is named.
        east.service_imports = vec![record(&["10.112.0.5"], true)];
        let mut idx = index();
        let b = build_two(&mut idx, &east, &west, &[], 1);
        assert_eq!(
            import_of(&b.snapshot.expect("a snapshot"), "s0").0,
            [ip("10.112.0.5")]
        );
        let issues: Vec<(&str, &str)> = b
            .issues
            .iter()
            .map(|i| (i.cluster.as_str(), i.reason))
            .collect();
        assert_eq!(issues, [("west", merge::RECORD_MISMATCH)]);
        assert!(
            b.issues[0].message.contains("records 10.112.0.9"),
            "{:?}",
            b.issues
        );
        // The writer rewrites west's: the issue goes, the address stays.
        west.service_imports = vec![record(&["10.112.0.5"], true)];
        let b = build_two(&mut idx, &east, &west, &[], 2);
        assert!(b.issues.is_empty(), "{:?}", b.issues);
        assert!(b.snapshot.is_none(), "nothing served changed");
    }

    #[test]
    fn a_build_says_what_each_serviceimport_carries() {
        let mut east = exporting("east", "10.1.0.1", 20);
        let mut west = exporting("west", "10.2.0.1", 10);
        west.exports[0]
            .exported
            .labels
            .insert("tier".into(), "web".into());
        east.exports[0]
            .exported
            .labels
            .insert("tier".into(), "api".into());
        east.exports[0]
            .exported
            .annotations
            .insert("note".into(), "east".into());
        let b = build_two(&mut index(), &east, &west, &[], 1);
        let meta = &b.imports[&("ns".to_owned(), "s0".to_owned())];
        assert_eq!(meta.clusters, ["west", "east"]);
        assert_eq!(
            meta.exported, west.exports[0].exported,
            "the oldest export's"
        );
        let reasons: Vec<(&str, &str)> = b
            .issues
            .iter()
            .map(|i| (i.cluster.as_str(), i.reason))
            .collect();
        assert_eq!(
            reasons,
            [
                ("west", merge::LABELS_CONFLICT),
                ("west", merge::ANNOTATIONS_CONFLICT),
                ("east", merge::LABELS_CONFLICT),
                ("east", merge::ANNOTATIONS_CONFLICT),
            ]
        );
    }

    /// The ServiceImports a writer would leave for the imports of `snap`.
    fn recorded(snap: &Snapshot) -> Vec<crate::source::RecordedImport> {
        snap.resources
            .iter()
            .filter(|(n, _)| n.starts_with("clusterset/"))
            .map(|(n, r)| {
                let state = switchyard_proto::convert::decode_state_bytes(n, &r.service_state)
                    .expect("an import");
                crate::source::RecordedImport {
                    namespace: state.service.key.namespace,
                    name: state.service.key.name,
                    ips: state.service.cluster_ips,
                    ours: true,
                }
            })
            .collect()
    }

    #[test]
    fn an_exported_service_made_invalid_by_its_endpoints_changes_its_import_as_a_full_build_would()
    {
        let mut idx = index();
        let mut east = exporting("east", "10.1.0.1", 20);
        let mut west = exporting("west", "10.2.0.1", 10);
        let first = build_two(&mut idx, &east, &west, &[], 1)
            .snapshot
            .expect("a first snapshot");
        let (ip, _) = import_of(&first, "s0");
        assert!(first.exported.contains("east/ns/s0"));

        // An endpoint without addresses: east's Service leaves, and with it
        // east's endpoints from the import and its name from the exported.
        set_endpoint(&mut east, "east", &[]);
        let b = build_two(&mut idx, &east, &west, &[], 2);
        let snap = b.snapshot.clone().expect("a change");
        assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
        assert!(!snap.resources.contains_key("east/ns/s0"));
        assert!(!snap.exported.contains("east/ns/s0"));
        assert_eq!(b.invalid.len(), 1, "{:?}", b.invalid);
        let (now, slices) = import_of(&snap, "s0");
        assert_eq!(now, ip);
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].0, "west");

        // West's too: no exporter is valid, the import leaves.
        set_endpoint(&mut west, "west", &[]);
        let b = build_two(&mut idx, &east, &west, &[], 3);
        let snap = b.snapshot.clone().expect("a change");
        assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
        assert!(!snap.resources.contains_key("clusterset/ns/s0"));
        assert!(b.services.values().all(|s| s.cluster != CLUSTERSET));
        assert!(snap.exported.is_empty());

        // Both come back, and so does the import, with its ClusterSet IP.
        set_endpoint(&mut west, "west", &["10.2.0.1"]);
        let b = build_two(&mut idx, &east, &west, &[], 4);
        let snap = b.snapshot.clone().expect("a change");
        assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
        assert_eq!(import_of(&snap, "s0").0, ip);
        set_endpoint(&mut east, "east", &["10.1.0.1"]);
        let b = build_two(&mut idx, &east, &west, &[], 5);
        let snap = b.snapshot.clone().expect("a change");
        assert_patched_as_fresh(&b, &snap, &east, &west, &[]);
        assert_eq!(versions(&snap), versions(&first));
    }

    #[test]
    fn an_endpoint_change_beside_a_dropped_cluster_patches_the_import_without_it() {
        let mut idx = index();
        let mut east = exporting("east", "10.1.0.1", 20);
        let mut west = exporting("west", "10.2.0.1", 10);
        let first = build_two(&mut idx, &east, &west, &["east"], 1)
            .snapshot
            .expect("a first snapshot");
        let (ip, _) = import_of(&first, "s0");

        // West's endpoint moves: the import has it, and still not east's.
        set_endpoint(&mut west, "west", &["10.2.0.5"]);
        let b = build_two(&mut idx, &east, &west, &["east"], 2);
        let snap = b.snapshot.clone().expect("a change");
        assert_patched_as_fresh(&b, &snap, &east, &west, &["east"]);
        let ep: IpAddr = "10.2.0.5".parse().expect("ip");
        assert_eq!(
            import_of(&snap, "s0"),
            (ip, vec![("west".to_owned(), vec![ep])])
        );

        // East's moves: east's own view changes, the import does not.
        set_endpoint(&mut east, "east", &["10.1.0.5"]);
        let b = build_two(&mut idx, &east, &west, &["east"], 3);
        let next = b.snapshot.clone().expect("a change");
        assert_patched_as_fresh(&b, &next, &east, &west, &["east"]);
        assert!(Arc::ptr_eq(
            &next.resources["clusterset/ns/s0"],
            &snap.resources["clusterset/ns/s0"]
        ));
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
