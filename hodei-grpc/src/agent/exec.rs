//! Job process executor of the worker agent.
//!
//! [`execute`] runs one job as a child process and reports how it ended:
//!
//! * The job runs in its own process group. A timeout or a cancellation sends
//!   SIGTERM to the whole group and SIGKILL after the request's grace period if
//!   anything of the group is still alive. When the group leader exits on its
//!   own, leftover members (background children) are killed with SIGKILL, so
//!   nothing of the job outlives [`execute`].
//! * stdout and stderr are captured line by line; every line gets a sequence
//!   number that is global across both streams, a capture timestamp, and has
//!   every secret value replaced by `***` ([`SecretMasker`]) before it is sent.
//!   Lines are never dropped: a slow receiver slows the job down through its
//!   pipes.
//! * Secrets reach the job process only: as environment variables of the child
//!   (never of the agent) and as a private JSON file on tmpfs whose path is in
//!   [`SECRETS_FILE_ENV`]; the file is deleted when the job ends.
//!
//! The job's environment is built from scratch: only the variables listed in
//! [`INHERITED_ENV`] are taken from the agent (so agent credentials such as the
//! worker token never reach a job), then the request's `env`, then the secrets.
//!
//! Limitation: a process that leaves the job's process group (`setsid`,
//! `setpgid`) escapes the group kill; capturing it needs cgroups. If such a
//! process keeps the job's stdout or stderr open, reading stops shortly after
//! the group is gone instead of waiting for it.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Utc};
use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tempfile::{TempDir, TempPath};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Default time between SIGTERM and SIGKILL when a job is stopped.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

/// Default maximum length of one log line in bytes; longer lines are split.
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 * 1024;

/// Environment variable holding the path of the job's secrets file.
pub const SECRETS_FILE_ENV: &str = "HODEI_SECRETS_FILE";

/// Text that replaces every secret value found in job output.
pub const MASK: &str = "***";

/// Variables copied from the agent's environment into the job's environment
/// (when set in the agent). Everything else the job sees comes from the
/// request. `PATH` falls back to [`DEFAULT_PATH`] when the agent has none.
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "LC_MESSAGES",
    "TZ",
    "TMPDIR",
];

/// `PATH` given to a job when neither the agent nor the request sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecProgram {
    /// An argument vector; `argv[0]` is resolved through the job's `PATH`.
    Command(Vec<String>),
    /// A script, written to a private temporary file and run by the
    /// interpreter named in its `#!` line, or by `/bin/sh` when it has none.
    Script(String),
}

/// One job to execute.
#[derive(Clone)]
pub struct ExecRequest {
    /// The program to run.
    pub program: ExecProgram,
    /// Environment variables for the job (added to [`INHERITED_ENV`]).
    pub env: BTreeMap<String, String>,
    /// Secrets by name: exported to the job as environment variables and in
    /// the secrets file, and masked in its output.
    pub secrets: BTreeMap<String, String>,
    /// Working directory of the job, created if missing; `None` keeps the
    /// agent's working directory.
    pub working_dir: Option<PathBuf>,
    /// Wall-clock limit after which the job's process group is killed.
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL when the job is stopped
    /// ([`DEFAULT_KILL_GRACE`] by default).
    pub kill_grace: Duration,
    /// Longest log line in bytes; longer lines are split into chunks of at
    /// most this size ([`DEFAULT_MAX_LINE_BYTES`] by default; at least 1).
    pub max_line_bytes: usize,
}

impl ExecRequest {
    /// A request for `program` with the given timeout, no extra environment,
    /// no secrets, no working directory and default grace and line limit.
    pub fn new(program: ExecProgram, timeout: Duration) -> Self {
        Self {
            program,
            env: BTreeMap::new(),
            secrets: BTreeMap::new(),
            working_dir: None,
            timeout,
            kill_grace: DEFAULT_KILL_GRACE,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        }
    }
}

impl fmt::Debug for ExecRequest {
    /// Secret values are never printed, only their names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecRequest")
            .field("program", &self.program)
            .field("env", &self.env)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("working_dir", &self.working_dir)
            .field("timeout", &self.timeout)
            .field("kill_grace", &self.kill_grace)
            .field("max_line_bytes", &self.max_line_bytes)
            .finish()
    }
}

/// Which output stream of the job a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of job output, already masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Sequence number, starting at 1, increasing by one per line across both
    /// streams; lines arrive on the channel in this order.
    pub seq: u64,
    /// The stream the line was written to.
    pub stream: LogStream,
    /// When the agent read the line from the job's pipe.
    pub at: DateTime<Utc>,
    /// The line without its line terminator, invalid UTF-8 replaced by
    /// U+FFFD and secret values replaced by [`MASK`].
    pub text: String,
}

/// How a job ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Exit code when the job's main process exited normally.
    pub exit_code: Option<i32>,
    /// Signal number when the job's main process was killed by a signal.
    pub signal: Option<i32>,
    /// The job was stopped because it ran longer than the timeout.
    pub timed_out: bool,
    /// The job was stopped (or never started) because of a cancellation.
    pub cancelled: bool,
    /// Why the job could not be run or supervised (spawn failure, bad working
    /// directory, ...); `None` when it ran.
    pub error: Option<String>,
    /// Number of output lines captured (the last sequence number), including
    /// lines discarded because the receiver had gone away.
    pub lines: u64,
}

impl ExecOutcome {
    /// The job ran and exited with code 0 on its own.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && self.error.is_none() && !self.timed_out && !self.cancelled
    }

    fn failed(error: String) -> Self {
        Self {
            error: Some(error),
            ..Self::default()
        }
    }
}

