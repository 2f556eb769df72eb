//! `bench_dns_churn`: DNS latency while the state changes. The agent's DNS
//! stub serves 10,000 Services x 10 endpoints; a client sends A queries at
//! a fixed pace over UDP and times each answer, once with the state quiet
//! and once with one Service changing every 200 ms (each change a new state,
//! so a new index is made). Runs alternate, repeated, in one process.
//! First, in the same process, the cost of an index at that size: built
//! whole, beside made from the previous index after one endpoint change.
//!
//! ```text
//! cargo build --release -p switchyard-integration-tests --bin bench_dns_churn
//! target/release/bench_dns_churn [--services 10000] [--seconds 10] [--qps 2000] [--repeat 3]
//! ```

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_agent::dns::{Acl, DnsConfig, DnsIndex};
use switchyard_agent::state::{AgentState, HeldResource};
use switchyard_agent::status::{Metrics, Status};
use switchyard_integration_tests::bench::{arg, loadavg, summary, ten_endpoint_service};
use tokio_util::sync::CancellationToken;

fn held(i: usize, generation: u32) -> (String, HeldResource) {
    let st = ten_endpoint_service(i, generation);
    (
        st.service.key.to_string(),
        HeldResource {
            version: format!("{i}-{generation}"),
            state: Arc::new(st),
        },
    )
}

fn query(id: u16, i: usize) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in [
        format!("svc-{i}"),
        format!("ns-{}", i % 100),
        "svc".into(),
        "cluster".into(),
        "local".into(),
    ] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Sends `qps` queries a second for `seconds`, one at a time, and returns
/// each round trip in microseconds.
fn probe(stub: SocketAddr, services: usize, seconds: u64, qps: u64) -> Vec<f64> {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let gap = Duration::from_secs(1) / qps as u32;
    let start = Instant::now();
    let mut next = start;
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    let mut k: usize = 0;
    while start.elapsed() < Duration::from_secs(seconds) {
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        next += gap;
        k += 1;
        let id = (k % 65_536) as u16;
        let t = Instant::now();
        sock.send_to(&query(id, k * 7919 % services), stub)
            .expect("send");
        loop {
            match sock.recv(&mut buf) {
                Ok(n) if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id => {
                    out.push(t.elapsed().as_secs_f64() * 1e6);
                    break;
                }
                Ok(_) => continue,
                Err(_) => {
                    out.push(2e6);
                    break;
                }
            }
        }
    }
    out
}

/// The DNS index after one endpoint change: built whole (the baseline) and
/// made from the previous index, in this run.
fn index_cost(state: &Arc<AgentState>, services: usize) {
    let zone = switchyard_agent::dns::zone_name("cluster.local").expect("zone");
    let mut whole = Vec::new();
    let mut index = DnsIndex::build(state.clone(), &zone, 5);
    for _ in 0..5 {
        let t = Instant::now();
        index = DnsIndex::build(state.clone(), &zone, 5);
        whole.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut next = Vec::new();
    let mut current = state.clone();
    for generation in 1..=50u32 {
        let mut changed = (*current).clone();
        let i = (generation as usize * 7919) % services;
        let (name, res) = held(i, generation);
        changed.resources.insert(name, res);
        changed.version = format!("v{generation}");
        current = Arc::new(changed);
        let t = Instant::now();
        index = index.next(current.clone());
        next.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(index.changed, Some(1), "one Service changed");
    }
    println!(
        "DNS index at {services} Services x 10 endpoints ({} names), one endpoint change:",
        index.len()
    );
    println!("| how | n | p50 µs | p99 µs | max µs |");
    println!("|---|---|---|---|---|");
    for (how, mut v) in [
        ("built whole (before)", whole),
        ("made from the previous index", next),
    ] {
        let s = summary(&mut v);
        println!(
            "| {how} | {} | {} | {} | {} |",
            s["n"], s["p50"], s["p99"], s["max"]
        );
    }
}

fn main() -> anyhow::Result<()> {
    let services = arg("--services", 10_000) as usize;
    let seconds = arg("--seconds", 10);
    let qps = arg("--qps", 2000);
    let repeat = arg("--repeat", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let base: switchyard_agent::state::Resources = (0..services).map(|i| held(i, 0)).collect();
    let state = Arc::new(AgentState {
        version: "v0".into(),
        resources: base,
    });
    index_cost(&state, services);
    let (tx, rx) = tokio::sync::watch::channel(state.clone());
    let status = Arc::new(Status::new("bench".into(), "default".into(), None, "none"));
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let cfg = DnsConfig {
        listen: "127.0.0.1:0".parse()?,
        zone: switchyard_agent::dns::zone_name("cluster.local")?,
        ttl: 5,
        upstreams: vec![],
        no_upstream: None,
        forward_zones: Vec::new(),
        serve_stale: Duration::ZERO,
        acl: Acl::node_local(&[]),
        max_inflight: 1024,
        tcp_limits: Default::default(),
    };
    let stub = rt
        .block_on(async {
            switchyard_agent::dns::start(
                cfg,
                rx,
                status.clone(),
                metrics.clone(),
                &mut tasks,
                shutdown.clone(),
            )
        })?
        .addr;
    eprintln!("stub on {stub}, {services} Services; load {}", loadavg());
    // Warm up.
    probe(stub, services, 1, qps);

    let mut rows = Vec::new();
    for r in 0..repeat {
        for churn in [false, true] {
            let stop = CancellationToken::new();
            let changer = churn.then(|| {
                let tx = tx.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut generation = 1u32;
                    let mut changes = 0;
                    while !stop.is_cancelled() {
                        std::thread::sleep(Duration::from_millis(200));
                        let mut next = (**tx.borrow()).clone();
                        let i = (generation as usize * 31) % services;
                        let (name, res) = held(i, generation);
                        next.resources.insert(name, res);
                        next.version = format!("v{generation}");
                        tx.send_replace(Arc::new(next));
                        generation += 1;
                        changes += 1;
                    }
                    changes
                })
            });
            let mut lat = probe(stub, services, seconds, qps);
            stop.cancel();
            let changes = changer.map(|h| h.join().unwrap_or(0)).unwrap_or(0);
            let s = summary(&mut lat);
            eprintln!("run {r} churn={churn}: {s} changes={changes}");
            rows.push((
                r,
                churn,
                s,
                changes,
                status
                    .document()
                    .dns
                    .map(|d| d.index_build_ms)
                    .unwrap_or(0.0),
            ));
        }
    }
    println!(
        "| run | state | queries | p50 µs | p99 µs | max µs | changes | last index build ms |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (r, churn, s, changes, build_ms) in rows {
        println!(
            "| {r} | {} | {} | {} | {} | {} | {changes} | {build_ms:.1} |",
            if churn {
                "one Service changed every 200 ms"
            } else {
                "quiet"
            },
            s["n"],
            s["p50"],
            s["p99"],
            s["max"]
        );
    }
    shutdown.cancel();
    Ok(())
}
