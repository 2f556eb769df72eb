//! The stream to the control plane: connect, announce what we hold, apply
//! each update, answer ACK or NACK, and reconnect with jittered exponential
//! backoff when anything breaks. The state in force never depends on the
//! connection: while disconnected, the node keeps serving its last good state.

use std::time::Duration;

use rand::Rng;
use switchyard_proto::v1::snapshot_discovery_client::SnapshotDiscoveryClient;
use switchyard_proto::v1::{self, agent_message};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::applier::Applier;
use crate::config::Args;

/// Jittered exponential backoff: each failure doubles the ceiling up to
/// `max`; the wait is drawn from [ceiling/2, ceiling]. Reset only once a
/// response has arrived, so a control plane that accepts and then drops
/// connections is not hammered.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    /// Backoff between `base` and `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            ceiling: base,
        }
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        let ceiling = self.ceiling;
        self.ceiling = (self.ceiling * 2).min(self.max);
        let half = ceiling / 2;
        half + rand::rng().random_range(Duration::ZERO..=half)
    }

    /// Back to the shortest wait.
    pub fn reset(&mut self) {
        self.ceiling = self.base;
    }
}

/// How to reach the control plane.
#[derive(Debug, Clone)]
pub struct Connector {
    endpoint: Endpoint,
}

impl Connector {
    /// Builds the endpoint, with TLS when a CA or a client certificate is given.
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        use anyhow::Context;
        let mut endpoint = Endpoint::from_shared(args.control_plane.clone())
            .with_context(|| format!("--control-plane {:?} is not a URL", args.control_plane))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if args.tls_ca.is_some() || args.tls_cert.is_some() {
            let read = |p: &std::path::PathBuf| {
                std::fs::read(p).with_context(|| format!("reading {}", p.display()))
            };
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &args.tls_ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(name) = &args.tls_server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(tls).context("configuring TLS")?;
        }
        Ok(Self { endpoint })
    }

    async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        self.endpoint.connect().await
    }
}

/// Who this agent is, as announced in its Hello.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// Node name.
    pub node: String,
    /// Cluster id.
    pub cluster: String,
    /// Zone, possibly empty.
    pub zone: String,
}

/// Runs until `shutdown`: one stream at a time, reconnecting with backoff.
pub async fn run(
    connector: Connector,
    who: NodeIdentity,
    mut applier: Applier,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        applier.metrics.connects.inc();
        let result = tokio::select! {
            r = session(&connector, &who, &mut applier, &mut backoff) => r,
            _ = shutdown.cancelled() => return,
        };
        applier.status.update(|s| s.connected = false);
        applier.metrics.connected.set(0);
        match result {
            Ok(()) => tracing::info!("control plane closed the stream; reconnecting"),
            Err(e) => {
                tracing::warn!("stream to the control plane failed: {e}");
                applier.status.update(|s| s.last_error = Some(e));
            }
        }
        let wait = backoff.next_wait();
        tracing::debug!(?wait, "reconnecting after backoff");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn session(
    connector: &Connector,
    who: &NodeIdentity,
    applier: &mut Applier,
    backoff: &mut Backoff,
) -> Result<(), String> {
    let channel = connector
        .connect()
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let mut client = SnapshotDiscoveryClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(4);
    let state = applier.state();
    let hello = v1::AgentMessage {
        kind: Some(agent_message::Kind::Hello(v1::Hello {
            node_name: who.node.clone(),
            cluster_id: who.cluster.clone(),
            zone: who.zone.clone(),
            initial_resource_versions: state.versions(),
            snapshot_version: state.version.clone(),
            role: v1::Role::Agent as i32,
        })),
    };
    drop(state);
    tx.send(hello)
        .await
        .map_err(|_| "stream closed before Hello")?;
    let mut inbound = client
        .stream_snapshots(ReceiverStream::new(rx))
        .await
        .map_err(|s| {
            format!(
                "control plane refused the stream: {}: {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner();
    applier.status.update(|s| s.connected = true);
    applier.metrics.connected.set(1);
    tracing::info!(node = %who.node, "connected to the control plane");
    let mut assembling: Option<v1::SnapshotUpdate> = None;
    while let Some(part) = inbound
        .message()
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
    {
        backoff.reset();
        let Some(update) = assemble(&mut assembling, part) else {
            continue;
        };
        let reply = match applier.apply_update(&update).await {
            Ok(()) => agent_message::Kind::Ack(v1::Ack {
                nonce: update.nonce.clone(),
                snapshot_version: update.snapshot_version.clone(),
            }),
            Err(error_detail) => agent_message::Kind::Nack(v1::Nack {
                nonce: update.nonce.clone(),
                snapshot_version: update.snapshot_version.clone(),
                error_detail,
            }),
        };
        tx.send(v1::AgentMessage { kind: Some(reply) })
            .await
            .map_err(|_| "stream closed")?;
    }
    Ok(())
}

/// Collects the parts of one update (protocol rule 7). Returns the whole
/// update once its last part arrived. A part with another nonce abandons an
/// unfinished update: the control plane never interleaves updates, so that
/// only happens after a protocol error, and the new update stands alone.
fn assemble(
    assembling: &mut Option<v1::SnapshotUpdate>,
    part: v1::SnapshotUpdate,
) -> Option<v1::SnapshotUpdate> {
    let update = match assembling.take() {
        Some(mut acc) if acc.nonce == part.nonce => {
            acc.resources.extend(part.resources);
            acc.removed_resources.extend(part.removed_resources);
            acc.continued = part.continued;
            acc
        }
        Some(acc) => {
            tracing::warn!(nonce = %acc.nonce, "abandoning an update whose last part never came");
            part
        }
        None => part,
    };
    if update.continued {
        *assembling = Some(update);
        None
    } else {
        Some(update)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(nonce: &str, names: &[&str], continued: bool) -> v1::SnapshotUpdate {
        v1::SnapshotUpdate {
            nonce: nonce.into(),
            snapshot_version: "v".into(),
            resources: names
                .iter()
                .map(|n| v1::Resource {
                    name: (*n).into(),
                    ..Default::default()
                })
                .collect(),
            continued,
            ..Default::default()
        }
    }

    #[test]
    fn parts_are_assembled_into_one_update() {
        let mut acc = None;
        assert!(assemble(&mut acc, part("1", &["a"], true)).is_none());
        assert!(assemble(&mut acc, part("1", &["b"], true)).is_none());
        let whole = assemble(&mut acc, part("1", &["c"], false)).expect("complete");
        let names: Vec<_> = whole.resources.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(acc.is_none());
        // An unfinished update is abandoned by the next nonce.
        assert!(assemble(&mut acc, part("2", &["x"], true)).is_none());
        let next = assemble(&mut acc, part("3", &["y"], false)).expect("complete");
        assert_eq!(next.nonce, "3");
        assert_eq!(next.resources.len(), 1);
    }

    #[test]
    fn backoff_grows_jitters_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let waits: Vec<_> = (0..6).map(|_| b.next_wait()).collect();
        let ceilings = [100, 200, 400, 800, 800, 800];
        for (w, c) in waits.iter().zip(ceilings) {
            let c = Duration::from_millis(c);
            assert!(*w >= c / 2 && *w <= c, "{w:?} outside [{:?}, {c:?}]", c / 2);
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }
}
