//! One job on the agent: from `RunJob` to an [`ExecRequest`], then the
//! process, its log batches and its result, all through the outbox.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use prost::Message;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::exec::{self, ExecOutcome, ExecProgram, ExecRequest};
use super::outbox::{AttemptKey, Outbox};
use crate::proto::worker_message::Kind;
use crate::proto::{self, JobResult, LogBatch, RunJob, WorkerMessage};

/// Lines buffered between the job's pipes and its batcher.
const LINE_CHANNEL: usize = 1024;

/// Most bytes of log lines in one `LogBatch` (its encoding, give or take
/// the job id): far below the 16 MiB the server accepts per message
/// ([`crate::server::MAX_MESSAGE_SIZE`]), whatever the batch size. A
/// line is at most 64 KiB of output, so at most 192 KiB once invalid
/// UTF-8 is replaced, and always fits.
pub const MAX_LOG_BATCH_BYTES: usize = 1024 * 1024;

/// Log batching settings, shared by all jobs and updated by each `Welcome`.
#[derive(Debug)]
pub(crate) struct LogSettings {
    batch_size: AtomicUsize,
    flush_ms: AtomicU64,
}

impl LogSettings {
    pub(crate) fn new(batch_size: usize, flush: Duration) -> Arc<Self> {
        let settings = Arc::new(Self {
            batch_size: AtomicUsize::new(1),
            flush_ms: AtomicU64::new(0),
        });
        settings.set(batch_size, flush);
        settings
    }

    pub(crate) fn set(&self, batch_size: usize, flush: Duration) {
        self.batch_size.store(batch_size.max(1), Ordering::Relaxed);
        let ms = u64::try_from(flush.as_millis()).unwrap_or(u64::MAX);
        self.flush_ms.store(ms, Ordering::Relaxed);
    }

    fn batch_size(&self) -> usize {
        self.batch_size.load(Ordering::Relaxed)
    }

    fn flush(&self) -> Duration {
        Duration::from_millis(self.flush_ms.load(Ordering::Relaxed))
    }
}

/// The agent's job slots in use, shared with the jobs: a job frees its
/// slot itself, right before it queues its result, so that a `RunJob` the
/// server sends on receiving that result always finds the slot free.
#[derive(Debug, Default, Clone)]
pub(crate) struct Slots(Arc<AtomicUsize>);

impl Slots {
    /// Slots in use.
    pub(crate) fn taken(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Takes a slot, freed when the returned guard is dropped.
    pub(crate) fn take(&self) -> Slot {
        self.0.fetch_add(1, Ordering::SeqCst);
        Slot(Arc::clone(&self.0))
    }
}

/// One slot in use; dropping it frees the slot (also when the job's task
/// panics or is aborted).
#[derive(Debug)]
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a job needs from the agent besides its own request.
#[derive(Clone)]
pub(crate) struct JobContext {
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) settings: Arc<LogSettings>,
    pub(crate) kill_grace: Duration,
    pub(crate) default_timeout: Duration,
    /// cgroup `memory.events` file for OOM detection, when found.
    pub(crate) memory_events: Option<Arc<PathBuf>>,
    /// On a worker that runs several jobs at once: directories of their
    /// own for the jobs that set no `working_dir`. `None`: such jobs run in
    /// the agent's working directory.
    pub(crate) job_dirs: Option<Arc<JobDirs>>,
}

/// Private working directories for the jobs of a multi-job worker (those
/// that set no `working_dir`): a job takes one, clean, and when it ends the
/// directory is emptied and kept for a later job. Reusing them rather than
/// creating and removing one per job spares the file system an inode per
/// job (on ext4 a `mkdir` after many removals was 5 % of the machine's CPU
/// in the durable throughput benchmark).
pub(crate) struct JobDirs {
    root: PathBuf,
    /// Emptied directories ready for a job.
    free: std::sync::Mutex<Vec<PathBuf>>,
    /// Directories named so far (`root/0`, `root/1`, ...).
    named: AtomicUsize,
}

