//! Durable throughput on PostgreSQL (needs `HODEI_TEST_DATABASE_URL`;
//! skipped without it).
//!
//! 1. **Jobs.** An embedded server on a fresh database with 8 warm
//!    reusable in-process workers (capacity 1, then 8 jobs each) runs 5,000 no-op jobs (`true`) submitted
//!    by 64 concurrent clients (`HODEI_BENCH_SUBMITTERS`) through `ControlPlane::submit`: jobs/s from
//!    the first submission to the last terminal state stored, and commits
//!    per job (`pg_stat_database.xact_commit` delta / jobs). Beside it, the
//!    ceiling of the same PostgreSQL measured in the same run by `pgbench`
//!    with the same client count, running a script that does what a queue
//!    minimally must per job: insert, claim (`UPDATE … WHERE id = (SELECT …
//!    FOR UPDATE SKIP LOCKED LIMIT 1)`) and complete, three commits, on a
//!    scratch table. The summary says whether the server flushes commits
//!    (`fsync`, `synchronous_commit`): start it with `HODEI_PG_DURABLE=1
//!    scripts/pg start DIR` for durable figures.
//! 2. **Event bus.** Events/s delivered to a `PgStore` subscriber while
//!    another task appends events in batches of 100, with the `LISTEN`
//!    connection killed (`pg_terminate_backend`) half way through; every
//!    appended event must arrive exactly once, in sequence order. Then the
//!    same with 4 appending tasks (concurrent writers), and, for the
//!    delivery side alone, a new subscriber reading the stored backlog.
//!
//! `cargo bench -p hodei-grpc --bench durable_throughput`
//! (`HODEI_BENCH_JOBS`, `HODEI_BENCH_EVENTS`, `HODEI_BENCH_PGBENCH_SECS`,
//! `HODEI_BENCH_CAPACITIES` (jobs per worker at once, default `1,8`);
//! `HODEI_BENCH_SUBMITTERS` (clients submitting to Hodei, default 64);
//! `HODEI_BENCH_PARTS=jobs` or `bus` for one part); without `--bench` a
//! smoke pass.

mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use hodei_core::event::{DomainEvent, EventBody};
use hodei_core::ids::{Actor, CorrelationId, EventId, ProviderId};
use hodei_core::job::JobState;
use hodei_core::ports::{EventLog, EventSubscription};
use hodei_core::runtime::{Stores, now_utc};
use hodei_grpc::config::ProviderKind;
use sqlx::Connection;

const CLIENTS: usize = 8;
/// Clients submitting to Hodei, each waiting for its submission to be
/// stored before the next. More than [`CLIENTS`]: with 8, the offered load
/// is bounded by the submit round trip (8 / ~12 ms), not by the platform.
const SUBMITTERS: usize = 64;
/// Appending tasks of the second event bus run (concurrent writers).
const BUS_WRITERS: usize = 4;
/// The subscriber gives up after this long without an event.
const STALL: Duration = Duration::from_secs(10);

fn main() {
    support::main_with(run());
}

async fn run() -> Result<()> {
    support::print_header("durable_throughput");
    if support::pg_base_url().is_none() {
        println!("skipped: HODEI_TEST_DATABASE_URL is not set");
        return Ok(());
    }
    let jobs = support::size("HODEI_BENCH_JOBS", 5000, 100);
    let events = support::size("HODEI_BENCH_EVENTS", 200_000, 2_000);
    let pgbench_secs = support::size("HODEI_BENCH_PGBENCH_SECS", 15, 2);
    println!("goals: jobs/s >= half the pgbench ceiling; event bus >= 20,000 events/s with 0 lost");

    let parts = std::env::var("HODEI_BENCH_PARTS").unwrap_or_default();
    let part = |name: &str| parts.is_empty() || parts.split(',').any(|p| p.trim() == name);
    if part("jobs") {
        jobs_vs_pgbench(jobs, pgbench_secs).await?;
    }
    if part("bus") {
        for writers in [1, BUS_WRITERS] {
            let bus = bus_throughput(events, writers).await?;
            print_bus(&bus, writers);
        }
    }
    Ok(())
}

