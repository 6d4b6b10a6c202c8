//! Notes in SQLite (`migrations/sqlite/0002_notes.sql`).

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::SqlitePool;

use super::{
    Created, Cursor, IDEMPOTENCY_TTL_MILLIS, Idempotent, Note, NoteBody, NoteId, NotePatch,
    NoteTitle, NotesStore, Page, PageSize, PurgeClock, RequestFingerprint, StoredAnswer,
    key_reused,
};
use crate::db::db_error;
use crate::error::ApiError;
use crate::time::Millis;

/// The SQLite notes store.
#[derive(Debug, Clone)]
pub struct SqliteNotes {
    pool: SqlitePool,
    /// When expired idempotency keys were last purged; the purge runs inside a creation's
    /// own transaction.
    purges: Arc<PurgeClock>,
}

impl SqliteNotes {
    /// Notes on `pool`.
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
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

type AnswerRow = (Vec<u8>, String, i64, Vec<u8>);

#[async_trait]
impl NotesStore for SqliteNotes {
    async fn create(
        &self,
        openid: &str,
        note: &Note,
        idempotent: Option<Idempotent>,
    ) -> Result<Created, ApiError> {
        let now = note.created_at;
        let expired_before = now.saturating_sub(IDEMPOTENCY_TTL_MILLIS);
        // One writer from here to the commit: the key's lookup, the note and the key's record
        // are one atomic step, and concurrent retries of one key are serialized.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_error)?;

        if self.purges.due(now) {
            let purged = sqlx::query("DELETE FROM note_idempotency WHERE created_at < $1")
                .bind(expired_before)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?
                .rows_affected();
            tracing::debug!(purged, "expired idempotency keys purged");
        }

        if let Some(idem) = &idempotent {
            // A key past its time is forgotten, purged or not.
            sqlx::query(
                "DELETE FROM note_idempotency \
                 WHERE openid = $1 AND key = $2 AND created_at < $3",
            )
            .bind(openid)
            .bind(idem.key.as_str())
            .bind(expired_before)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
            let first: Option<AnswerRow> = sqlx::query_as(
                "SELECT fingerprint, note_id, status, response FROM note_idempotency \
                 WHERE openid = $1 AND key = $2",
            )
            .bind(openid)
            .bind(idem.key.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
            if let Some((fingerprint, note_id, status, body)) = first {
                tx.commit().await.map_err(db_error)?;
                let same = <[u8; 32]>::try_from(fingerprint.as_slice())
                    .is_ok_and(|f| RequestFingerprint::from_bytes(f) == idem.fingerprint);
                if !same {
                    return Err(key_reused());
                }
                let status = u16::try_from(status).map_err(|_| {
                    ApiError::internal(anyhow::anyhow!(
                        "stored idempotent answer has status {status}"
                    ))
                })?;
                return Ok(Created::Replayed(StoredAnswer {
                    status,
                    note_id,
                    body,
                }));
            }
        }

        sqlx::query(
            "INSERT INTO notes (id, openid, title, body, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(note.id.as_str())
        .bind(openid)
        .bind(note.title.as_str())
        .bind(note.body.as_str())
        .bind(note.created_at)
        .bind(note.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;

        if let Some(idem) = idempotent {
            sqlx::query(
                "INSERT INTO note_idempotency \
                 (openid, key, fingerprint, note_id, status, response, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(openid)
            .bind(idem.key.as_str())
            .bind(idem.fingerprint.as_bytes().as_slice())
            .bind(&idem.answer.note_id)
            .bind(i64::from(idem.answer.status))
            .bind(&idem.answer.body)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }

        tx.commit().await.map_err(db_error)?;
        Ok(Created::New)
    }

    async fn list(
        &self,
        openid: &str,
        size: PageSize,
        cursor: Option<Cursor>,
    ) -> Result<Page, ApiError> {
        let below = cursor.map_or(i64::MAX, Cursor::seq);
        let limit = i64::from(size.get());
        // One more than asked: whether it exists says whether there is a next page.
        // `CAST($3 …)`, not a bare `LIMIT $3`: SQLite marks a statement whose LIMIT is a bare
        // parameter for re-preparation whenever that parameter is bound, so the cached
        // statement would be parsed and planned again on every page. The plan is the same.
        let mut rows: Vec<Row> = sqlx::query_as(
            "SELECT seq, id, title, body, created_at, updated_at FROM notes \
             WHERE openid = $1 AND seq < $2 ORDER BY seq DESC LIMIT CAST($3 AS INTEGER)",
        )
        .bind(openid)
        .bind(below)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?;
        let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
        rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let next = more
            .then(|| rows.last().map(|r| Cursor::after(r.0)))
            .flatten();
        Ok(Page {
            items: rows.into_iter().map(note).collect(),
            next,
        })
    }

    async fn get(&self, openid: &str, id: &NoteId) -> Result<Note, ApiError> {
        let row: Option<Row> = sqlx::query_as(
            "SELECT seq, id, title, body, created_at, updated_at FROM notes \
             WHERE openid = $1 AND id = $2",
        )
        .bind(openid)
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
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
        let row: Option<Row> = sqlx::query_as(
            "UPDATE notes SET title = COALESCE($3, title), body = COALESCE($4, body), \
             updated_at = MAX($5, created_at) WHERE openid = $1 AND id = $2 \
             RETURNING seq, id, title, body, created_at, updated_at",
        )
        .bind(openid)
        .bind(id.as_str())
        .bind(patch.title.as_ref().map(NoteTitle::as_str))
        .bind(patch.body.as_ref().map(NoteBody::as_str))
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?;
        row.map(note).ok_or_else(ApiError::not_found)
    }

    async fn delete(&self, openid: &str, id: &NoteId) -> Result<(), ApiError> {
        let deleted = sqlx::query("DELETE FROM notes WHERE openid = $1 AND id = $2")
            .bind(openid)
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .map_err(db_error)?
            .rows_affected();
        if deleted == 0 {
            return Err(ApiError::not_found());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use sqlx::sqlite::SqlitePoolOptions;

    use super::super::{IdempotencyKey, PURGE_EVERY_MILLIS};
    use super::*;

    async fn store() -> SqliteNotes {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .expect("in-memory sqlite");
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .expect("migrations");
        SqliteNotes::new(pool)
    }

    fn new_note(title: &str, at: Millis) -> Note {
        Note::new(
            NoteTitle::parse(title).expect("title"),
            NoteBody::parse("body").expect("body"),
            at,
        )
    }

    fn idempotent(key: &str, note: &Note) -> Idempotent {
        Idempotent {
            key: IdempotencyKey::parse(key.as_bytes()).expect("key"),
            fingerprint: RequestFingerprint::of_create(&note.title, &note.body),
            answer: StoredAnswer {
                status: 201,
                note_id: note.id.as_str().to_owned(),
                body: note.id.as_str().as_bytes().to_vec(),
            },
        }
    }

    #[tokio::test]
    async fn notes_are_scoped_to_their_owner() {
        let s = store().await;
        let n = new_note("mine", 1_000);
        s.create("alice", &n, None).await.expect("create");

        assert_eq!(s.get("alice", &n.id).await.expect("get"), n);
        let patch = NotePatch {
            title: Some(NoteTitle::parse("stolen").expect("title")),
            body: None,
        };
        for e in [
            s.get("bob", &n.id).await.expect_err("get"),
            s.update("bob", &n.id, patch.clone(), 2_000)
                .await
                .expect_err("update"),
            s.delete("bob", &n.id).await.expect_err("delete"),
        ] {
            assert_eq!(e.code(), "not_found");
        }
        let page = s
            .list("bob", PageSize::parse(None).expect("size"), None)
            .await
            .expect("list");
        assert!(page.items.is_empty() && page.next.is_none());

        let changed = s.update("alice", &n.id, patch, 2_000).await.expect("patch");
        assert_eq!(changed.title.as_str(), "stolen");
        assert_eq!(changed.body.as_str(), "body");
        assert_eq!((changed.created_at, changed.updated_at), (1_000, 2_000));
        s.delete("alice", &n.id).await.expect("delete");
        assert_eq!(
            s.get("alice", &n.id).await.expect_err("gone").code(),
            "not_found"
        );
    }

    #[tokio::test]
    async fn pages_run_newest_first_and_end_without_a_cursor() {
        let s = store().await;
        for i in 0..5 {
            s.create("alice", &new_note(&format!("n{i}"), 1_000), None)
                .await
                .expect("create");
        }
        let two = PageSize::parse(Some("2")).expect("size");
        let mut titles = Vec::new();
        let mut cursor = None;
        let mut pages = 0;
        loop {
            let page = s.list("alice", two, cursor).await.expect("list");
            pages += 1;
            titles.extend(page.items.iter().map(|n| n.title.as_str().to_owned()));
            match page.next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(titles, ["n4", "n3", "n2", "n1", "n0"]);
    }

    #[tokio::test]
    async fn a_key_replays_its_first_answer_refuses_another_request_and_expires() {
        let s = store().await;
        let first = new_note("first", 1_000);
        assert_eq!(
            s.create("alice", &first, Some(idempotent("k", &first)))
                .await
                .expect("create"),
            Created::New
        );

        // The same request again: the first answer, no second note.
        let retry = Note::new(first.title.clone(), first.body.clone(), 2_000);
        let Created::Replayed(answer) = s
            .create("alice", &retry, Some(idempotent("k", &retry)))
            .await
            .expect("retry")
        else {
            panic!("a retry must replay");
        };
        assert_eq!(answer.note_id, first.id.as_str());
        assert_eq!(answer.body, first.id.as_str().as_bytes());
        assert_eq!(answer.status, 201);
        let size = PageSize::parse(None).expect("size");
        assert_eq!(
            s.list("alice", size, None).await.expect("list").items.len(),
            1
        );

        // Another request under the same key.
        let other = new_note("other", 3_000);
        let e = s
            .create("alice", &other, Some(idempotent("k", &other)))
            .await
            .expect_err("reused");
        assert_eq!(
            (e.status().as_u16(), e.code()),
            (422, "idempotency_key_reused")
        );

        // Another user's key of the same name is theirs.
        let bobs = new_note("first", 3_000);
        assert_eq!(
            s.create("bob", &bobs, Some(idempotent("k", &bobs)))
                .await
                .expect("bob"),
            Created::New
        );

        // Past 48 hours the key is forgotten: the same request makes a new note.
        let later = Note::new(
            first.title.clone(),
            first.body.clone(),
            1_000 + IDEMPOTENCY_TTL_MILLIS + 1,
        );
        assert_eq!(
            s.create("alice", &later, Some(idempotent("k", &later)))
                .await
                .expect("after expiry"),
            Created::New
        );
        assert_eq!(
            s.list("alice", size, None).await.expect("list").items.len(),
            2
        );
    }

    #[tokio::test]
    async fn expired_keys_are_purged() {
        let s = store().await;
        let old = new_note("old", 1_000);
        s.create("alice", &old, Some(idempotent("old", &old)))
            .await
            .expect("old");
        // Let the next creation purge, as the first one after a restart would.
        s.purges.last.store(0, Ordering::Relaxed);
        let now = 1_000 + IDEMPOTENCY_TTL_MILLIS + PURGE_EVERY_MILLIS;
        s.create("bob", &new_note("new", now), None)
            .await
            .expect("new");
        let (left,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM note_idempotency")
            .fetch_one(&s.pool)
            .await
            .expect("count");
        assert_eq!(left, 0);
    }
}
