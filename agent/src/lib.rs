//! Switchyard node agent.
//!
//! One agent runs on every node. It keeps the last good snapshot on disk,
//! puts it in force through a data plane before it even talks to the
//! control plane, and then follows the control plane's stream:
//!
//! ```text
//!   start ─▶ Store::load ─▶ DataPlane::apply ─▶ serve ─▶ connect (backoff) ─▶ Hello{versions held}
//!                                                           ▲                      │
//!                                                           └── stream breaks ◀── updates: apply, persist, ACK/NACK
//! ```
//!
//! Start-up order: take over from an agent running on the same state
//! directory, if one answers on `handoff.sock` ([`handoff`]), open the
//! store, load and apply the persisted state (`origin: persisted`), start
//! admin HTTP, then connect. So a node comes up with its rules while the
//! control plane is down.
//!
//! Modules: [`state`] (what is held and how an update changes it),
//! [`store`] (sled persistence with checked frames), [`dataplane`] (the
//! trait, what every plane shares, and `none`), [`endpoints`] (endpoint
//! selection, traffic policy and topology, shared by data planes),
//! [`iptables`] and [`nftables`] (the kernel planes), [`conntrack`] (stale
//! UDP flows), [`healthcheck`] and [`proxyhealth`] (kube-proxy's health
//! servers), [`applier`] (the apply pipeline), [`client`] (the stream and
//! its backoff), [`handoff`] (restarts without a gap), [`dns`] (the
//! node-local DNS stub), [`status`] and [`admin`].

pub mod admin;
pub mod applier;
pub mod client;
pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod dns;
pub mod endpoints;
pub mod handoff;
pub mod healthcheck;
pub mod iptables;
pub mod nftables;
pub mod proxyhealth;
pub mod state;
pub mod status;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::Args;
use config::{DataPlaneKind, DnsListen};
use dataplane::{DataPlane, NoneDataPlane};
use state::AgentState;
use status::{Metrics, Status};

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// Where the admin endpoint listens.
    pub admin_addr: SocketAddr,
    /// Where `--metrics-listen` serves `/metrics`, if set.
    pub metrics_addr: Option<SocketAddr>,
    /// Where kube-proxy's health server listens (`--healthz-bind-address`), if anywhere.
    pub healthz_addr: Option<SocketAddr>,
    /// Where the DNS stub listens (UDP and TCP); `None` with `--dns-listen none`.
    pub dns_addr: Option<SocketAddr>,
    /// Shared status (what `/status` serves).
    pub status: Arc<Status>,
    /// Shared metrics.
    pub metrics: Arc<Metrics>,
    /// The state in force.
    pub state: watch::Receiver<Arc<AgentState>>,
    shutdown: CancellationToken,
    /// Transparent DNS: asks the takeover to hand the cluster DNS
    /// Service's addresses back, and says when it has.
    handback: Option<(CancellationToken, tokio::sync::oneshot::Receiver<()>)>,
    /// Where this agent stands with respect to a successor.
    phase: watch::Receiver<handoff::Phase>,
    tasks: JoinSet<()>,
}

