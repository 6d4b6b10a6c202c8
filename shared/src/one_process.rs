//! The lock that keeps an SQLite database to one process, and the order of that process's
//! writes to it.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// This process's hold on an SQLite database: an exclusive lock on `<file>.lock`, kept while
/// the value lives (the system releases it when the process ends, however it ends).
///
/// SQLite is for one replica, and both services rely on it: what they keep in memory (the
/// session marks and phone numbers of auth-service, the profiles of api-service) another
/// process writing the same file would make stale. A second process on the same file stops
/// at start-up instead, saying so.
#[derive(Debug)]
pub struct OneProcess {
    _file: File,
    turn: WriteTurn,
}

impl OneProcess {
    /// Takes the lock of the database at `path`, or says why not.
    pub fn take(path: &Path) -> anyhow::Result<Self> {
        let mut name = path.as_os_str().to_owned();
        name.push(".lock");
        let lock = PathBuf::from(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .with_context(|| format!("cannot open the lock file {}", lock.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Self {
                _file: file,
                turn: WriteTurn::default(),
            }),
            Err(TryLockError::WouldBlock) => Err(anyhow::anyhow!(
                "another process has the SQLite database {} open ({} is locked): SQLite is \
                 for one replica; use PostgreSQL for more",
                path.display(),
                lock.display()
            )),
            Err(TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", lock.display()))
            }
        }
    }

    /// The turn to write to the database, shared by every writer of this process.
    pub fn turn(&self) -> WriteTurn {
        self.turn.clone()
    }
}

/// How long a write waits for its turn (as long as the services' SQLite busy timeout, which
/// the turn replaces for the writers of one process) before it gives up.
pub const TURN_WAIT: Duration = Duration::from_secs(5);

/// The turn to write to one SQLite database, first come first served, held from a write's
/// start (`BEGIN IMMEDIATE`, or a statement that writes) to its end.
///
/// SQLite lets one writer at a time. Without the turn, writers that came together each
/// asked SQLite, and those that found the file locked slept in its busy handler, in steps
/// of up to 100 ms, holding a pooled connection while they slept: some waited far longer
/// than their place in the queue, and reads could find no connection. With it they queue
/// here, in order, holding nothing.
#[derive(Debug, Clone, Default)]
pub struct WriteTurn(Arc<Mutex<()>>);

impl WriteTurn {
    /// Waits for the turn, at most [`TURN_WAIT`]; it is held until the guard is dropped.
    pub async fn take(&self) -> anyhow::Result<OwnedMutexGuard<()>> {
        tokio::time::timeout(TURN_WAIT, Arc::clone(&self.0).lock_owned())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "no turn to write to SQLite within {TURN_WAIT:?}: other writes held it"
                )
            })
    }
}

/// Drives `work`, and says on `polled` once it has been polled the first time: it then
/// waits on the first thing it waits for, which for a write while the turn is held is the
/// turn. The stores' tests use it to know every writer is queued, without sleeping.
pub async fn saying_when_polled<F: Future>(
    work: F,
    polled: tokio::sync::oneshot::Sender<()>,
) -> F::Output {
    let mut work = std::pin::pin!(work);
    let mut polled = Some(polled);
    std::future::poll_fn(|cx| {
        let poll = work.as_mut().poll(cx);
        if let Some(polled) = polled.take() {
            // The test may have stopped listening (it failed): nobody to tell.
            let _gone = polled.send(());
        }
        poll
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_is_held_by_one_holder_at_a_time() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db = dir.path().join("x.db");
        let first = OneProcess::take(&db).expect("the first takes it");
        let err = OneProcess::take(&db).expect_err("a second is refused");
        assert!(
            err.to_string().contains("SQLite is for one replica"),
            "{err}"
        );
        drop(first);
        OneProcess::take(&db).expect("free again once the first is gone");
    }

    #[tokio::test(start_paused = true)]
    async fn writers_take_the_turn_one_after_another_and_give_up_after_the_wait() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db = OneProcess::take(&dir.path().join("x.db")).expect("the lock");
        let (a, b) = (db.turn(), db.turn());

        let held = a.take().await.expect("the first writer's turn");
        // The clock runs on while the second waits (paused time jumps to the deadline).
        let err = b
            .take()
            .await
            .expect_err("no turn while the first holds it");
        assert!(err.to_string().contains("no turn to write"), "{err}");

        drop(held);
        b.take().await.expect("the turn once the first is done");
    }
}
