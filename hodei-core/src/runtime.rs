//! The async shell around the pure [`Engine`]: it reads the clock, feeds
//! inputs, carries out effects against the ports, and arms one timer.
//!
//! One tokio task (the *driver*) owns the engine; everything that changes
//! a decision goes through its command channel, so the engine is never
//! shared. Reads (job lookups, logs, audit) go straight to the stores, and
//! so do log appends, which are the hot path.
//!
//! The driver works in passes: it feeds the engine every command waiting
//! in the channel, then carries out the effects together, the store calls
//! of different jobs and workers concurrently, those of one job in the
//! engine's order (see `Driver::drain`). A submission is answered once its
//! job is stored, a cancellation or a drain once its effects are. On a
//! store with round trips (PostgreSQL) this is what lets throughput grow
//! with the number of jobs in flight.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::stream::{BoxStream, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::engine::{
    AttemptReport, Effect, Engine, EngineConfig, Entropy, LaunchRequest, ProviderConfig,
    RefusalCode, Registration,
};
use crate::error::{EngineError, SpecError};
use crate::event::{DomainEvent, EventBody};
use crate::ids::{Actor, CorrelationId, EventId, JobId, ProviderId, WorkerId};
use crate::job::{Failure, FailureKind, Job, JobCommand, JobState, TransitionContext};
use crate::memory::MemoryStore;
use crate::ports::{
    AuditFilter, AuditPage, AuditQuery, Created, EventLog, EventSubscription, JobFilter, JobPage,
    JobQueue, JobStore, JobUpdate, Leases, LogLine, LogStore, NewJob, NewLogLine, ProviderRecord,
    ProviderStore, RequestContext, RunJob, SecretMeta, SecretStore, StoreError, ToWorker,
    WorkerLaunch, WorkerLink, WorkerProvider, WorkerRegistry,
};
use crate::spec::{JobSpec, RawJobSpec, SpecLimits};
use crate::time::{Timestamp, add};
use crate::worker::Worker;

/// Errors of the control plane API, mapped by transports to gRPC codes
/// and HTTP statuses. The message says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Bad input (400 / INVALID_ARGUMENT).
    #[error("{0}")]
    InvalidArgument(String),
    /// Unknown id (404 / NOT_FOUND).
    #[error("{0}")]
    NotFound(String),
    /// Valid input the current state refuses (409 / FAILED_PRECONDITION).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Missing or bad credentials (401 / UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// A dependency is down; retry (503 / UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// A bug or an unexpected failure (500 / INTERNAL).
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::NotFound(format!("{m} not found")),
            StoreError::Invalid(m) => ApiError::InvalidArgument(m),
            StoreError::Unavailable(m) => ApiError::Unavailable(format!("store unavailable: {m}")),
            StoreError::Conflict { .. } | StoreError::AlreadyExists(_) => {
                ApiError::FailedPrecondition(e.to_string())
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ApiError::InvalidArgument(e.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::UnknownJob(id) => ApiError::NotFound(format!("job {id} not found")),
            EngineError::UnknownWorker(id) => ApiError::NotFound(format!("worker {id} not found")),
            EngineError::UnknownProvider { .. } => ApiError::InvalidArgument(e.to_string()),
            other => ApiError::FailedPrecondition(other.to_string()),
        }
    }
}

/// The store ports the control plane uses, each as a trait object.
#[derive(Clone)]
pub struct Stores {
    /// Jobs.
    pub jobs: Arc<dyn JobStore>,
    /// Queue.
    pub queue: Arc<dyn JobQueue>,
    /// Event log.
    pub events: Arc<dyn EventLog>,
    /// Event bus.
    pub bus: Arc<dyn EventSubscription>,
    /// Audit.
    pub audit: Arc<dyn AuditQuery>,
    /// Logs.
    pub logs: Arc<dyn LogStore>,
    /// Secrets.
    pub secrets: Arc<dyn SecretStore>,
    /// Workers and tokens.
    pub workers: Arc<dyn WorkerRegistry>,
    /// Provider records.
    pub providers: Arc<dyn ProviderStore>,
    /// Leases on singleton duties.
    pub leases: Arc<dyn Leases>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stores")
    }
}

impl Stores {
    /// Whether a terminal job update already finishes the job's log: the
    /// job store says so ([`JobStore::update_finishes_logs`]) and the log
    /// store is that same object.
    pub fn terminal_update_finishes_logs(&self) -> bool {
        self.jobs.update_finishes_logs()
            && std::ptr::addr_eq(Arc::as_ptr(&self.jobs), Arc::as_ptr(&self.logs))
    }

    /// Whether a job update can carry worker records into the same unit:
    /// the job store supports it ([`JobStore::update_saves_workers`]) and
    /// the worker registry is that same object.
    pub fn update_saves_workers(&self) -> bool {
        self.jobs.update_saves_workers()
            && std::ptr::addr_eq(Arc::as_ptr(&self.jobs), Arc::as_ptr(&self.workers))
    }

    /// Whether a worker record and its events can be stored as one unit:
    /// the registry supports it ([`WorkerRegistry::upsert_records_events`])
    /// and the event log is that same object.
    pub fn worker_saves_record_events(&self) -> bool {
        self.workers.upsert_records_events()
            && std::ptr::addr_eq(Arc::as_ptr(&self.workers), Arc::as_ptr(&self.events))
    }

    /// Whether a provider record and its events can be stored as one unit:
    /// the provider store supports it
    /// ([`ProviderStore::upsert_records_events`]) and the event log is that
    /// same object.
    pub fn provider_saves_record_events(&self) -> bool {
        self.providers.upsert_records_events()
            && std::ptr::addr_eq(Arc::as_ptr(&self.providers), Arc::as_ptr(&self.events))
    }

    /// Saves a provider record with its events: one unit where the store
    /// can; else the events first, so that a crash in between repeats an
    /// event (the record is still old at the next start or check) rather
    /// than losing one.
    async fn save_provider(
        &self,
        record: &ProviderRecord,
        events: Vec<DomainEvent>,
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return self.providers.upsert(record).await;
        }
        if self.provider_saves_record_events() {
            self.providers.upsert_recording(record, events).await?;
            return Ok(());
        }
        self.events.append(events).await?;
        self.providers.upsert(record).await
    }

    /// Marks `job`'s log finished after its terminal update, unless that
    /// update did it already.
    async fn finish_log(&self, job: JobId) {
        if !self.terminal_update_finishes_logs() {
            let _ = self.logs.finish(job).await;
        }
    }

    /// Every port from one in-memory store.
    pub fn memory() -> Stores {
        Stores::from_store(Arc::new(MemoryStore::new()))
    }

    /// Every port from one adapter that implements them all.
    pub fn from_store<S>(s: Arc<S>) -> Stores
    where
        S: JobStore
            + JobQueue
            + EventLog
            + EventSubscription
            + AuditQuery
            + LogStore
            + SecretStore
            + WorkerRegistry
            + ProviderStore
            + Leases
            + 'static,
    {
        Stores {
            jobs: s.clone(),
            queue: s.clone(),
            events: s.clone(),
            bus: s.clone(),
            audit: s.clone(),
            logs: s.clone(),
            secrets: s.clone(),
            workers: s.clone(),
            providers: s.clone(),
            leases: s,
        }
    }
}

/// Settings of the control plane.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Engine settings (timeouts, retry, selection).
    pub engine: EngineConfig,
    /// Spec limits.
    pub limits: SpecLimits,
    /// gRPC URL workers connect to.
    pub server_url: String,
    /// Identity of this server (labels on workers it creates, the
    /// leftovers it may remove). Stable across restarts so that a restarted
    /// server finds its predecessor's workers; distinct for servers sharing
    /// a provider backend. Unlike `engine.replica_id` it may be shared by
    /// two processes over time (an old and a new one during a restart).
    pub server_id: String,
    /// How often workers heartbeat.
    pub heartbeat_interval: Duration,
    /// How often providers are health-checked.
    pub health_interval: Duration,
    /// How often orphaned workers are looked for.
    pub reconcile_interval: Duration,
    /// Delete events older than this (off when `None`).
    pub retention: Option<Duration>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            limits: SpecLimits::default(),
            server_url: "http://127.0.0.1:50051".into(),
            server_id: "hodei".into(),
            heartbeat_interval: Duration::from_secs(5),
            health_interval: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(60),
            retention: None,
        }
    }
}

/// A provider and how the engine manages it.
#[derive(Clone)]
pub struct ProviderSetup {
    /// Limits, pool, ephemeral.
    pub config: ProviderConfig,
    /// The adapter.
    pub provider: Arc<dyn WorkerProvider>,
}

impl std::fmt::Debug for ProviderSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderSetup")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What a worker says first on every session.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerHello {
    /// Its id.
    pub worker: WorkerId,
    /// One-time token (provisioning or resume).
    pub token: String,
    /// Its provider.
    pub provider: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Image it runs in.
    pub image: Option<String>,
    /// Concurrent jobs.
    pub capacity: u32,
    /// Attempts it runs now.
    pub running: Vec<(JobId, u32)>,
}

/// The answer to a successful hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// One-time token for the next reconnect.
    pub resume_token: String,
    /// How often to heartbeat.
    pub heartbeat_interval: Duration,
    /// Identifies this session; pass it to [`ControlPlane::worker_gone`].
    pub session: u64,
}

/// Messages from a worker after its hello.
#[derive(Debug, Clone, PartialEq)]
pub enum FromWorker {
    /// Alive.
    Heartbeat,
    /// Started the attempt.
    Ack {
        /// Job.
        job: JobId,
        /// Attempt.
        attempt: u32,
    },
    /// Will not run it.
    Refused {
        /// Job.
        job: JobId,
        /// Attempt.
        attempt: u32,
        /// Why, as far as the engine cares (a refusal for capacity or a
        /// drain gives the attempt back, see [`RefusalCode`]).
        code: RefusalCode,
        /// Why, in words.
        reason: String,
    },
    /// Output.
    Logs {
        /// Job.
        job: JobId,
        /// Attempt.
        attempt: u32,
        /// Lines, secrets masked.
        lines: Vec<NewLogLine>,
    },
    /// The attempt ended.
    Result {
        /// Job.
        job: JobId,
        /// Attempt.
        attempt: u32,
        /// How.
        report: AttemptReport,
    },
    /// It drains.
    Draining,
}

/// The answer to a submission.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The job: the new one, or the earlier one with the same
    /// idempotency key.
    pub job: Job,
    /// `true` when no job was created because an earlier submission with
    /// the same idempotency key had created `job`.
    pub replayed: bool,
}

/// Counters the control plane keeps (for metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Jobs accepted.
    pub jobs_submitted: AtomicU64,
    /// Jobs finished, by terminal state (index of [`JobState::ALL`]).
    pub jobs_finished: [AtomicU64; 8],
    /// Log lines stored.
    pub log_lines: AtomicU64,
    /// Log bytes stored.
    pub log_bytes: AtomicU64,
    /// Log lines lost before they were stored: the gaps in the agents'
    /// sequence numbers of an attempt (lines a dead connection took),
    /// plus the lines the server discarded for a reason other than
    /// duplication (an append that failed for good, a stopped log pipe).
    /// Agents are slowed down (backpressure) rather than their lines
    /// dropped, so 0 is expected.
    pub log_lines_dropped: AtomicU64,
    /// Sum of submit→RUNNING latencies in microseconds, and their count.
    pub start_latency_us_sum: AtomicU64,
    /// Number of observed starts.
    pub start_latency_count: AtomicU64,
}

