//! Shared harness of the hodei-grpc benchmarks (`benches/*.rs`): an
//! embedded server, probes on the store ports that timestamp the moments
//! the benchmarks measure, throwaway PostgreSQL databases, and tables of
//! figures.
//!
//! Every benchmark runs its full measurement under `cargo bench` (which
//! passes `--bench`) and a short smoke pass under `cargo test
//! --all-targets`. Benchmarks print figures; they never assert timings.

#![allow(dead_code)]

/// The allocator `hodei-server` uses, so that the embedded server measured
/// here allocates as the binary does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use hodei_core::event::{DomainEvent, EventBody};
use hodei_core::ids::{Actor, CorrelationId, JobId, WorkerId};
use hodei_core::job::{Job, JobState};
use hodei_core::ports::{
    Claim, CreateAnswers, Created, EventLog, JobFilter, JobPage, JobQueue, JobStore, JobUpdate,
    LogLine, LogStore, NewJob, NewLogLine, RequestContext, StoreError, TokenRejection,
    UpdateAnswers, WorkerRegistry,
};
use hodei_core::runtime::{ControlPlane, Stores};
use hodei_core::spec::RawJobSpec;
use hodei_core::time::Timestamp;
use hodei_core::worker::Worker;
use hodei_core::worker::WorkerState;
use hodei_grpc::config::{ProviderSettings, ServerConfig, StoreBackend};
use hodei_grpc::proto;
use hodei_grpc::server::{self, Listeners, RunningServer};
use tokio::sync::watch;

/// `--bench` was given (cargo bench): full sizes. Without it (`cargo test
/// --all-targets` runs bench targets too), a quick smoke pass.
pub fn full() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// A size from the environment variable `var`, else `full` under
/// `cargo bench`, else `smoke`.
pub fn size(var: &str, full_size: usize, smoke: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(if full() { full_size } else { smoke })
}

/// The runtime every benchmark runs in: one worker thread per core.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Runs `f` in a fresh runtime; prints the error and exits 1 on failure.
pub fn main_with<F: std::future::Future<Output = Result<()>>>(f: F) {
    let rt = runtime();
    if let Err(e) = rt.block_on(f) {
        eprintln!("benchmark failed: {e:#}");
        std::process::exit(1);
    }
    // Agents of in-process providers may still be winding down.
    rt.shutdown_timeout(Duration::from_secs(2));
}

/// The `hodei-worker` binary: `HODEI_BENCH_WORKER_BIN`, else the one cargo
/// built for this profile (`target/release/hodei-worker` under `cargo
/// bench`, `target/debug/hodei-worker` under `cargo test`).
pub fn worker_bin() -> PathBuf {
    std::env::var_os("HODEI_BENCH_WORKER_BIN")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_hodei-worker")))
}

/// The workspace root (for `scripts/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("hodei-grpc lives in the workspace")
        .to_path_buf()
}

/// Prints what the figures were measured on.
pub fn print_header(bench: &str) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    println!("== {bench} ==");
    println!(
        "machine: {cpu}, {cores} cores (shared with other work), Linux {kernel}; {} UTC; {}",
        hodei_core::runtime::now_utc().format("%Y-%m-%d %H:%M"),
        if full() {
            "full run"
        } else {
            "smoke run (no --bench)"
        }
    );
    if listener_nodelay() {
        println!("experiment: TCP_NODELAY set on the server's listening socket");
    }
}

// ----- figures ----------------------------------------------------------------

/// Percentiles of a set of durations.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

/// Nearest-rank percentiles; `None` when empty.
pub fn summarize(samples: &[Duration]) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort();
    let rank = |p: f64| {
        let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[i - 1]
    };
    let total: Duration = v.iter().sum();
    Some(Summary {
        n: v.len(),
        p50: rank(0.50),
        p90: rank(0.90),
        p99: rank(0.99),
        max: v[v.len() - 1],
        mean: total / v.len() as u32,
    })
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// Prints one table of latencies, in milliseconds.
pub fn print_latencies(title: &str, rows: &[(String, Vec<Duration>)]) {
    println!();
    println!("{title}");
    let width = rows
        .iter()
        .map(|(n, _)| n.len())
        .max()
        .unwrap_or(10)
        .max(10);
    println!(
        "  {:<width$}  {:>6}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}",
        "ms", "n", "p50", "p90", "p99", "max", "mean"
    );
    for (name, samples) in rows {
        match summarize(samples) {
            Some(s) => println!(
                "  {name:<width$}  {:>6}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}",
                s.n,
                ms(s.p50),
                ms(s.p90),
                ms(s.p99),
                ms(s.max),
                ms(s.mean)
            ),
            None => println!("  {name:<width$}  {:>6}  (no samples)", 0),
        }
    }
}

