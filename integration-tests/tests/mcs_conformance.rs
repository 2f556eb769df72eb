//! The MCS API conformance suite (kubernetes-sigs/mcs-api `conformance/`,
//! v0.5) translated to this repository's fleet harness: two clusters
//! (east, west), each an API server stand-in serving the MCS CRDs in
//! v1beta1 and v1alpha1 with status subresources and server-side apply,
//! one control plane reading both through the unmodified kube client and
//! writing the clusterset back, and an agent per cluster whose DNS stub is
//! queried with dig. Each test names the conformance specs it covers; the
//! list in docs/mcs-conformance.md gives each one's result. Covered:
//! ServiceImports in every cluster while some cluster exports, their spec
//! following the export, headless and ExternalName exports, exported
//! labels, another implementation's import left alone, a v1alpha1-only
//! cluster, and the DNS specs with dig.
//!
//! As in the suite, "the first cluster" (east) exports first, so its
//! export is the oldest (exports of the same second fall back to the
//! cluster id, and east sorts first).

use std::net::SocketAddr;
use std::sync::Arc;

use serde_json::{Value, json};
use switchyard_agent::config::DnsListen;
use switchyard_control_plane::ControlPlane;
use switchyard_integration_tests::apiserver::{FakeApiServer, Kind, ServerConfig, Store};
use switchyard_integration_tests::dns::dig;
use switchyard_integration_tests::*;
use tokio::net::TcpListener;

const NS: &str = "mcs";

/// Two stand-ins, a kubeconfig naming them, one control plane over both.
struct Clusterset {
    dir: tempfile::TempDir,
    names: Vec<&'static str>,
    apis: Vec<FakeApiServer>,
}

impl Clusterset {
    async fn new(configs: &[(&'static str, ServerConfig)]) -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut apis = Vec::new();
        for (_, config) in configs {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            apis.push(FakeApiServer::start(listener, config.clone()).expect("stand-in"));
        }
        let names: Vec<&'static str> = configs.iter().map(|(n, _)| *n).collect();
        let mut k = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
        for (c, api) in names.iter().zip(&apis) {
            k.push_str(&format!(
                "- name: {c}\n  cluster:\n    server: {}\n",
                api.url()
            ));
        }
        k.push_str("users:\n- name: u\n  user: {}\ncontexts:\n");
        for c in &names {
            k.push_str(&format!(
                "- name: {c}\n  context:\n    cluster: {c}\n    user: u\n"
            ));
        }
        k.push_str(&format!("current-context: {}\n", names[0]));
        std::fs::write(dir.path().join("kubeconfig"), k).expect("kubeconfig");
        Self { dir, names, apis }
    }

    async fn two() -> Self {
        Self::new(&[
            ("east", ServerConfig::default()),
            ("west", ServerConfig::default()),
        ])
        .await
    }

    fn store(&self, cluster: &str) -> &Store {
        let i = self
            .names
            .iter()
            .position(|c| *c == cluster)
            .expect("a cluster");
        self.apis[i].store()
    }

    /// A control plane over every cluster, with state in `state`.
    async fn control_plane_in(&self, state: &str) -> ControlPlane {
        let mut argv: Vec<String> = vec!["switchyard-control-plane".into()];
        for c in &self.names {
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
        start_cp(<switchyard_control_plane::Args as clap::Parser>::parse_from(argv)).await
    }

    async fn control_plane(&self) -> ControlPlane {
        self.control_plane_in("cp").await
    }

    /// An agent of `cluster` with a DNS stub on loopback.
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

    /// The hello Service (`spec` merged over one TCP port 42) with one
    /// ready endpoint per address, in `cluster`.
    fn deploy(&self, cluster: &str, spec: Value, addresses: &[&str]) {
        let mut full = json!({"ports": [{"port": 42, "protocol": "TCP", "targetPort": 8080}]});
        if let (Some(f), Some(s)) = (full.as_object_mut(), spec.as_object()) {
            f.extend(s.clone());
        }
        let external = full.get("type").and_then(Value::as_str) == Some("ExternalName");
        if !external && full.get("clusterIP").is_none() {
            let ip = if cluster == "east" {
                "10.96.1.42"
            } else {
                "10.96.2.42"
            };
            full["clusterIP"] = json!(ip);
        }
        let store = self.store(cluster);
        store
            .create(
                Kind::Service,
                json!({"apiVersion": "v1", "kind": "Service",
                       "metadata": {"namespace": NS, "name": "hello"}, "spec": full}),
            )
            .expect("service");
        let endpoints: Vec<Value> = addresses
            .iter()
            .enumerate()
            .map(|(i, ip)| {
                json!({"addresses": [ip], "conditions": {"ready": true},
                       "hostname": format!("hello-{i}")})
            })
            .collect();
        let ports: Vec<Value> = full["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| json!({"name": p.get("name").cloned().unwrap_or(json!("")), "port": p["targetPort"], "protocol": p["protocol"]}))
            .collect();
        store
            .create(
                Kind::EndpointSlice,
                json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                       "metadata": {"namespace": NS, "name": "hello-1",
                                    "labels": {"kubernetes.io/service-name": "hello"}},
                       "addressType": "IPv4", "ports": ports, "endpoints": endpoints}),
            )
            .expect("slice");
    }

    fn export(&self, cluster: &str, spec: Value) {
        self.store(cluster)
            .create(
                Kind::ServiceExport,
                json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceExport",
                       "metadata": {"namespace": NS, "name": "hello"}, "spec": spec}),
            )
            .expect("export");
    }

