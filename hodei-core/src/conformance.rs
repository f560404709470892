//! The store conformance suite: the behaviour every adapter of the store
//! ports promises, written once and run against each adapter (the
//! in-memory store in `hodei-core/tests/conformance_memory.rs`, PostgreSQL
//! in `hodei-postgres/tests/conformance.rs`).
//!
//! Each check is a `pub async fn` taking a fresh, empty store as an
//! `Arc<S>` where `S` implements every store port ([`Store`]); it panics on
//! the first broken promise. [`store_conformance_tests!`] turns the whole
//! list into `#[tokio::test]`s given an async fixture:
//!
//! ```text
//! async fn fixture() -> Option<(Arc<MemoryStore>, ())> {
//!     Some((Arc::new(MemoryStore::new()), ()))
//! }
//! hodei_core::store_conformance_tests!(fixture);
//! ```
//!
//! The fixture returns `None` to skip (no database configured); the second
//! element is a guard kept alive for the test (e.g. a database dropped
//! after it).
//!
//! The checks use virtual times (a fixed origin plus milliseconds) for the
//! data, and real time only to bound waits on live streams. They avoid the
//! corners the ports leave to adapters (a limit of 0, the cursor format,
//! re-issuing a token).
//!
//! [`store_conformance_tests!`]: crate::store_conformance_tests

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::event::{DomainEvent, EventBody};
use crate::ids::{Actor, CorrelationId, EventId, JobId, ProviderId, WorkerId};
use crate::job::{Failure, FailureKind, Job, JobCommand, JobState, JobStatus, TransitionContext};
use crate::ports::{
    AuditFilter, AuditQuery, Created, EventLog, EventSubscription, JobFilter, JobQueue, JobStore,
    JobUpdate, Leases, LogLine, LogStore, LogStream, NewJob, NewLogLine, ProviderRecord,
    ProviderStore, SecretStore, StoreError, TokenRejection, WorkerRegistry,
};
use crate::retry::RetryPolicy;
use crate::spec::{JobSpec, RawJobSpec, SpecLimits};
use crate::time::{Timestamp, from_millis};
use crate::worker::{Worker, WorkerState};

/// Every store port at once: what the suite runs against.
pub trait Store:
    JobStore
    + JobQueue
    + EventLog
    + EventSubscription
    + AuditQuery
    + LogStore
    + SecretStore
    + WorkerRegistry
    + ProviderStore
    + Leases
    + Send
    + Sync
    + 'static
{
}

impl<T> Store for T where
    T: JobStore
        + JobQueue
        + EventLog
        + EventSubscription
        + AuditQuery
        + LogStore
        + SecretStore
        + WorkerRegistry
        + ProviderStore
        + Leases
        + Send
        + Sync
        + 'static
{
}

/// The names of all checks, in the order [`store_conformance_tests!`]
/// declares them.
///
/// [`store_conformance_tests!`]: crate::store_conformance_tests
pub const CHECKS: &[&str] = &[
    "jobs_create_get_and_list",
    "jobs_update_checks_the_version",
    "jobs_idempotency_key_returns_the_existing_job",
    "queue_claims_by_priority_then_fifo",
    "queue_honours_not_before",
    "queue_claims_are_exclusive_until_the_lease_ends",
    "queue_follows_the_job_state",
    "queue_lists_overdue_jobs",
    "events_get_increasing_sequences",
    "events_subscription_catches_up_then_goes_live",
    "audit_filters_pages_and_purges",
    "logs_append_dedup_and_read",
    "logs_follow_history_then_live_until_finished",
    "secrets_put_get_list_delete",
    "workers_upsert_get_list",
    "worker_tokens_are_one_time",
    "providers_upsert_and_list",
    "leases_are_exclusive_until_they_expire",
    "leases_have_one_winner_under_contention",
];

/// Declares one `#[tokio::test]` per conformance check.
///
/// `$fixture` names an `async fn() -> Option<(Arc<S>, G)>` giving a fresh,
/// empty store (or `None` to skip) and a guard kept until the test ends.
/// The calling crate needs `tokio` with the `macros` and `rt-multi-thread`
/// features.
#[macro_export]
macro_rules! store_conformance_tests {
    ($fixture:path) => {
        $crate::store_conformance_tests!(@each $fixture;
            jobs_create_get_and_list,
            jobs_update_checks_the_version,
            jobs_update_many_decides_each_entry,
            jobs_create_many_decides_each_entry,
            jobs_idempotency_key_returns_the_existing_job,
            queue_claims_by_priority_then_fifo,
            queue_honours_not_before,
            queue_claims_are_exclusive_until_the_lease_ends,
            queue_follows_the_job_state,
            queue_lists_overdue_jobs,
            events_get_increasing_sequences,
            events_subscription_catches_up_then_goes_live,
            audit_filters_pages_and_purges,
            logs_append_dedup_and_read,
            logs_follow_history_then_live_until_finished,
            secrets_put_get_list_delete,
            workers_upsert_get_list,
            worker_tokens_are_one_time,
            providers_upsert_and_list,
            leases_are_exclusive_until_they_expire,
            leases_have_one_winner_under_contention,
        );
    };
    (@each $fixture:path; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let Some((store, _guard)) = $fixture().await else {
                    return;
                };
                $crate::conformance::$check(store).await;
            }
        )*
    };
}

/// Create, get, list newest first with a cursor and a state filter, and
/// refuse a second job with the same id.
pub async fn jobs_create_get_and_list<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let mut jobs = Vec::new();
    for i in 0..3 {
        let (job, events) = new_job(i, JobOptions::default());
        let created = JobStore::create(s, &job, events).await.expect("create");
        match created {
            Created::New(events) => assert_eq!(events.len(), 2, "JobCreated + JobQueued"),
            other => panic!("expected a new job, got {other:?}"),
        }
        jobs.push(job);
    }
    for job in &jobs {
        let got = JobStore::get(s, job.id).await.expect("get");
        assert_eq!(got.as_ref(), Some(job), "a job reads back as stored");
    }
    assert_eq!(JobStore::get(s, job_id()).await.expect("get unknown"), None);

    let again = JobStore::create(s, &jobs[0], Vec::new()).await;
    assert!(
        matches!(again, Err(StoreError::AlreadyExists(_))),
        "a second job with the same id is refused, got {again:?}"
    );

    // Newest first, two pages.
    let page = JobStore::list(
        s,
        &JobFilter {
            limit: 2,
            ..Default::default()
        },
    )
    .await
    .expect("list");
    assert_eq!(ids(&page.jobs), vec![jobs[2].id, jobs[1].id]);
    let cursor = page.next_cursor.expect("a second page");
    let page = JobStore::list(
        s,
        &JobFilter {
            limit: 2,
            cursor: Some(cursor),
            ..Default::default()
        },
    )
    .await
    .expect("list page 2");
    assert_eq!(ids(&page.jobs), vec![jobs[0].id]);
    assert_eq!(page.next_cursor, None, "the last page has no cursor");

    // Filter by state.
    let (mut running, events) = new_job(3, JobOptions::default());
    JobStore::create(s, &running, events).await.expect("create");
    let expected = running.version;
    let events = transition(&mut running, schedule(10_000), 4);
    JobStore::update(s, &running, expected, events)
        .await
        .expect("update");
    let scheduled = JobStore::list(
        s,
        &JobFilter {
            state: Some(JobState::Scheduled),
            limit: 10,
            ..Default::default()
        },
    )
    .await
    .expect("list by state");
    assert_eq!(ids(&scheduled.jobs), vec![running.id]);
    let pending = JobStore::list(
        s,
        &JobFilter {
            state: Some(JobState::Pending),
            limit: 10,
            ..Default::default()
        },
    )
    .await
    .expect("list by state");
    assert_eq!(ids(&pending.jobs), vec![jobs[2].id, jobs[1].id, jobs[0].id]);

    let bad = JobStore::list(
        s,
        &JobFilter {
            cursor: Some("not a cursor".into()),
            ..Default::default()
        },
    )
    .await;
    assert!(
        matches!(bad, Err(StoreError::Invalid(_))),
        "a malformed cursor is refused, got {bad:?}"
    );
}

