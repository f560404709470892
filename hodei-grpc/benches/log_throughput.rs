//! Log throughput end to end through the real agent.
//!
//! One job prints 1,000,000 lines of 100 bytes (`awk` printing its line
//! number as 99 zero-padded digits) on a real `hodei-worker` process (local
//! provider, one warm reusable worker so that its pid is known before the
//! job starts). The lines go agent → gRPC session → server → log store.
//!
//! Prints:
//! - lines/s from RUNNING stored to the last line stored (probes on the
//!   job and log store ports), and MB/s;
//! - lines lost: the stored log is read back and must hold exactly the
//!   lines printed, with store sequences 1..=N and each line's text the
//!   number the job printed for it (no gap, duplicate or reordering);
//! - the agent's peak RSS (`VmHWM` of the hodei-worker process, polled
//!   from `/proc` while the job runs, and read again after);
//! - for reference, how long `awk` alone takes to print the lines into a
//!   pipe that is read and discarded.
//!
//! On the in-memory store, and on PostgreSQL (a fresh database) when
//! `HODEI_TEST_DATABASE_URL` is set.
//!
//! `cargo bench -p hodei-grpc --bench log_throughput` (`HODEI_BENCH_LINES=N`
//! to change the line count, `HODEI_BENCH_STORES=memory` or `postgres` for
//! one store only); without `--bench` a smoke pass.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hodei_core::job::JobState;
use hodei_core::runtime::Stores;
use hodei_grpc::config::ProviderKind;

fn main() {
    support::main_with(run());
}

struct Report {
    store: &'static str,
    lines: u64,
    secs: f64,
    end_to_end: f64,
    lost: u64,
    problems: Vec<String>,
    agent_idle_hwm: u64,
    agent_hwm: u64,
    appends: u64,
}

async fn run() -> Result<()> {
    support::print_header("log_throughput");
    let lines = support::size("HODEI_BENCH_LINES", 1_000_000, 20_000) as u64;
    println!(
        "one job printing {lines} lines of 100 bytes through a real hodei-worker ({}); \
         goal: >= 200,000 lines/s, 0 lost, agent peak RSS <= 30 MiB",
        support::worker_bin().display()
    );
    let baseline = awk_alone(lines)?;
    println!(
        "awk alone: {lines} lines into a pipe in {:.3} s ({:.0} lines/s)",
        baseline,
        lines as f64 / baseline
    );
    let only = std::env::var("HODEI_BENCH_STORES").unwrap_or_default();
    let wanted = |name: &str| only.is_empty() || only.split(',').any(|s| s.trim() == name);
    let mut reports = Vec::new();
    if wanted("memory") {
        reports.push(one_run("memory", Stores::memory(), lines).await?);
    }
    if !wanted("postgres") {
        println!("PostgreSQL: skipped (HODEI_BENCH_STORES={only})");
    } else if let Some(db) = support::fresh_database("logs").await? {
        let store = support::pg_store(&db.url).await?;
        let r = one_run(
            "postgres",
            Stores::from_store(Arc::new(store.clone())),
            lines,
        )
        .await;
        store.close().await;
        db.drop_db().await;
        reports.push(r?);
    } else {
        println!("PostgreSQL: skipped (HODEI_TEST_DATABASE_URL is not set)");
    }
    println!();
    println!(
        "  {:<9} {:>9} {:>9} {:>12} {:>8} {:>10} {:>6} {:>14} {:>14}",
        "store",
        "lines",
        "secs",
        "lines/s",
        "MB/s",
        "appends",
        "lost",
        "agent idle MiB",
        "agent peak MiB"
    );
    for r in &reports {
        println!(
            "  {:<9} {:>9} {:>9.3} {:>12.0} {:>8.1} {:>10} {:>6} {:>14} {:>14}",
            r.store,
            r.lines,
            r.secs,
            r.lines as f64 / r.secs,
            r.lines as f64 * 100.0 / r.secs / 1e6,
            r.appends,
            r.lost,
            support::mib(r.agent_idle_hwm),
            support::mib(r.agent_hwm)
        );
    }
    for r in &reports {
        println!("  {}: submit → job terminal {:.3} s", r.store, r.end_to_end);
        for p in &r.problems {
            println!("  {}: PROBLEM: {p}", r.store);
        }
    }
    Ok(())
}

