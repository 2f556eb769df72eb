//! `bench_agent_apply`: what one update costs an agent, from the update
//! message to the ACK (decode, `none` data plane, sled write + flush, DNS
//! index caught up, status), at 1,000 and 10,000 Services x 10 endpoints in
//! the same run (or `--sizes N,M`). `--settle N` applies N changes before
//! the timed ones (before the store freed what sled replaced at once, the
//! first changes after a large whole state paid for freeing it). With `--nftables` (root) the data plane
//! is the nftables one, in a network namespace the bench makes, instead of
//! `none`. Each size first takes its whole state in one update (the
//! anchor; what a new node does with its first download, whose size on
//! the wire is printed), then 50 updates of one endpoint change each, to other Services.
//! The decode step (`AgentState::apply`: the new state, its one decoded
//! Service) is timed on its own too. The process's peak RSS is taken from
//! the whole state on (`VmHWM`, reset before it). After the changes the process's RSS
//! is what a whole agent holds (its state, the data plane's record, sled,
//! the DNS stub's index, the runtime), printed with the heap's use and
//! free space (glibc's `mallinfo2`) and the RSS after a `malloc_trim` by
//! the bench (the restarts below start from the trimmed process); run one
//! size (`--sizes 100000`) for it, since a size before leaves memory
//! behind. With `--restart` (and `--nftables`),
//! the agent then stops and starts again from its sled directory
//! (`Applier::restore`: the store read, the persisted state put in force)
//! three times: keeping the table in force (its marker matches), then
//! rewriting it as a start did before (the anchor), then keeping it again;
//! each with its time and the process's peak RSS during it; and the
//! periodic check of the table (`DataPlane::maintain`) beside `nft list
//! tables` in the same namespace.
//!
//! ```text
//! cargo build --release -p switchyard-integration-tests --bin bench_agent_apply
//! target/release/bench_agent_apply [--changes 50] [--settle 0] [--sizes 1000,10000] [--nftables [--restart]]
//! ```

use std::sync::Arc;
use std::time::Instant;

use switchyard_agent::applier::Applier;
use switchyard_agent::dataplane::{DataPlane, Family, NoneDataPlane};
use switchyard_agent::dns::DnsConfig;
use switchyard_agent::nftables::NftablesDataPlane;
use switchyard_agent::status::{Metrics, Status};
use switchyard_agent::store::Store;
use switchyard_integration_tests::bench::{
    Netns, arg, cfg, loadavg, proc_status_kib, reset_peak_rss, summary, ten_endpoint_service,
};
use switchyard_proto::v1;
use tokio_util::sync::CancellationToken;

/// Service `i` with its 10 endpoints at `generation`, as the wire carries it.
fn resource(i: usize, generation: u32) -> v1::Resource {
    let st = ten_endpoint_service(i, generation);
    v1::Resource {
        name: st.service.key.to_string(),
        version: format!("{i}-{generation}"),
        service_state: switchyard_proto::convert::encode_state_bytes(&st),
    }
}

fn update(version: String, resources: Vec<v1::Resource>) -> v1::SnapshotUpdate {
    v1::SnapshotUpdate {
        snapshot_version: version,
        nonce: "1".into(),
        resources,
        ..Default::default()
    }
}

