//! Jobs ([`JobStore`]) and the queue ([`JobQueue`]), both on the `jobs`
//! table: a job is queued while its `state` column is `PENDING`.

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use hodei_core::event::DomainEvent;
use hodei_core::ids::{Actor, CorrelationId, JobId};
use hodei_core::job::{Attempt, Job, JobStatus};
use hodei_core::ports::{
    Claim, CreateAnswers, Created, JobFilter, JobPage, JobQueue, JobStore, JobUpdate, NewJob,
    StoreError, UpdateAnswers,
};
use hodei_core::spec::JobSpec;
use hodei_core::time::{Timestamp, add};
use hodei_core::worker::Worker;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{Postgres, QueryBuilder, Row};

use crate::PgStore;
use crate::error::{corrupt, store_err, to_i64, to_u64};
use crate::events::{
    EVENTS_CHANNEL, bind_events, page_limit, stored_events, write_sql, write_sql_with,
};
use crate::logs::LOGS_CHANNEL;

/// Columns read back into a [`Job`], for [`decode_job`].
const JOB_COLUMNS: &str = "id, spec, status, attempts, attempt, version, correlation_id, \
     submitted_by, created_at, updated_at";

/// Most jobs one claim or one overdue sweep returns.
const MAX_BATCH: usize = 1000;

#[async_trait]
impl JobStore for PgStore {
    async fn create(&self, job: &Job, events: Vec<DomainEvent>) -> Result<Created, StoreError> {
        // One statement: the row, then (only if it was inserted) the
        // events and their notification; one round trip, one transaction.
        // ON CONFLICT covers both the id and the idempotency key; a
        // concurrent insert of the same key is waited for.
        static CREATE: LazyLock<String> = LazyLock::new(|| {
            write_sql(
                "INSERT INTO jobs (id, spec, status, attempts, state, priority, not_before, \
                 deadline, attempt, version, correlation_id, submitted_by, idempotency_key, \
                 created_at, updated_at, queue_order) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                 CASE WHEN $5 = 'PENDING' THEN nextval('job_queue_order') END) \
                 ON CONFLICT DO NOTHING RETURNING id",
                16,
            )
        });
        let row = JobRow::of(job)?;
        let q = sqlx::query(sqlx::AssertSqlSafe(CREATE.as_str()))
            .bind(job.id.0)
            .bind(row.spec)
            .bind(row.status)
            .bind(row.attempts)
            .bind(row.state)
            .bind(row.priority)
            .bind(row.not_before)
            .bind(row.deadline)
            .bind(row.attempt)
            .bind(row.version)
            .bind(job.correlation_id.as_str().to_owned())
            .bind(job.submitted_by.as_str().to_owned())
            .bind(job.spec.idempotency_key().map(str::to_owned))
            .bind(job.created_at)
            .bind(job.updated_at);
        let answer = bind_events(q, &events)?
            .fetch_one(&self.inner.pool)
            .await
            .map_err(store_err)?;
        let (inserted, events) = stored_events(&answer, events)?;
        if inserted {
            return Ok(Created::New(events));
        }
        if let Some(key) = job.spec.idempotency_key() {
            let existing = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE idempotency_key = $1"
            )))
            .bind(key)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(store_err)?;
            if let Some(existing) = existing {
                return Ok(Created::Existing(Box::new(decode_job(&existing)?)));
            }
        }
        Err(StoreError::AlreadyExists(format!("job {}", job.id)))
    }

    async fn update(
        &self,
        job: &Job,
        expected_version: u64,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        update_job(self, job, expected_version, events, &[]).await
    }

    async fn update_saving_workers(
        &self,
        job: &Job,
        expected_version: u64,
        events: Vec<DomainEvent>,
        workers: &[Worker],
    ) -> Result<Vec<DomainEvent>, StoreError> {
        update_job(self, job, expected_version, events, workers).await
    }

    fn update_saves_workers(&self) -> bool {
        true
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"
        )))
        .bind(id.0)
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(store_err)?;
        row.as_ref().map(decode_job).transpose()
    }

    fn update_finishes_logs(&self) -> bool {
        true
    }

    async fn update_many(&self, updates: Vec<JobUpdate>) -> Result<UpdateAnswers, StoreError> {
        update_jobs(self, updates).await
    }

    async fn create_many(&self, jobs: Vec<NewJob>) -> Result<CreateAnswers, StoreError> {
        create_jobs(self, jobs).await
    }

    fn batches_creates(&self) -> bool {
        true
    }

    fn batches_updates(&self) -> bool {
        true
    }

    async fn list(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        let limit = page_limit(filter.limit);
        let cursor = filter.cursor.as_deref().map(Cursor::parse).transpose()?;
        let mut q = QueryBuilder::<Postgres>::new(format!("SELECT {JOB_COLUMNS} FROM jobs"));
        let mut sep = " WHERE ";
        if let Some(state) = filter.state {
            q.push(sep).push("state = ").push_bind(state.as_str());
            sep = " AND ";
        }
        if let Some(c) = cursor {
            q.push(sep)
                .push("(created_at, id) < (")
                .push_bind(c.created_at)
                .push(", ")
                .push_bind(c.id)
                .push(")");
        }
        q.push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(to_i64(limit as u64 + 1));
        let rows = q
            .build()
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store_err)?;
        let mut jobs = rows.iter().map(decode_job).collect::<Result<Vec<_>, _>>()?;
        let next_cursor = if jobs.len() > limit {
            jobs.truncate(limit);
            jobs.last().map(|j| Cursor::of(j).to_string())
        } else {
            None
        };
        Ok(JobPage { jobs, next_cursor })
    }
}

