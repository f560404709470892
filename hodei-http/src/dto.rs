//! The JSON shapes of the HTTP API. Each derives `ToSchema`, so the
//! OpenAPI document describes exactly what the handlers send.
//!
//! The core types are not serialized as they are: these DTOs flatten the
//! job's state machine (`status` with per-state data) into plain optional
//! fields that clients can read without knowing the variants. Conversions
//! destructure the core types without `..`, so a field added in the core is
//! a compile error here rather than silently missing from the API.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use hodei_core::event::DomainEvent;
use hodei_core::job::{Attempt, AttemptOutcome, Failure, FailureKind, Job, JobState, JobStatus};
use hodei_core::ports::{LogLine, LogStream, ProviderRecord};
use hodei_core::spec::{RawJobSpec, RawResources};
use hodei_core::worker::{Worker, WorkerState};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// The error body of every failed request.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// Code and message of an error.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code: `invalid_argument`, `unauthenticated`, `not_found`,
    /// `method_not_allowed`, `failed_precondition`, `payload_too_large`,
    /// `unavailable` or `internal`.
    #[schema(example = "invalid_argument")]
    pub code: String,
    /// What was wrong and what is accepted.
    #[schema(example = "invalid job spec: `timeout_secs` is 0; accepted: 1..=604800 seconds")]
    pub message: String,
}

/// A job spec, as submitted (`POST /api/v1/jobs`) and as stored (the
/// `spec` of a job, with defaults filled in). Exactly one of `command` and
/// `script`. Unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "build", "command": ["sh", "-c", "make test"], "timeout_secs": 600, "max_attempts": 3, "labels": {"team": "ci"}}))]
pub struct JobSpecDto {
    /// Human-readable name; defaults to the program's first word.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// argv of the program to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// A script, run by its shebang or `sh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Image, for providers that run images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Environment of the job process.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Names of secrets to expose to the job as environment variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Working directory, created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Wall-clock limit of one attempt, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Attempts in total, including the first (1..=100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Higher runs first (-1000..=1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Provider to run on; any healthy one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Resources requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesDto>,
    /// Client key that makes a submission idempotent (the
    /// `Idempotency-Key` header sets it too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Retry attempts that exit non-zero (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on_failure: Option<bool>,
}

/// Requested resources.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourcesDto {
    /// CPUs (fractions allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
}

impl From<JobSpecDto> for RawJobSpec {
    fn from(d: JobSpecDto) -> Self {
        let JobSpecDto {
            name,
            command,
            script,
            image,
            env,
            secrets,
            working_dir,
            timeout_secs,
            max_attempts,
            priority,
            labels,
            provider,
            resources,
            idempotency_key,
            retry_on_failure,
        } = d;
        RawJobSpec {
            name,
            command,
            script,
            image,
            env,
            secrets,
            working_dir,
            timeout_secs,
            max_attempts,
            priority,
            labels,
            provider,
            resources: resources
                .map(|ResourcesDto { cpu, memory_mb }| RawResources { cpu, memory_mb }),
            idempotency_key,
            retry_on_failure,
        }
    }
}

impl From<RawJobSpec> for JobSpecDto {
    fn from(r: RawJobSpec) -> Self {
        let RawJobSpec {
            name,
            command,
            script,
            image,
            env,
            secrets,
            working_dir,
            timeout_secs,
            max_attempts,
            priority,
            labels,
            provider,
            resources,
            idempotency_key,
            retry_on_failure,
        } = r;
        JobSpecDto {
            name,
            command,
            script,
            image,
            env,
            secrets,
            working_dir,
            timeout_secs,
            max_attempts,
            priority,
            labels,
            provider,
            resources: resources
                .map(|RawResources { cpu, memory_mb }| ResourcesDto { cpu, memory_mb }),
            idempotency_key,
            retry_on_failure,
        }
    }
}

