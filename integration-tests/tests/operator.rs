//! What an operator sees: readiness that never empties a fleet by mistake,
//! warnings for ignored input, metrics a Prometheus parser reads, health
//! like kube-proxy's, one Service's view in `/status`, zones from Nodes.

use switchyard_integration_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_file_source_keeps_the_control_plane_not_ready_and_publishes_nothing() {
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.1"]),
    );
    env.write(
        "typo.yaml",
        "apiVersion: v1\nkind: Servce\nmetadata: {name: x}\n",
    );
    let typo = env.dir.path().join("manifsts");
    let cp = start_cp(env.cp_args_with_sources(&[
        format!("file:{}", env.manifests().display()),
        format!("file:{}", typo.display()),
    ]))
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
    // The agent's stream waits for a snapshot (the control plane reads no
    // Hello before it has one): nothing has been served to it.
    let waiting = agent_status_until(&agent, "the agent's status", |_| true).await;
    assert_eq!(waiting.version, None, "nothing served while not ready");

    // The path appears: the first snapshot any agent gets holds both sources.
    std::fs::create_dir(&typo).expect("mkdir");
    std::fs::write(
        typo.join("api.yaml"),
        service_yaml("shop", "api", 81, &["10.244.1.2"]),
    )
    .expect("write");
    cp_status_until(&cp, "ready", |s| s.ready).await;
    assert_eq!(get_text(cp.admin_addr, "/readyz").await.0, 200);
    // Ignored input is a warning in /status, with the file and document.
    let json = get_json(cp.admin_addr, "/status").await;
    let warning = &json["sources"][0]["warnings"][0];
    assert!(
        warning["object"]
            .as_str()
            .is_some_and(|o| o.ends_with("typo.yaml#1")),
        "{json}"
    );
    assert!(
        warning["message"]
            .as_str()
            .is_some_and(|m| m.contains("did you mean Service"))
    );
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

/// What Prometheus sends when it scrapes (2.x and 3.x ask for OpenMetrics first).
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0;q=0.5,\
application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.1";

/// GETs `/metrics` with `accept`; returns the content type and the body.
async fn scrape(addr: std::net::SocketAddr, accept: Option<&str>) -> (String, String) {
    let client = reqwest::Client::new();
    let mut req = client.get(format!("http://{addr}/metrics"));
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let r = req.send().await.expect("metrics endpoint answers");
    assert_eq!(r.status().as_u16(), 200);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (ct, r.text().await.expect("body"))
}

/// Parses a Prometheus text 0.0.4 body strictly: every line is a comment or
/// a sample the parser reads, and every family has a type.
fn parse_text_format(body: &str) -> prometheus_parse::Scrape {
    use prometheus_parse::{LineInfo, Scrape, Value};
    for line in body.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        assert!(
            !matches!(LineInfo::parse(line), LineInfo::Ignored),
            "a line a Prometheus parser cannot read: {line:?}"
        );
    }
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let histograms: Vec<&str> = scrape
        .samples
        .iter()
        .filter(|s| matches!(s.value, Value::Histogram(_)))
        .map(|s| s.metric.as_str())
        .collect();
    for s in &scrape.samples {
        // The parser hands a histogram's _sum and _count over untyped.
        let of_histogram = ["_sum", "_count"].iter().any(|suffix| {
            s.metric
                .strip_suffix(suffix)
                .is_some_and(|base| histograms.contains(&base))
        });
        assert!(
            of_histogram || !matches!(s.value, Value::Untyped(_)),
            "{} lost its type in the text format",
            s.metric
        );
    }
    scrape
}

