//! The control plane runtime on the in-memory store, with a provider whose
//! workers are tokio tasks that speak the worker protocol through the
//! public `ControlPlane` API and run real processes.
#![cfg(feature = "runtime")]

mod runtime_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hodei_core::engine::AttemptReport;
use hodei_core::ids::{Actor, CorrelationId, WorkerId};
use hodei_core::job::JobState;
use hodei_core::ports::{LogStream, NewLogLine, RequestContext, ToWorker, WorkerLaunch};
use hodei_core::runtime::{
    ApiError, ControlPlane, FromWorker, RuntimeConfig, Stores, WorkerHello, now_utc,
};
use hodei_core::spec::RawJobSpec;
use runtime_support::{ChanLink, FakeProvider, start_control_plane};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

/// A minimal agent: runs `sh -c <argv joined>` and reports.
async fn fake_agent(cp: ControlPlane, launch: WorkerLaunch) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let hello = WorkerHello {
        worker: launch.worker,
        token: launch.token,
        provider: "local".into(),
        labels: BTreeMap::new(),
        image: None,
        capacity: 1,
        running: Vec::new(),
    };
    let w = launch.worker;
    let Ok(_welcome) = cp.worker_hello(hello, Arc::new(ChanLink(tx))).await else {
        return;
    };
    while let Some(msg) = rx.recv().await {
        match msg {
            ToWorker::Run(run) => {
                let (job, attempt) = (run.job.id, run.job.attempt);
                cp.worker_message(w, FromWorker::Ack { job, attempt })
                    .await
                    .unwrap();
                let argv = match run.job.spec.program() {
                    hodei_core::spec::Program::Command(a) => a.clone(),
                    hodei_core::spec::Program::Script(s) => {
                        vec!["sh".into(), "-c".into(), s.clone()]
                    }
                };
                let mut child = tokio::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .stdout(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                    .unwrap();
                let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
                let mut seq = 0;
                let cancelled = loop {
                    tokio::select! {
                        line = out.next_line() => match line.unwrap() {
                            Some(text) => {
                                // `lose:N` stands for N lines a dead
                                // connection took: the sequence moves on.
                                if let Some(n) = text.strip_prefix("lose:") {
                                    seq += n.parse::<u64>().unwrap();
                                }
                                seq += 1;
                                // `again` is sent twice, as a resend would.
                                let times = if text == "again" { 2 } else { 1 };
                                let line = NewLogLine { agent_seq: seq, stream: LogStream::Stdout, at: now_utc(), text };
                                for _ in 0..times {
                                    let lines = vec![line.clone()];
                                    cp.worker_message(w, FromWorker::Logs { job, attempt, lines }).await.unwrap();
                                }
                            }
                            None => break false,
                        },
                        msg = rx.recv() => match msg {
                            Some(ToWorker::Cancel { .. }) | None => { let _ = child.kill().await; break true; }
                            Some(_) => {}
                        },
                    }
                };
                let status = child.wait().await.unwrap();
                if cancelled {
                    continue;
                }
                let report = AttemptReport {
                    exit_code: status.code(),
                    ..AttemptReport::default()
                };
                cp.worker_message(
                    w,
                    FromWorker::Result {
                        job,
                        attempt,
                        report,
                    },
                )
                .await
                .unwrap();
            }
            ToWorker::Shutdown => return,
            ToWorker::Cancel { .. } | ToWorker::Drain => {}
        }
    }
}

async fn start() -> ControlPlane {
    let provider = FakeProvider::new("local").spawning(fake_agent);
    let mut config = RuntimeConfig::default();
    config.engine.retry.base = Duration::from_millis(50);
    start_control_plane(config, Stores::memory(), Arc::new(provider), 8).await
}

fn ctx(corr: &str) -> RequestContext {
    RequestContext {
        correlation_id: CorrelationId::new(corr),
        actor: Actor::new("tester"),
    }
}

