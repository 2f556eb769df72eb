//! DNS test tools: `dig` against a running stub, and a fake upstream
//! server that answers from raw bytes (so tests need no DNS library).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// What `dig` printed, parsed.
#[derive(Debug, Clone, Default)]
pub struct Dig {
    /// `NOERROR`, `NXDOMAIN`, ...
    pub status: String,
    /// Header flags (`qr aa rd ra tc`).
    pub flags: Vec<String>,
    /// Answer lines: `name ttl class type data`.
    pub answers: Vec<String>,
    /// Authority lines.
    pub authority: Vec<String>,
    /// Additional lines.
    pub additional: Vec<String>,
    /// Everything dig printed.
    pub raw: String,
}

impl Dig {
    /// The data of every answer record (the fields after the type).
    pub fn data(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .answers
            .iter()
            .map(|l| l.split_whitespace().skip(4).collect::<Vec<_>>().join(" "))
            .collect();
        v.sort();
        v
    }

    /// The types of the answer records, in order.
    pub fn types(&self) -> Vec<String> {
        self.answers
            .iter()
            .filter_map(|l| l.split_whitespace().nth(3).map(String::from))
            .collect()
    }

    /// Whether the header has `flag`.
    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// Runs `dig @server -p port args...` and parses its output.
pub async fn dig(server: SocketAddr, args: &[&str]) -> Dig {
    let out = tokio::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args([
            "+tries=1",
            "+time=5",
            "+nocmd",
            "+noall",
            "+comments",
            "+answer",
            "+authority",
            "+additional",
        ])
        .args(args)
        .output()
        .await
        .expect("dig runs (apt-get install dnsutils)");
    parse_dig(&String::from_utf8_lossy(&out.stdout))
}

fn parse_dig(text: &str) -> Dig {
    let mut d = Dig {
        raw: text.to_owned(),
        ..Dig::default()
    };
    let mut section = "";
    for line in text.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            d.status = rest.split(',').next().unwrap_or_default().to_owned();
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            d.flags = rest
                .split(';')
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect();
        } else if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; AUTHORITY SECTION") {
            section = "authority";
        } else if line.starts_with(";; ADDITIONAL SECTION") {
            section = "additional";
        } else if line.starts_with(';') || line.trim().is_empty() {
            if line.trim().is_empty() {
                section = "";
            }
        } else {
            match section {
                "answer" => d.answers.push(line.to_owned()),
                "authority" => d.authority.push(line.to_owned()),
                "additional" => d.additional.push(line.to_owned()),
                _ => {}
            }
        }
    }
    d
}

/// A fake upstream: answers every A query with `address` (TTL 60), every
/// other type with NOERROR and no records. Counts the queries it saw.
#[derive(Debug)]
pub struct FakeUpstream {
    /// Where it listens (UDP).
    pub addr: SocketAddr,
    /// Queries received.
    pub queries: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl FakeUpstream {
    /// Starts on `127.0.0.1:0`.
    pub async fn start(address: Ipv4Addr) -> Self {
        Self::start_with_ttl(address, 60).await
    }

    /// Stops answering: its socket closes.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Starts on `127.0.0.1:0`, its A records with `ttl` seconds.
    pub async fn start_with_ttl(address: Ipv4Addr, ttl: u32) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = sock.local_addr().expect("addr");
        let queries = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (q, s) = (queries.clone(), stop.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, src) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = sock.recv_from(&mut buf) => match r { Ok(v) => v, Err(_) => continue },
                };
                q.fetch_add(1, Ordering::Relaxed);
                if let Some(reply) = fake_answer_ttl(&buf[..n], address, ttl) {
                    let _ = sock.send_to(&reply, src).await;
                }
            }
        });
        Self {
            addr,
            queries,
            stop,
        }
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The answer to one query, built by hand: header, the question as asked,
/// and one A record pointing back at the question name.
pub fn fake_answer(q: &[u8], address: Ipv4Addr) -> Option<Vec<u8>> {
    fake_answer_ttl(q, address, 60)
}

/// [`fake_answer`] with `ttl` seconds on its record.
pub fn fake_answer_ttl(q: &[u8], address: Ipv4Addr, ttl: u32) -> Option<Vec<u8>> {
    if q.len() < 12 {
        return None;
    }
    let mut i = 12;
    while *q.get(i)? != 0 {
        i += usize::from(q[i]) + 1;
    }
    let qtype = u16::from_be_bytes([*q.get(i + 1)?, *q.get(i + 2)?]);
    let question_end = i + 5;
    if q.len() < question_end {
        return None;
    }
    let is_a = qtype == 1;
    let mut out = Vec::with_capacity(question_end + 16);
    out.extend_from_slice(&q[..2]);
    out.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    out.extend_from_slice(&q[12..question_end]);
    if is_a {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&[0, 4]);
        out.extend_from_slice(&address.octets());
    }
    Some(out)
}
