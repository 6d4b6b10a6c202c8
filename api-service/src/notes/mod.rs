//! Notes: the sample business module, every read and write scoped to the openid `Verify`
//! returned. It shows how a business resource sits on the edge: domain newtypes checked at
//! the HTTP boundary, a store behind a trait, keyset pagination with an opaque cursor, and
//! `Idempotency-Key` on creation, stored in the same transaction as what it guards.
//!
//! The store has one implementation per backend: `store.rs` (SQLite) and `postgres.rs`
//! (PostgreSQL), with the same semantics; `tests/stores/` runs one contract suite on both.
//!
//! Replacing it with your own domain: copy this directory and `routes/notes.rs` under new
//! names, change the newtypes and the tables (`migrations/{sqlite,postgres}/0002_notes.sql`
//! show both; write new migrations rather than editing ones a database has applied), then
//! swap the `notes` field of `AppState`, its construction in `startup.rs` and the `routes!`
//! lines in `routes/mod.rs`. To remove notes, delete those same places and this directory,
//! and keep both `0002_notes.sql` in place: databases that applied one refuse to start
//! without it (a later migration may drop the tables). Nothing else refers to notes.

mod postgres;
mod store;

use std::sync::atomic::{AtomicI64, Ordering};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest as _, Sha256};

pub use postgres::{
    CREATION_WRITERS as PG_CREATION_WRITERS, PURGE_BATCH as PG_PURGE_BATCH, PgNotes,
};
pub use store::SqliteNotes;

use crate::error::ApiError;
use crate::time::Millis;

/// Longest title, in characters.
pub const TITLE_MAX_CHARS: usize = 100;
/// Longest body, in characters.
pub const BODY_MAX_CHARS: usize = 10_000;
/// Page size when the caller names none.
pub const DEFAULT_PAGE_SIZE: u32 = 20;
/// Largest page size.
pub const MAX_PAGE_SIZE: u32 = 100;
/// How long an `Idempotency-Key` is remembered: at least 24 hours are promised; after 48 it
/// is forgotten (and purged), and the same key makes a new note.
pub const IDEMPOTENCY_TTL_MILLIS: Millis = 48 * 60 * 60 * 1000;
/// How often expired idempotency keys are purged, at most: on the first creation after
/// start-up, then at most once an hour (per process).
const PURGE_EVERY_MILLIS: Millis = 60 * 60 * 1000;

/// When expired idempotency keys were last purged by this process (0: not yet).
#[derive(Debug, Default)]
struct PurgeClock {
    last: AtomicI64,
}

