//! Building the service from its settings, binding (gRPC and metrics), serving, and
//! stopping cleanly.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use crate::cache::{Cache, FallbackCache, MemoryCache, RedisCache};
use crate::config::{DatabaseSettings, Settings};
use crate::crypto::Keys;
use crate::grpc::{AuthServiceServer, CallContextLayer, CallerKeys, GrpcAuth};
use crate::metrics::{self, Metrics};
use crate::service::{AuthCore, Policy};
use crate::store::Store;
use crate::store::postgres::PostgresStore;
use crate::store::spanned::CallSpanned;
use crate::store::sqlite::SqliteStore;
use crate::wechat::WechatClient;

/// How often expired sessions are recorded and dead token rows purged.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(300);

/// The gRPC health service name that tells whether Redis answers (`AUTH_REDIS_URL` set):
/// SERVING when it does, NOT_SERVING while this process's memory stands in for it. Answers
/// stay correct either way, so `""` and `wxauth.v1.AuthService` do not follow it.
pub const REDIS_HEALTH_SERVICE: &str = "wxauth.redis";
/// How often Redis is pinged for [`REDIS_HEALTH_SERVICE`].
const REDIS_HEALTH_EVERY: Duration = Duration::from_secs(2);

/// A built, bound, not yet serving auth-service.
#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    metrics_listener: TcpListener,
    metrics: Arc<Metrics>,
    core: AuthCore,
    /// The Redis-backed cache, when `AUTH_REDIS_URL` is set (for its health).
    redis: Option<Arc<FallbackCache>>,
    /// The PostgreSQL store, whose migrations run once serving.
    postgres: Option<PostgresStore>,
    settings: Settings,
}

impl Application {
    /// Opens the store (SQLite: applying migrations; PostgreSQL: without connecting yet),
    /// builds the clients and binds the gRPC and metrics ports.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // reqwest is built without a default crypto provider: ours is ring. A second
        // install (tests building twice in one process) is harmless.
        let _already = rustls::crypto::ring::default_provider().install_default();

        let keys = Arc::new(Keys::derive(&settings.token_key));
        let (store, postgres): (Arc<dyn Store>, _) = match &settings.database {
            // In the call's span: sqlx logs SQLite's slow statements on a thread of its own.
            DatabaseSettings::Sqlite { path } => {
                (Arc::new(CallSpanned(SqliteStore::open(path).await?)), None)
            }
            // Nothing is connected here: the service starts while PostgreSQL is down.
            DatabaseSettings::Postgres {
                url,
                max_connections,
            } => {
                let pg = PostgresStore::connect_lazy(url, *max_connections)
                    .context("cannot use AUTH_DATABASE_URL")?;
                (Arc::new(pg.clone()), Some(pg))
            }
        };
        // Nothing is connected here: the service starts while Redis is down.
        let (cache, redis): (Arc<dyn Cache>, _) = match &settings.redis_url {
            Some(url) => {
                let primary = RedisCache::new(url, &settings.wechat.appid)
                    .context("cannot use AUTH_REDIS_URL")?;
                let cache = Arc::new(FallbackCache::new(primary, MemoryCache::new()));
                (cache.clone(), Some(cache))
            }
            None => (Arc::new(MemoryCache::new()), None),
        };
        let wechat =
            WechatClient::new(&settings.wechat).context("cannot build the WeChat client")?;
        let core = AuthCore::new(store, cache, wechat, keys, Policy::from_settings(&settings));

