//! The admin HTTP endpoint, on loopback by default, and the metrics-only
//! listener (`--metrics-listen`) a cluster Prometheus can scrape.
//!
//! ```text
//!  /          the endpoints below
//!  /healthz   200 unless a change has waited longer than twice the sync period (kube-proxy's rule)
//!             or the state cannot be persisted
//!  /readyz    200 once a state has been put in force
//!  /metrics   OpenMetrics or Prometheus text, as Accept asks
//!  /status    JSON; ?service=NS/NAME: one Service as held and as programmed
//! ```
//!
//! `/status?service=NS/NAME` shows the held `ServiceState` and
//! `DataPlane::describe` (iptables recomputes the Service's rules from the
//! last good state, since rules are a pure function of it; `none` returns
//! its record). The data plane's lock is only tried, so a long sync is
//! reported rather than waited for. `--metrics-listen` serves `/metrics`
//! (and kube-proxy's `/proxyMode`) alone on a second listener; `/status`
//! stays on `--admin-listen`. Both kube-proxy ports (this one and
//! `--healthz-bind-address`) are bound once free when kube-proxy still
//! holds them, so a node can run both while it migrates.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::sync::watch;

use crate::dataplane::DataPlane;
use crate::state::AgentState;
use crate::status::{Metrics, Status};

/// What the admin endpoint reads.
#[derive(Clone)]
pub struct AdminContext {
    /// Shared status.
    pub status: Arc<Status>,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// The state in force.
    pub state: watch::Receiver<Arc<AgentState>>,
    /// The data plane, asked what it programmed for one Service.
    pub dataplane: Arc<Mutex<Box<dyn DataPlane>>>,
    /// `/healthz` fails when a change waits longer than this.
    pub health_timeout: Duration,
    /// This node's cluster, for `?service=NS/NAME`.
    pub cluster: String,
}

impl std::fmt::Debug for AdminContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminContext")
            .field("health_timeout", &self.health_timeout)
            .finish_non_exhaustive()
    }
}

const INDEX: &str = "switchyard-agent admin endpoints:
  /healthz   200 unless a change has waited longer than twice --iptables-sync-period,
             or the state cannot be persisted (a full --state-dir)
  /readyz    200 once a state has been put in force
  /metrics   switchyard_agent_* and kubeproxy_* (OpenMetrics or Prometheus text, as Accept asks)
  /status    JSON; /status?service=NAMESPACE/NAME shows one Service as held and as programmed
";

/// The admin routes.
pub fn router(ctx: AdminContext) -> Router {
    Router::new()
        .route("/", get(|| async { INDEX }))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(ctx)
}

/// Only `/metrics` and kube-proxy's `/proxyMode` (and `/`), for
/// `--metrics-listen` (kube-proxy's metrics port, 10249, serves both).
pub fn metrics_router(ctx: AdminContext) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { "switchyard-agent metrics: /metrics, /proxyMode\n" }),
        )
        .route("/metrics", get(metrics))
        .route("/proxyMode", get(proxy_mode))
        .with_state(ctx)
}

/// The data plane's name, as kube-proxy names its mode (`iptables`,
/// `nftables`; `none` programs nothing).
async fn proxy_mode(State(ctx): State<AdminContext>) -> &'static str {
    ctx.status.dataplane()
}

async fn healthz(State(ctx): State<AdminContext>) -> Response {
    let r = ctx.status.sync_report(ctx.health_timeout);
    if r.healthy {
        return (StatusCode::OK, "ok\n").into_response();
    }
    if let Some(why) = r.persist_error {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response();
    }
    let waited = r.pending_seconds.unwrap_or_default();
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "the data plane has not put a change in force for {waited:.1}s (the limit is {:.1}s, twice --iptables-sync-period)\n",
            r.timeout_seconds
        ),
    )
        .into_response()
}

async fn readyz(State(ctx): State<AdminContext>) -> Response {
    if ctx.status.sync_report(ctx.health_timeout).ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no state put in force yet (none persisted, and none received from the control plane)\n",
        )
            .into_response()
    }
}

/// OpenMetrics or Prometheus text 0.0.4, as `Accept` asks; the content type
/// always says which.
async fn metrics(State(ctx): State<AdminContext>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = ctx.metrics.encode_for(accept);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn status(
    State(ctx): State<AdminContext>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if let Some(wanted) = query.get("service") {
        return service(&ctx, wanted);
    }
    let mut doc = ctx.status.document();
    if let Some(dns) = doc.dns.as_mut() {
        let m = &ctx.metrics.dns;
        dns.queries = m.responses_by_rcode();
        dns.forwarded = m.forwarded.get();
        dns.refused_sources = m.refused_sources.get();
    }
    doc.sync = ctx.status.sync_report(ctx.health_timeout);
    let mut value = serde_json::to_value(&doc).unwrap_or_default();
    if let Some(record) = ctx.dataplane.try_lock().ok().and_then(|dp| dp.record()) {
        value["dataplane_record"] = record;
    }
    Json(value).into_response()
}

/// One Service: what the agent holds and what its data plane programmed.
fn service(ctx: &AdminContext, wanted: &str) -> Response {
    let name = match wanted.matches('/').count() {
        1 => format!("{}/{wanted}", ctx.cluster),
        2 => wanted.to_owned(),
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({
                    "error": format!("{wanted:?}: expected service=NAMESPACE/NAME or CLUSTER/NAMESPACE/NAME")
                })),
            )
                .into_response();
        }
    };
    let state = ctx.state.borrow().clone();
    let Some(held) = state.resources.get(&name) else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "error": format!("no Service {name} in the state in force"),
                "version": state.version,
            })),
        )
            .into_response();
    };
    // A data plane in the middle of a sync holds its lock for as long as
    // the sync takes: say so rather than wait.
    let programmed = match ctx.dataplane.try_lock() {
        Ok(dp) => dp.describe(&name).unwrap_or(serde_json::Value::Null),
        Err(_) => serde_json::json!("the data plane is syncing; ask again"),
    };
    let mut view = service_view(&held.state);
    view["resource_version"] = held.version.clone().into();
    view["snapshot_version"] = state.version.clone().into();
    view["programmed"] = programmed;
    Json(view).into_response()
}

/// A Service and its endpoints with their conditions, as JSON.
pub fn service_view(state: &switchyard_model::ServiceState) -> serde_json::Value {
    let svc = &state.service;
    serde_json::json!({
        "name": format!("{}/{}", svc.key.namespace, svc.key.name),
        "cluster": svc.key.cluster,
        "type": format!("{:?}", svc.service_type),
        "headless": svc.headless,
        "cluster_ips": svc.cluster_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ports": svc.ports.iter().map(|p| serde_json::json!({
            "name": p.name,
            "protocol": p.protocol.to_string(),
            "port": p.port,
            "node_port": p.node_port,
        })).collect::<Vec<_>>(),
        "slices": state.slices.iter().map(|s| serde_json::json!({
            "name": s.name,
            "ports": s.ports.iter().map(|p| format!("{} {}/{}", p.name, p.port, p.protocol)).collect::<Vec<_>>(),
            "endpoints": s.endpoints.iter().map(|e| serde_json::json!({
                "addresses": e.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "ready": e.conditions.ready,
                "serving": e.conditions.serving,
                "terminating": e.conditions.terminating,
                "node": e.node_name.as_deref(),
                "zone": e.zone.as_deref(),
                "hints": e.hint_zones().iter().map(AsRef::as_ref).collect::<Vec<&str>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
