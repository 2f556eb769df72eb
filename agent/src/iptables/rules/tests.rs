use super::*;
use crate::dataplane::fixtures::{cfg, ep, slice, svc};
use switchyard_model::{Endpoint, EndpointConditions, ServiceType, TrafficPolicy};

/// A TCP Service whose one slice (`w`, port 8080) holds `eps`.
fn tcp_w(eps: Vec<Endpoint>) -> ServiceState {
    svc(Protocol::Tcp, vec![slice("w", Protocol::Tcp, 8080, eps)])
}

/// One endpoint on node-a and one on node-b.
fn two_nodes() -> Vec<Endpoint> {
    vec![ep("10.244.1.2", "node-a"), ep("10.244.2.2", "node-b")]
}

fn chain<'a>(r: &'a ServiceRules, prefix: &str) -> &'a OwnedChain {
    r.chains
        .iter()
        .find(|c| c.name.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} chain in {r:#?}"))
}

fn dnat_targets(r: &ServiceRules) -> Vec<String> {
    let mut v: Vec<String> = r
        .chains
        .iter()
        .flat_map(|c| &c.rules)
        .filter_map(|rule| rule.split("--to-destination ").nth(1).map(str::to_owned))
        .collect();
    v.sort();
    v
}

#[test]
fn chain_names_fit_iptables() {
    let h = hash16("default/shop/web:ptcp");
    assert_eq!(h.len(), 16);
    assert!(
        h.chars()
            .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c))
    );
    assert_eq!(h, hash16("default/shop/web:ptcp"), "stable");
    assert!(format!("SWY-SEP-{h}").len() <= 28);
}

#[test]
fn cluster_ip_balances_over_endpoints() {
    let s = svc(
        Protocol::Tcp,
        vec![slice(
            "web-1",
            Protocol::Tcp,
            8080,
            vec![ep("10.244.1.2", "node-a"), ep("10.244.2.2", "node-b")],
        )],
    );
    let r = service_rules(&s, Family::V4, &cfg());
    assert_eq!(r.dispatch.len(), 3);
    let d = &r.dispatch[0];
    assert_eq!((d.table, d.slot), (Table::Nat, Slot::Bucket(10)));
    // After the translation, what is still addressed to the cluster IP is
    // for a port the Service does not have: refused.
    let unknown: Vec<&str> = r.dispatch[1..].iter().map(|d| d.spec.as_str()).collect();
    assert_eq!(
        unknown,
        [
            "-d 10.96.0.10/32 -p tcp -m comment --comment \"shop/web has no such port\" -j REJECT --reject-with tcp-reset",
            "-d 10.96.0.10/32 -m comment --comment \"shop/web has no such port\" -j REJECT",
        ]
    );
    assert!(
        r.dispatch[1..]
            .iter()
            .all(|d| (d.table, d.slot) == (Table::Filter, Slot::Bucket(10)))
    );
    let svc_chain = chain(&r, "SWY-SVC-");
    assert_eq!(
        d.spec,
        format!(
            "-d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"shop/web:p cluster IP\" -j {}",
            svc_chain.name
        )
    );
    assert_eq!(svc_chain.rules.len(), 3);
    assert!(
        svc_chain.rules[0]
            .starts_with("! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80")
    );
    assert!(svc_chain.rules[0].ends_with("-j SWY-MARK-MASQ"));
    assert!(
        svc_chain.rules[1]
            .starts_with("-m statistic --mode random --probability 0.5000000000 -j SWY-SEP-")
    );
    assert!(svc_chain.rules[2].starts_with("-j SWY-SEP-"));
    let sep = chain(&r, "SWY-SEP-");
    assert_eq!(sep.rules[0], "-s 10.244.1.2/32 -j SWY-MARK-MASQ", "hairpin");
    assert_eq!(
        sep.rules[1],
        "-p tcp -m tcp -j DNAT --to-destination 10.244.1.2:8080"
    );
    assert_eq!(dnat_targets(&r), ["10.244.1.2:8080", "10.244.2.2:8080"]);
    assert!(r.udp.is_empty());
    // Nothing in the other family.
    assert_eq!(
        service_rules(&s, Family::V6, &cfg()),
        ServiceRules::default()
    );
}

