//! Handlers of `/api/v1` and of the operational routes. Each is a thin
//! translation: parse and check the input (saying what is accepted when it
//! is refused), call the control plane, shape the answer.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream, StreamExt};
use hodei_core::event::EVENT_TYPES;
use hodei_core::ids::{JobId, WorkerId};
use hodei_core::job::JobState;
use hodei_core::ports::{AuditFilter, JobFilter, RequestContext};
use hodei_core::runtime::Submitted;
use hodei_core::spec::RawJobSpec;
use hodei_core::time::Timestamp;

use crate::AppState;
use crate::dto::{
    AuditPageDto, AuditQueryParams, DrainDto, ErrorBody, EventDto, HealthDto, JobDto, JobEventsDto,
    JobPageDto, JobSpecDto, JobStateDto, ListJobsQuery, LogLineDto, LogPageDto, LogsQuery,
    ProviderDto, ProvidersDto, WorkerDto, WorkersDto,
};
use crate::error::HttpError;
use crate::metrics;

/// Fields of a job spec and what each accepts, for error messages.
use hodei_core::spec::RAW_SPEC_FIELDS as SPEC_FIELDS;

// ---------------------------------------------------------------- jobs

/// Submit a job.
///
/// The body is a job spec. With an `Idempotency-Key` header (or the
/// spec's `idempotency_key`), a repeated submission returns the job the
/// first one created, with the header `idempotent-replayed: true`.
#[utoipa::path(
    post,
    path = "/api/v1/jobs",
    tag = "jobs",
    request_body(content = JobSpecDto, description = "The job spec", content_type = "application/json"),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the submission idempotent; stored as the spec's `idempotency_key`"),
    ),
    responses(
        (status = 201, description = "Accepted (or replayed)", body = JobDto,
            headers(
                ("location" = String, description = "URL of the job"),
                ("idempotent-replayed" = String, description = "`true` when an earlier job with the same key was returned"),
            )),
        (status = 400, description = "Bad spec", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 503, description = "Store unavailable", body = ErrorBody),
    ),
    security(("bearer" = []), ("access_token" = [])),
)]
pub(crate) async fn submit_job(
    State(st): State<AppState>,
    Extension(ctx): Extension<RequestContext>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let body = body.map_err(|e| body_error(e, st.config.max_body_bytes))?;
    let mut spec = parse_spec(&body)?;
    if let Some(key) = idempotency_header(&headers)? {
        match &spec.idempotency_key {
            Some(k) if *k != key => {
                return Err(HttpError::InvalidArgument(format!(
                    "the Idempotency-Key header ({key:?}) and the spec's idempotency_key ({k:?}) differ; accepted: either one, or both equal"
                )));
            }
            _ => spec.idempotency_key = Some(key),
        }
    }
    // `replayed` comes from the store's atomic create (new or existing
    // job), not from clocks: it holds across replicas.
    let Submitted { job, replayed } = st
        .cp
        .submit_with_outcome(RawJobSpec::from(spec), &ctx)
        .await?;
    let location = format!("/api/v1/jobs/{}", job.id);
    let mut response = (StatusCode::CREATED, Json(JobDto::from(job))).into_response();
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&location) {
        h.insert(header::LOCATION, v);
    }
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// List jobs, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/jobs",
    tag = "jobs",
    params(ListJobsQuery),
    responses(
        (status = 200, description = "A page of jobs", body = JobPageDto),
        (status = 400, description = "Bad state, limit or cursor", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = []), ("access_token" = [])),
)]
pub(crate) async fn list_jobs(
    State(st): State<AppState>,
    query: Result<Query<ListJobsQuery>, QueryRejection>,
) -> Result<Json<JobPageDto>, HttpError> {
    let Query(q) = query.map_err(query_error)?;
    let state = match q.state.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
        Some(s) => Some(s.parse::<JobState>().map_err(HttpError::InvalidArgument)?),
        None => None,
    };
    let limit = parse_number("limit", q.limit.as_deref(), 1, 1000)?.unwrap_or(100);
    let filter = JobFilter {
        state,
        limit: limit as usize,
        cursor: q.cursor.filter(|c| !c.is_empty()),
    };
    let page = st.cp.list_jobs(&filter).await?;
    Ok(Json(JobPageDto {
        jobs: page.jobs.into_iter().map(JobDto::from).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// One job.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id (UUID)")),
    responses(
        (status = 200, description = "The job", body = JobDto),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown job", body = ErrorBody),
    ),
    security(("bearer" = []), ("access_token" = [])),
)]
pub(crate) async fn get_job(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobDto>, HttpError> {
    let id = job_id(&id)?;
    Ok(Json(st.cp.job(id).await?.into()))
}

/// Cancel a job in any non-terminal state.
#[utoipa::path(
    post,
    path = "/api/v1/jobs/{id}/cancel",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id (UUID)")),
    responses(
        (status = 200, description = "The job, cancelled", body = JobDto),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown job", body = ErrorBody),
        (status = 409, description = "Already terminal", body = ErrorBody),
    ),
    security(("bearer" = []), ("access_token" = [])),
)]
pub(crate) async fn cancel_job(
    State(st): State<AppState>,
    Extension(ctx): Extension<RequestContext>,
    Path(id): Path<String>,
) -> Result<Json<JobDto>, HttpError> {
    let id = job_id(&id)?;
    Ok(Json(st.cp.cancel(id, &ctx).await?.into()))
}