impl PurgeClock {
    /// True (once per period, for one caller) when a purge is due at `now`.
    fn due(&self, now: Millis) -> bool {
        let last = self.last.load(Ordering::Relaxed);
        now.saturating_sub(last) >= PURGE_EVERY_MILLIS
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Longest `Idempotency-Key`, in characters.
pub const IDEMPOTENCY_KEY_MAX: usize = 255;
/// The header that carries it.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

fn invalid(field: &str, message: &str) -> ApiError {
    ApiError::invalid(field, "invalid_argument", message)
}

/// A checked title: 1 to 100 characters of any script, not blank, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteTitle(String);

impl NoteTitle {
    /// Checks a title as sent.
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        if raw.trim().is_empty() {
            return Err(invalid("title", "title must not be empty"));
        }
        if raw.chars().count() > TITLE_MAX_CHARS {
            return Err(invalid("title", "title must be at most 100 characters"));
        }
        if raw.chars().any(char::is_control) {
            return Err(invalid(
                "title",
                "title must not contain control characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The title.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The title, as a `String`.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// A checked body: at most 10,000 characters, possibly empty; line breaks and tabs are kept,
/// other control characters are refused.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NoteBody(String);

impl NoteBody {
    /// Checks a body as sent.
    pub fn parse(raw: &str) -> Result<Self, ApiError> {
        if raw.chars().count() > BODY_MAX_CHARS {
            return Err(invalid("body", "body must be at most 10000 characters"));
        }
        if raw
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err(invalid(
                "body",
                "body must not contain control characters other than line breaks and tabs",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The body.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The body, as a `String`.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// A note's id: a UUID, lower-case and hyphenated. New ids are version 7 (uuid's `now_v7`):
/// the creation's millisecond, a 42-bit counter that starts at a random value each
/// millisecond and counts up within it, and 32 random bits. Consecutive ids sort together,
/// so each new note lands at the end of the `id` index instead of on a random page of it.
/// With version 4 ids every creation dirtied a random leaf of that index: more pages
/// written to the WAL per commit and to the database per checkpoint, and read back once the
/// index outgrew SQLite's page cache (wrk, `POST /v1/notes` at 16 connections on SQLite:
/// 12.9-14.4k -> 17.2-18.4k req/s, 70-79 -> 58-64 µs of CPU a request). An id tells when
/// its note was made, which the note says anyway (`created_at`); two ids of one millisecond
/// from one replica tell how many were made between them, and nothing more of how many
/// notes exist. Ids are not secrets: a note is found only among its owner's, another's id
/// answers 404 as an unknown one. Ids issued before (version 4) stay valid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NoteId(String);

impl NoteId {
    /// A new id, later in order than every id made before it by this process.
    pub fn fresh() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// The id from a URL, or `None` when it is not one we could have issued (the caller
    /// answers 404, exactly as for an unknown id).
    pub fn parse(raw: &str) -> Option<Self> {
        let id = uuid::Uuid::try_parse(raw).ok()?;
        let canonical = id.hyphenated().to_string();
        (canonical == raw).then_some(Self(canonical))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id, as a `String`.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// A stored note.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Its id.
    pub id: NoteId,
    /// Its title.
    pub title: NoteTitle,
    /// Its body.
    pub body: NoteBody,
    /// When it was made.
    pub created_at: Millis,
    /// When it last changed.
    pub updated_at: Millis,
}

impl Note {
    /// A new note, made at `now`, with a fresh id.
    pub fn new(title: NoteTitle, body: NoteBody, now: Millis) -> Self {
        Self {
            id: NoteId::fresh(),
            title,
            body,
            created_at: now,
            updated_at: now,
        }
    }
}

/// A change: `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotePatch {
    /// New title.
    pub title: Option<NoteTitle>,
    /// New body.
    pub body: Option<NoteBody>,
}

impl NotePatch {
    /// True when it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.title.is_none() && self.body.is_none()
    }
}

/// How many notes a page holds: 1 to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSize(u32);

impl PageSize {
    /// Checks `limit` as sent in the query string (absent or empty: 20, as an empty
    /// `cursor` is the first page).
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let Some(raw) = raw.filter(|r| !r.is_empty()) else {
            return Ok(Self(DEFAULT_PAGE_SIZE));
        };
        match raw.parse::<u32>() {
            Ok(n)
                if (1..=MAX_PAGE_SIZE).contains(&n) && raw.bytes().all(|b| b.is_ascii_digit()) =>
            {
                Ok(Self(n))
            }
            _ => Err(invalid("limit", "limit must be an integer from 1 to 100")),
        }
    }

    /// The size.
    pub fn get(self) -> u32 {
        self.0
    }
}

/// Where the next page starts: the position of the last note of the previous one.
///
/// On the wire it is opaque: base64url (no padding) of a version byte (1) and the note's
/// internal sequence number (8 bytes, big-endian). Sequence numbers grow with every note
/// made, in commit order, so a page that starts below one never repeats or skips a note
/// that was there when the listing began, whatever is created or deleted in between. A
/// cursor means something only for the user it was issued to: the listing is scoped to the
/// caller, so another user's cursor only says where to start among the caller's own notes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor(i64);

const CURSOR_VERSION: u8 = 1;

impl Cursor {
    /// The cursor after the note at sequence number `seq`.
    pub fn after(seq: i64) -> Self {
        Self(seq)
    }

    /// The sequence number the next page starts below.
    pub fn seq(self) -> i64 {
        self.0
    }

    /// The opaque form.
    pub fn encode(self) -> String {
        let mut bytes = [0_u8; 9];
        bytes[0] = CURSOR_VERSION;
        bytes[1..].copy_from_slice(&self.0.to_be_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Reads `cursor` as sent in the query string; absent or empty: the first page.
    pub fn parse(raw: Option<&str>) -> Result<Option<Self>, ApiError> {
        let Some(raw) = raw.filter(|r| !r.is_empty()) else {
            return Ok(None);
        };
        let garbled = || invalid("cursor", "cursor is not one this API issued");
        let bytes = URL_SAFE_NO_PAD.decode(raw).map_err(|_| garbled())?;
        let (&version, seq) = bytes.split_first().ok_or_else(garbled)?;
        let seq: [u8; 8] = seq.try_into().map_err(|_| garbled())?;
        let seq = i64::from_be_bytes(seq);
        if version != CURSOR_VERSION || seq <= 0 {
            return Err(garbled());
        }
        Ok(Some(Self(seq)))
    }
}

/// One page of a user's notes, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The notes.
    pub items: Vec<Note>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<Cursor>,
}

/// A checked `Idempotency-Key`: 1 to 255 printable ASCII characters (space to `~`), not
/// blank. Keys are scoped to the user: two users may use the same key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// Checks the header's value as sent.
    pub fn parse(raw: &[u8]) -> Result<Self, ApiError> {
        let fine = !raw.is_empty()
            && raw.len() <= IDEMPOTENCY_KEY_MAX
            && raw.iter().all(|b| (b' '..=b'~').contains(b))
            && raw.iter().any(|b| *b != b' ');
        if !fine {
            return Err(invalid(
                IDEMPOTENCY_KEY_HEADER,
                "Idempotency-Key must be 1 to 255 printable ASCII characters",
            ));
        }
        Ok(Self(raw.iter().copied().map(char::from).collect()))
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What identifies a creation request for `Idempotency-Key`: the SHA-256 of its canonical
/// form (the method and path, then the checked title and body, each preceded by its length
/// in bytes), so a retry that differs only in JSON spacing, key order or escapes is the same
/// request, and one that changes a character is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFingerprint([u8; 32]);

impl RequestFingerprint {
    /// The fingerprint of `POST /v1/notes` with `title` and `body`.
    pub fn of_create(title: &NoteTitle, body: &NoteBody) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"POST /v1/notes\n");
        for part in [title.as_str(), body.as_str()] {
            hash.update(u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
            hash.update(part.as_bytes());
        }
        Self(hash.finalize().into())
    }

    /// Rebuilds one read back from the store.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// The answer a creation gave, as it is kept for its `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    /// The HTTP status (201).
    pub status: u16,
    /// The note it made.
    pub note_id: String,
    /// The response body, byte for byte.
    pub body: Vec<u8>,
}

/// A creation that carries an `Idempotency-Key`.
#[derive(Debug, Clone)]
pub struct Idempotent {
    /// The key.
    pub key: IdempotencyKey,
    /// What the request said.
    pub fingerprint: RequestFingerprint,
    /// The answer to keep should this request make the note.
    pub answer: StoredAnswer,
}

/// What a creation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// The note was made (and its key, if any, remembered with its answer).
    New,
    /// The key was used before with the same request: here is the first answer; nothing
    /// was made.
    Replayed(StoredAnswer),
}

/// 422 `idempotency_key_reused`: the key was used before with a different request.
pub fn key_reused() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
        "this Idempotency-Key was already used with a different request",
    )
}

/// What a creation with `idem`'s key gets when the key already has a first answer (its
/// `fingerprint`, `note_id`, `status` and `body` as stored): that answer again if the
/// request is the same, 422 `idempotency_key_reused` if not.
pub fn first_answer(
    idem: &Idempotent,
    fingerprint: &[u8],
    note_id: String,
    status: i64,
    body: Vec<u8>,
) -> Result<Created, ApiError> {
    let same = <[u8; 32]>::try_from(fingerprint)
        .is_ok_and(|f| RequestFingerprint::from_bytes(f) == idem.fingerprint);
    if !same {
        return Err(key_reused());
    }
    let Ok(status) = u16::try_from(status) else {
        return Err(ApiError::internal(anyhow::anyhow!(
            "stored idempotent answer has status {status}"
        )));
    };
    Ok(Created::Replayed(StoredAnswer {
        status,
        note_id,
        body,
    }))
}

/// A key's first answer, as stored (with when) or as made earlier in the same batch.
struct FirstAnswer {
    fingerprint: Vec<u8>,
    note_id: String,
    status: i64,
    body: Vec<u8>,
    created_at: Millis,
}

/// The first answers of keys, by openid and key.
type FirstAnswers = std::collections::HashMap<(String, String), FirstAnswer>;

/// A key's first answer as read back: openid, key, fingerprint, note_id, status (`S`: each
/// database's integer), response, created_at.
type StoredRow<S> = (String, String, Vec<u8>, String, S, Vec<u8>, Millis);

/// `stored` rows as [`FirstAnswers`] (a row read twice is the same row).
fn first_answers<S: Into<i64>>(stored: impl IntoIterator<Item = StoredRow<S>>) -> FirstAnswers {
    stored
        .into_iter()
        .map(
            |(openid, key, fingerprint, note_id, status, body, created_at)| {
                let answer = FirstAnswer {
                    fingerprint,
                    note_id,
                    status: status.into(),
                    body,
                    created_at,
                };
                ((openid, key), answer)
            },
        )
        .collect()
}

/// A creation waiting for the task that writes it, and where its answer goes.
struct Job {
    openid: String,
    note: Note,
    idempotent: Option<Idempotent>,
    reply: tokio::sync::oneshot::Sender<Result<Created, ApiError>>,
}

/// `openid`'s creation of `note`, given to the task that writes `writer`'s queue: its
/// answer once written.
async fn written_by(
    writer: &tokio::sync::mpsc::Sender<Job>,
    openid: &str,
    note: &Note,
    idempotent: Option<Idempotent>,
) -> Result<Created, ApiError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let job = Job {
        openid: openid.to_owned(),
        note: note.clone(),
        idempotent,
        reply,
    };
    writer.send(job).await.map_err(|_| writer_gone())?;
    answer.await.unwrap_or_else(|_| Err(writer_gone()))
}

/// How `batch`, written together, is answered, as if its creations had run one after
/// another in their order: each one's answer, and the creations to write (their notes, and
/// with a key the key's first answer). `first` holds the keys' first answers in the
/// database that have not expired for some creation of the batch; a key answered there
/// (and not expired at the creation's own time) or by an earlier creation of the batch
/// replays that answer or refuses another request.
fn plan_creations(
    batch: &[Job],
    mut first: FirstAnswers,
) -> (Vec<Result<Created, ApiError>>, Vec<&Job>) {
    let mut answers = Vec::with_capacity(batch.len());
    let mut written = Vec::with_capacity(batch.len());
    for job in batch {
        let Some(idem) = &job.idempotent else {
            answers.push(Ok(Created::New));
            written.push(job);
            continue;
        };
        let since = job.note.created_at.saturating_sub(IDEMPOTENCY_TTL_MILLIS);
        let id = (job.openid.clone(), idem.key.as_str().to_owned());
        if let Some(a) = first.get(&id).filter(|a| a.created_at >= since) {
            answers.push(first_answer(
                idem,
                &a.fingerprint,
                a.note_id.clone(),
                a.status,
                a.body.clone(),
            ));
            continue;
        }
        let made = FirstAnswer {
            fingerprint: idem.fingerprint.as_bytes().to_vec(),
            note_id: idem.answer.note_id.clone(),
            status: i64::from(idem.answer.status),
            body: idem.answer.body.clone(),
            created_at: job.note.created_at,
        };
        first.insert(id, made);
        answers.push(Ok(Created::New));
        written.push(job);
    }
    (answers, written)
}

/// The answer of a creation whose writer task is gone (it panicked).
fn writer_gone() -> ApiError {
    ApiError::internal(anyhow::anyhow!("the notes writer has stopped"))
}

/// `e`'s answer, for one of the several creations written together that it failed.
fn shared_error(e: &sqlx::Error) -> ApiError {
    let cause = anyhow::anyhow!("{e}");
    if crate::db::transient(e) {
        ApiError::unavailable(cause)
    } else {
        ApiError::internal(cause)
    }
}

/// Where notes live. Every method takes the owner's openid and touches only that user's
/// notes: another user's note is indistinguishable from one that does not exist.
#[async_trait]
pub trait NotesStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores `note` for `openid`. With `idempotent`, in the same transaction: answers the
    /// first answer when the key was used with the same request, [`key_reused`] when it was
    /// used with another, else stores the note and remembers the key with its answer.
    async fn create(
        &self,
        openid: &str,
        note: &Note,
        idempotent: Option<Idempotent>,
    ) -> Result<Created, ApiError>;
    /// A page of the user's notes, newest first, starting after `cursor`.
    async fn list(
        &self,
        openid: &str,
        size: PageSize,
        cursor: Option<Cursor>,
    ) -> Result<Page, ApiError>;
    /// One note, or [`ApiError::not_found`].
    async fn get(&self, openid: &str, id: &NoteId) -> Result<Note, ApiError>;
    /// Applies a change at `now` and returns the note after it, or [`ApiError::not_found`].
    async fn update(
        &self,
        openid: &str,
        id: &NoteId,
        patch: NotePatch,
        now: Millis,
    ) -> Result<Note, ApiError>;
    /// Deletes a note, or answers [`ApiError::not_found`].
    async fn delete(&self, openid: &str, id: &NoteId) -> Result<(), ApiError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(e: &ApiError) -> (u16, &str) {
        (e.status().as_u16(), e.code())
    }

    #[test]
    fn titles_of_any_script_up_to_100_characters() {
        assert!(NoteTitle::parse("购物清单").is_ok());
        assert!(NoteTitle::parse("Zoë 🌸 notes").is_ok());
        assert!(NoteTitle::parse(&"字".repeat(100)).is_ok());
        for bad in ["", "   ", "\u{3000}", "a\nb", "tab\there", "nul\0"] {
            let e = NoteTitle::parse(bad).expect_err(bad);
            assert_eq!(field_of(&e), (400, "invalid_argument"), "{bad:?}");
        }
        assert!(NoteTitle::parse(&"字".repeat(101)).is_err());
    }

    #[test]
    fn bodies_up_to_10000_characters_with_line_breaks() {
        assert!(NoteBody::parse("").is_ok());
        assert!(NoteBody::parse("line 1\nline 2\r\n\tindented").is_ok());
        assert!(NoteBody::parse(&"文".repeat(10_000)).is_ok());
        assert!(NoteBody::parse(&"文".repeat(10_001)).is_err());
        assert!(NoteBody::parse("bell\u{7}").is_err());
    }

    #[test]
    fn ids_are_canonical_uuids_in_creation_order() {
        // Many within one millisecond too: each later in order than the one before.
        let ids: Vec<NoteId> = (0..1000).map(|_| NoteId::fresh()).collect();
        for pair in ids.windows(2) {
            assert!(pair[0].as_str() < pair[1].as_str(), "{pair:?}");
        }
        let a = ids[0].clone();
        // Ids made before version 7 are still found.
        let v4 = "0b0a4a3e-8d0c-4f3b-9e2a-1c5d6e7f8a9b";
        assert_eq!(
            NoteId::parse(v4).map(NoteId::into_string).as_deref(),
            Some(v4)
        );
        assert_eq!(NoteId::parse(a.as_str()), Some(a.clone()));
        let upper = a.as_str().to_uppercase();
        let simple = a.as_str().replace('-', "");
        for bad in ["", "1", "not-a-uuid", upper.as_str(), simple.as_str()] {
            assert!(NoteId::parse(bad).is_none(), "{bad}");
        }
        let braced = format!("{{{}}}", a.as_str());
        assert!(NoteId::parse(&braced).is_none());
    }

    #[test]
    fn page_sizes_from_1_to_100_default_20() {
        assert_eq!(PageSize::parse(None).expect("default").get(), 20);
        // `?limit=` is left out, as `?cursor=` is.
        assert_eq!(PageSize::parse(Some("")).expect("empty").get(), 20);
        assert_eq!(PageSize::parse(Some("1")).expect("1").get(), 1);
        assert_eq!(PageSize::parse(Some("100")).expect("100").get(), 100);
        for bad in ["0", "101", "x", " ", "-1", "+5", " 5", "1.5", "99999999999"] {
            let e = PageSize::parse(Some(bad)).expect_err(bad);
            assert_eq!(field_of(&e), (400, "invalid_argument"), "{bad:?}");
        }
    }

    #[test]
    fn cursors_round_trip_and_garbled_ones_are_refused() {
        for seq in [1, 20, 1 << 40, i64::MAX] {
            let c = Cursor::after(seq);
            let text = c.encode();
            assert!(
                text.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
            );
            assert_eq!(Cursor::parse(Some(&text)).expect("valid"), Some(c));
        }
        assert_eq!(Cursor::parse(None).expect("absent"), None);
        assert_eq!(Cursor::parse(Some("")).expect("empty"), None);
        let wrong_version = URL_SAFE_NO_PAD.encode([2, 0, 0, 0, 0, 0, 0, 0, 5]);
        let zero = URL_SAFE_NO_PAD.encode([1, 0, 0, 0, 0, 0, 0, 0, 0]);
        let negative = URL_SAFE_NO_PAD.encode([1, 255, 255, 255, 255, 255, 255, 255, 255]);
        let short = URL_SAFE_NO_PAD.encode([1, 0, 0, 5]);
        let padded = format!("{}=", Cursor::after(7).encode());
        for bad in [
            "garbage!",
            "AQAAAAAAAAAF==",
            wrong_version.as_str(),
            zero.as_str(),
            negative.as_str(),
            short.as_str(),
            padded.as_str(),
        ] {
            let e = Cursor::parse(Some(bad)).expect_err(bad);
            assert_eq!(field_of(&e), (400, "invalid_argument"), "{bad:?}");
        }
    }

    #[test]
    fn idempotency_keys_are_printable_ascii_up_to_255() {
        assert!(IdempotencyKey::parse(b"a").is_ok());
        assert!(IdempotencyKey::parse(b"retry 1: {uuid}~").is_ok());
        assert!(IdempotencyKey::parse("k".repeat(255).as_bytes()).is_ok());
        let long = "k".repeat(256);
        for bad in [
            &b""[..],
            b"   ",
            b"tab\there",
            b"\x7f",
            "caf\u{e9}".as_bytes(),
            long.as_bytes(),
        ] {
            let e = IdempotencyKey::parse(bad).expect_err("refused");
            assert_eq!(field_of(&e), (400, "invalid_argument"), "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_tell_requests_apart_by_content_only() {
        let t = |s: &str| NoteTitle::parse(s).expect("title");
        let b = |s: &str| NoteBody::parse(s).expect("body");
        let one = RequestFingerprint::of_create(&t("title"), &b("body"));
        assert_eq!(one, RequestFingerprint::of_create(&t("title"), &b("body")));
        assert_ne!(one, RequestFingerprint::of_create(&t("title"), &b("body ")));
        assert_ne!(one, RequestFingerprint::of_create(&t("titl"), &b("ebody")));
        // Text cannot move from one field to the other unnoticed.
        assert_ne!(
            RequestFingerprint::of_create(&t("a\",\"body\":\"b"), &b("")),
            RequestFingerprint::of_create(&t("a"), &b("b"))
        );
        assert_eq!(
            RequestFingerprint::from_bytes(*one.as_bytes()),
            one,
            "round trip through the store"
        );
    }
}
