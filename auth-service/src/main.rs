//! The auth-service binary: settings from the environment, JSON logs to stdout, serve until
//! SIGTERM.

use std::process::ExitCode;

use auth_service::config::Settings;
use auth_service::startup::{Application, shutdown_signal};
use shared::telemetry;

/// mimalloc instead of glibc's malloc: the services allocate and free many small buffers
/// per request across threads, and glibc's allocator was about a tenth of their CPU under
/// load (its free lists, `malloc_consolidate`); see the README's benchmarks. The workspace
/// builds mimalloc with its `override` feature, so the C code's `malloc` (SQLite's, which
/// allocates a copy of every column of every row it hands to sqlx) is mimalloc too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    telemetry::init(std::io::stdout);
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(setting = e.name, "{e}");
            telemetry::to_stderr(format_args!("auth-service: {e}"));
            return ExitCode::from(2);
        }
    };
    let runtime = match shared::runtime::build(settings.worker_threads) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "no async runtime");
            telemetry::to_stderr(format_args!("auth-service: no async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(serve(settings))
}

async fn serve(settings: Settings) -> ExitCode {
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(e) => {
            tracing::error!(error = ?e, "auth-service could not start");
            telemetry::to_stderr(format_args!("auth-service: could not start: {e:#}"));
            return ExitCode::FAILURE;
        }
    };
    match app.run_until_stopped(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = ?e, "auth-service failed");
            ExitCode::FAILURE
        }
    }
}
