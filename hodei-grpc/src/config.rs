//! Server configuration: the `hodei-server` flags, the TOML file given with
//! `--config`, API tokens, and how they combine into a [`ServerConfig`].
//!
//! Precedence, highest first: a command-line flag, its environment
//! variable, the config file, the built-in default.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hodei_core::engine::EngineConfig;
use hodei_core::runtime::RuntimeConfig;
use hodei_core::scheduler::WorkerSelection;
use hodei_core::spec::SpecLimits;
use serde::Deserialize;

/// Errors in the server's configuration. Each says what was wrong and what
/// is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The config file is not valid.
    #[error("invalid config file {path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A value is not acceptable.
    #[error("invalid {field}: {problem}; accepted: {accepted}")]
    Invalid {
        /// Flag, variable or key.
        field: String,
        /// What was wrong.
        problem: String,
        /// What is accepted.
        accepted: String,
    },
}

impl ConfigError {
    fn invalid(field: &str, problem: impl Into<String>, accepted: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.into(),
            problem: problem.into(),
            accepted: accepted.into(),
        }
    }
}

/// Where the control plane keeps its state.
#[derive(Clone)]
#[non_exhaustive]
pub enum StoreBackend {
    /// The embedded in-memory store: nothing survives a restart.
    Memory,
    /// PostgreSQL at this URL (`--database-url`, `HODEI_DATABASE_URL`).
    Postgres {
        /// Connection URL.
        url: String,
    },
    /// Stores composed by an embedder.
    Custom(hodei_core::runtime::Stores),
}

impl fmt::Debug for StoreBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreBackend::Memory => f.write_str("Memory"),
            // The URL may hold a password.
            StoreBackend::Postgres { .. } => f.write_str("Postgres { url: <redacted> }"),
            StoreBackend::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Kinds of worker provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// `hodei-worker` child processes on this host.
    Local,
    /// Docker containers.
    Docker,
    /// Kubernetes pods (not supported by this build).
    Kubernetes,
    /// Agents running as tasks inside the server process (embedding, quick
    /// start; no process isolation).
    Inprocess,
}

impl ProviderKind {
    /// The name used in flags and files.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Docker => "docker",
            ProviderKind::Kubernetes => "kubernetes",
            ProviderKind::Inprocess => "inprocess",
        }
    }
}

impl FromStr for ProviderKind {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "local" => Ok(ProviderKind::Local),
            "docker" => Ok(ProviderKind::Docker),
            "kubernetes" | "k8s" => Ok(ProviderKind::Kubernetes),
            "inprocess" | "in-process" => Ok(ProviderKind::Inprocess),
            other => Err(ConfigError::invalid(
                "provider",
                format!("unknown provider kind {other:?}"),
                "local, docker, kubernetes, inprocess",
            )),
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One configured provider.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSettings {
    /// Its name (jobs select it with `provider`).
    pub name: String,
    /// Its kind.
    pub kind: ProviderKind,
    /// Most workers at once.
    pub max_workers: u32,
    /// Fewest reusable workers kept, whatever the load.
    pub min_workers: u32,
    /// Idle reusable workers kept ready.
    pub warm_pool: u32,
    /// One worker per job, destroyed after it.
    pub ephemeral: bool,
    /// Image of warm-pool workers (docker).
    pub default_image: Option<String>,
    /// Jobs a reusable worker runs at once (its agent's `--capacity`).
    pub worker_capacity: u32,
    /// Kind-specific settings from the file, passed through.
    pub extra: BTreeMap<String, toml::Value>,
}

impl ProviderSettings {
    /// Defaults for a provider of `kind` named after it.
    pub fn new(kind: ProviderKind) -> Self {
        Self {
            name: kind.as_str().into(),
            kind,
            max_workers: 8,
            min_workers: 0,
            warm_pool: 0,
            ephemeral: true,
            default_image: None,
            worker_capacity: 1,
            extra: BTreeMap::new(),
        }
    }
}

/// An API bearer token; the caller's identity (the actor of its events) is
/// the token's name.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// Identity.
    pub name: String,
    /// The bearer token.
    pub token: String,
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Everything `hodei_grpc::server::run` needs besides its listeners.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where state lives.
    pub store: StoreBackend,
    /// Worker providers (at least one is needed to run jobs).
    pub providers: Vec<ProviderSettings>,
    /// The runtime's settings. An empty `server_url` is derived from the
    /// gRPC listener's address.
    pub runtime: RuntimeConfig,
    /// API bearer tokens; empty means no authentication (loopback only,
    /// unless `insecure`).
    pub api_tokens: Vec<ApiToken>,
    /// Allow a non-loopback address without API tokens.
    pub insecure: bool,
    /// The `hodei-worker` binary for the local provider; found next to the
    /// server's executable or on `PATH` when absent.
    pub worker_bin: Option<PathBuf>,
    /// Grace period a drained worker gets to finish its jobs.
    pub drain_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let mut runtime = RuntimeConfig {
            // Empty: derived from the gRPC listener's address.
            server_url: String::new(),
            ..RuntimeConfig::default()
        };
        runtime.engine.replica_id = unique_replica_id(&runtime.server_id);
        Self {
            store: StoreBackend::Memory,
            providers: Vec::new(),
            runtime,
            api_tokens: Vec::new(),
            insecure: false,
            worker_bin: None,
            drain_grace: Duration::from_secs(30),
        }
    }
}

