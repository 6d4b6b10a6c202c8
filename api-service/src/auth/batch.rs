//! `Verify` calls made at the same moment, sent to auth-service as one `VerifyBatch`.
//!
//! Every business request costs one `Verify`, and a gRPC call's own cost (an HTTP/2 stream,
//! its headers both ways, a task and a span in auth-service) is several times that of
//! checking the token. So a `Verify` is queued, and at most [`SENDERS`] sender tasks send
//! the queue: a sender takes everything queued, sends it as one call (one item as a plain
//! `Verify`, several as one `VerifyBatch`), and once answered takes what gathered meanwhile,
//! until nothing is left. Nothing waits for company: with a sender free, a request is sent
//! at the next turn of the scheduler; batches form only while calls are in flight, that is
//! under load. Each item is still checked live by auth-service, so a revoked session is
//! refused on its next request, and each answer goes to the request that asked.
//!
//! An auth-service that does not know `VerifyBatch` (an older release during a rolling
//! upgrade) answers `UNIMPLEMENTED`: that batch is sent again item by item, and this
//! process sends plain `Verify` calls from then on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::join_all;
use proto::v1::auth_service_client::AuthServiceClient;
use proto::v1::{self as pb};
use tokio::sync::oneshot;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Code, Status};
use tracing::warn;

use super::grpc::{Connection, request_with};

/// The most items one `VerifyBatch` carries (auth-service takes up to 1000); a sender takes
/// the rest on its next round.
pub(super) const BATCH_MAX: usize = 256;

/// Calls of `Verify` or `VerifyBatch` in flight at most: what comes while they are gathers
/// for the next. One would leave everything behind an item that waits on the database;
/// two measured best (wrk, `GET /v1/me` at 64 connections: 38.6k, 43.3k and 38.3k req/s
/// with one, two and four, against 20k sending every `Verify` alone).
const SENDERS: usize = 2;

/// What one `Verify` gets back.
type Answer = Result<pb::VerifyResponse, Status>;

struct Waiting {
    item: pb::VerifyBatchItem,
    reply: oneshot::Sender<Answer>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// Sender tasks running: each sends what is queued, one call at a time, until nothing is.
    senders: usize,
}

/// The queue of `Verify` calls and what it takes to send them.
pub(super) struct Verifier {
    client: AuthServiceClient<Connection>,
    client_key: Option<MetadataValue<Ascii>>,
    timeout: Duration,
    queue: Mutex<Queue>,
    /// False once auth-service answered a batch `UNIMPLEMENTED`.
    batching: AtomicBool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("batching", &self.batching.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub(super) fn new(
        client: AuthServiceClient<Connection>,
        client_key: Option<MetadataValue<Ascii>>,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            client_key,
            timeout,
            queue: Mutex::new(Queue::default()),
            batching: AtomicBool::new(true),
        }
    }

