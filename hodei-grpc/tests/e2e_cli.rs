//! The `hodei` CLI end to end against a real `hodei-server` (local provider,
//! real `hodei-worker` processes): the commands and flags of DESIGN.md that
//! the other suites do not run: `job list` (text, JSON, `--state`,
//! `--limit`, `--cursor`), `job submit --script --workdir --memory --cpu`,
//! `worker list`, `worker drain`, the `--limit` range, and the README's
//! quick start with an explicit correlation id. Synchronisation is by
//! polling with deadlines or by sentinel files the jobs wait on.

mod e2e_support;

use e2e_support::*;
use hodei_grpc::proto;
use proto::JobState;
use serde_json::Value;

/// Runs the CLI, asserts exit code 0, returns stdout.
fn ok(server: &TestServer, args: &[&str]) -> String {
    let out = server.cli(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "hodei {args:?}: {}",
        stderr(&out)
    );
    stdout(&out)
}

/// Runs the CLI with `--output json`, asserts exit code 0, parses stdout.
fn ok_json(server: &TestServer, args: &[&str]) -> Value {
    let out = ok(server, &[&["--output", "json"][..], args].concat());
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("hodei {args:?}: {e}: {out}"))
}

/// The ids of a `{"jobs": [...]}` document, in order.
fn job_ids(v: &Value) -> Vec<String> {
    v["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no jobs array: {v}"))
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect()
}

