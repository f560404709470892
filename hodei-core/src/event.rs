//! Domain events: every change of state, as stored in the audit trail and
//! published on the event bus.
//!
//! The JSON form is a public contract: an envelope with `event_id`,
//! `sequence`, `occurred_at`, `event_type`, `aggregate_type`,
//! `aggregate_id`, `correlation_id`, `actor` and a `payload` object. The
//! names returned by [`EventBody::event_type`] never change meaning.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{Actor, CorrelationId, EventId, JobId, ProviderId, WorkerId};
use crate::job::{Failure, JobState};
use crate::spec::RawJobSpec;
use crate::time::Timestamp;

/// The kind of aggregate an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateKind {
    /// A job.
    Job,
    /// A worker.
    Worker,
    /// A provider.
    Provider,
    /// A secret.
    Secret,
}

impl AggregateKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateKind::Job => "job",
            AggregateKind::Worker => "worker",
            AggregateKind::Provider => "provider",
            AggregateKind::Secret => "secret",
        }
    }
}

/// One domain event with its envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainEvent {
    /// Unique id.
    pub event_id: EventId,
    /// Per-store increasing sequence; 0 until the store assigns it.
    pub sequence: u64,
    /// When it happened.
    pub occurred_at: Timestamp,
    /// Aggregate kind.
    pub aggregate_type: AggregateKind,
    /// Aggregate id (job/worker id, provider or secret name).
    pub aggregate_id: String,
    /// Ties together the events of one flow; never empty.
    pub correlation_id: CorrelationId,
    /// Who caused it; never empty.
    pub actor: Actor,
    /// Type and payload.
    #[serde(flatten)]
    pub body: EventBody,
}

impl DomainEvent {
    /// Wraps a body in its envelope; `sequence` is left for the store.
    pub fn new(
        event_id: EventId,
        occurred_at: Timestamp,
        correlation_id: CorrelationId,
        actor: Actor,
        body: EventBody,
    ) -> Self {
        let (aggregate_type, aggregate_id) = body.aggregate();
        Self {
            event_id,
            sequence: 0,
            occurred_at,
            aggregate_type,
            aggregate_id,
            correlation_id,
            actor,
            body,
        }
    }

    /// The stable type name, e.g. `JobSucceeded`.
    pub fn event_type(&self) -> &'static str {
        self.body.event_type()
    }

    /// The job this event concerns, if any.
    pub fn job_id(&self) -> Option<JobId> {
        self.body.job_id()
    }
}