    /// `Verify` of `request` for the request `request_id`: auth-service's answer, or the
    /// failure to get one within the deadline.
    pub(super) async fn verify(
        self: &Arc<Self>,
        request: pb::VerifyRequest,
        request_id: &str,
    ) -> Answer {
        let item = pb::VerifyBatchItem {
            request: Some(request),
            request_id: request_id.to_owned(),
        };
        if !self.batching.load(Ordering::Relaxed) {
            return self.verify_alone(item).await;
        }
        let (reply, answer) = oneshot::channel();
        let spawn_sender = {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.waiting.push(Waiting { item, reply });
            let spawn = queue.senders < SENDERS;
            if spawn {
                queue.senders += 1;
            }
            spawn
        };
        if spawn_sender {
            tokio::spawn(Arc::clone(self).sender());
        }
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Status::unavailable("the call to auth-service was dropped")),
            Err(_) => Err(did_not_answer()),
        }
    }

    /// Sends what is queued, at most [`BATCH_MAX`] in a call, one call at a time, until
    /// nothing is.
    async fn sender(self: Arc<Self>) {
        loop {
            let waiting = {
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                if queue.waiting.is_empty() {
                    queue.senders -= 1;
                    return;
                }
                if queue.waiting.len() > BATCH_MAX {
                    queue.waiting.drain(..BATCH_MAX).collect()
                } else {
                    std::mem::take(&mut queue.waiting)
                }
            };
            self.send(waiting).await;
        }
    }

    /// Sends `waiting` (one call) and hands each its answer.
    async fn send(&self, mut waiting: Vec<Waiting>) {
        if waiting.len() <= 1 {
            if let Some(w) = waiting.pop() {
                let answer = self.verify_alone(w.item).await;
                let _ = w.reply.send(answer);
            }
            return;
        }
        let (items, replies): (Vec<_>, Vec<_>) =
            waiting.into_iter().map(|w| (w.item, w.reply)).unzip();
        // The batch's own id (each item carries its request's).
        let id = uuid::Uuid::new_v4().to_string();
        // Kept to be sent again, alone, should auth-service not know VerifyBatch.
        let request = request_with(
            pb::VerifyBatchRequest {
                items: items.clone(),
            },
            self.timeout,
            self.client_key.as_ref(),
            &id,
        );
        let mut client = self.client.clone();
        let answer = tokio::time::timeout(self.timeout, client.verify_batch(request))
            .await
            .unwrap_or_else(|_| Err(did_not_answer()));
        match answer {
            Ok(response) => {
                let results = response.into_inner().results;
                if results.len() == replies.len() {
                    for (result, reply) in results.into_iter().zip(replies) {
                        // The request may be gone (its client left): nobody to answer.
                        let _ = reply.send(item_answer(result));
                    }
                } else {
                    let status = Status::unknown(format!(
                        "VerifyBatch answered {} items of {}",
                        results.len(),
                        replies.len()
                    ));
                    for reply in replies {
                        let _ = reply.send(Err(status.clone()));
                    }
                }
            }
            Err(status) if status.code() == Code::Unimplemented => {
                if self.batching.swap(false, Ordering::Relaxed) {
                    warn!(
                        "auth-service does not know VerifyBatch (an older release?): each Verify is sent alone from now on"
                    );
                }
                // No item reached Verify: each is sent again, alone, all at once.
                let alone = items.into_iter().map(|item| self.verify_alone(item));
                for (answer, reply) in join_all(alone).await.into_iter().zip(replies) {
                    let _ = reply.send(answer);
                }
            }
            Err(status) => {
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
            }
        }
    }

    /// One `Verify` call.
    async fn verify_alone(&self, item: pb::VerifyBatchItem) -> Answer {
        let request = request_with(
            item.request.unwrap_or_default(),
            self.timeout,
            self.client_key.as_ref(),
            &item.request_id,
        );
        let mut client = self.client.clone();
        match tokio::time::timeout(self.timeout, client.verify(request)).await {
            Ok(answer) => answer.map(tonic::Response::into_inner),
            Err(_) => Err(did_not_answer()),
        }
    }
}

fn did_not_answer() -> Status {
    Status::deadline_exceeded("auth-service did not answer in time")
}

