//! Failover between control planes given as several `--control-plane`
//! URLs. The control planes are real processes (`sy_control_plane`): one
//! is killed (its connections reset at once), one is frozen with SIGSTOP
//! (its TCP connections stay up and nothing answers, as behind a
//! blackhole: only HTTP/2 pings tell).

use std::process::{Child, Command, Stdio};

use switchyard_integration_tests::*;

/// A control-plane process, killed (and reaped) when dropped, stopped or not.
struct CpProcess {
    child: Child,
    url: String,
}

impl CpProcess {
    fn spawn(env: &TestEnv, name: &str, port: u16) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_sy_control_plane"))
            .args(["--source"])
            .arg(format!("file:{}", env.manifests().display()))
            .arg("--state-dir")
            .arg(env.state(name))
            .args([
                "--grpc-listen",
                &format!("127.0.0.1:{port}"),
                "--admin-listen",
                "127.0.0.1:0",
                "--debounce",
                "20ms",
            ])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting sy_control_plane");
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig}");
    }
}

impl Drop for CpProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free on 127.0.0.1 now.
/// A free port that no other test of this file was given. The kernel may
/// hand a port just let go to the next bind to port 0, so two tests that
/// start together could get the same one: the second control plane then
/// fails to bind, its agent streams from the other test's control plane,
/// and that test killing it resets the stream (seen once in 7 Dec's suite:
/// "connection reset" where a ping timeout was expected).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn env() -> TestEnv {
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10"]),
    );
    env
}

/// Waits until the agent streams from `url` and holds a state from it.
async fn streaming_from(agent: &switchyard_agent::Agent, url: &str) {
    agent_status_until(agent, &format!("a stream from {url}"), |s| {
        s.connected && s.control_plane.as_deref() == Some(url) && s.version.is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_fails_over_between_two_control_planes_given_as_two_urls() {
    let env = env();
    let (port_a, port_b) = (free_port(), free_port());
    let a = CpProcess::spawn(&env, "cp-a", port_a);
    let b = CpProcess::spawn(&env, "cp-b", port_b);
    let urls = format!("{},{}", a.url, b.url);
    let agent = start_agent(
        agent_args("node-a", &urls, &env.state("agent")),
        Box::new(switchyard_agent::dataplane::NoneDataPlane::default()),
    )
    .await;
    streaming_from(&agent, &a.url).await;

    // A dies: its connections reset, and the agent moves to B at once.
    drop(a);
    streaming_from(&agent, &b.url).await;

    // A comes back; then B freezes: nothing resets, only the unanswered
    // HTTP/2 pings say so, and the agent moves back to A.
    let a = CpProcess::spawn(&env, "cp-a", port_a);
    b.signal("-STOP");
    streaming_from(&agent, &a.url).await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_that_stops_answering_is_named_as_such() {
    let env = env();
    let cp = CpProcess::spawn(&env, "cp", free_port());
    let agent = start_agent(
        agent_args("node-a", &cp.url, &env.state("agent")),
        Box::new(switchyard_agent::dataplane::NoneDataPlane::default()),
    )
    .await;
    streaming_from(&agent, &cp.url).await;
    cp.signal("-STOP");
    let failed = agent_status_until(&agent, "the stream to fail", |s| !s.connected).await;
    let error = failed.last_error.unwrap_or_default();
    assert!(error.contains("did not answer an HTTP/2 ping"), "{error}");
    assert!(
        !error.contains("TLS") && !error.contains("clear text"),
        "{error}"
    );
    agent.shutdown().await;
}
