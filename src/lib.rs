//! # hodei
//!
//! Umbrella crate of the Hodei job execution platform: it re-exports the
//! workspace's crates under short names and hosts the examples
//! (`cargo run --example quickstart`).
//!
//! - [`core`]: the pure domain (state machines, scheduler, retry, events,
//!   ports, engine) and, with its `runtime` feature, the async control
//!   plane and the in-memory stores.
//! - [`grpc`]: wire contracts, the server, the worker agent and the CLI.
//! - [`providers`]: worker providers (local processes, Docker).

pub use hodei_core as core;
pub use hodei_grpc as grpc;
pub use hodei_providers as providers;
