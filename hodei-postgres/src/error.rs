//! The crate's error type, and how database errors map onto
//! [`StoreError`].

use hodei_core::ports::StoreError;

/// Errors of setting up a [`PgStore`](crate::PgStore).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The database could not be reached or the URL is malformed.
    #[error("cannot connect to postgres: {0}")]
    Connect(#[source] sqlx::Error),
    /// The database records a migration this build does not know: it was
    /// migrated by a newer Hodei.
    #[error(
        "database schema is at migration {applied}, newer than this hodei build knows \
         (latest {known}): it was migrated by a newer hodei version; upgrade hodei or use another database"
    )]
    NewerSchema {
        /// Highest migration recorded in the database.
        applied: i64,
        /// Highest migration embedded in this build.
        known: i64,
    },
    /// Applying the migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(String),
    /// The secret key is missing where one was required, or malformed.
    #[error("secret key: {0}")]
    SecretKey(String),
}

/// Maps a database error onto the port's error.
pub(crate) fn store_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        sqlx::Error::Database(db) => match db.code().as_deref() {
            // unique_violation
            Some("23505") => StoreError::AlreadyExists(db.message().to_owned()),
            // serialization_failure, deadlock_detected, admin shutdown,
            // crash shutdown, cannot_connect_now, too_many_connections,
            // and the connection_exception class (08xxx): the database
            // restarts or the connection was lost; retry.
            Some("40001" | "40P01" | "57P01" | "57P02" | "57P03" | "53300") => {
                StoreError::Unavailable(db.message().to_owned())
            }
            Some(code) if code.starts_with("08") => {
                StoreError::Unavailable(db.message().to_owned())
            }
            _ => StoreError::Other(e.to_string()),
        },
        _ => StoreError::Other(e.to_string()),
    }
}

/// A stored document that does not decode (written by another version?).
pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Other(format!("stored {what} does not decode: {e}"))
}

/// `u64` from a `bigint` column; negative values never occur (the schema
/// only stores counters) but are clamped rather than wrapped.
pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// `bigint` parameter from a `u64`, saturating.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