#[test]
fn no_endpoints_rejects_in_filter() {
    let s = svc(Protocol::Udp, Vec::new());
    let r = service_rules(&s, Family::V4, &cfg());
    assert!(r.chains.is_empty());
    assert_eq!(r.dispatch.len(), 3, "the port, then the unknown ports");
    assert_eq!(r.dispatch[0].table, Table::Filter);
    assert_eq!(
        r.dispatch[0].spec,
        "-d 10.96.0.10/32 -p udp -m udp --dport 80 -m comment --comment \"shop/web:p has no endpoints\" -j REJECT"
    );
    // TCP is refused with a reset.
    let r = service_rules(&svc(Protocol::Tcp, Vec::new()), Family::V6, &cfg());
    assert!(r.dispatch.is_empty(), "no IPv6 cluster IP, no rules");
    let r = service_rules(&svc(Protocol::Tcp, Vec::new()), Family::V4, &cfg());
    assert!(
        r.dispatch[0]
            .spec
            .ends_with("-j REJECT --reject-with tcp-reset")
    );
}

#[test]
fn named_target_port_resolves_per_slice() {
    let s = svc(
        Protocol::Tcp,
        vec![
            slice(
                "web-1",
                Protocol::Tcp,
                8080,
                vec![ep("10.244.1.2", "node-a")],
            ),
            slice(
                "web-2",
                Protocol::Tcp,
                9090,
                vec![ep("10.244.2.2", "node-b")],
            ),
            // A slice without the port contributes nothing to it.
            slice(
                "web-3",
                Protocol::Udp,
                7070,
                vec![ep("10.244.3.2", "node-b")],
            ),
        ],
    );
    let r = service_rules(&s, Family::V4, &cfg());
    assert_eq!(dnat_targets(&r), ["10.244.1.2:8080", "10.244.2.2:9090"]);
}

#[test]
fn terminating_endpoints_serve_when_none_is_ready() {
    let mut a = ep("10.244.1.2", "node-a");
    a.conditions = EndpointConditions {
        ready: false,
        serving: true,
        terminating: true,
    };
    let mut b = ep("10.244.2.2", "node-b");
    b.conditions = EndpointConditions {
        ready: false,
        serving: false,
        terminating: true,
    };
    let s = svc(
        Protocol::Tcp,
        vec![slice("w", Protocol::Tcp, 8080, vec![a.clone(), b])],
    );
    let r = service_rules(&s, Family::V4, &cfg());
    assert_eq!(dnat_targets(&r), ["10.244.1.2:8080"]);
    // With a ready endpoint, terminating ones are not used.
    let s = svc(
        Protocol::Tcp,
        vec![slice(
            "w",
            Protocol::Tcp,
            8080,
            vec![a, ep("10.244.3.3", "node-c")],
        )],
    );
    assert_eq!(
        dnat_targets(&service_rules(&s, Family::V4, &cfg())),
        ["10.244.3.3:8080"]
    );
}

#[test]
fn zone_hints_and_prefer_close() {
    let mut a = ep("10.244.1.2", "node-b");
    a.set_hints(["zone-a".into()].into(), Box::default());
    a.zone = Some("zone-a".into());
    let mut b = ep("10.244.2.2", "node-c");
    b.set_hints(["zone-b".into()].into(), Box::default());
    b.zone = Some("zone-b".into());
    let s = svc(
        Protocol::Tcp,
        vec![slice("w", Protocol::Tcp, 8080, vec![a.clone(), b.clone()])],
    );
    assert_eq!(
        dnat_targets(&service_rules(&s, Family::V4, &cfg())),
        ["10.244.1.2:8080"]
    );
    // One endpoint without hints: hints are ignored.
    let mut c = ep("10.244.3.3", "node-c");
    c.zone = Some("zone-b".into());
    let s = svc(
        Protocol::Tcp,
        vec![slice(
            "w",
            Protocol::Tcp,
            8080,
            vec![a.clone(), b, c.clone()],
        )],
    );
    assert_eq!(
        dnat_targets(&service_rules(&s, Family::V4, &cfg())).len(),
        3
    );
    // No hints, but trafficDistribution PreferClose and an endpoint in our zone.
    a.set_hints(Box::default(), Box::default());
    let mut s = svc(
        Protocol::Tcp,
        vec![slice("w", Protocol::Tcp, 8080, vec![a, c])],
    );
    assert_eq!(
        dnat_targets(&service_rules(&s, Family::V4, &cfg())).len(),
        2
    );
    s.service.traffic_distribution = Some("PreferClose".into());
    assert_eq!(
        dnat_targets(&service_rules(&s, Family::V4, &cfg())),
        ["10.244.1.2:8080"]
    );
}