    fn unexport(&self, cluster: &str) {
        self.store(cluster)
            .delete(&(Kind::ServiceExport, NS.into(), "hello".into()))
            .expect("unexport");
    }

    /// The ServiceImport `hello` of `cluster` once `check` holds of it.
    async fn import_until(
        &self,
        cluster: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Arc<Value> {
        let store = self.store(cluster);
        let key = (Kind::ServiceImport, NS.to_owned(), "hello".to_owned());
        within(&format!("{cluster}'s ServiceImport: {what}"), async {
            store
                .until(|s| s.get(&key).is_some_and(|o| check(&o)))
                .await;
        })
        .await;
        store.get(&key).expect("present")
    }

    async fn import(&self, cluster: &str) -> Arc<Value> {
        self.import_until(cluster, "exists", |_| true).await
    }

    async fn no_import(&self, cluster: &str, why: &str) {
        let store = self.store(cluster);
        let key = (Kind::ServiceImport, NS.to_owned(), "hello".to_owned());
        within(
            &format!("{cluster}: {why}"),
            store.until(|s| s.get(&key).is_none()),
        )
        .await;
    }

    /// Waits for the ServiceExport of `cluster` to carry condition `kind`
    /// with `status`; returns it.
    async fn condition(&self, cluster: &str, kind: &str, status: &str) -> Value {
        let store = self.store(cluster);
        let key = (Kind::ServiceExport, NS.to_owned(), "hello".to_owned());
        let find = |s: &Store| -> Option<Value> {
            s.get(&key)?
                .pointer("/status/conditions")?
                .as_array()?
                .iter()
                .find(|c| c["type"] == kind && c["status"] == status)
                .cloned()
        };
        within(
            &format!("{cluster}'s ServiceExport condition {kind}={status}"),
            store.until(|s| find(s).is_some()),
        )
        .await;
        find(store).expect("present")
    }
}

fn ports(import: &Value) -> Vec<(String, u64, String)> {
    let mut out: Vec<(String, u64, String)> = import["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["port"].as_u64().unwrap_or_default(),
                p["protocol"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

fn ips(import: &Value) -> Vec<String> {
    import["spec"]["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip.as_str().map(str::to_owned))
        .collect()
}

/// Specs 1 and 4: a ClusterSetIP import in every cluster's namespace that
/// lives while at least one cluster exports, deleted with the last export;
/// `status.clusters` lists the exporters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_exists_in_every_cluster_while_some_cluster_exports() {
    let set = Clusterset::two().await;
    let _cp = set.control_plane().await;
    set.deploy("east", json!({}), &["10.1.0.1"]);
    set.export("east", json!({}));
    for c in ["east", "west"] {
        let import = set.import(c).await;
        assert_eq!(import["spec"]["type"], "ClusterSetIP", "{c}: {import}");
        assert_eq!(
            import["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "switchyard"
        );
    }
    set.deploy("west", json!({}), &["10.2.0.1"]);
    set.export("west", json!({}));
    set.import_until("east", "both clusters in status.clusters", |i| {
        i.pointer("/status/clusters") == Some(&json!([{"cluster": "east"}, {"cluster": "west"}]))
    })
    .await;
    set.condition("west", "Valid", "True").await;
    set.condition("west", "Ready", "True").await;
    set.unexport("east");
    let import = set
        .import_until("west", "only west in status.clusters", |i| {
            i.pointer("/status/clusters") == Some(&json!([{"cluster": "west"}]))
        })
        .await;
    assert_eq!(import["spec"]["type"], "ClusterSetIP");
    set.unexport("west");
    for c in ["east", "west"] {
        set.no_import(c, "the import is deleted once no cluster exports")
            .await;
    }
}

/// Specs 5, 8 and 9: session affinity and its config, an IP, and the
/// ports of the export; and what v1beta1 adds: the ClusterSet IP's
/// family, `ipFamilies`, the Valid/Ready/Conflict conditions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusterset_ip_import_follows_its_export() {
    let set = Clusterset::two().await;
    let cp = set.control_plane().await;
    set.deploy(
        "east",
        json!({"sessionAffinity": "ClientIP",
               "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 300}},
               "ports": [{"name": "http", "port": 42, "protocol": "TCP", "targetPort": 8080},
                         {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353}]}),
        &["10.1.0.1"],
    );
    set.export("east", json!({}));
    let import = set.import("west").await;
    assert_eq!(import["spec"]["sessionAffinity"], "ClientIP");
    assert_eq!(
        import["spec"]["sessionAffinityConfig"],
        json!({"clientIP": {"timeoutSeconds": 300}})
    );
    let addrs = ips(&import);
    assert_eq!(addrs.len(), 1, "{import}");
    let ip: std::net::IpAddr = addrs[0].parse().expect("a valid IP");
    assert!(ip.is_ipv4());
    assert_eq!(import["spec"]["ipFamilies"], json!(["IPv4"]));
    assert_eq!(
        ports(&import),
        [
            ("dns".into(), 53, "UDP".into()),
            ("http".into(), 42, "TCP".into())
        ]
    );
    // The same import, the same IP, in the other cluster.
    assert_eq!(ips(&*set.import("east").await), addrs);
    let valid = set.condition("east", "Valid", "True").await;
    assert_eq!(valid["reason"], "Valid");
    assert!(valid["lastTransitionTime"].as_str().is_some());
    assert_eq!(
        set.condition("east", "Ready", "True").await["reason"],
        "Exported"
    );
    assert_eq!(
        set.condition("east", "Conflict", "False").await["reason"],
        "NoConflicts"
    );
    // /status: the writes, per cluster.
    let doc = cp_status_until(&cp, "both clusters written", |d| {
        ["east", "west"].iter().all(|c| {
            d.write_back.get(*c).is_some_and(|w| {
                w.imports == 1 && w.failing.is_empty() && w.in_sync_at_unix.is_some()
            })
        })
    })
    .await;
    assert_eq!(
        doc.write_back["east"].api_version.as_deref(),
        Some("multicluster.x-k8s.io/v1beta1")
    );
    assert_eq!(doc.write_back["east"].exports, 1);
    assert_eq!(doc.write_back["west"].exports, 0);
}

/// Specs 12 and 13: a Headless import in every cluster, without IPs,
/// deleted on unexport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_import_has_no_ip() {
    let set = Clusterset::two().await;
    let _cp = set.control_plane().await;
    set.deploy(
        "east",
        json!({"clusterIP": "None"}),
        &["10.1.0.1", "10.1.0.2"],
    );
    set.export("east", json!({}));
    for c in ["east", "west"] {
        let import = set.import(c).await;
        assert_eq!(import["spec"]["type"], "Headless", "{c}: {import}");
        assert!(ips(&import).is_empty(), "{import}");
    }
    set.unexport("east");
    for c in ["east", "west"] {
        set.no_import(c, "the headless import is deleted on unexport")
            .await;
    }
}

/// Spec 14: exporting an ExternalName Service sets Valid=False and
/// imports nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_name_export_is_not_valid() {
    let set = Clusterset::two().await;
    let _cp = set.control_plane().await;
    set.deploy(
        "east",
        json!({"type": "ExternalName", "externalName": "example.com"}),
        &[],
    );
    set.export("east", json!({}));
    let valid = set.condition("east", "Valid", "False").await;
    assert_eq!(valid["reason"], "InvalidServiceType");
    assert_eq!(
        set.condition("east", "Ready", "False").await["reason"],
        "Failed"
    );
    // And a ServiceExport without a Service.
    set.store("west")
        .create(
            Kind::ServiceExport,
            json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceExport",
                   "metadata": {"namespace": NS, "name": "hello"}}),
        )
        .expect("export");
    assert_eq!(
        set.condition("west", "Valid", "False").await["reason"],
        "NoService"
    );
    assert!(
        set.store("east")
            .get(&(Kind::ServiceImport, NS.into(), "hello".into()))
            .is_none(),
        "no import for an ExternalName Service"
    );
}

