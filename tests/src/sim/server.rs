//! Accepting connections and serving the router on them with hyper, so that a handler can have
//! the connection closed without an answer (`axum::serve` cannot): a response that carries the
//! private [`DropConnection`] extension becomes an error of the service, and hyper closes the
//! connection on it.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tower::ServiceExt as _;

use super::config::Settings;
use super::state::SimState;

/// The mark of a response that must not be sent: the connection is closed instead.
#[derive(Clone, Copy, Debug)]
struct DropConnection;

/// A response that makes the server close the connection without answering.
pub(crate) fn drop_connection() -> Response {
    let mut response = ().into_response();
    response.extensions_mut().insert(DropConnection);
    response
}

pub(crate) fn is_dropped(response: &Response) -> bool {
    response.extensions().get::<DropConnection>().is_some()
}

/// What the service answers hyper for a dropped connection.
#[derive(Debug, thiserror::Error)]
#[error("the connection was dropped on purpose, as a fault asked")]
struct DroppedOnPurpose;

/// The simulator, bound and ready to serve.
#[derive(Debug)]
pub struct Simulator {
    listener: TcpListener,
    local_addr: SocketAddr,
    router: Router,
}

impl Simulator {
    /// Binds `settings.addr` and builds a fresh world.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("cannot listen on {}", settings.addr))?;
        let local_addr = listener
            .local_addr()
            .context("cannot read the address listened on")?;
        tracing::info!(?settings, "wechat-sim configured");
        Ok(Self {
            listener,
            local_addr,
            router: super::router(SimState::new(settings)),
        })
    }

    /// The address actually bound (the real port when the settings asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` completes, then stops at once: open connections (hung calls
    /// included) are closed.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tracing::info!(listener = "http", listen_addr = %self.local_addr, "listening");
        let mut connections = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        connections.spawn(serve_connection(stream, self.router.clone()));
                    }
                    Err(error) => {
                        // Out of file descriptors, most likely: wait instead of spinning.
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(error) = joined {
                        tracing::error!(%error, "a connection task failed");
                    }
                }
            }
        }
        tracing::info!("stopping");
        connections.shutdown().await;
        Ok(())
    }
}

async fn serve_connection(stream: TcpStream, router: Router) {
    let service = service_fn(move |request: hyper::Request<Incoming>| {
        let router = router.clone();
        async move {
            let Ok(response) = router.oneshot(request).await;
            if is_dropped(&response) {
                Err(DroppedOnPurpose)
            } else {
                Ok(response)
            }
        }
    });
    let served = Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(error) = served {
        tracing::debug!(%error, "connection closed on an error");
    }
}
