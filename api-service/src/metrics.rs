//! Prometheus metrics, served on `API_METRICS_ADDR` (a listener of its own, never the public
//! port): requests by route and status, their latency, and `Verify` outcomes.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// The service's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
    verify: Family<Labels, Counter>,
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

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wxauth_api");
        let requests = Family::<Labels, Counter>::default();
        let latency =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let verify = Family::<Labels, Counter>::default();
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
        Self {
            registry: Mutex::new(registry),
            requests,
            latency,
            verify,
        }
    }

    /// Counts one answered request. `route` is the matched route template (low cardinality).
    pub fn observe_http(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&vec![
                ("method", method.to_owned()),
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![
                ("method", method.to_owned()),
                ("route", route.to_owned()),
            ])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one `Verify` outcome.
    pub fn verify_outcome(&self, outcome: &'static str) {
        self.verify
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
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
        m.observe_http("GET", "/v1/me", 200, Duration::from_millis(3));
        m.verify_outcome("ok");
        let text = m.render();
        assert!(
            text.contains(
                r#"wxauth_api_http_requests_total{method="GET",route="/v1/me",status="200"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"wxauth_api_verify_total{outcome="ok"} 1"#),
            "{text}"
        );
        assert!(text.contains("wxauth_api_http_request_duration_seconds_bucket"));
    }
}
