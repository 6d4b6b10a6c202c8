//! Starting the project's real binaries: find them, spawn them with a given environment,
//! capture every log line, and learn the address they bound from their logs.
//!
//! Convention shared by every binary of the workspace: once listening, it writes a JSON log
//! line to stdout with a field `listen_addr` (`"127.0.0.1:PORT"`), and a field `listener`
//! naming which listener it is (`"grpc"`, `"http"`, `"metrics"`, ...). Tests bind port 0 and
//! read the real port from that line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// The directory that holds the workspace's binaries for the profile this code was built in
/// (`target/debug` or `target/release`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the current executable")?;
    let mut dir = exe
        .parent()
        .context("the current executable has no parent directory")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// The path of a workspace binary, built first (once per process) with cargo so that
/// `cargo test` alone is enough: cargo builds a test's own package, not the binaries of
/// the other packages it starts.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = bin_dir()?;
    let built = BUILT.get_or_init(|| build_binaries(&dir).map_err(|e| format!("{e:#}")));
    if let Err(e) = built {
        bail!("building the workspace binaries failed: {e}");
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "binary {} not found; run `cargo build --workspace --bins` first",
            path.display()
        );
    }
    Ok(path)
}

fn build_binaries(dir: &Path) -> anyhow::Result<()> {
    if std::env::var_os("WXAUTH_SKIP_BUILD").is_some() {
        return Ok(());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The workspace this crate belongs to, wherever the caller's working directory is.
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--quiet",
        "--workspace",
        "--bins",
        "--manifest-path",
    ])
    .arg(&manifest);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .context("could not run cargo to build the binaries")?;
    if !status.success() {
        bail!("`cargo build --workspace --bins` failed with {status}");
    }
    Ok(())
}

/// The log filter every binary a test starts gets, unless the test sets `RUST_LOG` itself:
/// the services' own default (`info` for their lines), whatever the runner's `RUST_LOG` says.
pub const TEST_LOG_FILTER: &str = shared::telemetry::DEFAULT_LOG_FILTER;

/// Whether captured log lines are also printed (to stderr) as they arrive.
fn echo_logs() -> bool {
    std::env::var_os("TEST_LOG").is_some()
}

/// How to start a binary.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpawnOptions {
    /// Keep the caller's whole environment (the local launcher); tests start from a clean one.
    pub inherit_env: bool,
    /// Print every log line to stderr as it arrives (also on with `TEST_LOG`).
    pub echo: bool,
}

/// A running binary of the workspace; killed when dropped.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
    addrs: watch::Receiver<HashMap<String, SocketAddr>>,
    /// The tasks reading stdout and stderr; they end when the process closes its pipes.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Process {
    /// Starts binary `name` with exactly the environment `env` added to a cleaned one
    /// (PATH, HOME and RUST_BACKTRACE are kept; `RUST_LOG` is [`TEST_LOG_FILTER`] unless `env`
    /// sets it), in working directory `cwd`.
    pub fn spawn(name: &str, env: &[(String, String)], cwd: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(name, env, cwd, SpawnOptions::default())
    }

    /// [`Process::spawn`] with options.
    pub fn spawn_with(
        name: &str,
        env: &[(String, String)],
        cwd: &Path,
        options: SpawnOptions,
    ) -> anyhow::Result<Self> {
        let path = binary(name)?;
        let mut cmd = Command::new(&path);
        if !options.inherit_env {
            cmd.env_clear();
            for key in ["PATH", "HOME", "RUST_BACKTRACE"] {
                if let Some(v) = std::env::var_os(key) {
                    cmd.env(key, v);
                }
            }
            // Not the runner's RUST_LOG: tests read the logs, and `RUST_LOG=warn` in the
            // shell that ran them would hide the lines they look for.
            cmd.env("RUST_LOG", TEST_LOG_FILTER);
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start {}", path.display()))?;

        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, addrs) = watch::channel(HashMap::new());
        let tx = Arc::new(tx);
        let echo = options.echo || echo_logs();
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(pump(
                name.to_owned(),
                out,
                logs.clone(),
                Some(tx.clone()),
                echo,
            )));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(pump(
                name.to_owned(),
                err,
                logs.clone(),
                None,
                echo,
            )));
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            logs,
            addrs,
            readers,
        })
    }

    /// Waits (up to 60 s) until the process has logged the address of `listener`.
    pub async fn wait_for_addr(&mut self, listener: &str) -> anyhow::Result<SocketAddr> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(addr) = self.addrs.borrow().get(listener) {
                return Ok(*addr);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited with {status} before listening on {listener}; its output:\n{}",
                    self.name,
                    self.logs().join("\n")
                );
            }
            let changed = tokio::time::timeout_at(deadline, self.addrs.changed()).await;
            match changed {
                Err(_) => bail!(
                    "{} did not report a {listener} address within 60 s; its output:\n{}",
                    self.name,
                    self.logs().join("\n")
                ),
                // The sender is gone: stdout closed, the process is exiting. Loop to report it.
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                Ok(Ok(())) => {}
            }
        }
    }

    /// Every line the process wrote so far, stdout and stderr interleaved.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The process id, when it is still running.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.child.id().context("the process has already exited")?;
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid)?)
            .context("the process id is not a valid pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .context("could not send SIGTERM")?;
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit and returns its exit code; by then every
    /// line it wrote has been read into [`Process::logs`].
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("{} did not exit within {timeout:?}", self.name))??;
        // The pipes are closed once the process is gone: the readers finish their last lines.
        // (A child of its own that kept the pipes open would hold them: bounded by the timeout.)
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(timeout, reader).await;
        }
        Ok(status.code())
    }

    /// Waits, however long it takes, for the process to exit (what a supervisor does).
    pub async fn exited(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit code ([`Process::terminate`], then
    /// [`Process::wait_exit`]).
    pub async fn stop(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        self.terminate()?;
        self.wait_exit(timeout).await
    }

    /// Closes this end of the process's stdout and stderr, as when whatever read its logs is
    /// gone: each line it writes from now on fails (a broken pipe) and is not captured.
    pub async fn close_output(&mut self) {
        for reader in self.readers.drain(..) {
            reader.abort();
            // Cancelled, the task has dropped its end of the pipe.
            let _cancelled = reader.await;
        }
    }

    /// Kills the process at once (SIGKILL) and waits for it.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child
            .kill()
            .await
            .context("could not kill the process")
    }
}

