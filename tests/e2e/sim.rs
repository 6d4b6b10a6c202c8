//! The WeChat simulator, black-box: the real `wechat-sim` binary over real HTTP. Each test
//! starts its own simulator. Login first, then the access token, the phone number, the
//! session_key calls and encryptedData.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::{StatusCode, Url};
use serde_json::Value;
use tests::harness::Process;
use tests::harness::sim::{
    APPID, Encrypt, Encrypted, Fault, MintCode, MintPhoneCode, MintedCode, SECRET, SimProcess,
    http_client, session_key_signature,
};

const ENDPOINT: &str = "jscode2session";

fn code2session_url(sim: &SimProcess, appid: &str, secret: &str, code: &str) -> Url {
    let mut url = sim.url("/sns/jscode2session").expect("a URL");
    url.query_pairs_mut()
        .append_pair("appid", appid)
        .append_pair("secret", secret)
        .append_pair("js_code", code)
        .append_pair("grant_type", "authorization_code");
    url
}

/// Calls code2Session at `url`; asserts HTTP 200 (WeChat's status for every outcome) and
/// answers the JSON body.
async fn call(url: Url) -> anyhow::Result<Value> {
    let response = http_client(Duration::from_secs(30))?
        .get(url)
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await?;
    serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
}

/// Exchanges `code` with the right appid and secret.
async fn exchange(sim: &SimProcess, code: &str) -> anyhow::Result<Value> {
    call(code2session_url(sim, APPID, SECRET, code)).await
}

fn errcode(body: &Value) -> Option<i64> {
    body.get("errcode").and_then(Value::as_i64)
}

/// Asserts `body` is the error `expected`, its errmsg ending with a rid as WeChat's do.
#[track_caller]
fn assert_error(body: &Value, expected: i64) {
    assert_eq!(errcode(body), Some(expected), "{body}");
    let errmsg = body["errmsg"].as_str().unwrap_or_default();
    assert!(errmsg.contains(", rid: "), "{body}");
}

/// Asserts `body` is a success for `minted`'s user with `session_key`.
#[track_caller]
fn assert_session(body: &Value, openid: &str, session_key: &str) {
    assert_eq!(errcode(body), None, "{body}");
    assert_eq!(body["openid"], openid, "{body}");
    assert_eq!(body["session_key"], session_key, "{body}");
}

async fn mint_new(sim: &SimProcess) -> anyhow::Result<MintedCode> {
    sim.mint_code(&MintCode::default()).await
}

/// Raw control call: answers the status and the JSON body.
async fn control(
    sim: &SimProcess,
    method: reqwest::Method,
    path: &str,
    body: &str,
) -> anyhow::Result<(StatusCode, Value)> {
    let response = sim
        .client()
        .request(method, sim.url(path)?)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    let body = serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?;
    Ok((status, body))
}

async fn wait_for_log(sim: &SimProcess, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if sim.logs().iter().any(|line| line.contains(needle)) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_minted_code_exchanges_for_the_users_openid_and_session_key() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;

    // Act
    let body = exchange(&sim, &minted.code).await?;

    // Assert
    assert_session(&body, &minted.openid, &minted.session_key);
    let fields: Vec<&str> = body
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(fields.len(), 2, "only openid and session_key: {body}");
    assert_eq!(STANDARD.decode(&minted.session_key)?.len(), 16);
    assert_eq!(minted.session_key.len(), 24);
    assert_eq!(minted.openid.len(), 28);
    assert!(minted.openid.starts_with('o'));
    assert_eq!(minted.code.len(), 32);
    assert!(minted.code.chars().all(|c| c.is_ascii_alphanumeric()));
    Ok(())
}

#[tokio::test]
async fn code2session_answers_text_plain_with_http_200_even_for_errors() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    let client = http_client(Duration::from_secs(30))?;

    // Act
    let success = client
        .get(code2session_url(&sim, APPID, SECRET, &minted.code))
        .send()
        .await?;
    let failure = client
        .get(code2session_url(&sim, APPID, SECRET, &minted.code))
        .send()
        .await?;

    // Assert
    for response in [success, failure] {
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/plain");
    }
    Ok(())
}

#[tokio::test]
async fn a_code_exchanges_only_once() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    let first = exchange(&sim, &minted.code).await?;

    // Act
    let second = exchange(&sim, &minted.code).await?;

    // Assert
    assert_session(&first, &minted.openid, &minted.session_key);
    assert_error(&second, 40163);
    Ok(())
}

#[tokio::test]
async fn a_code_expires_after_five_minutes() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    assert_eq!(sim.advance_clock(301).await?, 301);

    // Act
    let body = exchange(&sim, &minted.code).await?;

    // Assert
    assert_error(&body, 40029);
    Ok(())
}

#[tokio::test]
async fn an_unknown_code_is_invalid() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;

    // Act
    let body = exchange(&sim, "0NotACodeTheSimulatorMinted00000").await?;

    // Assert
    assert_error(&body, 40029);
    Ok(())
}

#[tokio::test]
async fn a_code_minted_for_another_appid_is_invalid() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = sim
        .mint_code(&MintCode {
            appid: Some("wx0ther00000000001".into()),
            ..MintCode::default()
        })
        .await?;

    // Act
    let body = exchange(&sim, &minted.code).await?;

    // Assert
    assert_error(&body, 40029);
    // A login in another app does not touch this app's users: naming one is refused, and
    // the user's session_key is unchanged.
    let ours = mint_new(&sim).await?;
    let foreign = sim
        .mint_code(&MintCode {
            appid: Some("wx0ther00000000001".into()),
            ..MintCode::for_openid(&ours.openid)
        })
        .await;
    assert!(foreign.is_err(), "{foreign:?}");
    assert_eq!(sim.user(&ours.openid).await?.session_key, ours.session_key);
    Ok(())
}

#[tokio::test]
async fn a_wrong_appid_is_refused_before_the_code_is_looked_at() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;

    // Act
    let body = call(code2session_url(
        &sim,
        "wx0ther00000000001",
        SECRET,
        &minted.code,
    ))
    .await?;

    // Assert
    assert_error(&body, 40013);
    let unused = exchange(&sim, &minted.code).await?;
    assert_session(&unused, &minted.openid, &minted.session_key);
    Ok(())
}

#[tokio::test]
async fn a_wrong_secret_is_refused() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;

    // Act
    let body = call(code2session_url(
        &sim,
        APPID,
        "ffffffffffffffffffffffffffffffff",
        &minted.code,
    ))
    .await?;

    // Assert
    assert_error(&body, 40125);
    Ok(())
}

