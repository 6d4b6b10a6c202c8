//! The services' logs: JSON lines, one per event, filtered by `RUST_LOG` (default `info`),
//! and the few lines a service writes to stderr before it can log.
//!
//! A line logged while a gRPC call of auth-service is served carries the call under
//! `"span"`: `{"method":…,"request_id":…,"name":"grpc"}`, the shape tracing-subscriber gives
//! a span of that name. It is not a tracing span, though: the call is held in a task-local
//! ([`in_call`]) and spliced into the line when a line is written ([`CallEvents`]). A span
//! per call cost its fields' formatting, the registry's slot and the extensions map whether
//! or not a line was ever written in it: 4.7k of auth-service's 73.8k instructions per
//! `Verify` (callgrind, h2load at 16 streams), where the task-local costs a swap per poll.
//! Inside a call, no span's fields are written (a library's own, h2's or hyper's at `debug`,
//! nor one of ours): the call is the line's `"span"`. Outside one, the current span is,
//! fields by [`JsonSpanFields`]; a thread that works for a call without its task-local
//! (sqlx's SQLite worker) gets the call as a real span, [`call_span`].

use std::fmt::{self, Write as _};
use std::future::Future;
use std::sync::LazyLock;

use tokio::task::futures::TaskLocalFuture;
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::field::{RecordFields, Visit};
use tracing_subscriber::fmt::format::{self, Format, Json, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber writing to `sink`; a second call does nothing. The sink is
/// a parameter so that tests can silence or capture it.
pub fn init<W>(sink: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let (filter, unreadable) = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let _already_set = tracing::subscriber::set_global_default(subscriber(sink, filter));
    if unreadable {
        tracing::warn!(
            default = DEFAULT_LOG_FILTER,
            "RUST_LOG is not a log filter; using the default"
        );
    }
}

/// The log filter when `RUST_LOG` is unset (or unreadable): the services' own lines from
/// `info`, those of sqlx, h2, hyper and tower from `warn`.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,h2=warn,hyper=warn,tower=warn";

/// The filter `RUST_LOG`'s value asks for, and whether that value had to be set aside as
/// unreadable (the default then applies, and [`init`] says so once it can log). An empty
/// value, or one of only whitespace, counts as unset, as for every other setting: the
/// default applies, without a warning (`EnvFilter` would read it as "log nothing").
fn log_filter(value: Option<&str>) -> (EnvFilter, bool) {
    match value
        .filter(|v| !v.trim().is_empty())
        .map(EnvFilter::try_new)
    {
        Some(Ok(filter)) => (filter, false),
        Some(Err(_)) => (EnvFilter::new(DEFAULT_LOG_FILTER), true),
        None => (EnvFilter::new(DEFAULT_LOG_FILTER), false),
    }
}

/// The subscriber [`init`] installs.
fn subscriber<W>(sink: W, filter: EnvFilter) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        // JSON has no place for colour codes, whatever the terminal.
        .with_ansi(false)
        .fmt_fields(JsonSpanFields)
        .with_env_filter(filter)
        .with_writer(sink)
        // A log line that cannot be written (stdout a pipe whose reader is gone) is lost,
        // never reported with `eprintln!`, which panics when stderr is gone too: the panic
        // took down whichever task logged, the shutdown one included, and the process then
        // never stopped on SIGTERM. (Kept by `event_format`, which comes after it.)
        .log_internal_errors(false)
        .event_format(CallEvents::default())
        .finish()
}

/// Writes `message` and a newline to stderr, for whoever started the process, when it can: a
/// closed stderr loses the line instead of panicking as `eprintln!` does.
pub fn to_stderr(message: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _lost_if_closed = writeln!(std::io::stderr(), "{message}");
}

tokio::task_local! {
    static CALL: Call;
}

/// The call a task is serving, written with every line logged while it is ([`in_call`]).
#[derive(Debug, Clone)]
pub struct Call {
    method: String,
    request_id: String,
}

impl Call {
    /// `method` is the gRPC path (`/wxauth.v1.AuthService/Verify`), `request_id` the call's.
    pub fn new(method: &str, request_id: &str) -> Self {
        Self {
            method: method.to_owned(),
            request_id: request_id.to_owned(),
        }
    }
}

/// Runs `work` as part of `call`: every line it logs, on its task, carries the call. An inner
/// `in_call` (one item of a batch) stands for the outer one while its work runs.
pub fn in_call<F: Future>(call: Call, work: F) -> TaskLocalFuture<Call, F> {
    CALL.scope(call, work)
}

