//! Test support shared by the HTTP tests and the benchmark: a control plane
//! on the in-memory store whose provider starts "agents" as tokio tasks.
//! Each agent speaks the worker protocol through the public `ControlPlane`
//! API (`worker_hello`, `worker_message`) and runs the job as a real
//! process with `tokio::process`, sending its output lines as logs. The
//! gRPC path between agent and server is tested in hodei-grpc; here it is
//! the HTTP edge that is under test.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use hodei_core::engine::{AttemptReport, ProviderConfig};
use hodei_core::ids::{ProviderId, WorkerId};
use hodei_core::ports::{
    LogStream, NewLogLine, ProviderError, ProviderHealth, ProvisionedWorker, RunJob, ToWorker,
    WorkerExit, WorkerLaunch, WorkerLink, WorkerProvider,
};
use hodei_core::runtime::{
    ControlPlane, FromWorker, ProviderSetup, RuntimeConfig, Stores, WorkerHello, now_utc,
};
use hodei_core::spec::Program;
use hodei_http::HttpConfig;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};

/// A provider whose workers are tokio tasks running real processes.
pub struct ProcessProvider {
    id: ProviderId,
    cp: Arc<OnceLock<ControlPlane>>,
    exits_tx: mpsc::UnboundedSender<WorkerExit>,
    exits_rx: std::sync::Mutex<Option<mpsc::UnboundedReceiver<WorkerExit>>>,
}

struct ChanLink(mpsc::UnboundedSender<ToWorker>);

#[async_trait]
impl WorkerLink for ChanLink {
    async fn send(&self, message: ToWorker) -> Result<(), String> {
        self.0.send(message).map_err(|_| "agent gone".to_owned())
    }
}

#[async_trait]
impl WorkerProvider for ProcessProvider {
    fn id(&self) -> &ProviderId {
        &self.id
    }
    fn kind(&self) -> &'static str {
        "local"
    }
    fn runs_images(&self) -> bool {
        false
    }
    async fn create(&self, launch: WorkerLaunch) -> Result<(), ProviderError> {
        let cp = self
            .cp
            .get()
            .cloned()
            .ok_or_else(|| ProviderError::Unavailable("control plane not started".into()))?;
        let exits = self.exits_tx.clone();
        tokio::spawn(async move {
            let worker = launch.worker;
            let reason = agent(cp, launch).await;
            let _ = exits.send(WorkerExit {
                worker,
                reason,
                oom_killed: false,
            });
        });
        Ok(())
    }
    async fn destroy(&self, _worker: WorkerId) -> Result<(), ProviderError> {
        // The agent exits on Shutdown; nothing else to tear down.
        Ok(())
    }
    async fn health(&self) -> ProviderHealth {
        ProviderHealth {
            healthy: true,
            message: "task agents".into(),
        }
    }
    async fn list(&self) -> Result<Vec<ProvisionedWorker>, ProviderError> {
        Ok(Vec::new())
    }
    fn exits(&self) -> BoxStream<'static, WorkerExit> {
        match self.exits_rx.lock().unwrap().take() {
            Some(mut rx) => futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed(),
            None => futures::stream::pending().boxed(),
        }
    }
}

/// The agent: registers, heartbeats, runs one job at a time. Returns why it
/// ended.
async fn agent(cp: ControlPlane, launch: WorkerLaunch) -> String {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let w = launch.worker;
    let hello = WorkerHello {
        worker: w,
        token: launch.token,
        provider: "local".into(),
        labels: launch.labels,
        image: None,
        capacity: 1,
        running: Vec::new(),
    };
    let welcome = match cp.worker_hello(hello, Arc::new(ChanLink(tx))).await {
        Ok(w) => w,
        Err(e) => return format!("registration failed: {e}"),
    };
    let beat_cp = cp.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(welcome.heartbeat_interval).await;
            if beat_cp
                .worker_message(w, FromWorker::Heartbeat)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let reason = loop {
        let Some(msg) = rx.recv().await else {
            break "link closed".to_owned();
        };
        match msg {
            ToWorker::Run(run) => {
                if run_job(&cp, w, *run, &mut rx).await {
                    break "drained".to_owned();
                }
            }
            ToWorker::Drain => {
                let _ = cp.worker_message(w, FromWorker::Draining).await;
                break "drained".to_owned();
            }
            ToWorker::Shutdown => break "shut down".to_owned(),
            ToWorker::Cancel { .. } => {}
        }
    };
    heartbeat.abort();
    cp.worker_gone(w, welcome.session, &reason).await;
    reason
}