#[test]
fn session_affinity_uses_recent() {
    let mut s = tcp_w(two_nodes());
    s.service.session_affinity_timeout = Some(600);
    let r = service_rules(&s, Family::V4, &cfg());
    let c = chain(&r, "SWY-SVC-");
    assert!(c.rules.iter().filter(|r| r.contains("--rcheck")).count() == 2);
    // Each check names the list its endpoint chain sets; the list keeps its
    // name when the chain is renamed after new content.
    let words: Vec<&str> = c.rules[1].split(' ').collect();
    assert_eq!(
        words[..3].join(" ") + " " + &words[4..9].join(" "),
        "-m recent --name --rcheck --seconds 600 --reap -j"
    );
    let (list, target) = (words[3], words[9]);
    let sep = r
        .chains
        .iter()
        .find(|c| c.name == target)
        .expect("the endpoint chain");
    assert!(sep.rules[1].contains(&format!("-m recent --name {list} --set -j DNAT")));
    assert_ne!(list, target);
}

#[test]
fn chains_are_named_after_their_content() {
    let web = |eps: Vec<Endpoint>| service_rules(&tcp_w(eps), Family::V4, &cfg());
    let two = web(two_nodes());
    let again = web(two_nodes());
    assert_eq!(two, again, "same content, same names");
    let one = web(vec![ep("10.244.1.2", "node-a")]);
    let names = |r: &ServiceRules| -> BTreeSet<String> {
        r.chains.iter().map(|c| c.name.clone()).collect()
    };
    let (a, b) = (names(&two), names(&one));
    // The balancing chain changed, so its name did; the kept endpoint's did not.
    assert_ne!(chain(&two, "SWY-SVC-").name, chain(&one, "SWY-SVC-").name);
    assert_eq!(a.intersection(&b).count(), 1);
    // Every jump to a Service chain names a chain of the Service.
    for rule in two
        .chains
        .iter()
        .flat_map(|c| &c.rules)
        .chain(two.dispatch.iter().map(|d| &d.spec))
    {
        if let Some(t) = jump_target(rule).filter(|t| t.starts_with("SWY-S")) {
            assert!(a.contains(t), "{rule} jumps to a chain the Service lacks");
        }
    }
}

