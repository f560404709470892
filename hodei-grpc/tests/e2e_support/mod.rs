//! Shared harness of the end-to-end tests: a real `hodei-server` process
//! (local provider spawning real `hodei-worker` processes), gRPC clients,
//! the `hodei` CLI, and polling helpers with deadlines.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hodei_grpc::proto;
use tonic::transport::Channel;

pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_hodei-server");
pub const WORKER_BIN: &str = env!("CARGO_BIN_EXE_hodei-worker");
pub const CLI_BIN: &str = env!("CARGO_BIN_EXE_hodei");

/// Generous upper bound for anything a test waits for.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Options of a test server.
#[derive(Clone, Default)]
pub struct ServerOpts {
    /// `[[api_tokens]]` (name, token).
    pub tokens: Vec<(String, String)>,
    /// URL workers are told to use (e.g. a proxy in front of the server).
    pub advertise_url: Option<String>,
    /// Extra TOML appended to the config file.
    pub extra_toml: String,
    /// Bind this gRPC address instead of 127.0.0.1:0.
    pub grpc_addr: Option<String>,
}

/// A running `hodei-server` with its own temp dir, killed on drop.
pub struct TestServer {
    pub child: Option<Child>,
    pub addr: String,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub token: Option<String>,
}

impl TestServer {
    pub fn start() -> TestServer {
        Self::start_with(ServerOpts::default())
    }

    pub fn start_with(opts: ServerOpts) -> TestServer {
        let dir = tempfile::Builder::new()
            .prefix("hodei-e2e-")
            .tempdir()
            .expect("temp dir");
        let state = dir.path().join("local");
        let mut toml = format!(
            r#"server_id = "e2e-{id}"
drain_grace = "30s"

[[providers]]
kind = "local"
name = "local"
max_workers = 4
state_dir = "{state}"

[engine]
retry_base = "200ms"
retry_cap = "1s"
retry_jitter = 0.0
heartbeat_timeout = "10s"
reconnect_grace = "20s"
claim_interval = "200ms"

[runtime]
heartbeat_interval = "1s"
health_interval = "2s"
"#,
            id = uuid::Uuid::new_v4().simple(),
            state = state.display()
        );
        for (name, token) in &opts.tokens {
            toml.push_str(&format!(
                "\n[[api_tokens]]\nname = \"{name}\"\ntoken = \"{token}\"\n"
            ));
        }
        if let Some(url) = &opts.advertise_url {
            toml = format!("advertise_url = \"{url}\"\n{toml}");
        }
        toml.push_str(&opts.extra_toml);
        let config = dir.path().join("hodei.toml");
        std::fs::write(&config, toml).expect("write config");
        let (child, addr, _) = spawn_server(
            &config,
            &dir.path().join("server.log"),
            opts.grpc_addr.as_deref().unwrap_or("127.0.0.1:0"),
            false,
        );
        TestServer {
            child: Some(child),
            url: format!("http://{addr}"),
            addr,
            dir,
            token: opts.tokens.first().map(|(_, t)| t.clone()),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("local")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// A fresh path in the temp dir (sentinel files).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The pid of a local worker's agent, from the provider's pid file.
    pub fn agent_pid(&self, worker: &str) -> Option<i32> {
        let text = std::fs::read_to_string(self.state_dir().join(format!("{worker}.pid"))).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("pid="))
            .and_then(|p| p.trim().parse().ok())
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.url, self.token.clone(), None).await
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_cmd(args).output().expect("run hodei")
    }

    pub fn cli_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(CLI_BIN);
        c.args(args)
            .env("HODEI_SERVER", &self.url)
            .env_remove("HODEI_TOKEN")
            .stdin(Stdio::null());
        if let Some(t) = &self.token {
            c.env("HODEI_TOKEN", t);
        }
        c
    }

    /// SIGTERM, then waits for the exit (SIGKILL after 20 s).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        signal(child.id() as i32, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls a child until it exits; panics after `deadline`.
