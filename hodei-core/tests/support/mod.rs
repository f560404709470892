//! Test support shared by the engine simulation, the regression scenarios
//! and the `engine_ops` fuzz target (which includes this file by path):
//! a fake store playing the shell's storage role, and the invariants the
//! engine and the store must keep after every step.
//!
//! Nothing here is clever on purpose: the store is a map, a queue and an
//! event log, and every rule it enforces is a rule DESIGN.md states.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hodei_core::engine::Engine;
use hodei_core::event::{AggregateKind, DomainEvent, EventBody};
use hodei_core::ids::{Actor, CorrelationId, EventId, JobId, WorkerId};
use hodei_core::job::{Job, JobCommand, JobState, TransitionContext};
use hodei_core::ports::{Claim, RequestContext};
use hodei_core::retry::RetryPolicy;
use hodei_core::spec::{JobSpec, RawJobSpec, SpecLimits};
use hodei_core::time::{Timestamp, add};
use hodei_core::worker::Worker;

/// A small, fast, deterministic random source (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        debug_assert!(lo <= hi);
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A duration in `lo_ms..=hi_ms` milliseconds.
    pub fn millis(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(self.range(lo_ms, hi_ms))
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[(self.next_u64() % items.len() as u64) as usize])
        }
    }
}

/// A spec with a command and the given knobs.
pub fn spec(
    max_attempts: u32,
    timeout_secs: u64,
    retry_on_failure: bool,
    priority: i32,
    provider: Option<&str>,
    image: Option<&str>,
) -> JobSpec {
    JobSpec::parse(
        RawJobSpec {
            command: Some(vec!["sh".into(), "-c".into(), "true".into()]),
            max_attempts: Some(max_attempts),
            timeout_secs: Some(timeout_secs),
            retry_on_failure: Some(retry_on_failure),
            priority: Some(priority),
            provider: provider.map(str::to_owned),
            image: image.map(str::to_owned),
            ..Default::default()
        },
        &SpecLimits::default(),
    )
    .expect("test specs are valid")
}

pub fn ctx(correlation: &str, actor: &str) -> RequestContext {
    RequestContext {
        correlation_id: CorrelationId::new(correlation),
        actor: Actor::new(actor),
    }
}

/// Outcome of [`FakeStore::update`] that is not a broken rule.
#[derive(Debug)]
pub enum Update {
    /// Stored.
    Stored,
    /// Someone else changed the job: the stored version wins.
    Conflict(Box<Job>),
}

#[derive(Debug, Clone)]
struct QueueEntry {
    priority: i32,
    seq: u64,
    not_before: Option<Timestamp>,
}

/// The shell's storage: jobs with optimistic versions, the queue of
/// pending jobs (priority first, FIFO within a priority, `not_before`
/// honoured, each claim exclusive) and the event log. Every write is
/// checked against the rules of DESIGN.md; a broken rule is an `Err`.
#[derive(Debug, Default)]
pub struct FakeStore {
    pub jobs: BTreeMap<JobId, Job>,
    queue: BTreeMap<JobId, QueueEntry>,
    /// Claimed and still `PENDING`: end of the lease, place in the queue.
    claimed: BTreeMap<JobId, (Timestamp, QueueEntry)>,
    pub events: Vec<DomainEvent>,
    pub workers: BTreeMap<WorkerId, Worker>,
    enqueued: u64,
    minted: u64,
}

