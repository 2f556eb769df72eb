//! The Kubernetes API server stand-in as a program, for trying kubectl or a
//! control plane against it by hand:
//!
//! ```sh
//! cargo run --release -p switchyard-integration-tests --bin fake_apiserver -- \
//!     --listen 127.0.0.1:8001 --kubeconfig-out /tmp/standin.kubeconfig --load examples
//! KUBECONFIG=/tmp/standin.kubeconfig kubectl get svc -A
//! ```
//!
//! Two of them make a local two-cluster fleet: give each its own
//! `--context` and the kubeconfigs merge.
//!
//! ```sh
//! fake_apiserver --listen 127.0.0.1:8001 --context east --kubeconfig-out /tmp/east.kubeconfig &
//! fake_apiserver --listen 127.0.0.1:8002 --context west --kubeconfig-out /tmp/west.kubeconfig &
//! KUBECONFIG=/tmp/east.kubeconfig:/tmp/west.kubeconfig kubectl --context west get svc -A
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde_json::Value;
use switchyard_integration_tests::apiserver::{FakeApiServer, Kind, ServerConfig, Store};

/// A Kubernetes API server stand-in serving Services, EndpointSlices and Nodes.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:8001")]
    listen: String,
    /// Write a kubeconfig for this server here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// The name of that kubeconfig's cluster, user and context (its current
    /// one): stand-ins with different names have kubeconfigs that merge
    /// (`KUBECONFIG=a:b`).
    #[arg(long, default_value = switchyard_integration_tests::apiserver::DEFAULT_CONTEXT)]
    context: String,
    /// YAML manifests (a file or a directory) to create at start.
    #[arg(long)]
    load: Vec<PathBuf>,
    /// Seconds between BOOKMARK events on watches that allow them.
    #[arg(long, default_value_t = 60)]
    bookmark_seconds: u64,
    /// Events kept for watches to resume from; older ones are compacted.
    #[arg(long, default_value_t = 100_000)]
    log_capacity: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let store = Store::new(args.log_capacity);
    for path in &args.load {
        load(&store, path).with_context(|| format!("loading {}", path.display()))?;
    }
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let config = ServerConfig {
        bookmark_interval: Duration::from_secs(args.bookmark_seconds.max(1)),
        ..ServerConfig::default()
    };
    let server = FakeApiServer::start_with(listener, store, config)?;
    if let Some(out) = &args.kubeconfig_out {
        server
            .write_kubeconfig_named(out, &args.context)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    tracing::info!(url = %server.url(), "API server stand-in listening");
    tokio::signal::ctrl_c().await?;
    server.stop().await;
    Ok(())
}

fn load(store: &Store, path: &PathBuf) -> anyhow::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
            })
            .collect();
        entries.sort();
        for p in entries {
            load(store, &p).with_context(|| format!("loading {}", p.display()))?;
        }
        return Ok(());
    }
    let text = std::fs::read_to_string(path)?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)?;
    for doc in docs {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
        let api_version = doc
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(kind) = Kind::ALL
            .into_iter()
            .find(|k| k.kind() == kind && k.versions().contains(&api_version))
        else {
            tracing::info!(kind, api_version, "not served; skipped");
            continue;
        };
        if let Err(e) = store.create(kind, doc) {
            tracing::warn!(error = %e.message, "not created");
        }
    }
    Ok(())
}
