//! Cross-cutting work on every gRPC call, as one tower layer in front of the services:
//! the `x-request-id` (read or made, on every log line of the call, echoed) and the
//! `x-client-key` check of `AUTH_CLIENT_KEYS` and `AUTH_OPERATOR_KEYS` (constant time; health
//! and reflection exempt).

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
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_STATUS_DETAILS: HeaderName = HeaderName::from_static("grpc-status-details-bin");

/// Services any caller may use, whatever `AUTH_CLIENT_KEYS` says.
const OPEN_PREFIXES: [&str; 2] = ["/grpc.health.v1.Health/", "/grpc.reflection."];

/// The operators' RPCs: with `AUTH_OPERATOR_KEYS` set, only its keys may call them (the
/// edge's key, on an internet-facing process, then cannot revoke users, read timelines or
/// take the app's WeChat access_token).
const OPERATOR_METHODS: [&str; 3] = [
    "/wxauth.v1.AuthService/RevokeUser",
    "/wxauth.v1.AuthService/ListSessionEvents",
    "/wxauth.v1.AuthService/GetWechatAccessToken",
];

/// The keys callers present.
#[derive(Default)]
pub struct Keys {
    /// `AUTH_CLIENT_KEYS`: none, and any caller may call (but the operators' RPCs, while
    /// there are operator keys).
    pub clients: Vec<SecretString>,
    /// `AUTH_OPERATOR_KEYS`: none, and the operators' RPCs take client keys.
    pub operators: Vec<SecretString>,
}

/// What the keys say of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allowed,
    /// No key, or one of neither list.
    Unknown,
    /// A client's key, for an operators' RPC.
    NotAnOperator,
}

impl Keys {
    fn judge(&self, path: &str, given: Option<&HeaderValue>) -> Verdict {
        if OPEN_PREFIXES.iter().any(|p| path.starts_with(p)) {
            return Verdict::Allowed;
        }
        let operator = !self.operators.is_empty() && key_matches(&self.operators, given);
        if !self.operators.is_empty() && OPERATOR_METHODS.contains(&path) {
            return if operator {
                Verdict::Allowed
            } else if self.clients.is_empty() || key_matches(&self.clients, given) {
                Verdict::NotAnOperator
            } else {
                Verdict::Unknown
            };
        }
        if operator || self.clients.is_empty() || key_matches(&self.clients, given) {
            Verdict::Allowed
        } else {
            Verdict::Unknown
        }
    }
}

/// The layer; cheap to clone.
#[derive(Clone)]
pub struct CallContextLayer {
    keys: Arc<Keys>,
}

impl std::fmt::Debug for CallContextLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallContextLayer")
            .field("client_keys", &self.keys.clients.len())
            .field("operator_keys", &self.keys.operators.len())
            .finish()
    }
}

impl CallContextLayer {
    /// With no keys, every caller is let through.
    pub fn new(keys: Keys) -> Self {
        Self {
            keys: Arc::new(keys),
        }
    }
}

impl<S> Layer<S> for CallContextLayer {
    type Service = CallContext<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallContext {
            inner,
            keys: self.keys.clone(),
        }
    }
}

/// The service the layer makes.
#[derive(Clone)]
pub struct CallContext<S> {
    inner: S,
    keys: Arc<Keys>,
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

/// tonic's own refusals, made before any handler runs, in the contract's shape: a failure
/// whose status is in the response headers (a trailers-only response) without a
/// `grpc-status-details-bin`, which every failure of ours carries. `None` for anything else
/// (one header look-up: an answer's status comes in its trailers).
///
/// - INTERNAL: the request could not be decoded (a field that is not valid protobuf or not
///   UTF-8, a compressed message without compression): bad input, so INVALID_ARGUMENT with
///   reason `INVALID_ARGUMENT`;
/// - anything else (UNIMPLEMENTED for an unknown method, …) keeps its code, with the code's
///   name as its reason.
fn explained(headers: &http::HeaderMap) -> Option<Status> {
    // An answer's status is in its trailers; our own failures carry details.
    if !headers.contains_key(GRPC_STATUS) || headers.contains_key(GRPC_STATUS_DETAILS) {
        return None;
    }
    let status = Status::from_header_map(headers)?;
    if status.code() == Code::Ok || !status.details().is_empty() {
        return None;
    }
    let (code, message) = match status.code() {
        Code::Internal => {
            tracing::warn!(error = status.message(), "a request tonic could not read");
            (
                Code::InvalidArgument,
                format!("the request cannot be read: {}", status.message()),
            )
        }
        code => (code, status.message().to_owned()),
    };
    Some(Status::with_error_details(
        code,
        message,
        ErrorDetails::with_error_info(code_name(code), DOMAIN, HashMap::new()),
    ))
}

/// A gRPC code's name, as the reason of a failure that has no reason of its own.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
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

