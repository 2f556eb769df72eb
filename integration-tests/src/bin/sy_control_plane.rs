//! The control plane, built as a binary of this package so the packet tests
//! can start it inside their infrastructure namespace (see `sy_agent`).

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = switchyard_control_plane::Args::parse();
    if let Err(e) = args.check() {
        e.exit();
    }
    let shutdown = CancellationToken::new();
    let cp = switchyard_control_plane::start(args, shutdown.clone()).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    shutdown.cancel();
    cp.wait().await;
    Ok(())
}