/// `update` stores the change and its events when the version matches,
/// and reports the version found otherwise.
pub async fn jobs_update_checks_the_version<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let (mut job, events) = new_job(0, JobOptions::default());
    JobStore::create(s, &job, events).await.expect("create");
    let stale = job.clone();

    let events = transition(&mut job, schedule(10_000), 1);
    assert_eq!(job.version, 2);
    let stored = JobStore::update(s, &job, 1, events).await.expect("update");
    assert_eq!(stored.len(), 1);
    assert!(stored[0].sequence > 0, "the store assigns sequences");
    assert_eq!(stored[0].event_type(), "JobScheduled");
    assert_eq!(
        JobStore::get(s, job.id).await.expect("get"),
        Some(job.clone())
    );

    // A replica that read version 1 loses.
    let mut other = stale;
    let events = transition(
        &mut other,
        JobCommand::Cancel {
            reason: "late".into(),
        },
        2,
    );
    let lost = JobStore::update(s, &other, 1, events).await;
    assert_eq!(
        lost,
        Err(StoreError::Conflict {
            job: job.id,
            expected: 1,
            found: 2
        })
    );
    assert_eq!(
        JobStore::get(s, job.id).await.expect("get"),
        Some(job.clone()),
        "a conflicting update changes nothing"
    );
    let job_events = EventLog::job_events(s, job.id).await.expect("job events");
    assert_eq!(
        types(&job_events),
        vec!["JobCreated", "JobQueued", "JobScheduled"],
        "the losing update's events are not stored"
    );

    let (ghost, _) = new_job(1, JobOptions::default());
    let missing = JobStore::update(s, &ghost, 1, Vec::new()).await;
    assert!(
        matches!(missing, Err(StoreError::NotFound(_))),
        "updating an unknown job is NotFound, got {missing:?}"
    );
}

/// `update_many`: each entry is decided on its own (a conflict and an
/// unknown job fail only their entries), the answers come in entry order
/// with sequences in that order, the queue follows each stored state, the
/// workers of every entry are saved (where the store saves workers with
/// updates), and a batch naming one job twice stores nothing.
pub async fn jobs_update_many_decides_each_entry<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let (mut scheduled, events) = new_job(0, JobOptions::default());
    JobStore::create(s, &scheduled, events)
        .await
        .expect("create");
    let (mut stale, events) = new_job(1, JobOptions::default());
    JobStore::create(s, &stale, events).await.expect("create");
    let (mut cancelled, events) = new_job(2, JobOptions::default());
    JobStore::create(s, &cancelled, events)
        .await
        .expect("create");
    let (ghost, _) = new_job(3, JobOptions::default());
    let stored_stale = stale.clone();

    let scheduled_events = transition(&mut scheduled, schedule(10_000), 100);
    let stale_events = transition(&mut stale, schedule(10_000), 101);
    let cancel = JobCommand::Cancel {
        reason: "no longer needed".into(),
    };
    let cancelled_events = transition(&mut cancelled, cancel, 102);
    let saves = JobStore::update_saves_workers(s);
    let (mut busy, mut idle) = (worker(0), worker(1));
    busy.state = WorkerState::Busy;
    busy.jobs = vec![scheduled.id];
    idle.state = WorkerState::Ready;
    let with = |w: &Worker| if saves { vec![w.clone()] } else { Vec::new() };
    let answers = JobStore::update_many(
        s,
        vec![
            JobUpdate {
                job: scheduled.clone(),
                expected_version: 1,
                events: scheduled_events,
                workers: with(&busy),
            },
            JobUpdate {
                job: stale.clone(),
                expected_version: 7,
                events: stale_events,
                workers: with(&idle),
            },
            JobUpdate {
                job: cancelled.clone(),
                expected_version: 1,
                events: cancelled_events,
                workers: Vec::new(),
            },
            JobUpdate {
                job: ghost.clone(),
                expected_version: 1,
                events: Vec::new(),
                workers: Vec::new(),
            },
        ],
    )
    .await
    .expect("update_many");
    assert_eq!(answers.len(), 4, "one answer per entry: {answers:?}");
    let first = answers[0].as_ref().expect("the matching entry is stored");
    assert_eq!(types(first), vec!["JobScheduled"]);
    assert_eq!(
        answers[1],
        Err(StoreError::Conflict {
            job: stale.id,
            expected: 7,
            found: 1
        }),
        "a stale entry loses alone"
    );
    let third = answers[2].as_ref().expect("the cancel is stored");
    assert_eq!(types(third), vec!["JobCancelled"]);
    assert!(
        matches!(answers[3], Err(StoreError::NotFound(_))),
        "an unknown job is NotFound, got {:?}",
        answers[3]
    );
    let mut all = seqs(first);
    all.extend(seqs(third));
    assert!(all[0] > 0, "the store assigns sequences");
    assert!(
        all.windows(2).all(|w| w[0] < w[1]),
        "sequences follow the entries' order: {all:?}"
    );

    assert_eq!(
        JobStore::get(s, scheduled.id).await.expect("get"),
        Some(scheduled.clone())
    );
    assert_eq!(
        JobStore::get(s, stale.id).await.expect("get"),
        Some(stored_stale)
    );
    assert_eq!(
        JobStore::get(s, cancelled.id).await.expect("get"),
        Some(cancelled.clone())
    );
    assert_eq!(JobStore::get(s, ghost.id).await.expect("get"), None);
    assert_eq!(
        types(&EventLog::job_events(s, stale.id).await.expect("events")),
        vec!["JobCreated", "JobQueued"],
        "the losing entry's events are not stored"
    );
    assert_eq!(
        types(&EventLog::job_events(s, cancelled.id).await.expect("events")),
        vec!["JobCreated", "JobQueued", "JobCancelled"]
    );
    let claim = JobQueue::claim(s, "replica-a", at(200), 10, Duration::from_secs(30))
        .await
        .expect("claim");
    assert_eq!(
        ids(&claim.jobs),
        vec![stale.id],
        "only the job still pending is queued"
    );
    if saves {
        assert_eq!(
            WorkerRegistry::get(s, busy.id).await.expect("get"),
            Some(busy)
        );
        assert_eq!(
            WorkerRegistry::get(s, idle.id).await.expect("get"),
            Some(idle),
            "saved although its job's update lost"
        );
    }

    // One job twice: refused as a whole, nothing stored.
    let mut again = scheduled.clone();
    let events = transition(&mut again, JobCommand::Cancel { reason: "x".into() }, 300);
    let twice = JobStore::update_many(
        s,
        vec![
            JobUpdate {
                job: again.clone(),
                expected_version: scheduled.version,
                events: events.clone(),
                workers: Vec::new(),
            },
            JobUpdate {
                job: again,
                expected_version: scheduled.version,
                events,
                workers: Vec::new(),
            },
        ],
    )
    .await;
    assert!(
        matches!(&twice, Err(StoreError::Invalid(m)) if m.contains("twice")),
        "a batch naming one job twice is refused, got {twice:?}"
    );
    assert_eq!(
        JobStore::get(s, scheduled.id).await.expect("get"),
        Some(scheduled),
        "a refused batch stores nothing"
    );
}