/// [`JobStore::update`], and with `workers` also
/// [`JobStore::update_saving_workers`]: one statement.
async fn update_job(
    store: &PgStore,
    job: &Job,
    expected_version: u64,
    events: Vec<DomainEvent>,
    workers: &[Worker],
) -> Result<Vec<DomainEvent>, StoreError> {
    // One statement: the conditional update, then (only if it matched)
    // the events and their notification; one round trip, one
    // transaction. In SET, bare column names are the values before
    // the update: a job that enters PENDING gets a place at the end of
    // its priority, one that stays keeps its place, one that leaves
    // PENDING leaves the queue. Any change ends the claim on it. A job
    // that ends also has its log marked finished and its followers
    // woken (`lf`, `ln`: what `LogStore::finish` does), so the runtime
    // needs no second statement (`update_finishes_logs`). With workers,
    // `w` saves their records whether or not the job matched.
    fn sql(with_workers: bool) -> String {
        let mut ctes = format!(
            ", lf AS (INSERT INTO log_heads (job_id, finished) \
                 SELECT id, true FROM j \
                 WHERE $6 IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT') \
                 ON CONFLICT (job_id) DO UPDATE SET finished = true \
                 RETURNING job_id, last_seq), \
             ln AS (SELECT pg_notify('{LOGS_CHANNEL}', lf.job_id::text || ':' || lf.last_seq) \
                 FROM lf)"
        );
        let mut columns = ", (SELECT count(*) FROM ln) AS log_notified".to_owned();
        if with_workers {
            ctes.push_str(&workers_cte(13 + crate::events::EVENT_PARAMS));
            columns.push_str(", (SELECT count(*) FROM w) AS workers_saved");
        }
        write_sql_with(
            "UPDATE jobs SET spec = $3, status = $4, attempts = $5, state = $6, \
             priority = $7, not_before = $8, deadline = $9, attempt = $10, version = $11, \
             updated_at = $12, \
             queue_order = CASE \
                 WHEN $6 <> 'PENDING' THEN NULL \
                 WHEN state = 'PENDING' THEN queue_order \
                 ELSE nextval('job_queue_order') END, \
             claim_owner = NULL, claim_until = NULL \
             WHERE id = $1 AND version = $2 RETURNING id",
            13,
            &ctes,
            &columns,
        )
    }
    static UPDATE: LazyLock<String> = LazyLock::new(|| sql(false));
    static UPDATE_WITH_WORKERS: LazyLock<String> = LazyLock::new(|| sql(true));
    let text = if workers.is_empty() {
        UPDATE.as_str()
    } else {
        UPDATE_WITH_WORKERS.as_str()
    };
    let row = JobRow::of(job)?;
    let q = sqlx::query(sqlx::AssertSqlSafe(text))
        .bind(job.id.0)
        .bind(to_i64(expected_version))
        .bind(row.spec)
        .bind(row.status)
        .bind(row.attempts)
        .bind(row.state)
        .bind(row.priority)
        .bind(row.not_before)
        .bind(row.deadline)
        .bind(row.attempt)
        .bind(row.version)
        .bind(job.updated_at);
    let mut q = bind_events(q, &events)?;
    if !workers.is_empty() {
        q = bind_workers(q, workers.iter())?;
    }
    let answer = q.fetch_one(&store.inner.pool).await.map_err(store_err)?;
    let (updated, events) = stored_events(&answer, events)?;
    if updated {
        return Ok(events);
    }
    let found: Option<i64> = sqlx::query_scalar("SELECT version FROM jobs WHERE id = $1")
        .bind(job.id.0)
        .fetch_optional(&store.inner.pool)
        .await
        .map_err(store_err)?;
    Err(match found {
        None => StoreError::NotFound(format!("job {}", job.id)),
        Some(found) => StoreError::Conflict {
            job: job.id,
            expected: expected_version,
            found: to_u64(found),
        },
    })
}

