//! End to end on PostgreSQL, over real processes: `hodei-server
//! --database-url` with the local provider spawning `hodei-worker` agents.
//!
//! - A server SIGKILLed while jobs are pending, assigned and running, then
//!   started again on the same database, address and provider state dir:
//!   agents reconnect with their resume tokens and are adopted, jobs whose
//!   worker is gone are decided by their deadlines, and no job is lost or
//!   runs twice.
//! - The database restarted (`pg_ctl -m fast`) while jobs are submitted:
//!   the server keeps serving once it is back and every acknowledged
//!   submission exists and ends.
//!
//! Each test has a database of its own (or, to restart it, a cluster of its
//! own). Without `HODEI_TEST_DATABASE_URL` they print a notice and pass,
//! except under `CI=true`.

mod e2e_support;
mod pg_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e_support::wait_for;
use hodei_grpc::proto;
use pg_support::*;
use proto::JobState;

/// A config for one server of these tests: short deadlines so that
/// recovery by deadline fits in a test.
fn config(server_id: &str, state_dir: &std::path::Path, provider: &str) -> String {
    format!(
        r#"server_id = "{server_id}"
drain_grace = "10s"

[[providers]]
kind = "local"
name = "local"
state_dir = "{state}"
{provider}

[engine]
provision_timeout = "20s"
dispatch_timeout = "5s"
heartbeat_timeout = "5s"
reconnect_grace = "10s"
claim_interval = "200ms"
claim_lease = "5s"
retry_base = "200ms"
retry_cap = "1s"
retry_jitter = 0.0

[runtime]
heartbeat_interval = "1s"
health_interval = "2s"
reconcile_interval = "5s"
"#,
        state = state_dir.display()
    )
}

