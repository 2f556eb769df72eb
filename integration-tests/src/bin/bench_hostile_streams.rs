//! `bench_hostile_streams`: how long a fresh agent takes to sync in full
//! while hostile streams are open on the control plane, beside none. The
//! control plane serves `--services` Services from a file; the hostile
//! streams come from 127.0.0.2, the agent from 127.0.0.1, all in this
//! process:
//!
//! - `idle`: `--idle` streams that never send a Hello;
//! - `unread`: `--unread` streams that send a Hello and never read (a
//!   1 KiB HTTP/2 window: the control plane's sends stall).
//!
//! ```text
//! cargo build --release -p switchyard-integration-tests --bin bench_hostile_streams
//! target/release/bench_hostile_streams [--services 1000] [--idle 64] [--unread 500] [--runs 3]
//! ```

use std::time::{Duration, Instant};

use switchyard_integration_tests::bench::{arg, loadavg, proc_status_kib, summary};
use switchyard_integration_tests::*;

/// Waits for `agent` to hold `version`, at most 600 s.
async fn synced(agent: &switchyard_agent::Agent, version: &str) -> anyhow::Result<()> {
    let mut rx = agent.state.clone();
    tokio::time::timeout(
        Duration::from_secs(600),
        rx.wait_for(|s| s.version == version),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no sync within 600 s"))??;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let services = arg("--services", 1000) as usize;
    let idle = arg("--idle", 64) as usize;
    let unread = arg("--unread", 500) as usize;
    let runs = arg("--runs", 3) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let env = TestEnv::new();
        let body: Vec<String> = (0..services)
            .map(|i| {
                service_yaml(
                    &format!("ns-{}", i % 20),
                    &format!("svc-{i}"),
                    80,
                    &["10.244.1.10", "10.244.1.11", "10.244.1.12"],
                )
            })
            .collect();
        env.write("services.yaml", &body.join("---\n"));
        let from: std::net::IpAddr = "127.0.0.2".parse()?;
        eprintln!("load {}", loadavg());
        let mut rows = Vec::new();
        for run in 0..runs {
            for case in ["none", "idle", "unread"] {
                let cp = start_cp(env.cp_args()).await;
                let version = cp_status_until(&cp, "a snapshot", |s| s.version.is_some())
                    .await
                    .version
                    .unwrap_or_default();
                let url = format!("http://{}", cp.grpc_addr);
                let mut held = Vec::new();
                let hostile = match case {
                    "idle" => {
                        held.extend(hostile::idle_streams(&url, from, idle).await.tasks);
                        idle
                    }
                    "unread" => {
                        held.extend(hostile::unread_streams(&url, from, unread, "unread").await);
                        unread
                    }
                    _ => 0,
                };
                let state = env.state(&format!("agent-{run}-{case}"));
                let t = Instant::now();
                let agent = start_agent(
                    agent_args(&format!("fresh-{run}-{case}"), &url, &state),
                    Box::new(switchyard_agent::dataplane::NoneDataPlane::default()),
                )
                .await;
                synced(&agent, &version).await?;
                let took = t.elapsed();
                let rss = proc_status_kib("self", "VmRSS");
                eprintln!("run {run} {case} ({hostile} streams): synced in {took:?}, RSS {rss} KiB");
                rows.push((case, hostile, took.as_secs_f64() * 1e3));
                agent.shutdown().await;
                for h in held {
                    h.abort();
                }
                cp.shutdown().await;
            }
        }
        println!(
            "A fresh agent's full sync ({services} Services) beside hostile streams from another address (load {}):",
            loadavg()
        );
        println!("| hostile streams | runs | sync p50 ms | max ms |");
        println!("|---|---|---|---|");
        for case in ["none", "idle", "unread"] {
            let mut v: Vec<f64> = rows
                .iter()
                .filter(|r| r.0 == case)
                .map(|r| r.2)
                .collect();
            let n = rows.iter().find(|r| r.0 == case).map_or(0, |r| r.1);
            let s = summary(&mut v);
            let what = match case {
                "none" => "none".to_owned(),
                "idle" => format!("{n} never sending a Hello"),
                _ => format!("{n} never reading"),
            };
            println!("| {what} | {} | {} | {} |", s["n"], s["p50"], s["max"]);
        }
        Ok(())
    })
}
