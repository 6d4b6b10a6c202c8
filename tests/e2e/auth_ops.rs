//! Running auth-service: client keys, health and reflection, request ids, settings refused
//! at start, restarts that keep every session, a graceful stop, and no secret anywhere it
//! must not be.

use std::time::Duration;

use proto::v1::{
    GetWechatAccessTokenRequest, ListSessionEventsRequest, ListSessionsRequest, LogoutRequest,
    RevokeUserRequest, VerifyRequest,
};
use tests::harness::auth::TOKEN_KEY;
use tests::harness::sim::{APPID, Fault, MintCode, SECRET};
use tests::harness::{Process, SimProcess};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::common::{
    assert_lines_in_order, login_request, reason, stop_and_read_logs, tokens, wait_for_health,
    wait_for_log_line, wait_for_wechat_call, world,
};

const KEY_A: &str = "client-key-a-0123456789abcdef0123456789";
const KEY_B: &str = "client-key-b-0123456789abcdef0123456789";

/// The services auth-service's reflection lists, asked in reflection's `$version` (`v1`,
/// which grpcurl 1.8.8 and later speak, or `v1alpha`, which older tools speak).
macro_rules! reflected_services {
    ($version:ident, $auth:expr) => {{
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;

        let channel = tests::harness::auth::channel($auth.addr())
            .await
            .expect("channel");
        let mut client = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = client
            .server_reflection_info(tokio_stream::once(request))
            .await
            .expect("reflection")
            .into_inner();
        let answer = answers
            .message()
            .await
            .expect("an answer")
            .expect("not empty");
        match answer.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => list
                .service
                .into_iter()
                .map(|s| s.name)
                .collect::<Vec<String>>(),
            other => panic!("unexpected reflection answer {other:?}"),
        }
    }};
}

#[tokio::test]
async fn client_keys_guard_every_rpc_but_health_and_reflection() {
    let keys = format!("{KEY_A},{KEY_B}");
    let w = world(&[("AUTH_CLIENT_KEYS", keys.as_str())]).await;
    let verify = || VerifyRequest {
        access_token: "wxa_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
        include_phone: false,
    };

    for key in [
        None,
        Some("wrong-key-0123456789abcdef0123456789".to_owned()),
    ] {
        let mut c = w.auth.client_with_key(key.clone()).await.expect("client");
        let err = c.verify(verify()).await.expect_err("no valid key");
        assert_eq!(err.code(), Code::Unauthenticated, "{key:?}");
        assert_eq!(reason(&err), "CLIENT_KEY_INVALID", "{key:?}");
    }
    // Either configured key passes the layer (and reaches Verify, which judges the token).
    for key in [KEY_A, KEY_B] {
        let mut c = w
            .auth
            .client_with_key(Some(key.to_owned()))
            .await
            .expect("client");
        let err = c.verify(verify()).await.expect_err("unknown token");
        assert_eq!(reason(&err), "TOKEN_INVALID");
    }
    // Health answers anyone.
    assert_eq!(
        w.auth.health("").await.expect("health"),
        ServingStatus::Serving
    );
    assert_eq!(
        w.auth
            .health("wxauth.v1.AuthService")
            .await
            .expect("health"),
        ServingStatus::Serving
    );
    // Reflection answers anyone, in both its versions, and lists the service.
    let services = reflected_services!(v1, w.auth);
    let older = reflected_services!(v1alpha, w.auth);
    for service in ["wxauth.v1.AuthService", "grpc.health.v1.Health"] {
        assert!(older.iter().any(|s| s == service), "v1alpha: {older:?}");
    }
    assert!(
        services.contains(&"wxauth.v1.AuthService".to_owned()),
        "{services:?}"
    );
    assert!(
        services.contains(&"grpc.health.v1.Health".to_owned()),
        "{services:?}"
    );
}