#[tokio::test]
async fn a_wrong_grant_type_or_a_missing_code_is_refused() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    let mut wrong_grant = sim.url("/sns/jscode2session")?;
    wrong_grant
        .query_pairs_mut()
        .append_pair("appid", APPID)
        .append_pair("secret", SECRET)
        .append_pair("js_code", &minted.code)
        .append_pair("grant_type", "client_credential");
    let no_code = code2session_url(&sim, APPID, SECRET, "");

    // Act
    let wrong_grant = call(wrong_grant).await?;
    let no_code = call(no_code).await?;

    // Assert
    assert_error(&wrong_grant, 40002);
    assert_error(&no_code, 41008);
    Ok(())
}

#[tokio::test]
async fn the_101st_login_of_a_user_within_a_minute_is_rate_limited() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let first = mint_new(&sim).await?;
    let mut codes = vec![first.code.clone()];
    for _ in 0..100 {
        codes.push(
            sim.mint_code(&MintCode::for_openid(&first.openid))
                .await?
                .code,
        );
    }
    let last = codes.pop().expect("101 codes");
    for code in &codes {
        let body = exchange(&sim, code).await?;
        assert_eq!(errcode(&body), None, "{body}");
    }

    // Act
    let limited = exchange(&sim, &last).await?;
    sim.advance_clock(61).await?;
    let later = exchange(&sim, &last).await?;

    // Assert
    assert_error(&limited, 45011);
    assert_eq!(later["openid"], first.openid.as_str(), "{later}");
    Ok(())
}

#[tokio::test]
async fn refused_logins_count_toward_the_minute_quota() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let first = mint_new(&sim).await?;
    let fresh = sim.mint_code(&MintCode::for_openid(&first.openid)).await?;
    let exchanged = exchange(&sim, &first.code).await?;
    assert_eq!(errcode(&exchanged), None, "{exchanged}");
    for _ in 1..100 {
        let reused = exchange(&sim, &first.code).await?;
        assert_error(&reused, 40163);
    }

    // Act
    let limited = exchange(&sim, &fresh.code).await?;
    sim.advance_clock(61).await?;
    let later = exchange(&sim, &fresh.code).await?;

    // Assert
    assert_error(&limited, 45011);
    assert_eq!(later["openid"], first.openid.as_str(), "{later}");
    Ok(())
}

#[tokio::test]
async fn the_answer_has_a_unionid_only_when_the_user_has_one() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let without = mint_new(&sim).await?;
    let with = sim
        .mint_code(&MintCode {
            with_unionid: true,
            ..MintCode::default()
        })
        .await?;

    // Act
    let without_body = exchange(&sim, &without.code).await?;
    let with_body = exchange(&sim, &with.code).await?;
    let given = sim
        .mint_code(&MintCode {
            openid: Some(without.openid.clone()),
            unionid: Some("oGivenUnionid".into()),
            ..MintCode::default()
        })
        .await?;
    let given_body = exchange(&sim, &given.code).await?;

    // Assert
    assert_eq!(without.unionid, None);
    assert!(without_body.get("unionid").is_none(), "{without_body}");
    let unionid = with.unionid.expect("a unionid");
    assert_eq!(unionid.len(), 28);
    assert!(unionid.starts_with('o'));
    assert_eq!(with_body["unionid"], unionid.as_str());
    assert_eq!(given.unionid.as_deref(), Some("oGivenUnionid"));
    assert_eq!(given_body["unionid"], "oGivenUnionid");
    Ok(())
}

#[tokio::test]
async fn minting_rotates_the_session_key_and_keeps_the_previous_ones() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let first = sim
        .mint_code(&MintCode::for_openid("oRotatingUser"))
        .await?;

    // Act
    let second = sim
        .mint_code(&MintCode::for_openid("oRotatingUser"))
        .await?;
    let user = sim.user("oRotatingUser").await?;
    let old_code_body = exchange(&sim, &first.code).await?;

    // Assert
    assert_eq!(first.openid, "oRotatingUser");
    assert_ne!(second.session_key, first.session_key);
    assert_eq!(user.session_key, second.session_key);
    assert_eq!(user.previous_session_keys, [first.session_key]);
    // The answer carries the user's current key, whichever code was exchanged.
    assert_session(&old_code_body, "oRotatingUser", &second.session_key);
    Ok(())
}

#[tokio::test]
async fn an_unknown_user_is_404() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;

    // Act
    let (status, body) = control(&sim, reqwest::Method::GET, "/sim/users/oNobody", "").await?;

    // Assert
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string(), "{body}");
    Ok(())
}

#[tokio::test]
async fn a_forced_errcode_once_applies_to_one_call_then_calls_go_through() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    sim.add_fault(&Fault::error(-1).once()).await?;

    // Act
    let forced = exchange(&sim, &minted.code).await?;
    let normal = exchange(&sim, &minted.code).await?;

    // Assert
    assert_error(&forced, -1);
    assert!(
        forced["errmsg"]
            .as_str()
            .unwrap_or_default()
            .starts_with("system error"),
        "{forced}"
    );
    assert_session(&normal, &minted.openid, &minted.session_key);
    Ok(())
}

#[tokio::test]
async fn a_forced_errcode_without_times_applies_always() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    sim.add_fault(&Fault {
        errcode: Some(40226),
        errmsg: Some("risky user".into()),
        ..Fault::default()
    })
    .await?;
    let mut answers = Vec::new();

    // Act
    for _ in 0..3 {
        let minted = mint_new(&sim).await?;
        answers.push(exchange(&sim, &minted.code).await?);
    }
    let cleared = sim.clear_faults().await?;
    let minted = mint_new(&sim).await?;
    let after_clear = exchange(&sim, &minted.code).await?;

    // Assert
    for answer in &answers {
        assert_eq!(errcode(answer), Some(40226), "{answer}");
        assert_eq!(
            answer["errmsg"], "risky user",
            "a given errmsg is answered as it is"
        );
    }
    assert_eq!(cleared, 1);
    assert_session(&after_clear, &minted.openid, &minted.session_key);
    Ok(())
}

#[tokio::test]
async fn a_fault_scoped_to_a_code_leaves_other_codes_alone() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let targeted = mint_new(&sim).await?;
    let other = mint_new(&sim).await?;
    sim.add_fault(&Fault::error(40226).for_code(&targeted.code))
        .await?;

    // Act
    let other_body = exchange(&sim, &other.code).await?;
    let targeted_body = exchange(&sim, &targeted.code).await?;

    // Assert
    assert_session(&other_body, &other.openid, &other.session_key);
    assert_error(&targeted_body, 40226);
    Ok(())
}

