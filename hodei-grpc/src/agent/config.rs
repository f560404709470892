//! The agent's configuration: [`AgentConfig`] for embedders, [`WorkerArgs`]
//! for the `hodei-worker` binary (flags with environment fallbacks).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use uuid::Uuid;

use super::AgentError;

/// Server address used when none is configured.
pub const DEFAULT_SERVER_URL: &str = "http://127.0.0.1:50051";

/// Heartbeat interval used when neither the configuration nor the server's
/// `Welcome` sets one.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Log lines per batch used when neither the configuration nor the server's
/// `Welcome` sets it.
pub const DEFAULT_LOG_BATCH_SIZE: usize = 100;

/// Longest time a log line waits in a partial batch, used when neither the
/// configuration nor the server's `Welcome` sets it.
pub const DEFAULT_LOG_FLUSH: Duration = Duration::from_millis(250);

/// Everything the agent needs to run.
///
/// Build one with [`AgentConfig::new`] and adjust the public fields, or
/// parse [`WorkerArgs`]. `Debug` never prints the token.
#[derive(Clone)]
#[non_exhaustive]
pub struct AgentConfig {
    /// The server's gRPC address (`http://host:port`).
    pub server_url: String,
    /// This worker's id, kept across reconnects.
    pub worker_id: Uuid,
    /// One-time registration token, sent in the first `Hello` only. Never
    /// passed to jobs: their environment is built from scratch.
    pub token: String,
    /// Provider that created this worker (`local`, `docker`, ...).
    pub provider: String,
    /// Labels announced in `Hello`.
    pub labels: BTreeMap<String, String>,
    /// Image this worker runs in, announced in `Hello`.
    pub image: Option<String>,
    /// Jobs run at the same time; more are refused. At least 1.
    pub capacity: u32,
    /// Most log lines per batch; `None` takes a non-zero `Welcome` value
    /// (hodei-server sends 0), else [`DEFAULT_LOG_BATCH_SIZE`]. A batch is
    /// also cut at [`super::MAX_LOG_BATCH_BYTES`].
    pub log_batch_size: Option<usize>,
    /// Longest wait of the first line of a partial batch; `None` takes a
    /// non-zero `Welcome` value (hodei-server sends 0), else
    /// [`DEFAULT_LOG_FLUSH`].
    pub log_flush: Option<Duration>,
    /// Heartbeat interval; `None` takes the server's `Welcome` value (else
    /// [`DEFAULT_HEARTBEAT_INTERVAL`]).
    pub heartbeat_interval: Option<Duration>,
    /// How long a drain lets running jobs finish before cancelling them.
    pub drain_grace: Duration,
    /// Time between SIGTERM and SIGKILL when a job is stopped (cancel,
    /// timeout, drain). SIGTERM itself goes to the job's process group as
    /// soon as the agent reads a `CancelJob`.
    pub kill_grace: Duration,
    /// First reconnect delay; doubles after each failed attempt.
    pub reconnect_initial: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Limit for opening a session: connecting, `Hello` and `Welcome`.
    pub connect_timeout: Duration,
    /// How long a finished drain keeps trying to deliver buffered messages
    /// (reconnecting if needed) before giving up.
    pub flush_timeout: Duration,
    /// Messages (log batches, results) buffered for the server; when full,
    /// jobs block on their output pipes. At least 1.
    pub outbox_capacity: usize,
    /// Timeout of a job whose spec has none.
    pub default_job_timeout: Duration,
    /// cgroup v2 `memory.events` file used to detect OOM kills; `None`
    /// finds the agent's own cgroup.
    pub memory_events: Option<PathBuf>,
}

