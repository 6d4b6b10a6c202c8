//! Notes in PostgreSQL (`migrations/postgres/0002_notes.sql`), with the same semantics as the
//! SQLite store next door.
//!
//! PostgreSQL runs writers side by side, so two things SQLite's single writer gives for free
//! are made explicit here. A user's creations take a transaction-scoped advisory lock keyed by
//! the openid: (1) their `seq` numbers are then drawn and committed in the same order, so a
//! keyset page never skips a note that committed late under a smaller number; (2) concurrent
//! retries of one `Idempotency-Key` are serialized, the first makes the note and the others
//! find its answer. Another user waits only when written in one batch with a user whose lock
//! is held (by another replica's batch, say), for as long as that short transaction. The
//! transactions run at READ COMMITTED
//! (the default) on purpose: each statement after the lock sees what the previous holder
//! committed, which a snapshot taken before the wait (REPEATABLE READ) would not.
//!
//! Creations are written together: see [`write_creations`].

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc};

use super::{
    Created, Cursor, IDEMPOTENCY_TTL_MILLIS, Idempotent, Job, Note, NoteBody, NoteId, NotePatch,
    NoteTitle, NotesStore, Page, PageSize, PurgeClock, StoredRow, first_answer, first_answers,
    plan_creations, shared_error, written_by,
};
use crate::db::{PgDb, is_retryable, retry_once, transient};
use crate::error::ApiError;
use crate::time::Millis;

/// The PostgreSQL notes store.
#[derive(Debug, Clone)]
pub struct PgNotes {
    db: PgDb,
    /// When expired idempotency keys were last purged; the purge runs in a task of its own,
    /// started by the creation that finds it due ([`purge_expired_keys`]).
    purges: Arc<PurgeClock>,
    /// The queue of creations, to the tasks that write them ([`write_creations`]).
    creations: mpsc::Sender<Job>,
}

/// Tasks writing creations; each has at most one statement or transaction in flight, on
/// one of the pool's [`crate::db`] connections (10), the others left to reads. More than
/// one, so that a batch waiting for a user's lock (held by another replica's batch, say)
/// leaves other users' creations going.
pub const CREATION_WRITERS: usize = 4;
/// Most creations written together.
const BATCH: usize = 64;
/// Most creations waiting for a writer; a request past them waits for room.
const QUEUED_CREATIONS: usize = 1024;

impl PgNotes {
    /// Notes on `db` (every call answers 503 until its migrations have run), with the tasks
    /// that write creations (call from within a Tokio runtime; they end when the last clone
    /// of this store is dropped).
    pub fn new(db: PgDb) -> Self {
        let (creations, queued) = mpsc::channel(QUEUED_CREATIONS);
        let queued = Arc::new(Mutex::new(queued));
        for _ in 0..CREATION_WRITERS {
            tokio::spawn(write_creations(db.clone(), Arc::clone(&queued)));
        }
        Self {
            db,
            purges: Arc::default(),
            creations,
        }
    }
}

/// Writes creations, as one of [`CREATION_WRITERS`] tasks: it takes what is queued (at most
/// [`BATCH`]) and writes it together, so that under load a few round trips and one commit
/// serve many creations; a creation that comes alone is written at once, since a writer is
/// free. Without keys a batch is one statement ([`insert_plain`]); with keys one
/// transaction of a few ([`write_keyed_batch`]). A batch that fails for a reason that may
/// be one creation's own (not a lost connection or an overloaded server, which would fail
/// them all alike) is written again creation by creation, so that one bad creation does not
/// fail the others. Creations whose request is gone (timed out, client left) before their
/// batch is taken are not written, as when a single statement is cancelled.
async fn write_creations(db: PgDb, queued: Arc<Mutex<mpsc::Receiver<Job>>>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        // The lock is held while waiting: the other writers wait for this one to have
        // taken its batch, then the next of them waits for creations.
        if queued.lock().await.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        batch.retain(|job: &Job| !job.reply.is_closed());
        let answers = write_batch(&db, &batch).await;
        for (job, answer) in batch.drain(..).zip(answers) {
            let _gone = job.reply.send(answer);
        }
    }
}