#[tokio::test]
async fn a_delay_fault_answers_normally_but_not_before_the_delay() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    sim.add_fault(&Fault::delay(400).once()).await?;

    // Act
    let started = Instant::now();
    let body = exchange(&sim, &minted.code).await?;
    let elapsed = started.elapsed();

    // Assert
    assert!(
        elapsed >= Duration::from_millis(400),
        "answered after {elapsed:?}"
    );
    assert_session(&body, &minted.openid, &minted.session_key);
    Ok(())
}

#[tokio::test]
async fn a_hang_fault_never_answers_and_is_released_when_the_client_leaves() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    sim.add_fault(&Fault::hang().once()).await?;
    let impatient = http_client(Duration::from_millis(300))?;

    // Act
    let result = impatient
        .get(code2session_url(&sim, APPID, SECRET, &minted.code))
        .send()
        .await;

    // Assert
    let error = result.expect_err("a hung call never answers");
    assert!(error.is_timeout(), "{error:?}");
    assert!(
        wait_for_log(&sim, "released a hung call").await,
        "the hung call was not released when the client left"
    );
    let later = exchange(&sim, &minted.code).await?;
    assert_session(&later, &minted.openid, &minted.session_key);
    Ok(())
}

#[tokio::test]
async fn a_drop_fault_closes_the_connection_without_an_answer() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    sim.add_fault(&Fault::drop_connection().once()).await?;
    let client = http_client(Duration::from_secs(10))?;

    // Act
    let result = client
        .get(code2session_url(&sim, APPID, SECRET, &minted.code))
        .send()
        .await;

    // Assert
    let error = result.expect_err("a dropped connection gives no answer");
    assert!(!error.is_timeout(), "{error:?}");
    assert!(error.status().is_none(), "{error:?}");
    assert!(error.is_request(), "{error:?}");
    assert_eq!(sim.code_calls(&minted.code).await?, 1);
    let later = exchange(&sim, &minted.code).await?;
    assert_session(&later, &minted.openid, &minted.session_key);
    Ok(())
}

#[tokio::test]
async fn calls_are_counted_per_code_and_per_endpoint_whatever_their_outcome() -> anyhow::Result<()>
{
    // Arrange
    let sim = SimProcess::start().await?;
    let a = mint_new(&sim).await?;
    let b = mint_new(&sim).await?;
    sim.add_fault(&Fault::error(-1).for_code(&b.code).once())
        .await?;

    // Act
    exchange(&sim, &a.code).await?; // success
    exchange(&sim, &a.code).await?; // 40163
    call(code2session_url(&sim, APPID, "wrong", &b.code)).await?; // 40125
    exchange(&sim, &b.code).await?; // forced -1
    exchange(&sim, "").await?; // 41008, no code to count
    let calls = sim.calls().await?;

    // Assert
    assert_eq!(calls.endpoints.get(ENDPOINT), Some(&5));
    assert_eq!(calls.codes.get(&a.code), Some(&2));
    assert_eq!(calls.codes.get(&b.code), Some(&2));
    assert_eq!(calls.codes.len(), 2);
    assert_eq!(sim.code_calls(&a.code).await?, 2);
    assert_eq!(sim.code_calls("0NeverCalled").await?, 0);
    assert_eq!(sim.endpoint_calls(ENDPOINT).await?, 5);
    Ok(())
}

#[tokio::test]
async fn reset_forgets_users_codes_faults_counts_and_the_clock() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let before = sim.mint_code(&MintCode::for_openid("oForgotten")).await?;
    sim.add_fault(&Fault::error(-1)).await?;
    exchange(&sim, &before.code).await?;
    sim.advance_clock(100).await?;

    // Act
    sim.reset().await?;

    // Assert
    let calls = sim.calls().await?;
    assert!(
        calls.endpoints.is_empty() && calls.codes.is_empty(),
        "{calls:?}"
    );
    let user = sim.user("oForgotten").await;
    assert!(user.is_err_and(|e| e.to_string().contains("404")));
    assert_eq!(sim.clear_faults().await?, 0, "no fault survives");
    assert_eq!(sim.advance_clock(1).await?, 1, "the clock restarts");
    assert_error(&exchange(&sim, &before.code).await?, 40029);
    let after = sim.mint_code(&MintCode::for_openid("oForgotten")).await?;
    assert!(
        sim.user("oForgotten")
            .await?
            .previous_session_keys
            .is_empty()
    );
    assert_session(
        &exchange(&sim, &after.code).await?,
        "oForgotten",
        &after.session_key,
    );
    Ok(())
}

