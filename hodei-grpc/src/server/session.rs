//! The worker side: `WorkerService.Session`, one bidirectional stream per
//! connected agent.
//!
//! The first message must be `hello`; the control plane checks its
//! one-time token ([`ControlPlane::worker_hello`]) and the session answers
//! `welcome` or ends with UNAUTHENTICATED. From then on the agent's
//! messages go to [`ControlPlane::worker_message`] in order, and the
//! control plane talks back through a [`GrpcWorkerLink`]. When the stream
//! ends, for whatever reason, the control plane hears
//! [`ControlPlane::worker_gone`] for that session.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hodei_core::engine::{AttemptReport, RefusalCode};
use hodei_core::ids::JobId;
use hodei_core::ports::{NewLogLine, ToWorker, WorkerLink};
use hodei_core::runtime::{
    ApiError, ControlPlane, DecisionWatch, FromWorker, WorkerHello, attempt_decided,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::api::ResponseStream;
use crate::convert;
use crate::proto;
use crate::proto::server_message::Kind as Out;
use crate::proto::worker_message::Kind as In;
use crate::proto::worker_service_server::WorkerService;

/// How long a new session may take to send its `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Log lines per batch asked of agents: 0, no opinion. Batching is the
/// agent's own setting (`HODEI_LOG_BATCH_SIZE`, else 100 lines); whatever
/// it is, an agent batch stays under 1 MiB
/// ([`crate::agent::MAX_LOG_BATCH_BYTES`]), far below the session's
/// message limit, so the server has nothing to impose.
const LOG_BATCH_SIZE: u32 = 0;
/// Longest time an agent holds log lines before sending them: 0, no
/// opinion (`HODEI_LOG_FLUSH_MS`, else 250 ms).
const LOG_FLUSH_MS: u32 = 0;

/// The worker session service.
#[derive(Clone)]
pub struct Sessions {
    cp: ControlPlane,
    stop: CancellationToken,
    drain_grace: Duration,
}

impl Sessions {
    /// Serves worker sessions for `cp`; sessions end when `stop` is
    /// cancelled. Drained workers get `drain_grace` to finish.
    pub fn new(cp: ControlPlane, stop: CancellationToken, drain_grace: Duration) -> Self {
        Self {
            cp,
            stop,
            drain_grace,
        }
    }
}

/// The control plane's handle on one session: messages are queued to the
/// session's outbound stream (never blocking the control plane).
pub struct GrpcWorkerLink {
    tx: mpsc::UnboundedSender<Result<proto::ServerMessage, Status>>,
    drain_grace: Duration,
}

#[tonic::async_trait]
impl WorkerLink for GrpcWorkerLink {
    async fn send(&self, message: ToWorker) -> Result<(), String> {
        let kind = match message {
            ToWorker::Run(run) => {
                let job = &run.job;
                Out::Run(proto::RunJob {
                    job_id: job.id.to_string(),
                    attempt: job.attempt,
                    spec: Some(convert::spec_to_proto(&job.spec.to_raw())),
                    secrets: run.secrets.clone().into_iter().collect(),
                    correlation_id: job.correlation_id.to_string(),
                })
            }
            ToWorker::Cancel {
                job,
                attempt,
                reason,
            } => Out::Cancel(proto::CancelJob {
                job_id: job.to_string(),
                attempt,
                reason,
            }),
            ToWorker::Drain => Out::Drain(proto::Drain {
                grace_ms: u32::try_from(self.drain_grace.as_millis()).unwrap_or(u32::MAX),
            }),
            ToWorker::Shutdown => Out::Shutdown(proto::Shutdown {}),
        };
        self.tx
            .send(Ok(proto::ServerMessage { kind: Some(kind) }))
            .map_err(|_| "worker session closed".to_owned())
    }
}

#[tonic::async_trait]
impl WorkerService for Sessions {
    type SessionStream = ResponseStream<proto::ServerMessage>;

    async fn session(
        &self,
        req: Request<Streaming<proto::WorkerMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 30s"))??;
        let hello = match first.and_then(|m| m.kind) {
            Some(In::Hello(h)) => h,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be `hello`",
                ));
            }
            None => return Err(Status::cancelled("session closed before hello")),
        };
        let hello = hello_from_proto(hello).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let worker = hello.worker;

        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(GrpcWorkerLink {
            tx: tx.clone(),
            drain_grace: self.drain_grace,
        });
        let welcome = self
            .cp
            .worker_hello(hello, link)
            .await
            .map_err(|e| match e {
                ApiError::Unauthenticated(m) => Status::unauthenticated(m),
                ApiError::InvalidArgument(m) => Status::invalid_argument(m),
                ApiError::NotFound(m) => Status::not_found(m),
                ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
                ApiError::Unavailable(m) => Status::unavailable(m),
                ApiError::Internal(m) => Status::internal(m),
            })?;
        let session = welcome.session;
        tracing::info!(%worker, session, "worker session open");
        let welcome = proto::ServerMessage {
            kind: Some(Out::Welcome(proto::Welcome {
                resume_token: welcome.resume_token,
                heartbeat_interval_ms: u32::try_from(welcome.heartbeat_interval.as_millis())
                    .unwrap_or(u32::MAX),
                log_batch_size: LOG_BATCH_SIZE,
                log_flush_ms: LOG_FLUSH_MS,
            })),
        };

        // Reader: the agent's messages, in order, until the stream ends.
        let cp = self.cp.clone();
        let stop = self.stop.clone();
        // Ends the acknowledgement tasks with the session, so that none
        // holds the outbound stream open after it.
        let session_over = CancellationToken::new();
        tokio::spawn(async move {
            let _over = session_over.clone().drop_guard();
            let reason = loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = stop.cancelled() => break "server shutting down".to_owned(),
                };
                match msg {
                    Ok(Some(m)) => {
                        let Some(kind) = m.kind else { continue };
                        // A result is acknowledged once its attempt is
                        // decided in the store (a duplicate of a decided
                        // attempt is ignored by the control plane): the
                        // agent then forgets it. Until then it keeps it and
                        // sends it again on its next session, so a server
                        // that dies between receiving and storing a result
                        // does not lose it.
                        let ack = match &kind {
                            In::Result(r) => Some(proto::ResultAck {
                                job_id: r.job_id.clone(),
                                attempt: r.attempt,
                            }),
                            _ => None,
                        };
                        let mut decided = None;
                        match from_worker(kind) {
                            Ok(Some(msg)) => {
                                if let FromWorker::Result { job, attempt, .. } = &msg {
                                    // Before the result goes in: the
                                    // decision may be stored at once.
                                    let watch = cp.watch_decision(*job, *attempt);
                                    decided = Some((watch, *job, *attempt));
                                }
                                if let Err(e) = cp.worker_message(worker, msg).await {
                                    tracing::warn!(%worker, error = %e, "worker message failed");
                                    if matches!(e, ApiError::Unavailable(_)) {
                                        break format!("control plane unavailable: {e}");
                                    }
                                }
                            }
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(%worker, error = %e, "malformed worker message ignored")
                            }
                        }
                        if let Some(ack) = ack {
                            match decided {
                                Some((watch, job, attempt)) => {
                                    let (cp, tx) = (cp.clone(), tx.clone());
                                    let over = session_over.clone();
                                    tokio::spawn(async move {
                                        tokio::select! {
                                            _ = ack_once_decided(cp, tx, watch, job, attempt, ack) => {}
                                            _ = over.cancelled() => {}
                                        }
                                    });
                                }
                                // Malformed: nothing to keep it for.
                                None => {
                                    let _ = tx.send(Ok(proto::ServerMessage {
                                        kind: Some(Out::ResultAck(ack)),
                                    }));
                                }
                            }
                        }
                    }
                    Ok(None) => break "stream closed by the worker".to_owned(),
                    Err(s) => break format!("stream error: {}", s.message()),
                }
            };
            tracing::info!(%worker, session, %reason, "worker session ended");
            cp.worker_gone(worker, session, &reason).await;
            // Ends the outbound stream if the control plane still holds the link.
            drop(tx);
        });

        // Writer: welcome first, then whatever the control plane queued
        // (it may already have dispatched a job during the hello).
        let stop = self.stop.clone();
        let out = futures::stream::once(async move { Ok(welcome) })
            .chain(UnboundedReceiverStream::new(rx))
            .take_until(async move { stop.cancelled().await });
        Ok(Response::new(Box::pin(out) as Self::SessionStream))
    }
}

