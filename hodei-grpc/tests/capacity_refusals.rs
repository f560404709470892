//! Capacity refusals over real processes: an embedded server
//! (`hodei_grpc::server::start`, in-memory store) with one reusable local
//! worker (a real `hodei-worker` process, capacity 1) talking gRPC over
//! loopback.
//!
//! - Back-to-back jobs: the agent frees a job's slot before it queues the
//!   job's result, so the next `RunJob`, which the server sends as soon as
//!   it has that result, is never refused "at capacity" (the benchmark
//!   lost 1–58 of 2,000 jobs with one attempt that way).
//! - A refusal "at capacity" that does happen (the agent still winds down
//!   a cancelled job) gives the attempt back: the job is queued again in
//!   the same attempt and succeeds with `max_attempts = 1`.

mod e2e_support;

use std::path::Path;

use e2e_support::*;
use hodei_grpc::config::{ProviderKind, ProviderSettings, ServerConfig};
use hodei_grpc::proto;
use hodei_grpc::server::{self, Listeners};
use proto::JobState;

/// An embedded server with one reusable local worker of capacity 1.
async fn one_worker_server(state: &Path) -> (server::RunningServer, Client, String) {
    let mut provider = ProviderSettings::new(ProviderKind::Local);
    provider.max_workers = 1;
    provider.warm_pool = 1;
    provider.ephemeral = false;
    provider.extra.insert(
        "state_dir".into(),
        toml::Value::String(state.display().to_string()),
    );
    let config = ServerConfig {
        providers: vec![provider],
        worker_bin: Some(WORKER_BIN.into()),
        ..ServerConfig::default()
    };
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = server::start(Listeners { grpc, http: None }, config)
        .await
        .expect("embedded server starts");
    let client = Client::connect(&format!("http://{}", running.grpc_addr()), None, None).await;
    let worker = wait_for("the warm worker to be READY", DEADLINE, || async {
        let workers = client
            .workers()
            .list(proto::ListWorkersRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers;
        workers
            .into_iter()
            .find(|w| w.state == "READY" && w.connected)
            .map(|w| w.worker_id)
    })
    .await;
    (running, client, worker)
}

fn once(mut spec: proto::JobSpec) -> proto::JobSpec {
    spec.max_attempts = Some(1);
    spec
}

/// Every event of `event_type` in the audit trail.
async fn events_of_type(client: &Client, event_type: &str) -> Vec<proto::Event> {
    client
        .all_events()
        .await
        .into_iter()
        .filter(|e| e.event_type == event_type)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_jobs_on_one_worker_are_never_refused() {
    const JOBS: usize = 300;
    let state = tempfile::tempdir().unwrap();
    let (running, client, worker) = one_worker_server(state.path()).await;
    // All queued at once: each result frees the worker, and the server
    // sends the next job right away.
    let mut ids = Vec::with_capacity(JOBS);
    for _ in 0..JOBS {
        ids.push(client.submit(once(sh("true"))).await.job_id);
    }
    // Same priority: FIFO, so the last one ends last.
    client.wait_terminal(ids.last().unwrap()).await;
    for id in &ids {
        let job = client.wait_terminal(id).await;
        assert_eq!(job.state, JobState::Succeeded as i32, "{job:?}");
        assert_eq!(job.attempt, 1, "{job:?}");
        assert_eq!(job.attempts.len(), 1, "{job:?}");
        assert_eq!(
            job.attempts[0].worker_id.as_deref(),
            Some(worker.as_str()),
            "one worker ran them all"
        );
    }
    let refused = events_of_type(&client, "JobDispatchFailed").await;
    assert!(
        refused.is_empty(),
        "{} dispatches refused or lost: {:?}",
        refused.len(),
        refused.iter().map(payload).collect::<Vec<_>>()
    );
    running.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capacity_refusal_gives_the_attempt_back() {
    let state = tempfile::tempdir().unwrap();
    let (running, client, worker) = one_worker_server(state.path()).await;
    let gate = state.path().join("gate");
    // The first job, once told to stop, holds its slot until the gate
    // opens (the agent's kill grace is 5 s).
    let slow_stop = format!(
        "trap '{wait}; exit 0' TERM; echo ready; while :; do sleep 0.05; done",
        wait = wait_file(&gate)
    );
    let first = client.submit(once(sh(&slow_stop))).await;
    assert_eq!(client.running_worker(&first.job_id).await, worker);
    wait_for("the first job's trap", DEADLINE, || async {
        let logs = client.logs_of(&first.job_id).await;
        logs.iter().any(|l| l.text == "ready").then_some(())
    })
    .await;
    // The second waits for the only worker, with a single attempt.
    let second = client.submit(once(sh("echo second"))).await;
    assert_eq!(
        client.job(&second.job_id).await.state,
        JobState::Pending as i32
    );
    // Cancelling the first frees the worker's slot at the server at once:
    // the second is sent to the agent, which still winds the first down.
    client
        .jobs()
        .cancel(proto::CancelJobRequest {
            job_id: first.job_id.clone(),
        })
        .await
        .expect("cancel");
    let refusal = client
        .wait_event("JobDispatchFailed", |e| e.aggregate_id == second.job_id)
        .await;
    let p = payload(&refusal);
    assert_eq!(p["attempt"], 1);
    assert_eq!(p["worker_id"], worker.as_str());
    let reason = p["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("worker refused (at_capacity)"),
        "{reason}"
    );
    touch(&gate);

    let done = client.wait_terminal(&second.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert_eq!(done.attempt, 1, "the refusal cost no attempt");
    assert_eq!(done.attempts.len(), 1);
    let logs = client.logs_of(&second.job_id).await;
    assert_eq!(
        logs.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
        ["second"]
    );
    // Each refusal is followed by the same attempt queued again.
    let events = client.events(&second.job_id).await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert!(!types.contains(&"JobFailed"), "{types:?}");
    assert!(!types.contains(&"JobRetryScheduled"), "{types:?}");
    for (i, e) in events.iter().enumerate() {
        if e.event_type == "JobDispatchFailed" {
            let next = &events[i + 1];
            assert_eq!(next.event_type, "JobQueued", "{types:?}");
            assert_eq!(payload(next)["attempt"], 1);
        }
    }
    assert_eq!(
        client.wait_terminal(&first.job_id).await.state,
        JobState::Cancelled as i32
    );
    running.stop().await.expect("clean stop");
}
