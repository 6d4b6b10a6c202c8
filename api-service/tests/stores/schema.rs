//! A database that holds auth-service's schema (both services pointed at one database) is
//! refused with a message that says so. PostgreSQL's case, where the edge migrates in the
//! background, is the end-to-end test `tests/e2e/one_database.rs`.

use api_service::config::DatabaseSettings;
use api_service::db::Db;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_refuses_a_file_that_holds_auth_services_schema_and_says_why() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("shared.db");
    let auth = SqlitePool::connect_with(
        SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true),
    )
    .await
    .expect("SQLite");
    sqlx::migrate!("../auth-service/migrations/sqlite")
        .run(&auth)
        .await
        .expect("auth-service's migrations");
    auth.close().await;

    let why = Db::open(&DatabaseSettings::Sqlite { path })
        .await
        .map(|_| ())
        .expect_err("a file with auth-service's schema");

    let why = format!("{why:#}");
    assert!(why.contains("another program's schema"), "{why}");
    assert!(
        why.contains(
            r#"its migration 1 is "init", where api-service (API_DATABASE_URL)'s is "profiles""#
        ),
        "{why}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_opens_a_file_a_newer_release_migrated_further() {
    // Arrange: a file this release migrated, then a newer one (as after `kubectl rollout
    // undo`).
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("api.db");
    let db = Db::open(&DatabaseSettings::Sqlite { path: path.clone() })
        .await
        .expect("first start");
    drop(db);
    let raw = SqlitePool::connect_with(SqliteConnectOptions::new().filename(&path))
        .await
        .expect("SQLite");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from a newer release', TRUE, $1, 0)",
    )
    .bind(&[0u8][..])
    .execute(&raw)
    .await
    .expect("a newer release's migration");
    raw.close().await;

    // Act, assert: this release starts on it.
    let db = Db::open(&DatabaseSettings::Sqlite { path })
        .await
        .expect("an older release on a newer schema");
    assert!(db.ping().await);
}
