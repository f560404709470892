//! Workers and their one-time registration tokens ([`WorkerRegistry`]), and
//! provider records ([`ProviderStore`]).

use std::sync::LazyLock;

use async_trait::async_trait;
use hodei_core::event::DomainEvent;
use hodei_core::ids::{ProviderId, WorkerId};
use hodei_core::ports::{
    ProviderRecord, ProviderStore, StoreError, TokenRejection, WorkerRegistry,
};
use hodei_core::time::Timestamp;
use hodei_core::worker::Worker;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::PgStore;
use crate::error::{corrupt, store_err};
use crate::events::{bind_events, stored_events, write_sql};

/// A worker's stored document.
pub(crate) fn worker_record(worker: &Worker) -> Result<Value, StoreError> {
    serde_json::to_value(worker)
        .map_err(|e| StoreError::Invalid(format!("worker does not serialize: {e}")))
}

#[async_trait]
impl WorkerRegistry for PgStore {
    async fn upsert(&self, worker: &Worker) -> Result<(), StoreError> {
        let record = worker_record(worker)?;
        sqlx::query(
            "INSERT INTO workers (id, state, record, last_seen, created_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, record = EXCLUDED.record, \
             last_seen = EXCLUDED.last_seen, created_at = EXCLUDED.created_at",
        )
        .bind(worker.id.0)
        .bind(worker.state.as_str())
        .bind(record)
        .bind(worker.last_seen)
        .bind(worker.created_at)
        .execute(&self.inner.pool)
        .await
        .map_err(store_err)?;
        Ok(())
    }

    async fn upsert_recording(
        &self,
        worker: &Worker,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        // One statement: the upsert, then its events and their
        // notification (see `write_sql`); one transaction.
        static UPSERT_RECORDING: LazyLock<String> = LazyLock::new(|| {
            write_sql(
                "INSERT INTO workers (id, state, record, last_seen, created_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, \
                 record = EXCLUDED.record, last_seen = EXCLUDED.last_seen, \
                 created_at = EXCLUDED.created_at RETURNING 1",
                6,
            )
        });
        let record = worker_record(worker)?;
        let q = sqlx::query(sqlx::AssertSqlSafe(UPSERT_RECORDING.as_str()))
            .bind(worker.id.0)
            .bind(worker.state.as_str())
            .bind(record)
            .bind(worker.last_seen)
            .bind(worker.created_at);
        write_recording(self, q, events, || format!("worker {}", worker.id)).await
    }

    fn upsert_records_events(&self) -> bool {
        true
    }

    async fn upsert_many_recording(
        &self,
        entries: Vec<(Worker, Vec<DomainEvent>)>,
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        // One statement: the upserts, then every event and their
        // notification (see `write_sql`); one transaction.
        static UPSERT_MANY: LazyLock<String> = LazyLock::new(|| {
            write_sql(
                "INSERT INTO workers (id, state, record, last_seen, created_at) \
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[], \
                     $4::timestamptz[], $5::timestamptz[]) \
                 ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, \
                     record = EXCLUDED.record, last_seen = EXCLUDED.last_seen, \
                     created_at = EXCLUDED.created_at \
                 RETURNING 1",
                6,
            )
        });
        let events: Vec<DomainEvent> = entries.iter().flat_map(|(_, e)| e.clone()).collect();
        let q = sqlx::query(sqlx::AssertSqlSafe(UPSERT_MANY.as_str()));
        let q = crate::jobs::bind_workers(q, entries.iter().map(|(w, _)| w))?;
        let answer = bind_events(q, &events)?
            .fetch_one(&self.inner.pool)
            .await
            .map_err(store_err)?;
        let (saved, _) = stored_events(&answer, events)?;
        if !saved {
            return Err(StoreError::Other(format!(
                "{} worker records were not saved",
                entries.len()
            )));
        }
        Ok(())
    }

