//! Property tests of the state machines, the events' JSON contract, the
//! retry policy and the scheduler.
//!
//! The expectations here are written from DESIGN.md and the public docs,
//! not copied from the implementation: where the two disagree, one of
//! them is wrong.

mod support;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use proptest::prelude::*;

use hodei_core::event::{AggregateKind, DomainEvent, EVENT_TYPES, EventBody};
use hodei_core::ids::{Actor, CorrelationId, EventId, JobId, ProviderId, WorkerId};
use hodei_core::job::{
    AttemptOutcome, Failure, FailureKind, Job, JobCommand, JobCommandKind, JobState, JobStatus,
    TransitionContext,
};
use hodei_core::retry::RetryPolicy;
use hodei_core::scheduler::{
    NoProvider, ProviderSnapshot, WorkerSelection, affinity, is_eligible, select_provider,
    select_worker,
};
use hodei_core::spec::{JobSpec, RawJobSpec, SpecLimits};
use hodei_core::time::{Timestamp, add, from_millis};
use hodei_core::worker::{Worker, WorkerState};

use support::check_attempts;

// ===================================================================
// Job state machine
// ===================================================================

const FAILURE_KINDS: [FailureKind; 8] = [
    FailureKind::NonZeroExit,
    FailureKind::Signaled,
    FailureKind::OomKilled,
    FailureKind::WorkerLost,
    FailureKind::DispatchFailed,
    FailureKind::ProvisioningFailed,
    FailureKind::StartFailed,
    FailureKind::Validation,
];

/// A command, with the data the test fills in at apply time.
#[derive(Debug, Clone)]
enum Cmd {
    Schedule(u8),
    Assign(u8),
    Start,
    Exit {
        exit_code: Option<i32>,
        signal: Option<i32>,
        oom_killed: bool,
        timed_out: bool,
    },
    Fail(usize),
    Cancel,
    Expire,
    Requeue,
}

fn arb_cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        any::<u8>().prop_map(Cmd::Schedule),
        any::<u8>().prop_map(Cmd::Assign),
        Just(Cmd::Start),
        (
            prop_oneof![Just(None), Just(Some(0)), (1i32..256).prop_map(Some)],
            prop_oneof![Just(None), Just(Some(9)), Just(Some(15))],
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(exit_code, signal, oom_killed, timed_out)| Cmd::Exit {
                exit_code,
                signal,
                oom_killed,
                timed_out,
            }),
        (0..FAILURE_KINDS.len()).prop_map(Cmd::Fail),
        Just(Cmd::Cancel),
        Just(Cmd::Expire),
        Just(Cmd::Requeue),
    ]
}

fn arb_job_spec() -> impl Strategy<Value = JobSpec> {
    (1u32..=5, 1u64..=3600, any::<bool>(), -5i32..=5).prop_map(
        |(max_attempts, timeout, retry_on_failure, priority)| {
            support::spec(
                max_attempts,
                timeout,
                retry_on_failure,
                priority,
                None,
                None,
            )
        },
    )
}

fn arb_policy() -> impl Strategy<Value = RetryPolicy> {
    prop_oneof![
        // The default: 1 s doubling to 32 s, ±25%, timeouts not retried.
        Just(RetryPolicy::default()),
        (1u64..5000, 1u64..64_000, 0.0f64..=0.5, any::<bool>()).prop_map(
            |(base, cap, jitter, retry_on_timeout)| RetryPolicy {
                base: Duration::from_millis(base),
                cap: Duration::from_millis(cap),
                jitter,
                retry_on_timeout,
            },
        ),
    ]
}

fn worker_id(n: u8) -> WorkerId {
    WorkerId::from_u64_pair(0xB0, u64::from(n))
}

fn to_command(cmd: &Cmd, now: Timestamp) -> JobCommand {
    match cmd {
        Cmd::Schedule(w) => JobCommand::Schedule {
            provider: ProviderId::new("local"),
            worker: worker_id(*w),
            deadline: add(now, Duration::from_secs(60)),
        },
        Cmd::Assign(w) => JobCommand::Assign {
            worker: worker_id(*w),
            deadline: add(now, Duration::from_secs(10)),
        },
        Cmd::Start => JobCommand::Start,
        Cmd::Exit {
            exit_code,
            signal,
            oom_killed,
            timed_out,
        } => JobCommand::Exit {
            exit_code: *exit_code,
            signal: *signal,
            oom_killed: *oom_killed,
            timed_out: *timed_out,
        },
        Cmd::Fail(k) => JobCommand::Fail(Failure::new(FAILURE_KINDS[*k], "test failure")),
        Cmd::Cancel => JobCommand::Cancel {
            reason: "cancelled by test".into(),
        },
        Cmd::Expire => JobCommand::Expire,
        Cmd::Requeue => JobCommand::Requeue {
            reason: "worker refused (at_capacity): full".into(),
        },
    }
}

/// Which commands each state accepts (DESIGN.md's lifecycle).
fn accepts(state: JobState, kind: JobCommandKind) -> bool {
    use JobCommandKind as K;
    match state {
        JobState::Pending => matches!(kind, K::Schedule | K::Assign | K::Fail | K::Cancel),
        JobState::Scheduled => matches!(kind, K::Assign | K::Fail | K::Expire | K::Cancel),
        JobState::Assigned => {
            matches!(
                kind,
                K::Start | K::Fail | K::Expire | K::Cancel | K::Requeue
            )
        }
        JobState::Running => matches!(kind, K::Exit | K::Fail | K::Expire | K::Cancel),
        JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::TimedOut => false,
    }
}

