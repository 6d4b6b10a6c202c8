//! The simulator's logs: JSON lines, filtered by `RUST_LOG` (default `info`).

use anyhow::Context as _;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Installs the global subscriber: JSON lines to `sink`. Fails when `RUST_LOG` is malformed or a
/// subscriber is already installed.
pub fn init_subscriber<W>(sink: W) -> anyhow::Result<()>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::builder()
        .with_default_directive(LevelFilter::INFO.into())
        .from_env()
        .context("RUST_LOG is not a valid log filter")?;
    tracing_subscriber::fmt()
        .json()
        .with_ansi(false)
        .with_env_filter(filter)
        .with_writer(sink)
        // A line that cannot be written is lost, not reported with `eprintln!` (which panics
        // when stderr is closed too).
        .log_internal_errors(false)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))
}
