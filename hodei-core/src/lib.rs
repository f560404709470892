//! # hodei-core
//!
//! The pure heart of Hodei, a job execution platform. Everything that
//! decides what happens to a job or a worker lives here, and none of it
//! does IO: **no clock reads, no sleeps, no sockets, no files**. Time comes
//! in as an argument (`now`), ids and randomness come from the caller or
//! an [`engine::Entropy`], and decisions go out as values
//! ([`engine::Effect`]s carrying [`event::DomainEvent`]s). Same inputs,
//! same outputs: that is what the property tests and the deterministic
//! simulation rely on.
//!
//! ## How the parts fit
//! - [`spec`] parses raw submissions into a [`spec::JobSpec`] or a
//!   [`error::SpecError`] naming the field at fault.
//! - [`job`] is the job aggregate and its one transition table
//!   ([`job::Job::apply`]); [`worker`] the worker's ([`worker::WorkerState::can_transition_to`]).
//! - [`retry`] decides whether and when a failed attempt runs again.
//! - [`scheduler`] picks a worker or a provider from snapshots.
//! - [`event`] defines the domain events and their stable JSON.
//! - [`engine`] combines them into the control plane's decision core: a
//!   sans-IO machine with `handle_*` inputs, [`engine::Engine::poll_effect`]
//!   outputs and one [`engine::Engine::next_deadline`].
//! - [`ports`] are the traits adapters implement (stores, queue, event bus,
//!   logs, secrets, providers, worker links), split by capability.
//! - With the `runtime` feature, `runtime` holds the async shell that runs
//!   the engine against the ports with tokio, and `memory` the in-memory
//!   adapters of every store port.
//!
//! ## A minimal embedding (the pure engine)
//! ```
//! use hodei_core::engine::{Effect, Engine, EngineConfig, ProviderConfig, SeededEntropy};
//! use hodei_core::ids::{Actor, CorrelationId};
//! use hodei_core::ports::{Claim, RequestContext};
//! use hodei_core::spec::{JobSpec, RawJobSpec, SpecLimits};
//! use hodei_core::time::from_millis;
//!
//! let mut engine = Engine::new(
//!     EngineConfig::default(),
//!     vec![ProviderConfig::ephemeral("local", "local", false, 4)],
//!     Box::new(SeededEntropy::new(7)),
//! );
//! let spec = JobSpec::parse(
//!     RawJobSpec { command: Some(vec!["echo".into(), "hi".into()]), ..Default::default() },
//!     &SpecLimits::default(),
//! ).unwrap();
//! let ctx = RequestContext { correlation_id: CorrelationId::new("req-1"), actor: Actor::new("alice") };
//! let now = from_millis(0);
//! engine.handle_submit(now, spec, &ctx).unwrap();
//! // The shell stores the job, then claims it from the queue...
//! let mut queued = Vec::new();
//! while let Some(effect) = engine.poll_effect() {
//!     match effect {
//!         Effect::CreateJob { job, .. } => queued.push(job),
//!         Effect::Claim { limit, .. } => {
//!             let claim = Claim { jobs: std::mem::take(&mut queued), next_ready_at: None };
//!             engine.handle_claimed(now, Some(claim), limit);
//!         }
//!         // ...and asks the provider for a worker for it.
//!         Effect::Provision { provider, .. } => assert_eq!(provider.as_str(), "local"),
//!         _ => {}
//!     }
//! }
//! ```

#![warn(missing_docs)]

pub mod engine;
pub mod error;
pub mod event;
pub mod ids;
pub mod job;
pub mod ports;
pub mod retry;
pub mod scheduler;
pub mod spec;
pub mod time;
pub mod worker;

#[cfg(feature = "runtime")]
pub mod conformance;
#[cfg(feature = "runtime")]
pub mod memory;
#[cfg(feature = "runtime")]
pub mod runtime;

pub use error::{EngineError, SpecError, TransitionError};
