//! `switchyard-agent`: see `--help`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Colour codes only on a terminal: journald, kubectl logs and files get plain text.
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| switchyard_agent::dns::DEFAULT_LOG_FILTER.into()),
        )
        .init();
    switchyard_agent::run_until_signal(switchyard_agent::Args::parse()).await
}
