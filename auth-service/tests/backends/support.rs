//! Where the external services are, and a fresh PostgreSQL database per test.

use sqlx::Connection as _;
use std::io::Write as _;

/// What a test needing an external service should do.
pub(crate) enum External {
    /// Run against this URL.
    Run(String),
    /// Skipping was asked for explicitly; the test returns at once.
    Skip,
}

fn external(var: &str, what: &str, test: &str) -> External {
    if let Ok(url) = std::env::var(var)
        && !url.is_empty()
    {
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

/// The Redis URL for `test`, or a skip.
pub(crate) fn redis(test: &str) -> External {
    external("WXAUTH_TEST_REDIS_URL", "Redis", test)
}

/// A new, empty PostgreSQL database for `test` (dropped by nobody: names are unique, and the
/// test cluster is disposable), or a skip.
pub(crate) async fn postgres_database(test: &str) -> External {
    let admin = match external("WXAUTH_TEST_PG_URL", "PostgreSQL", test) {
        External::Run(url) => url,
        External::Skip => return External::Skip,
    };
    let name = format!("wxauth_t_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot reach PostgreSQL at WXAUTH_TEST_PG_URL: {e}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{test}: cannot create a database: {e}"));
    let mut url = url::Url::parse(&admin).expect("WXAUTH_TEST_PG_URL is a URL");
    url.set_path(&name);
    External::Run(url.to_string())
}
