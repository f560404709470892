//! End to end with the Docker provider: a real `hodei-server` process whose
//! workers are containers of the real Docker engine, driven through the
//! gRPC API and the `hodei` CLI.
//!
//! The server binds its gRPC listener on `127.0.0.1` and the containers use
//! the `host` network mode (the provider's default), so the agents reach it
//! at the URL the server derives from its listener (docs/PROVIDERS.md).
//!
//! Skipped with a notice when the engine is unreachable or the local images
//! (`scripts/worker-image`) are missing, except with `CI=true`, where that
//! fails. Nothing is ever pulled. Every test has its own server id; a guard
//! removes the containers labelled with it when the test ends, failed or
//! not, and each test first checks that the server removed its workers'
//! containers by itself.

mod e2e_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e_support::*;
use hodei_grpc::proto;
use proto::JobState;

/// Built by `scripts/worker-image`: busybox + the agent as entrypoint.
const WORKER_IMAGE: &str = "hodei-worker:latest";
/// Built by `scripts/worker-image`: busybox only, no agent.
const BUSYBOX_IMAGE: &str = "hodei-test-busybox:latest";
/// Built here when `BUSYBOX_IMAGE` is missing: `FROM scratch` + busybox.
const OWN_BUSYBOX_IMAGE: &str = "hodei-e2e-noagent:latest";

/// Returns early from a test when Docker or the images are missing (fails
/// under `CI=true`).
macro_rules! require_docker {
    () => {
        if !docker_ready() {
            return;
        }
    };
}

fn in_ci() -> bool {
    // The same values as scripts/lib.sh `is_ci`.
    matches!(
        std::env::var("CI").as_deref(),
        Ok("true" | "TRUE" | "True" | "1" | "yes")
    )
}

/// Skips (outside CI) or fails (in CI) with `why`.
fn unavailable(why: &str) -> bool {
    assert!(
        !in_ci(),
        "{why} and CI=true: the docker end-to-end tests must run"
    );
    // Straight to the process's stderr: libtest does not capture it, so
    // the notice shows in a normal `cargo test` run.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "NOTICE: {why}; skipping the docker end-to-end tests"
    );
    false
}

/// The engine answers and the worker image exists.
fn docker_ready() -> bool {
    static READY: Mutex<Option<bool>> = Mutex::new(None);
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    *ready.get_or_insert_with(|| {
        if docker(&["version", "--format", "{{.Server.Version}}"]).is_err() {
            return unavailable("Docker is unreachable");
        }
        if docker(&["image", "inspect", WORKER_IMAGE]).is_err() {
            return unavailable(&format!(
                "image {WORKER_IMAGE} is missing (build it with scripts/worker-image)"
            ));
        }
        true
    })
}

/// The static agent to mount into images without one:
/// `HODEI_TEST_WORKER_BIN` (set by scripts/test), else what
/// `scripts/worker-image --static-agent-only` builds. `None` skips the test
/// (fails under CI).
fn static_agent() -> Option<PathBuf> {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/static/x86_64-unknown-linux-gnu/release/hodei-worker");
    let found = std::env::var_os("HODEI_TEST_WORKER_BIN")
        .map(PathBuf::from)
        .into_iter()
        .chain([built])
        .find(|p| p.is_file());
    match found {
        Some(p) => Some(p.canonicalize().unwrap_or(p)),
        None => {
            unavailable(
                "no static agent (HODEI_TEST_WORKER_BIN unset; build it with scripts/worker-image --static-agent-only)",
            );
            None
        }
    }
}

/// An image without the agent: `hodei-test-busybox:latest`, else one built
/// here from `scratch` and the host's static busybox.
fn image_without_agent() -> &'static str {
    static BUILT: Mutex<bool> = Mutex::new(false);
    if docker(&["image", "inspect", BUSYBOX_IMAGE]).is_ok() {
        return BUSYBOX_IMAGE;
    }
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !*built && docker(&["image", "inspect", OWN_BUSYBOX_IMAGE]).is_err() {
        let busybox = std::env::var("HODEI_BUSYBOX").unwrap_or_else(|_| "/bin/busybox".into());
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&busybox, dir.path().join("busybox"))
            .unwrap_or_else(|e| panic!("{busybox}: {e} (install busybox-static)"));
        std::fs::write(
            dir.path().join("Dockerfile"),
            "FROM scratch\n\
             COPY busybox /bin/busybox\n\
             RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
             RUN [\"/bin/busybox\", \"mkdir\", \"-p\", \"/tmp\", \"/usr/bin\"]\n\
             ENV PATH=/usr/bin:/bin\n\
             CMD [\"/bin/sh\"]\n",
        )
        .unwrap();
        let out = Command::new("docker")
            .args(["build", "-q", "-t", OWN_BUSYBOX_IMAGE])
            .arg(dir.path())
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "building {OWN_BUSYBOX_IMAGE} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    *built = true;
    OWN_BUSYBOX_IMAGE
}

