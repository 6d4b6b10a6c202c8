//! Profiles kept in memory in front of SQLite, so that `GET /v1/me` costs no database read.
//!
//! Only for SQLite, where this process is the database's only writer: the file is locked
//! for one process at start-up ([`crate::db`]), and every write of a profile goes through
//! this store. With PostgreSQL another replica may change a profile, and every read goes to
//! the database.
//!
//! An entry is what the database answered, kept only when no write of a profile overlapped
//! the read: every write counts itself in while it runs and bumps a version when it starts
//! and when it ends, and a read is kept only if it began with no write running and the
//! version is still the one it began with. A write also drops its user's entry once it has
//! ended (committed, failed or abandoned), so the next read takes the profile from the
//! database. Profile writes are rare next to reads, so a write anywhere skipping the keeping
//! of reads elsewhere costs little. The map is bounded (S3-FIFO eviction by `quick_cache`).

use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use quick_cache::sync::Cache;

use super::{Profile, ProfilePatch, ProfileStore};
use crate::error::ApiError;

/// How many users' profiles are kept (about 200 bytes each).
pub const KEPT_PROFILES: usize = 100_000;

/// A profile store with the profiles it has read kept in memory (see the module).
pub struct KeptProfiles<S> {
    inner: S,
    profiles: Cache<String, Profile>,
    writes: Mutex<Writes>,
}

/// The writes of profiles: how many run now, and a count of their starts and ends.
#[derive(Debug, Default)]
struct Writes {
    running: u32,
    version: u64,
}

impl<S: std::fmt::Debug> std::fmt::Debug for KeptProfiles<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptProfiles")
            .field("inner", &self.inner)
            .field("entries", &self.profiles.len())
            .finish()
    }
}

/// A write of a user's profile in progress; drops the user's entry when it ends.
struct Write<'a, S> {
    kept: &'a KeptProfiles<S>,
    openid: &'a str,
}

impl<S> Drop for Write<'_, S> {
    fn drop(&mut self) {
        let mut writes = self.kept.writes();
        self.kept.profiles.remove(self.openid);
        writes.running -= 1;
        writes.version += 1;
    }
}

impl<S> KeptProfiles<S> {
    /// `inner`'s profiles, up to `capacity` of them kept (at least one).
    pub fn new(inner: S, capacity: usize) -> Self {
        Self {
            inner,
            profiles: Cache::new(capacity.max(1)),
            writes: Mutex::new(Writes::default()),
        }
    }

    fn writes(&self) -> MutexGuard<'_, Writes> {
        // The lock guards two counters and is never held across an await or a panic point.
        self.writes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_started<'a>(&'a self, openid: &'a str) -> Write<'a, S> {
        let mut writes = self.writes();
        writes.running += 1;
        writes.version += 1;
        Write { kept: self, openid }
    }

    /// How many profiles are kept.
    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    /// True when nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl<S: ProfileStore> ProfileStore for KeptProfiles<S> {
    async fn get_or_create(&self, openid: &str) -> Result<Profile, ApiError> {
        if let Some(profile) = self.profiles.get(openid) {
            return Ok(profile);
        }
        let started = {
            let writes = self.writes();
            (writes.running == 0).then_some(writes.version)
        };
        // A first sight inserts the empty profile: that write cannot change a profile that
        // exists, so it needs no counting in.
        let profile = self.inner.get_or_create(openid).await?;
        if let Some(version) = started {
            let writes = self.writes();
            if writes.running == 0 && writes.version == version {
                self.profiles.insert(openid.to_owned(), profile.clone());
            }
        }
        Ok(profile)
    }

    async fn update(&self, openid: &str, patch: ProfilePatch) -> Result<Profile, ApiError> {
        let _write = self.write_started(openid);
        self.inner.update(openid, patch).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::sync::Notify;

    use super::*;
    use crate::profile::Nickname;

    /// A store that counts its reads, can hold a read until told, and changes nicknames.
    #[derive(Debug, Default)]
    struct Counting {
        reads: AtomicU32,
        nickname: Mutex<Option<String>>,
        hold: Option<(Notify, Notify)>,
    }

    impl Counting {
        fn profile(&self, openid: &str) -> Profile {
            Profile {
                openid: openid.to_owned(),
                nickname: self.nickname.lock().expect("lock").clone(),
                avatar_url: None,
                created_at: 1,
                updated_at: 1,
            }
        }
    }

    #[async_trait]
    impl ProfileStore for Counting {
        async fn get_or_create(&self, openid: &str) -> Result<Profile, ApiError> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            let read = self.profile(openid);
            if let Some((reached, release)) = &self.hold {
                reached.notify_one();
                release.notified().await;
            }
            Ok(read)
        }

        async fn update(&self, openid: &str, patch: ProfilePatch) -> Result<Profile, ApiError> {
            if let Some(n) = patch.nickname {
                *self.nickname.lock().expect("lock") = n.map(|n| n.as_str().to_owned());
            }
            Ok(self.profile(openid))
        }
    }

    fn rename(to: &str) -> ProfilePatch {
        ProfilePatch {
            nickname: Some(Some(Nickname::parse(to).expect("a nickname"))),
            avatar_url: None,
        }
    }

    #[tokio::test]
    async fn a_kept_profile_is_read_once_and_a_change_is_seen_at_once() {
        let kept = KeptProfiles::new(Counting::default(), 10);

        kept.get_or_create("o").await.expect("read");
        kept.get_or_create("o").await.expect("kept");
        assert_eq!(kept.inner.reads.load(Ordering::SeqCst), 1);

        kept.update("o", rename("new")).await.expect("update");
        let after = kept.get_or_create("o").await.expect("read again");

        assert_eq!(after.nickname.as_deref(), Some("new"));
        assert_eq!(kept.inner.reads.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_read_that_overlapped_a_write_is_not_kept() {
        // Arrange: a read that has taken the old profile and waits.
        let kept = std::sync::Arc::new(KeptProfiles::new(
            Counting {
                hold: Some((Notify::new(), Notify::new())),
                ..Counting::default()
            },
            10,
        ));
        let reader = {
            let kept = kept.clone();
            tokio::spawn(async move { kept.get_or_create("o").await })
        };
        let Some((reached, release)) = &kept.inner.hold else {
            unreachable!("set above")
        };
        reached.notified().await;

        // Act: a change lands, then the old read finishes.
        kept.update("o", rename("new")).await.expect("update");
        release.notify_one();
        let old = reader.await.expect("joined").expect("read");

        // Assert: the old read was answered but not kept; the next read sees the change.
        assert_eq!(old.nickname, None);
        assert!(kept.is_empty(), "the overlapped read was kept");
        release.notify_one();
        let now = kept.get_or_create("o").await.expect("read");
        assert_eq!(now.nickname.as_deref(), Some("new"));
    }

    #[tokio::test]
    async fn the_map_is_bounded() {
        let kept = KeptProfiles::new(Counting::default(), 100);
        for i in 0..1_000 {
            kept.get_or_create(&format!("o{i}")).await.expect("read");
        }
        assert!(kept.len() <= 100, "{} kept", kept.len());
    }
}
