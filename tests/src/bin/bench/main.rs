//! `bench`: how fast the pair is, next to a bare tonic server and a bare axum server measured
//! in the same run, on the same machine, with the same load generator.
//!
//! ```text
//! cargo run --release -p tests --bin bench [-- --seconds N] [--concurrency 1,16,64,128,256]
//!                                             [--sessions N] [--service-workers N] [--rounds N]
//! ```
//! It starts the real binaries (simulator, auth-service, api-service) on embedded defaults, and
//! again on PostgreSQL + Redis when `WXAUTH_TEST_PG_URL` and `WXAUTH_TEST_REDIS_URL` are set.
//! The load generator is its own: tokio tasks, a fixed number of workers for a fixed time per
//! step, latency into an hdrhistogram. It shares the cores with the servers, and each service
//! runs `--service-workers` tokio workers (1 by default: three busy processes on a machine's
//! few cores did better with one each than with one per core each). Each bare server runs
//! twice: in this process (`baseline`, the issue's ratio) and alone in a process of its own
//! with the services' runtime rule (`bench --serve`, `baseline-proc`, the `vs proc` column).
//! The lines compared are measured as a group, interleaved: each line's `--seconds` cut into
//! `--rounds` slices, the group's slices taken in turn, so that the machine's drift falls on
//! the baselines and the services alike ([`measure`]). The table it
//! prints is also written as JSON to `target/bench/latest.json`, with issue 8's targets judged
//! on the run's own lines (`targets.rs`). It fails (exit 1) on any error answer or when a
//! revoked token is not refused on the very next call; a missed target is reported, not fatal.

// A command-line tool: printing its table is its job.
#![allow(clippy::print_stdout)]

mod targets;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use http::{Method, Request, StatusCode};
use hyper::body::Body as _;
use proto::v1::auth_service_client::AuthServiceClient;
use proto::v1::{LoginRequest, LogoutRequest, VerifyRequest};
use serde::Serialize;
use serde_json::json;
use tests::harness::external::{self, External};
use tests::harness::{ApiProcess, AuthProcess, SimProcess};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tonic_types::StatusExt as _;

/// Logins per client IP the bench's auth-service allows: the bench logs in from one address.
const LOGIN_RATE: &str = "1000000/min";
/// Logins (and code mints) in flight while filling sessions.
const FILL_PARALLEL: usize = 64;
/// Concurrency of the Login step.
const WRITE_CONCURRENCY: usize = 16;
/// Notes the `GET /v1/notes?limit=20` user has.
const NOTES: usize = 25;
/// UNAVAILABLE answers to Login one filling task tolerates (each retried with a new code).
const MAX_FILL_RETRIES: u64 = 20;

#[derive(Debug, Clone)]
struct Args {
    seconds: u64,
    concurrency: Vec<usize>,
    sessions: usize,
    /// Tokio worker threads of each service (`AUTH_WORKER_THREADS`, `API_WORKER_THREADS`).
    service_workers: usize,
    /// Slices each step is cut into, interleaved with the slices of its baselines.
    rounds: u32,
    /// api-service's connections to auth-service (`API_AUTH_CONNECTIONS`); `None`: its
    /// default.
    edge_connections: Option<usize>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        seconds: 2,
        // 128: the step of the issue's second p99 target for Verify.
        concurrency: vec![1, 16, 64, 128, 256],
        sessions: 100_000,
        service_workers: 1,
        rounds: 4,
        edge_connections: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--seconds" => args.seconds = value("--seconds")?.parse()?,
            "--sessions" => args.sessions = value("--sessions")?.parse()?,
            "--rounds" => args.rounds = value("--rounds")?.parse()?,
            "--service-workers" => {
                args.service_workers = value("--service-workers")?.parse()?;
            }
            "--edge-connections" => {
                args.edge_connections = Some(value("--edge-connections")?.parse()?);
            }
            "--concurrency" => {
                args.concurrency = value("--concurrency")?
                    .split(',')
                    .map(|c| c.trim().parse::<usize>())
                    .collect::<Result<_, _>>()?;
            }
            "-h" | "--help" => {
                println!(
                    "bench [--seconds N (2)] [--concurrency 1,16,64,128,256] [--sessions N (100000)] \
                     [--service-workers N (1)] [--rounds N (4)] \
                     [--edge-connections N (api-service's default)]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if args.seconds == 0
        || args.service_workers == 0
        || args.rounds == 0
        || args.concurrency.contains(&0)
    {
        bail!("--seconds, --service-workers, --rounds and every --concurrency must be at least 1");
    }
    Ok(args)
}

/// The allocator the services use (their `main.rs`), so that the in-process baselines are
/// measured on the same footing.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // No subscriber would not be free: sqlx turns on tracing's `log` feature in this build,
    // and with no subscriber set every span of hyper, h2 and tonic (the baselines' and the
    // load generator's) is handed to `log` instead, about 5,500 instructions a bare gRPC call
    // (callgrind), which the services, whose subscriber drops those spans, never pay. The bare
    // floor is a subscriber that takes nothing.
    let _already_set =
        tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::new());
    // `bench --serve echo|hello WORKERS`: one bare baseline server in a process of its own
    // (started by the bench itself), on a runtime of WORKERS threads like the services'.
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let outcome = match argv.as_slice() {
        [flag, what, workers] if flag == "--serve" => serve_alone(what, workers),
        _ => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the tokio runtime")
            .and_then(|rt| rt.block_on(run())),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The body of `--serve`: starts the bare server, prints `listening <addr>` on stdout, and
/// serves until its standard input closes (the bench holds it open, and kills the process
/// when done).
fn serve_alone(what: &str, workers: &str) -> anyhow::Result<()> {
    let workers: usize = workers
        .parse()
        .context("--serve: WORKERS is not a number")?;
    // The services' own runtime rule, so that the layout is theirs (one worker: the
    // current-thread scheduler).
    let rt = shared::runtime::build(std::num::NonZeroUsize::new(workers))
        .context("cannot start the tokio runtime")?;
    rt.block_on(async {
        let addr = match what {
            "echo" => start_echo().await?,
            "hello" => start_hello().await?,
            other => bail!("--serve: unknown server {other:?} (echo or hello)"),
        };
        println!("listening {addr}");
        std::io::Write::flush(&mut std::io::stdout())?;
        // Ends the process once the bench's end of the pipe is gone, however the bench ended.
        std::thread::spawn(|| {
            let mut sink = [0u8; 64];
            while std::io::Read::read(&mut std::io::stdin(), &mut sink).is_ok_and(|n| n > 0) {}
            std::process::exit(0);
        });
        std::future::pending::<anyhow::Result<()>>().await
    })
}

/// A bare baseline server in a process of its own (`bench --serve`), stopped when dropped.
struct OwnProcess {
    child: tokio::process::Child,
    /// Held open: the server ends when it closes.
    _stdin: tokio::process::ChildStdin,
    addr: SocketAddr,
}

impl OwnProcess {
    /// Starts `bench --serve what workers` and waits for its address.
    async fn start(what: &str, workers: usize) -> anyhow::Result<Self> {
        use tokio::io::AsyncBufReadExt as _;
        let exe = std::env::current_exe().context("cannot find the bench's own executable")?;
        let mut child = tokio::process::Command::new(exe)
            .args(["--serve", what, &workers.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start the bare {what} server"))?;
        let stdin = child.stdin.take().context("no stdin pipe")?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let mut first = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            tokio::io::BufReader::new(stdout).read_line(&mut first),
        )
        .await
        .with_context(|| format!("the bare {what} server did not start in 10 s"))??;
        let addr = first
            .trim()
            .strip_prefix("listening ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("the bare {what} server said {first:?}"))?;
        Ok(Self {
            child,
            _stdin: stdin,
            addr,
        })
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("the bare server has exited")
    }
}

// ---------------------------------------------------------------------------------------------
// The load generator.

/// What one call answered.
enum Outcome {
    Ok,
    Error,
    /// Nothing left to do (the Login step runs out of codes): the worker stops.
    Done,
}

/// One worker's connection and what it sends.
trait Worker: Send + 'static {
    fn call(&mut self) -> impl Future<Output = Outcome> + Send;
}

/// What one step (or one slice of it) measured, before CPU is added.
struct Measured {
    requests: u64,
    errors: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
}

/// Nanoseconds, 1 ns to 60 s, 3 significant digits.
fn latencies() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000_000, 3)?)
}

