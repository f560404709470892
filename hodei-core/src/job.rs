//! The job aggregate and its state machine.
//!
//! Every change goes through [`Job::apply`], whose body is the one
//! transition table: an exhaustive `match (state, command)` without a
//! catch-all arm, so a new state or command is a compile error there. An
//! accepted command returns the events it caused; a refused one returns a
//! [`TransitionError`] and leaves the job untouched.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::TransitionError;
use crate::event::EventBody;
use crate::ids::{Actor, CorrelationId, JobId, ProviderId, WorkerId};
use crate::retry::RetryPolicy;
use crate::spec::JobSpec;
use crate::time::{Timestamp, add};

/// The public job states (DESIGN.md). The last four are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Queued, waiting to be claimed (possibly not before a retry time).
    Pending,
    /// Provider chosen, waiting for a worker to be provisioned.
    Scheduled,
    /// Worker chosen, waiting for its acknowledgement.
    Assigned,
    /// The worker runs it.
    Running,
    /// Exited 0.
    Succeeded,
    /// Failed for good.
    Failed,
    /// Cancelled by a user.
    Cancelled,
    /// Ran past its timeout.
    TimedOut,
}

impl JobState {
    /// Every state, in lifecycle order.
    pub const ALL: [JobState; 8] = [
        JobState::Pending,
        JobState::Scheduled,
        JobState::Assigned,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
    ];

    /// Whether no transition leaves this state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::TimedOut
        )
    }

    /// The wire name, e.g. `TIMED_OUT`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Scheduled => "SCHEDULED",
            JobState::Assigned => "ASSIGNED",
            JobState::Running => "RUNNING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "CANCELLED",
            JobState::TimedOut => "TIMED_OUT",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let up = s.trim().to_ascii_uppercase().replace('-', "_");
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == up)
            .ok_or_else(|| {
                format!(
                    "unknown job state {s:?}; accepted: PENDING, SCHEDULED, ASSIGNED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT"
                )
            })
    }
}

/// Why an attempt failed. The kind decides whether it is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The process exited non-zero (permanent unless the spec opts in).
    NonZeroExit,
    /// Killed by a signal nobody in Hodei sent.
    Signaled,
    /// Killed for exceeding its memory limit.
    OomKilled,
    /// The worker vanished mid-attempt (transient).
    WorkerLost,
    /// The worker refused or never acknowledged the dispatch (transient).
    DispatchFailed,
    /// No worker could be provisioned (transient).
    ProvisioningFailed,
    /// The worker could not start the process (bad command, working dir).
    StartFailed,
    /// The spec cannot run anywhere (permanent).
    Validation,
}

impl FailureKind {
    /// Failures caused by infrastructure rather than by the job itself.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            FailureKind::WorkerLost | FailureKind::DispatchFailed | FailureKind::ProvisioningFailed
        )
    }
}

/// A failed attempt, as recorded in events and attempt history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Classification.
    pub kind: FailureKind,
    /// Human-readable reason.
    pub message: String,
    /// Exit code, when the process exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Terminating signal, when it was killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl Failure {
    /// A failure without exit details.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            exit_code: None,
            signal: None,
        }
    }
}

/// A state together with the data that only exists in that state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobStatus {
    /// Queued.
    Pending {
        /// Not claimable before this time (retry backoff).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        not_before: Option<Timestamp>,
    },
    /// Waiting for a worker from `provider`.
    Scheduled {
        /// Provider asked for a worker.
        provider: ProviderId,
        /// The worker being provisioned for this job.
        worker: WorkerId,
        /// Decision time if no worker arrives.
        deadline: Timestamp,
    },
    /// Waiting for `worker` to acknowledge.
    Assigned {
        /// The chosen worker.
        worker: WorkerId,
        /// Decision time if it never acknowledges.
        deadline: Timestamp,
    },
    /// Running on `worker`.
    Running {
        /// The worker running it.
        worker: WorkerId,
        /// When it started.
        started_at: Timestamp,
        /// When it times out.
        deadline: Timestamp,
    },
    /// Exited 0.
    Succeeded {
        /// Always 0 today; kept for clients.
        exit_code: i32,
    },
    /// Failed for good.
    Failed {
        /// The last attempt's failure.
        failure: Failure,
    },
    /// Cancelled.
    Cancelled {
        /// Why (user reason or `cancelled by <actor>`).
        reason: String,
    },
    /// Timed out.
    TimedOut {
        /// The state it was in when its deadline passed.
        during: JobState,
    },
}

