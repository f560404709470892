//! The engine: the control plane's decision core as a sans-IO machine.
//!
//! # Method taxonomy
//! - getters: [`Engine::job`], [`Engine::worker`], [`Engine::workers`], ...
//! - inputs, `handle_*`: facts from the outside world (a submission, a
//!   worker's report, a claim result, the passing of time with
//!   [`Engine::handle_tick`]). Each takes `now`, which must never go
//!   backwards between calls.
//! - outputs: [`Engine::poll_effect`] yields the [`Effect`]s to carry out,
//!   in order; [`Engine::next_deadline`] says when to call
//!   [`Engine::handle_tick`] next.
//!
//! Same inputs, same outputs: the engine reads no clock and draws its ids
//! and randomness from the [`Entropy`] it was built with.
//!
//! # Several replicas
//! The engine owns only the jobs it claimed from the shared queue
//! ([`Effect::Claim`] / [`Engine::handle_claimed`]) and the workers
//! connected to it. Every job change goes out as [`Effect::UpdateJob`]
//! with the version it was based on; when the store reports that someone
//! else changed the job, the shell calls [`Engine::handle_job_changed`]
//! and the engine falls in line (stops the attempt on its worker). The
//! simplest shell drains every effect of one input before taking the next;
//! see [`Effect::UpdateJob`] for what a shell that batches inputs must do.
//! A job past its deadline that no live replica decided (its replica
//! died) is decided by whichever replica runs the deadline sweep, with
//! [`sweep_decision`].
//!
//! # Liveness of workers
//! A worker is *disconnected* when its stream drops (the shell calls
//! [`Engine::handle_disconnected`]) or when it has been silent for
//! [`EngineConfig::heartbeat_timeout`] (decided at a tick). Disconnection
//! is the worker's `connected` flag, not a state: a disconnected worker
//! keeps its state (`READY`, `BUSY`, `DRAINING`) and its jobs, gets no new
//! work, and is *lost* (its jobs fail as [`FailureKind::WorkerLost`]) if it
//! is not back within [`EngineConfig::reconnect_grace`].
//!
//! It comes back in one of two ways:
//! - it registers again ([`Engine::handle_registered`]), after either
//!   kind of disconnection;
//! - after a heartbeat timeout only, any message on the session it still
//!   has (a heartbeat, a log batch, an acknowledgement, a refusal, a
//!   result, a drain) revives it: the pending loss is cancelled,
//!   `WorkerReconnected` is recorded and it takes work again, with its
//!   jobs still running. A timeout says the worker was not *heard*, not
//!   that its session ended; the shell keeps routing that session's
//!   messages, and only a dropped stream ends it (after which only a new
//!   registration counts).
//!
//! **Stalls of the shell.** The engine is told of time only through its
//! inputs, and a shell stuck on a slow store hears no worker meanwhile
//! while their heartbeats queue up behind it. So silence is only counted
//! while the engine was listening: when an input (a tick included) arrives
//! more than one `heartbeat_timeout` after the previous one, the engine
//! was deaf for that gap, and no worker is timed out or declared lost
//! before another full `heartbeat_timeout` has passed (the same floor for
//! both deadlines). The queued heartbeats are taken meanwhile; a worker
//! that is really silent is still timed out, one `heartbeat_timeout`
//! later. The grace is a full timeout rather than one heartbeat interval
//! (which the engine does not know) so that the jitter the timeout
//! tolerates is tolerated after a stall too. It cannot postpone a silent
//! worker forever: [`Engine::next_deadline`] asks for a tick at least
//! every half `heartbeat_timeout` while any worker is watched, so a shell
//! that honours its deadlines never looks stalled. While the shell keeps
//! stalling (every pass blocked on a store that is down), no worker is
//! timed out at all: that is decided once it runs smoothly again for one
//! `heartbeat_timeout`. Job deadlines are not deferred: an
//! acknowledgement due during a stall still fails its attempt as
//! `DispatchFailed` (retried by policy).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::EngineError;
use crate::event::{AggregateKind, DomainEvent, EventBody};
use crate::ids::{Actor, CorrelationId, EventId, JobId, ProviderId, WorkerId};
use crate::job::{Failure, FailureKind, Job, JobCommand, JobState, JobStatus, TransitionContext};
use crate::ports::{Claim, RequestContext};
use crate::retry::RetryPolicy;
use crate::scheduler::{self, NoProvider, ProviderSnapshot, WorkerSelection};
use crate::spec::{JobSpec, Resources};
use crate::time::{Timestamp, add};
use crate::worker::{Worker, WorkerState};

/// Source of ids and randomness, injected so that the engine stays
/// deterministic.
pub trait Entropy: Send + Sync {
    /// A fresh UUID.
    fn uuid(&mut self) -> Uuid;
    /// A uniform number in `[0, 1)`.
    fn unit(&mut self) -> f64;
}

/// A deterministic [`Entropy`] from a seed (splitmix64), for simulations,
/// tests and benchmarks.
#[derive(Debug, Clone)]
pub struct SeededEntropy(u64);

impl SeededEntropy {
    /// Starts from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl Entropy for SeededEntropy {
    fn uuid(&mut self) -> Uuid {
        let hi = self.next_u64();
        let lo = self.next_u64();
        uuid::Builder::from_random_bytes(((u128::from(hi) << 64) | u128::from(lo)).to_be_bytes())
            .into_uuid()
    }

    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How long a worker of a reusable pool stays idle before the autoscaler
/// may retire it (when the pool is above its target).
pub const SCALE_DOWN_IDLE: Duration = Duration::from_secs(60);

/// How long past its deadline a job in `SCHEDULED` or `ASSIGNED` waits
/// before the deadline sweep decides it (see [`sweep_decision`]).
pub const SWEEP_GRACE: Duration = Duration::from_secs(2);

/// How long past its deadline a job in `RUNNING` waits before the deadline
/// sweep decides it: [`SWEEP_GRACE`] plus room for an orphaned agent to
/// have killed the process at its own timeout (an agent sends SIGTERM at
/// the timeout and SIGKILL 5 s later), so that the retry never overlaps
/// the attempt it replaces.
pub const SWEEP_GRACE_RUNNING: Duration = Duration::from_secs(10);

/// The deadline sweep's decision on a job it found past its deadline and
/// that this replica does not hold: another replica held it and did not
/// decide it in time, so that replica is gone (or stalled; the job's
/// version settles any race). `None` while the job is within its grace.
///
/// - `SCHEDULED` and `ASSIGNED`: the deadline passed
///   ([`JobCommand::Expire`]: `provisioning_failed` / `dispatch_failed`,
///   retried by policy).
/// - `RUNNING`: the job's worker is lost with its replica, whose result can
///   no longer arrive: the attempt fails as
///   [`FailureKind::WorkerLost`] and is retried by policy, like a worker
///   that vanishes under a live replica. (A job that really ran past its
///   timeout was killed by its agent; that report is lost with the
///   replica too, so the retry is what the user would otherwise redo.)
/// - Any other state: nothing to decide.
pub fn sweep_decision(job: &Job, now: Timestamp) -> Option<JobCommand> {
    let deadline = job.status.deadline()?;
    let (grace, command) = match job.state() {
        JobState::Scheduled | JobState::Assigned => (SWEEP_GRACE, JobCommand::Expire),
        JobState::Running => (
            SWEEP_GRACE_RUNNING,
            JobCommand::Fail(Failure::new(
                FailureKind::WorkerLost,
                "no result by the deadline: the replica that held the job and its worker \
                 stopped answering (decided by the deadline sweep)",
            )),
        ),
        _ => return None,
    };
    (add(deadline, grace) <= now).then_some(command)
}

/// Engine settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct EngineConfig {
    /// Name of this replica (queue claims, `system:` actors).
    pub replica_id: String,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Worker selection strategy.
    pub selection: WorkerSelection,
    /// Providers tried first, in order, when a spec names none.
    pub provider_preference: Vec<ProviderId>,
    /// Deadline of `SCHEDULED`: a worker must register within it.
    pub provision_timeout: Duration,
    /// Deadline of `ASSIGNED`: the worker must acknowledge within it.
    pub dispatch_timeout: Duration,
    /// A connected worker silent for this long is considered disconnected.
    pub heartbeat_timeout: Duration,
    /// A disconnected worker not back within this is lost.
    pub reconnect_grace: Duration,
    /// How often the queue is polled even without a hint (other replicas'
    /// submissions, retries whose backoff ended).
    pub claim_interval: Duration,
    /// Lease of a claim on a pending job.
    pub claim_lease: Duration,
    /// Most jobs claimed at once.
    pub max_claim: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            replica_id: "hodei".into(),
            retry: RetryPolicy::default(),
            selection: WorkerSelection::default(),
            provider_preference: Vec::new(),
            provision_timeout: Duration::from_secs(60),
            dispatch_timeout: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(15),
            reconnect_grace: Duration::from_secs(10),
            claim_interval: Duration::from_secs(1),
            claim_lease: Duration::from_secs(30),
            max_claim: 64,
        }
    }
}

/// A provider as the engine manages it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderConfig {
    /// Name.
    pub id: ProviderId,
    /// Kind (`local`, `docker`, ...).
    pub kind: String,
    /// Whether jobs may name an image.
    pub runs_images: bool,
    /// Most workers at once.
    pub max_workers: u32,
    /// Fewest workers kept (reusable ones, busy or idle), whatever the
    /// load; at most `max_workers`.
    #[serde(default)]
    pub min_workers: u32,
    /// Idle reusable workers kept ready (warm pool).
    pub warm_pool: u32,
    /// Workers are created per job and destroyed after it.
    pub ephemeral: bool,
    /// Image of warm-pool workers, for providers that run images.
    pub default_image: Option<String>,
    /// Jobs a reusable worker of this provider runs at once (at least 1;
    /// ephemeral workers run one job each whatever it says).
    /// (Left out of the JSON form when 1, so that configurations written
    /// before this setting existed compare equal.)
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub worker_capacity: u32,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

impl ProviderConfig {
    /// A provider of one-job workers with at most `max_workers`.
    pub fn ephemeral(id: &str, kind: &str, runs_images: bool, max_workers: u32) -> Self {
        Self {
            id: ProviderId::new(id),
            kind: kind.into(),
            runs_images,
            max_workers,
            min_workers: 0,
            warm_pool: 0,
            ephemeral: true,
            default_image: None,
            worker_capacity: 1,
        }
    }

    /// Jobs each worker this provider starts may run at once: 1 for
    /// ephemeral workers, else `worker_capacity` (at least 1).
    pub fn capacity_per_worker(&self) -> u32 {
        if self.ephemeral {
            1
        } else {
            self.worker_capacity.max(1)
        }
    }
}

/// What a worker says when it registers (or re-registers).
#[derive(Debug, Clone, PartialEq)]
pub struct Registration {
    /// Its id.
    pub worker: WorkerId,
    /// Provider that created it (for workers unknown to this engine).
    pub provider: ProviderId,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Image it runs in.
    pub image: Option<String>,
    /// Concurrent jobs.
    pub capacity: u32,
    /// Attempts it is running right now (after a reconnect).
    pub running: Vec<(JobId, u32)>,
}

