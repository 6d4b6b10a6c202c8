//! The WeChat simulator: a standalone HTTP server that plays `api.weixin.qq.com` for the calls
//! auth-service makes, with a control API of its own that tests and the local launcher use to
//! stage what WeChat would do. It is the one simulated party of the project: the services talk
//! to it over real HTTP, never to a mock inside them. The binary is `wechat-sim`
//! (`src/bin/wechat-sim.rs`); [`crate::harness::sim::SimProcess`] starts it and wraps this API.
//!
//! # Settings (environment)
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `WECHAT_SIM_ADDR` | `127.0.0.1:9300` | address to listen on (`127.0.0.1:0` picks a free port) |
//! | `WECHAT_SIM_APPID` | `wx00000000000000d1` | the one app the simulator knows |
//! | `WECHAT_SIM_SECRET` | `0123456789abcdef0123456789abcdef` | that app's secret |
//! | `RUST_LOG` | `info` | log filter |
//!
//! A malformed value stops start-up with a message that names it. Logs are JSON lines on
//! stdout; once listening, the simulator logs `listener = "http"` and
//! `listen_addr = "IP:PORT"`. SIGTERM or Ctrl-C stops it with exit code 0.
//!
//! # WeChat endpoints
//!
//! ## `GET /sns/jscode2session?appid=&secret=&js_code=&grant_type=authorization_code`
//!
//! Answers JSON with `Content-Type: text/plain` and HTTP 200 whatever the outcome, as WeChat
//! does. Errors are `{"errcode": N, "errmsg": "<text>, rid: <id>"}` (a fault's own `errmsg` is
//! answered as it is). The checks, in order:
//!
//! 1. the first active fault that matches the call (see `POST /sim/faults`);
//! 2. `appid` not the simulator's → 40013; `secret` wrong → 40125; `grant_type` not
//!    `authorization_code` → 40002; `js_code` missing or empty → 41008;
//! 3. code unknown or minted for another appid → 40029 (the call names no user of the app);
//! 4. otherwise the call is the code's user's and counts toward that user's quota, whatever its
//!    outcome (WECHAT.md: 45011 is over 100 *calls* per user per minute): when the user already
//!    made 100 such calls in the last 60 s of the simulator's clock → 45011, whether the code is
//!    fresh, used or expired (the 101st call fails; the refused one counts too; a refused call
//!    does not consume the code). Calls refused at step 1 or 2 do not count;
//! 5. code older than 5 minutes on the simulator's clock → 40029; already exchanged → 40163;
//! 6. success: the code is consumed and the answer is
//!    `{"openid": "…", "session_key": "<user's current key>"}` plus `"unionid"` when the user
//!    has one. The session_key is the user's *current* one, which a later login may have
//!    rotated since this code was minted.
//!
//! Every call, whatever its outcome (faults, drops and hangs included), is counted per endpoint
//! and per `js_code` (a call without a `js_code` counts for the endpoint only).
//!
//! ## What the other endpoints share
//!
//! They answer JSON with `Content-Type: application/json; encoding=utf-8` and HTTP 200 whatever
//! the outcome, errors in the same shape as above. Each is counted under its name below (the
//! `"endpoint"` of a fault, the keys of `GET /sim/calls`), and a staged fault for that name
//! applies to it before anything else is checked. The POSTed ones read their body as JSON
//! whatever the `Content-Type`; a body that is not a JSON object, or a field of the wrong type,
//! is 47001 `data format error`.
//!
//! The calls that carry an `access_token` in their query check it, before anything else but
//! the faults: missing or empty → 41001; never issued, or ended early (a force refresh, a newer
//! classic token, `POST /sim/access-token/invalidate`) → 40001; past its lifetime (or
//! `POST /sim/access-token/expire`) → 42001. When a token both ended and expired, the earlier of
//! the two decides.
//!
//! ## `POST /cgi-bin/stable_token` (endpoint `stable_token`)
//!
//! Body `{"grant_type": "client_credential", "appid": "…", "secret": "…", "force_refresh":
//! false}`. Checks, in order: body not a JSON object (or a field of the wrong type, such as a
//! string `force_refresh`) → 47001; `appid` missing or empty → 41002, not the simulator's →
//! 40013; `secret` missing or empty → 41004, wrong → 40125; `grant_type` not
//! `client_credential` → 40002. Success: `{"access_token": "…", "expires_in": N}` (no
//! errcode).
//!
//! The app has one current stable token at a time (the newest, if it still works):
//!
//! - `force_refresh` false or absent: the current token with its remaining whole seconds as
//!   `expires_in`, as long as more than 5 minutes of it remain. With 5 minutes or less left (or
//!   none at all, or the current one invalidated or expired), a new token is issued with the
//!   full lifetime, and the previous one keeps working until its own end: during those
//!   minutes both work. (With a lifetime of 5 minutes or less, every call issues a new one:
//!   a situation for tests only, since WeChat never issues a token that short.)
//! - `force_refresh: true`: every stable token that still works ends at once (40001 from now
//!   on) and a new one is issued. As WeChat documents: a force refresh less than 30 s (on the
//!   simulator's clock) after the previous successful one *does not refresh*: it answers as
//!   `force_refresh: false` would (no errcode, nothing ended) and uses up no quota; and at most
//!   20 force refreshes succeed within any 24 hours of the simulator's clock (a sliding window),
//!   the 21st is refused with 45009 `reach max api daily quota limit` (nothing ended).
//!
//! Tokens are `98_` followed by 152 URL-safe base64 characters (155 in all; WeChat's are about
//! as long and ask for room for 512). The lifetime is 7200 s unless
//! `POST /sim/access-token/lifetime` changed it. Stable and classic tokens are independent of
//! each other, as at WeChat.
//!
//! ## `GET /cgi-bin/token?grant_type=client_credential&appid=&secret=` (endpoint `token`)
//!
//! The classic access token. The same checks as stable_token (41002/40013, 41004/40125, 40002)
//! on the query parameters. Each successful call issues a new token (`{"access_token",
//! "expires_in"}` with the full lifetime), and the previous classic token ends 5 minutes later
//! (40001 from then on), so two servers that each fetch their own keep breaking each other.
//!
//! ## `POST /wxa/business/getuserphonenumber?access_token=AT` (endpoint `getuserphonenumber`)
//!
//! Body `{"code": "…", "openid": "…"}` (`openid` optional). Checks, in order: the access_token;
//! body not a JSON object, or `code`/`openid` not strings → 47001; `code` missing or empty →
//! 41008; then 40029 for a code that is unknown, older than 5 minutes on the simulator's clock,
//! already redeemed (WeChat documents 40029 for a used code too), or, when an `openid` is
//! given, not that user's: minted for another openid, or minted without one (such a code
//! belongs to a user nobody named, as at WeChat every code is some user's: only a call without
//! `openid` redeems it). A refused call does not use the code up. Success, which uses it up:
//!
//! ```json
//! {"errcode": 0, "errmsg": "ok", "phone_info": {"phoneNumber": "13800138000",
//!  "purePhoneNumber": "13800138000", "countryCode": "86",
//!  "watermark": {"timestamp": <simulator's now, Unix seconds>, "appid": "<the simulator's>"}}}
//! ```
//!
//! `phoneNumber` is the pure number for country code 86, else `+`, the country code and the
//! number (`+85261234567`; WeChat only says foreign numbers carry their code). `countryCode` is
//! a string unless `POST /sim/phone-number-format` asked for a number. The call is counted per
//! `code` too (in `GET /sim/calls`), and a fault's `code` matches it.
//!
//! ## `GET /wxa/checksession?access_token=AT&openid=&signature=&sig_method=hmac_sha256` (endpoint `checksession`)
//!
//! Checks, in order: the access_token; `openid` missing or not a user the simulator knows →
//! 40003 `invalid openid`; `sig_method` other than `hmac_sha256`, or `signature` other than
//! the lowercase hex HMAC-SHA256 keyed with the user's *current* session_key's base64 text (as
//! ASCII bytes) of the empty message → 87009 `invalid signature` (so a stale key gives 87009).
//! Success: `{"errcode": 0, "errmsg": "ok"}`.
//!
//! ## `GET /wxa/resetusersessionkey?…the same query…` (endpoint `resetusersessionkey`)
//!
//! The same checks as checksession (the signature of the current key). Success: the user gets
//! a fresh session_key, the current one moving to its history (it no longer passes
//! checksession), and the answer is `{"errcode": 0, "errmsg": "ok", "openid": "…",
//! "session_key": "<the new key>"}`.
//!
//! # Control API
//!
//! JSON in and out. A request body may be empty (it then reads as `{}`); unknown fields, wrong
//! types and values that make no sense are refused with 400 `{"error": "<what is wrong>"}`.
//! Unknown routes answer 404 and wrong methods 405, both with `{"error": …}`.
//!
//! ## `POST /sim/login-codes`: what `wx.login()` does on the phone
//!
//! Body, every field optional:
//! `{"openid": "…", "unionid": "…", "with_unionid": true, "appid": "…"}`.
//!
//! - without `openid`, a new user is created; with an `openid` the simulator does not know, that
//!   user is created; with a known one, that user logs in again;
//! - `unionid` sets the user's unionid (at creation or later); `with_unionid: true` gives the
//!   user a random unionid unless it already has one (giving both is a 400);
//! - `appid` (default: the simulator's) mints the code for another app, so exchanging it with
//!   the simulator's appid gives 40029 (with an `openid` too it is a 400: a login in another
//!   app must not rotate one of this app's users' keys).
//!
//! A given `openid` or `unionid` must be 1 to 128 printable ASCII characters without spaces, a
//! given `appid` ASCII letters and digits.
//!
//! - `keep_session_key: true` leaves a known user's session_key as it is (WeChat *may* rotate
//!   it at a login, WECHAT.md §2); a new user gets one all the same.
//!
//! Minting rotates the user's session_key (unless `keep_session_key`): a fresh one replaces the
//! current one, which moves to the user's history. Answer: 200
//! `{"code": "…", "openid": "…", "unionid": "…"|null, "session_key": "<the new current key>"}`.
//! Codes are 32 characters of `[A-Za-z0-9]` starting with `0`; openids and unionids are `o`
//! followed by 27 URL-safe base64 characters; session keys are the base64 (24 characters) of 16
//! random bytes.
//!
//! ## `GET /sim/users/{openid}`
//!
//! 200 `{"openid": "…", "unionid": "…"|null, "session_key": "…", "previous_session_keys":
//! ["<newest first>", …]}`; 404 `{"error": …}` for an unknown openid.
//!
//! ## `POST /sim/phone-codes`: what `<button open-type="getPhoneNumber">` does
//!
//! Body `{"phone_number": "13800138000", "country_code": "86", "openid": "…"}`: `phone_number`
//! 4 to 20 ASCII digits (required), `country_code` 1 to 4 ASCII digits without `+` (default
//! `"86"`), `openid` (optional, same rules as above) the user the code belongs to; without
//! one, it belongs to a user nobody named, so getuserphonenumber refuses it (40029) for every
//! `openid` and redeems it only without one. The user need not exist. Answer: 200
//! `{"code": "<64 lowercase hex digits>"}`, redeemable once within 5 minutes of the
//! simulator's clock.
//!
//! ## `POST /sim/phone-number-format`
//!
//! Body `{"country_code_as_number": bool}` (required). `true`: getuserphonenumber answers
//! `countryCode` as a JSON number (`86`); `false` (the default): as a string (`"86"`). Answer:
//! 200 with the body as set.
//!
//! ## `POST /sim/encrypt`: what the phone does for encryptedData
//!
//! Body `{"openid": "…", "data": {…}, "session_key": "<base64>", "appid": "…"}`:
//!
//! - `data` (required) a JSON object without a `watermark` field;
//! - the key: `session_key` when given (the base64 of 16 bytes; any key, such as one from the
//!   user's history), else the current session_key of the user `openid` (404 for an unknown
//!   user); giving neither is a 400;
//! - `appid` (ASCII letters and digits; default the simulator's) goes into the watermark.
//!
//! The plaintext is the compact JSON of `data` (its fields in the simulator's order, currently
//! sorted by name) with `"watermark":{"timestamp":<simulator's now, Unix seconds>,"appid":"…"}`
//! appended as its last field; it is encrypted with AES-128-CBC, PKCS#7 padding, key =
//! base64-decode(session_key), and a random 16-byte iv. Answer: 200 `{"encrypted_data":
//! "<base64>", "iv": "<base64, 24 characters>"}` (standard base64 with padding).
//!
//! ## `GET /sim/access-token`
//!
//! 200 `{"access_token": "…"|null, "expires_at": N|null, "expires_in": N|null,
//! "classic_access_token": "…"|null, "lifetime_seconds": N, "force_refreshes_today": N, "now": N,
//! "tokens": [{"access_token": "…", "kind": "stable"|"classic", "issued_at": N, "expires_at": N,
//! "ended_at": N|null, "status": "valid"|"invalid"|"expired"}, …]}`. `access_token` is the
//! current stable token (the newest, if it still works), `classic_access_token` the newest
//! classic one if it still works; `tokens` lists every token issued, newest first; times are
//! Unix seconds on the simulator's clock (`now` is its now); `force_refreshes_today` counts the
//! successful force refreshes of the last 24 hours.
//!
//! ## `POST /sim/access-token/invalidate` and `POST /sim/access-token/expire`
//!
//! Body `{"access_token": "…"}` (optional; the body may be empty): that token (404 if the
//! simulator never issued it), or without one, every token that works at this moment (stable
//! and classic, including a stable token in its last minutes next to its successor).
//! `invalidate` ends them: 40001 from now on; `expire` puts their lifetime's end at now: 42001
//! from now on. Either way stable_token then issues a new token on its next call. Answer: 200
//! `{"access_tokens": ["<each token it applied to>", …]}` (empty when none worked).
//!
//! ## `POST /sim/access-token/lifetime`
//!
//! Body `{"seconds": N}`, 1 to 315360000 (ten years). The lifetime of the tokens issued from now
//! on (tokens already issued keep theirs); 7200 until set. Answer: 200 `{"lifetime_seconds": N}`.
//!
//! ## `POST /sim/faults`: make WeChat misbehave
//!
//! Body: `{"endpoint": "jscode2session", "code": "…", "errcode": N, "errmsg": "…",
//! "delay_ms": N, "hang": bool, "drop": bool, "drop_after": bool, "times": N}`, all optional
//! but at least one of `errcode`, `delay_ms`, `hang`, `drop`, `drop_after`.
//!
//! - `endpoint`: which WeChat call it applies to: `jscode2session` (the default),
//!   `stable_token`, `token`, `getuserphonenumber`, `checksession` or `resetusersessionkey`;
//! - `code`: only calls carrying this code (a `js_code`, or the `code` of a getuserphonenumber
//!   body) match; without it, every call of the endpoint matches;
//! - `errcode`/`errmsg`: the error to answer. A given `errmsg` is answered exactly as it is;
//!   without one, the answer is WeChat's text for known errcodes, else `"simulated error"`,
//!   followed by `", rid: <id>"` (an `errmsg` without `errcode` is a 400);
//! - `delay_ms`: wait this long before answering; without `errcode`, the call is then processed
//!   normally (a pure slow answer);
//! - `hang: true`: never answer (the call is released when the client goes away);
//! - `drop: true`: close the connection without answering, before the call has any effect;
//! - `drop_after: true`: process the call in full (a code used, a number billed, a success
//!   counted), then close the connection without answering: WeChat did its part and the answer
//!   was lost on the way, which a client cannot tell from `drop`;
//! - `times`: how many calls it applies to (at least 1); omitted, it applies to every call.
//!
//! `hang`, `drop` and `drop_after` exclude each other and every other effect. For each call, the first active
//! fault that matches, in the order they were added, is used and one of its `times` consumed;
//! an exhausted fault is removed. A call a fault applies to is still counted. Answer: 200
//! `{"id": N}`.
//!
//! ## `DELETE /sim/faults`
//!
//! Removes every active fault. 200 `{"cleared": N}`.
//!
//! ## `GET /sim/calls`
//!
//! 200 `{"endpoints": {"jscode2session": N, "stable_token": N, "token": N,
//! "getuserphonenumber": N, "checksession": N, "resetusersessionkey": N}, "codes": {"<code>": N,
//! …}}`, counting every call whatever its outcome; `codes` counts js_codes and phone codes.
//! Only endpoints and codes called at least once appear.
//!
//! ## `POST /sim/clock/advance`
//!
//! Body `{"seconds": N}` (a non-negative integer). Moves the simulator's clock forward, for code
//! and token expiry, the quotas and the watermarks' timestamps (which are the wall clock at
//! start-up plus the simulator's elapsed time). 200 `{"offset_seconds": <total advance so
//! far>}`.
//!
//! ## `POST /sim/reset`
//!
//! Forgets users, login and phone codes, access tokens (and the lifetime and force-refresh
//! quota), the `countryCode` format, faults, call counts and the clock's advance. 200 `{}`.
//!
//! # Layout
//!
//! `server` accepts connections (and can drop one on demand), `state` holds the simulated world
//! behind one lock, `wechat` is what every WeChat endpoint shares (call counting, faults, the
//! answer and error shapes), `control` the control API's plumbing, and each WeChat call is one
//! module with its own `router()` (its WeChat route and its control routes) and its own part of
//! the world: `jscode2session` (login codes, the per-user quota), `access_token` (stable_token
//! and token: every token issued, the lifetime, the force-refresh quota; and the check the
//! calls carrying a token make), `phone_number` (getuserphonenumber: phone codes, the
//! `countryCode` format), `session_key` (checksession, resetusersessionkey and `/sim/encrypt`;
//! the keys live in `users`). A new WeChat call is one more such module (or one more route of a
//! module whose part of the world it shares), one more `wechat::Endpoint` variant, one more
//! field of `state::World` if it has a part of its own, and one more `merge` in [`router`].

mod access_token;
mod calls;
mod clock;
mod config;
mod control;
mod faults;
mod ids;
mod jscode2session;
mod phone_number;
mod server;
mod session_key;
mod state;
mod telemetry;
mod users;
mod wechat;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;

pub use config::{ConfigError, Settings};
pub use server::Simulator;
pub use state::SimState;
pub use telemetry::init_subscriber;

/// The whole HTTP surface: the WeChat endpoints and the control API.
pub fn router(state: SimState) -> Router {
    Router::new()
        .merge(jscode2session::router())
        .merge(access_token::router())
        .merge(phone_number::router())
        .merge(session_key::router())
        .merge(users::router())
        .merge(faults::router())
        .merge(calls::router())
        .merge(control::router())
        .fallback(control::no_such_route)
        .method_not_allowed_fallback(control::method_not_allowed)
        .layer(middleware::from_fn(wechat::drop_after_processing))
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// One log line per answered request. The query string is left out: it carries the secret.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = next.run(request).await;
    if server::is_dropped(&response) {
        tracing::info!(%method, %path, "dropped the connection without answering");
    } else {
        tracing::info!(%method, %path, status = response.status().as_u16(), "answered");
    }
    response
}