/// `HODEI_BENCH_CAPACITIES`: the worker capacities to run, comma-separated
/// (default `1,8`: one job per worker at a time, then 8).
fn capacities() -> Result<Vec<u32>> {
    let raw = std::env::var("HODEI_BENCH_CAPACITIES").unwrap_or_else(|_| "1,8".into());
    raw.split(',')
        .map(|c| {
            c.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=256).contains(n))
                .ok_or_else(|| {
                    anyhow!("HODEI_BENCH_CAPACITIES: {c:?} is not a capacity; expected 1 to 256")
                })
        })
        .collect()
}

async fn jobs_vs_pgbench(jobs: usize, pgbench_secs: usize) -> Result<()> {
    let mut runs = Vec::new();
    for capacity in capacities()? {
        runs.push((capacity, durable_jobs(jobs, capacity).await?));
    }
    let ceiling = pgbench_ceiling(pgbench_secs).await;
    let spawns = spawn_ceiling(pgbench_secs).await?;
    let minimal = minimal_runner(pgbench_secs, false).await?;
    let audited = minimal_runner(pgbench_secs, true).await?;
    println!();
    println!(
        "durable no-op jobs, {} submitting clients, {CLIENTS} warm workers, {jobs} jobs:",
        submitters()?
    );
    match durability().await {
        Ok(d) => println!("  postgresql:          {d}"),
        Err(e) => println!("  postgresql:          durability settings not read: {e:#}"),
    }
    for (capacity, hodei) in &runs {
        println!(
            "  hodei, capacity {capacity:>3}: {:>8.0} jobs/s  ({:.2} s; {:.1} commits/job; {:.1} events/job; {} succeeded, {} other)",
            hodei.jobs as f64 / hodei.secs,
            hodei.secs,
            hodei.commits as f64 / hodei.jobs as f64,
            hodei.events as f64 / hodei.jobs as f64,
            hodei.succeeded,
            hodei.jobs - hodei.succeeded
        );
    }
    match &ceiling {
        Ok(c) => {
            println!(
                "  pgbench:             {:>8.0} jobs/s  (insert + claim + complete, 3 commits/job, {CLIENTS} clients, {} s, {} jobs)",
                c.tps, pgbench_secs, c.transactions
            );
            for (capacity, hodei) in &runs {
                println!(
                    "  ratio, capacity {capacity:>3}: {:.2} of the ceiling (goal >= 0.50)",
                    hodei.jobs as f64 / hodei.secs / c.tps
                );
            }
        }
        Err(e) => println!("  pgbench: not measured: {e:#}"),
    }
    println!(
        "  processes alone:     {:>8.0} jobs/s  (`true` started and reaped by {CLIENTS} tasks, no database, {} s)",
        spawns, pgbench_secs
    );
    println!(
        "  minimal runner:      {:>8.0} jobs/s  (the pgbench script's 3 statements + `true` per job, {CLIENTS} tasks, sqlx, {} s)",
        minimal, pgbench_secs
    );
    println!(
        "  minimal runner, audited: {:>4.0} jobs/s  (the same, each statement also appending its {AUDITED_EVENTS} events per job \
         to Hodei's events table and notifying, {CLIENTS} tasks, {} s)",
        audited, pgbench_secs
    );
    if let Ok(c) = &ceiling {
        println!(
            "  ratio to pgbench: minimal runner {:.2}, audited minimal runner {:.2}",
            minimal / c.tps,
            audited / c.tps
        );
    }
    for (capacity, hodei) in &runs {
        println!(
            "  ratio to the minimal runner, capacity {capacity:>3}: {:.2} (to the audited one {:.2})",
            hodei.jobs as f64 / hodei.secs / minimal,
            hodei.jobs as f64 / hodei.secs / audited
        );
    }

    Ok(())
}

