//! Arbitrary operation sequences applied to the engine, with a minimal
//! shell around it (the fake store of the simulation). The engine must
//! never panic, and after every operation the invariants of
//! `hodei-core/tests/support` must hold.
//!
//! Unlike the simulation, nothing here behaves: workers ack jobs they
//! never got, report results for attempts long gone, register twice,
//! vanish mid-provisioning, and time jumps.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

use hodei_core::engine::{
    AttemptReport, Effect, Engine, EngineConfig, ProviderConfig, RefusalCode, Registration,
    SeededEntropy,
};
use hodei_core::ids::{JobId, ProviderId, WorkerId};
use hodei_core::job::{Job, JobState};
use hodei_core::retry::RetryPolicy;
use hodei_core::scheduler::WorkerSelection;
use hodei_core::time::{Timestamp, add, from_millis};

#[allow(dead_code, unreachable_pub)]
#[path = "../../hodei-core/tests/support/mod.rs"]
mod support;

use support::{FakeStore, Update, check_invariants, check_next_deadline, ctx};

#[derive(Arbitrary, Debug)]
struct Input {
    seed: u64,
    selection: u8,
    pool_max: u8,
    eph_max: u8,
    warm: u8,
    retry_on_timeout: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Submit {
        max_attempts: u8,
        timeout: u8,
        retry: bool,
        priority: i8,
        provider: u8,
        image: bool,
    },
    Advance {
        ms: u16,
    },
    Tick,
    QueueHint,
    QueueDepth {
        depth: u8,
    },
    FailNextClaim,
    Provisioned {
        worker: u8,
    },
    ProvisionFailed {
        worker: u8,
    },
    Register {
        worker: u8,
        capacity: u8,
        report: u8,
        stray: Option<u8>,
    },
    Heartbeat {
        worker: u8,
    },
    Disconnect {
        worker: u8,
    },
    Exited {
        worker: u8,
        oom: bool,
    },
    Drain {
        worker: u8,
        by_user: bool,
    },
    Ack {
        worker: u8,
        job: u8,
        attempt: i8,
    },
    Refuse {
        worker: u8,
        job: u8,
        attempt: i8,
        /// 0: unspecified, 1: at capacity, 2: draining, 3: the text-only
        /// `handle_refused`.
        code: u8,
    },
    Result {
        worker: u8,
        job: u8,
        attempt: i8,
        exit: Option<u8>,
        signal: bool,
        oom: bool,
        timed_out: bool,
        start_error: bool,
    },
    LogBatch {
        worker: u8,
        job: u8,
    },
    Cancel {
        job: u8,
    },
    ExternalCancel {
        job: u8,
        notify: bool,
    },
    Health {
        provider: u8,
        healthy: bool,
    },
}

const PROVIDERS: [&str; 3] = ["eph", "pool", "img"];

struct Shell {
    engine: Engine,
    store: FakeStore,
    now: Timestamp,
    workers: Vec<WorkerId>,
    submitted: Vec<JobId>,
    stale: BTreeSet<JobId>,
    fail_claim: bool,
    requests: u64,
}

impl Shell {
    fn new(input: &Input) -> Self {
        let selections = [
            WorkerSelection::FirstAvailable,
            WorkerSelection::LeastLoaded,
            WorkerSelection::RoundRobin,
            WorkerSelection::MostCapacity,
            WorkerSelection::Affinity,
        ];
        let config = EngineConfig {
            replica_id: "fuzz".into(),
            retry: RetryPolicy {
                retry_on_timeout: input.retry_on_timeout,
                ..RetryPolicy::default()
            },
            selection: selections[input.selection as usize % selections.len()],
            provider_preference: vec![ProviderId::new("pool")],
            provision_timeout: Duration::from_secs(20),
            dispatch_timeout: Duration::from_secs(5),
            heartbeat_timeout: Duration::from_secs(10),
            reconnect_grace: Duration::from_secs(5),
            claim_interval: Duration::from_secs(1),
            claim_lease: Duration::from_secs(30),
            max_claim: 8,
        };
        let pool_max = u32::from(input.pool_max % 4);
        let providers = vec![
            ProviderConfig::ephemeral("eph", "local", false, u32::from(input.eph_max % 4)),
            ProviderConfig {
                min_workers: 0,
                ephemeral: false,
                warm_pool: u32::from(input.warm % 3).min(pool_max),
                ..ProviderConfig::ephemeral("pool", "local", false, pool_max)
            },
            ProviderConfig::ephemeral("img", "docker", true, 1),
        ];
        Self {
            engine: Engine::new(config, providers, Box::new(SeededEntropy::new(input.seed))),
            store: FakeStore::new(),
            now: from_millis(1_000_000),
            workers: Vec::new(),
            submitted: Vec::new(),
            stale: BTreeSet::new(),
            fail_claim: false,
            requests: 0,
        }
    }

