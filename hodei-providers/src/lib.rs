//! Worker providers: the adapters of [`WorkerProvider`] that start and stop
//! Hodei worker agents (`hodei-worker`).
//!
//! A provider does not talk to the agent. It starts a process or container
//! with the [environment contract](env) (server URL, worker id, one-time
//! registration token, provider name, labels), and from then on the agent
//! registers with the server by itself. The provider's remaining duties are
//! to stop what it started ([`WorkerProvider::destroy`]), to report workers
//! that ended on their own ([`WorkerProvider::exits`]), and to list what
//! exists on its backend ([`WorkerProvider::list`]) so that a restarted
//! server can reconcile leftovers (orphans) with its registry.
//!
//! Two providers live here:
//!
//! - [`local::LocalProvider`] (kind `local`, no images): the agent runs as a
//!   child process of the server, in its own process group, with its output
//!   in a per-worker log file. Each child is recorded in a pid file
//!   (`<state_dir>/<worker_id>.pid`) so that a restarted server still finds
//!   and can kill the agents of the previous one.
//! - [`docker::DockerProvider`] (kind `docker`, runs images): the agent runs
//!   in a container of the local Docker engine (through `bollard`), named
//!   `hodei-worker-<worker_id>` and labelled `hodei.managed=true` plus the
//!   worker, job, server and provider ids. It never pulls: images must exist
//!   locally. A static agent binary on the host can be bind-mounted into any
//!   image, so jobs may name images that do not contain Hodei at all. Memory
//!   and CPU limits come from the job's resources; OOM kills are reported.
//!
//! Both are `Send + Sync` and meant to be shared as `Arc<dyn WorkerProvider>`.
//! Both report every end of a worker on [`WorkerProvider::exits`], including
//! those caused by `destroy`; the consumer treats a repeated exit of an
//! already terminated worker as a no-op.
//!
//! `docs/PROVIDERS.md` describes their configuration for operators.

#![warn(missing_docs)]

pub mod docker;
pub mod local;

use hodei_core::ids::ProviderId;
use hodei_core::ports::WorkerLaunch;

/// The environment contract between a provider and the agent it starts.
///
/// The agent reads exactly these variables; nothing else is passed on
/// purpose (the local provider also passes a short allow-list of the
/// server's own environment, see [`local::LocalConfig::inherit_env`]).
pub mod env {
    /// gRPC URL of the server, as reachable from where the agent runs.
    pub const SERVER_URL: &str = "HODEI_SERVER_URL";
    /// The worker id (a UUID) the agent registers under.
    pub const WORKER_ID: &str = "HODEI_WORKER_ID";
    /// The one-time registration token.
    pub const WORKER_TOKEN: &str = "HODEI_WORKER_TOKEN";
    /// Name of the provider that started the agent.
    pub const PROVIDER: &str = "HODEI_PROVIDER";
    /// Labels the worker advertises, as comma-separated `k=v` pairs sorted
    /// by key (empty when there are none).
    pub const WORKER_LABELS: &str = "HODEI_WORKER_LABELS";
    /// Image the agent runs in (Docker provider only).
    pub const WORKER_IMAGE: &str = "HODEI_WORKER_IMAGE";
    /// Jobs the agent runs at once (the provider's `worker_capacity`).
    pub const WORKER_CAPACITY: &str = "HODEI_WORKER_CAPACITY";
}

/// The contract variables for `launch`, in a stable order: server URL,
/// worker id, token, provider, labels, capacity. Providers add
/// [`env::WORKER_IMAGE`] themselves when they run images.
pub fn agent_env(
    launch: &WorkerLaunch,
    provider: &ProviderId,
    server_url: &str,
) -> Vec<(&'static str, String)> {
    vec![
        (env::SERVER_URL, server_url.to_owned()),
        (env::WORKER_ID, launch.worker.to_string()),
        (env::WORKER_TOKEN, launch.token.clone()),
        (env::PROVIDER, provider.as_str().to_owned()),
        (env::WORKER_LABELS, format_labels(&launch.labels)),
        (env::WORKER_CAPACITY, launch.capacity.max(1).to_string()),
    ]
}

/// Formats labels as the agent expects them in [`env::WORKER_LABELS`]:
/// `k1=v1,k2=v2`, sorted by key.
pub fn format_labels(labels: &std::collections::BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn labels_are_sorted_k_v_pairs() {
        let mut labels = BTreeMap::new();
        labels.insert("zone".to_owned(), "b".to_owned());
        labels.insert("arch".to_owned(), "x86_64".to_owned());
        assert_eq!(format_labels(&labels), "arch=x86_64,zone=b");
        assert_eq!(format_labels(&BTreeMap::new()), "");
    }
}
