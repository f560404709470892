//! The local provider against real processes, with a fake agent: a shell
//! script that writes its environment to a file and then sleeps.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hodei_core::ids::{JobId, WorkerId};
use hodei_core::ports::{ProviderError, WorkerExit, WorkerLaunch, WorkerProvider};
use hodei_core::spec::Resources;
use hodei_providers::local::{LocalConfig, LocalProvider};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use support::write_executable;

/// A temp dir with a fake agent and a state dir.
struct Fixture {
    dir: tempfile::TempDir,
    agent: PathBuf,
}

impl Fixture {
    /// `body` runs after the environment was written (default: sleep).
    fn new(body: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("fake-agent");
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        write_executable(
            &agent,
            &format!(
                "#!/bin/sh\necho \"fake agent $HODEI_WORKER_ID\"\necho on-stderr >&2\nenv > \"{}/$HODEI_WORKER_ID.env.tmp\"\nmv \"{0}/$HODEI_WORKER_ID.env.tmp\" \"{0}/$HODEI_WORKER_ID.env\"\n{body}\n",
                out.display()
            ),
        );
        Self { dir, agent }
    }

    fn config(&self) -> LocalConfig {
        let mut config = LocalConfig::new("local", &self.agent);
        config.state_dir = self.dir.path().join("state");
        config.stop_grace = Duration::from_secs(2);
        config
    }

    fn provider(&self) -> LocalProvider {
        LocalProvider::new(self.config()).unwrap()
    }

    /// The environment the fake agent of `worker` saw.
    async fn agent_env(&self, worker: WorkerId) -> BTreeMap<String, String> {
        let path = self.dir.path().join("out").join(format!("{worker}.env"));
        let text = eventually("agent env file", || fs::read_to_string(&path).ok()).await;
        text.lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

fn launch(worker: WorkerId) -> WorkerLaunch {
    WorkerLaunch {
        worker,
        token: format!("token-{worker}"),
        server_url: "http://127.0.0.1:50051".to_owned(),
        image: None,
        resources: Resources::default(),
        labels: BTreeMap::from([
            ("arch".to_owned(), "x86_64".to_owned()),
            ("zone".to_owned(), "b".to_owned()),
        ]),
        job: Some(JobId::from_uuid(uuid::Uuid::new_v4())),
        server_id: "server-a".to_owned(),
        capacity: 1,
    }
}

fn new_worker() -> WorkerId {
    WorkerId::from_uuid(uuid::Uuid::new_v4())
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .next();
        !matches!(state, Some("Z" | "X"))
    })
}

