//! Builders the planes' unit tests share: a node, endpoints, a slice and
//! one Service.

use switchyard_model::{
    AddressType, Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServiceKey, ServicePort,
    ServiceState, TargetPort,
};

use super::NodeConfig;

/// Node `node-a` in `zone-a`, pod CIDR 10.244.0.0/16, address 10.99.0.11.
pub(crate) fn cfg() -> NodeConfig {
    NodeConfig {
        node: "node-a".into(),
        zone: Some("zone-a".into()),
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
        nodeport_addresses: Vec::new(),
        service_cidrs: Vec::new(),
        masquerade_mark: 0x4000,
        localhost_nodeports: true,
        addresses: vec!["10.99.0.11".parse().expect("ip")],
        cluster: None,
    }
}

pub(crate) fn ep(ip: &str, node: &str) -> Endpoint {
    Endpoint {
        addresses: vec![ip.parse().expect("ip")].into(),
        node_name: Some(node.into()),
        ..Endpoint::default()
    }
}

pub(crate) fn slice(name: &str, proto: Protocol, port: u16, eps: Vec<Endpoint>) -> EndpointSlice {
    let v6 = eps.first().is_some_and(|e| e.addresses[0].is_ipv6());
    EndpointSlice {
        name: name.into(),
        address_type: if v6 {
            AddressType::IPv6
        } else {
            AddressType::IPv4
        },
        endpoints: eps,
        ports: vec![EndpointPort {
            name: "p".into(),
            protocol: proto,
            port,
        }],
        cluster: None,
        trigger_time_unix_nanos: None,
    }
}

/// A Service `shop/web` on 10.96.0.10:80 with port name `p`.
pub(crate) fn svc(proto: Protocol, slices: Vec<EndpointSlice>) -> ServiceState {
    let mut s = Service::new(ServiceKey::new("default", "shop", "web"));
    s.cluster_ips = vec!["10.96.0.10".parse().expect("ip")];
    s.ports = vec![ServicePort {
        name: "p".into(),
        protocol: proto,
        port: 80,
        target_port: TargetPort::Number(8080),
        node_port: None,
    }];
    ServiceState { service: s, slices }
}
