//! End to end over real processes: `hodei-server` with the local provider
//! spawning `hodei-worker` agents; jobs submitted over gRPC and with the
//! `hodei` CLI. Synchronisation is by polling with deadlines or by
//! sentinel files the jobs wait on, never by sleeping.

mod e2e_support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e_support::*;
use hodei_grpc::proto;
use proto::JobState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_run_streams_logs_live_and_exits_with_the_job_code() {
    let server = TestServer::start();
    let gate = server.path("gate");
    let script = format!(
        "echo first; echo to-stderr >&2; {}; echo second; exit 7",
        wait_file(&gate)
    );
    let mut child = server
        .cli_cmd(&["job", "run", "--name", "live", "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    // The first line arrives while the job is still blocked on the gate:
    // logs are streamed live, not printed at the end.
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "first\n");
    let client = server.client().await;
    let jobs = client
        .jobs()
        .list(proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, JobState::Running as i32);
    touch(&gate);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "second\n");
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(7), "stderr: {err}");
    assert!(
        err.contains("to-stderr"),
        "job stderr goes to stderr: {err}"
    );
    assert!(err.contains("exited with code 7"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follow_logs_and_result_over_grpc() {
    let server = TestServer::start();
    let client = server.client().await;
    let gate = server.path("gate");
    let job = client
        .submit(sh(&format!("echo one; {}; echo two", wait_file(&gate))))
        .await;
    assert_eq!(job.state, JobState::Pending as i32);
    let mut follow = client
        .logs()
        .follow(proto::FollowLogsRequest {
            job_id: job.job_id.clone(),
            after: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let chunk = follow.message().await.unwrap().unwrap();
    assert_eq!(chunk.lines[0].text, "one");
    assert_eq!(
        client.job(&job.job_id).await.state,
        JobState::Running as i32
    );
    touch(&gate);
    let mut rest = Vec::new();
    while let Some(c) = follow.message().await.unwrap() {
        rest.extend(c.lines);
    }
    assert_eq!(
        rest.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(),
        ["two"]
    );
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32);

    // The CLI shows the same job.
    let out = server.cli(&["--output", "json", "job", "get", &job.job_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["state"], "SUCCEEDED");
    assert_eq!(v["id"], job.job_id.as_str());
    let out = server.cli(&["job", "logs", &job.job_id]);
    assert_eq!(stdout(&out), "one\ntwo\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_is_retried_with_backoff() {
    let server = TestServer::start();
    let client = server.client().await;
    let mut spec = sh("echo attempt; exit 3");
    spec.max_attempts = Some(2);
    spec.retry_on_failure = Some(true);
    let job = client.submit(spec).await;
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Failed as i32);
    assert_eq!(done.attempt, 2);
    assert_eq!(done.attempts.len(), 2);
    let events = client.events(&job.job_id).await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    let retry = events
        .iter()
        .find(|e| e.event_type == "JobRetryScheduled")
        .unwrap_or_else(|| panic!("no JobRetryScheduled in {types:?}"));
    let p = payload(retry);
    assert_eq!(p["failed_attempt"], 1);
    assert_eq!(p["next_attempt"], 2);
    // retry_base = 200ms, jitter 0: the first backoff is 200 ms.
    assert_eq!(p["delay_ms"], 200);
    // The second attempt started no earlier than its not_before.
    let first_end = done.attempts[0].finished_at.unwrap();
    let second_start = done.attempts[1].started_at.unwrap();
    let gap_ms = (second_start.seconds - first_end.seconds) * 1000
        + i64::from(second_start.nanos - first_end.nanos) / 1_000_000;
    assert!(
        gap_ms >= 200,
        "second attempt started {gap_ms} ms after the first ended"
    );
    assert_eq!(
        types.iter().filter(|t| **t == "JobStarted").count(),
        2,
        "{types:?}"
    );
    assert!(types.contains(&"JobRetryExhausted"), "{types:?}");
    let logs = client.logs_of(&job.job_id).await;
    let attempts: Vec<u32> = logs.iter().map(|l| l.attempt).collect();
    assert_eq!(attempts, [1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_whole_process_tree() {
    let server = TestServer::start();
    let client = server.client().await;
    let mark = format!("E2E_MARK={}", uuid::Uuid::new_v4());
    let mut spec = sh("sleep 1000 & sleep 1000");
    spec.timeout_secs = Some(2);
    let (k, v) = mark.split_once('=').unwrap();
    spec.env.insert(k.into(), v.into());
    let job = client.submit(spec).await;
    client.running_worker(&job.job_id).await;
    // Both sleeps exist while it runs.
    wait_for("both sleeps running", DEADLINE, || async {
        (pids_with_env(&mark).len() >= 3).then_some(())
    })
    .await;
    let started = Instant::now();
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::TimedOut as i32);
    assert!(started.elapsed() < Duration::from_secs(30));
    wait_for(
        "no process of the job left",
        Duration::from_secs(15),
        || async { pids_with_env(&mark).is_empty().then_some(()) },
    )
    .await;
    let types: Vec<String> = client
        .events(&job.job_id)
        .await
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert!(types.contains(&"JobTimedOut".to_owned()), "{types:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_running_job() {
    let server = TestServer::start();
    let client = server.client().await;
    let mark = format!("E2E_MARK={}", uuid::Uuid::new_v4());
    let mut spec = sh("echo started; sleep 1001");
    let (k, v) = mark.split_once('=').unwrap();
    spec.env.insert(k.into(), v.into());
    let job = client.submit(spec).await;
    client.running_worker(&job.job_id).await;
    let out = server.cli(&["job", "cancel", &job.job_id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("CANCELLED"), "{}", stdout(&out));
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Cancelled as i32);
    wait_for(
        "the job's processes are gone",
        Duration::from_secs(15),
        || async { pids_with_env(&mark).is_empty().then_some(()) },
    )
    .await;
    let events = client.events(&job.job_id).await;
    let cancelled = events
        .iter()
        .find(|e| e.event_type == "JobCancelled")
        .unwrap();
    assert_eq!(cancelled.actor, "anonymous");
    assert_eq!(payload(cancelled)["from"], "RUNNING");
    // Cancelling again is a conflict.
    let out = server.cli(&["job", "cancel", &job.job_id]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_lines_arrive_complete_and_in_order() {
    let server = TestServer::start();
    let client = server.client().await;
    let job = client.submit(sh("seq 1 100000")).await;
    let mut follow = client
        .logs()
        .follow(proto::FollowLogsRequest {
            job_id: job.job_id.clone(),
            after: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n: u64 = 0;
    while let Some(chunk) = tokio::time::timeout(DEADLINE, follow.message())
        .await
        .expect("log stream stalled")
        .unwrap()
    {
        for line in chunk.lines {
            n += 1;
            assert_eq!(line.seq, n, "sequence without gaps");
            assert_eq!(line.text, n.to_string(), "line {n} out of order");
        }
    }
    assert_eq!(n, 100_000);
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32);
    // And the stored log is the same.
    let stored = client.logs_of(&job.job_id).await;
    assert_eq!(stored.len(), 100_000);
    assert!(
        stored
            .iter()
            .enumerate()
            .all(|(i, l)| l.text == (i + 1).to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_specs_are_rejected_with_the_field_named() {
    let server = TestServer::start();
    let client = server.client().await;
    let mut cases: Vec<(proto::JobSpec, &str)> = Vec::new();
    let mut s = sh("true");
    s.timeout_secs = Some(0);
    cases.push((s, "timeout_secs"));
    let mut s = sh("true");
    s.script = Some("echo".into());
    cases.push((s, "command"));
    cases.push((proto::JobSpec::default(), "command"));
    let mut s = sh("true");
    s.env.insert("1BAD".into(), "x".into());
    cases.push((s, "env.1BAD"));
    let mut s = sh("true");
    s.max_attempts = Some(101);
    cases.push((s, "max_attempts"));
    let mut s = sh("true");
    s.secrets = vec!["not a name".into()];
    cases.push((s, "secrets[0]"));
    let mut s = sh("true");
    s.resources = Some(proto::Resources {
        cpu: Some(-1.0),
        memory_mb: None,
    });
    cases.push((s, "resources.cpu"));
    for (spec, field) in cases {
        let err = client
            .jobs()
            .submit(proto::SubmitJobRequest { spec: Some(spec) })
            .await
            .expect_err("must be rejected");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(&format!("`{field}`")),
            "{field}: {}",
            err.message()
        );
        assert_eq!(
            err.metadata()
                .get("x-hodei-error-field")
                .unwrap()
                .to_str()
                .unwrap(),
            field
        );
    }
    // A provider that is not configured.
    let mut s = sh("true");
    s.provider = Some("docker".into());
    let err = client
        .jobs()
        .submit(proto::SubmitJobRequest { spec: Some(s) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("docker"), "{}", err.message());

    // The CLI: exit 4, one line naming the field, no backtrace.
    for (args, field) in [
        (
            &["job", "submit", "--timeout", "0", "--", "true"][..],
            "timeout_secs",
        ),
        (
            &["job", "run", "--max-attempts", "0", "--", "true"][..],
            "max_attempts",
        ),
        (
            &["job", "run", "--env", "BAD-NAME=1", "--", "true"][..],
            "env.BAD-NAME",
        ),
        (
            &["job", "submit", "--priority", "5000", "--", "true"][..],
            "priority",
        ),
    ] {
        let out = server.cli(args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(4), "{args:?}: {err}");
        assert!(err.contains(&format!("`{field}`")), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            !err.contains("panicked") && !err.contains("backtrace"),
            "{err}"
        );
    }
    // Nothing was created by any of them.
    let jobs = client
        .jobs()
        .list(proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty(), "{jobs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_resubmission_says_it_was_replayed() {
    let server = TestServer::start();
    let client = server.client().await;
    let mut spec = sh("true");
    spec.idempotency_key = Some("deploy-7".into());
    let submit = || {
        let mut jobs = client.jobs();
        let spec = spec.clone();
        async move {
            jobs.submit(proto::SubmitJobRequest { spec: Some(spec) })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = submit().await;
    assert!(!first.replayed);
    let second = submit().await;
    assert!(second.replayed);
    assert_eq!(
        second.job.unwrap().job_id,
        first.job.as_ref().unwrap().job_id
    );
    // The CLI shows it in JSON.
    let args = ["--output", "json", "job", "submit", "--idempotency-key"];
    let out = server.cli(&[&args[..], &["deploy-7", "--", "true"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["replayed"], true);
    assert_eq!(v["id"], first.job.unwrap().job_id);
    let out = server.cli(&[&args[..], &["deploy-8", "--", "true"]].concat());
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["replayed"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_exit_codes() {
    let server = TestServer::start();
    let client = server.client().await;
    let code = |args: &[&str]| {
        let out = server.cli(args);
        (out.status.code(), stderr(&out))
    };

    assert_eq!(code(&["job", "run", "--", "true"]).0, Some(0));
    assert_eq!(
        code(&["job", "run", "--", "sh", "-c", "exit 42"]).0,
        Some(42)
    );
    let (c, err) = code(&["job", "run", "--", "sh", "-c", "kill -9 $$"]);
    assert_eq!(c, Some(137), "{err}");
    let (c, err) = code(&["job", "run", "--timeout", "1s", "--", "sleep", "30"]);
    assert_eq!(c, Some(124), "{err}");
    assert!(err.contains("timed out"), "{err}");
    let (c, err) = code(&["job", "run", "--", "/nonexistent/program"]);
    assert_eq!(c, Some(125), "{err}");
    assert!(err.contains("failed"), "{err}");

    // Cancelled from elsewhere while `job run` waits: 130.
    let mut run = server
        .cli_cmd(&["job", "run", "--name", "to-cancel", "--", "sleep", "1002"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = wait_for("the job to run", DEADLINE, || async {
        let jobs = client
            .jobs()
            .list(proto::ListJobsRequest {
                state: JobState::Running as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .jobs;
        jobs.into_iter()
            .find(|j| j.spec.as_ref().is_some_and(|s| s.name == "to-cancel"))
            .map(|j| j.job_id)
    })
    .await;
    assert_eq!(code(&["job", "cancel", &id]).0, Some(0));
    let status = run.wait().unwrap();
    assert_eq!(status.code(), Some(130));

    // Errors of the CLI itself.
    assert_eq!(code(&["job", "get", "not-a-uuid"]).0, Some(4));
    let (c, err) = code(&["job", "get", &uuid::Uuid::new_v4().to_string()]);
    assert_eq!(c, Some(5), "{err}");
    assert_eq!(code(&["job", "cancel", &id]).0, Some(7));
    assert_eq!(code(&["job", "frobnicate"]).0, Some(2));
    assert_eq!(
        code(&["job", "run", "--env", "NOEQUALS", "--", "true"]).0,
        Some(2)
    );
    assert_eq!(code(&["secret", "delete", "NOPE"]).0, Some(5));

    // Unreachable server: exit 3, one clear line.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let out = std::process::Command::new(CLI_BIN)
        .args([
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "job",
            "list",
        ])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("hodei: cannot reach the hodei server"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_id_reaches_every_event_of_the_job() {
    let server = TestServer::start();
    let client = server.client().await;
    let corr = format!("e2e-corr-{}", uuid::Uuid::new_v4().simple());
    let out = server.cli(&[
        "--correlation-id",
        &corr,
        "--output",
        "json",
        "job",
        "run",
        "--max-attempts",
        "2",
        "--retry-on-failure",
        "--",
        "sh",
        "-c",
        "echo hi; exit 1",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    // --output json: JSON lines, the log lines then the final job.
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["log"]["text"], "hi");
    let job = &lines.last().unwrap()["job"];
    assert_eq!(job["correlation_id"], corr.as_str());
    let id = job["id"].as_str().unwrap().to_owned();

    let events = client.events(&id).await;
    assert!(events.len() >= 10, "{events:?}");
    let mut worker_events = 0;
    for e in &events {
        assert_eq!(e.correlation_id, corr, "{} by {}", e.event_type, e.actor);
        if e.actor.starts_with("worker:") {
            worker_events += 1;
        }
    }
    assert!(worker_events >= 2, "worker-caused events carry it too");
    // The audit filter finds them, and the server echoes the id.
    let resp = client
        .with_correlation("echo-me-1")
        .audit()
        .query(proto::AuditQueryRequest {
            correlation_id: Some(corr.clone()),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        resp.metadata()
            .get("x-correlation-id")
            .unwrap()
            .to_str()
            .unwrap(),
        "echo-me-1"
    );
    let audited = resp.into_inner();
    assert!(audited.events.iter().all(|e| e.correlation_id == corr));
    assert!(audited.total as usize >= events.len());
    // `job events` in JSON is the same list.
    let out = server.cli(&["--output", "json", "job", "events", &id]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let v = v["events"].as_array().unwrap();
    assert_eq!(v.len(), events.len());
    assert!(v.iter().all(|e| e["correlation_id"] == corr.as_str()));
    // The same document as GET /api/v1/jobs/{id}/events.
    assert_eq!(v[0]["event_type"], "JobCreated");
    assert!(v[0]["payload"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_tokens_authenticate_and_name_the_actor() {
    let server = TestServer::start_with(ServerOpts {
        tokens: vec![("ci-bot".into(), "s3cr3t-token-1".into())],
        ..Default::default()
    });
    // Without a token: UNAUTHENTICATED, exit 6.
    let anon = Client::connect(&server.url, None, None).await;
    let err = anon
        .jobs()
        .list(proto::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let out = std::process::Command::new(CLI_BIN)
        .args(["--server", &server.url, "job", "list"])
        .env_remove("HODEI_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    let out = std::process::Command::new(CLI_BIN)
        .args([
            "--server",
            &server.url,
            "--token",
            "wrong-token",
            "job",
            "list",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    // With it: the token's name is the actor.
    let out = server.cli(&["job", "run", "--", "true"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let client = server.client().await;
    let created = client.wait_event("JobCreated", |_| true).await;
    assert_eq!(created.actor, "ci-bot");
    // Health needs no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(anon.channel.clone());
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "hodei.v1.JobService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[test]
fn the_server_refuses_unsafe_or_unsupported_configurations() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(SERVER_BIN);
        c.args(["--http-addr", "off"])
            .args(args)
            .env("HODEI_WORKER_BIN", WORKER_BIN)
            .env_remove("HODEI_API_TOKENS")
            .env_remove("HODEI_DATABASE_URL")
            .env_remove("HODEI_PROVIDERS");
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (out.status.code(), stderr(&out))
    };
    let (code, err) = run(&["--grpc-addr", "0.0.0.0:0"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("without API tokens"), "{err}");
    let (code, err) = run(
        &["--grpc-addr", "127.0.0.1:0", "--provider", "kubernetes"],
        &[],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not supported in this build"), "{err}");
    let (code, err) = run(
        &["--grpc-addr", "127.0.0.1:0"],
        &[("HODEI_DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")],
    );
    // Never a silent fallback to the in-memory store: either no backend is
    // built in, or the database cannot be reached.
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("store"), "{err}");
    assert!(!err.contains("in-memory store. Jobs"), "{err}");
    let (code, err) = run(&["--grpc-addr", "127.0.0.1:0", "--provider", "mesos"], &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unknown provider kind"), "{err}");
    for (_, err) in [
        run(&["--grpc-addr", "0.0.0.0:0"], &[]),
        run(
            &["--grpc-addr", "127.0.0.1:0", "--provider", "kubernetes"],
            &[],
        ),
    ] {
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_in_job_run_cancels_the_job() {
    let server = TestServer::start();
    let client = server.client().await;
    let mut run = server
        .cli_cmd(&["job", "run", "--", "sh", "-c", "echo started; sleep 1003"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(run.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");
    signal(run.id() as i32, nix::sys::signal::Signal::SIGINT);
    let status = tokio::task::block_in_place(|| wait_exit(&mut run, "hodei job run", DEADLINE));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("cancelling job"), "{err}");
    let jobs = client
        .jobs()
        .list(proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(jobs[0].state, JobState::Cancelled as i32);
}