// ----- jobs -------------------------------------------------------------------

/// A request context for the control plane's API.
pub fn ctx() -> RequestContext {
    RequestContext {
        correlation_id: CorrelationId::new(format!("bench-{}", uuid::Uuid::new_v4().simple())),
        actor: Actor::new("bench"),
    }
}

/// A spec running `argv`.
pub fn command(argv: &[&str]) -> RawJobSpec {
    RawJobSpec {
        command: Some(argv.iter().map(|s| (*s).to_owned()).collect()),
        ..RawJobSpec::default()
    }
}

/// The same as a proto spec.
pub fn proto_command(argv: &[&str]) -> proto::JobSpec {
    proto::JobSpec {
        command: argv.iter().map(|s| (*s).to_owned()).collect(),
        ..proto::JobSpec::default()
    }
}

/// A JobService client on a fresh connection.
pub async fn job_client(
    addr: std::net::SocketAddr,
) -> Result<proto::job_service_client::JobServiceClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connecting to the server")?;
    Ok(proto::job_service_client::JobServiceClient::new(channel))
}

/// Submits through gRPC; returns the job id.
pub async fn grpc_submit(
    client: &mut proto::job_service_client::JobServiceClient<tonic::transport::Channel>,
    spec: proto::JobSpec,
) -> Result<JobId> {
    let job = client
        .submit(proto::SubmitJobRequest { spec: Some(spec) })
        .await?
        .into_inner()
        .job
        .ok_or_else(|| anyhow!("Submit returned no job"))?;
    JobId::from_str(&job.job_id).map_err(|e| anyhow!("bad job id {:?}: {e}", job.job_id))
}

// ----- probes on the store ports ---------------------------------------------

/// Calls and time spent per store method, shared by the probes.
#[derive(Default)]
pub struct StoreTiming {
    calls: Mutex<HashMap<&'static str, (u64, Duration)>>,
}

impl StoreTiming {
    fn record(&self, method: &'static str, took: Duration) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let e = calls.entry(method).or_insert((0, Duration::ZERO));
        e.0 += 1;
        e.1 += took;
    }

    /// Counts `n` entries of one `update_many` call (shown beside the
    /// calls, not counted as calls).
    fn add_entries(&self, n: usize) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let e = calls
            .entry(UPDATE_MANY_ENTRIES)
            .or_insert((0, Duration::ZERO));
        e.0 += n as u64;
    }

    /// The counters so far.
    pub fn snapshot(&self) -> HashMap<&'static str, (u64, Duration)> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Prints the calls made since `before`, per job.
    pub fn print_since(&self, before: &HashMap<&'static str, (u64, Duration)>, jobs: usize) {
        let now = self.snapshot();
        let mut rows: Vec<(&'static str, u64, Duration)> = now
            .iter()
            .map(|(m, (n, t))| {
                let (n0, t0) = before.get(m).copied().unwrap_or((0, Duration::ZERO));
                (*m, n - n0, *t - t0)
            })
            .filter(|(_, n, _)| *n > 0)
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.2));
        let jobs = jobs.max(1) as f64;
        let (calls, time) = rows
            .iter()
            .filter(|r| r.0 != UPDATE_MANY_ENTRIES)
            .fold((0, Duration::ZERO), |(c, t), r| (c + r.1, t + r.2));
        println!(
            "  store calls per job (driver and sessions): {:.1} calls, {:.2} ms in the store",
            calls as f64 / jobs,
            time.as_secs_f64() * 1e3 / jobs
        );
        for (m, n, t) in rows {
            if m == UPDATE_MANY_ENTRIES {
                println!(
                    "    {m:<26} {:>6.2} per job (job updates carried in batches)",
                    n as f64 / jobs
                );
                continue;
            }
            println!(
                "    {m:<26} {:>6.2} calls/job  {:>7.3} ms/call  {:>7.2} ms/job",
                n as f64 / jobs,
                t.as_secs_f64() * 1e3 / n as f64,
                t.as_secs_f64() * 1e3 / jobs
            );
        }
    }
}