impl Counters {
    /// Counts `job` in [`Counters::jobs_finished`] under its state: every
    /// terminal write this process stores (the driver's, a cancellation of
    /// a job no engine held, the sweep's) counts once.
    fn count_finished(&self, job: &Job) {
        if let Some(ix) = JobState::ALL.iter().position(|s| *s == job.state()) {
            self.jobs_finished[ix].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The control plane: a cloneable handle on the driver task.
#[derive(Clone)]
pub struct ControlPlane {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("server_id", &self.inner.config.server_id)
            .finish()
    }
}

struct Inner {
    config: RuntimeConfig,
    stores: Stores,
    tx: mpsc::UnboundedSender<Cmd>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    counters: Arc<Counters>,
    providers: Vec<ProviderSetup>,
    /// Log pipes by worker and job.
    log_pipes: Mutex<HashMap<(WorkerId, JobId), LogPipe>>,
    /// The newest log pipe of each job and when it is done (see
    /// [`LogPipe::start`]).
    log_tails: Arc<LogTails>,
    /// Gap detection in the agents' log sequence numbers.
    log_seqs: Arc<LogSeqs>,
    /// Who waits for an attempt to be decided in the store.
    decisions: Arc<Decisions>,
}

/// Callers waiting until an attempt's outcome is stored (the session that
/// acknowledges a result to its agent): fired by the driver right after
/// the store write that decides the attempt commits (the job moved to a
/// later attempt, ended, or lists the attempt as finished).
#[derive(Default)]
struct Decisions(Mutex<HashMap<JobId, Vec<DecisionWaiter>>>);

/// An attempt someone waits for, and how to tell them.
type DecisionWaiter = (u32, oneshot::Sender<()>);

/// Jobs with waiters in [`Decisions`] past which given-up waiters are
/// swept.
const MAX_DECISION_JOBS: usize = 4096;

impl Decisions {
    fn watch(&self, job: JobId, attempt: u32) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Waiters of jobs no write touched again (stale results whose
        // sessions gave up) are dropped once they pile up.
        if map.len() >= MAX_DECISION_JOBS {
            map.retain(|_, waiting| {
                waiting.retain(|(_, tx)| !tx.is_closed());
                !waiting.is_empty()
            });
        }
        let waiting = map.entry(job).or_default();
        // Drop waiters that gave up.
        waiting.retain(|(_, tx)| !tx.is_closed());
        waiting.push((attempt, tx));
        rx
    }

    /// `job` was just stored: fires the waiters whose attempt it decides.
    fn stored(&self, job: &Job) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(waiting) = map.get_mut(&job.id) else {
            return;
        };
        for (attempt, tx) in std::mem::take(waiting) {
            if attempt_decided(job, attempt) {
                let _ = tx.send(());
            } else if !tx.is_closed() {
                waiting.push((attempt, tx));
            }
        }
        if waiting.is_empty() {
            map.remove(&job.id);
        }
    }
}

/// Whether `job` (as stored) records the outcome of `attempt`.
pub fn attempt_decided(job: &Job, attempt: u32) -> bool {
    job.attempt > attempt || job.is_terminal() || job.attempts.iter().any(|a| a.number == attempt)
}

/// A wait for an attempt's outcome to be stored, from
/// [`ControlPlane::watch_decision`].
#[derive(Debug)]
pub struct DecisionWatch(oneshot::Receiver<()>);

impl DecisionWatch {
    /// Waits at most `patience` for the store write that decides the
    /// attempt; `true` once it committed. `false` when it did not happen
    /// here in time: the result was stale (the attempt was decided before,
    /// or by another replica), the write failed, or the store is slow; ask
    /// the store ([`attempt_decided`] on [`ControlPlane::job`]).
    pub async fn decided(self, patience: Duration) -> bool {
        matches!(tokio::time::timeout(patience, self.0).await, Ok(Ok(())))
    }
}

/// The highest agent sequence number seen per job, for its latest attempt
/// (lines of an earlier attempt are not tracked). A batch that starts
/// above that number + 1 means lines were lost on the way (a batch a dead
/// connection took before the agent reconnected): the gap is counted in
/// [`Counters::log_lines_dropped`]. The first batch of an attempt this
/// process sees sets the baseline: after a restart or a failover the
/// lines sent to the previous process are not a gap (so lines lost before
/// that first batch are not counted either). An entry goes when its
/// attempt's result arrives or the job finishes, so the map holds the
/// attempts in flight.
#[derive(Default)]
struct LogSeqs(Mutex<HashMap<JobId, (u32, u64)>>);

impl LogSeqs {
    /// Notes a batch of `attempt` of `job`; returns the lines missing
    /// before or between its lines. Duplicates (at or below the highest
    /// number seen) are not gaps.
    fn note(&self, job: JobId, attempt: u32, lines: &[NewLogLine]) -> u64 {
        if lines.is_empty() {
            return 0;
        }
        let baseline = (attempt, lines[0].agent_seq.saturating_sub(1));
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(job).or_insert(baseline);
        if entry.0 > attempt {
            return 0;
        }
        if entry.0 < attempt {
            *entry = baseline;
        }
        let mut missing = 0;
        for l in lines {
            if l.agent_seq > entry.1 {
                missing += l.agent_seq - entry.1 - 1;
                entry.1 = l.agent_seq;
            }
        }
        missing
    }

    /// The attempt ended (its result arrived).
    fn attempt_ended(&self, job: JobId, attempt: u32) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&job).is_some_and(|(a, _)| *a <= attempt) {
            map.remove(&job);
        }
    }

    /// The job is terminal.
    fn job_finished(&self, job: JobId) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&job);
    }
}