/// How an attempt ended, as the worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttemptReport {
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Terminating signal.
    pub signal: Option<i32>,
    /// Killed for exceeding its memory limit.
    pub oom_killed: bool,
    /// Killed by the worker at the job's timeout.
    pub timed_out: bool,
    /// The process could not be started (reason).
    pub start_error: Option<String>,
}

/// Why a worker refused an attempt, as far as the engine cares.
///
/// A refusal for capacity or a drain gives the attempt back: the job is
/// requeued in the same attempt ([`JobCommand::Requeue`], events
/// `JobDispatchFailed` then `JobQueued`) instead of failing it. Any other
/// refusal fails the attempt as [`FailureKind::DispatchFailed`] (retried by
/// policy, like a dispatch that was never acknowledged).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalCode {
    /// No machine-readable reason (older agents, other refusals).
    Unspecified,
    /// Every slot of the worker is taken. The worker gets no new work
    /// until it shows a slot may be free (a result or a heartbeat).
    AtCapacity,
    /// The worker drains: it is marked draining as if it had said so.
    Draining,
}

impl RefusalCode {
    /// Every code.
    pub const ALL: [RefusalCode; 3] = [
        RefusalCode::Unspecified,
        RefusalCode::AtCapacity,
        RefusalCode::Draining,
    ];

    /// The stable name, e.g. `at_capacity`.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::Unspecified => "unspecified",
            RefusalCode::AtCapacity => "at_capacity",
            RefusalCode::Draining => "draining",
        }
    }

    /// `reason` with the code in front, in the form
    /// [`Engine::handle_refused`] reads back: `[refusal:at_capacity] worker
    /// is at capacity (1 running)`. For shells whose refusal report carries
    /// only text; [`RefusalCode::Unspecified`] leaves the text as it is.
    pub fn tag(self, reason: &str) -> String {
        match self {
            RefusalCode::Unspecified => reason.to_owned(),
            code => format!("{}{}] {reason}", Self::TAG_PREFIX, code.as_str()),
        }
    }

    /// Splits a text made by [`RefusalCode::tag`] into its code and
    /// reason; any other text is an unspecified refusal, unchanged.
    pub fn untag(text: &str) -> (RefusalCode, &str) {
        let Some(rest) = text.strip_prefix(Self::TAG_PREFIX) else {
            return (RefusalCode::Unspecified, text);
        };
        for code in [RefusalCode::AtCapacity, RefusalCode::Draining] {
            if let Some(reason) = rest
                .strip_prefix(code.as_str())
                .and_then(|r| r.strip_prefix("] "))
            {
                return (code, reason);
            }
        }
        (RefusalCode::Unspecified, text)
    }

    const TAG_PREFIX: &'static str = "[refusal:";
}

/// A worker the engine wants created.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchRequest {
    /// Id it must register under.
    pub worker: WorkerId,
    /// Image, for providers that run images.
    pub image: Option<String>,
    /// Limits.
    pub resources: Resources,
    /// Labels to advertise.
    pub labels: BTreeMap<String, String>,
    /// The job it is for, when ephemeral.
    pub job: Option<JobId>,
    /// Jobs it may run at once (its agent's capacity).
    pub capacity: u32,
}

/// A decision to carry out. The shell executes effects in the order they
/// are polled.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Store a new job and its events atomically (it enters the queue).
    CreateJob {
        /// The job.
        job: Job,
        /// `JobCreated`, `JobQueued`.
        events: Vec<DomainEvent>,
    },
    /// Store a job change and its events atomically, if the stored version
    /// is `expected_version`; on a conflict call
    /// [`Engine::handle_job_changed`].
    ///
    /// A shell that drains the effects of each input before the next input
    /// sees at most one update per job in flight. A shell that feeds
    /// several inputs before draining may hold several updates of one job,
    /// each based on the one before: once one conflicts, it must skip the
    /// updates of that job it had already polled (their base version lost;
    /// another writer may hold that very version number, so the store's
    /// check alone would not stop them). Effects polled after the
    /// [`Engine::handle_job_changed`] call are based on the stored version.
    UpdateJob {
        /// The job after the change. Its version is above
        /// `expected_version`, by more than one when several transitions
        /// decided together are committed as one unit.
        job: Job,
        /// Version before the change.
        expected_version: u64,
        /// Events of the change.
        events: Vec<DomainEvent>,
    },
    /// Store events that go with no job change (workers, providers).
    Record(Vec<DomainEvent>),
    /// Store a worker's record.
    SaveWorker(Worker),
    /// Claim up to `limit` jobs from the queue, then call
    /// [`Engine::handle_claimed`] (also with an empty claim or on error).
    Claim {
        /// Most jobs to claim.
        limit: usize,
        /// Lease of the claim.
        lease: Duration,
    },
    /// Give a claimed job back to the queue.
    Release(JobId),
    /// Ask a provider for a worker; report with
    /// [`Engine::handle_provisioned`] or [`Engine::handle_provision_failed`].
    Provision {
        /// Provider.
        provider: ProviderId,
        /// What to create.
        launch: LaunchRequest,
    },
    /// Send the job's current attempt to the worker (with its secrets).
    Dispatch {
        /// Worker.
        worker: WorkerId,
        /// The job, in `ASSIGNED`.
        job: Box<Job>,
    },
    /// Tell a worker to stop an attempt.
    CancelOnWorker {
        /// Worker.
        worker: WorkerId,
        /// Job.
        job: JobId,
        /// Attempt.
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// Tell a worker to drain.
    DrainWorker(WorkerId),
    /// Tell a worker to exit and have its provider remove it.
    DestroyWorker {
        /// Provider.
        provider: ProviderId,
        /// Worker.
        worker: WorkerId,
    },
}

/// Whom a change of an owned job is attributed to in its events.
enum By {
    /// The scheduler, in the job's own flow.
    Engine,
    /// This actor (a worker, `system:<component>`), in the job's own flow.
    Actor(Actor),
    /// A request: its correlation id and caller.
    Request(CorrelationId, Actor),
}

#[derive(Debug, Clone)]
struct WorkerEntry {
    worker: Worker,
    /// `worker:<id>`, formatted once.
    actor: Actor,
    /// Correlation of the flow that created it.
    correlation_id: CorrelationId,
    /// When a disconnected worker is declared lost.
    lost_at: Option<Timestamp>,
    /// Disconnected by the heartbeat timeout, not by its stream: its
    /// session may still be up, and any message on it revives the worker
    /// (see the module documentation).
    timed_out: bool,
    /// When a worker still creating/connecting is given up.
    register_by: Option<Timestamp>,
    /// It refused an attempt for capacity: no new work until it shows a
    /// slot may be free (a result, a heartbeat, a new session).
    saturated: bool,
    /// What [`WorkerTable`]'s indexes hold for it (maintained by the table).
    indexed: Indexed,
}

impl WorkerEntry {
    /// Connected, READY or BUSY, and not known to be full: new work may
    /// be sent to it (if it has a free slot).
    fn takes_work(&self) -> bool {
        let w = &self.worker;
        w.connected && matches!(w.state, WorkerState::Ready | WorkerState::Busy) && !self.saturated
    }

    /// Whether it may be given `job` now ([`Worker::accepts`], unless saturated).
    fn accepts(&self, job: JobId) -> bool {
        !self.saturated && self.worker.accepts(job)
    }
}

/// A worker's place in the [`WorkerTable`] indexes, as last refreshed.
#[derive(Debug, Clone, Copy, Default)]
struct Indexed {
    /// Modified since the last refresh (queued in `WorkerTable::dirty`).
    dirty: bool,
    /// Its key in `WorkerTable::by_load`, if it takes work.
    load: Option<usize>,
    /// Free slots counted in `WorkerTable::free_slots`.
    slots: usize,
    /// Listed in `WorkerTable::reserved`.
    reserved: bool,
}

/// The workers, with indexes that spare the hot path a scan of them all:
/// the free slots of unreserved workers (the claim capacity) and the
/// workers that take work ordered by load (least-loaded placement).
///
/// Every mutable access marks the worker dirty; the indexes are brought up
/// to date lazily, before they are read. In debug builds each read checks
/// the indexes against a full recount.
#[derive(Debug, Default)]
struct WorkerTable {
    map: BTreeMap<WorkerId, WorkerEntry>,
    dirty: Vec<WorkerId>,
    /// Sum of free slots of connected, unreserved READY/BUSY workers
    /// (saturated ones excluded, as everywhere below).
    free_slots: usize,
    /// Connected READY/BUSY workers with a free slot, by (jobs held, id).
    by_load: BTreeSet<(usize, WorkerId)>,
    /// Workers reserved for a job.
    reserved: BTreeSet<WorkerId>,
}

impl WorkerTable {
    fn get(&self, id: &WorkerId) -> Option<&WorkerEntry> {
        self.map.get(id)
    }

    fn get_mut(&mut self, id: &WorkerId) -> Option<&mut WorkerEntry> {
        let e = self.map.get_mut(id)?;
        if !e.indexed.dirty {
            e.indexed.dirty = true;
            self.dirty.push(*id);
        }
        Some(e)
    }

    /// For changes that no index depends on (heartbeats).
    fn get_mut_unindexed(&mut self, id: &WorkerId) -> Option<&mut WorkerEntry> {
        self.map.get_mut(id)
    }

