//! The gRPC side: one task per agent stream, all reading one shared
//! `watch<Arc<Snapshot>>`.
//!
//! ```text
//!  call ─▶ mTLS identity (node, cluster) ─▶ stream slot (--max-agent-streams)
//!       ─▶ wait for the first snapshot
//!       ─▶ a place among the Hellos waiting (--max-hellos-waiting[-per-address]), else refused
//!       ─▶ Hello parts (a few at a time; the first within 1 s of its turn, all within 10 s)
//!       ─▶ cluster served? node known? ─▶ first delta from the announced versions
//!       ─▶ stream task: delta from the ACKed snapshot, one update in flight, --ack-timeout
//!          from its first part (an update the agent does not read closes its connection)
//! ```
//!
//! Per stream the control plane keeps only an `Arc` of the snapshot the
//! agent last ACKed (shared with every other agent at that version), the
//! in-flight update's nonce and the version the agent is parked on after a
//! NACK. Updates are differences from the ACKed snapshot, computed once per
//! base version for all streams (see `crate::snapshot`). What an agent
//! announces in its Hello is turned into a difference from the current
//! snapshot at once and dropped, so a reconnect storm costs what differs,
//! not what the agents hold.
//!
//! # Updates
//!
//! A stream sends at most one update at a time; while one is in flight,
//! newer snapshots simply replace each other in the watch channel, so the
//! next update is the difference to the latest. After a NACK nothing is
//! sent until the snapshot changes. An update larger than
//! [`MAX_PART_BYTES`] (15 KiB of encoded resources, so that a part fills
//! one 16 KiB HTTP/2 DATA frame) goes out as several messages with one
//! nonce, made one at a time as the stream's channel takes them. The
//! reason is memory: tonic's encoder keeps a buffer as large as the
//! largest message it encoded for the life of the stream, so a 3 MB full
//! state in one message would cost every connected agent 3 MB for as long
//! as it stays (`switchyard_proto::codec`). Parts fill frames because a
//! full sync's cost is mostly per frame: one `writev` on the control plane,
//! one `recv` and a wake-up on the agent (perf, 1 Dec 2026).
//!
//! An update not answered within `--ack-timeout` of its first part ends
//! the stream (`DEADLINE_EXCEEDED`); the agent resumes on a new one. The
//! deadline counts from the first part because an agent that never reads
//! stalls the sends themselves (HTTP/2 flow control): counted from the last
//! part, as before, it never started, and such streams held their slots and
//! memory for ever (504 of them survived a 15 s timeout). A stream whose
//! update has not drained by then also has its connection closed
//! (`crate::listener::Closers`), counted as
//! `streams_refused_total{reason="undrained"}`.
//!
//! # Admission, in order
//!
//! ```text
//!  accept ─ --max-connections / --max-connections-per-address ─ TLS handshake (10 s; config in force)
//!    ─▶ node certificate (mTLS): O=system:nodes|--tls-client-organization, CN=system:node:NAME,
//!       URI SAN spiffe://…/cluster/C  (else UNAUTHENTICATED); exactly one CN, and every CN and O
//!       readable text: Kubernetes (Go's crypto/x509) reads the last of several CNs, other tools
//!       the first, so such a certificate is refused rather than read one way
//!    ─▶ stream slot (--max-agent-streams, else RESOURCE_EXHAUSTED) ─▶ wait for the first snapshot
//!    ─▶ a place among the Hellos waiting: --max-hellos-waiting (1,024) overall and
//!       --max-hellos-waiting-per-address (4)                      (else RESOURCE_EXHAUSTED, hello_queue)
//!    ─▶ a turn (8 at a time; waits while turns are given, sent away after 30 s without one)
//!    ─▶ Hello parts: the first within 1 s of the turn, all
//!       within 10 s, ≤ 1 MiB a message, bounded fields and count,
//!       each part taken in against the snapshot (Snapshot::take_in) as it arrives
//!    ─▶ certificate node = Hello node, certificate cluster = Hello cluster   (else PERMISSION_DENIED)
//!    ─▶ SnapshotService::serves_cluster (the sources' clusters)              (else NOT_FOUND, /status refused)
//!    ─▶ with a kube source: the node is one of its Nodes (SourceState::nodes) (else PERMISSION_DENIED)
//!    ─▶ first delta from the announcement (delta_from_announcement); the announcement is dropped
//! ```
//!
//! Nothing is read from a stream before a snapshot exists, so during a
//! control-plane restart the Hellos of reconnecting agents wait in their
//! HTTP/2 windows (16 KiB: what each waiting agent costs), not in memory.
//! Until the first ACK the stream keeps only `Baseline::Announced {
//! snapshot, pending }` (the first delta, whose resources are the
//! snapshot's shared `Arc`s); a later update after a NACK is that delta
//! rebased onto the newer snapshot (`rebase`, which may resend a resource
//! but never misses one). A turn is held while the Hello is read, so a
//! stream that sends nothing holds one for 1 s, and no source address may
//! have more than 4 streams waiting: 64 streams that never sent a Hello
//! used to hold the 8 turns 10 s each, in an unbounded queue, in front of
//! every agent (a fresh agent's sync went from 0.11 s to 75 s).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use switchyard_proto::tls::NodeCertificate;
use switchyard_proto::v1::snapshot_discovery_server::SnapshotDiscovery;
use switchyard_proto::v1::{self, agent_message};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::heap::Churn;
use crate::metrics::Metrics;
use crate::snapshot::{Announcement, Delta, Snapshot, View};
use crate::source::SourceState;
use crate::status::{NodeFacts, Status as CpStatus, StreamHandle};

/// How long an agent may take to send its Hello, once its turn came.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an agent may take to send the first part of its Hello once its
/// turn came: an agent sends it as it opens the stream, so it is normally
/// waiting in the stream's window already. A stream that sends nothing
/// holds a turn this long, not [`HELLO_TIMEOUT`].
const HELLO_FIRST_PART: Duration = Duration::from_secs(1);

