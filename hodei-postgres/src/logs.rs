//! Job output ([`LogStore`]): one `log_chunks` row per appended batch, a
//! `log_heads` row per job with its last sequence and whether it is
//! finished.
//!
//! Every append locks the job's head row first. That serialises the appends
//! of a job, so the store-assigned sequences have no gaps and commit in
//! order (a follower reading `seq > cursor` never sees 12 before 11), and the
//! de-duplication of re-sent lines sees every earlier append.
//!
//! The head also keeps the highest (attempt, agent sequence) stored. A batch
//! whose agent sequences rise and start above it cannot repeat a stored
//! line: one statement locks the head, checks that (on the newest version
//! of the row, after any wait for the lock), moves it, stores the chunk and
//! queues the wake-up. Any other batch (a re-send after a reconnect, a late
//! line of an earlier attempt) takes the slow path, a transaction that reads
//! the stored chunks it could overlap and drops the lines already there.

use std::collections::{BTreeSet, VecDeque};

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use hodei_core::ids::JobId;
use hodei_core::ports::{LogLine, LogStore, LogStream, NewLogLine, StoreError};
use hodei_core::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::Row;
use sqlx::types::Json;
use tokio::sync::broadcast;

use crate::PgStore;
use crate::bus::{Backoff, LogWake};
use crate::error::{corrupt, store_err, to_i64, to_u64};

/// Channel of log notifications; the payload is `<job id>:<last seq>`,
/// never the lines.
pub(crate) const LOGS_CHANNEL: &str = "hodei_logs";

/// Lines per read of a follower.
const DEFAULT_LINES: usize = 1000;
/// Most lines per read.
const MAX_LINES: usize = 10_000;

#[async_trait]
impl LogStore for PgStore {
    async fn append(
        &self,
        job: JobId,
        attempt: u32,
        lines: Vec<NewLogLine>,
    ) -> Result<u64, StoreError> {
        if lines.is_empty() {
            return last_seq(self, job).await;
        }
        let attempt = i32::try_from(attempt).unwrap_or(i32::MAX);
        let fresh: Vec<StoredLine> = lines
            .into_iter()
            .map(|l| StoredLine {
                a: l.agent_seq,
                s: l.stream,
                t: l.at,
                x: l.text,
            })
            .collect();
        // Fast path: agent sequences strictly rising (the usual batch).
        // If the head's high-water is below them the batch is new, and
        // one statement stores it (else it says nothing and the slow path
        // de-duplicates).
        if fresh.windows(2).all(|w| w[0].a < w[1].a)
            && let Some(last) = append_fresh(self, job, attempt, &fresh).await?
        {
            return Ok(last);
        }
        append_checked(self, job, attempt, fresh).await
    }

    async fn read(&self, job: JobId, after: u64, limit: usize) -> Result<Vec<LogLine>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        read_lines(self, job, after, limit.min(MAX_LINES)).await
    }

    async fn finish(&self, job: JobId) -> Result<(), StoreError> {
        // One statement: mark the head finished and queue the wake-up.
        sqlx::query(
            "WITH h AS (INSERT INTO log_heads (job_id, finished) VALUES ($1, true) \
                 ON CONFLICT (job_id) DO UPDATE SET finished = true RETURNING last_seq) \
             SELECT pg_notify($2, $3 || ':' || h.last_seq) FROM h",
        )
        .bind(job.0)
        .bind(LOGS_CHANNEL)
        .bind(job.to_string())
        .execute(&self.inner.pool)
        .await
        .map_err(store_err)?;
        Ok(())
    }

    fn follow(&self, job: JobId, after: u64) -> BoxStream<'static, Result<LogLine, StoreError>> {
        // Subscribe to wake-ups before the first read: a line committed
        // between a read and the wait still wakes us.
        let wakes = match self.bus() {
            Ok(bus) => bus.log_wakes(),
            Err(e) => return stream::once(async move { Err(e) }).boxed(),
        };
        let follower = Follower {
            store: self.clone(),
            job,
            cursor: after,
            buffer: VecDeque::new(),
            wakes,
            retry: Backoff::new(
                std::time::Duration::from_millis(50),
                std::time::Duration::from_secs(5),
            ),
        };
        stream::unfold(follower, |mut f| async move {
            let item = f.next().await?;
            Some((item, f))
        })
        .boxed()
    }
}

/// A line as stored in a chunk's JSON array (short keys: logs are bulky).
#[derive(Debug, Serialize, Deserialize)]
struct StoredLine {
    /// Agent sequence within the attempt.
    a: u64,
    /// Stream.
    s: LogStream,
    /// When it was read.
    t: Timestamp,
    /// Text.
    x: String,
}

struct Follower {
    store: PgStore,
    job: JobId,
    cursor: u64,
    buffer: VecDeque<LogLine>,
    wakes: broadcast::Receiver<LogWake>,
    retry: Backoff,
}

