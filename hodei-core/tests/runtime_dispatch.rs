//! The driver's dispatch of jobs with secrets and its writes, on the
//! in-memory store wrapped to inject store failures, with agents that are
//! tokio tasks.
#![cfg(feature = "runtime")]

mod runtime_support;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hodei_core::engine::AttemptReport;
use hodei_core::event::{DomainEvent, EventBody};
use hodei_core::ids::{Actor, CorrelationId, JobId, WorkerId};
use hodei_core::job::{AttemptOutcome, FailureKind, Job, JobState};
use hodei_core::memory::MemoryStore;
use hodei_core::ports::{
    EventLog, JobStore, RequestContext, SecretMeta, SecretStore, StoreError, ToWorker,
    TokenRejection, WorkerLaunch, WorkerRegistry,
};
use hodei_core::runtime::{
    ControlPlane, FromWorker, RuntimeConfig, Stores, WorkerHello, attempt_decided,
};
use hodei_core::spec::RawJobSpec;
use hodei_core::time::Timestamp;
use hodei_core::worker::Worker;
use runtime_support::{ChanLink, FakeProvider, HeldJobs, start_control_plane};
use tokio::sync::mpsc;

/// What the next reads of a secret do.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Unavailable,
    Broken,
    Missing,
}

fn error(f: Fault) -> Option<StoreError> {
    match f {
        Fault::Unavailable => Some(StoreError::Unavailable("database restarts".into())),
        Fault::Broken => Some(StoreError::Other("disk on fire".into())),
        Fault::Missing => None,
    }
}

/// Secrets whose reads fail as scripted.
struct FlakySecrets {
    inner: Arc<MemoryStore>,
    faults: Mutex<VecDeque<Fault>>,
}

#[async_trait]
impl SecretStore for FlakySecrets {
    async fn put(&self, name: &str, value: &str, now: Timestamp) -> Result<(), StoreError> {
        self.inner.put(name, value, now).await
    }
    async fn get(&self, name: &str) -> Result<Option<String>, StoreError> {
        let fault = self.faults.lock().unwrap().pop_front();
        match fault {
            Some(f) => match error(f) {
                Some(e) => Err(e),
                None => Ok(None),
            },
            None => SecretStore::get(&*self.inner, name).await,
        }
    }
    async fn list(&self) -> Result<Vec<SecretMeta>, StoreError> {
        SecretStore::list(&*self.inner).await
    }
    async fn delete(&self, name: &str) -> Result<bool, StoreError> {
        SecretStore::delete(&*self.inner, name).await
    }
}

/// An event log whose appends of `SecretAccessed` fail as scripted.
struct FlakyEvents {
    inner: Arc<MemoryStore>,
    faults: Mutex<VecDeque<Fault>>,
}

#[async_trait]
impl EventLog for FlakyEvents {
    async fn append(&self, events: Vec<DomainEvent>) -> Result<Vec<DomainEvent>, StoreError> {
        if events
            .iter()
            .any(|e| matches!(e.body, EventBody::SecretAccessed { .. }))
            && let Some(e) = self.faults.lock().unwrap().pop_front().and_then(error)
        {
            return Err(e);
        }
        self.inner.append(events).await
    }
    async fn read_after(&self, after: u64, limit: usize) -> Result<Vec<DomainEvent>, StoreError> {
        self.inner.read_after(after, limit).await
    }
    async fn job_events(&self, job: JobId) -> Result<Vec<DomainEvent>, StoreError> {
        self.inner.job_events(job).await
    }
}

/// A worker registry whose next upserts fail as scripted; keeps every
/// record it was asked to save and every one it saved.
struct FlakyWorkers {
    inner: Arc<MemoryStore>,
    faults: Mutex<VecDeque<Fault>>,
    failed: Mutex<Vec<Worker>>,
    saved: Mutex<Vec<Worker>>,
}

