//! Ports: the traits adapters implement. Split by capability so that an
//! embedder can swap one store without the others, and object-safe so that
//! they compose at runtime as `Arc<dyn Port>`.
//!
//! Two promises every store adapter keeps:
//! - **Atomic state and events.** [`JobStore::create`] and
//!   [`JobStore::update`] commit the job row, its queue entry and its
//!   events as one unit; the events get their `sequence` in that unit.
//! - **The store arbitrates between replicas.** Updates are conditional on
//!   the job's `version` ([`StoreError::Conflict`] otherwise), and
//!   [`JobQueue::claim`] hands each pending job to one claimant only.

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::event::DomainEvent;
use crate::ids::{Actor, CorrelationId, JobId, ProviderId, WorkerId};
use crate::job::{Job, JobState};
use crate::spec::Resources;
use crate::time::Timestamp;
use crate::worker::Worker;

/// Errors of store adapters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The job changed since it was read (another replica or request won).
    #[error("job {job} was changed concurrently (expected version {expected}, found {found})")]
    Conflict {
        /// The job.
        job: JobId,
        /// Version the caller read.
        expected: u64,
        /// Version now stored.
        found: u64,
    },
    /// The record does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A record with the same key exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The input was refused (e.g. cursor malformed).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The backing service is unreachable; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Anything else.
    #[error("store error: {0}")]
    Other(String),
}

/// Result of [`JobStore::create`].
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    /// The job was stored; the events carry their sequences.
    New(Vec<DomainEvent>),
    /// A job with the same idempotency key exists; nothing was stored.
    Existing(Box<Job>),
}

/// Filter of [`JobStore::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Page size (adapters cap it at 1000; 0 means 100).
    pub limit: usize,
    /// Opaque cursor from a previous page.
    pub cursor: Option<String>,
}

/// A page of jobs, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPage {
    /// Jobs.
    pub jobs: Vec<Job>,
    /// Cursor of the next page, if any.
    pub next_cursor: Option<String>,
}

