//! The node-local DNS stub: the cluster zone answered from the state in
//! force, every other name forwarded to the upstreams.
//!
//! ```text
//!  Applier ──watch<Arc<AgentState>>──▶ IndexCell ──(build on change)──▶ Arc<DnsIndex>
//!                                          │ one index per query: answers switch atomically
//!   UDP loop ─▶ encoded answer of this index? ─▶ client
//!      ├─▶ plain A/AAAA question answered from its bytes (direct.rs) ─▶ client
//!      └──────┐
//!   TCP front ┴▶ hickory-server Request ─▶ StubHandler ─▶ handler::decide(index, acl, request)
//!                                            ├▶ Answer ─▶ MessageResponseBuilder ─▶ client
//!                                            └▶ Forward ─▶ cache? ─▶ upstreams (bounded) ─▶ client
//! ```
//!
//! Every use of hickory lives in this module. Our UDP loop (`udp.rs`) and
//! TCP front (`server.rs`) run on a current-thread runtime on a thread of
//! its own; hickory-server parses each request (`Request`), our
//! `RequestHandler` runs the core (`handler.rs`), a pure function from the
//! parsed request to records made from the index's data, and the response is
//! built and encoded by hickory-server's `MessageResponseBuilder`
//! (`response.rs`). Over UDP the encoded answer is kept for the next
//! identical query (`encoded.rs`), and a plain address question is read,
//! looked up and answered without hickory's parser and encoder, to the
//! same bytes (`direct.rs`). `hickory-proto` is the wire format.
//!
//! No query waits for an index build: [`IndexCell::current`] is the index
//! in force, and a task off the serving thread builds the next one when the
//! state changes ([`IndexCell::refresh`]) and swaps it in; each build
//! starts from the newest state, so changes that come during a build are
//! built together, never one after another. The applier waits for that
//! build before it ACKs (`IndexCell::built`), so once the control plane
//! sees the ACK, DNS answers from that snapshot; if the index has not
//! caught up within 10 s the ACK goes anyway and says so: a warning in the
//! log, `switchyard_agent_dns_acks_before_index_total`, and `/status`
//! `dns.behind` naming the version ACKed until the index catches up.
//! Queries meanwhile are answered from the previous index.
//!
//! Before our code, hickory-server drops messages shorter than a header,
//! answers FORMERR (header only, our id) to what it cannot parse, and drops
//! responses; those FORMERRs and drops are not in our metrics. The agent's
//! default log filter quiets `hickory_server` to `warn` (it logs every
//! response at `info`).
//!
//! Figures: `/status` `dns` (listen, upstreams, index version, names, build
//! time, answers by rcode, forwarded, refused sources; in transparent mode
//! the Service and the addresses taken over); `/metrics`
//! `switchyard_agent_dns_*`. The fuzz target `dns_handler` runs
//! `response::handle_bytes`, and the unit tests run it on 50,000 random and
//! mutated packets.

pub mod acl;
pub mod cache;
mod clock;
mod direct;
mod encoded;
pub mod forward;
pub mod handler;
pub mod index;
pub mod link;
pub mod response;
pub mod server;
pub mod transparent;
mod udp;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use arc_swap::ArcSwap;
use hickory_proto::rr::Name;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::Args;
use crate::state::AgentState;
use crate::status::{DnsStatus, Metrics, Status};
pub use acl::Acl;
pub use handler::{Answer, Decision, Forward, decide};
pub use index::DnsIndex;
pub use response::{Transport, handle_bytes};

/// The agent's default log filter: hickory-server logs every response at
/// `info`, which is one log line per DNS query.
pub const DEFAULT_LOG_FILTER: &str = "info,hickory_server=warn";

