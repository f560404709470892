//! The `hodei` command-line client (see `docs/CLI.md`).
//!
//! [`main`] parses the command line, runs one command against the server's
//! gRPC API and returns the process exit code. Errors are one line on
//! stderr (`hodei: ...`), never a backtrace, and map to the exit codes in
//! [`exit`].

mod output;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hodei_core::job::JobState;
use hodei_core::spec::{RawJobSpec, RawResources, parse_duration_secs, parse_memory_mb};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::convert;
use crate::proto;
use output::Printer;

/// Process exit codes of `hodei` (documented in docs/CLI.md).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Bad command line (clap's own code).
    pub const USAGE: u8 = 2;
    /// The server could not be reached (or is unavailable).
    pub const UNREACHABLE: u8 = 3;
    /// The server rejected the request as invalid (e.g. a malformed spec).
    pub const REJECTED: u8 = 4;
    /// The job, worker or secret does not exist.
    pub const NOT_FOUND: u8 = 5;
    /// Missing or wrong API token.
    pub const UNAUTHENTICATED: u8 = 6;
    /// The request conflicts with the current state (e.g. cancelling a
    /// finished job).
    pub const CONFLICT: u8 = 7;
    /// Any other server or client error.
    pub const ERROR: u8 = 8;
    /// `job run`: the job failed without an exit code (could not start,
    /// worker lost, no worker could be provisioned).
    pub const JOB_FAILED: u8 = 125;
    /// `job run`: the job timed out (as `timeout(1)`).
    pub const JOB_TIMED_OUT: u8 = 124;
    /// `job run`: the job was cancelled (as a shell's SIGINT status).
    pub const JOB_CANCELLED: u8 = 130;
    /// stdout was closed by its reader (as a shell's SIGPIPE status).
    pub const BROKEN_PIPE: u8 = 141;
}

/// The `hodei` command line.
#[derive(Debug, Parser)]
#[command(
    name = "hodei",
    version,
    about = "Command-line client of the Hodei job platform",
    propagate_version = true
)]
pub struct Cli {
    /// gRPC URL of the server.
    #[arg(
        long,
        env = "HODEI_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// API bearer token.
    #[arg(long, env = "HODEI_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    pub output: OutputFormat,
    /// Correlation id sent with every request (generated when absent).
    /// Give it before the command; `audit --correlation-id` is a filter.
    #[arg(long = "correlation-id")]
    pub correlation_id: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// For people.
    Text,
    /// For programs: JSON (JSON lines for streams).
    Json,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit, inspect and cancel jobs.
    Job(Box<JobArgs>),
    /// List and drain workers.
    Worker(WorkerArgs),
    /// List providers.
    Provider(ProviderArgs),
    /// Query the audit trail (domain events).
    Audit(AuditArgs),
    /// Manage secrets.
    Secret(SecretArgs),
}

/// Most jobs (`job list`) or events (`audit`) one `--limit` may ask for:
/// the server refuses more, so the CLI refuses it before connecting.
const MAX_LIMIT: u32 = 1000;

/// `--limit`: 1..=[`MAX_LIMIT`].
fn page_limit() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(MAX_LIMIT))
}

/// `--correlation-id` after a command name.
#[derive(Debug, Clone, Args)]
pub struct Correlation {
    /// Correlation id sent with every request (generated when absent).
    #[arg(long = "correlation-id", global = true)]
    pub correlation_id: Option<String>,
}

/// `hodei job`.
#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(flatten)]
    corr: Correlation,
    #[command(subcommand)]
    cmd: JobCmd,
}

/// `hodei job ...`.
#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Submit a job, stream its logs live, exit with its exit code.
    Run(SpecArgs),
    /// Submit a job and print its id.
    Submit(SpecArgs),
    /// Show a job.
    Get {
        /// Job id.
        id: String,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs in this state (PENDING, RUNNING, SUCCEEDED, ...).
        #[arg(long)]
        state: Option<String>,
        /// Most jobs to show (1..=1000).
        #[arg(
            long,
            default_value_t = 50,
            value_parser = page_limit(),
            allow_negative_numbers = true
        )]
        limit: u32,
        /// Continue after a previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Print a job's logs.
    Logs {
        /// Job id.
        id: String,
        /// Keep streaming until the job ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: String,
    },
    /// Show a job's events.
    Events {
        /// Job id.
        id: String,
    },
}

