//! Hand-written engine scenarios: the happy paths step by step, and one
//! regression test per bug the simulation found (each failed before its
//! fix).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hodei_core::engine::{
    AttemptReport, Effect, Engine, EngineConfig, ProviderConfig, RefusalCode, Registration,
    SeededEntropy,
};
use hodei_core::event::DomainEvent;
use hodei_core::ids::{JobId, ProviderId, WorkerId};
use hodei_core::job::{Job, JobState};
use hodei_core::time::{Timestamp, add, from_millis};
use hodei_core::worker::WorkerState;

use support::{FakeStore, Update, check_invariants, check_next_deadline, ctx, spec};

/// A synchronous shell: every effect is carried out against the fake
/// store right away; provisions, dispatches, cancels, drains and destroys
/// are recorded for the test to look at.
struct Shell {
    engine: Engine,
    store: FakeStore,
    now: Timestamp,
    submitted: Vec<JobId>,
    provisions: Vec<(ProviderId, WorkerId, Option<JobId>)>,
    dispatches: Vec<(WorkerId, JobId, u32)>,
    cancels: Vec<(WorkerId, JobId, u32)>,
    drains: Vec<WorkerId>,
    destroyed: Vec<WorkerId>,
    /// Updates in the order they reached the store: (job, expected, new
    /// version, event types).
    updates: Vec<(JobId, u64, u64, Vec<&'static str>)>,
    conflicts: usize,
    claims: usize,
}

impl Shell {
    fn new(config: EngineConfig, providers: Vec<ProviderConfig>) -> Self {
        let mut shell = Self {
            engine: Engine::new(config, providers, Box::new(SeededEntropy::new(99))),
            store: FakeStore::new(),
            now: from_millis(1_000_000),
            submitted: Vec::new(),
            provisions: Vec::new(),
            dispatches: Vec::new(),
            cancels: Vec::new(),
            drains: Vec::new(),
            destroyed: Vec::new(),
            updates: Vec::new(),
            conflicts: 0,
            claims: 0,
        };
        shell.drain();
        shell
    }

    fn eph(max: u32) -> Self {
        Self::new(
            EngineConfig::default(),
            vec![ProviderConfig::ephemeral("eph", "local", false, max)],
        )
    }

    /// Moves time on by `d`, ticking at every deadline on the way, as a
    /// shell must.
    fn advance(&mut self, d: Duration) {
        let target = add(self.now, d);
        while let Some(at) = self.engine.next_deadline() {
            if at > target {
                break;
            }
            self.now = self.now.max(at);
            self.tick();
        }
        self.now = target;
    }

    fn submit(&mut self, spec: hodei_core::spec::JobSpec) -> JobId {
        let id = self
            .engine
            .handle_submit(self.now, spec, &ctx("req-submit", "user:alice"))
            .expect("valid spec");
        self.submitted.push(id);
        self.drain();
        id
    }

    fn register(&mut self, worker: WorkerId, provider: &str, running: Vec<(JobId, u32)>) {
        let reg = Registration {
            worker,
            provider: ProviderId::new(provider),
            labels: BTreeMap::new(),
            image: None,
            capacity: 1,
            running,
        };
        self.engine
            .handle_registered(self.now, reg, Vec::new())
            .expect("registration accepted");
        self.drain();
    }

    fn tick(&mut self) {
        self.engine.handle_tick(self.now);
        self.drain();
    }

    fn drain(&mut self) {
        let mut n = 0;
        while let Some(effect) = self.engine.poll_effect() {
            n += 1;
            assert!(n < 10_000, "the engine spins (last effect: {effect:?})");
            match effect {
                Effect::CreateJob { job, events } => self.store.create(job, events).unwrap(),
                Effect::UpdateJob {
                    job,
                    expected_version,
                    events,
                } => {
                    let types = events.iter().map(DomainEvent::event_type).collect();
                    self.updates
                        .push((job.id, expected_version, job.version, types));
                    match self.store.update(job, expected_version, events).unwrap() {
                        Update::Stored => {}
                        Update::Conflict(current) => {
                            self.conflicts += 1;
                            self.engine.handle_job_changed(self.now, *current);
                        }
                    }
                }
                Effect::Record(events) => self.store.record(events).unwrap(),
                Effect::SaveWorker(w) => self.store.save_worker(w),
                Effect::Claim { limit, lease } => {
                    self.claims += 1;
                    let claim = self.store.claim(self.now, limit, lease);
                    self.engine.handle_claimed(self.now, Some(claim), limit);
                }
                Effect::Release(id) => self.store.release(id).unwrap(),
                Effect::Provision { provider, launch } => {
                    self.provisions.push((provider, launch.worker, launch.job));
                }
                Effect::Dispatch { worker, job } => {
                    if self.engine.holds(worker, job.id, job.attempt) {
                        self.dispatches.push((worker, job.id, job.attempt));
                    }
                }
                Effect::CancelOnWorker {
                    worker,
                    job,
                    attempt,
                    ..
                } => self.cancels.push((worker, job, attempt)),
                Effect::DrainWorker(w) => self.drains.push(w),
                Effect::DestroyWorker { worker, .. } => self.destroyed.push(worker),
            }
        }
        self.check();
    }

    fn check(&self) {
        if let Err(e) = check_invariants(
            &self.engine,
            &self.store,
            &self.submitted,
            &BTreeSet::new(),
            self.now,
        )
        .and_then(|()| check_next_deadline(self.engine.next_deadline(), self.now))
        {
            panic!("invariant broken: {e}");
        }
    }

    fn job(&self, id: JobId) -> &Job {
        self.store.job(id).expect("stored")
    }

    fn events_of(&self, id: JobId) -> Vec<&'static str> {
        self.store.job_events(id).map(|e| e.event_type()).collect()
    }

    fn succeed(&mut self, worker: WorkerId, job: JobId, attempt: u32) {
        let report = AttemptReport {
            exit_code: Some(0),
            ..AttemptReport::default()
        };
        self.engine
            .handle_result(self.now, worker, job, attempt, report)
            .expect("result accepted");
        self.drain();
    }
}