enum Cmd {
    Submit {
        spec: Box<JobSpec>,
        ctx: RequestContext,
        reply: oneshot::Sender<Result<Submitted, ApiError>>,
    },
    Cancel {
        job: JobId,
        ctx: RequestContext,
        reply: oneshot::Sender<Result<Job, ApiError>>,
    },
    Hello {
        hello: WorkerHello,
        adoptable: Vec<Job>,
        link: Arc<dyn WorkerLink>,
        reply: oneshot::Sender<Result<Welcome, ApiError>>,
    },
    Worker {
        worker: WorkerId,
        msg: FromWorker,
    },
    Gone {
        worker: WorkerId,
        session: u64,
        reason: String,
    },
    Drain {
        worker: WorkerId,
        ctx: RequestContext,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    Provisioned {
        worker: WorkerId,
        result: Result<(), String>,
    },
    Exited {
        worker: WorkerId,
        reason: String,
        oom_killed: bool,
    },
    QueueDepth(u64),
    Health {
        provider: ProviderId,
        healthy: bool,
        message: String,
    },
    Bus(Box<DomainEvent>),
    Sweep,
    Reconcile {
        provider: ProviderId,
        found: Vec<crate::ports::ProvisionedWorker>,
        /// This replica holds the orphan lease of its server id: it may
        /// remove leftovers.
        owner: bool,
        /// Leftover workers of servers that are gone, to remove (see
        /// [`Adopter`]).
        adopted: Vec<WorkerId>,
    },
    Workers {
        reply: oneshot::Sender<Vec<Worker>>,
    },
}

impl ControlPlane {
    /// Starts the control plane: registers providers, starts the driver
    /// and the background duties (health checks, exits, sweeps, orphan
    /// reconciliation, retention).
    ///
    /// Replicas sharing the stores run the deadline sweep
    /// ([`SWEEP_DUTY`]), the retention purge ([`RETENTION_DUTY`]) and the
    /// removal of a server id's leftover workers ([`orphan_duty`]) one at a
    /// time: each is gated on a lease ([`Leases`]) held by
    /// `config.engine.replica_id`, which must therefore be unique per
    /// process. A holder that dies stops renewing; another replica takes
    /// the duty over once the lease ends. [`ControlPlane::shutdown`]
    /// releases them at once.
    pub async fn start(
        config: RuntimeConfig,
        stores: Stores,
        providers: Vec<ProviderSetup>,
    ) -> Result<ControlPlane, ApiError> {
        register_providers(&stores, &providers).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let counters = Arc::new(Counters::default());
        // The bus follower starts here: nothing that commits from now on
        // is below it, even when transactions commit out of order.
        let start_seq = match stores.events.settled_sequence().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "event log not settled; following from its last event");
                stores.events.last_sequence().await?
            }
        };
        let engine = Engine::new(
            config.engine.clone(),
            providers.iter().map(|p| p.config.clone()).collect(),
            Box::new(OsEntropy),
        );
        let log_seqs = Arc::new(LogSeqs::default());
        let decisions = Arc::new(Decisions::default());
        let driver = Driver {
            decisions: decisions.clone(),
            engine,
            stores: stores.clone(),
            config: config.clone(),
            providers: providers
                .iter()
                .map(|p| (p.config.id.clone(), p.provider.clone()))
                .collect(),
            links: HashMap::new(),
            next_session: 1,
            tx: tx.clone(),
            last_now: now_utc(),
            counters: counters.clone(),
            submitted_at: HashMap::new(),
            submit_replies: HashMap::new(),
            log_seqs: log_seqs.clone(),
            after_drain: Vec::new(),
            provider_records: Vec::new(),
            own_queued: std::collections::HashSet::new(),
        };
        let inner = Arc::new(Inner {
            config,
            stores,
            tx,
            stop,
            tasks: Mutex::new(Vec::new()),
            counters,
            providers,
            log_pipes: Mutex::new(HashMap::new()),
            log_tails: Arc::new(LogTails::default()),
            log_seqs,
            decisions,
        });
        let cp = ControlPlane { inner };
        let mut tasks = vec![tokio::spawn(driver.run(rx, stop_rx.clone()))];
        tasks.extend(cp.spawn_duties(stop_rx, start_seq));
        *cp.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
        Ok(cp)
    }

    /// Stops the driver and every background duty. Workers are told to
    /// shut down only if they are ephemeral and idle; running attempts are
    /// left to the next start (they reconnect).
    pub async fn shutdown(&self) {
        self.inner.stop.send_replace(true);
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        self.release_duties().await;
    }

    /// Spec limits in force.
    pub fn limits(&self) -> &SpecLimits {
        &self.inner.config.limits
    }

    /// Settings.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Counters for metrics.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// The stores (for transports that read directly).
    pub fn stores(&self) -> &Stores {
        &self.inner.stores
    }

    /// Submits a job. Honours `idempotency_key`: a second submission with
    /// the same key returns the first job. See
    /// [`ControlPlane::submit_with_outcome`] to tell the two apart.
    pub async fn submit(&self, raw: RawJobSpec, ctx: &RequestContext) -> Result<Job, ApiError> {
        Ok(self.submit_with_outcome(raw, ctx).await?.job)
    }

    /// Submits a job and says whether it was created or an earlier job
    /// with the same `idempotency_key` was returned (`replayed`). The
    /// answer comes from the job store's atomic create
    /// ([`Created::New`] / [`Created::Existing`]), not from clocks, so it
    /// holds across replicas.
    pub async fn submit_with_outcome(
        &self,
        raw: RawJobSpec,
        ctx: &RequestContext,
    ) -> Result<Submitted, ApiError> {
        let spec = JobSpec::parse(raw, &self.inner.config.limits)?;
        self.call(|reply| Cmd::Submit {
            spec: Box::new(spec),
            ctx: ctx.clone(),
            reply,
        })
        .await?
    }

    /// One job.
    pub async fn job(&self, id: JobId) -> Result<Job, ApiError> {
        self.inner
            .stores
            .jobs
            .get(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))
    }

    /// Jobs, newest first.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<JobPage, ApiError> {
        Ok(self.inner.stores.jobs.list(filter).await?)
    }

    /// Cancels a job in any non-terminal state.
    pub async fn cancel(&self, id: JobId, ctx: &RequestContext) -> Result<Job, ApiError> {
        self.job(id).await?;
        self.call(|reply| Cmd::Cancel {
            job: id,
            ctx: ctx.clone(),
            reply,
        })
        .await?
    }

    /// Every event of a job, in order.
    pub async fn job_events(&self, id: JobId) -> Result<Vec<DomainEvent>, ApiError> {
        self.job(id).await?;
        Ok(self.inner.stores.events.job_events(id).await?)
    }

    /// Log lines with `seq > after`.
    pub async fn read_logs(
        &self,
        id: JobId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<LogLine>, ApiError> {
        self.job(id).await?;
        let limit = if limit == 0 { 1000 } else { limit.min(10_000) };
        Ok(self.inner.stores.logs.read(id, after, limit).await?)
    }

    /// History then live lines; ends when the job is terminal and its
    /// last line was delivered.
    pub fn follow_logs(
        &self,
        id: JobId,
        after: u64,
    ) -> BoxStream<'static, Result<LogLine, ApiError>> {
        self.inner
            .stores
            .logs
            .follow(id, after)
            .map(|r| r.map_err(ApiError::from))
            .boxed()
    }

    /// Every event with `sequence > after`, then live.
    pub fn watch_events(&self, after: u64) -> BoxStream<'static, Result<DomainEvent, ApiError>> {
        self.inner
            .stores
            .bus
            .subscribe(after)
            .map(|r| r.map_err(ApiError::from))
            .boxed()
    }

    /// Waits until the job is terminal and returns it.
    pub async fn wait_terminal(&self, id: JobId) -> Result<Job, ApiError> {
        let mut events = self.inner.stores.bus.subscribe(self.last_sequence().await?);
        loop {
            let job = self.job(id).await?;
            if job.is_terminal() {
                return Ok(job);
            }
            // Wait for the next event about this job (or any event, then
            // re-check: cheap and never misses a change).
            loop {
                match events.next().await {
                    Some(Ok(e)) if e.job_id() == Some(id) => break,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(ApiError::Unavailable("event bus closed".into())),
                }
            }
        }
    }

    async fn last_sequence(&self) -> Result<u64, ApiError> {
        // Re-checking the job after subscribing covers anything that
        // committed before; what commits later is above this.
        Ok(self.inner.stores.events.settled_sequence().await?)
    }

    /// Audit query.
    pub async fn audit(&self, filter: &AuditFilter) -> Result<AuditPage, ApiError> {
        if let (Some(s), Some(u)) = (filter.since, filter.until)
            && s > u
        {
            return Err(ApiError::InvalidArgument(
                "`since` is after `until`; accepted: since <= until".into(),
            ));
        }
        Ok(self.inner.stores.audit.query(filter).await?)
    }

    /// Workers known to this server, live state first, then records.
    pub async fn workers(&self) -> Result<Vec<Worker>, ApiError> {
        let live = self.call(|reply| Cmd::Workers { reply }).await?;
        let mut all: BTreeMap<WorkerId, Worker> = self
            .inner
            .stores
            .workers
            .list()
            .await?
            .into_iter()
            .map(|w| (w.id, w))
            .collect();
        for w in live {
            all.insert(w.id, w);
        }
        Ok(all.into_values().collect())
    }

    /// Asks a worker to drain.
    pub async fn drain_worker(&self, id: WorkerId, ctx: &RequestContext) -> Result<(), ApiError> {
        self.call(|reply| Cmd::Drain {
            worker: id,
            ctx: ctx.clone(),
            reply,
        })
        .await?
    }

    /// Configured providers with their health.
    pub async fn providers(&self) -> Result<Vec<ProviderRecord>, ApiError> {
        Ok(self.inner.stores.providers.list().await?)
    }

    /// Creates or replaces a secret.
    pub async fn set_secret(
        &self,
        name: &str,
        value: &str,
        ctx: &RequestContext,
    ) -> Result<(), ApiError> {
        check_secret_name(name)?;
        if value.is_empty() {
            return Err(ApiError::InvalidArgument(
                "secret value is empty; accepted: 1 byte to 64 KiB".into(),
            ));
        }
        if value.len() > 64 * 1024 {
            return Err(ApiError::InvalidArgument(format!(
                "secret value is {} bytes; accepted: 1 byte to 64 KiB",
                value.len()
            )));
        }
        self.inner
            .stores
            .secrets
            .put(name, value, now_utc())
            .await?;
        self.record_secret(name, None, "set", ctx).await
    }

    /// Secret names.
    pub async fn list_secrets(&self) -> Result<Vec<SecretMeta>, ApiError> {
        Ok(self.inner.stores.secrets.list().await?)
    }

    /// Deletes a secret.
    pub async fn delete_secret(&self, name: &str, ctx: &RequestContext) -> Result<(), ApiError> {
        check_secret_name(name)?;
        if !self.inner.stores.secrets.delete(name).await? {
            return Err(ApiError::NotFound(format!("secret {name:?} not found")));
        }
        self.record_secret(name, None, "delete", ctx).await
    }

    async fn record_secret(
        &self,
        name: &str,
        job: Option<JobId>,
        purpose: &str,
        ctx: &RequestContext,
    ) -> Result<(), ApiError> {
        let e = DomainEvent::new(
            EventId::from_uuid(Uuid::new_v4()),
            now_utc(),
            ctx.correlation_id.clone(),
            ctx.actor.clone(),
            EventBody::SecretAccessed {
                name: name.into(),
                job_id: job,
                purpose: purpose.into(),
            },
        );
        self.inner.stores.events.append(vec![e]).await?;
        Ok(())
    }

    /// Issues a one-time registration token for a worker started by hand.
    pub async fn issue_worker_token(
        &self,
        worker: WorkerId,
        ttl: Duration,
    ) -> Result<String, ApiError> {
        let token = new_token();
        self.inner
            .stores
            .workers
            .issue_token(worker, &token, add(now_utc(), ttl))
            .await?;
        Ok(token)
    }

    /// The stores answer and their schema is the one this build expects
    /// ([`JobQueue::ready`]).
    pub async fn ready(&self) -> Result<(), ApiError> {
        self.inner.stores.queue.ready().await?;
        Ok(())
    }

    /// Jobs waiting in the queue.
    pub async fn queue_depth(&self) -> Result<u64, ApiError> {
        Ok(self.inner.stores.queue.depth().await?)
    }

    /// A worker's first message on a session. Consumes its one-time token
    /// if it was issued for this worker id (a token of another id is left
    /// usable for its worker); a bad token is recorded as
    /// `WorkerRegistrationRejected`.
    pub async fn worker_hello(
        &self,
        hello: WorkerHello,
        link: Arc<dyn WorkerLink>,
    ) -> Result<Welcome, ApiError> {
        let stores = &self.inner.stores;
        let verdict = stores
            .workers
            .consume_token_for(hello.worker, &hello.token, now_utc())
            .await?;
        let reason = match verdict {
            Ok(w) if w == hello.worker => None,
            Ok(_) => Some("registration token was issued for another worker".to_owned()),
            Err(r) => Some(r.to_string()),
        };
        if let Some(reason) = reason {
            let e = DomainEvent::new(
                EventId::from_uuid(Uuid::new_v4()),
                now_utc(),
                CorrelationId::new(format!("worker-{}", hello.worker)),
                Actor::worker(hello.worker),
                EventBody::WorkerRegistrationRejected {
                    worker_id: Some(hello.worker),
                    reason: reason.clone(),
                },
            );
            stores.events.append(vec![e]).await?;
            return Err(ApiError::Unauthenticated(format!(
                "registration rejected: {reason}"
            )));
        }
        // What it runs, and what the store says it holds (a previous
        // server may have died before hearing of a result the worker
        // already sent): the engine takes over what it does not own yet.
        let mut ids: Vec<JobId> = hello.running.iter().map(|(j, _)| *j).collect();
        if let Some(record) = stores.workers.get(hello.worker).await? {
            for job in record.reserved_for.into_iter().chain(record.jobs) {
                if !ids.contains(&job) {
                    ids.push(job);
                }
            }
        }
        let mut adoptable = Vec::new();
        for job in ids {
            if let Some(j) = stores.jobs.get(job).await? {
                adoptable.push(j);
            }
        }
        self.call(|reply| Cmd::Hello {
            hello,
            adoptable,
            link,
            reply,
        })
        .await?
    }

    /// Starts waiting for attempt `attempt` of `job` to be decided in the
    /// store by this control plane. Call it before handing the attempt's
    /// result to [`ControlPlane::worker_message`]: the watch fires once
    /// the write that records the outcome has committed, so a caller can
    /// acknowledge the result to its agent without losing it to a crash
    /// in between (and without polling the store).
    pub fn watch_decision(&self, job: JobId, attempt: u32) -> DecisionWatch {
        DecisionWatch(self.inner.decisions.watch(job, attempt))
    }

    /// A message from a registered worker. Logs go to the job's log pipe
    /// (the hot path, see [`LogPipe`]); everything else goes to the
    /// engine, a result only once the lines sent before it are stored.
    pub async fn worker_message(&self, worker: WorkerId, msg: FromWorker) -> Result<(), ApiError> {
        if let FromWorker::Logs {
            job,
            attempt,
            lines,
        } = msg
        {
            let lost = self.inner.log_seqs.note(job, attempt, &lines);
            let dropped = &self.inner.counters.log_lines_dropped;
            if lost > 0 {
                tracing::warn!(%job, attempt, lost, "log lines missing (agent sequence gap)");
                dropped.fetch_add(lost, Ordering::Relaxed);
            }
            let key = (worker, job);
            let (tx, failed) = {
                let mut pipes = self
                    .inner
                    .log_pipes
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let pipe = pipes.entry(key).or_insert_with(|| {
                    LogPipe::start(
                        &self.inner.stores,
                        &self.inner.counters,
                        &self.inner.log_tails,
                        job,
                    )
                });
                (pipe.tx.clone(), pipe.failed.clone())
            };
            if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
                dropped.fetch_add(lines.len() as u64, Ordering::Relaxed);
                return Err(e);
            }
            // A sign of life for the engine (it revives a worker the
            // heartbeat timeout disconnected): one command per batch, the
            // lines themselves stay here.
            self.send(Cmd::Worker {
                worker,
                msg: FromWorker::Logs {
                    job,
                    attempt,
                    lines: Vec::new(),
                },
            })?;
            // Waits while the pipe is full: the worker's stream is held
            // back rather than lines dropped.
            return tx.send(LogMsg::Lines(attempt, lines)).await.map_err(
                |mpsc::error::SendError(m)| {
                    if let LogMsg::Lines(_, lines) = m {
                        dropped.fetch_add(lines.len() as u64, Ordering::Relaxed);
                    }
                    ApiError::Unavailable("the log pipe of the job stopped".into())
                },
            );
        }
        if let FromWorker::Result { job, attempt, .. } = &msg {
            self.flush_logs(worker, *job).await;
            self.inner.log_seqs.attempt_ended(*job, *attempt);
        }
        self.send(Cmd::Worker { worker, msg })
    }

    /// Waits until the lines this worker sent for `job` are stored, and
    /// closes the job's log pipe.
    async fn flush_logs(&self, worker: WorkerId, job: JobId) {
        let pipe = self
            .inner
            .log_pipes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(worker, job));
        if let Some(pipe) = pipe {
            let (done, stored) = oneshot::channel();
            if pipe.tx.send(LogMsg::Flush(done)).await.is_ok() {
                let _ = stored.await;
            }
        }
    }

    /// The worker's session ended.
    pub async fn worker_gone(&self, worker: WorkerId, session: u64, reason: &str) {
        // Its log pipes store what they hold, then stop.
        self.inner
            .log_pipes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(w, _), _| *w != worker);
        let _ = self.send(Cmd::Gone {
            worker,
            session,
            reason: reason.into(),
        });
    }

    /// The configured providers.
    pub fn provider_setups(&self) -> &[ProviderSetup] {
        &self.inner.providers
    }

    fn send(&self, cmd: Cmd) -> Result<(), ApiError> {
        self.inner
            .tx
            .send(cmd)
            .map_err(|_| ApiError::Unavailable("control plane is shutting down".into()))
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await
            .map_err(|_| ApiError::Unavailable("control plane is shutting down".into()))
    }

    fn spawn_duties(&self, stop: watch::Receiver<bool>, start_seq: u64) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        let cfg = &self.inner.config;
        let orphans = self.duty(
            &orphan_duty(&cfg.server_id),
            (cfg.reconcile_interval * 2).max(Duration::from_secs(10)),
        );
        for setup in &self.inner.providers {
            // Exits observed by the provider.
            let tx = self.inner.tx.clone();
            let mut exits = setup.provider.exits();
            let mut stop_rx = stop.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop_rx.changed() => return,
                        exit = exits.next() => match exit {
                            Some(x) => {
                                let _ = tx.send(Cmd::Exited {
                                    worker: x.worker,
                                    reason: x.reason,
                                    oom_killed: x.oom_killed,
                                });
                            }
                            None => return,
                        },
                    }
                }
            }));
            // Health checks.
            let tx = self.inner.tx.clone();
            let provider = setup.provider.clone();
            let every = cfg.health_interval;
            tasks.push(periodic(stop.clone(), every, Duration::ZERO, move || {
                let tx = tx.clone();
                let provider = provider.clone();
                async move {
                    let h = match tokio::time::timeout(Duration::from_secs(10), provider.health())
                        .await
                    {
                        Ok(h) => h,
                        Err(_) => crate::ports::ProviderHealth {
                            healthy: false,
                            message: "health check timed out after 10s".into(),
                        },
                    };
                    let _ = tx.send(Cmd::Health {
                        provider: provider.id().clone(),
                        healthy: h.healthy,
                        message: h.message,
                    });
                }
            }));
            // Orphans: first pass after the reconnect grace, so that workers
            // of a previous run can come back first. Removing leftovers of
            // this server id is a singleton duty: a process started with
            // the same server id while another still runs (a rolling
            // restart) must not take that one's workers for leftovers.
            let tx = self.inner.tx.clone();
            let provider = setup.provider.clone();
            let first = cfg.engine.reconnect_grace + Duration::from_secs(1);
            let duty = orphans.clone();
            let adopter = Adopter {
                server_id: cfg.server_id.clone(),
                holder: cfg.engine.replica_id.clone(),
                ttl: duty.ttl,
                stores: self.inner.stores.clone(),
            };
            tasks.push(periodic(
                stop.clone(),
                cfg.reconcile_interval,
                first,
                move || {
                    let tx = tx.clone();
                    let provider = provider.clone();
                    let duty = duty.clone();
                    let adopter = adopter.clone();
                    async move {
                        let owner = duty.hold().await;
                        if let Ok(Ok(list)) =
                            tokio::time::timeout(Duration::from_secs(30), provider.list()).await
                        {
                            let (adopted, leases) = adopter.adopt(&list).await;
                            let _ = tx.send(Cmd::Reconcile {
                                provider: provider.id().clone(),
                                found: list,
                                owner,
                                adopted,
                            });
                            adopter.release(leases).await;
                        }
                    }
                },
            ));
        }
        // Queue depth, for the autoscaler of reusable pools and warm pools.
        if self
            .inner
            .providers
            .iter()
            .any(|p| !p.config.ephemeral || p.config.warm_pool > 0)
        {
            let tx = self.inner.tx.clone();
            let queue = self.inner.stores.queue.clone();
            let every = cfg.engine.claim_interval.max(Duration::from_secs(1));
            tasks.push(periodic(stop.clone(), every, Duration::ZERO, move || {
                let tx = tx.clone();
                let queue = queue.clone();
                async move {
                    if let Ok(Ok(depth)) =
                        tokio::time::timeout(Duration::from_secs(10), queue.depth()).await
                    {
                        let _ = tx.send(Cmd::QueueDepth(depth));
                    }
                }
            }));
        }
        // The event bus: other replicas' submissions and decisions.
        let tx = self.inner.tx.clone();
        let bus = self.inner.stores.bus.clone();
        let mut stop_rx = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut after = start_seq;
            loop {
                let mut events = bus.subscribe(after);
                loop {
                    tokio::select! {
                        _ = stop_rx.changed() => return,
                        e = events.next() => match e {
                            Some(Ok(e)) => {
                                after = e.sequence;
                                if matches!(e.body, EventBody::JobQueued { .. } | EventBody::JobCancelled { .. }) {
                                    let _ = tx.send(Cmd::Bus(Box::new(e)));
                                }
                            }
                            Some(Err(_)) | None => break,
                        },
                    }
                }
                tokio::select! {
                    _ = stop_rx.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }));
        // Deadline sweep of jobs whose replica is gone: one replica at a
        // time.
        let tx = self.inner.tx.clone();
        let sweep = self.duty(SWEEP_DUTY, SWEEP_LEASE);
        tasks.push(periodic(
            stop.clone(),
            SWEEP_EVERY,
            SWEEP_EVERY,
            move || {
                let tx = tx.clone();
                let duty = sweep.clone();
                async move {
                    if duty.hold().await {
                        let _ = tx.send(Cmd::Sweep);
                    }
                }
            },
        ));
        // Retention: one replica at a time.
        if let Some(keep) = cfg.retention {
            let audit = self.inner.stores.audit.clone();
            let retention = self.duty(RETENTION_DUTY, RETENTION_LEASE);
            tasks.push(periodic(
                stop,
                RETENTION_EVERY,
                Duration::from_secs(60),
                move || {
                    let audit = audit.clone();
                    let duty = retention.clone();
                    async move {
                        if !duty.hold().await {
                            return;
                        }
                        let before = crate::time::add(now_utc(), Duration::ZERO)
                            - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX);
                        while let Ok(n) = audit.purge_before(before, 10_000).await {
                            if n < 10_000 {
                                break;
                            }
                        }
                    }
                },
            ));
        }
        tasks
    }

    fn duty(&self, name: &str, ttl: Duration) -> Arc<Duty> {
        Arc::new(Duty {
            name: name.to_owned(),
            holder: self.inner.config.engine.replica_id.clone(),
            ttl,
            leases: self.inner.stores.leases.clone(),
            held: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Gives up this replica's leases on singleton duties, so that another
    /// replica takes them over at once.
    async fn release_duties(&self) {
        let holder = &self.inner.config.engine.replica_id;
        let orphans = orphan_duty(&self.inner.config.server_id);
        for duty in [SWEEP_DUTY, RETENTION_DUTY, orphans.as_str()] {
            let release = self.inner.stores.leases.release(duty, holder);
            let _ = tokio::time::timeout(Duration::from_secs(2), release).await;
        }
    }
}

/// Batches a log pipe holds before the worker's stream waits.
const LOG_PIPE_DEPTH: usize = 16;
/// Most text one coalesced append carries.
const MAX_APPEND_BYTES: usize = 1024 * 1024;

enum LogMsg {
    Lines(u32, Vec<NewLogLine>),
    Flush(oneshot::Sender<()>),
}

/// The log lines of one job from one worker session, on their way to the
/// store: a bounded queue and a task that appends them in order. While an
/// append is in flight the next batches queue up; the task then stores the
/// queued batches of one attempt as one append (up to
/// [`MAX_APPEND_BYTES`] of text), so on a store with round trips the rate
/// no longer depends on the agent's batch size. A full queue holds the
/// worker's stream back. A result is handed to the engine only after a
/// flush (see [`ControlPlane::worker_message`]), so a job's log is
/// complete before it is finished.
struct LogPipe {
    tx: mpsc::Sender<LogMsg>,
    /// An append that failed for good, reported on the next batch.
    failed: Arc<Mutex<Option<ApiError>>>,
}

/// The newest log pipe of each job that is still storing: its number and
/// a future that resolves when it is done.
#[derive(Default)]
struct LogTails {
    next: AtomicU64,
    tails: Mutex<HashMap<JobId, (u64, PipeDone)>>,
}

/// Resolves when a log pipe has stored all it was given and stopped.
type PipeDone = futures::future::Shared<oneshot::Receiver<()>>;

impl LogPipe {
    /// Starts the pipe of `job` for one worker session. A job has one pipe
    /// at a time, but one that was let go (its session ended, or a result
    /// flushed it) may still be storing when the next one starts (the
    /// worker reconnected and sends again, or another attempt began): the
    /// new pipe waits for it before its first append, so a job's lines
    /// reach the store in the order they arrived, and a flush of the new
    /// pipe covers the old one's lines too.
    fn start(
        stores: &Stores,
        counters: &Arc<Counters>,
        tails: &Arc<LogTails>,
        job: JobId,
    ) -> LogPipe {
        let (tx, rx) = mpsc::channel(LOG_PIPE_DEPTH);
        let failed = Arc::new(Mutex::new(None));
        let id = tails.next.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel::<()>();
        let before = tails
            .tails
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job, (id, futures::FutureExt::shared(done_rx)))
            .map(|(_, done)| done);
        let (logs, counters, tails, f) = (
            stores.logs.clone(),
            counters.clone(),
            tails.clone(),
            failed.clone(),
        );
        tokio::spawn(async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            run_log_pipe(logs, counters, job, rx, f).await;
            let mut t = tails.tails.lock().unwrap_or_else(|e| e.into_inner());
            if t.get(&job).is_some_and(|(newest, _)| *newest == id) {
                t.remove(&job);
            }
            drop(t);
            let _ = done_tx.send(());
        });
        LogPipe { tx, failed }
    }
}