/// The columns of several jobs as arrays, bound as `$1..$11` of a batch
/// statement (`unnest(`[`JobColumns::UNNEST`]`)`, in the order `id, spec,
/// status, attempts, state, priority, not_before, deadline, attempt,
/// version, updated_at`), with their entries' events and each event's job
/// (for [`bind_owned_events`]).
struct JobColumns {
    ids: Vec<uuid::Uuid>,
    specs: Vec<Value>,
    statuses: Vec<Value>,
    attempts: Vec<Value>,
    states: Vec<&'static str>,
    priorities: Vec<i32>,
    not_befores: Vec<Option<Timestamp>>,
    deadlines: Vec<Option<Timestamp>>,
    attempt_nos: Vec<i32>,
    versions: Vec<i64>,
    updated_at: Vec<Timestamp>,
    events: Vec<DomainEvent>,
    owners: Vec<uuid::Uuid>,
}

impl JobColumns {
    /// The typed parameters `$1..$11`, for `unnest(…)`.
    const UNNEST: &str = "$1::uuid[], $2::jsonb[], $3::jsonb[], $4::jsonb[], $5::text[], \
         $6::int4[], $7::timestamptz[], $8::timestamptz[], $9::int4[], $10::int8[], \
         $11::timestamptz[]";

    fn with_capacity(n: usize) -> Self {
        Self {
            ids: Vec::with_capacity(n),
            specs: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            attempts: Vec::with_capacity(n),
            states: Vec::with_capacity(n),
            priorities: Vec::with_capacity(n),
            not_befores: Vec::with_capacity(n),
            deadlines: Vec::with_capacity(n),
            attempt_nos: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            updated_at: Vec::with_capacity(n),
            events: Vec::new(),
            owners: Vec::new(),
        }
    }

    fn push(&mut self, job: &Job, events: &[DomainEvent]) -> Result<(), StoreError> {
        let row = JobRow::of(job)?;
        self.ids.push(job.id.0);
        self.specs.push(row.spec);
        self.statuses.push(row.status);
        self.attempts.push(row.attempts);
        self.states.push(row.state);
        self.priorities.push(row.priority);
        self.not_befores.push(row.not_before);
        self.deadlines.push(row.deadline);
        self.attempt_nos.push(row.attempt);
        self.versions.push(row.version);
        self.updated_at.push(job.updated_at);
        self.events.extend(events.iter().cloned());
        self.owners.extend(events.iter().map(|_| job.id.0));
        Ok(())
    }

    /// Binds `$1..$11`; returns the events and their owners, bound later
    /// (after the statement's own parameters).
    fn bind<'q>(
        self,
        q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    ) -> (
        sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
        Vec<DomainEvent>,
        Vec<uuid::Uuid>,
    ) {
        let q = q
            .bind(self.ids)
            .bind(self.specs)
            .bind(self.statuses)
            .bind(self.attempts)
            .bind(self.states)
            .bind(self.priorities)
            .bind(self.not_befores)
            .bind(self.deadlines)
            .bind(self.attempt_nos)
            .bind(self.versions)
            .bind(self.updated_at);
        (q, self.events, self.owners)
    }
}

/// The events of a batch statement, each tagged with the job of its entry
/// (its *owner*): common table expressions `e` (the insert of the events
/// whose owner is among the ids `j` returned) and `n` (their
/// notification), from parameter `$p` on ([`bind_owned_events`]). The
/// filter is an uncorrelated `ARRAY(SELECT id FROM j)`, an init plan run
/// to the end before the first row: every job row is written, and the
/// transaction holds its id, before any sequence is drawn (what the bus's
/// horizon relies on, see `write_sql`). `unnest` yields the events in
/// order, so their sequences follow it.
fn owned_events_cte(p: usize) -> String {
    let ep: Vec<String> = (p..p + crate::events::EVENT_PARAMS)
        .map(|i| format!("${i}"))
        .collect();
    let owner = p + crate::events::EVENT_PARAMS;
    format!(
        "e AS (INSERT INTO events (event_id, event_type, aggregate_type, aggregate_id, \
               correlation_id, actor, occurred_at, job_id, payload) \
               SELECT ev.event_id, ev.event_type, ev.aggregate_type, ev.aggregate_id, \
                   ev.correlation_id, ev.actor, ev.occurred_at, ev.job_id, ev.payload \
               FROM unnest({}::uuid[], {}::text[], {}::text[], {}::text[], {}::text[], \
                   {}::text[], {}::timestamptz[], {}::uuid[], {}::jsonb[], ${owner}::uuid[]) \
               AS ev(event_id, event_type, aggregate_type, aggregate_id, correlation_id, \
                   actor, occurred_at, job_id, payload, owner) \
               WHERE ev.owner = ANY (ARRAY(SELECT id FROM j)) \
               RETURNING sequence, event_id), \
         n AS (SELECT pg_notify('{EVENTS_CHANNEL}', max(sequence)::text) FROM e \
               HAVING count(*) > 0)",
        ep[0], ep[1], ep[2], ep[3], ep[4], ep[5], ep[6], ep[7], ep[8]
    )
}

