//! Harness of the end-to-end tests on PostgreSQL (`e2e_postgres`,
//! `e2e_replicas`): a fresh database per test (from
//! `HODEI_TEST_DATABASE_URL`), a private throwaway cluster when a test
//! restarts the database itself, `hodei-server` replicas on a fixed port
//! that can be SIGKILLed and started again, a job ledger written by the jobs
//! themselves, and the checks every recovery test makes.
//!
//! Without `HODEI_TEST_DATABASE_URL` the tests print a notice and pass,
//! except under `CI=true`, where they fail.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hodei_grpc::proto;
use nix::sys::signal::Signal;
use sqlx::{Connection, Executor, PgConnection};

use crate::e2e_support::{Client, SERVER_BIN, WORKER_BIN, alive, signal};

// ---------------------------------------------------------------- databases

fn in_ci() -> bool {
    matches!(
        std::env::var("CI").as_deref(),
        Ok("true" | "TRUE" | "True" | "1" | "yes")
    )
}

/// `HODEI_TEST_DATABASE_URL`, or `None` with a notice (a failure in CI).
pub fn admin_url() -> Option<String> {
    match std::env::var("HODEI_TEST_DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            assert!(
                !in_ci(),
                "CI=true but HODEI_TEST_DATABASE_URL is unset: the PostgreSQL end-to-end tests \
                 must run in CI (start a server with `scripts/pg start $(mktemp -d)`)"
            );
            use std::io::Write;
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                let _ = writeln!(
                    std::io::stderr(),
                    "note: skipping PostgreSQL end-to-end tests: HODEI_TEST_DATABASE_URL is unset \
                     (start a server with `scripts/pg start $(mktemp -d)`)"
                );
            });
            None
        }
    }
}

/// A database of its own, dropped with this guard.
pub struct TestDb {
    admin_url: String,
    name: String,
    /// URL of the test database.
    pub url: String,
}

/// A fresh database on the server of `HODEI_TEST_DATABASE_URL`, or `None`
/// (see [`admin_url`]).
pub async fn test_db() -> Option<TestDb> {
    let admin_url = admin_url()?;
    Some(create_db(&admin_url).await)
}

/// A fresh database on the server of `admin_url`.
pub async fn create_db(admin_url: &str) -> TestDb {
    let name = format!("hodei_e2e_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test database server: {e}"));
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .expect("create test database");
    admin.close().await.ok();
    TestDb {
        url: with_database(admin_url, &name),
        admin_url: admin_url.to_owned(),
        name,
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop may run inside the test's runtime: use a thread of our own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut admin = PgConnection::connect(&admin_url).await?;
                admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .await?;
                admin.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// A private throwaway cluster (`scripts/pg start`), for tests that
/// restart the database: the shared one serves other tests meanwhile.
/// Stopped and removed on drop.
pub struct PgCluster {
    dir: PathBuf,
    /// URL of its `hodei_test` database.
    pub url: String,
}

fn pg_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg")
}