async fn run_log_pipe(
    logs: Arc<dyn LogStore>,
    counters: Arc<Counters>,
    job: JobId,
    mut rx: mpsc::Receiver<LogMsg>,
    failed: Arc<Mutex<Option<ApiError>>>,
) {
    while let Some(first) = rx.recv().await {
        let mut queued = vec![first];
        while queued.len() < LOG_PIPE_DEPTH {
            match rx.try_recv() {
                Ok(m) => queued.push(m),
                Err(_) => break,
            }
        }
        let mut batch: Option<(u32, Vec<NewLogLine>, usize)> = None;
        for m in queued {
            match m {
                LogMsg::Lines(attempt, lines) => {
                    let bytes: usize = lines.iter().map(|l| l.text.len()).sum();
                    if let Some((a, held, size)) = &mut batch
                        && *a == attempt
                        && *size + bytes <= MAX_APPEND_BYTES
                    {
                        held.extend(lines);
                        *size += bytes;
                        continue;
                    }
                    if let Some((a, held, _)) = batch.take() {
                        append_logs(&*logs, &counters, job, a, held, &failed).await;
                    }
                    batch = Some((attempt, lines, bytes));
                }
                LogMsg::Flush(done) => {
                    if let Some((a, held, _)) = batch.take() {
                        append_logs(&*logs, &counters, job, a, held, &failed).await;
                    }
                    let _ = done.send(());
                }
            }
        }
        if let Some((a, held, _)) = batch.take() {
            append_logs(&*logs, &counters, job, a, held, &failed).await;
        }
    }
}

/// Stores lines, retrying while the store is unavailable (the database
/// restarts) rather than dropping them: the agent resends what its stream
/// took only after a reconnect, not when a store is slow. Appends are
/// idempotent (lines are de-duplicated by attempt and agent sequence).
async fn append_logs(
    logs: &dyn LogStore,
    counters: &Counters,
    job: JobId,
    attempt: u32,
    lines: Vec<NewLogLine>,
    failed: &Mutex<Option<ApiError>>,
) {
    let n = lines.len() as u64;
    let bytes: u64 = lines.iter().map(|l| l.text.len() as u64).sum();
    let mut backoff = Duration::from_millis(50);
    let since = std::time::Instant::now();
    loop {
        match logs.append(job, attempt, lines.clone()).await {
            Ok(_) => break,
            Err(StoreError::Unavailable(m)) if since.elapsed() < LOG_APPEND_PATIENCE => {
                tracing::warn!(%job, error = %m, "log append failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::warn!(%job, error = %e, lines = n, "log append failed, lines dropped");
                counters.log_lines_dropped.fetch_add(n, Ordering::Relaxed);
                *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.into());
                return;
            }
        }
    }
    counters.log_lines.fetch_add(n, Ordering::Relaxed);
    counters.log_bytes.fetch_add(bytes, Ordering::Relaxed);
}

/// How long a log append is retried while the store is unavailable
/// before the worker's session is given up.
const LOG_APPEND_PATIENCE: Duration = Duration::from_secs(120);

/// Lease of the deadline sweep of jobs whose replica is gone.
pub const SWEEP_DUTY: &str = "sweep";
/// Lease of the retention purge.
pub const RETENTION_DUTY: &str = "retention";
/// How often the holder of [`SWEEP_DUTY`] sweeps (and renews it).
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Lease of [`SWEEP_DUTY`]: a dead holder's sweep moves within this.
const SWEEP_LEASE: Duration = Duration::from_secs(15);
/// How often the retention purge runs.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// Lease of [`RETENTION_DUTY`].
const RETENTION_LEASE: Duration = Duration::from_secs(2 * 3600);

/// Lease of the removal of leftover workers of a server id.
pub fn orphan_duty(server_id: &str) -> String {
    format!("orphans/{server_id}")
}

/// Takes over the orphan duty of servers that are gone: a provider lists
/// workers labelled with another server id whose orphan lease
/// ([`orphan_duty`]) nobody holds (that server has not renewed it for a
/// whole lease, so it is not running), and whose worker record is in this
/// deployment's registry (so the worker is ours, not another deployment's
/// sharing the engine). Such workers are adopted for removal; the lease is
/// taken for the turn and given back, so the server takes its duty back
/// as soon as it returns.
#[derive(Clone)]
struct Adopter {
    server_id: String,
    holder: String,
    ttl: Duration,
    stores: Stores,
}

impl Adopter {
    /// The workers to remove, and the leases taken for them.
    async fn adopt(
        &self,
        found: &[crate::ports::ProvisionedWorker],
    ) -> (Vec<WorkerId>, Vec<String>) {
        let mut servers: Vec<&str> = found
            .iter()
            .map(|pw| pw.server_id.as_str())
            .filter(|s| !s.is_empty() && *s != self.server_id)
            .collect();
        servers.sort_unstable();
        servers.dedup();
        let mut adopted = Vec::new();
        let mut leases = Vec::new();
        for server in servers {
            let duty = orphan_duty(server);
            let take = self
                .stores
                .leases
                .try_acquire(&duty, &self.holder, self.ttl, now_utc());
            if !matches!(
                tokio::time::timeout(Duration::from_secs(10), take).await,
                Ok(Ok(true))
            ) {
                continue;
            }
            leases.push(duty);
            for pw in found.iter().filter(|pw| pw.server_id == server) {
                if let Ok(Some(_)) = self.stores.workers.get(pw.worker).await {
                    tracing::info!(worker = %pw.worker, server, "adopting a leftover worker of a server that is gone");
                    adopted.push(pw.worker);
                }
            }
        }
        (adopted, leases)
    }

    async fn release(&self, leases: Vec<String>) {
        for duty in leases {
            let release = self.stores.leases.release(&duty, &self.holder);
            let _ = tokio::time::timeout(Duration::from_secs(2), release).await;
        }
    }
}

/// A singleton duty: held through a lease in the shared store.
struct Duty {
    name: String,
    holder: String,
    ttl: Duration,
    leases: Arc<dyn Leases>,
    held: std::sync::atomic::AtomicBool,
}

impl Duty {
    /// Takes or renews the lease; `false` when another replica holds it
    /// or the store cannot say (the duty is skipped this time).
    async fn hold(&self) -> bool {
        let attempt = self
            .leases
            .try_acquire(&self.name, &self.holder, self.ttl, now_utc());
        let held = match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => {
                tracing::warn!(duty = %self.name, error = %e, "cannot renew the lease of a duty");
                false
            }
            Err(_) => {
                tracing::warn!(duty = %self.name, "the lease of a duty timed out");
                false
            }
        };
        if self.held.swap(held, Ordering::Relaxed) != held {
            if held {
                tracing::info!(duty = %self.name, replica = %self.holder, "this replica now runs the duty");
            } else {
                tracing::info!(duty = %self.name, replica = %self.holder, "the duty is no longer run here");
            }
        }
        held
    }
}

fn periodic<F, Fut>(
    mut stop: watch::Receiver<bool>,
    every: Duration,
    first: Duration,
    mut f: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut wait = first;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            f().await;
            wait = every.max(Duration::from_millis(10));
        }
    })
}

async fn register_providers(stores: &Stores, providers: &[ProviderSetup]) -> Result<(), ApiError> {
    let known: HashMap<ProviderId, ProviderRecord> = stores
        .providers
        .list()
        .await?
        .into_iter()
        .map(|r| (r.id.clone(), r))
        .collect();
    for setup in providers {
        let config = serde_json::to_value(&setup.config).unwrap_or_default();
        let id = setup.config.id.clone();
        let body = match known.get(&id) {
            None => Some(EventBody::ProviderRegistered {
                provider: id.clone(),
                kind: setup.config.kind.clone(),
                config: config.clone(),
            }),
            Some(r) if r.config != config => Some(EventBody::ProviderUpdated {
                provider: id.clone(),
                config: config.clone(),
            }),
            Some(_) => None,
        };
        let record = ProviderRecord {
            id: id.clone(),
            kind: setup.config.kind.clone(),
            config,
            healthy: known.get(&id).is_none_or(|r| r.healthy),
            health_message: known
                .get(&id)
                .map(|r| r.health_message.clone())
                .unwrap_or_else(|| "not checked yet".into()),
            updated_at: now_utc(),
        };
        let events = body
            .map(|body| {
                DomainEvent::new(
                    EventId::from_uuid(Uuid::new_v4()),
                    now_utc(),
                    CorrelationId::new(format!("provider-{id}")),
                    Actor::system("config"),
                    body,
                )
            })
            .into_iter()
            .collect();
        stores.save_provider(&record, events).await?;
    }
    Ok(())
}