/// Binds the arrays of [`owned_events_cte`]: the events, then their owners.
fn bind_owned_events<'q>(
    q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    events: &[DomainEvent],
    owners: Vec<uuid::Uuid>,
) -> Result<sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>, StoreError> {
    Ok(bind_events(q, events)?.bind(owners))
}

/// The sequences of a batch statement's events (`seqs`, `ids`), by event id.
fn sequences(answer: &PgRow) -> Result<std::collections::HashMap<uuid::Uuid, i64>, StoreError> {
    let get_err = |e: sqlx::Error| corrupt("batch of job writes", e);
    let seqs: Vec<i64> = answer.try_get("seqs").map_err(get_err)?;
    let event_ids: Vec<uuid::Uuid> = answer.try_get("ids").map_err(get_err)?;
    Ok(event_ids.into_iter().zip(seqs).collect())
}

/// `events` with the sequences the statement gave them; an error names
/// the first one not stored.
fn with_sequences(
    mut events: Vec<DomainEvent>,
    sequence_of: &std::collections::HashMap<uuid::Uuid, i64>,
    job: JobId,
) -> Result<Vec<DomainEvent>, StoreError> {
    for event in &mut events {
        match sequence_of.get(event.event_id.as_uuid()) {
            Some(seq) => event.sequence = to_u64(*seq),
            None => {
                return Err(StoreError::Other(format!(
                    "event {} of job {job} was not stored",
                    event.event_id
                )));
            }
        }
    }
    Ok(events)
}

