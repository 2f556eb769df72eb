//! The gRPC listener: accepts TCP, bounds connections, runs the TLS
//! handshake with the certificate in force, and hands each connection to
//! tonic.
//!
//! ```text
//!  TcpListener ─accept─▶ over --max-connections or --max-connections-per-address? close (counted)
//!              ─▶ (TLS) handshake task, 10 s, config in force ─┬─▶ failed: logged + counted by cause
//!                                                              └─▶ mpsc ─▶ tonic serve_with_incoming
//! ```
//!
//! A connection holds its two permits (total, per address) until tonic drops
//! it. Each connection can be closed from a stream it carries
//! ([`Closers`]): a stream whose update does not drain (the client does not
//! read) ends it, because HTTP/2 gives a server no other way to drop what a
//! stalled stream holds. The handshake is ours rather than tonic's so that each connection is
//! served with the certificate files as they are now (`switchyard_proto::tls`
//! reloads them) and so that a refused handshake says why, on our side, in
//! the log and in `switchyard_control_plane_tls_handshake_failures_total`.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use switchyard_proto::tls::{ReloadingServer, find_rustls_error};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::metrics::Metrics;

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once.
    pub total: usize,
    /// Connections open at once from one source address.
    pub per_address: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            total: 10_000,
            per_address: 64,
        }
    }
}

/// A connection with the permits it holds.
pub struct Bounded<IO> {
    inner: IO,
    _permit: ConnectionPermit,
    /// Ready once the connection is to be closed: reads and writes then fail.
    closing: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    _registered: Registered,
}

impl<IO: std::fmt::Debug> std::fmt::Debug for Bounded<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bounded")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<IO> Bounded<IO> {
    fn new(inner: IO, permit: ConnectionPermit, peer: SocketAddr, closers: &Closers) -> Self {
        let token = CancellationToken::new();
        closers.lock().insert(peer, token.clone());
        Self {
            inner,
            _permit: permit,
            closing: Box::pin(token.cancelled_owned()),
            _registered: Registered {
                peer,
                closers: closers.clone(),
            },
        }
    }

    /// Whether the connection was closed by [`Closers::close`] (and, if
    /// not, wake this task when it is).
    fn closed(&mut self, cx: &mut Context<'_>) -> bool {
        self.closing.as_mut().poll(cx).is_ready()
    }
}

fn closed_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "closed by the control plane: a stream on it did not drain",
    )
}

/// The open connections by peer address, each with the token that closes it.
#[derive(Debug, Clone, Default)]
pub struct Closers(Arc<Mutex<HashMap<SocketAddr, CancellationToken>>>);

impl Closers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, CancellationToken>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Closes the connection from `peer`, if it is open; returns whether it was.
    pub fn close(&self, peer: SocketAddr) -> bool {
        self.lock()
            .get(&peer)
            .map(CancellationToken::cancel)
            .is_some()
    }
}

/// Takes a connection out of [`Closers`] when it goes.
struct Registered {
    peer: SocketAddr,
    closers: Closers,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.closers.lock().remove(&self.peer);
    }
}