/// Jobs and their state changes.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Stores a new job, its queue entry and its creation events in one
    /// unit. With an idempotency key already used, stores nothing and
    /// returns the existing job.
    async fn create(&self, job: &Job, events: Vec<DomainEvent>) -> Result<Created, StoreError>;
    /// Stores a state change and its events in one unit, if the stored
    /// version is `expected_version`. A job back in `PENDING` re-enters the
    /// queue; a job leaving `PENDING` leaves it. Returns the events with
    /// their sequences.
    async fn update(
        &self,
        job: &Job,
        expected_version: u64,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError>;
    /// One job.
    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError>;
    /// Jobs, newest first.
    async fn list(&self, filter: &JobFilter) -> Result<JobPage, StoreError>;
    /// Whether [`JobStore::update`] of a job into a terminal state also
    /// marks the job's log finished in this same object's [`LogStore`]
    /// (what [`LogStore::finish`] does), in the same unit. The runtime then
    /// saves its own `finish` call when one object serves as both its job
    /// store and its log store. Default `false`.
    fn update_finishes_logs(&self) -> bool {
        false
    }
    /// [`JobStore::update`] that also saves `workers` (as
    /// [`WorkerRegistry::upsert`] would, into this same object's
    /// registry) in the same unit, whether or not the job's version
    /// matched. The runtime calls it only when
    /// [`JobStore::update_saves_workers`] is `true` and one object serves
    /// as both its job store and its worker registry; the default refuses.
    async fn update_saving_workers(
        &self,
        job: &Job,
        expected_version: u64,
        events: Vec<DomainEvent>,
        workers: &[Worker],
    ) -> Result<Vec<DomainEvent>, StoreError> {
        let _ = (job, expected_version, events, workers);
        Err(StoreError::Invalid(
            "this job store does not save workers with its updates \
             (update_saves_workers is false)"
                .into(),
        ))
    }
    /// Whether [`JobStore::update_saving_workers`] is supported. Default
    /// `false`.
    fn update_saves_workers(&self) -> bool {
        false
    }
    /// Several updates of different jobs in one call: each entry is
    /// [`JobStore::update`] (with workers, [`JobStore::update_saving_workers`])
    /// and is decided on its own, so a version conflict or an unknown job
    /// fails that entry only. The answers come in the order of `updates`.
    /// An `Err` of the whole call means nothing was stored (the store was
    /// unreachable, or two entries name the same job).
    ///
    /// The default makes one call per entry, in order; a store that can do
    /// better (one statement, one transaction for all) says so with
    /// [`JobStore::batches_updates`], and only then does the runtime
    /// gather the updates of a pass into one call.
    async fn update_many(&self, updates: Vec<JobUpdate>) -> Result<UpdateAnswers, StoreError> {
        for (i, u) in updates.iter().enumerate() {
            if updates[..i].iter().any(|o| o.job.id == u.job.id) {
                return Err(StoreError::Invalid(format!(
                    "job {} appears twice in one batch of updates; \
                     each entry must name a different job",
                    u.job.id
                )));
            }
        }
        let mut answers = Vec::with_capacity(updates.len());
        for u in updates {
            let r = if u.workers.is_empty() {
                self.update(&u.job, u.expected_version, u.events).await
            } else {
                self.update_saving_workers(&u.job, u.expected_version, u.events, &u.workers)
                    .await
            };
            answers.push(r);
        }
        Ok(answers)
    }
    /// Whether [`JobStore::update_many`] stores its entries in one unit of
    /// work (cheaper than one call each). Default `false`.
    fn batches_updates(&self) -> bool {
        false
    }
    /// Several [`JobStore::create`]s in one call, each decided on its own
    /// (an idempotency key already used answers `Existing` for that entry
    /// only; a later entry with the key of an earlier one in the same call
    /// answers `Existing` with the earlier job). Answers in entry order;
    /// an `Err` of the whole call means nothing was stored.
    ///
    /// The default makes one call per entry, in order; a store that does
    /// better says so with [`JobStore::batches_creates`].
    async fn create_many(&self, jobs: Vec<NewJob>) -> Result<CreateAnswers, StoreError> {
        let mut answers = Vec::with_capacity(jobs.len());
        for j in jobs {
            answers.push(self.create(&j.job, j.events).await);
        }
        Ok(answers)
    }
    /// Whether [`JobStore::create_many`] stores its entries in one unit of
    /// work. Default `false`.
    fn batches_creates(&self) -> bool {
        false
    }
}

/// One entry of [`JobStore::create_many`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// The job.
    pub job: Job,
    /// Its creation events.
    pub events: Vec<DomainEvent>,
}

/// Answers of [`JobStore::create_many`], one per entry, in order.
pub type CreateAnswers = Vec<Result<Created, StoreError>>;

/// One entry of [`JobStore::update_many`].
#[derive(Debug, Clone, PartialEq)]
pub struct JobUpdate {
    /// The job as it is to be stored.
    pub job: Job,
    /// The version the stored job must have.
    pub expected_version: u64,
    /// The events of the change.
    pub events: Vec<DomainEvent>,
    /// Worker records saved with it (see
    /// [`JobStore::update_saving_workers`]); empty for none.
    pub workers: Vec<Worker>,
}

/// Answers of [`JobStore::update_many`], one per entry, in order: the
/// stored events with their sequences, or why that entry was not stored.
pub type UpdateAnswers = Vec<Result<Vec<DomainEvent>, StoreError>>;

/// A claim on queued jobs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Claim {
    /// The jobs claimed, in `PENDING`, owned by the claimant until they
    /// change state or the lease expires.
    pub jobs: Vec<Job>,
    /// Earliest `not_before` of jobs still waiting, if any.
    pub next_ready_at: Option<Timestamp>,
}