impl PgCluster {
    /// Starts one, or `None` (with a notice, a failure in CI) when the
    /// PostgreSQL server binaries are not installed.
    pub fn start() -> Option<PgCluster> {
        let bindir = Command::new(pg_script()).arg("bindir").output();
        if !bindir.as_ref().is_ok_and(|o| o.status.success()) {
            assert!(
                !in_ci(),
                "CI=true but the PostgreSQL server binaries were not found (scripts/pg bindir)"
            );
            eprintln!("note: skipping: PostgreSQL server binaries not found (scripts/pg bindir)");
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "hodei-e2e-pg-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ));
        let out = Command::new(pg_script())
            .arg("start")
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/pg start");
        assert!(
            out.status.success(),
            "scripts/pg start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Some(PgCluster { dir, url })
    }

    /// `pg_ctl ARGS` on the cluster, as the user that owns it.
    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        let bindir = std::fs::read_to_string(self.dir.join("bindir")).expect("bindir");
        let pg_ctl = Path::new(bindir.trim()).join("pg_ctl");
        let data = self.dir.join("data");
        let owner = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&data).expect("data dir").uid()
        };
        let mut cmd = if nix::unistd::geteuid().is_root() && owner != 0 {
            let user = nix::unistd::User::from_uid(owner.into())
                .ok()
                .flatten()
                .expect("owner of the cluster");
            let mut c = Command::new("runuser");
            c.args(["-u", &user.name, "--"]).arg(&pg_ctl);
            c
        } else {
            Command::new(&pg_ctl)
        };
        cmd.arg("-D")
            .arg(&data)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run pg_ctl")
    }

    /// Stops the server (`-m fast`: open connections are terminated).
    pub fn stop_server(&self) {
        let out = self.pg_ctl(&["-m", "fast", "-w", "-t", "60", "stop"]);
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the stopped server again, on the same port.
    pub fn start_server(&self) {
        let log = self.dir.join("postgres.log");
        let log = log.to_str().expect("utf-8 path");
        let out = self.pg_ctl(&["-l", log, "-w", "-t", "60", "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = Command::new(pg_script())
            .arg("stop")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output();
    }
}

// ---------------------------------------------------------------- servers

/// A free TCP port of 127.0.0.1 (replicas keep theirs across restarts:
/// agents reconnect to the URL they were given).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// What a replica is started with; restarting it reuses all of it.
#[derive(Clone)]
pub struct ReplicaSpec {
    /// Its server id (stable across restarts: its leftovers are found).
    pub server_id: String,
    /// The database.
    pub database_url: String,
    /// gRPC port on 127.0.0.1.
    pub port: u16,
    /// Directory of its config, log and local provider state.
    pub dir: PathBuf,
    /// The config file (the database URL is given as a flag).
    pub toml: String,
}

impl ReplicaSpec {
    /// The local provider's state dir: `[[providers]] state_dir` should
    /// name it.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("local")
    }

    /// The server's stderr, appended across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A `hodei-server` process on PostgreSQL. SIGTERMed on drop.
pub struct Replica {
    pub spec: ReplicaSpec,
    child: Option<Child>,
}

impl Replica {
    /// Starts it and waits until it serves.
    pub fn start(spec: &ReplicaSpec) -> Replica {
        std::fs::create_dir_all(&spec.dir).expect("replica dir");
        let config = spec.dir.join("hodei.toml");
        std::fs::write(&config, &spec.toml).expect("write config");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.log_path())
            .expect("log file");
        let mut child = Command::new(SERVER_BIN)
            .arg("--grpc-addr")
            .arg(format!("127.0.0.1:{}", spec.port))
            .args(["--http-addr", "off", "--config"])
            .arg(&config)
            .arg("--database-url")
            .arg(&spec.database_url)
            .env("HODEI_WORKER_BIN", WORKER_BIN)
            .env(
                "RUST_LOG",
                "info,hodei_core::runtime=info,hodei_postgres=warn",
            )
            .env_remove("HODEI_API_TOKENS")
            .env_remove("HODEI_DATABASE_URL")
            .env_remove("HODEI_PROVIDERS")
            .env_remove("HODEI_SERVER_ID")
            .env_remove("HODEI_REPLICA_ID")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn hodei-server");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("hodei-server listening on grpc=") {
                    let _ = tx.send(());
                }
            }
        });
        // The port of a SIGKILLed predecessor is free at once; a slow
        // migration or a busy machine may take a while.
        if rx.recv_timeout(Duration::from_secs(90)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "hodei-server {} did not start; log:\n{}",
                spec.server_id,
                tail(
                    &std::fs::read_to_string(spec.log_path()).unwrap_or_default(),
                    60
                )
            );
        }
        Replica {
            spec: spec.clone(),
            child: Some(child),
        }
    }

    /// The server's pid.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILL, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id() as i32, Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits (SIGKILL after 20 s).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal(child.id() as i32, Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.spec.log_path()).unwrap_or_default()
    }

    /// A client. Its channel reconnects by itself: it stays usable
    /// across restarts of the server (calls fail with UNAVAILABLE while
    /// it is down).
    pub async fn client(&self) -> Client {
        Client::connect(&self.spec.url(), None, None).await
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Kills what a test leaves behind: the agents recorded in `state_dir`
/// (each leads its own process group; only verified agents are signalled)
/// and the job processes carrying `marker` (`NAME=VALUE`) in their
/// environment.
pub fn kill_leftovers(state_dirs: &[PathBuf], marker: &str) {
    for dir in state_dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "pid") {
                continue;
            }
            let Some(pid) = std::fs::read_to_string(&path).ok().and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("pid="))
                    .and_then(|p| p.trim().parse::<i32>().ok())
            }) else {
                continue;
            };
            if pid > 1 && is_agent_group_leader(pid) {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    for pid in crate::e2e_support::pids_with_env(marker) {
        if pid > 1 {
            signal(pid, Signal::SIGKILL);
        }
    }
}