struct Driver {
    engine: Engine,
    stores: Stores,
    config: RuntimeConfig,
    providers: HashMap<ProviderId, Arc<dyn WorkerProvider>>,
    links: HashMap<WorkerId, (u64, Arc<dyn WorkerLink>)>,
    next_session: u64,
    tx: mpsc::UnboundedSender<Cmd>,
    last_now: Timestamp,
    counters: Arc<Counters>,
    submitted_at: HashMap<JobId, Timestamp>,
    /// Submissions waiting for their job's creation to be stored.
    submit_replies: HashMap<JobId, oneshot::Sender<Result<Submitted, ApiError>>>,
    /// Shared with [`ControlPlane::worker_message`]; entries of finished
    /// jobs are removed here.
    log_seqs: Arc<LogSeqs>,
    /// Answers sent once the effects of the inputs that decided them are
    /// carried out (stored).
    after_drain: Vec<Box<dyn FnOnce() + Send>>,
    /// Provider records whose health changed: saved with their
    /// `ProviderHealthChanged` events as one unit before the pass that
    /// would store those events, where the store can
    /// ([`Driver::save_provider_changes`]); else once the passes are done,
    /// after the events (a crash in between leaves an event the next check
    /// repeats, never a record without its event).
    provider_records: Vec<ProviderRecord>,
    /// `JobQueued` events this driver stored: their echo from the bus is
    /// no news (the engine claims after its own submissions and requeues).
    own_queued: std::collections::HashSet<EventId>,
    /// Shared with [`ControlPlane::watch_decision`]: fired after each job
    /// write.
    decisions: Arc<Decisions>,
}

/// Most inputs taken from the command channel before their effects are
/// carried out together.
const MAX_INPUTS_PER_PASS: usize = 256;
/// Bound of [`Driver::own_queued`] (echoes that never came back, e.g. of
/// updates that failed, are forgotten past it).
const MAX_OWN_QUEUED: usize = 100_000;