/// How long the Hello queue may go without giving anyone a turn before the
/// streams waiting in it are sent away: a stream waits for as long as the
/// queue moves. A turn ends within [`HELLO_FIRST_PART`] or
/// [`HELLO_TIMEOUT`], so only a control plane that has stopped reading
/// Hellos goes this long without one. (A fixed 30 s for each stream's wait,
/// before, sent most of 1,000 new agents of 100,000 Services away, each to
/// come back for its full state: they never all synced.)
const HELLO_QUEUE_STALL: Duration = Duration::from_secs(30);

/// Encoded resource bytes per message of an update (protocol rule 7): a
/// part fills one HTTP/2 DATA frame. The gRPC encoder keeps a buffer as
/// large as the largest message it encoded for the life of the stream, so
/// this bounds what each connected agent costs (`switchyard_proto::codec`).
pub const MAX_PART_BYTES: usize = switchyard_proto::codec::PART_BYTES;

/// Tag and length of one resource inside an update (a length of up to
/// 2 MiB takes three bytes of varint).
const RESOURCE_FRAMING: usize = 4;

/// The largest message an agent may send (protocol rule 10). Hellos come in
/// parts of at most `HELLO_PART_BYTES`, ACKs and NACKs are small; the
/// decoder keeps a buffer as large as the largest message for the life of
/// the stream, so this is also what one stream can be made to hold.
pub const MAX_AGENT_MESSAGE_BYTES: usize = 1 << 20;

/// What a stream sends: an update part, or the status that ends it.
type Sent = Result<v1::SnapshotUpdate, Status>;

/// [`Sent`] as it waits in a stream's channel. A tokio channel keeps a block
/// of 32 slots per channel for the life of the stream whatever its bound,
/// and a `Sent` takes about 136 bytes: boxed, the block is about 300 bytes
/// instead of 4.4 KB per connected agent (heaptrack, 1,000 streams).
type Outgoing = Box<Sent>;

/// Hellos read and diffed at the same time: a reconnect storm of a thousand
/// agents holding 10,000 resources each is taken a few at a time, so the
/// announcements in memory at once stay a few MiB.
const HELLOS_AT_ONCE: usize = 8;

/// Longest `Hello.node_name` (a Kubernetes Node name is a DNS subdomain).
pub const MAX_NODE_NAME: usize = 253;
/// Longest `Hello.cluster_id` and `Hello.zone` (label values).
pub const MAX_LABEL: usize = 63;
/// Longest resource name (`cluster/namespace/name`) and version announced.
const MAX_ANNOUNCED_NAME: usize = MAX_LABEL + 1 + 63 + 1 + 253;
/// An agent may announce at most this many times the size of its view...
const ANNOUNCED_PER_VIEWED: usize = 4;
/// ...or this many, when that is more.
const ANNOUNCED_FLOOR: usize = 1024;

/// Bounds on agent streams.
#[derive(Debug, Clone)]
pub struct StreamLimits {
    /// Agent streams open at once, over all connections.
    pub max_streams: usize,
    /// An update not answered within this of its first part ends the
    /// stream (the agent reconnects and resumes).
    pub ack_timeout: Duration,
    /// Streams waiting for their Hello to be read, overall...
    pub max_hellos_waiting: usize,
    /// ...and from one source address.
    pub max_hellos_waiting_per_address: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            max_streams: 10_000,
            ack_timeout: Duration::from_secs(120),
            max_hellos_waiting: 1024,
            max_hellos_waiting_per_address: 4,
        }
    }
}

/// The streams waiting for their Hello to be read, counted overall and per
/// source address: a place is taken before the wait and given back after
/// the Hello (or on refusal), so streams that never send one cannot queue
/// without bound in front of agents that do. Hellos are read
/// [`HELLOS_AT_ONCE`] at a time, in turns.
#[derive(Debug)]
struct HelloQueue {
    waiting: std::sync::Mutex<(usize, std::collections::HashMap<std::net::IpAddr, usize>)>,
    turns: Semaphore,
    /// When a turn was last given (or the queue made).
    last_turn: std::sync::Mutex<tokio::time::Instant>,
}

impl Default for HelloQueue {
    fn default() -> Self {
        Self {
            waiting: std::sync::Mutex::default(),
            turns: Semaphore::new(HELLOS_AT_ONCE),
            last_turn: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }
}

/// A place among the Hellos waiting, given back on drop.
#[derive(Debug)]
struct HelloPlace<'a> {
    queue: &'a HelloQueue,
    address: Option<std::net::IpAddr>,
}

impl HelloQueue {
    /// A place for a stream from `address`, or why there is none.
    fn enter(
        &self,
        address: Option<std::net::IpAddr>,
        limits: &StreamLimits,
    ) -> Result<HelloPlace<'_>, String> {
        let mut w = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if w.0 >= limits.max_hellos_waiting {
            return Err(format!(
                "{} streams already wait for their Hello to be read (--max-hellos-waiting); retry",
                w.0
            ));
        }
        if let Some(ip) = address {
            let n = w.1.entry(ip).or_insert(0);
            if *n >= limits.max_hellos_waiting_per_address {
                return Err(format!(
                    "{n} streams from {ip} already wait for their Hello to be read \
                     (--max-hellos-waiting-per-address); retry"
                ));
            }
            *n += 1;
        }
        w.0 += 1;
        Ok(HelloPlace {
            queue: self,
            address,
        })
    }

    /// A turn to read a Hello, once one is free: however long that takes
    /// while others get theirs, or why the stream is sent away (the queue
    /// gave no turn for [`HELLO_QUEUE_STALL`]).
    async fn turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>, String> {
        loop {
            let stalled_at = *self.lock_last_turn() + HELLO_QUEUE_STALL;
            tokio::select! {
                turn = self.turns.acquire() => {
                    let turn = turn.map_err(|_| "control plane shutting down".to_owned())?;
                    *self.lock_last_turn() = tokio::time::Instant::now();
                    return Ok(turn);
                }
                () = tokio::time::sleep_until(stalled_at) => {
                    // Someone else may have had a turn meanwhile.
                    if *self.lock_last_turn() + HELLO_QUEUE_STALL <= tokio::time::Instant::now() {
                        return Err(format!(
                            "no Hello has been given a turn to be read for {HELLO_QUEUE_STALL:?}; retry"
                        ));
                    }
                }
            }
        }
    }

    fn lock_last_turn(&self) -> std::sync::MutexGuard<'_, tokio::time::Instant> {
        self.last_turn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for HelloPlace<'_> {
    fn drop(&mut self) {
        let mut w = self.queue.waiting.lock().unwrap_or_else(|e| e.into_inner());
        w.0 -= 1;
        if let Some(ip) = self.address
            && let Some(n) = w.1.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                w.1.remove(&ip);
            }
        }
    }
}

