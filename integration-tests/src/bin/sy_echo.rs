//! Backends and clients for the packet tests, run inside pod namespaces
//! with `ip netns exec`.
//!
//! - `sy_echo serve ID PORT`: TCP and UDP on PORT; every connection or
//!   datagram is answered with `ID PEER_IP`.
//! - `sy_echo tcp ADDR COUNT`: COUNT connections, one JSON line with the
//!   replies by backend, the peer addresses the backends saw, and failures
//!   by kind (`refused`, `timeout`, `other`).
//! - `sy_echo udp ADDR COUNT [SPORT]`: COUNT datagrams from one socket (one
//!   flow; from source port SPORT when given, so two runs are the same
//!   conntrack flow), one JSON line with the backend of each reply in order
//!   (`-` for none).
//! - `sy_echo loop ADDR MILLIS`: connects back to back for MILLIS, JSON line
//!   with successes and failures.
//! - `sy_echo http ADDR PATH`: one GET, prints `STATUS BODY`.
//! - `sy_echo dns PORT ADDRESS`: a DNS server on UDP PORT answering every A
//!   question with ADDRESS (a stand-in for CoreDNS behind kube-dns).

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(2);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_else(|| usage());
    match arg(0).as_str() {
        "serve" => serve(arg(1), arg(2).parse().unwrap_or_else(|_| usage())),
        "tcp" => tcp(addr(&arg(1)), arg(2).parse().unwrap_or_else(|_| usage())),
        "udp" => udp(
            addr(&arg(1)),
            arg(2).parse().unwrap_or_else(|_| usage()),
            args.get(3)
                .map_or(0, |p| p.parse().unwrap_or_else(|_| usage())),
        ),
        "loop" => run_loop(addr(&arg(1)), arg(2).parse().unwrap_or_else(|_| usage())),
        "http" => http(addr(&arg(1)), &arg(2)),
        "dns" => dns(
            arg(1).parse().unwrap_or_else(|_| usage()),
            arg(2).parse().unwrap_or_else(|_| usage()),
        ),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: sy_echo serve ID PORT | tcp ADDR N | udp ADDR N [SPORT] | loop ADDR MS | http ADDR PATH | dns PORT ADDRESS"
    );
    std::process::exit(2)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| usage())
}

fn serve(id: String, port: u16) {
    // Dual-stack sockets: IPv4 peers show as IPv4 addresses.
    let udp = UdpSocket::bind(("::", port)).expect("binding UDP");
    let uid = id.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(
                format!("{uid} {}", peer.ip().to_canonical()).as_bytes(),
                peer,
            );
        }
    });
    let tcp = TcpListener::bind(("::", port)).expect("binding TCP");
    for conn in tcp.incoming().flatten() {
        let peer = conn
            .peer_addr()
            .map(|p| p.ip().to_canonical().to_string())
            .unwrap_or_default();
        let mut conn = conn;
        let _ = writeln!(conn, "{id} {peer}");
    }
}

enum Outcome {
    Reply(String, String),
    Refused,
    Timeout,
    Other(String),
}

fn connect_once(to: SocketAddr) -> Outcome {
    match TcpStream::connect_timeout(&to, TIMEOUT) {
        Ok(mut s) => {
            let _ = s.set_read_timeout(Some(TIMEOUT));
            let mut line = String::new();
            match s.read_to_string(&mut line) {
                Ok(_) => {
                    let mut parts = line.split_whitespace();
                    let id = parts.next().unwrap_or_default().to_owned();
                    let peer = parts.next().unwrap_or_default().to_owned();
                    if id.is_empty() {
                        Outcome::Other("empty reply".into())
                    } else {
                        Outcome::Reply(id, peer)
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    Outcome::Timeout
                }
                Err(e) => Outcome::Other(e.to_string()),
            }
        }
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Outcome::Refused,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Outcome::Timeout
        }
        Err(e) => Outcome::Other(e.to_string()),
    }
}

#[derive(Default)]
struct Tally {
    replies: BTreeMap<String, u64>,
    peers: BTreeMap<String, u64>,
    refused: u64,
    timeout: u64,
    other: Vec<String>,
    first_failure_ms: Option<u128>,
}

impl Tally {
    fn add(&mut self, o: Outcome, started: Instant) {
        match o {
            Outcome::Reply(id, peer) => {
                *self.replies.entry(id).or_default() += 1;
                *self.peers.entry(peer).or_default() += 1;
                return;
            }
            Outcome::Refused => self.refused += 1,
            Outcome::Timeout => self.timeout += 1,
            Outcome::Other(e) => self.other.push(e),
        }
        self.first_failure_ms
            .get_or_insert(started.elapsed().as_millis());
    }

    fn print(&self, elapsed: Duration) {
        let json = serde_json::json!({
            "replies": self.replies,
            "peers": self.peers,
            "refused": self.refused,
            "timeout": self.timeout,
            "other": self.other,
            "elapsed_ms": elapsed.as_millis() as u64,
        });
        println!("{json}");
    }
}

fn tcp(to: SocketAddr, count: u32) {
    let t = Instant::now();
    let mut tally = Tally::default();
    for _ in 0..count {
        tally.add(connect_once(to), t);
    }
    tally.print(t.elapsed());
}

fn run_loop(to: SocketAddr, millis: u64) {
    let t = Instant::now();
    let mut tally = Tally::default();
    while t.elapsed() < Duration::from_millis(millis) {
        tally.add(connect_once(to), t);
        std::thread::sleep(Duration::from_millis(5));
    }
    tally.print(t.elapsed());
}

fn udp(to: SocketAddr, count: u32, source_port: u16) {
    let any: std::net::IpAddr = if to.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let sock = UdpSocket::bind((any, source_port)).expect("binding UDP");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1500];
    for _ in 0..count {
        let _ = sock.send_to(b"ping", to);
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.push(reply.split_whitespace().next().unwrap_or("-").to_owned());
            }
            Err(_) => seen.push("-".into()),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("{}", serde_json::json!({ "replies": seen }));
}

fn http(to: SocketAddr, path: &str) {
    let mut s = match TcpStream::connect_timeout(&to, TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            println!("000 {e}");
            return;
        }
    };
    let _ = s.set_read_timeout(Some(TIMEOUT));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    );
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp.split_whitespace().nth(1).unwrap_or("000");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
    println!("{status} {body}");
}

fn dns(port: u16, address: std::net::Ipv4Addr) {
    let sock = UdpSocket::bind(("::", port)).expect("binding UDP");
    let mut buf = [0u8; 4096];
    while let Ok((n, peer)) = sock.recv_from(&mut buf) {
        if let Some(reply) = switchyard_integration_tests::dns::fake_answer(&buf[..n], address) {
            let _ = sock.send_to(&reply, peer);
        }
    }
}
