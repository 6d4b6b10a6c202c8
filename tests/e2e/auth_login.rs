//! Login against the simulator: success, every refusal before WeChat, every WeChat errcode,
//! retries, timeouts, races and the per-IP rate limit.

use proto::v1::DecryptDataRequest;
use serde_json::json;
use tests::harness::sim::{Encrypt, Fault, MintCode};
use tonic::Code;

use crate::common::{login_request, meta, reason, tokens, world};

#[tokio::test]
async fn first_login_creates_the_user_and_its_token_verifies() {
    // Arrange
    let mut w = world(&[]).await;
    let minted = w
        .sim
        .mint_code(&MintCode {
            with_unionid: true,
            ..MintCode::default()
        })
        .await
        .expect("mint");

    // Act
    let first = w
        .client
        .login(login_request(&minted.code, Some("dev-1"), "203.0.113.1"))
        .await
        .expect("login")
        .into_inner();

    // Assert
    assert!(first.is_new_user);
    assert_eq!(first.openid, minted.openid);
    assert_eq!(first.unionid, minted.unionid);
    assert!(first.unionid.is_some());
    let pair = first.tokens.as_ref().expect("tokens");
    assert_eq!(pair.token_type, "Bearer");
    assert!(pair.access_token.starts_with("wxa_") && pair.access_token.len() == 47);
    assert!(pair.refresh_token.starts_with("wxr_") && pair.refresh_token.len() == 47);
    assert!(
        (7190..=7200).contains(&pair.expires_in),
        "{}",
        pair.expires_in
    );
    assert!((30 * 86400 - 10..=30 * 86400).contains(&pair.refresh_expires_in));
    let id = w.verify(&pair.access_token).await.expect("verify");
    assert_eq!(id.openid, minted.openid);
    assert_eq!(id.session_id, first.session_id);
    assert_eq!(id.unionid, minted.unionid);

    // A second login of the same user is not new.
    let (_, second) = w.login_as(Some(&minted.openid), Some("dev-2")).await;
    assert!(!second.is_new_user);
    assert_eq!(second.openid, minted.openid);
    assert_ne!(second.session_id, first.session_id);
}

#[tokio::test]
async fn a_malformed_code_is_refused_before_wechat_is_called() {
    let mut w = world(&[]).await;
    let long = "a".repeat(129);
    for bad in ["", "has space", "semi;colon", "代码", long.as_str()] {
        let err = w
            .client
            .login(login_request(bad, None, "203.0.113.1"))
            .await
            .expect_err(bad);
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert_eq!(reason(&err), "INVALID_CODE", "{bad}");
        assert_eq!(meta(&err, "field").as_deref(), Some("code"));
    }
    assert_eq!(
        w.sim.endpoint_calls("jscode2session").await.expect("calls"),
        0
    );
}

#[tokio::test]
async fn a_replayed_code_is_refused_without_calling_wechat_again() {
    let mut w = world(&[]).await;
    let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");
    w.client
        .login(login_request(&minted.code, None, "203.0.113.1"))
        .await
        .expect("first use");

    let err = w
        .client
        .login(login_request(&minted.code, None, "203.0.113.1"))
        .await
        .expect_err("replay");

    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "CODE_USED");
    assert_eq!(w.sim.code_calls(&minted.code).await.expect("calls"), 1);
}

#[tokio::test]
async fn racing_logins_with_one_code_call_wechat_once() {
    // Arrange: WeChat answers slowly, so the logins overlap.
    let w = world(&[]).await;
    let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");
    w.sim
        .add_fault(&Fault::delay(400).for_code(&minted.code))
        .await
        .expect("fault");

    // Act
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = w.client.clone();
        let code = minted.code.clone();
        tasks.push(tokio::spawn(async move {
            c.login(login_request(&code, None, "203.0.113.1")).await
        }));
    }
    let mut ok = 0;
    let mut used = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => ok += 1,
            Err(e) if reason(&e) == "CODE_USED" => used += 1,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }

    // Assert
    assert_eq!((ok, used), (1, 7));
    assert_eq!(w.sim.code_calls(&minted.code).await.expect("calls"), 1);
}

