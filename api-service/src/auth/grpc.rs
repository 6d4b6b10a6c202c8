//! [`AuthApi`] over tonic. The connection is made on first use and again whenever it drops;
//! every call has a deadline (`API_AUTH_TIMEOUT`), so a dead or hung auth-service turns into a
//! prompt 503 `auth_unavailable`, never a hang and never a 500.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use proto::v1::auth_service_client::AuthServiceClient;
use proto::v1::{self as pb};
use secrecy::{ExposeSecret, SecretString};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Code, Request, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt;
use tower::ServiceExt as _;
use tower::util::MapErr;
use tracing::{error, warn};

use super::batch::Verifier;
use super::{
    AuthApi, AuthResult, CallContext, Device, Identity, PHONE_NOT_SET, PhoneNumber, SessionDevice,
    SessionItem, TokenPair, http_status_for,
};
use crate::error::ApiError;
use crate::metrics::VerifyCalls;
use crate::time::rfc3339;

/// The HTTP/2 connection to auth-service: hyper-util's pooled client (one shared HTTP/2
/// connection, made on first use and again after it drops), its failures turned into
/// `UNAVAILABLE`. A call that a closing connection did not take (auth-service's GOAWAY at
/// `AUTH_MAX_CONNECTION_AGE` or when it drains) is sent again on the next connection, where
/// tonic's `Channel` answered it `UNAVAILABLE`, a 503 for the caller
/// (`tests/e2e/connection_age.rs`); and no `Buffer` task between every call and the
/// connection, one task hop fewer per request of the edge.
pub(super) type Connection = MapErr<
    Client<HttpConnector, tonic::body::Body>,
    fn(hyper_util::client::legacy::Error) -> Status,
>;

/// After this long without a frame from auth-service, the edge sends an HTTP/2 PING.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A PING unanswered this long ends the connection.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A failure to reach auth-service at all (connect, connection lost): `UNAVAILABLE`, as
/// tonic's own channel reports it.
fn unreachable(e: hyper_util::client::legacy::Error) -> Status {
    Status::unavailable(format!("auth-service unreachable: {e}"))
}

/// The HTTP/2 connections to auth-service (`API_AUTH_CONNECTIONS`), each a client of its
/// own with its own pool, used in turn call by call (a `VerifyBatch` is one call). Through a
/// ClusterIP Service each connection goes to the replica kube-proxy picked for it, and
/// kube-proxy spreads connections, not calls: with one connection an edge replica sent all
/// its calls to one auth-service replica (until `AUTH_MAX_CONNECTION_AGE` picked again),
/// however many there were.
pub(super) struct Connections {
    clients: Box<[AuthServiceClient<Connection>]>,
    next: AtomicUsize,
}

impl Connections {
    /// The client of the next connection in turn.
    pub(super) fn next(&self) -> AuthServiceClient<Connection> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.clients.len();
        self.clients[i].clone()
    }
}

/// One HTTP/2 connection's client, made on first use and again after it drops.
fn connection(timeout: Duration) -> Connection {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeout.min(Duration::from_secs(2))));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(30)));
    let http = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .timer(TokioTimer::new())
        // A peer that stopped answering without closing (its node lost, a network
        // partition) is left KEEP_ALIVE + KEEP_ALIVE_TIMEOUT after its last frame, idle
        // or not, and the next call connects again (through a Service, to a live
        // replica); until then every call on it ends at its deadline, 503. A busy
        // connection reads frames all the time and sends no pings.
        .http2_keep_alive_interval(KEEP_ALIVE)
        .http2_keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        // Kept while idle, as a channel would: a quiet minute must not cost the next
        // request a new connection.
        .pool_idle_timeout(None)
        .build(connector);
    http.map_err(unreachable as fn(_) -> Status)
}

/// The gRPC client of auth-service.
#[derive(Clone)]
pub struct GrpcAuth {
    clients: Arc<Connections>,
    /// `Verify` calls, batched when they come together.
    pub(super) verifier: Arc<Verifier>,
    health: HealthClient<Connection>,
    client_key: Option<MetadataValue<tonic::metadata::Ascii>>,
    /// Deadline of a call that stays inside auth-service (Verify, Refresh, ...).
    timeout: Duration,
    /// Deadline of a call that waits on WeChat (Login, GetPhoneNumber).
    wechat_timeout: Duration,
}