/// [`JobStore::create_many`]: every entry in one statement (one round
/// trip, one transaction): the rows in entry order (so their queue places
/// follow it), `ON CONFLICT DO NOTHING` as [`JobStore::create`], and the
/// events of the rows inserted ([`owned_events_cte`]). The entries not
/// inserted are then resolved by one read of their idempotency keys.
async fn create_jobs(store: &PgStore, jobs: Vec<NewJob>) -> Result<CreateAnswers, StoreError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    fn sql() -> String {
        format!(
            "WITH u AS (SELECT * FROM unnest({columns}, $12::text[], $13::text[], \
                 $14::text[], $15::timestamptz[]) WITH ORDINALITY \
                 AS u(id, spec, status, attempts, state, priority, not_before, deadline, \
                      attempt, version, updated_at, correlation_id, submitted_by, \
                      idempotency_key, created_at, ord)), \
             j AS (INSERT INTO jobs (id, spec, status, attempts, state, priority, not_before, \
                 deadline, attempt, version, correlation_id, submitted_by, idempotency_key, \
                 created_at, updated_at, queue_order) \
                 SELECT id, spec, status, attempts, state, priority, not_before, deadline, \
                     attempt, version, correlation_id, submitted_by, idempotency_key, \
                     created_at, updated_at, \
                     CASE WHEN state = 'PENDING' THEN nextval('job_queue_order') END \
                 FROM u ORDER BY ord \
                 ON CONFLICT DO NOTHING RETURNING id), \
             {events} \
             SELECT ARRAY(SELECT id FROM j) AS created, \
                    ARRAY(SELECT sequence FROM e ORDER BY sequence) AS seqs, \
                    ARRAY(SELECT event_id FROM e ORDER BY sequence) AS ids, \
                    (SELECT count(*) FROM n) AS notified",
            columns = JobColumns::UNNEST,
            events = owned_events_cte(16),
        )
    }
    static CREATE_MANY: LazyLock<String> = LazyLock::new(sql);

    let n = jobs.len();
    let mut columns = JobColumns::with_capacity(n);
    let mut correlations = Vec::with_capacity(n);
    let mut submitters = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut created_at = Vec::with_capacity(n);
    for j in &jobs {
        columns.push(&j.job, &j.events)?;
        correlations.push(j.job.correlation_id.as_str().to_owned());
        submitters.push(j.job.submitted_by.as_str().to_owned());
        keys.push(j.job.spec.idempotency_key().map(str::to_owned));
        created_at.push(j.job.created_at);
    }
    let (q, events, owners) = columns.bind(sqlx::query(sqlx::AssertSqlSafe(CREATE_MANY.as_str())));
    let q = q
        .bind(correlations)
        .bind(submitters)
        .bind(&keys)
        .bind(created_at);
    let q = bind_owned_events(q, &events, owners)?;
    let answer = q.fetch_one(&store.inner.pool).await.map_err(store_err)?;
    let created: Vec<uuid::Uuid> = answer
        .try_get("created")
        .map_err(|e| corrupt("batch of job creations", e))?;
    let created: std::collections::HashSet<uuid::Uuid> = created.into_iter().collect();
    let sequence_of = sequences(&answer)?;
    // Entries not inserted: an idempotency key already used (by a job
    // stored before, or by an earlier entry of this batch), or an id
    // already stored.
    let missed_keys: Vec<String> = jobs
        .iter()
        .filter(|j| !created.contains(&j.job.id.0))
        .filter_map(|j| j.job.spec.idempotency_key().map(str::to_owned))
        .collect();
    let mut by_key: std::collections::HashMap<String, Job> = Default::default();
    if !missed_keys.is_empty() {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS}, idempotency_key FROM jobs WHERE idempotency_key = ANY($1)"
        )))
        .bind(&missed_keys)
        .fetch_all(&store.inner.pool)
        .await
        .map_err(store_err)?;
        for row in &rows {
            let key: String = row
                .try_get("idempotency_key")
                .map_err(|e| corrupt("job", e))?;
            by_key.insert(key, decode_job(row)?);
        }
    }
    let mut answers = Vec::with_capacity(n);
    for j in jobs {
        let id = j.job.id;
        if created.contains(&id.0) {
            answers.push(with_sequences(j.events, &sequence_of, id).map(Created::New));
            continue;
        }
        let existing = j
            .job
            .spec
            .idempotency_key()
            .and_then(|k| by_key.get(k))
            .filter(|existing| existing.id != id);
        answers.push(match existing {
            Some(existing) => Ok(Created::Existing(Box::new(existing.clone()))),
            None => Err(StoreError::AlreadyExists(format!("job {id}"))),
        });
    }
    Ok(answers)
}

/// Upsert of worker records from the five arrays [`bind_workers`] binds
/// from parameter `$p` on: a common table expression named `w`.
fn workers_cte(p: usize) -> String {
    format!(
        ", w AS (INSERT INTO workers (id, state, record, last_seen, created_at) \
             SELECT * FROM unnest(${}::uuid[], ${}::text[], ${}::jsonb[], \
                 ${}::timestamptz[], ${}::timestamptz[]) \
             ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, \
                 record = EXCLUDED.record, last_seen = EXCLUDED.last_seen, \
                 created_at = EXCLUDED.created_at \
             RETURNING 1)",
        p,
        p + 1,
        p + 2,
        p + 3,
        p + 4
    )
}

/// Binds the arrays of [`workers_cte`].
pub(crate) fn bind_workers<'q, 'w>(
    q: sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>,
    workers: impl Iterator<Item = &'w Worker>,
) -> Result<sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>, StoreError> {
    let mut ids = Vec::new();
    let mut states = Vec::new();
    let mut records = Vec::new();
    let mut seen = Vec::new();
    let mut created = Vec::new();
    for w in workers {
        ids.push(w.id.0);
        states.push(w.state.as_str());
        records.push(crate::workers::worker_record(w)?);
        seen.push(w.last_seen);
        created.push(w.created_at);
    }
    Ok(q.bind(ids)
        .bind(states)
        .bind(records)
        .bind(seen)
        .bind(created))
}