fn w(n: u64) -> WorkerId {
    WorkerId::from_u64_pair(0xAB, n)
}

/// The ephemeral happy path, effect by effect: submit, provision,
/// register, dispatch, ack, succeed, destroy.
#[test]
fn ephemeral_worker_runs_its_job_first_time() {
    let mut s = Shell::eph(2);
    let job = s.submit(spec(1, 30, false, 0, None, None));
    assert_eq!(s.job(job).state(), JobState::Scheduled);
    let (_, worker, for_job) = s.provisions[0].clone();
    assert_eq!(for_job, Some(job));
    s.engine.handle_provisioned(s.now, worker);
    s.drain();
    s.advance(Duration::from_secs(1));
    // Regression: the registration of the worker provisioned for a
    // SCHEDULED job used to fail that job as "lost" (it is not running
    // there yet) and destroy the worker.
    s.register(worker, "eph", Vec::new());
    assert_eq!(s.job(job).state(), JobState::Assigned);
    assert_eq!(s.dispatches, vec![(worker, job, 1)]);
    assert!(s.destroyed.is_empty());
    s.engine.handle_ack(s.now, worker, job, 1).unwrap();
    s.drain();
    assert_eq!(s.job(job).state(), JobState::Running);
    s.advance(Duration::from_secs(3));
    s.succeed(worker, job, 1);
    assert_eq!(s.job(job).state(), JobState::Succeeded);
    assert_eq!(s.job(job).attempt, 1);
    assert_eq!(
        s.destroyed,
        vec![worker],
        "an ephemeral worker goes with its job"
    );
    assert_eq!(
        s.events_of(job),
        [
            "JobCreated",
            "JobQueued",
            "JobScheduled",
            "WorkerProvisioningRequested",
            "JobAssigned",
            "JobStarted",
            "JobSucceeded"
        ]
    );
    assert!(s.engine.worker(worker).is_none());
}

/// Regression: a job that fits no provider right now was released and
/// claimed again at once, forever, inside one drain.
#[test]
fn a_job_without_room_waits_instead_of_spinning() {
    let pool = ProviderConfig {
        min_workers: 0,
        ephemeral: false,
        ..ProviderConfig::ephemeral("pool", "local", false, 1)
    };
    let mut s = Shell::new(
        EngineConfig::default(),
        vec![pool, ProviderConfig::ephemeral("eph", "local", false, 1)],
    );
    // The only pool slot is taken by a job that is being provisioned.
    let first = s.submit(spec(1, 30, false, 0, Some("pool"), None));
    assert_eq!(s.job(first).state(), JobState::Scheduled);
    // This one needs the pool too; the eph provider has room for one, so
    // the engine claims one job (a full claim: there may be more), finds
    // the pool full and gives it back.
    let second = s.submit(spec(1, 30, false, 0, Some("pool"), None));
    assert_eq!(s.job(second).state(), JobState::Pending);
    assert!(s.store.is_queued(second));
    let claims = s.claims;
    assert!(claims <= 3, "{claims} claims for two submissions");
    // It is polled again later, not in a loop.
    s.advance(Duration::from_millis(1500));
    s.tick();
    assert!(s.claims - claims <= 2);
    assert_eq!(s.job(second).state(), JobState::Pending);
}

/// Regression: a result that overtook its acknowledgement went out as two
/// updates (start, then exit), the second based on a version the store
/// had not confirmed; a concurrent cancel committing that very version
/// number was then overwritten. Now both go out as one unit.
#[test]
fn start_and_exit_decided_together_commit_as_one() {
    let mut s = Shell::eph(1);
    let job = s.submit(spec(1, 30, false, 0, None, None));
    let worker = s.provisions[0].1;
    s.register(worker, "eph", Vec::new());
    let v = s.job(job).version;
    // Someone else cancels the job in the store (another replica).
    s.store
        .cancel_here(s.now, job, &ctx("req-admin", "user:admin"))
        .unwrap()
        .expect("cancellable");
    let updates = s.updates.len();
    // The worker reports success without having acked.
    s.engine
        .handle_result(
            s.now,
            worker,
            job,
            1,
            AttemptReport {
                exit_code: Some(0),
                ..AttemptReport::default()
            },
        )
        .unwrap();
    s.drain();
    let sent: Vec<_> = s.updates[updates..].to_vec();
    assert_eq!(
        sent,
        vec![(job, v, v + 2, vec!["JobStarted", "JobSucceeded"])],
        "one update for both transitions"
    );
    assert_eq!(s.conflicts, 1);
    assert_eq!(s.job(job).state(), JobState::Cancelled, "the cancel stands");
}

/// Regression: the job events of a worker's reconnect (attempts it came
/// back without) carried the worker's correlation id.
#[test]
fn reconnect_failures_keep_the_job_correlation() {
    let mut s = Shell::eph(1);
    let job = s.submit(spec(3, 30, false, 0, None, None));
    let worker = s.provisions[0].1;
    s.register(worker, "eph", Vec::new());
    s.engine.handle_ack(s.now, worker, job, 1).unwrap();
    s.drain();
    s.engine.handle_disconnected(s.now, worker, "reset");
    s.drain();
    s.advance(Duration::from_secs(1));
    // Back, but without the attempt: lost with the connection.
    s.register(worker, "eph", Vec::new());
    let j = s.job(job);
    assert_eq!(j.state(), JobState::Pending);
    assert_eq!(j.attempt, 2);
    for e in s.store.job_events(job) {
        assert_eq!(e.correlation_id, j.correlation_id, "{}", e.event_type());
    }
}