/// What an accepted command must lead to: the resulting state and the
/// exact event types, in order.
fn expected_outcome(
    before: &Job,
    command: &JobCommand,
    policy: &RetryPolicy,
) -> (JobState, Vec<&'static str>) {
    let spec_retries = before.spec.retry_on_failure();
    let attempts_left = before.attempt < before.spec.max_attempts();
    // A failed attempt: back to PENDING if retryable with attempts left,
    // else the terminal state; a retryable one out of attempts also says
    // the retries are exhausted.
    let fail = |retryable: bool, terminal: JobState, terminal_event: &'static str| {
        if retryable && attempts_left {
            (JobState::Pending, vec!["JobRetryScheduled", "JobQueued"])
        } else if retryable {
            (terminal, vec![terminal_event, "JobRetryExhausted"])
        } else {
            (terminal, vec![terminal_event])
        }
    };
    let retryable = |kind: FailureKind| match kind {
        FailureKind::WorkerLost | FailureKind::DispatchFailed | FailureKind::ProvisioningFailed => {
            true
        }
        FailureKind::NonZeroExit | FailureKind::Signaled | FailureKind::OomKilled => spec_retries,
        FailureKind::StartFailed | FailureKind::Validation => false,
    };
    let state = before.state();
    let with_prefix = |prefix: Option<&'static str>, (s, mut ev): (JobState, Vec<&'static str>)| {
        if let Some(p) = prefix {
            ev.insert(0, p);
        }
        (s, ev)
    };
    match command {
        JobCommand::Schedule { .. } => (JobState::Scheduled, vec!["JobScheduled"]),
        JobCommand::Assign { .. } => (JobState::Assigned, vec!["JobAssigned"]),
        JobCommand::Start => (JobState::Running, vec!["JobStarted"]),
        JobCommand::Cancel { .. } => (JobState::Cancelled, vec!["JobCancelled"]),
        JobCommand::Exit {
            exit_code,
            signal,
            oom_killed,
            timed_out,
        } => {
            if *timed_out {
                fail(policy.retry_on_timeout, JobState::TimedOut, "JobTimedOut")
            } else if *exit_code == Some(0) && !*oom_killed {
                (JobState::Succeeded, vec!["JobSucceeded"])
            } else {
                let kind = if *oom_killed {
                    FailureKind::OomKilled
                } else if exit_code.is_some() {
                    FailureKind::NonZeroExit
                } else if signal.is_some() {
                    FailureKind::Signaled
                } else {
                    FailureKind::NonZeroExit
                };
                fail(retryable(kind), JobState::Failed, "JobFailed")
            }
        }
        JobCommand::Fail(f) => {
            let prefix = (state == JobState::Assigned && f.kind == FailureKind::DispatchFailed)
                .then_some("JobDispatchFailed");
            with_prefix(
                prefix,
                fail(retryable(f.kind), JobState::Failed, "JobFailed"),
            )
        }
        // Given back by the worker: the same attempt, queued again.
        JobCommand::Requeue { .. } => (JobState::Pending, vec!["JobDispatchFailed", "JobQueued"]),
        JobCommand::Expire => match state {
            JobState::Scheduled => fail(true, JobState::Failed, "JobFailed"),
            JobState::Assigned => with_prefix(
                Some("JobDispatchFailed"),
                fail(true, JobState::Failed, "JobFailed"),
            ),
            JobState::Running => fail(policy.retry_on_timeout, JobState::TimedOut, "JobTimedOut"),
            _ => unreachable!("only accepted commands are asked about"),
        },
    }
}

/// The job is in a well-defined state: data consistent with the state,
/// and it survives a JSON round trip unchanged.
fn assert_well_defined(job: &Job) {
    let state = job.state();
    assert!(JobState::ALL.contains(&state));
    let intermediate = matches!(
        state,
        JobState::Scheduled | JobState::Assigned | JobState::Running
    );
    assert_eq!(job.status.deadline().is_some(), intermediate, "{job:?}");
    assert_eq!(job.status.worker().is_some(), intermediate, "{job:?}");
    check_attempts(job).unwrap();
    let json = serde_json::to_string(job).unwrap();
    let back: Job = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, job, "JSON round trip of {json}");
}

/// Raw backoff before jitter, computed independently of `RetryPolicy`.
fn raw_backoff(policy: &RetryPolicy, failed_attempt: u32) -> u128 {
    let exp = failed_attempt.saturating_sub(1).min(30);
    (policy.base.as_nanos() << exp).min(policy.cap.as_nanos())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary command sequences: every accepted transition does exactly
    /// what the lifecycle says and emits exactly its events; every refused
    /// one changes nothing; terminal stays terminal.
    #[test]
    fn job_commands_follow_the_lifecycle(
        spec in arb_job_spec(),
        policy in arb_policy(),
        steps in prop::collection::vec((arb_cmd(), 0u64..120_000, 0.0f64..1.0), 1..60),
    ) {
        let id = JobId::from_u64_pair(1, 2);
        let mut now = from_millis(1_000_000);
        let (mut job, created) = Job::submit(
            id,
            spec,
            CorrelationId::new("corr"),
            Actor::new("alice"),
            now,
        );
        let types: Vec<_> = created.iter().map(EventBody::event_type).collect();
        prop_assert_eq!(types, vec!["JobCreated", "JobQueued"]);
        prop_assert_eq!(job.state(), JobState::Pending);
        prop_assert_eq!((job.attempt, job.version), (1, 1));
        assert_well_defined(&job);

        for (cmd, advance, unit) in steps {
            now = add(now, Duration::from_millis(advance));
            let command = to_command(&cmd, now);
            let before = job.clone();
            let ctx = TransitionContext { now, retry: &policy, unit_random: unit };
            let result = job.apply(command.clone(), ctx);
            assert_well_defined(&job);
            prop_assert!(job.attempt <= job.spec.max_attempts());
            let accepted = accepts(before.state(), command.kind());
            match result {
                Err(e) => {
                    prop_assert!(!accepted, "{:?} refused in {}: {}", command, before.state(), e);
                    prop_assert_eq!(&job, &before, "a refused command changed the job");
                    prop_assert_eq!(e.state, before.state());
                    prop_assert_eq!(e.command, command.kind());
                }
                Ok(events) => {
                    prop_assert!(accepted, "{:?} accepted in {}", command, before.state());
                    prop_assert!(!before.is_terminal(), "terminal job changed");
                    prop_assert_eq!(job.version, before.version + 1);
                    prop_assert_eq!(job.updated_at, now);
                    prop_assert_eq!(job.id, before.id);
                    prop_assert_eq!(&job.spec, &before.spec);
                    let (state, expected) = expected_outcome(&before, &command, &policy);
                    let types: Vec<_> = events.iter().map(EventBody::event_type).collect();
                    prop_assert_eq!(job.state(), state, "after {:?} from {}", command, before.state());
                    prop_assert_eq!(&types, &expected, "after {:?} from {}", command, before.state());
                    for e in &events {
                        prop_assert_eq!(e.job_id(), Some(id));
                    }
                    check_transition_details(&before, &job, &command, &events, &policy, unit, now);
                }
            }
        }
    }
}