/// Key of the entry count of `update_many` calls in [`StoreTiming`].
const UPDATE_MANY_ENTRIES: &str = "(update_many entries)";

/// Times `f` under `method`.
async fn timed<T>(
    timing: &StoreTiming,
    method: &'static str,
    f: impl std::future::Future<Output = T>,
) -> T {
    let t = Instant::now();
    let r = f.await;
    timing.record(method, t.elapsed());
    r
}

/// A [`JobQueue`] that times its calls.
pub struct QueueProbe {
    inner: Arc<dyn JobQueue>,
    timing: Arc<StoreTiming>,
}

#[async_trait]
impl JobQueue for QueueProbe {
    async fn claim(
        &self,
        owner: &str,
        now: Timestamp,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        timed(
            &self.timing,
            "queue.claim",
            self.inner.claim(owner, now, limit, lease),
        )
        .await
    }

    async fn release(&self, id: JobId, owner: &str) -> Result<(), StoreError> {
        timed(&self.timing, "queue.release", self.inner.release(id, owner)).await
    }

    async fn depth(&self) -> Result<u64, StoreError> {
        timed(&self.timing, "queue.depth", self.inner.depth()).await
    }

    async fn overdue(&self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError> {
        timed(
            &self.timing,
            "queue.overdue",
            self.inner.overdue(now, limit),
        )
        .await
    }
}

/// An [`EventLog`] that times its calls.
pub struct EventLogProbe {
    inner: Arc<dyn EventLog>,
    timing: Arc<StoreTiming>,
}

#[async_trait]
impl EventLog for EventLogProbe {
    async fn append(&self, events: Vec<DomainEvent>) -> Result<Vec<DomainEvent>, StoreError> {
        timed(&self.timing, "events.append", self.inner.append(events)).await
    }

    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<DomainEvent>, StoreError> {
        timed(
            &self.timing,
            "events.read_after",
            self.inner.read_after(after, limit),
        )
        .await
    }

    async fn job_events(&self, job: JobId) -> Result<Vec<DomainEvent>, StoreError> {
        timed(
            &self.timing,
            "events.job_events",
            self.inner.job_events(job),
        )
        .await
    }

    async fn last_sequence(&self) -> Result<u64, StoreError> {
        self.inner.last_sequence().await
    }

    async fn settled_sequence(&self) -> Result<u64, StoreError> {
        self.inner.settled_sequence().await
    }
}

/// A [`WorkerRegistry`] that times its calls.
pub struct WorkerProbe {
    inner: Arc<dyn WorkerRegistry>,
    timing: Arc<StoreTiming>,
}

#[async_trait]
impl WorkerRegistry for WorkerProbe {
    async fn upsert(&self, worker: &Worker) -> Result<(), StoreError> {
        timed(&self.timing, "workers.upsert", self.inner.upsert(worker)).await
    }

    async fn upsert_recording(
        &self,
        worker: &Worker,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        timed(
            &self.timing,
            "workers.upsert+events",
            self.inner.upsert_recording(worker, events),
        )
        .await
    }

    fn upsert_records_events(&self) -> bool {
        self.inner.upsert_records_events()
    }

    async fn upsert_many_recording(
        &self,
        entries: Vec<(Worker, Vec<DomainEvent>)>,
    ) -> Result<(), StoreError> {
        timed(
            &self.timing,
            "workers.upsert_many+events",
            self.inner.upsert_many_recording(entries),
        )
        .await
    }

    async fn get(&self, id: WorkerId) -> Result<Option<Worker>, StoreError> {
        timed(&self.timing, "workers.get", self.inner.get(id)).await
    }

    async fn list(&self) -> Result<Vec<Worker>, StoreError> {
        timed(&self.timing, "workers.list", self.inner.list()).await
    }

