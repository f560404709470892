//! PostgreSQL-specific behaviour: migrations, the event bus under
//! out-of-order commits and a killed listener, concurrent claimants and log
//! appenders, atomicity, and what is (not) stored in clear.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use hodei_core::event::{DomainEvent, EventBody};
use hodei_core::ids::{Actor, CorrelationId, EventId, JobId, WorkerId};
use hodei_core::job::Job;
use hodei_core::ports::{
    Created, EventLog, EventSubscription, JobFilter, JobQueue, JobStore, LogStore, LogStream,
    NewLogLine, SecretStore, StoreError, WorkerRegistry,
};
use hodei_core::spec::{JobSpec, RawJobSpec, SpecLimits};
use hodei_core::time::{Timestamp, from_millis};
use hodei_postgres::{MIGRATOR, PgError, PgStore, PgStoreOptions, SecretKey};
use sqlx::PgPool;

const WAIT: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_apply_once_and_a_newer_schema_is_refused() {
    let Some(db) = common::test_db().await else {
        return;
    };
    let first = PgStore::connect(&db.url, common::no_key())
        .await
        .expect("first start");
    let again = PgStore::connect(&db.url, common::no_key())
        .await
        .expect("second start");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(again.pool())
        .await
        .unwrap();
    assert_eq!(
        applied as usize,
        MIGRATOR.iter().count(),
        "each migration once"
    );

    first.ready().await.expect("a migrated store is ready");

    // A newer hodei applied a migration this build does not know.
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (99990101000000, 'from the future', true, '\\x00', 0)",
    )
    .execute(first.pool())
    .await
    .unwrap();
    let refused = PgStore::connect(&db.url, common::no_key()).await;
    match refused {
        Err(
            e @ PgError::NewerSchema {
                applied: 99990101000000,
                ..
            },
        ) => {
            let msg = e.to_string();
            assert!(msg.contains("newer hodei"), "{msg}");
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    // A running store notices it too (`/readyz`).
    match first.ready().await {
        Err(StoreError::Unavailable(msg)) => {
            assert!(msg.contains("99990101000000"), "{msg}");
            assert!(msg.contains("newer than this build"), "{msg}");
        }
        other => panic!("expected not ready, got {other:?}"),
    }
    // A migration of this build missing (rolled back by hand): not ready.
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = 99990101000000")
        .execute(first.pool())
        .await
        .unwrap();
    first.ready().await.expect("ready again");
    let last = MIGRATOR.iter().map(|m| m.version).max().unwrap();
    sqlx::query("UPDATE _sqlx_migrations SET success = false WHERE version = $1")
        .bind(last)
        .execute(first.pool())
        .await
        .unwrap();
    match first.ready().await {
        Err(StoreError::Unavailable(msg)) => {
            assert!(msg.contains(&format!("lacks migration {last}")), "{msg}");
        }
        other => panic!("expected not ready, got {other:?}"),
    }
    first.close().await;
    again.close().await;
}

/// The classic BIGSERIAL gap: a later sequence commits first. The
/// subscriber must hold it back until the earlier one commits (or rolls
/// back), then deliver in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_commits_are_delivered_in_sequence_order() {
    let Some((store, _db)) = common::store().await else {
        return;
    };
    let mut sub = store.subscribe(0);
    let warm = EventLog::append(&*store, vec![worker_event()])
        .await
        .unwrap();
    assert_eq!(seqs(&take(&mut sub, 1).await), seqs(&warm));

    let (tx_early, early) = open_event_tx(store.pool()).await;
    let (tx_late, late) = open_event_tx(store.pool()).await;
    assert!(early < late);
    tx_late.commit().await.unwrap();

    // The gap is real: a plain read sees the later event alone...
    let visible = EventLog::read_after(&*store, warm[0].sequence, 100)
        .await
        .unwrap();
    assert_eq!(seqs(&visible), vec![late]);
    // ...but the subscriber does not deliver it while the earlier one is open.
    let held = tokio::time::timeout(Duration::from_millis(800), sub.next()).await;
    assert!(
        held.is_err(),
        "delivered past an open transaction: {held:?}"
    );
    assert!(store.bus_stats().horizon < late);

    tx_early.commit().await.unwrap();
    assert_eq!(seqs(&take(&mut sub, 2).await), vec![early, late]);

    // A rolled-back sequence leaves a permanent gap; the later one follows.
    let (tx_doomed, _doomed) = open_event_tx(store.pool()).await;
    let (tx_kept, kept) = open_event_tx(store.pool()).await;
    tx_kept.commit().await.unwrap();
    let held = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(
        held.is_err(),
        "delivered past an open transaction: {held:?}"
    );
    tx_doomed.rollback().await.unwrap();
    assert_eq!(seqs(&take(&mut sub, 1).await), vec![kept]);
}

