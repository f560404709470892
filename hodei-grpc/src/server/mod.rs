//! The gRPC server: composes a [`ControlPlane`] from a [`ServerConfig`]
//! (stores, providers, runtime settings) and serves, on one listener,
//! the client API (`hodei.v1` Job, Log, Audit, WorkerAdmin, Provider and
//! Secret services, behind bearer-token auth), the worker sessions
//! (`WorkerService`), `grpc.health.v1` and gRPC reflection.
//!
//! [`run`] is what the `hodei-server` binary calls: it parses its flags
//! into a [`ServerConfig`], binds the [`Listeners`] and hands both to
//! `run`, nothing more. [`start`] does the same composition and returns a
//! [`RunningServer`] for tests and embedders. Both use
//! [`ServerOptions::standard`]: the HTTP API of hodei-http on
//! [`Listeners::http`], the PostgreSQL stores of hodei-postgres for
//! [`StoreBackend::Postgres`], and one Prometheus registry that counts the
//! requests of both listeners. [`run_with`] and [`start_with`] take other
//! [`ServerOptions`] for embedders who bring their own.
//!
//! # Shutdown
//! [`RunningServer::stop`] stops accepting connections, ends long-lived
//! API streams (log follow, job watch) with UNAVAILABLE, lets in-flight
//! unary calls finish (up to 10 s), shuts the control plane down (workers
//! are told to drain), then closes worker sessions and waits for the
//! transport to finish.

mod api;
mod auth;
mod metrics;
mod session;

pub use metrics::GrpcMetricsLayer;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hodei_core::engine::ProviderConfig;
use hodei_core::ports::WorkerProvider;
use hodei_core::runtime::{ApiError, ControlPlane, ProviderSetup, Stores};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub use api::Api;
pub use auth::{ANONYMOUS, Auth, CORRELATION_HEADER, ERROR_FIELD_HEADER, is_valid_correlation_id};
pub use session::{GrpcWorkerLink, Sessions};

use crate::config::{
    BindAddrs, ConfigError, ProviderKind, ProviderSettings, ServerConfig, StoreBackend,
};
use crate::inprocess::InProcessProvider;
use crate::proto;

/// Largest gRPC message the server accepts or sends, on every service that
/// carries big messages: job specs (2 MiB of strings by default) in
/// `JobService`, a `RunJob` (spec plus up to 64 secrets of 64 KiB) and the
/// agents' log batches in `WorkerService` (the agent uses the same limit),
/// log chunks and pages in `LogService`, audit pages. Log messages stay far
/// below it: agents cap a batch at [`crate::agent::MAX_LOG_BATCH_BYTES`] and
/// the server caps a follow chunk or a page at [`LOG_MESSAGE_BYTES`].
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

pub use api::LOG_MESSAGE_BYTES;

/// The sockets the server serves on, bound by the caller (port 0 is fine).
#[derive(Debug)]
pub struct Listeners {
    /// gRPC: API, worker sessions, health, reflection.
    pub grpc: TcpListener,
    /// HTTP API, served by the [`HttpServe`] hook when one is installed.
    pub http: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses of a configuration (`hodei-server` does this
    /// with what its flags resolved to).
    pub async fn bind(addrs: &BindAddrs) -> Result<Listeners, ServerError> {
        let bind = |flag: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { flag, addr, source })
        };
        let grpc = bind("--grpc-addr", addrs.grpc).await?;
        let http = match addrs.http {
            Some(addr) => Some(bind("--http-addr", addr).await?),
            None => None,
        };
        Ok(Listeners { grpc, http })
    }
}

/// Serves the HTTP API on a listener until the token is cancelled. The
/// hodei-http crate provides one; [`ServerOptions::http`] installs it.
pub type HttpServe = Arc<
    dyn Fn(TcpListener, ControlPlane, CancellationToken) -> BoxFuture<'static, std::io::Result<()>>
        + Send
        + Sync,
>;

