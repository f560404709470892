//! Conversions between domain types and their `hodei.v1` proto messages.
//!
//! Domain to proto is total. Proto to domain validates what the wire cannot
//! (ids, enum values, timestamps) and says which field was wrong.

use std::collections::BTreeMap;

use hodei_core::event::DomainEvent;
use hodei_core::ids::{Actor, CorrelationId, JobId, ProviderId, WorkerId};
use hodei_core::job::{Attempt, AttemptOutcome, Failure, FailureKind, Job, JobState, JobStatus};
use hodei_core::ports::{LogLine, LogStream, ProviderRecord, SecretMeta};
use hodei_core::spec::{JobSpec, RawJobSpec, RawResources, SpecLimits};
use hodei_core::time::Timestamp;
use hodei_core::worker::Worker;

use crate::proto;

/// A proto message that does not map to a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {problem}")]
pub struct ConvertError {
    /// The offending field.
    pub field: String,
    /// What was wrong.
    pub problem: String,
}

impl ConvertError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

// ---------------------------------------------------------------- time

/// A domain timestamp as a proto timestamp.
pub fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// A proto timestamp as a domain timestamp.
pub fn from_timestamp(field: &str, t: &prost_types::Timestamp) -> Result<Timestamp, ConvertError> {
    let nanos = u32::try_from(t.nanos).map_err(|_| ConvertError::new(field, "negative nanos"))?;
    chrono::DateTime::from_timestamp(t.seconds, nanos)
        .ok_or_else(|| ConvertError::new(field, "out of the representable range"))
}

fn opt_from_timestamp(
    field: &str,
    t: Option<&prost_types::Timestamp>,
) -> Result<Option<Timestamp>, ConvertError> {
    t.map(|t| from_timestamp(field, t)).transpose()
}

fn req_timestamp(
    field: &str,
    t: Option<&prost_types::Timestamp>,
) -> Result<Timestamp, ConvertError> {
    from_timestamp(
        field,
        t.ok_or_else(|| ConvertError::new(field, "is missing"))?,
    )
}

// ---------------------------------------------------------------- ids

/// Parses a job id field.
pub fn job_id(field: &str, s: &str) -> Result<JobId, ConvertError> {
    if s.is_empty() {
        return Err(ConvertError::new(
            field,
            "is empty; expected a job id (UUID)",
        ));
    }
    s.parse()
        .map_err(|e: hodei_core::error::IdError| ConvertError::new(field, e.to_string()))
}

/// Parses a worker id field.
pub fn worker_id(field: &str, s: &str) -> Result<WorkerId, ConvertError> {
    if s.is_empty() {
        return Err(ConvertError::new(
            field,
            "is empty; expected a worker id (UUID)",
        ));
    }
    s.parse()
        .map_err(|e: hodei_core::error::IdError| ConvertError::new(field, e.to_string()))
}

// ---------------------------------------------------------------- specs

/// The proto form of a raw spec.
pub fn spec_to_proto(raw: &RawJobSpec) -> proto::JobSpec {
    proto::JobSpec {
        name: raw.name.clone().unwrap_or_default(),
        command: raw.command.clone().unwrap_or_default(),
        script: raw.script.clone(),
        image: raw.image.clone(),
        env: raw.env.clone().into_iter().collect(),
        secrets: raw.secrets.clone(),
        working_dir: raw.working_dir.clone(),
        timeout_secs: raw.timeout_secs,
        max_attempts: raw.max_attempts,
        priority: raw.priority,
        labels: raw.labels.clone().into_iter().collect(),
        provider: raw.provider.clone(),
        resources: raw.resources.as_ref().map(|r| proto::Resources {
            cpu: r.cpu,
            memory_mb: r.memory_mb,
        }),
        idempotency_key: raw.idempotency_key.clone(),
        retry_on_failure: raw.retry_on_failure,
    }
}