/// `create_many`: each entry is decided on its own, in entry order: new
/// jobs are stored with their events and queued in entry order; an
/// idempotency key already used answers `Existing` with the stored job, a
/// key repeated within the batch answers `Existing` with the batch's
/// first job of that key; an id already stored is `AlreadyExists`.
pub async fn jobs_create_many_decides_each_entry<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let keyed = |i: i64, key: &str| {
        new_job(
            i,
            JobOptions {
                idempotency_key: Some(key.to_owned()),
                ..JobOptions::default()
            },
        )
    };
    let (old, old_events) = keyed(0, "key-old");
    JobStore::create(s, &old, old_events).await.expect("create");
    let (stored, stored_events) = new_job(1, JobOptions::default());
    JobStore::create(s, &stored, stored_events.clone())
        .await
        .expect("create");

    let (first, first_events) = new_job(2, JobOptions::default());
    let (replay, replay_events) = keyed(3, "key-old");
    let (twin_a, twin_a_events) = keyed(4, "key-twin");
    let (twin_b, twin_b_events) = keyed(5, "key-twin");
    let (last, last_events) = new_job(6, JobOptions::default());
    let entry = |job: &Job, events: Vec<DomainEvent>| NewJob {
        job: job.clone(),
        events,
    };
    let answers = JobStore::create_many(
        s,
        vec![
            entry(&first, first_events),
            entry(&replay, replay_events),
            entry(&twin_a, twin_a_events),
            entry(&twin_b, twin_b_events),
            entry(&stored, stored_events),
            entry(&last, last_events),
        ],
    )
    .await
    .expect("create_many");
    assert_eq!(answers.len(), 6, "one answer per entry: {answers:?}");
    let mut seqs_in_order = Vec::new();
    for (i, job) in [(0, &first), (2, &twin_a), (5, &last)] {
        match &answers[i] {
            Ok(Created::New(events)) => {
                assert_eq!(types(events), vec!["JobCreated", "JobQueued"], "entry {i}");
                assert!(events.iter().all(|e| e.sequence > 0));
                seqs_in_order.extend(seqs(events));
            }
            other => panic!("entry {i} (job {}) is new, got {other:?}", job.id),
        }
        assert_eq!(
            JobStore::get(s, job.id).await.expect("get").as_ref(),
            Some(job)
        );
    }
    assert!(
        seqs_in_order.windows(2).all(|w| w[0] < w[1]),
        "sequences follow the entries: {seqs_in_order:?}"
    );
    match &answers[1] {
        Ok(Created::Existing(existing)) => assert_eq!(existing.id, old.id),
        other => panic!("a used key answers the stored job, got {other:?}"),
    }
    match &answers[3] {
        Ok(Created::Existing(existing)) => assert_eq!(existing.id, twin_a.id),
        other => panic!("a key repeated in the batch answers its first job, got {other:?}"),
    }
    assert!(
        matches!(answers[4], Err(StoreError::AlreadyExists(_))),
        "an id already stored, got {:?}",
        answers[4]
    );
    for ghost in [&replay, &twin_b] {
        assert_eq!(JobStore::get(s, ghost.id).await.expect("get"), None);
        assert!(
            EventLog::job_events(s, ghost.id)
                .await
                .expect("events")
                .is_empty(),
            "no events for an entry not stored"
        );
    }
    assert_eq!(
        types(&EventLog::job_events(s, stored.id).await.expect("events")),
        vec!["JobCreated", "JobQueued"],
        "the stored job's events are not written twice"
    );
    let claim = JobQueue::claim(s, "replica-a", at(500), 10, Duration::from_secs(30))
        .await
        .expect("claim");
    assert_eq!(
        ids(&claim.jobs),
        vec![old.id, stored.id, first.id, twin_a.id, last.id],
        "queued FIFO, the batch's jobs in entry order"
    );
}

/// A second submission with the same idempotency key stores nothing and
/// returns the first job.
pub async fn jobs_idempotency_key_returns_the_existing_job<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let key = JobOptions {
        idempotency_key: Some("client-key-1".into()),
        ..Default::default()
    };
    let (first, events) = new_job(0, key.clone());
    assert!(matches!(
        JobStore::create(s, &first, events).await.expect("create"),
        Created::New(_)
    ));
    let (second, events) = new_job(1, key);
    match JobStore::create(s, &second, events)
        .await
        .expect("create again")
    {
        Created::Existing(existing) => assert_eq!(*existing, first),
        other => panic!("expected the existing job, got {other:?}"),
    }
    assert_eq!(JobStore::get(s, second.id).await.expect("get"), None);
    assert!(
        EventLog::job_events(s, second.id)
            .await
            .expect("events")
            .is_empty(),
        "nothing of the duplicate is stored"
    );
    assert_eq!(JobQueue::depth(s).await.expect("depth"), 1);
}

/// Higher priority first, FIFO within a priority.
pub async fn queue_claims_by_priority_then_fifo<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let mut created = Vec::new();
    for (i, priority) in [0, 5, 0, 5, -1, 5].into_iter().enumerate() {
        let (job, events) = new_job(
            i as i64,
            JobOptions {
                priority,
                ..Default::default()
            },
        );
        JobStore::create(s, &job, events).await.expect("create");
        created.push(job.id);
    }
    assert_eq!(JobQueue::depth(s).await.expect("depth"), 6);
    let claim = JobQueue::claim(s, "replica-a", at(1_000), 4, LEASE)
        .await
        .expect("claim");
    assert_eq!(
        ids(&claim.jobs),
        vec![created[1], created[3], created[5], created[0]],
        "priority 5 in submission order, then priority 0"
    );
    assert!(claim.jobs.iter().all(|j| j.state() == JobState::Pending));
    assert_eq!(
        claim.next_ready_at,
        Some(at(1_000)),
        "ready jobs are left over: claimable now"
    );
    let claim = JobQueue::claim(s, "replica-a", at(1_000), 10, LEASE)
        .await
        .expect("claim");
    assert_eq!(ids(&claim.jobs), vec![created[2], created[4]]);
    assert_eq!(claim.next_ready_at, None, "nothing is left waiting");
    assert_eq!(
        JobQueue::depth(s).await.expect("depth"),
        6,
        "claimed jobs stay queued until they change state"
    );
}

/// A job is not claimable before its `not_before`; `next_ready_at` says
/// when it will be.
pub async fn queue_honours_not_before<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let (mut later, events) = new_job(0, JobOptions::default());
    later.status = JobStatus::Pending {
        not_before: Some(at(60_000)),
    };
    JobStore::create(s, &later, events).await.expect("create");
    let (now_job, events) = new_job(1, JobOptions::default());
    JobStore::create(s, &now_job, events).await.expect("create");

    // A lease long enough to outlast the check.
    let lease = Duration::from_secs(3600);
    let claim = JobQueue::claim(s, "a", at(1_000), 10, lease)
        .await
        .expect("claim");
    assert_eq!(ids(&claim.jobs), vec![now_job.id]);
    assert_eq!(claim.next_ready_at, Some(at(60_000)));
    assert_eq!(JobQueue::depth(s).await.expect("depth"), 2);

    let claim = JobQueue::claim(s, "a", at(59_999), 10, lease)
        .await
        .expect("claim");
    assert!(claim.jobs.is_empty());
    let claim = JobQueue::claim(s, "a", at(60_000), 10, lease)
        .await
        .expect("claim");
    assert_eq!(ids(&claim.jobs), vec![later.id], "claimable at not_before");
    assert_eq!(claim.next_ready_at, None);
}