/// The queue of pending jobs, shared by replicas.
#[async_trait]
pub trait JobQueue: Send + Sync {
    /// Claims up to `limit` pending jobs ready at `now` (priority first,
    /// FIFO within a priority), each for one claimant only, for `lease`.
    async fn claim(
        &self,
        owner: &str,
        now: Timestamp,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError>;
    /// Gives a claimed job back to the queue untouched.
    async fn release(&self, id: JobId, owner: &str) -> Result<(), StoreError>;
    /// Jobs waiting in the queue (ready or not).
    async fn depth(&self) -> Result<u64, StoreError>;
    /// Whether the store can serve: reachable and, for a store with a
    /// schema, migrated to the version this build expects. The default
    /// asks for the queue depth. An error says what is not ready.
    async fn ready(&self) -> Result<(), StoreError> {
        self.depth().await.map(|_| ())
    }
    /// Jobs in `SCHEDULED`, `ASSIGNED` or `RUNNING` whose deadline is at or
    /// before `now`: the sweeper decides them even if their replica died.
    async fn overdue(&self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError>;
}

/// The event log: append and read back in sequence order.
#[async_trait]
pub trait EventLog: Send + Sync {
    /// Appends events not tied to a job change (worker, provider, secret
    /// events). Returns them with their sequences.
    async fn append(&self, events: Vec<DomainEvent>) -> Result<Vec<DomainEvent>, StoreError>;
    /// Events with `sequence > after`, in order, at most `limit`.
    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<DomainEvent>, StoreError>;
    /// Every event of one job, in order.
    async fn job_events(&self, job: JobId) -> Result<Vec<DomainEvent>, StoreError>;
    /// The highest sequence stored so far (0 when empty). The default
    /// pages through the log; adapters override it with a cheap lookup.
    /// To start a subscription "from now", use
    /// [`EventLog::settled_sequence`]: where transactions can commit out of
    /// sequence order, an event below the highest one may still commit.
    async fn last_sequence(&self) -> Result<u64, StoreError> {
        let mut after = 0;
        loop {
            let batch = self.read_after(after, 10_000).await?;
            match batch.last() {
                Some(e) => after = e.sequence,
                None => return Ok(after),
            }
        }
    }
    /// A sequence to start a live subscription "from now" without missing
    /// anything: every event at or below it has committed (or never will),
    /// and every event that commits after this call returns has a higher
    /// sequence. The default is [`EventLog::last_sequence`], right for
    /// stores that assign sequences in commit order (the in-memory one);
    /// PostgreSQL waits for the transactions that were writing events when
    /// it was called (see `hodei-postgres`'s bus).
    async fn settled_sequence(&self) -> Result<u64, StoreError> {
        self.last_sequence().await
    }
}

/// Live subscription to the event log.
pub trait EventSubscription: Send + Sync {
    /// Every event with `sequence > after`: first those already stored,
    /// then new ones as they commit, in sequence order, never skipping one.
    fn subscribe(&self, after: u64) -> BoxStream<'static, Result<DomainEvent, StoreError>>;
}

/// Audit query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Events of this correlation id.
    pub correlation_id: Option<String>,
    /// Events of this type.
    pub event_type: Option<String>,
    /// Events of this actor.
    pub actor: Option<String>,
    /// At or after.
    pub since: Option<Timestamp>,
    /// Before.
    pub until: Option<Timestamp>,
    /// Page size (0 means 100, capped at 1000).
    pub limit: usize,
    /// Offset in the result.
    pub offset: usize,
}

/// A page of audit results, in sequence order.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditPage {
    /// Events.
    pub events: Vec<DomainEvent>,
    /// Matching events in total.
    pub total: u64,
}

/// Querying the audit trail.
#[async_trait]
pub trait AuditQuery: Send + Sync {
    /// Events matching `filter`.
    async fn query(&self, filter: &AuditFilter) -> Result<AuditPage, StoreError>;
    /// Deletes events older than `before`, at most `batch` per call;
    /// returns how many were deleted.
    async fn purge_before(&self, before: Timestamp, batch: usize) -> Result<u64, StoreError>;
}

/// Which output a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A log line as produced by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewLogLine {
    /// The agent's sequence number within the attempt, from 1.
    pub agent_seq: u64,
    /// Source.
    pub stream: LogStream,
    /// When it was read.
    pub at: Timestamp,
    /// Text, secrets already masked.
    pub text: String,
}

