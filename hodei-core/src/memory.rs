//! In-memory adapters of every store port, for embedding, the quick start
//! and tests. One [`MemoryStore`] implements all of them over a single
//! mutex, so every "transaction" is trivially atomic. Nothing survives the
//! process.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::watch;

use crate::event::DomainEvent;
use crate::ids::{JobId, WorkerId};
use crate::job::{Job, JobStatus};
use crate::ports::{
    AuditFilter, AuditPage, AuditQuery, Claim, Created, EventLog, EventSubscription, JobFilter,
    JobPage, JobQueue, JobStore, Leases, LogLine, LogStore, NewLogLine, ProviderRecord,
    ProviderStore, SecretMeta, SecretStore, StoreError, TokenRejection, WorkerRegistry,
};
use crate::time::{Timestamp, add};
use crate::worker::Worker;

/// All store ports in memory. Cheap to clone (shared state).
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<State>>,
    events_tx: Arc<watch::Sender<u64>>,
    logs_tx: Arc<watch::Sender<u64>>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    jobs: HashMap<JobId, Job>,
    /// Creation order, for listing newest first.
    order: Vec<JobId>,
    idempotency: HashMap<String, JobId>,
    /// Pending jobs: (priority desc, enqueue seq) -> job.
    queue: BTreeMap<(std::cmp::Reverse<i32>, u64), JobId>,
    queue_pos: HashMap<JobId, (std::cmp::Reverse<i32>, u64)>,
    enqueue_seq: u64,
    claims: HashMap<JobId, (String, Timestamp)>,
    /// Events still kept; the first has sequence `purged + 1`.
    events: std::collections::VecDeque<DomainEvent>,
    /// Events removed by retention.
    purged: u64,
    next_seq: u64,
    job_events: HashMap<JobId, Vec<u64>>,
    logs: HashMap<JobId, JobLog>,
    secrets: BTreeMap<String, (String, Timestamp, Timestamp)>,
    workers: HashMap<WorkerId, Worker>,
    tokens: HashMap<String, (WorkerId, Timestamp, bool)>,
    providers: BTreeMap<String, ProviderRecord>,
    /// Duty -> (holder, expires at).
    leases: HashMap<String, (String, Timestamp)>,
}

#[derive(Default)]
struct JobLog {
    lines: Vec<LogLine>,
    high_water: HashMap<u32, u64>,
    finished: bool,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(State::default())),
            events_tx: Arc::new(watch::channel(0).0),
            logs_tx: Arc::new(watch::channel(0).0),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a panic mid-update in this process; the
        // state is still structurally valid (every update is a few inserts),
        // so keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn append_events(&self, st: &mut State, events: Vec<DomainEvent>) -> Vec<DomainEvent> {
        let mut out = Vec::with_capacity(events.len());
        for mut e in events {
            st.next_seq += 1;
            e.sequence = st.next_seq;
            if let Some(job) = e.job_id() {
                st.job_events.entry(job).or_default().push(e.sequence);
            }
            st.events.push_back(e.clone());
            out.push(e);
        }
        out
    }

    fn publish(&self, st: &State) {
        self.events_tx.send_replace(st.next_seq);
    }
}

impl State {
    fn event(&self, seq: u64) -> Option<&DomainEvent> {
        let ix = seq.checked_sub(self.purged + 1)?;
        self.events.get(ix as usize)
    }

    fn events_after(&self, after: u64, limit: usize) -> Vec<DomainEvent> {
        let start = after.saturating_sub(self.purged) as usize;
        self.events
            .iter()
            .skip(start)
            .take(limit)
            .cloned()
            .collect()
    }
}

