//! The Docker provider: each worker is a container of the local Docker
//! engine, driven through `bollard`.
//!
//! # Containers
//!
//! [`DockerProvider::create`] checks that the image exists locally (it
//! never pulls: a missing image is [`ProviderError::ImageNotFound`] with a
//! hint), then creates and starts a container named
//! `hodei-worker-<worker_id>` with:
//!
//! - the [environment contract](crate::env), plus `HODEI_WORKER_IMAGE`;
//! - the [labels](labels) `hodei.managed=true`, `hodei.worker_id`,
//!   `hodei.job_id` (ephemeral workers), `hodei.server_id`,
//!   `hodei.provider`;
//! - the job's limits: `resources.memory_mb` as the memory limit, with the
//!   memory+swap limit set equal so swap cannot hide an OOM, and
//!   `resources.cpu` as `NanoCpus`;
//! - the network mode of [`DockerConfig::network`]: `host` (the default; the
//!   server URL works unchanged) or `bridge` (loopback server URLs are
//!   rewritten to `host.docker.internal`, mapped to the host gateway);
//! - when [`DockerConfig::agent_binary`] is set, that static binary
//!   bind-mounted read-only at [`AGENT_MOUNT_PATH`] and used as the
//!   entrypoint, so any local image can run jobs; otherwise the image's own
//!   entrypoint (as in `hodei-worker:latest`).
//!
//! Exited containers are kept (so that their state, OOM flag included, can
//! be inspected) until [`DockerProvider::destroy`] stops and removes them.
//!
//! # Exits
//!
//! [`DockerProvider::exits`] follows the engine's `die` (and `oom`) events
//! for containers labelled with this server and provider, inspects each dead
//! container and reports its exit code in `reason` and `State.OOMKilled` as
//! `oom_killed`. It reconnects after engine restarts, resuming from the time
//! of the last event seen, so no exit between two connections is lost.
//!
//! # Timeouts
//!
//! Every engine call has a deadline ([`DockerConfig::call_timeout`]; stop
//! gets the stop grace on top): an engine that hangs or is down makes calls
//! fail with [`ProviderError::Unavailable`] and `health` unhealthy, never
//! hang. The client connects lazily and negotiates the API version with the
//! engine on first use, so the server starts while the engine is down.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bollard::Docker;
use bollard::models::{ContainerCreateBody, ContainerSummaryStateEnum, EventMessage, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptions, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptions,
};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use hodei_core::ids::{ProviderId, WorkerId};
use hodei_core::ports::{
    ProviderError, ProviderHealth, ProvisionedWorker, WorkerExit, WorkerLaunch, WorkerProvider,
};
use hodei_core::spec::Resources;

use crate::{agent_env, env};

/// The provider kind, as [`WorkerProvider::kind`] reports it.
pub const KIND: &str = "docker";

/// Default of [`DockerConfig::image`]; built by `scripts/worker-image`.
pub const DEFAULT_IMAGE: &str = "hodei-worker:latest";

/// Where [`DockerConfig::agent_binary`] is mounted in every container.
pub const AGENT_MOUNT_PATH: &str = "/hodei/hodei-worker";

/// Containers are named this prefix followed by the worker id.
pub const CONTAINER_NAME_PREFIX: &str = "hodei-worker-";

/// The host name of the Docker host as seen from a `bridge` container.
pub const BRIDGE_HOST: &str = "host.docker.internal";

/// Default of [`DockerConfig::call_timeout`].
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of [`DockerConfig::stop_grace`].
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// Labels put on every worker container.
pub mod labels {
    /// Always `true`: the container is Hodei's (cleanup selects on it).
    pub const MANAGED: &str = "hodei.managed";
    /// The worker id.
    pub const WORKER_ID: &str = "hodei.worker_id";
    /// The job the worker was provisioned for (ephemeral workers only).
    pub const JOB_ID: &str = "hodei.job_id";
    /// The server that created it.
    pub const SERVER_ID: &str = "hodei.server_id";
    /// The provider that created it.
    pub const PROVIDER: &str = "hodei.provider";
}

/// How a worker container is networked, and so how it reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DockerNetwork {
    /// The host's network stack: the server URL the launch carries works
    /// unchanged, `127.0.0.1` included. Linux only.
    #[default]
    Host,
    /// Docker's default bridge. The container gets the extra host
    /// `host.docker.internal:host-gateway`, and a server URL whose host is
    /// loopback or unspecified (`127.0.0.1`, `localhost`, `0.0.0.0`, `::1`)
    /// is rewritten to `host.docker.internal` ([`bridge_server_url`]). The
    /// server must then listen on an address the bridge gateway reaches
    /// (e.g. `0.0.0.0`), not on `127.0.0.1`.
    Bridge,
}