/// Spec 2: only what the ServiceExport lists as exported labels and
/// annotations reaches the ServiceImport, not the Service's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exported_labels_and_annotations_reach_the_import() {
    let set = Clusterset::two().await;
    let _cp = set.control_plane().await;
    let store = set.store("east");
    set.deploy("east", json!({}), &["10.1.0.1"]);
    let mut svc = (*store
        .get(&(Kind::Service, NS.into(), "hello".into()))
        .expect("service"))
    .clone();
    svc["metadata"]["labels"] = json!({"svc-label": "true"});
    svc["metadata"]["annotations"] = json!({"svc-annotation": "true"});
    store.update(Kind::Service, svc).expect("labels");
    set.export(
        "east",
        json!({"exportedLabels": {"dummy-label": "true"},
               "exportedAnnotations": {"dummy-annotation": "true"}}),
    );
    for c in ["east", "west"] {
        let import = set.import(c).await;
        let meta = &import["metadata"];
        assert_eq!(meta["labels"]["dummy-label"], "true", "{import}");
        assert_eq!(meta["annotations"]["dummy-annotation"], "true", "{import}");
        assert!(meta["labels"].get("svc-label").is_none(), "{import}");
        assert!(
            meta["annotations"].get("svc-annotation").is_none(),
            "{import}"
        );
    }
}

