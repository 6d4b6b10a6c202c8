//! Rollouts as Kubernetes does them, with the real binaries under a steady stream of
//! requests: the old process gets SIGTERM, drains (still answering for its drain delay, then
//! finishing what is in flight) and exits; a new one takes over. For auth-service the new
//! process takes the old one's address after a gap with none at all; for api-service it
//! starts on the same database. Every request is bounded by a client timeout: a timeout is
//! a failure, never a pass. What happened when is judged by order (a request sent before
//! SIGTERM, a line a process wrote before another), never by how long the machine took.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, RETRY_AFTER};
use serde_json::{Value, json};
use tests::harness::sim::{Fault, MintCode, http_client};
use tests::harness::stream::{RequestStream, Sample};
use tests::harness::{ApiProcess, AuthProcess, SimProcess};

use crate::common::{assert_lines_in_order, wait_for_wechat_call};

/// The client's timeout on every request (the slow login's included).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The stream's own bound on a request, in case a client timeout did not fire.
const PER_REQUEST: Duration = Duration::from_secs(40);
/// Between two requests of one client.
const PAUSE: Duration = Duration::from_millis(20);
/// The longest a stream runs, whatever happens: a guard against a hang.
const STREAM_LIMIT: Duration = Duration::from_secs(180);
/// The drain delay both services get here (as in deploy/): a request sent before SIGTERM
/// has this long to reach the process before its port closes, however busy the machine.
const DRAIN: Duration = Duration::from_secs(5);
/// How long WeChat takes to answer the slow login. It has reached WeChat when SIGTERM is
/// sent, so it is still in flight when the port closes [`DRAIN`] later, with 5 s to spare.
const SLOW: Duration = Duration::from_secs(10);
/// How long the auth-service rollout leaves no auth-service at all: room for requests that
/// start and end inside it.
const GAP: Duration = Duration::from_secs(2);
/// The services' `AUTH_WECHAT_TIMEOUT` here, well above [`SLOW`].
const WECHAT_TIMEOUT: &str = "20s";
/// The edge's deadline for a call that waits on WeChat: above twice [`WECHAT_TIMEOUT`] (a
/// busy WeChat is tried twice).
const API_WECHAT_TIMEOUT: &str = "45s";
/// The services' shutdown grace here: what is in flight when the port closes has this long
/// to finish (the slow login needs what [`SLOW`] has left after [`DRAIN`]).
const GRACE: &str = "30s";
/// The edge's own debug lines on: it writes one per answered request.
const EDGE_LOG: &str = "info,api_service=debug";
/// Requests each client of a stream finishes after the edge has recovered, before the
/// stream stops: the second of them is sent once the first has been answered.
const AFTER_RECOVERY: u64 = 3;

