//! A fleet of three clusters behind one control plane: three API-server
//! stand-ins (east, west, north) through the unmodified kube client, one
//! `--source kube:CONTEXT=CLUSTER` each, agents of north and east with
//! their DNS stubs, queried with dig. Also several control planes over the
//! same stand-ins, which must give the same addresses, and dual-stack
//! imports. Covered: exports merge into imports that north's and east's
//! agents hold and answer with dig; north's own name stays its own;
//! unexport; a port conflict won by the oldest export (reported on both
//! exports); three control planes (two started together, one later) giving
//! the same ClusterSet and cluster IPs and honouring a recorded
//! ServiceImport; IPv6-only and dual-stack imports answered with AAAA and
//! A; an API server stopped (shown down, endpoints kept); an API server
//! down at start holding back only the clusterset; a hub with a control
//! plane per cluster holding the same imports as one control plane
//! watching all three, and keeping them when the hub dies.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Value, json};
use switchyard_agent::config::DnsListen;
use switchyard_control_plane::ControlPlane;
use switchyard_control_plane::status::StatusDocument;
use switchyard_integration_tests::apiserver::{FakeApiServer, Kind, ServerConfig, Store};
use switchyard_integration_tests::dns::dig;
use switchyard_integration_tests::*;
use switchyard_model::CLUSTERSET;
use tokio::net::TcpListener;

const CLUSTERS: [&str; 3] = ["east", "west", "north"];

fn service(name: &str, ports: &[(&str, u16)]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|(n, p)| json!({"name": n, "port": p, "targetPort": 8080}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "shop", "name": name},
        "spec": {"ports": ports},
    })
}

fn slice(service: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": "shop", "name": format!("{service}-1"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

fn export(name: &str) -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
           "metadata": {"namespace": "shop", "name": name}})
}

/// Three stand-ins and one kubeconfig naming them as contexts.
struct Fleet {
    dir: tempfile::TempDir,
    apis: Vec<Option<FakeApiServer>>,
    ports: Vec<u16>,
}

impl Fleet {
    async fn new() -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut apis = Vec::new();
        let mut ports = Vec::new();
        for _ in CLUSTERS {
            let api = FakeApiServer::start_with(
                TcpListener::bind("127.0.0.1:0").await.expect("bind"),
                Store::default(),
                ServerConfig::default(),
            )
            .expect("stand-in");
            ports.push(api.addr().port());
            apis.push(Some(api));
        }
        let fleet = Self { dir, apis, ports };
        fleet.write_kubeconfig();
        fleet
    }

    fn write_kubeconfig(&self) {
        let mut k = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
        for (c, port) in CLUSTERS.iter().zip(&self.ports) {
            k.push_str(&format!(
                "- name: {c}\n  cluster:\n    server: http://127.0.0.1:{port}\n"
            ));
        }
        k.push_str("users:\n- name: u\n  user: {}\ncontexts:\n");
        for c in CLUSTERS {
            k.push_str(&format!(
                "- name: {c}\n  context:\n    cluster: {c}\n    user: u\n"
            ));
        }
        k.push_str("current-context: east\n");
        std::fs::write(self.dir.path().join("kubeconfig"), k).expect("kubeconfig");
    }

    fn store(&self, cluster: &str) -> &Store {
        let i = CLUSTERS
            .iter()
            .position(|c| *c == cluster)
            .expect("a cluster");
        self.apis[i].as_ref().expect("running").store()
    }

    async fn stop(&mut self, cluster: &str) -> Store {
        let i = CLUSTERS
            .iter()
            .position(|c| *c == cluster)
            .expect("a cluster");
        self.apis[i].take().expect("running").stop().await
    }

    async fn restart(&mut self, cluster: &str, store: Store) {
        let i = CLUSTERS
            .iter()
            .position(|c| *c == cluster)
            .expect("a cluster");
        let listener = TcpListener::bind(("127.0.0.1", self.ports[i]))
            .await
            .expect("the same port again");
        self.apis[i] = Some(
            FakeApiServer::start_with(listener, store, ServerConfig::default()).expect("restart"),
        );
    }

    async fn control_plane(&self) -> ControlPlane {
        self.control_plane_with("cp", &[]).await
    }

    /// A control plane over every stand-in, with its own state directory
    /// `state` and `extra` arguments.
    async fn control_plane_with(&self, state: &str, extra: &[&str]) -> ControlPlane {
        let mut argv: Vec<String> = vec!["switchyard-control-plane".into()];
        for c in CLUSTERS {
            argv.extend(["--source".into(), format!("kube:{c}={c}")]);
        }
        argv.extend([
            "--kubeconfig".into(),
            self.dir.path().join("kubeconfig").display().to_string(),
            "--state-dir".into(),
            self.dir.path().join(state).display().to_string(),
            "--debounce".into(),
            "20ms".into(),
        ]);
        argv.extend(extra.iter().map(|a| (*a).to_owned()));
        let args = <switchyard_control_plane::Args as clap::Parser>::parse_from(argv);
        args.check().expect("one range per family");
        start_cp(args).await
    }

    async fn agent(&self, cluster: &str, cp: &ControlPlane) -> switchyard_agent::Agent {
        let mut args = agent_args(
            &format!("{cluster}-node"),
            &format!("http://{}", cp.grpc_addr),
            &self.dir.path().join(format!("agent-{cluster}")),
        );
        args.cluster = cluster.into();
        args.dns_listen = DnsListen::Addr("127.0.0.1:0".parse().expect("addr"));
        start_agent(args, Box::new(HistoryDataPlane::default())).await
    }
}

