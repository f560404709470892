//! The local provider: each worker is a `hodei-worker` child process of the
//! server, on the same host.
//!
//! # Processes
//!
//! [`LocalProvider::create`] spawns the agent binary with the
//! [environment contract](crate::env), a cleared environment plus an
//! allow-list ([`LocalConfig::inherit_env`]), stdin from `/dev/null` and
//! stdout/stderr appended to `<state_dir>/<worker_id>.log` (or inherited, or
//! discarded: [`LocalOutput`]). Each child leads its own process group, so a
//! Ctrl-C meant for the server does not reach it and signals from
//! [`LocalProvider::destroy`] reach the whole group: `SIGTERM` (the agent
//! drains and exits 0), then `SIGKILL` after [`LocalConfig::stop_grace`].
//!
//! One task per child waits for it (so it is reaped, never a zombie),
//! forgets it, deletes its pid file and reports a [`WorkerExit`] on
//! [`LocalProvider::exits`] — for every end, including those `destroy`
//! caused.
//!
//! # Orphans
//!
//! Each child is recorded in `<state_dir>/<worker_id>.pid`:
//!
//! ```text
//! pid=12345
//! server_id=server-a
//! start_time=987654
//! agent=/usr/local/bin/hodei-worker
//! ```
//!
//! `start_time` is field 22 of `/proc/<pid>/stat` (clock ticks since boot):
//! with the pid, it names one process for the life of the machine, so a
//! recycled pid is never taken for the agent. A record counts as a live
//! worker when that process exists, is not a zombie, has the same start
//! time, and is still the agent: its `/proc/<pid>/cmdline` names the agent
//! binary, or (for an agent that re-executed itself) its
//! `/proc/<pid>/environ` holds `HODEI_WORKER_ID=<worker_id>`.
//! [`LocalProvider::list`] reports such records, whichever provider instance
//! wrote them, and deletes stale ones; [`LocalProvider::destroy`] kills them.
//!
//! What happens to children when the provider is dropped is a choice:
//! [`LocalConfig::kill_on_drop`] (default `true`) kills them (`SIGKILL` to
//! their groups) on drop, which is what an orderly shutdown that forgot to
//! destroy its workers wants. With `false` they survive the provider, as
//! they always survive a server that crashed or was killed (drop code never
//! runs then); either way the next provider instance finds them through
//! their pid files. An orderly shutdown should `destroy` its workers so that
//! they drain instead of being killed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use hodei_core::ids::{ProviderId, WorkerId};
use hodei_core::ports::{
    ProviderError, ProviderHealth, ProvisionedWorker, WorkerExit, WorkerLaunch, WorkerProvider,
};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgid};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::{agent_env, env};

/// The provider kind, as [`WorkerProvider::kind`] reports it.
pub const KIND: &str = "local";

/// File name of the agent binary that [`find_agent_binary`] looks for.
pub const AGENT_BINARY_NAME: &str = "hodei-worker";

/// Environment variable naming the agent binary explicitly.
pub const AGENT_BINARY_ENV: &str = "HODEI_WORKER_BIN";

/// Default of [`LocalConfig::stop_grace`].
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(5);

/// Default of [`LocalConfig::inherit_env`]: what a job on the host
/// reasonably expects, and nothing that could carry the server's own
/// credentials (`HODEI_DATABASE_URL`, tokens).
pub const DEFAULT_INHERIT_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "RUST_LOG",
    "RUST_BACKTRACE",
];

/// How long `destroy` waits for a process after `SIGKILL` before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How often `destroy` looks whether an orphan (not our child) is gone.
const ORPHAN_POLL: Duration = Duration::from_millis(25);

/// Configuration of a [`LocalProvider`]. Build it with [`LocalConfig::new`]
/// and change the public fields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LocalConfig {
    /// Provider name (`HODEI_PROVIDER` of its agents).
    pub id: ProviderId,
    /// The agent binary (made absolute by [`LocalProvider::new`]).
    /// [`find_agent_binary`] finds the usual one.
    pub agent_binary: PathBuf,
    /// Directory of pid files and log files. Default:
    /// [`default_state_dir`]. Created when missing.
    pub state_dir: PathBuf,
    /// Where the agents' stdout and stderr go. Default: a log file per
    /// worker.
    pub output: LocalOutput,
    /// Time between `SIGTERM` and `SIGKILL` in `destroy`. Default 5 s.
    pub stop_grace: Duration,
    /// Kill the children (`SIGKILL` to their process groups) when the
    /// provider is dropped. Default `true`; with `false` they outlive the
    /// provider and the next instance adopts them as orphans.
    pub kill_on_drop: bool,
    /// Variables of the server's environment passed on to agents; all
    /// others are cleared. Default: [`DEFAULT_INHERIT_ENV`].
    pub inherit_env: Vec<String>,
    /// Extra variables for every agent (they cannot override the contract
    /// variables of [`crate::env`]).
    pub extra_env: BTreeMap<String, String>,
}

