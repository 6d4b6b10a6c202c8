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

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::PgPool;

use super::{
    Created, Cursor, IDEMPOTENCY_TTL_MILLIS, Idempotent, Note, NoteBody, NoteId, NotePatch,
    NoteTitle, NotesStore, Page, PageSize, PurgeClock, first_answer,
};
use crate::db::{PgDb, retry_once};
use crate::error::ApiError;
use crate::time::Millis;

/// The PostgreSQL notes store.
#[derive(Debug, Clone)]
pub struct PgNotes {
    db: PgDb,
    /// When expired idempotency keys were last purged; the purge is a statement of its own,
    /// before a creation's transaction, and its failure does not fail the creation.
    purges: Arc<PurgeClock>,
}

impl PgNotes {
    /// Notes on `db` (every call answers 503 until its migrations have run).
    pub fn new(db: PgDb) -> Self {
        Self {
            db,
            purges: Arc::default(),
        }
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

/// One attempt at a creation: the database's verdict, or the answer to give.
async fn create_once(
    pool: &PgPool,
    openid: &str,
    note: &Note,
    idempotent: Option<&Idempotent>,
) -> Result<Result<Created, ApiError>, sqlx::Error> {
    let Some(idem) = idempotent else {
        return create_plain(pool, openid, note).await.map(Ok);
    };
    let now = note.created_at;
    let mut tx = pool.begin().await?;
    // Held until commit or rollback; see the module's comment.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(openid)
        .execute(&mut *tx)
        .await?;

    // A key past its time is forgotten, purged or not.
    sqlx::query(
        "DELETE FROM note_idempotency \
         WHERE openid = $1 AND key = $2 AND created_at < $3",
    )
    .bind(openid)
    .bind(idem.key.as_str())
    .bind(now.saturating_sub(IDEMPOTENCY_TTL_MILLIS))
    .execute(&mut *tx)
    .await?;
    let first: Option<AnswerRow> = sqlx::query_as(
        "SELECT fingerprint, note_id, status, response FROM note_idempotency \
         WHERE openid = $1 AND key = $2",
    )
    .bind(openid)
    .bind(idem.key.as_str())
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

    insert_note(
        "INSERT INTO notes (id, openid, title, body, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
        openid,
        note,
    )
    .execute(&mut *tx)
    .await?;

    sqlx::query(
        "INSERT INTO note_idempotency \
         (openid, key, fingerprint, note_id, status, response, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(openid)
    .bind(idem.key.as_str())
    .bind(idem.fingerprint.as_bytes().as_slice())
    .bind(&idem.answer.note_id)
    .bind(i32::from(idem.answer.status))
    .bind(&idem.answer.body)
    .bind(now)
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
        retry_once(|| create_once(pool, openid, note, idempotent.as_ref())).await?
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
