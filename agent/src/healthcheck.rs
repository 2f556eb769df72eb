//! `healthCheckNodePort` servers for Services with
//! `externalTrafficPolicy: Local`: load balancers ask each node whether it
//! has local endpoints. 200 with the count of *ready* local endpoints when
//! it has some and the node's rules keep up (`serviceProxyHealthy`, kube-
//! proxy's rule), 503 when not: a node whose only local endpoints are
//! serving+terminating still serves its node port with them, but tells the
//! load balancer to send new connections elsewhere (kube-proxy's
//! `LocalReadyEndpoints`).
//!
//! ```text
//!  watch<AgentState> ─▶ desired {port -> (Service, local endpoints)} ─▶ one listener per port
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use switchyard_model::TrafficPolicy;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::endpoints;
use crate::proxyhealth::ProxyHealth;
use crate::state::AgentState;

/// What one health-check port reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthTarget {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Ready endpoints on this node.
    pub local_endpoints: usize,
}

/// The health-check ports `state` asks for on `node`.
pub fn targets(state: &AgentState, node: &str) -> BTreeMap<u16, HealthTarget> {
    let mut out = BTreeMap::new();
    for held in state.resources.values() {
        let svc = &held.state.service;
        if svc.external_traffic_policy != TrafficPolicy::Local || !svc.is_proxied() {
            continue;
        }
        if let Some(port) = svc.health_check_node_port {
            out.insert(
                port,
                HealthTarget {
                    namespace: svc.key.namespace.clone(),
                    name: svc.key.name.clone(),
                    local_endpoints: endpoints::local_ready_endpoints(&held.state, node),
                },
            );
        }
    }
    out
}

/// What one port's server answers from, updated in place.
type Target = Arc<Mutex<Option<HealthTarget>>>;

async fn answer(State((target, proxy)): State<(Target, ProxyHealth)>) -> impl IntoResponse {
    let t = target.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(t) = t else {
        return (StatusCode::SERVICE_UNAVAILABLE, String::new());
    };
    // As kube-proxy: a node whose rules lag tells the load balancer to go
    // elsewhere even with local endpoints.
    let proxy_healthy = proxy.proxy_healthy();
    let body = serde_json::json!({
        "service": {"namespace": t.namespace, "name": t.name},
        "localEndpoints": t.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    })
    .to_string();
    let code = if t.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

/// Follows the state in force and keeps one listener per health-check port.
pub async fn run(
    node: String,
    bind: IpAddr,
    mut state: watch::Receiver<Arc<AgentState>>,
    proxy: ProxyHealth,
    shutdown: CancellationToken,
) {
    let mut servers: BTreeMap<u16, (Target, CancellationToken)> = BTreeMap::new();
    loop {
        // A port another process holds (the agent this one took over from,
        // still closing it) is tried again a second later.
        let mut missing = false;
        let wanted = targets(&state.borrow_and_update(), &node);
        servers.retain(|port, (_, stop)| {
            let keep = wanted.contains_key(port);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for (port, target) in wanted {
            if let Some((shared, _)) = servers.get(&port) {
                *shared.lock().unwrap_or_else(|e| e.into_inner()) = Some(target);
                continue;
            }
            let addr = SocketAddr::new(bind, port);
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    let shared = Arc::new(Mutex::new(Some(target)));
                    let stop = shutdown.child_token();
                    let app = axum::Router::new()
                        .fallback(answer)
                        .with_state((shared.clone(), proxy.clone()));
                    let until = stop.clone().cancelled_owned();
                    tokio::spawn(async move {
                        if let Err(e) = axum::serve(listener, app)
                            .with_graceful_shutdown(until)
                            .await
                        {
                            tracing::warn!(%addr, "health check server failed: {e}");
                        }
                    });
                    servers.insert(port, (shared, stop));
                }
                Err(e) => {
                    tracing::warn!(%addr, "cannot serve healthCheckNodePort (retrying): {e}");
                    missing = true;
                }
            }
        }
        let retry = async {
            if missing {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            () = retry => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