/// Runs the docker CLI; trimmed stdout, or stderr as the error.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Containers (any state) labelled `hodei.managed=true` and with `server_id`.
fn containers_of(server_id: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--filter",
        "label=hodei.managed=true",
        "--filter",
        &format!("label=hodei.server_id={server_id}"),
    ])
    .unwrap_or_default()
    .lines()
    .map(str::to_owned)
    .collect()
}

fn container_exists(name: &str) -> bool {
    docker(&["inspect", "--type", "container", name]).is_ok()
}

/// Shell code for a job in a container that waits until the test calls
/// [`open_gate`] on that container (it cannot see the test's files), so
/// the test can look at the container while the job surely runs.
const CONTAINER_GATE: &str = "while [ ! -e /tmp/hodei-test-gate ]; do sleep 0.05; done";

/// Lets a job waiting at [`CONTAINER_GATE`] in container `name` go on.
fn open_gate(name: &str) {
    docker(&["exec", name, "touch", "/tmp/hodei-test-gate"])
        .unwrap_or_else(|e| panic!("docker exec {name} touch: {e}"));
}

fn inspect(name: &str) -> serde_json::Value {
    let text = docker(&["inspect", "--type", "container", name]).expect("docker inspect");
    serde_json::from_str::<serde_json::Value>(&text).unwrap()[0].clone()
}

/// Removes every container labelled with its server id when dropped, even
/// when the test panicked.
struct Containers {
    server_id: String,
}

impl Drop for Containers {
    fn drop(&mut self) {
        let ids = containers_of(&self.server_id);
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids.iter().map(String::as_str));
            let _ = docker(&args);
        }
    }
}

/// One `[[providers]]` entry of kind docker.
struct DockerProviderToml {
    name: &'static str,
    max_workers: u32,
    warm_pool: u32,
    ephemeral: bool,
    agent_binary: Option<PathBuf>,
    docker_host: Option<String>,
}

impl DockerProviderToml {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            max_workers: 4,
            warm_pool: 0,
            ephemeral: true,
            agent_binary: None,
            docker_host: None,
        }
    }

    fn toml(&self) -> String {
        let mut t = format!(
            "\n[[providers]]\nkind = \"docker\"\nname = \"{}\"\nmax_workers = {}\nwarm_pool = {}\nephemeral = {}\nstop_grace = \"2s\"\n",
            self.name, self.max_workers, self.warm_pool, self.ephemeral
        );
        if let Some(bin) = &self.agent_binary {
            t.push_str(&format!("agent_binary = \"{}\"\n", bin.display()));
        }
        if let Some(host) = &self.docker_host {
            t.push_str(&format!("docker_host = \"{host}\"\n"));
        }
        if let Ok(run) = std::env::var("HODEI_TEST_RUN_ID") {
            // scripts/test's safety net removes this run's containers.
            t.push_str(&format!("labels = {{ \"hodei.test-run\" = \"{run}\" }}\n"));
        }
        t
    }
}

/// A `hodei-server` process with docker providers, and the guard of its
/// containers (dropped after the server: fields drop in order).
struct DockerServer {
    server: TestServer,
    server_id: String,
    _containers: Containers,
}

struct Settings {
    providers: Vec<DockerProviderToml>,
    reconnect_grace: &'static str,
    reconcile_interval: &'static str,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            providers: vec![DockerProviderToml::new("docker")],
            reconnect_grace: "10s",
            reconcile_interval: "60s",
        }
    }
}

impl DockerServer {
    /// Starts the server; `before` runs with the server id before the
    /// server starts (to plant leftovers).
    fn start(settings: Settings) -> DockerServer {
        Self::start_after(settings, |_| {})
    }