fn sync_queue(st: &mut State, job: &Job) {
    let pending = matches!(job.status, JobStatus::Pending { .. });
    match (pending, st.queue_pos.contains_key(&job.id)) {
        (true, false) => {
            st.enqueue_seq += 1;
            let key = (std::cmp::Reverse(job.spec.priority()), st.enqueue_seq);
            st.queue.insert(key, job.id);
            st.queue_pos.insert(job.id, key);
        }
        (false, true) => {
            if let Some(key) = st.queue_pos.remove(&job.id) {
                st.queue.remove(&key);
            }
            st.claims.remove(&job.id);
        }
        (true, true) => {
            // Still pending (e.g. a retry): the claim ends with the change.
            st.claims.remove(&job.id);
        }
        (false, false) => {}
    }
}

fn not_before(job: &Job) -> Option<Timestamp> {
    match job.status {
        JobStatus::Pending { not_before } => not_before,
        _ => None,
    }
}

fn page_limit(limit: usize) -> usize {
    if limit == 0 { 100 } else { limit.min(1000) }
}

#[async_trait]
impl JobStore for MemoryStore {
    async fn create(&self, job: &Job, events: Vec<DomainEvent>) -> Result<Created, StoreError> {
        let mut st = self.state();
        if let Some(key) = job.spec.idempotency_key()
            && let Some(existing) = st.idempotency.get(key).and_then(|id| st.jobs.get(id))
        {
            return Ok(Created::Existing(Box::new(existing.clone())));
        }
        if st.jobs.contains_key(&job.id) {
            return Err(StoreError::AlreadyExists(format!("job {}", job.id)));
        }
        if let Some(key) = job.spec.idempotency_key() {
            st.idempotency.insert(key.to_owned(), job.id);
        }
        st.jobs.insert(job.id, job.clone());
        st.order.push(job.id);
        sync_queue(&mut st, job);
        let events = self.append_events(&mut st, events);
        self.publish(&st);
        Ok(Created::New(events))
    }

    async fn update(
        &self,
        job: &Job,
        expected_version: u64,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        let mut st = self.state();
        let found = st
            .jobs
            .get(&job.id)
            .map(|j| j.version)
            .ok_or_else(|| StoreError::NotFound(format!("job {}", job.id)))?;
        if found != expected_version {
            return Err(StoreError::Conflict {
                job: job.id,
                expected: expected_version,
                found,
            });
        }
        st.jobs.insert(job.id, job.clone());
        sync_queue(&mut st, job);
        let events = self.append_events(&mut st, events);
        self.publish(&st);
        Ok(events)
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        Ok(self.state().jobs.get(&id).cloned())
    }

    async fn list(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        let st = self.state();
        let start = match &filter.cursor {
            Some(c) => c.parse::<usize>().map_err(|_| {
                StoreError::Invalid(format!("cursor {c:?} is not one this server issued"))
            })?,
            None => 0,
        };
        let limit = page_limit(filter.limit);
        let mut jobs = Vec::new();
        let mut next = None;
        for (i, id) in st.order.iter().rev().enumerate().skip(start) {
            let job = &st.jobs[id];
            if filter.state.is_some_and(|s| s != job.state()) {
                continue;
            }
            if jobs.len() == limit {
                next = Some(i.to_string());
                break;
            }
            jobs.push(job.clone());
        }
        Ok(JobPage {
            jobs,
            next_cursor: next,
        })
    }
}

#[async_trait]
impl JobQueue for MemoryStore {
    async fn claim(
        &self,
        owner: &str,
        now: Timestamp,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let mut st = self.state();
        let mut claimed = Vec::new();
        let mut next_ready_at: Option<Timestamp> = None;
        let ids: Vec<JobId> = st.queue.values().copied().collect();
        for id in ids {
            let job = &st.jobs[&id];
            if let Some(nb) = not_before(job)
                && nb > now
            {
                next_ready_at = Some(next_ready_at.map_or(nb, |t| t.min(nb)));
                continue;
            }
            if let Some((_, until)) = st.claims.get(&id)
                && *until > now
            {
                continue;
            }
            if claimed.len() >= limit {
                next_ready_at = Some(next_ready_at.map_or(now, |t| t.min(now)));
                break;
            }
            claimed.push(job.clone());
            st.claims.insert(id, (owner.to_owned(), add(now, lease)));
        }
        Ok(Claim {
            jobs: claimed,
            next_ready_at,
        })
    }