/// The job spec flags of `job run` and `job submit`.
#[derive(Debug, Clone, Args)]
pub struct SpecArgs {
    /// Name of the job.
    #[arg(long)]
    pub name: Option<String>,
    /// Run this script file instead of a command (`-` reads stdin).
    #[arg(long)]
    pub script: Option<String>,
    /// Image (providers that run images).
    #[arg(long)]
    pub image: Option<String>,
    /// Environment variable K=V (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Secret to expose as an environment variable (repeatable).
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,
    /// Working directory.
    #[arg(long)]
    pub workdir: Option<String>,
    /// Timeout of one attempt: 30s, 5m, 1h30m or seconds.
    #[arg(long)]
    pub timeout: Option<String>,
    /// Attempts in total (1..=100).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Retry attempts that exit non-zero (off: only infrastructure
    /// failures are retried).
    #[arg(long)]
    pub retry_on_failure: bool,
    /// Priority, higher first (-1000..=1000).
    #[arg(long, allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Label K=V (repeatable).
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// Provider to run on.
    #[arg(long)]
    pub provider: Option<String>,
    /// CPUs (fractions allowed).
    #[arg(long)]
    pub cpu: Option<f64>,
    /// Memory: 512Mi, 2Gi, or MiB.
    #[arg(long)]
    pub memory: Option<String>,
    /// Client key that makes the submission idempotent.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// The command and its arguments (after `--`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    pub command: Vec<String>,
}

/// `hodei worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    corr: Correlation,
    #[command(subcommand)]
    cmd: WorkerCmd,
}

/// `hodei worker ...`.
#[derive(Debug, Subcommand)]
pub enum WorkerCmd {
    /// List workers.
    List,
    /// Drain a worker: no new work, finish what it runs, leave.
    Drain {
        /// Worker id.
        id: String,
    },
    /// Issue a one-time registration token for an agent started by hand
    /// (HODEI_WORKER_ID, HODEI_WORKER_TOKEN).
    Token {
        /// Worker id to register under (generated when absent).
        #[arg(long)]
        worker_id: Option<String>,
        /// Validity: 10m, 1h, ... (default 10m).
        #[arg(long)]
        ttl: Option<String>,
    },
}

/// `hodei provider`.
#[derive(Debug, Args)]
pub struct ProviderArgs {
    #[command(flatten)]
    corr: Correlation,
    #[command(subcommand)]
    cmd: ProviderCmd,
}

/// `hodei provider ...`.
#[derive(Debug, Subcommand)]
pub enum ProviderCmd {
    /// List providers and their health.
    List,
}

/// `hodei audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Events of this correlation id.
    #[arg(long = "correlation-id")]
    pub correlation_id: Option<String>,
    /// Events of this type (e.g. JobFailed).
    #[arg(long)]
    pub event_type: Option<String>,
    /// Events of this actor.
    #[arg(long)]
    pub actor: Option<String>,
    /// At or after (RFC 3339, e.g. 2026-01-31T12:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Before (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// Most events (1..=1000).
    #[arg(
        long,
        default_value_t = 100,
        value_parser = page_limit(),
        allow_negative_numbers = true
    )]
    pub limit: u32,
    /// Skip this many matching events.
    #[arg(long, default_value_t = 0)]
    pub offset: u32,
}

/// `hodei secret`.
#[derive(Debug, Args)]
pub struct SecretArgs {
    #[command(flatten)]
    corr: Correlation,
    #[command(subcommand)]
    cmd: SecretCmd,
}

/// `hodei secret ...`.
#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Create or replace a secret; the value is read from stdin.
    Set {
        /// Secret name.
        name: String,
    },
    /// List secret names.
    List,
    /// Delete a secret.
    Delete {
        /// Secret name.
        name: String,
    },
}

/// A failed command: its exit code and the one line to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    /// Exit code ([`exit`]).
    pub code: u8,
    /// Message, without the `hodei: ` prefix.
    pub message: String,
}

impl CliError {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn usage(message: impl Into<String>) -> Self {
        Self::new(exit::USAGE, message)
    }

    fn from_status(server: &str, s: &Status) -> Self {
        let code = match s.code() {
            Code::Unavailable | Code::DeadlineExceeded => exit::UNREACHABLE,
            Code::InvalidArgument | Code::OutOfRange => exit::REJECTED,
            Code::NotFound => exit::NOT_FOUND,
            Code::Unauthenticated | Code::PermissionDenied => exit::UNAUTHENTICATED,
            Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => exit::CONFLICT,
            _ => exit::ERROR,
        };
        let message = match code {
            exit::UNREACHABLE => {
                format!("the hodei server at {server} is unavailable: {}", short(s))
            }
            exit::UNAUTHENTICATED => format!(
                "not authenticated: {} (set --token or HODEI_TOKEN)",
                short(s)
            ),
            _ => short(s),
        };
        Self::new(code, message)
    }
}

