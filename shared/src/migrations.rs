//! A database's migration history, checked before a service migrates it.
//!
//! auth-service and api-service each keep their schema's history in sqlx's
//! `_sqlx_migrations` table, numbered from 1. Pointed at one database, the second service
//! to start would find the first one's migration 1 there and sqlx would report that
//! "migration 1 was previously applied but has been modified", which sends an operator
//! looking for an edited file. [`refuse_foreign`] says what happened instead: the database
//! holds another program's schema, and each service needs a database of its own.
//!
//! A database a newer release already migrated further is taken as it is ([`prepare`]):
//! during a rollout an old pod may restart after new ones migrated, and `kubectl rollout
//! undo` brings the old release back onto the newer schema. Each migration keeps the
//! previous release working (deploy/README.md), where sqlx alone would stop the old release
//! at start-up ("migration N was previously applied but is missing").

use anyhow::bail;
use sqlx::migrate::Migrator;
use sqlx::{PgPool, SqlitePool};

/// The history sqlx keeps of the migrations applied, on either database.
const HISTORY: &str = "SELECT version, description FROM _sqlx_migrations ORDER BY version";

/// The migrations applied to a PostgreSQL database (none when it has no history table), by
/// version, with their descriptions.
pub async fn applied_postgres(pool: &PgPool) -> anyhow::Result<Vec<(i64, String)>> {
    // `to_regclass` looks the name up on the search path, as sqlx's migrator does.
    let has_history: bool =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(pool)
            .await?;
    if !has_history {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as(HISTORY).fetch_all(pool).await?)
}

/// The migrations applied to an SQLite database, as [`applied_postgres`].
pub async fn applied_sqlite(pool: &SqlitePool) -> anyhow::Result<Vec<(i64, String)>> {
    let has_history: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master \
         WHERE type = 'table' AND name = '_sqlx_migrations')",
    )
    .fetch_one(pool)
    .await?;
    if !has_history {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as(HISTORY).fetch_all(pool).await?)
}

/// Readies `ours` to run on a database whose history is `applied`: another program's
/// schema is refused ([`refuse_foreign`]); migrations a newer release applied, which `ours`
/// does not know, are left alone, with a warning that names them (returned, too); the ones
/// `ours` knows are still checked by sqlx against their files, and the missing ones applied.
/// A newer release has applied every migration of ours and numbers its own after them:
/// versions `ours` does not know in any other history (below our last, or beside ours not
/// all applied, such as another sqlx program's timestamped ones) are another program's,
/// refused as sqlx would. `service` as for [`refuse_foreign`].
pub fn prepare(
    applied: &[(i64, String)],
    ours: &mut Migrator,
    service: &str,
) -> anyhow::Result<Vec<i64>> {
    refuse_foreign(applied, ours, service)?;
    let newer: Vec<i64> = applied
        .iter()
        .map(|(version, _)| *version)
        .filter(|version| !ours.iter().any(|m| m.version == *version))
        .collect();
    let last = ours.iter().map(|m| m.version).max().unwrap_or(0);
    let all_ours_applied = ours
        .iter()
        .all(|m| applied.iter().any(|(version, _)| *version == m.version));
    let a_newer_release = all_ours_applied && newer.iter().all(|v| *v > last);
    if !newer.is_empty() && !a_newer_release {
        bail!(
            "this database holds another program's schema: its migrations {newer:?} are not \
             {service}'s, nor those of a newer release of it (which applies all of this \
             release's first). auth-service and api-service each need a database of their own"
        );
    }
    if !newer.is_empty() {
        tracing::warn!(
            service,
            newer_migrations = ?newer,
            "the database was migrated by a newer release; this one runs on it as it is \
             (each migration keeps the release before it working)"
        );
    }
    ours.set_ignore_missing(true);
    Ok(newer)
}

