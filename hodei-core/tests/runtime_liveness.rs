//! Worker liveness through the control plane: a worker the heartbeat
//! timeout disconnected is revived by a log batch of its session; typed
//! refusal codes reach the engine; an acknowledgement that waited while
//! the driver was held up by the store counts before the deadline it met.
#![cfg(feature = "runtime")]

mod runtime_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use hodei_core::engine::{AttemptReport, ProviderConfig, RefusalCode};
use hodei_core::event::{DomainEvent, EventBody};
use hodei_core::ids::{Actor, CorrelationId, JobId, WorkerId};
use hodei_core::job::{Job, JobState};
use hodei_core::memory::MemoryStore;
use hodei_core::ports::{
    Claim, JobQueue, LogStream, NewLogLine, RequestContext, StoreError, ToWorker, WorkerLaunch,
};
use hodei_core::runtime::{ControlPlane, FromWorker, RuntimeConfig, Stores, WorkerHello, now_utc};
use hodei_core::spec::RawJobSpec;
use hodei_core::time::Timestamp;
use runtime_support::{
    ChanLink, FakeProvider, HeldJobs, start_control_plane, start_control_plane_with,
};
use tokio::sync::mpsc;

/// The attempt of the next job the worker is given (a guard fails the
/// test if none comes).
/// Plays the launched agent: registers it with its one-time token over a
/// channel link; returns its id and what the control plane sends it.
async fn register(
    cp: &ControlPlane,
    launch: WorkerLaunch,
) -> (WorkerId, mpsc::UnboundedReceiver<ToWorker>) {
    let (tx, rx) = mpsc::unbounded_channel();
    cp.worker_hello(
        hello(launch.worker, launch.token, Vec::new()),
        Arc::new(ChanLink(tx)),
    )
    .await
    .unwrap();
    (launch.worker, rx)
}

/// What the test's agent says first: one slot, no labels.
fn hello(
    worker: WorkerId,
    token: String,
    running: Vec<(hodei_core::ids::JobId, u32)>,
) -> WorkerHello {
    WorkerHello {
        worker,
        token,
        provider: "local".into(),
        labels: BTreeMap::new(),
        image: None,
        capacity: 1,
        running,
    }
}

async fn next_run(rx: &mut mpsc::UnboundedReceiver<ToWorker>) -> u32 {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match rx.recv().await.expect("the worker's link stays open") {
                ToWorker::Run(run) => return run.job.attempt,
                other => println!("worker got {other:?}"),
            }
        }
    })
    .await
    .expect("a job is dispatched")
}

/// A request context of the tester with correlation id `corr`.
fn ctx(corr: &str) -> RequestContext {
    RequestContext {
        correlation_id: CorrelationId::new(corr),
        actor: Actor::new("tester"),
    }
}

/// An attempt's result: exited 0.
fn exited_ok(job: JobId, attempt: u32) -> FromWorker {
    FromWorker::Result {
        job,
        attempt,
        report: AttemptReport {
            exit_code: Some(0),
            ..AttemptReport::default()
        },
    }
}

/// The next event of the stream matching `f` (a guard fails the test if
/// it never comes).
async fn next_matching(
    events: &mut BoxStream<'static, Result<DomainEvent, hodei_core::runtime::ApiError>>,
    what: &str,
    f: impl Fn(&DomainEvent) -> bool,
) -> DomainEvent {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let e = events.next().await.expect("event stream open").unwrap();
            if f(&e) {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} event"))
}

#[tokio::test]
async fn a_log_batch_revives_a_worker_the_heartbeat_timeout_disconnected() {
    let (launches_tx, mut launches) = mpsc::unbounded_channel();
    let mut config = RuntimeConfig::default();
    config.engine.heartbeat_timeout = Duration::from_millis(300);
    config.engine.reconnect_grace = Duration::from_secs(600);
    let provider = FakeProvider::new("local").handing_launches_to(launches_tx);
    let cp = start_control_plane(config, Stores::memory(), Arc::new(provider), 4).await;
    let mut events = cp.watch_events(0);
    let ctx = ctx("corr-live");
    let spec = RawJobSpec {
        command: Some(vec!["true".into()]),
        ..Default::default()
    };
    let job = cp.submit(spec, &ctx).await.unwrap();

    // Play the agent: register, take the job, acknowledge it.
    let (w, mut rx) = register(&cp, launches.recv().await.unwrap()).await;
    let attempt = next_run(&mut rx).await;
    cp.worker_message(
        w,
        FromWorker::Ack {
            job: job.id,
            attempt,
        },
    )
    .await
    .unwrap();

    // Silent (no heartbeat): the timeout disconnects it.
    next_matching(
        &mut events,
        "WorkerDisconnected",
        |e| matches!(&e.body, EventBody::WorkerDisconnected { worker_id, .. } if *worker_id == w),
    )
    .await;

    // Output on its session is a sign of life.
    let line = NewLogLine {
        agent_seq: 1,
        stream: LogStream::Stdout,
        at: now_utc(),
        text: "still here".into(),
    };
    cp.worker_message(
        w,
        FromWorker::Logs {
            job: job.id,
            attempt,
            lines: vec![line],
        },
    )
    .await
    .unwrap();
    next_matching(
        &mut events,
        "WorkerReconnected",
        |e| matches!(&e.body, EventBody::WorkerReconnected { worker_id, .. } if *worker_id == w),
    )
    .await;

    cp.worker_message(w, exited_ok(job.id, attempt))
        .await
        .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), cp.wait_terminal(job.id))
        .await
        .expect("the job ends")
        .unwrap();
    assert_eq!(done.state(), JobState::Succeeded);
    let lines: Vec<String> = cp
        .follow_logs(job.id, 0)
        .map(|l| l.unwrap().text)
        .collect()
        .await;
    assert_eq!(lines, vec!["still here"]);
    cp.shutdown().await;
}

