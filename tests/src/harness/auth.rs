//! Starting the real `auth-service` binary against a simulator, on port 0 with its own
//! SQLite file, and talking to it over real gRPC.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use proto::v1::auth_service_client::AuthServiceClient;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::process::Process;
use super::sim::{APPID, SECRET, SimProcess};

/// The `AUTH_TOKEN_KEY` test instances run with (so tests can look for it where it must
/// never appear).
pub const TOKEN_KEY: &str = "test-token-key-7f3a9c1e5b2d4f6a8c0e2b4d6f8a0c2e";

/// Adds `x-client-key` (when there is one) and `x-request-id` (when set) to every call.
#[derive(Debug, Clone, Default)]
pub struct CallMetadata {
    client_key: Option<String>,
}

impl Interceptor for CallMetadata {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(key) = &self.client_key {
            let v: MetadataValue<_> = key
                .parse()
                .map_err(|_| tonic::Status::internal("client key is not ASCII"))?;
            req.metadata_mut().insert("x-client-key", v);
        }
        Ok(req)
    }
}

/// The gRPC client tests use.
pub type AuthClient = AuthServiceClient<InterceptedService<Channel, CallMetadata>>;

/// A running auth-service; killed when dropped, its data directory removed with it.
#[derive(Debug)]
pub struct AuthProcess {
    process: Process,
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    env: Vec<(String, String)>,
    data: tempfile::TempDir,
    client_key: Option<String>,
}

impl AuthProcess {
    /// The environment a test instance gets before `extra` is applied (later entries win).
    fn base_env(sim: &SimProcess, db: &Path) -> Vec<(String, String)> {
        [
            ("AUTH_GRPC_ADDR", "127.0.0.1:0".to_owned()),
            ("AUTH_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("AUTH_DATABASE_URL", format!("sqlite://{}", db.display())),
            ("WECHAT_APPID", APPID.to_owned()),
            ("WECHAT_SECRET", SECRET.to_owned()),
            ("WECHAT_API_BASE", sim.base_url()),
            ("AUTH_TOKEN_KEY", TOKEN_KEY.to_owned()),
            ("AUTH_WECHAT_TIMEOUT", "2s".to_owned()),
            ("AUTH_SHUTDOWN_GRACE", "5s".to_owned()),
            // As deployed (one CPU each): the current-thread scheduler. Tests that want the
            // multi-threaded one set more (replicas.rs does for one replica).
            ("AUTH_WORKER_THREADS", "1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Starts auth-service against `sim` with settings `extra` on top of the test defaults,
    /// and waits until its health service says SERVING.
    pub async fn start(sim: &SimProcess, extra: &[(&str, &str)]) -> anyhow::Result<Self> {
        let data = tempfile::Builder::new()
            .prefix("wxauth-e2e-")
            .tempdir()
            .context("cannot make a data directory")?;
        let mut env = Self::base_env(sim, &data.path().join("auth.db"));
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let client_key = env
            .iter()
            .rev()
            .find(|(k, _)| k == "AUTH_CLIENT_KEYS")
            .and_then(|(_, v)| v.split(',').next().map(str::to_owned));
        let (process, addr, metrics_addr) = launch(&env, data.path()).await?;
        Ok(Self {
            process,
            addr,
            metrics_addr,
            env,
            data,
            client_key,
        })
    }

    /// Stops the process gracefully (SIGTERM) and starts it again with the same settings,
    /// database and port... or a new port when the old one is taken: the address may change.
    pub async fn restart(&mut self) -> anyhow::Result<Option<i32>> {
        let code = self.process.stop(Duration::from_secs(20)).await?;
        let (process, addr, metrics_addr) = launch(&self.env, self.data.path()).await?;
        self.process = process;
        self.addr = addr;
        self.metrics_addr = metrics_addr;
        Ok(code)
    }

    /// Starts the process again after it died or was killed, with the same settings and
    /// database (and port, when the settings fixed one).
    pub async fn relaunch(&mut self) -> anyhow::Result<()> {
        let (process, addr, metrics_addr) = launch(&self.env, self.data.path()).await?;
        self.process = process;
        self.addr = addr;
        self.metrics_addr = metrics_addr;
        Ok(())
    }

    /// The gRPC address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metrics listener's address (Prometheus `GET /metrics`).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The database file.
    pub fn db_path(&self) -> PathBuf {
        self.data.path().join("auth.db")
    }

    /// The data directory (database and its WAL).
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The process, to stop or signal it.
    pub fn process_mut(&mut self) -> &mut Process {
        &mut self.process
    }

    /// Every log line so far.
    pub fn logs(&self) -> Vec<String> {
        self.process.logs()
    }

    /// A client that sends the first configured client key, if any.
    pub async fn client(&self) -> anyhow::Result<AuthClient> {
        self.client_with_key(self.client_key.clone()).await
    }

    /// A client that sends `key` as `x-client-key` (or none).
    pub async fn client_with_key(&self, key: Option<String>) -> anyhow::Result<AuthClient> {
        let channel = channel(self.addr).await?;
        Ok(AuthServiceClient::with_interceptor(
            channel,
            CallMetadata { client_key: key },
        ))
    }

    /// The health status of `service` ("" for the whole server).
    pub async fn health(&self, service: &str) -> anyhow::Result<ServingStatus> {
        health(self.addr, service).await
    }
}

/// A channel to `addr` with short connect and call deadlines.
pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

/// Asks the standard health service about `service`.
pub async fn health(addr: SocketAddr, service: &str) -> anyhow::Result<ServingStatus> {
    let mut client = HealthClient::new(channel(addr).await?);
    let answer = client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?
        .into_inner();
    Ok(answer.status())
}

async fn launch(
    env: &[(String, String)],
    cwd: &Path,
) -> anyhow::Result<(Process, SocketAddr, SocketAddr)> {
    let mut process = Process::spawn("auth-service", env, cwd)?;
    let addr = process.wait_for_addr("grpc").await?;
    let metrics_addr = process.wait_for_addr("metrics").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match health(addr, "").await {
            Ok(ServingStatus::Serving) => return Ok((process, addr, metrics_addr)),
            _ if tokio::time::Instant::now() > deadline => {
                bail!(
                    "auth-service at {addr} never reported SERVING; its output:\n{}",
                    process.logs().join("\n")
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