/// A job's output.
///
/// As JSON, a page of lines with `seq > after`. With
/// `Accept: text/event-stream`, a live stream of Server-Sent Events: every
/// line so far with `seq > after` (or `> Last-Event-ID`, when that header
/// is sent and greater), then new lines as they are stored. Each line is an
/// event `log` whose `id` is the line's `seq` and whose data is a
/// `LogLineDto`. When the job is terminal and its last line was sent, one
/// event `end` carries the final `JobDto` and the stream closes (clients
/// must stop on `end`: EventSource would otherwise reconnect).
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{id}/logs",
    tag = "jobs",
    params(
        ("id" = String, Path, description = "Job id (UUID)"),
        LogsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "SSE resume point: the last `seq` received"),
    ),
    responses(
        (status = 200, description = "Log lines (JSON) or a live stream (SSE)",
            content(
                (LogPageDto = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 400, description = "Bad id, after or limit", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown job", body = ErrorBody),
    ),
    security(("bearer" = []), ("access_token" = [])),
)]
pub(crate) async fn job_logs(
    State(st): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<LogsQuery>, QueryRejection>,
) -> Result<Response, HttpError> {
    let id = job_id(&id)?;
    let Query(q) = query.map_err(query_error)?;
    let after = parse_count("after", q.after.as_deref())?.unwrap_or(0);
    if wants_event_stream(&headers) {
        let resume = match headers.get("last-event-id") {
            None => 0,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    HttpError::InvalidArgument(
                        "invalid Last-Event-ID header; accepted: the seq of the last log line received (a whole number)"
                            .into(),
                    )
                })?,
        };
        // 404 before the stream starts, not inside it.
        st.cp.job(id).await?;
        return Ok(log_stream(st, id, after.max(resume)).into_response());
    }
    let limit = parse_number("limit", q.limit.as_deref(), 1, 10_000)?.unwrap_or(1000);
    // The state first: if it is terminal, the lines read next are complete.
    let job = st.cp.job(id).await?;
    let lines = st.cp.read_logs(id, after, limit as usize).await?;
    let next_after = lines.last().map_or(after, |l| l.seq);
    Ok(Json(LogPageDto {
        lines: lines.into_iter().map(LogLineDto::from).collect(),
        next_after,
        job_state: JobStateDto::from(job.state()),
    })
    .into_response())
}

fn wants_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().starts_with("text/event-stream"))
}

/// How long a live log stream waits for a line before checking whether its
/// job ended.
const IDLE_CHECK: Duration = Duration::from_secs(5);