/// The data of an accepted transition: attempt numbers, deadlines,
/// backoff, attempt history, event payloads.
fn check_transition_details(
    before: &Job,
    after: &Job,
    command: &JobCommand,
    events: &[EventBody],
    policy: &RetryPolicy,
    unit: f64,
    now: Timestamp,
) {
    let attempt = before.attempt;
    // A requeue gives the attempt back: same number, queued at once,
    // nothing recorded in the history.
    if let JobCommand::Requeue { reason } = command {
        let JobStatus::Assigned { worker, .. } = before.status else {
            panic!("requeued from {}", before.state());
        };
        assert_eq!(after.status, JobStatus::Pending { not_before: None });
        assert_eq!(after.attempt, attempt);
        assert_eq!(after.attempts, before.attempts);
        assert_eq!(
            events,
            [
                EventBody::JobDispatchFailed {
                    job_id: after.id,
                    attempt,
                    worker_id: worker,
                    reason: reason.clone(),
                },
                EventBody::JobQueued {
                    job_id: after.id,
                    attempt,
                    priority: after.spec.priority(),
                    not_before: None,
                },
            ]
        );
        return;
    }
    // Only a retry moves to the next attempt.
    let retried = after.state() == JobState::Pending;
    if retried {
        assert_eq!(after.attempt, attempt + 1);
        let JobStatus::Pending {
            not_before: Some(not_before),
        } = after.status
        else {
            panic!("a retry must set not_before: {after:?}");
        };
        // not_before = now + backoff, within the jitter band (±25% by
        // default) of the capped exponential delay.
        let delay = (not_before - now).to_std().unwrap().as_nanos();
        let raw = raw_backoff(policy, attempt) as f64;
        let lo = raw * (1.0 - policy.jitter) - 1.0;
        let hi = raw * (1.0 + policy.jitter) + 1.0;
        assert!(
            (lo..=hi).contains(&(delay as f64)),
            "delay {delay}ns outside [{lo}, {hi}] for attempt {attempt}, unit {unit}"
        );
        assert_eq!(policy.backoff(attempt, unit).as_nanos(), delay);
        match (&events[events.len() - 2], &events[events.len() - 1]) {
            (
                EventBody::JobRetryScheduled {
                    failed_attempt,
                    next_attempt,
                    not_before: nb,
                    ..
                },
                EventBody::JobQueued {
                    attempt: queued,
                    not_before: qnb,
                    priority,
                    ..
                },
            ) => {
                assert_eq!(
                    (*failed_attempt, *next_attempt, *queued),
                    (attempt, attempt + 1, attempt + 1)
                );
                assert_eq!((*nb, *qnb), (not_before, Some(not_before)));
                assert_eq!(*priority, after.spec.priority());
            }
            other => panic!("retry events {other:?}"),
        }
    } else {
        assert_eq!(
            after.attempt, attempt,
            "the attempt number moved without a retry"
        );
    }

    // History: an attempt that ends is recorded once, with its number. A
    // job cancelled while queued has no attempt to record.
    let ended = !matches!(
        (before.state(), after.state()),
        (
            JobState::Pending,
            JobState::Scheduled | JobState::Assigned | JobState::Cancelled
        ) | (JobState::Scheduled, JobState::Assigned)
            | (JobState::Assigned, JobState::Running)
    );
    let grew = after.attempts.len() - before.attempts.len();
    assert_eq!(grew, usize::from(ended), "{before:?} -> {after:?}");
    if ended {
        let last = after.attempts.last().unwrap();
        assert_eq!(last.number, attempt);
        assert_eq!(last.finished_at, now);
        let outcome_ok = matches!(
            (&last.outcome, after.state()),
            (AttemptOutcome::Succeeded, JobState::Succeeded)
                | (AttemptOutcome::Cancelled, JobState::Cancelled)
                | (
                    AttemptOutcome::TimedOut,
                    JobState::TimedOut | JobState::Pending
                )
                | (
                    AttemptOutcome::Failed { .. },
                    JobState::Failed | JobState::Pending
                )
        );
        assert!(
            outcome_ok,
            "{:?} recorded for {}",
            last.outcome,
            after.state()
        );
    }

    match (command, &after.status) {
        (
            JobCommand::Schedule {
                worker,
                deadline,
                provider,
            },
            JobStatus::Scheduled {
                worker: w,
                deadline: d,
                provider: p,
            },
        ) => {
            assert_eq!((worker, deadline, provider), (w, d, p));
            assert_eq!(
                events,
                [EventBody::JobScheduled {
                    job_id: after.id,
                    attempt,
                    provider: provider.clone(),
                    worker_id: *worker,
                    deadline: *deadline,
                }]
            );
        }
        (
            JobCommand::Assign { worker, deadline },
            JobStatus::Assigned {
                worker: w,
                deadline: d,
            },
        ) => {
            assert_eq!((worker, deadline), (w, d));
            assert_eq!(
                events,
                [EventBody::JobAssigned {
                    job_id: after.id,
                    attempt,
                    worker_id: *worker,
                    deadline: *deadline,
                }]
            );
        }
        (
            JobCommand::Start,
            JobStatus::Running {
                worker,
                started_at,
                deadline,
            },
        ) => {
            let JobStatus::Assigned {
                worker: assigned, ..
            } = before.status
            else {
                panic!("started from {}", before.state());
            };
            assert_eq!(*worker, assigned);
            assert_eq!(*started_at, now);
            assert_eq!(*deadline, add(now, after.spec.timeout()));
            // Start emits exactly JobStarted.
            assert_eq!(
                events,
                [EventBody::JobStarted {
                    job_id: after.id,
                    attempt,
                    worker_id: assigned,
                    deadline: *deadline,
                }]
            );
        }
        (JobCommand::Cancel { reason }, JobStatus::Cancelled { reason: r }) => {
            assert_eq!(reason, r);
            assert_eq!(
                events,
                [EventBody::JobCancelled {
                    job_id: after.id,
                    attempt,
                    from: before.state(),
                    worker_id: before.status.worker(),
                    reason: reason.clone(),
                }]
            );
        }
        (_, JobStatus::Succeeded { exit_code }) => {
            assert_eq!(*exit_code, 0);
            let JobStatus::Running {
                worker, started_at, ..
            } = before.status
            else {
                panic!("succeeded from {}", before.state());
            };
            assert_eq!(
                events,
                [EventBody::JobSucceeded {
                    job_id: after.id,
                    attempt,
                    worker_id: worker,
                    exit_code: 0,
                    duration_ms: (now - started_at).num_milliseconds() as u64,
                }]
            );
        }
        _ => {}
    }
}

