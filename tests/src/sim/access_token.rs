//! The app's access_token: `POST /cgi-bin/stable_token` (getStableAccessToken), `GET
//! /cgi-bin/token` (the classic getAccessToken), the check every call that carries an
//! `access_token` makes ([`check`]), and the control calls under `/sim/access-token`. Owns every
//! token issued, the lifetime of new ones and the force-refresh quota.

use std::collections::VecDeque;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq as _;

use super::clock::SimTime;
use super::config::Settings;
use super::control::{ControlError, ControlJson};
use super::ids::{self, RandomError};
use super::state::{SimState, World};
use super::wechat::{self, Endpoint, Params, WechatError};

/// How long a token lives unless the control API says otherwise.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(7200);
/// The longest lifetime the control API accepts (ten years).
const MAX_LIFETIME_SECONDS: u64 = 10 * 365 * 24 * 3600;
/// stable_token renews the current token when it has this long left or less; the old one keeps
/// working until its own end.
const RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);
/// How long a classic token keeps working after a newer one was issued.
const CLASSIC_GRACE: Duration = Duration::from_secs(5 * 60);
/// A force refresh this soon after the previous one does not refresh.
const FORCE_REFRESH_SPACING: Duration = Duration::from_secs(30);
/// At most this many force refreshes ...
const FORCE_REFRESH_QUOTA: usize = 20;
/// ... within this long (a sliding window on the simulator's clock).
const FORCE_REFRESH_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Which call issued a token: the two families are independent of each other, as at WeChat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Stable,
    Classic,
}

#[derive(Debug)]
struct Token {
    value: String,
    kind: Kind,
    issued_at: SimTime,
    /// Its natural end: from then on it answers 42001.
    expires_at: SimTime,
    /// When it was ended early (a force refresh, a newer classic token, the control API): from
    /// then on it answers 40001.
    ended_at: Option<SimTime>,
}

impl Token {
    /// 40001 once ended, 42001 once expired (whichever came first), else fine.
    fn check(&self, now: SimTime) -> Result<(), WechatError> {
        let ended = self.ended_at.filter(|&at| at <= now);
        let expired = (self.expires_at <= now).then_some(self.expires_at);
        match (ended, expired) {
            (None, None) => Ok(()),
            (Some(ended), Some(expired)) if expired < ended => {
                Err(WechatError::new(WechatError::EXPIRED_ACCESS_TOKEN))
            }
            (Some(_), _) => Err(WechatError::new(WechatError::INVALID_ACCESS_TOKEN)),
            (None, Some(_)) => Err(WechatError::new(WechatError::EXPIRED_ACCESS_TOKEN)),
        }
    }

    fn is_valid(&self, now: SimTime) -> bool {
        self.check(now).is_ok()
    }

    /// How long it keeps working from `now`, in whole seconds.
    fn remaining_seconds(&self, now: SimTime) -> u64 {
        let end = self
            .ended_at
            .map_or(self.expires_at, |ended| ended.min(self.expires_at));
        end.saturating_sub(now).as_secs()
    }

    fn end(&mut self, now: SimTime) {
        self.ended_at = Some(self.ended_at.map_or(now, |ended| ended.min(now)));
    }

    fn expire(&mut self, now: SimTime) {
        self.expires_at = self.expires_at.min(now);
    }

    fn status(&self, now: SimTime) -> &'static str {
        match self.check(now) {
            Ok(()) => "valid",
            Err(error) if error.errcode() == WechatError::EXPIRED_ACCESS_TOKEN => "expired",
            Err(_) => "invalid",
        }
    }
}

/// A token as a token call answers it.
#[derive(Debug, PartialEq, Eq)]
struct Issued {
    access_token: String,
    expires_in: u64,
}

/// Every token issued, the lifetime of the next ones, and the recent force refreshes.
#[derive(Debug)]
pub(crate) struct AccessTokens {
    lifetime: Duration,
    /// Oldest first.
    tokens: Vec<Token>,
    /// The times of the force refreshes within the last [`FORCE_REFRESH_WINDOW`], oldest first.
    force_refreshes: VecDeque<SimTime>,
}

impl Default for AccessTokens {
    fn default() -> Self {
        Self {
            lifetime: DEFAULT_LIFETIME,
            tokens: Vec::new(),
            force_refreshes: VecDeque::new(),
        }
    }
}

