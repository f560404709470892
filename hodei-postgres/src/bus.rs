//! The event bus ([`EventSubscription`]) on LISTEN/NOTIFY, and the wake-ups
//! of log followers.
//!
//! ## Why a safe horizon
//! Event sequences come from a `bigserial`, drawn *before* commit: two
//! transactions can draw 10 and 11 and commit 11 first. A subscriber that
//! delivered 11 as soon as it saw it, then moved its cursor past 10, would
//! skip 10 forever. So subscribers never read past a *safe horizon* `H`: a
//! sequence such that every event `<= H` that will ever commit is already
//! visible (committed events `<= H` are all visible, and no transaction that
//! could still commit one is in progress).
//!
//! ## How it is computed: the writers of `events`
//! One task per store polls; each poll is one round trip of two statements,
//! executed in this order:
//! 1. `S = pg_sequence_last_value(events seq)`: every sequence drawn so far
//!    is `<= S` (the sequence has CACHE 1, so no backend holds drawn-ahead
//!    values, and `nextval` updates the value under a buffer lock that this
//!    read also takes).
//! 2. `W` = the transactions holding a granted `RowExclusiveLock` on
//!    `events` (from `pg_locks`), by virtual transaction id, with their
//!    transaction ids.
//!
//! `(S, W)` is a *candidate*. It becomes the horizon once a later poll finds
//! none of the transactions of `W` holding the lock any more. Why that is
//! safe, for a transaction `T` that drew a sequence `v <= S`:
//! - `T` drew `v` before `S` was read (step 1), and took `RowExclusiveLock`
//!   on `events` before it drew: the sequence is the column default of
//!   `INSERT INTO events`, evaluated by the executor after the table was
//!   locked (at parse time, or when a cached plan is revalidated). Nothing
//!   else draws from this sequence.
//! - A lock is held until the transaction ends, and it is released only
//!   after the commit is visible to new snapshots (PostgreSQL's
//!   `CommitTransaction` calls `ProcArrayEndTransaction` before it releases
//!   locks); a rolled-back `T` leaves a gap that will never fill. (A lock
//!   taken in a subtransaction is released early only when that
//!   subtransaction aborts, and its sequences with it.)
//! - So when step 2 runs, `T` has either ended (its events are visible to
//!   every later statement, or were rolled back) or is listed in `W`; and
//!   when a later poll no longer lists it, it has ended. Virtual
//!   transaction ids are never reused (PostgreSQL keeps the per-backend
//!   counter across backends), so "not listed" means "ended" — except that
//!   `PREPARE TRANSACTION` hands the locks to a new virtual id (`pid` is
//!   then NULL). A prepared transaction keeps its transaction id, so a
//!   writer also counts as open while a writer with one of its transaction
//!   ids is listed; a writer listed before it had a transaction id (one
//!   is assigned at its first write, which can come after its first draw)
//!   counts as open while any prepared writer holds the table.
//!
//! Candidates are kept oldest first; each poll accepts the leading ones whose
//! writers have all ended and publishes the newest accepted `S`. With no
//! writer at all, the candidate is accepted by the very poll that took it.
//!
//! Only transactions that write `events` delay the horizon, each until it
//! ends: an unrelated open transaction (another application, an idle psql
//! session) does not, however old. The bus therefore never stalls on a gap
//! left by a rolled-back transaction (its writer has ended), and never
//! declares a horizon over an open writer's sequences.
//!
//! (An earlier version also accepted a candidate once `pg_snapshot_xmin`
//! reached the `pg_snapshot_xmax` of a snapshot taken with it. That is
//! wrong: `xmax` is *latest completed xid + 1*, so the newest running
//! transaction is neither in the snapshot nor below its `xmin`, and
//! subscribers skipped events of still-open writers.)
//!
//! ## Wake-ups
//! `NOTIFY hodei_events` (payload: the committed sequence, never the event)
//! wakes the task early; notifications that queued up during a poll are
//! folded into one poll. While a candidate waits for writers the task polls
//! every `bus_busy_poll` (a writer that drew nothing, such as a purge, ends
//! without a notification), otherwise every `bus_idle_poll` as a safety net
//! for lost notifications. The `LISTEN` connection has its own
//! one-connection pool; when it drops (network, `pg_terminate_backend`) it
//! is re-established with exponential backoff, and since subscribers read
//! the table, nothing committed meanwhile is lost.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use hodei_core::event::DomainEvent;
use hodei_core::ports::{EventSubscription, StoreError};
use sqlx::postgres::{PgListener, PgNotification, PgPoolOptions};
use sqlx::{PgPool, Row};
use tokio::sync::{Notify, broadcast, mpsc, watch};

