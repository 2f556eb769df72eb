//! The `kube` source against the API server stand-in: the control plane
//! talks to it through the unmodified kube client, configured only by a
//! kubeconfig pointing at `http://127.0.0.1:PORT`. Covered: a paged
//! initial list, create/update/delete, a 410 after compaction with no flap,
//! a dropped watch resumed without relist, the stand-in restarted, 5,000
//! Services in one namespace, an invalid object skipped and reported,
//! namespace and label filters, an event storm coalesced, and readiness
//! waiting for the API server.

use serde_json::{Value, json};
use switchyard_control_plane::ControlPlane;
use switchyard_integration_tests::apiserver::{
    self, FakeApiServer, Fault, Kind, ServerConfig, Store,
};
use switchyard_integration_tests::*;
use tokio::net::TcpListener;

fn service(ns: &str, name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": ns, "name": name, "labels": {"app": name}},
        "spec": {"ports": [{"name": "http", "port": port, "targetPort": 8080}]},
    })
}

fn slice(ns: &str, service: &str, name: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": ns, "name": name,
                     "labels": {"kubernetes.io/service-name": service, "app": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn node(name: &str, zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}})
}

/// Adds `n` Services `svc-i` with one slice of one endpoint each.
fn populate(store: &Store, ns: &str, n: usize) {
    for i in 0..n {
        let name = format!("svc-{i}");
        store
            .create(Kind::Service, service(ns, &name, 80))
            .expect("create service");
        let ip = format!("10.244.{}.{}", i / 250, i % 250 + 1);
        store
            .create(
                Kind::EndpointSlice,
                slice(ns, &name, &format!("{name}-a"), &[&ip]),
            )
            .expect("create slice");
    }
}

fn key(ns: &str, name: &str) -> (Kind, String, String) {
    (Kind::Service, ns.to_owned(), name.to_owned())
}

/// Rewrites the endpoints of slice `name` in `ns`.
fn set_endpoints(store: &Store, ns: &str, service: &str, name: &str, ips: &[&str]) {
    store
        .update(Kind::EndpointSlice, slice(ns, service, name, ips))
        .expect("update slice");
}

struct Env {
    dir: tempfile::TempDir,
    api: FakeApiServer,
}

impl Env {
    async fn new() -> Self {
        Self::with_store(Store::default()).await
    }

    async fn with_store(store: Store) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let api = FakeApiServer::start_with(listener, store, ServerConfig::default())
            .expect("stand-in starts");
        api.write_kubeconfig(&dir.path().join("kubeconfig"))
            .expect("kubeconfig");
        Self { dir, api }
    }

    fn store(&self) -> &Store {
        self.api.store()
    }

    async fn control_plane(&self, extra: &[&str]) -> ControlPlane {
        start_cp(kube_cp_args(
            &self.dir.path().join("kubeconfig"),
            &self.dir.path().join("cp"),
            extra,
        ))
        .await
    }

    async fn history_agent(
        &self,
        node: &str,
        cp: &ControlPlane,
    ) -> (switchyard_agent::Agent, HistoryDataPlane) {
        let dp = HistoryDataPlane::default();
        let args = agent_args(
            node,
            &format!("http://{}", cp.grpc_addr),
            &self.dir.path().join(node),
        );
        (start_agent(args, Box::new(dp.clone())).await, dp)
    }
}

fn name(ns: &str, svc: &str) -> String {
    format!("default/{ns}/{svc}")
}

/// Waits until the agent's state satisfies `pred`.
async fn agent_until(
    agent: &switchyard_agent::Agent,
    what: &str,
    mut pred: impl FnMut(&switchyard_agent::state::AgentState) -> bool,
) {
    let mut rx = agent.state.clone();
    within(what, rx.wait_for(|s| pred(s)))
        .await
        .expect("agent state channel open");
}