/// One size: (whole state ms, per-change ms, decode-only ms).
async fn run(
    services: usize,
    changes: u32,
    settle: u32,
    nftables: bool,
    restart: bool,
) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let (store, _) = Store::open(dir.path())?;
    // With --nftables, the real data plane in a namespace of its own
    // (dropped, so deleted, when this size is done).
    let netns = nftables.then(|| Netns::new("apply"));
    let dataplane: Box<dyn DataPlane> = match &netns {
        Some(ns) => Box::new(NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &ns.0)),
        None => Box::new(NoneDataPlane::default()),
    };
    let plane = dataplane.name();
    let status = Arc::new(Status::new("bench".into(), "default".into(), None, plane));
    let metrics = Arc::new(Metrics::new());
    let mut applier = Applier::new(store, dataplane, status.clone(), metrics.clone());
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let cfg = DnsConfig::plain(
        "127.0.0.1:0".parse()?,
        switchyard_agent::dns::zone_name("cluster.local")?,
    );
    let started = switchyard_agent::dns::start(
        cfg,
        applier.subscribe(),
        status.clone(),
        metrics.clone(),
        &mut tasks,
        shutdown.clone(),
    )?;
    applier.ack_after_dns(started.built);

    let rss_start = proc_status_kib("self", "VmRSS");
    reset_peak_rss();
    let whole = update("v0".into(), (0..services).map(|i| resource(i, 0)).collect());
    // What a new node downloads: the whole state as one message on the wire.
    let whole_bytes = prost::Message::encoded_len(&whole);
    let t = Instant::now();
    applier
        .apply_update(&whole)
        .await
        .map_err(|e| anyhow::anyhow!(e.nack_detail()))?;
    let whole_ms = t.elapsed().as_secs_f64() * 1e3;
    // Received, applied and dropped, as an agent does with it.
    drop(whole);

    // Changes that are applied but not timed: right after a large whole
    // state the store frees what sled replaced, on a blocking thread (the
    // first changes paid for it, tens of ms each for some 50 at 100,000
    // Services, before it was freed at once).
    for generation in 1..=settle {
        let i = (generation as usize * 7919) % services;
        let one = update(format!("s{generation}"), vec![resource(i, generation)]);
        applier
            .apply_update(&one)
            .await
            .map_err(|e| anyhow::anyhow!(e.nack_detail()))?;
    }
    let mut per_change = Vec::new();
    let mut decode = Vec::new();
    for generation in settle + 1..=settle + changes {
        let i = (generation as usize * 7919) % services;
        let one = update(format!("v{generation}"), vec![resource(i, generation)]);
        let t = Instant::now();
        let _ = applier.state().apply(&one)?;
        decode.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        applier
            .apply_update(&one)
            .await
            .map_err(|e| anyhow::anyhow!(e.nack_detail()))?;
        per_change.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // What an agent holds then: the state, the data plane's record, sled's
    // cache, the DNS index (the ACK waited for it), the runtime.
    let rss_end = proc_status_kib("self", "VmRSS");
    let rss_peak = proc_status_kib("self", "VmHWM");
    let heap = switchyard_heap::usage();
    switchyard_heap::trim();
    let rss_trimmed = proc_status_kib("self", "VmRSS");
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    drop(applier);
    let mut restarts = Vec::new();
    if let (true, Some(ns)) = (restart, &netns) {
        for keep in [true, false, true] {
            restarts.push(restart_from_disk(dir.path(), &ns.0, keep, services).await?);
        }
    }
    let upkeep = match (restart, &netns) {
        (true, Some(ns)) => upkeep(dir.path(), &ns.0)?,
        _ => serde_json::Value::Null,
    };
    Ok(serde_json::json!({
        "services": services,
        "plane": plane,
        "whole_state_ms": (whole_ms * 10.0).round() / 10.0,
        "whole_state_mib": (whole_bytes as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
        "one_change_ms": summary(&mut per_change),
        "decode_only_ms": summary(&mut decode),
        "rss_start_mib": (rss_start as f64 / 1024.0).round(),
        "rss_mib": (rss_end as f64 / 1024.0).round(),
        "rss_peak_mib": (rss_peak as f64 / 1024.0).round(),
        "heap_in_use_mib": heap.map(|h| h.in_use >> 20),
        "heap_free_mib": heap.map(|h| h.free >> 20),
        "rss_trimmed_mib": (rss_trimmed as f64 / 1024.0).round(),
        "restarts": restarts,
        "upkeep": upkeep,
    }))
}

/// What the periodic check of the table costs (`DataPlane::maintain`:
/// is our table there, does its nat hook jump to it), median of 5, beside
/// `nft list tables` in the same namespace (what the check ran before,
/// once per table and again for the chain).
fn upkeep(dir: &std::path::Path, ns: &str) -> anyhow::Result<serde_json::Value> {
    let state = match Store::open(dir)?.0.load()? {
        switchyard_agent::store::Loaded::State(s) => s,
        other => anyhow::bail!("the store holds no state to check: {other:?}"),
    };
    let mut plane = NftablesDataPlane::in_netns(cfg(), vec![Family::V4], ns);
    let all = switchyard_agent::state::ChangeSet {
        changed: state.resources.keys().cloned().collect(),
        removed: Vec::new(),
    };
    plane
        .apply(&switchyard_agent::dataplane::Change {
            state: &state,
            changes: &all,
            full: true,
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut checks = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        plane.maintain().map_err(|e| anyhow::anyhow!("{e}"))?;
        checks.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let t = Instant::now();
    let listed = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "list", "tables"])
        .output()?;
    anyhow::ensure!(listed.status.success(), "nft list tables failed");
    Ok(serde_json::json!({
        "maintain_ms": summary(&mut checks),
        "nft_list_tables_ms": (t.elapsed().as_secs_f64() * 1e3).round(),
    }))
}

/// An agent start from the sled directory `dir` over the nftables table
/// the last one left in namespace `ns`: the time `Applier::restore` takes
/// (open, read, put in force) and the peak RSS meanwhile. `keep`: whether
/// the start may keep a table whose marker matches.
async fn restart_from_disk(
    dir: &std::path::Path,
    ns: &str,
    keep: bool,
    services: usize,
) -> anyhow::Result<serde_json::Value> {
    let before_kib = proc_status_kib("self", "VmRSS");
    reset_peak_rss();
    let t = Instant::now();
    let (store, _) = Store::open(dir)?;
    let mut plane = NftablesDataPlane::in_netns(cfg(), vec![Family::V4], ns);
    plane.set_keep_on_start(keep);
    let status = Arc::new(Status::new(
        "bench".into(),
        "default".into(),
        None,
        "nftables",
    ));
    let mut applier = Applier::new(
        store,
        Box::new(plane),
        status.clone(),
        Arc::new(Metrics::new()),
    );
    applier.restore().await;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let held = applier.state().resources.len();
    anyhow::ensure!(
        held == services,
        "the restart serves {held} Services of {services}: {:?}",
        status.document().last_error
    );
    let peak_kib = proc_status_kib("self", "VmHWM");
    drop(applier);
    Ok(serde_json::json!({
        "keep": keep,
        "ms": ms.round(),
        "peak_above_mib": (peak_kib.saturating_sub(before_kib) as f64 / 1024.0).round(),
    }))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let changes = arg("--changes", 50) as u32;
    let settle = arg("--settle", 0) as u32;
    let args: Vec<String> = std::env::args().collect();
    let nftables = args.iter().any(|a| a == "--nftables");
    let restart = nftables && args.iter().any(|a| a == "--restart");
    let sizes: Vec<usize> = match args.iter().position(|a| a == "--sizes") {
        Some(i) => args
            .get(i + 1)
            .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default(),
        None => vec![1_000, 10_000],
    };
    let load_before = loadavg();
    let mut rows = Vec::new();
    for services in sizes {
        rows.push(run(services, changes, settle, nftables, restart).await?);
    }
    println!("load {load_before} -> {}", loadavg());
    println!(
        "| data plane | Services x 10 endpoints | whole state in one update (its size) | one endpoint change, update to ACK: p50 / p99 / max | of which decode (new AgentState): p50 / p99 |"
    );
    println!("|---|---|---|---|---|");
    for r in &rows {
        let c = &r["one_change_ms"];
        let d = &r["decode_only_ms"];
        println!(
            "| {} | {} | {} ms ({} MiB) | {} / {} / {} ms | {} / {} ms |",
            r["plane"].as_str().unwrap_or("?"),
            r["services"],
            r["whole_state_ms"],
            r["whole_state_mib"],
            c["p50"],
            c["p99"],
            c["max"],
            d["p50"],
            d["p99"]
        );
    }
    println!();
    println!(
        "| data plane | Services x 10 endpoints | RSS of this process after the whole state and the changes (the agent's state, data plane, sled, DNS stub) | peak RSS from the whole state on | heap in use; free in the heap | RSS after a malloc_trim by the bench | before the whole state |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} MiB | {} MiB | {} MiB; {} MiB | {} MiB | {} MiB |",
            r["plane"].as_str().unwrap_or("?"),
            r["services"],
            r["rss_mib"],
            r["rss_peak_mib"],
            r["heap_in_use_mib"],
            r["heap_free_mib"],
            r["rss_trimmed_mib"],
            r["rss_start_mib"]
        );
    }
    if restart {
        println!();
        println!(
            "| Services x 10 endpoints | restart from sled over the table in force | time to the persisted state in force | peak RSS above the process before it |"
        );
        println!("|---|---|---|---|");
        for r in &rows {
            for x in r["restarts"].as_array().into_iter().flatten() {
                let how = if x["keep"] == true {
                    "table kept (marker matches)"
                } else {
                    "table rewritten (anchor: the start before)"
                };
                println!(
                    "| {} | {how} | {} ms | {} MiB |",
                    r["services"], x["ms"], x["peak_above_mib"]
                );
            }
        }
        println!();
        println!(
            "| Services x 10 endpoints | periodic check of the table (maintain), p50 / max of 5 | `nft list tables` in the same namespace (the check before: it, then `nft list chain`) |"
        );
        println!("|---|---|---|");
        for r in &rows {
            let u = &r["upkeep"];
            println!(
                "| {} | {} / {} ms | {} ms |",
                r["services"],
                u["maintain_ms"]["p50"],
                u["maintain_ms"]["max"],
                u["nft_list_tables_ms"]
            );
        }
    }
    Ok(())
}