#[tokio::test]
async fn a_typed_capacity_refusal_gives_the_attempt_back() {
    let (launches_tx, mut launches) = mpsc::unbounded_channel();
    let provider = FakeProvider::new("local").handing_launches_to(launches_tx);
    let cp = start_control_plane(
        RuntimeConfig::default(),
        Stores::memory(),
        Arc::new(provider),
        1,
    )
    .await;
    let mut events = cp.watch_events(0);
    let ctx = ctx("corr-refuse");
    let spec = RawJobSpec {
        command: Some(vec!["true".into()]),
        max_attempts: Some(1),
        ..Default::default()
    };
    let job = cp.submit(spec, &ctx).await.unwrap();
    let (w, mut rx) = register(&cp, launches.recv().await.unwrap()).await;
    let attempt = next_run(&mut rx).await;
    cp.worker_message(
        w,
        FromWorker::Refused {
            job: job.id,
            attempt,
            code: RefusalCode::AtCapacity,
            reason: "worker is at capacity (1 running)".into(),
        },
    )
    .await
    .unwrap();
    // Requeued in the same attempt (its only one), not failed.
    let id = job.id.to_string();
    next_matching(&mut events, "JobDispatchFailed", |e| {
        matches!(&e.body, EventBody::JobDispatchFailed { .. })
    })
    .await;
    let next = next_matching(&mut events, "job event", |e| e.aggregate_id == id).await;
    assert_eq!(next.event_type(), "JobQueued");
    let now = cp.job(job.id).await.unwrap();
    assert!(!now.is_terminal(), "{:?}", now.state());
    assert!(now.attempts.is_empty(), "{:?}", now.attempts);

    cp.shutdown().await;
}

#[tokio::test]
async fn an_ack_that_waited_for_a_held_up_driver_beats_the_deadline_it_met() {
    let (launches_tx, mut launches) = mpsc::unbounded_channel();
    let mem = Arc::new(MemoryStore::new());
    let jobs = Arc::new(HeldJobs::new(mem.clone()));
    let mut config = RuntimeConfig::default();
    config.engine.dispatch_timeout = Duration::from_millis(300);
    let provider = FakeProvider::new("local").handing_launches_to(launches_tx);
    let cp = start_control_plane(
        config,
        Stores {
            jobs: jobs.clone(),
            ..Stores::from_store(mem)
        },
        Arc::new(provider),
        4,
    )
    .await;
    let ctx = ctx("corr-held");
    let spec = RawJobSpec {
        command: Some(vec!["true".into()]),
        max_attempts: Some(1),
        ..Default::default()
    };
    let job = cp.submit(spec.clone(), &ctx).await.unwrap();
    let (w, mut rx) = register(&cp, launches.recv().await.unwrap()).await;
    let attempt = next_run(&mut rx).await;

    // The store holds the driver up (another submission's write) while
    // the acknowledgement arrives and the dispatch deadline passes.
    jobs.hold_creates.send_replace(true);
    let other = {
        let (cp, ctx) = (cp.clone(), ctx.clone());
        tokio::spawn(async move { cp.submit(spec, &ctx).await })
    };
    tokio::time::timeout(Duration::from_secs(30), jobs.held.notified())
        .await
        .expect("the driver's pass waits on the store");
    cp.worker_message(
        w,
        FromWorker::Ack {
            job: job.id,
            attempt,
        },
    )
    .await
    .unwrap();
    // Wall-clock time must pass for the deadline to pass: this wait is
    // the condition under test, not a synchronisation.
    tokio::time::sleep(Duration::from_millis(600)).await;
    jobs.hold_creates.send_replace(false);
    other.await.unwrap().unwrap();

    cp.worker_message(w, exited_ok(job.id, attempt))
        .await
        .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), cp.wait_terminal(job.id))
        .await
        .expect("the job ends")
        .unwrap();
    let types: Vec<String> = cp
        .job_events(job.id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_type().to_owned())
        .collect();
    assert_eq!(done.state(), JobState::Succeeded, "{types:?}");
    assert!(!types.iter().any(|t| t == "JobDispatchFailed"), "{types:?}");
    cp.shutdown().await;
}

