//! `switchyard-control-plane`: see `--help`.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Colour codes only on a terminal: journald, kubectl logs and files get plain text.
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
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
    wait_for_signal().await;
    tracing::info!("shutting down");
    shutdown.cancel();
    cp.wait().await;
    Ok(())
}

async fn wait_for_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
