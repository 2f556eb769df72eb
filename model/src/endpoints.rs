//! Endpoint slices: where a Service's traffic may go.

use std::net::IpAddr;

use crate::Protocol;
use crate::error::{Collector, ValidationErrors};
use crate::service::{ServiceKey, is_dns_label, is_dns_subdomain, object_name};

/// `addressType` of a slice. FQDN slices are not proxied (kube-proxy ignores
/// them too), so sources drop them before they reach the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AddressType {
    /// IPv4 addresses.
    #[default]
    IPv4,
    /// IPv6 addresses.
    IPv6,
}

/// The state of one endpoint, with Kubernetes' defaults already applied
/// (`ready` unset means ready; `serving` unset means `ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointConditions {
    /// Ready for new connections.
    pub ready: bool,
    /// Able to serve, regardless of terminating.
    pub serving: bool,
    /// Shutting down.
    pub terminating: bool,
}

impl Default for EndpointConditions {
    fn default() -> Self {
        Self {
            ready: true,
            serving: true,
            terminating: false,
        }
    }
}

/// One backend, as an EndpointSlice carries it.
///
/// A large state is mostly endpoints (a million for 100,000 Services of 10),
/// so the optional names are boxed strings and the hints boxed slices:
/// 16 bytes each and no spare room, 128 bytes an endpoint (176 as
/// `String`s and `Vec`s).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Endpoint {
    /// Its addresses, all of the slice's family (proxies use the first).
    pub addresses: Vec<IpAddr>,
    /// Ready / serving / terminating.
    pub conditions: EndpointConditions,
    /// `hostname`, used by headless-Service DNS records.
    pub hostname: Option<Box<str>>,
    /// The Pod its `targetRef` names (kind Pod), for DNS names of headless
    /// endpoints without a hostname (CoreDNS's `endpoint_pod_names`).
    pub pod_name: Option<Box<str>>,
    /// `nodeName`, for traffic policy Local.
    pub node_name: Option<Box<str>>,
    /// `zone`, for topology-aware routing.
    pub zone: Option<Box<str>>,
    /// `hints.forZones[].name`.
    pub hint_zones: Box<[Box<str>]>,
    /// `hints.forNodes[].name`.
    pub hint_nodes: Box<[Box<str>]>,
}

/// One entry of a slice's `ports`: the number the endpoints of this slice
/// listen on for the Service port with the same name and protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    /// Name of the Service port this resolves (empty for an unnamed single port).
    pub name: String,
    /// Transport protocol.
    pub protocol: Protocol,
    /// The port on the endpoints.
    pub port: u16,
}

/// A `discovery.k8s.io/v1` EndpointSlice, already attached to its Service
/// (via the `kubernetes.io/service-name` label).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointSlice {
    /// The slice's own name.
    pub name: String,
    /// IPv4 or IPv6.
    pub address_type: AddressType,
    /// Its endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Its ports.
    pub ports: Vec<EndpointPort>,
    /// The cluster its endpoints are in, when not the Service's own: each
    /// slice of a clusterset import comes from one exporting cluster.
    pub cluster: Option<String>,
    /// When the change that last moved its endpoints happened (Unix
    /// nanoseconds): the `endpoints.kubernetes.io/last-change-trigger-time`
    /// annotation the endpoint controllers set. Network programming latency
    /// is measured from it, as kube-proxy does.
    pub trigger_time_unix_nanos: Option<i64>,
}

impl EndpointSlice {
    /// How errors name this object.
    pub fn object_name(&self, service: &ServiceKey) -> String {
        let key = ServiceKey::new(&service.cluster, &service.namespace, &self.name);
        object_name("EndpointSlice", &key)
    }

    /// Gives back the room its vectors grew beyond what they hold.
    /// Conversions build slices by pushing, which leaves up to twice the
    /// room they use (16 endpoints' worth for 10, 4 addresses' for one):
    /// the endpoints are most of a large state, so the conversions of
    /// large states (an API server's or a file's objects, the agent's
    /// decoding) call this.
    pub fn shrink_to_fit(&mut self) {
        self.endpoints.shrink_to_fit();
        for e in &mut self.endpoints {
            e.addresses.shrink_to_fit();
        }
        self.ports.shrink_to_fit();
    }

    /// The port endpoints of this slice use for the Service port `name`/`protocol`.
    pub fn port_for(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }

    /// Checks addresses against the family, names and ports.
    pub fn validate(&self, service: &ServiceKey) -> Result<(), ValidationErrors> {
        let mut errs = Collector::new(self.object_name(service));
        if !is_dns_subdomain(&self.name) {
            errs.push(
                "metadata.name",
                format!("{:?} is not a DNS name", self.name),
            );
        }
        if let Some(c) = &self.cluster
            && !is_dns_label(c)
        {
            errs.push("cluster", format!("{c:?} is not a cluster id"));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            // Field paths are made only for an error: most slices have none.
            if e.addresses.is_empty() {
                errs.push(
                    format!("endpoints[{i}].addresses"),
                    "at least one address is required",
                );
            }
            for (j, a) in e.addresses.iter().enumerate() {
                let family_ok = match self.address_type {
                    AddressType::IPv4 => a.is_ipv4(),
                    AddressType::IPv6 => a.is_ipv6(),
                };
                if !family_ok {
                    errs.push(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a} does not match addressType {:?}", self.address_type),
                    );
                }
                if a.is_unspecified() || a.is_multicast() {
                    errs.push(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a} is not usable"),
                    );
                }
            }
            if let Some(h) = &e.hostname
                && !is_dns_label(h)
            {
                errs.push(
                    format!("endpoints[{i}].hostname"),
                    format!("{h:?} is not a DNS label"),
                );
            }
        }
        for (i, p) in self.ports.iter().enumerate() {
            if p.port == 0 {
                errs.push(format!("ports[{i}].port"), "must be between 1 and 65535");
            }
            if self.ports[..i]
                .iter()
                .any(|q| q.name == p.name && q.protocol == p.protocol)
            {
                errs.push(
                    format!("ports[{i}].name"),
                    format!("{:?}/{} appears twice", p.name, p.protocol),
                );
            }
        }
        errs.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice() -> EndpointSlice {
        EndpointSlice {
            name: "web-abc12".into(),
            address_type: AddressType::IPv4,
            endpoints: vec![Endpoint {
                addresses: vec!["10.244.1.5".parse().expect("ip")],
                hostname: Some("web-0".into()),
                node_name: Some("node-a".into()),
                ..Endpoint::default()
            }],
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            cluster: None,
            trigger_time_unix_nanos: None,
        }
    }

    #[test]
    fn valid_slice() {
        let key = ServiceKey::new("default", "shop", "web");
        slice().validate(&key).expect("valid");
        assert_eq!(slice().port_for("http", Protocol::Tcp), Some(8080));
        assert_eq!(slice().port_for("http", Protocol::Udp), None);
    }

    #[test]
    fn family_mismatch_names_the_address() {
        let key = ServiceKey::new("default", "shop", "web");
        let mut s = slice();
        s.endpoints[0]
            .addresses
            .push("fd00::1".parse().expect("ip"));
        let e = s.validate(&key).expect_err("mixed family");
        assert_eq!(e.first().object, "EndpointSlice shop/web-abc12");
        assert_eq!(e.first().field, "endpoints[0].addresses[1]");
    }
}
