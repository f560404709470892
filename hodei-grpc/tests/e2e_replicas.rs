//! Two `hodei-server` replicas on one PostgreSQL database, each with its
//! own local provider (a warm pool of reusable `hodei-worker` agents),
//! over real processes:
//!
//! - 2,000 jobs submitted to both each run exactly once per attempt (a
//!   ledger the jobs write themselves has one complete run per job) and
//!   all succeed;
//! - one replica SIGKILLed in the middle of 2,000 jobs: its agents fail
//!   over to the other (through a proxy, as behind a load balancer), which
//!   adopts them and finishes every job;
//! - the same with no way for its agents to reach the other: the survivor
//!   takes the deadline sweep over (which it never ran while the first
//!   replica lived) and decides every job the dead replica held by its
//!   deadline.
//!
//! The tests of this file run one at a time (they load the machine). Each
//! has a database of its own; without `HODEI_TEST_DATABASE_URL` they print
//! a notice and pass, except under `CI=true`.

mod e2e_support;
mod pg_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use e2e_support::{Client, payload, wait_for};
use futures::StreamExt;
use hodei_grpc::proto;
use pg_support::*;
use proto::JobState;

/// One heavy test at a time.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn test_dir() -> tempfile::TempDir {
    let keep = std::env::var_os("HODEI_E2E_KEEP").is_some();
    let dir = tempfile::Builder::new()
        .prefix("hodei-e2e-replicas-")
        .disable_cleanup(keep)
        .tempdir()
        .unwrap();
    if keep {
        eprintln!("test dir: {}", dir.path().display());
    }
    dir
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

/// Two replica specs on one database: `r1` and `r2`, each with a warm
/// pool of 4 reusable agents, and an advertised URL when given.
fn replica_specs(
    db: &str,
    dir: &std::path::Path,
    id: &str,
    ports: [u16; 2],
    advertise: [Option<String>; 2],
) -> [ReplicaSpec; 2] {
    let mk = |n: usize| {
        let server_id = format!("r{}-{id}", n + 1);
        let mut spec = ReplicaSpec {
            server_id: server_id.clone(),
            database_url: db.to_owned(),
            port: ports[n],
            dir: dir.join(format!("r{}", n + 1)),
            toml: String::new(),
        };
        let advertise = advertise[n]
            .as_ref()
            .map(|u| format!("advertise_url = \"{u}\"\n"))
            .unwrap_or_default();
        spec.toml = format!(
            r#"server_id = "{server_id}"
{advertise}drain_grace = "5s"

[[providers]]
kind = "local"
name = "local"
state_dir = "{state}"
max_workers = 4
warm_pool = 4
ephemeral = false

[engine]
provision_timeout = "20s"
dispatch_timeout = "5s"
heartbeat_timeout = "5s"
reconnect_grace = "10s"
claim_interval = "100ms"
claim_lease = "5s"
retry_base = "200ms"
retry_cap = "1s"
retry_jitter = 0.0

[runtime]
heartbeat_interval = "1s"
health_interval = "2s"
reconcile_interval = "5s"
"#,
            state = spec.state_dir().display()
        );
        spec
    };
    [mk(0), mk(1)]
}

/// Submits `specs` alternately to the two clients, `parallel` at a time;
/// the ids in submission order.
async fn submit_all(
    clients: &[Client; 2],
    specs: Vec<proto::JobSpec>,
    parallel: usize,
) -> Vec<String> {
    let calls = specs.into_iter().enumerate().map(|(i, spec)| {
        let client = clients[i % 2].clone();
        async move {
            submit_retrying(&client, &spec, Duration::from_secs(60))
                .await
                .unwrap_or_else(|| panic!("submission {i} never acknowledged"))
                .job_id
        }
    });
    futures::stream::iter(calls)
        .buffered(parallel)
        .collect()
        .await
}

/// Counts of the terminal event types.
async fn terminal_counts(client: &Client) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for t in ["JobSucceeded", "JobFailed", "JobTimedOut", "JobCancelled"] {
        out.insert(t, count_events(client, t).await);
    }
    out
}