/// A stored log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Per-job sequence assigned by the store, from 1, no gaps.
    pub seq: u64,
    /// Attempt that printed it.
    pub attempt: u32,
    /// Source.
    pub stream: LogStream,
    /// When it was read.
    pub at: Timestamp,
    /// Text.
    pub text: String,
}

/// Job output.
#[async_trait]
pub trait LogStore: Send + Sync {
    /// Appends lines of `attempt`. Lines whose `agent_seq` was already
    /// stored for that attempt are ignored (re-sends after a reconnect).
    /// Returns the last stored sequence of the job.
    async fn append(
        &self,
        job: JobId,
        attempt: u32,
        lines: Vec<NewLogLine>,
    ) -> Result<u64, StoreError>;
    /// Lines with `seq > after`, at most `limit`.
    async fn read(&self, job: JobId, after: u64, limit: usize) -> Result<Vec<LogLine>, StoreError>;
    /// Marks the log complete: followers end after the last line.
    async fn finish(&self, job: JobId) -> Result<(), StoreError>;
    /// Lines with `seq > after`: history, then live lines until the log is
    /// finished; nothing missed or duplicated at the seam.
    fn follow(&self, job: JobId, after: u64) -> BoxStream<'static, Result<LogLine, StoreError>>;
}

/// A secret's metadata (never its value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretMeta {
    /// Name.
    pub name: String,
    /// Creation time.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
}

/// Secret values by name.
#[async_trait]
pub trait SecretStore: Send + Sync {
    /// Creates or replaces a secret.
    async fn put(&self, name: &str, value: &str, now: Timestamp) -> Result<(), StoreError>;
    /// A secret's value.
    async fn get(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// Names and times, sorted by name.
    async fn list(&self) -> Result<Vec<SecretMeta>, StoreError>;
    /// Deletes; `false` if it did not exist.
    async fn delete(&self, name: &str) -> Result<bool, StoreError>;
}

/// Why a registration token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenRejection {
    /// Never issued.
    Unknown,
    /// Already used.
    Reused,
    /// Past its expiry.
    Expired,
    /// Issued for another worker; it was left unused.
    OtherWorker,
}

impl std::fmt::Display for TokenRejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenRejection::Unknown => "unknown registration token",
            TokenRejection::Reused => "registration token already used",
            TokenRejection::Expired => "registration token expired",
            TokenRejection::OtherWorker => {
                "registration token was issued for another worker id (check the worker id, e.g. HODEI_WORKER_ID); the token was not used and stays valid for its worker"
            }
        })
    }
}