impl Measured {
    fn nothing() -> anyhow::Result<Self> {
        Ok(Self {
            requests: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            hist: latencies()?,
        })
    }

    /// Adds the figures of another slice of the same step.
    fn add(&mut self, slice: &Self) -> anyhow::Result<()> {
        self.requests += slice.requests;
        self.errors += slice.errors;
        self.elapsed += slice.elapsed;
        self.hist.add(&slice.hist)?;
        Ok(())
    }
}

/// Runs `workers` concurrently for `time` (or until they are done), then gives them back
/// for the step's next slice.
async fn drive<W: Worker>(workers: Vec<W>, time: Duration) -> anyhow::Result<(Vec<W>, Measured)> {
    let start = Instant::now();
    let deadline = start + time;
    let mut tasks = tokio::task::JoinSet::new();
    for mut worker in workers {
        tasks.spawn(async move {
            let mut hist = latencies()?;
            let (mut requests, mut errors) = (0u64, 0u64);
            while Instant::now() < deadline {
                let t = Instant::now();
                let outcome = worker.call().await;
                let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
                match outcome {
                    Outcome::Done => break,
                    Outcome::Ok => {}
                    Outcome::Error => errors += 1,
                }
                requests += 1;
                hist.saturating_record(ns.max(1));
            }
            anyhow::Ok((worker, hist, requests, errors))
        });
    }
    let mut hist = latencies()?;
    let (mut requests, mut errors) = (0, 0);
    let mut back = Vec::with_capacity(tasks.len());
    while let Some(done) = tasks.join_next().await {
        let (w, h, r, e) = done??;
        back.push(w);
        hist.add(h)?;
        requests += r;
        errors += e;
    }
    let measured = Measured {
        requests,
        errors,
        elapsed: start.elapsed(),
        hist,
    };
    Ok((back, measured))
}

/// A step's workers, run one slice of time after another.
trait Slices: Send {
    fn run(
        &mut self,
        time: Duration,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<Measured>> + Send + '_>>;
}

struct Workers<W>(Vec<W>);

impl<W: Worker> Slices for Workers<W> {
    fn run(
        &mut self,
        time: Duration,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<Measured>> + Send + '_>> {
        Box::pin(async move {
            let (workers, measured) = drive(std::mem::take(&mut self.0), time).await?;
            self.0 = workers;
            Ok(measured)
        })
    }
}

/// What a line is, before it is measured.
struct Head {
    name: String,
    backend: String,
    transport: String,
    /// Whose CPU is counted (`None`: this process).
    pids: Vec<Option<u32>>,
    cpu_label: &'static str,
}

/// One line to measure: what it is, and its connected workers.
struct Contender {
    head: Head,
    concurrency: usize,
    workers: Box<dyn Slices>,
}

impl Contender {
    fn new<W: Worker>(head: Head, workers: Vec<W>) -> Self {
        Self {
            head,
            concurrency: workers.len(),
            workers: Box::new(Workers(workers)),
        }
    }
}

/// A bare tonic unary call: the standard health service's Check.
struct EchoWorker(HealthClient<Channel>);

impl Worker for EchoWorker {
    async fn call(&mut self) -> Outcome {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        match self.0.check(request).await {
            Ok(_) => Outcome::Ok,
            Err(_) => Outcome::Error,
        }
    }
}

/// auth-service's Verify of one live token.
struct VerifyWorker {
    client: AuthServiceClient<Channel>,
    token: String,
}

impl Worker for VerifyWorker {
    async fn call(&mut self) -> Outcome {
        let request = VerifyRequest {
            access_token: self.token.clone(),
            include_phone: false,
        };
        match self.client.verify(request).await {
            Ok(_) => Outcome::Ok,
            Err(_) => Outcome::Error,
        }
    }
}

/// auth-service's Login, one minted code per call.
struct LoginWorker {
    client: AuthServiceClient<Channel>,
    codes: Arc<Mutex<Vec<String>>>,
}

impl Worker for LoginWorker {
    async fn call(&mut self) -> Outcome {
        let code = match self.codes.lock() {
            Ok(mut codes) => codes.pop(),
            Err(_) => None,
        };
        let Some(code) = code else {
            return Outcome::Done;
        };
        match self.client.login(login_request(code)).await {
            Ok(_) => Outcome::Ok,
            Err(_) => Outcome::Error,
        }
    }
}

/// One HTTP/1.1 keep-alive connection, one request shape.
struct HttpWorker {
    addr: SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<String>,
    method: Method,
    path: &'static str,
    token: Option<String>,
    body: Option<String>,
    expect: StatusCode,
    /// Each request with an `Idempotency-Key` of its own ([`KEYS`]).
    keyed: bool,
}

/// The `Idempotency-Key`s sent so far: each request that carries one sends a new one, so
/// that each makes a note (a key sent again would replay its first answer).
static KEYS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl HttpWorker {
    async fn connect(
        addr: SocketAddr,
        method: Method,
        path: &'static str,
        token: Option<String>,
        body: Option<String>,
        expect: StatusCode,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            sender: http1_connect(addr).await?,
            addr,
            method,
            path,
            token,
            body,
            expect,
            keyed: false,
        })
    }

    async fn send(&mut self) -> anyhow::Result<StatusCode> {
        if self.sender.is_closed() {
            self.sender = http1_connect(self.addr).await?;
        }
        let mut request = Request::builder()
            .method(self.method.clone())
            .uri(self.path)
            .header(http::header::HOST, self.addr.to_string());
        if let Some(token) = &self.token {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if self.body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        if self.keyed {
            let key = KEYS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            request = request.header("idempotency-key", format!("bench-{key}"));
        }
        let request = request.body(self.body.clone().unwrap_or_default())?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let mut body = response.into_body();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            frame?;
        }
        Ok(status)
    }
}