    fn contains_key(&self, id: &WorkerId) -> bool {
        self.map.contains_key(id)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn keys(&self) -> impl Iterator<Item = &WorkerId> {
        self.map.keys()
    }

    fn values(&self) -> impl Iterator<Item = &WorkerEntry> {
        self.map.values()
    }

    fn insert(&mut self, id: WorkerId, mut entry: WorkerEntry) -> Option<WorkerEntry> {
        entry.indexed = Indexed {
            dirty: true,
            ..Indexed::default()
        };
        self.dirty.push(id);
        let old = self.map.insert(id, entry);
        if let Some(old) = &old {
            self.unindex(id, old.indexed);
        }
        old
    }

    fn get_or_insert_with(
        &mut self,
        id: WorkerId,
        make: impl FnOnce() -> WorkerEntry,
    ) -> &mut WorkerEntry {
        if !self.map.contains_key(&id) {
            self.insert(id, make());
        }
        self.get_mut(&id).expect("inserted above")
    }

    fn remove(&mut self, id: &WorkerId) -> Option<WorkerEntry> {
        let old = self.map.remove(id)?;
        self.unindex(*id, old.indexed);
        Some(old)
    }

    fn unindex(&mut self, id: WorkerId, indexed: Indexed) {
        if let Some(load) = indexed.load {
            self.by_load.remove(&(load, id));
        }
        if indexed.reserved {
            self.reserved.remove(&id);
        }
        self.free_slots -= indexed.slots;
    }

    /// Brings the indexes up to date with every change since the last call.
    fn refresh(&mut self) {
        for id in std::mem::take(&mut self.dirty) {
            let Some(e) = self.map.get_mut(&id) else {
                continue; // removed: unindexed then
            };
            let old = e.indexed;
            let takes_work = e.takes_work();
            let w = &e.worker;
            let new = Indexed {
                dirty: false,
                load: (takes_work && w.free_slots() > 0).then_some(w.jobs.len()),
                slots: if takes_work && w.reserved_for.is_none() {
                    w.free_slots() as usize
                } else {
                    0
                },
                reserved: w.reserved_for.is_some(),
            };
            e.indexed = new;
            self.unindex(id, old);
            if let Some(load) = new.load {
                self.by_load.insert((load, id));
            }
            if new.reserved {
                self.reserved.insert(id);
            }
            self.free_slots += new.slots;
        }
        #[cfg(debug_assertions)]
        self.check();
    }

    /// The indexes agree with a full recount.
    #[cfg(debug_assertions)]
    fn check(&self) {
        let (mut slots, mut loaded, mut reserved) = (0, 0, 0);
        for e in self.map.values() {
            let takes_work = e.takes_work();
            let w = &e.worker;
            if takes_work && w.reserved_for.is_none() {
                slots += w.free_slots() as usize;
            }
            if takes_work && w.free_slots() > 0 {
                loaded += 1;
                assert!(self.by_load.contains(&(w.jobs.len(), w.id)), "load index");
            }
            if w.reserved_for.is_some() {
                reserved += 1;
                assert!(self.reserved.contains(&w.id), "reservation index");
            }
        }
        assert_eq!(self.free_slots, slots, "free slots index");
        assert_eq!(self.by_load.len(), loaded, "load index size");
        assert_eq!(self.reserved.len(), reserved, "reservation index size");
    }

    /// Free slots of connected, unreserved READY/BUSY workers that are
    /// not saturated.
    fn free_slots(&mut self) -> usize {
        self.refresh();
        self.free_slots
    }

    /// The least-loaded worker that may run `job` (what
    /// [`scheduler::select_worker`] picks with
    /// [`WorkerSelection::LeastLoaded`]), without looking at them all.
    fn least_loaded(&mut self, job: JobId, spec: &JobSpec) -> Option<WorkerId> {
        self.refresh();
        // A worker provisioned for this very job always wins.
        let reserved = self
            .reserved
            .iter()
            .map(|id| &self.map[id])
            .filter(|e| !e.saturated)
            .map(|e| &e.worker)
            .find(|w| w.reserved_for == Some(job) && scheduler::is_eligible(w, job, spec));
        if let Some(w) = reserved {
            return Some(w.id);
        }
        // Keys are (jobs held, id): the first eligible is the minimum.
        self.by_load
            .iter()
            .map(|(_, id)| &self.map[id].worker)
            .find(|w| scheduler::is_eligible(w, job, spec))
            .map(|w| w.id)
    }
}

impl std::ops::Index<&WorkerId> for WorkerTable {
    type Output = WorkerEntry;
    fn index(&self, id: &WorkerId) -> &WorkerEntry {
        &self.map[id]
    }
}

#[derive(Debug, Clone)]
struct ProviderEntry {
    config: ProviderConfig,
    healthy: bool,
    /// Its workers in `Engine::workers` (none there is terminated), kept
    /// as workers come and go so that capacity is not a scan.
    live: u32,
}

/// The engine. See the module documentation.
pub struct Engine {
    config: EngineConfig,
    entropy: Box<dyn Entropy>,
    jobs: BTreeMap<JobId, Job>,
    workers: WorkerTable,
    providers: BTreeMap<ProviderId, ProviderEntry>,
    effects: VecDeque<Effect>,
    rr_cursor: u64,
    /// Jobs may be waiting in the queue.
    queue_hint: bool,
    claim_in_flight: bool,
    next_claim_at: Option<Timestamp>,
    actor: Actor,
    /// Jobs waiting in the shared queue, as last reported
    /// ([`Engine::handle_queue_depth`]).
    queue_depth: u64,
    /// Since when each idle worker of a reusable pool has been idle.
    idle_since: BTreeMap<WorkerId, Timestamp>,
    /// Workers of reusable pools with `worker_capacity > 1` still being
    /// started for a job, and the slots they have left for more jobs like
    /// it (see [`Engine::share_starting_worker`]).
    starting: BTreeMap<WorkerId, StartingSlots>,
    /// `now` of the latest input (ticks included).
    last_input: Option<Timestamp>,
    /// After a stall of the shell: no worker is timed out or declared
    /// lost before this (see "Liveness of workers" in the module docs).
    liveness_floor: Option<Timestamp>,
}

/// A multi-job worker being started for a job, and what the jobs that
/// may wait for it with that job must share: its image, its resource
/// limits and the labels it advertises are the first job's.
#[derive(Debug, Clone, PartialEq)]
struct StartingSlots {
    provider: ProviderId,
    image: Option<String>,
    resources: Resources,
    labels: BTreeMap<String, String>,
    /// Slots not yet promised to a job.
    left: u32,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("replica", &self.config.replica_id)
            .field("jobs", &self.jobs.len())
            .field("workers", &self.workers.len())
            .finish()
    }
}

impl Engine {
    /// A new engine with no jobs and no workers.
    pub fn new(
        config: EngineConfig,
        providers: Vec<ProviderConfig>,
        entropy: Box<dyn Entropy>,
    ) -> Self {
        let actor = Actor::system("scheduler");
        Self {
            config,
            entropy,
            jobs: BTreeMap::new(),
            workers: WorkerTable::default(),
            providers: providers
                .into_iter()
                .map(|c| {
                    (
                        c.id.clone(),
                        ProviderEntry {
                            config: c,
                            healthy: true,
                            live: 0,
                        },
                    )
                })
                .collect(),
            effects: VecDeque::new(),
            rr_cursor: 0,
            queue_hint: true,
            claim_in_flight: false,
            next_claim_at: None,
            actor,
            queue_depth: 0,
            idle_since: BTreeMap::new(),
            starting: BTreeMap::new(),
            last_input: None,
            liveness_floor: None,
        }
    }

    // ----- getters --------------------------------------------------------

    /// Settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// A job this engine owns.
    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    /// Jobs this engine owns (claimed, not yet terminal).
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// A worker.
    pub fn worker(&self, id: WorkerId) -> Option<&Worker> {
        self.workers.get(&id).map(|e| &e.worker)
    }

