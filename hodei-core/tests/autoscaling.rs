//! The engine's autoscaler: warm pools, scaling reusable pools with the
//! queue depth (never past `max_workers`), scaling down idle workers, and
//! the container OOM path of worker exits.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hodei_core::engine::{
    Effect, Engine, EngineConfig, ProviderConfig, Registration, SCALE_DOWN_IDLE, SeededEntropy,
};
use hodei_core::event::EventBody;
use hodei_core::ids::{Actor, CorrelationId, ProviderId, WorkerId};
use hodei_core::job::{FailureKind, Job, JobState, JobStatus};
use hodei_core::ports::{Claim, RequestContext};
use hodei_core::spec::{JobSpec, RawJobSpec, SpecLimits};
use hodei_core::time::{Timestamp, add, from_millis};

/// (provider, queue depth, current, target) of an `AutoScalingTriggered`.
type Scaling = (String, u64, u32, u32);

/// A synchronous shell: effects are recorded; claims hand out the jobs
/// created and not yet claimed.
struct Shell {
    engine: Engine,
    now: Timestamp,
    created: Vec<Job>,
    provisions: Vec<(ProviderId, WorkerId)>,
    /// Capacity each provisioned worker was launched with.
    capacities: BTreeMap<WorkerId, u32>,
    destroyed: Vec<WorkerId>,
    scaling: Vec<Scaling>,
    updates: Vec<Job>,
}

impl Shell {
    fn new(providers: Vec<ProviderConfig>) -> Shell {
        let config = EngineConfig {
            provider_preference: providers.iter().map(|p| p.id.clone()).collect(),
            ..EngineConfig::default()
        };
        Shell {
            engine: Engine::new(config, providers, Box::new(SeededEntropy::new(7))),
            now: from_millis(1_000_000),
            created: Vec::new(),
            provisions: Vec::new(),
            capacities: BTreeMap::new(),
            destroyed: Vec::new(),
            scaling: Vec::new(),
            updates: Vec::new(),
        }
    }

    /// Lets `d` pass in steps of at most 5 s, connected workers
    /// heartbeating and the engine ticking at each.
    fn advance(&mut self, d: Duration) {
        let mut left = d;
        while !left.is_zero() {
            let step = left.min(Duration::from_secs(5));
            left -= step;
            self.now = add(self.now, step);
            let connected: Vec<WorkerId> = self
                .engine
                .workers()
                .filter(|w| w.connected)
                .map(|w| w.id)
                .collect();
            for w in connected {
                self.engine.handle_heartbeat(self.now, w);
            }
            self.tick();
        }
    }

    fn tick(&mut self) {
        self.engine.handle_tick(self.now);
        self.pump();
    }

    fn depth(&mut self, depth: u64) {
        self.engine.handle_queue_depth(self.now, depth);
        self.pump();
    }

    fn pump(&mut self) {
        while let Some(effect) = self.engine.poll_effect() {
            match effect {
                Effect::CreateJob { job, .. } => self.created.push(job),
                Effect::Claim { limit, .. } => {
                    let n = limit.min(self.created.len());
                    let jobs: Vec<Job> = self.created.drain(..n).collect();
                    self.engine.handle_claimed(
                        self.now,
                        Some(Claim {
                            jobs,
                            next_ready_at: None,
                        }),
                        limit,
                    );
                }
                Effect::Provision { provider, launch } => {
                    self.capacities.insert(launch.worker, launch.capacity);
                    self.provisions.push((provider, launch.worker));
                }
                Effect::DestroyWorker { worker, .. } => self.destroyed.push(worker),
                Effect::Record(events) => {
                    for e in events {
                        if let EventBody::AutoScalingTriggered {
                            provider,
                            queue_depth,
                            current,
                            target,
                        } = e.body
                        {
                            self.scaling
                                .push((provider.to_string(), queue_depth, current, target));
                        }
                    }
                }
                Effect::UpdateJob { job, .. } => self.updates.push(job),
                Effect::Release(job) => {
                    // Back in the queue: claimable again.
                    if let Some(j) = self.updates.iter().rev().find(|j| j.id == job) {
                        self.created.push(j.clone());
                    }
                }
                _ => {}
            }
        }
    }

