//! What only the PostgreSQL backend has: migrations in the background (the edge starts while
//! PostgreSQL is missing, answers 503 until migrated, replicas migrate together safely),
//! errors sorted by SQLSTATE with one retry of aborted transactions, the statement timeout,
//! and the per-user lock that orders a user's creations.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use api_service::db::{Db, PgDb, db_error, retry_once};
use api_service::error::ApiError;
use api_service::notes::{Created, NotesStore as _, PgNotes};
use api_service::profile::{PgProfiles, ProfileStore as _};
use axum::http::header;
use axum::response::IntoResponse as _;

use crate::support::{
    self, create_database, fresh_database, migrated, new_note, open_postgres, postgres_admin, size,
    titles,
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
    let queued = async {
        loop {
            let (waiting,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(pool)
            .await
            .expect("pg_locks");
            if waiting == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), queued)
        .await
        .expect("alice's creation waits for her lock");

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