impl DockerNetwork {
    /// The Docker network mode (`host` or `bridge`).
    pub fn as_str(&self) -> &'static str {
        match self {
            DockerNetwork::Host => "host",
            DockerNetwork::Bridge => "bridge",
        }
    }
}

impl fmt::Display for DockerNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DockerNetwork {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "host" => Ok(DockerNetwork::Host),
            "bridge" => Ok(DockerNetwork::Bridge),
            other => Err(format!(
                "unknown docker network mode '{other}' (accepted: host, bridge)"
            )),
        }
    }
}

/// Configuration of a [`DockerProvider`]. Build it with
/// [`DockerConfig::new`] and change the public fields.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DockerConfig {
    /// Provider name (`HODEI_PROVIDER`, label `hodei.provider`).
    pub id: ProviderId,
    /// Identity of this server (label `hodei.server_id`): [`exits`] and
    /// [`DockerProvider::remove_all_managed`] only see its containers.
    ///
    /// [`exits`]: WorkerProvider::exits
    pub server_id: String,
    /// Image of workers whose launch names none. Default
    /// [`DEFAULT_IMAGE`].
    pub image: String,
    /// A static agent binary on the host, bind-mounted read-only at
    /// [`AGENT_MOUNT_PATH`] and used as the entrypoint of every container.
    /// `None` (the default): the image's own entrypoint is the agent.
    pub agent_binary: Option<PathBuf>,
    /// Network mode. Default [`DockerNetwork::Host`].
    pub network: DockerNetwork,
    /// Engine address (`unix:///path` or `tcp://host:port`). `None` (the
    /// default): `$DOCKER_HOST`, else `unix:///var/run/docker.sock`.
    pub docker_host: Option<String>,
    /// Deadline of each engine call. Default 10 s.
    pub call_timeout: Duration,
    /// Time between `SIGTERM` and `SIGKILL` when a container is stopped
    /// (also set as the container's stop timeout). Default 10 s.
    pub stop_grace: Duration,
    /// Run Docker's init (`docker-init`) as PID 1, so that signals reach
    /// the agent and orphaned processes of jobs are reaped. Default `true`.
    pub init: bool,
    /// Extra labels for every container (the `hodei.*` labels above win).
    pub extra_labels: BTreeMap<String, String>,
    /// Extra environment for every container (the contract variables
    /// win).
    pub extra_env: BTreeMap<String, String>,
    /// Replaces the entrypoint (and the mounted agent): for tests that run
    /// a fake agent such as `sh -c 'env; sleep 1000'`. `None` in
    /// production.
    pub command_override: Option<Vec<String>>,
}

impl DockerConfig {
    /// A configuration with the defaults: image [`DEFAULT_IMAGE`], no
    /// mounted agent, `host` network, default engine address, 10 s call
    /// timeout and stop grace, `docker-init` on.
    pub fn new(id: impl Into<ProviderId>, server_id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            server_id: server_id.into(),
            image: DEFAULT_IMAGE.to_owned(),
            agent_binary: None,
            network: DockerNetwork::Host,
            docker_host: None,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            stop_grace: DEFAULT_STOP_GRACE,
            init: true,
            extra_labels: BTreeMap::new(),
            extra_env: BTreeMap::new(),
            command_override: None,
        }
    }
}

/// The name of `worker`'s container: `hodei-worker-<worker_id>`.
pub fn container_name(worker: WorkerId) -> String {
    format!("{CONTAINER_NAME_PREFIX}{worker}")
}

/// The server URL as seen from a `bridge` container: a loopback or
/// unspecified host (`127.0.0.1`, `localhost`, `0.0.0.0`, `[::1]`, `[::]`)
/// becomes [`BRIDGE_HOST`]; any other URL is returned unchanged.
///
/// ```
/// use hodei_providers::docker::bridge_server_url;
/// assert_eq!(
///     bridge_server_url("http://127.0.0.1:50051"),
///     "http://host.docker.internal:50051"
/// );
/// assert_eq!(bridge_server_url("https://hodei.example:443"), "https://hodei.example:443");
/// ```
pub fn bridge_server_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    let (host, port) = if hostport.starts_with('[') {
        let end = hostport.find(']').map_or(hostport.len(), |i| i + 1);
        hostport.split_at(end)
    } else {
        hostport.split_at(hostport.rfind(':').unwrap_or(hostport.len()))
    };
    if !is_local_host(host) {
        return url.to_owned();
    }
    let mut out = String::with_capacity(url.len() + BRIDGE_HOST.len());
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    if let Some(userinfo) = userinfo {
        out.push_str(userinfo);
        out.push('@');
    }
    out.push_str(BRIDGE_HOST);
    out.push_str(port);
    out.push_str(path);
    out
}

