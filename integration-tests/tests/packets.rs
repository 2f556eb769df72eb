//! The iptables data plane with real packets, in a cluster of network
//! namespaces (see `switchyard_integration_tests::netns`): the real agent
//! and control plane processes, real TCP and UDP between pod namespaces.
//! Skipped (with a message) when not root.

use std::time::Duration;

use serde_json::Value;
use switchyard_integration_tests::netns::{
    Bins, Cluster, finish_echo, pod_ip6, service_manifest, supported,
};

fn bins() -> Bins {
    Bins {
        agent: env!("CARGO_BIN_EXE_sy_agent").into(),
        control_plane: env!("CARGO_BIN_EXE_sy_control_plane").into(),
        echo: env!("CARGO_BIN_EXE_sy_echo").into(),
    }
}

/// A two-node cluster, or `None` (with a message) where packet tests
/// cannot run.
fn cluster() -> Option<Cluster> {
    if !supported() {
        eprintln!("skipping: packet tests need root, iproute2 and iptables");
        return None;
    }
    Some(Cluster::new(bins(), 2))
}

fn count(v: &Value, key: &str, id: &str) -> u64 {
    v[key][id].as_u64().unwrap_or(0)
}

fn failures(v: &Value) -> u64 {
    v["refused"].as_u64().unwrap_or(0)
        + v["timeout"].as_u64().unwrap_or(0)
        + v["other"].as_array().map_or(0, |a| a.len() as u64)
}

const PORTALS: &str =
    "-A PREROUTING -m comment --comment \"switchyard service portals\" -j SWY-SERVICES";

#[test]
fn service_features_with_real_packets() {
    let Some(mut c) = cluster() else { return };
    let a1 = c.add_pod("a1", 1, 2);
    let a2 = c.add_pod("a2", 1, 3);
    let b1 = c.add_pod("b1", 2, 2);
    c.add_pod("client", 2, 9);
    let all = [
        (a1.as_str(), 1, true),
        (a2.as_str(), 1, true),
        (b1.as_str(), 2, true),
    ];
    c.write_manifest(
        "web.yaml",
        &service_manifest("web", "10.96.0.10", "TCP", "", "", &all),
    );
    c.write_manifest(
        "dns.yaml",
        &service_manifest(
            "dns",
            "10.96.0.11",
            "UDP",
            "",
            "",
            &[(&a1, 1, true), (&b1, 2, true)],
        ),
    );
    c.write_manifest(
        "sticky.yaml",
        &service_manifest(
            "sticky",
            "10.96.0.12",
            "TCP",
            "",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 60\n",
            &all,
        ),
    );
    c.write_manifest(
        "empty.yaml",
        &service_manifest("empty", "10.96.0.13", "TCP", "", "", &[]),
    );
    c.write_manifest(
        "np.yaml",
        &service_manifest(
            "np",
            "10.96.0.14",
            "TCP",
            "    nodePort: 30080\n",
            "  type: NodePort\n",
            &[(&b1, 2, true)],
        ),
    );
    c.write_manifest(
        "local.yaml",
        &service_manifest(
            "local",
            "10.96.0.15",
            "TCP",
            "    nodePort: 30081\n",
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: 32001\n",
            &[(&a1, 1, true), (&a2, 1, true)],
        ),
    );
    c.start_control_plane();
    c.start_agents();
    c.wait_rules("every service programmed", "10.96.0.15");
    c.wait_rules("the reject rule", "-d 10.96.0.13/32");

    // ClusterIP from a pod on another node reaches every backend, roughly evenly.
    let r = c.echo("client", &["tcp", "10.96.0.10:80", "300"]);
    assert_eq!(failures(&r), 0, "{r}");
    for id in ["a1", "a2", "b1"] {
        let n = count(&r, "replies", id);
        assert!((60..=140).contains(&n), "{id} got {n} of 300: {r}");
    }
    // Pod sources are inside the cluster CIDR: not masqueraded.
    assert_eq!(count(&r, "peers", "10.244.2.9"), 300, "{r}");

    // UDP.
    let u = c.echo("client", &["udp", "10.96.0.11:80", "5"]);
    let replies: Vec<&str> = u["replies"]
        .as_array()
        .expect("replies")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(replies.iter().all(|r| *r == "a1" || *r == "b1"), "{u}");

    // Session affinity: one backend for one client.
    let s = c.echo("client", &["tcp", "10.96.0.12:80", "40"]);
    assert_eq!(failures(&s), 0, "{s}");
    assert_eq!(s["replies"].as_object().expect("replies").len(), 1, "{s}");

    // No endpoints: refused at once, not a time-out.
    let e = c.echo("client", &["tcp", "10.96.0.13:80", "1"]);
    assert_eq!(e["refused"], 1, "{e}");
    assert!(e["elapsed_ms"].as_u64().expect("elapsed") < 1000, "{e}");

    // NodePort from outside the cluster, to a node without the endpoint.
    let n = c.echo("ext", &["tcp", "10.99.0.11:30080", "20"]);
    assert_eq!(count(&n, "replies", "b1"), 20, "{n}");
    // Masqueraded to node-1's address on the way to node-2.
    assert_eq!(count(&n, "peers", "10.99.0.11"), 20, "{n}");

    // externalTrafficPolicy Local: local endpoints only, client address kept.
    let l = c.echo("ext", &["tcp", "10.99.0.11:30081", "40"]);
    assert_eq!(
        count(&l, "replies", "a1") + count(&l, "replies", "a2"),
        40,
        "{l}"
    );
    assert_eq!(count(&l, "peers", "10.99.0.100"), 40, "{l}");
    // Node 2 has no local endpoint: dropped there.
    let d = c.echo("ext", &["tcp", "10.99.0.12:30081", "1"]);
    assert_eq!(d["timeout"], 1, "{d}");

    // healthCheckNodePort.
    let (code, body) = c.http("ext", "10.99.0.11:32001", "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"localEndpoints\":2"), "{body}");
    let (code, body) = c.http("ext", "10.99.0.12:32001", "/healthz");
    assert_eq!(code, 503, "{body}");
}