/// What an MCS implementation must not do: take over a ServiceImport that
/// another one manages. It is left alone and the write reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_of_another_implementation_is_left_alone() {
    let set = Clusterset::two().await;
    let foreign = json!({"apiVersion": "multicluster.x-k8s.io/v1beta1", "kind": "ServiceImport",
                         "metadata": {"namespace": NS, "name": "hello"},
                         "spec": {"type": "ClusterSetIP", "ips": ["10.99.0.1"],
                                  "ports": [{"port": 1, "protocol": "TCP"}]}});
    set.store("west")
        .create(Kind::ServiceImport, foreign)
        .expect("foreign import");
    let cp = set.control_plane().await;
    set.deploy("east", json!({}), &["10.1.0.1"]);
    set.export("east", json!({}));
    set.import("east").await;
    let doc = cp_status_until(&cp, "west's write refused", |d| {
        d.write_back.get("west").is_some_and(|w| {
            w.failing
                .iter()
                .any(|f| f.object == "ServiceImport mcs/hello")
        })
    })
    .await;
    let f = &doc.write_back["west"].failing[0];
    assert_eq!(f.field, "metadata.labels");
    assert!(
        f.message.contains("another implementation"),
        "{}",
        f.message
    );
    let west = set
        .store("west")
        .get(&(Kind::ServiceImport, NS.into(), "hello".into()))
        .expect("still there");
    assert_eq!(ips(&west), ["10.99.0.1"], "untouched");
    // Unexporting deletes ours, never theirs.
    set.unexport("east");
    set.no_import("east", "ours deleted").await;
    assert!(
        set.store("west")
            .get(&(Kind::ServiceImport, NS.into(), "hello".into()))
            .is_some(),
        "theirs kept"
    );
}