impl std::fmt::Debug for GrpcAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcAuth")
            .field("client_key", &self.client_key.as_ref().map(|_| "<set>"))
            .finish_non_exhaustive()
    }
}

impl GrpcAuth {
    /// A client of `url` that does not connect until first used. Every call has a deadline:
    /// `timeout` for calls answered by auth-service alone, `wechat_timeout` for the calls
    /// that wait on WeChat (a login may take two WeChat round trips). Calls go over
    /// `connections` HTTP/2 connections (at least one) in turn. The calls made for `Verify`
    /// are counted in `calls`.
    pub fn new(
        url: &str,
        timeout: Duration,
        wechat_timeout: Duration,
        client_key: Option<&SecretString>,
        connections: usize,
        calls: VerifyCalls,
    ) -> anyhow::Result<Self> {
        let origin: tonic::codegen::http::Uri = url.parse()?;
        let each: Vec<Connection> = (0..connections.max(1))
            .map(|_| connection(timeout))
            .collect();
        let client_key = match client_key {
            Some(k) => {
                let mut key: MetadataValue<Ascii> = k
                    .expose_secret()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("API_AUTH_CLIENT_KEY is not valid metadata"))?;
                // Never in a header map's Debug output, never in HPACK's table.
                key.set_sensitive(true);
                Some(key)
            }
            None => None,
        };
        // Readiness asks over the first connection: whether auth-service answers at all.
        let health = HealthClient::with_origin(each[0].clone(), origin.clone());
        let clients = Arc::new(Connections {
            clients: each
                .into_iter()
                .map(|c| AuthServiceClient::with_origin(c, origin.clone()))
                .collect(),
            next: AtomicUsize::new(0),
        });
        Ok(Self {
            verifier: Arc::new(Verifier::new(
                clients.clone(),
                client_key.clone(),
                timeout,
                calls,
            )),
            clients,
            health,
            client_key,
            timeout,
            wechat_timeout,
        })
    }

    fn request<T>(&self, ctx: &CallContext, message: T) -> Request<T> {
        self.request_within(ctx, message, self.timeout)
    }

    /// A request with the metadata every call carries and `deadline` as its grpc-timeout
    /// (auth-service stops working on it past that).
    fn request_within<T>(&self, ctx: &CallContext, message: T, deadline: Duration) -> Request<T> {
        request_with(message, deadline, self.client_key.as_ref(), &ctx.request_id)
    }
}

/// A request of `message` with `deadline` as its grpc-timeout, our client key, and the
/// request id.
pub(super) fn request_with<T>(
    message: T,
    deadline: Duration,
    client_key: Option<&MetadataValue<tonic::metadata::Ascii>>,
    request_id: &str,
) -> Request<T> {
    let mut req = Request::new(message);
    req.set_timeout(deadline);
    if let Some(key) = client_key {
        req.metadata_mut().insert("x-client-key", key.clone());
    }
    if let Ok(mut id) = request_id.parse::<MetadataValue<tonic::metadata::Ascii>>() {
        // Unique per request: HPACK would add it to both ends' header tables and evict
        // others for nothing; sent never-indexed instead.
        id.set_sensitive(true);
        req.metadata_mut().insert("x-request-id", id);
    }
    req
}

