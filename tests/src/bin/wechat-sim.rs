//! `wechat-sim`: the WeChat simulator as a process. See `tests::sim` for its settings, endpoints
//! and control API.

use std::process::ExitCode;

use anyhow::Context as _;
use tests::sim::{Settings, Simulator};

#[tokio::main]
async fn main() -> ExitCode {
    if let Err(error) = tests::sim::init_subscriber(std::io::stdout) {
        eprintln!("wechat-sim: {error:#}");
        return ExitCode::FAILURE;
    }
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "wechat-sim stopped on an error"
            );
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let stop = stop_signal()?;
    let simulator = Simulator::build(settings).await?;
    simulator.run_until_stopped(stop).await
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
fn stop_signal() -> anyhow::Result<impl Future<Output = ()>> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received"),
        }
    })
}
