//! The client API services (`api.proto`) over a [`ControlPlane`].
//!
//! Every handler reads the [`RequestContext`] the auth interceptor stored,
//! validates ids, calls the control plane, and echoes the correlation id.
//! Long-lived streams (log follow, job watch) end when the server shuts
//! down, so that a graceful shutdown never waits on a client.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use hodei_core::ids::{JobId, WorkerId};
use hodei_core::ports::{AuditFilter, JobFilter, RequestContext};
use hodei_core::runtime::{ApiError, ControlPlane};
use hodei_core::spec::JobSpec;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::auth::{context, invalid, reply, status};
use crate::convert::{self, ConvertError};
use crate::proto;
use crate::proto::audit_service_server::AuditService;
use crate::proto::job_service_server::JobService;
use crate::proto::log_service_server::LogService;
use crate::proto::provider_service_server::ProviderService;
use crate::proto::secret_service_server::SecretService;
use crate::proto::worker_admin_service_server::WorkerAdminService;

/// A boxed response stream.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Event types after which a job may be terminal.
const ENDING_EVENTS: &[&str] = &["JobSucceeded", "JobFailed", "JobCancelled", "JobTimedOut"];

/// Most log lines per streamed chunk.
const LOG_CHUNK: usize = 1000;

/// Most bytes of log lines in one follow chunk or one page, whatever the
/// line count: a stored line can hold 64 KiB of output (more once invalid
/// UTF-8 is replaced), so 1,000 of them would be far over the 16 MiB
/// message limit ([`super::MAX_MESSAGE_SIZE`]). A chunk or page always
/// carries at least one line; a page cut short by this cap is followed by
/// the next one (clients page until an empty page).
pub const LOG_MESSAGE_BYTES: usize = 1024 * 1024;

/// Lines read from the store first when building a page; later reads are
/// sized from the lines' average size so that big lines are not read in
/// their thousands to fill 1 MiB.
const PAGE_FIRST_READ: usize = 64;

/// Bytes `line` adds to an encoded `LogChunk` or `PageLogsResponse`.
fn log_entry_len(line: &proto::LogLine) -> usize {
    use prost::Message;
    let len = line.encoded_len();
    len + prost::length_delimiter_len(len) + 1
}

/// The client API. Cheap to clone.
#[derive(Clone)]
pub struct Api {
    cp: ControlPlane,
    stop: CancellationToken,
    inflight: Arc<InFlight>,
}

impl Api {
    /// Serves `cp`; streams end when `stop` is cancelled.
    pub fn new(cp: ControlPlane, stop: CancellationToken) -> Self {
        Self {
            cp,
            stop,
            inflight: Arc::new(InFlight::default()),
        }
    }

    /// Waits until no unary call is in flight, at most `limit`.
    pub async fn wait_idle(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.inflight.wait_idle()).await;
    }

    fn enter(&self) -> CallGuard {
        self.inflight.count.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.inflight.clone())
    }
}

#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