/// Whether the server of `HODEI_TEST_DATABASE_URL` flushes commits: the
/// figures are durable throughput only when it does (`scripts/pg` turns
/// flushing off unless `HODEI_PG_DURABLE=1`).
async fn durability() -> Result<String> {
    let base = support::pg_base_url().context("HODEI_TEST_DATABASE_URL is not set")?;
    let mut conn = sqlx::PgConnection::connect(&base).await?;
    let mut show = Vec::new();
    for name in ["fsync", "synchronous_commit", "full_page_writes"] {
        let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
            .fetch_one(&mut conn)
            .await?;
        show.push((name, value));
    }
    conn.close().await?;
    let flushed = show.iter().take(2).all(|(_, v)| v != "off");
    let settings: Vec<String> = show.iter().map(|(n, v)| format!("{n}={v}")).collect();
    Ok(if flushed {
        format!(
            "{} (commits are flushed: durable figures)",
            settings.join(", ")
        )
    } else {
        format!(
            "{} (commits are NOT flushed: CPU figures; HODEI_PG_DURABLE=1 scripts/pg start for durable ones)",
            settings.join(", ")
        )
    })
}

/// `true` in `PATH`, as the agent would resolve it.
fn true_binary() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("true"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| "/bin/true".into())
}

/// Processes alone: `true` started (by path, as the agent does) and
/// reaped by [`CLIENTS`] concurrent tasks for `secs`: what any runner that
/// starts a process per job is bounded by on this machine.
async fn spawn_ceiling(secs: usize) -> Result<f64> {
    let bin = true_binary();
    let until = Instant::now() + Duration::from_secs(secs as u64);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let bin = bin.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                let status = tokio::process::Command::new(&bin).status().await?;
                anyhow::ensure!(status.success(), "{} failed: {status}", bin.display());
                n += 1;
            }
            Ok::<u64, anyhow::Error>(n)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / t0.elapsed().as_secs_f64())
}