/// A replica id unique to this process: `<server_id>-<host>-<pid>-<random>`.
/// Queue claims and the leases of singleton duties are held under it, so
/// two processes must never share one, even with the same server id (an
/// old and a new process during a restart).
pub fn unique_replica_id(server_id: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!(
        "{server_id}-{host}-{}-{:06x}",
        std::process::id(),
        fastrand::u32(..0x0100_0000)
    )
}

/// The `hodei-server` command line.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(
    name = "hodei-server",
    version,
    about = "Hodei control plane: gRPC API, worker sessions and providers"
)]
pub struct ServerArgs {
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "HODEI_GRPC_ADDR")]
    pub grpc_addr: Option<String>,
    /// HTTP listen address; `off` disables it [default: 127.0.0.1:8080].
    #[arg(long, env = "HODEI_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// PostgreSQL URL; without it the embedded in-memory store is used.
    #[arg(long, env = "HODEI_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Worker provider to enable: local, docker, kubernetes, inprocess
    /// (repeatable; comma-separated in the variable).
    #[arg(long = "provider", env = "HODEI_PROVIDERS", value_delimiter = ',')]
    pub providers: Vec<String>,
    /// TOML configuration file.
    #[arg(long, env = "HODEI_CONFIG")]
    pub config: Option<PathBuf>,
    /// Allow binding a non-loopback address without API tokens.
    #[arg(long)]
    pub insecure: bool,
    /// The hodei-worker binary used by the local provider.
    #[arg(long, env = "HODEI_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
    /// URL workers use to reach this server [default: derived from --grpc-addr].
    #[arg(long, env = "HODEI_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Stable name of this server: labels on the workers it creates, its
    /// local state dir, the leftovers it removes [default: hodei].
    #[arg(long, env = "HODEI_SERVER_ID")]
    pub server_id: Option<String>,
    /// Unique id of this process among replicas sharing a database (queue
    /// claims, leases of singleton duties) [default:
    /// <server-id>-<host>-<pid>-<random>].
    #[arg(long, env = "HODEI_REPLICA_ID")]
    pub replica_id: Option<String>,
}

/// Addresses to bind, resolved from flags and file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindAddrs {
    /// gRPC.
    pub grpc: SocketAddr,
    /// HTTP, unless disabled.
    pub http: Option<SocketAddr>,
}

/// Most jobs one worker may run at once (`worker_capacity`).
pub const MAX_WORKER_CAPACITY: u32 = 256;
/// Default gRPC address.
pub const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:50051";
/// Default HTTP address.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";

impl ServerArgs {
    /// Combines the flags, the config file (if any) and `HODEI_API_TOKENS`
    /// (read from `api_tokens_env`) into addresses and a [`ServerConfig`].
    pub fn resolve(
        &self,
        api_tokens_env: Option<&str>,
    ) -> Result<(BindAddrs, ServerConfig), ConfigError> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let grpc_text = self
            .grpc_addr
            .clone()
            .or(file.grpc_addr.clone())
            .unwrap_or_else(|| DEFAULT_GRPC_ADDR.into());
        let grpc = parse_addr("--grpc-addr", &grpc_text)?;
        let http_text = self
            .http_addr
            .clone()
            .or(file.http_addr.clone())
            .unwrap_or_else(|| DEFAULT_HTTP_ADDR.into());
        let http = match http_text.trim() {
            "" | "off" | "none" | "disabled" => None,
            text => Some(parse_addr("--http-addr", text)?),
        };