        let verdict = self
            .keys
            .judge(req.uri().path(), req.headers().get(&CLIENT_KEY));

        // Take the service that was driven to readiness; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(in_call(call, async move {
            let mut response = match verdict {
                Verdict::Allowed => {
                    let response = inner.call(req).await?;
                    match explained(response.headers()) {
                        None => response,
                        Some(status) => status.into_http::<ResBody>(),
                    }
                }
                Verdict::Unknown => {
                    tracing::warn!("call refused: missing or wrong x-client-key");
                    Status::with_error_details(
                        Code::Unauthenticated,
                        "this caller is not allowed: missing or wrong x-client-key",
                        ErrorDetails::with_error_info("CLIENT_KEY_INVALID", DOMAIN, HashMap::new()),
                    )
                    .into_http::<ResBody>()
                }
                Verdict::NotAnOperator => {
                    tracing::warn!("call refused: an operators' RPC with a client's key");
                    Status::with_error_details(
                        Code::PermissionDenied,
                        "this RPC needs a key of AUTH_OPERATOR_KEYS",
                        ErrorDetails::with_error_info(
                            "OPERATOR_KEY_REQUIRED",
                            DOMAIN,
                            HashMap::new(),
                        ),
                    )
                    .into_http::<ResBody>()
                }
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
    fn operator_keys_alone_open_the_operators_rpcs_and_every_other() {
        let k = |s: &str| HeaderValue::from_str(s).expect("ascii");
        let (client, operator) = ("c".repeat(32), "o".repeat(32));
        let keys = Keys {
            clients: vec![SecretString::from(client.clone())],
            operators: vec![SecretString::from(operator.clone())],
        };
        let revoke = "/wxauth.v1.AuthService/RevokeUser";
        let verify = "/wxauth.v1.AuthService/Verify";
        for method in OPERATOR_METHODS {
            assert_eq!(keys.judge(method, Some(&k(&operator))), Verdict::Allowed);
            assert_eq!(
                keys.judge(method, Some(&k(&client))),
                Verdict::NotAnOperator
            );
            assert_eq!(keys.judge(method, None), Verdict::Unknown);
        }
        assert_eq!(keys.judge(verify, Some(&k(&client))), Verdict::Allowed);
        assert_eq!(keys.judge(verify, Some(&k(&operator))), Verdict::Allowed);
        assert_eq!(
            keys.judge(verify, Some(&k(&"x".repeat(32)))),
            Verdict::Unknown
        );
        assert_eq!(
            keys.judge("/grpc.health.v1.Health/Check", None),
            Verdict::Allowed
        );

        // Without operator keys, client keys open everything, as before.
        let clients_only = Keys {
            clients: vec![SecretString::from(client.clone())],
            operators: Vec::new(),
        };
        assert_eq!(
            clients_only.judge(revoke, Some(&k(&client))),
            Verdict::Allowed
        );
        assert_eq!(clients_only.judge(revoke, None), Verdict::Unknown);
        // Without client keys (development), the operators' RPCs still need an operator's.
        let operators_only = Keys {
            clients: Vec::new(),
            operators: vec![SecretString::from(operator)],
        };
        assert_eq!(operators_only.judge(verify, None), Verdict::Allowed);
        assert_eq!(operators_only.judge(revoke, None), Verdict::NotAnOperator);
    }

    #[test]
    fn tonics_own_refusals_get_the_contracts_shape_and_ours_are_kept() {
        let reason = |status: &Status| {
            status
                .get_details_error_info()
                .map(|info| info.reason)
                .unwrap_or_default()
        };
        let headers = |status: Status| status.into_http::<()>().headers().clone();

        // Act
        let undecodable = explained(&headers(Status::internal(
            "failed to decode Protobuf message: VerifyRequest.access_token: invalid string",
        )));
        let unknown = explained(&headers(Status::unimplemented("")));
        let ours = explained(&headers(Status::with_error_details(
            Code::Unauthenticated,
            "expired",
            ErrorDetails::with_error_info("TOKEN_EXPIRED", DOMAIN, HashMap::new()),
        )));
        let answer = explained(&http::HeaderMap::new());

        // Assert
        let undecodable = undecodable.expect("rewritten");
        assert_eq!(undecodable.code(), Code::InvalidArgument);
        assert_eq!(reason(&undecodable), "INVALID_ARGUMENT");
        assert!(
            undecodable.message().contains("invalid string"),
            "{undecodable:?}"
        );
        let unknown = unknown.expect("rewritten");
        assert_eq!(
            (unknown.code(), reason(&unknown).as_str()),
            (Code::Unimplemented, "UNIMPLEMENTED")
        );
        assert!(ours.is_none(), "a failure of ours is left as it is");
        assert!(answer.is_none(), "an answer is left as it is");
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
