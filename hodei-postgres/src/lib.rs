//! # hodei-postgres
//!
//! PostgreSQL adapters of every store port of [`hodei_core::ports`]:
//! [`JobStore`], [`JobQueue`], [`EventLog`], [`EventSubscription`],
//! [`AuditQuery`], [`LogStore`], [`SecretStore`], [`WorkerRegistry`],
//! [`ProviderStore`] and [`Leases`], all implemented by one cloneable [`PgStore`] over a
//! [`sqlx::PgPool`]. Several Hodei replicas can share one database: the
//! database arbitrates between them.
//!
//! ## How the parts fit
//! - **Schema.** Versioned migrations live in `hodei-postgres/migrations`,
//!   are embedded in the binary and applied by [`PgStore::connect`] (under
//!   sqlx's advisory lock, so replicas starting together are fine; applying
//!   them again is a no-op). A database migrated by a *newer* Hodei (it
//!   records a migration this build does not know) is refused with
//!   [`PgError::NewerSchema`] rather than used half-understood.
//! - **Jobs and their events, atomically, in one round trip.**
//!   [`JobStore::create`] inserts the job row and its events in one
//!   statement (so one implicit transaction): the row, then, only if it was
//!   inserted, every event in one multi-row `INSERT … SELECT … FROM
//!   unnest(…)`, and the notification. [`JobStore::update`] is the same
//!   around an `UPDATE … WHERE id = $1 AND version = $expected`, and reports
//!   [`StoreError::Conflict`] with the version found when another replica
//!   won. The idempotency key is a unique column: a second submission with
//!   the same key stores nothing and returns the first job. An update that
//!   ends the job also marks its log finished and wakes its followers
//!   ([`JobStore::update_finishes_logs`]), and
//!   [`JobStore::update_saving_workers`] saves the worker records a
//!   decision changed in the same statement (whether or not the job's
//!   version matched), so an assignment or a result is one statement.
//!   The runtime's driver gathers the writes of one pass:
//!   [`JobStore::update_many`] and [`JobStore::create_many`] store several
//!   jobs' changes or creations in one statement (each entry decided on its
//!   own: a conflict or a used idempotency key answers for that entry
//!   only), and [`WorkerRegistry::upsert_recording`] /
//!   [`WorkerRegistry::upsert_many_recording`] store worker records with
//!   the events of their change ([`ProviderStore::upsert_recording`] does
//!   the same for provider records).
//! - **The queue is the `jobs` table.** A job is queued while its `state`
//!   column is `PENDING`; `queue_order` (renewed each time it re-enters the
//!   queue) gives FIFO order within a priority. [`JobQueue::claim`] selects
//!   ready rows `FOR UPDATE SKIP LOCKED` and stamps them with the claimant
//!   and a lease, so concurrent claimants never get the same job and a
//!   claim of a dead replica lapses by itself; the same statement says when
//!   the next waiting job is claimable. The deadline of `SCHEDULED`,
//!   `ASSIGNED` and `RUNNING` is a column too, for [`JobQueue::overdue`].
//! - **The event log is an outbox.** Events get a `bigserial` sequence in the
//!   transaction that writes them; every such transaction also sends a
//!   `NOTIFY hodei_events` carrying only the sequence. The audit trail is a
//!   query over the same table.
//! - **The event bus never skips an event.** Sequences are allocated before
//!   commit, so sequence 11 can become visible before 10. A background
//!   task per store (started by the first subscriber, beside a second one
//!   that owns the `LISTEN` connection) maintains a *safe horizon*: in one
//!   round trip it reads the last allocated sequence `S`, then lists from
//!   `pg_locks` the transactions holding a write lock on `events` (a writer
//!   takes it before it draws a sequence and keeps it until it ends, and
//!   releases it only once its commit is visible). Once none of those
//!   transactions is listed any more, every committed event up to `S` is
//!   visible and no other can appear, so `S` becomes the horizon. Only
//!   transactions that write `events` delay it, each until it ends: an
//!   unrelated long transaction does not, and a rolled-back one leaves a
//!   gap that is passed as soon as it ends. Subscribers only deliver
//!   events up to the horizon, in sequence order, catching up from the
//!   table first. NOTIFY only wakes the task early; a periodic poll covers
//!   lost notifications, and the `LISTEN` connection is re-established
//!   with backoff when it drops (events committed meanwhile are read from
//!   the table, so nothing is lost). See the `bus` module.
//!   [`EventLog::read_after`] is a plain read of what is visible; use the
//!   subscription, not `read_after`, to tail the log. To subscribe "from
//!   now", start after [`EventLog::settled_sequence`] (the last sequence
//!   drawn, once the writers open at the call have ended), not after
//!   [`EventLog::last_sequence`] (`MAX(sequence)`, which an open
//!   transaction holding a lower sequence can still commit under).
//! - **Logs** are stored one row per appended batch (a JSON array of
//!   lines with their range of per-job sequences). A per-job head row is
//!   locked by each append, which makes the store-assigned sequences gap-free
//!   and committed in order, and makes the de-duplication of re-sent lines
//!   (by attempt and agent sequence) race-free. The head also keeps the
//!   highest (attempt, agent sequence) stored: a batch above it (the usual
//!   case) is stored by one statement; one that may overlap stored lines
//!   reads them first. `follow` reads history, then wakes on `NOTIFY
//!   hodei_logs` (or a poll) until the log is finished.
//! - **Secrets** are encrypted with AES-256-GCM, a fresh random nonce per
//!   value and the secret's name as associated data. The key comes from
//!   `HODEI_SECRET_KEY` (32 bytes, base64 or hex) or a key file
//!   ([`SecretKeySource`]); without one, `put` and `get` are refused with
//!   [`StoreError::Invalid`] and `list`/`delete` still work.
//! - **Workers** are stored as JSON records; their one-time registration
//!   tokens only as SHA-256 digests, consumed by one atomic `UPDATE`.
//! - **Leases** on singleton duties (deadline sweep, retention, removal of
//!   leftover workers) are one row per duty, taken or renewed by one
//!   conditional upsert (`ON CONFLICT (duty) DO UPDATE … WHERE` the lease
//!   ended or is the caller's own), so one replica at a time runs each.
//!
//! Timestamps are stored as `timestamptz`, i.e. with microsecond precision.
//! The store never decides what time it is for the queue: `claim` and
//! `overdue` compare against the `now` they are given, like the in-memory
//! store, so both pass the same [`hodei_core::conformance`] suite.
//!
//! ## Example
//! ```no_run
//! # async fn demo() -> Result<(), hodei_postgres::PgError> {
//! use hodei_postgres::{PgStore, PgStoreOptions};
//! let store = PgStore::connect("postgres://hodei@localhost/hodei", PgStoreOptions::default()).await?;
//! let shared: std::sync::Arc<dyn hodei_core::ports::JobStore> = std::sync::Arc::new(store.clone());
//! # let _ = shared; Ok(()) }
//! ```