        let mut config = file.to_server_config()?;
        if let Some(url) = self.database_url.clone().or(file.database_url.clone())
            && !url.trim().is_empty()
        {
            config.store = StoreBackend::Postgres { url };
        }
        if !self.providers.is_empty() {
            let mut chosen = Vec::new();
            for text in &self.providers {
                let kind: ProviderKind = text.parse()?;
                if chosen.iter().any(|p: &ProviderSettings| p.kind == kind) {
                    continue;
                }
                let from_file = config.providers.iter().find(|p| p.kind == kind).cloned();
                chosen.push(from_file.unwrap_or_else(|| ProviderSettings::new(kind)));
            }
            config.providers = chosen;
        }
        config.insecure |= self.insecure;
        if let Some(bin) = &self.worker_bin {
            config.worker_bin = Some(bin.clone());
        }
        if let Some(url) = &self.advertise_url {
            config.runtime.server_url = url.clone();
        }
        if let Some(id) = &self.server_id {
            check_id("--server-id", id)?;
            config.runtime.server_id = id.clone();
        }
        match (&self.replica_id, &file.replica_id) {
            (Some(id), _) => {
                check_id("--replica-id", id)?;
                config.runtime.engine.replica_id = id.clone();
            }
            (None, Some(_)) => {}
            (None, None) => {
                config.runtime.engine.replica_id = unique_replica_id(&config.runtime.server_id);
            }
        }
        if let Some(text) = api_tokens_env {
            config.api_tokens.extend(parse_api_tokens(text)?);
        }
        check_tokens(&config.api_tokens)?;
        Ok((BindAddrs { grpc, http }, config))
    }
}

/// Parses `HODEI_API_TOKENS`: comma-separated `name:token` pairs, or TOML
/// (`name = "token"` lines, or `[[api_tokens]]` tables; recognised by
/// their quotes).
pub fn parse_api_tokens(text: &str) -> Result<Vec<ApiToken>, ConfigError> {
    let accepted = "comma-separated name:token pairs, or TOML lines name = \"token\"";
    let text = text.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    // TOML needs quoted strings; `name:token` pairs never do (tokens such
    // as base64 may contain `=`, but not quotes).
    if text.contains('"') || text.contains('\'') {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::invalid(
                "HODEI_API_TOKENS",
                format!("not valid TOML ({})", e.message()),
                accepted,
            )
        })?;
        if let Some(list) = table.get("api_tokens") {
            let list: Vec<FileToken> = list.clone().try_into().map_err(|e: toml::de::Error| {
                ConfigError::invalid("HODEI_API_TOKENS", e.message().to_owned(), accepted)
            })?;
            return Ok(list
                .into_iter()
                .map(|t| ApiToken {
                    name: t.name,
                    token: t.token,
                })
                .collect());
        }
        let mut tokens = Vec::new();
        for (name, value) in table {
            let token = value.as_str().ok_or_else(|| {
                ConfigError::invalid(
                    "HODEI_API_TOKENS",
                    format!("the token of {name:?} is not a string"),
                    accepted,
                )
            })?;
            tokens.push(ApiToken {
                name,
                token: token.to_owned(),
            });
        }
        return Ok(tokens);
    }
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (name, token) = pair.split_once(':').ok_or_else(|| {
                ConfigError::invalid("HODEI_API_TOKENS", "an entry has no `:`", accepted)
            })?;
            Ok(ApiToken {
                name: name.trim().to_owned(),
                token: token.trim().to_owned(),
            })
        })
        .collect()
}

/// Server and replica ids end up in labels, file names and leases.
fn check_id(field: &str, id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            field,
            format!("{id:?} is empty, too long or has other characters"),
            "1 to 128 characters among A-Z a-z 0-9 - _ .",
        ))
    }
}

