//! The hickory-server side: our UDP loop (`udp.rs`) and our TCP front
//! around hickory-server's `Request`, our `RequestHandler` that runs the
//! core on each request and forwards within a bound, and hickory-server's
//! `MessageResponse` encoding.
//!
//! ```text
//!  UDP: udp::serve (one loop; a task only for a query that waits for an upstream) ─┐
//!  TCP: accept ─ source not allowed, or over --dns-max-tcp-connections (total, per source)? close
//!        └▶ a task per connection: length-prefixed requests in turn, 10 s idle      │
//!                                    ├───────────────────────────────────────────────┘
//!                                    ├▶ StubHandler ─▶ IndexCell::current ─▶ decide
//!                                    │    ├▶ Answer  ─▶ response::answer ─▶ ResponseHandler
//!                                    │    ├▶ Forward ─▶ cache? ─▶ upstreams (at most --dns-max-inflight, else REFUSED) ─▶ response::relay
//!                                    │    └▶ Drop
//! ```
//!
//! hickory-server's own TCP listener has no connection limit: one pod
//! opening thousands of connections would hold as many sockets and tasks.
//! Ours closes at accept a connection from a source the access list does
//! not allow, then admits at most [`TcpLimits::total`] connections, and
//! [`TcpLimits::per_source`] from one allowed address, closing the rest,
//! and closes a connection idle for `TCP_IDLE` or slower than that to send
//! one request (defaults: `--dns-max-tcp-connections` 256,
//! `--dns-max-tcp-per-source` 16). The access list used to be checked per
//! query only, so 400 connections from 20 addresses it does not allow held
//! every slot and allowed clients' TCP queries failed
//! (`tests/dns_abuse.rs`).
//!
//! All of it runs on a current-thread runtime on a thread of its own
//! (15-25% faster than multi-thread on one core, measured by the
//! calibration prototypes). `StubHandler` counts the rcode, truncation and
//! refused sources of what was sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::cache::{AnswerCache, Cached};
use super::encoded::{Encoded, EncodedAnswers, Relayed, Valid};
use super::handler::{Decision, Forward, decide};
use super::response::Transport;
use super::{DnsConfig, IndexCell, direct, forward, response};
use crate::status::Metrics;

/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Bounds on TCP connections.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    /// Connections open at once.
    pub total: usize,
    /// Connections open at once from one source address.
    pub per_source: usize,
}

impl Default for TcpLimits {
    fn default() -> Self {
        Self {
            total: 256,
            per_source: 16,
        }
    }
}
/// Upstream answers kept (about 1 KiB each).
const CACHE_ENTRIES: usize = 10_000;

/// Binds UDP and TCP on one address (on one free port when the port is 0).
pub(super) fn bind(
    listen: SocketAddr,
) -> anyhow::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let mut last = None;
    for _ in 0..16 {
        let udp = std::net::UdpSocket::bind(listen)
            .with_context(|| format!("binding --dns-listen {listen} (UDP)"))?;
        let addr = udp.local_addr()?;
        match std::net::TcpListener::bind(addr) {
            Ok(tcp) => {
                udp.set_nonblocking(true)?;
                tcp.set_nonblocking(true)?;
                return Ok((udp, tcp));
            }
            // With port 0 the UDP port may be taken for TCP: try another.
            Err(e) if listen.port() == 0 => last = Some(e),
            Err(e) => {
                return Err(e).with_context(|| format!("binding --dns-listen {listen} (TCP)"));
            }
        }
    }
    Err(anyhow::anyhow!(
        "no port free for both UDP and TCP: {last:?}"
    ))
}

/// Runs the core for hickory-server, counts what it answered.
pub(super) struct StubHandler {
    cfg: DnsConfig,
    cell: Arc<IndexCell>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    /// Where forwarded names go; replaced whole when the upstreams change
    /// (a query keeps the ones it was sent to).
    routes: Arc<ArcSwap<forward::Routes>>,
    pub(super) cache: Arc<AnswerCache>,
}

/// What the UDP loop does with one datagram.
pub(super) enum Reply {
    /// Send the answer now in the output buffer.
    Now,
    /// Wait for the upstreams, asked already (in a task of its own):
    /// [`StubHandler::reply_later`].
    Later(Box<Later>),
    /// Send nothing.
    Nothing,
}

/// A UDP query whose answer waits for the upstreams.
pub(super) struct Later {
    request: Request,
    forward: Box<Forward>,
    forwarding: Forwarding,
}

impl Later {
    /// When its question went to the upstreams, as soon as it was decided.
    pub(super) fn asked(&self) -> Instant {
        self.forwarding.asked
    }
}