fn value_of<'a>(scrape: &'a prometheus_parse::Scrape, metric: &str) -> &'a prometheus_parse::Value {
    &scrape
        .samples
        .iter()
        .find(|s| s.metric == metric)
        .unwrap_or_else(|| panic!("no {metric} in the scrape"))
        .value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_the_content_type_of_their_body_and_parse_as_prometheus_text() {
    use prometheus_parse::Value;
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.1"]),
    );
    let cp = start_cp(env.cp_args()).await;
    let (agent, _) = start_recording_agent(agent_args(
        "node-a",
        &format!("http://{}", cp.grpc_addr),
        &env.state("agent"),
    ))
    .await;
    agent_status_until(&agent, "the first update", |s| s.version.is_some()).await;
    cp_status_until(&cp, "the ACK", |s| {
        s.agents.iter().any(|a| a.acked_version.is_some())
    })
    .await;

    for (addr, counter, histogram) in [
        (
            cp.admin_addr,
            "switchyard_control_plane_acks_total",
            "switchyard_control_plane_snapshot_build_seconds",
        ),
        (
            agent.admin_addr,
            "switchyard_agent_updates_total",
            "switchyard_agent_apply_seconds",
        ),
    ] {
        // A plain scrape (curl, a 0.0.4 parser): the text format, typed.
        let (ct, body) = scrape(addr, None).await;
        assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
        assert!(!body.contains("# EOF"), "OpenMetrics in a text/plain body");
        let parsed = parse_text_format(&body);
        assert!(
            matches!(value_of(&parsed, counter), Value::Counter(v) if *v >= 1.0),
            "{counter}: {:?}",
            value_of(&parsed, counter)
        );
        assert!(
            matches!(value_of(&parsed, histogram), Value::Histogram(b) if !b.is_empty()),
            "{histogram}"
        );

        // Prometheus asks for OpenMetrics first: it gets OpenMetrics, labelled so.
        let (ct, body) = scrape(addr, Some(PROMETHEUS_ACCEPT)).await;
        assert_eq!(
            ct,
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert!(
            body.ends_with("# EOF\n"),
            "an OpenMetrics body ends with # EOF"
        );
        let family = counter.strip_suffix("_total").expect("a counter");
        assert!(
            body.contains(&format!("# TYPE {family} counter\n")),
            "OpenMetrics types the family without _total"
        );
    }
    agent.shutdown().await;
    cp.shutdown().await;
}

/// A data plane that records the zones it is given.
#[derive(Debug, Default, Clone)]
struct ZoneDataPlane {
    zones: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
    full_applies: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl switchyard_agent::dataplane::DataPlane for ZoneDataPlane {
    fn name(&self) -> &'static str {
        "zones"
    }

