//! Switchyard control plane.
//!
//! Watches sources of Services and EndpointSlices, merges them into one
//! versioned [`snapshot::Snapshot`], and streams it to every node agent over
//! gRPC (see `proto/switchyard/v1/snapshot.proto` for the contract).
//!
//! ```text
//!  sources ──watch<SourceState>──▶ index ──watch<Arc<Snapshot>>──▶ one task per agent stream
//!  (file, …)                     (debounce, IPAM,                 (delta from the ACKed snapshot,
//!                                 validation)                      one update in flight)
//!                                      │                                   │
//!                                      └────────────▶ status ◀─────────────┘ ──▶ admin HTTP
//! ```
//!
//! [`start`] binds the listeners and spawns everything; `main.rs` only parses
//! arguments and waits for a signal. Beside the snapshot service the gRPC
//! listener serves `grpc.health.v1` (SERVING once a snapshot of every
//! source's synced state exists, as `/readyz`) and reflection.

pub mod admin;
pub mod config;
pub mod heap;
pub mod index;
pub mod ipam;
pub mod k8s;
pub mod listener;
pub mod mcs;
pub mod merge;
pub mod metrics;
pub mod server;
pub mod signals;
pub mod snapshot;
pub mod source;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

pub use config::Args;
use config::SourceSpec;
use metrics::Metrics;
use server::{ClientIdentity, Served, SnapshotService, StreamLimits};
use snapshot::Snapshot;
use source::{Source, SourceState};
use status::Status;
use switchyard_proto::v1::snapshot_discovery_server::SnapshotDiscoveryServer;

/// HTTP/2 pings to each agent's connection: an agent that stops answering
/// (gone, frozen, behind a blackhole) is noticed within the interval plus
/// the timeout, 9 s, and its stream ends (`/status` shows it disconnected).
/// (10 s + 20 s before.)
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(4);
/// How long a ping may go unanswered.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// HTTP/2 streams one connection may open: an agent needs one, a health
/// check another; a client opening more is held to this.
const MAX_STREAMS_PER_CONNECTION: u32 = 8;

/// HTTP/2 flow-control window for what agents send (Hello parts, ACKs):
/// a little over two Hello parts. h2 keeps what arrives inside the window
/// in memory until the stream reads it, so in a reconnect storm every agent
/// waiting for its turn to be read holds this much of its Hello on the
/// control plane (64 KiB each is 62 MiB for 1,000 agents: a 1,000-agent
/// storm peaked 71 MiB above the RSS before it, and glibc kept most of it
/// after; 15 MiB with 16 KiB). Once its turn comes, a Hello still flows at
/// a part per round trip or better: h2 opens the window again each time
/// half of it has been read.
const AGENT_WINDOW_BYTES: u32 = 16 * 1024;

