//! Deterministic simulation of the whole [`Engine`] on virtual time.
//!
//! The harness plays the shell: it carries out every effect against a
//! fake store (`support::FakeStore`), simulated providers that sometimes
//! fail or are slow, and simulated workers that acknowledge, run for random
//! durations, exit 0 or not, crash, hang, disconnect and come back. Users
//! submit and cancel at random; another party sometimes cancels a job
//! behind the engine's back. Time only moves to the next simulated event
//! or to `engine.next_deadline()`, whichever is first, where the harness
//! calls `handle_tick`. Agents refuse work as the real one does: when
//! draining, when every slot is taken, and (a knob, also in clean
//! scenarios) spuriously "at capacity", as an agent did that had sent a
//! result before freeing its slot; such refusals must cost no attempt.
//! The shell itself sometimes stalls (a "control plane stall", as when the
//! driver waits on a store that is down): for a while no input reaches the
//! engine, not even a tick, while the world goes on; then the late tick
//! and the queued inputs arrive together, in either order. A worker that
//! heartbeats through a stall must not be lost for it, and a worker the
//! heartbeat timeout disconnected while its session stayed up comes back
//! with its next message; in some scenarios the server closes such a
//! session instead and the agent registers again.
//! After every step the invariants of
//! `support::check_invariants` (and a few of the simulation's own) must
//! hold. At the end of each scenario the faults stop and every job must
//! reach a terminal state within a bounded virtual time.
//!
//! ```sh
//! cargo test -p hodei-core --test simulation                  # 10,000 scenarios
//! HODEI_SIM_SCENARIOS=200000 cargo test -p hodei-core --release --test simulation
//! HODEI_SIM_BASE_SEED=7 cargo test -p hodei-core --test simulation     # another set
//! HODEI_SIM_SEED=<seed> cargo test -p hodei-core --test simulation     # replay one
//! HODEI_SIM_SEED=<seed> HODEI_SIM_TRACE=1 cargo test -p hodei-core --test simulation -- --nocapture
//! ```

mod support;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hodei_core::EngineError;
use hodei_core::engine::{
    AttemptReport, Effect, Engine, EngineConfig, LaunchRequest, ProviderConfig, RefusalCode,
    Registration, SeededEntropy,
};
use hodei_core::ids::{JobId, ProviderId, WorkerId};
use hodei_core::job::{Job, JobState};
use hodei_core::retry::RetryPolicy;
use hodei_core::scheduler::WorkerSelection;
use hodei_core::time::{Timestamp, add, epoch};

use support::{
    FakeStore, Rng, Update, check_attempts, check_invariants, check_next_deadline, ctx,
    derive_state,
};

const DEFAULT_SCENARIOS: u64 = 10_000;
const DEFAULT_BASE_SEED: u64 = 0x004D_0DE1_5EED;
/// Effects drained in one step beyond which the engine is deemed to spin.
const MAX_EFFECTS_PER_STEP: usize = 20_000;