    async fn release(&self, id: JobId, owner: &str) -> Result<(), StoreError> {
        let mut st = self.state();
        if st.claims.get(&id).is_some_and(|(o, _)| o == owner) {
            st.claims.remove(&id);
        }
        Ok(())
    }

    async fn depth(&self) -> Result<u64, StoreError> {
        Ok(self.state().queue.len() as u64)
    }

    async fn overdue(&self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError> {
        let st = self.state();
        let mut out: Vec<Job> = st
            .jobs
            .values()
            .filter(|j| j.status.deadline().is_some_and(|d| d <= now))
            .cloned()
            .collect();
        out.sort_by_key(|j| j.status.deadline());
        out.truncate(limit);
        Ok(out)
    }
}

#[async_trait]
impl EventLog for MemoryStore {
    async fn append(&self, events: Vec<DomainEvent>) -> Result<Vec<DomainEvent>, StoreError> {
        let mut st = self.state();
        let out = self.append_events(&mut st, events);
        self.publish(&st);
        Ok(out)
    }

    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<DomainEvent>, StoreError> {
        let st = self.state();
        Ok(st.events_after(after, limit))
    }

    async fn last_sequence(&self) -> Result<u64, StoreError> {
        Ok(self.state().next_seq)
    }

    async fn job_events(&self, job: JobId) -> Result<Vec<DomainEvent>, StoreError> {
        let st = self.state();
        Ok(st
            .job_events
            .get(&job)
            .map(|seqs| seqs.iter().filter_map(|s| st.event(*s).cloned()).collect())
            .unwrap_or_default())
    }
}

impl EventSubscription for MemoryStore {
    fn subscribe(&self, after: u64) -> BoxStream<'static, Result<DomainEvent, StoreError>> {
        let store = self.clone();
        let rx = self.events_tx.subscribe();
        stream::unfold(
            (store, rx, after, Vec::<DomainEvent>::new().into_iter()),
            |(store, mut rx, mut after, mut buf)| async move {
                loop {
                    if let Some(e) = buf.next() {
                        after = e.sequence;
                        return Some((Ok(e), (store, rx, after, buf)));
                    }
                    rx.mark_unchanged();
                    let batch = store.state().events_after(after, 1024);
                    if batch.is_empty() {
                        if rx.changed().await.is_err() {
                            return None;
                        }
                        continue;
                    }
                    buf = batch.into_iter();
                }
            },
        )
        .boxed()
    }
}

#[async_trait]
impl AuditQuery for MemoryStore {
    async fn query(&self, filter: &AuditFilter) -> Result<AuditPage, StoreError> {
        let st = self.state();
        let matches = |e: &&DomainEvent| {
            filter
                .correlation_id
                .as_ref()
                .is_none_or(|c| e.correlation_id.as_str() == c)
                && filter
                    .event_type
                    .as_ref()
                    .is_none_or(|t| e.event_type() == t)
                && filter.actor.as_ref().is_none_or(|a| e.actor.as_str() == a)
                && filter.since.is_none_or(|s| e.occurred_at >= s)
                && filter.until.is_none_or(|u| e.occurred_at < u)
        };
        let all: Vec<&DomainEvent> = st.events.iter().filter(matches).collect();
        let total = all.len() as u64;
        let events = all
            .into_iter()
            .skip(filter.offset)
            .take(page_limit(filter.limit))
            .cloned()
            .collect();
        Ok(AuditPage { events, total })
    }

