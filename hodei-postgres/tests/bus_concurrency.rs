//! The event bus under concurrent writers that commit out of sequence
//! order, rolled-back transactions and a killed `LISTEN` connection: every
//! committed event reaches every subscriber exactly once, in sequence order,
//! and a subscriber never delivers a sequence at or above one that an open
//! transaction holds.
//!
//! Writers here use raw transactions (some take their transaction id before
//! drawing a sequence, as the store does, some do not) beside the store's own
//! `EventLog::append`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use hodei_core::event::{DomainEvent, EventBody};
use hodei_core::ids::{Actor, CorrelationId, EventId, WorkerId};
use hodei_core::ports::{EventLog, EventSubscription};
use hodei_core::time::from_millis;
use hodei_postgres::{PgStore, PgStoreOptions};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Longest wait for the next event (or a condition) before the test counts
/// the bus as stalled. A failure detector, not a timing assertion.
const STALL: Duration = Duration::from_secs(60);

/// Every transaction `(w + round) % ROLLBACK_EVERY == 0` of a free writer
/// rolls back.
const ROLLBACK_EVERY: usize = 7;

type Sequence = u64;

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// The exact shape of the old horizon bug: the newest running transaction
/// `T` draws a sequence, and an *older* transaction `V` draws the next one
/// and commits. The snapshot then is `V+1:V+1:` (its `xmax` is "latest
/// completed + 1"), so `T` is neither in it nor below its `xmin`. The bus
/// must hold the horizon below `T`'s sequence until `T` ends. (Transaction
/// ids are cluster-wide: when other tests commit meanwhile, `T` is in the
/// snapshot after all and the old rule happened to hold; run alone, the old
/// rule failed this test every time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_running_transaction_holds_the_horizon() {
    let Some((store, _db)) = store().await else {
        return;
    };
    let pool = store.pool().clone();
    let mut sub = store.subscribe(0);
    let warm = EventLog::append(&*store, vec![event()]).await.unwrap();
    assert_eq!(next_seqs(&mut sub, 1).await, vec![warm[0].sequence]);

    // V takes its transaction id first, then T (the newest), then T draws
    // and V draws: V's sequence is the higher one.
    let mut v = pool.begin().await.unwrap();
    take_xid(&mut v).await;
    let mut t = pool.begin().await.unwrap();
    take_xid(&mut t).await;
    let t_seq = insert_events(&mut t, 1).await[0].0;
    let v_seq = insert_events(&mut v, 1).await[0].0;
    assert!(t_seq < v_seq);
    v.commit().await.unwrap();

    // Wait (by observation, not by time) until the horizon task has
    // finished a poll that started after V committed.
    let committed_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT clock_timestamp()")
            .fetch_one(&pool)
            .await
            .unwrap();
    poll_until("a horizon poll after V's commit", || async {
        let polled: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_stat_activity \
             WHERE datname = current_database() AND state = 'idle' \
             AND query LIKE '%pg_locks%' AND query NOT LIKE '%pg_stat_activity%' \
             AND query_start > $1)",
        )
        .bind(committed_at)
        .fetch_one(&pool)
        .await
        .unwrap();
        polled
    })
    .await;
    let horizon = store.bus_stats().horizon;
    assert!(
        horizon < t_seq,
        "horizon {horizon} passed sequence {t_seq} of an open transaction"
    );

    t.commit().await.unwrap();
    let after = EventLog::append(&*store, vec![event()]).await.unwrap();
    assert_eq!(
        next_seqs(&mut sub, 3).await,
        vec![t_seq, v_seq, after[0].sequence]
    );
}

