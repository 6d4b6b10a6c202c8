//! Issue 8's targets, judged on the lines of one run: each target names the lines it applies
//! to and a bound on their ratio to the baseline or on their p99. A target is `met` when every
//! line it applies to keeps the bound, `not met` when one does not (the verdict names each such
//! step), and `not measured` when the run had no such line (PostgreSQL + Redis not set, or a
//! concurrency step left out of `--concurrency`).

use serde::Serialize;

use super::Line;

/// What a target bounds.
#[derive(Debug, Clone, Copy)]
enum Bound {
    /// requests/s at least this fraction of the baseline's.
    MinRatio(f64),
    /// p99 latency at most this many milliseconds.
    MaxP99Ms(f64),
}

/// One target: the lines it applies to, and its bound.
#[derive(Debug, Clone, Copy)]
struct Target {
    name: &'static str,
    backend: &'static str,
    /// The concurrency step it applies to; `None`: every step.
    concurrency: Option<usize>,
    bound: Bound,
}

/// Issue 8's targets, as the bench can judge them.
const TARGETS: &[Target] = &[
    Target {
        name: "Verify",
        backend: "embedded",
        concurrency: None,
        bound: Bound::MinRatio(0.85),
    },
    Target {
        name: "Verify",
        backend: "postgres+redis",
        concurrency: None,
        bound: Bound::MinRatio(0.50),
    },
    Target {
        name: "Verify",
        backend: "embedded",
        concurrency: Some(16),
        bound: Bound::MaxP99Ms(1.0),
    },
    Target {
        name: "Verify",
        backend: "embedded",
        concurrency: Some(128),
        bound: Bound::MaxP99Ms(5.0),
    },
    Target {
        name: "Verify",
        backend: "postgres+redis",
        concurrency: Some(16),
        bound: Bound::MaxP99Ms(1.0),
    },
    Target {
        name: "Verify",
        backend: "postgres+redis",
        concurrency: Some(128),
        bound: Bound::MaxP99Ms(5.0),
    },
    Target {
        name: "GET /v1/me",
        backend: "embedded",
        concurrency: None,
        bound: Bound::MinRatio(0.30),
    },
    Target {
        name: "GET /v1/me",
        backend: "postgres+redis",
        concurrency: None,
        bound: Bound::MinRatio(0.15),
    },
    Target {
        name: "GET /v1/me",
        backend: "embedded",
        concurrency: Some(64),
        bound: Bound::MaxP99Ms(10.0),
    },
    Target {
        name: "GET /v1/me",
        backend: "postgres+redis",
        concurrency: Some(64),
        bound: Bound::MaxP99Ms(10.0),
    },
    Target {
        name: "POST /v1/notes",
        backend: "embedded",
        concurrency: None,
        bound: Bound::MinRatio(0.10),
    },
    // The issue names no backend for this one: both are judged.
    Target {
        name: "POST /v1/notes",
        backend: "postgres+redis",
        concurrency: None,
        bound: Bound::MinRatio(0.10),
    },
];

/// How one target fared.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Verdict {
    /// The target in words, e.g. `Verify, embedded: req/s >= 85 % of its baseline`.
    pub(crate) target: String,
    /// `met`, `not met` or `not measured`.
    pub(crate) state: &'static str,
    /// How many lines it applied to.
    pub(crate) steps: usize,
    /// The steps that missed it, with their figure, e.g. `h2, 1 conn c=1: 74 %`.
    pub(crate) missed: Vec<String>,
    /// The worst figure among its lines (a ratio, or p99 in ms).
    pub(crate) worst: Option<f64>,
}

impl Target {
    fn describe(&self) -> String {
        let at = self
            .concurrency
            .map_or_else(String::new, |c| format!(" at {c} in flight"));
        match self.bound {
            Bound::MinRatio(r) => format!(
                "{}, {}: req/s >= {:.0} % of its baseline{at}",
                self.name,
                self.backend,
                r * 100.0
            ),
            Bound::MaxP99Ms(ms) => {
                format!("{}, {}: p99 <= {ms} ms{at}", self.name, self.backend)
            }
        }
    }

    fn applies_to(&self, line: &Line) -> bool {
        line.name == self.name
            && line.backend == self.backend
            && self.concurrency.is_none_or(|c| c == line.concurrency)
            && match self.bound {
                // A line without a baseline has no ratio to judge.
                Bound::MinRatio(_) => line.ratio.is_some(),
                Bound::MaxP99Ms(_) => true,
            }
    }

    /// The line's figure for this target, and whether it keeps the bound.
    fn figure(&self, line: &Line) -> (f64, bool, String) {
        match self.bound {
            Bound::MinRatio(min) => {
                let r = line.ratio.unwrap_or(0.0);
                (r, r >= min, format!("{:.0} %", r * 100.0))
            }
            Bound::MaxP99Ms(max) => (
                line.p99_ms,
                line.p99_ms <= max,
                format!("p99 {:.2} ms", line.p99_ms),
            ),
        }
    }

