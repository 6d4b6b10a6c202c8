//! Sensitive data over real gRPC against the real binaries: encryptedData decrypted with the
//! user's session_keys, the phone number exchanged once per code and shown only to its owner,
//! and the app's WeChat access_token fetched once for every replica, force-refreshed once
//! when WeChat refuses it. None of it may reach the logs or the database in clear.

use std::time::Duration;

use proto::v1::{
    DecryptDataRequest, DecryptDataResponse, GetPhoneNumberRequest, GetPhoneNumberResponse,
    GetWechatAccessTokenRequest, VerifyRequest,
};
use serde_json::{Value, json};
use tests::harness::auth::TOKEN_KEY;
use tests::harness::external::{External, postgres_database, redis};
use tests::harness::sim::{APPID, Encrypt, Encrypted, Fault, MintCode, MintPhoneCode, SECRET};
use tests::harness::{AuthClient, AuthProcess, SimProcess};
use tonic::{Code, Status};

use crate::common::{
    login_request, meta, random_client_ip, reason, stop_and_read_logs, tokens, world,
};

const CLIENT_KEY: &str = "client-key-sensitive-0123456789abcdef";

/// WeRun-like data, as `wx.getWeRunData` would encrypt it (the simulator adds the watermark).
fn run_data(steps: u64) -> Value {
    json!({"stepInfoList": [{"timestamp": 1_700_000_000, "step": steps}]})
}