impl Follower {
    /// The next line; `None` once the log is finished and fully read.
    async fn next(&mut self) -> Option<Result<LogLine, StoreError>> {
        loop {
            if let Some(line) = self.buffer.pop_front() {
                self.cursor = line.seq;
                return Some(Ok(line));
            }
            // The head first, then the lines: lines committed with or before
            // the head we read are all visible to the later read.
            match self.step().await {
                Ok(Step::Lines(lines)) => {
                    self.retry.reset();
                    self.buffer.extend(lines);
                    continue;
                }
                Ok(Step::Finished) => return None,
                Ok(Step::Wait) => {}
                Err(e) => {
                    tracing::warn!(job = %self.job, error = %e, "log follow: read failed; retrying");
                    tokio::time::sleep(self.retry.next()).await;
                    continue;
                }
            }
            let idle = self.store.inner.options.bus_idle_poll;
            let _ = tokio::time::timeout(idle, self.wait_for_wake()).await;
        }
    }

    async fn step(&self) -> Result<Step, StoreError> {
        let head: Option<(i64, bool)> =
            sqlx::query_as("SELECT last_seq, finished FROM log_heads WHERE job_id = $1")
                .bind(self.job.0)
                .fetch_optional(&self.store.inner.pool)
                .await
                .map_err(store_err)?;
        let (last, finished) = head.map_or((0, false), |(l, f)| (to_u64(l), f));
        if last > self.cursor {
            let lines = read_lines(&self.store, self.job, self.cursor, DEFAULT_LINES).await?;
            if !lines.is_empty() {
                return Ok(Step::Lines(lines));
            }
        }
        Ok(if finished { Step::Finished } else { Step::Wait })
    }

