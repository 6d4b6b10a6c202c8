//! Login: `GET /sns/jscode2session`, WeChat's code2Session, and `POST /sim/login-codes`, the
//! control call that does what `wx.login()` does on the phone. Owns the login codes and the
//! per-user minute quota.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use super::clock::SimTime;
use super::control::{ControlError, ControlJson, check_appid, check_id};
use super::ids::{self, RandomError};
use super::state::{SimState, World};
use super::users::UnionidChange;
use super::wechat::{self, Endpoint, WechatError};

const ENDPOINT: Endpoint = Endpoint::Jscode2session;
/// How long a login code can be exchanged after `wx.login()` made it.
const CODE_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// The per-user quota: this many calls ...
const QUOTA: usize = 100;
/// ... within this long.
const QUOTA_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct LoginCode {
    openid: String,
    appid: String,
    minted_at: SimTime,
    used: bool,
}

/// Every login code minted, and each user's recent calls.
#[derive(Debug, Default)]
pub(crate) struct LoginCodes {
    codes: HashMap<String, LoginCode>,
    /// Per openid, the times of its calls within the last [`QUOTA_WINDOW`], whatever their
    /// outcome (a call is the user's when its code is one of the user's codes for this app).
    recent_calls: HashMap<String, VecDeque<SimTime>>,
}

impl LoginCodes {
    fn mint(&mut self, openid: &str, appid: &str, now: SimTime) -> Result<String, RandomError> {
        let code = loop {
            let code = ids::login_code()?;
            if !self.codes.contains_key(&code) {
                break code;
            }
        };
        self.codes.insert(
            code.clone(),
            LoginCode {
                openid: openid.to_owned(),
                appid: appid.to_owned(),
                minted_at: now,
                used: false,
            },
        );
        Ok(code)
    }

    /// Checks `code` for `appid` at `now` and consumes it; answers its openid. A code of this
    /// app names its user, so the call counts toward that user's quota whatever its outcome
    /// (WeChat's 45011 is about calls, WECHAT.md §1), and the quota is checked first: the
    /// 101st call within a minute is refused with 45011 whether its code is fresh, used or
    /// expired. An unknown code, or one of another app, names no user of ours: 40029, uncounted.
    fn exchange(&mut self, appid: &str, code: &str, now: SimTime) -> Result<String, WechatError> {
        let login = self
            .codes
            .get_mut(code)
            .filter(|login| login.appid == appid)
            .ok_or_else(|| WechatError::new(WechatError::INVALID_CODE))?;
        let recent = self.recent_calls.entry(login.openid.clone()).or_default();
        while recent
            .front()
            .is_some_and(|&at| now.saturating_sub(at) >= QUOTA_WINDOW)
        {
            recent.pop_front();
        }
        recent.push_back(now);
        if recent.len() > QUOTA {
            return Err(WechatError::new(WechatError::MINUTE_QUOTA));
        }
        if now.saturating_sub(login.minted_at) > CODE_LIFETIME {
            return Err(WechatError::new(WechatError::INVALID_CODE));
        }
        if login.used {
            return Err(WechatError::new(WechatError::CODE_USED));
        }
        login.used = true;
        Ok(login.openid.clone())
    }
}

pub(crate) fn router() -> Router<SimState> {
    Router::new()
        .route("/sns/jscode2session", get(jscode2session))
        .route("/sim/login-codes", post(mint_login_code))
}

async fn jscode2session(
    State(state): State<SimState>,
    query: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> Response {
    // A query that does not parse has, as far as WeChat is concerned, no parameters.
    let params = query.map(|Query(params)| params).unwrap_or_default();
    let param = |name: &str| {
        params
            .get(name)
            .map(String::as_str)
            .filter(|value| !value.is_empty())
    };
    if let Some(answer) = wechat::begin_call(&state, ENDPOINT, param("js_code")).await {
        return answer;
    }
    match code_to_session(&state, param) {
        Ok(body) => wechat::answer(ENDPOINT, &body),
        Err(error) => {
            tracing::info!(errcode = error.errcode(), "jscode2session refused");
            error.answer(ENDPOINT)
        }
    }
}

fn code_to_session<'a>(
    state: &SimState,
    param: impl Fn(&str) -> Option<&'a str>,
) -> Result<serde_json::Value, WechatError> {
    let settings = state.settings();
    if param("appid") != Some(settings.appid.as_str()) {
        return Err(WechatError::new(WechatError::INVALID_APPID));
    }
    let secret_matches = param("secret")
        .is_some_and(|secret| bool::from(secret.as_bytes().ct_eq(settings.secret.as_bytes())));
    if !secret_matches {
        return Err(WechatError::new(WechatError::INVALID_APPSECRET));
    }
    if param("grant_type") != Some("authorization_code") {
        return Err(WechatError::new(WechatError::INVALID_GRANT_TYPE));
    }
    let code = param("js_code").ok_or_else(|| WechatError::new(WechatError::MISSING_CODE))?;
    state.with_world(|world| exchange(world, &settings.appid, code))
}