    fn start_after(settings: Settings, before: impl FnOnce(&str)) -> DockerServer {
        let server_id = format!("e2e-docker-{}", uuid::Uuid::new_v4().simple());
        let containers = Containers {
            server_id: server_id.clone(),
        };
        before(&server_id);
        let dir = tempfile::Builder::new()
            .prefix("hodei-e2e-docker-")
            .tempdir()
            .expect("temp dir");
        let mut toml = format!(
            r#"server_id = "{server_id}"
drain_grace = "5s"

[engine]
retry_base = "200ms"
retry_cap = "1s"
retry_jitter = 0.0
heartbeat_timeout = "10s"
reconnect_grace = "{grace}"
claim_interval = "200ms"
provision_timeout = "60s"

[runtime]
heartbeat_interval = "1s"
health_interval = "1s"
reconcile_interval = "{reconcile}"
"#,
            grace = settings.reconnect_grace,
            reconcile = settings.reconcile_interval,
        );
        for p in &settings.providers {
            toml.push_str(&p.toml());
        }
        let config = dir.path().join("hodei.toml");
        std::fs::write(&config, toml).expect("write config");
        let stderr = std::fs::File::create(dir.path().join("server.log")).expect("log file");
        let mut child = Command::new(SERVER_BIN)
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "off",
                "--config",
            ])
            .arg(&config)
            .env("RUST_LOG", "info")
            .env_remove("HODEI_API_TOKENS")
            .env_remove("HODEI_DATABASE_URL")
            .env_remove("HODEI_PROVIDERS")
            .env_remove("HODEI_GRPC_ADDR")
            .env_remove("HODEI_ADVERTISE_URL")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn hodei-server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.strip_prefix("hodei-server listening on grpc=") {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let Ok(addr) = rx.recv_timeout(DEADLINE) else {
            let _ = child.kill();
            panic!(
                "hodei-server did not report its address; log:\n{}",
                std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
            );
        };
        DockerServer {
            server: TestServer {
                child: Some(child),
                url: format!("http://{addr}"),
                addr,
                dir,
                token: None,
            },
            server_id,
            _containers: containers,
        }
    }

    async fn client(&self) -> Client {
        self.server.client().await
    }

    /// Waits until the server itself removed every container of its own
    /// (workers are destroyed once their exit is handled).
    async fn wait_no_containers(&self) {
        let id = self.server_id.clone();
        wait_for("the server to remove its containers", DEADLINE, || async {
            containers_of(&id).is_empty().then_some(())
        })
        .await;
    }
}

/// A job for provider `provider` running `sh -c script`.
fn docker_job(provider: &str, script: &str) -> proto::JobSpec {
    let mut spec = sh(script);
    spec.provider = Some(provider.to_owned());
    spec.timeout_secs = Some(120);
    spec
}

fn failure(job: &proto::Job) -> proto::Failure {
    match job.status.as_ref().and_then(|s| s.state.clone()) {
        Some(proto::job_status::State::Failed(f)) => f.failure.expect("failure"),
        other => panic!("job {} is not FAILED: {other:?}", job.job_id),
    }
}

fn texts(logs: &[proto::LogLine]) -> Vec<&str> {
    logs.iter().map(|l| l.text.as_str()).collect()
}

// ------------------------------------------------------------------ tests