/// A question sent to the upstreams, within the in-flight bound.
struct Forwarding {
    asking: forward::Asking,
    upstreams: Arc<forward::Upstreams>,
    asked: Instant,
    permit: OwnedSemaphorePermit,
}

#[async_trait::async_trait]
impl RequestHandler for StubHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        self.handle(request, response).await
    }
}

impl StubHandler {
    /// The metrics it counts into.
    pub(super) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A handler answering from `cell` as `cfg` says, forwarding by `routes`.
    pub(super) fn new(
        cfg: DnsConfig,
        cell: Arc<IndexCell>,
        metrics: Arc<Metrics>,
        routes: Arc<ArcSwap<forward::Routes>>,
    ) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(cfg.max_inflight)),
            cache: Arc::new(AnswerCache::serving_stale(CACHE_ENTRIES, cfg.serve_stale)),
            routes,
            cfg,
            cell,
            metrics,
        }
    }

    async fn handle<R: ResponseHandler>(&self, request: &Request, response: R) -> ResponseInfo {
        let index = self.cell.current();
        let (info, refused_source) =
            match decide(&index, &self.cfg.acl, request, request.src().ip()) {
                Decision::Answer(a) => (
                    response::answer(request, &a, response).await,
                    a.refused_source,
                ),
                Decision::Forward(f) => (self.forward(request, f, response).await, false),
                Decision::Drop => {
                    self.metrics.dns.dropped.inc();
                    return response::unanswered(request, ResponseCode::NoError);
                }
            };
        self.count(&info, refused_source);
        info
    }

    fn count(&self, info: &ResponseInfo, refused_source: bool) {
        let d = &self.metrics.dns;
        d.count_response(u16::from(info.response_code));
        if refused_source {
            d.refused_sources.inc();
        }
        if info.truncation {
            d.truncated.inc();
        }
    }

    /// Answers the datagram `bytes` from `src` into `out` when no upstream
    /// needs asking: from `encoded` when it holds the answer, else written
    /// directly for a plain address question (`direct.rs`), else through
    /// hickory-server's parser, [`decide`] and its encoder (and then keeps
    /// the encoding). As hickory-server's `Server`: nothing for fewer bytes
    /// than a header, FORMERR for a message that does not parse.
    pub(super) fn reply_now(
        &self,
        encoded: &mut EncodedAnswers,
        bytes: &[u8],
        src: SocketAddr,
        now: impl Fn() -> Instant,
        out: &mut Vec<u8>,
    ) -> Reply {
        if bytes.len() < 12 {
            return Reply::Nothing;
        }
        let index = self.cell.current();
        let allowed = self.cfg.acl.allows(src.ip());
        let retired = self.cache.retired();
        if allowed && let Some(hit) = encoded.answer(&index, bytes, retired, &now, out) {
            let d = &self.metrics.dns;
            if let Valid::Upstream(r) = &hit.valid {
                d.cache_hits.inc();
                if r.current.prefetch_due(r.stored, r.ttl, now())
                    && let Ok(m) = Message::from_vec(bytes)
                    && let Some(q) = m.queries.into_iter().next()
                {
                    self.prefetch(q);
                }
            }
            d.count_response(hit.rcode);
            if hit.truncated {
                d.truncated.inc();
            }
            return Reply::Now;
        }
        if allowed && direct::answer(&index, bytes, out) {
            let rcode = u16::from(ResponseCode::NoError);
            self.metrics.dns.count_response(rcode);
            let entry = Encoded {
                bytes: out.as_slice().into(),
                rcode,
                truncated: false,
                valid: Valid::Index,
            };
            encoded.put_spare(&index, bytes, entry);
            return Reply::Now;
        }
        let Ok(request) = Request::from_bytes(bytes.to_vec(), src, Protocol::Udp) else {
            return match response::formerr(bytes, Transport::Udp) {
                Some(answer) => {
                    *out = answer;
                    Reply::Now
                }
                None => Reply::Nothing,
            };
        };
        let (info, answer, valid, refused_source) =
            match decide(&index, &self.cfg.acl, &request, src.ip()) {
                Decision::Answer(a) => {
                    let (info, answer) = response::encode_answer(&request, &a, Transport::Udp);
                    (info, answer, Valid::Index, a.refused_source)
                }
                Decision::Forward(f) => {
                    let Some(hit) = self.lookup(&f.query, now()) else {
                        let Some(forwarding) = self.ask(&f) else {
                            let (info, answer) = response::encode_error(
                                &request,
                                ResponseCode::Refused,
                                Transport::Udp,
                            );
                            self.count(&info, false);
                            *out = answer;
                            return Reply::Now;
                        };
                        return Reply::Later(Box::new(Later {
                            request,
                            forward: f,
                            forwarding,
                        }));
                    };
                    self.metrics.dns.cache_hits.inc();
                    let (info, answer) =
                        response::encode_relay(&request, &f, &hit.answer, Transport::Udp);
                    let Some(relayed) = Relayed::of(&hit, &answer, usize::from(f.cname.is_some()))
                    else {
                        self.count(&info, false);
                        *out = answer;
                        return Reply::Now;
                    };
                    (info, answer, Valid::Upstream(relayed), false)
                }
                Decision::Drop => {
                    self.metrics.dns.dropped.inc();
                    return Reply::Nothing;
                }
            };
        self.count(&info, refused_source);
        if allowed {
            let entry = Encoded {
                bytes: answer.as_slice().into(),
                rcode: u16::from(info.response_code),
                truncated: info.truncation,
                valid,
            };
            encoded.put(&index, bytes, entry);
        }
        *out = answer;
        Reply::Now
    }

    /// Answers a datagram [`Self::reply_now`] left for the upstreams;
    /// `None` when there is nothing to send.
    pub(super) async fn reply_later(&self, later: Box<Later>) -> Option<Vec<u8>> {
        let Later {
            request,
            forward,
            forwarding,
        } = *later;
        let (info, answer) = match self.answered(&forward, forwarding).await {
            Some(a) => response::encode_relay(&request, &forward, &a, Transport::Udp),
            None => response::encode_error(&request, ResponseCode::ServFail, Transport::Udp),
        };
        self.count(&info, false);
        (!answer.is_empty()).then_some(answer)
    }

    /// The cache's answer to `query`; one due for a prefetch is fetched
    /// again in the background.
    fn lookup(&self, query: &Query, now: Instant) -> Option<Cached> {
        let hit = self.cache.lookup(query, now)?;
        if hit.current.prefetch_due(hit.stored, hit.ttl, now) {
            self.prefetch(query.clone());
        }
        Some(hit)
    }

    /// Asks the upstreams `query` again before its cached answer expires
    /// (a task of its own; skipped over the in-flight bound), so a name
    /// asked for steadily is always answered from the cache.
    fn prefetch(&self, query: Query) {
        // Off a runtime (the unit tests' direct calls) there is nowhere to wait.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return;
        };
        let upstreams = self.routes.load().for_name(query.name()).clone();
        let asking = forward::Asking::send(&query, &upstreams);
        let (cache, metrics) = (self.cache.clone(), self.metrics.clone());
        runtime.spawn(async move {
            let answer = asking.answer(&upstreams).await;
            drop(permit);
            if let Some(a) = answer {
                cache.put(&query, &a, Instant::now());
                metrics.dns.prefetches.inc();
            }
        });
    }

    /// Sends `f`'s question to the upstreams, within the in-flight bound;
    /// `None` over it.
    fn ask(&self, f: &Forward) -> Option<Forwarding> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.metrics.dns.forward_overload.inc();
            return None;
        };
        self.metrics.dns.forwarded.inc();
        let asked = Instant::now();
        let upstreams = self.routes.load().for_name(f.query.name()).clone();
        Some(Forwarding {
            asking: forward::Asking::send(&f.query, &upstreams),
            upstreams,
            asked,
            permit,
        })
    }

    /// The upstreams' answer to `forwarding` (kept in the cache); `None`
    /// when none answered.
    async fn answered(&self, f: &Forward, forwarding: Forwarding) -> Option<Message> {
        let Forwarding {
            asking,
            upstreams,
            asked,
            permit,
        } = forwarding;
        let answer = asking.answer(&upstreams).await;
        drop(permit);
        let d = &self.metrics.dns;
        d.upstream_seconds.observe(asked.elapsed().as_secs_f64());
        if let Some(a) = &answer {
            self.cache.put(&f.query, a, Instant::now());
        } else {
            d.forward_failures.inc();
            // Every upstream failed: an expired answer, if one is kept.
            let stale = self.cache.stale(&f.query, Instant::now());
            if stale.is_some() {
                d.stale_answers.inc();
            }
            return stale;
        }
        answer
    }

    /// Answers from the cache or the upstreams, within the in-flight bound;
    /// over it, REFUSED (as CoreDNS's `forward` does at `max_concurrent`).
    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        f: Box<Forward>,
        response: R,
    ) -> ResponseInfo {
        if let Some(hit) = self.lookup(&f.query, Instant::now()) {
            let answer = hit.answer;
            self.metrics.dns.cache_hits.inc();
            return response::relay(request, &f, &answer, response).await;
        }
        let Some(forwarding) = self.ask(&f) else {
            return response::error(request, ResponseCode::Refused, response).await;
        };
        match self.answered(&f, forwarding).await {
            Some(answer) => response::relay(request, &f, &answer, response).await,
            None => response::error(request, ResponseCode::ServFail, response).await,
        }
    }
}