/// `batch`'s answers, in its order.
async fn write_batch(db: &PgDb, batch: &[Job]) -> Vec<Result<Created, ApiError>> {
    if let ([_, _, ..], Ok(pool)) = (batch, db.ready_pool()) {
        let written = if batch.iter().all(|job| job.idempotent.is_none()) {
            insert_plain(pool, batch)
                .await
                .map(|()| batch.iter().map(|_| Ok(Created::New)).collect())
        } else {
            write_keyed_batch(pool, batch).await
        };
        match written {
            Ok(answers) => return answers,
            // Nothing was written (the server said so); maybe one creation's fault.
            Err(e) if is_retryable(&e) || !transient(&e) => {
                tracing::debug!(error = %e, size = batch.len(), "a batch of notes failed; writing each alone");
            }
            Err(e) => return batch.iter().map(|_| Err(shared_error(&e))).collect(),
        }
    }
    let mut answers = Vec::with_capacity(batch.len());
    for job in batch {
        answers.push(create_alone(db, job).await);
    }
    answers
}

/// One creation, alone: without a key in a statement of its own, with one in a transaction.
async fn create_alone(db: &PgDb, job: &Job) -> Result<Created, ApiError> {
    let pool = db.ready_pool()?;
    let (openid, note) = (job.openid.as_str(), &job.note);
    match &job.idempotent {
        None => retry_once(|| create_plain(pool, openid, note)).await,
        Some(idem) => retry_once(|| create_keyed(pool, openid, note, idem)).await?,
    }
}

/// A subquery that takes the advisory lock of every openid in the `text[]` parameter `$n`,
/// in the order of the locks' keys (so two statements taking several never wait for each
/// other in a cycle; a creation alone takes one lock only), and answers one row once it
/// holds them all (an aggregate reads all its input before its row). A subquery that calls
/// a volatile function is not merged into the query around it.
macro_rules! lock_users {
    ($n:literal) => {
        concat!(
            "(SELECT count(*) FROM (SELECT pg_advisory_xact_lock(k) FROM \
               (SELECT DISTINCT hashtextextended(o, 0) AS k FROM unnest(",
            $n,
            "::text[]) AS o ORDER BY k) AS keys) AS held)"
        )
    };
}

/// Appends the `INSERT` of `jobs`' notes, from the arrays `$1`-`$6` of [`NoteColumns`],
/// made in their order (`WITH ORDINALITY`), so that one user's creations in one batch get
/// their numbers in the order they came.
macro_rules! insert_notes_from {
    ($from:expr) => {
        concat!(
            "INSERT INTO notes (id, openid, title, body, created_at, updated_at) \
             SELECT n.id, n.openid, n.title, n.body, n.created_at, n.updated_at FROM ",
            $from,
            "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[]) \
               WITH ORDINALITY AS n(id, openid, title, body, created_at, updated_at, i) \
             ORDER BY n.i"
        )
    };
}

/// Notes as the columns of one `INSERT … SELECT … FROM unnest(…)`.
#[derive(Default)]
struct NoteColumns<'a> {
    ids: Vec<&'a str>,
    openids: Vec<&'a str>,
    titles: Vec<&'a str>,
    bodies: Vec<&'a str>,
    created: Vec<Millis>,
    updated: Vec<Millis>,
}

impl<'a> NoteColumns<'a> {
    fn push(&mut self, openid: &'a str, note: &'a Note) {
        self.ids.push(note.id.as_str());
        self.openids.push(openid);
        self.titles.push(note.title.as_str());
        self.bodies.push(note.body.as_str());
        self.created.push(note.created_at);
        self.updated.push(note.updated_at);
    }

    /// `sql`, with these columns bound to its `$1`-`$6`.
    fn bind(
        self,
        sql: &'static str,
    ) -> sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments> {
        sqlx::query(sql)
            .bind(self.ids)
            .bind(self.openids)
            .bind(self.titles)
            .bind(self.bodies)
            .bind(self.created)
            .bind(self.updated)
    }
}

/// Several creations without a key in one statement, so one transaction: every user's
/// lock is taken ([`lock_users`]) before any row, and with it any `seq`, is made, as in
/// [`create_plain`] (the lock's one row is joined before the rows are).
async fn insert_plain(pool: &PgPool, batch: &[Job]) -> Result<(), sqlx::Error> {
    let mut notes = NoteColumns::default();
    for job in batch {
        notes.push(&job.openid, &job.note);
    }
    notes
        .bind(insert_notes_from!(concat!(
            lock_users!("$2"),
            " AS locked, "
        )))
        .execute(pool)
        .await?;
    Ok(())
}

