//! The foundation end to end: a control plane reading real YAML files,
//! agents on real gRPC streams, state in real sled directories. Covered:
//! convergence, a file change, invalid objects, NACK without resend,
//! control-plane death, agent restart from disk, resume with differences
//! only, corrupt state, and mTLS identity.

use std::time::{Duration, Instant};

use switchyard_integration_tests::*;

type Env = TestEnv;

fn url(cp: &switchyard_control_plane::ControlPlane) -> String {
    format!("http://{}", cp.grpc_addr)
}

async fn current_version(cp: &switchyard_control_plane::ControlPlane) -> String {
    cp_status_until(cp, "a first snapshot", |s| s.version.is_some())
        .await
        .version
        .expect("version")
}

/// Waits for a snapshot version other than `old`.
async fn next_version(cp: &switchyard_control_plane::ControlPlane, old: &str) -> String {
    cp_status_until(cp, "a new snapshot version", |s| {
        s.version.as_deref().is_some_and(|v| v != old)
    })
    .await
    .version
    .expect("version")
}

async fn all_acked(cp: &switchyard_control_plane::ControlPlane, nodes: &[&str], version: &str) {
    cp_status_until(cp, &format!("{nodes:?} to ACK {version}"), |s| {
        nodes.iter().all(|n| {
            s.agents
                .iter()
                .any(|a| a.node == *n && a.connected && a.acked_version.as_deref() == Some(version))
        })
    })
    .await;
}

