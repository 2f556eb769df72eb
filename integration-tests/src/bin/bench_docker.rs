//! How fast a container's start and stop reach an agent through the docker
//! source, beside a manifest edit through the file source in the same run
//! and the same control plane.
//!
//! ```text
//! cargo run --release -p switchyard-integration-tests --bin bench_docker -- \
//!     [--rounds 20] [--debounce 100ms] [--image switchyard-base:bookworm]
//! ```
//!
//! Each round starts a labelled container beside an anchor container of the
//! same Service, waits until the agent (in this process, `none` data plane)
//! has the new endpoint in force, stops it and waits until the endpoint is
//! gone. The start and stop figures run from the engine's own event time
//! (`timeNano` of `start` and `die`) to the moment the agent's state
//! changed; the file figure from the rename of the edited manifest. One
//! JSON document on stdout.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use switchyard_agent::state::AgentState;
use switchyard_integration_tests::bench::{loadavg, summary};
use switchyard_integration_tests::{
    TestEnv, agent_args, service_yaml, start_cp, start_recording_agent,
};

/// Longest wait for any one event.
const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
struct Cli {
    /// Rounds of start + stop (and of file edits).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// The control plane's --debounce.
    #[arg(long, default_value = "100ms")]
    debounce: String,
    /// Image of the containers (only `sleep` is run).
    #[arg(long, default_value = "switchyard-base:bookworm")]
    image: String,
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running docker")?;
    if !out.status.success() {
        bail!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Containers and the network of one run, removed on drop.
struct Cleanup {
    network: String,
    containers: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        let _ = docker(&["network", "rm", &self.network]);
    }
}

/// Endpoints of `default/bench` (any cluster) in a state.
fn endpoints(state: &AgentState, service: &str) -> usize {
    state
        .resources
        .values()
        .filter(|r| r.state.service.key.name == service)
        .flat_map(|r| r.state.slices.iter().flat_map(|s| &s.endpoints))
        .count()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let env = TestEnv::new();
    let network = format!("sybench-{}", std::process::id());
    let mut cleanup = Cleanup {
        network: network.clone(),
        containers: Vec::new(),
    };
    docker(&["network", "create", &network])?;

    // The engine's own event times, by (container id, action).
    let mut events = Command::new("docker")
        .args([
            "events",
            "--filter",
            "type=container",
            "--filter",
            "label=switchyard.io/service=bench",
            "--filter",
            "event=start",
            "--filter",
            "event=die",
            "--format",
            "{{.Actor.ID}} {{.Action}} {{.TimeNano}}",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("docker events")?;
    let (etx, erx) = mpsc::channel::<(String, String, i64)>();
    let stdout = events.stdout.take().context("events stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut f = line.split_whitespace();
            if let (Some(id), Some(action), Some(t)) = (f.next(), f.next(), f.next())
                && let Ok(t) = t.parse()
                && etx.send((id.to_owned(), action.to_owned(), t)).is_err()
            {
                return;
            }
        }
    });
    let mut seen: HashMap<(String, String), i64> = HashMap::new();
    let mut event_time = |id: &str, action: &str| -> anyhow::Result<i64> {
        let key = (id.to_owned(), action.to_owned());
        loop {
            if let Some(t) = seen.get(&key) {
                return Ok(*t);
            }
            let (i, a, t) = erx
                .recv_timeout(DEADLINE)
                .with_context(|| format!("no {action} event for {id}"))?;
            seen.insert((i, a), t);
        }
    };

    env.write(
        "file.yaml",
        &service_yaml("default", "filebench", 80, &["10.244.0.1"]),
    );
    let mut args = env.cp_args();
    args.sources
        .push("docker".parse().map_err(|e: String| anyhow::anyhow!(e))?);
    args.debounce = switchyard_control_plane::config::parse_duration(&cli.debounce)
        .map_err(|e| anyhow::anyhow!(e))?;
    let cp = start_cp(args).await;
    let url = format!("http://{}", cp.grpc_addr);
    let (agent, _) = start_recording_agent(agent_args("bench", &url, &env.state("agent"))).await;
    let mut state = agent.state.clone();

    let run = |name: &str| -> anyhow::Result<String> {
        docker(&[
            "run",
            "-d",
            "--init",
            "--name",
            name,
            "--network",
            &network,
            "--label",
            "switchyard.io/service=bench",
            "--label",
            "switchyard.io/ports=80",
            &cli.image,
            "sleep",
            "infinity",
        ])
    };
    let anchor = format!("{network}-anchor");
    cleanup.containers.push(anchor.clone());
    run(&anchor)?;
    let wait = |state: &mut tokio::sync::watch::Receiver<std::sync::Arc<AgentState>>,
                service: &'static str,
                n: usize| {
        let mut state = state.clone();
        async move {
            tokio::time::timeout(DEADLINE, state.wait_for(|s| endpoints(s, service) == n))
                .await
                .with_context(|| format!("agent never held {n} endpoints of {service}"))?
                .context("agent stopped")?;
            Ok::<i64, anyhow::Error>(now_nanos())
        }
    };
    wait(&mut state, "bench", 1).await?;

    let (mut starts, mut stops, mut files) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..cli.rounds {
        let name = format!("{network}-{round}");
        cleanup.containers.push(name.clone());
        let id = run(&name)?;
        let applied = wait(&mut state, "bench", 2).await?;
        starts.push((applied - event_time(&id, "start")?) as f64 / 1e6);
        docker(&["stop", "-t", "1", &name])?;
        let applied = wait(&mut state, "bench", 1).await?;
        stops.push((applied - event_time(&id, "die")?) as f64 / 1e6);
        docker(&["rm", "-f", &name])?;
        cleanup.containers.pop();

        // The file source, same control plane: one more endpoint each round.
        let ips: Vec<String> = (0..=round + 1)
            .map(|i| format!("10.244.1.{}", i + 1))
            .collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        let written = now_nanos();
        env.write("file.yaml", &service_yaml("default", "filebench", 80, &ips));
        let applied = wait(&mut state, "filebench", round + 2).await?;
        files.push((applied - written) as f64 / 1e6);
    }
    let _ = events.kill();
    let doc = serde_json::json!({
        "rounds": cli.rounds,
        "debounce": cli.debounce,
        "loadavg": loadavg(),
        "container_start_event_to_agent_ms": summary(&mut starts),
        "container_die_event_to_agent_ms": summary(&mut stops),
        "file_rename_to_agent_ms": summary(&mut files),
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    drop(agent);
    cp.shutdown().await;
    Ok(())
}
