//! Building the edge from its settings, binding, serving (HTTP or HTTPS), and stopping
//! cleanly: on SIGTERM /readyz turns 503 first, then the port closes after
//! `API_DRAIN_DELAY`, and in-flight requests get `API_SHUTDOWN_GRACE` to finish.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use axum_server::tls_rustls::RustlsConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

use crate::auth::GrpcAuth;
use crate::config::{Settings, TlsSettings};
use crate::db::Db;
use crate::metrics::Metrics;
use crate::notes::{NotesStore, PgNotes, SqliteNotes};
use crate::profile::{
    KEPT_PROFILES, KeptProfiles, PgProfiles, ProfileStore, SqliteProfiles, Stamps,
};
use crate::routes::{Limits, router};
use crate::state::{AppState, Shared};

/// A built, bound, not yet serving api-service.
#[derive(Debug)]
pub struct Application {
    listener: std::net::TcpListener,
    local_addr: SocketAddr,
    metrics_listener: tokio::net::TcpListener,
    tls: Option<RustlsConfig>,
    state: AppState,
    settings: Settings,
}

/// The edge's TLS configuration: TLS 1.3 and 1.2 only, the full chain from the PEM file.
pub fn tls_config(tls: &TlsSettings) -> anyhow::Result<rustls::ServerConfig> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("cannot read API_TLS_CERT {}", tls.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!(
                "API_TLS_CERT {} is not a PEM certificate chain",
                tls.cert.display()
            )
        })?;
    if certs.is_empty() {
        anyhow::bail!("API_TLS_CERT {} holds no certificate", tls.cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("API_TLS_KEY {} is not a PEM private key", tls.key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
    .context("TLS 1.2 and 1.3 with the ring provider")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("API_TLS_CERT and API_TLS_KEY do not make a valid certificate and key pair")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Application {
    /// Opens the database (SQLite: migrated now; PostgreSQL: connected lazily and migrated in
    /// the background, so the edge starts while it is down), prepares the auth-service client
    /// (which connects lazily too) and binds both listeners.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let _already = rustls::crypto::ring::default_provider().install_default();
        let tls = match &settings.tls {
            Some(t) => Some(RustlsConfig::from_config(Arc::new(tls_config(t)?))),
            None => None,
        };
        let db = Db::open(&settings.database).await?;
        info!(backend = db.backend(), "business database");
        let (profiles, notes): (Arc<dyn ProfileStore>, Arc<dyn NotesStore>) = match &db {
            // SQLite: this process is the file's one writer (it holds the file's lock), so
            // the profiles it reads can be kept in memory.
            Db::Sqlite(pool, one_process) => (
                Arc::new(KeptProfiles::new(
                    SqliteProfiles::new(pool.clone(), one_process.turn()),
                    KEPT_PROFILES,
                )),
                Arc::new(SqliteNotes::new(pool.clone(), one_process.turn())),
            ),
            // PostgreSQL: other replicas write too; with Redis, each profile's stamp tells
            // when a copy is stale. Without it, every read goes to the database.
            Db::Postgres(pg) => {
                let profiles: Arc<dyn ProfileStore> = match &settings.redis_url {
                    Some(url) => Arc::new(KeptProfiles::with_stamps(
                        PgProfiles::new(pg.clone()),
                        KEPT_PROFILES,
                        Stamps::new(url)?,
                    )),
                    None => Arc::new(PgProfiles::new(pg.clone())),
                };
                (profiles, Arc::new(PgNotes::new(pg.clone())))
            }
        };
        let metrics = Arc::new(Metrics::new());
        let auth = GrpcAuth::new(
            &settings.auth_url,
            settings.auth_timeout,
            settings.auth_wechat_timeout,
            settings.auth_client_key.as_ref(),
            settings.auth_connections,
            metrics.verify_calls(),
        )
        .context("cannot build the auth-service client")?;
        let state = AppState::new(Shared {
            auth: Arc::new(auth),
            profiles,
            notes,
            db,
            metrics,
            trusted_proxy_hops: settings.trusted_proxy_hops,
            draining: Arc::new(AtomicBool::new(false)),
            readiness: crate::routes::health::Readiness::default(),
        });

        let listener = std::net::TcpListener::bind(settings.http_addr)
            .with_context(|| format!("cannot listen on API_HTTP_ADDR {}", settings.http_addr))?;
        let local_addr = listener.local_addr().context("no local address")?;
        let metrics_listener = tokio::net::TcpListener::bind(settings.metrics_addr)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on API_METRICS_ADDR {}",
                    settings.metrics_addr
                )
            })?;
        Ok(Self {
            listener,
            local_addr,
            metrics_listener,
            tls,
            state,
            settings,
        })
    }

    /// The address of the public listener.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let app = router(
            self.state.clone(),
            Limits {
                body: self.settings.body_limit,
                timeout: self.settings.request_timeout,
            },
        );

        let metrics = self.state.metrics.clone();
        let metrics_addr = self.metrics_listener.local_addr()?;
        let metrics_app = Router::new().route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        );
        let metrics_task = tokio::spawn(async move {
            if let Err(e) = axum::serve(self.metrics_listener, metrics_app).await {
                warn!(error = %e, "the metrics listener stopped");
            }
        });
        info!(listener = "metrics", listen_addr = %metrics_addr, "listening");

        let handle = axum_server::Handle::new();
        let draining = self.state.draining.clone();
        let (drain_delay, grace) = (self.settings.drain_delay, self.settings.shutdown_grace);
        let stopper = handle.clone();
        tokio::spawn(async move {
            shutdown.await;
            draining.store(true, Ordering::Relaxed);
            info!(?drain_delay, "stopping: /readyz answers 503");
            tokio::time::sleep(drain_delay).await;
            info!(
                ?grace,
                "no longer accepting connections; draining in-flight requests"
            );
            stopper.graceful_shutdown(Some(grace));
        });

        let scheme = if self.tls.is_some() { "https" } else { "http" };
        info!(listener = "http", listen_addr = %self.local_addr, scheme, "listening");
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        // HTTP/1.1 only: TLS offers no other protocol in ALPN, and wx.request, proxies and
        // load balancers speak it to an upstream; HTTP/2 (h2c) would escape the timeouts
        // below after its first request. A client that connects and sends nothing, or a
        // request head a byte at a time, no longer holds its connection for ever: the first
        // request must come whole within the idle timeout, and each head after it too
        // (hyper's header timer runs from when a connection may send its next request, so
        // it bounds idle keep-alive).
        let idle = self.settings.idle_timeout;
        let served = match self.tls {
            Some(tls) => {
                let mut server = axum_server::from_tcp_rustls(self.listener, tls)?
                    .http1_only()
                    .first_request_timeout(idle);
                server.http_builder().http1().header_read_timeout(idle);
                server.handle(handle).serve(service).await
            }
            None => {
                let mut server = axum_server::from_tcp(self.listener)?
                    .http1_only()
                    .first_request_timeout(idle);
                server.http_builder().http1().header_read_timeout(idle);
                server.handle(handle).serve(service).await
            }
        };
        metrics_task.abort();
        info!("stopped");
        served.context("the HTTP server failed")
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
