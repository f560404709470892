//! Worker liveness through the control plane: a worker the heartbeat
//! timeout disconnected is revived by a log batch of its session.
#![cfg(feature = "runtime")]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use hodei_core::engine::{AttemptReport, ProviderConfig};
use hodei_core::event::{DomainEvent, EventBody};
use hodei_core::ids::{Actor, CorrelationId, ProviderId, WorkerId};
use hodei_core::job::JobState;
use hodei_core::ports::{
    LogStream, NewLogLine, ProviderError, ProviderHealth, ProvisionedWorker, RequestContext,
    ToWorker, WorkerExit, WorkerLaunch, WorkerLink, WorkerProvider,
};
use hodei_core::runtime::{
    ControlPlane, FromWorker, ProviderSetup, RuntimeConfig, Stores, WorkerHello, now_utc,
};
use hodei_core::spec::RawJobSpec;
use tokio::sync::mpsc;

/// Hands every launch to the test, which plays the agent.
struct HandProvider {
    id: ProviderId,
    launches: mpsc::UnboundedSender<WorkerLaunch>,
}

#[async_trait]
impl WorkerProvider for HandProvider {
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
        let _ = self.launches.send(launch);
        Ok(())
    }
    async fn destroy(&self, _worker: WorkerId) -> Result<(), ProviderError> {
        Ok(())
    }
    async fn health(&self) -> ProviderHealth {
        ProviderHealth {
            healthy: true,
            message: "ok".into(),
        }
    }
    async fn list(&self) -> Result<Vec<ProvisionedWorker>, ProviderError> {
        Ok(Vec::new())
    }
    fn exits(&self) -> BoxStream<'static, WorkerExit> {
        futures::stream::pending().boxed()
    }
}

struct ChanLink(mpsc::UnboundedSender<ToWorker>);

#[async_trait]
impl WorkerLink for ChanLink {
    async fn send(&self, message: ToWorker) -> Result<(), String> {
        self.0.send(message).map_err(|_| "closed".to_owned())
    }
}

/// The next event of the stream matching `f` (a guard fails the test if
/// it never comes).
async fn next_matching(
    events: &mut BoxStream<'static, Result<DomainEvent, hodei_core::runtime::ApiError>>,
    what: &str,
    f: impl Fn(&EventBody) -> bool,
) -> DomainEvent {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let e = events.next().await.expect("event stream open").unwrap();
            if f(&e.body) {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} event"))
}

#[tokio::test]
async fn a_log_batch_revives_a_worker_the_heartbeat_timeout_disconnected() {
    let (launches_tx, mut launches) = mpsc::unbounded_channel();
    let mut config = RuntimeConfig::default();
    config.engine.heartbeat_timeout = Duration::from_millis(300);
    config.engine.reconnect_grace = Duration::from_secs(600);
    let cp = ControlPlane::start(
        config,
        Stores::memory(),
        vec![ProviderSetup {
            config: ProviderConfig::ephemeral("local", "local", false, 4),
            provider: Arc::new(HandProvider {
                id: ProviderId::new("local"),
                launches: launches_tx,
            }),
        }],
    )
    .await
    .unwrap();
    let mut events = cp.watch_events(0);
    let ctx = RequestContext {
        correlation_id: CorrelationId::new("corr-live"),
        actor: Actor::new("tester"),
    };
    let spec = RawJobSpec {
        command: Some(vec!["true".into()]),
        ..Default::default()
    };
    let job = cp.submit(spec, &ctx).await.unwrap();

    // Play the agent: register, take the job, acknowledge it.
    let launch = launches.recv().await.unwrap();
    let w = launch.worker;
    let (tx, mut rx) = mpsc::unbounded_channel();
    cp.worker_hello(
        WorkerHello {
            worker: w,
            token: launch.token,
            provider: "local".into(),
            labels: BTreeMap::new(),
            image: None,
            capacity: 1,
            running: Vec::new(),
        },
        Arc::new(ChanLink(tx)),
    )
    .await
    .unwrap();
    let attempt = loop {
        if let Some(ToWorker::Run(run)) = rx.recv().await {
            break run.job.attempt;
        }
    };
    cp.worker_message(
        w,
        FromWorker::Ack {
            job: job.id,
            attempt,
        },
    )
    .await
    .unwrap();

    // Silent (no heartbeat): the timeout disconnects it.
    next_matching(
        &mut events,
        "WorkerDisconnected",
        |b| matches!(b, EventBody::WorkerDisconnected { worker_id, .. } if *worker_id == w),
    )
    .await;

    // Output on its session is a sign of life.
    let line = NewLogLine {
        agent_seq: 1,
        stream: LogStream::Stdout,
        at: now_utc(),
        text: "still here".into(),
    };
    cp.worker_message(
        w,
        FromWorker::Logs {
            job: job.id,
            attempt,
            lines: vec![line],
        },
    )
    .await
    .unwrap();
    next_matching(
        &mut events,
        "WorkerReconnected",
        |b| matches!(b, EventBody::WorkerReconnected { worker_id, .. } if *worker_id == w),
    )
    .await;

    cp.worker_message(
        w,
        FromWorker::Result {
            job: job.id,
            attempt,
            report: AttemptReport {
                exit_code: Some(0),
                ..AttemptReport::default()
            },
        },
    )
    .await
    .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), cp.wait_terminal(job.id))
        .await
        .expect("the job ends")
        .unwrap();
    assert_eq!(done.state(), JobState::Succeeded);
    let lines: Vec<String> = cp
        .follow_logs(job.id, 0)
        .map(|l| l.unwrap().text)
        .collect()
        .await;
    assert_eq!(lines, vec!["still here"]);
    cp.shutdown().await;
}
