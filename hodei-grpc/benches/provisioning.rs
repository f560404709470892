//! Worker provisioning: create → READY.
//!
//! An embedded server with no warm pool and ephemeral workers gets trivial
//! jobs (`true`) one at a time; each job provisions its own worker, which
//! is destroyed after it. The next job is submitted once the previous
//! worker is gone, so provisionings do not overlap.
//!
//! Per worker, from its events (server clock):
//! - `requested → provisioned`: WorkerProvisioningRequested → WorkerProvisioned
//!   (the provider's `create` call: spawning the process, creating and
//!   starting the container);
//! - `requested → READY`: WorkerProvisioningRequested → WorkerReady (the
//!   agent started, connected, registered with its one-time token);
//!
//! And per job `submit → RUNNING stored` (client clock): the cold start.
//!
//! Providers: local (real `hodei-worker` processes; N=100) and Docker
//! (N=30) when `docker info` works and `hodei-worker:latest` exists (or
//! `scripts/worker-image` can build it), with the static agent mounted
//! when `HODEI_TEST_WORKER_BIN` names it or `target/static` holds it, and
//! the host network.
//!
//! `cargo bench -p hodei-grpc --bench provisioning`
//! (`HODEI_BENCH_WORKERS=N`, `HODEI_BENCH_DOCKER_WORKERS=N`); without
//! `--bench` a smoke pass of the local provider only.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use hodei_core::event::{DomainEvent, EventBody};
use hodei_core::ids::WorkerId;
use hodei_core::job::JobState;
use hodei_core::runtime::Stores;
use hodei_grpc::config::{ProviderKind, ProviderSettings};
use support::EventRecorder;

fn main() {
    support::main_with(run());
}

async fn run() -> Result<()> {
    support::print_header("provisioning");
    let n_local = support::size("HODEI_BENCH_WORKERS", 100, 5);
    let n_docker = support::size("HODEI_BENCH_DOCKER_WORKERS", 30, 0);
    println!(
        "ephemeral workers, no warm pool, one provisioning at a time; goals: local p50 <= 50 ms; \
         docker p50 <= 1 s, p99 <= 3 s"
    );
    let state = tempfile::tempdir()?;
    let local = support::provider(ProviderKind::Local, 4, 0, true, Some(state.path()));
    case(
        &format!("local ({})", support::worker_bin().display()),
        local,
        Some(support::worker_bin()),
        n_local,
    )
    .await?;

    if n_docker == 0 {
        println!("\ndocker: skipped (HODEI_BENCH_DOCKER_WORKERS=0, or a smoke run)");
        return Ok(());
    }
    match docker_setup() {
        Err(why) => println!("\ndocker: skipped ({why})"),
        Ok(agent) => {
            let mut settings = support::provider(ProviderKind::Docker, 4, 0, true, None);
            settings.default_image = Some("hodei-worker:latest".into());
            settings
                .extra
                .insert("network".into(), toml::Value::String("host".into()));
            let label = match &agent {
                Some(bin) => {
                    settings.extra.insert(
                        "agent_binary".into(),
                        toml::Value::String(bin.display().to_string()),
                    );
                    format!(
                        "docker, host network, static agent {} mounted",
                        bin.display()
                    )
                }
                None => "docker, host network, the image's agent".to_owned(),
            };
            let server_id = case(&label, settings, None, n_docker).await;
            if let Ok(id) = &server_id {
                let _ = hodei_providers::docker::remove_all_managed(Some(id)).await;
            }
            server_id?;
        }
    }
    Ok(())
}