fn cmd(argv: &[&str]) -> RawJobSpec {
    RawJobSpec {
        command: Some(argv.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

async fn wait(cp: &ControlPlane, id: hodei_core::ids::JobId) -> hodei_core::job::Job {
    tokio::time::timeout(Duration::from_secs(20), cp.wait_terminal(id))
        .await
        .expect("job reaches a terminal state in time")
        .unwrap()
}

#[tokio::test]
async fn a_job_runs_end_to_end_with_logs_and_a_full_event_trail() {
    let cp = start().await;
    let job = cp
        .submit(cmd(&["sh", "-c", "echo hello; echo world"]), &ctx("corr-1"))
        .await
        .unwrap();
    assert_eq!(job.state(), JobState::Pending);
    let done = wait(&cp, job.id).await;
    assert_eq!(done.state(), JobState::Succeeded);

    let lines: Vec<String> = cp
        .follow_logs(job.id, 0)
        .map(|l| l.unwrap().text)
        .collect()
        .await;
    assert_eq!(lines, vec!["hello", "world"]);
    let dropped = &cp.counters().log_lines_dropped;
    assert_eq!(dropped.load(std::sync::atomic::Ordering::Relaxed), 0);

    let events = cp.job_events(job.id).await.unwrap();
    let types: Vec<&str> = events.iter().map(|e| e.event_type()).collect();
    assert_eq!(
        types,
        vec![
            "JobCreated",
            "JobQueued",
            "JobScheduled",
            "WorkerProvisioningRequested",
            "JobAssigned",
            "JobStarted",
            "JobSucceeded"
        ]
    );
    assert!(events.iter().all(|e| e.correlation_id.as_str() == "corr-1"));
    assert!(
        events
            .iter()
            .any(|e| e.actor.as_str().starts_with("worker:"))
    );
    assert!(events.windows(2).all(|w| w[0].sequence < w[1].sequence));
    cp.shutdown().await;
}

#[tokio::test]
async fn gaps_in_agent_sequence_numbers_count_as_dropped_lines() {
    let cp = start().await;
    let script = "echo first; echo lose:3; echo again; echo last";
    let job = cp
        .submit(cmd(&["sh", "-c", script]), &ctx("gap"))
        .await
        .unwrap();
    assert_eq!(wait(&cp, job.id).await.state(), JobState::Succeeded);
    let texts: Vec<String> = cp
        .follow_logs(job.id, 0)
        .map(|l| l.unwrap().text)
        .collect()
        .await;
    // The duplicate is stored once and is no gap; the 3 lines skipped
    // before `lose:3` (agent sequence 1 then 5) are.
    assert_eq!(texts, vec!["first", "lose:3", "again", "last"]);
    let dropped = &cp.counters().log_lines_dropped;
    assert_eq!(dropped.load(std::sync::atomic::Ordering::Relaxed), 3);
    cp.shutdown().await;
}

#[tokio::test]
async fn a_failing_job_is_retried_then_fails() {
    let cp = start().await;
    let mut spec = cmd(&["sh", "-c", "echo try; exit 3"]);
    spec.max_attempts = Some(2);
    spec.retry_on_failure = Some(true);
    let job = cp.submit(spec, &ctx("corr-2")).await.unwrap();
    let done = wait(&cp, job.id).await;
    assert_eq!(done.state(), JobState::Failed);
    assert_eq!(done.attempts.len(), 2);
    let types: Vec<String> = cp
        .job_events(job.id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_type().to_owned())
        .collect();
    assert_eq!(
        types.iter().filter(|t| *t == "JobRetryScheduled").count(),
        1
    );
    assert_eq!(types.iter().filter(|t| *t == "JobStarted").count(), 2);
    assert_eq!(types.last().unwrap(), "JobRetryExhausted");
    cp.shutdown().await;
}

#[tokio::test]
async fn a_running_job_is_cancelled() {
    let cp = start().await;
    let job = cp
        .submit(cmd(&["sh", "-c", "echo started; sleep 30"]), &ctx("corr-3"))
        .await
        .unwrap();
    // Wait until it runs (its first line is stored).
    let first = cp.follow_logs(job.id, 0).next().await.unwrap().unwrap();
    assert_eq!(first.text, "started");
    let cancelled = cp.cancel(job.id, &ctx("corr-cancel")).await.unwrap();
    assert_eq!(cancelled.state(), JobState::Cancelled);
    let done = wait(&cp, job.id).await;
    assert_eq!(done.state(), JobState::Cancelled);
    let again = cp.cancel(job.id, &ctx("corr-cancel")).await.unwrap_err();
    assert!(matches!(again, ApiError::FailedPrecondition(_)), "{again}");
    cp.shutdown().await;
}

#[tokio::test]
async fn bad_tokens_are_rejected_and_recorded() {
    let cp = start().await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let worker = WorkerId::from_u64_pair(1, 2);
    let hello = WorkerHello {
        worker,
        token: "nope".into(),
        provider: "local".into(),
        labels: BTreeMap::new(),
        image: None,
        capacity: 1,
        running: Vec::new(),
    };
    let err = cp
        .worker_hello(hello.clone(), Arc::new(ChanLink(tx.clone())))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Unauthenticated(_)), "{err}");

    let token = cp
        .issue_worker_token(worker, Duration::from_secs(60))
        .await
        .unwrap();
    let ok = WorkerHello {
        token: token.clone(),
        ..hello.clone()
    };
    cp.worker_hello(ok.clone(), Arc::new(ChanLink(tx.clone())))
        .await
        .unwrap();
    let reused = cp
        .worker_hello(ok, Arc::new(ChanLink(tx)))
        .await
        .unwrap_err();
    assert!(reused.to_string().contains("already used"), "{reused}");

    // An expired token: issued for 1 ms, presented once that has passed
    // (time has to pass for a token to expire; nothing to wait on).
    let late = WorkerId::from_u64_pair(1, 3);
    let token = cp
        .issue_worker_token(late, Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (ltx, mut lrx) = mpsc::unbounded_channel();
    let expired = cp
        .worker_hello(
            WorkerHello {
                worker: late,
                token,
                ..hello.clone()
            },
            Arc::new(ChanLink(ltx)),
        )
        .await
        .unwrap_err();
    assert!(matches!(expired, ApiError::Unauthenticated(_)), "{expired}");
    assert!(expired.to_string().contains("expired"), "{expired}");
    assert!(
        lrx.try_recv().is_err(),
        "nothing is sent to a worker whose registration was rejected"
    );
    assert!(
        !cp.workers().await.unwrap().iter().any(|w| w.id == late),
        "a rejected worker is not registered"
    );

    let page = cp
        .audit(&hodei_core::ports::AuditFilter {
            event_type: Some("WorkerRegistrationRejected".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.total, 3);
    let reasons: Vec<String> = page
        .events
        .iter()
        .map(|e| serde_json::to_string(&e.body).unwrap())
        .collect();
    for (i, word) in ["unknown", "already used", "expired"].iter().enumerate() {
        assert!(
            reasons.iter().any(|r| r.contains(word)),
            "rejection {i} ({word}) recorded with its reason: {reasons:?}"
        );
    }
    cp.shutdown().await;
}

#[tokio::test]
async fn invalid_specs_are_refused_before_anything_is_stored() {
    let cp = start().await;
    let mut spec = cmd(&["true"]);
    spec.timeout_secs = Some(0);
    let err = cp.submit(spec, &ctx("c")).await.unwrap_err();
    assert!(err.to_string().contains("timeout_secs"), "{err}");
    let mut spec = cmd(&["true"]);
    spec.provider = Some("nowhere".into());
    let err = cp.submit(spec, &ctx("c")).await.unwrap_err();
    assert!(err.to_string().contains("nowhere"), "{err}");
    let page = cp.list_jobs(&Default::default()).await.unwrap();
    assert!(page.jobs.is_empty());
    cp.shutdown().await;
}

#[tokio::test]
async fn a_token_presented_with_the_wrong_worker_id_stays_usable() {
    let cp = start().await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let right = WorkerId::from_u64_pair(7, 1);
    let typo = WorkerId::from_u64_pair(7, 2);
    let token = cp
        .issue_worker_token(right, Duration::from_secs(60))
        .await
        .unwrap();
    let hello = WorkerHello {
        worker: typo,
        token: token.clone(),
        provider: "local".into(),
        labels: BTreeMap::new(),
        image: None,
        capacity: 1,
        running: Vec::new(),
    };
    let err = cp
        .worker_hello(hello.clone(), Arc::new(ChanLink(tx.clone())))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Unauthenticated(_)), "{err}");
    assert!(err.to_string().contains("another worker"), "{err}");

    let page = cp
        .audit(&hodei_core::ports::AuditFilter {
            event_type: Some("WorkerRegistrationRejected".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.total, 1);

    // The worker the token was issued for still registers with it.
    let ok = WorkerHello {
        worker: right,
        ..hello
    };
    cp.worker_hello(ok, Arc::new(ChanLink(tx))).await.unwrap();
    cp.shutdown().await;
}
