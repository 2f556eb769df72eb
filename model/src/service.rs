//! Services: the stable front of a set of endpoints.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::endpoints::EndpointSlice;
use crate::error::{Collector, ValidationErrors};
use crate::{DEFAULT_AFFINITY_TIMEOUT_SECONDS, MAX_AFFINITY_TIMEOUT_SECONDS};

/// Names one Service across a fleet: `cluster/namespace/name`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// The cluster the Service belongs to.
    pub cluster: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ServiceKey {
    /// Builds a key from its three parts.
    pub fn new(
        cluster: impl Into<String>,
        namespace: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        Self {
            cluster: cluster.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.cluster, self.namespace, self.name)
    }
}

impl FromStr for ServiceKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.splitn(3, '/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(c), Some(ns), Some(n)) if !c.is_empty() && !ns.is_empty() && !n.is_empty() => {
                Ok(Self::new(c, ns, n))
            }
            _ => Err(format!("{s:?} is not of the form cluster/namespace/name")),
        }
    }
}

/// `spec.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServiceType {
    /// Reachable on its cluster IPs only.
    #[default]
    ClusterIp,
    /// Also on a port of every node.
    NodePort,
    /// Also on load-balancer ingress IPs.
    LoadBalancer,
    /// A DNS alias (CNAME) with no proxying.
    ExternalName,
}

/// A port's transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Protocol {
    /// TCP, the Kubernetes default.
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// The lowercase name iptables and DNS SRV records use.
    pub fn as_lowercase(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// `spec.externalTrafficPolicy` and `spec.internalTrafficPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    /// Any endpoint in the cluster.
    #[default]
    Cluster,
    /// Only endpoints on the receiving node.
    Local,
}

/// `spec.ports[].targetPort`: a number, or the name of a container port that
/// each endpoint resolves on its own (carried by the endpoint slices).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A named container port.
    Name(String),
}

/// One entry of `spec.ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name; required when the Service has more than one port.
    pub name: String,
    /// Transport protocol.
    pub protocol: Protocol,
    /// The port on the cluster IPs.
    pub port: u16,
    /// Where traffic goes on the endpoints.
    pub target_port: TargetPort,
    /// The node port, for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
}

/// Which IP families a Service's cluster IPs use (derived, for convenience).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpFamilies {
    /// Has an IPv4 cluster IP.
    pub v4: bool,
    /// Has an IPv6 cluster IP.
    pub v6: bool,
}

/// An IP family (`spec.ipFamilies[]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IpFamily {
    /// `IPv4`.
    V4,
    /// `IPv6`.
    V6,
}

impl IpFamily {
    /// Both families, IPv4 first.
    pub const ALL: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

    /// The family of `ip`.
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() {
            IpFamily::V4
        } else {
            IpFamily::V6
        }
    }

    /// The other family.
    pub fn other(self) -> Self {
        match self {
            IpFamily::V4 => IpFamily::V6,
            IpFamily::V6 => IpFamily::V4,
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamily::V4 => "IPv4",
            IpFamily::V6 => "IPv6",
        })
    }
}

impl FromStr for IpFamily {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "IPv4" => Ok(IpFamily::V4),
            "IPv6" => Ok(IpFamily::V6),
            _ => Err(format!("{s:?} is not IPv4 or IPv6")),
        }
    }
}

/// `spec.ipFamilyPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpFamilyPolicy {
    /// One family (the default).
    SingleStack,
    /// Both families where both are configured, else one.
    PreferDualStack,
    /// Both families, or the Service is refused.
    RequireDualStack,
}

impl fmt::Display for IpFamilyPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IpFamilyPolicy::SingleStack => "SingleStack",
            IpFamilyPolicy::PreferDualStack => "PreferDualStack",
            IpFamilyPolicy::RequireDualStack => "RequireDualStack",
        })
    }
}

impl FromStr for IpFamilyPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "SingleStack" => Ok(IpFamilyPolicy::SingleStack),
            "PreferDualStack" => Ok(IpFamilyPolicy::PreferDualStack),
            "RequireDualStack" => Ok(IpFamilyPolicy::RequireDualStack),
            _ => Err(format!(
                "{s:?} is not SingleStack, PreferDualStack or RequireDualStack"
            )),
        }
    }
}