/// One claimant per job while the lease runs; released or lapsed jobs are
/// claimable again.
pub async fn queue_claims_are_exclusive_until_the_lease_ends<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let mut created = Vec::new();
    for i in 0..3 {
        let (job, events) = new_job(i, JobOptions::default());
        JobStore::create(s, &job, events).await.expect("create");
        created.push(job.id);
    }
    let a = JobQueue::claim(s, "a", at(0), 2, LEASE)
        .await
        .expect("claim a");
    assert_eq!(ids(&a.jobs), vec![created[0], created[1]]);
    let b = JobQueue::claim(s, "b", at(0), 10, LEASE)
        .await
        .expect("claim b");
    assert_eq!(ids(&b.jobs), vec![created[2]], "b only gets what a did not");
    let b = JobQueue::claim(s, "b", at(29_999), 10, LEASE)
        .await
        .expect("claim b");
    assert!(b.jobs.is_empty(), "leases still run: {:?}", ids(&b.jobs));

    // Releasing a claim one does not hold changes nothing.
    JobQueue::release(s, created[0], "b")
        .await
        .expect("release");
    let c = JobQueue::claim(s, "c", at(1_000), 10, LEASE)
        .await
        .expect("claim c");
    assert!(c.jobs.is_empty());

    // The holder releases: claimable again at once.
    JobQueue::release(s, created[0], "a")
        .await
        .expect("release");
    let c = JobQueue::claim(s, "c", at(1_000), 10, LEASE)
        .await
        .expect("claim c");
    assert_eq!(ids(&c.jobs), vec![created[0]]);

    // a's other claim lapses at the end of its lease.
    let d = JobQueue::claim(s, "d", at(30_000), 10, LEASE)
        .await
        .expect("claim d");
    assert_eq!(ids(&d.jobs), vec![created[1], created[2]], "lapsed leases");
}

/// Leaving `PENDING` leaves the queue; a retry re-enters it, claimable
/// after its backoff.
pub async fn queue_follows_the_job_state<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let (mut job, events) = new_job(
        0,
        JobOptions {
            max_attempts: 3,
            ..Default::default()
        },
    );
    JobStore::create(s, &job, events).await.expect("create");
    let claim = JobQueue::claim(s, "a", at(0), 10, LEASE)
        .await
        .expect("claim");
    assert_eq!(ids(&claim.jobs), vec![job.id]);

    let v = job.version;
    let events = transition(&mut job, schedule(10_000), 1);
    JobStore::update(s, &job, v, events)
        .await
        .expect("schedule");
    assert_eq!(JobQueue::depth(s).await.expect("depth"), 0);
    let claim = JobQueue::claim(s, "b", at(40_000), 10, LEASE)
        .await
        .expect("claim");
    assert!(claim.jobs.is_empty(), "a scheduled job is not in the queue");

    // Provisioning failed: a retry, back in PENDING with a backoff.
    let v = job.version;
    let failure = Failure::new(FailureKind::ProvisioningFailed, "no capacity");
    let events = transition(&mut job, JobCommand::Fail(failure), 2);
    let JobStatus::Pending {
        not_before: Some(not_before),
    } = job.status
    else {
        panic!("expected a retry in PENDING, got {:?}", job.status);
    };
    assert_eq!(job.attempt, 2);
    JobStore::update(s, &job, v, events).await.expect("retry");
    assert_eq!(JobQueue::depth(s).await.expect("depth"), 1);
    let early = JobQueue::claim(s, "b", at(2), 10, LEASE)
        .await
        .expect("claim");
    assert!(early.jobs.is_empty(), "not before the backoff");
    assert_eq!(early.next_ready_at, Some(not_before));
    let claim = JobQueue::claim(s, "b", not_before, 10, LEASE)
        .await
        .expect("claim");
    assert_eq!(ids(&claim.jobs), vec![job.id]);
    assert_eq!(claim.jobs[0].attempt, 2);
}

/// `overdue` lists jobs in SCHEDULED, ASSIGNED or RUNNING whose deadline
/// passed, earliest first.
pub async fn queue_lists_overdue_jobs<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let worker = worker_id();
    let mut expected = Vec::new();
    // SCHEDULED until 5 s, ASSIGNED until 3 s, RUNNING until 8 s.
    let plans: [&[JobCommand]; 3] = [
        &[schedule(5_000)],
        &[JobCommand::Assign {
            worker,
            deadline: at(3_000),
        }],
        &[
            JobCommand::Assign {
                worker,
                deadline: at(1_000),
            },
            JobCommand::Start,
        ],
    ];
    for (i, plan) in plans.into_iter().enumerate() {
        let (mut job, events) = new_job(
            i as i64,
            JobOptions {
                timeout_secs: 8,
                ..Default::default()
            },
        );
        JobStore::create(s, &job, events).await.expect("create");
        for command in plan {
            let v = job.version;
            let events = transition(&mut job, command.clone(), 0);
            JobStore::update(s, &job, v, events).await.expect("update");
        }
        expected.push(job);
    }
    assert_eq!(expected[2].status.deadline(), Some(at(8_000)));
    // A pending job and a terminal one are never overdue.
    let (pending, events) = new_job(3, JobOptions::default());
    JobStore::create(s, &pending, events).await.expect("create");
    let (mut cancelled, events) = new_job(4, JobOptions::default());
    JobStore::create(s, &cancelled, events)
        .await
        .expect("create");
    let events = transition(&mut cancelled, JobCommand::Cancel { reason: "x".into() }, 0);
    JobStore::update(s, &cancelled, 1, events)
        .await
        .expect("cancel");

    let none = JobQueue::overdue(s, at(2_999), 10).await.expect("overdue");
    assert!(none.is_empty(), "nothing due yet: {:?}", ids(&none));
    let due = JobQueue::overdue(s, at(5_000), 10).await.expect("overdue");
    assert_eq!(
        ids(&due),
        vec![expected[1].id, expected[0].id],
        "deadline order, inclusive"
    );
    let due = JobQueue::overdue(s, at(100_000), 10)
        .await
        .expect("overdue");
    assert_eq!(
        ids(&due),
        vec![expected[1].id, expected[0].id, expected[2].id]
    );
    assert_eq!(due[2], expected[2], "overdue jobs read back whole");
    let one = JobQueue::overdue(s, at(100_000), 1).await.expect("overdue");
    assert_eq!(ids(&one), vec![expected[1].id], "limit");
}

/// Sequences increase across all writes; `read_after` pages in order;
/// `job_events` holds one job's events in order.
pub async fn events_get_increasing_sequences<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let (mut job, events) = new_job(0, JobOptions::default());
    let Created::New(mut all) = JobStore::create(s, &job, events).await.expect("create") else {
        panic!("new job expected");
    };
    let worker = worker_id();
    all.extend(
        EventLog::append(
            s,
            vec![event(
                EventBody::WorkerReady { worker_id: worker },
                "c-w",
                5,
            )],
        )
        .await
        .expect("append"),
    );
    let events = transition(&mut job, schedule(10_000), 6);
    all.extend(JobStore::update(s, &job, 1, events).await.expect("update"));
    assert_eq!(all.len(), 4);
    for pair in all.windows(2) {
        assert!(
            pair[0].sequence < pair[1].sequence,
            "sequences increase: {} then {}",
            pair[0].sequence,
            pair[1].sequence
        );
    }
    assert!(all[0].sequence > 0);

    let read = EventLog::read_after(s, 0, 100).await.expect("read");
    assert_eq!(read, all, "read back exactly as returned by the writes");
    let page = EventLog::read_after(s, all[1].sequence, 1)
        .await
        .expect("read");
    assert_eq!(page, vec![all[2].clone()]);
    let tail = EventLog::read_after(s, all[3].sequence, 100)
        .await
        .expect("read");
    assert!(tail.is_empty());

    let job_events = EventLog::job_events(s, job.id).await.expect("job events");
    assert_eq!(
        types(&job_events),
        vec!["JobCreated", "JobQueued", "JobScheduled"]
    );
    assert!(job_events.iter().all(|e| e.job_id() == Some(job.id)));
    assert_eq!(job_events[0].correlation_id.as_str(), "corr-0");
    assert_eq!(job_events[0].actor.as_str(), "alice");
}

