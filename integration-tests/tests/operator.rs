//! What an operator sees: readiness that never empties a fleet by mistake,
//! warnings for ignored input, metrics a Prometheus parser reads, health
//! like kube-proxy's, one Service's view in `/status`, zones from Nodes.

use switchyard_integration_tests::*;

/// Control-plane arguments with several `--source` flags.
fn cp_args_with_sources(env: &TestEnv, sources: &[String]) -> switchyard_control_plane::Args {
    let mut argv: Vec<String> = vec!["switchyard-control-plane".into()];
    for s in sources {
        argv.extend(["--source".into(), s.clone()]);
    }
    argv.extend([
        "--state-dir".into(),
        env.state("cp").display().to_string(),
        "--debounce".into(),
        "20ms".into(),
    ]);
    <switchyard_control_plane::Args as clap::Parser>::parse_from(argv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_file_source_keeps_the_control_plane_not_ready_and_publishes_nothing() {
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.1"]),
    );
    let typo = env.dir.path().join("manifsts");
    let cp = start_cp(cp_args_with_sources(
        &env,
        &[
            format!("file:{}", env.manifests().display()),
            format!("file:{}", typo.display()),
        ],
    ))
    .await;
    let (agent, recorded) = start_recording_agent(agent_args(
        "node-a",
        &format!("http://{}", cp.grpc_addr),
        &env.state("agent"),
    ))
    .await;
    let doc = cp_status_until(&cp, "the missing path reported", |s| {
        s.sources.len() == 2 && s.sources[1].last_error.is_some()
    })
    .await;
    assert!(!doc.ready);
    assert!(!doc.sources[1].synced);
    let message = doc.sources[1].last_error.clone().expect("last_error");
    assert!(message.contains("manifsts"), "{message}");
    assert_eq!(get_text(cp.admin_addr, "/readyz").await.0, 503);
    let json = get_json(cp.admin_addr, "/status").await;
    assert_eq!(json["ready"], false);
    agent_status_until(&agent, "the agent to connect", |s| s.connected).await;

    // The path appears: the first snapshot any agent gets holds both sources.
    std::fs::create_dir(&typo).expect("mkdir");
    std::fs::write(
        typo.join("api.yaml"),
        service_yaml("shop", "api", 81, &["10.244.1.2"]),
    )
    .expect("write");
    cp_status_until(&cp, "ready", |s| s.ready).await;
    assert_eq!(get_text(cp.admin_addr, "/readyz").await.0, 200);
    let mut state = agent.state.clone();
    within(
        "the agent to apply both Services",
        state.wait_for(|s| s.resources.len() == 2),
    )
    .await
    .expect("state channel");
    let r = recorded.lock().expect("record").clone();
    assert_eq!(
        r.versions.len(),
        1,
        "no snapshot may be published before every source synced: {:?}",
        r.versions
    );
    agent.shutdown().await;
    cp.shutdown().await;
}