fn short(s: &Status) -> String {
    let m = s.message().trim();
    if m.is_empty() {
        format!("{:?}", s.code())
    } else {
        m.lines().next().unwrap_or(m).to_owned()
    }
}

/// Runs the CLI with the process's arguments; returns the exit code.
pub async fn main() -> u8 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(line) = usage_error_line(&e) {
                eprintln!("hodei: {line}");
                return exit::USAGE;
            }
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return code;
        }
    };
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            if !e.message.is_empty() {
                eprintln!("hodei: {}", e.message);
            }
            e.code
        }
    }
}

/// A command-line error as the one line docs/CLI.md promises (without the
/// `hodei: ` prefix): clap's message with its details and tips joined,
/// its usage block and help hint left out. `None` for help, version and
/// the help printed when no command is given, which clap prints itself.
fn usage_error_line(e: &clap::Error) -> Option<String> {
    use clap::error::ErrorKind;
    if !e.use_stderr()
        || matches!(
            e.kind(),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand
        )
    {
        return None;
    }
    // `render` without colour: plain text, whatever the terminal.
    let text = e.render().to_string();
    let mut line = String::new();
    for part in text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:"))
        .filter(|l| !l.is_empty() && !l.starts_with("For more information"))
    {
        let part = part.strip_prefix("error: ").unwrap_or(part);
        if !line.is_empty() {
            // "...not provided:" is followed by its list; a tip is a
            // sentence of its own.
            line.push_str(if line.ends_with(':') { " " } else { "; " });
        }
        line.push_str(part);
    }
    Some(format!("{line} (see --help)"))
}