#[tokio::test]
async fn bad_control_input_is_refused_with_400_and_a_reason() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let post = reqwest::Method::POST;
    let cases = [
        ("/sim/login-codes", "not json"),
        ("/sim/login-codes", r#"{"openid": ""}"#),
        (
            "/sim/login-codes",
            r#"{"unionid": "oU", "with_unionid": true}"#,
        ),
        ("/sim/login-codes", r#"{"nickname": "x"}"#),
        ("/sim/faults", r#"{"errcode": "forty"}"#),
        ("/sim/faults", r#"{"hang": true, "drop": true}"#),
        ("/sim/faults", r#"{"errcode": -1, "times": 0}"#),
        ("/sim/faults", r#"{"endpoint": "nowhere", "errcode": -1}"#),
        ("/sim/faults", r#"{"errorcode": -1}"#),
        ("/sim/faults", "{}"),
        ("/sim/clock/advance", r#"{"seconds": -1}"#),
        ("/sim/clock/advance", "{}"),
    ];

    for (path, body) in cases {
        // Act
        let (status, answer) = control(&sim, post.clone(), path, body).await?;

        // Assert
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {answer}");
        let reason = answer["error"].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "{path} {body}: {answer}");
    }
    assert_eq!(sim.clear_faults().await?, 0, "no refused fault was staged");
    Ok(())
}

#[tokio::test]
async fn an_unknown_route_is_404_json() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;

    // Act
    let (status, body) = control(&sim, reqwest::Method::GET, "/sim/nothing", "").await?;

    // Assert
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string(), "{body}");
    Ok(())
}

#[tokio::test]
async fn sigterm_stops_the_simulator_with_exit_code_0() -> anyhow::Result<()> {
    // Arrange
    let mut sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    sim.add_fault(&Fault::hang()).await?;
    let impatient = http_client(Duration::from_secs(30))?;
    let url = code2session_url(&sim, APPID, SECRET, &minted.code);
    let hung = tokio::spawn(async move { impatient.get(url).send().await });
    assert!(wait_for_log(&sim, "a staged fault applies").await);

    // Act
    sim.process_mut().terminate()?;
    let exit = sim.process_mut().wait_exit(Duration::from_secs(10)).await?;

    // Assert
    assert_eq!(exit, Some(0), "a hung call does not hold the stop");
    assert!(hung.await?.is_err(), "the hung call gets no answer");
    Ok(())
}

#[tokio::test]
async fn a_malformed_setting_stops_start_up_with_a_message_naming_it() -> anyhow::Result<()> {
    // Arrange
    let env = [("WECHAT_SIM_ADDR".to_owned(), "localhost:port".to_owned())];

    // Act
    let mut process = Process::spawn("wechat-sim", &env, &std::env::temp_dir())?;
    let exit = process.wait_exit(Duration::from_secs(30)).await?;

    // Assert
    assert!(exit.is_some_and(|code| code != 0), "exit code {exit:?}");
    // The output pumps may lag the exit a little.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !process.logs().iter().any(|l| l.contains("WECHAT_SIM_ADDR")) {
        assert!(
            Instant::now() < deadline,
            "no message names the setting: {:?}",
            process.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The access token, the phone number, the session_key calls and encryptedData.
// ---------------------------------------------------------------------------------------------

const JSON_CONTENT_TYPE: &str = "application/json; encoding=utf-8";

/// Answers the JSON body of a WeChat call; asserts HTTP 200 and the JSON `Content-Type` of
/// every endpoint but jscode2session.
async fn wechat(request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
    let response = request.send().await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], JSON_CONTENT_TYPE);
    let text = response.text().await?;
    serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))
}

/// `POST /cgi-bin/stable_token` with `body` as it is.
async fn stable_token_raw(sim: &SimProcess, body: &str) -> anyhow::Result<Value> {
    wechat(
        sim.client()
            .post(sim.url("/cgi-bin/stable_token")?)
            .header("content-type", "application/json")
            .body(body.to_owned()),
    )
    .await
}

/// `POST /cgi-bin/stable_token` with the right credentials.
async fn stable_token(sim: &SimProcess, force_refresh: bool) -> anyhow::Result<Value> {
    let body = serde_json::json!({
        "grant_type": "client_credential",
        "appid": APPID,
        "secret": SECRET,
        "force_refresh": force_refresh,
    });
    stable_token_raw(sim, &body.to_string()).await
}

/// `GET /cgi-bin/token` with these query parameters.
async fn classic_token_with(sim: &SimProcess, query: &[(&str, &str)]) -> anyhow::Result<Value> {
    let mut url = sim.url("/cgi-bin/token")?;
    url.query_pairs_mut().extend_pairs(query);
    wechat(sim.client().get(url)).await
}

/// `GET /cgi-bin/token` with the right credentials.
async fn classic_token(sim: &SimProcess) -> anyhow::Result<Value> {
    classic_token_with(
        sim,
        &[
            ("grant_type", "client_credential"),
            ("appid", APPID),
            ("secret", SECRET),
        ],
    )
    .await
}

/// The `access_token` of a token answer, after checking its shape.
#[track_caller]
fn token_of(body: &Value) -> String {
    assert_eq!(errcode(body), None, "{body}");
    let token = body["access_token"].as_str().unwrap_or_default();
    assert!(
        (100..=512).contains(&token.len()),
        "a token as long as WeChat's: {body}"
    );
    assert!(body["expires_in"].as_u64().is_some(), "{body}");
    token.to_owned()
}

fn expires_in(body: &Value) -> u64 {
    body["expires_in"].as_u64().unwrap_or_default()
}

/// `POST /wxa/business/getuserphonenumber`, with `access_token` when given, and `body` as it is.
async fn phone_number_raw(
    sim: &SimProcess,
    access_token: Option<&str>,
    body: &str,
) -> anyhow::Result<Value> {
    let mut url = sim.url("/wxa/business/getuserphonenumber")?;
    if let Some(token) = access_token {
        url.query_pairs_mut().append_pair("access_token", token);
    }
    wechat(
        sim.client()
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_owned()),
    )
    .await
}

/// getuserphonenumber for `code`.
async fn phone_number(sim: &SimProcess, access_token: &str, code: &str) -> anyhow::Result<Value> {
    let body = serde_json::json!({ "code": code });
    phone_number_raw(sim, Some(access_token), &body.to_string()).await
}

/// `GET /wxa/{call}` (checksession or resetusersessionkey) for `openid` with `signature`.
async fn session_call(
    sim: &SimProcess,
    call: &str,
    access_token: &str,
    openid: &str,
    signature: &str,
) -> anyhow::Result<Value> {
    let mut url = sim.url(&format!("/wxa/{call}"))?;
    url.query_pairs_mut()
        .append_pair("access_token", access_token)
        .append_pair("openid", openid)
        .append_pair("signature", signature)
        .append_pair("sig_method", "hmac_sha256");
    wechat(sim.client().get(url)).await
}

/// checksession for `openid`, signed with `session_key`.
async fn check_session(
    sim: &SimProcess,
    access_token: &str,
    openid: &str,
    session_key: &str,
) -> anyhow::Result<Value> {
    let signature = session_key_signature(session_key);
    session_call(sim, "checksession", access_token, openid, &signature).await
}

/// Asserts `body` is a success that says so (`errcode` 0, `errmsg` "ok").
#[track_caller]
fn assert_ok(body: &Value) {
    assert_eq!(errcode(body), Some(0), "{body}");
    assert_eq!(body["errmsg"], "ok", "{body}");
}

/// A user the simulator knows, and a token that works: what the session_key calls need.
async fn user_and_token(sim: &SimProcess) -> anyhow::Result<(MintedCode, String)> {
    let minted = mint_new(sim).await?;
    let token = sim.fetch_stable_token().await?;
    Ok((minted, token))
}

/// AES-128-CBC/PKCS#7 decryption as a server does it; `None` when the padding is wrong.
fn decrypt(session_key: &str, encrypted: &Encrypted) -> anyhow::Result<Option<Vec<u8>>> {
    use aes::cipher::block_padding::Pkcs7;
    use aes::cipher::{BlockDecryptMut as _, KeyIvInit as _};
    let key = STANDARD.decode(session_key)?;
    let iv = STANDARD.decode(&encrypted.iv)?;
    let ciphertext = STANDARD.decode(&encrypted.encrypted_data)?;
    let decryptor = cbc::Decryptor::<aes::Aes128>::new_from_slices(&key, &iv)
        .map_err(|e| anyhow::anyhow!("a key and an iv of 16 bytes: {e}"))?;
    Ok(decryptor.decrypt_padded_vec_mut::<Pkcs7>(&ciphertext).ok())
}

#[tokio::test]
async fn stable_token_answers_the_same_token_until_its_last_five_minutes() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let first = stable_token(&sim, false).await?;

    // Act
    let again = stable_token(&sim, false).await?;
    sim.advance_clock(6800).await?;
    let before_window = stable_token(&sim, false).await?;
    sim.advance_clock(150).await?;
    let in_window = stable_token(&sim, false).await?;
    let after_renewal = stable_token(&sim, false).await?;

    // Assert
    let token = token_of(&first);
    assert_eq!(expires_in(&first), 7200, "{first}");
    assert_eq!(token_of(&again), token);
    assert!(expires_in(&again) <= 7200, "{again}");
    assert_eq!(token_of(&before_window), token);
    assert!(
        (300..=400).contains(&expires_in(&before_window)),
        "the remaining seconds: {before_window}"
    );
    let renewed = token_of(&in_window);
    assert_ne!(renewed, token, "renewed within the last 5 minutes");
    assert_eq!(expires_in(&in_window), 7200, "{in_window}");
    assert_eq!(token_of(&after_renewal), renewed);
    Ok(())
}

