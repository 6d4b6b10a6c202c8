//! What every handler can reach.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::auth::AuthApi;
use crate::db::Db;
use crate::metrics::Metrics;
use crate::notes::NotesStore;
use crate::profile::ProfileStore;

/// Shared state; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppState {
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
}