/// 1. A job runs in a container of the default image; its logs stream back
///    and its exit code is the CLI's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_in_a_container_of_the_default_image() {
    require_docker!();
    let ds = DockerServer::start(Settings::default());
    let client = ds.client().await;

    // Through the CLI: live logs and the job's exit code.
    let out = ds.server.cli(&[
        "job",
        "run",
        "--provider",
        "docker",
        "--",
        "sh",
        "-c",
        "echo hello from the container; echo oops >&2; exit 3",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains("hello from the container"),
        "{}",
        stdout(&out)
    );
    assert!(stderr(&out).contains("oops"), "{}", stderr(&out));

    // Through the API, watching the container while the job runs.
    let job = client
        .submit(docker_job(
            "docker",
            &format!(
                "echo started; {CONTAINER_GATE}; \
                 test -x /usr/local/bin/hodei-worker && echo agent-from-image"
            ),
        ))
        .await;
    let worker = client.running_worker(&job.job_id).await;
    let name = format!("hodei-worker-{worker}");
    let info = inspect(&name);
    let labels = &info["Config"]["Labels"];
    assert_eq!(labels["hodei.managed"], "true");
    assert_eq!(labels["hodei.worker_id"], worker.as_str());
    assert_eq!(labels["hodei.job_id"], job.job_id.as_str());
    assert_eq!(labels["hodei.server_id"], ds.server_id.as_str());
    assert_eq!(labels["hodei.provider"], "docker");
    assert_eq!(info["Config"]["Image"], WORKER_IMAGE);
    assert_eq!(info["HostConfig"]["NetworkMode"], "host");
    open_gate(&name);
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert_eq!(
        texts(&client.logs_of(&job.job_id).await),
        ["started", "agent-from-image"]
    );
    let events = client.events(&job.job_id).await;
    let requested = events
        .iter()
        .find(|e| e.event_type == "JobScheduled")
        .expect("JobScheduled");
    assert_eq!(payload(requested)["provider"], "docker");

    // The ephemeral workers' containers are gone once their jobs are.
    ds.wait_no_containers().await;

    // The worker went through its whole lifecycle, each step an event:
    // CREATING → CONNECTING → READY → BUSY → TERMINATING → TERMINATED.
    let lifecycle = [
        "WorkerProvisioningRequested",
        "WorkerProvisioned",
        "WorkerRegistered",
        "WorkerReady",
        "WorkerTerminated",
    ];
    let types = wait_for("the worker's WorkerTerminated", DEADLINE, || async {
        let types: Vec<String> = client
            .all_events()
            .await
            .iter()
            .filter(|e| e.aggregate_id == worker || payload(e)["worker_id"] == worker.as_str())
            .map(|e| e.event_type.clone())
            .collect();
        types
            .iter()
            .any(|t| t == "WorkerTerminated")
            .then_some(types)
    })
    .await;
    let mut rest = types.iter();
    for step in lifecycle {
        assert!(
            rest.any(|t| t == step),
            "{step} missing or out of order in the worker's events {types:?}"
        );
    }
    assert_eq!(
        types.last().map(String::as_str),
        Some("WorkerTerminated"),
        "{types:?}"
    );
    let workers = ds.server.cli(&["worker", "list", "--output", "json"]);
    assert!(workers.status.success(), "{}", stderr(&workers));
    let listed: serde_json::Value = serde_json::from_str(&stdout(&workers)).expect("json");
    let state = listed
        .as_array()
        .or_else(|| listed["workers"].as_array())
        .into_iter()
        .flatten()
        .find(|w| w["worker_id"] == worker.as_str() || w["id"] == worker.as_str())
        .map(|w| w["state"].clone());
    assert!(
        matches!(
            state.as_ref().and_then(|s| s.as_str()),
            None | Some("TERMINATED")
        ),
        "a removed container's worker is TERMINATED or no longer listed, got {state:?}"
    );
}

/// 2. A job in an image without the agent runs: the static agent is
///    mounted read-only and is the container's entrypoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_in_an_image_without_the_agent() {
    require_docker!();
    let Some(agent) = static_agent() else { return };
    let image = image_without_agent();
    let mut provider = DockerProviderToml::new("docker");
    provider.agent_binary = Some(agent.clone());
    let ds = DockerServer::start(Settings {
        providers: vec![provider],
        ..Settings::default()
    });
    let client = ds.client().await;

    let mut spec = docker_job(
        "docker",
        &format!(
            "test ! -e /usr/local/bin/hodei-worker && echo no-agent-in-image; \
             awk '$2 == \"/hodei/hodei-worker\" {{ split($4, o, \",\"); print \"agent mount \" o[1] }}' \
             /proc/mounts; {CONTAINER_GATE}"
        ),
    );
    spec.image = Some(image.to_owned());
    let job = client.submit(spec).await;
    let worker = client.running_worker(&job.job_id).await;
    let name = format!("hodei-worker-{worker}");
    let info = inspect(&name);
    assert_eq!(info["Config"]["Image"], image);
    assert_eq!(
        info["Config"]["Entrypoint"],
        serde_json::json!(["/hodei/hodei-worker"])
    );
    let mounts = info["Mounts"].as_array().expect("mounts");
    let mount = mounts
        .iter()
        .find(|m| m["Destination"] == "/hodei/hodei-worker")
        .expect("the agent is mounted");
    assert_eq!(mount["Source"], agent.display().to_string());
    assert_eq!(mount["RW"], false, "{mount}");
    open_gate(&name);

    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert_eq!(
        texts(&client.logs_of(&job.job_id).await),
        ["no-agent-in-image", "agent mount ro"]
    );
    ds.wait_no_containers().await;
}

