//! Command-line configuration.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

/// Which data plane programs the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataPlaneKind {
    /// kube-proxy-shaped iptables/ip6tables rules, programmed with iptables-restore.
    Iptables,
    /// One nftables table per family whose rules never change: Services and
    /// endpoints are set and map elements, programmed through libnftables.
    Nftables,
    /// Program nothing; record what would be applied (development, tests).
    None,
}

impl DataPlaneKind {
    /// iptables on Linux, `none` elsewhere.
    pub const fn default_for_os() -> Self {
        if cfg!(target_os = "linux") {
            Self::Iptables
        } else {
            Self::None
        }
    }
}

/// Subcommands; without one the agent runs.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Remove everything Switchyard puts on the node, then exit: its chains
    /// and rules (both families), the DNS stub's NOTRACK rules, its
    /// nodelocaldns interface and, for a link-local --dns-listen, that
    /// address on lo.
    Cleanup,
}

/// Every duration flag goes through the shared parser: a unit is required
/// (`100ms`, `5s`, `1m`, `2h`); a bare number is refused with the accepted forms.
pub use switchyard_model::duration::parse as parse_duration;

/// `switchyard-agent`: the per-node agent.
#[derive(Debug, Clone, Parser)]
#[command(name = "switchyard-agent", version, about, long_about = None)]
pub struct Args {
    /// `cleanup`, or nothing to run the agent.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// gRPC URLs of the control planes, comma-separated or repeated:
    /// `http://HOST:PORT`, or `https://HOST:PORT` with --tls-ca. The agent
    /// streams from one at a time and moves to the next when its stream
    /// fails (one that stops answering is noticed within 8 s). `http://`
    /// with any TLS flag is refused rather than used in clear text.
    #[arg(long, default_value = "http://127.0.0.1:18000", value_delimiter = ',')]
    pub control_plane: Vec<String>,

    /// This node's name (defaults to the host name).
    #[arg(long)]
    pub node_name: Option<String>,

    /// The cluster this node belongs to.
    #[arg(long, default_value = switchyard_model::DEFAULT_CLUSTER)]
    pub cluster: String,

    /// This node's topology zone, for topology-aware routing. Default: the
    /// zone the control plane reports from this node's Node label
    /// topology.kubernetes.io/zone; this flag overrides it.
    #[arg(long)]
    pub zone: Option<String>,

    /// Directory holding the last good state (a sled database).
    #[arg(long, default_value = "/var/lib/switchyard/agent")]
    pub state_dir: PathBuf,

    /// Address of the admin HTTP endpoint (/, /healthz, /readyz, /metrics,
    /// /status); keep it on loopback: /status shows every Service.
    #[arg(long, default_value = "127.0.0.1:9902")]
    pub admin_listen: SocketAddr,

    /// Also serve /metrics (only) on this address, for a cluster Prometheus
    /// (for example 0.0.0.0:9903). Default: metrics on --admin-listen only.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// What programs the node.
    #[arg(long, value_enum, default_value_t = DataPlaneKind::default_for_os())]
    pub dataplane: DataPlaneKind,