fn check_tokens(tokens: &[ApiToken]) -> Result<(), ConfigError> {
    for t in tokens {
        if t.name.is_empty() || t.name.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(ConfigError::invalid(
                "api token name",
                format!("{:?} is empty or has spaces", t.name),
                "a non-empty name without spaces (it becomes the actor of events)",
            ));
        }
        if t.token.len() < 8 || t.token.chars().any(|c| !c.is_ascii_graphic()) {
            return Err(ConfigError::invalid(
                &format!("api token of {:?}", t.name),
                "is shorter than 8 characters or has spaces or non-ASCII characters",
                "at least 8 printable ASCII characters",
            ));
        }
    }
    Ok(())
}

fn parse_addr(field: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    // Host names such as localhost:50051.
    use std::net::ToSocketAddrs;
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| {
            ConfigError::invalid(
                field,
                format!("{text:?} is not an address"),
                "HOST:PORT such as 127.0.0.1:50051 or 0.0.0.0:50051 (port 0 picks a free port)",
            )
        })
}

// ---------------------------------------------------------------- the file

/// The `--config` TOML file. Every key is optional; see docs/SERVER.md.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// gRPC listen address.
    pub grpc_addr: Option<String>,
    /// HTTP listen address (`off` disables it).
    pub http_addr: Option<String>,
    /// PostgreSQL URL.
    pub database_url: Option<String>,
    /// Allow a non-loopback address without API tokens.
    #[serde(default)]
    pub insecure: bool,
    /// Stable name of this server (worker labels, local state dir,
    /// leftovers it removes).
    pub server_id: Option<String>,
    /// Unique id of this process among replicas (queue claims, leases);
    /// generated per process when absent.
    pub replica_id: Option<String>,
    /// URL workers use to reach this server.
    pub advertise_url: Option<String>,
    /// The hodei-worker binary for the local provider.
    pub worker_bin: Option<PathBuf>,
    /// Grace period of a drained worker.
    #[serde(default, with = "opt_duration")]
    pub drain_grace: Option<Duration>,
    /// API bearer tokens.
    #[serde(default)]
    pub api_tokens: Vec<FileToken>,
    /// Providers.
    #[serde(default)]
    pub providers: Vec<FileProvider>,
    /// Engine timeouts and retry policy.
    #[serde(default)]
    pub engine: FileEngine,
    /// Runtime intervals and retention.
    #[serde(default)]
    pub runtime: FileRuntime,
    /// Job spec limits.
    #[serde(default)]
    pub limits: FileLimits,
}

/// `[[api_tokens]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileToken {
    /// Identity (actor).
    pub name: String,
    /// Bearer token.
    pub token: String,
}

/// `[[providers]]`.
#[derive(Debug, Clone, Deserialize)]
pub struct FileProvider {
    /// Kind: local, docker, kubernetes, inprocess.
    pub kind: String,
    /// Name; defaults to the kind.
    pub name: Option<String>,
    /// Most workers at once (default 8).
    pub max_workers: Option<u32>,
    /// Fewest reusable workers kept, whatever the load (default 0).
    pub min_workers: Option<u32>,
    /// Idle reusable workers kept ready (default 0).
    pub warm_pool: Option<u32>,
    /// One worker per job (default true).
    pub ephemeral: Option<bool>,
    /// Image of warm-pool workers (docker).
    pub default_image: Option<String>,
    /// Jobs a reusable worker runs at once (default 1; needs
    /// `ephemeral = false`).
    pub worker_capacity: Option<u32>,
    /// Kind-specific keys.
    #[serde(flatten)]
    pub extra: BTreeMap<String, toml::Value>,
}