/// Runs one parsed command; `Ok` carries the exit code (a job's, for
/// `job run`).
pub async fn run(cli: Cli) -> Result<u8, CliError> {
    let sub_corr = match &cli.command {
        Command::Job(a) => a.corr.correlation_id.clone(),
        Command::Worker(a) => a.corr.correlation_id.clone(),
        Command::Provider(a) => a.corr.correlation_id.clone(),
        Command::Secret(a) => a.corr.correlation_id.clone(),
        Command::Audit(_) => None,
    };
    let correlation_id = sub_corr
        .or(cli.correlation_id.clone())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if !crate::server::is_valid_correlation_id(&correlation_id) {
        return Err(CliError::usage(
            "invalid --correlation-id: accepted: 1 to 128 printable ASCII characters without spaces",
        ));
    }
    let printer = Printer::new(cli.output);
    // Validate local input before connecting.
    let spec = match &cli.command {
        Command::Job(a) => match &a.cmd {
            JobCmd::Run(s) | JobCmd::Submit(s) => Some(build_spec(s)?),
            _ => None,
        },
        _ => None,
    };
    let client = Client::connect(&cli.server, cli.token.as_deref(), &correlation_id).await?;
    match cli.command {
        Command::Job(a) => match a.cmd {
            JobCmd::Run(_) => job_run(&client, &printer, spec.unwrap_or_default()).await,
            JobCmd::Submit(_) => {
                let (job, replayed) = client.submit(spec.unwrap_or_default()).await?;
                printer.submitted(&job, replayed)?;
                Ok(exit::OK)
            }
            JobCmd::Get { id } => {
                let job = client
                    .jobs()
                    .get(proto::GetJobRequest { job_id: id })
                    .await
                    .map_err(|s| client.err(&s))?
                    .into_inner()
                    .job
                    .unwrap_or_default();
                printer.job(&job)?;
                Ok(exit::OK)
            }
            JobCmd::List {
                state,
                limit,
                cursor,
            } => {
                let state = match state {
                    Some(s) => {
                        let st: JobState = s.parse().map_err(CliError::usage)?;
                        convert::job_state(st) as i32
                    }
                    None => 0,
                };
                let resp = client
                    .jobs()
                    .list(proto::ListJobsRequest {
                        state,
                        limit,
                        cursor: cursor.unwrap_or_default(),
                    })
                    .await
                    .map_err(|s| client.err(&s))?
                    .into_inner();
                printer.jobs(&resp)?;
                Ok(exit::OK)
            }
            JobCmd::Logs { id, follow } => {
                job_logs(&client, &printer, id, follow).await?;
                Ok(exit::OK)
            }
            JobCmd::Cancel { id } => {
                let job = client
                    .jobs()
                    .cancel(proto::CancelJobRequest { job_id: id })
                    .await
                    .map_err(|s| client.err(&s))?
                    .into_inner()
                    .job
                    .unwrap_or_default();
                printer.cancelled(&job)?;
                Ok(exit::OK)
            }
            JobCmd::Events { id } => {
                let resp = client
                    .jobs()
                    .events(proto::JobEventsRequest { job_id: id })
                    .await
                    .map_err(|s| client.err(&s))?
                    .into_inner();
                printer.events(&resp.events, None)?;
                Ok(exit::OK)
            }
        },
        Command::Worker(a) => match a.cmd {
            WorkerCmd::List => {
                let resp = client
                    .workers()
                    .list(proto::ListWorkersRequest {})
                    .await
                    .map_err(|s| client.err(&s))?
                    .into_inner();
                printer.workers(&resp.workers)?;
                Ok(exit::OK)
            }
            WorkerCmd::Drain { id } => {
                client
                    .workers()
                    .drain(proto::DrainWorkerRequest {
                        worker_id: id.clone(),
                    })
                    .await
                    .map_err(|s| client.err(&s))?;
                printer.done("worker_id", &id, "draining")?;
                Ok(exit::OK)
            }
            WorkerCmd::Token { worker_id, ttl } => {
                let ttl_secs = match ttl {
                    Some(t) => {
                        parse_duration_secs(&t).map_err(|e| CliError::usage(e.to_string()))?
                    }
                    None => 0,
                };
                let resp = client
                    .workers()
                    .issue_token(proto::IssueTokenRequest {
                        worker_id: worker_id.unwrap_or_default(),
                        ttl_secs,
                    })
                    .await
                    .map_err(|s| client.err(&s))?
                    .into_inner();
                printer.token(&resp)?;
                Ok(exit::OK)
            }
        },
        Command::Provider(a) => match a.cmd {
            ProviderCmd::List => {
                let resp = client
                    .providers()
                    .list(proto::ListProvidersRequest {})
                    .await
                    .map_err(|s| client.err(&s))?
                    .into_inner();
                printer.providers(&resp.providers)?;
                Ok(exit::OK)
            }
        },
        Command::Audit(a) => {
            let ts = |flag: &str, v: Option<String>| -> Result<_, CliError> {
                v.map(|t| {
                    chrono::DateTime::parse_from_rfc3339(&t)
                        .map(|d| convert::timestamp(d.with_timezone(&chrono::Utc)))
                        .map_err(|e| {
                            CliError::usage(format!(
                                "invalid {flag} {t:?} ({e}); accepted: RFC 3339 such as 2026-01-31T12:00:00Z"
                            ))
                        })
                })
                .transpose()
            };
            let req = proto::AuditQueryRequest {
                correlation_id: a.correlation_id,
                event_type: a.event_type,
                actor: a.actor,
                since: ts("--since", a.since)?,
                until: ts("--until", a.until)?,
                limit: a.limit,
                offset: a.offset,
            };
            let resp = client
                .audit()
                .query(req)
                .await
                .map_err(|s| client.err(&s))?
                .into_inner();
            printer.events(&resp.events, Some((resp.total, a.limit, a.offset)))?;
            Ok(exit::OK)
        }
        Command::Secret(a) => match a.cmd {
            SecretCmd::Set { name } => {
                let value = read_secret_value(&name)?;
                client
                    .secrets()
                    .set(proto::SetSecretRequest {
                        name: name.clone(),
                        value,
                    })
                    .await
                    .map_err(|s| client.err(&s))?;
                printer.done("name", &name, "set")?;
                Ok(exit::OK)
            }
            SecretCmd::List => {
                let resp = client
                    .secrets()
                    .list(proto::ListSecretsRequest {})
                    .await
                    .map_err(|s| client.err(&s))?
                    .into_inner();
                printer.secrets(&resp.secrets)?;
                Ok(exit::OK)
            }
            SecretCmd::Delete { name } => {
                client
                    .secrets()
                    .delete(proto::DeleteSecretRequest { name: name.clone() })
                    .await
                    .map_err(|s| client.err(&s))?;
                printer.done("name", &name, "deleted")?;
                Ok(exit::OK)
            }
        },
    }
}

