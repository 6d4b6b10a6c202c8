//! What every handler can reach.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::auth::AuthApi;
use crate::db::Db;
use crate::metrics::Metrics;
use crate::notes::NotesStore;
use crate::profile::ProfileStore;
use crate::routes::health::Readiness;

/// Shared state: one reference-counted [`Shared`], which its fields are reached through.
///
/// The router clones the state several times per request (the middleware's service, the
/// handler, the `State` extractor) and drops each clone again. With a counter per field
/// (seven), cloning and dropping them were about 3 % of the edge's CPU samples on
/// `GET /v1/me` (perf, wrk at 64 connections); with one, they no longer show.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// The state of `shared`.
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
#[derive(Debug)]
pub struct Shared {
    /// auth-service.
    pub auth: Arc<dyn AuthApi>,
    /// The business database (readiness checks it).
    pub db: Db,
    /// Users' profiles.
    pub profiles: Arc<dyn ProfileStore>,
    /// The sample business module's notes.
    pub notes: Arc<dyn NotesStore>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// `API_TRUSTED_PROXY_HOPS`.
    pub trusted_proxy_hops: usize,
    /// Set on SIGTERM: /readyz answers 503 so load balancers stop sending traffic.
    pub draining: Arc<AtomicBool>,
    /// /readyz's shared look at the dependencies.
    pub readiness: Readiness,
}