/// An unrelated open transaction (another application, a forgotten psql
/// session) holds back `xmin` but must not stall the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrelated_open_transaction_does_not_stall_the_bus() {
    let Some((store, _db)) = common::store().await else {
        return;
    };
    let mut sub = store.subscribe(0);
    let mut idle = store.pool().begin().await.unwrap();
    sqlx::query("CREATE TABLE other_app (x int)")
        .execute(&mut *idle)
        .await
        .unwrap();
    sqlx::query("INSERT INTO other_app VALUES (1)")
        .execute(&mut *idle)
        .await
        .unwrap();
    let written = EventLog::append(&*store, vec![worker_event(), worker_event()])
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), take(&mut sub, 2))
        .await
        .expect("delivered while another transaction is open");
    assert_eq!(seqs(&got), seqs(&written));
    idle.rollback().await.unwrap();
}

/// Many concurrent writers: every subscriber sees every event exactly once,
/// in strictly increasing sequence order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_never_make_a_subscriber_skip() {
    let Some((store, _db)) = common::store().await else {
        return;
    };
    let mut early = store.subscribe(0);
    let mut writers = Vec::new();
    for w in 0..6 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..40 {
                let batch = (0..(1 + (w + i) % 3)).map(|_| worker_event()).collect();
                let stored = EventLog::append(&*store, batch).await.expect("append");
                written.extend(stored.into_iter().map(|e| e.sequence));
            }
            written
        }));
    }
    let mut written = BTreeSet::new();
    for w in writers {
        written.extend(w.await.unwrap());
    }
    let got = seqs(&take(&mut early, written.len()).await);
    assert!(got.windows(2).all(|p| p[0] < p[1]), "strictly increasing");
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), written);
    let extra = tokio::time::timeout(Duration::from_millis(300), early.next()).await;
    assert!(extra.is_err(), "no duplicates or phantoms: {extra:?}");
}

/// Killing the LISTEN connection loses nothing: events and log lines written
/// while it is down are delivered, and it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_after_pg_terminate_backend() {
    let Some((store, _db)) = common::store().await else {
        return;
    };
    let mut sub = store.subscribe(0);
    let job = JobId::from_uuid(uuid::Uuid::new_v4());
    let mut follow = LogStore::follow(&*store, job, 0);
    let first = EventLog::append(&*store, vec![worker_event()])
        .await
        .unwrap();
    assert_eq!(seqs(&take(&mut sub, 1).await), seqs(&first));
    LogStore::append(&*store, job, 1, log_lines(1, 2))
        .await
        .unwrap();
    assert_eq!(line_seqs(&take(&mut follow, 2).await), vec![1, 2]);
    wait_until(|| store.bus_stats().listener_connects >= 1).await;

    let killed = listener_pid(store.pool()).await.expect("a LISTEN backend");
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(killed)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(terminated);

    // Written while the listener is down (or reconnecting).
    let during = EventLog::append(&*store, vec![worker_event(), worker_event()])
        .await
        .unwrap();
    LogStore::append(&*store, job, 1, log_lines(3, 5))
        .await
        .unwrap();
    assert_eq!(seqs(&take(&mut sub, 2).await), seqs(&during));
    assert_eq!(line_seqs(&take(&mut follow, 3).await), vec![3, 4, 5]);

    wait_until(|| store.bus_stats().listener_connects >= 2).await;
    let revived = listener_pid(store.pool())
        .await
        .expect("a new LISTEN backend");
    assert_ne!(revived, killed);

    // And live again afterwards.
    let after = EventLog::append(&*store, vec![worker_event()])
        .await
        .unwrap();
    assert_eq!(seqs(&take(&mut sub, 1).await), seqs(&after));
    LogStore::append(&*store, job, 1, log_lines(6, 6))
        .await
        .unwrap();
    LogStore::finish(&*store, job).await.unwrap();
    let mut rest = Vec::new();
    while let Some(line) = tokio::time::timeout(WAIT, follow.next())
        .await
        .expect("follow ends")
    {
        rest.push(line.unwrap().seq);
    }
    assert_eq!(rest, vec![6]);
}

