//! The control API's plumbing (its JSON body extractor, its one error type, its fallbacks) and
//! its calls that belong to no WeChat endpoint: `POST /sim/reset` and `POST /sim/clock/advance`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::ids::RandomError;
use super::state::{SimState, World};

/// Every way a control call fails; answered as `{"error": "…"}`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error(transparent)]
    Random(#[from] RandomError),
}

impl ControlError {
    pub(crate) fn bad_request(what: impl Into<String>) -> Self {
        Self::BadRequest(what.into())
    }
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        let (status, message) = match &self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, m.clone()),
            Self::MethodNotAllowed(m) => (StatusCode::METHOD_NOT_ALLOWED, m.clone()),
            Self::Random(cause) => {
                tracing::error!(error = %cause, "a control call failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_owned(),
                )
            }
        };
        (status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}

/// A control call's JSON body. An empty body reads as `{}`; any `Content-Type` is accepted; a
/// body that does not parse is a 400 that says why.
#[derive(Debug)]
pub(crate) struct ControlJson<T>(pub(crate) T);

impl<S, T> FromRequest<S> for ControlJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ControlError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state).await.map_err(|e| {
            ControlError::bad_request(format!("cannot read the body: {}", e.body_text()))
        })?;
        let body: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(body)
            .map(ControlJson)
            .map_err(|e| ControlError::bad_request(format!("invalid body: {e}")))
    }
}

/// An openid or unionid given to the control API: 1 to 128 printable ASCII characters.
pub(crate) fn check_id(field: &str, id: String) -> Result<String, ControlError> {
    if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ControlError::bad_request(format!(
            "{field} must be 1 to 128 printable ASCII characters without spaces"
        )));
    }
    Ok(id)
}

/// An appid given to the control API: ASCII letters and digits.
pub(crate) fn check_appid(appid: String) -> Result<String, ControlError> {
    if appid.is_empty() || !appid.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(ControlError::bad_request(
            "appid must be a non-empty string of ASCII letters and digits",
        ));
    }
    Ok(appid)
}

pub(crate) fn router() -> Router<SimState> {
    Router::new()
        .route("/sim/reset", post(reset))
        .route("/sim/clock/advance", post(advance_clock))
}

async fn reset(State(state): State<SimState>) -> Json<serde_json::Value> {
    state.with_world(|world| *world = World::default());
    tracing::info!("reset: users, codes, faults, call counts and the clock are forgotten");
    Json(serde_json::json!({}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdvanceClock {
    seconds: u64,
}

#[derive(Debug, Serialize)]
struct ClockAnswer {
    offset_seconds: u64,
}

async fn advance_clock(
    State(state): State<SimState>,
    ControlJson(body): ControlJson<AdvanceClock>,
) -> Json<ClockAnswer> {
    let offset = state.with_world(|world| world.clock.advance(Duration::from_secs(body.seconds)));
    Json(ClockAnswer {
        offset_seconds: offset.as_secs(),
    })
}

pub(crate) async fn no_such_route(method: Method, uri: Uri) -> ControlError {
    ControlError::NotFound(format!("no such route: {method} {}", uri.path()))
}

pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> ControlError {
    ControlError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}
