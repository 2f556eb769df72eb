//! The index: merges every source's state into one snapshot.
//!
//! ```text
//!  watch<SourceState> × N ──▶ debounce ──▶ merge ─▶ allocate IPs ─▶ group slices
//!                                          ─▶ validate ─▶ Snapshot::next ─▶ watch<Arc<Snapshot>>
//! ```
//!
//! The first snapshot is published only after every source has synced, so
//! an agent never receives a partial view that a later sync would have to
//! repair. After that, a burst of changes within the debounce window (capped
//! at `max_delay`) becomes one snapshot; a rebuild that changes nothing keeps
//! the version.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use switchyard_model::{ServiceKey, ServiceState};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ipam::ClusterIpAllocator;
use crate::metrics::Metrics;
use crate::snapshot::{Snapshot, VersionSource};
use crate::source::{ObjectError, SourceState};
use crate::status::{SourceStatus, Status};

/// How the index builds snapshots.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// Ranges for cluster IPs of Services that name none, at most one per family.
    pub service_cidrs: Vec<IpNet>,
    /// Quiet time that ends a burst of changes.
    pub debounce: Duration,
    /// Longest a burst may delay a snapshot.
    pub max_delay: Duration,
    /// Where allocated cluster IPs are remembered; `None` keeps them in memory.
    pub state_dir: Option<PathBuf>,
}

/// The merging state carried between builds.
#[derive(Debug)]
pub struct Index {
    allocators: Vec<ClusterIpAllocator>,
    versions: VersionSource,
    current: Arc<Snapshot>,
}

/// What one build produced.
#[derive(Debug)]
pub struct Build {
    /// The new snapshot, if the content changed.
    pub snapshot: Option<Arc<Snapshot>>,
    /// Objects skipped, with the reason.
    pub invalid: Vec<ObjectError>,
}

impl Index {
    /// A fresh index.
    pub fn new(config: &IndexConfig) -> Self {
        let allocators = config
            .service_cidrs
            .iter()
            .map(|range| {
                let file = config.state_dir.as_ref().map(|d| {
                    d.join(format!(
                        "cluster-ips-{}.json",
                        range.to_string().replace(['/', ':'], "_")
                    ))
                });
                ClusterIpAllocator::new(*range, file)
            })
            .collect();
        let versions = VersionSource::new();
        Self {
            allocators,
            versions,
            current: Arc::new(Snapshot::empty(String::new())),
        }
    }

    /// Builds the next snapshot from every source's state (in source order:
    /// the first source to name an object wins).
    pub fn build(
        &mut self,
        sources: &[(String, SourceState)],
        changed_at_unix_nanos: i64,
    ) -> Build {
        let mut invalid: Vec<ObjectError> = Vec::new();
        let mut services: BTreeMap<ServiceKey, (usize, switchyard_model::Service)> =
            BTreeMap::new();
        for (i, (name, state)) in sources.iter().enumerate() {
            invalid.extend(state.errors.iter().cloned());
            for svc in &state.services {
                if let Some((first, _)) = services.get(&svc.key) {
                    invalid.push(ObjectError {
                        source: name.clone(),
                        object: svc.object_name(),
                        field: String::new(),
                        message: format!("also defined by {}; that one is used", sources[*first].0),
                    });
                    continue;
                }
                services.insert(svc.key.clone(), (i, svc.clone()));
            }
        }

        self.allocate_cluster_ips(&mut services, sources, &mut invalid);

        let mut slices: HashMap<&ServiceKey, Vec<switchyard_model::EndpointSlice>> = HashMap::new();
        for (_, state) in sources {
            for s in &state.slices {
                if services.contains_key(&s.service) {
                    slices.entry(&s.service).or_default().push(s.slice.clone());
                }
            }
        }
        let mut states = Vec::with_capacity(services.len());
        for (key, (src, service)) in &services {
            let mut state = ServiceState {
                service: service.clone(),
                slices: slices.remove(key).unwrap_or_default(),
            };
            state.normalize();
            match state.validate() {
                Ok(()) => states.push(state),
                Err(errs) => invalid.extend(errs.0.into_iter().map(|e| ObjectError {
                    source: sources[*src].0.clone(),
                    object: e.object,
                    field: e.field,
                    message: e.message,
                })),
            }
        }

        let snapshot = Snapshot::next(
            &self.current,
            states,
            &mut self.versions,
            changed_at_unix_nanos,
        )
        .map(Arc::new);
        if let Some(s) = &snapshot {
            self.current = s.clone();
        }
        Build { snapshot, invalid }
    }