impl LocalConfig {
    /// A configuration with the defaults: state dir from
    /// [`default_state_dir`], a log file per worker, 5 s stop grace,
    /// children killed on drop, [`DEFAULT_INHERIT_ENV`].
    pub fn new(id: impl Into<ProviderId>, agent_binary: impl Into<PathBuf>) -> Self {
        let id = id.into();
        Self {
            state_dir: default_state_dir(&id),
            id,
            agent_binary: agent_binary.into(),
            output: LocalOutput::LogFile,
            stop_grace: DEFAULT_STOP_GRACE,
            kill_on_drop: true,
            inherit_env: DEFAULT_INHERIT_ENV
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            extra_env: BTreeMap::new(),
        }
    }
}

/// Where an agent's stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LocalOutput {
    /// Appended to `<state_dir>/<worker_id>.log` (kept after the worker
    /// ends, for post-mortems).
    #[default]
    LogFile,
    /// The server's own stdout and stderr.
    Inherit,
    /// Discarded.
    Discard,
}

/// The state dir used when none is configured:
/// `$TMPDIR/hodei/local/<provider id>`. A temporary directory is right
/// here: the processes it records do not survive a reboot either.
pub fn default_state_dir(id: &ProviderId) -> PathBuf {
    std::env::temp_dir()
        .join("hodei")
        .join("local")
        .join(id.as_str())
}

/// Finds the agent binary: `$HODEI_WORKER_BIN` if it names an executable
/// file, else `hodei-worker` next to the current executable or in its
/// parent directory (cargo puts test binaries in `target/debug/deps`, the
/// agent in `target/debug`), else the first one on `PATH`. The path
/// returned is absolute.
pub fn find_agent_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(AGENT_BINARY_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if check_executable(&path).is_ok() {
            return Some(absolute(path));
        }
        tracing::warn!(
            path = %path.display(),
            "{AGENT_BINARY_ENV} is not an executable file; searching elsewhere"
        );
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    {
        for dir in [Some(dir.as_path()), dir.parent()].into_iter().flatten() {
            let candidate = dir.join(AGENT_BINARY_NAME);
            if check_executable(&candidate).is_ok() {
                return Some(absolute(candidate));
            }
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(AGENT_BINARY_NAME))
            .find(|candidate| check_executable(candidate).is_ok())
            .map(absolute)
    })
}

/// Runs workers as local child processes. See the [module docs](self).
pub struct LocalProvider {
    config: LocalConfig,
    shared: Arc<Shared>,
    exits: Mutex<Option<mpsc::UnboundedReceiver<WorkerExit>>>,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("config", &self.config)
            .field("children", &lock(&self.shared.children).len())
            .finish()
    }
}