/// [`JobStore::update_many`]: every entry in one statement (one round
/// trip, one transaction). The jobs whose version matches are updated as
/// [`update_job`] does one (queue place, claim, log finished with its
/// notification); only their events are stored, each tagged with the
/// job of its entry; the workers of every entry are saved. The entries
/// that did not match are then told apart (conflict, unknown job) by one
/// read.
///
/// The bus's ordering holds as in [`write_sql`]: the lock on `events` is
/// taken when the statement starts, and the events' `SELECT` filters on an
/// uncorrelated `ARRAY(SELECT id FROM j)` (an init plan, run to the end
/// before the first row), so every job row is written, and the
/// transaction holds its id, before any sequence is drawn.
async fn update_jobs(
    store: &PgStore,
    updates: Vec<JobUpdate>,
) -> Result<UpdateAnswers, StoreError> {
    if updates.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen = std::collections::HashSet::with_capacity(updates.len());
    if let Some(dup) = updates.iter().find(|u| !seen.insert(u.job.id)) {
        return Err(StoreError::Invalid(format!(
            "job {} appears twice in one batch of updates; each entry must name a different job",
            dup.job.id
        )));
    }
    fn sql() -> String {
        let e = 13;
        let owner = e + crate::events::EVENT_PARAMS;
        format!(
            "WITH u AS (SELECT * FROM unnest({columns}, $12::int8[]) \
                 AS u(id, spec, status, attempts, state, priority, not_before, \
                      deadline, attempt, version, updated_at, expected)), \
             j AS (UPDATE jobs SET spec = u.spec, status = u.status, attempts = u.attempts, \
                 state = u.state, priority = u.priority, not_before = u.not_before, \
                 deadline = u.deadline, attempt = u.attempt, version = u.version, \
                 updated_at = u.updated_at, \
                 queue_order = CASE \
                     WHEN u.state <> 'PENDING' THEN NULL \
                     WHEN jobs.state = 'PENDING' THEN jobs.queue_order \
                     ELSE nextval('job_queue_order') END, \
                 claim_owner = NULL, claim_until = NULL \
                 FROM u WHERE jobs.id = u.id AND jobs.version = u.expected \
                 RETURNING jobs.id, u.state), \
             lf AS (INSERT INTO log_heads (job_id, finished) \
                 SELECT id, true FROM j \
                 WHERE state IN ('SUCCEEDED', 'FAILED', 'CANCELLED', 'TIMED_OUT') \
                 ON CONFLICT (job_id) DO UPDATE SET finished = true \
                 RETURNING job_id, last_seq), \
             ln AS (SELECT pg_notify('{LOGS_CHANNEL}', lf.job_id::text || ':' || lf.last_seq) \
                 FROM lf){workers}, \
             {events} \
             SELECT ARRAY(SELECT id FROM j) AS updated, \
                    ARRAY(SELECT sequence FROM e ORDER BY sequence) AS seqs, \
                    ARRAY(SELECT event_id FROM e ORDER BY sequence) AS ids, \
                    (SELECT count(*) FROM n) AS notified, \
                    (SELECT count(*) FROM ln) AS log_notified, \
                    (SELECT count(*) FROM w) AS workers_saved",
            columns = JobColumns::UNNEST,
            events = owned_events_cte(e),
            workers = workers_cte(owner + 1),
        )
    }
    static UPDATE_MANY: LazyLock<String> = LazyLock::new(sql);

    let n = updates.len();
    let mut columns = JobColumns::with_capacity(n);
    let mut expected = Vec::with_capacity(n);
    for u in &updates {
        columns.push(&u.job, &u.events)?;
        expected.push(to_i64(u.expected_version));
    }
    let ids = columns.ids.clone();
    let (q, events, owners) = columns.bind(sqlx::query(sqlx::AssertSqlSafe(UPDATE_MANY.as_str())));
    let q = q.bind(expected);
    let q = bind_owned_events(q, &events, owners)?;
    let q = bind_workers(q, updates.iter().flat_map(|u| u.workers.iter()))?;
    let answer = q.fetch_one(&store.inner.pool).await.map_err(store_err)?;
    let updated: Vec<uuid::Uuid> = answer
        .try_get("updated")
        .map_err(|e| corrupt("batch of job updates", e))?;
    let sequence_of = sequences(&answer)?;
    let updated: std::collections::HashSet<uuid::Uuid> = updated.into_iter().collect();
    let missed: Vec<uuid::Uuid> = ids
        .iter()
        .filter(|id| !updated.contains(id))
        .copied()
        .collect();
    let found: std::collections::HashMap<uuid::Uuid, i64> = if missed.is_empty() {
        Default::default()
    } else {
        sqlx::query_as::<_, (uuid::Uuid, i64)>("SELECT id, version FROM jobs WHERE id = ANY($1)")
            .bind(&missed)
            .fetch_all(&store.inner.pool)
            .await
            .map_err(store_err)?
            .into_iter()
            .collect()
    };
    let mut answers = Vec::with_capacity(n);
    for u in updates {
        let id = u.job.id;
        if !updated.contains(&id.0) {
            answers.push(Err(match found.get(&id.0) {
                None => StoreError::NotFound(format!("job {id}")),
                Some(v) => StoreError::Conflict {
                    job: id,
                    expected: u.expected_version,
                    found: to_u64(*v),
                },
            }));
            continue;
        }
        answers.push(with_sequences(u.events, &sequence_of, id));
    }
    Ok(answers)
}

