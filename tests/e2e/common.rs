//! What the auth-service end-to-end tests share: a simulator plus a real auth-service per
//! test, and small readers for gRPC errors.

use proto::v1::{
    Device, ListSessionEventsRequest, LoginRequest, LoginResponse, RefreshRequest, RefreshResponse,
    SessionEvent, VerifyRequest, VerifyResponse,
};
use std::time::Duration;
use tests::harness::sim::{MintCode, MintedCode};
use tests::harness::{AuthClient, AuthProcess, SimProcess};

use tokio::time::Instant;
use tonic::Status;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;

/// `Verify` of `access_token` on `client`: the token's openid, or the refusal.
pub(crate) async fn verify_openid(
    client: &mut AuthClient,
    access_token: &str,
) -> Result<String, Status> {
    client
        .verify(VerifyRequest {
            access_token: access_token.to_owned(),
            include_phone: false,
        })
        .await
        .map(|r| r.into_inner().openid)
}

/// One test's world: its own simulator and its own auth-service.
pub(crate) struct World {
    pub(crate) sim: SimProcess,
    pub(crate) auth: AuthProcess,
    pub(crate) client: AuthClient,
}

/// Starts a simulator and an auth-service with `extra` settings.
pub(crate) async fn world(extra: &[(&str, &str)]) -> World {
    let sim = SimProcess::start().await.expect("simulator starts");
    let auth = AuthProcess::start(&sim, extra)
        .await
        .expect("auth-service starts");
    let client = auth.client().await.expect("client connects");
    World { sim, auth, client }
}

/// The ErrorInfo reason of a failed call.
pub(crate) fn reason(s: &Status) -> String {
    let info = s
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo on {s:?}"));
    assert_eq!(info.domain, "wxauth", "{s:?}");
    info.reason
}

/// One ErrorInfo metadata entry of a failed call.
pub(crate) fn meta(s: &Status, key: &str) -> Option<String> {
    s.get_details_error_info()
        .and_then(|i| i.metadata.get(key).cloned())
}

/// A client IP of its own (in 2001:db8::/32, the documentation range), for logins whose
/// address does not matter: every test auth-service has the same appid, so on the shared
/// test Redis one fixed address would share one login-rate window across parallel tests
/// and across runs.
pub(crate) fn random_client_ip() -> String {
    let random = uuid::Uuid::new_v4().as_u128();
    format!(
        "2001:db8:{:x}:{:x}::1",
        random & 0xffff,
        (random >> 16) & 0xffff
    )
}

/// A login request for `code` from `device_id` (if any) and client IP `ip`.
pub(crate) fn login_request(code: &str, device_id: Option<&str>, ip: &str) -> LoginRequest {
    LoginRequest {
        code: code.to_owned(),
        device: device_id.map(|id| Device {
            id: id.to_owned(),
            platform: "ios".to_owned(),
            model: "iPhone 15".to_owned(),
        }),
        client_ip: ip.to_owned(),
    }
}

impl World {
    /// Mints a code for `openid` (a new user when None) and logs in with it, from an
    /// address of its own.
    pub(crate) async fn login_as(
        &mut self,
        openid: Option<&str>,
        device_id: Option<&str>,
    ) -> (MintedCode, LoginResponse) {
        let mint = match openid {
            Some(o) => MintCode::for_openid(o),
            None => MintCode::default(),
        };
        let minted = self.sim.mint_code(&mint).await.expect("mint a code");
        let answer = self
            .client
            .login(login_request(&minted.code, device_id, &random_client_ip()))
            .await
            .expect("login succeeds")
            .into_inner();
        (minted, answer)
    }