impl JobStatus {
    /// The public state.
    pub fn state(&self) -> JobState {
        match self {
            JobStatus::Pending { .. } => JobState::Pending,
            JobStatus::Scheduled { .. } => JobState::Scheduled,
            JobStatus::Assigned { .. } => JobState::Assigned,
            JobStatus::Running { .. } => JobState::Running,
            JobStatus::Succeeded { .. } => JobState::Succeeded,
            JobStatus::Failed { .. } => JobState::Failed,
            JobStatus::Cancelled { .. } => JobState::Cancelled,
            JobStatus::TimedOut { .. } => JobState::TimedOut,
        }
    }

    /// The deadline of an intermediate state.
    pub fn deadline(&self) -> Option<Timestamp> {
        match self {
            JobStatus::Scheduled { deadline, .. }
            | JobStatus::Assigned { deadline, .. }
            | JobStatus::Running { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }

    /// The worker holding the job, if any.
    pub fn worker(&self) -> Option<WorkerId> {
        match self {
            JobStatus::Scheduled { worker, .. }
            | JobStatus::Assigned { worker, .. }
            | JobStatus::Running { worker, .. } => Some(*worker),
            _ => None,
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// Exited 0.
    Succeeded,
    /// Failed.
    Failed {
        /// Why.
        failure: Failure,
    },
    /// Cancelled.
    Cancelled,
    /// Timed out.
    TimedOut,
}

/// One attempt in a job's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based attempt number.
    pub number: u32,
    /// Worker that ran (or was to run) it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerId>,
    /// When the worker acknowledged it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Timestamp,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: AttemptOutcome,
}

/// The inputs of the job state machine.
#[derive(Debug, Clone, PartialEq)]
pub enum JobCommand {
    /// Ask `provider` for `worker` to run this job.
    Schedule {
        /// Chosen provider.
        provider: ProviderId,
        /// Id of the worker to provision.
        worker: WorkerId,
        /// Provisioning deadline.
        deadline: Timestamp,
    },
    /// Hand the job to `worker`.
    Assign {
        /// Chosen worker.
        worker: WorkerId,
        /// Acknowledgement deadline.
        deadline: Timestamp,
    },
    /// The worker acknowledged and started the process.
    Start,
    /// The process exited.
    Exit {
        /// Exit code, if it exited.
        exit_code: Option<i32>,
        /// Terminating signal, if killed.
        signal: Option<i32>,
        /// Killed for exceeding its memory limit.
        oom_killed: bool,
        /// The worker killed it at its timeout.
        timed_out: bool,
    },
    /// The attempt failed before or outside the process (worker lost,
    /// dispatch or provisioning failed, could not start).
    Fail(Failure),
    /// A user cancels it.
    Cancel {
        /// Who asked, or why.
        reason: String,
    },
    /// The current state's deadline passed.
    Expire,
    /// The worker gave the assignment back without running it (full, or
    /// draining): back to the queue in the same attempt, which is not
    /// consumed and not recorded in the history.
    Requeue {
        /// Why the worker gave it back.
        reason: String,
    },
}

/// The kind of a [`JobCommand`], for error messages and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobCommandKind {
    /// [`JobCommand::Schedule`]
    Schedule,
    /// [`JobCommand::Assign`]
    Assign,
    /// [`JobCommand::Start`]
    Start,
    /// [`JobCommand::Exit`]
    Exit,
    /// [`JobCommand::Fail`]
    Fail,
    /// [`JobCommand::Cancel`]
    Cancel,
    /// [`JobCommand::Expire`]
    Expire,
    /// [`JobCommand::Requeue`]
    Requeue,
}

impl fmt::Display for JobCommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobCommandKind::Schedule => "be scheduled",
            JobCommandKind::Assign => "be assigned",
            JobCommandKind::Start => "start",
            JobCommandKind::Exit => "exit",
            JobCommandKind::Fail => "fail",
            JobCommandKind::Cancel => "be cancelled",
            JobCommandKind::Expire => "expire",
            JobCommandKind::Requeue => "be requeued",
        })
    }
}