    fn worker(&self, n: u8) -> Option<WorkerId> {
        (!self.workers.is_empty()).then(|| self.workers[n as usize % self.workers.len()])
    }

    fn job(&self, n: u8) -> Option<JobId> {
        (!self.submitted.is_empty()).then(|| self.submitted[n as usize % self.submitted.len()])
    }

    /// The attempt named in a report: the current one, or one off.
    fn attempt(&self, job: JobId, delta: i8) -> u32 {
        let current = self.store.job(job).map_or(1, |j| j.attempt);
        current.saturating_add_signed(i32::from(delta.clamp(-1, 1)))
    }

    fn request(&mut self) -> hodei_core::ports::RequestContext {
        self.requests += 1;
        ctx(&format!("fuzz-{}", self.requests), "user:fuzz")
    }

    fn apply(&mut self, op: Op) {
        let now = self.now;
        match op {
            Op::Submit {
                max_attempts,
                timeout,
                retry,
                priority,
                provider,
                image,
            } => {
                let provider = match provider % 5 {
                    0 | 1 => None,
                    p => Some(PROVIDERS[p as usize - 2]),
                };
                let spec = support::spec(
                    u32::from(max_attempts % 5) + 1,
                    u64::from(timeout % 60) + 1,
                    retry,
                    i32::from(priority % 3),
                    provider,
                    image.then_some("img:1"),
                );
                let ctx = self.request();
                if let Ok(id) = self.engine.handle_submit(now, spec, &ctx) {
                    self.submitted.push(id);
                }
            }
            Op::Advance { ms } => {
                let target = add(now, Duration::from_millis(u64::from(ms) * 10));
                // Never let a deadline pass without its tick.
                let mut guard = 0;
                while let Some(d) = self.engine.next_deadline() {
                    if d > target {
                        break;
                    }
                    self.now = self.now.max(d);
                    self.engine.handle_tick(self.now);
                    self.drain();
                    self.check();
                    guard += 1;
                    assert!(guard < 10_000, "the engine keeps asking for ticks at {d}");
                }
                self.now = target;
            }
            Op::Tick => self.engine.handle_tick(now),
            Op::QueueHint => self.engine.handle_queue_hint(),
            Op::QueueDepth { depth } => self.engine.handle_queue_depth(now, u64::from(depth)),
            Op::FailNextClaim => self.fail_claim = true,
            Op::Provisioned { worker } => {
                if let Some(w) = self.worker(worker) {
                    self.engine.handle_provisioned(now, w);
                }
            }
            Op::ProvisionFailed { worker } => {
                if let Some(w) = self.worker(worker) {
                    self.engine
                        .handle_provision_failed(now, w, "fuzzed failure");
                }
            }
            Op::Register {
                worker,
                capacity,
                report,
                stray,
            } => {
                // A known worker (usually), or a new one nobody provisioned.
                let id = match self.worker(worker) {
                    Some(w) if worker % 8 != 7 => w,
                    _ => {
                        let w = WorkerId::from_u64_pair(0x57A7, self.workers.len() as u64);
                        self.workers.push(w);
                        w
                    }
                };
                // It reports some of the attempts the store says it holds,
                // and maybe one it does not.
                let mut running: Vec<(JobId, u32)> = self
                    .store
                    .jobs
                    .values()
                    .filter(|j| {
                        j.status.worker() == Some(id)
                            && matches!(j.state(), JobState::Assigned | JobState::Running)
                    })
                    .enumerate()
                    .filter(|(i, _)| report & (1 << (i % 8)) != 0)
                    .map(|(_, j)| (j.id, j.attempt))
                    .collect();
                if let Some(s) = stray.and_then(|s| self.job(s)) {
                    running.push((s, self.attempt(s, 0)));
                }
                let adoptable: Vec<Job> = running
                    .iter()
                    .filter(|(j, _)| self.engine.job(*j).is_none())
                    .filter_map(|(j, _)| self.store.job(*j).cloned())
                    .collect();
                let image = self.engine.worker(id).and_then(|w| w.image.clone());
                let provider = self
                    .engine
                    .worker(id)
                    .map_or_else(|| ProviderId::new("pool"), |w| w.provider.clone());
                let reg = Registration {
                    worker: id,
                    provider,
                    labels: BTreeMap::new(),
                    image,
                    // An agent never runs more than its capacity.
                    capacity: u32::from(capacity % 4).max(running.len() as u32),
                    running,
                };
                let _ = self.engine.handle_registered(now, reg, adoptable);
            }
            Op::Heartbeat { worker } => {
                if let Some(w) = self.worker(worker) {
                    self.engine.handle_heartbeat(now, w);
                }
            }
            Op::Disconnect { worker } => {
                if let Some(w) = self.worker(worker) {
                    self.engine.handle_disconnected(now, w, "fuzzed disconnect");
                }
            }
            Op::Exited { worker, oom } => {
                if let Some(w) = self.worker(worker) {
                    self.engine.handle_worker_exit(now, w, "fuzzed exit", oom);
                }
            }
            Op::Drain { worker, by_user } => {
                if let Some(w) = self.worker(worker) {
                    let ctx = self.request();
                    let _ = self.engine.handle_draining(now, w, by_user.then_some(&ctx));
                }
            }
            Op::Ack {
                worker,
                job,
                attempt,
            } => {
                if let (Some(w), Some(j)) = (self.worker(worker), self.job(job)) {
                    let a = self.attempt(j, attempt);
                    let _ = self.engine.handle_ack(now, w, j, a);
                }
            }
            Op::Refuse {
                worker,
                job,
                attempt,
                code,
            } => {
                if let (Some(w), Some(j)) = (self.worker(worker), self.job(job)) {
                    let a = self.attempt(j, attempt);
                    let _ = match code % 4 {
                        0 => self.engine.handle_refusal(
                            now,
                            w,
                            j,
                            a,
                            RefusalCode::Unspecified,
                            "fuzzed refusal",
                        ),
                        1 => self.engine.handle_refusal(
                            now,
                            w,
                            j,
                            a,
                            RefusalCode::AtCapacity,
                            "worker is at capacity",
                        ),
                        2 => self.engine.handle_refusal(
                            now,
                            w,
                            j,
                            a,
                            RefusalCode::Draining,
                            "worker is draining",
                        ),
                        _ => self.engine.handle_refused(now, w, j, a, "fuzzed refusal"),
                    };
                }
            }
            Op::Result {
                worker,
                job,
                attempt,
                exit,
                signal,
                oom,
                timed_out,
                start_error,
            } => {
                if let (Some(w), Some(j)) = (self.worker(worker), self.job(job)) {
                    let a = self.attempt(j, attempt);
                    let report = AttemptReport {
                        exit_code: exit.map(i32::from),
                        signal: signal.then_some(9),
                        oom_killed: oom,
                        timed_out,
                        start_error: start_error.then(|| "fuzzed".to_owned()),
                    };
                    let _ = self.engine.handle_result(now, w, j, a, report);
                }
            }
            Op::LogBatch { worker, job } => {
                if let (Some(w), Some(j)) = (self.worker(worker), self.job(job)) {
                    let a = self.attempt(j, 0);
                    let holds = self.engine.handle_log_batch(now, w, j, a);
                    assert_eq!(holds, self.engine.holds(w, j, a));
                }
            }
            Op::Cancel { job } => {
                if let Some(j) = self.job(job) {
                    let ctx = self.request();
                    let owned = self.engine.job(j).is_some();
                    match self.engine.handle_cancel(now, j, &ctx) {
                        Ok(after) => {
                            assert!(owned, "cancelled a job the engine does not own");
                            assert_eq!(after.state(), JobState::Cancelled);
                        }
                        Err(_) => {
                            assert!(!owned, "refused to cancel an owned job");
                            self.store
                                .cancel_here(now, j, &ctx)
                                .unwrap_or_else(|e| panic!("{e}"));
                        }
                    }
                }
            }
            Op::ExternalCancel { job, notify } => {
                if let Some(j) = self.job(job) {
                    if self.engine.job(j).is_none() {
                        return;
                    }
                    let ctx = self.request();
                    let done = self
                        .store
                        .cancel_here(now, j, &ctx)
                        .unwrap_or_else(|e| panic!("{e}"));
                    if done.is_some() {
                        self.stale.insert(j);
                        if notify {
                            let current = self.store.job(j).cloned().expect("stored");
                            self.engine.handle_job_changed(now, current);
                        }
                    }
                }
            }
            Op::Health { provider, healthy } => {
                let p = ProviderId::new(PROVIDERS[provider as usize % PROVIDERS.len()]);
                self.engine
                    .handle_provider_health(now, &p, healthy, "fuzzed");
            }
        }
    }