    /// Verify, as a Result.
    pub(crate) async fn verify(&mut self, access_token: &str) -> Result<VerifyResponse, Status> {
        self.client
            .verify(VerifyRequest {
                access_token: access_token.to_owned(),
                include_phone: false,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Refresh, as a Result.
    pub(crate) async fn refresh(&mut self, refresh_token: &str) -> Result<RefreshResponse, Status> {
        self.client
            .refresh(RefreshRequest {
                refresh_token: refresh_token.to_owned(),
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// The newest page of a user's session timeline.
    pub(crate) async fn events(&mut self, openid: &str) -> Vec<SessionEvent> {
        self.client
            .list_session_events(ListSessionEventsRequest {
                openid: openid.to_owned(),
                ..Default::default()
            })
            .await
            .expect("ListSessionEvents")
            .into_inner()
            .events
    }

    /// The reason Verify refuses `access_token` with (panics if it accepts it).
    pub(crate) async fn verify_refused(&mut self, access_token: &str) -> String {
        let err = self
            .verify(access_token)
            .await
            .expect_err("Verify must refuse this token");
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        reason(&err)
    }
}

/// The access and refresh tokens of a login or refresh answer.
pub(crate) fn tokens(pair: Option<&proto::v1::TokenPair>) -> (String, String) {
    let p = pair.expect("a token pair");
    (p.access_token.clone(), p.refresh_token.clone())
}

/// The health service name auth-service reports Redis under.
const REDIS_HEALTH: &str = "wxauth.redis";

/// Waits (at most 30 s) until `auth` reports Redis as `want`.
pub(crate) async fn wait_for_redis_health(auth: &AuthProcess, want: ServingStatus) {
    wait_for_health(auth, REDIS_HEALTH, want).await;
}

/// Waits (at most 30 s, a guard against a hang) until `auth` reports `service` ("" for the
/// whole server) as `want`.
pub(crate) async fn wait_for_health(auth: &AuthProcess, service: &str, want: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = auth.health(service).await;
        if matches!(now, Ok(s) if s == want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "health of {service:?} is {now:?}, not {want:?}; auth-service's output:\n{}",
            auth.logs().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (at most 30 s, a guard against a hang) until the simulator has seen a WeChat call
/// with `code`: the request that carries it has reached WeChat. With a delay staged for the
/// code, it is in flight there from then on.
pub(crate) async fn wait_for_wechat_call(sim: &SimProcess, code: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let calls = sim
            .code_calls(code)
            .await
            .expect("the simulator's call counts");
        if calls > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no WeChat call with code {code} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that `logs` (one process's lines, in the order it wrote them) hold a line for each
/// of `steps` in that order, a line matching a step when it holds every fragment of it: the
/// order in which the process did things, whatever the time each took.
pub(crate) fn assert_lines_in_order(logs: &[String], steps: &[&[&str]]) {
    let mut from = 0;
    for step in steps {
        match logs[from..]
            .iter()
            .position(|line| step.iter().all(|fragment| line.contains(fragment)))
        {
            Some(i) => from += i + 1,
            None => panic!(
                "no line with {step:?} after line {from} of the logs (steps {steps:?}):\n{}",
                logs.join("\n")
            ),
        }
    }
}

/// Waits (at most 30 s) for a log line that satisfies `wanted`, reading `logs()` as lines
/// arrive rather than once after a guessed sleep: answers the line, or every line read by
/// the deadline (for the caller's failure message).
pub(crate) async fn wait_for_log_line(
    logs: impl Fn() -> Vec<String>,
    wanted: impl Fn(&str) -> bool,
) -> Result<String, Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lines = logs();
        if let Some(line) = lines.iter().find(|l| wanted(l)) {
            return Ok(line.clone());
        }
        if Instant::now() >= deadline {
            return Err(lines);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops `process` gracefully (SIGTERM), checks that it exits 0, and answers every line it
/// wrote: read after the exit, once its pipes are drained, so that no line is still on its
/// way when a test looks for what must not be there. The logs must hold the services' own
/// `stopped` line (written once serving is over), so an empty or cut-short capture cannot
/// pass for clean logs.
pub(crate) async fn stop_and_read_logs(process: &mut tests::harness::Process) -> String {
    let code = process
        .stop(Duration::from_secs(30))
        .await
        .expect("the process stops on SIGTERM");
    let logs = process.logs();
    assert_eq!(
        code,
        Some(0),
        "a graceful stop exits 0; output:\n{}",
        logs.join("\n")
    );
    assert!(
        logs.iter().any(|l| l.contains(r#""message":"stopped""#)),
        "the logs were not captured to the end (no \"stopped\" line in {} lines):\n{}",
        logs.len(),
        logs.join("\n")
    );
    logs.join("\n")
}
