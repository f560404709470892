//! The embedded, versioned migrations and the guard against databases
//! migrated by a newer Hodei.

use sqlx::PgPool;
use sqlx::migrate::{MigrateError, Migrator};

use crate::error::PgError;

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
