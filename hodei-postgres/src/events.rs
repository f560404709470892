//! The event log ([`EventLog`]) and the audit trail ([`AuditQuery`]): one
//! table, `events`, written in the transactions that change state.

use std::sync::LazyLock;

use async_trait::async_trait;
use hodei_core::event::{AggregateKind, DomainEvent, EventBody};
use hodei_core::ids::{Actor, CorrelationId, EventId, JobId};
use hodei_core::ports::{AuditFilter, AuditPage, AuditQuery, EventLog, StoreError};
use hodei_core::time::Timestamp;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};

use crate::PgStore;
use crate::error::{corrupt, store_err, to_i64, to_u64};

/// Channel of event notifications; the payload is the highest sequence of
/// the committing transaction, never the event itself.
pub(crate) const EVENTS_CHANNEL: &str = "hodei_events";

/// Columns read back into a [`DomainEvent`], in [`decode_event`]'s order.
pub(crate) const EVENT_COLUMNS: &str = "sequence, event_id, event_type, aggregate_type, \
     aggregate_id, correlation_id, actor, occurred_at, payload";

/// Page size of reads when the caller says 0.
const DEFAULT_LIMIT: usize = 100;
/// Largest page.
const MAX_LIMIT: usize = 1000;

/// Parameters a [`write_sql`] statement takes for its events, after the
/// parameters of its first part.
pub(crate) const EVENT_PARAMS: usize = 9;

/// One statement that runs `first` (a data-modifying or volatile query,
/// named `j`), then inserts the events bound by [`bind_events`] from
/// parameter `$first_param` on, only if `j` returned a row, and queues
/// one notification with the highest sequence (sent at commit).
///
/// It answers one row: `done` (whether `j` returned a row), `seqs` and
/// `ids` (the stored events' sequences and ids, by sequence). Run alone
/// it commits as one transaction: one round trip for a job change with
/// all its events.
///
/// Ordering inside the statement, which the bus's safe horizon relies on
/// (see the `bus` module): the lock on `events` is taken when the
/// statement starts, and the events' `SELECT` is gated by an uncorrelated
/// `EXISTS` over `j` (a one-time filter, evaluated before its first row),
/// so `j` has run, and the transaction holds its id, before any sequence
/// is drawn. `unnest` yields the arrays in order, so sequences follow the
/// order of the events.
pub(crate) fn write_sql(first: &str, first_param: usize) -> String {
    write_sql_with(first, first_param, "", "")
}

/// [`write_sql`] with more common table expressions after `j`'s (each
/// starting with a comma) and more columns in the answer (each starting
/// with a comma).
pub(crate) fn write_sql_with(
    first: &str,
    first_param: usize,
    more_ctes: &str,
    more_columns: &str,
) -> String {
    let p: Vec<String> = (first_param..first_param + EVENT_PARAMS)
        .map(|i| format!("${i}"))
        .collect();
    format!(
        "WITH j AS ({first}){more_ctes}, \
         e AS (INSERT INTO events (event_id, event_type, aggregate_type, aggregate_id, \
               correlation_id, actor, occurred_at, job_id, payload) \
               SELECT u.* FROM unnest({}::uuid[], {}::text[], {}::text[], {}::text[], \
                   {}::text[], {}::text[], {}::timestamptz[], {}::uuid[], {}::jsonb[]) AS u \
               WHERE EXISTS (SELECT 1 FROM j) \
               RETURNING sequence, event_id), \
         n AS (SELECT pg_notify('{EVENTS_CHANNEL}', max(sequence)::text) FROM e \
               HAVING count(*) > 0) \
         SELECT EXISTS (SELECT 1 FROM j) AS done, \
                ARRAY(SELECT sequence FROM e ORDER BY sequence) AS seqs, \
                ARRAY(SELECT event_id FROM e ORDER BY sequence) AS ids, \
                (SELECT count(*) FROM n) AS notified{more_columns}",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]
    )
}

/// Binds the [`EVENT_PARAMS`] arrays of a [`write_sql`] statement.
pub(crate) fn bind_events<'q>(
    q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    events: &[DomainEvent],
) -> Result<sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>, StoreError> {
    let n = events.len();
    let mut ids = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut aggregate_types = Vec::with_capacity(n);
    let mut aggregate_ids = Vec::with_capacity(n);
    let mut correlations = Vec::with_capacity(n);
    let mut actors = Vec::with_capacity(n);
    let mut at = Vec::with_capacity(n);
    let mut jobs = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    for event in events {
        let (event_type, payload) = split_body(&event.body)?;
        ids.push(*event.event_id.as_uuid());
        types.push(event_type);
        aggregate_types.push(event.aggregate_type.as_str());
        aggregate_ids.push(event.aggregate_id.clone());
        correlations.push(event.correlation_id.as_str().to_owned());
        actors.push(event.actor.as_str().to_owned());
        at.push(event.occurred_at);
        jobs.push(event.job_id().map(|j| j.0));
        payloads.push(payload);
    }
    Ok(q.bind(ids)
        .bind(types)
        .bind(aggregate_types)
        .bind(aggregate_ids)
        .bind(correlations)
        .bind(actors)
        .bind(at)
        .bind(jobs)
        .bind(payloads))
}

