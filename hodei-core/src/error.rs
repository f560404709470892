//! The crate's error types. Messages are short, lowercase, and say what was
//! wrong and what is accepted.

use crate::ids::{JobId, WorkerId};
use crate::job::{JobCommandKind, JobState};
use crate::worker::WorkerState;

/// A string that is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: expected a UUID such as 0f8fad5b-d9cb-469f-a165-70867728950e")]
pub struct IdError {
    /// Which kind of id was expected.
    pub kind: &'static str,
    /// The rejected input (truncated).
    pub value: String,
}

/// A job spec rejected at the edge. Names the field, what was wrong and
/// what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid job spec: `{field}` {problem}; accepted: {accepted}")]
pub struct SpecError {
    /// The offending field, e.g. `timeout_secs` or `env.FOO`.
    pub field: String,
    /// What was wrong with it.
    pub problem: String,
    /// What would have been accepted.
    pub accepted: String,
}

impl SpecError {
    pub(crate) fn new(
        field: impl Into<String>,
        problem: impl Into<String>,
        accepted: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
            accepted: accepted.into(),
        }
    }
}

/// A transition the job state machine refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job cannot {command} while {state}")]
pub struct TransitionError {
    /// The state the job was in (and still is).
    pub state: JobState,
    /// The refused command.
    pub command: JobCommandKind,
}

/// A worker transition the table refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker cannot go from {from} to {to}")]
pub struct WorkerTransitionError {
    /// Current state.
    pub from: WorkerState,
    /// Refused target state.
    pub to: WorkerState,
}

/// Errors the engine returns for inputs it refuses. The engine's state is
/// unchanged when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The job is not known to this engine.
    #[error("unknown job {0}")]
    UnknownJob(JobId),
    /// The worker is not known to this engine.
    #[error("unknown worker {0}")]
    UnknownWorker(WorkerId),
    /// The job refused the transition.
    #[error(transparent)]
    Transition(#[from] TransitionError),
    /// The worker refused the transition.
    #[error(transparent)]
    WorkerTransition(#[from] WorkerTransitionError),
    /// A report about a job that the worker does not hold (stale or forged).
    #[error("worker {worker} does not run job {job} attempt {attempt}")]
    NotAssigned {
        /// Reporting worker.
        worker: WorkerId,
        /// Job named in the report.
        job: JobId,
        /// Attempt named in the report.
        attempt: u32,
    },
    /// The spec names a provider that is not configured.
    #[error("unknown provider {provider:?}; configured providers: {known}")]
    UnknownProvider {
        /// The requested provider.
        provider: String,
        /// Comma-separated configured providers.
        known: String,
    },
}