impl JobCommand {
    /// The command's kind.
    pub fn kind(&self) -> JobCommandKind {
        match self {
            JobCommand::Schedule { .. } => JobCommandKind::Schedule,
            JobCommand::Assign { .. } => JobCommandKind::Assign,
            JobCommand::Start => JobCommandKind::Start,
            JobCommand::Exit { .. } => JobCommandKind::Exit,
            JobCommand::Fail(_) => JobCommandKind::Fail,
            JobCommand::Cancel { .. } => JobCommandKind::Cancel,
            JobCommand::Expire => JobCommandKind::Expire,
            JobCommand::Requeue { .. } => JobCommandKind::Requeue,
        }
    }
}

/// What a transition needs besides the command: the current time, the
/// retry policy and a random number in `[0, 1)` for jitter.
#[derive(Debug, Clone, Copy)]
pub struct TransitionContext<'a> {
    /// Current time (monotonic across calls).
    pub now: Timestamp,
    /// Retry policy in force.
    pub retry: &'a RetryPolicy,
    /// Uniform random number in `[0, 1)`, used for backoff jitter.
    pub unit_random: f64,
}

/// The job aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Identity.
    pub id: JobId,
    /// What to run.
    pub spec: JobSpec,
    /// State and its data.
    pub status: JobStatus,
    /// Current attempt number, 1-based.
    pub attempt: u32,
    /// Finished attempts.
    pub attempts: Vec<Attempt>,
    /// Correlation id of the request that created it.
    pub correlation_id: CorrelationId,
    /// Who submitted it.
    pub submitted_by: Actor,
    /// Creation time.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
    /// Incremented by every accepted transition; stores use it for
    /// optimistic concurrency between replicas.
    pub version: u64,
}

impl Job {
    /// A new job in `PENDING`, attempt 1, with the events of its creation
    /// (`JobCreated`, `JobQueued`).
    pub fn submit(
        id: JobId,
        spec: JobSpec,
        correlation_id: CorrelationId,
        submitted_by: Actor,
        now: Timestamp,
    ) -> (Job, Vec<EventBody>) {
        let events = vec![
            EventBody::JobCreated {
                job_id: id,
                spec: spec.to_raw(),
            },
            EventBody::JobQueued {
                job_id: id,
                attempt: 1,
                priority: spec.priority(),
                not_before: None,
            },
        ];
        let job = Job {
            id,
            spec,
            status: JobStatus::Pending { not_before: None },
            attempt: 1,
            attempts: Vec::new(),
            correlation_id,
            submitted_by,
            created_at: now,
            updated_at: now,
            version: 1,
        };
        (job, events)
    }

    /// The public state.
    pub fn state(&self) -> JobState {
        self.status.state()
    }

    /// Whether the job reached a terminal state.
    pub fn is_terminal(&self) -> bool {
        self.state().is_terminal()
    }

