//! Restarts and upgrades with no DNS gap (`switchyard_agent::handoff`):
//! real agent processes on one state directory, a steady load of DNS
//! queries on the stub's address, and the two orders a DaemonSet update
//! can take: the new agent started while the old one runs (surge), and
//! the old one sent SIGTERM with the new one started at once. Not one
//! query may go unanswered, and the last agent must follow the control
//! plane (a change made after the restarts reaches it).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use switchyard_integration_tests::restart::{AgentProcess, QueryLoop, agent_args, free_dns_port};
use switchyard_integration_tests::*;

const STEP: Duration = Duration::from_secs(30);

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_takes_over_with_no_query_lost_in_either_order() {
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10"]),
    );
    let cp = start_cp(cp_args(&env.manifests(), &env.state("cp"), None)).await;
    let dns: SocketAddr = ([127, 0, 0, 1], free_dns_port()).into();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let args = agent_args(
        cp.grpc_addr,
        "node-a",
        &env.state("node-a"),
        &admin.to_string(),
        dns,
    );
    let bin = Path::new(env!("CARGO_BIN_EXE_sy_agent"));
    let acked = |s: &switchyard_control_plane::status::StatusDocument| {
        s.agents
            .iter()
            .any(|a| a.node == "node-a" && a.connected && a.acked_version == s.version)
    };

    let mut a = blocking(|| {
        let mut a = AgentProcess::start(bin, &args);
        a.wait_for("agent started", STEP);
        a
    });
    cp_status_until(&cp, "the first agent to ACK", acked).await;
    let load = QueryLoop::start(
        dns,
        "web.shop.svc.cluster.local",
        500,
        Duration::from_secs(2),
    );

    // Surge: the new agent starts while the old one runs.
    let b = blocking(|| {
        let mut b = AgentProcess::start(bin, &args);
        b.wait_for(
            "took over from the agent running on this state directory",
            STEP,
        );
        b.wait_for("agent started", STEP);
        a.wait_for("the successor serves", STEP);
        a.terminate();
        assert!(a.wait().success(), "the old agent exits cleanly");
        b
    });

    // SIGTERM first, the new agent at once.
    let c = blocking(|| {
        b.terminate();
        let mut c = AgentProcess::start(bin, &args);
        c.wait_for(
            "took over from the agent running on this state directory",
            STEP,
        );
        c.wait_for("agent started", STEP);
        assert!(b.wait().success(), "the old agent exits cleanly");
        c
    });
    cp_status_until(&cp, "the last agent to follow the control plane", acked).await;
    env.write(
        "api.yaml",
        &service_yaml("shop", "api", 80, &["10.244.1.11"]),
    );
    cp_status_until(&cp, "the change to reach the last agent", |s| {
        s.resources == 2 && acked(s)
    })
    .await;
    let tally = blocking(|| load.finish());
    assert!(
        tally.sent >= 10,
        "queries ran across both handoffs: {tally:?}"
    );
    assert_eq!(tally.lost, 0, "every query answered: {tally:?}");
    assert_eq!(tally.answered, tally.sent, "{tally:?}");
    drop(c);
    cp.shutdown().await;
}