/// Several creations, some with a key, in one transaction of a few statements whatever
/// their number: every user's lock; the keys' first answers (those expired deleted, as
/// [`create_keyed`] does); then the new notes and the new keys' answers in one statement.
/// Each creation is answered as if the batch's creations had run one after another in
/// their order, as [`create_keyed`] would: a key already answered (in the database, or by
/// an earlier creation of the batch) replays that answer or refuses another request.
async fn write_keyed_batch(
    pool: &PgPool,
    batch: &[Job],
) -> Result<Vec<Result<Created, ApiError>>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let openids: Vec<&str> = batch.iter().map(|job| job.openid.as_str()).collect();
    sqlx::query(concat!("SELECT 1 FROM ", lock_users!("$1"), " AS locked"))
        .bind(&openids)
        .execute(&mut *tx)
        .await?;

    let mut asked = (Vec::new(), Vec::new(), Vec::new());
    for job in batch {
        if let Some(idem) = &job.idempotent {
            asked.0.push(job.openid.as_str());
            asked.1.push(idem.key.as_str());
            asked
                .2
                .push(job.note.created_at.saturating_sub(IDEMPOTENCY_TTL_MILLIS));
        }
    }
    // A key past its time for any creation that names it is deleted; each creation reads
    // only what is not past its own time (below), as alone it would.
    let stored: Vec<StoredRow<i32>> = sqlx::query_as(
        "WITH asked AS (SELECT * FROM unnest($1::text[], $2::text[], $3::int8[]) \
                          AS a(openid, key, since)), \
              expired AS (DELETE FROM note_idempotency i USING asked a \
                          WHERE i.openid = a.openid AND i.key = a.key AND i.created_at < a.since) \
         SELECT DISTINCT i.openid, i.key, i.fingerprint, i.note_id, i.status, i.response, \
                i.created_at \
         FROM note_idempotency i JOIN asked a ON i.openid = a.openid AND i.key = a.key \
         WHERE i.created_at >= a.since",
    )
    .bind(&asked.0)
    .bind(&asked.1)
    .bind(&asked.2)
    .fetch_all(&mut *tx)
    .await?;
    let (answers, written) = plan_creations(batch, first_answers(stored));
    let mut notes = NoteColumns::default();
    let mut keys = KeyColumns::default();
    for job in written {
        notes.push(&job.openid, &job.note);
        if let Some(idem) = &job.idempotent {
            keys.push(&job.openid, idem, job.note.created_at);
        }
    }

    if !notes.ids.is_empty() {
        // The notes, then the keys' answers, in one statement.
        let sql = concat!(
            "WITH made AS (",
            insert_notes_from!(""),
            ") INSERT INTO note_idempotency \
               (openid, key, fingerprint, note_id, status, response, created_at) \
             SELECT * FROM unnest($7::text[], $8::text[], $9::bytea[], $10::text[], \
                                  $11::int4[], $12::bytea[], $13::int8[])"
        );
        keys.bind(notes.bind(sql)).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(answers)
}

/// Keys' first answers as the columns of one `INSERT … SELECT … FROM unnest(…)`.
#[derive(Default)]
struct KeyColumns<'a> {
    openids: Vec<&'a str>,
    keys: Vec<&'a str>,
    fingerprints: Vec<&'a [u8]>,
    note_ids: Vec<&'a str>,
    statuses: Vec<i32>,
    bodies: Vec<&'a [u8]>,
    created: Vec<Millis>,
}

impl<'a> KeyColumns<'a> {
    fn push(&mut self, openid: &'a str, idem: &'a Idempotent, now: Millis) {
        self.openids.push(openid);
        self.keys.push(idem.key.as_str());
        self.fingerprints
            .push(idem.fingerprint.as_bytes().as_slice());
        self.note_ids.push(&idem.answer.note_id);
        self.statuses.push(i32::from(idem.answer.status));
        self.bodies.push(&idem.answer.body);
        self.created.push(now);
    }

    /// `query`, with these columns bound to its next seven parameters.
    fn bind(
        self,
        query: sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'a, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(self.openids)
            .bind(self.keys)
            .bind(self.fingerprints)
            .bind(self.note_ids)
            .bind(self.statuses)
            .bind(self.bodies)
            .bind(self.created)
    }
}