#[test]
fn a_start_emits_exactly_job_started() {
    let now = from_millis(5_000);
    let policy = RetryPolicy::default();
    let ctx = TransitionContext {
        now,
        retry: &policy,
        unit_random: 0.5,
    };
    let (mut job, _) = Job::submit(
        JobId::from_u64_pair(0, 1),
        support::spec(3, 30, false, 0, None, None),
        CorrelationId::new("c"),
        Actor::new("a"),
        now,
    );
    let w = worker_id(1);
    job.apply(
        JobCommand::Assign {
            worker: w,
            deadline: add(now, Duration::from_secs(10)),
        },
        ctx,
    )
    .unwrap();
    let events = job.apply(JobCommand::Start, ctx).unwrap();
    assert_eq!(
        events,
        vec![EventBody::JobStarted {
            job_id: job.id,
            attempt: 1,
            worker_id: w,
            deadline: add(now, Duration::from_secs(30)),
        }]
    );
    // A lost worker with attempts left: retry, back to PENDING, attempt 2,
    // not before now + 1 s ± 25%.
    let events = job
        .apply(
            JobCommand::Fail(Failure::new(FailureKind::WorkerLost, "gone")),
            ctx,
        )
        .unwrap();
    let types: Vec<_> = events.iter().map(EventBody::event_type).collect();
    assert_eq!(types, ["JobRetryScheduled", "JobQueued"]);
    assert_eq!(job.state(), JobState::Pending);
    assert_eq!(job.attempt, 2);
    assert_eq!(
        job.status,
        JobStatus::Pending {
            not_before: Some(add(now, Duration::from_secs(1)))
        }
    );
    assert_eq!(job.attempts.len(), 1);
}

/// The deadline sweep (a replica deciding jobs another, dead, replica
/// held): ASSIGNED expires after a short grace; RUNNING waits longer (the
/// orphaned agent's kill grace) and then fails as `worker_lost`, retried.
#[test]
fn the_sweep_retries_a_dead_replica_s_jobs_after_their_grace() {
    use hodei_core::engine::{SWEEP_GRACE, SWEEP_GRACE_RUNNING, sweep_decision};
    let now = from_millis(5_000);
    let policy = RetryPolicy::default();
    let ctx = TransitionContext {
        now,
        retry: &policy,
        unit_random: 0.5,
    };
    let (mut job, _) = Job::submit(
        JobId::from_u64_pair(0, 2),
        support::spec(3, 30, false, 0, None, None),
        CorrelationId::new("c"),
        Actor::new("a"),
        now,
    );
    assert_eq!(
        sweep_decision(&job, add(now, Duration::from_secs(3600))),
        None
    );
    let assigned_until = add(now, Duration::from_secs(10));
    job.apply(
        JobCommand::Assign {
            worker: worker_id(1),
            deadline: assigned_until,
        },
        ctx,
    )
    .unwrap();
    assert_eq!(
        sweep_decision(&job, assigned_until),
        None,
        "within its grace"
    );
    assert_eq!(
        sweep_decision(&job, add(assigned_until, SWEEP_GRACE)),
        Some(JobCommand::Expire)
    );
    job.apply(JobCommand::Start, ctx).unwrap();
    let running_until = job.status.deadline().unwrap();
    assert_eq!(
        sweep_decision(&job, add(running_until, SWEEP_GRACE)),
        None,
        "RUNNING waits for the orphaned agent's own kill"
    );
    let later = add(running_until, SWEEP_GRACE_RUNNING);
    let command = sweep_decision(&job, later).expect("decided after its grace");
    match &command {
        JobCommand::Fail(f) => {
            assert_eq!(f.kind, FailureKind::WorkerLost);
            assert!(f.message.contains("deadline sweep"), "{f:?}");
        }
        other => panic!("expected a worker_lost failure, got {other:?}"),
    }
    let events = job
        .apply(
            command,
            TransitionContext {
                now: later,
                retry: &policy,
                unit_random: 0.5,
            },
        )
        .unwrap();
    let types: Vec<_> = events.iter().map(EventBody::event_type).collect();
    assert_eq!(types, ["JobRetryScheduled", "JobQueued"]);
    assert_eq!((job.state(), job.attempt), (JobState::Pending, 2));
    assert_eq!(
        sweep_decision(&job, add(later, Duration::from_secs(3600))),
        None
    );
}

// ===================================================================
// Worker state machine
// ===================================================================

fn worker_in(state: WorkerState) -> Worker {
    Worker {
        id: worker_id(7),
        provider: ProviderId::new("local"),
        state,
        labels: BTreeMap::new(),
        image: None,
        capacity: 1,
        jobs: Vec::new(),
        ephemeral: false,
        reserved_for: None,
        connected: true,
        last_seen: from_millis(0),
        created_at: from_millis(0),
    }
}

#[test]
fn worker_table_is_what_transition_enforces() {
    for from in WorkerState::ALL {
        for to in WorkerState::ALL {
            let mut w = worker_in(from);
            let r = w.transition(to);
            assert_eq!(r.is_ok(), from.can_transition_to(to), "{from} -> {to}");
            match r {
                Ok(()) => assert_eq!(w.state, to),
                Err(e) => {
                    assert_eq!(w.state, from, "a refused transition changed the state");
                    assert_eq!((e.from, e.to), (from, to));
                }
            }
        }
    }
}

#[test]
fn worker_lifecycle_shape() {
    use WorkerState::*;
    // Terminated is terminal and the only terminal state.
    for s in WorkerState::ALL {
        assert_eq!(s.is_terminal(), s == Terminated);
        assert!(!Terminated.can_transition_to(s));
    }
    // Everything is reachable from Creating; everything can end.
    let mut seen = BTreeSet::from([Creating]);
    let mut todo = VecDeque::from([Creating]);
    while let Some(s) = todo.pop_front() {
        for t in WorkerState::ALL {
            if s.can_transition_to(t) && seen.insert(t) {
                todo.push_back(t);
            }
        }
    }
    assert_eq!(seen.len(), WorkerState::ALL.len());
    for s in WorkerState::ALL {
        if s != Terminated {
            assert!(s.can_transition_to(Terminated), "{s} cannot end");
        }
    }
    // Nothing goes back to being created; a draining worker never takes
    // work as READY again.
    for s in WorkerState::ALL {
        assert!(!s.can_transition_to(Creating), "{s} -> CREATING");
    }
    assert!(!Draining.can_transition_to(Ready));
    assert!(!Terminating.can_transition_to(Ready) && !Terminating.can_transition_to(Busy));
}