/// Job states. The four last are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStateDto {
    /// Queued (possibly not before a retry time).
    Pending,
    /// Provider chosen, waiting for a worker.
    Scheduled,
    /// Worker chosen, waiting for its acknowledgement.
    Assigned,
    /// Running.
    Running,
    /// Exited 0.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Cancelled.
    Cancelled,
    /// Ran past a deadline.
    TimedOut,
}

impl From<JobState> for JobStateDto {
    fn from(s: JobState) -> Self {
        match s {
            JobState::Pending => JobStateDto::Pending,
            JobState::Scheduled => JobStateDto::Scheduled,
            JobState::Assigned => JobStateDto::Assigned,
            JobState::Running => JobStateDto::Running,
            JobState::Succeeded => JobStateDto::Succeeded,
            JobState::Failed => JobStateDto::Failed,
            JobState::Cancelled => JobStateDto::Cancelled,
            JobState::TimedOut => JobStateDto::TimedOut,
        }
    }
}

/// A job. Fields that only exist in some states are absent otherwise.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobDto {
    /// Identity.
    pub id: Uuid,
    /// Display name.
    pub name: String,
    /// Current state.
    pub state: JobStateDto,
    /// Current attempt, 1-based.
    pub attempt: u32,
    /// Attempts allowed in total.
    pub max_attempts: u32,
    /// The spec, with defaults filled in.
    pub spec: JobSpecDto,
    /// Finished attempts, oldest first.
    pub attempts: Vec<AttemptDto>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
    /// Correlation id of the request that created it.
    pub correlation_id: String,
    /// Who submitted it.
    pub submitted_by: String,
    /// PENDING after a failed attempt: not claimable before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<DateTime<Utc>>,
    /// SCHEDULED: the provider asked for a worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// SCHEDULED, ASSIGNED, RUNNING: the worker holding the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<Uuid>,
    /// RUNNING: when the current attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// SCHEDULED, ASSIGNED, RUNNING: when the state's deadline passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// SUCCEEDED (0), or FAILED when the process exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// FAILED: why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureDto>,
    /// CANCELLED: why (`cancelled by <actor>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    /// TIMED_OUT: the state whose deadline passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out_during: Option<JobStateDto>,
}

impl From<Job> for JobDto {
    fn from(job: Job) -> Self {
        let Job {
            id,
            spec,
            status,
            attempt,
            attempts,
            correlation_id,
            submitted_by,
            created_at,
            updated_at,
            version: _,
        } = job;
        let mut dto = JobDto {
            id: id.0,
            name: spec.name().to_owned(),
            state: status.state().into(),
            attempt,
            max_attempts: spec.max_attempts(),
            spec: spec.to_raw().into(),
            attempts: attempts.into_iter().map(AttemptDto::from).collect(),
            created_at,
            updated_at,
            correlation_id: correlation_id.to_string(),
            submitted_by: submitted_by.to_string(),
            not_before: None,
            provider: None,
            worker_id: None,
            started_at: None,
            deadline: None,
            exit_code: None,
            failure: None,
            cancel_reason: None,
            timed_out_during: None,
        };
        match status {
            JobStatus::Pending { not_before } => dto.not_before = not_before,
            JobStatus::Scheduled {
                provider,
                worker,
                deadline,
            } => {
                dto.provider = Some(provider.to_string());
                dto.worker_id = Some(worker.0);
                dto.deadline = Some(deadline);
            }
            JobStatus::Assigned { worker, deadline } => {
                dto.worker_id = Some(worker.0);
                dto.deadline = Some(deadline);
            }
            JobStatus::Running {
                worker,
                started_at,
                deadline,
            } => {
                dto.worker_id = Some(worker.0);
                dto.started_at = Some(started_at);
                dto.deadline = Some(deadline);
            }
            JobStatus::Succeeded { exit_code } => dto.exit_code = Some(exit_code),
            JobStatus::Failed { failure } => {
                dto.exit_code = failure.exit_code;
                dto.failure = Some(failure.into());
            }
            JobStatus::Cancelled { reason } => dto.cancel_reason = Some(reason),
            JobStatus::TimedOut { during } => dto.timed_out_during = Some(during.into()),
        }
        dto
    }
}