/// 3. A job over its memory limit fails with `oom_killed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_over_its_memory_limit_fails_as_oom_killed() {
    require_docker!();
    let Some(agent) = static_agent() else { return };
    let mut provider = DockerProviderToml::new("docker");
    provider.agent_binary = Some(agent);
    let ds = DockerServer::start(Settings {
        providers: vec![provider],
        ..Settings::default()
    });
    let client = ds.client().await;

    // dd's 64 MiB buffer is filled by read(): far over a 16 MiB limit. The
    // kernel kills dd (the largest process), the script stops there (set -e,
    // exit 137) and the agent sees its cgroup's OOM counter rise.
    let mut spec = docker_job(
        "docker",
        "set -e; echo allocating; dd if=/dev/zero of=/dev/null bs=64M count=1; echo survived",
    );
    spec.resources = Some(proto::Resources {
        cpu: None,
        memory_mb: Some(16),
    });
    spec.max_attempts = Some(1);
    let job = client.submit(spec).await;
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Failed as i32, "{done:?}");
    let f = failure(&done);
    assert_eq!(f.kind, "oom_killed", "{f:?}");
    assert!(f.message.contains("OOM"), "{f:?}");
    let logs = client.logs_of(&job.job_id).await;
    assert!(
        texts(&logs).contains(&"allocating"),
        "the job ran: {logs:?}"
    );
    assert!(!texts(&logs).contains(&"survived"), "{logs:?}");
    let events = client.events(&job.job_id).await;
    let failed = events
        .iter()
        .find(|e| e.event_type == "JobFailed")
        .expect("JobFailed");
    assert_eq!(payload(failed)["failure"]["kind"], "oom_killed");
    ds.wait_no_containers().await;
}

/// 3b. When the OOM killer picks the agent instead (here the job makes it
///     the preferred victim), the container dies OOM-killed and the job
///     fails with `oom_killed` all the same, from the provider's report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_container_killed_for_memory_fails_its_job_as_oom_killed() {
    require_docker!();
    let ds = DockerServer::start(Settings::default());
    let client = ds.client().await;

    let mut spec = docker_job(
        "docker",
        "echo 1000 > /proc/$PPID/oom_score_adj; echo allocating; \
         dd if=/dev/zero of=/dev/null bs=64M count=1; echo survived",
    );
    spec.resources = Some(proto::Resources {
        cpu: None,
        memory_mb: Some(16),
    });
    spec.max_attempts = Some(2);
    let job = client.submit(spec).await;
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Failed as i32, "{done:?}");
    assert_eq!(done.attempt, 1, "an OOM kill is not retried: {done:?}");
    let f = failure(&done);
    assert_eq!(f.kind, "oom_killed", "{f:?}");
    assert!(f.message.contains("OOM"), "{f:?}");
    assert!(f.message.contains("out of memory: limit 16 MiB"), "{f:?}");
    ds.wait_no_containers().await;
}

/// 4. `docker kill` of a worker mid-job: the job is retried on a new
///    worker well before its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_container_is_replaced_and_the_job_retried() {
    require_docker!();
    let ds = DockerServer::start(Settings::default());
    let client = ds.client().await;

    let mut spec = docker_job(
        "docker",
        "if [ \"$HODEI_JOB_ATTEMPT\" = 1 ]; then echo first; sleep 300; fi; echo second",
    );
    spec.max_attempts = Some(2);
    let job = client.submit(spec).await;
    let first_worker = client.running_worker(&job.job_id).await;
    wait_for("the first attempt's output", DEADLINE, || async {
        let logs = client.logs_of(&job.job_id).await;
        texts(&logs).contains(&"first").then_some(())
    })
    .await;
    let killed_at = Instant::now();
    docker(&["kill", &format!("hodei-worker-{first_worker}")]).expect("docker kill");

    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert!(
        killed_at.elapsed() < Duration::from_secs(60),
        "recovered long before the 120 s deadline ({:?})",
        killed_at.elapsed()
    );
    assert_eq!(done.attempt, 2);
    let first = &done.attempts[0];
    assert_eq!(first.outcome, "failed");
    let f = first.failure.as_ref().expect("failure of attempt 1");
    assert_eq!(f.kind, "worker_lost", "{f:?}");
    assert!(f.message.contains("exited with code 137"), "{f:?}");
    assert_ne!(
        done.attempts[1].worker_id.as_deref(),
        Some(first_worker.as_str()),
        "a new worker ran the retry"
    );
    let logs = client.logs_of(&job.job_id).await;
    let by_attempt: Vec<(u32, &str)> = logs.iter().map(|l| (l.attempt, l.text.as_str())).collect();
    assert_eq!(by_attempt, [(1, "first"), (2, "second")]);
    // The killed container is removed too.
    ds.wait_no_containers().await;
}