    /// The one transition table. On success the job has changed (version
    /// bumped) and the returned events describe the change, in order. On
    /// error nothing changed.
    pub fn apply(
        &mut self,
        command: JobCommand,
        ctx: TransitionContext<'_>,
    ) -> Result<Vec<EventBody>, TransitionError> {
        let now = ctx.now;
        let id = self.id;
        let attempt = self.attempt;
        let refuse = |state: &JobStatus, command: &JobCommand| TransitionError {
            state: state.state(),
            command: command.kind(),
        };
        let (status, events) = match (&self.status, &command) {
            // -- PENDING ---------------------------------------------------
            (
                JobStatus::Pending { .. },
                JobCommand::Schedule {
                    provider,
                    worker,
                    deadline,
                },
            ) => (
                JobStatus::Scheduled {
                    provider: provider.clone(),
                    worker: *worker,
                    deadline: *deadline,
                },
                vec![EventBody::JobScheduled {
                    job_id: id,
                    attempt,
                    provider: provider.clone(),
                    worker_id: *worker,
                    deadline: *deadline,
                }],
            ),
            (
                JobStatus::Pending { .. } | JobStatus::Scheduled { .. },
                JobCommand::Assign { worker, deadline },
            ) => (
                JobStatus::Assigned {
                    worker: *worker,
                    deadline: *deadline,
                },
                vec![EventBody::JobAssigned {
                    job_id: id,
                    attempt,
                    worker_id: *worker,
                    deadline: *deadline,
                }],
            ),
            // A job that cannot be placed anywhere (e.g. its provider was
            // removed) fails without ever leaving the queue.
            (JobStatus::Pending { .. }, JobCommand::Fail(failure)) => {
                self.fail_attempt(None, None, failure.clone(), ctx)
            }
            (
                JobStatus::Pending { .. },
                JobCommand::Start
                | JobCommand::Exit { .. }
                | JobCommand::Expire
                | JobCommand::Requeue { .. },
            ) => return Err(refuse(&self.status, &command)),

            // -- SCHEDULED -------------------------------------------------
            (JobStatus::Scheduled { .. }, JobCommand::Schedule { .. })
            | (JobStatus::Scheduled { .. }, JobCommand::Start)
            | (JobStatus::Scheduled { .. }, JobCommand::Exit { .. })
            | (JobStatus::Scheduled { .. }, JobCommand::Requeue { .. }) => {
                return Err(refuse(&self.status, &command));
            }
            (JobStatus::Scheduled { worker, .. }, JobCommand::Fail(failure)) => {
                self.fail_attempt(Some(*worker), None, failure.clone(), ctx)
            }
            (JobStatus::Scheduled { worker, .. }, JobCommand::Expire) => self.fail_attempt(
                Some(*worker),
                None,
                Failure::new(
                    FailureKind::ProvisioningFailed,
                    "no worker was provisioned before the scheduling deadline",
                ),
                ctx,
            ),

            // -- ASSIGNED --------------------------------------------------
            (JobStatus::Assigned { .. }, JobCommand::Schedule { .. })
            | (JobStatus::Assigned { .. }, JobCommand::Assign { .. })
            | (JobStatus::Assigned { .. }, JobCommand::Exit { .. }) => {
                return Err(refuse(&self.status, &command));
            }
            (JobStatus::Assigned { worker, .. }, JobCommand::Start) => {
                let deadline = add(now, self.spec.timeout());
                (
                    JobStatus::Running {
                        worker: *worker,
                        started_at: now,
                        deadline,
                    },
                    vec![EventBody::JobStarted {
                        job_id: id,
                        attempt,
                        worker_id: *worker,
                        deadline,
                    }],
                )
            }
            (JobStatus::Assigned { worker, .. }, JobCommand::Fail(failure)) => {
                let worker = *worker;
                let (status, mut events) =
                    self.fail_attempt(Some(worker), None, failure.clone(), ctx);
                if failure.kind == FailureKind::DispatchFailed {
                    events.insert(
                        0,
                        EventBody::JobDispatchFailed {
                            job_id: id,
                            attempt,
                            worker_id: worker,
                            reason: failure.message.clone(),
                        },
                    );
                }
                (status, events)
            }
            // The worker gave the assignment back without starting it: the
            // same attempt goes back to the queue, ready at once.
            (JobStatus::Assigned { worker, .. }, JobCommand::Requeue { reason }) => (
                JobStatus::Pending { not_before: None },
                vec![
                    EventBody::JobDispatchFailed {
                        job_id: id,
                        attempt,
                        worker_id: *worker,
                        reason: reason.clone(),
                    },
                    EventBody::JobQueued {
                        job_id: id,
                        attempt,
                        priority: self.spec.priority(),
                        not_before: None,
                    },
                ],
            ),
            (JobStatus::Assigned { worker, .. }, JobCommand::Expire) => {
                let worker = *worker;
                let failure = Failure::new(
                    FailureKind::DispatchFailed,
                    "the worker did not acknowledge the job before its deadline",
                );
                let (status, mut events) =
                    self.fail_attempt(Some(worker), None, failure.clone(), ctx);
                events.insert(
                    0,
                    EventBody::JobDispatchFailed {
                        job_id: id,
                        attempt,
                        worker_id: worker,
                        reason: failure.message,
                    },
                );
                (status, events)
            }

            // -- RUNNING ---------------------------------------------------
            (JobStatus::Running { .. }, JobCommand::Schedule { .. })
            | (JobStatus::Running { .. }, JobCommand::Assign { .. })
            | (JobStatus::Running { .. }, JobCommand::Start)
            | (JobStatus::Running { .. }, JobCommand::Requeue { .. }) => {
                return Err(refuse(&self.status, &command));
            }
            (
                JobStatus::Running {
                    worker, started_at, ..
                },
                JobCommand::Exit {
                    exit_code,
                    signal,
                    oom_killed,
                    timed_out,
                },
            ) => {
                let (worker, started_at) = (*worker, *started_at);
                if *timed_out {
                    self.time_out(JobState::Running, Some(worker), Some(started_at), ctx)
                } else if *exit_code == Some(0) && !*oom_killed {
                    self.attempts.push(Attempt {
                        number: attempt,
                        worker: Some(worker),
                        started_at: Some(started_at),
                        finished_at: now,
                        outcome: AttemptOutcome::Succeeded,
                    });
                    (
                        JobStatus::Succeeded { exit_code: 0 },
                        vec![EventBody::JobSucceeded {
                            job_id: id,
                            attempt,
                            worker_id: worker,
                            exit_code: 0,
                            duration_ms: duration_ms(started_at, now),
                        }],
                    )
                } else {
                    let failure = exit_failure(*exit_code, *signal, *oom_killed);
                    self.fail_attempt(Some(worker), Some(started_at), failure, ctx)
                }
            }
            (
                JobStatus::Running {
                    worker, started_at, ..
                },
                JobCommand::Fail(failure),
            ) => self.fail_attempt(Some(*worker), Some(*started_at), failure.clone(), ctx),
            (
                JobStatus::Running {
                    worker, started_at, ..
                },
                JobCommand::Expire,
            ) => self.time_out(JobState::Running, Some(*worker), Some(*started_at), ctx),

            // -- CANCEL from any non-terminal state ------------------------
            (
                JobStatus::Pending { .. }
                | JobStatus::Scheduled { .. }
                | JobStatus::Assigned { .. }
                | JobStatus::Running { .. },
                JobCommand::Cancel { reason },
            ) => {
                let from = self.state();
                let worker = self.status.worker();
                let started_at = match &self.status {
                    JobStatus::Running { started_at, .. } => Some(*started_at),
                    _ => None,
                };
                if from != JobState::Pending {
                    self.attempts.push(Attempt {
                        number: attempt,
                        worker,
                        started_at,
                        finished_at: now,
                        outcome: AttemptOutcome::Cancelled,
                    });
                }
                (
                    JobStatus::Cancelled {
                        reason: reason.clone(),
                    },
                    vec![EventBody::JobCancelled {
                        job_id: id,
                        attempt,
                        from,
                        worker_id: worker,
                        reason: reason.clone(),
                    }],
                )
            }

            // -- Terminal states accept nothing -----------------------------
            (
                JobStatus::Succeeded { .. }
                | JobStatus::Failed { .. }
                | JobStatus::Cancelled { .. }
                | JobStatus::TimedOut { .. },
                JobCommand::Schedule { .. }
                | JobCommand::Assign { .. }
                | JobCommand::Start
                | JobCommand::Exit { .. }
                | JobCommand::Fail(_)
                | JobCommand::Cancel { .. }
                | JobCommand::Expire
                | JobCommand::Requeue { .. },
            ) => return Err(refuse(&self.status, &command)),
        };
        self.status = status;
        self.updated_at = now;
        self.version += 1;
        Ok(events)
    }