/// `subscribe(after)` yields stored events after `after`, then new ones as
/// they commit, in order, each once.
pub async fn events_subscription_catches_up_then_goes_live<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let mut written = Vec::new();
    for i in 0..3 {
        written.extend(
            EventLog::append(s, vec![worker_event(i)])
                .await
                .expect("append"),
        );
    }
    let mut from_start = EventSubscription::subscribe(s, 0);
    let mut from_second = EventSubscription::subscribe(s, written[1].sequence);
    assert_eq!(take(&mut from_start, 3).await, written, "catch-up");
    assert_eq!(take(&mut from_second, 1).await, written[2..].to_vec());

    // Live: one write at a time, then a burst.
    let more = EventLog::append(s, vec![worker_event(3)])
        .await
        .expect("append");
    assert_eq!(take(&mut from_start, 1).await, more);
    let burst: Vec<DomainEvent> = (4..14).map(worker_event).collect();
    let burst = EventLog::append(s, burst).await.expect("append");
    let (mut job, events) = new_job(0, JobOptions::default());
    let Created::New(created) = JobStore::create(s, &job, events).await.expect("create") else {
        panic!("new job expected");
    };
    let events = transition(&mut job, schedule(10_000), 1);
    let updated = JobStore::update(s, &job, 1, events).await.expect("update");
    let mut live: Vec<DomainEvent> = more.clone();
    live.extend(burst);
    live.extend(created);
    live.extend(updated);
    assert_eq!(
        take(&mut from_start, live.len() - 1).await,
        live[1..].to_vec()
    );
    assert_eq!(take(&mut from_second, live.len()).await, live);

    // A late subscriber sees the same history.
    let mut late = EventSubscription::subscribe(s, 0);
    let all = take(&mut late, written.len() + live.len()).await;
    let mut expected = written.clone();
    expected.extend(live);
    assert_eq!(all, expected);
    // And nothing more.
    let extra = tokio::time::timeout(Duration::from_millis(200), late.next()).await;
    assert!(extra.is_err(), "no event beyond those written: {extra:?}");
}

/// Audit queries by correlation id, type, actor and time range, with a
/// total and offset/limit paging; `purge_before` deletes in batches.
pub async fn audit_filters_pages_and_purges<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let w = [worker_id(), worker_id()];
    let spec: [(EventBody, &str, &str, i64); 6] = [
        (
            EventBody::WorkerReady { worker_id: w[0] },
            "flow-1",
            "system:engine",
            1_000,
        ),
        (
            EventBody::WorkerDraining { worker_id: w[0] },
            "flow-1",
            "alice",
            2_000,
        ),
        (
            EventBody::WorkerReady { worker_id: w[1] },
            "flow-2",
            "system:engine",
            3_000,
        ),
        (
            EventBody::WorkerTerminated {
                worker_id: w[1],
                reason: "done".into(),
            },
            "flow-2",
            "bob",
            4_000,
        ),
        (
            EventBody::WorkerReady { worker_id: w[0] },
            "flow-3",
            "system:engine",
            5_000,
        ),
        (
            EventBody::SecretAccessed {
                name: "TOKEN".into(),
                job_id: None,
                purpose: "audit test".into(),
            },
            "flow-3",
            "alice",
            6_000,
        ),
    ];
    let mut stored = Vec::new();
    for (body, corr, actor, ms) in spec {
        let e = DomainEvent::new(
            event_id(),
            at(ms),
            CorrelationId::new(corr),
            Actor::new(actor),
            body,
        );
        stored.extend(EventLog::append(s, vec![e]).await.expect("append"));
    }
    let q = |f: AuditFilter| async move { AuditQuery::query(s, &f).await.expect("query") };

    let all = q(AuditFilter::default()).await;
    assert_eq!(all.total, 6);
    assert_eq!(all.events, stored, "sequence order");

    let by_corr = q(AuditFilter {
        correlation_id: Some("flow-2".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(by_corr.total, 2);
    assert_eq!(by_corr.events, stored[2..4].to_vec());

    let by_type = q(AuditFilter {
        event_type: Some("WorkerReady".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(by_type.total, 3);
    assert_eq!(
        seqs(&by_type.events),
        seqs(&[stored[0].clone(), stored[2].clone(), stored[4].clone()])
    );

    let by_actor = q(AuditFilter {
        actor: Some("alice".into()),
        ..Default::default()
    })
    .await;
    assert_eq!(by_actor.events, vec![stored[1].clone(), stored[5].clone()]);

    // since is inclusive, until exclusive.
    let window = q(AuditFilter {
        since: Some(at(2_000)),
        until: Some(at(5_000)),
        ..Default::default()
    })
    .await;
    assert_eq!(window.events, stored[1..4].to_vec());

    let combined = q(AuditFilter {
        event_type: Some("WorkerReady".into()),
        actor: Some("system:engine".into()),
        since: Some(at(2_000)),
        ..Default::default()
    })
    .await;
    assert_eq!(combined.events, vec![stored[2].clone(), stored[4].clone()]);

    let page = q(AuditFilter {
        limit: 2,
        offset: 3,
        ..Default::default()
    })
    .await;
    assert_eq!(page.total, 6, "the total ignores paging");
    assert_eq!(page.events, stored[3..5].to_vec());

    let none = q(AuditFilter {
        correlation_id: Some("nope".into()),
        ..Default::default()
    })
    .await;
    assert_eq!((none.total, none.events.len()), (0, 0));

    // Purge events before 4 s in batches of 2: 2, then 1, then 0.
    assert_eq!(
        AuditQuery::purge_before(s, at(4_000), 2)
            .await
            .expect("purge"),
        2
    );
    assert_eq!(
        AuditQuery::purge_before(s, at(4_000), 2)
            .await
            .expect("purge"),
        1
    );
    assert_eq!(
        AuditQuery::purge_before(s, at(4_000), 2)
            .await
            .expect("purge"),
        0
    );
    let left = q(AuditFilter::default()).await;
    assert_eq!(left.total, 3);
    assert_eq!(left.events, stored[3..].to_vec());
}

/// Appends get gap-free per-job sequences; re-sent lines are ignored;
/// `read` pages.
pub async fn logs_append_dedup_and_read<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let job = job_id();
    assert_eq!(
        LogStore::append(s, job, 1, lines(1..=3))
            .await
            .expect("append"),
        3
    );
    // A re-send after a reconnect overlaps what was stored.
    assert_eq!(
        LogStore::append(s, job, 1, lines(2..=5))
            .await
            .expect("append"),
        5
    );
    assert_eq!(
        LogStore::append(s, job, 1, lines(1..=5))
            .await
            .expect("append"),
        5
    );
    // The next attempt numbers its lines from 1 again.
    assert_eq!(
        LogStore::append(s, job, 2, lines(1..=2))
            .await
            .expect("append"),
        7
    );
    assert_eq!(
        LogStore::append(s, job, 2, Vec::new())
            .await
            .expect("append"),
        7
    );

    let all = LogStore::read(s, job, 0, 100).await.expect("read");
    assert_eq!(
        all.iter().map(|l| l.seq).collect::<Vec<_>>(),
        (1..=7).collect::<Vec<_>>()
    );
    let texts: Vec<&str> = all.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(
        texts,
        vec![
            "line 1", "line 2", "line 3", "line 4", "line 5", "line 1", "line 2"
        ]
    );
    let attempts: Vec<u32> = all.iter().map(|l| l.attempt).collect();
    assert_eq!(attempts, vec![1, 1, 1, 1, 1, 2, 2]);
    assert_eq!(
        all[1].stream,
        LogStream::Stderr,
        "even agent seqs are stderr"
    );
    assert_eq!(all[0].at, at(1), "time of the line kept");

    let page = LogStore::read(s, job, 2, 2).await.expect("read");
    assert_eq!(page.iter().map(|l| l.seq).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(page[0], all[2]);
    assert!(
        LogStore::read(s, job, 7, 100)
            .await
            .expect("read")
            .is_empty()
    );
    assert!(
        LogStore::read(s, job_id(), 0, 100)
            .await
            .expect("read")
            .is_empty()
    );

    // Logs of jobs are separate.
    let other = job_id();
    assert_eq!(
        LogStore::append(s, other, 1, lines(1..=1))
            .await
            .expect("append"),
        1
    );
}

/// `follow` yields history, then live lines, each once, and ends after the
/// last line once the log is finished.
pub async fn logs_follow_history_then_live_until_finished<S: Store + ?Sized>(store: Arc<S>) {
    let job = job_id();
    LogStore::append(&*store, job, 1, lines(1..=3))
        .await
        .expect("append");
    let mut follow = LogStore::follow(&*store, job, 1);
    let history = take(&mut follow, 2).await;
    assert_eq!(
        history.iter().map(|l| l.seq).collect::<Vec<_>>(),
        vec![2, 3]
    );

    // Live lines, appended while the follower waits, in several batches.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for batch in 0..5u64 {
                let first = 4 + batch * 3;
                LogStore::append(&*store, job, 1, lines(first..=first + 2))
                    .await
                    .expect("append");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            LogStore::finish(&*store, job).await.expect("finish");
        })
    };
    let rest = collect_until_end(&mut follow).await;
    writer.await.expect("writer");
    assert_eq!(
        rest.iter().map(|l| l.seq).collect::<Vec<_>>(),
        (4..=18).collect::<Vec<_>>(),
        "every live line once, in order, then the end"
    );

    // A finished log: history then the end at once.
    let mut again = LogStore::follow(&*store, job, 10);
    let tail = collect_until_end(&mut again).await;
    assert_eq!(
        tail.iter().map(|l| l.seq).collect::<Vec<_>>(),
        (11..=18).collect::<Vec<_>>()
    );
    let mut at_end = LogStore::follow(&*store, job, 18);
    assert!(collect_until_end(&mut at_end).await.is_empty());

    // A log finished without any line ends at once too.
    let silent = job_id();
    LogStore::finish(&*store, silent).await.expect("finish");
    let mut empty = LogStore::follow(&*store, silent, 0);
    assert!(collect_until_end(&mut empty).await.is_empty());

    // A store whose terminal job updates finish the log
    // (`JobStore::update_finishes_logs`): a follower of a job that ends
    // stops without a `finish` call.
    if JobStore::update_finishes_logs(&*store) {
        let (mut job, events) = new_job(7, JobOptions::default());
        JobStore::create(&*store, &job, events)
            .await
            .expect("create");
        LogStore::append(&*store, job.id, 1, lines(1..=2))
            .await
            .expect("append");
        let mut follower = LogStore::follow(&*store, job.id, 0);
        assert_eq!(take(&mut follower, 2).await.len(), 2);
        let version = job.version;
        let events = transition(
            &mut job,
            JobCommand::Cancel {
                reason: "done".into(),
            },
            50,
        );
        JobStore::update(&*store, &job, version, events)
            .await
            .expect("update");
        assert!(
            collect_until_end(&mut follower).await.is_empty(),
            "the follower of an ended job stops"
        );
    }
}

/// Secrets by name: put (create or replace), get, list names sorted,
/// delete.
pub async fn secrets_put_get_list_delete<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    SecretStore::put(s, "DEPLOY_KEY", "s3cr3t", at(1_000))
        .await
        .expect("put");
    SecretStore::put(s, "API_TOKEN", "tok-1", at(2_000))
        .await
        .expect("put");
    assert_eq!(
        SecretStore::get(s, "DEPLOY_KEY")
            .await
            .expect("get")
            .as_deref(),
        Some("s3cr3t")
    );
    assert_eq!(SecretStore::get(s, "MISSING").await.expect("get"), None);

    SecretStore::put(s, "DEPLOY_KEY", "rotated ✓", at(5_000))
        .await
        .expect("put");
    assert_eq!(
        SecretStore::get(s, "DEPLOY_KEY")
            .await
            .expect("get")
            .as_deref(),
        Some("rotated ✓")
    );
    let list = SecretStore::list(s).await.expect("list");
    let names: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, vec!["API_TOKEN", "DEPLOY_KEY"], "sorted by name");
    assert_eq!(
        list[1].created_at,
        at(1_000),
        "creation time kept on replace"
    );
    assert_eq!(list[1].updated_at, at(5_000));

    assert!(SecretStore::delete(s, "DEPLOY_KEY").await.expect("delete"));
    assert!(
        !SecretStore::delete(s, "DEPLOY_KEY")
            .await
            .expect("delete again")
    );
    assert_eq!(SecretStore::get(s, "DEPLOY_KEY").await.expect("get"), None);
    assert_eq!(SecretStore::list(s).await.expect("list").len(), 1);
}