    /// Every provisioned worker registers.
    fn register_all(&mut self) {
        let pending: Vec<(ProviderId, WorkerId)> = self
            .provisions
            .iter()
            .filter(|(_, w)| {
                self.engine
                    .worker(*w)
                    .is_some_and(|w| !w.connected && !w.state.is_terminal())
            })
            .cloned()
            .collect();
        for (provider, worker) in pending {
            self.engine.handle_provisioned(self.now, worker);
            self.engine
                .handle_registered(
                    self.now,
                    Registration {
                        worker,
                        provider,
                        labels: BTreeMap::new(),
                        image: None,
                        capacity: self.capacities[&worker],
                        running: Vec::new(),
                    },
                    Vec::new(),
                )
                .expect("registered");
            self.pump();
        }
    }

    fn live(&self, provider: &str) -> usize {
        self.engine
            .workers()
            .filter(|w| w.provider.as_str() == provider)
            .count()
    }
}

fn pool(id: &str, warm_pool: u32, max_workers: u32) -> ProviderConfig {
    ProviderConfig {
        min_workers: 0,
        id: ProviderId::new(id),
        kind: "docker".into(),
        runs_images: true,
        max_workers,
        warm_pool,
        ephemeral: false,
        default_image: Some("hodei-worker:latest".into()),
        worker_capacity: 1,
    }
}

#[test]
fn the_warm_pool_is_filled_at_start() {
    let mut shell = Shell::new(vec![pool("pool", 2, 4)]);
    shell.tick();
    assert_eq!(shell.provisions.len(), 2);
    assert_eq!(shell.scaling, [("pool".into(), 0, 0, 2)]);
    // Filled: nothing more while nothing changes.
    shell.register_all();
    shell.advance(Duration::from_secs(1));
    shell.tick();
    assert_eq!(shell.provisions.len(), 2);
    assert_eq!(shell.scaling.len(), 1);
}

#[test]
fn queue_depth_scales_a_reusable_pool_up_to_max_and_never_past_it() {
    let mut shell = Shell::new(vec![pool("pool", 1, 3)]);
    shell.tick();
    assert_eq!(shell.live("pool"), 1);
    shell.depth(10);
    assert_eq!(shell.live("pool"), 3, "scaled up to max_workers");
    assert_eq!(shell.scaling.last(), Some(&("pool".into(), 10, 1, 3)));
    let provisioned = shell.provisions.len();

    // Whatever the depth and however time passes: never past max.
    let depths = [0u64, 1, 50, 3, 1000, 0, 7, u64::MAX, 2, 0];
    for (i, depth) in depths.iter().cycle().take(200).enumerate() {
        shell.advance(Duration::from_millis(700));
        if i % 3 == 0 {
            shell.register_all();
        }
        shell.depth(*depth);
        shell.tick();
        assert!(shell.live("pool") <= 3, "step {i}: {}", shell.live("pool"));
        for (_, _, current, target) in &shell.scaling {
            assert!(*current <= 3 && *target <= 3, "{:?}", shell.scaling);
        }
    }
    assert!(shell.provisions.len() >= provisioned);
}

#[test]
fn idle_workers_beyond_the_target_are_retired_after_the_idle_time() {
    let mut shell = Shell::new(vec![pool("pool", 1, 3)]);
    shell.tick();
    shell.depth(5);
    shell.register_all();
    assert_eq!(shell.live("pool"), 3);

    // The queue empties: idle workers are kept for SCALE_DOWN_IDLE first.
    shell.depth(0);
    shell.advance(SCALE_DOWN_IDLE / 2);
    shell.tick();
    assert!(shell.destroyed.is_empty());
    assert_eq!(shell.live("pool"), 3);
    shell.advance(SCALE_DOWN_IDLE);
    shell.tick();
    assert_eq!(shell.destroyed.len(), 2, "down to the warm pool");
    assert_eq!(shell.live("pool"), 1);
    assert_eq!(shell.scaling.last(), Some(&("pool".into(), 0, 3, 1)));
    // And stays there.
    shell.advance(SCALE_DOWN_IDLE * 2);
    shell.tick();
    assert_eq!(shell.live("pool"), 1);
    assert_eq!(shell.destroyed.len(), 2);
}