    fn apply(
        &mut self,
        change: &switchyard_agent::dataplane::Change<'_>,
    ) -> Result<(), switchyard_agent::dataplane::ApplyError> {
        if change.full {
            self.full_applies
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }

    fn set_zone(&mut self, zone: Option<String>) {
        self.zones.lock().expect("zones").push(zone);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_learn_their_zone_from_their_node_and_zone_overrides_it() {
    use switchyard_integration_tests::apiserver::{FakeApiServer, Kind, ServerConfig, Store};
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::default();
    for (node, zone) in [("node-a", "zone-1"), ("node-b", "zone-2")] {
        store
            .create(
                Kind::Node,
                serde_json::json!({"apiVersion": "v1", "kind": "Node",
                    "metadata": {"name": node, "labels": {"topology.kubernetes.io/zone": zone}}}),
            )
            .expect("node");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = FakeApiServer::start_with(listener, store, ServerConfig::default()).expect("api");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let cp = start_cp(kube_cp_args(&kubeconfig, &dir.path().join("cp"), &[])).await;
    let url = format!("http://{}", cp.grpc_addr);

    // No --zone: the agent takes its Node's label and reprograms in full.
    let dp = ZoneDataPlane::default();
    let a = start_agent(
        agent_args("node-a", &url, &dir.path().join("a")),
        Box::new(dp.clone()),
    )
    .await;
    let status = agent_status_until(&a, "the zone learnt and applied", |s| {
        s.zone.is_some() && s.version.is_some()
    })
    .await;
    assert_eq!(status.zone.as_deref(), Some("zone-1"));
    assert_eq!(
        *dp.zones.lock().expect("zones"),
        [Some("zone-1".to_owned())]
    );
    assert!(dp.full_applies.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let doc = cp_status_until(&cp, "node-a listed", |s| {
        s.agents.iter().any(|x| x.node == "node-a")
    })
    .await;
    let shown = doc
        .agents
        .iter()
        .find(|x| x.node == "node-a")
        .expect("node-a");
    assert_eq!(shown.zone, "zone-1");

    // --zone wins over the label.
    let mut args = agent_args("node-b", &url, &dir.path().join("b"));
    args.zone = Some("rack-7".into());
    let dp_b = ZoneDataPlane::default();
    let b = start_agent(args, Box::new(dp_b.clone())).await;
    let status = agent_status_until(&b, "node-b's first update", |s| s.version.is_some()).await;
    assert_eq!(status.zone.as_deref(), Some("rack-7"));
    assert!(
        dp_b.zones.lock().expect("zones").is_empty(),
        "--zone is not overridden"
    );
    a.shutdown().await;
    b.shutdown().await;
    cp.shutdown().await;
}

/// A data plane whose applies wait for a go-ahead, to hold a sync pending.
#[derive(Debug, Clone)]
struct GatedDataPlane {
    entered: std::sync::mpsc::SyncSender<()>,
    proceed: std::sync::Arc<std::sync::Mutex<std::sync::mpsc::Receiver<()>>>,
}

impl switchyard_agent::dataplane::DataPlane for GatedDataPlane {
    fn name(&self) -> &'static str {
        "gated"
    }

    fn apply(
        &mut self,
        _change: &switchyard_agent::dataplane::Change<'_>,
    ) -> Result<(), switchyard_agent::dataplane::ApplyError> {
        let _ = self.entered.try_send(());
        let _ = self
            .proceed
            .lock()
            .expect("gate")
            .recv_timeout(std::time::Duration::from_secs(30));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_a_change_waits_past_twice_the_sync_period_and_readyz_follows_the_first_sync()
 {
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.1"]),
    );
    let cp = start_cp(env.cp_args()).await;
    let (entered_tx, entered_rx) = std::sync::mpsc::sync_channel(4);
    let (proceed_tx, proceed_rx) = std::sync::mpsc::channel();
    let dp = GatedDataPlane {
        entered: entered_tx,
        proceed: std::sync::Arc::new(std::sync::Mutex::new(proceed_rx)),
    };
    let mut args = agent_args(
        "node-a",
        &format!("http://{}", cp.grpc_addr),
        &env.state("a"),
    );
    // Health timeout: twice this.
    args.iptables_sync_period = std::time::Duration::from_millis(150);
    let agent = start_agent(args, Box::new(dp)).await;
    let (code, body) = get_text(agent.admin_addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");

    // The first update reaches the data plane, which holds it.
    let entered = tokio::task::spawn_blocking(move || {
        entered_rx.recv_timeout(WAIT).is_ok().then_some(entered_rx)
    });
    let entered_rx = entered.await.expect("join").expect("the apply starts");
    assert_eq!(
        get_text(agent.admin_addr, "/healthz").await.0,
        200,
        "not yet late"
    );
    // Let the health timeout (300 ms) pass: the deadline itself is what is tested.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let (code, body) = get_text(agent.admin_addr, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("twice --iptables-sync-period"), "{body}");
    let status = get_json(agent.admin_addr, "/status").await;
    assert_eq!(status["sync"]["healthy"], false);
    assert!(
        status["sync"]["pending_seconds"]
            .as_f64()
            .unwrap_or_default()
            > 0.3
    );

    // The sync completes: healthy and ready.
    proceed_tx.send(()).expect("release");
    agent_status_until(&agent, "the update in force", |s| s.version.is_some()).await;
    assert_eq!(get_text(agent.admin_addr, "/healthz").await.0, 200);
    assert_eq!(get_text(agent.admin_addr, "/readyz").await.0, 200);
    drop(entered_rx);
    drop(proceed_tx);
    agent.shutdown().await;
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_one_service_on_both_sides_and_metrics_get_their_own_listener() {
    let env = TestEnv::new();
    env.write(
        "web.yaml",
        &service_yaml("shop", "web", 80, &["10.244.1.1", "10.244.1.2"]),
    );
    let cp = start_cp(env.cp_args()).await;
    let mut args = agent_args(
        "node-a",
        &format!("http://{}", cp.grpc_addr),
        &env.state("a"),
    );
    args.metrics_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let (agent, _) = start_recording_agent(args).await;
    agent_status_until(&agent, "the first update", |s| s.resources == 1).await;

    for addr in [cp.admin_addr, agent.admin_addr] {
        let (code, index) = get_text(addr, "/").await;
        assert_eq!(code, 200);
        for path in ["/healthz", "/readyz", "/metrics", "/status?service="] {
            assert!(
                index.contains(path),
                "{addr}: / does not list {path}: {index}"
            );
        }
        let view = get_json(addr, "/status?service=shop/web").await;
        assert_eq!(view["name"], "shop/web", "{addr}: {view}");
        assert_eq!(
            view["cluster_ips"].as_array().map(Vec::len),
            Some(1),
            "{view}"
        );
        let endpoints = view["slices"][0]["endpoints"]
            .as_array()
            .expect("endpoints");
        assert_eq!(endpoints.len(), 2, "{view}");
        assert_eq!(endpoints[0]["ready"], true);
        assert_eq!(
            reqwest::get(format!("http://{addr}/status?service=shop/nope"))
                .await
                .expect("answers")
                .status()
                .as_u16(),
            404
        );
    }
    // The agent adds what its data plane did with it; `none` records.
    let view = get_json(agent.admin_addr, "/status?service=shop/web").await;
    assert!(
        view["programmed"]["recorded"]["resource_version"].is_string(),
        "{view}"
    );
    let status = get_json(agent.admin_addr, "/status").await;
    assert!(
        status["dataplane_record"]["applies"].as_u64() >= Some(1),
        "{status}"
    );

    // Metrics on their own address; status is not there.
    let metrics_addr = agent.metrics_addr.expect("--metrics-listen bound");
    let (code, body) = get_text(metrics_addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds"));
    assert_eq!(get_text(metrics_addr, "/status").await.0, 404);
    // kube-proxy's /proxyMode beside the metrics, as on its port 10249.
    assert_eq!(
        get_text(metrics_addr, "/proxyMode").await,
        (200, "none".to_owned())
    );
    agent.shutdown().await;
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kube_watch_error_clears_when_the_watch_recovers_and_names_the_api_server_once() {
    use switchyard_integration_tests::apiserver::{
        FakeApiServer, Fault, Kind, ServerConfig, Store,
    };
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::default();
    store
        .create(
            Kind::Service,
            serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"namespace": "shop", "name": "web"},
                "spec": {"ports": [{"port": 80}]}}),
        )
        .expect("service");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let api = FakeApiServer::start_with(listener, store, ServerConfig::default()).expect("api");
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let cp = start_cp(kube_cp_args(&kubeconfig, &dir.path().join("cp"), &[])).await;
    cp_status_until(&cp, "ready", |s| s.ready && s.resources == 1).await;
    let lists = api.requests("LIST services");

    // The next request for Services fails once; the watch is cut, so the
    // watcher's re-watch is that request.
    api.fail_next(Fault {
        method: None,
        contains: "/api/v1/services?".into(),
        code: 500,
        times: 1,
    });
    api.drop_watches();
    let doc = cp_status_until(&cp, "the watch error shown", |s| {
        s.sources[0].last_error.is_some()
    })
    .await;
    let message = doc.sources[0].last_error.clone().expect("error");
    assert_eq!(
        message.matches(&api.url()).count(),
        1,
        "the API server's URL, once: {message}"
    );
    assert!(message.starts_with("services from "), "{message}");

    // The watcher retries and the watch resumes; nothing changed in the
    // cluster, yet the error goes away.
    cp_status_until(&cp, "the error to clear", |s| {
        s.sources[0].last_error.is_none()
    })
    .await;
    assert_eq!(
        api.requests("LIST services"),
        lists,
        "resumed, not relisted"
    );
    cp.shutdown().await;
}
