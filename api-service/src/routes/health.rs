//! `/healthz` (the process is alive) and `/readyz` (it can serve: auth-service and the
//! database answer, and it is not draining).

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

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
        (status = 200, description = "auth-service and the database answer", body = Health),
        (status = 503, description = "A dependency is down, or the process is draining", body = Health),
    ))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, axum::Json<Health>) {
    let (auth_service, database) = tokio::join!(state.auth.ready(), state.db.ping());
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