/// Worker records: upsert creates or replaces, get and list read back.
pub async fn workers_upsert_get_list<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let mut first = worker(0);
    let mut second = worker(1);
    WorkerRegistry::upsert(s, &first).await.expect("upsert");
    WorkerRegistry::upsert(s, &second).await.expect("upsert");
    assert_eq!(
        WorkerRegistry::get(s, first.id).await.expect("get"),
        Some(first.clone())
    );
    assert_eq!(
        WorkerRegistry::get(s, worker_id()).await.expect("get"),
        None
    );

    first.state = WorkerState::Busy;
    first.jobs = vec![job_id()];
    first.last_seen = at(9_000);
    WorkerRegistry::upsert(s, &first)
        .await
        .expect("upsert again");
    assert_eq!(
        WorkerRegistry::get(s, first.id).await.expect("get"),
        Some(first.clone())
    );
    let mut listed = WorkerRegistry::list(s).await.expect("list");
    listed.sort_by_key(|w| w.created_at);
    assert_eq!(listed, vec![first.clone(), second.clone()]);

    // A registry that records events with its upserts
    // (`WorkerRegistry::upsert_records_events`) stores both.
    if WorkerRegistry::upsert_records_events(s) {
        let before = EventLog::read_after(s, 0, 1000).await.expect("read").len();
        let mut ready = first.clone();
        ready.state = WorkerState::Ready;
        ready.last_seen = at(9_500);
        let ready_event = event(
            EventBody::WorkerReady {
                worker_id: ready.id,
            },
            "corr-ready",
            9_500,
        );
        let stored = WorkerRegistry::upsert_recording(s, &ready, vec![ready_event.clone()])
            .await
            .expect("upsert with its events");
        assert_eq!(stored.len(), 1);
        assert!(stored[0].sequence > 0, "the store assigns sequences");
        assert_eq!(stored[0].event_id, ready_event.event_id);
        assert_eq!(
            WorkerRegistry::get(s, ready.id).await.expect("get"),
            Some(ready.clone())
        );
        let all = EventLog::read_after(s, 0, 1000).await.expect("read");
        assert_eq!(all.len(), before + 1);
        assert_eq!(all.last().map(|e| e.event_id), Some(ready_event.event_id));
        first = ready;

        // Several at once: every record and every event.
        let mut busy = first.clone();
        busy.state = WorkerState::Busy;
        busy.last_seen = at(9_600);
        let mut other = second.clone();
        other.state = WorkerState::Draining;
        other.last_seen = at(9_600);
        let e1 = event(
            EventBody::WorkerReady { worker_id: busy.id },
            "corr-many",
            9_600,
        );
        let e2 = event(
            EventBody::WorkerDraining {
                worker_id: other.id,
            },
            "corr-many",
            9_600,
        );
        let e3 = event(
            EventBody::WorkerReady {
                worker_id: other.id,
            },
            "corr-many",
            9_601,
        );
        WorkerRegistry::upsert_many_recording(
            s,
            vec![
                (busy.clone(), vec![e1.clone()]),
                (other.clone(), vec![e2.clone(), e3.clone()]),
            ],
        )
        .await
        .expect("upsert many with their events");
        assert_eq!(
            WorkerRegistry::get(s, busy.id).await.expect("get"),
            Some(busy.clone())
        );
        assert_eq!(
            WorkerRegistry::get(s, other.id).await.expect("get"),
            Some(other.clone())
        );
        let all = EventLog::read_after(s, 0, 1000).await.expect("read");
        let tail: Vec<_> = all[all.len() - 3..].iter().map(|e| e.event_id).collect();
        assert_eq!(
            tail,
            vec![e1.event_id, e2.event_id, e3.event_id],
            "in order"
        );
        first = busy;
        second = other;
    }

    // A store that saves workers with job updates
    // (`JobStore::update_saves_workers`) saves them in the same call,
    // also when the job's version does not match.
    if JobStore::update_saves_workers(s) {
        let (mut job, events) = new_job(3, JobOptions::default());
        JobStore::create(s, &job, events).await.expect("create");
        let version = job.version;
        let events = transition(&mut job, schedule(10_000), 100);
        first.state = WorkerState::Ready;
        first.jobs.clear();
        let stored = JobStore::update_saving_workers(s, &job, version, events, &[first.clone()])
            .await
            .expect("update with a worker");
        assert_eq!(stored.len(), 1);
        assert_eq!(
            JobStore::get(s, job.id).await.expect("get"),
            Some(job.clone())
        );
        assert_eq!(
            WorkerRegistry::get(s, first.id).await.expect("get"),
            Some(first.clone())
        );
        let mut other = second.clone();
        other.state = WorkerState::Busy;
        let stale =
            JobStore::update_saving_workers(s, &job, version, Vec::new(), &[other.clone()]).await;
        assert!(
            matches!(stale, Err(StoreError::Conflict { .. })),
            "{stale:?}"
        );
        assert_eq!(
            WorkerRegistry::get(s, other.id).await.expect("get"),
            Some(other),
            "saved although the job update lost"
        );
    }
}

