//! The tonic service: wire types in, domain calls, wire types out, each call counted in the
//! metrics by method and outcome. No rule lives here.

mod layer;
mod status;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::{join, join_all};
use proto::v1::auth_service_server::AuthService;
use proto::v1::{self as pb};
use shared::telemetry::{Call, in_call, to_completion};
use tonic::{Request, Response, Status};

use crate::domain::{Device, Invalid, Millis, WechatCode, now_millis};
use crate::error::AuthError;
use crate::metrics::{self, Metrics};
use crate::service::{AuthCore, IssuedPair, ReadAhead};
use crate::wechat::PhoneNumber;

pub use layer::{CallContextLayer, Keys as CallerKeys};
pub use proto::v1::auth_service_server::AuthServiceServer;
pub use status::DOMAIN;

/// The most items one `VerifyBatch` may carry.
pub const VERIFY_BATCH_MAX: usize = 1000;

/// The time a `VerifyBatch` keeps for its answer to travel back, out of the caller's
/// `grpc-timeout`: a fifth of it, at most this. (Giving up a database read is not free:
/// sqlx then logs the slow statement, formatted, which took 150-250 ms in a debug build.)
const BATCH_ANSWER_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

/// When the items of a `VerifyBatch` must be answered by: a margin before the caller's
/// `grpc-timeout` (`None` without one). An item still waiting then (its session read from a
/// stalled database) is answered UNAVAILABLE on its own, so the items already answered
/// (from memory, say) reach their requests instead of the whole call running out.
fn batch_items_deadline(
    metadata: &tonic::metadata::MetadataMap,
    started: Instant,
) -> Option<tokio::time::Instant> {
    let timeout = grpc_timeout(metadata.get("grpc-timeout")?.to_str().ok()?)?;
    let margin = (timeout / 5).min(BATCH_ANSWER_MARGIN);
    Some(tokio::time::Instant::from_std(started) + timeout.saturating_sub(margin))
}

/// A `grpc-timeout` header's value (gRPC over HTTP/2: at most 8 digits, then `H`, `M`, `S`,
/// `m`, `u` or `n`); `None` when malformed.
fn grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let unit_at = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(unit_at);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `AuthService` over gRPC.
#[derive(Debug, Clone)]
pub struct GrpcAuth {
    core: AuthCore,
    metrics: Arc<Metrics>,
}

impl GrpcAuth {
    /// Serves `core`, counting every call in `metrics`.
    pub fn new(core: AuthCore, metrics: Arc<Metrics>) -> Self {
        Self { core, metrics }
    }
}

fn timestamp(ms: Millis) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        // 0..=999_999_000: always fits.
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// Whole seconds from `now` to `until`, rounded to the nearest (never negative).
fn seconds_left(until: Millis, now: Millis) -> i64 {
    until.saturating_sub(now).max(0).saturating_add(500) / 1000
}

fn token_pair(p: &IssuedPair) -> pb::TokenPair {
    let now = now_millis();
    pb::TokenPair {
        access_token: p.access.expose().to_owned(),
        token_type: "Bearer".to_owned(),
        expires_in: seconds_left(p.access_expires_at, now),
        refresh_token: p.refresh.expose().to_owned(),
        refresh_expires_in: seconds_left(p.refresh_expires_at, now),
        access_expires_at: Some(timestamp(p.access_expires_at)),
        refresh_expires_at: Some(timestamp(p.refresh_expires_at)),
    }
}

fn device_pb(d: &Device) -> pb::Device {
    pb::Device {
        id: d.id().unwrap_or_default().to_owned(),
        platform: d.platform().unwrap_or_default().to_owned(),
        model: d.model().unwrap_or_default().to_owned(),
    }
}

fn client_ip(raw: &str, peer: Option<std::net::SocketAddr>) -> Result<IpAddr, AuthError> {
    if raw.is_empty() {
        return Ok(peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip()));
    }
    raw.parse()
        .map_err(|_| AuthError::InvalidArgument(Invalid::new("client_ip", "is not an IP address")))
}

fn end_reason(r: crate::domain::EndReason) -> pb::EndReason {
    use crate::domain::EndReason as R;
    match r {
        R::Logout => pb::EndReason::Logout,
        R::LogoutAll => pb::EndReason::LogoutAll,
        R::Replaced => pb::EndReason::Replaced,
        R::RefreshReused => pb::EndReason::RefreshReused,
        R::RevokedByOperator => pb::EndReason::RevokedByOperator,
        R::Expired => pb::EndReason::Expired,
    }
}