/// Runs one call under `deadline` on this side too: a hung connection must not hang the
/// request (the grpc-timeout header alone relies on the server).
async fn within<T>(
    ctx: &CallContext,
    deadline: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> AuthResult<T> {
    match tokio::time::timeout(deadline, call).await {
        Ok(answer) => answer
            .map(tonic::Response::into_inner)
            .map_err(|status| to_api_error(status, ctx)),
        Err(_) => Err(to_api_error(
            Status::deadline_exceeded("auth-service did not answer in time"),
            ctx,
        )),
    }
}

/// Turns a failed call into the contract's answer: auth-service's verdicts by their reason,
/// everything else (no connection, deadline, an unknown or internal reason) as 503
/// `auth_unavailable`, so that a failure of auth-service never becomes an allow or a 500.
/// A failure is logged with the request's id.
fn to_api_error(status: Status, ctx: &CallContext) -> ApiError {
    let info = status.get_details_error_info();
    let mapped = info
        .as_ref()
        .and_then(|i| http_status_for(&i.reason).map(|m| (i, m)));
    let Some((info, (http, code))) = mapped else {
        match info.as_ref().map(|i| i.reason.as_str()) {
            Some("CLIENT_KEY_INVALID") => {
                error!(
                    request_id = ctx.request_id,
                    "auth-service refuses our client key: check API_AUTH_CLIENT_KEY against AUTH_CLIENT_KEYS"
                );
            }
            _ if matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
            ) =>
            {
                warn!(request_id = ctx.request_id, grpc_code = ?status.code(),
                    "auth-service unreachable or too slow");
            }
            _ => {
                error!(request_id = ctx.request_id, grpc_code = ?status.code(),
                    message = %status.message(), "auth-service failed")
            }
        }
        return ApiError::auth_unavailable(anyhow::anyhow!(
            "auth-service: {:?}: {}",
            status.code(),
            status.message()
        ));
    };
    let mut e = if http == axum::http::StatusCode::UNAUTHORIZED {
        ApiError::unauthorized(code, status.message())
    } else {
        ApiError::new(http, code, status.message())
    };
    if let Some(field) = info.metadata.get("field") {
        e = e.with_field(field.clone());
    }
    if let Some(errcode) = info
        .metadata
        .get("wechat_errcode")
        .and_then(|c| c.parse().ok())
    {
        let errmsg = info
            .metadata
            .get("wechat_errmsg")
            .cloned()
            .unwrap_or_default();
        e = e.with_wechat(errcode, errmsg);
    }
    if let Some(secs) = info
        .metadata
        .get("retry_after_secs")
        .and_then(|s| s.parse().ok())
    {
        e = e.retry_after(secs);
    } else if http.is_server_error() && http != axum::http::StatusCode::BAD_GATEWAY {
        // Not on 502 `wechat_error`: the app's credentials or IP whitelist, which no retry
        // mends, and a Retry-After would invite clients to hammer it.
        e = e.retry_after(1);
    }
    e
}