/// Regression: a drain requested while the worker's stream was down was
/// lost with it; the worker never left and its provider slot stayed taken.
/// Also: an idle draining worker that disconnects is destroyed, so that no
/// agent outlives the engine's record of it.
#[test]
fn drain_survives_a_reconnect_and_ends_in_destroy() {
    let pool = ProviderConfig {
        min_workers: 0,
        ephemeral: false,
        ..ProviderConfig::ephemeral("pool", "local", false, 2)
    };
    let mut s = Shell::new(EngineConfig::default(), vec![pool]);
    let worker = w(1);
    s.register(worker, "pool", Vec::new());
    s.engine.handle_disconnected(s.now, worker, "reset");
    s.drain();
    s.engine
        .handle_draining(s.now, worker, Some(&ctx("req-drain", "user:ops")))
        .unwrap();
    s.drain();
    assert_eq!(s.drains, vec![worker]);
    s.register(worker, "pool", Vec::new());
    assert_eq!(
        s.drains,
        vec![worker, worker],
        "drain re-sent on the new stream"
    );
    assert_eq!(
        s.engine.worker(worker).map(|w| w.state),
        Some(WorkerState::Draining)
    );
    s.engine.handle_disconnected(s.now, worker, "drained");
    s.drain();
    assert!(s.engine.worker(worker).is_none());
    assert_eq!(s.destroyed, vec![worker]);
}

/// Regression: a job submitted while every provider was full waited for
/// an input that might never come: the poll of the queue was only armed by
/// a first tick, and a worker leaving did not trigger a claim.
#[test]
fn a_job_waiting_for_room_is_claimed_when_room_frees_up() {
    let mut s = Shell::eph(1);
    let first = s.submit(spec(1, 30, false, 0, None, None));
    let worker = s.provisions[0].1;
    s.register(worker, "eph", Vec::new());
    s.engine.handle_ack(s.now, worker, first, 1).unwrap();
    s.drain();
    let second = s.submit(spec(1, 30, false, 0, None, None));
    assert_eq!(s.job(second).state(), JobState::Pending);
    s.advance(Duration::from_secs(2));
    s.succeed(worker, first, 1);
    // The ephemeral worker is gone: its provider has room for the second.
    assert_eq!(s.job(second).state(), JobState::Scheduled);
    assert_eq!(s.provisions.len(), 2);
}

/// Regression: with nothing else pending, the engine never asked for a
/// tick, so the queue was never polled again.
#[test]
fn the_queue_poll_is_armed_without_a_first_tick() {
    let mut s = Shell::eph(0);
    assert_eq!(s.engine.next_deadline(), None, "nothing to do yet");
    let job = s.submit(spec(1, 30, false, 0, None, None));
    assert_eq!(s.job(job).state(), JobState::Pending);
    let wake = s
        .engine
        .next_deadline()
        .expect("a poll of the queue is due");
    assert!(wake > s.now);
}

/// A cancel while running stops the attempt on its worker; the worker's
/// late report is refused and changes nothing.
#[test]
fn cancel_stops_the_worker_and_late_reports_are_refused() {
    let mut s = Shell::eph(1);
    let job = s.submit(spec(1, 30, false, 0, None, None));
    let worker = s.provisions[0].1;
    s.register(worker, "eph", Vec::new());
    s.engine.handle_ack(s.now, worker, job, 1).unwrap();
    s.drain();
    let cancelled = s
        .engine
        .handle_cancel(s.now, job, &ctx("req-cancel", "user:bob"))
        .unwrap();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    s.drain();
    assert_eq!(s.cancels, vec![(worker, job, 1)]);
    let version = s.job(job).version;
    let late = s.engine.handle_result(
        s.now,
        worker,
        job,
        1,
        AttemptReport {
            exit_code: Some(0),
            ..AttemptReport::default()
        },
    );
    assert!(late.is_err());
    s.drain();
    assert_eq!(s.job(job).version, version);
    assert_eq!(s.job(job).state(), JobState::Cancelled);
    let cancel = s.store.job_events(job).last().unwrap();
    assert_eq!(cancel.correlation_id.as_str(), "req-cancel");
    assert_eq!(cancel.actor.as_str(), "user:bob");
}

/// Every intermediate state has a deadline, and a tick at it decides.
#[test]
fn deadlines_are_decided_at_the_tick() {
    let mut s = Shell::eph(1);
    let job = s.submit(spec(2, 5, false, 0, None, None));
    let worker = s.provisions[0].1;
    s.register(worker, "eph", Vec::new());
    s.engine.handle_ack(s.now, worker, job, 1).unwrap();
    s.drain();
    let deadline = s.job(job).status.deadline().unwrap();
    assert_eq!(deadline, add(s.now, Duration::from_secs(5)));
    // Ticks before it change nothing.
    while let Some(d) = s.engine.next_deadline() {
        if d >= deadline {
            break;
        }
        s.now = d;
        s.tick();
    }
    assert_eq!(s.job(job).state(), JobState::Running);
    s.now = deadline;
    s.tick();
    let j = s.job(job);
    assert_eq!(
        j.state(),
        JobState::TimedOut,
        "no retry on timeout by default"
    );
    assert_eq!(s.cancels, vec![(worker, job, 1)]);
    let types = s.events_of(job);
    assert_eq!(types.last(), Some(&"JobTimedOut"));
}

