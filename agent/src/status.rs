//! The agent's status (`/status`) and metrics (`/metrics`).

use std::sync::{Mutex, MutexGuard};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

/// Where the state in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Nothing applied yet.
    None,
    /// Loaded from the state directory at start-up.
    Persisted,
    /// Received from the control plane.
    ControlPlane,
}

/// The document served at `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct StatusDocument {
    /// Node name.
    pub node: String,
    /// Cluster id.
    pub cluster: String,
    /// Zone, if known.
    pub zone: Option<String>,
    /// Snapshot version in force; null before any.
    pub version: Option<String>,
    /// Where that state came from.
    pub origin: Origin,
    /// Whether a stream to the control plane is open.
    pub connected: bool,
    /// Resources (Services) in force.
    pub resources: usize,
    /// The data plane in use.
    pub dataplane: &'static str,
    /// The last apply or stream error, cleared by the next success.
    pub last_error: Option<String>,
    /// Updates received from the control plane since start.
    pub updates: u64,
    /// Updates rejected (NACKed) since start.
    pub rejected: u64,
    /// Why the persisted state was discarded at start-up, if it was.
    pub discarded_state: Option<String>,
}

/// Shared status. Every change bumps a generation that [`Status::subscribe`]
/// follows, so observers wait for events instead of polling.
#[derive(Debug)]
pub struct Status {
    doc: Mutex<StatusDocument>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Status {
    /// Status for a node before anything is applied.
    pub fn new(
        node: String,
        cluster: String,
        zone: Option<String>,
        dataplane: &'static str,
    ) -> Self {
        Self {
            doc: Mutex::new(StatusDocument {
                node,
                cluster,
                zone,
                version: None,
                origin: Origin::None,
                connected: false,
                resources: 0,
                dataplane,
                last_error: None,
                updates: 0,
                rejected: 0,
                discarded_state: None,
            }),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Changes the document under the lock.
    pub fn update(&self, f: impl FnOnce(&mut StatusDocument)) {
        f(&mut self.lock());
        self.generation.send_modify(|g| *g += 1);
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// A copy of the document.
    pub fn document(&self) -> StatusDocument {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, StatusDocument> {
        self.doc.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    /// Updates received.
    pub updates: Counter,
    /// Updates ACKed.
    pub acks: Counter,
    /// Updates NACKed.
    pub nacks: Counter,
    /// Stream (re)connections attempted.
    pub connects: Counter,
    /// 1 while a stream is open.
    pub connected: Gauge,
    /// Resources in force.
    pub resources: Gauge,
    /// Time for the data plane to apply a state.
    pub apply_seconds: Histogram,
    /// Time to persist a state.
    pub persist_seconds: Histogram,
    /// From the control plane seeing a change to this node having it in force.
    pub programming_latency_seconds: Histogram,
    /// iptables: duration of full syncs.
    pub iptables_full_sync_seconds: Histogram,
    /// iptables: duration of partial syncs.
    pub iptables_partial_sync_seconds: Histogram,
    /// iptables: restore transactions the kernel refused.
    pub iptables_restore_failures: Counter,
    /// iptables: full resyncs because the canary was gone.
    pub iptables_canary_resyncs: Counter,
    /// iptables: rules we own (all families and tables).
    pub iptables_rules: Gauge,
    registry: Registry,
}

impl Metrics {
    /// Registers every metric under the `switchyard_agent` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchyard_agent");
        let buckets = || Histogram::new(exponential_buckets(0.0005, 2.0, 18));
        let m = Self {
            updates: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            connects: Counter::default(),
            connected: Gauge::default(),
            resources: Gauge::default(),
            apply_seconds: buckets(),
            persist_seconds: buckets(),
            programming_latency_seconds: buckets(),
            iptables_full_sync_seconds: buckets(),
            iptables_partial_sync_seconds: buckets(),
            iptables_restore_failures: Counter::default(),
            iptables_canary_resyncs: Counter::default(),
            iptables_rules: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("updates", "Snapshot updates received", m.updates.clone());
        registry.register("acks", "Updates applied and ACKed", m.acks.clone());
        registry.register("nacks", "Updates rejected", m.nacks.clone());
        registry.register("connects", "Stream connection attempts", m.connects.clone());
        registry.register(
            "connected",
            "1 while a stream to the control plane is open",
            m.connected.clone(),
        );
        registry.register("resources", "Services in force", m.resources.clone());
        registry.register(
            "apply_seconds",
            "Data plane apply duration",
            m.apply_seconds.clone(),
        );
        registry.register(
            "persist_seconds",
            "State persistence duration",
            m.persist_seconds.clone(),
        );
        registry.register(
            "network_programming_latency_seconds",
            "From the control plane seeing a change to the change in force on this node",
            m.programming_latency_seconds.clone(),
        );
        registry.register(
            "iptables_sync_seconds_full",
            "iptables full sync duration (save, generate, restore)",
            m.iptables_full_sync_seconds.clone(),
        );
        registry.register(
            "iptables_sync_seconds_partial",
            "iptables partial sync duration (changed Services only)",
            m.iptables_partial_sync_seconds.clone(),
        );
        registry.register(
            "iptables_restore_failures",
            "iptables-restore transactions that failed",
            m.iptables_restore_failures.clone(),
        );
        registry.register(
            "iptables_canary_resyncs",
            "Full resyncs after the canary chain was found flushed",
            m.iptables_canary_resyncs.clone(),
        );
        registry.register(
            "iptables_rules",
            "iptables rules Switchyard owns",
            m.iptables_rules.clone(),
        );
        Self { registry, ..m }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