impl Worker for HttpWorker {
    async fn call(&mut self) -> Outcome {
        match self.send().await {
            Ok(status) if status == self.expect => Outcome::Ok,
            _ => Outcome::Error,
        }
    }
}

async fn http1_connect(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<String>> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // The connection ends when its sender is dropped; an error is counted by the caller.
        let _ = connection.await;
    });
    Ok(sender)
}

// ---------------------------------------------------------------------------------------------
// CPU and memory of processes, from /proc.

/// `utime + stime` of `pid` (or of this process), in seconds.
fn cpu_seconds(pid: Option<u32>) -> anyhow::Result<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name may hold spaces: the fields start after its closing parenthesis.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("unexpected {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i - 3)
            .with_context(|| format!("short {path}"))?
            .parse()?)
    };
    let total = ticks(14)? + ticks(15)?;
    #[allow(clippy::cast_precision_loss, reason = "tick counts are far below 2^52")]
    Ok(total as f64 / rustix::param::clock_ticks_per_second() as f64)
}

fn cpu_of(pids: &[Option<u32>]) -> anyhow::Result<f64> {
    pids.iter().map(|pid| cpu_seconds(*pid)).sum()
}

/// VmRSS of `pid`, in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))?;
    Ok(kib / 1024.0)
}

// ---------------------------------------------------------------------------------------------
// Results.

#[derive(Debug, Clone, Serialize)]
struct Line {
    /// What was called, e.g. `Verify`, `GET /v1/me`, `bare tonic Health/Check`.
    name: String,
    /// `baseline`, `embedded` (SQLite, in-memory) or `postgres+redis`.
    backend: String,
    /// `grpc 1 conn`, `grpc 4 conns`, `http/1.1 1 conn/worker`.
    transport: String,
    concurrency: usize,
    requests: u64,
    errors: u64,
    seconds: f64,
    requests_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// Server CPU time (user + system) per request, in microseconds.
    cpu_us_per_request: f64,
    /// Whose CPU: the server processes, or this process (server and load generator).
    cpu_of: String,
    /// The line this one is compared with.
    baseline: Option<String>,
    /// requests/s of this line divided by requests/s of its baseline.
    ratio: Option<f64>,
    /// requests/s of this line divided by that of the same bare server run in a process of
    /// its own with the services' worker threads (`baseline-proc`): the same process layout
    /// as the services, so the part of the gap that is ours.
    ratio_own_process: Option<f64>,
}

/// The pause between two slices of a group, so that what one slice leaves running (a
/// session's `last_active_at` written late, SQLite's checkpoint after a burst of commits)
/// is not counted against the next.
const SETTLE: Duration = Duration::from_millis(100);

/// Measures `contenders` for `seconds` each, interleaved: each one's time is cut into
/// `rounds` slices, and round `r` runs one slice of each, starting from the `r`-th. A drift
/// of the machine (these VMs' neighbours come and go within seconds) then falls on every
/// line of the group alike, instead of on whichever ran while it lasted.
async fn measure(
    mut contenders: Vec<Contender>,
    seconds: u64,
    rounds: u32,
) -> anyhow::Result<Vec<Line>> {
    let n = contenders.len();
    let slice = Duration::from_secs(seconds) / rounds;
    let mut totals = Vec::with_capacity(n);
    for _ in 0..n {
        totals.push((Measured::nothing()?, 0.0_f64));
    }
    for round in 0..usize::try_from(rounds)? {
        for i in 0..n {
            let k = (i + round) % n;
            let (Some(c), Some((m, cpu))) = (contenders.get_mut(k), totals.get_mut(k)) else {
                continue;
            };
            let before = cpu_of(&c.head.pids)?;
            let measured = c.workers.run(slice).await?;
            *cpu += cpu_of(&c.head.pids)? - before;
            m.add(&measured)?;
            if n > 1 {
                tokio::time::sleep(SETTLE).await;
            }
        }
    }
    Ok(contenders
        .into_iter()
        .zip(totals)
        .map(|(c, (m, cpu))| line_of(c.head, c.concurrency, &m, cpu))
        .collect())
}

/// One contender measured alone, in one piece.
async fn step(contender: Contender, seconds: u64) -> anyhow::Result<Line> {
    measure(vec![contender], seconds, 1)
        .await?
        .pop()
        .context("a step measured nothing")
}

/// The line of what `head` names, from its figures and the CPU its processes used.
fn line_of(head: Head, concurrency: usize, m: &Measured, cpu: f64) -> Line {
    #[allow(
        clippy::cast_precision_loss,
        reason = "request counts are far below 2^52"
    )]
    let requests = m.requests.max(1) as f64;
    let secs = m.elapsed.as_secs_f64();
    #[allow(clippy::cast_precision_loss, reason = "nanoseconds below 60 s")]
    let ms = |q: f64| m.hist.value_at_quantile(q) as f64 / 1e6;
    let line = Line {
        name: head.name,
        backend: head.backend,
        transport: head.transport,
        concurrency,
        requests: m.requests,
        errors: m.errors,
        seconds: secs,
        requests_per_second: requests / secs,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        cpu_us_per_request: cpu / requests * 1e6,
        cpu_of: head.cpu_label.to_owned(),
        baseline: None,
        ratio: None,
        ratio_own_process: None,
    };
    eprintln!(
        "  {:<28} {:<15} {:<22} c={:<4} {:>9.0} req/s  p99 {:>7.3} ms  errors {}",
        line.name,
        line.backend,
        line.transport,
        line.concurrency,
        line.requests_per_second,
        line.p99_ms,
        line.errors
    );
    line
}

