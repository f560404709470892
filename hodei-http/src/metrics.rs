//! Prometheus metrics, rendered in the text exposition format (0.0.4) at
//! `/metrics`.
//!
//! Three sources feed them:
//! - the control plane's own [`Counters`](hodei_core::runtime::Counters)
//!   (jobs submitted and finished, log lines and bytes), read at scrape time;
//! - gauges read at scrape time (queue depth, workers by state, provider
//!   health, event bus lag);
//! - observations made here: HTTP requests (the router's middleware), gRPC
//!   requests ([`Metrics::record_grpc`], called by the gRPC server), and the
//!   job histograms, which a task computes by following the event bus
//!   (`JobCreated` → `JobStarted` → terminal event).
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `hodei_jobs_submitted_total` | counter | | jobs accepted by this server |
//! | `hodei_jobs_finished_total` | counter | `state` | jobs that reached a terminal state, by state |
//! | `hodei_job_duration_seconds` | histogram | `state` | submission to terminal state |
//! | `hodei_job_start_latency_seconds` | histogram | | submission to first `RUNNING` |
//! | `hodei_queue_depth` | gauge | | jobs waiting in the queue |
//! | `hodei_workers` | gauge | `state` | workers by state |
//! | `hodei_provider_healthy` | gauge | `provider` | 1 if the last health check passed |
//! | `hodei_event_bus_lag_events` | gauge | | events stored but not yet seen by the metrics follower (capped at 10000) |
//! | `hodei_event_bus_lag_seconds` | gauge | | age of the last event when the follower received it |
//! | `hodei_event_bus_events_total` | counter | | events the follower received |
//! | `hodei_log_lines_total` | counter | | log lines stored |
//! | `hodei_log_bytes_total` | counter | | log bytes stored |
//! | `hodei_log_lines_dropped_total` | counter | | log lines lost before they were stored: gaps in an attempt's agent sequence numbers, and lines the server discarded other than as duplicates (expected 0) |
//! | `hodei_http_requests_total` | counter | `method`, `route`, `status` | HTTP requests |
//! | `hodei_http_request_duration_seconds` | histogram | `method`, `route` | time to the response head |
//! | `hodei_grpc_requests_total` | counter | `method`, `code` | gRPC requests |
//! | `hodei_grpc_request_duration_seconds` | histogram | `method` | gRPC request duration |

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures::StreamExt;
use hodei_core::event::{DomainEvent, EventBody};
use hodei_core::ids::JobId;
use hodei_core::job::JobState;
use hodei_core::runtime::{ControlPlane, now_utc};
use hodei_core::time::Timestamp;
use hodei_core::worker::WorkerState;

/// Content type of the rendered metrics.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const START_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const DURATION_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0,
    21600.0, 86400.0,
];
const TERMINAL: [JobState; 4] = [
    JobState::Succeeded,
    JobState::Failed,
    JobState::Cancelled,
    JobState::TimedOut,
];
/// Cap of `hodei_event_bus_lag_events` (one store read per scrape).
const LAG_CAP: usize = 10_000;

/// The metrics registry. Cheap to clone; clones share the registry.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Inner {
    http: Mutex<RequestFamily>,
    grpc: Mutex<RequestFamily>,
    jobs: Mutex<JobTimes>,
    bus_events: AtomicU64,
    cp: OnceLock<ControlPlane>,
    follower: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = self.follower.get_mut().ok().and_then(Option::take) {
            h.abort();
        }
    }
}

/// Requests by (method, route or code label) with their durations.
#[derive(Default)]
struct RequestFamily {
    /// (method, label, status or code) → count.
    counts: BTreeMap<(String, String, String), u64>,
    /// (method, route) → durations (gRPC: (method, "")).
    durations: BTreeMap<(String, String), Histogram>,
}