type Row = (i64, String, String, String, Millis, Millis);

fn note((_seq, id, title, body, created_at, updated_at): Row) -> Note {
    // Rows were checked on the way in; they are not checked again on the way out.
    Note {
        id: NoteId(id),
        title: NoteTitle(title),
        body: NoteBody(body),
        created_at,
        updated_at,
    }
}

type AnswerRow = (Vec<u8>, String, i32, Vec<u8>);

/// A creation without a key: one statement, so one round trip, where a transaction takes
/// four (`BEGIN`, the lock, the `INSERT`, `COMMIT`). The statement is its own transaction:
/// the subquery takes the user's advisory lock before the row, and with it its `seq`, is
/// made (a subquery that calls a volatile function is not merged into the outer query), and
/// the lock is released at its commit, as in a transaction of several statements.
async fn create_plain(pool: &PgPool, openid: &str, note: &Note) -> Result<Created, sqlx::Error> {
    insert_note(
        "INSERT INTO notes (id, openid, title, body, created_at, updated_at) \
         SELECT $1, $2, $3, $4, $5, $6 \
         FROM (SELECT pg_advisory_xact_lock(hashtextextended($2, 0))) AS locked",
        openid,
        note,
    )
    .execute(pool)
    .await?;
    Ok(Created::New)
}

/// `sql`, an `INSERT` of a note, with `note` owned by `openid` bound to its `$1`-`$6` (id,
/// openid, title, body, created_at, updated_at).
fn insert_note<'q>(
    sql: &'static str,
    openid: &'q str,
    note: &'q Note,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
        .bind(note.id.as_str())
        .bind(openid)
        .bind(note.title.as_str())
        .bind(note.body.as_str())
        .bind(note.created_at)
        .bind(note.updated_at)
}

/// One attempt at a creation with a key: the database's verdict, or the answer to give.
async fn create_keyed(
    pool: &PgPool,
    openid: &str,
    note: &Note,
    idem: &Idempotent,
) -> Result<Result<Created, ApiError>, sqlx::Error> {
    let now = note.created_at;
    let mut tx = pool.begin().await?;
    // Held until commit or rollback; see the module's comment.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(openid)
        .execute(&mut *tx)
        .await?;

    // A key past its time is forgotten, purged or not: deleted, and not read (the statement's
    // reads see the rows as they were before it).
    let first: Option<AnswerRow> = sqlx::query_as(
        "WITH expired AS (DELETE FROM note_idempotency \
             WHERE openid = $1 AND key = $2 AND created_at < $3) \
         SELECT fingerprint, note_id, status, response FROM note_idempotency \
         WHERE openid = $1 AND key = $2 AND created_at >= $3",
    )
    .bind(openid)
    .bind(idem.key.as_str())
    .bind(now.saturating_sub(IDEMPOTENCY_TTL_MILLIS))
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((fingerprint, note_id, status, body)) = first {
        tx.commit().await?;
        return Ok(first_answer(
            idem,
            &fingerprint,
            note_id,
            i64::from(status),
            body,
        ));
    }

    // The note and its key's first answer, in one statement (its created_at is now).
    insert_note(
        "WITH note AS (INSERT INTO notes (id, openid, title, body, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6)) \
         INSERT INTO note_idempotency \
         (openid, key, fingerprint, note_id, status, response, created_at) \
         VALUES ($2, $7, $8, $9, $10, $11, $5)",
        openid,
        note,
    )
    .bind(idem.key.as_str())
    .bind(idem.fingerprint.as_bytes().as_slice())
    .bind(&idem.answer.note_id)
    .bind(i32::from(idem.answer.status))
    .bind(&idem.answer.body)
    .execute(&mut *tx)
    .await?;

    tx.commit().await?;
    Ok(Ok(Created::New))
}

/// Most expired idempotency keys one purge statement deletes: each statement stays far
/// within the pool's statement timeout however many expired (after a long stop, say).
pub const PURGE_BATCH: u64 = 10_000;

