//! The backends under test: an SQLite file, or a fresh PostgreSQL database (or a skip), each
//! opened through `Db::open` exactly as start-up opens it; and small builders for the tests.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use api_service::config::DatabaseSettings;
use api_service::db::{Db, PgDb};
use api_service::notes::{
    IdempotencyKey, Idempotent, Note, NoteBody, NoteTitle, NotesStore, Page, PageSize, PgNotes,
    RequestFingerprint, SqliteNotes, StoredAnswer,
};
use api_service::profile::{PgProfiles, ProfileStore, SqliteProfiles};
use secrecy::SecretString;
use sqlx::Connection as _;

/// The variable that names the test PostgreSQL.
const PG_VAR: &str = "WXAUTH_TEST_PG_URL";

/// The stores of one backend, and what keeps its database alive.
pub(crate) struct Backend {
    pub(crate) db: Db,
    pub(crate) profiles: Arc<dyn ProfileStore>,
    pub(crate) notes: Arc<dyn NotesStore>,
    _dir: Option<tempfile::TempDir>,
}

impl Backend {
    fn new(db: Db, dir: Option<tempfile::TempDir>) -> Self {
        let (profiles, notes): (Arc<dyn ProfileStore>, Arc<dyn NotesStore>) = match &db {
            Db::Sqlite(pool, one_process) => (
                Arc::new(SqliteProfiles::new(pool.clone(), one_process.turn())),
                Arc::new(SqliteNotes::new(pool.clone(), one_process.turn())),
            ),
            Db::Postgres(pg) => (
                Arc::new(PgProfiles::new(pg.clone())),
                Arc::new(PgNotes::new(pg.clone())),
            ),
        };
        Self {
            db,
            profiles,
            notes,
            _dir: dir,
        }
    }

    /// How many idempotency records the database holds, expired or not.
    pub(crate) async fn idempotency_rows(&self) -> i64 {
        const COUNT: &str = "SELECT COUNT(*) FROM note_idempotency";
        let (n,): (i64,) = match &self.db {
            Db::Sqlite(pool, _) => sqlx::query_as(COUNT).fetch_one(pool).await,
            Db::Postgres(pg) => sqlx::query_as(COUNT).fetch_one(pg.pool()).await,
        }
        .expect("count the idempotency records");
        n
    }

