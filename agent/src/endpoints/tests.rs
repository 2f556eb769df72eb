use super::*;
use std::sync::Arc;
use switchyard_model::{
    EndpointConditions, EndpointPort, EndpointSlice, Service, ServiceKey, TargetPort,
};

const ADDRS: [IpAddr; 1] = [IpAddr::V4(std::net::Ipv4Addr::new(10, 99, 0, 11))];

fn node() -> NodeView<'static> {
    NodeView {
        name: "node-a",
        zone: Some("zone-a"),
        addresses: &ADDRS,
        cluster: Some("east"),
    }
}

fn ep(ip: &str, node: &str, zone: &str) -> Endpoint {
    Endpoint {
        addresses: vec![ip.parse().expect("ip")].into(),
        node_name: Some(node.into()),
        zone: Some(zone.into()),
        ..Endpoint::default()
    }
}

fn terminating(mut e: Endpoint, serving: bool) -> Endpoint {
    e.conditions = EndpointConditions {
        ready: false,
        serving,
        terminating: true,
    };
    e
}

fn zones(mut e: Endpoint, z: &[&str]) -> Endpoint {
    let nodes = e.hint_nodes().into();
    e.set_hints(z.iter().map(|s| Arc::from(*s)).collect(), nodes);
    e
}

fn nodes(mut e: Endpoint, n: &[&str]) -> Endpoint {
    let zones = e.hint_zones().into();
    e.set_hints(zones, n.iter().map(|s| Arc::from(*s)).collect());
    e
}

/// `shop/web` on 10.96.0.10:80 (UDP), one slice resolving it to 8080.
fn svc(eps: Vec<Endpoint>) -> ServiceState {
    let mut s = Service::new(ServiceKey::new("default", "shop", "web"));
    s.cluster_ips = vec!["10.96.0.10".parse().expect("ip")];
    s.ports = vec![ServicePort {
        name: "p".into(),
        protocol: Protocol::Udp,
        port: 80,
        target_port: TargetPort::Number(8080),
        node_port: None,
    }];
    ServiceState {
        service: s,
        slices: vec![EndpointSlice {
            name: "w".into(),
            address_type: AddressType::IPv4,
            endpoints: eps,
            ports: vec![EndpointPort {
                name: "p".into(),
                protocol: Protocol::Udp,
                port: 8080,
            }],
            cluster: None,
            trigger_time_unix_nanos: None,
        }],
    }
}

fn node_port(mut s: ServiceState) -> ServiceState {
    s.service.service_type = ServiceType::NodePort;
    s.service.ports[0].node_port = Some(30080);
    s
}

fn one(s: &ServiceState) -> PortPlan<'_> {
    let mut plans = plan(s, AddressType::IPv4, &node());
    assert_eq!(plans.len(), 1);
    plans.remove(0)
}

fn ips(b: &[Backend]) -> Vec<String> {
    let mut v: Vec<String> = b.iter().map(|b| b.ip.to_string()).collect();
    v.sort();
    v
}

#[test]
fn ready_endpoints_first_then_serving_terminating() {
    let s = svc(vec![
        ep("10.244.1.1", "node-a", "zone-a"),
        terminating(ep("10.244.1.2", "node-a", "zone-a"), true),
    ]);
    let p = one(&s);
    assert_eq!(ips(&p.cluster_endpoints), ["10.244.1.1"]);
    assert!(p.local_endpoints.is_empty(), "Local policy is not in use");
    assert!(p.has_endpoints);
    // Both serve: clean-up keeps flows to either.
    assert_eq!(p.serving.len(), 2);

    let s = svc(vec![
        terminating(ep("10.244.1.2", "node-a", "zone-a"), true),
        terminating(ep("10.244.1.3", "node-a", "zone-a"), false),
    ]);
    let p = one(&s);
    assert_eq!(ips(&p.cluster_endpoints), ["10.244.1.2"]);
    assert_eq!(p.serving.len(), 1);
}