/// Every event type with its payload. Serialized adjacently:
/// `"event_type": "JobQueued", "payload": {...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "payload")]
#[non_exhaustive]
// `JobCreated` carries the spec and is much larger than the rest; events
// are built once per change and then stored, so boxing it would only add an
// allocation and an API wrinkle for no measurable gain.
#[allow(clippy::large_enum_variant)]
pub enum EventBody {
    /// A job was accepted.
    JobCreated {
        /// The job.
        job_id: JobId,
        /// Its spec (secret names only, never values).
        spec: RawJobSpec,
    },
    /// A job entered the queue (first attempt or retry).
    JobQueued {
        /// The job.
        job_id: JobId,
        /// The attempt that is queued.
        attempt: u32,
        /// Its priority.
        priority: i32,
        /// Not claimable before.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_before: Option<Timestamp>,
    },
    /// A provider was asked for a worker for the job.
    JobScheduled {
        /// The job.
        job_id: JobId,
        /// Attempt.
        attempt: u32,
        /// Provider chosen.
        provider: ProviderId,
        /// Worker being provisioned.
        worker_id: WorkerId,
        /// Provisioning deadline.
        deadline: Timestamp,
    },
    /// The job was handed to a worker.
    JobAssigned {
        /// The job.
        job_id: JobId,
        /// Attempt.
        attempt: u32,
        /// Worker.
        worker_id: WorkerId,
        /// Acknowledgement deadline.
        deadline: Timestamp,
    },
    /// The worker started the process.
    JobStarted {
        /// The job.
        job_id: JobId,
        /// Attempt.
        attempt: u32,
        /// Worker.
        worker_id: WorkerId,
        /// Timeout deadline.
        deadline: Timestamp,
    },
    /// The job exited 0.
    JobSucceeded {
        /// The job.
        job_id: JobId,
        /// Attempt.
        attempt: u32,
        /// Worker.
        worker_id: WorkerId,
        /// Exit code (0).
        exit_code: i32,
        /// Run time of the attempt.
        duration_ms: u64,
    },
    /// The job failed for good.
    JobFailed {
        /// The job.
        job_id: JobId,
        /// Last attempt.
        attempt: u32,
        /// Why.
        failure: Failure,
    },
    /// The job was cancelled.
    JobCancelled {
        /// The job.
        job_id: JobId,
        /// Attempt.
        attempt: u32,
        /// State it was cancelled in.
        from: JobState,
        /// Worker that held it, told to stop.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker_id: Option<WorkerId>,
        /// Reason.
        reason: String,
    },
    /// The job ran past a deadline.
    JobTimedOut {
        /// The job.
        job_id: JobId,
        /// Attempt.
        attempt: u32,
        /// State it timed out in.
        during: JobState,
        /// Worker that held it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker_id: Option<WorkerId>,
    },
    /// A failed attempt will be retried.
    JobRetryScheduled {
        /// The job.
        job_id: JobId,
        /// The attempt that failed.
        failed_attempt: u32,
        /// The attempt that will run.
        next_attempt: u32,
        /// Not before.
        not_before: Timestamp,
        /// Backoff applied.
        delay_ms: u64,
        /// Why the attempt failed.
        failure: Failure,
    },
    /// A retryable failure with no attempts left.
    JobRetryExhausted {
        /// The job.
        job_id: JobId,
        /// Attempts made.
        attempts: u32,
        /// Last failure.
        failure: Failure,
    },
    /// A worker refused or never acknowledged a dispatch.
    JobDispatchFailed {
        /// The job.
        job_id: JobId,
        /// Attempt.
        attempt: u32,
        /// Worker.
        worker_id: WorkerId,
        /// Why.
        reason: String,
    },
    /// A provider was asked for a worker.
    WorkerProvisioningRequested {
        /// New worker id.
        worker_id: WorkerId,
        /// Provider.
        provider: ProviderId,
        /// Job it is for, when ephemeral.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<JobId>,
    },
    /// The provider created the worker.
    WorkerProvisioned {
        /// Worker.
        worker_id: WorkerId,
        /// Provider.
        provider: ProviderId,
    },
    /// The provider failed to create the worker.
    WorkerProvisioningFailed {
        /// Worker.
        worker_id: WorkerId,
        /// Provider.
        provider: ProviderId,
        /// Why.
        reason: String,
    },
    /// An agent registered.
    WorkerRegistered {
        /// Worker.
        worker_id: WorkerId,
        /// Provider.
        provider: ProviderId,
        /// Labels advertised.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        labels: BTreeMap<String, String>,
        /// Capacity.
        capacity: u32,
    },
    /// A worker became idle and able to take work.
    WorkerReady {
        /// Worker.
        worker_id: WorkerId,
    },
    /// A worker's stream dropped.
    WorkerDisconnected {
        /// Worker.
        worker_id: WorkerId,
        /// Why, if known.
        reason: String,
    },
    /// A worker came back under the same id.
    WorkerReconnected {
        /// Worker.
        worker_id: WorkerId,
        /// Jobs it reported running.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        running: Vec<JobId>,
    },
    /// A worker takes no new work.
    WorkerDraining {
        /// Worker.
        worker_id: WorkerId,
    },
    /// A worker is gone.
    WorkerTerminated {
        /// Worker.
        worker_id: WorkerId,
        /// Why.
        reason: String,
    },
    /// A registration was refused.
    WorkerRegistrationRejected {
        /// Worker id claimed, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        worker_id: Option<WorkerId>,
        /// Why.
        reason: String,
    },
    /// A provider was configured.
    ProviderRegistered {
        /// Provider.
        provider: ProviderId,
        /// Kind (`local`, `docker`, ...).
        kind: String,
        /// Its configuration (no secrets).
        config: serde_json::Value,
    },
    /// A provider's configuration changed.
    ProviderUpdated {
        /// Provider.
        provider: ProviderId,
        /// New configuration.
        config: serde_json::Value,
    },
    /// A provider's health changed.
    ProviderHealthChanged {
        /// Provider.
        provider: ProviderId,
        /// Now healthy?
        healthy: bool,
        /// Detail.
        message: String,
    },
    /// The autoscaler decided to change a pool.
    AutoScalingTriggered {
        /// Provider.
        provider: ProviderId,
        /// Jobs waiting.
        queue_depth: u64,
        /// Workers before.
        current: u32,
        /// Workers wanted.
        target: u32,
    },
    /// A secret's value was read (names only, never values).
    SecretAccessed {
        /// Secret name.
        name: String,
        /// The job it was delivered to, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_id: Option<JobId>,
        /// Why it was read.
        purpose: String,
    },
}

/// All event type names, the public contract.
pub const EVENT_TYPES: &[&str] = &[
    "JobCreated",
    "JobQueued",
    "JobScheduled",
    "JobAssigned",
    "JobStarted",
    "JobSucceeded",
    "JobFailed",
    "JobCancelled",
    "JobTimedOut",
    "JobRetryScheduled",
    "JobRetryExhausted",
    "JobDispatchFailed",
    "WorkerProvisioningRequested",
    "WorkerProvisioned",
    "WorkerProvisioningFailed",
    "WorkerRegistered",
    "WorkerReady",
    "WorkerDisconnected",
    "WorkerReconnected",
    "WorkerDraining",
    "WorkerTerminated",
    "WorkerRegistrationRejected",
    "ProviderRegistered",
    "ProviderUpdated",
    "ProviderHealthChanged",
    "AutoScalingTriggered",
    "SecretAccessed",
];