fn hello_from_proto(h: proto::Hello) -> Result<WorkerHello, convert::ConvertError> {
    let worker = convert::worker_id("hello.worker_id", &h.worker_id)?;
    let running = h
        .running
        .iter()
        .map(|r| {
            Ok((
                convert::job_id("hello.running.job_id", &r.job_id)?,
                r.attempt,
            ))
        })
        .collect::<Result<Vec<(JobId, u32)>, convert::ConvertError>>()?;
    Ok(WorkerHello {
        worker,
        token: h.token,
        provider: h.provider,
        labels: h.labels.into_iter().collect(),
        image: (!h.image.is_empty()).then_some(h.image),
        capacity: h.capacity.max(1),
        running,
    })
}

/// The engine's refusal code for a `JobRefused`. Agents from before the
/// `code` field send UNSPECIFIED with the two reasons they knew; those are
/// recognised by their text.
fn refusal_code(code: i32, reason: &str) -> RefusalCode {
    match proto::RefusalCode::try_from(code) {
        Ok(proto::RefusalCode::AtCapacity) => RefusalCode::AtCapacity,
        Ok(proto::RefusalCode::Draining) => RefusalCode::Draining,
        Ok(proto::RefusalCode::Unspecified) | Err(_) => {
            if reason.starts_with("worker is at capacity") {
                RefusalCode::AtCapacity
            } else if reason == "worker is draining" {
                RefusalCode::Draining
            } else {
                RefusalCode::Unspecified
            }
        }
    }
}

