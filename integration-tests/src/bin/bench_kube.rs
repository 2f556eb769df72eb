//! `bench_kube`: the Kubernetes source under load, printed as Markdown
//! (progress goes to stderr).
//!
//! ```text
//!  this process                                         child process
//!  API server stand-in (10,000 Services + slices) ◀─ kube client ─ switchyard-control-plane --source kube
//!  N agents (sled, none data plane) ─────────────── gRPC ──────────▶        (release build, RSS read from /proc)
//! ```
//!
//! 1. Initial sync: spawn the control plane, time until `/readyz` is 200
//!    (the first snapshot exists; polled every 5 ms), read its peak and
//!    current resident memory. Where the time went: the CPU of the
//!    stand-in (this process) and of the control plane, and from the
//!    stand-in's log of list pages and watches, per kind, the time the
//!    stand-in took to answer the pages, the rest of the list (the client
//!    receiving and decoding each page before it asks for the next, and
//!    the source handling its objects), and the time from the last watch
//!    started (every list done) to ready.
//! 2. Event storm: 1,000 EndpointSlice changes (one per Service) spread
//!    over one second; count the snapshot versions the control plane
//!    published and the versions an agent applied, and time until the last
//!    agent holds the last change (agents follow their state watch).
//!
//! The control plane runs in its own process so that its memory is its
//! own; the stand-in and the agents share the other core. `--agents 0`
//! measures the initial sync only.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use switchyard_agent::dataplane::{NoneDataPlane, Recorded};
use switchyard_integration_tests::apiserver::{FakeApiServer, Kind, Served, ServerConfig, Store};
use switchyard_integration_tests::bench::proc_cpu_seconds;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(300);

#[derive(Debug, Parser)]
#[command(name = "bench_kube", about = "Kubernetes source benchmarks")]
struct Cli {
    /// Services (one EndpointSlice each).
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints per slice.
    #[arg(long, default_value_t = 3)]
    endpoints: usize,
    /// Nodes.
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    /// Agents (in this process); 0: the initial sync only, no storms.
    #[arg(long, default_value_t = 5)]
    agents: usize,
    /// Endpoint changes per storm.
    #[arg(long, default_value_t = 1000)]
    changes: usize,
    /// Length of a storm.
    #[arg(long, default_value = "1s", value_parser = switchyard_control_plane::config::parse_duration)]
    storm: Duration,
    /// Storms.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Control-plane --debounce.
    #[arg(long, default_value = "100ms")]
    debounce: String,
    /// Control-plane --max-delay.
    #[arg(long, default_value = "1s")]
    max_delay: String,
}

fn slice(i: usize, generation: usize, endpoints: usize) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|e| {
            // Each generation moves every address past the slice's own
            // (by 7 for up to 7 endpoints, as always): by 7 with 10
            // endpoints, the first new address was one the slice had, and
            // the storm was seen as held before anything moved.
            let n = i * endpoints + e + generation * endpoints.max(7);
            json!({"addresses": [format!("10.{}.{}.{}", 64 + (n >> 16) % 64, (n >> 8) & 255, n & 255)],
                   "conditions": {"ready": true}, "nodeName": format!("node-{}", n % 100)})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": format!("ns-{}", i % 20), "name": format!("svc-{i}-abcde"),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    })
}