/// Workers and their one-time registration tokens.
#[async_trait]
pub trait WorkerRegistry: Send + Sync {
    /// Creates or replaces a worker record.
    async fn upsert(&self, worker: &Worker) -> Result<(), StoreError>;
    /// [`WorkerRegistry::upsert`] and, in the same unit, the append of
    /// `events` (the worker's state change) to this same object's
    /// [`EventLog`]: the record and its events commit together. Returns
    /// the events with their sequences. The runtime calls it only when
    /// [`WorkerRegistry::upsert_records_events`] is `true` and one object
    /// serves as both its registry and its event log; the default refuses.
    async fn upsert_recording(
        &self,
        worker: &Worker,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        let _ = (worker, events);
        Err(StoreError::Invalid(
            "this registry does not record events with its upserts \
             (upsert_records_events is false)"
                .into(),
        ))
    }
    /// Whether [`WorkerRegistry::upsert_recording`] is supported. Default
    /// `false`.
    fn upsert_records_events(&self) -> bool {
        false
    }
    /// Several [`WorkerRegistry::upsert_recording`]s in one call (one unit
    /// on PostgreSQL: one statement). Nothing is stored when it fails.
    /// The default makes one call per entry (only meaningful where
    /// [`WorkerRegistry::upsert_records_events`] is `true`).
    async fn upsert_many_recording(
        &self,
        entries: Vec<(Worker, Vec<DomainEvent>)>,
    ) -> Result<(), StoreError> {
        for (worker, events) in entries {
            self.upsert_recording(&worker, events).await?;
        }
        Ok(())
    }
    /// One worker.
    async fn get(&self, id: WorkerId) -> Result<Option<Worker>, StoreError>;
    /// All workers not terminated, plus recently terminated ones.
    async fn list(&self) -> Result<Vec<Worker>, StoreError>;
    /// Issues a one-time token for `worker`, valid until `expires_at`.
    async fn issue_token(
        &self,
        worker: WorkerId,
        token: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError>;
    /// Consumes a token: the worker it was issued for, or why not.
    async fn consume_token(
        &self,
        token: &str,
        now: Timestamp,
    ) -> Result<Result<WorkerId, TokenRejection>, StoreError>;
    /// Consumes a token only if it was issued for `worker`: a token of
    /// another worker is left usable and reported as
    /// [`TokenRejection::OtherWorker`]; otherwise as
    /// [`WorkerRegistry::consume_token`].
    async fn consume_token_for(
        &self,
        worker: WorkerId,
        token: &str,
        now: Timestamp,
    ) -> Result<Result<WorkerId, TokenRejection>, StoreError>;
}

/// Leases on singleton duties (deadline sweeps, retention, orphan
/// reconciliation): of the replicas sharing a store, one holds a duty at a
/// time, and another takes it over once the holder stops renewing it
/// (it died, hangs, or lost the store).
///
/// A lease is held until `now + ttl` of the last successful
/// [`Leases::try_acquire`]; renewing is acquiring again by the same holder.
/// Like the queue, the store never decides what time it is: expiry compares
/// the stored expiry with the caller's `now`, so replicas' clocks must
/// agree to well within the TTL.
#[async_trait]
pub trait Leases: Send + Sync {
    /// Takes or renews the lease on `duty` for `holder` until `now + ttl`.
    /// Succeeds (`true`) when nobody holds it, when its lease ended at or
    /// before `now`, or when `holder` already holds it; `false` when
    /// another holder's lease is still running. Atomic: of concurrent
    /// callers for one free duty, exactly one succeeds.
    async fn try_acquire(
        &self,
        duty: &str,
        holder: &str,
        ttl: Duration,
        now: Timestamp,
    ) -> Result<bool, StoreError>;
    /// Gives the lease up if `holder` holds it, so that another replica can
    /// take it at once; a no-op otherwise.
    async fn release(&self, duty: &str, holder: &str) -> Result<(), StoreError>;
}

/// A configured provider, as stored and listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderRecord {
    /// Name.
    pub id: ProviderId,
    /// Kind (`local`, `docker`, `kubernetes`).
    pub kind: String,
    /// Configuration (no secrets).
    pub config: serde_json::Value,
    /// Last known health.
    pub healthy: bool,
    /// Health detail.
    pub health_message: String,
    /// Last change.
    pub updated_at: Timestamp,
}

/// Provider records.
#[async_trait]
pub trait ProviderStore: Send + Sync {
    /// Creates or replaces a record.
    async fn upsert(&self, record: &ProviderRecord) -> Result<(), StoreError>;
    /// [`ProviderStore::upsert`] and, in the same unit, the append of
    /// `events` (the provider's registration, update or health change) to
    /// this same object's [`EventLog`]. Returns the events with their
    /// sequences. The runtime calls it only when
    /// [`ProviderStore::upsert_records_events`] is `true` and one object
    /// serves as both its provider store and its event log; the default
    /// refuses.
    async fn upsert_recording(
        &self,
        record: &ProviderRecord,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        let _ = (record, events);
        Err(StoreError::Invalid(
            "this provider store does not record events with its upserts \
             (upsert_records_events is false)"
                .into(),
        ))
    }
    /// Whether [`ProviderStore::upsert_recording`] is supported. Default
    /// `false`.
    fn upsert_records_events(&self) -> bool {
        false
    }
    /// All records by name.
    async fn list(&self) -> Result<Vec<ProviderRecord>, StoreError>;
}