#[tokio::test]
async fn during_the_overlap_the_old_and_the_new_stable_token_both_work() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    let old = token_of(&stable_token(&sim, false).await?);
    sim.advance_clock(7000).await?;
    let new = token_of(&stable_token(&sim, false).await?);

    // Act
    let old_in_overlap = check_session(&sim, &old, &minted.openid, &minted.session_key).await?;
    let new_in_overlap = check_session(&sim, &new, &minted.openid, &minted.session_key).await?;
    sim.advance_clock(201).await?;
    let old_after = check_session(&sim, &old, &minted.openid, &minted.session_key).await?;
    let new_after = check_session(&sim, &new, &minted.openid, &minted.session_key).await?;

    // Assert
    assert_ne!(old, new);
    assert_ok(&old_in_overlap);
    assert_ok(&new_in_overlap);
    assert_error(&old_after, 42001);
    assert_ok(&new_after);
    Ok(())
}

#[tokio::test]
async fn a_force_refresh_ends_the_old_token_at_once() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    let old = token_of(&stable_token(&sim, false).await?);

    // Act
    let forced = stable_token(&sim, true).await?;
    let old_after = check_session(&sim, &old, &minted.openid, &minted.session_key).await?;

    // Assert
    let new = token_of(&forced);
    assert_ne!(new, old);
    assert_eq!(expires_in(&forced), 7200);
    assert_error(&old_after, 40001);
    assert_ok(&check_session(&sim, &new, &minted.openid, &minted.session_key).await?);
    assert_eq!(token_of(&stable_token(&sim, false).await?), new);
    Ok(())
}

#[tokio::test]
async fn a_force_refresh_within_30_seconds_of_the_last_does_not_refresh() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let first = token_of(&stable_token(&sim, true).await?);

    // Act
    let too_soon = token_of(&stable_token(&sim, true).await?);
    sim.advance_clock(30).await?;
    let spaced = token_of(&stable_token(&sim, true).await?);
    let state = sim.access_token().await?;

    // Assert
    assert_eq!(too_soon, first, "not refreshed");
    assert_ne!(spaced, first, "refreshed 30 s later");
    assert_eq!(state.access_token.as_deref(), Some(spaced.as_str()));
    assert_eq!(state.force_refreshes_today, 2);
    Ok(())
}

#[tokio::test]
async fn the_21st_force_refresh_within_a_day_is_refused_with_45009() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let mut tokens = Vec::new();
    for _ in 0..20 {
        tokens.push(token_of(&stable_token(&sim, true).await?));
        sim.advance_clock(30).await?;
    }

    // Act
    let refused = stable_token(&sim, true).await?;
    let normal = stable_token(&sim, false).await?;
    sim.advance_clock(24 * 3600).await?;
    let next_day = stable_token(&sim, true).await?;

    // Assert
    tokens.dedup();
    assert_eq!(tokens.len(), 20, "20 refreshes, 20 tokens");
    assert_error(&refused, 45009);
    assert_eq!(
        token_of(&normal),
        tokens[19],
        "the refused refresh ended nothing"
    );
    assert_ne!(token_of(&next_day), tokens[19]);
    Ok(())
}

#[tokio::test]
async fn the_token_calls_check_their_credentials_and_body() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let body = |appid: &str, secret: &str, grant_type: &str| {
        serde_json::json!({"grant_type": grant_type, "appid": appid, "secret": secret}).to_string()
    };
    let stable_cases = [
        (
            body("wx0ther00000000001", SECRET, "client_credential"),
            40013,
        ),
        (body(APPID, "wrong", "client_credential"), 40125),
        (body(APPID, SECRET, "authorization_code"), 40002),
        (body("", SECRET, "client_credential"), 41002),
        (body(APPID, "", "client_credential"), 41004),
        ("not json".to_owned(), 47001),
        ("[]".to_owned(), 47001),
        (
            serde_json::json!({"grant_type": "client_credential", "appid": APPID,
                "secret": SECRET, "force_refresh": "yes"})
            .to_string(),
            47001,
        ),
    ];
    let classic_cases = [
        (
            [
                ("grant_type", "client_credential"),
                ("appid", "wx0ther00000000001"),
                ("secret", SECRET),
            ],
            40013,
        ),
        (
            [
                ("grant_type", "client_credential"),
                ("appid", APPID),
                ("secret", "wrong"),
            ],
            40125,
        ),
        (
            [
                ("grant_type", "password"),
                ("appid", APPID),
                ("secret", SECRET),
            ],
            40002,
        ),
    ];

    for (body, expected) in stable_cases {
        // Act
        let answer = stable_token_raw(&sim, &body).await?;

        // Assert
        assert_error(&answer, expected);
    }
    for (query, expected) in classic_cases {
        // Act
        let answer = classic_token_with(&sim, &query).await?;

        // Assert
        assert_error(&answer, expected);
    }
    let state = sim.access_token().await?;
    assert!(state.tokens.is_empty(), "nothing issued: {state:?}");
    Ok(())
}

#[tokio::test]
async fn a_classic_token_breaks_the_previous_one_five_minutes_later() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    let stable = token_of(&stable_token(&sim, false).await?);
    let first = token_of(&classic_token(&sim).await?);

    // Act
    let second_body = classic_token(&sim).await?;
    let second = token_of(&second_body);
    sim.advance_clock(290).await?;
    let first_in_grace = check_session(&sim, &first, &minted.openid, &minted.session_key).await?;
    sim.advance_clock(11).await?;
    let first_after = check_session(&sim, &first, &minted.openid, &minted.session_key).await?;
    let second_after = check_session(&sim, &second, &minted.openid, &minted.session_key).await?;
    let stable_after = check_session(&sim, &stable, &minted.openid, &minted.session_key).await?;

    // Assert
    assert_ne!(first, second, "each call issues a new token");
    assert_eq!(expires_in(&second_body), 7200);
    assert_ok(&first_in_grace);
    assert_error(&first_after, 40001);
    assert_ok(&second_after);
    assert_ok(&stable_after);
    assert_eq!(
        sim.access_token().await?.classic_access_token.as_deref(),
        Some(second.as_str())
    );
    Ok(())
}

