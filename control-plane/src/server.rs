//! The gRPC side: one task per agent stream, all reading one shared
//! `watch<Arc<Snapshot>>`.
//!
//! Per stream the control plane keeps only an `Arc` of the snapshot the
//! agent last ACKed (shared with every other agent at that version), the
//! in-flight update's nonce and the version the agent is parked on after a
//! NACK. Updates are differences from the ACKed snapshot, computed once per
//! base version for all streams (see `crate::snapshot`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::v1::snapshot_discovery_server::SnapshotDiscovery;
use switchyard_proto::v1::{self, agent_message};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;
use crate::snapshot::{Delta, Snapshot, View};
use crate::status::{Status as CpStatus, StreamHandle};

/// How long an agent may take to send its `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Resource bytes per message of an update (protocol rule 7). The gRPC
/// encoder keeps a buffer as large as the largest message it encoded for the
/// life of the stream, so this bounds what each connected agent costs.
pub const MAX_PART_BYTES: usize = 16 * 1024;

/// The `SnapshotDiscovery` service.
#[derive(Debug, Clone)]
pub struct SnapshotService {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    status: Arc<CpStatus>,
    metrics: Arc<Metrics>,
    /// With mTLS, the node name must match the client certificate.
    require_client_identity: bool,
    shutdown: CancellationToken,
}

impl SnapshotService {
    /// A service streaming from `snapshots`.
    pub fn new(
        snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        status: Arc<CpStatus>,
        metrics: Arc<Metrics>,
        require_client_identity: bool,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            snapshots,
            status,
            metrics,
            require_client_identity,
            shutdown,
        }
    }
}

/// The node a client certificate names: its subject Common Name, with the
/// kubelet convention `system:node:` stripped.
pub fn node_from_certificate(der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable client certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or("client certificate has no subject Common Name")?;
    Ok(cn.strip_prefix("system:node:").unwrap_or(cn).to_owned())
}

#[tonic::async_trait]
impl SnapshotDiscovery for SnapshotService {
    type StreamSnapshotsStream = ReceiverStream<Result<v1::SnapshotUpdate, Status>>;