/// A duration as the services' settings read it.
fn setting(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// What one request came back with.
#[derive(Debug, Clone)]
enum Reply {
    /// An HTTP answer.
    Answer {
        status: StatusCode,
        retry_after: Option<String>,
        body: Value,
    },
    /// No connection could be made: nothing listens there.
    Refused(String),
    /// A connection, but no answer on it (closed or reset).
    Broken(String),
    /// No answer within the client's timeout: a hang.
    TimedOut,
}

impl Reply {
    fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Answer { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Why there was no answer, when there was none.
    fn failure(&self) -> Option<&str> {
        match self {
            Self::Answer { .. } => None,
            Self::Refused(why) | Self::Broken(why) => Some(why),
            Self::TimedOut => Some("timed out"),
        }
    }

    fn is(&self, want: StatusCode) -> bool {
        self.status() == Some(want)
    }

    /// 503 `auth_unavailable` with a Retry-After of whole seconds: the contract's answer
    /// when auth-service cannot be reached.
    fn is_auth_unavailable(&self) -> bool {
        matches!(self, Self::Answer { status, retry_after, body }
            if *status == StatusCode::SERVICE_UNAVAILABLE
                && body["error"]["code"] == "auth_unavailable"
                && retry_after.as_deref().is_some_and(|r| r.parse::<u64>().is_ok_and(|s| s >= 1)))
    }
}

/// Sends one request and reads the answer as JSON (an empty body as null).
async fn send(request: reqwest::RequestBuilder) -> Reply {
    match request.send().await {
        Ok(r) => {
            let status = r.status();
            let retry_after = r
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match r.bytes().await {
                Ok(bytes) => Reply::Answer {
                    status,
                    retry_after,
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                },
                Err(e) if e.is_timeout() => Reply::TimedOut,
                Err(e) => Reply::Broken(format!("{e:?}")),
            }
        }
        Err(e) if e.is_timeout() => Reply::TimedOut,
        Err(e) if e.is_connect() => Reply::Refused(format!("{e:?}")),
        Err(e) => Reply::Broken(format!("{e:?}")),
    }
}

/// A port nobody listens on now (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Logs a new user in through the edge at `base`; answers the access token.
async fn login(sim: &SimProcess, http: &reqwest::Client, base: &str) -> String {
    let m = sim.mint_code(&MintCode::default()).await.expect("mint");
    let reply = send(
        http.post(format!("{base}/v1/auth/login"))
            .header(CONTENT_TYPE, "application/json")
            .body(json!({"code": m.code}).to_string()),
    )
    .await;
    let Reply::Answer { status, body, .. } = &reply else {
        panic!("login: {reply:?}");
    };
    assert_eq!(*status, StatusCode::OK, "login: {body}");
    body["access_token"]
        .as_str()
        .expect("an access token")
        .to_owned()
}

/// A login through the edge still in flight: its WeChat call takes long.
struct SlowLogin {
    /// Its reply, when it comes.
    reply: tokio::task::JoinHandle<Reply>,
    /// The user it logs in.
    openid: String,
    /// The X-Request-Id it was sent with.
    request_id: String,
}

/// Starts a login through the edge whose WeChat call takes `delay`, and returns once that
/// call has reached WeChat: from then on the login is in flight for `delay`.
async fn slow_login(
    sim: &SimProcess,
    http: &reqwest::Client,
    base: &str,
    delay: Duration,
) -> SlowLogin {
    let m = sim.mint_code(&MintCode::default()).await.expect("mint");
    let millis = u64::try_from(delay.as_millis()).expect("a short delay");
    sim.add_fault(&Fault::delay(millis).for_code(&m.code))
        .await
        .expect("slow WeChat");
    let request_id = format!("rollout-slow-login-{}", uuid::Uuid::new_v4());
    let request = http
        .post(format!("{base}/v1/auth/login"))
        .header(CONTENT_TYPE, "application/json")
        .header("x-request-id", &request_id)
        .body(json!({"code": m.code}).to_string());
    let reply = tokio::spawn(send(request));
    wait_for_wechat_call(sim, &m.code).await;
    SlowLogin {
        reply,
        openid: m.openid,
        request_id,
    }
}

/// Waits (at most 60 s, a guard against a hang) until the edge at `base` answers an
/// authenticated request 200 again.
async fn wait_until_the_edge_answers(http: &reqwest::Client, base: &str, access: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let reply = send(http.get(format!("{base}/v1/me")).bearer_auth(access)).await;
        if reply.is(StatusCode::OK) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge did not answer 200 again within 60 s: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most 60 s, a guard against a hang) until every client of `stream` has
/// finished `more` requests after now.
async fn wait_for_more_requests<T: Send + 'static>(stream: &RequestStream<T>, more: u64) {
    let targets: Vec<u64> = (0..stream.clients())
        .map(|c| stream.completed(c) + more)
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while (0..stream.clients()).any(|c| stream.completed(c) < targets[c]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stream's clients did not finish {more} more requests within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts of replies by kind, for messages.
fn tally<T>(samples: &[Sample<T>], reply: impl Fn(&T) -> &Reply) -> String {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for s in samples {
        let key = match s.outcome.as_ref().map(&reply) {
            None => "hang".to_owned(),
            Some(Reply::Answer { status, .. }) => status.as_u16().to_string(),
            Some(Reply::Refused(_)) => "refused".to_owned(),
            Some(Reply::Broken(_)) => "broken".to_owned(),
            Some(Reply::TimedOut) => "timeout".to_owned(),
        };
        *counts.entry(key).or_default() += 1;
    }
    let mut counts: Vec<_> = counts.into_iter().collect();
    counts.sort();
    format!("{counts:?}")
}

#[tokio::test]
async fn an_auth_service_rollout_under_load_answers_503_with_retry_after_in_the_gap_and_recovers() {
    // Arrange: auth-service on a fixed address, as behind a Service name, so that its
    // successor can take it; the edge in front of it; a user; two clients reading steadily.
    let addr = format!("127.0.0.1:{}", free_port());
    let sim = SimProcess::start().await.expect("simulator");
    let drain = setting(DRAIN);
    let mut auth = AuthProcess::start(
        &sim,
        &[
            ("AUTH_GRPC_ADDR", addr.as_str()),
            ("AUTH_DRAIN_DELAY", drain.as_str()),
            ("AUTH_SHUTDOWN_GRACE", GRACE),
            ("AUTH_WECHAT_TIMEOUT", WECHAT_TIMEOUT),
        ],
    )
    .await
    .expect("auth-service");
    let api = ApiProcess::start(
        &auth,
        &[
            ("API_AUTH_TIMEOUT", "5s"),
            ("API_AUTH_WECHAT_TIMEOUT", API_WECHAT_TIMEOUT),
        ],
    )
    .await
    .expect("api-service");
    let http = http_client(CLIENT_TIMEOUT).expect("client");
    let base = api.base_url();
    let access = login(&sim, &http, &base).await;

    let stream = {
        let (http, base, access) = (http.clone(), base.clone(), access.clone());
        RequestStream::start(2, PAUSE, PER_REQUEST, STREAM_LIMIT, move |client, _| {
            let path = if client == 0 {
                "/v1/me"
            } else {
                "/v1/notes?limit=1"
            };
            let request = http.get(format!("{base}{path}")).bearer_auth(&access);
            async move { ControlFlow::Continue(send(request).await) }
        })
    };
    // Steady traffic before the rollout (a pace, not a wait for anything).
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Act: a slow login in flight, then the rollout: SIGTERM, drain, exit; a moment with no
    // auth-service at all; the new process on the same address, until the edge answers
    // again and each client has sent requests after that.
    let slow = slow_login(&sim, &http, &base, SLOW).await;
    let sigterm = stream.elapsed();
    auth.process_mut().terminate().expect("SIGTERM");
    let code = auth
        .process_mut()
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("the old auth-service exits");
    let exited = stream.elapsed();
    let old_logs = auth.logs();
    tokio::time::sleep(GAP).await;
    let relaunching = stream.elapsed();
    auth.relaunch().await.expect("the new auth-service starts");
    let back = stream.elapsed();
    wait_until_the_edge_answers(&http, &base, &access).await;
    wait_for_more_requests(&stream, AFTER_RECOVERY).await;
    let samples = stream.stop().await;
    let slow_reply = slow.reply.await.expect("the slow login's task");

    // Assert
    let ok = |s: &&Sample<Reply>| s.outcome.as_ref().is_some_and(|r| r.is(StatusCode::OK));
    // The edge recovered when the first request sent after the relaunch was answered 200.
    let recovered = samples
        .iter()
        .filter(|s| s.sent >= relaunching)
        .filter(ok)
        .map(Sample::done)
        .min();
    let summary = format!(
        "SIGTERM at {sigterm:?}, exited at {exited:?}, relaunched {relaunching:?}..{back:?}, \
         recovered at {recovered:?}; replies {}",
        tally(&samples, |r| r)
    );
    eprintln!("auth-service rollout: {summary}");
    assert_eq!(code, Some(0), "a graceful stop exits 0");
    assert!(
        slow_reply.is(StatusCode::OK),
        "the login in flight must finish: {slow_reply:?}"
    );
    // The slow login was in flight when the old process stopped taking calls: it finished
    // after, in that process's own order of events.
    let opened = format!(r#""openid":"{}""#, slow.openid);
    assert_lines_in_order(
        &old_logs,
        &[
            &["no longer accepting calls"],
            &[r#""message":"login""#, &opened],
            &[r#""message":"stopped""#],
        ],
    );
    let recovered = recovered
        .unwrap_or_else(|| panic!("no request was answered after the relaunch: {summary}"));
    for s in &samples {
        let reply = s
            .outcome
            .as_ref()
            .unwrap_or_else(|| panic!("a request hung: {s:?}; {summary}"));
        assert!(
            reply.is(StatusCode::OK) || reply.is_auth_unavailable(),
            "only 200, or 503 auth_unavailable with Retry-After: {s:?}; {summary}"
        );
        if s.sent < sigterm {
            assert!(
                reply.is(StatusCode::OK),
                "sent before SIGTERM, answered while the old process drains: {s:?}; {summary}"
            );
        }
        if s.sent > recovered {
            assert!(
                reply.is(StatusCode::OK),
                "once recovered, every request is answered: {s:?}; {summary}"
            );
        }
    }
    assert!(
        samples
            .iter()
            .filter(|s| s.sent > sigterm && s.sent < exited)
            .any(|s| ok(&s)),
        "no request sent after SIGTERM was answered by the draining process: {summary}"
    );
    let gap: Vec<_> = samples
        .iter()
        .filter(|s| s.sent >= exited && s.done() <= relaunching)
        .collect();
    assert!(
        !gap.is_empty()
            && gap
                .iter()
                .all(|s| s.outcome.as_ref().is_some_and(Reply::is_auth_unavailable)),
        "with no auth-service at all, every request is 503 auth_unavailable: {summary}"
    );
    for client in 0..2 {
        assert!(
            samples
                .iter()
                .any(|s| s.client == client && s.sent > recovered),
            "client {client} sent nothing after the recovery: {summary}"
        );
    }
}

/// What a writer sent: its Idempotency-Key and body, and the reply.
#[derive(Debug, Clone)]
struct Write {
    key: String,
    body: Value,
    reply: Reply,
}

/// Every note of the user behind `access`, by id, following the cursor.
async fn all_notes(http: &reqwest::Client, base: &str, access: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/notes?limit=100");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let reply = send(http.get(url).bearer_auth(access)).await;
        let Reply::Answer { status, body, .. } = &reply else {
            panic!("list notes: {reply:?}");
        };
        assert_eq!(*status, StatusCode::OK, "list notes: {body}");
        for item in body["items"].as_array().expect("items") {
            ids.push(item["id"].as_str().expect("an id").to_owned());
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return ids,
        }
    }
}

#[tokio::test]
async fn an_api_service_rollout_lets_in_flight_requests_finish_and_loses_no_acknowledged_write() {
    // Arrange: the edge with a drain delay; a user; two clients writing notes steadily, each
    // with its own Idempotency-Key, until the old process no longer takes connections.
    let sim = SimProcess::start().await.expect("simulator");
    let auth = AuthProcess::start(&sim, &[("AUTH_WECHAT_TIMEOUT", WECHAT_TIMEOUT)])
        .await
        .expect("auth-service");
    let drain = setting(DRAIN);
    let mut api = ApiProcess::start(
        &auth,
        &[
            ("API_DRAIN_DELAY", drain.as_str()),
            ("API_SHUTDOWN_GRACE", GRACE),
            ("API_AUTH_TIMEOUT", "5s"),
            ("API_AUTH_WECHAT_TIMEOUT", API_WECHAT_TIMEOUT),
            ("RUST_LOG", EDGE_LOG),
        ],
    )
    .await
    .expect("api-service");
    let http = http_client(CLIENT_TIMEOUT).expect("client");
    let old_base = api.base_url();
    let access = login(&sim, &http, &old_base).await;

    let stream = {
        let (http, base, access) = (http.clone(), old_base.clone(), access.clone());
        RequestStream::start(2, PAUSE, PER_REQUEST, STREAM_LIMIT, move |client, seq| {
            let key = format!("rollout-{client}-{seq}");
            let body = json!({"title": format!("note {client}-{seq}"), "body": "written during a rollout"});
            let request = http
                .post(format!("{base}/v1/notes"))
                .bearer_auth(&access)
                .header("idempotency-key", &key)
                .header(CONTENT_TYPE, "application/json")
                .body(body.to_string());
            async move {
                let reply = send(request).await;
                let gone = matches!(reply, Reply::Refused(_) | Reply::Broken(_));
                let write = Write { key, body, reply };
                // The old address stopped taking connections: a load balancer would send
                // this client elsewhere now.
                if gone {
                    ControlFlow::Break(write)
                } else {
                    ControlFlow::Continue(write)
                }
            }
        })
    };
    // Steady traffic before the rollout (a pace, not a wait for anything).
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Act: a slow login in flight, then the rollout: SIGTERM, drain, exit, and a new process
    // on the same database.
    let slow = slow_login(&sim, &http, &old_base, SLOW).await;
    let sigterm = stream.elapsed();
    let code = api
        .process_mut()
        .stop(Duration::from_secs(60))
        .await
        .expect("the old api-service stops");
    let old_logs = api.logs();
    api.relaunch().await.expect("the new api-service starts");
    let samples = stream.stop().await;
    let slow_reply = slow.reply.await.expect("the slow login's task");

    // Assert: what the old process answered.
    let summary = format!(
        "SIGTERM at {sigterm:?}; replies {}",
        tally(&samples, |w: &Write| &w.reply)
    );
    eprintln!("api-service rollout: {summary}");
    assert_eq!(code, Some(0), "a graceful stop exits 0");
    assert!(
        slow_reply.is(StatusCode::OK),
        "the slow request in flight must finish: {slow_reply:?}"
    );
    // The slow login was in flight when the old process closed its port: it answered it
    // after, in its own order of events.
    assert_lines_in_order(
        &old_logs,
        &[
            &["no longer accepting connections"],
            &[
                r#""message":"answered""#,
                &slow.request_id,
                r#""status":200"#,
            ],
            &[r#""message":"stopped""#],
        ],
    );
    let mut acknowledged = Vec::new();
    let mut unanswered = Vec::new();
    for s in &samples {
        let write = s
            .outcome
            .as_ref()
            .unwrap_or_else(|| panic!("a request hung: {s:?}; {summary}"));
        match &write.reply {
            Reply::Answer { status, body, .. } => {
                assert_eq!(
                    *status,
                    StatusCode::CREATED,
                    "every answered write is 201: {s:?}; {summary}"
                );
                acknowledged.push(body["id"].as_str().expect("a note id").to_owned());
            }
            Reply::Refused(_) | Reply::Broken(_) => {
                // Its failure came once the port had closed, which is no sooner than the
                // drain delay after SIGTERM (sent after `sigterm` was read).
                assert!(
                    s.done() >= sigterm + DRAIN,
                    "the port closed before the drain delay was over: {s:?}; {summary}"
                );
                unanswered.push(write.clone());
            }
            Reply::TimedOut => panic!("a write timed out: {s:?}; {summary}"),
        }
    }
    let during_drain = samples
        .iter()
        .filter(|s| {
            s.sent > sigterm
                && s.outcome
                    .as_ref()
                    .is_some_and(|w| w.reply.is(StatusCode::CREATED))
        })
        .count();
    assert!(
        during_drain > 0,
        "no write was answered between SIGTERM and the end of the drain delay: {summary}"
    );
    for w in &unanswered {
        eprintln!(
            "unanswered write {}: {}",
            w.key,
            w.reply.failure().unwrap_or_default()
        );
    }
    assert_eq!(
        unanswered.len(),
        2,
        "each client ends when the old process stops taking connections: {summary}"
    );

    // Assert: every acknowledged write is in the new process's answer; a write that got no
    // answer, retried with its Idempotency-Key, is created once.
    let new_base = api.base_url();
    let mut retried = Vec::new();
    for w in &unanswered {
        let reply = send(
            http.post(format!("{new_base}/v1/notes"))
                .bearer_auth(&access)
                .header("idempotency-key", &w.key)
                .header(CONTENT_TYPE, "application/json")
                .body(w.body.to_string()),
        )
        .await;
        let Reply::Answer { status, body, .. } = &reply else {
            panic!("the retry of {} got no answer: {reply:?}", w.key);
        };
        assert_eq!(*status, StatusCode::CREATED, "retry of {}: {body}", w.key);
        retried.push(body["id"].as_str().expect("a note id").to_owned());
    }
    let listed = all_notes(&http, &new_base, &access).await;
    let listed_set: HashSet<&String> = listed.iter().collect();
    assert_eq!(listed_set.len(), listed.len(), "a note is listed twice");
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|id| !listed_set.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged writes lost: {lost:?}; {summary}"
    );
    let expected: HashSet<&String> = acknowledged.iter().chain(&retried).collect();
    assert_eq!(
        listed_set, expected,
        "exactly the acknowledged and the retried writes, each once"
    );
}