/// Why an attempt failed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FailureDto {
    /// `non_zero_exit`, `signaled`, `oom_killed`, `worker_lost`,
    /// `dispatch_failed`, `provisioning_failed`, `start_failed` or `validation`.
    #[schema(example = "non_zero_exit")]
    pub kind: String,
    /// Human-readable reason.
    pub message: String,
    /// Exit code, when the process exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Terminating signal, when it was killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl From<Failure> for FailureDto {
    fn from(f: Failure) -> Self {
        let Failure {
            kind,
            message,
            exit_code,
            signal,
        } = f;
        FailureDto {
            kind: failure_kind(kind).to_owned(),
            message,
            exit_code,
            signal,
        }
    }
}

fn failure_kind(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::NonZeroExit => "non_zero_exit",
        FailureKind::Signaled => "signaled",
        FailureKind::OomKilled => "oom_killed",
        FailureKind::WorkerLost => "worker_lost",
        FailureKind::DispatchFailed => "dispatch_failed",
        FailureKind::ProvisioningFailed => "provisioning_failed",
        FailureKind::StartFailed => "start_failed",
        FailureKind::Validation => "validation",
    }
}

/// A finished attempt.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttemptDto {
    /// 1-based attempt number.
    pub number: u32,
    /// Worker that ran (or was to run) it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<Uuid>,
    /// When the worker started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: DateTime<Utc>,
    /// `succeeded`, `failed`, `cancelled` or `timed_out`.
    #[schema(example = "failed")]
    pub outcome: String,
    /// When it failed: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureDto>,
}

impl From<Attempt> for AttemptDto {
    fn from(a: Attempt) -> Self {
        let Attempt {
            number,
            worker,
            started_at,
            finished_at,
            outcome,
        } = a;
        let (outcome, failure) = match outcome {
            AttemptOutcome::Succeeded => ("succeeded", None),
            AttemptOutcome::Failed { failure } => ("failed", Some(failure.into())),
            AttemptOutcome::Cancelled => ("cancelled", None),
            AttemptOutcome::TimedOut => ("timed_out", None),
        };
        AttemptDto {
            number,
            worker_id: worker.map(|w| w.0),
            started_at,
            finished_at,
            outcome: outcome.to_owned(),
            failure,
        }
    }
}

/// A page of jobs, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobPageDto {
    /// The jobs.
    pub jobs: Vec<JobDto>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Query of `GET /api/v1/jobs`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListJobsQuery {
    /// Only jobs in this state (PENDING, SCHEDULED, ASSIGNED, RUNNING,
    /// SUCCEEDED, FAILED, CANCELLED, TIMED_OUT; case-insensitive).
    #[param(value_type = Option<String>, example = "RUNNING")]
    pub state: Option<String>,
    /// Page size, 1..=1000 (default 100).
    #[param(value_type = Option<u32>, example = 50)]
    pub limit: Option<String>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// The bearer token, for clients that cannot send headers.
    #[param(ignore)]
    pub access_token: Option<String>,
}

/// Query of `GET /api/v1/jobs/{id}/logs`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// Only lines with a greater `seq` (default 0: from the start). With
    /// SSE, the `Last-Event-ID` header takes precedence when greater.
    #[param(value_type = Option<u64>, example = 0)]
    pub after: Option<String>,
    /// Most lines returned, 1..=10000 (default 1000). JSON only.
    #[param(value_type = Option<u32>, example = 1000)]
    pub limit: Option<String>,
    /// The bearer token, for clients that cannot send headers (EventSource).
    #[param(ignore)]
    pub access_token: Option<String>,
}

