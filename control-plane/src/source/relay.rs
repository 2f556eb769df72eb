//! The `switchyard:URL=CLUSTER` source: another control plane, followed
//! over the same gRPC protocol the agents use (a fleet relay).
//!
//! ```text
//!  hub ── switchyard:http://cp-east=east ──▶ east's exported Services ─┐  (merged by the hub's index)
//!      ── switchyard:http://cp-west=west ──▶ west's exported Services ─┘
//!  cp-east ── switchyard:http://hub=clusterset ──▶ the hub's imports, as they are
//! ```
//!
//! The stream says `Hello { role: RELAY, cluster_id: CLUSTER }`: a cluster
//! id asks for that cluster's exported Services (each with its export's
//! age, so the hub resolves conflicts as a single control plane would),
//! `clusterset` for the clusterset's imports, which then replace the local
//! merge of this control plane. Updates are assembled, decoded and
//! validated like an agent does; a bad one is NACKed and the last good
//! state stays. Versions held are announced on reconnect, so a restart of
//! either side resends only what differs. While the other side is
//! unreachable the last state is kept and shown as `last_error`.
//!
//! The serving side answers with a `snapshot::View`: `Agent(C)` (C's range
//! and the clusterset's, what an agent gets), `Exports(C)` (C's range, only
//! the resources the snapshot lists as exported; a resource carries its
//! export and the export's age in `Service.export`, so the hub's merge sees
//! what a single control plane would) or `Clusterset` (the imports only);
//! deltas are cached per view and base version. Here the parts are
//! assembled with `switchyard_proto::parts`. `Exports(C)` becomes Services,
//! slices (ports as given) and exports of cluster C for the hub's merge;
//! `Clusterset` becomes `SourceState::imports`, which replace the local
//! clusterset merge (the first relay following its hub is used) and are
//! validated and encoded as they are, so a cluster's agents get the hub's
//! ClusterSet IPs.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use switchyard_model::{CLUSTERSET, ServiceState};
use switchyard_proto::convert::decode_state_bytes;
use switchyard_proto::v1::snapshot_discovery_client::SnapshotDiscoveryClient;
use switchyard_proto::v1::{self, agent_message};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use super::{Export, Source, SourceSlice, SourceState};

/// First wait after a failed stream; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// TLS towards the other control plane.
#[derive(Debug, Clone, Default)]
pub struct RelayTls {
    /// CA its certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Our client certificate and key (mTLS).
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// What to follow.
#[derive(Debug, Clone)]
pub struct RelaySourceConfig {
    /// The other control plane's gRPC URL.
    pub url: String,
    /// A cluster id (its exports) or [`CLUSTERSET`] (its imports).
    pub cluster: String,
    /// The name this control plane gives in its Hello.
    pub name: String,
    /// TLS, for `https://` URLs.
    pub tls: RelayTls,
}

/// Follows another control plane.
#[derive(Debug, Clone)]
pub struct RelaySource {
    config: RelaySourceConfig,
}

impl RelaySource {
    /// A source following `config.url`.
    pub fn new(config: RelaySourceConfig) -> Self {
        Self { config }
    }
}

impl Source for RelaySource {
    fn name(&self) -> String {
        format!("switchyard:{}={}", self.config.url, self.config.cluster)
    }

    fn cluster(&self) -> String {
        self.config.cluster.clone()
    }

    fn run(
        self: Box<Self>,
        state: watch::Sender<SourceState>,
        shutdown: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(run(*self, state, shutdown))
    }
}

/// What the relay holds: every resource by name, decoded.
#[derive(Debug, Default)]
struct Held {
    resources: BTreeMap<String, (String, Arc<ServiceState>)>,
    synced: bool,
}

impl Held {
    fn versions(&self) -> HashMap<String, String> {
        self.resources
            .iter()
            .map(|(n, (v, _))| (n.clone(), v.clone()))
            .collect()
    }

    /// Applies one whole update, or changes nothing and says why.
    fn apply(&mut self, update: &v1::SnapshotUpdate, cluster: &str) -> Result<(), String> {
        let mut decoded = Vec::with_capacity(update.resources.len());
        for r in &update.resources {
            let state = decode_state_bytes(&r.name, &r.service_state).map_err(|e| e.to_string())?;
            if state.service.key.cluster != cluster || state.service.key.to_string() != r.name {
                return Err(format!(
                    "resource {}: not a Service of {cluster:?} (it carries {})",
                    r.name, state.service.key
                ));
            }
            decoded.push((r.name.clone(), r.version.clone(), Arc::new(state)));
        }
        for (name, version, state) in decoded {
            self.resources.insert(name, (version, state));
        }
        for name in &update.removed_resources {
            self.resources.remove(name);
        }
        self.synced = true;
        Ok(())
    }

