//! The store contract suite: the same tests, written once over `Arc<dyn ProfileStore>` and
//! `Arc<dyn NotesStore>`, run against every backend (SQLite in a temporary file, PostgreSQL in
//! a fresh database per test), plus what only PostgreSQL has (background migrations, retries,
//! the per-user lock). One test binary.
//!
//! PostgreSQL comes from `WXAUTH_TEST_PG_URL`, a superuser URL (`scripts/test` starts one and
//! sets it). Without it the PostgreSQL tests fail with a message saying so, unless
//! `WXAUTH_SKIP_EXTERNAL=1` asks to skip them (each skip is printed to stderr).

/// Writes, for each contract test `async fn $name(Backend)` of the invoking module, the test
/// `sqlite::$name` and the test `postgres::$name`.
macro_rules! on_every_backend {
    ($($name:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(crate::support::sqlite().await).await;
                }
            )+
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let test = concat!(module_path!(), "::", stringify!($name));
                    if let Some(backend) = crate::support::postgres(test).await {
                        super::$name(backend).await;
                    }
                }
            )+
        }
    };
}

mod notes;
mod postgres;
mod profiles;
mod schema;
mod support;
