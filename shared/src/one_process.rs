//! The lock that keeps an SQLite database to one process.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

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
            Ok(()) => Ok(Self { _file: file }),
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
}
