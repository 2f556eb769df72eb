//! The agent as a separate binary, for tests that run it inside a network
//! namespace of their own (`ip netns exec`).

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
    let agent = switchyard_agent::start(args, CancellationToken::new()).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    agent.shutdown().await;
    Ok(())
}
