//! `switchyard-agent`: see `--help`.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| switchyard_agent::dns::DEFAULT_LOG_FILTER.into()),
        )
        .init();
    let args = switchyard_agent::Args::parse();
    let shutdown = CancellationToken::new();
    let agent = switchyard_agent::start(args, shutdown.clone()).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    // Rules stay in the kernel: a restart must not drop traffic.
    tracing::info!("shutting down; the data plane stays in force");
    shutdown.cancel();
    agent.wait().await;
    Ok(())
}