/// The tasks [`to_completion`] started, so that a stopping process waits for them
/// ([`detached_finished`]) instead of dropping them with its runtime.
static DETACHED: LazyLock<tokio_util::task::TaskTracker> =
    LazyLock::new(tokio_util::task::TaskTracker::new);

/// Runs `work` on a task of its own, as part of the current task's call, to its end even if
/// the caller stops waiting: a server drops a call's future when the client gives up (an
/// HTTP/2 stream reset at the client's deadline), and work whose steps must all happen once
/// one has (an end committed, then its mark in the shared cache; a code spent at WeChat,
/// then remembered as used) must not stop between them. `None` if the task panicked or the
/// runtime is shutting down. A stopping process waits for such work within its shutdown
/// grace ([`detached_finished`]).
pub async fn to_completion<T, F>(work: F) -> Option<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let task = match CALL.try_with(Call::clone) {
        Ok(call) => DETACHED.spawn(in_call(call, work)),
        Err(_not_in_a_call) => DETACHED.spawn(work),
    };
    task.await.ok()
}

/// Runs `work` on a task of its own that no caller waits for (a retry in the background),
/// among the work a stopping process waits for ([`detached_finished`]).
pub fn spawn_detached<F>(work: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    drop(DETACHED.spawn(work));
}

/// Waits until `deadline` for the work [`to_completion`] and [`spawn_detached`] started to
/// end, the work whose caller went away among it (the server no longer waits for that); true
/// when none is left. For a stopping process, after its server has stopped.
pub async fn detached_finished(deadline: tokio::time::Instant) -> bool {
    DETACHED.close();
    tokio::time::timeout_at(deadline, DETACHED.wait())
        .await
        .is_ok()
}

/// A tracing span of the task's call (`grpc`, with its method and request id), for work that
/// leaves the task for a thread of its own and takes the current span along (sqlx runs
/// SQLite's statements so, and logs there); `Span::none()` outside a call. It costs what a
/// span costs, so it goes around such work only, not around every call.
pub fn call_span() -> tracing::Span {
    CALL.try_with(|call| {
        tracing::info_span!(
            "grpc",
            method = call.method.as_str(),
            request_id = call.request_id.as_str()
        )
    })
    .unwrap_or_else(|_not_in_a_call| tracing::Span::none())
}

/// The event format: tracing-subscriber's JSON line, with the task's [`Call`] as its
/// `"span"` when there is one.
#[derive(Debug)]
pub struct CallEvents {
    /// Outside a call: the current span, if any, as `"span"`.
    spans: Format<Json>,
    /// Inside one: no span of its own, the call is appended.
    bare: Format<Json>,
}

impl Default for CallEvents {
    fn default() -> Self {
        let json = format::format().json().with_span_list(false);
        Self {
            spans: json.clone().with_current_span(true),
            bare: json.with_current_span(false),
        }
    }
}

impl<S, N> FormatEvent<S, N> for CallEvents
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let in_call = CALL.try_with(|call| {
            let mut line = String::with_capacity(256);
            self.bare.format_event(ctx, Writer::new(&mut line), event)?;
            // The line is one JSON object and a newline: the call goes in before its `}`.
            let Some(open) = line.trim_end().strip_suffix('}') else {
                return writer.write_str(&line);
            };
            writer.write_str(open)?;
            let mut object = JsonObject {
                out: &mut String::with_capacity(128),
                empty: true,
                result: Ok(()),
            };
            object.string("method", |out| out.write_str(&call.method));
            object.string("request_id", |out| out.write_str(&call.request_id));
            object.string("name", |out| out.write_str("grpc"));
            object.result?;
            let separator = if open.ends_with('{') { "" } else { "," };
            writeln!(writer, "{separator}\"span\":{{{}}}}}", object.out)
        });
        match in_call {
            Ok(written) => written,
            Err(_not_in_a_call) => self.spans.format_event(ctx, writer, event),
        }
    }
}

/// A span's fields as one JSON object (`{"name":value,...}`), written as they are visited:
/// strings and `Debug`/`Display` values escaped on the way, numbers and booleans as they are.
/// What the JSON event format reads back for an event's `"span"`. Fields recorded later
/// (`Span::record`) are appended to the object; a field recorded twice then appears twice,
/// and the later value is the one a JSON reader keeps, as with `JsonFields`.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonSpanFields;