#[tokio::test]
async fn each_wechat_errcode_maps_to_its_reason_with_errcode_and_errmsg() {
    let mut w = world(&[]).await;
    let cases = [
        (40029, Code::InvalidArgument, "WECHAT_INVALID_CODE"),
        (40163, Code::InvalidArgument, "WECHAT_CODE_USED"),
        (45011, Code::ResourceExhausted, "WECHAT_RATE_LIMITED"),
        (40226, Code::PermissionDenied, "WECHAT_RISKY_USER"),
        (40013, Code::FailedPrecondition, "WECHAT_ERROR"),
        (40125, Code::FailedPrecondition, "WECHAT_ERROR"),
        (40164, Code::FailedPrecondition, "WECHAT_ERROR"),
        (61234, Code::FailedPrecondition, "WECHAT_ERROR"),
    ];
    for (errcode, code, expected) in cases {
        let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");
        let mut fault = Fault::error(errcode).for_code(&minted.code);
        fault.errmsg = Some(format!("simulated {errcode}"));
        w.sim.add_fault(&fault).await.expect("fault");

        let err = w
            .client
            .login(login_request(&minted.code, None, "203.0.113.1"))
            .await
            .expect_err("WeChat refuses");

        assert_eq!(err.code(), code, "{errcode}");
        assert_eq!(reason(&err), expected, "{errcode}");
        assert_eq!(meta(&err, "wechat_errcode"), Some(errcode.to_string()));
        // As WeChat sent it (WeChat, and the simulator, may append a ", rid: ...").
        let errmsg = meta(&err, "wechat_errmsg").expect("errmsg");
        assert!(
            errmsg.starts_with(&format!("simulated {errcode}")),
            "{errmsg}"
        );
    }
}

#[tokio::test]
async fn real_wechat_refusals_pass_through() {
    let mut w = world(&[]).await;
    // A code WeChat never issued.
    let err = w
        .client
        .login(login_request("neverMintedCode123", None, "203.0.113.1"))
        .await
        .expect_err("unknown code");
    assert_eq!(reason(&err), "WECHAT_INVALID_CODE");
    assert_eq!(meta(&err, "wechat_errcode").as_deref(), Some("40029"));
    // A code of another app.
    let minted = w
        .sim
        .mint_code(&MintCode {
            appid: Some("wxotherapp000000001".into()),
            ..MintCode::default()
        })
        .await
        .expect("mint");
    let err = w
        .client
        .login(login_request(&minted.code, None, "203.0.113.1"))
        .await
        .expect_err("foreign code");
    assert_eq!(reason(&err), "WECHAT_INVALID_CODE");
}

#[tokio::test]
async fn busy_once_is_retried_and_succeeds() {
    let mut w = world(&[]).await;
    let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");
    w.sim
        .add_fault(&Fault::error(-1).for_code(&minted.code).once())
        .await
        .expect("fault");

    let answer = w
        .client
        .login(login_request(&minted.code, None, "203.0.113.1"))
        .await
        .expect("second attempt succeeds")
        .into_inner();

    assert_eq!(answer.openid, minted.openid);
    assert_eq!(w.sim.code_calls(&minted.code).await.expect("calls"), 2);
}

#[tokio::test]
async fn busy_twice_is_wechat_busy_after_exactly_one_retry() {
    let mut w = world(&[]).await;
    let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");
    w.sim
        .add_fault(&Fault::error(-1).for_code(&minted.code))
        .await
        .expect("fault");

    let err = w
        .client
        .login(login_request(&minted.code, None, "203.0.113.1"))
        .await
        .expect_err("busy");

    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(reason(&err), "WECHAT_BUSY");
    assert_eq!(meta(&err, "wechat_errcode").as_deref(), Some("-1"));
    assert_eq!(w.sim.code_calls(&minted.code).await.expect("calls"), 2);

    // The code was not spent: once WeChat recovers, it logs in.
    w.sim.clear_faults().await.expect("clear");
    w.client
        .login(login_request(&minted.code, None, "203.0.113.1"))
        .await
        .expect("login after recovery");
}

#[tokio::test]
async fn wechat_hanging_or_dropping_is_wechat_unavailable_within_the_timeout() {
    let mut w = world(&[("AUTH_WECHAT_TIMEOUT", "500ms")]).await;
    for fault in [Fault::hang(), Fault::drop_connection()] {
        let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");
        w.sim
            .add_fault(&fault.clone().for_code(&minted.code))
            .await
            .expect("fault");

        let err = w
            .client
            .login(login_request(&minted.code, None, "203.0.113.1"))
            .await
            .expect_err("no answer from WeChat");

        // auth-service's own answer, with its reason: for the hang (which never ends) that
        // is its WeChat timeout firing. Had only the client's 30 s deadline ended the call,
        // it would be DEADLINE_EXCEEDED or CANCELLED, with no ErrorInfo.
        assert_eq!(err.code(), Code::Unavailable, "{fault:?}: {err:?}");
        assert_eq!(reason(&err), "WECHAT_UNAVAILABLE", "{fault:?}");
    }
}

