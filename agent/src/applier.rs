//! Applies states: validate, program the data plane, persist, publish.
//!
//! ```text
//!  update ─▶ decode+validate ─▶ DataPlane::apply ─▶ Store::save ─▶ publish ─▶ ACK
//!               │ error              │ error           │ error
//!               └────────────────────┴─────────────────┴────────▶ NACK, last good state stays
//! ```

use std::sync::{Arc, Mutex};
use std::time::Instant;

use switchyard_proto::v1;
use tokio::sync::watch;

use crate::dataplane::{Change, DataPlane};
use crate::state::{AgentState, ChangeSet};
use crate::status::{Metrics, Origin, Status};
use crate::store::{Loaded, Store};

/// Owns the state in force and everything that must agree with it.
pub struct Applier {
    current: watch::Sender<Arc<AgentState>>,
    store: Arc<Store>,
    dataplane: Arc<Mutex<Box<dyn DataPlane>>>,
    pub(crate) status: Arc<Status>,
    pub(crate) metrics: Arc<Metrics>,
    /// The zone the data plane uses, and whether `--zone` fixed it (else
    /// it follows what the control plane says, `SnapshotUpdate.node_zone`).
    zone: Option<String>,
    zone_fixed: bool,
}

impl std::fmt::Debug for Applier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Applier").finish_non_exhaustive()
    }
}