/// `job submit` in text prints the id alone on one line.
fn submit(server: &TestServer, args: &[&str]) -> String {
    let out = ok(server, &[&["job", "submit"][..], args].concat());
    let id = out.trim().to_owned();
    assert_eq!(out, format!("{id}\n"), "one line with the id");
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{out}");
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_list_in_text_and_json_with_state_limit_and_cursor() {
    let server = TestServer::start();
    let client = server.client().await;
    let succeeded = submit(&server, &["--name", "ok", "--", "true"]);
    client.wait_terminal(&succeeded).await;
    let failed = submit(&server, &["--name", "bad", "--", "sh", "-c", "exit 3"]);
    assert_eq!(
        client.wait_terminal(&failed).await.state,
        JobState::Failed as i32
    );
    let gate = server.path("gate");
    let running = submit(
        &server,
        &["--name", "held", "--", "sh", "-c", &wait_file(&gate)],
    );
    client.running_worker(&running).await;

    // Text: a header, one row per job, newest first; no "more" line.
    let text = ok(&server, &["job", "list"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    for column in ["ID", "STATE", "ATTEMPT", "CREATED", "NAME"] {
        assert!(lines[0].contains(column), "{text}");
    }
    for (line, (id, state, name)) in lines[1..].iter().zip([
        (&running, "RUNNING", "held"),
        (&failed, "FAILED", "bad"),
        (&succeeded, "SUCCEEDED", "ok"),
    ]) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[0], id.as_str(), "{text}");
        assert_eq!(cells[1], state, "{text}");
        assert_eq!(cells.last(), Some(&name), "{text}");
    }
    // --state filters, in text and JSON.
    let text = ok(&server, &["job", "list", "--state", "FAILED"]);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.lines().nth(1).unwrap().starts_with(&failed), "{text}");
    let v = ok_json(&server, &["job", "list", "--state", "SUCCEEDED"]);
    assert_eq!(job_ids(&v), [succeeded.as_str()]);
    assert_eq!(v["jobs"][0]["state"], "SUCCEEDED");
    assert_eq!(v["jobs"][0]["name"], "ok");
    // The last (only) page has no `next_cursor` key at all.
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let v = ok_json(&server, &["job", "list", "--state", "RUNNING"]);
    assert_eq!(job_ids(&v), [running.as_str()]);
    let v = ok_json(&server, &["job", "list", "--state", "CANCELLED"]);
    assert_eq!(v, serde_json::json!({ "jobs": [] }));
    let v = ok_json(&server, &["job", "list"]);
    assert_eq!(
        job_ids(&v),
        [running.as_str(), failed.as_str(), succeeded.as_str()]
    );
    assert!(v.get("next_cursor").is_none(), "{v}");
    // An unknown state is a local usage error.
    let out = server.cli(&["job", "list", "--state", "DONE"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // --limit pages with --cursor: two pages of two and one.
    let first = ok_json(&server, &["job", "list", "--limit", "2"]);
    assert_eq!(job_ids(&first), [running.as_str(), failed.as_str()]);
    let cursor = first["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("a next_cursor: {first}"))
        .to_owned();
    let second = ok_json(
        &server,
        &["job", "list", "--limit", "2", "--cursor", &cursor],
    );
    assert_eq!(job_ids(&second), [succeeded.as_str()]);
    assert!(second.get("next_cursor").is_none(), "{second}");
    let text = ok(&server, &["job", "list", "--limit", "2"]);
    assert_eq!(
        text.lines().last(),
        Some(format!("(more: --cursor {cursor})").as_str()),
        "{text}"
    );

    touch(&gate);
    assert_eq!(
        client.wait_terminal(&running).await.state,
        JobState::Succeeded as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_submit_with_script_workdir_memory_and_cpu() {
    let server = TestServer::start();
    let client = server.client().await;
    let script = "#!/bin/sh\necho from-script\npwd\n";
    let file = server.path("build.sh");
    std::fs::write(&file, script).unwrap();
    // Created by the agent when missing.
    let workdir = server.path("work/dir");
    let workdir = workdir.to_str().unwrap();
    let id = submit(
        &server,
        &[
            "--name",
            "scripted",
            "--script",
            file.to_str().unwrap(),
            "--workdir",
            workdir,
            "--memory",
            "1Gi",
            "--cpu",
            "0.5",
        ],
    );
    let done = client.wait_terminal(&id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");

    // The stored spec carries every flag.
    let job = ok_json(&server, &["job", "get", &id]);
    assert_eq!(job["id"], id.as_str());
    assert_eq!(job["state"], "SUCCEEDED");
    let spec = &job["spec"];
    assert_eq!(spec["name"], "scripted", "{spec}");
    assert_eq!(spec["script"], script, "{spec}");
    assert!(spec.get("command").is_none(), "{spec}");
    assert_eq!(spec["working_dir"], workdir, "{spec}");
    assert_eq!(spec["resources"]["memory_mb"], 1024, "{spec}");
    assert_eq!(spec["resources"]["cpu"], 0.5, "{spec}");
    // The script ran, in that directory.
    let logs = ok(&server, &["job", "logs", &id]);
    assert_eq!(logs, format!("from-script\n{workdir}\n"));
    assert!(std::path::Path::new(workdir).is_dir());

    // Other --memory forms, and a script together with a command refused
    // locally (exit 2) before anything is sent.
    let id = submit(&server, &["--memory", "512", "--", "true"]);
    let job = ok_json(&server, &["job", "get", &id]);
    assert_eq!(job["spec"]["resources"]["memory_mb"], 512);
    assert!(job["spec"]["resources"].get("cpu").is_none(), "{job}");
    let out = server.cli(&[
        "job",
        "submit",
        "--script",
        file.to_str().unwrap(),
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    let out = server.cli(&["job", "submit", "--script", "/nonexistent/x.sh"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/x.sh"),
        "{}",
        stderr(&out)
    );
    let v = ok_json(&server, &["job", "list"]);
    assert_eq!(job_ids(&v).len(), 2, "nothing else was created: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_list_and_drain() {
    let server = TestServer::start();
    let client = server.client().await;
    let gate = server.path("gate");
    let job = client
        .submit(sh(&format!(
            "echo working; {}; echo finished",
            wait_file(&gate)
        )))
        .await;
    let worker = client.running_worker(&job.job_id).await;

    // Text: the worker's row with its provider, state and jobs/capacity.
    let text = ok(&server, &["worker", "list"]);
    let header = text.lines().next().unwrap();
    for column in ["ID", "PROVIDER", "STATE", "CONNECTED", "JOBS", "LAST SEEN"] {
        assert!(header.contains(column), "{text}");
    }
    let row = text
        .lines()
        .find(|l| l.starts_with(&worker))
        .unwrap_or_else(|| panic!("no row for {worker}: {text}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[1..5], ["local", "BUSY", "yes", "1/1"], "{text}");
    // JSON: the document of GET /api/v1/workers.
    let v = ok_json(&server, &["worker", "list"]);
    let w = worker_doc(&v, &worker);
    assert_eq!(w["provider"], "local");
    assert_eq!(w["state"], "BUSY");
    assert_eq!(w["jobs"], serde_json::json!([job.job_id]));

    // Drain: the worker takes no new work but finishes its job.
    let out = ok(&server, &["worker", "drain", &worker]);
    assert_eq!(out, format!("worker {worker} draining\n"));
    let drained = client
        .wait_event("WorkerDraining", |e| e.aggregate_id == worker)
        .await;
    assert_eq!(drained.actor, "anonymous", "the CLI's caller drained it");
    let v = ok_json(&server, &["worker", "list"]);
    assert_eq!(worker_doc(&v, &worker)["state"], "DRAINING", "{v}");
    assert_eq!(
        client.job(&job.job_id).await.state,
        JobState::Running as i32,
        "draining does not stop the running job"
    );
    let v = ok_json(
        &server,
        &[
            "audit",
            "--event-type",
            "WorkerDraining",
            "--actor",
            "anonymous",
        ],
    );
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(v["events"][0]["aggregate_id"], worker.as_str());

    // A job submitted now does not land on the draining worker.
    touch(&gate);
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32);
    let next = client.submit(sh("echo next")).await;
    let next = client.wait_terminal(&next.job_id).await;
    assert_eq!(next.state, JobState::Succeeded as i32);
    let ran_on: Vec<Option<String>> = next.attempts.iter().map(|a| a.worker_id.clone()).collect();
    assert_eq!(ran_on.len(), 1, "{next:?}");
    assert_ne!(ran_on[0].as_deref(), Some(worker.as_str()));
    // The drained worker leaves.
    wait_for("the drained worker to be terminated", DEADLINE, || async {
        let v = ok_json(&server, &["worker", "list"]);
        (worker_doc(&v, &worker)["state"] == "TERMINATED").then_some(())
    })
    .await;
    let texts = client.log_texts(&job.job_id).await;
    assert_eq!(texts, ["working", "finished"]);

    // Unknown and malformed worker ids.
    let unknown = uuid::Uuid::new_v4().to_string();
    let out = server.cli(&["worker", "drain", &unknown]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    let out = server.cli(&["worker", "drain", "not-a-uuid"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).starts_with("hodei: "), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_outside_one_to_a_thousand_are_refused() {
    let server = TestServer::start();
    let client = server.client().await;
    for args in [
        &["job", "list", "--limit", "0"][..],
        &["job", "list", "--limit", "5000"][..],
        &["--output", "json", "job", "list", "--limit", "1001"][..],
        &["audit", "--limit", "0"][..],
        &["audit", "--limit", "5000"][..],
    ] {
        let out = server.cli(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("hodei: "), "{args:?}: {err}");
        assert!(err.contains("--limit"), "{args:?}: {err}");
        assert!(err.contains("1..=1000"), "{args:?}: {err}");
        assert!(stdout(&out).is_empty(), "{args:?}");
    }
    // The bounds themselves are accepted, and audit echoes the limit it
    // applied.
    ok(&server, &["job", "list", "--limit", "1"]);
    ok(&server, &["job", "list", "--limit", "1000"]);
    let v = ok_json(&server, &["audit", "--limit", "1000"]);
    assert_eq!(v["limit"], 1000, "{v}");
    let v = ok_json(&server, &["audit"]);
    assert_eq!(v["limit"], 100, "{v}");

    // Over gRPC the server refuses rather than caps; 0 is the default.
    let refused = client
        .jobs()
        .list(proto::ListJobsRequest {
            limit: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_limit_refused(&refused);
    let refused = client
        .audit()
        .query(proto::AuditQueryRequest {
            limit: 1001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_limit_refused(&refused);
    for limit in [0, 1000] {
        client
            .jobs()
            .list(proto::ListJobsRequest {
                limit,
                ..Default::default()
            })
            .await
            .unwrap();
        client
            .audit()
            .query(proto::AuditQueryRequest {
                limit,
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// The README's quick start: an explicit correlation id on `job run`, then
/// `audit --correlation-id` finds every event of that run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readme_quick_start_audit_by_correlation_id() {
    let server = TestServer::start();
    let out = server.cli(&[
        "--correlation-id",
        "demo-1",
        "job",
        "run",
        "--",
        "sh",
        "-c",
        "echo hi; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hi\n");
    let text = ok(&server, &["audit", "--correlation-id", "demo-1"]);
    let v = ok_json(&server, &["audit", "--correlation-id", "demo-1"]);
    let events = v["events"].as_array().unwrap();
    let total = v["total"].as_u64().unwrap();
    assert_eq!(events.len() as u64, total, "{v}");
    assert!(
        text.ends_with(&format!("({total} of {total} matching events)\n")),
        "{text}"
    );
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    for t in ["JobCreated", "JobStarted", "JobFailed"] {
        assert!(types.contains(&t), "{types:?}");
    }
    assert!(
        events.iter().all(|e| e["correlation_id"] == "demo-1"),
        "{v}"
    );
    assert!(
        events
            .iter()
            .any(|e| e["actor"].as_str().unwrap().starts_with("worker:")),
        "the worker's events carry it too: {v}"
    );
    // `job list` and `job events <ID>`, the README's other steps.
    let id = job_ids(&ok_json(&server, &["job", "list"]))[0].clone();
    let text = ok(&server, &["job", "events", &id]);
    assert!(
        text.contains("JobFailed") && text.contains("demo-1"),
        "{text}"
    );
}

fn worker_doc<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["workers"]
        .as_array()
        .unwrap_or_else(|| panic!("no workers array: {v}"))
        .iter()
        .find(|w| w["id"] == id)
        .unwrap_or_else(|| panic!("no worker {id}: {v}"))
}

fn assert_limit_refused(s: &tonic::Status) {
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("`limit`"), "{s:?}");
    assert!(s.message().contains("1..=1000"), "{s:?}");
    assert_eq!(
        s.metadata()
            .get(hodei_grpc::server::ERROR_FIELD_HEADER)
            .and_then(|v| v.to_str().ok()),
        Some("limit"),
        "{s:?}"
    );
}
