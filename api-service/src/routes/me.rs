//! `/v1/me`: the caller's profile, readable and writable by its owner only.

use crate::redact::redacted_debug;
use axum::Extension;
use axum::extract::State;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use crate::auth::{Authenticated, AuthenticatedWithPhone, CallContext, Identity, PhoneNumber};
use crate::error::{ApiError, ErrorEnvelope};
use crate::json::Json;
use crate::middleware::RequestId;
use crate::profile::{AvatarUrl, Nickname, Profile, ProfilePatch};
use crate::state::AppState;
use crate::time::Rfc3339;

/// The caller's profile.
#[derive(Serialize, ToSchema)]
pub struct Me {
    /// The user's openid.
    pub openid: String,
    /// The user's unionid, or null.
    #[schema(required = true)]
    pub unionid: Option<String>,
    /// The nickname, or null.
    #[schema(required = true)]
    pub nickname: Option<String>,
    /// The avatar URL, or null.
    #[schema(required = true)]
    pub avatar_url: Option<String>,
    /// The phone number, or null until set through `POST /v1/me/phone`.
    #[schema(required = true)]
    pub phone_number: Option<String>,
    /// When the profile was first seen (RFC 3339, UTC).
    #[schema(value_type = String)]
    pub created_at: Rfc3339,
    /// When it last changed (RFC 3339, UTC).
    #[schema(value_type = String)]
    pub updated_at: Rfc3339,
}

redacted_debug!(Me {
    openid, unionid, nickname, avatar_url, created_at, updated_at;
    phone_number
});

/// `PATCH /v1/me`'s body: a field left out is unchanged, a `null` clears it.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MePatch {
    /// 1 to 64 characters, any script.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub nickname: Option<Option<String>>,
    /// `https://` only, at most 1,024 characters.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub avatar_url: Option<Option<String>>,
}

/// Tells a field sent as `null` (`Some(None)`) from one left out (`None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// The answer: the profile, with what `Verify` said of the user (unionid, phone number).
fn me(identity: Identity, p: Profile) -> Me {
    Me {
        openid: p.openid,
        unionid: identity.unionid,
        nickname: p.nickname,
        avatar_url: p.avatar_url,
        phone_number: identity.phone.map(|p| p.phone_number),
        created_at: Rfc3339(p.created_at),
        updated_at: Rfc3339(p.updated_at),
    }
}

/// The caller's profile.
#[utoipa::path(
    get, path = "/v1/me", tag = "profile",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The profile", body = Me),
        (status = 401, description = "token_missing, token_invalid, token_expired, token_revoked, session_replaced", body = ErrorEnvelope),
        (status = 503, description = "auth_unavailable, unavailable", body = ErrorEnvelope),
    )
)]
pub async fn get_me(
    State(state): State<AppState>,
    AuthenticatedWithPhone(auth): AuthenticatedWithPhone,
) -> Result<axum::Json<Me>, ApiError> {
    // The number is only ever read inside auth-service: the one `Verify` call answered it.
    let profile = state.profiles.get_or_create(&auth.identity.openid).await?;
    Ok(axum::Json(me(auth.identity, profile)))
}

/// Change the caller's nickname or avatar.
#[utoipa::path(
    patch, path = "/v1/me", tag = "profile",
    request_body = MePatch,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The profile after the change", body = Me),
        (status = 400, description = "invalid_argument (with field), invalid_request, invalid_json", body = ErrorEnvelope),
        (status = 401, description = "token_missing, token_invalid, token_expired, token_revoked, session_replaced", body = ErrorEnvelope),
        (status = 415, description = "unsupported_media_type", body = ErrorEnvelope),
        (status = 503, description = "auth_unavailable, unavailable", body = ErrorEnvelope),
    )
)]
pub async fn patch_me(
    State(state): State<AppState>,
    AuthenticatedWithPhone(auth): AuthenticatedWithPhone,
    Json(body): Json<MePatch>,
) -> Result<axum::Json<Me>, ApiError> {
    let patch = ProfilePatch {
        nickname: body
            .nickname
            .map(|n| n.as_deref().map(Nickname::parse).transpose())
            .transpose()?,
        avatar_url: body
            .avatar_url
            .map(|a| a.as_deref().map(AvatarUrl::parse).transpose())
            .transpose()?,
    };
    // A patch that names no field changes nothing, `updated_at` included.
    let profile = if patch.nickname.is_none() && patch.avatar_url.is_none() {
        state.profiles.get_or_create(&auth.identity.openid).await?
    } else {
        state.profiles.update(&auth.identity.openid, patch).await?
    };
    Ok(axum::Json(me(auth.identity, profile)))
}

/// `POST /v1/me/phone`'s body.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PhoneBody {
    /// The code from `<button open-type="getPhoneNumber">` (not the wx.login code); missing,
    /// empty, `null` or not a string: 400 `invalid_code`, and auth-service is not asked for a
    /// number.
    #[serde(default, deserialize_with = "crate::json::code")]
    #[schema(value_type = Option<String>)]
    pub code: Option<String>,
}

redacted_debug!(PhoneBody { ; code });

/// Confirm the caller's phone number with the code of the getPhoneNumber button.
#[utoipa::path(
    post, path = "/v1/me/phone", tag = "profile",
    request_body = PhoneBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The number, kept with the profile and shown to its owner only", body = PhoneNumber),
        (status = 400, description = "invalid_code, code_used, wechat_invalid_code, wechat_code_used, invalid_request, invalid_json", body = ErrorEnvelope),
        (status = 401, description = "token_missing, token_invalid, token_expired, token_revoked, session_replaced", body = ErrorEnvelope),
        (status = 403, description = "wechat_risky_user", body = ErrorEnvelope),
        (status = 415, description = "unsupported_media_type", body = ErrorEnvelope),
        (status = 429, description = "rate_limited (with Retry-After: the user's AUTH_PHONE_RATE), wechat_rate_limited", body = ErrorEnvelope),
        (status = 502, description = "wechat_error", body = ErrorEnvelope),
        (status = 503, description = "wechat_busy, wechat_unavailable, auth_unavailable", body = ErrorEnvelope),
    )
)]
pub async fn post_phone(
    State(state): State<AppState>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    auth: Authenticated,
    Json(body): Json<PhoneBody>,
) -> Result<axum::Json<PhoneNumber>, ApiError> {
    // To auth-service an empty code means "the number already kept": never what this
    // route was asked, so a client that sent none is told so, as a login without one is.
    let Some(code) = body.code.filter(|c| !c.is_empty()) else {
        return Err(ApiError::invalid(
            "code",
            "invalid_code",
            "code is missing, empty or not a string: send the code of the getPhoneNumber button",
        ));
    };
    if let Some(problem) = shared::code_problem(&code) {
        return Err(ApiError::malformed_code(problem));
    }
    let ctx = CallContext { request_id };
    let phone = state
        .auth
        .phone_number(&ctx, &auth.token, &code)
        .await?
        .ok_or_else(|| {
            ApiError::auth_unavailable(anyhow::anyhow!(
                "GetPhoneNumber with a code answered no number"
            ))
        })?;
    Ok(axum::Json(phone))
}