/// 5. Orphan reconciliation removes this server's leftover container (a
///    worker id it does not know) and leaves another server's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_containers_of_this_server_are_removed_at_start() {
    require_docker!();
    let orphan = uuid::Uuid::new_v4().to_string();
    let foreign = uuid::Uuid::new_v4().to_string();
    let foreign_server = format!("e2e-docker-other-{}", uuid::Uuid::new_v4().simple());
    let _foreign_guard = Containers {
        server_id: foreign_server.clone(),
    };
    let planted = std::sync::Mutex::new(Vec::new());
    let ds = DockerServer::start_after(
        Settings {
            reconnect_grace: "1s",
            reconcile_interval: "1s",
            ..Settings::default()
        },
        |server_id| {
            // Not agents: processes that just stay (a running leftover is
            // the harder case; exited ones are leftovers too).
            let mut errors = planted.lock().unwrap();
            for (sid, worker) in [(server_id, &orphan), (foreign_server.as_str(), &foreign)] {
                let out = docker(&[
                    "run",
                    "-d",
                    "--pull=never",
                    "--entrypoint",
                    "/bin/sleep",
                    "--name",
                    &format!("hodei-worker-{worker}"),
                    "--label",
                    "hodei.managed=true",
                    "--label",
                    &format!("hodei.server_id={sid}"),
                    "--label",
                    "hodei.provider=docker",
                    "--label",
                    &format!("hodei.worker_id={worker}"),
                    WORKER_IMAGE,
                    "300",
                ]);
                if let Err(e) = out {
                    errors.push(e);
                }
            }
        },
    );
    let errors = planted.into_inner().unwrap();
    assert!(errors.is_empty(), "planting leftovers failed: {errors:?}");
    let orphan_name = format!("hodei-worker-{orphan}");
    let foreign_name = format!("hodei-worker-{foreign}");
    assert!(container_exists(&orphan_name));

    // First pass after reconnect_grace + 1 s = 2 s; then every second.
    let started = Instant::now();
    wait_for("the orphan to be removed", DEADLINE, || async {
        (!container_exists(&orphan_name)).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // Another server's container is not ours to remove.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        container_exists(&foreign_name),
        "another server's container was removed"
    );
    assert!(
        ds.server.log().contains("removing orphaned worker"),
        "{}",
        ds.server.log()
    );
    ds.wait_no_containers().await;
}

/// Submits `spec` with two attempts and waits for it: it must fail
/// within 30 s (no hang), both attempts as `provisioning_failed`. Returns
/// the job and the attempts' failures.
async fn fails_to_provision_twice(
    client: &Client,
    mut spec: proto::JobSpec,
) -> (proto::Job, Vec<proto::Failure>) {
    spec.max_attempts = Some(2);
    let started = Instant::now();
    let job = client.submit(spec).await;
    let done = client.wait_terminal(&job.job_id).await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "decided quickly ({:?})",
        started.elapsed()
    );
    assert_eq!(done.state, JobState::Failed as i32, "{done:?}");
    assert_eq!(done.attempt, 2, "retried per policy: {done:?}");
    let failures: Vec<proto::Failure> = done
        .attempts
        .iter()
        .map(|a| a.failure.clone().expect("failure"))
        .collect();
    for f in &failures {
        assert_eq!(f.kind, "provisioning_failed", "{f:?}");
    }
    (done, failures)
}

/// 6. A missing image fails the job clearly (nothing is pulled), retried
///    per policy, without hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_the_job_clearly() {
    require_docker!();
    let ds = DockerServer::start(Settings::default());
    let client = ds.client().await;
    let image = format!("hodei-e2e-missing-{}:latest", uuid::Uuid::new_v4().simple());

    let mut spec = docker_job("docker", "echo never");
    spec.image = Some(image.clone());
    let (job, failures) = fails_to_provision_twice(&client, spec).await;
    for f in &failures {
        assert!(f.message.contains(&image), "{f:?}");
        assert!(f.message.contains("pulls nothing"), "{f:?}");
    }
    let events = client.events(&job.job_id).await;
    assert!(events.iter().any(|e| e.event_type == "JobRetryScheduled"));
    assert!(events.iter().any(|e| e.event_type == "JobRetryExhausted"));
    assert!(
        docker(&["image", "inspect", &image]).is_err(),
        "the image was pulled"
    );
    assert!(containers_of(&ds.server_id).is_empty());
}