#[tokio::test]
async fn a_login_whose_answer_was_lost_after_wechat_used_the_code_asks_for_a_new_one() {
    // Arrange: WeChat exchanges the code, then the connection drops before its answer.
    let mut w = world(&[]).await;
    let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");
    w.sim
        .add_fault(&Fault::drop_after_processing().for_code(&minted.code).once())
        .await
        .expect("fault");
    let request = || login_request(&minted.code, None, "203.0.113.1");

    // Act / Assert: no answer; the code is not remembered as used here (no success was
    // seen), so the retry asks WeChat, which says it is spent: the client calls wx.login again.
    let err = w
        .client
        .login(request())
        .await
        .expect_err("the answer was lost");
    assert_eq!(reason(&err), "WECHAT_UNAVAILABLE");
    let err = w
        .client
        .login(request())
        .await
        .expect_err("spent at WeChat");
    assert_eq!(reason(&err), "WECHAT_CODE_USED");
    assert_eq!(meta(&err, "wechat_errcode").as_deref(), Some("40163"));
    assert_eq!(w.sim.code_calls(&minted.code).await.expect("calls"), 2);
    let fresh = w
        .sim
        .mint_code(&MintCode::for_openid(&minted.openid))
        .await
        .expect("mint");
    w.client
        .login(login_request(&fresh.code, None, "203.0.113.1"))
        .await
        .expect("a new code logs in");
}

#[tokio::test]
async fn wechat_unreachable_is_wechat_unavailable() {
    // Arrange: a simulator that is gone.
    let mut w = world(&[("AUTH_WECHAT_TIMEOUT", "1s")]).await;
    let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");
    w.sim.process_mut().kill().await.expect("kill simulator");

    let err = w
        .client
        .login(login_request(&minted.code, None, "203.0.113.1"))
        .await
        .expect_err("unreachable");

    assert_eq!(reason(&err), "WECHAT_UNAVAILABLE");
}

#[tokio::test]
async fn logins_over_the_rate_for_one_ip_are_refused_without_calling_wechat() {
    let mut w = world(&[("AUTH_LOGIN_RATE", "3/min")]).await;
    for _ in 0..3 {
        let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");
        w.client
            .login(login_request(&minted.code, None, "198.51.100.9"))
            .await
            .expect("within the rate");
    }
    let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");

    let err = w
        .client
        .login(login_request(&minted.code, None, "198.51.100.9"))
        .await
        .expect_err("over the rate");

    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "RATE_LIMITED");
    let retry: u64 = meta(&err, "retry_after_secs")
        .expect("retry_after_secs")
        .parse()
        .expect("a number");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(w.sim.code_calls(&minted.code).await.expect("calls"), 0);
    // Another address has its own budget, and the refused code still works there.
    w.client
        .login(login_request(&minted.code, None, "198.51.100.10"))
        .await
        .expect("another IP");
}

#[tokio::test]
async fn a_malformed_device_or_client_ip_is_refused_with_its_field() {
    let mut w = world(&[]).await;
    let minted = w.sim.mint_code(&MintCode::default()).await.expect("mint");
    let mut req = login_request(&minted.code, Some(&"x".repeat(129)), "203.0.113.1");
    let err = w
        .client
        .login(req.clone())
        .await
        .expect_err("long device id");
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
    assert_eq!(meta(&err, "field").as_deref(), Some("device.id"));

    req.device = None;
    req.client_ip = "not-an-ip".into();
    let err = w.client.login(req).await.expect_err("bad ip");
    assert_eq!(meta(&err, "field").as_deref(), Some("client_ip"));
    assert_eq!(w.sim.code_calls(&minted.code).await.expect("calls"), 0);
}

#[tokio::test]
async fn each_login_stores_the_users_newest_session_key() {
    // The key itself never leaves auth-service; what a caller can see is that data the
    // phone seals under the key WeChat gave its login decrypts there, login after login,
    // each of which rotates the user's key.
    let mut w = world(&[]).await;
    let mut openid: Option<String> = None;
    let mut keys: Vec<String> = Vec::new();
    let mut access_tokens = Vec::new();
    for (n, device) in ["phone", "tablet", "watch"].into_iter().enumerate() {
        // Act: one more device logs in.
        let (minted, login) = w.login_as(openid.as_deref(), Some(device)).await;
        let (access, _) = tokens(login.tokens.as_ref());

        // Assert: data sealed under this login's key (the user's newest) decrypts.
        assert!(
            !keys.contains(&minted.session_key),
            "WeChat rotated the key"
        );
        let sealed = w
            .sim
            .encrypt(&Encrypt::with_session_key(
                &minted.session_key,
                json!({"login": n}),
            ))
            .await
            .expect("encrypt");
        let answer = w
            .client
            .decrypt_data(DecryptDataRequest {
                access_token: access.clone(),
                encrypted_data: sealed.encrypted_data,
                iv: sealed.iv,
            })
            .await
            .unwrap_or_else(|e| panic!("login {n} ({device}): its key is not held: {e:?}"))
            .into_inner();
        let data: serde_json::Value =
            serde_json::from_str(&answer.data_json).expect("data_json is JSON");
        assert_eq!(data["login"], n, "{data}");

        openid = Some(minted.openid);
        keys.push(minted.session_key);
        access_tokens.push(access);
    }
    // Every device stays logged in under the default policy.
    for t in &access_tokens {
        w.verify(t).await.expect("every session lives");
    }
}
