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

    /// Pod CIDR of the cluster (repeatable, one per family or more): traffic
    /// to a cluster IP from outside these is masqueraded, and the DNS stub
    /// answers these sources by default.
    #[arg(long = "cluster-cidr", default_value = "10.244.0.0/16")]
    pub cluster_cidrs: Vec<IpNet>,

    /// Node addresses that accept NodePort traffic, as CIDRs (comma-separated
    /// or repeated). Default: every local address.
    #[arg(long = "nodeport-addresses", value_delimiter = ',')]
    pub nodeport_addresses: Vec<IpNet>,

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
    pub healthz_bind_address: IpAddr,

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

    /// The cluster's DNS domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Upstream DNS server for names outside the cluster (repeatable; port 53
    /// when none is given). Default: the nameservers in --resolv-conf other
    /// than the stub itself. With none, other names get SERVFAIL at once
    /// (the agent warns at start and /status shows it).
    #[arg(long = "dns-upstream", value_parser = parse_upstream)]
    pub dns_upstreams: Vec<SocketAddr>,

    /// Where the default upstreams are read from.
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,

    /// TTL of the cluster's records.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub dns_ttl: Duration,

    /// Sources allowed to query (repeatable). Default: this node's own
    /// addresses and the --cluster-cidr ranges; everyone else is REFUSED.
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

fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|e| format!("{s:?}: {e} (expected IP or IP:PORT)"))
}

impl Args {
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