/// Whether `/proc/<pid>` is gone: not even a zombie is left.
fn reaped(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn next_exit(exits: &mut (impl futures::Stream<Item = WorkerExit> + Unpin)) -> WorkerExit {
    tokio::time::timeout(Duration::from_secs(10), exits.next())
        .await
        .expect("no exit reported within 10 s")
        .expect("exit stream ended")
}

#[tokio::test]
async fn delivers_the_environment_contract() {
    let fixture = Fixture::new("exec sleep 1000");
    let provider = fixture.provider();
    assert_eq!(provider.kind(), "local");
    assert!(!provider.runs_images());
    let worker = new_worker();
    let launch = launch(worker);
    provider.create(launch.clone()).await.unwrap();

    let env = fixture.agent_env(worker).await;
    assert_eq!(env["HODEI_SERVER_URL"], "http://127.0.0.1:50051");
    assert_eq!(env["HODEI_WORKER_ID"], worker.to_string());
    assert_eq!(env["HODEI_WORKER_TOKEN"], launch.token);
    assert_eq!(env["HODEI_PROVIDER"], "local");
    assert_eq!(env["HODEI_WORKER_LABELS"], "arch=x86_64,zone=b");
    assert!(!env.contains_key("HODEI_WORKER_IMAGE"));
    // Cleared environment: only the allow-list (PATH at least) and the
    // contract; cargo's variables of this test process are not passed on.
    assert!(env.contains_key("PATH"));
    assert!(!env.keys().any(|k| k.starts_with("CARGO")), "{env:?}");

    // Own process group, pid file with the server id, log file.
    let pid = provider.pid(worker).unwrap();
    assert_eq!(
        nix::unistd::getpgid(Some(Pid::from_raw(pid as i32)))
            .unwrap()
            .as_raw(),
        pid as i32
    );
    let record = fs::read_to_string(provider.pid_path(worker)).unwrap();
    assert!(record.contains(&format!("pid={pid}\n")), "{record}");
    assert!(record.contains("server_id=server-a\n"), "{record}");
    let log = fs::read_to_string(provider.log_path(worker)).unwrap();
    assert!(log.contains(&format!("fake agent {worker}\n")), "{log}");
    assert!(log.contains("on-stderr\n"), "{log}");

    // A second create of the same worker is refused.
    assert!(matches!(
        provider.create(launch).await,
        Err(ProviderError::CreateFailed(_))
    ));
    provider.destroy(worker).await.unwrap();
}

#[tokio::test]
async fn reports_an_external_kill_and_reaps_the_child() {
    let fixture = Fixture::new("exec sleep 1000");
    let provider = fixture.provider();
    let mut exits = provider.exits();
    let worker = new_worker();
    provider.create(launch(worker)).await.unwrap();
    fixture.agent_env(worker).await;
    let pid = provider.pid(worker).unwrap();

    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let exit = next_exit(&mut exits).await;
    assert_eq!(exit.worker, worker);
    assert!(!exit.oom_killed);
    assert!(exit.reason.contains("signal 9"), "{}", exit.reason);

    assert!(reaped(pid), "the child is reaped, not left a zombie");
    assert!(!provider.pid_path(worker).exists());
    assert_eq!(provider.pid(worker), None);
    assert!(provider.list().await.unwrap().is_empty());
    // Destroying a worker that is gone succeeds.
    provider.destroy(worker).await.unwrap();
}

#[tokio::test]
async fn reports_a_normal_exit_with_its_code() {
    let fixture = Fixture::new("exit 3");
    let provider = fixture.provider();
    let mut exits = provider.exits();
    let worker = new_worker();
    provider.create(launch(worker)).await.unwrap();
    let exit = next_exit(&mut exits).await;
    assert_eq!(exit.worker, worker);
    assert_eq!(exit.reason, "agent exited with code 3");
}

#[tokio::test]
async fn destroy_terminates_and_leaves_no_process() {
    let fixture = Fixture::new("sleep 1000 & wait");
    let provider = fixture.provider();
    let mut exits = provider.exits();
    let worker = new_worker();
    provider.create(launch(worker)).await.unwrap();
    fixture.agent_env(worker).await;
    let pid = provider.pid(worker).unwrap();
    let listed = provider.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].worker, worker);
    assert_eq!(listed[0].server_id, "server-a");
    assert!(listed[0].alive);

    let started = Instant::now();
    provider.destroy(worker).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "SIGTERM was enough"
    );
    assert!(reaped(pid));
    // SIGTERM went to the whole group: the script's `sleep` is gone too.
    // (Delivery to the other members is asynchronous: give them a moment.)
    let group_left = || {
        fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|p| {
                nix::unistd::getpgid(Some(Pid::from_raw(*p)))
                    .is_ok_and(|g| g.as_raw() == pid as i32)
            })
            .filter(|p| alive(*p as u32))
            .count()
    };
    eventually("the worker's whole group to end", || {
        (group_left() == 0).then_some(())
    })
    .await;

    let exit = next_exit(&mut exits).await;
    assert_eq!(exit.worker, worker);
    assert!(provider.list().await.unwrap().is_empty());
    assert!(!provider.pid_path(worker).exists());
    provider.destroy(worker).await.unwrap();
    provider.destroy(new_worker()).await.unwrap();
}