#[tokio::test]
async fn a_phone_code_gives_the_number_once() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let token = sim.fetch_stable_token().await?;
    let code = sim
        .mint_phone_code(&MintPhoneCode::new("13800138000"))
        .await?;

    // Act
    let first = phone_number(&sim, &token, &code).await?;
    let second = phone_number(&sim, &token, &code).await?;

    // Assert
    assert_ok(&first);
    let info = &first["phone_info"];
    assert_eq!(info["phoneNumber"], "13800138000", "{first}");
    assert_eq!(info["purePhoneNumber"], "13800138000", "{first}");
    assert_eq!(info["countryCode"], "86", "a string by default: {first}");
    assert_eq!(info["watermark"]["appid"], APPID, "{first}");
    let timestamp = info["watermark"]["timestamp"].as_u64().unwrap_or_default();
    let now = sim.access_token().await?.now;
    assert!(
        timestamp <= now && timestamp + 60 >= now,
        "{timestamp} is the simulator's now ({now})"
    );
    assert_eq!(code.len(), 64);
    assert_error(&second, 40029);
    Ok(())
}

#[tokio::test]
async fn a_phone_code_expires_after_five_minutes() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let token = sim.fetch_stable_token().await?;
    let code = sim
        .mint_phone_code(&MintPhoneCode::new("13800138000"))
        .await?;
    sim.advance_clock(301).await?;

    // Act
    let body = phone_number(&sim, &token, &code).await?;

    // Assert
    assert_error(&body, 40029);
    Ok(())
}

#[tokio::test]
async fn a_phone_code_of_another_user_is_refused_without_being_used() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let token = sim.fetch_stable_token().await?;
    let code = sim
        .mint_phone_code(&MintPhoneCode::new("13900139000").for_openid("oOwner"))
        .await?;
    let with_openid =
        |openid: &str| serde_json::json!({ "code": code, "openid": openid }).to_string();

    // Act
    let other = phone_number_raw(&sim, Some(&token), &with_openid("oSomeoneElse")).await?;
    let owner = phone_number_raw(&sim, Some(&token), &with_openid("oOwner")).await?;

    // Assert
    assert_error(&other, 40029);
    assert_ok(&owner);
    assert_eq!(owner["phone_info"]["purePhoneNumber"], "13900139000");
    Ok(())
}

#[tokio::test]
async fn a_phone_code_minted_without_owner_is_no_one_s_who_asks() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let token = sim.fetch_stable_token().await?;
    let code = sim
        .mint_phone_code(&MintPhoneCode::new("13900139000"))
        .await?;

    // Act
    let with_openid = serde_json::json!({ "code": code, "openid": "oAnyone" }).to_string();
    let asked_by_a_user = phone_number_raw(&sim, Some(&token), &with_openid).await?;
    let without_openid = phone_number(&sim, &token, &code).await?;

    // Assert
    assert_error(&asked_by_a_user, 40029);
    assert_ok(&without_openid);
    assert_eq!(
        without_openid["phone_info"]["purePhoneNumber"],
        "13900139000"
    );
    Ok(())
}

#[tokio::test]
async fn getuserphonenumber_checks_the_token_then_the_body() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let code = sim
        .mint_phone_code(&MintPhoneCode::new("13800138000"))
        .await?;
    let expired = sim.fetch_stable_token().await?;
    sim.expire_access_token(Some(&expired)).await?;
    let token = sim.fetch_stable_token().await?;
    let body = serde_json::json!({ "code": code }).to_string();

    // Act
    let missing = phone_number_raw(&sim, None, &body).await?;
    let unknown = phone_number_raw(&sim, Some("98_NotATokenTheSimulatorIssued"), &body).await?;
    let expired = phone_number_raw(&sim, Some(&expired), &body).await?;
    let not_json = phone_number_raw(&sim, Some(&token), "code=abc").await?;
    let no_code = phone_number_raw(&sim, Some(&token), "{}").await?;
    let good = phone_number_raw(&sim, Some(&token), &body).await?;

    // Assert
    assert_error(&missing, 41001);
    assert_error(&unknown, 40001);
    assert_error(&expired, 42001);
    assert_error(&not_json, 47001);
    assert_error(&no_code, 41008);
    assert_ok(&good);
    Ok(())
}

#[tokio::test]
async fn country_code_is_a_number_when_switched_and_a_foreign_number_carries_it()
-> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let token = sim.fetch_stable_token().await?;
    let chinese = sim
        .mint_phone_code(&MintPhoneCode::new("13800138000"))
        .await?;
    let hong_kong = sim
        .mint_phone_code(&MintPhoneCode::new("61234567").country_code("852"))
        .await?;
    sim.set_country_code_as_number(true).await?;

    // Act
    let as_number = phone_number(&sim, &token, &chinese).await?;
    sim.set_country_code_as_number(false).await?;
    let foreign = phone_number(&sim, &token, &hong_kong).await?;

    // Assert
    assert_ok(&as_number);
    assert_eq!(as_number["phone_info"]["countryCode"], 86, "{as_number}");
    assert_ok(&foreign);
    assert_eq!(foreign["phone_info"]["countryCode"], "852", "{foreign}");
    assert_eq!(foreign["phone_info"]["purePhoneNumber"], "61234567");
    assert_eq!(foreign["phone_info"]["phoneNumber"], "+85261234567");
    Ok(())
}

#[tokio::test]
async fn checksession_accepts_the_current_key_and_refuses_a_stale_one() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let (old, token) = user_and_token(&sim).await?;
    let current = sim.mint_code(&MintCode::for_openid(&old.openid)).await?;
    let signature = session_key_signature(&current.session_key);

    // Act
    let good = check_session(&sim, &token, &old.openid, &current.session_key).await?;
    let stale = check_session(&sim, &token, &old.openid, &old.session_key).await?;
    let unknown_user = check_session(&sim, &token, "oNobody", &current.session_key).await?;
    let mut wrong_method = sim.url("/wxa/checksession")?;
    wrong_method
        .query_pairs_mut()
        .append_pair("access_token", &token)
        .append_pair("openid", &old.openid)
        .append_pair("signature", &signature)
        .append_pair("sig_method", "sha1");
    let wrong_method = wechat(sim.client().get(wrong_method)).await?;

    // Assert
    assert_ok(&good);
    assert_eq!(
        good.as_object().map(serde_json::Map::len),
        Some(2),
        "{good}"
    );
    assert_eq!(
        sim.user(&old.openid).await?.session_key,
        current.session_key,
        "checking rotates nothing"
    );
    assert_error(&stale, 87009);
    assert_error(&unknown_user, 40003);
    assert_error(&wrong_method, 87009);
    assert_eq!(
        session_key_signature("tiihtNczf5v6AKRyjwEUhQ=="),
        "7154f9f8b4b76b92f541cbf0e37d48840fa06e5e42da92a6f80168a1516a4735",
        "HMAC-SHA256 of the empty message keyed with the key's text"
    );
    Ok(())
}