/// How long [`ack_once_decided`] waits for a result's attempt to be decided
/// in the store before giving up (the agent then resends the result on its
/// next session).
const RESULT_ACK_PATIENCE: Duration = Duration::from_secs(30);

/// How long [`ack_once_decided`] waits for the control plane's own write
/// of the decision before it asks the store (a stale result, one decided
/// by another replica, or a slow store).
const RESULT_DECISION_WAIT: Duration = Duration::from_secs(3);

/// Sends `ack` once attempt `attempt` of `job` is decided in the store:
/// the job moved on to a later attempt, is terminal, or lists the attempt
/// as finished. Normally `watch` fires right after the control plane's
/// write of the decision commits; otherwise the store is asked, backing
/// off, for up to [`RESULT_ACK_PATIENCE`]. A job the store does not know
/// is acknowledged at once.
async fn ack_once_decided(
    cp: ControlPlane,
    tx: mpsc::UnboundedSender<Result<proto::ServerMessage, Status>>,
    watch: DecisionWatch,
    job: JobId,
    attempt: u32,
    ack: proto::ResultAck,
) {
    let deadline = tokio::time::Instant::now() + RESULT_ACK_PATIENCE;
    let mut decided = watch.decided(RESULT_DECISION_WAIT).await;
    let mut pause = Duration::from_millis(10);
    loop {
        decided = decided
            || match cp.job(job).await {
                Ok(j) => attempt_decided(&j, attempt),
                Err(ApiError::NotFound(_)) => true,
                Err(_) => false,
            };
        if decided {
            let _ = tx.send(Ok(proto::ServerMessage {
                kind: Some(Out::ResultAck(ack)),
            }));
            return;
        }
        if tokio::time::Instant::now() >= deadline || tx.is_closed() {
            tracing::debug!(%job, attempt, "result not acknowledged: attempt not decided in time");
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A worker message as the control plane's input; `None` for a repeated
/// `hello` (ignored).
fn from_worker(kind: In) -> Result<Option<FromWorker>, convert::ConvertError> {
    let job = |s: &str| convert::job_id("job_id", s);
    Ok(Some(match kind {
        In::Hello(_) => return Ok(None),
        In::Heartbeat(_) => FromWorker::Heartbeat,
        In::Ack(a) => FromWorker::Ack {
            job: job(&a.job_id)?,
            attempt: a.attempt,
        },
        In::Refused(r) => FromWorker::Refused {
            job: job(&r.job_id)?,
            attempt: r.attempt,
            code: refusal_code(r.code, &r.reason),
            reason: r.reason,
        },
        In::Logs(b) => FromWorker::Logs {
            job: job(&b.job_id)?,
            attempt: b.attempt,
            lines: b
                .lines
                .into_iter()
                .map(|l| {
                    Ok(NewLogLine {
                        agent_seq: l.seq,
                        stream: convert::log_stream_from_proto(l.stream),
                        at: match &l.at {
                            Some(t) => convert::from_timestamp("lines.at", t)?,
                            None => hodei_core::runtime::now_utc(),
                        },
                        text: l.text,
                    })
                })
                .collect::<Result<_, convert::ConvertError>>()?,
        },
        In::Result(r) => FromWorker::Result {
            job: job(&r.job_id)?,
            attempt: r.attempt,
            report: AttemptReport {
                exit_code: r.exit_code,
                signal: r.signal,
                oom_killed: r.oom_killed,
                timed_out: r.timed_out,
                start_error: (!r.start_error.is_empty()).then_some(r.start_error),
            },
        },
        In::Draining(_) => FromWorker::Draining,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: proto::RefusalCode, reason: &str) -> (RefusalCode, String) {
        let msg = In::Refused(proto::JobRefused {
            job_id: uuid::Uuid::new_v4().to_string(),
            attempt: 3,
            reason: reason.to_owned(),
            code: code as i32,
        });
        let Ok(Some(FromWorker::Refused {
            attempt,
            code,
            reason,
            ..
        })) = from_worker(msg)
        else {
            panic!("a refusal maps to FromWorker::Refused");
        };
        assert_eq!(attempt, 3);
        (code, reason)
    }

    #[test]
    fn refusal_codes_reach_the_engine() {
        use proto::RefusalCode as P;
        assert_eq!(
            refused(P::AtCapacity, "worker is at capacity (1 running)"),
            (
                RefusalCode::AtCapacity,
                "worker is at capacity (1 running)".to_owned()
            )
        );
        assert_eq!(
            refused(P::Draining, "bye"),
            (RefusalCode::Draining, "bye".to_owned())
        );
        assert_eq!(
            refused(P::Unspecified, "empty job id"),
            (RefusalCode::Unspecified, "empty job id".to_owned())
        );
        // Agents without the field: their two reasons are recognised.
        assert_eq!(
            refused(P::Unspecified, "worker is at capacity (2 running)").0,
            RefusalCode::AtCapacity
        );
        assert_eq!(
            refused(P::Unspecified, "worker is draining").0,
            RefusalCode::Draining
        );
        // An unknown code (a newer agent) is unspecified.
        assert_eq!(refusal_code(99, "later"), RefusalCode::Unspecified);
    }
}
