//! Notes in PostgreSQL (`migrations/postgres/0002_notes.sql`), with the same semantics as the
//! SQLite store next door.
//!
//! PostgreSQL runs writers side by side, so two things SQLite's single writer gives for free
//! are made explicit here. A user's creations take a transaction-scoped advisory lock keyed by
//! the openid: (1) their `seq` numbers are then drawn and committed in the same order, so a
//! keyset page never skips a note that committed late under a smaller number; (2) concurrent
//! retries of one `Idempotency-Key` are serialized, the first makes the note and the others
//! find its answer. Other users are never blocked. The transactions run at READ COMMITTED
//! (the default) on purpose: each statement after the lock sees what the previous holder
//! committed, which a snapshot taken before the wait (REPEATABLE READ) would not.
//!
//! Creations without an `Idempotency-Key` are written together: see [`write_plain`].

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::PgPool;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{
    Created, Cursor, IDEMPOTENCY_TTL_MILLIS, Idempotent, Note, NoteBody, NoteId, NotePatch,
    NoteTitle, NotesStore, Page, PageSize, PurgeClock, first_answer, shared_error, writer_gone,
};
use crate::db::{PgDb, is_retryable, retry_once, transient};
use crate::error::ApiError;
use crate::time::Millis;

/// The PostgreSQL notes store.
#[derive(Debug, Clone)]
pub struct PgNotes {
    db: PgDb,
    /// When expired idempotency keys were last purged; the purge is a statement of its own,
    /// before a creation's transaction, and its failure does not fail the creation.
    purges: Arc<PurgeClock>,
    /// The queue of creations without a key, to the tasks that write them ([`write_plain`]).
    plain: mpsc::Sender<Plain>,
}

/// Tasks writing creations without a key; each has at most one statement in flight, on
/// one of the pool's [`crate::db`] connections (10), the others left to reads and keyed
/// creations. More than one, so that a statement waiting for a user's lock (held by that
/// user's keyed creation, or by another replica's statement) leaves other users' creations
/// going.
pub const PLAIN_WRITERS: usize = 4;
/// Most creations one statement writes.
const BATCH: usize = 64;
/// Most creations waiting for a writer; a request past them waits for room.
const QUEUED_CREATIONS: usize = 1024;

/// A creation without a key, waiting to be written.
struct Plain {
    openid: String,
    note: Note,
    reply: oneshot::Sender<Result<Created, ApiError>>,
}

impl PgNotes {
    /// Notes on `db` (every call answers 503 until its migrations have run), with the tasks
    /// that write creations without a key (call from within a Tokio runtime; they end when
    /// the last clone of this store is dropped).
    pub fn new(db: PgDb) -> Self {
        let (plain, queued) = mpsc::channel(QUEUED_CREATIONS);
        let queued = Arc::new(Mutex::new(queued));
        for _ in 0..PLAIN_WRITERS {
            tokio::spawn(write_plain(db.clone(), Arc::clone(&queued)));
        }
        Self {
            db,
            purges: Arc::default(),
            plain,
        }
    }
}

/// Writes the creations without a key, as one of [`PLAIN_WRITERS`] tasks: it takes what is
/// queued (at most [`BATCH`]) and writes it in one statement, so that under load one round
/// trip, one statement and one commit serve many creations; a creation that comes alone is
/// written at once, since a writer is free. A batch that fails for a reason that may be
/// one creation's own (not a lost connection or an overloaded server, which would fail
/// them all alike) is written again creation by creation, so that one bad creation does not
/// fail the others. Creations whose request is gone (timed out, client left) before their
/// batch is taken are not written, as when a single statement is cancelled.
async fn write_plain(db: PgDb, queued: Arc<Mutex<mpsc::Receiver<Plain>>>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        // The lock is held while waiting: the other writers wait for this one to have
        // taken its batch, then the next of them waits for creations.
        if queued.lock().await.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        batch.retain(|job: &Plain| !job.reply.is_closed());
        let answers = write_plain_batch(&db, &batch).await;
        for (job, answer) in batch.drain(..).zip(answers) {
            let _gone = job.reply.send(answer);
        }
    }
}