    async fn issue_token(
        &self,
        worker: WorkerId,
        token: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError> {
        timed(
            &self.timing,
            "workers.issue_token",
            self.inner.issue_token(worker, token, expires_at),
        )
        .await
    }

    async fn consume_token(
        &self,
        token: &str,
        now: Timestamp,
    ) -> Result<Result<WorkerId, TokenRejection>, StoreError> {
        timed(
            &self.timing,
            "workers.consume_token",
            self.inner.consume_token(token, now),
        )
        .await
    }

    async fn consume_token_for(
        &self,
        worker: WorkerId,
        token: &str,
        now: Timestamp,
    ) -> Result<Result<WorkerId, TokenRejection>, StoreError> {
        timed(
            &self.timing,
            "workers.consume_token",
            self.inner.consume_token_for(worker, token, now),
        )
        .await
    }
}

#[derive(Default)]
struct JobMarks {
    running: HashMap<JobId, Instant>,
    terminal: HashMap<JobId, (Instant, JobState)>,
}

/// A [`JobStore`] that notes when each job's RUNNING and terminal states
/// were stored (the store call returned: committed, for PostgreSQL).
pub struct JobProbe {
    inner: Arc<dyn JobStore>,
    timing: Arc<StoreTiming>,
    marks: Mutex<JobMarks>,
    changed: watch::Sender<u64>,
}

impl JobProbe {
    /// A change that starts the job, also when the same update ends it
    /// (the driver stores an ack and a result decided together as one).
    fn starts(job: &Job, events: &[DomainEvent]) -> bool {
        job.state() == JobState::Running
            || events
                .iter()
                .any(|e| matches!(e.body, EventBody::JobStarted { .. }))
    }

    /// Notes a stored update.
    fn note(&self, job: &Job, starts: bool, stored: bool) {
        if !stored {
            return;
        }
        let now = Instant::now();
        let state = job.state();
        let mut marks = self.marks();
        if starts {
            marks.running.entry(job.id).or_insert(now);
        }
        if job.is_terminal() {
            marks.terminal.entry(job.id).or_insert((now, state));
        }
        drop(marks);
        self.changed.send_modify(|v| *v += 1);
    }

    fn marks(&self) -> MutexGuard<'_, JobMarks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the job's RUNNING state was stored.
    pub fn running_at(&self, id: JobId) -> Option<Instant> {
        self.marks().running.get(&id).copied()
    }

    /// When the job's terminal state was stored, and which.
    pub fn terminal_at(&self, id: JobId) -> Option<(Instant, JobState)> {
        self.marks().terminal.get(&id).copied()
    }

    /// Terminal jobs so far, by state.
    pub fn terminal_counts(&self) -> HashMap<JobState, usize> {
        let mut counts = HashMap::new();
        for (_, state) in self.marks().terminal.values() {
            *counts.entry(*state).or_insert(0) += 1;
        }
        counts
    }

    /// Terminal jobs so far.
    pub fn terminal_count(&self) -> usize {
        self.marks().terminal.len()
    }

    /// The latest terminal time of these jobs.
    pub fn last_terminal(&self) -> Option<Instant> {
        self.marks().terminal.values().map(|(t, _)| *t).max()
    }

    /// Waits until `check` answers, at most `timeout`.
    pub async fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> Result<T> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            rx.borrow_and_update();
            if let Some(v) = check(self) {
                return Ok(v);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
        }
    }

    /// Waits for the job's RUNNING state to be stored.
    pub async fn wait_running(&self, id: JobId, timeout: Duration) -> Result<Instant> {
        self.wait(&format!("job {id} to be RUNNING"), timeout, |p| {
            p.running_at(id)
                .or_else(|| p.terminal_at(id).map(|(t, _)| t))
        })
        .await
    }

    /// Waits for the job's terminal state to be stored.
    pub async fn wait_terminal(&self, id: JobId, timeout: Duration) -> Result<(Instant, JobState)> {
        self.wait(&format!("job {id} to end"), timeout, |p| p.terminal_at(id))
            .await
    }
}

#[async_trait]
impl JobStore for JobProbe {
    async fn create(&self, job: &Job, events: Vec<DomainEvent>) -> Result<Created, StoreError> {
        timed(&self.timing, "jobs.create", self.inner.create(job, events)).await
    }

    async fn update(
        &self,
        job: &Job,
        expected_version: u64,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        let starts = Self::starts(job, &events);
        let r = timed(
            &self.timing,
            "jobs.update",
            self.inner.update(job, expected_version, events),
        )
        .await;
        self.note(job, starts, r.is_ok());
        r
    }