/// The raw spec the flags describe (validation is the server's).
pub fn build_spec(a: &SpecArgs) -> Result<RawJobSpec, CliError> {
    let pairs = |flag: &str, items: &[String]| -> Result<BTreeMap<String, String>, CliError> {
        items
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .ok_or_else(|| {
                        CliError::usage(format!("invalid {flag} {kv:?}; accepted: KEY=VALUE"))
                    })
            })
            .collect()
    };
    let script = match &a.script {
        Some(path) if path == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| CliError::usage(format!("cannot read the script from stdin: {e}")))?;
            Some(s)
        }
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| CliError::usage(format!("cannot read --script {path}: {e}")))?,
        ),
        None => None,
    };
    if script.is_some() && !a.command.is_empty() {
        return Err(CliError::usage(
            "give either --script FILE or a command after --, not both",
        ));
    }
    if script.is_none() && a.command.is_empty() {
        return Err(CliError::usage(
            "nothing to run; accepted: `-- CMD [ARGS...]` or --script FILE",
        ));
    }
    let timeout_secs = a
        .timeout
        .as_deref()
        .map(parse_duration_secs)
        .transpose()
        .map_err(|e| CliError::usage(format!("invalid --timeout: {}", e.problem)))?;
    let memory_mb = a
        .memory
        .as_deref()
        .map(parse_memory_mb)
        .transpose()
        .map_err(|e| CliError::usage(format!("invalid --memory: {}", e.problem)))?;
    let resources = (a.cpu.is_some() || memory_mb.is_some()).then_some(RawResources {
        cpu: a.cpu,
        memory_mb,
    });
    Ok(RawJobSpec {
        name: a.name.clone(),
        command: (!a.command.is_empty()).then(|| a.command.clone()),
        script,
        image: a.image.clone(),
        env: pairs("--env", &a.env)?,
        secrets: a.secrets.clone(),
        working_dir: a.workdir.clone(),
        timeout_secs,
        max_attempts: a.max_attempts,
        priority: a.priority,
        labels: pairs("--label", &a.labels)?,
        provider: a.provider.clone(),
        resources,
        idempotency_key: a.idempotency_key.clone(),
        retry_on_failure: a.retry_on_failure.then_some(true),
    })
}

/// The exit code `hodei job run` returns for a terminal job, and the
/// message it prints when the job did not succeed.
pub fn job_outcome(job: &proto::Job) -> (u8, Option<String>) {
    use proto::job_status::State;
    let id = &job.job_id;
    match job.status.as_ref().and_then(|s| s.state.as_ref()) {
        Some(State::Succeeded(_)) => (exit::OK, None),
        Some(State::Failed(f)) => {
            let failure = f.failure.clone().unwrap_or_default();
            let code = match (failure.exit_code, failure.signal) {
                (Some(c), _) if (1..=255).contains(&c) => c as u8,
                (Some(_), _) => 1,
                (None, Some(sig)) if (1..=127).contains(&sig) => 128 + sig as u8,
                _ => exit::JOB_FAILED,
            };
            (code, Some(format!("job {id} failed: {}", failure.message)))
        }
        Some(State::TimedOut(_)) => {
            let secs = job
                .spec
                .as_ref()
                .and_then(|s| s.timeout_secs)
                .map(|s| format!(" after {s}s"))
                .unwrap_or_default();
            (
                exit::JOB_TIMED_OUT,
                Some(format!("job {id} timed out{secs}")),
            )
        }
        Some(State::Cancelled(c)) => (
            exit::JOB_CANCELLED,
            Some(format!("job {id} was cancelled ({})", c.reason)),
        ),
        _ => (
            exit::ERROR,
            Some(format!("job {id} ended in an unexpected state")),
        ),
    }
}

async fn job_run(client: &Client, printer: &Printer, spec: RawJobSpec) -> Result<u8, CliError> {
    let (job, _) = client.submit(spec).await?;
    let id = job.job_id.clone();
    printer.run_started(&job);
    let mut logs = client
        .logs()
        .follow(proto::FollowLogsRequest {
            job_id: id.clone(),
            after: 0,
        })
        .await
        .map_err(|s| client.err(&s))?
        .into_inner();
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut cancelled = false;
    loop {
        tokio::select! {
            chunk = logs.message() => match chunk {
                Ok(Some(chunk)) => printer.log_lines(&chunk.lines)?,
                Ok(None) => break,
                Err(s) => return Err(client.err(&s)),
            },
            _ = &mut ctrl_c, if !cancelled => {
                cancelled = true;
                eprintln!("hodei: cancelling job {id}...");
                client
                    .jobs()
                    .cancel(proto::CancelJobRequest { job_id: id.clone() })
                    .await
                    .map_err(|s| client.err(&s))?;
            }
        }
    }
    let job = wait_terminal(client, &id).await?;
    printer.run_finished(&job)?;
    let (code, message) = job_outcome(&job);
    if let Some(m) = message {
        eprintln!("hodei: {m}");
    }
    Ok(code)
}

