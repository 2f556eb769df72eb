//! The admin HTTP endpoint: `/healthz`, `/metrics`, `/status`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::Json;
use axum::routing::get;

use crate::status::{Metrics, Status};

#[derive(Debug, Clone)]
struct AdminState {
    status: Arc<Status>,
    metrics: Arc<Metrics>,
}

/// The admin routes.
pub fn router(status: Arc<Status>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            // OpenMetrics or Prometheus text 0.0.4, as `Accept` asks; the
            // content type always says which.
            get(
                |State(s): State<AdminState>, headers: HeaderMap| async move {
                    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
                    let (content_type, body) = s.metrics.encode_for(accept);
                    ([(header::CONTENT_TYPE, content_type)], body)
                },
            ),
        )
        .route(
            "/status",
            get(|State(s): State<AdminState>| async move {
                let mut doc = s.status.document();
                if let Some(dns) = doc.dns.as_mut() {
                    let m = &s.metrics.dns;
                    dns.queries = m.responses_by_rcode();
                    dns.forwarded = m.forwarded.get();
                    dns.refused_sources = m.refused_sources.get();
                }
                Json(doc)
            }),
        )
        .with_state(AdminState { status, metrics })
}
