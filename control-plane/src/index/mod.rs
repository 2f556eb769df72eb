//! The index: merges every source's state into one snapshot.
//!
//! ```text
//!  watch<SourceState> × N ──▶ run (a build as soon as one changes)
//!        ─▶ Index::build ─┬▶ patch: a change of endpoints alone, into the last snapshot
//!                         └▶ full build: merge, cluster IPs, Services, the clusterset's imports
//!        ─▶ Snapshot::from_resources (version moves only with content or readiness)
//!        ─▶ watch<Arc<Snapshot>>
//! ```
//!
//! [`Index`] is the state carried from one build to the next: the caches
//! that make an unchanged Service or import cost a pointer comparison, the
//! address allocators, and what the last build was made from. Its methods
//! are spread over the children by concern, each an `impl Index` of its own:
//!
//! - `full`: the build from scratch: merge, cluster IPs, each Service's
//!   validation and encoding (cached), the snapshot and the build's report;
//! - `patch`: a change of endpoints alone, patched into the last build;
//! - `imports`: the clusterset's imports (merged from the exports, or taken
//!   from a hub by a relay) and their ClusterSet IPs;
//! - `run`: the task that follows the sources, builds and publishes.
//!
//! A rebuild that changes nothing keeps the version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use ipnet::IpNet;
use switchyard_model::{CLUSTERSET, IpFamily, ServiceKey, ServiceState};

use crate::config::ClusterDown;
use crate::ipam::Ranges;
use crate::merge::{ClustersetIssue, Input};
use crate::snapshot::{Snapshot, VersionSource};
use crate::source::ObjectError;
use crate::status::ServiceSummary;

mod full;
mod imports;
mod patch;
mod run;
#[cfg(test)]
mod tests;

use full::{Built, Encoded, FamilyAllocator};
use imports::{BuiltImport, Records};
pub use imports::{ImportMeta, ImportMetas};
use patch::LastBuild;
pub use run::{Outputs, SourceFeed, run, unix_nanos};

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
}