#[tokio::test]
async fn with_operator_keys_the_operators_rpcs_refuse_a_clients_key() {
    // Arrange: the edge's key in AUTH_CLIENT_KEYS, an operator's in AUTH_OPERATOR_KEYS.
    let w = world(&[("AUTH_CLIENT_KEYS", KEY_A), ("AUTH_OPERATOR_KEYS", KEY_B)]).await;
    let mut edge = w
        .auth
        .client_with_key(Some(KEY_A.into()))
        .await
        .expect("client");
    let mut operator = w
        .auth
        .client_with_key(Some(KEY_B.into()))
        .await
        .expect("client");
    let revoke = || RevokeUserRequest {
        openid: "o-nobody-0123456789".into(),
    };
    let timeline = || ListSessionEventsRequest {
        openid: "o-nobody-0123456789".into(),
        ..Default::default()
    };

    // Act
    let edge_revokes = edge
        .revoke_user(revoke())
        .await
        .expect_err("not an operator");
    let edge_reads = edge
        .list_session_events(timeline())
        .await
        .expect_err("not an operator");
    let edge_takes = edge
        .get_wechat_access_token(GetWechatAccessTokenRequest::default())
        .await
        .expect_err("not an operator");
    let operator_revokes = operator
        .revoke_user(revoke())
        .await
        .expect_err("no such user");
    let operator_verifies = operator
        .verify(VerifyRequest {
            access_token: "wxa_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
            include_phone: false,
        })
        .await
        .expect_err("unknown token");

    // Assert: the client's key is refused for each operators' RPC before it runs; the
    // operator's key reaches the RPCs, which judge the request (an unknown user, an
    // unknown token).
    for err in [&edge_revokes, &edge_reads, &edge_takes] {
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert_eq!(reason(err), "OPERATOR_KEY_REQUIRED");
    }
    assert_eq!(reason(&operator_revokes), "NOT_FOUND");
    assert_eq!(reason(&operator_verifies), "TOKEN_INVALID");
}

#[tokio::test]
async fn request_ids_are_echoed_or_made_and_logged() {
    let mut w = world(&[]).await;
    let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");

    let mut req = tonic::Request::new(login_request(&minted.code, None, "203.0.113.1"));
    req.metadata_mut()
        .insert("x-request-id", "req-e2e-0001".parse().expect("ascii"));
    let answer = w.client.login(req).await.expect("login");
    assert_eq!(
        answer
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("req-e2e-0001")
    );

    // No id, or a malformed one: a fresh one is made.
    let mut req = tonic::Request::new(VerifyRequest::default());
    req.metadata_mut()
        .insert("x-request-id", "has spaces in it".parse().expect("ascii"));
    let err = w.client.verify(req).await.expect_err("missing token");
    let made = err
        .metadata()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("an id on errors too")
        .to_owned();
    assert_ne!(made, "has spaces in it");
    assert_eq!(made.len(), 36, "{made}");

    // The login's log line carries the caller's id (read as it arrives, within a deadline).
    let line = wait_for_log_line(
        || w.auth.logs(),
        |l| l.contains("req-e2e-0001") && l.contains("\"login\""),
    )
    .await;
    if let Err(logs) = line {
        panic!("no log line with the request id:\n{}", logs.join("\n"));
    }
}

#[tokio::test]
async fn a_missing_or_malformed_setting_stops_start_up_naming_it() {
    let sim = SimProcess::start().await.expect("sim");
    let dir = tempfile::tempdir().expect("dir");
    let base = [
        ("AUTH_GRPC_ADDR", "127.0.0.1:0".to_owned()),
        (
            "AUTH_DATABASE_URL",
            format!("sqlite://{}/a.db", dir.path().display()),
        ),
        ("WECHAT_APPID", APPID.to_owned()),
        ("WECHAT_SECRET", SECRET.to_owned()),
        ("WECHAT_API_BASE", sim.base_url()),
        ("AUTH_TOKEN_KEY", TOKEN_KEY.to_owned()),
    ];
    let cases: [(&str, Option<&str>); 5] = [
        ("AUTH_TOKEN_KEY", None),
        ("WECHAT_SECRET", None),
        ("AUTH_TOKEN_KEY", Some("too-short")),
        ("AUTH_ACCESS_TTL", Some("forever")),
        ("AUTH_CLIENT_KEYS", Some("tiny-key-xyz")),
    ];
    for (name, value) in cases {
        let mut env: Vec<(String, String)> = base
            .iter()
            .filter(|(k, _)| *k != name)
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        if let Some(v) = value {
            env.push((name.to_owned(), v.to_owned()));
        }
        let mut p = Process::spawn("auth-service", &env, dir.path()).expect("spawn");
        let code = p.wait_exit(Duration::from_secs(20)).await.expect("exits");
        assert_eq!(code, Some(2), "{name}={value:?}");
        let out = p.logs().join("\n");
        assert!(out.contains(name), "{name}: {out}");
        if let Some(v) = value {
            assert!(!out.contains(v), "the value of {name} was echoed: {out}");
        }
    }
}