fn endpoints(agent: &switchyard_agent::Agent, ns: &str, svc: &str) -> Vec<String> {
    let state = agent.state.borrow();
    let Some(r) = state.resources.get(&name(ns, svc)) else {
        return Vec::new();
    };
    let mut ips: Vec<String> = r
        .state
        .slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .flat_map(|e| e.addresses.iter().map(ToString::to_string))
        .collect();
    ips.sort();
    ips
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_initial_list_then_create_update_delete_reach_the_agents() {
    let env = Env::new().await;
    // 1,200 Services: the watcher lists 500 per page, so three pages a kind.
    populate(env.store(), "shop", 1200);
    // Two slices of one Service merge; an FQDN slice is ignored.
    env.store()
        .create(
            Kind::EndpointSlice,
            slice("shop", "svc-0", "svc-0-b", &["10.250.0.1"]),
        )
        .expect("second slice");
    let mut fqdn = slice("shop", "svc-0", "svc-0-fqdn", &[]);
    fqdn["addressType"] = json!("FQDN");
    fqdn["endpoints"] = json!([{"addresses": ["db.example.com"]}]);
    env.store()
        .create(Kind::EndpointSlice, fqdn)
        .expect("FQDN slice");
    for (n, z) in [("node-a", "eu-1a"), ("node-b", "eu-1b")] {
        env.store().create(Kind::Node, node(n, z)).expect("node");
    }

    let cp = env.control_plane(&[]).await;
    let status = cp_status_until(&cp, "the first snapshot", |s| s.ready).await;
    assert_eq!(status.resources, 1200);
    assert!(
        status.invalid_objects.is_empty(),
        "{:?}",
        status.invalid_objects
    );
    assert!(env.api.requests("LIST services") >= 3, "paged list");
    assert!(env.api.requests("LIST endpointslices") >= 3, "paged list");
    assert_eq!(get_text(cp.admin_addr, "/readyz").await.0, 200);
    let doc = get_json(cp.admin_addr, "/status").await;
    let source = &doc["sources"][0];
    assert_eq!(source["name"], "kube");
    assert_eq!(source["synced"], true);
    assert_eq!(
        source["nodes"],
        json!([{"name": "node-a", "zone": "eu-1a"}, {"name": "node-b", "zone": "eu-1b"}])
    );

    let (a, _) = env.history_agent("node-a", &cp).await;
    let (b, _) = env.history_agent("node-b", &cp).await;
    for agent in [&a, &b] {
        agent_until(agent, "1,200 services", |s| s.resources.len() == 1200).await;
    }
    assert_eq!(endpoints(&a, "shop", "svc-0"), ["10.244.0.1", "10.250.0.1"]);

    // Create.
    env.store()
        .create(Kind::Service, service("shop", "new", 81))
        .expect("create");
    env.store()
        .create(
            Kind::EndpointSlice,
            slice("shop", "new", "new-a", &["10.251.0.1"]),
        )
        .expect("create slice");
    for agent in [&a, &b] {
        agent_until(agent, "the new service", |s| {
            s.resources.contains_key(&name("shop", "new"))
        })
        .await;
    }
    // Update.
    set_endpoints(
        env.store(),
        "shop",
        "svc-7",
        "svc-7-a",
        &["10.252.0.7", "10.252.0.8"],
    );
    for agent in [&a, &b] {
        agent_until(agent, "svc-7's new endpoints", |s| {
            s.resources[&name("shop", "svc-7")]
                .state
                .slices
                .iter()
                .map(|sl| sl.endpoints.len())
                .sum::<usize>()
                == 2
        })
        .await;
    }
    assert_eq!(endpoints(&b, "shop", "svc-7"), ["10.252.0.7", "10.252.0.8"]);
    // Delete.
    env.store().delete(&key("shop", "svc-9")).expect("delete");
    for agent in [&a, &b] {
        agent_until(agent, "svc-9 gone", |s| {
            !s.resources.contains_key(&name("shop", "svc-9"))
        })
        .await;
    }
    // A node's zone change shows in /status.
    env.store()
        .update(Kind::Node, node("node-b", "eu-1c"))
        .expect("node update");
    cp_status_until(&cp, "node-b's new zone", |s| {
        s.sources[0]
            .nodes
            .iter()
            .any(|n| n.name == "node-b" && n.zone.as_deref() == Some("eu-1c"))
    })
    .await;
    // Everything came through watches: one list of each kind.
    assert!(env.api.requests("LIST services") <= 4);
}

/// KEP-3836: the agent's kube-proxy health server fails `/healthz` while
/// its Node carries the cluster autoscaler's taint, and `/livez` does not;
/// the Node's facts reach an agent that is up to date on their own (an
/// update without resources), and its zone the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_fails_kube_proxys_healthz_and_node_facts_reach_the_agent() {
    let env = Env::new().await;
    populate(env.store(), "shop", 3);
    env.store()
        .create(Kind::Node, node("node-a", "eu-1a"))
        .expect("node");
    let cp = env.control_plane(&[]).await;
    let mut args = agent_args(
        "node-a",
        &format!("http://{}", cp.grpc_addr),
        &env.dir.path().join("node-a"),
    );
    args.healthz_bind_address = Some(switchyard_agent::config::HealthzBind::At(
        "127.0.0.1:0".parse().expect("addr"),
    ));
    let (agent, _) = start_recording_agent(args).await;
    agent_status_until(&agent, "the zone and the services", |s| {
        s.resources == 3 && s.zone.as_deref() == Some("eu-1a")
    })
    .await;
    let health = agent.healthz_addr.expect("the health server listens");
    let (code, body) = get_text(health, "/healthz").await;
    assert_eq!(code, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(doc["nodeEligible"], true, "{doc}");
    assert!(doc["lastUpdated"].is_string() && doc["currentTime"].is_string());
    let version = agent.status.document().version;

    let mut tainted = node("node-a", "eu-1b");
    tainted["spec"] = json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler",
                                         "value": "1765047600", "effect": "NoSchedule"}]});
    env.store().update(Kind::Node, tainted).expect("taint");
    let status =
        agent_status_until(&agent, "the Node to drain", |s| s.node_draining.is_some()).await;
    assert_eq!(
        status.node_draining.as_deref(),
        Some("ToBeDeletedByClusterAutoscaler")
    );
    let status = agent_status_until(&agent, "the new zone", |s| {
        s.zone.as_deref() == Some("eu-1b")
    })
    .await;
    assert_eq!(status.version, version, "no Service changed");
    let (code, body) = get_text(health, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    let doc: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(doc["nodeEligible"], false, "{doc}");
    let (code, body) = get_text(health, "/livez").await;
    assert_eq!(code, 200, "/livez leaves the Node out: {body}");

    env.store()
        .update(Kind::Node, node("node-a", "eu-1b"))
        .expect("untaint");
    agent_status_until(&agent, "the Node back", |s| s.node_draining.is_none()).await;
    assert_eq!(get_text(health, "/healthz").await.0, 200);
    agent.shutdown().await;
    cp.shutdown().await;
}