#[test]
fn nodeport_with_local_policy() {
    let mut s = tcp_w(two_nodes());
    s.service.service_type = ServiceType::NodePort;
    s.service.ports[0].node_port = Some(30080);
    s.service.external_traffic_policy = TrafficPolicy::Local;
    s.service.health_check_node_port = Some(32000);
    let r = service_rules(&s, Family::V4, &cfg());
    let ext = chain(&r, "SWY-EXT-");
    let svc_name = &chain(&r, "SWY-SVC-").name;
    let svl = chain(&r, "SWY-SVL-");
    assert_eq!(ext.rules.len(), 4);
    assert!(ext.rules[0].starts_with("-s 10.244.0.0/16 "));
    assert!(ext.rules[0].ends_with(&format!("-j {svc_name}")));
    assert!(
        ext.rules[1].starts_with("-m addrtype --src-type LOCAL")
            && ext.rules[1].ends_with("-j SWY-MARK-MASQ")
    );
    assert_eq!(ext.rules[3], format!("-j {}", svl.name));
    // The local chain holds only the local endpoint.
    assert_eq!(svl.rules.len(), 1);
    let np = r
        .dispatch
        .iter()
        .find(|d| d.table == Table::Nat && d.slot == Slot::NodePorts)
        .expect("nodeport rule");
    assert_eq!(
        np.spec,
        format!(
            "-p tcp -m tcp --dport 30080 -m comment --comment \"shop/web:p\" -j {}",
            ext.name
        )
    );
    assert!(r.dispatch.iter().any(|d| d.table == Table::Filter
        && d.spec.starts_with("-p tcp -m tcp --dport 32000 ")
        && d.spec.ends_with("-j ACCEPT")));

    // On a node without a local endpoint, traffic from outside is dropped,
    // but pods and the node itself still reach the endpoints elsewhere
    // (kube-proxy writes the external chain whenever there are endpoints).
    let mut other = cfg();
    other.node = "node-z".into();
    let r = service_rules(&s, Family::V4, &other);
    assert!(r.chains.iter().all(|c| !c.name.starts_with("SWY-SVL-")));
    let ext = chain(&r, "SWY-EXT-");
    let svc_name = &chain(&r, "SWY-SVC-").name;
    assert_eq!(ext.rules.len(), 3, "{ext:#?}");
    assert!(ext.rules[0].starts_with("-s 10.244.0.0/16 ") && ext.rules[0].ends_with(svc_name));
    assert!(ext.rules[1].ends_with("-j SWY-MARK-MASQ"));
    assert!(
        ext.rules[2].starts_with("-m addrtype --src-type LOCAL")
            && ext.rules[2].ends_with(svc_name)
    );
    assert!(r.dispatch.iter().any(|d| d.table == Table::Nat
        && d.slot == Slot::NodePorts
        && d.spec.ends_with(&format!("-j {}", ext.name))));
    assert!(r.dispatch.iter().any(|d| d.table == Table::Filter
        && d.slot == Slot::NodePorts
        && d.spec.contains("--dport 30080")
        && d.spec.ends_with("has no local endpoints\" -j DROP")));
    // The cluster IP keeps its Cluster policy.
    assert!(r.dispatch.iter().any(|d| d.table == Table::Nat
        && d.spec.starts_with("-d 10.96.0.10/32")
        && d.spec.ends_with(svc_name.as_str())));

    // internalTrafficPolicy Local as well: the cluster IP is dropped here,
    // the node port still short-circuits pods and the node.
    s.service.internal_traffic_policy = TrafficPolicy::Local;
    let r = service_rules(&s, Family::V4, &other);
    let ext = chain(&r, "SWY-EXT-");
    let svc_chain = chain(&r, "SWY-SVC-");
    assert!(ext.rules[0].ends_with(&svc_chain.name));
    assert!(
        svc_chain.rules.iter().all(|r| !r.contains("MARK-MASQ")),
        "cluster-IP traffic does not take this chain: {svc_chain:#?}"
    );
    assert!(r.dispatch.iter().any(|d| d.table == Table::Filter
        && d.spec.starts_with("-d 10.96.0.10/32")
        && d.spec.ends_with("has no local endpoints\" -j DROP")));
}

#[test]
fn internal_traffic_policy_local() {
    let mut s = tcp_w(two_nodes());
    s.service.internal_traffic_policy = TrafficPolicy::Local;
    let r = service_rules(&s, Family::V4, &cfg());
    assert!(r.chains.iter().all(|c| !c.name.starts_with("SWY-SVC-")));
    let svl = chain(&r, "SWY-SVL-");
    assert!(r.dispatch[0].spec.ends_with(&format!("-j {}", svl.name)));
    assert_eq!(dnat_targets(&r), ["10.244.1.2:8080"]);
    let mut other = cfg();
    other.node = "node-z".into();
    let r = service_rules(&s, Family::V4, &other);
    assert!(
        r.dispatch[0]
            .spec
            .ends_with("has no local endpoints\" -j DROP")
    );
}