/// What the control plane serves: the clusters of its sources, and the
/// sources that publish a cluster's Nodes (`kube`).
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// Cluster ids of the configured sources.
    pub clusters: BTreeSet<String>,
    /// Per cluster, the states of the sources that know its Nodes.
    pub node_sources: Vec<(String, watch::Receiver<SourceState>)>,
}

/// Who may connect with mutual TLS.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    /// Subject organisations a node certificate may carry
    /// (`system:nodes` unless `--tls-client-organization` says otherwise).
    pub organizations: Vec<String>,
}

/// The `SnapshotDiscovery` service.
#[derive(Debug, Clone)]
pub struct SnapshotService {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    status: Arc<CpStatus>,
    metrics: Arc<Metrics>,
    /// With mTLS, the node (and cluster) a certificate must name.
    identity: Option<ClientIdentity>,
    served: Arc<Served>,
    limits: StreamLimits,
    streams: Arc<Semaphore>,
    hello_queue: Arc<HelloQueue>,
    /// Closes the connection of a stream whose update does not drain.
    closers: crate::listener::Closers,
    /// Stream events after which the heap is trimmed.
    churn: Arc<Churn>,
    shutdown: CancellationToken,
}

impl SnapshotService {
    /// A service streaming from `snapshots`.
    pub fn new(
        snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        status: Arc<CpStatus>,
        metrics: Arc<Metrics>,
        identity: Option<ClientIdentity>,
        served: Served,
        limits: StreamLimits,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            snapshots,
            status,
            metrics,
            identity,
            served: Arc::new(served),
            streams: Arc::new(Semaphore::new(limits.max_streams)),
            hello_queue: Arc::default(),
            closers: crate::listener::Closers::default(),
            limits,
            churn: Arc::new(Churn::default()),
            shutdown,
        }
    }

    /// Closes the connection of a stream whose update does not drain
    /// through `closers` (those of the listener serving it).
    pub fn closing_connections(mut self, closers: crate::listener::Closers) -> Self {
        self.closers = closers;
        self
    }

    /// Where the service's streams note their connects, first ACKs and ends
    /// (for `heap::run`).
    pub fn churn(&self) -> Arc<Churn> {
        self.churn.clone()
    }

    /// Whether agents of `cluster` are served: it is the cluster of one of
    /// the configured sources. Anything else is refused instead of being
    /// sent an empty view, which would remove every rule on its node.
    pub fn serves_cluster(&self, cluster: &str) -> bool {
        self.served.clusters.contains(cluster)
    }

    /// Whether `node` is a Node of `cluster`, when a source knows the
    /// cluster's Nodes; `None` when none does.
    fn node_known(&self, cluster: &str, node: &str) -> Option<bool> {
        let mut any = false;
        for (c, rx) in &self.served.node_sources {
            if c != cluster {
                continue;
            }
            any = true;
            if rx.borrow().nodes.iter().any(|n| n.name == node) {
                return Some(true);
            }
        }
        any.then_some(false)
    }

    fn refuse(&self, reason: &'static str, status: Status) -> Status {
        self.metrics.refused_streams(reason);
        status
    }
}

/// Reads the Hello, possibly in parts (protocol rule 9), within the bounds
/// of rule 10. The announced versions are taken in against `snapshot` part
/// by part (the Hello returned holds none of them) and counted against
/// `limit` as they come, so an announcement of millions of names is cut
/// off at the limit.
async fn read_hello<'s>(
    inbound: &mut Streaming<v1::AgentMessage>,
    snapshot: &'s Snapshot,
    limit: usize,
) -> Result<(v1::Hello, Announcement<'s>), Status> {
    let mut hello: Option<v1::Hello> = None;
    let mut announced = Announcement::default();
    loop {
        let next = inbound.message();
        let msg = if hello.is_none() {
            tokio::time::timeout(HELLO_FIRST_PART, next)
                .await
                .map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "no Hello within {HELLO_FIRST_PART:?} of its turn (an agent sends it as it \
                         opens the stream)"
                    ))
                })?
        } else {
            next.await
        };
        let msg = msg.map_err(|s| {
            if s.code() == Code::OutOfRange {
                Status::resource_exhausted(format!(
                    "a Hello part is larger than {MAX_AGENT_MESSAGE_BYTES} bytes: send \
                     initial_resource_versions in parts (protocol rule 9) [{}]",
                    s.message()
                ))
            } else {
                s
            }
        })?;
        let mut part = match msg.and_then(|m| m.kind) {
            Some(agent_message::Kind::Hello(h)) => h,
            _ if hello.is_some() => {
                return Err(Status::invalid_argument(
                    "a Hello part with `continued` set must be followed by another Hello part",
                ));
            }
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on a stream must be a Hello",
                ));
            }
        };
        for (name, version) in &part.initial_resource_versions {
            if name.len() > MAX_ANNOUNCED_NAME || version.len() > 64 {
                return Err(Status::invalid_argument(format!(
                    "Hello.initial_resource_versions: an entry of {} + {} bytes is longer than any \
                     resource name ({MAX_ANNOUNCED_NAME}) and version (64)",
                    name.len(),
                    version.len()
                )));
            }
        }
        let continued = part.continued;
        let versions = std::mem::take(&mut part.initial_resource_versions);
        let whole = match hello.take() {
            None => part,
            Some(acc) => {
                if acc.node_name != part.node_name || acc.cluster_id != part.cluster_id {
                    return Err(Status::invalid_argument(
                        "Hello parts disagree on node_name or cluster_id",
                    ));
                }
                acc
            }
        };
        snapshot.take_in(&mut announced, &versions);
        if announced.entries() > limit {
            return Err(Status::resource_exhausted(format!(
                "Hello.initial_resource_versions announces more than {limit} resources (four times \
                 the cluster's view, at least {ANNOUNCED_FLOOR}): reconnect announcing nothing for \
                 a full resync"
            )));
        }
        if !continued {
            return Ok((whole, announced));
        }
        hello = Some(whole);
    }
}