proptest! {
    /// Arbitrary sequences of requested moves only ever follow table edges;
    /// once terminated, a worker stays terminated.
    #[test]
    fn worker_sequences_follow_the_table(targets in prop::collection::vec(0usize..7, 0..40)) {
        let mut w = worker_in(WorkerState::Creating);
        for t in targets {
            let to = WorkerState::ALL[t];
            let from = w.state;
            let ok = w.transition(to).is_ok();
            prop_assert_eq!(ok, from.can_transition_to(to));
            prop_assert_eq!(w.state, if ok { to } else { from });
            if from == WorkerState::Terminated {
                prop_assert_eq!(w.state, WorkerState::Terminated);
            }
            let name = w.state.as_str();
            prop_assert_eq!(name.parse::<WorkerState>().unwrap(), w.state);
        }
    }

    /// A worker accepts a job only when connected, READY or BUSY, with a
    /// free slot, and not reserved for another job.
    #[test]
    fn worker_accepts_only_what_it_can_run(
        state in 0usize..7,
        connected in any::<bool>(),
        capacity in 0u32..4,
        held in 0usize..5,
        reserved in prop::option::of(0u64..3),
        job in 0u64..3,
    ) {
        let mut w = worker_in(WorkerState::ALL[state]);
        w.connected = connected;
        w.capacity = capacity;
        w.jobs = (0..held).map(|i| JobId::from_u64_pair(9, i as u64)).collect();
        w.reserved_for = reserved.map(|r| JobId::from_u64_pair(5, r));
        let job = JobId::from_u64_pair(5, job);
        let expected = connected
            && matches!(w.state, WorkerState::Ready | WorkerState::Busy)
            && held < capacity as usize
            && w.reserved_for.is_none_or(|r| r == job);
        prop_assert_eq!(w.accepts(job), expected);
        prop_assert_eq!(w.free_slots() as usize, (capacity as usize).saturating_sub(held));
    }
}

// ===================================================================
// Events: the JSON contract
// ===================================================================

/// Field values to build any event from.
#[derive(Debug, Clone)]
struct Fields {
    job: JobId,
    worker: WorkerId,
    n: u32,
    m: u32,
    i: i32,
    big: u64,
    at: Timestamp,
    text: String,
    flag: bool,
    opt: bool,
}

fn arb_fields() -> impl Strategy<Value = Fields> {
    (
        any::<(u64, u64)>(),
        any::<(u64, u64)>(),
        any::<(u32, u32, i32, u64)>(),
        0i64..4_102_444_800_000,
        "\\PC{0,24}",
        any::<(bool, bool)>(),
    )
        .prop_map(|(j, w, (n, m, i, big), ms, text, (flag, opt))| Fields {
            job: JobId::from_u64_pair(j.0, j.1),
            worker: WorkerId::from_u64_pair(w.0, w.1),
            n,
            m,
            i,
            big,
            at: from_millis(ms),
            text,
            flag,
            opt,
        })
}

/// One body of every variant, in the order of [`EVENT_TYPES`].
fn every_body(f: &Fields) -> Vec<EventBody> {
    let failure = Failure {
        kind: FailureKind::NonZeroExit,
        message: f.text.clone(),
        exit_code: f.opt.then_some(f.i),
        signal: (!f.opt).then_some(9),
    };
    let provider = ProviderId::new(format!("p{}", f.n % 7));
    let job = f.opt.then_some(f.job);
    let spec = RawJobSpec {
        command: Some(vec!["echo".into(), f.text.clone()]),
        max_attempts: Some(f.n % 100 + 1),
        ..Default::default()
    };
    let config = serde_json::json!({ "max_workers": f.m, "name": f.text });
    vec![
        EventBody::JobCreated {
            job_id: f.job,
            spec,
        },
        EventBody::JobQueued {
            job_id: f.job,
            attempt: f.n,
            priority: f.i,
            not_before: f.opt.then_some(f.at),
        },
        EventBody::JobScheduled {
            job_id: f.job,
            attempt: f.n,
            provider: provider.clone(),
            worker_id: f.worker,
            deadline: f.at,
        },
        EventBody::JobAssigned {
            job_id: f.job,
            attempt: f.n,
            worker_id: f.worker,
            deadline: f.at,
        },
        EventBody::JobStarted {
            job_id: f.job,
            attempt: f.n,
            worker_id: f.worker,
            deadline: f.at,
        },
        EventBody::JobSucceeded {
            job_id: f.job,
            attempt: f.n,
            worker_id: f.worker,
            exit_code: 0,
            duration_ms: f.big,
        },
        EventBody::JobFailed {
            job_id: f.job,
            attempt: f.n,
            failure: failure.clone(),
        },
        EventBody::JobCancelled {
            job_id: f.job,
            attempt: f.n,
            from: JobState::ALL[f.m as usize % 8],
            worker_id: f.opt.then_some(f.worker),
            reason: f.text.clone(),
        },
        EventBody::JobTimedOut {
            job_id: f.job,
            attempt: f.n,
            during: JobState::ALL[f.m as usize % 8],
            worker_id: f.opt.then_some(f.worker),
        },
        EventBody::JobRetryScheduled {
            job_id: f.job,
            failed_attempt: f.n,
            next_attempt: f.m,
            not_before: f.at,
            delay_ms: f.big,
            failure: failure.clone(),
        },
        EventBody::JobRetryExhausted {
            job_id: f.job,
            attempts: f.n,
            failure,
        },
        EventBody::JobDispatchFailed {
            job_id: f.job,
            attempt: f.n,
            worker_id: f.worker,
            reason: f.text.clone(),
        },
        EventBody::WorkerProvisioningRequested {
            worker_id: f.worker,
            provider: provider.clone(),
            job_id: job,
        },
        EventBody::WorkerProvisioned {
            worker_id: f.worker,
            provider: provider.clone(),
        },
        EventBody::WorkerProvisioningFailed {
            worker_id: f.worker,
            provider: provider.clone(),
            reason: f.text.clone(),
        },
        EventBody::WorkerRegistered {
            worker_id: f.worker,
            provider: provider.clone(),
            labels: if f.flag {
                BTreeMap::from([("team".to_owned(), f.text.clone())])
            } else {
                BTreeMap::new()
            },
            capacity: f.m,
        },
        EventBody::WorkerReady {
            worker_id: f.worker,
        },
        EventBody::WorkerDisconnected {
            worker_id: f.worker,
            reason: f.text.clone(),
        },
        EventBody::WorkerReconnected {
            worker_id: f.worker,
            running: if f.flag { vec![f.job] } else { Vec::new() },
        },
        EventBody::WorkerDraining {
            worker_id: f.worker,
        },
        EventBody::WorkerTerminated {
            worker_id: f.worker,
            reason: f.text.clone(),
        },
        EventBody::WorkerRegistrationRejected {
            worker_id: f.opt.then_some(f.worker),
            reason: f.text.clone(),
        },
        EventBody::ProviderRegistered {
            provider: provider.clone(),
            kind: "docker".into(),
            config: config.clone(),
        },
        EventBody::ProviderUpdated {
            provider: provider.clone(),
            config,
        },
        EventBody::ProviderHealthChanged {
            provider: provider.clone(),
            healthy: f.flag,
            message: f.text.clone(),
        },
        EventBody::AutoScalingTriggered {
            provider,
            queue_depth: f.big,
            current: f.n,
            target: f.m,
        },
        EventBody::SecretAccessed {
            name: format!("SECRET_{}", f.n),
            job_id: job,
            purpose: f.text.clone(),
        },
    ]
}