/// A log store whose first append waits until released, and which records
/// whether an append of a job ever started while another was in flight.
struct HeldLogs {
    inner: Arc<MemoryStore>,
    release: tokio::sync::watch::Receiver<bool>,
    entered: std::sync::atomic::AtomicUsize,
    in_flight: std::sync::atomic::AtomicUsize,
    overlapped: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl hodei_core::ports::LogStore for HeldLogs {
    async fn append(
        &self,
        job: hodei_core::ids::JobId,
        attempt: u32,
        lines: Vec<NewLogLine>,
    ) -> Result<u64, hodei_core::ports::StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.in_flight.fetch_add(1, SeqCst) > 0 {
            self.overlapped.store(true, SeqCst);
        }
        if self.entered.fetch_add(1, SeqCst) == 0 {
            let mut release = self.release.clone();
            let _ = release.wait_for(|r| *r).await;
        }
        let r = self.inner.append(job, attempt, lines).await;
        self.in_flight.fetch_sub(1, SeqCst);
        r
    }

    async fn read(
        &self,
        job: hodei_core::ids::JobId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<hodei_core::ports::LogLine>, hodei_core::ports::StoreError> {
        self.inner.read(job, after, limit).await
    }

    async fn finish(
        &self,
        job: hodei_core::ids::JobId,
    ) -> Result<(), hodei_core::ports::StoreError> {
        self.inner.finish(job).await
    }

    fn follow(
        &self,
        job: hodei_core::ids::JobId,
        after: u64,
    ) -> BoxStream<'static, Result<hodei_core::ports::LogLine, hodei_core::ports::StoreError>> {
        self.inner.follow(job, after)
    }
}