/// The raw spec a proto spec carries. An empty `name` or `command` means
/// "not given"; validation is [`JobSpec::parse`]'s job.
pub fn spec_from_proto(spec: proto::JobSpec) -> RawJobSpec {
    RawJobSpec {
        name: (!spec.name.is_empty()).then_some(spec.name),
        command: (!spec.command.is_empty()).then_some(spec.command),
        script: spec.script,
        image: spec.image,
        env: spec.env.into_iter().collect(),
        secrets: spec.secrets,
        working_dir: spec.working_dir,
        timeout_secs: spec.timeout_secs,
        max_attempts: spec.max_attempts,
        priority: spec.priority,
        labels: spec.labels.into_iter().collect(),
        provider: spec.provider,
        resources: spec.resources.map(|r| RawResources {
            cpu: r.cpu,
            memory_mb: r.memory_mb,
        }),
        idempotency_key: spec.idempotency_key,
        retry_on_failure: spec.retry_on_failure,
    }
}

// ---------------------------------------------------------------- jobs

/// The proto enum of a job state.
pub fn job_state(s: JobState) -> proto::JobState {
    match s {
        JobState::Pending => proto::JobState::Pending,
        JobState::Scheduled => proto::JobState::Scheduled,
        JobState::Assigned => proto::JobState::Assigned,
        JobState::Running => proto::JobState::Running,
        JobState::Succeeded => proto::JobState::Succeeded,
        JobState::Failed => proto::JobState::Failed,
        JobState::Cancelled => proto::JobState::Cancelled,
        JobState::TimedOut => proto::JobState::TimedOut,
    }
}

/// The domain state of a proto enum value; `None` for UNSPECIFIED.
pub fn job_state_from_proto(field: &str, value: i32) -> Result<Option<JobState>, ConvertError> {
    let state = proto::JobState::try_from(value)
        .map_err(|_| ConvertError::new(field, format!("unknown job state {value}")))?;
    Ok(match state {
        proto::JobState::Unspecified => None,
        proto::JobState::Pending => Some(JobState::Pending),
        proto::JobState::Scheduled => Some(JobState::Scheduled),
        proto::JobState::Assigned => Some(JobState::Assigned),
        proto::JobState::Running => Some(JobState::Running),
        proto::JobState::Succeeded => Some(JobState::Succeeded),
        proto::JobState::Failed => Some(JobState::Failed),
        proto::JobState::Cancelled => Some(JobState::Cancelled),
        proto::JobState::TimedOut => Some(JobState::TimedOut),
    })
}