impl Driver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>, mut stop: watch::Receiver<bool>) {
        let now = self.now();
        self.engine.handle_tick(now);
        self.drain().await;
        loop {
            let sleep = match self.engine.next_deadline() {
                Some(d) => {
                    let now = self.now();
                    (d - now).to_std().unwrap_or(Duration::ZERO)
                }
                None => Duration::from_secs(3600),
            };
            let mut timer = false;
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                _ = tokio::time::sleep(sleep) => timer = true,
            }
            // Inputs that queued up meanwhile join this pass: their
            // effects are carried out together (see `drain`).
            for _ in 1..MAX_INPUTS_PER_PASS {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd).await,
                    Err(_) => break,
                }
            }
            // Deadlines are checked after the inputs that were waiting, so
            // an acknowledgement or a result that queued up while the
            // driver was held up (a slow store) counts before the deadline
            // it met; and in every pass, so a steady stream of inputs
            // cannot starve them.
            let now = self.now();
            if timer || self.engine.next_deadline().is_some_and(|d| d <= now) {
                self.engine.handle_tick(now);
            }
            self.drain().await;
        }
        // Tell ephemeral idle workers to go; running ones reconnect later.
        for (_, link) in self.links.values() {
            let _ =
                tokio::time::timeout(Duration::from_millis(200), link.send(ToWorker::Drain)).await;
        }
    }

    fn now(&mut self) -> Timestamp {
        let now = now_utc();
        if now > self.last_now {
            self.last_now = now;
        }
        self.last_now
    }

    async fn handle(&mut self, cmd: Cmd) {
        let now = self.now();
        match cmd {
            Cmd::Submit { spec, ctx, reply } => {
                match self.engine.handle_submit(now, *spec, &ctx) {
                    Ok(id) => {
                        self.submitted_at.insert(id, now);
                        self.counters.jobs_submitted.fetch_add(1, Ordering::Relaxed);
                        // Answered once the creation is stored.
                        self.submit_replies.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Cmd::Cancel { job, ctx, reply } => match self.engine.handle_cancel(now, job, &ctx) {
                // Answered once the cancellation is stored.
                Ok(j) => self.after_drain.push(Box::new(move || {
                    let _ = reply.send(Ok(j));
                })),
                Err(EngineError::UnknownJob(_)) => {
                    let _ = reply.send(self.cancel_in_store(now, job, &ctx).await);
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            Cmd::Hello {
                hello,
                adoptable,
                link,
                reply,
            } => {
                let reg = Registration {
                    worker: hello.worker,
                    provider: ProviderId::new(hello.provider.clone()),
                    labels: hello.labels.clone(),
                    image: hello.image.clone(),
                    capacity: hello.capacity,
                    running: hello.running.clone(),
                };
                let result = match self.engine.handle_registered(now, reg, adoptable) {
                    Ok(()) => {
                        let session = self.next_session;
                        self.next_session += 1;
                        self.links.insert(hello.worker, (session, link));
                        let token = new_token();
                        match self
                            .stores
                            .workers
                            .issue_token(
                                hello.worker,
                                &token,
                                add(now, Duration::from_secs(30 * 86400)),
                            )
                            .await
                        {
                            Ok(()) => Ok(Welcome {
                                resume_token: token,
                                heartbeat_interval: self.config.heartbeat_interval,
                                session,
                            }),
                            Err(e) => Err(e.into()),
                        }
                    }
                    Err(e) => Err(ApiError::Unauthenticated(format!(
                        "registration rejected: {e}"
                    ))),
                };
                let _ = reply.send(result);
            }
            Cmd::Worker { worker, msg } => {
                let r = match msg {
                    FromWorker::Heartbeat => {
                        self.engine.handle_heartbeat(now, worker);
                        Ok(())
                    }
                    FromWorker::Ack { job, attempt } => {
                        let r = self.engine.handle_ack(now, worker, job, attempt);
                        if r.is_ok()
                            && let Some(t) = self.submitted_at.remove(&job)
                        {
                            let us = (now - t).num_microseconds().unwrap_or(0).max(0) as u64;
                            self.counters
                                .start_latency_us_sum
                                .fetch_add(us, Ordering::Relaxed);
                            self.counters
                                .start_latency_count
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        r
                    }
                    FromWorker::Refused {
                        job,
                        attempt,
                        code,
                        reason,
                    } => self
                        .engine
                        .handle_refusal(now, worker, job, attempt, code, &reason),
                    FromWorker::Result {
                        job,
                        attempt,
                        report,
                    } => self.engine.handle_result(now, worker, job, attempt, report),
                    FromWorker::Draining => self.engine.handle_draining(now, worker, None),
                    FromWorker::Logs { job, attempt, .. } => {
                        self.engine.handle_log_batch(now, worker, job, attempt);
                        Ok(())
                    }
                };
                if let Err(e) = r {
                    tracing::debug!(%worker, error = %e, "worker report ignored");
                }
            }
            Cmd::Gone {
                worker,
                session,
                reason,
            } => {
                if self.links.get(&worker).is_some_and(|(s, _)| *s == session) {
                    self.links.remove(&worker);
                    self.engine.handle_disconnected(now, worker, &reason);
                }
            }
            Cmd::Drain { worker, ctx, reply } => {
                let result = self
                    .engine
                    .handle_draining(now, worker, Some(&ctx))
                    .map_err(ApiError::from);
                self.after_drain.push(Box::new(move || {
                    let _ = reply.send(result);
                }));
            }
            Cmd::Provisioned { worker, result } => match result {
                Ok(()) => self.engine.handle_provisioned(now, worker),
                Err(reason) => self.engine.handle_provision_failed(now, worker, &reason),
            },
            Cmd::Exited {
                worker,
                reason,
                oom_killed,
            } => {
                self.links.remove(&worker);
                self.engine
                    .handle_worker_exit(now, worker, &reason, oom_killed);
            }
            Cmd::QueueDepth(depth) => self.engine.handle_queue_depth(now, depth),
            Cmd::Health {
                provider,
                healthy,
                message,
            } => {
                self.engine
                    .handle_provider_health(now, &provider, healthy, &message);
                let records = self.stores.providers.list().await.unwrap_or_default();
                if let Some(mut r) = records.into_iter().find(|r| r.id == provider)
                    && (r.healthy != healthy || r.health_message != message)
                {
                    r.healthy = healthy;
                    r.health_message = message;
                    r.updated_at = now;
                    self.provider_records.push(r);
                }
            }
            Cmd::Bus(e) => match e.body {
                // The echo of our own JobQueued is no news.
                EventBody::JobQueued { .. } if self.own_queued.remove(&e.event_id) => {}
                EventBody::JobQueued { .. } => self.engine.handle_queue_hint(),
                EventBody::JobCancelled { job_id, .. } => {
                    if self.engine.job(job_id).is_some()
                        && let Ok(Some(current)) = self.stores.jobs.get(job_id).await
                    {
                        self.engine.handle_job_changed(now, current);
                    }
                }
                _ => {}
            },
            Cmd::Sweep => self.sweep(now).await,
            Cmd::Reconcile {
                provider,
                found,
                owner,
                adopted,
            } => {
                for pw in found {
                    let worker = pw.worker;
                    if self.engine.worker(worker).is_some() {
                        if !pw.alive {
                            // Its container/process ended and the exit was
                            // missed: recover its jobs by policy.
                            self.links.remove(&worker);
                            self.engine.handle_worker_exited(
                                now,
                                worker,
                                "found dead by reconciliation",
                            );
                        }
                        continue;
                    }
                    // Only this server's leftovers (other servers sharing the
                    // backend own theirs), and only by the holder of its
                    // orphan lease; or those of a server that is gone,
                    // adopted (see `Adopter`).
                    let ours = owner && pw.server_id == self.config.server_id;
                    if (ours || adopted.contains(&worker))
                        && !self.links.contains_key(&worker)
                        && let Some(p) = self.providers.get(&provider).cloned()
                    {
                        tracing::info!(%worker, %provider, "removing orphaned worker");
                        tokio::spawn(async move {
                            let _ = p.destroy(worker).await;
                        });
                    }
                }
            }
            Cmd::Workers { reply } => {
                let _ = reply.send(self.engine.workers().cloned().collect());
            }
        }
    }

    /// Carries out every effect the engine has, pass after pass, until it
    /// has none left; then sends the answers that waited for them.
    ///
    /// A pass takes every effect polled so far and runs them concurrently,
    /// except that an effect waits for the earlier effects of the pass
    /// that share a lane with it ([`Lane`]: its job, its worker), and a
    /// claim waits for every earlier effect that can put a job in the queue
    /// (a creation, a job back to `PENDING`, a released claim), so that it
    /// sees the jobs just created or requeued, but not for the others (a
    /// job's ending, an assignment, a worker's record): a worker's next job
    /// is claimed while its last one's result is being stored. A claim
    /// racing an update that takes a job out of the queue is harmless: the
    /// row is locked or no longer `PENDING` for the claim, or the engine
    /// already holds the job (and skips it), or its stale copy conflicts on
    /// the version when placed. So the store calls of different jobs overlap,
    /// while each job's changes are stored, and dispatched, in the order the
    /// engine decided them, each change with its events in one unit (the
    /// store's `update`). What the engine must hear back (a claim's jobs, a
    /// conflict, a failed provisioning or dispatch) is fed to it after the
    /// pass, in effect order, and the next pass carries out what it
    /// decided then.
    async fn drain(&mut self) {
        loop {
            let mut effects = Vec::new();
            while let Some(effect) = self.engine.poll_effect() {
                effects.push(effect);
            }
            if effects.is_empty() {
                break;
            }
            self.save_provider_changes(&mut effects).await;
            let follow_ups = self.run_pass(effects).await;
            let now = self.now();
            for f in follow_ups.into_iter().flatten() {
                self.follow_up(now, f);
            }
        }
        for r in std::mem::take(&mut self.provider_records) {
            if let Err(e) = self.stores.providers.upsert(&r).await {
                tracing::warn!(provider = %r.id, error = %e, "provider record not saved");
            }
        }
        for (id, reply) in self.submit_replies.drain() {
            let _ = reply.send(Err(ApiError::Internal(format!("job {id} was not created"))));
        }
        for answer in std::mem::take(&mut self.after_drain) {
            answer();
        }
    }

    /// Stores the records in [`Driver::provider_records`] whose
    /// `ProviderHealthChanged` events are among `effects` together with
    /// those events, as one unit, before the pass (so the change keeps its
    /// place before what the engine decided after it), where the store
    /// can. Elsewhere the events stay in the pass and the records are
    /// saved after it (see [`Driver::drain`]).
    async fn save_provider_changes(&mut self, effects: &mut [Effect]) {
        if self.provider_records.is_empty() || !self.stores.provider_saves_record_events() {
            return;
        }
        let mut taken: HashMap<ProviderId, Vec<DomainEvent>> = HashMap::new();
        for effect in effects.iter_mut() {
            let Effect::Record(events) = effect else {
                continue;
            };
            let (take, keep): (Vec<_>, Vec<_>) =
                std::mem::take(events).into_iter().partition(|e| {
                    matches!(&e.body, EventBody::ProviderHealthChanged { provider, .. }
                        if self.provider_records.iter().any(|r| r.id == *provider))
                });
            *events = keep;
            for e in take {
                if let EventBody::ProviderHealthChanged { provider, .. } = &e.body {
                    taken.entry(provider.clone()).or_default().push(e);
                }
            }
        }
        if taken.is_empty() {
            return;
        }
        let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.provider_records)
            .into_iter()
            .partition(|r| taken.contains_key(&r.id));
        self.provider_records = later;
        for r in now {
            let events = taken.remove(&r.id).unwrap_or_default();
            if let Err(e) = self.stores.save_provider(&r, events).await {
                tracing::warn!(provider = %r.id, error = %e, "provider record not saved");
            }
        }
    }

    /// Runs one pass (see [`Driver::drain`]); returns the follow-ups, in
    /// effect order.
    async fn run_pass(&mut self, mut effects: Vec<Effect>) -> Vec<Vec<FollowUp>> {
        let now = self.now();
        // A worker record saved twice in a pass: the last one is enough.
        let mut last_save: HashMap<WorkerId, usize> = HashMap::new();
        for (i, e) in effects.iter().enumerate() {
            if let Effect::SaveWorker(w) = e {
                last_save.insert(w.id, i);
            }
        }
        // A worker's events recorded before its last save in the pass ride
        // with that save: the record and its events are one unit (where
        // the store can).
        let mut worker_events: HashMap<WorkerId, Vec<DomainEvent>> = HashMap::new();
        if self.stores.worker_saves_record_events() {
            for (i, e) in effects.iter_mut().enumerate() {
                let Effect::Record(events) = e else { continue };
                let (ride, keep): (Vec<_>, Vec<_>) =
                    std::mem::take(events).into_iter().partition(|ev| {
                        matches!(record_lane(ev), Lane::Worker(w)
                            if last_save.get(&w).is_some_and(|at| *at > i))
                    });
                *events = keep;
                for ev in ride {
                    if let Lane::Worker(w) = record_lane(&ev) {
                        worker_events.entry(w).or_default().push(ev);
                    }
                }
            }
        }
        // The other events recorded without a job change (workers,
        // providers) in a pass: stored together, in order, where the last
        // is.
        let last_record = effects
            .iter()
            .rposition(|e| matches!(e, Effect::Record(events) if !events.is_empty()));
        let attach_saves = self.stores.update_saves_workers();
        let mut recorded: Vec<DomainEvent> = Vec::new();
        let mut record_lanes: Vec<Lane> = Vec::new();
        let mut ops: Vec<(Op, Vec<usize>)> = Vec::with_capacity(effects.len());
        let mut last: HashMap<Lane, usize> = HashMap::new();
        for (i, effect) in effects.into_iter().enumerate() {
            // Changes of one job decided in a row (an ack and the result of
            // a short job): one store update, from the first's base version
            // to the last's job, with all their events in order.
            let (op, lanes) = match effect {
                Effect::UpdateJob {
                    job,
                    expected_version,
                    events,
                } => match last.get(&Lane::Job(job.id)).map(|at| &mut ops[*at].0) {
                    Some(Op::Update {
                        job: prev,
                        events: prev_events,
                        ..
                    }) if prev.version == expected_version => {
                        self.note_queued(&events);
                        **prev = job;
                        prev_events.extend(events);
                        continue;
                    }
                    _ => self.prepare(
                        i,
                        Effect::UpdateJob {
                            job,
                            expected_version,
                            events,
                        },
                        &last_save,
                    ),
                },
                Effect::Record(events) if events.is_empty() => continue,
                Effect::Record(events) => {
                    for lane in events.iter().map(record_lane) {
                        if !record_lanes.contains(&lane) {
                            record_lanes.push(lane);
                        }
                    }
                    recorded.extend(events);
                    if last_record != Some(i) {
                        continue;
                    }
                    (
                        Op::Record(std::mem::take(&mut recorded)),
                        std::mem::take(&mut record_lanes),
                    )
                }
                // The last save of a worker right after a job update (an
                // assignment, a result) rides along with that update: one
                // statement instead of two, when the store can.
                Effect::SaveWorker(worker)
                    if last_save.get(&worker.id) == Some(&i)
                        && worker_events.contains_key(&worker.id) =>
                {
                    let id = worker.id;
                    let events = worker_events.remove(&id).unwrap_or_default();
                    (
                        Op::SaveWorker(Box::new(worker), events),
                        vec![Lane::Worker(id)],
                    )
                }
                Effect::SaveWorker(worker)
                    if attach_saves && last_save.get(&worker.id) == Some(&i) =>
                {
                    let lane = Lane::Worker(worker.id);
                    let before = last.get(&lane).copied();
                    let at = ops.len().checked_sub(1);
                    if let Some(k) = at
                        && before.is_none_or(|p| p < k)
                        && let (Op::Update { workers, .. }, deps) = &mut ops[k]
                    {
                        workers.push(worker);
                        if let Some(p) = before
                            && !deps.contains(&p)
                        {
                            deps.push(p);
                        }
                        last.insert(lane, k);
                        continue;
                    }
                    self.prepare(i, Effect::SaveWorker(worker), &last_save)
                }
                other => self.prepare(i, other, &last_save),
            };
            let deps: Vec<usize> = if matches!(op, Op::Claim { .. }) {
                last.values()
                    .copied()
                    .filter(|&k| ops[k].0.may_make_claimable())
                    .collect()
            } else {
                lanes.iter().filter_map(|l| last.get(l).copied()).collect()
            };
            let at = ops.len();
            for lane in lanes {
                last.insert(lane, at);
            }
            ops.push((op, deps));
        }
        if self.stores.jobs.batches_updates() {
            batch_updates(&mut ops);
        }
        if self.stores.jobs.batches_creates() {
            batch_creates(&mut ops);
        }
        if self.stores.worker_saves_record_events() {
            batch_worker_saves(&mut ops);
        }
        let ctx = Arc::new(PassCtx {
            stores: self.stores.clone(),
            replica: self.config.engine.replica_id.clone(),
            server_url: self.config.server_url.clone(),
            server_id: self.config.server_id.clone(),
            provision_timeout: self.config.engine.provision_timeout,
            tx: self.tx.clone(),
            counters: self.counters.clone(),
            decisions: self.decisions.clone(),
            conflicted: Mutex::new(std::collections::HashSet::new()),
        });
        let mut done: Vec<futures::future::Shared<oneshot::Receiver<()>>> =
            Vec::with_capacity(ops.len());
        let mut futures = Vec::with_capacity(ops.len());
        for (op, deps) in ops {
            let (tx, rx) = oneshot::channel::<()>();
            let waits: Vec<_> = deps.iter().map(|d| done[*d].clone()).collect();
            done.push(futures::FutureExt::shared(rx));
            let ctx = ctx.clone();
            futures.push(async move {
                for w in waits {
                    let _ = w.await;
                }
                let (out, finish) = op.run(&ctx, now).await;
                // Later effects of its lanes may start now; the log's end
                // mark needs no place in the order.
                let _ = tx.send(());
                for job in finish {
                    ctx.stores.finish_log(job).await;
                }
                out
            });
        }
        futures::future::join_all(futures).await
    }

    /// Turns an effect into an operation of a pass, with its lanes. Reads
    /// and updates what only the driver holds (links, pending replies).
    fn prepare(
        &mut self,
        index: usize,
        effect: Effect,
        last_save: &HashMap<WorkerId, usize>,
    ) -> (Op, Vec<Lane>) {
        match effect {
            Effect::CreateJob { job, events } => {
                self.note_queued(&events);
                let reply = self.submit_replies.remove(&job.id);
                let lanes = vec![Lane::Job(job.id)];
                (
                    Op::Create {
                        job: Box::new(job),
                        events,
                        reply,
                    },
                    lanes,
                )
            }
            Effect::UpdateJob {
                job,
                expected_version,
                events,
            } => {
                self.note_queued(&events);
                let lanes = vec![Lane::Job(job.id)];
                (
                    Op::Update {
                        job: Box::new(job),
                        expected_version,
                        events,
                        workers: Vec::new(),
                    },
                    lanes,
                )
            }
            Effect::Record(events) => {
                let lanes = events.iter().map(record_lane).collect();
                (Op::Record(events), lanes)
            }
            Effect::SaveWorker(worker) => {
                if last_save.get(&worker.id).is_some_and(|l| *l != index) {
                    return (Op::Nothing, vec![]);
                }
                let lanes = vec![Lane::Worker(worker.id)];
                (Op::SaveWorker(Box::new(worker), Vec::new()), lanes)
            }
            Effect::Claim { limit, lease } => (Op::Claim { limit, lease }, vec![]),
            Effect::Release(job) => (Op::Release(job), vec![Lane::Job(job)]),
            Effect::Provision { provider, launch } => {
                let lanes = vec![Lane::Worker(launch.worker)];
                let provider = self.providers.get(&provider).cloned().ok_or(provider);
                (Op::Provision { provider, launch }, lanes)
            }
            Effect::Dispatch { worker, job } => {
                let lanes = vec![Lane::Job(job.id), Lane::Worker(worker)];
                if !self.engine.holds(worker, job.id, job.attempt) {
                    return (Op::Nothing, lanes);
                }
                let link = self.links.get(&worker).map(|(_, l)| l.clone());
                (Op::Dispatch { worker, job, link }, lanes)
            }
            Effect::CancelOnWorker {
                worker,
                job,
                attempt,
                reason,
            } => {
                let lanes = vec![Lane::Job(job), Lane::Worker(worker)];
                let link = self.links.get(&worker).map(|(_, l)| l.clone());
                let msg = ToWorker::Cancel {
                    job,
                    attempt,
                    reason,
                };
                (Op::Send(link, msg), lanes)
            }
            Effect::DrainWorker(worker) => {
                let link = self.links.get(&worker).map(|(_, l)| l.clone());
                (Op::Send(link, ToWorker::Drain), vec![Lane::Worker(worker)])
            }
            Effect::DestroyWorker { provider, worker } => {
                let link = self.links.remove(&worker).map(|(_, l)| l);
                let provider = self.providers.get(&provider).cloned();
                (
                    Op::Destroy {
                        worker,
                        link,
                        provider,
                    },
                    vec![Lane::Worker(worker)],
                )
            }
        }
    }

    fn note_queued(&mut self, events: &[DomainEvent]) {
        if self.own_queued.len() >= MAX_OWN_QUEUED {
            self.own_queued.clear();
        }
        for e in events {
            if matches!(e.body, EventBody::JobQueued { .. }) {
                self.own_queued.insert(e.event_id);
            }
        }
    }

    /// Feeds the engine what a pass found out.
    fn follow_up(&mut self, now: Timestamp, f: FollowUp) {
        match f {
            FollowUp::Claimed { claim, limit } => self.engine.handle_claimed(now, claim, limit),
            FollowUp::JobChanged(job) => self.engine.handle_job_changed(now, *job),
            FollowUp::Finished(job) => {
                self.submitted_at.remove(&job);
                self.log_seqs.job_finished(job);
            }
            FollowUp::ProvisionFailed { worker, reason } => {
                self.engine.handle_provision_failed(now, worker, &reason);
            }
            FollowUp::Refused {
                worker,
                job,
                attempt,
                reason,
            } => {
                // Not the worker's word: never a code that gives the
                // attempt back.
                let _ = self.engine.handle_refusal(
                    now,
                    worker,
                    job,
                    attempt,
                    RefusalCode::Unspecified,
                    &reason,
                );
            }
            FollowUp::DispatchFailed {
                worker,
                job,
                attempt,
                failure,
            } => {
                // The attempt never reached the worker: no acknowledgement
                // is made up, it fails before it starts.
                if let Err(e) = self
                    .engine
                    .handle_dispatch_failed(now, worker, job, attempt, failure)
                {
                    tracing::debug!(%worker, %job, error = %e, "dispatch failure ignored");
                }
            }
        }
    }

    /// Cancels a job no engine here owns: pure transition, conditional
    /// store update (the store arbitrates with other replicas).
    async fn cancel_in_store(
        &mut self,
        now: Timestamp,
        id: JobId,
        ctx: &RequestContext,
    ) -> Result<Job, ApiError> {
        for _ in 0..5 {
            let mut job = self
                .stores
                .jobs
                .get(id)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))?;
            if job.is_terminal() {
                return Err(ApiError::FailedPrecondition(format!(
                    "job {id} is already {}; only PENDING, SCHEDULED, ASSIGNED or RUNNING jobs can be cancelled",
                    job.state()
                )));
            }
            let expected = job.version;
            let ctxt = TransitionContext {
                now,
                retry: &self.config.engine.retry,
                unit_random: fastrand::f64(),
            };
            let bodies = job
                .apply(
                    JobCommand::Cancel {
                        reason: format!("cancelled by {}", ctx.actor),
                    },
                    ctxt,
                )
                .map_err(|e| ApiError::FailedPrecondition(e.to_string()))?;
            let events = wrap(now, &ctx.correlation_id, &ctx.actor, bodies);
            match self.stores.jobs.update(&job, expected, events).await {
                Ok(_) => {
                    self.decisions.stored(&job);
                    self.counters.count_finished(&job);
                    self.stores.finish_log(id).await;
                    return Ok(job);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ApiError::Unavailable(format!(
            "job {id} kept changing while cancelling; retry"
        )))
    }

    /// Decides overdue jobs that no engine here owns (their replica died).
    async fn sweep(&mut self, now: Timestamp) {
        let grace =
            chrono::Duration::from_std(crate::engine::SWEEP_GRACE).unwrap_or(chrono::Duration::MAX);
        let Ok(overdue) = self.stores.queue.overdue(now - grace, 500).await else {
            return;
        };
        for mut job in overdue {
            if self.engine.job(job.id).is_some() {
                continue;
            }
            let Some(command) = crate::engine::sweep_decision(&job, now) else {
                continue;
            };
            let expected = job.version;
            let ctxt = TransitionContext {
                now,
                retry: &self.config.engine.retry,
                unit_random: fastrand::f64(),
            };
            if let Ok(bodies) = job.apply(command, ctxt) {
                let corr = job.correlation_id.clone();
                let events = wrap(now, &corr, &Actor::system("sweeper"), bodies);
                if self
                    .stores
                    .jobs
                    .update(&job, expected, events)
                    .await
                    .is_ok()
                {
                    self.decisions.stored(&job);
                    if job.is_terminal() {
                        self.counters.count_finished(&job);
                        self.stores.finish_log(job.id).await;
                    }
                }
            }
        }
    }
}

/// What orders an effect behind the earlier effects of a pass (see
/// [`Driver::drain`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Lane {
    /// Changes of a job, its claim, its dispatch and cancellation.
    Job(JobId),
    /// A worker's record, events, provisioning and messages.
    Worker(WorkerId),
    /// Events of another aggregate (a provider, a secret).
    Other(String),
}

/// The lane of an event recorded without a job change.
fn record_lane(e: &DomainEvent) -> Lane {
    match (e.aggregate_type, e.aggregate_id.parse::<Uuid>()) {
        (crate::event::AggregateKind::Worker, Ok(id)) => Lane::Worker(WorkerId::from_uuid(id)),
        _ => Lane::Other(e.aggregate_id.clone()),
    }
}

/// What the operations of one pass share.
struct PassCtx {
    stores: Stores,
    replica: String,
    server_url: String,
    server_id: String,
    provision_timeout: Duration,
    tx: mpsc::UnboundedSender<Cmd>,
    counters: Arc<Counters>,
    decisions: Arc<Decisions>,
    /// Jobs whose update conflicted in this pass: their later effects of
    /// the pass are skipped (their base version is lost; the engine hears
    /// of the stored job after the pass and decides again).
    conflicted: Mutex<std::collections::HashSet<JobId>>,
}

impl PassCtx {
    fn conflicted(&self, job: JobId) -> bool {
        self.conflicted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&job)
    }

    fn mark_conflicted(&self, job: JobId) {
        self.conflicted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job);
    }
}

/// An effect, ready to run in a pass.
enum Op {
    Nothing,
    Create {
        job: Box<Job>,
        events: Vec<DomainEvent>,
        reply: Option<oneshot::Sender<Result<Submitted, ApiError>>>,
    },
    Update {
        job: Box<Job>,
        expected_version: u64,
        events: Vec<DomainEvent>,
        /// Worker records saved in the same unit (see
        /// [`Stores::update_saves_workers`]), whatever the update's fate.
        workers: Vec<Worker>,
    },
    /// Updates of several jobs in one store call (see [`batch_updates`]).
    UpdateMany(Vec<JobUpdate>),
    /// Creations of several jobs in one store call (see [`batch_creates`]),
    /// each with the submission waiting for it.
    CreateMany(Vec<(NewJob, Option<SubmitReply>)>),
    Record(Vec<DomainEvent>),
    /// A worker record, with the events of its change (stored as one unit,
    /// see [`Stores::worker_saves_record_events`]) or none.
    SaveWorker(Box<Worker>, Vec<DomainEvent>),
    /// Several worker records with their events, in one store call (see
    /// [`batch_worker_saves`]).
    SaveWorkers(Vec<(Worker, Vec<DomainEvent>)>),
    Claim {
        limit: usize,
        lease: Duration,
    },
    Release(JobId),
    Provision {
        provider: Result<Arc<dyn WorkerProvider>, ProviderId>,
        launch: LaunchRequest,
    },
    Dispatch {
        worker: WorkerId,
        job: Box<Job>,
        link: Option<Arc<dyn WorkerLink>>,
    },
    Send(Option<Arc<dyn WorkerLink>>, ToWorker),
    Destroy {
        worker: WorkerId,
        link: Option<Arc<dyn WorkerLink>>,
        provider: Option<Arc<dyn WorkerProvider>>,
    },
}

/// Where the submission waiting for a job's creation is answered.
type SubmitReply = oneshot::Sender<Result<Submitted, ApiError>>;

/// What the engine must hear after a pass.
enum FollowUp {
    Claimed {
        claim: Option<crate::ports::Claim>,
        limit: usize,
    },
    JobChanged(Box<Job>),
    Finished(JobId),
    ProvisionFailed {
        worker: WorkerId,
        reason: String,
    },
    Refused {
        worker: WorkerId,
        job: JobId,
        attempt: u32,
        reason: String,
    },
    DispatchFailed {
        worker: WorkerId,
        job: JobId,
        attempt: u32,
        failure: Failure,
    },
}

impl Op {
    /// Whether, once stored, this can put a job in the queue (a creation,
    /// a job back to `PENDING`, a released claim): what a claim of the
    /// same pass waits for.
    fn may_make_claimable(&self) -> bool {
        match self {
            Op::Nothing
            | Op::Record(_)
            | Op::SaveWorker(..)
            | Op::SaveWorkers(_)
            | Op::Claim { .. }
            | Op::Provision { .. }
            | Op::Dispatch { .. }
            | Op::Send(..)
            | Op::Destroy { .. } => false,
            Op::Update { job, .. } => job.state() == JobState::Pending,
            Op::UpdateMany(updates) => updates.iter().any(|u| u.job.state() == JobState::Pending),
            Op::Create { .. } | Op::CreateMany(_) | Op::Release(_) => true,
        }
    }

    /// Carries the operation out. Also returns the jobs whose logs are to
    /// be marked finished (after the operation's lanes are released).
    async fn run(self, ctx: &PassCtx, now: Timestamp) -> (Vec<FollowUp>, Vec<JobId>) {
        match self {
            Op::UpdateMany(updates) => update_many(ctx, updates).await,
            Op::CreateMany(creates) => {
                create_many(ctx, creates).await;
                (Vec::new(), Vec::new())
            }
            other => {
                let (follow_up, finish) = other.run_one(ctx, now).await;
                (
                    follow_up.into_iter().collect(),
                    finish.into_iter().collect(),
                )
            }
        }
    }

    /// [`Op::run`] of the operations that concern one job at most.
    async fn run_one(self, ctx: &PassCtx, now: Timestamp) -> (Option<FollowUp>, Option<JobId>) {
        match self {
            Op::Nothing | Op::UpdateMany(_) | Op::CreateMany(_) => (None, None),
            Op::SaveWorkers(entries) => {
                let r = retry_store(&ctx.stores, |s| {
                    let entries = entries.clone();
                    async move { s.workers.upsert_many_recording(entries).await }
                })
                .await;
                if let Err(e) = r {
                    tracing::error!(workers = entries.len(), error = %e, "worker records and their events not stored");
                }
                (None, None)
            }
            Op::Create { job, events, reply } => {
                let r = retry_store(&ctx.stores, |s| {
                    let (job, events) = (job.clone(), events.clone());
                    async move { create_job(&s, &job, events).await }
                })
                .await;
                reply_created(*job, r, reply);
                (None, None)
            }
            Op::Update {
                job,
                expected_version,
                events,
                workers,
            } => {
                if ctx.conflicted(job.id) {
                    for worker in &workers {
                        save_worker(ctx, worker).await;
                    }
                    return (None, None);
                }
                let r = retry_store(&ctx.stores, |s| {
                    let (job, events) = (job.clone(), events.clone());
                    let workers = workers.clone();
                    async move {
                        if workers.is_empty() {
                            s.jobs.update(&job, expected_version, events).await
                        } else {
                            s.jobs
                                .update_saving_workers(&job, expected_version, events, &workers)
                                .await
                        }
                    }
                })
                .await;
                after_update(ctx, &job, r, !workers.is_empty()).await
            }
            Op::Record(events) => {
                let r = retry_store(&ctx.stores, |s| {
                    let events = events.clone();
                    async move { s.events.append(events).await }
                })
                .await;
                if let Err(e) = r {
                    tracing::error!(error = %e, "events not recorded");
                }
                (None, None)
            }
            Op::SaveWorker(worker, events) if events.is_empty() => {
                save_worker(ctx, &worker).await;
                (None, None)
            }
            Op::SaveWorker(worker, events) => {
                let r = retry_store(&ctx.stores, |s| {
                    let (worker, events) = (worker.clone(), events.clone());
                    async move { s.workers.upsert_recording(&worker, events).await }
                })
                .await;
                if let Err(e) = r {
                    tracing::error!(worker = %worker.id, error = %e, "worker record and its events not stored");
                }
                (None, None)
            }
            Op::Claim { limit, lease } => {
                let claim = ctx
                    .stores
                    .queue
                    .claim(&ctx.replica, now, limit, lease)
                    .await;
                if let Err(e) = &claim {
                    tracing::warn!(error = %e, "claim failed");
                }
                let claim = claim.ok();
                (Some(FollowUp::Claimed { claim, limit }), None)
            }
            Op::Release(job) => {
                let _ = ctx.stores.queue.release(job, &ctx.replica).await;
                (None, None)
            }
            Op::Provision { provider, launch } => {
                (provision(ctx, now, provider, launch).await, None)
            }
            Op::Dispatch { worker, job, link } => {
                if ctx.conflicted(job.id) {
                    return (None, None);
                }
                (dispatch(ctx, now, worker, *job, link).await, None)
            }
            Op::Send(link, msg) => {
                if let Some(link) = link {
                    let _ = link.send(msg).await;
                }
                (None, None)
            }
            Op::Destroy {
                worker,
                link,
                provider,
            } => {
                if let Some(link) = link {
                    let _ = link.send(ToWorker::Shutdown).await;
                }
                if let Some(p) = provider {
                    tokio::spawn(async move {
                        if let Err(e) = p.destroy(worker).await {
                            tracing::warn!(%worker, error = %e, "destroying worker failed");
                        }
                    });
                }
                (None, None)
            }
        }
    }
}

/// What follows the store's answer to a job update: the decision watchers
/// hear of it, a terminal job is counted (and its log is to be finished),
/// a conflict marks the job and reads what is stored instead.
async fn after_update(
    ctx: &PassCtx,
    job: &Job,
    r: Result<Vec<DomainEvent>, StoreError>,
    with_workers: bool,
) -> (Option<FollowUp>, Option<JobId>) {
    if let Err(e) = &r
        && !matches!(e, StoreError::Conflict { .. })
        && with_workers
    {
        tracing::error!(job = %job.id, error = %e, "worker records saved with a job update lost");
    }
    if r.is_ok() {
        ctx.decisions.stored(job);
    }
    match r {
        Ok(_) if job.is_terminal() => {
            ctx.counters.count_finished(job);
            (Some(FollowUp::Finished(job.id)), Some(job.id))
        }
        Ok(_) => (None, None),
        Err(StoreError::Conflict { .. }) => {
            ctx.mark_conflicted(job.id);
            match ctx.stores.jobs.get(job.id).await {
                Ok(Some(current)) => (Some(FollowUp::JobChanged(Box::new(current))), None),
                _ => (None, None),
            }
        }
        Err(e) => {
            tracing::error!(job = %job.id, error = %e, "job update lost");
            (None, None)
        }
    }
}

/// [`Op::UpdateMany`]: one store call for the updates, retried as a whole
/// while the store is unavailable, then each answer as [`Op::Update`]'s.
async fn update_many(ctx: &PassCtx, updates: Vec<JobUpdate>) -> (Vec<FollowUp>, Vec<JobId>) {
    let r = retry_store(&ctx.stores, |s| {
        let updates = updates.clone();
        async move { s.jobs.update_many(updates).await }
    })
    .await;
    let answers = match r {
        Ok(answers) if answers.len() == updates.len() => answers,
        Ok(answers) => {
            let e = format!(
                "the store answered {} of {} updates",
                answers.len(),
                updates.len()
            );
            updates
                .iter()
                .map(|_| Err(StoreError::Other(e.clone())))
                .collect()
        }
        Err(e) => updates.iter().map(|_| Err(e.clone())).collect(),
    };
    let mut follow_ups = Vec::new();
    let mut finish = Vec::new();
    for (u, answer) in updates.iter().zip(answers) {
        let (f, j) = after_update(ctx, &u.job, answer, !u.workers.is_empty()).await;
        follow_ups.extend(f);
        finish.extend(j);
    }
    (follow_ups, finish)
}

/// Gathers the job updates of a pass that wait for no earlier operation
/// into one [`Op::UpdateMany`] at the place of the first: one store call
/// (one statement, one transaction on PostgreSQL) instead of one each.
/// They name different jobs (a job's later update waits for its earlier
/// one), and each is still decided on its own. Operations that waited for
/// any of them wait for the batch.
fn batch_updates(ops: &mut [(Op, Vec<usize>)]) {
    batch_roots(
        ops,
        |op| matches!(op, Op::Update { .. }),
        |members| {
            Op::UpdateMany(
                members
                    .into_iter()
                    .filter_map(|op| match op {
                        Op::Update {
                            job,
                            expected_version,
                            events,
                            workers,
                        } => Some(JobUpdate {
                            job: *job,
                            expected_version,
                            events,
                            workers,
                        }),
                        _ => None,
                    })
                    .collect(),
            )
        },
    );
}

/// [`batch_updates`] for the creations of a pass (new jobs wait for
/// nothing): one [`JobStore::create_many`] call.
fn batch_creates(ops: &mut [(Op, Vec<usize>)]) {
    batch_roots(
        ops,
        |op| matches!(op, Op::Create { .. }),
        |members| {
            Op::CreateMany(
                members
                    .into_iter()
                    .filter_map(|op| match op {
                        Op::Create { job, events, reply } => {
                            Some((NewJob { job: *job, events }, reply))
                        }
                        _ => None,
                    })
                    .collect(),
            )
        },
    );
}

/// [`batch_updates`] for the worker records saved with their events in a
/// pass: one [`WorkerRegistry::upsert_many_recording`] call.
fn batch_worker_saves(ops: &mut [(Op, Vec<usize>)]) {
    batch_roots(
        ops,
        |op| matches!(op, Op::SaveWorker(_, events) if !events.is_empty()),
        |members| {
            Op::SaveWorkers(
                members
                    .into_iter()
                    .filter_map(|op| match op {
                        Op::SaveWorker(worker, events) => Some((*worker, events)),
                        _ => None,
                    })
                    .collect(),
            )
        },
    );
}

/// Replaces the operations that wait for nothing and match `member` (two
/// or more) by `batch(members)` at the place of the first; the operations
/// that waited for any of them wait for the batch.
fn batch_roots(
    ops: &mut [(Op, Vec<usize>)],
    member: impl Fn(&Op) -> bool,
    batch: impl FnOnce(Vec<Op>) -> Op,
) {
    let roots: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, (op, deps))| deps.is_empty() && member(op))
        .map(|(i, _)| i)
        .collect();
    let Some(&first) = roots.first() else {
        return;
    };
    if roots.len() < 2 {
        return;
    }
    let members = roots
        .iter()
        .map(|&i| std::mem::replace(&mut ops[i].0, Op::Nothing))
        .collect();
    ops[first].0 = batch(members);
    for (_, deps) in ops.iter_mut() {
        let mut changed = false;
        for d in deps.iter_mut() {
            if *d != first && roots.binary_search(d).is_ok() {
                *d = first;
                changed = true;
            }
        }
        if changed {
            deps.sort_unstable();
            deps.dedup();
        }
    }
}

