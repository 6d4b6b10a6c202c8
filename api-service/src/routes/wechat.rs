//! `POST /v1/wechat/decrypt`: encryptedData from `wx.getWeRunData`, `wx.getShareInfo`, legacy
//! `getPhoneNumber`/`getUserInfo`, decrypted by auth-service (the only holder of the user's
//! session_key) and returned with its watermark checked.

use crate::redact::redacted_debug;
use axum::Extension;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{BearerToken, CallContext};
use crate::error::{ApiError, ErrorEnvelope};
use crate::json::Json;
use crate::middleware::RequestId;
use crate::state::AppState;

/// `POST /v1/wechat/decrypt`'s body, as the mini-program API hands it over.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecryptBody {
    /// `encryptedData`, base64.
    #[serde(default)]
    pub encrypted_data: String,
    /// `iv`, base64 (16 bytes).
    #[serde(default)]
    pub iv: String,
}

redacted_debug!(DecryptBody { ; encrypted_data, iv });

/// The decrypted data.
#[derive(Serialize, ToSchema)]
pub struct Decrypted {
    /// The decrypted JSON object, `watermark` included.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

redacted_debug!(Decrypted { ; data });

/// Decrypt encryptedData with the caller's session_key.
#[utoipa::path(
    post, path = "/v1/wechat/decrypt", tag = "wechat",
    request_body = DecryptBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The decrypted JSON", body = Decrypted),
        (status = 400, description = "invalid_encrypted_data (with field), watermark_mismatch, invalid_request, invalid_json", body = ErrorEnvelope),
        (status = 401, description = "token_missing, token_invalid, token_expired, token_revoked, session_replaced", body = ErrorEnvelope),
        (status = 409, description = "session_key_stale: no session_key held decrypts it; call wx.login and log in again", body = ErrorEnvelope),
        (status = 415, description = "unsupported_media_type", body = ErrorEnvelope),
        (status = 503, description = "auth_unavailable", body = ErrorEnvelope),
    )
)]
pub async fn decrypt(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    BearerToken(token): BearerToken,
    Json(body): Json<DecryptBody>,
) -> Result<axum::Json<Decrypted>, ApiError> {
    let ctx = CallContext { request_id };
    let data = state
        .auth
        .decrypt_data(&ctx, &token, &body.encrypted_data, &body.iv)
        .await?;
    Ok(axum::Json(Decrypted { data }))
}