#[tokio::test]
async fn resetusersessionkey_rotates_the_key() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let (minted, token) = user_and_token(&sim).await?;
    let old_signature = session_key_signature(&minted.session_key);

    // Act
    let reset = session_call(
        &sim,
        "resetusersessionkey",
        &token,
        &minted.openid,
        &old_signature,
    )
    .await?;
    let reset_again_with_old = session_call(
        &sim,
        "resetusersessionkey",
        &token,
        &minted.openid,
        &old_signature,
    )
    .await?;

    // Assert
    assert_ok(&reset);
    assert_eq!(reset["openid"], minted.openid.as_str());
    let new_key = reset["session_key"].as_str().unwrap_or_default().to_owned();
    assert_ne!(new_key, minted.session_key);
    assert_eq!(STANDARD.decode(&new_key)?.len(), 16);
    let user = sim.user(&minted.openid).await?;
    assert_eq!(user.session_key, new_key);
    assert_eq!(user.previous_session_keys, [minted.session_key.as_str()]);
    assert_error(&reset_again_with_old, 87009);
    assert_error(
        &check_session(&sim, &token, &minted.openid, &minted.session_key).await?,
        87009,
    );
    assert_ok(&check_session(&sim, &token, &minted.openid, &new_key).await?);
    Ok(())
}

#[tokio::test]
async fn encrypted_data_decrypts_with_the_users_key_to_the_json_with_the_watermark_last()
-> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    let data = serde_json::json!({
        "stepInfoList": [{"timestamp": 1_700_000_000, "step": 4321}],
        "openGId": "tGabc\"quoted\"",
    });

    // Act
    let encrypted = sim
        .encrypt(&Encrypt::for_openid(&minted.openid, data.clone()))
        .await?;
    let now = sim.access_token().await?.now;

    // Assert
    assert_eq!(encrypted.iv.len(), 24);
    assert_eq!(STANDARD.decode(&encrypted.iv)?.len(), 16);
    let plain = decrypt(&minted.session_key, &encrypted)?.expect("the user's key decrypts");
    let text = String::from_utf8(plain)?;
    let json: Value = serde_json::from_str(&text)?;
    assert_eq!(json["stepInfoList"], data["stepInfoList"], "{text}");
    assert_eq!(json["openGId"], data["openGId"], "{text}");
    let timestamp = json["watermark"]["timestamp"].as_u64().unwrap_or_default();
    let watermark = format!(r#","watermark":{{"timestamp":{timestamp},"appid":"{APPID}"}}}}"#);
    assert!(text.ends_with(&watermark), "watermark last: {text}");
    assert!(!text.contains(' '), "compact: {text}");
    assert!(
        timestamp <= now && timestamp + 60 >= now,
        "{timestamp} is the simulator's now ({now})"
    );
    Ok(())
}

#[tokio::test]
async fn encrypt_can_use_an_older_key_and_another_appid() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let old = mint_new(&sim).await?;
    let current = sim.mint_code(&MintCode::for_openid(&old.openid)).await?;
    let data = serde_json::json!({ "openGId": "tG1" });

    // Act
    let with_old = sim
        .encrypt(&Encrypt::with_session_key(&old.session_key, data.clone()))
        .await?;
    let other_app = sim
        .encrypt(&Encrypt::for_openid(&old.openid, data.clone()).appid("wx0ther00000000001"))
        .await?;

    // Assert
    let plain = decrypt(&old.session_key, &with_old)?.expect("the old key decrypts");
    let json: Value = serde_json::from_slice(&plain)?;
    assert_eq!(json["openGId"], "tG1");
    assert_eq!(json["watermark"]["appid"], APPID);
    let with_current = decrypt(&current.session_key, &with_old)?;
    assert!(
        with_current
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .is_none(),
        "the current key does not read what the old one encrypted"
    );
    let plain = decrypt(&current.session_key, &other_app)?.expect("the current key decrypts");
    let json: Value = serde_json::from_slice(&plain)?;
    assert_eq!(json["watermark"]["appid"], "wx0ther00000000001");
    Ok(())
}

#[tokio::test]
async fn the_access_token_controls_invalidate_expire_and_set_the_lifetime() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let (minted, first) = user_and_token(&sim).await?;

    // Act
    let invalidated = sim.invalidate_access_token(None).await?;
    let after_invalidate = check_session(&sim, &first, &minted.openid, &minted.session_key).await?;
    let state_after_invalidate = sim.access_token().await?;
    let second = sim.fetch_stable_token().await?;
    let expired = sim.expire_access_token(Some(&second)).await?;
    let after_expire = check_session(&sim, &second, &minted.openid, &minted.session_key).await?;
    sim.set_access_token_lifetime(600).await?;
    let third = stable_token(&sim, false).await?;
    let state = sim.access_token().await?;

    // Assert
    assert_eq!(invalidated, [first.as_str()]);
    assert_error(&after_invalidate, 40001);
    assert_eq!(state_after_invalidate.access_token, None);
    assert_eq!(state_after_invalidate.tokens[0].status, "invalid");
    assert!(state_after_invalidate.tokens[0].ended_at.is_some());
    assert_ne!(
        second, first,
        "a new token once the current one was invalidated"
    );
    assert_eq!(expired, [second.as_str()]);
    assert_error(&after_expire, 42001);
    assert_eq!(expires_in(&third), 600, "{third}");
    let third = token_of(&third);
    assert_eq!(state.access_token.as_deref(), Some(third.as_str()));
    assert_eq!(state.lifetime_seconds, 600);
    assert!(
        state
            .expires_at
            .is_some_and(|at| at <= state.now + 600 && at + 60 >= state.now + 600),
        "{state:?}"
    );
    let statuses: Vec<&str> = state.tokens.iter().map(|t| t.status.as_str()).collect();
    assert_eq!(statuses, ["valid", "expired", "invalid"]);
    assert!(state.tokens.iter().all(|t| t.kind == "stable"));
    assert_ok(&check_session(&sim, &third, &minted.openid, &minted.session_key).await?);
    Ok(())
}