/// Longest the agent waits at shutdown for the DNS takeover to be handed
/// back (a few `iptables` calls).
const HANDBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Agent {
    /// Stops: the stream closes; the data plane's rules stay in force. In
    /// transparent DNS mode the cluster DNS Service's addresses are handed
    /// back to its rules first, so pods keep getting answers.
    pub async fn shutdown(mut self) {
        // After a handoff the successor serves those addresses: the
        // takeover leaves them (it reads the phase).
        if let Some((token, done)) = self.handback.take() {
            token.cancel();
            if tokio::time::timeout(HANDBACK_WAIT, done).await.is_err() {
                tracing::warn!(
                    "the cluster DNS Service's addresses were not handed back within {HANDBACK_WAIT:?}"
                );
            }
        }
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Follows where this agent stands with respect to a successor
    /// (`crate::handoff`).
    pub fn phase(&self) -> watch::Receiver<handoff::Phase> {
        self.phase.clone()
    }
}

/// The data plane `--dataplane` names.
pub fn dataplane_from_args(args: &Args) -> Box<dyn DataPlane> {
    match args.dataplane {
        DataPlaneKind::None => Box::new(NoneDataPlane::default()),
        DataPlaneKind::Iptables => Box::new(iptables::IptablesDataPlane::new(node_config(args))),
        DataPlaneKind::Nftables => Box::new(nftables::NftablesDataPlane::new(node_config(args))),
    }
}

/// The settings of this node that shape its rules.
pub fn node_config(args: &Args) -> dataplane::NodeConfig {
    dataplane::NodeConfig {
        node: args.node(),
        zone: args.zone.clone(),
        cluster_cidrs: args.cluster_cidrs.clone(),
        nodeport_addresses: nodeport_addresses(&args.nodeport_addresses),
        service_cidrs: args.service_cidrs.clone(),
        masquerade_mark: 1 << args.masquerade_bit,
        localhost_nodeports: args.iptables_localhost_nodeports,
        addresses: node_addresses(),
        cluster: Some(args.cluster.clone()),
    }
}

/// `--nodeport-addresses` as ranges: `primary` becomes the address each
/// family's default route leaves from (a family without one serves no node
/// port; with neither, 127.0.0.1, kube-proxy's fallback).
fn nodeport_addresses(flag: &[config::NodePortAddress]) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for a in flag {
        match a {
            config::NodePortAddress::Cidr(n) => out.push(*n),
            config::NodePortAddress::Primary => {
                let primary = primary_addresses();
                if primary.is_empty() {
                    // kube-proxy falls back to loopback when it finds no node IP.
                    tracing::warn!(
                        "--nodeport-addresses primary: this node has no default route; node ports are served on 127.0.0.1 only"
                    );
                    out.push(ipnet::IpNet::from(std::net::IpAddr::from([127, 0, 0, 1])));
                }
                out.extend(primary.into_iter().map(ipnet::IpNet::from));
            }
        }
    }
    out
}

/// The address each family's default route leaves from: the source the
/// kernel picks for a datagram to a documentation address (RFC 5737,
/// RFC 3849), found with `connect(2)`, which sends nothing.
pub fn primary_addresses() -> Vec<std::net::IpAddr> {
    let probes: [(SocketAddr, SocketAddr); 2] = [
        (([0, 0, 0, 0], 0).into(), ([192, 0, 2, 1], 9).into()),
        (
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
            (std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 9).into(),
        ),
    ];
    probes
        .into_iter()
        .filter_map(|(bind, to)| {
            let s = std::net::UdpSocket::bind(bind).ok()?;
            s.connect(to).ok()?;
            Some(s.local_addr().ok()?.ip())
        })
        .filter(|ip| !ip.is_unspecified() && !ip.is_loopback())
        .collect()
}

/// This node's own addresses, without loopback and link-local ones (the
/// DNS stub's 169.254.20.10 is no node address).
fn node_addresses() -> Vec<std::net::IpAddr> {
    dns::acl::local_addresses()
        .into_iter()
        .filter(|ip| {
            !ip.is_loopback()
                && match ip {
                    std::net::IpAddr::V4(v4) => !v4.is_link_local(),
                    std::net::IpAddr::V6(v6) => !v6.is_unicast_link_local(),
                }
        })
        .collect()
}

/// What `main` does: `cleanup`, or run until SIGINT/SIGTERM. Rules stay in
/// the kernel when the agent exits, so a restart does not drop traffic.
pub async fn run_until_signal(args: Args) -> anyhow::Result<()> {
    if let Some(config::Command::Cleanup) = args.command {
        return cleanup(&args);
    }
    let wait = args.handoff_wait;
    let agent = start(args, CancellationToken::new()).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut phase = agent.phase();
    let failed = tokio::select! {
        _ = tokio::signal::ctrl_c() => false,
        _ = term.recv() => false,
        r = phase.wait_for(|p| *p == handoff::Phase::Failed) => r.is_ok(),
    };
    if failed {
        agent.shutdown().await;
        anyhow::bail!(
            "the successor went away during the handoff; exiting, to start afresh from the state directory"
        );
    }
    let now = *phase.borrow();
    if now == handoff::Phase::Serving && !wait.is_zero() {
        // A restart or an upgrade starts the next agent now: keep serving
        // until it takes over, for a while.
        tracing::info!("stopping: serving for up to {wait:?} more, until a successor takes over");
        let _ = tokio::time::timeout(wait, phase.wait_for(|p| *p != handoff::Phase::Serving)).await;
    }
    if *phase.borrow() == handoff::Phase::Taking {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            phase.wait_for(|p| *p != handoff::Phase::Taking),
        )
        .await;
    }
    tracing::info!(phase = ?*phase.borrow(), "shutting down; the data plane stays in force");
    agent.shutdown().await;
    Ok(())
}