/// Removes (force) every container labelled `hodei.managed=true`, or only
/// those of `server_id` when given, on the default engine (`$DOCKER_HOST`
/// or the local socket). Returns how many were removed. For cleanup after
/// tests and by operators; a running server uses
/// [`DockerProvider::remove_all_managed`].
pub async fn remove_all_managed(server_id: Option<&str>) -> Result<usize, ProviderError> {
    let engine = Engine::new(DockerConfig::new(KIND, server_id.unwrap_or_default()));
    let mut filter = vec![format!("{}=true", labels::MANAGED)];
    if let Some(server_id) = server_id {
        filter.push(format!("{}={server_id}", labels::SERVER_ID));
    }
    engine.remove_labelled(filter).await
}

/// Runs workers as Docker containers. See the [module docs](self).
pub struct DockerProvider {
    engine: Arc<Engine>,
    exits_taken: AtomicBool,
}

impl fmt::Debug for DockerProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerProvider")
            .field("config", &self.engine.config)
            .finish_non_exhaustive()
    }
}

impl DockerProvider {
    /// A provider with `config`. Does no IO: the engine is contacted on
    /// first use, so a provider exists (and reports itself unhealthy) while
    /// the engine is down.
    pub fn new(config: DockerConfig) -> Self {
        Self {
            engine: Arc::new(Engine::new(config)),
            exits_taken: AtomicBool::new(false),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &DockerConfig {
        &self.engine.config
    }

    /// Removes (force) every container of this server
    /// (`hodei.managed=true`, `hodei.server_id=<server_id>`), whatever its
    /// provider. Returns how many were removed.
    pub async fn remove_all_managed(&self) -> Result<usize, ProviderError> {
        self.engine
            .remove_labelled(vec![
                format!("{}=true", labels::MANAGED),
                format!("{}={}", labels::SERVER_ID, self.engine.config.server_id),
            ])
            .await
    }

    /// The container configuration for `launch` (image resolved by the
    /// caller).
    fn container_body(&self, launch: &WorkerLaunch, image: &str) -> ContainerCreateBody {
        let config = &self.engine.config;
        let server_url = match config.network {
            DockerNetwork::Host => launch.server_url.clone(),
            DockerNetwork::Bridge => bridge_server_url(&launch.server_url),
        };
        let mut contract = agent_env(launch, &config.id, &server_url);
        contract.push((env::WORKER_IMAGE, image.to_owned()));
        let env = config
            .extra_env
            .iter()
            .filter(|(name, _)| !contract.iter().any(|(c, _)| c == name))
            .map(|(name, value)| format!("{name}={value}"))
            .chain(
                contract
                    .iter()
                    .map(|(name, value)| format!("{name}={value}")),
            )
            .collect();

        let mut container_labels: HashMap<String, String> = config
            .extra_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        container_labels.insert(labels::MANAGED.to_owned(), "true".to_owned());
        container_labels.insert(labels::WORKER_ID.to_owned(), launch.worker.to_string());
        if let Some(job) = launch.job {
            container_labels.insert(labels::JOB_ID.to_owned(), job.to_string());
        }
        container_labels.insert(labels::SERVER_ID.to_owned(), launch.server_id.clone());
        container_labels.insert(labels::PROVIDER.to_owned(), config.id.as_str().to_owned());

        let (entrypoint, binds) = match (&config.command_override, &config.agent_binary) {
            (Some(command), _) => (Some(command.clone()), None),
            (None, Some(agent)) => (
                Some(vec![AGENT_MOUNT_PATH.to_owned()]),
                Some(vec![format!("{}:{AGENT_MOUNT_PATH}:ro", agent.display())]),
            ),
            (None, None) => (None, None),
        };
        let (memory, nano_cpus) = limits(&launch.resources);
        ContainerCreateBody {
            image: Some(image.to_owned()),
            env: Some(env),
            labels: Some(container_labels),
            entrypoint,
            stop_timeout: Some(config.stop_grace.as_secs() as i64),
            host_config: Some(HostConfig {
                memory,
                // Equal to the memory limit: no swap on top of it, so a job
                // over its limit is OOM-killed instead of swapping.
                memory_swap: memory,
                nano_cpus,
                network_mode: Some(config.network.as_str().to_owned()),
                extra_hosts: (config.network == DockerNetwork::Bridge)
                    .then(|| vec![format!("{BRIDGE_HOST}:host-gateway")]),
                binds,
                init: Some(config.init),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[async_trait]
impl WorkerProvider for DockerProvider {
    fn id(&self) -> &ProviderId {
        &self.engine.config.id
    }

    fn kind(&self) -> &'static str {
        KIND
    }

    fn runs_images(&self) -> bool {
        true
    }

    async fn create(&self, launch: WorkerLaunch) -> Result<(), ProviderError> {
        let engine = &self.engine;
        let config = &engine.config;
        let image = launch.image.clone().unwrap_or_else(|| config.image.clone());
        if let (None, Some(agent)) = (&config.command_override, &config.agent_binary)
            && !agent.is_file()
        {
            return Err(ProviderError::CreateFailed(format!(
                "agent binary {} (to mount into containers) not found",
                agent.display()
            )));
        }
        if launch.server_id != config.server_id {
            // The label comes from the launch; exits are filtered by the
            // configured id: a mismatch would hide this worker's exit.
            tracing::warn!(
                launch = %launch.server_id,
                configured = %config.server_id,
                "launch server id differs from the docker provider's; its exit will not be reported"
            );
        }
        let docker = engine.client().await?;

        match engine
            .call("inspect image", docker.inspect_image(&image))
            .await
        {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => return Err(image_not_found(&image)),
            Err(e) => return Err(e.into_provider(ProviderError::CreateFailed)),
        }

        let name = container_name(launch.worker);
        let body = self.container_body(&launch, &image);
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        match engine
            .call(
                "create container",
                docker.create_container(Some(options), body),
            )
            .await
        {
            Ok(created) => {
                for warning in created.warnings {
                    tracing::warn!(container = %name, %warning, "docker warning on create");
                }
            }
            Err(e) if e.status() == Some(404) => return Err(image_not_found(&image)),
            Err(e) if e.status() == Some(409) => {
                return Err(ProviderError::CreateFailed(format!(
                    "container {name} already exists"
                )));
            }
            Err(e) => return Err(e.into_provider(ProviderError::CreateFailed)),
        }

        if let Err(e) = engine
            .call("start container", docker.start_container(&name, None))
            .await
        {
            // Do not leave a created-but-never-started container behind.
            if let Err(cleanup) = engine.remove(docker, &name).await {
                tracing::warn!(container = %name, error = %cleanup, "cannot remove container that failed to start");
            }
            return Err(e.into_provider(ProviderError::CreateFailed));
        }
        tracing::info!(worker = %launch.worker, container = %name, %image, "docker worker started");
        Ok(())
    }

    async fn destroy(&self, worker: WorkerId) -> Result<(), ProviderError> {
        let engine = &self.engine;
        let docker = engine.client().await?;
        let name = container_name(worker);
        let grace = engine.config.stop_grace;
        let options = StopContainerOptions {
            t: Some(i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)),
            signal: None,
        };
        match engine
            .call_within(
                grace + engine.config.call_timeout,
                "stop container",
                docker.stop_container(&name, Some(options)),
            )
            .await
        {
            // Stopped, already stopped (304 counts as success) or gone.
            Ok(()) => {}
            Err(e) if e.status() == Some(404) => return Ok(()),
            Err(e @ EngineError::Unreachable(_)) => {
                return Err(e.into_provider(ProviderError::Other));
            }
            // Removal with force kills it anyway.
            Err(e) => {
                tracing::warn!(container = %name, error = %e, "stop failed; removing with force")
            }
        }
        engine
            .remove(docker, &name)
            .await
            .map_err(|e| e.into_provider(ProviderError::Other))?;
        tracing::info!(%worker, container = %name, "docker worker removed");
        Ok(())
    }

    async fn health(&self) -> ProviderHealth {
        let engine = &self.engine;
        let unhealthy = |message: String| ProviderHealth {
            healthy: false,
            message,
        };
        let docker = match engine.client().await {
            Ok(docker) => docker,
            Err(e) => return unhealthy(e.to_string()),
        };
        if let Err(e) = engine.call("ping", docker.ping()).await {
            return unhealthy(e.to_string());
        }
        let config = &engine.config;
        if let Some(agent) = &config.agent_binary
            && !agent.is_file()
        {
            return unhealthy(format!(
                "agent binary {} (to mount into containers) not found",
                agent.display()
            ));
        }
        let version = docker.client_version();
        let image = match engine
            .call("inspect image", docker.inspect_image(&config.image))
            .await
        {
            Ok(_) => format!("default image {} present", config.image),
            Err(e) if e.status() == Some(404) => format!(
                "default image {} missing (build it with scripts/worker-image); jobs naming a local image still run",
                config.image
            ),
            Err(e) => return unhealthy(e.to_string()),
        };
        let agent = match (&config.command_override, &config.agent_binary) {
            (Some(_), _) => "entrypoint overridden".to_owned(),
            (None, Some(agent)) => format!("agent {} mounted read-only", agent.display()),
            (None, None) => "agent from the image".to_owned(),
        };
        ProviderHealth {
            healthy: true,
            message: format!(
                "docker engine reachable (API {}.{}); {image}; network {}; {agent}",
                version.major_version, version.minor_version, config.network
            ),
        }
    }

    async fn list(&self) -> Result<Vec<ProvisionedWorker>, ProviderError> {
        let engine = &self.engine;
        let summaries = engine
            .list_labelled(vec![
                format!("{}=true", labels::MANAGED),
                format!("{}={}", labels::PROVIDER, engine.config.id),
            ])
            .await?;
        let mut workers: Vec<ProvisionedWorker> = summaries
            .into_iter()
            .filter_map(|summary| {
                let labels = summary.labels.unwrap_or_default();
                let worker = labels.get(labels::WORKER_ID)?.parse().ok()?;
                let alive = matches!(
                    summary.state,
                    Some(
                        ContainerSummaryStateEnum::RUNNING
                            | ContainerSummaryStateEnum::CREATED
                            | ContainerSummaryStateEnum::RESTARTING
                            | ContainerSummaryStateEnum::PAUSED
                    )
                );
                Some(ProvisionedWorker {
                    worker,
                    server_id: labels.get(labels::SERVER_ID).cloned().unwrap_or_default(),
                    alive,
                })
            })
            .collect();
        workers.sort_by_key(|w| w.worker);
        Ok(workers)
    }

    fn exits(&self) -> BoxStream<'static, WorkerExit> {
        if self.exits_taken.swap(true, Ordering::SeqCst) {
            tracing::warn!(provider = %self.engine.config.id, "exits() called twice; the second stream is empty");
            return futures::stream::empty().boxed();
        }
        let watcher = ExitWatcher {
            engine: Arc::clone(&self.engine),
            since: unix_now(),
            events: None,
            seen: VecDeque::new(),
            oom: HashSet::new(),
            backoff: RECONNECT_MIN,
            warned: false,
        };
        futures::stream::unfold(watcher, |mut watcher| async move {
            let exit = watcher.next_exit().await;
            Some((exit, watcher))
        })
        .boxed()
    }
}

/// The engine connection and configuration, shared with the exit stream.
struct Engine {
    config: DockerConfig,
    client: tokio::sync::OnceCell<Docker>,
}

impl Engine {
    fn new(config: DockerConfig) -> Self {
        Self {
            config,
            client: tokio::sync::OnceCell::new(),
        }
    }

    /// The client, connected and version-negotiated on first success.
    async fn client(&self) -> Result<&Docker, ProviderError> {
        self.client
            .get_or_try_init(|| async {
                let connected = match &self.config.docker_host {
                    Some(host) => Docker::connect_with_host(host),
                    None => Docker::connect_with_defaults(),
                };
                let docker = connected.map_err(|e| {
                    ProviderError::Unavailable(format!("cannot connect to docker: {}", chain(&e)))
                })?;
                // bollard's own deadline (whole seconds) is only a backstop:
                // every call has ours, which for `stop` includes the grace.
                let backstop = self.config.call_timeout + self.config.stop_grace;
                let docker = docker.with_timeout(backstop + Duration::from_secs(1));
                // The engine may be older than bollard's default API version.
                self.call("version negotiation", docker.negotiate_version())
                    .await
                    .map_err(|e| e.into_provider(ProviderError::Unavailable))
            })
            .await
    }

    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, EngineError> {
        self.call_within(self.config.call_timeout, what, call).await
    }

    async fn call_within<T>(
        &self,
        limit: Duration,
        what: &str,
        call: impl Future<Output = Result<T, bollard::errors::Error>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(EngineError::from_bollard(what, e)),
            Err(_) => Err(EngineError::Unreachable(format!(
                "docker {what}: no answer from the engine within {limit:?}"
            ))),
        }
    }

    /// Removes a container with force (and its anonymous volumes); gone
    /// already is success.
    async fn remove(&self, docker: &Docker, name: &str) -> Result<(), EngineError> {
        let options = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match self
            .call(
                "remove container",
                docker.remove_container(name, Some(options)),
            )
            .await
        {
            Ok(()) => Ok(()),
            // 404: gone; 409: a removal is already in progress.
            Err(e) if matches!(e.status(), Some(404 | 409)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Containers (all states) carrying every label filter in `filter`.
    async fn list_labelled(
        &self,
        filter: Vec<String>,
    ) -> Result<Vec<bollard::models::ContainerSummary>, ProviderError> {
        let docker = self.client().await?;
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&HashMap::from([("label", filter)]))
            .build();
        self.call("list containers", docker.list_containers(Some(options)))
            .await
            .map_err(|e| e.into_provider(ProviderError::Other))
    }

    async fn remove_labelled(&self, filter: Vec<String>) -> Result<usize, ProviderError> {
        let docker = self.client().await?;
        let mut removed = 0;
        for summary in self.list_labelled(filter).await? {
            let Some(id) = summary.id else { continue };
            self.remove(docker, &id)
                .await
                .map_err(|e| e.into_provider(ProviderError::Other))?;
            removed += 1;
        }
        Ok(removed)
    }
}

/// Why an engine call failed.
#[derive(Debug)]
enum EngineError {
    /// The engine answered with an error status.
    Status(u16, String),
    /// No answer: socket missing, connection refused, deadline passed.
    Unreachable(String),
    /// Anything else (malformed answer...).
    Other(String),
}

impl EngineError {
    fn from_bollard(what: &str, error: bollard::errors::Error) -> Self {
        use bollard::errors::Error as E;
        match error {
            E::DockerResponseServerError {
                status_code,
                message,
            } => EngineError::Status(status_code, format!("docker {what}: {message}")),
            E::RequestTimeoutError
            | E::SocketNotFoundError(_)
            | E::HyperLegacyError { .. }
            | E::HyperResponseError { .. }
            | E::IOError { .. } => {
                EngineError::Unreachable(format!("docker {what}: {}", chain(&error)))
            }
            other => EngineError::Other(format!("docker {what}: {}", chain(&other))),
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            EngineError::Status(status, _) => Some(*status),
            _ => None,
        }
    }

    /// Unreachable engines become [`ProviderError::Unavailable`], other
    /// failures `otherwise(message)`.
    fn into_provider(self, otherwise: fn(String) -> ProviderError) -> ProviderError {
        match self {
            EngineError::Unreachable(message) => ProviderError::Unavailable(message),
            EngineError::Status(_, message) | EngineError::Other(message) => otherwise(message),
        }
    }
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::Status(_, message)
            | EngineError::Unreachable(message)
            | EngineError::Other(message) => f.write_str(message),
        }
    }
}

const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Events remembered to drop the replays that follow a reconnection.
const SEEN_EVENTS: usize = 512;

/// The state of the exit stream: the engine's event stream and where it
/// stands in it.
struct ExitWatcher {
    engine: Arc<Engine>,
    /// Events at or after this time (`seconds.nanoseconds`) are wanted: the
    /// time the stream was made, then that of the last event seen.
    since: String,
    events: Option<BoxStream<'static, Result<EventMessage, bollard::errors::Error>>>,
    /// Recent events (container, action, time) already handled.
    seen: VecDeque<(String, String, i64)>,
    /// Containers with an `oom` event and no `die` yet.
    oom: HashSet<String>,
    backoff: Duration,
    /// An outage was already logged.
    warned: bool,
}

impl ExitWatcher {
    /// The next exit; waits (and reconnects) as long as it takes.
    async fn next_exit(&mut self) -> WorkerExit {
        loop {
            let events = match &mut self.events {
                Some(events) => events,
                None => match connect_events(&self.engine, &self.since).await {
                    Ok(events) => self.events.insert(events),
                    Err(e) => {
                        self.pause(&e.to_string()).await;
                        continue;
                    }
                },
            };
            match events.next().await {
                Some(Ok(event)) => {
                    self.backoff = RECONNECT_MIN;
                    self.warned = false;
                    if let Some(exit) = self.handle(event).await {
                        return exit;
                    }
                }
                Some(Err(e)) => {
                    self.events = None;
                    self.pause(&format!("docker event stream failed: {}", chain(&e)))
                        .await;
                }
                None => {
                    self.events = None;
                    self.pause("docker event stream ended").await;
                }
            }
        }
    }

    async fn pause(&mut self, why: &str) {
        if !self.warned {
            tracing::warn!(provider = %self.engine.config.id, error = why, "docker exits: reconnecting");
            self.warned = true;
        }
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
    }

    async fn handle(&mut self, event: EventMessage) -> Option<WorkerExit> {
        let action = event.action.unwrap_or_default();
        let actor = event.actor.unwrap_or_default();
        let container = actor.id.unwrap_or_default();
        let attributes = actor.attributes.unwrap_or_default();
        if let Some(nanos) = event.time_nano {
            self.since = format!(
                "{}.{:09}",
                nanos.div_euclid(1_000_000_000),
                nanos.rem_euclid(1_000_000_000)
            );
            let key = (container.clone(), action.clone(), nanos);
            if self.seen.contains(&key) {
                return None;
            }
            if self.seen.len() == SEEN_EVENTS {
                self.seen.pop_front();
            }
            self.seen.push_back(key);
        }
        if action == "oom" {
            self.oom.insert(container);
            return None;
        }
        if action != "die" {
            return None;
        }
        let worker: WorkerId = attributes.get(labels::WORKER_ID)?.parse().ok()?;
        let name = attributes
            .get("name")
            .cloned()
            .unwrap_or_else(|| container_name(worker));
        let mut exit_code: Option<i64> = attributes.get("exitCode").and_then(|c| c.parse().ok());
        let mut oom_killed = self.oom.remove(&container);
        let mut memory = None;
        // The container may already be removed (destroy): then the event's
        // attributes are all there is.
        if let Ok(docker) = self.engine.client().await
            && let Ok(inspect) = self
                .engine
                .call(
                    "inspect container",
                    docker.inspect_container(&container, None),
                )
                .await
        {
            if let Some(state) = inspect.state {
                oom_killed |= state.oom_killed.unwrap_or(false);
                exit_code = state.exit_code.or(exit_code);
            }
            memory = inspect
                .host_config
                .and_then(|h| h.memory)
                .filter(|m| *m > 0);
        }
        let mut reason = match exit_code {
            Some(code) => format!("container {name} exited with code {code}"),
            None => format!("container {name} died"),
        };
        if oom_killed {
            match memory {
                Some(bytes) => reason.push_str(&format!(
                    " (out of memory: limit {} MiB)",
                    bytes / (1024 * 1024)
                )),
                None => reason.push_str(" (out of memory)"),
            }
        }
        tracing::info!(%worker, %reason, oom_killed, "docker worker ended");
        Some(WorkerExit {
            worker,
            reason,
            oom_killed,
        })
    }
}

/// Subscribes to the `die` and `oom` events of this server's and
/// provider's containers since `since`.
async fn connect_events(
    engine: &Engine,
    since: &str,
) -> Result<BoxStream<'static, Result<EventMessage, bollard::errors::Error>>, ProviderError> {
    let docker = engine.client().await?.clone();
    let config = &engine.config;
    let filters = HashMap::from([
        ("type".to_owned(), vec!["container".to_owned()]),
        ("event".to_owned(), vec!["die".to_owned(), "oom".to_owned()]),
        (
            "label".to_owned(),
            vec![
                format!("{}=true", labels::MANAGED),
                format!("{}={}", labels::SERVER_ID, config.server_id),
                format!("{}={}", labels::PROVIDER, config.id),
            ],
        ),
    ]);
    let options = EventsOptions {
        since: Some(since.to_owned()),
        until: None,
        filters: Some(filters),
    };
    Ok(events_stream(docker, options))
}

/// The engine's event stream, owning its client.
fn events_stream(
    docker: Docker,
    options: EventsOptions,
) -> BoxStream<'static, Result<EventMessage, bollard::errors::Error>> {
    let stream: std::pin::Pin<Box<dyn Stream<Item = _> + Send>> =
        Box::pin(docker.events(Some(options)));
    // Keep the client alive for as long as the stream.
    futures::stream::unfold((docker, stream), |(docker, mut stream)| async move {
        let item = stream.next().await?;
        Some((item, (docker, stream)))
    })
    .boxed()
}

fn image_not_found(image: &str) -> ProviderError {
    ProviderError::ImageNotFound(format!(
        "{image}: build it with scripts/worker-image or docker build; this engine pulls nothing"
    ))
}

/// Memory limit in bytes and CPU limit in billionths of a CPU.
fn limits(resources: &Resources) -> (Option<i64>, Option<i64>) {
    let memory = resources
        .memory_mb
        .map(|mb| i64::try_from(mb.saturating_mul(1024 * 1024)).unwrap_or(i64::MAX));
    let nano_cpus = resources
        .cpu
        .filter(|cpu| cpu.is_finite() && *cpu > 0.0)
        .map(|cpu| (cpu * 1e9).round() as i64);
    (memory, nano_cpus)
}

fn is_local_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback() || ip.is_unspecified(),
        Err(_) => false,
    }
}