/// Runs `n` jobs on fresh workers of `settings`; returns the server id.
async fn case(
    label: &str,
    settings: ProviderSettings,
    worker_bin: Option<PathBuf>,
    n: usize,
) -> Result<String> {
    let probed = support::probe(Stores::memory());
    let server = support::start_server(probed.stores.clone(), vec![settings], worker_bin).await?;
    let cp = server.control_plane().clone();
    let server_id = cp.config().server_id.clone();
    let recorder = EventRecorder::start(&cp);
    let mut cold = Vec::new();
    let mut failed = 0;
    // One unmeasured job first: page cache, first connection.
    for i in 0..=n {
        let t0 = Instant::now();
        let job = cp
            .submit(support::command(&["true"]), &support::ctx())
            .await?;
        let running = probed
            .jobs
            .wait_running(job.id, Duration::from_secs(60))
            .await?;
        let (_, state) = probed
            .jobs
            .wait_terminal(job.id, Duration::from_secs(60))
            .await?;
        if i > 0 {
            cold.push(running - t0);
            failed += usize::from(state != JobState::Succeeded);
        }
        support::wait_no_live_workers(&cp, Duration::from_secs(60)).await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut workers: HashMap<WorkerId, Marks> = HashMap::new();
    let mut order = Vec::new();
    for (_, e) in recorder.events() {
        let (worker, step) = match &e.body {
            EventBody::WorkerProvisioningRequested { worker_id, .. } => {
                order.push(*worker_id);
                (*worker_id, 0)
            }
            EventBody::WorkerProvisioned { worker_id, .. } => (*worker_id, 1),
            EventBody::WorkerRegistered { worker_id, .. } => (*worker_id, 2),
            EventBody::WorkerReady { worker_id } => (*worker_id, 3),
            _ => continue,
        };
        let m = workers.entry(worker).or_default();
        let slot = match step {
            0 => &mut m.requested,
            1 => &mut m.provisioned,
            2 => &mut m.registered,
            _ => &mut m.ready,
        };
        if slot.is_none() {
            *slot = Some(e);
        }
    }
    let mut create = Vec::new();
    let mut ready = Vec::new();
    let mut registered = Vec::new();
    // Skip the unmeasured first worker.
    for w in order.iter().skip(1) {
        let m = &workers[w];
        let Some(req) = &m.requested else { continue };
        if let Some(p) = &m.provisioned {
            create.push(support::between(req, p));
        }
        if let Some(r) = &m.registered {
            registered.push(support::between(req, r));
        }
        if let Some(r) = &m.ready {
            ready.push(support::between(req, r));
        }
    }
    support::print_latencies(
        &format!("{label}: {n} workers"),
        &[
            ("requested → provisioned (create call)".into(), create),
            ("requested → registered".into(), registered),
            ("requested → READY".into(), ready),
            ("submit → RUNNING stored (cold start)".into(), cold),
        ],
    );
    if failed > 0 {
        println!("  WARNING: {failed} of {n} jobs did not succeed");
    }
    drop(recorder);
    server
        .stop()
        .await
        .map_err(|e| anyhow!("server stop: {e}"))?;
    Ok(server_id)
}

#[derive(Default)]
struct Marks {
    requested: Option<DomainEvent>,
    provisioned: Option<DomainEvent>,
    registered: Option<DomainEvent>,
    ready: Option<DomainEvent>,
}

/// Checks Docker and the image (building it with `scripts/worker-image`
/// when missing); returns the static agent to mount, if there is one.
fn docker_setup() -> std::result::Result<Option<PathBuf>, String> {
    let quiet = |args: &[&str]| {
        Command::new("docker")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !quiet(&["info"]) {
        return Err("`docker info` fails: no Docker engine reachable".into());
    }
    if !quiet(&["image", "inspect", "hodei-worker:latest"]) {
        println!("\nbuilding hodei-worker:latest with scripts/worker-image ...");
        let script = support::workspace_root().join("scripts/worker-image");
        let ok = Command::new(&script)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok || !quiet(&["image", "inspect", "hodei-worker:latest"]) {
            return Err(format!(
                "hodei-worker:latest is missing and {} failed",
                script.display()
            ));
        }
    }
    let from_env = std::env::var_os("HODEI_TEST_WORKER_BIN")
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    let built = support::workspace_root()
        .join("target/static/x86_64-unknown-linux-gnu/release/hodei-worker");
    Ok(from_env.or_else(|| built.is_file().then_some(built)))
}
