//! The hickory-server side: one `Server` with the UDP socket, our own TCP
//! front, and the `RequestHandler` that runs the core on each request and
//! forwards within a bound.
//!
//! ```text
//!  UDP: Server (a task per datagram) ─┐
//!  TCP: accept ─ over --dns-max-tcp-connections (total, per source)? close
//!        └▶ a task per connection: length-prefixed requests in turn, 10 s idle
//!                                    ├▶ StubHandler::handle_request ─▶ IndexCell::current ─▶ decide
//!                                    │    ├▶ Answer  ─▶ response::answer ─▶ ResponseHandler
//!                                    │    ├▶ Forward ─▶ cache? ─▶ upstreams (at most --dns-max-inflight, else REFUSED) ─▶ response::relay
//!                                    │    └▶ Drop
//! ```
//!
//! hickory-server's own TCP listener has no connection limit: one pod
//! opening thousands of connections would hold as many sockets and tasks.
//! Ours admits at most [`TcpLimits::total`] connections, and
//! [`TcpLimits::per_source`] from one address, closing the rest at accept,
//! and closes a connection idle for [`TCP_IDLE`] or slower than that to send
//! one request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hickory_proto::op::ResponseCode;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::cache::AnswerCache;
use super::handler::{Decision, Forward, decide};
use super::{DnsConfig, IndexCell, forward, response};
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
struct StubHandler {
    cfg: DnsConfig,
    cell: Arc<IndexCell>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    cache: AnswerCache,
}

#[async_trait::async_trait]
impl RequestHandler for StubHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
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
        let d = &self.metrics.dns;
        d.count_response(u16::from(info.response_code));
        if refused_source {
            d.refused_sources.inc();
        }
        if info.truncation {
            d.truncated.inc();
        }
        info
    }
}

impl StubHandler {
    /// Answers from the cache or the upstreams, within the in-flight bound;
    /// over it, REFUSED (as CoreDNS's `forward` does at `max_concurrent`).
    async fn forward<R: ResponseHandler>(
        &self,
        request: &Request,
        f: Box<Forward>,
        response: R,
    ) -> ResponseInfo {
        if let Some(answer) = self.cache.get(&f.query, Instant::now()) {
            self.metrics.dns.cache_hits.inc();
            return response::relay(request, &f, &answer, response).await;
        }
        let Ok(permit) = self.permits.try_acquire() else {
            self.metrics.dns.forward_overload.inc();
            return response::error(request, ResponseCode::Refused, response).await;
        };
        self.metrics.dns.forwarded.inc();
        let answer = forward::ask_upstreams(&f.query, &self.cfg.upstreams).await;
        drop(permit);
        match answer {
            Some(answer) => {
                self.cache.put(&f.query, &answer, Instant::now());
                response::relay(request, &f, &answer, response).await
            }
            None => {
                self.metrics.dns.forward_failures.inc();
                response::error(request, ResponseCode::ServFail, response).await
            }
        }
    }
}

/// Serves until `shutdown`.
pub(super) async fn serve(
    cfg: DnsConfig,
    cell: Arc<IndexCell>,
    metrics: Arc<Metrics>,
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
    shutdown: CancellationToken,
) {
    let (udp, tcp) = match (UdpSocket::from_std(udp), TcpListener::from_std(tcp)) {
        (Ok(u), Ok(t)) => (u, t),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("DNS sockets: {e}");
            return;
        }
    };
    let handler = Arc::new(StubHandler {
        permits: Arc::new(Semaphore::new(cfg.max_inflight)),
        cache: AnswerCache::new(CACHE_ENTRIES),
        cfg,
        cell,
        metrics,
    });
    let mut server = Server::new(SharedHandler(handler.clone()));
    server.register_socket(udp);
    let stop = server.shutdown_token().clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stop.cancel();
    });
    let tcp_stop = server.shutdown_token().clone();
    tokio::spawn(serve_tcp(tcp, handler, tcp_stop));
    if let Err(e) = server.block_until_done().await {
        tracing::error!("DNS server stopped: {e}");
    }
}

/// The handler shared by hickory-server's UDP side and our TCP front.
struct SharedHandler(Arc<StubHandler>);

#[async_trait::async_trait]
impl RequestHandler for SharedHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        self.0.handle_request::<R, T>(request, response).await
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
        let Some(answer) = response::respond_tcp(handler, msg, src).await else {
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