/// Query of `GET /api/v1/audit`.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQueryParams {
    /// Events of this correlation id.
    pub correlation_id: Option<String>,
    /// Events of this type, e.g. `JobSucceeded`.
    pub event_type: Option<String>,
    /// Events of this actor, e.g. `alice` or `system:dispatcher`.
    pub actor: Option<String>,
    /// At or after this time (RFC 3339, e.g. `2025-01-31T12:00:00Z`).
    #[param(value_type = Option<String>, format = DateTime)]
    pub since: Option<String>,
    /// Before this time (RFC 3339).
    #[param(value_type = Option<String>, format = DateTime)]
    pub until: Option<String>,
    /// Page size, 1..=1000 (default 100).
    #[param(value_type = Option<u32>)]
    pub limit: Option<String>,
    /// Matching events to skip (default 0).
    #[param(value_type = Option<u64>)]
    pub offset: Option<String>,
    /// The bearer token, for clients that cannot send headers.
    #[param(ignore)]
    pub access_token: Option<String>,
}

/// A log line.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogLineDto {
    /// Per-job sequence, from 1, no gaps. Also the SSE event id.
    pub seq: u64,
    /// Attempt that printed it.
    pub attempt: u32,
    /// `stdout` or `stderr`.
    #[schema(example = "stdout")]
    pub stream: String,
    /// When the agent read it.
    pub at: DateTime<Utc>,
    /// Text (secrets masked as `***`).
    pub text: String,
}

impl From<LogLine> for LogLineDto {
    fn from(l: LogLine) -> Self {
        let LogLine {
            seq,
            attempt,
            stream,
            at,
            text,
        } = l;
        LogLineDto {
            seq,
            attempt,
            stream: match stream {
                LogStream::Stdout => "stdout",
                LogStream::Stderr => "stderr",
            }
            .to_owned(),
            at,
            text,
        }
    }
}

/// A page of log lines.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogPageDto {
    /// Lines with `seq > after`, in order.
    pub lines: Vec<LogLineDto>,
    /// Pass as `after` to read on: the last line's `seq`, or the `after`
    /// asked for when no line came.
    pub next_after: u64,
    /// The job's state when the page was read; when terminal and `lines`
    /// is shorter than `limit`, the log is complete.
    pub job_state: JobStateDto,
}

/// A domain event, as stored in the audit trail.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EventDto {
    /// Unique id.
    pub event_id: Uuid,
    /// Per-store increasing sequence.
    pub sequence: u64,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// Type, e.g. `JobSucceeded`.
    #[schema(example = "JobStarted")]
    pub event_type: String,
    /// `job`, `worker`, `provider` or `secret`.
    #[schema(example = "job")]
    pub aggregate_type: String,
    /// Job or worker id, provider or secret name.
    pub aggregate_id: String,
    /// Ties together the events of one request's flow.
    pub correlation_id: String,
    /// Who caused it: a token's name, `anonymous`, `system:<component>` or
    /// `worker:<id>`.
    pub actor: String,
    /// Type-specific data.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

impl From<DomainEvent> for EventDto {
    fn from(e: DomainEvent) -> Self {
        // The body serializes adjacently tagged: {"event_type", "payload"}.
        let payload = match serde_json::to_value(&e.body) {
            Ok(serde_json::Value::Object(mut m)) => {
                m.remove("payload").unwrap_or(serde_json::Value::Null)
            }
            _ => serde_json::Value::Null,
        };
        let event_type = e.event_type().to_owned();
        let DomainEvent {
            event_id,
            sequence,
            occurred_at,
            aggregate_type,
            aggregate_id,
            correlation_id,
            actor,
            body: _,
        } = e;
        EventDto {
            event_id: event_id.0,
            sequence,
            occurred_at,
            event_type,
            aggregate_type: aggregate_type.as_str().to_owned(),
            aggregate_id,
            correlation_id: correlation_id.to_string(),
            actor: actor.to_string(),
            payload,
        }
    }
}

/// Events of a job, in order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobEventsDto {
    /// The events.
    pub events: Vec<EventDto>,
}