#[tokio::test]
async fn destroy_kills_an_agent_that_ignores_sigterm() {
    let fixture = Fixture::new("trap '' TERM\nexec sleep 1000");
    let mut config = fixture.config();
    config.stop_grace = Duration::from_millis(300);
    let provider = LocalProvider::new(config).unwrap();
    let worker = new_worker();
    provider.create(launch(worker)).await.unwrap();
    fixture.agent_env(worker).await;
    let pid = provider.pid(worker).unwrap();

    let started = Instant::now();
    provider.destroy(worker).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(reaped(pid));
}

#[tokio::test]
async fn dropping_the_provider_kills_children_by_default() {
    let fixture = Fixture::new("exec sleep 1000");
    let provider = fixture.provider();
    let worker = new_worker();
    provider.create(launch(worker)).await.unwrap();
    fixture.agent_env(worker).await;
    let pid = provider.pid(worker).unwrap();
    let pid_path = provider.pid_path(worker);
    drop(provider);
    eventually("killed child", || (!alive(pid)).then_some(())).await;
    assert!(!pid_path.exists());
}

#[tokio::test]
async fn a_new_instance_lists_and_destroys_orphans() {
    let fixture = Fixture::new("exec sleep 1000");
    let mut config = fixture.config();
    config.kill_on_drop = false;
    let first = LocalProvider::new(config.clone()).unwrap();
    let worker = new_worker();
    first.create(launch(worker)).await.unwrap();
    fixture.agent_env(worker).await;
    let pid = first.pid(worker).unwrap();
    // As if the server restarted: the first instance goes away without
    // destroying its worker.
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(alive(pid), "the orphan survives the provider");

    // A stale record (its pid is a live process, but not the agent) is not
    // reported, and is cleaned up.
    let stale = config.state_dir.join(format!("{}.pid", new_worker()));
    fs::write(
        &stale,
        format!("pid={}\nserver_id=old\n", std::process::id()),
    )
    .unwrap();

    let second = LocalProvider::new(config).unwrap();
    let listed = second.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].worker, worker);
    assert_eq!(listed[0].server_id, "server-a");
    assert!(listed[0].alive);
    assert!(!stale.exists());

    second.destroy(worker).await.unwrap();
    eventually("orphan gone", || (!alive(pid)).then_some(())).await;
    assert!(second.list().await.unwrap().is_empty());
    assert!(!second.pid_path(worker).exists());
}

#[tokio::test]
async fn health_checks_the_agent_binary() {
    let fixture = Fixture::new("exec sleep 1000");
    let health = fixture.provider().health().await;
    assert!(health.healthy, "{}", health.message);

    let mut config = fixture.config();
    config.agent_binary = fixture.dir.path().join("missing");
    let provider = LocalProvider::new(config).unwrap();
    let health = provider.health().await;
    assert!(!health.healthy);
    assert!(health.message.contains("not found"), "{}", health.message);
    assert!(matches!(
        provider.create(launch(new_worker())).await,
        Err(ProviderError::CreateFailed(_))
    ));

    fs::set_permissions(&fixture.agent, fs::Permissions::from_mode(0o644)).unwrap();
    let health = fixture.provider().health().await;
    assert!(!health.healthy);
    assert!(
        health.message.contains("not executable"),
        "{}",
        health.message
    );
}

#[test]
fn finds_the_agent_next_to_the_test_binary() {
    // cargo puts this test in target/<profile>/deps and the agent, when the
    // workspace was built, in target/<profile>.
    let exe = std::env::current_exe().unwrap();
    let built = exe.parent().unwrap().parent().unwrap().join("hodei-worker");
    let found = hodei_providers::local::find_agent_binary();
    if let Some(found) = &found {
        assert!(found.is_absolute(), "{}", found.display());
        assert!(found.is_file(), "{}", found.display());
    }
    if built.is_file() && std::env::var_os("HODEI_WORKER_BIN").is_none() {
        assert_eq!(found, Some(built));
    }
}