use crate::error::{store_err, to_u64};
use crate::events::{EVENTS_CHANNEL, read_range};
use crate::logs::LOGS_CHANNEL;
use crate::{BusStats, PgStore, PgStoreOptions};

/// Events read per page by a subscriber (one round trip each).
const PAGE: usize = 2000;
/// Candidates kept while waiting for open transactions; beyond it the
/// newest is replaced (that only delays it).
const MAX_CANDIDATES: usize = 64;
/// Longest wait for the `LISTEN` connection to come up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest horizon poll before it counts as failed.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// A wake-up for log followers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogWake {
    /// New lines (or the end) for this job.
    Job(uuid::Uuid),
    /// Anything may have changed (the listener reconnected).
    All,
}

/// Handle on the store's bus tasks (the listener and the horizon).
/// Dropping it (with the store) stops them.
pub(crate) struct Bus {
    horizon: watch::Receiver<u64>,
    logs: broadcast::Sender<LogWake>,
    wake: Arc<Notify>,
    stats: Arc<Counters>,
    _shutdown: watch::Sender<()>,
}

#[derive(Default)]
struct Counters {
    connects: AtomicU64,
    horizon: AtomicU64,
}

impl Bus {
    fn start(pool: PgPool, options: &PgStoreOptions) -> Self {
        let (horizon_tx, horizon) = watch::channel(0);
        let (logs, _) = broadcast::channel(1024);
        let wake = Arc::new(Notify::new());
        let stats = Arc::new(Counters::default());
        let (shutdown_tx, shutdown) = watch::channel(());
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .max_lifetime(None)
            .idle_timeout(None)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_lazy_with((*pool.connect_options()).clone());
        let (notes_tx, notes) = mpsc::unbounded_channel();
        let horizon_task = Horizon {
            pool,
            busy_poll: options.bus_busy_poll.max(Duration::from_millis(1)),
            idle_poll: options.bus_idle_poll.max(Duration::from_millis(1)),
            horizon_tx,
            logs: logs.clone(),
            wake: wake.clone(),
            stats: stats.clone(),
            candidates: VecDeque::new(),
            horizon: 0,
        };
        tokio::spawn(listen(
            listen_pool,
            notes_tx,
            stats.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(horizon_task.run(notes, shutdown));
        Self {
            horizon,
            logs,
            wake,
            stats,
            _shutdown: shutdown_tx,
        }
    }

    pub(crate) fn stats(&self) -> BusStats {
        BusStats {
            listener_connects: self.stats.connects.load(Ordering::Relaxed),
            horizon: self.stats.horizon.load(Ordering::Relaxed),
        }
    }

    /// Wake-ups for log followers; subscribe before reading, so that
    /// nothing between the read and the wait is missed.
    pub(crate) fn log_wakes(&self) -> broadcast::Receiver<LogWake> {
        self.logs.subscribe()
    }
}

impl PgStore {
    /// The bus, started on first use (needs a tokio runtime).
    pub(crate) fn bus(&self) -> Result<&Bus, StoreError> {
        if let Some(bus) = self.inner.bus.get() {
            return Ok(bus);
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(StoreError::Other(
                "subscriptions need a tokio runtime; call from within one".into(),
            ));
        }
        Ok(self
            .inner
            .bus
            .get_or_init(|| Bus::start(self.inner.pool.clone(), &self.inner.options)))
    }
}

impl EventSubscription for PgStore {
    fn subscribe(&self, after: u64) -> BoxStream<'static, Result<DomainEvent, StoreError>> {
        let bus = match self.bus() {
            Ok(bus) => bus,
            Err(e) => return stream::once(async move { Err(e) }).boxed(),
        };
        // A fresh horizon for the catch-up: events committed just before
        // this call become deliverable without waiting for a poll.
        bus.wake.notify_one();
        let state = Subscriber {
            store: self.clone(),
            cursor: after,
            scanned: after,
            buffer: VecDeque::new(),
            horizon: bus.horizon.clone(),
            retry: Backoff::new(Duration::from_millis(50), Duration::from_secs(5)),
        };
        stream::unfold(state, |mut sub| async move {
            let item = sub.next().await?;
            Some((item, sub))
        })
        .boxed()
    }
}

struct Subscriber {
    store: PgStore,
    /// Last sequence delivered (or the subscription's `after`).
    cursor: u64,
    /// Horizon up to which the table has been read: every event up to it
    /// that will ever be visible has been buffered or delivered. Reads
    /// start at the cursor.
    scanned: u64,
    buffer: VecDeque<(u64, Result<DomainEvent, StoreError>)>,
    horizon: watch::Receiver<u64>,
    retry: Backoff,
}

impl Subscriber {
    /// The next event; `None` when the store is gone.
    async fn next(&mut self) -> Option<Result<DomainEvent, StoreError>> {
        loop {
            if let Some((sequence, event)) = self.buffer.pop_front() {
                self.cursor = sequence;
                return Some(event);
            }
            let horizon = *self.horizon.borrow_and_update();
            if horizon > self.scanned.max(self.cursor) {
                match read_range(&self.store, self.cursor, Some(horizon), PAGE).await {
                    // An undecodable event (written by a newer version?)
                    // is reported in its place and passed, not retried.
                    Ok(events) => {
                        self.retry.reset();
                        if events.len() < PAGE {
                            // All of (cursor, horizon] that is visible;
                            // the rest are rolled-back or purged sequences.
                            self.scanned = horizon;
                        }
                        self.buffer.extend(events);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "event subscription: read failed; retrying");
                        tokio::time::sleep(self.retry.next()).await;
                    }
                }
                continue;
            }
            if self.horizon.changed().await.is_err() {
                return None;
            }
        }
    }
}