    /// Records a failed attempt and decides: retry (back to PENDING with
    /// `attempt + 1` and a backoff) or fail for good.
    fn fail_attempt(
        &mut self,
        worker: Option<WorkerId>,
        started_at: Option<Timestamp>,
        failure: Failure,
        ctx: TransitionContext<'_>,
    ) -> (JobStatus, Vec<EventBody>) {
        let attempt = self.attempt;
        self.attempts.push(Attempt {
            number: attempt,
            worker,
            started_at,
            finished_at: ctx.now,
            outcome: AttemptOutcome::Failed {
                failure: failure.clone(),
            },
        });
        let retryable = ctx.retry.is_retryable(&failure, &self.spec);
        self.retry_or(
            retryable,
            ctx,
            failure.clone(),
            JobStatus::Failed {
                failure: failure.clone(),
            },
            EventBody::JobFailed {
                job_id: self.id,
                attempt,
                failure,
            },
        )
    }

    fn time_out(
        &mut self,
        during: JobState,
        worker: Option<WorkerId>,
        started_at: Option<Timestamp>,
        ctx: TransitionContext<'_>,
    ) -> (JobStatus, Vec<EventBody>) {
        let attempt = self.attempt;
        self.attempts.push(Attempt {
            number: attempt,
            worker,
            started_at,
            finished_at: ctx.now,
            outcome: AttemptOutcome::TimedOut,
        });
        let failure = Failure::new(
            FailureKind::NonZeroExit,
            format!("timed out after {}s", self.spec.timeout().as_secs()),
        );
        self.retry_or(
            ctx.retry.retry_on_timeout,
            ctx,
            failure,
            JobStatus::TimedOut { during },
            EventBody::JobTimedOut {
                job_id: self.id,
                attempt,
                during,
                worker_id: worker,
            },
        )
    }

