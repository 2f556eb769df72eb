//! Command-line configuration.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// Which data plane programs the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataPlaneKind {
    /// Program nothing; record what would be applied (development, tests).
    None,
}

/// `switchyard-agent`: the per-node agent.
#[derive(Debug, Clone, Parser)]
#[command(name = "switchyard-agent", version, about, long_about = None)]
pub struct Args {
    /// gRPC URL of the control plane (`https://` for TLS).
    #[arg(long, default_value = "http://127.0.0.1:18000")]
    pub control_plane: String,

    /// This node's name (defaults to the host name).
    #[arg(long)]
    pub node_name: Option<String>,

    /// The cluster this node belongs to.
    #[arg(long, default_value = switchyard_model::DEFAULT_CLUSTER)]
    pub cluster: String,

    /// This node's topology zone, for topology-aware routing.
    #[arg(long)]
    pub zone: Option<String>,

    /// Directory holding the last good state (a sled database).
    #[arg(long, default_value = "/var/lib/switchyard/agent")]
    pub state_dir: PathBuf,

    /// Address of the admin HTTP endpoint (/healthz, /metrics, /status).
    #[arg(long, default_value = "127.0.0.1:9902")]
    pub admin_listen: SocketAddr,

    /// What programs the node.
    #[arg(long, value_enum, default_value = "none")]
    pub dataplane: DataPlaneKind,

    /// PEM CA bundle that the control plane's certificate must chain to.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,

    /// PEM client certificate (mutual TLS); its Common Name must be the node name.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the client certificate.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Name to verify in the control plane's certificate (default: the URL's host).
    #[arg(long)]
    pub tls_server_name: Option<String>,
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