/// Runs one job to completion and reports its outcome.
///
/// Output lines are sent on `lines` with `send().await`, so a slow receiver
/// slows the job down; a closed receiver makes the remaining output be read
/// and discarded. `cancel` stops the job (SIGTERM to its process group at
/// once, SIGKILL after `kill_grace`). Never panics on job or system errors:
/// they are reported in [`ExecOutcome::error`].
pub async fn execute(
    req: ExecRequest,
    lines: mpsc::Sender<LogLine>,
    cancel: CancellationToken,
) -> ExecOutcome {
    if cancel.is_cancelled() {
        return ExecOutcome {
            cancelled: true,
            ..ExecOutcome::default()
        };
    }
    let mut prepared = match Prepared::new(&req) {
        Ok(prepared) => prepared,
        Err(error) => return ExecOutcome::failed(error),
    };
    let mut child = match prepared.command.spawn() {
        Ok(child) => child,
        Err(e) => return ExecOutcome::failed(prepared.spawn_error(&e)),
    };
    // A freshly spawned child has not been reaped yet, so it has an id; pids
    // always fit in pid_t.
    let Some(pgid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return ExecOutcome::failed("job process has no pid right after spawning".to_owned());
    };
    let mut group = GroupGuard {
        pgid: Pid::from_raw(pgid),
        armed: true,
    };
    debug!(pgid, program = %prepared.display_name, "job process started");

    let emitter = Emitter {
        masker: SecretMasker::new(req.secrets.values().cloned()),
        state: Mutex::new(EmitState {
            seq: 0,
            tx: Some(lines),
        }),
    };
    let stop_reading = CancellationToken::new();
    let max_line = req.max_line_bytes.max(1);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (supervision, (), ()) = tokio::join!(
        supervise(&mut child, &mut group, &req, &cancel, &stop_reading),
        pump(stdout, LogStream::Stdout, max_line, &emitter, &stop_reading),
        pump(stderr, LogStream::Stderr, max_line, &emitter, &stop_reading),
    );
    // Removes the secrets file and the script only now that the group is gone.
    drop(prepared);

    let mut outcome = ExecOutcome {
        timed_out: supervision.timed_out,
        cancelled: supervision.cancelled,
        lines: emitter.state.into_inner().seq,
        ..ExecOutcome::default()
    };
    match supervision.leader {
        Some(Ok(status)) => {
            outcome.exit_code = status.code();
            outcome.signal = status.signal();
        }
        Some(Err(e)) => {
            outcome.error.get_or_insert_with(|| {
                format!("waiting for the job process failed: {}", describe_io(&e))
            });
        }
        None => {
            outcome
                .error
                .get_or_insert_with(|| "the job process did not exit after SIGKILL".to_owned());
        }
    }
    outcome
}

/// Replaces secret values in text by [`MASK`].
///
/// Empty values are ignored. A value spanning several lines contributes each
/// of its non-blank lines (trimmed), since output is masked line by line.
/// Matching is leftmost-longest: at each position the longest matching value
/// wins, so a secret that contains another is masked as a whole.
#[derive(Clone, Default)]
pub struct SecretMasker {
    /// Distinct non-empty values, longest first.
    values: Vec<String>,
}

impl SecretMasker {
    /// A masker for the given secret values.
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut patterns = Vec::new();
        for value in values {
            if value.contains('\n') {
                patterns.extend(
                    value
                        .lines()
                        .map(str::trim)
                        .filter(|line| !line.is_empty())
                        .map(str::to_owned),
                );
            } else if !value.is_empty() {
                patterns.push(value);
            }
        }
        patterns.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        patterns.dedup();
        Self { values: patterns }
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Length in bytes of the longest value (0 when there is none).
    pub fn longest(&self) -> usize {
        self.values.first().map_or(0, String::len)
    }

    /// The occurrence of a value in `text` that starts before `cut` and
    /// ends after it, as `(start, end)`, with the same leftmost-longest
    /// matching as [`SecretMasker::mask`] (on bytes). `text` must extend at
    /// least `longest() - 1` bytes past `cut` (or be the whole line) for an
    /// occurrence to be seen whole.
    fn straddling(&self, text: &[u8], cut: usize) -> Option<(usize, usize)> {
        let matches_at = |at: usize| {
            self.values
                .iter()
                .map(String::as_bytes)
                .find(|value| text[at..].starts_with(value))
        };
        // Cheap test first: no value crosses `cut` wherever the scan starts.
        let first = cut.saturating_sub(self.longest().saturating_sub(1));
        if !(first..cut).any(|at| matches_at(at).is_some_and(|v| at + v.len() > cut)) {
            return None;
        }
        // The exact answer: the occurrences the masker would find.
        let mut at = 0;
        while at < cut {
            match matches_at(at) {
                Some(value) if at + value.len() > cut => return Some((at, at + value.len())),
                Some(value) => at += value.len(),
                None => at += 1,
            }
        }
        None
    }

    /// `line` with every occurrence of a secret value replaced by [`MASK`];
    /// borrowed when nothing had to be replaced.
    pub fn mask<'a>(&self, line: &'a str) -> Cow<'a, str> {
        if !self
            .values
            .iter()
            .any(|value| line.contains(value.as_str()))
        {
            return Cow::Borrowed(line);
        }
        let mut masked = String::with_capacity(line.len());
        let mut plain_from = 0;
        let mut at = 0;
        while at < line.len() {
            let rest = &line[at..];
            if let Some(value) = self.values.iter().find(|v| rest.starts_with(v.as_str())) {
                masked.push_str(&line[plain_from..at]);
                masked.push_str(MASK);
                at += value.len();
                plain_from = at;
            } else {
                at += rest.chars().next().map_or(1, char::len_utf8);
            }
        }
        masked.push_str(&line[plain_from..]);
        Cow::Owned(masked)
    }
}

impl fmt::Debug for SecretMasker {
    /// Never prints the values.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretMasker")
            .field("values", &self.values.len())
            .finish()
    }
}

/// How often group liveness is checked while waiting for a stopped job.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// How long to wait for the group to disappear after SIGKILL.
const REAP_LIMIT: Duration = Duration::from_secs(2);

/// Total time the readers may wait for more output once the job's group is
/// gone (covers output still in flight through the reactor; bounds the wait
/// for pipes held open by processes that escaped the group).
const DRAIN_IDLE_BUDGET: Duration = Duration::from_millis(500);

/// Size of one read from a job pipe.
const READ_CHUNK: usize = 16 * 1024;

/// The job's command plus the temporary files that must outlive it.
struct Prepared {
    command: Command,
    /// Name used in spawn error messages.
    display_name: String,
    /// Kind of program, for spawn error messages ("command", ...).
    kind: &'static str,
    /// Dropped (deleted) before `temp_dir`, which may contain it.
    _secrets_file: TempPath,
    _temp_dir: Option<TempDir>,
}