/// Answers the submission waiting for a job's creation.
fn reply_created(job: Job, r: Result<Created, StoreError>, reply: Option<SubmitReply>) {
    if let Some(reply) = reply {
        let _ = reply.send(match r {
            Ok(Created::New(_)) => Ok(Submitted {
                job,
                replayed: false,
            }),
            Ok(Created::Existing(existing)) => Ok(Submitted {
                job: *existing,
                replayed: true,
            }),
            Err(e) => Err(ApiError::from(e)),
        });
    }
}

/// [`Op::CreateMany`]: one store call, retried as a whole while the store
/// is unavailable; each answer as [`Op::Create`]'s (a job found already
/// stored by id was created by an earlier try whose answer was lost).
async fn create_many(ctx: &PassCtx, creates: Vec<(NewJob, Option<SubmitReply>)>) {
    let (jobs, replies): (Vec<NewJob>, Vec<_>) = creates.into_iter().unzip();
    let r = retry_store(&ctx.stores, |s| {
        let jobs = jobs.clone();
        async move { s.jobs.create_many(jobs).await }
    })
    .await;
    let answers: Vec<Result<Created, StoreError>> = match r {
        Ok(answers) if answers.len() == jobs.len() => answers,
        Ok(answers) => {
            let e = format!(
                "the store answered {} of {} creations",
                answers.len(),
                jobs.len()
            );
            jobs.iter()
                .map(|_| Err(StoreError::Other(e.clone())))
                .collect()
        }
        Err(e) => jobs.iter().map(|_| Err(e.clone())).collect(),
    };
    for ((new, reply), answer) in jobs.into_iter().zip(replies).zip(answers) {
        let answer = match answer {
            Err(StoreError::AlreadyExists(m)) => match ctx.stores.jobs.get(new.job.id).await {
                Ok(Some(_)) => Ok(Created::New(Vec::new())),
                _ => Err(StoreError::AlreadyExists(m)),
            },
            other => other,
        };
        reply_created(new.job, answer, reply);
    }
}