    /// Workers known to this engine (terminated ones are forgotten).
    pub fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.workers.values().map(|e| &e.worker)
    }

    /// Configured providers with their health.
    pub fn providers(&self) -> impl Iterator<Item = (&ProviderConfig, bool)> {
        self.providers.values().map(|p| (&p.config, p.healthy))
    }

    /// Whether `worker` still holds `job` in `attempt` (for the shell to
    /// check before sending a dispatch whose commit may have conflicted).
    pub fn holds(&self, worker: WorkerId, job: JobId, attempt: u32) -> bool {
        self.jobs
            .get(&job)
            .is_some_and(|j| j.attempt == attempt && j.status.worker() == Some(worker))
    }

    /// Validates a spec against the configured providers without
    /// submitting it.
    pub fn check_spec(&self, spec: &JobSpec) -> Result<(), EngineError> {
        let known = || {
            self.providers
                .keys()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some(p) = spec.provider() {
            let Some(entry) = self.providers.get(p) else {
                return Err(EngineError::UnknownProvider {
                    provider: p.to_string(),
                    known: known(),
                });
            };
            if spec.image().is_some() && !entry.config.runs_images {
                return Err(EngineError::UnknownProvider {
                    provider: format!("{p} (cannot run images)"),
                    known: known(),
                });
            }
        } else if spec.image().is_some() && !self.providers.values().any(|p| p.config.runs_images) {
            return Err(EngineError::UnknownProvider {
                provider: "(any that runs images)".into(),
                known: known(),
            });
        }
        Ok(())
    }

    // ----- outputs --------------------------------------------------------

    /// The next effect to carry out.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// When [`Engine::handle_tick`] must be called next, if ever.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        // Plain loops: this runs after every input.
        let mut next = self.next_claim_at;
        let mut consider = |t: Option<Timestamp>| {
            if let Some(t) = t
                && next.is_none_or(|n| t < n)
            {
                next = Some(t);
            }
        };
        for job in self.jobs.values() {
            consider(job.status.deadline());
        }
        let mut watched = false;
        for e in self.workers.values() {
            consider(e.lost_at.map(|t| self.liveness_deadline(t)));
            consider(e.register_by);
            watched |= e.lost_at.is_some();
            if let Some(t) = self.heartbeat_deadline(e) {
                consider(Some(t));
                watched = true;
            }
        }
        if watched && let Some(last) = self.last_input {
            // The watchdog: a shell that honours its deadlines is never
            // silent long enough to look stalled.
            consider(Some(add(last, self.config.heartbeat_timeout / 2)));
        }
        next
    }

    /// When a connected worker's silence times it out, if it is watched.
    fn heartbeat_deadline(&self, e: &WorkerEntry) -> Option<Timestamp> {
        let w = &e.worker;
        (w.connected
            && matches!(
                w.state,
                WorkerState::Ready | WorkerState::Busy | WorkerState::Draining
            ))
        .then(|| self.liveness_deadline(add(w.last_seen, self.config.heartbeat_timeout)))
    }

    /// A liveness deadline (heartbeat timeout, loss) moved past the floor
    /// a stall of the shell set.
    fn liveness_deadline(&self, at: Timestamp) -> Timestamp {
        self.liveness_floor.map_or(at, |floor| at.max(floor))
    }

    /// Every input with a `now` starts here: a gap longer than the
    /// heartbeat timeout since the previous one means the shell was stalled
    /// and heard no worker meanwhile (see the module documentation).
    fn heard(&mut self, now: Timestamp) {
        if let Some(last) = self.last_input {
            if add(last, self.config.heartbeat_timeout) < now {
                let floor = add(now, self.config.heartbeat_timeout);
                self.liveness_floor = Some(self.liveness_floor.map_or(floor, |f| f.max(floor)));
            }
            if now <= last {
                return;
            }
        }
        self.last_input = Some(now);
        if self.liveness_floor.is_some_and(|f| f <= now) {
            self.liveness_floor = None;
        }
    }

    // ----- inputs: jobs -----------------------------------------------------

    /// A new submission. Returns the new job's id; the job is stored by
    /// [`Effect::CreateJob`] and enters the queue.
    pub fn handle_submit(
        &mut self,
        now: Timestamp,
        spec: JobSpec,
        ctx: &RequestContext,
    ) -> Result<JobId, EngineError> {
        self.heard(now);
        self.check_spec(&spec)?;
        let id = JobId::from_uuid(self.entropy.uuid());
        let (job, bodies) =
            Job::submit(id, spec, ctx.correlation_id.clone(), ctx.actor.clone(), now);
        let events = self.wrap(now, &ctx.correlation_id, &ctx.actor, bodies);
        self.effects.push_back(Effect::CreateJob { job, events });
        self.queue_hint = true;
        self.maybe_claim();
        self.arm_poll(now);
        Ok(id)
    }

    /// The queue may hold claimable jobs (another replica's submission,
    /// an event from the bus).
    pub fn handle_queue_hint(&mut self) {
        self.queue_hint = true;
        self.maybe_claim();
    }

    /// The number of jobs waiting in the shared queue (`JobQueue::depth`),
    /// read by the shell now and then. Reusable pools are sized by it (see
    /// [`Engine::handle_tick`]); `AutoScalingTriggered` events carry it.
    pub fn handle_queue_depth(&mut self, now: Timestamp, depth: u64) {
        self.heard(now);
        self.queue_depth = depth;
        self.autoscale(now);
    }

    /// The result of an [`Effect::Claim`]. Pass `None` if the claim failed.
    pub fn handle_claimed(&mut self, now: Timestamp, claim: Option<Claim>, limit: usize) {
        self.heard(now);
        self.claim_in_flight = false;
        let Some(claim) = claim else {
            self.next_claim_at = Some(add(now, self.config.claim_interval));
            return;
        };
        if claim.jobs.len() >= limit && limit > 0 {
            self.queue_hint = true;
        }
        if let Some(ready) = claim.next_ready_at {
            let at = ready.max(now);
            self.next_claim_at = Some(self.next_claim_at.map_or(at, |t| t.min(at)));
        }
        let mut released = false;
        for job in claim.jobs {
            if self.jobs.contains_key(&job.id) {
                continue;
            }
            if job.state() != JobState::Pending {
                // Not ours to place: give the claim back rather than let
                // it sit until its lease ends.
                self.effects.push_back(Effect::Release(job.id));
                continue;
            }
            released |= !self.place(now, job);
        }
        if released {
            // A job went back to the queue for want of room: claiming again
            // now would hand it straight back (and again, forever). Wait
            // for room to free up or for the next poll.
            self.queue_hint = false;
        }
        self.arm_poll(now);
        self.maybe_claim();
    }

    /// Cancels a job this engine owns. For a job it does not own, returns
    /// [`EngineError::UnknownJob`]: the shell cancels it in the store.
    pub fn handle_cancel(
        &mut self,
        now: Timestamp,
        job: JobId,
        ctx: &RequestContext,
    ) -> Result<Job, EngineError> {
        self.heard(now);
        if !self.jobs.contains_key(&job) {
            return Err(EngineError::UnknownJob(job));
        }
        let reason = format!("cancelled by {}", ctx.actor);
        self.apply(
            now,
            job,
            JobCommand::Cancel { reason },
            By::Request(ctx.correlation_id.clone(), ctx.actor.clone()),
        )?;
        Ok(self.finished_or_current(job))
    }

    /// A job this engine owns was changed by someone else (conflict on
    /// update, or seen on the event bus). The stored version wins.
    pub fn handle_job_changed(&mut self, now: Timestamp, current: Job) {
        self.heard(now);
        let Some(mine) = self.jobs.get(&current.id) else {
            return;
        };
        if current.version <= mine.version && !current.is_terminal() {
            return;
        }
        let mine = self
            .jobs
            .remove(&current.id)
            .expect("present: checked above");
        if let Some(worker) = mine.status.worker()
            && (current.status.worker() != Some(worker) || current.attempt != mine.attempt)
        {
            self.effects.push_back(Effect::CancelOnWorker {
                worker,
                job: mine.id,
                attempt: mine.attempt,
                reason: format!("job is now {} (decided elsewhere)", current.state()),
            });
            self.release_slot(now, worker, mine.id);
        }
        if !current.is_terminal()
            && current.state() != JobState::Pending
            && current
                .status
                .worker()
                .is_some_and(|w| self.workers.contains_key(&w))
        {
            self.jobs.insert(current.id, current);
        }
    }

    // ----- inputs: workers ----------------------------------------------------

    /// The provider created the worker; it will now connect. If its agent
    /// registered first, `WorkerProvisioned` was recorded then and this
    /// changes nothing: each worker gets the event exactly once.
    pub fn handle_provisioned(&mut self, now: Timestamp, worker: WorkerId) {
        self.heard(now);
        let Some(entry) = self.workers.get_mut(&worker) else {
            return;
        };
        if entry.worker.state != WorkerState::Creating {
            return;
        }
        let _ = entry.worker.transition(WorkerState::Connecting);
        let provider = entry.worker.provider.clone();
        let corr = entry.correlation_id.clone();
        let snapshot = entry.worker.clone();
        self.record(
            now,
            &corr,
            EventBody::WorkerProvisioned {
                worker_id: worker,
                provider,
            },
        );
        self.effects.push_back(Effect::SaveWorker(snapshot));
    }

    /// The provider could not create the worker.
    pub fn handle_provision_failed(&mut self, now: Timestamp, worker: WorkerId, reason: &str) {
        self.heard(now);
        let Some(entry) = self.workers.get(&worker) else {
            return;
        };
        let corr = entry.correlation_id.clone();
        let provider = entry.worker.provider.clone();
        self.record(
            now,
            &corr,
            EventBody::WorkerProvisioningFailed {
                worker_id: worker,
                provider,
                reason: reason.into(),
            },
        );
        let failure = Failure::new(
            FailureKind::ProvisioningFailed,
            format!("provisioning failed: {reason}"),
        );
        self.lose_worker(now, worker, reason, failure);
    }

    /// A worker registered (first time, or back after a disconnect).
    /// `adoptable` are stored jobs this engine may not own yet (after a
    /// restart or a replica's death): those it reports running, and those
    /// the store says it holds. Jobs still `ASSIGNED` or `RUNNING` on it
    /// are taken over: in the attempt it reports, they go on (an
    /// `ASSIGNED` one counts as acknowledged); not reported at all, they
    /// are decided as lost with it, like the jobs this engine gave it. A
    /// `SCHEDULED` job it was provisioned for is taken over and handed to
    /// it (it stays ephemeral, reserved for that job).
    pub fn handle_registered(
        &mut self,
        now: Timestamp,
        reg: Registration,
        adoptable: Vec<Job>,
    ) -> Result<(), EngineError> {
        self.heard(now);
        let id = reg.worker;
        // A SCHEDULED job waiting for this worker: it was provisioned for
        // it (ephemeral) by an engine that is gone.
        let mut reserved = None;
        for job in adoptable {
            let reported = reg.running.iter().find(|(j, _)| *j == job.id);
            let held_here = job.status.worker() == Some(id)
                && match job.state() {
                    JobState::Assigned | JobState::Running => {
                        reported.is_none_or(|(_, attempt)| *attempt == job.attempt)
                    }
                    JobState::Scheduled => reported.is_none(),
                    _ => false,
                };
            if held_here && !self.jobs.contains_key(&job.id) {
                if job.state() == JobState::Scheduled && !self.workers.contains_key(&id) {
                    reserved = Some(job.id);
                }
                self.jobs.insert(job.id, job);
            }
        }
        let reconnect = match self.workers.get(&id) {
            Some(e) if e.worker.state.is_terminal() => {
                return Err(EngineError::UnknownWorker(id));
            }
            Some(e) => !matches!(
                e.worker.state,
                WorkerState::Creating | WorkerState::Connecting
            ),
            None => false,
        };
        if !self.workers.contains_key(&id) {
            self.count_worker(&reg.provider, 1);
        }
        let entry = self.workers.get_or_insert_with(id, || WorkerEntry {
            actor: Actor::worker(id),
            worker: Worker {
                id,
                provider: reg.provider.clone(),
                state: WorkerState::Connecting,
                labels: BTreeMap::new(),
                image: None,
                capacity: 1,
                jobs: Vec::new(),
                ephemeral: reserved.is_some(),
                reserved_for: reserved,
                connected: false,
                last_seen: now,
                created_at: now,
            },
            correlation_id: CorrelationId::new(format!("worker-{id}")),
            lost_at: None,
            timed_out: false,
            register_by: None,
            saturated: false,
            indexed: Indexed::default(),
        });
        entry.worker.connected = true;
        entry.worker.last_seen = now;
        entry.lost_at = None;
        entry.timed_out = false;
        entry.register_by = None;
        // A new session re-syncs what it runs: its slots are as reported.
        entry.saturated = false;
        entry.worker.labels = reg.labels.clone();
        if reg.image.is_some() {
            entry.worker.image = reg.image.clone();
        }
        entry.worker.capacity = reg.capacity.max(1);
        let corr = entry.correlation_id.clone();
        let actor = Actor::worker(id);

        // Reconcile what the worker runs with what we believe it holds.
        // Only ASSIGNED and RUNNING attempts were handed to the worker: a
        // SCHEDULED job merely waits for it to register, and gets it below.
        let held: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| {
                j.status.worker() == Some(id)
                    && matches!(j.state(), JobState::Assigned | JobState::Running)
            })
            .map(|j| j.id)
            .collect();
        for (job, attempt) in &reg.running {
            if !self.holds(id, *job, *attempt) {
                self.effects.push_back(Effect::CancelOnWorker {
                    worker: id,
                    job: *job,
                    attempt: *attempt,
                    reason: "attempt was decided while the worker was away".into(),
                });
            }
        }
        // In the attempt we gave it: an agent also reports an earlier
        // attempt of the same job whose result it has not seen
        // acknowledged, which says nothing of the current one.
        let (kept, lost): (Vec<JobId>, Vec<JobId>) = held.into_iter().partition(|j| {
            reg.running
                .iter()
                .any(|(r, a)| r == j && *a == self.jobs[j].attempt)
        });
        let entry = self.workers.get_mut(&id).expect("inserted above");
        entry.worker.jobs = kept;

        // The worker runs an attempt we still see as ASSIGNED: its
        // acknowledgement was lost with a connection (or a server).
        let unacked: Vec<JobId> = entry
            .worker
            .jobs
            .iter()
            .copied()
            .filter(|j| {
                self.jobs
                    .get(j)
                    .is_some_and(|j| j.state() == JobState::Assigned)
            })
            .collect();
        let entry = self.workers.get_mut(&id).expect("inserted above");
        if reconnect {
            let running = entry.worker.jobs.clone();
            let draining = entry.worker.state == WorkerState::Draining;
            self.wrap_record(
                now,
                &corr,
                &actor,
                EventBody::WorkerReconnected {
                    worker_id: id,
                    running,
                },
            );
            if draining {
                // A drain request sent down the old stream may have been
                // lost with it; without it the agent would never leave and
                // its slot at the provider would stay taken forever.
                self.effects.push_back(Effect::DrainWorker(id));
            }
        } else {
            if entry.worker.state == WorkerState::Creating {
                // The agent registered before the provider's `create`
                // returned: it was created all the same. The later
                // `handle_provisioned` finds it past CREATING and records
                // nothing, so the event is recorded exactly once.
                let _ = entry.worker.transition(WorkerState::Connecting);
                let provider = entry.worker.provider.clone();
                self.record(
                    now,
                    &corr,
                    EventBody::WorkerProvisioned {
                        worker_id: id,
                        provider,
                    },
                );
            }
            let entry = self.workers.get_mut(&id).expect("inserted above");
            entry.worker.transition(WorkerState::Ready)?;
            let body = EventBody::WorkerRegistered {
                worker_id: id,
                provider: entry.worker.provider.clone(),
                labels: entry.worker.labels.clone(),
                capacity: entry.worker.capacity,
            };
            self.wrap_record(now, &corr, &actor, body);
            self.wrap_record(now, &corr, &actor, EventBody::WorkerReady { worker_id: id });
        }
        for job in unacked {
            let _ = self.apply(now, job, JobCommand::Start, By::Actor(actor.clone()));
        }
        for job in lost {
            // The worker came back without the attempt we gave it: the
            // dispatch or the process was lost with the connection.
            let Some(j) = self.jobs.get(&job) else {
                continue;
            };
            let kind = match j.state() {
                JobState::Assigned => FailureKind::DispatchFailed,
                _ => FailureKind::WorkerLost,
            };
            // The job's own flow, not the worker's: its events must be
            // found under the job's correlation id.
            let failure = Failure::new(kind, "the worker reconnected without this attempt");
            let _ = self.apply(
                now,
                job,
                JobCommand::Fail(failure),
                By::Actor(actor.clone()),
            );
        }
        self.refresh_worker_state(now, id);
        self.save_worker(id);
        self.offer_work(now, id);
        self.queue_hint = true;
        self.arm_poll(now);
        self.maybe_claim();
        Ok(())
    }

    /// A sign of life. A worker that refused work for capacity is offered
    /// work again (it says nothing more precise about its slots; if it is
    /// still full it refuses again, which costs no attempt). A worker the
    /// heartbeat timeout disconnected is revived (see the module
    /// documentation).
    pub fn handle_heartbeat(&mut self, now: Timestamp, worker: WorkerId) {
        self.heard(now);
        self.touch(now, worker);
        self.unsaturate(worker);
    }

    /// Records a sign of life: without index changes, unless it revives a
    /// worker the heartbeat timeout disconnected.
    fn touch(&mut self, now: Timestamp, worker: WorkerId) {
        if let Some(e) = self.workers.get_mut_unindexed(&worker) {
            e.worker.last_seen = e.worker.last_seen.max(now);
        }
        self.revive(now, worker);
    }

    /// A message on the session of a worker the heartbeat timeout
    /// disconnected: it was not heard for a while, but its session is up.
    /// The pending loss is cancelled and it is back as it was (`READY`,
    /// `BUSY` or `DRAINING`, with its jobs): `WorkerReconnected`.
    fn revive(&mut self, now: Timestamp, worker: WorkerId) {
        if !self
            .workers
            .get(&worker)
            .is_some_and(|e| e.timed_out && !e.worker.connected && !e.worker.state.is_terminal())
        {
            return;
        }
        let e = self.workers.get_mut(&worker).expect("checked above");
        e.worker.connected = true;
        e.worker.last_seen = e.worker.last_seen.max(now);
        e.timed_out = false;
        e.lost_at = None;
        let corr = e.correlation_id.clone();
        let actor = e.actor.clone();
        let running = e.worker.jobs.clone();
        self.wrap_record(
            now,
            &corr,
            &actor,
            EventBody::WorkerReconnected {
                worker_id: worker,
                running,
            },
        );
        self.save_worker(worker);
        self.offer_work(now, worker);
        self.queue_hint = true;
        self.maybe_claim();
    }

    /// The worker may have a free slot again: it takes work.
    fn unsaturate(&mut self, worker: WorkerId) {
        if !self.workers.get(&worker).is_some_and(|e| e.saturated) {
            return;
        }
        if let Some(e) = self.workers.get_mut(&worker) {
            e.saturated = false;
        }
        self.queue_hint = true;
        self.maybe_claim();
    }

    /// A batch of log lines arrived; counts as a sign of life. Returns
    /// whether the worker holds that attempt.
    pub fn handle_log_batch(
        &mut self,
        now: Timestamp,
        worker: WorkerId,
        job: JobId,
        attempt: u32,
    ) -> bool {
        self.heard(now);
        // Output says nothing about free slots: no unsaturate here.
        self.touch(now, worker);
        self.holds(worker, job, attempt)
    }

    /// A worker's stream dropped. It has `reconnect_grace` to come back,
    /// by registering again. (A worker the heartbeat timeout disconnected
    /// earlier keeps its deadline, but no longer comes back by a message:
    /// its session is over.)
    pub fn handle_disconnected(&mut self, now: Timestamp, worker: WorkerId, reason: &str) {
        self.heard(now);
        self.disconnect(now, worker, reason, true);
    }

    /// Disconnects a worker: its stream dropped (`stream_gone`), or the
    /// heartbeat timeout says it went silent.
    fn disconnect(&mut self, now: Timestamp, worker: WorkerId, reason: &str, stream_gone: bool) {
        let grace = self.config.reconnect_grace;
        let Some(e) = self.workers.get_mut(&worker) else {
            return;
        };
        if !e.worker.connected {
            if stream_gone {
                e.timed_out = false;
            }
            return;
        }
        e.worker.connected = false;
        e.timed_out = !stream_gone;
        let corr = e.correlation_id.clone();
        let done = matches!(
            e.worker.state,
            WorkerState::Terminating | WorkerState::Draining
        ) && e.worker.jobs.is_empty();
        self.record(
            now,
            &corr,
            EventBody::WorkerDisconnected {
                worker_id: worker,
                reason: reason.into(),
            },
        );
        if done {
            // Its work is done and the engine forgets it. The agent may not
            // have left though (a dropped stream, a hung agent whose
            // heartbeats stopped): have its provider make sure it is gone,
            // so that no worker outlives the engine's record of it.
            let provider = self.workers[&worker].worker.provider.clone();
            self.effects
                .push_back(Effect::DestroyWorker { provider, worker });
            self.terminate(now, worker, "worker left after draining");
        } else if let Some(e) = self.workers.get_mut(&worker) {
            e.lost_at = Some(add(now, grace));
            let snapshot = e.worker.clone();
            self.effects.push_back(Effect::SaveWorker(snapshot));
        }
    }

    /// The provider saw the worker end (process exit, container gone).
    /// Its jobs fail as [`FailureKind::WorkerLost`] (retried by policy).
    pub fn handle_worker_exited(&mut self, now: Timestamp, worker: WorkerId, reason: &str) {
        self.handle_worker_exit(now, worker, reason, false);
    }

    /// [`Engine::handle_worker_exited`], saying whether the worker was
    /// killed for exceeding its memory limit (a container's OOM kill): then
    /// its job fails as [`FailureKind::OomKilled`], like a job the agent
    /// saw OOM-killed. The limit is the job's, so it is the job's failure.
    /// A worker that was running several jobs (`worker_capacity` above 1)
    /// shares its limit between them and nobody can tell which one used
    /// the memory: they fail as lost (transient, retried by policy), with
    /// the OOM kill in the message.
    pub fn handle_worker_exit(
        &mut self,
        now: Timestamp,
        worker: WorkerId,
        reason: &str,
        oom_killed: bool,
    ) {
        self.heard(now);
        if !self.workers.contains_key(&worker) {
            return;
        }
        let running = self
            .jobs
            .values()
            .filter(|j| {
                j.status.worker() == Some(worker)
                    && matches!(j.state(), JobState::Assigned | JobState::Running)
            })
            .count();
        let failure = if oom_killed && running > 1 {
            Failure::new(
                FailureKind::WorkerLost,
                format!(
                    "worker killed for exceeding its memory limit (OOM) while running \
                     {running} jobs that share it: {reason}"
                ),
            )
        } else if oom_killed {
            Failure::new(
                FailureKind::OomKilled,
                format!("killed for exceeding its memory limit (OOM): {reason}"),
            )
        } else {
            Failure::new(FailureKind::WorkerLost, format!("worker lost: {reason}"))
        };
        self.lose_worker(now, worker, reason, failure);
    }

    /// The worker drains (asked by a user, or its own SIGTERM).
    pub fn handle_draining(
        &mut self,
        now: Timestamp,
        worker: WorkerId,
        ctx: Option<&RequestContext>,
    ) -> Result<(), EngineError> {
        self.heard(now);
        if ctx.is_none() {
            // The worker says so itself: a message on its session.
            self.revive(now, worker);
        }
        let e = self
            .workers
            .get_mut(&worker)
            .ok_or(EngineError::UnknownWorker(worker))?;
        if e.worker.state == WorkerState::Draining {
            return Ok(());
        }
        e.worker.transition(WorkerState::Draining)?;
        let (corr, actor) = match ctx {
            Some(c) => (c.correlation_id.clone(), c.actor.clone()),
            None => (e.correlation_id.clone(), Actor::worker(worker)),
        };
        let idle = e.worker.jobs.is_empty();
        self.wrap_record(
            now,
            &corr,
            &actor,
            EventBody::WorkerDraining { worker_id: worker },
        );
        if ctx.is_some() {
            self.effects.push_back(Effect::DrainWorker(worker));
        }
        if idle && ctx.is_none() {
            // The agent drains itself and leaves; nothing to wait for.
        }
        self.save_worker(worker);
        Ok(())
    }

    /// The worker acknowledged the attempt and started it.
    pub fn handle_ack(
        &mut self,
        now: Timestamp,
        worker: WorkerId,
        job: JobId,
        attempt: u32,
    ) -> Result<(), EngineError> {
        self.heard(now);
        self.revive(now, worker);
        self.check_holder(now, worker, job, attempt)?;
        let actor = self.worker_actor(worker);
        self.apply(now, job, JobCommand::Start, By::Actor(actor))
    }

    /// The worker refused the attempt; `reason` may carry a
    /// [`RefusalCode`] (see [`RefusalCode::tag`]), else the refusal is
    /// [`RefusalCode::Unspecified`]. See [`Engine::handle_refusal`].
    pub fn handle_refused(
        &mut self,
        now: Timestamp,
        worker: WorkerId,
        job: JobId,
        attempt: u32,
        reason: &str,
    ) -> Result<(), EngineError> {
        let (code, reason) = RefusalCode::untag(reason);
        self.handle_refusal(now, worker, job, attempt, code, reason)
    }

    /// The worker refused the attempt, saying why with `code`.
    ///
    /// [`RefusalCode::AtCapacity`] and [`RefusalCode::Draining`] give the
    /// attempt back: the job returns to the queue in the same attempt
    /// (`JobDispatchFailed`, `JobQueued`), and the worker gets no new work
    /// until it shows a free slot (at capacity) or at all (draining, as
    /// [`Engine::handle_draining`]). Any other refusal fails the attempt
    /// as [`FailureKind::DispatchFailed`].
    pub fn handle_refusal(
        &mut self,
        now: Timestamp,
        worker: WorkerId,
        job: JobId,
        attempt: u32,
        code: RefusalCode,
        reason: &str,
    ) -> Result<(), EngineError> {
        self.heard(now);
        self.revive(now, worker);
        self.check_holder(now, worker, job, attempt)?;
        let actor = self.worker_actor(worker);
        let assigned = self.jobs[&job].state() == JobState::Assigned;
        match code {
            RefusalCode::AtCapacity | RefusalCode::Draining if assigned => {
                let saturated = code == RefusalCode::AtCapacity;
                if saturated {
                    // Before the requeue frees the slot: the job must not
                    // be offered straight back to this worker.
                    if let Some(e) = self.workers.get_mut(&worker) {
                        e.saturated = true;
                    }
                } else if self.workers.get(&worker).is_some_and(|e| {
                    e.worker.state != WorkerState::Draining
                        && e.worker.state.can_transition_to(WorkerState::Draining)
                }) {
                    self.handle_draining(now, worker, None)?;
                }
                let command = JobCommand::Requeue {
                    reason: format!("worker refused ({}): {reason}", code.as_str()),
                };
                let r = self.apply(now, job, command, By::Actor(actor));
                if r.is_err()
                    && saturated
                    && let Some(e) = self.workers.get_mut(&worker)
                {
                    e.saturated = false;
                }
                r
            }
            RefusalCode::AtCapacity | RefusalCode::Draining | RefusalCode::Unspecified => {
                let failure = Failure::new(
                    FailureKind::DispatchFailed,
                    format!("worker refused: {reason}"),
                );
                self.apply(now, job, JobCommand::Fail(failure), By::Actor(actor))
            }
        }
    }

    /// The shell could not hand the attempt over (it could not read a
    /// secret, or record its delivery): the attempt fails with `failure`
    /// without having started (no `JobStarted`). A transient cause is
    /// [`FailureKind::DispatchFailed`] (retried by policy); a secret that
    /// does not exist is permanent.
    pub fn handle_dispatch_failed(
        &mut self,
        now: Timestamp,
        worker: WorkerId,
        job: JobId,
        attempt: u32,
        failure: Failure,
    ) -> Result<(), EngineError> {
        self.heard(now);
        self.check_holder(now, worker, job, attempt)?;
        let actor = Actor::system("dispatcher");
        self.apply(now, job, JobCommand::Fail(failure), By::Actor(actor))
    }

    /// The attempt ended on the worker.
    pub fn handle_result(
        &mut self,
        now: Timestamp,
        worker: WorkerId,
        job: JobId,
        attempt: u32,
        report: AttemptReport,
    ) -> Result<(), EngineError> {
        self.heard(now);
        self.revive(now, worker);
        // An attempt ended there, ours or not: a slot is free.
        self.unsaturate(worker);
        self.check_holder(now, worker, job, attempt)?;
        let actor = self.worker_actor(worker);
        if self.jobs[&job].state() == JobState::Assigned {
            // The result overtook the acknowledgement; the attempt did run.
            self.apply(now, job, JobCommand::Start, By::Actor(actor.clone()))?;
        }
        let command = match report.start_error {
            Some(reason) => JobCommand::Fail(Failure::new(
                FailureKind::StartFailed,
                format!("could not start: {reason}"),
            )),
            None => JobCommand::Exit {
                exit_code: report.exit_code,
                signal: report.signal,
                oom_killed: report.oom_killed,
                timed_out: report.timed_out,
            },
        };
        self.apply(now, job, command, By::Actor(actor))
    }

    /// A provider's health changed.
    pub fn handle_provider_health(
        &mut self,
        now: Timestamp,
        provider: &ProviderId,
        healthy: bool,
        message: &str,
    ) {
        self.heard(now);
        let Some(p) = self.providers.get_mut(provider) else {
            return;
        };
        if p.healthy == healthy {
            return;
        }
        p.healthy = healthy;
        let corr = CorrelationId::new(format!("provider-{provider}"));
        self.wrap_record(
            now,
            &corr,
            &Actor::system("health"),
            EventBody::ProviderHealthChanged {
                provider: provider.clone(),
                healthy,
                message: message.into(),
            },
        );
        if healthy {
            self.queue_hint = true;
            self.maybe_claim();
        }
    }

    /// Time passed: decide every deadline at or before `now`. A tick that
    /// ends a stall of the shell times no worker out and loses none (see
    /// "Liveness of workers" in the module documentation).
    pub fn handle_tick(&mut self, now: Timestamp) {
        self.heard(now);
        // Job deadlines.
        let overdue: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| j.status.deadline().is_some_and(|d| d <= now))
            .map(|j| j.id)
            .collect();
        for job in overdue {
            let _ = self.apply(
                now,
                job,
                JobCommand::Expire,
                By::Actor(Actor::system("deadline")),
            );
        }
        // Workers: registration, heartbeat and reconnect deadlines.
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            let Some(e) = self.workers.get(&id) else {
                continue;
            };
            if e.register_by.is_some_and(|t| t <= now) {
                let f = Failure::new(
                    FailureKind::ProvisioningFailed,
                    "the worker never registered",
                );
                self.lose_worker(now, id, "never registered", f);
            } else if e.lost_at.is_some_and(|t| self.liveness_deadline(t) <= now) {
                let f = Failure::new(
                    FailureKind::WorkerLost,
                    "worker disconnected and did not come back",
                );
                self.lose_worker(now, id, "did not reconnect in time", f);
            } else if self.heartbeat_deadline(e).is_some_and(|t| t <= now) {
                self.disconnect(now, id, "heartbeat timeout", false);
            }
        }
        if self.next_claim_at.is_some_and(|t| t <= now) {
            self.next_claim_at = None;
            self.queue_hint = true;
        }
        self.autoscale(now);
        if self.next_claim_at.is_none() {
            // Poll the shared queue now and then: other replicas'
            // submissions and ended backoffs surface this way.
            self.next_claim_at = Some(add(now, self.config.claim_interval));
        }
        self.maybe_claim();
    }

    // ----- internals ---------------------------------------------------------

    /// Places a claimed job: on a worker, with a provider, or fails it.
    /// Returns `false` if it went back to the queue for want of room.
    fn place(&mut self, now: Timestamp, job: Job) -> bool {
        let id = job.id;
        let worker = if self.config.selection == WorkerSelection::LeastLoaded {
            let fast = self.workers.least_loaded(id, &job.spec);
            debug_assert_eq!(
                fast,
                scheduler::select_worker(
                    WorkerSelection::LeastLoaded,
                    id,
                    &job.spec,
                    self.workers
                        .values()
                        .filter(|e| !e.saturated)
                        .map(|e| &e.worker),
                    &mut 0,
                ),
                "the load index disagrees with the scheduler"
            );
            fast
        } else {
            scheduler::select_worker(
                self.config.selection,
                id,
                &job.spec,
                self.workers
                    .values()
                    .filter(|e| !e.saturated)
                    .map(|e| &e.worker),
                &mut self.rr_cursor,
            )
        };
        self.jobs.insert(id, job);
        if let Some(worker) = worker {
            self.assign(now, id, worker);
            return true;
        }
        if self.share_starting_worker(now, id) {
            return true;
        }
        let snapshots: Vec<ProviderSnapshot> = self.provider_snapshots();
        let spec = &self.jobs[&id].spec;
        match scheduler::select_provider(spec, &snapshots, &self.config.provider_preference) {
            Ok(provider) => {
                let worker = WorkerId::from_uuid(self.entropy.uuid());
                let deadline = add(now, self.config.provision_timeout);
                let launch = LaunchRequest {
                    worker,
                    image: spec.image().map(str::to_owned),
                    resources: spec.resources(),
                    labels: spec.labels().clone(),
                    job: Some(id),
                    capacity: self.providers[&provider].config.capacity_per_worker(),
                };
                let image = launch.image.clone();
                let ephemeral = self.providers[&provider].config.ephemeral;
                let slots = StartingSlots {
                    provider: provider.clone(),
                    image: launch.image.clone(),
                    resources: launch.resources,
                    labels: launch.labels.clone(),
                    left: launch.capacity.saturating_sub(1),
                };
                if self
                    .apply(
                        now,
                        id,
                        JobCommand::Schedule {
                            provider: provider.clone(),
                            worker,
                            deadline,
                        },
                        By::Engine,
                    )
                    .is_ok()
                {
                    let corr = self.jobs[&id].correlation_id.clone();
                    self.start_worker(now, &provider, worker, image, Some(id), ephemeral, corr);
                    if slots.left > 0 {
                        self.starting.insert(worker, slots);
                    }
                    self.effects
                        .push_back(Effect::Provision { provider, launch });
                }
            }
            Err(NoProvider::Busy) => {
                self.jobs.remove(&id);
                self.effects.push_back(Effect::Release(id));
                let at = add(now, self.config.claim_interval);
                self.next_claim_at = Some(self.next_claim_at.map_or(at, |t| t.min(at)));
                return false;
            }
            Err(NoProvider::Unknown(name)) => {
                let f = Failure::new(
                    FailureKind::Validation,
                    format!("provider {name:?} is not configured"),
                );
                let _ = self.apply(now, id, JobCommand::Fail(f), By::Engine);
            }
            Err(NoProvider::CannotRunImages(p)) => {
                let f = Failure::new(
                    FailureKind::Validation,
                    format!("the job names an image but provider {p} cannot run images"),
                );
                let _ = self.apply(now, id, JobCommand::Fail(f), By::Engine);
            }
        }
        true
    }

    /// Schedules `job` on a multi-job worker that is still being started
    /// for jobs like it (same image, resources and labels; a provider the
    /// job accepts, healthy), instead of starting a worker per job: a burst
    /// of `n` jobs on a pool of `worker_capacity = c` starts `n / c`
    /// workers, rounded up. The worker takes all of them when it
    /// registers ([`Engine::offer_work`]). Returns `false` when there is
    /// no such worker.
    fn share_starting_worker(&mut self, now: Timestamp, job: JobId) -> bool {
        if self.starting.is_empty() {
            return false;
        }
        // Entries of workers no longer starting are dropped on the way.
        self.starting.retain(|w, _| {
            self.workers.get(w).is_some_and(|e| {
                matches!(
                    e.worker.state,
                    WorkerState::Creating | WorkerState::Connecting
                ) && !e.worker.connected
            })
        });
        let spec = &self.jobs[&job].spec;
        let found = self.starting.iter().find_map(|(w, slots)| {
            let fits = slots.left > 0
                && spec.provider().is_none_or(|p| *p == slots.provider)
                && self
                    .providers
                    .get(&slots.provider)
                    .is_some_and(|p| p.healthy)
                && spec.image() == slots.image.as_deref()
                && spec.resources() == slots.resources
                && *spec.labels() == slots.labels;
            fits.then(|| (*w, slots.provider.clone()))
        });
        let Some((worker, provider)) = found else {
            return false;
        };
        let deadline = add(now, self.config.provision_timeout);
        if self
            .apply(
                now,
                job,
                JobCommand::Schedule {
                    provider,
                    worker,
                    deadline,
                },
                By::Engine,
            )
            .is_err()
        {
            return false;
        }
        if let Some(slots) = self.starting.get_mut(&worker) {
            slots.left -= 1;
            if slots.left == 0 {
                self.starting.remove(&worker);
            }
        }
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn start_worker(
        &mut self,
        now: Timestamp,
        provider: &ProviderId,
        worker: WorkerId,
        image: Option<String>,
        job: Option<JobId>,
        ephemeral: bool,
        corr: CorrelationId,
    ) {
        let w = Worker {
            id: worker,
            provider: provider.clone(),
            state: WorkerState::Creating,
            labels: BTreeMap::new(),
            image,
            capacity: 1,
            jobs: Vec::new(),
            ephemeral,
            reserved_for: if ephemeral { job } else { None },
            connected: false,
            last_seen: now,
            created_at: now,
        };
        let replaced = self.workers.insert(
            worker,
            WorkerEntry {
                actor: Actor::worker(worker),
                worker: w.clone(),
                correlation_id: corr.clone(),
                lost_at: None,
                timed_out: false,
                register_by: Some(add(now, self.config.provision_timeout)),
                saturated: false,
                indexed: Indexed::default(),
            },
        );
        if let Some(old) = replaced {
            self.count_worker(&old.worker.provider, -1);
        }
        self.count_worker(provider, 1);
        self.record(
            now,
            &corr,
            EventBody::WorkerProvisioningRequested {
                worker_id: worker,
                provider: provider.clone(),
                job_id: job,
            },
        );
        self.effects.push_back(Effect::SaveWorker(w));
    }

    fn assign(&mut self, now: Timestamp, job: JobId, worker: WorkerId) {
        let deadline = add(now, self.config.dispatch_timeout);
        if self
            .apply(
                now,
                job,
                JobCommand::Assign { worker, deadline },
                By::Engine,
            )
            .is_err()
        {
            return;
        }
        if let Some(e) = self.workers.get_mut(&worker) {
            e.worker.jobs.push(job);
        }
        self.refresh_worker_state(now, worker);
        self.save_worker(worker);
        let snapshot = self.jobs[&job].clone();
        self.effects.push_back(Effect::Dispatch {
            worker,
            job: Box::new(snapshot),
        });
    }

    /// Applies a command to an owned job and emits its effects: the
    /// update, and what follows from the new state for its worker.
    fn apply(
        &mut self,
        now: Timestamp,
        id: JobId,
        command: JobCommand,
        by: By,
    ) -> Result<(), EngineError> {
        let unit = self.entropy.unit();
        // The worker gave the attempt back: it has nothing to stop.
        let given_back = matches!(command, JobCommand::Requeue { .. });
        let job = self.jobs.get_mut(&id).ok_or(EngineError::UnknownJob(id))?;
        let before_worker = job.status.worker();
        let before_attempt = job.attempt;
        let before_state = job.state();
        let expected_version = job.version;
        let ctx = TransitionContext {
            now,
            retry: &self.config.retry,
            unit_random: unit,
        };
        let bodies = job.apply(command, ctx)?;
        // Borrow the fields apart: the job's correlation id is used in
        // place, not copied once more.
        let entropy = &mut *self.entropy;
        let events = match &by {
            By::Engine => wrap(entropy, now, &job.correlation_id, &self.actor, bodies),
            By::Actor(actor) => wrap(entropy, now, &job.correlation_id, actor, bodies),
            By::Request(corr, actor) => wrap(entropy, now, corr, actor, bodies),
        };
        let after_state = job.state();
        let after_worker = job.status.worker();
        let not_before = match job.status {
            JobStatus::Pending { not_before } => not_before,
            _ => None,
        };
        // A job back in the queue or finished leaves the engine: move it
        // into the update rather than copy it.
        let leaves = after_state.is_terminal() || after_state == JobState::Pending;
        let snapshot = if leaves {
            self.jobs.remove(&id).expect("present: just applied")
        } else {
            job.clone()
        };
        self.push_update(snapshot, expected_version, events);
        // The attempt left its worker: stop it there and free the slot.
        if let Some(worker) = before_worker
            && after_worker != Some(worker)
        {
            let stop = matches!(before_state, JobState::Assigned | JobState::Running)
                && matches!(
                    after_state,
                    JobState::Cancelled | JobState::TimedOut | JobState::Pending | JobState::Failed
                );
            let reported = matches!(after_state, JobState::Succeeded)
                || (after_state == JobState::Failed && before_state == JobState::Running);
            if stop && !reported && !given_back {
                self.effects.push_back(Effect::CancelOnWorker {
                    worker,
                    job: id,
                    attempt: before_attempt,
                    reason: format!("job is now {after_state}"),
                });
            }
            self.release_slot(now, worker, id);
        }
        if after_state == JobState::Pending {
            // Back in the queue for its next attempt.
            self.queue_hint = true;
            if let Some(nb) = not_before {
                self.next_claim_at = Some(self.next_claim_at.map_or(nb, |t| t.min(nb)));
            }
        }
        Ok(())
    }

    /// Emits a job change. Two changes of one job decided back to back
    /// (a result that overtook its acknowledgement: start, then exit) go
    /// out as one update based on the first one's version. Emitted apart,
    /// the second would be based on a version the store never confirmed:
    /// if someone else committed that same version number in between (a
    /// cancel from another replica), the second update would pass the
    /// version check and overwrite their decision.
    fn push_update(&mut self, job: Job, expected_version: u64, events: Vec<DomainEvent>) {
        if let Some(Effect::UpdateJob {
            job: pending,
            events: pending_events,
            ..
        }) = self.effects.back_mut()
            && pending.id == job.id
            && pending.version == expected_version
        {
            *pending = job;
            pending_events.extend(events);
            return;
        }
        self.effects.push_back(Effect::UpdateJob {
            job,
            expected_version,
            events,
        });
    }

    fn finished_or_current(&self, job: JobId) -> Job {
        if let Some(j) = self.jobs.get(&job) {
            return j.clone();
        }
        self.effects
            .iter()
            .rev()
            .find_map(|e| match e {
                Effect::UpdateJob { job: j, .. } if j.id == job => Some(j.clone()),
                _ => None,
            })
            .expect("apply() pushed an UpdateJob for this job")
    }

    /// The worker no longer holds `job`: free its slot; an ephemeral
    /// worker is destroyed, a reusable one offered new work.
    fn release_slot(&mut self, now: Timestamp, worker: WorkerId, job: JobId) {
        let Some(e) = self.workers.get_mut(&worker) else {
            return;
        };
        e.worker.jobs.retain(|j| *j != job);
        if e.worker.reserved_for == Some(job) {
            e.worker.reserved_for = None;
            if e.worker.ephemeral && !e.worker.state.is_terminal() {
                self.retire(now, worker, "its job is done");
                return;
            }
        }
        if e.worker.state == WorkerState::Draining && e.worker.jobs.is_empty() {
            // It leaves on its own once idle; the disconnect ends it.
        }
        self.refresh_worker_state(now, worker);
        self.save_worker(worker);
        self.offer_work(now, worker);
        self.queue_hint = true;
        self.maybe_claim();
    }

    /// Ready ↔ Busy follows the jobs held.
    fn refresh_worker_state(&mut self, now: Timestamp, worker: WorkerId) {
        let Some(e) = self.workers.get_mut(&worker) else {
            return;
        };
        let target = match (e.worker.state, e.worker.jobs.is_empty()) {
            (WorkerState::Ready, false) => WorkerState::Busy,
            (WorkerState::Busy, true) => WorkerState::Ready,
            _ => return,
        };
        let _ = e.worker.transition(target);
        if target == WorkerState::Ready {
            let body = EventBody::WorkerReady { worker_id: worker };
            let events = wrap(
                &mut *self.entropy,
                now,
                &e.correlation_id,
                &self.actor,
                vec![body],
            );
            self.effects.push_back(Effect::Record(events));
        }
    }

    /// Hands a newly free worker a job already waiting for it here
    /// (a `SCHEDULED` job whose worker just registered).
    fn offer_work(&mut self, now: Timestamp, worker: WorkerId) {
        let Some(e) = self.workers.get(&worker) else {
            return;
        };
        if !e.worker.connected {
            return;
        }
        let waiting: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| matches!(j.status, JobStatus::Scheduled { worker: w, .. } if w == worker))
            .map(|j| j.id)
            .collect();
        for job in waiting {
            if self.workers[&worker].accepts(job) {
                self.assign(now, job, worker);
            }
        }
    }

    /// An ephemeral worker is done: terminate it.
    fn retire(&mut self, now: Timestamp, worker: WorkerId, reason: &str) {
        let Some(e) = self.workers.get_mut(&worker) else {
            return;
        };
        let _ = e.worker.transition(WorkerState::Terminating);
        let provider = e.worker.provider.clone();
        self.effects
            .push_back(Effect::DestroyWorker { provider, worker });
        self.terminate(now, worker, reason);
    }

    /// The worker is gone: fail what it held (transient, retried by
    /// policy) and forget it.
    fn lose_worker(&mut self, now: Timestamp, worker: WorkerId, reason: &str, failure: Failure) {
        let held: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| j.status.worker() == Some(worker))
            .map(|j| j.id)
            .collect();
        let Some(e) = self.workers.get_mut(&worker) else {
            return;
        };
        let provider = e.worker.provider.clone();
        // Detach first so that release_slot does not retire it twice.
        e.worker.reserved_for = None;
        e.worker.ephemeral = false;
        let _ = e.worker.transition(WorkerState::Terminating);
        for job in held {
            let _ = self.apply(
                now,
                job,
                JobCommand::Fail(failure.clone()),
                By::Actor(Actor::system("monitor")),
            );
        }
        self.effects
            .push_back(Effect::DestroyWorker { provider, worker });
        self.terminate(now, worker, reason);
    }

    fn terminate(&mut self, now: Timestamp, worker: WorkerId, reason: &str) {
        let Some(mut e) = self.workers.remove(&worker) else {
            return;
        };
        self.count_worker(&e.worker.provider, -1);
        if e.worker.state.is_terminal() {
            return;
        }
        let _ = e.worker.transition(WorkerState::Terminated);
        e.worker.connected = false;
        e.worker.jobs.clear();
        self.record(
            now,
            &e.correlation_id,
            EventBody::WorkerTerminated {
                worker_id: worker,
                reason: reason.into(),
            },
        );
        self.effects.push_back(Effect::SaveWorker(e.worker));
        // Its provider has room again: jobs waiting for it can be claimed.
        self.queue_hint = true;
        self.maybe_claim();
    }

    /// Arms the periodic queue poll if nothing else has. Until the first
    /// claim or tick nothing else would: a job submitted while every
    /// provider was full would wait for an input that may never come.
    fn arm_poll(&mut self, now: Timestamp) {
        if self.next_claim_at.is_none() {
            self.next_claim_at = Some(add(now, self.config.claim_interval));
        }
    }

    fn check_holder(
        &mut self,
        _now: Timestamp,
        worker: WorkerId,
        job: JobId,
        attempt: u32,
    ) -> Result<(), EngineError> {
        if self.holds(worker, job, attempt) {
            return Ok(());
        }
        if self.workers.contains_key(&worker) {
            // A stale report: make sure the worker stops that attempt.
            self.effects.push_back(Effect::CancelOnWorker {
                worker,
                job,
                attempt,
                reason: "this attempt is not assigned to this worker".into(),
            });
        }
        Err(EngineError::NotAssigned {
            worker,
            job,
            attempt,
        })
    }

    fn maybe_claim(&mut self) {
        if self.claim_in_flight || !self.queue_hint {
            return;
        }
        let capacity = self.capacity();
        if capacity == 0 {
            return;
        }
        let limit = capacity.min(self.config.max_claim);
        self.queue_hint = false;
        self.claim_in_flight = true;
        self.effects.push_back(Effect::Claim {
            limit,
            lease: self.config.claim_lease,
        });
    }

    /// Jobs this engine could start now: free worker slots plus room at
    /// healthy providers.
    fn capacity(&mut self) -> usize {
        let slots = self.workers.free_slots();
        // A new worker takes `capacity_per_worker` jobs (the first starts
        // it, the others wait for it), and so do the ones still starting.
        let room: usize = self
            .providers
            .values()
            .filter(|p| p.healthy)
            .map(|p| {
                p.config.max_workers.saturating_sub(p.live) as usize
                    * p.config.capacity_per_worker() as usize
            })
            .sum();
        let starting: usize = self.starting.values().map(|s| s.left as usize).sum();
        slots + room + starting
    }

    fn provider_snapshots(&self) -> Vec<ProviderSnapshot> {
        self.providers
            .values()
            .map(|p| {
                debug_assert_eq!(
                    p.live as usize,
                    self.workers
                        .values()
                        .filter(|e| e.worker.provider == p.config.id)
                        .count(),
                    "live worker count of {}",
                    p.config.id
                );
                ProviderSnapshot {
                    id: p.config.id.clone(),
                    healthy: p.healthy,
                    workers: p.live,
                    max_workers: p.config.max_workers,
                    runs_images: p.config.runs_images,
                }
            })
            .collect()
    }

    /// A worker of `provider` joined (`+1`) or left (`-1`) `self.workers`.
    fn count_worker(&mut self, provider: &ProviderId, delta: i32) {
        if let Some(p) = self.providers.get_mut(provider) {
            p.live = p.live.saturating_add_signed(delta);
        }
    }

    /// Sizes the pools of reusable workers, between `min_workers` and
    /// `max_workers`: a provider wants its busy workers, plus what the jobs
    /// waiting in the queue need beyond the free slots of its busy workers,
    /// one worker per `worker_capacity` jobs (reusable, non-ephemeral
    /// providers only), plus its warm pool of idle workers, at least
    /// `min_workers` and never more than `max_workers`.
    /// Below that it provisions the difference; above it, it retires idle
    /// workers that have been idle for [`SCALE_DOWN_IDLE`]. Each decision
    /// is an `AutoScalingTriggered` event.
    fn autoscale(&mut self, now: Timestamp) {
        let providers: Vec<(ProviderConfig, u32)> = self
            .providers
            .values()
            .filter(|p| {
                p.healthy
                    && (p.config.warm_pool > 0 || p.config.min_workers > 0 || !p.config.ephemeral)
            })
            .map(|p| (p.config.clone(), p.live))
            .collect();
        if providers.is_empty() {
            return;
        }
        // A worker a SCHEDULED job waits for is spoken for.
        let awaited: BTreeSet<WorkerId> = self
            .jobs
            .values()
            .filter_map(|j| match j.status {
                JobStatus::Scheduled { worker, .. } => Some(worker),
                _ => None,
            })
            .collect();
        let mut idle_since = BTreeMap::new();
        for (p, live) in providers {
            // Idle: reusable, holding nothing, awaited by no job.
            let mut idle = 0u32;
            let mut retirable: Vec<WorkerId> = Vec::new();
            for e in self.workers.values() {
                let w = &e.worker;
                if w.provider != p.id
                    || w.ephemeral
                    || !w.jobs.is_empty()
                    || w.reserved_for.is_some()
                    || awaited.contains(&w.id)
                {
                    continue;
                }
                match w.state {
                    WorkerState::Creating | WorkerState::Connecting => idle += 1,
                    WorkerState::Ready if w.connected => {
                        idle += 1;
                        let since = *self.idle_since.get(&w.id).unwrap_or(&now);
                        idle_since.insert(w.id, since);
                        if add(since, SCALE_DOWN_IDLE) <= now {
                            retirable.push(w.id);
                        }
                    }
                    _ => {}
                }
            }
            let busy = live.saturating_sub(idle);
            let demand = if p.ephemeral {
                0
            } else {
                // Queued jobs first fill the free slots of workers already
                // running something; the rest need workers of
                // `worker_capacity` slots each.
                let spare: u64 = self
                    .workers
                    .values()
                    .filter(|e| {
                        let w = &e.worker;
                        w.provider == p.id && !w.ephemeral && !w.jobs.is_empty() && e.takes_work()
                    })
                    .map(|e| u64::from(e.worker.free_slots()))
                    .sum();
                let waiting = self.queue_depth.saturating_sub(spare);
                u32::try_from(waiting.div_ceil(u64::from(p.capacity_per_worker())))
                    .unwrap_or(u32::MAX)
            };
            let target = busy
                .saturating_add(demand)
                .saturating_add(p.warm_pool)
                .max(p.min_workers)
                .min(p.max_workers);
            let corr = CorrelationId::new(format!("autoscale-{}", p.id));
            if target > live {
                let add_n = target - live;
                self.autoscaling_event(now, &corr, &p.id, live, target);
                for _ in 0..add_n {
                    let worker = WorkerId::from_uuid(self.entropy.uuid());
                    self.start_worker(
                        now,
                        &p.id,
                        worker,
                        p.default_image.clone(),
                        None,
                        false,
                        corr.clone(),
                    );
                    self.effects.push_back(Effect::Provision {
                        provider: p.id.clone(),
                        launch: LaunchRequest {
                            worker,
                            image: p.default_image.clone(),
                            resources: Resources::default(),
                            labels: BTreeMap::new(),
                            job: None,
                            capacity: p.capacity_per_worker(),
                        },
                    });
                }
            } else if target < live && !retirable.is_empty() {
                let remove = ((live - target) as usize).min(retirable.len());
                let target = live - remove as u32;
                self.autoscaling_event(now, &corr, &p.id, live, target);
                for worker in retirable.into_iter().take(remove) {
                    idle_since.remove(&worker);
                    self.retire(now, worker, "scaled down: idle with no work waiting");
                }
            }
        }
        self.idle_since = idle_since;
    }

    fn autoscaling_event(
        &mut self,
        now: Timestamp,
        corr: &CorrelationId,
        provider: &ProviderId,
        current: u32,
        target: u32,
    ) {
        self.wrap_record(
            now,
            corr,
            &Actor::system("autoscaler"),
            EventBody::AutoScalingTriggered {
                provider: provider.clone(),
                queue_depth: self.queue_depth,
                current,
                target,
            },
        );
    }

    fn save_worker(&mut self, worker: WorkerId) {
        if let Some(e) = self.workers.get(&worker) {
            self.effects.push_back(Effect::SaveWorker(e.worker.clone()));
        }
    }

    fn record(&mut self, now: Timestamp, corr: &CorrelationId, body: EventBody) {
        let actor = self.actor.clone();
        self.wrap_record(now, corr, &actor, body);
    }

    fn wrap_record(
        &mut self,
        now: Timestamp,
        corr: &CorrelationId,
        actor: &Actor,
        body: EventBody,
    ) {
        let events = self.wrap(now, corr, actor, vec![body]);
        self.effects.push_back(Effect::Record(events));
    }

    fn wrap(
        &mut self,
        now: Timestamp,
        corr: &CorrelationId,
        actor: &Actor,
        bodies: Vec<EventBody>,
    ) -> Vec<DomainEvent> {
        wrap(&mut *self.entropy, now, corr, actor, bodies)
    }

    /// The actor of a worker's reports, `worker:<id>`.
    fn worker_actor(&self, worker: WorkerId) -> Actor {
        self.workers
            .get(&worker)
            .map_or_else(|| Actor::worker(worker), |e| e.actor.clone())
    }
}