#[async_trait]
impl JobQueue for PgStore {
    async fn claim(
        &self,
        owner: &str,
        now: Timestamp,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let limit = limit.min(MAX_BATCH);
        if limit == 0 {
            return Ok(Claim {
                jobs: Vec::new(),
                next_ready_at: next_ready_at(self, now).await?,
            });
        }
        // One statement, one round trip: pick and stamp the rows, and say
        // when the next waiting job is claimable. SKIP LOCKED: concurrent
        // claimants pass over each other's rows; a row committed as
        // claimed meanwhile is re-checked by the lock (READ COMMITTED
        // re-evaluates the WHERE) and dropped. `nxt` sees the table as it
        // was before this statement's own claim, so it leaves the picked
        // rows out: it is `now` when ready, unclaimed jobs are left over
        // (the limit was reached, or another claimant holds their lock),
        // else the earliest retry time.
        static CLAIM: LazyLock<String> = LazyLock::new(|| {
            format!(
                "WITH picked AS ( \
                     SELECT id FROM jobs \
                     WHERE state = 'PENDING' \
                       AND (not_before IS NULL OR not_before <= $2) \
                       AND (claim_owner IS NULL OR claim_until <= $2) \
                     ORDER BY priority DESC, queue_order \
                     LIMIT $3 \
                     FOR UPDATE SKIP LOCKED), \
                 claimed AS ( \
                     UPDATE jobs j SET claim_owner = $1, claim_until = $4 \
                     FROM picked WHERE j.id = picked.id \
                     RETURNING j.priority AS q_priority, j.queue_order AS q_order, {}), \
                 nxt AS ( \
                     SELECT CASE WHEN EXISTS ( \
                         SELECT 1 FROM jobs WHERE state = 'PENDING' \
                           AND (not_before IS NULL OR not_before <= $2) \
                           AND (claim_owner IS NULL OR claim_until <= $2) \
                           AND id NOT IN (SELECT id FROM picked)) \
                     THEN $2 \
                     ELSE (SELECT min(not_before) FROM jobs \
                           WHERE state = 'PENDING' AND not_before > $2) END AS next_ready_at) \
                 SELECT nxt.next_ready_at, claimed.* FROM nxt LEFT JOIN claimed ON true",
                JOB_COLUMNS
                    .split(", ")
                    .map(|c| format!("j.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        let rows = sqlx::query(sqlx::AssertSqlSafe(CLAIM.as_str()))
            .bind(owner)
            .bind(now)
            .bind(to_i64(limit as u64))
            .bind(add(now, lease))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store_err)?;
        let mut next_ready_at = None;
        let mut keyed = Vec::with_capacity(rows.len());
        for row in &rows {
            let get_err = |e: sqlx::Error| corrupt("job", e);
            next_ready_at = row.try_get("next_ready_at").map_err(get_err)?;
            let id: Option<uuid::Uuid> = row.try_get("id").map_err(get_err)?;
            if id.is_none() {
                continue;
            }
            let priority: i32 = row.try_get("q_priority").map_err(get_err)?;
            let order: Option<i64> = row.try_get("q_order").map_err(get_err)?;
            keyed.push(((std::cmp::Reverse(priority), order), decode_job(row)?));
        }
        keyed.sort_by_key(|a| a.0);
        Ok(Claim {
            jobs: keyed.into_iter().map(|(_, job)| job).collect(),
            next_ready_at,
        })
    }

    async fn release(&self, id: JobId, owner: &str) -> Result<(), StoreError> {
        // Releasing a claim one does not hold (lapsed, taken over) is a
        // no-op: the job is wherever the store says it is.
        sqlx::query(
            "UPDATE jobs SET claim_owner = NULL, claim_until = NULL \
             WHERE id = $1 AND claim_owner = $2",
        )
        .bind(id.0)
        .bind(owner)
        .execute(&self.inner.pool)
        .await
        .map_err(store_err)?;
        Ok(())
    }

    async fn depth(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'PENDING'")
            .fetch_one(&self.inner.pool)
            .await
            .map_err(store_err)?;
        Ok(to_u64(n))
    }

    async fn ready(&self) -> Result<(), StoreError> {
        crate::migrate::check_current(&self.inner.pool).await
    }

    async fn overdue(&self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError> {
        let limit = limit.min(MAX_BATCH);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs \
             WHERE state IN ('SCHEDULED', 'ASSIGNED', 'RUNNING') AND deadline <= $1 \
             ORDER BY deadline, id LIMIT $2"
        )))
        .bind(now)
        .bind(to_i64(limit as u64))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(store_err)?;
        rows.iter().map(decode_job).collect()
    }
}

/// Earliest time a waiting, unclaimed job is claimable: `now` when ready
/// ones are waiting, else the earliest retry time. Both halves stop at the
/// first index hit.
async fn next_ready_at(store: &PgStore, now: Timestamp) -> Result<Option<Timestamp>, StoreError> {
    sqlx::query_scalar(
        "SELECT CASE WHEN EXISTS ( \
             SELECT 1 FROM jobs WHERE state = 'PENDING' \
               AND (not_before IS NULL OR not_before <= $1) \
               AND (claim_owner IS NULL OR claim_until <= $1)) \
         THEN $1 \
         ELSE (SELECT min(not_before) FROM jobs \
               WHERE state = 'PENDING' AND not_before > $1) END",
    )
    .bind(now)
    .fetch_one(&store.inner.pool)
    .await
    .map_err(store_err)
}

/// The columns of a job that are derived from it.
struct JobRow {
    spec: Value,
    status: Value,
    attempts: Value,
    state: &'static str,
    priority: i32,
    not_before: Option<Timestamp>,
    deadline: Option<Timestamp>,
    attempt: i32,
    version: i64,
}

impl JobRow {
    fn of(job: &Job) -> Result<Self, StoreError> {
        let json = |what: &str, v: Result<Value, serde_json::Error>| {
            v.map_err(|e| StoreError::Invalid(format!("job {what} does not serialize: {e}")))
        };
        Ok(Self {
            spec: json("spec", serde_json::to_value(&job.spec))?,
            status: json("status", serde_json::to_value(&job.status))?,
            attempts: json("attempts", serde_json::to_value(&job.attempts))?,
            state: job.state().as_str(),
            priority: job.spec.priority(),
            not_before: match job.status {
                JobStatus::Pending { not_before } => not_before,
                _ => None,
            },
            deadline: job.status.deadline(),
            attempt: i32::try_from(job.attempt).unwrap_or(i32::MAX),
            version: to_i64(job.version),
        })
    }
}

/// Decodes a row selected with [`JOB_COLUMNS`].
fn decode_job(row: &PgRow) -> Result<Job, StoreError> {
    let get_err = |e: sqlx::Error| corrupt("job", e);
    let id: uuid::Uuid = row.try_get("id").map_err(get_err)?;
    let doc = |col: &str| -> Result<Value, StoreError> { row.try_get(col).map_err(get_err) };
    let spec: JobSpec = serde_json::from_value(doc("spec")?)
        .map_err(|e| corrupt(&format!("spec of job {id}"), e))?;
    let status: JobStatus = serde_json::from_value(doc("status")?)
        .map_err(|e| corrupt(&format!("status of job {id}"), e))?;
    let attempts: Vec<Attempt> = serde_json::from_value(doc("attempts")?)
        .map_err(|e| corrupt(&format!("attempts of job {id}"), e))?;
    let attempt: i32 = row.try_get("attempt").map_err(get_err)?;
    let version: i64 = row.try_get("version").map_err(get_err)?;
    let correlation_id: String = row.try_get("correlation_id").map_err(get_err)?;
    let submitted_by: String = row.try_get("submitted_by").map_err(get_err)?;
    Ok(Job {
        id: JobId::from_uuid(id),
        spec,
        status,
        attempt: u32::try_from(attempt).unwrap_or(0),
        attempts,
        correlation_id: CorrelationId::new(correlation_id),
        submitted_by: Actor::new(submitted_by),
        created_at: row.try_get("created_at").map_err(get_err)?,
        updated_at: row.try_get("updated_at").map_err(get_err)?,
        version: to_u64(version),
    })
}

/// Position in the newest-first job list: `<created_at µs>.<id>`.
struct Cursor {
    created_at: Timestamp,
    id: uuid::Uuid,
}

impl Cursor {
    fn of(job: &Job) -> Self {
        Self {
            created_at: job.created_at,
            id: job.id.0,
        }
    }

    fn parse(text: &str) -> Result<Self, StoreError> {
        let bad = || {
            StoreError::Invalid(format!(
                "malformed cursor {:?}; pass the next_cursor of the previous page",
                text.chars().take(80).collect::<String>()
            ))
        };
        let (micros, id) = text.split_once('.').ok_or_else(bad)?;
        let micros: i64 = micros.parse().map_err(|_| bad())?;
        let created_at = chrono::DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
        let id = uuid::Uuid::parse_str(id).map_err(|_| bad())?;
        Ok(Self { created_at, id })
    }
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.created_at.timestamp_micros(), self.id)
    }
}
