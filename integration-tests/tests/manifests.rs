//! Every manifest in `deploy/kubernetes/` parses into its Kubernetes type,
//! with no field the type does not know; the RBAC is read-only; container
//! arguments parse with the binaries' own command-line parsers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every document of every YAML file, with where it came from.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(manifests_dir())
        .expect("deploy/kubernetes exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests found");
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable");
        let parsed: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()));
        for (i, doc) in parsed.into_iter().enumerate() {
            if !doc.is_null() {
                docs.push((format!("{}#{}", file.display(), i + 1), doc));
            }
        }
    }
    docs
}

/// Paths present in `original` but absent from `roundtrip`: fields the type dropped.
fn dropped(original: &Value, roundtrip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, roundtrip) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => dropped(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, v) in a.iter().enumerate() {
                match b.get(i) {
                    Some(w) => dropped(v, w, &format!("{path}[{i}]"), out),
                    None => out.push(format!("{path}[{i}]")),
                }
            }
        }
        _ => {}
    }
}

fn parse<T: DeserializeOwned + Serialize>(at: &str, doc: &Value) -> T {
    let typed: T =
        serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{at}: does not parse: {e}"));
    let back = serde_json::to_value(&typed).expect("serializes");
    let mut unknown = Vec::new();
    dropped(doc, &back, "", &mut unknown);
    assert!(unknown.is_empty(), "{at}: unknown fields {unknown:?}");
    typed
}

/// The container's command line as the kubelet runs it: `$(VAR)` replaced
/// by the container's environment (values, and keys of the manifests'
/// ConfigMaps; a field reference stands for `node-a`).
fn args(c: &Container) -> Vec<String> {
    let config: Vec<ConfigMap> = documents()
        .iter()
        .filter(|(_, d)| d["kind"] == "ConfigMap")
        .map(|(at, d)| parse(at, d))
        .collect();
    let mut env: Vec<(String, String)> = Vec::new();
    for e in c.env.iter().flatten() {
        let from = e.value_from.as_ref();
        let value = if let Some(v) = &e.value {
            v.clone()
        } else if let Some(key) = from.and_then(|f| f.config_map_key_ref.as_ref()) {
            config
                .iter()
                .find(|m| m.metadata.name.as_deref() == Some(key.name.as_str()))
                .and_then(|m| m.data.as_ref()?.get(&key.key).cloned())
                .unwrap_or_else(|| panic!("env {}: no ConfigMap key {key:?}", e.name))
        } else {
            "node-a".to_owned()
        };
        env.push((format!("$({})", e.name), value));
    }
    let mut argv = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    for arg in &mut argv {
        for (var, value) in &env {
            *arg = arg.replace(var, value);
        }
    }
    argv
}

/// A socket one container listens on in the host network: protocol,
/// address and port, and the flag or port that opens it.
#[derive(Debug, Clone)]
struct Listener {
    proto: &'static str,
    addr: std::net::SocketAddr,
    from: String,
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({})", self.proto, self.addr, self.from)
    }
}

impl Listener {
    fn new(proto: &'static str, addr: std::net::SocketAddr, from: &str) -> Self {
        Self {
            proto,
            addr,
            from: from.to_owned(),
        }
    }

    /// Whether both cannot be bound on one host at once.
    fn collides(&self, other: &Self) -> bool {
        self.proto == other.proto
            && self.addr.port() == other.addr.port()
            && (self.addr.ip() == other.addr.ip()
                || self.addr.ip().is_unspecified()
                || other.addr.ip().is_unspecified())
    }
}