/// Checks the Hello's fields against rule 10's bounds.
fn check_hello_fields(hello: &v1::Hello) -> Result<(), Status> {
    let too_long = |field: &str, len: usize, max: usize| {
        Status::invalid_argument(format!("Hello.{field} is {len} bytes; the limit is {max}"))
    };
    if hello.node_name.is_empty() {
        return Err(Status::invalid_argument("Hello.node_name is empty"));
    }
    if hello.node_name.len() > MAX_NODE_NAME {
        return Err(too_long("node_name", hello.node_name.len(), MAX_NODE_NAME));
    }
    if hello.cluster_id.len() > MAX_LABEL {
        return Err(too_long("cluster_id", hello.cluster_id.len(), MAX_LABEL));
    }
    if hello.zone.len() > MAX_LABEL {
        return Err(too_long("zone", hello.zone.len(), MAX_LABEL));
    }
    if hello.snapshot_version.len() > 128 {
        return Err(too_long(
            "snapshot_version",
            hello.snapshot_version.len(),
            128,
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl SnapshotDiscovery for SnapshotService {
    type StreamSnapshotsStream =
        futures::stream::Map<ReceiverStream<Outgoing>, fn(Outgoing) -> Sent>;

    async fn stream_snapshots(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<Self::StreamSnapshotsStream>, Status> {
        let cert = match &self.identity {
            Some(identity) => {
                let leaf = request
                    .peer_certs()
                    .and_then(|c| c.first().cloned())
                    .ok_or_else(|| {
                        self.refuse(
                            "identity",
                            Status::unauthenticated("a client certificate is required"),
                        )
                    })?;
                Some(
                    NodeCertificate::parse(&leaf, &identity.organizations).map_err(|e| {
                        tracing::warn!("refused agent: {e}");
                        self.refuse("identity", Status::unauthenticated(e))
                    })?,
                )
            }
            None => None,
        };
        let slot = self.streams.clone().try_acquire_owned().map_err(|_| {
            self.refuse(
                "streams",
                Status::resource_exhausted(format!(
                    "the control plane already serves {} agent streams (--max-agent-streams)",
                    self.limits.max_streams
                )),
            )
        })?;
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        // Nothing is read before there is a snapshot to diff against: a
        // Hello waiting meanwhile stays in its HTTP/2 window, not in memory.
        let mut snapshots = self.snapshots.clone();
        let snapshot = tokio::select! {
            s = snapshots.wait_for(Option::is_some) => s
                .map_err(|_| Status::unavailable("control plane shutting down"))?
                .clone()
                .expect("waited for Some"),
            _ = self.shutdown.cancelled() => return Err(Status::unavailable("control plane shutting down")),
        };
        let (hello, announced) = {
            let _place = self
                .hello_queue
                .enter(peer.map(|p| p.ip()), &self.limits)
                .map_err(|why| {
                    tracing::debug!(?peer, "refused a stream: {why}");
                    self.refuse("hello_queue", Status::resource_exhausted(why))
                })?;
            let _turn = tokio::select! {
                turn = self.hello_queue.turn() => turn.map_err(|why| {
                    self.refuse("hello_queue", Status::unavailable(why))
                })?,
                _ = self.shutdown.cancelled() => return Err(Status::unavailable("control plane shutting down")),
            };
            // The bound needs the cluster, which only the Hello names: check
            // against the largest view, then the agent's own below.
            let largest = self
                .served
                .clusters
                .iter()
                .map(|c| snapshot.view_len(&View::Agent(c.clone())))
                .max()
                .unwrap_or(0);
            let limit = (ANNOUNCED_PER_VIEWED * largest).max(ANNOUNCED_FLOOR);
            let (hello, announced) =
                tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut inbound, &snapshot, limit))
                    .await
                    .map_err(|_| {
                        self.refuse(
                            "hello",
                            Status::deadline_exceeded("no complete Hello within 10 s"),
                        )
                    })?
                    .map_err(|s| self.refuse("hello", s))?;
            check_hello_fields(&hello).map_err(|s| self.refuse("hello", s))?;
            (hello, announced)
        };
        if let Some(cert) = &cert
            && cert.node != hello.node_name
        {
            tracing::warn!(cert = %cert.node, claimed = %hello.node_name, "refused agent: node name does not match its certificate");
            return Err(self.refuse(
                "identity",
                Status::permission_denied(format!(
                    "node name {:?} does not match the client certificate, which names node {:?}",
                    hello.node_name, cert.node
                )),
            ));
        }
        let cluster = if hello.cluster_id.is_empty() {
            switchyard_model::DEFAULT_CLUSTER.to_owned()
        } else {
            hello.cluster_id.clone()
        };
        let view = match v1::Role::try_from(hello.role) {
            Ok(v1::Role::Agent) if cluster == switchyard_model::CLUSTERSET => {
                return Err(self.refuse(
                    "hello",
                    Status::invalid_argument(format!(
                        "Hello.cluster_id {cluster:?} is reserved for the clusterset's imports; an agent names its own cluster"
                    )),
                ));
            }
            Ok(v1::Role::Agent) => View::Agent(cluster.clone()),
            Ok(v1::Role::Relay) if cluster == switchyard_model::CLUSTERSET => View::Clusterset,
            Ok(v1::Role::Relay) => View::Exports(cluster.clone()),
            Err(_) => {
                return Err(self.refuse(
                    "hello",
                    Status::invalid_argument(format!(
                        "Hello.role {} is not AGENT or RELAY",
                        hello.role
                    )),
                ));
            }
        };
        let relay = !matches!(view, View::Agent(_));
        let served_list = || {
            self.served
                .clusters
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(cert) = &cert {
            let refusal = match &cert.cluster {
                // A relay whose certificate fixes a cluster takes that
                // cluster's exports or the clusterset, nothing else.
                Some(c) if *c != cluster && !(relay && cluster == switchyard_model::CLUSTERSET) => {
                    Some(format!(
                        "cluster {cluster:?} does not match the client certificate, which fixes cluster {c:?}"
                    ))
                }
                None if self.served.clusters.len() > 1 => Some(format!(
                    "the client certificate names no cluster (a URI SAN spiffe://TRUST-DOMAIN/cluster/NAME) \
                     and this control plane serves several ({})",
                    served_list()
                )),
                _ => None,
            };
            if let Some(why) = refusal {
                tracing::warn!(node = %hello.node_name, "refused agent: {why}");
                self.status
                    .refused(&hello.node_name, &cluster, &hello.zone, &why);
                return Err(self.refuse("identity", Status::permission_denied(why)));
            }
        }
        // Every control plane has a clusterset view (possibly empty).
        if view != View::Clusterset && !self.serves_cluster(&cluster) {
            let why = format!(
                "cluster {cluster:?} is not served by this control plane (it serves: {}); check the \
                 agent's --cluster",
                served_list()
            );
            tracing::warn!(node = %hello.node_name, "refused agent: {why}");
            self.status
                .refused(&hello.node_name, &cluster, &hello.zone, &why);
            return Err(self.refuse("cluster", Status::not_found(why)));
        }
        if !relay && cert.is_some() && self.node_known(&cluster, &hello.node_name) == Some(false) {
            let why = format!(
                "node {:?} is not a Node of cluster {cluster:?} in its API server",
                hello.node_name
            );
            tracing::warn!("refused agent: {why}");
            self.status
                .refused(&hello.node_name, &cluster, &hello.zone, &why);
            return Err(self.refuse("identity", Status::permission_denied(why)));
        }
        let held = announced.entries();
        let viewed = snapshot.view_len(&view);
        let limit = (ANNOUNCED_PER_VIEWED * viewed).max(ANNOUNCED_FLOOR);
        if held > limit {
            return Err(self.refuse(
                "hello",
                Status::resource_exhausted(format!(
                    "Hello.initial_resource_versions announces {held} resources; the view of cluster \
                     {cluster:?} holds {viewed}, the limit is {limit}: reconnect announcing nothing for a \
                     full resync"
                )),
            ));
        }
        // The announcement becomes a difference now and is dropped.
        let pending = if held == 0 {
            snapshot.full(&view)
        } else {
            Arc::new(snapshot.delta_from_announcement(&announced, &view))
        };
        drop(announced);
        let node = hello.node_name;
        let handle = self
            .status
            .connected_from(&node, &cluster, &hello.zone, peer.map(|p| p.ip()));
        self.metrics.agents_connected.inc();
        // The Hello is freed.
        self.churn.note();
        tracing::info!(%node, %cluster, held, "agent connected");

        let (tx, rx) = mpsc::channel::<Outgoing>(2);
        let stream = AgentStream {
            node,
            sent_facts: None,
            peer,
            view,
            baseline: Baseline::Announced { snapshot, pending },
            in_flight: None,
            parked_on: None,
            next_nonce: 1,
            handle,
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let node = stream.node.clone();
            let handle = stream.handle.clone();
            if let Err(e) = stream.run(&this, inbound, tx).await {
                tracing::info!(%node, "agent stream ended: {e}");
            }
            this.status.disconnected(&handle);
            this.metrics.agents_connected.dec();
            this.churn.note();
        });
        let unbox: fn(Outgoing) -> Sent = |m| *m;
        Ok(Response::new(futures::StreamExt::map(
            ReceiverStream::new(rx),
            unbox,
        )))
    }
}

/// The messages of one update, each with at most [`MAX_PART_BYTES`] of
/// resources and removed names, made one at a time as the stream sends
/// them: a full state of 10,000 resources never exists as 200 messages at
/// once, only the one or two in the stream's channel. Resources are cheap to
/// copy: their payload is shared `Bytes`.
fn split_into_parts<'a>(
    delta: &'a Delta,
    version: &'a str,
    nonce: &'a str,
    changed_at_unix_nanos: i64,
) -> Parts<'a> {
    Parts {
        delta,
        version,
        nonce,
        changed_at_unix_nanos,
        changed: 0,
        removed: 0,
        done: false,
    }
}

/// The iterator [`split_into_parts`] returns.
struct Parts<'a> {
    delta: &'a Delta,
    version: &'a str,
    nonce: &'a str,
    changed_at_unix_nanos: i64,
    /// How many of the changed resources and removed names earlier parts took.
    changed: usize,
    removed: usize,
    done: bool,
}

