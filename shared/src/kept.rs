//! Values read from a database and kept in memory, with the rule that keeps them current:
//! auth-service's phone numbers and api-service's profiles.
//!
//! Within the process, an entry is what the database answered, kept only when no write of
//! that kind overlapped the read: every write counts itself in while it runs and bumps a
//! version when it starts and when it ends, and a read is kept only if it began with no
//! write running and the version is still the one it began with. A write also drops its
//! key's entry once it has ended (committed, failed or abandoned), so the next read takes
//! the value from the database. Writes are rare next to reads, so a write anywhere skipping
//! the keeping of reads elsewhere costs little.
//!
//! That rule suffices when this process is the database's only writer (SQLite). With
//! several replicas, each entry also carries the [`Stamp`] the shared cache gave its key
//! before the read, and is used only while the cache gives that same stamp (a write
//! anywhere replaces it first). The map is bounded (S3-FIFO eviction by `quick_cache`).

use std::sync::{Mutex, MutexGuard, PoisonError};

use quick_cache::sync::Cache;

/// What the shared cache says of a key's stamp.
///
/// A stamp is a random value that a write replaces (with `writing` while it runs, then
/// with nothing, so that the next read makes a new one). A value read from the database
/// under one stamp is current for as long as the stamp is: a write that began later has
/// replaced it, and a random stamp never comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stamp {
    /// No shared stamps (one process): the process's own rule applies.
    Local,
    /// The key's stamp now.
    Current(String),
    /// No stamp (none yet, or it lapsed): the reader makes one before it reads.
    Missing,
    /// A write runs (or ended without clearing its mark), or the stamp could not be read:
    /// nothing may be kept, and nothing kept may be used.
    Unusable,
}

/// The value of a stamp's key while writes run: `writing:<n>`, `n` the writes running (an
/// older replica's plain `writing` counts as one). A stamp is made only where the key is
/// absent (`SET NX`), so none can be made while a write runs: not even after another,
/// concurrent write has ended (with a plain `writing` that one's end deleted the mark, and a
/// read could then keep, under a new stamp, what the database held before the other write
/// committed; if the other write then failed to delete that stamp, the stale copy stayed
/// in use for the stamp's life).
pub const WRITING: &str = "writing";

/// Whether a stamp key's value says that a write runs.
pub fn is_writing(value: &str) -> bool {
    value.starts_with(WRITING)
}

/// Lua: a write begins. KEYS[1] the stamp's key, ARGV[1] the mark's life in ms (each start
/// renews it). Returns the writes now running.
pub const WRITE_STARTED_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
local n = 0
if v then
  local m = string.match(v, '^writing:(%d+)$')
  if m then n = tonumber(m) elseif v == 'writing' then n = 1 end
end
redis.call('SET', KEYS[1], 'writing:' .. (n + 1), 'PX', ARGV[1])
return n + 1
";

/// Lua: a write ended (committed or not). One write less; with none left the key goes, and
/// the next read makes a new stamp. KEYS[1] the stamp's key. Returns the writes still
/// running.
pub const WRITE_ENDED_LUA: &str = r"
local v = redis.call('GET', KEYS[1])
local m = v and string.match(v, '^writing:(%d+)$')
if m and tonumber(m) > 1 then
  redis.call('SET', KEYS[1], 'writing:' .. (tonumber(m) - 1), 'KEEPTTL')
  return tonumber(m) - 1
end
redis.call('DEL', KEYS[1])
return 0
";

/// The bounded map of key → kept value; with a capacity of 0 it keeps nothing.
pub struct Kept<V> {
    map: Option<Cache<String, (Option<String>, V)>>,
    writes: Mutex<Writes>,
}

/// The writes: how many run now, and a count of their starts and ends.
#[derive(Debug, Default)]
struct Writes {
    running: u32,
    version: u64,
}

impl<V: Clone> std::fmt::Debug for Kept<V> {
    // Not the values: they may be personal data.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("entries", &self.map.as_ref().map_or(0, Cache::len))
            .finish()
    }
}

/// A database read that may be kept: see [`Kept::read_started`].
#[derive(Debug)]
#[must_use]
pub struct Read(Option<u64>);

/// A write of a key's value in progress: see [`Kept::write_started`].
#[must_use]
pub struct Write<'a, V: Clone> {
    kept: &'a Kept<V>,
    key: String,
}

impl<V: Clone> Kept<V> {
    /// Room for `capacity` keys; 0 turns it off.
    pub fn new(capacity: usize) -> Self {
        Self {
            map: (capacity > 0).then(|| Cache::new(capacity)),
            writes: Mutex::new(Writes::default()),
        }
    }

    fn writes(&self) -> MutexGuard<'_, Writes> {
        // The lock guards two counters and is never held across an await or a panic point.
        self.writes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value kept for `key` under `stamp`; `None`: ask the database.
    pub fn get(&self, key: &str, stamp: &Stamp) -> Option<V> {
        let (kept_under, value) = self.map.as_ref()?.get(key)?;
        let current = match stamp {
            Stamp::Local => kept_under.is_none(),
            Stamp::Current(now) => kept_under.as_deref() == Some(now.as_str()),
            Stamp::Missing | Stamp::Unusable => false,
        };
        current.then_some(value)
    }

    /// Call before reading a value from the database; hand the answer to
    /// [`Self::read_done`].
    pub fn read_started(&self) -> Read {
        if self.map.is_none() {
            return Read(None);
        }
        let writes = self.writes();
        Read((writes.running == 0).then_some(writes.version))
    }

    /// Keeps what the database answered for `key`, under `stamp` (the stamp the key had
    /// before it was read; `None`: [`Stamp::Local`]), unless a write in this process
    /// started or ran since `read` began.
    pub fn read_done(&self, read: Read, key: &str, stamp: Option<String>, value: &V) {
        let (Some(map), Read(Some(version))) = (&self.map, read) else {
            return;
        };
        let writes = self.writes();
        if writes.running == 0 && writes.version == version {
            map.insert(key.to_owned(), (stamp, value.clone()));
        }
    }

    /// Call before writing `key`'s value; its entry is dropped when the returned value is
    /// (after the write committed, failed or was abandoned).
    pub fn write_started(&self, key: &str) -> Write<'_, V> {
        let mut writes = self.writes();
        writes.running += 1;
        writes.version += 1;
        Write {
            kept: self,
            key: key.to_owned(),
        }
    }

    /// How many values are kept.
    pub fn len(&self) -> usize {
        self.map.as_ref().map_or(0, Cache::len)
    }

    /// True when this keeps nothing (a capacity of 0).
    pub fn is_off(&self) -> bool {
        self.map.is_none()
    }

    /// True when nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V: Clone> Drop for Write<'_, V> {
    fn drop(&mut self) {
        let mut writes = self.kept.writes();
        if let Some(map) = &self.kept.map {
            map.remove(&self.key);
        }
        writes.running -= 1;
        writes.version += 1;
    }
}