    async fn update_saving_workers(
        &self,
        job: &Job,
        expected_version: u64,
        events: Vec<DomainEvent>,
        workers: &[Worker],
    ) -> Result<Vec<DomainEvent>, StoreError> {
        let starts = Self::starts(job, &events);
        let r = timed(
            &self.timing,
            "jobs.update+workers",
            self.inner
                .update_saving_workers(job, expected_version, events, workers),
        )
        .await;
        self.note(job, starts, r.is_ok());
        r
    }

    fn update_saves_workers(&self) -> bool {
        self.inner.update_saves_workers()
    }

    fn update_finishes_logs(&self) -> bool {
        self.inner.update_finishes_logs()
    }

    async fn update_many(&self, updates: Vec<JobUpdate>) -> Result<UpdateAnswers, StoreError> {
        let notes: Vec<_> = updates
            .iter()
            .map(|u| (u.job.clone(), Self::starts(&u.job, &u.events)))
            .collect();
        let r = timed(
            &self.timing,
            "jobs.update_many",
            self.inner.update_many(updates),
        )
        .await;
        if let Ok(answers) = &r {
            self.timing.add_entries(answers.len());
            for ((job, starts), answer) in notes.into_iter().zip(answers) {
                self.note(&job, starts, answer.is_ok());
            }
        }
        r
    }

    fn batches_updates(&self) -> bool {
        self.inner.batches_updates()
    }

    async fn create_many(&self, jobs: Vec<NewJob>) -> Result<CreateAnswers, StoreError> {
        timed(
            &self.timing,
            "jobs.create_many",
            self.inner.create_many(jobs),
        )
        .await
    }

    fn batches_creates(&self) -> bool {
        self.inner.batches_creates()
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        timed(&self.timing, "jobs.get", self.inner.get(id)).await
    }

    async fn list(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        timed(&self.timing, "jobs.list", self.inner.list(filter)).await
    }
}

#[derive(Default)]
struct LogMarks {
    /// Highest stored sequence per job, and when it was stored.
    last: HashMap<JobId, (u64, Instant)>,
    appends: u64,
    lines: u64,
}

/// A [`LogStore`] that notes when the last line of each job was stored.
pub struct LogProbe {
    inner: Arc<dyn LogStore>,
    timing: Arc<StoreTiming>,
    marks: Mutex<LogMarks>,
}

impl LogProbe {
    fn marks(&self) -> MutexGuard<'_, LogMarks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The highest stored sequence of the job and when it was stored.
    pub fn last(&self, id: JobId) -> Option<(u64, Instant)> {
        self.marks().last.get(&id).copied()
    }

    /// Append calls and lines handed to them so far.
    pub fn totals(&self) -> (u64, u64) {
        let m = self.marks();
        (m.appends, m.lines)
    }
}

#[async_trait]
impl LogStore for LogProbe {
    async fn append(
        &self,
        job: JobId,
        attempt: u32,
        lines: Vec<NewLogLine>,
    ) -> Result<u64, StoreError> {
        let n = lines.len() as u64;
        let r = timed(
            &self.timing,
            "logs.append",
            self.inner.append(job, attempt, lines),
        )
        .await;
        if let Ok(last) = r {
            let now = Instant::now();
            let mut m = self.marks();
            m.appends += 1;
            m.lines += n;
            let entry = m.last.entry(job).or_insert((0, now));
            if last > entry.0 {
                *entry = (last, now);
            }
        }
        r
    }

    async fn read(&self, job: JobId, after: u64, limit: usize) -> Result<Vec<LogLine>, StoreError> {
        self.inner.read(job, after, limit).await
    }

    async fn finish(&self, job: JobId) -> Result<(), StoreError> {
        timed(&self.timing, "logs.finish", self.inner.finish(job)).await
    }

    fn follow(&self, job: JobId, after: u64) -> BoxStream<'static, Result<LogLine, StoreError>> {
        self.inner.follow(job, after)
    }
}

/// The job, log and worker probes as one object, for stores that are one.
pub struct StoreProbe {
    jobs: Arc<JobProbe>,
    logs: Arc<LogProbe>,
    workers: WorkerProbe,
    events: EventLogProbe,
}

#[async_trait]
impl EventLog for StoreProbe {
    async fn append(&self, events: Vec<DomainEvent>) -> Result<Vec<DomainEvent>, StoreError> {
        self.events.append(events).await
    }
    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<DomainEvent>, StoreError> {
        self.events.read_after(after, limit).await
    }
    async fn job_events(&self, job: JobId) -> Result<Vec<DomainEvent>, StoreError> {
        self.events.job_events(job).await
    }
    async fn last_sequence(&self) -> Result<u64, StoreError> {
        self.events.last_sequence().await
    }
    async fn settled_sequence(&self) -> Result<u64, StoreError> {
        self.events.settled_sequence().await
    }
}