/// What a provider needs to start a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerLaunch {
    /// Id the agent registers under.
    pub worker: WorkerId,
    /// One-time registration token.
    pub token: String,
    /// gRPC URL of the server, as seen from the host.
    pub server_url: String,
    /// Image, for providers that run images.
    pub image: Option<String>,
    /// Resource limits.
    pub resources: Resources,
    /// Labels the worker advertises.
    pub labels: BTreeMap<String, String>,
    /// Job it is provisioned for, when ephemeral.
    pub job: Option<JobId>,
    /// Identity of the server (labels on containers).
    pub server_id: String,
    /// Jobs the agent may run at once (its `--capacity`).
    pub capacity: u32,
}

/// Errors of providers. The message is shown to users on the job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The backend (Docker engine, cluster) cannot be reached.
    #[error("provider backend unreachable: {0}")]
    Unavailable(String),
    /// The image does not exist locally.
    #[error("image not found: {0}")]
    ImageNotFound(String),
    /// The worker could not be created.
    #[error("worker creation failed: {0}")]
    CreateFailed(String),
    /// The worker does not exist.
    #[error("worker not found: {0}")]
    NotFound(WorkerId),
    /// Anything else.
    #[error("provider error: {0}")]
    Other(String),
}

/// Health of a provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderHealth {
    /// Usable now.
    pub healthy: bool,
    /// Detail.
    pub message: String,
}

/// A worker the provider knows of (for orphan reconciliation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionedWorker {
    /// Worker id from its labels/arguments.
    pub worker: WorkerId,
    /// Server that created it.
    pub server_id: String,
    /// Still running.
    pub alive: bool,
}

/// A worker that ended on the provider's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerExit {
    /// The worker.
    pub worker: WorkerId,
    /// What happened (exit status, container state).
    pub reason: String,
    /// Killed for exceeding its memory limit.
    pub oom_killed: bool,
}

/// Creates and destroys workers.
#[async_trait]
pub trait WorkerProvider: Send + Sync {
    /// Name.
    fn id(&self) -> &ProviderId;
    /// Kind (`local`, `docker`, `kubernetes`).
    fn kind(&self) -> &'static str;
    /// Whether jobs may name an image.
    fn runs_images(&self) -> bool;
    /// Starts a worker; returns once it is started (it then connects).
    async fn create(&self, launch: WorkerLaunch) -> Result<(), ProviderError>;
    /// Stops and removes a worker; succeeds if it is already gone.
    async fn destroy(&self, worker: WorkerId) -> Result<(), ProviderError>;
    /// Checks the backend.
    async fn health(&self) -> ProviderHealth;
    /// Workers of this provider that exist on the backend.
    async fn list(&self) -> Result<Vec<ProvisionedWorker>, ProviderError>;
    /// Exits of workers, as the backend observes them. Called once.
    fn exits(&self) -> BoxStream<'static, WorkerExit>;
}

/// A job handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct RunJob {
    /// The job.
    pub job: Job,
    /// Secret values by name, for the job process only.
    pub secrets: BTreeMap<String, String>,
}

/// Messages from the control plane to a worker.
#[derive(Debug, Clone, PartialEq)]
pub enum ToWorker {
    /// Run this attempt.
    Run(Box<RunJob>),
    /// Stop this attempt (cancel, timeout, decided elsewhere).
    Cancel {
        /// The job.
        job: JobId,
        /// The attempt.
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// Take no new work, finish, then exit.
    Drain,
    /// Exit now (ephemeral worker done).
    Shutdown,
}

/// The connection to one worker, as the transport provides it.
#[async_trait]
pub trait WorkerLink: Send + Sync {
    /// Sends a message; an error means the link is gone.
    async fn send(&self, message: ToWorker) -> Result<(), String>;
}

/// Identity and flow of a request, from the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    /// Correlation id (from `x-correlation-id` or generated at the edge).
    pub correlation_id: CorrelationId,
    /// Caller identity.
    pub actor: Actor,
}
