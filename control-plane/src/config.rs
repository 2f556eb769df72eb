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
            _ => Err(format!(
                "{s:?} is not a source; supported: file:PATH (a YAML file or directory), \
                 kube (in-cluster or current kubeconfig context), kube:CONTEXT, \
                 docker (the local Docker engine), docker:HOST (unix:///path or tcp://host:port)"
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
    /// `docker:HOST` follows the labelled containers of a Docker engine.
    #[arg(
        long = "source",
        value_name = "SOURCE",
        default_value = "file:examples"
    )]
    pub sources: Vec<SourceSpec>,

    /// Cluster id for objects whose source does not name one.
    #[arg(long, default_value = switchyard_model::DEFAULT_CLUSTER)]
    pub cluster: String,

    /// Address of the gRPC snapshot service.
    #[arg(long, default_value = "0.0.0.0:18000")]
    pub grpc_listen: SocketAddr,

    /// Address of the admin HTTP endpoint (/healthz, /readyz, /metrics, /status).
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin_listen: SocketAddr,

    /// Range for cluster IPs of Services that set none.
    #[arg(long = "service-cidr", default_value = "10.96.0.0/12")]
    pub service_cidrs: Vec<IpNet>,

    /// Quiet time that ends a burst of source changes before a snapshot is built.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub debounce: Duration,

    /// Longest a continuous burst may delay a snapshot.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub max_delay: Duration,

    /// Directory for state kept across restarts (allocated cluster IPs).
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

    /// PEM certificate of the gRPC server; enables TLS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the gRPC server.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle that client certificates must chain to; enables mutual
    /// TLS, in which each agent's certificate Common Name is its node name.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
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
        assert_eq!(a.sources, vec![SourceSpec::File("examples".into())]);
        assert_eq!(a.debounce, Duration::from_millis(100));
    }
}