fn event_kind(k: crate::domain::EventKind) -> pb::SessionEventKind {
    use crate::domain::EventKind as K;
    match k {
        K::Login => pb::SessionEventKind::Login,
        K::Refresh => pb::SessionEventKind::Refresh,
        K::End => pb::SessionEventKind::End,
    }
}

/// The gRPC path of an `AuthService` method: the `method` label of the metrics.
macro_rules! path {
    ($method:literal) => {
        concat!("/wxauth.v1.AuthService/", $method)
    };
}

/// The metrics' outcome of a call: `OK` or the ErrorInfo reason.
fn outcome<T>(result: &Result<T, AuthError>) -> &'static str {
    match result {
        Ok(_) => metrics::OK,
        Err(e) => e.reason(),
    }
}

fn phone_response(phone: PhoneNumber) -> pb::GetPhoneNumberResponse {
    pb::GetPhoneNumberResponse {
        phone_number: phone.phone_number,
        pure_phone_number: phone.pure_phone_number,
        country_code: phone.country_code,
    }
}

impl GrpcAuth {
    /// Runs one RPC, counts it by method and outcome with its latency, and answers it.
    async fn observed<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, AuthError>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let result = call.await;
        self.metrics
            .observe_call(method, outcome(&result), started.elapsed());
        result.map(Response::new).map_err(Status::from)
    }

    /// Runs a call that writes on a task of its own, to its end even if the client stops
    /// waiting ([`to_completion`]): tonic drops a call's future when the client resets its
    /// stream, as the edge does at its deadline, and a logout committed but not yet marked
    /// `ended` in Redis, or a code spent at WeChat but not yet remembered as used, must not
    /// stop there.
    async fn to_the_end<T, F, Fut>(&self, call: F) -> Result<T, AuthError>
    where
        T: Send + 'static,
        F: FnOnce(Self) -> Fut,
        Fut: Future<Output = Result<T, AuthError>> + Send + 'static,
    {
        to_completion(call(self.clone())).await.unwrap_or_else(|| {
            Err(AuthError::internal(anyhow::anyhow!(
                "the call's task ended before the call did"
            )))
        })
    }

    async fn login_call(
        &self,
        r: pb::LoginRequest,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<pb::LoginResponse, AuthError> {
        // The code first: a bad one is refused before anything else is looked at.
        let code = WechatCode::parse(&r.code).map_err(AuthError::InvalidCode)?;
        let device = match &r.device {
            Some(d) => {
                Device::parse(&d.id, &d.platform, &d.model).map_err(AuthError::InvalidArgument)?
            }
            None => Device::default(),
        };
        let ip = client_ip(&r.client_ip, peer)?;
        let out = self.core.login(code, device, ip).await?;
        Ok(pb::LoginResponse {
            tokens: Some(token_pair(&out.pair)),
            openid: out.openid,
            unionid: out.unionid,
            is_new_user: out.is_new_user,
            session_id: out.session_id,
        })
    }

    async fn verify_call(
        &self,
        r: &pb::VerifyRequest,
        ahead: Option<ReadAhead>,
    ) -> Result<pb::VerifyResponse, AuthError> {
        let (id, phone) = self
            .core
            .verify_as_asked(&r.access_token, r.include_phone, ahead)
            .await?;
        Ok(pb::VerifyResponse {
            openid: id.openid,
            unionid: id.unionid,
            session_id: id.session_id,
            expires_at: Some(timestamp(id.expires_at)),
            phone: phone.map(phone_response),
        })
    }

    /// One item of a `VerifyBatch`: answered and counted as `Verify` alone would be, its
    /// log lines carrying the item's request id and `Verify` as their call (as a `Verify`
    /// call's lines do); its latency counted from `started`, when the batch began (its
    /// mark may have been read then).
    async fn verify_item(
        &self,
        item: &pb::VerifyBatchItem,
        ahead: Option<ReadAhead>,
        started: Instant,
        deadline: Option<tokio::time::Instant>,
    ) -> pb::VerifyBatchResult {
        // As for a call: the caller's id when well formed, else one made here.
        let made;
        let request_id = if layer::well_formed_id(item.request_id.as_bytes()) {
            item.request_id.as_str()
        } else {
            made = uuid::Uuid::new_v4().to_string();
            made.as_str()
        };
        let call = Call::new(path!("Verify"), request_id);
        let answer = async {
            let result = match (&item.request, deadline) {
                (Some(r), Some(deadline)) => {
                    tokio::time::timeout_at(deadline, self.verify_call(r, ahead))
                        .await
                        .unwrap_or_else(|_| {
                            Err(AuthError::Unavailable(anyhow::anyhow!(
                                "not answered before the batch's deadline"
                            )))
                        })
                }
                (Some(r), None) => self.verify_call(r, ahead).await,
                (None, _) => Err(AuthError::TokenMissing),
            };
            self.metrics
                .observe_call(path!("Verify"), outcome(&result), started.elapsed());
            // Turned into a status inside the item's call: an internal cause is logged with
            // the item's request id.
            result.map_err(Status::from)
        };
        use pb::verify_batch_result::Result as R;
        let result = match in_call(call, answer).await {
            Ok(identity) => R::Identity(identity),
            Err(status) => R::Error(pb::VerifyError::from_status(&status)),
        };
        pb::VerifyBatchResult {
            result: Some(result),
        }
    }

    async fn verify_batch_call(
        &self,
        r: &pb::VerifyBatchRequest,
        started: Instant,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<pb::VerifyBatchResponse, AuthError> {
        if r.items.is_empty() || r.items.len() > VERIFY_BATCH_MAX {
            return Err(AuthError::InvalidArgument(Invalid::new(
                "items",
                format!("must hold 1 to {VERIFY_BATCH_MAX} items"),
            )));
        }
        // The items together, not one after another: an item that waits on the database
        // does not hold up the others.
        if !self.core.reads_ahead() {
            let results = join_all(
                r.items
                    .iter()
                    .map(|item| self.verify_item(item, None, started, deadline)),
            )
            .await;
            return Ok(pb::VerifyBatchResponse { results });
        }
        // With Redis: the tokens this process knows have their sessions' marks read first,
        // in one round trip for all of them; the others go to the database meanwhile.
        let (mut known, mut known_items, mut others) = (Vec::new(), Vec::new(), Vec::new());
        for (i, item) in r.items.iter().enumerate() {
            let ask = item.request.as_ref();
            match ask.and_then(|r| self.core.begin_verify(&r.access_token)) {
                Some(begun) if begun.is_known() => {
                    known.push((begun, ask.is_some_and(|r| r.include_phone)));
                    known_items.push((i, item));
                }
                begun => others.push((i, item, begun)),
            }
        }
        let others = join_all(others.into_iter().map(|(i, item, begun)| async move {
            (i, self.verify_item(item, begun, started, deadline).await)
        }));
        let known = async {
            self.core.read_marks(&mut known).await;
            let items = known_items.into_iter().zip(known);
            join_all(items.map(|((i, item), (begun, _))| async move {
                (
                    i,
                    self.verify_item(item, Some(begun), started, deadline).await,
                )
            }))
            .await
        };
        let (others, known) = join(others, known).await;
        let mut results = vec![pb::VerifyBatchResult::default(); r.items.len()];
        for (i, result) in others.into_iter().chain(known) {
            if let Some(slot) = results.get_mut(i) {
                *slot = result;
            }
        }
        Ok(pb::VerifyBatchResponse { results })
    }

    async fn refresh_call(&self, r: &pb::RefreshRequest) -> Result<pb::RefreshResponse, AuthError> {
        let out = self.core.refresh(&r.refresh_token).await?;
        Ok(pb::RefreshResponse {
            tokens: Some(token_pair(&out.pair)),
            openid: out.owner.openid,
            unionid: out.owner.unionid,
            session_id: out.owner.session_id,
        })
    }

    async fn logout_call(&self, r: &pb::LogoutRequest) -> Result<pb::LogoutResponse, AuthError> {
        let n = self.core.logout(&r.access_token, r.all).await?;
        Ok(pb::LogoutResponse {
            revoked_sessions: n,
        })
    }

    async fn list_sessions_call(
        &self,
        r: &pb::ListSessionsRequest,
    ) -> Result<pb::ListSessionsResponse, AuthError> {
        let sessions = self.core.list_sessions(&r.access_token).await?;
        Ok(pb::ListSessionsResponse {
            sessions: sessions
                .into_iter()
                .map(|s| pb::Session {
                    session_id: s.info.id,
                    device: Some(device_pb(&s.info.device)),
                    created_at: Some(timestamp(s.info.created_at)),
                    last_active_at: Some(timestamp(s.info.last_active_at)),
                    current: s.current,
                })
                .collect(),
        })
    }

    async fn revoke_user_call(
        &self,
        r: &pb::RevokeUserRequest,
    ) -> Result<pb::RevokeUserResponse, AuthError> {
        let n = self.core.revoke_user(&r.openid).await?;
        Ok(pb::RevokeUserResponse {
            revoked_sessions: n,
        })
    }

    async fn decrypt_data_call(
        &self,
        r: &pb::DecryptDataRequest,
    ) -> Result<pb::DecryptDataResponse, AuthError> {
        let data_json = self
            .core
            .decrypt_data(&r.access_token, &r.encrypted_data, &r.iv)
            .await?;
        Ok(pb::DecryptDataResponse { data_json })
    }

    async fn get_phone_number_call(
        &self,
        r: &pb::GetPhoneNumberRequest,
    ) -> Result<pb::GetPhoneNumberResponse, AuthError> {
        let phone = self.core.phone_number(&r.access_token, &r.code).await?;
        Ok(phone_response(phone))
    }

    async fn get_wechat_access_token_call(
        &self,
        r: &pb::GetWechatAccessTokenRequest,
    ) -> Result<pb::GetWechatAccessTokenResponse, AuthError> {
        let refused = Some(r.refused_access_token.as_str()).filter(|t| !t.is_empty());
        let token = self.core.wechat_access_token(refused).await?;
        Ok(pb::GetWechatAccessTokenResponse {
            access_token: secrecy::ExposeSecret::expose_secret(token.secret()).to_owned(),
            expires_at: Some(timestamp(token.expires_at())),
        })
    }

    async fn list_session_events_call(
        &self,
        r: &pb::ListSessionEventsRequest,
    ) -> Result<pb::ListSessionEventsResponse, AuthError> {
        let page = self
            .core
            .list_events(&r.openid, r.page_size, &r.page_token)
            .await?;
        Ok(pb::ListSessionEventsResponse {
            events: page
                .events
                .into_iter()
                .map(|e| pb::SessionEvent {
                    event_id: e.id,
                    session_id: e.session_id,
                    kind: event_kind(e.kind).into(),
                    end_reason: e
                        .reason
                        .map_or(pb::EndReason::Unspecified, end_reason)
                        .into(),
                    device: Some(device_pb(&e.device)),
                    replaced_by_session_id: e.replaced_by_session.unwrap_or_default(),
                    replaced_by_device_id: e.replaced_by_device.unwrap_or_default(),
                    at: Some(timestamp(e.at)),
                })
                .collect(),
            next_page_token: page
                .next_before
                .map(|id| id.to_string())
                .unwrap_or_default(),
        })
    }
}

#[tonic::async_trait]
impl AuthService for GrpcAuth {
    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let peer = request.remote_addr();
        let request = request.into_inner();
        let call = self.to_the_end(move |this| async move {
            let result = this.login_call(request, peer).await;
            this.metrics.login_outcome(outcome(&result));
            result
        });
        self.observed(path!("Login"), call).await
    }

    async fn verify(
        &self,
        request: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        self.observed(path!("Verify"), self.verify_call(request.get_ref(), None))
            .await
    }

    async fn verify_batch(
        &self,
        request: Request<pb::VerifyBatchRequest>,
    ) -> Result<Response<pb::VerifyBatchResponse>, Status> {
        let started = Instant::now();
        let deadline = batch_items_deadline(request.metadata(), started);
        self.observed(
            path!("VerifyBatch"),
            self.verify_batch_call(request.get_ref(), started, deadline),
        )
        .await
    }

    async fn refresh(
        &self,
        request: Request<pb::RefreshRequest>,
    ) -> Result<Response<pb::RefreshResponse>, Status> {
        let request = request.into_inner();
        let call = self.to_the_end(move |this| async move { this.refresh_call(&request).await });
        self.observed(path!("Refresh"), call).await
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutResponse>, Status> {
        let request = request.into_inner();
        let call = self.to_the_end(move |this| async move { this.logout_call(&request).await });
        self.observed(path!("Logout"), call).await
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        self.observed(
            path!("ListSessions"),
            self.list_sessions_call(request.get_ref()),
        )
        .await
    }

    async fn revoke_user(
        &self,
        request: Request<pb::RevokeUserRequest>,
    ) -> Result<Response<pb::RevokeUserResponse>, Status> {
        let request = request.into_inner();
        let call =
            self.to_the_end(move |this| async move { this.revoke_user_call(&request).await });
        self.observed(path!("RevokeUser"), call).await
    }

    async fn list_session_events(
        &self,
        request: Request<pb::ListSessionEventsRequest>,
    ) -> Result<Response<pb::ListSessionEventsResponse>, Status> {
        self.observed(
            path!("ListSessionEvents"),
            self.list_session_events_call(request.get_ref()),
        )
        .await
    }

    async fn decrypt_data(
        &self,
        request: Request<pb::DecryptDataRequest>,
    ) -> Result<Response<pb::DecryptDataResponse>, Status> {
        self.observed(
            path!("DecryptData"),
            self.decrypt_data_call(request.get_ref()),
        )
        .await
    }

    async fn get_phone_number(
        &self,
        request: Request<pb::GetPhoneNumberRequest>,
    ) -> Result<Response<pb::GetPhoneNumberResponse>, Status> {
        let request = request.into_inner();
        let call =
            self.to_the_end(move |this| async move { this.get_phone_number_call(&request).await });
        self.observed(path!("GetPhoneNumber"), call).await
    }

    async fn get_wechat_access_token(
        &self,
        request: Request<pb::GetWechatAccessTokenRequest>,
    ) -> Result<Response<pb::GetWechatAccessTokenResponse>, Status> {
        // A renewal or forced refresh, once asked of WeChat, is stored whatever the caller.
        let request = request.into_inner();
        let call = self.to_the_end(move |this| async move {
            this.get_wechat_access_token_call(&request).await
        });
        self.observed(path!("GetWechatAccessToken"), call).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_know_verify_by_the_path_it_is_observed_under() {
        assert_eq!(path!("Verify"), crate::metrics::VERIFY);
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_malformed_ones_ignored() {
        use std::time::Duration;
        for (value, want) in [
            ("3S", Duration::from_secs(3)),
            ("2999m", Duration::from_millis(2999)),
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("500000u", Duration::from_millis(500)),
            ("99999999n", Duration::from_nanos(99_999_999)),
        ] {
            assert_eq!(grpc_timeout(value), Some(want), "{value}");
        }
        for bad in ["", "S", "3", "3s", "-3S", "123456789S", "3 S", "3SS"] {
            assert_eq!(grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_batchs_items_are_due_a_margin_before_the_callers_deadline() {
        use std::time::Duration;
        let started = Instant::now();
        let due = |value: &str| {
            let mut metadata = tonic::metadata::MetadataMap::new();
            metadata.insert("grpc-timeout", value.parse().expect("ascii"));
            batch_items_deadline(&metadata, started).map(|d| d.into_std().duration_since(started))
        };
        // A fifth of the time kept for the way back, at most a second.
        assert_eq!(due("3S"), Some(Duration::from_millis(2400)));
        assert_eq!(due("500m"), Some(Duration::from_millis(400)));
        assert_eq!(due("10S"), Some(Duration::from_secs(9)));
        assert_eq!(due("junk"), None);
        assert_eq!(
            batch_items_deadline(&tonic::metadata::MetadataMap::new(), started),
            None
        );
    }

    #[test]
    fn timestamps_split_milliseconds() {
        let t = timestamp(1_700_000_000_123);
        assert_eq!(t.seconds, 1_700_000_000);
        assert_eq!(t.nanos, 123_000_000);
    }

    #[test]
    fn client_ip_falls_back_to_the_peer() {
        let peer: std::net::SocketAddr = "10.1.2.3:4000".parse().expect("addr");
        assert_eq!(client_ip("", Some(peer)).ok(), Some(peer.ip()));
        assert_eq!(
            client_ip("2001:db8::1", Some(peer)).ok(),
            "2001:db8::1".parse().ok()
        );
        assert!(client_ip("not-an-ip", None).is_err());
    }

    #[test]
    fn metric_labels_are_the_real_grpc_paths() {
        use proto::v1::auth_service_server::SERVICE_NAME;
        assert_eq!(path!("Login"), format!("/{SERVICE_NAME}/Login"));
    }

    #[test]
    fn outcomes_are_ok_or_the_errorinfo_reason() {
        assert_eq!(outcome(&Ok::<(), AuthError>(())), "OK");
        assert_eq!(
            outcome::<()>(&Err(AuthError::TokenExpired)),
            "TOKEN_EXPIRED"
        );
        let reason =
            tonic_types::StatusExt::get_details_error_info(&Status::from(AuthError::CodeUsed))
                .map(|i| i.reason);
        assert_eq!(
            reason.as_deref(),
            Some(outcome::<()>(&Err(AuthError::CodeUsed)))
        );
    }
}