/// `batch`'s answers, in its order.
async fn write_plain_batch(db: &PgDb, batch: &[Plain]) -> Vec<Result<Created, ApiError>> {
    if let ([_, _, ..], Ok(pool)) = (batch, db.ready_pool()) {
        match insert_plain(pool, batch).await {
            Ok(()) => return batch.iter().map(|_| Ok(Created::New)).collect(),
            // Nothing was written (the server said so); maybe one creation's fault.
            Err(e) if is_retryable(&e) || !transient(&e) => {
                tracing::debug!(error = %e, size = batch.len(), "a batch of notes failed; writing each alone");
            }
            Err(e) => return batch.iter().map(|_| Err(shared_error(&e))).collect(),
        }
    }
    let mut answers = Vec::with_capacity(batch.len());
    for job in batch {
        answers.push(create_alone(db, &job.openid, &job.note).await);
    }
    answers
}

/// One creation without a key, in a statement of its own.
async fn create_alone(db: &PgDb, openid: &str, note: &Note) -> Result<Created, ApiError> {
    let pool = db.ready_pool()?;
    retry_once(|| create_plain(pool, openid, note)).await
}

/// Several creations without a key in one statement, so one transaction. Every user's
/// advisory lock is taken before any row, and with it any `seq`, is made, as in
/// [`create_plain`]: the aggregate reads all the locks before its one row is joined, and a
/// subquery that calls a volatile function is not merged into the outer query. The locks
/// are taken in the order of their keys, so two such statements (other writers, other
/// replicas) never wait for each other in a cycle; a keyed creation holds one lock only.
/// Rows are inserted in the batch's order (`WITH ORDINALITY`), so one user's creations
/// in one batch get their numbers in the order they came.
async fn insert_plain(pool: &PgPool, batch: &[Plain]) -> Result<(), sqlx::Error> {
    let mut ids = Vec::with_capacity(batch.len());
    let mut openids = Vec::with_capacity(batch.len());
    let mut titles = Vec::with_capacity(batch.len());
    let mut bodies = Vec::with_capacity(batch.len());
    let mut created = Vec::with_capacity(batch.len());
    let mut updated = Vec::with_capacity(batch.len());
    for job in batch {
        ids.push(job.note.id.as_str());
        openids.push(job.openid.as_str());
        titles.push(job.note.title.as_str());
        bodies.push(job.note.body.as_str());
        created.push(job.note.created_at);
        updated.push(job.note.updated_at);
    }
    sqlx::query(
        "INSERT INTO notes (id, openid, title, body, created_at, updated_at) \
         SELECT n.id, n.openid, n.title, n.body, n.created_at, n.updated_at \
         FROM (SELECT count(*) FROM (SELECT pg_advisory_xact_lock(k) FROM \
                 (SELECT DISTINCT hashtextextended(o, 0) AS k FROM unnest($2::text[]) AS o \
                  ORDER BY k) AS keys) AS held) AS locked, \
              unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[]) \
                 WITH ORDINALITY AS n(id, openid, title, body, created_at, updated_at, i) \
         ORDER BY n.i",
    )
    .bind(ids)
    .bind(openids)
    .bind(titles)
    .bind(bodies)
    .bind(created)
    .bind(updated)
    .execute(pool)
    .await?;
    Ok(())
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
            match sqlx::query("DELETE FROM note_idempotency WHERE created_at < $1")
                .bind(now.saturating_sub(IDEMPOTENCY_TTL_MILLIS))
                .execute(pool)
                .await
            {
                Ok(done) => {
                    tracing::debug!(
                        purged = done.rows_affected(),
                        "expired idempotency keys purged"
                    );
                }
                // Expired keys are ignored when read; the next purge takes them.
                Err(e) => tracing::warn!(error = %e, "purging expired idempotency keys failed"),
            }
        }
        if let Some(idem) = &idempotent {
            return retry_once(|| create_keyed(pool, openid, note, idem)).await?;
        }
        let (reply, answer) = oneshot::channel();
        let job = Plain {
            openid: openid.to_owned(),
            note: note.clone(),
            reply,
        };
        self.plain.send(job).await.map_err(|_| writer_gone())?;
        answer.await.unwrap_or_else(|_| Err(writer_gone()))
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