/// A cluster with the CRDs of MCS API v0.1 (v1alpha1 only) is read and
/// written in v1alpha1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1alpha1_cluster_is_written_in_v1alpha1() {
    let old = ServerConfig {
        mcs_v1beta1: false,
        ..ServerConfig::default()
    };
    let set = Clusterset::new(&[("east", ServerConfig::default()), ("west", old)]).await;
    let cp = set.control_plane().await;
    set.deploy("west", json!({}), &["10.2.0.1"]);
    set.store("west")
        .create(
            Kind::ServiceExport,
            json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                   "metadata": {"namespace": NS, "name": "hello"}}),
        )
        .expect("v1alpha1 export");
    for c in ["east", "west"] {
        set.import(c).await;
    }
    set.condition("west", "Ready", "True").await;
    let version = |d: &switchyard_control_plane::status::StatusDocument, c: &str| {
        d.write_back.get(c).and_then(|w| w.api_version.clone())
    };
    cp_status_until(&cp, "west written in v1alpha1, east in v1beta1", |d| {
        version(d, "west").as_deref() == Some("multicluster.x-k8s.io/v1alpha1")
            && version(d, "east").as_deref() == Some("multicluster.x-k8s.io/v1beta1")
    })
    .await;
    // What the writer applied records the version it wrote in.
    let import = set.import("west").await;
    let versions: Vec<&str> = import["metadata"]["managedFields"]
        .as_array()
        .expect("managedFields")
        .iter()
        .filter(|m| m["manager"] == "switchyard")
        .filter_map(|m| m["apiVersion"].as_str())
        .collect();
    assert!(
        !versions.is_empty()
            && versions
                .iter()
                .all(|v| *v == "multicluster.x-k8s.io/v1alpha1"),
        "{versions:?}"
    );
}

/// DNS specs 16 and 17 (ClusterIP): the clusterset name resolves to the
/// ClusterSet IP in every cluster, and SRV on the bare name returns
/// exactly one record per port, targeting that name; spec 18: the
/// cluster-local name resolves only the local Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusterset_names_resolve_to_the_clusterset_ip() {
    let set = Clusterset::two().await;
    let cp = set.control_plane().await;
    set.deploy("east", json!({}), &["10.1.0.1"]);
    set.export("east", json!({}));
    let import = set
        .import_until("east", "an IP", |i| !ips(i).is_empty())
        .await;
    let clusterset_ip = ips(&import)[0].clone();
    let east = set.agent("east", &cp).await;
    let west = set.agent("west", &cp).await;
    for agent in [&east, &west] {
        let dns: SocketAddr = agent.dns_addr.expect("DNS");
        let name = "hello.mcs.svc.clusterset.local";
        let d = within("the clusterset name", async {
            loop {
                let d = dig(dns, &[name, "A"]).await;
                if !d.data().is_empty() {
                    return d;
                }
                agent.state.clone().changed().await.ok();
            }
        })
        .await;
        assert_eq!(d.data(), std::slice::from_ref(&clusterset_ip), "{}", d.raw);
        let d = dig(dns, &[name, "SRV"]).await;
        assert_eq!(d.data(), [format!("0 100 42 {name}.")], "{}", d.raw);
    }
    // Only east has a local hello; west's cluster.local name does not exist.
    let d = dig(
        east.dns_addr.expect("DNS"),
        &["hello.mcs.svc.cluster.local", "A"],
    )
    .await;
    assert_eq!(d.data(), ["10.96.1.42"], "{}", d.raw);
    let d = dig(
        west.dns_addr.expect("DNS"),
        &["hello.mcs.svc.cluster.local", "A"],
    )
    .await;
    assert_eq!(d.status, "NXDOMAIN", "{}", d.raw);
}