/// Reads the answer of a [`write_sql`] statement: whether its first part
/// returned a row, and the events with their sequences.
pub(crate) fn stored_events(
    row: &PgRow,
    mut events: Vec<DomainEvent>,
) -> Result<(bool, Vec<DomainEvent>), StoreError> {
    let get_err = |e: sqlx::Error| corrupt("event write", e);
    let done: bool = row.try_get("done").map_err(get_err)?;
    if !done {
        return Ok((false, events));
    }
    let seqs: Vec<i64> = row.try_get("seqs").map_err(get_err)?;
    let ids: Vec<uuid::Uuid> = row.try_get("ids").map_err(get_err)?;
    if seqs.len() != events.len() || ids.len() != events.len() {
        return Err(StoreError::Other(format!(
            "stored {} of {} events",
            seqs.len(),
            events.len()
        )));
    }
    for event in &mut events {
        let at = ids
            .iter()
            .position(|id| id == event.event_id.as_uuid())
            .ok_or_else(|| StoreError::Other(format!("event {} was not stored", event.event_id)))?;
        event.sequence = to_u64(seqs[at]);
    }
    Ok((true, events))
}

/// Decodes a row selected with [`EVENT_COLUMNS`].
pub(crate) fn decode_event(row: &PgRow) -> Result<DomainEvent, StoreError> {
    let get_err = |e: sqlx::Error| corrupt("event", e);
    let sequence: i64 = row.try_get("sequence").map_err(get_err)?;
    let event_id: uuid::Uuid = row.try_get("event_id").map_err(get_err)?;
    let event_type: String = row.try_get("event_type").map_err(get_err)?;
    let aggregate_type: String = row.try_get("aggregate_type").map_err(get_err)?;
    let aggregate_id: String = row.try_get("aggregate_id").map_err(get_err)?;
    let correlation_id: String = row.try_get("correlation_id").map_err(get_err)?;
    let actor: String = row.try_get("actor").map_err(get_err)?;
    let occurred_at: Timestamp = row.try_get("occurred_at").map_err(get_err)?;
    let payload: Value = row.try_get("payload").map_err(get_err)?;

    let mut tagged = serde_json::Map::new();
    tagged.insert("event_type".into(), Value::String(event_type.clone()));
    if !payload.is_null() {
        tagged.insert("payload".into(), payload);
    }
    let body: EventBody = serde_json::from_value(Value::Object(tagged))
        .map_err(|e| corrupt(&format!("event {sequence} ({event_type})"), e))?;
    let aggregate_type: AggregateKind =
        serde_json::from_value(Value::String(aggregate_type)).map_err(|e| corrupt("event", e))?;
    Ok(DomainEvent {
        event_id: EventId::from_uuid(event_id),
        sequence: to_u64(sequence),
        occurred_at,
        aggregate_type,
        aggregate_id,
        correlation_id: CorrelationId::new(correlation_id),
        actor: Actor::new(actor),
        body,
    })
}

/// Events with `after < sequence <= up_to`, in order, at most `limit`,
/// each decoded on its own: one undecodable row does not hide the others.
pub(crate) async fn read_range(
    store: &PgStore,
    after: u64,
    up_to: Option<u64>,
    limit: usize,
) -> Result<Vec<(u64, Result<DomainEvent, StoreError>)>, StoreError> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE sequence > $1 \
         AND ($2::bigint IS NULL OR sequence <= $2) ORDER BY sequence LIMIT $3"
    )))
    .bind(to_i64(after))
    .bind(up_to.map(to_i64))
    .bind(to_i64(limit as u64))
    .fetch_all(&store.inner.pool)
    .await
    .map_err(store_err)?;
    rows.iter()
        .map(|row| {
            let sequence: i64 = row.try_get("sequence").map_err(|e| corrupt("event", e))?;
            Ok((to_u64(sequence), decode_event(row)))
        })
        .collect()
}