impl AccessTokens {
    fn find(&self, value: &str) -> Option<&Token> {
        self.tokens.iter().find(|token| token.value == value)
    }

    fn find_mut(&mut self, value: &str) -> Option<&mut Token> {
        self.tokens.iter_mut().find(|token| token.value == value)
    }

    /// The check of a call that carries `token`: 41001 without one, 40001 unknown or ended,
    /// 42001 expired.
    fn check(&self, token: Option<&str>, now: SimTime) -> Result<(), WechatError> {
        let token = token.ok_or_else(|| WechatError::new(WechatError::MISSING_ACCESS_TOKEN))?;
        self.find(token)
            .ok_or_else(|| WechatError::new(WechatError::INVALID_ACCESS_TOKEN))?
            .check(now)
    }

    /// The newest token of `kind`, if it still works.
    fn current(&self, kind: Kind, now: SimTime) -> Option<&Token> {
        self.tokens
            .iter()
            .rev()
            .find(|token| token.kind == kind)
            .filter(|token| token.is_valid(now))
    }

    fn issue(&mut self, kind: Kind, now: SimTime) -> Result<Issued, RandomError> {
        let value = loop {
            let value = ids::access_token()?;
            if self.find(&value).is_none() {
                break value;
            }
        };
        if kind == Kind::Classic
            && let Some(previous) = self
                .tokens
                .iter_mut()
                .rev()
                .find(|token| token.kind == Kind::Classic)
        {
            previous.end(now.saturating_add(CLASSIC_GRACE));
        }
        self.tokens.push(Token {
            value: value.clone(),
            kind,
            issued_at: now,
            expires_at: now.saturating_add(self.lifetime),
            ended_at: None,
        });
        Ok(Issued {
            access_token: value,
            expires_in: self.lifetime.as_secs(),
        })
    }

    /// What `stable_token` answers at `now`.
    fn stable(&mut self, force_refresh: bool, now: SimTime) -> Result<Issued, WechatError> {
        while self
            .force_refreshes
            .front()
            .is_some_and(|&at| now.saturating_sub(at) >= FORCE_REFRESH_WINDOW)
        {
            self.force_refreshes.pop_front();
        }
        let too_soon = self
            .force_refreshes
            .back()
            .is_some_and(|&at| now.saturating_sub(at) < FORCE_REFRESH_SPACING);
        if !force_refresh || too_soon {
            // Normal mode; a force refresh too soon after the previous one does not refresh.
            if let Some(current) = self.current(Kind::Stable, now)
                && current.remaining_seconds(now) > RENEW_BEFORE.as_secs()
            {
                return Ok(Issued {
                    access_token: current.value.clone(),
                    expires_in: current.remaining_seconds(now),
                });
            }
            // None, or in its last minutes: a new one, the old one working until its end.
            return Ok(self.issue(Kind::Stable, now)?);
        }
        if self.force_refreshes.len() >= FORCE_REFRESH_QUOTA {
            return Err(WechatError::new(WechatError::DAILY_QUOTA));
        }
        let issued = self.issue(Kind::Stable, now)?;
        for token in &mut self.tokens {
            if token.kind == Kind::Stable
                && token.value != issued.access_token
                && token.is_valid(now)
            {
                token.end(now);
            }
        }
        self.force_refreshes.push_back(now);
        Ok(issued)
    }

    /// `value`, or every token that works at `now` when `None`; 404 for an unknown `value`.
    fn targets(
        &mut self,
        value: Option<&str>,
        now: SimTime,
    ) -> Result<Vec<&mut Token>, ControlError> {
        match value {
            Some(value) => {
                let token = self.find_mut(value).ok_or_else(|| {
                    ControlError::NotFound("the simulator never issued that access_token".into())
                })?;
                Ok(vec![token])
            }
            None => Ok(self
                .tokens
                .iter_mut()
                .filter(|token| token.is_valid(now))
                .collect()),
        }
    }
}

/// Checks the `access_token` a WeChat call carries, at the simulator's now.
pub(crate) fn check(world: &World, token: Option<&str>) -> Result<(), WechatError> {
    world.access_tokens.check(token, world.clock.now())
}