impl LocalProvider {
    /// A provider with `config`; creates the state dir. Does not check the
    /// agent binary (that is [`WorkerProvider::health`]'s job, so that a
    /// missing binary shows as an unhealthy provider, not a server that
    /// refuses to start).
    pub fn new(mut config: LocalConfig) -> Result<Self, ProviderError> {
        config.agent_binary = absolute(config.agent_binary);
        fs::create_dir_all(&config.state_dir).map_err(|e| {
            ProviderError::Other(format!(
                "cannot create state dir {}: {e}",
                config.state_dir.display()
            ))
        })?;
        let (exits_tx, exits_rx) = mpsc::unbounded_channel();
        Ok(Self {
            config,
            shared: Arc::new(Shared {
                children: Mutex::new(HashMap::new()),
                exits_tx,
            }),
            exits: Mutex::new(Some(exits_rx)),
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &LocalConfig {
        &self.config
    }

    /// The log file of `worker` (written with [`LocalOutput::LogFile`]).
    pub fn log_path(&self, worker: WorkerId) -> PathBuf {
        self.config.state_dir.join(format!("{worker}.log"))
    }

    /// The pid file of `worker`.
    pub fn pid_path(&self, worker: WorkerId) -> PathBuf {
        self.config.state_dir.join(format!("{worker}.pid"))
    }

    /// The pid of `worker`'s agent, if it is running (a child of this
    /// instance, or an orphan recorded in the state dir).
    pub fn pid(&self, worker: WorkerId) -> Option<u32> {
        if let Some(tracked) = lock(&self.shared.children).get(&worker) {
            return Some(tracked.pid);
        }
        PidRecord::read(&self.pid_path(worker))
            .filter(|record| self.is_agent(record, worker))
            .map(|record| record.pid)
    }

    fn check_no_duplicate(&self, worker: WorkerId) -> Result<(), ProviderError> {
        if self.pid(worker).is_some() {
            return Err(ProviderError::CreateFailed(format!(
                "worker {worker} already exists"
            )));
        }
        Ok(())
    }

    fn output(&self, worker: WorkerId) -> Result<(Stdio, Stdio), ProviderError> {
        Ok(match self.config.output {
            LocalOutput::LogFile => {
                let path = self.log_path(worker);
                let file = fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| {
                        ProviderError::CreateFailed(format!(
                            "cannot open log file {}: {e}",
                            path.display()
                        ))
                    })?;
                let copy = file.try_clone().map_err(|e| {
                    ProviderError::CreateFailed(format!("cannot open log file: {e}"))
                })?;
                (Stdio::from(file), Stdio::from(copy))
            }
            LocalOutput::Inherit => (Stdio::inherit(), Stdio::inherit()),
            LocalOutput::Discard => (Stdio::null(), Stdio::null()),
        })
    }

    /// Whether `record` still describes a live agent for `worker`.
    fn is_agent(&self, record: &PidRecord, worker: WorkerId) -> bool {
        let Some(stat) = proc_stat(record.pid) else {
            return false;
        };
        if !stat.is_alive() {
            return false;
        }
        if record.start_time.is_some_and(|t| t != stat.start_time) {
            return false;
        }
        let agents = [
            record.agent.as_deref(),
            Some(self.config.agent_binary.as_path()),
        ];
        let names_agent = proc_file(record.pid, "cmdline").is_some_and(|cmdline| {
            cmdline.split(|b| *b == 0).any(|arg| {
                agents
                    .iter()
                    .flatten()
                    .any(|agent| arg == agent.as_os_str().as_bytes())
            })
        });
        names_agent || {
            let marker = format!("{}={worker}", env::WORKER_ID);
            proc_file(record.pid, "environ").is_some_and(|environ| {
                environ
                    .split(|b| *b == 0)
                    .any(|var| var == marker.as_bytes())
            })
        }
    }

    /// Stops a process that is not our child: signals, then polls `/proc`.
    async fn destroy_orphan(&self, worker: WorkerId, record: &PidRecord) {
        let is_ours = || self.is_agent(record, worker);
        // The agent was started as a process group leader; signal the group
        // only if that still holds.
        let group = getpgid(Some(Pid::from_raw(record.pid as i32)))
            .is_ok_and(|pgid| pgid.as_raw() == record.pid as i32);
        for (signal, wait) in [
            (Signal::SIGTERM, self.config.stop_grace),
            (Signal::SIGKILL, KILL_WAIT),
        ] {
            if !is_ours() {
                return;
            }
            tracing::info!(%worker, pid = record.pid, %signal, "stopping orphaned local worker");
            if group {
                signal_group(record.pid, signal);
            } else {
                let _ = kill(Pid::from_raw(record.pid as i32), signal);
            }
            let deadline = tokio::time::Instant::now() + wait;
            while is_ours() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(ORPHAN_POLL).await;
            }
        }
        if is_ours() {
            tracing::warn!(%worker, pid = record.pid, "orphaned local worker survived SIGKILL");
        }
    }
}

#[async_trait]
impl WorkerProvider for LocalProvider {
    fn id(&self) -> &ProviderId {
        &self.config.id
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    fn runs_images(&self) -> bool {
        false
    }

    async fn create(&self, launch: WorkerLaunch) -> Result<(), ProviderError> {
        let worker = launch.worker;
        self.check_no_duplicate(worker)?;
        check_executable(&self.config.agent_binary).map_err(ProviderError::CreateFailed)?;
        fs::create_dir_all(&self.config.state_dir).map_err(|e| {
            ProviderError::CreateFailed(format!(
                "cannot create state dir {}: {e}",
                self.config.state_dir.display()
            ))
        })?;
        let (stdout, stderr) = self.output(worker)?;

        let mut command = tokio::process::Command::new(&self.config.agent_binary);
        command.env_clear();
        for name in &self.config.inherit_env {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command.envs(&self.config.extra_env);
        for (name, value) in agent_env(&launch, &self.config.id, &launch.server_url) {
            command.env(name, value);
        }
        command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(self.config.kill_on_drop);
        let mut child = command.spawn().map_err(|e| {
            ProviderError::CreateFailed(format!(
                "cannot start {}: {e}",
                self.config.agent_binary.display()
            ))
        })?;
        // `id()` is `None` only once the child was waited for, and nothing
        // has waited for it yet.
        let Some(pid) = child.id() else {
            return Err(ProviderError::CreateFailed(
                "agent exited at once".to_owned(),
            ));
        };

        let record = PidRecord {
            pid,
            server_id: launch.server_id.clone(),
            start_time: proc_stat(pid).map(|stat| stat.start_time),
            agent: Some(self.config.agent_binary.clone()),
        };
        let pid_path = self.pid_path(worker);
        if let Err(e) = record.write(&pid_path) {
            signal_group(pid, Signal::SIGKILL);
            let _ = child.wait().await;
            return Err(ProviderError::CreateFailed(format!(
                "cannot write pid file {}: {e}",
                pid_path.display()
            )));
        }

        let (exited_tx, exited_rx) = watch::channel(false);
        // The lock is held while the waiter is spawned and registered, so the
        // waiter (which takes it to forget the child) always finds its entry.
        let mut children = lock(&self.shared.children);
        let shared = Arc::clone(&self.shared);
        let waiter = tokio::spawn(async move {
            let status = child.wait().await;
            {
                let mut children = lock(&shared.children);
                if children.get(&worker).is_some_and(|t| t.pid == pid) {
                    children.remove(&worker);
                }
            }
            PidRecord::remove_if_pid(&pid_path, pid);
            let _ = exited_tx.send(true);
            let reason = describe_exit(status);
            tracing::info!(%worker, pid, %reason, "local worker ended");
            let _ = shared.exits_tx.send(WorkerExit {
                worker,
                reason,
                oom_killed: false,
            });
        });
        children.insert(
            worker,
            Tracked {
                pid,
                exited: exited_rx,
                waiter: waiter.abort_handle(),
            },
        );
        tracing::info!(%worker, pid, agent = %self.config.agent_binary.display(), "local worker started");
        Ok(())
    }

    async fn destroy(&self, worker: WorkerId) -> Result<(), ProviderError> {
        let tracked = lock(&self.shared.children)
            .get(&worker)
            .map(|t| (t.pid, t.exited.clone()));
        if let Some((pid, mut exited)) = tracked {
            for (signal, wait) in [
                (Signal::SIGTERM, self.config.stop_grace),
                (Signal::SIGKILL, KILL_WAIT),
            ] {
                // Not yet reaped, so the pid (and group id) is still ours.
                if *exited.borrow() {
                    return Ok(());
                }
                tracing::info!(%worker, pid, %signal, "stopping local worker");
                signal_group(pid, signal);
                match tokio::time::timeout(wait, exited.wait_for(|done| *done)).await {
                    Ok(_) => return Ok(()),
                    Err(_) => continue,
                }
            }
            return Err(ProviderError::Other(format!(
                "worker {worker} (pid {pid}) did not exit after SIGKILL"
            )));
        }

        let path = self.pid_path(worker);
        let Some(record) = PidRecord::read(&path) else {
            return Ok(());
        };
        self.destroy_orphan(worker, &record).await;
        if self.is_agent(&record, worker) {
            return Err(ProviderError::Other(format!(
                "worker {worker} (pid {}) did not exit after SIGKILL",
                record.pid
            )));
        }
        PidRecord::remove_if_pid(&path, record.pid);
        Ok(())
    }

    async fn health(&self) -> ProviderHealth {
        if let Err(message) = check_executable(&self.config.agent_binary) {
            return ProviderHealth {
                healthy: false,
                message,
            };
        }
        if let Err(e) = fs::create_dir_all(&self.config.state_dir) {
            return ProviderHealth {
                healthy: false,
                message: format!(
                    "state dir {} unusable: {e}",
                    self.config.state_dir.display()
                ),
            };
        }
        ProviderHealth {
            healthy: true,
            message: format!(
                "agent {} is executable; {} worker(s) running",
                self.config.agent_binary.display(),
                lock(&self.shared.children).len()
            ),
        }
    }

    async fn list(&self) -> Result<Vec<ProvisionedWorker>, ProviderError> {
        let entries = match fs::read_dir(&self.config.state_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(ProviderError::Other(format!(
                    "cannot read state dir {}: {e}",
                    self.config.state_dir.display()
                )));
            }
        };
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != "pid") {
                continue;
            }
            let Some(worker) = path
                .file_stem()
                .and_then(|stem| stem.to_str())
                .and_then(|stem| stem.parse::<WorkerId>().ok())
            else {
                continue;
            };
            let Some(record) = PidRecord::read(&path) else {
                continue;
            };
            if self.is_agent(&record, worker) {
                found.push(ProvisionedWorker {
                    worker,
                    server_id: record.server_id,
                    alive: true,
                });
            } else if !lock(&self.shared.children).contains_key(&worker) {
                // The process is gone (or the pid now belongs to another
                // program): the record is stale.
                tracing::debug!(%worker, pid = record.pid, "removing stale pid file");
                PidRecord::remove_if_pid(&path, record.pid);
            }
        }
        found.sort_by_key(|w| w.worker);
        Ok(found)
    }