impl<'writer> FormatFields<'writer> for JsonSpanFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        // Built here, then copied once: the span's own buffer starts empty and would otherwise
        // grow (and move) several times on the way to a request id and a method.
        let mut text = String::with_capacity(128);
        text.push('{');
        let mut object = JsonObject {
            out: &mut text,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut object);
        object.result?;
        text.push('}');
        writer.write_str(&text)
    }

    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        if current.fields.pop() != Some('}') {
            // Nothing formatted yet (or not by us): start the object afresh.
            current.fields.clear();
            return self.format_fields(current.as_writer(), fields);
        }
        let empty = current.fields.ends_with('{');
        let mut object = JsonObject {
            out: &mut current.fields,
            empty,
            result: Ok(()),
        };
        fields.record(&mut object);
        let result = object.result;
        current.fields.push('}');
        result
    }
}

/// The visitor behind [`JsonSpanFields`]: writes `"name":value` pairs, comma-separated.
struct JsonObject<'a> {
    out: &'a mut String,
    empty: bool,
    result: fmt::Result,
}

impl JsonObject<'_> {
    /// Writes the separator and the key; the caller writes the value.
    fn key(&mut self, name: &str) -> fmt::Result {
        if !self.empty {
            self.out.write_char(',')?;
        }
        self.empty = false;
        // `r#type` and the like are written without their raw prefix, as `JsonFields` does.
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.out.write_char('"')?;
        Escaped(&mut *self.out).write_str(name)?;
        self.out.write_str("\":")
    }

    fn raw(&mut self, name: &str, value: fmt::Arguments<'_>) {
        if self.result.is_ok() {
            self.result = self.key(name).and_then(|()| self.out.write_fmt(value));
        }
    }

    /// Writes a string value: `write` puts its contents through the escaper.
    fn string(&mut self, name: &str, write: impl FnOnce(&mut Escaped<'_, String>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(name).and_then(|()| {
                self.out.write_char('"')?;
                write(&mut Escaped(&mut *self.out))?;
                self.out.write_char('"')
            });
        }
    }
}

impl Visit for JsonObject<'_> {
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        if value.is_finite() {
            self.raw(field.name(), format_args!("{value}"));
        } else {
            // JSON has no NaN or infinity; serde_json writes null for them too.
            self.raw(field.name(), format_args!("null"));
        }
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.raw(field.name(), format_args!("{value}"));
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.raw(field.name(), format_args!("{value}"));
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.raw(field.name(), format_args!("{value}"));
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        // Straight through the escaper, without `fmt`'s machinery for a value that is
        // already a string.
        self.string(field.name(), |out| out.write_str(value));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn fmt::Debug) {
        self.string(field.name(), |out| write!(out, "{value:?}"));
    }
}

