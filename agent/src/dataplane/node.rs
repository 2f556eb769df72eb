//! What every data plane is told about the node: the address families it
//! programs and this node's settings ([`NodeConfig`], made from the agent's
//! flags by `crate::node_config`).

use std::net::IpAddr;

use ipnet::IpNet;
use switchyard_model::AddressType;

use crate::endpoints::NodeView;

/// An address family. Each is programmed apart: by `iptables` or
/// `ip6tables`, in an nftables `ip` or `ip6` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// Whether `ip` belongs to this family.
    pub fn has(self, ip: &IpAddr) -> bool {
        ip.is_ipv4() == (self == Family::V4)
    }

    /// Whether `net` belongs to this family.
    pub fn has_net(self, net: &IpNet) -> bool {
        matches!(net, IpNet::V4(_)) == (self == Family::V4)
    }

    pub(crate) fn host(self, ip: &IpAddr) -> String {
        match self {
            Family::V4 => format!("{ip}/32"),
            Family::V6 => format!("{ip}/128"),
        }
    }

    pub(crate) fn socket(self, ip: &IpAddr, port: u16) -> String {
        match self {
            Family::V4 => format!("{ip}:{port}"),
            Family::V6 => format!("[{ip}]:{port}"),
        }
    }

    /// The EndpointSlice address type of this family.
    pub fn address_type(self) -> AddressType {
        match self {
            Family::V4 => AddressType::IPv4,
            Family::V6 => AddressType::IPv6,
        }
    }
}

/// This node's settings that shape what every data plane programs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name (for traffic policy Local).
    pub node: String,
    /// This node's zone (for topology-aware routing).
    pub zone: Option<String>,
    /// Pod CIDRs: sources inside are "in the cluster".
    pub cluster_cidrs: Vec<IpNet>,
    /// Node addresses that accept NodePorts (empty: every local address).
    pub nodeport_addresses: Vec<IpNet>,
    /// The Service IP ranges (`--service-cidr`): traffic to an address in
    /// them that no Service holds is dropped, as kube-proxy's nftables mode
    /// does with the ServiceCIDRs.
    pub service_cidrs: Vec<IpNet>,
    /// The masquerade mark bit (`1 << --masquerade-bit`).
    pub masquerade_mark: u32,
    /// Whether IPv4 node ports answer on 127.0.0.1 too, as kube-proxy's
    /// `--iptables-localhost-nodeports` (when `nodeport_addresses` admits
    /// loopback).
    pub localhost_nodeports: bool,
    /// This node's own addresses, as seen at start (loadBalancerSourceRanges
    /// that contain one admit the LB IPs as sources; node-port flows).
    pub addresses: Vec<IpAddr>,
    /// This node's cluster (imports prefer its endpoints).
    pub cluster: Option<String>,
}

impl NodeConfig {
    /// What the backend-neutral endpoint plan needs of this node.
    pub fn view(&self) -> NodeView<'_> {
        NodeView {
            name: &self.node,
            zone: self.zone.as_deref(),
            addresses: &self.addresses,
            cluster: self.cluster.as_deref(),
        }
    }

    pub(crate) fn cidrs(&self, family: Family) -> impl Iterator<Item = &IpNet> {
        self.cluster_cidrs.iter().filter(move |c| family.has_net(c))
    }

    /// Whether node ports are served on the IPv4 loopback address: asked
    /// for, and loopback is a node-port address. This needs
    /// `net.ipv4.conf.all.route_localnet=1` (the data plane sets it) and a
    /// rule that drops loopback-addressed traffic from elsewhere
    /// (CVE-2020-8558), which each data plane adds
    /// ([`crate::iptables::rules::services_tail`], [`crate::nftables::layout::table`]).
    pub fn localhost_node_ports(&self) -> bool {
        let loopback = IpAddr::from([127, 0, 0, 1]);
        self.localhost_nodeports
            && (self.nodeport_addresses.is_empty()
                || self
                    .nodeport_addresses
                    .iter()
                    .any(|n| n.contains(&loopback)))
    }
}