/// Wraps bodies in their envelopes (what [`DomainEvent::new`] does, minus
/// the formatting machinery for the aggregate id: this is the hot path).
fn wrap(
    entropy: &mut dyn Entropy,
    now: Timestamp,
    corr: &CorrelationId,
    actor: &Actor,
    bodies: Vec<EventBody>,
) -> Vec<DomainEvent> {
    bodies
        .into_iter()
        .map(|body| {
            let (aggregate_type, aggregate_id) = aggregate(&body);
            DomainEvent {
                event_id: EventId::from_uuid(entropy.uuid()),
                sequence: 0,
                occurred_at: now,
                aggregate_type,
                aggregate_id,
                correlation_id: corr.clone(),
                actor: actor.clone(),
                body,
            }
        })
        .collect()
}

/// [`EventBody::aggregate`], with job and worker ids encoded directly.
fn aggregate(body: &EventBody) -> (AggregateKind, String) {
    let fast = match body {
        EventBody::JobCreated { job_id, .. }
        | EventBody::JobQueued { job_id, .. }
        | EventBody::JobScheduled { job_id, .. }
        | EventBody::JobAssigned { job_id, .. }
        | EventBody::JobStarted { job_id, .. }
        | EventBody::JobSucceeded { job_id, .. }
        | EventBody::JobFailed { job_id, .. }
        | EventBody::JobCancelled { job_id, .. }
        | EventBody::JobTimedOut { job_id, .. }
        | EventBody::JobRetryScheduled { job_id, .. }
        | EventBody::JobRetryExhausted { job_id, .. }
        | EventBody::JobDispatchFailed { job_id, .. } => {
            (AggregateKind::Job, uuid_string(job_id.as_uuid()))
        }
        EventBody::WorkerProvisioningRequested { worker_id, .. }
        | EventBody::WorkerProvisioned { worker_id, .. }
        | EventBody::WorkerProvisioningFailed { worker_id, .. }
        | EventBody::WorkerRegistered { worker_id, .. }
        | EventBody::WorkerReady { worker_id }
        | EventBody::WorkerDisconnected { worker_id, .. }
        | EventBody::WorkerReconnected { worker_id, .. }
        | EventBody::WorkerDraining { worker_id }
        | EventBody::WorkerTerminated { worker_id, .. } => {
            (AggregateKind::Worker, uuid_string(worker_id.as_uuid()))
        }
        other => return other.aggregate(),
    };
    debug_assert_eq!(fast, body.aggregate());
    fast
}

/// The hyphenated lowercase form, as `Display` writes it.
fn uuid_string(uuid: &Uuid) -> String {
    let mut buf = Uuid::encode_buffer();
    uuid.hyphenated().encode_lower(&mut buf).to_owned()
}