fn failure_kind_str(k: FailureKind) -> String {
    serde_json::to_value(k)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn failure_to_proto(f: &Failure) -> proto::Failure {
    proto::Failure {
        kind: failure_kind_str(f.kind),
        message: f.message.clone(),
        exit_code: f.exit_code,
        signal: f.signal,
    }
}

fn failure_from_proto(field: &str, f: Option<&proto::Failure>) -> Result<Failure, ConvertError> {
    let f = f.ok_or_else(|| ConvertError::new(field, "is missing"))?;
    let kind: FailureKind = serde_json::from_value(serde_json::Value::String(f.kind.clone()))
        .map_err(|_| {
            ConvertError::new(
                format!("{field}.kind"),
                format!("unknown kind {:?}", f.kind),
            )
        })?;
    Ok(Failure {
        kind,
        message: f.message.clone(),
        exit_code: f.exit_code,
        signal: f.signal,
    })
}

fn status_to_proto(s: &JobStatus) -> proto::JobStatus {
    use proto::job_status::{self as ps, State};
    let state = match s {
        JobStatus::Pending { not_before } => State::Pending(ps::Pending {
            not_before: not_before.map(timestamp),
        }),
        JobStatus::Scheduled {
            provider,
            worker,
            deadline,
        } => State::Scheduled(ps::Scheduled {
            provider: provider.to_string(),
            worker_id: worker.to_string(),
            deadline: Some(timestamp(*deadline)),
        }),
        JobStatus::Assigned { worker, deadline } => State::Assigned(ps::Assigned {
            worker_id: worker.to_string(),
            deadline: Some(timestamp(*deadline)),
        }),
        JobStatus::Running {
            worker,
            started_at,
            deadline,
        } => State::Running(ps::Running {
            worker_id: worker.to_string(),
            started_at: Some(timestamp(*started_at)),
            deadline: Some(timestamp(*deadline)),
        }),
        JobStatus::Succeeded { exit_code } => State::Succeeded(ps::Succeeded {
            exit_code: *exit_code,
        }),
        JobStatus::Failed { failure } => State::Failed(ps::Failed {
            failure: Some(failure_to_proto(failure)),
        }),
        JobStatus::Cancelled { reason } => State::Cancelled(ps::Cancelled {
            reason: reason.clone(),
        }),
        JobStatus::TimedOut { during } => State::TimedOut(ps::TimedOut {
            during: job_state(*during) as i32,
        }),
    };
    proto::JobStatus { state: Some(state) }
}

fn status_from_proto(s: Option<&proto::JobStatus>) -> Result<JobStatus, ConvertError> {
    use proto::job_status::State;
    let state = s
        .and_then(|s| s.state.as_ref())
        .ok_or_else(|| ConvertError::new("status", "is missing"))?;
    Ok(match state {
        State::Pending(p) => JobStatus::Pending {
            not_before: opt_from_timestamp("status.pending.not_before", p.not_before.as_ref())?,
        },
        State::Scheduled(p) => JobStatus::Scheduled {
            provider: ProviderId::new(p.provider.clone()),
            worker: worker_id("status.scheduled.worker_id", &p.worker_id)?,
            deadline: req_timestamp("status.scheduled.deadline", p.deadline.as_ref())?,
        },
        State::Assigned(p) => JobStatus::Assigned {
            worker: worker_id("status.assigned.worker_id", &p.worker_id)?,
            deadline: req_timestamp("status.assigned.deadline", p.deadline.as_ref())?,
        },
        State::Running(p) => JobStatus::Running {
            worker: worker_id("status.running.worker_id", &p.worker_id)?,
            started_at: req_timestamp("status.running.started_at", p.started_at.as_ref())?,
            deadline: req_timestamp("status.running.deadline", p.deadline.as_ref())?,
        },
        State::Succeeded(p) => JobStatus::Succeeded {
            exit_code: p.exit_code,
        },
        State::Failed(p) => JobStatus::Failed {
            failure: failure_from_proto("status.failed.failure", p.failure.as_ref())?,
        },
        State::Cancelled(p) => JobStatus::Cancelled {
            reason: p.reason.clone(),
        },
        State::TimedOut(p) => JobStatus::TimedOut {
            during: job_state_from_proto("status.timed_out.during", p.during)?
                .ok_or_else(|| ConvertError::new("status.timed_out.during", "is unspecified"))?,
        },
    })
}

fn attempt_to_proto(a: &Attempt) -> proto::Attempt {
    let (outcome, failure) = match &a.outcome {
        AttemptOutcome::Succeeded => ("succeeded", None),
        AttemptOutcome::Failed { failure } => ("failed", Some(failure_to_proto(failure))),
        AttemptOutcome::Cancelled => ("cancelled", None),
        AttemptOutcome::TimedOut => ("timed_out", None),
    };
    proto::Attempt {
        number: a.number,
        worker_id: a.worker.map(|w| w.to_string()),
        started_at: a.started_at.map(timestamp),
        finished_at: Some(timestamp(a.finished_at)),
        outcome: outcome.into(),
        failure,
    }
}

fn attempt_from_proto(a: &proto::Attempt) -> Result<Attempt, ConvertError> {
    let outcome = match a.outcome.as_str() {
        "succeeded" => AttemptOutcome::Succeeded,
        "failed" => AttemptOutcome::Failed {
            failure: failure_from_proto("attempts.failure", a.failure.as_ref())?,
        },
        "cancelled" => AttemptOutcome::Cancelled,
        "timed_out" => AttemptOutcome::TimedOut,
        other => {
            return Err(ConvertError::new(
                "attempts.outcome",
                format!("unknown outcome {other:?}"),
            ));
        }
    };
    Ok(Attempt {
        number: a.number,
        worker: a
            .worker_id
            .as_deref()
            .map(|w| worker_id("attempts.worker_id", w))
            .transpose()?,
        started_at: opt_from_timestamp("attempts.started_at", a.started_at.as_ref())?,
        finished_at: req_timestamp("attempts.finished_at", a.finished_at.as_ref())?,
        outcome,
    })
}

/// The proto form of a job.
pub fn job_to_proto(job: &Job) -> proto::Job {
    proto::Job {
        job_id: job.id.to_string(),
        state: job_state(job.state()) as i32,
        status: Some(status_to_proto(&job.status)),
        spec: Some(spec_to_proto(&job.spec.to_raw())),
        attempt: job.attempt,
        attempts: job.attempts.iter().map(attempt_to_proto).collect(),
        correlation_id: job.correlation_id.to_string(),
        submitted_by: job.submitted_by.to_string(),
        created_at: Some(timestamp(job.created_at)),
        updated_at: Some(timestamp(job.updated_at)),
        version: job.version,
    }
}

/// The domain job a proto job describes (clients use it to print the same
/// JSON as the HTTP API).
pub fn job_from_proto(job: &proto::Job) -> Result<Job, ConvertError> {
    let raw = spec_from_proto(
        job.spec
            .clone()
            .ok_or_else(|| ConvertError::new("spec", "is missing"))?,
    );
    let spec = JobSpec::parse(raw, &SpecLimits::permissive())
        .map_err(|e| ConvertError::new("spec", e.to_string()))?;
    Ok(Job {
        id: job_id("job_id", &job.job_id)?,
        spec,
        status: status_from_proto(job.status.as_ref())?,
        attempt: job.attempt,
        attempts: job
            .attempts
            .iter()
            .map(attempt_from_proto)
            .collect::<Result<_, _>>()?,
        correlation_id: CorrelationId::new(job.correlation_id.clone()),
        submitted_by: Actor::new(job.submitted_by.clone()),
        created_at: req_timestamp("created_at", job.created_at.as_ref())?,
        updated_at: req_timestamp("updated_at", job.updated_at.as_ref())?,
        version: job.version,
    })
}

// ---------------------------------------------------------------- events

/// The proto form of a domain event.
pub fn event_to_proto(e: &DomainEvent) -> proto::Event {
    // The payload is the `payload` member of the event's stable JSON form.
    let payload = serde_json::to_value(&e.body)
        .ok()
        .and_then(|mut v| v.get_mut("payload").map(serde_json::Value::take))
        .unwrap_or(serde_json::Value::Object(Default::default()));
    proto::Event {
        event_id: e.event_id.to_string(),
        sequence: e.sequence,
        occurred_at: Some(timestamp(e.occurred_at)),
        event_type: e.event_type().to_owned(),
        aggregate_type: e.aggregate_type.as_str().to_owned(),
        aggregate_id: e.aggregate_id.clone(),
        correlation_id: e.correlation_id.to_string(),
        actor: e.actor.to_string(),
        payload_json: payload.to_string(),
    }
}

/// The stable JSON form of a proto event (the same object the HTTP API and
/// the audit trail show).
pub fn event_json(e: &proto::Event) -> serde_json::Value {
    let payload: serde_json::Value =
        serde_json::from_str(&e.payload_json).unwrap_or(serde_json::Value::Null);
    let occurred_at = e
        .occurred_at
        .as_ref()
        .and_then(|t| from_timestamp("occurred_at", t).ok())
        .map(|t| serde_json::to_value(t).unwrap_or_default())
        .unwrap_or_default();
    serde_json::json!({
        "event_id": e.event_id,
        "sequence": e.sequence,
        "occurred_at": occurred_at,
        "aggregate_type": e.aggregate_type,
        "aggregate_id": e.aggregate_id,
        "correlation_id": e.correlation_id,
        "actor": e.actor,
        "event_type": e.event_type,
        "payload": payload,
    })
}

// ---------------------------------------------------------------- logs

/// The proto form of a log stream.
pub fn log_stream(s: LogStream) -> proto::LogStream {
    match s {
        LogStream::Stdout => proto::LogStream::Stdout,
        LogStream::Stderr => proto::LogStream::Stderr,
    }
}

/// The domain log stream of a proto value (UNSPECIFIED reads as stdout).
pub fn log_stream_from_proto(value: i32) -> LogStream {
    match proto::LogStream::try_from(value) {
        Ok(proto::LogStream::Stderr) => LogStream::Stderr,
        _ => LogStream::Stdout,
    }
}

/// The proto form of a stored log line.
pub fn log_line_to_proto(l: &LogLine) -> proto::LogLine {
    proto::LogLine {
        seq: l.seq,
        stream: log_stream(l.stream) as i32,
        at: Some(timestamp(l.at)),
        text: l.text.clone(),
        attempt: l.attempt,
    }
}

/// The domain form of a stored log line sent by the server.
pub fn log_line_from_proto(l: &proto::LogLine) -> Result<LogLine, ConvertError> {
    Ok(LogLine {
        seq: l.seq,
        attempt: l.attempt,
        stream: log_stream_from_proto(l.stream),
        at: req_timestamp("at", l.at.as_ref())?,
        text: l.text.clone(),
    })
}

// ---------------------------------------------------------------- workers, providers, secrets

/// The proto form of a worker.
pub fn worker_to_proto(w: &Worker) -> proto::Worker {
    proto::Worker {
        worker_id: w.id.to_string(),
        provider: w.provider.to_string(),
        state: w.state.as_str().to_owned(),
        labels: w.labels.clone().into_iter().collect(),
        image: w.image.clone(),
        capacity: w.capacity,
        jobs: w.jobs.iter().map(ToString::to_string).collect(),
        ephemeral: w.ephemeral,
        reserved_for: w.reserved_for.map(|j| j.to_string()),
        connected: w.connected,
        last_seen: Some(timestamp(w.last_seen)),
        created_at: Some(timestamp(w.created_at)),
    }
}

/// The domain worker a proto worker describes.
pub fn worker_from_proto(w: &proto::Worker) -> Result<Worker, ConvertError> {
    Ok(Worker {
        id: worker_id("worker_id", &w.worker_id)?,
        provider: ProviderId::new(w.provider.clone()),
        state: w
            .state
            .parse()
            .map_err(|e: String| ConvertError::new("state", e))?,
        labels: w.labels.clone().into_iter().collect::<BTreeMap<_, _>>(),
        image: w.image.clone(),
        capacity: w.capacity,
        jobs: w
            .jobs
            .iter()
            .map(|j| job_id("jobs", j))
            .collect::<Result<_, _>>()?,
        ephemeral: w.ephemeral,
        reserved_for: w
            .reserved_for
            .as_deref()
            .map(|j| job_id("reserved_for", j))
            .transpose()?,
        connected: w.connected,
        last_seen: req_timestamp("last_seen", w.last_seen.as_ref())?,
        created_at: req_timestamp("created_at", w.created_at.as_ref())?,
    })
}

/// The proto form of a provider record.
pub fn provider_to_proto(p: &ProviderRecord) -> proto::Provider {
    proto::Provider {
        provider_id: p.id.to_string(),
        kind: p.kind.clone(),
        config_json: p.config.to_string(),
        healthy: p.healthy,
        health_message: p.health_message.clone(),
        updated_at: Some(timestamp(p.updated_at)),
    }
}

/// The domain provider record a proto provider describes.
pub fn provider_from_proto(p: &proto::Provider) -> Result<ProviderRecord, ConvertError> {
    Ok(ProviderRecord {
        id: ProviderId::new(p.provider_id.clone()),
        kind: p.kind.clone(),
        config: serde_json::from_str(&p.config_json)
            .map_err(|e| ConvertError::new("config_json", e.to_string()))?,
        healthy: p.healthy,
        health_message: p.health_message.clone(),
        updated_at: req_timestamp("updated_at", p.updated_at.as_ref())?,
    })
}

/// The proto form of a secret's metadata.
pub fn secret_meta_to_proto(s: &SecretMeta) -> proto::SecretMeta {
    proto::SecretMeta {
        name: s.name.clone(),
        created_at: Some(timestamp(s.created_at)),
        updated_at: Some(timestamp(s.updated_at)),
    }
}

/// The domain form of a secret's metadata.
pub fn secret_meta_from_proto(s: &proto::SecretMeta) -> Result<SecretMeta, ConvertError> {
    Ok(SecretMeta {
        name: s.name.clone(),
        created_at: req_timestamp("created_at", s.created_at.as_ref())?,
        updated_at: req_timestamp("updated_at", s.updated_at.as_ref())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hodei_core::event::EventBody;
    use hodei_core::ids::EventId;
    use hodei_core::time::from_millis;

    fn sample_job() -> Job {
        let spec = JobSpec::parse(
            RawJobSpec {
                command: Some(vec!["sh".into(), "-c".into(), "exit 3".into()]),
                env: [("K".to_string(), "V".to_string())].into(),
                labels: [("team".to_string(), "ci".to_string())].into(),
                resources: Some(RawResources {
                    cpu: Some(0.5),
                    memory_mb: Some(256),
                }),
                ..Default::default()
            },
            &SpecLimits::default(),
        )
        .unwrap();
        let (mut job, _) = Job::submit(
            JobId::from_u64_pair(1, 2),
            spec,
            CorrelationId::new("corr"),
            Actor::new("alice"),
            from_millis(1_000),
        );
        job.attempts.push(Attempt {
            number: 1,
            worker: Some(WorkerId::from_u64_pair(3, 4)),
            started_at: Some(from_millis(2_000)),
            finished_at: from_millis(3_000),
            outcome: AttemptOutcome::Failed {
                failure: Failure {
                    kind: FailureKind::NonZeroExit,
                    message: "exited with code 3".into(),
                    exit_code: Some(3),
                    signal: None,
                },
            },
        });
        job
    }

    #[test]
    fn job_round_trips_through_proto() {
        let mut job = sample_job();
        let statuses = [
            JobStatus::Pending {
                not_before: Some(from_millis(5_000)),
            },
            JobStatus::Scheduled {
                provider: ProviderId::new("local"),
                worker: WorkerId::from_u64_pair(5, 6),
                deadline: from_millis(9_000),
            },
            JobStatus::Running {
                worker: WorkerId::from_u64_pair(5, 6),
                started_at: from_millis(6_000),
                deadline: from_millis(9_000),
            },
            JobStatus::Failed {
                failure: Failure::new(FailureKind::WorkerLost, "gone"),
            },
            JobStatus::TimedOut {
                during: JobState::Running,
            },
        ];
        for status in statuses {
            job.status = status;
            let back = job_from_proto(&job_to_proto(&job)).unwrap();
            assert_eq!(back, job);
        }
    }

    #[test]
    fn event_json_matches_the_domain_json() {
        let event = DomainEvent {
            sequence: 7,
            ..DomainEvent::new(
                EventId::from_u64_pair(9, 9),
                from_millis(1_500),
                CorrelationId::new("c-1"),
                Actor::new("bob"),
                EventBody::JobQueued {
                    job_id: JobId::from_u64_pair(1, 2),
                    attempt: 1,
                    priority: 0,
                    not_before: None,
                },
            )
        };
        let expected = serde_json::to_value(&event).unwrap();
        assert_eq!(event_json(&event_to_proto(&event)), expected);
    }

    #[test]
    fn empty_proto_fields_mean_absent() {
        let raw = spec_from_proto(proto::JobSpec::default());
        assert_eq!(raw, RawJobSpec::default());
    }

    #[test]
    fn bad_ids_name_the_field() {
        let err = job_id("job_id", "nope").unwrap_err();
        assert_eq!(err.field, "job_id");
        assert!(job_id("job_id", "").unwrap_err().problem.contains("empty"));
    }
}
