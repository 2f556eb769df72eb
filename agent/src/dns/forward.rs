//! Forwarding to the upstream servers: UDP first, TCP when the answer is
//! truncated, each upstream in turn until one answers.
//!
//! ```text
//!  Asking::send (from the loop that received the client's query)
//!    └▶ the upstream's socket (opened afresh every SOCKET_EXPIRE or QUERIES_PER_SOCKET) ─▶ a random unused id ─▶ send
//!  Asking::answer (a task): wait ─▶ TC? ask over TCP │ failed? the next upstream
//!  the socket's reader (a task per socket): answer ─▶ the query waiting with its id and question
//! ```
//!
//! Sockets are kept and shared by the queries to one upstream, as
//! CoreDNS's `forward` keeps its connections (10 s by default, its
//! `expire`): a socket of its own for each query cost a socket, a bind, a
//! connect, an epoll registration and a close per query, most of the
//! kernel time of a forwarded query (BENCHMARKS.md "DNS stub", uncached).
//! Each socket still has a random source port (the kernel's choice) and
//! each query a random id; an answer is taken only from the upstream the
//! socket is connected to, with the id and question of a query waiting.
//! An ICMP error on a socket fails its waiting queries over to the next
//! upstream at once; when none answers the query gets SERVFAIL (at once
//! when there is no upstream). The default upstreams are `--resolv-conf`'s
//! nameservers without the stub itself (`super::resolv_conf_upstreams`);
//! when none is left (a resolv.conf naming only the stub, NodeLocal
//! DNSCache's usual set-up) the agent logs an error at start and `/status`
//! shows `dns.upstream_warning`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::Name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::oneshot;

use super::handler::EDNS_PAYLOAD;

/// How long one upstream gets to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a socket to an upstream takes new queries.
pub const SOCKET_EXPIRE: Duration = Duration::from_secs(10);

/// Queries sent on one socket before it takes no more (a new source port).
pub const QUERIES_PER_SOCKET: u64 = 4096;

/// Queries waiting on one socket at most: their answers fit its receive
/// buffer (the kernel's default, 208 KiB, holds about 270 datagrams),
/// however many arrive before the socket is read.
const WAITING_PER_SOCKET: usize = 64;

/// Where forwarded names go: the upstreams of the longest `--dns-forward`
/// zone that holds the name (stub domains, as the kube-dns ConfigMap's
/// `stubDomains` and CoreDNS's `forward ZONE`), else the default ones.
#[derive(Debug, Default)]
pub struct Routes {
    /// Longest zone first.
    zones: Vec<(Name, Arc<Upstreams>)>,
    default: Arc<Upstreams>,
}

impl Routes {
    /// `default` for every name outside `zones`.
    pub fn new(default: &[SocketAddr], zones: &[(Name, Vec<SocketAddr>)]) -> Self {
        let mut zones: Vec<(Name, Arc<Upstreams>)> = zones
            .iter()
            .map(|(z, servers)| (z.clone(), Arc::new(Upstreams::new(servers))))
            .collect();
        zones.sort_by_key(|(z, _)| std::cmp::Reverse(z.num_labels()));
        Self {
            zones,
            default: Arc::new(Upstreams::new(default)),
        }
    }

    /// The same zones (their sockets kept) with `default` for other names.
    pub fn with_default(&self, default: &[SocketAddr]) -> Self {
        Self {
            zones: self.zones.clone(),
            default: Arc::new(Upstreams::new(default)),
        }
    }

    /// The upstreams `name` goes to.
    pub fn for_name(&self, name: &Name) -> &Arc<Upstreams> {
        self.zones
            .iter()
            .find(|(z, _)| z.zone_of(name))
            .map_or(&self.default, |(_, u)| u)
    }

    /// The default upstreams' addresses.
    pub fn default_servers(&self) -> Vec<SocketAddr> {
        self.default.servers.iter().map(|(s, _)| *s).collect()
    }
}

/// The upstream servers, each with the sockets its queries go out on.
#[derive(Debug, Default)]
pub struct Upstreams {
    servers: Vec<(SocketAddr, Mutex<Vec<Arc<Shared>>>)>,
}

impl Upstreams {
    /// `servers`, asked in this order; no socket opens before a query.
    pub fn new(servers: &[SocketAddr]) -> Self {
        Self {
            servers: servers.iter().map(|s| (*s, Mutex::default())).collect(),
        }
    }