async fn wait_terminal(client: &Client, id: &str) -> Result<proto::Job, CliError> {
    let mut stream = client
        .jobs()
        .watch(proto::WatchJobRequest {
            job_id: id.to_owned(),
            after_sequence: u64::MAX,
        })
        .await
        .map_err(|s| client.err(&s))?
        .into_inner();
    let mut last = None;
    while let Some(msg) = stream.message().await.map_err(|s| client.err(&s))? {
        if let Some(proto::watch_job_response::Update::Job(j)) = msg.update {
            last = Some(j);
        }
    }
    last.filter(|j| {
        convert::job_state_from_proto("state", j.state)
            .ok()
            .flatten()
            .is_some_and(JobState::is_terminal)
    })
    .ok_or_else(|| {
        CliError::new(
            exit::ERROR,
            format!("the server stopped watching job {id} before it ended"),
        )
    })
}

async fn job_logs(
    client: &Client,
    printer: &Printer,
    id: String,
    follow: bool,
) -> Result<(), CliError> {
    if follow {
        let mut logs = client
            .logs()
            .follow(proto::FollowLogsRequest {
                job_id: id,
                after: 0,
            })
            .await
            .map_err(|s| client.err(&s))?
            .into_inner();
        while let Some(chunk) = logs.message().await.map_err(|s| client.err(&s))? {
            printer.log_lines(&chunk.lines)?;
        }
        return Ok(());
    }
    // Pages of up to 5,000 lines; the server also cuts a page at 1 MiB
    // (lines can be 64 KiB each), so a short page does not mean the end:
    // only an empty one does.
    let mut after = 0;
    loop {
        let page = client
            .logs()
            .page(proto::PageLogsRequest {
                job_id: id.clone(),
                after,
                limit: 5000,
            })
            .await
            .map_err(|s| client.err(&s))?
            .into_inner();
        let Some(last) = page.lines.last() else { break };
        after = last.seq;
        printer.log_lines(&page.lines)?;
    }
    Ok(())
}

fn read_secret_value(name: &str) -> Result<String, CliError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("value of secret {name} (end with Ctrl-D): ");
        let _ = std::io::stderr().flush();
    }
    let mut value = String::new();
    stdin
        .lock()
        .read_to_string(&mut value)
        .map_err(|e| CliError::usage(format!("cannot read the secret value from stdin: {e}")))?;
    // One trailing newline is how `echo` and editors end the value.
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    if value.is_empty() {
        return Err(CliError::usage(
            "the secret value read from stdin is empty; pipe it in: printf %s VALUE | hodei secret set NAME",
        ));
    }
    Ok(value)
}

// ---------------------------------------------------------------- client