/// A subscription started "from now" (`EventLog::settled_sequence`, what
/// `ControlPlane::wait_terminal`, the runtime's bus follower and the
/// metrics start from) misses no event that commits after it: with `T`
/// holding a lower sequence open while `V` commits a higher one, the
/// call waits for `T` to end, and an event committed after it returns is
/// delivered. (Starting from `MAX(sequence)`, `V`'s, would skip `T`'s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_from_now_waits_for_open_writers() {
    let Some((store, _db)) = store().await else {
        return;
    };
    let pool = store.pool().clone();
    let warm = EventLog::append(&*store, vec![event()]).await.unwrap();
    assert_eq!(
        EventLog::settled_sequence(&*store).await.unwrap(),
        warm[0].sequence,
        "with no writer open, the last sequence drawn is settled"
    );
    let mut t = pool.begin().await.unwrap();
    take_xid(&mut t).await;
    let t_seq = insert_events(&mut t, 1).await[0].0;
    let v = EventLog::append(&*store, vec![event()]).await.unwrap();
    assert!(v[0].sequence > t_seq);
    assert_eq!(
        EventLog::last_sequence(&*store).await.unwrap(),
        v[0].sequence
    );

    let (settled_tx, mut settled_rx) = oneshot::channel();
    let waiting = store.clone();
    tokio::spawn(async move {
        let _ = settled_tx.send(EventLog::settled_sequence(&*waiting).await);
    });
    // Not settled while T is open: the call is still waiting after T has
    // been seen by a few of its polls (observed through pg_stat_activity,
    // not timed).
    poll_until("settled_sequence polling the writers", || async {
        let polls: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity              WHERE datname = current_database() AND query LIKE '%pg_locks%'              AND query NOT LIKE '%pg_stat_activity%'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        polls > 0
    })
    .await;
    assert!(
        matches!(
            settled_rx.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ),
        "settled while a transaction holding sequence {t_seq} is open"
    );
    t.commit().await.unwrap();
    let settled = tokio::time::timeout(STALL, settled_rx)
        .await
        .expect("settled once the writer ended")
        .unwrap()
        .unwrap();
    assert!(settled >= v[0].sequence, "settled at {settled}");

    // Anything committed after that is delivered to a subscription from
    // the settled sequence.
    let mut sub = store.subscribe(settled);
    let later = EventLog::append(&*store, vec![event()]).await.unwrap();
    assert_eq!(next_seqs(&mut sub, 1).await, vec![later[0].sequence]);
}

/// Eight raw writers and two store appenders hammer the table; pairs of
/// writers commit out of sequence order on purpose, a long transaction
/// stays open over hundreds of commits and then rolls back, others roll back
/// at random points. Two subscribers (one from the start, one joining
/// mid-stream) each get every committed event exactly once, in order, and
/// neither ever delivers a sequence held by an open transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_out_of_order_writers_never_make_a_subscriber_skip_or_stall() {
    let Some((store, _db)) = store().await else {
        return;
    };
    let sentinel = Uuid::new_v4();
    let first = collect(&store, 0, sentinel);
    let ledger = Arc::new(Ledger::new(first.delivered.clone()));

    // A transaction that stays open while hundreds of later sequences
    // commit, then rolls back: the gap must hold them back, then be passed.
    let long = {
        let (pool, ledger) = (store.pool().clone(), ledger.clone());
        let mut commits = ledger.commits.subscribe();
        tokio::spawn(async move {
            let mut tx = pool.begin().await.unwrap();
            let drawn = insert_events(&mut tx, 3).await;
            let opened_at = *commits.borrow_and_update();
            wait_for(&mut commits, |n| n >= opened_at + 300).await;
            ledger.check_held_back(&drawn);
            tx.rollback().await.unwrap();
            ledger.rolled_back(&drawn);
        })
    };

    let writers = spawn_writers(&store, &ledger, 8, 120);
    let appenders = spawn_appenders(&store, &ledger, 2, 15, 40);

    // A second subscriber joins once the stream is flowing.
    let mut commits = ledger.commits.subscribe();
    wait_for(&mut commits, |n| n >= 500).await;
    let joined_after = first.delivered.load(Ordering::SeqCst);
    let second = collect(&store, joined_after, sentinel);

    for task in writers.into_iter().chain(appenders) {
        task.await.expect("writer");
    }
    long.await.expect("long transaction");
    let end = EventLog::append(&*store, vec![event_with(sentinel)])
        .await
        .unwrap();
    ledger.committed(end.iter().map(|e| (e.sequence, *e.event_id.as_uuid())));

    let report = ledger.report();
    assert!(
        report.inversions >= 8,
        "writers committed out of order only {} times",
        report.inversions
    );
    assert!(
        report.rolled_back.len() >= 20,
        "{} rolled back",
        report.rolled_back.len()
    );
    assert!(
        report.committed.len() >= 2000,
        "{} committed",
        report.committed.len()
    );
    assert!(
        report.open_checks >= 500,
        "{} open checks",
        report.open_checks
    );

    let got = first.done.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert_exactly_once_in_order(&got, &report, 0);
    let got = second.done.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    assert_exactly_once_in_order(&got, &report, joined_after);
}