    fn exits(&self) -> BoxStream<'static, WorkerExit> {
        match lock(&self.exits).take() {
            Some(rx) => futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|exit| (exit, rx))
            })
            .boxed(),
            None => {
                tracing::warn!(provider = %self.config.id, "exits() called twice; the second stream is empty");
                futures::stream::empty().boxed()
            }
        }
    }
}

impl Drop for LocalProvider {
    fn drop(&mut self) {
        let children = std::mem::take(&mut *lock(&self.shared.children));
        for (worker, tracked) in children {
            if self.config.kill_on_drop && !*tracked.exited.borrow() {
                tracing::info!(%worker, pid = tracked.pid, "killing local worker (provider dropped)");
                signal_group(tracked.pid, Signal::SIGKILL);
                PidRecord::remove_if_pid(&self.pid_path(worker), tracked.pid);
            }
            // Dropping the waiter drops the `Child`; tokio reaps it in the
            // background (and kills it first when `kill_on_drop`).
            tracked.waiter.abort();
        }
    }
}

/// State shared with the waiter tasks.
struct Shared {
    children: Mutex<HashMap<WorkerId, Tracked>>,
    exits_tx: mpsc::UnboundedSender<WorkerExit>,
}

/// A child of this provider instance.
struct Tracked {
    pid: u32,
    /// Turns `true` once the child was reaped.
    exited: watch::Receiver<bool>,
    waiter: AbortHandle,
}