/// 6b. A container the engine refuses to create (a memory limit below
///     Docker's minimum of 6 MB) while the provider is healthy: the job
///     fails clearly with the engine's reason after its retries, nothing
///     hangs or leaks, and the provider keeps running other jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_the_engine_refuses_fails_the_job_and_the_provider_keeps_working() {
    require_docker!();
    let ds = DockerServer::start(Settings::default());
    let client = ds.client().await;

    let mut spec = docker_job("docker", "echo never");
    spec.resources = Some(proto::Resources {
        cpu: None,
        memory_mb: Some(1),
    });
    let (job, failures) = fails_to_provision_twice(&client, spec).await;
    for f in &failures {
        assert!(f.message.contains("worker creation failed"), "{f:?}");
        assert!(
            f.message.to_lowercase().contains("memory"),
            "the engine's reason: {f:?}"
        );
    }
    assert!(client.logs_of(&job.job_id).await.is_empty());
    // The same provider runs the next job.
    let ok = client.submit(docker_job("docker", "echo fine")).await;
    let ok = client.wait_terminal(&ok.job_id).await;
    assert_eq!(ok.state, JobState::Succeeded as i32, "{ok:?}");
    assert_eq!(texts(&client.logs_of(&ok.job_id).await), ["fine"]);
    ds.wait_no_containers().await;
}

/// A unix socket at `path` forwarding to the Docker engine's, until
/// dropped: a provider pointed at `path` sees the engine come and go.
struct EngineSocketProxy {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl EngineSocketProxy {
    fn start(path: &Path) -> EngineSocketProxy {
        let listener = tokio::net::UnixListener::bind(path).expect("bind proxy socket");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    if let Ok(mut up) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
            }
        });
        EngineSocketProxy {
            path: path.to_owned(),
            task,
        }
    }
}