/// What the listener task tells the horizon task.
enum Note {
    /// Events committed, up to this sequence (if the payload parsed).
    Events(Option<u64>),
    /// Log lines or the end of a log.
    Log(LogWake),
    /// The `LISTEN` connection is (again) up: notifications may have been
    /// missed meanwhile.
    Connected,
    /// The `LISTEN` connection is down.
    Lost,
}

/// Keeps the `LISTEN` connection up and forwards what arrives. A task of
/// its own, so that a slow or failing connection never delays the horizon
/// polls, and `try_recv` is never cancelled half-way (only at shutdown).
async fn listen(
    listen_pool: PgPool,
    notes: mpsc::UnboundedSender<Note>,
    stats: Arc<Counters>,
    mut shutdown: watch::Receiver<()>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let mut listener = PgListener::connect_with(&listen_pool).await?;
            listener.ignore_pool_close_event(true);
            listener.listen_all([EVENTS_CHANNEL, LOGS_CHANNEL]).await?;
            Ok::<_, sqlx::Error>(listener)
        });
        let connected = tokio::select! {
            _ = shutdown.changed() => return,
            c = connect => c,
        };
        match connected {
            Ok(Ok(mut listener)) => {
                backoff.reset();
                stats.connects.fetch_add(1, Ordering::Relaxed);
                if notes.send(Note::Connected).is_err() {
                    return;
                }
                loop {
                    let got = tokio::select! {
                        _ = shutdown.changed() => return,
                        got = listener.try_recv() => got,
                    };
                    let note = match got {
                        Ok(Some(n)) => note_of(&n),
                        // Lost, and already re-established by sqlx.
                        Ok(None) => {
                            stats.connects.fetch_add(1, Ordering::Relaxed);
                            Note::Connected
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "event bus: listener connection lost");
                            break;
                        }
                    };
                    if notes.send(note).is_err() {
                        return;
                    }
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "event bus: LISTEN failed"),
            Err(_) => tracing::warn!("event bus: LISTEN timed out"),
        }
        if notes.send(Note::Lost).is_err() {
            return;
        }
        let wait = backoff.next();
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

fn note_of(n: &PgNotification) -> Note {
    if n.channel() == LOGS_CHANNEL {
        let job = n.payload().split(':').next().unwrap_or_default();
        Note::Log(uuid::Uuid::parse_str(job).map_or(LogWake::All, LogWake::Job))
    } else {
        Note::Events(n.payload().parse().ok())
    }
}

/// What the horizon task does after a note.
enum Step {
    Poll,
    Wait,
    Stop,
}

/// Computes the safe horizon and publishes it.
struct Horizon {
    pool: PgPool,
    busy_poll: Duration,
    idle_poll: Duration,
    horizon_tx: watch::Sender<u64>,
    logs: broadcast::Sender<LogWake>,
    wake: Arc<Notify>,
    stats: Arc<Counters>,
    /// Candidates oldest first; their sequences increase along the queue.
    candidates: VecDeque<Candidate>,
    horizon: u64,
}

