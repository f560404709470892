//! The worker agent against a fake server: a `WorkerService` implemented
//! here, real gRPC over loopback. The test drives each session by hand:
//! it sees the `Hello`, decides when to send `Welcome`, and exchanges
//! messages with the agent.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use hodei_grpc::agent::{self, AgentConfig, AgentError, AgentExit, AgentHandle};
use hodei_grpc::proto;
use hodei_grpc::proto::worker_service_server::{WorkerService, WorkerServiceServer};
use hodei_grpc::proto::{
    CancelJob, Hello, JobResult, JobSpec, LogLine, LogStream, ResultAck, RunJob, ServerMessage,
    Shutdown, Welcome, WorkerMessage, server_message, worker_message,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

/// Longest wait for anything the agent should do promptly.
const DEADLINE: Duration = Duration::from_secs(20);

type Outbound = mpsc::UnboundedSender<Result<ServerMessage, Status>>;

/// What the fake server does with the next `Hello`.
#[derive(Clone, Debug)]
enum Policy {
    /// Hand the session to the test, which sends `Welcome` (or not).
    Accept,
    /// Fail the call with UNAUTHENTICATED.
    RejectCall(String),
    /// Answer, then end the stream with UNAUTHENTICATED.
    RejectInStream(String),
}

#[derive(Clone)]
struct FakeServer {
    policy: Arc<Mutex<Policy>>,
    sessions: mpsc::UnboundedSender<FakeSession>,
    hellos: mpsc::UnboundedSender<Hello>,
}

#[tonic::async_trait]
impl WorkerService for FakeServer {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no hello"))?;
        let Some(worker_message::Kind::Hello(hello)) = first.kind else {
            return Err(Status::invalid_argument("the first message must be hello"));
        };
        let _ = self.hellos.send(hello.clone());
        let (outbound, rx) = mpsc::unbounded_channel();
        let policy = self.policy.lock().unwrap().clone();
        match policy {
            Policy::Accept => {
                let _ = self.sessions.send(FakeSession {
                    hello,
                    inbound,
                    outbound,
                });
            }
            Policy::RejectCall(message) => return Err(Status::unauthenticated(message)),
            Policy::RejectInStream(message) => {
                let _ = outbound.send(Err(Status::unauthenticated(message)));
            }
        }
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

/// One session as the fake server sees it. Dropping it ends the session
/// from the server side.
struct FakeSession {
    hello: Hello,
    inbound: Streaming<WorkerMessage>,
    outbound: Outbound,
}

impl FakeSession {
    fn send(&self, kind: server_message::Kind) {
        self.outbound
            .send(Ok(ServerMessage { kind: Some(kind) }))
            .expect("session is open");
    }

    fn welcome(&self, resume_token: &str) {
        self.welcome_with(Welcome {
            resume_token: resume_token.to_owned(),
            heartbeat_interval_ms: 60_000,
            log_batch_size: 0,
            log_flush_ms: 0,
        });
    }

    fn welcome_with(&self, welcome: Welcome) {
        self.send(server_message::Kind::Welcome(welcome));
    }

    /// The next message including heartbeats; `None` when the agent ended
    /// the stream.
    async fn recv_any(&mut self) -> Option<worker_message::Kind> {
        let msg = tokio::time::timeout(DEADLINE, self.inbound.message())
            .await
            .expect("no message from the agent in time")
            .expect("session failed");
        msg.map(|m| m.kind.expect("message without kind"))
    }

    /// The next message that is not a heartbeat.
    async fn recv(&mut self) -> worker_message::Kind {
        loop {
            match self.recv_any().await {
                Some(worker_message::Kind::Heartbeat(_)) => {}
                Some(kind) => return kind,
                None => panic!("the agent ended the session"),
            }
        }
    }

    /// Expects the ack of `job`.
    async fn expect_ack(&mut self, job: &str) {
        match self.recv().await {
            worker_message::Kind::Ack(ack) => assert_eq!(ack.job_id, job),
            other => panic!("expected ack of {job}, got {other:?}"),
        }
    }

    /// Collects `job`'s log batches until its result.
    async fn until_result(&mut self, job: &str) -> JobOutput {
        let mut out = JobOutput::default();
        loop {
            match self.recv().await {
                worker_message::Kind::Logs(batch) => {
                    assert_eq!(batch.job_id, job);
                    assert!(!batch.lines.is_empty(), "empty batch");
                    out.batch_sizes.push(batch.lines.len());
                    out.lines.extend(batch.lines);
                }
                worker_message::Kind::Result(result) => {
                    assert_eq!(result.job_id, job);
                    // As the server does: the agent may forget the result
                    // (an agent already gone cannot take it).
                    let _ = self.outbound.send(Ok(ServerMessage {
                        kind: Some(server_message::Kind::ResultAck(ResultAck {
                            job_id: result.job_id.clone(),
                            attempt: result.attempt,
                        })),
                    }));
                    out.result = result;
                    return out;
                }
                other => panic!("unexpected message while running {job}: {other:?}"),
            }
        }
    }

    /// Collects log lines of `job` until one has the text `text`.
    async fn until_line(&mut self, job: &str, text: &str) -> Vec<LogLine> {
        let mut lines = Vec::new();
        loop {
            match self.recv().await {
                worker_message::Kind::Logs(batch) => {
                    assert_eq!(batch.job_id, job);
                    let found = batch.lines.iter().any(|l| l.text == text);
                    lines.extend(batch.lines);
                    if found {
                        return lines;
                    }
                }
                other => panic!("unexpected message while waiting for {text:?}: {other:?}"),
            }
        }
    }

    /// Waits for the agent to end the stream, skipping heartbeats, then
    /// ends the server side (as a real server does).
    async fn expect_end(mut self) {
        loop {
            match self.recv_any().await {
                None => return,
                Some(worker_message::Kind::Heartbeat(_)) => {}
                Some(other) => panic!("expected the end of the session, got {other:?}"),
            }
        }
    }
}

#[derive(Debug, Default)]
struct JobOutput {
    lines: Vec<LogLine>,
    batch_sizes: Vec<usize>,
    result: JobResult,
}

impl JobOutput {
    fn texts(&self, stream: LogStream) -> Vec<&str> {
        self.lines
            .iter()
            .filter(|l| l.stream == stream as i32)
            .map(|l| l.text.as_str())
            .collect()
    }

    fn assert_contiguous(&self) {
        let seqs: Vec<u64> = self.lines.iter().map(|l| l.seq).collect();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "log sequence is not 1..=n");
    }
}

struct Harness {
    url: String,
    policy: Arc<Mutex<Policy>>,
    sessions: mpsc::UnboundedReceiver<FakeSession>,
    hellos: mpsc::UnboundedReceiver<Hello>,
    dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (sessions_tx, sessions) = mpsc::unbounded_channel();
        let (hellos_tx, hellos) = mpsc::unbounded_channel();
        let policy = Arc::new(Mutex::new(Policy::Accept));
        let server = FakeServer {
            policy: Arc::clone(&policy),
            sessions: sessions_tx,
            hellos: hellos_tx,
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(WorkerServiceServer::new(server))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        Self {
            url,
            policy,
            sessions,
            hellos,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn set_policy(&self, policy: Policy) {
        *self.policy.lock().unwrap() = policy;
    }

    fn config(&self) -> AgentConfig {
        let mut config = AgentConfig::new(self.url.clone(), "provision-token");
        config.reconnect_initial = Duration::from_millis(100);
        config.reconnect_max = Duration::from_millis(500);
        config.kill_grace = Duration::from_secs(1);
        config
    }

    /// The next session, not yet welcomed.
    async fn next_session(&mut self) -> FakeSession {
        tokio::time::timeout(DEADLINE, self.sessions.recv())
            .await
            .expect("the agent did not open a session in time")
            .expect("server gone")
    }

    /// The next session, welcomed with `resume_token`.
    async fn welcomed_session(&mut self, resume_token: &str) -> FakeSession {
        let session = self.next_session().await;
        session.welcome(resume_token);
        session
    }

    /// A file path in this test's directory; `touch`ed by tests to let a
    /// waiting job go on.
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_str().unwrap().to_owned()
    }
}

fn sh(job: &str, script: &str) -> server_message::Kind {
    run(
        job,
        JobSpec {
            command: vec!["sh".into(), "-c".into(), script.into()],
            ..JobSpec::default()
        },
        HashMap::new(),
    )
}

fn run(job: &str, spec: JobSpec, secrets: HashMap<String, String>) -> server_message::Kind {
    server_message::Kind::Run(RunJob {
        job_id: job.to_owned(),
        attempt: 1,
        spec: Some(spec),
        secrets,
        correlation_id: format!("corr-{job}"),
    })
}

/// A script that prints `before`, waits for the file `flag` (or for its
/// directory to go with the test), prints `after`.
fn wait_for_flag(before: &str, flag: &str, after: &str) -> String {
    format!(
        "echo {before}; while [ ! -e {flag} ] && [ -d $(dirname {flag}) ]; do sleep 0.02; done; echo {after}"
    )
}

fn touch(path: &str) {
    std::fs::write(path, b"").unwrap();
}

/// Reads until the agent ends the session (skipping whatever comes), ends
/// the server side and returns the agent's exit.
async fn close_and_wait(mut session: FakeSession, handle: &mut AgentHandle) -> AgentExit {
    while session.recv_any().await.is_some() {}
    drop(session);
    wait_exit(handle).await.unwrap()
}

async fn wait_exit(handle: &mut AgentHandle) -> Result<AgentExit, AgentError> {
    tokio::time::timeout(DEADLINE, handle.wait())
        .await
        .expect("the agent did not exit in time")
}

#[tokio::test]
async fn registers_with_hello_then_heartbeats_and_unregisters_on_drain() {
    let mut h = Harness::start().await;
    let mut config = h.config();
    config.provider = "docker".into();
    config.labels = [("team".to_owned(), "ci".to_owned())].into();
    config.image = Some("hodei-test-busybox".into());
    config.capacity = 2;
    let worker_id = config.worker_id;
    let mut handle = agent::spawn(config);
    assert_eq!(handle.worker_id(), worker_id);

    let mut session = h.next_session().await;
    let hello = &session.hello;
    assert_eq!(hello.worker_id, worker_id.to_string());
    assert_eq!(hello.token, "provision-token");
    assert_eq!(hello.provider, "docker");
    assert_eq!(hello.labels.get("team").map(String::as_str), Some("ci"));
    assert_eq!(hello.image, "hodei-test-busybox");
    assert_eq!(hello.capacity, 2);
    assert!(hello.running.is_empty());
    assert!(!hello.agent_version.is_empty());

    session.welcome_with(Welcome {
        resume_token: "resume-1".into(),
        heartbeat_interval_ms: 50,
        log_batch_size: 0,
        log_flush_ms: 0,
    });
    for _ in 0..2 {
        match session.recv_any().await {
            Some(worker_message::Kind::Heartbeat(_)) => {}
            other => panic!("expected a heartbeat, got {other:?}"),
        }
    }

    handle.drain();
    match session.recv().await {
        worker_message::Kind::Draining(d) => assert!(!d.reason.is_empty()),
        other => panic!("expected draining, got {other:?}"),
    }
    session.expect_end().await;
    assert_eq!(wait_exit(&mut handle).await.unwrap(), AgentExit::Clean);
}

#[tokio::test]
async fn rejected_first_registration_is_fatal() {
    let mut h = Harness::start().await;
    h.set_policy(Policy::RejectCall("unknown token".into()));
    let started = Instant::now();
    let err = tokio::time::timeout(DEADLINE, agent::run(h.config(), std::future::pending()))
        .await
        .expect("agent kept running")
        .unwrap_err();
    assert!(matches!(err, AgentError::Rejected(_)), "{err:?}");
    assert_eq!(err.to_string(), "registration rejected: unknown token");
    assert_eq!(err.exit_code(), 2);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(h.hellos.recv().await.unwrap().token, "provision-token");

    // The same when the stream is answered and then ends with UNAUTHENTICATED.
    h.set_policy(Policy::RejectInStream("token expired".into()));
    let err = tokio::time::timeout(DEADLINE, agent::run(h.config(), std::future::pending()))
        .await
        .expect("agent kept running")
        .unwrap_err();
    assert_eq!(err.to_string(), "registration rejected: token expired");
}

#[tokio::test]
async fn runs_a_job_with_ordered_logs_and_its_exit_code() {
    let mut h = Harness::start().await;
    let mut handle = agent::spawn(h.config());
    let mut session = h.welcomed_session("r1").await;

    session.send(sh(
        "job-1",
        "echo out1; echo err1 >&2; echo out2; echo err2 >&2; echo \"id=$HODEI_JOB_ID\"; exit 3",
    ));
    session.expect_ack("job-1").await;
    let out = session.until_result("job-1").await;
    out.assert_contiguous();
    assert_eq!(out.texts(LogStream::Stdout), ["out1", "out2", "id=job-1"]);
    assert_eq!(out.texts(LogStream::Stderr), ["err1", "err2"]);
    assert!(out.lines.iter().all(|l| l.attempt == 1 && l.at.is_some()));
    assert_eq!(out.result.exit_code, Some(3));
    assert_eq!(out.result.signal, None);
    assert!(!out.result.cancelled && !out.result.timed_out && !out.result.oom_killed);
    assert_eq!(out.result.start_error, "");

    // A job that cannot start is acknowledged and reported with the reason.
    session.send(run(
        "job-2",
        JobSpec {
            command: vec!["hodei-no-such-command".into()],
            ..JobSpec::default()
        },
        HashMap::new(),
    ));
    session.expect_ack("job-2").await;
    let out = session.until_result("job-2").await;
    assert_eq!(
        out.result.start_error,
        "command not found: hodei-no-such-command"
    );
    assert_eq!(out.result.exit_code, None);

    handle.kill();
    assert_eq!(close_and_wait(session, &mut handle).await, AgentExit::Clean);
}

/// Nanoseconds since the epoch in a file a job wrote with `date +%s%N`.
fn read_stamp(path: &str) -> Option<u128> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// "A cancel takes effect within 1 s": SIGTERM reaches the job's whole
/// process group within 1 s of the request reaching the agent (measured
/// from before the server sent it, by the job's own traps), and whatever
/// ignores it is SIGKILLed after the kill grace.
#[tokio::test]
async fn cancel_takes_effect_promptly() {
    let mut h = Harness::start().await;
    let mut handle = agent::spawn(h.config());
    let mut session = h.welcomed_session("r1").await;

    // The shell and a background member of its group stamp the time SIGTERM
    // reaches them, and keep running.
    let (leader, member) = (h.path("leader-term"), h.path("member-term"));
    session.send(sh(
        "job-1",
        &format!(
            "sh -c 'trap \"date +%s%N > {member}\" TERM; echo member-ready; \
             while :; do sleep 0.05; done' &
             trap 'date +%s%N > {leader}' TERM
             echo leader-ready
             while :; do sleep 0.05; done"
        ),
    ));
    session.expect_ack("job-1").await;
    let mut ready = Vec::new();
    while ready.len() < 2 {
        match session.recv().await {
            worker_message::Kind::Logs(batch) => {
                ready.extend(batch.lines.into_iter().map(|l| l.text));
            }
            other => panic!("unexpected message: {other:?}"),
        }
    }
    ready.sort();
    assert_eq!(ready, ["leader-ready", "member-ready"]);
    // Unknown attempts are ignored.
    for (job, attempt) in [("nope", 1), ("job-1", 7)] {
        session.send(server_message::Kind::Cancel(CancelJob {
            job_id: job.into(),
            attempt,
            reason: "test".into(),
        }));
    }
    let requested = now_ns();
    session.send(server_message::Kind::Cancel(CancelJob {
        job_id: "job-1".into(),
        attempt: 1,
        reason: "user request".into(),
    }));
    let out = session.until_result("job-1").await;
    assert!(out.result.cancelled, "{:?}", out.result);
    assert!(!out.result.timed_out);
    // The shell survived SIGTERM: SIGKILL after the grace ended it.
    assert_eq!(out.result.signal, Some(libc::SIGKILL));
    for (what, path) in [("job shell", &leader), ("group member", &member)] {
        let at = read_stamp(path).unwrap_or_else(|| panic!("the {what} never got SIGTERM"));
        assert!(at >= requested, "{what}: SIGTERM before the cancel?");
        let after_ms = (at - requested) / 1_000_000;
        assert!(
            after_ms < 1000,
            "{what} got SIGTERM {after_ms} ms after the cancel"
        );
    }

    // A job that does not trap SIGTERM dies of it.
    session.send(sh("job-2", "echo started; sleep 1000"));
    session.expect_ack("job-2").await;
    session.until_line("job-2", "started").await;
    session.send(server_message::Kind::Cancel(CancelJob {
        job_id: "job-2".into(),
        attempt: 1,
        reason: "user request".into(),
    }));
    let out = session.until_result("job-2").await;
    assert!(out.result.cancelled, "{:?}", out.result);
    assert_eq!(out.result.signal, Some(libc::SIGTERM));

    handle.kill();
    assert_eq!(close_and_wait(session, &mut handle).await, AgentExit::Clean);
}

/// Regression: batches were cut by line count only, so big lines made
/// messages over the server's limit (here the fake server's default
/// 4 MiB): the session broke and the batch was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_batches_stay_under_a_mebibyte_whatever_the_line_size() {
    const LINES: usize = 200;
    const LEN: usize = 60_000;
    let mut h = Harness::start().await;
    let mut config = h.config();
    config.log_batch_size = Some(1000);
    config.log_flush = Some(Duration::from_secs(60));
    let mut handle = agent::spawn(config);
    let mut session = h.welcomed_session("r1").await;
    session.send(sh(
        "job-1",
        &format!(
            "awk 'BEGIN {{ s = \"x\"; while (length(s) < {LEN}) s = s s; \
             s = substr(s, 1, {LEN}); for (i = 1; i <= {LINES}; i++) printf \"%05d%s\\n\", i, s }}'"
        ),
    ));
    session.expect_ack("job-1").await;
    let out = session.until_result("job-1").await;
    out.assert_contiguous();
    assert_eq!(out.result.exit_code, Some(0));
    assert_eq!(out.lines.len(), LINES);
    let body = "x".repeat(LEN);
    for (i, line) in out.lines.iter().enumerate() {
        assert_eq!(line.text.len(), LEN + 5);
        assert!(line.text == format!("{:05}{body}", i + 1), "line {}", i + 1);
    }
    // Full batches by bytes: ~17 lines each, never the 1000 asked for.
    assert!(out.batch_sizes.len() >= LINES * LEN / agent::MAX_LOG_BATCH_BYTES);
    assert!(
        out.batch_sizes
            .iter()
            .all(|&n| n * LEN <= agent::MAX_LOG_BATCH_BYTES)
    );
    handle.kill();
    close_and_wait(session, &mut handle).await;
}

/// Regression: the agent kept tonic's default 4 MiB receive limit, under
/// what a `RunJob` may carry (a 2 MiB spec and up to 64 secrets of 64 KiB).
#[tokio::test]
async fn a_run_job_over_four_mebibytes_is_received() {
    let mut h = Harness::start().await;
    let mut handle = agent::spawn(h.config());
    let mut session = h.welcomed_session("r1").await;
    let comment = format!("# {}\n", "c".repeat(1000));
    let script = format!("{}echo ran\n", comment.repeat(6 * 1024));
    assert!(script.len() > 5 * 1024 * 1024);
    session.send(run(
        "job-1",
        JobSpec {
            script: Some(script),
            ..JobSpec::default()
        },
        HashMap::new(),
    ));
    session.expect_ack("job-1").await;
    let out = session.until_result("job-1").await;
    assert_eq!(out.texts(LogStream::Stdout), ["ran"]);
    assert_eq!(out.result.exit_code, Some(0));
    handle.kill();
    close_and_wait(session, &mut handle).await;
}

#[tokio::test]
async fn log_batches_respect_the_batch_size() {
    // The agent's own setting wins over the server's.
    let mut h = Harness::start().await;
    let mut config = h.config();
    config.log_batch_size = Some(10);
    config.log_flush = Some(Duration::from_secs(60));
    let mut handle = agent::spawn(config);
    let mut session = h.next_session().await;
    session.welcome_with(Welcome {
        resume_token: "r1".into(),
        heartbeat_interval_ms: 60_000,
        log_batch_size: 3,
        log_flush_ms: 60_000,
    });
    session.send(sh("job-1", "seq 1 35"));
    session.expect_ack("job-1").await;
    let out = session.until_result("job-1").await;
    out.assert_contiguous();
    // Full batches, then the rest when the output ends.
    assert_eq!(out.batch_sizes, [10, 10, 10, 5]);
    handle.kill();
    close_and_wait(session, &mut handle).await;

    // Without a local setting, the server's applies.
    let mut handle = agent::spawn(h.config());
    let mut session = h.next_session().await;
    session.welcome_with(Welcome {
        resume_token: "r1".into(),
        heartbeat_interval_ms: 60_000,
        log_batch_size: 7,
        log_flush_ms: 60_000,
    });
    session.send(sh("job-2", "seq 1 35"));
    session.expect_ack("job-2").await;
    let out = session.until_result("job-2").await;
    assert_eq!(out.batch_sizes, [7, 7, 7, 7, 7]);

    handle.kill();
    close_and_wait(session, &mut handle).await;

    // The flush interval sends a partial batch without waiting for more.
    let flag = h.path("go");
    let mut config = h.config();
    config.log_flush = Some(Duration::from_millis(50));
    let mut handle = agent::spawn(config);
    let mut session = h.welcomed_session("r1").await;
    session.send(sh("job-4", &wait_for_flag("first", &flag, "second")));
    session.expect_ack("job-4").await;
    let lines = session.until_line("job-4", "first").await;
    assert_eq!(lines.len(), 1);
    touch(&flag);
    let out = session.until_result("job-4").await;
    assert_eq!(out.texts(LogStream::Stdout), ["second"]);
    handle.kill();
    close_and_wait(session, &mut handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_lines_arrive_complete_and_in_order() {
    const N: u64 = 100_000;
    let mut h = Harness::start().await;
    let mut handle = agent::spawn(h.config());
    let mut session = h.welcomed_session("r1").await;
    session.send(sh("job-1", &format!("seq 1 {N}")));
    session.expect_ack("job-1").await;
    let out = session.until_result("job-1").await;
    assert_eq!(out.lines.len() as u64, N);
    for (i, line) in out.lines.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(line.seq, n);
        assert_eq!(line.text, n.to_string());
    }
    assert!(out.batch_sizes.iter().all(|&n| n <= 100));
    assert_eq!(out.result.exit_code, Some(0));
    handle.kill();
    close_and_wait(session, &mut handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_blocks_instead_of_dropping_while_the_server_is_unreachable() {
    const N: u64 = 200_000;
    let mut h = Harness::start().await;
    let mut config = h.config();
    config.outbox_capacity = 4;
    let mut handle = agent::spawn(config);
    let mut session = h.welcomed_session("r1").await;
    let flag = h.path("go");
    let done = h.path("done");
    session.send(sh(
        "job-1",
        &format!(
            "{}; seq 3 {N}; touch {done}",
            wait_for_flag("1", &flag, "2")
        ),
    ));
    session.expect_ack("job-1").await;
    session.until_line("job-1", "1").await;
    drop(session);

    // Not welcomed: nothing can leave the agent, and the bounded buffers
    // (far smaller than the output) stop the job instead of dropping lines.
    let mut session = h.next_session().await;
    assert_eq!(session.hello.running[0].last_log_seq, 1);
    touch(&flag);
    tokio::time::sleep(Duration::from_secs(1)).await; // observation window
    assert!(!Path::new(&done).exists(), "the job was not slowed down");

    session.welcome("r2");
    let out = session.until_result("job-1").await;
    // Line 1, which the dropped session took, is sent again first; then
    // every other line, once, in order.
    assert_eq!(out.lines.len() as u64, N);
    for (i, line) in out.lines.iter().enumerate() {
        assert_eq!(line.seq, i as u64 + 1);
        assert_eq!(line.text, (i as u64 + 1).to_string());
    }
    assert!(Path::new(&done).exists());
    handle.kill();
    close_and_wait(session, &mut handle).await;
}

#[tokio::test]
async fn secret_values_are_masked_in_logs() {
    let mut h = Harness::start().await;
    let mut handle = agent::spawn(h.config());
    let mut session = h.welcomed_session("r1").await;
    let secret = "s3cr3t-Value-42";
    session.send(run(
        "job-1",
        JobSpec {
            command: vec![
                "sh".into(),
                "-c".into(),
                format!("echo \"key=$API_KEY\"; echo \"literal {secret} again\" >&2; cat \"$HODEI_SECRETS_FILE\""),
            ],
            secrets: vec!["API_KEY".into()],
            ..JobSpec::default()
        },
        [("API_KEY".to_owned(), secret.to_owned())].into(),
    ));
    session.expect_ack("job-1").await;
    let out = session.until_result("job-1").await;
    assert_eq!(out.result.exit_code, Some(0));
    assert_eq!(
        out.texts(LogStream::Stdout),
        ["key=***", r#"{"API_KEY":"***"}"#]
    );
    assert_eq!(out.texts(LogStream::Stderr), ["literal *** again"]);
    assert!(out.lines.iter().all(|l| !l.text.contains(secret)));

    // A secret named by the spec but not delivered fails the start.
    session.send(run(
        "job-2",
        JobSpec {
            command: vec!["true".into()],
            secrets: vec!["MISSING".into()],
            ..JobSpec::default()
        },
        HashMap::new(),
    ));
    session.expect_ack("job-2").await;
    let out = session.until_result("job-2").await;
    assert_eq!(out.result.start_error, "secret MISSING was not delivered");
    handle.kill();
    close_and_wait(session, &mut handle).await;
}

#[tokio::test]
async fn reconnects_with_the_resume_token_and_resyncs_the_running_attempt() {
    let mut h = Harness::start().await;
    let mut handle = agent::spawn(h.config());
    let mut session = h.welcomed_session("resume-1").await;
    let flag = h.path("go");
    let done = h.path("done");
    session.send(sh(
        "job-1",
        &format!(
            "{}; echo third; touch {done}",
            wait_for_flag("first", &flag, "second")
        ),
    ));
    session.expect_ack("job-1").await;
    session.until_line("job-1", "first").await;

    // The server drops the session.
    let first_hello = session.hello.clone();
    drop(session);
    let mut session = h.next_session().await;
    assert_eq!(session.hello.worker_id, first_hello.worker_id);
    assert_eq!(session.hello.token, "resume-1");
    assert_eq!(session.hello.running.len(), 1);
    let running = &session.hello.running[0];
    assert_eq!((running.job_id.as_str(), running.attempt), ("job-1", 1));
    assert_eq!(running.last_log_seq, 1);

    // Output produced while the agent has no welcomed session is buffered.
    touch(&flag);
    let deadline = Instant::now() + DEADLINE;
    while !Path::new(&done).exists() {
        assert!(Instant::now() < deadline, "job did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    session.welcome("resume-2");
    let out = session.until_result("job-1").await;
    // The line the dropped session took comes again first (it may not
    // have arrived; a server ignores lines it has), then the rest.
    let seqs: Vec<u64> = out.lines.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(out.texts(LogStream::Stdout), ["first", "second", "third"]);
    assert_eq!(out.result.exit_code, Some(0));

    // Next reconnect presents the newest token and nothing is running.
    drop(session);
    let session = h.next_session().await;
    assert_eq!(session.hello.token, "resume-2");
    assert!(session.hello.running.is_empty());
    session.welcome("resume-3");
    handle.kill();
    assert_eq!(close_and_wait(session, &mut handle).await, AgentExit::Clean);
}

#[tokio::test]
async fn rejected_reconnect_is_retried() {
    let mut h = Harness::start().await;
    let mut handle = agent::spawn(h.config());
    let session = h.welcomed_session("resume-1").await;
    assert_eq!(h.hellos.recv().await.unwrap().token, "provision-token");
    h.set_policy(Policy::RejectCall("stale token".into()));
    drop(session);
    // Rejected reconnects are retried with backoff (not fatal after a welcome).
    for _ in 0..2 {
        let hello = tokio::time::timeout(DEADLINE, h.hellos.recv())
            .await
            .unwrap();
        assert_eq!(hello.unwrap().token, "resume-1");
    }
    h.set_policy(Policy::Accept);
    let session = h.welcomed_session("resume-2").await;
    assert_eq!(session.hello.token, "resume-1");
    assert!(!handle.is_finished());
    handle.kill();
    assert_eq!(close_and_wait(session, &mut handle).await, AgentExit::Clean);
}

#[tokio::test]
async fn drain_finishes_the_current_job_refuses_new_ones_and_exits_clean() {
    let mut h = Harness::start().await;
    let mut handle = agent::spawn(h.config());
    let mut session = h.welcomed_session("r1").await;
    let flag = h.path("go");
    session.send(sh("job-1", &wait_for_flag("started", &flag, "finished")));
    session.expect_ack("job-1").await;
    session.until_line("job-1", "started").await;

    handle.drain();
    match session.recv().await {
        worker_message::Kind::Draining(_) => {}
        other => panic!("expected draining, got {other:?}"),
    }
    session.send(sh("job-2", "echo never"));
    match session.recv().await {
        worker_message::Kind::Refused(refused) => {
            assert_eq!(refused.job_id, "job-2");
            assert_eq!(refused.reason, "worker is draining");
            assert_eq!(refused.code, proto::RefusalCode::Draining as i32);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    touch(&flag);
    let out = session.until_result("job-1").await;
    assert_eq!(out.texts(LogStream::Stdout), ["finished"]);
    assert_eq!(out.result.exit_code, Some(0));
    session.expect_end().await;
    assert_eq!(wait_exit(&mut handle).await.unwrap(), AgentExit::Clean);
}

#[tokio::test]
async fn drain_grace_expiry_cancels_the_job_and_exits_forced() {
    let mut h = Harness::start().await;
    let mut handle = agent::spawn(h.config());
    let mut session = h.welcomed_session("r1").await;
    session.send(sh("job-1", "echo started; sleep 1000"));
    session.expect_ack("job-1").await;
    session.until_line("job-1", "started").await;
    handle.drain_with_grace(Duration::from_millis(200));
    assert!(matches!(
        session.recv().await,
        worker_message::Kind::Draining(_)
    ));
    let out = session.until_result("job-1").await;
    assert!(out.result.cancelled, "{:?}", out.result);
    session.expect_end().await;
    assert_eq!(wait_exit(&mut handle).await.unwrap(), AgentExit::Forced);
}

#[tokio::test]
async fn capacity_is_enforced_and_server_shutdown_exits_clean() {
    let mut h = Harness::start().await;
    let mut handle = agent::spawn(h.config());
    let mut session = h.welcomed_session("r1").await;
    session.send(sh("job-1", "echo started; sleep 1000"));
    session.expect_ack("job-1").await;
    session.until_line("job-1", "started").await;

    session.send(sh("job-2", "echo never"));
    match session.recv().await {
        worker_message::Kind::Refused(refused) => {
            assert_eq!(refused.job_id, "job-2");
            assert!(refused.reason.contains("capacity"), "{}", refused.reason);
            assert_eq!(refused.code, proto::RefusalCode::AtCapacity as i32);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A resent assignment of a running attempt is acknowledged, not rerun.
    session.send(sh("job-1", "echo twice"));
    session.expect_ack("job-1").await;

    session.send(server_message::Kind::Shutdown(Shutdown {}));
    assert!(matches!(
        session.recv().await,
        worker_message::Kind::Draining(_)
    ));
    let out = session.until_result("job-1").await;
    assert!(out.result.cancelled);
    session.expect_end().await;
    assert_eq!(wait_exit(&mut handle).await.unwrap(), AgentExit::Clean);
}

mod binary {
    //! The `hodei-worker` binary: exit codes, SIGTERM, token hygiene.

    use std::process::Stdio;

    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use tokio::io::AsyncReadExt;
    use tokio::process::{Child, Command};

    use super::*;

    fn worker(url: &str, token: &str) -> Child {
        Command::new(env!("CARGO_BIN_EXE_hodei-worker"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HODEI_SERVER_URL", url)
            .env("HODEI_WORKER_TOKEN", token)
            .env("HODEI_WORKER_LABELS", "kind=binary")
            .env("HODEI_DRAIN_GRACE_SECS", "30")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    #[tokio::test]
    async fn rejected_registration_exits_2_with_a_message() {
        let h = Harness::start().await;
        h.set_policy(Policy::RejectCall("unknown token".into()));
        let mut child = worker(&h.url, "bad-token");
        let status = tokio::time::timeout(DEADLINE, child.wait())
            .await
            .unwrap()
            .unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .await
            .unwrap();
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("registration rejected: unknown token"),
            "{stderr}"
        );
        assert!(!stderr.contains("bad-token"), "token leaked: {stderr}");
    }

    #[tokio::test]
    async fn sigterm_drains_and_the_token_never_reaches_the_job() {
        let mut h = Harness::start().await;
        let token = "binary-provision-token-123";
        let mut child = worker(&h.url, token);
        let mut session = h.welcomed_session("r1").await;
        assert_eq!(session.hello.token, token);
        assert_eq!(
            session.hello.labels.get("kind").map(String::as_str),
            Some("binary")
        );
        let flag = h.path("go");
        session.send(sh(
            "job-1",
            &format!("env; {}", wait_for_flag("started", &flag, "finished")),
        ));
        session.expect_ack("job-1").await;
        let lines = session.until_line("job-1", "started").await;
        assert!(lines.iter().all(|l| !l.text.contains(token)));
        assert!(
            lines
                .iter()
                .all(|l| !l.text.starts_with("HODEI_WORKER_TOKEN"))
        );

        let pid = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
        kill(pid, Signal::SIGTERM).unwrap();
        assert!(matches!(
            session.recv().await,
            worker_message::Kind::Draining(_)
        ));
        touch(&flag);
        let out = session.until_result("job-1").await;
        assert_eq!(out.texts(LogStream::Stdout), ["finished"]);
        session.expect_end().await;
        let status = tokio::time::timeout(DEADLINE, child.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.code(), Some(0));
    }
}