/// `pg_terminate_backend` on the `LISTEN` connection while writers hammer
/// and the subscriber is half way: nothing is lost or duplicated, the order
/// holds, and the listener comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_listener_mid_stream_loses_nothing() {
    let Some((store, _db)) = store().await else {
        return;
    };
    let sentinel = Uuid::new_v4();
    let sub = collect(&store, 0, sentinel);
    let ledger = Arc::new(Ledger::new(sub.delivered.clone()));
    poll_until("the LISTEN connection", || async {
        listener_pid(store.pool()).await.is_some()
    })
    .await;

    let mut before = spawn_writers(&store, &ledger, 4, 80);
    before.extend(spawn_appenders(&store, &ledger, 2, 10, 50));

    // Mid-stream: the subscriber has delivered some hundreds of events and
    // the writers are still at it.
    let mut count = sub.count.clone();
    wait_for(&mut count, |n| n >= 300).await;
    let killed = listener_pid(store.pool()).await.expect("a LISTEN backend");
    let connects = store.bus_stats().listener_connects;
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(killed)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(terminated);

    // Written while the listener is down or coming back.
    let mut after = spawn_writers(&store, &ledger, 4, 40);
    after.extend(spawn_appenders(&store, &ledger, 1, 10, 50));
    for task in before.into_iter().chain(after) {
        task.await.expect("writer");
    }
    let end = EventLog::append(&*store, vec![event_with(sentinel)])
        .await
        .unwrap();
    ledger.committed(end.iter().map(|e| (e.sequence, *e.event_id.as_uuid())));

    let got = sub.done.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
    let report = ledger.report();
    assert!(
        report.committed.len() >= 2000,
        "{} committed",
        report.committed.len()
    );
    assert_exactly_once_in_order(&got, &report, 0);

    poll_until("the listener to reconnect", || async {
        store.bus_stats().listener_connects > connects
    })
    .await;
    let revived = listener_pid(store.pool())
        .await
        .expect("a new LISTEN backend");
    assert_ne!(revived, killed);
}

// ---------------------------------------------------------------------------
// Writers and their ledger
// ---------------------------------------------------------------------------

/// What the writers did, and the oracle they check before each commit.
struct Ledger {
    inner: Mutex<LedgerState>,
    /// Highest sequence delivered to the first subscriber (it may lag).
    delivered: Arc<AtomicU64>,
    /// Commits so far (transactions).
    commits: watch::Sender<usize>,
    /// Open-transaction checks made.
    checks: AtomicUsize,
}

#[derive(Default)]
struct LedgerState {
    committed: BTreeMap<Sequence, Uuid>,
    rolled_back: BTreeMap<Sequence, Uuid>,
    /// Smallest sequence of each committed transaction, in commit order.
    commit_order: Vec<Sequence>,
}

struct Report {
    committed: BTreeMap<Sequence, Uuid>,
    rolled_back: BTreeMap<Sequence, Uuid>,
    /// Transactions that committed after one holding higher sequences.
    inversions: usize,
    open_checks: usize,
}

