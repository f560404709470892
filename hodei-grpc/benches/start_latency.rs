//! Submit → RUNNING latency with warm workers.
//!
//! An embedded server (`hodei_grpc::server::start`) with a warm pool of
//! reusable workers (`warm_pool` 2, `ephemeral = false`, at most 4) gets
//! trivial jobs (`true`) one at a time: each is submitted once the previous
//! one has ended, so an idle warm worker is always there and the figure is
//! the start path itself, not queueing. Jobs go in through the public
//! `ControlPlane::submit` and, separately, through the gRPC
//! `JobService.Submit` on loopback.
//!
//! Workers: in-process agents (`--provider inprocess`: agent tasks in the
//! server process, still over gRPC) and real `hodei-worker` processes
//! (local provider). Stores: the embedded in-memory store, and PostgreSQL
//! (a fresh database) when `HODEI_TEST_DATABASE_URL` is set.
//!
//! Figures per job (client clock unless said):
//! - `submit call`: the submit call returns (job stored);
//! - `submit → RUNNING stored`: until the job store call that records
//!   RUNNING returned (committed, on PostgreSQL) — the headline figure;
//! - `submit → JobStarted on bus`: until an event-bus subscriber in this
//!   process received JobStarted (what `Watch` clients see);
//! - `JobCreated → JobStarted`: the events' `occurred_at` (server clock).
//!
//! `cargo bench -p hodei-grpc --bench start_latency` (2000 jobs per case;
//! `HODEI_BENCH_JOBS=N` to change, `HODEI_BENCH_STORES=memory|postgres` and
//! `HODEI_BENCH_PROVIDERS=inprocess|local` to run some cases only); without
//! `--bench` a smoke pass.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use hodei_core::event::EventBody;
use hodei_core::ids::JobId;
use hodei_core::job::{JobState, JobStatus};
use hodei_core::runtime::Stores;
use hodei_grpc::config::ProviderKind;
use support::{EventRecorder, Probed};

const WARM: u32 = 2;
const MAX_WORKERS: u32 = 4;
const WAIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    ControlPlane,
    Grpc,
}

impl Api {
    fn name(self) -> &'static str {
        match self {
            Api::ControlPlane => "ControlPlane::submit",
            Api::Grpc => "gRPC JobService.Submit",
        }
    }
}

fn main() {
    support::main_with(run());
}

async fn run() -> Result<()> {
    support::print_header("start_latency");
    let n = support::size("HODEI_BENCH_JOBS", 2000, 20);
    let warmup = (n / 20).clamp(5, 100);
    println!(
        "{n} sequential `true` jobs per case after {warmup} warm-up jobs; warm pool {WARM} \
         reusable workers (max {MAX_WORKERS}); goal: memory p50 <= 5 ms, p99 <= 20 ms; \
         PostgreSQL p50 <= 10 ms"
    );
    let stores = std::env::var("HODEI_BENCH_STORES").unwrap_or_default();
    let providers = std::env::var("HODEI_BENCH_PROVIDERS").unwrap_or_default();
    let pick =
        |list: &str, name: &str| list.is_empty() || list.split(',').any(|s| s.trim() == name);
    let kinds: Vec<ProviderKind> = [ProviderKind::Inprocess, ProviderKind::Local]
        .into_iter()
        .filter(|k| {
            pick(
                &providers,
                if *k == ProviderKind::Local {
                    "local"
                } else {
                    "inprocess"
                },
            )
        })
        .collect();
    let mut summary = Vec::new();
    for kind in kinds.iter().copied().filter(|_| pick(&stores, "memory")) {
        let rows = case("memory", Stores::memory(), kind, n, warmup).await?;
        summary.extend(rows);
    }
    if !pick(&stores, "postgres") {
        println!("\nPostgreSQL: skipped (HODEI_BENCH_STORES={stores})");
    } else if support::pg_base_url().is_some() {
        for kind in kinds.iter().copied() {
            let Some(db) = support::fresh_database("start").await? else {
                break;
            };
            let store = support::pg_store(&db.url).await?;
            let stores = Stores::from_store(std::sync::Arc::new(store.clone()));
            let rows = case("postgres", stores, kind, n, warmup).await;
            store.close().await;
            db.drop_db().await;
            summary.extend(rows?);
        }
    } else {
        println!("\nPostgreSQL: skipped (HODEI_TEST_DATABASE_URL is not set)");
    }
    println!();
    println!("summary: submit → RUNNING stored (ms)");
    println!(
        "  {:<10} {:<10} {:<24} {:>8} {:>8} {:>8} {:>8}",
        "store", "workers", "api", "p50", "p90", "p99", "max"
    );
    for (store, workers, api, s) in summary {
        println!(
            "  {store:<10} {workers:<10} {api:<24} {:>8} {:>8} {:>8} {:>8}",
            support::ms(s.p50),
            support::ms(s.p90),
            support::ms(s.p99),
            support::ms(s.max)
        );
    }
    Ok(())
}