struct CallGuard(Arc<InFlight>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

fn bad(ctx: &RequestContext, e: ConvertError) -> Status {
    let field = e.field.clone();
    invalid(ctx, &field, e.to_string())
}

fn parse_job(ctx: &RequestContext, s: &str) -> Result<JobId, Status> {
    convert::job_id("job_id", s).map_err(|e| bad(ctx, e))
}

fn parse_worker(ctx: &RequestContext, s: &str) -> Result<WorkerId, Status> {
    convert::worker_id("worker_id", s).map_err(|e| bad(ctx, e))
}

/// Most jobs or events in one page of `ListJobs` or `Audit.Query`.
const MAX_PAGE_LIMIT: u32 = 1000;

/// Page size when a request leaves `limit` at 0 (as HTTP without `limit`).
const DEFAULT_PAGE_LIMIT: u32 = 100;

/// The page size a request asks for: 0 is the default, 1..=1000 is taken
/// as is, anything larger is refused rather than silently capped (so a
/// client never believes it got the page size it asked for).
fn page_limit(ctx: &RequestContext, limit: u32) -> Result<usize, Status> {
    limit_within(ctx, limit, MAX_PAGE_LIMIT, DEFAULT_PAGE_LIMIT)
}

/// Most log lines in one page of `Logs.Page` (as HTTP's log pages).
const MAX_LOG_PAGE_LIMIT: u32 = 10_000;

/// Log lines in a page when a request leaves `limit` at 0.
const DEFAULT_LOG_PAGE_LIMIT: u32 = 1000;

/// `limit` when it is 0 (`default`) or in `1..=max`; refused otherwise.
fn limit_within(ctx: &RequestContext, limit: u32, max: u32, default: u32) -> Result<usize, Status> {
    match limit {
        0 => Ok(default as usize),
        n if n <= max => Ok(n as usize),
        n => Err(invalid(
            ctx,
            "limit",
            format!("`limit` is {n}; accepted: 1..={max} (0 means the default, {default})"),
        )),
    }
}

fn shutting_down() -> Status {
    Status::unavailable("server is shutting down")
}

// ---------------------------------------------------------------- jobs

#[tonic::async_trait]
impl JobService for Api {
    async fn submit(
        &self,
        req: Request<proto::SubmitJobRequest>,
    ) -> Result<Response<proto::SubmitJobResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let spec = req.into_inner().spec.ok_or_else(|| {
            invalid(
                &ctx,
                "spec",
                "`spec` is missing; accepted: a JobSpec".into(),
            )
        })?;
        let raw = convert::spec_from_proto(spec);
        // Parse here first to name the offending field in the metadata.
        if let Err(e) = JobSpec::parse(raw.clone(), self.cp.limits()) {
            return Err(invalid(&ctx, &e.field, e.to_string()));
        }
        let submitted = self
            .cp
            .submit_with_outcome(raw, &ctx)
            .await
            .map_err(|e| status(&ctx, e))?;
        Ok(reply(
            &ctx,
            proto::SubmitJobResponse {
                job: Some(convert::job_to_proto(&submitted.job)),
                replayed: submitted.replayed,
            },
        ))
    }

    async fn get(
        &self,
        req: Request<proto::GetJobRequest>,
    ) -> Result<Response<proto::GetJobResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let id = parse_job(&ctx, &req.get_ref().job_id)?;
        let job = self.cp.job(id).await.map_err(|e| status(&ctx, e))?;
        Ok(reply(
            &ctx,
            proto::GetJobResponse {
                job: Some(convert::job_to_proto(&job)),
            },
        ))
    }

    async fn list(
        &self,
        req: Request<proto::ListJobsRequest>,
    ) -> Result<Response<proto::ListJobsResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let r = req.get_ref();
        let state = convert::job_state_from_proto("state", r.state).map_err(|e| bad(&ctx, e))?;
        let filter = JobFilter {
            state,
            limit: page_limit(&ctx, r.limit)?,
            cursor: (!r.cursor.is_empty()).then(|| r.cursor.clone()),
        };
        let page = self
            .cp
            .list_jobs(&filter)
            .await
            .map_err(|e| status(&ctx, e))?;
        Ok(reply(
            &ctx,
            proto::ListJobsResponse {
                jobs: page.jobs.iter().map(convert::job_to_proto).collect(),
                next_cursor: page.next_cursor.unwrap_or_default(),
            },
        ))
    }

    async fn cancel(
        &self,
        req: Request<proto::CancelJobRequest>,
    ) -> Result<Response<proto::CancelJobResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let id = parse_job(&ctx, &req.get_ref().job_id)?;
        let job = self
            .cp
            .cancel(id, &ctx)
            .await
            .map_err(|e| status(&ctx, e))?;
        Ok(reply(
            &ctx,
            proto::CancelJobResponse {
                job: Some(convert::job_to_proto(&job)),
            },
        ))
    }

    type WatchStream = ResponseStream<proto::WatchJobResponse>;

    async fn watch(
        &self,
        req: Request<proto::WatchJobRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let ctx = context(&req);
        let id = parse_job(&ctx, &req.get_ref().job_id)?;
        let after = req.get_ref().after_sequence;
        let job = self.cp.job(id).await.map_err(|e| status(&ctx, e))?;
        let (tx, rx) = mpsc::channel(64);
        let cp = self.cp.clone();
        let stop = self.stop.clone();
        let err_ctx = ctx.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = watch_job(cp, id, after, job, &tx) => {
                    if let Err(e) = r {
                        let _ = tx.send(Err(status(&err_ctx, e))).await;
                    }
                }
                _ = stop.cancelled() => {
                    let _ = tx.send(Err(shutting_down())).await;
                }
                _ = tx.closed() => {}
            }
        });
        Ok(reply(
            &ctx,
            Box::pin(ReceiverStream::new(rx)) as Self::WatchStream,
        ))
    }

    async fn events(
        &self,
        req: Request<proto::JobEventsRequest>,
    ) -> Result<Response<proto::JobEventsResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let id = parse_job(&ctx, &req.get_ref().job_id)?;
        let events = self.cp.job_events(id).await.map_err(|e| status(&ctx, e))?;
        Ok(reply(
            &ctx,
            proto::JobEventsResponse {
                events: events.iter().map(convert::event_to_proto).collect(),
            },
        ))
    }
}

