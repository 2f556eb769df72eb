//! The agent, built as a binary of this package so the packet tests can
//! start it in node namespaces (`CARGO_BIN_EXE_sy_agent`; Cargo builds a
//! package's binaries before its integration tests, but not other
//! packages'). Same code path as `switchyard-agent`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    switchyard_agent::run_until_signal(switchyard_agent::Args::parse()).await
}