impl JobDirs {
    /// A root unique to this agent: under the temporary directory, named
    /// after the process and a counter (several agents may share a
    /// process). Directories are created by the jobs' starts.
    pub(crate) fn new() -> Self {
        static AGENTS: AtomicU64 = AtomicU64::new(0);
        let n = AGENTS.fetch_add(1, Ordering::Relaxed);
        Self::under(std::env::temp_dir().join(format!("hodei-jobs-{}-{n}", std::process::id())))
    }

    fn under(root: PathBuf) -> Self {
        Self {
            root,
            free: std::sync::Mutex::new(Vec::new()),
            named: AtomicUsize::new(0),
        }
    }

    /// A directory no running job has, empty or not yet created.
    fn take(&self) -> PathBuf {
        let reused = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        reused.unwrap_or_else(|| {
            self.root
                .join(self.named.fetch_add(1, Ordering::Relaxed).to_string())
        })
    }

    /// Whether `dir` is one of these directories.
    fn owns(&self, dir: &Path) -> bool {
        dir.parent() == Some(self.root.as_path())
    }

    /// Empties `dir` after its job ended and keeps it for the next one. A
    /// directory that cannot be emptied, or that the job replaced by
    /// something else than a directory, is logged and not used again.
    async fn give_back(&self, dir: PathBuf) {
        let emptied = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || empty_dir(&dir)).await
        };
        match emptied {
            Ok(Ok(())) => self
                .free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(dir),
            Ok(Err(e)) => {
                warn!(dir = %dir.display(), error = %e, "job directory not emptied; not reused");
            }
            Err(e) => warn!(dir = %dir.display(), error = %e, "job directory not emptied"),
        }
    }

    /// Removes the emptied directories and then the root, if nothing else
    /// is left in it (as the agent ends).
    pub(crate) fn remove(&self) {
        for dir in self
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

/// Removes what is in `dir` (symbolic links themselves, not their
/// targets); a missing `dir` is empty; a `dir` that is not a directory is
/// an error.
fn empty_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(std::io::Error::other(
                "no longer a directory (the job replaced it)",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Builds the request for `run`, or says why it cannot run. Consumes the
/// message so the secret values live only in the request.
pub(crate) fn exec_request(run: RunJob, ctx: &JobContext) -> Result<ExecRequest, String> {
    let spec = run.spec.ok_or("the job has no spec")?;
    let program = match (spec.command.is_empty(), spec.script) {
        (false, None) => ExecProgram::Command(spec.command),
        (true, Some(script)) => ExecProgram::Script(script),
        (false, Some(_)) => return Err("the job has both a command and a script".to_owned()),
        (true, None) => return Err("the job has neither a command nor a script".to_owned()),
    };
    let mut secrets: BTreeMap<String, String> = run.secrets.into_iter().collect();
    if let Some(missing) = spec
        .secrets
        .iter()
        .find(|name| !secrets.contains_key(*name))
    {
        return Err(format!("secret {missing} was not delivered"));
    }
    // Secrets the spec does not name are still given to the job: the server
    // decides what a job may see.
    secrets.retain(|name, _| !name.is_empty());
    let mut env: BTreeMap<String, String> = spec.env.into_iter().collect();
    for (name, value) in [
        ("HODEI_JOB_ID", run.job_id.clone()),
        ("HODEI_JOB_ATTEMPT", run.attempt.to_string()),
        ("HODEI_CORRELATION_ID", run.correlation_id.clone()),
    ] {
        if !value.is_empty() {
            env.entry(name.to_owned()).or_insert(value);
        }
    }
    let timeout = match spec.timeout_secs {
        Some(secs) if secs > 0 => Duration::from_secs(secs),
        _ => ctx.default_timeout,
    };
    let mut req = ExecRequest::new(program, timeout);
    req.env = env;
    req.secrets = secrets;
    req.working_dir = match spec.working_dir.filter(|dir| !dir.is_empty()) {
        Some(dir) => Some(PathBuf::from(dir)),
        None => ctx.job_dirs.as_deref().map(JobDirs::take),
    };
    req.kill_grace = ctx.kill_grace;
    Ok(req)
}

/// Runs one attempt to the end: executes it (unless `req` is an error),
/// streams its logs, then frees its `slot` and queues its result after the
/// last log batch.
pub(crate) async fn run_job(
    key: AttemptKey,
    correlation_id: String,
    req: Result<ExecRequest, String>,
    cancel: CancellationToken,
    ctx: JobContext,
    slot: Slot,
) {
    let span =
        info_span!("job", job_id = %key.0, attempt = key.1, correlation_id = %correlation_id);
    async move {
        // The job's own directory, when it was given one (it is created
        // when the process starts).
        let own_dir = req
            .as_ref()
            .ok()
            .and_then(|r| r.working_dir.clone())
            .filter(|dir| ctx.job_dirs.as_deref().is_some_and(|d| d.owns(dir)));
        let (outcome, oom_killed) = match req {
            Ok(req) => execute(&key, req, cancel, &ctx).await,
            Err(error) => (
                ExecOutcome {
                    error: Some(error),
                    ..ExecOutcome::default()
                },
                false,
            ),
        };
        info!(
            exit_code = ?outcome.exit_code,
            signal = ?outcome.signal,
            timed_out = outcome.timed_out,
            cancelled = outcome.cancelled,
            oom_killed,
            error = outcome.error.as_deref().unwrap_or(""),
            lines = outcome.lines,
            "job ended"
        );
        if let (Some(dir), Some(dirs)) = (own_dir, ctx.job_dirs.as_deref()) {
            dirs.give_back(dir).await;
        }
        // The process is gone and every log line queued: the slot is free
        // before the server can learn it from the result.
        drop(slot);
        ctx.outbox
            .push(result_message(&key, &outcome, oom_killed))
            .await;
    }
    .instrument(span)
    .await;
}

/// The `JobResult` message of an attempt.
pub(crate) fn result_message(
    key: &AttemptKey,
    outcome: &ExecOutcome,
    oom_killed: bool,
) -> WorkerMessage {
    WorkerMessage {
        kind: Some(Kind::Result(JobResult {
            job_id: key.0.clone(),
            attempt: key.1,
            exit_code: outcome.exit_code,
            signal: outcome.signal,
            oom_killed,
            timed_out: outcome.timed_out,
            cancelled: outcome.cancelled,
            start_error: outcome.error.clone().unwrap_or_default(),
        })),
    }
}

/// Executes the job while batching its output into the outbox; returns the
/// outcome once every line has been queued, and whether it was OOM-killed.
async fn execute(
    key: &AttemptKey,
    req: ExecRequest,
    cancel: CancellationToken,
    ctx: &JobContext,
) -> (ExecOutcome, bool) {
    let oom_before = ctx.memory_events.as_deref().and_then(|p| oom_kills(p));
    let (tx, rx) = mpsc::channel(LINE_CHANNEL);
    let (outcome, ()) = tokio::join!(
        exec::execute(req, tx, cancel),
        batch_logs(key, rx, &ctx.outbox, &ctx.settings, MAX_LOG_BATCH_BYTES),
    );
    // Killed by SIGKILL, or a shell reporting a child's SIGKILL (128 + 9,
    // e.g. `set -e` or the script's last command): with the cgroup's OOM
    // counter up, that was the OOM killer.
    let killed = outcome.signal == Some(Signal::SIGKILL as i32)
        || outcome.exit_code == Some(128 + Signal::SIGKILL as i32);
    let oom_killed = killed
        && match (
            oom_before,
            ctx.memory_events.as_deref().and_then(|p| oom_kills(p)),
        ) {
            (Some(before), Some(after)) => after > before,
            _ => false,
        };
    (outcome, oom_killed)
}

/// Groups lines into `LogBatch`es: a batch goes out when it holds the batch
/// size, when its encoding reaches `max_bytes` (a line that would take it
/// over starts the next batch; a batch always has at least one line), when
/// the flush interval has passed since its first line, and when the job's
/// output ends. Waiting for the outbox stops reading `lines`.
async fn batch_logs(
    key: &AttemptKey,
    mut lines: mpsc::Receiver<exec::LogLine>,
    outbox: &Outbox,
    settings: &LogSettings,
    max_bytes: usize,
) {
    let mut batch = Batch::default();
    let mut received: Vec<exec::LogLine> = Vec::new();
    let mut flush_at: Option<Instant> = None;
    let mut batch_size = settings.batch_size();
    loop {
        let room = batch_size.saturating_sub(batch.lines.len()).max(1);
        let deadline = flush_at;
        let open = tokio::select! {
            n = lines.recv_many(&mut received, room) => n > 0,
            () = sleep_until_some(deadline) => true,
        };
        for line in received.drain(..) {
            let line = to_proto(line, key.1);
            let size = batch_entry_len(&line);
            if !batch.lines.is_empty() && batch.bytes + size > max_bytes {
                batch.send(key, outbox).await;
                flush_at = None;
            }
            if batch.lines.is_empty() {
                batch_size = settings.batch_size();
                flush_at = Some(Instant::now() + settings.flush());
            }
            batch.lines.push(line);
            batch.bytes += size;
            if batch.lines.len() >= batch_size || batch.bytes >= max_bytes {
                batch.send(key, outbox).await;
                flush_at = None;
            }
        }
        let due = flush_at.is_some_and(|at| at <= Instant::now());
        if !batch.lines.is_empty() && (due || !open) {
            batch.send(key, outbox).await;
            flush_at = None;
        }
        if !open {
            return;
        }
    }
}

/// The lines of the batch being filled and their encoded size.
#[derive(Default)]
struct Batch {
    lines: Vec<proto::LogLine>,
    bytes: usize,
}

impl Batch {
    /// Queues the lines as one `LogBatch` and starts an empty one.
    async fn send(&mut self, key: &AttemptKey, outbox: &Outbox) {
        let lines = std::mem::take(&mut self.lines);
        self.bytes = 0;
        outbox
            .push(WorkerMessage {
                kind: Some(Kind::Logs(LogBatch {
                    job_id: key.0.clone(),
                    attempt: key.1,
                    lines,
                })),
            })
            .await;
    }
}

/// Bytes `line` adds to an encoded `LogBatch`: the line, its length prefix
/// and its field tag.
fn batch_entry_len(line: &proto::LogLine) -> usize {
    let len = line.encoded_len();
    len + prost::length_delimiter_len(len) + 1
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn to_proto(line: exec::LogLine, attempt: u32) -> proto::LogLine {
    let stream = match line.stream {
        exec::LogStream::Stdout => proto::LogStream::Stdout,
        exec::LogStream::Stderr => proto::LogStream::Stderr,
    };
    proto::LogLine {
        seq: line.seq,
        stream: stream as i32,
        at: Some(prost_types::Timestamp {
            seconds: line.at.timestamp(),
            nanos: i32::try_from(line.at.timestamp_subsec_nanos()).unwrap_or(0),
        }),
        text: line.text,
        attempt,
    }
}

/// The file holding the `oom_kill` counter of the agent's memory cgroup,
/// when readable: cgroup v2 `memory.events` of the agent's own cgroup, else
/// the one at the cgroup root (what a container sees); on cgroup v1 hosts
/// the memory controller's `memory.oom_control` (same `oom_kill N` line,
/// Linux 4.13+), of the agent's own cgroup, else the one a container sees.
pub(crate) fn find_memory_events() -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own_v2 = cgroups
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|rel| {
            Path::new("/sys/fs/cgroup")
                .join(rel.trim_start_matches('/'))
                .join("memory.events")
        });
    // v1 lines are `N:controllers:/path`, the memory controller possibly
    // sharing its line with others.
    let own_v1 = cgroups.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, rel) = (parts.next()?, parts.next()?, parts.next()?);
        controllers.split(',').any(|c| c == "memory").then(|| {
            Path::new("/sys/fs/cgroup/memory")
                .join(rel.trim_start_matches('/'))
                .join("memory.oom_control")
        })
    });
    own_v2
        .into_iter()
        .chain([PathBuf::from("/sys/fs/cgroup/memory.events")])
        .chain(own_v1)
        .chain([PathBuf::from("/sys/fs/cgroup/memory/memory.oom_control")])
        .find(|path| oom_kills(path).is_some())
}

