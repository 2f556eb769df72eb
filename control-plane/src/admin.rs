//! The admin HTTP endpoint.
//!
//! ```text
//!  /          the endpoints below
//!  /healthz   alive
//!  /readyz    200 once every source has synced and the first snapshot exists
//!  /metrics   OpenMetrics or Prometheus text, as Accept asks
//!  /status    JSON; ?service=NS/NAME: one Service of the snapshot with its endpoints
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::snapshot::Snapshot;
use crate::status::Status;

#[derive(Debug, Clone)]
struct AdminState {
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
}

const INDEX: &str = "switchyard-control-plane admin endpoints:
  /healthz   alive
  /readyz    200 once every source has synced and the first snapshot exists
  /metrics   switchyard_control_plane_* (OpenMetrics or Prometheus text, as Accept asks)
  /status    JSON; /status?service=NAMESPACE/NAME shows one Service with its endpoints
";
/// Only `/healthz` and `/readyz`, for kubelet probes on an address the
/// pod network reaches (`--health-listen`), while `/status` and `/metrics`
/// stay on the loopback admin address.
pub fn probes(
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState {
            status,
            metrics,
            snapshots,
        })
}

/// The admin routes.
pub fn router(
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
) -> Router {
    Router::new()
        .route("/", get(|| async { INDEX }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status_json))
        .with_state(AdminState {
            status,
            metrics,
            snapshots,
        })
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.status.ready() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        let doc = s.status.document();
        let waiting: Vec<String> = doc
            .sources
            .iter()
            .filter(|src| !src.synced)
            .map(|src| match &src.last_error {
                Some(e) => format!("{} ({e})", src.name),
                None => src.name.clone(),
            })
            .collect();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "waiting for every source to sync: {}\n",
                if waiting.is_empty() {
                    "the first snapshot".to_owned()
                } else {
                    waiting.join("; ")
                }
            ),
        )
    }
}

/// OpenMetrics or Prometheus text 0.0.4, as the scraper's `Accept` asks;
/// the content type always says which.
async fn metrics_text(State(s): State<AdminState>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    s.metrics.observe_status(&s.status);
    let (content_type, body) = s.metrics.encode_for(accept);
    ([(header::CONTENT_TYPE, content_type)], body)
}

async fn status_json(
    State(s): State<AdminState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    match query.get("service") {
        Some(wanted) => service(&s, wanted),
        None => Json(s.status.document()).into_response(),
    }
}

/// One Service of the current snapshot (in every cluster that has it),
/// with its endpoints and their conditions, and what was skipped about it.
fn service(s: &AdminState, wanted: &str) -> Response {
    let parts: Vec<&str> = wanted.split('/').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({
                "error": format!("{wanted:?}: expected service=NAMESPACE/NAME or CLUSTER/NAMESPACE/NAME")
            })),
        )
            .into_response();
    }
    let suffix = format!("/{}/{}", parts[parts.len() - 2], parts[parts.len() - 1]);
    let snapshot = s.snapshots.borrow().clone();
    let mut found = Vec::new();
    if let Some(snap) = &snapshot {
        for (name, resource) in &snap.resources {
            let matches = if parts.len() == 3 {
                **name == *wanted
            } else {
                name.ends_with(&suffix) && name.matches('/').count() == 2
            };
            if !matches {
                continue;
            }
            match switchyard_proto::convert::decode_state_bytes(name, &resource.service_state) {
                Ok(state) => {
                    let mut view = crate::status::service_view(&state);
                    view["resource_version"] = resource.version.clone().into();
                    found.push(view);
                }
                Err(e) => found.push(serde_json::json!({"name": &**name, "error": e.to_string()})),
            }
        }
    }
    let object = |kind: &str| {
        if parts.len() == 3 && parts[0] != switchyard_model::DEFAULT_CLUSTER {
            format!("{kind} {wanted}")
        } else {
            format!(
                "{kind} {}/{}",
                parts[parts.len() - 2],
                parts[parts.len() - 1]
            )
        }
    };
    let service_object = object("Service");
    let invalid: Vec<_> = s
        .status
        .document()
        .invalid_objects
        .into_iter()
        .filter(|e| e.object == service_object)
        .collect();
    let version = snapshot.as_ref().map(|s| s.version.clone());
    match found.len() {
        0 => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({
                "error": format!("no {service_object} in the snapshot"),
                "version": version,
                "invalid_objects": invalid,
            })),
        )
            .into_response(),
        1 => {
            let mut view = found.remove(0);
            view["snapshot_version"] = version.into();
            view["invalid_objects"] = serde_json::to_value(&invalid).unwrap_or_default();
            Json(view).into_response()
        }
        _ => Json(serde_json::json!({
            "snapshot_version": version,
            "clusters": found,
            "invalid_objects": invalid,
        }))
        .into_response(),
    }
}