/// A group measured by [`measure`] whose first two lines are the bare server in this
/// process and alone in its own: every later line compared with both.
fn against_baselines(mut lines: Vec<Line>) -> anyhow::Result<Vec<Line>> {
    if lines.len() < 2 {
        bail!("a group needs its two baselines");
    }
    let rest = lines.split_off(2);
    let bases = Baselines {
        in_process: lines.first(),
        own_process: lines.get(1),
    };
    let mut compared = Vec::with_capacity(rest.len());
    for mut line in rest {
        bases.compare(&mut line);
        compared.push(line);
    }
    lines.extend(compared);
    Ok(lines)
}

fn compare(line: &mut Line, baseline: &Line) {
    line.baseline = Some(format!(
        "{} ({}, c={})",
        baseline.name, baseline.transport, baseline.concurrency
    ));
    line.ratio = Some(line.requests_per_second / baseline.requests_per_second);
}

/// The baselines a line of the services is compared with: the issue's, in this process, and
/// the same bare server alone in a process of its own.
#[derive(Clone, Copy)]
struct Baselines<'a> {
    in_process: Option<&'a Line>,
    own_process: Option<&'a Line>,
}

impl Baselines<'_> {
    /// Sets `line`'s ratios to whichever of the baselines there are.
    fn compare(self, line: &mut Line) {
        if let Some(base) = self.in_process {
            compare(line, base);
        }
        line.ratio_own_process = self
            .own_process
            .map(|own| line.requests_per_second / own.requests_per_second);
    }
}

fn table(lines: &[Line]) -> String {
    let mut out = format!(
        "| {:<26} | {:<14} | {:<15} | {:>4} | {:>9} | {:>8} | {:>8} | {:>8} | {:>10} | {:>6} | {:>7} | {:>6} |\n",
        "call",
        "backend",
        "transport",
        "conc",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "CPU µs/req",
        "ratio",
        "vs proc",
        "errors"
    );
    out.push_str(&format!(
        "|{:-<28}|{:-<16}|{:-<17}|{:->6}|{:->11}|{:->10}|{:->10}|{:->10}|{:->12}|{:->8}|{:->9}|{:->8}|\n",
        "", "", "", ":", ":", ":", ":", ":", ":", ":", ":", ":"
    ));
    for l in lines {
        let ratio = l
            .ratio
            .map_or_else(|| "base".to_owned(), |r| format!("{:.0} %", r * 100.0));
        let own = l
            .ratio_own_process
            .map_or_else(|| "".to_owned(), |r| format!("{:.0} %", r * 100.0));
        let cpu = if l.cpu_of.starts_with("bench") {
            format!("{:.1}*", l.cpu_us_per_request)
        } else {
            format!("{:.1}", l.cpu_us_per_request)
        };
        out.push_str(&format!(
            "| {:<26} | {:<14} | {:<15} | {:>4} | {:>9.0} | {:>8.3} | {:>8.3} | {:>8.3} | {:>10} | {:>6} | {:>7} | {:>6} |\n",
            l.name,
            l.backend,
            l.transport,
            l.concurrency,
            l.requests_per_second,
            l.p50_ms,
            l.p99_ms,
            l.p999_ms,
            cpu,
            ratio,
            own,
            l.errors
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Servers and clients.

/// A bare tonic server (health service only) on 127.0.0.1:0, in this process.
async fn start_echo() -> anyhow::Result<SocketAddr> {
    let incoming =
        tonic::transport::server::TcpIncoming::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .map_err(|e| anyhow::anyhow!("cannot bind the echo server: {e}"))?
            .with_nodelay(Some(true));
    let addr = incoming.local_addr()?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming)
            .await
        {
            eprintln!("bench: the echo server stopped: {e}");
        }
    });
    Ok(addr)
}

/// A bare axum server (`GET /hello` → `{"hello":"world"}`) on 127.0.0.1:0, in this process.
async fn start_hello() -> anyhow::Result<SocketAddr> {
    #[derive(Serialize)]
    struct Hello {
        hello: &'static str,
    }
    let app = axum::Router::new().route(
        "/hello",
        axum::routing::get(|| async { axum::Json(Hello { hello: "world" }) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("bench: the hello server stopped: {e}");
        }
    });
    Ok(addr)
}

/// `n` HTTP/2 connections to `addr` (a tonic `Channel` is one connection).
async fn channels(addr: SocketAddr, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            Endpoint::from_shared(format!("http://{addr}"))?
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("cannot connect to {addr}"))?,
        );
    }
    Ok(out)
}

fn login_request(code: String) -> LoginRequest {
    LoginRequest {
        code,
        device: None,
        client_ip: String::new(),
    }
}

/// One login code for a new user, from the simulator's `url` (`/sim/login-codes`).
async fn mint_code(client: &reqwest::Client, url: &url::Url) -> anyhow::Result<String> {
    let answer = client
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body("{}")
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let answer: serde_json::Value = serde_json::from_str(&answer)?;
    answer["code"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no code in {answer}"))
}

/// Mints `n` login codes at the simulator, each for a new user, `FILL_PARALLEL` at a time.
async fn mint_codes(sim: &SimProcess, n: usize) -> anyhow::Result<Vec<String>> {
    let url = sim.url("/sim/login-codes")?;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..FILL_PARALLEL {
        let count = n / FILL_PARALLEL + usize::from(t < n % FILL_PARALLEL);
        let (client, url) = (sim.client().clone(), url.clone());
        tasks.spawn(async move {
            let mut codes = Vec::with_capacity(count);
            for _ in 0..count {
                codes.push(mint_code(&client, &url).await?);
            }
            anyhow::Ok(codes)
        });
    }
    let mut codes = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        codes.extend(done??);
    }
    Ok(codes)
}

/// Logs a new user in through gRPC; answers the access token.
async fn login_new_user(sim: &SimProcess, auth: SocketAddr) -> anyhow::Result<String> {
    let code = mint_codes(sim, 1).await?.pop().context("no code minted")?;
    let mut client = AuthServiceClient::new(channels(auth, 1).await?.remove(0));
    let answer = client.login(login_request(code)).await?.into_inner();
    Ok(answer
        .tokens
        .context("Login answered no tokens")?
        .access_token)
}