/// A control plane over the environment's manifests and one recording agent
/// (`node-a`, state in `a/`) that has applied the first snapshot.
async fn cp_with_agent(
    env: &Env,
) -> (
    switchyard_control_plane::ControlPlane,
    String,
    switchyard_agent::Agent,
    std::sync::Arc<std::sync::Mutex<switchyard_agent::dataplane::Recorded>>,
) {
    let cp = start_cp(env.cp_args()).await;
    let v1 = current_version(&cp).await;
    let (agent, rec) =
        start_recording_agent(agent_args("node-a", &url(&cp), &env.state("a"))).await;
    agent_at_version(&agent, &v1).await;
    (cp, v1, agent, rec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_converge_and_follow_a_file_change() {
    let env = Env::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10", "10.244.2.10"]),
    );
    env.write(
        "api.yaml",
        &service_yaml("shop", "api", 8080, &["10.244.1.11"]),
    );
    let cp = start_cp(env.cp_args()).await;
    let v1 = current_version(&cp).await;

    let mut agents = Vec::new();
    for node in ["node-a", "node-b", "node-c"] {
        agents.push(start_recording_agent(agent_args(node, &url(&cp), &env.state(node))).await);
    }
    all_acked(&cp, &["node-a", "node-b", "node-c"], &v1).await;
    for (agent, rec) in &agents {
        agent_at_version(agent, &v1).await;
        assert_eq!(agent.state.borrow().resources.len(), 2);
        assert_eq!(rec.lock().expect("lock").resources, 2);
    }

    // The admin endpoints show the same thing over HTTP.
    let status = get_json(cp.admin_addr, "/status").await;
    assert_eq!(status["version"], v1.as_str());
    assert_eq!(status["agents"].as_array().expect("agents").len(), 3);
    assert!(
        status["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .all(|a| a["connected"] == true
                && a["acked_version"] == v1.as_str()
                && a["last_error"].is_null())
    );
    assert_eq!(get_text(cp.admin_addr, "/readyz").await.0, 200);
    let agent_status = get_json(agents[0].0.admin_addr, "/status").await;
    assert_eq!(agent_status["node"], "node-a");
    assert_eq!(agent_status["version"], v1.as_str());
    assert_eq!(agent_status["origin"], "control-plane");
    assert_eq!(agent_status["connected"], true);

    // One endpoint added: every agent gets exactly that resource and ACKs.
    env.write(
        "web.yaml",
        &service_yaml(
            "shop",
            "web",
            80,
            &["10.244.1.10", "10.244.2.10", "10.244.3.10"],
        ),
    );
    let v2 = next_version(&cp, &v1).await;
    all_acked(&cp, &["node-a", "node-b", "node-c"], &v2).await;
    let web = "default/shop/web";
    for (agent, _) in &agents {
        agent_at_version(agent, &v2).await;
        let state = agent.state.borrow().clone();
        let endpoints: usize = state.resources[web]
            .state
            .slices
            .iter()
            .map(|s| s.endpoints.len())
            .sum();
        assert_eq!(endpoints, 3);
    }
    let status = cp.status.document();
    for a in &status.agents {
        assert_eq!(a.pushes, 2, "{}: one full update, one delta", a.node);
        assert_eq!(
            a.resources_sent, 3,
            "{}: two resources, then only the changed one",
            a.node
        );
    }
    let metrics = get_text(cp.admin_addr, "/metrics").await.1;
    assert!(
        metrics.contains("switchyard_control_plane_acks_total 6"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_document_is_skipped_and_reported() {
    let env = Env::new();
    env.write(
        "good.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10"]),
    );
    env.write(
        "bad.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  namespace: shop\n  name: broken\nspec:\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 999999\n  ports:\n  - port: 80\n",
    );
    let (cp, _v1, agent, _) = cp_with_agent(&env).await;
    let names: Vec<String> = agent.state.borrow().resources.keys().cloned().collect();
    assert_eq!(
        names,
        ["default/shop/web"],
        "the valid Service is served, the invalid one is not"
    );

    let status = get_json(cp.admin_addr, "/status").await;
    let invalid = status["invalid_objects"]
        .as_array()
        .expect("invalid_objects");
    assert_eq!(invalid.len(), 1, "{invalid:?}");
    assert_eq!(invalid[0]["object"], "Service shop/broken");
    assert_eq!(
        invalid[0]["field"],
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    );
    let metrics = get_text(cp.admin_addr, "/metrics").await.1;
    assert!(
        metrics.contains("switchyard_control_plane_invalid_objects 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_snapshot_is_nacked_shown_and_not_resent() {
    let env = Env::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10"]),
    );
    let cp = start_cp(env.cp_args()).await;
    let v1 = current_version(&cp).await;
    let picky = PickyDataPlane::default();
    let offered = picky.offered.clone();
    let agent = start_agent(
        agent_args("node-a", &url(&cp), &env.state("a")),
        Box::new(picky),
    )
    .await;
    agent_at_version(&agent, &v1).await;

    env.write(
        "reject.yaml",
        &service_yaml("shop", "reject-me", 81, &["10.244.1.12"]),
    );
    let v2 = next_version(&cp, &v1).await;
    let status = cp_status_until(&cp, "the NACK to show", |s| {
        s.agents
            .iter()
            .any(|a| a.nacked_version.as_deref() == Some(v2.as_str()))
    })
    .await;
    let a = &status.agents[0];
    assert_eq!(
        a.acked_version.as_deref(),
        Some(v1.as_str()),
        "last good version stays"
    );
    let err = a.last_error.as_deref().expect("error shown");
    assert!(err.contains("default/shop/reject-me"), "{err}");
    assert_eq!(a.pushes, 2);
    assert_eq!(
        agent.state.borrow().version,
        v1,
        "the agent keeps its last good state"
    );

    // The next change ends the parking: exactly one more update arrives,
    // carrying the new version; v2 was never offered again.
    env.write(
        "reject.yaml",
        &service_yaml("shop", "fine", 81, &["10.244.1.12"]),
    );
    let v3 = next_version(&cp, &v2).await;
    all_acked(&cp, &["node-a"], &v3).await;
    let offered = offered.lock().expect("lock").clone();
    assert_eq!(
        offered,
        vec![(v1.clone(), true), (v2.clone(), false), (v3.clone(), true)],
        "each version offered once"
    );
    let a = &cp.status.document().agents[0];
    assert_eq!(a.pushes, 3);
    assert!(a.last_error.is_none(), "an ACK clears the error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_death_and_agent_restart_keep_the_last_good_state() {
    let env = Env::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10"]),
    );
    env.write(
        "api.yaml",
        &service_yaml("shop", "api", 81, &["10.244.1.11"]),
    );
    let (cp, v1, agent, _) = cp_with_agent(&env).await;
    let cp_url = url(&cp);

    let mut st = agent.state.clone();
    st.mark_unchanged();
    cp.kill().await;
    // The stream breaks; the state in force does not change.
    agent_status_until(&agent, "the agent to notice the control plane died", |s| {
        !s.connected
    })
    .await;
    assert!(!st.has_changed().expect("open"), "state untouched");
    assert_eq!(
        agent.status.document().version.as_deref(),
        Some(v1.as_str())
    );

    // Restart the agent with the control plane still down: it serves from disk.
    agent.shutdown().await;
    let (agent, rec) = start_recording_agent(agent_args("node-a", &cp_url, &env.state("a"))).await;
    let doc = agent.status.document();
    assert_eq!(doc.version.as_deref(), Some(v1.as_str()));
    assert_eq!(doc.origin, switchyard_agent::status::Origin::Persisted);
    assert_eq!(doc.resources, 2);
    assert_eq!(
        rec.lock().expect("lock").versions,
        vec![v1.clone()],
        "applied before any connection"
    );
    let http = get_json(agent.admin_addr, "/status").await;
    assert_eq!(http["origin"], "persisted");
    assert_eq!(http["connected"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_control_plane_sends_only_the_differences() {
    let env = Env::new();
    for i in 0..5 {
        env.write(
            &format!("s{i}.yaml"),
            &service_yaml("shop", &format!("s{i}"), 80, &["10.244.1.10"]),
        );
    }
    let cp = start_cp(env.cp_args()).await;
    let v1 = current_version(&cp).await;
    let grpc = cp.grpc_addr;
    let nodes = ["node-a", "node-b"];
    let mut agents = Vec::new();
    for n in nodes {
        agents.push(start_recording_agent(agent_args(n, &url(&cp), &env.state(n))).await);
    }
    all_acked(&cp, &nodes, &v1).await;
    cp.kill().await;

    // While it is down, one Service changes.
    env.write(
        "s3.yaml",
        &service_yaml("shop", "s3", 80, &["10.244.1.10", "10.244.2.10"]),
    );
    let cp = start_cp_on(env.cp_args(), &grpc.to_string()).await;
    let v2 = current_version(&cp).await;
    assert_ne!(v1, v2, "versions are unique across restarts");
    all_acked(&cp, &nodes, &v2).await;
    for a in cp.status.document().agents {
        assert_eq!(a.pushes, 1, "{}", a.node);
        assert_eq!(
            a.resources_sent, 1,
            "{}: only the changed Service is sent",
            a.node
        );
    }
    for (agent, _) in &agents {
        agent_at_version(agent, &v2).await;
        assert_eq!(agent.state.borrow().resources.len(), 5);
    }
}

/// Opens the agent's sled files once the agent that just shut down has
/// released them: sled's file lock goes with its flusher thread, a moment
/// after the last handle (the agent's store waits the same way).
fn open_sled(path: &std::path::Path) -> sled::Db {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(sled::Error::Io(e)) if e.to_string().contains("lock") => {
                assert!(
                    Instant::now() < deadline,
                    "{}: sled's lock still held 10 s after the agent shut down: {e}",
                    path.display()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("open sled {}: {e}", path.display()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_state_is_discarded_and_resynced() {
    let env = Env::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10"]),
    );
    let (cp, v1, agent, _) = cp_with_agent(&env).await;
    let dir = env.state("a");
    agent.shutdown().await;

    // Flip a byte inside the stored resource, through sled itself.
    {
        let db = open_sled(&dir.join("state.sled"));
        let tree = db.open_tree("resources").expect("tree");
        let (k, v) = tree.iter().next().expect("one entry").expect("read");
        let mut v = v.to_vec();
        let last = v.len() - 1;
        v[last] ^= 0xff;
        tree.insert(k, v).expect("write");
        db.flush().expect("flush");
    }
    let (agent, _) = start_recording_agent(agent_args("node-a", &url(&cp), &dir)).await;
    let doc = agent.status.document();
    let why = doc.discarded_state.expect("discard reported");
    assert!(why.contains("checksum mismatch"), "{why}");
    agent_at_version(&agent, &v1).await;
    // The state is published before the status says where it came from:
    // wait for the status, which changes with its generation.
    let mut status = agent.status.subscribe();
    within(
        "the status to say the state came from the control plane",
        status.wait_for(|_| {
            agent.status.document().origin == switchyard_agent::status::Origin::ControlPlane
        }),
    )
    .await
    .expect("status channel open");
    agent.shutdown().await;

    // Garbage where sled's files are: moved aside, full resync, no crash.
    let db_dir = dir.join("state.sled");
    for entry in std::fs::read_dir(&db_dir).expect("db dir") {
        let p = entry.expect("entry").path();
        if p.is_file() {
            std::fs::write(&p, b"this is not a sled database").expect("overwrite");
        }
    }
    let (agent, _) = start_recording_agent(agent_args("node-a", &url(&cp), &dir)).await;
    assert!(
        agent.status.document().discarded_state.is_some(),
        "damage reported"
    );
    agent_at_version(&agent, &v1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_binds_the_node_name_to_the_certificate() {
    let env = Env::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.10"]),
    );
    let ca = certs::TestCa::new(env.dir.path());
    let (cert, key) = ca.server();
    let tls = ServerTls {
        cert,
        key,
        client_ca: Some(ca.ca_pem.clone()),
    };
    let cp = start_cp(cp_args(&env.manifests(), &env.state("cp"), Some(&tls))).await;
    let v1 = current_version(&cp).await;
    let https = format!("https://localhost:{}", cp.grpc_addr.port());

    let tls_agent_args = |node: &str, cert_node: &str| {
        let (c, k) = ca.client(cert_node);
        let mut a = agent_args(node, &https, &env.state(&format!("{node}-{cert_node}")));
        a.tls_ca = Some(ca.ca_pem.clone());
        a.tls_cert = Some(c);
        a.tls_key = Some(k);
        a
    };

    // The right certificate: served.
    let (good, _) = start_recording_agent(tls_agent_args("node-a", "node-a")).await;
    agent_at_version(&good, &v1).await;

    // A certificate for node-a used by an agent claiming node-b: refused.
    let (bad, _) = start_recording_agent(tls_agent_args("node-b", "node-a")).await;
    let mut rx = bad.state.clone();
    rx.mark_unchanged();
    let err = agent_status_until(&bad, "the refusal to be reported", |s| {
        s.last_error.is_some()
    })
    .await
    .last_error
    .expect("error");
    assert!(
        err.contains("PermissionDenied") || err.contains("permission"),
        "{err}"
    );
    assert!(
        err.contains("does not match the client certificate"),
        "{err}"
    );
    assert!(!rx.has_changed().expect("open"), "nothing was applied");
    assert!(
        cp.status
            .document()
            .agents
            .iter()
            .all(|a| a.node != "node-b")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_state_arrives_in_parts_and_is_applied_once() {
    let env = Env::new();
    let docs: Vec<String> = (0..400)
        .map(|i| {
            service_yaml(
                "bulk",
                &format!("svc-{i}"),
                80,
                &["10.244.1.10", "10.244.2.10"],
            )
        })
        .collect();
    env.write("bulk.yaml", &docs.join("---\n"));
    let (cp, v1, agent, rec) = cp_with_agent(&env).await;
    all_acked(&cp, &["node-a"], &v1).await;
    assert_eq!(agent.state.borrow().resources.len(), 400);
    let doc = agent.status.document();
    assert_eq!(doc.updates, 1, "the parts make one update");
    assert_eq!(
        rec.lock().expect("lock").versions,
        vec![v1.clone()],
        "applied once"
    );
    let a = &cp.status.document().agents[0];
    assert_eq!((a.pushes, a.resources_sent), (1, 400));
    // More than one message went over the wire.
    let payload: usize = agent
        .state
        .borrow()
        .resources
        .values()
        .map(|r| switchyard_proto::convert::encode_state_bytes(&r.state).len())
        .sum();
    assert!(
        payload > 2 * switchyard_control_plane::server::MAX_PART_BYTES,
        "the state ({payload} bytes) must need several parts for this test to mean anything"
    );
}
