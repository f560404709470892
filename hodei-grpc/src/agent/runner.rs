//! The agent's event loop: one session at a time, jobs, drain.
//!
//! Everything happens in one task around one `select!`: the shutdown
//! trigger, handle commands, finished jobs, the drain deadlines and the link
//! (down and waiting to retry, opening a session, or up). Jobs run in their
//! own tasks and talk to the server only through the outbox, so they keep
//! running, and block once the outbox is full, while the link is down.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::{JoinError, JoinSet};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};
use tracing::{debug, error, info, warn};

use super::config::{
    AgentConfig, DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_LOG_BATCH_SIZE, DEFAULT_LOG_FLUSH,
};
use super::exec::ExecOutcome;
use super::job::{self, JobContext, LogSettings, Slots};
use super::outbox::{AttemptKey, Control, Outbox};
use super::{AgentError, AgentExit};
use crate::proto::worker_service_client::WorkerServiceClient;
use crate::proto::{
    Draining, Heartbeat, Hello, JobAck, JobRefused, RefusalCode, RunJob, ServerMessage, Welcome,
    WorkerMessage, server_message, worker_message,
};

/// Requests from an [`super::AgentHandle`].
#[derive(Debug)]
pub(crate) enum Command {
    /// Drain with this grace (`None`: the configured one).
    Drain(Option<Duration>),
}

/// Runs an agent until it has drained.
pub(crate) async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
    commands: mpsc::UnboundedReceiver<Command>,
) -> Result<AgentExit, AgentError> {
    config.validate()?;
    let endpoint = Endpoint::from_shared(config.server_url.clone())
        .map_err(|e| {
            AgentError::InvalidConfig(format!(
                "server url '{}' is not accepted: {e}",
                config.server_url
            ))
        })?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let memory_events = config
        .memory_events
        .clone()
        .or_else(job::find_memory_events)
        .map(Arc::new);
    info!(
        worker_id = %config.worker_id,
        server = %config.server_url,
        provider = %config.provider,
        capacity = config.capacity,
        oom_detection = memory_events.is_some(),
        "worker agent starting"
    );
    let agent = Agent {
        outbox: Outbox::new(config.outbox_capacity),
        settings: LogSettings::new(
            config.log_batch_size.unwrap_or(DEFAULT_LOG_BATCH_SIZE),
            config.log_flush.unwrap_or(DEFAULT_LOG_FLUSH),
        ),
        memory_events,
        job_dirs: (config.capacity > 1).then(|| Arc::new(job::JobDirs::new())),
        jobs: JoinSet::new(),
        running: HashMap::new(),
        slots: Slots::default(),
        resume_token: None,
        registered: false,
        link: Link::Closed,
        backoff: Backoff::new(config.reconnect_initial, config.reconnect_max),
        drain: None,
        endpoint,
        config,
    };
    let job_dirs = agent.job_dirs.clone();
    let exit = agent.run(shutdown, commands).await;
    if let Some(dirs) = job_dirs {
        // A job still running (an agent ended without draining) keeps its
        // directory, and so the root.
        dirs.remove();
    }
    exit
}

/// HTTP/2 pings that detect a dead connection while nothing is sent.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long closing waits for the server to end the session.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

struct Agent {
    config: AgentConfig,
    endpoint: Endpoint,
    outbox: Arc<Outbox>,
    settings: Arc<LogSettings>,
    memory_events: Option<Arc<PathBuf>>,
    /// The jobs' own directories (workers of capacity > 1, see
    /// [`JobContext::job_dirs`]); removed as the agent ends.
    job_dirs: Option<Arc<job::JobDirs>>,
    /// One task per accepted attempt (plus, rarely, result-only tasks).
    jobs: JoinSet<()>,
    running: HashMap<AttemptKey, Running>,
    /// Slots taken, for the capacity check. A job frees its slot before it
    /// queues its result (the server may send the next job as soon as it
    /// has the result), so this can be below `running.len()` while a
    /// finished job's task winds down.
    slots: Slots,
    /// Token of the last `Welcome`, presented on reconnect.
    resume_token: Option<String>,
    /// A `Welcome` was received at least once.
    registered: bool,
    link: Link,
    backoff: Backoff,
    drain: Option<DrainState>,
}

struct Running {
    cancel: CancellationToken,
    task: tokio::task::Id,
}

struct DrainState {
    reason: &'static str,
    /// When running jobs get cancelled.
    deadline: Instant,
    /// The deadline passed and the jobs were cancelled.
    expired: bool,
    /// A job had to be cancelled, or messages could not be delivered.
    forced: bool,
    /// The server asked for the shutdown: the exit is clean regardless.
    server_shutdown: bool,
}

