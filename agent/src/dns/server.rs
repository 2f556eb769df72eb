//! Sockets: the UDP loop, TCP connections, and bounded forwarding.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hickory_proto::op::ResponseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::cache::AnswerCache;
use super::handler::{self, Forward, Outcome, Reply, Transport};
use super::{DnsConfig, IndexCell, forward};
use crate::status::Metrics;

/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Upstream answers kept (about 1 KiB each).
const CACHE_ENTRIES: usize = 10_000;
/// Most TCP connections at once; more are closed at once.
const TCP_CONNECTIONS: usize = 256;

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

struct Ctx {
    cfg: DnsConfig,
    cell: Arc<IndexCell>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    cache: AnswerCache,
}

impl Ctx {
    fn count(&self, r: &Reply) {
        let d = &self.metrics.dns;
        d.count_response(u16::from(r.rcode));
        if r.refused_source {
            d.refused_sources.inc();
        }
        if r.truncated {
            d.truncated.inc();
        }
    }

    /// Forwards within the in-flight bound; over it, REFUSED (as CoreDNS's
    /// `forward` does at `max_concurrent`).
    /// A cached upstream answer, if there is one.
    fn cached(&self, f: &Forward) -> Option<Reply> {
        let r = self.cache.get(f, Instant::now())?;
        self.metrics.dns.cache_hits.inc();
        Some(r)
    }

    async fn forward(&self, f: Box<Forward>) -> Reply {
        if let Some(r) = self.cached(&f) {
            return r;
        }
        let Ok(_permit) = self.permits.clone().try_acquire_owned() else {
            self.metrics.dns.forward_overload.inc();
            return handler::finish(
                handler::response(&f.request, ResponseCode::Refused),
                f.limit,
            );
        };
        self.metrics.dns.forwarded.inc();
        match forward::ask_upstreams(&f, &self.cfg.upstreams).await {
            Some(answer) => {
                self.cache.put(&f, &answer, Instant::now());
                forward::relay(&f, answer)
            }
            None => {
                self.metrics.dns.forward_failures.inc();
                forward::servfail(&f)
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
        (Ok(u), Ok(t)) => (Arc::new(u), t),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("DNS sockets: {e}");
            return;
        }
    };
    let ctx = Arc::new(Ctx {
        permits: Arc::new(Semaphore::new(cfg.max_inflight)),
        cache: AnswerCache::new(CACHE_ENTRIES),
        cfg,
        cell,
        metrics,
    });
    let tcp_task = tokio::spawn(serve_tcp(ctx.clone(), tcp, shutdown.clone()));
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, src) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = udp.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!("DNS UDP receive: {e}");
                    continue;
                }
            },
        };
        let index = ctx.cell.current();
        match handler::handle(&index, &ctx.cfg.acl, &buf[..n], src.ip(), Transport::Udp) {
            Outcome::Drop => {
                ctx.metrics.dns.dropped.inc();
            }
            Outcome::Reply(r) => {
                ctx.count(&r);
                let _ = udp.send_to(&r.bytes, src).await;
            }
            Outcome::Forward(f) => {
                if let Some(r) = ctx.cached(&f) {
                    ctx.count(&r);
                    let _ = udp.send_to(&r.bytes, src).await;
                    continue;
                }
                let (ctx, udp) = (ctx.clone(), udp.clone());
                tokio::spawn(async move {
                    let r = ctx.forward(f).await;
                    ctx.count(&r);
                    let _ = udp.send_to(&r.bytes, src).await;
                });
            }
        }
    }
    let _ = tcp_task.await;
}

async fn serve_tcp(ctx: Arc<Ctx>, listener: TcpListener, shutdown: CancellationToken) {
    let connections = Arc::new(Semaphore::new(TCP_CONNECTIONS));
    loop {
        let (stream, src) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!("DNS TCP accept: {e}");
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue;
        };
        let (ctx, stop) = (ctx.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = serve_connection(&ctx, stream, src) => {}
            }
            drop(permit);
        });
    }
}

/// Answers length-prefixed queries in order until the client goes quiet.
async fn serve_connection(ctx: &Ctx, mut stream: TcpStream, src: SocketAddr) {
    let mut buf = Vec::new();
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(n)) => usize::from(n),
            _ => return,
        };
        buf.resize(len, 0);
        if !matches!(
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut buf)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let index = ctx.cell.current();
        let reply = match handler::handle(&index, &ctx.cfg.acl, &buf, src.ip(), Transport::Tcp) {
            Outcome::Drop => {
                ctx.metrics.dns.dropped.inc();
                return;
            }
            Outcome::Reply(r) => r,
            Outcome::Forward(f) => ctx.forward(f).await,
        };
        ctx.count(&reply);
        let Ok(n) = u16::try_from(reply.bytes.len()) else {
            return;
        };
        let mut out = Vec::with_capacity(reply.bytes.len() + 2);
        out.extend_from_slice(&n.to_be_bytes());
        out.extend_from_slice(&reply.bytes);
        if stream.write_all(&out).await.is_err() {
            return;
        }
    }
}