    /// The source state: Services, slices and exports of a cluster, or the imports.
    fn state(&self, cluster: &str, previous: &SourceState) -> SourceState {
        let mut out = SourceState {
            synced: self.synced,
            ..SourceState::default()
        };
        if cluster == CLUSTERSET {
            out.imports = Some(self.resources.values().map(|(_, s)| s.clone()).collect());
            return out;
        }
        for (_, st) in self.resources.values() {
            let service = &st.service;
            if let Some(export) = service.export {
                out.exports.push(Export {
                    key: service.key.clone(),
                    created_unix: export.created_unix,
                    exported: Default::default(),
                });
            }
            let mut plain = service.clone();
            plain.export = None;
            out.services.push(Arc::new(plain));
            for slice in &st.slices {
                out.slices.push(Arc::new(SourceSlice {
                    service: service.key.clone(),
                    slice: slice.clone(),
                    ports: super::SlicePorts::AsGiven,
                }));
            }
        }
        super::share_unchanged(previous, &mut out);
        out
    }
}

async fn run(source: RelaySource, state: watch::Sender<SourceState>, shutdown: CancellationToken) {
    let name = source.name();
    let config = source.config;
    let mut held = Held::default();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let ended = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = session(&config, &name, &mut held, &state, &mut backoff) => r,
        };
        let message = format!("control plane {}: {ended}", config.url);
        tracing::warn!(source = %name, error = %message, retry_in = ?backoff, "relay stream ended; serving the last state");
        state.send_if_modified(|s| {
            let new = Some(message.clone());
            (s.last_error != new).then(|| s.last_error = new).is_some()
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn endpoint(config: &RelaySourceConfig) -> Result<Endpoint, String> {
    let mut endpoint = Endpoint::from_shared(config.url.clone())
        .map_err(|e| format!("{:?} is not a URL: {e}", config.url))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if config.url.starts_with("https://") {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &config.tls.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let Some((cert, key)) = &config.tls.identity {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| format!("configuring TLS: {e}"))?;
    }
    Ok(endpoint)
}

/// One stream: returns why it ended.
async fn session(
    config: &RelaySourceConfig,
    name: &str,
    held: &mut Held,
    state: &watch::Sender<SourceState>,
    backoff: &mut Duration,
) -> String {
    let channel = match endpoint(config) {
        Ok(e) => match e.connect().await {
            Ok(c) => c,
            Err(e) => return format!("connecting: {e}"),
        },
        Err(e) => return e,
    };
    let mut client = SnapshotDiscoveryClient::new(channel)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(4);
    let hello = v1::Hello {
        node_name: config.name.clone(),
        cluster_id: config.cluster.clone(),
        role: v1::Role::Relay as i32,
        ..Default::default()
    };
    switchyard_proto::parts::feed_hello(&hello, held.versions(), tx.clone());
    let mut inbound = match client.stream_snapshots(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(s) => return format!("refused the stream: {}: {}", s.code(), s.message()),
    };
    tracing::info!(source = %name, "following the other control plane");
    let mut assembling = None;
    loop {
        let part = match inbound.message().await {
            Ok(Some(p)) => p,
            Ok(None) => return "the stream was closed".into(),
            Err(s) => return format!("{}: {}", s.code(), s.message()),
        };
        *backoff = FIRST_BACKOFF;
        let Some(update) = switchyard_proto::parts::assemble(&mut assembling, part) else {
            continue;
        };
        let reply = match held.apply(&update, &config.cluster) {
            Ok(()) => {
                let next = held.state(&config.cluster, &state.borrow());
                super::publish(state, name, next);
                agent_message::Kind::Ack(v1::Ack {
                    nonce: update.nonce.clone(),
                    snapshot_version: update.snapshot_version.clone(),
                })
            }
            Err(error_detail) => {
                tracing::warn!(source = %name, error = %error_detail, "rejected an update; keeping the last good state");
                agent_message::Kind::Nack(v1::Nack {
                    nonce: update.nonce.clone(),
                    snapshot_version: update.snapshot_version.clone(),
                    error_detail,
                })
            }
        };
        if tx
            .send(v1::AgentMessage { kind: Some(reply) })
            .await
            .is_err()
        {
            return "the stream was closed".into();
        }
    }
}