#[test]
fn external_local_without_local_endpoints_keeps_the_cluster_endpoints() {
    let mut s = node_port(svc(vec![ep("10.244.2.1", "node-b", "zone-b")]));
    s.service.external_traffic_policy = TrafficPolicy::Local;
    let p = one(&s);
    assert!(p.external_local);
    assert!(p.local_endpoints.is_empty());
    assert_eq!(ips(&p.cluster_endpoints), ["10.244.2.1"]);
    assert!(p.has_endpoints, "an endpoint elsewhere");
    assert!(p.has_internal_endpoints());
    assert!(!p.has_external_endpoints(), "outside traffic: nothing here");

    // internalTrafficPolicy Local too: the cluster IP has nothing here,
    // but the short-circuit to the Cluster endpoints stays.
    s.service.internal_traffic_policy = TrafficPolicy::Local;
    let p = one(&s);
    assert!(p.uses_cluster_endpoints());
    assert_eq!(ips(&p.cluster_endpoints), ["10.244.2.1"]);
    assert!(p.has_endpoints && !p.has_internal_endpoints());

    // A ClusterIP Service never uses Local external policy.
    let mut s = svc(vec![ep("10.244.2.1", "node-b", "zone-b")]);
    s.service.external_traffic_policy = TrafficPolicy::Local;
    s.service.internal_traffic_policy = TrafficPolicy::Local;
    let p = one(&s);
    assert!(!p.external_local && !p.uses_cluster_endpoints());
    assert!(p.cluster_endpoints.is_empty());
    assert!(p.has_endpoints && !p.has_internal_endpoints());
}

#[test]
fn local_endpoints_fall_back_to_serving_terminating_on_their_own() {
    let mut s = node_port(svc(vec![
        ep("10.244.2.1", "node-b", "zone-b"),
        terminating(ep("10.244.1.2", "node-a", "zone-a"), true),
    ]));
    s.service.external_traffic_policy = TrafficPolicy::Local;
    let p = one(&s);
    assert_eq!(ips(&p.local_endpoints), ["10.244.1.2"]);
    assert_eq!(ips(&p.cluster_endpoints), ["10.244.2.1"]);
    assert!(p.has_external_endpoints());
    // The health check counts ready local endpoints only.
    assert_eq!(local_ready_endpoints(&s, "node-a"), 0);
    assert_eq!(local_ready_endpoints(&s, "node-b"), 1);
}

#[test]
fn one_endpoint_without_hints_turns_hints_off() {
    let hinted = |ip, node, zone| zones(ep(ip, node, zone), &[zone]);
    let s = svc(vec![
        hinted("10.244.1.1", "node-a", "zone-a"),
        hinted("10.244.2.1", "node-b", "zone-b"),
    ]);
    let p = one(&s);
    assert_eq!(p.topology, Topology::SameZone);
    assert_eq!(ips(&p.cluster_endpoints), ["10.244.1.1"]);

    let s = svc(vec![
        hinted("10.244.1.1", "node-a", "zone-a"),
        hinted("10.244.2.1", "node-b", "zone-b"),
        ep("10.244.3.1", "node-c", "zone-a"),
    ]);
    let p = one(&s);
    assert_eq!(p.topology, Topology::Any);
    assert_eq!(p.cluster_endpoints.len(), 3);
    // Not even trafficDistribution brings our own zone filter back.
    let mut s = s;
    s.service.traffic_distribution = Some("PreferClose".into());
    assert_eq!(one(&s).cluster_endpoints.len(), 3);

    // No hint for our zone: every endpoint.
    let s = svc(vec![hinted("10.244.2.1", "node-b", "zone-b")]);
    assert_eq!(one(&s).topology, Topology::Any);
    // Not-ready endpoints do not count.
    let s = svc(vec![
        hinted("10.244.1.1", "node-a", "zone-a"),
        terminating(ep("10.244.2.1", "node-b", "zone-b"), true),
    ]);
    assert_eq!(one(&s).topology, Topology::SameZone);
}