#[derive(Debug)]
struct ConnectionPermit {
    address: IpAddr,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// `connections_open`, decremented on drop.
    open: prometheus_client::metrics::gauge::Gauge,
    _total: OwnedSemaphorePermit,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.open.dec();
        let mut counts = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Bounded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closed(cx) {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Bounded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.closed(cx) {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.closed(cx) {
            return Poll::Ready(Err(closed_error()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Bounded<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Admits connections within the limits.
#[derive(Debug, Clone)]
struct Gate {
    limits: ConnectionLimits,
    total: Arc<Semaphore>,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    metrics: Arc<Metrics>,
}

impl Gate {
    fn new(limits: ConnectionLimits, metrics: Arc<Metrics>) -> Self {
        Self {
            limits,
            total: Arc::new(Semaphore::new(limits.total)),
            per_address: Arc::default(),
            metrics,
        }
    }

    fn admit(&self, peer: SocketAddr) -> Option<ConnectionPermit> {
        let Ok(total) = self.total.clone().try_acquire_owned() else {
            self.metrics.refused_connection("total");
            tracing::debug!(%peer, "connection closed: --max-connections reached");
            return None;
        };
        let mut counts = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
        let n = counts.entry(peer.ip()).or_insert(0);
        if *n >= self.limits.per_address {
            drop(counts);
            self.metrics.refused_connection("per_address");
            tracing::debug!(%peer, "connection closed: --max-connections-per-address reached");
            return None;
        }
        *n += 1;
        self.metrics.connections_open.inc();
        Some(ConnectionPermit {
            address: peer.ip(),
            per_address: self.per_address.clone(),
            open: self.metrics.connections_open.clone(),
            _total: total,
        })
    }
}

/// The connections tonic serves, and the accept loop that feeds them: the
/// caller runs the loop in its own task set, so the listening socket is
/// closed by the time that set has ended (a restart can bind the port
/// again at once).
pub type Incoming<IO> = (
    ReceiverStream<Result<IO, io::Error>>,
    Pin<Box<dyn Future<Output = ()> + Send>>,
);

/// Accepts until `shutdown`; `on_accept` turns each admitted connection
/// into the stream tonic serves (or nothing).
fn accept_loop<IO, F, Fut>(
    listener: TcpListener,
    gate: Gate,
    shutdown: CancellationToken,
    on_accept: F,
) -> Incoming<IO>
where
    IO: Send + 'static,
    F: Fn(TcpStream, SocketAddr, ConnectionPermit, mpsc::Sender<Result<IO, io::Error>>) -> Fut
        + Send
        + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let accepting = Box::pin(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.cancelled() => return,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment
                    // instead of spinning on the error.
                    tracing::warn!("accepting a gRPC connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(permit) = gate.admit(peer) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(on_accept(tcp, peer, permit, tx.clone()));
        }
    });
    (ReceiverStream::new(rx), accepting)
}

/// Plain-text connections.
pub fn plain(
    listener: TcpListener,
    limits: ConnectionLimits,
    closers: Closers,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Incoming<Bounded<TcpStream>> {
    accept_loop(
        listener,
        Gate::new(limits, metrics),
        shutdown,
        move |tcp, peer, permit, tx| {
            let connection = Bounded::new(tcp, permit, peer, &closers);
            async move {
                let _ = tx.send(Ok(connection)).await;
            }
        },
    )
}

/// A TLS connection as tonic sees it (its peer certificates included).
pub type TlsConnection = Bounded<tokio_rustls::server::TlsStream<TcpStream>>;

/// TLS connections, each with the server configuration in force when it
/// was accepted.
pub fn tls(
    listener: TcpListener,
    limits: ConnectionLimits,
    config: Arc<ReloadingServer>,
    closers: Closers,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Incoming<TlsConnection> {
    let gate = Gate::new(limits, metrics.clone());
    accept_loop(listener, gate, shutdown, move |tcp, peer, permit, tx| {
        let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
        let metrics = metrics.clone();
        let closers = closers.clone();
        async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = tx
                        .send(Ok(Bounded::new(stream, permit, peer, &closers)))
                        .await;
                }
                Ok(Err(e)) => {
                    let (reason, what) = handshake_failure(&e);
                    metrics.failed_handshake(reason);
                    tracing::warn!(%peer, reason, "refused a TLS handshake: {what}");
                }
                Err(_) => {
                    metrics.failed_handshake("timeout");
                    tracing::warn!(%peer, reason = "timeout", "refused a TLS handshake: not completed within 10 s");
                }
            }
        }
    })
}

/// Why a handshake failed: a metric label and a sentence for the log.
fn handshake_failure(e: &io::Error) -> (&'static str, String) {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let Some(r) = find_rustls_error(e) else {
        return ("other", e.to_string());
    };
    match r {
        E::InvalidMessage(_) => (
            "clear_text",
            "the client did not speak TLS (an agent with an http:// URL?)".into(),
        ),
        E::NoCertificatesPresented => (
            "no_client_certificate",
            "the client sent no certificate; mutual TLS requires the agent's --tls-cert and --tls-key"
                .into(),
        ),
        E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => (
            "unknown_ca",
            "the client certificate is not signed by a CA in --tls-client-ca".into(),
        ),
        E::InvalidCertificate(other) => (
            "bad_client_certificate",
            format!("the client certificate was refused: {other:?}"),
        ),
        E::AlertReceived(
            alert @ (A::UnknownCA | A::BadCertificate | A::CertificateUnknown | A::DecryptError),
        ) => (
            "client_refused_server_certificate",
            format!(
                "the client refused our certificate ({alert:?}): its --tls-ca must hold our CA, and \
                 the name it connects by (or its --tls-server-name) must be in our certificate"
            ),
        ),
        other => ("other", other.to_string()),
    }
}

/// Says loudly what serving gRPC without TLS exposes, unless the address
/// is loopback.
pub fn warn_if_clear_text(addr: SocketAddr) {
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "serving gRPC WITHOUT TLS on a non-loopback address: anyone who can reach it reads every \
             Service and endpoint of every cluster served, and can claim any node name. Give \
             --tls-cert and --tls-key (and --tls-client-ca for mutual TLS)"
        );
    }
}
