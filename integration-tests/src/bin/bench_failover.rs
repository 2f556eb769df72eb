//! `bench_failover`: how long an agent given two control planes
//! (`--control-plane A,B`) takes to stream from the other one when the
//! one it streams from is killed (its connections reset) or frozen with
//! SIGSTOP (its TCP connections stay and nothing answers, as behind a
//! blackhole: only unanswered HTTP/2 pings tell). The control planes are
//! `sy_control_plane` processes beside this binary; the agent runs in this
//! process. Each run kills, then freezes, alternating which one.
//!
//! ```text
//! cargo build --release -p switchyard-integration-tests --bin bench_failover --bin sy_control_plane
//! target/release/bench_failover [--runs 5]
//! ```

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_integration_tests::bench::{arg, loadavg, summary};
use switchyard_integration_tests::*;

struct Cp {
    child: Child,
}

impl Cp {
    fn spawn(env: &TestEnv, name: &str, port: u16) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?.with_file_name("sy_control_plane");
        let child = Command::new(exe)
            .arg("--source")
            .arg(format!("file:{}", env.manifests().display()))
            .arg("--state-dir")
            .arg(env.state(name))
            .args([
                "--grpc-listen",
                &format!("127.0.0.1:{port}"),
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self { child })
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits (at most 60 s) until the agent streams from `url`.
async fn streaming_from(agent: &switchyard_agent::Agent, url: &str) -> anyhow::Result<()> {
    let mut rx = agent.status.subscribe();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let s = agent.status.document();
            if s.connected && s.control_plane.as_deref() == Some(url) && s.version.is_some() {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("not streaming from {url} within 60 s"))
}

fn main() -> anyhow::Result<()> {
    let runs = arg("--runs", 5) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let env = TestEnv::new();
        let body: Vec<String> = (0..100)
            .map(|i| service_yaml("shop", &format!("web-{i}"), 80, &["10.244.1.10"]))
            .collect();
        env.write("services.yaml", &body.join("---\n"));
        let ports = [free_port()?, free_port()?];
        let mut cps = [
            Some(Cp::spawn(&env, "cp-0", ports[0])?),
            Some(Cp::spawn(&env, "cp-1", ports[1])?),
        ];
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        let agent = start_agent(
            agent_args("node-a", &urls.join(","), &env.state("agent")),
            Box::new(switchyard_agent::dataplane::NoneDataPlane::default()),
        )
        .await;
        streaming_from(&agent, &urls[0]).await?;
        let mut on = 0;
        let (mut killed, mut frozen) = (Vec::new(), Vec::new());
        eprintln!("load {}", loadavg());
        for run in 0..runs {
            for freeze in [false, true] {
                let other = 1 - on;
                let cp = cps[on].as_ref().expect("running");
                let t = Instant::now();
                if freeze {
                    cp.signal("-STOP");
                } else {
                    cp.signal("-KILL");
                }
                streaming_from(&agent, &urls[other]).await?;
                let took = t.elapsed().as_secs_f64() * 1e3;
                eprintln!(
                    "run {run}: {} -> streaming from the other in {took:.0} ms",
                    if freeze { "frozen" } else { "killed" }
                );
                if freeze {
                    frozen.push(took);
                } else {
                    killed.push(took);
                }
                // The one left behind comes back, fresh.
                cps[on] = None;
                cps[on] = Some(Cp::spawn(&env, &format!("cp-{on}"), ports[on])?);
                on = other;
            }
        }
        let (k, f) = (summary(&mut killed), summary(&mut frozen));
        println!(
            "Failover between two control planes given as two URLs (load {}):",
            loadavg()
        );
        println!(
            "| the one streamed from is | runs | until streaming from the other: p50 ms | max ms |"
        );
        println!("|---|---|---|---|");
        println!(
            "| killed (SIGKILL) | {} | {} | {} |",
            k["n"], k["p50"], k["max"]
        );
        println!(
            "| frozen (SIGSTOP: no reset, pings unanswered) | {} | {} | {} |",
            f["n"], f["p50"], f["max"]
        );
        agent.shutdown().await;
        Ok(())
    })
}