/// Adds the bearer token and the correlation id to every call.
#[derive(Clone)]
struct Stamp {
    auth: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    correlation: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl tonic::service::Interceptor for Stamp {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(a) = &self.auth {
            req.metadata_mut().insert("authorization", a.clone());
        }
        req.metadata_mut()
            .insert(crate::server::CORRELATION_HEADER, self.correlation.clone());
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Stamp>;

struct Client {
    server: String,
    channel: Channel,
    stamp: Stamp,
}

/// Largest message accepted from the server.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

impl Client {
    async fn connect(
        server: &str,
        token: Option<&str>,
        correlation: &str,
    ) -> Result<Self, CliError> {
        let url = if server.contains("://") {
            server.to_owned()
        } else {
            format!("http://{server}")
        };
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| CliError::usage(format!("invalid --server {server:?}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let channel = endpoint.connect().await.map_err(|e| {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                reason = s.to_string();
                source = s.source();
            }
            CliError::new(
                exit::UNREACHABLE,
                format!("cannot reach the hodei server at {url}: {reason}"),
            )
        })?;
        let auth = match token.filter(|t| !t.is_empty()) {
            Some(t) => Some(format!("Bearer {t}").parse().map_err(|_| {
                CliError::usage("invalid --token: accepted: printable ASCII without spaces")
            })?),
            None => None,
        };
        let correlation = correlation
            .parse()
            .map_err(|_| CliError::usage("invalid --correlation-id"))?;
        Ok(Self {
            server: url,
            channel,
            stamp: Stamp { auth, correlation },
        })
    }

    fn svc(&self) -> Svc {
        InterceptedService::new(self.channel.clone(), self.stamp.clone())
    }

    fn err(&self, s: &Status) -> CliError {
        CliError::from_status(&self.server, s)
    }

    fn jobs(&self) -> proto::job_service_client::JobServiceClient<Svc> {
        proto::job_service_client::JobServiceClient::new(self.svc())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn logs(&self) -> proto::log_service_client::LogServiceClient<Svc> {
        proto::log_service_client::LogServiceClient::new(self.svc())
            .max_decoding_message_size(MAX_MESSAGE)
    }

    fn audit(&self) -> proto::audit_service_client::AuditServiceClient<Svc> {
        proto::audit_service_client::AuditServiceClient::new(self.svc())
            .max_decoding_message_size(MAX_MESSAGE)
    }

    fn workers(&self) -> proto::worker_admin_service_client::WorkerAdminServiceClient<Svc> {
        proto::worker_admin_service_client::WorkerAdminServiceClient::new(self.svc())
    }

    fn providers(&self) -> proto::provider_service_client::ProviderServiceClient<Svc> {
        proto::provider_service_client::ProviderServiceClient::new(self.svc())
    }

    fn secrets(&self) -> proto::secret_service_client::SecretServiceClient<Svc> {
        proto::secret_service_client::SecretServiceClient::new(self.svc())
    }

    /// Submits; the job and whether it was an earlier one (idempotency key).
    async fn submit(&self, spec: RawJobSpec) -> Result<(proto::Job, bool), CliError> {
        let resp = self
            .jobs()
            .submit(proto::SubmitJobRequest {
                spec: Some(convert::spec_to_proto(&spec)),
            })
            .await
            .map_err(|s| {
                let mut e = self.err(&s);
                if e.code == exit::REJECTED {
                    e.message = format!("job rejected: {}", e.message);
                }
                e
            })?;
        let resp = resp.into_inner();
        Ok((resp.job.unwrap_or_default(), resp.replayed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_args(extra: &[&str]) -> SpecArgs {
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            s: SpecArgs,
        }
        let mut argv = vec!["t"];
        argv.extend_from_slice(extra);
        T::try_parse_from(argv).unwrap().s
    }

    #[test]
    fn spec_flags_map_to_the_raw_spec() {
        let s = build_spec(&spec_args(&[
            "--name",
            "build",
            "--env",
            "A=1",
            "--label",
            "team=ci",
            "--timeout",
            "1m30s",
            "--memory",
            "1Gi",
            "--cpu",
            "0.5",
            "--max-attempts",
            "3",
            "--priority",
            "-5",
            "--secret",
            "KEY",
            "--",
            "sh",
            "-c",
            "echo hi",
        ]))
        .unwrap();
        assert_eq!(s.name.as_deref(), Some("build"));
        assert_eq!(s.command.unwrap(), vec!["sh", "-c", "echo hi"]);
        assert_eq!(s.env["A"], "1");
        assert_eq!(s.labels["team"], "ci");
        assert_eq!(s.timeout_secs, Some(90));
        assert_eq!(s.resources.unwrap().memory_mb, Some(1024));
        assert_eq!(s.max_attempts, Some(3));
        assert_eq!(s.priority, Some(-5));
        assert_eq!(s.secrets, vec!["KEY"]);
    }

    #[test]
    fn local_flag_errors_are_usage_errors() {
        for args in [
            &["--env", "NOVALUE", "--", "true"][..],
            &["--timeout", "soon", "--", "true"][..],
            &["--memory", "12XB", "--", "true"][..],
            &[][..],
        ] {
            assert_eq!(
                build_spec(&spec_args(args)).unwrap_err().code,
                exit::USAGE,
                "{args:?}"
            );
        }
    }

    #[test]
    fn exit_codes_follow_the_job_outcome() {
        use proto::job_status::{self as ps, State};
        let job = |state: State| proto::Job {
            job_id: "j".into(),
            status: Some(proto::JobStatus { state: Some(state) }),
            ..Default::default()
        };
        let failed = |exit_code, signal| {
            job(State::Failed(ps::Failed {
                failure: Some(proto::Failure {
                    kind: "non_zero_exit".into(),
                    message: "m".into(),
                    exit_code,
                    signal,
                }),
            }))
        };
        assert_eq!(
            job_outcome(&job(State::Succeeded(ps::Succeeded { exit_code: 0 }))).0,
            0
        );
        assert_eq!(job_outcome(&failed(Some(3), None)).0, 3);
        assert_eq!(job_outcome(&failed(None, Some(9))).0, 137);
        assert_eq!(job_outcome(&failed(None, None)).0, exit::JOB_FAILED);
        assert_eq!(
            job_outcome(&job(State::TimedOut(ps::TimedOut { during: 4 }))).0,
            124
        );
        assert_eq!(
            job_outcome(&job(State::Cancelled(ps::Cancelled { reason: "x".into() }))).0,
            130
        );
    }

    #[test]
    fn status_codes_map_to_distinct_exit_codes() {
        let code = |c: Code| CliError::from_status("s", &Status::new(c, "m")).code;
        assert_eq!(code(Code::Unavailable), exit::UNREACHABLE);
        assert_eq!(code(Code::InvalidArgument), exit::REJECTED);
        assert_eq!(code(Code::NotFound), exit::NOT_FOUND);
        assert_eq!(code(Code::Unauthenticated), exit::UNAUTHENTICATED);
        assert_eq!(code(Code::FailedPrecondition), exit::CONFLICT);
        assert_eq!(code(Code::Internal), exit::ERROR);
    }

    #[test]
    fn limits_outside_one_to_a_thousand_are_usage_errors() {
        for args in [
            &["hodei", "job", "list", "--limit", "0"][..],
            &["hodei", "job", "list", "--limit", "1001"][..],
            &["hodei", "audit", "--limit", "0"][..],
            &["hodei", "audit", "--limit", "5000"][..],
            &["hodei", "audit", "--limit", "-1"][..],
        ] {
            let e = Cli::try_parse_from(args).unwrap_err();
            let line = usage_error_line(&e).expect("a usage error");
            assert!(!line.contains('\n'), "{line}");
            assert!(line.contains("--limit"), "{line}");
            assert!(line.contains("1..=1000"), "{line}");
        }
        for (args, limit) in [
            (&["hodei", "job", "list", "--limit", "1000"][..], 1000),
            (&["hodei", "job", "list"][..], 50),
        ] {
            match Cli::try_parse_from(args).unwrap().command {
                Command::Job(a) => match a.cmd {
                    JobCmd::List { limit: l, .. } => assert_eq!(l, limit),
                    other => panic!("parsed as {other:?}"),
                },
                _ => panic!("parsed as another command"),
            }
        }
        match Cli::try_parse_from(["hodei", "audit", "--limit", "1"])
            .unwrap()
            .command
        {
            Command::Audit(a) => assert_eq!(a.limit, 1),
            _ => panic!("parsed as another command"),
        }
    }

    #[test]
    fn usage_errors_are_one_line_and_help_is_not_an_error() {
        let line = |args: &[&str]| usage_error_line(&Cli::try_parse_from(args).unwrap_err());
        let l = line(&["hodei", "job", "get"]).unwrap();
        assert!(l.contains("required") && l.contains("<ID>"), "{l}");
        assert!(!l.contains('\n') && !l.contains("Usage:"), "{l}");
        let l = line(&["hodei", "job", "list", "--bogus"]).unwrap();
        assert!(l.contains("--bogus"), "{l}");
        assert!(!l.contains('\n') && !l.contains("Usage:"), "{l}");
        assert_eq!(line(&["hodei", "--help"]), None);
        assert_eq!(line(&["hodei", "--version"]), None);
        assert_eq!(line(&["hodei"]), None);
    }

    #[test]
    fn correlation_id_is_accepted_before_and_after_the_command() {
        let c = Cli::try_parse_from(["hodei", "--correlation-id", "a", "job", "get", "x"]).unwrap();
        assert_eq!(c.correlation_id.as_deref(), Some("a"));
        let c = Cli::try_parse_from(["hodei", "job", "run", "--correlation-id", "b", "--", "true"])
            .unwrap();
        match c.command {
            Command::Job(a) => assert_eq!(a.corr.correlation_id.as_deref(), Some("b")),
            _ => panic!("parsed as another command"),
        }
        let c = Cli::try_parse_from(["hodei", "audit", "--correlation-id", "f"]).unwrap();
        match c.command {
            Command::Audit(a) => assert_eq!(a.correlation_id.as_deref(), Some("f")),
            _ => panic!("parsed as another command"),
        }
    }
}