fn log_stream(st: AppState, id: JobId, after: u64) -> impl IntoResponse {
    let lines = st.cp.follow_logs(id, after).map(|r| match r {
        Ok(line) => {
            let seq = line.seq;
            let data = serde_json::to_string(&LogLineDto::from(line)).unwrap_or_default();
            (
                Event::default().event("log").id(seq.to_string()).data(data),
                false,
            )
        }
        Err(e) => {
            let e = HttpError::from(e);
            (Event::default().event("error").data(error_json(&e)), true)
        }
    });
    // Stop after an error; otherwise, once the log is complete, send `end`.
    // A log the store never marked complete (its job ended while no server
    // could say so) would keep the stream open for ever: when no line has
    // come for a while and the job is terminal, the stream ends anyway.
    let cp = st.cp.clone();
    let events = stream::unfold((Box::pin(lines), false), move |(mut lines, done)| {
        let cp = cp.clone();
        async move {
            if done {
                return None;
            }
            let next = loop {
                match tokio::time::timeout(IDLE_CHECK, lines.next()).await {
                    Ok(next) => break next,
                    Err(_) => match cp.job(id).await {
                        Ok(job) if job.is_terminal() => break None,
                        _ => continue,
                    },
                }
            };
            match next {
                Some((event, failed)) => Some((event, (lines, failed))),
                None => {
                    let end = match cp.job(id).await {
                        Ok(job) => {
                            let data =
                                serde_json::to_string(&JobDto::from(job)).unwrap_or_default();
                            Event::default().event("end").data(data)
                        }
                        Err(e) => Event::default()
                            .event("error")
                            .data(error_json(&HttpError::from(e))),
                    };
                    Some((end, (lines, true)))
                }
            }
        }
    });
    let events: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(events.map(Ok::<_, Infallible>));
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    // Tell buffering reverse proxies (nginx) to pass events through at once.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn error_json(e: &HttpError) -> String {
    serde_json::to_string(&ErrorBody {
        error: crate::dto::ErrorDetail {
            code: e.code().into(),
            message: e.to_string(),
        },
    })
    .unwrap_or_default()
}

/// A job's events, in order.
#[utoipa::path(
    get,
    path = "/api/v1/jobs/{id}/events",
    tag = "jobs",
    params(("id" = String, Path, description = "Job id (UUID)")),
    responses(
        (status = 200, description = "The job's events", body = JobEventsDto),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown job", body = ErrorBody),
    ),
    security(("bearer" = []), ("access_token" = [])),
)]
pub(crate) async fn job_events(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobEventsDto>, HttpError> {
    let id = job_id(&id)?;
    let events = st.cp.job_events(id).await?;
    Ok(Json(JobEventsDto {
        events: events.into_iter().map(EventDto::from).collect(),
    }))
}

// ---------------------------------------------------------------- workers, providers, audit

/// Workers known to the server.
#[utoipa::path(
    get,
    path = "/api/v1/workers",
    tag = "workers",
    responses(
        (status = 200, description = "The workers", body = WorkersDto),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = []), ("access_token" = [])),
)]
pub(crate) async fn list_workers(
    State(st): State<AppState>,
) -> Result<Json<WorkersDto>, HttpError> {
    let workers = st.cp.workers().await?;
    Ok(Json(WorkersDto {
        workers: workers.into_iter().map(WorkerDto::from).collect(),
    }))
}

/// Drain a worker: it takes no new work, finishes what it runs, then goes
/// away.
#[utoipa::path(
    post,
    path = "/api/v1/workers/{id}/drain",
    tag = "workers",
    params(("id" = String, Path, description = "Worker id (UUID)")),
    responses(
        (status = 202, description = "Draining", body = DrainDto),
        (status = 400, description = "Not a UUID", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown worker", body = ErrorBody),
        (status = 409, description = "The worker cannot drain in its state", body = ErrorBody),
    ),
    security(("bearer" = []), ("access_token" = [])),
)]
pub(crate) async fn drain_worker(
    State(st): State<AppState>,
    Extension(ctx): Extension<RequestContext>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DrainDto>), HttpError> {
    let id: WorkerId = id
        .parse()
        .map_err(|e: hodei_core::error::IdError| HttpError::InvalidArgument(e.to_string()))?;
    st.cp.drain_worker(id, &ctx).await?;
    let state = st
        .cp
        .workers()
        .await
        .ok()
        .and_then(|ws| ws.into_iter().find(|w| w.id == id))
        .map(|w| w.state.into());
    Ok((
        StatusCode::ACCEPTED,
        Json(DrainDto {
            worker_id: id.0,
            state,
        }),
    ))
}