/// Registration tokens are one-time: unknown, reused and expired tokens
/// are told apart, and a token presented with another worker's id is
/// refused without being used.
pub async fn worker_tokens_are_one_time<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let w = worker_id();
    WorkerRegistry::issue_token(s, w, "tok-a", at(10_000))
        .await
        .expect("issue");
    WorkerRegistry::issue_token(s, w, "tok-b", at(10_000))
        .await
        .expect("issue");

    let consume = |token: &'static str, ms: i64| async move {
        WorkerRegistry::consume_token(s, token, at(ms))
            .await
            .expect("consume")
    };
    assert_eq!(consume("tok-a", 1_000).await, Ok(w));
    assert_eq!(consume("tok-a", 1_001).await, Err(TokenRejection::Reused));
    assert_eq!(
        consume("tok-never", 1_000).await,
        Err(TokenRejection::Unknown)
    );
    assert_eq!(
        consume("tok-b", 10_000).await,
        Err(TokenRejection::Expired),
        "valid until, not at, its expiry"
    );
    assert_eq!(consume("tok-b", 20_000).await, Err(TokenRejection::Expired));

    // Concurrent consumers: exactly one wins.
    WorkerRegistry::issue_token(s, w, "tok-race", at(10_000))
        .await
        .expect("issue");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            WorkerRegistry::consume_token(&*store, "tok-race", at(1_000))
                .await
                .expect("consume")
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(got) => {
                assert_eq!(got, w);
                wins += 1;
            }
            Err(why) => assert_eq!(why, TokenRejection::Reused),
        }
    }
    assert_eq!(wins, 1, "one consumer wins a token");

    // A token presented with another worker's id is refused and left
    // usable for its own worker.
    let other = worker_id();
    WorkerRegistry::issue_token(s, w, "tok-mine", at(10_000))
        .await
        .expect("issue");
    assert_eq!(
        WorkerRegistry::consume_token_for(s, other, "tok-mine", at(1_000))
            .await
            .expect("consume"),
        Err(TokenRejection::OtherWorker)
    );
    assert_eq!(
        WorkerRegistry::consume_token_for(s, w, "tok-mine", at(1_001))
            .await
            .expect("consume"),
        Ok(w)
    );
    assert_eq!(
        WorkerRegistry::consume_token_for(s, w, "tok-mine", at(1_002))
            .await
            .expect("consume"),
        Err(TokenRejection::Reused)
    );
    assert_eq!(
        WorkerRegistry::consume_token_for(s, w, "tok-unknown", at(1_000))
            .await
            .expect("consume"),
        Err(TokenRejection::Unknown)
    );
}

/// Provider records: upsert creates or replaces, list is sorted by name.
pub async fn providers_upsert_and_list<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let record = |id: &str, healthy: bool, ms: i64| ProviderRecord {
        id: ProviderId::new(id),
        kind: if id == "local" { "local" } else { "docker" }.into(),
        config: serde_json::json!({ "max_workers": 4, "name": id }),
        healthy,
        health_message: if healthy {
            "ok".into()
        } else {
            "engine down".into()
        },
        updated_at: at(ms),
    };
    ProviderStore::upsert(s, &record("local", true, 1_000))
        .await
        .expect("upsert");
    ProviderStore::upsert(s, &record("docker", true, 1_000))
        .await
        .expect("upsert");
    ProviderStore::upsert(s, &record("docker", false, 2_000))
        .await
        .expect("upsert");
    let list = ProviderStore::list(s).await.expect("list");
    assert_eq!(
        list,
        vec![record("docker", false, 2_000), record("local", true, 1_000)]
    );

    // A store that records events with its upserts
    // (`ProviderStore::upsert_records_events`) stores both.
    if ProviderStore::upsert_records_events(s) {
        let before = EventLog::read_after(s, 0, 1000).await.expect("read").len();
        let healthy_again = record("docker", true, 3_000);
        let changed = event(
            EventBody::ProviderHealthChanged {
                provider: ProviderId::new("docker"),
                healthy: true,
                message: "ok".into(),
            },
            "corr-provider",
            3_000,
        );
        let stored = ProviderStore::upsert_recording(s, &healthy_again, vec![changed.clone()])
            .await
            .expect("upsert with its events");
        assert_eq!(stored.len(), 1);
        assert!(stored[0].sequence > 0, "the store assigns sequences");
        assert_eq!(stored[0].event_id, changed.event_id);
        let all = EventLog::read_after(s, 0, 1000).await.expect("read");
        assert_eq!(all.len(), before + 1);
        assert_eq!(all.last().map(|e| e.event_id), Some(changed.event_id));
        assert_eq!(
            ProviderStore::list(s).await.expect("list"),
            vec![healthy_again, record("local", true, 1_000)]
        );
    }
}

