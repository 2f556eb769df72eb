//! `switchyard-agent`: see `--help`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| switchyard_agent::dns::DEFAULT_LOG_FILTER.into()),
        )
        .init();
    switchyard_agent::run_until_signal(switchyard_agent::Args::parse()).await
}