/// The least a durable runner must do per job, written directly: the
/// pgbench script's insert, claim (`FOR UPDATE SKIP LOCKED`) and complete
/// (three autocommitted statements) with a `true` process started and
/// reaped between claim and complete, by [`CLIENTS`] tasks for `secs`.
/// `audited`: each statement also appends the job's events of that step
/// ([`AUDITED_EVENTS`], six per job) to Hodei's own `events` table (the
/// database is migrated) and notifies their last sequence, in the same
/// statement: what the issue's audit trail and event bus cost at the
/// least, with nothing else of Hodei (no documents, no workers, no gRPC).
async fn minimal_runner(secs: usize, audited: bool) -> Result<f64> {
    let db = support::fresh_database("minimal")
        .await?
        .ok_or_else(|| anyhow!("no database"))?;
    let result = async {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(CLIENTS as u32)
            .connect(&db.url)
            .await?;
        sqlx::raw_sql(SCRATCH).execute(&pool).await?;
        if audited {
            // Hodei's own schema, for its `events` table and indexes.
            support::pg_store(&db.url).await?.close().await;
            sqlx::raw_sql(
                "ALTER TABLE bench_queue ADD COLUMN uid uuid NOT NULL DEFAULT gen_random_uuid()",
            )
            .execute(&pool)
            .await?;
        }
        let [insert, claim, complete] = if audited {
            AUDITED_STATEMENTS
        } else {
            PLAIN_STATEMENTS
        };
        let bin = true_binary();
        let until = Instant::now() + Duration::from_secs(secs as u64);
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for client in 0..CLIENTS as i32 {
            let (pool, bin) = (pool.clone(), bin.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    sqlx::query(insert).execute(&pool).await?;
                    let claimed: Option<i64> = sqlx::query_scalar(claim)
                        .bind(client)
                        .fetch_one(&pool)
                        .await?;
                    let Some(id) = claimed else { continue };
                    let status = tokio::process::Command::new(&bin).status().await?;
                    let state = if status.success() {
                        "SUCCEEDED"
                    } else {
                        "FAILED"
                    };
                    sqlx::query(complete)
                        .bind(state)
                        .bind(id)
                        .execute(&pool)
                        .await?;
                    n += 1;
                }
                Ok::<u64, anyhow::Error>(n)
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        let rate = total as f64 / t0.elapsed().as_secs_f64();
        pool.close().await;
        Ok(rate)
    }
    .await;
    db.drop_db().await;
    result
}

/// The minimal runner's statements: insert, claim (`$1` the client;
/// yields the claimed id or NULL), complete (`$1` the state, `$2` the id).
const PLAIN_STATEMENTS: [&str; 3] = [
    "INSERT INTO bench_queue (state, spec) VALUES ('PENDING', '{\"command\": [\"true\"]}')",
    "WITH c AS (UPDATE bench_queue SET state = 'RUNNING', claimed_by = $1, updated_at = now() \
     WHERE id = (SELECT id FROM bench_queue WHERE state = 'PENDING' ORDER BY id \
     FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id) \
     SELECT (SELECT id FROM c)",
    "UPDATE bench_queue SET state = $1, updated_at = now() WHERE id = $2",
];

/// Events the audited minimal runner appends per job: two with the insert,
/// three with the claim, one with the completion.
const AUDITED_EVENTS: usize = 6;

/// [`PLAIN_STATEMENTS`], each also appending its step's events to
/// `events` and notifying their last sequence.
const AUDITED_STATEMENTS: [&str; 3] = [
    "WITH j AS (INSERT INTO bench_queue (state, spec) \
         VALUES ('PENDING', '{\"command\": [\"true\"]}') RETURNING id, uid), \
     e AS (INSERT INTO events (event_id, event_type, aggregate_type, aggregate_id, \
         correlation_id, actor, occurred_at, job_id, payload) \
         SELECT gen_random_uuid(), t, 'job', j.uid::text, j.uid::text, 'user:bench', now(), \
             j.uid, jsonb_build_object('job_id', j.uid, 'type', t) \
         FROM j, unnest(ARRAY['JobCreated', 'JobQueued']) t RETURNING sequence) \
     SELECT pg_notify('bench_events', max(sequence)::text) FROM e",
    "WITH c AS (UPDATE bench_queue SET state = 'RUNNING', claimed_by = $1, updated_at = now() \
         WHERE id = (SELECT id FROM bench_queue WHERE state = 'PENDING' ORDER BY id \
         FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id, uid), \
     e AS (INSERT INTO events (event_id, event_type, aggregate_type, aggregate_id, \
         correlation_id, actor, occurred_at, job_id, payload) \
         SELECT gen_random_uuid(), t, 'job', c.uid::text, c.uid::text, 'worker:bench', now(), \
             c.uid, jsonb_build_object('job_id', c.uid, 'type', t) \
         FROM c, unnest(ARRAY['JobScheduled', 'JobAssigned', 'JobStarted']) t RETURNING sequence), \
     n AS (SELECT pg_notify('bench_events', max(sequence)::text) FROM e HAVING count(*) > 0) \
     SELECT (SELECT id FROM c) + 0 * (SELECT count(*) FROM n)",
    "WITH c AS (UPDATE bench_queue SET state = $1, updated_at = now() WHERE id = $2 \
         RETURNING id, uid, state), \
     e AS (INSERT INTO events (event_id, event_type, aggregate_type, aggregate_id, \
         correlation_id, actor, occurred_at, job_id, payload) \
         SELECT gen_random_uuid(), \
             CASE c.state WHEN 'SUCCEEDED' THEN 'JobSucceeded' ELSE 'JobFailed' END, \
             'job', c.uid::text, c.uid::text, 'worker:bench', now(), c.uid, \
             jsonb_build_object('job_id', c.uid, 'state', c.state) \
         FROM c RETURNING sequence) \
     SELECT pg_notify('bench_events', max(sequence)::text) FROM e",
];

fn print_bus(bus: &Bus, writers: usize) {
    println!();
    println!(
        "event bus (PgStore subscriber; {writers} task(s) appending batches of 100 events; \
         LISTEN killed half way):"
    );
    println!(
        "  {:>8.0} events/s delivered  ({} events in {:.2} s; appends alone {:.0} events/s); \
         lost {}, duplicated {}, out of order {}; LISTEN backends killed {}, listener connects {}",
        bus.events as f64 / bus.secs,
        bus.events,
        bus.secs,
        bus.events as f64 / bus.append_secs,
        bus.lost,
        bus.duplicates,
        bus.out_of_order,
        bus.killed,
        bus.listener_connects
    );
    println!(
        "  catch-up: a new subscriber read the {} stored events at {:.0} events/s",
        bus.caught,
        bus.caught as f64 / bus.catch_up_secs
    );
    if bus.lost > 0 {
        println!(
            "  LOST sequences: {} (last appended {}, bus horizon at the end {})",
            bus.missing_ranges, bus.last_appended, bus.horizon
        );
    }
}

struct Durable {
    jobs: usize,
    secs: f64,
    commits: i64,
    /// Events stored while the jobs ran.
    events: i64,
    succeeded: usize,
}

async fn xact_commit(conn: &mut sqlx::PgConnection) -> Result<i64> {
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *conn)
        .await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(n)
}

