//! kube-proxy's health server (`--healthz-bind-address`, port 10256 by
//! default), for what probes kube-proxy on every node: cloud load
//! balancers of `externalTrafficPolicy: Cluster` Services, and the e2e
//! test "should check kube-proxy urls".
//!
//! ```text
//!  /healthz  200 | 503  {"lastUpdated": T, "currentTime": T, "nodeEligible": B}
//!            503 when a change has waited longer than the health timeout,
//!            or the Node is leaving (deleted, or tainted ToBeDeletedByClusterAutoscaler)
//!  /livez    200 | 503  {"lastUpdated": T, "currentTime": T}: the same, the Node left out
//! ```
//!
//! The rule is kube-proxy's (`pkg/proxy/healthcheck/proxy_health.go`):
//! healthy while no change has waited longer than the timeout (twice the
//! sync period) to reach the kernel; while healthy, `lastUpdated` is the
//! current time, else the last successful sync. KEP-3836 added the Node:
//! `/healthz` fails while the Node is being deleted or carries the cluster
//! autoscaler's `ToBeDeletedByClusterAutoscaler` taint, so that load
//! balancers stop sending new connections to it before it goes; the agent
//! learns that from the control plane (`SnapshotUpdate.node_draining`).
//! Times are RFC 3339 (kube-proxy prints Go's `time.Time` format); the
//! agent's own `/healthz` on the admin listener is unchanged.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::status::{Metrics, Status};

/// What the health server reads.
#[derive(Debug, Clone)]
pub struct ProxyHealth {
    /// The agent's status: its syncs and its Node's eligibility.
    pub status: Arc<Status>,
    /// Where `kubeproxy_proxy_healthz_total` and `..._livez_total` count.
    pub metrics: Arc<Metrics>,
    /// A change may wait this long before the proxy is unhealthy.
    pub timeout: Duration,
}

/// One answer of the health server: its code and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// 200 or 503.
    pub code: StatusCode,
    /// The JSON body.
    pub body: String,
}

impl ProxyHealth {
    /// Whether the data plane keeps up, the Node left out (kube-proxy's
    /// `IsHealthy`; what `healthCheckNodePort` servers report as
    /// `serviceProxyHealthy`).
    pub fn proxy_healthy(&self) -> bool {
        self.status.sync_report(self.timeout).healthy
    }

    /// The `/healthz` answer (`with_node`) or the `/livez` one, at `now`
    /// (Unix seconds).
    pub fn verdict(&self, with_node: bool, now: f64) -> Verdict {
        let report = self.status.sync_report(self.timeout);
        let eligible = self.status.node_draining().is_none();
        let healthy = report.healthy && (eligible || !with_node);
        let last = if healthy {
            now
        } else {
            report.last_sync_unix_seconds.unwrap_or(0.0)
        };
        let mut body = serde_json::json!({
            "lastUpdated": rfc3339(last),
            "currentTime": rfc3339(now),
        });
        if with_node {
            body["nodeEligible"] = eligible.into();
        }
        let code = if healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        Verdict {
            code,
            body: body.to_string(),
        }
    }
}

/// `secs` (Unix seconds) as RFC 3339 in UTC.
fn rfc3339(secs: f64) -> String {
    let nanos = (secs * 1e9) as i128;
    jiff::Timestamp::from_nanosecond(nanos)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The health server's routes.
pub fn router(health: ProxyHealth) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(health)
}

async fn healthz(State(h): State<ProxyHealth>) -> Response {
    answer(&h, true)
}

async fn livez(State(h): State<ProxyHealth>) -> Response {
    answer(&h, false)
}

fn answer(h: &ProxyHealth, with_node: bool) -> Response {
    let v = h.verdict(with_node, crate::unix_nanos() as f64 / 1e9);
    let counter = if with_node {
        &h.metrics.kubeproxy.healthz
    } else {
        &h.metrics.kubeproxy.livez
    };
    counter
        .get_or_create(&vec![("code".to_owned(), v.code.as_u16().to_string())])
        .inc();
    (
        v.code,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        v.body,
    )
        .into_response()
}

/// Binds `addr` for a listener on one of kube-proxy's well-known ports. The
/// port may still be held by the kube-proxy this agent replaces (both run
/// while a node migrates): then the listener is bound as soon as the port
/// is free, checked every 5 s, with a warning once. Any other error is the
/// caller's. Returns the listener once bound, or `None` at shutdown.
pub async fn bind_when_free(
    addr: SocketAddr,
    flag: &'static str,
    shutdown: &CancellationToken,
) -> std::io::Result<Option<TcpListener>> {
    let mut warned = false;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => {
                if warned {
                    tracing::info!(%addr, "{flag}: the address is free now; listening");
                }
                return Ok(Some(l));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if !warned {
                    tracing::warn!(%addr, "{flag}: the address is in use (kube-proxy still running on this node?); retrying every 5s");
                    warned = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    () = shutdown.cancelled() => return Ok(None),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> ProxyHealth {
        ProxyHealth {
            status: Arc::new(Status::new("n1".into(), "c".into(), None, "none")),
            metrics: Arc::new(Metrics::new()),
            timeout: Duration::from_secs(60),
        }
    }

    fn json(v: &Verdict) -> serde_json::Value {
        serde_json::from_str(&v.body).expect("JSON")
    }

    #[test]
    fn healthy_until_the_node_drains_and_livez_ignores_the_node() {
        let h = health();
        h.status.sync_succeeded();
        let now = 1_765_047_600.5;
        let v = h.verdict(true, now);
        assert_eq!(v.code, StatusCode::OK);
        let body = json(&v);
        assert_eq!(body["nodeEligible"], true);
        assert_eq!(body["currentTime"], "2025-12-06T19:00:00.5Z");
        assert_eq!(body["lastUpdated"], body["currentTime"], "healthy: now");

        h.status
            .update(|s| s.node_draining = Some("ToBeDeletedByClusterAutoscaler".into()));
        let v = h.verdict(true, now);
        assert_eq!(v.code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(json(&v)["nodeEligible"], false);
        let live = h.verdict(false, now);
        assert_eq!(live.code, StatusCode::OK, "/livez leaves the Node out");
        assert!(json(&live).get("nodeEligible").is_none());
        assert!(h.proxy_healthy());
    }

    #[test]
    fn a_change_waiting_past_the_timeout_fails_both() {
        let mut h = health();
        h.timeout = Duration::ZERO;
        h.status.sync_succeeded();
        h.status.sync_queued();
        for with_node in [true, false] {
            let v = h.verdict(with_node, 1_765_047_600.0);
            assert_eq!(v.code, StatusCode::SERVICE_UNAVAILABLE);
            assert_ne!(
                json(&v)["lastUpdated"],
                json(&v)["currentTime"],
                "unhealthy: the last sync"
            );
        }
        assert!(!h.proxy_healthy());
    }
}