impl Drop for EngineSocketProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// 8. `hodei provider list --output json` shows the docker provider healthy
///    with its configuration; a provider whose engine is unreachable turns
///    unhealthy (ProviderHealthChanged), a job naming it waits in the queue
///    (never SCHEDULED) and runs once its engine is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_health_is_listed_and_an_unhealthy_provider_gets_no_jobs() {
    require_docker!();
    if !Path::new("/var/run/docker.sock").exists() {
        unavailable("the engine is not at /var/run/docker.sock (needed to proxy it)");
        return;
    }
    let socket_dir = tempfile::tempdir().unwrap();
    let socket = socket_dir.path().join("engine.sock");
    let mut flaky = DockerProviderToml::new("docker-flaky");
    flaky.docker_host = Some(format!("unix://{}", socket.display()));
    flaky.max_workers = 1;
    let ds = DockerServer::start(Settings {
        providers: vec![DockerProviderToml::new("docker"), flaky],
        ..Settings::default()
    });
    let client = ds.client().await;

    let down = client
        .wait_event("ProviderHealthChanged", |e| {
            let p = payload(e);
            p["provider"] == "docker-flaky" && p["healthy"] == false
        })
        .await;
    let message = payload(&down)["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("engine.sock") || message.contains("connect"),
        "{message}"
    );

    let list = |server: &TestServer| -> serde_json::Value {
        let out = server.cli(&["--output", "json", "provider", "list"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(&stdout(&out)).expect("provider list JSON")
    };
    // Until its first health check a provider is listed healthy with the
    // message "not checked yet": wait for the check's own message.
    let listed = wait_for("docker listed healthy by a check", DEADLINE, || async {
        let v = list(&ds.server);
        let providers = v["providers"].as_array().cloned().unwrap_or_default();
        let docker = providers.iter().find(|p| p["id"] == "docker")?.clone();
        let checked = docker["health_message"]
            .as_str()
            .is_some_and(|m| m.contains("docker engine reachable"));
        (docker["healthy"] == true && checked).then_some(v)
    })
    .await;
    let providers = listed["providers"].as_array().unwrap();
    let docker = providers.iter().find(|p| p["id"] == "docker").unwrap();
    assert_eq!(docker["kind"], "docker");
    assert_eq!(docker["config"]["max_workers"], 4);
    assert_eq!(docker["config"]["ephemeral"], true);
    assert_eq!(docker["config"]["runs_images"], true);
    assert_eq!(docker["config"]["default_image"], WORKER_IMAGE);
    let health = docker["health_message"].as_str().unwrap();
    assert!(health.contains("docker engine reachable"), "{health}");
    assert!(health.contains("network host"), "{health}");
    let flaky = providers
        .iter()
        .find(|p| p["id"] == "docker-flaky")
        .unwrap();
    assert_eq!(flaky["healthy"], false, "{flaky}");

    // A job naming the unhealthy provider waits in the queue.
    let job = client
        .submit(docker_job("docker-flaky", "echo ran on the flaky engine"))
        .await;
    for _ in 0..15 {
        let j = client.job(&job.job_id).await;
        assert_eq!(j.state, JobState::Pending as i32, "{j:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !client
            .events(&job.job_id)
            .await
            .iter()
            .any(|e| e.event_type == "JobScheduled"),
        "scheduled on an unhealthy provider"
    );

    // The engine comes back: healthy again, and the job runs.
    let proxy = EngineSocketProxy::start(&socket);
    client
        .wait_event("ProviderHealthChanged", |e| {
            let p = payload(e);
            p["provider"] == "docker-flaky" && p["healthy"] == true
        })
        .await;
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert_eq!(
        texts(&client.logs_of(&job.job_id).await),
        ["ran on the flaky engine"]
    );
    ds.wait_no_containers().await;

    // And gone again: unhealthy.
    drop(proxy);
    let downs = |events: &[proto::Event]| {
        events
            .iter()
            .filter(|e| {
                let p = payload(e);
                p["provider"] == "docker-flaky" && p["healthy"] == false
            })
            .count()
    };
    wait_for("the second ProviderHealthChanged", DEADLINE, || async {
        let events = client.all_events().await;
        let v: Vec<proto::Event> = events
            .into_iter()
            .filter(|e| e.event_type == "ProviderHealthChanged")
            .collect();
        (downs(&v) >= 2).then_some(())
    })
    .await;
}

/// 9. Autoscaling of a reusable pool: the warm pool is filled at start,
///    queue depth scales it up, never past `max_workers`, and every
///    decision is an `AutoScalingTriggered` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reusable_pool_scales_with_the_queue_but_never_past_max() {
    require_docker!();
    let mut pool = DockerProviderToml::new("pool");
    pool.max_workers = 2;
    pool.warm_pool = 1;
    pool.ephemeral = false;
    let ds = DockerServer::start(Settings {
        providers: vec![pool],
        ..Settings::default()
    });
    let client = ds.client().await;

    // The warm pool: one worker, before any job.
    let first = client
        .wait_event("AutoScalingTriggered", |e| payload(e)["provider"] == "pool")
        .await;
    assert_eq!(payload(&first)["target"], 1, "{:?}", payload(&first));
    let id = ds.server_id.clone();
    wait_for("the warm worker's container", DEADLINE, || async {
        (containers_of(&id).len() == 1).then_some(())
    })
    .await;

    // Five jobs for two workers at most.
    let mut jobs = Vec::new();
    for i in 0..5 {
        jobs.push(
            client
                .submit(docker_job("pool", &format!("sleep 1; echo job {i}")))
                .await,
        );
    }
    let mut most = 0;
    let start = Instant::now();
    loop {
        let n = containers_of(&ds.server_id).len();
        most = most.max(n);
        assert!(n <= 2, "{n} containers for a pool of at most 2");
        let mut done = 0;
        for j in &jobs {
            let j = client.job(&j.job_id).await;
            if j.state == JobState::Succeeded as i32 {
                done += 1;
            } else {
                assert!(
                    ![JobState::Failed, JobState::Cancelled, JobState::TimedOut]
                        .iter()
                        .any(|s| *s as i32 == j.state),
                    "{j:?}"
                );
            }
        }
        if done == jobs.len() {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the jobs did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(most, 2, "the pool grew to its maximum");
    let scaling: Vec<serde_json::Value> = client
        .all_events()
        .await
        .iter()
        .filter(|e| e.event_type == "AutoScalingTriggered")
        .map(payload)
        .collect();
    assert!(
        scaling.iter().all(|p| p["target"].as_u64() <= Some(2)),
        "{scaling:?}"
    );
    // Workers are reused: fewer workers than jobs.
    let workers: std::collections::BTreeSet<String> = {
        let mut set = std::collections::BTreeSet::new();
        for j in &jobs {
            let j = client.job(&j.job_id).await;
            set.extend(j.attempts.iter().filter_map(|a| a.worker_id.clone()));
        }
        set
    };
    assert!(workers.len() <= 2, "{workers:?}");
}