type WatchTx = mpsc::Sender<Result<proto::WatchJobResponse, Status>>;

/// The job now, its events after `after`, live events, and the job again
/// once it is terminal.
async fn watch_job(
    cp: ControlPlane,
    id: JobId,
    after: u64,
    job: hodei_core::job::Job,
    tx: &WatchTx,
) -> Result<(), ApiError> {
    use proto::watch_job_response::Update;
    let send = |u: Update| async move {
        tx.send(Ok(proto::WatchJobResponse { update: Some(u) }))
            .await
            .is_ok()
    };
    if !send(Update::Job(convert::job_to_proto(&job))).await {
        return Ok(());
    }
    let mut last = after;
    let history = cp.job_events(id).await?;
    // Subscribe from the job's last stored event: the bus replays what
    // came after it, so nothing falls between history and live.
    let from = history.last().map_or(0, |e| e.sequence);
    for e in history.iter().filter(|e| e.sequence > after) {
        if !send(Update::Event(convert::event_to_proto(e))).await {
            return Ok(());
        }
        last = e.sequence;
    }
    let current = cp.job(id).await?;
    if current.is_terminal() {
        for e in cp
            .job_events(id)
            .await?
            .iter()
            .filter(|e| e.sequence > last)
        {
            if !send(Update::Event(convert::event_to_proto(e))).await {
                return Ok(());
            }
        }
        send(Update::Job(convert::job_to_proto(&current))).await;
        return Ok(());
    }
    let mut live = cp.watch_events(from);
    while let Some(e) = live.next().await {
        let e = e?;
        if e.job_id() != Some(id) {
            continue;
        }
        if e.sequence > last {
            last = e.sequence;
            if !send(Update::Event(convert::event_to_proto(&e))).await {
                return Ok(());
            }
        }
        if ENDING_EVENTS.contains(&e.event_type()) {
            let current = cp.job(id).await?;
            if current.is_terminal() {
                // Events committed with the ending one (JobRetryExhausted).
                for e in cp
                    .job_events(id)
                    .await?
                    .iter()
                    .filter(|e| e.sequence > last)
                {
                    if !send(Update::Event(convert::event_to_proto(e))).await {
                        return Ok(());
                    }
                }
                send(Update::Job(convert::job_to_proto(&current))).await;
                return Ok(());
            }
        }
    }
    Err(ApiError::Unavailable("event stream ended".into()))
}

// ---------------------------------------------------------------- logs

#[tonic::async_trait]
impl LogService for Api {
    type FollowStream = ResponseStream<proto::LogChunk>;

    async fn follow(
        &self,
        req: Request<proto::FollowLogsRequest>,
    ) -> Result<Response<Self::FollowStream>, Status> {
        let ctx = context(&req);
        let id = parse_job(&ctx, &req.get_ref().job_id)?;
        // Unknown jobs fail now, not as an empty stream.
        self.cp.job(id).await.map_err(|e| status(&ctx, e))?;
        let (tx, rx) = mpsc::channel(16);
        let mut lines = self.cp.follow_logs(id, req.get_ref().after);
        let stop = self.stop.clone();
        let err_ctx = ctx.clone();
        tokio::spawn(async move {
            // A line read but left out of the previous chunk (size cap).
            let mut carried: Option<proto::LogLine> = None;
            loop {
                let first = match carried.take() {
                    Some(line) => line,
                    None => {
                        let next = tokio::select! {
                            next = lines.next() => next,
                            _ = stop.cancelled() => {
                                let _ = tx.send(Err(shutting_down())).await;
                                return;
                            }
                            _ = tx.closed() => return,
                        };
                        match next {
                            None => return,
                            Some(Ok(l)) => convert::log_line_to_proto(&l),
                            Some(Err(e)) => {
                                let _ = tx.send(Err(status(&err_ctx, e))).await;
                                return;
                            }
                        }
                    }
                };
                // Then whatever is ready now, up to LOG_CHUNK lines and
                // LOG_MESSAGE_BYTES.
                let mut bytes = log_entry_len(&first);
                let mut chunk = proto::LogChunk { lines: vec![first] };
                let mut failed = None;
                let mut ended = false;
                while chunk.lines.len() < LOG_CHUNK {
                    match lines.next().now_or_never() {
                        None => break,
                        Some(None) => {
                            ended = true;
                            break;
                        }
                        Some(Some(Err(e))) => {
                            failed = Some(status(&err_ctx, e));
                            break;
                        }
                        Some(Some(Ok(l))) => {
                            let line = convert::log_line_to_proto(&l);
                            let size = log_entry_len(&line);
                            if bytes + size > LOG_MESSAGE_BYTES {
                                carried = Some(line);
                                break;
                            }
                            bytes += size;
                            chunk.lines.push(line);
                        }
                    }
                }
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
                if let Some(e) = failed {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                if ended {
                    return;
                }
            }
        });
        Ok(reply(
            &ctx,
            Box::pin(ReceiverStream::new(rx)) as Self::FollowStream,
        ))
    }

    async fn page(
        &self,
        req: Request<proto::PageLogsRequest>,
    ) -> Result<Response<proto::PageLogsResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let r = req.get_ref();
        let id = parse_job(&ctx, &r.job_id)?;
        let limit = limit_within(&ctx, r.limit, MAX_LOG_PAGE_LIMIT, DEFAULT_LOG_PAGE_LIMIT)?;
        let lines = read_page(&self.cp, id, r.after, limit, LOG_MESSAGE_BYTES)
            .await
            .map_err(|e| status(&ctx, e))?;
        Ok(reply(&ctx, proto::PageLogsResponse { lines }))
    }
}

