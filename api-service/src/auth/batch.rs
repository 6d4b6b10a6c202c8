//! `Verify` calls made at the same moment, sent to auth-service as one `VerifyBatch`.
//!
//! Every business request costs one `Verify`, and a gRPC call's own cost (an HTTP/2 stream,
//! its headers both ways, a task and a span in auth-service) is several times that of
//! checking the token. So a `Verify` is queued, and up to [`SENDERS`] sender tasks send the
//! queue: a sender takes what is queued (at most [`BATCH_MAX`]), sends it as one call (one
//! item as a plain `Verify`, several as one `VerifyBatch`), and once answered takes what
//! gathered meanwhile, until nothing is left. With a sender free, a request is sent at the
//! next turn of the scheduler: batches form only while calls are in flight, that is under
//! load. Each item is still checked live by auth-service, so a revoked session is refused
//! on its next request, and each answer goes to the request that asked.
//!
//! A slow call (an item whose session auth-service must read from its database, a Redis
//! that stalls) must not hold up everyone else: once the oldest queued item has waited
//! [`STALL`] for a sender, one more call is sent, and again every [`STALL`] while that
//! lasts, so that a slow auth-service costs about what it would without batching. Items
//! whose request is gone (it timed out or its client left) are not sent; a call's deadline
//! is what its oldest item has left of `API_AUTH_TIMEOUT`; past [`QUEUE_MAX`] waiting, a
//! request is answered 503 at once.
//!
//! An auth-service that does not know `VerifyBatch` (an older release during a rolling
//! upgrade) answers `UNIMPLEMENTED`: that batch is sent again item by item, and for
//! [`PLAIN_FOR`] every `Verify` is sent alone before a batch is tried again.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use proto::v1::{self as pb};
use tokio::sync::oneshot;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Code, Status};
use tonic_types::StatusExt;
use tracing::{error, warn};

use super::grpc::{Connections, request_with};
use super::http_status_for;
use crate::metrics::VerifyCalls;

/// The most items one `VerifyBatch` carries (auth-service takes up to 1000; the edge takes
/// tokens of at most [`super::TOKEN_MAX`] bytes, so a batch stays far below gRPC's 4 MiB).
pub(super) const BATCH_MAX: usize = 256;

/// Sender tasks that keep sending while anything is queued. One would leave everything
/// behind each call. With wrk at 64 connections two measured best (`GET /v1/me`: 38.6k,
/// 43.3k and 38.3k req/s with one, two and four, against 20k sending every `Verify` alone);
/// in the bench three beat two at 4 and 16 in flight and tie from 64 on (at 16, three
/// rounds each, interleaved: 34.9-37.7k -> 39.6-40.8k req/s embedded; on PostgreSQL + Redis
/// 18.4-19.4k -> 20.9-22.0k, 52-54 -> 43-45 µs of CPU a request), and four tie with three.
const SENDERS: usize = 3;

/// How long the oldest queued `Verify` waits for a sender before one more call is sent.
const STALL: Duration = Duration::from_millis(5);

/// `Verify` calls waiting at most; past that a request is answered 503 at once.
const QUEUE_MAX: usize = 4096;

/// After auth-service answered a batch `UNIMPLEMENTED`: how long every `Verify` is sent
/// alone before a batch is tried again.
const PLAIN_FOR: Duration = Duration::from_secs(60);

/// What one `Verify` gets back.
type Answer = Result<pb::VerifyResponse, Status>;

struct Waiting {
    item: pb::VerifyBatchItem,
    reply: oneshot::Sender<Answer>,
    /// When it was queued: its deadline is `API_AUTH_TIMEOUT` after.
    since: Instant,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Waiting>,
    /// Sender tasks running (at most [`SENDERS`]).
    senders: usize,
    /// A task is watching for the oldest item to wait [`STALL`].
    watching: bool,
    /// Until when every `Verify` is sent alone (auth-service did not know `VerifyBatch`).
    plain_until: Option<Instant>,
}

/// What [`Verifier::verify`] has to start after queueing.
enum Start {
    Sender,
    Watch,
    Nothing,
}