/// A running control plane.
#[derive(Debug)]
pub struct ControlPlane {
    /// Where the gRPC service listens.
    pub grpc_addr: SocketAddr,
    /// Where the admin endpoint listens.
    pub admin_addr: SocketAddr,
    /// Shared status (what `/status` serves).
    pub status: Arc<Status>,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// The latest snapshot.
    pub snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl ControlPlane {
    /// Stops gracefully: streams end, listeners close.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stops at once, as close to a crash as a library can: every task is
    /// aborted mid-flight (no snapshot is finished, no stream says goodbye)
    /// and the stream tasks, which hold the connections, are cancelled.
    pub async fn kill(mut self) {
        self.tasks.abort_all();
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Waits until every task has ended (after `shutdown` is cancelled).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Binds the listeners named in `args` and starts.
pub async fn start(args: Args, shutdown: CancellationToken) -> anyhow::Result<ControlPlane> {
    let grpc = TcpListener::bind(args.grpc_listen)
        .await
        .with_context(|| format!("binding --grpc-listen {}", args.grpc_listen))?;
    let admin = TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("binding --admin-listen {}", args.admin_listen))?;
    let sources = sources_from_args(&args);
    start_with(args, grpc, admin, sources, shutdown).await
}

/// The sources `--source` names.
pub fn sources_from_args(args: &Args) -> Vec<Box<dyn Source>> {
    let debounce = source::debounce::Debounce {
        quiet: args.debounce,
        max_delay: args.max_delay,
    };
    args.sources
        .iter()
        .map(|arg| {
            let cluster = arg.cluster.clone().unwrap_or_else(|| args.cluster.clone());
            match &arg.spec {
                SourceSpec::File(path) => Box::new(
                    source::file::FileSource::new(vec![path.clone()], cluster, debounce)
                        .with_cluster_annotation(args.file_cluster_annotation),
                ) as Box<dyn Source>,
                SourceSpec::Kube(context) => Box::new(source::kubernetes::KubeSource::new(
                    source::kubernetes::KubeSourceConfig {
                        context: context.clone(),
                        kubeconfig: args.kubeconfig.clone(),
                        namespace: args.kube_namespace.clone(),
                        label_selector: args.kube_label_selector.clone(),
                        dns_configmap: args
                            .kube_dns_configmap
                            .split_once('/')
                            .filter(|_| args.kube_dns_configmap != "none")
                            .map(|(ns, name)| (ns.to_owned(), name.to_owned())),
                        cluster,
                        debounce,
                    },
                )),
                SourceSpec::Docker(host) => Box::new(source::docker::DockerSource::new(
                    source::docker::DockerSourceConfig {
                        host: host.clone(),
                        cluster,
                        debounce,
                    },
                )),
                SourceSpec::Relay(url) => Box::new(source::relay::RelaySource::new(
                    source::relay::RelaySourceConfig {
                        url: url.clone(),
                        cluster,
                        name: args.relay_name.clone().unwrap_or_else(|| {
                            std::fs::read_to_string("/proc/sys/kernel/hostname")
                                .map(|h| format!("relay-{}", h.trim()))
                                .unwrap_or_else(|_| "relay".into())
                        }),
                        tls: source::relay::RelayTls {
                            ca: args.relay_tls_ca.clone(),
                            identity: args.relay_tls_cert.clone().zip(args.relay_tls_key.clone()),
                        },
                    },
                )),
            }
        })
        .collect()
}

/// Starts on the given listeners with the given sources (tests inject both).
pub async fn start_with(
    args: Args,
    grpc: TcpListener,
    admin: TcpListener,
    sources: Vec<Box<dyn Source>>,
    shutdown: CancellationToken,
) -> anyhow::Result<ControlPlane> {
    // main checks too (for clap's exit code); embedders get the same error.
    args.check()
        .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
    let grpc_addr = grpc.local_addr()?;
    let admin_addr = admin.local_addr()?;
    let status = Arc::new(Status::with_retention(status::AgentRetention {
        forget_after: args.forget_agents_after,
        ..status::AgentRetention::default()
    }));
    let metrics = Arc::new(Metrics::new());
    let (snapshot_tx, snapshot_rx) = watch::channel(None);
    let mut tasks = JoinSet::new();

    // The TLS files are read before anything starts: a bad file is a start-up error.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(
            switchyard_proto::tls::ReloadingServer::server(switchyard_proto::tls::ServerFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.tls_client_ca.clone(),
            })
            .context("loading --tls-cert, --tls-key and --tls-client-ca")?,
        )),
        _ => None,
    };

    let mut receivers = Vec::new();
    let mut served = Served::default();
    let clusterset = watch::Sender::new(None);
    for mut src in sources {
        if args.mcs_write {
            src.attach_write_back(mcs::writer::WriteBack {
                clusterset: clusterset.subscribe(),
                status: status.clone(),
            });
        }
        let (tx, rx) = watch::channel(SourceState::default());
        let cluster = src.cluster();
        if src.knows_nodes() {
            served.node_sources.push((cluster.clone(), rx.clone()));
        }
        served.clusters.insert(cluster.clone());
        receivers.push(index::SourceFeed {
            name: src.name(),
            cluster,
            state: rx,
        });
        tasks.spawn(src.run(tx, shutdown.clone()));
    }
    let index_config = index::IndexConfig {
        service_cidrs: args.service_cidrs.clone(),
        clusterset_cidrs: args.clusterset_cidrs.clone(),
        export_all: args.export_all,
        cluster_down: args.cluster_down,
    };
    tasks.spawn(index::run(
        index_config,
        receivers,
        index::Outputs {
            snapshots: snapshot_tx,
            clusterset,
        },
        status.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));

    // Streams per connection: an agent needs one, health checks another.
    let builder = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        // What an agent may send before we read it. hyper's default is 1 MiB
        // a stream: a reconnect storm of agents whose Hellos wait for their
        // turn would park that much each (and the allocator keeps it). See
        // AGENT_WINDOW_BYTES.
        .initial_stream_window_size(Some(AGENT_WINDOW_BYTES))
        .initial_connection_window_size(Some(4 * AGENT_WINDOW_BYTES));
    let identity = args.tls_client_ca.is_some().then(|| ClientIdentity {
        organizations: if args.tls_client_organizations.is_empty() {
            vec![switchyard_proto::tls::NODES_ORGANIZATION.to_owned()]
        } else {
            args.tls_client_organizations.clone()
        },
    });
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchyard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;
    let closers = listener::Closers::default();
    let service = SnapshotService::new(
        snapshot_rx.clone(),
        status.clone(),
        metrics.clone(),
        identity,
        served,
        StreamLimits {
            max_streams: args.max_agent_streams,
            ack_timeout: args.ack_timeout,
            max_hellos_waiting: args.max_hellos_waiting,
            max_hellos_waiting_per_address: args.max_hellos_waiting_per_address,
        },
        shutdown.clone(),
    )
    .closing_connections(closers.clone());
    tasks.spawn(heap::run(
        service.churn(),
        metrics.clone(),
        shutdown.clone(),
    ));
    // gRPC health follows readiness: NOT_SERVING until every source synced.
    {
        let mut rx = snapshot_rx.clone();
        let reporter = health_reporter.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            reporter
                .set_not_serving::<SnapshotDiscoveryServer<SnapshotService>>()
                .await;
            let ready = tokio::select! {
                r = rx.wait_for(|s| s.as_ref().is_some_and(|s| s.complete())) => r.is_ok(),
                _ = shutdown.cancelled() => false,
            };
            if ready {
                reporter
                    .set_serving::<SnapshotDiscoveryServer<SnapshotService>>()
                    .await;
            }
        });
    }
    let mut builder = builder;
    let router = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(
            SnapshotDiscoveryServer::new(service)
                .max_decoding_message_size(server::MAX_AGENT_MESSAGE_BYTES)
                .max_encoding_message_size(256 << 20),
        );
    let limits = listener::ConnectionLimits {
        total: args.max_connections,
        per_address: args.max_connections_per_address,
    };
    let grpc_shutdown = shutdown.clone();
    match tls {
        Some(tls) => {
            let (incoming, accepting) = listener::tls(
                grpc,
                limits,
                tls,
                closers,
                metrics.clone(),
                grpc_shutdown.clone(),
            );
            tasks.spawn(accepting);
            tasks.spawn(async move {
                if let Err(e) = router
                    .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled())
                    .await
                {
                    tracing::error!("gRPC server failed: {e}");
                }
            });
        }
        None => {
            listener::warn_if_clear_text(grpc_addr);
            let (incoming, accepting) = listener::plain(
                grpc,
                limits,
                closers,
                metrics.clone(),
                grpc_shutdown.clone(),
            );
            tasks.spawn(accepting);
            tasks.spawn(async move {
                if let Err(e) = router
                    .serve_with_incoming_shutdown(incoming, grpc_shutdown.cancelled())
                    .await
                {
                    tracing::error!("gRPC server failed: {e}");
                }
            });
        }
    }

    if let Some(addr) = args.health_listen {
        let health = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding --health-listen {addr}"))?;
        let probes = admin::probes(status.clone(), metrics.clone(), snapshot_rx.clone());
        let health_shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(e) = axum::serve(health, probes)
                .with_graceful_shutdown(health_shutdown.cancelled_owned())
                .await
            {
                tracing::error!("health server failed: {e}");
            }
        });
    }
    if !admin_addr.ip().is_loopback() {
        tracing::warn!(%admin_addr, "the admin endpoint is not on loopback: /status shows every Service, endpoint and agent to whoever reaches it");
    }
    let admin_router = admin::router(status.clone(), metrics.clone(), snapshot_rx.clone());
    let admin_shutdown = shutdown.clone();
    tasks.spawn(async move {
        if let Err(e) = axum::serve(admin, admin_router)
            .with_graceful_shutdown(admin_shutdown.cancelled_owned())
            .await
        {
            tracing::error!("admin server failed: {e}");
        }
    });
    tracing::info!(%grpc_addr, %admin_addr, "control plane started");
    Ok(ControlPlane {
        grpc_addr,
        admin_addr,
        status,
        metrics,
        snapshots: snapshot_rx,
        shutdown,
        tasks,
    })
}