/// Escapes what is written through it as the inside of a JSON string (RFC 8259, section 7):
/// `"` and `\` get a backslash, control characters their short or `\u00XX` form.
struct Escaped<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaped<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Byte by byte: whatever needs escaping is ASCII, so each split is at a char boundary
        // (measured: walking chars instead cost about 1,200 instructions per request id).
        let mut plain = 0;
        for (i, &b) in s.as_bytes().iter().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..=0x1f => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escape.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escape)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn an_unreadable_rust_log_falls_back_to_the_default_and_says_so() {
        let (filter, unreadable) = log_filter(Some("info,auth_service=debug"));
        assert!(!unreadable);
        assert_eq!(filter.to_string(), "auth_service=debug,info");
        let (filter, unreadable) = log_filter(None);
        assert!(!unreadable);
        assert_eq!(
            filter.to_string(),
            EnvFilter::new(DEFAULT_LOG_FILTER).to_string()
        );
        for bad in ["info,sqlx=loud", "=", "[{"] {
            let (filter, unreadable) = log_filter(Some(bad));
            assert!(unreadable, "{bad}");
            assert_eq!(
                filter.to_string(),
                EnvFilter::new(DEFAULT_LOG_FILTER).to_string()
            );
        }
    }

    #[test]
    fn an_empty_rust_log_counts_as_unset() {
        // Arrange
        let default = EnvFilter::new(DEFAULT_LOG_FILTER);
        for empty in ["", " ", "\t\n "] {
            // Act
            let (filter, unreadable) = log_filter(Some(empty));

            // Assert
            assert!(!unreadable, "{empty:?}");
            assert_eq!(filter.to_string(), default.to_string(), "{empty:?}");
            assert_eq!(
                filter.max_level_hint(),
                Some(tracing::level_filters::LevelFilter::INFO),
                "{empty:?}"
            );
        }
    }

    use std::sync::{Arc, Mutex, PoisonError};

    use serde_json::{Value, json};

    use super::*;

    /// A sink that keeps every byte written to it.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn lines(&self) -> Vec<Value> {
            let bytes = self
                .0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            String::from_utf8(bytes)
                .expect("utf-8")
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect()
        }
    }

    #[derive(Debug)]
    #[allow(dead_code)] // read through Debug only
    struct Thing {
        name: &'static str,
    }

    /// Logs, inside spans, every kind of field value, and the same after `Span::record`.
    fn log_the_cases() {
        let id = "req-1 \"quoted\" back\\slash\nnewline\ttab\u{1}ctl 小明 \u{1F600}";
        let span = tracing::info_span!(
            "grpc",
            request_id = %id,
            id_as_str = id,
            method = "/wxauth.v1.AuthService/Verify",
            n = -7i64,
            big = u64::MAX,
            ok = true,
            ratio = 0.25f64,
            nan = f64::NAN,
            thing = ?Thing { name: "a\"b" },
            r#type = "raw",
            late = tracing::field::Empty,
        );
        span.in_scope(|| tracing::info!(answer = 42, "inside"));
        span.record("late", 5u64);
        span.in_scope(|| tracing::info!("after record"));
        let bare = tracing::info_span!("bare", later = tracing::field::Empty);
        bare.in_scope(|| tracing::info!("no fields yet"));
        bare.record("later", "now");
        bare.in_scope(|| tracing::info!("one field"));
    }

    #[test]
    fn span_fields_are_valid_json_and_the_same_as_tracing_subscribers_own() {
        let ours = Captured::default();
        let sink = ours.clone();
        tracing::subscriber::with_default(
            subscriber(move || sink.clone(), EnvFilter::new("info")),
            log_the_cases,
        );
        let reference = Captured::default();
        let sink = reference.clone();
        let theirs = tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(EnvFilter::new("info"))
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(theirs, log_the_cases);

        let (ours, theirs) = (ours.lines(), reference.lines());
        assert_eq!(ours.len(), 4);
        assert_eq!(theirs.len(), 4);
        for (a, b) in ours.iter().zip(&theirs) {
            assert_eq!(a["span"], b["span"]);
            assert_eq!(a["fields"], b["fields"]);
        }
        let span = &ours[0]["span"];
        assert_eq!(
            span["request_id"],
            "req-1 \"quoted\" back\\slash\nnewline\ttab\u{1}ctl 小明 \u{1F600}"
        );
        assert_eq!(span["n"], -7);
        assert_eq!(span["big"], json!(u64::MAX));
        assert_eq!(span["ok"], true);
        assert_eq!(span["ratio"], 0.25);
        assert_eq!(span["nan"], Value::Null);
        assert_eq!(span["thing"], "Thing { name: \"a\\\"b\" }");
        assert_eq!(span["type"], "raw");
        assert_eq!(span["name"], "grpc");
        assert_eq!(span.get("late"), None);
        assert_eq!(ours[1]["span"]["late"], 5);
        assert_eq!(ours[1]["span"]["request_id"], span["request_id"]);
        assert_eq!(ours[2]["span"], json!({"name": "bare"}));
        assert_eq!(ours[3]["span"], json!({"name": "bare", "later": "now"}));
    }

    #[tokio::test]
    async fn a_line_logged_in_a_call_carries_the_call_as_its_span() {
        let out = Captured::default();
        let sink = out.clone();
        let _default = tracing::subscriber::set_default(subscriber(
            move || sink.clone(),
            EnvFilter::new("info"),
        ));

        tracing::info!("before");
        let method = "/wxauth.v1.AuthService/Verify";
        let outer = in_call(Call::new(method, "outer-1"), async {
            tracing::info!(n = 1, "in the outer call");
            tokio::task::yield_now().await;
            let odd = Call::new("/x", "in\"ner\\2\n");
            in_call(odd, async {
                // A span of its own inside a call: the call is what the line carries.
                let span = tracing::info_span!("grpc", request_id = "from-a-span");
                span.in_scope(|| tracing::warn!("in the inner call"));
            })
            .await;
            tracing::info!("back in the outer call");
        });
        outer.await;
        tracing::info!("after");

        let lines = out.lines();
        assert_eq!(lines.len(), 5);
        let outer_span = json!({"method": method, "request_id": "outer-1", "name": "grpc"});
        assert_eq!(lines[0].get("span"), None);
        assert_eq!(lines[1]["span"], outer_span);
        assert_eq!(
            lines[1]["fields"],
            json!({"message": "in the outer call", "n": 1})
        );
        assert_eq!(lines[1]["level"], "INFO");
        assert!(lines[1]["timestamp"].is_string());
        assert_eq!(lines[1]["target"], lines[0]["target"]);
        assert_eq!(
            lines[2]["span"],
            json!({"method": "/x", "request_id": "in\"ner\\2\n", "name": "grpc"})
        );
        assert_eq!(lines[2]["level"], "WARN");
        assert_eq!(lines[3]["span"], outer_span);
        assert_eq!(lines[4].get("span"), None);
        // One `"span"` key per line, never the call's and a span's both.
        let text = String::from_utf8(out.0.lock().unwrap_or_else(PoisonError::into_inner).clone())
            .expect("utf-8");
        for line in text.lines() {
            assert!(line.matches("\"span\"").count() <= 1, "{line}");
        }
    }

    #[tokio::test]
    async fn a_thread_working_for_a_call_carries_it_through_the_call_span() {
        let out = Captured::default();
        let sink = out.clone();
        let _default = tracing::subscriber::set_default(subscriber(
            move || sink.clone(),
            EnvFilter::new("info"),
        ));
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        let method = "/wxauth.v1.AuthService/Login";
        // As sqlx's SQLite worker does: the span current on the task goes to its thread.
        let span = in_call(Call::new(method, "req-7"), async { call_span() }).await;
        std::thread::spawn(move || {
            tracing::dispatcher::with_default(&dispatch, || {
                span.in_scope(|| tracing::warn!("slow statement"));
            });
        })
        .join()
        .expect("the thread ran");
        assert!(call_span().is_none(), "a span outside any call");

        let lines = out.lines();
        assert_eq!(lines.len(), 1);
        assert_eq!(
            lines[0]["span"],
            json!({"method": method, "request_id": "req-7", "name": "grpc"})
        );
    }

    #[test]
    fn escaping_follows_json() {
        let mut out = String::new();
        Escaped(&mut out)
            .write_str("a\"b\\c\u{0}\u{1f}\r\n\té")
            .expect("written");
        assert_eq!(out, r#"a\"b\\c\u0000\u001f\r\n\té"#);
        let parsed: String = serde_json::from_str(&format!("\"{out}\"")).expect("a JSON string");
        assert_eq!(parsed, "a\"b\\c\u{0}\u{1f}\r\n\té");
    }

    #[tokio::test]
    async fn work_run_to_completion_ends_in_its_call_though_the_caller_stopped_waiting() {
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let (finished, done) = tokio::sync::oneshot::channel();
        let work = async move {
            let _ = wait.await;
            let request_id = CALL.try_with(|call| call.request_id.clone()).ok();
            let _ = finished.send(request_id);
        };
        let caller = tokio::spawn(in_call(
            Call::new("/wxauth.v1.AuthService/Logout", "req-1"),
            to_completion(work),
        ));
        tokio::task::yield_now().await;

        // Act: the server drops the call's future (the client reset its stream).
        caller.abort();
        assert!(caller.await.is_err_and(|e| e.is_cancelled()));
        go.send(()).expect("the work still waits");

        // Assert: the work went on to its end, as part of its call.
        assert_eq!(done.await.ok(), Some(Some("req-1".to_owned())));
    }

    #[tokio::test]
    async fn to_completion_answers_what_the_work_did() {
        assert_eq!(to_completion(async { 7 }).await, Some(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_process_waits_for_work_whose_caller_went_away() {
        // A caller that gives up after 1 s on work that takes 5 s.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let marks = done.clone();
        let gave_up = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            to_completion(async move {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                marks.store(true, std::sync::atomic::Ordering::SeqCst);
            }),
        )
        .await;
        assert!(gave_up.is_err());

        let start = tokio::time::Instant::now();
        assert!(!detached_finished(start + std::time::Duration::from_secs(1)).await);
        assert!(detached_finished(start + std::time::Duration::from_secs(10)).await);
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
    }
}