/// The endpoints of the import `shop/NAME` an agent holds, sorted.
fn import_endpoints(agent: &switchyard_agent::Agent, name: &str) -> Vec<(String, String)> {
    let state = agent.state.borrow().clone();
    let Some(held) = state.resources.get(&format!("{CLUSTERSET}/shop/{name}")) else {
        return Vec::new();
    };
    let mut eps: Vec<(String, String)> = held
        .state
        .slices
        .iter()
        .flat_map(|s| {
            s.endpoints.iter().map(|e| {
                (
                    s.cluster.clone().unwrap_or_default(),
                    e.addresses[0].to_string(),
                )
            })
        })
        .collect();
    eps.sort();
    eps
}

async fn wait_import(agent: &switchyard_agent::Agent, name: &str, want: &[(&str, &str)]) {
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(c, ip)| ((*c).to_owned(), (*ip).to_owned()))
        .collect();
    let mut rx = agent.state.clone();
    within(&format!("the import of {name} to hold {want:?}"), async {
        while import_endpoints(agent, name) != want {
            rx.changed().await.expect("agent running");
        }
    })
    .await;
}

fn cluster_status<'a>(
    doc: &'a StatusDocument,
    cluster: &str,
) -> Option<&'a switchyard_control_plane::status::ClusterStatus> {
    doc.clusters.iter().find(|c| c.cluster == cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_services_merge_into_the_clusterset() {
    let mut fleet = Fleet::new().await;
    for (c, ip) in [
        ("east", "10.1.0.1"),
        ("west", "10.2.0.1"),
        ("north", "10.3.0.1"),
    ] {
        let store = fleet.store(c);
        store
            .create(Kind::Service, service("web", &[("http", 80)]))
            .expect("svc");
        store
            .create(Kind::EndpointSlice, slice("web", &[ip]))
            .expect("slice");
    }
    // East exports first: its export is the oldest.
    fleet
        .store("east")
        .create(Kind::ServiceExport, export("web"))
        .expect("export");
    fleet
        .store("west")
        .create(Kind::ServiceExport, export("web"))
        .expect("export");

    let cp = fleet.control_plane().await;
    let north = fleet.agent("north", &cp).await;
    let east = fleet.agent("east", &cp).await;

    // North (which does not export) and east see both exporters' endpoints.
    for agent in [&north, &east] {
        wait_import(agent, "web", &[("east", "10.1.0.1"), ("west", "10.2.0.1")]).await;
    }
    let doc = cp.status.document();
    let import = doc
        .services
        .iter()
        .find(|s| s.cluster == CLUSTERSET && s.name == "shop/web")
        .expect("the import in /status");
    let clusterset_ip = import.cluster_ips[0].clone();
    assert!(clusterset_ip.starts_with("10.11"), "{clusterset_ip}");
    let own = doc
        .services
        .iter()
        .find(|s| s.cluster == "north" && s.name == "shop/web")
        .expect("north's own web");

    // DNS on a node of north: the clusterset name is the import, the
    // cluster-local name stays north's own Service.
    let dns = north.dns_addr.expect("DNS");
    let d = dig(dns, &["web.shop.svc.clusterset.local", "A"]).await;
    assert_eq!(d.data(), std::slice::from_ref(&clusterset_ip), "{}", d.raw);
    let d = dig(dns, &["web.shop.svc.cluster.local", "A"]).await;
    assert_eq!(d.data(), own.cluster_ips, "{}", d.raw);
    let d = dig(dns, &["-x", &clusterset_ip]).await;
    assert_eq!(d.data(), ["web.shop.svc.clusterset.local."], "{}", d.raw);

    // Unexport: west's endpoints leave the clusterset.
    fleet
        .store("west")
        .delete(&(Kind::ServiceExport, "shop".into(), "web".into()))
        .expect("unexport");
    wait_import(&north, "web", &[("east", "10.1.0.1")]).await;

    // A conflicting export: west exports with other ports; the oldest
    // export (east's) keeps its properties, the conflict is reported, and
    // west's endpoints still join.
    fleet
        .store("west")
        .update(Kind::Service, service("web", &[("http", 8081)]))
        .expect("update");
    fleet
        .store("west")
        .create(Kind::ServiceExport, export("web"))
        .expect("export");
    wait_import(&north, "web", &[("east", "10.1.0.1"), ("west", "10.2.0.1")]).await;
    let doc = cp_status_until(&cp, "the port conflict reported", |d| {
        d.clusterset_issues
            .iter()
            .any(|i| i.reason == "PortConflict")
    })
    .await;
    // Both exports that take part hear of it, the oldest too.
    let issues: Vec<(&str, &str, &str)> = doc
        .clusterset_issues
        .iter()
        .map(|i| (i.service.as_str(), i.cluster.as_str(), i.reason))
        .collect();
    assert_eq!(
        issues,
        [
            ("shop/web", "east", "PortConflict"),
            ("shop/web", "west", "PortConflict")
        ]
    );
    let held = north.state.borrow().clone();
    let ports: Vec<u16> = held.resources[&format!("{CLUSTERSET}/shop/web")]
        .state
        .service
        .ports
        .iter()
        .map(|p| p.port)
        .collect();
    assert_eq!(ports, [80], "the oldest export's port");
    let metrics = get_text(cp.admin_addr, "/metrics").await.1;
    assert!(
        metrics.contains("switchyard_control_plane_clusterset_conflicts 2"),
        "{metrics}"
    );

    // West's API server stops: west shows as down, its endpoints stay.
    let west_store = fleet.stop("west").await;
    let doc = cp_status_until(&cp, "west shown as down", |d| {
        cluster_status(d, "west").is_some_and(|c| !c.healthy && c.down_since_unix.is_some())
    })
    .await;
    assert!(cluster_status(&doc, "east").is_some_and(|c| c.healthy));
    assert_eq!(
        import_endpoints(&north, "web"),
        [
            ("east".into(), "10.1.0.1".into()),
            ("west".into(), "10.2.0.1".into())
        ],
        "--cluster-down keep"
    );
    fleet.restart("west", west_store).await;
    // West's news flows again.
    fleet
        .store("west")
        .update(Kind::EndpointSlice, slice("web", &["10.2.0.2"]))
        .expect("update");
    wait_import(&north, "web", &[("east", "10.1.0.1"), ("west", "10.2.0.2")]).await;
    cp_status_until(&cp, "west healthy again", |d| {
        cluster_status(d, "west").is_some_and(|c| c.healthy && c.down_since_unix.is_none())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unreachable_api_server_does_not_hold_back_the_other_clusters() {
    let mut fleet = Fleet::new().await;
    for (c, ip) in [
        ("east", "10.1.0.1"),
        ("west", "10.2.0.1"),
        ("north", "10.3.0.1"),
    ] {
        let store = fleet.store(c);
        store
            .create(Kind::Service, service("web", &[("http", 80)]))
            .expect("svc");
        store
            .create(Kind::EndpointSlice, slice("web", &[ip]))
            .expect("slice");
        store
            .create(Kind::ServiceExport, export("web"))
            .expect("export");
    }
    // West is down before the control plane ever listed it.
    let west_store = fleet.stop("west").await;
    let cp = fleet.control_plane().await;
    let north = fleet.agent("north", &cp).await;
    let mut rx = north.state.clone();
    within(
        "north's own view",
        rx.wait_for(|s| s.resources.contains_key("north/shop/web")),
    )
    .await
    .expect("agent running");
    // Not ready, and no clusterset yet: an import without west would take
    // west's endpoints from every agent.
    let (code, _) = get_text(cp.admin_addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(import_endpoints(&north, "web").is_empty());
    let doc = cp.status.document();
    assert!(cluster_status(&doc, "north").is_some_and(|c| c.synced));
    assert!(cluster_status(&doc, "west").is_some_and(|c| !c.synced));

    fleet.restart("west", west_store).await;
    wait_import(
        &north,
        "web",
        &[
            ("east", "10.1.0.1"),
            ("north", "10.3.0.1"),
            ("west", "10.2.0.1"),
        ],
    )
    .await;
    // Readiness follows (the kube client retries with its backoff).
    let mut status = cp.status.subscribe();
    within("/readyz 200", async {
        while !cp.status.ready() {
            status.changed().await.expect("status");
        }
    })
    .await;
}

/// A control plane on pre-bound listeners (a fleet needs every address
/// before any of them starts).
async fn control_plane_on(grpc: TcpListener, argv: Vec<String>) -> ControlPlane {
    let args = <switchyard_control_plane::Args as clap::Parser>::parse_from(argv);
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("admin");
    let sources = switchyard_control_plane::sources_from_args(&args);
    switchyard_control_plane::start_with(
        args,
        grpc,
        admin,
        sources,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect("control plane starts")
}

/// The clusterset imports of a control plane's latest snapshot, decoded.
fn imports_of(cp: &ControlPlane) -> Vec<switchyard_model::ServiceState> {
    let Some(snap) = cp.snapshots.borrow().clone() else {
        return Vec::new();
    };
    snap.resources
        .iter()
        .filter(|(name, _)| name.starts_with("clusterset/"))
        .map(|(name, r)| {
            switchyard_proto::convert::decode_state_bytes(name, &r.service_state).expect("decodes")
        })
        .collect()
}

async fn wait_imports(cp: &ControlPlane, what: &str, want: &[switchyard_model::ServiceState]) {
    let mut rx = cp.snapshots.clone();
    within(what, async {
        while imports_of(cp) != want {
            rx.changed().await.expect("control plane running");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_control_planes_under_a_hub_see_what_one_control_plane_sees() {
    let fleet = Fleet::new().await;
    for (c, ip) in [
        ("east", "10.1.0.1"),
        ("west", "10.2.0.1"),
        ("north", "10.3.0.1"),
    ] {
        let store = fleet.store(c);
        store
            .create(Kind::Service, service("web", &[("http", 80)]))
            .expect("svc");
        store
            .create(Kind::EndpointSlice, slice("web", &[ip]))
            .expect("slice");
    }
    for c in ["east", "west"] {
        fleet
            .store(c)
            .create(Kind::ServiceExport, export("web"))
            .expect("export");
    }
    fleet
        .store("north")
        .create(Kind::Service, service("db", &[("pg", 5432)]))
        .expect("svc");
    fleet
        .store("north")
        .create(Kind::EndpointSlice, slice("db", &["10.3.0.9"]))
        .expect("slice");
    fleet
        .store("north")
        .create(Kind::ServiceExport, export("db"))
        .expect("export");

    let kubeconfig = fleet.dir.path().join("kubeconfig").display().to_string();
    let state = |name: &str| fleet.dir.path().join(name).display().to_string();
    let common = |name: &str| -> Vec<String> {
        vec![
            "switchyard-control-plane".into(),
            "--kubeconfig".into(),
            kubeconfig.clone(),
            "--state-dir".into(),
            state(name),
            "--debounce".into(),
            "20ms".into(),
            "--relay-name".into(),
            name.into(),
        ]
    };
    // One control plane watching every cluster: the reference.
    let direct = fleet.control_plane().await;

    // The fleet: a control plane per cluster, following one hub, which
    // follows each of them for its exports.
    let hub_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hub_url = format!("http://{}", hub_listener.local_addr().expect("addr"));
    let mut per_cluster = Vec::new();
    let mut hub_argv = common("hub");
    for c in CLUSTERS {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        hub_argv.extend(["--source".into(), format!("switchyard:{url}={c}")]);
        let mut argv = common(&format!("cp-{c}"));
        argv.extend([
            "--source".into(),
            format!("kube:{c}={c}"),
            "--source".into(),
            format!("switchyard:{hub_url}=clusterset"),
        ]);
        per_cluster.push(control_plane_on(listener, argv).await);
    }
    let hub = control_plane_on(hub_listener, hub_argv).await;

    let mut rx = direct.snapshots.clone();
    within("the direct control plane's two imports", async {
        loop {
            let complete = rx
                .borrow_and_update()
                .as_ref()
                .is_some_and(|s| s.complete());
            if complete && imports_of(&direct).len() == 2 {
                return;
            }
            rx.changed().await.expect("running");
        }
    })
    .await;
    let reference = imports_of(&direct);
    assert_eq!(reference.len(), 2, "{reference:?}");
    for (c, cp) in CLUSTERS.iter().zip(&per_cluster) {
        wait_imports(
            cp,
            &format!("{c}'s control plane to hold the hub's imports"),
            &reference,
        )
        .await;
    }
    // A node of north, served by north's control plane.
    let north = fleet.agent("north", &per_cluster[2]).await;
    wait_import(&north, "web", &[("east", "10.1.0.1"), ("west", "10.2.0.1")]).await;

    // A change in east reaches north's agent through the hub.
    fleet
        .store("east")
        .update(Kind::EndpointSlice, slice("web", &["10.1.0.2"]))
        .expect("update");
    wait_import(&north, "web", &[("east", "10.1.0.2"), ("west", "10.2.0.1")]).await;

    // The hub dies: every cluster keeps the last known imports.
    let held = imports_of(&per_cluster[2]);
    hub.kill().await;
    let doc = cp_status_until(&per_cluster[2], "the hub shown as down", |d| {
        cluster_status(d, CLUSTERSET).is_some_and(|c| !c.healthy)
    })
    .await;
    assert!(doc.sources.iter().any(|s| s.last_error.is_some()));
    assert_eq!(imports_of(&per_cluster[2]), held, "imports kept");
    assert_eq!(
        import_endpoints(&north, "web"),
        [
            ("east".into(), "10.1.0.2".into()),
            ("west".into(), "10.2.0.1".into())
        ]
    );
}

/// A ServiceImport as Switchyard's writer leaves it, recording `ips`
/// (`ours`: with its managed-by label).
fn recorded_import(name: &str, ips: &[&str], ours: bool) -> Value {
    let labels = if ours {
        json!({"app.kubernetes.io/managed-by": "switchyard"})
    } else {
        json!({"app.kubernetes.io/managed-by": "someone-else"})
    };
    json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
           "metadata": {"namespace": "shop", "name": name, "labels": labels},
           "spec": {"type": "ClusterSetIP", "ips": ips,
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}})
}

/// The cluster IPs of every Service in a control plane's latest snapshot
/// (imports and the file source's Services), by resource name.
fn addresses(cp: &ControlPlane) -> BTreeMap<String, Vec<IpAddr>> {
    let Some(snap) = cp.snapshots.borrow().clone() else {
        return BTreeMap::new();
    };
    snap.resources
        .iter()
        .filter(|(name, _)| name.starts_with("clusterset/") || name.starts_with("files/"))
        .map(|(name, r)| {
            let state = switchyard_proto::convert::decode_state_bytes(name, &r.service_state)
                .expect("decodes");
            (name.to_string(), state.service.cluster_ips)
        })
        .collect()
}

async fn wait_addresses(
    cp: &ControlPlane,
    what: &str,
    ok: impl Fn(&BTreeMap<String, Vec<IpAddr>>) -> bool,
) -> BTreeMap<String, Vec<IpAddr>> {
    let mut rx = cp.snapshots.clone();
    within(what, async {
        loop {
            let now = addresses(cp);
            if ok(&now) {
                return now;
            }
            rx.changed().await.expect("control plane running");
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_planes_give_the_same_addresses_whenever_they_start() {
    let fleet = Fleet::new().await;
    for i in 0..8 {
        let name = format!("svc-{i}");
        for (c, ip) in [
            ("east", format!("10.1.0.{i}")),
            ("west", format!("10.2.0.{i}")),
        ] {
            let store = fleet.store(c);
            store
                .create(Kind::Service, service(&name, &[("http", 80)]))
                .expect("svc");
            store
                .create(Kind::EndpointSlice, slice(&name, &[&ip]))
                .expect("slice");
            if c == "east" || i % 2 == 0 {
                store
                    .create(Kind::ServiceExport, export(&name))
                    .expect("export");
            }
        }
    }
    // The record: east's and west's ServiceImports of svc-3 name an
    // address the allocation would not pick. Another manager's
    // ServiceImport of svc-4 is no record.
    for c in ["east", "west"] {
        fleet
            .store(c)
            .create(
                Kind::ServiceImport,
                recorded_import("svc-3", &["10.112.7.7"], true),
            )
            .expect("import");
    }
    fleet
        .store("east")
        .create(
            Kind::ServiceImport,
            recorded_import("svc-4", &["10.112.8.8"], false),
        )
        .expect("import");
    // A file source with Services that name no cluster IP, one dual-stack.
    let files = fleet.dir.path().join("files");
    std::fs::create_dir_all(&files).expect("dir");
    std::fs::write(
        files.join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: default}\n\
         spec: {ports: [{port: 80}]}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: b, namespace: default}\n\
         spec: {ipFamilyPolicy: PreferDualStack, ports: [{port: 80}]}\n",
    )
    .expect("write");
    let file_source = format!("file:{}=files", files.display());
    let extra = [
        "--source",
        file_source.as_str(),
        "--service-cidr",
        "10.96.0.0/12",
        "--service-cidr",
        "fd00:96::/108",
    ];
    let complete = |want: usize| {
        move |a: &BTreeMap<String, Vec<IpAddr>>| {
            a.keys().filter(|n| n.starts_with("clusterset/")).count() == want
                && a.get("clusterset/shop/svc-3").map(Vec::as_slice)
                    == Some(&["10.112.7.7".parse::<IpAddr>().expect("ip")][..])
                && a.contains_key("files/default/b")
        }
    };

    // Two replicas started together, each with its own (empty) state.
    let (one, two) = tokio::join!(
        fleet.control_plane_with("one", &extra),
        fleet.control_plane_with("two", &extra)
    );
    let first = wait_addresses(&one, "replica one's imports", complete(8)).await;
    wait_addresses(&two, "replica two to agree", |a| *a == first).await;
    assert_eq!(
        first["files/default/b"].len(),
        2,
        "PreferDualStack: {first:?}"
    );
    assert!(first["files/default/b"][1].is_ipv6());
    assert_ne!(
        first["clusterset/shop/svc-4"],
        ["10.112.8.8".parse::<IpAddr>().expect("ip")],
        "another manager's ServiceImport is no record"
    );

    // Imports come and go: both follow, and the others keep their addresses.
    for c in ["east", "west"] {
        fleet
            .store(c)
            .delete(&(Kind::ServiceExport, "shop".into(), "svc-1".into()))
            .ok();
    }
    fleet
        .store("west")
        .create(Kind::Service, service("svc-8", &[("http", 80)]))
        .expect("svc");
    fleet
        .store("west")
        .create(Kind::EndpointSlice, slice("svc-8", &["10.2.0.8"]))
        .expect("slice");
    fleet
        .store("west")
        .create(Kind::ServiceExport, export("svc-8"))
        .expect("export");
    let moved = |a: &BTreeMap<String, Vec<IpAddr>>| {
        complete(8)(a)
            && a.contains_key("clusterset/shop/svc-8")
            && !a.contains_key("clusterset/shop/svc-1")
    };
    let second = wait_addresses(&one, "replica one to follow", moved).await;
    wait_addresses(&two, "replica two to follow", |a| *a == second).await;
    for (name, ips) in &first {
        if name != "clusterset/shop/svc-1" {
            assert_eq!(second.get(name), Some(ips), "{name} kept its address");
        }
    }

    // A third replica starting now, after all that, agrees too.
    let three = fleet.control_plane_with("three", &extra).await;
    wait_addresses(&three, "a replica started later to agree", |a| *a == second).await;

    // An agent of west follows replica one, and two once one dies: the
    // ClusterSet IPs it holds do not move, and what two alone sends
    // after the failover (a new import) comes in beside them.
    let mut args = agent_args(
        "west-node",
        &format!("http://{}", one.grpc_addr),
        &fleet.dir.path().join("agent-failover"),
    );
    args.control_plane.push(format!("http://{}", two.grpc_addr));
    args.cluster = "west".into();
    args.dns_listen = DnsListen::None;
    let agent = start_agent(args, Box::new(HistoryDataPlane::default())).await;
    let held = |agent: &switchyard_agent::Agent| -> BTreeMap<String, Vec<IpAddr>> {
        agent
            .state
            .borrow()
            .resources
            .iter()
            .filter(|(name, _)| name.starts_with("clusterset/"))
            .map(|(name, r)| (name.clone(), r.state.service.cluster_ips.clone()))
            .collect()
    };
    let imports: BTreeMap<String, Vec<IpAddr>> = second
        .iter()
        .filter(|(name, _)| name.starts_with("clusterset/"))
        .map(|(n, ips)| (n.clone(), ips.clone()))
        .collect();
    let mut rx = agent.state.clone();
    within("the agent to hold replica one's imports", async {
        while held(&agent) != imports {
            rx.changed().await.expect("agent running");
        }
    })
    .await;
    one.kill().await;
    for (kind, object) in [
        (Kind::Service, service("svc-9", &[("http", 80)])),
        (Kind::EndpointSlice, slice("svc-9", &["10.2.0.9"])),
        (Kind::ServiceExport, export("svc-9")),
    ] {
        fleet.store("west").create(kind, object).expect("svc-9");
    }
    let after = within("the agent to get svc-9 from replica two", async {
        loop {
            let now = held(&agent);
            if now.contains_key("clusterset/shop/svc-9") {
                return now;
            }
            rx.changed().await.expect("agent running");
        }
    })
    .await;
    for (name, ips) in &imports {
        assert_eq!(
            after.get(name),
            Some(ips),
            "{name} kept its address across the failover"
        );
    }
}

fn slice_of(service: &str, family: &str, ips: &[&str]) -> Value {
    let mut v = slice(service, ips);
    v["metadata"]["name"] = json!(format!("{service}-{}", family.to_lowercase()));
    v["addressType"] = json!(family);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_only_and_a_dual_stack_export_get_clusterset_ips_of_their_families() {
    let fleet = Fleet::new().await;
    for (c, n) in [("east", 1), ("west", 2)] {
        let store = fleet.store(c);
        let mut six = service("six", &[("http", 80)]);
        six["spec"]["clusterIPs"] = json!([format!("fd00:96::{n}")]);
        six["spec"]["ipFamilies"] = json!(["IPv6"]);
        let mut dual = service("dual", &[("http", 80)]);
        dual["spec"]["clusterIPs"] = json!([format!("10.96.0.{n}"), format!("fd00:96::d{n}")]);
        dual["spec"]["ipFamilies"] = json!(["IPv4", "IPv6"]);
        dual["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
        dual["spec"]["trafficDistribution"] = json!("PreferClose");
        dual["spec"]["internalTrafficPolicy"] = json!("Local");
        store.create(Kind::Service, six).expect("svc");
        store.create(Kind::Service, dual).expect("svc");
        store
            .create(
                Kind::EndpointSlice,
                slice_of("six", "IPv6", &[&format!("fd00:{n}::1")]),
            )
            .expect("slice");
        store
            .create(
                Kind::EndpointSlice,
                slice_of("dual", "IPv4", &[&format!("10.{n}.0.1")]),
            )
            .expect("slice");
        store
            .create(
                Kind::EndpointSlice,
                slice_of("dual", "IPv6", &[&format!("fd00:{n}::2")]),
            )
            .expect("slice");
        for name in ["six", "dual"] {
            store
                .create(Kind::ServiceExport, export(name))
                .expect("export");
        }
    }
    let cp = fleet
        .control_plane_with(
            "cp",
            &[
                "--clusterset-cidr",
                "10.112.0.0/12",
                "--clusterset-cidr",
                "fd00:112::/108",
            ],
        )
        .await;
    let v4: ipnet::IpNet = "10.112.0.0/12".parse().expect("cidr");
    let v6: ipnet::IpNet = "fd00:112::/108".parse().expect("cidr");
    let got = wait_addresses(&cp, "both imports", |a| {
        a.contains_key("clusterset/shop/six") && a.contains_key("clusterset/shop/dual")
    })
    .await;
    let six = &got["clusterset/shop/six"];
    assert!(six.len() == 1 && v6.contains(&six[0]), "IPv6 only: {six:?}");
    let dual = &got["clusterset/shop/dual"];
    assert!(
        dual.len() == 2 && v4.contains(&dual[0]) && v6.contains(&dual[1]),
        "dual-stack, the exports' order: {dual:?}"
    );
    assert!(cp.status.document().clusterset_issues.is_empty());

    // A node of north holds them with the exports' traffic settings and
    // answers A and AAAA accordingly.
    let north = fleet.agent("north", &cp).await;
    wait_import(
        &north,
        "dual",
        &[
            ("east", "10.1.0.1"),
            ("east", "fd00:1::2"),
            ("west", "10.2.0.1"),
            ("west", "fd00:2::2"),
        ],
    )
    .await;
    let held = north.state.borrow().clone();
    let service = &held.resources[&format!("{CLUSTERSET}/shop/dual")]
        .state
        .service;
    assert_eq!(service.traffic_distribution.as_deref(), Some("PreferClose"));
    assert_eq!(
        service.internal_traffic_policy,
        switchyard_model::TrafficPolicy::Local
    );
    let dns = north.dns_addr.expect("DNS");
    let d = dig(dns, &["six.shop.svc.clusterset.local", "AAAA"]).await;
    assert_eq!(d.data(), [six[0].to_string()], "{}", d.raw);
    let d = dig(dns, &["six.shop.svc.clusterset.local", "A"]).await;
    assert!(d.data().is_empty(), "{}", d.raw);
    let d = dig(dns, &["dual.shop.svc.clusterset.local", "A"]).await;
    assert_eq!(d.data(), [dual[0].to_string()], "{}", d.raw);
    let d = dig(dns, &["dual.shop.svc.clusterset.local", "AAAA"]).await;
    assert_eq!(d.data(), [dual[1].to_string()], "{}", d.raw);
}