/// `[engine]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEngine {
    /// Deadline of SCHEDULED.
    #[serde(default, with = "opt_duration")]
    pub provision_timeout: Option<Duration>,
    /// Deadline of ASSIGNED.
    #[serde(default, with = "opt_duration")]
    pub dispatch_timeout: Option<Duration>,
    /// Silence after which a worker counts as disconnected.
    #[serde(default, with = "opt_duration")]
    pub heartbeat_timeout: Option<Duration>,
    /// Time a disconnected worker has to come back.
    #[serde(default, with = "opt_duration")]
    pub reconnect_grace: Option<Duration>,
    /// Queue polling interval.
    #[serde(default, with = "opt_duration")]
    pub claim_interval: Option<Duration>,
    /// Lease of a claim on a pending job: how long a job claimed by a
    /// replica that died waits before another may take it.
    #[serde(default, with = "opt_duration")]
    pub claim_lease: Option<Duration>,
    /// Worker selection: first_available, least_loaded, round_robin,
    /// most_capacity, affinity.
    pub selection: Option<WorkerSelection>,
    /// Providers tried first when a spec names none.
    pub provider_preference: Option<Vec<String>>,
    /// Retry backoff after the first failure.
    #[serde(default, with = "opt_duration")]
    pub retry_base: Option<Duration>,
    /// Largest retry backoff.
    #[serde(default, with = "opt_duration")]
    pub retry_cap: Option<Duration>,
    /// Backoff jitter fraction (0..=1).
    pub retry_jitter: Option<f64>,
    /// Retry timed-out attempts.
    pub retry_on_timeout: Option<bool>,
}

/// `[runtime]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRuntime {
    /// Heartbeat interval asked of workers.
    #[serde(default, with = "opt_duration")]
    pub heartbeat_interval: Option<Duration>,
    /// Provider health check interval.
    #[serde(default, with = "opt_duration")]
    pub health_interval: Option<Duration>,
    /// Orphan reconciliation interval.
    #[serde(default, with = "opt_duration")]
    pub reconcile_interval: Option<Duration>,
    /// Events older than this are purged.
    #[serde(default, with = "opt_duration")]
    pub retention: Option<Duration>,
}

/// `[limits]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    /// Timeout of specs that give none.
    pub default_timeout_secs: Option<u64>,
    /// Largest timeout.
    pub max_timeout_secs: Option<u64>,
    /// Largest script in bytes.
    pub max_script_bytes: Option<usize>,
    /// Most argv entries.
    pub max_command_args: Option<usize>,
    /// Most env entries.
    pub max_env: Option<usize>,
    /// Most labels.
    pub max_labels: Option<usize>,
    /// Most secrets.
    pub max_secrets: Option<usize>,
    /// Largest spec in bytes.
    pub max_spec_bytes: Option<usize>,
    /// Longest single value in bytes.
    pub max_value_bytes: Option<usize>,
}