    async fn purge_before(&self, before: Timestamp, batch: usize) -> Result<u64, StoreError> {
        let mut st = self.state();
        let mut n = 0u64;
        while n < batch as u64 {
            match st.events.front() {
                Some(e) if e.occurred_at < before => {
                    let e = st.events.pop_front().expect("front exists");
                    st.purged += 1;
                    if let Some(job) = e.job_id()
                        && let Some(seqs) = st.job_events.get_mut(&job)
                    {
                        seqs.retain(|s| *s != e.sequence);
                    }
                    n += 1;
                }
                _ => break,
            }
        }
        Ok(n)
    }
}

#[async_trait]
impl LogStore for MemoryStore {
    async fn append(
        &self,
        job: JobId,
        attempt: u32,
        lines: Vec<NewLogLine>,
    ) -> Result<u64, StoreError> {
        let last = {
            let mut st = self.state();
            let log = st.logs.entry(job).or_default();
            let hw = log.high_water.entry(attempt).or_insert(0);
            let mut high = *hw;
            let mut seq = log.lines.len() as u64;
            let mut fresh = Vec::with_capacity(lines.len());
            for l in lines {
                if l.agent_seq <= high {
                    continue;
                }
                high = l.agent_seq;
                seq += 1;
                fresh.push(LogLine {
                    seq,
                    attempt,
                    stream: l.stream,
                    at: l.at,
                    text: l.text,
                });
            }
            *log.high_water.get_mut(&attempt).expect("inserted above") = high;
            log.lines.extend(fresh);
            log.lines.len() as u64
        };
        self.logs_tx.send_modify(|v| *v += 1);
        Ok(last)
    }

    async fn read(&self, job: JobId, after: u64, limit: usize) -> Result<Vec<LogLine>, StoreError> {
        let st = self.state();
        Ok(st
            .logs
            .get(&job)
            .map(|l| {
                let start = (after as usize).min(l.lines.len());
                l.lines[start..].iter().take(limit).cloned().collect()
            })
            .unwrap_or_default())
    }

    async fn finish(&self, job: JobId) -> Result<(), StoreError> {
        self.state().logs.entry(job).or_default().finished = true;
        self.logs_tx.send_modify(|v| *v += 1);
        Ok(())
    }

    fn follow(&self, job: JobId, after: u64) -> BoxStream<'static, Result<LogLine, StoreError>> {
        let store = self.clone();
        let rx = self.logs_tx.subscribe();
        stream::unfold(
            (store, rx, after, Vec::<LogLine>::new().into_iter()),
            move |(store, mut rx, mut after, mut buf)| async move {
                loop {
                    if let Some(l) = buf.next() {
                        after = l.seq;
                        return Some((Ok(l), (store, rx, after, buf)));
                    }
                    rx.mark_unchanged();
                    let (batch, finished) = {
                        let st = store.state();
                        match st.logs.get(&job) {
                            Some(l) => {
                                let start = (after as usize).min(l.lines.len());
                                (
                                    l.lines[start..]
                                        .iter()
                                        .take(4096)
                                        .cloned()
                                        .collect::<Vec<_>>(),
                                    l.finished,
                                )
                            }
                            None => (Vec::new(), false),
                        }
                    };
                    if batch.is_empty() {
                        if finished || rx.changed().await.is_err() {
                            return None;
                        }
                        continue;
                    }
                    buf = batch.into_iter();
                }
            },
        )
        .boxed()
    }
}

#[async_trait]
impl SecretStore for MemoryStore {
    async fn put(&self, name: &str, value: &str, now: Timestamp) -> Result<(), StoreError> {
        let mut st = self.state();
        let created = st.secrets.get(name).map_or(now, |s| s.1);
        st.secrets
            .insert(name.to_owned(), (value.to_owned(), created, now));
        Ok(())
    }

    async fn get(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self.state().secrets.get(name).map(|s| s.0.clone()))
    }

    async fn list(&self) -> Result<Vec<SecretMeta>, StoreError> {
        Ok(self
            .state()
            .secrets
            .iter()
            .map(|(name, (_, created_at, updated_at))| SecretMeta {
                name: name.clone(),
                created_at: *created_at,
                updated_at: *updated_at,
            })
            .collect())
    }

    async fn delete(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.state().secrets.remove(name).is_some())
    }
}