    /// [`Self::idempotency_rows`] once it is `want`, or as it is after `within` (the purge
    /// of expired keys runs beside the creation that started it, on PostgreSQL).
    pub(crate) async fn idempotency_rows_reaching(&self, want: i64, within: Duration) -> i64 {
        let give_up = tokio::time::Instant::now() + within;
        loop {
            let rows = self.idempotency_rows().await;
            if rows == want || tokio::time::Instant::now() >= give_up {
                return rows;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A fresh SQLite file, migrated.
pub(crate) async fn sqlite() -> Backend {
    let dir = tempfile::Builder::new()
        .prefix("wxauth-api-stores-")
        .tempdir()
        .expect("a temporary directory");
    let path = dir.path().join("api.db");
    let db = Db::open(&DatabaseSettings::Sqlite { path })
        .await
        .expect("open SQLite");
    Backend::new(db, Some(dir))
}

/// A fresh PostgreSQL database, migrated, or `None` when skipping was asked for.
pub(crate) async fn postgres(test: &str) -> Option<Backend> {
    let url = postgres_database(test).await?;
    let db = open_postgres(&url).await;
    let Db::Postgres(pg) = &db else {
        panic!("a postgres:// URL must open PostgreSQL");
    };
    migrated(pg).await;
    Some(Backend::new(db, None))
}

/// Opens `url` as start-up does (lazily; migrations in the background).
pub(crate) async fn open_postgres(url: &str) -> Db {
    Db::open(&DatabaseSettings::Postgres {
        url: SecretString::from(url),
        max_connections: shared::postgres::DEFAULT_POOL_SIZE,
    })
    .await
    .expect("a lazy PostgreSQL pool opens")
}

/// Waits until the background migrations have run (the limit only keeps a broken run from
/// hanging forever).
pub(crate) async fn migrated(pg: &PgDb) {
    tokio::time::timeout(Duration::from_secs(120), pg.migrated())
        .await
        .expect("the PostgreSQL migrations ran");
}

/// The admin URL of the test PostgreSQL, or `None` when skipping was asked for; without
/// either, the test fails saying what it needs.
pub(crate) fn postgres_admin(test: &str) -> Option<String> {
    let test = test.strip_prefix("stores::").unwrap_or(test);
    if let Some(url) = std::env::var(PG_VAR).ok().filter(|u| !u.is_empty()) {
        return Some(url);
    }
    if std::env::var("WXAUTH_SKIP_EXTERNAL").is_ok_and(|v| v == "1") {
        // Straight to the process's stderr: the test harness captures `eprintln!` of
        // passing tests, and a skip must be seen.
        let _shown = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: needs PostgreSQL (WXAUTH_SKIP_EXTERNAL=1)"
        );
        return None;
    }
    panic!(
        "{test} needs PostgreSQL: set {PG_VAR} (scripts/test starts one and sets it), \
         or WXAUTH_SKIP_EXTERNAL=1 to skip"
    );
}

/// A database name no other test uses, and its URL on the test server (not created yet).
pub(crate) fn fresh_database(admin: &str) -> (String, String) {
    let name = format!("wxauth_t_{}", uuid::Uuid::new_v4().simple());
    let mut url = url::Url::parse(admin).expect("WXAUTH_TEST_PG_URL is a URL");
    url.set_path(&name);
    (name, url.to_string())
}

/// Creates database `name` on the test server.
pub(crate) async fn create_database(test: &str, admin: &str, name: &str) {
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot reach PostgreSQL at {PG_VAR}: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot create a database: {e}"));
    let _closed = conn.close().await;
}

/// The test Redis (`WXAUTH_TEST_REDIS_URL`), or `None` when skipping was asked for; without
/// either, the test fails saying what it needs.
pub(crate) fn redis_url(test: &str) -> Option<String> {
    const REDIS_VAR: &str = "WXAUTH_TEST_REDIS_URL";
    let test = test.strip_prefix("stores::").unwrap_or(test);
    if let Some(url) = std::env::var(REDIS_VAR).ok().filter(|u| !u.is_empty()) {
        return Some(url);
    }
    if std::env::var("WXAUTH_SKIP_EXTERNAL").is_ok_and(|v| v == "1") {
        let _shown = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: needs Redis (WXAUTH_SKIP_EXTERNAL=1)"
        );
        return None;
    }
    panic!(
        "{test} needs Redis: set {REDIS_VAR} (scripts/test starts one and sets it), \
         or WXAUTH_SKIP_EXTERNAL=1 to skip"
    );
}

/// A new, empty PostgreSQL database for `test` (dropped by nobody: names are unique and the
/// test cluster is disposable), or `None` when skipping was asked for.
pub(crate) async fn postgres_database(test: &str) -> Option<String> {
    let admin = postgres_admin(test)?;
    let (name, url) = fresh_database(&admin);
    create_database(test, &admin, &name).await;
    Some(url)
}

/// A note made at `at`.
pub(crate) fn new_note(title: &str, at: i64) -> Note {
    Note::new(
        NoteTitle::parse(title).expect("title"),
        NoteBody::parse("body").expect("body"),
        at,
    )
}

/// `Idempotency-Key: key` on the creation of `note`, answered as the handler would (the
/// answer names the note it made).
pub(crate) fn idempotent(key: &str, note: &Note) -> Idempotent {
    Idempotent {
        key: IdempotencyKey::parse(key.as_bytes()).expect("key"),
        fingerprint: RequestFingerprint::of_create(&note.title, &note.body),
        answer: StoredAnswer {
            status: 201,
            note_id: note.id.as_str().to_owned(),
            body: format!("{{\"id\":\"{}\"}}", note.id.as_str()).into_bytes(),
        },
    }
}

/// A page size.
pub(crate) fn size(n: u32) -> PageSize {
    PageSize::parse(Some(&n.to_string())).expect("page size")
}

/// Every page of `openid`'s notes, `n` at a time, from the first.
pub(crate) async fn pages(notes: &dyn NotesStore, openid: &str, n: u32) -> Vec<Page> {
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let page = notes.list(openid, size(n), cursor).await.expect("list");
        cursor = page.next;
        pages.push(page);
        if cursor.is_none() {
            return pages;
        }
    }
}

/// The titles of `openid`'s notes, newest first, read `n` at a time.
pub(crate) async fn titles(notes: &dyn NotesStore, openid: &str, n: u32) -> Vec<String> {
    pages(notes, openid, n)
        .await
        .iter()
        .flat_map(|p| p.items.iter().map(|n| n.title.as_str().to_owned()))
        .collect()
}