impl Prepared {
    /// Validates the request, creates the working directory and temporary
    /// files and builds the command.
    fn new(req: &ExecRequest) -> Result<Self, String> {
        for (name, value) in &req.env {
            check_env_var("environment variable", name, value)?;
        }
        for (name, value) in &req.secrets {
            check_env_var("secret", name, value)?;
        }
        if let Some(dir) = &req.working_dir {
            prepare_working_dir(dir)?;
        }

        let mut temp_dir = None;
        let (program, args, display_name, kind) = match &req.program {
            ExecProgram::Command(argv) => match argv.split_first() {
                Some((program, args)) if !program.is_empty() => (
                    OsString::from(program),
                    args.iter().map(OsString::from).collect(),
                    program.clone(),
                    "command",
                ),
                _ => return Err("empty command".to_owned()),
            },
            ExecProgram::Script(text) => {
                let dir = private_temp_dir()?;
                let path = write_script(dir.path(), text)?;
                temp_dir = Some(dir);
                script_invocation(text, &path)?
            }
        };
        let secrets_file = write_secrets_file(&req.secrets, &mut temp_dir)?;

        // The child's PATH, as execvp would search it: the secrets' or the
        // request's if they set one, else the agent's, else the default.
        let child_path: OsString = req
            .secrets
            .get("PATH")
            .or_else(|| req.env.get("PATH"))
            .map(OsString::from)
            .or_else(|| std::env::var_os("PATH"))
            .unwrap_or_else(|| DEFAULT_PATH.into());
        let program = resolve_program(program, &child_path, req.working_dir.as_deref());
        let mut command = Command::new(program);
        command.args(args).env_clear();
        for name in INHERITED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        if std::env::var_os("PATH").is_none() {
            command.env("PATH", DEFAULT_PATH);
        }
        command
            .envs(&req.env)
            .envs(&req.secrets)
            .env(SECRETS_FILE_ENV, &*secrets_file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &req.working_dir {
            command.current_dir(dir);
        }
        Ok(Self {
            command,
            display_name,
            kind,
            _secrets_file: secrets_file,
            _temp_dir: temp_dir,
        })
    }

    fn spawn_error(&self, e: &io::Error) -> String {
        match e.kind() {
            io::ErrorKind::NotFound => format!("{} not found: {}", self.kind, self.display_name),
            io::ErrorKind::PermissionDenied => {
                format!("{} {}: permission denied", self.kind, self.display_name)
            }
            _ => format!(
                "failed to start {} {}: {}",
                self.kind,
                self.display_name,
                describe_io(e)
            ),
        }
    }
}

fn check_env_var(kind: &str, name: &str, value: &str) -> Result<(), String> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return Err(format!("invalid {kind} name {name:?}"));
    }
    if value.contains('\0') {
        return Err(format!("{kind} {name}: value contains a NUL byte"));
    }
    Ok(())
}

fn prepare_working_dir(dir: &Path) -> Result<(), String> {
    let fail = |reason: String| format!("working dir {}: {reason}", dir.display());
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(fail("not a directory".to_owned())),
        Err(_) => fs::create_dir_all(dir).map_err(|e| fail(describe_io(&e))),
    }
}

/// A fresh 0700 directory under the system temp dir.
fn private_temp_dir() -> Result<TempDir, String> {
    let fail = |e: io::Error| format!("creating a private temp dir: {}", describe_io(&e));
    let dir = tempfile::Builder::new()
        .prefix("hodei-job-")
        .permissions(Permissions::from_mode(0o700))
        .tempdir()
        .map_err(fail)?;
    // The umask may have narrowed the mode; make it exact.
    fs::set_permissions(dir.path(), Permissions::from_mode(0o700)).map_err(fail)?;
    Ok(dir)
}

/// Writes the script as a 0700 file in `dir`.
fn write_script(dir: &Path, text: &str) -> Result<PathBuf, String> {
    let path = dir.join("script");
    let write = || -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .open(&path)?;
        file.set_permissions(Permissions::from_mode(0o700))?;
        file.write_all(text.as_bytes())
    };
    write().map_err(|e| format!("writing the script file: {}", describe_io(&e)))?;
    Ok(path)
}

/// Program, arguments, display name and kind that run the script at `path`.
///
/// The `#!` line is interpreted here the way Linux does (interpreter plus at
/// most one argument, then the script path) instead of executing the file:
/// that works when the temp dir is mounted `noexec` and cannot fail with
/// ETXTBSY when another thread forks while the script is being written.
/// `program` looked up in `path` the way `execvp` would (relative entries
/// against the child's working directory), so that the spawn gets a path.
/// A bare name with an environment that sets `PATH` makes the standard
/// library fork (it cannot hand the child's `PATH` to `posix_spawnp`), and
/// a fork of a large multi-threaded process copies its page tables for
/// every job; with a path it uses `posix_spawn` (a vfork). A name found
/// nowhere is returned as is: the spawn then fails with the usual error.
fn resolve_program(program: OsString, path: &OsStr, cwd: Option<&Path>) -> OsString {
    if program.is_empty() || program.as_encoded_bytes().contains(&b'/') {
        return program;
    }
    for dir in std::env::split_paths(path) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(&program);
        let on_disk = match cwd {
            Some(cwd) if candidate.is_relative() => cwd.join(&candidate),
            _ => candidate.clone(),
        };
        if let Ok(meta) = std::fs::metadata(&on_disk)
            && meta.is_file()
            && meta.permissions().mode() & 0o111 != 0
        {
            // A relative entry stays relative: it is resolved again in the
            // child's working directory, as execvp would.
            return if candidate.is_relative() && !candidate.starts_with(".") {
                PathBuf::from(".").join(candidate).into_os_string()
            } else {
                candidate.into_os_string()
            };
        }
    }
    program
}

fn script_invocation(
    text: &str,
    path: &Path,
) -> Result<(OsString, Vec<OsString>, String, &'static str), String> {
    let Some(shebang) = text.strip_prefix("#!") else {
        let sh = "/bin/sh";
        return Ok((sh.into(), vec![path.into()], sh.to_owned(), "command"));
    };
    let line = shebang.split('\n').next().unwrap_or_default().trim();
    let (interpreter, arg) = match line.split_once([' ', '\t']) {
        Some((interpreter, arg)) => (interpreter, Some(arg.trim())),
        None => (line, None),
    };
    if interpreter.is_empty() {
        return Err("script has a #! line without an interpreter".to_owned());
    }
    let mut args: Vec<OsString> = arg
        .filter(|a| !a.is_empty())
        .map(OsString::from)
        .into_iter()
        .collect();
    args.push(path.into());
    Ok((
        interpreter.into(),
        args,
        interpreter.to_owned(),
        "script interpreter",
    ))
}

/// Writes the secrets as a 0600 JSON object on tmpfs (`/dev/shm` when
/// possible, else the job's private temp dir, created on demand).
fn write_secrets_file(
    secrets: &BTreeMap<String, String>,
    temp_dir: &mut Option<TempDir>,
) -> Result<TempPath, String> {
    let json =
        serde_json::to_vec(secrets).map_err(|e| format!("encoding the secrets file: {e}"))?;
    let write_in = |dir: &Path| -> io::Result<TempPath> {
        let mut file = tempfile::Builder::new()
            .prefix("hodei-secrets-")
            .suffix(".json")
            .permissions(Permissions::from_mode(0o600))
            .tempfile_in(dir)?;
        file.as_file()
            .set_permissions(Permissions::from_mode(0o600))?;
        file.write_all(&json)?;
        file.flush()?;
        Ok(file.into_temp_path())
    };
    for dir in memory_dirs() {
        match write_in(&dir) {
            Ok(path) => return Ok(path),
            Err(e) => {
                debug!(dir = %dir.display(), error = %e, "cannot write the secrets file here")
            }
        }
    }
    warn!(
        "no writable tmpfs (/dev/shm, $XDG_RUNTIME_DIR) for the secrets file; \
         writing it to a private 0700 temp dir, which may be on disk"
    );
    let dir = match temp_dir {
        Some(dir) => dir,
        None => temp_dir.insert(private_temp_dir()?),
    };
    write_in(dir.path()).map_err(|e| format!("writing the secrets file: {}", describe_io(&e)))
}

