//! Agent processes restarted under a steady DNS load: what the handoff
//! test and `bench_restart` share.
//!
//! ```text
//!  QueryLoop: one UDP socket, a query every 1/RATE s (ids 0..65535), answers matched by id;
//!             a query unanswered within the loss timeout is lost; the longest time
//!             between two answers is the gap
//!  AgentProcess: `sy_agent` with a piped log, awaited line by line (no sleeps)
//! ```

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// An agent process whose log is read as it runs.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    log: BufReader<ChildStdout>,
    /// Every log line read so far.
    pub seen: Vec<String>,
}

impl AgentProcess {
    /// Starts `program ARGS` with `RUST_LOG=info`, its log on a pipe.
    pub fn start(program: &std::path::Path, args: &[String]) -> Self {
        let mut child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let log = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            log,
            seen: Vec::new(),
        }
    }

    /// Reads the log until a line containing `needle` (panics when the
    /// process ends first or `within` passes).
    pub fn wait_for(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        let mut line = String::new();
        loop {
            line.clear();
            assert!(
                Instant::now() < deadline,
                "no {needle:?} within {within:?}; log:\n{}",
                self.seen.join("\n")
            );
            match self.log.read_line(&mut line) {
                Ok(0) | Err(_) => panic!(
                    "the agent ended before {needle:?}; log:\n{}",
                    self.seen.join("\n")
                ),
                Ok(_) => {
                    let done = line.contains(needle);
                    self.seen.push(line.trim_end().to_owned());
                    if done {
                        return;
                    }
                }
            }
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit; its exit status.
    pub fn wait(mut self) -> std::process::ExitStatus {
        // Drain the log, so the process never blocks writing it.
        let mut line = String::new();
        while matches!(self.log.read_line(&mut line), Ok(n) if n > 0) {
            line.clear();
        }
        self.child.wait().expect("wait")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a [`QueryLoop`] saw.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Queries sent.
    pub sent: u64,
    /// Queries answered.
    pub answered: u64,
    /// Queries with no answer within the loss timeout.
    pub lost: u64,
    /// The longest time with no answer while queries were outstanding.
    pub longest_gap: Duration,
}

/// Queries at a fixed rate on one UDP socket, until stopped.
#[derive(Debug)]
pub struct QueryLoop {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Tally>>,
}

/// An A query for `name` with id `id`.
pub fn a_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).expect("a label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

impl QueryLoop {
    /// Starts asking `server` for `name`, `rate` queries a second; a query
    /// is lost when unanswered after `loss_after`.
    pub fn start(server: SocketAddr, name: &str, rate: u32, loss_after: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, name) = (stop.clone(), name.to_owned());
        let thread = std::thread::spawn(move || {
            let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
            sock.set_read_timeout(Some(Duration::from_millis(1)))
                .expect("timeout");
            let every = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
            let mut sent_at: Vec<Option<Instant>> = vec![None; 65536];
            let mut order: std::collections::VecDeque<(u16, Instant)> =
                std::collections::VecDeque::new();
            let mut tally = Tally::default();
            let mut next = Instant::now();
            let mut id: u16 = 0;
            let mut last_answer = Instant::now();
            let mut outstanding = 0u64;
            let mut buf = [0u8; 1500];
            let mut stopping: Option<Instant> = None;
            loop {
                let now = Instant::now();
                if stopping.is_none() && flag.load(Ordering::Relaxed) {
                    stopping = Some(now);
                }
                if stopping.is_none() && now >= next {
                    if sent_at[usize::from(id)].take().is_some() {
                        tally.lost += 1;
                        outstanding -= 1;
                    }
                    if sock.send_to(&a_query(id, &name), server).is_ok() {
                        sent_at[usize::from(id)] = Some(now);
                        order.push_back((id, now));
                        tally.sent += 1;
                        if outstanding == 0 {
                            last_answer = now;
                        }
                        outstanding += 1;
                    }
                    id = id.wrapping_add(1);
                    next += every;
                }
                if let Ok((n, _)) = sock.recv_from(&mut buf)
                    && n >= 2
                {
                    let got = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
                    if sent_at[got].take().is_some() {
                        tally.answered += 1;
                        outstanding -= 1;
                        let now = Instant::now();
                        tally.longest_gap = tally.longest_gap.max(now - last_answer);
                        last_answer = now;
                    }
                }
                // Expire what waited too long, oldest first.
                let now = Instant::now();
                while let Some(&(old, at)) = order.front() {
                    if now - at <= loss_after {
                        break;
                    }
                    order.pop_front();
                    if sent_at[usize::from(old)] == Some(at) {
                        sent_at[usize::from(old)] = None;
                        tally.lost += 1;
                        outstanding -= 1;
                    }
                }
                if let Some(s) = stopping
                    && (outstanding == 0 || now - s > loss_after)
                {
                    tally.lost += outstanding;
                    return tally;
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sending, waits for the answers still due; what it saw.
    pub fn finish(mut self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("query loop")
    }
}

impl Drop for QueryLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A UDP and TCP port free on 127.0.0.1 now.
pub fn free_dns_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = udp.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The command line of an agent restarted in place: `node` of the control
/// plane at `cp` (gRPC), its state in `state`, admin on `admin`, the DNS
/// stub on `dns` (no upstream), the `none` data plane.
pub fn agent_args(
    cp: SocketAddr,
    node: &str,
    state: &std::path::Path,
    admin: &str,
    dns: SocketAddr,
) -> Vec<String> {
    [
        "--control-plane",
        &format!("http://{cp}"),
        "--node-name",
        node,
        "--state-dir",
        &state.display().to_string(),
        "--admin-listen",
        admin,
        "--dns-listen",
        &dns.to_string(),
        "--dns-upstream",
        "127.0.0.1:1",
        "--dataplane",
        "none",
    ]
    .map(String::from)
    .to_vec()
}