/// One item's answer as `Verify` alone would have given it.
fn item_answer(result: pb::VerifyBatchResult) -> Answer {
    use pb::verify_batch_result::Result as R;
    match result.result {
        Some(R::Identity(identity)) => Ok(identity),
        Some(R::Error(e)) => Err(e.into_status()),
        None => Err(Status::unknown("VerifyBatch answered an item with nothing")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;

    use proto::v1::auth_service_server::{AuthService, AuthServiceServer};
    use tonic::{Request, Response};
    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;
    use crate::auth::{AuthApi, CallContext, GrpcAuth};

    /// How the fake auth-service answers `VerifyBatch`.
    #[derive(Clone, Copy, PartialEq)]
    enum Batches {
        /// Item by item, as auth-service does.
        Answered,
        /// `UNIMPLEMENTED`, as a release without it does.
        Unknown,
        /// One result too few.
        Short,
    }

    /// An auth-service whose tokens are `token-<openid>`; anything else is refused
    /// `TOKEN_INVALID`. It counts the calls and the largest batch.
    struct Fake {
        batches: Batches,
        verify_calls: AtomicUsize,
        batch_calls: AtomicUsize,
        largest_batch: AtomicUsize,
    }

    fn verdict(r: &pb::VerifyRequest) -> Answer {
        match r.access_token.strip_prefix("token-") {
            Some(openid) => Ok(pb::VerifyResponse {
                openid: openid.to_owned(),
                session_id: format!("session-{openid}"),
                ..Default::default()
            }),
            None => Err(Status::with_error_details(
                Code::Unauthenticated,
                "the token is not valid",
                ErrorDetails::with_error_info("TOKEN_INVALID", "wxauth", HashMap::new()),
            )),
        }
    }

    fn unknown<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in this fake"))
    }

    /// The fake as a tonic service (the test keeps the other handle, for the counts).
    struct Server(Arc<Fake>);

    impl std::ops::Deref for Server {
        type Target = Fake;
        fn deref(&self) -> &Fake {
            &self.0
        }
    }

    #[tonic::async_trait]
    impl AuthService for Server {
        async fn verify(
            &self,
            request: Request<pb::VerifyRequest>,
        ) -> Result<Response<pb::VerifyResponse>, Status> {
            self.verify_calls.fetch_add(1, Ordering::Relaxed);
            verdict(request.get_ref()).map(Response::new)
        }

        async fn verify_batch(
            &self,
            request: Request<pb::VerifyBatchRequest>,
        ) -> Result<Response<pb::VerifyBatchResponse>, Status> {
            if self.batches == Batches::Unknown {
                return unknown();
            }
            let items = request.into_inner().items;
            self.batch_calls.fetch_add(1, Ordering::Relaxed);
            self.largest_batch.fetch_max(items.len(), Ordering::Relaxed);
            use pb::verify_batch_result::Result as R;
            let mut results: Vec<_> = items
                .iter()
                .map(|item| {
                    let result = match verdict(&item.request.clone().unwrap_or_default()) {
                        Ok(identity) => R::Identity(identity),
                        Err(s) => R::Error(pb::VerifyError::from_status(&s)),
                    };
                    pb::VerifyBatchResult {
                        result: Some(result),
                    }
                })
                .collect();
            if self.batches == Batches::Short {
                results.pop();
            }
            Ok(Response::new(pb::VerifyBatchResponse { results }))
        }

        async fn login(
            &self,
            _: Request<pb::LoginRequest>,
        ) -> Result<Response<pb::LoginResponse>, Status> {
            unknown()
        }
        async fn refresh(
            &self,
            _: Request<pb::RefreshRequest>,
        ) -> Result<Response<pb::RefreshResponse>, Status> {
            unknown()
        }
        async fn logout(
            &self,
            _: Request<pb::LogoutRequest>,
        ) -> Result<Response<pb::LogoutResponse>, Status> {
            unknown()
        }
        async fn list_sessions(
            &self,
            _: Request<pb::ListSessionsRequest>,
        ) -> Result<Response<pb::ListSessionsResponse>, Status> {
            unknown()
        }
        async fn revoke_user(
            &self,
            _: Request<pb::RevokeUserRequest>,
        ) -> Result<Response<pb::RevokeUserResponse>, Status> {
            unknown()
        }
        async fn list_session_events(
            &self,
            _: Request<pb::ListSessionEventsRequest>,
        ) -> Result<Response<pb::ListSessionEventsResponse>, Status> {
            unknown()
        }
        async fn decrypt_data(
            &self,
            _: Request<pb::DecryptDataRequest>,
        ) -> Result<Response<pb::DecryptDataResponse>, Status> {
            unknown()
        }
        async fn get_phone_number(
            &self,
            _: Request<pb::GetPhoneNumberRequest>,
        ) -> Result<Response<pb::GetPhoneNumberResponse>, Status> {
            unknown()
        }
        async fn get_wechat_access_token(
            &self,
            _: Request<pb::GetWechatAccessTokenRequest>,
        ) -> Result<Response<pb::GetWechatAccessTokenResponse>, Status> {
            unknown()
        }
    }

    /// The fake on a port of its own, and a client of it as api-service makes it.
    async fn serve(batches: Batches) -> (Arc<Fake>, GrpcAuth) {
        let fake = Arc::new(Fake {
            batches,
            verify_calls: AtomicUsize::new(0),
            batch_calls: AtomicUsize::new(0),
            largest_batch: AtomicUsize::new(0),
        });
        let incoming =
            tonic::transport::server::TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .expect("bind");
        let addr = incoming.local_addr().expect("addr");
        let service = AuthServiceServer::new(Server(Arc::clone(&fake)));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        let timeout = Duration::from_secs(10);
        let client =
            GrpcAuth::new(&format!("http://{addr}"), timeout, timeout, None).expect("client");
        (fake, client)
    }

    /// `n` requests at once, every third with a token auth-service refuses: each must get
    /// its own answer. The openids seen, in the requests' order (`Err(code)` when refused).
    async fn many_at_once(client: &GrpcAuth, n: usize) -> Vec<Result<String, String>> {
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..n {
            let client = client.clone();
            calls.spawn(async move {
                let token = if i % 3 == 2 {
                    format!("garbled-{i}")
                } else {
                    format!("token-user{i}")
                };
                let ctx = CallContext {
                    request_id: format!("req-{i}"),
                };
                let answer = client.verify(&ctx, &token, false).await;
                (
                    i,
                    answer.map(|id| id.openid).map_err(|e| e.code().to_owned()),
                )
            });
        }
        let mut seen = calls.join_all().await;
        seen.sort_by_key(|(i, _)| *i);
        seen.into_iter().map(|(_, answer)| answer).collect()
    }

    fn expected(n: usize) -> Vec<Result<String, String>> {
        (0..n)
            .map(|i| {
                if i % 3 == 2 {
                    Err("token_invalid".to_owned())
                } else {
                    Ok(format!("user{i}"))
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn requests_that_come_together_share_a_call_and_each_gets_its_own_answer() {
        let (fake, client) = serve(Batches::Answered).await;
        // More than a batch holds: the rest goes in the next call.
        let n = BATCH_MAX + 100;
        assert_eq!(many_at_once(&client, n).await, expected(n));
        let largest = fake.largest_batch.load(Ordering::Relaxed);
        assert!(largest > 1, "no batch formed");
        assert!(largest <= BATCH_MAX, "a batch of {largest}");
        // Fewer calls than requests (the first one may go alone).
        let calls =
            fake.batch_calls.load(Ordering::Relaxed) + fake.verify_calls.load(Ordering::Relaxed);
        assert!(calls < n / 2, "{calls} calls for {n} requests");
    }

    #[tokio::test]
    async fn a_request_alone_is_a_plain_verify() {
        let (fake, client) = serve(Batches::Answered).await;
        assert_eq!(many_at_once(&client, 1).await, expected(1));
        assert_eq!(fake.verify_calls.load(Ordering::Relaxed), 1);
        assert_eq!(fake.batch_calls.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_auth_service_without_verify_batch_gets_each_verify_alone() {
        let (fake, client) = serve(Batches::Unknown).await;
        assert_eq!(many_at_once(&client, 40).await, expected(40));
        let before = fake.verify_calls.load(Ordering::Relaxed);
        assert!(before >= 40, "{before}");
        // From then on, no batch is tried: every request is one Verify.
        assert_eq!(many_at_once(&client, 40).await, expected(40));
        assert_eq!(fake.verify_calls.load(Ordering::Relaxed), before + 40);
    }

    #[tokio::test]
    async fn an_answer_that_does_not_match_the_batch_is_auth_service_failing() {
        let (_fake, client) = serve(Batches::Short).await;
        let seen = many_at_once(&client, 40).await;
        // The first request may have gone alone; the batch after it is refused whole.
        let unavailable = seen
            .iter()
            .filter(|a| a.as_ref().err().is_some_and(|c| c == "auth_unavailable"))
            .count();
        assert!(unavailable >= 39, "{seen:?}");
        for (answer, want) in seen.iter().zip(expected(40)) {
            assert!(
                answer == &want || answer == &Err("auth_unavailable".to_owned()),
                "{answer:?}"
            );
        }
    }
}