/// Directories in memory where the secrets file may go, in order of
/// preference: `/dev/shm`, then `$XDG_RUNTIME_DIR`, each only if it is
/// a tmpfs (or ramfs), so a secret never lands on disk unnoticed.
fn memory_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("/dev/shm")];
    if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        dirs.push(PathBuf::from(run));
    }
    dirs.retain(|d| in_memory(d));
    dirs
}

/// Whether `dir` is on a file system kept in memory.
fn in_memory(dir: &Path) -> bool {
    use nix::sys::statfs::{FsType, TMPFS_MAGIC, statfs};
    /// `RAMFS_MAGIC` of `linux/magic.h` (nix names only tmpfs).
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    statfs(dir).is_ok_and(|fs| {
        let kind = fs.filesystem_type();
        kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
    })
}

/// `e` as a short lowercase reason, e.g. "permission denied".
fn describe_io(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => {
            let desc = Errno::from_raw(code).desc();
            let mut chars = desc.chars();
            match chars.next() {
                Some(first) => first.to_lowercase().chain(chars).collect(),
                None => e.to_string(),
            }
        }
        None => e.to_string(),
    }
}

/// The job's process group; SIGKILLed on drop unless known to be gone, so a
/// dropped [`execute`] future leaves nothing behind.
struct GroupGuard {
    pgid: Pid,
    armed: bool,
}