/// Hooks an embedder or a transport crate adds to a [`ServerConfig`].
/// [`ServerOptions::standard`] is what [`run`] and [`start`] use; the
/// default has none (no HTTP API, no PostgreSQL, no request metrics).
#[derive(Clone, Default)]
pub struct ServerOptions {
    /// Serves `Listeners::http`. Without it the HTTP listener is closed
    /// and a warning says so.
    pub http: Option<HttpServe>,
    /// Opens the stores of [`StoreBackend::Postgres`]. Without it a
    /// database URL is refused with [`ServerError::StoreNotConfigured`].
    pub postgres: Option<StoreOpener>,
    /// Registry that counts gRPC requests (shared with the HTTP API's
    /// `/metrics`).
    pub metrics: Option<hodei_http::metrics::Metrics>,
}

impl ServerOptions {
    /// The standard wiring of `hodei-server`, for `config`:
    /// - `http`: the HTTP API of hodei-http (REST `/api/v1`, SSE logs, web
    ///   UI, `/metrics`, `/healthz`, `/readyz`), with the API tokens of
    ///   `config` and a body limit that fits its largest accepted spec;
    /// - `postgres`: opens a [`hodei_postgres::PgStore`] (migrations
    ///   applied) for [`StoreBackend::Postgres`];
    /// - `metrics`: one registry for gRPC and HTTP requests, served by the
    ///   HTTP API at `/metrics`.
    pub fn standard(config: &ServerConfig) -> ServerOptions {
        let metrics = hodei_http::metrics::Metrics::new();
        let http_config = hodei_http::HttpConfig {
            metrics: metrics.clone(),
            api_tokens: config
                .api_tokens
                .iter()
                .map(|t| (t.token.clone(), t.name.clone()))
                .collect(),
            max_body_bytes: hodei_http::body_limit_for_spec(config.runtime.limits.max_spec_bytes),
        };
        ServerOptions {
            http: Some(Arc::new(move |listener, cp, stop| {
                let router = hodei_http::router(cp, http_config.clone());
                Box::pin(async move {
                    hodei_http::serve(listener, router, async move { stop.cancelled().await }).await
                })
            })),
            postgres: Some(Arc::new(|url: String| {
                Box::pin(async move {
                    let store = hodei_postgres::PgStore::connect(
                        &url,
                        hodei_postgres::PgStoreOptions::default(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    Ok(Stores::from_store(Arc::new(store)))
                })
            })),
            metrics: Some(metrics),
        }
    }
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("http", &self.http.is_some())
            .field("postgres", &self.postgres.is_some())
            .field("metrics", &self.metrics.is_some())
            .finish()
    }
}

/// Opens stores from a database URL.
pub type StoreOpener =
    Arc<dyn Fn(String) -> BoxFuture<'static, Result<Stores, String>> + Send + Sync>;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is not acceptable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A database URL was given but no store backend for it is installed.
    #[error(
        "--database-url was given, but no PostgreSQL store backend is configured in this server; \
         run without --database-url (HODEI_DATABASE_URL) to use the embedded in-memory store"
    )]
    StoreNotConfigured,
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(String),
    /// Refused to expose an unauthenticated API.
    #[error(
        "refusing to listen on {addr} (not a loopback address) without API tokens; \
         configure tokens (HODEI_API_TOKENS or [[api_tokens]] in --config) or pass --insecure"
    )]
    Insecure {
        /// The address.
        addr: SocketAddr,
    },
    /// A provider could not be set up.
    #[error("provider {name}: {reason}")]
    Provider {
        /// Provider name.
        name: String,
        /// Why.
        reason: String,
    },
    /// The control plane did not start.
    #[error("control plane: {0}")]
    ControlPlane(#[from] ApiError),
    /// A listener could not be bound.
    #[error("cannot listen on {flag} {addr}: {source}")]
    Bind {
        /// The flag that names the address (`--grpc-addr`, `--http-addr`).
        flag: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Socket errors.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The gRPC transport failed.
    #[error("grpc transport: {0}")]
    Transport(String),
}

/// Starts the server with [`ServerOptions::standard`], prints
/// `hodei-server listening on grpc=ADDR` (and ` http=ADDR` when the HTTP
/// API is served) on stdout once it accepts calls, serves until `shutdown`
/// completes, then stops gracefully (see the module docs).
pub async fn run(
    listeners: Listeners,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let options = ServerOptions::standard(&config);
    run_with(listeners, config, options, shutdown).await
}

/// [`run`] with other hooks than the standard ones.
pub async fn run_with(
    listeners: Listeners,
    config: ServerConfig,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    if matches!(config.store, StoreBackend::Memory) {
        eprintln!(
            "hodei-server: WARNING: no --database-url given: using the embedded in-memory store. \
             Jobs, logs, events, secrets and workers do NOT survive a restart."
        );
    }
    let mut server = start_with(listeners, config, options).await?;
    match server.http_addr() {
        Some(http) => println!(
            "hodei-server listening on grpc={} http={http}",
            server.grpc_addr()
        ),
        None => println!("hodei-server listening on grpc={}", server.grpc_addr()),
    }
    tokio::select! {
        _ = shutdown => {
            tracing::info!("shutdown requested");
            server.stop().await
        }
        r = server.wait_transport() => r,
    }
}

/// A server that accepts calls.
pub struct RunningServer {
    cp: ControlPlane,
    api: Api,
    grpc_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    health: tonic_health::server::HealthReporter,
    stop_accepting: Option<tokio::sync::oneshot::Sender<()>>,
    streams_stop: CancellationToken,
    sessions_stop: CancellationToken,
    http_stop: CancellationToken,
    transport: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    http: Option<JoinHandle<std::io::Result<()>>>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("grpc_addr", &self.grpc_addr)
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

/// Composes the control plane with [`ServerOptions::standard`] and starts
/// serving; returns once calls are accepted.
pub async fn start(
    listeners: Listeners,
    config: ServerConfig,
) -> Result<RunningServer, ServerError> {
    let options = ServerOptions::standard(&config);
    start_with(listeners, config, options).await
}

/// [`start`] with other hooks than the standard ones.
pub async fn start_with(
    listeners: Listeners,
    mut config: ServerConfig,
    options: ServerOptions,
) -> Result<RunningServer, ServerError> {
    let grpc_addr = listeners.grpc.local_addr()?;
    let http_addr = match &listeners.http {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    if config.api_tokens.is_empty() && !config.insecure {
        for addr in std::iter::once(grpc_addr).chain(http_addr) {
            if !addr.ip().is_loopback() {
                return Err(ServerError::Insecure { addr });
            }
        }
    }
    if config.api_tokens.is_empty() {
        tracing::warn!("no API tokens configured: every caller is `{ANONYMOUS}`");
    }
    if config.runtime.server_url.trim().is_empty() {
        config.runtime.server_url = worker_url(grpc_addr);
    }

    let stores = open_stores(&config.store, &options).await?;
    let providers = build_providers(&config)?;
    let cp = ControlPlane::start(config.runtime.clone(), stores, providers).await?;

    let streams_stop = CancellationToken::new();
    let sessions_stop = CancellationToken::new();
    let api = Api::new(cp.clone(), streams_stop.clone());
    let sessions = Sessions::new(cp.clone(), sessions_stop.clone(), config.drain_grace);
    let auth = Auth::new(config.api_tokens.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    for name in SERVICE_NAMES {
        health
            .set_service_status(*name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Transport(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Transport(e.to_string()))?;

    const MAX_MESSAGE: usize = MAX_MESSAGE_SIZE;
    use proto::audit_service_server::AuditServiceServer;
    use proto::job_service_server::JobServiceServer;
    use proto::log_service_server::LogServiceServer;
    use proto::provider_service_server::ProviderServiceServer;
    use proto::secret_service_server::SecretServiceServer;
    use proto::worker_admin_service_server::WorkerAdminServiceServer;
    use proto::worker_service_server::WorkerServiceServer;
    use tonic::service::interceptor::InterceptedService;
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(GrpcMetricsLayer(options.metrics.clone()))
        .add_service(InterceptedService::new(
            JobServiceServer::new(api.clone()).max_decoding_message_size(MAX_MESSAGE),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            LogServiceServer::new(api.clone()).max_encoding_message_size(MAX_MESSAGE),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            AuditServiceServer::new(api.clone()).max_encoding_message_size(MAX_MESSAGE),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            WorkerAdminServiceServer::new(api.clone()),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            ProviderServiceServer::new(api.clone()),
            auth.clone(),
        ))
        .add_service(InterceptedService::new(
            SecretServiceServer::new(api.clone()),
            auth,
        ))
        .add_service(
            WorkerServiceServer::new(sessions)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let incoming = incoming_nodelay(listeners.grpc);
    let transport = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = stop_rx.await;
    }));

    let http_stop = CancellationToken::new();
    let http = match (listeners.http, options.http) {
        (Some(listener), Some(serve)) => {
            Some(tokio::spawn(serve(listener, cp.clone(), http_stop.clone())))
        }
        (Some(listener), None) => {
            tracing::warn!(
                addr = ?listener.local_addr().ok(),
                "the HTTP API is not part of this server build; the HTTP listener is closed"
            );
            None
        }
        (None, _) => None,
    };
    let http_addr = if http.is_some() { http_addr } else { None };

    Ok(RunningServer {
        cp,
        api,
        grpc_addr,
        http_addr,
        health,
        stop_accepting: Some(stop_tx),
        streams_stop,
        sessions_stop,
        http_stop,
        transport: Some(transport),
        http,
    })
}

/// The names of the services reported by `grpc.health.v1`.
pub const SERVICE_NAMES: &[&str] = &[
    "hodei.v1.JobService",
    "hodei.v1.LogService",
    "hodei.v1.AuditService",
    "hodei.v1.WorkerAdminService",
    "hodei.v1.ProviderService",
    "hodei.v1.SecretService",
    "hodei.v1.WorkerService",
];

impl RunningServer {
    /// The gRPC address actually bound.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// The HTTP address, when the HTTP API is served.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The control plane.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.cp
    }

    /// Stops gracefully (see the module docs).
    pub async fn stop(mut self) -> Result<(), ServerError> {
        for name in std::iter::once(&"").chain(SERVICE_NAMES) {
            self.health
                .set_service_status(*name, tonic_health::ServingStatus::NotServing)
                .await;
        }
        if let Some(tx) = self.stop_accepting.take() {
            let _ = tx.send(());
        }
        self.http_stop.cancel();
        self.streams_stop.cancel();
        self.api.wait_idle(Duration::from_secs(10)).await;
        self.cp.shutdown().await;
        self.sessions_stop.cancel();
        if let Some(http) = self.http.take() {
            match tokio::time::timeout(Duration::from_secs(10), http).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "http server failed"),
                Ok(_) => {}
                Err(_) => tracing::warn!("http server did not stop within 10s"),
            }
        }
        if let Some(t) = self.transport.take() {
            let abort = t.abort_handle();
            match tokio::time::timeout(Duration::from_secs(10), t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(ServerError::Transport(e.to_string())),
                Ok(Err(e)) => return Err(ServerError::Transport(e.to_string())),
                Err(_) => {
                    tracing::warn!("connections still open after 10s; closing them");
                    abort.abort();
                }
            }
        }
        tracing::info!("hodei-server stopped");
        Ok(())
    }

    /// Resolves if the transport fails on its own (it normally runs until
    /// [`RunningServer::stop`]).
    async fn wait_transport(&mut self) -> Result<(), ServerError> {
        let Some(t) = self.transport.as_mut() else {
            return futures::future::pending().await;
        };
        let r = t.await;
        self.transport = None;
        self.cp.shutdown().await;
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ServerError::Transport(e.to_string())),
            Err(e) => Err(ServerError::Transport(e.to_string())),
        }
    }
}