/// Runs one attempt; returns whether the agent was asked to drain meanwhile.
async fn run_job(
    cp: &ControlPlane,
    w: WorkerId,
    run: RunJob,
    rx: &mut mpsc::UnboundedReceiver<ToWorker>,
) -> bool {
    let mut drain = false;
    let job = run.job;
    let (id, attempt) = (job.id, job.attempt);
    let argv = match job.spec.program() {
        Program::Command(a) => a.clone(),
        Program::Script(s) => vec!["sh".into(), "-c".into(), s.clone()],
    };
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(job.spec.env())
        .envs(&run.secrets)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = job.spec.working_dir() {
        cmd.current_dir(dir);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = cp
                .worker_message(w, FromWorker::Ack { job: id, attempt })
                .await;
            let report = AttemptReport {
                start_error: Some(format!("could not start {:?}: {e}", argv[0])),
                ..AttemptReport::default()
            };
            let _ = cp
                .worker_message(
                    w,
                    FromWorker::Result {
                        job: id,
                        attempt,
                        report,
                    },
                )
                .await;
            return drain;
        }
    };
    let _ = cp
        .worker_message(w, FromWorker::Ack { job: id, attempt })
        .await;
    let pgid = child.id();
    let (line_tx, mut lines) = mpsc::unbounded_channel();
    let readers = [
        spawn_reader(child.stdout.take(), LogStream::Stdout, line_tx.clone()),
        spawn_reader(child.stderr.take(), LogStream::Stderr, line_tx),
    ];
    let mut seq = 0;
    let mut cancelled = false;
    let mut status = None;
    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some((stream, text)) => {
                    seq += 1;
                    let line = NewLogLine { agent_seq: seq, stream, at: now_utc(), text };
                    let _ = cp.worker_message(w, FromWorker::Logs { job: id, attempt, lines: vec![line] }).await;
                }
                None => break,
            },
            msg = rx.recv() => match msg {
                Some(ToWorker::Cancel { job, .. }) if job == id => { cancelled = true; break; }
                None => { cancelled = true; break; }
                Some(ToWorker::Drain) => {
                    drain = true;
                    let _ = cp.worker_message(w, FromWorker::Draining).await;
                }
                Some(_) => {}
            },
            s = child.wait(), if status.is_none() => status = Some(s),
        }
    }
    if cancelled {
        if let Some(pid) = pgid {
            // The whole group: `sh -c` children hold the pipes open. Not
            // with the `kill` binary: procps-ng 4.0.2 turns `kill -KILL
            // -181` into kill(-1, SIGKILL), i.e. every process.
            if let Some(pgid) = i32::try_from(pid).ok().filter(|p| *p > 1) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        for r in readers {
            r.abort();
        }
        let _ = child.wait().await;
        return drain;
    }
    let status = match status {
        Some(s) => s,
        None => child.wait().await,
    };
    let report = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            AttemptReport {
                exit_code: s.code(),
                signal: s.signal(),
                ..AttemptReport::default()
            }
        }
        Err(e) => AttemptReport {
            start_error: Some(format!("wait failed: {e}")),
            ..AttemptReport::default()
        },
    };
    let _ = cp
        .worker_message(
            w,
            FromWorker::Result {
                job: id,
                attempt,
                report,
            },
        )
        .await;
    drain
}