#[test]
fn simulation() {
    if let Some(seed) = env_u64("HODEI_SIM_SEED") {
        let trace = std::env::var_os("HODEI_SIM_TRACE").is_some();
        if let Err(e) = run_scenario(seed, trace) {
            panic!("simulation scenario failed: seed={seed}: {e}");
        }
        return;
    }
    let scenarios = env_u64("HODEI_SIM_SCENARIOS").unwrap_or(DEFAULT_SCENARIOS);
    let base = env_u64("HODEI_SIM_BASE_SEED").unwrap_or(DEFAULT_BASE_SEED);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8) as u64;
    let failed = AtomicBool::new(false);
    let failures = Mutex::new(Vec::new());
    let stats = Mutex::new(Stats::default());
    std::thread::scope(|s| {
        for t in 0..threads {
            let (failed, failures, stats) = (&failed, &failures, &stats);
            s.spawn(move || {
                let mut local = Stats::default();
                for i in (t..scenarios).step_by(threads as usize) {
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let seed = Rng::new(base ^ i.wrapping_mul(0x2545_F491_4F6C_DD1D)).next_u64();
                    let outcome = std::panic::catch_unwind(|| run_scenario(seed, false));
                    match outcome {
                        Ok(Ok(s)) => local.add(&s),
                        Ok(Err(e)) => {
                            failed.store(true, Ordering::Relaxed);
                            failures.lock().unwrap().push((seed, e));
                        }
                        Err(_) => {
                            failed.store(true, Ordering::Relaxed);
                            failures
                                .lock()
                                .unwrap()
                                .push((seed, "panicked (see above)".into()));
                        }
                    }
                }
                stats.lock().unwrap().add(&local);
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    if let Some((seed, e)) = failures.first() {
        panic!(
            "simulation failed in {} scenario(s); first: seed={seed}: {e}\n\
             replay: HODEI_SIM_SEED={seed} cargo test -p hodei-core --test simulation \
             (add HODEI_SIM_TRACE=1 ... -- --nocapture for a step trace)",
            failures.len()
        );
    }
    let stats = stats.into_inner().unwrap();
    eprintln!("simulation: {scenarios} scenarios, {stats:?}");
    // The scenarios must actually exercise the paths they claim to.
    assert_eq!(stats.scenarios, scenarios);
    if scenarios >= 1000 {
        assert!(
            stats.succeeded > 0 && stats.failed > 0 && stats.cancelled > 0,
            "{stats:?}"
        );
        assert!(
            stats.timed_out > 0 && stats.retries > 0 && stats.crashes > 0,
            "{stats:?}"
        );
        assert!(
            stats.reconnects > 0 && stats.hangs > 0 && stats.conflicts > 0,
            "{stats:?}"
        );
        assert!(
            stats.provision_failures > 0 && stats.stale_reports > 0,
            "{stats:?}"
        );
        assert!(stats.requeues > 0, "{stats:?}");
        assert!(stats.stalls > 0 && stats.revivals > 0, "{stats:?}");
    }
}

/// A few fixed seeds, so that a plain `cargo test simulation_smoke` runs fast.
#[test]
fn simulation_smoke() {
    for seed in [1, 2, 3, 42, 0xDEAD_BEEF] {
        if let Err(e) = run_scenario(seed, false) {
            panic!("seed={seed}: {e}");
        }
    }
}

/// Scenarios without faults, where every worker exits 0 in time: every
/// job must succeed on its first attempt.
#[test]
fn clean_scenarios_succeed_first_time() {
    for seed in 0..200u64 {
        let mut sim = Sim::new(seed, false, true);
        if let Err(e) = sim.run() {
            panic!("clean seed={seed}: {e}");
        }
        for id in &sim.submitted {
            let job = sim.store.job(*id).expect("submitted");
            assert_eq!(
                job.state(),
                JobState::Succeeded,
                "clean seed={seed}: {job:?}"
            );
            assert_eq!(job.attempt, 1, "clean seed={seed}: {job:?}");
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

fn run_scenario(seed: u64, trace: bool) -> Result<Stats, String> {
    let clean = Rng::new(seed ^ 0xC1EA).chance(0.1);
    let mut sim = Sim::new(seed, trace, clean);
    sim.run()?;
    Ok(sim.stats)
}

#[derive(Debug, Default, Clone)]
struct Stats {
    scenarios: u64,
    jobs: u64,
    steps: u64,
    succeeded: u64,
    failed: u64,
    cancelled: u64,
    timed_out: u64,
    retries: u64,
    crashes: u64,
    hangs: u64,
    reconnects: u64,
    conflicts: u64,
    provision_failures: u64,
    stale_reports: u64,
    /// Capacity or drain refusals the engine took (attempt given back).
    requeues: u64,
    /// Control plane stalls.
    stalls: u64,
    /// Workers the heartbeat timeout disconnected and a heartbeat on the
    /// same session revived.
    revivals: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.scenarios += o.scenarios;
        self.jobs += o.jobs;
        self.steps += o.steps;
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.cancelled += o.cancelled;
        self.timed_out += o.timed_out;
        self.retries += o.retries;
        self.crashes += o.crashes;
        self.hangs += o.hangs;
        self.reconnects += o.reconnects;
        self.conflicts += o.conflicts;
        self.provision_failures += o.provision_failures;
        self.stale_reports += o.stale_reports;
        self.requeues += o.requeues;
        self.stalls += o.stalls;
        self.revivals += o.revivals;
    }
}

/// Per-scenario fault rates.
#[derive(Debug, Clone)]
struct Knobs {
    refuse: f64,
    /// Dispatches refused "at capacity" although a slot is free (the
    /// agent had not freed it yet). Also in clean scenarios.
    capacity_race: f64,
    lose_dispatch: f64,
    slow_ack: f64,
    skip_ack: f64,
    provision_fail: f64,
    slow_provision: f64,
    claim_fail: f64,
    nonzero_exit: f64,
    overrun: f64,
    /// The server closes the stream of a worker the heartbeat timeout
    /// disconnected (else the session stays up, as in the runtime, and
    /// the worker's next message revives it).
    close_on_timeout: bool,
}

#[derive(Debug, Clone)]
enum Ev {
    Submit,
    Fault,
    Quiet,
    BusNotify(JobId),
    ProviderDone {
        worker: WorkerId,
        ok: bool,
    },
    Connect(WorkerId),
    Ack {
        worker: WorkerId,
        job: JobId,
        attempt: u32,
    },
    Refuse {
        worker: WorkerId,
        job: JobId,
        attempt: u32,
        code: RefusalCode,
    },
    Finish {
        worker: WorkerId,
        job: JobId,
        attempt: u32,
    },
    ProviderExit(WorkerId),
    Unfreeze(WorkerId),
}

/// What a worker sends up its stream.
#[derive(Debug, Clone)]
enum Up {
    Ack(JobId, u32),
    Refuse(JobId, u32, RefusalCode),
    Result(JobId, u32, AttemptReport),
}

/// What the control plane sends down a worker's stream.
#[derive(Debug, Clone)]
enum Down {
    Dispatch(Box<Job>),
    Cancel(JobId, u32),
    Drain,
}

#[derive(Debug)]
struct Run {
    attempt: u32,
    /// The process ended; the result waits in the outbox.
    done: bool,
    /// It runs past the job's timeout (the agent kills it there).
    overran: bool,
}

#[derive(Debug)]
struct SimWorker {
    provider: ProviderId,
    image: Option<String>,
    capacity: u32,
    alive: bool,
    provisioned: bool,
    registered: bool,
    link: bool,
    frozen_until: Option<Timestamp>,
    draining: bool,
    running: BTreeMap<JobId, Run>,
    inbox: Vec<Down>,
    outbox: Vec<Up>,
    last_hb: Timestamp,
}

struct Scheduled {
    at: Timestamp,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

struct Sim {
    seed: u64,
    trace: bool,
    clean: bool,
    rng: Rng,
    now: Timestamp,
    engine: Engine,
    config: EngineConfig,
    store: FakeStore,
    events: BinaryHeap<Reverse<Scheduled>>,
    seq: u64,
    workers: BTreeMap<WorkerId, SimWorker>,
    submitted: Vec<JobId>,
    /// Submitted jobs not yet seen terminal.
    open: Vec<JobId>,
    stale: BTreeSet<JobId>,
    /// Attempts whose exit 0 a worker reported and the engine accepted.
    reported_success: BTreeSet<(JobId, u32)>,
    faults: bool,
    knobs: Knobs,
    to_submit: u32,
    requests: u64,
    quiet_at: Timestamp,
    max_timeout: Duration,
    has_img: bool,
    stats: Stats,
    /// The shell is stalled until then: no input reaches the engine.
    stalled_until: Option<Timestamp>,
    /// Events that happened during the stall, whose inputs wait for it.
    backlog: Vec<Ev>,
    /// Workers connected and heartbeating when the stall began.
    stall_watch: Vec<WorkerId>,
}

impl Sim {
    fn new(seed: u64, trace: bool, clean: bool) -> Self {
        let mut rng = Rng::new(seed);
        let selections = [
            WorkerSelection::FirstAvailable,
            WorkerSelection::LeastLoaded,
            WorkerSelection::RoundRobin,
            WorkerSelection::MostCapacity,
            WorkerSelection::Affinity,
        ];
        let pool_max = rng.range(1, 4) as u32;
        let has_img = rng.chance(0.5);
        let mut providers = vec![
            ProviderConfig::ephemeral("eph", "local", false, rng.range(1, 4) as u32),
            ProviderConfig {
                min_workers: 0,
                warm_pool: rng.range(0, u64::from(pool_max).min(2)) as u32,
                ephemeral: false,
                worker_capacity: rng.range(1, 3) as u32,
                ..ProviderConfig::ephemeral("pool", "local", false, pool_max)
            },
        ];
        if has_img {
            providers.push(ProviderConfig::ephemeral(
                "img",
                "docker",
                true,
                rng.range(1, 2) as u32,
            ));
        }
        let mut preference: Vec<ProviderId> = providers.iter().map(|p| p.id.clone()).collect();
        if rng.chance(0.5) {
            preference.reverse();
        }
        preference.truncate(rng.range(0, preference.len() as u64) as usize);
        let config = EngineConfig {
            replica_id: "sim".into(),
            retry: RetryPolicy {
                base: rng.millis(200, 2000),
                cap: rng.millis(4000, 16000),
                jitter: 0.25,
                retry_on_timeout: rng.chance(0.3),
            },
            selection: *rng.pick(&selections).expect("non-empty"),
            provider_preference: preference,
            provision_timeout: rng.millis(5000, 30_000),
            dispatch_timeout: rng.millis(2000, 8000),
            heartbeat_timeout: rng.millis(6000, 20_000),
            reconnect_grace: rng.millis(2000, 15_000),
            claim_interval: rng.millis(1000, 4000),
            claim_lease: Duration::from_secs(30),
            max_claim: rng.range(1, 16) as usize,
        };
        let engine = Engine::new(
            config.clone(),
            providers,
            Box::new(SeededEntropy::new(seed ^ 0xE4)),
        );
        let f = if clean { 0.0 } else { 1.0 };
        let knobs = Knobs {
            refuse: f * rng.unit() * 0.08,
            capacity_race: if rng.chance(0.5) {
                rng.unit() * 0.25
            } else {
                0.0
            },
            lose_dispatch: f * rng.unit() * 0.04,
            slow_ack: f * rng.unit() * 0.1,
            skip_ack: f * rng.unit() * 0.1,
            provision_fail: f * rng.unit() * 0.2,
            slow_provision: f * rng.unit() * 0.15,
            claim_fail: f * rng.unit() * 0.05,
            nonzero_exit: f * rng.unit() * 0.4,
            overrun: f * rng.unit() * 0.2,
            close_on_timeout: rng.chance(0.3),
        };
        // Mostly small scenarios (more seeds per second), some crowded ones.
        let to_submit = if rng.chance(0.7) {
            rng.range(5, 12)
        } else {
            rng.range(5, 30)
        } as u32;
        let submit_window = rng.millis(0, 60_000);
        let quiet_at = add(epoch(), submit_window + rng.millis(0, 30_000));
        let mut sim = Sim {
            seed,
            trace,
            clean,
            rng,
            now: epoch(),
            engine,
            config,
            store: FakeStore::new(),
            events: BinaryHeap::new(),
            seq: 0,
            workers: BTreeMap::new(),
            submitted: Vec::new(),
            open: Vec::new(),
            stale: BTreeSet::new(),
            reported_success: BTreeSet::new(),
            faults: !clean,
            knobs,
            to_submit,
            requests: 0,
            quiet_at,
            max_timeout: Duration::ZERO,
            has_img,
            stats: Stats {
                scenarios: 1,
                ..Stats::default()
            },
            stalled_until: None,
            backlog: Vec::new(),
            stall_watch: Vec::new(),
        };
        for _ in 0..to_submit {
            let at = add(epoch(), sim.rng.millis(0, submit_window.as_millis() as u64));
            sim.schedule_at(at, Ev::Submit);
        }
        if !clean {
            let faults = sim.rng.range(0, u64::from(to_submit));
            for _ in 0..faults {
                let at = add(
                    epoch(),
                    sim.rng
                        .millis(0, (quiet_at - epoch()).num_milliseconds() as u64),
                );
                sim.schedule_at(at, Ev::Fault);
            }
        }
        sim.schedule_at(quiet_at, Ev::Quiet);
        // Workers that exist before the engine starts (a static pool).
        for n in 0..sim.rng.range(0, 2) {
            let id = WorkerId::from_u64_pair(0x0057_A71C, n);
            let capacity = sim.rng.range(1, 3) as u32;
            sim.workers.insert(
                id,
                sim.new_worker(ProviderId::new("pool"), None, capacity, true),
            );
            let d = sim.rng.millis(0, 1000);
            sim.schedule(d, Ev::Connect(id));
        }
        sim
    }

    fn new_worker(
        &self,
        provider: ProviderId,
        image: Option<String>,
        capacity: u32,
        provisioned: bool,
    ) -> SimWorker {
        SimWorker {
            provider,
            image,
            capacity,
            alive: true,
            provisioned,
            registered: false,
            link: false,
            frozen_until: None,
            draining: false,
            running: BTreeMap::new(),
            inbox: Vec::new(),
            outbox: Vec::new(),
            last_hb: self.now,
        }
    }

    fn schedule(&mut self, after: Duration, ev: Ev) {
        self.schedule_at(add(self.now, after), ev);
    }

    fn schedule_at(&mut self, at: Timestamp, ev: Ev) {
        self.seq += 1;
        self.events.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            ev,
        }));
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            eprintln!(
                "[{:>9}ms] {}",
                (self.now - epoch()).num_milliseconds(),
                what()
            );
        }
    }

    /// Runs the scenario to the end: faults, then quiet until every job is
    /// terminal.
    fn run(&mut self) -> Result<(), String> {
        self.drain()?;
        let mut deadline = self.engine.next_deadline();
        self.check(deadline)?;
        let mut same_instant_ticks = 0u32;
        loop {
            if let Some(until) = self.stalled_until {
                // The shell is stuck: the world goes on, its inputs wait.
                if self.events.peek().is_some_and(|Reverse(s)| s.at < until) {
                    let Reverse(s) = self.events.pop().expect("peeked");
                    self.now = self.now.max(s.at);
                    self.log(|| format!("{:?} (held by the stall)", s.ev));
                    self.backlog.push(s.ev);
                    continue;
                }
                self.now = self.now.max(until);
                self.stalled_until = None;
                self.end_stall()?;
                self.stats.steps += 1;
                self.after_step()?;
                deadline = self.engine.next_deadline();
                self.check(deadline)?;
                continue;
            }
            let next_ev = self.events.peek().map(|Reverse(s)| s.at);
            let tick = match (deadline, next_ev) {
                (Some(d), Some(e)) => d <= e,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if tick {
                let d = deadline.expect("tick implies a deadline");
                if d <= self.now {
                    same_instant_ticks += 1;
                    if same_instant_ticks > 100 {
                        return Err(format!("the engine asks for a tick at {d} over and over"));
                    }
                } else {
                    same_instant_ticks = 0;
                }
                self.now = self.now.max(d);
                self.heartbeats();
                self.log(|| "tick".into());
                // The shell reads the queue's depth now and then; pools
                // are sized by it.
                if self.rng.chance(0.3) {
                    let depth = self.store.queue_len() as u64;
                    self.engine.handle_queue_depth(self.now, depth);
                }
                self.engine.handle_tick(self.now);
            } else {
                let Reverse(s) = self.events.pop().expect("peeked");
                self.now = self.now.max(s.at);
                same_instant_ticks = 0;
                self.heartbeats();
                self.log(|| format!("{:?}", s.ev));
                self.handle(s.ev)?;
            }
            self.stats.steps += 1;
            self.drain()?;
            self.after_step()?;
            deadline = self.engine.next_deadline();
            self.check(deadline)?;
            if !self.faults && self.to_submit == 0 && self.all_terminal() {
                break;
            }
            if !self.faults && self.now > self.liveness_bound() {
                let open: Vec<String> = self
                    .submitted
                    .iter()
                    .filter_map(|id| self.store.job(*id))
                    .filter(|j| !j.is_terminal())
                    .map(|j| format!("{} {} attempt {}", j.id, j.state(), j.attempt))
                    .collect();
                return Err(format!(
                    "liveness: faults stopped at {} and at {} jobs are still open: {open:?}",
                    self.quiet_at, self.now
                ));
            }
        }
        if !self.all_terminal() {
            return Err("the simulation ran out of events with open jobs".into());
        }
        self.final_audit()
    }

    /// Virtual time by which every job must be terminal once faults stop:
    /// every attempt of every job, one after the other, each waiting for a
    /// worker, its acknowledgement, its run and its backoff.
    fn liveness_bound(&self) -> Timestamp {
        let per_attempt = self.config.provision_timeout
            + self.config.dispatch_timeout
            + self.max_timeout
            + self.config.retry.cap.mul_f64(1.25)
            + self.config.claim_interval * 2
            + self.config.reconnect_grace
            + self.config.heartbeat_timeout;
        let jobs = self.submitted.len() as u32 + 1;
        add(self.quiet_at, per_attempt * (jobs * 5))
    }

    fn all_terminal(&self) -> bool {
        self.open.is_empty()
    }

    fn heartbeats(&mut self) {
        let every = self.config.heartbeat_timeout / 3;
        let now = self.now;
        for (id, w) in &mut self.workers {
            if w.alive && w.link && w.frozen_until.is_none() && now - w.last_hb >= chrono_of(every)
            {
                w.last_hb = now;
                let was_down = self.engine.worker(*id).is_some_and(|e| !e.connected);
                self.engine.handle_heartbeat(now, *id);
                if was_down && self.engine.worker(*id).is_some_and(|e| e.connected) {
                    self.stats.revivals += 1;
                }
            }
        }
    }

    /// The stall ends: the late tick and the inputs queued behind it reach
    /// the engine together, the tick first or last. Heartbeats sent
    /// meanwhile come first among the queued inputs.
    fn end_stall(&mut self) -> Result<(), String> {
        self.log(|| "stall ends".into());
        let tick_first = self.rng.chance(0.5);
        if tick_first {
            self.engine.handle_tick(self.now);
            self.drain()?;
        }
        self.heartbeats();
        self.drain()?;
        for ev in std::mem::take(&mut self.backlog) {
            self.log(|| format!("{ev:?} (after the stall)"));
            self.handle(ev)?;
            self.drain()?;
        }
        if !tick_first {
            self.engine.handle_tick(self.now);
            self.drain()?;
        }
        // A worker that heartbeated all along (and still runs, reachable)
        // is not lost, nor left disconnected, for the shell's stall.
        for id in std::mem::take(&mut self.stall_watch) {
            let w = &self.workers[&id];
            if !(w.alive && w.link && w.frozen_until.is_none()) {
                continue;
            }
            match self.engine.worker(id) {
                Some(e) if e.connected => {}
                Some(_) => {
                    return Err(format!(
                        "worker {id} heartbeated through a stall and is left disconnected"
                    ));
                }
                None => return Err(format!("worker {id} was lost for a stall of the shell")),
            }
        }
        Ok(())
    }

    fn next_request(&mut self, actor: &str) -> hodei_core::ports::RequestContext {
        self.requests += 1;
        ctx(&format!("req-{}-{}", self.seed, self.requests), actor)
    }

    fn handle(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Submit => self.submit(),
            Ev::Quiet => {
                self.faults = false;
                for p in ["eph", "pool", "img"] {
                    self.engine.handle_provider_health(
                        self.now,
                        &ProviderId::new(p),
                        true,
                        "recovered",
                    );
                }
                let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
                for id in ids {
                    let w = &self.workers[&id];
                    if !w.alive {
                        continue;
                    }
                    if w.frozen_until.is_some() {
                        self.schedule(Duration::ZERO, Ev::Unfreeze(id));
                    } else if w.provisioned && !w.link {
                        self.schedule(Duration::from_millis(100), Ev::Connect(id));
                    }
                }
                Ok(())
            }
            Ev::Fault => {
                if self.faults {
                    self.fault()
                } else {
                    Ok(())
                }
            }
            Ev::BusNotify(job) => {
                if let Some(current) = self.store.job(job).cloned() {
                    self.engine.handle_job_changed(self.now, current);
                }
                Ok(())
            }
            Ev::ProviderDone { worker, ok } => {
                let ok = ok || !self.faults;
                let Some(w) = self.workers.get_mut(&worker) else {
                    return Ok(());
                };
                if !w.alive || w.provisioned {
                    return Ok(());
                }
                if ok {
                    w.provisioned = true;
                    self.engine.handle_provisioned(self.now, worker);
                    let slow = self.faults && self.rng.chance(self.knobs.slow_provision);
                    let d = if slow {
                        self.rng
                            .millis(0, self.config.provision_timeout.as_millis() as u64)
                    } else {
                        self.rng.millis(10, 1500)
                    };
                    self.schedule(d, Ev::Connect(worker));
                } else {
                    w.alive = false;
                    self.stats.provision_failures += 1;
                    self.engine
                        .handle_provision_failed(self.now, worker, "quota exceeded");
                }
                Ok(())
            }
            Ev::Connect(worker) => self.connect(worker),
            Ev::Ack {
                worker,
                job,
                attempt,
            } => {
                self.send_up(worker, Up::Ack(job, attempt));
                Ok(())
            }
            Ev::Refuse {
                worker,
                job,
                attempt,
                code,
            } => {
                self.send_up(worker, Up::Refuse(job, attempt, code));
                Ok(())
            }
            Ev::Finish {
                worker,
                job,
                attempt,
            } => {
                let report = self.report_for(worker, job, attempt);
                let Some(w) = self.workers.get_mut(&worker) else {
                    return Ok(());
                };
                let Some(run) = w.running.get_mut(&job) else {
                    return Ok(());
                };
                if !w.alive || run.attempt != attempt || run.done {
                    return Ok(());
                }
                run.done = true;
                self.send_up(worker, Up::Result(job, attempt, report));
                Ok(())
            }
            Ev::ProviderExit(worker) => {
                // Sometimes the container was OOM-killed: its job's fault.
                if self.faults && self.rng.chance(0.2) {
                    self.engine
                        .handle_worker_exit(self.now, worker, "OOMKilled", true);
                } else {
                    self.engine
                        .handle_worker_exited(self.now, worker, "exit status 137");
                }
                Ok(())
            }
            Ev::Unfreeze(worker) => {
                let Some(w) = self.workers.get_mut(&worker) else {
                    return Ok(());
                };
                if !w.alive || w.frozen_until.is_none_or(|t| t > self.now && self.faults) {
                    return Ok(());
                }
                w.frozen_until = None;
                w.last_hb = self.now;
                if w.link {
                    // The session is still up unless the engine forgot the
                    // worker (lost): its heartbeat brings it back if the
                    // heartbeat timeout disconnected it meanwhile.
                    if self.engine.worker(worker).is_some() {
                        self.engine.handle_heartbeat(self.now, worker);
                        let inbox = std::mem::take(&mut w.inbox);
                        for msg in inbox {
                            self.receive(worker, msg);
                        }
                        self.flush(worker);
                        self.maybe_leave(worker);
                    } else {
                        // The server gave up on the stream meanwhile.
                        w.link = false;
                        w.inbox.clear();
                        let d = self.rng.millis(10, 2000);
                        self.schedule(d, Ev::Connect(worker));
                    }
                } else {
                    let d = self.rng.millis(10, 2000);
                    self.schedule(d, Ev::Connect(worker));
                }
                Ok(())
            }
        }
    }

    fn submit(&mut self) -> Result<(), String> {
        self.to_submit -= 1;
        let max_attempts = self.rng.range(1, 5) as u32;
        let timeout = self.rng.range(2, 60);
        let retry_on_failure = self.rng.chance(0.5);
        let priority = self.rng.range(0, 4) as i32 - 2;
        let roll = self.rng.unit();
        let (provider, image, valid) = if roll < 0.6 {
            (None, None, true)
        } else if roll < 0.75 {
            (Some("eph"), None, true)
        } else if roll < 0.88 {
            (Some("pool"), None, true)
        } else if roll < 0.94 {
            let p = if self.rng.chance(0.5) {
                Some("img")
            } else {
                None
            };
            (p, Some("img:1"), self.has_img)
        } else if roll < 0.97 {
            (Some("eph"), Some("img:1"), false)
        } else {
            (Some("nowhere"), None, false)
        };
        let spec = support::spec(
            max_attempts,
            timeout,
            retry_on_failure,
            priority,
            provider,
            image,
        );
        let ctx = self.next_request("user:alice");
        match self.engine.handle_submit(self.now, spec, &ctx) {
            Ok(id) => {
                if !valid {
                    return Err(format!(
                        "accepted a spec for {provider:?} with image {image:?}"
                    ));
                }
                self.max_timeout = self.max_timeout.max(Duration::from_secs(timeout));
                self.submitted.push(id);
                self.open.push(id);
                self.stats.jobs += 1;
                Ok(())
            }
            Err(EngineError::UnknownProvider { .. }) if !valid => Ok(()),
            Err(e) => Err(format!(
                "refused a valid spec ({provider:?}, {image:?}): {e}"
            )),
        }
    }

    fn fault(&mut self) -> Result<(), String> {
        let live: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| w.alive && w.registered)
            .map(|(id, _)| *id)
            .collect();
        let roll = self.rng.range(0, 10);
        let target = self.rng.pick(&live).copied();
        match (roll, target) {
            (0, Some(w)) => {
                // Crash: the process dies; the stream may or may not be
                // seen to drop before the provider reports the exit.
                self.stats.crashes += 1;
                let sw = self.workers.get_mut(&w).expect("live");
                sw.alive = false;
                sw.running.clear();
                sw.outbox.clear();
                sw.inbox.clear();
                if std::mem::replace(&mut sw.link, false) && self.rng.chance(0.5) {
                    self.engine.handle_disconnected(self.now, w, "stream reset");
                }
                let d = self.rng.millis(0, 3000);
                self.schedule(d, Ev::ProviderExit(w));
            }
            (1, Some(w)) => {
                // Hang: no heartbeats, no progress, messages pile up.
                self.stats.hangs += 1;
                let d = if self.rng.chance(0.2) {
                    Duration::from_secs(3600)
                } else {
                    self.rng.millis(500, 40_000)
                };
                let sw = self.workers.get_mut(&w).expect("live");
                if sw.frozen_until.is_none() {
                    sw.frozen_until = Some(add(self.now, d));
                    self.schedule(d, Ev::Unfreeze(w));
                }
            }
            (2 | 3, Some(w)) => {
                // The network drops the stream; the agent reconnects, maybe
                // too late.
                let sw = self.workers.get_mut(&w).expect("live");
                if sw.link {
                    sw.link = false;
                    sw.inbox.clear();
                    self.engine
                        .handle_disconnected(self.now, w, "connection reset");
                    let grace = self.config.reconnect_grace.as_millis() as u64;
                    let d = self.rng.millis(0, grace * 2);
                    self.schedule(d, Ev::Connect(w));
                }
            }
            (4, Some(w)) => {
                // Drain, by a user or by the agent's own SIGTERM (a hung
                // agent handles no signal).
                let by_user = self.rng.chance(0.5) || self.workers[&w].frozen_until.is_some();
                let ctx = self.next_request("user:ops");
                let r = self
                    .engine
                    .handle_draining(self.now, w, by_user.then_some(&ctx));
                if r.is_ok() && !by_user {
                    self.workers.get_mut(&w).expect("live").draining = true;
                    self.maybe_leave(w);
                }
            }
            (5 | 6, _) => {
                // A user cancels a random job.
                let Some(&job) = self.rng.pick(&self.submitted) else {
                    return Ok(());
                };
                let ctx = self.next_request("user:bob");
                if self.engine.job(job).is_some() {
                    let j = self
                        .engine
                        .handle_cancel(self.now, job, &ctx)
                        .map_err(|e| format!("cancel of owned job {job} refused: {e}"))?;
                    if j.state() != JobState::Cancelled {
                        return Err(format!("cancel returned {}", j.state()));
                    }
                } else {
                    match self.engine.handle_cancel(self.now, job, &ctx) {
                        Err(EngineError::UnknownJob(_)) => {}
                        other => return Err(format!("cancel of unowned job: {other:?}")),
                    }
                    self.store.cancel_here(self.now, job, &ctx)?;
                }
            }
            (7, _) => {
                // Someone else (another replica, an operator) cancels a job
                // this engine owns, in the store; the news arrives later,
                // or only as a conflict.
                let owned: Vec<JobId> = self.engine.jobs().map(|j| j.id).collect();
                let Some(&job) = self.rng.pick(&owned) else {
                    return Ok(());
                };
                let ctx = self.next_request("user:admin");
                if self.store.cancel_here(self.now, job, &ctx)?.is_some() {
                    self.stale.insert(job);
                    if self.rng.chance(0.5) {
                        let d = self.rng.millis(0, 3000);
                        self.schedule(d, Ev::BusNotify(job));
                    }
                }
            }
            (9, _) => {
                // A control plane stall: the shell hears nothing for up to
                // three heartbeat timeouts (the driver waits on a store).
                self.stats.stalls += 1;
                let max = self.config.heartbeat_timeout.as_millis() as u64 * 3;
                let d = self.rng.millis(500, max);
                self.stalled_until = Some(add(self.now, d));
                self.stall_watch = self
                    .workers
                    .iter()
                    .filter(|(id, w)| {
                        w.alive
                            && w.link
                            && w.frozen_until.is_none()
                            && self.engine.worker(**id).is_some_and(|e| e.connected)
                    })
                    .map(|(id, _)| *id)
                    .collect();
            }
            (8, _) => {
                let p = *self.rng.pick(&["eph", "pool", "img"]).expect("non-empty");
                let healthy = self.rng.chance(0.5);
                self.engine
                    .handle_provider_health(self.now, &ProviderId::new(p), healthy, "probe");
            }
            _ => {}
        }
        Ok(())
    }

    fn connect(&mut self, worker: WorkerId) -> Result<(), String> {
        let Some(w) = self.workers.get_mut(&worker) else {
            return Ok(());
        };
        if !w.alive || w.link || w.frozen_until.is_some() || !w.provisioned {
            return Ok(());
        }
        w.link = true;
        w.inbox.clear();
        w.last_hb = self.now;
        let reconnect = w.registered;
        w.registered = true;
        let running: Vec<(JobId, u32)> = w.running.iter().map(|(j, r)| (*j, r.attempt)).collect();
        let reg = Registration {
            worker,
            provider: w.provider.clone(),
            labels: BTreeMap::new(),
            image: w.image.clone(),
            capacity: w.capacity,
            running: running.clone(),
        };
        let adoptable: Vec<Job> = running
            .iter()
            .filter(|(j, _)| self.engine.job(*j).is_none())
            .filter_map(|(j, _)| self.store.job(*j).cloned())
            .collect();
        if reconnect {
            self.stats.reconnects += 1;
        }
        self.engine
            .handle_registered(self.now, reg, adoptable)
            .map_err(|e| format!("registration of {worker} refused: {e}"))?;
        self.flush(worker);
        self.maybe_leave(worker);
        Ok(())
    }

    /// A message up the stream: sent now if the stream is up and the agent
    /// responsive, else kept for after the reconnect.
    fn send_up(&mut self, worker: WorkerId, msg: Up) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        if !w.alive {
            return;
        }
        w.outbox.push(msg);
        if w.link && w.frozen_until.is_none() {
            self.flush(worker);
            self.maybe_leave(worker);
        }
    }

    fn flush(&mut self, worker: WorkerId) {
        let now = self.now;
        let msgs = std::mem::take(&mut self.workers.get_mut(&worker).expect("known").outbox);
        for msg in msgs {
            let accepted = match msg {
                Up::Ack(job, attempt) => self.engine.handle_ack(now, worker, job, attempt),
                Up::Refuse(job, attempt, code) => {
                    let w = self.workers.get_mut(&worker).expect("known");
                    if w.running.get(&job).is_some_and(|r| r.attempt == attempt) {
                        w.running.remove(&job);
                    }
                    let reason = match code {
                        RefusalCode::Unspecified => "busy".to_owned(),
                        // The text-only path of the shell (`FromWorker::Refused`).
                        code => code.tag("worker is at capacity (1 running)"),
                    };
                    let r = self
                        .engine
                        .handle_refused(now, worker, job, attempt, &reason);
                    if r.is_ok() && code != RefusalCode::Unspecified {
                        // The final audit checks that the attempt was given
                        // back (JobQueued in the same attempt), not consumed.
                        self.stats.requeues += 1;
                    }
                    r
                }
                Up::Result(job, attempt, report) => {
                    let w = self.workers.get_mut(&worker).expect("known");
                    if w.running.get(&job).is_some_and(|r| r.attempt == attempt) {
                        w.running.remove(&job);
                    }
                    let success = report.exit_code == Some(0)
                        && !report.oom_killed
                        && !report.timed_out
                        && report.start_error.is_none();
                    let r = self.engine.handle_result(now, worker, job, attempt, report);
                    if r.is_ok() && success {
                        self.reported_success.insert((job, attempt));
                    }
                    r
                }
            };
            match accepted {
                Ok(()) => {}
                Err(EngineError::NotAssigned { .. }) | Err(EngineError::Transition(_)) => {
                    self.stats.stale_reports += 1;
                }
                Err(e) => {
                    // Anything else is surprising but must not corrupt state;
                    // the invariants will tell.
                    self.log(|| format!("report refused: {e}"));
                }
            }
        }
    }

    /// A draining agent leaves once idle.
    fn maybe_leave(&mut self, worker: WorkerId) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        if !(w.alive && w.draining && w.running.is_empty() && w.outbox.is_empty()) {
            return;
        }
        w.alive = false;
        if std::mem::replace(&mut w.link, false) {
            self.engine.handle_disconnected(self.now, worker, "drained");
        }
        let d = self.rng.millis(0, 2000);
        self.schedule(d, Ev::ProviderExit(worker));
    }

    /// A message down the stream.
    fn deliver(&mut self, worker: WorkerId, msg: Down) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        if !w.alive || !w.link {
            return; // lost with the stream
        }
        if w.frozen_until.is_some() {
            w.inbox.push(msg);
            return;
        }
        self.receive(worker, msg);
    }

    fn receive(&mut self, worker: WorkerId, msg: Down) {
        match msg {
            Down::Dispatch(job) => {
                let faults = self.faults;
                if faults && self.rng.chance(self.knobs.lose_dispatch) {
                    return;
                }
                let attempt = job.attempt;
                let w = &self.workers[&worker];
                // A slot is free once the result is queued (`done`).
                let taken = w.running.values().filter(|r| !r.done).count();
                let code = if w.draining {
                    Some(RefusalCode::Draining)
                } else if taken >= w.capacity as usize || self.rng.chance(self.knobs.capacity_race)
                {
                    Some(RefusalCode::AtCapacity)
                } else if faults && self.rng.chance(self.knobs.refuse) {
                    Some(RefusalCode::Unspecified)
                } else {
                    None
                };
                if let Some(code) = code {
                    let d = self.rng.millis(0, 500);
                    self.schedule(
                        d,
                        Ev::Refuse {
                            worker,
                            job: job.id,
                            attempt,
                            code,
                        },
                    );
                    return;
                }
                let timeout = job.spec.timeout();
                let ack = if faults && self.rng.chance(self.knobs.slow_ack) {
                    self.rng
                        .millis(0, 2 * self.config.dispatch_timeout.as_millis() as u64)
                } else {
                    self.rng.millis(1, 300)
                };
                let limit = timeout.as_millis() as u64;
                let run = if faults && self.rng.chance(self.knobs.overrun) {
                    self.rng.millis(limit / 2, limit * 3 / 2)
                } else {
                    self.rng.millis(0, limit * 7 / 10)
                };
                let w = self.workers.get_mut(&worker).expect("known");
                w.running.insert(
                    job.id,
                    Run {
                        attempt,
                        done: false,
                        overran: run >= timeout,
                    },
                );
                if !self.rng.chance(self.knobs.skip_ack) {
                    self.schedule(
                        ack,
                        Ev::Ack {
                            worker,
                            job: job.id,
                            attempt,
                        },
                    );
                }
                self.schedule(
                    ack + run.min(timeout),
                    Ev::Finish {
                        worker,
                        job: job.id,
                        attempt,
                    },
                );
            }
            Down::Cancel(job, attempt) => {
                let w = self.workers.get_mut(&worker).expect("known");
                if w.running.get(&job).is_some_and(|r| r.attempt == attempt) {
                    w.running.remove(&job);
                    w.outbox.retain(
                        |m| !matches!(m, Up::Result(j, a, _) if *j == job && *a == attempt),
                    );
                    // The agent reports the kill; the engine must shrug it off.
                    if self.rng.chance(0.3) {
                        let report = AttemptReport {
                            signal: Some(15),
                            ..AttemptReport::default()
                        };
                        self.send_up(worker, Up::Result(job, attempt, report));
                    }
                }
                self.maybe_leave(worker);
            }
            Down::Drain => {
                self.workers.get_mut(&worker).expect("known").draining = true;
                self.maybe_leave(worker);
            }
        }
    }

    fn report_for(&mut self, worker: WorkerId, job: JobId, attempt: u32) -> AttemptReport {
        let overran = self
            .workers
            .get(&worker)
            .and_then(|w| w.running.get(&job))
            .is_some_and(|r| r.attempt == attempt && r.overran);
        if overran {
            // The agent kills the process at the job's timeout.
            return AttemptReport {
                timed_out: true,
                signal: Some(9),
                ..AttemptReport::default()
            };
        }
        let roll = self.rng.unit();
        let k = &self.knobs;
        if !self.faults || roll >= k.nonzero_exit {
            AttemptReport {
                exit_code: Some(0),
                ..AttemptReport::default()
            }
        } else {
            match self.rng.range(0, 5) {
                0 => AttemptReport {
                    signal: Some(9),
                    ..AttemptReport::default()
                },
                1 => AttemptReport {
                    oom_killed: true,
                    signal: Some(9),
                    ..AttemptReport::default()
                },
                2 => AttemptReport {
                    start_error: Some("no such file".into()),
                    ..AttemptReport::default()
                },
                3 => AttemptReport {
                    timed_out: true,
                    signal: Some(9),
                    ..AttemptReport::default()
                },
                _ => AttemptReport {
                    exit_code: Some(self.rng.range(1, 255) as i32),
                    ..AttemptReport::default()
                },
            }
        }
    }

    /// Carries out every effect the engine asked for, in order.
    ///
    /// Effects are taken in batches (everything polled so far). The step may
    /// have fed several inputs before draining (a reconnecting agent
    /// flushes its acks and results at once), so a batch may hold several
    /// updates of one job, each based on the previous one: once one of
    /// them conflicts, the rest of that job's updates in the batch are
    /// skipped, as `Effect::UpdateJob` asks of such shells.
    fn drain(&mut self) -> Result<(), String> {
        let mut n = 0usize;
        loop {
            let batch: Vec<Effect> = std::iter::from_fn(|| self.engine.poll_effect()).collect();
            if batch.is_empty() {
                return Ok(());
            }
            let mut lost: BTreeSet<JobId> = BTreeSet::new();
            for effect in batch {
                n += 1;
                if n > MAX_EFFECTS_PER_STEP {
                    return Err(format!(
                        "the engine produced more than {MAX_EFFECTS_PER_STEP} effects in one step \
                         (last: {effect:?})"
                    ));
                }
                self.execute(effect, &mut lost)?;
            }
        }
    }

    fn execute(&mut self, effect: Effect, lost: &mut BTreeSet<JobId>) -> Result<(), String> {
        {
            if self.trace {
                self.log(|| format!("  -> {}", short(&effect)));
            }
            match effect {
                Effect::CreateJob { job, events } => self.store.create(job, events)?,
                Effect::UpdateJob {
                    job,
                    expected_version,
                    events,
                } => {
                    if lost.contains(&job.id) {
                        self.log(|| format!("  skipped: builds on a lost update of {}", job.id));
                        return Ok(());
                    }
                    self.count_outcome(&events);
                    match self.store.update(job, expected_version, events)? {
                        Update::Stored => {}
                        Update::Conflict(current) => {
                            self.stats.conflicts += 1;
                            self.log(|| format!("  conflict on {}", current.id));
                            lost.insert(current.id);
                            self.engine.handle_job_changed(self.now, *current);
                        }
                    }
                }
                Effect::Record(events) => self.store.record(events)?,
                Effect::SaveWorker(w) => self.store.save_worker(w),
                Effect::Claim { limit, lease } => {
                    if self.faults && self.rng.chance(self.knobs.claim_fail) {
                        self.engine.handle_claimed(self.now, None, limit);
                    } else {
                        let claim = self.store.claim(self.now, limit, lease);
                        if claim.jobs.len() > limit {
                            return Err("store over-claimed".into());
                        }
                        self.engine.handle_claimed(self.now, Some(claim), limit);
                    }
                }
                Effect::Release(id) => self.store.release(id)?,
                Effect::Provision { provider, launch } => self.provision(provider, launch),
                Effect::Dispatch { worker, job } => {
                    // The commit of the assignment may have conflicted.
                    if self.engine.holds(worker, job.id, job.attempt) {
                        if job.state() != JobState::Assigned {
                            return Err(format!("dispatch of a {} job", job.state()));
                        }
                        self.deliver(worker, Down::Dispatch(job));
                    }
                }
                Effect::CancelOnWorker {
                    worker,
                    job,
                    attempt,
                    ..
                } => self.deliver(worker, Down::Cancel(job, attempt)),
                Effect::DrainWorker(worker) => self.deliver(worker, Down::Drain),
                Effect::DestroyWorker { worker, .. } => {
                    if let Some(w) = self.workers.get_mut(&worker) {
                        w.alive = false;
                        w.link = false;
                        w.running.clear();
                        w.inbox.clear();
                        w.outbox.clear();
                    }
                }
            }
        }
        Ok(())
    }

    fn count_outcome(&mut self, events: &[hodei_core::event::DomainEvent]) {
        for e in events {
            match e.event_type() {
                "JobSucceeded" => self.stats.succeeded += 1,
                "JobFailed" => self.stats.failed += 1,
                "JobCancelled" => self.stats.cancelled += 1,
                "JobTimedOut" => self.stats.timed_out += 1,
                "JobRetryScheduled" => self.stats.retries += 1,
                _ => {}
            }
        }
    }

    fn provision(&mut self, provider: ProviderId, launch: LaunchRequest) {
        // The agent starts with the capacity the engine launched it with
        // (the pool's `worker_capacity`, 1 for ephemeral workers).
        let w = self.new_worker(provider, launch.image.clone(), launch.capacity, false);
        self.workers.insert(launch.worker, w);
        let ok = !self.faults || !self.rng.chance(self.knobs.provision_fail);
        let slow = self.faults && self.rng.chance(self.knobs.slow_provision);
        let d = if slow {
            self.rng
                .millis(0, self.config.provision_timeout.as_millis() as u64 * 3 / 2)
        } else {
            self.rng.millis(10, 2000)
        };
        self.schedule(
            d,
            Ev::ProviderDone {
                worker: launch.worker,
                ok,
            },
        );
    }

    /// Bookkeeping after a step: streams the server closed, jobs whose
    /// stale copy the engine dropped.
    fn after_step(&mut self) -> Result<(), String> {
        let engine = &self.engine;
        self.stale.retain(|id| engine.job(*id).is_some());
        let store = &self.store;
        self.open
            .retain(|id| store.job(*id).is_none_or(|j| !j.is_terminal()));
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            let w = &self.workers[&id];
            if !(w.alive && w.link) {
                continue;
            }
            match self.engine.worker(id) {
                Some(e) if e.connected => {}
                Some(_) if !self.knobs.close_on_timeout => {
                    // The heartbeat timeout disconnected it but, as in the
                    // runtime, its session stays up: its next message
                    // revives it (or it is lost after the grace).
                }
                Some(_) => {
                    // The engine declared the stream dead (heartbeat
                    // timeout): here the server closes it (and says so),
                    // and the agent reconnects.
                    let w = self.workers.get_mut(&id).expect("listed");
                    w.link = false;
                    w.inbox.clear();
                    let frozen = w.frozen_until.is_some();
                    self.engine
                        .handle_disconnected(self.now, id, "stream closed by the server");
                    if !frozen {
                        let d = self.rng.millis(10, 2000);
                        self.schedule(d, Ev::Connect(id));
                    }
                }
                None if w.registered => {
                    return Err(format!(
                        "worker {id} is alive and connected but the engine forgot it without destroying it"
                    ));
                }
                None => {}
            }
        }
        Ok(())
    }

    fn check(&self, next_deadline: Option<Timestamp>) -> Result<(), String> {
        check_next_deadline(next_deadline, self.now)?;
        check_invariants(&self.engine, &self.store, &self.open, &self.stale, self.now)?;
        // No job runs on two reachable workers at once.
        let mut running: BTreeMap<JobId, WorkerId> = BTreeMap::new();
        for (id, w) in &self.workers {
            if !(w.alive && w.link && w.frozen_until.is_none()) {
                continue;
            }
            for (job, run) in &w.running {
                if run.done {
                    continue;
                }
                if let Some(other) = running.insert(*job, *id) {
                    return Err(format!(
                        "job {job} runs on workers {other} and {id} at once"
                    ));
                }
            }
        }
        // The engine persisted every worker change it made.
        for w in self.engine.workers() {
            let Some(saved) = self.store.workers.get(&w.id) else {
                return Err(format!("worker {} was never saved", w.id));
            };
            // Heartbeats are not worth a write: `last_seen` may lag.
            let same = saved.id == w.id
                && saved.state == w.state
                && saved.jobs == w.jobs
                && saved.connected == w.connected
                && saved.capacity == w.capacity
                && saved.reserved_for == w.reserved_for
                && saved.ephemeral == w.ephemeral
                && saved.provider == w.provider
                && saved.image == w.image
                && saved.labels == w.labels;
            if !same {
                return Err(format!("worker {} saved as {saved:?} but is {w:?}", w.id));
            }
        }
        Ok(())
    }

    /// Once every job is terminal: the event log tells each job's story
    /// consistently, and successes were reported by a worker.
    fn final_audit(&self) -> Result<(), String> {
        let mut by_job: BTreeMap<JobId, Vec<&hodei_core::event::DomainEvent>> = BTreeMap::new();
        let mut last_seq = 0;
        for e in &self.store.events {
            if e.sequence <= last_seq {
                return Err("event sequences are not increasing".into());
            }
            last_seq = e.sequence;
            if let Some(j) = e.job_id() {
                by_job.entry(j).or_default().push(e);
            }
        }
        for id in &self.submitted {
            let job = self.store.job(*id).expect("submitted");
            check_attempts(job)?;
            let events: Vec<hodei_core::event::DomainEvent> = by_job
                .get(id)
                .map(|v| v.iter().map(|e| (*e).clone()).collect())
                .unwrap_or_default();
            let types: Vec<&str> = events.iter().map(|e| e.event_type()).collect();
            if types.len() < 3 || types[..2] != ["JobCreated", "JobQueued"] {
                return Err(format!("job {id} has events {types:?}"));
            }
            let derived = derive_state(JobState::Pending, &events);
            if derived != job.state() {
                return Err(format!(
                    "job {id} is {} but its events {types:?} say {derived}",
                    job.state()
                ));
            }
            // A refusal for capacity or a drain gives the attempt back: its
            // JobDispatchFailed is followed by JobQueued in the same attempt.
            for pair in events.windows(2) {
                if let hodei_core::event::EventBody::JobDispatchFailed {
                    attempt, reason, ..
                } = &pair[0].body
                {
                    let given_back = reason.starts_with("worker refused (at_capacity)")
                        || reason.starts_with("worker refused (draining)");
                    let requeued = matches!(
                        pair[1].body,
                        hodei_core::event::EventBody::JobQueued { attempt: a, .. } if a == *attempt
                    );
                    if given_back != requeued {
                        return Err(format!(
                            "job {id}: dispatch failure {reason:?} in attempt {attempt} \
                             followed by {}",
                            pair[1].event_type()
                        ));
                    }
                }
            }
            let started = types.iter().filter(|t| **t == "JobStarted").count() as u32;
            if started > job.attempt {
                return Err(format!(
                    "job {id} started {started} times in {} attempts",
                    job.attempt
                ));
            }
            if job.state() == JobState::Succeeded
                && !self.reported_success.contains(&(job.id, job.attempt))
            {
                return Err(format!(
                    "job {id} succeeded without a worker reporting exit 0"
                ));
            }
        }
        // Without faults, and with workers that exit 0 in time, every job
        // succeeds on its first attempt.
        if self.clean {
            for id in &self.submitted {
                let job = self.store.job(*id).expect("submitted");
                if job.state() != JobState::Succeeded || job.attempt != 1 {
                    return Err(format!(
                        "clean scenario: job {id} ended {} at attempt {}",
                        job.state(),
                        job.attempt
                    ));
                }
            }
        }
        Ok(())
    }
}

fn chrono_of(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).expect("small durations")
}

fn short(effect: &Effect) -> String {
    match effect {
        Effect::CreateJob { job, .. } => format!("CreateJob {}", job.id),
        Effect::UpdateJob {
            job,
            expected_version,
            events,
        } => format!(
            "UpdateJob {} v{expected_version}->{} {} {:?}",
            job.id,
            job.version,
            job.state(),
            events.iter().map(|e| e.event_type()).collect::<Vec<_>>()
        ),
        Effect::Record(events) => format!(
            "Record {:?}",
            events.iter().map(|e| e.event_type()).collect::<Vec<_>>()
        ),
        Effect::SaveWorker(w) => format!("SaveWorker {} {} jobs={:?}", w.id, w.state, w.jobs),
        other => format!("{other:?}"),
    }
}
