//! How fast the engine decides, on one core.
//!
//! A full job lifecycle is: submit -> claim -> place on an idle registered
//! worker -> dispatch -> acknowledge -> succeed, with every effect drained
//! (the "store" here only carries jobs from `CreateJob` to the next
//! `Claim`). The figures:
//! - lifecycles per second, over a long run without per-call timing;
//! - the median (and p99) cost of one decision: one `handle_*` call plus
//!   draining its effects, timed call by call.
//!
//! ```sh
//! cargo bench -p hodei-core --bench engine
//! HODEI_BENCH_LIFECYCLES=2000000 HODEI_BENCH_WORKERS=256 cargo bench -p hodei-core --bench engine
//! ```

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use hodei_core::engine::{
    AttemptReport, Effect, Engine, EngineConfig, ProviderConfig, Registration, SeededEntropy,
};
use hodei_core::ids::{Actor, CorrelationId, JobId, ProviderId, WorkerId};
use hodei_core::job::Job;
use hodei_core::ports::{Claim, RequestContext};
use hodei_core::spec::{JobSpec, RawJobSpec, SpecLimits};
use hodei_core::time::{Timestamp, add};

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // and only wants to know that this runs: keep that short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let lifecycles = env(
        "HODEI_BENCH_LIFECYCLES",
        if quick { 2_000 } else { 500_000 },
    );
    let workers = env("HODEI_BENCH_WORKERS", 64) as u32;
    let rounds = if quick { 1 } else { 5 };

    println!("hodei-core engine benchmark: {workers} idle workers, one core");
    let timer = timer_overhead();
    for (kind, spec) in [("typical", typical_spec()), ("minimal", minimal_spec())] {
        println!();
        println!(
            "{kind} spec: {}",
            serde_json::to_string(&spec).expect("json")
        );
        // Warm up (allocator, caches, branch predictors).
        let _ = run_lifecycles(workers, &spec, lifecycles / 10 + 1);
        let mut rates = Vec::new();
        let mut cpu_rates = Vec::new();
        for _ in 0..rounds {
            let cpu = thread_cpu();
            let (n, elapsed) = run_lifecycles(workers, &spec, lifecycles);
            rates.push(n as f64 / elapsed.as_secs_f64());
            if let (Some(before), Some(after)) = (cpu, thread_cpu()) {
                cpu_rates.push(n as f64 / (after - before).as_secs_f64());
            }
        }
        rates.sort_by(f64::total_cmp);
        cpu_rates.sort_by(f64::total_cmp);
        let wall = rates[rates.len() / 2];
        println!(
            "  lifecycles/s, wall clock:          {wall:>8.0}  (median of {rounds} runs of {lifecycles}; min {:.0}, max {:.0})",
            rates[0],
            rates[rates.len() - 1]
        );
        // The machine may be shared: the thread's own CPU time says what
        // one core does when nobody takes it away.
        let cpu = cpu_rates.get(cpu_rates.len() / 2).copied();
        if let Some(r) = cpu {
            println!(
                "  lifecycles/s, per CPU-second:      {r:>8.0}  (min {:.0}, max {:.0})",
                cpu_rates[0],
                cpu_rates[cpu_rates.len() - 1]
            );
        }
        let mut costs = time_decisions(workers, &spec, lifecycles.min(200_000));
        for (name, samples) in &mut costs {
            samples.sort_unstable();
            let p = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
            println!(
                "  decision {name:<14} median {:>6} ns  p99 {:>7} ns",
                p(0.5),
                p(0.99),
            );
        }
        let mut all: Vec<u64> = costs.into_iter().flat_map(|(_, s)| s).collect();
        all.sort_unstable();
        println!(
            "  decision (any)          median {:>6} ns  ({} decisions; clock reads ~{timer} ns included)",
            all[all.len() / 2],
            all.len()
        );
        let one_core = cpu.unwrap_or(wall).max(wall);
        println!(
            "  goal >= 200000 lifecycles/s on one core: {}",
            if one_core >= 200_000.0 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
}

/// A spec as CI systems send them: a name, a shell command, an env
/// variable, a label, a timeout and retries.
fn typical_spec() -> JobSpec {
    JobSpec::parse(
        RawJobSpec {
            name: Some("build".into()),
            command: Some(vec!["sh".into(), "-c".into(), "make test".into()]),
            env: BTreeMap::from([("CI".to_owned(), "1".to_owned())]),
            labels: BTreeMap::from([("team".to_owned(), "ci".to_owned())]),
            timeout_secs: Some(600),
            max_attempts: Some(3),
            ..Default::default()
        },
        &SpecLimits::default(),
    )
    .expect("valid spec")
}

/// The least a spec can say: a one-word command.
fn minimal_spec() -> JobSpec {
    JobSpec::parse(
        RawJobSpec {
            command: Some(vec!["true".into()]),
            ..Default::default()
        },
        &SpecLimits::default(),
    )
    .expect("valid spec")
}

/// CPU time this thread has run, from the scheduler's own accounting
/// (`/proc/thread-self/schedstat`, nanoseconds), when available.
fn thread_cpu() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// Median cost of the two clock reads around a timed decision.
fn timer_overhead() -> u64 {
    let mut samples: Vec<u64> = (0..100_000)
        .map(|_| {
            let t = Instant::now();
            black_box(());
            t.elapsed().as_nanos() as u64
        })
        .collect();
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// An engine with `workers` idle registered workers of one pool provider.
struct Bench {
    engine: Engine,
    now: Timestamp,
    spec: JobSpec,
    ctx: RequestContext,
    /// Jobs created and not claimed yet (the queue).
    queued: Vec<Job>,
    /// Dispatched attempts waiting for their ack and result.
    dispatched: Vec<(WorkerId, JobId, u32)>,
    /// A claim the engine asked for, answered as a decision of its own.
    claim: Option<usize>,
}

impl Bench {
    fn new(workers: u32, spec: &JobSpec) -> Self {
        let config = EngineConfig::default();
        let pool = ProviderConfig {
            min_workers: 0,
            ephemeral: false,
            ..ProviderConfig::ephemeral("pool", "local", false, workers)
        };
        let mut engine = Engine::new(config, vec![pool], Box::new(SeededEntropy::new(1)));
        let now = hodei_core::time::from_millis(1_700_000_000_000);
        for n in 0..workers {
            let reg = Registration {
                worker: WorkerId::from_u64_pair(0xBE7C, u64::from(n)),
                provider: ProviderId::new("pool"),
                labels: BTreeMap::new(),
                image: None,
                capacity: 1,
                running: Vec::new(),
            };
            engine
                .handle_registered(now, reg, Vec::new())
                .expect("fresh worker");
        }
        let spec = spec.clone();
        let mut bench = Self {
            engine,
            now,
            spec,
            ctx: RequestContext {
                correlation_id: CorrelationId::new("bench-request"),
                actor: Actor::new("user:bench"),
            },
            queued: Vec::new(),
            dispatched: Vec::new(),
            claim: None,
        };
        bench.drain();
        bench.claim();
        bench
    }

    /// Carries out the effects: what a shell does, minus the IO.
    fn drain(&mut self) {
        while let Some(effect) = self.engine.poll_effect() {
            match effect {
                Effect::CreateJob { job, events } => {
                    black_box(&events);
                    self.queued.push(job);
                }
                Effect::Claim { limit, .. } => self.claim = Some(limit),
                Effect::Dispatch { worker, job } => {
                    self.dispatched.push((worker, job.id, job.attempt));
                }
                other => {
                    black_box(other);
                }
            }
        }
    }

    /// Answers the engine's claim, if it asked: the queue's jobs, up to
    /// the limit.
    fn claim(&mut self) -> bool {
        let Some(limit) = self.claim.take() else {
            return false;
        };
        let n = limit.min(self.queued.len());
        let jobs: Vec<Job> = self.queued.drain(..n).collect();
        self.engine.handle_claimed(
            self.now,
            Some(Claim {
                jobs,
                next_ready_at: None,
            }),
            limit,
        );
        self.drain();
        true
    }

    fn tick_clock(&mut self) {
        self.now = add(self.now, Duration::from_micros(100));
    }

    fn submit(&mut self) {
        self.tick_clock();
        let id = self
            .engine
            .handle_submit(self.now, self.spec.clone(), &self.ctx)
            .expect("valid spec");
        black_box(id);
        self.drain();
    }

    fn ack(&mut self, (worker, job, attempt): (WorkerId, JobId, u32)) {
        self.tick_clock();
        self.engine
            .handle_ack(self.now, worker, job, attempt)
            .expect("assigned");
        self.drain();
    }

    fn succeed(&mut self, (worker, job, attempt): (WorkerId, JobId, u32)) {
        self.tick_clock();
        let report = AttemptReport {
            exit_code: Some(0),
            ..AttemptReport::default()
        };
        self.engine
            .handle_result(self.now, worker, job, attempt, report)
            .expect("running");
        self.drain();
    }
}

/// Runs `n` full lifecycles, one after the other, and times them.
fn run_lifecycles(workers: u32, spec: &JobSpec, n: u64) -> (u64, Duration) {
    let mut b = Bench::new(workers, spec);
    let start = Instant::now();
    for _ in 0..n {
        b.submit();
        b.claim();
        let attempt = b.dispatched.pop().expect("placed on an idle worker");
        b.ack(attempt);
        b.succeed(attempt);
        b.claim();
    }
    let elapsed = start.elapsed();
    assert!(b.engine.jobs().next().is_none(), "every job finished");
    assert!(b.queued.is_empty() && b.dispatched.is_empty());
    (n, elapsed)
}

/// Times each decision of `n` lifecycles separately.
fn time_decisions(workers: u32, spec: &JobSpec, n: u64) -> Vec<(&'static str, Vec<u64>)> {
    let mut b = Bench::new(workers, spec);
    let (mut submit, mut place, mut ack, mut result, mut empty) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let ns = |t: Instant| t.elapsed().as_nanos() as u64;
    for _ in 0..n {
        let t = Instant::now();
        b.submit();
        submit.push(ns(t));
        let t = Instant::now();
        b.claim();
        place.push(ns(t));
        let attempt = b.dispatched.pop().expect("placed");
        let t = Instant::now();
        b.ack(attempt);
        ack.push(ns(t));
        let t = Instant::now();
        b.succeed(attempt);
        result.push(ns(t));
        let t = Instant::now();
        if b.claim() {
            empty.push(ns(t));
        }
    }
    vec![
        ("submit", submit),
        ("claimed+place", place),
        ("ack", ack),
        ("result", result),
        ("empty claim", empty),
    ]
}
