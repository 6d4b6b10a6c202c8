//! The users' phone numbers, kept in memory so that `Verify` with `include_phone` (every
//! `GET /v1/me`) costs no database read and no decryption.
//!
//! With SQLite this process is the database's only writer (one replica). With PostgreSQL
//! another replica may change a number, so an entry is kept with the stamp Redis gave the
//! number when it was read ([`PhoneStamp`]), and used only while Redis gives that same
//! stamp: a write anywhere replaces it first. PostgreSQL without Redis keeps nothing: every
//! read goes to the database.
//!
//! Within the process, an entry is what the database answered, kept only when no write of
//! a number overlapped the read: every write counts itself in while it runs and bumps a
//! version when it starts and when it ends, and a read is kept only if it began with no
//! write running and the version is still the one it began with. A write also drops its user's entry once it has
//! ended (committed, failed or abandoned), so the next read takes the number from the
//! database. Writes are rare (a user confirms a number once or twice), so a write anywhere
//! skipping the keeping of reads elsewhere costs nothing that matters.
//!
//! The numbers are personal data: they stay in this map (bounded, S3-FIFO eviction by
//! `quick_cache`) and out of `Debug` output and logs.

use std::sync::{Mutex, PoisonError};

use quick_cache::sync::Cache;

use crate::cache::PhoneStamp;
use crate::wechat::PhoneNumber;

/// The bounded map of openid → kept number; with a capacity of 0 it keeps nothing.
pub struct KeptPhones {
    phones: Option<Cache<String, Kept>>,
    writes: Mutex<Writes>,
}

/// One user's kept number (`None`: the user has none), with the stamp it was read under
/// (`None`: [`PhoneStamp::Local`]).
#[derive(Clone)]
struct Kept {
    stamp: Option<String>,
    phone: Option<PhoneNumber>,
}

/// The writes of numbers: how many run now, and a count of their starts and ends.
#[derive(Debug, Default)]
struct Writes {
    running: u32,
    version: u64,
}

impl std::fmt::Debug for KeptPhones {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptPhones")
            .field("entries", &self.phones.as_ref().map_or(0, Cache::len))
            .finish()
    }
}

/// A database read of a number that may be kept: see [`KeptPhones::read_started`].
#[derive(Debug)]
#[must_use]
pub struct Read(Option<u64>);

/// A write of a user's number in progress: see [`KeptPhones::write_started`].
#[derive(Debug)]
#[must_use]
pub struct Write<'a> {
    kept: &'a KeptPhones,
    openid: String,
}

impl KeptPhones {
    /// Room for `capacity` users; 0 turns it off.
    pub fn new(capacity: usize) -> Self {
        Self {
            phones: (capacity > 0).then(|| Cache::new(capacity)),
            writes: Mutex::new(Writes::default()),
        }
    }

    fn writes(&self) -> std::sync::MutexGuard<'_, Writes> {
        // The lock guards two counters and is never held across an await or a panic point.
        self.writes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The user's number as kept under `stamp` (`Some(None)`: kept as "none"); `None`: ask
    /// the database.
    pub fn get(&self, openid: &str, stamp: &PhoneStamp) -> Option<Option<PhoneNumber>> {
        let kept = self.phones.as_ref()?.get(openid)?;
        let current = match stamp {
            PhoneStamp::Local => kept.stamp.is_none(),
            PhoneStamp::Current(now) => kept.stamp.as_deref() == Some(now.as_str()),
            PhoneStamp::Missing | PhoneStamp::Unusable => false,
        };
        current.then_some(kept.phone)
    }

    /// Call before reading a user's number from the database; hand the answer to
    /// [`Self::read_done`].
    pub fn read_started(&self) -> Read {
        if self.phones.is_none() {
            return Read(None);
        }
        let writes = self.writes();
        Read((writes.running == 0).then_some(writes.version))
    }

    /// Keeps what the database answered for `openid`, under `stamp` (the stamp the number
    /// had before it was read; `None`: [`PhoneStamp::Local`]), unless a write of a number in
    /// this process started or ran since `read` began.
    pub fn read_done(
        &self,
        read: Read,
        openid: &str,
        stamp: Option<String>,
        phone: &Option<PhoneNumber>,
    ) {
        let (Some(phones), Read(Some(version))) = (&self.phones, read) else {
            return;
        };
        let writes = self.writes();
        if writes.running == 0 && writes.version == version {
            phones.insert(
                openid.to_owned(),
                Kept {
                    stamp,
                    phone: phone.clone(),
                },
            );
        }
    }

