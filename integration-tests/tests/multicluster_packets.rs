//! The clusterset with real packets: three API-server stand-ins (the
//! `fake_apiserver` program) in the infra namespace of a cluster of network
//! namespaces, a control plane following them as clusters east, west and
//! north, the agent of node 1 in east and of node 2 in north (iptables data
//! plane and DNS stub). Real TCP from a pod of north to the ClusterSet IP
//! reaches exactly east's and west's endpoints. Skipped (with a message)
//! when not root.

use std::collections::BTreeSet;

use switchyard_integration_tests::netns::{Bins, Cluster, supported};

fn bins() -> Bins {
    Bins {
        agent: env!("CARGO_BIN_EXE_sy_agent").into(),
        control_plane: env!("CARGO_BIN_EXE_sy_control_plane").into(),
        echo: env!("CARGO_BIN_EXE_sy_echo").into(),
    }
}

/// A Service `shop/web` (port 80 to 8080) with one endpoint, and its
/// ServiceExport when `exported`.
fn objects(endpoint: &str, node: u8, exported: bool) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  namespace: shop\n  name: web\nspec:\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: shop\n  name: web-1\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n- addresses: [\"{endpoint}\"]\n  nodeName: node-{node}\n  conditions:\n    ready: true\n"
    );
    if exported {
        y.push_str("---\napiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata:\n  namespace: shop\n  name: web\n");
    }
    y
}

/// One `fake_apiserver` per cluster in the infra namespace, loaded with
/// its objects, and a control plane with a `kube:` source for each.
fn start_control_plane(c: &mut Cluster, clusters: &[(&str, String)]) {
    let mut kubeconfig = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
    let mut contexts = String::from("contexts:\n");
    let mut sources: Vec<String> = Vec::new();
    for (i, (cluster, objects)) in clusters.iter().enumerate() {
        let dir = c.dir.path().join(format!("api-{cluster}"));
        std::fs::create_dir(&dir).expect("dir");
        std::fs::write(dir.join("objects.yaml"), objects).expect("objects");
        let listen = format!("10.99.0.1:{}", 7001 + i);
        c.spawn_program(
            "infra",
            std::path::Path::new(env!("CARGO_BIN_EXE_fake_apiserver")),
            &[
                "--listen".into(),
                listen.clone(),
                "--load".into(),
                dir.display().to_string(),
            ],
            &format!("api-{cluster}"),
        );
        kubeconfig.push_str(&format!(
            "- name: {cluster}\n  cluster:\n    server: http://{listen}\n"
        ));
        contexts.push_str(&format!(
            "- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: u\n"
        ));
        sources.extend(["--source".into(), format!("kube:{cluster}={cluster}")]);
    }
    kubeconfig.push_str("users:\n- name: u\n  user: {}\n");
    kubeconfig.push_str(&contexts);
    let path = c.dir.path().join("kubeconfig");
    std::fs::write(&path, kubeconfig).expect("kubeconfig");
    sources.extend(["--kubeconfig".into(), path.display().to_string()]);
    c.start_control_plane_with(&sources);
}

/// `dig +short` of `name` at node `i`'s DNS stub.
fn dig(c: &Cluster, i: u8, name: &str) -> String {
    c.sh(
        &c.ns(&format!("n{i}")),
        &format!("dig +short +tries=1 +time=2 @169.254.20.10 {name} A"),
    )
    .trim()
    .to_owned()
}

