//! The agent keeps each job result until the server acknowledges it
//! (`ResultAck`) and sends it again on its next session when the one that
//! carried it ended first: a server that dies right after a result was
//! written to its connection no longer loses it (the attempt used to be
//! retried as lost, so execution was at least once).
//!
//! A fake `WorkerService` here, real gRPC over loopback, the real agent.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use hodei_grpc::agent::{self, AgentConfig, AgentExit};
use hodei_grpc::proto::worker_service_server::{WorkerService, WorkerServiceServer};
use hodei_grpc::proto::{
    Hello, JobResult, JobSpec, ResultAck, RunJob, ServerMessage, Welcome, WorkerMessage,
    server_message, worker_message,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status, Streaming};

const DEADLINE: Duration = Duration::from_secs(20);

struct Session {
    hello: Hello,
    inbound: Streaming<WorkerMessage>,
    outbound: mpsc::UnboundedSender<Result<ServerMessage, Status>>,
}

impl Session {
    fn send(&self, kind: server_message::Kind) {
        self.outbound
            .send(Ok(ServerMessage { kind: Some(kind) }))
            .expect("session is open");
    }

    /// The next message that is not a heartbeat.
    async fn recv(&mut self) -> worker_message::Kind {
        loop {
            let msg = tokio::time::timeout(DEADLINE, self.inbound.message())
                .await
                .expect("no message from the agent in time")
                .expect("session failed")
                .expect("the agent ended the session");
            match msg.kind.expect("message without kind") {
                worker_message::Kind::Heartbeat(_) => {}
                kind => return kind,
            }
        }
    }

    /// Skips acks and logs up to the next result.
    async fn until_result(&mut self) -> JobResult {
        loop {
            match self.recv().await {
                worker_message::Kind::Ack(_) | worker_message::Kind::Logs(_) => {}
                worker_message::Kind::Result(result) => return result,
                other => panic!("expected a result, got {other:?}"),
            }
        }
    }
}

#[derive(Clone)]
struct FakeServer {
    sessions: mpsc::UnboundedSender<Session>,
}