#[test]
fn endpoint_changes_flush_restart_and_cleanup() {
    let Some(mut c) = cluster() else { return };
    let a1 = c.add_pod("a1", 1, 2);
    let b1 = c.add_pod("b1", 2, 2);
    c.add_pod("client", 2, 9);
    let both = [(a1.as_str(), 1, true), (b1.as_str(), 2, true)];
    c.write_manifest(
        "web.yaml",
        &service_manifest("web", "10.96.0.10", "TCP", "", "", &both),
    );
    c.write_manifest(
        "dns.yaml",
        &service_manifest("dns", "10.96.0.11", "UDP", "", "", &both),
    );
    c.start_control_plane();
    c.start_agents();
    c.wait_rules("both services", "10.96.0.11/32");

    // A UDP flow sticks to one endpoint; when that endpoint is removed, its
    // conntrack entry goes and the same flow moves to the live endpoint. Both
    // runs use one source port, so they are one conntrack flow.
    let first = {
        let u = c.echo("client", &["udp", "10.96.0.11:80", "2", "40400"]);
        u["replies"][0]
            .as_str()
            .unwrap_or_else(|| panic!("{u}"))
            .to_owned()
    };
    assert!(first == "a1" || first == "b1", "{first}");
    let live = if first == "a1" { "b1" } else { "a1" };
    let live_ep = if first == "a1" {
        (b1.as_str(), 2, true)
    } else {
        (a1.as_str(), 1, true)
    };
    let client = c.spawn_echo("client", &["udp", "10.96.0.11:80", "40", "40400"]);
    std::thread::sleep(Duration::from_millis(1000));
    c.write_manifest(
        "dns.yaml",
        &service_manifest("dns", "10.96.0.11", "UDP", "", "", &[live_ep]),
    );
    let flow = finish_echo(client);
    let replies: Vec<&str> = flow["replies"]
        .as_array()
        .expect("replies")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(replies.len() == 40, "{flow}");
    assert_eq!(replies[0], first, "the flow starts on one endpoint: {flow}");
    assert_eq!(replies[39], live, "and moves to the live one: {flow}");
    assert!(!replies[20..].contains(&first.as_str()), "{flow}");

    // An endpoint removed: no new connection reaches it. (The UDP Service
    // may still point at a1, so count a1's DNAT rules: web's one must go.)
    let dnat_to_a1 = || {
        c.rules(2)
            .matches(&format!("--to-destination {a1}:8080"))
            .count()
    };
    let before = dnat_to_a1();
    assert!(before >= 1, "web has a DNAT rule to a1");
    c.write_manifest(
        "web.yaml",
        &service_manifest("web", "10.96.0.10", "TCP", "", "", &[(&b1, 2, true)]),
    );
    c.wait_until("a1 gone from web on node 2", || dnat_to_a1() == before - 1);
    let r = c.echo("client", &["tcp", "10.96.0.10:80", "100"]);
    assert_eq!(count(&r, "replies", "b1"), 100, "{r}");

    // Someone flushes our rules by hand: the canary notices, rules come back.
    let n2 = c.ns("n2");
    c.sh(&n2, "iptables -t nat -F; iptables -t filter -F");
    assert!(!c.rules(2).contains(PORTALS));
    c.wait_until("rules restored after the flush", || {
        c.rules(2).contains(PORTALS)
    });
    let r = c.echo("client", &["tcp", "10.96.0.10:80", "20"]);
    assert_eq!(count(&r, "replies", "b1"), 20, "{r}");

    // Restart the agents while the control plane is down, under a
    // continuous client loop: no connection fails.
    let client = c.spawn_echo("client", &["loop", "10.96.0.10:80", "5000"]);
    std::thread::sleep(Duration::from_millis(500));
    c.stop_control_plane();
    c.kill_agent(1);
    c.kill_agent(2);
    std::thread::sleep(Duration::from_millis(500));
    c.start_agents();
    let looped = finish_echo(client);
    assert_eq!(failures(&looped), 0, "{looped}");
    assert!(count(&looped, "replies", "b1") > 50, "{looped}");
    // The restarted agents did a full sync of their persisted state.
    let r = c.echo("client", &["tcp", "10.96.0.10:80", "10"]);
    assert_eq!(count(&r, "replies", "b1"), 10, "{r}");

    // Cleanup leaves no Switchyard rule behind.
    c.kill_agent(1);
    c.kill_agent(2);
    for i in 1..=2u8 {
        let ns = c.ns(&format!("n{i}"));
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(env!("CARGO_BIN_EXE_sy_agent"))
            .arg("cleanup")
            .output()
            .expect("cleanup");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let saved = c.sh(&ns, "iptables-save; ip6tables-save");
        assert!(!saved.contains("SWY-"), "{saved}");
    }
}