#[async_trait]
impl WorkerRegistry for FlakyWorkers {
    async fn upsert(&self, worker: &Worker) -> Result<(), StoreError> {
        if let Some(e) = self.faults.lock().unwrap().pop_front().and_then(error) {
            self.failed.lock().unwrap().push(worker.clone());
            return Err(e);
        }
        WorkerRegistry::upsert(&*self.inner, worker).await?;
        self.saved.lock().unwrap().push(worker.clone());
        Ok(())
    }
    async fn get(&self, id: WorkerId) -> Result<Option<Worker>, StoreError> {
        WorkerRegistry::get(&*self.inner, id).await
    }
    async fn list(&self) -> Result<Vec<Worker>, StoreError> {
        WorkerRegistry::list(&*self.inner).await
    }
    async fn issue_token(
        &self,
        worker: WorkerId,
        token: &str,
        expires_at: Timestamp,
    ) -> Result<(), StoreError> {
        self.inner.issue_token(worker, token, expires_at).await
    }
    async fn consume_token(
        &self,
        token: &str,
        now: Timestamp,
    ) -> Result<Result<WorkerId, TokenRejection>, StoreError> {
        self.inner.consume_token(token, now).await
    }
    async fn consume_token_for(
        &self,
        worker: WorkerId,
        token: &str,
        now: Timestamp,
    ) -> Result<Result<WorkerId, TokenRejection>, StoreError> {
        self.inner.consume_token_for(worker, token, now).await
    }
}

/// Per result an agent sent: whether the control plane's decision watch
/// fired, and whether the store had the attempt decided at that moment.
type Decided = Arc<Mutex<Vec<(JobId, u32, bool, bool)>>>;

/// The secrets each dispatched attempt received.
type Delivered = Arc<Mutex<Vec<(u32, BTreeMap<String, String>)>>>;

/// An agent that acknowledges every attempt and reports exit 0 at once,
/// noting the secrets each attempt received.
async fn agent(
    cp: ControlPlane,
    launch: WorkerLaunch,
    delivered: Delivered,
    decided: Decided,
    mem: Arc<MemoryStore>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hello = WorkerHello {
        worker: launch.worker,
        token: launch.token,
        provider: "local".into(),
        labels: BTreeMap::new(),
        image: None,
        capacity: 1,
        running: Vec::new(),
    };
    let w = launch.worker;
    if cp
        .worker_hello(hello, Arc::new(ChanLink(tx)))
        .await
        .is_err()
    {
        return;
    }
    while let Some(msg) = rx.recv().await {
        match msg {
            ToWorker::Run(run) => {
                let (job, attempt) = (run.job.id, run.job.attempt);
                delivered
                    .lock()
                    .unwrap()
                    .push((attempt, run.secrets.clone()));
                let _ = cp.worker_message(w, FromWorker::Ack { job, attempt }).await;
                let report = AttemptReport {
                    exit_code: Some(0),
                    ..AttemptReport::default()
                };
                // What a session does before it acknowledges a result.
                let watch = cp.watch_decision(job, attempt);
                let (decided, mem) = (decided.clone(), mem.clone());
                tokio::spawn(async move {
                    let fired = watch.decided(Duration::from_secs(30)).await;
                    let stored = JobStore::get(&*mem, job)
                        .await
                        .unwrap()
                        .is_some_and(|j| attempt_decided(&j, attempt));
                    decided.lock().unwrap().push((job, attempt, fired, stored));
                });
                let _ = cp
                    .worker_message(
                        w,
                        FromWorker::Result {
                            job,
                            attempt,
                            report,
                        },
                    )
                    .await;
            }
            ToWorker::Shutdown => return,
            _ => {}
        }
    }
}

struct Harness {
    cp: ControlPlane,
    secret_faults: Arc<FlakySecrets>,
    event_faults: Arc<FlakyEvents>,
    worker_faults: Arc<FlakyWorkers>,
    jobs_gate: Arc<HeldJobs>,
    delivered: Delivered,
    decided: Decided,
}