#[tokio::test]
async fn a_restart_keeps_every_session_and_every_revocation() {
    let mut w = world(&[]).await;
    let (minted, a) = w.login_as(None, Some("a")).await;
    let (_, b) = w.login_as(Some(&minted.openid), Some("b")).await;
    let (_, c) = w.login_as(Some(&minted.openid), Some("c")).await;
    let (a_access, _) = tokens(a.tokens.as_ref());
    let (b_access, b_refresh) = tokens(b.tokens.as_ref());
    let (c_access, _) = tokens(c.tokens.as_ref());
    w.client
        .logout(LogoutRequest {
            access_token: c_access.clone(),
            all: false,
        })
        .await
        .expect("logout c");

    let code = w.auth.restart().await.expect("restart");
    w.client = w.auth.client().await.expect("reconnect");

    assert_eq!(code, Some(0), "a graceful stop exits 0");
    w.verify(&a_access).await.expect("a survives");
    w.verify(&b_access).await.expect("b survives");
    assert_eq!(w.verify_refused(&c_access).await, "TOKEN_REVOKED");
    let r = w.refresh(&b_refresh).await.expect("refresh after restart");
    w.verify(&tokens(r.tokens.as_ref()).0)
        .await
        .expect("new pair");
    let sessions = w
        .client
        .list_sessions(ListSessionsRequest {
            access_token: a_access,
        })
        .await
        .expect("list")
        .into_inner()
        .sessions;
    assert_eq!(sessions.len(), 2);
}