    fn retry_or(
        &mut self,
        retryable: bool,
        ctx: TransitionContext<'_>,
        failure: Failure,
        terminal: JobStatus,
        terminal_event: EventBody,
    ) -> (JobStatus, Vec<EventBody>) {
        let attempt = self.attempt;
        let has_attempts_left = attempt < self.spec.max_attempts();
        if retryable && has_attempts_left {
            let delay = ctx.retry.backoff(attempt, ctx.unit_random);
            let not_before = add(ctx.now, delay);
            self.attempt += 1;
            (
                JobStatus::Pending {
                    not_before: Some(not_before),
                },
                vec![
                    EventBody::JobRetryScheduled {
                        job_id: self.id,
                        failed_attempt: attempt,
                        next_attempt: attempt + 1,
                        not_before,
                        delay_ms: delay.as_millis() as u64,
                        failure,
                    },
                    EventBody::JobQueued {
                        job_id: self.id,
                        attempt: attempt + 1,
                        priority: self.spec.priority(),
                        not_before: Some(not_before),
                    },
                ],
            )
        } else if retryable {
            (
                terminal,
                vec![
                    terminal_event,
                    EventBody::JobRetryExhausted {
                        job_id: self.id,
                        attempts: attempt,
                        failure,
                    },
                ],
            )
        } else {
            (terminal, vec![terminal_event])
        }
    }
}

fn exit_failure(exit_code: Option<i32>, signal: Option<i32>, oom_killed: bool) -> Failure {
    let (kind, message) = if oom_killed {
        (
            FailureKind::OomKilled,
            "killed for exceeding its memory limit (OOM)".to_owned(),
        )
    } else if let Some(code) = exit_code {
        (FailureKind::NonZeroExit, format!("exited with code {code}"))
    } else if let Some(sig) = signal {
        (FailureKind::Signaled, format!("killed by signal {sig}"))
    } else {
        (
            FailureKind::NonZeroExit,
            "exited without an exit code".to_owned(),
        )
    };
    Failure {
        kind,
        message,
        exit_code,
        signal,
    }
}

fn duration_ms(from: Timestamp, to: Timestamp) -> u64 {
    (to - from).num_milliseconds().max(0) as u64
}

/// Converts a deadline offset for use in configs.
pub fn deadline_after(now: Timestamp, after: Duration) -> Timestamp {
    add(now, after)
}