/// `pid` is a live `hodei-worker` that leads its own process group.
fn is_agent_group_leader(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    // Fields after the command: state, ppid, pgrp.
    let pgrp = rest
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse::<i32>().ok());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    pgrp == Some(pid) && alive(pid) && String::from_utf8_lossy(&cmdline).contains("hodei-worker")
}

// ---------------------------------------------------------------- jobs

/// A job that records its execution in `ledger`: a `start` line, then an
/// `end` line when it finishes or is stopped by SIGTERM/SIGINT (SIGKILL
/// leaves no `end`). It prints `out 1 of <attempt>`, sleeps, then prints
/// `out 2 of <attempt>`. `marker` (`NAME=VALUE`) is put in its environment so
/// that leftovers can be found.
pub fn ledger_job(ledger: &Path, sleep: &str, marker: &str, key: &str) -> proto::JobSpec {
    let l = ledger.display();
    let script = format!(
        "rec() {{ echo \"$1 $HODEI_JOB_ID $HODEI_JOB_ATTEMPT $$ $(date +%s%N)\" >> '{l}'; }}; \
         trap 'rec end; exit 143' TERM INT; rec start; echo \"out 1 of $HODEI_JOB_ATTEMPT\"; \
         sleep {sleep}; echo \"out 2 of $HODEI_JOB_ATTEMPT\"; rec end"
    );
    let (name, value) = marker.split_once('=').expect("NAME=VALUE");
    proto::JobSpec {
        name: format!("ledger-{key}"),
        command: vec!["sh".into(), "-c".into(), script],
        env: [(name.to_owned(), value.to_owned())].into(),
        idempotency_key: Some(key.to_owned()),
        ..Default::default()
    }
}

/// One run of an attempt, from the ledger.
#[derive(Debug, Clone)]
pub struct Execution {
    pub job: String,
    pub attempt: u32,
    pub pid: u32,
    pub start_ns: u128,
    pub end_ns: Option<u128>,
}

/// The executions in a ledger.
pub fn read_ledger(ledger: &Path) -> Vec<Execution> {
    let text = std::fs::read_to_string(ledger).unwrap_or_default();
    let mut runs: Vec<Execution> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [what, job, attempt, pid, at] = f[..] else {
            panic!("malformed ledger line {line:?}");
        };
        let (attempt, pid, at) = (
            attempt.parse().expect("attempt"),
            pid.parse().expect("pid"),
            at.parse().expect("time"),
        );
        match what {
            "start" => runs.push(Execution {
                job: job.to_owned(),
                attempt,
                pid,
                start_ns: at,
                end_ns: None,
            }),
            "end" => {
                let run = runs
                    .iter_mut()
                    .rev()
                    .find(|r| r.job == job && r.pid == pid && r.end_ns.is_none())
                    .unwrap_or_else(|| panic!("`end` without `start`: {line:?}"));
                run.end_ns = Some(at);
            }
            other => panic!("unknown ledger record {other:?}"),
        }
    }
    runs
}

/// Jobs per state as the database holds them, keyed like [`state_name`]
/// (`JOB_STATE_RUNNING`). Read while no server runs (right after a
/// SIGKILL), it is exactly what the dead server left behind.
pub async fn db_job_states(url: &str) -> BTreeMap<String, usize> {
    let mut conn = PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the test database: {e}"));
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state")
            .fetch_all(&mut conn)
            .await
            .expect("count jobs per state");
    conn.close().await.ok();
    rows.into_iter()
        .map(|(state, n)| (format!("JOB_STATE_{state}"), n as usize))
        .collect()
}