/// The `oom_kill` counter of a cgroup v2 `memory.events` file (or of a
/// cgroup v1 `memory.oom_control` file).
pub(crate) fn oom_kills(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        line.strip_prefix("oom_kill ")
            .and_then(|n| n.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::proto::JobSpec;

    fn ctx() -> JobContext {
        JobContext {
            outbox: Outbox::new(4),
            settings: LogSettings::new(10, Duration::from_secs(60)),
            kill_grace: Duration::from_secs(1),
            default_timeout: Duration::from_secs(3600),
            memory_events: None,
            job_dirs: None,
        }
    }

    fn run_job_msg(spec: JobSpec, secrets: &[(&str, &str)]) -> RunJob {
        RunJob {
            job_id: "job-1".to_owned(),
            attempt: 2,
            spec: Some(spec),
            secrets: secrets
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<HashMap<_, _>>(),
            correlation_id: "corr-1".to_owned(),
        }
    }

    #[test]
    fn spec_maps_to_request() {
        let spec = JobSpec {
            command: vec!["echo".into(), "hi".into()],
            env: [("A".to_owned(), "1".to_owned())].into_iter().collect(),
            secrets: vec!["TOKEN".into()],
            working_dir: Some("/tmp/x".into()),
            timeout_secs: Some(7),
            ..JobSpec::default()
        };
        let req = exec_request(run_job_msg(spec, &[("TOKEN", "v")]), &ctx()).unwrap();
        assert_eq!(
            req.program,
            ExecProgram::Command(vec!["echo".into(), "hi".into()])
        );
        assert_eq!(req.env["A"], "1");
        assert_eq!(req.env["HODEI_JOB_ID"], "job-1");
        assert_eq!(req.env["HODEI_JOB_ATTEMPT"], "2");
        assert_eq!(req.env["HODEI_CORRELATION_ID"], "corr-1");
        assert_eq!(req.secrets["TOKEN"], "v");
        assert_eq!(req.working_dir, Some(PathBuf::from("/tmp/x")));
        assert_eq!(req.timeout, Duration::from_secs(7));
        assert_eq!(req.kill_grace, Duration::from_secs(1));

        let script = JobSpec {
            script: Some("echo hi\n".into()),
            ..JobSpec::default()
        };
        let req = exec_request(run_job_msg(script, &[]), &ctx()).unwrap();
        assert_eq!(req.program, ExecProgram::Script("echo hi\n".into()));
        assert_eq!(req.timeout, Duration::from_secs(3600));
    }

    #[test]
    fn bad_specs_are_start_errors() {
        let both = JobSpec {
            command: vec!["true".into()],
            script: Some("true".into()),
            ..JobSpec::default()
        };
        let err = exec_request(run_job_msg(both, &[]), &ctx()).unwrap_err();
        assert!(err.contains("both"), "{err}");
        let err = exec_request(run_job_msg(JobSpec::default(), &[]), &ctx()).unwrap_err();
        assert!(err.contains("neither"), "{err}");
        let missing = JobSpec {
            command: vec!["true".into()],
            secrets: vec!["NOPE".into()],
            ..JobSpec::default()
        };
        let err = exec_request(run_job_msg(missing, &[]), &ctx()).unwrap_err();
        assert_eq!(err, "secret NOPE was not delivered");
    }

    #[test]
    fn oom_counter_is_read_from_memory_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.events");
        std::fs::write(&path, "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n").unwrap();
        assert_eq!(oom_kills(&path), Some(1));
        // cgroup v1 `memory.oom_control` has the same line.
        std::fs::write(&path, "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n").unwrap();
        assert_eq!(oom_kills(&path), Some(7));
        std::fs::write(&path, "low 0\n").unwrap();
        assert_eq!(oom_kills(&path), None);
        assert_eq!(oom_kills(&dir.path().join("missing")), None);
    }

    #[tokio::test]
    async fn sigkill_with_a_rising_oom_counter_is_an_oom_kill() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.events");
        std::fs::write(&path, "oom_kill 4\n").unwrap();
        let mut ctx = ctx();
        ctx.memory_events = Some(Arc::new(path.clone()));
        // The "job" bumps the counter, then SIGKILLs itself.
        let script = format!("echo 'oom_kill 5' > {}; kill -KILL $$", path.display());
        let req = ExecRequest::new(
            ExecProgram::Command(vec!["sh".into(), "-c".into(), script]),
            Duration::from_secs(10),
        );
        let key = ("j".to_owned(), 1);
        let (outcome, oom) = execute(&key, req, CancellationToken::new(), &ctx).await;
        assert_eq!(outcome.signal, Some(Signal::SIGKILL as i32));
        assert!(oom);

        let req = ExecRequest::new(
            ExecProgram::Command(vec!["sh".into(), "-c".into(), "kill -KILL $$".into()]),
            Duration::from_secs(10),
        );
        let (_, oom) = execute(&key, req, CancellationToken::new(), &ctx).await;
        assert!(!oom, "counter did not rise");

        // A shell whose child was OOM-killed exits 137.
        let script = format!(
            "echo 'oom_kill 6' > {}; sh -c 'kill -KILL $$'; exit $?",
            path.display()
        );
        let req = ExecRequest::new(
            ExecProgram::Command(vec!["sh".into(), "-c".into(), script]),
            Duration::from_secs(10),
        );
        let (outcome, oom) = execute(&key, req, CancellationToken::new(), &ctx).await;
        assert_eq!(outcome.exit_code, Some(137));
        assert!(oom);
        // Other failures are not OOM kills, counter or not.
        let script = format!("echo 'oom_kill 7' > {}; exit 1", path.display());
        let req = ExecRequest::new(
            ExecProgram::Command(vec!["sh".into(), "-c".into(), script]),
            Duration::from_secs(10),
        );
        let (_, oom) = execute(&key, req, CancellationToken::new(), &ctx).await;
        assert!(!oom);
    }

    /// On a worker of capacity > 1, a job that sets no `working_dir` gets a
    /// directory of its own under the agent's root, one no running job has;
    /// one that sets it keeps it; without a root nothing changes.
    #[test]
    fn jobs_without_a_working_dir_get_their_own_on_a_multi_job_worker() {
        let root = PathBuf::from("/tmp/hodei-jobs-test");
        let mut ctx = ctx();
        let spec = || JobSpec {
            command: vec!["true".into()],
            ..JobSpec::default()
        };
        let req = exec_request(run_job_msg(spec(), &[]), &ctx).unwrap();
        assert_eq!(req.working_dir, None);
        ctx.job_dirs = Some(Arc::new(JobDirs::under(root.clone())));
        let first = exec_request(run_job_msg(spec(), &[]), &ctx).unwrap();
        let second = exec_request(run_job_msg(spec(), &[]), &ctx).unwrap();
        let (first, second) = (first.working_dir.unwrap(), second.working_dir.unwrap());
        assert_eq!(first.parent(), Some(root.as_path()), "{}", first.display());
        assert_eq!(
            second.parent(),
            Some(root.as_path()),
            "{}",
            second.display()
        );
        assert_ne!(first, second, "two running jobs never share a directory");
        let mut own = spec();
        own.working_dir = Some("/srv/build".into());
        let req = exec_request(run_job_msg(own, &[]), &ctx).unwrap();
        assert_eq!(req.working_dir, Some(PathBuf::from("/srv/build")));
    }

    /// A job's own directory is its working directory while it runs; when
    /// it ends, what it wrote there (files, directories, links) is removed
    /// before its result is queued, a link's target is left alone, and the
    /// next job gets the same, empty, directory. A `working_dir` the job
    /// named is left alone.
    #[tokio::test]
    async fn a_job_s_own_directory_is_emptied_when_it_ends_and_reused() {
        use futures::StreamExt;

        use super::super::outbox::Control;
        let root = tempfile::tempdir().unwrap();
        let named = root.path().join("named");
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        let mut ctx = ctx();
        ctx.outbox = Outbox::new(8);
        ctx.job_dirs = Some(Arc::new(JobDirs::under(root.path().join("jobs"))));
        let script = |text: &str| JobSpec {
            command: vec!["sh".into(), "-c".into(), format!("pwd; ls -A; {text}")],
            ..JobSpec::default()
        };
        let litter = format!(
            "echo data > file; mkdir -p sub/deeper; echo x > sub/deeper/f; ln -s {} link",
            outside.display()
        );
        let mut kept = script("echo data > kept");
        kept.working_dir = Some(named.display().to_string());
        for (i, spec) in [script(&litter), script("true"), kept]
            .into_iter()
            .enumerate()
        {
            let mut msg = run_job_msg(spec, &[]);
            msg.job_id = format!("job-{i}");
            let req = exec_request(msg, &ctx);
            run_job(
                (format!("job-{i}"), 2),
                "corr-1".to_owned(),
                req,
                CancellationToken::new(),
                ctx.clone(),
                Slots::default().take(),
            )
            .await;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stream = ctx.outbox.session_stream(rx);
        tx.send(Control::OpenOutbox).unwrap();
        let mut outputs = Vec::new();
        for _ in 0..3 {
            let Some(Kind::Logs(batch)) = stream.next().await.and_then(|m| m.kind) else {
                panic!("expected the log batch");
            };
            outputs.push(batch.lines.into_iter().map(|l| l.text).collect::<Vec<_>>());
            let Some(Kind::Result(result)) = stream.next().await.and_then(|m| m.kind) else {
                panic!("expected the result");
            };
            assert_eq!(result.exit_code, Some(0), "{result:?}");
        }
        let own = root.path().join("jobs").join("0");
        let own_text = own.display().to_string();
        assert_eq!(
            outputs[0],
            [own_text.as_str()],
            "a fresh directory is empty"
        );
        assert_eq!(outputs[1], [own_text.as_str()], "reused, and empty again");
        assert_eq!(outputs[2], [named.display().to_string()]);
        assert_eq!(std::fs::read_dir(&own).unwrap().count(), 0, "emptied");
        assert!(outside.join("keep").exists(), "a link's target is kept");
        assert!(named.join("kept").exists(), "a named working_dir is kept");
    }

    /// A directory the job replaced by a link is not emptied through it
    /// nor used again.
    #[tokio::test]
    async fn a_job_dir_replaced_by_a_link_is_not_reused() {
        let root = tempfile::tempdir().unwrap();
        let outside = root.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        let dirs = JobDirs::under(root.path().join("jobs"));
        let dir = dirs.take();
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&outside, &dir).unwrap();
        dirs.give_back(dir.clone()).await;
        assert!(outside.join("keep").exists());
        assert_ne!(dirs.take(), dir, "not handed out again");
    }

    /// Regression (benchmark): the slot was freed after the result was
    /// queued, so the server, sending the next job on the result, could
    /// find the agent still "at capacity".
    #[tokio::test]
    async fn the_slot_is_free_before_the_result_is_queued() {
        use futures::StreamExt;

        use super::super::outbox::Control;
        let mut ctx = ctx();
        ctx.outbox = Outbox::new(1);
        // The outbox is full: the result's push waits until the test reads.
        ctx.outbox.push(WorkerMessage::default()).await;
        let slots = Slots::default();
        let slot = slots.take();
        assert_eq!(slots.taken(), 1);
        let spec = JobSpec {
            command: vec!["true".into()],
            ..JobSpec::default()
        };
        let req = exec_request(run_job_msg(spec, &[]), &ctx);
        let outbox = Arc::clone(&ctx.outbox);
        let job = tokio::spawn(run_job(
            ("job-1".to_owned(), 2),
            "corr-1".to_owned(),
            req,
            CancellationToken::new(),
            ctx,
            slot,
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while slots.taken() != 0 {
            assert!(Instant::now() < deadline, "the slot was not freed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!job.is_finished(), "the result is not queued yet");
        let (tx, rx) = mpsc::unbounded_channel();
        let mut stream = outbox.session_stream(rx);
        tx.send(Control::OpenOutbox).unwrap();
        assert_eq!(stream.next().await, Some(WorkerMessage::default()));
        let Some(Kind::Result(result)) = stream.next().await.and_then(|m| m.kind) else {
            panic!("expected the result");
        };
        assert_eq!((result.job_id.as_str(), result.attempt), ("job-1", 2));
        assert_eq!(result.exit_code, Some(0));
        job.await.unwrap();
        assert_eq!(slots.taken(), 0);
    }

    /// Batches are cut by bytes as well as by lines: a line that would take
    /// a batch over the cap starts the next one, and a line over the cap on
    /// its own still goes out (alone).
    #[tokio::test]
    async fn batches_are_capped_by_bytes() {
        const MAX: usize = 1000;
        let ctx = ctx();
        ctx.settings.set(100, Duration::from_secs(60));
        let key = ("j".to_owned(), 1);
        let (tx, rx) = mpsc::channel(64);
        let texts: Vec<String> = (1..=20u8)
            .map(|i| char::from(b'a' + i).to_string().repeat(300))
            .chain(["B".repeat(5000), "c1".into(), "c2".into()])
            .collect();
        let send = {
            let texts = texts.clone();
            async move {
                for (i, text) in texts.into_iter().enumerate() {
                    let line = exec::LogLine {
                        seq: i as u64 + 1,
                        stream: exec::LogStream::Stdout,
                        at: chrono::Utc::now(),
                        text,
                    };
                    tx.send(line).await.unwrap();
                }
            }
        };
        let outbox = Arc::clone(&ctx.outbox);
        let collect = tokio::spawn(async move {
            use futures::StreamExt;
            let (control, rx) = mpsc::unbounded_channel();
            let mut stream = outbox.session_stream(rx);
            control
                .send(super::super::outbox::Control::OpenOutbox)
                .unwrap();
            let mut batches = Vec::new();
            let mut lines = 0;
            while lines < 23 {
                let Some(Kind::Logs(batch)) = stream.next().await.and_then(|m| m.kind) else {
                    panic!("expected a log batch");
                };
                lines += batch.lines.len();
                batches.push(batch.lines);
            }
            batches
        });
        tokio::join!(send, batch_logs(&key, rx, &ctx.outbox, &ctx.settings, MAX));
        let batches = collect.await.unwrap();
        let bytes = |lines: &[proto::LogLine]| lines.iter().map(batch_entry_len).sum::<usize>();
        for (i, batch) in batches.iter().enumerate() {
            assert!(!batch.is_empty());
            if batch.len() > 1 {
                assert!(bytes(batch) <= MAX, "batch {i} has {} bytes", bytes(batch));
            }
            // Every batch but the last was full: its next line did not fit.
            if let Some(next) = batches.get(i + 1) {
                assert!(bytes(batch) + batch_entry_len(&next[0]) > MAX, "batch {i}");
            }
        }
        let got: Vec<&str> = batches.iter().flatten().map(|l| l.text.as_str()).collect();
        assert_eq!(got, texts.iter().map(String::as_str).collect::<Vec<_>>());
        let seqs: Vec<u64> = batches.iter().flatten().map(|l| l.seq).collect();
        assert_eq!(seqs, (1..=23).collect::<Vec<u64>>());
        // The 5000-byte line went alone; several 300-byte lines shared batches.
        assert!(
            batches
                .iter()
                .any(|b| b.len() == 1 && b[0].text.len() == 5000)
        );
        assert!(batches.len() >= 7 && batches[0].len() >= 2, "{batches:?}");
    }

    #[tokio::test]
    async fn batches_respect_the_size_and_end_with_the_output() {
        let ctx = ctx();
        let key = ("j".to_owned(), 1);
        let req = ExecRequest::new(
            ExecProgram::Command(vec!["seq".into(), "1".into(), "25".into()]),
            Duration::from_secs(10),
        );
        let outbox = Arc::clone(&ctx.outbox);
        let collect = tokio::spawn(async move {
            use futures::StreamExt;
            let (tx, rx) = mpsc::unbounded_channel();
            let mut stream = outbox.session_stream(rx);
            tx.send(super::super::outbox::Control::OpenOutbox).unwrap();
            let mut sizes = Vec::new();
            let mut seqs = Vec::new();
            while let Some(msg) = stream.next().await {
                let Some(Kind::Logs(batch)) = msg.kind else {
                    panic!("unexpected {msg:?}")
                };
                sizes.push(batch.lines.len());
                seqs.extend(batch.lines.iter().map(|l| l.seq));
                if seqs.len() == 25 {
                    break;
                }
            }
            (sizes, seqs)
        });
        let (outcome, _) = execute(&key, req, CancellationToken::new(), &ctx).await;
        assert!(outcome.succeeded());
        let (sizes, seqs) = collect.await.unwrap();
        assert_eq!(sizes, [10, 10, 5]);
        assert_eq!(seqs, (1..=25).collect::<Vec<u64>>());
    }
}