#[async_trait]
impl JobStore for StoreProbe {
    async fn create(&self, job: &Job, events: Vec<DomainEvent>) -> Result<Created, StoreError> {
        self.jobs.create(job, events).await
    }
    async fn update(
        &self,
        job: &Job,
        expected_version: u64,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        self.jobs.update(job, expected_version, events).await
    }
    async fn update_saving_workers(
        &self,
        job: &Job,
        expected_version: u64,
        events: Vec<DomainEvent>,
        workers: &[Worker],
    ) -> Result<Vec<DomainEvent>, StoreError> {
        self.jobs
            .update_saving_workers(job, expected_version, events, workers)
            .await
    }
    fn update_saves_workers(&self) -> bool {
        self.jobs.update_saves_workers()
    }
    fn update_finishes_logs(&self) -> bool {
        self.jobs.update_finishes_logs()
    }
    async fn update_many(&self, updates: Vec<JobUpdate>) -> Result<UpdateAnswers, StoreError> {
        self.jobs.update_many(updates).await
    }
    fn batches_updates(&self) -> bool {
        self.jobs.batches_updates()
    }
    async fn create_many(&self, jobs: Vec<NewJob>) -> Result<CreateAnswers, StoreError> {
        self.jobs.create_many(jobs).await
    }
    fn batches_creates(&self) -> bool {
        self.jobs.batches_creates()
    }
    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        JobStore::get(&*self.jobs, id).await
    }
    async fn list(&self, filter: &JobFilter) -> Result<JobPage, StoreError> {
        JobStore::list(&*self.jobs, filter).await
    }
}

#[async_trait]
impl LogStore for StoreProbe {
    async fn append(
        &self,
        job: JobId,
        attempt: u32,
        lines: Vec<NewLogLine>,
    ) -> Result<u64, StoreError> {
        self.logs.append(job, attempt, lines).await
    }
    async fn read(&self, job: JobId, after: u64, limit: usize) -> Result<Vec<LogLine>, StoreError> {
        self.logs.read(job, after, limit).await
    }
    async fn finish(&self, job: JobId) -> Result<(), StoreError> {
        self.logs.finish(job).await
    }
    fn follow(&self, job: JobId, after: u64) -> BoxStream<'static, Result<LogLine, StoreError>> {
        self.logs.follow(job, after)
    }
}

#[async_trait]
impl WorkerRegistry for StoreProbe {
    async fn upsert(&self, worker: &Worker) -> Result<(), StoreError> {
        self.workers.upsert(worker).await
    }
    async fn upsert_recording(
        &self,
        worker: &Worker,
        events: Vec<DomainEvent>,
    ) -> Result<Vec<DomainEvent>, StoreError> {
        self.workers.upsert_recording(worker, events).await
    }
    fn upsert_records_events(&self) -> bool {
        self.workers.upsert_records_events()
    }
    async fn upsert_many_recording(
        &self,
        entries: Vec<(Worker, Vec<DomainEvent>)>,
    ) -> Result<(), StoreError> {
        self.workers.upsert_many_recording(entries).await
    }
    async fn get(&self, id: WorkerId) -> Result<Option<Worker>, StoreError> {
        WorkerRegistry::get(&self.workers, id).await
    }
    async fn list(&self) -> Result<Vec<Worker>, StoreError> {
        WorkerRegistry::list(&self.workers).await
    }
    async fn issue_token(
        &self,
        worker: WorkerId,
        token: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.workers.issue_token(worker, token, expires_at).await
    }
    async fn consume_token(
        &self,
        token: &str,
        now: Timestamp,
    ) -> Result<Result<WorkerId, TokenRejection>, StoreError> {
        self.workers.consume_token(token, now).await
    }
    async fn consume_token_for(
        &self,
        worker: WorkerId,
        token: &str,
        now: Timestamp,
    ) -> Result<Result<WorkerId, TokenRejection>, StoreError> {
        self.workers.consume_token_for(worker, token, now).await
    }
}

