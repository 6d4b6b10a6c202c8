//! PostgreSQL and Redis for the end-to-end tests: where they are (`WXAUTH_TEST_PG_URL`,
//! `WXAUTH_TEST_REDIS_URL`, set by `scripts/test`), a fresh database per test, and the one
//! way to skip: `WXAUTH_SKIP_EXTERNAL=1`. Without them and without that variable, a test that
//! needs them fails with a message that says what to do.

use anyhow::Context as _;
use sqlx::Connection as _;
use std::io::Write as _;

/// What a test needing an external service does.
#[derive(Debug, Clone)]
pub enum External {
    /// Run against this URL.
    Run(String),
    /// Skipping was asked for explicitly (already printed); return at once.
    Skip,
}

fn external(var: &str, what: &str, test: &str) -> External {
    if let Some(url) = std::env::var(var).ok().filter(|u| !u.is_empty()) {
        return External::Run(url);
    }
    if std::env::var("WXAUTH_SKIP_EXTERNAL").is_ok_and(|v| v == "1") {
        // Straight to stderr: the test harness captures eprintln! of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: needs {what} (WXAUTH_SKIP_EXTERNAL=1)"
        );
        return External::Skip;
    }
    panic!(
        "{test} needs {what}: set {var} (scripts/test starts one and sets it), \
         or set WXAUTH_SKIP_EXTERNAL=1 to skip the tests that need it"
    );
}

/// Redis for `test`, or a skip.
pub fn redis(test: &str) -> External {
    external("WXAUTH_TEST_REDIS_URL", "Redis", test)
}

/// A new, empty PostgreSQL database for `test`, or a skip.
pub async fn postgres_database(test: &str) -> anyhow::Result<External> {
    let admin = match external("WXAUTH_TEST_PG_URL", "PostgreSQL", test) {
        External::Run(url) => url,
        External::Skip => return Ok(External::Skip),
    };
    let name = format!("wxauth_e2e_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .context("cannot reach PostgreSQL at WXAUTH_TEST_PG_URL")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .context("cannot create a test database")?;
    let mut url = url::Url::parse(&admin).context("WXAUTH_TEST_PG_URL is not a URL")?;
    url.set_path(&name);
    Ok(External::Run(url.to_string()))
}
