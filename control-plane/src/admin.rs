//! The admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics`, `/status`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json};
use axum::routing::get;

use crate::metrics::Metrics;
use crate::status::Status;

#[derive(Debug, Clone)]
struct AdminState {
    status: Arc<Status>,
    metrics: Arc<Metrics>,
}

/// The admin routes.
pub fn router(status: Arc<Status>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/status", get(status_json))
        .with_state(AdminState { status, metrics })
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.status.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for every source to sync\n",
        )
    }
}

/// OpenMetrics or Prometheus text 0.0.4, as the scraper's `Accept` asks;
/// the content type always says which.
async fn metrics_text(State(s): State<AdminState>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = s.metrics.encode_for(accept);
    ([(header::CONTENT_TYPE, content_type)], body)
}

async fn status_json(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.status.document())
}