/// Every socket a host-network workload's containers open: what their
/// command lines bind (defaults included, through the binaries' parsers)
/// and their declared ports.
fn host_listeners(at: &str, pod: &k8s_openapi::api::core::v1::PodSpec) -> Vec<Listener> {
    let mut out = Vec::new();
    for c in &pod.containers {
        let argv = args(c);
        match argv.first().map(String::as_str) {
            Some("switchyard-agent") => {
                let a = <switchyard_agent::Args as clap::Parser>::try_parse_from(&argv)
                    .unwrap_or_else(|e| panic!("{at}: {argv:?}: {e}"));
                out.push(Listener::new("TCP", a.admin_listen, "--admin-listen"));
                out.extend(
                    a.metrics_listen
                        .map(|m| Listener::new("TCP", m, "--metrics-listen")),
                );
                out.extend(
                    a.proxy_healthz()
                        .map(|h| Listener::new("TCP", h, "--healthz-bind-address")),
                );
                if let switchyard_agent::config::DnsListen::Addr(d) = a.dns_listen {
                    out.push(Listener::new("TCP", d, "--dns-listen"));
                    out.push(Listener::new("UDP", d, "--dns-listen"));
                }
            }
            Some("switchyard-control-plane") => {
                let a = <switchyard_control_plane::Args as clap::Parser>::try_parse_from(&argv)
                    .unwrap_or_else(|e| panic!("{at}: {argv:?}: {e}"));
                out.push(Listener::new("TCP", a.grpc_listen, "--grpc-listen"));
                out.push(Listener::new("TCP", a.admin_listen, "--admin-listen"));
                out.extend(
                    a.health_listen
                        .map(|h| Listener::new("TCP", h, "--health-listen")),
                );
            }
            other => panic!("{at}: unknown program {other:?}"),
        }
        for p in c.ports.iter().flatten() {
            let proto = if p.protocol.as_deref() == Some("UDP") {
                "UDP"
            } else {
                "TCP"
            };
            let port = u16::try_from(p.container_port).expect("a port");
            // A declared port is one the command line opens, not another.
            assert!(
                out.iter()
                    .any(|l| l.proto == proto && l.addr.port() == port),
                "{at}: containerPort {port} is opened by no flag"
            );
        }
    }
    out
}