pub(crate) fn router() -> Router<SimState> {
    Router::new()
        .route("/cgi-bin/stable_token", post(stable_token))
        .route("/cgi-bin/token", get(classic_token))
        .route("/sim/access-token", get(access_tokens))
        .route("/sim/access-token/invalidate", post(invalidate))
        .route("/sim/access-token/expire", post(expire))
        .route("/sim/access-token/lifetime", post(set_lifetime))
}

/// The checks both token calls make: appid (41002 missing, 40013 wrong), secret (41004 missing,
/// 40125 wrong), grant_type (40002 unless `client_credential`).
fn check_credentials(
    settings: &Settings,
    appid: Option<&str>,
    secret: Option<&str>,
    grant_type: Option<&str>,
) -> Result<(), WechatError> {
    match appid {
        None => return Err(WechatError::new(WechatError::MISSING_APPID)),
        Some(appid) if appid != settings.appid => {
            return Err(WechatError::new(WechatError::INVALID_APPID));
        }
        Some(_) => {}
    }
    let secret = secret.ok_or_else(|| WechatError::new(WechatError::MISSING_APPSECRET))?;
    if !bool::from(secret.as_bytes().ct_eq(settings.secret.as_bytes())) {
        return Err(WechatError::new(WechatError::INVALID_APPSECRET));
    }
    if grant_type != Some("client_credential") {
        return Err(WechatError::new(WechatError::INVALID_GRANT_TYPE));
    }
    Ok(())
}

fn token_answer(issued: &Issued) -> serde_json::Value {
    serde_json::json!({
        "access_token": issued.access_token,
        "expires_in": issued.expires_in,
    })
}

async fn stable_token(
    State(state): State<SimState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    const ENDPOINT: Endpoint = Endpoint::StableToken;
    if let Some(answer) = wechat::begin_call(&state, ENDPOINT, None).await {
        return answer;
    }
    wechat::respond(
        ENDPOINT,
        stable_token_answer(&state, wechat::json_object(body)),
    )
}

fn stable_token_answer(
    state: &SimState,
    body: Option<serde_json::Map<String, serde_json::Value>>,
) -> Result<serde_json::Value, WechatError> {
    let body = body.ok_or_else(|| WechatError::new(WechatError::DATA_FORMAT))?;
    let field =
        |name| wechat::string_field(&body, name).map(|value| value.filter(|v| !v.is_empty()));
    let appid = field("appid")?;
    let secret = field("secret")?;
    let grant_type = field("grant_type")?;
    let force_refresh = match body.get("force_refresh") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(force)) => *force,
        Some(_) => return Err(WechatError::new(WechatError::DATA_FORMAT)),
    };
    check_credentials(state.settings(), appid, secret, grant_type)?;
    let issued = state.with_world(|world| {
        let now = world.clock.now();
        world.access_tokens.stable(force_refresh, now)
    })?;
    Ok(token_answer(&issued))
}

async fn classic_token(
    State(state): State<SimState>,
    query: Result<Query<std::collections::HashMap<String, String>>, QueryRejection>,
) -> Response {
    const ENDPOINT: Endpoint = Endpoint::Token;
    if let Some(answer) = wechat::begin_call(&state, ENDPOINT, None).await {
        return answer;
    }
    let params = Params::from_query(query);
    let answer = check_credentials(
        state.settings(),
        params.get("appid"),
        params.get("secret"),
        params.get("grant_type"),
    )
    .and_then(|()| {
        let issued = state.with_world(|world| {
            let now = world.clock.now();
            world.access_tokens.issue(Kind::Classic, now)
        })?;
        Ok(token_answer(&issued))
    });
    wechat::respond(ENDPOINT, answer)
}

#[derive(Debug, Serialize)]
struct TokenAnswer {
    access_token: String,
    kind: Kind,
    issued_at: u64,
    expires_at: u64,
    ended_at: Option<u64>,
    status: &'static str,
}

#[derive(Debug, Serialize)]
struct TokensAnswer {
    /// The newest stable token, if it still works.
    access_token: Option<String>,
    expires_at: Option<u64>,
    expires_in: Option<u64>,
    /// The newest classic token, if it still works.
    classic_access_token: Option<String>,
    lifetime_seconds: u64,
    force_refreshes_today: usize,
    now: u64,
    /// Newest first.
    tokens: Vec<TokenAnswer>,
}

