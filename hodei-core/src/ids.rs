//! Identifiers of the domain, as newtypes so that a job id can never be
//! passed where a worker id is expected.
//!
//! New ids are never minted inside a transition: the caller (or the
//! [`Entropy`](crate::engine::Entropy) port given to the engine) supplies them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::IdError;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// Wraps a UUID supplied by the caller.
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// Builds an id from two 64-bit halves; handy for deterministic
            /// tests and simulations.
            pub const fn from_u64_pair(hi: u64, lo: u64) -> Self {
                Self(Uuid::from_u64_pair(hi, lo))
            }

            /// The underlying UUID.
            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s.trim()).map(Self).map_err(|_| IdError {
                    kind: $what,
                    value: s.chars().take(64).collect(),
                })
            }
        }
    };
}

uuid_id!(
    /// Identifies a job for its whole life, across attempts.
    JobId,
    "job id"
);
uuid_id!(
    /// Identifies a worker (an agent process, container or pod).
    WorkerId,
    "worker id"
);
uuid_id!(
    /// Identifies one domain event.
    EventId,
    "event id"
);

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a string. Emptiness is the caller's business; the edge
            /// validates names before they reach the core.
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            /// The string form.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
    };
}

string_id!(
    /// Names a configured worker provider (`local`, `docker`, ...).
    ProviderId
);
string_id!(
    /// Ties together every event caused by one request, from the edge to
    /// the worker. Never empty.
    CorrelationId
);
string_id!(
    /// Who caused an event: the caller's identity, `system:<component>` or
    /// `worker:<id>`. Never empty.
    Actor
);

impl Actor {
    /// The actor for decisions the control plane takes on its own.
    pub fn system(component: &str) -> Self {
        Self(format!("system:{component}"))
    }

    /// The actor for facts reported by a worker.
    pub fn worker(id: WorkerId) -> Self {
        Self(format!("worker:{id}"))
    }
}