impl AgentConfig {
    /// A configuration for `server_url` with the registration `token`, a
    /// fresh worker id and every other setting at its default.
    pub fn new(server_url: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            server_url: server_url.into(),
            worker_id: Uuid::new_v4(),
            token: token.into(),
            provider: "local".to_owned(),
            labels: BTreeMap::new(),
            image: None,
            capacity: 1,
            log_batch_size: None,
            log_flush: None,
            heartbeat_interval: None,
            drain_grace: Duration::from_secs(30),
            kill_grace: super::exec::DEFAULT_KILL_GRACE,
            reconnect_initial: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            flush_timeout: Duration::from_secs(10),
            outbox_capacity: 64,
            default_job_timeout: Duration::from_secs(3600),
            memory_events: None,
        }
    }

    /// Checks the settings that cannot work.
    pub fn validate(&self) -> Result<(), AgentError> {
        let invalid = |message: String| Err(AgentError::InvalidConfig(message));
        if self.token.is_empty() {
            return invalid("worker token is empty: set HODEI_WORKER_TOKEN".to_owned());
        }
        if !(self.server_url.starts_with("http://") || self.server_url.starts_with("https://")) {
            return invalid(format!(
                "server url '{}' is not accepted: expected http://host:port",
                self.server_url
            ));
        }
        if self.capacity == 0 {
            return invalid("capacity is 0: expected at least 1".to_owned());
        }
        if self.log_batch_size == Some(0) {
            return invalid("log batch size is 0: expected at least 1".to_owned());
        }
        if self.outbox_capacity == 0 {
            return invalid("outbox capacity is 0: expected at least 1".to_owned());
        }
        if self.reconnect_initial.is_zero() || self.reconnect_max < self.reconnect_initial {
            return invalid("reconnect delays must satisfy 0 < initial <= max".to_owned());
        }
        Ok(())
    }
}

impl fmt::Debug for AgentConfig {
    /// Prints everything but the token.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("server_url", &self.server_url)
            .field("worker_id", &self.worker_id)
            .field("token", &"<redacted>")
            .field("provider", &self.provider)
            .field("labels", &self.labels)
            .field("image", &self.image)
            .field("capacity", &self.capacity)
            .field("log_batch_size", &self.log_batch_size)
            .field("log_flush", &self.log_flush)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("drain_grace", &self.drain_grace)
            .field("kill_grace", &self.kill_grace)
            .field("reconnect_initial", &self.reconnect_initial)
            .field("reconnect_max", &self.reconnect_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("flush_timeout", &self.flush_timeout)
            .field("outbox_capacity", &self.outbox_capacity)
            .field("default_job_timeout", &self.default_job_timeout)
            .field("memory_events", &self.memory_events)
            .finish()
    }
}

/// Command line of `hodei-worker`; every flag has an environment fallback.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "hodei-worker",
    version,
    about = "Hodei worker agent: registers with the server and runs jobs"
)]
pub struct WorkerArgs {
    /// Server gRPC address.
    #[arg(long = "server", env = "HODEI_SERVER_URL", default_value = DEFAULT_SERVER_URL)]
    pub server: String,
    /// Worker id (a UUID); generated when absent.
    #[arg(long = "worker-id", env = "HODEI_WORKER_ID")]
    pub worker_id: Option<Uuid>,
    /// One-time registration token (prefer the environment variable: flags
    /// are visible to other users of the machine).
    #[arg(long = "token", env = "HODEI_WORKER_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Provider that created this worker.
    #[arg(long = "provider", env = "HODEI_PROVIDER", default_value = "local")]
    pub provider: String,
    /// Labels as `key=value,key=value`.
    #[arg(long = "labels", env = "HODEI_WORKER_LABELS", default_value = "")]
    pub labels: String,
    /// Image this worker runs in.
    #[arg(long = "image", env = "HODEI_WORKER_IMAGE")]
    pub image: Option<String>,
    /// Jobs run at the same time.
    #[arg(long = "capacity", env = "HODEI_WORKER_CAPACITY", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub capacity: u32,
    /// Most log lines per batch [default: 100, or a non-zero value the
    /// server's `Welcome` sends (hodei-server sends none)].
    #[arg(long = "log-batch-size", env = "HODEI_LOG_BATCH_SIZE",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub log_batch_size: Option<u32>,
    /// Longest wait in ms of a partial log batch [default: 250, or a
    /// non-zero value the server's `Welcome` sends (hodei-server sends none)].
    #[arg(long = "log-flush-ms", env = "HODEI_LOG_FLUSH_MS")]
    pub log_flush_ms: Option<u64>,
    /// Heartbeat interval in ms [default: the server's, else 5000].
    #[arg(long = "heartbeat-ms", env = "HODEI_HEARTBEAT_MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_ms: Option<u64>,
    /// Seconds a drain (SIGTERM) lets running jobs finish before cancelling them.
    #[arg(
        long = "drain-grace-secs",
        env = "HODEI_DRAIN_GRACE_SECS",
        default_value_t = 30
    )]
    pub drain_grace_secs: u64,
    /// Seconds between SIGTERM and SIGKILL when a job is stopped.
    #[arg(
        long = "kill-grace-secs",
        env = "HODEI_KILL_GRACE_SECS",
        default_value_t = 5
    )]
    pub kill_grace_secs: u64,
    /// Log batches and results buffered while the server is slow or
    /// unreachable; when full, jobs block on output.
    #[arg(long = "outbox-capacity", env = "HODEI_OUTBOX_CAPACITY", default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub outbox_capacity: u64,
}