/// Seconds `awk` takes to print `lines` lines into a pipe read by `cat`
/// into /dev/null.
fn awk_alone(lines: u64) -> Result<f64> {
    let t = Instant::now();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("awk '{}' | cat > /dev/null", program(lines)))
        .status()
        .context("running awk")?;
    if !status.success() {
        bail!("awk baseline failed: {status}");
    }
    Ok(t.elapsed().as_secs_f64())
}

/// The awk program printing `lines` numbered lines of 100 bytes.
fn program(lines: u64) -> String {
    format!("BEGIN {{ for (i = 0; i < {lines}; i++) printf \"%099d\\n\", i }}")
}

async fn one_run(store: &'static str, stores: Stores, lines: u64) -> Result<Report> {
    let state = tempfile::tempdir()?;
    let probed = support::probe(stores);
    let settings = support::provider(ProviderKind::Local, 1, 1, false, Some(state.path()));
    let server = support::start_server(
        probed.stores.clone(),
        vec![settings],
        Some(support::worker_bin()),
    )
    .await?;
    let cp = server.control_plane().clone();
    let ready = support::wait_ready(&cp, 1, Duration::from_secs(60)).await?;
    let worker = ready[0].id;
    let pid = support::agent_pid(state.path(), worker)
        .with_context(|| format!("no pid file for worker {worker}"))?;
    let agent_idle_hwm = support::proc_status_bytes(pid, "VmHWM").unwrap_or(0);

    // Poll the agent's peak RSS while the job runs.
    let peak = Arc::new(AtomicU64::new(agent_idle_hwm));
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(hwm) = support::proc_status_bytes(pid, "VmHWM") {
                    peak.fetch_max(hwm, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let before = probed.timing.snapshot();
    let agent_cpu0 = support::cpu_secs(&pid.to_string()).unwrap_or(0.0);
    let server_cpu0 = support::cpu_secs("self").unwrap_or(0.0);
    let t0 = Instant::now();
    let job = cp
        .submit(support::command(&["awk", &program(lines)]), &support::ctx())
        .await?;
    let started = probed
        .jobs
        .wait_running(job.id, Duration::from_secs(60))
        .await?;
    let (ended, state_end) = probed
        .jobs
        .wait_terminal(job.id, Duration::from_secs(1800))
        .await?;
    let agent_cpu = support::cpu_secs(&pid.to_string()).unwrap_or(0.0) - agent_cpu0;
    let server_cpu = support::cpu_secs("self").unwrap_or(0.0) - server_cpu0;
    stop.store(true, Ordering::Relaxed);
    let _ = poller.await;
    if let Some(hwm) = support::proc_status_bytes(pid, "VmHWM") {
        peak.fetch_max(hwm, Ordering::Relaxed);
    }
    let mut problems = Vec::new();
    if state_end != JobState::Succeeded {
        problems.push(format!("the job ended {state_end:?}"));
    }
    let (stored, last_at) = probed.logs.last(job.id).unwrap_or((0, started));
    let secs = last_at.saturating_duration_since(started).as_secs_f64();
    let (appends, _) = probed.logs.totals();

    // Read everything back.
    let mut expected: u64 = 0;
    let mut after = 0;
    loop {
        let page = cp.stores().logs.read(job.id, after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for line in page {
            if line.seq != expected + 1 {
                problems.push(format!("store sequence {} after {expected}", line.seq));
            }
            let number: Option<u64> = line.text.parse().ok();
            if (number != Some(expected) || line.text.len() != 99) && problems.len() < 10 {
                problems.push(format!(
                    "line {} holds {:?}, expected the number {expected}",
                    line.seq,
                    &line.text[..line.text.len().min(40)]
                ));
            }
            expected += 1;
        }
    }
    let lost = lines.saturating_sub(expected);
    if expected != lines {
        problems.push(format!("{expected} lines stored, {lines} printed"));
    }
    if stored != expected {
        problems.push(format!(
            "the log store reported {stored} lines, {expected} read back"
        ));
    }
    println!(
        "\n[{store}] CPU used during the job: agent {agent_cpu:.2} s, server (this process, \
         store included) {server_cpu:.2} s"
    );
    probed.timing.print_since(&before, 1);
    let report = Report {
        store,
        lines: expected,
        secs,
        end_to_end: ended.saturating_duration_since(t0).as_secs_f64(),
        lost,
        problems,
        agent_idle_hwm,
        agent_hwm: peak.load(Ordering::Relaxed),
        appends,
    };
    server
        .stop()
        .await
        .map_err(|e| anyhow::anyhow!("server stop: {e}"))?;
    Ok(report)
}