async fn start() -> Harness {
    let mem = Arc::new(MemoryStore::new());
    let secrets = Arc::new(FlakySecrets {
        inner: mem.clone(),
        faults: Mutex::new(VecDeque::new()),
    });
    let events = Arc::new(FlakyEvents {
        inner: mem.clone(),
        faults: Mutex::new(VecDeque::new()),
    });
    let workers = Arc::new(FlakyWorkers {
        inner: mem.clone(),
        faults: Mutex::new(VecDeque::new()),
        failed: Mutex::new(Vec::new()),
        saved: Mutex::new(Vec::new()),
    });
    let jobs = Arc::new(HeldJobs::new(mem.clone()));
    let stores = Stores {
        secrets: secrets.clone(),
        events: events.clone(),
        workers: workers.clone(),
        jobs: jobs.clone(),
        ..Stores::from_store(mem.clone())
    };
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let decided: Decided = Arc::default();
    let provider = {
        let (delivered, decided) = (delivered.clone(), decided.clone());
        FakeProvider::new("local").spawning(move |cp, launch| {
            agent(cp, launch, delivered.clone(), decided.clone(), mem.clone())
        })
    };
    let mut config = RuntimeConfig::default();
    config.engine.retry.base = Duration::from_millis(10);
    let cp = start_control_plane(config, stores, Arc::new(provider), 8).await;
    let ctx = ctx();
    cp.set_secret("API_KEY", "s3cret", &ctx).await.unwrap();
    Harness {
        cp,
        secret_faults: secrets,
        event_faults: events,
        worker_faults: workers,
        jobs_gate: jobs,
        delivered,
        decided,
    }
}

fn ctx() -> RequestContext {
    RequestContext {
        correlation_id: CorrelationId::new("corr-secrets"),
        actor: Actor::new("tester"),
    }
}

async fn run_job(h: &Harness, max_attempts: u32) -> (Job, Vec<String>) {
    let spec = RawJobSpec {
        command: Some(vec!["true".into()]),
        secrets: vec!["API_KEY".into()],
        max_attempts: Some(max_attempts),
        ..Default::default()
    };
    let job = h.cp.submit(spec, &ctx()).await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), h.cp.wait_terminal(job.id))
        .await
        .expect("the job ends")
        .unwrap();
    let types =
        h.cp.job_events(job.id)
            .await
            .unwrap()
            .iter()
            .map(|e| e.event_type().to_owned())
            .collect();
    (done, types)
}

fn count(types: &[String], t: &str) -> usize {
    types.iter().filter(|x| *x == t).count()
}

fn failure_of(job: &Job, attempt: usize) -> (FailureKind, String) {
    match &job.attempts[attempt].outcome {
        AttemptOutcome::Failed { failure } => (failure.kind, failure.message.clone()),
        other => panic!("attempt {attempt} did not fail: {other:?}"),
    }
}

#[tokio::test]
async fn a_short_store_outage_while_reading_a_secret_costs_no_attempt() {
    let h = start().await;
    h.secret_faults
        .faults
        .lock()
        .unwrap()
        .extend([Fault::Unavailable, Fault::Unavailable]);
    let (job, types) = run_job(&h, 1).await;
    assert_eq!(job.state(), JobState::Succeeded, "{types:?}");
    assert_eq!(job.attempts.len(), 1);
    assert_eq!(count(&types, "JobStarted"), 1);
    let delivered = h.delivered.lock().unwrap().clone();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].1["API_KEY"], "s3cret");
    h.cp.shutdown().await;
}

