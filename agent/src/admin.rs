//! The admin HTTP endpoint: `/healthz`, `/metrics`, `/status`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
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
            get(|State(s): State<AdminState>| async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    s.metrics.encode(),
                )
            }),
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
