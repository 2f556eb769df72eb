//! The hickory-server side: one `Server` with the UDP socket and the TCP
//! listener, and the `RequestHandler` that runs the core on each request
//! and forwards within a bound.
//!
//! ```text
//!  Server (UDP: a task per datagram; TCP: requests of a connection in turn)
//!    └▶ StubHandler::handle_request ─▶ IndexCell::current ─▶ decide
//!         ├▶ Answer  ─▶ response::answer ─▶ ResponseHandler
//!         ├▶ Forward ─▶ cache? ─▶ upstreams (at most --dns-max-inflight, else REFUSED) ─▶ response::relay
//!         └▶ Drop
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hickory_proto::op::ResponseCode;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::cache::AnswerCache;
use super::handler::{Decision, Forward, decide};
use super::{DnsConfig, IndexCell, forward, response};
use crate::status::Metrics;

/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Answers queued for sending per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
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
    let mut server = Server::new(StubHandler {
        permits: Arc::new(Semaphore::new(cfg.max_inflight)),
        cache: AnswerCache::new(CACHE_ENTRIES),
        cfg,
        cell,
        metrics,
    });
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE, TCP_RESPONSE_BUFFER);
    let stop = server.shutdown_token().clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stop.cancel();
    });
    if let Err(e) = server.block_until_done().await {
        tracing::error!("DNS server stopped: {e}");
    }
}