#[tokio::test]
async fn a_secret_read_error_is_a_retried_dispatch_failure_not_a_start() {
    let h = start().await;
    h.secret_faults
        .faults
        .lock()
        .unwrap()
        .push_back(Fault::Broken);
    let (job, types) = run_job(&h, 2).await;
    assert_eq!(job.state(), JobState::Succeeded, "{types:?}");
    assert_eq!(job.attempts.len(), 2, "{types:?}");
    let (kind, message) = failure_of(&job, 0);
    assert_eq!(kind, FailureKind::DispatchFailed);
    assert!(message.contains("API_KEY"), "{message}");
    // Only the attempt that ran started.
    assert_eq!(count(&types, "JobStarted"), 1, "{types:?}");
    assert!(job.attempts[0].started_at.is_none());
    let delivered = h.delivered.lock().unwrap().clone();
    assert_eq!(delivered.iter().map(|d| d.0).collect::<Vec<_>>(), vec![2]);
    h.cp.shutdown().await;
}

#[tokio::test]
async fn a_deleted_secret_fails_the_job_for_good_without_a_start() {
    let h = start().await;
    h.secret_faults
        .faults
        .lock()
        .unwrap()
        .push_back(Fault::Missing);
    let (job, types) = run_job(&h, 3).await;
    assert_eq!(job.state(), JobState::Failed, "{types:?}");
    assert_eq!(job.attempts.len(), 1, "{types:?}");
    let (kind, message) = failure_of(&job, 0);
    assert!(!kind.is_transient(), "{kind:?}");
    assert!(message.contains("\"API_KEY\" does not exist"), "{message}");
    assert_eq!(count(&types, "JobStarted"), 0, "{types:?}");
    assert!(h.delivered.lock().unwrap().is_empty());
    h.cp.shutdown().await;
}

