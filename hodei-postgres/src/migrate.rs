//! The embedded, versioned migrations and the guard against databases
//! migrated by a newer Hodei.

use sqlx::PgPool;
use sqlx::migrate::{MigrateError, Migrator};

use hodei_core::ports::StoreError;

use crate::error::{PgError, store_err};

/// The migrations of `hodei-postgres/migrations`, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Applies the pending migrations; a no-op when the schema is current.
///
/// Refuses ([`PgError::NewerSchema`]) a database that records a migration
/// this build does not know, instead of running against a schema it does not
/// understand. Safe to call from several replicas at once (sqlx serialises
/// migrators with an advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<(), PgError> {
    let known = latest_known();
    if let Some(applied) = unknown_applied(pool).await? {
        return Err(PgError::NewerSchema { applied, known });
    }
    MIGRATOR.run(pool).await.map_err(|e| match e {
        // Raced with a newer replica that migrated in between.
        MigrateError::VersionMissing(applied) => PgError::NewerSchema { applied, known },
        other => PgError::Migrate(other.to_string()),
    })
}

fn latest_known() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

/// The highest applied migration this build does not know, if any.
async fn unknown_applied(pool: &PgPool) -> Result<Option<i64>, PgError> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await
        .map_err(PgError::Connect)?;
    if !exists {
        return Ok(None);
    }
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(pool)
            .await
            .map_err(|e| PgError::Migrate(e.to_string()))?;
    Ok(applied
        .into_iter()
        .filter(|v| !MIGRATOR.version_exists(*v))
        .max())
}

/// Whether the schema is the one this build expects: every embedded
/// migration applied and none unknown. `Err` says what differs, for
/// `/readyz`.
pub(crate) async fn check_current(pool: &PgPool) -> Result<(), StoreError> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await
            .map_err(|e| match e {
                sqlx::Error::Database(ref db) if db.code().as_deref() == Some("42P01") => {
                    StoreError::Unavailable(
                        "the database is not migrated (no _sqlx_migrations table); \
                 start hodei-server on it to apply the migrations"
                            .into(),
                    )
                }
                other => store_err(other),
            })?;
    let known = latest_known();
    if let Some(newer) = applied
        .iter()
        .copied()
        .filter(|v| !MIGRATOR.version_exists(*v))
        .max()
    {
        return Err(StoreError::Unavailable(format!(
            "the database schema is at migration {newer}, newer than this build knows \
             (latest {known}); another hodei version migrated it"
        )));
    }
    if let Some(missing) = MIGRATOR
        .iter()
        .map(|m| m.version)
        .find(|v| !applied.contains(v))
    {
        return Err(StoreError::Unavailable(format!(
            "the database lacks migration {missing} of this build (latest {known}); \
             restart hodei-server to apply it"
        )));
    }
    Ok(())
}