    fn judge(&self, lines: &[Line]) -> Verdict {
        let mut steps = 0;
        let mut missed = Vec::new();
        let mut worst: Option<f64> = None;
        for line in lines.iter().filter(|l| self.applies_to(l)) {
            steps += 1;
            let (value, kept, shown) = self.figure(line);
            worst = Some(match (worst, self.bound) {
                (None, _) => value,
                (Some(w), Bound::MinRatio(_)) => w.min(value),
                (Some(w), Bound::MaxP99Ms(_)) => w.max(value),
            });
            if !kept {
                missed.push(format!(
                    "{} c={}: {shown}",
                    line.transport, line.concurrency
                ));
            }
        }
        let state = match (steps, missed.is_empty()) {
            (0, _) => "not measured",
            (_, true) => "met",
            (_, false) => "not met",
        };
        Verdict {
            target: self.describe(),
            state,
            steps,
            missed,
            worst,
        }
    }
}

/// Every target, judged on `lines`.
pub(crate) fn judge(lines: &[Line]) -> Vec<Verdict> {
    TARGETS.iter().map(|t| t.judge(lines)).collect()
}

/// The verdicts as lines of text, one per target, then one per missed step.
pub(crate) fn render(verdicts: &[Verdict]) -> String {
    let mut out = String::new();
    for v in verdicts {
        let steps = match v.steps {
            0 => String::new(),
            1 => " (1 step)".to_owned(),
            n => format!(" ({n} steps)"),
        };
        out.push_str(&format!("  {:<12} {}{steps}\n", v.state, v.target));
        for m in &v.missed {
            out.push_str(&format!("  {:<12}   missed at {m}\n", ""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(name: &str, backend: &str, conc: usize, ratio: Option<f64>, p99_ms: f64) -> Line {
        Line {
            name: name.to_owned(),
            backend: backend.to_owned(),
            transport: "h2, 1 conn".to_owned(),
            concurrency: conc,
            requests: 1000,
            errors: 0,
            seconds: 1.0,
            requests_per_second: 1000.0,
            p50_ms: p99_ms / 2.0,
            p99_ms,
            p999_ms: p99_ms * 2.0,
            cpu_us_per_request: 10.0,
            cpu_of: "auth-service".to_owned(),
            baseline: ratio.map(|_| "bare".to_owned()),
            ratio,
            ratio_own_process: None,
        }
    }

    fn verdict<'a>(verdicts: &'a [Verdict], starts: &str) -> &'a Verdict {
        verdicts
            .iter()
            .find(|v| v.target.starts_with(starts))
            .unwrap_or_else(|| panic!("no target starts with {starts:?}"))
    }

    #[test]
    fn a_ratio_target_is_met_only_when_every_step_keeps_it() {
        let lines = [
            line("Verify", "embedded", 16, Some(0.90), 0.5),
            line("Verify", "embedded", 64, Some(0.84), 3.0),
        ];

        let verdicts = judge(&lines);

        let v = verdict(&verdicts, "Verify, embedded: req/s >= 85 %");
        assert_eq!(v.state, "not met");
        assert_eq!(v.steps, 2);
        assert_eq!(v.missed, ["h2, 1 conn c=64: 84 %"]);
        assert_eq!(v.worst, Some(0.84));

        let ok = judge(&[line("Verify", "embedded", 16, Some(0.85), 0.5)]);
        assert_eq!(verdict(&ok, "Verify, embedded: req/s >= 85 %").state, "met");
    }

    #[test]
    fn a_p99_target_looks_only_at_its_own_step_and_backend() {
        let lines = [
            // Over the 1 ms bound, but at 64 in flight and on the other backend.
            line("Verify", "embedded", 64, Some(1.0), 4.0),
            line("Verify", "postgres+redis", 16, Some(1.0), 2.0),
            line("Verify", "embedded", 16, Some(1.0), 0.9),
        ];

        let verdicts = judge(&lines);

        let v = verdict(&verdicts, "Verify, embedded: p99 <= 1 ms at 16");
        assert_eq!((v.state, v.steps), ("met", 1));
        let pg = verdict(&verdicts, "Verify, postgres+redis: p99 <= 1 ms at 16");
        assert_eq!(pg.state, "not met");
        assert_eq!(pg.missed, ["h2, 1 conn c=16: p99 2.00 ms"]);
    }

    #[test]
    fn a_target_without_lines_or_baselines_is_not_measured() {
        // A line without a baseline cannot be judged on a ratio.
        let lines = [line("GET /v1/me", "embedded", 16, None, 1.0)];

        let verdicts = judge(&lines);

        let v = verdict(&verdicts, "GET /v1/me, embedded: req/s >= 30 %");
        assert_eq!((v.state, v.steps, v.worst), ("not measured", 0, None));
        let pg = verdict(&verdicts, "Verify, postgres+redis: req/s");
        assert_eq!(pg.state, "not measured");
        assert!(render(&verdicts).contains("not measured"));
    }
}