fn spawn_reader<R>(
    pipe: Option<R>,
    stream: LogStream,
    tx: mpsc::UnboundedSender<(LogStream, String)>,
) -> tokio::task::JoinHandle<()>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let Some(pipe) = pipe else { return };
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send((stream, line)).is_err() {
                return;
            }
        }
    })
}

/// Starts a control plane with one provider `local` of task agents.
pub async fn control_plane() -> ControlPlane {
    control_plane_with(64).await
}

/// The same with at most `max_workers` agents (0: jobs stay queued).
pub async fn control_plane_with(max_workers: u32) -> ControlPlane {
    control_plane_on(Stores::memory(), max_workers).await
}

/// The same on `stores`.
pub async fn control_plane_on(stores: Stores, max_workers: u32) -> ControlPlane {
    let slot = Arc::new(OnceLock::new());
    let (exits_tx, exits_rx) = mpsc::unbounded_channel();
    let provider = Arc::new(ProcessProvider {
        id: ProviderId::new("local"),
        cp: slot.clone(),
        exits_tx,
        exits_rx: std::sync::Mutex::new(Some(exits_rx)),
    });
    let mut config = RuntimeConfig::default();
    config.engine.retry.base = Duration::from_millis(50);
    config.engine.claim_interval = Duration::from_millis(200);
    config.heartbeat_interval = Duration::from_secs(1);
    let cp = ControlPlane::start(
        config,
        stores,
        vec![ProviderSetup {
            config: ProviderConfig::ephemeral("local", "local", false, max_workers),
            provider,
        }],
    )
    .await
    .expect("control plane starts");
    slot.set(cp.clone()).expect("set once");
    cp
}

/// A server on a loopback port, stopped on drop.
pub struct Server {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    /// Its control plane.
    pub cp: ControlPlane,
    /// A client.
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
}

impl Server {
    /// Starts a server with `config` on a fresh control plane.
    pub async fn start(config: HttpConfig) -> Server {
        let cp = control_plane().await;
        Server::start_with(cp, config).await
    }

    /// Starts a server on `cp`.
    pub async fn start_with(cp: ControlPlane, config: HttpConfig) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router = hodei_http::router(cp.clone(), config);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(hodei_http::serve(listener, router, async move {
            let _ = stopped.await;
        }));
        Server {
            base,
            cp,
            http: reqwest::Client::new(),
            stop: Some(stop),
        }
    }

    /// `base + path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (empty for `message`).
    pub event: String,
    /// `id:`.
    pub id: Option<String>,
    /// `data:` lines joined with `\n`.
    pub data: String,
}

/// Reads SSE events from a response body.
pub struct SseReader {
    // reqwest's chunks are `bytes::Bytes`, which axum re-exports.
    body: BoxStream<'static, reqwest::Result<axum::body::Bytes>>,
    buf: String,
}

impl SseReader {
    /// Wraps a response.
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            body: response.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// The next event (comments skipped), or `None` when the stream closed.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            let normalized = self.buf.replace("\r\n", "\n");
            self.buf = normalized;
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent::default();
                let mut data = Vec::new();
                let mut any = false;
                for line in block.lines() {
                    if line.is_empty() || line.starts_with(':') {
                        continue;
                    }
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    any = true;
                    match field {
                        "event" => ev.event = value.to_owned(),
                        "id" => ev.id = Some(value.to_owned()),
                        "data" => data.push(value.to_owned()),
                        _ => {}
                    }
                }
                if !any {
                    continue;
                }
                ev.data = data.join("\n");
                return Some(ev);
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buf.push_str(&String::from_utf8_lossy(chunk.as_ref())),
                _ => return None,
            }
        }
    }

    /// The next event within `secs` seconds; panics on timeout.
    pub async fn next_within(&mut self, secs: u64) -> Option<SseEvent> {
        tokio::time::timeout(Duration::from_secs(secs), self.next())
            .await
            .expect("an SSE event in time")
    }
}

/// Polls `f` until it returns `Some`, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Labels from a map literal.
pub fn tokens(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
