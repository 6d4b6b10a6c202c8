//! The services' logs: JSON lines, one per event, filtered by `RUST_LOG` (default `info`),
//! and the few lines a service writes to stderr before it can log.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Installs the global subscriber writing to `sink`; a second call does nothing. The sink is
/// a parameter so that tests can silence or capture it.
pub fn init<W>(sink: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,h2=warn,hyper=warn,tower=warn"));
    let _already_set = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(sink)
        // A log line that cannot be written (stdout a pipe whose reader is gone) is lost,
        // never reported with `eprintln!`, which panics when stderr is gone too: the panic
        // took down whichever task logged, the shutdown one included, and the process then
        // never stopped on SIGTERM.
        .log_internal_errors(false)
        .try_init();
}

/// Writes `message` and a newline to stderr, for whoever started the process, when it can: a
/// closed stderr loses the line instead of panicking as `eprintln!` does.
pub fn to_stderr(message: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _lost_if_closed = writeln!(std::io::stderr(), "{message}");
}