/// Configured providers and their health.
#[utoipa::path(
    get,
    path = "/api/v1/providers",
    tag = "providers",
    responses(
        (status = 200, description = "The providers", body = ProvidersDto),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = []), ("access_token" = [])),
)]
pub(crate) async fn list_providers(
    State(st): State<AppState>,
) -> Result<Json<ProvidersDto>, HttpError> {
    let providers = st.cp.providers().await?;
    Ok(Json(ProvidersDto {
        providers: providers.into_iter().map(ProviderDto::from).collect(),
    }))
}

/// Search the audit trail (every domain event), in sequence order.
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "audit",
    params(AuditQueryParams),
    responses(
        (status = 200, description = "A page of events and the total", body = AuditPageDto),
        (status = 400, description = "Bad filter", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = []), ("access_token" = [])),
)]
pub(crate) async fn audit(
    State(st): State<AppState>,
    query: Result<Query<AuditQueryParams>, QueryRejection>,
) -> Result<Json<AuditPageDto>, HttpError> {
    let Query(q) = query.map_err(query_error)?;
    let nonempty = |s: Option<String>| s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    let event_type = nonempty(q.event_type);
    if let Some(t) = event_type
        .as_ref()
        .filter(|t| !EVENT_TYPES.contains(&t.as_str()))
    {
        return Err(HttpError::InvalidArgument(format!(
            "unknown event_type {t:?}; accepted: {}",
            EVENT_TYPES.join(", ")
        )));
    }
    let limit = parse_number("limit", q.limit.as_deref(), 1, 1000)?.unwrap_or(100);
    let offset = parse_count("offset", q.offset.as_deref())?.unwrap_or(0);
    let filter = AuditFilter {
        correlation_id: nonempty(q.correlation_id),
        event_type,
        actor: nonempty(q.actor),
        since: parse_time("since", nonempty(q.since))?,
        until: parse_time("until", nonempty(q.until))?,
        limit: limit as usize,
        offset: usize::try_from(offset).unwrap_or(usize::MAX),
    };
    let page = st.cp.audit(&filter).await?;
    Ok(Json(AuditPageDto {
        events: page.events.into_iter().map(EventDto::from).collect(),
        total: page.total,
        limit: limit as u32,
        offset,
    }))
}

// ---------------------------------------------------------------- operational routes

/// This OpenAPI document.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    responses(
        (status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
    ),
    security(("bearer" = []), ("access_token" = [])),
)]
pub(crate) async fn openapi_v1(State(st): State<AppState>) -> Response {
    openapi_response(&st)
}

/// This OpenAPI document, without authentication.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)),
)]
pub(crate) async fn openapi_root(State(st): State<AppState>) -> Response {
    openapi_response(&st)
}

fn openapi_response(st: &AppState) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        st.openapi.as_str().to_owned(),
    )
        .into_response()
}

/// Prometheus metrics (text exposition format 0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses((status = 200, description = "The metrics", content_type = "text/plain", body = String)),
)]
pub(crate) async fn metrics(State(st): State<AppState>) -> Response {
    let text = st.config.metrics.render().await;
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

/// Liveness: the process answers.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "meta",
    responses((status = 200, description = "Up", body = HealthDto)),
)]
pub(crate) async fn healthz() -> Json<HealthDto> {
    Json(HealthDto {
        status: "ok".into(),
    })
}

/// Readiness: the stores answer.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "meta",
    responses(
        (status = 200, description = "Ready", body = HealthDto),
        (status = 503, description = "A store does not answer", body = ErrorBody),
    ),
)]
pub(crate) async fn readyz(State(st): State<AppState>) -> Result<Json<HealthDto>, HttpError> {
    st.cp.ready().await.map_err(|e| match HttpError::from(e) {
        HttpError::Unavailable(m) => HttpError::Unavailable(m),
        other => HttpError::Unavailable(format!("not ready: {other}")),
    })?;
    Ok(Json(HealthDto {
        status: "ready".into(),
    }))
}

/// Fallback of unknown paths.
pub(crate) async fn route_not_found(uri: axum::http::Uri) -> HttpError {
    HttpError::NotFound(format!(
        "no route {}; see /openapi.json for the routes",
        uri.path()
    ))
}