/// Consumes `code` and answers its user's current session, as code2Session's success body.
fn exchange(world: &mut World, appid: &str, code: &str) -> Result<serde_json::Value, WechatError> {
    let now = world.clock.now();
    let openid = world.login_codes.exchange(appid, code, now)?;
    let user = world
        .users
        .get(&openid)
        .ok_or_else(|| WechatError::new(WechatError::INVALID_CODE))?;
    let mut body = serde_json::Map::new();
    body.insert("session_key".into(), user.session_key().into());
    body.insert("openid".into(), user.openid().into());
    if let Some(unionid) = user.unionid() {
        body.insert("unionid".into(), unionid.into());
    }
    Ok(body.into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MintBody {
    openid: Option<String>,
    unionid: Option<String>,
    #[serde(default)]
    with_unionid: bool,
    appid: Option<String>,
    #[serde(default)]
    keep_session_key: bool,
}

#[derive(Debug, Serialize)]
struct MintAnswer {
    code: String,
    openid: String,
    unionid: Option<String>,
    session_key: String,
}

async fn mint_login_code(
    State(state): State<SimState>,
    ControlJson(body): ControlJson<MintBody>,
) -> Result<Json<MintAnswer>, ControlError> {
    let openid = body.openid.map(|id| check_id("openid", id)).transpose()?;
    let unionid = match (body.unionid, body.with_unionid) {
        (Some(_), true) => {
            return Err(ControlError::bad_request(
                "give either unionid or with_unionid, not both",
            ));
        }
        (Some(unionid), false) => UnionidChange::Set(check_id("unionid", unionid)?),
        (None, true) => UnionidChange::EnsureOne,
        (None, false) => UnionidChange::Keep,
    };
    let appid = match body.appid {
        Some(appid) => check_appid(appid)?,
        None => state.settings().appid.clone(),
    };
    // A wx.login in another app is another user there: it must not rotate one of ours.
    if appid != state.settings().appid && openid.is_some() {
        return Err(ControlError::bad_request(
            "a code for another appid cannot name an openid (that user belongs to this app)",
        ));
    }

    let minted = state.with_world(|world| -> Result<MintAnswer, RandomError> {
        let now = world.clock.now();
        let user = world.users.log_in(openid, unionid, body.keep_session_key)?;
        let code = world.login_codes.mint(user.openid(), &appid, now)?;
        Ok(MintAnswer {
            code,
            openid: user.openid().to_owned(),
            unionid: user.unionid().map(str::to_owned),
            session_key: user.session_key().to_owned(),
        })
    })?;
    tracing::info!(
        openid = %minted.openid,
        %appid,
        rotated = !body.keep_session_key,
        "login code minted"
    );
    Ok(Json(minted))
}

#[cfg(test)]
mod tests {
    use super::*;

    const APPID: &str = "wxapp";

    fn minted(codes: &mut LoginCodes, openid: &str, at: SimTime) -> String {
        codes.mint(openid, APPID, at).expect("random")
    }

    fn errcode(result: Result<String, WechatError>) -> i64 {
        result.expect_err("an error").errcode()
    }

    #[test]
    fn a_code_is_exchanged_once() {
        let mut codes = LoginCodes::default();
        let code = minted(&mut codes, "oA", SimTime::ZERO);
        assert_eq!(
            codes.exchange(APPID, &code, SimTime::ZERO).as_deref(),
            Ok("oA")
        );
        assert_eq!(errcode(codes.exchange(APPID, &code, SimTime::ZERO)), 40163);
    }

    #[test]
    fn a_code_lives_five_minutes_for_its_own_appid() {
        let mut codes = LoginCodes::default();
        let code = minted(&mut codes, "oA", SimTime::ZERO);
        assert_eq!(
            errcode(codes.exchange("wxother", &code, SimTime::ZERO)),
            40029
        );
        assert_eq!(
            errcode(codes.exchange(APPID, &code, CODE_LIFETIME + Duration::from_secs(1))),
            40029
        );
        assert!(codes.exchange(APPID, &code, CODE_LIFETIME).is_ok());
        assert_eq!(
            errcode(codes.exchange(APPID, "0unknown", SimTime::ZERO)),
            40029
        );
    }

    #[test]
    fn the_101st_exchange_within_a_minute_is_refused_without_using_the_code() {
        let mut codes = LoginCodes::default();
        let at = Duration::from_secs(10);
        for _ in 0..QUOTA {
            let code = minted(&mut codes, "oA", at);
            assert!(codes.exchange(APPID, &code, at).is_ok());
        }
        let code = minted(&mut codes, "oA", at);
        assert_eq!(errcode(codes.exchange(APPID, &code, at)), 45011);
        let other = minted(&mut codes, "oB", at);
        assert!(
            codes.exchange(APPID, &other, at).is_ok(),
            "the quota is per user"
        );
        assert!(codes.exchange(APPID, &code, at + QUOTA_WINDOW).is_ok());
    }

    #[test]
    fn refused_calls_count_toward_the_quota_too() {
        let mut codes = LoginCodes::default();
        let at = Duration::from_secs(10);
        let used = minted(&mut codes, "oA", at);
        assert!(codes.exchange(APPID, &used, at).is_ok());
        for _ in 1..QUOTA {
            assert_eq!(errcode(codes.exchange(APPID, &used, at)), 40163);
        }
        let fresh = minted(&mut codes, "oA", at);
        assert_eq!(
            errcode(codes.exchange(APPID, &fresh, at)),
            45011,
            "one success and 99 refusals are 100 calls"
        );
        assert_eq!(
            errcode(codes.exchange(APPID, &used, at)),
            45011,
            "over the quota, even a used code gets 45011"
        );
        assert_eq!(
            errcode(codes.exchange(APPID, "0unknown", at)),
            40029,
            "a code that names no user is not limited"
        );
        assert!(codes.exchange(APPID, &fresh, at + QUOTA_WINDOW).is_ok());
    }
}