const ENVELOPE_KEYS: [&str; 9] = [
    "event_id",
    "sequence",
    "occurred_at",
    "aggregate_type",
    "aggregate_id",
    "correlation_id",
    "actor",
    "event_type",
    "payload",
];

proptest! {
    /// Every variant, inside its envelope, survives a JSON round trip and
    /// serializes to exactly the envelope's keys.
    #[test]
    fn every_event_round_trips_in_its_envelope(f in arb_fields(), seq in any::<u64>()) {
        for body in every_body(&f) {
            let mut event = DomainEvent::new(
                EventId::from_u64_pair(f.big, u64::from(f.n)),
                f.at,
                CorrelationId::new(format!("corr-{}", f.m)),
                Actor::new("user:alice"),
                body,
            );
            event.sequence = seq;
            let value = serde_json::to_value(&event).unwrap();
            let keys: BTreeSet<&str> = value.as_object().unwrap().keys().map(String::as_str).collect();
            prop_assert_eq!(keys, ENVELOPE_KEYS.into_iter().collect::<BTreeSet<_>>());
            prop_assert_eq!(value["event_type"].as_str(), Some(event.event_type()));
            prop_assert!(value["payload"].is_object());
            let text = serde_json::to_string(&event).unwrap();
            let back: DomainEvent = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(&back, &event);
            let back: DomainEvent = serde_json::from_value(value).unwrap();
            prop_assert_eq!(back, event);
        }
    }
}

#[test]
fn every_event_type_name_is_produced_by_a_variant() {
    let f = Fields {
        job: JobId::from_u64_pair(1, 1),
        worker: WorkerId::from_u64_pair(2, 2),
        n: 1,
        m: 2,
        i: 0,
        big: 3,
        at: from_millis(0),
        text: "x".into(),
        flag: true,
        opt: true,
    };
    let produced: Vec<&str> = every_body(&f).iter().map(EventBody::event_type).collect();
    assert_eq!(
        produced, EVENT_TYPES,
        "EVENT_TYPES and the variants disagree"
    );
    let unique: BTreeSet<&str> = EVENT_TYPES.iter().copied().collect();
    assert_eq!(
        unique.len(),
        EVENT_TYPES.len(),
        "duplicate names in EVENT_TYPES"
    );
    // DESIGN.md's minimum set is all there.
    for name in [
        "JobCreated",
        "JobQueued",
        "JobScheduled",
        "JobAssigned",
        "JobStarted",
        "JobSucceeded",
        "JobFailed",
        "JobCancelled",
        "JobTimedOut",
        "JobRetryScheduled",
        "JobRetryExhausted",
        "JobDispatchFailed",
        "WorkerProvisioningRequested",
        "WorkerProvisioned",
        "WorkerRegistered",
        "WorkerReady",
        "WorkerDisconnected",
        "WorkerReconnected",
        "WorkerDraining",
        "WorkerTerminated",
        "WorkerRegistrationRejected",
        "ProviderRegistered",
        "ProviderUpdated",
        "ProviderHealthChanged",
        "AutoScalingTriggered",
        "SecretAccessed",
    ] {
        assert!(unique.contains(name), "{name} missing from EVENT_TYPES");
    }
    // Each event names its aggregate.
    for body in every_body(&f) {
        let (kind, id) = body.aggregate();
        let expected = match body.event_type() {
            t if t.starts_with("Job") => (AggregateKind::Job, f.job.to_string()),
            t if t.starts_with("Worker") => (AggregateKind::Worker, f.worker.to_string()),
            t if t.starts_with("Provider") || t == "AutoScalingTriggered" => {
                (AggregateKind::Provider, "p1".to_owned())
            }
            _ => (AggregateKind::Secret, "SECRET_1".to_owned()),
        };
        assert_eq!((kind, id), expected, "{}", body.event_type());
    }
}

/// The envelope's JSON shape is a public contract: pinned here, byte for
/// byte (field order included).
#[test]
fn envelope_json_is_pinned() {
    let job = JobId::from_u64_pair(0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321);
    let mut event = DomainEvent::new(
        EventId::from_u64_pair(0xaaaa, 0xbbbb),
        from_millis(1_700_000_000_123),
        CorrelationId::new("req-42"),
        Actor::new("user:alice"),
        EventBody::JobQueued {
            job_id: job,
            attempt: 2,
            priority: 5,
            not_before: Some(from_millis(1_700_000_001_000)),
        },
    );
    event.sequence = 17;
    let expected = concat!(
        r#"{"event_id":"00000000-0000-aaaa-0000-00000000bbbb","#,
        r#""sequence":17,"#,
        r#""occurred_at":"2023-11-14T22:13:20.123Z","#,
        r#""aggregate_type":"job","#,
        r#""aggregate_id":"01234567-89ab-cdef-0fed-cba987654321","#,
        r#""correlation_id":"req-42","#,
        r#""actor":"user:alice","#,
        r#""event_type":"JobQueued","#,
        r#""payload":{"job_id":"01234567-89ab-cdef-0fed-cba987654321","attempt":2,"priority":5,"not_before":"2023-11-14T22:13:21Z"}}"#,
    );
    assert_eq!(serde_json::to_string(&event).unwrap(), expected);
    let back: DomainEvent = serde_json::from_str(expected).unwrap();
    assert_eq!(back, event);
    // Optional payload fields are left out, not nulled.
    let worker_ready = DomainEvent::new(
        EventId::from_u64_pair(0, 1),
        from_millis(0),
        CorrelationId::new("c"),
        Actor::system("scheduler"),
        EventBody::WorkerReconnected {
            worker_id: WorkerId::from_u64_pair(0, 2),
            running: Vec::new(),
        },
    );
    let value = serde_json::to_value(&worker_ready).unwrap();
    assert_eq!(
        value["payload"],
        serde_json::json!({"worker_id": "00000000-0000-0000-0000-000000000002"})
    );
    assert_eq!(value["actor"], "system:scheduler");
    assert_eq!(value["aggregate_type"], "worker");
}