/// A job of `ledger` running right now on an agent of the local provider
/// whose state dir is `state_dir`: its run (started, not ended, its
/// process alive), the agent's worker id and pid. The agent is the job
/// process's parent, recorded in a pid file of `state_dir`.
pub fn running_on_agent(ledger: &Path, state_dir: &Path) -> Option<(Execution, String, i32)> {
    let agents: Vec<(String, i32)> = std::fs::read_dir(state_dir)
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let worker = name.strip_suffix(".pid")?.to_owned();
            let pid = std::fs::read_to_string(entry.path())
                .ok()?
                .lines()
                .find_map(|l| {
                    l.strip_prefix("pid=")
                        .and_then(|p| p.trim().parse::<i32>().ok())
                })?;
            Some((worker, pid))
        })
        .collect();
    read_ledger(ledger)
        .into_iter()
        .filter(|r| r.end_ns.is_none() && alive(r.pid as i32))
        .find_map(|run| {
            let parent = parent_pid(run.pid as i32)?;
            let (worker, pid) = agents.iter().find(|(_, pid)| *pid == parent)?;
            is_agent_group_leader(*pid).then(|| (run, worker.clone(), *pid))
        })
}

/// The parent of a live process.
fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    // Fields after the command: state, ppid.
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Submits, retrying UNAVAILABLE (and transport failures, and calls that
/// hang) with the same idempotency key until `deadline`; the job of the
/// first OK. `None` when never acknowledged.
pub async fn submit_retrying(
    client: &Client,
    spec: &proto::JobSpec,
    deadline: Duration,
) -> Option<proto::Job> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(100);
    while start.elapsed() < deadline {
        let mut jobs = client.jobs();
        let call = jobs.submit(proto::SubmitJobRequest {
            spec: Some(spec.clone()),
        });
        match tokio::time::timeout(Duration::from_secs(15), call).await {
            Ok(Ok(resp)) => return resp.into_inner().job,
            Ok(Err(s))
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) => {}
            Ok(Err(s)) => panic!("submit refused: {s:?}"),
            Err(_) => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
    None
}

/// A job, retrying while the server or the database is unavailable.
pub async fn get_job(client: &Client, id: &str) -> Option<proto::Job> {
    let mut jobs = client.jobs();
    let call = jobs.get(proto::GetJobRequest {
        job_id: id.to_owned(),
    });
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(r)) => r.into_inner().job,
        _ => None,
    }
}

pub fn is_terminal(state: i32) -> bool {
    use proto::JobState::*;
    [Succeeded, Failed, Cancelled, TimedOut]
        .iter()
        .any(|s| *s as i32 == state)
}

pub fn state_name(state: i32) -> String {
    proto::JobState::try_from(state)
        .map(|s| s.as_str_name().to_owned())
        .unwrap_or_else(|_| format!("state {state}"))
}

/// Every job the server holds, by id (all pages of `List`).
pub async fn list_all_jobs(client: &Client) -> BTreeMap<String, proto::Job> {
    let mut out = BTreeMap::new();
    let mut cursor = String::new();
    loop {
        let page = client
            .jobs()
            .list(proto::ListJobsRequest {
                limit: 1000,
                cursor: cursor.clone(),
                ..Default::default()
            })
            .await
            .expect("list jobs")
            .into_inner();
        out.extend(page.jobs.into_iter().map(|j| (j.job_id.clone(), j)));
        if page.next_cursor.is_empty() {
            return out;
        }
        cursor = page.next_cursor;
    }
}

