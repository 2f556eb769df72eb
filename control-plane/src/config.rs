//! Command-line configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use ipnet::IpNet;

/// Where Services and EndpointSlices come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// `file:PATH`: a YAML file or a directory of them, reloaded on change.
    File(PathBuf),
    /// `kube` (in-cluster configuration or the kubeconfig's current context)
    /// or `kube:CONTEXT` (a named kubeconfig context).
    Kube(Option<String>),
    /// `docker` (`$DOCKER_HOST`, else the local socket) or `docker:HOST`
    /// (`unix:///path`, `tcp://host:port`): labelled containers.
    Docker(Option<String>),
    /// `switchyard:URL`: another control plane (a fleet relay); with
    /// `=CLUSTER` its exports of that cluster, with `=clusterset` its imports.
    Relay(String),
}

impl FromStr for SourceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(SourceSpec::File(path.into())),
            None if s == "kube" => Ok(SourceSpec::Kube(None)),
            Some(("kube", context)) if !context.is_empty() => {
                Ok(SourceSpec::Kube(Some(context.to_owned())))
            }
            None if s == "docker" => Ok(SourceSpec::Docker(None)),
            Some(("docker", host)) if !host.is_empty() => {
                Ok(SourceSpec::Docker(Some(host.to_owned())))
            }
            Some(("switchyard", url))
                if url.starts_with("http://") || url.starts_with("https://") =>
            {
                Ok(SourceSpec::Relay(url.to_owned()))
            }
            _ => Err(format!(
                "{s:?} is not a source; supported: file:PATH (a YAML file or directory), \
                 kube (in-cluster or current kubeconfig context), kube:CONTEXT, \
                 docker (the local Docker engine), docker:HOST (unix:///path or tcp://host:port), \
                 switchyard:URL=CLUSTER (another control plane's exports of CLUSTER, or =clusterset for its imports)"
            )),
        }
    }
}

/// One `--source`: where objects come from and the cluster they belong to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceArg {
    /// What to read.
    pub spec: SourceSpec,
    /// The cluster of its objects (`SPEC=CLUSTER`); `None` is `--cluster`.
    pub cluster: Option<String>,
}

impl FromStr for SourceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // `=CLUSTER` at the end names the cluster; a path or URL may hold
        // `=` itself, so only a last part that is a cluster id counts.
        if let Some((spec, cluster)) = s.rsplit_once('=')
            && !cluster.contains(['/', ':'])
        {
            let spec: SourceSpec = spec.parse()?;
            // A relay may follow the clusterset's imports.
            let relayed =
                matches!(spec, SourceSpec::Relay(_)) && cluster == switchyard_model::CLUSTERSET;
            if !relayed {
                check_cluster_id(cluster).map_err(|e| format!("{s:?}: {e}"))?;
            }
            return Ok(Self {
                spec,
                cluster: Some(cluster.to_owned()),
            });
        }
        let spec: SourceSpec = s.parse()?;
        if matches!(spec, SourceSpec::Relay(_)) {
            return Err(format!(
                "{s:?}: a switchyard source names what it takes: =CLUSTER (that cluster's exports) or =clusterset (the imports)"
            ));
        }
        Ok(Self {
            spec,
            cluster: None,
        })
    }
}

/// A cluster id is an RFC 1123 DNS label (KEP-2149), and not the name the
/// clusterset view is kept under.
pub fn check_cluster_id(id: &str) -> Result<(), String> {
    if id == switchyard_model::CLUSTERSET {
        return Err(format!(
            "{id:?} is reserved for the clusterset view; name the cluster otherwise"
        ));
    }
    if !switchyard_model::is_dns_label(id) {
        return Err(format!(
            "{id:?} is not a cluster id (a DNS label: at most 63 lowercase letters, digits and '-')"
        ));
    }
    Ok(())
}

/// What `--cluster-down` says about a cluster whose sources all fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterDown {
    /// Keep its last known endpoints in the clusterset.
    Keep,
    /// Drop its exports from the clusterset once it has been down this long.
    DropAfter(Duration),
}

impl FromStr for ClusterDown {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            None if s == "keep" => Ok(Self::Keep),
            Some(("drop-after", d)) => parse_duration(d)
                .map(Self::DropAfter)
                .map_err(|e| format!("{s:?}: {e}")),
            _ => Err(format!(
                "{s:?}: expected keep or drop-after=DURATION (for example drop-after=5m)"
            )),
        }
    }
}