#[async_trait]
impl EventLog for PgStore {
    async fn append(&self, events: Vec<DomainEvent>) -> Result<Vec<DomainEvent>, StoreError> {
        if events.is_empty() {
            return Ok(events);
        }
        // The first part takes a transaction id before sequences are drawn
        // (see write_sql). One statement, one round trip.
        static APPEND: LazyLock<String> =
            LazyLock::new(|| write_sql("SELECT pg_current_xact_id() AS xid", 1));
        let q = bind_events(sqlx::query(sqlx::AssertSqlSafe(APPEND.as_str())), &events)?;
        let row = q.fetch_one(&self.inner.pool).await.map_err(store_err)?;
        let (_, events) = stored_events(&row, events)?;
        Ok(events)
    }

    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<DomainEvent>, StoreError> {
        // The limit is taken literally (callers page with it, or pass
        // usize::MAX to read everything).
        if limit == 0 {
            return Ok(Vec::new());
        }
        read_range(self, after, None, limit)
            .await?
            .into_iter()
            .map(|(_, event)| event)
            .collect()
    }

    async fn last_sequence(&self) -> Result<u64, StoreError> {
        let last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(sequence), 0) FROM events")
            .fetch_one(&self.inner.pool)
            .await
            .map_err(store_err)?;
        Ok(to_u64(last))
    }

    async fn settled_sequence(&self) -> Result<u64, StoreError> {
        crate::bus::settled_sequence(&self.inner.pool).await
    }

    async fn job_events(&self, job: JobId) -> Result<Vec<DomainEvent>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE job_id = $1 ORDER BY sequence"
        )))
        .bind(job.0)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(store_err)?;
        rows.iter().map(decode_event).collect()
    }
}

#[async_trait]
impl AuditQuery for PgStore {
    async fn query(&self, filter: &AuditFilter) -> Result<AuditPage, StoreError> {
        let limit = page_limit(filter.limit);
        let mut count = QueryBuilder::<Postgres>::new("SELECT count(*) FROM events");
        push_filter(&mut count, filter);
        let total: i64 = count
            .build_query_scalar()
            .fetch_one(&self.inner.pool)
            .await
            .map_err(store_err)?;

        let mut page = QueryBuilder::<Postgres>::new(format!("SELECT {EVENT_COLUMNS} FROM events"));
        push_filter(&mut page, filter);
        page.push(" ORDER BY sequence LIMIT ")
            .push_bind(to_i64(limit as u64))
            .push(" OFFSET ")
            .push_bind(to_i64(filter.offset as u64));
        let rows = page
            .build()
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store_err)?;
        let events = rows.iter().map(decode_event).collect::<Result<_, _>>()?;
        Ok(AuditPage {
            events,
            total: to_u64(total),
        })
    }

    async fn purge_before(&self, before: Timestamp, batch: usize) -> Result<u64, StoreError> {
        if batch == 0 {
            return Ok(0);
        }
        // One bounded batch per call: short transactions, no long lock on
        // the table; the caller loops until it returns less than `batch`.
        let done = sqlx::query(
            "DELETE FROM events WHERE sequence IN \
             (SELECT sequence FROM events WHERE occurred_at < $1 ORDER BY sequence LIMIT $2)",
        )
        .bind(before)
        .bind(to_i64(batch as u64))
        .execute(&self.inner.pool)
        .await
        .map_err(store_err)?;
        Ok(done.rows_affected())
    }
}

/// Page size: 0 means the default, anything above the cap is capped.
pub(crate) fn page_limit(limit: usize) -> usize {
    match limit {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    }
}

fn push_filter(q: &mut QueryBuilder<Postgres>, f: &AuditFilter) {
    let mut sep = " WHERE ";
    let mut and = |q: &mut QueryBuilder<Postgres>| {
        q.push(sep);
        sep = " AND ";
    };
    if let Some(c) = &f.correlation_id {
        and(q);
        q.push("correlation_id = ").push_bind(c.clone());
    }
    if let Some(t) = &f.event_type {
        and(q);
        q.push("event_type = ").push_bind(t.clone());
    }
    if let Some(a) = &f.actor {
        and(q);
        q.push("actor = ").push_bind(a.clone());
    }
    if let Some(since) = f.since {
        and(q);
        q.push("occurred_at >= ").push_bind(since);
    }
    if let Some(until) = f.until {
        and(q);
        q.push("occurred_at < ").push_bind(until);
    }
}

/// The stable type name and the payload object of an event body.
fn split_body(body: &EventBody) -> Result<(&'static str, Value), StoreError> {
    let value = serde_json::to_value(body)
        .map_err(|e| StoreError::Invalid(format!("event does not serialize: {e}")))?;
    let payload = match value {
        Value::Object(mut map) => map.remove("payload").unwrap_or(Value::Null),
        _ => Value::Null,
    };
    Ok((body.event_type(), payload))
}