/// The fake store the simulation relies on claims like a real queue:
/// priority first, FIFO within a priority, nothing before its
/// `not_before`, each job once, a released job back in its place.
#[test]
fn fake_store_claims_by_priority_then_fifo() {
    use hodei_core::ids::{Actor, CorrelationId};
    use hodei_core::job::{JobCommand, TransitionContext};
    use hodei_core::retry::RetryPolicy;

    let mut store = FakeStore::new();
    let t0 = from_millis(0);
    let mut ids = Vec::new();
    for (n, priority) in [0, 5, 0, 5, -1].into_iter().enumerate() {
        let (job, bodies) = Job::submit(
            JobId::from_u64_pair(7, n as u64),
            spec(2, 10, false, priority, None, None),
            CorrelationId::new("c"),
            Actor::new("a"),
            t0,
        );
        let events = bodies
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                DomainEvent::new(
                    hodei_core::ids::EventId::from_u64_pair(n as u64, i as u64),
                    t0,
                    CorrelationId::new("c"),
                    Actor::new("a"),
                    b,
                )
            })
            .collect();
        ids.push(job.id);
        store.create(job, events).unwrap();
    }
    let lease = Duration::from_secs(30);
    let claim = store.claim(t0, 3, lease);
    let got: Vec<JobId> = claim.jobs.iter().map(|j| j.id).collect();
    assert_eq!(got, vec![ids[1], ids[3], ids[0]]);
    store.release(ids[3]).unwrap();
    assert!(store.release(ids[3]).is_err(), "released twice");
    let claim = store.claim(t0, 10, lease);
    let got: Vec<JobId> = claim.jobs.iter().map(|j| j.id).collect();
    assert_eq!(got, vec![ids[3], ids[2], ids[4]]);

    // A retry waits for its not_before.
    let mut job = store.job(ids[2]).unwrap().clone();
    let v = job.version;
    let policy = RetryPolicy::default();
    let ctx = TransitionContext {
        now: t0,
        retry: &policy,
        unit_random: 0.5,
    };
    job.apply(
        JobCommand::Fail(hodei_core::job::Failure::new(
            hodei_core::job::FailureKind::WorkerLost,
            "gone",
        )),
        ctx,
    )
    .unwrap();
    let events = vec![
        DomainEvent::new(
            hodei_core::ids::EventId::from_u64_pair(99, 1),
            t0,
            CorrelationId::new("c"),
            Actor::new("a"),
            hodei_core::event::EventBody::JobRetryScheduled {
                job_id: job.id,
                failed_attempt: 1,
                next_attempt: 2,
                not_before: add(t0, Duration::from_secs(1)),
                delay_ms: 1000,
                failure: hodei_core::job::Failure::new(
                    hodei_core::job::FailureKind::WorkerLost,
                    "gone",
                ),
            },
        ),
        DomainEvent::new(
            hodei_core::ids::EventId::from_u64_pair(99, 2),
            t0,
            CorrelationId::new("c"),
            Actor::new("a"),
            hodei_core::event::EventBody::JobQueued {
                job_id: job.id,
                attempt: 2,
                priority: 0,
                not_before: Some(add(t0, Duration::from_secs(1))),
            },
        ),
    ];
    assert!(matches!(
        store.update(job, v, events).unwrap(),
        Update::Stored
    ));
    let early = store.claim(add(t0, Duration::from_millis(999)), 10, lease);
    assert!(early.jobs.is_empty());
    assert_eq!(early.next_ready_at, Some(add(t0, Duration::from_secs(1))));
    let on_time = store.claim(add(t0, Duration::from_secs(1)), 10, lease);
    assert_eq!(on_time.jobs.len(), 1);
    assert_eq!(on_time.jobs[0].id, ids[2]);
}

/// Regression: after a restart (or a replica's death) a reconnecting
/// worker was only adopted with the attempts it reported. An attempt
/// whose result was lost with the old server stayed RUNNING until its
/// deadline and ended TIMED_OUT; an ASSIGNED one whose acknowledgement was
/// lost was failed at its dispatch deadline while the worker ran it. Now
/// the store's record of what the worker holds is adopted too: unreported
/// attempts are lost (and retried) at once, reported ASSIGNED ones count
/// as acknowledged.
#[test]
fn a_restarted_engine_adopts_what_a_reconnecting_worker_holds() {
    let pool = ProviderConfig {
        min_workers: 0,
        ephemeral: false,
        ..ProviderConfig::ephemeral("pool", "local", false, 2)
    };
    let mut s = Shell::new(EngineConfig::default(), vec![pool.clone()]);
    let (a, b) = (w(1), w(2));
    s.register(a, "pool", Vec::new());
    s.register(b, "pool", Vec::new());
    let j1 = s.submit(spec(3, 30, false, 0, None, None));
    let j2 = s.submit(spec(3, 30, false, 0, None, None));
    let on = |s: &Shell, job: JobId| {
        s.dispatches
            .iter()
            .find(|(_, j, _)| *j == job)
            .map(|(w, _, _)| *w)
            .expect("dispatched")
    };
    let (wa, wb) = (on(&s, j1), on(&s, j2));
    assert_ne!(wa, wb);
    s.engine.handle_ack(s.now, wa, j1, 1).unwrap();
    s.drain();
    assert_eq!(s.job(j1).state(), JobState::Running);
    assert_eq!(s.job(j2).state(), JobState::Assigned);

    // The server dies; a new engine starts on the same store. wa's result
    // for j1 was lost with the old server; wb runs j2, its ack lost.
    s.engine = Engine::new(
        EngineConfig::default(),
        vec![pool],
        Box::new(SeededEntropy::new(7)),
    );
    let submitted = std::mem::take(&mut s.submitted);
    s.advance(Duration::from_secs(6));
    for (worker, running, holds) in [(wa, vec![], j1), (wb, vec![(j2, 1)], j2)] {
        let reg = Registration {
            worker,
            provider: ProviderId::new("pool"),
            labels: BTreeMap::new(),
            image: None,
            capacity: 1,
            running,
        };
        let adoptable = vec![s.job(holds).clone()];
        s.engine
            .handle_registered(s.now, reg, adoptable)
            .expect("registration accepted");
        s.drain();
    }
    s.submitted = submitted;
    s.check();
    let j2_now = s.job(j2);
    assert_eq!(j2_now.state(), JobState::Running, "the report acknowledges");
    assert_eq!(j2_now.attempt, 1);
    let j1_now = s.job(j1);
    assert_eq!(j1_now.attempt, 2, "retried at once, not at its deadline");
    assert!(s.events_of(j1).contains(&"JobRetryScheduled"));
    // Past j2's old dispatch deadline nothing more happens to it.
    s.advance(Duration::from_secs(20));
    assert_eq!(s.job(j2).state(), JobState::Running);
    assert_eq!(s.job(j2).attempt, 1);
}