/// The contents of a pid file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PidRecord {
    pid: u32,
    server_id: String,
    /// Field 22 of `/proc/<pid>/stat` when the agent started.
    start_time: Option<u64>,
    agent: Option<PathBuf>,
}

impl PidRecord {
    fn read(path: &Path) -> Option<Self> {
        let text = fs::read_to_string(path).ok()?;
        let mut pid = None;
        let mut server_id = None;
        let mut start_time = None;
        let mut agent = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("pid", v)) => pid = v.trim().parse().ok(),
                Some(("server_id", v)) => server_id = Some(v.to_owned()),
                Some(("start_time", v)) => start_time = v.trim().parse().ok(),
                Some(("agent", v)) => agent = Some(PathBuf::from(v)),
                _ => {}
            }
        }
        Some(Self {
            pid: pid?,
            server_id: server_id.unwrap_or_default(),
            start_time,
            agent,
        })
    }

    /// Writes atomically (temp file, then rename), so a reader never sees
    /// half a record.
    fn write(&self, path: &Path) -> io::Result<()> {
        let mut text = format!("pid={}\nserver_id={}\n", self.pid, self.server_id);
        if let Some(start_time) = self.start_time {
            text.push_str(&format!("start_time={start_time}\n"));
        }
        if let Some(agent) = &self.agent {
            text.push_str(&format!("agent={}\n", agent.display()));
        }
        let tmp = path.with_extension("pid.tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, path)
    }

    /// Removes the pid file if it still records `pid` (a new worker with
    /// the same id may have replaced it).
    fn remove_if_pid(path: &Path, pid: u32) {
        if Self::read(path).is_some_and(|record| record.pid == pid) {
            let _ = fs::remove_file(path);
        }
    }
}