async fn event_count(conn: &mut sqlx::PgConnection) -> Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&mut *conn)
        .await?)
}

async fn durable_jobs(jobs: usize, capacity: u32) -> Result<Durable> {
    let db = support::fresh_database("jobs")
        .await?
        .ok_or_else(|| anyhow!("no database"))?;
    let store = support::pg_store(&db.url).await?;
    let result = async {
        let probed = support::probe(Stores::from_store(Arc::new(store.clone())));
        let mut settings = support::provider(
            ProviderKind::Inprocess,
            CLIENTS as u32,
            CLIENTS as u32,
            false,
            None,
        );
        settings.worker_capacity = capacity;
        let server = support::start_server(probed.stores.clone(), vec![settings], None).await?;
        let cp = server.control_plane().clone();
        support::wait_ready(&cp, CLIENTS, Duration::from_secs(60)).await?;
        // Warm-up.
        let warm = (jobs / 50).max(CLIENTS);
        submit_all(&cp, warm).await?;
        probed
            .jobs
            .wait("the warm-up jobs", Duration::from_secs(300), |p| {
                (p.terminal_count() >= warm).then_some(())
            })
            .await?;
        let mut stats = sqlx::PgConnection::connect(&db.url).await?;
        // Idle backends flush their statistics within 10 s (PostgreSQL 15).
        tokio::time::sleep(if support::full() {
            Duration::from_secs(11)
        } else {
            Duration::from_secs(1)
        })
        .await;
        let before = xact_commit(&mut stats).await?;
        let events_before = event_count(&mut stats).await?;
        let calls = probed.timing.snapshot();
        let t0 = Instant::now();
        submit_all(&cp, jobs).await?;
        probed
            .jobs
            .wait("the jobs", Duration::from_secs(1800), |p| {
                (p.terminal_count() >= warm + jobs).then_some(())
            })
            .await?;
        let end = probed.jobs.last_terminal().unwrap_or_else(Instant::now);
        println!("\nhodei on PostgreSQL, {jobs} jobs:");
        probed.timing.print_since(&calls, jobs);
        let secs = end.saturating_duration_since(t0).as_secs_f64();
        let succeeded = probed
            .jobs
            .terminal_counts()
            .get(&JobState::Succeeded)
            .copied()
            .unwrap_or(0)
            .saturating_sub(warm);
        server
            .stop()
            .await
            .map_err(|e| anyhow!("server stop: {e}"))?;
        // Backends flush their statistics when they exit.
        store.close().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = xact_commit(&mut stats).await?;
        let events = event_count(&mut stats).await? - events_before;
        stats.close().await.ok();
        Ok(Durable {
            jobs,
            secs,
            commits: after - before,
            events,
            succeeded,
        })
    }
    .await;
    store.close().await;
    db.drop_db().await;
    result
}

/// Concurrent submitters of the Hodei runs: `HODEI_BENCH_SUBMITTERS`,
/// default [`SUBMITTERS`].
fn submitters() -> Result<usize> {
    match std::env::var("HODEI_BENCH_SUBMITTERS") {
        Err(_) => Ok(SUBMITTERS),
        Ok(raw) => raw
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1024).contains(n))
            .ok_or_else(|| {
                anyhow!("HODEI_BENCH_SUBMITTERS: {raw:?} is not a count; expected 1 to 1024")
            }),
    }
}