/// An address the stub answers on: its UDP socket and TCP listener,
/// served until `stop`.
#[derive(Debug)]
pub struct Listener {
    /// The UDP socket (non-blocking).
    pub udp: std::net::UdpSocket,
    /// The TCP listener (non-blocking).
    pub tcp: std::net::TcpListener,
    /// Stops serving this address (the sockets close).
    pub stop: CancellationToken,
}

/// Serves every listener that arrives on `listeners` until `shutdown`.
pub(super) async fn serve(
    handler: Arc<StubHandler>,
    mut listeners: tokio::sync::mpsc::UnboundedReceiver<Listener>,
    shutdown: CancellationToken,
) {
    loop {
        let l = tokio::select! {
            l = listeners.recv() => l,
            _ = shutdown.cancelled() => break,
        };
        let Some(l) = l else {
            shutdown.cancelled().await;
            break;
        };
        let (udp, tcp) = match (UdpSocket::from_std(l.udp), TcpListener::from_std(l.tcp)) {
            (Ok(u), Ok(t)) => (u, t),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!("DNS sockets: {e}");
                continue;
            }
        };
        tokio::spawn(serve_tcp(tcp, handler.clone(), l.stop.clone()));
        tokio::spawn(super::udp::serve(udp, handler.clone(), l.stop));
    }
    // Queries already sent upstream are answered before the runtime goes
    // (an agent that handed its sockets to a successor still owes them).
    let all = u32::try_from(handler.cfg.max_inflight).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(
        forward::UPSTREAM_TIMEOUT * 2,
        handler.permits.clone().acquire_many_owned(all),
    )
    .await;
    if drained.is_err() {
        tracing::warn!("stopping with forwarded DNS queries still unanswered");
    }
}