#[tokio::test]
async fn reset_forgets_tokens_phone_codes_and_the_formats() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let old_token = sim.fetch_stable_token().await?;
    let code = sim
        .mint_phone_code(&MintPhoneCode::new("13800138000"))
        .await?;
    sim.set_country_code_as_number(true).await?;
    sim.set_access_token_lifetime(60).await?;

    // Act
    sim.reset().await?;

    // Assert
    let state = sim.access_token().await?;
    assert!(state.tokens.is_empty(), "{state:?}");
    assert_eq!(state.lifetime_seconds, 7200);
    let token = sim.fetch_stable_token().await?;
    assert_error(&phone_number(&sim, &old_token, &code).await?, 40001);
    assert_error(&phone_number(&sim, &token, &code).await?, 40029);
    let code = sim
        .mint_phone_code(&MintPhoneCode::new("13800138000"))
        .await?;
    let body = phone_number(&sim, &token, &code).await?;
    assert_eq!(body["phone_info"]["countryCode"], "86", "{body}");
    Ok(())
}

#[tokio::test]
async fn each_new_endpoint_is_counted_under_its_name() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    let code = sim
        .mint_phone_code(&MintPhoneCode::new("13800138000"))
        .await?;

    // Act
    let token = token_of(&stable_token(&sim, false).await?);
    stable_token_raw(&sim, "not json").await?; // 47001, counted all the same
    classic_token(&sim).await?;
    phone_number(&sim, &token, &code).await?;
    phone_number(&sim, &token, &code).await?; // 40029
    check_session(&sim, &token, &minted.openid, &minted.session_key).await?;
    let signature = session_key_signature(&minted.session_key);
    session_call(
        &sim,
        "resetusersessionkey",
        &token,
        &minted.openid,
        &signature,
    )
    .await?;
    let calls = sim.calls().await?;

    // Assert
    for (endpoint, expected) in [
        ("stable_token", 2),
        ("token", 1),
        ("getuserphonenumber", 2),
        ("checksession", 1),
        ("resetusersessionkey", 1),
    ] {
        assert_eq!(
            calls.endpoints.get(endpoint),
            Some(&expected),
            "{endpoint}: {calls:?}"
        );
        assert_eq!(sim.endpoint_calls(endpoint).await?, expected);
    }
    assert_eq!(calls.endpoints.get(ENDPOINT), None, "{calls:?}");
    assert_eq!(calls.codes.get(&code), Some(&2), "phone codes are counted");
    Ok(())
}

#[tokio::test]
async fn faults_apply_to_the_new_endpoints_by_name() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let token = sim.fetch_stable_token().await?;
    let targeted = sim
        .mint_phone_code(&MintPhoneCode::new("13800138000"))
        .await?;
    let other = sim
        .mint_phone_code(&MintPhoneCode::new("13900139000"))
        .await?;
    sim.add_fault(&Fault::error(-1).on_endpoint("stable_token").once())
        .await?;
    sim.add_fault(
        &Fault::error(45011)
            .on_endpoint("getuserphonenumber")
            .for_code(&targeted)
            .once(),
    )
    .await?;
    sim.add_fault(&Fault::drop_connection().on_endpoint("checksession").once())
        .await?;

    // Act
    let busy = stable_token(&sim, false).await?;
    let after_busy = stable_token(&sim, false).await?;
    let other_body = phone_number(&sim, &token, &other).await?;
    let limited = phone_number(&sim, &token, &targeted).await?;
    let targeted_later = phone_number(&sim, &token, &targeted).await?;
    let mut check_url = sim.url("/wxa/checksession")?;
    check_url
        .query_pairs_mut()
        .append_pair("access_token", &token);
    let dropped = http_client(Duration::from_secs(10))?
        .get(check_url)
        .send()
        .await;

    // Assert
    assert_error(&busy, -1);
    assert_eq!(token_of(&after_busy), token);
    assert_ok(&other_body);
    assert_error(&limited, 45011);
    assert_ok(&targeted_later);
    let error = dropped.expect_err("a dropped connection gives no answer");
    assert!(error.is_request() && !error.is_timeout(), "{error:?}");
    assert_eq!(sim.endpoint_calls("checksession").await?, 1);
    Ok(())
}

#[tokio::test]
async fn bad_input_to_the_new_control_calls_is_refused_with_400_or_404() -> anyhow::Result<()> {
    // Arrange
    let sim = SimProcess::start().await?;
    let minted = mint_new(&sim).await?;
    let post = reqwest::Method::POST;
    let with_openid = |rest: &str| format!(r#"{{"openid": "{}", {rest}}}"#, minted.openid);
    let bad_requests = [
        ("/sim/phone-codes", "{}".to_owned()),
        (
            "/sim/phone-codes",
            r#"{"phone_number": "138-0013"}"#.to_owned(),
        ),
        (
            "/sim/phone-codes",
            r#"{"phone_number": "13800138000", "country_code": "+86"}"#.to_owned(),
        ),
        (
            "/sim/phone-codes",
            r#"{"phone_number": "13800138000", "openid": ""}"#.to_owned(),
        ),
        ("/sim/phone-number-format", "{}".to_owned()),
        ("/sim/encrypt", with_openid(r#""data": [1]"#)),
        ("/sim/encrypt", with_openid(r#""data": {"watermark": {}}"#)),
        (
            "/sim/encrypt",
            with_openid(r#""data": {}, "session_key": "AAAA""#),
        ),
        (
            "/sim/encrypt",
            with_openid(r#""data": {}, "appid": "wx-1""#),
        ),
        ("/sim/encrypt", with_openid(r#""data": {}, "iv": "x""#)),
        ("/sim/encrypt", r#"{"data": {}}"#.to_owned()),
        ("/sim/access-token/lifetime", r#"{"seconds": 0}"#.to_owned()),
        ("/sim/access-token/lifetime", "{}".to_owned()),
        (
            "/sim/access-token/invalidate",
            r#"{"access_token": ""}"#.to_owned(),
        ),
        ("/sim/access-token/expire", r#"{"token": "x"}"#.to_owned()),
    ];
    let not_found = [
        ("/sim/encrypt", r#"{"openid": "oNobody", "data": {}}"#),
        (
            "/sim/access-token/invalidate",
            r#"{"access_token": "98_x"}"#,
        ),
        ("/sim/access-token/expire", r#"{"access_token": "98_x"}"#),
    ];

    for (path, body) in bad_requests {
        // Act
        let (status, answer) = control(&sim, post.clone(), path, &body).await?;

        // Assert
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {answer}");
        let reason = answer["error"].as_str().unwrap_or_default();
        assert!(!reason.is_empty(), "{path} {body}: {answer}");
    }
    for (path, body) in not_found {
        // Act
        let (status, answer) = control(&sim, post.clone(), path, body).await?;

        // Assert
        assert_eq!(status, StatusCode::NOT_FOUND, "{path} {body}: {answer}");
    }
    assert_eq!(sim.access_token().await?.lifetime_seconds, 7200);
    Ok(())
}
