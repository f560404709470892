//! The event bus ([`EventSubscription`]) on LISTEN/NOTIFY, and the wake-ups
//! of log followers.
//!
//! ## Why a safe horizon
//! Event sequences come from a `bigserial`, drawn *before* commit: two
//! transactions can draw 10 and 11 and commit 11 first. A subscriber that
//! delivered 11 as soon as it saw it, then moved its cursor past 10, would
//! skip 10 forever. So subscribers never read past a *safe horizon* `H`: a
//! sequence such that every event `<= H` that will ever commit is already
//! visible.
//!
//! One task per store computes it, by polling:
//! 1. `S = pg_sequence_last_value(events seq)`: every sequence drawn so far
//!    is `<= S` (the sequence has CACHE 1, so no backend holds drawn-ahead
//!    values).
//! 2. Then (a later statement) a snapshot's `xmax`: every transaction that
//!    drew a sequence `<= S` had a transaction id below it, because writers
//!    take their transaction id before drawing (they write the job row, or
//!    call `pg_current_xact_id()`, first).
//! 3. When a snapshot's `xmin` (oldest transaction still running) reaches
//!    that `xmax`, all of those transactions have ended, so `S` is safe.
//!    When the database is idle, `xmin == xmax` in the very same snapshot
//!    and `S` is safe at once.
//! 4. `xmin` is held back by *any* open transaction of the cluster (another
//!    application's, an idle-in-transaction psql session). So the same
//!    statement also lists the transactions holding `RowExclusiveLock` on
//!    `events` from `pg_locks`: a writer takes that lock before it draws a
//!    sequence and keeps it until it ends, so once none of the writers
//!    listed with the candidate holds it any more, `S` is safe too. Only
//!    Hodei's own, short, event-writing transactions then delay delivery.
//!    (Prepared 2PC transactions change identity, so while one holds the
//!    table only rule 3 is used.)
//!
//! `NOTIFY hodei_events` (payload: the committed sequence, never the event)
//! wakes the task early; while a candidate waits for open transactions the
//! task polls every `bus_busy_poll`, otherwise every `bus_idle_poll` as a
//! safety net for lost notifications. The `LISTEN` connection has its own
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
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgNotification, PgPoolOptions};
use tokio::sync::{Notify, broadcast, mpsc, watch};

use crate::error::{store_err, to_u64};
use crate::events::{EVENTS_CHANNEL, read_range};
use crate::logs::LOGS_CHANNEL;
use crate::{BusStats, PgStore, PgStoreOptions};

/// Events read per page by a subscriber.
const PAGE: usize = 500;
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
    /// Horizon up to which the table has been read. Reads start at the
    /// cursor, not here: an empty range is not skipped for good, so even a
    /// horizon that were ever too optimistic would delay an event rather
    /// than lose it.
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
            // a candidate waits for open transactions, poll briskly.
            loop {
                let period = if self.candidates.is_empty() && listening {
                    self.idle_poll
                } else {
                    self.busy_poll
                };
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = self.wake.notified() => break,
                    _ = tokio::time::sleep(period) => break,
                    note = notes.recv() => match note {
                        None => return,
                        Some(Note::Events(Some(seq))) if seq <= self.horizon => {}
                        Some(Note::Events(_)) => break,
                        Some(Note::Log(wake)) => {
                            let _ = self.logs.send(wake);
                        }
                        Some(Note::Connected) => {
                            listening = true;
                            let _ = self.logs.send(LogWake::All);
                            break;
                        }
                        Some(Note::Lost) => listening = false,
                    },
                }
            }
        }
    }

    /// One step of the horizon (see the module documentation).
    async fn poll(&mut self) -> Result<(), StoreError> {
        let last: Option<i64> = sqlx::query_scalar(
            "SELECT pg_sequence_last_value(pg_get_serial_sequence('events', 'sequence')::regclass)",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(store_err)?;
        let last = last.map_or(0, to_u64);
        // A separate, later statement: its snapshot and its view of the
        // locks are taken after `last` was read.
        // Writers are listed by virtual transaction id; a prepared (2PC)
        // transaction changes id when it prepares (its `pid` is then NULL),
        // so while one holds the table only the xmin rule is trusted.
        let (xmin, xmax, writers, prepared): (String, String, Vec<String>, bool) = sqlx::query_as(
            "WITH w AS (SELECT virtualtransaction AS vxid, pid FROM pg_locks \
                            WHERE locktype = 'relation' AND granted \
                              AND mode = 'RowExclusiveLock' \
                              AND relation = 'events'::regclass \
                              AND database = (SELECT oid FROM pg_database \
                                              WHERE datname = current_database())) \
                 SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text, \
                        ARRAY(SELECT vxid FROM w), EXISTS (SELECT 1 FROM w WHERE pid IS NULL) \
                 FROM pg_current_snapshot() AS s",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(store_err)?;
        let parse = |x: &str| {
            x.parse::<u64>()
                .map_err(|_| StoreError::Other(format!("unexpected transaction id {x:?}")))
        };
        let (xmin, xmax) = (parse(&xmin)?, parse(&xmax)?);
        let writers: BTreeSet<String> = writers.into_iter().collect();

        let newest = self.candidates.back().map_or(self.horizon, |c| c.sequence);
        if last > newest {
            if self.candidates.len() >= MAX_CANDIDATES {
                self.candidates.pop_back();
            }
            self.candidates.push_back(Candidate {
                sequence: last,
                xmax,
                writers: writers.clone(),
            });
        }
        let mut horizon = self.horizon;
        while let Some(c) = self.candidates.front() {
            let all_ended = xmin >= c.xmax || (!prepared && c.writers.is_disjoint(&writers));
            if !all_ended {
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
}

/// A sequence waiting to become safe, with the two ways to learn that
/// every transaction that may have drawn a sequence up to it has ended.
struct Candidate {
    /// Last sequence drawn when the candidate was taken.
    sequence: u64,
    /// `xmax` of a snapshot taken after `sequence` was read.
    xmax: u64,
    /// Transactions writing to `events` at that time (virtual ids).
    writers: BTreeSet<String>,
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