/// Starts the `hodei-server` binary on the config file `config`, its
/// stderr in `log`, gRPC on `grpc_addr`, HTTP on 127.0.0.1:0 when `http`
/// (else off). Returns the process and the gRPC and HTTP addresses it
/// printed (`hodei-server listening on grpc=ADDR [http=ADDR]`); panics
/// with the log if it prints none within [`DEADLINE`]. Its stdout is read
/// for its whole life, so it never fills up.
pub fn spawn_server(
    config: &Path,
    log: &Path,
    grpc_addr: &str,
    http: bool,
) -> (Child, String, Option<String>) {
    let stderr = std::fs::File::create(log).expect("log file");
    let mut child = Command::new(SERVER_BIN)
        .args(["--grpc-addr", grpc_addr, "--http-addr"])
        .arg(if http { "127.0.0.1:0" } else { "off" })
        .arg("--config")
        .arg(config)
        .env("HODEI_WORKER_BIN", WORKER_BIN)
        .env("RUST_LOG", "info")
        .env_remove("HODEI_API_TOKENS")
        .env_remove("HODEI_DATABASE_URL")
        .env_remove("HODEI_PROVIDERS")
        .env_remove("HODEI_CONFIG")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn hodei-server");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addrs) = listening_on(&line) {
                let _ = tx.send(addrs);
            }
        }
    });
    match rx.recv_timeout(DEADLINE) {
        Ok((grpc, http)) => (child, grpc, http),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "hodei-server did not report its address; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

/// The addresses of `hodei-server listening on grpc=ADDR [http=ADDR]`.
fn listening_on(line: &str) -> Option<(String, Option<String>)> {
    let rest = line.strip_prefix("hodei-server listening on ")?;
    let mut grpc = None;
    let mut http = None;
    for word in rest.split_whitespace() {
        if let Some(a) = word.strip_prefix("grpc=") {
            grpc = Some(a.to_owned());
        } else if let Some(a) = word.strip_prefix("http=") {
            http = Some(a.to_owned());
        }
    }
    Some((grpc?, http))
}

pub fn wait_exit(child: &mut Child, what: &str, deadline: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out waiting for {what} to exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
}

pub fn alive(pid: i32) -> bool {
    // A zombie is not alive for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Pids of processes whose environment contains `needle` (e.g. a unique
/// `MARK=...` variable given to a job).
pub fn pids_with_env(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ"))
            && env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes())
            && alive(pid)
        {
            out.push(pid);
        }
    }
    out
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after
/// `deadline` with `what`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- gRPC client

type Svc = tonic::service::interceptor::InterceptedService<Channel, Stamp>;

#[derive(Clone)]
pub struct Stamp {
    token: Option<String>,
    correlation: Option<String>,
}

impl tonic::service::Interceptor for Stamp {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.token {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        if let Some(c) = &self.correlation {
            req.metadata_mut()
                .insert("x-correlation-id", c.parse().unwrap());
        }
        Ok(req)
    }
}

#[derive(Clone)]
pub struct Client {
    pub channel: Channel,
    pub stamp: Stamp,
}

impl Client {
    pub async fn connect(url: &str, token: Option<String>, correlation: Option<String>) -> Client {
        let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
            .expect("connect to hodei-server");
        Client {
            channel,
            stamp: Stamp { token, correlation },
        }
    }

    pub fn with_correlation(&self, c: &str) -> Client {
        let mut me = self.clone();
        me.stamp.correlation = Some(c.to_owned());
        me
    }

    fn svc(&self) -> Svc {
        tonic::service::interceptor::InterceptedService::new(
            self.channel.clone(),
            self.stamp.clone(),
        )
    }

    pub fn jobs(&self) -> proto::job_service_client::JobServiceClient<Svc> {
        proto::job_service_client::JobServiceClient::new(self.svc())
    }

    pub fn logs(&self) -> proto::log_service_client::LogServiceClient<Svc> {
        proto::log_service_client::LogServiceClient::new(self.svc())
            .max_decoding_message_size(64 * 1024 * 1024)
    }

    pub fn audit(&self) -> proto::audit_service_client::AuditServiceClient<Svc> {
        proto::audit_service_client::AuditServiceClient::new(self.svc())
            .max_decoding_message_size(64 * 1024 * 1024)
    }

    pub fn workers(&self) -> proto::worker_admin_service_client::WorkerAdminServiceClient<Svc> {
        proto::worker_admin_service_client::WorkerAdminServiceClient::new(self.svc())
    }

    pub fn secrets(&self) -> proto::secret_service_client::SecretServiceClient<Svc> {
        proto::secret_service_client::SecretServiceClient::new(self.svc())
    }

    pub async fn submit(&self, spec: proto::JobSpec) -> proto::Job {
        self.jobs()
            .submit(proto::SubmitJobRequest { spec: Some(spec) })
            .await
            .expect("submit")
            .into_inner()
            .job
            .unwrap()
    }

    pub async fn job(&self, id: &str) -> proto::Job {
        self.jobs()
            .get(proto::GetJobRequest {
                job_id: id.to_owned(),
            })
            .await
            .expect("get job")
            .into_inner()
            .job
            .unwrap()
    }

    pub async fn events(&self, id: &str) -> Vec<proto::Event> {
        self.jobs()
            .events(proto::JobEventsRequest {
                job_id: id.to_owned(),
            })
            .await
            .expect("job events")
            .into_inner()
            .events
    }

    /// Every event in the audit trail (all pages).
    pub async fn all_events(&self) -> Vec<proto::Event> {
        let mut out = Vec::new();
        loop {
            let page = self
                .audit()
                .query(proto::AuditQueryRequest {
                    limit: 1000,
                    offset: out.len() as u32,
                    ..Default::default()
                })
                .await
                .expect("audit")
                .into_inner();
            if page.events.is_empty() {
                return out;
            }
            out.extend(page.events);
        }
    }

    /// The texts of a job's log lines, in order.
    pub async fn log_texts(&self, id: &str) -> Vec<String> {
        self.logs_of(id).await.into_iter().map(|l| l.text).collect()
    }

    pub async fn logs_of(&self, id: &str) -> Vec<proto::LogLine> {
        let mut out: Vec<proto::LogLine> = Vec::new();
        loop {
            let page = self
                .logs()
                .page(proto::PageLogsRequest {
                    job_id: id.to_owned(),
                    after: out.last().map_or(0, |l| l.seq),
                    limit: 10_000,
                })
                .await
                .expect("logs")
                .into_inner();
            if page.lines.is_empty() {
                return out;
            }
            out.extend(page.lines);
        }
    }

    /// Waits until the job is in one of `states`.
    pub async fn wait_state(&self, id: &str, states: &[proto::JobState]) -> proto::Job {
        let want: Vec<i32> = states.iter().map(|s| *s as i32).collect();
        wait_for(&format!("job {id} in {states:?}"), DEADLINE, || async {
            let j = self.job(id).await;
            want.contains(&j.state).then_some(j)
        })
        .await
    }

    /// Waits until the job is terminal.
    pub async fn wait_terminal(&self, id: &str) -> proto::Job {
        use proto::JobState::*;
        self.wait_state(id, &[Succeeded, Failed, Cancelled, TimedOut])
            .await
    }

    /// The worker running the job (waits for RUNNING).
    pub async fn running_worker(&self, id: &str) -> String {
        let job = self.wait_state(id, &[proto::JobState::Running]).await;
        match job.status.and_then(|s| s.state) {
            Some(proto::job_status::State::Running(r)) => r.worker_id,
            other => panic!("job {id} is not running: {other:?}"),
        }
    }

    /// Waits until an event of `event_type` satisfying `pred` is stored.
    pub async fn wait_event(
        &self,
        event_type: &str,
        pred: impl Fn(&proto::Event) -> bool,
    ) -> proto::Event {
        wait_for(&format!("a {event_type} event"), DEADLINE, || async {
            let page = self
                .audit()
                .query(proto::AuditQueryRequest {
                    event_type: Some(event_type.to_owned()),
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .expect("audit")
                .into_inner();
            page.events.into_iter().find(|e| pred(e))
        })
        .await
    }
}

/// A spec running `sh -c script`.
pub fn sh(script: &str) -> proto::JobSpec {
    proto::JobSpec {
        command: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}

/// A shell fragment that waits until `path` exists, or until its directory
/// is gone (the test that made it is over): a job orphaned by a killed
/// agent must not loop for ever after its test.
pub fn wait_file(path: &Path) -> String {
    let dir = path.parent().unwrap_or(Path::new("/"));
    format!(
        "while [ ! -e '{}' ] && [ -d '{}' ]; do sleep 0.05; done",
        path.display(),
        dir.display()
    )
}

pub fn touch(path: &Path) {
    std::fs::write(path, b"").expect("touch");
}

pub fn payload(e: &proto::Event) -> serde_json::Value {
    serde_json::from_str(&e.payload_json).unwrap_or_default()
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
