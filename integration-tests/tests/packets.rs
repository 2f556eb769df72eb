//! Both data planes with real packets, the same scenarios on each (every
//! test is `SCENARIO::iptables` and `SCENARIO::nftables`), in a cluster of network
//! namespaces (see `switchyard_integration_tests::netns`): the real agent
//! and control plane processes, real TCP and UDP between pod namespaces.
//! Skipped (with a message) when not root.
//!
//! The scenarios: the Service features (ClusterIP spread, UDP, affinity,
//! refusal, NodePort, externalTrafficPolicy Local, health check); endpoint
//! changes (UDP flow moves, flush restored, restart under a client loop,
//! NOTRACK rules once after a restart, cleanup of rules, NOTRACK rules and
//! the DNS address); topology hints, loadBalancerSourceRanges and localhost
//! node ports; dual stack (IPv6 cluster IP, node port with masquerade,
//! endpoint removal, refusal); externalTrafficPolicy Local on a node
//! without local endpoints (pods and the node reach the LB IP and node
//! port, outside traffic dropped, also with internalTrafficPolicy Local)
//! and health checks with only terminating local endpoints; spoofed LB-IP
//! sources against loadBalancerSourceRanges; proxy labels toggled and
//! `ipMode: Proxy`; UDP flows across a terminating endpoint, a deletion
//! while the agent is down, a flow sent while no rule existed (restart
//! from disk) and a flow of a Service scaled to zero (refused, not sent to
//! the deleted pod); Service ranges and `--nodeport-addresses primary`;
//! transparent DNS on the cluster DNS IP; session affinity expiry; an
//! endpoint count crossing an nftables class boundary. SCTP has rules but
//! no packet test: this kernel has no SCTP (`socket(..., IPPROTO_SCTP)`
//! fails). Nothing is programmed in the namespace the tests run in (the
//! in-process harness's agents use `--dataplane none`).

use std::time::Duration;

use serde_json::Value;
use switchyard_integration_tests::netns::{
    Bins, Cluster, Condition, KUBE_DNS, Plane, finish_echo, pod_ip6, service_manifest, supported,
    with_endpoints, with_ingress, with_labels,
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
fn cluster(plane: Plane) -> Option<Cluster> {
    if !supported() {
        eprintln!("skipping: packet tests need root, iproute2 and iptables");
        return None;
    }
    Some(Cluster::with_plane(bins(), 2, plane))
}

/// Each scenario runs once per data plane: `NAME::iptables`, `NAME::nftables`.
macro_rules! on_both_planes {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;

            #[test]
            fn iptables() {
                super::$scenario(Plane::Iptables);
            }

            #[test]
            fn nftables() {
                super::$scenario(Plane::Nftables);
            }
        }
    )*};
}

on_both_planes!(
    service_features_with_real_packets,
    endpoint_changes_flush_restart_and_cleanup,
    topology_source_ranges_and_localhost_node_ports,
    dual_stack_with_real_packets,
    external_local_policy_and_health_checks,
    spoofed_load_balancer_sources,
    proxy_labels_toggle_the_rules_and_ip_mode_proxy_is_left_alone,
    udp_flows_are_reconciled_after_every_sync,
    udp_flow_of_a_service_scaled_to_zero_is_refused,
    service_ranges_and_primary_node_port_addresses,
    transparent_dns_answers_on_the_cluster_dns_ip,
    session_affinity_expires,
    endpoint_count_crosses_the_class_boundary,
);

fn count(v: &Value, key: &str, id: &str) -> u64 {
    v[key][id].as_u64().unwrap_or(0)
}

/// The backends that answered, by name.
fn backends(v: &Value) -> Vec<String> {
    v["replies"]
        .as_object()
        .map(|r| r.keys().cloned().collect())
        .unwrap_or_default()
}