/// DNS specs 19 and 21 (headless): the clusterset name returns the ready
/// endpoint addresses, and SRV on it one record per endpoint, targeting
/// the endpoint's host name under its cluster id (spec 20's name, which
/// resolves to the endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_clusterset_names_resolve_to_the_endpoints() {
    let set = Clusterset::two().await;
    let cp = set.control_plane().await;
    // As the suite's hello pods, the endpoints listen on the Service's port.
    set.deploy(
        "east",
        json!({"clusterIP": "None", "ports": [{"port": 42, "protocol": "TCP", "targetPort": 42}]}),
        &["10.1.0.1", "10.1.0.2"],
    );
    set.export("east", json!({}));
    set.import("west").await;
    let west = set.agent("west", &cp).await;
    let dns = west.dns_addr.expect("DNS");
    let name = "hello.mcs.svc.clusterset.local";
    let d = within("the headless clusterset name", async {
        loop {
            let d = dig(dns, &[name, "A"]).await;
            if d.data().len() == 2 {
                return d;
            }
            west.state.clone().changed().await.ok();
        }
    })
    .await;
    let mut got = d.data();
    got.sort();
    assert_eq!(got, ["10.1.0.1", "10.1.0.2"], "{}", d.raw);
    let d = dig(dns, &[name, "SRV"]).await;
    let mut got = d.data();
    got.sort();
    assert_eq!(
        got,
        [
            format!("0 100 42 hello-0.east.{name}."),
            format!("0 100 42 hello-1.east.{name}.")
        ],
        "{}",
        d.raw
    );
    let d = dig(dns, &[&format!("hello-1.east.{name}"), "A"]).await;
    assert_eq!(d.data(), ["10.1.0.2"], "{}", d.raw);
}

/// The reasons of `cluster`'s Conflict condition once it is True.
async fn conflict_reasons(set: &Clusterset, cluster: &str) -> Vec<String> {
    let c = set.condition(cluster, "Conflict", "True").await;
    let mut reasons: Vec<String> = c["reason"]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .map(str::to_owned)
        .collect();
    reasons.sort();
    assert!(
        c["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{cluster}: a Conflict condition explains itself: {c}"
    );
    reasons
}

/// Spec 3: exports whose exported labels and annotations differ conflict.
/// The oldest export's are imported, and both exports say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_with_different_labels_conflict() {
    let set = Clusterset::two().await;
    let _cp = set.control_plane().await;
    set.deploy("east", json!({}), &["10.1.0.1"]);
    set.export(
        "east",
        json!({"exportedLabels": {"tier": "gold"}, "exportedAnnotations": {"note": "a"}}),
    );
    set.import_until("west", "east's label", |i| {
        i["metadata"]["labels"]["tier"] == "gold"
    })
    .await;
    set.deploy("west", json!({}), &["10.2.0.1"]);
    set.export(
        "west",
        json!({"exportedLabels": {"tier": "silver"}, "exportedAnnotations": {"note": "b"}}),
    );
    for c in ["east", "west"] {
        assert_eq!(
            conflict_reasons(&set, c).await,
            ["AnnotationsConflict", "LabelsConflict"],
            "{c}"
        );
    }
    let import = set
        .import_until("west", "both clusters exporting", |i| {
            i.pointer("/status/clusters")
                == Some(&json!([{"cluster": "east"}, {"cluster": "west"}]))
        })
        .await;
    assert_eq!(import["metadata"]["labels"]["tier"], "gold", "{import}");
    assert_eq!(import["metadata"]["annotations"]["note"], "a", "{import}");
    // Conflicts do not make an export invalid: both stay Valid and Ready.
    for c in ["east", "west"] {
        set.condition(c, "Valid", "True").await;
        set.condition(c, "Ready", "True").await;
    }
}

