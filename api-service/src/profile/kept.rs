//! Profiles kept in memory in front of the database, so that `GET /v1/me` costs no database
//! read.
//!
//! With SQLite this process is the database's only writer: the file is locked for one
//! process at start-up ([`crate::db`]), and every write of a profile goes through this
//! store. With PostgreSQL another replica may change a profile, so a profile is kept only
//! with `API_REDIS_URL`, under the stamp Redis gave it before it was read, and used only
//! while Redis gives that same stamp; a change anywhere replaces the stamp before it starts
//! ([`Stamps`]). PostgreSQL without Redis keeps nothing: every read goes to the database.
//!
//! Within the process, [`shared::Kept`]'s rule applies: a read is kept only if no write of
//! a profile overlapped it, and a write drops its user's entry when it ends. Profile writes
//! are rare next to reads, so a write anywhere skipping the keeping of reads elsewhere costs
//! little. The map is bounded (S3-FIFO eviction by `quick_cache`).

use async_trait::async_trait;
use shared::{Kept, Stamp};

use super::stamps::Stamps;
use super::{Profile, ProfilePatch, ProfileStore};
use crate::error::ApiError;

/// How many users' profiles are kept (about 200 bytes each).
pub const KEPT_PROFILES: usize = 100_000;

/// A profile store with the profiles it has read kept in memory (see the module).
pub struct KeptProfiles<S> {
    inner: S,
    profiles: Kept<Profile>,
    stamps: Option<Stamps>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for KeptProfiles<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptProfiles")
            .field("inner", &self.inner)
            .field("profiles", &self.profiles)
            .field("stamps", &self.stamps)
            .finish()
    }
}

impl<S> KeptProfiles<S> {
    /// `inner`'s profiles, up to `capacity` of them kept (at least one), for a database
    /// this process alone writes.
    pub fn new(inner: S, capacity: usize) -> Self {
        Self {
            inner,
            profiles: Kept::new(capacity.max(1)),
            stamps: None,
        }
    }

    /// The same, for a database several replicas write: every copy is checked against its
    /// stamp in Redis.
    pub fn with_stamps(inner: S, capacity: usize, stamps: Stamps) -> Self {
        Self {
            stamps: Some(stamps),
            ..Self::new(inner, capacity)
        }
    }

    /// How many profiles are kept.
    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    /// True when nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }
}

#[async_trait]
impl<S: ProfileStore> ProfileStore for KeptProfiles<S> {
    async fn get_or_create(&self, openid: &str) -> Result<Profile, ApiError> {
        let stamp = match &self.stamps {
            None => Stamp::Local,
            Some(stamps) => stamps.get(openid).await,
        };
        if let Some(profile) = self.profiles.get(openid, &stamp) {
            return Ok(profile);
        }
        // The stamp the read is kept under, taken before the read (`None`: not kept).
        let keep_under = match (stamp, &self.stamps) {
            (Stamp::Local, _) => Some(None),
            (Stamp::Current(now), _) => Some(Some(now)),
            (Stamp::Missing, Some(stamps)) => stamps.make(openid).await.map(Some),
            (Stamp::Missing | Stamp::Unusable, _) => None,
        };
        let read = self.profiles.read_started();
        // A first sight inserts the empty profile: that write cannot change a profile that
        // exists, so it needs no counting in.
        let profile = self.inner.get_or_create(openid).await?;
        if let Some(stamp) = keep_under {
            self.profiles.read_done(read, openid, stamp, &profile);
        }
        Ok(profile)
    }

    async fn update(&self, openid: &str, patch: ProfilePatch) -> Result<Profile, ApiError> {
        // Every replica's copy stops counting before the change starts.
        if let Some(stamps) = &self.stamps {
            stamps.write_started(openid).await?;
        }
        let updated = {
            let _write = self.profiles.write_started(openid);
            self.inner.update(openid, patch).await
        };
        if let Some(stamps) = &self.stamps {
            stamps.write_ended(openid).await;
        }
        updated
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
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
