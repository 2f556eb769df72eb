//! Applies states: validate, program the data plane, persist, publish.
//!
//! ```text
//!  update ─▶ decode+validate ─▶ DataPlane::apply ─▶ Store::save ─▶ publish ─▶ ACK
//!               │ Decode             │ DataPlane        │ Persist
//!               │                    │                  └─▶ data plane put back on the last good state
//!               └────────────────────┴──────────────────────▶ NACK (ApplyFailure::nack_detail), last good state stays
//! ```
//!
//! The data plane and the store never disagree: if persisting fails after
//! the rules went in, the rules of the last good state (the one on disk, the
//! one the agent will announce when it reconnects) are put back before the
//! NACK. Data-plane and persistence failures are local and often passing (a
//! held xtables lock, a full disk): [`ApplyFailure::is_transient`] tells the
//! stream client to retry them (`crate::client`).
//!
//! The state in force is a `watch<Arc<AgentState>>`, which the DNS stub
//! and the health-check servers follow; after publishing, the applier waits
//! (at most 10 s) for the DNS index of that state before it ACKs (see
//! `crate::dns`). Failures are [`ApplyFailure`] (`Decode`, `DataPlane`,
//! `Task`, `Persist`; the data plane's own `ApplyError` is `Command` or
//! `Refused`), rendered into the NACK text in one place (`nack_detail`:
//! each cause once). After any data-plane failure the next call is a full
//! sync.
//!
//! Node facts: every `SnapshotUpdate` carries `node_zone` and
//! `node_draining`, what the control plane knows of this agent's Node (its
//! `topology.kubernetes.io/zone`, and why it is leaving). A change of those
//! alone comes as an update without resources at the version the agent
//! ACKed, which the applier takes in without persisting or rebuilding
//! anything. Without `--zone` the applier adopts the zone, calls
//! `DataPlane::set_zone` and programs in full; an empty zone changes
//! nothing. The zone is learnt again after each restart (the persisted
//! state is first programmed without it, which only widens endpoint
//! choice).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use switchyard_proto::convert::DecodeError;
use switchyard_proto::v1;
use tokio::sync::watch;

use crate::dataplane::{ApplyError, Change, DataPlane};
use crate::state::{AgentState, ChangeSet};
use crate::status::{Metrics, Origin, Status};
use crate::store::{Loaded, Store, StoreError};

/// Longest an ACK waits for the DNS index of the state it ACKs.
const DNS_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(10);