#[tokio::test]
async fn no_secret_is_delivered_without_its_audit_record() {
    let h = start().await;
    h.event_faults
        .faults
        .lock()
        .unwrap()
        .push_back(Fault::Broken);
    let (job, types) = run_job(&h, 2).await;
    assert_eq!(job.state(), JobState::Succeeded, "{types:?}");
    assert_eq!(job.attempts.len(), 2, "{types:?}");
    let (kind, message) = failure_of(&job, 0);
    assert_eq!(kind, FailureKind::DispatchFailed);
    assert!(message.contains("could not be recorded"), "{message}");
    assert_eq!(count(&types, "JobStarted"), 1, "{types:?}");
    // Every delivery has its record.
    let delivered = h.delivered.lock().unwrap().clone();
    assert_eq!(delivered.iter().map(|d| d.0).collect::<Vec<_>>(), vec![2]);
    let accessed =
        h.cp.audit(&hodei_core::ports::AuditFilter {
            event_type: Some("SecretAccessed".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    // One for `set`, one for the delivery that happened.
    assert_eq!(accessed.total, 2);

    // A short outage of the event log is waited out.
    h.event_faults
        .faults
        .lock()
        .unwrap()
        .extend([Fault::Unavailable, Fault::Unavailable]);
    let (job, types) = run_job(&h, 1).await;
    assert_eq!(job.state(), JobState::Succeeded, "{types:?}");
    h.cp.shutdown().await;
}

#[tokio::test]
async fn worker_saves_are_retried_while_the_store_is_unavailable() {
    let h = start().await;
    h.worker_faults.faults.lock().unwrap().extend([
        Fault::Unavailable,
        Fault::Unavailable,
        Fault::Unavailable,
    ]);
    let (job, types) = run_job(&h, 1).await;
    assert_eq!(job.state(), JobState::Succeeded, "{types:?}");
    // The saves of a pass are done before the next pass starts, so by the
    // time the job is finished the failed saves were retried.
    let failed = h.worker_faults.failed.lock().unwrap().clone();
    let saved = h.worker_faults.saved.lock().unwrap().clone();
    assert_eq!(failed.len(), 3);
    for w in &failed {
        assert!(saved.contains(w), "never saved: {w:?}\nsaved: {saved:?}");
    }
    h.cp.shutdown().await;
}

/// A result is acknowledged (the session's decision watch fires) only once
/// the write that decides its attempt has committed, not when the engine
/// decides: a server that dies in between leaves the agent holding the
/// result, to send again.
#[tokio::test]
async fn a_result_s_decision_watch_fires_only_after_the_write_commits() {
    let h = start().await;
    h.jobs_gate.hold_endings.send_replace(true);
    let spec = RawJobSpec {
        command: Some(vec!["true".into()]),
        ..Default::default()
    };
    let job = h.cp.submit(spec, &ctx()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), h.jobs_gate.held.notified())
        .await
        .expect("the terminal update reaches the store");
    // The engine has decided; the store has not committed it.
    assert!(
        h.decided.lock().unwrap().is_empty(),
        "fired before the write committed: {:?}",
        h.decided.lock().unwrap()
    );
    // (The ack and the result may be stored as one write: ASSIGNED.)
    let stored = h.cp.job(job.id).await.unwrap();
    assert!(!attempt_decided(&stored, 1), "{:?}", stored.status);
    h.jobs_gate.hold_endings.send_replace(false);
    let done = tokio::time::timeout(Duration::from_secs(30), h.cp.wait_terminal(job.id))
        .await
        .expect("the job ends")
        .unwrap();
    assert_eq!(done.state(), JobState::Succeeded);
    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Some(d) = h.decided.lock().unwrap().first().copied() {
                return d;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the watch fires");
    assert_eq!(
        seen,
        (job.id, 1, true, true),
        "(job, attempt, fired, stored)"
    );
    h.cp.shutdown().await;
}

/// With a store that batches writes (`JobStore::batches_updates`,
/// `batches_creates`), the creations and the job updates of one pass that
/// wait for nothing else are stored by one `create_many` / `update_many`
/// call, and every job still runs its whole course with its whole event
/// trail. Three submissions queue up while the first creation
/// is held, so they share a pass, and their claim schedules all three in
/// the next one.
#[tokio::test]
async fn the_writes_of_a_pass_are_stored_in_one_batch() {
    let h = start().await;
    h.jobs_gate
        .batching
        .store(true, std::sync::atomic::Ordering::SeqCst);
    h.jobs_gate.hold_creates.send_replace(true);
    let mut submits = Vec::new();
    for _ in 0..3 {
        let cp = h.cp.clone();
        submits.push(tokio::spawn(async move {
            let spec = RawJobSpec {
                command: Some(vec!["true".into()]),
                ..Default::default()
            };
            cp.submit(spec, &ctx()).await.unwrap()
        }));
    }
    tokio::time::timeout(Duration::from_secs(30), h.jobs_gate.held.notified())
        .await
        .expect("a creation reaches the store");
    h.jobs_gate.hold_creates.send_replace(false);
    for s in submits {
        let job = s.await.unwrap();
        let done = tokio::time::timeout(Duration::from_secs(30), h.cp.wait_terminal(job.id))
            .await
            .expect("the job ends")
            .unwrap();
        assert_eq!(done.state(), JobState::Succeeded);
        let types: Vec<String> =
            h.cp.job_events(job.id)
                .await
                .unwrap()
                .iter()
                .map(|e| e.event_type().to_owned())
                .collect();
        assert_eq!(
            types,
            [
                "JobCreated",
                "JobQueued",
                "JobScheduled",
                "WorkerProvisioningRequested",
                "JobAssigned",
                "JobStarted",
                "JobSucceeded"
            ],
            "job {}",
            job.id
        );
    }
    let creates = h.jobs_gate.create_batches.lock().unwrap().clone();
    assert_eq!(
        creates,
        [3],
        "the three submissions that queued up were created by one call"
    );
    let batches = h.jobs_gate.batches.lock().unwrap().clone();
    assert!(
        batches.iter().any(|n| *n >= 3),
        "the three jobs scheduled in one pass were one batch: {batches:?}"
    );
    assert!(
        batches.iter().all(|n| *n >= 2),
        "a batch of one is not a batch: {batches:?}"
    );
    h.cp.shutdown().await;
}