/// After a restart, the worker provisioned for a SCHEDULED job by the old
/// engine registers: the job is handed to it at once (not failed at its
/// provisioning deadline), and the worker stays ephemeral.
#[test]
fn a_restarted_engine_hands_a_scheduled_job_to_its_worker() {
    let mut s = Shell::eph(1);
    let job = s.submit(spec(3, 30, false, 0, None, None));
    assert_eq!(s.job(job).state(), JobState::Scheduled);
    let worker = s.provisions[0].1;
    s.engine = Engine::new(
        EngineConfig::default(),
        vec![ProviderConfig::ephemeral("eph", "local", false, 1)],
        Box::new(SeededEntropy::new(7)),
    );
    let submitted = std::mem::take(&mut s.submitted);
    s.advance(Duration::from_secs(2));
    let reg = Registration {
        worker,
        provider: ProviderId::new("eph"),
        labels: BTreeMap::new(),
        image: None,
        capacity: 1,
        running: Vec::new(),
    };
    let adoptable = vec![s.job(job).clone()];
    s.engine
        .handle_registered(s.now, reg, adoptable)
        .expect("registration accepted");
    s.drain();
    s.submitted = submitted;
    s.check();
    assert_eq!(s.job(job).state(), JobState::Assigned);
    assert_eq!(s.dispatches.last(), Some(&(worker, job, 1)));
    s.engine.handle_ack(s.now, worker, job, 1).unwrap();
    s.drain();
    s.succeed(worker, job, 1);
    assert_eq!(s.job(job).state(), JobState::Succeeded);
    assert_eq!(s.destroyed, vec![worker], "still ephemeral");
}

fn pool(max: u32) -> ProviderConfig {
    ProviderConfig {
        min_workers: 0,
        ephemeral: false,
        ..ProviderConfig::ephemeral("pool", "local", false, max)
    }
}

