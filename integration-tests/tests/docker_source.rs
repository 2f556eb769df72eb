//! The Docker source against the real engine, reached through a Unix-socket
//! relay the test can cut: a labelled container becomes an endpoint; with
//! the engine gone the last state is served and the source says why; when
//! it returns, a relist brings what changed meanwhile. Runs when
//! `SWITCHYARD_TESTBED=1` (a Docker engine and the testbed's base image;
//! `scripts/test.sh` sets it), skipped with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use switchyard_integration_tests::testbed::ENABLE;
use switchyard_integration_tests::*;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;

const ENGINE: &str = "/var/run/docker.sock";

/// Relays connections from a socket of the test's to the engine's, until dropped.
struct Relay {
    path: PathBuf,
    tasks: JoinSet<()>,
}

impl Relay {
    fn start(path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).expect("binding the relay socket");
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut engine) = UnixStream::connect(ENGINE).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
        });
        Self {
            path: path.to_owned(),
            tasks,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // Aborting the accept loop drops every relayed connection with it.
        self.tasks.abort_all();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes the test's containers and network, also on a panic.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &format!("{}-c", self.0)])
            .output();
        let _ = Command::new("docker")
            .args(["network", "rm", &self.0])
            .output();
    }
}

fn endpoints(agent: &switchyard_agent::Agent) -> usize {
    agent
        .state
        .borrow()
        .resources
        .get("default/default/dsrc")
        .map_or(0, |r| {
            r.state.slices.iter().map(|s| s.endpoints.len()).sum()
        })
}

async fn wait_endpoints(agent: &switchyard_agent::Agent, n: usize) {
    let mut rx = agent.state.clone();
    within(&format!("the agent to hold {n} endpoints of dsrc"), async {
        while endpoints(agent) != n {
            rx.changed().await.expect("agent running");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_goes_away_keeps_the_last_state_and_is_followed_again() {
    if std::env::var(ENABLE).as_deref() != Ok("1") {
        eprintln!("skipping: {ENABLE}=1 not set");
        return;
    }
    let env = TestEnv::new();
    let name = format!("sydsrc{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    docker(&["network", "create", &name]);
    let socket = env.dir.path().join("engine.sock");
    let relay = Relay::start(&socket);

    let mut args = env.cp_args();
    args.sources = vec![
        format!("docker:unix://{}", socket.display())
            .parse()
            .expect("a source"),
    ];
    let cp = start_cp(args).await;
    let url = format!("http://{}", cp.grpc_addr);
    let (agent, _) = start_recording_agent(agent_args("n1", &url, &env.state("n1"))).await;

    let image = std::env::var("SWITCHYARD_IMAGE").unwrap_or_else(|_| "switchyard:dev".into());
    let container = format!("{name}-c");
    docker(&[
        "run",
        "-d",
        "--init",
        "--name",
        &container,
        "--network",
        &name,
        "--label",
        "switchyard.io/service=dsrc",
        "--label",
        "switchyard.io/ports=80",
        &image,
        "sleep",
        "infinity",
    ]);
    wait_endpoints(&agent, 1).await;

    // The engine goes away: the source says so and nothing is withdrawn.
    drop(relay);
    let doc = cp_status_until(&cp, "the docker source's last_error", |d| {
        d.sources.iter().any(|s| s.last_error.is_some())
    })
    .await;
    let error = doc.sources[0].last_error.clone().unwrap_or_default();
    assert!(error.contains("Docker engine"), "{error}");
    assert_eq!(endpoints(&agent), 1, "the last state is served");

    // A change while it is away is found by the relist when it returns.
    docker(&["rm", "-f", &container]);
    let _relay = Relay::start(&socket);
    wait_endpoints(&agent, 0).await;
    cp_status_until(&cp, "last_error cleared", |d| {
        d.sources.iter().all(|s| s.last_error.is_none())
    })
    .await;
}
