//! # hodei-grpc
//!
//! Hodei's gRPC contracts and everything that speaks them.
//!
//! ## How the parts fit
//! - [`proto`] is generated from `proto/hodei/v1/*.proto`, the one source
//!   of the wire contracts: `api.proto` (the client API: jobs, logs,
//!   audit, workers, providers, secrets), `worker.proto` (the worker
//!   agent's session) and `common.proto` (types both share).
//! - [`server`] composes a [`hodei_core::runtime::ControlPlane`] with its
//!   stores and providers and serves the gRPC services on a listener:
//!   `server::run(listeners, config, shutdown)`. The `hodei-server`
//!   binary only parses flags ([`config`]) and calls it.
//! - [`convert`] maps between domain types and their proto messages.
//! - [`agent`] is the worker agent (`hodei-worker`): one bidirectional
//!   session per worker, job processes, log batching, draining.
//! - [`inprocess`] is a worker provider that runs agents inside the
//!   server process, for embedding and the quick start.
//! - [`cli`] is the `hodei` command-line client.

#![warn(missing_docs)]

/// Code generated from the `hodei.v1` protos.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("hodei.v1");

    /// The encoded file descriptor set of every `hodei.v1` proto (and the
    /// well-known types they import), served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/hodei_descriptor.bin"));
}

pub mod agent;
pub mod cli;
pub mod config;
pub mod convert;
pub mod inprocess;
pub mod server;