/// What the stub serves and how.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// UDP and TCP listen address.
    pub listen: SocketAddr,
    /// The cluster domain.
    pub zone: Name,
    /// TTL of the cluster's records, in seconds.
    pub ttl: u32,
    /// Where other names go.
    pub upstreams: Vec<SocketAddr>,
    /// Why there is no upstream, when there is none.
    pub no_upstream: Option<String>,
    /// Who may ask.
    pub acl: Acl,
    /// Stub domains: names in a zone go to its servers.
    pub forward_zones: Vec<(Name, Vec<SocketAddr>)>,
    /// How long expired upstream answers are kept for when no upstream answers.
    pub serve_stale: std::time::Duration,
    /// Name headless endpoints without a hostname after their Pod.
    pub endpoint_pod_names: bool,
    /// Most forwarded queries in flight.
    pub max_inflight: usize,
    /// TCP connections admitted.
    pub tcp_limits: server::TcpLimits,
}

impl DnsConfig {
    /// A stub on `listen` for `zone`: TTL 5 s, no upstream, no stub domain,
    /// answering this node and loopback, the flags' other defaults (the
    /// benchmarks' and tests' starting point).
    pub fn plain(listen: SocketAddr, zone: Name) -> Self {
        Self {
            listen,
            zone,
            ttl: 5,
            upstreams: Vec::new(),
            no_upstream: None,
            forward_zones: Vec::new(),
            serve_stale: std::time::Duration::ZERO,
            endpoint_pod_names: false,
            acl: Acl::node_local(&[]),
            max_inflight: 1024,
            tcp_limits: server::TcpLimits::default(),
        }
    }