/// Accepts TCP clients within the limits until `stop`.
async fn serve_tcp(tcp: TcpListener, handler: Arc<StubHandler>, stop: CancellationToken) {
    let limits = handler.cfg.tcp_limits;
    let total = Arc::new(Semaphore::new(limits.total));
    let per_source: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> =
        Arc::default();
    loop {
        let (stream, src) = tokio::select! {
            a = tcp.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!("DNS TCP accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        // A source that may not query gets no slot: checked per query
        // only, 400 connections from 20 such addresses held every slot.
        if !handler.cfg.acl.allows(src.ip()) {
            handler.metrics.dns.tcp_refused.inc();
            handler.metrics.dns.refused_sources.inc();
            continue;
        }
        let Ok(slot) = total.clone().try_acquire_owned() else {
            handler.metrics.dns.tcp_refused.inc();
            continue;
        };
        {
            let mut counts = per_source.lock().unwrap_or_else(|e| e.into_inner());
            let n = counts.entry(src.ip()).or_insert(0);
            if *n >= limits.per_source {
                drop(counts);
                handler.metrics.dns.tcp_refused.inc();
                continue;
            }
            *n += 1;
        }
        let handler = handler.clone();
        let per_source = per_source.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = serve_connection(stream, src, &handler) => {}
                _ = stop.cancelled() => {}
            }
            drop(slot);
            let mut counts = per_source.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = counts.get_mut(&src.ip()) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&src.ip());
                }
            }
        });
    }
}

/// Answers the requests of one TCP connection in turn (RFC 7766 framing:
/// a two-byte length before each message) until it closes, idles for
/// [`TCP_IDLE`], or takes longer than that to send one message.
async fn serve_connection(
    mut stream: tokio::net::TcpStream,
    src: SocketAddr,
    handler: &StubHandler,
) {
    let _ = stream.set_nodelay(true);
    loop {
        let mut len = [0u8; 2];
        let read = tokio::time::timeout(TCP_IDLE, async {
            stream.read_exact(&mut len).await?;
            let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut msg).await?;
            Ok::<_, std::io::Error>(msg)
        })
        .await;
        let Ok(Ok(msg)) = read else {
            return;
        };
        let Some(answer) = response::respond(handler, msg, src, Transport::Tcp).await else {
            // Fewer bytes than a header: hickory-server drops those too.
            continue;
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(answer.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&answer);
        if tokio::time::timeout(TCP_IDLE, stream.write_all(&out))
            .await
            .is_err()
        {
            return;
        }
    }
}
