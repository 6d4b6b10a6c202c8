//! Call counts per WeChat endpoint and per code, and `GET /sim/calls`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::state::SimState;
use super::wechat::Endpoint;

#[derive(Debug, Default)]
pub(crate) struct CallCounts {
    endpoints: BTreeMap<Endpoint, u64>,
    codes: BTreeMap<String, u64>,
}

impl CallCounts {
    /// Counts one call of `endpoint`, and one for `code` when the call carried one.
    pub(crate) fn record(&mut self, endpoint: Endpoint, code: Option<&str>) {
        *self.endpoints.entry(endpoint).or_default() += 1;
        if let Some(code) = code {
            *self.codes.entry(code.to_owned()).or_default() += 1;
        }
    }
}

#[derive(Debug, Serialize)]
struct CallsAnswer {
    endpoints: BTreeMap<&'static str, u64>,
    codes: BTreeMap<String, u64>,
}

pub(crate) fn router() -> Router<SimState> {
    Router::new().route("/sim/calls", get(calls))
}

async fn calls(State(state): State<SimState>) -> Json<CallsAnswer> {
    Json(state.with_world(|world| {
        CallsAnswer {
            endpoints: world
                .calls
                .endpoints
                .iter()
                .map(|(endpoint, n)| (endpoint.name(), *n))
                .collect(),
            codes: world.calls.codes.clone(),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_add_up_per_endpoint_and_per_code() {
        let mut counts = CallCounts::default();
        counts.record(Endpoint::Jscode2session, Some("a"));
        counts.record(Endpoint::Jscode2session, Some("a"));
        counts.record(Endpoint::Jscode2session, None);
        assert_eq!(counts.endpoints[&Endpoint::Jscode2session], 3);
        assert_eq!(counts.codes["a"], 2);
        assert_eq!(counts.codes.len(), 1);
    }
}