#[tokio::test]
async fn sigterm_reports_not_serving_lets_in_flight_calls_finish_and_exits_0() {
    // Arrange: WeChat answers this code after 10 s (auth-service waits up to 20 s for it);
    // after SIGTERM the process reports NOT_SERVING for 5 s, then takes no more calls and
    // gives those in flight up to 30 s. A login reaches WeChat before the signal.
    let mut w = world(&[
        ("AUTH_DRAIN_DELAY", "5s"),
        ("AUTH_WECHAT_TIMEOUT", "20s"),
        ("AUTH_SHUTDOWN_GRACE", "30s"),
    ])
    .await;
    let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");
    w.sim
        .add_fault(&Fault::delay(10_000).for_code(&minted.code))
        .await
        .expect("slow WeChat");
    let mut c = w.client.clone();
    let code = minted.code.clone();
    let in_flight =
        tokio::spawn(async move { c.login(login_request(&code, None, "203.0.113.1")).await });
    wait_for_wechat_call(&w.sim, &minted.code).await;

    // Act
    w.auth.process_mut().terminate().expect("SIGTERM");

    // Assert: NOT_SERVING, still answering; the login answered; a clean exit.
    wait_for_health(&w.auth, "", ServingStatus::NotServing).await;
    let answer = in_flight
        .await
        .expect("task")
        .expect("the in-flight login finishes");
    assert_eq!(answer.into_inner().openid, minted.openid);
    let exit = w
        .auth
        .process_mut()
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("exits");
    assert_eq!(exit, Some(0));
    // And the login was in flight when the process stopped taking calls: it finished after,
    // in the process's own order of events.
    let opened = format!(r#""openid":"{}""#, minted.openid);
    assert_lines_in_order(
        &w.auth.logs(),
        &[
            &["stopping: reporting NOT_SERVING"],
            &["no longer accepting calls"],
            &[r#""message":"login""#, &opened],
            &[r#""message":"stopped""#],
        ],
    );
}

#[tokio::test]
async fn on_sigterm_a_login_whose_caller_gave_up_still_finishes_before_exit() {
    // Arrange: WeChat answers this code after 5 s (auth-service waits up to 20 s for it, and
    // gives what is in flight up to 30 s once stopping).
    let mut w = world(&[
        ("AUTH_WECHAT_TIMEOUT", "20s"),
        ("AUTH_SHUTDOWN_GRACE", "30s"),
    ])
    .await;
    let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");
    w.sim
        .add_fault(&Fault::delay(5000).for_code(&minted.code))
        .await
        .expect("slow WeChat");
    let mut c = w.client.clone();
    let code = minted.code.clone();
    let call =
        tokio::spawn(async move { c.login(login_request(&code, None, "203.0.113.1")).await });
    // Once the login waits on WeChat, its caller gives up: the call's future is dropped and
    // its stream reset, as the edge's is at its deadline, while the login runs on.
    wait_for_wechat_call(&w.sim, &minted.code).await;
    call.abort();
    let gave_up = call.await.expect_err("the caller gave up before an answer");
    assert!(gave_up.is_cancelled(), "{gave_up:?}");

    // Act: the process is told to stop while that login still waits on WeChat.
    let logs = stop_and_read_logs(w.auth.process_mut()).await;

    // Assert: it waited for the login within its shutdown grace: the session was opened
    // (and the code remembered as spent) after the signal and before it stopped.
    let opened = format!(r#""openid":"{}""#, minted.openid);
    let logs: Vec<String> = logs.lines().map(str::to_owned).collect();
    assert_lines_in_order(
        &logs,
        &[
            &["stopping: reporting NOT_SERVING"],
            &[r#""message":"login""#, &opened],
            &[r#""message":"stopped""#],
        ],
    );
}

#[tokio::test]
async fn with_its_log_pipes_closed_auth_service_still_answers_and_stops_on_sigterm() {
    // Debug logs: every call writes lines, each to a pipe nobody reads any more.
    let mut w = world(&[("RUST_LOG", "debug")]).await;
    w.auth.process_mut().close_output().await;

    for _ in 0..3 {
        assert_eq!(
            w.auth.health("").await.expect("answers"),
            ServingStatus::Serving
        );
    }
    let exit = w.auth.process_mut().stop(Duration::from_secs(15)).await;
    assert_eq!(exit.expect("exits"), Some(0));
}

#[tokio::test]
async fn no_token_session_key_secret_or_key_reaches_the_logs_or_the_database_in_clear() {
    // Arrange: debug logs, a client key, and every path that logs: logins, a WeChat
    // failure, a dropped connection, refresh, reuse, logout, revocation.
    let mut w = world(&[
        ("RUST_LOG", "debug"),
        ("AUTH_CLIENT_KEYS", KEY_A),
        ("AUTH_REFRESH_GRACE", "500ms"),
        ("AUTH_WECHAT_TIMEOUT", "1s"),
    ])
    .await;
    let mut secrets: Vec<String> = vec![SECRET.into(), TOKEN_KEY.into(), KEY_A.into()];
    let mut raw_keys: Vec<Vec<u8>> = Vec::new();

    let (a, login_a) = w.login_as(None, Some("dev-a")).await;
    let (b, login_b) = w.login_as(Some(&a.openid), Some("dev-b")).await;
    for m in [&a, &b] {
        secrets.push(m.session_key.clone());
        raw_keys.push(base64_decode(&m.session_key));
        secrets.push(m.code.clone());
    }
    let (a_access, a_refresh) = tokens(login_a.tokens.as_ref());
    let (b_access, _) = tokens(login_b.tokens.as_ref());
    secrets.extend([a_access.clone(), a_refresh.clone(), b_access.clone()]);
    let r = w.refresh(&a_refresh).await.expect("refresh");
    let (a2_access, a2_refresh) = tokens(r.tokens.as_ref());
    secrets.extend([a2_access.clone(), a2_refresh]);
    // Past the 500 ms grace, the old refresh token again: a reuse, which ends the session.
    // Each failure below is the one it is there for: a path that failed earlier (a refused
    // token, say) would leave its logging unaudited.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let reuse = w.refresh(&a_refresh).await.expect_err("a reuse");
    assert_eq!(reason(&reuse), "REFRESH_TOKEN_REUSED", "{reuse:?}");
    for (fault, expected) in [
        (Fault::error(40125), "WECHAT_ERROR"),
        (Fault::drop_connection(), "WECHAT_UNAVAILABLE"),
    ] {
        let m = w.sim.mint_code(&MintCode::default()).await.expect("mint");
        secrets.push(m.code.clone());
        secrets.push(m.session_key.clone());
        w.sim
            .add_fault(&fault.for_code(&m.code))
            .await
            .expect("fault");
        let failed = w
            .client
            .login(login_request(&m.code, None, "203.0.113.1"))
            .await
            .expect_err("WeChat fails this login");
        assert_eq!(reason(&failed), expected, "{failed:?}");
    }
    w.client
        .logout(LogoutRequest {
            access_token: b_access,
            all: true,
        })
        .await
        .expect("logout");

    // Assert: every file of the database (main file, WAL, shared memory), while it runs.
    assert_no_secret_in_files(w.auth.data_dir(), &secrets, &raw_keys);

    // Assert: the logs, read once the process has exited and every line it wrote is in.
    let logs = stop_and_read_logs(w.auth.process_mut()).await;
    assert!(logs.contains("\"login\""), "the logs are being captured");
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "the logs contain a secret: {s}");
        // A token's random part alone counts too.
        if let Some(body) = s.strip_prefix("wxa_").or_else(|| s.strip_prefix("wxr_")) {
            assert!(!logs.contains(body), "the logs contain a token body");
        }
    }
    // And the database as the stopped process left it (every write landed, WAL folded in).
    assert_no_secret_in_files(w.auth.data_dir(), &secrets, &raw_keys);
}

/// Every file in `dir` (the database, its WAL and shared memory) holds none of `secrets`, no
/// raw session_key and no token prefix.
fn assert_no_secret_in_files(dir: &std::path::Path, secrets: &[String], raw_keys: &[Vec<u8>]) {
    let mut files = 0;
    for entry in std::fs::read_dir(dir).expect("data dir") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read db file");
        files += 1;
        for s in secrets {
            assert!(
                !contains(&bytes, s.as_bytes()),
                "{} holds a secret in clear: {s}",
                path.display()
            );
        }
        for k in raw_keys {
            assert!(
                !contains(&bytes, k),
                "{} holds a raw session_key",
                path.display()
            );
        }
        assert!(!contains(&bytes, b"wxa_") && !contains(&bytes, b"wxr_"));
    }
    assert!(files >= 1);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("session_key is base64")
}

/// `VerifyRequest` as a caller in another language could send it: field 1 as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawVerifyRequest {
    #[prost(bytes = "vec", tag = "1")]
    access_token: Vec<u8>,
}

#[tokio::test]
async fn a_request_tonic_cannot_decode_is_invalid_argument_in_the_contracts_shape() {
    // Arrange: an access token that is not UTF-8, which protobuf's `string` refuses.
    let w = world(&[]).await;
    let channel = tests::harness::auth::channel(w.auth.addr())
        .await
        .expect("channel");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = http::uri::PathAndQuery::from_static("/wxauth.v1.AuthService/Verify");
    let codec = tonic_prost::ProstCodec::<RawVerifyRequest, proto::v1::VerifyResponse>::default();

    // Act
    let err = grpc
        .unary(
            tonic::Request::new(RawVerifyRequest {
                access_token: vec![0xff, 0xfe],
            }),
            path,
            codec,
        )
        .await
        .expect_err("not UTF-8");

    // Assert: not INTERNAL, and with the ErrorInfo every failure carries.
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
}