/// A page of audit results, in sequence order.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditPageDto {
    /// The events of this page.
    pub events: Vec<EventDto>,
    /// Matching events in total (all pages).
    pub total: u64,
    /// Page size used.
    pub limit: u32,
    /// Offset used.
    pub offset: u64,
}

/// Worker states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkerStateDto {
    /// Being created by its provider.
    Creating,
    /// Created, waiting for the agent to register.
    Connecting,
    /// Registered and idle.
    Ready,
    /// Running jobs.
    Busy,
    /// Takes no new work.
    Draining,
    /// Being destroyed.
    Terminating,
    /// Gone.
    Terminated,
}

impl From<WorkerState> for WorkerStateDto {
    fn from(s: WorkerState) -> Self {
        match s {
            WorkerState::Creating => WorkerStateDto::Creating,
            WorkerState::Connecting => WorkerStateDto::Connecting,
            WorkerState::Ready => WorkerStateDto::Ready,
            WorkerState::Busy => WorkerStateDto::Busy,
            WorkerState::Draining => WorkerStateDto::Draining,
            WorkerState::Terminating => WorkerStateDto::Terminating,
            WorkerState::Terminated => WorkerStateDto::Terminated,
        }
    }
}

/// A worker.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkerDto {
    /// Identity, stable across reconnects.
    pub id: Uuid,
    /// Provider that created it.
    pub provider: String,
    /// Lifecycle state.
    pub state: WorkerStateDto,
    /// Labels it advertises.
    pub labels: BTreeMap<String, String>,
    /// Image it runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Concurrent jobs it accepts.
    pub capacity: u32,
    /// Jobs it holds.
    pub jobs: Vec<Uuid>,
    /// Provisioned for one job and destroyed after it.
    pub ephemeral: bool,
    /// The job an ephemeral worker was provisioned for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_for: Option<Uuid>,
    /// Whether its stream is up.
    pub connected: bool,
    /// Last sign of life.
    pub last_seen: DateTime<Utc>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

impl From<Worker> for WorkerDto {
    fn from(w: Worker) -> Self {
        let Worker {
            id,
            provider,
            state,
            labels,
            image,
            capacity,
            jobs,
            ephemeral,
            reserved_for,
            connected,
            last_seen,
            created_at,
        } = w;
        WorkerDto {
            id: id.0,
            provider: provider.to_string(),
            state: state.into(),
            labels,
            image,
            capacity,
            jobs: jobs.into_iter().map(|j| j.0).collect(),
            ephemeral,
            reserved_for: reserved_for.map(|j| j.0),
            connected,
            last_seen,
            created_at,
        }
    }
}

/// Workers known to the server.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WorkersDto {
    /// The workers.
    pub workers: Vec<WorkerDto>,
}

/// The answer to a drain request: the worker stops taking work, finishes
/// what it runs, then goes away.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DrainDto {
    /// The worker.
    pub worker_id: Uuid,
    /// Its state right after the request (absent if it is already gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<WorkerStateDto>,
}

/// A configured provider.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProviderDto {
    /// Name, e.g. `local`.
    pub id: String,
    /// `local`, `docker` or `kubernetes`.
    pub kind: String,
    /// Its configuration (never secrets).
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// Last health check passed.
    pub healthy: bool,
    /// Health detail.
    pub health_message: String,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl From<ProviderRecord> for ProviderDto {
    fn from(p: ProviderRecord) -> Self {
        let ProviderRecord {
            id,
            kind,
            config,
            healthy,
            health_message,
            updated_at,
        } = p;
        ProviderDto {
            id: id.to_string(),
            kind,
            config,
            healthy,
            health_message,
            updated_at,
        }
    }
}

/// Configured providers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProvidersDto {
    /// The providers, by name.
    pub providers: Vec<ProviderDto>,
}

/// Answer of the health probes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HealthDto {
    /// `ok` (`/healthz`) or `ready` (`/readyz`).
    pub status: String,
}