#[tonic::async_trait]
impl WorkerService for FakeServer {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<ServerMessage, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let Some(WorkerMessage {
            kind: Some(worker_message::Kind::Hello(hello)),
        }) = inbound.message().await?
        else {
            return Err(Status::invalid_argument("the first message must be hello"));
        };
        let (outbound, rx) = mpsc::unbounded_channel();
        let _ = self.sessions.send(Session {
            hello,
            inbound,
            outbound,
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

fn run(job: &str, script: &str) -> server_message::Kind {
    server_message::Kind::Run(RunJob {
        job_id: job.to_owned(),
        attempt: 1,
        spec: Some(JobSpec {
            command: vec!["sh".into(), "-c".into(), script.into()],
            ..JobSpec::default()
        }),
        secrets: Default::default(),
        correlation_id: format!("corr-{job}"),
    })
}

async fn next_session(sessions: &mut mpsc::UnboundedReceiver<Session>, token: &str) -> Session {
    let session = tokio::time::timeout(DEADLINE, sessions.recv())
        .await
        .expect("the agent did not open a session in time")
        .expect("server gone");
    session.send(server_message::Kind::Welcome(Welcome {
        resume_token: token.to_owned(),
        heartbeat_interval_ms: 60_000,
        log_batch_size: 0,
        log_flush_ms: 0,
    }));
    session
}

#[tokio::test]
async fn an_unacknowledged_result_is_sent_again_after_a_reconnect() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (sessions_tx, mut sessions) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WorkerServiceServer::new(FakeServer {
                sessions: sessions_tx,
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut config = AgentConfig::new(url, "provision-token");
    config.reconnect_initial = Duration::from_millis(100);
    config.reconnect_max = Duration::from_millis(500);
    let mut handle = agent::spawn(config);

    let mut session = next_session(&mut sessions, "r1").await;
    session.send(run("job-1", "echo hi; exit 3"));
    let first = session.until_result().await;
    assert_eq!((first.job_id.as_str(), first.exit_code), ("job-1", Some(3)));
    // The server dies with the result read but not acknowledged.
    drop(session);

    // The agent reports the attempt as still open and, once welcomed,
    // sends its result again before anything else.
    let mut session = next_session(&mut sessions, "r2").await;
    let running: Vec<(&str, u32)> = session
        .hello
        .running
        .iter()
        .map(|r| (r.job_id.as_str(), r.attempt))
        .collect();
    assert_eq!(running, [("job-1", 1)]);
    assert_eq!(session.hello.token, "r1");
    let again = session.until_result().await;
    assert_eq!(again, first, "the same result");
    session.send(server_message::Kind::ResultAck(ResultAck {
        job_id: "job-1".to_owned(),
        attempt: 1,
    }));
    // The next job's result, read after the ack (one ordered stream), is
    // left unacknowledged.
    session.send(run("job-2", "exit 0"));
    let second = session.until_result().await;
    assert_eq!(
        (second.job_id.as_str(), second.exit_code),
        ("job-2", Some(0))
    );
    drop(session);

    // Only the unacknowledged one is reported and sent again.
    let mut session = next_session(&mut sessions, "r3").await;
    let running: Vec<&str> = session
        .hello
        .running
        .iter()
        .map(|r| r.job_id.as_str())
        .collect();
    assert_eq!(running, ["job-2"]);
    assert_eq!(session.until_result().await, second);
    session.send(server_message::Kind::ResultAck(ResultAck {
        job_id: "job-2".to_owned(),
        attempt: 1,
    }));
    handle.drain();
    match session.recv().await {
        worker_message::Kind::Draining(_) => {}
        other => panic!("expected draining, got {other:?}"),
    }
    // Nothing else: the agent ends the session and exits.
    let end = tokio::time::timeout(DEADLINE, async {
        loop {
            match session.inbound.message().await {
                Ok(Some(WorkerMessage {
                    kind: Some(worker_message::Kind::Heartbeat(_)),
                })) => {}
                other => return other,
            }
        }
    })
    .await
    .expect("the agent did not end the session");
    assert!(matches!(end, Ok(None)), "{end:?}");
    drop(session);
    let exit = tokio::time::timeout(DEADLINE, handle.wait())
        .await
        .expect("the agent did not exit in time")
        .unwrap();
    assert_eq!(exit, AgentExit::Clean);
}

/// The real server's side: a result sent twice (what an agent does when
/// the acknowledgement was lost with the connection) is acknowledged both
/// times, decides the attempt once, and leaves the session working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_acknowledges_results_and_ignores_a_duplicate() {
    use hodei_grpc::config::{ProviderKind, ProviderSettings, ServerConfig};
    use hodei_grpc::proto::worker_service_client::WorkerServiceClient;
    use hodei_grpc::proto::{self, JobAck};
    use hodei_grpc::server::{self, Listeners};

    let config = ServerConfig {
        providers: vec![ProviderSettings::new(ProviderKind::Inprocess)],
        ..ServerConfig::default()
    };
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = server::start(Listeners { grpc, http: None }, config)
        .await
        .expect("embedded server starts");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", running.grpc_addr()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut admin =
        proto::worker_admin_service_client::WorkerAdminServiceClient::new(channel.clone());
    let mut jobs = proto::job_service_client::JobServiceClient::new(channel.clone());
    let issued = admin
        .issue_token(proto::IssueTokenRequest::default())
        .await
        .unwrap()
        .into_inner();

    // A hand-driven agent.
    let (tx, rx) = mpsc::unbounded_channel::<WorkerMessage>();
    let up = |kind: worker_message::Kind| {
        tx.send(WorkerMessage { kind: Some(kind) })
            .expect("request stream open");
    };
    up(worker_message::Kind::Hello(Hello {
        worker_id: issued.worker_id.clone(),
        token: issued.token,
        provider: "inprocess".into(),
        capacity: 1,
        agent_version: "test".into(),
        ..Hello::default()
    }));
    let mut down = WorkerServiceClient::new(channel)
        .session(UnboundedReceiverStream::new(rx))
        .await
        .expect("session opens")
        .into_inner();
    let mut next = async || -> server_message::Kind {
        tokio::time::timeout(DEADLINE, down.message())
            .await
            .expect("no server message in time")
            .expect("session failed")
            .expect("session ended")
            .kind
            .expect("message without kind")
    };
    assert!(matches!(next().await, server_message::Kind::Welcome(_)));

    for (n, name) in ["first", "second"].into_iter().enumerate() {
        let job = jobs
            .submit(proto::SubmitJobRequest {
                spec: Some(proto::JobSpec {
                    command: vec!["echo".into(), name.into()],
                    max_attempts: Some(1),
                    ..proto::JobSpec::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap();
        let run = loop {
            match next().await {
                server_message::Kind::Run(run) => break run,
                server_message::Kind::Cancel(_) => {} // for the duplicate before
                other => panic!("expected the job, got {other:?}"),
            }
        };
        assert_eq!(run.job_id, job.job_id, "job {n} is sent to this agent");
        let key = (run.job_id.clone(), run.attempt);
        up(worker_message::Kind::Ack(JobAck {
            job_id: key.0.clone(),
            attempt: key.1,
        }));
        let result = JobResult {
            job_id: key.0.clone(),
            attempt: key.1,
            exit_code: Some(0),
            ..JobResult::default()
        };
        up(worker_message::Kind::Result(result.clone()));
        // Sent again, and a contradicting copy: the attempt is decided.
        up(worker_message::Kind::Result(result.clone()));
        up(worker_message::Kind::Result(JobResult {
            exit_code: Some(1),
            ..result
        }));
        let mut acks = 0;
        while acks < 3 {
            match next().await {
                server_message::Kind::ResultAck(ack) => {
                    assert_eq!((ack.job_id.as_str(), ack.attempt), (key.0.as_str(), key.1));
                    acks += 1;
                }
                // The engine tells the agent to stop an attempt that is
                // not its own any more; a real agent ignores it.
                server_message::Kind::Cancel(c) => assert_eq!(c.job_id, key.0),
                other => panic!("expected acknowledgements, got {other:?}"),
            }
        }
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let done = loop {
            let j = jobs
                .get(proto::GetJobRequest {
                    job_id: key.0.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .job
                .unwrap();
            if j.state == proto::JobState::Succeeded as i32
                || j.state == proto::JobState::Failed as i32
            {
                break j;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job {n} not decided"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(done.state, proto::JobState::Succeeded as i32, "{done:?}");
        assert_eq!((done.attempt, done.attempts.len()), (1, 1));
        let events = jobs
            .events(proto::JobEventsRequest {
                job_id: key.0.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        let ends: Vec<&str> = events
            .iter()
            .map(|e| e.event_type.as_str())
            .filter(|t| matches!(*t, "JobSucceeded" | "JobFailed"))
            .collect();
        assert_eq!(ends, ["JobSucceeded"]);
    }
    drop(tx);
    running.stop().await.expect("clean stop");
}