impl FakeStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.get(&id)
    }

    pub fn is_queued(&self, id: JobId) -> bool {
        self.queue.contains_key(&id)
    }

    pub fn claimed(&self) -> impl Iterator<Item = &JobId> {
        self.claimed.keys()
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// `CreateJob`: a new job in `PENDING`, version 1, with `JobCreated`
    /// then `JobQueued`.
    pub fn create(&mut self, job: Job, events: Vec<DomainEvent>) -> Result<(), String> {
        if self.jobs.contains_key(&job.id) {
            return Err(format!("job {} created twice", job.id));
        }
        if job.state() != JobState::Pending || job.version != 1 || job.attempt != 1 {
            return Err(format!(
                "new job {} is not PENDING v1 attempt 1: {job:?}",
                job.id
            ));
        }
        let types: Vec<&str> = events.iter().map(DomainEvent::event_type).collect();
        if types != ["JobCreated", "JobQueued"] {
            return Err(format!("job {} created with events {types:?}", job.id));
        }
        self.check_job_events(&job, &events)?;
        self.enqueue(&job);
        self.append(events);
        self.jobs.insert(job.id, job);
        Ok(())
    }

    /// `UpdateJob`: conditional on the version; checks the change and its
    /// events.
    pub fn update(
        &mut self,
        job: Job,
        expected_version: u64,
        events: Vec<DomainEvent>,
    ) -> Result<Update, String> {
        let Some(stored) = self.jobs.get(&job.id) else {
            return Err(format!("update of unknown job {}", job.id));
        };
        if stored.version != expected_version {
            return Ok(Update::Conflict(Box::new(stored.clone())));
        }
        if stored.is_terminal() {
            return Err(format!(
                "job {} changed after reaching {} (terminal stays terminal)",
                job.id,
                stored.state()
            ));
        }
        // Several transitions decided together may be committed as one.
        if job.version <= expected_version || job.version > expected_version + 2 {
            return Err(format!(
                "job {} version {} after an update based on {expected_version}",
                job.id, job.version
            ));
        }
        if job.spec != stored.spec
            || job.created_at != stored.created_at
            || job.correlation_id != stored.correlation_id
            || job.submitted_by != stored.submitted_by
        {
            return Err(format!("job {} identity fields changed", job.id));
        }
        if job.attempt < stored.attempt || job.attempts.len() < stored.attempts.len() {
            return Err(format!("job {} lost attempt history", job.id));
        }
        if job.attempts[..stored.attempts.len()] != stored.attempts[..] {
            return Err(format!("job {} rewrote attempt history", job.id));
        }
        check_attempts(&job)?;
        if events.is_empty() {
            return Err(format!(
                "job {} changed {} -> {} without events",
                job.id,
                stored.state(),
                job.state()
            ));
        }
        self.check_job_events(&job, &events)?;
        let derived = derive_state(stored.state(), &events);
        if derived != job.state() {
            return Err(format!(
                "job {} is {} but its events {:?} say {derived}",
                job.id,
                job.state(),
                events
                    .iter()
                    .map(DomainEvent::event_type)
                    .collect::<Vec<_>>()
            ));
        }
        self.queue.remove(&job.id);
        self.claimed.remove(&job.id);
        if job.state() == JobState::Pending {
            self.enqueue(&job);
        }
        self.append(events);
        self.jobs.insert(job.id, job);
        Ok(Update::Stored)
    }

    /// `Record`: events that go with no job change.
    pub fn record(&mut self, events: Vec<DomainEvent>) -> Result<(), String> {
        for e in &events {
            check_envelope(e)?;
            if matches!(e.aggregate_type, AggregateKind::Job) {
                return Err(format!(
                    "job event {} recorded without a job change",
                    e.event_type()
                ));
            }
        }
        self.append(events);
        Ok(())
    }

    /// `Claim`: up to `limit` ready jobs, priority first, FIFO within a
    /// priority; `next_ready_at` is the earliest future `not_before`.
    pub fn claim(&mut self, now: Timestamp, limit: usize, lease: Duration) -> Claim {
        // Expired leases go back to the queue.
        let expired: Vec<JobId> = self
            .claimed
            .iter()
            .filter(|(_, (until, _))| *until <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let (_, entry) = self.claimed.remove(&id).expect("listed above");
            self.queue.insert(id, entry);
        }
        let mut ready: Vec<(i32, u64, JobId)> = self
            .queue
            .iter()
            .filter(|(_, e)| e.not_before.is_none_or(|t| t <= now))
            .map(|(id, e)| (-e.priority, e.seq, *id))
            .collect();
        ready.sort_unstable();
        let mut jobs = Vec::new();
        for (_, _, id) in ready.into_iter().take(limit) {
            let entry = self.queue.remove(&id).expect("listed above");
            self.claimed.insert(id, (add(now, lease), entry));
            jobs.push(self.jobs[&id].clone());
        }
        let next_ready_at = self
            .queue
            .values()
            .filter_map(|e| e.not_before)
            .filter(|t| *t > now)
            .min();
        Claim {
            jobs,
            next_ready_at,
        }
    }

    /// `Release`: a claimed job goes back, keeping its place.
    pub fn release(&mut self, id: JobId) -> Result<(), String> {
        let Some((_, entry)) = self.claimed.remove(&id) else {
            return Err(format!("release of job {id}, which was not claimed"));
        };
        let state = self.jobs[&id].state();
        if state != JobState::Pending {
            return Err(format!("released job {id} is {state}"));
        }
        self.queue.insert(id, entry);
        Ok(())
    }

    /// What the shell does with a cancel for a job no engine owns: apply
    /// it to the stored job, conditionally, with the request's context.
    pub fn cancel_here(
        &mut self,
        now: Timestamp,
        id: JobId,
        ctx: &RequestContext,
    ) -> Result<Option<Job>, String> {
        let Some(stored) = self.jobs.get(&id) else {
            return Ok(None);
        };
        let mut job = stored.clone();
        let expected = job.version;
        let policy = RetryPolicy::default();
        let reason = format!("cancelled by {}", ctx.actor);
        let Ok(bodies) = job.apply(
            JobCommand::Cancel { reason },
            TransitionContext {
                now,
                retry: &policy,
                unit_random: 0.5,
            },
        ) else {
            return Ok(None);
        };
        let events = bodies
            .into_iter()
            .map(|b| {
                self.minted += 1;
                DomainEvent::new(
                    EventId::from_u64_pair(u64::MAX, self.minted),
                    now,
                    ctx.correlation_id.clone(),
                    ctx.actor.clone(),
                    b,
                )
            })
            .collect();
        match self.update(job.clone(), expected, events)? {
            Update::Stored => Ok(Some(job)),
            Update::Conflict(_) => Err("conflict on a read-modify-write in one step".into()),
        }
    }

    pub fn save_worker(&mut self, worker: Worker) {
        self.workers.insert(worker.id, worker);
    }

    /// The events of one job, in order.
    pub fn job_events(&self, id: JobId) -> impl Iterator<Item = &DomainEvent> {
        self.events.iter().filter(move |e| e.job_id() == Some(id))
    }

    fn enqueue(&mut self, job: &Job) {
        self.enqueued += 1;
        let not_before = match job.status {
            hodei_core::job::JobStatus::Pending { not_before } => not_before,
            _ => None,
        };
        self.queue.insert(
            job.id,
            QueueEntry {
                priority: job.spec.priority(),
                seq: self.enqueued,
                not_before,
            },
        );
    }

    fn append(&mut self, events: Vec<DomainEvent>) {
        let mut seq = self.events.last().map_or(0, |e| e.sequence);
        for mut e in events {
            seq += 1;
            e.sequence = seq;
            self.events.push(e);
        }
    }

    fn check_job_events(&self, job: &Job, events: &[DomainEvent]) -> Result<(), String> {
        for e in events {
            check_envelope(e)?;
            if e.job_id() != Some(job.id) || !matches!(e.aggregate_type, AggregateKind::Job) {
                return Err(format!(
                    "event {} of job {} names {:?}",
                    e.event_type(),
                    job.id,
                    e.job_id()
                ));
            }
            // A job's flow keeps the job's correlation id; a cancel carries
            // the cancelling request's.
            let own_flow = !matches!(e.body, EventBody::JobCancelled { .. });
            if own_flow && e.correlation_id != job.correlation_id {
                return Err(format!(
                    "event {} of job {} carries correlation {} instead of the job's {}",
                    e.event_type(),
                    job.id,
                    e.correlation_id,
                    job.correlation_id
                ));
            }
        }
        Ok(())
    }
}

