//! Cross-cutting work on every gRPC call, as one tower layer in front of the services:
//! the `x-request-id` (read or made, on every log line of the call, echoed) and the
//! `x-client-key` check of `AUTH_CLIENT_KEYS` (constant time; health and reflection exempt).

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response};
use secrecy::{ExposeSecret, SecretString};
use shared::telemetry::{Call, in_call};
use subtle::ConstantTimeEq;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

use super::status::DOMAIN;

// Names made once: a `&str` name is parsed again on every lookup and insert.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const CLIENT_KEY: HeaderName = HeaderName::from_static("x-client-key");

/// Services any caller may use, whatever `AUTH_CLIENT_KEYS` says.
const OPEN_PREFIXES: [&str; 2] = ["/grpc.health.v1.Health/", "/grpc.reflection."];

/// The layer; cheap to clone.
#[derive(Clone)]
pub struct CallContextLayer {
    client_keys: Arc<Vec<SecretString>>,
}

impl std::fmt::Debug for CallContextLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallContextLayer")
            .field("client_keys", &self.client_keys.len())
            .finish()
    }
}

impl CallContextLayer {
    /// With no keys, every caller is let through.
    pub fn new(client_keys: Vec<SecretString>) -> Self {
        Self {
            client_keys: Arc::new(client_keys),
        }
    }
}

impl<S> Layer<S> for CallContextLayer {
    type Service = CallContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallContext {
            inner,
            client_keys: self.client_keys.clone(),
        }
    }
}

/// The service the layer makes.
#[derive(Clone)]
pub struct CallContext<S> {
    inner: S,
    client_keys: Arc<Vec<SecretString>>,
}

impl<S> std::fmt::Debug for CallContext<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallContext")
    }
}

/// A request id we accept from a caller: 1 to 128 characters of `[A-Za-z0-9._:-]`.
fn well_formed(id: &HeaderValue) -> bool {
    well_formed_id(id.as_bytes())
}

/// [`well_formed`] on the bytes of an id (a `VerifyBatch` item's).
pub(super) fn well_formed_id(b: &[u8]) -> bool {
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

/// A request id for a call that came without a well-formed one: a UUID, formatted on the
/// stack (no `String` on the way to the header value).
fn made_id() -> HeaderValue {
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("-"))
}

/// Whether `given` equals one of `keys`, comparing every key in constant time.
fn key_matches(keys: &[SecretString], given: Option<&HeaderValue>) -> bool {
    let Some(given) = given else {
        return false;
    };
    let given = given.as_bytes();
    keys.iter().fold(false, |found, k| {
        found | bool::from(k.expose_secret().as_bytes().ct_eq(given))
    })
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CallContext<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let request_id = match req.headers().get(&REQUEST_ID) {
            Some(v) if well_formed(v) => v.clone(),
            _ => made_id(),
        };
        // Every line logged while the call is served carries it (a task-local, not a span:
        // `shared::telemetry`).
        let call = Call::new(req.uri().path(), request_id.to_str().unwrap_or("-"));

        let path = req.uri().path();
        let open = OPEN_PREFIXES.iter().any(|p| path.starts_with(p));
        let allowed = open
            || self.client_keys.is_empty()
            || key_matches(&self.client_keys, req.headers().get(&CLIENT_KEY));

        // Take the service that was driven to readiness; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(in_call(call, async move {
            let mut response = if allowed {
                inner.call(req).await?
            } else {
                tracing::warn!("call refused: missing or wrong x-client-key");
                Status::with_error_details(
                    Code::Unauthenticated,
                    "this caller is not allowed: missing or wrong x-client-key",
                    ErrorDetails::with_error_info("CLIENT_KEY_INVALID", DOMAIN, HashMap::new()),
                )
                .into_http::<ResBody>()
            };
            // Unique per call: sent never-indexed, so HPACK does not churn both ends'
            // header tables with it.
            let mut request_id = request_id;
            request_id.set_sensitive(true);
            response.headers_mut().insert(REQUEST_ID, request_id);
            Ok(response)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_checked() {
        assert!(well_formed(&HeaderValue::from_static("abc-123_x.y:z")));
        assert!(!well_formed(&HeaderValue::from_static("")));
        assert!(!well_formed(&HeaderValue::from_static("a b")));
        let long = "a".repeat(129);
        assert!(!well_formed(&HeaderValue::from_str(&long).expect("ascii")));
    }

    #[test]
    fn made_ids_are_well_formed_uuids_and_differ() {
        let (a, b) = (made_id(), made_id());
        assert!(well_formed(&a), "{a:?}");
        assert_ne!(a, b);
        let parsed = a.to_str().ok().and_then(|s| uuid::Uuid::parse_str(s).ok());
        assert_eq!(parsed.map(|u| u.get_version_num()), Some(4), "{a:?}");
    }

    #[test]
    fn any_configured_key_matches_and_nothing_else() {
        let keys = vec![
            SecretString::from("k".repeat(32)),
            SecretString::from("m".repeat(40)),
        ];
        let k = |s: &str| HeaderValue::from_str(s).expect("ascii");
        assert!(key_matches(&keys, Some(&k(&"k".repeat(32)))));
        assert!(key_matches(&keys, Some(&k(&"m".repeat(40)))));
        assert!(!key_matches(&keys, Some(&k(&"k".repeat(31)))));
        assert!(!key_matches(&keys, Some(&k(""))));
        assert!(!key_matches(&keys, None));
    }
}