/// Why an update was not put in force. The previous state stays in force
/// and on disk in every case.
#[derive(Debug, thiserror::Error)]
pub enum ApplyFailure {
    /// The update does not decode or breaks a model rule: the data is bad.
    #[error("invalid update")]
    Decode(#[source] DecodeError),
    /// The data plane could not program the state.
    #[error("data plane")]
    DataPlane(#[source] ApplyError),
    /// The data plane's blocking task died (a panic in it).
    #[error("data plane task failed: {0}")]
    Task(String),
    /// The state could not be written to disk.
    #[error("persisting the state")]
    Persist(#[source] StoreError),
}

impl ApplyFailure {
    /// Whether the cause is local and may pass (a command that failed, such
    /// as iptables-restore while another process holds the xtables lock; a
    /// full disk): the same update is then retried. Bad data, and a state a
    /// data plane refuses as such, are not retried; the control plane sends
    /// the next change.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            Self::Decode(_) | Self::DataPlane(ApplyError::Refused(_))
        )
    }

    /// The text of the NACK and of `/status` `last_error`: this error and
    /// its causes, each said once.
    pub fn nack_detail(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            let text = c.to_string();
            if !out.contains(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            cause = c.source();
        }
        out
    }
}

/// Owns the state in force and everything that must agree with it.
pub struct Applier {
    current: watch::Sender<Arc<AgentState>>,
    store: Arc<Store>,
    dataplane: Arc<Mutex<Box<dyn DataPlane>>>,
    /// A data plane call failed: what it holds is uncertain, so the next
    /// call is a full sync.
    dataplane_suspect: bool,
    /// The state the DNS index in force was built from, when DNS runs.
    dns_built: Option<watch::Receiver<Arc<AgentState>>>,
    pub(crate) status: Arc<Status>,
    pub(crate) metrics: Arc<Metrics>,
    /// The zone the data plane uses, and whether `--zone` fixed it (else
    /// it follows what the control plane says, `SnapshotUpdate.node_zone`).
    zone: Option<String>,
    zone_fixed: bool,
    /// The cluster's DNS settings as the control plane last sent them.
    cluster_dns: watch::Sender<Option<v1::ClusterDns>>,
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
            dataplane_suspect: false,
            dns_built: None,
            status,
            metrics,
            zone: None,
            zone_fixed: false,
            cluster_dns: watch::Sender::new(None),
        }
    }

    /// Follows the cluster's DNS settings the control plane sends
    /// (`SnapshotUpdate.cluster_dns`, from the kube-dns ConfigMap).
    pub fn cluster_dns(&self) -> watch::Receiver<Option<v1::ClusterDns>> {
        self.cluster_dns.subscribe()
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

    /// Makes every ACK wait until the DNS stub answers from the state it
    /// ACKs (`built` follows the state of the DNS index in force). DNS
    /// queries never wait for a build; the ACK does instead.
    pub fn ack_after_dns(&mut self, built: watch::Receiver<Arc<AgentState>>) {
        self.dns_built = Some(built);
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
        let store = self.store.clone();
        let loaded = tokio::task::spawn_blocking(move || store.load()).await;
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                // sled may panic on a damaged database: said, as any damage.
                let why = format!("reading the persisted state failed: {e}");
                tracing::error!("{why}");
                self.status.update(|s| s.discarded_state = Some(why));
                return;
            }
        };
        match loaded {
            Ok(Loaded::State(state)) => self.serve_persisted(state).await,
            Ok(Loaded::Older { state, reason }) => {
                // Served, and said: never as the newest state silently.
                tracing::warn!(version = %state.version, "serving an older persisted state: {reason}");
                self.status.update(|s| s.discarded_state = Some(reason));
                self.serve_persisted(state).await;
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

    /// Programs a persisted state and puts it in force.
    async fn serve_persisted(&mut self, state: AgentState) {
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
                let e = e.nack_detail();
                tracing::error!("the persisted state could not be applied: {e}");
                self.status.update(|s| s.last_error = Some(e));
            }
        }
    }

    /// Applies one update from the control plane. On `Err` the previous
    /// state stays in force and on disk; the error's
    /// [`ApplyFailure::nack_detail`] is the NACK's text.
    pub async fn apply_update(&mut self, update: &v1::SnapshotUpdate) -> Result<(), ApplyFailure> {
        self.metrics.updates.inc();
        self.status.update(|s| s.updates += 1);
        let result = self.try_apply(update).await;
        match &result {
            Ok(()) => {
                self.metrics.acks.inc();
            }
            Err(e) => {
                let detail = e.nack_detail();
                tracing::warn!(version = %update.snapshot_version, "rejecting update: {detail}");
                self.metrics.nacks.inc();
                self.status.update(|s| {
                    s.rejected += 1;
                    s.last_error = Some(detail);
                });
            }
        }
        result
    }

    /// `update` as the complete state (the answer to a Hello that announced
    /// nothing, protocol rule 11): it also removes what it does not name.
    pub fn as_complete_state(&self, update: &v1::SnapshotUpdate) -> v1::SnapshotUpdate {
        let current = self.state();
        let named: std::collections::HashSet<&str> =
            update.resources.iter().map(|r| r.name.as_str()).collect();
        let mut whole = update.clone();
        whole.removed_resources.extend(
            current
                .resources
                .keys()
                .filter(|n| !named.contains(n.as_str()))
                .cloned(),
        );
        whole
    }

    /// Takes in whether this node's Node is leaving the cluster, as the
    /// control plane says on every update (kube-proxy's health server).
    fn learn_draining(&self, node_draining: &str) {
        let draining = (!node_draining.is_empty()).then(|| node_draining.to_owned());
        if self.status.node_draining() == draining {
            return;
        }
        match &draining {
            Some(why) => {
                tracing::warn!(reason = %why, "this node is leaving the cluster: kube-proxy's /healthz answers 503 so that load balancers drain it")
            }
            None => tracing::info!("this node is no longer leaving the cluster"),
        }
        self.status.update(|s| s.node_draining = draining);
    }

    async fn try_apply(&mut self, update: &v1::SnapshotUpdate) -> Result<(), ApplyFailure> {
        let started = Instant::now();
        let current = self.state();
        let (next, changes) = current.apply(update).map_err(ApplyFailure::Decode)?;
        self.learn_draining(&update.node_draining);
        self.cluster_dns.send_if_modified(|held| {
            let changed = *held != update.cluster_dns;
            if changed {
                held.clone_from(&update.cluster_dns);
            }
            changed
        });
        let rezoned = self.learn_zone(&update.node_zone);
        let unchanged =
            changes.changed.is_empty() && changes.removed.is_empty() && !current.version.is_empty();
        if unchanged && !rezoned && next.version == current.version {
            // The state in force, confirmed (and maybe the Node's facts):
            // nothing to program, persist or rebuild.
            self.status.update(|s| {
                s.origin = Origin::ControlPlane;
                s.last_error = None;
            });
            return Ok(());
        }
        let next = Arc::new(next);
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
        if let Err(e) = self.store.save(&current, &next, update, &changes).await {
            self.status.persist_failed(e.to_string());
            if !unchanged {
                self.put_back(&current, &changes).await;
            }
            return Err(ApplyFailure::Persist(e));
        }
        self.status.persisted();
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
        self.publish(next.clone(), Origin::ControlPlane);
        if let Some(built) = &mut self.dns_built {
            let caught_up = matches!(
                tokio::time::timeout(DNS_CATCH_UP, built.wait_for(|s| Arc::ptr_eq(s, &next))).await,
                Ok(Ok(_))
            );
            if !caught_up {
                // The data plane and the store hold it: ACK, and say that
                // DNS lags until its index catches up (`IndexCell` clears it).
                let answering = built.borrow().version.clone();
                tracing::warn!(version = %next.version, dns_version = %answering, "ACKing a version the DNS index has not caught up with within {DNS_CATCH_UP:?}: DNS answers from {answering} meanwhile (/status dns.behind)");
                self.metrics.dns.acks_before_index.inc();
                self.status.update(|s| {
                    if let Some(dns) = s.dns.as_mut() {
                        dns.behind = Some(next.version.clone());
                    }
                });
                // Built meanwhile: the cell's report may have come first.
                if Arc::ptr_eq(&built.borrow(), &next) {
                    self.status.update(|s| {
                        if let Some(dns) = s.dns.as_mut() {
                            dns.behind = None;
                        }
                    });
                }
            }
        }
        Ok(())
    }

    /// After the rules of an update went in but the update could not be
    /// persisted: programs `current` (what the store still holds) again, so
    /// the kernel, the store and the versions the agent announces agree.
    async fn put_back(&mut self, current: &Arc<AgentState>, undone: &ChangeSet) {
        let changes = ChangeSet {
            changed: undone
                .changed
                .iter()
                .chain(&undone.removed)
                .filter(|n| current.resources.contains_key(*n))
                .cloned()
                .collect(),
            removed: undone
                .changed
                .iter()
                .filter(|n| !current.resources.contains_key(*n))
                .cloned()
                .collect(),
        };
        match self.program(current.clone(), changes, false).await {
            Ok(()) => {
                tracing::warn!(version = %current.version, "the update could not be persisted; its rules were taken back")
            }
            Err(e) => {
                // The next update is then applied as a full sync.
                self.dataplane_suspect = true;
                tracing::error!(
                    "putting the last good state back failed: {}",
                    e.nack_detail()
                );
            }
        }
    }

    async fn program(
        &mut self,
        state: Arc<AgentState>,
        changes: ChangeSet,
        full: bool,
    ) -> Result<(), ApplyFailure> {
        let dataplane = self.dataplane.clone();
        self.status.sync_queued();
        self.metrics.kubeproxy.queued();
        let full = full || std::mem::take(&mut self.dataplane_suspect);
        let t = Instant::now();
        let result = tokio::task::spawn_blocking(move || {
            let mut dp = dataplane.lock().unwrap_or_else(|e| e.into_inner());
            dp.apply(&Change {
                state: &state,
                changes: &changes,
                full,
            })
        })
        .await;
        self.metrics
            .apply_seconds
            .observe(t.elapsed().as_secs_f64());
        match result {
            Ok(Ok(())) => {
                self.status.sync_succeeded();
                Ok(())
            }
            Ok(Err(e)) => {
                self.dataplane_suspect = true;
                Err(ApplyFailure::DataPlane(e))
            }
            Err(e) => {
                self.dataplane_suspect = true;
                Err(ApplyFailure::Task(e.to_string()))
            }
        }
    }

    fn publish(&self, state: Arc<AgentState>, origin: Origin) {
        self.metrics.resources.set(state.resources.len() as i64);
        let (version, resources) = (state.version.clone(), state.resources.len());
        // The state first: whoever sees the status move (`/status`, tests
        // waiting on it) then finds that state in force.
        self.current.send_replace(state);
        self.status.update(|s| {
            s.version = Some(version);
            s.origin = origin;
            s.resources = resources;
            s.last_error = None;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::NoneDataPlane;

    fn update(version: &str, names: &[&str], removed: &[&str]) -> v1::SnapshotUpdate {
        v1::SnapshotUpdate {
            snapshot_version: version.into(),
            nonce: "1".into(),
            resources: names
                .iter()
                .map(|n| crate::state::test_resource(n, format!("{version}-{n}")))
                .collect(),
            removed_resources: removed.iter().map(|n| format!("default/ns/{n}")).collect(),
            ..Default::default()
        }
    }

    fn applier(dir: &std::path::Path) -> (Applier, NoneDataPlane) {
        let (store, _) = Store::open(dir).expect("open");
        let dp = NoneDataPlane::default();
        let status = Arc::new(Status::new("n".into(), "default".into(), None, "none"));
        (
            Applier::new(
                store,
                Box::new(dp.clone()),
                status,
                Arc::new(Metrics::new()),
            ),
            dp,
        )
    }

    #[tokio::test]
    async fn a_state_that_cannot_be_persisted_is_taken_back_out_of_the_data_plane() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, dp) = applier(dir.path());
        a.apply_update(&update("v1", &["a", "b"], &[]))
            .await
            .expect("v1");
        a.store.fail_next_saves(1);
        let e = a
            .apply_update(&update("v2", &["c"], &["a"]))
            .await
            .expect_err("the disk is full");
        assert!(
            matches!(e, ApplyFailure::Persist(_)) && e.is_transient(),
            "{e:?}"
        );
        assert!(
            e.nack_detail().contains("persisting the state"),
            "{}",
            e.nack_detail()
        );
        // The data plane saw v2 and then v1 again: it ends on what is stored.
        let seen = dp.recorded().lock().expect("lock").clone();
        assert_eq!(seen.versions, ["v1", "v2", "v1"]);
        assert_eq!(seen.resources, 2);
        assert_eq!(a.state().version, "v1", "v1 stays in force");
        let Loaded::State(stored) = a.store.load().expect("load") else {
            panic!("a stored state")
        };
        assert_eq!(stored.version, "v1");
        // Once the disk has room again the same update applies.
        a.apply_update(&update("v2", &["c"], &["a"]))
            .await
            .expect("v2");
        let names: Vec<_> = a.state().resources.keys().cloned().collect();
        assert_eq!(names, ["default/ns/b", "default/ns/c"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ack_before_the_dns_index_caught_up_is_said() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, _) = applier(dir.path());
        a.status
            .update(|s| s.dns = Some(crate::status::DnsStatus::default()));
        // A DNS index that never gets past the empty state.
        let (_built_tx, built) = watch::channel(a.state());
        a.ack_after_dns(built);
        a.apply_update(&update("v1", &["a"], &[]))
            .await
            .expect("applied after waiting 10 s");
        let dns = a.status.document().dns.expect("dns status");
        assert_eq!(dns.behind.as_deref(), Some("v1"));
        assert_eq!(a.metrics.dns.acks_before_index.get(), 1);
    }

    #[tokio::test]
    async fn bad_data_is_not_retried_and_says_what_is_wrong() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, _) = applier(dir.path());
        let mut bad = update("v1", &["a"], &[]);
        bad.resources[0].name = "default/ns/other".into();
        let e = a.apply_update(&bad).await.expect_err("name mismatch");
        assert!(!e.is_transient());
        assert!(
            e.nack_detail()
                .starts_with("invalid update: resource default/ns/other"),
            "{}",
            e.nack_detail()
        );
    }

    #[tokio::test]
    async fn a_complete_state_drops_what_it_does_not_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut a, _) = applier(dir.path());
        a.apply_update(&update("v1", &["a", "b"], &[]))
            .await
            .expect("v1");
        let whole = a.as_complete_state(&update("v2", &["b"], &[]));
        a.apply_update(&whole).await.expect("v2");
        let names: Vec<_> = a.state().resources.keys().cloned().collect();
        assert_eq!(names, ["default/ns/b"]);
    }
}
