//! Staged misbehaviour of the WeChat endpoints (forced errcodes, slow answers, hangs, dropped
//! connections), `POST /sim/faults` and `DELETE /sim/faults`. The WeChat side applies them
//! through `wechat::begin_call`.

use std::time::Duration;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::control::{ControlError, ControlJson};
use super::state::SimState;
use super::wechat::{Endpoint, WechatError};

/// What a fault does to a call it applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FaultAction {
    /// Close the connection without answering.
    Drop,
    /// Process the call (a code used, a number billed), then close the connection without
    /// answering: WeChat did its part, the answer was lost on the way.
    DropAfter,
    /// Never answer.
    Hang,
    /// Wait `delay`, then answer `error`, or process the call normally when there is none.
    Answer {
        delay: Option<Duration>,
        error: Option<WechatError>,
    },
}

#[derive(Debug)]
struct Fault {
    id: u64,
    endpoint: Endpoint,
    /// Only calls with this code match; `None`: every call of the endpoint.
    code: Option<String>,
    action: FaultAction,
    /// How many more calls it applies to (at least 1); `None`: every call.
    remaining: Option<u32>,
}

impl Fault {
    fn matches(&self, endpoint: Endpoint, code: Option<&str>) -> bool {
        self.endpoint == endpoint
            && self
                .code
                .as_deref()
                .is_none_or(|wanted| Some(wanted) == code)
    }
}

/// The active faults, in the order they were added.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    last_id: u64,
    active: Vec<Fault>,
}

impl Faults {
    fn add(
        &mut self,
        endpoint: Endpoint,
        code: Option<String>,
        action: FaultAction,
        times: Option<u32>,
    ) -> u64 {
        self.last_id += 1;
        self.active.push(Fault {
            id: self.last_id,
            endpoint,
            code,
            action,
            remaining: times,
        });
        self.last_id
    }

    fn clear(&mut self) -> usize {
        std::mem::take(&mut self.active).len()
    }

    /// The action of the first active fault that matches a call of `endpoint` carrying `code`,
    /// using up one of its times; an exhausted fault is removed.
    pub(crate) fn take(&mut self, endpoint: Endpoint, code: Option<&str>) -> Option<FaultAction> {
        let index = self
            .active
            .iter()
            .position(|fault| fault.matches(endpoint, code))?;
        let fault = &mut self.active[index];
        let action = fault.action.clone();
        tracing::info!(
            fault = fault.id,
            endpoint = endpoint.name(),
            "a staged fault applies"
        );
        match &mut fault.remaining {
            Some(1) => {
                self.active.remove(index);
            }
            Some(remaining) => *remaining -= 1,
            None => {}
        }
        Some(action)
    }
}