        if settings.client_keys.is_empty() {
            warn!(
                "AUTH_CLIENT_KEYS is not set: any caller may use this service (for development only)"
            );
        }
        let listener = TcpListener::bind(settings.grpc_addr)
            .await
            .with_context(|| format!("cannot listen on AUTH_GRPC_ADDR {}", settings.grpc_addr))?;
        let local_addr = listener.local_addr().context("no local address")?;
        let metrics_listener = TcpListener::bind(settings.metrics_addr)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on AUTH_METRICS_ADDR {}",
                    settings.metrics_addr
                )
            })?;
        Ok(Self {
            listener,
            local_addr,
            metrics_listener,
            metrics: Arc::new(Metrics::new()),
            core,
            redis,
            postgres,
            settings,
        })
    }

    /// The address the gRPC server is bound to (the real port when the setting said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then reports NOT_SERVING, stops accepting, and
    /// lets in-flight calls finish (for at most `AUTH_SHUTDOWN_GRACE`).
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let (reporter, health) = tonic_health::server::health_reporter();
        // SQLite was migrated in `build`. PostgreSQL migrates in the background (every
        // store call answers UNAVAILABLE until then), NOT_SERVING until it is done.
        let migrations = match self.postgres.clone() {
            None => {
                reporter.set_serving::<AuthServiceServer<GrpcAuth>>().await;
                None
            }
            Some(pg) => {
                reporter
                    .set_not_serving::<AuthServiceServer<GrpcAuth>>()
                    .await;
                reporter
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
                Some(tokio::spawn(async move { pg.migrate_until_ready().await }))
            }
        };
        let migrated = self.postgres.clone();
        // Both versions of reflection: grpcurl before 1.8.8, and other tools, speak only
        // v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .context("cannot build the reflection service")?;
        let reflection = reflection()
            .build_v1()
            .context("cannot build the reflection service")?;

        let housekeeping = tokio::spawn(housekeeping(self.core.clone()));
        let redis_health = match self.redis.clone() {
            Some(cache) => {
                reporter
                    .set_service_status(REDIS_HEALTH_SERVICE, ServingStatus::NotServing)
                    .await;
                Some(tokio::spawn(report_redis_health(cache, reporter.clone())))
            }
            None => None,
        };
        let metrics_addr = self
            .metrics_listener
            .local_addr()
            .context("no local address for metrics")?;
        let metrics_task = tokio::spawn(serve_metrics(self.metrics_listener, self.metrics.clone()));
        info!(listener = "metrics", listen_addr = %metrics_addr, "listening");

        // When stopping began plus the grace: the end of in-flight calls' time, and of the
        // work that outlived its caller (`to_completion`).
        let (stopping_tx, mut stopping_rx) =
            tokio::sync::watch::channel(None::<tokio::time::Instant>);
        let grace = self.settings.shutdown_grace;
        let drain_delay = self.settings.drain_delay;
        let signal = async move {
            // SERVING once PostgreSQL is migrated, unless stopping comes first.
            let serve_when_migrated = async {
                if let Some(pg) = migrated {
                    pg.ready().await;
                    info!("the store is ready: reporting SERVING");
                    reporter.set_serving::<AuthServiceServer<GrpcAuth>>().await;
                    reporter
                        .set_service_status("", ServingStatus::Serving)
                        .await;
                }
                std::future::pending::<()>().await;
            };
            tokio::select! {
                () = shutdown => {}
                () = serve_when_migrated => {}
            }
            info!(?drain_delay, "stopping: reporting NOT_SERVING");
            reporter
                .set_not_serving::<AuthServiceServer<GrpcAuth>>()
                .await;
            reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            // Still serving, so that callers who have not yet seen NOT_SERVING are answered.
            tokio::time::sleep(drain_delay).await;
            info!("no longer accepting calls; draining in-flight calls");
            stopping_tx.send_replace(Some(tokio::time::Instant::now() + grace));
        };
        let mut deadline_rx = stopping_rx.clone();
        let forced = async move {
            // Copied out of the channel's guard before the sleep, which must not hold it.
            let deadline = match deadline_rx.wait_for(Option::is_some).await {
                Ok(deadline) => *deadline,
                Err(_stopped_without_stopping) => None,
            };
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending::<()>().await,
            }
        };

        info!(listener = "grpc", listen_addr = %self.local_addr, "listening");
        // A peer that vanished (its node gone, a half-open connection) is found by TCP
        // keep-alive: after 30 s of silence, probes every 10 s, closed after 3 unanswered,
        // about a minute in all (while an answer of ours is unacknowledged, the kernel's
        // retransmission limit applies instead, about 15 minutes). Not by HTTP/2 pings: with
        // them hyper reads the clock and takes a lock on every frame of every call.
        let incoming = TcpIncoming::from(self.listener)
            .with_nodelay(Some(true))
            .with_keepalive(Some(Duration::from_secs(30)))
            .with_keepalive_interval(Some(Duration::from_secs(10)))
            .with_keepalive_retries(Some(3));
        let mut builder = Server::builder();
        if let Some(age) = self.settings.max_connection_age {
            // Clients reconnect after `age` (GOAWAY; calls in flight finish), which is how a
            // ClusterIP Service spreads them over new replicas. No max_connection_age_grace:
            // in tonic 0.14 setting it replaces the graceful GOAWAY at `age` with a forced
            // close at `age + grace`, which would cut calls in flight.
            builder = builder.max_connection_age(age);
        }
        let server = builder
            .layer(CallContextLayer::new(CallerKeys {
                clients: self.settings.client_keys.clone(),
                operators: self.settings.operator_keys.clone(),
            }))
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(AuthServiceServer::new(GrpcAuth::new(
                self.core.clone(),
                self.metrics.clone(),
            )))
            .serve_with_incoming_shutdown(incoming, signal);

        let result = tokio::select! {
            r = server => r.context("the gRPC server failed"),
            () = forced => {
                warn!(?grace, "in-flight calls did not finish within AUTH_SHUTDOWN_GRACE; stopping anyway");
                Ok(())
            }
        };
        // Work a caller stopped waiting for (a logout's mark, a spent code remembered, a
        // billed phone number stored) runs on after its call: the server no longer waits for
        // it, this does, within the same grace.
        let deadline = *stopping_rx.borrow_and_update();
        if let Some(deadline) = deadline
            && !shared::telemetry::detached_finished(deadline).await
        {
            warn!(
                ?grace,
                "work that outlived its call did not finish within AUTH_SHUTDOWN_GRACE; stopping anyway"
            );
        }
        housekeeping.abort();
        if let Some(task) = migrations {
            task.abort();
        }
        if let Some(task) = redis_health {
            task.abort();
        }
        metrics_task.abort();
        info!("stopped");
        result
    }
}