impl Ledger {
    fn new(delivered: Arc<AtomicU64>) -> Self {
        Self {
            inner: Mutex::default(),
            delivered,
            commits: watch::channel(0).0,
            checks: AtomicUsize::new(0),
        }
    }

    /// The safety oracle, called while the transaction that drew `drawn`
    /// is still open: no subscriber may have delivered a sequence at or
    /// above its smallest one (the horizon must stay below it).
    fn check_held_back(&self, drawn: &[(Sequence, Uuid)]) {
        let Some(lowest) = drawn.iter().map(|(s, _)| *s).min() else {
            return;
        };
        let delivered = self.delivered.load(Ordering::SeqCst);
        assert!(
            delivered < lowest,
            "delivered sequence {delivered} while sequence {lowest} is held by an open transaction"
        );
        self.checks.fetch_add(1, Ordering::Relaxed);
    }

    fn committed(&self, events: impl IntoIterator<Item = (Sequence, Uuid)>) {
        let mut state = self.inner.lock().unwrap();
        let mut lowest = u64::MAX;
        for (seq, id) in events {
            lowest = lowest.min(seq);
            state.committed.insert(seq, id);
        }
        if lowest != u64::MAX {
            state.commit_order.push(lowest);
        }
        drop(state);
        self.commits.send_modify(|n| *n += 1);
    }

    fn rolled_back(&self, events: &[(Sequence, Uuid)]) {
        let mut state = self.inner.lock().unwrap();
        state.rolled_back.extend(events.iter().copied());
    }

    fn report(&self) -> Report {
        let state = self.inner.lock().unwrap();
        // A transaction committed after another whose smallest sequence is
        // higher: commit order and sequence order disagree.
        let mut highest_so_far = 0;
        let mut inversions = 0;
        for &lowest in &state.commit_order {
            if lowest < highest_so_far {
                inversions += 1;
            }
            highest_so_far = highest_so_far.max(lowest);
        }
        Report {
            committed: state.committed.clone(),
            rolled_back: state.rolled_back.clone(),
            inversions,
            open_checks: self.checks.load(Ordering::Relaxed),
        }
    }
}

/// `count` raw writers doing `rounds` transactions each. Writers `2p` and
/// `2p+1` pair up every fourth round: `2p` draws first, `2p+1` draws later
/// sequences and commits, and only then does `2p` commit (an out-of-order
/// commit by construction). Other rounds insert 1–4 events, yield, and
/// commit or roll back. Before every commit or rollback the transaction
/// checks the oracle.
fn spawn_writers(
    store: &PgStore,
    ledger: &Arc<Ledger>,
    count: usize,
    rounds: usize,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    let mut leaders = Vec::new();
    let mut followers = Vec::new();
    for _ in 0..count / 2 {
        let (tx, rx) = mpsc::channel::<oneshot::Sender<()>>(1);
        leaders.push(Some(tx));
        followers.push(Some(rx));
    }
    for w in 0..count {
        let pool = store.pool().clone();
        let ledger = ledger.clone();
        let pair = w / 2;
        let mut leader = if w % 2 == 0 && pair < leaders.len() {
            leaders[pair].take()
        } else {
            None
        };
        let mut follower = if w % 2 == 1 {
            followers[pair].take()
        } else {
            None
        };
        tasks.push(tokio::spawn(async move {
            for round in 0..rounds {
                let paired = round % 4 == 0;
                if paired && let Some(to_follower) = leader.as_mut() {
                    // Draw first, let the follower draw and commit, then
                    // commit.
                    let mut tx = pool.begin().await.unwrap();
                    take_xid(&mut tx).await;
                    let drawn = insert_events(&mut tx, 1 + round % 3).await;
                    let (done_tx, done_rx) = oneshot::channel();
                    to_follower.send(done_tx).await.expect("follower");
                    done_rx.await.expect("follower committed");
                    ledger.check_held_back(&drawn);
                    tx.commit().await.unwrap();
                    ledger.committed(drawn);
                    continue;
                }
                if paired && let Some(from_leader) = follower.as_mut() {
                    let done = from_leader.recv().await.expect("leader");
                    let mut tx = pool.begin().await.unwrap();
                    let drawn = insert_events(&mut tx, 1 + round % 2).await;
                    ledger.check_held_back(&drawn);
                    tx.commit().await.unwrap();
                    ledger.committed(drawn);
                    done.send(()).expect("leader waits");
                    continue;
                }
                let mut tx = pool.begin().await.unwrap();
                // The store takes its transaction id before drawing; the
                // bus must not depend on it.
                if w % 2 == 0 {
                    take_xid(&mut tx).await;
                }
                let drawn = insert_events(&mut tx, 1 + (w + round) % 4).await;
                tokio::task::yield_now().await;
                ledger.check_held_back(&drawn);
                if (w + round) % ROLLBACK_EVERY == 0 {
                    tx.rollback().await.unwrap();
                    ledger.rolled_back(&drawn);
                } else {
                    tx.commit().await.unwrap();
                    ledger.committed(drawn);
                }
            }
        }));
    }
    tasks
}