/// Four claimants racing over 500 jobs: each job is claimed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimants_never_get_the_same_job() {
    let Some((store, _db)) = common::store().await else {
        return;
    };
    let mut ids = BTreeSet::new();
    for i in 0..500 {
        let (job, events) = new_job(i, None, at(0));
        JobStore::create(&*store, &job, events).await.unwrap();
        ids.insert(job.id);
    }
    assert_eq!(JobQueue::depth(&*store).await.unwrap(), 500);
    let mut claimants = Vec::new();
    for c in 0..4 {
        let store = store.clone();
        claimants.push(tokio::spawn(async move {
            let owner = format!("replica-{c}");
            let mut mine = Vec::new();
            loop {
                let claim =
                    JobQueue::claim(&*store, &owner, at(1_000), 7, Duration::from_secs(3600))
                        .await
                        .expect("claim");
                if claim.jobs.is_empty() {
                    return mine;
                }
                mine.extend(claim.jobs.into_iter().map(|j| j.id));
            }
        }));
    }
    let mut seen = BTreeMap::<JobId, usize>::new();
    let mut per_claimant = Vec::new();
    for c in claimants {
        let mine = c.await.unwrap();
        per_claimant.push(mine.len());
        for id in mine {
            *seen.entry(id).or_default() += 1;
        }
    }
    assert!(seen.values().all(|n| *n == 1), "a job was claimed twice");
    assert_eq!(
        seen.keys().copied().collect::<BTreeSet<_>>(),
        ids,
        "every job claimed"
    );
    assert!(
        per_claimant.iter().filter(|n| **n > 0).count() >= 2,
        "claims interleaved: {per_claimant:?}"
    );
}

/// An empty claim while jobs wait is normal: here another claimant is in
/// the middle of its claim and holds the lock of every pending row, so
/// SKIP LOCKED passes over all of them. That must not stall dispatch: the
/// claim neither waits for the lock nor reports an empty queue, it says the
/// queue is ready now (`next_ready_at == now`, so the engine claims again
/// at once), and once the lock is gone the jobs are claimed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_claim_over_locked_rows_says_the_queue_is_ready_now() {
    let Some((store, _db)) = common::store().await else {
        return;
    };
    let mut ids = BTreeSet::new();
    for i in 0..5 {
        let (job, events) = new_job(i, None, at(0));
        JobStore::create(&*store, &job, events).await.unwrap();
        ids.insert(job.id);
    }
    let mut other = store.pool().begin().await.unwrap();
    let locked: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT id FROM jobs WHERE state = 'PENDING' FOR UPDATE")
            .fetch_all(&mut *other)
            .await
            .unwrap();
    assert_eq!(
        locked
            .into_iter()
            .map(JobId::from_uuid)
            .collect::<BTreeSet<_>>(),
        ids
    );

    let now = at(1_000);
    let lease = Duration::from_secs(60);
    let claim = tokio::time::timeout(WAIT, JobQueue::claim(&*store, "replica-b", now, 10, lease))
        .await
        .expect("a claim waited for rows another claimant holds")
        .expect("claim");
    assert!(
        claim.jobs.is_empty(),
        "claimed rows another transaction holds: {:?}",
        claim.jobs.iter().map(|j| j.id).collect::<Vec<_>>()
    );
    assert_eq!(
        claim.next_ready_at,
        Some(now),
        "an empty claim while jobs wait must say the queue is ready now"
    );
    assert_eq!(JobQueue::depth(&*store).await.unwrap(), 5);

    // The other claimant gives up (its transaction ends without a claim):
    // the next claim gets every job, and nothing is left waiting.
    other.rollback().await.unwrap();
    let claim = JobQueue::claim(&*store, "replica-b", now, 10, lease)
        .await
        .expect("claim");
    assert_eq!(
        claim.jobs.iter().map(|j| j.id).collect::<BTreeSet<_>>(),
        ids
    );
    assert_eq!(claim.next_ready_at, None);
}

