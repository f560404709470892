//! The Docker provider against the real engine. Skipped (with a notice)
//! when the engine is unreachable, except with `CI=true`, where that fails.
//!
//! Containers run `hodei-providers-test:latest`, a busybox-only image built
//! here from `scratch` (never pulled), with a fake agent: either
//! `command_override` or a shell script bind-mounted as the agent. Every
//! test uses its own server id and removes its containers on the way out,
//! failed or not ([`Cleanup`]).

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hodei_core::ids::{JobId, WorkerId};
use hodei_core::ports::{ProviderError, WorkerExit, WorkerLaunch, WorkerProvider};
use hodei_core::spec::Resources;
use hodei_providers::docker::{
    self, AGENT_MOUNT_PATH, DockerConfig, DockerNetwork, DockerProvider, container_name,
};
use serde_json::Value;
use support::write_executable;

const TEST_IMAGE: &str = "hodei-providers-test:latest";

/// Returns early from a test when Docker is unreachable (fails under CI).
macro_rules! require_docker {
    () => {
        if !docker_ready() {
            return;
        }
    };
}

/// Whether the engine is reachable and the test image exists (built here
/// on first use).
fn docker_ready() -> bool {
    static READY: Mutex<Option<bool>> = Mutex::new(None);
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    *ready.get_or_insert_with(|| {
        let reachable = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .is_ok_and(|out| out.status.success());
        if !reachable {
            assert!(
                !matches!(
                    std::env::var("CI").as_deref(),
                    Ok("true" | "TRUE" | "True" | "1" | "yes")
                ),
                "Docker is unreachable and CI=true: the docker provider tests must run"
            );
            eprintln!("NOTICE: Docker is unreachable; skipping the docker provider tests");
            return false;
        }
        build_test_image();
        true
    })
}

/// Builds `hodei-providers-test:latest` (busybox from the host, `FROM
/// scratch`) unless it exists.
fn build_test_image() {
    if docker(&["image", "inspect", TEST_IMAGE]).is_ok() {
        return;
    }
    let busybox = std::env::var("HODEI_BUSYBOX").unwrap_or_else(|_| "/bin/busybox".to_owned());
    let dir = tempfile::tempdir().unwrap();
    fs::copy(&busybox, dir.path().join("busybox")).unwrap_or_else(|e| {
        panic!("{busybox}: {e} (install busybox-static: apt-get install -y busybox-static)")
    });
    fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
         RUN [\"/bin/busybox\", \"mkdir\", \"-p\", \"/tmp\"]\n\
         LABEL hodei.test=providers\n\
         CMD [\"/bin/sh\"]\n",
    )
    .unwrap();
    // The classic builder needs nothing from a registry for `FROM scratch`.
    let out = Command::new("docker")
        .args(["build", "-q", "-t", TEST_IMAGE])
        .arg(dir.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building {TEST_IMAGE} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs the docker CLI; stdout, or stderr as the error.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn inspect(name: &str) -> Value {
    let text = docker(&["inspect", name]).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()[0].clone()
}

/// Containers labelled with `server_id` (all states).
fn containers_of(server_id: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=hodei.server_id={server_id}"),
    ])
    .unwrap_or_default()
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Removes every container of a test's server id when dropped, even when
/// the test panicked.
struct Cleanup {
    server_id: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = containers_of(&self.server_id);
        if !ids.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(ids.iter().map(String::as_str));
            let _ = docker(&args);
        }
    }
}

/// A unique server id, its cleanup guard, and a config for it that runs
/// `command` as the fake agent.
fn setup(command: &str) -> (DockerConfig, Cleanup) {
    let server_id = format!("hodei-providers-test-{}", uuid::Uuid::new_v4());
    let mut config = DockerConfig::new("docker-test", server_id.clone());
    config.image = TEST_IMAGE.to_owned();
    config.stop_grace = Duration::from_secs(2);
    config.command_override = Some(vec!["sh".to_owned(), "-c".to_owned(), command.to_owned()]);
    // Lets scripts/test tell this run's containers from a concurrent run's.
    if let Ok(run) = std::env::var("HODEI_TEST_RUN_ID") {
        config.extra_labels.insert("hodei.test-run".to_owned(), run);
    }
    (config, Cleanup { server_id })
}