#[test]
fn node_hints_come_before_zone_hints() {
    let both = |ip, n: &str, z: &str| nodes(zones(ep(ip, n, z), &[z]), &[n]);
    let s = svc(vec![
        both("10.244.1.1", "node-a", "zone-a"),
        both("10.244.1.9", "node-x", "zone-a"),
        both("10.244.2.1", "node-b", "zone-b"),
    ]);
    let p = one(&s);
    assert_eq!(p.topology, Topology::SameNode);
    assert_eq!(ips(&p.cluster_endpoints), ["10.244.1.1"]);
    // No endpoint hinted for this node: the zone hints apply.
    let s = svc(vec![
        both("10.244.1.9", "node-x", "zone-a"),
        both("10.244.2.1", "node-b", "zone-b"),
    ]);
    let p = one(&s);
    assert_eq!(p.topology, Topology::SameZone);
    assert_eq!(ips(&p.cluster_endpoints), ["10.244.1.9"]);
}

#[test]
fn traffic_distribution_derives_hints_when_none_are_given() {
    let eps = || {
        vec![
            ep("10.244.1.1", "node-a", "zone-a"),
            ep("10.244.1.9", "node-x", "zone-a"),
            ep("10.244.2.1", "node-b", "zone-b"),
        ]
    };
    let with = |td: &str| {
        let mut s = svc(eps());
        s.service.traffic_distribution = Some(td.into());
        s
    };
    assert_eq!(one(&svc(eps())).topology, Topology::Any);
    for td in ["PreferClose", "PreferSameZone"] {
        let s = with(td);
        let p = one(&s);
        assert_eq!(p.topology, Topology::SameZone, "{td}");
        assert_eq!(ips(&p.cluster_endpoints), ["10.244.1.1", "10.244.1.9"]);
    }
    let s = with("PreferSameNode");
    let p = one(&s);
    assert_eq!(p.topology, Topology::SameNode);
    assert_eq!(ips(&p.cluster_endpoints), ["10.244.1.1"]);
    // Hints given by the EndpointSlice controller are taken as they are.
    let mut s = with("PreferSameNode");
    s.slices[0].endpoints[2].set_hints(["zone-b".into()].into(), Box::default());
    assert_eq!(one(&s).topology, Topology::Any, "others lack hints");
}

#[test]
fn source_ranges_admit_the_lb_ips_only_with_a_node_address() {
    let mut s = node_port(svc(vec![ep("10.244.2.1", "node-b", "zone-b")]));
    s.service.service_type = ServiceType::LoadBalancer;
    s.service.load_balancer_ips = vec!["192.0.2.7".parse().expect("ip")];
    s.service.load_balancer_source_ranges = vec!["198.51.100.0/24".parse().expect("net")];
    let fw = one(&s).firewall.expect("a firewall");
    assert!(!fw.allow_from_load_balancer);
    s.service
        .load_balancer_source_ranges
        .push("10.99.0.0/24".parse().expect("net"));
    assert!(
        one(&s)
            .firewall
            .expect("a firewall")
            .allow_from_load_balancer
    );
    // Only ranges of another family: nothing admitted in this one.
    s.service.load_balancer_source_ranges = vec!["2001:db8::/32".parse().expect("net")];
    let fw = one(&s).firewall.expect("a firewall");
    assert!(fw.source_ranges.is_empty() && !fw.allow_from_load_balancer);
}

#[test]
fn unproxied_services_have_no_plan_and_frontends_cover_every_address() {
    let mut s = node_port(svc(vec![ep("10.244.2.1", "node-b", "zone-b")]));
    s.service.external_ips = vec!["192.0.2.8".parse().expect("ip")];
    let p = one(&s);
    let sa = |x: &str| x.parse::<SocketAddr>().expect("addr");
    assert_eq!(
        p.frontends(),
        [
            Frontend::Ip(sa("10.96.0.10:80")),
            Frontend::Ip(sa("192.0.2.8:80")),
            Frontend::NodePort(30080)
        ]
    );
    assert_eq!(udp_frontends(&s, AddressType::IPv4, &node()).len(), 3);
    assert!(udp_frontends(&s, AddressType::IPv6, &node()).is_empty());
    s.service.not_proxied_by = Some("service.kubernetes.io/service-proxy-name".into());
    assert!(plan(&s, AddressType::IPv4, &node()).is_empty());
    assert!(udp_frontends(&s, AddressType::IPv4, &node()).is_empty());
}