/// The job row and its events commit together or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_event_insert_rolls_back_the_job_change() {
    let Some((store, _db)) = common::store().await else {
        return;
    };
    let (job, events) = new_job(0, None, at(0));
    let reused_id = events[0].event_id;
    JobStore::create(&*store, &job, events).await.unwrap();

    // An update whose event collides with a stored one fails as a whole.
    let mut changed = job.clone();
    changed.version = 2;
    changed.status = hodei_core::job::JobStatus::Cancelled {
        reason: "test".into(),
    };
    let mut bad = worker_event();
    bad.event_id = reused_id;
    let failed = JobStore::update(&*store, &changed, 1, vec![bad]).await;
    assert!(
        matches!(failed, Err(StoreError::AlreadyExists(_))),
        "{failed:?}"
    );
    assert_eq!(
        JobStore::get(&*store, job.id).await.unwrap(),
        Some(job.clone())
    );
    assert_eq!(JobQueue::depth(&*store).await.unwrap(), 1);

    // Same for a creation.
    let (other, mut events) = new_job(1, None, at(0));
    events[1].event_id = reused_id;
    let failed = JobStore::create(&*store, &other, events).await;
    assert!(
        matches!(failed, Err(StoreError::AlreadyExists(_))),
        "{failed:?}"
    );
    assert_eq!(JobStore::get(&*store, other.id).await.unwrap(), None);
    assert!(
        EventLog::job_events(&*store, other.id)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Concurrent submissions with one idempotency key: one job, and every
/// caller gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_with_one_key_create_one_job() {
    let Some((store, _db)) = common::store().await else {
        return;
    };
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let (job, events) = new_job(i, Some("same-key"), at(0));
            match JobStore::create(&*store, &job, events)
                .await
                .expect("create")
            {
                Created::New(_) => job.id,
                Created::Existing(existing) => existing.id,
            }
        }));
    }
    let mut winners = BTreeSet::new();
    for t in tasks {
        winners.insert(t.await.unwrap());
    }
    assert_eq!(winners.len(), 1, "all callers see one job");
    assert_eq!(JobQueue::depth(&*store).await.unwrap(), 1);
}

/// Keyset paging stays exact when jobs share a creation time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_jobs_with_equal_creation_times() {
    let Some((store, _db)) = common::store().await else {
        return;
    };
    let mut ids = BTreeSet::new();
    for i in 0..7 {
        let (job, events) = new_job(i, None, at(5));
        JobStore::create(&*store, &job, events).await.unwrap();
        ids.insert(job.id);
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = JobStore::list(
            &*store,
            &JobFilter {
                limit: 3,
                cursor: cursor.take(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        seen.extend(page.jobs.iter().map(|j| j.id));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7);
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), ids);
}