impl WorkerArgs {
    /// The agent configuration these arguments describe.
    pub fn into_config(self) -> Result<AgentConfig, AgentError> {
        let mut config = AgentConfig::new(self.server, self.token);
        if let Some(id) = self.worker_id {
            config.worker_id = id;
        }
        config.provider = self.provider;
        config.labels = parse_labels(&self.labels)?;
        config.image = self.image.filter(|image| !image.is_empty());
        config.capacity = self.capacity;
        config.log_batch_size = self.log_batch_size.map(|n| n as usize);
        config.log_flush = self.log_flush_ms.map(Duration::from_millis);
        config.heartbeat_interval = self.heartbeat_ms.map(Duration::from_millis);
        config.drain_grace = Duration::from_secs(self.drain_grace_secs);
        config.kill_grace = Duration::from_secs(self.kill_grace_secs);
        config.outbox_capacity = usize::try_from(self.outbox_capacity).unwrap_or(usize::MAX);
        config.validate()?;
        Ok(config)
    }
}

/// Parses `key=value,key=value` (blank entries ignored, whitespace around
/// keys and values trimmed).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, AgentError> {
    let mut labels = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match entry.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                labels.insert(key.trim().to_owned(), value.trim().to_owned());
            }
            _ => {
                return Err(AgentError::InvalidConfig(format!(
                    "label '{entry}' is not accepted: expected key=value"
                )));
            }
        }
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        let labels = parse_labels(" team=ci , zone = eu-1,,empty=").unwrap();
        assert_eq!(labels.len(), 3);
        assert_eq!(labels["team"], "ci");
        assert_eq!(labels["zone"], "eu-1");
        assert_eq!(labels["empty"], "");
        assert!(parse_labels("").unwrap().is_empty());
        let err = parse_labels("a=1,oops").unwrap_err().to_string();
        assert!(err.contains("'oops'") && err.contains("key=value"), "{err}");
        assert!(parse_labels("=v").is_err());
    }

    #[test]
    fn flags_map_to_config() {
        let id = Uuid::new_v4();
        let args = WorkerArgs::try_parse_from([
            "hodei-worker",
            "--server",
            "http://10.0.0.1:1234",
            "--token",
            "tok",
            "--worker-id",
            &id.to_string(),
            "--labels",
            "a=1,b=2",
            "--capacity",
            "3",
            "--log-batch-size",
            "7",
            "--drain-grace-secs",
            "9",
        ])
        .unwrap();
        let config = args.into_config().unwrap();
        assert_eq!(config.server_url, "http://10.0.0.1:1234");
        assert_eq!(config.worker_id, id);
        assert_eq!(config.capacity, 3);
        assert_eq!(config.log_batch_size, Some(7));
        assert_eq!(config.log_flush, None);
        assert_eq!(config.drain_grace, Duration::from_secs(9));
        assert_eq!(config.labels.len(), 2);
        assert!(!format!("{config:?}").contains("tok\""));
    }

    #[test]
    fn bad_settings_are_rejected() {
        assert!(
            WorkerArgs::try_parse_from(["hodei-worker", "--token", "t", "--capacity", "0"])
                .is_err()
        );
        let mut config = AgentConfig::new("127.0.0.1:50051", "t");
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("http://")
        );
        config.server_url = DEFAULT_SERVER_URL.to_owned();
        config.validate().unwrap();
        config.token.clear();
        assert!(config.validate().is_err());
    }
}