    /// Gives each proxied Service without an address one from the range of
    /// the cluster's primary family; conflicting explicit addresses make the
    /// later Service (in key order) invalid.
    fn allocate_cluster_ips(
        &mut self,
        services: &mut BTreeMap<ServiceKey, (usize, switchyard_model::Service)>,
        sources: &[(String, SourceState)],
        invalid: &mut Vec<ObjectError>,
    ) {
        let mut owner: HashMap<(String, IpAddr), ServiceKey> = HashMap::new();
        let mut conflicts = Vec::new();
        for (key, (src, svc)) in services.iter() {
            for ip in &svc.cluster_ips {
                match owner.get(&(key.cluster.clone(), *ip)) {
                    Some(other) => conflicts.push((key.clone(), *src, *ip, other.clone())),
                    None => {
                        owner.insert((key.cluster.clone(), *ip), key.clone());
                    }
                }
            }
        }
        for (key, src, ip, other) in conflicts {
            if let Some((_, svc)) = services.remove(&key) {
                invalid.push(ObjectError {
                    source: sources[src].0.clone(),
                    object: svc.object_name(),
                    field: "spec.clusterIP".into(),
                    message: format!(
                        "{ip} is already used by Service {}/{}",
                        other.namespace, other.name
                    ),
                });
            }
        }
        let Some(alloc) = self.allocators.first_mut() else {
            return;
        };
        let wanting: Vec<ServiceKey> = services
            .iter()
            .filter(|(_, (_, s))| s.wants_cluster_ip() && s.cluster_ips.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        let taken: HashSet<IpAddr> = owner.keys().map(|(_, ip)| *ip).collect();
        for (key, result) in alloc.assign(&wanting, &taken) {
            let Some((src, svc)) = services.get_mut(&key) else {
                continue;
            };
            match result {
                Ok(ip) => svc.cluster_ips.push(ip),
                Err(e) => {
                    let src = *src;
                    let name = svc.object_name();
                    services.remove(&key);
                    invalid.push(ObjectError {
                        source: sources[src].0.clone(),
                        object: name,
                        field: "spec.clusterIP".into(),
                        message: e.to_string(),
                    });
                }
            }
        }
    }
}

/// Runs the index until `shutdown`: rebuilds after each debounced burst of
/// source changes and publishes snapshots whose content changed.
pub async fn run(
    config: IndexConfig,
    sources: Vec<(String, watch::Receiver<SourceState>)>,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut index = Index::new(&config);
    // Each source's watch channel wakes one shared Notify: a burst of
    // changes leaves at most one stored permit, and no state is cloned until
    // the index actually rebuilds.
    let changes = Arc::new(tokio::sync::Notify::new());
    for (_, rx) in &sources {
        let mut rx = rx.clone();
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
    let mut first_change = Some(Instant::now());
    let mut changed_at = unix_nanos();
    loop {
        if let Some(started) = first_change.take() {
            // Debounce: wait for a quiet period, but never past max_delay.
            let deadline = started + config.max_delay;
            loop {
                let quiet = tokio::time::sleep(
                    config
                        .debounce
                        .min(deadline.saturating_duration_since(Instant::now())),
                );
                tokio::select! {
                    _ = quiet => break,
                    _ = changes.notified() => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            let states: Vec<(String, SourceState)> = sources
                .iter()
                .map(|(name, rx)| (name.clone(), rx.borrow().clone()))
                .collect();
            status.set_sources(
                states
                    .iter()
                    .map(|(name, s)| SourceStatus {
                        name: name.clone(),
                        synced: s.synced,
                        last_error: s.last_error.clone(),
                        nodes: s.nodes.clone(),
                    })
                    .collect(),
            );
            if states.iter().all(|(_, s)| s.synced) {
                let t = Instant::now();
                let build = index.build(&states, changed_at);
                metrics
                    .snapshot_build_seconds
                    .observe(t.elapsed().as_secs_f64());
                metrics.invalid_objects.set(build.invalid.len() as i64);
                for e in &build.invalid {
                    tracing::warn!(source = %e.source, object = %e.object, field = %e.field, "skipped: {}", e.message);
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
                        );
                        snapshots.send_replace(Some(snapshot));
                    }
                    None if status.ready() => status.set_invalid(build.invalid),
                    None => {
                        // Every source synced and there is nothing at all: an empty snapshot is still a snapshot.
                        let empty = index.publish_empty();
                        status.set_snapshot(&empty.version, 0, build.invalid);
                        snapshots.send_replace(Some(empty));
                    }
                }
            }
        }
        tokio::select! {
            _ = changes.notified() => {
                first_change = Some(Instant::now());
                changed_at = unix_nanos();
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

impl Index {
    fn publish_empty(&mut self) -> Arc<Snapshot> {
        let s = Arc::new(Snapshot::empty(self.versions_next()));
        self.current = s.clone();
        s
    }

    fn versions_next(&mut self) -> String {
        self.versions.next_version()
    }
}

/// Now, in Unix nanoseconds.
pub fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}