/// `switchyard-agent cleanup`: our chains and rules, then what the DNS stub
/// put on the node.
fn cleanup(args: &Args) -> anyhow::Result<()> {
    iptables::cleanup(&dataplane::Runner::host())?;
    // Without libnftables nothing of the nftables data plane can exist.
    match nftables::kernel::Kernel::host() {
        Ok(mut kernel) => {
            let tables = nftables::cleanup(&mut kernel).context("removing our nftables tables")?;
            tracing::info!(tables, "removed Switchyard's nftables tables");
        }
        Err(e) => tracing::info!("no nftables tables to remove: {e}"),
    }
    let listen = match args.dns_listen {
        DnsListen::Addr(a) => Some(a),
        DnsListen::None => None,
    };
    let removed = dns::link::uninstall(listen).context("removing the DNS stub's address")?;
    tracing::info!(
        notrack_rules = removed.rules,
        interface = removed.interface,
        loopback_address = removed.loopback_address,
        "removed the DNS stub's address and NOTRACK rules"
    );
    Ok(())
}

/// Takes over from an agent running on the same state directory, if one
/// is (`crate::handoff`), binds the admin listener (or takes the one handed
/// over) and starts with the data plane `args` names.
pub async fn start(args: Args, shutdown: CancellationToken) -> anyhow::Result<Agent> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating --state-dir {}", args.state_dir.display()))?;
    let dir = args.state_dir.clone();
    let inherited = match tokio::task::spawn_blocking(move || handoff::take_over(&dir)).await? {
        Ok(i) => i.map(Arc::new),
        Err(e) => {
            tracing::warn!("could not take over from the running agent: {e}");
            None
        }
    };
    let admin = match inherited
        .as_ref()
        .and_then(|i| i.tcp(handoff::Role::Admin, args.admin_listen))
    {
        Some(l) => {
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)?
        }
        None => TcpListener::bind(args.admin_listen)
            .await
            .with_context(|| format!("binding --admin-listen {}", args.admin_listen))?,
    };
    let dp = dataplane_from_args(&args);
    start_inner(args, admin, dp, shutdown, inherited).await
}

/// Starts on the given admin listener with the given data plane (tests inject both).
pub async fn start_with(
    args: Args,
    admin: TcpListener,
    dataplane: Box<dyn DataPlane>,
    shutdown: CancellationToken,
) -> anyhow::Result<Agent> {
    start_inner(args, admin, dataplane, shutdown, None).await
}