    /// Pod CIDRs of the cluster (comma-separated or repeated, one per family
    /// or more): traffic to a cluster IP from outside these is masqueraded,
    /// and the DNS stub answers these sources by default.
    #[arg(
        long = "cluster-cidr",
        default_value = "10.244.0.0/16",
        value_delimiter = ','
    )]
    pub cluster_cidrs: Vec<IpNet>,

    /// Node addresses that accept NodePort traffic, as CIDRs (comma-separated
    /// or repeated), or `primary`: the addresses this node's default routes
    /// leave from, one per family (kube-proxy's nftables default). Default:
    /// every local address.
    #[arg(long = "nodeport-addresses", value_delimiter = ',', value_parser = parse_nodeport_address)]
    pub nodeport_addresses: Vec<NodePortAddress>,

    /// The cluster's Service IP ranges (comma-separated or repeated; the
    /// API server's --service-cluster-ip-range, or its ServiceCIDRs, and
    /// the clusterset's range in a fleet): traffic to an address in them
    /// that no Service holds is dropped, as kube-proxy's nftables mode does.
    /// Traffic to a Service's IP on a port it does not serve is refused
    /// whether or not this is given.
    #[arg(long = "service-cidr", value_delimiter = ',')]
    pub service_cidrs: Vec<IpNet>,

    /// Serve IPv4 node ports on 127.0.0.1 too, as kube-proxy does (sets
    /// net.ipv4.conf.all.route_localnet=1 when loopback is a node-port
    /// address; `false` leaves the sysctl alone).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub iptables_localhost_nodeports: bool,

    /// Bit of the packet mark that flags traffic for masquerading (0-31).
    #[arg(long, default_value_t = 14, value_parser = clap::value_parser!(u8).range(0..=31))]
    pub masquerade_bit: u8,

    /// Address the healthCheckNodePort servers of externalTrafficPolicy Local
    /// Services listen on.
    #[arg(long, default_value = "0.0.0.0")]
    pub health_check_node_port_address: IpAddr,

    /// kube-proxy's health server (`/healthz`, `/livez`; its JSON and
    /// rules, 503 while the Node is being deleted or tainted
    /// ToBeDeletedByClusterAutoscaler): ADDR:PORT, or `none`. Default:
    /// kube-proxy's 0.0.0.0:10256 with the iptables and nftables data
    /// planes, none with `none`. While the port is taken (kube-proxy still
    /// running), the agent binds it once it is free.
    #[arg(long, value_name = "ADDR:PORT|none", value_parser = parse_healthz_bind)]
    pub healthz_bind_address: Option<HealthzBind>,

    /// How often the iptables data plane checks its canary chains (a flush by
    /// someone else) and retries a pending full sync.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub iptables_sync_period: Duration,

    /// PEM CA bundle that the control plane's certificate must chain to.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate (mutual TLS), in Kubernetes' node form:
    /// `O=system:nodes`, `CN=system:node:NODE`. Re-read when it changes.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the client certificate.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Name to verify in the control plane's certificate (default: the URL's host).
    #[arg(long)]
    pub tls_server_name: Option<String>,

    /// Where the DNS stub listens (UDP and TCP), or `none`. The default
    /// link-local address is put on a dummy interface, with NOTRACK rules,
    /// when the agent may (CAP_NET_ADMIN); any other address is just bound.
    #[arg(long, default_value = DEFAULT_DNS_LISTEN, value_parser = parse_dns_listen)]
    pub dns_listen: DnsListen,

    /// On SIGTERM, keep serving this long for a successor to take over
    /// (a new agent started on the same state directory takes this one's
    /// sockets and state with no DNS gap, whichever starts first); 0s:
    /// stop at once. A successor started before the SIGTERM (a
    /// DaemonSet's surge) has taken over already.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub handoff_wait: Duration,

    /// Transparent mode, as NodeLocal DNSCache's: also answer on this
    /// Service's cluster IPs (NAMESPACE/NAME, kube-system/kube-dns for the
    /// cluster DNS), with NOTRACK rules so its DNAT rules do not see the
    /// queries, and forward names outside the stub's zones to its ready
    /// endpoints. Pods that use the cluster DNS IP are then answered on
    /// this node with no kubelet change; when the agent stops, the
    /// Service's own rules take over again.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub dns_service: Option<crate::dns::transparent::DnsService>,

    /// The cluster's DNS domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Upstream DNS server for names outside the cluster (repeatable; port 53
    /// when none is given). Default: the nameservers in --resolv-conf other
    /// than the stub itself. With none, other names get SERVFAIL at once
    /// (the agent warns at start and /status shows it).
    #[arg(long = "dns-upstream", value_parser = parse_upstream)]
    pub dns_upstreams: Vec<SocketAddr>,

    /// Names in ZONE go to these servers instead (repeatable; stub
    /// domains, as the kube-dns ConfigMap's `stubDomains` and CoreDNS's
    /// `forward ZONE`): `ZONE=IP[:PORT][,IP[:PORT]...]`. The longest zone
    /// that holds a name wins.
    #[arg(long = "dns-forward", value_name = "ZONE=ADDR[,ADDR]", value_parser = parse_forward)]
    pub dns_forward: Vec<(String, Vec<SocketAddr>)>,

    /// Keep upstream answers this long after they expire, and answer with
    /// them (TTL 30 s) when no upstream answers the question (CoreDNS's
    /// `serve_stale` in its verify mode, RFC 8767). 0s: off.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub dns_serve_stale: Duration,

    /// Name a headless Service's endpoint that has no hostname after the
    /// Pod its targetRef names (`<pod>.<svc>.<ns>.svc.<zone>`), when that is
    /// a DNS label, instead of its dashed address (CoreDNS's
    /// `endpoint_pod_names`).
    #[arg(long)]
    pub dns_endpoint_pod_names: bool,

    /// Where the default upstreams are read from.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,

    /// TTL of the cluster's records.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub dns_ttl: Duration,

    /// Sources allowed to query (repeatable). Default: this node's own
    /// addresses, loopback and the --cluster-cidr ranges; everyone else is
    /// REFUSED.
    #[arg(long = "dns-allow")]
    pub dns_allow: Vec<IpNet>,

    /// Most forwarded queries in flight at once; beyond it queries are REFUSED.
    #[arg(long, default_value_t = 1024)]
    pub dns_max_inflight: usize,

    /// Most DNS TCP connections open at once; more are closed at accept
    /// (connections idle for 10 s are closed).
    #[arg(long, default_value_t = 256)]
    pub dns_max_tcp_connections: usize,

    /// Most DNS TCP connections open at once from one source address.
    #[arg(long, default_value_t = 16)]
    pub dns_max_tcp_per_source: usize,
}