/// Fallback of known paths asked with another method.
pub(crate) async fn method_not_allowed(
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> HttpError {
    HttpError::MethodNotAllowed(format!(
        "{method} is not allowed on {}; see /openapi.json for the routes",
        uri.path()
    ))
}

// ---------------------------------------------------------------- input helpers

fn job_id(s: &str) -> Result<JobId, HttpError> {
    s.parse::<JobId>()
        .map_err(|e| HttpError::InvalidArgument(e.to_string()))
}

fn body_error(e: BytesRejection, max: usize) -> HttpError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        HttpError::PayloadTooLarge(format!(
            "request body is larger than {max} bytes; accepted: at most {max} bytes"
        ))
    } else {
        HttpError::InvalidArgument(format!(
            "could not read the request body: {}",
            e.body_text()
        ))
    }
}

fn query_error(e: QueryRejection) -> HttpError {
    let text = e.body_text();
    let detail = text
        .strip_prefix("Failed to deserialize query string: ")
        .unwrap_or(&text);
    // "name: unknown field `name`, expected one of `a`, `b`"
    if let Some(at) = detail.find("unknown field `") {
        let quoted: Vec<&str> = detail[at..].split('`').skip(1).step_by(2).collect();
        if let Some((unknown, accepted)) = quoted.split_first() {
            return HttpError::InvalidArgument(format!(
                "unknown query parameter `{unknown}`; accepted: {}",
                accepted.join(", ")
            ));
        }
    }
    HttpError::InvalidArgument(format!("invalid query string: {detail}"))
}

fn idempotency_header(headers: &HeaderMap) -> Result<Option<String>, HttpError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .map(str::trim)
        .filter(|s| (1..=256).contains(&s.len()))
        .map(|s| Some(s.to_owned()))
        .ok_or_else(|| {
            HttpError::InvalidArgument(
                "invalid Idempotency-Key header; accepted: 1 to 256 printable ASCII characters"
                    .into(),
            )
        })
}

/// Parses the body as a job spec. Serde errors name the field (its path)
/// and say what the field accepts.
fn parse_spec(body: &[u8]) -> Result<JobSpecDto, HttpError> {
    let example = r#"{"command": ["echo", "hello"]}"#;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(HttpError::InvalidArgument(format!(
            "request body is empty; accepted: a JSON job spec object such as {example}"
        )));
    }
    // serde would also read a struct from an array of its fields; only
    // objects are accepted.
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        let fields = SPEC_FIELDS
            .iter()
            .map(|(f, _)| *f)
            .collect::<Vec<_>>()
            .join(", ");
        return Err(HttpError::InvalidArgument(format!(
            "invalid job spec: the body is not a JSON object; accepted: a JSON object with the fields {fields}, such as {example}"
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let spec: JobSpecDto = match serde_path_to_error::deserialize(&mut de) {
        Ok(spec) => spec,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            return Err(spec_json_error(&path, &inner, example));
        }
    };
    de.end().map_err(|e| {
        HttpError::InvalidArgument(format!(
            "request body is not valid JSON: {e}; accepted: one JSON job spec object"
        ))
    })?;
    Ok(spec)
}

fn spec_json_error(path: &str, e: &serde_json::Error, example: &str) -> HttpError {
    use serde_json::error::Category;
    let fields = SPEC_FIELDS
        .iter()
        .map(|(f, _)| *f)
        .collect::<Vec<_>>()
        .join(", ");
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => HttpError::InvalidArgument(format!(
            "request body is not valid JSON: {e}; accepted: a JSON job spec object such as {example}"
        )),
        Category::Data => {
            let msg = e.to_string();
            if msg.starts_with("unknown field") {
                let field = msg
                    .split('`')
                    .nth(1)
                    .map_or_else(|| path.to_owned(), |f| field_path(path, f));
                return HttpError::InvalidArgument(format!(
                    "invalid job spec: unknown field `{field}`; accepted fields: {}",
                    if path.starts_with("resources") {
                        "cpu, memory_mb".to_owned()
                    } else {
                        fields
                    }
                ));
            }
            if path == "." || path.is_empty() {
                return HttpError::InvalidArgument(format!(
                    "invalid job spec: {msg}; accepted: a JSON object with the fields {fields}"
                ));
            }
            let top = path.split(['.', '[']).next().unwrap_or(path);
            let accepted = SPEC_FIELDS
                .iter()
                .find(|(f, _)| *f == top)
                .map_or("see the JobSpec schema in /openapi.json", |(_, a)| a);
            HttpError::InvalidArgument(format!(
                "invalid job spec: `{path}` {msg}; accepted: {accepted}"
            ))
        }
    }
}

