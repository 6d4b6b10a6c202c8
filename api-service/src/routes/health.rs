//! `/healthz` (the process is alive) and `/readyz` (it can serve: auth-service and the
//! database answer, and it is not draining).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthApi;
use crate::db::Db;
use crate::state::AppState;

/// How long one look at the dependencies answers /readyz.
pub const READY_CHECK_TTL: Duration = Duration::from_secs(1);

/// The longest one look waits for each dependency (not ready past it); below the readiness
/// probe's own limit (deploy/: 4 s).
const READY_CHECK_LIMIT: Duration = Duration::from_secs(3);

/// `check`'s answer, or not ready after [`READY_CHECK_LIMIT`].
async fn bounded(check: impl Future<Output = bool>) -> bool {
    tokio::time::timeout(READY_CHECK_LIMIT, check)
        .await
        .unwrap_or(false)
}

/// The dependencies' last look, shared by every /readyz: the path is public and needs no
/// token, so a flood of it must not become a flood of database pings (each holding a pool
/// connection that requests need) and health calls to auth-service. One look runs at a time;
/// the requests that come meanwhile, or within [`READY_CHECK_TTL`] after, take its answer.
/// Probes ask every few seconds, so a second's age changes nothing for them.
#[derive(Debug, Default)]
pub struct Readiness {
    last: tokio::sync::Mutex<Option<Looked>>,
}

#[derive(Debug, Clone, Copy)]
struct Looked {
    at: Instant,
    auth_service: bool,
    database: bool,
}

impl Readiness {
    /// Whether auth-service and the database answer: `(auth_service, database)`.
    pub async fn check(&self, auth: &dyn AuthApi, db: &Db) -> (bool, bool) {
        // Held across the look on purpose: the callers queued behind it take its answer.
        let mut last = self.last.lock().await;
        if let Some(looked) = *last
            && looked.at.elapsed() < READY_CHECK_TTL
        {
            return (looked.auth_service, looked.database);
        }
        // Bounded, as the lock is held meanwhile: a database ping on a half-open connection
        // would otherwise wait for TCP to give up, and every /readyz behind it.
        let (auth_service, database) = tokio::join!(bounded(auth.ready()), bounded(db.ping()));
        *last = Some(Looked {
            at: Instant::now(),
            auth_service,
            database,
        });
        (auth_service, database)
    }
}

/// A health answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: &'static str,
    /// For /readyz: each dependency's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<Checks>,
}

/// The dependencies /readyz checks.
#[derive(Debug, Serialize, ToSchema)]
pub struct Checks {
    /// auth-service reports SERVING.
    pub auth_service: bool,
    /// The database answers.
    pub database: bool,
    /// The process is stopping.
    pub draining: bool,
}

/// Alive.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is alive", body = Health)))]
pub async fn healthz() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok",
        checks: None,
    })
}

/// Ready to serve.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "auth-service and the database answer (as seen at most a second ago)", body = Health),
        (status = 503, description = "A dependency is down, or the process is draining", body = Health),
    ))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, axum::Json<Health>) {
    let (auth_service, database) = state.readiness.check(&*state.auth, &state.db).await;
    let draining = state.draining.load(Ordering::Relaxed);
    let ok = auth_service && database && !draining;
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(Health {
            status: if ok { "ok" } else { "unavailable" },
            checks: Some(Checks {
                auth_service,
                database,
                draining,
            }),
        }),
    )
}