// ===================================================================
// Retry policy
// ===================================================================

proptest! {
    /// The delay is the capped exponential, scaled by a factor within
    /// `1 ± jitter`; it never decreases from one attempt to the next for
    /// the same draw.
    #[test]
    fn backoff_stays_in_bounds(
        base in 1u64..10_000,
        cap in 1u64..120_000,
        jitter in 0.0f64..=1.0,
        attempt in prop_oneof![1u32..40, any::<u32>()],
        unit in prop_oneof![0.0f64..1.0, Just(0.0), Just(1.0)],
    ) {
        let policy = RetryPolicy {
            base: Duration::from_millis(base),
            cap: Duration::from_millis(cap),
            jitter,
            retry_on_timeout: false,
        };
        let d = policy.backoff(attempt, unit).as_nanos() as f64;
        let raw = raw_backoff(&policy, attempt) as f64;
        prop_assert!(d >= raw * (1.0 - jitter) - 1.0, "{} < {}", d, raw * (1.0 - jitter));
        prop_assert!(d <= raw * (1.0 + jitter) + 1.0, "{} > {}", d, raw * (1.0 + jitter));
        prop_assert!(d <= policy.cap.as_nanos() as f64 * 2.0 + 1.0);
        if attempt < u32::MAX {
            prop_assert!(policy.backoff(attempt + 1, unit) >= policy.backoff(attempt, unit));
        }
    }

    /// Randomness that is not a number in [0, 1] does not escape the band.
    #[test]
    fn backoff_tolerates_odd_draws(
        attempt in 1u32..10,
        unit in prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(-3.0), Just(7.5)],
    ) {
        let policy = RetryPolicy::default();
        let d = policy.backoff(attempt, unit).as_nanos() as f64;
        let raw = raw_backoff(&policy, attempt) as f64;
        prop_assert!((raw * 0.75 - 1.0..=raw * 1.25 + 1.0).contains(&d));
    }

    /// Transient failures always retry; the job's own failures only when
    /// its spec opts in; start and validation failures never.
    #[test]
    fn retryability_by_kind(kind in 0usize..8, opt_in in any::<bool>()) {
        let kind = FAILURE_KINDS[kind];
        let spec = support::spec(3, 10, opt_in, 0, None, None);
        let retryable = RetryPolicy::default().is_retryable(&Failure::new(kind, "x"), &spec);
        let expected = match kind {
            FailureKind::WorkerLost | FailureKind::DispatchFailed | FailureKind::ProvisioningFailed => true,
            FailureKind::NonZeroExit | FailureKind::Signaled | FailureKind::OomKilled => opt_in,
            FailureKind::StartFailed | FailureKind::Validation => false,
        };
        prop_assert_eq!(retryable, expected);
        prop_assert_eq!(kind.is_transient(), matches!(kind, FailureKind::WorkerLost | FailureKind::DispatchFailed | FailureKind::ProvisioningFailed));
    }
}

// ===================================================================
// Scheduler
// ===================================================================

const JOB: JobId = JobId::from_u64_pair(0x10B, 1);
const OTHER_JOB: JobId = JobId::from_u64_pair(0x10B, 2);
const PROVIDERS: [&str; 3] = ["local", "docker", "k8s"];
const IMAGES: [Option<&str>; 3] = [None, Some("busybox"), Some("alpine")];

#[derive(Debug, Clone)]
struct WorkerShape {
    state: usize,
    connected: bool,
    capacity: u32,
    held: usize,
    provider: usize,
    image: usize,
    reserved: u8,
    team: bool,
}

fn arb_worker_shape() -> impl Strategy<Value = WorkerShape> {
    (
        (0usize..7, prop::bool::weighted(0.8), 0u32..4, 0usize..4),
        (0usize..3, 0usize..3, 0u8..4, any::<bool>()),
    )
        .prop_map(
            |((state, connected, capacity, held), (provider, image, reserved, team))| WorkerShape {
                state,
                connected,
                capacity,
                held,
                provider,
                image,
                reserved,
                team,
            },
        )
}

fn build_workers(shapes: &[WorkerShape]) -> Vec<Worker> {
    shapes
        .iter()
        .enumerate()
        .map(|(n, s)| Worker {
            id: WorkerId::from_u64_pair(0x3, n as u64),
            provider: ProviderId::new(PROVIDERS[s.provider]),
            state: WorkerState::ALL[s.state],
            labels: if s.team {
                BTreeMap::from([("team".to_owned(), "ci".to_owned())])
            } else {
                BTreeMap::new()
            },
            image: IMAGES[s.image].map(str::to_owned),
            capacity: s.capacity,
            jobs: (0..s.held)
                .map(|i| JobId::from_u64_pair(0x99, i as u64))
                .collect(),
            ephemeral: false,
            reserved_for: match s.reserved {
                1 => Some(JOB),
                2 => Some(OTHER_JOB),
                _ => None,
            },
            connected: s.connected,
            last_seen: from_millis(0),
            created_at: from_millis(0),
        })
        .collect()
}

fn scheduler_spec(provider: Option<usize>, image: usize, team: bool) -> JobSpec {
    let mut raw = RawJobSpec {
        command: Some(vec!["true".into()]),
        provider: provider.map(|p| PROVIDERS[p].to_owned()),
        image: IMAGES[image].map(str::to_owned),
        ..Default::default()
    };
    if team {
        raw.labels.insert("team".into(), "ci".into());
    }
    JobSpec::parse(raw, &SpecLimits::default()).unwrap()
}