impl Horizon {
    async fn run(
        mut self,
        mut notes: mpsc::UnboundedReceiver<Note>,
        mut shutdown: watch::Receiver<()>,
    ) {
        let mut listening = false;
        let mut errors = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match tokio::time::timeout(POLL_TIMEOUT, self.poll()).await {
                Ok(Ok(())) => errors.reset(),
                failed => {
                    let wait = errors.next();
                    match failed {
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, retry_in = ?wait, "event bus: horizon poll failed")
                        }
                        _ => tracing::warn!(retry_in = ?wait, "event bus: horizon poll timed out"),
                    }
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            }
            // Wait for a reason to poll again. Without a listener, or while
            // a candidate waits for open transactions, poll briskly. The
            // period counts from here, not from the last note: a stream of
            // log notifications must not postpone the poll.
            let since = tokio::time::Instant::now();
            loop {
                let period = if self.candidates.is_empty() && listening {
                    self.idle_poll
                } else {
                    self.busy_poll
                };
                let step = tokio::select! {
                    _ = shutdown.changed() => Step::Stop,
                    _ = self.wake.notified() => Step::Poll,
                    _ = tokio::time::sleep_until(since + period) => Step::Poll,
                    note = notes.recv() => self.take(note, &mut listening),
                };
                match step {
                    Step::Stop => return,
                    Step::Poll => break,
                    Step::Wait => {}
                }
            }
            // Fold the notes that queued up meanwhile (commits during the
            // last poll) into this one poll.
            loop {
                let note = match notes.try_recv() {
                    Ok(note) => Some(note),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                };
                if let Step::Stop = self.take(note, &mut listening) {
                    return;
                }
            }
        }
    }

    /// Handles a note of the listener task: whether it calls for a poll.
    fn take(&mut self, note: Option<Note>, listening: &mut bool) -> Step {
        match note {
            None => Step::Stop,
            // Committed at or below the horizon: that writer was not one
            // a candidate waits for (a horizon covers only ended writers).
            Some(Note::Events(Some(seq))) if seq <= self.horizon => Step::Wait,
            Some(Note::Events(_)) => Step::Poll,
            Some(Note::Log(wake)) => {
                let _ = self.logs.send(wake);
                Step::Wait
            }
            Some(Note::Connected) => {
                *listening = true;
                let _ = self.logs.send(LogWake::All);
                Step::Poll
            }
            Some(Note::Lost) => {
                *listening = false;
                Step::Wait
            }
        }
    }

    /// One step of the horizon (see the module documentation).
    async fn poll(&mut self) -> Result<(), StoreError> {
        let (last, writers) = self.read_writers().await?;
        let newest = self.candidates.back().map_or(self.horizon, |c| c.sequence);
        if last > newest {
            if self.candidates.len() >= MAX_CANDIDATES {
                // Replacing the newest only delays it: the new candidate
                // covers its sequences with writers listed later.
                self.candidates.pop_back();
            }
            self.candidates.push_back(Candidate::new(last, &writers));
        }
        let mut horizon = self.horizon;
        while let Some(c) = self.candidates.front() {
            if !c.ended(&writers) {
                break;
            }
            horizon = horizon.max(c.sequence);
            self.candidates.pop_front();
        }
        if horizon > self.horizon {
            self.horizon = horizon;
            self.stats.horizon.store(horizon, Ordering::Relaxed);
            let _ = self.horizon_tx.send(horizon);
        }
        Ok(())
    }

    /// Steps 1 and 2 of the module documentation, in one round trip: the
    /// statements of a simple query run in order, so the locks are listed
    /// after the sequence was read.
    async fn read_writers(&self) -> Result<(u64, Vec<Writer>), StoreError> {
        read_writers(&self.pool).await
    }
}

/// Longest [`settled_sequence`] waits for the writers it found.
const SETTLE_PATIENCE: Duration = Duration::from_secs(10);

/// [`EventLog::settled_sequence`](hodei_core::ports::EventLog::settled_sequence)
/// on PostgreSQL: the last sequence drawn, once every transaction that was
/// writing `events` when it was read has ended (a candidate of the
/// horizon, waited for on its own, polled every 10 ms). Any event that
/// commits later was drawn later, so it has a higher sequence. Gives up
/// with `Unavailable` after [`SETTLE_PATIENCE`] (a writer left open).
pub(crate) async fn settled_sequence(pool: &PgPool) -> Result<u64, StoreError> {
    let (last, writers) = read_writers(pool).await?;
    if writers.is_empty() {
        return Ok(last);
    }
    let candidate = Candidate::new(last, &writers);
    let deadline = tokio::time::Instant::now() + SETTLE_PATIENCE;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (_, now) = read_writers(pool).await?;
        if candidate.ended(&now) {
            return Ok(last);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::Unavailable(format!(
                "a transaction writing events has been open for over {} s; \
                 sequences up to {last} are not settled yet",
                SETTLE_PATIENCE.as_secs()
            )));
        }
    }
}