impl Applier {
    /// An applier with nothing in force.
    pub fn new(
        store: Store,
        dataplane: Box<dyn DataPlane>,
        status: Arc<Status>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            current: watch::Sender::new(Arc::new(AgentState::default())),
            store: Arc::new(store),
            dataplane: Arc::new(Mutex::new(dataplane)),
            status,
            metrics,
            zone: None,
            zone_fixed: false,
        }
    }

    /// Fixes this node's zone (`--zone`): what the control plane says is ignored.
    pub fn fix_zone(&mut self, zone: String) {
        self.zone = Some(zone);
        self.zone_fixed = true;
    }

    /// Adopts the zone the control plane names, unless `--zone` fixed one
    /// or it names none. Returns whether the data plane must reprogram.
    fn learn_zone(&mut self, node_zone: &str) -> bool {
        if self.zone_fixed || node_zone.is_empty() || self.zone.as_deref() == Some(node_zone) {
            return false;
        }
        tracing::info!(zone = node_zone, previous = ?self.zone, "zone learnt from the control plane (the Node's topology.kubernetes.io/zone)");
        self.zone = Some(node_zone.to_owned());
        self.dataplane
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_zone(self.zone.clone());
        self.status.update(|s| s.zone = Some(node_zone.to_owned()));
        true
    }

    /// The data plane, shared with the maintenance task.
    pub(crate) fn dataplane(&self) -> Arc<Mutex<Box<dyn DataPlane>>> {
        self.dataplane.clone()
    }

    /// The state in force.
    pub fn state(&self) -> Arc<AgentState> {
        self.current.borrow().clone()
    }

    /// Follows the state in force (the DNS stub subscribes here).
    pub fn subscribe(&self) -> watch::Receiver<Arc<AgentState>> {
        self.current.subscribe()
    }

    /// Loads the persisted last good state and puts it in force, so the node
    /// serves before the control plane answers. Problems are logged; the
    /// agent then starts empty and resyncs in full.
    pub async fn restore(&mut self) {
        match self.store.load() {
            Ok(Loaded::State(state)) => {
                let changes = ChangeSet {
                    changed: state.resources.keys().cloned().collect(),
                    removed: Vec::new(),
                };
                let state = Arc::new(state);
                match self.program(state.clone(), changes, true).await {
                    Ok(()) => {
                        tracing::info!(version = %state.version, resources = state.resources.len(), "serving the persisted state");
                        self.publish(state, Origin::Persisted);
                    }
                    Err(e) => {
                        tracing::error!("the persisted state could not be applied: {e}");
                        self.status.update(|s| s.last_error = Some(e));
                    }
                }
            }
            Ok(Loaded::Empty) => {
                tracing::info!("no persisted state; waiting for the control plane")
            }
            Ok(Loaded::Discarded(reason)) => {
                self.status.update(|s| s.discarded_state = Some(reason));
            }
            Err(e) => {
                tracing::error!("reading the persisted state failed: {e}");
                self.status.update(|s| s.last_error = Some(e.to_string()));
            }
        }
    }

    /// Applies one update from the control plane. `Err` carries the NACK's
    /// error detail; the previous state then stays in force and on disk.
    pub async fn apply_update(&mut self, update: &v1::SnapshotUpdate) -> Result<(), String> {
        self.metrics.updates.inc();
        self.status.update(|s| s.updates += 1);
        let result = self.try_apply(update).await;
        match &result {
            Ok(()) => {
                self.metrics.acks.inc();
            }
            Err(e) => {
                tracing::warn!(version = %update.snapshot_version, "rejecting update: {e}");
                self.metrics.nacks.inc();
                self.status.update(|s| {
                    s.rejected += 1;
                    s.last_error = Some(e.clone());
                });
            }
        }
        result
    }

    async fn try_apply(&mut self, update: &v1::SnapshotUpdate) -> Result<(), String> {
        let started = Instant::now();
        let current = self.state();
        let (next, changes) = current.apply(update).map_err(|e| e.to_string())?;
        let next = Arc::new(next);
        let unchanged =
            changes.changed.is_empty() && changes.removed.is_empty() && !current.version.is_empty();
        let rezoned = self.learn_zone(&update.node_zone);
        if rezoned && unchanged {
            // Nothing new from the control plane, but every Service may
            // pick other endpoints in the new zone.
            let all = ChangeSet {
                changed: next.resources.keys().cloned().collect(),
                removed: Vec::new(),
            };
            self.program(next.clone(), all, true).await?;
        } else if !unchanged {
            self.program(next.clone(), changes.clone(), rezoned).await?;
            // Change counters and network programming latency (from each
            // object's change to the rules in force here).
            self.metrics
                .record_update(&current, &next, &changes, update.changed_at_unix_nanos);
        }
        let t = Instant::now();
        self.store
            .save(&next, update, &changes)
            .await
            .map_err(|e| format!("persisting the state: {e}"))?;
        self.metrics
            .persist_seconds
            .observe(t.elapsed().as_secs_f64());
        tracing::info!(
            version = %next.version,
            changed = changes.changed.len(),
            removed = changes.removed.len(),
            resources = next.resources.len(),
            elapsed = ?started.elapsed(),
            "update applied"
        );
        self.publish(next, Origin::ControlPlane);
        Ok(())
    }

    async fn program(
        &self,
        state: Arc<AgentState>,
        changes: ChangeSet,
        full: bool,
    ) -> Result<(), String> {
        let dataplane = self.dataplane.clone();
        self.status.sync_queued();
        self.metrics.kubeproxy.queued();
        let t = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let mut dp = dataplane.lock().unwrap_or_else(|e| e.into_inner());
            dp.apply(&Change {
                state: &state,
                changes: &changes,
                full,
            })
        })
        .await
        .map_err(|e| format!("data plane task failed: {e}"))?;
        self.metrics
            .apply_seconds
            .observe(t.elapsed().as_secs_f64());
        if result.is_ok() {
            self.status.sync_succeeded();
        }
        result.map_err(|e| format!("data plane: {e}"))
    }

    fn publish(&self, state: Arc<AgentState>, origin: Origin) {
        self.metrics.resources.set(state.resources.len() as i64);
        self.status.update(|s| {
            s.version = Some(state.version.clone());
            s.origin = origin;
            s.resources = state.resources.len();
            s.last_error = None;
        });
        self.current.send_replace(state);
    }
}