/// Logs `token` out and checks that the very next Verify of it is refused with TOKEN_REVOKED.
async fn check_revocation(auth: SocketAddr, token: &str) -> anyhow::Result<()> {
    let mut client = AuthServiceClient::new(channels(auth, 1).await?.remove(0));
    client
        .logout(LogoutRequest {
            access_token: token.to_owned(),
            all: false,
        })
        .await
        .context("Logout failed")?;
    match client
        .verify(VerifyRequest {
            access_token: token.to_owned(),
            include_phone: false,
        })
        .await
    {
        Ok(_) => bail!("revocation: a logged-out token was accepted by the next Verify"),
        Err(status) => {
            let reason = status.get_details_error_info().map(|i| i.reason);
            if reason.as_deref() != Some("TOKEN_REVOKED") {
                bail!("revocation: the next Verify answered {status:?}, not TOKEN_REVOKED");
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The run.

/// The services under test on one backend.
/// The tokens of as many new users as the most connections of a step.
async fn new_users(pair: &Pair, concurrency: &[usize]) -> anyhow::Result<Vec<String>> {
    let n = concurrency.iter().copied().max().unwrap_or(1);
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        tokens.push(login_new_user(&pair.sim, pair.auth.addr()).await?);
    }
    Ok(tokens)
}

/// `Login` at [`WRITE_CONCURRENCY`] against `pair`'s simulator, its ratio over `echo16`.
async fn login_step(pair: &mut Pair, seconds: u64, echo16: Option<&Line>) -> anyhow::Result<Line> {
    // Enough codes for the step at a generous rate; the step ends early if they run out.
    let n_codes = usize::try_from(seconds)?.saturating_mul(3000);
    eprintln!("  minting {n_codes} login codes at the simulator...");
    let codes = Arc::new(Mutex::new(mint_codes(&pair.sim, n_codes).await?));
    let chans = channels(pair.auth.addr(), 1).await?;
    let workers: Vec<_> = (0..WRITE_CONCURRENCY)
        .map(|_| LoginWorker {
            client: AuthServiceClient::new(chans[0].clone()),
            codes: codes.clone(),
        })
        .collect();
    let head = Head {
        name: "Login (simulator)".to_owned(),
        backend: pair.backend.to_owned(),
        transport: transport_grpc(1),
        pids: vec![
            Some(pid_of(pair.auth.process_mut())?),
            Some(pid_of(pair.sim.process_mut())?),
        ],
        cpu_label: "auth-service + wechat-sim",
    };
    let mut login = step(Contender::new(head, workers), seconds).await?;
    if let Some(base) = echo16 {
        compare(&mut login, base);
    }
    Ok(login)
}

struct Pair {
    backend: &'static str,
    sim: SimProcess,
    auth: AuthProcess,
    api: ApiProcess,
}

fn pid_of(process: &mut tests::harness::Process) -> anyhow::Result<u32> {
    process.id().context("the process has exited")
}

async fn start_pair(
    backend: &'static str,
    args: &Args,
    auth_env: &[(&str, &str)],
    api_env: &[(&str, &str)],
) -> anyhow::Result<Pair> {
    let sim = SimProcess::start().await.context("the simulator starts")?;
    let workers = args.service_workers.to_string();
    let connections = args.edge_connections.map(|n| n.to_string());
    let mut env = vec![
        ("AUTH_LOGIN_RATE", LOGIN_RATE),
        ("AUTH_WORKER_THREADS", workers.as_str()),
    ];
    env.extend_from_slice(auth_env);
    let mut api_env = api_env.to_vec();
    api_env.push(("API_WORKER_THREADS", workers.as_str()));
    if let Some(n) = &connections {
        api_env.push(("API_AUTH_CONNECTIONS", n.as_str()));
    }
    let api_env = &api_env[..];
    let auth = AuthProcess::start(&sim, &env)
        .await
        .context("auth-service starts")?;
    let api = ApiProcess::start(&auth, api_env)
        .await
        .context("api-service starts")?;
    Ok(Pair {
        backend,
        sim,
        auth,
        api,
    })
}

/// The bare tonic echo at `addr`: in this process (`pid` None) or in a process of its own.
async fn echo_contender(
    addr: SocketAddr,
    pid: Option<u32>,
    conns: usize,
    concurrency: usize,
) -> anyhow::Result<Contender> {
    let chans = channels(addr, conns).await?;
    let workers: Vec<_> = (0..concurrency)
        .map(|w| EchoWorker(HealthClient::new(chans[w % conns].clone())))
        .collect();
    Ok(Contender::new(
        baseline_head("bare tonic Health/Check", transport_grpc(conns), pid),
        workers,
    ))
}

/// The bare axum hello at `addr`: in this process (`pid` None) or in a process of its own.
async fn hello_contender(
    addr: SocketAddr,
    pid: Option<u32>,
    concurrency: usize,
) -> anyhow::Result<Contender> {
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        workers.push(
            HttpWorker::connect(addr, Method::GET, "/hello", None, None, StatusCode::OK).await?,
        );
    }
    Ok(Contender::new(
        baseline_head("bare axum GET /hello", HTTP1.to_owned(), pid),
        workers,
    ))
}

/// The head of a baseline line: in this process (`pid` None) or in a process of its own.
fn baseline_head(name: &str, transport: String, pid: Option<u32>) -> Head {
    let (backend, cpu_label) = match pid {
        None => ("baseline", "bench process (server + load generator)"),
        Some(_) => ("baseline-proc", "bare server process"),
    };
    Head {
        name: name.to_owned(),
        backend: backend.to_owned(),
        transport,
        pids: vec![pid],
        cpu_label,
    }
}

/// The bare servers a group of lines is compared with, in this process and in their own.
struct Bare {
    echo: SocketAddr,
    hello: SocketAddr,
    echo_proc: OwnProcess,
    hello_proc: OwnProcess,
}

impl Bare {
    /// The bare echo twice (this process, its own), for a group of gRPC lines.
    async fn echoes(&self, conns: usize, concurrency: usize) -> anyhow::Result<Vec<Contender>> {
        Ok(vec![
            echo_contender(self.echo, None, conns, concurrency).await?,
            echo_contender(
                self.echo_proc.addr,
                Some(self.echo_proc.pid()?),
                conns,
                concurrency,
            )
            .await?,
        ])
    }

    /// The bare hello twice (this process, its own), for a group of HTTP lines.
    async fn hellos(&self, concurrency: usize) -> anyhow::Result<Vec<Contender>> {
        Ok(vec![
            hello_contender(self.hello, None, concurrency).await?,
            hello_contender(
                self.hello_proc.addr,
                Some(self.hello_proc.pid()?),
                concurrency,
            )
            .await?,
        ])
    }
}

/// `Verify` of a new user's live token at `pair`'s auth-service, and that token (to check
/// its revocation after the step).
async fn verify_contender(
    pair: &mut Pair,
    conns: usize,
    concurrency: usize,
) -> anyhow::Result<(Contender, String)> {
    let addr = pair.auth.addr();
    let token = login_new_user(&pair.sim, addr).await?;
    let chans = channels(addr, conns).await?;
    let workers: Vec<_> = (0..concurrency)
        .map(|w| VerifyWorker {
            client: AuthServiceClient::new(chans[w % conns].clone()),
            token: token.clone(),
        })
        .collect();
    let head = Head {
        name: "Verify".to_owned(),
        backend: pair.backend.to_owned(),
        transport: transport_grpc(conns),
        pids: vec![Some(pid_of(pair.auth.process_mut())?)],
        cpu_label: "auth-service",
    };
    Ok((Contender::new(head, workers), token))
}

/// The gRPC group of one connection mode and concurrency: the bare echo twice and `Verify`
/// interleaved, then the revocation check (the token logged out must be refused on the
/// very next call).
async fn verify_group(
    pair: &mut Pair,
    bare: &Bare,
    conns: usize,
    concurrency: usize,
    args: &Args,
) -> anyhow::Result<Vec<Line>> {
    let mut group = bare.echoes(conns, concurrency).await?;
    let (verify, token) = verify_contender(pair, conns, concurrency).await?;
    group.push(verify);
    let lines = against_baselines(measure(group, args.seconds, args.rounds).await?)?;
    check_revocation(pair.auth.addr(), &token).await?;
    Ok(lines)
}

fn transport_grpc(conns: usize) -> String {
    if conns == 1 {
        "h2, 1 conn".to_owned()
    } else {
        format!("h2, {conns} conns")
    }
}

const HTTP1: &str = "h1, conn/worker";

/// One kind of request at the edge: method, path, body, and the status it must get.
struct EdgeRequest {
    method: Method,
    path: &'static str,
    body: Option<String>,
    expect: StatusCode,
    /// Each request with an `Idempotency-Key` of its own.
    keyed: bool,
}

impl EdgeRequest {
    /// `GET path`, answered 200.
    fn get(path: &'static str) -> Self {
        Self {
            method: Method::GET,
            path,
            body: None,
            expect: StatusCode::OK,
            keyed: false,
        }
    }

    /// `POST /v1/notes` with a small note, answered 201.
    fn create_note() -> Self {
        Self {
            method: Method::POST,
            path: "/v1/notes",
            body: Some(json!({"title": "bench", "body": "a note of the benchmark"}).to_string()),
            expect: StatusCode::CREATED,
            keyed: false,
        }
    }

    /// [`Self::create_note`], each with an `Idempotency-Key` of its own, as a mini-program
    /// that retries safely sends it.
    fn create_note_with_key() -> Self {
        Self {
            keyed: true,
            ..Self::create_note()
        }
    }

    /// The line's name: method and path, and whether a key goes with each.
    fn name(&self) -> String {
        let key = if self.keyed { " (key)" } else { "" };
        format!("{} {}{key}", self.method, self.path)
    }
}

/// `request` at `pair`'s edge on `concurrency` connections, connection `i` as the user of
/// `tokens[i % tokens.len()]`.
async fn edge_contender(
    pair: &mut Pair,
    request: &EdgeRequest,
    tokens: &[String],
    concurrency: usize,
) -> anyhow::Result<Contender> {
    let mut workers = Vec::with_capacity(concurrency);
    for i in 0..concurrency {
        let token = tokens
            .get(i % tokens.len().max(1))
            .context("a step needs at least one user's token")?;
        let mut worker = HttpWorker::connect(
            pair.api.addr(),
            request.method.clone(),
            request.path,
            Some(token.clone()),
            request.body.clone(),
            request.expect,
        )
        .await?;
        worker.keyed = request.keyed;
        workers.push(worker);
    }
    let head = Head {
        name: request.name(),
        backend: pair.backend.to_owned(),
        transport: HTTP1.to_owned(),
        pids: vec![
            Some(pid_of(pair.api.process_mut())?),
            Some(pid_of(pair.auth.process_mut())?),
        ],
        cpu_label: "api-service + auth-service",
    };
    Ok(Contender::new(head, workers))
}

/// An HTTP group at one concurrency: the bare hello twice and each of `requests` (each
/// request's connections as `tokens` says), interleaved.
async fn edge_group(
    pair: &mut Pair,
    bare: &Bare,
    requests: &[(&EdgeRequest, &[String])],
    concurrency: usize,
    args: &Args,
) -> anyhow::Result<Vec<Line>> {
    let mut group = bare.hellos(concurrency).await?;
    for (request, tokens) in requests {
        group.push(edge_contender(pair, request, tokens, concurrency).await?);
    }
    against_baselines(measure(group, args.seconds, args.rounds).await?)
}

async fn run() -> anyhow::Result<()> {
    let args = parse_args()?;
    tests::harness::sim::install_crypto_provider();
    let started = Instant::now();

    let nproc = std::thread::available_parallelism().map_or(0, usize::from);
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let machine = format!("{nproc} CPUs ({cpu_model})");
    println!("machine: {machine}");
    println!(
        "cores: the load generator and the baselines (this process, {nproc} tokio worker \
         threads) share these {nproc} cores with auth-service and api-service ({} worker \
         thread(s) each: AUTH_WORKER_THREADS, API_WORKER_THREADS; one is tokio's \
         current-thread scheduler); nothing is pinned",
        args.service_workers
    );
    println!(
        "edge: api-service's calls to auth-service over {} HTTP/2 connection(s) \
         (API_AUTH_CONNECTIONS)",
        args.edge_connections
            .map_or_else(|| "its default".to_owned(), |n| n.to_string())
    );
    println!(
        "baselines: each bare server runs twice, in this process (`baseline`, the issue's \
         ratio) and alone in a process of its own with {} worker thread(s) like the services \
         (`baseline-proc`, column `vs proc`)",
        args.service_workers
    );
    println!(
        "steps: {} s each, concurrency {:?}; Login at {WRITE_CONCURRENCY}",
        args.seconds, args.concurrency
    );

    let mut pair = start_pair("embedded", &args, &[], &[]).await?;
    let bare = Bare {
        echo: start_echo().await?,
        hello: start_hello().await?,
        echo_proc: OwnProcess::start("echo", args.service_workers).await?,
        hello_proc: OwnProcess::start("hello", args.service_workers).await?,
    };
    let mut lines: Vec<Line> = Vec::new();

    // gRPC: bare echo vs Verify, over one connection and over four.
    eprintln!("gRPC:");
    for conns in [1usize, 4] {
        for &c in &args.concurrency {
            lines.extend(verify_group(&mut pair, &bare, conns, c, &args).await?);
        }
    }
    println!("revocation: ok (checked after each Verify step)");
    // Login's ratio: over the in-process echo on one connection at its concurrency.
    let echo16 = lines
        .iter()
        .find(|l| {
            l.backend == "baseline"
                && l.concurrency == WRITE_CONCURRENCY
                && l.transport == transport_grpc(1)
        })
        .cloned();

    // HTTP/1.1 keep-alive: bare axum vs /v1/me and /v1/notes.
    eprintln!("HTTP/1.1:");
    // Each connection of `GET /v1/me` and `POST /v1/notes` is a user of its own, as a
    // mini-program's are (one token for all let a batch's items share one cache entry, and
    // one user's creations are serialized on PostgreSQL: see api-service's
    // notes/postgres.rs); `GET /v1/notes` reads one user's page of notes.
    let users = new_users(&pair, &args.concurrency).await?;
    let notes_token = login_new_user(&pair.sim, pair.auth.addr()).await?;
    let create = EdgeRequest::create_note();
    let create_keyed = EdgeRequest::create_note_with_key();
    let mut poster = HttpWorker::connect(
        pair.api.addr(),
        create.method.clone(),
        create.path,
        Some(notes_token.clone()),
        create.body.clone(),
        create.expect,
    )
    .await?;
    for i in 0..NOTES {
        let status = poster.send().await?;
        if status != create.expect {
            bail!("POST /v1/notes #{i} answered {status}");
        }
    }
    let me = EdgeRequest::get("/v1/me");
    let page = EdgeRequest::get("/v1/notes?limit=20");
    let reads = [
        (&me, &users[..]),
        (&page, std::slice::from_ref(&notes_token)),
    ];
    for &c in &args.concurrency {
        lines.extend(edge_group(&mut pair, &bare, &reads, c, &args).await?);
    }

    // Writes: Login against the simulator, POST /v1/notes without and with a key (on SQLite
    // committed in groups, so how many wait together is what their speed depends on).
    eprintln!("writes:");
    lines.push(login_step(&mut pair, args.seconds, echo16.as_ref()).await?);
    let writes = [(&create, &users[..]), (&create_keyed, &users[..])];
    for &c in &args.concurrency {
        lines.extend(edge_group(&mut pair, &bare, &writes, c, &args).await?);
    }

    // PostgreSQL + Redis, when available: the same groups, each with its baselines again.
    let external_note = match external_urls().await? {
        None => {
            let why = "WXAUTH_TEST_PG_URL and WXAUTH_TEST_REDIS_URL are not both set \
                       (scripts/services.sh --print gives them)";
            println!("postgres+redis: skipped: {why}");
            format!("skipped: {why}")
        }
        Some((auth_db, api_db, redis)) => {
            eprintln!("PostgreSQL + Redis:");
            let mut ext = start_pair(
                "postgres+redis",
                &args,
                &[
                    ("AUTH_DATABASE_URL", auth_db.as_str()),
                    ("AUTH_REDIS_URL", redis.as_str()),
                ],
                &[
                    ("API_DATABASE_URL", api_db.as_str()),
                    ("API_REDIS_URL", redis.as_str()),
                ],
            )
            .await?;
            for conns in [1usize, 4] {
                for &c in &args.concurrency {
                    lines.extend(verify_group(&mut ext, &bare, conns, c, &args).await?);
                }
            }
            let users = new_users(&ext, &args.concurrency).await?;
            for &c in &args.concurrency {
                let reads = [(&me, &users[..])];
                lines.extend(edge_group(&mut ext, &bare, &reads, c, &args).await?);
            }
            eprintln!("writes:");
            lines.push(login_step(&mut ext, args.seconds, echo16.as_ref()).await?);
            let writes = [(&create, &users[..]), (&create_keyed, &users[..])];
            for &c in &args.concurrency {
                lines.extend(edge_group(&mut ext, &bare, &writes, c, &args).await?);
            }
            "measured".to_owned()
        }
    };

    // Memory after N live sessions.
    eprintln!("memory: logging in {} new users...", args.sessions);
    let auth_pid = pid_of(pair.auth.process_mut())?;
    let api_pid = pid_of(pair.api.process_mut())?;
    let (auth_before, api_before) = (rss_mib(auth_pid)?, rss_mib(api_pid)?);
    let fill_start = Instant::now();
    let fill_retries = fill_sessions(&pair, args.sessions).await?;
    let fill_secs = fill_start.elapsed().as_secs_f64();
    let (auth_after, api_after) = (rss_mib(auth_pid)?, rss_mib(api_pid)?);

    let total_errors: u64 = lines.iter().map(|l| l.errors).sum();
    let printed = table(&lines);
    println!();
    println!("{printed}");
    println!(
        "ratio: req/s over the baseline on the same transport and concurrency (Verify and \
         Login: bare tonic; HTTP lines: bare axum); vs proc: the same over the baseline-proc \
         line (the bare server alone in its own process). CPU µs/req: utime+stime of the \
         server processes under test over the step; * = the bench process itself (in-process \
         server and load generator together)."
    );
    println!(
        "memory (VmRSS) after {} more live sessions, each verified once (logged in in {fill_secs:.1} s, \
         {FILL_PARALLEL} in parallel, {fill_retries} UNAVAILABLE answers retried): auth-service {auth_before:.1} -> {auth_after:.1} MiB, \
         api-service {api_before:.1} -> {api_after:.1} MiB",
        args.sessions
    );
    println!("revocation: ok");
    println!("errors: {total_errors}");
    let verdicts = targets::judge(&lines);
    println!("targets (issue 8), judged on this run's lines:");
    print!("{}", targets::render(&verdicts));

    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the tests crate has no parent directory")?;
    let out_dir = workspace.join("target").join("bench");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let report = json!({
        "machine": machine,
        "nproc": nproc,
        "cpu_model": cpu_model,
        "load_generator": "in-process tokio workers with hdrhistogram; shares the cores with the servers, nothing pinned",
        "service_worker_threads": args.service_workers,
        "seconds_per_step": args.seconds,
        "rounds_per_step": args.rounds,
        "concurrency": args.concurrency,
        "lines": lines,
        "revocation": "ok",
        "postgres_redis": external_note,
        "memory": {
            "sessions": args.sessions,
            "fill_seconds": fill_secs,
            "fill_unavailable_retried": fill_retries,
            "auth_service_rss_mib_before": auth_before,
            "auth_service_rss_mib_after": auth_after,
            "api_service_rss_mib_before": api_before,
            "api_service_rss_mib_after": api_after,
        },
        "errors": total_errors,
        "targets": verdicts,
        "wall_seconds": started.elapsed().as_secs_f64(),
    });
    let path = out_dir.join("latest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("written: {}", path.display());
    if total_errors > 0 {
        bail!("{total_errors} requests failed");
    }
    Ok(())
}

/// Fresh databases on `WXAUTH_TEST_PG_URL` for each service, and `WXAUTH_TEST_REDIS_URL`.
async fn external_urls() -> anyhow::Result<Option<(String, String, String)>> {
    let set = |var: &str| std::env::var(var).is_ok_and(|v| !v.is_empty());
    if !set("WXAUTH_TEST_PG_URL") || !set("WXAUTH_TEST_REDIS_URL") {
        return Ok(None);
    }
    let External::Run(redis) = external::redis("bench") else {
        return Ok(None);
    };
    let External::Run(auth_db) = external::postgres_database("bench-auth").await? else {
        return Ok(None);
    };
    let External::Run(api_db) = external::postgres_database("bench-api").await? else {
        return Ok(None);
    };
    Ok(Some((auth_db, api_db, redis)))
}

/// Logs in `n` new users through gRPC Login, each with a code minted just before,
/// `FILL_PARALLEL` at a time, and verifies each new access token once.
async fn fill_sessions(pair: &Pair, n: usize) -> anyhow::Result<u64> {
    let url = pair.sim.url("/sim/login-codes")?;
    let chans = channels(pair.auth.addr(), 4).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..FILL_PARALLEL {
        let count = n / FILL_PARALLEL + usize::from(t < n % FILL_PARALLEL);
        let (http, url) = (pair.sim.client().clone(), url.clone());
        let mut client = AuthServiceClient::new(chans[t % chans.len()].clone());
        tasks.spawn(async move {
            let mut retries = 0u64;
            let mut done = 0;
            while done < count {
                let code = mint_code(&http, &url).await?;
                match client.login(login_request(code)).await {
                    Ok(answer) => {
                        // Used once, as a live session is: Verify's memory holds it too.
                        let access = answer
                            .into_inner()
                            .tokens
                            .map(|t| t.access_token)
                            .context("a login without tokens")?;
                        client
                            .verify(VerifyRequest {
                                access_token: access,
                                include_phone: false,
                            })
                            .await
                            .context("Verify of a new session")?;
                        done += 1;
                    }
                    // Overloaded for a moment: a new code, at most MAX_FILL_RETRIES times in all.
                    Err(status)
                        if status.code() == tonic::Code::Unavailable
                            && retries < MAX_FILL_RETRIES =>
                    {
                        retries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(status) => {
                        return Err(
                            anyhow::Error::new(status).context("Login while filling sessions")
                        );
                    }
                }
            }
            anyhow::Ok(retries)
        });
    }
    let mut retries = 0;
    while let Some(done) = tasks.join_next().await {
        retries += done??;
    }
    Ok(retries)
}

// Not `mod tests`: that name would hide the `tests` crate (the harness) in this file's paths.
#[cfg(test)]
mod measuring {
    use super::*;

    /// A worker that notes, in a shared log, when the slices start going to it.
    struct Logged {
        id: usize,
        log: Arc<Mutex<Vec<usize>>>,
    }

    impl Worker for Logged {
        async fn call(&mut self) -> Outcome {
            if let Ok(mut log) = self.log.lock()
                && log.last() != Some(&self.id)
            {
                log.push(self.id);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            Outcome::Ok
        }
    }

    fn head(name: &str) -> Head {
        Head {
            name: name.to_owned(),
            backend: "test".to_owned(),
            transport: "none".to_owned(),
            pids: vec![None],
            cpu_label: "this process",
        }
    }

    #[tokio::test]
    async fn a_group_runs_in_slices_that_rotate_each_round() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let group = (0..3)
            .map(|id| {
                let worker = Logged {
                    id,
                    log: log.clone(),
                };
                Contender::new(head(&id.to_string()), vec![worker])
            })
            .collect();
        let lines = measure(group, 1, 3).await.expect("measured");
        let order = log.lock().map(|l| l.clone()).unwrap_or_default();
        assert_eq!(order, [0, 1, 2, 1, 2, 0, 2, 0, 1]);
        let names: Vec<&str> = lines.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["0", "1", "2"]);
        for line in &lines {
            // Each line's time is its three slices of a third of a second, at least (a busy
            // machine may stretch a slice; no upper bound is asserted), and each did work
            // (the log above shows every slice ran).
            assert!(line.seconds >= 0.99, "{}", line.seconds);
            assert!(line.requests >= 3, "{}", line.requests);
        }
    }

    #[tokio::test]
    async fn later_lines_of_a_group_are_compared_with_its_two_baselines() {
        let line = |name: &str, rps: f64| {
            let mut m = Measured::nothing().expect("histogram");
            m.requests = 1;
            m.elapsed = Duration::from_secs(1);
            let mut l = line_of(head(name), 1, &m, 0.0);
            l.requests_per_second = rps;
            l
        };
        let lines = against_baselines(vec![
            line("in", 1000.0),
            line("own", 800.0),
            line("a", 500.0),
            line("b", 400.0),
        ])
        .expect("two baselines");
        let ratios: Vec<_> = lines
            .iter()
            .map(|l| (l.ratio, l.ratio_own_process))
            .collect();
        assert_eq!(
            ratios,
            [
                (None, None),
                (None, None),
                (Some(0.5), Some(0.625)),
                (Some(0.4), Some(0.5))
            ]
        );
        assert!(against_baselines(vec![line("alone", 1.0)]).is_err());
    }
}
