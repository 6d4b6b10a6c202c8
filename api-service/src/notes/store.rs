//! Notes in SQLite (`migrations/sqlite/0002_notes.sql`).

use std::sync::Arc;

use async_trait::async_trait;
use shared::WriteTurn;
use sqlx::pool::PoolConnection;
use sqlx::{Connection as _, QueryBuilder, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::mpsc;

use super::{
    Created, Cursor, FirstAnswers, IDEMPOTENCY_TTL_MILLIS, Idempotent, Job, Note, NoteBody, NoteId,
    NotePatch, NoteTitle, NotesStore, Page, PageSize, PurgeClock, StoredRow, first_answers,
    plan_creations, shared_error, writer_gone, written_by,
};
use crate::db::{db_error, transient};
use crate::error::ApiError;
use crate::time::Millis;

/// The SQLite notes store.
#[derive(Debug, Clone)]
pub struct SqliteNotes {
    pool: SqlitePool,
    /// The turn to write, shared with the database's other writers in this process.
    turn: WriteTurn,
    /// The creations' queue, to the one task that writes them ([`write_notes`]).
    writer: mpsc::Sender<Job>,
}

impl SqliteNotes {
    /// Notes on `pool`, each write in its `turn`, with the task that writes creations
    /// (call from within a Tokio runtime; the task ends when the last clone of this store
    /// is dropped).
    pub fn new(pool: SqlitePool, turn: WriteTurn) -> Self {
        Self::with_purges(pool, turn, Arc::default())
    }

    /// [`Self::new`], with the clock of the idempotency keys' purges given.
    fn with_purges(pool: SqlitePool, turn: WriteTurn, purges: Arc<PurgeClock>) -> Self {
        let (writer, jobs) = mpsc::channel(QUEUED_CREATIONS);
        tokio::spawn(write_notes(pool.clone(), turn.clone(), purges, jobs));
        Self { pool, turn, writer }
    }
}

/// Most creations committed together.
const BATCH: usize = 64;
/// Most creations waiting for the writer; a request past them waits for room.
const QUEUED_CREATIONS: usize = 1024;

/// Group commit: the creations waiting when a transaction starts are written in it, and
/// each is answered once it is committed (`synchronous=FULL`: on disk), so one fsync serves
/// them all instead of one each, and writers no longer queue on SQLite's lock one by one.
///
/// A creation's own refusal (its key reused with another request) is an answer, not a
/// failure of the batch. If a statement fails, the transaction is rolled back and each
/// creation of the batch is written again in a transaction of its own, so that one bad
/// creation does not fail the others; if beginning or committing fails, every creation of
/// the batch gets that error (none of them was written).
async fn write_notes(
    pool: SqlitePool,
    turn: WriteTurn,
    purges: Arc<PurgeClock>,
    mut jobs: mpsc::Receiver<Job>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    // The writer keeps one connection: SQLite resets a connection's page cache when another
    // one wrote since it last read, so writing each batch on whichever connection the pool
    // hands out re-read the notes' pages every time (seen in perf as reads, page faults and
    // malloc in SQLite's threads). Given back only after a failed BEGIN or COMMIT.
    let mut held = None;
    while jobs.recv_many(&mut batch, BATCH).await > 0 {
        match write_batch(&pool, &turn, &mut held, &purges, &batch).await {
            Ok(answers) => {
                for (job, answer) in batch.drain(..).zip(answers) {
                    // The request may have gone (timed out, disconnected): its note stays.
                    let _gone = job.reply.send(answer);
                }
            }
            Err(Failed::Statement(e)) if batch.len() > 1 => {
                tracing::debug!(error = %e, size = batch.len(), "a batch of notes failed; writing each alone");
                for job in batch.drain(..) {
                    let answer = match write_batch(
                        &pool,
                        &turn,
                        &mut held,
                        &purges,
                        std::slice::from_ref(&job),
                    )
                    .await
                    {
                        Ok(mut answers) => answers.pop().unwrap_or_else(|| Err(writer_gone())),
                        Err(Failed::Statement(e) | Failed::Transaction(e)) => Err(db_error(e)),
                        Err(Failed::NoTurn(e)) => Err(ApiError::unavailable(e)),
                    };
                    let _gone = job.reply.send(answer);
                }
            }
            Err(Failed::Statement(e) | Failed::Transaction(e)) => {
                for job in batch.drain(..) {
                    let _gone = job.reply.send(Err(shared_error(&e)));
                }
            }
            Err(Failed::NoTurn(e)) => {
                for job in batch.drain(..) {
                    let _gone = job
                        .reply
                        .send(Err(ApiError::unavailable(anyhow::anyhow!("{e:#}"))));
                }
            }
        }
    }
}

/// Why a batch was not written.
enum Failed {
    /// A creation's statement failed.
    Statement(sqlx::Error),
    /// Beginning or committing the transaction failed.
    Transaction(sqlx::Error),
    /// The other writes held the database too long.
    NoTurn(anyhow::Error),
}

/// Writes `batch` in one transaction, in its `turn`, on the writer's connection (`held`,
/// taken from `pool` when there is none): each creation's answer, once committed.
async fn write_batch(
    pool: &SqlitePool,
    turn: &WriteTurn,
    held: &mut Option<PoolConnection<Sqlite>>,
    purges: &PurgeClock,
    batch: &[Job],
) -> Result<Vec<Result<Created, ApiError>>, Failed> {
    let _turn = turn.take().await.map_err(Failed::NoTurn)?;
    let conn = match held {
        Some(conn) => conn,
        None => held.insert(pool.acquire().await.map_err(Failed::Transaction)?),
    };
    let purge = batch
        .first()
        .is_some_and(|first| purges.due(first.note.created_at));
    let written = if !purge && batch.iter().all(|job| job.idempotent.is_none()) {
        write_plain_batch(conn, batch).await
    } else {
        write_batch_on(conn, purge, batch).await
    };
    if matches!(written, Err(Failed::Transaction(_))) {
        // Whatever went wrong with the connection, the next batch takes another.
        *held = None;
    }
    written
}

/// A batch of creations without a key in one round trip to SQLite's thread: `BEGIN
/// IMMEDIATE; INSERT …; COMMIT` as one query, where the general path
/// ([`write_batch_on`]) takes three (each a hand-over to sqlx's worker thread and back).
/// A failure may leave the transaction open (the insert or the commit failed) or not (the
/// begin failed, or SQLite rolled back itself), so a `ROLLBACK` follows it either way; its
/// own error is then usually "no transaction is active". Should the connection still be in
/// a transaction after that (the `ROLLBACK` failed and a check says so), it is closed, not
/// given back to the pool, where its open transaction would hold the write lock. Only
/// batches with neither a key nor a purge due take this path.
async fn write_plain_batch(
    conn: &mut PoolConnection<Sqlite>,
    batch: &[Job],
) -> Result<Vec<Result<Created, ApiError>>, Failed> {
    let mut query = QueryBuilder::<Sqlite>::new("BEGIN IMMEDIATE; ");
    push_insert(&mut query, batch.iter());
    query.push("; COMMIT");
    let Err(e) = query.build().execute(&mut **conn).await else {
        return Ok(batch.iter().map(|_| Ok(Created::New)).collect());
    };
    if sqlx::raw_sql("ROLLBACK")
        .execute(&mut **conn)
        .await
        .is_err()
        && in_transaction(conn).await
    {
        conn.close_on_drop();
        return Err(Failed::Transaction(e));
    }
    // Nothing of the batch was written. SQLite busy or locked: every creation gets that
    // answer (503), as when the general path cannot begin; otherwise a creation's own
    // statement may be at fault, and each is tried again alone.
    if transient(&e) {
        Err(Failed::Transaction(e))
    } else {
        Err(Failed::Statement(e))
    }
}

/// Whether `conn` is inside a transaction (a `BEGIN` again fails there); true when that
/// cannot be told.
async fn in_transaction(conn: &mut SqliteConnection) -> bool {
    match sqlx::raw_sql("BEGIN").execute(&mut *conn).await {
        Ok(_) => sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.is_err(),
        Err(_) => true,
    }
}

/// [`write_batch`] on `conn`.
async fn write_batch_on(
    conn: &mut SqliteConnection,
    purge: bool,
    batch: &[Job],
) -> Result<Vec<Result<Created, ApiError>>, Failed> {
    // One writer from here to the commit: a key's lookup, its note and its record are one
    // atomic step, and retries of one key (even in one batch) are serialized.
    let mut tx = conn
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(Failed::Transaction)?;
    if let Some(first) = batch.first().filter(|_| purge) {
        purge_expired(&mut tx, first.note.created_at)
            .await
            .map_err(Failed::Statement)?;
    }
    let keyed: Vec<(&Job, &Idempotent)> = batch
        .iter()
        .filter_map(|job| job.idempotent.as_ref().map(|idem| (job, idem)))
        .collect();
    let first = if keyed.is_empty() {
        FirstAnswers::default()
    } else {
        // The keys' first answers, then those expired for a creation of the batch deleted,
        // in one round trip; each creation reads only what is not past its own time. Both
        // statements go from the keys asked to the table's primary key (`CROSS JOIN` keeps
        // that order; a `WHERE EXISTS` on the table scanned all of it).
        let mut query = QueryBuilder::<Sqlite>::new("WITH asked(openid, key, since) AS (");
        push_asked(&mut query, &keyed);
        query.push(
            ") SELECT DISTINCT i.openid, i.key, i.fingerprint, i.note_id, i.status, \
               i.response, i.created_at \
             FROM asked a CROSS JOIN note_idempotency i \
               ON i.openid = a.openid AND i.key = a.key \
             WHERE i.created_at >= a.since; \
             WITH asked(openid, key, since) AS (",
        );
        push_asked(&mut query, &keyed);
        query.push(
            ") DELETE FROM note_idempotency \
             WHERE (openid, key) IN (SELECT openid, key FROM asked) \
               AND created_at < (SELECT max(since) FROM asked a \
                 WHERE a.openid = note_idempotency.openid AND a.key = note_idempotency.key)",
        );
        let stored: Vec<StoredRow<i64>> = query
            .build_query_as()
            .fetch_all(&mut *tx)
            .await
            .map_err(Failed::Statement)?;
        first_answers(stored)
    };
    // The notes and the new keys' first answers, in one round trip.
    let (answers, written) = plan_creations(batch, first);
    if !written.is_empty() {
        let mut query = QueryBuilder::<Sqlite>::new("");
        push_insert(&mut query, written.iter().copied());
        let keys: Vec<(&Job, &Idempotent)> = written
            .iter()
            .filter_map(|job| job.idempotent.as_ref().map(|idem| (*job, idem)))
            .collect();
        if !keys.is_empty() {
            query.push(
                "; INSERT INTO note_idempotency \
                 (openid, key, fingerprint, note_id, status, response, created_at) ",
            );
            query.push_values(keys, |mut row, (job, idem)| {
                row.push_bind(job.openid.as_str())
                    .push_bind(idem.key.as_str())
                    .push_bind(idem.fingerprint.as_bytes().as_slice())
                    .push_bind(idem.answer.note_id.as_str())
                    .push_bind(i64::from(idem.answer.status))
                    .push_bind(idem.answer.body.as_slice())
                    .push_bind(job.note.created_at);
            });
        }
        query
            .build()
            .execute(&mut *tx)
            .await
            .map_err(Failed::Statement)?;
    }
    tx.commit().await.map_err(Failed::Transaction)?;
    Ok(answers)
}

/// Appends `VALUES` of the keyed creations' (openid, key, the oldest a first answer may be).
fn push_asked(query: &mut QueryBuilder<Sqlite>, keyed: &[(&Job, &Idempotent)]) {
    query.push_values(keyed, |mut row, (job, idem)| {
        row.push_bind(job.openid.as_str())
            .push_bind(idem.key.as_str())
            .push_bind(job.note.created_at.saturating_sub(IDEMPOTENCY_TTL_MILLIS));
    });
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

/// Purges the idempotency keys expired at `now` (once per period: [`PurgeClock`]).
async fn purge_expired(conn: &mut SqliteConnection, now: Millis) -> Result<(), sqlx::Error> {
    let purged = sqlx::query("DELETE FROM note_idempotency WHERE created_at < $1")
        .bind(now.saturating_sub(IDEMPOTENCY_TTL_MILLIS))
        .execute(&mut *conn)
        .await?
        .rows_affected();
    tracing::debug!(purged, "expired idempotency keys purged");
    Ok(())
}

/// Appends the one `INSERT` of `jobs`' notes to `query`.
fn push_insert<'a>(query: &mut QueryBuilder<Sqlite>, jobs: impl Iterator<Item = &'a Job>) {
    query.push("INSERT INTO notes (id, openid, title, body, created_at, updated_at) ");
    query.push_values(jobs, |mut row, job| {
        row.push_bind(job.note.id.as_str())
            .push_bind(job.openid.as_str())
            .push_bind(job.note.title.as_str())
            .push_bind(job.note.body.as_str())
            .push_bind(job.note.created_at)
            .push_bind(job.note.updated_at);
    });
}

#[async_trait]
impl NotesStore for SqliteNotes {
    async fn create(
        &self,
        openid: &str,
        note: &Note,
        idempotent: Option<Idempotent>,
    ) -> Result<Created, ApiError> {
        written_by(&self.writer, openid, note, idempotent).await
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
        let _turn = self.turn.take().await.map_err(ApiError::unavailable)?;
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
        let _turn = self.turn.take().await.map_err(ApiError::unavailable)?;
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
    use tokio::sync::oneshot;

    use super::super::{IdempotencyKey, PURGE_EVERY_MILLIS, RequestFingerprint, StoredAnswer};
    use super::*;

    /// A store on an SQLite file of its own (the writer keeps one connection, so the
    /// database must take several, as the service's does), removed when dropped.
    struct TestStore {
        notes: SqliteNotes,
        _dir: tempfile::TempDir,
    }

    impl std::ops::Deref for TestStore {
        type Target = SqliteNotes;

        fn deref(&self) -> &SqliteNotes {
            &self.notes
        }
    }

    async fn store() -> TestStore {
        store_waiting(std::time::Duration::from_secs(5)).await
    }

    /// [`store`], whose connections wait `busy` for SQLite's write lock.
    async fn store_waiting(busy: std::time::Duration) -> TestStore {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.path().join("notes.db"))
            .create_if_missing(true)
            .busy_timeout(busy)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("an SQLite file");
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .expect("migrations");
        TestStore {
            notes: SqliteNotes::new(pool, WriteTurn::default()),
            _dir: dir,
        }
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

    /// Starts every creation before any is written: on the test's one thread, the writer
    /// runs only once all of them wait, so they are one batch.
    async fn create_together(
        s: &SqliteNotes,
        creations: Vec<(&'static str, Note, Option<Idempotent>)>,
    ) -> Vec<Result<Created, ApiError>> {
        let tasks: Vec<_> = creations
            .into_iter()
            .map(|(openid, note, idem)| {
                let s = s.clone();
                tokio::spawn(async move { s.create(openid, &note, idem).await })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.expect("joined"));
        }
        answers
    }

    #[tokio::test]
    async fn creations_written_together_each_get_their_own_answer() {
        // Arrange: a key already used by alice.
        let s = store().await;
        let first = new_note("first", 1_000);
        s.create("alice", &first, Some(idempotent("k", &first)))
            .await
            .expect("create");
        let reuse = new_note("another request", 2_000);
        let twice = new_note("twice", 2_000);
        let twice_again = Note::new(twice.title.clone(), twice.body.clone(), 2_001);

        // Act: one batch with new notes, a reused key, and one key sent twice.
        let answers = create_together(
            &s,
            vec![
                ("alice", new_note("a", 2_000), None),
                ("alice", reuse.clone(), Some(idempotent("k", &reuse))),
                ("bob", twice.clone(), Some(idempotent("t", &twice))),
                (
                    "bob",
                    twice_again.clone(),
                    Some(idempotent("t", &twice_again)),
                ),
                ("bob", new_note("b", 2_000), None),
            ],
        )
        .await;

        // Assert: the refusal is its own; the second use of a key replays the first, which
        // was written in the same transaction.
        assert_eq!(answers[0].as_ref().expect("a"), &Created::New);
        assert_eq!(
            answers[1].as_ref().expect_err("reused").code(),
            "idempotency_key_reused"
        );
        assert_eq!(answers[2].as_ref().expect("twice"), &Created::New);
        let Ok(Created::Replayed(replayed)) = &answers[3] else {
            panic!("the second use of a key must replay: {:?}", answers[3]);
        };
        assert_eq!(replayed.note_id, twice.id.as_str());
        assert_eq!(answers[4].as_ref().expect("b"), &Created::New);
        let size = PageSize::parse(None).expect("size");
        assert_eq!(
            s.list("alice", size, None).await.expect("list").items.len(),
            2
        );
        assert_eq!(
            s.list("bob", size, None).await.expect("list").items.len(),
            2
        );
    }

    #[tokio::test]
    async fn a_creation_whose_statement_fails_does_not_fail_the_others_of_its_batch() {
        // Arrange: two creations with one note id, which the primary key refuses.
        let s = store().await;
        let one = new_note("one", 1_000);
        let mut clash = new_note("clash", 1_000);
        clash.id = one.id.clone();

        // Act
        let answers = create_together(
            &s,
            vec![
                ("alice", one.clone(), None),
                ("alice", clash, None),
                ("bob", new_note("b", 1_000), None),
            ],
        )
        .await;

        // Assert: written again one by one, only the clash fails.
        assert_eq!(answers[0].as_ref().expect("one"), &Created::New);
        assert_eq!(
            answers[1].as_ref().expect_err("the clash").code(),
            "internal"
        );
        assert_eq!(answers[2].as_ref().expect("b"), &Created::New);
        assert_eq!(
            s.get("alice", &one.id).await.expect("kept").title,
            one.title
        );
        let size = PageSize::parse(None).expect("size");
        assert_eq!(
            s.list("bob", size, None).await.expect("list").items.len(),
            1
        );
        // The writer's connection came out of the failed batch with no transaction open.
        next_creation_commits(&s, 2).await;
    }

    /// A creation for alice commits, and a reader on another connection then sees her
    /// `notes` notes.
    async fn next_creation_commits(s: &SqliteNotes, notes: usize) {
        let after = new_note("after", 2_000);
        assert_eq!(
            s.create("alice", &after, None).await.expect("after"),
            Created::New
        );
        let size = PageSize::parse(None).expect("size");
        assert_eq!(
            s.list("alice", size, None).await.expect("list").items.len(),
            notes
        );
    }

    /// Not a deadline on the behaviour: only how long a test waits before it calls a hang one.
    const HANG: std::time::Duration = std::time::Duration::from_secs(60);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_waiting_for_their_turn_leave_reads_answering() {
        // Arrange: a write in progress, in its turn, holding SQLite's lock.
        let s = store().await;
        let n = new_note("first", 1_000);
        s.create("alice", &n, None).await.expect("create");
        let turn = s.turn.take().await.expect("the turn");
        let mut writing = s.pool.acquire().await.expect("a connection");
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut *writing)
            .await
            .expect("the lock");

        // Act: more changes than the pool has connections wait behind it, each started
        // (polled once, so waiting on what it waits for) before the read.
        let mut started = Vec::new();
        let changes: Vec<_> = (0..8)
            .map(|i| {
                let notes = s.notes.clone();
                let id = n.id.clone();
                let (polled, start) = oneshot::channel();
                started.push(start);
                tokio::spawn(async move {
                    let patch = NotePatch {
                        title: Some(NoteTitle::parse(&format!("change {i}")).expect("title")),
                        body: None,
                    };
                    shared::saying_when_polled(notes.update("alice", &id, patch, 2_000 + i), polled)
                        .await
                })
            })
            .collect();
        for start in started {
            tokio::time::timeout(HANG, start)
                .await
                .expect("hang guard: a change never started")
                .expect("the change's task ran");
        }

        // Assert: a change waiting for its turn holds no connection, so a read gets one
        // (waiting in SQLite's busy handler, they held them all); it answers while every
        // change still waits, and the turn is still held.
        let read = tokio::time::timeout(HANG, s.get("alice", &n.id))
            .await
            .expect("hang guard: a read starved by changes waiting behind a write");
        assert_eq!(read.expect("get").title.as_str(), "first");
        assert!(
            changes.iter().all(|c| !c.is_finished()),
            "a change ended before the write did: the read waited for it"
        );

        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *writing)
            .await
            .expect("unlock");
        drop(writing);
        drop(turn);
        for change in changes {
            change
                .await
                .expect("join")
                .expect("a change after the write ended");
        }
    }

    #[tokio::test]
    async fn a_batch_that_cannot_take_the_write_lock_is_answered_unavailable_and_the_writer_recovers()
     {
        // Arrange: another connection holds SQLite's write lock.
        let s = store_waiting(std::time::Duration::from_millis(50)).await;
        let mut blocker = s.pool.acquire().await.expect("a connection");
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(&mut *blocker)
            .await
            .expect("the lock");

        // Act
        let answers = create_together(
            &s,
            vec![
                ("alice", new_note("a", 1_000), None),
                ("alice", new_note("b", 1_000), None),
                ("bob", new_note("c", 1_000), None),
            ],
        )
        .await;
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *blocker)
            .await
            .expect("unlock");
        drop(blocker);

        // Assert: each is told to come back (503); nothing was written; the next creation
        // commits.
        for answer in &answers {
            assert_eq!(answer.as_ref().expect_err("busy").code(), "unavailable");
        }
        let size = PageSize::parse(None).expect("size");
        assert!(
            s.list("alice", size, None)
                .await
                .expect("list")
                .items
                .is_empty()
        );
        next_creation_commits(&s, 1).await;
    }

    #[tokio::test]
    async fn a_connection_in_a_transaction_is_told_apart() {
        let s = store().await;
        let mut conn = s.pool.acquire().await.expect("a connection");
        assert!(!in_transaction(&mut conn).await);
        sqlx::raw_sql("BEGIN")
            .execute(&mut *conn)
            .await
            .expect("begin");
        assert!(in_transaction(&mut conn).await);
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut *conn)
            .await
            .expect("rollback");
        assert!(!in_transaction(&mut conn).await);
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
        let purges = Arc::new(PurgeClock::default());
        let base = store().await;
        let s = SqliteNotes::with_purges(base.pool.clone(), base.turn.clone(), purges.clone());
        let old = new_note("old", 1_000);
        s.create("alice", &old, Some(idempotent("old", &old)))
            .await
            .expect("old");
        // Let the next creation purge, as the first one after a restart would.
        purges.last.store(0, Ordering::Relaxed);
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