    /// Sends `bytes` (a query, whose id this sets) to the `i`th upstream
    /// without waiting.
    fn send(&self, i: usize, bytes: &mut [u8], queries: &[Query]) -> std::io::Result<Waiting> {
        let (server, open) = &self.servers[i];
        let shared = {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            open.retain(|s| s.takes_queries());
            match open.iter().find(|s| s.has_room()) {
                Some(s) => s.clone(),
                None => {
                    let s = Shared::open(*server)?;
                    tokio::spawn(read_answers(s.clone()));
                    open.push(s.clone());
                    s
                }
            }
        };
        let serial = shared.sent.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut waiting = shared.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let id = loop {
                let id = rand::random::<u16>();
                if !waiting.contains_key(&id) {
                    break id;
                }
            };
            waiting.insert(
                id,
                Waiter {
                    serial,
                    queries: queries.to_vec(),
                    answer: tx,
                },
            );
            id
        };
        let waiting = Waiting {
            shared,
            id,
            serial,
            answer: rx,
        };
        bytes[..2].copy_from_slice(&id.to_be_bytes());
        waiting.shared.sender.send(bytes)?;
        Ok(waiting)
    }
}

/// One socket to an upstream and the queries waiting for its answers.
#[derive(Debug)]
struct Shared {
    sock: UdpSocket,
    /// The same socket, to send on at once: tokio's `try_send` refuses
    /// until the runtime has seen the new socket writable.
    sender: std::net::UdpSocket,
    opened: Instant,
    /// Queries sent on it so far.
    sent: AtomicU64,
    waiting: Mutex<HashMap<u16, Waiter>>,
}

#[derive(Debug)]
struct Waiter {
    serial: u64,
    queries: Vec<Query>,
    answer: oneshot::Sender<Message>,
}

impl Shared {
    fn open(upstream: SocketAddr) -> std::io::Result<Arc<Self>> {
        let local: SocketAddr = if upstream.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let sock = std::net::UdpSocket::bind(local)?;
        sock.connect(upstream)?;
        sock.set_nonblocking(true)?;
        Ok(Arc::new(Self {
            sender: sock.try_clone()?,
            sock: UdpSocket::from_std(sock)?,
            opened: Instant::now(),
            sent: AtomicU64::new(0),
            waiting: Mutex::default(),
        }))
    }

    fn has_room(&self) -> bool {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).len() < WAITING_PER_SOCKET
    }

    fn takes_queries(&self) -> bool {
        self.opened.elapsed() < SOCKET_EXPIRE
            && self.sent.load(Ordering::Relaxed) < QUERIES_PER_SOCKET
    }
}

/// Hands each answer on `shared` to the query it answers, until no query
/// sent on it can still be waiting.
async fn read_answers(shared: Arc<Shared>) {
    let last = shared.opened + SOCKET_EXPIRE + UPSTREAM_TIMEOUT;
    let done = tokio::time::sleep_until(last.into());
    tokio::pin!(done);
    // Received into spare capacity: zeroing 64 KiB for each answer cost
    // more than the rest of its handling.
    let mut buf = Vec::with_capacity(65535);
    loop {
        buf.clear();
        tokio::select! {
            r = shared.sock.recv_buf(&mut buf) => if let Err(e) = r {
                // An ICMP error (nothing listening there, say) is not
                // tied to one query: every query waiting fails over to
                // the next upstream at once.
                tracing::debug!(upstream = ?shared.sock.peer_addr().ok(), "upstream socket: {e}");
                shared.waiting.lock().unwrap_or_else(|e| e.into_inner()).clear();
                continue;
            },
            () = &mut done => return,
        }
        let Ok(m) = Message::from_vec(&buf) else {
            continue;
        };
        let mut waiting = shared.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Entry::Occupied(w) = waiting.entry(m.metadata.id)
            && w.get().queries == m.queries
        {
            let _ = w.remove().answer.send(m);
        }
    }
}

/// A query sent, waiting for its answer; no longer waited for once dropped.
#[derive(Debug)]
struct Waiting {
    shared: Arc<Shared>,
    id: u16,
    serial: u64,
    answer: oneshot::Receiver<Message>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut waiting = self
            .shared
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if waiting
            .get(&self.id)
            .is_some_and(|w| w.serial == self.serial)
        {
            waiting.remove(&self.id);
        }
    }
}