impl FileConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text).map_err(|reason| ConfigError::Parse {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Parses config text.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| e.to_string().trim().to_owned())
    }

    /// The server configuration this file describes (memory store unless
    /// it names a database).
    pub fn to_server_config(&self) -> Result<ServerConfig, ConfigError> {
        let mut config = ServerConfig::default();
        if let Some(url) = &self.database_url {
            config.store = StoreBackend::Postgres { url: url.clone() };
        }
        config.insecure = self.insecure;
        config.worker_bin = self.worker_bin.clone();
        if let Some(g) = self.drain_grace {
            config.drain_grace = g;
        }
        config.api_tokens = self
            .api_tokens
            .iter()
            .map(|t| ApiToken {
                name: t.name.clone(),
                token: t.token.clone(),
            })
            .collect();
        for (i, p) in self.providers.iter().enumerate() {
            let kind: ProviderKind = p.kind.parse().map_err(|_| {
                ConfigError::invalid(
                    &format!("providers[{i}].kind"),
                    format!("unknown provider kind {:?}", p.kind),
                    "local, docker, kubernetes, inprocess",
                )
            })?;
            let mut s = ProviderSettings::new(kind);
            if let Some(n) = &p.name {
                s.name = n.clone();
            }
            if let Some(n) = p.max_workers {
                if n == 0 {
                    return Err(ConfigError::invalid(
                        &format!("providers[{i}].max_workers"),
                        "is 0",
                        "at least 1",
                    ));
                }
                s.max_workers = n;
            }
            if let Some(n) = p.warm_pool {
                // Idle workers count against max_workers: a bigger pool
                // could never be filled.
                if n > s.max_workers {
                    return Err(ConfigError::invalid(
                        &format!("providers[{i}].warm_pool"),
                        format!("is {n}, more than max_workers ({})", s.max_workers),
                        "0 to max_workers",
                    ));
                }
                s.warm_pool = n;
            }
            if let Some(n) = p.min_workers {
                if n > s.max_workers {
                    return Err(ConfigError::invalid(
                        &format!("providers[{i}].min_workers"),
                        format!("is {n}, more than max_workers ({})", s.max_workers),
                        "0 to max_workers",
                    ));
                }
                s.min_workers = n;
            }
            if let Some(e) = p.ephemeral {
                s.ephemeral = e;
            }
            if let Some(n) = p.worker_capacity {
                let field = format!("providers[{i}].worker_capacity");
                if !(1..=MAX_WORKER_CAPACITY).contains(&n) {
                    return Err(ConfigError::invalid(
                        &field,
                        format!("is {n}"),
                        format!("1 to {MAX_WORKER_CAPACITY}"),
                    ));
                }
                // An ephemeral worker exists for one job.
                if n > 1 && s.ephemeral {
                    return Err(ConfigError::invalid(
                        &field,
                        format!("is {n} but the provider is ephemeral (one worker per job)"),
                        "1, or set ephemeral = false for reusable workers",
                    ));
                }
                s.worker_capacity = n;
            }
            s.default_image = p.default_image.clone();
            s.extra = p.extra.clone();
            if config
                .providers
                .iter()
                .any(|q: &ProviderSettings| q.name == s.name)
            {
                return Err(ConfigError::invalid(
                    &format!("providers[{i}].name"),
                    format!("{:?} is used twice", s.name),
                    "unique provider names",
                ));
            }
            config.providers.push(s);
        }

        let rt = &mut config.runtime;
        if let Some(id) = &self.server_id {
            check_id("server_id", id)?;
            rt.server_id = id.clone();
        }
        rt.engine.replica_id = match &self.replica_id {
            Some(id) => {
                check_id("replica_id", id)?;
                id.clone()
            }
            None => unique_replica_id(&rt.server_id),
        };
        if let Some(url) = &self.advertise_url {
            rt.server_url = url.clone();
        }
        apply_engine(&mut rt.engine, &self.engine)?;
        let r = &self.runtime;
        set(&mut rt.heartbeat_interval, r.heartbeat_interval);
        set(&mut rt.health_interval, r.health_interval);
        set(&mut rt.reconcile_interval, r.reconcile_interval);
        if r.retention.is_some() {
            rt.retention = r.retention;
        }
        apply_limits(&mut rt.limits, &self.limits);
        Ok(config)
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

fn apply_engine(e: &mut EngineConfig, f: &FileEngine) -> Result<(), ConfigError> {
    set(&mut e.provision_timeout, f.provision_timeout);
    set(&mut e.dispatch_timeout, f.dispatch_timeout);
    set(&mut e.heartbeat_timeout, f.heartbeat_timeout);
    set(&mut e.reconnect_grace, f.reconnect_grace);
    set(&mut e.claim_interval, f.claim_interval);
    if let Some(lease) = f.claim_lease {
        if lease < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "engine.claim_lease",
                format!("is {lease:?}"),
                "at least 1s",
            ));
        }
        e.claim_lease = lease;
    }
    set(&mut e.selection, f.selection);
    if let Some(p) = &f.provider_preference {
        e.provider_preference = p.iter().map(|s| s.as_str().into()).collect();
    }
    set(&mut e.retry.base, f.retry_base);
    set(&mut e.retry.cap, f.retry_cap);
    if let Some(j) = f.retry_jitter {
        if !(0.0..=1.0).contains(&j) {
            return Err(ConfigError::invalid(
                "engine.retry_jitter",
                format!("is {j}"),
                "a fraction between 0 and 1",
            ));
        }
        e.retry.jitter = j;
    }
    set(&mut e.retry.retry_on_timeout, f.retry_on_timeout);
    Ok(())
}

fn apply_limits(l: &mut SpecLimits, f: &FileLimits) {
    set(&mut l.default_timeout_secs, f.default_timeout_secs);
    set(&mut l.max_timeout_secs, f.max_timeout_secs);
    set(&mut l.max_script_bytes, f.max_script_bytes);
    set(&mut l.max_command_args, f.max_command_args);
    set(&mut l.max_env, f.max_env);
    set(&mut l.max_labels, f.max_labels);
    set(&mut l.max_secrets, f.max_secrets);
    set(&mut l.max_spec_bytes, f.max_spec_bytes);
    set(&mut l.max_value_bytes, f.max_value_bytes);
}