/// How many full resyncs node `i`'s agent made after finding its rules
/// gone (the canary chain, or our nftables table), from its `/metrics`.
fn repairs(c: &Cluster, plane: Plane, i: u8) -> u64 {
    let name = match plane {
        Plane::Iptables => "switchyard_agent_iptables_canary_resyncs_total",
        Plane::Nftables => "switchyard_agent_nftables_table_resyncs_total",
    };
    let (code, body) = c.http(&format!("n{i}"), "127.0.0.1:9902", "/metrics");
    assert_eq!(code, 200, "node {i}'s agent /metrics: {body}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("node {i}'s agent exports no {name}"))
}

fn failures(v: &Value) -> u64 {
    v["refused"].as_u64().unwrap_or(0)
        + v["timeout"].as_u64().unwrap_or(0)
        + v["other"].as_array().map_or(0, |a| a.len() as u64)
}

fn service_features_with_real_packets(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
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
    c.wait_until("the reject rule", || {
        c.refuses(1, "10.96.0.13") && c.refuses(2, "10.96.0.13")
    });

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

fn endpoint_changes_flush_restart_and_cleanup(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
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
    c.wait_rules("both services", &c.frontend("10.96.0.11"));

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
    let dnat_to_a1 = || c.rules(2).matches(&c.dnat(&a1, 8080)).count();
    let before = dnat_to_a1();
    assert!(before >= 1, "web has a DNAT rule to a1");
    c.write_manifest(
        "web.yaml",
        &service_manifest("web", "10.96.0.10", "TCP", "", "", &[(&b1, 2, true)]),
    );
    c.wait_until("a1 gone from web on node 2", || dnat_to_a1() == before - 1);
    let r = c.echo("client", &["tcp", "10.96.0.10:80", "100"]);
    assert_eq!(count(&r, "replies", "b1"), 100, "{r}");

    // Someone flushes our rules by hand: the canary notices, rules come
    // back. (Checking that the rules are gone first would race the repair:
    // the agent looks every 300 ms here and repairs within milliseconds.)
    let repaired = repairs(&c, plane, 2);
    c.flush_rules(2);
    c.wait_until("the flush noticed and the rules restored", || {
        repairs(&c, plane, 2) > repaired && c.hooked(2)
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

    // The agents started twice: the DNS stub's NOTRACK rules are there once.
    for i in 1..=2u8 {
        let raw = c.sh(&c.ns(&format!("n{i}")), "iptables -t raw -S");
        assert_eq!(raw.matches("--comment switchyard-dns").count(), 6, "{raw}");
    }

    // Cleanup leaves nothing of ours behind: no chain or rule, no NOTRACK
    // rule, no DNS address or interface.
    c.kill_agent(1);
    c.kill_agent(2);
    for i in 1..=2u8 {
        c.cleanup_node(i);
        let ns = c.ns(&format!("n{i}"));
        let saved = c.sh(&ns, "iptables-save; ip6tables-save; nft list tables");
        assert!(!saved.contains("SWY-"), "{saved}");
        assert!(!saved.contains("switchyard"), "{saved}");
        let addrs = c.sh(&ns, "ip -o addr; ip -o link");
        assert!(
            !addrs.contains("169.254.20.10") && !addrs.contains("nodelocaldns"),
            "{addrs}"
        );
    }
}

fn topology_source_ranges_and_localhost_node_ports(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
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
            &[(ingress, "")],
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

fn dual_stack_with_real_packets(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
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
        (1..=2).all(|i| {
            let r = c.rules6(i);
            r.contains(&c.frontend("fd00:96::30")) && r.contains("30094")
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
        !c.rules6(2).contains(&c.dnat(&a6, 8080))
    });
    let r = c.echo("client", &["tcp", "[fd00:96::30]:80", "40"]);
    assert_eq!(count(&r, "replies", "b1"), 40, "{r}");

    // No IPv6 endpoints: refused at once, and IPv4 is not affected.
    c.write_manifest("web.yaml", &web(&[]));
    c.wait_until("the IPv6 reject rule on node 2", || {
        c.refuses(2, "fd00:96::30")
    });
    let e = c.echo("client", &["tcp", "[fd00:96::30]:80", "1"]);
    assert_eq!(e["refused"], 1, "{e}");
    assert!(e["elapsed_ms"].as_u64().expect("elapsed") < 1000, "{e}");
    let r = c.echo("client", &["tcp", "10.96.0.30:80", "10"]);
    assert_eq!(failures(&r), 0, "{r}");
}

/// externalTrafficPolicy Local on a node without a local endpoint: pods
/// and the node itself still reach the endpoints elsewhere through the LB
/// IP and the node port (also with internalTrafficPolicy Local); only
/// traffic from outside is dropped. healthCheckNodePort counts ready local
/// endpoints only: a node whose local endpoint is terminating answers 503
/// while its node port still serves it.
fn external_local_policy_and_health_checks(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
    let a1 = c.add_pod("a1", 1, 2);
    let b1 = c.add_pod("b1", 2, 2);
    c.add_pod("near", 1, 9);
    let lb = |name: &str, cip: &str, np: u16, hc: u16, extra: &str, lb_ip: &str| {
        with_ingress(
            service_manifest(
                name,
                cip,
                "TCP",
                &format!("    nodePort: {np}\n"),
                &format!(
                    "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc}\n{extra}"
                ),
                &[],
            ),
            &[(lb_ip, "")],
        )
    };
    let on_node2 = [(b1.as_str(), 2, Condition::Ready)];
    c.write_manifest(
        "remote.yaml",
        &with_endpoints(
            lb("remote", "10.96.0.40", 30101, 32101, "", "10.98.0.40"),
            &on_node2,
        ),
    );
    c.write_manifest(
        "both.yaml",
        &with_endpoints(
            lb(
                "both",
                "10.96.0.41",
                30102,
                32102,
                "  internalTrafficPolicy: Local\n",
                "10.98.0.41",
            ),
            &on_node2,
        ),
    );
    c.write_manifest(
        "draining.yaml",
        &with_endpoints(
            lb("draining", "10.96.0.42", 30103, 32103, "", "10.98.0.42"),
            &[
                (a1.as_str(), 1, Condition::Terminating),
                (b1.as_str(), 2, Condition::Ready),
            ],
        ),
    );
    c.start_control_plane();
    c.start_agents();
    c.wait_rules("every service programmed", "10.98.0.42");

    // A pod on node 1 (no local endpoint) through the LB IP and node 1's
    // node port: short-circuited to the endpoint on node 2, source kept.
    for target in [
        "10.98.0.40:80",
        "10.99.0.11:30101",
        "10.98.0.41:80",
        "10.99.0.11:30102",
    ] {
        let r = c.echo("near", &["tcp", target, "5"]);
        assert_eq!(count(&r, "replies", "b1"), 5, "{target}: {r}");
        assert_eq!(count(&r, "peers", "10.244.1.9"), 5, "{target}: {r}");
    }
    // Node 1 itself: masqueraded (its source would be the LB IP or node
    // address), and it arrives.
    for target in ["10.98.0.40:80", "10.99.0.11:30101", "10.99.0.11:30102"] {
        let r = c.echo("n1", &["tcp", target, "5"]);
        assert_eq!(count(&r, "replies", "b1"), 5, "{target}: {r}");
    }
    // internalTrafficPolicy Local: the cluster IP has nothing on node 1.
    let d = c.echo("near", &["tcp", "10.96.0.41:80", "1"]);
    assert_eq!(d["timeout"], 1, "{d}");
    // From outside, node 1 has nothing to offer: dropped; node 2 serves.
    let d = c.echo("ext", &["tcp", "10.99.0.11:30101", "1"]);
    assert_eq!(d["timeout"], 1, "{d}");
    let r = c.echo("ext", &["tcp", "10.99.0.12:30101", "5"]);
    assert_eq!(count(&r, "replies", "b1"), 5, "{r}");
    assert_eq!(
        count(&r, "peers", "10.99.0.100"),
        5,
        "client address kept: {r}"
    );
    let (code, _) = c.http("ext", "10.99.0.11:32101", "/healthz");
    assert_eq!(code, 503);
    let (code, body) = c.http("ext", "10.99.0.12:32101", "/healthz");
    assert_eq!(code, 200, "{body}");

    // Only a terminating endpoint on node 1: the node port still serves it
    // from outside, but the health check sends load balancers elsewhere.
    let r = c.echo("ext", &["tcp", "10.99.0.11:30103", "5"]);
    assert_eq!(count(&r, "replies", "a1"), 5, "{r}");
    let (code, body) = c.http("ext", "10.99.0.11:32103", "/healthz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
    let (code, body) = c.http("ext", "10.99.0.12:32103", "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"localEndpoints\":1"), "{body}");
}

/// loadBalancerSourceRanges admit packets whose source is the LB IP itself
/// only when a range holds a node address: a client outside spoofing the
/// LB IP (by SNAT in its own namespace) is dropped otherwise.
fn spoofed_load_balancer_sources(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
    let b1 = c.add_pod("b1", 2, 2);
    let lb = |name: &str, cip: &str, np: u16, range: &str, ingress: &str| {
        with_ingress(
            service_manifest(
                name,
                cip,
                "TCP",
                &format!("    nodePort: {np}\n"),
                &format!("  type: LoadBalancer\n  loadBalancerSourceRanges: [\"{range}\"]\n"),
                &[(&b1, 2, true)],
            ),
            &[(ingress, "")],
        )
    };
    // ext (10.99.0.100) is admitted by both; only the second range holds
    // the nodes' addresses.
    c.write_manifest(
        "client.yaml",
        &lb(
            "client",
            "10.96.0.50",
            30111,
            "10.99.0.100/32",
            "10.98.0.50",
        ),
    );
    c.write_manifest(
        "nodes.yaml",
        &lb("nodes", "10.96.0.51", 30112, "10.99.0.0/24", "10.98.0.51"),
    );
    let ext = c.ns("ext");
    c.sh(&ext, "ip route add 10.98.0.0/24 via 10.99.0.11");
    // Replies to the spoofed address find their way back to ext.
    c.sh(&c.ns("n1"), "ip route add 10.98.0.0/24 via 10.99.0.100");
    c.start_control_plane();
    c.start_agents();
    c.wait_rules("both services", "10.98.0.51");

    for target in ["10.98.0.50:80", "10.98.0.51:80"] {
        let r = c.echo("ext", &["tcp", target, "3"]);
        assert_eq!(
            count(&r, "replies", "b1"),
            3,
            "the real source: {target} {r}"
        );
    }
    let spoofed = |lb_ip: &str| {
        let rule = format!("POSTROUTING -d {lb_ip} -p tcp -j SNAT --to-source {lb_ip}");
        c.sh(&ext, &format!("iptables -t nat -A {rule}"));
        let r = c.echo("ext", &["tcp", &format!("{lb_ip}:80"), "1"]);
        c.sh(&ext, &format!("iptables -t nat -D {rule}"));
        r
    };
    let r = spoofed("10.98.0.50");
    assert_eq!(r["timeout"], 1, "the LB IP is no source in the ranges: {r}");
    let r = spoofed("10.98.0.51");
    assert_eq!(count(&r, "replies", "b1"), 1, "a range holds the node: {r}");
}

/// Services labelled for another proxy, or headless by label, get no rules;
/// removing the label brings them, adding it takes them away again. An LB
/// ingress IP with `ipMode: Proxy` is not captured on the node.
fn proxy_labels_toggle_the_rules_and_ip_mode_proxy_is_left_alone(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
    let a1 = c.add_pod("a1", 1, 2);
    c.add_pod("client", 2, 9);
    let plain =
        |name: &str, cip: &str| service_manifest(name, cip, "TCP", "", "", &[(&a1, 1, true)]);
    let labelled = [
        (
            "other",
            "10.96.0.60",
            "service.kubernetes.io/service-proxy-name",
            "another-proxy",
        ),
        ("hl", "10.96.0.61", "service.kubernetes.io/headless", ""),
    ];
    for (name, cip, label, value) in labelled {
        c.write_manifest(
            &format!("{name}.yaml"),
            &with_labels(plain(name, cip), &[(label, value), ("app", name)]),
        );
    }
    c.write_manifest(
        "vip.yaml",
        &with_ingress(
            service_manifest(
                "vip",
                "10.96.0.62",
                "TCP",
                "    nodePort: 30121\n",
                "  type: LoadBalancer\n",
                &[(&a1, 1, true)],
            ),
            &[("10.98.0.62", "VIP"), ("10.98.0.63", "Proxy")],
        ),
    );
    c.sh(&c.ns("ext"), "ip route add 10.98.0.0/24 via 10.99.0.11");
    c.start_control_plane();
    c.start_agents();
    c.wait_rules("the VIP service", "10.98.0.62");

    let reaches = |cip: &str| {
        let r = c.echo("client", &["tcp", &format!("{cip}:80"), "1"]);
        count(&r, "replies", "a1") == 1
    };
    for (_, cip, _, _) in labelled {
        assert!(!c.rules(2).contains(cip), "{cip} is another proxy's");
        assert!(!reaches(cip), "{cip} answered without rules");
    }
    let r = c.echo("ext", &["tcp", "10.98.0.62:80", "3"]);
    assert_eq!(count(&r, "replies", "a1"), 3, "{r}");
    assert!(
        !c.rules(1).contains("10.98.0.63"),
        "ipMode Proxy is not captured"
    );
    let r = c.echo("ext", &["tcp", "10.98.0.63:80", "1"]);
    assert_eq!(count(&r, "replies", "a1"), 0, "{r}");

    // The labels go: the Services are proxied; they come back: not any more.
    for (name, cip, _, _) in labelled {
        c.write_manifest(&format!("{name}.yaml"), &plain(name, cip));
    }
    c.wait_rules("the unlabelled services", &c.frontend("10.96.0.61"));
    for (_, cip, _, _) in labelled {
        c.wait_until(&format!("{cip} to answer"), || reaches(cip));
    }
    for (name, cip, label, value) in labelled {
        c.write_manifest(
            &format!("{name}.yaml"),
            &with_labels(plain(name, cip), &[(label, value)]),
        );
    }
    c.wait_until("the labelled services' rules gone", || {
        (1..=2).all(|i| {
            let r = c.rules(i);
            !r.contains(&c.frontend("10.96.0.60")) && !r.contains(&c.frontend("10.96.0.61"))
        })
    });
    for (_, cip, _, _) in labelled {
        assert!(!reaches(cip), "{cip} answered without rules");
    }
}

/// UDP flows follow what serves them, across a restart from disk: a flow
/// to an endpoint that turned terminating stays on it (it still serves);
/// once that endpoint is deleted while the agent is down, the restarted
/// agent moves the flow; and a flow sent while none of our rules existed
/// meets them after the restart's full sync (control plane down: the agent
/// runs from its persisted state alone).
fn udp_flows_are_reconciled_after_every_sync(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
    let a1 = c.add_pod("a1", 1, 2);
    let b1 = c.add_pod("b1", 2, 2);
    c.add_pod("client", 2, 9);
    let dns = |eps: &[(&str, u8, Condition)]| {
        with_endpoints(
            service_manifest("dns", "10.96.0.11", "UDP", "", "", &[]),
            eps,
        )
    };
    let (a, b) = (
        (a1.as_str(), 1, Condition::Ready),
        (b1.as_str(), 2, Condition::Ready),
    );
    c.write_manifest("dns.yaml", &dns(&[a, b]));
    c.start_control_plane();
    c.start_agents();
    c.wait_rules("the UDP service", &c.frontend("10.96.0.11"));
    // One datagram of the flow from source port `sport`: who answered.
    fn flow(c: &Cluster, sport: &str) -> String {
        let u = c.echo("client", &["udp", "10.96.0.11:80", "1", sport]);
        u["replies"][0].as_str().unwrap_or("-").to_owned()
    }
    let first = flow(&c, "40500");
    let (stays, other) = match first.as_str() {
        "a1" => ((a1.as_str(), 1), (b1.as_str(), 2, Condition::Ready)),
        "b1" => ((b1.as_str(), 2), (a1.as_str(), 1, Condition::Ready)),
        _ => panic!("the flow reached no endpoint: {first}"),
    };

    // The endpoint terminates: no new flow goes there, this one stays.
    c.write_manifest(
        "dns.yaml",
        &dns(&[(stays.0, stays.1, Condition::Terminating), other]),
    );
    c.wait_until("the terminating endpoint out of node 2's rules", || {
        !c.rules(2).contains(&c.dnat(stays.0, 8080))
    });
    assert_eq!(
        flow(&c, "40500"),
        first,
        "a serving endpoint keeps its flow"
    );
    assert_ne!(flow(&c, "40501"), first, "a new flow goes to the ready one");

    // Deleted while node 2's agent is down: the restarted agent moves it.
    c.kill_agent(2);
    c.write_manifest("dns.yaml", &dns(&[other]));
    c.wait_until("node 1 without the deleted endpoint", || {
        !c.rules(1).contains(&c.dnat(stays.0, 8080))
    });
    assert_eq!(
        flow(&c, "40500"),
        first,
        "nobody cleared it while the agent was down"
    );
    c.start_agent(2);
    c.wait_until("the flow to move to the live endpoint", || {
        flow(&c, "40500") != first
    });

    // A flow sent while node 2 had none of our rules (cleaned up, agent and
    // control plane down) was never translated; the agent's full sync from
    // disk clears it, and the next datagram meets the rules.
    c.stop_control_plane();
    c.kill_agent(2);
    c.cleanup_node(2);
    let n2 = c.ns("n2");
    // A node tracks connections without us (CNI, firewall rules); with no
    // rule that needs conntrack the kernel would track nothing.
    c.sh(
        &n2,
        "iptables -A FORWARD -m conntrack --ctstate INVALID -j DROP",
    );
    assert_eq!(flow(&c, "40600"), "-", "no rules, no answer");
    let untranslated = c.sh(&n2, "conntrack -L -p udp --orig-port-src 40600 2>/dev/null");
    assert!(
        untranslated.matches("10.96.0.11").count() == 2,
        "an entry replying from the cluster IP itself: {untranslated}"
    );
    c.start_agent(2);
    c.wait_until("the untranslated flow to reach an endpoint", || {
        flow(&c, "40600") != "-"
    });
}

/// kubernetes#139628: a UDP Service scaled to zero. The filter rules refuse
/// new flows only, so a flow that reached the endpoint before would go on
/// reaching the deleted pod (here still running, as a pod that is slow to
/// die or whose address was reused) unless its conntrack entry is cleared.
/// Once cleared, the flow's next datagram meets the REJECT; when an
/// endpoint comes back, the same flow reaches it.
fn udp_flow_of_a_service_scaled_to_zero_is_refused(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
    let a1 = c.add_pod("a1", 1, 2);
    let b1 = c.add_pod("b1", 2, 2);
    c.add_pod("client", 2, 9);
    let statsd = |eps: &[(&str, u8, Condition)]| {
        with_endpoints(
            service_manifest("statsd", "10.96.0.12", "UDP", "", "", &[]),
            eps,
        )
    };
    c.write_manifest(
        "statsd.yaml",
        &statsd(&[(a1.as_str(), 1, Condition::Ready)]),
    );
    c.start_control_plane();
    c.start_agents();
    c.wait_rules("the UDP service", &c.dnat(&a1, 8080));
    let flow = |c: &Cluster| {
        let u = c.echo("client", &["udp", "10.96.0.12:80", "1", "40700"]);
        u["replies"][0].as_str().unwrap_or("-").to_owned()
    };
    assert_eq!(flow(&c), "a1", "the flow reaches the endpoint");
    let n2 = c.ns("n2");
    let entries = || c.sh(&n2, "conntrack -L -p udp --orig-port-src 40700 2>/dev/null");
    assert!(
        entries().contains(&a1),
        "the flow's entry points at the endpoint: {}",
        entries()
    );

    c.write_manifest("statsd.yaml", &statsd(&[]));
    c.wait_until("node 2 to refuse the Service", || {
        c.refuses(2, "10.96.0.12")
    });
    c.wait_until("the flow to the deleted endpoint to be refused", || {
        flow(&c) == "-"
    });
    let left = entries();
    assert!(
        !left.contains(&a1),
        "no entry of the flow points at the deleted endpoint: {left}"
    );

    c.write_manifest(
        "statsd.yaml",
        &statsd(&[(b1.as_str(), 2, Condition::Ready)]),
    );
    c.wait_until("the same flow to reach the new endpoint", || {
        flow(&c) == "b1"
    });
}

/// kube-proxy's nftables mode knows the Service ranges: with
/// `--service-cidr 10.96.0.0/16`, traffic to an address of the range that
/// no Service holds is dropped, and to a live cluster IP on a port its
/// Service does not have, refused. Without those rules both would leave
/// the node by its default route: here the router (the infra namespace)
/// holds both addresses and answers on both ports, so a reply from it is
/// a leak. And `--nodeport-addresses primary`: node ports on the address
/// the node's default route leaves from only.
fn service_ranges_and_primary_node_port_addresses(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
    let a1 = c.add_pod("a1", 1, 2);
    c.add_pod("client", 2, 9);
    let infra = c.ns("infra");
    for cmd in [
        "ip addr add 10.96.0.10/32 dev lo",
        "ip addr add 10.96.0.99/32 dev lo",
        "ip route add 10.244.2.0/24 via 10.99.0.12",
    ] {
        c.sh(&infra, cmd);
    }
    let echo = std::path::Path::new(env!("CARGO_BIN_EXE_sy_echo"));
    for port in ["80", "81"] {
        c.spawn_program(
            "infra",
            echo,
            &["serve".into(), "router".into(), port.into()],
            &format!("router-{port}"),
        );
    }
    c.wait_until("the router to answer", || {
        c.echo("client", &["tcp", "10.96.0.99:81", "1"])["replies"]["router"] == 1
    });
    // Node 1 also has an address its default route does not use.
    let n1 = c.ns("n1");
    c.sh(&n1, "ip addr add 10.98.0.11/32 dev lo");
    c.sh(&c.ns("ext"), "ip route add 10.98.0.11/32 via 10.99.0.11");

    c.write_manifest(
        "web.yaml",
        &service_manifest(
            "web",
            "10.96.0.10",
            "TCP",
            "    nodePort: 30095\n",
            "  type: NodePort\n",
            &[(a1.as_str(), 1, true)],
        ),
    );
    c.start_control_plane();
    for i in 1..=2 {
        c.start_agent_with(
            i,
            &[
                "--service-cidr",
                "10.96.0.0/16",
                "--nodeport-addresses",
                "primary",
            ],
        );
    }
    c.wait_rules("the web Service", &c.dnat(&a1, 8080));

    let served = c.echo("client", &["tcp", "10.96.0.10:80", "3"]);
    assert_eq!(served["replies"]["a1"], 3, "its port: {served}");
    let unknown = c.echo("client", &["tcp", "10.96.0.10:81", "3"]);
    assert_eq!(
        unknown["refused"], 3,
        "another port of a live IP is refused: {unknown}"
    );
    let unallocated = c.echo("client", &["tcp", "10.96.0.99:81", "2"]);
    assert_eq!(
        unallocated["timeout"], 2,
        "an unallocated Service IP is dropped, not routed: {unallocated}"
    );
    let outside = c.echo("client", &["tcp", "10.99.0.1:81", "1"]);
    assert_eq!(
        outside["replies"]["router"], 1,
        "outside the range: untouched"
    );

    let primary = c.echo("ext", &["tcp", "10.99.0.11:30095", "2"]);
    assert_eq!(
        primary["replies"]["a1"], 2,
        "the primary address: {primary}"
    );
    let other = c.echo("ext", &["tcp", "10.98.0.11:30095", "2"]);
    assert!(
        other["replies"].as_object().is_none_or(|r| r.is_empty()),
        "no node port on another address of the node: {other}"
    );
}

/// Transparent DNS (`--dns-service kube-system/kube-dns`): a pod whose
/// resolver is the cluster DNS IP, as kubelet sets it, is answered by its
/// node's agent: cluster names from the snapshot, other names forwarded to
/// the kube-dns endpoints. The stand-in for CoreDNS answers every name with
/// 192.0.2.53, so an answer of 10.96.0.10 for the Service name came from
/// the agent. Stopped with SIGTERM, the agent hands the address back and
/// the pod is answered through the kube-dns rules; started without the
/// flag after a SIGKILL (its rules left behind), it removes them.
fn transparent_dns_answers_on_the_cluster_dns_ip(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
    let a1 = c.add_pod("a1", 1, 2);
    c.add_pod("coredns", 1, 53);
    c.add_pod("client", 2, 9);
    let echo = std::path::Path::new(env!("CARGO_BIN_EXE_sy_echo"));
    c.spawn_program(
        "coredns",
        echo,
        &["dns".into(), "53".into(), "192.0.2.53".into()],
        "coredns",
    );
    c.write_manifest("kube-dns.yaml", KUBE_DNS);
    c.write_manifest(
        "web.yaml",
        &service_manifest(
            "web",
            "10.96.0.10",
            "TCP",
            "",
            "",
            &[(a1.as_str(), 1, true)],
        ),
    );
    fn taken(c: &Cluster) -> bool {
        c.sh(&c.ns("n2"), "iptables -t raw -S")
            .contains("-A PREROUTING -d 10.96.0.53/32 -p udp -m udp --dport 53")
    }
    fn dig(c: &Cluster, args: &str) -> String {
        c.sh(
            &c.ns("client"),
            &format!("dig @10.96.0.53 +short +tries=1 +time=2 {args}"),
        )
        .trim()
        .to_owned()
    }
    // A stopped agent serves 1 s for a successor before it hands back.
    let flags = [
        "--dns-service",
        "kube-system/kube-dns",
        "--handoff-wait",
        "1s",
    ];
    c.start_control_plane();
    c.start_agent_with(1, &flags);
    c.start_agent_with(2, &flags);
    c.wait_until("node 2 to answer for kube-dns", || taken(&c));
    let web = "web.test.svc.cluster.local";
    assert_eq!(dig(&c, web), "10.96.0.10", "the agent answers");
    assert_eq!(
        dig(&c, &format!("+tcp {web}")),
        "10.96.0.10",
        "over TCP too"
    );
    assert_eq!(
        dig(&c, "www.example.org"),
        "192.0.2.53",
        "other names: forwarded to the kube-dns endpoints"
    );

    c.stop_agent(2);
    assert!(!taken(&c), "handed back at stop");
    assert!(
        c.sh(&c.ns("n2"), "iptables -t raw -S")
            .contains("-d 169.254.20.10/32"),
        "the stub's own address keeps its rules"
    );
    assert_eq!(
        dig(&c, web),
        "192.0.2.53",
        "answered through the kube-dns rules while the agent is down"
    );

    c.start_agent_with(2, &flags);
    c.wait_until("node 2 to take kube-dns over again", || taken(&c));
    assert_eq!(dig(&c, web), "10.96.0.10");

    // Upgraded with surge: the new agent takes the old one's sockets, the
    // rules stay, the agent (not CoreDNS) answers on.
    c.upgrade_agent(2, &flags);
    assert!(taken(&c), "the rules stay through a handoff");
    assert_eq!(dig(&c, web), "10.96.0.10");
    assert_eq!(dig(&c, &format!("+tcp {web}")), "10.96.0.10");

    // Switched off after a crash: the rules it left are removed.
    c.kill_agent(2);
    assert!(taken(&c), "a SIGKILL leaves them");
    c.start_agent(2);
    c.wait_until("the left-over rules to go", || !taken(&c));
    assert_eq!(dig(&c, web), "192.0.2.53");
}

/// sessionAffinity ClientIP with a 2 s timeout: one client keeps its
/// backend while it connects within the timeout; once it has been quiet
/// for longer, the remembered choice has expired and a new one is made
/// (each round waits out the timeout, the behaviour under test, then
/// connects; bounded: with three backends a new choice differs with
/// probability 2/3 per round).
fn session_affinity_expires(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
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
        "sticky.yaml",
        &service_manifest(
            "sticky",
            "10.96.0.70",
            "TCP",
            "",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 2\n",
            &all,
        ),
    );
    c.start_control_plane();
    c.start_agents();
    c.wait_rules("the sticky service", &c.frontend("10.96.0.70"));

    let sticky = |n: &str| {
        let r = c.echo("client", &["tcp", "10.96.0.70:80", n]);
        assert_eq!(failures(&r), 0, "{r}");
        let b = backends(&r);
        assert_eq!(b.len(), 1, "one backend within the timeout: {r}");
        b[0].clone()
    };
    let first = sticky("30");
    // Connections less than the timeout apart keep it (each refreshes it).
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(sticky("5"), first, "within the timeout");
    }
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(
            rounds <= 10,
            "after {} quiet periods of 3 s (timeout 2 s) the client still reached only {first}: the affinity never expired",
            rounds - 1
        );
        std::thread::sleep(Duration::from_secs(3));
        // The new choice is sticky in its turn.
        if sticky("10") != first {
            break;
        }
    }
}

/// A Service whose ready endpoint count crosses the bound of the exact
/// endpoint-count classes (32; above, the wide class of 1,024 slots) up
/// and down again: at every count the traffic reaches its ready
/// endpoints only, on both nodes, never the not-ready ones (addresses
/// nobody holds: a connection there would time out). The endpoints are
/// extra addresses of two pods.
fn endpoint_count_crosses_the_class_boundary(plane: Plane) {
    let Some(mut c) = cluster(plane) else { return };
    let a1 = c.add_pod("a1", 1, 2);
    let b1 = c.add_pod("b1", 2, 2);
    c.add_pod("client", 2, 9);
    let mut ready = vec![a1, b1];
    let more_a = c.add_pod_addresses("a1", 100..120);
    let more_b = c.add_pod_addresses("b1", 100..120);
    for (x, y) in more_a.into_iter().zip(more_b) {
        ready.push(x);
        ready.push(y);
    }
    let manifest = |n: usize| {
        let mut eps: Vec<(&str, u8, bool)> = ready[..n]
            .iter()
            .map(|ip| {
                (
                    ip.as_str(),
                    if ip.starts_with("10.244.1.") { 1 } else { 2 },
                    true,
                )
            })
            .collect();
        eps.extend([("10.244.1.250", 1, false), ("10.244.2.250", 2, false)]);
        service_manifest("wide", "10.96.0.80", "TCP", "", "", &eps)
    };
    c.write_manifest("wide.yaml", &manifest(32));
    c.start_control_plane();
    c.start_agents();
    let programmed = |n: usize| {
        let (last, gone) = (&ready[n - 1], &ready[n]);
        let dnat_last = c.dnat(last, 8080);
        let dnat_gone = c.dnat(gone, 8080);
        c.wait_until(&format!("{n} endpoints programmed on node 2"), || {
            let r = c.rules(2);
            r.contains(&dnat_last) && !r.contains(&dnat_gone)
        });
    };
    for n in [32, 33, 40, 33, 32, 31] {
        c.write_manifest("wide.yaml", &manifest(n));
        programmed(n);
        let r = c.echo("client", &["tcp", "10.96.0.80:80", "120"]);
        assert_eq!(failures(&r), 0, "{n} endpoints: {r}");
        assert!(
            count(&r, "replies", "a1") > 0 && count(&r, "replies", "b1") > 0,
            "{n} endpoints, spread over both pods: {r}"
        );
        assert!(
            !c.rules(2).contains(&c.dnat("10.244.1.250", 8080)),
            "a not-ready endpoint is programmed"
        );
    }
}