enum Link {
    /// Waiting to retry.
    Down {
        retry_at: Instant,
    },
    /// Connecting, sending `Hello`, waiting for `Welcome`.
    Opening(Pin<Box<dyn Future<Output = Result<Session, OpenError>> + Send>>),
    Up(Box<Session>),
    /// Not connected and not trying to (before the first attempt, at exit).
    Closed,
}

struct Session {
    control: mpsc::UnboundedSender<Control>,
    inbound: Streaming<ServerMessage>,
    welcome: Welcome,
    heartbeat: Interval,
}

enum LinkEvent {
    RetryDue,
    Opened(Result<Session, OpenError>),
    Inbound(Option<Result<ServerMessage, Status>>),
    Heartbeat,
}

#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("cannot connect: {0}")]
    Connect(#[source] tonic::transport::Error),
    #[error("{0}")]
    Rejected(String),
    #[error("session failed: {0}")]
    Status(Status),
    #[error("the server closed the session before welcoming it")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("no welcome within {0:?}")]
    Timeout(Duration),
}

impl From<Status> for OpenError {
    fn from(status: Status) -> Self {
        if status.code() == Code::Unauthenticated {
            Self::Rejected(status.message().to_owned())
        } else {
            Self::Status(status)
        }
    }
}

impl Agent {
    async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
        mut commands: mpsc::UnboundedReceiver<Command>,
    ) -> Result<AgentExit, AgentError> {
        let mut shutdown = pin!(shutdown);
        let mut shutdown_seen = false;
        let mut commands_open = true;
        self.start_opening();
        loop {
            if let Some(exit) = self.exit_if_done().await {
                return Ok(exit);
            }
            let drain_deadline = self
                .drain
                .as_ref()
                .filter(|d| !d.expired)
                .map(|d| d.deadline);
            let hard_deadline = self.hard_deadline();
            let finishing = self.drain.is_some() && self.jobs.is_empty();
            tokio::select! {
                () = shutdown.as_mut(), if !shutdown_seen => {
                    shutdown_seen = true;
                    self.begin_drain(self.config.drain_grace, "shutdown signal", false);
                }
                command = commands.recv(), if commands_open => match command {
                    Some(Command::Drain(grace)) => {
                        let grace = grace.unwrap_or(self.config.drain_grace);
                        self.begin_drain(grace, "drain requested by the embedder", false);
                    }
                    None => commands_open = false,
                },
                Some(done) = self.jobs.join_next_with_id(), if !self.jobs.is_empty() => {
                    self.job_done(done);
                }
                () = sleep_until_some(drain_deadline) => self.drain_expired(),
                () = sleep_until_some(hard_deadline) => {}
                () = self.outbox.wait_empty(), if finishing => {}
                event = self.link.next_event() => self.handle_link_event(event)?,
            }
        }
    }

    /// The exit, once draining is over; closes the session first.
    async fn exit_if_done(&mut self) -> Option<AgentExit> {
        let hard_deadline = self.hard_deadline()?;
        let drain = self.drain.as_mut()?;
        let pending = self.outbox.len();
        if !(self.jobs.is_empty() && pending == 0) {
            if Instant::now() < hard_deadline {
                return None;
            }
            warn!(
                jobs = self.jobs.len(),
                messages = pending,
                "giving up: could not finish and deliver everything in time"
            );
            drain.forced = true;
        }
        let exit = if drain.forced && !drain.server_shutdown {
            AgentExit::Forced
        } else {
            AgentExit::Clean
        };
        if let Link::Up(session) = std::mem::replace(&mut self.link, Link::Closed) {
            session.close().await;
        }
        self.outbox.end_session();
        // Dropping the set aborts what is left: exec kills the job groups.
        self.jobs.shutdown().await;
        info!(?exit, "worker agent exiting");
        Some(exit)
    }

    /// When a drain gives up on finishing jobs and delivering messages.
    fn hard_deadline(&self) -> Option<Instant> {
        self.drain
            .as_ref()
            .map(|d| d.deadline + self.config.kill_grace + self.config.flush_timeout)
    }

    fn begin_drain(&mut self, grace: Duration, reason: &'static str, server_shutdown: bool) {
        let deadline = Instant::now() + grace;
        match &mut self.drain {
            Some(drain) => {
                if deadline < drain.deadline {
                    info!(reason, ?grace, "drain deadline brought forward");
                    drain.deadline = deadline;
                    drain.expired = false;
                }
                drain.server_shutdown |= server_shutdown;
            }
            None => {
                info!(reason, ?grace, running = self.running.len(), "draining");
                self.drain = Some(DrainState {
                    reason,
                    deadline,
                    expired: false,
                    forced: false,
                    server_shutdown,
                });
                self.send(worker_message::Kind::Draining(Draining {
                    reason: reason.to_owned(),
                }));
            }
        }
    }

    fn drain_expired(&mut self) {
        let Some(drain) = self.drain.as_mut() else {
            return;
        };
        drain.expired = true;
        if !self.running.is_empty() {
            warn!(
                jobs = self.running.len(),
                "drain grace is over: cancelling running jobs"
            );
            drain.forced = true;
            for job in self.running.values() {
                job.cancel.cancel();
            }
        }
    }

    fn job_done(&mut self, done: Result<(tokio::task::Id, ()), JoinError>) {
        let id = match &done {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let Some(key) = self
            .running
            .iter()
            .find(|(_, job)| job.task == id)
            .map(|(key, _)| key.clone())
        else {
            return;
        };
        self.running.remove(&key);
        if let Err(e) = done {
            // The job task died before queueing its result: report one.
            error!(job_id = %key.0, attempt = key.1, error = %e, "job task failed");
            let outcome = ExecOutcome {
                error: Some(format!("agent job task failed: {e}")),
                ..ExecOutcome::default()
            };
            let outbox = Arc::clone(&self.outbox);
            self.jobs.spawn(async move {
                outbox
                    .push(job::result_message(&key, &outcome, false))
                    .await;
            });
        }
    }

    fn handle_link_event(&mut self, event: LinkEvent) -> Result<(), AgentError> {
        match event {
            LinkEvent::RetryDue => self.start_opening(),
            LinkEvent::Opened(Ok(session)) => self.welcomed(Box::new(session)),
            LinkEvent::Opened(Err(OpenError::Rejected(message))) if !self.registered => {
                error!(%message, "registration rejected");
                return Err(AgentError::Rejected(message));
            }
            LinkEvent::Opened(Err(e)) => {
                warn!(error = %e, "could not open a session");
                self.link_down();
            }
            LinkEvent::Inbound(Some(Ok(msg))) => self.handle_server_message(msg),
            LinkEvent::Inbound(Some(Err(status))) => {
                warn!(code = ?status.code(), message = status.message(), "session lost");
                self.link_down();
            }
            LinkEvent::Inbound(None) => {
                warn!("the server closed the session");
                self.link_down();
            }
            LinkEvent::Heartbeat => self.send(worker_message::Kind::Heartbeat(Heartbeat {})),
        }
        Ok(())
    }

    fn start_opening(&mut self) {
        let token = self
            .resume_token
            .clone()
            .unwrap_or_else(|| self.config.token.clone());
        let hello = Hello {
            worker_id: self.config.worker_id.to_string(),
            token,
            provider: self.config.provider.clone(),
            labels: self.config.labels.clone().into_iter().collect(),
            image: self.config.image.clone().unwrap_or_default(),
            capacity: self.config.capacity,
            running: self.outbox.running(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        debug!(
            resuming = self.resume_token.is_some(),
            running = hello.running.len(),
            "opening a session"
        );
        let limit = self.config.connect_timeout;
        let open = open_session(self.endpoint.clone(), hello, Arc::clone(&self.outbox));
        self.link = Link::Opening(Box::pin(async move {
            tokio::time::timeout(limit, open)
                .await
                .unwrap_or(Err(OpenError::Timeout(limit)))
        }));
    }

    fn welcomed(&mut self, mut session: Box<Session>) {
        let welcome = &session.welcome;
        let first = !self.registered;
        self.registered = true;
        if !welcome.resume_token.is_empty() {
            self.resume_token = Some(welcome.resume_token.clone());
        }
        let from_server = |ms: u32| (ms > 0).then(|| Duration::from_millis(u64::from(ms)));
        let heartbeat = self
            .config
            .heartbeat_interval
            .or_else(|| from_server(welcome.heartbeat_interval_ms))
            .unwrap_or(DEFAULT_HEARTBEAT_INTERVAL);
        let batch_size = self
            .config
            .log_batch_size
            .or_else(|| (welcome.log_batch_size > 0).then_some(welcome.log_batch_size as usize))
            .unwrap_or(DEFAULT_LOG_BATCH_SIZE);
        let flush = self
            .config
            .log_flush
            .or_else(|| from_server(welcome.log_flush_ms))
            .unwrap_or(DEFAULT_LOG_FLUSH);
        self.settings.set(batch_size, flush);
        session.heartbeat = heartbeat_interval(heartbeat);
        self.backoff.reset();
        info!(
            worker_id = %self.config.worker_id,
            ?heartbeat,
            batch_size,
            ?flush,
            running = self.running.len(),
            "{}",
            if first { "registered" } else { "reconnected" }
        );
        if let Some(drain) = &self.drain {
            let reason = drain.reason.to_owned();
            let _ = session
                .control
                .send(Control::Send(message(worker_message::Kind::Draining(
                    Draining { reason },
                ))));
        }
        // The receiver lives in the stream tonic holds; if it is gone the
        // session is dead and the inbound side reports it.
        let _ = session.control.send(Control::OpenOutbox);
        self.link = Link::Up(session);
    }

    fn link_down(&mut self) {
        self.outbox.end_session();
        let delay = self.backoff.next_delay();
        info!(?delay, "reconnecting after a delay");
        self.link = Link::Down {
            retry_at: Instant::now() + delay,
        };
    }

    fn handle_server_message(&mut self, msg: ServerMessage) {
        match msg.kind {
            Some(server_message::Kind::Run(run)) => self.accept(run),
            Some(server_message::Kind::Cancel(cancel)) => {
                match self.running.get(&(cancel.job_id.clone(), cancel.attempt)) {
                    Some(job) => {
                        info!(job_id = %cancel.job_id, attempt = cancel.attempt,
                              reason = %cancel.reason, "cancelling job");
                        job.cancel.cancel();
                    }
                    None => debug!(job_id = %cancel.job_id, attempt = cancel.attempt,
                                   "cancel for an attempt not running here ignored"),
                }
            }
            Some(server_message::Kind::Drain(drain)) => {
                let grace = match drain.grace_ms {
                    0 => self.config.drain_grace,
                    ms => Duration::from_millis(u64::from(ms)),
                };
                self.begin_drain(grace, "drain requested by the server", false);
            }
            Some(server_message::Kind::Shutdown(_)) => {
                self.begin_drain(Duration::ZERO, "shutdown requested by the server", true);
            }
            Some(server_message::Kind::ResultAck(ack)) => {
                self.outbox.acked(&(ack.job_id, ack.attempt));
            }
            Some(server_message::Kind::Welcome(_)) => debug!("repeated welcome ignored"),
            None => debug!("empty server message ignored"),
        }
    }

    fn accept(&mut self, run: RunJob) {
        let key: AttemptKey = (run.job_id.clone(), run.attempt);
        if self.running.contains_key(&key) || self.outbox.is_open(&key) {
            // A resent assignment (e.g. after a reconnect): already ours.
            debug!(job_id = %key.0, attempt = key.1, "duplicate assignment acknowledged");
            self.send(ack(&key));
            return;
        }
        let taken = self.slots.taken();
        let refusal = if key.0.is_empty() {
            Some((RefusalCode::Unspecified, "empty job id".to_owned()))
        } else if self.drain.is_some() {
            Some((RefusalCode::Draining, "worker is draining".to_owned()))
        } else if taken >= self.config.capacity as usize {
            Some((
                RefusalCode::AtCapacity,
                format!("worker is at capacity ({taken} running)"),
            ))
        } else {
            None
        };
        if let Some((code, reason)) = refusal {
            info!(job_id = %key.0, attempt = key.1, %reason, "job refused");
            self.send(worker_message::Kind::Refused(JobRefused {
                job_id: key.0,
                attempt: key.1,
                reason,
                code: code as i32,
            }));
            return;
        }
        info!(job_id = %key.0, attempt = key.1, correlation_id = %run.correlation_id, "job accepted");
        self.outbox.open_attempt(key.clone());
        // The ack goes out ahead of any queued message, so before the job's logs.
        self.send(ack(&key));
        let ctx = JobContext {
            outbox: Arc::clone(&self.outbox),
            settings: Arc::clone(&self.settings),
            kill_grace: self.config.kill_grace,
            default_timeout: self.config.default_job_timeout,
            memory_events: self.memory_events.clone(),
            job_dirs: self.job_dirs.clone(),
        };
        let correlation_id = run.correlation_id.clone();
        let req = job::exec_request(run, &ctx);
        let cancel = CancellationToken::new();
        // Taken now, freed by the job right before it queues its result
        // (or when its task ends, whichever comes first).
        let slot = self.slots.take();
        let task = self
            .jobs
            .spawn(job::run_job(
                key.clone(),
                correlation_id,
                req,
                cancel.clone(),
                ctx,
                slot,
            ))
            .id();
        self.running.insert(key, Running { cancel, task });
    }

    /// Sends a session message ahead of the outbox; lost if the link is not
    /// up (reconnect re-syncs through `Hello.running`).
    fn send(&self, kind: worker_message::Kind) {
        if let Link::Up(session) = &self.link {
            let _ = session.control.send(Control::Send(message(kind)));
        }
    }
}

impl Link {
    /// The next thing that happens on the link (never, when closed).
    async fn next_event(&mut self) -> LinkEvent {
        match self {
            Self::Down { retry_at } => {
                tokio::time::sleep_until(*retry_at).await;
                LinkEvent::RetryDue
            }
            Self::Opening(open) => LinkEvent::Opened(open.as_mut().await),
            Self::Up(session) => tokio::select! {
                msg = session.inbound.next() => LinkEvent::Inbound(msg),
                _ = session.heartbeat.tick() => LinkEvent::Heartbeat,
            },
            Self::Closed => std::future::pending().await,
        }
    }
}

impl Session {
    /// Ends the request stream (after the messages already queued for it)
    /// and waits a little for the server to end its side, which tells that
    /// it read everything.
    async fn close(self) {
        let Self {
            control,
            mut inbound,
            ..
        } = self;
        drop(control);
        let drained = tokio::time::timeout(CLOSE_TIMEOUT, async {
            while let Some(Ok(_)) = inbound.next().await {}
        })
        .await;
        if drained.is_err() {
            debug!("the server did not close the session in time");
        }
    }
}

/// Connects, sends `Hello` and waits for `Welcome`.
async fn open_session(
    endpoint: Endpoint,
    hello: Hello,
    outbox: Arc<Outbox>,
) -> Result<Session, OpenError> {
    let channel: Channel = endpoint.connect().await.map_err(OpenError::Connect)?;
    // A `RunJob` carries a spec (2 MiB by default) and up to 64 secrets of
    // 64 KiB: over tonic's default 4 MiB. The server's limit applies both ways.
    let mut client = WorkerServiceClient::new(channel)
        .max_decoding_message_size(crate::server::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(crate::server::MAX_MESSAGE_SIZE);
    let (control, control_rx) = mpsc::unbounded_channel();
    // The receiver is alive: it is right here.
    let _ = control.send(Control::Send(message(worker_message::Kind::Hello(hello))));
    let stream = outbox.session_stream(control_rx);
    let mut inbound = client.session(stream).await?.into_inner();
    match inbound.message().await? {
        Some(ServerMessage {
            kind: Some(server_message::Kind::Welcome(welcome)),
        }) => Ok(Session {
            control,
            inbound,
            welcome,
            heartbeat: heartbeat_interval(DEFAULT_HEARTBEAT_INTERVAL),
        }),
        Some(other) => Err(OpenError::Protocol(format!(
            "expected welcome, got {:?}",
            other.kind.map(|k| kind_name(&k))
        ))),
        None => Err(OpenError::Closed),
    }
}

fn kind_name(kind: &server_message::Kind) -> &'static str {
    match kind {
        server_message::Kind::Welcome(_) => "welcome",
        server_message::Kind::Run(_) => "run",
        server_message::Kind::Cancel(_) => "cancel",
        server_message::Kind::Drain(_) => "drain",
        server_message::Kind::Shutdown(_) => "shutdown",
        server_message::Kind::ResultAck(_) => "result_ack",
    }
}

fn heartbeat_interval(period: Duration) -> Interval {
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    interval
}

fn message(kind: worker_message::Kind) -> WorkerMessage {
    WorkerMessage { kind: Some(kind) }
}

fn ack(key: &AttemptKey) -> worker_message::Kind {
    worker_message::Kind::Ack(JobAck {
        job_id: key.0.clone(),
        attempt: key.1,
    })
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reconnect delays: `initial` doubling up to `max`, each shortened by up
/// to 10 % at random so that many workers do not retry in lockstep.
#[derive(Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay.mul_f64(1.0 - fastrand::f64() * 0.1)
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let delays: Vec<u64> = (0..9)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect();
        let nominal = [1, 2, 4, 8, 16, 32, 60, 60, 60];
        for (delay, nominal) in delays.iter().zip(nominal) {
            let nominal = nominal * 1000;
            assert!(
                *delay <= nominal && *delay >= nominal * 9 / 10,
                "{delays:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(1));
    }
}
