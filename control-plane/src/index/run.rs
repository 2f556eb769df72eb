//! The index's task: follows every source, builds, and publishes.
//!
//! ```text
//!  watch<SourceState> × N ──▶ (a build as soon as one changes) ──▶ Index::build
//!        ─▶ watch<Arc<Snapshot>> (+ what the ServiceImports should hold, crate::mcs)
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
//! build runs makes one more build right after it.
//!
//! Every source's channel wakes one shared `Notify`, so a burst leaves one
//! wake-up and no state is cloned until a build starts; then each source's
//! state is copied out of its channel (a reference count per object) and
//! the build runs on the blocking pool, so a source publishing meanwhile
//! never waits for a build and no runtime thread is held by one. Each
//! source belongs to one cluster (`--source SPEC=CLUSTER`, else
//! `--cluster`). The snapshot carries the set of ready clusters
//! (`Snapshot::ready`): a change of readiness alone is a new version, and a
//! stream sends nothing to an agent whose cluster is not ready yet.
//! `/readyz` and gRPC health turn SERVING once every source has synced.
//! `--cluster-down drop-after=D` leaves out the exports of a cluster whose
//! sources have all failed for D (a timer wakes the index, `ClusterHealth`);
//! `keep`, the default, keeps the last known endpoints.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use switchyard_model::CLUSTERSET;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Index, IndexConfig, Serving};
use crate::config::ClusterDown;
use crate::merge::{self, Input};
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::source::SourceState;
use crate::status::{ClusterStatus, SourceStatus, Status};

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
pub(super) type BuildHook = Arc<dyn Fn() + Send + Sync>;

pub(super) async fn run_with(
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