/// One question on its way to the upstreams: sent to the first of them.
#[derive(Debug)]
pub struct Asking {
    queries: Vec<Query>,
    /// The query encoded (its id set per upstream), or why it could not be.
    bytes: Result<Vec<u8>, String>,
    /// The first upstream's answer to come.
    first: Option<std::io::Result<Waiting>>,
}

impl Asking {
    /// Makes the query for `question` and sends it to the first of
    /// `upstreams` without waiting.
    pub fn send(question: &Query, upstreams: &Upstreams) -> Self {
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(question.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        query.set_edns(edns);
        let mut asking = Self {
            bytes: query.to_vec().map_err(|e| e.to_string()),
            queries: query.queries,
            first: None,
        };
        if !upstreams.servers.is_empty() {
            asking.first = Some(asking.send_to(upstreams, 0));
        }
        asking
    }

    fn send_to(&mut self, upstreams: &Upstreams, i: usize) -> std::io::Result<Waiting> {
        let bytes = self
            .bytes
            .as_mut()
            .map_err(|e| std::io::Error::other(format!("encoding the query: {e}")))?;
        upstreams.send(i, bytes, &self.queries)
    }

    /// The first answer from `upstreams` (the ones [`Self::send`] was
    /// given), asking the next when one fails; `None` when none answers.
    pub async fn answer(mut self, upstreams: &Upstreams) -> Option<Message> {
        for (i, (upstream, _)) in upstreams.servers.iter().enumerate() {
            let sent = match self.first.take() {
                Some(sent) => sent,
                None => self.send_to(upstreams, i),
            };
            match self.ask(sent, *upstream).await {
                Ok(answer) => return Some(answer),
                Err(e) => tracing::debug!(%upstream, "upstream failed: {e}"),
            }
        }
        None
    }

    async fn ask(
        &self,
        sent: std::io::Result<Waiting>,
        upstream: SocketAddr,
    ) -> std::io::Result<Message> {
        let mut sent = sent?;
        let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, &mut sent.answer)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
            .map_err(|_| std::io::Error::other("the upstream's socket failed"))?;
        if !answer.metadata.truncation {
            return Ok(answer);
        }
        let mut bytes = self
            .bytes
            .clone()
            .map_err(|e| std::io::Error::other(format!("encoding the query: {e}")))?;
        let id = rand::random::<u16>();
        bytes[..2].copy_from_slice(&id.to_be_bytes());
        tokio::time::timeout(
            UPSTREAM_TIMEOUT,
            ask_tcp(&bytes, id, &self.queries, upstream),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer over TCP"))?
    }
}

async fn ask_tcp(
    bytes: &[u8],
    id: u16,
    queries: &[Query],
    upstream: SocketAddr,
) -> std::io::Result<Message> {
    let mut s = TcpStream::connect(upstream).await?;
    let len = u16::try_from(bytes.len()).map_err(std::io::Error::other)?;
    s.write_all(&len.to_be_bytes()).await?;
    s.write_all(bytes).await?;
    let n = s.read_u16().await?;
    let mut buf = vec![0u8; usize::from(n)];
    s.read_exact(&mut buf).await?;
    Message::from_vec(&buf)
        .ok()
        .filter(|m| m.metadata.id == id && m.queries == queries)
        .ok_or_else(|| std::io::Error::other("mismatched answer over TCP"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::MessageType;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn question(name: &str) -> Query {
        Query::query(Name::from_ascii(name).expect("name"), RecordType::A)
    }

    /// `query` answered with one A record ending in `last`.
    fn answer_to(query: &Message, last: u8) -> Vec<u8> {
        let mut m = query.clone();
        m.metadata.message_type = MessageType::Response;
        let name = query.queries[0].name.clone();
        m.answers.push(Record::from_rdata(
            name,
            60,
            RData::A(A::new(192, 0, 2, last)),
        ));
        m.to_vec().expect("encode")
    }

    /// An upstream on loopback that answers only when told to.
    async fn upstream() -> (UdpSocket, SocketAddr) {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = s.local_addr().expect("addr");
        (s, addr)
    }

    async fn receive(s: &UdpSocket) -> (Message, SocketAddr) {
        let mut buf = vec![0u8; 4096];
        let (n, from) = tokio::time::timeout(Duration::from_secs(10), s.recv_from(&mut buf))
            .await
            .expect("a query within 10 s")
            .expect("recv");
        (Message::from_vec(&buf[..n]).expect("a query"), from)
    }

    fn last_octet(m: &Message) -> u8 {
        match &m.answers[0].data {
            RData::A(a) => a.0.octets()[3],
            other => panic!("not an A record: {other:?}"),
        }
    }

    #[tokio::test]
    async fn queries_share_a_socket_and_each_takes_only_its_own_answer() {
        let (up, addr) = upstream().await;
        let upstreams = Upstreams::new(&[addr]);
        let first = Asking::send(&question("one.example.org."), &upstreams);
        let second = Asking::send(&question("two.example.org."), &upstreams);
        let (q1, from1) = receive(&up).await;
        let (q2, from2) = receive(&up).await;
        assert_eq!(from1, from2, "one socket for both queries");
        assert_ne!(q1.metadata.id, q2.metadata.id, "ids are not shared");
        // What does not answer a waiting query is ignored: an unknown id,
        // and a waiting id with the other query's question.
        let mut stranger = q1.clone();
        stranger.metadata.id = q1.metadata.id.wrapping_add(q2.metadata.id) ^ 0x5a5a;
        up.send_to(&answer_to(&stranger, 66), from1)
            .await
            .expect("send");
        let mut crossed = q2.clone();
        crossed.metadata.id = q1.metadata.id;
        up.send_to(&answer_to(&crossed, 99), from1)
            .await
            .expect("send");
        // Answered out of order.
        up.send_to(&answer_to(&q2, 2), from2).await.expect("send");
        up.send_to(&answer_to(&q1, 1), from1).await.expect("send");
        let (a1, a2) = tokio::join!(first.answer(&upstreams), second.answer(&upstreams));
        let (a1, a2) = (a1.expect("an answer"), a2.expect("an answer"));
        assert_eq!(a1.queries, q1.queries);
        assert_eq!(last_octet(&a1), 1);
        assert_eq!(a2.queries, q2.queries);
        assert_eq!(last_octet(&a2), 2);
    }

    #[tokio::test]
    async fn a_socket_holds_a_bounded_number_of_waiting_queries() {
        let (up, addr) = upstream().await;
        let upstreams = Upstreams::new(&[addr]);
        let asked: Vec<_> = (0..=WAITING_PER_SOCKET)
            .map(|i| Asking::send(&question(&format!("n{i}.example.org.")), &upstreams))
            .collect();
        let mut from = HashMap::<SocketAddr, usize>::new();
        let mut queries = Vec::new();
        for _ in 0..=WAITING_PER_SOCKET {
            let (q, src) = receive(&up).await;
            *from.entry(src).or_default() += 1;
            queries.push((q, src));
        }
        let mut counts: Vec<usize> = from.values().copied().collect();
        counts.sort_unstable();
        assert_eq!(counts, [1, WAITING_PER_SOCKET], "{from:?}");
        for (q, src) in &queries {
            up.send_to(&answer_to(q, 7), src).await.expect("send");
        }
        for (a, (q, _)) in
            futures::future::join_all(asked.into_iter().map(|a| a.answer(&upstreams)))
                .await
                .into_iter()
                .zip(&queries)
        {
            // The upstream received them in the order they were sent.
            assert_eq!(a.expect("an answer").queries, q.queries);
        }
    }

    #[tokio::test]
    async fn an_upstream_with_nothing_listening_fails_over_to_the_next() {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let gone = closed.local_addr().expect("addr");
        drop(closed);
        let (up, addr) = upstream().await;
        let upstreams = Upstreams::new(&[gone, addr]);
        let asking = Asking::send(&question("www.example.org."), &upstreams);
        let answered = tokio::spawn(async move { asking.answer(&upstreams).await });
        let (q, from) = receive(&up).await;
        up.send_to(&answer_to(&q, 5), from).await.expect("send");
        let a = answered
            .await
            .expect("task")
            .expect("an answer from the second");
        assert_eq!(last_octet(&a), 5);
    }
}