/// What `/proc/<pid>/stat` says about a process.
struct ProcStat {
    state: char,
    start_time: u64,
}

impl ProcStat {
    fn is_alive(&self) -> bool {
        // Z: zombie (exited, not reaped), X: dead.
        !matches!(self.state, 'Z' | 'X')
    }
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: the
    // other fields start after its last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        // Field 22 overall; `fields[0]` is field 3.
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn proc_file(pid: u32, name: &str) -> Option<Vec<u8>> {
    fs::read(format!("/proc/{pid}/{name}")).ok()
}

/// Sends `signal` to the process group led by `pid`; a group already gone
/// is not an error.
fn signal_group(pid: u32, signal: Signal) {
    if let Err(e) = killpg(Pid::from_raw(pid as i32), signal)
        && e != nix::errno::Errno::ESRCH
    {
        tracing::warn!(pid, %signal, error = %e, "cannot signal process group");
    }
}

fn describe_exit(status: io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("agent exited with code {code}"),
            (None, Some(signal)) => match Signal::try_from(signal) {
                Ok(name) => format!("agent killed by signal {signal} ({name})"),
                Err(_) => format!("agent killed by signal {signal}"),
            },
            (None, None) => format!("agent ended ({status})"),
        },
        Err(e) => format!("cannot wait for agent: {e}"),
    }
}

/// `Ok` if `path` is an executable regular file, else why not.
fn check_executable(path: &Path) -> Result<(), String> {
    match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err(format!(
            "agent binary {} is not a regular file",
            path.display()
        )),
        Ok(meta) if meta.permissions().mode() & 0o111 == 0 => {
            Err(format!("agent binary {} is not executable", path.display()))
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(format!(
            "agent binary {} not found (set {AGENT_BINARY_ENV} or build hodei-worker)",
            path.display()
        )),
        Err(e) => Err(format!("agent binary {}: {e}", path.display())),
    }
}

fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

/// Locks a mutex; a panic while holding it cannot leave these maps
/// half-updated (each critical section is a single insert/remove/take), so
/// a poisoned lock is still usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_record_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.pid");
        let record = PidRecord {
            pid: 42,
            server_id: "server-a".to_owned(),
            start_time: Some(7),
            agent: Some(PathBuf::from("/usr/bin/hodei-worker")),
        };
        record.write(&path).unwrap();
        assert_eq!(PidRecord::read(&path), Some(record));
        PidRecord::remove_if_pid(&path, 43);
        assert!(path.exists(), "another pid's record is kept");
        PidRecord::remove_if_pid(&path, 42);
        assert!(!path.exists());
    }

    #[test]
    fn minimal_pid_record_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.pid");
        fs::write(&path, "pid=9\nserver_id=s\n").unwrap();
        let record = PidRecord::read(&path).unwrap();
        assert_eq!((record.pid, record.server_id.as_str()), (9, "s"));
        assert_eq!(record.start_time, None);
        fs::write(&path, "garbage").unwrap();
        assert_eq!(PidRecord::read(&path), None);
    }

    #[test]
    fn own_stat_is_parsed() {
        let stat = proc_stat(std::process::id()).unwrap();
        assert!(stat.is_alive());
        assert!(stat.start_time > 0);
    }

    #[test]
    fn exit_descriptions() {
        assert_eq!(
            describe_exit(Ok(ExitStatus::from_raw(3 << 8))),
            "agent exited with code 3"
        );
        assert_eq!(
            describe_exit(Ok(ExitStatus::from_raw(9))),
            "agent killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn executable_check_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent");
        assert!(check_executable(&file).unwrap_err().contains("not found"));
        fs::write(&file, "#!/bin/sh\n").unwrap();
        assert!(
            check_executable(&file)
                .unwrap_err()
                .contains("not executable")
        );
        fs::set_permissions(&file, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check_executable(&file), Ok(()));
        assert!(
            check_executable(dir.path())
                .unwrap_err()
                .contains("not a regular file")
        );
    }
}