fn check_envelope(e: &DomainEvent) -> Result<(), String> {
    if e.correlation_id.as_str().is_empty() {
        return Err(format!(
            "event {} has an empty correlation id",
            e.event_type()
        ));
    }
    if e.actor.as_str().is_empty() {
        return Err(format!("event {} has an empty actor", e.event_type()));
    }
    Ok(())
}

/// The state a job's events say it is in, starting from `from`.
pub fn derive_state(from: JobState, events: &[DomainEvent]) -> JobState {
    events.iter().fold(from, |state, e| match e.body {
        EventBody::JobCreated { .. } | EventBody::JobQueued { .. } => JobState::Pending,
        EventBody::JobScheduled { .. } => JobState::Scheduled,
        EventBody::JobAssigned { .. } => JobState::Assigned,
        EventBody::JobStarted { .. } => JobState::Running,
        EventBody::JobSucceeded { .. } => JobState::Succeeded,
        EventBody::JobFailed { .. } => JobState::Failed,
        EventBody::JobCancelled { .. } => JobState::Cancelled,
        EventBody::JobTimedOut { .. } => JobState::TimedOut,
        _ => state,
    })
}

/// `attempt` within `1..=max_attempts`; the history holds every finished
/// attempt, numbered from 1.
pub fn check_attempts(job: &Job) -> Result<(), String> {
    if job.attempt == 0 || job.attempt > job.spec.max_attempts() {
        return Err(format!(
            "job {} at attempt {} of {}",
            job.id,
            job.attempt,
            job.spec.max_attempts()
        ));
    }
    let finished = job.attempts.len() as u32;
    let ok = if job.is_terminal() {
        finished == job.attempt
            || (job.state() == JobState::Cancelled && finished + 1 == job.attempt)
    } else {
        finished + 1 == job.attempt
    };
    if !ok {
        return Err(format!(
            "job {} {} at attempt {} with {finished} finished attempts",
            job.id,
            job.state(),
            job.attempt
        ));
    }
    for (i, a) in job.attempts.iter().enumerate() {
        if a.number != i as u32 + 1 {
            return Err(format!("job {} attempt history out of order", job.id));
        }
    }
    Ok(())
}