/// Saves a worker record; like job writes, retried while the store is
/// unavailable.
async fn save_worker(ctx: &PassCtx, worker: &Worker) {
    let r = retry_store(&ctx.stores, |s| {
        let worker = worker.clone();
        async move { s.workers.upsert(&worker).await }
    })
    .await;
    if let Err(e) = r {
        tracing::error!(worker = %worker.id, error = %e, "worker record not saved");
    }
}

async fn provision(
    ctx: &PassCtx,
    now: Timestamp,
    provider: Result<Arc<dyn WorkerProvider>, ProviderId>,
    launch: LaunchRequest,
) -> Option<FollowUp> {
    let worker = launch.worker;
    let p = match provider {
        Ok(p) => p,
        Err(id) => {
            return Some(FollowUp::ProvisionFailed {
                worker,
                reason: format!("provider {id} is not configured"),
            });
        }
    };
    let token = new_token();
    let expires = add(now, ctx.provision_timeout);
    if let Err(e) = ctx
        .stores
        .workers
        .issue_token(worker, &token, expires)
        .await
    {
        return Some(FollowUp::ProvisionFailed {
            worker,
            reason: format!("could not issue a token: {e}"),
        });
    }
    let launch = WorkerLaunch {
        worker,
        token,
        server_url: ctx.server_url.clone(),
        image: launch.image,
        resources: launch.resources,
        labels: launch.labels,
        job: launch.job,
        server_id: ctx.server_id.clone(),
        capacity: launch.capacity.max(1),
    };
    let tx = ctx.tx.clone();
    let timeout = ctx.provision_timeout;
    tokio::spawn(async move {
        let result = match tokio::time::timeout(timeout, p.create(launch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "provider did not create the worker within {timeout:?}"
            )),
        };
        let _ = tx.send(Cmd::Provisioned { worker, result });
    });
    None
}

async fn dispatch(
    ctx: &PassCtx,
    now: Timestamp,
    worker: WorkerId,
    job: Job,
    link: Option<Arc<dyn WorkerLink>>,
) -> Option<FollowUp> {
    let mut secrets = BTreeMap::new();
    let (id, attempt) = (job.id, job.attempt);
    // Nothing is faked: an attempt whose secrets cannot be delivered (or
    // their delivery recorded) fails before it starts, without an
    // acknowledgement. A store error is transient (a `DispatchFailed`,
    // retried by policy after the store was retried for a while); a
    // secret that no longer exists is permanent.
    let failed = |failure: Failure| {
        Some(FollowUp::DispatchFailed {
            worker,
            job: id,
            attempt,
            failure,
        })
    };
    for name in job.spec.secrets() {
        let read = retry_store_for(&ctx.stores, DISPATCH_STORE_PATIENCE, |s| async move {
            s.secrets.get(name).await
        })
        .await;
        let value = match read {
            Ok(Some(v)) => v,
            Ok(None) => {
                return failed(Failure::new(
                    FailureKind::Validation,
                    format!(
                        "secret {name:?} does not exist (deleted since the job was submitted?); \
                         set it and submit the job again"
                    ),
                ));
            }
            Err(e) => {
                tracing::warn!(job = %id, secret = %name, error = %e, "secret read failed");
                return failed(Failure::new(
                    FailureKind::DispatchFailed,
                    format!("secret {name:?} could not be read: {e}"),
                ));
            }
        };
        // The audit record of the delivery comes first: no secret leaves
        // without it.
        let e = DomainEvent::new(
            EventId::from_uuid(Uuid::new_v4()),
            now,
            job.correlation_id.clone(),
            Actor::system("dispatcher"),
            EventBody::SecretAccessed {
                name: name.clone(),
                job_id: Some(job.id),
                purpose: format!("delivered to attempt {} on worker {worker}", job.attempt),
            },
        );
        let recorded = retry_store_for(&ctx.stores, DISPATCH_STORE_PATIENCE, |s| {
            let e = e.clone();
            async move { s.events.append(vec![e]).await }
        })
        .await;
        if let Err(e) = recorded {
            tracing::warn!(job = %id, secret = %name, error = %e, "secret access not recorded");
            return failed(Failure::new(
                FailureKind::DispatchFailed,
                format!("the delivery of secret {name:?} could not be recorded: {e}"),
            ));
        }
        secrets.insert(name.clone(), value);
    }
    let sent = match link {
        Some(link) => link
            .send(ToWorker::Run(Box::new(RunJob { job, secrets })))
            .await
            .map_err(|e| format!("link closed: {e}")),
        None => Err("worker is not connected".to_owned()),
    };
    sent.err().map(|reason| FollowUp::Refused {
        worker,
        job: id,
        attempt,
        reason,
    })
}

/// How long a dispatch retries a store call (reading a secret, recording
/// its delivery) that finds the store unavailable before the attempt
/// fails as `DispatchFailed` (retried by policy).
const DISPATCH_STORE_PATIENCE: Duration = Duration::from_secs(5);

/// Retries a store call while the store is unavailable, for at most
/// `patience`; then returns the last error.
async fn retry_store_for<T, F, Fut>(
    stores: &Stores,
    patience: Duration,
    mut f: F,
) -> Result<T, StoreError>
where
    F: FnMut(Stores) -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut backoff = Duration::from_millis(50);
    let since = std::time::Instant::now();
    loop {
        match f(stores.clone()).await {
            Err(StoreError::Unavailable(m)) if since.elapsed() < patience => {
                tracing::warn!(error = %m, "store unavailable, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// Retries a store call while the store is unavailable (e.g. the
/// database restarts): a decision is never silently dropped.
async fn retry_store<T, F, Fut>(stores: &Stores, mut f: F) -> Result<T, StoreError>
where
    F: FnMut(Stores) -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        match f(stores.clone()).await {
            Err(StoreError::Unavailable(m)) => {
                tracing::warn!(error = %m, "store unavailable, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Stores a new job. A retry after a create whose commit happened but
/// whose answer was lost (the database went away) finds the job already
/// there: that is this create's own, done (job ids are random v4 UUIDs).
async fn create_job(
    s: &Stores,
    job: &Job,
    events: Vec<DomainEvent>,
) -> Result<Created, StoreError> {
    match s.jobs.create(job, events).await {
        Err(StoreError::AlreadyExists(m)) => match s.jobs.get(job.id).await? {
            Some(_) => Ok(Created::New(Vec::new())),
            None => Err(StoreError::AlreadyExists(m)),
        },
        other => other,
    }
}

fn wrap(
    now: Timestamp,
    corr: &CorrelationId,
    actor: &Actor,
    bodies: Vec<EventBody>,
) -> Vec<DomainEvent> {
    bodies
        .into_iter()
        .map(|b| {
            DomainEvent::new(
                EventId::from_uuid(Uuid::new_v4()),
                now,
                corr.clone(),
                actor.clone(),
                b,
            )
        })
        .collect()
}

fn check_secret_name(name: &str) -> Result<(), ApiError> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 256;
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "secret name {name:?} is invalid; accepted: [A-Za-z_][A-Za-z0-9_]*, at most 256 chars"
        )))
    }
}

/// The current time. The only clock read of the control plane.
pub fn now_utc() -> Timestamp {
    Timestamp::from(SystemTime::now())
}

/// A new random token (two v4 UUIDs, hex).
pub fn new_token() -> String {
    format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple())
}

/// A new correlation id, for requests that carry none.
pub fn new_correlation_id() -> CorrelationId {
    CorrelationId::new(Uuid::new_v4().to_string())
}

/// Ids from v4 UUIDs and randomness from fastrand.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn uuid(&mut self) -> Uuid {
        Uuid::new_v4()
    }

    fn unit(&mut self) -> f64 {
        fastrand::f64()
    }
}
