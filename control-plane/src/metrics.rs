//! Prometheus metrics of the control plane, served at `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::status::Status;

/// A source's labels: its name and cluster.
pub type SourceLabels = Vec<(String, String)>;

/// The labels of source `name` of `cluster`.
pub fn source_labels(name: &str, cluster: &str) -> SourceLabels {
    vec![
        ("source".to_owned(), name.to_owned()),
        ("cluster".to_owned(), cluster.to_owned()),
    ]
}

/// The OpenMetrics media type, as scrapers name it in `Accept`.
pub const OPENMETRICS: &str = "application/openmetrics-text";

/// The content type of an OpenMetrics 1.0 body.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The reasons `streams_refused` counts.
const STREAM_REFUSALS: [&str; 7] = [
    "identity",
    "cluster",
    "hello",
    "hello_queue",
    "streams",
    "ack_timeout",
    "undrained",
];
/// The reasons `connections_refused` counts.
const CONNECTION_REFUSALS: [&str; 2] = ["total", "per_address"];
/// The causes `tls_handshake_failures` counts.
const HANDSHAKE_FAILURES: [&str; 7] = [
    "clear_text",
    "no_client_certificate",
    "unknown_ca",
    "bad_client_certificate",
    "client_refused_server_certificate",
    "timeout",
    "other",
];