async fn decrypt(
    client: &mut AuthClient,
    access_token: &str,
    e: &Encrypted,
) -> Result<DecryptDataResponse, Status> {
    client
        .decrypt_data(DecryptDataRequest {
            access_token: access_token.to_owned(),
            encrypted_data: e.encrypted_data.clone(),
            iv: e.iv.clone(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn phone(
    client: &mut AuthClient,
    access_token: &str,
    code: &str,
) -> Result<GetPhoneNumberResponse, Status> {
    client
        .get_phone_number(GetPhoneNumberRequest {
            access_token: access_token.to_owned(),
            code: code.to_owned(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The phone number Verify answers when asked for it.
async fn verify_phone(
    client: &mut AuthClient,
    access_token: &str,
) -> Option<GetPhoneNumberResponse> {
    client
        .verify(VerifyRequest {
            access_token: access_token.to_owned(),
            include_phone: true,
        })
        .await
        .expect("Verify")
        .into_inner()
        .phone
}

/// The decrypted JSON of a DecryptData answer.
fn json_of(answer: &DecryptDataResponse) -> Value {
    serde_json::from_str(&answer.data_json).expect("data_json is JSON")
}

/// Mints a code for a new user, logs in on `client` from an address of its own; answers
/// (openid, access token).
async fn new_user(sim: &SimProcess, client: &mut AuthClient) -> (String, String) {
    let minted = sim.mint_code(&MintCode::default()).await.expect("mint");
    let login = client
        .login(login_request(&minted.code, None, &random_client_ip()))
        .await
        .expect("login")
        .into_inner();
    (minted.openid, tokens(login.tokens.as_ref()).0)
}

#[tokio::test]
async fn auth_decrypt_data_opens_data_of_either_device_until_two_rotations_later() {
    // Arrange: device A logs in, then device B: the user's session_key rotates.
    let mut w = world(&[]).await;
    let (a, login_a) = w.login_as(None, Some("device-a")).await;
    let (b, login_b) = w.login_as(Some(&a.openid), Some("device-b")).await;
    assert_ne!(a.session_key, b.session_key, "a login rotates the key");
    let (token_a, _) = tokens(login_a.tokens.as_ref());
    let (token_b, _) = tokens(login_b.tokens.as_ref());
    // B's data uses the current key; A encrypted with its key before B logged in.
    let from_b = w
        .sim
        .encrypt(&Encrypt::for_openid(&a.openid, run_data(4321)))
        .await
        .expect("encrypt with the current key");
    let from_a = w
        .sim
        .encrypt(&Encrypt::with_session_key(&a.session_key, run_data(1234)))
        .await
        .expect("encrypt with the previous key");

    // Act / Assert: either session decrypts either device's data.
    for token in [&token_a, &token_b] {
        for (data, steps) in [(&from_b, 4321), (&from_a, 1234)] {
            let answer = decrypt(&mut w.client, token, data)
                .await
                .expect("a held session_key decrypts it");
            let json = json_of(&answer);
            assert_eq!(json["stepInfoList"][0]["step"], steps);
            assert_eq!(json["watermark"]["appid"], APPID);
        }
    }

    // A third login: A's key is now two rotations old and no longer held.
    let (c, login_c) = w.login_as(Some(&a.openid), Some("device-c")).await;
    let (token_c, _) = tokens(login_c.tokens.as_ref());
    for token in [&token_a, &token_c] {
        let err = decrypt(&mut w.client, token, &from_a)
            .await
            .expect_err("A's key is gone");
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert_eq!(reason(&err), "SESSION_KEY_STALE");
        // B's data is one rotation old: still fine.
        decrypt(&mut w.client, token, &from_b)
            .await
            .expect("B's key is the previous one");
    }
    let from_c = w
        .sim
        .encrypt(&Encrypt::with_session_key(&c.session_key, run_data(7)))
        .await
        .expect("encrypt");
    decrypt(&mut w.client, &token_a, &from_c)
        .await
        .expect("the newest key");
}

#[tokio::test]
async fn a_login_that_keeps_the_session_key_does_not_push_the_previous_one_out() {
    // Arrange: A logs in (key 1), B logs in (key 2, key 1 previous); data sealed with each.
    let mut w = world(&[]).await;
    let (a, _) = w.login_as(None, Some("device-a")).await;
    let (b, login_b) = w.login_as(Some(&a.openid), Some("device-b")).await;
    let (token_b, _) = tokens(login_b.tokens.as_ref());
    let sealed_with = |key: &str, steps: u64| Encrypt::with_session_key(key, run_data(steps));
    let from_a = w
        .sim
        .encrypt(&sealed_with(&a.session_key, 1))
        .await
        .expect("encrypt");
    let from_b = w
        .sim
        .encrypt(&sealed_with(&b.session_key, 2))
        .await
        .expect("encrypt");

    // Act: a third login at which WeChat hands out the same key again (it *may* rotate).
    let kept = w
        .sim
        .mint_code(&MintCode {
            keep_session_key: true,
            ..MintCode::for_openid(&a.openid)
        })
        .await
        .expect("mint");
    assert_eq!(
        kept.session_key, b.session_key,
        "the simulator kept the key"
    );
    let login_c = w
        .client
        .login(login_request(&kept.code, Some("device-c"), "203.0.113.7"))
        .await
        .expect("login")
        .into_inner();
    let (token_c, _) = tokens(login_c.tokens.as_ref());

    // Assert: the key before it is still held (a rotation would have pushed key 1 out).
    for token in [&token_b, &token_c] {
        for (data, steps) in [(&from_a, 1), (&from_b, 2)] {
            let answer = decrypt(&mut w.client, token, data)
                .await
                .expect("both keys are still held");
            assert_eq!(json_of(&answer)["stepInfoList"][0]["step"], steps);
        }
    }
}

#[tokio::test]
async fn auth_decrypt_data_tells_bad_input_from_another_apps_watermark() {
    let mut w = world(&[]).await;
    let (minted, login) = w.login_as(None, None).await;
    let (token, _) = tokens(login.tokens.as_ref());

    // Decrypts with the user's key, but made for another app.
    let foreign = w
        .sim
        .encrypt(&Encrypt::for_openid(&minted.openid, run_data(1)).appid("wx0000000000000bad"))
        .await
        .expect("encrypt");
    let err = decrypt(&mut w.client, &token, &foreign)
        .await
        .expect_err("another app's data");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(reason(&err), "WATERMARK_MISMATCH");

    // Not base64, or of the wrong length: the field at fault is named.
    let good = w
        .sim
        .encrypt(&Encrypt::for_openid(&minted.openid, run_data(2)))
        .await
        .expect("encrypt");
    let cases = [
        ("not base64!", good.iv.as_str(), "encrypted_data"),
        ("", good.iv.as_str(), "encrypted_data"),
        ("AAAA", good.iv.as_str(), "encrypted_data"), // 3 bytes
        (
            "AAAAAAAAAAAAAAAAAAAAAAA=",
            good.iv.as_str(),
            "encrypted_data",
        ), // 17 bytes
        (good.encrypted_data.as_str(), "AAAAAAAAAAAAAAAAAAAA", "iv"), // 15 bytes
        (good.encrypted_data.as_str(), "r7BX XKkL", "iv"),
        (good.encrypted_data.as_str(), "", "iv"),
    ];
    for (encrypted_data, iv, field) in cases {
        let bad = Encrypted {
            encrypted_data: encrypted_data.to_owned(),
            iv: iv.to_owned(),
        };
        let err = decrypt(&mut w.client, &token, &bad)
            .await
            .expect_err("malformed input");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{encrypted_data:?} {err:?}"
        );
        assert_eq!(reason(&err), "INVALID_ENCRYPTED_DATA", "{encrypted_data:?}");
        assert_eq!(
            meta(&err, "field").as_deref(),
            Some(field),
            "{encrypted_data:?}"
        );
    }
    // Well-formed, but no key of the user's turns it into JSON: stale, not bad input.
    let garbage = Encrypted {
        encrypted_data: "AAAAAAAAAAAAAAAAAAAAAA==".to_owned(), // 16 bytes
        iv: good.iv.clone(),
    };
    let err = decrypt(&mut w.client, &token, &garbage)
        .await
        .expect_err("garbage");
    assert_eq!(reason(&err), "SESSION_KEY_STALE");

    // A garbled token is refused before anything else.
    let err = decrypt(&mut w.client, "wxa_nope", &good)
        .await
        .expect_err("bad token");
    assert_eq!(err.code(), Code::Unauthenticated);
    decrypt(&mut w.client, &token, &good)
        .await
        .expect("the good pair still decrypts");
}

#[tokio::test]
async fn auth_phone_number_is_exchanged_once_kept_and_shown_only_to_its_owner() {
    let mut w = world(&[]).await;
    let (owner, owner_token) = new_user(&w.sim, &mut w.client).await;
    let (other, other_token) = new_user(&w.sim, &mut w.client).await;
    let code = w
        .sim
        .mint_phone_code(&MintPhoneCode::new("13800138000").for_openid(&owner))
        .await
        .expect("mint a phone code");

    // Nothing known yet.
    let err = phone(&mut w.client, &owner_token, "")
        .await
        .expect_err("no number yet");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "PHONE_NOT_SET");
    assert_eq!(verify_phone(&mut w.client, &owner_token).await, None);

    // The exchange.
    let got = phone(&mut w.client, &owner_token, &code)
        .await
        .expect("the exchange");
    assert_eq!(got.phone_number, "13800138000");
    assert_eq!(got.pure_phone_number, "13800138000");
    assert_eq!(got.country_code, "86");

    // Kept: the owner reads it back without a code; another user does not see it.
    assert_eq!(
        phone(&mut w.client, &owner_token, "").await.expect("kept"),
        got
    );
    // Verify hands it over only when asked, and only the token owner's.
    assert_eq!(
        verify_phone(&mut w.client, &owner_token).await,
        Some(got.clone())
    );
    assert_eq!(verify_phone(&mut w.client, &other_token).await, None);
    let plain = w
        .client
        .verify(VerifyRequest {
            access_token: owner_token.clone(),
            include_phone: false,
        })
        .await
        .expect("Verify")
        .into_inner();
    assert_eq!(plain.phone, None);
    let err = phone(&mut w.client, &other_token, "")
        .await
        .expect_err("not another user's");
    assert_eq!(reason(&err), "PHONE_NOT_SET");

    // The code again, by its owner or anyone: CODE_USED, and WeChat is not called again.
    for token in [&owner_token, &other_token] {
        let err = phone(&mut w.client, token, &code)
            .await
            .expect_err("a replay");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(reason(&err), "CODE_USED");
    }
    assert_eq!(w.sim.code_calls(&code).await.expect("calls"), 1);

    // A foreign number, with countryCode answered as a JSON number, for the other user.
    w.sim
        .set_country_code_as_number(true)
        .await
        .expect("format");
    let hk = w
        .sim
        .mint_phone_code(
            &MintPhoneCode::new("61234567")
                .country_code("852")
                .for_openid(&other),
        )
        .await
        .expect("mint");
    let got_hk = phone(&mut w.client, &other_token, &hk)
        .await
        .expect("the exchange");
    assert_eq!(got_hk.country_code, "852");
    assert_eq!(got_hk.pure_phone_number, "61234567");
    assert_eq!(got_hk.phone_number, "+85261234567");
    // Each user still sees only their own.
    assert_eq!(
        phone(&mut w.client, &owner_token, "")
            .await
            .expect("kept")
            .pure_phone_number,
        "13800138000"
    );
    assert_eq!(
        phone(&mut w.client, &other_token, "").await.expect("kept"),
        got_hk
    );
    // Verify shows the new number at once, though it answered "none" for this user before
    // (auth-service on SQLite keeps the numbers in memory: a write must drop what it kept).
    assert_eq!(
        verify_phone(&mut w.client, &other_token).await,
        Some(got_hk.clone())
    );
    // One access_token served both exchanges.
    assert_eq!(
        w.sim.endpoint_calls("stable_token").await.expect("calls"),
        1
    );
}

#[tokio::test]
async fn auth_a_number_sealed_under_a_former_token_key_is_none_until_bound_again() {
    // Arrange: a user with a number.
    let mut w = world(&[]).await;
    let (owner, token) = new_user(&w.sim, &mut w.client).await;
    let code = w
        .sim
        .mint_phone_code(&MintPhoneCode::new("13800138000").for_openid(&owner))
        .await
        .expect("mint a phone code");
    phone(&mut w.client, &token, &code)
        .await
        .expect("the exchange");

    // Act: AUTH_TOKEN_KEY changes (everyone is logged out) on the same database, and the
    // user logs in again.
    w.auth
        .process_mut()
        .stop(Duration::from_secs(20))
        .await
        .expect("auth-service stops");
    let database = format!("sqlite://{}", w.auth.db_path().display());
    let auth = AuthProcess::start(
        &w.sim,
        &[
            ("AUTH_DATABASE_URL", database.as_str()),
            (
                "AUTH_TOKEN_KEY",
                "a-new-token-key-after-a-rotation-0123456789",
            ),
        ],
    )
    .await
    .expect("auth-service starts with a new key");
    let mut client = auth.client().await.expect("client");
    let minted = w
        .sim
        .mint_code(&MintCode::for_openid(&owner))
        .await
        .expect("mint");
    let login = client
        .login(login_request(&minted.code, None, "203.0.113.9"))
        .await
        .expect("login")
        .into_inner();
    let (token, _) = tokens(login.tokens.as_ref());

    // Assert: no number (the old one cannot be read), not an error on every call.
    assert_eq!(verify_phone(&mut client, &token).await, None);
    let err = phone(&mut client, &token, "")
        .await
        .expect_err("no readable number");
    assert_eq!(reason(&err), "PHONE_NOT_SET");
    // Bound again, it is there.
    let code = w
        .sim
        .mint_phone_code(&MintPhoneCode::new("13900139000").for_openid(&owner))
        .await
        .expect("mint a phone code");
    phone(&mut client, &token, &code)
        .await
        .expect("the exchange");
    assert_eq!(
        verify_phone(&mut client, &token)
            .await
            .map(|p| p.pure_phone_number),
        Some("13900139000".to_owned())
    );
}

#[tokio::test]
async fn auth_phone_code_races_and_wechat_errors_make_no_second_billed_call() {
    // One user makes more exchanges here than AUTH_PHONE_RATE's default allows a minute
    // (the limit has a test of its own).
    let mut w = world(&[("AUTH_PHONE_RATE", "1000/min")]).await;
    let (owner, token) = new_user(&w.sim, &mut w.client).await;

    // Eight racing requests with one code (WeChat slow, so that they overlap): one call.
    let code = w
        .sim
        .mint_phone_code(&MintPhoneCode::new("13700137000").for_openid(&owner))
        .await
        .expect("mint");
    w.sim
        .add_fault(
            &Fault::delay(300)
                .on_endpoint("getuserphonenumber")
                .for_code(&code),
        )
        .await
        .expect("slow WeChat");
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let mut c = w.client.clone();
            let (token, code) = (token.clone(), code.clone());
            tokio::spawn(async move { phone(&mut c, &token, &code).await })
        })
        .collect();
    let mut won = 0;
    for racer in racers {
        match racer.await.expect("join") {
            Ok(got) => {
                won += 1;
                assert_eq!(got.pure_phone_number, "13700137000");
            }
            Err(err) => assert_eq!(reason(&err), "CODE_USED", "{err:?}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(w.sim.code_calls(&code).await.expect("calls"), 1);

    // A code of another user: WeChat refuses it (the openid is sent), errcode passed through;
    // the code is not spent, so its owner can still use it.
    let (_, other_token) = new_user(&w.sim, &mut w.client).await;
    let owned = w
        .sim
        .mint_phone_code(&MintPhoneCode::new("13600136000").for_openid(&owner))
        .await
        .expect("mint");
    let err = phone(&mut w.client, &other_token, &owned)
        .await
        .expect_err("not this user's code");
    assert_eq!(reason(&err), "WECHAT_INVALID_CODE");
    assert_eq!(meta(&err, "wechat_errcode").as_deref(), Some("40029"));
    phone(&mut w.client, &token, &owned)
        .await
        .expect("its owner's exchange");

    // WeChat busy once: retried once, and it works.
    let busy = w
        .sim
        .mint_phone_code(&MintPhoneCode::new("13500135000").for_openid(&owner))
        .await
        .expect("mint");
    w.sim
        .add_fault(
            &Fault::error(-1)
                .on_endpoint("getuserphonenumber")
                .for_code(&busy)
                .once(),
        )
        .await
        .expect("fault");
    phone(&mut w.client, &token, &busy)
        .await
        .expect("the retry succeeds");
    assert_eq!(w.sim.code_calls(&busy).await.expect("calls"), 2);

    // WeChat unreachable: WECHAT_UNAVAILABLE, and the code stays usable.
    let dropped = w
        .sim
        .mint_phone_code(&MintPhoneCode::new("13400134000").for_openid(&owner))
        .await
        .expect("mint");
    w.sim
        .add_fault(
            &Fault::drop_connection()
                .on_endpoint("getuserphonenumber")
                .for_code(&dropped)
                .once(),
        )
        .await
        .expect("fault");
    let err = phone(&mut w.client, &token, &dropped)
        .await
        .expect_err("no answer");
    assert_eq!(reason(&err), "WECHAT_UNAVAILABLE");
    phone(&mut w.client, &token, &dropped)
        .await
        .expect("a later try works");

    // WeChat exchanged (and billed) the code, but its answer was lost: nothing here can
    // tell that from a call WeChat never saw, so the code is released and a retry asks
    // WeChat once more, which says the code is spent; a new code from the button binds it.
    let lost = w
        .sim
        .mint_phone_code(&MintPhoneCode::new("13300133000").for_openid(&owner))
        .await
        .expect("mint");
    w.sim
        .add_fault(
            &Fault::drop_after_processing()
                .on_endpoint("getuserphonenumber")
                .for_code(&lost)
                .once(),
        )
        .await
        .expect("fault");
    let err = phone(&mut w.client, &token, &lost)
        .await
        .expect_err("the answer was lost");
    assert_eq!(reason(&err), "WECHAT_UNAVAILABLE");
    let err = phone(&mut w.client, &token, &lost)
        .await
        .expect_err("spent at WeChat");
    assert_eq!(reason(&err), "WECHAT_INVALID_CODE");
    assert_eq!(w.sim.code_calls(&lost).await.expect("calls"), 2);
    let kept = verify_phone(&mut w.client, &token)
        .await
        .expect("the number bound before");
    assert_ne!(kept.pure_phone_number, "13300133000");

    // Malformed codes never reach WeChat.
    let err = phone(&mut w.client, &token, "bad code!")
        .await
        .expect_err("malformed");
    assert_eq!(reason(&err), "INVALID_CODE");
    assert_eq!(meta(&err, "field").as_deref(), Some("code"));
}

#[tokio::test]
async fn auth_an_expired_access_token_is_force_refreshed_once_and_the_exchange_retried() {
    let mut w = world(&[]).await;
    let (owner, token) = new_user(&w.sim, &mut w.client).await;
    let first = w
        .sim
        .mint_phone_code(&MintPhoneCode::new("13300133000").for_openid(&owner))
        .await
        .expect("mint");
    phone(&mut w.client, &token, &first)
        .await
        .expect("warms the access_token");
    assert_eq!(
        w.sim.endpoint_calls("stable_token").await.expect("calls"),
        1
    );

    // WeChat now says the token expired (42001) though auth-service thinks it has hours.
    w.sim.expire_access_token(None).await.expect("expire");
    let code = w
        .sim
        .mint_phone_code(&MintPhoneCode::new("13300133001").for_openid(&owner))
        .await
        .expect("mint");
    let got = phone(&mut w.client, &token, &code)
        .await
        .expect("succeeds after one forced refresh");
    assert_eq!(got.pure_phone_number, "13300133001");

    assert_eq!(w.sim.code_calls(&code).await.expect("calls"), 2);
    assert_eq!(
        w.sim.endpoint_calls("stable_token").await.expect("calls"),
        2
    );
    let state = w.sim.access_token().await.expect("state");
    assert_eq!(state.force_refreshes_today, 1);
}

#[tokio::test]
async fn auth_get_wechat_access_token_answers_the_one_token_behind_client_keys() {
    let w = world(&[("AUTH_CLIENT_KEYS", CLIENT_KEY)]).await;
    let mut keyless = w.auth.client_with_key(None).await.expect("client");
    let err = keyless
        .get_wechat_access_token(GetWechatAccessTokenRequest::default())
        .await
        .expect_err("an internal RPC");
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "CLIENT_KEY_INVALID");
    assert_eq!(
        w.sim.endpoint_calls("stable_token").await.expect("calls"),
        0
    );

    let mut client = w.client.clone();
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(
            client
                .get_wechat_access_token(GetWechatAccessTokenRequest::default())
                .await
                .expect("the token")
                .into_inner(),
        );
    }
    let state = w.sim.access_token().await.expect("state");
    let current = state.access_token.expect("the simulator issued one");
    for answer in &seen {
        assert_eq!(answer.access_token, current);
        let expires = answer.expires_at.as_ref().expect("expires_at").seconds;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        assert!(
            expires > now + 3600,
            "about two hours ahead: {expires} vs {now}"
        );
    }
    assert_eq!(
        w.sim.endpoint_calls("stable_token").await.expect("calls"),
        1
    );
}

#[tokio::test]
async fn auth_an_access_token_in_its_last_five_minutes_is_renewed_before_it_expires() {
    let mut w = world(&[]).await;
    let mut token = async || {
        w.client
            .get_wechat_access_token(GetWechatAccessTokenRequest::default())
            .await
            .expect("the token")
            .into_inner()
            .access_token
    };
    // Tokens that live 10 s, which WeChat never issues: each is already in its renewal window
    // (the last 5 minutes) when issued. Such a token is held for half its life (at most a
    // minute) after WeChat answered it, not renewed at every call, then renewed.
    w.sim.set_access_token_lifetime(10).await.expect("lifetime");
    let short = token().await;
    assert_eq!(token().await, short, "held, not renewed at every call");
    tokio::time::sleep(SHORT_TOKEN_HELD).await;
    let renewed = token().await;
    assert_ne!(short, renewed, "renewed before it expired");
    // Renewals never force: the token replaced still works until its own end.
    let state = w.sim.access_token().await.expect("state");
    assert_eq!(state.force_refreshes_today, 0);
    let info = state
        .tokens
        .iter()
        .find(|i| i.access_token == short)
        .expect("issued");
    assert_eq!(info.status, "valid", "{info:?}");

    // Normal lifetimes again: one more renewal once the short token's hold is over, then the
    // token is simply reused.
    w.sim
        .set_access_token_lifetime(7200)
        .await
        .expect("lifetime");
    tokio::time::sleep(SHORT_TOKEN_HELD).await;
    let long = token().await;
    assert_ne!(long, renewed);
    assert_eq!(token().await, long);
    assert_eq!(token().await, long);
    assert_eq!(
        w.sim.endpoint_calls("stable_token").await.expect("calls"),
        3
    );
}

/// A little more than auth-service holds a 10 s token WeChat answered (half its life).
const SHORT_TOKEN_HELD: Duration = Duration::from_millis(5_500);

#[tokio::test]
async fn auth_a_failed_renewal_hands_out_the_working_token_without_asking_wechat_again() {
    let mut w = world(&[]).await;
    // A token that lives 10 s: in its renewal window from the start, still working.
    w.sim.set_access_token_lifetime(10).await.expect("lifetime");
    let mut token = async || {
        w.client
            .get_wechat_access_token(GetWechatAccessTokenRequest::default())
            .await
            .expect("the token")
            .into_inner()
            .access_token
    };
    let held = token().await;
    assert_eq!(
        w.sim.endpoint_calls("stable_token").await.expect("calls"),
        1
    );

    // Act: WeChat refuses every renewal; once the token's hold is over (half its life),
    // callers keep asking.
    w.sim
        .add_fault(&Fault::error(45009).on_endpoint("stable_token"))
        .await
        .expect("a failing stable_token");
    assert_eq!(token().await, held, "held");
    assert_eq!(
        w.sim.endpoint_calls("stable_token").await.expect("calls"),
        1,
        "a held token is not renewed"
    );
    tokio::time::sleep(SHORT_TOKEN_HELD).await;
    let answers = [token().await, token().await, token().await];

    // Assert: the working token each time, and one renewal tried for all of them.
    assert!(answers.iter().all(|t| *t == held));
    assert_eq!(
        w.sim.endpoint_calls("stable_token").await.expect("calls"),
        2
    );
}

#[tokio::test]
async fn auth_with_no_working_token_a_failed_renewal_is_answered_again_without_asking_wechat() {
    // Arrange: no token yet, and WeChat refuses every renewal (an app's bad credentials).
    let mut w = world(&[]).await;
    w.sim
        .add_fault(&Fault::error(40013).on_endpoint("stable_token"))
        .await
        .expect("a failing stable_token");

    // Act: three callers in turn, within the 15 s WeChat is left alone after a failure.
    let mut failures = Vec::new();
    for _ in 0..3 {
        failures.push(
            w.client
                .get_wechat_access_token(GetWechatAccessTokenRequest::default())
                .await
                .expect_err("no token to hand out"),
        );
    }

    // Assert: each gets WeChat's answer; WeChat was asked once.
    for failure in &failures {
        assert_eq!(reason(failure), "WECHAT_ERROR", "{failure:?}");
        assert_eq!(
            crate::common::meta(failure, "wechat_errcode").as_deref(),
            Some("40013")
        );
    }
    assert_eq!(
        w.sim.endpoint_calls("stable_token").await.expect("calls"),
        1
    );
}

#[tokio::test]
async fn auth_a_caller_that_reports_the_current_token_refused_gets_one_forced_refresh() {
    let mut w = world(&[]).await;
    let mut token = async |refused: &str| {
        w.client
            .get_wechat_access_token(GetWechatAccessTokenRequest {
                refused_access_token: refused.to_owned(),
            })
            .await
            .expect("the token")
            .into_inner()
            .access_token
    };
    let first = token("").await;
    // A token that is not ours, reported refused, changes nothing.
    assert_eq!(token("not-a-token-of-ours").await, first);

    // Act: WeChat ends the token behind auth-service's back; an internal caller meets the
    // 40001 and says so, twice (say two of its workers did).
    let ended = w
        .sim
        .invalidate_access_token(None)
        .await
        .expect("invalidate");
    assert_eq!(ended, vec![first.clone()]);
    let renewed = token(&first).await;
    let again = token(&first).await;

    // Assert: one forced refresh, and the new token for both.
    assert_ne!(renewed, first);
    assert_eq!(again, renewed);
    assert_eq!(token("").await, renewed);
    let state = w.sim.access_token().await.expect("state");
    assert_eq!(state.force_refreshes_today, 1);
    assert_eq!(state.access_token.as_deref(), Some(renewed.as_str()));
}

/// Two auth-service replicas on one PostgreSQL database and one Redis, or `None` to skip.
async fn two_replicas(test: &str) -> Option<(SimProcess, [AuthProcess; 2])> {
    let External::Run(redis_url) = redis(test) else {
        return None;
    };
    let External::Run(db) = postgres_database(test).await.expect("database") else {
        return None;
    };
    let sim = SimProcess::start().await.expect("simulator");
    let env = [
        ("AUTH_DATABASE_URL", db.as_str()),
        ("AUTH_REDIS_URL", redis_url.as_str()),
        ("AUTH_WECHAT_TIMEOUT", "5s"),
    ];
    let a = AuthProcess::start(&sim, &env).await.expect("auth A");
    let b = AuthProcess::start(&sim, &env).await.expect("auth B");
    Some((sim, [a, b]))
}

/// `n` users, each logged in on one replica in turn, with a phone code each: (client of the
/// replica to ask, access token, code, number).
async fn users_with_codes(
    sim: &SimProcess,
    clients: &[AuthClient; 2],
    n: usize,
    first_number: u64,
) -> Vec<(AuthClient, String, String, String)> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut client = clients[i % 2].clone();
        let (openid, token) = new_user(sim, &mut client).await;
        let number = (first_number + i as u64).to_string();
        let code = sim
            .mint_phone_code(&MintPhoneCode::new(&number).for_openid(&openid))
            .await
            .expect("mint");
        // Each asks on the other replica than it logged in on.
        out.push((clients[(i + 1) % 2].clone(), token, code, number));
    }
    out
}

/// Runs every exchange at once; each must succeed with its own number.
async fn exchange_all(requests: Vec<(AuthClient, String, String, String)>) {
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|(mut client, token, code, number)| {
            tokio::spawn(async move {
                let got = phone(&mut client, &token, &code).await;
                (got, number)
            })
        })
        .collect();
    for task in tasks {
        let (got, number) = task.await.expect("join");
        let got = got.unwrap_or_else(|e| panic!("the exchange for {number} failed: {e:?}"));
        assert_eq!(got.pure_phone_number, number);
    }
}

#[tokio::test]
async fn auth_a_number_written_on_one_replica_is_what_the_other_answers_next() {
    let Some((sim, [a, b])) = two_replicas(
        "auth_sensitive::auth_a_number_written_on_one_replica_is_what_the_other_answers_next",
    )
    .await
    else {
        return;
    };
    let (mut on_a, mut on_b) = (
        a.client().await.expect("client A"),
        b.client().await.expect("client B"),
    );
    let (openid, token) = new_user(&sim, &mut on_a).await;

    // A answers "no number" several times: from then on it answers from memory, under the
    // number's stamp in Redis.
    for _ in 0..3 {
        assert_eq!(verify_phone(&mut on_a, &token).await, None);
    }

    // B keeps a number, then another: A's very next answer is each one.
    for number in ["13800138001", "13800138002"] {
        let code = sim
            .mint_phone_code(&MintPhoneCode::new(number).for_openid(&openid))
            .await
            .expect("mint");
        let got = phone(&mut on_b, &token, &code).await.expect("the exchange");
        assert_eq!(got.pure_phone_number, number);
        for _ in 0..3 {
            let seen = verify_phone(&mut on_a, &token).await.expect("a number");
            assert_eq!(seen.pure_phone_number, number, "A answered a stale number");
        }
        assert_eq!(
            phone(&mut on_a, &token, "")
                .await
                .expect("kept")
                .pure_phone_number,
            number
        );
    }
}

#[tokio::test]
async fn auth_a_phone_code_is_not_spent_while_redis_cannot_be_told_of_the_write() {
    // Replicas on PostgreSQL, with a Redis that never answers (auth-service falls back to
    // memory for everything else).
    let External::Run(db) = postgres_database(
        "auth_sensitive::auth_a_phone_code_is_not_spent_while_redis_cannot_be_told_of_the_write",
    )
    .await
    .expect("database") else {
        return;
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let dead = format!("redis://{}", listener.local_addr().expect("address"));
    drop(listener);
    let mut w = world(&[
        ("AUTH_DATABASE_URL", db.as_str()),
        ("AUTH_REDIS_URL", dead.as_str()),
    ])
    .await;
    let (openid, token) = new_user(&w.sim, &mut w.client).await;
    let code = w
        .sim
        .mint_phone_code(&MintPhoneCode::new("13800138000").for_openid(&openid))
        .await
        .expect("mint");

    let err = phone(&mut w.client, &token, &code)
        .await
        .expect_err("other replicas could not be told of the write");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        w.sim.code_calls(&code).await.expect("calls"),
        0,
        "refused before any billed call: the code stays usable"
    );
    // Reads still answer, from the database.
    assert_eq!(verify_phone(&mut w.client, &token).await, None);
}

#[tokio::test]
async fn auth_replicas_share_one_access_token_and_one_forced_refresh() {
    let Some((sim, [a, b])) =
        two_replicas("auth_sensitive::auth_replicas_share_one_access_token_and_one_forced_refresh")
            .await
    else {
        return;
    };
    let clients = [
        a.client().await.expect("client A"),
        b.client().await.expect("client B"),
    ];

    // Many concurrent exchanges on both replicas, with no token anywhere yet: one fetch.
    let requests = users_with_codes(&sim, &clients, 16, 13_100_000_000).await;
    assert_eq!(sim.endpoint_calls("stable_token").await.expect("calls"), 0);
    exchange_all(requests).await;
    assert_eq!(sim.endpoint_calls("stable_token").await.expect("calls"), 1);
    // Both replicas hand out that same token.
    let current = sim
        .access_token()
        .await
        .expect("state")
        .access_token
        .expect("one issued");
    for client in &clients {
        let answer = client
            .clone()
            .get_wechat_access_token(GetWechatAccessTokenRequest::default())
            .await
            .expect("the token")
            .into_inner();
        assert_eq!(answer.access_token, current);
    }

    // One code raced on both replicas: one (billed) call, through the shared claim.
    let (owner, token) = new_user(&sim, &mut clients[0].clone()).await;
    let code = sim
        .mint_phone_code(&MintPhoneCode::new("13199999999").for_openid(&owner))
        .await
        .expect("mint");
    sim.add_fault(
        &Fault::delay(300)
            .on_endpoint("getuserphonenumber")
            .for_code(&code),
    )
    .await
    .expect("slow WeChat");
    let racers: Vec<_> = (0..6)
        .map(|i| {
            let mut c = clients[i % 2].clone();
            let (token, code) = (token.clone(), code.clone());
            tokio::spawn(async move { phone(&mut c, &token, &code).await })
        })
        .collect();
    let mut won = 0;
    for racer in racers {
        match racer.await.expect("join") {
            Ok(_) => won += 1,
            Err(err) => assert_eq!(reason(&err), "CODE_USED", "{err:?}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(sim.code_calls(&code).await.expect("calls"), 1);

    // WeChat ends the token (40001) behind both replicas' backs: every request still
    // succeeds, through exactly one forced refresh.
    let requests = users_with_codes(&sim, &clients, 12, 13_200_000_000).await;
    let ended = sim.invalidate_access_token(None).await.expect("invalidate");
    assert_eq!(ended, vec![current.clone()]);
    exchange_all(requests).await;
    let state = sim.access_token().await.expect("state");
    assert_eq!(state.force_refreshes_today, 1);
    assert_eq!(sim.endpoint_calls("stable_token").await.expect("calls"), 2);
    let renewed = state.access_token.expect("a new one");
    assert_ne!(renewed, current);
    for client in &clients {
        let answer = client
            .clone()
            .get_wechat_access_token(GetWechatAccessTokenRequest::default())
            .await
            .expect("the token")
            .into_inner();
        assert_eq!(answer.access_token, renewed);
    }
}

#[tokio::test]
async fn auth_a_token_force_refreshed_on_one_replica_is_what_the_other_hands_out_next() {
    let Some((sim, [a, b])) = two_replicas(
        "auth_sensitive::auth_a_token_force_refreshed_on_one_replica_is_what_the_other_hands_out",
    )
    .await
    else {
        return;
    };
    let (mut client_a, mut client_b) = (
        a.client().await.expect("client A"),
        b.client().await.expect("client B"),
    );
    // Both replicas hold the first token in memory.
    let first = client_b
        .get_wechat_access_token(GetWechatAccessTokenRequest::default())
        .await
        .expect("the token")
        .into_inner()
        .access_token;
    let on_a = client_a
        .get_wechat_access_token(GetWechatAccessTokenRequest::default())
        .await
        .expect("the token")
        .into_inner()
        .access_token;
    assert_eq!(on_a, first);

    // Act: WeChat ends it; a phone exchange on replica A alone meets the 40001 and forces a
    // refresh, which ends the first token for good.
    let (openid, token) = new_user(&sim, &mut client_a).await;
    let code = sim
        .mint_phone_code(&MintPhoneCode::new("13300000000").for_openid(&openid))
        .await
        .expect("mint");
    sim.invalidate_access_token(None).await.expect("invalidate");
    phone(&mut client_a, &token, &code)
        .await
        .expect("the exchange, after one forced refresh");
    let renewed = sim
        .access_token()
        .await
        .expect("state")
        .access_token
        .expect("a new one");
    assert_ne!(renewed, first);

    // Assert: replica B hands out the new token, not the dead one it held.
    let on_b = client_b
        .get_wechat_access_token(GetWechatAccessTokenRequest::default())
        .await
        .expect("the token")
        .into_inner()
        .access_token;
    assert_eq!(on_b, renewed);
}

#[tokio::test]
async fn auth_no_session_key_phone_number_or_access_token_reaches_the_logs_or_the_database_in_clear()
 {
    // Arrange: debug logs, and every path that touches sensitive data: logins on two devices,
    // decryptions (good, stale, foreign), phone exchanges and reads, the access_token handed
    // out, refused by WeChat and force-refreshed.
    const NUMBER: &str = "13912345678";
    const MARKER: &str = "plaintext-marker-5d1e";
    let mut w = world(&[("RUST_LOG", "debug"), ("AUTH_CLIENT_KEYS", CLIENT_KEY)]).await;
    let mut secrets: Vec<String> = vec![
        SECRET.into(),
        TOKEN_KEY.into(),
        CLIENT_KEY.into(),
        NUMBER.into(),
        MARKER.into(),
    ];
    let mut raw_keys: Vec<Vec<u8>> = Vec::new();

    let (a, login_a) = w.login_as(None, Some("dev-a")).await;
    let (b, _) = w.login_as(Some(&a.openid), Some("dev-b")).await;
    let (c, _) = w.login_as(Some(&a.openid), Some("dev-c")).await;
    for m in [&a, &b, &c] {
        secrets.push(m.session_key.clone());
        raw_keys.push(base64_decode(&m.session_key));
    }
    let (token, _) = tokens(login_a.tokens.as_ref());
    // Each decryption reaches the outcome it is there for: a path that failed early (a
    // refused token, say) would leave its logging unaudited.
    for (data, expected) in [
        (
            Encrypt::for_openid(&a.openid, json!({"secret": MARKER})),
            None,
        ),
        (
            Encrypt::with_session_key(&b.session_key, json!({"secret": MARKER})),
            None,
        ),
        (
            Encrypt::with_session_key(&a.session_key, json!({"secret": MARKER})),
            Some("SESSION_KEY_STALE"),
        ),
        (
            Encrypt::for_openid(&a.openid, json!({"secret": MARKER})).appid("wx0000000000000bad"),
            Some("WATERMARK_MISMATCH"),
        ),
    ] {
        let e = w.sim.encrypt(&data).await.expect("encrypt");
        secrets.push(e.encrypted_data.clone());
        match (decrypt(&mut w.client, &token, &e).await, expected) {
            (Ok(answer), None) => assert_eq!(json_of(&answer)["secret"], MARKER),
            (Err(err), Some(want)) => assert_eq!(reason(&err), want, "{err:?}"),
            (got, want) => panic!("decrypt answered {got:?}, expected the reason {want:?}"),
        }
    }
    let code = w
        .sim
        .mint_phone_code(&MintPhoneCode::new(NUMBER).for_openid(&a.openid))
        .await
        .expect("mint");
    secrets.push(code.clone());
    phone(&mut w.client, &token, &code)
        .await
        .expect("the exchange");
    phone(&mut w.client, &token, "").await.expect("read back");
    let replay = phone(&mut w.client, &token, &code)
        .await
        .expect_err("a replayed code");
    assert_eq!(reason(&replay), "CODE_USED", "{replay:?}");
    w.client
        .get_wechat_access_token(GetWechatAccessTokenRequest::default())
        .await
        .expect("the token");
    w.sim
        .invalidate_access_token(None)
        .await
        .expect("invalidate");
    let second = w
        .sim
        .mint_phone_code(&MintPhoneCode::new(NUMBER).for_openid(&a.openid))
        .await
        .expect("mint");
    secrets.push(second.clone());
    phone(&mut w.client, &token, &second)
        .await
        .expect("after a forced refresh");
    let state = w.sim.access_token().await.expect("state");
    assert!(state.tokens.len() >= 2, "{state:?}");
    secrets.extend(state.tokens.iter().map(|t| t.access_token.clone()));

    // Assert: every file of the database (main file, WAL, shared memory), while it runs.
    assert_no_secret_in_files(w.auth.data_dir(), &secrets, &raw_keys);

    // Assert: the logs, read once the process has exited and every line it wrote is in.
    let logs = stop_and_read_logs(w.auth.process_mut()).await;
    assert!(
        logs.contains("phone number stored"),
        "the logs are being captured"
    );
    for s in &secrets {
        assert!(!logs.contains(s.as_str()), "the logs contain a secret: {s}");
    }
    // And the database as the stopped process left it (every write landed, WAL folded in).
    assert_no_secret_in_files(w.auth.data_dir(), &secrets, &raw_keys);
}

/// Every file in `dir` (the database, its WAL and shared memory) holds none of `secrets` and
/// no raw session_key.
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