#[async_trait]
impl WorkerRegistry for MemoryStore {
    async fn upsert(&self, worker: &Worker) -> Result<(), StoreError> {
        self.state().workers.insert(worker.id, worker.clone());
        Ok(())
    }

    async fn upsert_recording(
        &self,
        worker: &Worker,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        self.state().workers.insert(worker.id, worker.clone());
        EventLog::append(self, events).await
    }

    fn upsert_records_events(&self) -> bool {
        true
    }

    async fn get(&self, id: WorkerId) -> Result<Option<Worker>, StoreError> {
        Ok(self.state().workers.get(&id).cloned())
    }

    async fn list(&self) -> Result<Vec<Worker>, StoreError> {
        let mut all: Vec<Worker> = self.state().workers.values().cloned().collect();
        all.sort_by_key(|w| (w.created_at, w.id));
        Ok(all)
    }

    async fn issue_token(
        &self,
        worker: WorkerId,
        token: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.state()
            .tokens
            .insert(token.to_owned(), (worker, expires_at, false));
        Ok(())
    }

    async fn consume_token(
        &self,
        token: &str,
        now: Timestamp,
    ) -> Result<Result<WorkerId, TokenRejection>, StoreError> {
        let mut st = self.state();
        Ok(match st.tokens.get_mut(token) {
            None => Err(TokenRejection::Unknown),
            Some((_, _, true)) => Err(TokenRejection::Reused),
            Some((_, expires, _)) if *expires <= now => Err(TokenRejection::Expired),
            Some((worker, _, used)) => {
                *used = true;
                Ok(*worker)
            }
        })
    }

    async fn consume_token_for(
        &self,
        worker: WorkerId,
        token: &str,
        now: Timestamp,
    ) -> Result<Result<WorkerId, TokenRejection>, StoreError> {
        let mut st = self.state();
        Ok(match st.tokens.get_mut(token) {
            None => Err(TokenRejection::Unknown),
            Some((w, _, _)) if *w != worker => Err(TokenRejection::OtherWorker),
            Some((_, _, true)) => Err(TokenRejection::Reused),
            Some((_, expires, _)) if *expires <= now => Err(TokenRejection::Expired),
            Some((w, _, used)) => {
                *used = true;
                Ok(*w)
            }
        })
    }
}

#[async_trait]
impl ProviderStore for MemoryStore {
    async fn upsert(&self, record: &ProviderRecord) -> Result<(), StoreError> {
        self.state()
            .providers
            .insert(record.id.to_string(), record.clone());
        Ok(())
    }

    async fn upsert_recording(
        &self,
        record: &ProviderRecord,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        self.state()
            .providers
            .insert(record.id.to_string(), record.clone());
        EventLog::append(self, events).await
    }

    fn upsert_records_events(&self) -> bool {
        true
    }

    async fn list(&self) -> Result<Vec<ProviderRecord>, StoreError> {
        Ok(self.state().providers.values().cloned().collect())
    }
}

#[async_trait]
impl Leases for MemoryStore {
    async fn try_acquire(
        &self,
        duty: &str,
        holder: &str,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<bool, StoreError> {
        let mut st = self.state();
        let free = st
            .leases
            .get(duty)
            .is_none_or(|(h, until)| h == holder || *until <= now);
        if free {
            st.leases
                .insert(duty.to_owned(), (holder.to_owned(), add(now, ttl)));
        }
        Ok(free)
    }

    async fn release(&self, duty: &str, holder: &str) -> Result<(), StoreError> {
        let mut st = self.state();
        if st.leases.get(duty).is_some_and(|(h, _)| h == holder) {
            st.leases.remove(duty);
        }
        Ok(())
    }
}