/// The invariants that hold between every two steps of the shell.
///
/// - no job lost: each submitted job is terminal in the store, or pending
///   in the store's queue and owned by nobody, or owned by the engine in
///   the same intermediate state and version as stored, on a worker the
///   engine knows (`stale` lists jobs changed behind the engine's back
///   whose news has not reached it yet: only the store side is checked);
/// - no claim left undecided;
/// - no intermediate job past its deadline (`now` has been ticked);
/// - each job held by at most one worker, within its capacity;
/// - attempts within `max_attempts`, history consistent.
pub fn check_invariants(
    engine: &Engine,
    store: &FakeStore,
    submitted: &[JobId],
    stale: &BTreeSet<JobId>,
    now: Timestamp,
) -> Result<(), String> {
    if let Some(id) = store.claimed.keys().next() {
        return Err(format!("job {id} claimed but neither placed nor released"));
    }
    for id in submitted {
        let Some(stored) = store.jobs.get(id) else {
            return Err(format!("submitted job {id} is not in the store"));
        };
        check_attempts(stored)?;
        if stale.contains(id) {
            continue;
        }
        let owned = engine.job(*id);
        match stored.state() {
            s if s.is_terminal() => {
                if owned.is_some() {
                    return Err(format!("job {id} is {s} but the engine still owns it"));
                }
            }
            JobState::Pending => {
                if !store.queue.contains_key(id) {
                    return Err(format!("job {id} is PENDING but not in the queue"));
                }
                if owned.is_some() {
                    return Err(format!(
                        "job {id} is PENDING in the queue and owned by the engine"
                    ));
                }
            }
            s => {
                let Some(mine) = owned else {
                    return Err(format!(
                        "job {id} is {s} in the store but owned by nobody (lost)"
                    ));
                };
                if mine.version != stored.version || mine.status != stored.status {
                    return Err(format!(
                        "job {id}: engine has {} v{}, store has {s} v{}",
                        mine.state(),
                        mine.version,
                        stored.version
                    ));
                }
                let worker = stored
                    .status
                    .worker()
                    .expect("intermediate states name a worker");
                let Some(w) = engine.worker(worker) else {
                    return Err(format!(
                        "job {id} is {s} on worker {worker}, which the engine does not know"
                    ));
                };
                if matches!(s, JobState::Assigned | JobState::Running) && !w.jobs.contains(id) {
                    return Err(format!(
                        "job {id} is {s} on worker {worker}, which does not hold it"
                    ));
                }
            }
        }
    }
    for job in engine.jobs() {
        let s = job.state();
        if s.is_terminal() || s == JobState::Pending {
            return Err(format!("engine owns job {} in {s}", job.id));
        }
        if stale.contains(&job.id) {
            check_attempts(job)?;
        }
        match job.status.deadline() {
            Some(d) if d <= now => {
                return Err(format!(
                    "job {} still {s} at {now}, past its deadline {d}",
                    job.id
                ));
            }
            Some(_) => {}
            None => return Err(format!("job {} in {s} without a deadline", job.id)),
        }
        if !stale.contains(&job.id)
            && store.jobs.get(&job.id).map(|j| j.version) != Some(job.version)
        {
            return Err(format!("engine's job {} is not the stored version", job.id));
        }
    }
    let mut holder: BTreeMap<JobId, WorkerId> = BTreeMap::new();
    for w in engine.workers() {
        if w.state.is_terminal() {
            return Err(format!("engine keeps terminated worker {}", w.id));
        }
        if w.jobs.len() > w.capacity as usize {
            return Err(format!(
                "worker {} holds {} jobs, capacity {}",
                w.id,
                w.jobs.len(),
                w.capacity
            ));
        }
        for j in &w.jobs {
            if let Some(other) = holder.insert(*j, w.id) {
                return Err(format!("job {j} held by workers {other} and {}", w.id));
            }
            let Some(job) = engine.job(*j) else {
                return Err(format!(
                    "worker {} holds job {j}, which the engine does not own",
                    w.id
                ));
            };
            if job.status.worker() != Some(w.id)
                || !matches!(job.state(), JobState::Assigned | JobState::Running)
            {
                return Err(format!(
                    "worker {} holds job {j}, which is {} elsewhere",
                    w.id,
                    job.state()
                ));
            }
        }
    }
    Ok(())
}

/// Time never has to go back: the engine's next deadline is not in the
/// past. (Separate from [`check_invariants`] so that a caller that already
/// asked the engine does not ask twice.)
pub fn check_next_deadline(next: Option<Timestamp>, now: Timestamp) -> Result<(), String> {
    match next {
        Some(d) if d < now => Err(format!("next deadline {d} is before now {now}")),
        _ => Ok(()),
    }
}