/// Concurrent appends to one job: gap-free sequences, every line once; and
/// concurrent re-sends of one batch store it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_log_appends_get_gap_free_sequences() {
    let Some((store, _db)) = common::store().await else {
        return;
    };
    let job = JobId::from_uuid(uuid::Uuid::new_v4());
    let mut follow = LogStore::follow(&*store, job, 0);
    let mut tasks = Vec::new();
    for attempt in 1..=4u32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for batch in 0..25u64 {
                let lines = log_lines(batch * 4 + 1, batch * 4 + 4);
                LogStore::append(&*store, job, attempt, lines)
                    .await
                    .expect("append");
            }
        }));
    }
    // Two copies of one batch, racing: stored once.
    let dup_job = JobId::from_uuid(uuid::Uuid::new_v4());
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(
                async move { LogStore::append(&*store, dup_job, 1, log_lines(1, 50)).await },
            )
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    for r in racers {
        assert_eq!(r.await.unwrap().unwrap(), 50);
    }
    LogStore::finish(&*store, job).await.unwrap();

    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page = LogStore::read(&*store, job, after, 150).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        all.extend(page);
    }
    assert_eq!(line_seqs(&all), (1..=400).collect::<Vec<_>>(), "gap-free");
    let distinct: BTreeSet<(u32, String)> =
        all.iter().map(|l| (l.attempt, l.text.clone())).collect();
    assert_eq!(distinct.len(), 400, "every line once");

    let mut followed = Vec::new();
    while let Some(line) = tokio::time::timeout(WAIT, follow.next())
        .await
        .expect("follow ends")
    {
        followed.push(line.unwrap());
    }
    assert_eq!(followed, all, "the follower saw the same lines, in order");
    assert_eq!(
        LogStore::read(&*store, dup_job, 0, 1000)
            .await
            .unwrap()
            .len(),
        50
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_without_a_key_are_refused_clearly() {
    let Some((store, _db)) = common::store_with(common::no_key()).await else {
        return;
    };
    assert!(!store.secrets_enabled());
    let put = SecretStore::put(&*store, "TOKEN", "v", at(0)).await;
    match put {
        Err(StoreError::Invalid(msg)) => assert!(msg.contains("HODEI_SECRET_KEY"), "{msg}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(matches!(
        SecretStore::get(&*store, "TOKEN").await,
        Err(StoreError::Invalid(_))
    ));
    assert!(SecretStore::list(&*store).await.unwrap().is_empty());
    assert!(!SecretStore::delete(&*store, "TOKEN").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_encrypted_at_rest_with_fresh_nonces() {
    let Some((store, db)) = common::store().await else {
        return;
    };
    let value = "hunter2-super-secret-value";
    SecretStore::put(&*store, "A", value, at(0)).await.unwrap();
    SecretStore::put(&*store, "B", value, at(0)).await.unwrap();
    let rows: Vec<(String, Vec<u8>, Vec<u8>)> =
        sqlx::query_as("SELECT name, nonce, ciphertext FROM secrets ORDER BY name")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert_eq!(rows.len(), 2);
    for (_, nonce, ct) in &rows {
        assert_eq!(nonce.len(), 12);
        assert!(
            !ct.windows(value.len()).any(|w| w == value.as_bytes()),
            "plaintext in the database"
        );
    }
    assert_ne!(rows[0].1, rows[1].1, "one nonce per value");
    assert_ne!(rows[0].2, rows[1].2);

    // A ciphertext moved to another name does not decrypt.
    sqlx::query(
        "UPDATE secrets SET nonce = a.nonce, ciphertext = a.ciphertext \
         FROM (SELECT nonce, ciphertext FROM secrets WHERE name = 'A') a WHERE name = 'B'",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let swapped = SecretStore::get(&*store, "B").await;
    assert!(
        matches!(swapped, Err(StoreError::Other(ref m)) if m.contains("does not decrypt")),
        "{swapped:?}"
    );
    assert_eq!(
        SecretStore::get(&*store, "A").await.unwrap().as_deref(),
        Some(value)
    );

    // Another key is told apart from corruption.
    let other = PgStore::connect(
        &db.url,
        PgStoreOptions::default().with_secret_key(SecretKey::from_bytes([7; 32])),
    )
    .await
    .unwrap();
    let wrong = SecretStore::get(&other, "A").await;
    assert!(
        matches!(wrong, Err(StoreError::Other(ref m)) if m.contains("another key")),
        "{wrong:?}"
    );
    other.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_key_can_come_from_a_file() {
    let Some(db) = common::test_db().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key");
    std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
    let store = PgStore::connect(
        &db.url,
        PgStoreOptions::default().with_secret_key_file(&path),
    )
    .await
    .unwrap();
    assert!(store.secrets_enabled());
    SecretStore::put(&store, "X", "y", at(0)).await.unwrap();
    assert_eq!(
        SecretStore::get(&store, "X").await.unwrap().as_deref(),
        Some("y")
    );
    store.close().await;

    let missing = PgStore::connect(
        &db.url,
        PgStoreOptions::default().with_secret_key_file(dir.path().join("absent")),
    )
    .await;
    assert!(matches!(missing, Err(PgError::SecretKey(_))), "{missing:?}");
    std::fs::write(&path, "too short").unwrap();
    let bad = PgStore::connect(
        &db.url,
        PgStoreOptions::default().with_secret_key_file(&path),
    )
    .await;
    assert!(matches!(bad, Err(PgError::SecretKey(_))), "{bad:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_tokens_are_stored_as_digests() {
    let Some((store, _db)) = common::store().await else {
        return;
    };
    let worker = WorkerId::from_uuid(uuid::Uuid::new_v4());
    let token = "plain-registration-token-1234";
    WorkerRegistry::issue_token(&*store, worker, token, at(10_000))
        .await
        .unwrap();
    let stored: Vec<u8> = sqlx::query_scalar("SELECT token_sha256 FROM worker_tokens")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(!stored.windows(8).any(|w| w == &token.as_bytes()[..8]));
    let matches: bool = sqlx::query_scalar(
        "SELECT token_sha256 = sha256(convert_to($1, 'UTF8')) FROM worker_tokens",
    )
    .bind(token)
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert!(matches, "SHA-256 of the token");
    assert_eq!(
        WorkerRegistry::consume_token(&*store, token, at(1))
            .await
            .unwrap(),
        Ok(worker)
    );
    // Re-issuing a token never re-arms it.
    assert!(matches!(
        WorkerRegistry::issue_token(&*store, worker, token, at(10_000)).await,
        Err(StoreError::AlreadyExists(_))
    ));
}

// ---------------------------------------------------------------------------

fn at(ms: i64) -> Timestamp {
    from_millis(1_700_000_000_000 + ms)
}

fn new_job(i: i64, key: Option<&str>, now: Timestamp) -> (Job, Vec<DomainEvent>) {
    let raw = RawJobSpec {
        command: Some(vec!["true".into(), i.to_string()]),
        idempotency_key: key.map(str::to_owned),
        ..Default::default()
    };
    let spec = JobSpec::parse(raw, &SpecLimits::default()).unwrap();
    let corr = CorrelationId::new(format!("corr-{i}"));
    let (job, bodies) = Job::submit(
        JobId::from_uuid(uuid::Uuid::new_v4()),
        spec,
        corr.clone(),
        Actor::new("tester"),
        now,
    );
    let events = bodies
        .into_iter()
        .map(|b| {
            DomainEvent::new(
                EventId::from_uuid(uuid::Uuid::new_v4()),
                now,
                corr.clone(),
                Actor::new("tester"),
                b,
            )
        })
        .collect();
    (job, events)
}

fn worker_event() -> DomainEvent {
    DomainEvent::new(
        EventId::from_uuid(uuid::Uuid::new_v4()),
        at(0),
        CorrelationId::new("corr-bus"),
        Actor::system("test"),
        EventBody::WorkerReady {
            worker_id: WorkerId::from_uuid(uuid::Uuid::new_v4()),
        },
    )
}

fn log_lines(from: u64, to: u64) -> Vec<NewLogLine> {
    (from..=to)
        .map(|n| NewLogLine {
            agent_seq: n,
            stream: LogStream::Stdout,
            at: at(n as i64),
            text: format!("line {n}"),
        })
        .collect()
}

/// Opens a transaction that has written one event (as the store does:
/// transaction id first, then the sequence) and not committed.
async fn open_event_tx(pool: &PgPool) -> (sqlx::Transaction<'static, sqlx::Postgres>, u64) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *tx)
        .await
        .unwrap();
    let worker = uuid::Uuid::new_v4();
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO events (event_id, event_type, aggregate_type, aggregate_id, correlation_id, \
         actor, occurred_at, payload) \
         VALUES ($1, 'WorkerReady', 'worker', $2, 'corr-tx', 'system:test', now(), $3) \
         RETURNING sequence",
    )
    .bind(uuid::Uuid::new_v4())
    .bind(worker.to_string())
    .bind(serde_json::json!({ "worker_id": worker }))
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    sqlx::query("SELECT pg_notify('hodei_events', $1)")
        .bind(seq.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    (tx, seq as u64)
}

async fn listener_pid(pool: &PgPool) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_optional(pool)
    .await
    .unwrap()
}

async fn wait_until(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn take<T: std::fmt::Debug>(
    stream: &mut BoxStream<'static, Result<T, StoreError>>,
    n: usize,
) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(WAIT, stream.next()).await {
            Ok(Some(Ok(item))) => out.push(item),
            Ok(Some(Err(e))) => panic!("stream error after {} items: {e}", out.len()),
            Ok(None) => panic!("stream ended after {} of {n} items", out.len()),
            Err(_) => panic!("stream stalled after {} of {n} items: {out:?}", out.len()),
        }
    }
    out
}

fn seqs(events: &[DomainEvent]) -> Vec<u64> {
    events.iter().map(|e| e.sequence).collect()
}

fn line_seqs(lines: &[hodei_core::ports::LogLine]) -> Vec<u64> {
    lines.iter().map(|l| l.seq).collect()
}

/// `PgStore` composes at runtime as `Arc<dyn Port>` (compile-time check).
#[allow(dead_code)]
fn object_safe(store: Arc<PgStore>) {
    let _: Arc<dyn JobStore> = store.clone();
    let _: Arc<dyn JobQueue> = store.clone();
    let _: Arc<dyn EventLog> = store.clone();
    let _: Arc<dyn EventSubscription> = store.clone();
    let _: Arc<dyn hodei_core::ports::AuditQuery> = store.clone();
    let _: Arc<dyn LogStore> = store.clone();
    let _: Arc<dyn SecretStore> = store.clone();
    let _: Arc<dyn WorkerRegistry> = store.clone();
    let _: Arc<dyn hodei_core::ports::ProviderStore> = store;
}
