//! Workers and their state machine.
//!
//! [`WorkerState::can_transition_to`] is the one table of legal moves;
//! every change of a worker's state in the engine goes through
//! [`Worker::transition`].
//!
//! Being disconnected is not a state: it is [`Worker::connected`], beside
//! the state. A worker whose stream dropped or whose heartbeats stopped
//! keeps its state (`READY`, `BUSY`, `DRAINING`) and its jobs until it
//! comes back (same state, `WorkerReconnected`) or is lost (`TERMINATING`,
//! then `TERMINATED`); see "Liveness of workers" in [`crate::engine`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::WorkerTransitionError;
use crate::ids::{JobId, ProviderId, WorkerId};
use crate::time::Timestamp;

/// Worker states (DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkerState {
    /// The provider is creating it.
    Creating,
    /// Created; waiting for the agent to register.
    Connecting,
    /// Registered and idle.
    Ready,
    /// Running as many jobs as its capacity allows... or at least one.
    Busy,
    /// Takes no new work; finishes what it has.
    Draining,
    /// Being destroyed.
    Terminating,
    /// Gone. Terminal.
    Terminated,
}

impl WorkerState {
    /// Every state, in lifecycle order.
    pub const ALL: [WorkerState; 7] = [
        WorkerState::Creating,
        WorkerState::Connecting,
        WorkerState::Ready,
        WorkerState::Busy,
        WorkerState::Draining,
        WorkerState::Terminating,
        WorkerState::Terminated,
    ];

    /// The one transition table.
    pub fn can_transition_to(self, to: WorkerState) -> bool {
        use WorkerState::*;
        match (self, to) {
            (Creating, Connecting | Ready | Terminating | Terminated) => true,
            (Creating, Creating | Busy | Draining) => false,
            (Connecting, Ready | Terminating | Terminated) => true,
            (Connecting, Creating | Connecting | Busy | Draining) => false,
            (Ready, Busy | Draining | Terminating | Terminated) => true,
            (Ready, Creating | Connecting | Ready) => false,
            (Busy, Ready | Busy | Draining | Terminating | Terminated) => true,
            (Busy, Creating | Connecting) => false,
            (Draining, Busy | Terminating | Terminated) => true,
            (Draining, Creating | Connecting | Ready | Draining) => false,
            (Terminating, Terminated) => true,
            (Terminating, Creating | Connecting | Ready | Busy | Draining | Terminating) => false,
            (Terminated, _) => false,
        }
    }

    /// Whether the worker is gone.
    pub fn is_terminal(self) -> bool {
        self == WorkerState::Terminated
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Creating => "CREATING",
            WorkerState::Connecting => "CONNECTING",
            WorkerState::Ready => "READY",
            WorkerState::Busy => "BUSY",
            WorkerState::Draining => "DRAINING",
            WorkerState::Terminating => "TERMINATING",
            WorkerState::Terminated => "TERMINATED",
        }
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WorkerState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let up = s.trim().to_ascii_uppercase();
        WorkerState::ALL
            .into_iter()
            .find(|st| st.as_str() == up)
            .ok_or_else(|| format!("unknown worker state {s:?}; accepted: CREATING, CONNECTING, READY, BUSY, DRAINING, TERMINATING, TERMINATED"))
    }
}

/// A worker as the control plane sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    /// Identity, stable across reconnects.
    pub id: WorkerId,
    /// Provider that created it.
    pub provider: ProviderId,
    /// Lifecycle state.
    pub state: WorkerState,
    /// Labels it advertises (affinity).
    pub labels: BTreeMap<String, String>,
    /// Image it runs in, for providers that run images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Concurrent jobs it accepts.
    pub capacity: u32,
    /// Jobs it holds (assigned or running).
    pub jobs: Vec<JobId>,
    /// Provisioned for one job and destroyed after it.
    pub ephemeral: bool,
    /// The job an ephemeral worker was provisioned for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reserved_for: Option<JobId>,
    /// Whether its stream is currently up.
    pub connected: bool,
    /// Last sign of life.
    pub last_seen: Timestamp,
    /// Creation time.
    pub created_at: Timestamp,
}

impl Worker {
    /// Moves to `to` if the table allows it.
    pub fn transition(&mut self, to: WorkerState) -> Result<(), WorkerTransitionError> {
        if self.state.can_transition_to(to) {
            self.state = to;
            Ok(())
        } else {
            Err(WorkerTransitionError {
                from: self.state,
                to,
            })
        }
    }

    /// Free slots.
    pub fn free_slots(&self) -> u32 {
        self.capacity.saturating_sub(self.jobs.len() as u32)
    }

    /// Whether it can take `job` now.
    pub fn accepts(&self, job: JobId) -> bool {
        self.connected
            && matches!(self.state, WorkerState::Ready | WorkerState::Busy)
            && self.free_slots() > 0
            && self.reserved_for.is_none_or(|j| j == job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminated_is_terminal() {
        for to in WorkerState::ALL {
            assert!(!WorkerState::Terminated.can_transition_to(to));
        }
    }

    #[test]
    fn every_state_can_reach_terminated() {
        for from in WorkerState::ALL {
            if from != WorkerState::Terminated {
                assert!(from.can_transition_to(WorkerState::Terminated), "{from}");
            }
        }
    }

    #[test]
    fn draining_never_returns_to_ready() {
        assert!(!WorkerState::Draining.can_transition_to(WorkerState::Ready));
    }

    #[test]
    fn names_round_trip() {
        for s in WorkerState::ALL {
            assert_eq!(s.as_str().parse::<WorkerState>().unwrap(), s);
        }
    }
}
