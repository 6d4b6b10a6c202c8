//! Prometheus metrics, served on `AUTH_METRICS_ADDR` (a listener of its own, never the gRPC
//! port): `AuthService` calls by method and outcome, their latency, and logins by outcome.
//!
//! An outcome is `OK` or the ErrorInfo reason the call failed with (`TOKEN_EXPIRED`,
//! `WECHAT_INVALID_CODE`, …): a closed set, so the label stays low-cardinality.

use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The outcome of a call that succeeded.
pub const OK: &str = "OK";

/// The method most calls are: a `Verify` per business request of the edge.
pub(crate) const VERIFY: &str = "/wxauth.v1.AuthService/Verify";

/// The OpenMetrics text format's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type MethodOutcome = [(&'static str, &'static str); 2];
type Method = [(&'static str, &'static str); 1];
type Outcome = [(&'static str, &'static str); 1];

/// The service's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    calls: Family<MethodOutcome, Counter>,
    latency: Family<Method, Histogram, fn() -> Histogram>,
    logins: Family<Outcome, Counter>,
    /// The series of `Verify` answered OK, looked up in the families once (on the first such
    /// call, so that nothing shows before it) instead of per call: a family's lookup hashes
    /// its labels under a lock, about 1.5 % of auth-service's instructions per `Verify`.
    verify_ok: OnceLock<(Counter, Histogram)>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~16 s (a login waits for WeChat, up to AUTH_WECHAT_TIMEOUT and one retry).
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
        let mut registry = Registry::with_prefix("wxauth_auth");
        let calls = Family::<MethodOutcome, Counter>::default();
        let latency =
            Family::<Method, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let logins = Family::<Outcome, Counter>::default();
        registry.register(
            "grpc_calls",
            "AuthService calls by method and outcome (OK or the ErrorInfo reason)",
            calls.clone(),
        );
        registry.register(
            "grpc_call_duration_seconds",
            "AuthService call latency by method",
            latency.clone(),
        );
        registry.register(
            "logins",
            "Logins by outcome (OK or the ErrorInfo reason)",
            logins.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            calls,
            latency,
            logins,
            verify_ok: OnceLock::new(),
        }
    }

    /// Counts one answered call. `method` is the gRPC path (`/wxauth.v1.AuthService/Login`),
    /// `outcome` is [`OK`] or the ErrorInfo reason.
    pub fn observe_call(&self, method: &'static str, outcome: &'static str, elapsed: Duration) {
        if outcome == OK && method == VERIFY {
            // Clones of a family's metric share its value: the same series, counted here.
            let (calls, latency) = self.verify_ok.get_or_init(|| {
                (
                    self.calls
                        .get_or_create(&[("method", VERIFY), ("outcome", OK)])
                        .clone(),
                    self.latency.get_or_create(&[("method", VERIFY)]).clone(),
                )
            });
            calls.inc();
            latency.observe(elapsed.as_secs_f64());
            return;
        }
        self.calls
            .get_or_create(&[("method", method), ("outcome", outcome)])
            .inc();
        self.latency
            .get_or_create(&[("method", method)])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one login attempt's outcome.
    pub fn login_outcome(&self, outcome: &'static str) {
        self.logins.get_or_create(&[("outcome", outcome)]).inc();
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
        m.observe_call("/wxauth.v1.AuthService/Login", OK, Duration::from_millis(3));
        m.observe_call(
            "/wxauth.v1.AuthService/Verify",
            "TOKEN_EXPIRED",
            Duration::from_millis(1),
        );
        m.login_outcome(OK);
        m.login_outcome("CODE_USED");
        let text = m.render();
        for line in [
            r#"wxauth_auth_grpc_calls_total{method="/wxauth.v1.AuthService/Login",outcome="OK"} 1"#,
            r#"wxauth_auth_grpc_calls_total{method="/wxauth.v1.AuthService/Verify",outcome="TOKEN_EXPIRED"} 1"#,
            r#"wxauth_auth_grpc_call_duration_seconds_count{method="/wxauth.v1.AuthService/Login"} 1"#,
            r#"wxauth_auth_logins_total{outcome="OK"} 1"#,
            r#"wxauth_auth_logins_total{outcome="CODE_USED"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            !text.contains(r#"outcome="OK"} 0"#),
            "no series before its first call"
        );
    }

    #[test]
    fn verify_answered_ok_counts_in_the_same_series_as_every_other_call() {
        let m = Metrics::new();
        let verify = "/wxauth.v1.AuthService/Verify";
        assert!(
            !m.render().contains(verify),
            "nothing before the first call"
        );
        for _ in 0..3 {
            m.observe_call(verify, OK, Duration::from_millis(1));
        }
        m.observe_call(verify, "TOKEN_REVOKED", Duration::from_millis(1));
        let text = m.render();
        for line in [
            r#"wxauth_auth_grpc_calls_total{method="/wxauth.v1.AuthService/Verify",outcome="OK"} 3"#,
            r#"wxauth_auth_grpc_calls_total{method="/wxauth.v1.AuthService/Verify",outcome="TOKEN_REVOKED"} 1"#,
            r#"wxauth_auth_grpc_call_duration_seconds_count{method="/wxauth.v1.AuthService/Verify"} 4"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert_eq!(text.matches(r#"outcome="OK"}"#).count(), 1, "{text}");
    }
}