/// `service_manifest` with a load-balancer ingress address in the Service's status.
fn with_ingress(manifest: String, ip: &str) -> String {
    manifest.replacen(
        "---\n",
        &format!("status:\n  loadBalancer:\n    ingress:\n    - ip: {ip}\n---\n"),
        1,
    )
}

#[test]
fn topology_source_ranges_and_localhost_node_ports() {
    let Some(mut c) = cluster() else { return };
    let a1 = c.add_pod("a1", 1, 2);
    let a2 = c.add_pod("a2", 1, 3);
    let b1 = c.add_pod("b1", 2, 2);
    c.add_pod("near", 1, 9);
    c.add_pod("client", 2, 9);

    // Topology hints: every endpoint is hinted for its own zone (node-i is
    // in zone-i), so each node uses its zone's endpoints only.
    let mut zoned = service_manifest("zoned", "10.96.0.20", "TCP", "", "", &[]);
    zoned = zoned.replace("endpoints: []\n", "endpoints:\n");
    for (ip, node) in [(&a1, 1), (&a2, 1), (&b1, 2)] {
        zoned.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  nodeName: node-{node}\n  zone: zone-{node}\n  conditions:\n    ready: true\n  hints:\n    forZones:\n    - name: zone-{node}\n"
        ));
    }
    c.write_manifest("zoned.yaml", &zoned);

    // loadBalancerSourceRanges: one Service admits the external client,
    // the other admits only an address nobody has.
    let all = [
        (a1.as_str(), 1, true),
        (a2.as_str(), 1, true),
        (b1.as_str(), 2, true),
    ];
    let lb = |name: &str, cluster_ip: &str, node_port: u16, range: &str, ingress: &str| {
        with_ingress(
            service_manifest(
                name,
                cluster_ip,
                "TCP",
                &format!("    nodePort: {node_port}\n"),
                &format!("  type: LoadBalancer\n  loadBalancerSourceRanges: [\"{range}\"]\n"),
                &all,
            ),
            ingress,
        )
    };
    c.write_manifest(
        "open.yaml",
        &lb("open", "10.96.0.21", 30091, "10.99.0.100/32", "10.98.0.1"),
    );
    c.write_manifest(
        "closed.yaml",
        &lb("closed", "10.96.0.22", 30092, "10.99.0.200/32", "10.98.0.2"),
    );
    c.sh(&c.ns("ext"), "ip route add 10.98.0.0/24 via 10.99.0.11");

    // A NodePort for the node's own loopback clients.
    c.write_manifest(
        "np.yaml",
        &service_manifest(
            "np",
            "10.96.0.23",
            "TCP",
            "    nodePort: 30093\n",
            "  type: NodePort\n",
            &[(&b1, 2, true)],
        ),
    );

    c.start_control_plane();
    c.start_agents();
    c.wait_rules("every service programmed", "10.96.0.23");

    let z = c.echo("client", &["tcp", "10.96.0.20:80", "30"]);
    assert_eq!(count(&z, "replies", "b1"), 30, "zone-2 client: {z}");
    let z = c.echo("near", &["tcp", "10.96.0.20:80", "60"]);
    assert_eq!(failures(&z), 0, "{z}");
    assert_eq!(count(&z, "replies", "b1"), 0, "zone-1 client: {z}");
    assert!(
        count(&z, "replies", "a1") > 0 && count(&z, "replies", "a2") > 0,
        "{z}"
    );

    let open = c.echo("ext", &["tcp", "10.98.0.1:80", "20"]);
    assert_eq!(failures(&open), 0, "an admitted source: {open}");
    let closed = c.echo("ext", &["tcp", "10.98.0.2:80", "1"]);
    assert_eq!(
        closed["timeout"], 1,
        "a source outside the ranges: {closed}"
    );
    // The ranges guard the load-balancer address only, not the node port.
    let np = c.echo("ext", &["tcp", "10.99.0.11:30092", "5"]);
    assert_eq!(failures(&np), 0, "{np}");

    // Node ports answer on the node's loopback address too (kube-proxy's
    // localhost node ports), forwarded to an endpoint on the other node.
    let local = c.echo("n1", &["tcp", "127.0.0.1:30093", "10"]);
    assert_eq!(count(&local, "replies", "b1"), 10, "{local}");
}