#[test]
fn min_workers_are_kept_whatever_the_load() {
    // No warm pool: only `min_workers` keeps workers alive.
    let mut config = pool("pool", 0, 4);
    config.min_workers = 2;
    let mut shell = Shell::new(vec![config]);
    shell.tick();
    assert_eq!(shell.live("pool"), 2, "filled to min_workers at start");
    assert_eq!(shell.scaling, [("pool".into(), 0, 0, 2)]);
    shell.register_all();

    // Up with the queue, to max_workers.
    shell.depth(10);
    shell.register_all();
    assert_eq!(shell.live("pool"), 4);

    // The queue empties and time passes: back down to min_workers, not
    // below it.
    shell.depth(0);
    for _ in 0..4 {
        shell.advance(SCALE_DOWN_IDLE * 2);
        shell.tick();
    }
    assert_eq!(shell.live("pool"), 2);
    assert_eq!(shell.destroyed.len(), 2);
    assert_eq!(shell.scaling.last(), Some(&("pool".into(), 0, 4, 2)));

    // An ephemeral provider keeps its min_workers (reusable) too.
    let mut eph = ProviderConfig::ephemeral("eph", "docker", true, 4);
    eph.min_workers = 1;
    let mut shell = Shell::new(vec![eph]);
    shell.tick();
    assert_eq!(shell.live("eph"), 1);
}

#[test]
fn a_pool_of_multi_job_workers_scales_by_slots_not_by_jobs() {
    let mut config = pool("pool", 1, 8);
    config.worker_capacity = 4;
    let mut shell = Shell::new(vec![config]);
    shell.tick();
    assert_eq!(shell.live("pool"), 1);
    shell.register_all();
    // 10 jobs waiting, one idle worker: 3 workers of 4 slots for them
    // (not 10), plus the warm one.
    shell.depth(10);
    assert_eq!(shell.live("pool"), 4);
    assert_eq!(shell.scaling.last(), Some(&("pool".into(), 10, 1, 4)));
    assert!(
        shell.capacities.values().all(|c| *c == 4),
        "{:?}",
        shell.capacities
    );
    shell.register_all();

    // Retire back to the warm worker once idle.
    shell.depth(0);
    shell.advance(SCALE_DOWN_IDLE * 2);
    shell.tick();
    assert_eq!(shell.live("pool"), 1);

    // One job runs on the warm worker: its 3 free slots take the next 3
    // waiting jobs, so only the warm pool is topped up.
    let ctx = RequestContext {
        correlation_id: CorrelationId::new("c-slots"),
        actor: Actor::new("tester"),
    };
    let job = shell
        .engine
        .handle_submit(shell.now, job_spec("pool"), &ctx)
        .expect("submitted");
    shell.pump();
    shell.engine.handle_queue_hint();
    shell.pump();
    let busy = shell
        .engine
        .workers()
        .find(|w| w.jobs.contains(&job))
        .map(|w| (w.id, w.free_slots()))
        .expect("the job is on the warm worker");
    assert_eq!(busy.1, 3);
    let before = shell.provisions.len();
    shell.depth(3);
    shell.tick();
    assert_eq!(
        shell.provisions.len(),
        before + 1,
        "only a new warm worker: the busy one has room for the 3 waiting"
    );
    shell.register_all();
    // Two more than its free slots: one more worker.
    shell.depth(5);
    shell.tick();
    assert_eq!(shell.provisions.len(), before + 2);
}

/// `n` jobs submitted at once, claimed by the engine.
fn submit_burst(shell: &mut Shell, specs: Vec<JobSpec>) -> Vec<hodei_core::ids::JobId> {
    let ctx = RequestContext {
        correlation_id: CorrelationId::new("c-burst"),
        actor: Actor::new("tester"),
    };
    let ids = specs
        .into_iter()
        .map(|spec| {
            shell
                .engine
                .handle_submit(shell.now, spec, &ctx)
                .expect("submitted")
        })
        .collect();
    shell.pump();
    shell.engine.handle_queue_hint();
    shell.pump();
    ids
}

