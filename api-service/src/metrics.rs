//! Prometheus metrics, served on `API_METRICS_ADDR` (a listener of its own, never the public
//! port): requests by route and status, their latency, `Verify` outcomes, and the gRPC
//! calls the edge makes for them.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use axum::http::Method;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a request count. Built without allocating but for the route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

/// Labels of a request latency.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LatencyLabels {
    method: &'static str,
    route: String,
}

/// What a `Verify` call came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// The token is good.
    Ok,
    /// auth-service refused it (401 and the like).
    Refused,
    /// auth-service could not be asked (503 `auth_unavailable`).
    Unavailable,
}

impl VerifyOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Unavailable => "unavailable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VerifyLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcLabels {
    rpc: &'static str,
}

/// Counts of the gRPC calls made for `Verify` (see `auth::batch`): how many requests each
/// call carried (1 for a plain `Verify`); stalls are the calls sent because the oldest
/// queued `Verify` waited for a sender (auth-service slow to answer).
#[derive(Debug, Clone)]
pub struct VerifyCalls {
    alone: Counter,
    batch: Counter,
    stalls: Counter,
    items: Histogram,
}

impl Default for VerifyCalls {
    fn default() -> Self {
        Self {
            alone: Counter::default(),
            batch: Counter::default(),
            stalls: Counter::default(),
            items: items_histogram(),
        }
    }
}

/// Requests per call: 1, 2, 4, ... 256 (the most a batch carries).
fn items_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 9))
}

impl VerifyCalls {
    /// A plain `Verify` call.
    pub fn alone(&self) {
        self.alone.inc();
        self.items.observe(1.0);
    }

    /// A `VerifyBatch` call carrying `items` requests.
    pub fn batch(&self, items: usize) {
        self.batch.inc();
        // Exact as a float: a batch holds at most a few hundred.
        #[allow(clippy::cast_precision_loss)]
        self.items.observe(items as f64);
    }

    /// A call sent because the queue stalled (counted as well as `alone` or `batch`).
    pub fn stall(&self) {
        self.stalls.inc();
    }

    /// Plain calls, batches and stalls counted so far.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (u64, u64, u64) {
        (self.alone.get(), self.batch.get(), self.stalls.get())
    }
}

/// The service's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    verify: Family<VerifyLabels, Counter>,
    verify_calls: VerifyCalls,
    /// The series of each route, method and status seen, by route: what
    /// [`Metrics::observe_http`] looked up in both families on every request (a `String` for
    /// the route in each key, two lookups) found with one lookup and no allocation. The
    /// handles are clones of the families' own metrics, so they count the same series.
    http: RwLock<HashMap<Box<str>, Vec<HttpSeries>>>,
}