/// Stores with probes on the job and log ports.
#[derive(Clone)]
pub struct Probed {
    pub stores: Stores,
    pub jobs: Arc<JobProbe>,
    pub logs: Arc<LogProbe>,
    pub timing: Arc<StoreTiming>,
}

/// Puts probes on `stores`.
pub fn probe(stores: Stores) -> Probed {
    let timing = Arc::new(StoreTiming::default());
    let jobs = Arc::new(JobProbe {
        inner: stores.jobs.clone(),
        timing: timing.clone(),
        marks: Mutex::new(JobMarks::default()),
        changed: watch::channel(0).0,
    });
    let logs = Arc::new(LogProbe {
        inner: stores.logs.clone(),
        timing: timing.clone(),
        marks: Mutex::new(LogMarks::default()),
    });
    // One object serving jobs, logs, workers and events stays one object,
    // so that the runtime still lets a job update finish the log and carry
    // the worker records, and a worker record carry its events
    // (`Stores::terminal_update_finishes_logs`,
    // `Stores::update_saves_workers`, `Stores::worker_saves_record_events`).
    let same = |other: *const ()| std::ptr::addr_eq(Arc::as_ptr(&stores.jobs), other);
    let one_object = same(Arc::as_ptr(&stores.logs) as *const ())
        && same(Arc::as_ptr(&stores.workers) as *const ())
        && same(Arc::as_ptr(&stores.events) as *const ());
    let workers = WorkerProbe {
        inner: stores.workers.clone(),
        timing: timing.clone(),
    };
    let events = EventLogProbe {
        inner: stores.events.clone(),
        timing: timing.clone(),
    };
    let mut stores = stores;
    if one_object {
        let all = Arc::new(StoreProbe {
            jobs: jobs.clone(),
            logs: logs.clone(),
            workers,
            events,
        });
        stores.jobs = all.clone();
        stores.logs = all.clone();
        stores.workers = all.clone();
        stores.events = all;
    } else {
        stores.jobs = jobs.clone();
        stores.logs = logs.clone();
        stores.workers = Arc::new(workers);
        stores.events = Arc::new(events);
    }
    stores.queue = Arc::new(QueueProbe {
        inner: stores.queue.clone(),
        timing: timing.clone(),
    });
    Probed {
        stores,
        jobs,
        logs,
        timing,
    }
}

// ----- events -------------------------------------------------------------------

/// Every event of the bus with the moment this process received it.
pub struct EventRecorder {
    seen: Arc<Mutex<Vec<(Instant, DomainEvent)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EventRecorder {
    /// Subscribes to the control plane's bus from the start.
    pub fn start(cp: &ControlPlane) -> EventRecorder {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut events = cp.watch_events(0);
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            while let Some(e) = events.next().await {
                let Ok(e) = e else { continue };
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((Instant::now(), e));
            }
        });
        EventRecorder { seen, task }
    }

    /// What was received so far.
    pub fn events(&self) -> Vec<(Instant, DomainEvent)> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until `check` finds something in the events, at most `timeout`.
    pub async fn wait_for<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&[(Instant, DomainEvent)]) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(v) = check(&seen) {
                    return Some(v);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for EventRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The time between two event timestamps (server clock).
pub fn between(from: &DomainEvent, to: &DomainEvent) -> Duration {
    (to.occurred_at - from.occurred_at)
        .to_std()
        .unwrap_or(Duration::ZERO)
}

// ----- the server ---------------------------------------------------------------

/// Starts an embedded server on 127.0.0.1 with these stores and
/// providers.
pub async fn start_server(
    stores: Stores,
    providers: Vec<ProviderSettings>,
    worker_bin: Option<PathBuf>,
) -> Result<RunningServer> {
    let mut config = ServerConfig {
        store: StoreBackend::Custom(stores),
        providers,
        worker_bin,
        ..ServerConfig::default()
    };
    config.runtime.server_id = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let grpc = listener()?;
    server::start(Listeners { grpc, http: None }, config)
        .await
        .map_err(|e| anyhow!("server did not start: {e}"))
}

/// `HODEI_BENCH_LISTENER_NODELAY=1`: TCP_NODELAY on the listening socket.
pub fn listener_nodelay() -> bool {
    std::env::var("HODEI_BENCH_LISTENER_NODELAY").is_ok_and(|v| v == "1")
}

/// The gRPC listener on 127.0.0.1, port 0. With [`listener_nodelay`],
/// TCP_NODELAY is set on the listening socket; Linux copies it to the
/// sockets `accept` returns, so the server's side of every connection
/// sends without Nagle's delay although the server does not set it (an
/// experiment, to see what the option would change).
fn listener() -> Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    if listener_nodelay() {
        socket.set_nodelay(true)?;
    }
    socket.bind("127.0.0.1:0".parse()?)?;
    Ok(socket.listen(1024)?)
}