/// A worker session ends while its job's lines are still being stored
/// (the store is slow), the worker reconnects and sends the next lines:
/// they are stored after the first ones, never alongside them, so none is
/// lost to the store's de-duplication and the order is kept.
#[tokio::test]
async fn lines_of_a_new_session_wait_for_the_old_session_s_lines_to_be_stored() {
    use std::sync::atomic::Ordering::SeqCst;
    let (launches_tx, mut launches) = mpsc::unbounded_channel();
    let mut config = RuntimeConfig::default();
    config.engine.reconnect_grace = Duration::from_secs(600);
    let mem = Arc::new(MemoryStore::new());
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let held = Arc::new(HeldLogs {
        inner: mem.clone(),
        release,
        entered: Default::default(),
        in_flight: Default::default(),
        overlapped: Default::default(),
    });
    let mut stores = Stores::from_store(mem.clone());
    stores.logs = held.clone();
    let provider = FakeProvider::new("local").handing_launches_to(launches_tx);
    let cp = start_control_plane(config, stores, Arc::new(provider), 4).await;
    let ctx = ctx("corr-pipes");
    let spec = RawJobSpec {
        command: Some(vec!["true".into()]),
        ..Default::default()
    };
    let job = cp.submit(spec, &ctx).await.unwrap();
    let launch = launches.recv().await.unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let welcome = cp
        .worker_hello(
            hello(launch.worker, launch.token, Vec::new()),
            Arc::new(ChanLink(tx)),
        )
        .await
        .unwrap();
    let w = launch.worker;
    let attempt = next_run(&mut rx).await;
    cp.worker_message(
        w,
        FromWorker::Ack {
            job: job.id,
            attempt,
        },
    )
    .await
    .unwrap();
    let lines = |seqs: std::ops::RangeInclusive<u64>| {
        seqs.map(|n| NewLogLine {
            agent_seq: n,
            stream: LogStream::Stdout,
            at: now_utc(),
            text: format!("line {n}"),
        })
        .collect::<Vec<_>>()
    };
    // Session 1: lines 1–3; their append is held.
    cp.worker_message(
        w,
        FromWorker::Logs {
            job: job.id,
            attempt,
            lines: lines(1..=3),
        },
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        while held.entered.load(SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the first append starts");
    cp.worker_gone(w, welcome.session, "stream reset").await;

    // Session 2: the worker is back with the next lines.
    let (tx2, _rx2) = mpsc::unbounded_channel();
    cp.worker_hello(
        hello(w, welcome.resume_token, vec![(job.id, attempt)]),
        Arc::new(ChanLink(tx2)),
    )
    .await
    .unwrap();
    cp.worker_message(
        w,
        FromWorker::Logs {
            job: job.id,
            attempt,
            lines: lines(4..=6),
        },
    )
    .await
    .unwrap();
    // Half a second for a second append to start (it must not, while the
    // first is held), then the store is released.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while held.entered.load(SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    release_tx.send(true).unwrap();
    let report = AttemptReport {
        exit_code: Some(0),
        ..AttemptReport::default()
    };
    cp.worker_message(
        w,
        FromWorker::Result {
            job: job.id,
            attempt,
            report,
        },
    )
    .await
    .unwrap();
    let done = cp.wait_terminal(job.id).await.unwrap();
    assert_eq!(done.state(), JobState::Succeeded, "{done:?}");
    let stored: Vec<String> = cp
        .read_logs(job.id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    let want: Vec<String> = (1..=6).map(|n| format!("line {n}")).collect();
    assert_eq!(stored, want);
    assert!(
        !held.overlapped.load(SeqCst),
        "two appends of the job ran at once"
    );
}

/// A queue that counts the claims made through it.
struct CountedClaims {
    inner: Arc<MemoryStore>,
    claims: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl JobQueue for CountedClaims {
    async fn claim(
        &self,
        owner: &str,
        now: Timestamp,
        limit: usize,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        self.claims
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.claim(owner, now, limit, lease).await
    }
    async fn release(&self, id: JobId, owner: &str) -> Result<(), StoreError> {
        self.inner.release(id, owner).await
    }
    async fn depth(&self) -> Result<u64, StoreError> {
        self.inner.depth().await
    }
    async fn overdue(&self, now: Timestamp, limit: usize) -> Result<Vec<Job>, StoreError> {
        self.inner.overdue(now, limit).await
    }
}

/// A claim waits only for the effects of its pass that can put a job in
/// the queue, not for the others: when a worker's job ends, the claim of
/// its next job is made while the ending is still being stored (the store
/// holds it), so the two writes overlap instead of following each other.
#[tokio::test]
async fn a_claim_does_not_wait_for_a_job_s_ending_to_be_stored() {
    let (launches_tx, mut launches) = mpsc::unbounded_channel();
    let mem = Arc::new(MemoryStore::new());
    let jobs = Arc::new(HeldJobs::new(mem.clone()));
    let queue = Arc::new(CountedClaims {
        inner: mem.clone(),
        claims: Default::default(),
    });
    let provider = FakeProvider::new("local").handing_launches_to(launches_tx);
    // One reusable worker: the second job waits for the first one's slot.
    let mut setup = ProviderConfig::ephemeral("local", "local", false, 1);
    setup.ephemeral = false;
    let cp = start_control_plane_with(
        RuntimeConfig::default(),
        Stores {
            jobs: jobs.clone(),
            queue: queue.clone(),
            ..Stores::from_store(mem)
        },
        Arc::new(provider),
        setup,
    )
    .await;
    let ctx = ctx("corr-claim");
    let spec = RawJobSpec {
        command: Some(vec!["true".into()]),
        max_attempts: Some(1),
        ..Default::default()
    };
    let first = cp.submit(spec.clone(), &ctx).await.unwrap();
    let (w, mut rx) = register(&cp, launches.recv().await.unwrap()).await;
    let attempt = next_run(&mut rx).await;
    // The only worker is busy: the second job waits in the queue.
    let second = cp.submit(spec, &ctx).await.unwrap();
    cp.worker_message(
        w,
        FromWorker::Ack {
            job: first.id,
            attempt,
        },
    )
    .await
    .unwrap();

    // Two calls through the driver: the second is handled after every
    // pass the earlier messages caused (the second job's claim and
    // release among them) is done.
    cp.workers().await.unwrap();
    cp.workers().await.unwrap();
    jobs.hold_endings.send_replace(true);
    let before = queue.claims.load(std::sync::atomic::Ordering::SeqCst);
    cp.worker_message(w, exited_ok(first.id, attempt))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), jobs.held.notified())
        .await
        .expect("the first job's ending waits in the store");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while queue.claims.load(std::sync::atomic::Ordering::SeqCst) == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no claim was made while the ending was held"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    jobs.hold_endings.send_replace(false);

    // The second job runs on the freed worker, and both end well.
    let attempt = next_run(&mut rx).await;
    for message in [
        FromWorker::Ack {
            job: second.id,
            attempt,
        },
        exited_ok(second.id, attempt),
    ] {
        cp.worker_message(w, message).await.unwrap();
    }
    for id in [first.id, second.id] {
        let done = tokio::time::timeout(Duration::from_secs(30), cp.wait_terminal(id))
            .await
            .expect("the job ends")
            .unwrap();
        assert_eq!(done.state(), JobState::Succeeded, "{done:?}");
    }
    cp.shutdown().await;
}
