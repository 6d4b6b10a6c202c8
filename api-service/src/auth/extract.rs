//! The `Authenticated` extractor: `Authorization: Bearer <token>`, checked by auth-service's
//! `Verify` on every request, before a handler touches business data.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::{CallContext, Identity, TOKEN_MAX};
use crate::error::ApiError;
use crate::metrics::VerifyOutcome;
use crate::middleware::RequestId;
use crate::state::AppState;

/// The raw bearer token of a request (for the auth endpoints that pass it on as it is).
#[derive(Debug, Clone)]
pub struct BearerToken(pub String);

impl<S: Send + Sync> FromRequestParts<S> for BearerToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(AUTHORIZATION) else {
            return Err(ApiError::unauthorized(
                "token_missing",
                "send the access token as Authorization: Bearer <token>",
            ));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "token_invalid",
                    "the Authorization header is not `Bearer <token>`",
                )
            })?;
        // What auth-service would answer, without asking it: no token it issues is this
        // long, and a huge one must not weigh on the calls it would share.
        if token.len() > TOKEN_MAX {
            return Err(ApiError::unauthorized(
                "token_invalid",
                "the token is not one auth-service issued",
            ));
        }
        Ok(Self(token.to_owned()))
    }
}

/// A request whose token auth-service has just vouched for.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// Who the caller is (`phone` is `None`: not asked for).
    pub identity: Identity,
    /// The token it presented.
    pub token: String,
}

/// [`Authenticated`], with the user's kept phone number in `identity.phone`, from the same
/// single `Verify` call (`include_phone`): for the routes that show the number.
#[derive(Debug, Clone)]
pub struct AuthenticatedWithPhone(pub Authenticated);

/// Reads the bearer token and has auth-service verify it, counting the outcome.
async fn authenticate(
    parts: &mut Parts,
    state: &AppState,
    include_phone: bool,
) -> Result<Authenticated, ApiError> {
    let BearerToken(token) = BearerToken::from_request_parts(parts, state).await?;
    let ctx = CallContext {
        request_id: RequestId::of(parts),
    };
    let verdict = state.auth.verify(&ctx, &token, include_phone).await;
    state.metrics.verify_outcome(match &verdict {
        Ok(_) => VerifyOutcome::Ok,
        Err(e) if e.status().is_server_error() => VerifyOutcome::Unavailable,
        Err(_) => VerifyOutcome::Refused,
    });
    Ok(Authenticated {
        identity: verdict?,
        token,
    })
}

impl FromRequestParts<AppState> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        authenticate(parts, state, false).await
    }
}

impl FromRequestParts<AppState> for AuthenticatedWithPhone {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        authenticate(parts, state, true).await.map(Self)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::Request;

    use super::*;

    async fn bearer(value: &str) -> Result<BearerToken, ApiError> {
        let request = Request::builder()
            .header(AUTHORIZATION, value)
            .body(())
            .expect("a request");
        let (mut parts, ()) = request.into_parts();
        BearerToken::from_request_parts(&mut parts, &()).await
    }

    #[tokio::test]
    async fn a_token_longer_than_any_issued_is_refused_without_asking() {
        let longest = "a".repeat(TOKEN_MAX);
        let token = bearer(&format!("Bearer {longest}"))
            .await
            .expect("accepted");
        assert_eq!(token.0, longest);
        let e = bearer(&format!("Bearer {longest}a"))
            .await
            .expect_err("refused");
        assert_eq!(e.status(), axum::http::StatusCode::UNAUTHORIZED);
        assert_eq!(e.code(), "token_invalid");
    }
}