/// A provider of `kind` named after it with this pool.
pub fn provider(
    kind: hodei_grpc::config::ProviderKind,
    max_workers: u32,
    warm_pool: u32,
    ephemeral: bool,
    state_dir: Option<&Path>,
) -> ProviderSettings {
    let mut p = ProviderSettings::new(kind);
    p.max_workers = max_workers;
    p.warm_pool = warm_pool;
    p.ephemeral = ephemeral;
    if let Some(dir) = state_dir {
        p.extra.insert(
            "state_dir".into(),
            toml::Value::String(dir.display().to_string()),
        );
    }
    p
}

/// Waits until at least `n` workers are READY and connected.
pub async fn wait_ready(
    cp: &ControlPlane,
    n: usize,
    timeout: Duration,
) -> Result<Vec<hodei_core::worker::Worker>> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready: Vec<_> = cp
            .workers()
            .await?
            .into_iter()
            .filter(|w| w.state == WorkerState::Ready && w.connected)
            .collect();
        if ready.len() >= n {
            return Ok(ready);
        }
        if Instant::now() >= deadline {
            bail!(
                "only {} of {n} warm workers READY after {timeout:?}",
                ready.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until no worker is alive (ephemeral workers gone).
pub async fn wait_no_live_workers(cp: &ControlPlane, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let live = cp
            .workers()
            .await?
            .into_iter()
            .filter(|w| !w.state.is_terminal())
            .count();
        if live == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{live} workers still alive after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ----- processes ------------------------------------------------------------------

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// CPU seconds (user + system) a process has used so far (`/proc/<pid>/stat`,
/// assuming 100 clock ticks per second).
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The pid of a local worker's agent, from the local provider's pid file.
pub fn agent_pid(state_dir: &Path, worker: impl std::fmt::Display) -> Option<u32> {
    let text = std::fs::read_to_string(state_dir.join(format!("{worker}.pid"))).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("pid="))
        .and_then(|p| p.trim().parse().ok())
}

/// Mebibytes with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

// ----- PostgreSQL -----------------------------------------------------------------

/// A database created for one run, dropped by [`PgDb::drop_db`].
pub struct PgDb {
    /// URL of the new database.
    pub url: String,
    /// Its name.
    pub name: String,
    admin_url: String,
}

/// The PostgreSQL of `HODEI_TEST_DATABASE_URL`, if set.
pub fn pg_base_url() -> Option<String> {
    std::env::var("HODEI_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
}

/// Creates a fresh database on the server of `HODEI_TEST_DATABASE_URL`;
/// `None` when it is not set.
pub async fn fresh_database(tag: &str) -> Result<Option<PgDb>> {
    use sqlx::Connection;
    let Some(base) = pg_base_url() else {
        return Ok(None);
    };
    let name = format!(
        "hodei_bench_{tag}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .context("connecting to HODEI_TEST_DATABASE_URL")?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .with_context(|| format!("CREATE DATABASE {name}"))?;
    conn.close().await.ok();
    Ok(Some(PgDb {
        url: with_database(&base, &name),
        name,
        admin_url: base,
    }))
}

impl PgDb {
    /// Drops the database (closing whatever is still connected).
    pub async fn drop_db(self) {
        use sqlx::Connection;
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.admin_url).await {
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
            if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
            {
                eprintln!("could not drop database {}: {e}", self.name);
            }
            conn.close().await.ok();
        }
    }
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let host_start = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[host_start..]
        .find('/')
        .map_or(base.len(), |i| i + host_start);
    let mut out = format!("{}/{db}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// Connects a [`hodei_postgres::PgStore`] (migrations applied).
pub async fn pg_store(url: &str) -> Result<hodei_postgres::PgStore> {
    hodei_postgres::PgStore::connect(url, hodei_postgres::PgStoreOptions::default())
        .await
        .map_err(|e| anyhow!("PgStore::connect: {e}"))
}