/// The test's temp dir (kept with `HODEI_E2E_KEEP=1`, for post-mortems).
fn test_dir() -> tempfile::TempDir {
    let keep = std::env::var_os("HODEI_E2E_KEEP").is_some();
    let dir = tempfile::Builder::new()
        .prefix("hodei-e2e-pg-")
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

/// Counts jobs per state over the first 1000 (enough here).
async fn states(client: &e2e_support::Client) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    if let Ok(Ok(r)) = tokio::time::timeout(
        Duration::from_secs(5),
        client.jobs().list(proto::ListJobsRequest {
            limit: 1000,
            ..Default::default()
        }),
    )
    .await
    {
        for j in r.into_inner().jobs {
            *out.entry(state_name(j.state)).or_default() += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_server_restarts_on_its_database_and_loses_no_job() {
    let Some(db) = test_db().await else { return };
    let started = Instant::now();
    let dir = test_dir();
    let id = short_id();
    let marker = format!("E2E_PG_RUN={id}");
    let ledger = dir.path().join("ledger");
    let mut spec = ReplicaSpec {
        server_id: format!("recovery-{id}"),
        database_url: db.url.clone(),
        port: free_port(),
        dir: dir.path().join("server"),
        toml: String::new(),
    };
    spec.toml = config(&spec.server_id, &spec.state_dir(), "max_workers = 6");
    let state_dirs = vec![spec.state_dir()];
    let mut server = Replica::start(&spec);
    let client = server.client().await;

    // Jobs of 2 s each, 6 workers at most (more for a while after a
    // restart: the new process provisions before the old agents are
    // back): at any moment some are pending, some being provisioned or
    // assigned, some running. Each round that does not end the test adds
    // a batch, so that the next one finds work in every state again.
    let mut ids = Vec::new();
    let submit_batch = |from: usize, n: usize| {
        let (client, ledger, marker, id) = (&client, &ledger, &marker, &id);
        async move {
            let mut out = Vec::new();
            for i in from..from + n {
                let mut job = ledger_job(ledger, "2", marker, &format!("{id}-{i}"));
                job.max_attempts = Some(4);
                job.timeout_secs = Some(TIMEOUT_SECS);
                out.push(client.submit(job).await.job_id);
            }
            out
        }
    };
    const TIMEOUT_SECS: u64 = 30;
    const BATCH: usize = 12;
    const MAX_ROUNDS: usize = 6;
    const MAX_TOP_UPS: usize = 4;
    ids.extend(submit_batch(0, 3 * BATCH).await);
    // Jobs per state in the database right after each SIGKILL: exactly
    // what the dead server left behind (nothing else writes meanwhile).
    let mut kills: Vec<BTreeMap<String, usize>> = Vec::new();
    let mut killed_at = Vec::new();
    // The run whose agent was SIGKILLed with the server, and that agent.
    let mut agent_killed: Option<(Execution, String)> = None;
    let in_flight = |s: &BTreeMap<String, usize>| {
        let n = |k: &str| s.get(k).copied().unwrap_or(0);
        (
            n("JOB_STATE_PENDING"),
            n("JOB_STATE_SCHEDULED") + n("JOB_STATE_ASSIGNED"),
            n("JOB_STATE_RUNNING"),
        )
    };
    let caught = |s: &BTreeMap<String, usize>| {
        let (pending, between, running) = in_flight(s);
        pending >= 1 && between >= 1 && running >= 1
    };
    for round in 0.. {
        // Rounds go on until one SIGKILL caught jobs pending, scheduled or
        // assigned, and running at once (a moment the API showed, checked
        // in the database after the kill), at least two rounds were run,
        // and an agent died with the server.
        assert!(
            round < MAX_ROUNDS,
            "after {round} SIGKILLs, none caught jobs pending, scheduled or assigned, and running \
             at once, or no agent could be killed with the server; jobs per state at the kills: \
             {kills:?}"
        );
        // Wait for a moment with jobs in every state before RUNNING. A job
        // is SCHEDULED or ASSIGNED only while its worker starts (tens of
        // milliseconds a job), so the queue is topped up whenever it runs
        // low: the moment comes again every few seconds until seen.
        let watch_from = Instant::now();
        let mut seen = Vec::new();
        let mut top_ups = 0;
        loop {
            let s = states(&client).await;
            let (pending, between, running) = in_flight(&s);
            if pending >= 1 && between >= 1 && running >= 2 {
                break;
            }
            // At most a few batches a round: the final wait must be able
            // to finish everything.
            if pending < 3 && top_ups < MAX_TOP_UPS {
                ids.extend(submit_batch(ids.len(), BATCH).await);
                top_ups += 1;
            }
            if seen.last() != Some(&s) {
                seen.push(s);
            }
            assert!(
                watch_from.elapsed() < Duration::from_secs(120),
                "round {round}: in 120 s no moment with jobs pending, scheduled or assigned, \
                 and at least two running; the distinct job counts per state seen, last 20: \
                 {:?}",
                &seen[seen.len().saturating_sub(20)..]
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server.kill9();
        killed_at.push(std::time::SystemTime::now());
        let at_kill = db_job_states(&db.url).await;
        kills.push(at_kill);
        let last = round >= 1 && kills.iter().any(caught);
        if last {
            // The worker of a running job goes too (its host was lost):
            // the restarted server never hears from it again, and the
            // deadline sweep must decide its attempt.
            if let Some((run, worker, pid)) = running_on_agent(&ledger, &spec.state_dir()) {
                e2e_support::signal(pid, nix::sys::signal::Signal::SIGKILL);
                agent_killed = Some((run, worker));
            }
        }
        // Agents (own process groups) survive their server.
        std::thread::sleep(Duration::from_millis(500));
        server = Replica::start(&spec);
        if last && agent_killed.is_some() {
            break;
        }
        // The restarted server has its predecessor's work to finish
        // before the next kill; more work for the next round.
        let done_at_kill = kills[round]
            .get("JOB_STATE_SUCCEEDED")
            .copied()
            .unwrap_or(0);
        wait_for(
            "jobs finished after the restart",
            Duration::from_secs(90),
            || async {
                let s = states(&client).await;
                let done = s.get("JOB_STATE_SUCCEEDED").copied().unwrap_or(0);
                (done >= done_at_kill + 4).then_some(())
            },
        )
        .await;
        ids.extend(submit_batch(ids.len(), BATCH).await);
    }
    // Every kill left work in flight; one caught every state before
    // RUNNING.
    for s in &kills {
        let (pending, between, running) = in_flight(s);
        assert!(
            running >= 1 && pending + between >= 1,
            "a SIGKILL found no work in flight: {kills:?}"
        );
    }
    assert!(kills.iter().any(caught), "{kills:?}");

    // The attempt of the killed agent: no result will ever come, so the
    // deadline sweep decides it (RUNNING: 10 s past its deadline; ASSIGNED:
    // 2 s past the acknowledgement deadline) once the restarted server has
    // the sweep (the dead process's lease, 15 s, lapsed; a turn every 5 s).
    let (run, lost_worker) = agent_killed.expect("the loop ends with an agent killed");
    let decided_by = Duration::from_secs(TIMEOUT_SECS)
        + hodei_core::engine::SWEEP_GRACE_RUNNING
        + Duration::from_secs(15 + 5);
    let lost = wait_for(
        "the sweep to decide the attempt of the killed agent",
        decided_by + Duration::from_secs(30),
        || async {
            let job = get_job(&client, &run.job).await?;
            let a = job
                .attempts
                .iter()
                .find(|a| a.number == run.attempt)?
                .clone();
            Some(a)
        },
    )
    .await;

    // 2 s jobs on 6 workers, with room for retries and restarts.
    let all_done = Duration::from_secs(150).max(Duration::from_secs(ids.len() as u64));
    let jobs = wait_all_terminal(&client, &ids, all_done).await;
    let elapsed = started.elapsed();
    let by_state = check_jobs(&client, &jobs, Some(&ledger)).await;
    let runs = read_ledger(&ledger);
    // Attempts that started before a kill and succeeded after it: the
    // restarted server adopted their agents (nothing was rerun).
    let at = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map(|t| std::time::UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos as u32))
    };
    let adopted = jobs
        .values()
        .filter(|j| {
            j.attempts.iter().any(|a| {
                let (Some(start), Some(end)) = (at(&a.started_at), at(&a.finished_at)) else {
                    return false;
                };
                a.outcome == "succeeded" && killed_at.iter().any(|k| start < *k && *k < end)
            })
        })
        .count();
    eprintln!(
        "sigkill recovery: {} jobs, {} kills, jobs per state in the database at the kills \
         {kills:?}, agent {lost_worker} killed with the server running attempt {} of job {}, \
         final {by_state:?}, {} runs in the ledger, {adopted} attempts ran across a kill and \
         succeeded, {:.1}s",
        ids.len(),
        kills.len(),
        run.attempt,
        run.job,
        runs.len(),
        elapsed.as_secs_f64()
    );
    for line in retried(&jobs) {
        eprintln!("  retried: {line}");
    }
    // The killed agent's attempt failed as lost (or never acknowledged,
    // when its acknowledgement died with the server), decided by the
    // sweep, and the job was retried: a later attempt ran and succeeded.
    let failure = lost.failure.as_ref();
    assert!(
        lost.outcome == "failed"
            && failure
                .is_some_and(|f| ["worker_lost", "dispatch_failed"].contains(&f.kind.as_str()))
            && lost.worker_id.as_deref() == Some(lost_worker.as_str()),
        "attempt {} of job {} on the killed agent {lost_worker}: {lost:?}",
        run.attempt,
        run.job
    );
    let events = client.events(&run.job).await;
    let decision = events
        .iter()
        .find(|e| {
            e.event_type == "JobRetryScheduled"
                && e2e_support::payload(e)["failed_attempt"] == run.attempt
        })
        .unwrap_or_else(|| panic!("attempt {} of job {} was not retried", run.attempt, run.job));
    assert_eq!(decision.actor, "system:sweeper", "{decision:?}");
    assert!(jobs[&run.job].attempt > run.attempt);
    // Every job ran to the end at least once: worker losses were retried.
    for (id, job) in &jobs {
        assert_eq!(
            job.state,
            JobState::Succeeded as i32,
            "job {id} ended {}: {job:?}",
            state_name(job.state)
        );
    }
    assert!(
        adopted >= 2,
        "running attempts were not adopted after the restarts"
    );
    let log = server.log();
    assert!(!log.contains("panicked"), "{}", tail(&log, 40));
    server.stop();
    kill_leftovers(&state_dirs, &marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_loses_no_acknowledged_submission() {
    if admin_url().is_none() {
        return;
    }
    let Some(cluster) = PgCluster::start() else {
        return;
    };
    let started = Instant::now();
    let dir = test_dir();
    let id = short_id();
    let marker = format!("E2E_PG_RUN={id}");
    let ledger = dir.path().join("ledger");
    let mut spec = ReplicaSpec {
        server_id: format!("dbrestart-{id}"),
        database_url: cluster.url.clone(),
        port: free_port(),
        dir: dir.path().join("server"),
        toml: String::new(),
    };
    spec.toml = config(
        &spec.server_id,
        &spec.state_dir(),
        "max_workers = 4\nwarm_pool = 2\nephemeral = false",
    );
    let state_dirs = vec![spec.state_dir()];
    let server = Replica::start(&spec);
    let client = server.client().await;

    // Four submitters, 20 jobs each, retrying UNAVAILABLE with the same
    // idempotency key; the database goes away after the first 15.
    const PER_SUBMITTER: usize = 20;
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let mut submitters = Vec::new();
    for s in 0..4 {
        let (client, acked, ledger, marker, id) = (
            client.clone(),
            acked.clone(),
            ledger.clone(),
            marker.clone(),
            id.clone(),
        );
        submitters.push(tokio::spawn(async move {
            let mut unacked = Vec::new();
            for i in 0..PER_SUBMITTER {
                let key = format!("{id}-{s}-{i}");
                let mut job = ledger_job(&ledger, "0.5", &marker, &key);
                job.max_attempts = Some(4);
                job.timeout_secs = Some(60);
                match submit_retrying(&client, &job, Duration::from_secs(90)).await {
                    Some(j) => acked.lock().unwrap().push((key, j.job_id)),
                    None => unacked.push(key),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            unacked
        }));
    }
    wait_for(
        "15 acknowledged submissions",
        Duration::from_secs(60),
        || async { (acked.lock().unwrap().len() >= 15).then_some(()) },
    )
    .await;
    let outage = Instant::now();
    tokio::task::block_in_place(|| cluster.stop_server());
    let acked_before = acked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_secs(5)).await;
    tokio::task::block_in_place(|| cluster.start_server());
    let down_for = outage.elapsed();

    let mut unacked = Vec::new();
    for s in submitters {
        unacked.extend(s.await.unwrap());
    }
    assert!(
        unacked.is_empty(),
        "submissions never acknowledged once the database was back: {unacked:?}"
    );
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.len(), 4 * PER_SUBMITTER);
    let ids: Vec<String> = acked.iter().map(|(_, id)| id.clone()).collect();
    let jobs = wait_all_terminal(&client, &ids, Duration::from_secs(120)).await;
    let by_state = check_jobs(&client, &jobs, Some(&ledger)).await;
    // One job per idempotency key: retried submissions created nothing.
    let listed = client
        .jobs()
        .list(proto::ListJobsRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), ids.len(), "one job per acknowledged key");
    for (id, job) in &jobs {
        assert_eq!(
            job.state,
            JobState::Succeeded as i32,
            "job {id} ended {}: {job:?}",
            state_name(job.state)
        );
    }
    // No output was lost: log appends that failed while the database was
    // down were retried, not dropped.
    for (id, job) in &jobs {
        let texts: Vec<String> = client
            .logs_of(id)
            .await
            .into_iter()
            .filter(|l| l.attempt == job.attempt)
            .map(|l| l.text)
            .collect();
        let want = [1, 2].map(|n| format!("out {n} of {}", job.attempt));
        assert_eq!(texts, want, "job {id}");
    }
    // The server still serves: a new job after the outage runs.
    let mut last = ledger_job(&ledger, "0", &marker, &format!("{id}-after"));
    last.max_attempts = Some(2);
    let last = submit_retrying(&client, &last, Duration::from_secs(30))
        .await
        .expect("a submission after the outage");
    let done = wait_all_terminal(&client, &[last.job_id], Duration::from_secs(60)).await;
    assert!(
        done.values().all(|j| j.state == JobState::Succeeded as i32),
        "{done:?}"
    );
    eprintln!(
        "database restart: {} submissions acknowledged ({acked_before} before the outage), \
         database down for {:.1}s, final {by_state:?}, {:.1}s in all",
        acked.len(),
        down_for.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    drop(server);
    kill_leftovers(&state_dirs, &marker);
}