/// Up to `limit` stored lines of job `id` after `after`, stopping before
/// the line that would take the page over `max_bytes` (a page has at least
/// one line). Reads the store in steps sized from the lines seen so far.
async fn read_page(
    cp: &ControlPlane,
    id: JobId,
    mut after: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<proto::LogLine>, ApiError> {
    let mut page = Vec::new();
    let mut bytes = 0;
    let mut read = PAGE_FIRST_READ.min(limit);
    loop {
        let lines = cp.read_logs(id, after, read).await?;
        let got = lines.len();
        for l in &lines {
            let line = convert::log_line_to_proto(l);
            let size = log_entry_len(&line);
            if !page.is_empty() && bytes + size > max_bytes {
                return Ok(page);
            }
            bytes += size;
            after = l.seq;
            page.push(line);
            if page.len() == limit {
                return Ok(page);
            }
        }
        if got < read {
            return Ok(page);
        }
        // As many lines as the average so far says still fit (at least one).
        let average = bytes / page.len().max(1) + 1;
        read = (max_bytes.saturating_sub(bytes) / average + 1).clamp(1, limit - page.len());
    }
}

// ---------------------------------------------------------------- audit

#[tonic::async_trait]
impl AuditService for Api {
    async fn query(
        &self,
        req: Request<proto::AuditQueryRequest>,
    ) -> Result<Response<proto::AuditQueryResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let r = req.into_inner();
        let ts = |field: &str, t: Option<prost_types::Timestamp>| {
            t.map(|t| convert::from_timestamp(field, &t)).transpose()
        };
        let filter = AuditFilter {
            correlation_id: r.correlation_id.filter(|s| !s.is_empty()),
            event_type: r.event_type.filter(|s| !s.is_empty()),
            actor: r.actor.filter(|s| !s.is_empty()),
            since: ts("since", r.since).map_err(|e| bad(&ctx, e))?,
            until: ts("until", r.until).map_err(|e| bad(&ctx, e))?,
            limit: page_limit(&ctx, r.limit)?,
            offset: r.offset as usize,
        };
        if let Some(t) = &filter.event_type
            && !hodei_core::event::EVENT_TYPES.contains(&t.as_str())
        {
            return Err(invalid(
                &ctx,
                "event_type",
                format!(
                    "unknown event type {t:?}; accepted: {}",
                    hodei_core::event::EVENT_TYPES.join(", ")
                ),
            ));
        }
        let page = self.cp.audit(&filter).await.map_err(|e| status(&ctx, e))?;
        Ok(reply(
            &ctx,
            proto::AuditQueryResponse {
                events: page.events.iter().map(convert::event_to_proto).collect(),
                total: page.total,
            },
        ))
    }
}

// ---------------------------------------------------------------- workers

/// Default validity of a token issued by hand.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(600);
/// Longest validity of a token issued by hand.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 86400);