pub(crate) fn router() -> Router<SimState> {
    Router::new().route("/sim/faults", post(add_fault).delete(clear_faults))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultBody {
    endpoint: Option<Endpoint>,
    code: Option<String>,
    errcode: Option<i64>,
    errmsg: Option<String>,
    delay_ms: Option<u64>,
    #[serde(default)]
    hang: bool,
    #[serde(default)]
    drop: bool,
    #[serde(default)]
    drop_after: bool,
    times: Option<u32>,
}

/// A fault as the control API asked for it, checked.
#[derive(Debug, PartialEq, Eq)]
struct NewFault {
    endpoint: Endpoint,
    code: Option<String>,
    action: FaultAction,
    times: Option<u32>,
}

impl TryFrom<FaultBody> for NewFault {
    type Error = ControlError;

    fn try_from(body: FaultBody) -> Result<Self, Self::Error> {
        if body.code.as_deref() == Some("") {
            return Err(ControlError::bad_request("code must not be empty"));
        }
        if body.times == Some(0) {
            return Err(ControlError::bad_request("times must be at least 1"));
        }
        if body.errmsg.is_some() && body.errcode.is_none() {
            return Err(ControlError::bad_request("errmsg needs an errcode"));
        }
        let answers = body.errcode.is_some() || body.delay_ms.is_some();
        if body.drop_after {
            if answers || body.hang || body.drop {
                return Err(ControlError::bad_request(
                    "drop_after excludes errcode, errmsg, delay_ms, hang and drop",
                ));
            }
            return Ok(Self {
                endpoint: body.endpoint.unwrap_or(Endpoint::Jscode2session),
                code: body.code,
                action: FaultAction::DropAfter,
                times: body.times,
            });
        }
        let action = match (body.hang, body.drop) {
            (true, true) => {
                return Err(ControlError::bad_request(
                    "hang and drop exclude each other",
                ));
            }
            (true, false) | (false, true) if answers => {
                return Err(ControlError::bad_request(
                    "hang and drop exclude errcode, errmsg and delay_ms",
                ));
            }
            (true, false) => FaultAction::Hang,
            (false, true) => FaultAction::Drop,
            (false, false) if !answers => {
                return Err(ControlError::bad_request(
                    "a fault needs one of errcode, delay_ms, hang, drop or drop_after",
                ));
            }
            (false, false) => FaultAction::Answer {
                delay: body.delay_ms.map(Duration::from_millis),
                error: body.errcode.map(|errcode| match body.errmsg {
                    Some(errmsg) => WechatError::with_message(errcode, errmsg),
                    None => WechatError::new(errcode),
                }),
            },
        };
        Ok(Self {
            endpoint: body.endpoint.unwrap_or(Endpoint::Jscode2session),
            code: body.code,
            action,
            times: body.times,
        })
    }
}

#[derive(Debug, Serialize)]
struct FaultAdded {
    id: u64,
}

async fn add_fault(
    State(state): State<SimState>,
    ControlJson(body): ControlJson<FaultBody>,
) -> Result<Json<FaultAdded>, ControlError> {
    let fault = NewFault::try_from(body)?;
    tracing::info!(
        endpoint = fault.endpoint.name(),
        code = fault.code.as_deref(),
        action = ?fault.action,
        times = fault.times,
        "fault staged"
    );
    let id = state.with_world(|world| {
        world
            .faults
            .add(fault.endpoint, fault.code, fault.action, fault.times)
    });
    Ok(Json(FaultAdded { id }))
}

#[derive(Debug, Serialize)]
struct FaultsCleared {
    cleared: usize,
}

async fn clear_faults(State(state): State<SimState>) -> Json<FaultsCleared> {
    let cleared = state.with_world(|world| world.faults.clear());
    Json(FaultsCleared { cleared })
}

#[cfg(test)]
mod tests {
    use super::*;

    const JS: Endpoint = Endpoint::Jscode2session;

    fn forced(errcode: i64) -> FaultAction {
        FaultAction::Answer {
            delay: None,
            error: Some(WechatError::new(errcode)),
        }
    }

    fn parse(json: &str) -> Result<NewFault, ControlError> {
        let body: FaultBody = serde_json::from_str(json).expect("a fault body");
        NewFault::try_from(body)
    }

    #[test]
    fn a_fault_applies_its_times_then_is_gone() {
        let mut faults = Faults::default();
        faults.add(JS, None, forced(-1), Some(2));
        assert_eq!(faults.take(JS, Some("a")), Some(forced(-1)));
        assert_eq!(faults.take(JS, None), Some(forced(-1)));
        assert_eq!(faults.take(JS, Some("a")), None);
        assert_eq!(faults.clear(), 0);
    }

    #[test]
    fn a_fault_without_times_applies_always() {
        let mut faults = Faults::default();
        faults.add(JS, None, FaultAction::Drop, None);
        for _ in 0..5 {
            assert_eq!(faults.take(JS, Some("a")), Some(FaultAction::Drop));
        }
        assert_eq!(faults.clear(), 1);
    }

    #[test]
    fn the_first_matching_fault_wins_and_a_code_scopes_it() {
        let mut faults = Faults::default();
        faults.add(JS, Some("b".into()), forced(40226), None);
        faults.add(JS, None, forced(-1), Some(1));
        assert_eq!(faults.take(JS, Some("b")), Some(forced(40226)));
        assert_eq!(faults.take(JS, Some("a")), Some(forced(-1)));
        assert_eq!(faults.take(JS, Some("a")), None);
        assert_eq!(faults.take(JS, None), None);
        assert_eq!(faults.take(JS, Some("b")), Some(forced(40226)));
    }

    #[test]
    fn a_body_becomes_a_fault() {
        let fault = parse(r#"{"code":"c","errcode":40226,"errmsg":"risky","times":1}"#)
            .expect("a valid fault");
        assert_eq!(
            fault,
            NewFault {
                endpoint: JS,
                code: Some("c".into()),
                action: FaultAction::Answer {
                    delay: None,
                    error: Some(WechatError::with_message(40226, "risky")),
                },
                times: Some(1),
            }
        );
        let fault = parse(r#"{"delay_ms":250}"#).expect("a valid fault");
        assert_eq!(
            fault.action,
            FaultAction::Answer {
                delay: Some(Duration::from_millis(250)),
                error: None
            }
        );
        assert_eq!(
            parse(r#"{"hang":true}"#).expect("valid").action,
            FaultAction::Hang
        );
        assert_eq!(
            parse(r#"{"drop_after":true,"endpoint":"getuserphonenumber"}"#)
                .expect("valid")
                .action,
            FaultAction::DropAfter
        );
    }

    #[test]
    fn senseless_bodies_are_refused() {
        for json in [
            "{}",
            r#"{"hang":true,"drop":true}"#,
            r#"{"drop":true,"errcode":-1}"#,
            r#"{"hang":true,"delay_ms":5}"#,
            r#"{"errmsg":"x"}"#,
            r#"{"errcode":-1,"times":0}"#,
            r#"{"errcode":-1,"code":""}"#,
            r#"{"drop_after":true,"drop":true}"#,
            r#"{"drop_after":true,"hang":true}"#,
            r#"{"drop_after":true,"errcode":-1}"#,
            r#"{"drop_after":true,"delay_ms":5}"#,
        ] {
            assert!(
                matches!(parse(json), Err(ControlError::BadRequest(_))),
                "{json} should be refused"
            );
        }
    }
}
