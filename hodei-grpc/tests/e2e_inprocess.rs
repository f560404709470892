//! The embedded server (`hodei_grpc::server::start`) with in-process
//! agents (`InProcessProvider`): what the quick start and embedders use.
//! Also covers `JobService.Watch` and draining a worker through the API.

mod e2e_support;

use e2e_support::*;
use hodei_grpc::config::{ProviderKind, ProviderSettings, ServerConfig};
use hodei_grpc::proto;
use hodei_grpc::server::{self, Listeners};
use proto::JobState;
use proto::watch_job_response::Update;

async fn embedded() -> (server::RunningServer, Client, tempfile::TempDir) {
    let mut config = ServerConfig {
        providers: vec![ProviderSettings::new(ProviderKind::Inprocess)],
        ..ServerConfig::default()
    };
    config.runtime.engine.retry.base = std::time::Duration::from_millis(100);
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = server::start(Listeners { grpc, http: None }, config)
        .await
        .expect("embedded server starts");
    let client = Client::connect(&format!("http://{}", running.grpc_addr()), None, None).await;
    (running, client, tempfile::tempdir().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_agents_run_jobs_and_watch_reports_them() {
    let (running, client, dir) = embedded().await;
    let gate = dir.path().join("gate");
    let job = client
        .with_correlation("watch-1")
        .submit(sh(&format!("echo hi; {}", wait_file(&gate))))
        .await;
    let mut watch = client
        .jobs()
        .watch(proto::WatchJobRequest {
            job_id: job.job_id.clone(),
            after_sequence: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // First the job as it is, then its whole history and live events.
    let first = watch.message().await.unwrap().unwrap();
    assert!(matches!(first.update, Some(Update::Job(_))));
    let mut types = Vec::new();
    loop {
        let msg = watch.message().await.unwrap().unwrap();
        if let Some(Update::Event(e)) = msg.update {
            assert_eq!(e.correlation_id, "watch-1");
            types.push(e.event_type.clone());
            if e.event_type == "JobStarted" {
                break;
            }
        }
    }
    assert_eq!(types.first().map(String::as_str), Some("JobCreated"));
    touch(&gate);
    let mut last = None;
    while let Some(msg) = watch.message().await.unwrap() {
        match msg.update {
            Some(Update::Event(e)) => types.push(e.event_type),
            Some(Update::Job(j)) => last = Some(j),
            None => {}
        }
    }
    assert!(types.contains(&"JobSucceeded".to_owned()), "{types:?}");
    let last = last.expect("the stream ends with the terminal job");
    assert_eq!(last.state, JobState::Succeeded as i32);
    let logs = client.logs_of(&job.job_id).await;
    assert_eq!(logs[0].text, "hi");
    running.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_a_worker_through_the_api() {
    let (running, client, dir) = embedded().await;
    let gate = dir.path().join("gate");
    let job = client
        .submit(sh(&format!("echo busy; {}", wait_file(&gate))))
        .await;
    let worker = client.running_worker(&job.job_id).await;
    let drainer = client.with_correlation("drain-1");
    let resp = drainer
        .workers()
        .drain(proto::DrainWorkerRequest {
            worker_id: worker.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        resp.metadata()
            .get("x-correlation-id")
            .unwrap()
            .to_str()
            .unwrap(),
        "drain-1"
    );
    let draining = client
        .wait_event("WorkerDraining", |e| e.aggregate_id == worker)
        .await;
    assert_eq!(draining.actor, "anonymous");
    assert_eq!(draining.correlation_id, "drain-1");
    // The running job is not interrupted by the drain.
    assert_eq!(
        client.job(&job.job_id).await.state,
        JobState::Running as i32
    );
    touch(&gate);
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32);
    wait_for("the drained worker to be gone", DEADLINE, || async {
        let workers = client
            .workers()
            .list(proto::ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers;
        workers
            .iter()
            .find(|w| w.worker_id == worker)
            .is_none_or(|w| w.state == "TERMINATED")
            .then_some(())
    })
    .await;
    // Unknown and malformed workers.
    let err = client
        .workers()
        .drain(proto::DrainWorkerRequest {
            worker_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = client
        .workers()
        .drain(proto::DrainWorkerRequest {
            worker_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    running.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_and_secrets_over_grpc() {
    let (running, client, _dir) = embedded().await;
    let providers =
        proto::provider_service_client::ProviderServiceClient::new(client.channel.clone())
            .list(proto::ListProvidersRequest {})
            .await
            .unwrap()
            .into_inner()
            .providers;
    assert_eq!(providers.len(), 1);
    assert_eq!(providers[0].provider_id, "inprocess");
    assert_eq!(providers[0].kind, "local");
    let secrets = client.secrets();
    let mut s = secrets.clone();
    s.set(proto::SetSecretRequest {
        name: "TOKEN_A".into(),
        value: "value-a".into(),
    })
    .await
    .unwrap();
    let err = s
        .set(proto::SetSecretRequest {
            name: "bad name".into(),
            value: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let listed = s
        .list(proto::ListSecretsRequest {})
        .await
        .unwrap()
        .into_inner()
        .secrets;
    assert_eq!(
        listed.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["TOKEN_A"]
    );
    s.delete(proto::DeleteSecretRequest {
        name: "TOKEN_A".into(),
    })
    .await
    .unwrap();
    let err = s
        .delete(proto::DeleteSecretRequest {
            name: "TOKEN_A".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    running.stop().await.expect("clean stop");
}

/// A job store whose creations wait while `hold` is on; `held` fires when
/// one starts waiting.
struct GatedJobs {
    inner: std::sync::Arc<hodei_core::memory::MemoryStore>,
    hold: tokio::sync::watch::Sender<bool>,
    held: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl hodei_core::ports::JobStore for GatedJobs {
    async fn create(
        &self,
        job: &hodei_core::job::Job,
        events: Vec<hodei_core::event::DomainEvent>,
    ) -> Result<hodei_core::ports::Created, hodei_core::ports::StoreError> {
        let mut hold = self.hold.subscribe();
        if *hold.borrow() {
            self.held.notify_one();
            let _ = hold.wait_for(|h| !*h).await;
        }
        self.inner.create(job, events).await
    }
    async fn update(
        &self,
        job: &hodei_core::job::Job,
        expected_version: u64,
        events: Vec<hodei_core::event::DomainEvent>,
    ) -> Result<Vec<hodei_core::event::DomainEvent>, hodei_core::ports::StoreError> {
        self.inner.update(job, expected_version, events).await
    }
    async fn get(
        &self,
        id: hodei_core::ids::JobId,
    ) -> Result<Option<hodei_core::job::Job>, hodei_core::ports::StoreError> {
        hodei_core::ports::JobStore::get(&*self.inner, id).await
    }
    async fn list(
        &self,
        filter: &hodei_core::ports::JobFilter,
    ) -> Result<hodei_core::ports::JobPage, hodei_core::ports::StoreError> {
        hodei_core::ports::JobStore::list(&*self.inner, filter).await
    }
}

/// SIGTERM's path (`RunningServer::stop`): the server says NOT_SERVING and
/// stops accepting, but a unary call already in flight (a submission whose
/// store write is held back) finishes with its answer, and its job is
/// stored, before the server stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unary_call_in_flight_finishes_when_the_server_stops() {
    use hodei_core::ports::JobStore;
    let mem = std::sync::Arc::new(hodei_core::memory::MemoryStore::new());
    let jobs = std::sync::Arc::new(GatedJobs {
        inner: mem.clone(),
        hold: tokio::sync::watch::Sender::new(true),
        held: tokio::sync::Notify::new(),
    });
    let stores = hodei_core::runtime::Stores {
        jobs: jobs.clone(),
        ..hodei_core::runtime::Stores::from_store(mem.clone())
    };
    let config = ServerConfig {
        store: hodei_grpc::config::StoreBackend::Custom(stores),
        providers: vec![ProviderSettings::new(ProviderKind::Inprocess)],
        ..ServerConfig::default()
    };
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = server::start(Listeners { grpc, http: None }, config)
        .await
        .expect("embedded server starts");
    let url = format!("http://{}", running.grpc_addr());
    let client = Client::connect(&url, None, None).await;

    let mut jobs_api = client.jobs();
    let submit = tokio::spawn(async move {
        jobs_api
            .submit(proto::SubmitJobRequest {
                spec: Some(sh("true")),
            })
            .await
    });
    tokio::time::timeout(DEADLINE, jobs.held.notified())
        .await
        .expect("the submission reaches the store");
    let stopping = tokio::spawn(running.stop());

    // The server has begun to stop: its health says NOT_SERVING.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect_lazy();
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    wait_for("NOT_SERVING", DEADLINE, || {
        let mut health = health.clone();
        async move {
            let r = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            match r {
                Ok(r)
                    if r.get_ref().status
                        == tonic_health::pb::health_check_response::ServingStatus::NotServing
                            as i32 =>
                {
                    Some(())
                }
                // A refused connection also means it stopped accepting.
                Err(s) if s.code() == tonic::Code::Unavailable => Some(()),
                _ => None,
            }
        }
    })
    .await;
    assert!(!stopping.is_finished(), "stopped with a call in flight");

    jobs.hold.send_replace(false);
    let answer = tokio::time::timeout(DEADLINE, submit)
        .await
        .expect("the call in flight is answered")
        .unwrap()
        .expect("with its result, not an error")
        .into_inner();
    let job = answer.job.expect("the job");
    let id: hodei_core::ids::JobId = job.job_id.parse().expect("a job id");
    assert!(
        JobStore::get(&*mem, id).await.unwrap().is_some(),
        "the answered job is stored"
    );
    tokio::time::timeout(DEADLINE, stopping)
        .await
        .expect("the server stops once the call is done")
        .unwrap()
        .expect("cleanly");
}