/// Steps 1 and 2 of the module documentation, in one round trip (see
/// [`WRITERS_SQL`]).
async fn read_writers(pool: &PgPool) -> Result<(u64, Vec<Writer>), StoreError> {
    let rows = sqlx::raw_sql(WRITERS_SQL)
        .fetch_all(pool)
        .await
        .map_err(store_err)?;
    let mut rows = rows.iter();
    let last: Option<i64> = rows
        .next()
        .ok_or_else(|| StoreError::Other("event bus: no sequence row".into()))?
        .try_get(0)
        .map_err(store_err)?;
    let mut writers: Vec<Writer> = Vec::new();
    for row in rows {
        let vxid: String = row.try_get(0).map_err(store_err)?;
        let prepared: bool = row.try_get(1).map_err(store_err)?;
        let xid: Option<String> = row.try_get(2).map_err(store_err)?;
        // One row per (writer, transaction id it holds): merge them.
        match writers.last_mut() {
            Some(w) if w.vxid == vxid => w.xids.extend(xid),
            _ => writers.push(Writer {
                vxid,
                prepared,
                xids: xid.into_iter().collect(),
            }),
        }
    }
    Ok((last.map_or(0, to_u64), writers))
}

/// The horizon poll. Statement 1 reads the last sequence drawn; statement
/// 2 lists the writers of `events` with their transaction ids (a writer
/// holds an `ExclusiveLock` on each of its own transaction ids, including
/// those of subtransactions), one row per pair, grouped by writer.
/// `pg_locks` is read once (materialized). A prepared transaction's locks
/// belong to a dummy process: `pid` is NULL.
const WRITERS_SQL: &str = "\
SELECT pg_sequence_last_value(pg_get_serial_sequence('events', 'sequence')::regclass);
WITH l AS MATERIALIZED (
    SELECT locktype, virtualtransaction AS vxid, pid, transactionid
    FROM pg_locks
    WHERE granted AND (
        (locktype = 'relation' AND mode = 'RowExclusiveLock'
         AND relation = 'events'::regclass
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))
        OR (locktype = 'transactionid' AND mode = 'ExclusiveLock')))
SELECT w.vxid, w.pid IS NULL, x.transactionid::text
FROM l AS w LEFT JOIN l AS x ON x.locktype = 'transactionid' AND x.vxid = w.vxid
WHERE w.locktype = 'relation'
ORDER BY w.vxid";

/// A transaction holding `RowExclusiveLock` on `events`.
struct Writer {
    /// Virtual transaction id (`pg_locks.virtualtransaction`).
    vxid: String,
    /// A prepared (2PC) transaction.
    prepared: bool,
    /// Its transaction ids (none before its first write).
    xids: Vec<String>,
}

/// A sequence waiting to become safe: every transaction that may have drawn
/// a sequence up to it and may still commit is one of `vxids`.
struct Candidate {
    /// Last sequence drawn when the candidate was taken.
    sequence: u64,
    /// Writers of `events` listed after `sequence` was read.
    vxids: BTreeSet<String>,
    /// Their transaction ids: a writer that prepares (2PC) changes virtual
    /// id but keeps these.
    xids: BTreeSet<String>,
    /// One of them had no transaction id yet: if it prepares, nothing
    /// identifies it, so any prepared writer not listed here holds the
    /// candidate back.
    anonymous: bool,
}

impl Candidate {
    fn new(sequence: u64, writers: &[Writer]) -> Self {
        Self {
            sequence,
            vxids: writers.iter().map(|w| w.vxid.clone()).collect(),
            xids: writers
                .iter()
                .flat_map(|w| w.xids.iter().cloned())
                .collect(),
            anonymous: writers.iter().any(|w| w.xids.is_empty()),
        }
    }

    /// Whether every writer of the candidate has ended, given the writers
    /// listed now.
    fn ended(&self, now: &[Writer]) -> bool {
        !now.iter().any(|w| {
            self.vxids.contains(&w.vxid)
                || w.xids.iter().any(|x| self.xids.contains(x))
                || (self.anonymous && w.prepared)
        })
    }
}

/// Exponential backoff: `initial`, doubling, capped at `max`.
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            current: initial,
        }
    }

    pub(crate) fn next(&mut self) -> Duration {
        let wait = self.current;
        self.current = (self.current * 2).min(self.max);
        wait
    }

    pub(crate) fn reset(&mut self) {
        self.current = self.initial;
    }
}