async fn access_tokens(State(state): State<SimState>) -> Json<TokensAnswer> {
    Json(state.with_world(|world| {
        let now = world.clock.now();
        let tokens = &world.access_tokens;
        let stable = tokens.current(Kind::Stable, now);
        TokensAnswer {
            access_token: stable.map(|token| token.value.clone()),
            expires_at: stable.map(|token| world.clock.unix_seconds(token.expires_at)),
            expires_in: stable.map(|token| token.remaining_seconds(now)),
            classic_access_token: tokens
                .current(Kind::Classic, now)
                .map(|token| token.value.clone()),
            lifetime_seconds: tokens.lifetime.as_secs(),
            force_refreshes_today: tokens
                .force_refreshes
                .iter()
                .filter(|&&at| now.saturating_sub(at) < FORCE_REFRESH_WINDOW)
                .count(),
            now: world.clock.unix_seconds(now),
            tokens: tokens
                .tokens
                .iter()
                .rev()
                .map(|token| TokenAnswer {
                    access_token: token.value.clone(),
                    kind: token.kind,
                    issued_at: world.clock.unix_seconds(token.issued_at),
                    expires_at: world.clock.unix_seconds(token.expires_at),
                    ended_at: token.ended_at.map(|at| world.clock.unix_seconds(at)),
                    status: token.status(now),
                })
                .collect(),
        }
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetBody {
    access_token: Option<String>,
}

#[derive(Debug, Serialize)]
struct TargetedAnswer {
    access_tokens: Vec<String>,
}

/// Applies `f` to the token the body names, or to every token that works now.
fn apply(
    state: &SimState,
    body: TargetBody,
    what: &str,
    f: fn(&mut Token, SimTime),
) -> Result<Json<TargetedAnswer>, ControlError> {
    if body.access_token.as_deref() == Some("") {
        return Err(ControlError::bad_request("access_token must not be empty"));
    }
    let access_tokens = state.with_world(|world| {
        let now = world.clock.now();
        let targets = world
            .access_tokens
            .targets(body.access_token.as_deref(), now)?;
        Ok::<_, ControlError>(
            targets
                .into_iter()
                .map(|token| {
                    f(token, now);
                    token.value.clone()
                })
                .collect::<Vec<_>>(),
        )
    })?;
    tracing::info!(count = access_tokens.len(), "access tokens {what}");
    Ok(Json(TargetedAnswer { access_tokens }))
}

async fn invalidate(
    State(state): State<SimState>,
    ControlJson(body): ControlJson<TargetBody>,
) -> Result<Json<TargetedAnswer>, ControlError> {
    apply(&state, body, "invalidated", Token::end)
}

async fn expire(
    State(state): State<SimState>,
    ControlJson(body): ControlJson<TargetBody>,
) -> Result<Json<TargetedAnswer>, ControlError> {
    apply(&state, body, "expired", Token::expire)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LifetimeBody {
    seconds: u64,
}

#[derive(Debug, Serialize)]
struct LifetimeAnswer {
    lifetime_seconds: u64,
}

async fn set_lifetime(
    State(state): State<SimState>,
    ControlJson(body): ControlJson<LifetimeBody>,
) -> Result<Json<LifetimeAnswer>, ControlError> {
    if body.seconds == 0 || body.seconds > MAX_LIFETIME_SECONDS {
        return Err(ControlError::bad_request(format!(
            "seconds must be between 1 and {MAX_LIFETIME_SECONDS}"
        )));
    }
    state.with_world(|world| world.access_tokens.lifetime = Duration::from_secs(body.seconds));
    tracing::info!(seconds = body.seconds, "access_token lifetime set");
    Ok(Json(LifetimeAnswer {
        lifetime_seconds: body.seconds,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SimTime {
        Duration::from_secs(seconds)
    }

    fn errcode(result: Result<(), WechatError>) -> i64 {
        result.expect_err("an error").errcode()
    }

    fn stable(tokens: &mut AccessTokens, force: bool, now: SimTime) -> Issued {
        tokens.stable(force, now).expect("a token")
    }

    #[test]
    fn stable_answers_the_current_token_until_its_last_five_minutes() {
        let mut tokens = AccessTokens::default();
        let first = stable(&mut tokens, false, at(0));
        assert_eq!(first.expires_in, 7200);
        let again = stable(&mut tokens, false, at(1000));
        assert_eq!(again.access_token, first.access_token);
        assert_eq!(again.expires_in, 6200);
        let at_edge = stable(&mut tokens, false, at(6899));
        assert_eq!(at_edge.access_token, first.access_token);

        let renewed = stable(&mut tokens, false, at(6900));
        assert_ne!(renewed.access_token, first.access_token);
        assert_eq!(renewed.expires_in, 7200);
        assert_eq!(tokens.check(Some(&first.access_token), at(7199)), Ok(()));
        assert_eq!(tokens.check(Some(&renewed.access_token), at(7199)), Ok(()));
        assert_eq!(
            errcode(tokens.check(Some(&first.access_token), at(7200))),
            42001
        );
        assert_eq!(
            stable(&mut tokens, false, at(7300)).access_token,
            renewed.access_token
        );
    }

    #[test]
    fn a_force_refresh_ends_every_stable_token_at_once() {
        let mut tokens = AccessTokens::default();
        let old = stable(&mut tokens, false, at(0));
        let overlap = stable(&mut tokens, false, at(6950));
        let forced = stable(&mut tokens, true, at(7000));
        for ended in [&old, &overlap] {
            assert_eq!(
                errcode(tokens.check(Some(&ended.access_token), at(7000))),
                40001
            );
        }
        assert_eq!(tokens.check(Some(&forced.access_token), at(7000)), Ok(()));
    }

    #[test]
    fn a_force_refresh_within_30_seconds_does_not_refresh() {
        let mut tokens = AccessTokens::default();
        let first = stable(&mut tokens, true, at(100));
        let too_soon = stable(&mut tokens, true, at(129));
        assert_eq!(too_soon.access_token, first.access_token);
        assert_eq!(too_soon.expires_in, 7171);
        let later = stable(&mut tokens, true, at(130));
        assert_ne!(later.access_token, first.access_token);
        assert_eq!(tokens.force_refreshes.len(), 2);
    }

    #[test]
    fn the_21st_force_refresh_within_a_day_is_refused() {
        let mut tokens = AccessTokens::default();
        for i in 0..20 {
            stable(&mut tokens, true, at(i * 30));
        }
        let last = stable(&mut tokens, false, at(20 * 30));
        let refused = tokens.stable(true, at(20 * 30)).expect_err("over quota");
        assert_eq!(refused.errcode(), 45009);
        assert_eq!(tokens.check(Some(&last.access_token), at(20 * 30)), Ok(()));
        // The first one leaves the window a day after it was made.
        assert!(tokens.stable(true, at(24 * 3600)).is_ok());
    }

    #[test]
    fn a_classic_token_ends_five_minutes_after_the_next_one() {
        let mut tokens = AccessTokens::default();
        let first = tokens.issue(Kind::Classic, at(0)).expect("random");
        let stable_one = stable(&mut tokens, false, at(0));
        let second = tokens.issue(Kind::Classic, at(100)).expect("random");
        assert_eq!(tokens.check(Some(&first.access_token), at(399)), Ok(()));
        assert_eq!(
            errcode(tokens.check(Some(&first.access_token), at(400))),
            40001
        );
        assert_eq!(tokens.check(Some(&second.access_token), at(400)), Ok(()));
        assert_eq!(
            tokens.check(Some(&stable_one.access_token), at(400)),
            Ok(()),
            "the families are independent"
        );
    }

    #[test]
    fn the_check_tells_missing_unknown_ended_and_expired_apart() {
        let mut tokens = AccessTokens::default();
        let token = stable(&mut tokens, false, at(0)).access_token;
        assert_eq!(errcode(tokens.check(None, at(0))), 41001);
        assert_eq!(errcode(tokens.check(Some("98_unknown"), at(0))), 40001);
        let found = tokens.find_mut(&token).expect("issued");
        found.expire(at(10));
        found.end(at(20));
        assert_eq!(
            errcode(tokens.check(Some(&token), at(30))),
            42001,
            "expired first"
        );
        let other = stable(&mut tokens, false, at(30)).access_token;
        let found = tokens.find_mut(&other).expect("issued");
        found.end(at(40));
        found.expire(at(50));
        assert_eq!(
            errcode(tokens.check(Some(&other), at(60))),
            40001,
            "ended first"
        );
    }
}