async fn pump<R>(
    name: String,
    reader: R,
    logs: Arc<Mutex<Vec<String>>>,
    addrs: Option<Arc<watch::Sender<HashMap<String, SocketAddr>>>>,
    echo: bool,
) where
    R: tokio::io::AsyncRead + Unpin,
{
    // Bytes, not `lines()`: a line that is not UTF-8 would end `lines()` there, losing
    // every later line (and breaking the child's pipe), so that a scan of the logs for what
    // must not be there could pass on a cut-off capture. Such a line is kept, lossily.
    let mut reader = BufReader::new(reader);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(raw.strip_suffix(b"\n").unwrap_or(&raw))
            .trim_end_matches('\r')
            .to_owned();
        if echo {
            eprintln!("[{name}] {line}");
        }
        if let (Some(tx), Some((listener, addr))) = (&addrs, parse_listen_line(&line)) {
            tx.send_modify(|m| {
                m.insert(listener, addr);
            });
        }
        if let Ok(mut l) = logs.lock() {
            l.push(line);
        }
    }
}

/// Reads `listener` and `listen_addr` from a JSON log line, at the top level or under `fields`.
fn parse_listen_line(line: &str) -> Option<(String, SocketAddr)> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = value.get("fields").unwrap_or(&value);
    let addr = fields.get("listen_addr")?.as_str()?.parse().ok()?;
    let listener = fields
        .get("listener")
        .and_then(|l| l.as_str())
        .unwrap_or("main")
        .to_owned();
    Some((listener, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_address_from_a_tracing_json_line() {
        let line = r#"{"timestamp":"t","level":"INFO","fields":{"message":"listening","listener":"grpc","listen_addr":"127.0.0.1:4242"}}"#;
        let (listener, addr) = parse_listen_line(line).expect("a listen line");
        assert_eq!(listener, "grpc");
        assert_eq!(addr.port(), 4242);
    }

    #[tokio::test]
    async fn a_line_that_is_not_utf8_is_kept_and_the_lines_after_it_too() {
        let output: &[u8] = b"first\nbad \xff byte\r\nlast";
        let logs = Arc::new(Mutex::new(Vec::new()));

        pump("t".into(), output, logs.clone(), None, false).await;

        let logs = logs.lock().expect("logs").clone();
        assert_eq!(logs, ["first", "bad \u{fffd} byte", "last"]);
    }

    #[test]
    fn ignores_lines_without_an_address() {
        assert!(parse_listen_line(r#"{"fields":{"message":"hello"}}"#).is_none());
        assert!(parse_listen_line("not json").is_none());
    }
}