#[test]
fn a_burst_on_multi_job_workers_starts_one_worker_per_capacity_jobs() {
    let mut config = pool("pool", 0, 8);
    config.worker_capacity = 4;
    let mut shell = Shell::new(vec![config]);
    shell.tick();
    assert_eq!(shell.live("pool"), 0);
    // 10 jobs like each other, no worker yet: 3 workers (4 + 4 + 2), not
    // one per job, each launched with 4 slots.
    let ids = submit_burst(&mut shell, (0..10).map(|_| job_spec("pool")).collect());
    assert_eq!(shell.provisions.len(), 3, "{:?}", shell.provisions);
    assert!(shell.capacities.values().all(|c| *c == 4));
    let scheduled_on = |shell: &Shell, id| match shell.engine.job(id).map(|j| &j.status) {
        Some(JobStatus::Scheduled { worker, .. }) => Some(*worker),
        _ => None,
    };
    let mut per_worker: BTreeMap<WorkerId, usize> = BTreeMap::new();
    let mut waited_for = BTreeMap::new();
    for id in &ids {
        let w = scheduled_on(&shell, *id).expect("every job waits for a worker");
        *per_worker.entry(w).or_default() += 1;
        waited_for.insert(*id, w);
    }
    let mut counts: Vec<usize> = per_worker.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts, [2, 4, 4]);
    // Registered, each worker takes all the jobs that waited for it.
    shell.register_all();
    for id in &ids {
        let job = shell.engine.job(*id).expect("job");
        assert_eq!(job.state(), JobState::Assigned, "{job:?}");
        assert_eq!(job.status.worker(), Some(waited_for[id]), "{job:?}");
    }
    for w in shell.engine.workers() {
        assert!(w.jobs.len() <= 4, "{w:?}");
    }

    // Jobs that differ (here the memory limit of the worker's container)
    // do not share a starting worker.
    let mut shell = Shell::new(vec![{
        let mut c = pool("pool", 0, 8);
        c.worker_capacity = 4;
        c
    }]);
    shell.tick();
    let big = JobSpec::parse(
        RawJobSpec {
            command: Some(vec!["true".into()]),
            provider: Some("pool".into()),
            resources: Some(hodei_core::spec::RawResources {
                cpu: None,
                memory_mb: Some(512),
            }),
            ..Default::default()
        },
        &SpecLimits::default(),
    )
    .expect("valid spec");
    submit_burst(
        &mut shell,
        vec![job_spec("pool"), big.clone(), job_spec("pool"), big],
    );
    assert_eq!(shell.provisions.len(), 2, "{:?}", shell.provisions);
}

/// A multi-job worker's container killed for memory: its limit was
/// shared, so neither job is blamed; both fail as lost and are retried.
#[test]
fn an_oom_killed_worker_running_several_jobs_fails_them_as_lost_and_retries() {
    let mut config = pool("pool", 0, 4);
    config.worker_capacity = 2;
    let mut shell = Shell::new(vec![config]);
    shell.tick();
    let ids = submit_burst(&mut shell, vec![job_spec("pool"), job_spec("pool")]);
    assert_eq!(shell.provisions.len(), 1, "one worker for both");
    let (_, worker) = shell.provisions[0].clone();
    shell.register_all();
    for id in &ids {
        let attempt = shell.engine.job(*id).expect("owned").attempt;
        shell
            .engine
            .handle_ack(shell.now, worker, *id, attempt)
            .expect("ack");
    }
    shell.pump();
    shell.engine.handle_worker_exit(
        shell.now,
        worker,
        "container hodei-worker-x exited with code 137 (out of memory: limit 64 MiB)",
        true,
    );
    shell.pump();
    for id in &ids {
        let last = shell
            .updates
            .iter()
            .rev()
            .find(|j| j.id == *id)
            .expect("an update");
        assert_eq!(last.state(), JobState::Pending, "retried: {last:?}");
        assert_eq!(last.attempt, 2, "{last:?}");
        let first = &last.attempts[0];
        let hodei_core::job::AttemptOutcome::Failed { failure } = &first.outcome else {
            panic!("{first:?}")
        };
        assert_eq!(failure.kind, FailureKind::WorkerLost, "{failure:?}");
        assert!(failure.message.contains("OOM"), "{failure:?}");
        assert!(failure.message.contains("running 2 jobs"), "{failure:?}");
    }
}