impl GroupGuard {
    fn signal(&self, signal: Signal) {
        match killpg(self.pgid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => warn!(pgid = self.pgid.as_raw(), %signal, error = %e, "killpg failed"),
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

/// What the supervisor saw.
#[derive(Default)]
struct Supervision {
    /// The leader's wait result; `None` if it could not be reaped.
    leader: Option<io::Result<ExitStatus>>,
    timed_out: bool,
    cancelled: bool,
}

/// Waits for the leader, enforces timeout and cancellation, kills leftovers,
/// and tells the readers to stop waiting for output once the group is dead.
async fn supervise(
    child: &mut Child,
    group: &mut GroupGuard,
    req: &ExecRequest,
    cancel: &CancellationToken,
    stop_reading: &CancellationToken,
) -> Supervision {
    let _stop_on_return = stop_reading.clone().drop_guard();
    let pgid = group.pgid;
    let mut sup = Supervision::default();
    tokio::select! {
        biased;
        status = child.wait() => sup.leader = Some(status),
        () = tokio::time::sleep(req.timeout) => sup.timed_out = true,
        () = cancel.cancelled() => sup.cancelled = true,
    }
    if sup.leader.is_none() {
        let reason = if sup.timed_out { "timeout" } else { "cancel" };
        info!(
            pgid = pgid.as_raw(),
            reason, "stopping job: SIGTERM to its process group"
        );
        group.signal(Signal::SIGTERM);
        if !wait_group_gone(child, &mut sup.leader, pgid, req.kill_grace).await {
            info!(
                pgid = pgid.as_raw(),
                "job still alive after the grace period: SIGKILL"
            );
            group.signal(Signal::SIGKILL);
        }
    }
    if group_has_live_members(pgid) {
        debug!(
            pgid = pgid.as_raw(),
            "killing leftover processes of the job"
        );
        group.signal(Signal::SIGKILL);
    }
    // Everything of the group is dead or dying: output still buffered in the
    // pipes is read, but nobody in the group can write more.
    stop_reading.cancel();
    if wait_group_gone(child, &mut sup.leader, pgid, REAP_LIMIT).await {
        group.armed = false;
    } else {
        warn!(
            pgid = pgid.as_raw(),
            "job process group still alive after SIGKILL"
        );
    }
    sup
}

/// Polls until the leader is reaped and no live process is left in the
/// group, or `limit` has passed; returns whether the group is gone.
async fn wait_group_gone(
    child: &mut Child,
    leader: &mut Option<io::Result<ExitStatus>>,
    pgid: Pid,
    limit: Duration,
) -> bool {
    let now = Instant::now();
    let deadline = now
        .checked_add(limit)
        .unwrap_or(now + Duration::from_secs(365 * 24 * 3600));
    loop {
        if leader.is_none() {
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => *leader = Some(Ok(status)),
                Err(e) => *leader = Some(Err(e)),
            }
        }
        if leader.is_some() && !group_has_live_members(pgid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Whether any process of the group is alive. Zombies do not count: when
/// nobody reaps orphans (e.g. a container whose init does not), killed
/// members stay zombies and `killpg` keeps finding them.
fn group_has_live_members(pgid: Pid) -> bool {
    match killpg(pgid, None) {
        Err(Errno::ESRCH) => false,
        _ => any_live_member(pgid).unwrap_or(true),
    }
}

/// Scans `/proc` for a live (non-zombie) process in group `pgid`.
fn any_live_member(pgid: Pid) -> io::Result<bool> {
    for entry in fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Some((state, pgrp)) = proc_state(pid)
            && pgrp == pgid.as_raw()
            && !matches!(state, 'Z' | 'X')
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// State letter and process group of `pid` from `/proc/<pid>/stat`; `None`
/// when the process does not exist.
fn proc_state(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid pgrp ...": comm may contain spaces and parens.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let pgrp = fields.nth(1)?.parse().ok()?;
    Some((state, pgrp))
}

/// Assigns sequence numbers, masks and sends lines from both streams.
struct Emitter {
    masker: SecretMasker,
    state: Mutex<EmitState>,
}

struct EmitState {
    /// Last sequence number assigned.
    seq: u64,
    /// `None` once the receiver is gone.
    tx: Option<mpsc::Sender<LogLine>>,
}

impl Emitter {
    async fn emit(&self, stream: LogStream, at: DateTime<Utc>, bytes: &[u8]) {
        let lossy = String::from_utf8_lossy(bytes);
        let text = self.masker.mask(&lossy).into_owned();
        // Held across the send so that channel order equals seq order.
        let mut state = self.state.lock().await;
        state.seq += 1;
        let line = LogLine {
            seq: state.seq,
            stream,
            at,
            text,
        };
        let closed = match &state.tx {
            Some(tx) => tx.send(line).await.is_err(),
            None => false,
        };
        if closed {
            debug!("log receiver closed; discarding further job output");
            state.tx = None;
        }
    }
}

/// Reads one pipe to the end, emitting its lines. Once `stop` is cancelled
/// (the job's group is dead), gives up when no more output arrives within
/// [`DRAIN_IDLE_BUDGET`] in total.
async fn pump<R: AsyncRead + Unpin>(
    pipe: Option<R>,
    stream: LogStream,
    max_line: usize,
    emitter: &Emitter,
    stop: &CancellationToken,
) {
    let Some(mut pipe) = pipe else { return };
    let mut splitter = LineSplitter::new(max_line, &emitter.masker);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut budget = DRAIN_IDLE_BUDGET;
    let mut lines = Vec::new();
    loop {
        let read = tokio::select! {
            biased;
            read = pipe.read(&mut buf) => Some(read),
            () = stop.cancelled() => None,
        };
        let read = match read {
            Some(read) => read,
            None => {
                let started = Instant::now();
                match tokio::time::timeout(budget, pipe.read(&mut buf)).await {
                    Ok(read) => {
                        budget = budget.saturating_sub(started.elapsed());
                        read
                    }
                    Err(_) => {
                        debug!(?stream, "pipe still open after the job ended; stop reading");
                        break;
                    }
                }
            }
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(?stream, error = %e, "reading job output failed");
                break;
            }
        };
        let at = now();
        splitter.push(&buf[..n], &emitter.masker, &mut lines);
        for line in lines.drain(..) {
            emitter.emit(stream, at, &line).await;
        }
    }
    splitter.finish(&emitter.masker, &mut lines);
    let at = now();
    for line in lines.drain(..) {
        emitter.emit(stream, at, &line).await;
    }
}

fn now() -> DateTime<Utc> {
    DateTime::<Utc>::from(SystemTime::now())
}

/// Splits a byte stream into lines of at most `max` bytes.
///
/// A line longer than `max` is cut into chunks, never inside an occurrence
/// of a secret value: the masker runs on each chunk, so a value cut in two
/// would leak as two unmasked halves. To see a value that starts before a
/// cut whole, an unterminated line is only cut once `hold` (the longest
/// value's length minus one) more bytes have arrived; a value crossing the
/// cut moves it to the value's start (or, for a value at the very start of
/// the chunk, to its end: that chunk is longer than `max`, but masked).
struct LineSplitter {
    /// The current, unterminated line.
    buf: Vec<u8>,
    max: usize,
    /// Bytes looked at past a cut before making it.
    hold: usize,
    /// Part of the current line was already emitted as a chunk.
    chunked: bool,
}

impl LineSplitter {
    fn new(max: usize, masker: &SecretMasker) -> Self {
        Self {
            buf: Vec::new(),
            max: max.max(1),
            hold: masker.longest().saturating_sub(1),
            chunked: false,
        }
    }

    /// Appends `data`, pushing every completed line or full chunk to `out`.
    fn push(&mut self, mut data: &[u8], masker: &SecretMasker, out: &mut Vec<Vec<u8>>) {
        while let Some(newline) = data.iter().position(|&b| b == b'\n') {
            self.buf.extend_from_slice(&data[..newline]);
            data = &data[newline + 1..];
            self.end_line(masker, out);
        }
        self.buf.extend_from_slice(data);
        self.split_long(self.hold, masker, out);
    }

    /// Emits the unterminated rest at end of stream.
    fn finish(&mut self, masker: &SecretMasker, out: &mut Vec<Vec<u8>>) {
        if !self.buf.is_empty() {
            self.end_line(masker, out);
        }
    }

    fn end_line(&mut self, masker: &SecretMasker, out: &mut Vec<Vec<u8>>) {
        if self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        // The whole line is known: nothing to hold back.
        self.split_long(0, masker, out);
        // A line that was an exact multiple of `max` has nothing left.
        if !self.buf.is_empty() || !self.chunked {
            out.push(std::mem::take(&mut self.buf));
        }
        self.chunked = false;
    }

    /// Cuts chunks off the line while it is longer than `max + hold`.
    fn split_long(&mut self, hold: usize, masker: &SecretMasker, out: &mut Vec<Vec<u8>>) {
        while self.buf.len() > self.max + hold {
            let mut cut = chunk_len(&self.buf, self.max);
            if let Some((start, end)) = masker.straddling(&self.buf, cut) {
                cut = if start > 0 { start } else { end };
            }
            out.push(self.buf.drain(..cut).collect());
            self.chunked = true;
        }
    }
}

/// Length of the next chunk of `buf` (longer than `max`): `max`, or a little
/// less so as not to cut a UTF-8 sequence in two.
fn chunk_len(buf: &[u8], max: usize) -> usize {
    let is_continuation = |b: u8| b & 0xC0 == 0x80;
    (max.saturating_sub(3)..=max)
        .rev()
        .find(|&cut| cut > 0 && !is_continuation(buf[cut]))
        .unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(60);

    fn command(argv: &[&str]) -> ExecRequest {
        ExecRequest::new(
            ExecProgram::Command(argv.iter().map(|s| (*s).to_owned()).collect()),
            LONG,
        )
    }

    fn sh(script: &str) -> ExecRequest {
        command(&["sh", "-c", script])
    }

    fn script(text: &str) -> ExecRequest {
        ExecRequest::new(ExecProgram::Script(text.to_owned()), LONG)
    }

    /// Runs `req`, collecting every line.
    async fn run(req: ExecRequest) -> (ExecOutcome, Vec<LogLine>) {
        let (tx, mut rx) = mpsc::channel(64);
        let collector = tokio::spawn(async move {
            let mut lines = Vec::new();
            while let Some(line) = rx.recv().await {
                lines.push(line);
            }
            lines
        });
        let outcome = execute(req, tx, CancellationToken::new()).await;
        (outcome, collector.await.unwrap())
    }

    fn texts(lines: &[LogLine]) -> Vec<&str> {
        lines.iter().map(|l| l.text.as_str()).collect()
    }

    fn is_alive(pid: i32) -> bool {
        proc_state(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
    }

    #[tokio::test]
    async fn stdout_and_stderr_are_separate_with_increasing_seq() {
        let (outcome, lines) = run(sh("echo out1; echo err1 >&2; echo out2; echo err2 >&2")).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        assert_eq!(outcome.lines, 4);
        let seqs: Vec<u64> = lines.iter().map(|l| l.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4]);
        let of = |stream| {
            lines
                .iter()
                .filter(|l| l.stream == stream)
                .map(|l| l.text.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(of(LogStream::Stdout), vec!["out1", "out2"]);
        assert_eq!(of(LogStream::Stderr), vec!["err1", "err2"]);
    }

    #[tokio::test]
    async fn exit_code_is_reported() {
        let (outcome, _) = run(sh("exit 3")).await;
        assert_eq!(outcome.exit_code, Some(3));
        assert_eq!(outcome.signal, None);
        assert!(!outcome.timed_out && !outcome.cancelled && outcome.error.is_none());
        assert!(!outcome.succeeded());
    }

    #[tokio::test]
    async fn script_with_shebang_runs_its_interpreter() {
        let (outcome, lines) = run(script("#!/bin/sh\nset -eu\necho \"from sh\"\n")).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        assert_eq!(texts(&lines), vec!["from sh"]);

        // cat as interpreter prints the script: proof the #! line is honoured.
        let (outcome, lines) = run(script("#!/bin/cat\nnot a shell command\n")).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        assert_eq!(texts(&lines), vec!["#!/bin/cat", "not a shell command"]);

        // One interpreter argument, as Linux passes it.
        let (outcome, lines) = run(script("#!/bin/sh -e\necho one\nfalse\necho two\n")).await;
        assert_eq!(outcome.exit_code, Some(1));
        assert_eq!(texts(&lines), vec!["one"]);
    }

    #[tokio::test]
    async fn script_without_shebang_runs_with_sh_from_a_private_file() {
        let (outcome, lines) = run(script(
            "echo plain\necho \"$0\"\nstat -c %a \"$0\"\nstat -c %a \"$(dirname \"$0\")\"\n",
        ))
        .await;
        assert!(outcome.succeeded(), "{outcome:?}");
        let texts = texts(&lines);
        assert_eq!(texts[0], "plain");
        assert_eq!(&texts[2..], ["700", "700"]);
        let path = Path::new(texts[1]);
        assert!(!path.exists(), "script file left behind");
        assert!(!path.parent().unwrap().exists(), "script dir left behind");
    }

    #[tokio::test]
    async fn working_dir_is_created() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/b/c");
        let mut req = command(&["pwd"]);
        req.working_dir = Some(dir.clone());
        let (outcome, lines) = run(req).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        assert!(dir.is_dir());
        assert_eq!(
            texts(&lines),
            vec![dir.canonicalize().unwrap().to_str().unwrap()]
        );
    }

    #[tokio::test]
    async fn working_dir_that_is_a_file_is_an_error() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut req = command(&["true"]);
        req.working_dir = Some(file.path().to_owned());
        let (outcome, lines) = run(req).await;
        let expected = format!("working dir {}: not a directory", file.path().display());
        assert_eq!(outcome.error.as_deref(), Some(expected.as_str()));
        assert_eq!(outcome.exit_code, None);
        assert!(lines.is_empty());
    }

    #[tokio::test]
    async fn env_and_secrets_reach_the_job_only() {
        let secret = "s3cr3t-V4lue";
        let mut req = sh("echo \"foo=$FOO\"; echo \"x=$SECRET_X\"; \
             stat -c %a \"$HODEI_SECRETS_FILE\"; cat \"$HODEI_SECRETS_FILE\"; echo; \
             echo \"file=$HODEI_SECRETS_FILE\"");
        req.env.insert("FOO".into(), "bar".into());
        req.secrets.insert("SECRET_X".into(), secret.into());
        let (outcome, lines) = run(req).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        let texts = texts(&lines);
        assert_eq!(
            &texts[..4],
            ["foo=bar", "x=***", "600", r#"{"SECRET_X":"***"}"#]
        );
        assert!(lines.iter().all(|l| !l.text.contains(secret)));
        let file = texts[4].strip_prefix("file=").unwrap();
        assert!(!file.is_empty());
        assert!(!Path::new(file).exists(), "secrets file left behind");
        if let Some(dir) = memory_dirs().first() {
            assert!(
                Path::new(file).starts_with(dir),
                "secrets file {file} not in {} (tmpfs)",
                dir.display()
            );
        }

        // Never in the agent's own environment.
        assert!(std::env::var("SECRET_X").is_err());
        assert!(std::env::vars().all(|(_, v)| !v.contains(secret)));
    }

    #[test]
    fn the_secrets_file_goes_only_to_memory_file_systems() {
        assert!(!in_memory(Path::new("/proc")), "procfs is not tmpfs");
        assert!(!in_memory(Path::new("/nonexistent-dir")));
        for dir in memory_dirs() {
            assert!(
                in_memory(&dir),
                "{} listed but not in memory",
                dir.display()
            );
        }
        let shm = Path::new("/dev/shm");
        assert_eq!(
            memory_dirs().first().map(PathBuf::as_path) == Some(shm),
            in_memory(shm),
            "/dev/shm comes first whenever it is a tmpfs"
        );
    }

    #[test]
    fn programs_are_looked_up_like_execvp() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        let tool = bin.join("tool");
        fs::write(&tool, "#!/bin/sh\necho tool\n").unwrap();
        fs::set_permissions(&tool, Permissions::from_mode(0o755)).unwrap();
        let plain = bin.join("plain");
        fs::write(&plain, "not executable").unwrap();
        let path = std::env::join_paths(["/nonexistent", bin.to_str().unwrap()]).unwrap();
        // Found in the child's PATH.
        assert_eq!(
            resolve_program("tool".into(), &path, None),
            tool.clone().into_os_string()
        );
        // Not executable, not found, or already a path: unchanged.
        assert_eq!(resolve_program("plain".into(), &path, None), "plain");
        assert_eq!(resolve_program("nothing".into(), &path, None), "nothing");
        assert_eq!(resolve_program("./tool".into(), &path, None), "./tool");
        // A relative entry is searched from the working directory and stays
        // relative (the child resolves it after its chdir).
        assert_eq!(
            resolve_program("tool".into(), OsStr::new("bin"), Some(dir.path())),
            "./bin/tool"
        );
        assert_eq!(
            resolve_program("tool".into(), OsStr::new("bin"), None),
            "tool",
            "not found from the agent's own directory"
        );
    }

    #[tokio::test]
    async fn a_job_s_own_path_finds_its_programs() {
        let dir = tempfile::tempdir().unwrap();
        // A link to an existing program, not a file written here: a file
        // this process just wrote can be held open for writing by a child
        // another test's thread is forking, and executing it then fails
        // with ETXTBSY.
        std::os::unix::fs::symlink("/bin/echo", dir.path().join("only-here")).unwrap();
        let mut req = command(&["only-here", "found", "via", "job", "PATH"]);
        req.env.insert(
            "PATH".into(),
            format!("{}:{}", dir.path().display(), DEFAULT_PATH),
        );
        let (outcome, lines) = run(req).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        assert_eq!(texts(&lines), ["found via job PATH"]);
    }

    #[tokio::test]
    async fn agent_environment_is_not_inherited_beyond_the_allow_list() {
        let (outcome, lines) = run(command(&["env"])).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        for line in &lines {
            let name = line.text.split('=').next().unwrap();
            assert!(
                INHERITED_ENV.contains(&name) || name == SECRETS_FILE_ENV,
                "unexpected variable {name}"
            );
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group_promptly() {
        let mut req = sh("sleep 1000 & sleep 1000");
        req.timeout = Duration::from_secs(1);
        let started = std::time::Instant::now();
        let (outcome, _) = run(req).await;
        let elapsed = started.elapsed();
        assert!(outcome.timed_out && !outcome.cancelled, "{outcome:?}");
        assert_eq!(outcome.signal, Some(Signal::SIGTERM as i32));
        assert_eq!(outcome.exit_code, None);
        assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timeout_leaves_no_process_of_the_group_behind() {
        let mut req = sh("sleep 1000 & echo $$ $!; wait");
        req.timeout = Duration::from_secs(1);
        let (outcome, lines) = run(req).await;
        assert!(outcome.timed_out, "{outcome:?}");
        let pids: Vec<i32> = lines[0]
            .text
            .split(' ')
            .map(|p| p.parse().unwrap())
            .collect();
        let (pgid, sleep_pid) = (pids[0], pids[1]);
        assert!(!any_live_member(Pid::from_raw(pgid)).unwrap());
        assert!(
            !is_alive(sleep_pid),
            "background sleep {sleep_pid} survived"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leftover_background_children_are_killed_after_a_normal_exit() {
        let started = std::time::Instant::now();
        // The background sleep keeps stdout open after the shell exits.
        let (outcome, lines) = run(sh("sleep 1000 & echo $$ $!")).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pids: Vec<i32> = lines[0]
            .text
            .split(' ')
            .map(|p| p.parse().unwrap())
            .collect();
        assert!(!any_live_member(Pid::from_raw(pids[0])).unwrap());
        assert!(!is_alive(pids[1]), "background sleep survived");
    }

    /// Starts `req` in a task; returns its handle, the line receiver and the
    /// cancellation token.
    fn start(
        req: ExecRequest,
    ) -> (
        tokio::task::JoinHandle<ExecOutcome>,
        mpsc::Receiver<LogLine>,
        CancellationToken,
    ) {
        let (tx, rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(execute(req, tx, cancel.clone()));
        (handle, rx, cancel)
    }

    /// A cancellation sends SIGTERM to the whole group at once: the shell
    /// and a background member stamp when it reached them (within 1 s of
    /// the cancel), and a job that does not trap it dies of it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancel_sends_sigterm_to_the_group_within_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let (leader, member) = (dir.path().join("leader"), dir.path().join("member"));
        let (handle, mut rx, cancel) = start(sh(&format!(
            "sh -c 'trap \"date +%s%N > {member}; exit 1\" TERM; echo member; \
             while :; do sleep 0.05; done' &
             trap 'date +%s%N > {leader}; exit 143' TERM
             echo leader
             while :; do sleep 0.05; done",
            member = member.display(),
            leader = leader.display()
        )));
        let mut ready = vec![rx.recv().await.unwrap().text, rx.recv().await.unwrap().text];
        ready.sort();
        assert_eq!(ready, ["leader", "member"]);
        let cancelled_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        cancel.cancel();
        let outcome = handle.await.unwrap();
        assert!(outcome.cancelled && !outcome.timed_out, "{outcome:?}");
        assert_eq!(outcome.exit_code, Some(143));
        for path in [&leader, &member] {
            let stamp: u128 = fs::read_to_string(path).unwrap().trim().parse().unwrap();
            assert!(stamp >= cancelled_at);
            let after_ms = (stamp - cancelled_at) / 1_000_000;
            assert!(
                after_ms < 1000,
                "{}: SIGTERM after {after_ms} ms",
                path.display()
            );
        }

        let (handle, mut rx, cancel) = start(sh("echo started; sleep 1000"));
        assert_eq!(rx.recv().await.unwrap().text, "started");
        cancel.cancel();
        let outcome = handle.await.unwrap();
        assert!(outcome.cancelled, "{outcome:?}");
        assert_eq!(outcome.signal, Some(Signal::SIGTERM as i32));
    }

    #[tokio::test]
    async fn sigterm_ignored_escalates_to_sigkill_after_grace() {
        let mut req = sh("trap '' TERM; echo ready; sleep 1000 & echo $!; wait");
        req.kill_grace = Duration::from_millis(300);
        let (handle, mut rx, cancel) = start(req);
        assert_eq!(rx.recv().await.unwrap().text, "ready");
        let sleep_pid: i32 = rx.recv().await.unwrap().text.parse().unwrap();
        cancel.cancel();
        let outcome = handle.await.unwrap();
        assert!(outcome.cancelled, "{outcome:?}");
        assert_eq!(outcome.signal, Some(Signal::SIGKILL as i32));
        assert!(!is_alive(sleep_pid));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_execution_kills_the_group() {
        let (handle, mut rx, _cancel) = start(sh("sleep 1000 & echo $$ $!; wait"));
        let line = rx.recv().await.unwrap();
        let pids: Vec<i32> = line.text.split(' ').map(|p| p.parse().unwrap()).collect();
        handle.abort();
        assert!(handle.await.unwrap_err().is_cancelled());
        // SIGKILL was sent synchronously on drop; death itself is asynchronous.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while any_live_member(Pid::from_raw(pids[0])).unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "group survived the drop"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!is_alive(pids[1]));
    }

    #[tokio::test]
    async fn cancelled_before_start_runs_nothing() {
        let (tx, _rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        cancel.cancel();
        let outcome = execute(sh("echo hi"), tx, cancel).await;
        assert!(outcome.cancelled);
        assert_eq!(outcome.exit_code, None);
        assert_eq!(outcome.lines, 0);
    }

    #[tokio::test]
    async fn command_not_found_is_an_error() {
        let (outcome, lines) = run(command(&["hodei-no-such-command-xyz", "arg"])).await;
        assert_eq!(
            outcome.error.as_deref(),
            Some("command not found: hodei-no-such-command-xyz")
        );
        assert_eq!(outcome.exit_code, None);
        assert!(lines.is_empty());

        let (outcome, _) = run(script("#!/no/such/interpreter\necho hi\n")).await;
        assert_eq!(
            outcome.error.as_deref(),
            Some("script interpreter not found: /no/such/interpreter")
        );

        let (outcome, _) = run(command(&[])).await;
        assert_eq!(outcome.error.as_deref(), Some("empty command"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_lines_arrive_complete_and_in_order_with_a_slow_consumer() {
        const N: u64 = 100_000;
        let (handle, mut rx, _cancel) = start(command(&["seq", "1", &N.to_string()]));
        let mut expected = 1;
        while let Some(line) = rx.recv().await {
            assert_eq!(line.seq, expected);
            assert_eq!(line.stream, LogStream::Stdout);
            assert_eq!(line.text, expected.to_string());
            expected += 1;
            if expected % 1000 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
        assert_eq!(expected, N + 1);
        let outcome = handle.await.unwrap();
        assert!(outcome.succeeded(), "{outcome:?}");
        assert_eq!(outcome.lines, N);
    }

    #[tokio::test]
    async fn closed_receiver_does_not_block_the_job() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let outcome = execute(
            command(&["seq", "1", "50000"]),
            tx,
            CancellationToken::new(),
        )
        .await;
        assert!(outcome.succeeded(), "{outcome:?}");
        assert_eq!(outcome.lines, 50_000);
    }

    #[tokio::test]
    async fn very_long_line_is_chunked() {
        let mut req = sh("head -c 200000 /dev/zero | tr '\\0' a; echo; echo after");
        req.max_line_bytes = 65_536;
        let (outcome, lines) = run(req).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        let lens: Vec<usize> = lines.iter().map(|l| l.text.len()).collect();
        assert_eq!(lens, vec![65_536, 65_536, 65_536, 3_392, 5]);
        assert!(lines[..4].iter().all(|l| l.text.bytes().all(|b| b == b'a')));
        assert_eq!(lines[4].text, "after");
    }

    #[tokio::test]
    async fn crlf_and_invalid_utf8_and_unterminated_last_line() {
        let (outcome, lines) = run(sh("printf 'dos\\r\\nbad\\377byte\\nlast'")).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        assert_eq!(texts(&lines), vec!["dos", "bad\u{FFFD}byte", "last"]);
    }

    #[tokio::test]
    async fn secret_appearing_twice_in_a_line_is_masked_twice() {
        let mut req = sh("echo \"a $PW b $PW c\"");
        req.secrets.insert("PW".into(), "hunter2".into());
        let (outcome, lines) = run(req).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        assert_eq!(texts(&lines), vec!["a *** b *** c"]);
    }

    #[test]
    fn masker_prefers_longest_values_and_ignores_empty_ones() {
        let masker = SecretMasker::new(["abc".to_owned(), String::new(), "abcdef".to_owned()]);
        assert_eq!(masker.mask("xabcdefy abc"), "x***y ***");
        assert!(matches!(masker.mask("nothing here"), Cow::Borrowed(_)));
        assert!(SecretMasker::new([String::new()]).is_empty());
        assert_eq!(SecretMasker::new([String::new()]).mask(""), "");
        // Inserted masks are never re-matched.
        assert_eq!(SecretMasker::new(["**".to_owned()]).mask("a**b"), "a***b");
        assert_eq!(
            SecretMasker::new(["é".to_owned()]).mask("café é"),
            "caf*** ***"
        );
    }

    #[test]
    fn masker_masks_each_line_of_a_multi_line_secret() {
        let masker = SecretMasker::new(["-----BEGIN-----\r\n  keybody  \n\n".to_owned()]);
        assert_eq!(masker.mask("got keybody!"), "got ***!");
        assert_eq!(masker.mask("-----BEGIN-----"), "***");
        assert!(!format!("{masker:?}").contains("keybody"));
    }

    #[test]
    fn splitter_handles_partial_lines_and_chunks_on_char_boundaries() {
        let mut out = Vec::new();
        let none = SecretMasker::default();
        let mut splitter = LineSplitter::new(4, &none);
        splitter.push(b"ab", &none, &mut out);
        splitter.push(b"c\r\n\nabcd\nabcdefgh\n", &none, &mut out);
        splitter.push("aé€x\n".as_bytes(), &none, &mut out);
        splitter.push(b"tail", &none, &mut out);
        splitter.finish(&none, &mut out);
        let out: Vec<String> = out
            .into_iter()
            .map(|l| String::from_utf8(l).unwrap())
            .collect();
        // "aé€x" is 1+2+3+1 bytes: split as "aé" (3) and "€x" (4).
        assert_eq!(out, ["abc", "", "abcd", "abcd", "efgh", "aé", "€x", "tail"]);
    }

    /// Regression: a long line was cut at `max` bytes before masking, so a
    /// secret crossing the cut left the agent as two unmasked halves.
    #[test]
    fn splitter_never_cuts_inside_a_secret() {
        let masker = SecretMasker::new(["SECRET".to_owned(), "XY".to_owned()]);
        let masked = |chunks: &[Vec<u8>]| -> Vec<String> {
            chunks
                .iter()
                .map(|c| masker.mask(&String::from_utf8_lossy(c)).into_owned())
                .collect()
        };
        // The secret crosses the cut at 10: whole input at once, and byte by
        // byte (the cut must wait until the secret has arrived).
        let line = b"0123456SECRET789abcdefghij";
        let mut at_once = Vec::new();
        let mut splitter = LineSplitter::new(10, &masker);
        splitter.push(line, &masker, &mut at_once);
        splitter.finish(&masker, &mut at_once);
        let mut trickled = Vec::new();
        let mut splitter = LineSplitter::new(10, &masker);
        for byte in line {
            splitter.push(std::slice::from_ref(byte), &masker, &mut trickled);
        }
        splitter.finish(&masker, &mut trickled);
        for chunks in [&at_once, &trickled] {
            let texts = masked(chunks);
            assert_eq!(texts, ["0123456", "***789a", "bcdefghij"], "{chunks:?}");
            assert!(chunks.iter().all(|c| c.len() <= 10));
        }
        // A secret longer than a chunk, at the start of one: the chunk ends
        // after it (longer than `max`, but masked).
        let long = SecretMasker::new(["ABCDEFGHIJKLMN".to_owned()]);
        let mut out = Vec::new();
        let mut splitter = LineSplitter::new(10, &long);
        splitter.push(b"ABCDEFGHIJKLMNrest-of-the-line\n", &long, &mut out);
        let texts: Vec<String> = out
            .iter()
            .map(|c| long.mask(&String::from_utf8_lossy(c)).into_owned())
            .collect();
        assert_eq!(texts, ["***", "rest-of-th", "e-line"]);
        // Without secrets nothing is held back: cuts are at `max`.
        let none = SecretMasker::default();
        let mut out = Vec::new();
        let mut splitter = LineSplitter::new(10, &none);
        splitter.push(b"0123456789abcdefghijk", &none, &mut out);
        assert_eq!(out, [b"0123456789".to_vec(), b"abcdefghij".to_vec()]);
    }

    #[tokio::test]
    async fn a_secret_straddling_the_line_limit_is_masked() {
        // 65,533 bytes, then the secret across the 64 KiB cut, then more.
        let mut req = sh("head -c 65533 /dev/zero | tr '\\0' a; printf '%s' \"$PW\"; echo tail");
        req.secrets.insert("PW".into(), "hunter2".into());
        let (outcome, lines) = run(req).await;
        assert!(outcome.succeeded(), "{outcome:?}");
        assert!(lines.len() >= 2, "the line was split: {}", lines.len());
        for line in &lines {
            for half in ["hun", "ter2", "nter", "unter", "hunter"] {
                assert!(!line.text.contains(half), "{half} leaked");
            }
        }
        let whole: String = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(whole, format!("{}***tail", "a".repeat(65_533)));
        assert!(lines.iter().all(|l| l.text.len() <= DEFAULT_MAX_LINE_BYTES));
    }

    #[test]
    fn request_debug_hides_secret_values() {
        let mut req = command(&["true"]);
        req.secrets.insert("TOKEN".into(), "very-secret".into());
        let shown = format!("{req:?}");
        assert!(shown.contains("TOKEN") && !shown.contains("very-secret"));
    }
}
