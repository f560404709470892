//! The worker agent (`hodei-worker`).
//!
//! The agent keeps one bidirectional `WorkerService.Session` stream open to
//! the server, runs the jobs it is given and streams their output back.
//!
//! ## How the parts fit
//! - [`AgentConfig`] holds the settings; [`WorkerArgs`] parses them from
//!   flags and `HODEI_*` environment variables for the binary.
//! - [`run`] drives one agent to its exit in the calling task; [`spawn`]
//!   runs it as a tokio task behind an [`AgentHandle`] that can drain or
//!   kill it and await its [`AgentExit`].
//! - The session loop (private `runner` module) connects, sends `Hello`,
//!   waits for `Welcome`, heartbeats, reacts to `RunJob` / `CancelJob` /
//!   `Drain` / `Shutdown`, and reconnects with exponential backoff
//!   (1 s doubling to 60 s) under the same worker id, presenting the resume
//!   token of the last `Welcome`.
//! - Each job runs through [`exec::execute`] (its own process group,
//!   timeout and cancellation, masked output lines with sequence numbers);
//!   a batcher groups its lines into `LogBatch`es.
//! - Log batches and results go through a bounded outbox that outlives
//!   sessions: messages not yet handed to a session's stream are sent on
//!   the next one, and a full outbox blocks the job's pipes, so output is
//!   slowed down, never dropped. Results are kept until the server
//!   acknowledges them (`ResultAck`) and sent again after a reconnect.
//!
//! See `docs/AGENT.md` for the protocol and operational behaviour.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use uuid::Uuid;

mod config;
pub mod exec;
mod job;
mod outbox;
mod runner;

pub use config::{
    AgentConfig, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_LOG_BATCH_SIZE, DEFAULT_LOG_FLUSH,
    DEFAULT_SERVER_URL, WorkerArgs, parse_labels,
};
pub use job::MAX_LOG_BATCH_BYTES;

/// How an agent ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentExit {
    /// Drained cleanly: running jobs finished (or the server asked for the
    /// shutdown) and every log batch and result was handed to the server.
    Clean,
    /// The agent had to cancel a running job when the drain grace ran out,
    /// or could not deliver everything before giving up.
    Forced,
}

impl AgentExit {
    /// Process exit code: 0 when clean, 1 when forced.
    pub fn exit_code(self) -> i32 {
        match self {
            Self::Clean => 0,
            Self::Forced => 1,
        }
    }
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// The server refused the first registration (`UNAUTHENTICATED` before
    /// any `Welcome`): unknown, reused or expired token.
    #[error("registration rejected: {0}")]
    Rejected(String),
    /// A setting cannot work.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The agent task panicked or was aborted, its exit was already taken,
    /// or the binary could not set itself up (signal handlers).
    #[error("agent task failed: {0}")]
    Crashed(String),
}

impl AgentError {
    /// Process exit code: 2 for a rejected registration or a bad
    /// configuration, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Rejected(_) | Self::InvalidConfig(_) => 2,
            Self::Crashed(_) => 1,
        }
    }
}

/// Runs the agent until it has drained.
///
/// `shutdown` completing starts a drain with [`AgentConfig::drain_grace`]
/// (what SIGTERM does in the binary); a server `Drain` or `Shutdown` does
/// the same. Returns an error when the first registration is rejected or
/// the configuration is invalid; connection failures are retried forever.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<AgentExit, AgentError> {
    let (_commands, rx) = mpsc::unbounded_channel();
    runner::run(config, shutdown, rx).await
}

/// Starts the agent as a tokio task (must be called inside a tokio
/// runtime). Dropping the handle leaves the agent running.
pub fn spawn(config: AgentConfig) -> AgentHandle {
    let (commands, rx) = mpsc::unbounded_channel();
    let worker_id = config.worker_id;
    let task = tokio::spawn(runner::run(config, std::future::pending(), rx));
    AgentHandle {
        worker_id,
        commands,
        task,
        waited: false,
    }
}

/// Controls an agent started with [`spawn`].
#[derive(Debug)]
pub struct AgentHandle {
    worker_id: Uuid,
    commands: mpsc::UnboundedSender<runner::Command>,
    task: JoinHandle<Result<AgentExit, AgentError>>,
    /// `wait` already returned the result.
    waited: bool,
}

impl AgentHandle {
    /// The agent's worker id.
    pub fn worker_id(&self) -> Uuid {
        self.worker_id
    }

    /// Starts a drain with the configured grace, as SIGTERM does: no new
    /// work, running jobs get the grace to finish, then are cancelled.
    pub fn drain(&self) {
        // An agent that already exited has nothing left to drain.
        let _ = self.commands.send(runner::Command::Drain(None));
    }

    /// Starts a drain with the given grace (a running drain's deadline is
    /// only ever brought forward).
    pub fn drain_with_grace(&self, grace: Duration) {
        let _ = self.commands.send(runner::Command::Drain(Some(grace)));
    }

    /// Drains with no grace: running jobs are cancelled at once (SIGTERM to
    /// their process groups, SIGKILL after the kill grace), their logs and
    /// results flushed; the exit is [`AgentExit::Forced`] if any job ran.
    pub fn kill(&self) {
        let _ = self
            .commands
            .send(runner::Command::Drain(Some(Duration::ZERO)));
    }

    /// Whether the agent has exited.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the agent to exit and returns how it ended. Cancel-safe
    /// (usable in `select!`); the result can be taken only once, a later
    /// call returns [`AgentError::Crashed`].
    pub async fn wait(&mut self) -> Result<AgentExit, AgentError> {
        if self.waited {
            return Err(AgentError::Crashed(
                "the agent's exit was already returned by wait".to_owned(),
            ));
        }
        let joined = (&mut self.task).await;
        self.waited = true;
        match joined {
            Ok(result) => result,
            Err(e) => Err(AgentError::Crashed(e.to_string())),
        }
    }
}
