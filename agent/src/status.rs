//! The agent's status (`/status`) and metrics (`/metrics`).
//!
//! ```text
//!  applier: change handed to the data plane ─▶ sync queued ┐
//!           data plane returned Ok ─────────▶ sync done    ├─▶ SyncHealth ─▶ /healthz, /readyz,
//!  maintenance: canary check passed ────────▶ sync done    ┘                 kube-proxy's /healthz, /livez,
//!  store: save failed / next save succeeded ▶ persist_error                  healthCheckNodePort servers
//! ```
//!
//! Health follows kube-proxy's `ProxierHealthServer`: `/healthz` is 503
//! while a change has been queued for more than twice
//! `--iptables-sync-period`, and while the state cannot be persisted
//! (`sync.persist_error`: since when and why, e.g. ENOSPC); `/readyz` is
//! 200 after the first successful sync.
//!
//! Metrics are `switchyard_agent_*` and kube-proxy's names
//! (`KubeProxyMetrics`), fed by the iptables data plane (sync durations,
//! restore failures) and by the applier (`Metrics::record_update`: Service
//! and endpoint changes, network programming latency from each slice's
//! trigger time, else the control plane's change, ignoring changes older
//! than the agent).

use std::sync::{Mutex, MutexGuard};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::state::{AgentState, ChangeSet};

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
    /// The `--control-plane` URL the stream is (or was last) open to.
    pub control_plane: Option<String>,
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
    /// What was wrong with the persisted state at start-up, if anything:
    /// why it was discarded, or why an older state than the newest written
    /// is served (the previous generation, or a rolled-back store).
    pub discarded_state: Option<String>,
    /// The DNS stub; null when `--dns-listen none`.
    pub dns: Option<DnsStatus>,
    /// Whether the data plane keeps up (what `/healthz` and `/readyz` say).
    pub sync: SyncReport,
    /// Why this node's Node is leaving the cluster, as the control plane
    /// says (`deleted`, `ToBeDeletedByClusterAutoscaler`); kube-proxy's
    /// health server fails while it is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_draining: Option<String>,
}

/// The data plane's syncs as `/healthz` and `/readyz` judge them, the way
/// kube-proxy does: unhealthy when a change has waited longer than the
/// health timeout (twice the sync period) without a successful sync;
/// ready once a sync has succeeded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    /// `/healthz`: no change has waited longer than `timeout_seconds`.
    pub healthy: bool,
    /// `/readyz`: a state has been put in force at least once.
    pub ready: bool,
    /// How long the oldest change not yet in force has waited, in seconds.
    pub pending_seconds: Option<f64>,
    /// The last successful sync (or check that the rules are intact), Unix seconds.
    pub last_sync_unix_seconds: Option<f64>,
    /// The health timeout.
    pub timeout_seconds: f64,
    /// Set while the state cannot be persisted (a full disk): why, and for
    /// how long. Updates are NACKed and retried meanwhile, the last good
    /// state stays in force, and `/healthz` fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persist_error: Option<String>,
}

/// When syncs were asked for and when they succeeded.
#[derive(Debug, Default)]
struct SyncTimes {
    pending_since: Option<std::time::Instant>,
    first_success: bool,
    last_success_unix_seconds: Option<f64>,
    /// Since when, and why, saves fail.
    persist_failing: Option<(std::time::Instant, String)>,
}

/// The DNS stub's part of `/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DnsStatus {
    /// Where it listens (UDP and TCP).
    pub listen: String,
    /// The cluster domain.
    pub zone: String,
    /// Upstream servers for other names.
    pub upstreams: Vec<String>,
    /// Stub domains (`--dns-forward`): zone -> its servers.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub forward_zones: std::collections::BTreeMap<String, Vec<String>>,
    /// Set when there is no upstream: why, and what that means.
    pub upstream_warning: Option<String>,
    /// Snapshot version the answers come from (null before the first).
    pub index_version: Option<String>,
    /// Names answered (zone names, empty non-terminals, reverse names).
    pub names: usize,
    /// How long the last index build took, in milliseconds.
    pub index_build_ms: f64,
    /// Set when the agent ACKed a version (the one named here) before its
    /// DNS index was built from it, after waiting 10 s: DNS still answers
    /// from `index_version`. Cleared once the index catches up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub behind: Option<String>,
    /// Queries answered by response code (filled from the metrics).
    pub queries: std::collections::BTreeMap<String, u64>,
    /// Queries forwarded upstream.
    pub forwarded: u64,
    /// Queries refused because of their source address.
    pub refused_sources: u64,
    /// Transparent mode: the cluster DNS Service it answers for
    /// (`--dns-service`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The addresses of that Service it answers on now.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub service_addresses: Vec<String>,
}