#[test]
fn ephemeral_workers_run_one_job_whatever_the_capacity_says() {
    let mut eph = ProviderConfig::ephemeral("eph", "docker", true, 4);
    eph.worker_capacity = 8;
    eph.min_workers = 1;
    assert_eq!(eph.capacity_per_worker(), 1);
    let mut shell = Shell::new(vec![eph]);
    shell.tick();
    assert_eq!(shell.capacities.values().copied().collect::<Vec<_>>(), [1]);
}

#[test]
fn ephemeral_providers_do_not_scale_with_the_queue() {
    let mut shell = Shell::new(vec![ProviderConfig::ephemeral("docker", "docker", true, 4)]);
    shell.tick();
    shell.depth(20);
    shell.tick();
    assert!(shell.provisions.is_empty());
    assert!(shell.scaling.is_empty());
}

#[test]
fn an_unhealthy_provider_is_not_scaled() {
    let mut shell = Shell::new(vec![pool("pool", 2, 4)]);
    shell
        .engine
        .handle_provider_health(shell.now, &ProviderId::new("pool"), false, "engine down");
    shell.depth(3);
    shell.tick();
    assert!(shell.provisions.is_empty());
    assert!(shell.scaling.is_empty());
}

fn job_spec(provider: &str) -> JobSpec {
    JobSpec::parse(
        RawJobSpec {
            command: Some(vec!["true".into()]),
            provider: Some(provider.into()),
            max_attempts: Some(3),
            ..Default::default()
        },
        &SpecLimits::default(),
    )
    .expect("valid spec")
}

#[test]
fn a_worker_killed_for_its_memory_limit_fails_its_job_as_oom_killed() {
    let mut shell = Shell::new(vec![ProviderConfig::ephemeral("docker", "docker", true, 4)]);
    shell.tick();
    let ctx = RequestContext {
        correlation_id: CorrelationId::new("c-oom"),
        actor: Actor::new("tester"),
    };
    let job = shell
        .engine
        .handle_submit(shell.now, job_spec("docker"), &ctx)
        .expect("submitted");
    shell.pump();
    shell.engine.handle_queue_hint();
    shell.pump();
    let (_, worker) = shell.provisions[0].clone();
    shell.register_all();
    let attempt = shell.engine.job(job).expect("owned").attempt;
    shell
        .engine
        .handle_ack(shell.now, worker, job, attempt)
        .expect("ack");
    shell.pump();
    shell.engine.handle_worker_exit(
        shell.now,
        worker,
        "container hodei-worker-x exited with code 137 (out of memory: limit 16 MiB)",
        true,
    );
    shell.pump();
    let last = shell
        .updates
        .iter()
        .rev()
        .find(|j| j.id == job)
        .expect("an update");
    assert_eq!(last.state(), JobState::Failed, "not retried: {last:?}");
    let JobStatus::Failed { failure } = &last.status else {
        panic!("{last:?}")
    };
    assert_eq!(failure.kind, FailureKind::OomKilled);
    assert!(failure.message.contains("OOM"), "{failure:?}");
    assert!(failure.message.contains("limit 16 MiB"), "{failure:?}");
    let _: BTreeSet<WorkerId> = shell.destroyed.iter().copied().collect();
}

#[test]
fn a_provider_config_names_its_capacity_only_when_above_one() {
    // Records written before `worker_capacity` existed compare equal to
    // today's form of the same configuration (no ProviderUpdated on
    // upgrade), and the field reads back.
    let one = ProviderConfig::ephemeral("p", "local", false, 2);
    let json = serde_json::to_value(&one).expect("json");
    assert!(json.get("worker_capacity").is_none(), "{json}");
    let back: ProviderConfig = serde_json::from_value(json).expect("back");
    assert_eq!(back, one);
    let mut four = pool("p", 0, 2);
    four.worker_capacity = 4;
    let json = serde_json::to_value(&four).expect("json");
    assert_eq!(json["worker_capacity"], 4, "{json}");
    assert_eq!(
        serde_json::from_value::<ProviderConfig>(json).expect("back"),
        four
    );
}