#[test]
fn every_manifest_is_a_known_kind_with_known_fields() {
    let mut kinds = Vec::new();
    for (at, doc) in documents() {
        let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_owned();
        let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => drop(parse::<Namespace>(&at, &doc)),
            ("v1", "ServiceAccount") => drop(parse::<ServiceAccount>(&at, &doc)),
            ("v1", "Secret") => drop(parse::<Secret>(&at, &doc)),
            ("v1", "ConfigMap") => {
                let cm: ConfigMap = parse(&at, &doc);
                let data = cm.data.unwrap_or_default();
                for key in [
                    "control-plane",
                    "api-server-host",
                    "api-server-port",
                    "cluster-cidr",
                    "service-cidr",
                ] {
                    assert!(data.contains_key(key), "{at}: bootstrap key {key}");
                }
                assert!(
                    !data["control-plane"].contains(".svc"),
                    "{at}: agents must not need a Service to reach the control plane"
                );
            }
            ("v1", "Service") => drop(parse::<Service>(&at, &doc)),
            ("policy/v1", "PodDisruptionBudget") => drop(parse::<PodDisruptionBudget>(&at, &doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                // Exactly what the control plane does: reads, and the MCS
                // API's writes (ServiceImports, ServiceExport conditions).
                let needed: BTreeMap<(&str, &str), &[&str]> = BTreeMap::from([
                    (("", "services"), &["list", "watch"][..]),
                    (("", "nodes"), &["list", "watch"]),
                    (("discovery.k8s.io", "endpointslices"), &["list", "watch"]),
                    (
                        ("multicluster.x-k8s.io", "serviceexports"),
                        &["list", "watch"],
                    ),
                    (
                        ("multicluster.x-k8s.io", "serviceexports/status"),
                        &["patch"],
                    ),
                    (
                        ("multicluster.x-k8s.io", "serviceimports"),
                        &["get", "list", "watch", "create", "patch", "delete"],
                    ),
                    (
                        ("multicluster.x-k8s.io", "serviceimports/status"),
                        &["patch"],
                    ),
                ]);
                let role: ClusterRole = parse(&at, &doc);
                let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
                for rule in role.rules.unwrap_or_default() {
                    for group in rule.api_groups.unwrap_or_default() {
                        for r in rule.resources.clone().unwrap_or_default() {
                            assert!(r != "*" && group != "*", "{at}: wildcard");
                            granted
                                .entry((group.clone(), r))
                                .or_default()
                                .extend(rule.verbs.iter().cloned());
                        }
                    }
                }
                let needed: BTreeMap<(String, String), BTreeSet<String>> = needed
                    .into_iter()
                    .map(|((g, r), v)| {
                        (
                            (g.to_owned(), r.to_owned()),
                            v.iter().map(|v| (*v).to_owned()).collect(),
                        )
                    })
                    .collect();
                assert_eq!(
                    granted, needed,
                    "{at}: the ClusterRole grants more or less than needed"
                );
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                drop(parse::<ClusterRoleBinding>(&at, &doc))
            }
            ("rbac.authorization.k8s.io/v1", "Role") => {
                let role: Role = parse(&at, &doc);
                for rule in role.rules.unwrap_or_default() {
                    assert!(
                        rule.verbs
                            .iter()
                            .all(|v| ["get", "list", "watch"].contains(&v.as_str())),
                        "{at}: more than read access"
                    );
                    assert_eq!(
                        rule.resources.as_deref(),
                        Some(&["configmaps".to_owned()][..])
                    );
                    assert_eq!(
                        rule.resource_names.as_deref(),
                        Some(&["kube-dns".to_owned()][..]),
                        "{at}: the kube-dns ConfigMap only"
                    );
                }
            }
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                drop(parse::<RoleBinding>(&at, &doc))
            }
            ("apps/v1", "Deployment") => {
                let d: Deployment = parse(&at, &doc);
                let spec = d.spec.expect("spec");
                assert_eq!(spec.replicas, Some(2), "{at}: two replicas");
                let pod = spec.template.spec.expect("pod spec");
                assert_eq!(
                    pod.service_account_name.as_deref(),
                    Some("switchyard-control-plane")
                );
                assert_eq!(
                    pod.host_network,
                    Some(true),
                    "{at}: reachable at its nodes' addresses, with no Service rule"
                );
                assert_eq!(
                    pod.dns_policy.as_deref(),
                    Some("Default"),
                    "{at}: the node's resolver (the cluster DNS needs the rules the agents wait for this control plane to send)"
                );
                for c in &pod.containers {
                    let argv = args(c);
                    let parsed =
                        <switchyard_control_plane::Args as clap::Parser>::try_parse_from(&argv)
                            .unwrap_or_else(|e| panic!("{at}: {argv:?}: {e}"));
                    assert!(parsed.tls_client_ca.is_some(), "{at}: mTLS on");
                    assert!(
                        parsed.admin_listen.ip().is_loopback(),
                        "{at}: /status stays off the network"
                    );
                    let probes = parsed.health_listen.expect("a probe address");
                    for probe in [&c.readiness_probe, &c.liveness_probe] {
                        let port = probe
                            .as_ref()
                            .and_then(|p| p.http_get.as_ref())
                            .map(|h| h.port.clone());
                        let named = c.ports.iter().flatten().find(|p| {
                            port == Some(
                                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(
                                    p.name.clone().unwrap_or_default(),
                                ),
                            )
                        });
                        assert_eq!(
                            named.map(|p| p.container_port),
                            Some(i32::from(probes.port())),
                            "{at}: probes go to --health-listen"
                        );
                    }
                    let env = c.env.clone().unwrap_or_default();
                    assert!(
                        env.iter().any(|e| e.name == "KUBERNETES_SERVICE_HOST"),
                        "{at}: the API server is reached without the kubernetes Service"
                    );
                }
            }
            ("apps/v1", "DaemonSet") => {
                let ds: DaemonSet = parse(&at, &doc);
                let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
                assert_eq!(pod.host_network, Some(true), "{at}: host network");
                assert_eq!(
                    pod.dns_policy.as_deref(),
                    Some("Default"),
                    "{at}: the node's resolver (the cluster DNS is behind a cluster IP)"
                );
                assert!(
                    pod.volumes.unwrap_or_default().iter().any(|v| v
                        .host_path
                        .as_ref()
                        .is_some_and(|h| h.path == "/var/lib/switchyard/agent")),
                    "{at}: state on a hostPath"
                );
                for c in &pod.containers {
                    let sc = c.security_context.clone().unwrap_or_default();
                    let caps = sc.capabilities.and_then(|c| c.add).unwrap_or_default();
                    assert!(
                        sc.privileged == Some(true) || caps.iter().any(|c| c == "NET_ADMIN"),
                        "{at}: privileged or NET_ADMIN"
                    );
                    let argv = args(c);
                    let parsed = <switchyard_agent::Args as clap::Parser>::try_parse_from(&argv)
                        .unwrap_or_else(|e| panic!("{at}: {argv:?}: {e}"));
                    assert!(
                        parsed.tls_cert.is_some() && parsed.tls_ca.is_some(),
                        "{at}: mTLS on"
                    );
                    assert!(
                        !parsed.control_plane.iter().any(|u| u.contains(".svc")),
                        "{at}: a fresh node cannot reach a Service before its agent programmed it"
                    );
                    assert!(
                        parsed.admin_listen.ip().is_loopback(),
                        "{at}: admin on loopback"
                    );
                    let metrics = parsed.metrics_listen.expect("--metrics-listen is wired");
                    assert!(
                        !metrics.ip().is_loopback(),
                        "{at}: metrics reachable by Prometheus"
                    );
                    let ports = c.ports.clone().unwrap_or_default();
                    assert!(
                        ports.iter().any(|p| p.name.as_deref() == Some("metrics")
                            && p.container_port == i32::from(metrics.port())),
                        "{at}: the metrics port is declared"
                    );
                    if matches!(
                        parsed.dataplane,
                        switchyard_agent::config::DataPlaneKind::Iptables
                    ) {
                        assert_eq!(sc.privileged, Some(true), "{at}: iptables needs privileged");
                    }
                }
            }
            other => panic!("{at}: unexpected kind {other:?}"),
        }
        kinds.push(kind);
    }
    for wanted in [
        "Deployment",
        "DaemonSet",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Service",
        "Secret",
        "ConfigMap",
    ] {
        assert!(kinds.iter().any(|k| k == wanted), "no {wanted} manifest");
    }
}