async fn start_inner(
    args: Args,
    admin: TcpListener,
    mut dataplane: Box<dyn DataPlane>,
    shutdown: CancellationToken,
    inherited: Option<Arc<handoff::Inherited>>,
) -> anyhow::Result<Agent> {
    // `serving`: the listeners, until a successor serves on the same
    // sockets. `following`: the stream, the rules' upkeep and the
    // health-check servers, until a successor asks to take over.
    let serving = shutdown.child_token();
    let following = shutdown.child_token();
    let registry = Arc::new(handoff::Registry::default());
    {
        use std::os::fd::AsFd;
        registry.register(handoff::Role::Admin, admin.local_addr()?, admin.as_fd());
    }
    let node = args.node();
    let admin_addr = admin.local_addr()?;
    let status = Arc::new(Status::new(
        node.clone(),
        args.cluster.clone(),
        args.zone.clone(),
        dataplane.name(),
    ));
    let metrics = Arc::new(Metrics::new());
    dataplane.attach_metrics(metrics.clone());
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating --state-dir {}", args.state_dir.display()))?;
    let state_dir = args.state_dir.clone();
    let (store, discarded) = tokio::task::spawn_blocking(move || store::Store::open(&state_dir))
        .await
        .context("opening the state store")??;
    if let Some(reason) = discarded {
        status
            .update(|s| s.discarded_state = Some(format!("state database moved aside: {reason}")));
    }
    let mut applier = applier::Applier::new(store, dataplane, status.clone(), metrics.clone());
    if let Some(zone) = &args.zone {
        applier.fix_zone(zone.clone());
    }
    applier.restore().await;
    let state = applier.subscribe();

    let mut tasks = JoinSet::new();
    let mut handback = None;
    let (phase_tx, phase) = watch::channel(handoff::Phase::Serving);
    let mut taken_over = None;
    let dns_addr = match args.dns_listen {
        DnsListen::None => None,
        DnsListen::Addr(listen) => {
            let keep = inherited
                .as_ref()
                .map(|i| i.dns_addresses())
                .unwrap_or_default();
            dns::prepare_listen(listen, &keep);
            let cfg = dns::DnsConfig::from_args(&args, listen)?;
            let started = dns::start_with(
                cfg,
                state.clone(),
                status.clone(),
                metrics.clone(),
                &mut tasks,
                serving.clone(),
                dns::Sockets {
                    inherited: inherited.clone(),
                    registry: Some(registry.clone()),
                },
            )?;
            applier.ack_after_dns(started.built);
            if !args.dns_upstreams.is_empty() {
                started.control.pin_upstreams();
            }
            // The cluster's stub domains and upstream nameservers, as the
            // control plane sends them (the kube-dns ConfigMap).
            let mut cluster_dns = applier.cluster_dns();
            let control = started.control.clone();
            let stop = shutdown.clone();
            tasks.spawn(async move {
                loop {
                    let (zones, upstreams) =
                        dns::cluster_dns_routes(cluster_dns.borrow_and_update().as_ref());
                    control.set_cluster_dns(zones, upstreams);
                    tokio::select! {
                        r = cluster_dns.changed() => if r.is_err() { return },
                        () = stop.cancelled() => return,
                    }
                }
            });
            if let Some(service) = args.dns_service.clone() {
                if dns::link::has_net_admin() {
                    let token = CancellationToken::new();
                    let (done, finished) = tokio::sync::oneshot::channel();
                    let (first_pass, first) = tokio::sync::oneshot::channel();
                    let own = dns::link::is_link_local(listen.ip()).then_some(started.addr);
                    let run = dns::transparent::run(
                        dns::transparent::Takeovers {
                            service,
                            cluster: args.cluster.clone(),
                            own,
                            control: started.control,
                            status: status.clone(),
                            handback: token.clone(),
                            phase: phase.clone(),
                            first_pass: Some(first_pass),
                        },
                        state.clone(),
                    );
                    tasks.spawn(async move {
                        run.await;
                        let _ = done.send(());
                    });
                    handback = Some((token, finished));
                    taken_over = Some(first);
                } else {
                    tracing::error!(%service, "--dns-service needs CAP_NET_ADMIN (an address and NOTRACK rules); not answering for it");
                }
            }
            Some(started.addr)
        }
    };
    tasks.spawn(maintain(
        applier.dataplane(),
        args.iptables_sync_period,
        status.clone(),
        metrics.clone(),
        following.clone(),
    ));
    // kube-proxy's health timeout: twice its sync period.
    let health_timeout = args.iptables_sync_period * 2;
    let proxy_health = proxyhealth::ProxyHealth {
        status: status.clone(),
        metrics: metrics.clone(),
        timeout: health_timeout,
    };
    if matches!(
        args.dataplane,
        DataPlaneKind::Iptables | DataPlaneKind::Nftables
    ) {
        tasks.spawn(healthcheck::run(
            node.clone(),
            args.health_check_node_port_address,
            state.clone(),
            proxy_health.clone(),
            following.clone(),
        ));
    }
    let healthz_addr = match args.proxy_healthz() {
        Some(addr) => Some(
            serve_kube_proxy_port(
                KubeProxyPort {
                    addr,
                    flag: "--healthz-bind-address",
                    role: handoff::Role::Healthz,
                },
                proxyhealth::router(proxy_health.clone()),
                &mut tasks,
                &serving,
                &registry,
                inherited.as_deref(),
            )
            .await?,
        ),
        None => None,
    };
    let ctx = admin::AdminContext {
        status: status.clone(),
        metrics: metrics.clone(),
        state: state.clone(),
        dataplane: applier.dataplane(),
        health_timeout,
        cluster: args.cluster.clone(),
    };
    let metrics_addr = match args.metrics_listen {
        Some(addr) => Some(
            serve_kube_proxy_port(
                KubeProxyPort {
                    addr,
                    flag: "--metrics-listen",
                    role: handoff::Role::Metrics,
                },
                admin::metrics_router(ctx.clone()),
                &mut tasks,
                &serving,
                &registry,
                inherited.as_deref(),
            )
            .await?,
        ),
        None => None,
    };
    serve(admin, admin::router(ctx), &mut tasks, &serving);

    let connector = client::Connector::from_args(&args)?;
    let who = client::NodeIdentity {
        node,
        cluster: args.cluster.clone(),
        zone: args.zone.clone().unwrap_or_default(),
    };
    let (released_tx, released) = tokio::sync::oneshot::channel();
    let client = client::run(connector, who, applier, following.clone());
    tasks.spawn(async move {
        client.await;
        // The applier, and the store with it, are gone.
        let _ = released_tx.send(());
    });
    if let Some(inherited) = &inherited {
        // Every socket handed over is served (the cluster DNS Service's
        // addresses once the takeover has had its first look): the
        // predecessor may stop reading them.
        if let Some(first) = taken_over {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), first).await;
        }
        inherited.serving();
    }
    tasks.spawn(handoff::offer(
        handoff::Offer {
            dir: args.state_dir.clone(),
            registry,
            following,
            released,
            serving,
            phase: phase_tx,
        },
        shutdown.clone(),
    ));
    tracing::info!(%admin_addr, ?metrics_addr, ?healthz_addr, "agent started");
    Ok(Agent {
        admin_addr,
        metrics_addr,
        healthz_addr,
        dns_addr,
        status,
        metrics,
        state,
        shutdown,
        handback,
        phase,
        tasks,
    })
}