/// Spec 10: the import's ports are the union of the exports' ports, and
/// both exports say PortConflict since their ports differ; spec 11: a port
/// that means something else in each export conflicts, on both exports,
/// and the oldest export's port is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ports_are_the_union_and_a_port_collision_conflicts() {
    let set = Clusterset::two().await;
    let _cp = set.control_plane().await;
    // The suite's ports: hello has tcp and udp 42, the second cluster's
    // hello tcp 42 and stcp 142 (SCTP).
    set.deploy(
        "east",
        json!({"ports": [{"name": "tcp", "port": 42, "protocol": "TCP", "targetPort": 42},
                         {"name": "udp", "port": 42, "protocol": "UDP", "targetPort": 42}]}),
        &["10.1.0.1"],
    );
    set.export("east", json!({}));
    set.deploy(
        "west",
        json!({"ports": [{"name": "tcp", "port": 42, "protocol": "TCP", "targetPort": 42},
                         {"name": "stcp", "port": 142, "protocol": "SCTP", "targetPort": 142}]}),
        &["10.2.0.1"],
    );
    set.export("west", json!({}));
    let import = set
        .import_until("east", "the union of the ports", |i| ports(i).len() == 3)
        .await;
    assert_eq!(
        ports(&import),
        [
            ("stcp".into(), 142, "SCTP".into()),
            ("tcp".into(), 42, "TCP".into()),
            ("udp".into(), 42, "UDP".into())
        ]
    );
    // Exports that do not offer the same ports conflict, though the union
    // is served.
    for c in ["east", "west"] {
        assert_eq!(conflict_reasons(&set, c).await, ["PortConflict"], "{c}");
    }
    // West's tcp moves to 43 (the suite's conflicting ports): the name now
    // means two ports.
    let store = set.store("west");
    let mut svc = (*store
        .get(&(Kind::Service, NS.into(), "hello".into()))
        .expect("service"))
    .clone();
    svc["spec"]["ports"][0]["port"] = json!(43);
    store.update(Kind::Service, svc).expect("port change");
    for c in ["east", "west"] {
        assert_eq!(conflict_reasons(&set, c).await, ["PortConflict"], "{c}");
    }
    let import = set.import("west").await;
    assert!(
        ports(&import).contains(&("tcp".into(), 42, "TCP".into())),
        "the oldest export's tcp is used: {import}"
    );
    assert!(
        !ports(&import).iter().any(|p| p.1 == 43),
        "the colliding port is left out: {import}"
    );
}

/// Spec 15: a headless export beside a ClusterSetIP one conflicts on both;
/// the oldest export's type is imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_export_beside_a_clusterset_ip_one_conflicts() {
    let set = Clusterset::two().await;
    let _cp = set.control_plane().await;
    set.deploy("east", json!({}), &["10.1.0.1"]);
    set.export("east", json!({}));
    set.import("west").await;
    set.deploy("west", json!({"clusterIP": "None"}), &["10.2.0.1"]);
    set.export("west", json!({}));
    for c in ["east", "west"] {
        assert_eq!(conflict_reasons(&set, c).await, ["TypeConflict"], "{c}");
    }
    let import = set.import("west").await;
    assert_eq!(import["spec"]["type"], "ClusterSetIP", "{import}");
    assert_eq!(ips(&import).len(), 1, "{import}");
}

/// Specs 6 and 7: `internalTrafficPolicy` and `trafficDistribution` follow
/// the export onto the ServiceImport; an export that differs conflicts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_policies_follow_the_export() {
    let set = Clusterset::two().await;
    let _cp = set.control_plane().await;
    set.deploy(
        "east",
        json!({"internalTrafficPolicy": "Local", "trafficDistribution": "PreferClose"}),
        &["10.1.0.1"],
    );
    set.export("east", json!({}));
    let import = set
        .import_until("west", "the export's traffic policies", |i| {
            i["spec"]["internalTrafficPolicy"] == "Local"
        })
        .await;
    assert_eq!(
        import["spec"]["trafficDistribution"], "PreferClose",
        "{import}"
    );
    set.deploy("west", json!({}), &["10.2.0.1"]);
    set.export("west", json!({}));
    for c in ["east", "west"] {
        assert_eq!(
            conflict_reasons(&set, c).await,
            [
                "InternalTrafficPolicyConflict",
                "TrafficDistributionConflict"
            ],
            "{c}"
        );
    }
    let import = set.import("east").await;
    assert_eq!(import["spec"]["internalTrafficPolicy"], "Local", "{import}");
}
