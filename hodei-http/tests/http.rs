//! The HTTP API over real HTTP on loopback: every route's happy path, bad
//! input, auth, correlation ids, SSE live logs, idempotency, the OpenAPI
//! document against the router, and the metrics.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hodei_http::HttpConfig;
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Server, SseEvent, SseReader, eventually, tokens};

async fn body(r: reqwest::Response) -> (StatusCode, Value) {
    let status = r.status();
    let text = r.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, v)
}

async fn submit(s: &Server, spec: Value) -> Value {
    let r = s
        .http
        .post(s.url("/api/v1/jobs"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    let (status, v) = body(r).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    v
}

async fn get(s: &Server, path: &str) -> (StatusCode, Value) {
    body(s.http.get(s.url(path)).send().await.unwrap()).await
}

async fn wait_state(s: &Server, id: &str, pred: impl Fn(&str) -> bool) -> Value {
    eventually(30, "job state", || async {
        let (_, job) = get(s, &format!("/api/v1/jobs/{id}")).await;
        pred(job["state"].as_str().unwrap()).then_some(job)
    })
    .await
}

async fn wait_terminal(s: &Server, id: &str) -> Value {
    wait_state(s, id, |st| {
        ["SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT"].contains(&st)
    })
    .await
}

/// Asserts a JSON error: status, code, and that the message contains each of `needles`.
async fn assert_error(
    r: reqwest::Response,
    status: StatusCode,
    code: &str,
    needles: &[&str],
) -> String {
    let (got, v) = body(r).await;
    assert_eq!(got, status, "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    let message = v["error"]["message"].as_str().unwrap().to_owned();
    eprintln!("{got} {code}: {message}");
    for n in needles {
        assert!(message.contains(n), "message {message:?} lacks {n:?}");
    }
    message
}

// ---------------------------------------------------------------- happy paths

#[tokio::test]
async fn a_submitted_job_runs_and_every_read_route_shows_it() {
    let s = Server::start(HttpConfig::default()).await;
    let r = s
        .http
        .post(s.url("/api/v1/jobs"))
        .header("x-correlation-id", "corr-happy")
        .json(&json!({"name": "greet", "command": ["sh", "-c", "echo hello; echo oops >&2"], "labels": {"team": "ci"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-correlation-id"], "corr-happy");
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let (status, job) = body(r).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(location, format!("/api/v1/jobs/{id}"));
    assert_eq!(job["name"], "greet");
    assert_eq!(job["state"], "PENDING");
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["max_attempts"], 1);
    assert_eq!(job["correlation_id"], "corr-happy");
    assert_eq!(job["submitted_by"], "anonymous");
    assert_eq!(
        job["spec"]["command"],
        json!(["sh", "-c", "echo hello; echo oops >&2"])
    );
    assert_eq!(job["spec"]["labels"]["team"], "ci");
    assert_eq!(job["attempts"], json!([]));
    assert!(job.get("exit_code").is_none());

    let done = wait_terminal(&s, &id).await;
    assert_eq!(done["state"], "SUCCEEDED", "{done}");
    assert_eq!(done["exit_code"], 0);
    assert_eq!(done["attempts"][0]["outcome"], "succeeded");

    // Logs as JSON, with paging.
    let (status, logs) = get(&s, &format!("/api/v1/jobs/{id}/logs")).await;
    assert_eq!(status, StatusCode::OK);
    let lines = logs["lines"].as_array().unwrap();
    let texts: BTreeSet<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    assert_eq!(texts, BTreeSet::from(["hello", "oops"]));
    assert!(
        lines
            .iter()
            .any(|l| l["stream"] == "stderr" && l["text"] == "oops")
    );
    assert_eq!(logs["next_after"], 2);
    assert_eq!(logs["job_state"], "SUCCEEDED");
    let (_, page) = get(&s, &format!("/api/v1/jobs/{id}/logs?after=1&limit=5")).await;
    assert_eq!(page["lines"].as_array().unwrap().len(), 1);
    assert_eq!(page["lines"][0]["seq"], 2);

    // Events: the full trail, all with the request's correlation id.
    let (status, events) = get(&s, &format!("/api/v1/jobs/{id}/events")).await;
    assert_eq!(status, StatusCode::OK);
    let types: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    for t in [
        "JobCreated",
        "JobQueued",
        "JobScheduled",
        "JobAssigned",
        "JobStarted",
        "JobSucceeded",
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    for e in events["events"].as_array().unwrap() {
        assert_eq!(e["correlation_id"], "corr-happy");
        if e["aggregate_type"] == "job" {
            assert_eq!(e["aggregate_id"], id.as_str());
        }
        assert!(e["payload"].is_object());
    }

    // List, with and without a state filter (case-insensitive).
    let (_, list) = get(&s, "/api/v1/jobs").await;
    assert!(
        list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id.as_str())
    );
    let (_, ok) = get(&s, "/api/v1/jobs?state=succeeded").await;
    assert!(
        ok["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|j| j["id"] == id.as_str())
    );
    let (_, failed) = get(&s, "/api/v1/jobs?state=FAILED").await;
    assert!(failed["jobs"].as_array().unwrap().is_empty());

    // Workers and providers.
    let (status, workers) = get(&s, "/api/v1/workers").await;
    assert_eq!(status, StatusCode::OK);
    let w = &workers["workers"][0];
    assert_eq!(w["provider"], "local");
    assert!(w["state"].is_string() && w["id"].is_string());
    let (status, providers) = get(&s, "/api/v1/providers").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(providers["providers"][0]["id"], "local");
    assert_eq!(providers["providers"][0]["kind"], "local");

    // Audit: by correlation id, type, actor, time window, paging.
    let (status, audit) = get(&s, "/api/v1/audit?correlation_id=corr-happy").await;
    assert_eq!(status, StatusCode::OK);
    let total = audit["total"].as_u64().unwrap();
    assert!(total >= 6, "{audit}");
    assert_eq!(audit["events"].as_array().unwrap().len() as u64, total);
    let (_, created) = get(
        &s,
        "/api/v1/audit?correlation_id=corr-happy&event_type=JobCreated",
    )
    .await;
    assert_eq!(created["total"], 1);
    assert_eq!(created["events"][0]["actor"], "anonymous");
    let (_, by_actor) = get(&s, "/api/v1/audit?actor=anonymous&event_type=JobCreated").await;
    assert_eq!(by_actor["total"], 1);
    let (_, paged) = get(
        &s,
        "/api/v1/audit?correlation_id=corr-happy&limit=2&offset=1",
    )
    .await;
    assert_eq!(paged["events"].as_array().unwrap().len(), 2);
    assert_eq!(paged["total"].as_u64().unwrap(), total);
    assert_eq!(
        paged["events"][0]["sequence"],
        audit["events"][1]["sequence"]
    );
    let (_, future) = get(
        &s,
        "/api/v1/audit?correlation_id=corr-happy&since=2999-01-01T00:00:00Z",
    )
    .await;
    assert_eq!(future["total"], 0);
    let (_, past) = get(
        &s,
        "/api/v1/audit?correlation_id=corr-happy&since=2000-01-01T00:00:00%2B01:00&until=2999-01-01T00:00:00Z",
    )
    .await;
    assert_eq!(past["total"].as_u64().unwrap(), total);
}

#[tokio::test]
async fn jobs_are_listed_newest_first_in_pages() {
    let s = Server::start(HttpConfig::default()).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let job = submit(&s, json!({"name": format!("j{i}"), "command": ["true"]})).await;
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    let (_, first) = get(&s, "/api/v1/jobs?limit=2").await;
    let page1: Vec<&str> = first["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(page1, vec![ids[2].as_str(), ids[1].as_str()]);
    let cursor = first["next_cursor"].as_str().expect("a next page");
    let (_, second) = get(&s, &format!("/api/v1/jobs?limit=2&cursor={cursor}")).await;
    let page2: Vec<&str> = second["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(page2, vec![ids[0].as_str()]);
    assert!(second.get("next_cursor").is_none(), "{second}");
}

#[tokio::test]
async fn scripts_run_and_failures_are_reported() {
    let s = Server::start(HttpConfig::default()).await;
    let job = submit(
        &s,
        json!({"script": "#!/bin/sh\necho from-script\nexit 3\n"}),
    )
    .await;
    let id = job["id"].as_str().unwrap();
    let done = wait_terminal(&s, id).await;
    assert_eq!(done["state"], "FAILED", "{done}");
    assert_eq!(done["exit_code"], 3);
    assert_eq!(done["failure"]["kind"], "non_zero_exit");
    assert_eq!(done["attempts"][0]["failure"]["exit_code"], 3);
    let (_, logs) = get(&s, &format!("/api/v1/jobs/{id}/logs")).await;
    assert_eq!(logs["lines"][0]["text"], "from-script");
}

#[tokio::test]
async fn a_running_job_is_cancelled_once() {
    let s = Server::start(HttpConfig::default()).await;
    let job = submit(&s, json!({"command": ["sleep", "30"]})).await;
    let id = job["id"].as_str().unwrap();
    wait_state(&s, id, |st| st == "RUNNING").await;
    let r = s
        .http
        .post(s.url(&format!("/api/v1/jobs/{id}/cancel")))
        .send()
        .await
        .unwrap();
    let (status, cancelled) = body(r).await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    assert_eq!(cancelled["state"], "CANCELLED");
    assert_eq!(cancelled["cancel_reason"], "cancelled by anonymous");
    let r = s
        .http
        .post(s.url(&format!("/api/v1/jobs/{id}/cancel")))
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        StatusCode::CONFLICT,
        "failed_precondition",
        &["CANCELLED"],
    )
    .await;
}

#[tokio::test]
async fn a_busy_worker_is_drained() {
    let s = Server::start(HttpConfig::default()).await;
    let job = submit(&s, json!({"command": ["sleep", "30"]})).await;
    let id = job["id"].as_str().unwrap();
    let running = wait_state(&s, id, |st| st == "RUNNING").await;
    let worker = running["worker_id"].as_str().unwrap();
    let r = s
        .http
        .post(s.url(&format!("/api/v1/workers/{worker}/drain")))
        .send()
        .await
        .unwrap();
    let (status, v) = body(r).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["worker_id"], worker);
    assert_eq!(v["state"], "DRAINING");
    let (_, workers) = get(&s, "/api/v1/workers").await;
    let w = workers["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == worker)
        .unwrap();
    assert_eq!(w["state"], "DRAINING");
    assert_eq!(w["jobs"][0], id);
    s.http
        .post(s.url(&format!("/api/v1/jobs/{id}/cancel")))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn health_probes_answer() {
    let s = Server::start(HttpConfig::default()).await;
    let (status, v) = get(&s, "/healthz").await;
    assert_eq!((status, v), (StatusCode::OK, json!({"status": "ok"})));
    let (status, v) = get(&s, "/readyz").await;
    assert_eq!((status, v), (StatusCode::OK, json!({"status": "ready"})));
}

#[tokio::test]
async fn the_dashboard_is_served_with_a_strict_policy() {
    let s = Server::start(HttpConfig::default()).await;
    let r = s.http.get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'")
    );
    let html = r.text().await.unwrap();
    assert!(html.contains("/ui/app.js") && html.contains("/ui/app.css"));
    let js = s.http.get(s.url("/ui/app.js")).send().await.unwrap();
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    assert!(js.text().await.unwrap().contains("EventSource"));
    let css = s.http.get(s.url("/ui/app.css")).send().await.unwrap();
    assert!(
        css.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
}

// ---------------------------------------------------------------- bad input

#[tokio::test]
async fn bad_job_specs_are_refused_with_what_is_accepted() {
    let s = Server::start(HttpConfig {
        max_body_bytes: 4096,
        ..HttpConfig::default()
    })
    .await;
    let post = |b: &'static str| {
        s.http
            .post(s.url("/api/v1/jobs"))
            .header("content-type", "application/json")
            .body(b)
            .send()
    };
    let bad = StatusCode::BAD_REQUEST;
    let m = assert_error(
        post("{\"command\": [").await.unwrap(),
        bad,
        "invalid_argument",
        &["not valid JSON"],
    )
    .await;
    assert!(m.contains("accepted"), "{m}");
    assert_error(
        post("").await.unwrap(),
        bad,
        "invalid_argument",
        &["body is empty", "accepted"],
    )
    .await;
    assert_error(
        post("[1]").await.unwrap(),
        bad,
        "invalid_argument",
        &["not a JSON object", "command"],
    )
    .await;
    assert_error(
        post(r#"{"command": ["true"], "colour": "red"}"#)
            .await
            .unwrap(),
        bad,
        "invalid_argument",
        &["unknown field `colour`", "accepted fields", "timeout_secs"],
    )
    .await;
    assert_error(
        post(r#"{"command": ["true"], "resources": {"gpus": 1}}"#)
            .await
            .unwrap(),
        bad,
        "invalid_argument",
        &["unknown field `resources.gpus`", "memory_mb"],
    )
    .await;
    assert_error(
        post(r#"{"command": ["true"], "timeout_secs": "ten"}"#)
            .await
            .unwrap(),
        bad,
        "invalid_argument",
        &[
            "`timeout_secs`",
            "invalid type",
            "accepted: a whole number of seconds",
        ],
    )
    .await;
    assert_error(
        post(r#"{"command": "echo hi"}"#).await.unwrap(),
        bad,
        "invalid_argument",
        &["`command`", "list of strings"],
    )
    .await;
    assert_error(
        post(r#"{"command": ["echo", 7]}"#).await.unwrap(),
        bad,
        "invalid_argument",
        &["`command[1]`"],
    )
    .await;
    // Rules of the core's JobSpec::parse.
    assert_error(
        post(r#"{"command": ["true"], "timeout_secs": 0}"#)
            .await
            .unwrap(),
        bad,
        "invalid_argument",
        &["`timeout_secs` is 0", "accepted: 1..="],
    )
    .await;
    assert_error(
        post(r#"{"command": ["true"], "script": "true"}"#)
            .await
            .unwrap(),
        bad,
        "invalid_argument",
        &["`command`", "exactly one of"],
    )
    .await;
    assert_error(
        post("{}").await.unwrap(),
        bad,
        "invalid_argument",
        &["`command` is missing"],
    )
    .await;
    assert_error(
        post(r#"{"command": ["true"], "provider": "mars"}"#)
            .await
            .unwrap(),
        bad,
        "invalid_argument",
        &["mars", "local"],
    )
    .await;
    // Too large: 413, whether the length is announced or not.
    let big = format!(r#"{{"script": "{}"}}"#, "x".repeat(8000));
    let r = s
        .http
        .post(s.url("/api/v1/jobs"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &["4096 bytes"],
    )
    .await;
    let chunks = futures::stream::iter(
        big.into_bytes()
            .chunks(1000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = s
        .http
        .post(s.url("/api/v1/jobs"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        &["4096 bytes"],
    )
    .await;
    // Nothing was stored.
    let (_, list) = get(&s, "/api/v1/jobs").await;
    assert_eq!(list["jobs"], json!([]));
}

/// The default body limit lets through every spec the control plane
/// accepts: a script at the spec's own limit is taken, one byte more is
/// refused by the spec check (400, naming the field), not by a 413.
#[tokio::test]
async fn the_body_limit_fits_the_largest_valid_spec() {
    let s = Server::start(HttpConfig::default()).await;
    let max_script = hodei_core::spec::SpecLimits::default().max_script_bytes;
    // A script with newlines and quotes: JSON escaping makes the body larger
    // than the script.
    let line = "echo \"x\"\n";
    let mut script = String::from("#!/bin/sh\n");
    while script.len() + line.len() <= max_script {
        script.push_str(line);
    }
    script.push_str(&"#".repeat(max_script - script.len()));
    assert_eq!(script.len(), max_script);
    let r = s
        .http
        .post(s.url("/api/v1/jobs"))
        .json(&json!({ "script": script }))
        .send()
        .await
        .unwrap();
    let (status, v) = body(r).await;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    script.push('#');
    let r = s
        .http
        .post(s.url("/api/v1/jobs"))
        .json(&json!({ "script": script }))
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        &["script", &max_script.to_string()],
    )
    .await;
}

#[tokio::test]
async fn bad_ids_filters_and_timestamps_are_refused() {
    let s = Server::start(HttpConfig::default()).await;
    let bad = StatusCode::BAD_REQUEST;
    let unknown = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let g = |p: String| s.http.get(s.url(&p)).send();
    // Invalid ids vs unknown ids.
    for path in [
        "/api/v1/jobs/nope",
        "/api/v1/jobs/nope/logs",
        "/api/v1/jobs/nope/events",
    ] {
        assert_error(
            g(path.into()).await.unwrap(),
            bad,
            "invalid_argument",
            &["invalid job id \"nope\"", "expected a UUID"],
        )
        .await;
    }
    let r = s
        .http
        .post(s.url("/api/v1/jobs/123/cancel"))
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        bad,
        "invalid_argument",
        &["invalid job id \"123\": expected a UUID"],
    )
    .await;
    let r = s
        .http
        .post(s.url("/api/v1/workers/abc/drain"))
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        bad,
        "invalid_argument",
        &["invalid worker id \"abc\": expected a UUID"],
    )
    .await;
    let nf = StatusCode::NOT_FOUND;
    for path in ["", "/logs", "/events"] {
        assert_error(
            g(format!("/api/v1/jobs/{unknown}{path}")).await.unwrap(),
            nf,
            "not_found",
            &[unknown],
        )
        .await;
    }
    let r = s
        .http
        .get(s.url(&format!("/api/v1/jobs/{unknown}/logs")))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_error(r, nf, "not_found", &[unknown]).await;
    let r = s
        .http
        .post(s.url(&format!("/api/v1/jobs/{unknown}/cancel")))
        .send()
        .await
        .unwrap();
    assert_error(r, nf, "not_found", &[unknown]).await;
    let r = s
        .http
        .post(s.url(&format!("/api/v1/workers/{unknown}/drain")))
        .send()
        .await
        .unwrap();
    assert_error(r, nf, "not_found", &[unknown]).await;
    // Filters.
    assert_error(
        g("/api/v1/jobs?state=DONE".into()).await.unwrap(),
        bad,
        "invalid_argument",
        &[
            "unknown job state \"DONE\"",
            "PENDING, SCHEDULED, ASSIGNED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT",
        ],
    )
    .await;
    assert_error(
        g("/api/v1/jobs?limit=0".into()).await.unwrap(),
        bad,
        "invalid_argument",
        &["`limit`", "1..=1000"],
    )
    .await;
    assert_error(
        g("/api/v1/jobs?limit=many".into()).await.unwrap(),
        bad,
        "invalid_argument",
        &["`limit`", "1..=1000"],
    )
    .await;
    assert_error(
        g("/api/v1/jobs?status=RUNNING".into()).await.unwrap(),
        bad,
        "invalid_argument",
        &["unknown query parameter `status`; accepted: state, limit, cursor"],
    )
    .await;
    assert_error(
        g("/api/v1/jobs?cursor=garbage".into()).await.unwrap(),
        bad,
        "invalid_argument",
        &["cursor"],
    )
    .await;
    assert_error(
        g(format!("/api/v1/jobs/{unknown}/logs?after=-1"))
            .await
            .unwrap(),
        bad,
        "invalid_argument",
        &["`after`"],
    )
    .await;
    let job = submit(&s, json!({"command": ["true"]})).await;
    let id = job["id"].as_str().unwrap();
    let r = s
        .http
        .get(s.url(&format!("/api/v1/jobs/{id}/logs")))
        .header("accept", "text/event-stream")
        .header("last-event-id", "seven")
        .send()
        .await
        .unwrap();
    assert_error(r, bad, "invalid_argument", &["Last-Event-ID"]).await;
    // Audit.
    assert_error(
        g("/api/v1/audit?since=yesterday".into()).await.unwrap(),
        bad,
        "invalid_argument",
        &["`since` \"yesterday\"", "RFC 3339"],
    )
    .await;
    assert_error(
        g("/api/v1/audit?until=2025-13-01".into()).await.unwrap(),
        bad,
        "invalid_argument",
        &["`until`", "RFC 3339"],
    )
    .await;
    assert_error(
        g("/api/v1/audit?since=2025-02-01T00:00:00Z&until=2025-01-01T00:00:00Z".into())
            .await
            .unwrap(),
        bad,
        "invalid_argument",
        &["since <= until"],
    )
    .await;
    assert_error(
        g("/api/v1/audit?event_type=JobDone".into()).await.unwrap(),
        bad,
        "invalid_argument",
        &["unknown event_type \"JobDone\"", "JobSucceeded"],
    )
    .await;
    assert_error(
        g("/api/v1/audit?limit=5000".into()).await.unwrap(),
        bad,
        "invalid_argument",
        &["`limit`", "1..=1000"],
    )
    .await;
    assert_error(
        g("/api/v1/audit?offset=x".into()).await.unwrap(),
        bad,
        "invalid_argument",
        &["`offset`"],
    )
    .await;
    // Unknown routes and methods.
    assert_error(
        g("/api/v1/nothing".into()).await.unwrap(),
        nf,
        "not_found",
        &["no route /api/v1/nothing"],
    )
    .await;
    let r = s.http.delete(s.url("/api/v1/jobs")).send().await.unwrap();
    assert_error(
        r,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &["DELETE"],
    )
    .await;
}

// ---------------------------------------------------------------- auth, correlation, idempotency

#[tokio::test]
async fn tokens_guard_the_api_and_name_the_actor() {
    let s = Server::start(HttpConfig {
        api_tokens: tokens(&[("s3cret", "alice"), ("other", "bob")]),
        ..HttpConfig::default()
    })
    .await;
    let unauth = StatusCode::UNAUTHORIZED;
    let r = s.http.get(s.url("/api/v1/jobs")).send().await.unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"hodei\"");
    assert_error(r, unauth, "unauthenticated", &["missing bearer token"]).await;
    let r = s
        .http
        .get(s.url("/api/v1/jobs"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_error(r, unauth, "unauthenticated", &["invalid bearer token"]).await;
    let r = s
        .http
        .get(s.url("/api/v1/jobs"))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    assert_error(
        r,
        unauth,
        "unauthenticated",
        &["malformed Authorization header"],
    )
    .await;
    let r = s
        .http
        .post(s.url("/api/v1/jobs"))
        .json(&json!({"command": ["true"]}))
        .send()
        .await
        .unwrap();
    assert_error(r, unauth, "unauthenticated", &[]).await;
    let r = s.http.get(s.url("/api/v1/unknown")).send().await.unwrap();
    assert_eq!(r.status(), unauth, "unknown /api/v1 routes are guarded too");

    let r = s
        .http
        .post(s.url("/api/v1/jobs"))
        .bearer_auth("s3cret")
        .json(&json!({"command": ["true"]}))
        .send()
        .await
        .unwrap();
    let (status, job) = body(r).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(job["submitted_by"], "alice");
    let id = job["id"].as_str().unwrap();
    let r = s
        .http
        .post(s.url(&format!("/api/v1/jobs/{id}/cancel")))
        .bearer_auth("other")
        .send()
        .await
        .unwrap();
    let (_, cancelled) = body(r).await;
    if cancelled["state"] == "CANCELLED" {
        assert_eq!(cancelled["cancel_reason"], "cancelled by bob");
    }
    // The query parameter, for EventSource.
    let (status, _) = body(
        s.http
            .get(s.url("/api/v1/jobs?access_token=s3cret"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, audit) = body(
        s.http
            .get(s.url("/api/v1/audit?event_type=JobCreated&actor=alice"))
            .bearer_auth("other")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(audit["total"], 1);
    // Outside /api/v1: no token needed.
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/",
        "/ui/app.js",
    ] {
        let r = s.http.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
    }
    let r = s
        .http
        .get(s.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), unauth);
}

#[tokio::test]
async fn correlation_ids_are_echoed_or_generated_and_flow_into_events() {
    let s = Server::start(HttpConfig::default()).await;
    let r = s
        .http
        .get(s.url("/healthz"))
        .header("x-correlation-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-correlation-id"], "trace-42");
    let r = s
        .http
        .get(s.url("/api/v1/jobs/nope"))
        .header("x-correlation-id", "trace-43")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        r.headers()["x-correlation-id"],
        "trace-43",
        "errors echo it too"
    );
    let r = s.http.get(s.url("/api/v1/workers")).send().await.unwrap();
    let generated = r.headers()["x-correlation-id"].to_str().unwrap().to_owned();
    assert!(uuid::Uuid::parse_str(&generated).is_ok(), "{generated}");
    let r = s
        .http
        .get(s.url("/healthz"))
        .header("x-correlation-id", "has space")
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("x-correlation-id"));
    assert_error(
        r,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        &["x-correlation-id", "accepted"],
    )
    .await;

    // Without a header, the generated id is the job's and its events'.
    let r = s
        .http
        .post(s.url("/api/v1/jobs"))
        .json(&json!({"command": ["true"]}))
        .send()
        .await
        .unwrap();
    let corr = r.headers()["x-correlation-id"].to_str().unwrap().to_owned();
    let (_, job) = body(r).await;
    assert_eq!(job["correlation_id"], corr.as_str());
    let id = job["id"].as_str().unwrap();
    wait_terminal(&s, id).await;
    let r = s
        .http
        .post(s.url(&format!("/api/v1/jobs/{id}/cancel")))
        .header("x-correlation-id", "cancel-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-correlation-id"], "cancel-1");
    let (_, events) = get(&s, &format!("/api/v1/jobs/{id}/events")).await;
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["correlation_id"] == corr.as_str())
    );
}

#[tokio::test]
async fn the_idempotency_key_returns_the_first_job() {
    let s = Server::start(HttpConfig::default()).await;
    let post = |key: &'static str, spec: Value| {
        s.http
            .post(s.url("/api/v1/jobs"))
            .header("idempotency-key", key)
            .json(&spec)
            .send()
    };
    let r = post("deploy-7", json!({"command": ["true"]}))
        .await
        .unwrap();
    assert!(r.headers().get("idempotent-replayed").is_none());
    let (status, first) = body(r).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(first["spec"]["idempotency_key"], "deploy-7");
    let r = post("deploy-7", json!({"command": ["true"]}))
        .await
        .unwrap();
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let (status, second) = body(r).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(second["id"], first["id"]);
    // The key in the body works the same.
    let (_, third) = body(
        s.http
            .post(s.url("/api/v1/jobs"))
            .json(&json!({"command": ["true"], "idempotency_key": "deploy-7"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(third["id"], first["id"]);
    // `replayed` comes from the store, not from clocks: a job another
    // replica created with a clock ahead of ours is still a replay.
    let (skewed, _) = hodei_core::job::Job::submit(
        hodei_core::ids::JobId::from_u64_pair(0x5e, 1),
        hodei_core::spec::JobSpec::parse(
            hodei_core::spec::RawJobSpec {
                command: Some(vec!["true".into()]),
                idempotency_key: Some("skewed".into()),
                ..Default::default()
            },
            &Default::default(),
        )
        .unwrap(),
        hodei_core::ids::CorrelationId::new("other-replica"),
        hodei_core::ids::Actor::new("alice"),
        hodei_core::time::add(hodei_core::runtime::now_utc(), Duration::from_secs(3600)),
    );
    s.cp.stores()
        .jobs
        .create(&skewed, Vec::new())
        .await
        .unwrap();
    let r = post("skewed", json!({"command": ["true"]})).await.unwrap();
    assert_eq!(r.headers()["idempotent-replayed"], "true");
    let (status, replayed) = body(r).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(replayed["id"], skewed.id.to_string());
    // Header and body must agree.
    let r = post(
        "deploy-8",
        json!({"command": ["true"], "idempotency_key": "deploy-9"}),
    )
    .await
    .unwrap();
    assert_error(
        r,
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        &["Idempotency-Key", "differ"],
    )
    .await;
    // The first job and the one "another replica" stored.
    let (_, list) = get(&s, "/api/v1/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 2);
}

// ---------------------------------------------------------------- SSE

#[tokio::test]
async fn live_logs_stream_history_then_live_lines_and_resume() {
    let s = Server::start(HttpConfig::default()).await;
    let flag = std::env::temp_dir().join(format!("hodei-sse-flag-{}", uuid::Uuid::new_v4()));
    // Two lines, a pause, two more: the stream opens in the pause.
    let job = submit(
        &s,
        // Two lines, then it waits for the test to create $FLAG, then two more:
        // the last two can only reach the stream live.
        json!({
            "command": ["sh", "-c", "echo one; echo two; while [ ! -e \"$FLAG\" ]; do sleep 0.05; done; echo three; echo four"],
            "env": {"FLAG": flag.to_str().unwrap()},
        }),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let logs = format!("/api/v1/jobs/{id}/logs");
    eventually(20, "the first two lines", || async {
        let (_, page) = get(&s, &logs).await;
        (page["lines"].as_array().unwrap().len() == 2).then_some(())
    })
    .await;
    let r = s
        .http
        .get(s.url(&logs))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut sse = SseReader::new(r);
    let mut got = Vec::new();
    loop {
        let ev = sse
            .next_within(20)
            .await
            .expect("the stream ends with `end`, not before");
        if ev.event == "end" {
            let end: Value = serde_json::from_str(&ev.data).unwrap();
            assert_eq!(end["state"], "SUCCEEDED");
            assert_eq!(end["id"], id.as_str());
            break;
        }
        assert_eq!(ev.event, "log");
        let line: Value = serde_json::from_str(&ev.data).unwrap();
        assert_eq!(
            ev.id.as_deref(),
            Some(line["seq"].to_string().as_str()),
            "SSE id = seq"
        );
        got.push((
            line["seq"].as_u64().unwrap(),
            line["text"].as_str().unwrap().to_owned(),
        ));
        if got.len() == 2 {
            // History delivered; only now may the job go on.
            std::fs::write(&flag, b"").unwrap();
        }
    }
    let _ = std::fs::remove_file(&flag);
    let want: Vec<(u64, String)> = ["one", "two", "three", "four"]
        .iter()
        .enumerate()
        .map(|(i, t)| (i as u64 + 1, t.to_string()))
        .collect();
    assert_eq!(got, want);
    assert!(sse.next_within(5).await.is_none(), "closed after `end`");

    // Resume with Last-Event-ID: the rest only, then `end` again.
    let r = s
        .http
        .get(s.url(&logs))
        .header("accept", "text/event-stream")
        .header("last-event-id", "2")
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(r);
    let mut resumed = Vec::new();
    while let Some(ev) = sse.next_within(10).await {
        if ev.event == "log" {
            resumed.push(ev.id.unwrap());
        } else {
            assert_eq!(ev.event, "end");
        }
    }
    assert_eq!(resumed, vec!["3", "4"]);
    // ?after= does the same, and the greater of the two wins.
    let r = s
        .http
        .get(s.url(&format!("{logs}?after=3")))
        .header("accept", "text/event-stream")
        .header("last-event-id", "1")
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(r);
    let first = sse.next_within(10).await.unwrap();
    assert_eq!(
        (first.event.as_str(), first.id.as_deref()),
        ("log", Some("4"))
    );
    assert_eq!(sse.next_within(10).await.unwrap().event, "end");
}

/// What a browser's `EventSource` does when its connection drops while the
/// job runs: it reconnects with `Last-Event-ID` and must get every later
/// line exactly once, some from history and some live, then `end`.
#[tokio::test]
async fn live_logs_resume_with_last_event_id_while_the_job_runs() {
    let s = Server::start(HttpConfig::default()).await;
    let dir = std::env::temp_dir();
    let tag = uuid::Uuid::new_v4();
    let flag_a = dir.join(format!("hodei-sse-resume-a-{tag}"));
    let flag_b = dir.join(format!("hodei-sse-resume-b-{tag}"));
    // Two lines; $A; two more (written while no stream is open); $B; two
    // more (only reachable live on the resumed stream).
    let script = "echo one; echo two; \
        while [ ! -e \"$A\" ]; do sleep 0.05; done; echo three; echo four; \
        while [ ! -e \"$B\" ]; do sleep 0.05; done; echo five; echo six";
    let job = submit(
        &s,
        json!({
            "command": ["sh", "-c", script],
            "env": {"A": flag_a.to_str().unwrap(), "B": flag_b.to_str().unwrap()},
        }),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let logs = format!("/api/v1/jobs/{id}/logs");
    let open = |last_event_id: Option<&'static str>| {
        let mut req = s
            .http
            .get(s.url(&logs))
            .header("accept", "text/event-stream");
        if let Some(last) = last_event_id {
            req = req.header("last-event-id", last);
        }
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            SseReader::new(r)
        }
    };
    // A log event as (seq, text), checking that its SSE id is its seq.
    let log_line = |ev: SseEvent| {
        assert_eq!(ev.event, "log", "{ev:?}");
        let line: Value = serde_json::from_str(&ev.data).unwrap();
        let seq = line["seq"].as_u64().unwrap();
        assert_eq!(ev.id, Some(seq.to_string()), "SSE id = seq");
        (seq, line["text"].as_str().unwrap().to_owned())
    };

    // The first two lines, then the connection drops.
    let mut sse = open(None).await;
    let first: Vec<(u64, String)> = [
        sse.next_within(20).await.expect("line 1"),
        sse.next_within(20).await.expect("line 2"),
    ]
    .into_iter()
    .map(log_line)
    .collect();
    assert_eq!(first, vec![(1, "one".into()), (2, "two".into())]);
    drop(sse);

    // Lines 3 and 4 are written and stored while nobody listens.
    std::fs::write(&flag_a, b"").unwrap();
    eventually(20, "lines 3 and 4 to be stored", || async {
        let (_, page) = get(&s, &logs).await;
        (page["lines"].as_array().unwrap().len() == 4).then_some(())
    })
    .await;
    let (_, running) = get(&s, &format!("/api/v1/jobs/{id}")).await;
    assert_eq!(running["state"], "RUNNING", "it waits for $B: {running}");

    // The browser reconnects: 3 and 4 from history, no 1 or 2 again.
    let mut sse = open(Some("2")).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(log_line(sse.next_within(20).await.expect("a resumed line")));
    }
    assert_eq!(got, vec![(3, "three".into()), (4, "four".into())]);
    // Then live: 5 and 6 exist only once $B is there, then `end`, once.
    std::fs::write(&flag_b, b"").unwrap();
    loop {
        let ev = sse
            .next_within(20)
            .await
            .expect("the resumed stream ends with `end`, not before");
        if ev.event == "end" {
            let end: Value = serde_json::from_str(&ev.data).unwrap();
            assert_eq!(end["state"], "SUCCEEDED", "{end}");
            assert_eq!(end["id"], id.as_str());
            break;
        }
        got.push(log_line(ev));
    }
    let _ = std::fs::remove_file(&flag_a);
    let _ = std::fs::remove_file(&flag_b);
    let want: Vec<(u64, String)> = ["three", "four", "five", "six"]
        .iter()
        .enumerate()
        .map(|(i, t)| (i as u64 + 3, t.to_string()))
        .collect();
    assert_eq!(got, want, "every line after 2, once, in order");
    assert!(sse.next_within(5).await.is_none(), "closed after `end`");
}

#[tokio::test]
async fn a_stream_of_a_cancelled_job_ends() {
    let s = Server::start(HttpConfig::default()).await;
    let job = submit(
        &s,
        json!({"command": ["sh", "-c", "echo started; sleep 30"]}),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let r = s
        .http
        .get(s.url(&format!("/api/v1/jobs/{id}/logs")))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(r);
    let first = sse.next_within(20).await.unwrap();
    assert_eq!(first.event, "log");
    assert!(first.data.contains("started"));
    s.http
        .post(s.url(&format!("/api/v1/jobs/{id}/cancel")))
        .send()
        .await
        .unwrap();
    let end = sse.next_within(10).await.unwrap();
    assert_eq!(end.event, "end");
    assert!(end.data.contains("CANCELLED"), "{}", end.data);
    assert!(sse.next_within(5).await.is_none());
}

// ---------------------------------------------------------------- OpenAPI

#[tokio::test]
async fn the_openapi_document_and_the_router_have_the_same_routes() {
    let s = Server::start(HttpConfig::default()).await;
    let (status, doc) = get(&s, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let (_, v1) = get(&s, "/api/v1/openapi.json").await;
    assert_eq!(doc, v1);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in [
            "get", "post", "put", "delete", "patch", "head", "options", "trace",
        ] {
            if item.get(method).is_some() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = hodei_http::route_table()
        .into_iter()
        .map(|r| (r.method.to_string(), r.path.to_owned()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from the OpenAPI document: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "documented routes the router does not serve: {unserved:?}"
    );
    for required in [
        ("POST", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs"),
        ("GET", "/api/v1/jobs/{id}"),
        ("POST", "/api/v1/jobs/{id}/cancel"),
        ("GET", "/api/v1/jobs/{id}/logs"),
        ("GET", "/api/v1/jobs/{id}/events"),
        ("GET", "/api/v1/workers"),
        ("POST", "/api/v1/workers/{id}/drain"),
        ("GET", "/api/v1/providers"),
        ("GET", "/api/v1/audit"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/"),
    ] {
        assert!(
            served.contains(&(required.0.to_owned(), required.1.to_owned())),
            "{required:?}"
        );
    }

    // And the router really answers each of them (not its 404/405 fallbacks).
    let id = "0f8fad5b-d9cb-469f-a165-70867728950e";
    for (method, path) in &served {
        let url = s.url(&path.replace("{id}", id));
        let r = s
            .http
            .request(method.parse().unwrap(), &url)
            .json(&json!({"command": ["true"]}))
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_ne!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {path}: {text}"
        );
        assert!(!text.contains("no route"), "{method} {path}: {text}");
    }

    // The schemas the handlers send are in the document.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "JobDto",
        "JobSpecDto",
        "ErrorBody",
        "LogLineDto",
        "EventDto",
        "WorkerDto",
        "ProviderDto",
        "AuditPageDto",
    ] {
        assert!(schemas.contains_key(name), "{name}");
    }
    // The documented spec fields are the core's RawJobSpec fields.
    let documented_fields: BTreeSet<&str> = schemas["JobSpecDto"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let full = hodei_core::spec::RawJobSpec {
        name: Some("n".into()),
        command: Some(vec!["c".into()]),
        script: Some("s".into()),
        image: Some("i".into()),
        env: BTreeMap::from([("K".into(), "V".into())]),
        secrets: vec!["S".into()],
        working_dir: Some("/".into()),
        timeout_secs: Some(1),
        max_attempts: Some(1),
        priority: Some(1),
        labels: BTreeMap::from([("k".into(), "v".into())]),
        provider: Some("p".into()),
        resources: Some(hodei_core::spec::RawResources {
            cpu: Some(1.0),
            memory_mb: Some(1),
        }),
        idempotency_key: Some("k".into()),
        retry_on_failure: Some(true),
    };
    let raw = serde_json::to_value(full).unwrap();
    let core_fields: BTreeSet<&str> = raw
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(documented_fields, core_fields);
    // Every /api/v1 operation declares the bearer scheme.
    for (path, item) in doc["paths"].as_object().unwrap() {
        if path.starts_with("/api/v1/") {
            for op in item.as_object().unwrap().values() {
                assert!(op["security"].to_string().contains("bearer"), "{path}");
            }
        }
    }
}

// ---------------------------------------------------------------- metrics

/// Parses the Prometheus text format into `name{labels}` → value, checking
/// that every sample's family was declared with `# TYPE` first.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut declared = BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let name = parts.next().unwrap().to_owned();
            let kind = parts.next().unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            declared.insert(name);
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name = series.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
            .unwrap_or(name);
        assert!(
            declared.contains(family),
            "sample before its # TYPE: {line}"
        );
        let labels = &series[name.len()..];
        assert!(
            labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
            "{line}"
        );
        assert!(
            samples.insert(series.to_owned(), value).is_none(),
            "duplicate series {series}"
        );
    }
    samples
}

/// The `hodei_workers` series, by their `state` label.
fn workers_by_state(m: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    m.iter()
        .filter_map(|(k, v)| {
            let state = k
                .strip_prefix("hodei_workers{state=\"")?
                .strip_suffix("\"}")?;
            Some((state.to_owned(), *v))
        })
        .collect()
}

/// The event-bus lag gauges are there and are non-negative numbers; the
/// event count is a whole number no greater than its cap.
fn assert_lag_gauges(m: &BTreeMap<String, f64>) {
    for name in ["hodei_event_bus_lag_events", "hodei_event_bus_lag_seconds"] {
        let v = *m.get(name).unwrap_or_else(|| panic!("{name} missing"));
        assert!(v.is_finite() && v >= 0.0, "{name} = {v}");
    }
    let events = m["hodei_event_bus_lag_events"];
    assert!(
        events.fract() == 0.0 && events <= 10_000.0,
        "hodei_event_bus_lag_events = {events}"
    );
}

#[tokio::test]
async fn metrics_move_when_jobs_run() {
    let config = HttpConfig::default();
    let metrics = config.metrics.clone();
    // At most one worker: while one job holds it, the others wait in the queue.
    let s = Server::start_with(support::control_plane_with(1).await, config).await;
    let flag = std::env::temp_dir().join(format!("hodei-metrics-flag-{}", uuid::Uuid::new_v4()));
    let scrape = || async {
        let r = s.http.get(s.url("/metrics")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/plain; version=0.0.4")
        );
        parse_metrics(&r.text().await.unwrap())
    };
    let before = scrape().await;
    for name in [
        "hodei_jobs_submitted_total",
        "hodei_jobs_finished_total{state=\"SUCCEEDED\"}",
        "hodei_job_duration_seconds_count{state=\"SUCCEEDED\"}",
        "hodei_job_start_latency_seconds_count",
        "hodei_queue_depth",
        "hodei_workers{state=\"READY\"}",
        "hodei_workers{state=\"BUSY\"}",
        "hodei_workers{state=\"TERMINATED\"}",
        "hodei_event_bus_lag_events",
        "hodei_event_bus_lag_seconds",
        "hodei_log_lines_total",
        "hodei_log_bytes_total",
        "hodei_log_lines_dropped_total",
    ] {
        assert!(before.contains_key(name), "{name} missing");
    }
    assert_eq!(before["hodei_jobs_submitted_total"], 0.0);
    assert_eq!(before["hodei_log_lines_dropped_total"], 0.0);
    assert_eq!(before["hodei_queue_depth"], 0.0);
    let workers = workers_by_state(&before);
    assert!(
        workers.values().all(|n| *n == 0.0),
        "no worker yet: {workers:?}"
    );
    assert_lag_gauges(&before);
    assert!(
        !before
            .keys()
            .any(|k| k.starts_with("hodei_grpc_requests_total")),
        "no gRPC request recorded yet"
    );

    // A job that holds the only worker until the test creates $FLAG.
    let holder = submit(
        &s,
        json!({
            "command": ["sh", "-c", "echo a; echo bb; while [ ! -e \"$FLAG\" ]; do sleep 0.05; done; sleep 0.2"],
            "env": {"FLAG": flag.to_str().unwrap()},
        }),
    )
    .await;
    let holder = holder["id"].as_str().unwrap().to_owned();
    wait_state(&s, &holder, |st| st == "RUNNING").await;
    let running = eventually(20, "the worker to be BUSY", || async {
        let m = scrape().await;
        (m["hodei_workers{state=\"BUSY\"}"] == 1.0).then_some(m)
    })
    .await;
    let live: f64 = workers_by_state(&running)
        .iter()
        .filter(|(state, _)| *state != "TERMINATED")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(live, 1.0, "{:?}", workers_by_state(&running));
    assert_eq!(running["hodei_queue_depth"], 0.0, "the running job left it");
    assert_lag_gauges(&running);

    // Two more wait for the worker slot: the queue holds them.
    let failing = submit(&s, json!({"command": ["false"]})).await;
    let failing = failing["id"].as_str().unwrap().to_owned();
    let doomed = submit(&s, json!({"command": ["sleep", "30"]})).await;
    let doomed = doomed["id"].as_str().unwrap().to_owned();
    let queued = scrape().await;
    assert_eq!(queued["hodei_queue_depth"], 2.0);
    assert_eq!(queued["hodei_workers{state=\"BUSY\"}"], 1.0);
    for id in [&failing, &doomed] {
        let (_, job) = get(&s, &format!("/api/v1/jobs/{id}")).await;
        assert_eq!(job["state"], "PENDING", "no slot for it: {job}");
    }

    // A cancelled job leaves the queue.
    let r = s
        .http
        .post(s.url(&format!("/api/v1/jobs/{doomed}/cancel")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    eventually(10, "the queue depth to drop to 1", || async {
        (scrape().await["hodei_queue_depth"] == 1.0).then_some(())
    })
    .await;

    // The holder ends; the waiting job gets the slot, runs and fails, and
    // both one-job workers go.
    std::fs::write(&flag, b"").unwrap();
    let done = wait_terminal(&s, &holder).await;
    let _ = std::fs::remove_file(&flag);
    assert_eq!(done["state"], "SUCCEEDED", "{done}");
    let done = wait_terminal(&s, &failing).await;
    assert_eq!(done["state"], "FAILED", "{done}");
    // A clone of the registry (what hodei-server gives its gRPC server)
    // records into the one served here. The gRPC server's own recording is
    // tested end to end in hodei-grpc.
    metrics.record_grpc("/hodei.v1.JobService/GetJob", "NOT_FOUND", 0.004);

    let after = eventually(20, "the gauges and histograms to settle", || async {
        let m = scrape().await;
        let workers = workers_by_state(&m);
        let live: f64 = workers
            .iter()
            .filter(|(state, _)| *state != "TERMINATED")
            .map(|(_, n)| n)
            .sum();
        (m["hodei_job_duration_seconds_count{state=\"FAILED\"}"] >= 1.0
            && m["hodei_job_duration_seconds_count{state=\"SUCCEEDED\"}"] >= 1.0
            && m["hodei_job_duration_seconds_count{state=\"CANCELLED\"}"] >= 1.0
            && m["hodei_queue_depth"] == 0.0
            && live == 0.0
            && m["hodei_event_bus_lag_events"] == 0.0)
            .then_some(m)
    })
    .await;
    assert_eq!(after["hodei_workers{state=\"TERMINATED\"}"], 2.0);
    assert_lag_gauges(&after);
    assert_eq!(after["hodei_jobs_submitted_total"], 3.0);
    assert_eq!(after["hodei_jobs_finished_total{state=\"SUCCEEDED\"}"], 1.0);
    assert_eq!(after["hodei_jobs_finished_total{state=\"FAILED\"}"], 1.0);
    // The job cancelled while queued, before any engine claimed it (the
    // store-side cancel path), counts too, in the counter and in the
    // histogram fed by the event bus.
    assert_eq!(after["hodei_jobs_finished_total{state=\"CANCELLED\"}"], 1.0);
    assert_eq!(
        after["hodei_job_duration_seconds_count{state=\"CANCELLED\"}"],
        1.0
    );
    assert_eq!(after["hodei_jobs_finished_total{state=\"TIMED_OUT\"}"], 0.0);
    assert_eq!(after["hodei_log_lines_total"], 2.0);
    assert_eq!(after["hodei_log_bytes_total"], 3.0);
    assert_eq!(after["hodei_log_lines_dropped_total"], 0.0);
    // The cancelled job never started.
    assert_eq!(after["hodei_job_start_latency_seconds_count"], 2.0);
    assert!(after["hodei_job_start_latency_seconds_sum"] > 0.0);
    let succeeded_secs = after["hodei_job_duration_seconds_sum{state=\"SUCCEEDED\"}"];
    assert!(
        succeeded_secs >= 0.2,
        "the job slept 0.2 s: {succeeded_secs}"
    );
    assert_eq!(
        after["hodei_job_duration_seconds_bucket{state=\"SUCCEEDED\",le=\"+Inf\"}"],
        1.0
    );
    assert_eq!(after["hodei_provider_healthy{provider=\"local\"}"], 1.0);
    assert!(after["hodei_event_bus_events_total"] > before["hodei_event_bus_events_total"]);
    assert_eq!(
        after["hodei_http_requests_total{method=\"POST\",route=\"/api/v1/jobs\",status=\"201\"}"],
        3.0
    );
    assert_eq!(
        after["hodei_http_requests_total{method=\"POST\",route=\"/api/v1/jobs/{id}/cancel\",status=\"200\"}"],
        1.0
    );
    assert!(
        after["hodei_http_requests_total{method=\"GET\",route=\"/api/v1/jobs/{id}\",status=\"200\"}"]
            >= 2.0
    );
    assert!(
        after["hodei_http_request_duration_seconds_count{method=\"POST\",route=\"/api/v1/jobs\"}"]
            >= 3.0
    );
    assert!(after.contains_key("hodei_http_request_duration_seconds_bucket{method=\"POST\",route=\"/api/v1/jobs\",le=\"+Inf\"}"));
    assert_eq!(
        after["hodei_grpc_requests_total{method=\"/hodei.v1.JobService/GetJob\",code=\"NOT_FOUND\"}"],
        1.0
    );
    assert_eq!(
        after["hodei_grpc_request_duration_seconds_count{method=\"/hodei.v1.JobService/GetJob\"}"],
        1.0
    );
    // Unknown paths are one series, not one per path.
    s.http.get(s.url("/nope/1")).send().await.unwrap();
    s.http.get(s.url("/nope/2")).send().await.unwrap();
    let m = scrape().await;
    assert_eq!(
        m["hodei_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}"],
        2.0
    );
}

#[tokio::test]
async fn serve_returns_after_shutdown_even_with_a_stream_open() {
    let cp = support::control_plane().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = hodei_http::router(cp.clone(), HttpConfig::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(hodei_http::serve(listener, router, async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let job: Value = http
        .post(format!("{base}/api/v1/jobs"))
        .json(&json!({"command": ["sleep", "30"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap();
    let r = http
        .get(format!("{base}/api/v1/jobs/{id}/logs"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    stop.send(()).unwrap();
    let result = tokio::time::timeout(hodei_http::SHUTDOWN_GRACE + Duration::from_secs(5), server)
        .await
        .expect("serve returns within the grace");
    result.unwrap().unwrap();
    drop(r);
    cp.shutdown().await;
}

/// A queue that answers everything but `depth`, as a store that is half down.
struct NoDepth(std::sync::Arc<dyn hodei_core::ports::JobQueue>);

#[async_trait::async_trait]
impl hodei_core::ports::JobQueue for NoDepth {
    async fn claim(
        &self,
        owner: &str,
        now: hodei_core::time::Timestamp,
        limit: usize,
        lease: Duration,
    ) -> Result<hodei_core::ports::Claim, hodei_core::ports::StoreError> {
        self.0.claim(owner, now, limit, lease).await
    }
    async fn release(
        &self,
        id: hodei_core::ids::JobId,
        owner: &str,
    ) -> Result<(), hodei_core::ports::StoreError> {
        self.0.release(id, owner).await
    }
    async fn depth(&self) -> Result<u64, hodei_core::ports::StoreError> {
        Err(hodei_core::ports::StoreError::Unavailable(
            "connection refused".into(),
        ))
    }
    async fn overdue(
        &self,
        now: hodei_core::time::Timestamp,
        limit: usize,
    ) -> Result<Vec<hodei_core::job::Job>, hodei_core::ports::StoreError> {
        self.0.overdue(now, limit).await
    }
}

#[tokio::test]
async fn readyz_is_503_while_a_store_does_not_answer() {
    let mut stores = hodei_core::runtime::Stores::memory();
    stores.queue = std::sync::Arc::new(NoDepth(stores.queue.clone()));
    let cp = hodei_core::runtime::ControlPlane::start(Default::default(), stores, Vec::new())
        .await
        .unwrap();
    let s = Server::start_with(cp, HttpConfig::default()).await;
    let r = s.http.get(s.url("/readyz")).send().await.unwrap();
    assert_error(
        r,
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        &["connection refused"],
    )
    .await;
    let (status, _) = get(&s, "/healthz").await;
    assert_eq!(status, StatusCode::OK, "the process is still alive");
    // Metrics still render, without the gauge that cannot be read.
    let text = s
        .http
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let m = parse_metrics(&text);
    assert!(!m.contains_key("hodei_queue_depth"));
    assert!(m.contains_key("hodei_jobs_submitted_total"));
}

/// A log store that never marks a log complete, as after a crash between a
/// job's end and the mark.
struct NeverFinished(std::sync::Arc<dyn hodei_core::ports::LogStore>);

#[async_trait::async_trait]
impl hodei_core::ports::LogStore for NeverFinished {
    async fn append(
        &self,
        job: hodei_core::ids::JobId,
        attempt: u32,
        lines: Vec<hodei_core::ports::NewLogLine>,
    ) -> Result<u64, hodei_core::ports::StoreError> {
        self.0.append(job, attempt, lines).await
    }
    async fn read(
        &self,
        job: hodei_core::ids::JobId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<hodei_core::ports::LogLine>, hodei_core::ports::StoreError> {
        self.0.read(job, after, limit).await
    }
    async fn finish(
        &self,
        _job: hodei_core::ids::JobId,
    ) -> Result<(), hodei_core::ports::StoreError> {
        Ok(())
    }
    fn follow(
        &self,
        job: hodei_core::ids::JobId,
        after: u64,
    ) -> futures::stream::BoxStream<
        'static,
        Result<hodei_core::ports::LogLine, hodei_core::ports::StoreError>,
    > {
        self.0.follow(job, after)
    }
}

#[tokio::test]
async fn a_stream_ends_for_a_terminal_job_whose_log_was_never_marked_complete() {
    let mut stores = hodei_core::runtime::Stores::memory();
    stores.logs = std::sync::Arc::new(NeverFinished(stores.logs.clone()));
    let cp = support::control_plane_on(stores, 8).await;
    let s = Server::start_with(cp, HttpConfig::default()).await;
    let job = submit(&s, json!({"command": ["echo", "only"]})).await;
    let id = job["id"].as_str().unwrap().to_owned();
    wait_terminal(&s, &id).await;
    let r = s
        .http
        .get(s.url(&format!("/api/v1/jobs/{id}/logs")))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(r);
    assert_eq!(sse.next_within(10).await.unwrap().id.as_deref(), Some("1"));
    let end = sse.next_within(15).await.unwrap();
    assert_eq!(end.event, "end");
    assert!(sse.next_within(5).await.is_none());
}