#[derive(Default)]
struct JobTimes {
    /// Jobs seen created and not yet terminal: creation time, started yet.
    open: HashMap<JobId, (Timestamp, bool)>,
    start_latency: Option<Histogram>,
    duration: BTreeMap<&'static str, Histogram>,
    /// Sequence of the last event the follower received.
    last_sequence: u64,
    /// Age of that event when it was received.
    lag_seconds: f64,
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one HTTP request (the router does this itself).
    pub fn record_http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        let mut f = lock(&self.inner.http);
        *f.counts
            .entry((method.to_owned(), route.to_owned(), status.to_string()))
            .or_default() += 1;
        f.durations
            .entry((method.to_owned(), route.to_owned()))
            .or_insert_with(|| Histogram::new(REQUEST_BUCKETS))
            .observe(seconds);
    }

    /// Counts one gRPC request: `method` is the full method name (e.g.
    /// `/hodei.v1.JobService/SubmitJob`), `code` the status code name
    /// (e.g. `OK`, `NOT_FOUND`), `seconds` its duration.
    pub fn record_grpc(&self, method: &str, code: &str, seconds: f64) {
        let mut f = lock(&self.inner.grpc);
        *f.counts
            .entry((method.to_owned(), String::new(), code.to_owned()))
            .or_default() += 1;
        f.durations
            .entry((method.to_owned(), String::new()))
            .or_insert_with(|| Histogram::new(REQUEST_BUCKETS))
            .observe(seconds);
    }

    /// Reads the control plane's counters and gauges at scrape time, and
    /// follows its event bus for the job histograms. Only the first call
    /// has an effect. Outside a tokio runtime, following starts at the
    /// first [`render`](Metrics::render).
    pub fn attach(&self, cp: &ControlPlane) {
        let _ = self.inner.cp.set(cp.clone());
        if tokio::runtime::Handle::try_current().is_ok() {
            self.ensure_follower();
        }
    }

    fn ensure_follower(&self) {
        let Some(cp) = self.inner.cp.get() else {
            return;
        };
        let mut slot = lock(&self.inner.follower);
        if slot.is_none() {
            let task = tokio::spawn(follow(Arc::downgrade(&self.inner), cp.clone()));
            *slot = Some(task.abort_handle());
        }
    }

    /// Renders every metric in the Prometheus text format.
    pub async fn render(&self) -> String {
        self.ensure_follower();
        let mut out = String::with_capacity(8192);
        if let Some(cp) = self.inner.cp.get() {
            self.render_control_plane(cp, &mut out).await;
        }
        self.render_requests(&mut out);
        out
    }

    async fn render_control_plane(&self, cp: &ControlPlane, out: &mut String) {
        let c = cp.counters();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        header(
            out,
            "hodei_jobs_submitted_total",
            "counter",
            "Jobs accepted by this server.",
        );
        sample(
            out,
            "hodei_jobs_submitted_total",
            &[],
            load(&c.jobs_submitted) as f64,
        );
        header(
            out,
            "hodei_jobs_finished_total",
            "counter",
            "Jobs that reached a terminal state, by state.",
        );
        for state in TERMINAL {
            let ix = JobState::ALL.iter().position(|s| *s == state).unwrap_or(0);
            sample(
                out,
                "hodei_jobs_finished_total",
                &[("state", state.as_str())],
                load(&c.jobs_finished[ix]) as f64,
            );
        }
        {
            let jobs = lock(&self.inner.jobs);
            header(
                out,
                "hodei_job_duration_seconds",
                "histogram",
                "Time from submission to a terminal state, by that state.",
            );
            for state in TERMINAL {
                let empty = Histogram::new(DURATION_BUCKETS);
                let h = jobs.duration.get(state.as_str()).unwrap_or(&empty);
                h.render(
                    out,
                    "hodei_job_duration_seconds",
                    &[("state", state.as_str())],
                );
            }
            header(
                out,
                "hodei_job_start_latency_seconds",
                "histogram",
                "Time from submission to the first RUNNING.",
            );
            let empty = Histogram::new(START_BUCKETS);
            jobs.start_latency.as_ref().unwrap_or(&empty).render(
                out,
                "hodei_job_start_latency_seconds",
                &[],
            );
        }
        match cp.queue_depth().await {
            Ok(depth) => {
                header(
                    out,
                    "hodei_queue_depth",
                    "gauge",
                    "Jobs waiting in the queue.",
                );
                sample(out, "hodei_queue_depth", &[], depth as f64);
            }
            Err(e) => tracing::warn!(error = %e, "metrics: queue depth unavailable"),
        }
        match cp.workers().await {
            Ok(workers) => {
                header(out, "hodei_workers", "gauge", "Workers by state.");
                for state in WorkerState::ALL {
                    let n = workers.iter().filter(|w| w.state == state).count();
                    sample(out, "hodei_workers", &[("state", state.as_str())], n as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: workers unavailable"),
        }
        match cp.providers().await {
            Ok(providers) => {
                header(
                    out,
                    "hodei_provider_healthy",
                    "gauge",
                    "1 if the provider's last health check passed, else 0.",
                );
                for p in providers {
                    let v = if p.healthy { 1.0 } else { 0.0 };
                    sample(
                        out,
                        "hodei_provider_healthy",
                        &[("provider", p.id.as_str())],
                        v,
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: providers unavailable"),
        }
        let (last, lag_seconds) = {
            let jobs = lock(&self.inner.jobs);
            (jobs.last_sequence, jobs.lag_seconds)
        };
        match cp.stores().events.read_after(last, LAG_CAP).await {
            Ok(behind) => {
                header(
                    out,
                    "hodei_event_bus_lag_events",
                    "gauge",
                    "Events stored but not yet received by the metrics follower (capped at 10000).",
                );
                sample(out, "hodei_event_bus_lag_events", &[], behind.len() as f64);
            }
            Err(e) => tracing::warn!(error = %e, "metrics: event log unavailable"),
        }
        header(
            out,
            "hodei_event_bus_lag_seconds",
            "gauge",
            "Age of the last event when the metrics follower received it.",
        );
        sample(out, "hodei_event_bus_lag_seconds", &[], lag_seconds);
        header(
            out,
            "hodei_event_bus_events_total",
            "counter",
            "Events the metrics follower received from the bus.",
        );
        sample(
            out,
            "hodei_event_bus_events_total",
            &[],
            self.inner.bus_events.load(Ordering::Relaxed) as f64,
        );
        header(out, "hodei_log_lines_total", "counter", "Log lines stored.");
        sample(out, "hodei_log_lines_total", &[], load(&c.log_lines) as f64);
        header(out, "hodei_log_bytes_total", "counter", "Log bytes stored.");
        sample(out, "hodei_log_bytes_total", &[], load(&c.log_bytes) as f64);
        header(
            out,
            "hodei_log_lines_dropped_total",
            "counter",
            "Log lines lost before they were stored (agent sequence gaps, lines discarded by the server); expected 0.",
        );
        sample(
            out,
            "hodei_log_lines_dropped_total",
            &[],
            load(&c.log_lines_dropped) as f64,
        );
    }

    fn render_requests(&self, out: &mut String) {
        {
            let f = lock(&self.inner.http);
            header(
                out,
                "hodei_http_requests_total",
                "counter",
                "HTTP requests by method, route pattern and status.",
            );
            for ((method, route, status), n) in &f.counts {
                sample(
                    out,
                    "hodei_http_requests_total",
                    &[("method", method), ("route", route), ("status", status)],
                    *n as f64,
                );
            }
            header(
                out,
                "hodei_http_request_duration_seconds",
                "histogram",
                "Time to the HTTP response head, by method and route pattern.",
            );
            for ((method, route), h) in &f.durations {
                h.render(
                    out,
                    "hodei_http_request_duration_seconds",
                    &[("method", method), ("route", route)],
                );
            }
        }
        let f = lock(&self.inner.grpc);
        header(
            out,
            "hodei_grpc_requests_total",
            "counter",
            "gRPC requests by method and status code.",
        );
        for ((method, _, code), n) in &f.counts {
            sample(
                out,
                "hodei_grpc_requests_total",
                &[("method", method), ("code", code)],
                *n as f64,
            );
        }
        header(
            out,
            "hodei_grpc_request_duration_seconds",
            "histogram",
            "gRPC request duration by method.",
        );
        for ((method, _), h) in &f.durations {
            h.render(
                out,
                "hodei_grpc_request_duration_seconds",
                &[("method", method)],
            );
        }
    }
}

/// Follows the event bus from its current end, folding job events into the
/// histograms. Ends when the registry is dropped.
async fn follow(inner: Weak<Inner>, cp: ControlPlane) {
    let mut after = loop {
        match last_sequence(&cp).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the event log; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    if let Some(inner) = inner.upgrade() {
        lock(&inner.jobs).last_sequence = after;
    }
    loop {
        let mut events = cp.watch_events(after);
        while let Some(item) = events.next().await {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            match item {
                Ok(e) => {
                    after = e.sequence;
                    inner.bus_events.fetch_add(1, Ordering::Relaxed);
                    observe(&inner, &cp, e).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: event bus failed; resubscribing");
                    break;
                }
            }
        }
        if inner.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Where the follower starts: every event that commits from now on comes
/// after it (see `EventLog::settled_sequence`).
async fn last_sequence(cp: &ControlPlane) -> Result<u64, hodei_core::ports::StoreError> {
    cp.stores().events.settled_sequence().await
}

async fn observe(inner: &Inner, cp: &ControlPlane, e: DomainEvent) {
    let at = e.occurred_at;
    {
        let mut jobs = lock(&inner.jobs);
        jobs.last_sequence = e.sequence;
        jobs.lag_seconds = seconds_between(at, now_utc());
    }
    let Some(job) = e.job_id() else {
        return;
    };
    let terminal = match e.event_type() {
        "JobSucceeded" => Some(JobState::Succeeded),
        "JobFailed" => Some(JobState::Failed),
        "JobCancelled" => Some(JobState::Cancelled),
        "JobTimedOut" => Some(JobState::TimedOut),
        _ => None,
    };
    let start_attempt = match e.body {
        EventBody::JobStarted { attempt, .. } => Some(attempt),
        _ => None,
    };
    if let EventBody::JobCreated { .. } = e.body {
        lock(&inner.jobs).open.insert(job, (at, false));
        return;
    }
    if start_attempt.is_none() && terminal.is_none() {
        return;
    }
    // A job created before the follower started: ask the store once. A
    // later attempt's start is then not known to be its first.
    let known = lock(&inner.jobs).open.get(&job).copied();
    let (created, started) = match known {
        Some(k) => k,
        None => match cp.job(job).await {
            Ok(j) => (j.created_at, start_attempt.is_some_and(|a| a > 1)),
            Err(_) => return,
        },
    };
    let mut jobs = lock(&inner.jobs);
    if start_attempt.is_some() && !started {
        jobs.start_latency
            .get_or_insert_with(|| Histogram::new(START_BUCKETS))
            .observe(seconds_between(created, at));
        jobs.open.insert(job, (created, true));
    }
    if let Some(state) = terminal {
        jobs.duration
            .entry(state.as_str())
            .or_insert_with(|| Histogram::new(DURATION_BUCKETS))
            .observe(seconds_between(created, at));
        jobs.open.remove(&job);
    }
}

fn seconds_between(from: Timestamp, to: Timestamp) -> f64 {
    ((to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6).max(0.0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a metrics lock leaves plain numbers behind:
    // still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A histogram with fixed upper bounds.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus the +Inf bucket last.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let ix = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[ix] += 1;
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &[(&str, &str)]) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (i, n) in self.counts.iter().enumerate() {
            cumulative += n;
            let le = match self.bounds.get(i) {
                Some(b) => format_value(*b),
                None => "+Inf".to_owned(),
            };
            let mut l: Vec<(&str, &str)> = labels.to_vec();
            l.push(("le", &le));
            sample(out, &bucket, &l, cumulative as f64);
        }
        sample(out, &format!("{name}_sum"), labels, self.sum);
        sample(out, &format!("{name}_count"), labels, self.count as f64);
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape_label(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&format_value(value));
    out.push('\n');
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn format_value(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.is_nan() {
        "NaN".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut out = String::new();
        h.render(&mut out, "x_seconds", &[("route", "/a")]);
        assert_eq!(
            out,
            "x_seconds_bucket{route=\"/a\",le=\"0.1\"} 1\n\
             x_seconds_bucket{route=\"/a\",le=\"1\"} 2\n\
             x_seconds_bucket{route=\"/a\",le=\"+Inf\"} 3\n\
             x_seconds_sum{route=\"/a\"} 5.55\n\
             x_seconds_count{route=\"/a\"} 3\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("l", "a\"b\\c\nd")], 1.0);
        assert_eq!(out, "m{l=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[tokio::test]
    async fn grpc_requests_are_rendered() {
        let m = Metrics::new();
        m.record_grpc("/hodei.v1.JobService/SubmitJob", "OK", 0.002);
        m.record_grpc("/hodei.v1.JobService/SubmitJob", "OK", 0.003);
        let out = m.render().await;
        assert!(
            out.contains(
                "hodei_grpc_requests_total{method=\"/hodei.v1.JobService/SubmitJob\",code=\"OK\"} 2"
            ),
            "{out}"
        );
        assert!(out.contains(
            "hodei_grpc_request_duration_seconds_count{method=\"/hodei.v1.JobService/SubmitJob\"} 2"
        ));
    }
}