impl EventBody {
    /// The stable type name.
    pub fn event_type(&self) -> &'static str {
        match self {
            EventBody::JobCreated { .. } => "JobCreated",
            EventBody::JobQueued { .. } => "JobQueued",
            EventBody::JobScheduled { .. } => "JobScheduled",
            EventBody::JobAssigned { .. } => "JobAssigned",
            EventBody::JobStarted { .. } => "JobStarted",
            EventBody::JobSucceeded { .. } => "JobSucceeded",
            EventBody::JobFailed { .. } => "JobFailed",
            EventBody::JobCancelled { .. } => "JobCancelled",
            EventBody::JobTimedOut { .. } => "JobTimedOut",
            EventBody::JobRetryScheduled { .. } => "JobRetryScheduled",
            EventBody::JobRetryExhausted { .. } => "JobRetryExhausted",
            EventBody::JobDispatchFailed { .. } => "JobDispatchFailed",
            EventBody::WorkerProvisioningRequested { .. } => "WorkerProvisioningRequested",
            EventBody::WorkerProvisioned { .. } => "WorkerProvisioned",
            EventBody::WorkerProvisioningFailed { .. } => "WorkerProvisioningFailed",
            EventBody::WorkerRegistered { .. } => "WorkerRegistered",
            EventBody::WorkerReady { .. } => "WorkerReady",
            EventBody::WorkerDisconnected { .. } => "WorkerDisconnected",
            EventBody::WorkerReconnected { .. } => "WorkerReconnected",
            EventBody::WorkerDraining { .. } => "WorkerDraining",
            EventBody::WorkerTerminated { .. } => "WorkerTerminated",
            EventBody::WorkerRegistrationRejected { .. } => "WorkerRegistrationRejected",
            EventBody::ProviderRegistered { .. } => "ProviderRegistered",
            EventBody::ProviderUpdated { .. } => "ProviderUpdated",
            EventBody::ProviderHealthChanged { .. } => "ProviderHealthChanged",
            EventBody::AutoScalingTriggered { .. } => "AutoScalingTriggered",
            EventBody::SecretAccessed { .. } => "SecretAccessed",
        }
    }

    /// The job this event concerns, if any.
    pub fn job_id(&self) -> Option<JobId> {
        match self {
            EventBody::JobCreated { job_id, .. }
            | EventBody::JobQueued { job_id, .. }
            | EventBody::JobScheduled { job_id, .. }
            | EventBody::JobAssigned { job_id, .. }
            | EventBody::JobStarted { job_id, .. }
            | EventBody::JobSucceeded { job_id, .. }
            | EventBody::JobFailed { job_id, .. }
            | EventBody::JobCancelled { job_id, .. }
            | EventBody::JobTimedOut { job_id, .. }
            | EventBody::JobRetryScheduled { job_id, .. }
            | EventBody::JobRetryExhausted { job_id, .. }
            | EventBody::JobDispatchFailed { job_id, .. } => Some(*job_id),
            EventBody::WorkerProvisioningRequested { job_id, .. }
            | EventBody::SecretAccessed { job_id, .. } => *job_id,
            _ => None,
        }
    }

    /// Aggregate kind and id.
    pub fn aggregate(&self) -> (AggregateKind, String) {
        match self {
            EventBody::JobCreated { job_id, .. }
            | EventBody::JobQueued { job_id, .. }
            | EventBody::JobScheduled { job_id, .. }
            | EventBody::JobAssigned { job_id, .. }
            | EventBody::JobStarted { job_id, .. }
            | EventBody::JobSucceeded { job_id, .. }
            | EventBody::JobFailed { job_id, .. }
            | EventBody::JobCancelled { job_id, .. }
            | EventBody::JobTimedOut { job_id, .. }
            | EventBody::JobRetryScheduled { job_id, .. }
            | EventBody::JobRetryExhausted { job_id, .. }
            | EventBody::JobDispatchFailed { job_id, .. } => {
                (AggregateKind::Job, job_id.to_string())
            }
            EventBody::WorkerProvisioningRequested { worker_id, .. }
            | EventBody::WorkerProvisioned { worker_id, .. }
            | EventBody::WorkerProvisioningFailed { worker_id, .. }
            | EventBody::WorkerRegistered { worker_id, .. }
            | EventBody::WorkerReady { worker_id }
            | EventBody::WorkerDisconnected { worker_id, .. }
            | EventBody::WorkerReconnected { worker_id, .. }
            | EventBody::WorkerDraining { worker_id }
            | EventBody::WorkerTerminated { worker_id, .. } => {
                (AggregateKind::Worker, worker_id.to_string())
            }
            EventBody::WorkerRegistrationRejected { worker_id, .. } => (
                AggregateKind::Worker,
                worker_id.map(|w| w.to_string()).unwrap_or_default(),
            ),
            EventBody::ProviderRegistered { provider, .. }
            | EventBody::ProviderUpdated { provider, .. }
            | EventBody::ProviderHealthChanged { provider, .. }
            | EventBody::AutoScalingTriggered { provider, .. } => {
                (AggregateKind::Provider, provider.to_string())
            }
            EventBody::SecretAccessed { name, .. } => (AggregateKind::Secret, name.clone()),
        }
    }
}