/// A Service as the proxy and the DNS stub need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Which Service this is.
    pub key: ServiceKey,
    /// `spec.type`.
    pub service_type: ServiceType,
    /// `spec.clusterIP: None`.
    pub headless: bool,
    /// `spec.clusterIPs`, primary family first (empty when headless or ExternalName).
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.ports`.
    pub ports: Vec<ServicePort>,
    /// `Some(timeout seconds)` for `sessionAffinity: ClientIP`.
    pub session_affinity_timeout: Option<u32>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip`.
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.loadBalancerSourceRanges`.
    pub load_balancer_source_ranges: Vec<IpNet>,
    /// `spec.externalTrafficPolicy`.
    pub external_traffic_policy: TrafficPolicy,
    /// `spec.internalTrafficPolicy`.
    pub internal_traffic_policy: TrafficPolicy,
    /// `spec.healthCheckNodePort`.
    pub health_check_node_port: Option<u16>,
    /// `spec.publishNotReadyAddresses`.
    pub publish_not_ready_addresses: bool,
    /// `spec.externalName`, for ExternalName Services.
    pub external_name: Option<String>,
    /// `spec.trafficDistribution` (`PreferClose`, `PreferSameZone`, `PreferSameNode`).
    pub traffic_distribution: Option<String>,
    /// The label that tells node proxies to leave this Service alone, when
    /// it carries one ([`NOT_PROXIED_LABELS`]): kube-proxy watches Services
    /// with a selector that excludes them, so another proxy owns their
    /// traffic. DNS still answers them, as CoreDNS does.
    pub not_proxied_by: Option<String>,
    /// Set when the Service is exported to the clusterset (it has a
    /// ServiceExport): carried so that fleet relays learn what is exported.
    pub export: Option<ServiceExport>,
    /// `spec.ipFamilies` as the source gave it, primary first: the families
    /// a Service without cluster IPs gets addresses of. Only the control
    /// plane reads it (it allocates them into `cluster_ips`); it is not
    /// sent to agents.
    pub requested_ip_families: Vec<IpFamily>,
    /// `spec.ipFamilyPolicy` as the source gave it (the same: control plane only).
    pub ip_family_policy: Option<IpFamilyPolicy>,
    /// How an import prefers the endpoints of the client's own cluster:
    /// given on an exported Service by its annotations
    /// ([`MIN_LOCAL_ENDPOINTS_ANNOTATION`], [`CLUSTER_PREFERENCE_ANNOTATION`]),
    /// always set on an import (the oldest export's, else the default).
    pub locality: Option<Locality>,
}

/// Annotation of an exported Service: how many ready endpoints of a
/// client's own cluster an import needs before it stops using other
/// clusters' (default 1).
pub const MIN_LOCAL_ENDPOINTS_ANNOTATION: &str = "switchyard.io/min-local-endpoints";
/// Annotation of an exported Service: the clusters an import spills to
/// first, in order, comma-separated (the others after them, together).
pub const CLUSTER_PREFERENCE_ANNOTATION: &str = "switchyard.io/cluster-preference";

/// An import's cluster locality. A client reaches the ready endpoints of
/// its own cluster; while fewer than `min_local_endpoints` are ready there,
/// the endpoints of further clusters join them (graded: the local ones
/// stay in the set), one tier at a time until there are enough: each
/// cluster of `preference` in order, then every other cluster together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locality {
    /// Ready endpoints of the client's own cluster that suffice (0: its
    /// own cluster alone whenever it has any).
    pub min_local_endpoints: u32,
    /// Clusters to spill to first, in order.
    pub preference: Vec<String>,
}

impl Default for Locality {
    fn default() -> Self {
        Self {
            min_local_endpoints: 1,
            preference: Vec::new(),
        }
    }
}

/// A Service's export to the clusterset (KEP-1645's ServiceExport).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceExport {
    /// The ServiceExport's creationTimestamp (Unix seconds), when known.
    pub created_unix: Option<i64>,
}

/// Labels whose presence (any value) keeps kube-proxy away from a Service:
/// another proxy implementation serves it (`service-proxy-name`), or its
/// endpoints are headless (`headless`).
pub const NOT_PROXIED_LABELS: [&str; 2] = [
    "service.kubernetes.io/service-proxy-name",
    "service.kubernetes.io/headless",
];

/// Values of `spec.trafficDistribution` that Kubernetes accepts.
pub const TRAFFIC_DISTRIBUTIONS: [&str; 3] = ["PreferClose", "PreferSameZone", "PreferSameNode"];

impl Service {
    /// A ClusterIP Service with no ports; fill in the rest with struct update syntax.
    pub fn new(key: ServiceKey) -> Self {
        Self {
            key,
            service_type: ServiceType::ClusterIp,
            headless: false,
            cluster_ips: Vec::new(),
            ports: Vec::new(),
            session_affinity_timeout: None,
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            load_balancer_source_ranges: Vec::new(),
            external_traffic_policy: TrafficPolicy::Cluster,
            internal_traffic_policy: TrafficPolicy::Cluster,
            health_check_node_port: None,
            publish_not_ready_addresses: false,
            external_name: None,
            traffic_distribution: None,
            not_proxied_by: None,
            export: None,
            locality: None,
            requested_ip_families: Vec::new(),
            ip_family_policy: None,
        }
    }

    /// Gives back the room its vectors grew beyond what they hold (see
    /// [`EndpointSlice::shrink_to_fit`](crate::EndpointSlice::shrink_to_fit)).
    pub fn shrink_to_fit(&mut self) {
        self.cluster_ips.shrink_to_fit();
        self.ports.shrink_to_fit();
        self.external_ips.shrink_to_fit();
        self.load_balancer_ips.shrink_to_fit();
        self.load_balancer_source_ranges.shrink_to_fit();
        self.requested_ip_families.shrink_to_fit();
    }

    /// How errors name this object: `Service namespace/name` (with the cluster
    /// when it is not the default one).
    pub fn object_name(&self) -> String {
        object_name("Service", &self.key)
    }

    /// Whether the Service needs a cluster IP (not headless, not ExternalName).
    pub fn wants_cluster_ip(&self) -> bool {
        !self.headless && self.service_type != ServiceType::ExternalName
    }

    /// Whether a node proxy programs this Service: it has a cluster IP and
    /// no label hands it to another proxy.
    pub fn is_proxied(&self) -> bool {
        self.wants_cluster_ip() && self.not_proxied_by.is_none()
    }

    /// The IP families of the cluster IPs.
    pub fn ip_families(&self) -> IpFamilies {
        IpFamilies {
            v4: self.cluster_ips.iter().any(IpAddr::is_ipv4),
            v6: self.cluster_ips.iter().any(IpAddr::is_ipv6),
        }
    }

    /// Checks everything a proxy relies on; all problems are reported at once.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut errs = Collector::new(self.object_name());
        validate_key(&self.key, &mut errs);
        match self.service_type {
            ServiceType::ExternalName => match &self.external_name {
                Some(n) if is_dns_subdomain(n.trim_end_matches('.')) => {}
                Some(n) => errs.push("spec.externalName", format!("{n:?} is not a DNS name")),
                None => errs.push("spec.externalName", "required for type ExternalName"),
            },
            _ if self.headless => {
                if !self.cluster_ips.is_empty() {
                    errs.push("spec.clusterIPs", "must be empty for a headless Service");
                }
            }
            _ => {
                if self.cluster_ips.is_empty() {
                    errs.push("spec.clusterIP", "required (none was set or allocated)");
                }
                if self.cluster_ips.len() > 2 {
                    errs.push("spec.clusterIPs", "at most two addresses (one per family)");
                }
                if self.cluster_ips.len() == 2
                    && self.cluster_ips[0].is_ipv4() == self.cluster_ips[1].is_ipv4()
                {
                    errs.push(
                        "spec.clusterIPs",
                        "two addresses must be of different families",
                    );
                }
                for (i, ip) in self.cluster_ips.iter().enumerate() {
                    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                        errs.push(
                            format!("spec.clusterIPs[{i}]"),
                            format!("{ip} is not usable"),
                        );
                    }
                }
            }
        }
        if self.ports.is_empty() && !self.headless && self.service_type != ServiceType::ExternalName
        {
            errs.push("spec.ports", "at least one port is required");
        }
        let wants_node_ports = matches!(
            self.service_type,
            ServiceType::NodePort | ServiceType::LoadBalancer
        );
        for (i, p) in self.ports.iter().enumerate() {
            let at = format!("spec.ports[{i}]");
            if p.port == 0 {
                errs.push(format!("{at}.port"), "must be between 1 and 65535");
            }
            if self.ports.len() > 1 && p.name.is_empty() {
                errs.push(
                    format!("{at}.name"),
                    "required when there is more than one port",
                );
            }
            if !p.name.is_empty() && !is_dns_label(&p.name) {
                errs.push(
                    format!("{at}.name"),
                    format!("{:?} is not a DNS label", p.name),
                );
            }
            for (j, q) in self.ports[..i].iter().enumerate() {
                if !p.name.is_empty() && p.name == q.name {
                    errs.push(
                        format!("{at}.name"),
                        format!("duplicates spec.ports[{j}].name"),
                    );
                }
                if p.port == q.port && p.protocol == q.protocol {
                    errs.push(format!("{at}.port"), format!("duplicates spec.ports[{j}]"));
                }
            }
            match &p.target_port {
                TargetPort::Number(0) => {
                    errs.push(format!("{at}.targetPort"), "must be between 1 and 65535")
                }
                TargetPort::Number(_) => {}
                TargetPort::Name(n) if is_port_name(n) => {}
                TargetPort::Name(n) => errs.push(
                    format!("{at}.targetPort"),
                    format!("{n:?} is not a valid port name"),
                ),
            }
            match p.node_port {
                Some(0) => errs.push(format!("{at}.nodePort"), "must be between 1 and 65535"),
                Some(_) if !wants_node_ports => errs.push(
                    format!("{at}.nodePort"),
                    "only NodePort and LoadBalancer Services have node ports",
                ),
                _ => {}
            }
        }
        if let Some(t) = self.session_affinity_timeout
            && !(1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&t)
        {
            errs.push(
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                format!("{t} is not between 1 and {MAX_AFFINITY_TIMEOUT_SECONDS}"),
            );
        }
        if let Some(hc) = self.health_check_node_port {
            if hc == 0 {
                errs.push("spec.healthCheckNodePort", "must be between 1 and 65535");
            }
            if self.service_type != ServiceType::LoadBalancer
                || self.external_traffic_policy != TrafficPolicy::Local
            {
                errs.push(
                    "spec.healthCheckNodePort",
                    "only a LoadBalancer Service with externalTrafficPolicy Local has one",
                );
            }
        }
        if let Some(td) = &self.traffic_distribution
            && !TRAFFIC_DISTRIBUTIONS.contains(&td.as_str())
        {
            errs.push(
                "spec.trafficDistribution",
                format!("{td:?} is not one of {}", TRAFFIC_DISTRIBUTIONS.join(", ")),
            );
        }
        if let Some(l) = &self.locality {
            for (i, c) in l.preference.iter().enumerate() {
                if !is_dns_label(c) {
                    errs.push(
                        format!("locality.preference[{i}]"),
                        format!("{c:?} is not a cluster id (a DNS label)"),
                    );
                }
            }
        }
        errs.finish()
    }
}

/// Session affinity as Kubernetes defaults it: ClientIP without a timeout means three hours.
pub fn affinity_timeout_or_default(timeout: Option<u32>) -> u32 {
    timeout.unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS)
}

/// One versioned resource of a snapshot: a Service with every endpoint slice
/// that belongs to it, slices ordered by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceState {
    /// The Service.
    pub service: Service,
    /// Its endpoint slices (IPv4 and IPv6; FQDN slices are never carried).
    pub slices: Vec<EndpointSlice>,
}

impl ServiceState {
    /// A Service with no endpoints yet.
    pub fn new(service: Service) -> Self {
        Self {
            service,
            slices: Vec::new(),
        }
    }

    /// Validates the Service and each slice.
    pub fn validate(&self) -> Result<(), ValidationErrors> {
        let mut all = Vec::new();
        if let Err(e) = self.service.validate() {
            all.extend(e.0);
        }
        for s in &self.slices {
            if let Err(e) = s.validate(&self.service.key) {
                all.extend(e.0);
            }
        }
        if all.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(all))
        }
    }

    /// Puts the slices in canonical (name) order so equal content compares and hashes equal.
    pub fn normalize(&mut self) {
        self.slices.sort_by(|a, b| a.name.cmp(&b.name));
    }

    /// Gives back the room every vector in it grew beyond what it holds
    /// (see [`EndpointSlice::shrink_to_fit`](crate::EndpointSlice::shrink_to_fit)).
    pub fn shrink_to_fit(&mut self) {
        self.service.shrink_to_fit();
        self.slices.shrink_to_fit();
        self.slices
            .iter_mut()
            .for_each(EndpointSlice::shrink_to_fit);
    }
}

pub(crate) fn object_name(kind: &str, key: &ServiceKey) -> String {
    if key.cluster == crate::DEFAULT_CLUSTER {
        format!("{kind} {}/{}", key.namespace, key.name)
    } else {
        format!("{kind} {}/{}/{}", key.cluster, key.namespace, key.name)
    }
}

fn validate_key(key: &ServiceKey, errs: &mut Collector) {
    if !is_dns_label(&key.namespace) {
        errs.push(
            "metadata.namespace",
            format!("{:?} is not a DNS label", key.namespace),
        );
    }
    if !is_dns_label(&key.name) {
        errs.push(
            "metadata.name",
            format!("{:?} is not a DNS label", key.name),
        );
    }
    if key.cluster.is_empty() || key.cluster.contains('/') {
        errs.push("cluster", format!("{:?} is not a cluster id", key.cluster));
    }
}

/// RFC 1123 label: 1-63 lowercase alphanumerics or '-', alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// IANA service name as Kubernetes uses for named ports: 1-15 characters,
/// lowercase alphanumerics or '-', at least one letter, no '--', no '-' at the ends.
pub fn is_port_name(s: &str) -> bool {
    is_dns_label(s)
        && s.len() <= 15
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> Service {
        Service {
            cluster_ips: vec!["10.96.0.10".parse().expect("ip")],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: TargetPort::Name("web".into()),
                node_port: None,
            }],
            ..Service::new(ServiceKey::new("default", "shop", "web"))
        }
    }

    #[test]
    fn valid_service_passes() {
        web().validate().expect("valid");
    }

    #[test]
    fn errors_name_object_and_field() {
        let mut s = web();
        s.ports.push(ServicePort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: TargetPort::Number(0),
            node_port: Some(30080),
        });
        s.session_affinity_timeout = Some(0);
        let errs = s.validate().expect_err("invalid").0;
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.ports[1].name",
                "spec.ports[1].port",
                "spec.ports[1].targetPort",
                "spec.ports[1].nodePort",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            ]
        );
        assert!(errs.iter().all(|e| e.object == "Service shop/web"));
        assert!(
            errs[0]
                .to_string()
                .starts_with("Service shop/web: spec.ports[1].name: ")
        );
    }

    #[test]
    fn cluster_ip_rules() {
        let mut s = web();
        s.cluster_ips.push("10.96.0.11".parse().expect("ip"));
        let e = s.validate().expect_err("same family twice");
        assert_eq!(e.first().field, "spec.clusterIPs");

        let mut s = web();
        s.cluster_ips.clear();
        assert_eq!(
            s.validate().expect_err("missing").first().field,
            "spec.clusterIP"
        );

        let mut s = web();
        s.cluster_ips.clear();
        s.headless = true;
        s.validate().expect("headless needs no IP");
    }

    #[test]
    fn external_name_rules() {
        let mut s = web();
        s.service_type = ServiceType::ExternalName;
        s.cluster_ips.clear();
        s.ports.clear();
        assert_eq!(
            s.validate().expect_err("no name").first().field,
            "spec.externalName"
        );
        s.external_name = Some("db.example.com.".into());
        s.validate().expect("valid ExternalName");
    }

    #[test]
    fn key_round_trips() {
        let k: ServiceKey = "c1/ns/web".parse().expect("parse");
        assert_eq!(k.to_string(), "c1/ns/web");
        assert!("c1/ns".parse::<ServiceKey>().is_err());
        assert!("c1//web".parse::<ServiceKey>().is_err());
    }

    #[test]
    fn port_names() {
        assert!(is_port_name("http"));
        assert!(is_port_name("h2c-web"));
        assert!(!is_port_name("8080"));
        assert!(!is_port_name("a--b"));
        assert!(!is_port_name("this-name-is-too-long"));
        assert!(!is_port_name("Web"));
    }
}