    async fn get(&self, id: WorkerId) -> Result<Option<Worker>, StoreError> {
        let row = sqlx::query("SELECT record FROM workers WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(store_err)?;
        row.as_ref().map(decode_worker).transpose()
    }

    async fn list(&self) -> Result<Vec<Worker>, StoreError> {
        // "Recently terminated" without reading a clock: the most recently
        // seen N terminated workers.
        let rows = sqlx::query(
            "SELECT record, created_at, id FROM workers WHERE state <> 'TERMINATED' \
             UNION ALL \
             (SELECT record, created_at, id FROM workers WHERE state = 'TERMINATED' \
              ORDER BY last_seen DESC LIMIT $1) \
             ORDER BY created_at, id",
        )
        .bind(i64::from(self.inner.options.terminated_workers_listed))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(store_err)?;
        rows.iter().map(decode_worker).collect()
    }

    async fn issue_token(
        &self,
        worker: WorkerId,
        token: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError> {
        let done = sqlx::query(
            "INSERT INTO worker_tokens (token_sha256, worker_id, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (token_sha256) DO NOTHING",
        )
        .bind(token_digest(token))
        .bind(worker.0)
        .bind(expires_at)
        .execute(&self.inner.pool)
        .await
        .map_err(store_err)?;
        if done.rows_affected() == 0 {
            // Never re-arm a token: a used one would become valid again.
            return Err(StoreError::AlreadyExists("registration token".into()));
        }
        Ok(())
    }

    async fn consume_token(
        &self,
        token: &str,
        now: Timestamp,
    ) -> Result<Result<WorkerId, TokenRejection>, StoreError> {
        let digest = token_digest(token);
        // One statement: of two concurrent consumers, the second waits for
        // the first's row lock, re-checks `used_at` and finds it set.
        let consumed: Option<uuid::Uuid> = sqlx::query_scalar(
            "UPDATE worker_tokens SET used_at = $2 \
             WHERE token_sha256 = $1 AND used_at IS NULL AND expires_at > $2 \
             RETURNING worker_id",
        )
        .bind(&digest)
        .bind(now)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(store_err)?;
        if let Some(worker) = consumed {
            return Ok(Ok(WorkerId::from_uuid(worker)));
        }
        let used: Option<Option<Timestamp>> =
            sqlx::query_scalar("SELECT used_at FROM worker_tokens WHERE token_sha256 = $1")
                .bind(&digest)
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(store_err)?;
        Ok(Err(match used {
            None => TokenRejection::Unknown,
            Some(Some(_)) => TokenRejection::Reused,
            Some(None) => TokenRejection::Expired,
        }))
    }

    async fn consume_token_for(
        &self,
        worker: WorkerId,
        token: &str,
        now: Timestamp,
    ) -> Result<Result<WorkerId, TokenRejection>, StoreError> {
        // A token of another worker is left unused (a typo in the worker
        // id must not burn it); then the usual one-statement consume.
        let owner: Option<uuid::Uuid> =
            sqlx::query_scalar("SELECT worker_id FROM worker_tokens WHERE token_sha256 = $1")
                .bind(token_digest(token))
                .fetch_optional(&self.inner.pool)
                .await
                .map_err(store_err)?;
        if owner.is_some_and(|w| w != worker.0) {
            return Ok(Err(TokenRejection::OtherWorker));
        }
        self.consume_token(token, now).await
    }
}

/// Runs a [`write_sql`] statement whose first part has its parameters
/// bound in `q`, with `events` bound after them; an error when the first
/// part stored nothing (`what` names the record).
async fn write_recording(
    store: &PgStore,
    q: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    events: Vec<DomainEvent>,
    what: impl FnOnce() -> String,
) -> Result<Vec<DomainEvent>, StoreError> {
    let answer = bind_events(q, &events)?
        .fetch_one(&store.inner.pool)
        .await
        .map_err(store_err)?;
    let (saved, events) = stored_events(&answer, events)?;
    if !saved {
        return Err(StoreError::Other(format!("{} was not saved", what())));
    }
    Ok(events)
}

#[async_trait]
impl ProviderStore for PgStore {
    async fn upsert(&self, record: &ProviderRecord) -> Result<(), StoreError> {
        // Rare (start, health changes): the same statement, no events.
        ProviderStore::upsert_recording(self, record, Vec::new())
            .await
            .map(drop)
    }

    async fn upsert_recording(
        &self,
        record: &ProviderRecord,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        // One statement: the upsert, then its events and their
        // notification (see `write_sql`); one transaction.
        static UPSERT_RECORDING: LazyLock<String> = LazyLock::new(|| {
            write_sql(
                "INSERT INTO providers (id, kind, config, healthy, health_message, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (id) DO UPDATE SET kind = EXCLUDED.kind, config = EXCLUDED.config, \
                 healthy = EXCLUDED.healthy, health_message = EXCLUDED.health_message, \
                 updated_at = EXCLUDED.updated_at RETURNING 1",
                7,
            )
        });
        let q = sqlx::query(sqlx::AssertSqlSafe(UPSERT_RECORDING.as_str()))
            .bind(record.id.as_str())
            .bind(&record.kind)
            .bind(&record.config)
            .bind(record.healthy)
            .bind(&record.health_message)
            .bind(record.updated_at);
        write_recording(self, q, events, || format!("provider {}", record.id)).await
    }

    fn upsert_records_events(&self) -> bool {
        true
    }

    async fn list(&self) -> Result<Vec<ProviderRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, config, healthy, health_message, updated_at FROM providers \
             ORDER BY id",
        )
        .fetch_all(&self.inner.pool)
        .await
        .map_err(store_err)?;
        rows.iter()
            .map(|row| {
                let get_err = |e: sqlx::Error| corrupt("provider", e);
                let id: String = row.try_get("id").map_err(get_err)?;
                let config: Value = row.try_get("config").map_err(get_err)?;
                Ok(ProviderRecord {
                    id: ProviderId::new(id),
                    kind: row.try_get("kind").map_err(get_err)?,
                    config,
                    healthy: row.try_get("healthy").map_err(get_err)?,
                    health_message: row.try_get("health_message").map_err(get_err)?,
                    updated_at: row.try_get("updated_at").map_err(get_err)?,
                })
            })
            .collect()
    }
}

/// Tokens are stored as their SHA-256 only: a database dump does not
/// hand out registrations.
fn token_digest(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn decode_worker(row: &PgRow) -> Result<Worker, StoreError> {
    let record: Value = row.try_get("record").map_err(|e| corrupt("worker", e))?;
    serde_json::from_value(record).map_err(|e| corrupt("worker", e))
}
