//! Prometheus metrics of the control plane, served at `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The OpenMetrics media type, as scrapers name it in `Accept`.
pub const OPENMETRICS: &str = "application/openmetrics-text";

/// The content type of an OpenMetrics 1.0 body.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every metric the control plane exports.
#[derive(Debug)]
pub struct Metrics {
    /// Snapshots built (versions published).
    pub snapshots: Counter,
    /// Time to build a snapshot from the sources' state.
    pub snapshot_build_seconds: Histogram,
    /// Resources in the current snapshot.
    pub resources: Gauge,
    /// Objects skipped as invalid.
    pub invalid_objects: Gauge,
    /// Agent streams open now.
    pub agents_connected: Gauge,
    /// Updates sent to agents.
    pub pushes: Counter,
    /// Resources sent to agents.
    pub resources_sent: Counter,
    /// ACKs received.
    pub acks: Counter,
    /// NACKs received.
    pub nacks: Counter,
    /// Clusters whose sources all fail.
    pub clusters_down: Gauge,
    /// Exports whose properties conflict with an older export's.
    pub clusterset_conflicts: Gauge,
    registry: Registry,
}

impl Metrics {
    /// Registers every metric under the `switchyard_control_plane` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchyard_control_plane");
        let m = Self {
            snapshots: Counter::default(),
            snapshot_build_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            resources: Gauge::default(),
            invalid_objects: Gauge::default(),
            agents_connected: Gauge::default(),
            pushes: Counter::default(),
            resources_sent: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            clusters_down: Gauge::default(),
            clusterset_conflicts: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "snapshots",
            "Snapshot versions published",
            m.snapshots.clone(),
        );
        registry.register(
            "snapshot_build_seconds",
            "Time to build a snapshot from the sources",
            m.snapshot_build_seconds.clone(),
        );
        registry.register(
            "resources",
            "Services in the current snapshot",
            m.resources.clone(),
        );
        registry.register(
            "invalid_objects",
            "Objects skipped as invalid",
            m.invalid_objects.clone(),
        );
        registry.register(
            "agents_connected",
            "Agent streams open",
            m.agents_connected.clone(),
        );
        registry.register(
            "pushes",
            "Snapshot updates sent to agents",
            m.pushes.clone(),
        );
        registry.register(
            "resources_sent",
            "Resources sent to agents",
            m.resources_sent.clone(),
        );
        registry.register("acks", "ACKs received from agents", m.acks.clone());
        registry.register("nacks", "NACKs received from agents", m.nacks.clone());
        registry.register(
            "clusters_down",
            "Clusters whose sources all fail",
            m.clusters_down.clone(),
        );
        registry.register(
            "clusterset_conflicts",
            "Exports whose properties conflict with an older export of the same Service",
            m.clusterset_conflicts.clone(),
        );
        Self { registry, ..m }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        self.encode_for(Some(OPENMETRICS)).1
    }

    /// The exposition a scraper asked for with its `Accept` header, and
    /// its content type: OpenMetrics when it is accepted (Prometheus asks
    /// for it first), else the Prometheus text format 0.0.4, whose parsers
    /// need counters to be typed under their `_total` name.
    pub fn encode_for(&self, accept: Option<&str>) -> (&'static str, String) {
        let mut out = String::new();
        // Writing into a String cannot fail.
        if accept.is_some_and(|a| a.contains(OPENMETRICS)) {
            let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
            (OPENMETRICS_CONTENT_TYPE, out)
        } else {
            let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
            (
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                out,
            )
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
