//! What only the PostgreSQL backend has: migrations in the background (the edge starts while
//! PostgreSQL is missing, answers 503 until migrated, replicas migrate together safely),
//! errors sorted by SQLSTATE with one retry of aborted transactions, the statement timeout,
//! and the per-user lock that orders a user's creations.

use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Waker};
use std::time::Duration;

use api_service::db::{Db, PgDb, db_error, retry_once};
use api_service::error::ApiError;
use api_service::notes::{
    Created, IDEMPOTENCY_TTL_MILLIS, Idempotent, Note, NotesStore as _, PG_CREATION_WRITERS,
    PG_PURGE_BATCH, PgNotes,
};
use api_service::profile::{PgProfiles, ProfileStore as _};
use axum::http::header;
use axum::response::IntoResponse as _;

use crate::support::{
    self, create_database, fresh_database, idempotent, migrated, new_note, open_postgres,
    postgres_admin, size, titles,
};

fn pg(db: &Db) -> &PgDb {
    match db {
        Db::Postgres(pg) => pg,
        Db::Sqlite(..) => panic!("a postgres:// URL must open PostgreSQL"),
    }
}

fn unavailable_with_retry_after(e: ApiError) {
    assert_eq!((e.status().as_u16(), e.code()), (503, "unavailable"));
    let response = e.into_response();
    assert!(response.headers().contains_key(header::RETRY_AFTER));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_wait_for_the_database_and_the_stores_answer_503_until_then() {
    const TEST: &str =
        "postgres::migrations_wait_for_the_database_and_the_stores_answer_503_until_then";
    let Some(admin) = postgres_admin(TEST) else {
        return;
    };
    // Arrange: a URL whose database does not exist yet, as when PostgreSQL is still coming up.
    let (name, url) = fresh_database(&admin);
    let db = open_postgres(&url).await;
    let notes = PgNotes::new(pg(&db).clone());
    let profiles = PgProfiles::new(pg(&db).clone());

    // Assert: not ready, and every store call is a 503 to retry.
    assert!(!db.ping().await);
    unavailable_with_retry_after(notes.list("alice", size(20), None).await.expect_err("list"));
    unavailable_with_retry_after(
        notes
            .create("alice", &new_note("early", 1_000), None)
            .await
            .expect_err("create"),
    );
    unavailable_with_retry_after(profiles.get_or_create("alice").await.expect_err("profile"));

    // Act: the database appears; the background task migrates it.
    create_database(TEST, &admin, &name).await;
    migrated(pg(&db)).await;

    // Assert: ready, and the stores work.
    assert!(db.ping().await);
    assert_eq!(
        notes
            .create("alice", &new_note("late", 1_000), None)
            .await
            .expect("create"),
        Created::New
    );
    assert_eq!(titles(&notes, "alice", 20).await, ["late"]);
    profiles.get_or_create("alice").await.expect("profile");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_migrate_once() {
    const TEST: &str = "postgres::replicas_starting_together_migrate_once";
    let Some(url) = support::postgres_database(TEST).await else {
        return;
    };

    // Act: four replicas start at once on one empty database.
    let mut replicas = Vec::new();
    for _ in 0..4 {
        replicas.push(open_postgres(&url).await);
    }
    for db in &replicas {
        migrated(pg(db)).await;
    }

    // Assert: all ready, each migration applied once.
    for db in &replicas {
        assert!(db.ping().await);
    }
    let (applied, succeeded): (i64, bool) =
        sqlx::query_as("SELECT COUNT(*), bool_and(success) FROM _sqlx_migrations")
            .fetch_one(pg(&replicas[0]).pool())
            .await
            .expect("the migrations table");
    assert_eq!((applied, succeeded), (2, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_a_newer_release_migrated_further_is_served() {
    const TEST: &str = "postgres::a_database_a_newer_release_migrated_further_is_served";
    let Some(url) = support::postgres_database(TEST).await else {
        return;
    };
    let first = open_postgres(&url).await;
    migrated(pg(&first)).await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from a newer release', TRUE, $1, 0)",
    )
    .bind(&[0u8][..])
    .execute(pg(&first).pool())
    .await
    .expect("a newer release's migration");

    // An older replica starts (a rollout's old pod restarting, or `kubectl rollout undo`).
    let older = open_postgres(&url).await;
    migrated(pg(&older)).await;
    assert!(older.ping().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_transactions_are_retried_once_and_errors_sorted_by_sqlstate() {
    const TEST: &str =
        "postgres::aborted_transactions_are_retried_once_and_errors_sorted_by_sqlstate";
    let Some(b) = support::postgres(TEST).await else {
        return;
    };
    let pool = pg(&b.db).pool();
    const SERIALIZATION: &str =
        "DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '40001'; END $$";
    const DEADLOCK: &str = "DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '40P01'; END $$";
    const SHUTDOWN: &str = "DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '57P01'; END $$";
    const UNIQUE: &str = "DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '23505'; END $$";
    const MISSING: &str = "SELECT * FROM no_such_table";
    const FINE: &str = "SELECT 1";
    // (first statement, statement of any retry, expected status or 200, expected attempts)
    let cases = [
        (SERIALIZATION, SERIALIZATION, 503, 2),
        (DEADLOCK, DEADLOCK, 503, 2),
        (SERIALIZATION, FINE, 200, 2),
        (DEADLOCK, FINE, 200, 2),
        (SHUTDOWN, FINE, 503, 1),
        (UNIQUE, FINE, 500, 1),
        (MISSING, FINE, 500, 1),
        (FINE, FINE, 200, 1),
    ];
    for (first, then, status, expected_attempts) in cases {
        let attempts = AtomicU32::new(0);
        let outcome = retry_once(|| {
            let sql = if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                first
            } else {
                then
            };
            sqlx::query(sql).execute(pool)
        })
        .await;
        let got = outcome.map_or_else(|e| e.status().as_u16(), |_| 200);
        assert_eq!(
            (got, attempts.load(Ordering::SeqCst)),
            (status, expected_attempts),
            "{first} then {then}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_statement_is_cancelled_by_the_statement_timeout_as_503() {
    const TEST: &str = "postgres::a_runaway_statement_is_cancelled_by_the_statement_timeout_as_503";
    let Some(b) = support::postgres(TEST).await else {
        return;
    };
    let e = sqlx::query("SELECT pg_sleep(60)")
        .execute(pg(&b.db).pool())
        .await
        .expect_err("cancelled by statement_timeout");
    let code = e
        .as_database_error()
        .and_then(|d| d.code())
        .map(|c| c.into_owned());
    assert_eq!(code.as_deref(), Some("57014"), "{e}");
    unavailable_with_retry_after(db_error(e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_creations_queue_behind_their_lock_and_no_one_elses() {
    const TEST: &str = "postgres::a_users_creations_queue_behind_their_lock_and_no_one_elses";
    let Some(b) = support::postgres(TEST).await else {
        return;
    };
    let pool = pg(&b.db).pool();

    // Arrange: another session holds alice's creation lock.
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind("alice")
        .execute(&mut *holder)
        .await
        .expect("take alice's lock");

    // Act: alice creates a note; wait until PostgreSQL shows it queued on the lock.
    let notes = b.notes.clone();
    let alice = tokio::spawn(async move {
        notes
            .create("alice", &new_note("queued", 1_000), None)
            .await
    });
    lock_waiters(pool, 1).await;

    // Assert: meanwhile bob creates freely, and alice's note is not there yet.
    assert_eq!(
        b.notes
            .create("bob", &new_note("free", 1_000), None)
            .await
            .expect("bob is not blocked"),
        Created::New
    );
    assert!(titles(b.notes.as_ref(), "alice", 20).await.is_empty());

    // Once the lock is released, alice's creation goes through.
    holder.commit().await.expect("release the lock");
    let created = alice.await.expect("the task").expect("alice's creation");
    assert_eq!(created, Created::New);
    assert_eq!(titles(b.notes.as_ref(), "alice", 20).await, ["queued"]);
    // Her number was drawn once she had her lock, so after bob's: a page of hers never
    // skips a note that committed late under a smaller number.
    let order: Vec<(String,)> = sqlx::query_as("SELECT openid FROM notes ORDER BY seq")
        .fetch_all(pool)
        .await
        .expect("the notes in seq order");
    assert_eq!(
        order.into_iter().map(|(o,)| o).collect::<Vec<_>>(),
        ["bob", "alice"]
    );
}

/// Returns once `n` sessions of this database wait for an advisory lock.
async fn lock_waiters(pool: &sqlx::PgPool, n: i64) {
    let queued = async {
        loop {
            let (waiting,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(pool)
            .await
            .expect("pg_locks");
            if waiting == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), queued)
        .await
        .unwrap_or_else(|_| panic!("{n} creations wait for a lock"));
}

/// Creations without a key made while every writer of them is busy: they queue, and are
/// taken together once one is free. Every writer is first given a creation of `"holder"`'s
/// own, waiting for their lock; `creations` (openid, note, key) are then queued, and the lock
/// released. With `blocked`, that user's lock is held meanwhile by another session, which,
/// once the batch waits for it, writes a note `"{blocked} 0"` of its own before it lets go.
/// Their answers, in their order.
async fn created_while_the_writers_are_busy(
    b: &support::Backend,
    creations: &[(&str, Note, Option<Idempotent>)],
    blocked: Option<&str>,
) -> Vec<Result<Created, ApiError>> {
    let pool = pg(&b.db).pool();
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind("holder")
        .execute(&mut *holder)
        .await
        .expect("take the holder's lock");
    // One at a time, each taken by a writer of its own before the next.
    let mut busy = Vec::new();
    for n in 1..=PG_CREATION_WRITERS {
        let notes = b.notes.clone();
        busy.push(tokio::spawn(async move {
            notes.create("holder", &new_note("busy", 1_000), None).await
        }));
        lock_waiters(pool, i64::try_from(n).expect("a few")).await;
    }

    // Each creation is polled until it waits for its answer: it is then in the queue.
    let mut queued: Vec<_> = creations
        .iter()
        .map(|(openid, note, key)| b.notes.create(openid, note, key.clone()))
        .collect();
    let mut cx = Context::from_waker(Waker::noop());
    for creation in &mut queued {
        assert!(creation.as_mut().poll(&mut cx).is_pending(), "queued");
    }
    let mut blocker = pool.begin().await.expect("begin");
    if let Some(user) = blocked {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(user)
            .execute(&mut *blocker)
            .await
            .expect("take the blocked user's lock");
    }
    holder.commit().await.expect("release the lock");
    for writer in busy {
        assert_eq!(writer.await.expect("task").expect("created"), Created::New);
    }
    let answers = futures_util::future::join_all(queued);
    let Some(user) = blocked else {
        blocker.rollback().await.expect("rollback");
        return answers.await;
    };
    let release = async {
        lock_waiters(pool, 1).await;
        // The batch waits with nothing written, and its numbers are not drawn yet: the
        // note written now is older in the user's listing than the batch's.
        assert!(
            titles(b.notes.as_ref(), creations[0].0, 20)
                .await
                .is_empty()
        );
        sqlx::query(
            "INSERT INTO notes (id, openid, title, body, created_at, updated_at) \
             VALUES ($1, $2, $3, 'body', 1000, 1000)",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(user)
        .bind(format!("{user} 0"))
        .execute(&mut *blocker)
        .await
        .expect("the blocker's note");
        blocker
            .commit()
            .await
            .expect("release the blocked user's lock");
    };
    let (answers, ()) = tokio::join!(answers, release);
    answers
}

/// The transaction that wrote each of `openid`'s notes, oldest first.
async fn writers_of(pool: &sqlx::PgPool, openid: &str) -> Vec<String> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT xmin::text FROM notes WHERE openid = $1 ORDER BY seq")
            .bind(openid)
            .fetch_all(pool)
            .await
            .expect("the notes' transactions");
    rows.into_iter().map(|(x,)| x).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creations_queued_together_are_written_in_one_statement_in_their_order() {
    const TEST: &str =
        "postgres::creations_queued_together_are_written_in_one_statement_in_their_order";
    let Some(b) = support::postgres(TEST).await else {
        return;
    };
    let pool = pg(&b.db).pool();

    let answers = created_while_the_writers_are_busy(
        &b,
        &[
            ("bob", new_note("bob 1", 2_000), None),
            ("carol", new_note("carol 1", 2_000), None),
            ("bob", new_note("bob 2", 2_000), None),
        ],
        Some("carol"),
    )
    .await;

    for answer in answers {
        assert_eq!(answer.expect("created"), Created::New);
    }
    // One transaction wrote all three, after carol's lock, and bob's in the order they came.
    let (bob, carol) = (
        writers_of(pool, "bob").await,
        writers_of(pool, "carol").await,
    );
    assert_eq!((bob.len(), carol.len()), (2, 2));
    assert_eq!([&bob[0], &bob[1]], [&carol[1], &carol[1]]);
    assert_ne!(carol[0], carol[1], "the blocker's note is its own");
    assert_eq!(
        titles(b.notes.as_ref(), "bob", 20).await,
        ["bob 2", "bob 1"]
    );
    assert_eq!(
        titles(b.notes.as_ref(), "carol", 20).await,
        ["carol 1", "carol 0"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_that_fails_its_batch_fails_alone() {
    const TEST: &str = "postgres::a_creation_that_fails_its_batch_fails_alone";
    let Some(b) = support::postgres(TEST).await else {
        return;
    };
    let taken = new_note("first", 1_000);
    assert_eq!(
        b.notes.create("dave", &taken, None).await.expect("created"),
        Created::New
    );

    // The second creation reuses a note id: its row cannot be written.
    let answers = created_while_the_writers_are_busy(
        &b,
        &[
            ("bob", new_note("bob", 2_000), None),
            ("erin", taken.clone(), None),
            ("carol", new_note("carol", 2_000), None),
        ],
        None,
    )
    .await;

    let statuses: Vec<u16> = answers
        .into_iter()
        .map(|a| a.map_or_else(|e| e.status().as_u16(), |_| 201))
        .collect();
    assert_eq!(statuses, [201, 500, 201]);
    assert_eq!(titles(b.notes.as_ref(), "bob", 20).await, ["bob"]);
    assert_eq!(titles(b.notes.as_ref(), "carol", 20).await, ["carol"]);
    assert!(titles(b.notes.as_ref(), "erin", 20).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_of_many_expired_keys_takes_them_all_in_batches() {
    const TEST: &str = "postgres::a_purge_of_many_expired_keys_takes_them_all_in_batches";
    let Some(b) = support::postgres(TEST).await else {
        return;
    };
    let pool = pg(&b.db).pool();
    // Arrange: two and a half batches of keys expired long ago (a purge that did not run
    // for a while), and one that has not.
    let expired = i64::try_from(PG_PURGE_BATCH * 5 / 2).expect("small");
    sqlx::query(
        "INSERT INTO note_idempotency (openid, key, fingerprint, note_id, status, response, \
         created_at) SELECT 'old-user', 'k' || n, '\\x00', 'n', 201, '\\x00', 1000 \
         FROM generate_series(1, $1) AS n",
    )
    .bind(expired)
    .execute(pool)
    .await
    .expect("expired keys");
    let now = 1_000 + IDEMPOTENCY_TTL_MILLIS + 24 * 60 * 60 * 1000;
    sqlx::query(
        "INSERT INTO note_idempotency (openid, key, fingerprint, note_id, status, response, \
         created_at) VALUES ('other', 'recent', '\\x00', 'n', 201, '\\x00', $1)",
    )
    .bind(now - 1_000)
    .execute(pool)
    .await
    .expect("a recent key");

    // Act: the process's first creation finds the purge due.
    let fresh = new_note("fresh", now);
    b.notes
        .create("bob", &fresh, Some(idempotent("fresh", &fresh)))
        .await
        .expect("created");

    // Assert: every expired key goes, in as many statements as it takes; the recent one
    // and the new one stay.
    let rows = b
        .idempotency_rows_reaching(2, Duration::from_secs(30))
        .await;
    assert_eq!(rows, 2, "the recent key and the new one are left");
    let (left,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM note_idempotency WHERE key IN ('recent', 'fresh')")
            .fetch_one(pool)
            .await
            .expect("count");
    assert_eq!(left, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_creations_written_together_answer_as_one_after_another_would() {
    const TEST: &str =
        "postgres::keyed_creations_written_together_answer_as_one_after_another_would";
    let Some(b) = support::postgres(TEST).await else {
        return;
    };
    let pool = pg(&b.db).pool();
    // The batch comes at `late`: erin's key was answered more than 48 hours before, dave's
    // a moment before (its creation's purge of expired keys, due then, spares erin's: it
    // is not yet 48 hours old at that moment; none is due again in the batch).
    let late = 1_000 + IDEMPOTENCY_TTL_MILLIS + 1;
    let old = new_note("old", 1_000);
    let kept = new_note("kept", late - 10);
    for (openid, note, key) in [("erin", &old, "old"), ("dave", &kept, "kept")] {
        let made = b
            .notes
            .create(openid, note, Some(idempotent(key, note)))
            .await;
        assert_eq!(made.expect("created"), Created::New);
    }
    let first = new_note("bob", late);
    let retry = Note::new(first.title.clone(), first.body.clone(), late);
    let other = new_note("bob again", late);
    let dave = Note::new(kept.title.clone(), kept.body.clone(), late);
    let erin = Note::new(old.title.clone(), old.body.clone(), late);
    let with_key = |key: &str, note: &Note| Some(idempotent(key, note));

    let answers = created_while_the_writers_are_busy(
        &b,
        &[
            ("bob", first.clone(), with_key("k", &first)),
            ("carol", new_note("carol", late), None),
            ("bob", retry.clone(), with_key("k", &retry)),
            ("bob", other.clone(), with_key("k", &other)),
            ("dave", dave.clone(), with_key("kept", &dave)),
            ("erin", erin.clone(), with_key("old", &erin)),
        ],
        None,
    )
    .await;

    let mut answers = answers.into_iter();
    let mut next = || answers.next().expect("an answer");
    assert_eq!(next().expect("bob's first"), Created::New);
    assert_eq!(next().expect("carol's"), Created::New);
    assert_eq!(
        next().expect("bob's retry"),
        Created::Replayed(idempotent("k", &first).answer)
    );
    let reused = next().expect_err("bob's key with another request");
    assert_eq!(
        (reused.status().as_u16(), reused.code()),
        (422, "idempotency_key_reused")
    );
    assert_eq!(
        next().expect("dave's retry"),
        Created::Replayed(idempotent("kept", &kept).answer)
    );
    assert_eq!(next().expect("erin's, her key forgotten"), Created::New);

    assert_eq!(titles(b.notes.as_ref(), "bob", 20).await, ["bob"]);
    assert_eq!(titles(b.notes.as_ref(), "dave", 20).await, ["kept"]);
    assert_eq!(titles(b.notes.as_ref(), "erin", 20).await, ["old", "old"]);
    // One transaction wrote the batch's three notes.
    let (bob, carol, erins) = (
        writers_of(pool, "bob").await,
        writers_of(pool, "carol").await,
        writers_of(pool, "erin").await,
    );
    assert_eq!([&bob[0], &carol[0]], [&erins[1], &erins[1]]);
    // erin's key now answers her new note.
    let again = Note::new(old.title.clone(), old.body.clone(), late + 1);
    assert_eq!(
        b.notes
            .create("erin", &again, Some(idempotent("old", &again)))
            .await
            .expect("erin's retry"),
        Created::Replayed(idempotent("old", &erin).answer)
    );
}