fn reason_label(reason: &str) -> Vec<(String, String)> {
    vec![("reason".to_owned(), reason.to_owned())]
}

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
    /// gRPC connections admitted and still open.
    pub connections_open: Gauge,
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
    /// Conflicts among exports: one per export and conflicting property
    /// (every export of a conflict counts, the oldest included).
    pub clusterset_conflicts: Gauge,
    /// Agent streams refused or ended by a bound, by reason.
    pub streams_refused: Family<Vec<(String, String)>, Counter>,
    /// Connections closed at accept by a bound, by reason.
    pub connections_refused: Family<Vec<(String, String)>, Counter>,
    /// TLS handshakes that failed, by cause.
    pub tls_handshake_failures: Family<Vec<(String, String)>, Counter>,
    /// Heap trims after bursts of agent streams (`heap.rs`).
    pub heap_trims: Counter,
    /// Time one heap trim took.
    pub heap_trim_seconds: Histogram,
    /// 1 once every source has synced and a snapshot exists (`/readyz`).
    pub ready: Gauge,
    /// Per source: 1 once its first full read is done.
    pub source_synced: Family<SourceLabels, Gauge>,
    /// Per source: 1 while it cannot follow its origin (its `last_error`).
    pub source_failing: Family<SourceLabels, Gauge>,
    /// Per source: times it started failing, or failed for another reason.
    pub source_errors: Family<SourceLabels, Counter>,
    /// Per source: when its latest error began (Unix seconds).
    pub source_last_error_timestamp_seconds: Family<SourceLabels, Gauge<f64, AtomicU64>>,
    /// Per source: input it ignored (unknown kinds, API versions, fields).
    pub source_warnings: Family<SourceLabels, Gauge>,
    /// Connected agents not at the current snapshot.
    pub agents_behind: Gauge,
    /// Seconds the agent furthest behind has run a superseded version.
    pub agents_behind_seconds: Gauge<f64, AtomicU64>,
    /// Node names with more than one agent stream open.
    pub duplicate_node_names: Gauge,
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
            connections_open: Gauge::default(),
            pushes: Counter::default(),
            resources_sent: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            clusters_down: Gauge::default(),
            clusterset_conflicts: Gauge::default(),
            streams_refused: Family::default(),
            connections_refused: Family::default(),
            tls_handshake_failures: Family::default(),
            heap_trims: Counter::default(),
            heap_trim_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            ready: Gauge::default(),
            source_synced: Family::default(),
            source_failing: Family::default(),
            source_errors: Family::default(),
            source_last_error_timestamp_seconds: Family::default(),
            source_warnings: Family::default(),
            agents_behind: Gauge::default(),
            agents_behind_seconds: Gauge::default(),
            duplicate_node_names: Gauge::default(),
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
            "connections_open",
            "gRPC connections admitted and still open",
            m.connections_open.clone(),
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
            "Export conflicts: one per ServiceExport and conflicting property, every export of the Service counted (the oldest included)",
            m.clusterset_conflicts.clone(),
        );
        registry.register(
            "streams_refused",
            "Agent streams refused or ended by a bound (reason: identity, cluster, hello (also a second Hello), hello_queue, streams, ack_timeout, undrained)",
            m.streams_refused.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed at accept (reason: total, per_address)",
            m.connections_refused.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed (reason: clear_text, no_client_certificate, unknown_ca, bad_client_certificate, client_refused_server_certificate, timeout, other)",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "heap_trims",
            "Times the freed heap was given back to the kernel after a burst of agent streams",
            m.heap_trims.clone(),
        );
        registry.register(
            "heap_trim_seconds",
            "Time one heap trim took",
            m.heap_trim_seconds.clone(),
        );
        registry.register(
            "ready",
            "1 once every source has synced and a snapshot exists (/readyz answers 200)",
            m.ready.clone(),
        );
        registry.register(
            "source_synced",
            "1 once the source's first full read is done; the control plane is not ready before",
            m.source_synced.clone(),
        );
        registry.register(
            "source_failing",
            "1 while the source cannot follow its origin (a missing file: path, an unreachable API server); it serves what it had",
            m.source_failing.clone(),
        );
        registry.register(
            "source_errors",
            "Times the source started failing, or failed for another reason",
            m.source_errors.clone(),
        );
        registry.register(
            "source_last_error_timestamp_seconds",
            "When the source's latest error began, in Unix seconds (0: never failed)",
            m.source_last_error_timestamp_seconds.clone(),
        );
        registry.register(
            "source_warnings",
            "Input the source ignored: unknown kinds, API versions and fields",
            m.source_warnings.clone(),
        );
        registry.register(
            "agents_behind",
            "Connected agents that have not ACKed the current snapshot",
            m.agents_behind.clone(),
        );
        registry.register(
            "agents_behind_seconds",
            "Seconds since the oldest version a connected agent still runs stopped being current (0: none behind)",
            m.agents_behind_seconds.clone(),
        );
        registry.register(
            "duplicate_node_names",
            "Node names with more than one agent stream open (two agents given one --node-name, or briefly a restart)",
            m.duplicate_node_names.clone(),
        );
        // Every known reason is exported at 0 from the start: a family
        // shows nothing until its first sample otherwise, so a dashboard's
        // rate() would have no series and an alert on it nothing to see.
        for reason in STREAM_REFUSALS {
            drop(m.streams_refused.get_or_create(&reason_label(reason)));
        }
        for reason in CONNECTION_REFUSALS {
            drop(m.connections_refused.get_or_create(&reason_label(reason)));
        }
        for reason in HANDSHAKE_FAILURES {
            drop(
                m.tls_handshake_failures
                    .get_or_create(&reason_label(reason)),
            );
        }
        Self { registry, ..m }
    }

    /// Sets the gauges that follow the status as it is now: readiness and
    /// the agents' (how far behind is a matter of the clock, so it is read
    /// at each scrape rather than at each change).
    pub fn observe_status(&self, status: &Status) {
        self.ready.set(i64::from(status.ready()));
        let agents = status.agent_signals();
        self.agents_behind.set(agents.behind as i64);
        self.agents_behind_seconds.set(agents.behind_seconds);
        self.duplicate_node_names
            .set(agents.duplicate_node_names as i64);
    }

    /// Counts one stream refused for `reason`.
    pub fn refused_streams(&self, reason: &str) {
        self.streams_refused
            .get_or_create(&reason_label(reason))
            .inc();
    }

    /// Counts one connection closed at accept for `reason`.
    pub fn refused_connection(&self, reason: &str) {
        self.connections_refused
            .get_or_create(&reason_label(reason))
            .inc();
    }

    /// Counts one failed TLS handshake for `reason`.
    pub fn failed_handshake(&self, reason: &str) {
        self.tls_handshake_failures
            .get_or_create(&reason_label(reason))
            .inc();
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
