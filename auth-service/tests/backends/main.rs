//! The backend contract suites: the same tests against every implementation of a trait
//! (`Store` on SQLite and PostgreSQL, `Cache` in process and on Redis). One test binary.
//!
//! PostgreSQL and Redis come from `WXAUTH_TEST_PG_URL` and `WXAUTH_TEST_REDIS_URL`
//! (`scripts/test` provides them). Without them these tests fail with a message saying so,
//! unless `WXAUTH_SKIP_EXTERNAL=1` asks to skip them (each skip is printed).

mod cache;
mod store;
mod support;