fn kube_dns_configmap(
    stub: &[(&str, std::net::SocketAddr)],
    upstreams: &[std::net::SocketAddr],
) -> Value {
    let stub: serde_json::Map<String, Value> = stub
        .iter()
        .map(|(z, a)| ((*z).to_owned(), json!([a.to_string()])))
        .collect();
    let upstreams: Vec<String> = upstreams.iter().map(ToString::to_string).collect();
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"namespace": "kube-system", "name": "kube-dns"},
           "data": {"stubDomains": Value::Object(stub).to_string(),
                    "upstreamNameservers": json!(upstreams).to_string()}})
}

/// The kube-dns ConfigMap's `stubDomains` and `upstreamNameservers` reach
/// the agents' stubs through the control plane: names in a stub domain go
/// to its server, others to the upstream nameservers instead of the
/// agent's own; `--dns-forward` and `--dns-upstream` still win; an edit of
/// the ConfigMap moves the routes, with no Service changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kube_dns_configmap_routes_the_agents_dns() {
    use std::net::Ipv4Addr;
    use switchyard_agent::config::DnsListen;
    use switchyard_integration_tests::dns::{FakeUpstream, dig};
    let env = Env::new().await;
    populate(env.store(), "shop", 1);
    let corp = FakeUpstream::start(Ipv4Addr::new(192, 0, 2, 1)).await;
    let cluster_up = FakeUpstream::start(Ipv4Addr::new(192, 0, 2, 2)).await;
    let own = FakeUpstream::start(Ipv4Addr::new(192, 0, 2, 3)).await;
    let flagged = FakeUpstream::start(Ipv4Addr::new(192, 0, 2, 4)).await;
    env.store()
        .create(
            Kind::ConfigMap,
            kube_dns_configmap(&[("corp.example", corp.addr)], &[cluster_up.addr]),
        )
        .expect("configmap");
    let cp = env.control_plane(&[]).await;
    let status = cp_status_until(&cp, "the cluster's DNS settings", |s| s.ready).await;
    assert!(status.sources[0].dns.is_some(), "{:?}", status.sources);
    let agent = |node: &str, tweak: &dyn Fn(&mut switchyard_agent::Args)| {
        let mut args = agent_args(
            node,
            &format!("http://{}", cp.grpc_addr),
            &env.dir.path().join(node),
        );
        args.dns_listen = DnsListen::Addr("127.0.0.1:0".parse().expect("addr"));
        args.resolv_conf = env.dir.path().join("no-resolv.conf");
        tweak(&mut args);
        args
    };
    let (plain, _) = start_recording_agent(agent("node-a", &|_| {})).await;
    let (pinned, _) = start_recording_agent(agent("node-b", &|a| {
        a.dns_upstreams = vec![own.addr];
        a.dns_forward = vec![("corp.example".into(), vec![flagged.addr])];
    }))
    .await;
    for a in [&plain, &pinned] {
        agent_status_until(a, "the cluster's DNS settings", |s| {
            s.dns
                .as_ref()
                .is_some_and(|d| d.forward_zones.contains_key("corp.example."))
        })
        .await;
    }
    let ask = |a: &switchyard_agent::Agent, name: &'static str| {
        let addr = a.dns_addr.expect("DNS");
        async move { dig(addr, &[name, "A"]).await.data() }
    };
    assert_eq!(
        ask(&plain, "host.corp.example").await,
        ["192.0.2.1"],
        "the stub domain"
    );
    assert_eq!(
        ask(&plain, "www.example.org").await,
        ["192.0.2.2"],
        "the cluster's upstream"
    );
    assert_eq!(
        ask(&pinned, "host.corp.example").await,
        ["192.0.2.4"],
        "--dns-forward wins"
    );
    assert_eq!(
        ask(&pinned, "www.example.org").await,
        ["192.0.2.3"],
        "--dns-upstream wins"
    );
    let version = plain.status.document().version;

    // The stub domain goes: its names follow the cluster's upstream.
    env.store()
        .update(Kind::ConfigMap, kube_dns_configmap(&[], &[cluster_up.addr]))
        .expect("update");
    agent_status_until(&plain, "the stub domain to go", |s| {
        s.dns.as_ref().is_some_and(|d| d.forward_zones.is_empty())
    })
    .await;
    assert_eq!(ask(&plain, "other.corp.example").await, ["192.0.2.2"]);
    assert_eq!(
        plain.status.document().version,
        version,
        "no Service changed"
    );
    plain.shutdown().await;
    pinned.shutdown().await;
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relist_after_410_is_atomic_and_nothing_flaps() {
    let env = Env::new().await;
    populate(env.store(), "shop", 50);
    let cp = env.control_plane(&[]).await;
    let (a, hist_a) = env.history_agent("node-a", &cp).await;
    let (b, hist_b) = env.history_agent("node-b", &cp).await;
    for agent in [&a, &b] {
        agent_until(agent, "50 services", |s| s.resources.len() == 50).await;
    }
    let lists = env.api.requests("LIST services");

    // Keep the watchers out (every re-watch fails) while the world moves on
    // and the event log is compacted: their resourceVersions become too old.
    env.api.fail_next(Fault {
        method: None,
        contains: "watch=true".into(),
        code: 500,
        times: usize::MAX,
    });
    env.api.drop_watches();
    set_endpoints(env.store(), "shop", "svc-1", "svc-1-a", &["10.253.0.1"]);
    env.store().delete(&key("shop", "svc-2")).expect("delete");
    env.store()
        .create(Kind::Service, service("shop", "late", 82))
        .expect("create");
    env.api.compact();
    env.api.clear_faults();

    // Kinds relist independently: wait for both the Services and the slice.
    for agent in [&a, &b] {
        agent_until(agent, "the state after the relist", |s| {
            s.resources.len() == 50
                && s.resources.contains_key(&name("shop", "late"))
                && !s.resources.contains_key(&name("shop", "svc-2"))
                && s.resources[&name("shop", "svc-1")].state.slices[0].endpoints[0].addresses[0]
                    .to_string()
                    == "10.253.0.1"
        })
        .await;
    }
    assert!(env.api.requests("GONE services") >= 1, "a 410 was served");
    assert!(
        env.api.requests("LIST services") > lists,
        "the watcher relisted"
    );
    // No agent ever applied a state without a Service that still exists.
    for hist in [&hist_a, &hist_b] {
        assert_eq!(
            hist.flapped(&[&name("shop", "svc-2")]),
            Vec::<String>::new()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watch_resumes_without_relist() {
    let env = Env::new().await;
    populate(env.store(), "shop", 20);
    let cp = env.control_plane(&[]).await;
    let (a, hist) = env.history_agent("node-a", &cp).await;
    agent_until(&a, "20 services", |s| s.resources.len() == 20).await;
    let lists = env.api.requests("LIST services") + env.api.requests("LIST endpointslices");
    let watches = env.api.requests("WATCH endpointslices");

    env.api.drop_watches();
    set_endpoints(env.store(), "shop", "svc-3", "svc-3-a", &["10.254.0.3"]);
    agent_until(&a, "svc-3's new endpoint", |s| {
        s.resources[&name("shop", "svc-3")].state.slices[0].endpoints[0]
            .addresses
            .iter()
            .any(|ip| ip.to_string() == "10.254.0.3")
    })
    .await;
    assert!(
        env.api.requests("WATCH endpointslices") > watches,
        "re-watched"
    );
    assert_eq!(
        env.api.requests("LIST services") + env.api.requests("LIST endpointslices"),
        lists,
        "resumed from the last resourceVersion, no relist"
    );
    assert_eq!(hist.flapped(&[]), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stand_in_restart_is_followed_without_flap() {
    let env = Env::new().await;
    populate(env.store(), "shop", 30);
    let cp = env.control_plane(&[]).await;
    let (a, hist) = env.history_agent("node-a", &cp).await;
    agent_until(&a, "30 services", |s| s.resources.len() == 30).await;

    let addr = env.api.addr();
    let Env { dir, api } = env;
    let store = api.stop().await;
    // While it is down the control plane says so, and keeps serving.
    cp_status_until(&cp, "the source to report the API server down", |s| {
        s.sources[0].last_error.is_some()
    })
    .await;
    assert_eq!(cp.status.document().resources, 30);
    // The world changes meanwhile; the restarted server lost its watch
    // cache, so old resourceVersions are too old (410) and watchers relist.
    set_endpoints(&store, "shop", "svc-4", "svc-4-a", &["10.249.0.4"]);
    store.delete(&key("shop", "svc-5")).expect("delete");
    store.compact();
    let listener = TcpListener::bind(addr).await.expect("rebind the same port");
    let api = FakeApiServer::start_with(listener, store, ServerConfig::default()).expect("restart");
    let env = Env { dir, api };

    // Each kind relists on its own: the Service may go before the slice moves.
    agent_until(&a, "the changes made while the server was down", |s| {
        s.resources.len() == 29
            && !s.resources.contains_key(&name("shop", "svc-5"))
            && s.resources[&name("shop", "svc-4")].state.slices[0].endpoints[0].addresses[0]
                .to_string()
                == "10.249.0.4"
    })
    .await;
    cp_status_until(&cp, "the source error to clear", |s| {
        s.sources[0].last_error.is_none()
    })
    .await;
    assert_eq!(
        hist.flapped(&[&name("shop", "svc-5")]),
        Vec::<String>::new()
    );
    drop(env);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_services_in_one_namespace() {
    let env = Env::new().await;
    populate(env.store(), "big", 5000);
    let cp = env.control_plane(&[]).await;
    let status = cp_status_until(&cp, "the first snapshot", |s| s.ready).await;
    assert_eq!(status.resources, 5000);
    assert!(env.api.requests("LIST services") >= 10, "paged by 500");
    let (a, _) = env.history_agent("node-a", &cp).await;
    agent_until(&a, "5,000 services", |s| s.resources.len() == 5000).await;
    assert_eq!(endpoints(&a, "big", "svc-4999"), ["10.244.19.250"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_object_is_skipped_and_reported() {
    let env = Env::new().await;
    populate(env.store(), "shop", 3);
    let mut bad = service("shop", "bogus", 80);
    bad["spec"]["type"] = json!("Teleport");
    env.store().create(Kind::Service, bad).expect("stored");
    let cp = env.control_plane(&[]).await;
    let status = cp_status_until(&cp, "the invalid Service reported", |s| {
        s.ready && !s.invalid_objects.is_empty()
    })
    .await;
    assert_eq!(status.resources, 3);
    let bogus = &status.invalid_objects[0];
    assert_eq!(bogus.object, "Service shop/bogus");
    assert_eq!(bogus.field, "spec.type");
    assert_eq!(bogus.source, "kube");
    let (_, metrics) = get_text(cp.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("switchyard_control_plane_invalid_objects 1"),
        "{metrics}"
    );
    let (a, _) = env.history_agent("node-a", &cp).await;
    agent_until(&a, "the 3 valid services", |s| s.resources.len() == 3).await;

    // Fixed: it flows, and the report clears.
    env.store()
        .update(Kind::Service, service("shop", "bogus", 80))
        .expect("fix");
    agent_until(&a, "the fixed service", |s| s.resources.len() == 4).await;
    cp_status_until(&cp, "the report to clear", |s| s.invalid_objects.is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_and_label_selector_filter() {
    let env = Env::new().await;
    populate(env.store(), "shop", 3);
    populate(env.store(), "other", 2);
    let cp = env
        .control_plane(&[
            "--kube-namespace",
            "shop",
            "--kube-label-selector",
            "app!=svc-1",
        ])
        .await;
    let (a, _) = env.history_agent("node-a", &cp).await;
    agent_until(&a, "shop's services but svc-1", |s| {
        s.resources.len() == 2
            && s.resources.contains_key(&name("shop", "svc-0"))
            && s.resources.contains_key(&name("shop", "svc-2"))
    })
    .await;
    // A label change moves a Service out of the selection.
    let mut moved = service("shop", "svc-2", 80);
    moved["metadata"]["labels"]["app"] = json!("svc-1");
    env.store().update(Kind::Service, moved).expect("relabel");
    agent_until(&a, "svc-2 filtered out", |s| s.resources.len() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_storm_coalesces() {
    let env = Env::new().await;
    populate(env.store(), "shop", 10);
    let cp = env.control_plane(&["--debounce", "50ms"]).await;
    let (a, hist) = env.history_agent("node-a", &cp).await;
    agent_until(&a, "10 services", |s| s.resources.len() == 10).await;
    let before = hist.applied();
    for i in 0..300u32 {
        let ip = format!("10.248.{}.{}", i / 250, i % 250 + 1);
        set_endpoints(env.store(), "shop", "svc-0", "svc-0-a", &[&ip]);
    }
    agent_until(&a, "the last of 300 updates", |s| {
        s.resources[&name("shop", "svc-0")].state.slices[0].endpoints[0]
            .addresses
            .iter()
            .any(|ip| ip.to_string() == "10.248.1.50")
    })
    .await;
    let pushed = hist.applied() - before;
    assert!(pushed <= 10, "300 changes became {pushed} states");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_api_server_answers() {
    init_logging();
    let dir = tempfile::tempdir().expect("tempdir");
    // A port nobody listens on (bound, then closed).
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    std::fs::write(
        dir.path().join("kubeconfig"),
        apiserver::kubeconfig(&format!("http://{addr}")),
    )
    .expect("kubeconfig");
    let cp = start_cp(kube_cp_args(
        &dir.path().join("kubeconfig"),
        &dir.path().join("cp"),
        &[],
    ))
    .await;
    cp_status_until(&cp, "the source error", |s| {
        s.sources.first().is_some_and(|s| s.last_error.is_some())
    })
    .await;
    assert_eq!(get_text(cp.admin_addr, "/readyz").await.0, 503);
    // Once the server appears (on that port), the control plane gets ready.
    let store = Store::default();
    populate(&store, "shop", 2);
    let listener = TcpListener::bind(addr).await.expect("rebind");
    let _api = FakeApiServer::start_with(listener, store, ServerConfig::default()).expect("start");
    cp_status_until(&cp, "ready", |s| s.ready && s.resources == 2).await;
}