#![warn(missing_docs)]

mod bus;
mod error;
mod events;
mod jobs;
mod lease;
mod logs;
mod migrate;
mod secrets;
mod workers;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub use error::PgError;
pub use migrate::{MIGRATOR, migrate};
pub use secrets::{SecretKey, SecretKeySource};

#[allow(unused_imports)] // for the links of the crate documentation
use hodei_core::ports::{
    AuditQuery, EventLog, EventSubscription, JobQueue, JobStore, Leases, LogStore, ProviderStore,
    SecretStore, StoreError, WorkerRegistry,
};

/// Tuning of a [`PgStore`].
#[derive(Debug, Clone)]
pub struct PgStoreOptions {
    /// Connections of the pool (default 10). The event bus uses one more,
    /// its own, for `LISTEN`.
    pub max_connections: u32,
    /// How long a query waits for a free connection (default 10 s).
    pub acquire_timeout: Duration,
    /// Where the secret encryption key comes from (default: the
    /// `HODEI_SECRET_KEY` environment variable, if set).
    pub secret_key: SecretKeySource,
    /// Poll period of the event bus while a transaction it waits for is
    /// still open (default 50 ms).
    pub bus_busy_poll: Duration,
    /// Poll period of the event bus when idle, a safety net for lost
    /// notifications (default 1 s).
    pub bus_idle_poll: Duration,
    /// Terminated workers kept in [`WorkerRegistry::list`] (default 100, the
    /// most recently seen).
    pub terminated_workers_listed: u32,
}

impl Default for PgStoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(10),
            secret_key: SecretKeySource::Env,
            bus_busy_poll: Duration::from_millis(50),
            bus_idle_poll: Duration::from_secs(1),
            terminated_workers_listed: 100,
        }
    }
}

impl PgStoreOptions {
    /// Default options reading the secret key from the file at `path`.
    pub fn with_secret_key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.secret_key = SecretKeySource::File(path.into());
        self
    }

    /// Default options with this secret key.
    pub fn with_secret_key(mut self, key: SecretKey) -> Self {
        self.secret_key = SecretKeySource::Key(key);
        self
    }
}

/// Every store port of Hodei on PostgreSQL. Cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("pool_size", &self.inner.pool.size())
            .field("secrets_enabled", &self.inner.secret_key.is_some())
            .finish_non_exhaustive()
    }
}

struct Inner {
    pool: PgPool,
    options: PgStoreOptions,
    secret_key: Option<SecretKey>,
    bus: OnceLock<bus::Bus>,
}

impl PgStore {
    /// Connects to `url`, applies the migrations and resolves the secret
    /// key.
    pub async fn connect(url: &str, options: PgStoreOptions) -> Result<Self, PgError> {
        let connect: PgConnectOptions = url.parse().map_err(PgError::Connect)?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect)
            .await
            .map_err(PgError::Connect)?;
        Self::from_pool(pool, options).await
    }

    /// Builds the store over an existing pool: applies the migrations and
    /// resolves the secret key.
    pub async fn from_pool(pool: PgPool, options: PgStoreOptions) -> Result<Self, PgError> {
        let secret_key = options.secret_key.resolve()?;
        migrate(&pool).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                options,
                secret_key,
                bus: OnceLock::new(),
            }),
        })
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Whether a secret key is configured (secrets can be stored).
    pub fn secrets_enabled(&self) -> bool {
        self.inner.secret_key.is_some()
    }

    /// Diagnostics of the event bus (all zero until the first subscriber).
    pub fn bus_stats(&self) -> BusStats {
        self.inner
            .bus
            .get()
            .map(bus::Bus::stats)
            .unwrap_or_default()
    }

    /// Closes the pool: pending queries finish, new ones fail.
    pub async fn close(&self) {
        self.inner.pool.close().await;
    }
}

/// Diagnostics of the event bus of a [`PgStore`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Times the `LISTEN` connection was (re-)established.
    pub listener_connects: u64,
    /// Current safe horizon: every event up to this sequence is visible.
    pub horizon: u64,
}