/// Submits `n` jobs from [`submitters`] concurrent clients, each waiting
/// for its submission to be stored before the next.
async fn submit_all(cp: &hodei_core::runtime::ControlPlane, n: usize) -> Result<()> {
    let clients = submitters()?;
    let mut tasks = Vec::new();
    for c in 0..clients {
        let cp = cp.clone();
        let mine = n / clients + usize::from(c < n % clients);
        tasks.push(tokio::spawn(async move {
            for _ in 0..mine {
                cp.submit(support::command(&["true"]), &support::ctx())
                    .await?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

struct Ceiling {
    tps: f64,
    transactions: u64,
}

/// The pgbench binary: `$PG_BINDIR`, `pg_config --bindir`,
/// `/usr/lib/postgresql/*/bin`, else `PATH`.
fn pgbench() -> PathBuf {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("PG_BINDIR") {
        dirs.push(d.into());
    }
    if let Ok(out) = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
    {
        dirs.push(String::from_utf8_lossy(&out.stdout).trim().into());
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        dirs.extend(versions.into_iter().rev());
    }
    dirs.into_iter()
        .map(|d| d.join("pgbench"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| "pgbench".into())
}

const SCRATCH: &str = "
CREATE TABLE bench_queue (
    id bigserial PRIMARY KEY,
    state text NOT NULL,
    spec jsonb NOT NULL,
    claimed_by int,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX bench_queue_pending ON bench_queue (id) WHERE state = 'PENDING';
";

/// One job of the queue ceiling: three autocommitted statements.
const SCRIPT: &str = r#"INSERT INTO bench_queue (state, spec) VALUES ('PENDING', '{"command": ["true"]}');
WITH c AS (UPDATE bench_queue SET state = 'RUNNING', claimed_by = :client_id, updated_at = now() WHERE id = (SELECT id FROM bench_queue WHERE state = 'PENDING' ORDER BY id FOR UPDATE SKIP LOCKED LIMIT 1) RETURNING id) SELECT coalesce((SELECT id FROM c), 0) AS claimed \gset
UPDATE bench_queue SET state = 'SUCCEEDED', updated_at = now() WHERE id = :claimed;
"#;

async fn pgbench_ceiling(secs: usize) -> Result<Ceiling> {
    let db = support::fresh_database("pgbench")
        .await?
        .ok_or_else(|| anyhow!("no database"))?;
    let result = async {
        let mut conn = sqlx::PgConnection::connect(&db.url).await?;
        sqlx::raw_sql(SCRATCH).execute(&mut conn).await?;
        conn.close().await.ok();
        let dir = tempfile::tempdir()?;
        let script = dir.path().join("queue.sql");
        std::fs::write(&script, SCRIPT)?;
        let bin = pgbench();
        let out = tokio::process::Command::new(&bin)
            .args([
                "-n",
                "-c",
                &CLIENTS.to_string(),
                "-j",
                "2",
                "-T",
                &secs.to_string(),
                "-f",
            ])
            .arg(&script)
            .arg(&db.url)
            .output()
            .await
            .with_context(|| format!("running {}", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "{} failed: {}{}",
                bin.display(),
                text,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let tps = text
            .lines()
            .find_map(|l| l.strip_prefix("tps = "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("no tps in pgbench output:\n{text}"))?;
        let transactions = text
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|v| v.split(['/', ' ']).next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(Ceiling { tps, transactions })
    }
    .await;
    db.drop_db().await;
    result
}

struct Bus {
    events: usize,
    secs: f64,
    append_secs: f64,
    lost: usize,
    duplicates: usize,
    out_of_order: usize,
    killed: i64,
    listener_connects: u64,
    horizon: u64,
    caught: usize,
    catch_up_secs: f64,
    last_appended: u64,
    missing_ranges: String,
}

/// `1-3, 7, 9-10` for sorted numbers (at most 10 ranges).
fn ranges(v: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() && out.len() < 10 {
        let start = v[i];
        while i + 1 < v.len() && v[i + 1] == v[i] + 1 {
            i += 1;
        }
        out.push(if v[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", v[i])
        });
        i += 1;
    }
    out.join(", ")
}

fn bus_event(i: usize) -> DomainEvent {
    DomainEvent::new(
        EventId::from_uuid(uuid::Uuid::new_v4()),
        now_utc(),
        CorrelationId::new("bench-bus"),
        Actor::system("bench"),
        EventBody::ProviderHealthChanged {
            provider: ProviderId::new("bench"),
            healthy: i.is_multiple_of(2),
            message: format!("event {i}"),
        },
    )
}

async fn bus_throughput(total: usize, writers: usize) -> Result<Bus> {
    const BATCH: usize = 100;
    let db = support::fresh_database("bus")
        .await?
        .ok_or_else(|| anyhow!("no database"))?;
    let store = support::pg_store(&db.url).await?;
    let result = async {
        let start_after = store
            .read_after(0, usize::MAX)
            .await?
            .last()
            .map_or(0, |e| e.sequence);
        // The subscriber: every event after `start_after`, in order.
        let mut stream = store.subscribe(start_after);
        let (half_tx, half_rx) = tokio::sync::oneshot::channel::<()>();
        let subscriber = tokio::spawn(async move {
            let mut received = Vec::with_capacity(total);
            let mut half_tx = Some(half_tx);
            while received.len() < total {
                match tokio::time::timeout(STALL, stream.next()).await {
                    Ok(Some(Ok(e))) => received.push((e.sequence, e.event_id)),
                    Ok(Some(Err(e))) => return Err(anyhow!("subscription error: {e}")),
                    Ok(None) => return Err(anyhow!("subscription ended")),
                    Err(_) => break,
                }
                if received.len() >= total / 2
                    && let Some(tx) = half_tx.take()
                {
                    let _ = tx.send(());
                }
            }
            Ok((received, Instant::now()))
        });
        // Let the bus connect its LISTEN connection first.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let t0 = Instant::now();
        let mut appenders = Vec::new();
        for a in 0..writers {
            let store = store.clone();
            let mine = total / writers + usize::from(a < total % writers);
            appenders.push(tokio::spawn(async move {
                let mut ids = Vec::with_capacity(mine);
                let mut i = 0;
                while i < mine {
                    let n = BATCH.min(mine - i);
                    let batch: Vec<DomainEvent> = (i..i + n).map(bus_event).collect();
                    let stored = store.append(batch).await?;
                    ids.extend(stored.into_iter().map(|e| (e.sequence, e.event_id)));
                    i += n;
                }
                Ok::<_, anyhow::Error>((ids, Instant::now()))
            }));
        }
        // Half way: kill the LISTEN connection.
        let killed = match half_rx.await {
            Ok(()) => {
                let mut admin = sqlx::PgConnection::connect(&db.url).await?;
                let killed: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid() \
                     AND query LIKE 'LISTEN%') AS k",
                )
                .fetch_one(&mut admin)
                .await?;
                admin.close().await.ok();
                killed
            }
            Err(_) => 0,
        };
        let mut ids = Vec::with_capacity(total);
        let mut appended_at = t0;
        for a in appenders {
            let (mine, at) = a.await??;
            ids.extend(mine);
            appended_at = appended_at.max(at);
        }
        ids.sort_unstable();
        let (received, done_at) = subscriber.await??;
        let appended: HashSet<EventId> = ids.iter().map(|(_, id)| *id).collect();
        let mut seen = HashSet::with_capacity(received.len());
        let mut duplicates = 0;
        let mut out_of_order = 0;
        let mut last = 0;
        for (seq, id) in &received {
            if !seen.insert(*id) {
                duplicates += 1;
            }
            if *seq <= last {
                out_of_order += 1;
            }
            last = *seq;
        }
        let lost = appended.difference(&seen).count();
        // The delivery side alone: a new subscriber reads the backlog.
        let t = Instant::now();
        let mut catch_up = store.subscribe(start_after);
        let mut caught = 0;
        while caught < received.len() {
            match tokio::time::timeout(STALL, catch_up.next()).await {
                Ok(Some(Ok(_))) => caught += 1,
                _ => break,
            }
        }
        let catch_up_secs = t.elapsed().as_secs_f64();
        let missing: Vec<u64> = ids
            .iter()
            .filter(|(_, id)| !seen.contains(id))
            .map(|(seq, _)| *seq)
            .collect();
        let missing_ranges = ranges(&missing);
        Ok(Bus {
            events: received.len(),
            secs: done_at.saturating_duration_since(t0).as_secs_f64(),
            append_secs: appended_at.saturating_duration_since(t0).as_secs_f64(),
            lost,
            duplicates,
            out_of_order,
            killed,
            listener_connects: store.bus_stats().listener_connects,
            horizon: store.bus_stats().horizon,
            caught,
            catch_up_secs,
            last_appended: ids.last().map_or(0, |(seq, _)| *seq),
            missing_ranges,
        })
    }
    .await;
    store.close().await;
    db.drop_db().await;
    result
}