/// Fails when `applied` holds a migration that `ours` numbers the same but describes
/// otherwise: the database belongs to another program. `service` names the service and the
/// setting that chose the database, for the message (`api-service (API_DATABASE_URL)`).
///
/// An edited migration (same description, another checksum) is left to sqlx, which
/// reports it well; one it does not know (a newer release ran here) to [`prepare`].
fn refuse_foreign(applied: &[(i64, String)], ours: &Migrator, service: &str) -> anyhow::Result<()> {
    for (version, theirs) in applied {
        let Some(mine) = ours.iter().find(|m| m.version == *version) else {
            continue;
        };
        if mine.description != theirs.as_str() {
            bail!(
                "this database holds another program's schema: its migration {version} is \
                 {theirs:?}, where {service}'s is {:?}. auth-service and api-service each need \
                 a database of their own",
                mine.description
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use sqlx::migrate::{Migration, MigrationType};

    use super::*;

    fn migrator(descriptions: &[&'static str]) -> Migrator {
        Migrator::with_migrations(
            descriptions
                .iter()
                .zip(1..)
                .map(|(description, version)| {
                    Migration::new(
                        version,
                        Cow::Borrowed(*description),
                        MigrationType::Simple,
                        sqlx::SqlStr::from_static("SELECT 1"),
                        false,
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn another_programs_history_is_named_as_such() {
        let ours = migrator(&["profiles", "notes"]);
        let applied = vec![(1, "init".to_owned()), (2, "sensitive data".to_owned())];
        let e = refuse_foreign(&applied, &ours, "api-service (API_DATABASE_URL)")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("another program's schema"), "{e}");
        assert!(
            e.contains(
                r#"its migration 1 is "init", where api-service (API_DATABASE_URL)'s is "profiles""#
            ),
            "{e}"
        );
        assert!(e.contains("a database of their own"), "{e}");
    }

    #[test]
    fn a_newer_releases_migrations_are_named_and_left_alone() {
        let applied = vec![
            (1, "profiles".to_owned()),
            (2, "notes".to_owned()),
            (3, "tags".to_owned()),
            (4, "tag index".to_owned()),
        ];
        let mut ours = migrator(&["profiles", "notes"]);
        assert!(!ours.ignore_missing);
        assert_eq!(
            prepare(&applied, &mut ours, "api-service").expect("ours"),
            [3, 4]
        );
        assert!(ours.ignore_missing, "sqlx would refuse versions 3 and 4");
        let mut ours = migrator(&["profiles", "notes"]);
        assert_eq!(
            prepare(&applied[..1], &mut ours, "api-service").expect("ours"),
            Vec::<i64>::new()
        );
        let mut ours = migrator(&["profiles", "notes"]);
        let foreign = vec![(1, "init".to_owned())];
        assert!(prepare(&foreign, &mut ours, "api-service").is_err());
    }

    #[test]
    fn unknown_versions_that_no_newer_release_would_leave_are_another_programs() {
        let ours = || migrator(&["profiles", "notes"]);
        for applied in [
            // Another sqlx program's timestamped versions, none of ours.
            vec![(20240101120000, "create users".to_owned())],
            // Beside only some of ours: a newer release would have applied them all.
            vec![(1, "profiles".to_owned()), (3, "tags".to_owned())],
        ] {
            let e = prepare(&applied, &mut ours(), "api-service (API_DATABASE_URL)")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("another program's schema"), "{applied:?}: {e}");
        }
    }

    #[test]
    fn our_own_history_passes_whole_partial_or_newer() {
        let ours = migrator(&["profiles", "notes"]);
        for applied in [
            vec![],
            vec![(1, "profiles".to_owned())],
            vec![(1, "profiles".to_owned()), (2, "notes".to_owned())],
            // A newer release's migration 3: not another program's (see `prepare`).
            vec![
                (1, "profiles".to_owned()),
                (2, "notes".to_owned()),
                (3, "tags".to_owned()),
            ],
        ] {
            assert!(
                refuse_foreign(&applied, &ours, "api-service").is_ok(),
                "{applied:?}"
            );
        }
    }
}
