//! The WeChat simulator, black-box: the real `wechat-sim` binary over real HTTP. Each test
//! starts its own simulator.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use reqwest::{StatusCode, Url};
use serde_json::Value;
use tests::harness::Process;
use tests::harness::sim::{APPID, Fault, MintCode, SECRET, SimProcess, http_client};

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

async fn mint_new(sim: &SimProcess) -> anyhow::Result<tests::harness::sim::MintedCode> {
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