/// The accepted connections of `listener`, with `TCP_NODELAY` set.
///
/// `serve_with_incoming*` ignores the builder's `tcp_nodelay`, and with
/// Nagle on, a small message (a `RunJob`, a unary reply) written while the
/// previous segment is unacknowledged waits for the peer's delayed ACK:
/// 40 ms tails on loopback.
fn incoming_nodelay(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use futures::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|stream| {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY on a gRPC connection");
            }
        })
    })
}

/// The URL workers on this host use to reach a gRPC listener on `addr`.
pub fn worker_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Opens the stores of a backend.
pub async fn open_stores(
    backend: &StoreBackend,
    options: &ServerOptions,
) -> Result<Stores, ServerError> {
    match backend {
        StoreBackend::Memory => Ok(Stores::memory()),
        StoreBackend::Custom(stores) => Ok(stores.clone()),
        StoreBackend::Postgres { url } => match &options.postgres {
            Some(open) => open(url.clone()).await.map_err(ServerError::Store),
            None => Err(ServerError::StoreNotConfigured),
        },
    }
}

/// The providers of a configuration, ready for [`ControlPlane::start`].
/// Without any configured, `local` is used (in-process agents if the
/// `hodei-worker` binary cannot be found).
pub fn build_providers(config: &ServerConfig) -> Result<Vec<ProviderSetup>, ServerError> {
    let mut settings = config.providers.clone();
    if settings.is_empty() {
        let mut local = ProviderSettings::new(ProviderKind::Local);
        if agent_binary(config).is_none() {
            tracing::warn!(
                "hodei-worker binary not found (HODEI_WORKER_BIN, next to hodei-server, PATH): \
                 the default `local` provider runs agents inside the server process"
            );
            local.kind = ProviderKind::Inprocess;
        }
        settings.push(local);
    }
    settings.iter().map(|s| build_provider(config, s)).collect()
}