/// One route's series for a method and a status.
#[derive(Debug)]
struct HttpSeries {
    method: &'static str,
    status: u16,
    latency: Histogram,
    requests: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// The method as a label: the standard ones by name, anything else as `OTHER`, so that a
/// client inventing methods cannot grow the metrics without bound.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "OTHER",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wxauth_api");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        let verify = Family::<VerifyLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by method, route and status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by method and route",
            latency.clone(),
        );
        registry.register(
            "verify",
            "Outcomes of Verify calls to auth-service (ok, refused, unavailable)",
            verify.clone(),
        );
        let calls = Family::<RpcLabels, Counter>::default();
        // One statement each: the family's read guard lives to the end of its statement, and
        // creating the next series takes its write lock.
        let alone = calls.get_or_create(&RpcLabels { rpc: "Verify" }).clone();
        let batch = calls
            .get_or_create(&RpcLabels { rpc: "VerifyBatch" })
            .clone();
        let verify_calls = VerifyCalls {
            alone,
            batch,
            ..VerifyCalls::default()
        };
        registry.register(
            "verify_calls",
            "gRPC calls made to auth-service for Verify, by RPC (a VerifyBatch carries several)",
            calls,
        );
        registry.register(
            "verify_stalls",
            "Verify calls sent because the oldest queued Verify waited 5 ms for a sender",
            verify_calls.stalls.clone(),
        );
        registry.register(
            "verify_call_requests",
            "Requests carried by each gRPC call made for Verify (1 for a plain Verify)",
            verify_calls.items.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            latency,
            verify,
            verify_calls,
            http: RwLock::default(),
        }
    }

    /// Counts one answered request. `route` is the matched route template (low cardinality).
    pub fn observe_http(&self, method: &Method, route: &str, status: u16, elapsed: Duration) {
        let method = method_label(method);
        let is = |s: &&HttpSeries| s.method == method && s.status == status;
        let observe = |s: &HttpSeries| {
            s.latency.observe(elapsed.as_secs_f64());
            s.requests.inc();
        };
        {
            let http = self.http.read().unwrap_or_else(|p| p.into_inner());
            if let Some(series) = http.get(route).and_then(|r| r.iter().find(is)) {
                return observe(series);
            }
        }
        let mut http = self.http.write().unwrap_or_else(|p| p.into_inner());
        let seen = http.entry(route.into()).or_default();
        // Another request may have added it since the read.
        if let Some(series) = seen.iter().find(is) {
            return observe(series);
        }
        let series = HttpSeries {
            method,
            status,
            latency: self
                .latency
                .get_or_create(&LatencyLabels {
                    method,
                    route: route.to_owned(),
                })
                .clone(),
            requests: self
                .requests
                .get_or_create(&RequestLabels {
                    method,
                    route: route.to_owned(),
                    status,
                })
                .clone(),
        };
        observe(&series);
        seen.push(series);
    }

    /// Counts one `Verify` outcome.
    pub fn verify_outcome(&self, outcome: VerifyOutcome) {
        self.verify
            .get_or_create(&VerifyLabels {
                outcome: outcome.label(),
            })
            .inc();
    }

    /// The counters of the gRPC calls made for `Verify`, for the client that makes them.
    pub fn verify_calls(&self) -> VerifyCalls {
        self.verify_calls.clone()
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_was_observed() {
        let m = Metrics::new();
        m.observe_http(&Method::GET, "/v1/me", 200, Duration::from_millis(3));
        m.observe_http(
            &Method::from_bytes(b"BREW").expect("a method"),
            "unmatched",
            405,
            Duration::from_millis(1),
        );
        m.verify_outcome(VerifyOutcome::Ok);
        m.verify_outcome(VerifyOutcome::Unavailable);
        let calls = m.verify_calls();
        calls.alone();
        calls.batch(3);
        calls.batch(200);
        calls.stall();
        // Seen again (through the kept handles), beside other statuses and methods of it.
        m.observe_http(&Method::GET, "/v1/me", 200, Duration::from_millis(2));
        m.observe_http(&Method::GET, "/v1/me", 401, Duration::from_millis(1));
        m.observe_http(&Method::PATCH, "/v1/me", 200, Duration::from_millis(1));
        let text = m.render();
        for line in [
            r#"wxauth_api_http_requests_total{method="GET",route="/v1/me",status="200"} 2"#,
            r#"wxauth_api_http_requests_total{method="GET",route="/v1/me",status="401"} 1"#,
            r#"wxauth_api_http_requests_total{method="PATCH",route="/v1/me",status="200"} 1"#,
            r#"wxauth_api_http_request_duration_seconds_count{method="GET",route="/v1/me"} 3"#,
            r#"wxauth_api_http_requests_total{method="OTHER",route="unmatched",status="405"} 1"#,
            r#"wxauth_api_verify_total{outcome="ok"} 1"#,
            r#"wxauth_api_verify_total{outcome="unavailable"} 1"#,
            r#"wxauth_api_verify_calls_total{rpc="Verify"} 1"#,
            r#"wxauth_api_verify_calls_total{rpc="VerifyBatch"} 2"#,
            "wxauth_api_verify_stalls_total 1",
            // Requests per call: 1, 3 and 200.
            "wxauth_api_verify_call_requests_count 3",
            "wxauth_api_verify_call_requests_sum 204.0",
            r#"wxauth_api_verify_call_requests_bucket{le="1.0"} 1"#,
            r#"wxauth_api_verify_call_requests_bucket{le="4.0"} 2"#,
            r#"wxauth_api_verify_call_requests_bucket{le="128.0"} 2"#,
            r#"wxauth_api_verify_call_requests_bucket{le="256.0"} 3"#,
        ] {
            assert!(text.contains(line), "{line} is not in:\n{text}");
        }
        assert!(text.contains("wxauth_api_http_request_duration_seconds_bucket"));
    }
}
