//! `bench_restart`: DNS queries lost while the agent is restarted, with the
//! handoff (`switchyard_agent::handoff`) in both orders a DaemonSet update
//! can take, beside a plain stop-then-start in the same run. Markdown on
//! stdout, progress on stderr.
//!
//! ```text
//!  this process: a control plane (file source, S Services) and a query loop at RATE/s
//!                on the stub's address (a query is lost when unanswered after 1 s)
//!  agent processes (this build's sy_agent, none data plane), one state directory:
//!    surge:      start the new agent; once the old one says its successor serves, SIGTERM it
//!    term-first: SIGTERM the old agent and start the new one at once
//!    plain:      SIGTERM the old agent (--handoff-wait 0s), wait for it to exit, start the new one
//! ```
//!
//! Run: `cargo run --release -p switchyard-integration-tests --bin bench_restart -- --restarts 20`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use switchyard_integration_tests::bench::loadavg;
use switchyard_integration_tests::restart::{
    AgentProcess, QueryLoop, Tally, agent_args, free_dns_port,
};
use switchyard_integration_tests::*;

const STEP: Duration = Duration::from_secs(60);

#[derive(Debug, Parser)]
#[command(
    name = "bench_restart",
    about = "DNS queries lost across agent restarts"
)]
struct Cli {
    /// Restarts per mode.
    #[arg(long, default_value_t = 20)]
    restarts: usize,
    /// Queries a second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Services in the state.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Modes to run, in this order.
    #[arg(long, value_delimiter = ',', default_value = "surge,term-first,plain")]
    modes: Vec<String>,
}

fn agent_bin() -> PathBuf {
    let me = std::env::current_exe().expect("this binary");
    me.with_file_name("sy_agent")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bin = agent_bin();
    anyhow::ensure!(
        bin.exists(),
        "{} missing: build it first (cargo build --release -p switchyard-integration-tests --bins)",
        bin.display()
    );
    let env = TestEnv::new();
    for f in 0..cli.services.div_ceil(100) {
        let docs: Vec<String> = (f * 100..((f + 1) * 100).min(cli.services))
            .map(|i| {
                service_yaml(
                    "bench",
                    &format!("svc-{i}"),
                    80,
                    &[&format!("10.244.{}.{}", i / 250, i % 250 + 1)],
                )
            })
            .collect();
        env.write(&format!("part-{f}.yaml"), &docs.join("---\n"));
    }
    let cp = start_cp(cp_args(&env.manifests(), &env.state("cp"), None)).await;
    println!(
        "| mode | restarts | queries | answered | lost | longest gap | per restart | load |\n|---|---|---|---|---|---|---|---|"
    );
    for mode in &cli.modes {
        let dns: SocketAddr = ([127, 0, 0, 1], free_dns_port()).into();
        let state = env.state(&format!("agent-{mode}"));
        let mut args = agent_args(
            cp.grpc_addr,
            &format!("bench-{mode}"),
            &state,
            "127.0.0.1:0",
            dns,
        );
        if mode == "plain" {
            args.extend(["--handoff-wait".to_owned(), "0s".to_owned()]);
        }
        let load_before = loadavg();
        let (tally, took) = run(&bin, &args, dns, mode, cli.restarts, cli.rate, &cp).await;
        println!(
            "| {mode} | {} | {} | {} | {} | {:.1} ms | {:.0} ms | {load_before} -> {} |",
            cli.restarts,
            tally.sent,
            tally.answered,
            tally.lost,
            tally.longest_gap.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e3 / cli.restarts as f64,
            loadavg(),
        );
    }
    cp.shutdown().await;
    Ok(())
}

/// `restarts` restarts in `mode` under a query loop; what it saw and how
/// long the restarts took.
async fn run(
    bin: &Path,
    args: &[String],
    dns: SocketAddr,
    mode: &str,
    restarts: usize,
    rate: u32,
    cp: &switchyard_control_plane::ControlPlane,
) -> (Tally, Duration) {
    let node = args[3].clone();
    let mut agent = AgentProcess::start(bin, args);
    agent.wait_for("agent started", STEP);
    cp_status_until(cp, "the agent to ACK", |s| {
        s.agents
            .iter()
            .any(|a| a.node == node && a.connected && a.acked_version == s.version)
    })
    .await;
    let load = QueryLoop::start(
        dns,
        "svc-0.bench.svc.cluster.local",
        rate,
        Duration::from_secs(1),
    );
    // Let the load run before the first restart.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    for i in 0..restarts {
        eprintln!("{mode}: restart {}/{restarts}", i + 1);
        agent = tokio::task::block_in_place(|| restart(bin, args, agent, mode));
        // Between restarts, as a rollout paces them.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = t.elapsed();
    let tally = tokio::task::block_in_place(|| load.finish());
    agent.terminate();
    let _ = tokio::task::block_in_place(|| agent.wait());
    (tally, took)
}

fn restart(bin: &Path, args: &[String], mut old: AgentProcess, mode: &str) -> AgentProcess {
    match mode {
        "surge" => {
            let mut new = AgentProcess::start(bin, args);
            new.wait_for("agent started", STEP);
            old.wait_for("the successor serves", STEP);
            old.terminate();
            old.wait();
            new
        }
        "term-first" => {
            old.terminate();
            let mut new = AgentProcess::start(bin, args);
            new.wait_for("agent started", STEP);
            old.wait();
            new
        }
        "plain" => {
            old.terminate();
            old.wait();
            let mut new = AgentProcess::start(bin, args);
            new.wait_for("agent started", STEP);
            new
        }
        other => panic!("unknown mode {other}"),
    }
}