fn millis(t: Option<&prost_types::Timestamp>) -> i64 {
    t.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn pair(p: Option<pb::TokenPair>, openid: String, is_new_user: bool) -> AuthResult<TokenPair> {
    let p =
        p.ok_or_else(|| ApiError::auth_unavailable(anyhow::anyhow!("answer without tokens")))?;
    Ok(TokenPair {
        access_token: p.access_token,
        token_type: p.token_type,
        expires_in: p.expires_in,
        refresh_token: p.refresh_token,
        refresh_expires_in: p.refresh_expires_in,
        openid,
        is_new_user,
    })
}

fn phone_number(p: pb::GetPhoneNumberResponse) -> PhoneNumber {
    PhoneNumber {
        phone_number: p.phone_number,
        pure_phone_number: p.pure_phone_number,
        country_code: p.country_code,
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[async_trait]
impl AuthApi for GrpcAuth {
    async fn verify(
        &self,
        ctx: &CallContext,
        access_token: &str,
        include_phone: bool,
    ) -> AuthResult<Identity> {
        let request = pb::VerifyRequest {
            access_token: access_token.to_owned(),
            include_phone,
        };
        let r = self
            .verifier
            .verify(request, &ctx.request_id)
            .await
            .map_err(|status| to_api_error(status, ctx))?;
        Ok(Identity {
            openid: r.openid,
            unionid: r.unionid,
            session_id: r.session_id,
            // Only what was asked for: an answer never widens what a route shows.
            phone: r.phone.filter(|_| include_phone).map(phone_number),
        })
    }

    async fn login(
        &self,
        ctx: &CallContext,
        code: &str,
        device: Option<Device>,
        client_ip: &str,
    ) -> AuthResult<TokenPair> {
        let req = self.request_within(
            ctx,
            pb::LoginRequest {
                code: code.to_owned(),
                device: device.map(|d| pb::Device {
                    id: d.id.unwrap_or_default(),
                    platform: d.platform.unwrap_or_default(),
                    model: d.model.unwrap_or_default(),
                }),
                client_ip: client_ip.to_owned(),
            },
            self.wechat_timeout,
        );
        let r = within(ctx, self.wechat_timeout, self.clients.next().login(req)).await?;
        pair(r.tokens, r.openid, r.is_new_user)
    }

    async fn refresh(&self, ctx: &CallContext, refresh_token: &str) -> AuthResult<TokenPair> {
        let req = self.request(
            ctx,
            pb::RefreshRequest {
                refresh_token: refresh_token.to_owned(),
            },
        );
        let r = within(ctx, self.timeout, self.clients.next().refresh(req)).await?;
        pair(r.tokens, r.openid, false)
    }

    async fn logout(&self, ctx: &CallContext, access_token: &str, all: bool) -> AuthResult<u32> {
        let req = self.request(
            ctx,
            pb::LogoutRequest {
                access_token: access_token.to_owned(),
                all,
            },
        );
        let r = within(ctx, self.timeout, self.clients.next().logout(req)).await?;
        Ok(r.revoked_sessions)
    }

    async fn list_sessions(
        &self,
        ctx: &CallContext,
        access_token: &str,
    ) -> AuthResult<Vec<SessionItem>> {
        let req = self.request(
            ctx,
            pb::ListSessionsRequest {
                access_token: access_token.to_owned(),
            },
        );
        let r = within(ctx, self.timeout, self.clients.next().list_sessions(req)).await?;
        Ok(r.sessions
            .into_iter()
            .map(|s| {
                let d = s.device.unwrap_or_default();
                SessionItem {
                    session_id: s.session_id,
                    device: SessionDevice {
                        id: non_empty(d.id),
                        platform: non_empty(d.platform),
                        model: non_empty(d.model),
                    },
                    created_at: rfc3339(millis(s.created_at.as_ref())),
                    last_active_at: rfc3339(millis(s.last_active_at.as_ref())),
                    current: s.current,
                }
            })
            .collect())
    }

    async fn decrypt_data(
        &self,
        ctx: &CallContext,
        access_token: &str,
        encrypted_data: &str,
        iv: &str,
    ) -> AuthResult<serde_json::Value> {
        let req = self.request(
            ctx,
            pb::DecryptDataRequest {
                access_token: access_token.to_owned(),
                encrypted_data: encrypted_data.to_owned(),
                iv: iv.to_owned(),
            },
        );
        let r = within(ctx, self.timeout, self.clients.next().decrypt_data(req)).await?;
        // The error names where, never what: the text is the user's decrypted data.
        serde_json::from_str(&r.data_json).map_err(|e| {
            ApiError::auth_unavailable(anyhow::anyhow!(
                "DecryptData gave no JSON ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ))
        })
    }

    async fn phone_number(
        &self,
        ctx: &CallContext,
        access_token: &str,
        code: &str,
    ) -> AuthResult<Option<PhoneNumber>> {
        // Reading the stored number stays inside auth-service; exchanging a code waits on WeChat.
        let deadline = if code.is_empty() {
            self.timeout
        } else {
            self.wechat_timeout
        };
        let req = self.request_within(
            ctx,
            pb::GetPhoneNumberRequest {
                access_token: access_token.to_owned(),
                code: code.to_owned(),
            },
            deadline,
        );
        let answer = tokio::time::timeout(deadline, self.clients.next().get_phone_number(req))
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(
                    "auth-service did not answer in time",
                ))
            });
        match answer {
            Ok(r) => Ok(Some(phone_number(r.into_inner()))),
            Err(status)
                if status
                    .get_details_error_info()
                    .is_some_and(|i| i.reason == PHONE_NOT_SET) =>
            {
                Ok(None)
            }
            Err(status) => Err(to_api_error(status, ctx)),
        }
    }

    async fn ready(&self) -> bool {
        // Under the same deadline as every other call: an auth-service that holds the
        // connection but does not answer is not ready, and /readyz says so in time.
        let mut request = Request::new(HealthCheckRequest {
            service: String::new(),
        });
        request.set_timeout(self.timeout);
        let answer = tokio::time::timeout(self.timeout, self.health.clone().check(request)).await;
        matches!(answer, Ok(Ok(r)) if r.get_ref().status() == ServingStatus::Serving)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use axum::http::StatusCode;
    use tonic_types::ErrorDetails;

    use super::*;

    fn status(code: Code, reason: &str, meta: &[(&str, &str)]) -> Status {
        let meta: HashMap<String, String> = meta
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        Status::with_error_details(
            code,
            "msg",
            ErrorDetails::with_error_info(reason, "wxauth", meta),
        )
    }

    /// The answer `e` becomes: its status, its `Retry-After` and its body as the contract
    /// shows it (rendered as the middleware does, with request id `r1`).
    fn answer(e: ApiError) -> (StatusCode, Option<String>, serde_json::Value) {
        use axum::response::IntoResponse as _;
        let response = e.into_response();
        let retry_after = response
            .headers()
            .get(axum::http::header::RETRY_AFTER)
            .map(|v| v.to_str().expect("a Retry-After in ASCII").to_owned());
        let pending = response
            .extensions()
            .get::<crate::error::PendingError>()
            .expect("an error body for the middleware");
        let body = crate::error::render(pending.body.clone(), "r1");
        let body = serde_json::from_slice(&body).expect("a JSON body");
        (response.status(), retry_after, body)
    }

    #[test]
    fn wechat_details_and_retry_after_are_carried() {
        let ctx = CallContext::default();
        let (http, _, body) = answer(to_api_error(
            status(
                Code::ResourceExhausted,
                "WECHAT_RATE_LIMITED",
                &[("wechat_errcode", "45011"), ("wechat_errmsg", "slow down")],
            ),
            &ctx,
        ));
        assert_eq!(http, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body["error"]["code"], "wechat_rate_limited");
        assert_eq!(
            body["error"]["wechat"],
            serde_json::json!({"errcode": 45011, "errmsg": "slow down"}),
            "{body}"
        );

        let (http, retry_after, body) = answer(to_api_error(
            status(
                Code::ResourceExhausted,
                "RATE_LIMITED",
                &[("retry_after_secs", "7")],
            ),
            &ctx,
        ));
        assert_eq!(http, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body["error"]["code"], "rate_limited");
        assert_eq!(retry_after.as_deref(), Some("7"));
        // Not WeChat's doing: no wechat member at all.
        assert!(body["error"].get("wechat").is_none(), "{body}");
    }

    #[test]
    fn a_retry_after_comes_with_503_but_not_with_502() {
        use axum::response::IntoResponse as _;
        let retry_after = |s: Status| {
            let e = to_api_error(s, &CallContext::default());
            let status = e.status();
            let response = e.into_response();
            (status, response.headers().get("retry-after").cloned())
        };

        let credentials = retry_after(status(
            Code::FailedPrecondition,
            "WECHAT_ERROR",
            &[
                ("wechat_errcode", "40013"),
                ("wechat_errmsg", "invalid appid"),
            ],
        ));
        let busy = retry_after(status(Code::Unavailable, "WECHAT_BUSY", &[]));

        assert_eq!(credentials, (StatusCode::BAD_GATEWAY, None));
        assert_eq!(busy.0, StatusCode::SERVICE_UNAVAILABLE);
        assert!(busy.1.is_some(), "{busy:?}");
    }

    #[test]
    fn failures_of_auth_service_are_503_never_500() {
        for s in [
            Status::unavailable("connection refused"),
            Status::deadline_exceeded("slow"),
            status(Code::Internal, "INTERNAL", &[]),
            status(Code::Unavailable, "UNAVAILABLE", &[]),
            status(Code::Unauthenticated, "CLIENT_KEY_INVALID", &[]),
            Status::unknown("no details at all"),
        ] {
            let e = to_api_error(s, &CallContext::default());
            assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(e.code(), "auth_unavailable");
        }
    }
}