    /// The configuration `args` describe, listening on `listen`. Call after
    /// the listen address exists, so the default access list includes it.
    pub fn from_args(args: &Args, listen: SocketAddr) -> anyhow::Result<Self> {
        let zone = zone_name(&args.cluster_domain)
            .with_context(|| format!("--cluster-domain {:?}", args.cluster_domain))?;
        let (upstreams, no_upstream) = if args.dns_upstreams.is_empty() {
            let path = args.resolv_conf.display();
            let text = std::fs::read_to_string(&args.resolv_conf).unwrap_or_default();
            let (found, ours) = resolv_conf_upstreams(&text, listen, &acl::local_addresses());
            let why = match (found.is_empty(), ours.is_empty()) {
                (false, _) => None,
                (true, true) => Some(format!("{path} names no nameserver")),
                (true, false) => Some(format!(
                    "{path} names only this stub ({})",
                    ours.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            };
            let why = why.map(|w| {
                format!(
                    "no upstream DNS server: {w}; names outside {} get SERVFAIL; set --dns-upstream",
                    args.cluster_domain
                )
            });
            (found, why)
        } else {
            (args.dns_upstreams.clone(), None)
        };
        let acl = if args.dns_allow.is_empty() {
            Acl::node_local(&args.cluster_cidrs)
        } else {
            Acl::new(args.dns_allow.clone())
        };
        let forward_zones = args
            .dns_forward
            .iter()
            .map(|(z, servers)| {
                zone_name(z)
                    .map(|z| (z, servers.clone()))
                    .with_context(|| format!("--dns-forward {z:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            listen,
            zone,
            ttl: u32::try_from(args.dns_ttl.as_secs()).unwrap_or(u32::MAX),
            upstreams,
            no_upstream,
            forward_zones,
            serve_stale: args.dns_serve_stale,
            endpoint_pod_names: args.dns_endpoint_pod_names,
            acl,
            max_inflight: args.dns_max_inflight.max(1),
            tcp_limits: server::TcpLimits {
                total: args.dns_max_tcp_connections.max(1),
                per_source: args.dns_max_tcp_per_source.max(1),
            },
        })
    }
}

/// The cluster's DNS settings (`SnapshotUpdate.cluster_dns`) as routes:
/// its stub domains and its upstream nameservers, `IP` or `IP:PORT` (port
/// 53 when none). What does not parse is left out, with a warning.
pub fn cluster_dns_routes(
    dns: Option<&switchyard_proto::v1::ClusterDns>,
) -> (Vec<(Name, Vec<SocketAddr>)>, Vec<SocketAddr>) {
    let Some(dns) = dns else {
        return (Vec::new(), Vec::new());
    };
    let servers = |list: &[String]| -> Vec<SocketAddr> {
        list.iter()
            .filter_map(|s| {
                let parsed = s
                    .parse::<SocketAddr>()
                    .ok()
                    .or_else(|| s.parse().ok().map(|ip| SocketAddr::new(ip, 53)));
                if parsed.is_none() {
                    tracing::warn!(server = %s, "a DNS server of the cluster's settings that is not IP or IP:PORT; left out");
                }
                parsed
            })
            .collect()
    };
    let zones = dns
        .stub_domains
        .iter()
        .filter_map(|d| match zone_name(&d.zone) {
            Ok(z) => Some((z, servers(&d.servers))),
            Err(e) => {
                tracing::warn!(zone = %d.zone, "a stub domain of the cluster's settings that is not a DNS name: {e}; left out");
                None
            }
        })
        .filter(|(_, s)| !s.is_empty())
        .collect();
    (zones, servers(&dns.upstream_nameservers))
}

/// The zone `domain` names, lower-cased and fully qualified.
pub fn zone_name(domain: &str) -> anyhow::Result<Name> {
    let mut zone = Name::from_ascii(domain.trim_end_matches('.'))?.to_lowercase();
    zone.set_fqdn(true);
    Ok(zone)
}

/// The nameservers of a resolv.conf (port 53), and apart the ones that are
/// this stub itself: its listen address, or, when it listens on every
/// address of port 53, loopback and the node's `local` addresses.
/// Forwarding to ourselves would loop until every query timed out.
pub fn resolv_conf_upstreams(
    text: &str,
    listen: SocketAddr,
    local: &[std::net::IpAddr],
) -> (Vec<SocketAddr>, Vec<std::net::IpAddr>) {
    let wildcard = listen.ip().is_unspecified() && listen.port() == 53;
    let (ours, upstreams): (Vec<std::net::IpAddr>, Vec<std::net::IpAddr>) = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().split('%').next()?.parse().ok())
        .partition(|ip: &std::net::IpAddr| {
            *ip == listen.ip() || (wildcard && (ip.is_loopback() || local.contains(ip)))
        });
    (
        upstreams
            .into_iter()
            .map(|ip| SocketAddr::new(ip, 53))
            .collect(),
        ours,
    )
}

/// The index in force, rebuilt when the agent's state changes.
#[derive(Debug)]
pub struct IndexCell {
    current: ArcSwap<DnsIndex>,
    state: watch::Receiver<Arc<AgentState>>,
    /// The state the index in force was built from.
    built: watch::Sender<Arc<AgentState>>,
    building: Mutex<()>,
    status: Option<Arc<Status>>,
    metrics: Option<Arc<Metrics>>,
    /// Changes older than the cell are not timed.
    started_unix_nanos: i64,
}

impl IndexCell {
    /// A cell following `state`.
    pub fn new(
        state: watch::Receiver<Arc<AgentState>>,
        zone: Name,
        ttl: u32,
        status: Option<Arc<Status>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self::naming(state, zone, ttl, false, status, metrics)
    }

    /// [`IndexCell::new`]; with `pod_names`, headless endpoints without a
    /// hostname are named after their Pod (`DnsIndex::build_naming`).
    pub fn naming(
        state: watch::Receiver<Arc<AgentState>>,
        zone: Name,
        ttl: u32,
        pod_names: bool,
        status: Option<Arc<Status>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let source = state.borrow().clone();
        let first = Arc::new(DnsIndex::build_naming(
            source.clone(),
            &zone,
            ttl,
            pod_names,
        ));
        let cell = Self {
            current: ArcSwap::new(first.clone()),
            state,
            built: watch::Sender::new(source),
            building: Mutex::new(()),
            status,
            metrics,
            started_unix_nanos: crate::unix_nanos(),
        };
        cell.report(&first);
        cell
    }

    /// The index in force. Never builds: a query is answered from the last
    /// index built while the next one is being built.
    pub fn current(&self) -> Arc<DnsIndex> {
        self.current.load_full()
    }

    /// Follows the state the index in force was built from.
    pub fn built(&self) -> watch::Receiver<Arc<AgentState>> {
        self.built.subscribe()
    }

    /// Builds the index of the state in force, unless it is built already,
    /// and puts it in force. Runs off the serving thread.
    pub fn refresh(&self) -> Arc<DnsIndex> {
        let index = self.current.load_full();
        if Arc::ptr_eq(&index.source, &self.state.borrow()) {
            return index;
        }
        let _one_build = self.building.lock().unwrap_or_else(|e| e.into_inner());
        let state = self.state.borrow().clone();
        let index = self.current.load_full();
        if Arc::ptr_eq(&index.source, &state) {
            return index;
        }
        // Only what changed since the index in force (whole when most did).
        let next = Arc::new(index.next(state.clone()));
        self.current.store(next.clone());
        self.built.send_replace(state.clone());
        self.report(&next);
        self.observe_programming(&index.source, &state);
        next
    }

    /// DNS programming latency (CoreDNS's): for each EndpointSlice that
    /// changed from `before` to `after` and carries the time of its change
    /// (`last-change-trigger-time`), the time from then to now, when the
    /// index that answers from it is in force. Slices from before the agent
    /// started are not measured (the first index is built whole).
    fn observe_programming(&self, before: &AgentState, after: &AgentState) {
        let Some(m) = &self.metrics else { return };
        let now = crate::unix_nanos();
        for item in before.resources.diff(&after.resources) {
            let (old, new) = match item {
                imbl::ordmap::DiffItem::Add(_, new) => (None, new),
                imbl::ordmap::DiffItem::Update { old, new } => (Some(old.1), new.1),
                imbl::ordmap::DiffItem::Remove(..) => continue,
            };
            let kind = if new.state.service.headless {
                "headless"
            } else {
                "cluster_ip"
            };
            for slice in &new.state.slices {
                let Some(t) = slice
                    .trigger_time_unix_nanos
                    .filter(|t| *t >= self.started_unix_nanos)
                else {
                    continue;
                };
                let seen = old.is_some_and(|o| {
                    o.state
                        .slices
                        .iter()
                        .any(|s| s.name == slice.name && s.trigger_time_unix_nanos == Some(t))
                });
                if !seen {
                    m.dns
                        .programming_seconds
                        .get_or_create(&vec![("service_kind".to_owned(), kind.to_owned())])
                        .observe(now.saturating_sub(t).max(0) as f64 / 1e9);
                }
            }
        }
    }

    fn report(&self, index: &DnsIndex) {
        tracing::debug!(version = %index.version, names = index.len(), changed_services = ?index.changed, took = ?index.build_time, "DNS index built");
        if let Some(m) = &self.metrics {
            m.dns
                .names
                .set(i64::try_from(index.len()).unwrap_or(i64::MAX));
            m.dns
                .index_build_seconds
                .observe(index.build_time.as_secs_f64());
        }
        if let Some(s) = &self.status {
            let caught_up = Arc::ptr_eq(&index.source, &self.state.borrow());
            s.update(|d| {
                if let Some(dns) = d.dns.as_mut() {
                    if caught_up {
                        dns.behind = None;
                    }
                    dns.index_version = index.has_snapshot().then(|| index.version.clone());
                    dns.names = index.len();
                    dns.index_build_ms = index.build_time.as_secs_f64() * 1e3;
                }
            });
        }
    }
}

/// A running DNS stub.
#[derive(Debug)]
pub struct Started {
    /// Where `--dns-listen` is bound.
    pub addr: SocketAddr,
    /// Follows the state the index in force was built from.
    pub built: watch::Receiver<Arc<AgentState>>,
    /// Adds addresses and changes upstreams while it runs.
    pub control: Control,
}

/// Where the stub's sockets come from and are recorded, for restarts
/// without a gap (`crate::handoff`): those a predecessor handed over are
/// used instead of binding, and every socket served is kept for a
/// successor.
#[derive(Debug, Clone, Default)]
pub struct Sockets {
    /// Sockets a predecessor handed over.
    pub inherited: Option<Arc<crate::handoff::Inherited>>,
    /// Where the sockets served are kept for a successor.
    pub registry: Option<Arc<crate::handoff::Registry>>,
}

impl Sockets {
    /// UDP and TCP on `addr`: handed over, or bound now.
    fn bind(
        &self,
        addr: SocketAddr,
    ) -> anyhow::Result<(std::net::UdpSocket, std::net::TcpListener)> {
        let (udp, tcp) = match self.inherited.as_ref().and_then(|i| i.dns(addr)) {
            Some((udp, tcp)) => {
                udp.set_nonblocking(true)?;
                tcp.set_nonblocking(true)?;
                tracing::info!(%addr, "serving DNS on the sockets the previous agent handed over");
                (udp, tcp)
            }
            None => server::bind(addr)?,
        };
        if let Some(r) = &self.registry {
            use std::os::fd::AsFd;
            let bound = udp.local_addr()?;
            r.register(crate::handoff::Role::DnsUdp, bound, udp.as_fd());
            r.register(crate::handoff::Role::DnsTcp, bound, tcp.as_fd());
        }
        Ok((udp, tcp))
    }
}

/// What can change while the stub runs: the addresses it answers on (the
/// cluster DNS Service's, in transparent mode) and where it forwards.
#[derive(Debug, Clone)]
pub struct Control {
    listeners: tokio::sync::mpsc::UnboundedSender<server::Listener>,
    sockets: Sockets,
    routes: Arc<ArcSwap<forward::Routes>>,
    inputs: Arc<Mutex<RouteInputs>>,
    status: Arc<Status>,
    shutdown: CancellationToken,
}

/// Where forwarded names go is made from these, by precedence.
#[derive(Debug, Clone, Default)]
struct RouteInputs {
    /// `--dns-upstream` was given: it wins over the cluster's settings.
    pinned: bool,
    /// The upstreams `--dns-upstream` or resolv.conf named.
    configured: Vec<SocketAddr>,
    /// `--dns-forward`: win over the cluster's stub domains of the same zone.
    flag_zones: Vec<(Name, Vec<SocketAddr>)>,
    /// The cluster's stub domains (the kube-dns ConfigMap).
    cluster_zones: Vec<(Name, Vec<SocketAddr>)>,
    /// The cluster's upstream nameservers (the kube-dns ConfigMap).
    cluster_upstreams: Vec<SocketAddr>,
    /// The cluster DNS Service's ready endpoints (transparent mode).
    service_endpoints: Vec<SocketAddr>,
}

impl RouteInputs {
    /// Names outside every zone go to `--dns-upstream` when given, else to
    /// the cluster's upstream nameservers, else (transparent mode) the
    /// cluster DNS Service's endpoints, else resolv.conf's servers.
    fn default_servers(&self) -> &[SocketAddr] {
        if self.pinned {
            &self.configured
        } else if !self.cluster_upstreams.is_empty() {
            &self.cluster_upstreams
        } else if !self.service_endpoints.is_empty() {
            &self.service_endpoints
        } else {
            &self.configured
        }
    }

    /// `--dns-forward` zones, then the cluster's other stub domains.
    fn zones(&self) -> Vec<(Name, Vec<SocketAddr>)> {
        let mut zones = self.flag_zones.clone();
        for (z, servers) in &self.cluster_zones {
            if !zones.iter().any(|(f, _)| f == z) {
                zones.push((z.clone(), servers.clone()));
            }
        }
        zones
    }
}

impl Control {
    /// Binds `addr` (UDP and TCP) and answers there too, until the token
    /// returned is cancelled (or the stub stops).
    pub fn listen(&self, addr: SocketAddr) -> anyhow::Result<CancellationToken> {
        let (udp, tcp) = self.sockets.bind(addr)?;
        let stop = self.shutdown.child_token();
        self.listeners
            .send(server::Listener {
                udp,
                tcp,
                stop: stop.clone(),
            })
            .map_err(|_| anyhow::anyhow!("the DNS stub has stopped"))?;
        Ok(stop)
    }

    /// `addr` is no longer served: not for a successor either.
    pub fn forget(&self, addr: SocketAddr) {
        if let Some(r) = &self.sockets.registry {
            r.unregister_dns(addr);
        }
    }

    /// The cluster DNS Service's ready endpoints (transparent mode): where
    /// names outside every zone go unless `--dns-upstream` or the cluster's
    /// upstream nameservers say otherwise.
    pub fn set_service_endpoints(&self, servers: &[SocketAddr]) {
        self.change(|i| i.service_endpoints = servers.to_vec());
    }

    /// The cluster's DNS settings (the kube-dns ConfigMap): its stub
    /// domains, under `--dns-forward`'s, and its upstream nameservers,
    /// under `--dns-upstream`.
    pub fn set_cluster_dns(&self, zones: Vec<(Name, Vec<SocketAddr>)>, upstreams: Vec<SocketAddr>) {
        self.change(|i| {
            i.cluster_zones = zones;
            i.cluster_upstreams = upstreams;
        });
    }

    /// Where names outside every zone go now.
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.routes.load().default_servers()
    }

    /// Changes the inputs and, when where names go changed, the routes
    /// (queries already sent keep theirs).
    fn change(&self, f: impl FnOnce(&mut RouteInputs)) {
        let mut inputs = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        let before = (inputs.default_servers().to_vec(), inputs.zones());
        f(&mut inputs);
        let after = (inputs.default_servers().to_vec(), inputs.zones());
        if before == after {
            return;
        }
        let (default, zones) = after;
        let routes = if before.1 == zones {
            self.routes.load().with_default(&default)
        } else {
            forward::Routes::new(&default, &zones)
        };
        self.routes.store(Arc::new(routes));
        tracing::info!(upstreams = ?default, zones = ?zones.iter().map(|(z, _)| z.to_ascii()).collect::<Vec<_>>(), "DNS forwarding changed");
        self.status.update(|d| {
            if let Some(dns) = d.dns.as_mut() {
                dns.upstreams = default.iter().map(ToString::to_string).collect();
                dns.forward_zones = zones
                    .iter()
                    .map(|(z, servers)| {
                        (
                            z.to_ascii(),
                            servers.iter().map(ToString::to_string).collect(),
                        )
                    })
                    .collect();
            }
        });
    }

    /// `--dns-upstream` was given: the cluster's upstream nameservers do
    /// not replace it.
    pub fn pin_upstreams(&self) {
        self.change(|i| i.pinned = true);
    }
}

/// Binds `cfg.listen` (UDP and TCP), starts serving on a thread of its own
/// and follows `state`.
pub fn start(
    cfg: DnsConfig,
    state: watch::Receiver<Arc<AgentState>>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    tasks: &mut JoinSet<()>,
    shutdown: CancellationToken,
) -> anyhow::Result<Started> {
    start_with(
        cfg,
        state,
        status,
        metrics,
        tasks,
        shutdown,
        Sockets::default(),
    )
}

/// [`start`] with its sockets from `sockets`: those a predecessor handed
/// over are used, and those served are kept for a successor. `shutdown`
/// stops the serving (queries forwarded already are answered first).
pub fn start_with(
    mut cfg: DnsConfig,
    state: watch::Receiver<Arc<AgentState>>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    tasks: &mut JoinSet<()>,
    shutdown: CancellationToken,
    sockets: Sockets,
) -> anyhow::Result<Started> {
    let (udp, tcp) = sockets.bind(cfg.listen)?;
    cfg.listen = udp.local_addr()?;
    if let Some(why) = &cfg.no_upstream {
        tracing::error!("{why}");
    }
    status.update(|d| {
        d.dns = Some(DnsStatus {
            listen: cfg.listen.to_string(),
            zone: cfg.zone.to_ascii(),
            upstreams: cfg.upstreams.iter().map(ToString::to_string).collect(),
            forward_zones: cfg
                .forward_zones
                .iter()
                .map(|(z, servers)| {
                    (
                        z.to_ascii(),
                        servers.iter().map(ToString::to_string).collect(),
                    )
                })
                .collect(),
            upstream_warning: cfg.no_upstream.clone(),
            ..DnsStatus::default()
        })
    });
    let cell = Arc::new(IndexCell::naming(
        state.clone(),
        cfg.zone.clone(),
        cfg.ttl,
        cfg.endpoint_pod_names,
        Some(status.clone()),
        Some(metrics.clone()),
    ));
    let listen = cfg.listen;
    let built = cell.built();
    tracing::info!(%listen, zone = %cfg.zone, upstreams = ?cfg.upstreams, "DNS stub listening");

    // Build each new index as soon as the state changes, off the serving thread.
    let follower = cell.clone();
    let mut changes = state;
    let stop = shutdown.clone();
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            let c = follower.clone();
            let _ = tokio::task::spawn_blocking(move || c.refresh()).await;
        }
    });

    let routes = Arc::new(ArcSwap::from_pointee(forward::Routes::new(
        &cfg.upstreams,
        &cfg.forward_zones,
    )));
    let (listeners, incoming) = tokio::sync::mpsc::unbounded_channel();
    let control = Control {
        listeners,
        sockets,
        routes: routes.clone(),
        inputs: Arc::new(Mutex::new(RouteInputs {
            configured: cfg.upstreams.clone(),
            flag_zones: cfg.forward_zones.clone(),
            ..RouteInputs::default()
        })),
        status: status.clone(),
        shutdown: shutdown.clone(),
    };
    let _ = control.listeners.send(server::Listener {
        udp,
        tcp,
        stop: shutdown.child_token(),
    });
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("dns".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => {
                    let handler = Arc::new(server::StubHandler::new(cfg, cell, metrics, routes));
                    rt.block_on(server::serve(handler, incoming, shutdown));
                }
                Err(e) => tracing::error!("DNS runtime: {e}"),
            }
            let _ = done_tx.send(());
        })
        .context("starting the DNS thread")?;
    tasks.spawn(async move {
        let _ = done_rx.await;
    });
    Ok(Started {
        addr: listen,
        built,
        control,
    })
}

/// Sets up the listen address when it is link-local and we may: the dummy
/// interface and the NOTRACK rules (keeping those of `keep`, addresses a
/// predecessor served that this agent takes over). Other addresses are
/// bound as they are.
pub fn prepare_listen(listen: SocketAddr, keep: &[SocketAddr]) {
    let link_local = listen.is_ipv4() && link::is_link_local(listen.ip());
    if !link_local {
        return;
    }
    if !link::has_net_admin() {
        tracing::warn!(%listen, "no CAP_NET_ADMIN: binding the DNS address without creating it");
        return;
    }
    match link::install(listen, keep) {
        Ok(interface) => {
            tracing::info!(%listen, interface, "DNS address in place, with NOTRACK rules")
        }
        Err(e) => tracing::error!("setting up the DNS address: {e}"),
    }
}

#[cfg(test)]
mod tests;