/// Every duration flag goes through the shared parser: a unit is required
/// (`100ms`, `5s`, `1m`, `2h`); a bare number is refused with the accepted forms.
pub use switchyard_model::duration::parse as parse_duration;

/// `switchyard-control-plane`: watches sources and streams snapshots to agents.
#[derive(Debug, Clone, Parser)]
#[command(name = "switchyard-control-plane", version, about, long_about = None)]
pub struct Args {
    /// A source of Services and EndpointSlices; repeatable. `file:PATH` reads
    /// Kubernetes-shaped YAML (a file or a directory) and reloads on change;
    /// `kube` / `kube:CONTEXT` watches an API server; `docker` /
    /// `docker:HOST` follows the labelled containers of a Docker engine;
    /// `switchyard:URL=CLUSTER` follows another control plane (its exports
    /// of CLUSTER, or with `=clusterset` its imports). `SOURCE=CLUSTER`
    /// puts its objects in cluster CLUSTER (default: --cluster), so one
    /// control plane serves several clusters.
    #[arg(
        long = "source",
        value_name = "SOURCE[=CLUSTER]",
        default_value = "file:examples"
    )]
    pub sources: Vec<SourceArg>,

    /// Cluster id for objects whose source does not name one.
    #[arg(long, default_value = switchyard_model::DEFAULT_CLUSTER, value_parser = parse_cluster_id)]
    pub cluster: String,

    /// Export every Service of every source to the clusterset, as if each
    /// had a ServiceExport (testbeds); otherwise only Services with a
    /// ServiceExport (multicluster.x-k8s.io, v1beta1 or v1alpha1) are exported.
    #[arg(long)]
    pub export_all: bool,

    /// Write the clusterset back into every cluster a `kube` source reads,
    /// as an MCS API implementation does: a ServiceImport per import in the
    /// Service's namespace, and the Valid, Ready and Conflict conditions on
    /// each ServiceExport (server-side apply, field manager `switchyard`).
    /// `false` leaves the API servers untouched (read-only RBAC).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub mcs_write: bool,

    /// Range for the ClusterSet IPs of imported (exported, merged) Services;
    /// repeatable, at most one per family (IPv4 and IPv6 for dual-stack
    /// imports). An import keeps the address its ServiceImports record.
    #[arg(long = "clusterset-cidr", default_value = "10.112.0.0/12")]
    pub clusterset_cidrs: Vec<IpNet>,

    /// The name this control plane gives in its Hellos to the control
    /// planes it follows as `switchyard:` sources (default:
    /// `relay-<host name>`).
    #[arg(long, value_name = "NAME")]
    pub relay_name: Option<String>,

    /// PEM CA the certificates of `switchyard:https://…` sources must chain to.
    #[arg(long, value_name = "FILE")]
    pub relay_tls_ca: Option<PathBuf>,

    /// PEM client certificate for `switchyard:https://…` sources (mTLS).
    #[arg(long, value_name = "FILE", requires = "relay_tls_key")]
    pub relay_tls_cert: Option<PathBuf>,

    /// PEM key of --relay-tls-cert.
    #[arg(long, value_name = "FILE", requires = "relay_tls_cert")]
    pub relay_tls_key: Option<PathBuf>,

    /// What to do with the exports of a cluster whose sources all fail:
    /// `keep` its last known endpoints in the clusterset, or
    /// `drop-after=DURATION` of being down.
    #[arg(long, default_value = "keep")]
    pub cluster_down: ClusterDown,

    /// `file:` sources honour the `switchyard.io/cluster` annotation, which
    /// puts one object into another cluster. Off: the annotation is ignored
    /// (and logged). API-server sources never honour it.
    #[arg(long)]
    pub file_cluster_annotation: bool,

    /// Address of the gRPC snapshot service.
    #[arg(long, default_value = "0.0.0.0:18000")]
    pub grpc_listen: SocketAddr,

    /// Address of the admin HTTP endpoint (/healthz, /readyz, /metrics,
    /// /status). `/status` lists every Service and agent: keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin_listen: SocketAddr,

    /// Also serve only /healthz and /readyz here, for kubelet probes (which
    /// cannot reach a loopback address).
    #[arg(long, value_name = "ADDR")]
    pub health_listen: Option<SocketAddr>,

    /// Range for cluster IPs of Services that set none; repeatable, at most
    /// one per family, the first being the family of single-stack Services
    /// (as kube-apiserver's --service-cluster-ip-range).
    #[arg(long = "service-cidr", default_value = "10.96.0.0/12")]
    pub service_cidrs: Vec<IpNet>,

    /// Quiet time that ends a burst of changes at a `file`, `kube` or
    /// `docker` source before it publishes; the snapshot is built at once
    /// (this is the one debounce on a change's path, across relays too).
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub debounce: Duration,

    /// Longest a continuous burst may delay a source's publication.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub max_delay: Duration,

    /// Not used: allocated addresses are a function of the objects (and the
    /// ServiceImport record), the same on every replica, and no longer kept
    /// in files (see ARCHITECTURE.md, "Addresses"). Accepted so existing
    /// manifests and scripts still start.
    #[arg(long, default_value = "/var/lib/switchyard/control-plane")]
    pub state_dir: PathBuf,

    /// Kubeconfig for `kube` sources; default: `$KUBECONFIG`, then
    /// `~/.kube/config`, then the in-cluster service account.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// Watch Services and EndpointSlices of this namespace only (`kube` sources).
    #[arg(long, value_name = "NS")]
    pub kube_namespace: Option<String>,

    /// Watch only Services and EndpointSlices matching this label selector
    /// (`kube` sources), for example `switchyard.io/proxy!=off`.
    #[arg(long, value_name = "SELECTOR")]
    pub kube_label_selector: Option<String>,

    /// The kube-dns ConfigMap (NAMESPACE/NAME, or `none`) whose
    /// `stubDomains` and `upstreamNameservers` the agents' DNS stubs follow
    /// (`kube` sources; read only when it exists and may be read).
    #[arg(
        long,
        value_name = "NAMESPACE/NAME|none",
        default_value = "kube-system/kube-dns"
    )]
    pub kube_dns_configmap: String,

    /// PEM certificate of the gRPC server; enables TLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the gRPC server.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle that client certificates must chain to; enables mutual
    /// TLS. A node certificate is in Kubernetes' form: subject
    /// `O=system:nodes` (or --tls-client-organization) and
    /// `CN=system:node:NAME`, NAME being the agent's node name; a URI SAN
    /// `spiffe://TRUST-DOMAIN/cluster/CLUSTER` fixes its cluster. The files
    /// are re-read when they change.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Subject organisation a node's client certificate must carry instead
    /// of `system:nodes` (repeatable).
    #[arg(
        long = "tls-client-organization",
        value_name = "ORG",
        requires = "tls_client_ca"
    )]
    pub tls_client_organizations: Vec<String>,

    /// Connections open at once; more are closed at accept.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,

    /// Connections open at once from one source address.
    #[arg(long, default_value_t = 64)]
    pub max_connections_per_address: usize,

    /// Agent streams open at once (one per agent); more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 10_000)]
    pub max_agent_streams: usize,

    /// An update the agent neither ACKs nor NACKs within this, counted from
    /// its first part, ends its stream; the agent reconnects and resumes.
    /// An update the agent does not even read (HTTP/2 flow control stalled)
    /// also closes its connection.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub ack_timeout: Duration,

    /// Streams waiting for their Hello to be read (a few are read at a
    /// time, each first part within 1 s of its turn); more are refused
    /// with RESOURCE_EXHAUSTED and the agent retries.
    #[arg(long, default_value_t = 1024)]
    pub max_hellos_waiting: usize,

    /// Streams from one source address waiting for their Hello to be read;
    /// more are refused with RESOURCE_EXHAUSTED. A node's agent needs one.
    #[arg(long, default_value_t = 4)]
    pub max_hellos_waiting_per_address: usize,

    /// `/status` forgets agents disconnected for longer than this (and keeps
    /// at most 10,000 disconnected ones).
    #[arg(long, default_value = "60m", value_parser = parse_duration)]
    pub forget_agents_after: Duration,
}

