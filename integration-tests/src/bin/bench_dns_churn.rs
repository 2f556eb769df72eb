//! `bench_dns_churn`: DNS latency while the state changes. The agent's DNS
//! stub serves 10,000 Services x 10 endpoints; a client sends A queries at
//! a fixed pace over UDP and times each answer, once with the state quiet
//! and once with one Service changing every 200 ms (each change a new state,
//! so a new index is made). Runs alternate, repeated, in one process.
//! First, in the same process, the cost of an index at that size: built
//! whole, beside made from the previous index after one endpoint change.
//!
//! With `--headless-endpoints N` it times one large headless Service
//! instead (N/4, N/2 and N endpoints x `--headless-ports` named ports, an
//! SRV record per endpoint and port, beside 1,000 ordinary Services, then
//! N alone): the
//! index built whole, made from the previous index after one endpoint
//! change to it, and, through the running stub, how long a new unrelated
//! Service takes to resolve when it comes right after such a change.
//!
//! ```text
//! cargo build --release -p switchyard-integration-tests --bin bench_dns_churn
//! target/release/bench_dns_churn [--services 10000] [--seconds 10] [--qps 2000] [--repeat 3]
//! target/release/bench_dns_churn --headless-endpoints 2000 [--headless-ports 50] [--repeat 3]
//! ```

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_agent::dns::{DnsConfig, DnsIndex};
use switchyard_agent::state::{AgentState, HeldResource};
use switchyard_agent::status::{Metrics, Status};
use switchyard_integration_tests::bench::{
    arg, big_headless_service, loadavg, summary, ten_endpoint_service,
};
use switchyard_model::{Service, ServiceKey, ServiceState};
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
    query_name(id, &format!("svc-{i}"), &format!("ns-{}", i % 100))
}

/// An A query for `<name>.<ns>.svc.cluster.local`.
fn query_name(id: u16, name: &str, ns: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in [name, ns, "svc", "cluster", "local"] {
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

/// `base` with `st` in it, as version `version`.
fn with_service(base: &AgentState, st: ServiceState, version: &str) -> Arc<AgentState> {
    let mut next = base.clone();
    next.resources.insert(
        st.service.key.to_string(),
        HeldResource {
            version: version.into(),
            state: Arc::new(st),
        },
    );
    next.version = version.into();
    Arc::new(next)
}

fn stub_config() -> anyhow::Result<DnsConfig> {
    Ok(DnsConfig::plain(
        "127.0.0.1:0".parse()?,
        switchyard_agent::dns::zone_name("cluster.local")?,
    ))
}

/// One large headless Service (issue 30): the index built whole and after
/// one endpoint change to it, at a quarter, half and all of `endpoints`;
/// then, at `endpoints`, a new unrelated Service sent right after a
/// one-endpoint change to the large one, until the stub answers it.
fn big_headless(endpoints: usize, ports: usize, repeat: usize) -> anyhow::Result<()> {
    let zone = switchyard_agent::dns::zone_name("cluster.local")?;
    let small: switchyard_agent::state::Resources = (0..1000).map(|i| held(i, 0)).collect();
    let base = AgentState {
        version: "v0".into(),
        resources: small,
    };
    println!(
        "One headless Service x {ports} named ports beside 1,000 Services (load {}):",
        loadavg()
    );
    println!(
        "| endpoints | names | built whole p50 / max ms | one endpoint change p50 / max ms | records changed |"
    );
    println!("|---|---|---|---|---|");
    let alone = AgentState::default();
    for (n, beside) in [
        (endpoints / 4, &base),
        (endpoints / 2, &base),
        (endpoints, &base),
        (endpoints, &alone),
    ] {
        let state = with_service(beside, big_headless_service(n, ports, None), "v1");
        let mut whole = Vec::new();
        let mut index = DnsIndex::build(state.clone(), &zone, 5);
        for _ in 1..repeat {
            let t = Instant::now();
            index = DnsIndex::build(state.clone(), &zone, 5);
            whole.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut next = Vec::new();
        for k in 0..repeat {
            let changed = with_service(
                beside,
                big_headless_service(n, ports, Some(k * 37 % n)),
                &format!("v{}", k + 2),
            );
            let t = Instant::now();
            index = index.next(changed);
            next.push(t.elapsed().as_secs_f64() * 1e3);
            eprintln!("{n} endpoints: change {k} {:.1} ms", next[k]);
        }
        let (w, c) = (summary(&mut whole), summary(&mut next));
        println!(
            "| {n}{} | {} | {} / {} | {} / {} | {} |",
            if beside.resources.is_empty() {
                ", alone"
            } else {
                ""
            },
            index.len(),
            w["p50"],
            w["max"],
            c["p50"],
            c["max"],
            index.changed_records()
        );
    }

    // Through the stub: a one-endpoint change to the large Service, then at
    // once a new Service elsewhere; how long until that one resolves.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let first = with_service(&base, big_headless_service(endpoints, ports, None), "v1");
    let (tx, rx) = tokio::sync::watch::channel(first.clone());
    let status = Arc::new(Status::new("bench".into(), "default".into(), None, "none"));
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let stub = rt
        .block_on(async {
            switchyard_agent::dns::start(
                stub_config()?,
                rx,
                status.clone(),
                Arc::new(Metrics::new()),
                &mut tasks,
                shutdown.clone(),
            )
        })?
        .addr;
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut waits = Vec::new();
    for k in 0..repeat {
        let big = with_service(
            &tx.borrow(),
            big_headless_service(endpoints, ports, Some(k)),
            &format!("b{k}"),
        );
        let extra = ServiceKey::new("default", "elsewhere", format!("new-{k}"));
        let mut new = ServiceState::new(Service {
            cluster_ips: vec![std::net::Ipv4Addr::new(10, 97, 0, k as u8 + 1).into()],
            ..Service::new(extra)
        });
        new.normalize();
        let t = Instant::now();
        tx.send_replace(big.clone());
        tx.send_replace(with_service(&big, new, &format!("n{k}")));
        let name = format!("new-{k}");
        let mut buf = [0u8; 512];
        let waited = loop {
            sock.send_to(&query_name(k as u16, &name, "elsewhere"), stub)?;
            if let Ok(len) = sock.recv(&mut buf)
                && len > 12
                && u16::from_be_bytes([buf[0], buf[1]]) == k as u16
                && buf[3] & 0x0f == 0
                && u16::from_be_bytes([buf[6], buf[7]]) > 0
            {
                break t.elapsed();
            }
            if t.elapsed() > Duration::from_secs(600) {
                anyhow::bail!("{name} did not resolve within 600 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        eprintln!("unrelated Service {k}: answered after {waited:?}");
        waits.push(waited.as_secs_f64() * 1e3);
    }
    let s = summary(&mut waits);
    println!(
        "\nA new Service sent right after a one-endpoint change to the {endpoints}-endpoint one, until the stub answers it (UDP, polled every 1 ms): p50 {} ms, max {} ms ({} runs)",
        s["p50"], s["max"], s["n"]
    );
    shutdown.cancel();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let headless = arg("--headless-endpoints", 0) as usize;
    if headless > 0 {
        return big_headless(
            headless,
            arg("--headless-ports", 50) as usize,
            arg("--repeat", 3).max(1) as usize,
        );
    }
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
    let cfg = stub_config()?;
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