fn unix_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:09}", now.as_secs(), now.subsec_nanos())
}

/// An error with its sources, `a: b: c` (bollard's top-level messages
/// often hide the cause, e.g. "connection refused").
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_rewrites_local_hosts_only() {
        for (given, expected) in [
            (
                "http://127.0.0.1:50051",
                "http://host.docker.internal:50051",
            ),
            (
                "http://localhost:50051/",
                "http://host.docker.internal:50051/",
            ),
            ("http://0.0.0.0:50051", "http://host.docker.internal:50051"),
            ("http://[::1]:50051", "http://host.docker.internal:50051"),
            ("http://[::]:50051", "http://host.docker.internal:50051"),
            ("https://127.0.0.2", "https://host.docker.internal"),
            ("127.0.0.1:50051", "host.docker.internal:50051"),
            (
                "http://u:p@localhost:1/x",
                "http://u:p@host.docker.internal:1/x",
            ),
            ("http://10.0.0.5:50051", "http://10.0.0.5:50051"),
            ("http://hodei.example:50051", "http://hodei.example:50051"),
            ("http://[fe80::1]:50051", "http://[fe80::1]:50051"),
        ] {
            assert_eq!(bridge_server_url(given), expected, "{given}");
        }
    }

    #[test]
    fn limits_are_bytes_and_nano_cpus() {
        let resources = Resources {
            cpu: Some(1.5),
            memory_mb: Some(16),
        };
        assert_eq!(
            limits(&resources),
            (Some(16 * 1024 * 1024), Some(1_500_000_000))
        );
        assert_eq!(limits(&Resources::default()), (None, None));
    }

    #[test]
    fn network_modes_parse() {
        assert_eq!("host".parse::<DockerNetwork>(), Ok(DockerNetwork::Host));
        assert_eq!(
            " Bridge".parse::<DockerNetwork>(),
            Ok(DockerNetwork::Bridge)
        );
        assert!(
            "overlay"
                .parse::<DockerNetwork>()
                .unwrap_err()
                .contains("accepted: host, bridge")
        );
    }

    #[test]
    fn container_body_carries_contract() {
        let mut config = DockerConfig::new("docker", "server-a");
        config.network = DockerNetwork::Bridge;
        config.agent_binary = Some(PathBuf::from("/opt/hodei-worker"));
        config
            .extra_env
            .insert(env::WORKER_TOKEN.to_owned(), "ignored".to_owned());
        config.extra_env.insert("EXTRA".to_owned(), "1".to_owned());
        let provider = DockerProvider::new(config);
        let launch = WorkerLaunch {
            worker: WorkerId::from_u64_pair(1, 2),
            token: "tok".to_owned(),
            server_url: "http://127.0.0.1:50051".to_owned(),
            image: None,
            resources: Resources {
                cpu: Some(0.5),
                memory_mb: Some(64),
            },
            labels: BTreeMap::from([("a".to_owned(), "1".to_owned())]),
            job: None,
            server_id: "server-a".to_owned(),
            capacity: 3,
        };
        let body = provider.container_body(&launch, DEFAULT_IMAGE);
        let env = body.env.unwrap();
        assert!(env.contains(&"HODEI_SERVER_URL=http://host.docker.internal:50051".to_owned()));
        assert!(env.contains(&"HODEI_WORKER_TOKEN=tok".to_owned()));
        assert!(!env.contains(&"HODEI_WORKER_TOKEN=ignored".to_owned()));
        assert!(env.contains(&"EXTRA=1".to_owned()));
        assert!(env.contains(&"HODEI_WORKER_IMAGE=hodei-worker:latest".to_owned()));
        assert!(env.contains(&"HODEI_WORKER_LABELS=a=1".to_owned()));
        assert!(env.contains(&"HODEI_WORKER_CAPACITY=3".to_owned()));
        let labels = body.labels.unwrap();
        assert_eq!(labels[labels::MANAGED], "true");
        assert!(!labels.contains_key(labels::JOB_ID));
        assert_eq!(body.entrypoint, Some(vec![AGENT_MOUNT_PATH.to_owned()]));
        let host = body.host_config.unwrap();
        assert_eq!(host.memory, Some(64 * 1024 * 1024));
        assert_eq!(host.memory_swap, host.memory);
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.network_mode.as_deref(), Some("bridge"));
        assert_eq!(
            host.extra_hosts,
            Some(vec!["host.docker.internal:host-gateway".to_owned()])
        );
        assert_eq!(
            host.binds,
            Some(vec!["/opt/hodei-worker:/hodei/hodei-worker:ro".to_owned()])
        );
    }
}