impl Args {
    /// Checks what no single flag can: at most one `--service-cidr` and one
    /// `--clusterset-cidr` per family. Call it after parsing; the binary
    /// exits with clap's usage error when it fails.
    pub fn check(&self) -> Result<(), clap::Error> {
        use clap::CommandFactory;
        let ranges = [
            ("--service-cidr", &self.service_cidrs),
            ("--clusterset-cidr", &self.clusterset_cidrs),
        ];
        for (flag, cidrs) in ranges {
            if let Err(e) = crate::ipam::Ranges::new(flag, cidrs) {
                return Err(Self::command().error(clap::error::ErrorKind::ArgumentConflict, e));
            }
        }
        Ok(())
    }
}

fn parse_cluster_id(s: &str) -> Result<String, String> {
    check_cluster_id(s).map(|()| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_and_durations() {
        assert_eq!(
            "file:/etc/sy".parse::<SourceSpec>(),
            Ok(SourceSpec::File("/etc/sy".into()))
        );
        assert_eq!("kube".parse::<SourceSpec>(), Ok(SourceSpec::Kube(None)));
        assert_eq!(
            "kube:prod-eu".parse::<SourceSpec>(),
            Ok(SourceSpec::Kube(Some("prod-eu".into())))
        );
        assert_eq!("docker".parse::<SourceSpec>(), Ok(SourceSpec::Docker(None)));
        assert_eq!(
            "docker:unix:///run/docker.sock".parse::<SourceSpec>(),
            Ok(SourceSpec::Docker(Some("unix:///run/docker.sock".into())))
        );
        for bad in ["kube:", "docker:", "file:", "podman"] {
            let err = bad.parse::<SourceSpec>().expect_err("unsupported");
            assert!(
                err.contains("file:PATH")
                    && err.contains("kube:CONTEXT")
                    && err.contains("docker:HOST"),
                "{err}"
            );
        }
        let east: SourceArg = "kube:prod-eu=east".parse().expect("valid");
        assert_eq!(east.spec, SourceSpec::Kube(Some("prod-eu".into())));
        assert_eq!(east.cluster.as_deref(), Some("east"));
        let plain: SourceArg = "file:/etc/sy".parse().expect("valid");
        assert_eq!(plain.cluster, None);
        let url: SourceArg = "docker:tcp://h:2375".parse().expect("valid");
        assert_eq!(url.cluster, None);
        assert!("docker=West".parse::<SourceArg>().is_err());
        let reserved = "kube=clusterset"
            .parse::<SourceArg>()
            .expect_err("reserved");
        assert!(reserved.contains("reserved"), "{reserved}");
        assert_eq!("keep".parse(), Ok(ClusterDown::Keep));
        assert_eq!(
            "drop-after=5m".parse(),
            Ok(ClusterDown::DropAfter(Duration::from_secs(300)))
        );
        assert!("drop".parse::<ClusterDown>().is_err());
        let hub: SourceArg = "switchyard:http://hub:18000=clusterset"
            .parse()
            .expect("valid");
        assert_eq!(hub.spec, SourceSpec::Relay("http://hub:18000".into()));
        assert_eq!(hub.cluster.as_deref(), Some("clusterset"));
        let east: SourceArg = "switchyard:https://cp-east:18000=east"
            .parse()
            .expect("valid");
        assert_eq!(east.cluster.as_deref(), Some("east"));
        let bare = "switchyard:http://hub:18000"
            .parse::<SourceArg>()
            .expect_err("needs =");
        assert!(bare.contains("=clusterset"), "{bare}");
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        // A bare number is refused on every duration flag, with the forms.
        for flag in ["--debounce", "--max-delay"] {
            let err = Args::try_parse_from(["cp", flag, "40"]).expect_err("no unit");
            let text = err.to_string();
            assert!(text.contains(flag) && text.contains("40ms"), "{text}");
        }
    }

    #[test]
    fn defaults_parse() {
        let a = Args::try_parse_from(["cp"]).expect("defaults");
        assert_eq!(
            a.sources,
            vec![SourceArg {
                spec: SourceSpec::File("examples".into()),
                cluster: None
            }]
        );
        assert_eq!(a.debounce, Duration::from_millis(100));
        a.check().expect("the default ranges");
    }

    #[test]
    fn one_range_per_family() {
        let dual = Args::try_parse_from([
            "cp",
            "--service-cidr",
            "10.96.0.0/12",
            "--service-cidr",
            "fd00:96::/108",
            "--clusterset-cidr",
            "fd00:112::/108",
            "--clusterset-cidr",
            "10.112.0.0/12",
        ])
        .expect("parses");
        dual.check().expect("one of each family");
        let twice = Args::try_parse_from([
            "cp",
            "--clusterset-cidr",
            "10.112.0.0/12",
            "--clusterset-cidr",
            "10.128.0.0/12",
        ])
        .expect("parses");
        let e = twice.check().expect_err("two IPv4 ranges").to_string();
        assert!(
            e.contains("--clusterset-cidr 10.112.0.0/12 and 10.128.0.0/12 are both IPv4"),
            "{e}"
        );
    }
}