impl Iterator for Parts<'_> {
    type Item = v1::SnapshotUpdate;

    fn next(&mut self) -> Option<v1::SnapshotUpdate> {
        if self.done {
            return None;
        }
        let (changed, removed) = (&self.delta.changed, &self.delta.removed);
        let mut resources = Vec::new();
        let mut removed_resources = Vec::new();
        let mut bytes = 0;
        // The first item of a part always goes in, however large.
        while let Some(r) = changed.get(self.changed) {
            // As encoded in the update: the resource, its tag and length.
            let size = prost::Message::encoded_len(&**r) + RESOURCE_FRAMING;
            if !resources.is_empty() && bytes + size > MAX_PART_BYTES {
                break;
            }
            bytes += size;
            resources.push((**r).clone());
            self.changed += 1;
        }
        if self.changed == changed.len() {
            while let Some(name) = removed.get(self.removed) {
                let size = name.len() + 2;
                if (!resources.is_empty() || !removed_resources.is_empty())
                    && bytes + size > MAX_PART_BYTES
                {
                    break;
                }
                bytes += size;
                removed_resources.push(name.to_string());
                self.removed += 1;
            }
        }
        self.done = self.changed == changed.len() && self.removed == removed.len();
        Some(v1::SnapshotUpdate {
            snapshot_version: self.version.to_owned(),
            nonce: self.nonce.to_owned(),
            resources,
            removed_resources,
            changed_at_unix_nanos: self.changed_at_unix_nanos,
            continued: !self.done,
            ..Default::default()
        })
    }
}

