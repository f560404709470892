//! Leases on singleton duties ([`Leases`]): one row per duty in the
//! `leases` table.
//!
//! Acquiring is one `INSERT … ON CONFLICT (duty) DO UPDATE … WHERE` the
//! stored lease ended or is the caller's own: PostgreSQL serialises
//! concurrent upserts of one duty on its row (or its primary key, for a
//! duty seen for the first time) and re-evaluates the condition after the
//! wait, so of several replicas asking at once exactly one gets a row back.
//! Like the queue, expiry compares with the `now` the caller gives, never
//! the database's clock.

use std::time::Duration;

use async_trait::async_trait;
use hodei_core::ports::{Leases, StoreError};
use hodei_core::time::{Timestamp, add};

use crate::PgStore;
use crate::error::store_err;

#[async_trait]
impl Leases for PgStore {
    async fn try_acquire(
        &self,
        duty: &str,
        holder: &str,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let won: Option<String> = sqlx::query_scalar(
            "INSERT INTO leases AS l (duty, holder, expires_at, acquired_at) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (duty) DO UPDATE SET holder = EXCLUDED.holder, \
                 expires_at = EXCLUDED.expires_at, \
                 acquired_at = CASE WHEN l.holder = EXCLUDED.holder \
                     THEN l.acquired_at ELSE EXCLUDED.acquired_at END \
             WHERE l.expires_at <= $4 OR l.holder = EXCLUDED.holder \
             RETURNING l.holder",
        )
        .bind(duty)
        .bind(holder)
        .bind(add(now, ttl))
        .bind(now)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(store_err)?;
        Ok(won.is_some())
    }

    async fn release(&self, duty: &str, holder: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leases WHERE duty = $1 AND holder = $2")
            .bind(duty)
            .bind(holder)
            .execute(&self.inner.pool)
            .await
            .map_err(store_err)?;
        Ok(())
    }
}