    async fn wait_for_wake(&mut self) {
        loop {
            match self.wakes.recv().await {
                Ok(LogWake::Job(job)) if job != self.job.0 => continue,
                // Ours, everyone's, or we lagged behind: read again.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                // The bus is gone with the store; the timeout polls.
                Err(broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

enum Step {
    Lines(Vec<LogLine>),
    Finished,
    Wait,
}

/// Stores `lines` (agent sequences strictly rising) in one statement if
/// they are all above the head's high-water: then none can be stored
/// already. Returns the new last sequence, or `None` when the slow path
/// must de-duplicate.
///
/// The head row's lock is taken by the upsert, and its `WHERE` is
/// re-checked against the newest committed version of the row after any
/// wait (READ COMMITTED), so concurrent appends of a job still queue on it
/// and see each other's high-water.
async fn append_fresh(
    store: &PgStore,
    job: JobId,
    attempt: i32,
    lines: &[StoredLine],
) -> Result<Option<u64>, StoreError> {
    let (Some(first), Some(last)) = (lines.first(), lines.last()) else {
        return Ok(None);
    };
    let n = lines.len() as i64;
    let stored = sqlx::query(
        "WITH h AS ( \
             INSERT INTO log_heads AS h (job_id, last_seq, attempt, agent_last) \
             VALUES ($1, $2, $3, $5) \
             ON CONFLICT (job_id) DO UPDATE \
                 SET last_seq = h.last_seq + $2, attempt = $3, agent_last = $5 \
                 WHERE (h.attempt, h.agent_last) < ($3, $4) \
             RETURNING h.last_seq), \
         c AS ( \
             INSERT INTO log_chunks (job_id, first_seq, last_seq, attempt, agent_first, \
                 agent_last, lines) \
             SELECT $1, h.last_seq - $2 + 1, h.last_seq, $3, $4, $5, $6 FROM h) \
         SELECT h.last_seq, pg_notify($7, $8 || ':' || h.last_seq) AS notified FROM h",
    )
    .bind(job.0)
    .bind(n)
    .bind(attempt)
    .bind(to_i64(first.a))
    .bind(to_i64(last.a))
    .bind(Json(lines))
    .bind(LOGS_CHANNEL)
    .bind(job.to_string())
    .fetch_optional(&store.inner.pool)
    .await
    .map_err(store_err)?;
    stored
        .map(|row| {
            let last: i64 = row
                .try_get("last_seq")
                .map_err(|e| corrupt("log head", e))?;
            Ok(to_u64(last))
        })
        .transpose()
}

/// Stores the lines of `lines` not stored yet, in one transaction that
/// reads the stored chunks they could overlap (after taking the head's
/// lock, so every earlier append is visible), and sets the head's
/// high-water from the stored chunks.
async fn append_checked(
    store: &PgStore,
    job: JobId,
    attempt: i32,
    lines: Vec<StoredLine>,
) -> Result<u64, StoreError> {
    let mut tx = store.inner.pool.begin().await.map_err(store_err)?;
    // Lock (creating if needed) the head: appends of a job queue here.
    let last: i64 = sqlx::query_scalar(
        "INSERT INTO log_heads (job_id) VALUES ($1) \
         ON CONFLICT (job_id) DO UPDATE SET last_seq = log_heads.last_seq \
         RETURNING last_seq",
    )
    .bind(job.0)
    .fetch_one(&mut *tx)
    .await
    .map_err(store_err)?;

    let lowest = lines.iter().map(|l| l.a).min().unwrap_or(0);
    let highest = lines.iter().map(|l| l.a).max().unwrap_or(0);
    let stored: Vec<Value> = sqlx::query_scalar(
        "SELECT lines FROM log_chunks \
         WHERE job_id = $1 AND attempt = $2 AND agent_last >= $3 AND agent_first <= $4",
    )
    .bind(job.0)
    .bind(attempt)
    .bind(to_i64(lowest))
    .bind(to_i64(highest))
    .fetch_all(&mut *tx)
    .await
    .map_err(store_err)?;
    let mut seen = BTreeSet::new();
    for chunk in stored {
        let chunk: Vec<StoredLine> =
            serde_json::from_value(chunk).map_err(|e| corrupt("log chunk", e))?;
        seen.extend(chunk.into_iter().map(|l| l.a));
    }
    let fresh: Vec<StoredLine> = lines.into_iter().filter(|l| seen.insert(l.a)).collect();
    if fresh.is_empty() {
        tx.rollback().await.map_err(store_err)?;
        return Ok(to_u64(last));
    }

    let first = last + 1;
    let new_last = last + fresh.len() as i64;
    let agent_first = fresh.iter().map(|l| l.a).min().unwrap_or(0);
    let agent_last = fresh.iter().map(|l| l.a).max().unwrap_or(0);
    sqlx::query(
        "INSERT INTO log_chunks (job_id, first_seq, last_seq, attempt, agent_first, \
         agent_last, lines) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(job.0)
    .bind(first)
    .bind(new_last)
    .bind(attempt)
    .bind(to_i64(agent_first))
    .bind(to_i64(agent_last))
    .bind(Json(&fresh))
    .execute(&mut *tx)
    .await
    .map_err(store_err)?;
    // The high-water from every stored chunk (this one included): heads
    // written before it was kept, or by `finish`, get it here.
    sqlx::query(
        "UPDATE log_heads SET last_seq = $2, (attempt, agent_last) = ( \
             SELECT attempt, agent_last FROM log_chunks WHERE job_id = $1 \
             ORDER BY attempt DESC, agent_last DESC LIMIT 1) \
         WHERE job_id = $1",
    )
    .bind(job.0)
    .bind(new_last)
    .execute(&mut *tx)
    .await
    .map_err(store_err)?;
    notify(&mut tx, job, new_last).await?;
    tx.commit().await.map_err(store_err)?;
    Ok(to_u64(new_last))
}

async fn last_seq(store: &PgStore, job: JobId) -> Result<u64, StoreError> {
    let last: Option<i64> = sqlx::query_scalar("SELECT last_seq FROM log_heads WHERE job_id = $1")
        .bind(job.0)
        .fetch_optional(&store.inner.pool)
        .await
        .map_err(store_err)?;
    Ok(last.map_or(0, to_u64))
}

async fn notify(conn: &mut sqlx::PgConnection, job: JobId, last: i64) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(LOGS_CHANNEL)
        .bind(format!("{job}:{last}"))
        .execute(conn)
        .await
        .map_err(store_err)?;
    Ok(())
}

/// Lines with `seq > after`, at most `limit`.
async fn read_lines(
    store: &PgStore,
    job: JobId,
    after: u64,
    limit: usize,
) -> Result<Vec<LogLine>, StoreError> {
    // At most `limit` chunks can be needed (each holds at least one line);
    // chunks are contiguous, so ordering by `last_seq` orders them and lets
    // the index start at `after`.
    let rows = sqlx::query(
        "SELECT c.first_seq + l.ord - 1 AS seq, c.attempt, l.line \
         FROM (SELECT first_seq, attempt, lines FROM log_chunks \
               WHERE job_id = $1 AND last_seq > $2 ORDER BY last_seq LIMIT $3) AS c \
         CROSS JOIN LATERAL jsonb_array_elements(c.lines) WITH ORDINALITY AS l(line, ord) \
         WHERE c.first_seq + l.ord - 1 > $2 \
         ORDER BY seq LIMIT $3",
    )
    .bind(job.0)
    .bind(to_i64(after))
    .bind(to_i64(limit as u64))
    .fetch_all(&store.inner.pool)
    .await
    .map_err(store_err)?;
    rows.iter()
        .map(|row| {
            let get_err = |e: sqlx::Error| corrupt("log line", e);
            let seq: i64 = row.try_get("seq").map_err(get_err)?;
            let attempt: i32 = row.try_get("attempt").map_err(get_err)?;
            let line: Value = row.try_get("line").map_err(get_err)?;
            let line: StoredLine =
                serde_json::from_value(line).map_err(|e| corrupt("log line", e))?;
            Ok(LogLine {
                seq: to_u64(seq),
                attempt: u32::try_from(attempt).unwrap_or(0),
                stream: line.s,
                at: line.t,
                text: line.x,
            })
        })
        .collect()
}