    async fn stream_snapshots(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::StreamSnapshotsStream>, Status> {
        let cert_node = if self.require_client_identity {
            let certs = request
                .peer_certs()
                .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
            let leaf = certs
                .first()
                .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
            Some(node_from_certificate(leaf).map_err(Status::unauthenticated)?)
        } else {
            None
        };
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(agent_message::Kind::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on a stream must be a Hello",
                ));
            }
        };
        if hello.node_name.is_empty() {
            return Err(Status::invalid_argument("Hello.node_name is empty"));
        }
        if let Some(cert_node) = cert_node
            && cert_node != hello.node_name
        {
            tracing::warn!(cert = %cert_node, claimed = %hello.node_name, "refused agent: node name does not match its certificate");
            return Err(Status::permission_denied(format!(
                "node name {:?} does not match the client certificate, which names node {cert_node:?}",
                hello.node_name
            )));
        }
        let cluster = if hello.cluster_id.is_empty() {
            switchyard_model::DEFAULT_CLUSTER.to_owned()
        } else {
            hello.cluster_id.clone()
        };
        let view = match v1::Role::try_from(hello.role) {
            Ok(v1::Role::Agent) if cluster == switchyard_model::CLUSTERSET => {
                return Err(Status::invalid_argument(format!(
                    "Hello.cluster_id {cluster:?} is reserved for the clusterset's imports; an agent names its own cluster"
                )));
            }
            Ok(v1::Role::Agent) => View::Agent(cluster.clone()),
            Ok(v1::Role::Relay) if cluster == switchyard_model::CLUSTERSET => View::Clusterset,
            Ok(v1::Role::Relay) => View::Exports(cluster.clone()),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "Hello.role {} is not AGENT or RELAY",
                    hello.role
                )));
            }
        };
        let handle = self
            .status
            .connected(&hello.node_name, &cluster, &hello.zone);
        self.metrics.agents_connected.inc();
        tracing::info!(node = %hello.node_name, %cluster, held = hello.initial_resource_versions.len(), "agent connected");

        let (tx, rx) = mpsc::channel(2);
        let stream = AgentStream {
            node: hello.node_name,
            view,
            baseline: Baseline::Announced(hello.initial_resource_versions),
            in_flight: None,
            parked_on: None,
            next_nonce: 1,
            handle,
        };
        let this = self.clone();
        tokio::spawn(async move {
            let node = stream.node.clone();
            let handle = stream.handle.clone();
            if let Err(e) = stream.run(&this, inbound, tx).await {
                tracing::info!(%node, "agent stream ended: {e}");
            }
            this.status.disconnected(&handle);
            this.metrics.agents_connected.dec();
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Builds the messages of one update. Resources are cheap to copy: their
/// payload is shared `Bytes`. The removed names travel in the first part.
fn split_into_parts(
    delta: &Delta,
    version: &str,
    nonce: &str,
    changed_at_unix_nanos: i64,
) -> Vec<v1::SnapshotUpdate> {
    let part = |resources: Vec<v1::Resource>, removed_resources: Vec<String>| v1::SnapshotUpdate {
        snapshot_version: version.to_owned(),
        nonce: nonce.to_owned(),
        resources,
        removed_resources,
        changed_at_unix_nanos,
        continued: true,
        ..Default::default()
    };
    let mut parts = Vec::new();
    let mut removed: Vec<String> = delta.removed.iter().map(|n| n.to_string()).collect();
    let mut current = Vec::new();
    let mut bytes = 0;
    for r in &delta.changed {
        let size = r.service_state.len() + r.name.len() + r.version.len();
        if !current.is_empty() && bytes + size > MAX_PART_BYTES {
            parts.push(part(
                std::mem::take(&mut current),
                std::mem::take(&mut removed),
            ));
            bytes = 0;
        }
        current.push((**r).clone());
        bytes += size;
    }
    parts.push(part(current, removed));
    if let Some(last) = parts.last_mut() {
        last.continued = false;
    }
    parts
}

/// What the agent holds.
#[derive(Debug)]
enum Baseline {
    /// The versions it announced in its Hello (until the first ACK).
    Announced(HashMap<String, String>),
    /// The snapshot it last ACKed.
    Acked(Arc<Snapshot>),
}

#[derive(Debug)]
struct AgentStream {
    node: String,
    /// What the stream receives (an agent's cluster, or a relay's part).
    view: View,
    baseline: Baseline,
    in_flight: Option<(String, Arc<Snapshot>)>,
    parked_on: Option<String>,
    next_nonce: u64,
    handle: StreamHandle,
}

impl AgentStream {
    async fn run(
        mut self,
        svc: &SnapshotService,
        mut inbound: Streaming<v1::AgentMessage>,
        tx: mpsc::Sender<Result<v1::SnapshotUpdate, Status>>,
    ) -> Result<(), String> {
        let mut snapshots = svc.snapshots.clone();
        loop {
            if self.in_flight.is_none() {
                let current = snapshots.borrow_and_update().clone();
                if let Some(current) = current
                    && let Some(parts) = self.next_update(&current)
                {
                    let count: usize = parts.iter().map(|p| p.resources.len()).sum();
                    let zone = svc.status.node_zone(&self.node);
                    for mut part in parts {
                        part.node_zone.clone_from(&zone);
                        tokio::select! {
                            sent = tx.send(Ok(part)) => sent.map_err(|_| "agent went away".to_owned())?,
                            _ = svc.shutdown.cancelled() => return Err("control plane shutting down".into()),
                        }
                    }
                    svc.status.pushed(&self.handle, count);
                    svc.metrics.pushes.inc();
                    svc.metrics.resources_sent.inc_by(count as u64);
                }
            }
            tokio::select! {
                msg = inbound.message() => {
                    let msg = msg.map_err(|e| e.to_string())?.ok_or("agent closed the stream")?;
                    self.on_message(svc, msg);
                }
                changed = snapshots.changed(), if self.in_flight.is_none() => {
                    changed.map_err(|_| "control plane shutting down".to_owned())?;
                }
                _ = svc.shutdown.cancelled() => return Err("control plane shutting down".into()),
            }
        }
    }

    /// The update that brings the agent to `current`, if it needs one, in
    /// parts of at most [`MAX_PART_BYTES`] of resources each.
    fn next_update(&mut self, current: &Arc<Snapshot>) -> Option<Vec<v1::SnapshotUpdate>> {
        if self.parked_on.as_deref() == Some(current.version.as_str()) {
            return None;
        }
        // Until every source of its cluster has synced, the agent keeps what it has.
        if !current.serves(self.view.cluster()) {
            return None;
        }
        let delta: Arc<Delta> = match &self.baseline {
            Baseline::Acked(base) if base.version == current.version => return None,
            Baseline::Acked(base) => current.delta_from(base, &self.view),
            // The first update is sent even when empty, so the agent learns the version.
            Baseline::Announced(held) => Arc::new(current.delta_from_versions(held, &self.view)),
        };
        let nonce = self.next_nonce.to_string();
        self.next_nonce += 1;
        self.in_flight = Some((nonce.clone(), current.clone()));
        Some(split_into_parts(
            &delta,
            &current.version,
            &nonce,
            current.changed_at_unix_nanos,
        ))
    }

    fn on_message(&mut self, svc: &SnapshotService, msg: v1::AgentMessage) {
        match msg.kind {
            Some(agent_message::Kind::Ack(ack)) => {
                let Some((nonce, snapshot)) = self.in_flight.take_if(|(n, _)| *n == ack.nonce)
                else {
                    tracing::debug!(node = %self.node, nonce = %ack.nonce, "ignoring ACK of a stale nonce");
                    return;
                };
                tracing::debug!(node = %self.node, %nonce, version = %snapshot.version, "ACK");
                // Count first: status watchers that wake on the ACK may read the counter.
                svc.metrics.acks.inc();
                svc.status.acked(&self.handle, &snapshot.version);
                self.parked_on = None;
                self.baseline = Baseline::Acked(snapshot);
            }
            Some(agent_message::Kind::Nack(nack)) => {
                let Some((_, snapshot)) = self.in_flight.take_if(|(n, _)| *n == nack.nonce) else {
                    tracing::debug!(node = %self.node, nonce = %nack.nonce, "ignoring NACK of a stale nonce");
                    return;
                };
                tracing::warn!(node = %self.node, version = %snapshot.version, error = %nack.error_detail, "agent rejected a snapshot; parked until the next change");
                svc.status
                    .nacked(&self.handle, &snapshot.version, &nack.error_detail);
                svc.metrics.nacks.inc();
                self.parked_on = Some(snapshot.version.clone());
            }
            Some(agent_message::Kind::Hello(_)) | None => {
                tracing::debug!(node = %self.node, "ignoring a repeated Hello");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(name: &str, size: usize) -> Arc<v1::Resource> {
        Arc::new(v1::Resource {
            name: name.into(),
            version: "v".into(),
            service_state: bytes::Bytes::from(vec![0u8; size]),
        })
    }

    #[test]
    fn large_updates_are_split_and_small_ones_are_not() {
        let small = Delta {
            changed: vec![resource("a", 100)],
            removed: vec![Arc::from("gone")],
        };
        let parts = split_into_parts(&small, "v1", "7", 5);
        assert_eq!(parts.len(), 1);
        assert!(!parts[0].continued);
        assert_eq!(parts[0].removed_resources, ["gone"]);

        let big = Delta {
            changed: (0..100).map(|i| resource(&format!("r{i}"), 1000)).collect(),
            removed: vec![Arc::from("gone")],
        };
        let parts = split_into_parts(&big, "v2", "8", 5);
        assert!(parts.len() >= 6, "{} parts", parts.len());
        assert!(
            parts
                .iter()
                .all(|p| p.nonce == "8" && p.snapshot_version == "v2")
        );
        assert!(parts[..parts.len() - 1].iter().all(|p| p.continued));
        assert!(!parts[parts.len() - 1].continued);
        let total: usize = parts.iter().map(|p| p.resources.len()).sum();
        assert_eq!(total, 100);
        let removed: Vec<_> = parts
            .iter()
            .flat_map(|p| p.removed_resources.clone())
            .collect();
        assert_eq!(removed, ["gone"]);
        for p in &parts {
            let bytes: usize = p.resources.iter().map(|r| r.service_state.len()).sum();
            assert!(bytes <= MAX_PART_BYTES, "{bytes}");
        }
    }
}