/// [`wait_all_terminal`] for thousands of jobs: each turn lists all jobs
/// (pages of 1,000) instead of asking for each one, so that polling does
/// not load the servers that run them. Panics after `deadline` naming the
/// stragglers.
pub async fn wait_all_terminal_listed(
    client: &Client,
    ids: &[String],
    deadline: Duration,
) -> BTreeMap<String, proto::Job> {
    let start = Instant::now();
    loop {
        let mut all = list_all_jobs(client).await;
        let pending: Vec<(&String, String)> = ids
            .iter()
            .filter_map(|id| match all.get(id) {
                Some(j) if is_terminal(j.state) => None,
                Some(j) => Some((id, state_name(j.state))),
                None => Some((id, "missing".into())),
            })
            .collect();
        if pending.is_empty() {
            return ids
                .iter()
                .map(|id| (id.clone(), all.remove(id).expect("listed above")))
                .collect();
        }
        assert!(
            start.elapsed() < deadline,
            "{} of {} jobs not terminal after {deadline:?}: {:?}",
            pending.len(),
            ids.len(),
            &pending[..pending.len().min(20)]
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until every job is terminal (polling each not yet terminal);
/// returns them. Panics after `deadline` naming the stragglers.
pub async fn wait_all_terminal(
    client: &Client,
    ids: &[String],
    deadline: Duration,
) -> BTreeMap<String, proto::Job> {
    let start = Instant::now();
    let mut done: BTreeMap<String, proto::Job> = BTreeMap::new();
    loop {
        let mut pending: Vec<(String, String)> = Vec::new();
        for id in ids {
            if done.contains_key(id) {
                continue;
            }
            match get_job(client, id).await {
                Some(j) if is_terminal(j.state) => {
                    done.insert(id.clone(), j);
                }
                Some(j) => pending.push((id.clone(), state_name(j.state))),
                None => pending.push((id.clone(), "unreadable".into())),
            }
        }
        if pending.is_empty() {
            return done;
        }
        assert!(
            start.elapsed() < deadline,
            "{} of {} jobs not terminal after {deadline:?}: {:?}",
            pending.len(),
            ids.len(),
            &pending[..pending.len().min(20)]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every event of the audit trail of one type (all pages).
pub async fn events_of_type(client: &Client, event_type: &str) -> Vec<proto::Event> {
    let mut out = Vec::new();
    loop {
        let page = client
            .audit()
            .query(proto::AuditQueryRequest {
                event_type: Some(event_type.to_owned()),
                limit: 1000,
                offset: out.len() as u32,
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_inner();
        if page.events.is_empty() {
            return out;
        }
        out.extend(page.events);
    }
}

/// How many events of a type the audit trail holds.
pub async fn count_events(client: &Client, event_type: &str) -> u64 {
    client
        .audit()
        .query(proto::AuditQueryRequest {
            event_type: Some(event_type.to_owned()),
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("audit")
        .into_inner()
        .total
}

/// The checks of every recovery test, over the final jobs:
/// - their events carry the job's correlation id and a non-empty actor,
///   and the terminal state has its event;
/// - no attempt started twice (one `JobStarted` per job and attempt);
/// - every decision has its event: each entry of the job's attempt history
///   has exactly one event that ended it, of the kind its outcome says
///   (`JobSucceeded`; `JobRetryScheduled` or the terminal `JobFailed` /
///   `JobTimedOut`; `JobCancelled`), with the same failure; an attempt that
///   failed as `dispatch_failed` has its `JobDispatchFailed`; an attempt
///   has a start time exactly when it has its `JobStarted`; and no event
///   ends an attempt the history does not hold (see [`check_decisions`]);
/// - with a ledger: no attempt ran twice, a job's runs never overlap in
///   time (where both ends are known), no run belongs to an attempt the
///   job never reached, and each succeeded attempt ran exactly once, to
///   its end.
///
/// Returns the number of jobs per final state.
pub async fn check_jobs(
    client: &Client,
    jobs: &BTreeMap<String, proto::Job>,
    ledger: Option<&Path>,
) -> BTreeMap<String, usize> {
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    // One read of the audit trail rather than one call per job (tests
    // check thousands). These jobs are decided, so all their events have
    // committed; other events committing meanwhile may shift the pages,
    // which shows an event twice at a page boundary: keep one.
    let mut per_job: BTreeMap<String, Vec<proto::Event>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for e in all_events(client).await {
        if e.aggregate_type == "job" && seen.insert(e.sequence) {
            per_job.entry(e.aggregate_id.clone()).or_default().push(e);
        }
    }
    for (id, job) in jobs {
        *by_state.entry(state_name(job.state)).or_default() += 1;
        let mut events = per_job.remove(id).unwrap_or_default();
        events.sort_by_key(|e| e.sequence);
        assert!(!events.is_empty(), "job {id} has no events");
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types[0], "JobCreated", "job {id}: {types:?}");
        for e in &events {
            assert_eq!(
                e.correlation_id, job.correlation_id,
                "job {id}: {} carries another correlation id",
                e.event_type
            );
            assert!(
                !e.correlation_id.is_empty() && !e.actor.is_empty(),
                "job {id}: {e:?}"
            );
        }
        let last = match proto::JobState::try_from(job.state) {
            Ok(proto::JobState::Succeeded) => "JobSucceeded",
            Ok(proto::JobState::Failed) => "JobFailed",
            Ok(proto::JobState::Cancelled) => "JobCancelled",
            Ok(proto::JobState::TimedOut) => "JobTimedOut",
            other => panic!("job {id} is not terminal: {other:?}"),
        };
        assert!(types.contains(&last), "job {id}: no {last} in {types:?}");
        let mut started = BTreeSet::new();
        for e in events.iter().filter(|e| e.event_type == "JobStarted") {
            let attempt = crate::e2e_support::payload(e)["attempt"]
                .as_u64()
                .expect("attempt");
            assert!(
                started.insert(attempt),
                "job {id}: attempt {attempt} started twice: {types:?}"
            );
        }
        check_decisions(id, job, &events);
    }
    if let Some(ledger) = ledger {
        let runs = read_ledger(ledger);
        let mut per_job: BTreeMap<&str, Vec<&Execution>> = BTreeMap::new();
        for r in &runs {
            per_job.entry(&r.job).or_default().push(r);
        }
        for (job, mut runs) in per_job.clone() {
            let mut attempts = BTreeSet::new();
            for r in &runs {
                assert!(
                    attempts.insert(r.attempt),
                    "job {job}: attempt {} ran twice: {runs:?}",
                    r.attempt
                );
            }
            if let Some(j) = jobs.get(job) {
                assert!(
                    runs.iter().all(|r| r.attempt <= j.attempt),
                    "job {job}: a run of an attempt the job never reached (it is at {}): {runs:?}",
                    j.attempt
                );
            }
            runs.sort_by_key(|r| r.start_ns);
            for pair in runs.windows(2) {
                if let Some(end) = pair[0].end_ns {
                    assert!(
                        end <= pair[1].start_ns,
                        "job {job}: attempts {} and {} overlapped: {runs:?}",
                        pair[0].attempt,
                        pair[1].attempt
                    );
                }
            }
        }
        for (id, job) in jobs {
            for a in job.attempts.iter().filter(|a| a.outcome == "succeeded") {
                let ran: Vec<&&Execution> = per_job
                    .get(id.as_str())
                    .map(|runs| runs.iter().filter(|r| r.attempt == a.number).collect())
                    .unwrap_or_default();
                assert!(
                    ran.len() == 1 && ran[0].end_ns.is_some(),
                    "job {id}: attempt {} succeeded but the ledger has {ran:?} for it",
                    a.number
                );
            }
        }
    }
    by_state
}

/// Every decision about `job` has its event, and every event that ends an
/// attempt matches the attempt history (see [`check_jobs`]).
pub fn check_decisions(id: &str, job: &proto::Job, events: &[proto::Event]) {
    use crate::e2e_support::payload;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let number = |e: &proto::Event, field: &str| {
        payload(e)[field]
            .as_u64()
            .unwrap_or_else(|| panic!("job {id}: {} without {field}: {e:?}", e.event_type))
            as u32
    };
    // The events that end an attempt, with the attempt they end.
    let ends: Vec<(u32, &proto::Event)> = events
        .iter()
        .filter_map(|e| {
            let n = match e.event_type.as_str() {
                "JobSucceeded" | "JobFailed" | "JobTimedOut" | "JobCancelled" => {
                    number(e, "attempt")
                }
                "JobRetryScheduled" => number(e, "failed_attempt"),
                _ => return None,
            };
            Some((n, e))
        })
        .collect();
    let numbers: Vec<u32> = job.attempts.iter().map(|a| a.number).collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]) && numbers.iter().all(|n| *n <= job.attempt),
        "job {id}: attempt history out of order or past attempt {}: {numbers:?}",
        job.attempt
    );
    for a in &job.attempts {
        let n = a.number;
        let ended: Vec<&str> = ends
            .iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, e)| e.event_type.as_str())
            .collect();
        let expected: &[&str] = match a.outcome.as_str() {
            "succeeded" => &["JobSucceeded"],
            "failed" => &["JobRetryScheduled", "JobFailed"],
            "timed_out" => &["JobRetryScheduled", "JobTimedOut"],
            "cancelled" => &["JobCancelled"],
            other => panic!("job {id}: attempt {n} has an unknown outcome {other:?}"),
        };
        assert!(
            ended.len() == 1 && expected.contains(&ended[0]),
            "job {id}: attempt {n} ended {} but its ending events are {ended:?} (expected one \
             of {expected:?}); events {types:?}",
            a.outcome
        );
        let (_, end) = ends
            .iter()
            .find(|(m, _)| *m == n)
            .expect("found just above");
        let p = payload(end);
        if let Some(f) = &a.failure {
            // A failed attempt: its event carries the same failure.
            assert_eq!(
                (
                    p["failure"]["kind"].as_str(),
                    p["failure"]["message"].as_str()
                ),
                (Some(f.kind.as_str()), Some(f.message.as_str())),
                "job {id}: attempt {n} failed with {f:?} but {} says {}",
                end.event_type,
                p["failure"]
            );
            if f.kind == "dispatch_failed" {
                assert!(
                    events
                        .iter()
                        .any(|e| e.event_type == "JobDispatchFailed" && number(e, "attempt") == n),
                    "job {id}: attempt {n} failed as dispatch_failed without a \
                     JobDispatchFailed: {types:?}"
                );
            }
        }
        if end.event_type == "JobRetryScheduled" {
            assert_eq!(number(end, "next_attempt"), n + 1, "job {id}: {p}");
            assert!(
                events
                    .iter()
                    .any(|e| e.event_type == "JobQueued" && number(e, "attempt") == n + 1),
                "job {id}: attempt {n} was retried but attempt {} was never queued: {types:?}",
                n + 1
            );
        }
        if let Some(w) = &a.worker_id
            && let Some(on) = p["worker_id"].as_str()
        {
            assert_eq!(on, w, "job {id}: attempt {n} ended on another worker");
        }
        // It started (the worker acknowledged it) exactly when it has a
        // start time; on the worker it ran on.
        let starts: Vec<&proto::Event> = events
            .iter()
            .filter(|e| e.event_type == "JobStarted" && number(e, "attempt") == n)
            .collect();
        assert_eq!(
            starts.len(),
            usize::from(a.started_at.is_some()),
            "job {id}: attempt {n} (started_at {:?}) has {} JobStarted",
            a.started_at,
            starts.len()
        );
        if let (Some(s), Some(w)) = (starts.first(), &a.worker_id) {
            assert_eq!(
                payload(s)["worker_id"].as_str(),
                Some(w.as_str()),
                "job {id}: attempt {n} started on another worker"
            );
        }
    }
    // Conversely, no event ends an attempt the history does not hold, but
    // for a cancel while the job waited in the queue (nothing ran).
    for (n, e) in &ends {
        if numbers.contains(n) {
            continue;
        }
        assert!(
            e.event_type == "JobCancelled" && payload(e)["from"] == "PENDING",
            "job {id}: {} ends attempt {n}, which is not in its history {numbers:?}",
            e.event_type
        );
    }
    // A job decided for good has one terminal decision, and its retries
    // exhausted only when it failed or timed out.
    let exhausted = types.iter().filter(|t| **t == "JobRetryExhausted").count();
    assert!(
        exhausted == 0
            || (exhausted == 1
                && [
                    proto::JobState::Failed as i32,
                    proto::JobState::TimedOut as i32
                ]
                .contains(&job.state)),
        "job {id}: {exhausted} JobRetryExhausted in state {}: {types:?}",
        state_name(job.state)
    );
}

/// One line per job that needed more than one attempt: how each failed
/// attempt ended (for the test's report).
pub fn retried(jobs: &BTreeMap<String, proto::Job>) -> Vec<String> {
    jobs.values()
        .filter(|j| j.attempt > 1)
        .map(|j| {
            let how: Vec<String> = j
                .attempts
                .iter()
                .map(|a| {
                    let on = a.worker_id.as_deref().unwrap_or("-");
                    match &a.failure {
                        Some(f) => format!("{}:{} ({}) on {on}", a.number, f.kind, f.message),
                        None => format!("{}:{} on {on}", a.number, a.outcome),
                    }
                })
                .collect();
            format!("{} {}", j.job_id, how.join(", "))
        })
        .collect()
}

// ---------------------------------------------------------------- failover

/// A TCP proxy in front of two replicas, as a load balancer with affinity
/// would be: each connection goes to `primary`, or to `backup` when the
/// primary refuses it (it is dead). Agents given the proxy's URL thus
/// reconnect to the surviving replica.
pub struct FailoverProxy {
    /// `127.0.0.1:PORT` of the proxy.
    pub addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl FailoverProxy {
    pub async fn start(primary: String, backup: String) -> FailoverProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let (primary, backup) = (primary.clone(), backup.clone());
                tokio::spawn(async move {
                    let connect = |to: String| async move {
                        tokio::time::timeout(
                            Duration::from_secs(2),
                            tokio::net::TcpStream::connect(to),
                        )
                        .await
                        .ok()
                        .and_then(Result::ok)
                    };
                    let outbound = match connect(primary).await {
                        Some(s) => Some(s),
                        None => connect(backup).await,
                    };
                    if let Some(mut outbound) = outbound {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        FailoverProxy { addr, task }
    }

    /// `http://ADDR`, for `advertise_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FailoverProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Worker ids of the agents a local provider started (their log files in
/// its state dir).
pub fn workers_in(state_dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(state_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".log").map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every event of the audit trail (all pages).
pub async fn all_events(client: &Client) -> Vec<proto::Event> {
    let mut out: Vec<proto::Event> = Vec::new();
    loop {
        let page = client
            .audit()
            .query(proto::AuditQueryRequest {
                limit: 1000,
                offset: out.len() as u32,
                ..Default::default()
            })
            .await
            .expect("audit")
            .into_inner();
        if page.events.is_empty() {
            return out;
        }
        out.extend(page.events);
    }
}

/// The checks of [`check_jobs`] from one read of the whole audit trail
/// (for thousands of jobs): each of `ids` has its events, in sequence
/// order, starting with `JobCreated`, all with the job's one correlation id
/// and an actor, one `JobStarted` per attempt, and exactly one terminal
/// event. Returns the number of jobs per terminal event type.
pub async fn check_events_bulk(client: &Client, ids: &[String]) -> BTreeMap<String, usize> {
    let events = all_events(client).await;
    let mut per_job: BTreeMap<&str, Vec<&proto::Event>> = BTreeMap::new();
    let mut last_seq = 0;
    for e in &events {
        assert!(e.sequence > last_seq, "sequences not increasing at {e:?}");
        last_seq = e.sequence;
        assert!(
            !e.correlation_id.is_empty() && !e.actor.is_empty(),
            "event without correlation id or actor: {e:?}"
        );
        if e.aggregate_type == "job" {
            per_job.entry(&e.aggregate_id).or_default().push(e);
        }
    }
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    for id in ids {
        let evs = per_job
            .get(id.as_str())
            .unwrap_or_else(|| panic!("job {id} has no events"));
        let types: Vec<&str> = evs.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types[0], "JobCreated", "job {id}: {types:?}");
        let corr = &evs[0].correlation_id;
        assert!(
            evs.iter().all(|e| &e.correlation_id == corr),
            "job {id}: several correlation ids"
        );
        let mut started = BTreeSet::new();
        for e in evs.iter().filter(|e| e.event_type == "JobStarted") {
            let attempt = crate::e2e_support::payload(e)["attempt"]
                .as_u64()
                .expect("attempt");
            assert!(
                started.insert(attempt),
                "job {id}: attempt {attempt} started twice"
            );
        }
        let terminal: Vec<&&str> = types
            .iter()
            .filter(|t| ["JobSucceeded", "JobFailed", "JobTimedOut", "JobCancelled"].contains(t))
            .collect();
        assert_eq!(terminal.len(), 1, "job {id}: {types:?}");
        *ends.entry(terminal[0].to_string()).or_default() += 1;
    }
    ends
}