    /// Call before writing `openid`'s number; the user's entry is dropped when the returned
    /// value is (after the write committed, failed or was abandoned).
    pub fn write_started(&self, openid: &str) -> Write<'_> {
        let mut writes = self.writes();
        writes.running += 1;
        writes.version += 1;
        Write {
            kept: self,
            openid: openid.to_owned(),
        }
    }

    /// How many users' numbers are kept.
    pub fn len(&self) -> usize {
        self.phones.as_ref().map_or(0, Cache::len)
    }

    /// True when this keeps nothing (a capacity of 0).
    pub fn is_off(&self) -> bool {
        self.phones.is_none()
    }

    /// True when nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Write<'_> {
    fn drop(&mut self) {
        let mut writes = self.kept.writes();
        if let Some(phones) = &self.kept.phones {
            phones.remove(&self.openid);
        }
        writes.running -= 1;
        writes.version += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(n: &str) -> Option<PhoneNumber> {
        Some(PhoneNumber {
            phone_number: n.into(),
            pure_phone_number: n.into(),
            country_code: "86".into(),
        })
    }

    #[test]
    fn a_read_with_no_write_around_it_is_kept() {
        let kept = KeptPhones::new(10);
        assert_eq!(kept.get("o", &PhoneStamp::Local), None);

        let read = kept.read_started();
        kept.read_done(read, "o", None, &number("1"));
        let none = kept.read_started();
        kept.read_done(none, "p", None, &None);

        assert_eq!(kept.get("o", &PhoneStamp::Local), Some(number("1")));
        assert_eq!(
            kept.get("p", &PhoneStamp::Local),
            Some(None),
            "\"no number\" is kept too"
        );
    }

    #[test]
    fn a_read_that_overlapped_a_write_is_not_kept() {
        let kept = KeptPhones::new(10);

        // A write starts, then a read (which may see the old number or the new one).
        let write = kept.write_started("o");
        let during = kept.read_started();
        kept.read_done(during, "o", None, &number("old"));
        assert_eq!(
            kept.get("o", &PhoneStamp::Local),
            None,
            "read while a write ran"
        );

        // A read starts, then a write starts and ends before the read is done.
        let before = kept.read_started();
        drop(write);
        let other = kept.write_started("someone else");
        drop(other);
        kept.read_done(before, "o", None, &number("old"));
        assert_eq!(
            kept.get("o", &PhoneStamp::Local),
            None,
            "a write ran during the read"
        );

        // Nothing overlaps: kept.
        let after = kept.read_started();
        kept.read_done(after, "o", None, &number("new"));
        assert_eq!(kept.get("o", &PhoneStamp::Local), Some(number("new")));
    }

    #[test]
    fn a_stamped_entry_is_used_only_under_its_own_stamp() {
        let kept = KeptPhones::new(10);
        let stamp = |s: &str| PhoneStamp::Current(s.into());
        let read = kept.read_started();
        kept.read_done(read, "o", Some("s1".into()), &number("1"));

        assert_eq!(kept.get("o", &stamp("s1")), Some(number("1")));
        assert_eq!(kept.get("o", &stamp("s2")), None, "another replica wrote");
        assert_eq!(kept.get("o", &PhoneStamp::Unusable), None, "a write runs");
        assert_eq!(
            kept.get("o", &PhoneStamp::Missing),
            None,
            "the stamp lapsed"
        );
        assert_eq!(kept.get("o", &PhoneStamp::Local), None);

        let read = kept.read_started();
        kept.read_done(read, "o", None, &number("2"));
        assert_eq!(
            kept.get("o", &stamp("s1")),
            None,
            "a local entry has no stamp"
        );
    }

    #[test]
    fn a_write_drops_its_users_entry_when_it_ends() {
        let kept = KeptPhones::new(10);
        for openid in ["o", "p"] {
            let read = kept.read_started();
            kept.read_done(read, openid, None, &None);
        }

        drop(kept.write_started("o"));

        assert_eq!(
            kept.get("o", &PhoneStamp::Local),
            None,
            "the writer's user is read again"
        );
        assert_eq!(
            kept.get("p", &PhoneStamp::Local),
            Some(None),
            "another user's entry stays"
        );
    }

    #[test]
    fn a_capacity_of_zero_keeps_nothing_and_the_map_is_bounded() {
        let off = KeptPhones::new(0);
        let read = off.read_started();
        off.read_done(read, "o", None, &number("1"));
        assert_eq!(off.get("o", &PhoneStamp::Local), None);
        drop(off.write_started("o"));

        let kept = KeptPhones::new(100);
        for i in 0..1_000 {
            let read = kept.read_started();
            kept.read_done(read, &format!("o{i}"), None, &None);
        }
        assert!(kept.len() <= 100, "{} entries kept", kept.len());
    }
}
