//! The `Authenticated` extractor: `Authorization: Bearer <token>`, checked by auth-service's
//! `Verify` on every request, before a handler touches business data.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::{CallContext, Identity, TOKEN_MAX};
use crate::error::ApiError;
use crate::metrics::VerifyOutcome;
use crate::middleware::RequestId;
use crate::redact::redacted_debug;
use crate::state::AppState;

/// The raw bearer token of a request (for the auth endpoints that pass it on as it is).
#[derive(Clone)]
pub struct BearerToken(pub String);

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

impl<S: Send + Sync> FromRequestParts<S> for BearerToken {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let missing = || {
            ApiError::unauthorized(
                "token_missing",
                "send the access token as Authorization: Bearer <token>",
            )
        };
        let mut values = parts.headers.get_all(AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Err(missing());
        };
        // Two tokens in one request: which one is the caller is not ours to guess.
        if values.next().is_some() {
            return Err(ApiError::unauthorized(
                "token_invalid",
                "send one Authorization header, not several",
            ));
        }
        let token = value
            .to_str()
            .ok()
            .map(|v| v.split_once(' ').unwrap_or((v, "")))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "token_invalid",
                    "the Authorization header is not `Bearer <token>`",
                )
            })?;
        if token.is_empty() {
            // `Bearer` and no token: a client whose token was empty.
            return Err(missing());
        }
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
#[derive(Clone)]
pub struct Authenticated {
    /// Who the caller is (`phone` is `None`: not asked for).
    pub identity: Identity,
    /// The token it presented.
    pub token: String,
}

redacted_debug!(Authenticated { identity; token });

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

    #[tokio::test]
    async fn the_header_is_one_bearer_token() {
        let code =
            |r: Result<BearerToken, ApiError>| r.map(|t| t.0).map_err(|e| e.code().to_owned());
        assert_eq!(code(bearer("Bearer abc").await), Ok("abc".to_owned()));
        assert_eq!(code(bearer("bearer  abc ").await), Ok("abc".to_owned()));
        for empty in ["Bearer", "Bearer ", "bearer   "] {
            assert_eq!(
                code(bearer(empty).await),
                Err("token_missing".to_owned()),
                "{empty:?}"
            );
        }
        for wrong in ["Basic dXNlcjpwdw==", "abc", "Token abc", ""] {
            assert_eq!(
                code(bearer(wrong).await),
                Err("token_invalid".to_owned()),
                "{wrong:?}"
            );
        }

        // Two headers: refused, whichever is valid.
        let request = Request::builder()
            .header(AUTHORIZATION, "Bearer abc")
            .header(AUTHORIZATION, "Bearer def")
            .body(())
            .expect("a request");
        let (mut parts, ()) = request.into_parts();
        let e = BearerToken::from_request_parts(&mut parts, &())
            .await
            .expect_err("ambiguous");
        assert_eq!(e.code(), "token_invalid");
    }
}
