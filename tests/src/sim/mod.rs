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
//! 3. code unknown, minted for another appid, or older than 5 minutes on the simulator's clock
//!    → 40029; already exchanged → 40163;
//! 4. 100 successful exchanges for the code's user in the last 60 s of the simulator's clock
//!    → 45011 (the 101st fails; a refused call does not consume the code);
//! 5. success: the code is consumed and the answer is
//!    `{"openid": "…", "session_key": "<user's current key>"}` plus `"unionid"` when the user
//!    has one. The session_key is the user's *current* one, which a later login may have
//!    rotated since this code was minted.
//!
//! Every call, whatever its outcome (faults, drops and hangs included), is counted per endpoint
//! and per `js_code` (a call without a `js_code` counts for the endpoint only).
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
//!   the simulator's appid gives 40029.
//!
//! A given `openid` or `unionid` must be 1 to 128 printable ASCII characters without spaces, a
//! given `appid` ASCII letters and digits.
//!
//! Minting rotates the user's session_key: a fresh one replaces the current one, which moves to
//! the user's history. Answer: 200
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
//! ## `POST /sim/faults`: make WeChat misbehave
//!
//! Body: `{"endpoint": "jscode2session", "code": "…", "errcode": N, "errmsg": "…",
//! "delay_ms": N, "hang": bool, "drop": bool, "times": N}`, all optional but at least one of
//! `errcode`, `delay_ms`, `hang`, `drop`.
//!
//! - `endpoint`: which WeChat call it applies to (default `jscode2session`);
//! - `code`: only calls carrying this code (`js_code`) match; without it, every call matches;
//! - `errcode`/`errmsg`: the error to answer. A given `errmsg` is answered exactly as it is;
//!   without one, the answer is WeChat's text for known errcodes, else `"simulated error"`,
//!   followed by `", rid: <id>"` (an `errmsg` without `errcode` is a 400);
//! - `delay_ms`: wait this long before answering; without `errcode`, the call is then processed
//!   normally (a pure slow answer);
//! - `hang: true`: never answer (the call is released when the client goes away);
//! - `drop: true`: close the connection without answering;
//! - `times`: how many calls it applies to (at least 1); omitted, it applies to every call.
//!
//! `hang` and `drop` exclude each other and every other effect. For each call, the first active
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
//! 200 `{"endpoints": {"jscode2session": N, …}, "codes": {"<js_code>": N, …}}`; only
//! endpoints and codes called at least once appear.
//!
//! ## `POST /sim/clock/advance`
//!
//! Body `{"seconds": N}` (a non-negative integer). Moves the simulator's clock forward, for code
//! expiry and the per-minute quota. 200 `{"offset_seconds": <total advance so far>}`.
//!
//! ## `POST /sim/reset`
//!
//! Forgets users, codes, faults, call counts and the clock's advance. 200 `{}`.
//!
//! # Layout
//!
//! `server` accepts connections (and can drop one on demand), `state` holds the simulated world
//! behind one lock, `wechat` is what every WeChat endpoint shares (call counting, faults, the
//! answer and error shapes), `control` the control API's plumbing, and each WeChat call is one
//! module with its own `router()` (its WeChat route and its control routes) and its own part of
//! the world: `jscode2session` (login codes, the per-user quota). A new WeChat call is one more
//! such module, one more `wechat::Endpoint` variant, one more field of `state::World`, and one
//! more `merge` in [`router`].

mod calls;
mod clock;
mod config;
mod control;
mod faults;
mod ids;
mod jscode2session;
mod server;
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
        .merge(users::router())
        .merge(faults::router())
        .merge(calls::router())
        .merge(control::router())
        .fallback(control::no_such_route)
        .method_not_allowed_fallback(control::method_not_allowed)
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