/// One holder per duty until its lease ends; renewing extends it; release
/// frees it at once, but only by its holder; duties are independent.
pub async fn leases_are_exclusive_until_they_expire<S: Store + ?Sized>(store: Arc<S>) {
    let s = &*store;
    let ttl = Duration::from_secs(10);
    let acquire = |duty: &'static str, holder: &'static str, ms: i64| async move {
        Leases::try_acquire(s, duty, holder, ttl, at(ms))
            .await
            .expect("try_acquire")
    };
    assert!(acquire("sweep", "a", 0).await, "a free duty is taken");
    assert!(!acquire("sweep", "b", 1_000).await, "a's lease runs");
    assert!(acquire("sweep", "a", 5_000).await, "the holder renews");
    assert!(
        !acquire("sweep", "b", 12_000).await,
        "the renewal moved the expiry to 15 s"
    );
    assert!(
        acquire("other", "b", 12_000).await,
        "duties are independent"
    );
    assert!(
        acquire("sweep", "b", 15_000).await,
        "b takes it over when a's lease ends"
    );
    assert!(!acquire("sweep", "a", 16_000).await, "a lost it to b");

    // Only the holder releases.
    Leases::release(s, "sweep", "a").await.expect("release");
    assert!(!acquire("sweep", "a", 17_000).await, "b still holds it");
    Leases::release(s, "sweep", "b").await.expect("release");
    assert!(acquire("sweep", "a", 17_000).await, "free again at once");
    Leases::release(s, "never-held", "a")
        .await
        .expect("releasing an unknown duty is a no-op");
}

/// Of many replicas asking for one free duty at once, exactly one gets it.
pub async fn leases_have_one_winner_under_contention<S: Store + ?Sized>(store: Arc<S>) {
    for round in 0..5 {
        let duty: &'static str = ["d0", "d1", "d2", "d3", "d4"][round];
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    Leases::try_acquire(
                        &*store,
                        duty,
                        &format!("replica-{i}"),
                        Duration::from_secs(30),
                        at(0),
                    )
                    .await
                    .expect("try_acquire")
                })
            })
            .collect();
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.expect("task"));
        }
        assert_eq!(winners, 1, "round {round}: {winners} holders of {duty}");
    }
}

// ---------------------------------------------------------------------------
// Helpers.

/// Lease used by the queue checks.
const LEASE: Duration = Duration::from_secs(30);

/// How long a live stream may take to deliver what was written.
const LIVE_TIMEOUT: Duration = Duration::from_secs(15);

/// Virtual time: a fixed origin plus `ms` milliseconds.
fn at(ms: i64) -> Timestamp {
    from_millis(1_700_000_000_000 + ms)
}

fn job_id() -> JobId {
    JobId::from_uuid(uuid::Uuid::new_v4())
}

fn worker_id() -> WorkerId {
    WorkerId::from_uuid(uuid::Uuid::new_v4())
}

fn event_id() -> EventId {
    EventId::from_uuid(uuid::Uuid::new_v4())
}

#[derive(Debug, Clone, Default)]
struct JobOptions {
    priority: i32,
    idempotency_key: Option<String>,
    max_attempts: u32,
    timeout_secs: u64,
}

/// A new job submitted at `at(i * 10)` with correlation id `corr-<i>`, and
/// its creation events.
fn new_job(i: i64, options: JobOptions) -> (Job, Vec<DomainEvent>) {
    let raw = RawJobSpec {
        name: Some(format!("job-{i}")),
        command: Some(vec!["sh".into(), "-c".into(), format!("echo {i}")]),
        priority: Some(options.priority),
        idempotency_key: options.idempotency_key,
        max_attempts: (options.max_attempts > 0).then_some(options.max_attempts),
        timeout_secs: (options.timeout_secs > 0).then_some(options.timeout_secs),
        labels: BTreeMap::from([("team".to_owned(), "ci".to_owned())]),
        env: BTreeMap::from([("K".to_owned(), format!("v{i}"))]),
        ..Default::default()
    };
    let spec = JobSpec::parse(raw, &SpecLimits::default()).expect("a valid spec");
    let corr = CorrelationId::new(format!("corr-{i}"));
    let now = at(i * 10);
    let (job, bodies) = Job::submit(job_id(), spec, corr.clone(), Actor::new("alice"), now);
    let events = bodies
        .into_iter()
        .map(|b| DomainEvent::new(event_id(), now, corr.clone(), Actor::new("alice"), b))
        .collect();
    (job, events)
}

/// Applies `command` at `at(ms)`; returns the events of the change.
fn transition(job: &mut Job, command: JobCommand, ms: i64) -> Vec<DomainEvent> {
    let retry = RetryPolicy::default();
    let ctx = TransitionContext {
        now: at(ms),
        retry: &retry,
        unit_random: 0.5,
    };
    let bodies = job.apply(command, ctx).expect("a legal transition");
    bodies
        .into_iter()
        .map(|b| {
            DomainEvent::new(
                event_id(),
                at(ms),
                job.correlation_id.clone(),
                Actor::system("engine"),
                b,
            )
        })
        .collect()
}

fn schedule(deadline_ms: i64) -> JobCommand {
    JobCommand::Schedule {
        provider: ProviderId::new("local"),
        worker: worker_id(),
        deadline: at(deadline_ms),
    }
}

fn event(body: EventBody, corr: &str, ms: i64) -> DomainEvent {
    DomainEvent::new(
        event_id(),
        at(ms),
        CorrelationId::new(corr),
        Actor::system("engine"),
        body,
    )
}

fn worker_event(i: i64) -> DomainEvent {
    event(
        EventBody::WorkerReady {
            worker_id: worker_id(),
        },
        &format!("corr-w{i}"),
        i,
    )
}

fn worker(i: i64) -> Worker {
    Worker {
        id: worker_id(),
        provider: ProviderId::new("local"),
        state: WorkerState::Ready,
        labels: BTreeMap::from([("arch".to_owned(), "x86_64".to_owned())]),
        image: (i % 2 == 1).then(|| "hodei-test-busybox".to_owned()),
        capacity: 2,
        jobs: Vec::new(),
        ephemeral: i % 2 == 0,
        reserved_for: None,
        connected: true,
        last_seen: at(i * 100),
        created_at: at(i * 100),
    }
}

/// Agent lines numbered `range`, odd ones on stdout, at `at(agent_seq)`.
fn lines(range: std::ops::RangeInclusive<u64>) -> Vec<NewLogLine> {
    range
        .map(|n| NewLogLine {
            agent_seq: n,
            stream: if n % 2 == 1 {
                LogStream::Stdout
            } else {
                LogStream::Stderr
            },
            at: at(n as i64),
            text: format!("line {n}"),
        })
        .collect()
}

fn ids(jobs: &[Job]) -> Vec<JobId> {
    jobs.iter().map(|j| j.id).collect()
}

fn types(events: &[DomainEvent]) -> Vec<&'static str> {
    events.iter().map(DomainEvent::event_type).collect()
}

fn seqs(events: &[DomainEvent]) -> Vec<u64> {
    events.iter().map(|e| e.sequence).collect()
}

/// The next `n` items of a live stream, failing on errors, a premature end
/// or a stall.
async fn take<T: std::fmt::Debug>(
    stream: &mut BoxStream<'static, Result<T, StoreError>>,
    n: usize,
) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(LIVE_TIMEOUT, stream.next()).await {
            Ok(Some(Ok(item))) => out.push(item),
            Ok(Some(Err(e))) => panic!("stream error after {} items: {e}", out.len()),
            Ok(None) => panic!("stream ended after {} of {n} items", out.len()),
            Err(_) => panic!("stream stalled after {} of {n} items: {out:?}", out.len()),
        }
    }
    out
}

/// Every item until the stream ends (bounded in time).
async fn collect_until_end(
    stream: &mut BoxStream<'static, Result<LogLine, StoreError>>,
) -> Vec<LogLine> {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(LIVE_TIMEOUT, stream.next()).await {
            Ok(Some(Ok(line))) => out.push(line),
            Ok(Some(Err(e))) => panic!("follow error after {} lines: {e}", out.len()),
            Ok(None) => return out,
            Err(_) => panic!(
                "follow did not end; got {:?}",
                out.iter().map(|l| l.seq).collect::<Vec<_>>()
            ),
        }
    }
}