/// Regression (benchmark): an agent that had sent a result but not yet
/// freed its slot refused the next job "at capacity", and the refusal
/// failed the attempt, so a job with one attempt failed for good. A
/// capacity refusal now gives the attempt back: the job is queued again in
/// the same attempt, and the full worker gets no work until it shows a
/// free slot (here a heartbeat).
#[test]
fn a_capacity_refusal_requeues_the_same_attempt() {
    let mut s = Shell::new(EngineConfig::default(), vec![pool(1)]);
    let worker = w(1);
    s.register(worker, "pool", Vec::new());
    let job = s.submit(spec(1, 30, false, 0, Some("pool"), None));
    assert_eq!(s.dispatches, vec![(worker, job, 1)]);
    s.engine
        .handle_refusal(
            s.now,
            worker,
            job,
            1,
            RefusalCode::AtCapacity,
            "worker is at capacity (1 running)",
        )
        .unwrap();
    s.drain();
    let j = s.job(job);
    assert_eq!(j.state(), JobState::Pending);
    assert_eq!(j.attempt, 1, "no attempt consumed");
    assert!(j.attempts.is_empty(), "nothing recorded in the history");
    assert!(s.store.is_queued(job));
    assert!(s.cancels.is_empty(), "nothing to stop on the worker");
    assert_eq!(
        s.events_of(job),
        [
            "JobCreated",
            "JobQueued",
            "JobAssigned",
            "JobDispatchFailed",
            "JobQueued"
        ]
    );
    let reason = s
        .store
        .job_events(job)
        .find_map(|e| match &e.body {
            hodei_core::event::EventBody::JobDispatchFailed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        reason,
        "worker refused (at_capacity): worker is at capacity (1 running)"
    );
    // The queue is polled, but the full worker is not offered the job.
    s.advance(Duration::from_secs(3));
    assert_eq!(s.dispatches.len(), 1);
    assert_eq!(s.job(job).state(), JobState::Pending);
    // A sign of life: the worker is offered work again, same attempt.
    s.engine.handle_heartbeat(s.now, worker);
    s.drain();
    assert_eq!(s.dispatches, vec![(worker, job, 1), (worker, job, 1)]);
    s.engine.handle_ack(s.now, worker, job, 1).unwrap();
    s.drain();
    s.succeed(worker, job, 1);
    assert_eq!(s.job(job).state(), JobState::Succeeded);
    assert_eq!(s.job(job).attempt, 1);
}

/// A result from a worker that refused for capacity, even for an attempt
/// the engine no longer gives it (the one that kept its slot), means a
/// slot is free: it is offered work at once.
#[test]
fn a_result_frees_a_worker_that_refused_for_capacity() {
    let mut s = Shell::new(EngineConfig::default(), vec![pool(1)]);
    let worker = w(1);
    s.register(worker, "pool", Vec::new());
    let job = s.submit(spec(1, 30, false, 0, Some("pool"), None));
    // Through the text-only path a shell uses (`FromWorker::Refused`).
    s.engine
        .handle_refused(
            s.now,
            worker,
            job,
            1,
            &RefusalCode::AtCapacity.tag("worker is at capacity (1 running)"),
        )
        .unwrap();
    s.drain();
    assert_eq!(s.job(job).state(), JobState::Pending);
    assert_eq!(s.dispatches.len(), 1);
    let other = JobId::from_u64_pair(0xDEAD, 1);
    let stale = s.engine.handle_result(
        s.now,
        worker,
        other,
        1,
        AttemptReport {
            signal: Some(15),
            ..AttemptReport::default()
        },
    );
    assert!(stale.is_err(), "not an attempt of this engine");
    s.drain();
    assert_eq!(s.dispatches, vec![(worker, job, 1), (worker, job, 1)]);
    assert_eq!(s.job(job).state(), JobState::Assigned);
    assert_eq!(s.job(job).attempt, 1);
}

/// A refusal because the worker drains gives the attempt back too; the
/// worker is marked draining and the job goes to another worker.
#[test]
fn a_draining_refusal_requeues_and_marks_the_worker_draining() {
    let mut s = Shell::new(EngineConfig::default(), vec![pool(2)]);
    let first = w(1);
    s.register(first, "pool", Vec::new());
    let job = s.submit(spec(1, 30, false, 0, Some("pool"), None));
    assert_eq!(s.dispatches, vec![(first, job, 1)]);
    s.engine
        .handle_refusal(
            s.now,
            first,
            job,
            1,
            RefusalCode::Draining,
            "worker is draining",
        )
        .unwrap();
    s.drain();
    assert_eq!(
        s.engine.worker(first).map(|w| w.state),
        Some(WorkerState::Draining)
    );
    // Queued again and placed at once: the pool has room for a new
    // worker, provisioned for it in the same attempt.
    assert_eq!(s.job(job).state(), JobState::Scheduled);
    assert_eq!(s.job(job).attempt, 1);
    assert!(s.job(job).attempts.is_empty());
    let second = s.provisions.last().expect("a new worker").1;
    assert_ne!(second, first);
    s.register(second, "pool", Vec::new());
    assert_eq!(s.dispatches, vec![(first, job, 1), (second, job, 1)]);
}

/// Any other refusal still fails the attempt (a dispatch failure, retried
/// by policy): with one attempt, the job fails.
#[test]
fn an_unspecified_refusal_fails_the_attempt() {
    let mut s = Shell::new(EngineConfig::default(), vec![pool(1)]);
    let worker = w(1);
    s.register(worker, "pool", Vec::new());
    let job = s.submit(spec(1, 30, false, 0, Some("pool"), None));
    s.engine
        .handle_refused(s.now, worker, job, 1, "empty job id")
        .unwrap();
    s.drain();
    assert_eq!(s.job(job).state(), JobState::Failed);
    assert_eq!(
        s.events_of(job)[3..],
        ["JobDispatchFailed", "JobFailed", "JobRetryExhausted"]
    );
}

#[test]
fn refusal_codes_survive_the_text_tag() {
    for code in RefusalCode::ALL {
        let tagged = code.tag("worker is busy: really");
        assert_eq!(
            RefusalCode::untag(&tagged),
            (code, "worker is busy: really")
        );
    }
    assert_eq!(
        RefusalCode::untag("plain"),
        (RefusalCode::Unspecified, "plain")
    );
    assert_eq!(
        RefusalCode::untag("[refusal:nonsense] x"),
        (RefusalCode::Unspecified, "[refusal:nonsense] x")
    );
}

/// Regression: when the agent registered before the provider's `create`
/// returned, `WorkerProvisioned` was never recorded. Each worker gets it
/// exactly once, whichever comes first, before its registration.
#[test]
fn worker_provisioned_is_recorded_once_whatever_the_order() {
    for register_first in [false, true] {
        let mut s = Shell::eph(1);
        let job = s.submit(spec(1, 30, false, 0, None, None));
        let worker = s.provisions[0].1;
        if register_first {
            s.register(worker, "eph", Vec::new());
            s.engine.handle_provisioned(s.now, worker);
            s.drain();
        } else {
            s.engine.handle_provisioned(s.now, worker);
            s.drain();
            s.register(worker, "eph", Vec::new());
        }
        assert_eq!(s.job(job).state(), JobState::Assigned);
        // A repeated report changes nothing either.
        s.engine.handle_provisioned(s.now, worker);
        s.drain();
        let id = worker.to_string();
        let types: Vec<&str> = s
            .store
            .events
            .iter()
            .filter(|e| e.aggregate_id == id)
            .map(|e| e.event_type())
            .collect();
        assert_eq!(
            types,
            [
                "WorkerProvisioningRequested",
                "WorkerProvisioned",
                "WorkerRegistered",
                "WorkerReady"
            ],
            "register_first={register_first}"
        );
    }
}

/// An agent reports in `Hello.running` the attempts whose result it has
/// not seen acknowledged. Reporting attempt 1 of a job whose attempt 2 the
/// engine had dispatched to it (lost with the connection) does not make
/// attempt 2 count as running there: it is lost, and attempt 1 stopped.
#[test]
fn a_reported_earlier_attempt_does_not_stand_for_the_current_one() {
    let mut s = Shell::new(EngineConfig::default(), vec![pool(1)]);
    let worker = w(1);
    s.register(worker, "pool", Vec::new());
    let job = s.submit(spec(3, 30, true, 0, Some("pool"), None));
    s.engine.handle_ack(s.now, worker, job, 1).unwrap();
    s.drain();
    let exit_1 = AttemptReport {
        exit_code: Some(1),
        ..AttemptReport::default()
    };
    s.engine
        .handle_result(s.now, worker, job, 1, exit_1)
        .unwrap();
    s.drain();
    assert_eq!(s.job(job).attempt, 2);
    s.advance(Duration::from_secs(5));
    assert_eq!(s.dispatches.last(), Some(&(worker, job, 2)));
    s.engine.handle_disconnected(s.now, worker, "reset");
    s.drain();
    // Back, still holding the unacknowledged result of attempt 1.
    s.register(worker, "pool", vec![(job, 1)]);
    assert!(s.cancels.contains(&(worker, job, 1)));
    let j = s.job(job);
    assert_ne!(j.state(), JobState::Running, "{j:?}");
    assert_eq!(
        j.attempts.len(),
        2,
        "attempt 2 was lost with the connection"
    );
    assert_eq!(j.attempt, 3);
}

// ----- liveness: heartbeat timeouts, revivals, stalls of the shell --------

impl Shell {
    /// The worker's own events, in order.
    fn worker_events(&self, worker: WorkerId) -> Vec<&'static str> {
        let id = worker.to_string();
        self.store
            .events
            .iter()
            .filter(|e| e.aggregate_id == id)
            .map(DomainEvent::event_type)
            .collect()
    }

    /// Moves time on by `d` one second at a time, as a healthy shell
    /// does: `beating` workers heartbeat every 5 s (the runtime's
    /// default interval) and every deadline is ticked as it comes.
    fn advance_beating(&mut self, d: Duration, beating: &[WorkerId]) {
        let target = add(self.now, d);
        let mut second = 0u64;
        while self.now < target {
            self.advance(Duration::from_secs(1).min((target - self.now).to_std().unwrap()));
            second += 1;
            if second.is_multiple_of(5) {
                for &worker in beating {
                    self.engine.handle_heartbeat(self.now, worker);
                    self.drain();
                }
            }
        }
    }

    /// A reusable worker of provider `pool` running `job` (acknowledged).
    fn running_on_pool(&mut self, worker: WorkerId) -> JobId {
        self.register(worker, "pool", Vec::new());
        let job = self.submit(spec(3, 600, false, 0, Some("pool"), None));
        let attempt = self.job(job).attempt;
        assert!(self.dispatches.contains(&(worker, job, attempt)));
        self.engine
            .handle_ack(self.now, worker, job, attempt)
            .unwrap();
        self.drain();
        assert_eq!(self.job(job).state(), JobState::Running);
        job
    }

    fn failure_kinds(&self, job: JobId) -> Vec<hodei_core::job::FailureKind> {
        self.job(job)
            .attempts
            .iter()
            .filter_map(|a| match &a.outcome {
                hodei_core::job::AttemptOutcome::Failed { failure } => Some(failure.kind),
                _ => None,
            })
            .collect()
    }
}

