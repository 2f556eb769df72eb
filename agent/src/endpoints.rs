//! What a node does with one Service port, whatever the data plane: where
//! its traffic arrives (frontends), which endpoints serve it under each
//! traffic policy, and the topology that narrowed them. The iptables data
//! plane turns a [`PortPlan`] into rule text, the nftables data plane into
//! set and map elements.
//!
//! ```text
//!  ServiceState + NodeView ─▶ plan(family) ─▶ [PortPlan] one per port with an address of the family
//!      frontends: cluster IP, external IPs, LB IPs (ipMode Proxy already dropped), node port
//!      cluster endpoints (topology applied) │ local endpoints │ has_endpoints
//!      firewall (loadBalancerSourceRanges, whether the LB IPs may be sources)
//!      serving endpoints (what stale-flow clean-up keeps, whatever policy selects)
//! ```
//!
//! The rules are kube-proxy's (`pkg/proxy/topology.go` `CategorizeEndpoints`,
//! `pkg/proxy/serviceport.go`):
//! - Usable endpoints are the ready ones; with none ready, the
//!   serving+terminating ones (separately for Cluster and Local policy).
//! - Topology comes from hints only: when every ready endpoint has a node
//!   hint and one names this node, the ones hinted for this node; else when
//!   every ready endpoint has a zone hint and one names this zone, the ones
//!   hinted for this zone; else all. One endpoint without hints turns
//!   hints off for the port.
//! - Cluster endpoints are used when internalTrafficPolicy is Cluster or
//!   the port is reachable from outside at all (even with
//!   externalTrafficPolicy Local, pods and the node itself short-circuit
//!   to them); Local endpoints when either policy that applies is Local.
//!
//! Hints are what Kubernetes' EndpointSlice controller writes for
//! `trafficDistribution` (PreferClose/PreferSameZone: the endpoint's zone;
//! PreferSameNode: its node too). Sources without that controller (YAML
//! files, Docker) carry none, so when no endpoint of a Service has a hint
//! and the Service asks for a distribution, the hints are derived here the
//! way that controller derives them; a Service whose slices carry hints is
//! taken as it is.
//!
//! - Imports (`clusterset/…`) add cluster locality: the ready endpoints of
//!   the node's own cluster, and further tiers of clusters while there are
//!   fewer than the import's `Locality` threshold (`by_locality`); both data
//!   planes program that plan.
//! - Services labelled `service.kubernetes.io/service-proxy-name` or
//!   `service.kubernetes.io/headless` (`Service.not_proxied_by`, set by the
//!   control plane's conversion) have no plan; LB ingress IPs with `ipMode:
//!   Proxy` never reach the model.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use switchyard_model::{
    AddressType, Endpoint, Locality, Protocol, ServicePort, ServiceState, ServiceType,
    TrafficPolicy,
};

/// What of this node shapes the plan.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    /// The node's name (endpoints' `nodeName`, `forNodes` hints).
    pub name: &'a str,
    /// The node's zone (`forZones` hints).
    pub zone: Option<&'a str>,
    /// The node's own addresses (loadBalancerSourceRanges that admit the
    /// node admit the LB IPs as sources too).
    pub addresses: &'a [IpAddr],
    /// The node's cluster (an import's locality prefers its endpoints).
    pub cluster: Option<&'a str>,
}

/// One endpoint of a port, resolved to the port it listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    /// Its address (the first of the endpoint's addresses, as kube-proxy uses).
    pub ip: IpAddr,
    /// The port the Service port resolves to on it.
    pub port: u16,
    /// Ready for new connections.
    pub ready: bool,
    /// Serving (ready or not).
    pub serving: bool,
    /// Shutting down.
    pub terminating: bool,
    /// On this node.
    pub local: bool,
}