/// `clusterset/shop/web` with the ready endpoints of each named cluster.
fn import(locality: Option<Locality>, clusters: &[(&str, &[&str])]) -> ServiceState {
    let mut s = svc(Vec::new());
    s.service.key = ServiceKey::new(switchyard_model::CLUSTERSET, "shop", "web");
    s.service.locality = locality;
    let template = s.slices.remove(0);
    for (cluster, ips) in clusters {
        s.slices.push(EndpointSlice {
            name: format!("{cluster}.w"),
            endpoints: ips.iter().map(|ip| ep(ip, "elsewhere", "z")).collect(),
            cluster: Some((*cluster).into()),
            ..template.clone()
        });
    }
    s
}

fn cluster_ips(s: &ServiceState) -> Vec<String> {
    let mut v: Vec<String> = one(s)
        .cluster_endpoints
        .iter()
        .map(|b| b.ip.to_string())
        .collect();
    v.sort();
    v
}

fn threshold(n: u32, preference: &[&str]) -> Option<Locality> {
    Some(Locality {
        min_local_endpoints: n,
        preference: preference.iter().map(|s| s.to_string()).collect(),
    })
}

#[test]
fn an_import_uses_its_own_clusters_endpoints_while_there_are_enough() {
    let clusters: &[(&str, &[&str])] = &[
        ("east", &["10.1.0.1", "10.1.0.2"]),
        ("west", &["10.2.0.1"]),
        ("north", &["10.3.0.1"]),
    ];
    // This node is in east: 2 ready there, threshold 2: east only.
    assert_eq!(
        cluster_ips(&import(threshold(2, &[]), clusters)),
        ["10.1.0.1", "10.1.0.2"]
    );
    // Threshold 3: every other cluster joins, east's stay (graded).
    assert_eq!(
        cluster_ips(&import(threshold(3, &[]), clusters)),
        ["10.1.0.1", "10.1.0.2", "10.2.0.1", "10.3.0.1"]
    );
    // With a preference, north is the next tier and suffices.
    assert_eq!(
        cluster_ips(&import(threshold(3, &["north"]), clusters)),
        ["10.1.0.1", "10.1.0.2", "10.3.0.1"]
    );
    // No local endpoint: the next tiers, whatever the threshold.
    let remote: &[(&str, &[&str])] = &[("west", &["10.2.0.1"]), ("north", &["10.3.0.1"])];
    assert_eq!(
        cluster_ips(&import(threshold(0, &[]), remote)),
        ["10.2.0.1", "10.3.0.1"]
    );
    // No locality (an older control plane): every cluster, as before.
    assert_eq!(cluster_ips(&import(None, clusters)).len(), 4);
    // A Service of the node's own cluster is never narrowed by cluster.
    let mut own = import(threshold(5, &[]), clusters);
    own.service.key = ServiceKey::new("east", "shop", "web");
    assert_eq!(cluster_ips(&own).len(), 4);
}

#[test]
fn an_imports_endpoint_is_local_only_in_the_nodes_own_cluster() {
    // Node names are unique within a cluster only: west has a node-a too.
    let mut s = import(None, &[("east", &["10.1.0.1"]), ("west", &["10.2.0.1"])]);
    s.service.internal_traffic_policy = TrafficPolicy::Local;
    for slice in &mut s.slices {
        for e in &mut slice.endpoints {
            e.node_name = Some("node-a".into());
        }
    }
    let p = one(&s);
    assert!(p.uses_local_endpoints());
    assert_eq!(ips(&p.local_endpoints), ["10.1.0.1"]);
    // A node that is not in east has no local endpoint at all.
    let mut west_only = s.clone();
    west_only
        .slices
        .retain(|sl| sl.cluster.as_deref() == Some("west"));
    assert!(one(&west_only).local_endpoints.is_empty());
}