fn backends(c: &Cluster, addr: &str, n: usize) -> BTreeSet<String> {
    let out = c.echo("client", &["tcp", addr, &n.to_string()]);
    assert_eq!(out["timeout"], 0, "{out}");
    out["replies"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

#[test]
fn a_clusterset_ip_balances_over_every_exporting_cluster() {
    if !supported() {
        eprintln!("skipping: packet tests need root, iproute2 and iptables");
        return;
    }
    let mut c = Cluster::new(bins(), 2);
    let east = c.add_pod("east-web", 1, 2);
    let west = c.add_pod("west-web", 1, 3);
    let north = c.add_pod("north-web", 2, 2);
    c.add_pod("client", 2, 9);

    start_control_plane(
        &mut c,
        &[
            ("east", objects(&east, 1, true)),
            ("west", objects(&west, 1, true)),
            ("north", objects(&north, 2, false)),
        ],
    );
    c.start_agent_with(1, &["--cluster", "east"]);
    c.start_agent_with(2, &["--cluster", "north"]);

    // A node of north resolves the clusterset name, and its own name.
    let mut clusterset_ip = String::new();
    c.wait_until("web.shop.svc.clusterset.local at north's stub", || {
        clusterset_ip = dig(&c, 2, "web.shop.svc.clusterset.local");
        clusterset_ip.starts_with("10.11")
    });
    let mut own_ip = String::new();
    c.wait_until("web.shop.svc.cluster.local at north's stub", || {
        own_ip = dig(&c, 2, "web.shop.svc.cluster.local");
        own_ip.starts_with("10.")
    });
    assert_ne!(own_ip, clusterset_ip);
    c.wait_rules("the ClusterSet IP in both nodes' rules", &clusterset_ip);

    // From a pod of north: the ClusterSet IP reaches east's and west's
    // endpoints (not north's, which is not exported); north's own name
    // stays north's.
    let set = backends(&c, &format!("{clusterset_ip}:80"), 40);
    assert_eq!(
        set,
        ["east-web", "west-web"].map(String::from).into(),
        "ClusterSet IP {clusterset_ip}"
    );
    assert_eq!(
        backends(&c, &format!("{own_ip}:80"), 10),
        ["north-web"].map(String::from).into()
    );
    // The same import on a node of east.
    assert_eq!(dig(&c, 1, "web.shop.svc.clusterset.local"), clusterset_ip);
}

/// `shop/NAME` (port 80 to 8080) with the given endpoints on `node`,
/// exported (v1beta1), needing `min_local` local endpoints.
fn exported(name: &str, endpoints: &[&str], node: u8, min_local: u32) -> String {
    let eps: String = endpoints
        .iter()
        .map(|e| {
            format!(
                "- addresses: [\"{e}\"]\n  nodeName: node-{node}\n  conditions:\n    ready: true\n"
            )
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  namespace: shop\n  name: {name}\n  annotations:\n    switchyard.io/min-local-endpoints: \"{min_local}\"\nspec:\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: shop\n  name: {name}-1\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n{eps}---\n\
apiVersion: multicluster.x-k8s.io/v1beta1\nkind: ServiceExport\nmetadata:\n  namespace: shop\n  name: {name}\n---\n"
    )
}

/// Cluster locality with real packets: node 1 is in east, node 2 in west.
/// Also MCS connectivity specs 23 and 24: an exported Service is reached
/// through its clusterset name from a cluster, one that nobody exports is
/// not.
/// `web` has 2 ready endpoints in east and needs 2: a client in east
/// reaches east's only. `api` has 1 in east and needs 2: the client also
/// reaches west's (graded: east's stays in the set).
#[test]
fn an_import_prefers_the_clients_own_cluster_until_too_few_are_ready() {
    if !supported() {
        eprintln!("skipping: packet tests need root, iproute2 and iptables");
        return;
    }
    let mut c = Cluster::new(bins(), 2);
    let east_web_a = c.add_pod("east-web-a", 1, 2);
    let east_web_b = c.add_pod("east-web-b", 1, 3);
    let east_api = c.add_pod("east-api", 1, 4);
    let west_web = c.add_pod("west-web", 2, 2);
    let west_api = c.add_pod("west-api", 2, 3);
    c.add_pod("client", 1, 9);

    let clusters = [
        (
            "east",
            exported("web", &[&east_web_a, &east_web_b], 1, 2)
                + &exported("api", &[&east_api], 1, 2)
                + &objects(&east_api, 1, false).replace("name: web", "name: hidden"),
        ),
        (
            "west",
            exported("web", &[&west_web], 2, 2) + &exported("api", &[&west_api], 2, 2),
        ),
    ];
    start_control_plane(&mut c, &clusters);
    c.start_agent_with(1, &["--cluster", "east"]);
    c.start_agent_with(2, &["--cluster", "west"]);

    let mut ips = Vec::new();
    for name in ["web", "api"] {
        let mut ip = String::new();
        c.wait_until(
            &format!("{name}.shop.svc.clusterset.local at east's stub"),
            || {
                ip = dig(&c, 1, &format!("{name}.shop.svc.clusterset.local"));
                ip.starts_with("10.11")
            },
        );
        c.wait_rules(&format!("{name}'s ClusterSet IP in both nodes' rules"), &ip);
        ips.push(ip);
    }
    assert_eq!(
        backends(&c, &format!("{}:80", ips[0]), 40),
        ["east-web-a", "east-web-b"].map(String::from).into(),
        "web: two local endpoints, two needed"
    );
    // MCS connectivity: a Service no cluster exports has no clusterset
    // name anywhere (its cluster-local name works in east).
    for node in [1, 2] {
        assert_eq!(dig(&c, node, "hidden.shop.svc.clusterset.local"), "");
    }
    assert!(dig(&c, 1, "hidden.shop.svc.cluster.local").starts_with("10."));
    assert_eq!(
        backends(&c, &format!("{}:80", ips[1]), 40),
        ["east-api", "west-api"].map(String::from).into(),
        "api: one local endpoint, two needed"
    );
}
