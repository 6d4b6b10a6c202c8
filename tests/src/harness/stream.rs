//! A steady stream of requests, as live traffic is during a rollout: a few concurrent
//! clients, each sending its next request as soon as the previous one is answered (after a
//! short pause), every request bounded in time, until stopped. Each answer is kept with when
//! it was sent and how long it took, for the test to judge.

use std::future::Future;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One request of a [`RequestStream`].
#[derive(Debug, Clone)]
pub struct Sample<T> {
    /// Which client sent it (0-based).
    pub client: usize,
    /// Its number among that client's requests (0-based).
    pub seq: u64,
    /// When it was sent, since the stream started.
    pub sent: Duration,
    /// How long it took to answer (or to time out).
    pub took: Duration,
    /// What the request produced; `None` when it had no outcome within the stream's
    /// per-request bound: a hang.
    pub outcome: Option<T>,
}

impl<T> Sample<T> {
    /// When it was answered (or timed out), since the stream started.
    pub fn done(&self) -> Duration {
        self.sent + self.took
    }
}

/// Concurrent clients sending requests until [`RequestStream::stop`] or their deadline.
#[derive(Debug)]
pub struct RequestStream<T> {
    started: Instant,
    stop: Arc<AtomicBool>,
    /// How many requests each client has had an outcome for (or given up on) so far.
    completed: Arc<[AtomicU64]>,
    clients: Vec<JoinHandle<Vec<Sample<T>>>>,
}

impl<T: Send + 'static> RequestStream<T> {
    /// Starts `clients` clients. Each calls `request(client, seq)` in a loop with `pause`
    /// between calls, bounds every call by `per_request` (a call past it is recorded with no
    /// outcome, and the client goes on), and stops when told, when `request` answers
    /// `ControlFlow::Break` (that outcome is recorded), or after `limit` in all.
    pub fn start<F, Fut>(
        clients: usize,
        pause: Duration,
        per_request: Duration,
        limit: Duration,
        request: F,
    ) -> Self
    where
        F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ControlFlow<T, T>> + Send + 'static,
    {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let completed: Arc<[AtomicU64]> = (0..clients).map(|_| AtomicU64::new(0)).collect();
        let request = Arc::new(request);
        let clients = (0..clients)
            .map(|client| {
                let stop = stop.clone();
                let completed = completed.clone();
                let request = request.clone();
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    let deadline = started + limit;
                    let mut seq = 0;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let sent = Instant::now();
                        let answer = tokio::time::timeout(per_request, request(client, seq)).await;
                        let (outcome, go_on) = match answer {
                            Ok(ControlFlow::Continue(v)) => (Some(v), true),
                            Ok(ControlFlow::Break(v)) => (Some(v), false),
                            Err(_) => (None, true),
                        };
                        samples.push(Sample {
                            client,
                            seq,
                            sent: sent - started,
                            took: sent.elapsed(),
                            outcome,
                        });
                        completed[client].fetch_add(1, Ordering::Relaxed);
                        if !go_on {
                            break;
                        }
                        seq += 1;
                        tokio::time::sleep(pause).await;
                    }
                    samples
                })
            })
            .collect();
        Self {
            started,
            stop,
            completed,
            clients,
        }
    }

    /// How many requests `client` has finished so far (answered, failed or past the
    /// per-request bound): a test waits on it for traffic after an event of its own.
    pub fn completed(&self, client: usize) -> u64 {
        self.completed
            .get(client)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// How many clients the stream has.
    pub fn clients(&self) -> usize {
        self.completed.len()
    }

    /// When the stream started (the origin of [`Sample::sent`]).
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Time since the stream started (the clock of [`Sample::sent`]).
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops every client after its request in flight and answers all samples, in the
    /// order they were sent.
    pub async fn stop(self) -> Vec<Sample<T>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for client in self.clients {
            match client.await {
                Ok(samples) => all.extend(samples),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        all.sort_by_key(|s| s.sent);
        all
    }
}