    fn drain(&mut self) {
        let mut n = 0;
        while let Some(effect) = self.engine.poll_effect() {
            n += 1;
            assert!(n < 100_000, "the engine spins: {effect:?}");
            match effect {
                Effect::CreateJob { job, events } => {
                    self.store
                        .create(job, events)
                        .unwrap_or_else(|e| panic!("{e}"));
                }
                Effect::UpdateJob {
                    job,
                    expected_version,
                    events,
                } => match self
                    .store
                    .update(job, expected_version, events)
                    .unwrap_or_else(|e| panic!("{e}"))
                {
                    Update::Stored => {}
                    Update::Conflict(current) => self.engine.handle_job_changed(self.now, *current),
                },
                Effect::Record(events) => {
                    self.store.record(events).unwrap_or_else(|e| panic!("{e}"))
                }
                Effect::SaveWorker(w) => self.store.save_worker(w),
                Effect::Claim { limit, lease } => {
                    if std::mem::take(&mut self.fail_claim) {
                        self.engine.handle_claimed(self.now, None, limit);
                    } else {
                        let claim = self.store.claim(self.now, limit, lease);
                        assert!(claim.jobs.len() <= limit);
                        self.engine.handle_claimed(self.now, Some(claim), limit);
                    }
                }
                Effect::Release(id) => self.store.release(id).unwrap_or_else(|e| panic!("{e}")),
                Effect::Provision { launch, .. } => {
                    if !self.workers.contains(&launch.worker) {
                        self.workers.push(launch.worker);
                    }
                }
                Effect::Dispatch { worker, job } => {
                    if self.engine.holds(worker, job.id, job.attempt) {
                        assert_eq!(job.state(), JobState::Assigned, "dispatch of {job:?}");
                    }
                }
                Effect::CancelOnWorker { .. } | Effect::DrainWorker(_) => {}
                Effect::DestroyWorker { worker, .. } => {
                    assert!(
                        self.engine.worker(worker).is_none_or(|w| w.jobs.is_empty()),
                        "destroying worker {worker} that still holds jobs"
                    );
                }
            }
        }
    }

    fn check(&mut self) {
        let engine = &self.engine;
        self.stale.retain(|id| engine.job(*id).is_some());
        if let Err(e) = check_invariants(
            &self.engine,
            &self.store,
            &self.submitted,
            &self.stale,
            self.now,
        )
        .and_then(|()| check_next_deadline(self.engine.next_deadline(), self.now))
        {
            panic!("invariant broken at {}: {e}", self.now);
        }
    }
}

fuzz_target!(|input: Input| {
    let mut shell = Shell::new(&input);
    for op in input.ops.into_iter().take(512) {
        shell.apply(op);
        shell.drain();
        // A deadline at or before now is decided before anything else.
        while shell.engine.next_deadline().is_some_and(|d| d <= shell.now) {
            shell.engine.handle_tick(shell.now);
            shell.drain();
            if shell.engine.next_deadline().is_some_and(|d| d <= shell.now) {
                // One tick decides everything due; a second would be a bug.
                panic!("a tick at {} left deadlines due", shell.now);
            }
        }
        shell.check();
    }
});