fn agent_binary(config: &ServerConfig) -> Option<std::path::PathBuf> {
    config
        .worker_bin
        .clone()
        .or_else(hodei_providers::local::find_agent_binary)
}

fn build_provider(
    config: &ServerConfig,
    s: &ProviderSettings,
) -> Result<ProviderSetup, ServerError> {
    let fail = |reason: String| ServerError::Provider {
        name: s.name.clone(),
        reason,
    };
    let extra_str = |key: &str| -> Result<Option<String>, ServerError> {
        match s.extra.get(key) {
            None => Ok(None),
            Some(toml::Value::String(v)) => Ok(Some(v.clone())),
            Some(other) => Err(fail(format!("`{key}` must be a string, not {other}"))),
        }
    };
    let extra_duration = |key: &str| -> Result<Option<Duration>, ServerError> {
        match s.extra.get(key) {
            None => Ok(None),
            Some(toml::Value::Integer(n)) if *n >= 0 => Ok(Some(Duration::from_secs(*n as u64))),
            Some(toml::Value::String(t)) => humantime::parse_duration(t)
                .map(Some)
                .map_err(|e| fail(format!("`{key}` {t:?} is not a duration ({e})"))),
            Some(other) => Err(fail(format!(
                "`{key}` must be a duration such as \"5s\", not {other}"
            ))),
        }
    };
    let extra_table = |key: &str, example: &str| -> Result<BTreeMap<String, String>, ServerError> {
        match s.extra.get(key) {
            None => Ok(BTreeMap::new()),
            Some(toml::Value::Table(t)) => t
                .iter()
                .map(|(k, v)| match v {
                    toml::Value::String(v) => Ok((k.clone(), v.clone())),
                    other => Err(fail(format!("`{key}.{k}` must be a string, not {other}"))),
                })
                .collect(),
            Some(other) => Err(fail(format!(
                "`{key}` must be a table of strings such as {example}, not {other}"
            ))),
        }
    };
    // Variables for the agents: names as a shell accepts them.
    let agent_env = || -> Result<BTreeMap<String, String>, ServerError> {
        let env = extra_table("env", "{ HODEI_LOG_BATCH_SIZE = \"500\" }")?;
        if let Some(bad) = env.keys().find(|k| {
            k.is_empty()
                || k.starts_with(|c: char| c.is_ascii_digit())
                || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        }) {
            return Err(fail(format!(
                "`env` name {bad:?} is not a variable name; accepted: letters, digits and `_`, \
                 not starting with a digit"
            )));
        }
        Ok(env)
    };
    let known: &[&str] = match s.kind {
        ProviderKind::Local => &["state_dir", "output", "stop_grace", "env"],
        ProviderKind::Docker => &[
            "image",
            "agent_binary",
            "network",
            "docker_host",
            "stop_grace",
            "call_timeout",
            "labels",
            "env",
        ],
        ProviderKind::Kubernetes | ProviderKind::Inprocess => &[],
    };
    // (kubernetes is refused below, whatever its keys)
    if s.kind != ProviderKind::Kubernetes
        && let Some(key) = s.extra.keys().find(|k| !known.contains(&k.as_str()))
    {
        let accepted = [
            "kind",
            "name",
            "max_workers",
            "min_workers",
            "warm_pool",
            "ephemeral",
            "worker_capacity",
        ]
        .iter()
        .chain(if s.kind == ProviderKind::Docker {
            &["default_image"][..]
        } else {
            &[][..]
        })
        .chain(known)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
        return Err(fail(format!(
            "unknown key `{key}` for a {} provider; accepted: {accepted}",
            s.kind
        )));
    }
    let mut default_image = s.default_image.clone();
    let (provider, runs_images): (Arc<dyn WorkerProvider>, bool) = match s.kind {
        ProviderKind::Local => {
            use hodei_providers::local::{LocalConfig, LocalOutput, LocalProvider};
            let bin = agent_binary(config).ok_or_else(|| {
                fail(
                    "the hodei-worker binary was not found; set HODEI_WORKER_BIN (or --worker-bin), \
                     put it next to hodei-server or on PATH, or use --provider inprocess"
                        .into(),
                )
            })?;
            let mut lc = LocalConfig::new(s.name.as_str(), bin);
            if let Some(dir) = extra_str("state_dir")? {
                lc.state_dir = dir.into();
            } else {
                // One state dir per server: two servers on one host must
                // not adopt (and kill) each other's agents.
                lc.state_dir = hodei_providers::local::default_state_dir(&s.name.as_str().into())
                    .join(&config.runtime.server_id);
            }
            if let Some(out) = extra_str("output")? {
                lc.output = match out.as_str() {
                    "logfile" | "log_file" | "file" => LocalOutput::LogFile,
                    "inherit" => LocalOutput::Inherit,
                    "discard" | "null" => LocalOutput::Discard,
                    other => {
                        return Err(fail(format!(
                            "unknown output {other:?}; accepted: logfile, inherit, discard"
                        )));
                    }
                };
            }
            if let Some(g) = extra_duration("stop_grace")? {
                lc.stop_grace = g;
            }
            lc.extra_env = agent_env()?;
            let p = LocalProvider::new(lc).map_err(|e| fail(e.to_string()))?;
            (Arc::new(p), false)
        }
        ProviderKind::Docker => {
            use hodei_providers::docker::{DockerConfig, DockerProvider};
            let mut dc = DockerConfig::new(s.name.as_str(), config.runtime.server_id.clone());
            if let Some(image) = s.default_image.clone().or(extra_str("image")?) {
                dc.image = image;
            }
            if let Some(bin) = extra_str("agent_binary")? {
                dc.agent_binary = Some(bin.into());
            }
            if let Some(net) = extra_str("network")? {
                dc.network = net.parse().map_err(fail)?;
            }
            if let Some(host) = extra_str("docker_host")? {
                dc.docker_host = Some(host);
            }
            if let Some(g) = extra_duration("stop_grace")? {
                dc.stop_grace = g;
            }
            if let Some(t) = extra_duration("call_timeout")? {
                dc.call_timeout = t;
            }
            dc.extra_labels = extra_table("labels", "{ team = \"ci\" }")?;
            dc.extra_env = agent_env()?;
            // What workers run when a job names no image: shown in the
            // provider's record, used for warm-pool workers.
            default_image = Some(dc.image.clone());
            (Arc::new(DockerProvider::new(dc)), true)
        }
        ProviderKind::Kubernetes => {
            return Err(fail(
                "the kubernetes provider is not supported in this build; accepted: local, docker, inprocess"
                    .into(),
            ));
        }
        ProviderKind::Inprocess => (Arc::new(InProcessProvider::new(s.name.as_str())), false),
    };
    Ok(ProviderSetup {
        config: ProviderConfig {
            min_workers: s.min_workers,
            id: s.name.as_str().into(),
            kind: provider.kind().to_owned(),
            runs_images,
            max_workers: s.max_workers,
            warm_pool: s.warm_pool,
            ephemeral: s.ephemeral,
            default_image,
            worker_capacity: s.worker_capacity,
        },
        provider,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_url_replaces_unspecified_hosts() {
        assert_eq!(
            worker_url("0.0.0.0:5000".parse().unwrap()),
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            worker_url("[::]:5000".parse().unwrap()),
            "http://[::1]:5000"
        );
        assert_eq!(
            worker_url("10.1.2.3:5000".parse().unwrap()),
            "http://10.1.2.3:5000"
        );
    }

    #[tokio::test]
    async fn accepted_grpc_connections_have_nodelay() {
        use futures::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(incoming_nodelay(listener));
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn unknown_provider_keys_are_refused() {
        let mut docker = ProviderSettings::new(ProviderKind::Docker);
        docker
            .extra
            .insert("stop_grase".into(), toml::Value::String("2s".into()));
        let config = ServerConfig {
            providers: vec![docker],
            ..Default::default()
        };
        let err = build_providers(&config).err().unwrap().to_string();
        assert!(err.contains("unknown key `stop_grase`"), "{err}");
        assert!(err.contains("stop_grace"), "{err}");
    }

    #[test]
    fn docker_settings_are_wired() {
        let mut docker = ProviderSettings::new(ProviderKind::Docker);
        let extra: toml::Table = toml::from_str(
            "image = \"img:1\"\ncall_timeout = \"3s\"\nlabels = { team = \"ci\" }\n",
        )
        .unwrap();
        docker.extra = extra.into_iter().collect();
        let config = ServerConfig {
            providers: vec![docker],
            ..Default::default()
        };
        let setups = build_providers(&config).unwrap();
        assert_eq!(setups[0].config.default_image.as_deref(), Some("img:1"));
        assert!(setups[0].config.runs_images);
        let mut bad = ProviderSettings::new(ProviderKind::Docker);
        bad.extra
            .insert("labels".into(), toml::Value::String("team=ci".into()));
        let config = ServerConfig {
            providers: vec![bad],
            ..Default::default()
        };
        let err = build_providers(&config).err().unwrap().to_string();
        assert!(err.contains("`labels` must be a table"), "{err}");
    }

    #[test]
    fn agent_env_is_checked() {
        for (toml_text, expected) in [
            ("env = \"X=1\"", "`env` must be a table of strings"),
            ("env = { X = 1 }", "`env.X` must be a string"),
            ("env = { \"1X\" = \"a\" }", "is not a variable name"),
            ("env = { \"A-B\" = \"a\" }", "is not a variable name"),
        ] {
            for kind in [ProviderKind::Docker, ProviderKind::Local] {
                let mut p = ProviderSettings::new(kind);
                let extra: toml::Table = toml::from_str(toml_text).unwrap();
                p.extra = extra.into_iter().collect();
                let config = ServerConfig {
                    providers: vec![p],
                    worker_bin: Some("/bin/true".into()),
                    ..Default::default()
                };
                let err = build_providers(&config).err().unwrap().to_string();
                assert!(err.contains(expected), "{toml_text}: {err}");
            }
        }
        let mut p = ProviderSettings::new(ProviderKind::Docker);
        let extra: toml::Table =
            toml::from_str("env = { HODEI_LOG_BATCH_SIZE = \"500\" }").unwrap();
        p.extra = extra.into_iter().collect();
        let config = ServerConfig {
            providers: vec![p],
            ..Default::default()
        };
        assert!(build_providers(&config).is_ok());
    }

    #[test]
    fn kubernetes_is_refused_clearly() {
        let config = ServerConfig {
            providers: vec![ProviderSettings::new(ProviderKind::Kubernetes)],
            ..Default::default()
        };
        let err = build_providers(&config).err().unwrap().to_string();
        assert!(err.contains("not supported in this build"), "{err}");
    }

    #[tokio::test]
    async fn a_database_url_without_a_backend_is_refused() {
        let err = open_stores(
            &StoreBackend::Postgres {
                url: "postgres://x".into(),
            },
            &ServerOptions::default(),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, ServerError::StoreNotConfigured));
    }

    #[tokio::test]
    async fn the_standard_options_serve_http_and_open_postgres() {
        let options = ServerOptions::standard(&ServerConfig::default());
        assert!(options.http.is_some() && options.metrics.is_some());
        // A URL that cannot be parsed fails in the PostgreSQL opener
        // itself (no connection attempted): the backend is installed.
        let err = open_stores(
            &StoreBackend::Postgres {
                url: "postgres://localhost:not-a-port/hodei".into(),
            },
            &options,
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, ServerError::Store(_)), "{err}");
    }

    #[tokio::test]
    async fn binding_names_the_flag_of_the_address() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = Listeners::bind(&BindAddrs {
            grpc: "127.0.0.1:0".parse().unwrap(),
            http: Some(addr),
        })
        .await
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.starts_with(&format!("cannot listen on --http-addr {addr}: ")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn non_loopback_without_tokens_is_refused() {
        let grpc = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let err = start(
            Listeners { grpc, http: None },
            ServerConfig {
                providers: vec![ProviderSettings::new(ProviderKind::Inprocess)],
                ..Default::default()
            },
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, ServerError::Insecure { .. }), "{err}");
    }
}