/// Regression (review): a worker the heartbeat timeout disconnected was
/// lost `reconnect_grace` later even though it kept heartbeating on the
/// same session: its job failed as WorkerLost and the agent was destroyed.
/// A heartbeat now revives it: `WorkerReconnected`, back to `BUSY`, its
/// job keeps running, and nothing is lost later.
#[test]
fn a_heartbeat_revives_a_worker_the_heartbeat_timeout_disconnected() {
    let mut s = Shell::new(EngineConfig::default(), vec![pool(1)]);
    let worker = w(1);
    let job = s.running_on_pool(worker);
    // Silent past the heartbeat timeout (15 s), not yet past the grace.
    s.advance_beating(Duration::from_secs(17), &[]);
    let seen = s.engine.worker(worker).expect("not lost yet");
    assert!(!seen.connected, "the heartbeat timeout disconnected it");
    assert_eq!(seen.state, WorkerState::Busy);
    assert_eq!(
        s.worker_events(worker).last(),
        Some(&"WorkerDisconnected"),
        "{:?}",
        s.worker_events(worker)
    );
    // A late heartbeat on the same session.
    s.engine.handle_heartbeat(s.now, worker);
    s.drain();
    let back = s.engine.worker(worker).expect("known");
    assert!(back.connected);
    assert_eq!(back.state, WorkerState::Busy);
    assert_eq!(back.jobs, vec![job]);
    assert!(s.store.workers[&worker].connected, "the revival is saved");
    let reconnected = s
        .store
        .events
        .iter()
        .rev()
        .find_map(|e| match &e.body {
            hodei_core::event::EventBody::WorkerReconnected { worker_id, running }
                if *worker_id == worker =>
            {
                Some(running.clone())
            }
            _ => None,
        })
        .expect("WorkerReconnected recorded");
    assert_eq!(reconnected, vec![job]);
    // Well past the old loss deadline: nothing is lost.
    s.advance_beating(Duration::from_secs(60), &[worker]);
    assert!(s.destroyed.is_empty(), "destroyed: {:?}", s.destroyed);
    assert_eq!(s.job(job).state(), JobState::Running);
    assert_eq!(s.job(job).attempt, 1, "no attempt burnt");
    assert!(
        !s.events_of(job).contains(&"JobFailed")
            && !s.events_of(job).contains(&"JobRetryScheduled"),
        "{:?}",
        s.events_of(job)
    );
    s.succeed(worker, job, 1);
    assert_eq!(s.job(job).state(), JobState::Succeeded);
    assert_eq!(s.job(job).attempt, 1);
    assert!(s.failure_kinds(job).is_empty());
}

/// Any message on the session revives a timed-out worker, not only a
/// heartbeat: here the job's result.
#[test]
fn a_result_revives_a_timed_out_worker_and_counts() {
    let mut s = Shell::new(EngineConfig::default(), vec![pool(1)]);
    let worker = w(1);
    let job = s.running_on_pool(worker);
    s.advance_beating(Duration::from_secs(20), &[]);
    assert!(!s.engine.worker(worker).unwrap().connected);
    s.succeed(worker, job, 1);
    assert_eq!(s.job(job).state(), JobState::Succeeded);
    assert_eq!(s.job(job).attempt, 1);
    let back = s.engine.worker(worker).expect("known");
    assert!(back.connected);
    assert_eq!(back.state, WorkerState::Ready, "its job is done");
    let events = s.worker_events(worker);
    assert!(
        events.ends_with(&["WorkerReconnected", "WorkerReady"]),
        "{events:?}"
    );
    s.advance_beating(Duration::from_secs(60), &[worker]);
    assert!(s.destroyed.is_empty());
}

/// A dropped stream ends the session: a late message from it (reordered
/// in the shell) does not bring the worker back; only a registration
/// does, and without one it is lost after the grace.
#[test]
fn a_dropped_stream_is_not_undone_by_a_late_message() {
    let mut s = Shell::new(EngineConfig::default(), vec![pool(1)]);
    let worker = w(1);
    let job = s.running_on_pool(worker);
    s.engine
        .handle_disconnected(s.now, worker, "connection reset");
    s.drain();
    s.advance_beating(Duration::from_secs(2), &[]);
    s.engine.handle_heartbeat(s.now, worker);
    s.drain();
    assert!(!s.engine.worker(worker).unwrap().connected);
    assert!(!s.worker_events(worker).contains(&"WorkerReconnected"));
    s.advance_beating(Duration::from_secs(10), &[]);
    assert!(s.engine.worker(worker).is_none(), "lost after the grace");
    assert_eq!(s.destroyed, vec![worker]);
    assert_eq!(
        s.failure_kinds(job),
        vec![hodei_core::job::FailureKind::WorkerLost]
    );
}

/// A timed-out worker that then loses its stream is no longer revived
/// by messages (its session is over), and keeps its loss deadline.
#[test]
fn a_stream_drop_after_a_timeout_ends_the_session() {
    let mut s = Shell::new(EngineConfig::default(), vec![pool(1)]);
    let worker = w(1);
    let job = s.running_on_pool(worker);
    s.advance_beating(Duration::from_secs(16), &[]);
    assert!(!s.engine.worker(worker).unwrap().connected);
    s.engine.handle_disconnected(s.now, worker, "stream closed");
    s.drain();
    s.engine.handle_heartbeat(s.now, worker);
    s.drain();
    assert!(!s.engine.worker(worker).unwrap().connected);
    s.advance_beating(Duration::from_secs(10), &[]);
    assert!(s.engine.worker(worker).is_none());
    assert_eq!(
        s.failure_kinds(job),
        vec![hodei_core::job::FailureKind::WorkerLost]
    );
}