const SELECTIONS: [WorkerSelection; 5] = [
    WorkerSelection::FirstAvailable,
    WorkerSelection::LeastLoaded,
    WorkerSelection::RoundRobin,
    WorkerSelection::MostCapacity,
    WorkerSelection::Affinity,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// The chosen worker is always eligible (state, connection, free slot,
    /// reservation, provider, image) and never at capacity; a worker is
    /// chosen whenever one is eligible, the one reserved for the job
    /// first; each strategy picks what it names.
    #[test]
    fn selected_worker_is_eligible(
        shapes in prop::collection::vec(arb_worker_shape(), 0..10),
        strategy in 0usize..5,
        provider in prop::option::of(0usize..3),
        image in 0usize..3,
        team in any::<bool>(),
        cursor in any::<u64>(),
    ) {
        let workers = build_workers(&shapes);
        let spec = scheduler_spec(provider, image, team);
        let strategy = SELECTIONS[strategy];
        let mut cursor = cursor;
        let pick = select_worker(strategy, JOB, &spec, &workers, &mut cursor);
        let eligible: Vec<&Worker> = workers
            .iter()
            .filter(|w| {
                w.connected
                    && matches!(w.state, WorkerState::Ready | WorkerState::Busy)
                    && w.jobs.len() < w.capacity as usize
                    && w.reserved_for.is_none_or(|r| r == JOB)
                    && provider.is_none_or(|p| w.provider.as_str() == PROVIDERS[p])
                    && IMAGES[image].is_none_or(|i| w.image.as_deref() == Some(i))
            })
            .collect();
        for w in &workers {
            prop_assert_eq!(is_eligible(w, JOB, &spec), eligible.iter().any(|e| e.id == w.id));
        }
        let Some(id) = pick else {
            prop_assert!(eligible.is_empty(), "no pick among {} eligible", eligible.len());
            return Ok(());
        };
        let chosen = eligible.iter().find(|w| w.id == id);
        prop_assert!(chosen.is_some(), "picked an ineligible worker");
        let chosen = chosen.unwrap();
        prop_assert!(chosen.jobs.len() < chosen.capacity as usize, "picked a worker at capacity");
        if let Some(p) = provider {
            prop_assert_eq!(chosen.provider.as_str(), PROVIDERS[p], "named provider ignored");
        }
        if eligible.iter().any(|w| w.reserved_for == Some(JOB)) {
            prop_assert_eq!(chosen.reserved_for, Some(JOB), "the reserved worker was passed over");
            return Ok(());
        }
        match strategy {
            WorkerSelection::FirstAvailable => prop_assert_eq!(chosen.id, eligible[0].id),
            WorkerSelection::LeastLoaded => {
                prop_assert!(eligible.iter().all(|w| w.jobs.len() >= chosen.jobs.len()));
            }
            WorkerSelection::MostCapacity => {
                prop_assert!(eligible.iter().all(|w| w.free_slots() <= chosen.free_slots()));
            }
            WorkerSelection::Affinity => {
                let a = |w: &Worker| affinity(spec.labels(), &w.labels);
                prop_assert!(eligible.iter().all(|w| a(w) <= a(chosen)));
            }
            WorkerSelection::RoundRobin => {}
        }
    }

    /// Round robin visits every eligible worker in turn.
    #[test]
    fn round_robin_visits_everyone(n in 1usize..6, start in any::<u64>()) {
        let shapes: Vec<WorkerShape> = (0..n)
            .map(|_| WorkerShape { state: 2, connected: true, capacity: 1, held: 0, provider: 0, image: 0, reserved: 0, team: false })
            .collect();
        let workers = build_workers(&shapes);
        let spec = scheduler_spec(None, 0, false);
        let mut cursor = start;
        let picks: BTreeSet<WorkerId> = (0..n)
            .filter_map(|_| select_worker(WorkerSelection::RoundRobin, JOB, &spec, &workers, &mut cursor))
            .collect();
        prop_assert_eq!(picks.len(), n);
    }

    /// A named provider is honoured (or refused, never swapped); a chosen
    /// provider is healthy with room and runs the image if one is named.
    #[test]
    fn selected_provider_is_valid(
        providers in prop::collection::vec((any::<bool>(), 0u32..4, 0u32..4, any::<bool>()), 0..3),
        named in prop::option::of(0usize..3),
        image in 0usize..3,
        preference in prop::collection::vec(0usize..3, 0..3),
    ) {
        let snapshots: Vec<ProviderSnapshot> = providers
            .iter()
            .enumerate()
            .map(|(i, (healthy, workers, max, runs_images))| ProviderSnapshot {
                id: ProviderId::new(PROVIDERS[i]),
                healthy: *healthy,
                workers: *workers,
                max_workers: *max,
                runs_images: *runs_images,
            })
            .collect();
        let preference: Vec<ProviderId> = preference.iter().map(|p| ProviderId::new(PROVIDERS[*p])).collect();
        let spec = scheduler_spec(named, image, false);
        let needs_image = IMAGES[image].is_some();
        let result = select_provider(&spec, &snapshots, &preference);
        let fits = |p: &ProviderSnapshot| p.healthy && p.workers < p.max_workers && (!needs_image || p.runs_images);
        match (&result, named) {
            (Ok(id), _) => {
                let p = snapshots.iter().find(|p| p.id == *id).unwrap();
                prop_assert!(fits(p), "{:?} chosen without room or image support", p);
                if let Some(n) = named {
                    prop_assert_eq!(id.as_str(), PROVIDERS[n], "named provider swapped");
                }
            }
            (Err(NoProvider::Unknown(name)), Some(n)) => {
                prop_assert_eq!(name.as_str(), PROVIDERS[n]);
                prop_assert!(snapshots.iter().all(|p| p.id.as_str() != PROVIDERS[n]));
            }
            (Err(NoProvider::Busy), Some(n)) => {
                let p = snapshots.iter().find(|p| p.id.as_str() == PROVIDERS[n]).unwrap();
                prop_assert!(!fits(p));
            }
            (Err(NoProvider::CannotRunImages(_)), _) => prop_assert!(needs_image),
            (Err(_), None) => {
                prop_assert!(!snapshots.iter().any(fits), "a fitting provider was passed over");
            }
        }
        if named.is_none()
            && let Ok(id) = &result
        {
                // Preference: no more preferred provider fits.
                let rank = |p: &ProviderId| preference.iter().position(|x| x == p).unwrap_or(usize::MAX);
                let better = snapshots.iter().filter(|p| fits(p)).any(|p| (rank(&p.id), &p.id) < (rank(id), id));
                prop_assert!(!better, "a preferred provider with room was passed over");
        }
    }
}