#[tonic::async_trait]
impl WorkerAdminService for Api {
    async fn list(
        &self,
        req: Request<proto::ListWorkersRequest>,
    ) -> Result<Response<proto::ListWorkersResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let workers = self.cp.workers().await.map_err(|e| status(&ctx, e))?;
        Ok(reply(
            &ctx,
            proto::ListWorkersResponse {
                workers: workers.iter().map(convert::worker_to_proto).collect(),
            },
        ))
    }

    async fn drain(
        &self,
        req: Request<proto::DrainWorkerRequest>,
    ) -> Result<Response<proto::DrainWorkerResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let id = parse_worker(&ctx, &req.get_ref().worker_id)?;
        self.cp
            .drain_worker(id, &ctx)
            .await
            .map_err(|e| status(&ctx, e))?;
        Ok(reply(&ctx, proto::DrainWorkerResponse {}))
    }

    async fn issue_token(
        &self,
        req: Request<proto::IssueTokenRequest>,
    ) -> Result<Response<proto::IssueTokenResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let r = req.get_ref();
        let worker = if r.worker_id.is_empty() {
            WorkerId::from_uuid(uuid::Uuid::new_v4())
        } else {
            parse_worker(&ctx, &r.worker_id)?
        };
        let ttl = match r.ttl_secs {
            0 => DEFAULT_TOKEN_TTL,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(invalid(
                &ctx,
                "ttl_secs",
                format!(
                    "ttl_secs is {}; accepted: 1..={}",
                    r.ttl_secs,
                    MAX_TOKEN_TTL.as_secs()
                ),
            ));
        }
        let token = self
            .cp
            .issue_worker_token(worker, ttl)
            .await
            .map_err(|e| status(&ctx, e))?;
        let expires_at = hodei_core::time::add(hodei_core::runtime::now_utc(), ttl);
        Ok(reply(
            &ctx,
            proto::IssueTokenResponse {
                worker_id: worker.to_string(),
                token,
                expires_at: Some(convert::timestamp(expires_at)),
            },
        ))
    }
}

// ---------------------------------------------------------------- providers

#[tonic::async_trait]
impl ProviderService for Api {
    async fn list(
        &self,
        req: Request<proto::ListProvidersRequest>,
    ) -> Result<Response<proto::ListProvidersResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let providers = self.cp.providers().await.map_err(|e| status(&ctx, e))?;
        Ok(reply(
            &ctx,
            proto::ListProvidersResponse {
                providers: providers.iter().map(convert::provider_to_proto).collect(),
            },
        ))
    }
}

// ---------------------------------------------------------------- secrets

#[tonic::async_trait]
impl SecretService for Api {
    async fn set(
        &self,
        req: Request<proto::SetSecretRequest>,
    ) -> Result<Response<proto::SetSecretResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let r = req.into_inner();
        self.cp
            .set_secret(&r.name, &r.value, &ctx)
            .await
            .map_err(|e| status(&ctx, e))?;
        Ok(reply(&ctx, proto::SetSecretResponse {}))
    }

    async fn list(
        &self,
        req: Request<proto::ListSecretsRequest>,
    ) -> Result<Response<proto::ListSecretsResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        let secrets = self.cp.list_secrets().await.map_err(|e| status(&ctx, e))?;
        Ok(reply(
            &ctx,
            proto::ListSecretsResponse {
                secrets: secrets.iter().map(convert::secret_meta_to_proto).collect(),
            },
        ))
    }

    async fn delete(
        &self,
        req: Request<proto::DeleteSecretRequest>,
    ) -> Result<Response<proto::DeleteSecretResponse>, Status> {
        let _g = self.enter();
        let ctx = context(&req);
        self.cp
            .delete_secret(&req.get_ref().name, &ctx)
            .await
            .map_err(|e| status(&ctx, e))?;
        Ok(reply(&ctx, proto::DeleteSecretResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use hodei_core::ids::{Actor, CorrelationId};

    use super::*;

    #[test]
    fn page_limits_above_the_maximum_are_refused_not_capped() {
        let ctx = RequestContext {
            correlation_id: CorrelationId::new("c"),
            actor: Actor::system("test"),
        };
        assert_eq!(page_limit(&ctx, 0).unwrap(), 100);
        assert_eq!(page_limit(&ctx, 1).unwrap(), 1);
        assert_eq!(page_limit(&ctx, 1000).unwrap(), 1000);
        let s = page_limit(&ctx, 1001).unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "`limit` is 1001; accepted: 1..=1000 (0 means the default, 100)"
        );
        assert_eq!(
            s.metadata().get(super::super::ERROR_FIELD_HEADER).unwrap(),
            "limit"
        );
        // Log pages: up to 10,000 lines, 0 meaning 1,000.
        let log = |n| limit_within(&ctx, n, MAX_LOG_PAGE_LIMIT, DEFAULT_LOG_PAGE_LIMIT);
        assert_eq!(log(0).unwrap(), 1000);
        assert_eq!(log(10_000).unwrap(), 10_000);
        let s = log(10_001).unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "`limit` is 10001; accepted: 1..=10000 (0 means the default, 1000)"
        );
    }
}