type Row = (&'static str, &'static str, &'static str, support::Summary);

async fn case(
    store_name: &'static str,
    stores: Stores,
    kind: ProviderKind,
    n: usize,
    warmup: usize,
) -> Result<Vec<Row>> {
    let workers = match kind {
        ProviderKind::Inprocess => "inprocess",
        _ => "local",
    };
    let state = tempfile::tempdir()?;
    let probed = support::probe(stores);
    let dir = (kind == ProviderKind::Local).then_some(state.path());
    let settings = support::provider(kind, MAX_WORKERS, WARM, false, dir);
    let bin = (kind == ProviderKind::Local).then(support::worker_bin);
    let server = support::start_server(probed.stores.clone(), vec![settings], bin).await?;
    let cp = server.control_plane().clone();
    let t = Instant::now();
    support::wait_ready(&cp, WARM as usize, Duration::from_secs(60)).await?;
    println!(
        "\n[{store_name}, {workers} workers] {WARM} warm workers READY after {} ms",
        t.elapsed().as_millis()
    );
    let recorder = EventRecorder::start(&cp);
    let mut client = support::job_client(server.grpc_addr()).await?;
    let mut rows = Vec::new();
    let mut table = Vec::new();
    for api in [Api::ControlPlane, Api::Grpc] {
        // Warm-up: connections, allocator, first-use paths.
        for _ in 0..warmup {
            one_job(&cp, &mut client, &probed, api).await?;
        }
        let before = probed.timing.snapshot();
        let mut jobs = Vec::with_capacity(n);
        for _ in 0..n {
            jobs.push(one_job(&cp, &mut client, &probed, api).await?);
        }
        println!("  [{}]", api.name());
        probed.timing.print_since(&before, n);
        let (bus, server_side) = from_events(&recorder, &jobs).await;
        let submit: Vec<_> = jobs.iter().map(|j| j.submit_returned - j.t0).collect();
        // Only jobs that did run: a failed dispatch is no start.
        let running: Vec<_> = jobs
            .iter()
            .filter_map(|j| j.running.map(|r| r - j.t0))
            .collect();
        report_failures(&cp, &jobs).await;
        table.push((format!("{}: submit call", api.name()), submit));
        if let Some(s) = support::summarize(&running) {
            rows.push((store_name, workers, api.name(), s));
        }
        table.push((format!("{}: submit → RUNNING stored", api.name()), running));
        table.push((format!("{}: submit → JobStarted on bus", api.name()), bus));
        table.push((
            format!("{}: JobCreated → JobStarted (server)", api.name()),
            server_side,
        ));
    }
    support::print_latencies(
        &format!("[{store_name}, {workers} workers] latencies"),
        &table,
    );
    let pool = cp.workers().await?.len();
    let mut ended: HashMap<String, usize> = HashMap::new();
    for (_, e) in recorder.events() {
        if let EventBody::WorkerTerminated { reason, .. } = &e.body {
            *ended.entry(reason.clone()).or_insert(0) += 1;
        }
    }
    println!("  workers created during the case: {pool}; terminated: {ended:?}");
    drop(recorder);
    server
        .stop()
        .await
        .map_err(|e| anyhow::anyhow!("server stop: {e}"))?;
    Ok(rows)
}

struct Sample {
    id: JobId,
    t0: Instant,
    submit_returned: Instant,
    /// When RUNNING was stored; `None` if the job ended without running.
    running: Option<Instant>,
    state: JobState,
}

async fn one_job(
    cp: &hodei_core::runtime::ControlPlane,
    client: &mut hodei_grpc::proto::job_service_client::JobServiceClient<tonic::transport::Channel>,
    probed: &Probed,
    api: Api,
) -> Result<Sample> {
    let t0 = Instant::now();
    let id = match api {
        Api::ControlPlane => {
            cp.submit(support::command(&["true"]), &support::ctx())
                .await?
                .id
        }
        Api::Grpc => support::grpc_submit(client, support::proto_command(&["true"])).await?,
    };
    let submit_returned = Instant::now();
    probed.jobs.wait_running(id, WAIT).await?;
    let (_, state) = probed.jobs.wait_terminal(id, WAIT).await?;
    let running = probed.jobs.running_at(id);
    Ok(Sample {
        id,
        t0,
        submit_returned,
        running,
        state,
    })
}

/// A job's terminal event.
fn is_end(body: &EventBody) -> bool {
    matches!(
        body,
        EventBody::JobSucceeded { .. }
            | EventBody::JobFailed { .. }
            | EventBody::JobCancelled { .. }
            | EventBody::JobTimedOut { .. }
            | EventBody::JobRetryExhausted { .. }
    )
}

/// Prints how many jobs did not succeed, and why (the first reasons).
async fn report_failures(cp: &hodei_core::runtime::ControlPlane, jobs: &[Sample]) {
    let failed: Vec<&Sample> = jobs
        .iter()
        .filter(|j| j.state != JobState::Succeeded)
        .collect();
    if failed.is_empty() {
        return;
    }
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for j in &failed {
        let reason = match cp.job(j.id).await {
            Ok(job) => match &job.status {
                JobStatus::Failed { failure } => format!("{:?}: {}", failure.kind, failure.message),
                other => format!("{other:?}"),
            },
            Err(e) => format!("cannot read the job: {e}"),
        };
        *reasons.entry(reason).or_insert(0) += 1;
    }
    let never_ran = failed.iter().filter(|j| j.running.is_none()).count();
    println!(
        "  WARNING: {} of {} jobs did not succeed ({never_ran} never ran):",
        failed.len(),
        jobs.len()
    );
    for (reason, count) in reasons {
        println!("    {count} x {reason}");
    }
}

/// Bus-observed start latencies (client clock) and JobCreated →
/// JobStarted (server clock) of `jobs`.
async fn from_events(recorder: &EventRecorder, jobs: &[Sample]) -> (Vec<Duration>, Vec<Duration>) {
    let Some(last) = jobs.last() else {
        return (Vec::new(), Vec::new());
    };
    // The bus may lag behind the store a little.
    let last_id = last.id;
    let _ = recorder
        .wait_for(Duration::from_secs(10), |events| {
            events
                .iter()
                .any(|(_, e)| e.job_id() == Some(last_id) && e.sequence > 0 && is_end(&e.body))
                .then_some(())
        })
        .await;
    let mut created = HashMap::new();
    let mut started = HashMap::new();
    for (seen, e) in recorder.events() {
        match &e.body {
            EventBody::JobCreated { job_id, .. } => {
                created.insert(*job_id, e);
            }
            EventBody::JobStarted { job_id, .. } => {
                started.entry(*job_id).or_insert((seen, e));
            }
            _ => {}
        }
    }
    let mut bus = Vec::new();
    let mut server_side = Vec::new();
    let (mut no_created, mut no_started) = (0, 0);
    for j in jobs {
        no_created += usize::from(!created.contains_key(&j.id));
        if let Some((seen, s)) = started.get(&j.id) {
            bus.push(seen.saturating_duration_since(j.t0));
            if let Some(c) = created.get(&j.id) {
                server_side.push(support::between(c, s));
            }
        } else if j.running.is_some() {
            no_started += 1;
        }
    }
    if no_created + no_started > 0 {
        println!(
            "  EVENT BUS LOST EVENTS: of {} jobs, JobCreated never delivered for {no_created}, \
             JobStarted for {no_started} (the store has them)",
            jobs.len()
        );
    }
    (bus, server_side)
}
