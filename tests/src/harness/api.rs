//! Starting the real `api-service` binary in front of an auth-service, on port 0 with its own
//! SQLite file, and talking to it over real HTTP (or HTTPS).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::auth::AuthProcess;
use super::process::Process;
use super::sim::http_client;

/// A running api-service; killed when dropped, its data directory removed with it.
#[derive(Debug)]
pub struct ApiProcess {
    process: Process,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    env: Vec<(String, String)>,
    data: tempfile::TempDir,
    http: reqwest::Client,
}

impl ApiProcess {
    /// Starts api-service in front of `auth` with settings `extra` on top of the test
    /// defaults, and waits until /readyz answers 200.
    pub async fn start(auth: &AuthProcess, extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_for(&format!("http://{}", auth.addr()), extra, true).await
    }

    /// Starts api-service pointing at `auth_url`; waits for /readyz 200 only when `ready`.
    pub async fn start_for(
        auth_url: &str,
        extra: &[(&str, &str)],
        ready: bool,
    ) -> anyhow::Result<Self> {
        let data = tempfile::Builder::new()
            .prefix("wxauth-api-e2e-")
            .tempdir()
            .context("cannot make a data directory")?;
        let mut env: Vec<(String, String)> = [
            ("API_HTTP_ADDR", "127.0.0.1:0".to_owned()),
            ("API_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("API_AUTH_URL", auth_url.to_owned()),
            (
                "API_DATABASE_URL",
                format!("sqlite://{}", data.path().join("api.db").display()),
            ),
            ("API_AUTH_TIMEOUT", "2s".to_owned()),
            ("API_SHUTDOWN_GRACE", "5s".to_owned()),
            // As deployed (one CPU each): the current-thread scheduler; see auth.rs.
            ("API_WORKER_THREADS", "1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let (process, addr, metrics_addr) = launch(&env, data.path(), ready).await?;
        Ok(Self {
            process,
            addr,
            metrics_addr,
            env,
            data,
            http: http_client(Duration::from_secs(30))?,
        })
    }

    /// Stops the process gracefully (SIGTERM) and starts it again with the same settings and
    /// database; returns the exit code of the stop. The port may change.
    pub async fn restart(&mut self) -> anyhow::Result<Option<i32>> {
        let code = self.process.stop(Duration::from_secs(20)).await?;
        let (process, addr, metrics_addr) = launch(&self.env, self.data.path(), true).await?;
        self.process = process;
        self.addr = addr;
        self.metrics_addr = metrics_addr;
        Ok(code)
    }

    /// Starts the process again after it exited (a stop the caller made itself, reading
    /// the old process's logs first), with the same settings and database. The port may
    /// change.
    pub async fn relaunch(&mut self) -> anyhow::Result<()> {
        let (process, addr, metrics_addr) = launch(&self.env, self.data.path(), true).await?;
        self.process = process;
        self.addr = addr;
        self.metrics_addr = metrics_addr;
        Ok(())
    }

    /// `http://127.0.0.1:PORT` (the scheme is http even when the edge serves HTTPS: use
    /// [`ApiProcess::addr`] to build an https URL).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `base_url` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    /// The public listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metrics listener's address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The data directory (the SQLite file and its WAL).
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The database file.
    pub fn db_path(&self) -> PathBuf {
        self.data.path().join("api.db")
    }

    /// A plain HTTP client (30 s timeout, no proxy).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// /readyz's answer (status and body) once its status is `want`, asked every 50 ms
    /// for up to 5 s (the edge answers from a look at most a second old); the last answer
    /// if it never is.
    pub async fn readiness(
        &self,
        want: reqwest::StatusCode,
    ) -> anyhow::Result<(reqwest::StatusCode, serde_json::Value)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let answer = self.http.get(self.url("/readyz")).send().await?;
            let status = answer.status();
            let body: serde_json::Value =
                serde_json::from_slice(&answer.bytes().await?).context("/readyz's body")?;
            if status == want || tokio::time::Instant::now() > deadline {
                return Ok((status, body));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The process, to signal or stop it.
    pub fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.process.logs()
    }
}

async fn launch(
    env: &[(String, String)],
    cwd: &Path,
    ready: bool,
) -> anyhow::Result<(Process, SocketAddr, SocketAddr)> {
    let mut process = Process::spawn("api-service", env, cwd)?;
    let addr = process.wait_for_addr("http").await?;
    let metrics_addr = process.wait_for_addr("metrics").await?;
    if !ready {
        return Ok((process, addr, metrics_addr));
    }
    let https = env
        .iter()
        .any(|(k, v)| k == "API_TLS_CERT" && !v.is_empty());
    if https {
        // The caller checks readiness over TLS with its own trust roots.
        return Ok((process, addr, metrics_addr));
    }
    let client = http_client(Duration::from_secs(5))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let answer = client.get(format!("http://{addr}/readyz")).send().await;
        if matches!(&answer, Ok(r) if r.status() == reqwest::StatusCode::OK) {
            return Ok((process, addr, metrics_addr));
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "api-service at {addr} never became ready; its output:\n{}",
                process.logs().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