/// Shared status. Every change bumps a generation that [`Status::subscribe`]
/// follows, so observers wait for events instead of polling.
#[derive(Debug)]
pub struct Status {
    doc: Mutex<StatusDocument>,
    sync: Mutex<SyncTimes>,
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
                control_plane: None,
                resources: 0,
                dataplane,
                last_error: None,
                updates: 0,
                rejected: 0,
                discarded_state: None,
                dns: None,
                sync: SyncReport::default(),
                node_draining: None,
            }),
            sync: Mutex::default(),
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

    /// The data plane in use.
    pub fn dataplane(&self) -> &'static str {
        self.lock().dataplane
    }

    /// Why this node is leaving the cluster, if it is.
    pub fn node_draining(&self) -> Option<String> {
        self.lock().node_draining.clone()
    }

    /// A copy of the document.
    pub fn document(&self) -> StatusDocument {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, StatusDocument> {
        self.doc.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sync_times(&self) -> MutexGuard<'_, SyncTimes> {
        self.sync.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The data plane was asked to put a change in force.
    pub fn sync_queued(&self) {
        let mut t = self.sync_times();
        t.pending_since.get_or_insert_with(std::time::Instant::now);
    }

    /// The data plane put a state in force.
    pub fn sync_succeeded(&self) {
        {
            let mut t = self.sync_times();
            t.pending_since = None;
            t.first_success = true;
            t.last_success_unix_seconds = Some(unix_seconds());
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// The periodic check found the data plane's rules intact (or repaired
    /// them): what was pending is in force. Returns whether anything had
    /// been put in force before (only then does the check mean a sync).
    pub fn maintained(&self) -> bool {
        let mut t = self.sync_times();
        if t.first_success {
            t.pending_since = None;
            t.last_success_unix_seconds = Some(unix_seconds());
        }
        t.first_success
    }

    /// A state could not be persisted: `/healthz` fails until one is.
    pub fn persist_failed(&self, reason: String) {
        {
            let mut t = self.sync_times();
            let since = t
                .persist_failing
                .take()
                .map_or_else(std::time::Instant::now, |(since, _)| since);
            t.persist_failing = Some((since, reason));
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// A state was persisted.
    pub fn persisted(&self) {
        if self.sync_times().persist_failing.take().is_some() {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// The sync report against `timeout` (twice the sync period).
    pub fn sync_report(&self, timeout: std::time::Duration) -> SyncReport {
        let t = self.sync_times();
        let pending = t.pending_since.map(|p| p.elapsed());
        SyncReport {
            healthy: pending.is_none_or(|p| p <= timeout) && t.persist_failing.is_none(),
            persist_error: t.persist_failing.as_ref().map(|(since, why)| {
                format!(
                    "the state cannot be persisted, for {:.1}s: {why}",
                    since.elapsed().as_secs_f64()
                )
            }),
            ready: t.first_success,
            pending_seconds: pending.map(|p| p.as_secs_f64()),
            last_sync_unix_seconds: t.last_success_unix_seconds,
            timeout_seconds: timeout.as_secs_f64(),
        }
    }
}

/// The OpenMetrics media type, as scrapers name it in `Accept`.
pub const OPENMETRICS: &str = "application/openmetrics-text";

/// The content type of an OpenMetrics 1.0 body.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
    /// The DNS stub's figures.
    pub dns: DnsMetrics,
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
    /// nftables: duration of full syncs.
    pub nftables_full_sync_seconds: Histogram,
    /// nftables: duration of partial syncs.
    pub nftables_partial_sync_seconds: Histogram,
    /// nftables: transactions the kernel (or libnftables) refused.
    pub nftables_transaction_failures: Counter,
    /// nftables: full resyncs because our table was gone.
    pub nftables_table_resyncs: Counter,
    /// nftables: set and map elements we own (all families).
    pub nftables_elements: Gauge,
    /// The same figures under kube-proxy's names, for its dashboards and alerts.
    pub kubeproxy: KubeProxyMetrics,
    /// When this agent started (Unix nanoseconds): changes older than that
    /// are not network programming, they are the state it started from.
    started_unix_nanos: i64,
    registry: Registry,
}

impl Metrics {
    /// Registers every metric under the `switchyard_agent` prefix, and
    /// kube-proxy's under `kubeproxy`.
    pub fn new() -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("switchyard_agent");
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
            dns: DnsMetrics::default(),
            iptables_full_sync_seconds: buckets(),
            iptables_partial_sync_seconds: buckets(),
            iptables_restore_failures: Counter::default(),
            iptables_canary_resyncs: Counter::default(),
            iptables_rules: Gauge::default(),
            nftables_full_sync_seconds: buckets(),
            nftables_partial_sync_seconds: buckets(),
            nftables_transaction_failures: Counter::default(),
            nftables_table_resyncs: Counter::default(),
            nftables_elements: Gauge::default(),
            kubeproxy: KubeProxyMetrics::default(),
            started_unix_nanos: crate::unix_nanos(),
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
        m.dns.register(registry.sub_registry_with_prefix("dns"));
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
        registry.register(
            "nftables_sync_seconds_full",
            "nftables full sync duration (rules and every element, one transaction)",
            m.nftables_full_sync_seconds.clone(),
        );
        registry.register(
            "nftables_sync_seconds_partial",
            "nftables partial sync duration (element operations of the changed Services)",
            m.nftables_partial_sync_seconds.clone(),
        );
        registry.register(
            "nftables_transaction_failures",
            "nftables transactions that failed",
            m.nftables_transaction_failures.clone(),
        );
        registry.register(
            "nftables_table_resyncs",
            "Full resyncs after our nftables table was found missing",
            m.nftables_table_resyncs.clone(),
        );
        registry.register(
            "nftables_elements",
            "nftables set and map elements Switchyard owns",
            m.nftables_elements.clone(),
        );
        m.kubeproxy
            .register(root.sub_registry_with_prefix("kubeproxy"));
        Self {
            registry: root,
            ..m
        }
    }

    /// Counts what an applied update changed and observes network
    /// programming latency, both as kube-proxy defines them: per Service
    /// whose Service object or endpoints changed, and from each changed
    /// slice's trigger time (`endpoints.kubernetes.io/last-change-trigger-time`),
    /// else from when the control plane saw the change. Changes from
    /// before this agent started are not measured (they are the state it
    /// started from, not a change it programmed).
    pub fn record_update(
        &self,
        before: &AgentState,
        after: &AgentState,
        changes: &ChangeSet,
        changed_at_unix_nanos: i64,
    ) {
        let now = crate::unix_nanos();
        let seconds = |since: i64| (now - since).max(0) as f64 / 1e9;
        let measured = |t: i64| t > 0 && t >= self.started_unix_nanos;
        let mut fallback = false;
        for name in &changes.changed {
            let Some(new) = after.resources.get(name) else {
                continue;
            };
            let old = before.resources.get(name).map(|r| &r.state);
            if old.is_none_or(|o| o.service != new.state.service) {
                self.kubeproxy.service_changes.inc();
            }
            if old.is_none_or(|o| o.slices != new.state.slices) {
                self.kubeproxy.endpoint_changes.inc();
            }
            let mut triggered = false;
            for slice in &new.state.slices {
                let Some(t) = slice.trigger_time_unix_nanos else {
                    continue;
                };
                // Only a trigger time this update brought in is a change.
                let seen = old.is_some_and(|o| {
                    o.slices
                        .iter()
                        .any(|s| s.name == slice.name && s.trigger_time_unix_nanos == Some(t))
                });
                if !seen && measured(t) {
                    self.kubeproxy
                        .network_programming_seconds
                        .observe(seconds(t));
                    self.programming_latency_seconds.observe(seconds(t));
                    triggered = true;
                }
            }
            fallback |= !triggered;
        }
        for name in &changes.removed {
            self.kubeproxy.service_changes.inc();
            if before
                .resources
                .get(name)
                .is_some_and(|r| !r.state.slices.is_empty())
            {
                self.kubeproxy.endpoint_changes.inc();
            }
            fallback = true;
        }
        if fallback && measured(changed_at_unix_nanos) {
            self.kubeproxy
                .network_programming_seconds
                .observe(seconds(changed_at_unix_nanos));
            self.programming_latency_seconds
                .observe(seconds(changed_at_unix_nanos));
        }
    }

    /// The OpenMetrics text exposition.
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

/// kube-proxy's metrics (kubernetes/kubernetes `pkg/proxy/metrics/metrics.go`),
/// same names, types and buckets, so that dashboards and alerts written for
/// kube-proxy read the agent unchanged. The iptables data plane feeds the
/// sync figures; the applier counts changes and network programming.
#[derive(Debug)]
pub struct KubeProxyMetrics {
    /// `kubeproxy_sync_proxy_rules_duration_seconds`: every sync.
    pub sync_seconds: Histogram,
    /// `kubeproxy_sync_full_proxy_rules_duration_seconds`.
    pub full_sync_seconds: Histogram,
    /// `kubeproxy_sync_partial_proxy_rules_duration_seconds`.
    pub partial_sync_seconds: Histogram,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`: the last
    /// successful sync (or check that the rules are intact), Unix seconds.
    pub last_sync_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds`: the last
    /// time a sync was asked for; far ahead of the last sync means stuck.
    pub last_queued_timestamp: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `kubeproxy_network_programming_duration_seconds`.
    pub network_programming_seconds: Histogram,
    /// `kubeproxy_sync_proxy_rules_service_changes_total`.
    pub service_changes: Counter,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_total`.
    pub endpoint_changes: Counter,
    /// `kubeproxy_sync_proxy_rules_iptables_restore_failures_total`.
    pub restore_failures: Counter,
    /// `kubeproxy_proxy_healthz_total{code}`: answers of the health server's `/healthz`.
    pub healthz: CodeFamily,
    /// `kubeproxy_proxy_livez_total{code}`: answers of its `/livez`.
    pub livez: CodeFamily,
}

/// Counters by HTTP status code.
pub type CodeFamily = prometheus_client::metrics::family::Family<Vec<(String, String)>, Counter>;

impl Default for KubeProxyMetrics {
    fn default() -> Self {
        // kube-proxy's buckets: 1 ms doubling (15), and for network
        // programming 0.25 s, 0.5 s, 1..59 s, 60..115 s by 5, 2..5 min by 30 s.
        let sync = || Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let programming = [0.25, 0.5]
            .into_iter()
            .chain((1..=59).map(f64::from))
            .chain((0..12).map(|i| 60.0 + 5.0 * f64::from(i)))
            .chain((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
        Self {
            sync_seconds: sync(),
            full_sync_seconds: sync(),
            partial_sync_seconds: sync(),
            last_sync_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            network_programming_seconds: Histogram::new(programming),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            restore_failures: Counter::default(),
            healthz: answered(),
            livez: answered(),
        }
    }
}

/// A family of answers by code with kube-proxy's two codes (200, 503)
/// exported at 0 from the start, so a dashboard's rate() has a series.
fn answered() -> CodeFamily {
    let family = CodeFamily::default();
    for code in ["200", "503"] {
        drop(family.get_or_create(&vec![("code".to_owned(), code.to_owned())]));
    }
    family
}

impl KubeProxyMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            self.sync_seconds.clone(),
        );
        r.register(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            self.full_sync_seconds.clone(),
        );
        r.register(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            self.partial_sync_seconds.clone(),
        );
        r.register(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            self.last_sync_timestamp.clone(),
        );
        r.register(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            self.last_queued_timestamp.clone(),
        );
        r.register(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            self.network_programming_seconds.clone(),
        );
        r.register(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            self.service_changes.clone(),
        );
        r.register(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            self.endpoint_changes.clone(),
        );
        r.register(
            "sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            self.restore_failures.clone(),
        );
        r.register(
            "proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            self.healthz.clone(),
        );
        r.register(
            "proxy_livez",
            "Cumulative proxy livez HTTP status",
            self.livez.clone(),
        );
    }

    /// A sync was asked for.
    pub fn queued(&self) {
        self.last_queued_timestamp.set(unix_seconds());
    }

    /// The periodic check found the rules intact.
    pub fn verified(&self) {
        self.last_sync_timestamp.set(unix_seconds());
    }

    /// One successful sync of the rules, full or partial, that took `elapsed`.
    pub fn synced(&self, full: bool, elapsed: std::time::Duration) {
        let secs = elapsed.as_secs_f64();
        self.sync_seconds.observe(secs);
        if full {
            self.full_sync_seconds.observe(secs);
        } else {
            self.partial_sync_seconds.observe(secs);
        }
        self.last_sync_timestamp.set(unix_seconds());
    }
}

/// Now, in Unix seconds.
fn unix_seconds() -> f64 {
    crate::unix_nanos() as f64 / 1e9
}

/// Response codes counted one by one; anything else is `other`.
pub const DNS_RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other",
];

type RcodeFamily = prometheus_client::metrics::family::Family<Vec<(String, String)>, Counter>;

/// Counters of the DNS stub. Per-rcode counters are resolved once, so
/// counting a query is one atomic add.
#[derive(Debug)]
pub struct DnsMetrics {
    by_rcode: RcodeFamily,
    /// Answers sent, by response code, in [`DNS_RCODES`] order.
    pub responses: [Counter; 7],
    /// Queries forwarded upstream.
    pub forwarded: Counter,
    /// Queries for other names answered from the cache of upstream answers.
    pub cache_hits: Counter,
    /// Forwarded queries no upstream answered.
    pub forward_failures: Counter,
    /// Forwarded queries answered from an expired answer because no
    /// upstream answered (`--dns-serve-stale`).
    pub stale_answers: Counter,
    /// Popular answers fetched again before they expired (prefetch).
    pub prefetches: Counter,
    /// Queries refused because the forwarding limit was reached.
    pub forward_overload: Counter,
    /// TCP connections closed at accept (over the total or per-source limit).
    pub tcp_refused: Counter,
    /// Queries refused because of their source address.
    pub refused_sources: Counter,
    /// Messages dropped (too short, or not queries).
    pub dropped: Counter,
    /// UDP answers truncated so that the client retries over TCP.
    pub truncated: Counter,
    /// Index build duration.
    pub index_build_seconds: Histogram,
    /// How long the upstreams took to answer a forwarded query, every
    /// upstream tried included.
    pub upstream_seconds: Histogram,
    /// Forwarded UDP queries, from their receipt to their answer sent: the
    /// upstream's time and the stub's own.
    pub forward_seconds: Histogram,
    /// Names in the index.
    pub names: Gauge,
    /// ACKs sent before the DNS index served the version they name.
    pub acks_before_index: Counter,
    /// From an EndpointSlice's change (its `last-change-trigger-time`) to
    /// the stub answering from it, by `service_kind` (`cluster_ip`,
    /// `headless`): CoreDNS's
    /// `coredns_kubernetes_dns_programming_duration_seconds`.
    pub programming_seconds: ProgrammingFamily,
}

/// Histograms of DNS programming latency by Service kind.
pub type ProgrammingFamily =
    prometheus_client::metrics::family::Family<Vec<(String, String)>, Histogram, fn() -> Histogram>;

/// CoreDNS's buckets for DNS programming latency: 1 ms doubling, 20 of them.
fn programming_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

impl Default for DnsMetrics {
    fn default() -> Self {
        let by_rcode = RcodeFamily::default();
        // Each counter is resolved once and shared with the family.
        let responses = DNS_RCODES.map(|code| {
            by_rcode
                .get_or_create(&vec![("rcode".into(), code.into())])
                .clone()
        });
        Self {
            by_rcode,
            responses,
            forwarded: Counter::default(),
            cache_hits: Counter::default(),
            forward_failures: Counter::default(),
            stale_answers: Counter::default(),
            prefetches: Counter::default(),
            forward_overload: Counter::default(),
            tcp_refused: Counter::default(),
            refused_sources: Counter::default(),
            dropped: Counter::default(),
            truncated: Counter::default(),
            index_build_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            upstream_seconds: forward_buckets(),
            forward_seconds: forward_buckets(),
            names: Gauge::default(),
            acks_before_index: Counter::default(),
            programming_seconds: {
                // Both kinds exported from the start (empty histograms).
                let family = ProgrammingFamily::new_with_constructor(programming_buckets);
                for kind in ["cluster_ip", "headless"] {
                    drop(family.get_or_create(&vec![("service_kind".to_owned(), kind.to_owned())]));
                }
                family
            },
        }
    }
}

/// 0.25 ms to 2 s, doubling: a forwarded query on a node takes a
/// millisecond or less when its upstream is near, and gives up at 2 s.
fn forward_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.00025, 2.0, 14))
}

impl DnsMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "responses",
            "DNS answers sent, by response code",
            self.by_rcode.clone(),
        );
        r.register(
            "forwarded",
            "Queries forwarded upstream",
            self.forwarded.clone(),
        );
        r.register(
            "cache_hits",
            "Queries answered from the cache of upstream answers",
            self.cache_hits.clone(),
        );
        r.register(
            "forward_failures",
            "Forwarded queries no upstream answered (SERVFAIL, or a stale answer)",
            self.forward_failures.clone(),
        );
        r.register(
            "stale_answers",
            "Forwarded queries answered from an expired answer while no upstream answered",
            self.stale_answers.clone(),
        );
        r.register(
            "prefetches",
            "Popular upstream answers fetched again before they expired",
            self.prefetches.clone(),
        );
        r.register(
            "forward_overload",
            "Queries refused at the --dns-max-inflight limit",
            self.forward_overload.clone(),
        );
        r.register(
            "tcp_refused",
            "DNS TCP connections closed at accept (--dns-max-tcp-connections, --dns-max-tcp-per-source)",
            self.tcp_refused.clone(),
        );
        r.register(
            "refused_sources",
            "Queries refused because of their source address",
            self.refused_sources.clone(),
        );
        r.register(
            "dropped",
            "Messages dropped unanswered",
            self.dropped.clone(),
        );
        r.register(
            "truncated",
            "UDP answers truncated (client retries over TCP)",
            self.truncated.clone(),
        );
        r.register(
            "acks_before_index",
            "ACKs sent before the DNS index served the version they name (after waiting 10 s)",
            self.acks_before_index.clone(),
        );
        r.register(
            "index_build_seconds",
            "Time to build the DNS index from a snapshot",
            self.index_build_seconds.clone(),
        );
        r.register(
            "upstream_seconds",
            "Time for the upstreams to answer a forwarded query",
            self.upstream_seconds.clone(),
        );
        r.register(
            "forward_seconds",
            "Forwarded UDP queries from receipt to answer sent",
            self.forward_seconds.clone(),
        );
        r.register("names", "Names in the DNS index", self.names.clone());
        r.register(
            "programming_duration_seconds",
            "From an EndpointSlice's last-change-trigger-time to the DNS stub answering from it",
            self.programming_seconds.clone(),
        );
    }

    /// Counts one answer with response code `rcode` (its numeric value).
    pub fn count_response(&self, rcode: u16) {
        let i = match rcode {
            0..=5 => usize::from(rcode),
            _ => 6,
        };
        self.responses[i].inc();
    }

    /// Answers by response code.
    pub fn responses_by_rcode(&self) -> std::collections::BTreeMap<String, u64> {
        DNS_RCODES
            .iter()
            .zip(&self.responses)
            .filter(|(_, c)| c.get() > 0)
            .map(|(n, c)| ((*n).to_owned(), c.get()))
            .collect()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::HeldResource;
    use std::sync::Arc;
    use switchyard_model::{Endpoint, EndpointSlice, Service, ServiceKey, ServiceState};

    fn state(slices: &[(&str, Option<i64>)]) -> AgentState {
        let key = ServiceKey::new("default", "shop", "web");
        let st = ServiceState {
            service: Service::new(key.clone()),
            slices: slices
                .iter()
                .map(|(name, t)| EndpointSlice {
                    name: (*name).into(),
                    endpoints: vec![Endpoint {
                        addresses: vec!["10.244.0.1".parse().expect("ip")].into(),
                        ..Endpoint::default()
                    }],
                    trigger_time_unix_nanos: *t,
                    ..EndpointSlice::default()
                })
                .collect(),
        };
        let mut s = AgentState::default();
        s.resources.insert(
            key.to_string(),
            HeldResource {
                version: "v".into(),
                state: Arc::new(st),
            },
        );
        s
    }

    /// The value of one sample line of the text exposition.
    fn sample(m: &Metrics, name: &str) -> f64 {
        let body = m.encode_for(None).1;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{body}"))
    }

    fn changed() -> ChangeSet {
        ChangeSet {
            changed: vec!["default/shop/web".into()],
            removed: Vec::new(),
        }
    }

    #[test]
    fn latency_starts_at_the_trigger_time_and_changes_are_counted() {
        let m = Metrics::new();
        let t = crate::unix_nanos();
        let before = AgentState::default();
        m.record_update(&before, &state(&[("a", Some(t))]), &changed(), 0);
        assert_eq!(
            sample(&m, "kubeproxy_network_programming_duration_seconds_count"),
            1.0
        );
        let sum = sample(&m, "kubeproxy_network_programming_duration_seconds_sum");
        assert!((0.0..5.0).contains(&sum), "{sum}");
        assert_eq!(
            sample(&m, "kubeproxy_sync_proxy_rules_service_changes_total"),
            1.0
        );
        assert_eq!(
            sample(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            1.0
        );

        // The same trigger time again is no new change; a Service-only change
        // counts as a Service change and falls back to the control plane's time.
        let mut moved = state(&[("a", Some(t))]);
        let r = moved.resources.get_mut("default/shop/web").expect("web");
        let mut st = (*r.state).clone();
        st.service.publish_not_ready_addresses = true;
        r.state = Arc::new(st);
        m.record_update(&state(&[("a", Some(t))]), &moved, &changed(), t);
        assert_eq!(
            sample(&m, "kubeproxy_sync_proxy_rules_service_changes_total"),
            2.0
        );
        assert_eq!(
            sample(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            1.0
        );
        assert_eq!(
            sample(&m, "kubeproxy_network_programming_duration_seconds_count"),
            2.0
        );
        assert_eq!(
            sample(
                &m,
                "switchyard_agent_network_programming_latency_seconds_count"
            ),
            2.0
        );
    }

    #[test]
    fn changes_from_before_the_agent_started_are_not_latency() {
        let m = Metrics::new();
        // A slice last changed an hour before start, sent in the first full
        // state, with a snapshot that changed as long ago: no latency.
        let hour_ago = crate::unix_nanos() - 3_600_000_000_000;
        m.record_update(
            &AgentState::default(),
            &state(&[("a", Some(hour_ago))]),
            &changed(),
            hour_ago,
        );
        assert_eq!(
            sample(&m, "kubeproxy_network_programming_duration_seconds_count"),
            0.0
        );
        assert_eq!(
            sample(
                &m,
                "switchyard_agent_network_programming_latency_seconds_count"
            ),
            0.0
        );
        assert_eq!(
            sample(&m, "kubeproxy_sync_proxy_rules_endpoint_changes_total"),
            1.0
        );
    }

    #[test]
    fn kube_proxy_sync_metrics_have_kube_proxy_names() {
        let m = Metrics::new();
        m.kubeproxy
            .synced(true, std::time::Duration::from_millis(30));
        m.kubeproxy
            .synced(false, std::time::Duration::from_millis(3));
        assert_eq!(
            sample(&m, "kubeproxy_sync_proxy_rules_duration_seconds_count"),
            2.0
        );
        assert_eq!(
            sample(&m, "kubeproxy_sync_full_proxy_rules_duration_seconds_count"),
            1.0
        );
        assert_eq!(
            sample(
                &m,
                "kubeproxy_sync_partial_proxy_rules_duration_seconds_count"
            ),
            1.0
        );
        let last = sample(&m, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
        assert!(last > 1.6e9, "{last}");
        let body = m.encode_for(None).1;
        assert!(body.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"}"));
        assert!(
            body.contains(
                "# TYPE kubeproxy_sync_proxy_rules_iptables_restore_failures_total counter"
            )
        );
        assert!(
            body.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"}")
        );
        assert!(body.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"300\"}"));
    }
}