/// (job, attempt) -> number of `JobStarted`, and the worker of each.
async fn starts(client: &Client) -> (BTreeMap<(String, u64), usize>, Vec<(String, String)>) {
    let mut per_attempt = BTreeMap::new();
    let mut workers = Vec::new();
    for e in events_of_type(client, "JobStarted").await {
        let p = payload(&e);
        let job = p["job_id"].as_str().expect("job_id").to_owned();
        let attempt = p["attempt"].as_u64().expect("attempt");
        let worker = p["worker_id"].as_str().expect("worker_id").to_owned();
        *per_attempt.entry((job.clone(), attempt)).or_default() += 1;
        workers.push((job, worker));
    }
    (per_attempt, workers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_run_2000_jobs_each_exactly_once() {
    let _one_at_a_time = HEAVY.lock().await;
    let Some(db) = test_db().await else { return };
    let dir = test_dir();
    let id = short_id();
    let marker = format!("E2E_REPLICAS_RUN={id}");
    let ledger = dir.path().join("ledger");
    let specs = replica_specs(
        &db.url,
        dir.path(),
        &id,
        [free_port(), free_port()],
        [None, None],
    );
    let mut replicas = [Replica::start(&specs[0]), Replica::start(&specs[1])];
    let clients = [replicas[0].client().await, replicas[1].client().await];

    // Each job records its run in the ledger (start and end, with its
    // attempt and pid) and does nothing else.
    const JOBS: usize = 2_000;
    let started = Instant::now();
    let jobs: Vec<proto::JobSpec> = (0..JOBS)
        .map(|i| {
            let mut job = ledger_job(&ledger, "0", &marker, &format!("{id}-{i}"));
            job.max_attempts = Some(3);
            job.timeout_secs = Some(120);
            job
        })
        .collect();
    let ids = submit_all(&clients, jobs, 32).await;
    let submitted_in = started.elapsed();
    let counts = wait_for("2,000 jobs to end", Duration::from_secs(300), || async {
        let c = terminal_counts(&clients[0]).await;
        (c.values().sum::<u64>() >= JOBS as u64).then_some(c)
    })
    .await;
    let ran_in = started.elapsed();

    // Each attempt started exactly once, each job once (no retry needed);
    // every job's events carry its correlation id and an actor, and end
    // with one terminal event.
    let ends = check_events_bulk(&clients[1], &ids).await;
    assert_eq!(ends.get("JobSucceeded"), Some(&JOBS), "{ends:?}");
    let (per_attempt, workers) = starts(&clients[1]).await;
    assert!(per_attempt.values().all(|n| *n == 1));
    assert_eq!(per_attempt.len(), JOBS, "one attempt each");
    assert_eq!(counts["JobSucceeded"], JOBS as u64, "{counts:?}");
    // Each job ran exactly once, to its end, as its one attempt, on one
    // process: the ledger the jobs wrote themselves has one complete run
    // per job and none more; every decision has its event (check_jobs).
    let finals = wait_all_terminal_listed(&clients[0], &ids, Duration::from_secs(60)).await;
    let by_state = check_jobs(&clients[1], &finals, Some(&ledger)).await;
    assert_eq!(
        by_state.get("JOB_STATE_SUCCEEDED"),
        Some(&JOBS),
        "every job SUCCEEDED: {by_state:?}"
    );
    let runs = read_ledger(&ledger);
    assert_eq!(runs.len(), JOBS, "one run per job in the ledger");
    assert!(
        runs.iter().all(|r| r.attempt == 1 && r.end_ns.is_some()),
        "runs that are not a complete first attempt: {:?}",
        runs.iter()
            .filter(|r| r.attempt != 1 || r.end_ns.is_none())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        runs.iter().map(|r| r.job.as_str()).collect::<BTreeSet<_>>(),
        ids.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        "the ledger's jobs are the submitted ones"
    );
    // Both replicas did a share of the work, on their own agents.
    let pools = [
        workers_in(&specs[0].state_dir()),
        workers_in(&specs[1].state_dir()),
    ];
    let share: Vec<usize> = pools
        .iter()
        .map(|pool| workers.iter().filter(|(_, w)| pool.contains(w)).count())
        .collect();
    assert_eq!(
        share.iter().sum::<usize>(),
        JOBS,
        "every job ran on an agent of a replica"
    );
    assert!(share.iter().all(|n| *n > 0), "shares {share:?}");
    eprintln!(
        "two replicas: {JOBS} jobs submitted in {:.1}s, all ended after {:.1}s ({:.0} jobs/s end to end), \
         shares {share:?}, checked after {:.1}s",
        submitted_in.as_secs_f64(),
        ran_in.as_secs_f64(),
        JOBS as f64 / ran_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    for r in &replicas {
        let log = r.log();
        assert!(!log.contains("panicked"), "{}", tail(&log, 40));
    }
    for r in &mut replicas {
        r.stop();
    }
    kill_leftovers(&[specs[0].state_dir(), specs[1].state_dir()], &marker);
}

/// Kills replica 1 mid-run; `failover`: its agents reach replica 2
/// through a proxy.
async fn a_replica_dies_mid_run(failover: bool) {
    let _one_at_a_time = HEAVY.lock().await;
    let Some(db) = test_db().await else { return };
    let dir = test_dir();
    let id = short_id();
    let marker = format!("E2E_REPLICAS_RUN={id}");
    let ledger = dir.path().join("ledger");
    let ports = [free_port(), free_port()];
    let addrs = ports.map(|p| format!("127.0.0.1:{p}"));
    let proxies = if failover {
        Some([
            FailoverProxy::start(addrs[0].clone(), addrs[1].clone()).await,
            FailoverProxy::start(addrs[1].clone(), addrs[0].clone()).await,
        ])
    } else {
        None
    };
    let advertise = match &proxies {
        Some([p1, p2]) => [Some(p1.url()), Some(p2.url())],
        None => [None, None],
    };
    let specs = replica_specs(&db.url, dir.path(), &id, ports, advertise);
    // Replica 1 takes the deadline sweep (its first turn is 5 s after its
    // start) before replica 2 exists: killing it must move the duty.
    let mut r1 = Replica::start(&specs[0]);
    let sweeps = |log: &str| {
        log.lines()
            .any(|l| l.contains("this replica now runs the duty") && l.contains("duty=sweep"))
    };
    wait_for(
        "replica 1 to run the sweep",
        Duration::from_secs(30),
        || async { sweeps(&r1.log()).then_some(()) },
    )
    .await;
    let r2 = Replica::start(&specs[1]);
    let clients = [r1.client().await, r2.client().await];
    let started = Instant::now();

    // The issue's 2,000 jobs, each recording its run in the ledger. They
    // sleep 0.1 s, so that an agent of the replica to be killed is caught
    // running one; on the 2-core test machine dispatch, not the sleeps,
    // sets the pace (2,000 x 0.1 s on 8 agents is 25 s of work; each
    // of these tests takes 1.5-2 minutes there, the binary 4-5).
    const JOBS: usize = 2_000;
    let jobs: Vec<proto::JobSpec> = (0..JOBS)
        .map(|i| {
            let mut job = ledger_job(&ledger, "0.1", &marker, &format!("{id}-{i}"));
            job.max_attempts = Some(4);
            job.timeout_secs = Some(10);
            job
        })
        .collect();
    let ids = submit_all(&clients, jobs, 16).await;

    // Kill replica 1 while its agents run jobs and work is still queued.
    let r1_pool = || workers_in(&specs[0].state_dir());
    wait_for(
        "replica 1 running jobs",
        Duration::from_secs(60),
        || async {
            let running: Vec<proto::Job> = clients[1]
                .jobs()
                .list(proto::ListJobsRequest {
                    state: JobState::Running as i32,
                    limit: 100,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner()
                .jobs;
            let pool = r1_pool();
            let on_r1 = running
                .iter()
                .filter(|j| match j.status.as_ref().and_then(|s| s.state.as_ref()) {
                    Some(proto::job_status::State::Running(r)) => pool.contains(&r.worker_id),
                    _ => false,
                })
                .count();
            let done = count_events(&clients[1], "JobSucceeded").await;
            (on_r1 >= 2 && done >= 20 && done <= (JOBS as u64) / 2).then_some(())
        },
    )
    .await;
    // Singleton duties run on one replica at a time: while replica 1
    // lived and held the sweep, replica 2 (trying every 5 s) never took it.
    let log2_before_kill = r2.log();
    assert!(
        !sweeps(&log2_before_kill),
        "replica 2 ran the sweep while replica 1 held it:\n{}",
        tail(&log2_before_kill, 40)
    );
    let killed_at = started.elapsed();
    r1.kill9();

    let finals = wait_all_terminal_listed(&clients[1], &ids, Duration::from_secs(300)).await;
    let ended_after = started.elapsed();
    let by_state = check_jobs(&clients[1], &finals, Some(&ledger)).await;
    let (per_attempt, _) = starts(&clients[1]).await;
    assert!(
        per_attempt.values().all(|n| *n == 1),
        "an attempt started twice"
    );
    let log2 = r2.log();
    let pool1 = r1_pool();
    let adopted = pool1
        .iter()
        .filter(|w| log2.contains(&format!("worker session open worker={w}")))
        .count();
    let timed_out: Vec<&proto::Job> = finals
        .values()
        .filter(|j| j.state == JobState::TimedOut as i32)
        .collect();
    eprintln!(
        "replica killed (failover {failover}): {JOBS} jobs, killed at {:.1}s, all ended at {:.1}s, \
         final {by_state:?}, {adopted} of replica 1's {} agents adopted by replica 2",
        killed_at.as_secs_f64(),
        ended_after.as_secs_f64(),
        pool1.len()
    );
    for line in retried(&finals) {
        eprintln!("  retried: {line}");
    }
    // The survivor took the deadline sweep over.
    assert!(sweeps(&r2.log()), "replica 2 never ran the sweep");
    if failover {
        assert!(
            adopted > 0,
            "no agent of replica 1 reconnected to replica 2"
        );
        assert!(timed_out.is_empty(), "timed out: {timed_out:?}");
        for (id, job) in &finals {
            assert_eq!(
                job.state,
                JobState::Succeeded as i32,
                "job {id} ended {}",
                state_name(job.state)
            );
        }
    } else {
        // Jobs running on replica 1's agents when it died could not report:
        // the survivor's sweep failed those attempts as worker_lost once
        // their deadline and grace had passed, and retried them; jobs
        // assigned there were retried at their acknowledgement deadline.
        // Every job succeeded.
        assert!(timed_out.is_empty(), "timed out: {timed_out:?}");
        let mut lost = 0;
        for (id, job) in &finals {
            assert_eq!(
                job.state,
                JobState::Succeeded as i32,
                "job {id} ended {}",
                state_name(job.state)
            );
            for a in &job.attempts {
                let Some(f) = &a.failure else { continue };
                if f.message.contains("deadline sweep") {
                    assert_eq!(f.kind, "worker_lost", "job {id}: {f:?}");
                    assert!(
                        a.worker_id.as_ref().is_some_and(|w| pool1.contains(w)),
                        "job {id}: a swept attempt ran on replica 1's agent: {a:?}"
                    );
                    lost += 1;
                }
            }
        }
        assert!(
            lost <= pool1.len(),
            "{lost} attempts lost with replica 1, which had {} agents",
            pool1.len()
        );
        eprintln!("  {lost} running attempts failed over by the sweep");
    }
    assert!(!log2.contains("panicked"), "{}", tail(&log2, 40));
    drop(r2);
    drop(proxies);
    kill_leftovers(&[specs[0].state_dir(), specs[1].state_dir()], &marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_agents_fail_over_and_every_job_succeeds() {
    a_replica_dies_mid_run(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_jobs_are_decided_by_the_survivor_s_sweep() {
    a_replica_dies_mid_run(false).await;
}