/// A worker that really is silent is still timed out and lost, and its
/// job fails as WorkerLost (retried): the revival needs a message.
#[test]
fn a_silent_worker_is_still_lost() {
    let mut s = Shell::new(EngineConfig::default(), vec![pool(1)]);
    let worker = w(1);
    let job = s.running_on_pool(worker);
    // Timeout at 15 s, loss 10 s later; the shell ticks as it should.
    s.advance_beating(Duration::from_secs(14), &[]);
    assert!(s.engine.worker(worker).unwrap().connected);
    s.advance_beating(Duration::from_secs(2), &[]);
    assert!(!s.engine.worker(worker).unwrap().connected);
    s.advance_beating(Duration::from_secs(9), &[]);
    assert!(
        s.engine.worker(worker).is_none(),
        "lost 25 s after its last sign of life"
    );
    assert_eq!(s.destroyed, vec![worker]);
    assert_eq!(
        s.failure_kinds(job),
        vec![hodei_core::job::FailureKind::WorkerLost]
    );
    assert_eq!(
        s.worker_events(worker)
            .iter()
            .filter(|e| **e == "WorkerReconnected")
            .count(),
        0
    );
    // A heartbeat from the forgotten worker changes nothing.
    s.engine.handle_heartbeat(s.now, worker);
    s.drain();
    assert!(s.engine.worker(worker).is_none());
}

/// Regression (review): after a stall of the shell longer than the
/// heartbeat timeout plus the grace (the driver waited on a dead store),
/// the first tick declared every worker silent, then lost, although
/// their heartbeats were queued right behind it. A tick that ends a stall
/// times no worker out and loses none; the queued heartbeats are taken,
/// and only a worker that stays silent is timed out, one heartbeat
/// timeout after the stall.
#[test]
fn a_late_tick_after_a_stall_loses_no_worker_that_heartbeats_right_after() {
    let mut s = Shell::new(EngineConfig::default(), vec![pool(4)]);
    let (a, b, c, d) = (w(1), w(2), w(3), w(4));
    let job_a = s.running_on_pool(a);
    let job_c = s.running_on_pool(c);
    let job_d = s.running_on_pool(d);
    s.register(b, "pool", Vec::new());
    s.advance_beating(Duration::from_secs(4), &[a, b, c, d]);
    // `d`'s stream drops just before the stall; it reconnects, but its
    // registration waits behind the stall too.
    s.engine.handle_disconnected(s.now, d, "connection reset");
    s.drain();
    // The stall: no input at all for 40 s, far past the heartbeat timeout
    // (15 s) and the reconnect grace (10 s). Then the late tick comes
    // first.
    s.now = add(s.now, Duration::from_secs(40));
    s.tick();
    for worker in [a, b, c] {
        let seen = s.engine.worker(worker).expect("none lost by the late tick");
        assert!(seen.connected, "{worker} timed out by the late tick");
    }
    assert!(s.engine.worker(d).is_some(), "d not lost by the late tick");
    assert!(s.destroyed.is_empty());
    // The queued inputs: heartbeats of `a` and `b`, the registration of
    // `d`; `c` has really gone silent.
    s.engine.handle_heartbeat(s.now, a);
    s.engine.handle_heartbeat(s.now, b);
    s.drain();
    s.register(d, "pool", vec![(job_d, 1)]);
    assert!(s.engine.worker(d).unwrap().connected);
    // A healthy shell again, for a while.
    s.advance_beating(Duration::from_secs(14), &[a, b, d]);
    assert!(
        s.engine.worker(c).unwrap().connected,
        "c still within its grace"
    );
    s.advance_beating(Duration::from_secs(2), &[a, b, d]);
    assert!(
        !s.engine.worker(c).unwrap().connected,
        "c timed out at last"
    );
    s.advance_beating(Duration::from_secs(10), &[a, b, d]);
    assert!(s.engine.worker(c).is_none(), "c lost");
    // (The idle `b` may be retired by now: idle for over a minute.)
    assert!(s.destroyed.contains(&c));
    assert!(!s.destroyed.contains(&a) && !s.destroyed.contains(&d));
    assert_eq!(
        s.failure_kinds(job_c),
        vec![hodei_core::job::FailureKind::WorkerLost]
    );
    for (worker, job) in [(a, job_a), (d, job_d)] {
        assert_eq!(s.job(job).state(), JobState::Running, "{worker}");
        assert_eq!(s.job(job).attempt, 1);
        assert!(s.failure_kinds(job).is_empty());
    }
    for worker in [a, b] {
        let events = s.worker_events(worker);
        assert!(
            !events.contains(&"WorkerDisconnected"),
            "{worker}: {events:?}"
        );
    }
}

/// A stall shorter than the heartbeat timeout is no stall: the tick at
/// its end times out a worker last heard too long ago, and its queued
/// heartbeat revives it (a disconnect and a reconnect recorded, the job
/// untouched).
#[test]
fn a_short_stall_times_out_then_the_queued_heartbeat_revives() {
    let mut s = Shell::new(EngineConfig::default(), vec![pool(1)]);
    let worker = w(1);
    let job = s.running_on_pool(worker);
    s.advance_beating(Duration::from_secs(5), &[worker]);
    // Last heard at +5 s; keep the engine ticking until +7 s, then no
    // input for 14 s (just under the timeout): the tick at +21 s comes
    // 16 s after the last heartbeat.
    s.advance_beating(Duration::from_secs(2), &[]);
    s.now = add(s.now, Duration::from_secs(14));
    s.tick();
    assert!(!s.engine.worker(worker).unwrap().connected);
    s.engine.handle_heartbeat(s.now, worker);
    s.drain();
    assert!(s.engine.worker(worker).unwrap().connected);
    let events = s.worker_events(worker);
    assert!(
        events.ends_with(&["WorkerDisconnected", "WorkerReconnected"]),
        "{events:?}"
    );
    s.advance_beating(Duration::from_secs(30), &[worker]);
    assert!(s.destroyed.is_empty());
    assert_eq!(s.job(job).state(), JobState::Running);
    assert_eq!(s.job(job).attempt, 1);
}