/// Pods in the host network that land on one node share its ports: the
/// agents run on every node (they tolerate every taint), the control
/// planes on control-plane nodes (one per node). Whichever starts second
/// would fail to bind.
#[test]
fn host_network_pods_on_one_node_use_distinct_ports() {
    let mut workloads: Vec<(String, Vec<Listener>)> = Vec::new();
    for (at, doc) in documents() {
        let pod = match doc["kind"].as_str() {
            Some("DaemonSet") => parse::<DaemonSet>(&at, &doc).spec.map(|s| s.template),
            Some("Deployment") => parse::<Deployment>(&at, &doc).spec.map(|s| s.template),
            _ => None,
        }
        .and_then(|t| t.spec);
        let Some(pod) = pod.filter(|p| p.host_network == Some(true)) else {
            continue;
        };
        let listeners = host_listeners(&at, &pod);
        for (i, a) in listeners.iter().enumerate() {
            for b in &listeners[i + 1..] {
                assert!(!a.collides(b), "{at}: {a} and {b} collide");
            }
        }
        workloads.push((at, listeners));
    }
    assert!(workloads.len() >= 2, "the agent and the control plane");
    for (i, (at_a, a)) in workloads.iter().enumerate() {
        for (at_b, b) in &workloads[i + 1..] {
            for x in a {
                for y in b {
                    assert!(
                        !x.collides(y),
                        "{at_a} ({x}) and {at_b} ({y}) share a node and a port"
                    );
                }
            }
        }
    }
}

#[test]
fn colliding_listeners_are_caught() {
    let any = Listener::new("TCP", "0.0.0.0:9903".parse().expect("addr"), "a");
    let lo = Listener::new("TCP", "127.0.0.1:9903".parse().expect("addr"), "b");
    let udp = Listener::new("UDP", "0.0.0.0:9903".parse().expect("addr"), "c");
    let other = Listener::new("TCP", "127.0.0.2:9903".parse().expect("addr"), "d");
    assert!(any.collides(&lo) && lo.collides(&any));
    assert!(!any.collides(&udp), "TCP and UDP share port numbers");
    assert!(!lo.collides(&other), "two specific addresses");
}

#[test]
fn unknown_fields_are_caught() {
    let doc: Value = serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "x"}, "spec": {"prots": [{"port": 80}]},
    });
    let r = std::panic::catch_unwind(|| parse::<Service>("test", &doc));
    assert!(r.is_err(), "a misspelt field must fail");
}