/// The path of an unknown field: the field itself at the top level, or
/// under its parent (`resources.gpu`).
fn field_path(path: &str, field: &str) -> String {
    match path.rsplit_once('.') {
        Some((parent, _)) if !parent.is_empty() => format!("{parent}.{field}"),
        _ => field.to_owned(),
    }
}

fn parse_number<T>(name: &str, value: Option<&str>, min: T, max: T) -> Result<Option<T>, HttpError>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match v.parse::<T>() {
        Ok(n) if n >= min && n <= max => Ok(Some(n)),
        _ => Err(HttpError::InvalidArgument(format!(
            "invalid `{name}` {v:?}; accepted: a whole number {min}..={max}"
        ))),
    }
}

/// A non-negative whole number (`after`, `offset`).
fn parse_count(name: &str, value: Option<&str>) -> Result<Option<u64>, HttpError> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    v.parse::<u64>().map(Some).map_err(|_| {
        HttpError::InvalidArgument(format!(
            "invalid `{name}` {v:?}; accepted: a whole number, 0 or more"
        ))
    })
}

fn parse_time(name: &str, value: Option<String>) -> Result<Option<Timestamp>, HttpError> {
    let Some(v) = value else {
        return Ok(None);
    };
    chrono::DateTime::parse_from_rfc3339(&v)
        .map(|t| Some(t.with_timezone(&chrono::Utc)))
        .map_err(|e| {
            HttpError::InvalidArgument(format!(
                "invalid `{name}` {v:?} ({e}); accepted: an RFC 3339 timestamp such as 2025-01-31T12:00:00Z"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> String {
        parse_spec(body.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn spec_errors_name_the_field_and_what_is_accepted() {
        let e = err(r#"{"command": ["true"], "timeout_secs": "ten"}"#);
        assert!(
            e.contains("`timeout_secs`") && e.contains("whole number of seconds"),
            "{e}"
        );
        let e = err(r#"{"command": ["true"], "colour": "red"}"#);
        assert!(
            e.contains("unknown field `colour`") && e.contains("timeout_secs"),
            "{e}"
        );
        let e = err(r#"{"command": ["true"], "resources": {"gpu": 1}}"#);
        assert!(
            e.contains("unknown field `resources.gpu`") && e.contains("memory_mb"),
            "{e}"
        );
        let e = err(r#"{"command": "true"}"#);
        assert!(
            e.contains("`command`") && e.contains("list of strings"),
            "{e}"
        );
        let e = err(r#"{"command": [1]}"#);
        assert!(e.contains("`command[0]`"), "{e}");
        let e = err(r#"{"command": ["#);
        assert!(e.starts_with("request body is not valid JSON"), "{e}");
        let e = err("[]");
        assert!(e.contains("a JSON object with the fields"), "{e}");
        let e = err("  ");
        assert!(e.contains("request body is empty"), "{e}");
        let e = err(r#"{"command": ["true"]} {}"#);
        assert!(e.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn numbers_and_times() {
        assert_eq!(parse_number("limit", Some("5"), 1u32, 10).unwrap(), Some(5));
        assert!(parse_number("limit", Some("0"), 1u32, 10).is_err());
        assert!(
            parse_number("limit", Some("x"), 1u32, 10)
                .unwrap_err()
                .to_string()
                .contains("1..=10")
        );
        assert_eq!(parse_number::<u32>("limit", None, 1, 10).unwrap(), None);
        assert!(
            parse_time("since", Some("2025-01-31T12:00:00Z".into()))
                .unwrap()
                .is_some()
        );
        assert!(
            parse_time("since", Some("yesterday".into()))
                .unwrap_err()
                .to_string()
                .contains("RFC 3339")
        );
    }
}