/// What the agent holds.
#[derive(Debug)]
enum Baseline {
    /// Until its first ACK: `snapshot` except what `pending` (the
    /// difference from its Hello to `snapshot`) changes.
    Announced {
        snapshot: Arc<Snapshot>,
        pending: Arc<Delta>,
    },
    /// The snapshot it last ACKed.
    Acked(Arc<Snapshot>),
}

/// The difference from "`base` except `pending`" to `current`: everything
/// `pending` named is sent (or removed) again, on top of `base` to
/// `current`. It may resend a resource the agent has; never misses one.
fn rebase(pending: &Delta, base_to_current: &Delta, current: &Snapshot, view: &View) -> Delta {
    let mut changed: BTreeMap<&str, Arc<v1::Resource>> = base_to_current
        .changed
        .iter()
        .map(|r| (r.name.as_str(), r.clone()))
        .collect();
    let mut removed: BTreeSet<Arc<str>> = base_to_current.removed.iter().cloned().collect();
    for r in &pending.changed {
        match current.resources.get(r.name.as_str()) {
            Some(now) if current.in_view(view, &r.name) => {
                changed.insert(r.name.as_str(), now.clone());
            }
            _ => {
                removed.insert(Arc::from(r.name.as_str()));
            }
        }
    }
    for name in &pending.removed {
        if !changed.contains_key(&**name) {
            removed.insert(name.clone());
        }
    }
    Delta {
        changed: changed.into_values().collect(),
        removed: removed.into_iter().collect(),
    }
}

/// The cluster's DNS settings as an update carries them.
fn cluster_dns(dns: &crate::source::ClusterDns) -> v1::ClusterDns {
    v1::ClusterDns {
        stub_domains: dns
            .stub_domains
            .iter()
            .map(|(zone, servers)| v1::StubDomain {
                zone: zone.clone(),
                servers: servers.clone(),
            })
            .collect(),
        upstream_nameservers: dns.upstream_nameservers.clone(),
    }
}

/// An update to send: the difference, its nonce and the snapshot it leads to.
type Update = (Arc<Delta>, String, Arc<Snapshot>);