/// One of kube-proxy's well-known ports this agent serves.
struct KubeProxyPort {
    addr: SocketAddr,
    flag: &'static str,
    role: handoff::Role,
}

/// Serves `router` on one of kube-proxy's well-known ports: on the socket
/// a predecessor handed over, else bound now, or if the kube-proxy this
/// agent replaces still holds it, as soon as it is free
/// ([`proxyhealth::bind_when_free`]). Returns the address bound (the
/// address asked for while waiting); any other bind error is the caller's.
async fn serve_kube_proxy_port(
    port: KubeProxyPort,
    router: axum::Router,
    tasks: &mut JoinSet<()>,
    serving: &CancellationToken,
    registry: &Arc<handoff::Registry>,
    inherited: Option<&handoff::Inherited>,
) -> anyhow::Result<SocketAddr> {
    use std::os::fd::AsFd;
    let KubeProxyPort { addr, flag, role } = port;
    let bound = match inherited.and_then(|i| i.tcp(role, addr)) {
        Some(l) => {
            l.set_nonblocking(true)?;
            Ok(TcpListener::from_std(l)?)
        }
        None => TcpListener::bind(addr).await,
    };
    match bound {
        Ok(listener) => {
            let bound = listener.local_addr()?;
            registry.register(role, bound, listener.as_fd());
            serve(listener, router, tasks, serving);
            Ok(bound)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let (serving, registry) = (serving.clone(), registry.clone());
            tasks.spawn(async move {
                match proxyhealth::bind_when_free(addr, flag, &serving).await {
                    Ok(Some(listener)) => {
                        registry.register(role, addr, listener.as_fd());
                        let _ = axum::serve(listener, router)
                            .with_graceful_shutdown(serving.cancelled_owned())
                            .await;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(%addr, "{flag}: {e}; not served"),
                }
            });
            Ok(addr)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("binding {flag} {addr}"))),
    }
}

/// Serves `router` on `listener` until `shutdown`.
fn serve(
    listener: TcpListener,
    router: axum::Router,
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
) {
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!("admin server failed: {e}");
        }
    });
}

/// Every `period`, lets the data plane check its rules and repair them.
async fn maintain(
    dataplane: Arc<std::sync::Mutex<Box<dyn DataPlane>>>,
    period: std::time::Duration,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let dp = dataplane.clone();
        let r = tokio::task::spawn_blocking(move || {
            dp.lock().unwrap_or_else(|e| e.into_inner()).maintain()
        })
        .await;
        match r {
            // Rules checked (and repaired): in force, as a periodic sync would leave them.
            Ok(Ok(())) => {
                if status.maintained() {
                    metrics.kubeproxy.verified();
                }
            }
            Ok(Err(e)) => tracing::warn!("data plane maintenance failed: {e}"),
            Err(e) => tracing::error!("data plane maintenance task failed: {e}"),
        }
    }
}

/// Now, in Unix nanoseconds.
pub(crate) fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}
