//! Our UDP loop around hickory-server's request handling: hickory-server
//! parses each datagram (`Request`), our `RequestHandler` decides, and
//! hickory-server's `MessageResponse` encodes, as its own `Server` does;
//! what differs is how datagrams are received and answered.
//!
//! ```text
//!  readable ─▶ recv (up to BATCH in a row) ─▶ allowed source? ─▶ encoded answer of this index? ─▶ send
//!                                                  └▶ plain A/AAAA question (direct.rs) ─▶ keep ─▶ send
//!                                                  └▶ Request::from_bytes ─▶ decide ─▶ answer ─▶ encode ─▶ keep ─▶ send
//!                                                                                 └▶ forward: cached? encode ─▶ send
//!                                                                                             else send upstream; a task: answer ─▶ send
//! ```
//!
//! Why not hickory-server's `Server` for UDP (measured, BENCHMARKS.md "DNS
//! stub"): it receives into a zeroed 4 KiB buffer and copies it, spawns a
//! task per datagram, and passes each answer through a channel to the
//! socket's task, which then sends it; that cost more CPU per query than
//! unbound. Here an answer from the index is sent from the loop that
//! received its query, from one reused buffer, and the answer's encoding
//! is kept ([`EncodedAnswers`]) for the next identical query. A query
//! for the upstreams is sent to them from here too; only the wait for
//! their answer gets a task of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::encoded::EncodedAnswers;
use super::server::{Reply, StubHandler};

/// Datagrams answered in a row before the loop lets other tasks (TCP,
/// forwarded queries) run.
const BATCH: usize = 64;

/// Encoded answers kept: a query and its answer are about 130 bytes for a
/// Service name, the map's entries at most 128 bytes each (room for up to
/// twice as many) and its index 9 bytes a slot, so this is about 6 MiB at
/// most.
pub const ENCODED_ENTRIES: usize = 16_384;

/// Bytes of queries and answers kept, whatever their size.
pub const ENCODED_BYTES: usize = 4 << 20;

/// The size of a received datagram we parse: hickory-server's own (4,096).
const RECEIVE_BUFFER: usize = 4096;

/// Answers datagrams on `socket` until `stop`.
pub(super) async fn serve(socket: UdpSocket, handler: Arc<StubHandler>, stop: CancellationToken) {
    let socket = Arc::new(socket);
    let mut encoded = EncodedAnswers::new(ENCODED_ENTRIES, ENCODED_BYTES);
    let mut buf = vec![0u8; RECEIVE_BUFFER];
    let mut out = Vec::with_capacity(512);
    let cancelled = stop.cancelled();
    tokio::pin!(cancelled);
    loop {
        tokio::select! {
            r = socket.readable() => if let Err(e) = r {
                tracing::error!("DNS UDP socket: {e}");
                return;
            },
            () = &mut cancelled => return,
        }
        for _ in 0..BATCH {
            let (n, src) = match socket.try_recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // As hickory-server: an error on one datagram (an ICMP
                    // error reported late, say) does not stop the socket.
                    tracing::debug!("DNS UDP receive: {e}");
                    continue;
                }
            };
            if !answerable(src) {
                continue;
            }
            match handler.reply_now(&mut encoded, &buf[..n], src, Instant::now, &mut out) {
                Reply::Now => send(&socket, &out, src).await,
                Reply::Later(later) => {
                    let (handler, socket) = (handler.clone(), socket.clone());
                    let received = later.asked();
                    tokio::spawn(async move {
                        if let Some(bytes) = handler.reply_later(later).await {
                            send(&socket, &bytes, src).await;
                            handler
                                .metrics()
                                .dns
                                .forward_seconds
                                .observe(received.elapsed().as_secs_f64());
                        }
                    });
                }
                Reply::Nothing => {}
            }
        }
    }
}

async fn send(socket: &UdpSocket, bytes: &[u8], dst: SocketAddr) {
    let sent = match socket.try_send_to(bytes, dst) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => socket.send_to(bytes, dst).await,
        r => r,
    };
    if let Err(e) = sent {
        tracing::debug!(%dst, "sending a DNS answer: {e}");
    }
}

/// Whether an answer can go back to `src` (hickory-server's own check:
/// not port 0, not an unspecified or broadcast address).
fn answerable(src: SocketAddr) -> bool {
    src.port() != 0
        && match src.ip() {
            std::net::IpAddr::V4(v4) => !v4.is_unspecified() && !v4.is_broadcast(),
            std::net::IpAddr::V6(v6) => !v6.is_unspecified(),
        }
}