#[test]
fn load_balancer_with_source_ranges_and_external_ips() {
    let mut s = svc(
        Protocol::Tcp,
        vec![slice(
            "w",
            Protocol::Tcp,
            8080,
            vec![ep("10.244.1.2", "node-a")],
        )],
    );
    s.service.service_type = ServiceType::LoadBalancer;
    s.service.ports[0].node_port = Some(30080);
    s.service.load_balancer_ips = vec!["192.0.2.7".parse().expect("ip")];
    s.service.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().expect("net")];
    s.service.external_ips = vec!["192.0.2.8".parse().expect("ip")];
    let r = service_rules(&s, Family::V4, &cfg());
    let fw = chain(&r, "SWY-FW-");
    let ext = chain(&r, "SWY-EXT-");
    // No range holds a node address: the LB IP is no allowed source.
    assert_eq!(fw.rules.len(), 1, "{fw:#?}");
    assert!(fw.rules[0].starts_with("-s 198.51.100.0/24 ") && fw.rules[0].ends_with(&ext.name));
    let lb = r
        .dispatch
        .iter()
        .find(|d| d.table == Table::Nat && d.spec.starts_with("-d 192.0.2.7/32"))
        .expect("LB dispatch");
    assert_eq!(lb.slot, Slot::Bucket(7));
    assert!(lb.spec.ends_with(&format!("-j {}", fw.name)));
    assert!(r.dispatch.iter().any(|d| d.table == Table::Filter
        && d.spec.starts_with("-d 192.0.2.7/32")
        && d.spec.ends_with("-j DROP")));
    assert!(r.dispatch.iter().any(|d| d.table == Table::Nat
        && d.slot == Slot::Bucket(8)
        && d.spec.starts_with("-d 192.0.2.8/32")
        && d.spec.ends_with(&format!("-j {}", ext.name))));
    assert_eq!(ext.rules[0].rsplit(' ').next(), Some("SWY-MARK-MASQ"));

    // A range holding this node's address admits the LB IP as a source.
    s.service
        .load_balancer_source_ranges
        .push("10.99.0.0/24".parse().expect("net"));
    let r = service_rules(&s, Family::V4, &cfg());
    let fw = chain(&r, "SWY-FW-");
    assert_eq!(fw.rules.len(), 3, "{fw:#?}");
    assert!(fw.rules[2].starts_with("-s 192.0.2.7/32 "));
}

#[test]
fn services_for_another_proxy_get_no_rules() {
    let mut s = tcp_w(two_nodes());
    assert!(!service_rules(&s, Family::V4, &cfg()).dispatch.is_empty());
    s.service.not_proxied_by = Some("service.kubernetes.io/headless".into());
    assert_eq!(
        service_rules(&s, Family::V4, &cfg()),
        ServiceRules::default()
    );
}

#[test]
fn ipv6_and_udp_targets() {
    let mut s = svc(
        Protocol::Udp,
        vec![
            slice("w4", Protocol::Udp, 5353, vec![ep("10.244.1.2", "node-a")]),
            slice("w6", Protocol::Udp, 5353, vec![ep("fd00:244::2", "node-a")]),
        ],
    );
    s.service
        .cluster_ips
        .push("fd00:96::a".parse().expect("ip"));
    let r6 = service_rules(&s, Family::V6, &cfg());
    assert_eq!(dnat_targets(&r6), ["[fd00:244::2]:5353"]);
    assert!(
        r6.dispatch[0]
            .spec
            .starts_with("-d fd00:96::a/128 -p udp -m udp --dport 80")
    );
    assert_eq!(r6.dispatch[0].slot, Slot::Bucket(0x0a));
    // No IPv6 cluster CIDR: no off-cluster masquerade rule.
    assert!(
        chain(&r6, "SWY-SVC-")
            .rules
            .iter()
            .all(|r| !r.contains("MARK-MASQ"))
    );
    assert_eq!(
        bucket_jump(Family::V6, Table::Nat, 0x0a),
        "-d ::a/::ff -j SWY-SB-0A"
    );
    let r4 = service_rules(&s, Family::V4, &cfg());
    assert_eq!(r4.udp.len(), 1);
    assert_eq!(
        r4.udp[0].0,
        Frontend::Ip("10.96.0.10:80".parse().expect("addr"))
    );
    assert_eq!(
        r4.udp[0].1.iter().collect::<Vec<_>>(),
        [&"10.244.1.2:5353".parse::<SocketAddr>().expect("addr")]
    );
}