#[test]
fn dual_stack_with_real_packets() {
    let Some(mut c) = cluster() else { return };
    let a1 = c.add_pod("a1", 1, 2);
    let b1 = c.add_pod("b1", 2, 2);
    let client = c.add_pod("client", 2, 9);
    let slice = |family: &str, eps: &[(&str, u8)]| {
        let mut y = format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: test\n  name: web-{}\n  labels:\n    kubernetes.io/service-name: web\naddressType: {family}\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:{}\n",
            family.to_lowercase(),
            if eps.is_empty() { " []" } else { "" }
        );
        for (ip, node) in eps {
            y.push_str(&format!(
                "- addresses: [\"{ip}\"]\n  nodeName: node-{node}\n  conditions:\n    ready: true\n"
            ));
        }
        y
    };
    let (a6, b6) = (pod_ip6(&a1), pod_ip6(&b1));
    let web = |v6: &[(&str, u8)]| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  namespace: test\n  name: web\nspec:\n  type: NodePort\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: 10.96.0.30\n  clusterIPs: [10.96.0.30, \"fd00:96::30\"]\n  ports:\n  - name: http\n    protocol: TCP\n    port: 80\n    targetPort: http\n    nodePort: 30094\n{}{}",
            slice("IPv4", &[(&a1, 1), (&b1, 2)]),
            slice("IPv6", v6),
        )
    };
    c.write_manifest("web.yaml", &web(&[(&a6, 1), (&b6, 2)]));
    c.start_control_plane();
    c.start_agents();
    c.wait_until("the IPv6 rules programmed on both nodes", || {
        ["n1", "n2"].iter().all(|n| {
            let nat = c.sh(&c.ns(n), "ip6tables-save -t nat");
            nat.contains("fd00:96::30") && nat.contains("--dport 30094")
        })
    });

    // The IPv6 cluster IP reaches both IPv6 endpoints; pod sources are kept.
    let r = c.echo("client", &["tcp", "[fd00:96::30]:80", "100"]);
    assert_eq!(failures(&r), 0, "{r}");
    assert!(
        count(&r, "replies", "a1") > 20 && count(&r, "replies", "b1") > 20,
        "{r}"
    );
    assert_eq!(count(&r, "peers", &pod_ip6(&client)), 100, "{r}");
    // The IPv4 cluster IP of the same Service still works.
    let r = c.echo("client", &["tcp", "10.96.0.30:80", "20"]);
    assert_eq!(failures(&r), 0, "{r}");
    assert_eq!(count(&r, "peers", &client), 20, "{r}");

    // An IPv6 node port from outside: masqueraded to the node's address
    // when the endpoint is on the other node.
    let n = c.echo("ext", &["tcp", "[fd00:99::11]:30094", "40"]);
    assert_eq!(failures(&n), 0, "{n}");
    assert_eq!(
        count(&n, "peers", "fd00:99::11") + count(&n, "peers", "fd00:99::100"),
        40,
        "{n}"
    );
    assert!(count(&n, "replies", "b1") > 0, "{n}");
    assert_eq!(
        count(&n, "peers", "fd00:99::11"),
        count(&n, "replies", "b1") + count(&n, "replies", "a1"),
        "every node-port connection is masqueraded (externalTrafficPolicy Cluster): {n}"
    );

    // An IPv6 endpoint removed: no new connection reaches it.
    c.write_manifest("web.yaml", &web(&[(&b6, 2)]));
    c.wait_until("a1's IPv6 endpoint gone on node 2", || {
        !c.sh(&c.ns("n2"), "ip6tables-save -t nat").contains(&a6)
    });
    let r = c.echo("client", &["tcp", "[fd00:96::30]:80", "40"]);
    assert_eq!(count(&r, "replies", "b1"), 40, "{r}");

    // No IPv6 endpoints: refused at once, and IPv4 is not affected.
    c.write_manifest("web.yaml", &web(&[]));
    c.wait_until("the IPv6 reject rule on node 2", || {
        c.sh(&c.ns("n2"), "ip6tables-save -t filter")
            .contains("-d fd00:96::30/128")
    });
    let e = c.echo("client", &["tcp", "[fd00:96::30]:80", "1"]);
    assert_eq!(e["refused"], 1, "{e}");
    assert!(e["elapsed_ms"].as_u64().expect("elapsed") < 1000, "{e}");
    let r = c.echo("client", &["tcp", "10.96.0.30:80", "10"]);
    assert_eq!(failures(&r), 0, "{r}");
}