fn launch(config: &DockerConfig) -> WorkerLaunch {
    WorkerLaunch {
        worker: WorkerId::from_uuid(uuid::Uuid::new_v4()),
        token: "one-time-token".to_owned(),
        server_url: "http://127.0.0.1:50051".to_owned(),
        image: None,
        resources: Resources::default(),
        labels: BTreeMap::from([("pool".to_owned(), "test".to_owned())]),
        job: None,
        server_id: config.server_id.clone(),
        capacity: 1,
    }
}

fn env_of(container: &Value) -> BTreeMap<String, String> {
    container["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str()?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

async fn exit_of(
    exits: &mut (impl futures::Stream<Item = WorkerExit> + Unpin),
    worker: WorkerId,
) -> WorkerExit {
    let wait = async {
        loop {
            let exit = exits.next().await.expect("exit stream ended");
            if exit.worker == worker {
                return exit;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("no exit reported within 30 s")
}

#[tokio::test]
async fn create_sets_labels_env_and_limits_and_destroy_removes() {
    require_docker!();
    let (config, _cleanup) = setup("env > /tmp/agent-env; exec sleep 1000");
    let provider = DockerProvider::new(config.clone());
    assert_eq!(provider.kind(), "docker");
    assert!(provider.runs_images());
    let mut launch = launch(&config);
    let job = JobId::from_uuid(uuid::Uuid::new_v4());
    launch.job = Some(job);
    launch.resources = Resources {
        cpu: Some(0.5),
        memory_mb: Some(64),
    };
    let worker = launch.worker;
    provider.create(launch).await.unwrap();

    let name = container_name(worker);
    let container = inspect(&name);
    assert_eq!(container["Name"], format!("/hodei-worker-{worker}"));
    assert_eq!(container["State"]["Running"], true);
    let labels = &container["Config"]["Labels"];
    assert_eq!(labels["hodei.managed"], "true");
    assert_eq!(labels["hodei.worker_id"], worker.to_string());
    assert_eq!(labels["hodei.job_id"], job.to_string());
    assert_eq!(labels["hodei.server_id"], config.server_id);
    assert_eq!(labels["hodei.provider"], "docker-test");
    let env = env_of(&container);
    assert_eq!(env["HODEI_SERVER_URL"], "http://127.0.0.1:50051");
    assert_eq!(env["HODEI_WORKER_ID"], worker.to_string());
    assert_eq!(env["HODEI_WORKER_TOKEN"], "one-time-token");
    assert_eq!(env["HODEI_PROVIDER"], "docker-test");
    assert_eq!(env["HODEI_WORKER_LABELS"], "pool=test");
    assert_eq!(env["HODEI_WORKER_IMAGE"], TEST_IMAGE);
    let host = &container["HostConfig"];
    assert_eq!(host["Memory"], 64 * 1024 * 1024);
    assert_eq!(host["MemorySwap"], 64 * 1024 * 1024);
    assert_eq!(host["NanoCpus"], 500_000_000);
    assert_eq!(host["NetworkMode"], "host");
    assert_eq!(host["Init"], true);

    // The process inside got the contract too.
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(text) = docker(&["exec", &name, "cat", "/tmp/agent-env"]) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
    assert!(
        seen.contains(&format!("HODEI_WORKER_ID={worker}")),
        "{seen}"
    );

    let listed = provider.list().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|w| w.worker == worker && w.alive && w.server_id == config.server_id),
        "{listed:?}"
    );

    provider.destroy(worker).await.unwrap();
    assert!(docker(&["inspect", &name]).is_err(), "container removed");
    provider.destroy(worker).await.unwrap();
    assert!(containers_of(&config.server_id).is_empty());
}

#[tokio::test]
async fn bridge_mode_maps_the_host_gateway() {
    require_docker!();
    let (mut config, _cleanup) = setup("exec sleep 1000");
    config.network = DockerNetwork::Bridge;
    let provider = DockerProvider::new(config.clone());
    let launch = launch(&config);
    let worker = launch.worker;
    provider.create(launch).await.unwrap();
    let name = container_name(worker);
    let container = inspect(&name);
    assert_eq!(container["HostConfig"]["NetworkMode"], "bridge");
    assert_eq!(
        container["HostConfig"]["ExtraHosts"][0],
        "host.docker.internal:host-gateway"
    );
    assert_eq!(
        env_of(&container)["HODEI_SERVER_URL"],
        "http://host.docker.internal:50051"
    );
    let hosts = docker(&["exec", &name, "cat", "/etc/hosts"]).unwrap();
    assert!(hosts.contains("host.docker.internal"), "{hosts}");
    provider.destroy(worker).await.unwrap();
}

#[tokio::test]
async fn mounted_agent_is_the_entrypoint() {
    require_docker!();
    let (mut config, _cleanup) = setup("unused");
    config.command_override = None;
    // The image has no agent: a script on the host stands in for the
    // static binary (the test image has a shell to run it).
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("fake-agent");
    write_executable(&agent, "#!/bin/sh\nenv > /tmp/agent-env\nexec sleep 1000\n");
    config.agent_binary = Some(agent.clone());
    let provider = DockerProvider::new(config.clone());
    let launch = launch(&config);
    let worker = launch.worker;
    provider.create(launch).await.unwrap();

    let name = container_name(worker);
    let container = inspect(&name);
    assert_eq!(container["Path"], AGENT_MOUNT_PATH);
    let mount = &container["Mounts"][0];
    assert_eq!(mount["Destination"], AGENT_MOUNT_PATH);
    assert_eq!(mount["Source"], agent.display().to_string());
    assert_eq!(mount["RW"], false);
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(text) = docker(&["exec", &name, "cat", "/tmp/agent-env"]) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
    assert!(
        seen.contains(&format!("HODEI_WORKER_ID={worker}")),
        "{seen}"
    );
    provider.destroy(worker).await.unwrap();

    // A configured agent that does not exist fails the create, not the
    // container start.
    config.agent_binary = Some(dir.path().join("missing"));
    let provider = DockerProvider::new(config.clone());
    let err = provider.create(self::launch(&config)).await.unwrap_err();
    assert!(matches!(err, ProviderError::CreateFailed(_)), "{err:?}");
    assert!(!provider.health().await.healthy);
}

#[tokio::test]
async fn docker_kill_is_reported_as_an_exit() {
    require_docker!();
    let (config, _cleanup) = setup("exec sleep 1000");
    let provider = DockerProvider::new(config.clone());
    let mut exits = provider.exits();
    let launch = launch(&config);
    let worker = launch.worker;
    provider.create(launch).await.unwrap();
    docker(&["kill", &container_name(worker)]).unwrap();

    let exit = exit_of(&mut exits, worker).await;
    assert!(!exit.oom_killed);
    assert!(
        exit.reason.contains("exited with code 137"),
        "{}",
        exit.reason
    );
    // The exited container is still listed, as not alive, until destroyed.
    let listed = provider.list().await.unwrap();
    assert!(
        listed.iter().any(|w| w.worker == worker && !w.alive),
        "{listed:?}"
    );
    provider.destroy(worker).await.unwrap();
    assert!(containers_of(&config.server_id).is_empty());
}

#[tokio::test]
async fn exceeding_the_memory_limit_is_reported_as_oom() {
    require_docker!();
    // The shell holds 64 MB of output in a variable: far over 16 MiB.
    let (config, _cleanup) =
        setup("x=$(head -c 64000000 /dev/zero | tr '\\0' a); echo ${#x}; exec sleep 1000");
    let provider = DockerProvider::new(config.clone());
    let mut exits = provider.exits();
    let mut launch = launch(&config);
    launch.resources.memory_mb = Some(16);
    let worker = launch.worker;
    provider.create(launch).await.unwrap();

    let exit = exit_of(&mut exits, worker).await;
    assert!(exit.oom_killed, "{exit:?}");
    assert!(exit.reason.contains("out of memory"), "{}", exit.reason);
    assert!(exit.reason.contains("16 MiB"), "{}", exit.reason);
    provider.destroy(worker).await.unwrap();
}

#[tokio::test]
async fn missing_image_fails_fast_without_pulling() {
    require_docker!();
    let (config, _cleanup) = setup("exec sleep 1000");
    let provider = DockerProvider::new(config.clone());
    let mut launch = launch(&config);
    launch.image = Some("hodei-no-such-image:never".to_owned());
    let started = Instant::now();
    let err = provider.create(launch).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    match err {
        ProviderError::ImageNotFound(message) => {
            assert!(
                message.starts_with("hodei-no-such-image:never: "),
                "{message}"
            );
            assert!(message.contains("pulls nothing"), "{message}");
        }
        other => panic!("expected ImageNotFound, got {other:?}"),
    }
    assert!(containers_of(&config.server_id).is_empty());
}

#[tokio::test]
async fn a_new_instance_lists_leftovers_and_removes_them() {
    require_docker!();
    let (config, _cleanup) = setup("exec sleep 1000");
    let first = DockerProvider::new(config.clone());
    let running = launch(&config);
    let stopped = launch(&config);
    first.create(running.clone()).await.unwrap();
    first.create(stopped.clone()).await.unwrap();
    docker(&["kill", &container_name(stopped.worker)]).unwrap();
    drop(first);

    let second = DockerProvider::new(config.clone());
    let listed = second.list().await.unwrap();
    let state = |worker: WorkerId| {
        listed
            .iter()
            .find(|w| w.worker == worker)
            .map(|w| (w.alive, w.server_id.clone()))
    };
    assert_eq!(
        state(running.worker),
        Some((true, config.server_id.clone()))
    );
    assert_eq!(
        state(stopped.worker),
        Some((false, config.server_id.clone()))
    );

    assert_eq!(second.remove_all_managed().await.unwrap(), 2);
    assert!(containers_of(&config.server_id).is_empty());
    assert!(
        second
            .list()
            .await
            .unwrap()
            .iter()
            .all(|w| w.worker != running.worker)
    );
}

#[tokio::test]
async fn free_cleanup_removes_a_servers_containers() {
    require_docker!();
    let (config, _cleanup) = setup("exec sleep 1000");
    let provider = DockerProvider::new(config.clone());
    provider.create(launch(&config)).await.unwrap();
    assert_eq!(
        docker::remove_all_managed(Some(&config.server_id))
            .await
            .unwrap(),
        1
    );
    assert!(containers_of(&config.server_id).is_empty());
}

#[tokio::test]
async fn health_reports_a_reachable_engine() {
    require_docker!();
    let (config, _cleanup) = setup("exec sleep 1000");
    let health = DockerProvider::new(config).health().await;
    assert!(health.healthy, "{}", health.message);
    assert!(health.message.contains("reachable"), "{}", health.message);
}

#[tokio::test]
async fn an_absent_engine_is_unhealthy_and_unavailable() {
    // No Docker needed: the socket does not exist.
    let mut config = DockerConfig::new("docker", "server-a");
    config.docker_host = Some("unix:///nonexistent/hodei/docker.sock".to_owned());
    let provider = DockerProvider::new(config.clone());
    let health = provider.health().await;
    assert!(!health.healthy);
    assert!(health.message.contains("docker"), "{}", health.message);
    let err = provider.create(launch(&config)).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
    assert!(matches!(
        provider.list().await,
        Err(ProviderError::Unavailable(_))
    ));
}

#[tokio::test]
async fn a_hanging_engine_does_not_hang_calls() {
    // An "engine" that accepts connections and never answers.
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let accept = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut config = DockerConfig::new("docker", "server-a");
    config.docker_host = Some(format!("unix://{}", socket.display()));
    config.call_timeout = Duration::from_millis(300);
    let provider = DockerProvider::new(config.clone());

    let started = Instant::now();
    let health = provider.health().await;
    assert!(!health.healthy);
    assert!(health.message.contains("no answer"), "{}", health.message);
    let err = provider.destroy(launch(&config).worker).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    accept.abort();
}
