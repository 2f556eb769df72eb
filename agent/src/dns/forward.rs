//! Forwarding to the upstream servers: UDP first, TCP when the answer is
//! truncated, each upstream in turn until one answers.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, Query};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::handler::EDNS_PAYLOAD;

/// How long one upstream gets to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the upstreams in turn; `None` when none answers.
pub async fn ask_upstreams(question: &Query, upstreams: &[SocketAddr]) -> Option<Message> {
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(question.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    query.set_edns(edns);
    for upstream in upstreams {
        match ask(&query, *upstream).await {
            Ok(answer) => return Some(answer),
            Err(e) => tracing::debug!(%upstream, "upstream failed: {e}"),
        }
    }
    None
}

async fn ask(query: &Message, upstream: SocketAddr) -> std::io::Result<Message> {
    let bytes = query.to_vec().map_err(std::io::Error::other)?;
    let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, ask_udp(&bytes, query, upstream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    tokio::time::timeout(UPSTREAM_TIMEOUT, ask_tcp(&bytes, query, upstream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer over TCP"))?
}

async fn ask_udp(bytes: &[u8], query: &Message, upstream: SocketAddr) -> std::io::Result<Message> {
    let local: SocketAddr = if upstream.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    // A fresh socket per query: a random source port as well as a random id.
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(bytes).await?;
    // Received into spare capacity: zeroing 64 KiB for each forwarded
    // query cost more than the rest of its handling.
    let mut buf = Vec::with_capacity(65535);
    loop {
        buf.clear();
        sock.recv_buf(&mut buf).await?;
        if let Some(m) = matching(&buf, query) {
            return Ok(m);
        }
    }
}

async fn ask_tcp(bytes: &[u8], query: &Message, upstream: SocketAddr) -> std::io::Result<Message> {
    let mut s = TcpStream::connect(upstream).await?;
    let len = u16::try_from(bytes.len()).map_err(std::io::Error::other)?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(bytes).await?;
    let n = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await?;
    matching(&buf, query).ok_or_else(|| std::io::Error::other("mismatched answer over TCP"))
}

/// The answer in `bytes` if it answers `query` (same id and question).
fn matching(bytes: &[u8], query: &Message) -> Option<Message> {
    let m = Message::from_vec(bytes).ok()?;
    (m.metadata.id == query.metadata.id && m.queries == query.queries).then_some(m)
}