fn service(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": format!("ns-{}", i % 20), "name": format!("svc-{i}")},
        // From 10.96.0.1 on, through 10.96.0.0/12: wrapping at 65,536 (as
        // before) gave a third of 100,000 Services another's IP, and only
        // one Service per ClusterIP is served.
        "spec": {"clusterIP": std::net::Ipv4Addr::from(0x0a60_0001 + i as u32).to_string(),
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

fn first_address(v: &Value) -> String {
    v["endpoints"][0]["addresses"][0]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    switchyard_integration_tests::bench::proc_status_kib(&pid.to_string(), field)
}

async fn metric(admin: &str, name: &str) -> anyhow::Result<f64> {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await?
        .text()
        .await?;
    switchyard_integration_tests::bench::metric_value(&text, name)
        .with_context(|| format!("metric {name} not found"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir = tempfile::tempdir()?;

    eprintln!(
        "populating the stand-in: {} Services, {} slices",
        cli.services, cli.services
    );
    let store = Store::new(1_000_000);
    for i in 0..cli.services {
        store
            .create(Kind::Service, service(i))
            .map_err(|e| anyhow::anyhow!(e.message))?;
        store
            .create(Kind::EndpointSlice, slice(i, 0, cli.endpoints))
            .map_err(|e| anyhow::anyhow!(e.message))?;
    }
    for n in 0..cli.nodes {
        store
            .create(
                Kind::Node,
                json!({"metadata": {"name": format!("node-{n}"),
                        "labels": {"topology.kubernetes.io/zone": format!("zone-{}", n % 3)}}}),
            )
            .map_err(|e| anyhow::anyhow!(e.message))?;
    }
    let api = FakeApiServer::start_with(
        TcpListener::bind("127.0.0.1:0").await?,
        store.clone(),
        ServerConfig {
            bookmark_interval: Duration::from_secs(60),
            ..ServerConfig::default()
        },
    )?;
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;

    // 1. Initial sync, control plane in its own process.
    let exe = std::env::current_exe()?;
    let cp_bin = exe
        .parent()
        .context("bench binary has a directory")?
        .join("switchyard-control-plane");
    let grpc = reserve_port().await?;
    let admin = reserve_port().await?;
    let cpu_standin = proc_cpu_seconds("self");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&cp_bin)
        .args([
            "--source",
            "kube",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--grpc-listen",
            &grpc,
            "--admin-listen",
            &admin,
            "--state-dir",
            &dir.path().join("cp").display().to_string(),
            "--debounce",
            &cli.debounce,
            "--max-delay",
            &cli.max_delay,
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", cp_bin.display()))?;
    let pid = child.id().context("child pid")?;
    let http = reqwest::Client::new();
    loop {
        if started.elapsed() > DEADLINE {
            bail!("control plane not ready after {DEADLINE:?}");
        }
        if let Some(status) = child.try_wait()? {
            bail!("control plane exited: {status}");
        }
        let ready = http
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sync_time = started.elapsed();
    let ready_at = Instant::now();
    let hwm_sync = proc_status_kib(pid, "VmHWM");
    let rss_sync = proc_status_kib(pid, "VmRSS");
    let cpu_standin = proc_cpu_seconds("self") - cpu_standin;
    let cpu_cp = proc_cpu_seconds(&pid.to_string());
    eprintln!("ready after {sync_time:?}, VmHWM {hwm_sync} KiB, VmRSS {rss_sync} KiB");

    // The initial sync's rows now: a later phase that fails keeps them.
    println!("| measurement | value |");
    println!("|---|---|");
    println!(
        "| initial sync: {} Services + {} EndpointSlices ({} endpoints each) + {} Nodes, spawn until `/readyz` 200 | {:.2} s |",
        cli.services,
        cli.services,
        cli.endpoints,
        cli.nodes,
        sync_time.as_secs_f64()
    );
    println!(
        "| control-plane memory at ready: peak (VmHWM) / resident (VmRSS) | {} / {} MiB |",
        hwm_sync / 1024,
        rss_sync / 1024
    );
    println!(
        "| CPU from spawn to ready: stand-in (this process) / control plane | {cpu_standin:.2} / {cpu_cp:.2} s |"
    );
    for row in sync_breakdown(&api.served(), started, ready_at) {
        println!("{row}");
    }

    if cli.agents == 0 {
        child.kill().await.ok();
        return Ok(());
    }

    // Agents in this process.
    let mut agents = Vec::new();
    let mut recorders: Vec<Arc<Mutex<Recorded>>> = Vec::new();
    for a in 0..cli.agents {
        let node = format!("node-{a}");
        let args = switchyard_integration_tests::agent_args(
            &node,
            &format!("http://{grpc}"),
            &dir.path().join(&node),
        );
        let dp = NoneDataPlane::default();
        recorders.push(dp.recorded());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        agents.push(
            switchyard_agent::start_with(args, listener, Box::new(dp), CancellationToken::new())
                .await?,
        );
    }
    let t = Instant::now();
    for agent in &agents {
        let mut rx = agent.state.clone();
        tokio::time::timeout(DEADLINE, rx.wait_for(|s| s.resources.len() == cli.services))
            .await
            .context("agents never held every Service")??;
    }
    let agents_full = t.elapsed();
    eprintln!(
        "{} agents hold the full state after {agents_full:?}",
        cli.agents
    );
    let rss_agents = proc_status_kib(pid, "VmRSS");

    // 2. Storms.
    let mut rows = Vec::new();
    for round in 1..=cli.rounds {
        let versions_before: Vec<usize> = recorders
            .iter()
            .map(|r| r.lock().map_or(0, |r| r.versions.len()))
            .collect();
        let snapshots_before = metric(&admin, "switchyard_control_plane_snapshots_total").await?;
        let period = cli.storm / cli.changes as u32;
        let start = tokio::time::Instant::now();
        let mut last = Value::Null;
        for c in 0..cli.changes {
            tokio::time::sleep_until(start + period * c as u32).await;
            let i = c * cli.services / cli.changes;
            last = slice(i, round, cli.endpoints);
            store
                .update(Kind::EndpointSlice, last.clone())
                .map_err(|e| anyhow::anyhow!(e.message))?;
        }
        let written = start.elapsed();
        let last_write = Instant::now();
        let last_ns = last["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let last_svc = last["metadata"]["labels"]["kubernetes.io/service-name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let want = first_address(&last);
        let resource = format!("default/{last_ns}/{last_svc}");
        for agent in &agents {
            let mut rx = agent.state.clone();
            tokio::time::timeout(
                DEADLINE,
                rx.wait_for(|s| {
                    s.resources.get(&resource).is_some_and(|r| {
                        r.state.slices.iter().any(|sl| {
                            sl.endpoints
                                .iter()
                                .any(|e| e.addresses.iter().any(|a| a.to_string() == want))
                        })
                    })
                }),
            )
            .await
            .context("agents never got the last change")??;
        }
        let after_last = last_write.elapsed();
        let after_first = start.elapsed();
        let snapshots =
            metric(&admin, "switchyard_control_plane_snapshots_total").await? - snapshots_before;
        let applied: Vec<usize> = recorders
            .iter()
            .zip(&versions_before)
            .map(|(r, b)| r.lock().map_or(0, |r| r.versions.len()) - b)
            .collect();
        eprintln!(
            "storm {round}: {} changes written in {written:?}; {snapshots} snapshots; agents applied {applied:?}; last agent {after_last:?} after the last write",
            cli.changes
        );
        rows.push((written, snapshots, applied, after_last, after_first));
    }
    let hwm_end = proc_status_kib(pid, "VmHWM");
    let rss_end = proc_status_kib(pid, "VmRSS");

    println!(
        "| {} agents hold all {} Services, after ready | {:.2} s |",
        cli.agents,
        cli.services,
        agents_full.as_secs_f64()
    );
    println!(
        "| control-plane resident memory with {} agents synced | {} MiB |",
        cli.agents,
        rss_agents / 1024
    );
    for (round, (written, snapshots, applied, after_last, after_first)) in rows.iter().enumerate() {
        println!(
            "| storm {}: {} slice changes written over {:.2} s: snapshot versions published / applied per agent | {} / {:?} |",
            round + 1,
            cli.changes,
            written.as_secs_f64(),
            snapshots,
            applied
        );
        println!(
            "| storm {}: last agent holds the last change, after the last write (after the first) | {:.0} ms ({:.0} ms) |",
            round + 1,
            after_last.as_secs_f64() * 1e3,
            after_first.as_secs_f64() * 1e3
        );
    }
    println!(
        "| control-plane memory at the end: peak / resident | {} / {} MiB |",
        hwm_end / 1024,
        rss_end / 1024
    );
    child.kill().await.ok();
    Ok(())
}

/// Table rows saying where the initial sync's time went, from the
/// stand-in's log: per kind listed, the pages, the stand-in's time to
/// answer them and the rest of the list (the client's: transfer, decode,
/// the source's handling of each page before it asks for the next); then
/// spawn until the first list, and the last list's end until ready.
fn sync_breakdown(served: &[Served], started: Instant, ready: Instant) -> Vec<String> {
    let secs = |d: Duration| d.as_secs_f64();
    let mut rows = Vec::new();
    let mut first_list: Option<Instant> = None;
    let mut lists_done: Option<Instant> = None;
    for kind in ["services", "endpointslices", "nodes"] {
        let pages: Vec<&Served> = served
            .iter()
            .filter(|s| s.at < ready && s.request == format!("LIST {kind}"))
            .collect();
        let (Some(first), Some(last)) = (pages.first(), pages.last()) else {
            continue;
        };
        // The watch that follows the list: the client has handled its last page.
        let watch = served
            .iter()
            .find(|s| s.at >= last.at && s.request == format!("WATCH {kind}"))
            .map_or(ready, |w| w.at);
        let standin: Duration = pages.iter().map(|p| p.took).sum();
        let whole = watch.saturating_duration_since(first.at);
        let items: usize = pages.iter().map(|p| p.items).sum();
        let bytes: usize = pages.iter().map(|p| p.bytes).sum();
        first_list = Some(first_list.map_or(first.at, |f| f.min(first.at)));
        lists_done = Some(lists_done.map_or(watch, |d| d.max(watch)));
        rows.push(format!(
            "| list of {kind}: {} pages, {items} objects, {:.0} MiB: first page until the watch starts (the stand-in answering / the rest) | {:.2} s ({:.2} / {:.2} s) |",
            pages.len(),
            bytes as f64 / (1024.0 * 1024.0),
            secs(whole),
            secs(standin),
            secs(whole.saturating_sub(standin)),
        ));
    }
    if let (Some(first), Some(done)) = (first_list, lists_done) {
        rows.push(format!(
            "| spawn until the first list request / every list done until ready | {:.2} / {:.2} s |",
            secs(first.saturating_duration_since(started)),
            secs(ready.saturating_duration_since(done)),
        ));
    }
    rows
}

async fn reserve_port() -> anyhow::Result<String> {
    Ok(switchyard_integration_tests::bench::reserve_port().await?)
}