/// Serves `GET /metrics` (OpenMetrics text) on the metrics listener, and nothing else.
async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(http::header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
                    metrics.render(),
                )
            }
        }),
    );
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "the metrics listener stopped");
    }
}

async fn housekeeping(core: AuthCore) {
    core.store().ready().await;
    let mut every = tokio::time::interval(HOUSEKEEPING_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Err(e) = core.housekeeping().await {
            warn!(error = %e, "housekeeping failed; will try again");
        }
    }
}

/// Pings Redis every [`REDIS_HEALTH_EVERY`] and reports it as [`REDIS_HEALTH_SERVICE`].
async fn report_redis_health(cache: Arc<FallbackCache>, reporter: HealthReporter) {
    let mut every = tokio::time::interval(REDIS_HEALTH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = None;
    loop {
        every.tick().await;
        let ok = cache.redis_ok().await;
        if reported == Some(ok) {
            continue;
        }
        let status = if ok {
            info!(health = REDIS_HEALTH_SERVICE, "Redis answers");
            ServingStatus::Serving
        } else {
            warn!(
                health = REDIS_HEALTH_SERVICE,
                "Redis does not answer: login codes and rate limits are kept in this process until it does"
            );
            ServingStatus::NotServing
        };
        reporter
            .set_service_status(REDIS_HEALTH_SERVICE, status)
            .await;
        reported = Some(ok);
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