impl Backend {
    /// Its address and port.
    pub fn socket(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// Which topology narrowed the cluster endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// None: every usable endpoint.
    Any,
    /// The endpoints hinted for this node.
    SameNode,
    /// The endpoints hinted for this node's zone.
    SameZone,
}

/// `loadBalancerSourceRanges` of a port with LB IPs in this family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firewall {
    /// The ranges of this family (none: nothing is admitted, since the
    /// Service restricts sources and none of its ranges is of this family).
    pub source_ranges: Vec<IpNet>,
    /// Whether traffic whose source is an LB IP itself is admitted: only
    /// when a range contains one of this node's addresses (kube-proxy's
    /// `allowFromNode`: a VIP routed locally makes the node's own requests
    /// come from the VIP). Otherwise a packet spoofing the LB IP would pass.
    pub allow_from_load_balancer: bool,
}

/// One Service port in one family on this node.
#[derive(Debug, Clone)]
pub struct PortPlan<'a> {
    /// The port.
    pub port: &'a ServicePort,
    /// The cluster IP of the family.
    pub cluster_ip: IpAddr,
    /// `spec.externalIPs` of the family.
    pub external_ips: Vec<IpAddr>,
    /// Load-balancer ingress IPs of the family (LoadBalancer Services only).
    pub load_balancer_ips: Vec<IpAddr>,
    /// The node port (NodePort and LoadBalancer Services only).
    pub node_port: Option<u16>,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local` on a Service reachable from outside.
    pub external_local: bool,
    /// Endpoints for Cluster policy, topology applied (empty when unused).
    pub cluster_endpoints: Vec<Backend>,
    /// Endpoints on this node for Local policy (empty when unused).
    pub local_endpoints: Vec<Backend>,
    /// Whether any endpoint anywhere can take the port's traffic.
    pub has_endpoints: bool,
    /// What narrowed `cluster_endpoints`.
    pub topology: Topology,
    /// Source restriction of the LB IPs, when the Service has one.
    pub firewall: Option<Firewall>,
    /// Every serving endpoint, whatever policy or topology select: flows to
    /// these stay when rules change (a terminating or unhinted endpoint
    /// keeps its connections, UDP as TCP).
    pub serving: BTreeSet<SocketAddr>,
}

impl PortPlan<'_> {
    /// Reachable other than on the cluster IP (kube-proxy's `ExternallyAccessible`).
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.load_balancer_ips.is_empty()
            || !self.external_ips.is_empty()
    }

    /// Whether traffic ever goes to the Cluster-policy endpoints.
    pub fn uses_cluster_endpoints(&self) -> bool {
        !self.internal_local || self.externally_accessible()
    }

    /// Whether traffic ever goes to the Local-policy endpoints.
    pub fn uses_local_endpoints(&self) -> bool {
        self.internal_local || (self.external_local && self.externally_accessible())
    }

    /// Whether cluster-IP traffic has somewhere to go.
    pub fn has_internal_endpoints(&self) -> bool {
        self.has_endpoints && (!self.internal_local || !self.local_endpoints.is_empty())
    }

    /// Whether traffic from outside the cluster (node port, external and LB
    /// IPs) has somewhere to go. Pods and the node itself still reach the
    /// Cluster endpoints when this is false but `has_endpoints` holds.
    pub fn has_external_endpoints(&self) -> bool {
        self.has_endpoints && (!self.external_local || !self.local_endpoints.is_empty())
    }

    /// Every endpoint some policy sends traffic to, each once.
    pub fn reachable(&self) -> Vec<Backend> {
        let mut out: Vec<Backend> = Vec::new();
        for b in self.cluster_endpoints.iter().chain(&self.local_endpoints) {
            if !out.iter().any(|o| o.socket() == b.socket()) {
                out.push(*b);
            }
        }
        out
    }

    /// Where UDP flows of this port arrive (for stale-flow clean-up).
    pub fn frontends(&self) -> Vec<Frontend> {
        let port = self.port.port;
        let mut out = vec![Frontend::Ip(SocketAddr::new(self.cluster_ip, port))];
        for ip in self.external_ips.iter().chain(&self.load_balancer_ips) {
            out.push(Frontend::Ip(SocketAddr::new(*ip, port)));
        }
        out.extend(self.node_port.map(Frontend::NodePort));
        out
    }

    /// For stale-flow clean-up: each UDP frontend of this port with the
    /// endpoints serving it; nothing for other protocols. A port whose last
    /// endpoint went keeps its frontends with an empty set, so every flow
    /// to them is cleared: the filter rules refuse only new flows, and an
    /// established one would go on reaching the deleted endpoint
    /// (kubernetes#139628, fixed upstream by PR #139629).
    pub fn udp_flows(&self) -> impl Iterator<Item = (Frontend, BTreeSet<SocketAddr>)> + '_ {
        let udp = self.port.protocol == Protocol::Udp;
        udp.then(|| self.frontends())
            .into_iter()
            .flatten()
            .map(|f| (f, self.serving.clone()))
    }
}

/// Where a flow to a Service arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Frontend {
    /// A cluster, external or load-balancer IP and the Service port.
    Ip(SocketAddr),
    /// A node port, on any address of the node.
    NodePort(u16),
}

/// The plan of every port of `state` in `family`: nothing when the Service
/// is not proxied (headless, ExternalName, or labelled for another proxy)
/// or has no cluster IP of the family.
pub fn plan<'a>(
    state: &'a ServiceState,
    family: AddressType,
    node: &NodeView<'_>,
) -> Vec<PortPlan<'a>> {
    let svc = &state.service;
    if !svc.is_proxied() {
        return Vec::new();
    }
    let in_family = |ip: &IpAddr| ip.is_ipv4() == (family == AddressType::IPv4);
    let Some(cluster_ip) = svc.cluster_ips.iter().copied().find(in_family) else {
        return Vec::new();
    };
    let external_ips: Vec<IpAddr> = svc.external_ips.iter().copied().filter(in_family).collect();
    let load_balancer_ips: Vec<IpAddr> = if svc.service_type == ServiceType::LoadBalancer {
        svc.load_balancer_ips
            .iter()
            .copied()
            .filter(in_family)
            .collect()
    } else {
        Vec::new()
    };
    // kube-proxy's ExternalPolicyLocal: only for a Service reachable from outside.
    let reachable_from_outside = matches!(
        svc.service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    ) || !svc.external_ips.is_empty();
    let external_local =
        svc.external_traffic_policy == TrafficPolicy::Local && reachable_from_outside;
    let firewall = (!svc.load_balancer_source_ranges.is_empty() && !load_balancer_ips.is_empty())
        .then(|| {
            let source_ranges: Vec<IpNet> = svc
                .load_balancer_source_ranges
                .iter()
                .copied()
                .filter(|n| matches!(n, IpNet::V4(_)) == (family == AddressType::IPv4))
                .collect();
            let allow_from_load_balancer = source_ranges
                .iter()
                .any(|r| node.addresses.iter().any(|a| r.contains(a)));
            Firewall {
                source_ranges,
                allow_from_load_balancer,
            }
        });
    let derive = derives_hints(state);
    // Only an import has endpoints of several clusters to choose from.
    let locality = svc
        .locality
        .as_ref()
        .filter(|_| svc.key.cluster == switchyard_model::CLUSTERSET);
    svc.ports
        .iter()
        .map(|port| {
            let node_port = port.node_port.filter(|_| {
                matches!(
                    svc.service_type,
                    ServiceType::NodePort | ServiceType::LoadBalancer
                )
            });
            let mut p = PortPlan {
                port,
                cluster_ip,
                external_ips: external_ips.clone(),
                load_balancer_ips: load_balancer_ips.clone(),
                node_port,
                internal_local: svc.internal_traffic_policy == TrafficPolicy::Local,
                external_local,
                cluster_endpoints: Vec::new(),
                local_endpoints: Vec::new(),
                has_endpoints: false,
                topology: Topology::Any,
                firewall: firewall.clone(),
                serving: BTreeSet::new(),
            };
            let all = backends(state, port, family, node, derive);
            p.serving = all
                .iter()
                .filter(|(b, _)| b.serving)
                .map(|(b, _)| b.socket())
                .collect();
            categorize(&mut p, &all, node, locality);
            p
        })
        .collect()
}

/// The hints an endpoint carries, or derives from `trafficDistribution`.
#[derive(Debug, Clone, Default)]
struct Hints<'a> {
    zones: Vec<&'a str>,
    nodes: Vec<&'a str>,
    /// The cluster of the endpoint's slice (imports).
    cluster: Option<&'a str>,
}

/// Whether this Service's hints are derived here: it asks for a
/// distribution and no endpoint carries a hint (nobody ran the
/// EndpointSlice controller); `Some(true)` also derives node hints.
fn derives_hints(state: &ServiceState) -> Option<bool> {
    let same_node = match state.service.traffic_distribution.as_deref() {
        Some("PreferClose" | "PreferSameZone") => false,
        Some("PreferSameNode") => true,
        _ => return None,
    };
    let hinted = state
        .slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .any(|e| !e.hint_zones().is_empty() || !e.hint_nodes().is_empty());
    (!hinted).then_some(same_node)
}

fn hints_of(ep: &Endpoint, derive: Option<bool>) -> Hints<'_> {
    match derive {
        None => Hints {
            zones: ep.hint_zones().iter().map(AsRef::as_ref).collect(),
            nodes: ep.hint_nodes().iter().map(AsRef::as_ref).collect(),
            cluster: None,
        },
        // The controller hints ready endpoints only.
        Some(_) if !ep.conditions.ready => Hints::default(),
        Some(same_node) => Hints {
            zones: ep.zone.as_deref().into_iter().collect(),
            nodes: ep
                .node_name
                .as_deref()
                .filter(|_| same_node)
                .into_iter()
                .collect(),
            cluster: None,
        },
    }
}

fn backends<'a>(
    state: &'a ServiceState,
    sp: &ServicePort,
    family: AddressType,
    node: &NodeView<'_>,
    derive: Option<bool>,
) -> Vec<(Backend, Hints<'a>)> {
    let mut out: Vec<(Backend, Hints<'a>)> = Vec::new();
    for slice in state.slices.iter().filter(|s| s.address_type == family) {
        let Some(port) = slice.port_for(&sp.name, sp.protocol) else {
            continue;
        };
        for ep in &slice.endpoints {
            let Some(ip) = ep.addresses.first().copied() else {
                continue;
            };
            if out.iter().any(|(b, _)| b.ip == ip && b.port == port) {
                continue;
            }
            let c = ep.conditions;
            let mut hints = hints_of(ep, derive);
            hints.cluster = slice.cluster.as_deref();
            out.push((
                Backend {
                    ip,
                    port,
                    ready: c.ready,
                    serving: c.serving,
                    terminating: c.terminating,
                    // Node names are unique only within a cluster: an
                    // import's endpoint is local only in its own cluster.
                    local: ep.node_name.as_deref() == Some(node.name)
                        && (slice.cluster.is_none() || slice.cluster.as_deref() == node.cluster),
                },
                hints,
            ));
        }
    }
    out
}

/// kube-proxy's `topologyModeFromHints`, over the ready endpoints.
fn topology(all: &[(Backend, Hints<'_>)], node: &NodeView<'_>) -> Topology {
    let ready: Vec<&Hints<'_>> = all
        .iter()
        .filter(|(b, _)| b.ready)
        .map(|(_, h)| h)
        .collect();
    if ready.is_empty() {
        return Topology::Any;
    }
    if ready.iter().all(|h| !h.nodes.is_empty())
        && ready.iter().any(|h| h.nodes.contains(&node.name))
    {
        return Topology::SameNode;
    }
    if let Some(zone) = node.zone
        && ready.iter().all(|h| !h.zones.is_empty())
        && ready.iter().any(|h| h.zones.contains(&zone))
    {
        return Topology::SameZone;
    }
    Topology::Any
}

fn available(h: &Hints<'_>, topology: Topology, node: &NodeView<'_>) -> bool {
    match topology {
        Topology::Any => true,
        Topology::SameNode => h.nodes.contains(&node.name),
        Topology::SameZone => node.zone.is_some_and(|z| h.zones.contains(&z)),
    }
}

/// kube-proxy's `CategorizeEndpoints`, and an import's cluster locality.
fn categorize(
    p: &mut PortPlan<'_>,
    all: &[(Backend, Hints<'_>)],
    node: &NodeView<'_>,
    locality: Option<&Locality>,
) {
    if all.is_empty() {
        return;
    }
    if p.uses_cluster_endpoints() {
        p.topology = topology(all, node);
        let ready: Vec<&(Backend, Hints<'_>)> = all
            .iter()
            .filter(|(b, h)| b.ready && available(h, p.topology, node))
            .collect();
        let ready = match (locality, node.cluster) {
            (Some(l), Some(own)) => by_locality(ready, l, own),
            _ => ready,
        };
        p.cluster_endpoints = ready.into_iter().map(|(b, _)| *b).collect();
        if p.cluster_endpoints.is_empty() {
            // No ready endpoint anywhere (topology never empties the list).
            p.cluster_endpoints = all
                .iter()
                .filter(|(b, _)| b.serving_terminating())
                .map(|(b, _)| *b)
                .collect();
        }
        p.has_endpoints = !p.cluster_endpoints.is_empty();
    }
    if !p.uses_local_endpoints() {
        return;
    }
    if all.iter().any(|(b, _)| b.ready || b.serving_terminating()) {
        p.has_endpoints = true;
    }
    let local_ready: Vec<Backend> = all
        .iter()
        .filter(|(b, _)| b.local && b.ready)
        .map(|(b, _)| *b)
        .collect();
    p.local_endpoints = if local_ready.is_empty() {
        all.iter()
            .filter(|(b, _)| b.local && b.serving_terminating())
            .map(|(b, _)| *b)
            .collect()
    } else {
        local_ready
    };
}

/// The ready endpoints an import's client in cluster `own` uses: its own
/// cluster's, and further tiers (each preferred cluster in order, then
/// every other cluster together) while there are fewer than
/// `min_local_endpoints`; a tier joins whole, and the ones before it stay.
fn by_locality<'x, 'h>(
    ready: Vec<&'x (Backend, Hints<'h>)>,
    locality: &Locality,
    own: &str,
) -> Vec<&'x (Backend, Hints<'h>)> {
    let rest = locality.preference.len() + 1;
    let tier = |h: &Hints<'_>| match h.cluster {
        Some(c) if c == own => 0,
        Some(c) => locality
            .preference
            .iter()
            .position(|p| p == c)
            .map_or(rest, |i| i + 1),
        None => rest,
    };
    let want = usize::try_from(locality.min_local_endpoints).unwrap_or(usize::MAX);
    let mut out = Vec::new();
    for t in 0..=rest {
        if !out.is_empty() && out.len() >= want {
            break;
        }
        out.extend(ready.iter().copied().filter(|(_, h)| tier(h) == t));
    }
    out
}

/// Ready endpoints of `state` on `node`, by distinct address: what its
/// `healthCheckNodePort` reports. Serving+terminating endpoints still get
/// traffic from the rules but do not count, so a load balancer moves new
/// connections elsewhere (kube-proxy's `LocalReadyEndpoints`).
pub fn local_ready_endpoints(state: &ServiceState, node: &str) -> usize {
    state
        .slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| e.node_name.as_deref() == Some(node) && e.conditions.ready)
        .filter_map(|e| e.addresses.first())
        .collect::<BTreeSet<_>>()
        .len()
}

/// For stale-flow clean-up: every UDP frontend of `state` in `family` with
/// the endpoints serving it ([`PortPlan::udp_flows`]).
pub fn udp_frontends(
    state: &ServiceState,
    family: AddressType,
    node: &NodeView<'_>,
) -> Vec<(Frontend, BTreeSet<SocketAddr>)> {
    plan(state, family, node)
        .iter()
        .flat_map(PortPlan::udp_flows)
        .collect()
}

#[cfg(test)]
mod tests;