#[derive(Debug)]
struct AgentStream {
    node: String,
    /// The Node facts the last update carried (`None` before the first).
    sent_facts: Option<NodeFacts>,
    /// The connection it came on (closed if an update does not drain).
    peer: Option<std::net::SocketAddr>,
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
        tx: mpsc::Sender<Outgoing>,
    ) -> Result<(), String> {
        let mut snapshots = svc.snapshots.clone();
        let mut node_facts = svc.status.subscribe_node_facts();
        let mut ack_deadline = None;
        // The facts changed while the stream waited for them (the wait
        // marks the change seen).
        let mut woke_on_facts = false;
        loop {
            if self.in_flight.is_none() {
                let current = snapshots.borrow_and_update().clone();
                let facts_moved =
                    std::mem::take(&mut woke_on_facts) | node_facts.has_changed().unwrap_or(false);
                node_facts.borrow_and_update();
                let update = match current {
                    Some(current) => self.next_update(&current),
                    None => None,
                }
                .or_else(|| {
                    // Nothing new to send but, maybe, the Node's facts.
                    facts_moved
                        .then(|| {
                            self.facts_update(
                                &svc.status.node_facts(self.view.cluster(), &self.node),
                            )
                        })
                        .flatten()
                });
                if let Some((delta, nonce, snapshot)) = update {
                    let count = delta.changed.len();
                    let facts = svc.status.node_facts(self.view.cluster(), &self.node);
                    let parts = split_into_parts(
                        &delta,
                        &snapshot.version,
                        &nonce,
                        snapshot.changed_at_unix_nanos,
                    );
                    let dns = facts.dns.as_deref().map(cluster_dns);
                    // The deadline counts from the first part: an agent
                    // that does not read stalls the sends (HTTP/2 flow
                    // control) and must not hold its stream for ever.
                    let deadline = tokio::time::Instant::now() + svc.limits.ack_timeout;
                    ack_deadline = Some(deadline);
                    for mut part in parts {
                        part.node_zone.clone_from(&facts.zone);
                        part.node_draining.clone_from(&facts.draining);
                        part.cluster_dns.clone_from(&dns);
                        tokio::select! {
                            sent = tx.send(Box::new(Ok(part))) => sent.map_err(|_| "agent went away".to_owned())?,
                            () = tokio::time::sleep_until(deadline) => return Err(self.undrained(svc)),
                            _ = svc.shutdown.cancelled() => return Err("control plane shutting down".into()),
                        }
                    }
                    self.sent_facts = Some(facts);
                    svc.status.pushed(&self.handle, count);
                    svc.metrics.pushes.inc();
                    svc.metrics.resources_sent.inc_by(count as u64);
                }
            }
            let waiting_for_ack = self.in_flight.is_some();
            tokio::select! {
                msg = inbound.message() => {
                    let msg = msg.map_err(|e| e.to_string())?.ok_or("agent closed the stream")?;
                    if let Err(status) = self.on_message(svc, msg) {
                        svc.metrics.refused_streams("hello");
                        let why = status.message().to_owned();
                        let _ = tx.try_send(Box::new(Err(status)));
                        return Err(why);
                    }
                }
                changed = snapshots.changed(), if !waiting_for_ack => {
                    changed.map_err(|_| "control plane shutting down".to_owned())?;
                }
                changed = node_facts.changed(), if !waiting_for_ack && self.sent_facts.is_some() => {
                    changed.map_err(|_| "control plane shutting down".to_owned())?;
                    woke_on_facts = true;
                }
                () = sleep_until(ack_deadline), if waiting_for_ack => {
                    let why = format!(
                        "no ACK or NACK within {:?} (--ack-timeout); reconnect to resume",
                        svc.limits.ack_timeout
                    );
                    svc.metrics.refused_streams("ack_timeout");
                    let _ = tx.try_send(Box::new(Err(Status::deadline_exceeded(why.clone()))));
                    return Err(why);
                }
                _ = svc.shutdown.cancelled() => return Err("control plane shutting down".into()),
            }
        }
    }

    /// Ends a stream whose update did not drain within the ACK timeout: the
    /// agent does not read. Its connection is closed, since nothing else
    /// frees what HTTP/2 holds for a stalled stream.
    fn undrained(&self, svc: &SnapshotService) -> String {
        svc.metrics.refused_streams("undrained");
        let closed = self.peer.is_some_and(|p| svc.closers.close(p));
        format!(
            "the update was not read within {:?} of its first part (--ack-timeout): the agent does \
             not read{}",
            svc.limits.ack_timeout,
            if closed {
                "; its connection is closed"
            } else {
                ""
            }
        )
    }

    /// The difference that brings the agent to `current`, if it needs one,
    /// the nonce of the update that carries it, and the snapshot it leads to.
    fn next_update(&mut self, current: &Arc<Snapshot>) -> Option<Update> {
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
            Baseline::Announced { snapshot, pending } if snapshot.version == current.version => {
                pending.clone()
            }
            Baseline::Announced { snapshot, pending } => Arc::new(rebase(
                pending,
                &current.delta_from(snapshot, &self.view),
                current,
                &self.view,
            )),
        };
        Some(self.send(delta, current.clone()))
    }

    /// An update without resources that keeps the agent at the snapshot it
    /// ACKed but carries its Node's new facts, when an agent that was told
    /// other facts is up to date or parked (a stream still on its first
    /// update gets them with it).
    fn facts_update(&mut self, facts: &NodeFacts) -> Option<Update> {
        if !matches!(self.view, View::Agent(_)) || self.sent_facts.as_ref() == Some(facts) {
            return None;
        }
        let Baseline::Acked(base) = &self.baseline else {
            return None;
        };
        let base = base.clone();
        Some(self.send(Arc::new(Delta::default()), base))
    }

    /// Records `delta` to `snapshot` as the update in flight, under a new nonce.
    fn send(&mut self, delta: Arc<Delta>, snapshot: Arc<Snapshot>) -> Update {
        let nonce = self.next_nonce.to_string();
        self.next_nonce += 1;
        self.in_flight = Some((nonce.clone(), snapshot.clone()));
        (delta, nonce, snapshot)
    }

    /// Takes in an ACK or a NACK; anything else ends the stream.
    fn on_message(&mut self, svc: &SnapshotService, msg: v1::AgentMessage) -> Result<(), Status> {
        match msg.kind {
            Some(agent_message::Kind::Ack(ack)) => {
                let Some((nonce, snapshot)) = self.in_flight.take_if(|(n, _)| *n == ack.nonce)
                else {
                    tracing::debug!(node = %self.node, nonce = %ack.nonce, "ignoring ACK of a stale nonce");
                    return Ok(());
                };
                tracing::debug!(node = %self.node, %nonce, version = %snapshot.version, "ACK");
                // Count first: status watchers that wake on the ACK may read the counter.
                svc.metrics.acks.inc();
                svc.status.acked(&self.handle, &snapshot.version);
                self.parked_on = None;
                if matches!(self.baseline, Baseline::Announced { .. }) {
                    // The first update (often the whole view) is done with.
                    svc.churn.note();
                }
                self.baseline = Baseline::Acked(snapshot);
            }
            Some(agent_message::Kind::Nack(nack)) => {
                let Some((_, snapshot)) = self.in_flight.take_if(|(n, _)| *n == nack.nonce) else {
                    tracing::debug!(node = %self.node, nonce = %nack.nonce, "ignoring NACK of a stale nonce");
                    return Ok(());
                };
                tracing::warn!(node = %self.node, version = %snapshot.version, error = %nack.error_detail, "agent rejected a snapshot; parked until the next change");
                // The agent's text is bounded by the message size; /status keeps a line of it.
                let detail: String = nack.error_detail.chars().take(4096).collect();
                svc.status.nacked(&self.handle, &snapshot.version, &detail);
                svc.metrics.nacks.inc();
                self.parked_on = Some(snapshot.version.clone());
            }
            // Decoded and ignored, a flood of these cost a core for nothing.
            Some(agent_message::Kind::Hello(_)) => {
                return Err(Status::invalid_argument(
                    "a second Hello on a stream: after its Hello an agent sends only ACKs and \
                     NACKs (protocol rule 1)",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "an agent message with no kind: after its Hello an agent sends only ACKs and \
                     NACKs (protocol rule 1)",
                ));
            }
        }
        Ok(())
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stream_waits_for_its_turn_while_others_get_theirs() {
        let queue = Arc::new(HelloQueue::default());
        let mut held = Vec::new();
        for _ in 0..HELLOS_AT_ONCE {
            held.push(queue.turn().await.expect("a free turn"));
        }
        // Three streams queue before the one watched; each keeps its turn.
        let (got, mut turns_given) = mpsc::unbounded_channel();
        for _ in 0..3 {
            let (queue, got) = (queue.clone(), got.clone());
            tokio::spawn(async move {
                let _turn = queue.turn().await.expect("a turn");
                got.send(()).expect("the test waits");
                std::future::pending::<()>().await;
            });
        }
        tokio::task::yield_now().await;
        let watched = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.turn().await.map(drop) })
        };
        // A turn every 20 s: the watched stream waits 60 s, twice the stall bound.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            held.pop();
            turns_given
                .recv()
                .await
                .expect("a stream ahead got its turn");
            assert!(!watched.is_finished(), "sent away while the queue moved");
        }
        held.pop();
        watched
            .await
            .expect("the task ran")
            .expect("the turn after those ahead");
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_that_gives_no_turn_sends_its_streams_away() {
        let queue = Arc::new(HelloQueue::default());
        let mut held = Vec::new();
        for _ in 0..HELLOS_AT_ONCE {
            held.push(queue.turn().await.expect("a free turn"));
        }
        let started = tokio::time::Instant::now();
        let why = queue.turn().await.expect_err("no turn is ever given back");
        assert_eq!(started.elapsed(), HELLO_QUEUE_STALL);
        assert!(why.contains("no Hello has been given a turn"), "{why}");
    }

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
        let parts: Vec<_> = split_into_parts(&small, "v1", "7", 5).collect();
        assert_eq!(parts.len(), 1);
        assert!(!parts[0].continued);
        assert_eq!(parts[0].removed_resources, ["gone"]);

        let big = Delta {
            changed: (0..100).map(|i| resource(&format!("r{i}"), 1000)).collect(),
            removed: vec![Arc::from("gone")],
        };
        let parts: Vec<_> = split_into_parts(&big, "v2", "8", 5).collect();
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

    #[test]
    fn a_part_fills_one_http2_data_frame_and_no_more() {
        // HTTP/2's default largest frame; a part is one frame, whatever the
        // size of its resources (their tags and lengths count too).
        const FRAME: usize = 16 * 1024;
        for payload in [20, 250, 3000] {
            let delta = Delta {
                changed: (0..2000)
                    .map(|i| {
                        Arc::new(v1::Resource {
                            name: format!("default/bench-{:03}/svc-{i:05}", i / 100),
                            version: format!("{i:016x}"),
                            service_state: bytes::Bytes::from(vec![7u8; payload]),
                        })
                    })
                    .collect(),
                removed: vec![],
            };
            let parts: Vec<_> = split_into_parts(&delta, "19b0c2f3a1c4e7-12", "1", 5).collect();
            let total: usize = delta
                .changed
                .iter()
                .map(|r| prost::Message::encoded_len(&**r))
                .sum();
            // As few parts as the frame size allows.
            assert!(
                parts.len() <= total.div_ceil(MAX_PART_BYTES * 9 / 10),
                "{} parts for {total} bytes of {payload}-byte resources",
                parts.len()
            );
            for mut p in parts {
                p.node_zone = "z".repeat(MAX_LABEL);
                let framed = prost::Message::encoded_len(&p) + 5;
                assert!(
                    framed <= FRAME,
                    "a part of {framed} bytes ({payload}-byte resources)"
                );
            }
        }
    }

    #[test]
    fn removals_are_split_into_parts_too() {
        let names: Vec<Arc<str>> = (0..5000)
            .map(|i| Arc::from(format!("default/ns/removed-service-{i:05}").as_str()))
            .collect();
        let delta = Delta {
            changed: vec![resource("default/ns/kept", 100)],
            removed: names.clone(),
        };
        let parts: Vec<_> = split_into_parts(&delta, "v", "1", 0).collect();
        assert!(parts.len() > 5, "{} parts", parts.len());
        for p in &parts {
            let bytes: usize = p
                .removed_resources
                .iter()
                .map(|n| n.len() + 2)
                .sum::<usize>()
                + p.resources
                    .iter()
                    .map(|r| r.service_state.len() + r.name.len() + 1)
                    .sum::<usize>();
            assert!(bytes <= MAX_PART_BYTES, "a part of {bytes} bytes");
        }
        let removed: Vec<String> = parts
            .iter()
            .flat_map(|p| p.removed_resources.clone())
            .collect();
        assert_eq!(removed.len(), 5000);
        assert!(removed.iter().zip(&names).all(|(a, b)| a == &**b));
    }

    #[test]
    fn hello_fields_are_bounded_by_name() {
        let ok = v1::Hello {
            node_name: "node-a".into(),
            ..Default::default()
        };
        check_hello_fields(&ok).expect("fine");
        for (hello, field) in [
            (
                v1::Hello {
                    node_name: "n".repeat(254),
                    ..Default::default()
                },
                "node_name",
            ),
            (
                v1::Hello {
                    node_name: "n".into(),
                    cluster_id: "c".repeat(64),
                    ..Default::default()
                },
                "cluster_id",
            ),
            (
                v1::Hello {
                    node_name: "n".into(),
                    zone: "z".repeat(64),
                    ..Default::default()
                },
                "zone",
            ),
        ] {
            let s = check_hello_fields(&hello).expect_err("over a bound");
            assert_eq!(s.code(), Code::InvalidArgument);
            assert!(s.message().contains(field), "{}", s.message());
        }
    }

    #[test]
    fn a_rebased_first_update_misses_nothing() {
        // The agent announced a@1 and x (unknown); the first update (pending)
        // changes a to 2 and removes x. Then b appears and a changes again.
        let a2 = resource("c/ns/a", 10);
        let pending = Delta {
            changed: vec![a2],
            removed: vec![Arc::from("c/ns/x")],
        };
        let mut resources = crate::snapshot::Resources::new();
        let a3 = Arc::new(v1::Resource {
            version: "3".into(),
            ..(*resource("c/ns/a", 12)).clone()
        });
        let b = resource("c/ns/b", 10);
        resources.insert(Arc::from("c/ns/a"), a3.clone());
        resources.insert(Arc::from("c/ns/b"), b.clone());
        let mut versions = crate::snapshot::VersionSource::new();
        let contents = crate::snapshot::Contents {
            resources,
            ready: ["c".to_owned()].into(),
            ..Default::default()
        };
        let current =
            Snapshot::from_resources(&Snapshot::empty(String::new()), contents, &mut versions, 0)
                .expect("snapshot");
        let base_to_current = Delta {
            changed: vec![a3.clone(), b.clone()],
            removed: vec![],
        };
        let d = rebase(
            &pending,
            &base_to_current,
            &current,
            &View::Agent("c".into()),
        );
        let names: Vec<&str> = d.changed.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["c/ns/a", "c/ns/b"]);
        assert!(Arc::ptr_eq(&d.changed[0], &a3), "a at its current version");
        assert_eq!(d.removed, [Arc::<str>::from("c/ns/x")]);
    }
}