/// Durations in the file: `"30s"`, `"5m"`, `"1h 30m"` (humantime) or a
/// number of seconds.
mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Secs(s)) => Ok(Some(Duration::from_secs(s))),
            Some(Raw::Text(t)) => humantime::parse_duration(&t).map(Some).map_err(|e| {
                serde::de::Error::custom(format!(
                    "{t:?} is not a duration ({e}); accepted: e.g. \"500ms\", \"30s\", \"5m\" or a number of seconds"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_from_pairs_and_toml() {
        let t = parse_api_tokens("ci:abcdefgh, ops:12345678").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            (t[0].name.as_str(), t[0].token.as_str()),
            ("ci", "abcdefgh")
        );
        let t = parse_api_tokens("ci = \"abcdefgh\"\nops = \"12345678\"").unwrap();
        assert_eq!(t.len(), 2);
        let t = parse_api_tokens("[[api_tokens]]\nname = \"ci\"\ntoken = \"abcdefgh\"").unwrap();
        assert_eq!(t[0].name, "ci");
        assert!(parse_api_tokens("nocolon").is_err());
        let t = parse_api_tokens("ci:YWJjZGVmZ2g=").unwrap();
        assert_eq!(t[0].token, "YWJjZGVmZ2g=");
    }

    #[test]
    fn file_config_applies_every_section() {
        let f = FileConfig::parse(
            r#"
            server_id = "s1"
            drain_grace = "5s"
            [[api_tokens]]
            name = "ci"
            token = "abcdefgh"
            [[providers]]
            kind = "local"
            max_workers = 3
            min_workers = 2
            warm_pool = 1
            ephemeral = false
            [engine]
            dispatch_timeout = "2s"
            claim_lease = "5s"
            retry_base = "100ms"
            retry_jitter = 0.0
            [runtime]
            heartbeat_interval = 1
            [limits]
            max_timeout_secs = 60
            "#,
        )
        .unwrap();
        let c = f.to_server_config().unwrap();
        assert_eq!(c.runtime.server_id, "s1");
        assert_eq!(c.drain_grace, Duration::from_secs(5));
        assert_eq!(c.api_tokens[0].name, "ci");
        assert_eq!(c.providers[0].max_workers, 3);
        assert_eq!(c.providers[0].min_workers, 2);
        assert!(!c.providers[0].ephemeral);
        let too_many = FileConfig::parse(
            "[[providers]]\nkind = \"local\"\nmax_workers = 2\nmin_workers = 3\n",
        )
        .unwrap()
        .to_server_config()
        .unwrap_err()
        .to_string();
        assert!(too_many.contains("providers[0].min_workers"), "{too_many}");
        assert!(too_many.contains("more than max_workers (2)"), "{too_many}");
        assert!(too_many.contains("0 to max_workers"), "{too_many}");
        assert_eq!(c.providers[0].warm_pool, 1);
        assert_eq!(c.runtime.engine.dispatch_timeout, Duration::from_secs(2));
        assert_eq!(c.runtime.engine.claim_lease, Duration::from_secs(5));
        assert_eq!(c.runtime.engine.retry.base, Duration::from_millis(100));
        assert_eq!(c.runtime.heartbeat_interval, Duration::from_secs(1));
        assert_eq!(c.runtime.limits.max_timeout_secs, 60);
    }

    #[test]
    fn worker_capacity_is_for_reusable_workers_and_bounded() {
        let parse = |toml: &str| FileConfig::parse(toml).unwrap().to_server_config();
        let c = parse(
            "[[providers]]\nkind = \"local\"\nephemeral = false\nwarm_pool = 2\n\
             worker_capacity = 4\n",
        )
        .unwrap();
        assert_eq!(c.providers[0].worker_capacity, 4);
        assert_eq!(
            parse("[[providers]]\nkind = \"docker\"\n")
                .unwrap()
                .providers[0]
                .worker_capacity,
            1
        );
        // Ephemeral workers exist for one job each.
        let err = parse("[[providers]]\nkind = \"local\"\nworker_capacity = 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("providers[0].worker_capacity"), "{err}");
        assert!(err.contains("the provider is ephemeral"), "{err}");
        assert!(err.contains("set ephemeral = false"), "{err}");
        for n in [0, MAX_WORKER_CAPACITY + 1] {
            let err = parse(&format!(
                "[[providers]]\nkind = \"local\"\nephemeral = false\nworker_capacity = {n}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(&format!("is {n}")), "{err}");
            assert!(err.contains("1 to 256"), "{err}");
        }
    }

    #[test]
    fn a_warm_pool_larger_than_max_workers_is_refused() {
        let refused = |toml: &str| {
            FileConfig::parse(toml)
                .unwrap()
                .to_server_config()
                .unwrap_err()
                .to_string()
        };
        let err = refused(
            "[[providers]]\nkind = \"local\"\nmax_workers = 2\n\n\
             [[providers]]\nkind = \"docker\"\nmax_workers = 2\nwarm_pool = 3\n",
        );
        assert!(err.contains("providers[1].warm_pool"), "{err}");
        assert!(err.contains("is 3, more than max_workers (2)"), "{err}");
        assert!(err.contains("accepted: 0 to max_workers"), "{err}");
        // Without max_workers the default (8) is the bound.
        let err = refused("[[providers]]\nkind = \"local\"\nwarm_pool = 9\n");
        assert!(err.contains("providers[0].warm_pool"), "{err}");
        assert!(err.contains("more than max_workers (8)"), "{err}");
        let c =
            FileConfig::parse("[[providers]]\nkind = \"local\"\nmax_workers = 2\nwarm_pool = 2\n")
                .unwrap()
                .to_server_config()
                .unwrap();
        assert_eq!(c.providers[0].warm_pool, 2);
    }

    #[test]
    fn replica_ids_are_unique_per_process_unless_configured() {
        let c = FileConfig::parse("server_id = \"s1\"")
            .unwrap()
            .to_server_config()
            .unwrap();
        let other = FileConfig::parse("server_id = \"s1\"")
            .unwrap()
            .to_server_config()
            .unwrap();
        let id = &c.runtime.engine.replica_id;
        assert!(id.starts_with("s1-"), "{id}");
        assert!(id.contains(&format!("-{}-", std::process::id())), "{id}");
        assert_ne!(id, &other.runtime.engine.replica_id, "random suffix");
        assert_ne!(
            ServerConfig::default().runtime.engine.replica_id,
            ServerConfig::default().runtime.engine.replica_id
        );
        let c = FileConfig::parse("replica_id = \"r-1\"")
            .unwrap()
            .to_server_config()
            .unwrap();
        assert_eq!(c.runtime.engine.replica_id, "r-1");
        assert_eq!(c.runtime.server_id, "hodei");
        let args = ServerArgs {
            server_id: Some("s2".into()),
            ..Default::default()
        };
        let (_, c) = args.resolve(None).unwrap();
        assert_eq!(c.runtime.server_id, "s2");
        assert!(c.runtime.engine.replica_id.starts_with("s2-"));
        let args = ServerArgs {
            replica_id: Some("bad id".into()),
            ..Default::default()
        };
        let err = args.resolve(None).unwrap_err().to_string();
        assert!(err.contains("--replica-id"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(
            FileConfig::parse("bogus = 1")
                .unwrap_err()
                .contains("bogus")
        );
    }

    #[test]
    fn flags_override_file_and_defaults() {
        let args = ServerArgs {
            grpc_addr: Some("127.0.0.1:0".into()),
            http_addr: Some("off".into()),
            providers: vec!["local".into(), "inprocess".into()],
            ..Default::default()
        };
        let (addrs, config) = args.resolve(Some("a:abcdefgh")).unwrap();
        assert_eq!(addrs.grpc.port(), 0);
        assert_eq!(addrs.http, None);
        assert_eq!(config.providers.len(), 2);
        assert_eq!(config.api_tokens.len(), 1);
        assert!(matches!(config.store, StoreBackend::Memory));
        let bad = ServerArgs {
            providers: vec!["mesos".into()],
            ..Default::default()
        };
        assert!(bad.resolve(None).is_err());
    }
}