/// One `--nodeport-addresses` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePortAddress {
    /// Node addresses in this range.
    Cidr(IpNet),
    /// The node's primary addresses (those its default routes leave from).
    Primary,
}

fn parse_nodeport_address(s: &str) -> Result<NodePortAddress, String> {
    if s == "primary" {
        return Ok(NodePortAddress::Primary);
    }
    s.parse()
        .map(NodePortAddress::Cidr)
        .map_err(|e| format!("{s:?}: {e} (expected a CIDR or primary)"))
}

/// Where kube-proxy's health server listens (`--healthz-bind-address`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthzBind {
    /// Not served.
    Off,
    /// Served on this address.
    At(SocketAddr),
}

/// kube-proxy's health server port.
pub const KUBE_PROXY_HEALTHZ: &str = "0.0.0.0:10256";

fn parse_healthz_bind(s: &str) -> Result<HealthzBind, String> {
    if s == "none" {
        return Ok(HealthzBind::Off);
    }
    s.parse()
        .map(HealthzBind::At)
        .map_err(|e| format!("{s:?}: {e} (expected ADDR:PORT or none)"))
}

/// The default `--dns-listen`, NodeLocal DNSCache's customary address.
pub const DEFAULT_DNS_LISTEN: &str = "169.254.20.10:53";

/// Where the DNS stub listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsListen {
    /// No DNS stub.
    None,
    /// UDP and TCP on this address.
    Addr(SocketAddr),
}

fn parse_dns_listen(s: &str) -> Result<DnsListen, String> {
    if s == "none" {
        return Ok(DnsListen::None);
    }
    s.parse()
        .map(DnsListen::Addr)
        .map_err(|e| format!("{s:?}: {e} (expected ADDR:PORT or none)"))
}

fn parse_forward(s: &str) -> Result<(String, Vec<SocketAddr>), String> {
    let (zone, servers) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ZONE=ADDR[,ADDR]"))?;
    let zone = zone.trim().trim_end_matches('.');
    if zone.is_empty() {
        return Err(format!("{s:?}: the zone is empty"));
    }
    let servers = servers
        .split(',')
        .map(parse_upstream)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((zone.to_owned(), servers))
}

fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|e| format!("{s:?}: {e} (expected IP or IP:PORT)"))
}

impl Args {
    /// Where kube-proxy's health server listens, if anywhere: the flag, or
    /// by default kube-proxy's port when a data plane proxies this node.
    pub fn proxy_healthz(&self) -> Option<SocketAddr> {
        match self.healthz_bind_address {
            Some(HealthzBind::At(addr)) => Some(addr),
            Some(HealthzBind::Off) => None,
            None => (self.dataplane != DataPlaneKind::None)
                .then(|| KUBE_PROXY_HEALTHZ.parse().expect("a socket address")),
        }
    }

    /// The node name, from the flag or the host name.
    pub fn node(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "localhost".into())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_domains_name_a_zone_and_servers() {
        let a = Args::try_parse_from([
            "agent",
            "--dns-forward",
            "corp.example.=10.0.0.1,10.0.0.2:5353",
            "--dns-forward",
            "acme.local=[fd00::1]:53",
        ])
        .expect("parses");
        assert_eq!(
            a.dns_forward,
            [
                (
                    "corp.example".to_owned(),
                    vec![
                        "10.0.0.1:53".parse().expect("addr"),
                        "10.0.0.2:5353".parse().expect("addr")
                    ]
                ),
                (
                    "acme.local".to_owned(),
                    vec!["[fd00::1]:53".parse().expect("addr")]
                ),
            ]
        );
        for bad in ["corp.example", "=10.0.0.1", "corp.example=nope"] {
            let e = Args::try_parse_from(["agent", "--dns-forward", bad]).expect_err(bad);
            assert!(e.to_string().contains("--dns-forward"), "{e}");
        }
    }

    #[test]
    fn duration_flags_need_a_unit() {
        let a = Args::try_parse_from(["agent", "--dns-ttl", "30s", "--iptables-sync-period", "1m"])
            .expect("units");
        assert_eq!(a.dns_ttl, Duration::from_secs(30));
        assert_eq!(a.iptables_sync_period, Duration::from_secs(60));
        // `--dns-ttl 30` used to mean 30 ms and served TTL 0.
        for flag in ["--dns-ttl", "--iptables-sync-period"] {
            let err = Args::try_parse_from(["agent", flag, "30"]).expect_err("no unit");
            let text = err.to_string();
            assert!(
                text.contains(flag) && text.contains("30s") && text.contains("100ms, 5s, 1m or 2h"),
                "{text}"
            );
        }
    }
}