/// `count` tasks appending `batches` batches of `size` events through the
/// store (`EventLog::append`).
fn spawn_appenders(
    store: &Arc<PgStore>,
    ledger: &Arc<Ledger>,
    count: usize,
    batches: usize,
    size: usize,
) -> Vec<JoinHandle<()>> {
    (0..count)
        .map(|_| {
            let (store, ledger) = (store.clone(), ledger.clone());
            tokio::spawn(async move {
                for _ in 0..batches {
                    let batch = (0..size).map(|_| event()).collect();
                    let stored = EventLog::append(&*store, batch).await.expect("append");
                    ledger.committed(stored.iter().map(|e| (e.sequence, *e.event_id.as_uuid())));
                }
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Subscribers
// ---------------------------------------------------------------------------

struct Collector {
    /// Highest sequence delivered so far.
    delivered: Arc<AtomicU64>,
    /// Events delivered so far.
    count: watch::Receiver<usize>,
    /// Everything delivered up to and including the sentinel event.
    done: JoinHandle<Result<Vec<(Sequence, Uuid)>, String>>,
}

/// A subscriber from `after` that records what it gets until the event
/// `sentinel`; it fails if no event arrives for [`STALL`].
fn collect(store: &PgStore, after: Sequence, sentinel: Uuid) -> Collector {
    let mut stream = store.subscribe(after);
    let delivered = Arc::new(AtomicU64::new(after));
    let (count_tx, count) = watch::channel(0);
    let highest = delivered.clone();
    let store = store.clone();
    let done = tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(STALL, stream.next()).await {
                Ok(Some(Ok(e))) => {
                    let id = *e.event_id.as_uuid();
                    got.push((e.sequence, id));
                    highest.fetch_max(e.sequence, Ordering::SeqCst);
                    count_tx.send_replace(got.len());
                    if id == sentinel {
                        return Ok(got);
                    }
                }
                Ok(Some(Err(e))) => return Err(format!("error after {} events: {e}", got.len())),
                Ok(None) => return Err(format!("stream ended after {} events", got.len())),
                Err(_) => {
                    return Err(format!(
                        "subscriber stalled after {} events (last {:?}, bus {:?})",
                        got.len(),
                        got.last(),
                        store.bus_stats()
                    ));
                }
            }
        }
    });
    Collector {
        delivered,
        count,
        done,
    }
}

/// `got` is exactly the committed events above `after`, once each, in
/// strictly increasing sequence order, with no rolled-back event.
fn assert_exactly_once_in_order(got: &[(Sequence, Uuid)], report: &Report, after: Sequence) {
    let out_of_order: Vec<_> = got.windows(2).filter(|p| p[0].0 >= p[1].0).collect();
    assert!(
        out_of_order.is_empty(),
        "delivered out of order or twice: {:?}",
        &out_of_order[..out_of_order.len().min(10)]
    );
    let rolled_back: HashSet<Uuid> = report.rolled_back.values().copied().collect();
    let phantoms: Vec<_> = got
        .iter()
        .filter(|(_, id)| rolled_back.contains(id))
        .collect();
    assert!(
        phantoms.is_empty(),
        "rolled-back events delivered: {phantoms:?}"
    );
    let expected: BTreeMap<Sequence, Uuid> = report
        .committed
        .range(after + 1..)
        .map(|(s, id)| (*s, *id))
        .collect();
    let delivered: BTreeMap<Sequence, Uuid> = got.iter().copied().collect();
    let missing: BTreeSet<Sequence> = expected
        .keys()
        .filter(|s| !delivered.contains_key(s))
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "{} committed events never delivered, e.g. {:?}",
        missing.len(),
        missing.iter().take(20).collect::<Vec<_>>()
    );
    assert_eq!(
        got.len(),
        expected.len(),
        "delivered events that were not committed"
    );
    assert_eq!(delivered, expected, "sequence/event pairs differ");
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A store with a pool large enough for every writer to hold a transaction
/// open while the others (and the bus) still get connections.
async fn store() -> Option<(Arc<PgStore>, common::TestDb)> {
    common::store_with(PgStoreOptions {
        max_connections: 32,
        ..common::no_key()
    })
    .await
}

async fn take_xid(tx: &mut sqlx::PgConnection) {
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(tx)
        .await
        .unwrap();
}

/// Inserts `n` events in the caller's transaction the way the store does
/// (one `INSERT` each, then a `NOTIFY` with the highest sequence).
async fn insert_events(tx: &mut sqlx::PgConnection, n: usize) -> Vec<(Sequence, Uuid)> {
    let mut drawn = Vec::with_capacity(n);
    for _ in 0..n {
        let id = Uuid::new_v4();
        let worker = Uuid::new_v4();
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO events (event_id, event_type, aggregate_type, aggregate_id, \
             correlation_id, actor, occurred_at, payload) \
             VALUES ($1, 'WorkerReady', 'worker', $2, 'corr-bus', 'system:test', now(), $3) \
             RETURNING sequence",
        )
        .bind(id)
        .bind(worker.to_string())
        .bind(serde_json::json!({ "worker_id": worker }))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        drawn.push((seq as u64, id));
    }
    let highest = drawn.iter().map(|(s, _)| *s).max().unwrap_or_default();
    sqlx::query("SELECT pg_notify('hodei_events', $1)")
        .bind(highest.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    drawn
}

fn event() -> DomainEvent {
    event_with(Uuid::new_v4())
}

fn event_with(id: Uuid) -> DomainEvent {
    DomainEvent::new(
        EventId::from_uuid(id),
        from_millis(1_700_000_000_000),
        CorrelationId::new("corr-bus"),
        Actor::system("test"),
        EventBody::WorkerReady {
            worker_id: WorkerId::from_uuid(Uuid::new_v4()),
        },
    )
}

async fn next_seqs(
    stream: &mut futures::stream::BoxStream<
        'static,
        Result<DomainEvent, hodei_core::ports::StoreError>,
    >,
    n: usize,
) -> Vec<Sequence> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(STALL, stream.next()).await {
            Ok(Some(Ok(e))) => out.push(e.sequence),
            other => panic!("after {out:?}: {other:?}"),
        }
    }
    out
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

/// Waits until the watched value satisfies `cond`, failing after [`STALL`].
async fn wait_for(rx: &mut watch::Receiver<usize>, cond: impl FnMut(usize) -> bool) {
    let mut cond = cond;
    tokio::time::timeout(STALL, rx.wait_for(|n| cond(*n)))
        .await
        .expect("condition not met before the stall deadline")
        .expect("sender alive");
}

/// Re-checks `cond` every 20 ms until it holds, failing after [`STALL`].
async fn poll_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + STALL;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