/// Deletes the idempotency keys answered before `before`, [`PURGE_BATCH`] a statement, until
/// none is left. A failure stops it (logged); expired keys are ignored when read, and the
/// next purge takes them.
async fn purge_expired_keys(pool: sqlx::PgPool, before: Millis) {
    let mut purged = 0;
    loop {
        let done = sqlx::query(
            "DELETE FROM note_idempotency WHERE (openid, key) IN \
             (SELECT openid, key FROM note_idempotency WHERE created_at < $1 LIMIT $2)",
        )
        .bind(before)
        .bind(i64::try_from(PURGE_BATCH).unwrap_or(i64::MAX))
        .execute(&pool)
        .await;
        match done {
            Ok(done) => {
                purged += done.rows_affected();
                if done.rows_affected() < PURGE_BATCH {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, purged, "purging expired idempotency keys failed");
                return;
            }
        }
    }
    tracing::debug!(purged, "expired idempotency keys purged");
}

#[async_trait]
impl NotesStore for PgNotes {
    async fn create(
        &self,
        openid: &str,
        note: &Note,
        idempotent: Option<Idempotent>,
    ) -> Result<Created, ApiError> {
        let pool = self.db.ready_pool()?;
        let now = note.created_at;
        if self.purges.due(now) {
            // Off the request's path: however many keys expired, no creation waits for them.
            tokio::spawn(purge_expired_keys(
                pool.clone(),
                now.saturating_sub(IDEMPOTENCY_TTL_MILLIS),
            ));
        }
        written_by(&self.creations, openid, note, idempotent).await
    }

    async fn list(
        &self,
        openid: &str,
        size: PageSize,
        cursor: Option<Cursor>,
    ) -> Result<Page, ApiError> {
        let pool = self.db.ready_pool()?;
        let below = cursor.map_or(i64::MAX, Cursor::seq);
        let limit = i64::from(size.get());
        // One more than asked: whether it exists says whether there is a next page.
        let mut rows: Vec<Row> = retry_once(|| {
            sqlx::query_as(
                "SELECT seq, id, title, body, created_at, updated_at FROM notes \
                 WHERE openid = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
            )
            .bind(openid)
            .bind(below)
            .bind(limit + 1)
            .fetch_all(pool)
        })
        .await?;
        let size = usize::try_from(limit).unwrap_or(usize::MAX);
        let more = rows.len() > size;
        rows.truncate(size);
        let next = more
            .then(|| rows.last().map(|r| Cursor::after(r.0)))
            .flatten();
        Ok(Page {
            items: rows.into_iter().map(note).collect(),
            next,
        })
    }

    async fn get(&self, openid: &str, id: &NoteId) -> Result<Note, ApiError> {
        let pool = self.db.ready_pool()?;
        let row: Option<Row> = retry_once(|| {
            sqlx::query_as(
                "SELECT seq, id, title, body, created_at, updated_at FROM notes \
                 WHERE openid = $1 AND id = $2",
            )
            .bind(openid)
            .bind(id.as_str())
            .fetch_optional(pool)
        })
        .await?;
        row.map(note).ok_or_else(ApiError::not_found)
    }

    async fn update(
        &self,
        openid: &str,
        id: &NoteId,
        patch: NotePatch,
        now: Millis,
    ) -> Result<Note, ApiError> {
        if patch.is_empty() {
            return self.get(openid, id).await;
        }
        let pool = self.db.ready_pool()?;
        let row: Option<Row> = retry_once(|| {
            sqlx::query_as(
                "UPDATE notes SET title = COALESCE($3, title), body = COALESCE($4, body), \
                 updated_at = GREATEST($5, created_at) WHERE openid = $1 AND id = $2 \
                 RETURNING seq, id, title, body, created_at, updated_at",
            )
            .bind(openid)
            .bind(id.as_str())
            .bind(patch.title.as_ref().map(NoteTitle::as_str))
            .bind(patch.body.as_ref().map(NoteBody::as_str))
            .bind(now)
            .fetch_optional(pool)
        })
        .await?;
        row.map(note).ok_or_else(ApiError::not_found)
    }

    async fn delete(&self, openid: &str, id: &NoteId) -> Result<(), ApiError> {
        let pool = self.db.ready_pool()?;
        let deleted = retry_once(|| {
            sqlx::query("DELETE FROM notes WHERE openid = $1 AND id = $2")
                .bind(openid)
                .bind(id.as_str())
                .execute(pool)
        })
        .await?
        .rows_affected();
        if deleted == 0 {
            return Err(ApiError::not_found());
        }
        Ok(())
    }
}