/// The fleet example deploys as written: the hubs' Deployment parses and
/// follows member control planes only, and the member patch applies to the
/// control plane's Deployment, giving it a cluster, its API server and
/// both hubs.
#[test]
fn the_fleet_example_deploys_as_written() {
    let fleet = manifests_dir().join("fleet");
    let text = std::fs::read_to_string(fleet.join("hub.yaml")).expect("hub.yaml");
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
    let mut hubs = 0;
    for (i, doc) in docs.iter().enumerate() {
        let at = format!("fleet/hub.yaml#{}", i + 1);
        match doc["kind"].as_str() {
            Some("Deployment") => {
                let d: Deployment = parse(&at, doc);
                let spec = d.spec.expect("spec");
                assert_eq!(spec.replicas, Some(2), "{at}: two hub replicas");
                let pod = spec.template.spec.expect("pod spec");
                assert_eq!(
                    pod.automount_service_account_token,
                    Some(false),
                    "{at}: no API access"
                );
                for c in &pod.containers {
                    let argv = args(c);
                    let a = <switchyard_control_plane::Args as clap::Parser>::try_parse_from(&argv)
                        .unwrap_or_else(|e| panic!("{at}: {argv:?}: {e}"));
                    assert!(a.sources.len() >= 2, "{at}: one source per member");
                    for s in &argv {
                        if let Some(src) = s.strip_prefix("--source=") {
                            assert!(
                                src.starts_with("switchyard:https://"),
                                "{at}: {src}: members only, over TLS"
                            );
                            assert!(
                                !src.ends_with("=clusterset"),
                                "{at}: {src}: a hub merges, it follows no hub"
                            );
                        }
                    }
                    assert!(
                        a.tls_client_ca.is_some() && a.relay_tls_cert.is_some(),
                        "{at}: mTLS both ways"
                    );
                    assert!(
                        a.admin_listen.ip().is_loopback(),
                        "{at}: /status off the network"
                    );
                    hubs += 1;
                }
            }
            Some("Service") => drop(parse::<Service>(&at, doc)),
            Some("PodDisruptionBudget") => drop(parse::<PodDisruptionBudget>(&at, doc)),
            other => panic!("{at}: unexpected kind {other:?}"),
        }
    }
    assert_eq!(hubs, 1, "one hub container");

    let patch: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(fleet.join("member-control-plane.patch.yaml")).expect("patch"),
    )
    .expect("YAML");
    let (at, mut base) = documents()
        .into_iter()
        .find(|(_, d)| d["kind"] == "Deployment")
        .expect("the control plane's Deployment");
    switchyard_integration_tests::apiserver::patch::json_patch(&mut base, &patch)
        .unwrap_or_else(|e| panic!("the member patch does not apply to {at}: {e}"));
    let d: Deployment = parse(&at, &base);
    let pod = d.spec.expect("spec").template.spec.expect("pod spec");
    let c = &pod.containers[0];
    let argv = args(c);
    let a = <switchyard_control_plane::Args as clap::Parser>::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("patched {at}: {argv:?}: {e}"));
    assert_ne!(
        a.cluster,
        switchyard_model::DEFAULT_CLUSTER,
        "a member names its cluster"
    );
    let hubs: Vec<&String> = argv
        .iter()
        .filter(|s| s.starts_with("--source=switchyard:https://") && s.ends_with("=clusterset"))
        .collect();
    assert_eq!(hubs.len(), 2, "both hubs followed: {argv:?}");
    assert!(
        argv.iter().any(|s| s == "--source=kube"),
        "its own API server"
    );
    assert!(a.mcs_write, "writes the clusterset back");
    let mounted: Vec<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    for file in [&a.relay_tls_ca, &a.relay_tls_cert, &a.relay_tls_key] {
        let file = file.as_ref().expect("relay TLS");
        assert!(
            mounted.iter().any(|m| file.starts_with(m)),
            "{file:?} is mounted"
        );
    }
    let volumes: Vec<&str> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert!(volumes.contains(&"fleet"), "{volumes:?}");
}