#[test]
fn several_cluster_cidrs_use_the_off_cluster_chain() {
    let mut c = cfg();
    c.cluster_cidrs.push("10.245.0.0/16".parse().expect("cidr"));
    let s = svc(
        Protocol::Tcp,
        vec![slice(
            "w",
            Protocol::Tcp,
            8080,
            vec![ep("10.244.1.2", "node-a")],
        )],
    );
    let r = service_rules(&s, Family::V4, &c);
    assert!(chain(&r, "SWY-SVC-").rules[0].ends_with("-j SWY-OFF-CLUSTER"));
    let statics = static_chains(Family::V4, &c);
    let off = statics
        .iter()
        .find(|c| c.name == OFF_CLUSTER)
        .expect("chain");
    assert_eq!(
        off.rules,
        [
            "-s 10.244.0.0/16 -j RETURN",
            "-s 10.245.0.0/16 -j RETURN",
            "-j SWY-MARK-MASQ"
        ]
    );
}

#[test]
fn nodeport_addresses_restrict_the_services_tail() {
    let mut c = cfg();
    assert_eq!(services_tail(Family::V4, Table::Nat, &c).len(), 1);
    c.nodeport_addresses = vec!["192.168.7.0/24".parse().expect("cidr")];
    let t = services_tail(Family::V4, Table::Nat, &c);
    assert!(t[0].starts_with("-d 192.168.7.0/24 -m addrtype --dst-type LOCAL"));
    assert!(services_tail(Family::V6, Table::Nat, &c).is_empty());
}

#[test]
fn unallocated_service_ips_are_dropped_in_filter_before_the_node_ports() {
    let mut c = cfg();
    c.localhost_nodeports = false;
    c.service_cidrs = vec![
        "10.96.0.0/16".parse().expect("cidr"),
        "fd00:96::/112".parse().expect("cidr"),
    ];
    let filter = services_tail(Family::V4, Table::Filter, &c);
    assert_eq!(
        filter[0],
        "-d 10.96.0.0/16 -m comment --comment \"switchyard: unallocated service IPs\" -j DROP"
    );
    assert!(filter[1].ends_with("-j SWY-NODEPORTS"), "{filter:?}");
    assert!(services_tail(Family::V6, Table::Filter, &c)[0].starts_with("-d fd00:96::/112 "));
    assert!(
        !services_tail(Family::V4, Table::Nat, &c)
            .iter()
            .any(|r| r.contains("10.96.0.0/16")),
        "nat is left alone"
    );
}

#[test]
fn localhost_node_ports_guard_loopback() {
    let mut c = cfg();
    assert!(c.localhost_node_ports());
    let filter = services_tail(Family::V4, Table::Filter, &c);
    assert_eq!(filter.len(), 2);
    assert!(filter[0].starts_with(
        "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT"
    ));
    assert!(filter[0].ends_with("-j DROP"));
    assert_eq!(services_tail(Family::V4, Table::Nat, &c).len(), 1);
    assert_eq!(services_tail(Family::V6, Table::Filter, &c).len(), 1);
    // Loopback not among the node-port addresses, or turned off: no guard.
    c.nodeport_addresses = vec!["192.168.7.0/24".parse().expect("cidr")];
    assert!(!c.localhost_node_ports());
    assert_eq!(services_tail(Family::V4, Table::Filter, &c).len(), 1);
    c.nodeport_addresses = vec!["127.0.0.0/8".parse().expect("cidr")];
    assert!(c.localhost_node_ports());
    c.localhost_nodeports = false;
    assert!(!c.localhost_node_ports());

    // Loopback stays out of the node-port jump when not served there, and
    // always for IPv6.
    let mut c = cfg();
    let nat = |c: &NodeConfig, f| services_tail(f, Table::Nat, c)[0].clone();
    assert!(nat(&c, Family::V4).starts_with("-m addrtype --dst-type LOCAL"));
    assert!(nat(&c, Family::V6).starts_with("! -d ::1/128 -m addrtype --dst-type LOCAL"));
    c.localhost_nodeports = false;
    assert!(nat(&c, Family::V4).starts_with("! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL"));
    assert_eq!(services_tail(Family::V4, Table::Filter, &c).len(), 1);
}