/// The queue of `Verify` calls and what it takes to send them.
pub(super) struct Verifier {
    clients: Arc<Connections>,
    client_key: Option<MetadataValue<Ascii>>,
    timeout: Duration,
    queue: Mutex<Queue>,
    calls: VerifyCalls,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Gives back a sender's place, or the watcher's, when its task ends any other way than
/// by its own rule (a panic, or the runtime dropping it): the queue is never left without
/// one. Disarmed on the normal way out.
struct Slot<'a> {
    verifier: &'a Arc<Verifier>,
    sender: bool,
    armed: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let restart = {
            let mut queue = self.verifier.lock();
            if self.sender {
                queue.senders -= 1;
            } else {
                queue.watching = false;
            }
            let restart = !queue.waiting.is_empty() && queue.senders < SENDERS;
            if restart {
                queue.senders += 1;
            }
            restart
        };
        if restart {
            // Outside a runtime (it is shutting down) nobody is waiting any more.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(Arc::clone(self.verifier).sender());
            }
        }
    }
}

impl Verifier {
    pub(super) fn new(
        clients: Arc<Connections>,
        client_key: Option<MetadataValue<Ascii>>,
        timeout: Duration,
        calls: VerifyCalls,
    ) -> Self {
        Self {
            clients,
            client_key,
            timeout,
            queue: Mutex::new(Queue::default()),
            calls,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Verify` of `request` for the request `request_id`: auth-service's answer, or the
    /// failure to get one within `API_AUTH_TIMEOUT`.
    pub(super) async fn verify(
        self: &Arc<Self>,
        request: pb::VerifyRequest,
        request_id: &str,
    ) -> Answer {
        let item = pb::VerifyBatchItem {
            request: Some(request),
            request_id: request_id.to_owned(),
        };
        let since = Instant::now();
        let deadline = since + self.timeout;
        let (reply, answer) = oneshot::channel();
        // Err: this one goes alone.
        let start = {
            let mut queue = self.lock();
            let plain = match queue.plain_until {
                Some(until) if since < until => true,
                Some(_) => {
                    queue.plain_until = None;
                    false
                }
                None => false,
            };
            if plain {
                Err(item)
            } else if queue.waiting.len() >= QUEUE_MAX {
                return Err(Status::unavailable(
                    "too many Verify calls waiting for auth-service",
                ));
            } else {
                queue.waiting.push(Waiting { item, reply, since });
                Ok(if queue.senders < SENDERS {
                    queue.senders += 1;
                    Start::Sender
                } else if !queue.watching {
                    queue.watching = true;
                    Start::Watch
                } else {
                    Start::Nothing
                })
            }
        };
        let start = match start {
            Ok(start) => start,
            Err(item) => return self.verify_alone(item, deadline).await,
        };
        match start {
            Start::Sender => drop(tokio::spawn(Arc::clone(self).sender())),
            Start::Watch => drop(tokio::spawn(Arc::clone(self).watch())),
            Start::Nothing => {}
        }
        // The same deadline its call is sent with (what its oldest item has left).
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Status::unavailable("the call to auth-service was dropped")),
            Err(_) => Err(no_answer()),
        }
    }

    /// What is queued now, oldest first: at most [`BATCH_MAX`] items whose request still
    /// waits (the others are dropped unsent). Empty when nothing is queued.
    fn take(queue: &mut Queue) -> Vec<Waiting> {
        queue.waiting.retain(|w| !w.reply.is_closed());
        if queue.waiting.len() > BATCH_MAX {
            queue.waiting.drain(..BATCH_MAX).collect()
        } else {
            std::mem::take(&mut queue.waiting)
        }
    }

    /// A sender: sends what is queued, one call at a time, until nothing is.
    async fn sender(self: Arc<Self>) {
        let mut slot = Slot {
            verifier: &self,
            sender: true,
            armed: true,
        };
        loop {
            let batch = {
                let mut queue = self.lock();
                let batch = Self::take(&mut queue);
                if batch.is_empty() {
                    queue.senders -= 1;
                    slot.armed = false;
                    return;
                }
                batch
            };
            self.send(batch).await;
        }
    }

    /// Watches the oldest queued item while every sender is busy: once it has waited
    /// [`STALL`], sends one call of what is queued (in a task of its own, since it may be
    /// as slow as the senders' calls), and looks again [`STALL`] later, until nothing is
    /// queued: a queue longer than one call, or what arrives meanwhile, is not left to
    /// wait for a sender.
    async fn watch(self: Arc<Self>) {
        let mut slot = Slot {
            verifier: &self,
            sender: false,
            armed: true,
        };
        // When this watcher last sent a call: the next goes no sooner than STALL after it.
        let mut sent: Option<Instant> = None;
        loop {
            let due = {
                let mut queue = self.lock();
                let Some(oldest) = queue.waiting.first().map(|w| w.since) else {
                    queue.watching = false;
                    slot.armed = false;
                    return;
                };
                let due = sent.map_or(oldest, |sent| sent.max(oldest)) + STALL;
                if Instant::now() >= due {
                    Ok(Self::take(&mut queue))
                } else {
                    Err(due)
                }
            };
            match due {
                Err(due) => tokio::time::sleep_until(due.into()).await,
                Ok(batch) => {
                    sent = Some(Instant::now());
                    // Empty when every queued request had gone: the next look ends it.
                    if !batch.is_empty() {
                        self.calls.stall();
                        let verifier = Arc::clone(&self);
                        drop(tokio::spawn(async move { verifier.send(batch).await }));
                    }
                }
            }
        }
    }

    /// Sends `waiting` (one call) and hands each its answer.
    async fn send(&self, mut waiting: Vec<Waiting>) {
        let Some(oldest) = waiting.iter().map(|w| w.since).min() else {
            return;
        };
        let deadline = oldest + self.timeout;
        if waiting.len() == 1 {
            if let Some(w) = waiting.pop() {
                let answer = self.verify_alone(w.item, deadline).await;
                // The request may be gone (its client left): nobody to answer.
                let _ = w.reply.send(answer);
            }
            return;
        }
        let (items, replies): (Vec<_>, Vec<_>) =
            waiting.into_iter().map(|w| (w.item, w.reply)).unzip();
        // The batch's own id (each item carries its request's), in its failures' log line.
        let id = uuid::Uuid::new_v4().to_string();
        // Kept to be sent again, alone, should auth-service not know VerifyBatch.
        let request = request_with(
            pb::VerifyBatchRequest {
                items: items.clone(),
            },
            deadline.saturating_duration_since(Instant::now()),
            self.client_key.as_ref(),
            &id,
        );
        let mut client = self.clients.next();
        self.calls.batch(replies.len());
        let answer = tokio::time::timeout_at(deadline.into(), client.verify_batch(request))
            .await
            .unwrap_or_else(|_| Err(no_answer()));
        let status = match answer {
            Ok(response) => {
                let results = response.into_inner().results;
                if results.len() == replies.len() {
                    for (result, reply) in results.into_iter().zip(replies) {
                        let _ = reply.send(item_answer(result));
                    }
                    return;
                }
                Status::internal(format!(
                    "VerifyBatch answered {} items of {}",
                    results.len(),
                    replies.len()
                ))
            }
            Err(status) if status.code() == Code::Unimplemented => {
                let switched = {
                    let mut queue = self.lock();
                    let was_batching = queue.plain_until.is_none();
                    queue.plain_until = Some(Instant::now() + PLAIN_FOR);
                    was_batching
                };
                if switched {
                    warn!(
                        batch_id = id,
                        "auth-service does not know VerifyBatch (an older release?): every Verify is sent alone for a minute"
                    );
                }
                // No item reached Verify: each is sent again, alone, all at once.
                let alone = items
                    .into_iter()
                    .map(|item| self.verify_alone(item, deadline));
                for (answer, reply) in join_all(alone).await.into_iter().zip(replies) {
                    let _ = reply.send(answer);
                }
                return;
            }
            Err(status) => status,
        };
        // The call failed as a whole: nobody's verdict. Logged once with every request's id.
        let request_ids = items
            .iter()
            .map(|i| i.request_id.as_str())
            .collect::<Vec<_>>()
            .join(",");
        if matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
        ) {
            warn!(batch_id = id, request_ids, grpc_code = ?status.code(), "VerifyBatch failed");
        } else {
            error!(batch_id = id, request_ids, grpc_code = ?status.code(),
                message = status.message(), "VerifyBatch failed");
        }
        let status = as_failure(status, &id);
        for reply in replies {
            let _ = reply.send(Err(status.clone()));
        }
    }

    /// One `Verify` call, due by `deadline`.
    async fn verify_alone(&self, item: pb::VerifyBatchItem, deadline: Instant) -> Answer {
        let request = request_with(
            item.request.unwrap_or_default(),
            deadline.saturating_duration_since(Instant::now()),
            self.client_key.as_ref(),
            &item.request_id,
        );
        let mut client = self.clients.next();
        self.calls.alone();
        match tokio::time::timeout_at(deadline.into(), client.verify(request)).await {
            Ok(answer) => answer.map(tonic::Response::into_inner),
            Err(_) => Err(no_answer()),
        }
    }
}

fn no_answer() -> Status {
    Status::deadline_exceeded("no answer from auth-service in time")
}

/// A failure of a whole batch as each of its requests sees it: never a verdict on that
/// request (a reason the edge would show as its own, such as `INVALID_ARGUMENT` for the
/// batch's size, becomes auth-service failing, 503), otherwise as it came.
fn as_failure(status: Status, batch_id: &str) -> Status {
    let verdict = status
        .get_details_error_info()
        .is_some_and(|info| http_status_for(&info.reason).is_some());
    if verdict {
        Status::internal(format!(
            "VerifyBatch {batch_id} refused whole: {:?}: {}",
            status.code(),
            status.message()
        ))
    } else {
        status
    }
}

/// One item's answer as `Verify` alone would have given it.
fn item_answer(result: pb::VerifyBatchResult) -> Answer {
    use pb::verify_batch_result::Result as R;
    match result.result {
        Some(R::Identity(identity)) => Ok(identity),
        Some(R::Error(e)) => Err(e.into_status()),
        None => Err(Status::internal(
            "VerifyBatch answered an item with nothing",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use proto::v1::auth_service_server::{AuthService, AuthServiceServer};
    use tonic::{Request, Response};
    use tonic_types::{ErrorDetails, StatusExt};

    use super::*;
    use crate::auth::{AuthApi, AuthResult, CallContext, GrpcAuth, Identity};

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

    /// An auth-service whose tokens are `token-<openid>` (or `slow-<openid>`, answered
    /// with every other item of its call only once the test lets slow calls go:
    /// [`Fake::let_slow_calls_go`]); anything else is refused `TOKEN_INVALID`. It counts
    /// the calls, the largest batch, and the slow calls held.
    struct Fake {
        batches: Batches,
        verify_calls: AtomicUsize,
        /// Every VerifyBatch asked, answered or not.
        batch_attempts: AtomicUsize,
        batch_calls: AtomicUsize,
        largest_batch: AtomicUsize,
        /// Calls with a `slow-` token that reached the fake (each then waits for `slow_go`).
        slow_arrived: tokio::sync::watch::Sender<usize>,
        /// Closed once slow calls may be answered.
        slow_go: tokio::sync::Semaphore,
    }

    impl Fake {
        /// Holds a call with a `slow-` token among `tokens` until the test lets it go.
        async fn slow_if_asked<'a>(&self, mut tokens: impl Iterator<Item = &'a str>) {
            if tokens.any(|t| t.starts_with("slow-")) {
                self.slow_arrived.send_modify(|n| *n += 1);
                // Err once closed: that is the signal, there is never a permit.
                let _go = self.slow_go.acquire().await;
            }
        }

        /// Answers the slow calls held, and those that come after.
        fn let_slow_calls_go(&self) {
            self.slow_go.close();
        }
    }

    /// Not a deadline on the behaviour: only how long a test waits before it calls a hang
    /// one (also the client's `API_AUTH_TIMEOUT`, so that no call fails of it first).
    const HANG: Duration = Duration::from_secs(60);

    fn verdict(r: &pb::VerifyRequest) -> Answer {
        let token = &r.access_token;
        match token
            .strip_prefix("token-")
            .or_else(|| token.strip_prefix("slow-"))
        {
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
            self.slow_if_asked(std::iter::once(request.get_ref().access_token.as_str()))
                .await;
            verdict(request.get_ref()).map(Response::new)
        }

        async fn verify_batch(
            &self,
            request: Request<pb::VerifyBatchRequest>,
        ) -> Result<Response<pb::VerifyBatchResponse>, Status> {
            self.batch_attempts.fetch_add(1, Ordering::Relaxed);
            if self.batches == Batches::Unknown {
                return unknown();
            }
            let items = request.into_inner().items;
            let tokens = items.iter().filter_map(|i| i.request.as_ref());
            self.slow_if_asked(tokens.map(|r| r.access_token.as_str()))
                .await;
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
    async fn serve(batches: Batches) -> (Arc<Fake>, GrpcAuth, VerifyCalls) {
        let calls = VerifyCalls::default();
        let fake = Arc::new(Fake {
            batches,
            verify_calls: AtomicUsize::new(0),
            batch_attempts: AtomicUsize::new(0),
            batch_calls: AtomicUsize::new(0),
            largest_batch: AtomicUsize::new(0),
            slow_arrived: tokio::sync::watch::Sender::new(0),
            slow_go: tokio::sync::Semaphore::new(0),
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
        let timeout = HANG;
        let client = GrpcAuth::new(
            &format!("http://{addr}"),
            timeout,
            timeout,
            None,
            1,
            calls.clone(),
        )
        .expect("client");
        (fake, client, calls)
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

    /// Waits until no sender and no watcher is left (they end once nothing is queued);
    /// panics when that does not come within the hang guard.
    async fn settles(client: &GrpcAuth) {
        let give_up = Instant::now() + HANG;
        while Instant::now() < give_up {
            {
                let queue = client.verifier.lock();
                if queue.senders == 0 && !queue.watching && queue.waiting.is_empty() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let queue = client.verifier.lock();
        panic!(
            "never settled: {} senders, watching {}, {} waiting",
            queue.senders,
            queue.watching,
            queue.waiting.len()
        );
    }

    /// Makes every sender busy with a call the fake holds: one `slow-` request after
    /// another, each sent once the one before reached the fake (so each is a sender's own
    /// call, not an item of another's). Their answers come once the fake lets them go.
    async fn every_sender_held(
        fake: &Fake,
        client: &GrpcAuth,
    ) -> tokio::task::JoinSet<AuthResult<Identity>> {
        let mut arrived = fake.slow_arrived.subscribe();
        let mut slow = tokio::task::JoinSet::new();
        for i in 0..SENDERS {
            let client = client.clone();
            slow.spawn(async move {
                let ctx = CallContext::default();
                client.verify(&ctx, &format!("slow-s{i}"), false).await
            });
            tokio::time::timeout(HANG, arrived.wait_for(|n| *n > i))
                .await
                .expect("hang guard: a slow call never reached the fake")
                .expect("the fake is there");
        }
        assert_eq!(client.verifier.lock().senders, SENDERS);
        slow
    }

    #[tokio::test]
    async fn requests_that_come_together_share_a_call_and_each_gets_its_own_answer() {
        let (fake, client, counted) = serve(Batches::Answered).await;
        // More than a batch holds: the rest goes in the next call. Three rounds: the
        // senders of one end, and the next round starts its own.
        let n = BATCH_MAX + 100;
        for _ in 0..3 {
            assert_eq!(many_at_once(&client, n).await, expected(n));
            settles(&client).await;
        }
        let largest = fake.largest_batch.load(Ordering::Relaxed);
        assert!(largest > 1, "no batch formed");
        assert!(largest <= BATCH_MAX, "a batch of {largest}");
        // Fewer calls than requests (the first one of a round may go alone).
        let calls =
            fake.batch_calls.load(Ordering::Relaxed) + fake.verify_calls.load(Ordering::Relaxed);
        assert!(calls < 3 * n / 2, "{calls} calls for {} requests", 3 * n);
        let (alone, batches, _) = counted.counts();
        assert_eq!(alone, fake.verify_calls.load(Ordering::Relaxed) as u64);
        assert_eq!(batches, fake.batch_calls.load(Ordering::Relaxed) as u64);
    }

    #[tokio::test]
    async fn a_request_alone_is_a_plain_verify() {
        let (fake, client, calls) = serve(Batches::Answered).await;
        assert_eq!(many_at_once(&client, 1).await, expected(1));
        assert_eq!(fake.verify_calls.load(Ordering::Relaxed), 1);
        assert_eq!(fake.batch_attempts.load(Ordering::Relaxed), 0);
        assert_eq!(calls.counts(), (1, 0, 0));
    }

    #[tokio::test]
    async fn a_slow_call_does_not_hold_up_the_others() {
        // Arrange: every sender busy with a call the fake holds
        let (fake, client, calls) = serve(Batches::Answered).await;
        let mut slow = every_sender_held(&fake, &client).await;

        // Act: requests that come meanwhile
        let seen = many_at_once(&client, 40).await;

        // Assert: answered while the slow calls still wait
        assert_eq!(seen, expected(40));
        assert!(slow.try_join_next().is_none(), "a slow call ended first");
        assert!(calls.counts().2 >= 1, "no stall counted");
        fake.let_slow_calls_go();
        let slow = slow.join_all().await;
        assert!(slow.iter().all(Result::is_ok));
        settles(&client).await;
    }

    #[tokio::test]
    async fn a_stall_longer_than_one_call_is_sent_call_after_call() {
        // Arrange: every sender busy with a call the fake holds
        let (fake, client, calls) = serve(Batches::Answered).await;
        let mut slow = every_sender_held(&fake, &client).await;
        // More than one call holds, all queued before anyone looks (by hand: no watcher yet).
        let n = BATCH_MAX + 50;
        let mut answers = Vec::new();
        {
            let mut queue = client.verifier.lock();
            for i in 0..n {
                let (reply, answer) = oneshot::channel();
                queue.waiting.push(Waiting {
                    item: pb::VerifyBatchItem {
                        request: Some(pb::VerifyRequest {
                            access_token: format!("token-user{i}"),
                            include_phone: false,
                        }),
                        request_id: format!("req-{i}"),
                    },
                    reply,
                    since: Instant::now(),
                });
                answers.push(answer);
            }
        }
        let last = pb::VerifyRequest {
            access_token: "token-last".to_owned(),
            include_phone: false,
        };

        // Act: one more request, the usual way (it starts the watcher), and nothing after it
        let (answers, last) = tokio::join!(join_all(answers), client.verifier.verify(last, "last"));

        // Assert: every one answered, in calls of at most a batch, while the slow calls wait
        assert!(slow.try_join_next().is_none(), "a slow call ended first");
        for (i, answer) in answers.into_iter().enumerate() {
            let answer = answer.expect("answered").expect("verified");
            assert_eq!(answer.openid, format!("user{i}"));
        }
        assert_eq!(last.expect("verified").openid, "last");
        assert!(calls.counts().2 >= 2, "{:?}", calls.counts());
        assert!(fake.largest_batch.load(Ordering::Relaxed) <= BATCH_MAX);
        fake.let_slow_calls_go();
        let slow = slow.join_all().await;
        assert!(slow.iter().all(Result::is_ok));
        settles(&client).await;
    }

    #[tokio::test]
    async fn an_auth_service_without_verify_batch_gets_each_verify_alone() {
        let (fake, client, calls) = serve(Batches::Unknown).await;
        assert_eq!(many_at_once(&client, 40).await, expected(40));
        let tried = fake.batch_attempts.load(Ordering::Relaxed);
        let before = fake.verify_calls.load(Ordering::Relaxed);
        assert!(
            tried >= 1 && before >= 40,
            "{tried} batches, {before} calls"
        );
        // From then on, no batch is tried: every request is one Verify.
        settles(&client).await;
        assert_eq!(many_at_once(&client, 40).await, expected(40));
        assert_eq!(fake.verify_calls.load(Ordering::Relaxed), before + 40);
        assert_eq!(fake.batch_attempts.load(Ordering::Relaxed), tried);
        // Counted as the fake saw them: every batch tried, every Verify alone.
        let (alone, batches, _) = calls.counts();
        assert_eq!(batches, tried as u64);
        assert_eq!(alone, fake.verify_calls.load(Ordering::Relaxed) as u64);
    }

    #[tokio::test]
    async fn an_answer_that_does_not_match_the_batch_is_auth_service_failing() {
        let (_fake, client, _calls) = serve(Batches::Short).await;
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

    #[tokio::test]
    async fn past_the_most_waiting_a_request_is_refused_at_once() {
        // Arrange: the queue full, nobody sending (filled by hand, no sender started)
        let (fake, client, calls) = serve(Batches::Answered).await;
        let mut held = Vec::new();
        {
            let mut queue = client.verifier.lock();
            for i in 0..QUEUE_MAX {
                let (reply, answer) = oneshot::channel();
                queue.waiting.push(Waiting {
                    item: pb::VerifyBatchItem {
                        request: None,
                        request_id: format!("r{i}"),
                    },
                    reply,
                    since: Instant::now(),
                });
                held.push(answer);
            }
        }
        let request = || pb::VerifyRequest {
            access_token: "token-late".to_owned(),
            include_phone: false,
        };

        // Act: one more (a guard against a hang, not a speed assertion)
        let refused = tokio::time::timeout(HANG, client.verifier.verify(request(), "late"))
            .await
            .expect("hang guard: answered without waiting for auth-service");

        // Assert: 503 at once, nothing sent, the queue as it was
        let status = refused.expect_err("refused");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("too many"),
            "{}",
            status.message()
        );
        assert_eq!(calls.counts(), (0, 0, 0));
        assert_eq!(fake.verify_calls.load(Ordering::Relaxed), 0);
        assert_eq!(client.verifier.lock().waiting.len(), QUEUE_MAX);

        // Once there is room again, a request is queued and answered.
        client.verifier.lock().waiting.clear();
        drop(held);
        let answer = client.verifier.verify(request(), "after").await;
        assert_eq!(answer.expect("answered").openid, "late");
        settles(&client).await;
    }

    #[test]
    fn requests_that_are_gone_are_not_sent() {
        let mut queue = Queue::default();
        let mut answers = Vec::new();
        for i in 0..3 {
            let (reply, answer) = oneshot::channel();
            queue.waiting.push(Waiting {
                item: pb::VerifyBatchItem {
                    request: None,
                    request_id: format!("r{i}"),
                },
                reply,
                since: Instant::now(),
            });
            answers.push(answer);
        }
        drop(answers.remove(1));
        let ids: Vec<_> = Verifier::take(&mut queue)
            .into_iter()
            .map(|w| w.item.request_id)
            .collect();
        assert_eq!(ids, ["r0", "r2"]);
        assert!(queue.waiting.is_empty());
    }

    #[test]
    fn a_batch_refused_whole_is_nobodys_verdict() {
        let info = |reason: &str| {
            Status::with_error_details(
                Code::InvalidArgument,
                "must hold 1 to 1000 items",
                ErrorDetails::with_error_info(reason, "wxauth", HashMap::new()),
            )
        };
        // A reason the edge would show as the request's own: auth-service failing instead.
        let s = as_failure(info("INVALID_ARGUMENT"), "b1");
        assert_eq!(s.code(), Code::Internal);
        assert!(s.get_details_error_info().is_none());
        assert!(s.message().contains("b1"), "{}", s.message());
        // Anything else as it came (503 at the edge, with its own log line).
        let s = as_failure(info("CLIENT_KEY_INVALID"), "b1");
        assert_eq!(s.code(), Code::InvalidArgument);
        let s = as_failure(Status::unavailable("down"), "b1");
        assert_eq!(s.code(), Code::Unavailable);
    }
}
