//! End to end over both listeners of the real `hodei-server` binary, run
//! the way an operator runs it (HTTP on, the local provider spawning real
//! `hodei-worker` agents): jobs submitted over gRPC and read back over
//! HTTP, health and readiness, the Prometheus metrics of both transports,
//! and dispatch to an idle warm worker without waiting for a queue poll.
//! Synchronisation is by polling with deadlines or by sentinel files the
//! jobs wait on, never by sleeping; nothing asserts how long anything took.

mod e2e_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use e2e_support::*;
use hodei_grpc::proto;
use proto::JobState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a job waits at most to start in the warm-worker test: far below
/// the one-hour claim interval that test configures, far above any start.
const START_DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_jobs_health_and_metrics_over_http() {
    let (server, http) = start_server("max_workers = 2", "200ms");

    let health = get(http, "/healthz").await;
    assert_eq!(health.status, 200, "/healthz: {}", health.body);
    let ready = get(http, "/readyz").await;
    assert_eq!(ready.status, 200, "/readyz: {}", ready.body);

    let before = samples(&get_ok(http, "/metrics").await);
    let submitted_before = *before
        .get("hodei_jobs_submitted_total")
        .expect("hodei_jobs_submitted_total is exported");

    let client = server.client().await;
    let job = client.submit(sh("echo over-http")).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let err = client
        .jobs()
        .get(proto::GetJobRequest {
            job_id: unknown.clone(),
        })
        .await
        .expect_err("an unknown job id is an error");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");

    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(
        done.state,
        JobState::Succeeded as i32,
        "job {done:?}; server log:\n{}",
        server.log()
    );

    let body = get_ok(http, &format!("/api/v1/jobs/{}", job.job_id)).await;
    let read: serde_json::Value = serde_json::from_str(&body).expect("job JSON");
    assert_eq!(read["id"], job.job_id.as_str(), "{body}");
    assert_eq!(read["state"], "SUCCEEDED", "{body}");
    let missing = get(http, &format!("/api/v1/jobs/{unknown}")).await;
    assert_eq!(missing.status, 404, "{}", missing.body);

    let submit_ok = r#"hodei_grpc_requests_total{method="/hodei.v1.JobService/Submit",code="OK"}"#;
    let get_ok_series = r#"hodei_grpc_requests_total{method="/hodei.v1.JobService/Get",code="OK"}"#;
    let get_not_found =
        r#"hodei_grpc_requests_total{method="/hodei.v1.JobService/Get",code="NOT_FOUND"}"#;
    let http_job =
        r#"hodei_http_requests_total{method="GET",route="/api/v1/jobs/{id}",status="200"}"#;
    let http_health = r#"hodei_http_requests_total{method="GET",route="/healthz",status="200"}"#;
    let wanted = [
        submit_ok,
        get_ok_series,
        get_not_found,
        http_job,
        http_health,
    ];
    let after = wait_for("the request series in /metrics", DEADLINE, || async {
        let m = samples(&get_ok(http, "/metrics").await);
        wanted
            .iter()
            .all(|s| m.get(*s).is_some_and(|v| *v >= 1.0))
            .then_some(m)
    })
    .await;
    assert!(
        after["hodei_jobs_submitted_total"] > submitted_before,
        "hodei_jobs_submitted_total did not move from {submitted_before}: {after:?}"
    );
    assert!(
        after.contains_key(
            "hodei_grpc_request_duration_seconds_count{method=\"/hodei.v1.JobService/Submit\"}"
        ),
        "{after:?}"
    );
    for series in after
        .keys()
        .filter(|k| k.starts_with("hodei_grpc_requests_total{"))
    {
        let code = label(series, "code").unwrap_or_default();
        // Canonical names (`NOT_FOUND`), never Rust's (`NotFound`); the
        // full table is unit-tested in `server/metrics.rs`.
        assert!(
            !code.is_empty() && code.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
            "{series}: code {code:?} is not a canonical gRPC status name"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_submitted_to_an_idle_warm_worker_starts_without_a_queue_poll() {
    // The queue is polled once an hour: a job that starts within the test
    // was dispatched by the submission itself.
    let (server, _http) = start_server("max_workers = 2\nwarm_pool = 1\nephemeral = false", "1h");
    let client = server.client().await;
    let warm = wait_for("a READY warm worker", DEADLINE, || async {
        client
            .workers()
            .list(proto::ListWorkersRequest {})
            .await
            .expect("list workers")
            .into_inner()
            .workers
            .into_iter()
            .find(|w| w.state == "READY" && w.jobs.is_empty())
            .map(|w| w.worker_id)
    })
    .await;

    let gate = server.path("gate");
    let job = client.submit(sh(&wait_file(&gate))).await;
    let running = wait_for(
        &format!("job {} RUNNING with a one-hour claim interval", job.job_id),
        START_DEADLINE,
        || async {
            let j = client.job(&job.job_id).await;
            match j.status.and_then(|s| s.state) {
                Some(proto::job_status::State::Running(r)) => Some(r.worker_id),
                _ => None,
            }
        },
    )
    .await;
    assert_eq!(running, warm, "the job runs on the idle warm worker");
    touch(&gate);
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(
        done.state,
        JobState::Succeeded as i32,
        "job {done:?}; server log:\n{}",
        server.log()
    );
}

// ------------------------------------------------------------------ helpers

/// Starts the real `hodei-server` with HTTP on a free loopback port and
/// one local provider with `provider_keys`, the queue polled every
/// `claim_interval`. Returns the server (stopped on drop) and the HTTP
/// address it printed.
fn start_server(provider_keys: &str, claim_interval: &str) -> (TestServer, SocketAddr) {
    let dir = tempfile::Builder::new()
        .prefix("hodei-e2e-http-")
        .tempdir()
        .expect("temp dir");
    let state = dir.path().join("local");
    let toml = format!(
        r#"server_id = "e2e-http-{id}"
drain_grace = "30s"

[[providers]]
kind = "local"
name = "local"
state_dir = "{state}"
{provider_keys}

[engine]
retry_base = "200ms"
retry_cap = "1s"
retry_jitter = 0.0
heartbeat_timeout = "10s"
reconnect_grace = "20s"
claim_interval = "{claim_interval}"

[runtime]
heartbeat_interval = "1s"
health_interval = "2s"
"#,
        id = uuid::Uuid::new_v4().simple(),
        state = state.display()
    );
    let config = dir.path().join("hodei.toml");
    std::fs::write(&config, toml).expect("write config");
    let (child, grpc, http) =
        spawn_server(&config, &dir.path().join("server.log"), "127.0.0.1:0", true);
    let http: SocketAddr = http
        .and_then(|a| a.parse().ok())
        .expect("hodei-server reports an HTTP address when HTTP is on");
    let server = TestServer {
        child: Some(child),
        url: format!("http://{grpc}"),
        addr: grpc,
        dir,
        token: None,
    };
    (server, http)
}

/// An HTTP response, body decoded.
struct Response {
    status: u16,
    body: String,
}

/// `GET path` over HTTP/1.1 on a fresh connection (closed by the server
/// after the answer).
async fn get(addr: SocketAddr, path: &str) -> Response {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        std::io::Result::Ok(raw)
    };
    let raw = tokio::time::timeout(DEADLINE, exchange)
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no answer"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    parse_response(&raw).unwrap_or_else(|| {
        panic!(
            "GET {path}: malformed response:\n{}",
            String::from_utf8_lossy(&raw)
        )
    })
}

/// The body of `GET path`, which must answer 200.
async fn get_ok(addr: SocketAddr, path: &str) -> String {
    let r = get(addr, path).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.body);
    r.body
}

fn parse_response(raw: &[u8]) -> Option<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if chunked {
        body = dechunk(&body)?;
    }
    Some(Response {
        status,
        body: String::from_utf8(body).ok()?,
    })
}

/// Decodes a `Transfer-Encoding: chunked` body.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..eol]).ok()?;
        let size_text = size_text.split(';').next()?.trim();
        let size = usize::from_str_radix(size_text, 16).ok()?;
        data = &data[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// The samples of a Prometheus text exposition: series (name and labels,
/// as written) to value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The value of label `name` in a series such as `m{a="x",b="y"}`.
fn label<'a>(series: &'a str, name: &str) -> Option<&'a str> {
    let labels = series.split_once('{')?.1.strip_suffix('}')?;
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| v.trim_matches('"'))
    })
}
