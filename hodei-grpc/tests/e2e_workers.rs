//! End to end over real processes, worker side: a SIGKILLed worker, a
//! dropped session, a SIGTERM drain, one-time tokens, secrets, reflection
//! and the server's own graceful stop.

mod e2e_support;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e_support::*;
use hodei_grpc::proto;
use nix::sys::signal::Signal;
use proto::JobState;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_replaced_and_the_job_retried_before_its_deadline() {
    let server = TestServer::start();
    let client = server.client().await;
    let marker = server.path("first-attempt-ran");
    let gate = server.path("gate");
    // The first attempt marks itself and blocks; the second succeeds.
    let script = format!(
        "if [ -e '{m}' ]; then echo second; exit 0; fi; touch '{m}'; echo first; {wait}",
        m = marker.display(),
        wait = wait_file(&gate)
    );
    let mut spec = sh(&script);
    spec.max_attempts = Some(2);
    spec.timeout_secs = Some(120);
    let job = client.submit(spec).await;
    let first_worker = client.running_worker(&job.job_id).await;
    wait_for("the first attempt's output", DEADLINE, || async {
        let logs = client.logs_of(&job.job_id).await;
        logs.iter().any(|l| l.text == "first").then_some(())
    })
    .await;
    let pid = server
        .agent_pid(&first_worker)
        .expect("pid file of the first worker");
    let killed_at = Instant::now();
    signal(pid, Signal::SIGKILL);

    let done = client.wait_terminal(&job.job_id).await;
    // The orphaned first attempt (its agent died) may now end.
    touch(&gate);
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert_eq!(done.attempt, 2);
    assert!(
        killed_at.elapsed() < Duration::from_secs(60),
        "retried well before the deadline"
    );
    let first = &done.attempts[0];
    assert_eq!(first.outcome, "failed");
    assert_eq!(first.failure.as_ref().unwrap().kind, "worker_lost");
    assert_eq!(first.worker_id.as_deref(), Some(first_worker.as_str()));
    let second_worker = done.attempts[1].worker_id.clone().unwrap();
    assert_ne!(second_worker, first_worker, "a new worker ran the retry");
    let events = client.events(&job.job_id).await;
    let retry = events
        .iter()
        .find(|e| e.event_type == "JobRetryScheduled")
        .expect("JobRetryScheduled");
    assert_eq!(payload(retry)["failure"]["kind"], "worker_lost");
    let logs = client.logs_of(&job.job_id).await;
    let texts: Vec<(u32, &str)> = logs.iter().map(|l| (l.attempt, l.text.as_str())).collect();
    assert_eq!(texts, [(1, "first"), (2, "second")]);
}

/// A TCP proxy whose connections can all be cut at once, and which can
/// swallow what clients send (read and dropped, as a connection that dies
/// takes what it had not delivered).
struct Proxy {
    addr: String,
    cut: Arc<Notify>,
    swallow: Arc<std::sync::atomic::AtomicBool>,
    swallowed: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cut = Arc::new(Notify::new());
        let swallow = Arc::new(AtomicBool::new(false));
        let swallowed = Arc::new(AtomicU64::new(0));
        let (c, sw, swd) = (cut.clone(), swallow.clone(), swallowed.clone());
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                let upstream = upstream.clone();
                let (cut, swallow, swallowed) = (c.clone(), sw.clone(), swd.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut in_r, mut in_w) = inbound.into_split();
                    let (mut out_r, mut out_w) = outbound.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        // Once it dropped bytes, a connection forwards
                        // nothing more (what follows would be cut frames).
                        let mut lost = false;
                        loop {
                            let n = match in_r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            lost |= swallow.load(Ordering::SeqCst);
                            if lost {
                                swallowed.fetch_add(n as u64, Ordering::SeqCst);
                            } else if out_w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = tokio::io::copy(&mut out_r, &mut in_w);
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = cut.notified() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            cut,
            swallow,
            swallowed,
        }
    }

    /// Drops every proxied connection now.
    fn cut_all(&self) {
        self.cut.notify_waiters();
    }

    /// Starts or stops dropping what clients send.
    fn swallow(&self, on: bool) {
        self.swallow.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Bytes dropped so far.
    fn swallowed(&self) -> u64 {
        self.swallowed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A server whose workers reach it through a [`Proxy`].
async fn proxied_server() -> (Proxy, TestServer) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let upstream = format!("127.0.0.1:{port}");
    let proxy = Proxy::start(upstream.clone()).await;
    let server = TestServer::start_with(ServerOpts {
        grpc_addr: Some(upstream),
        advertise_url: Some(format!("http://{}", proxy.addr)),
        ..Default::default()
    });
    (proxy, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_reconnects_after_its_stream_drops_and_finishes_the_job() {
    // Workers reach the server through a proxy; the test cuts the proxy's
    // connections while a job runs.
    let (proxy, server) = proxied_server().await;
    let client = server.client().await;
    let gate = server.path("gate");
    let job = client
        .submit(sh(&format!(
            "echo before; {}; echo after",
            wait_file(&gate)
        )))
        .await;
    let worker = client.running_worker(&job.job_id).await;
    wait_for("output before the cut", DEADLINE, || async {
        let logs = client.logs_of(&job.job_id).await;
        (!logs.is_empty()).then_some(())
    })
    .await;
    proxy.cut_all();
    client
        .wait_event("WorkerDisconnected", |e| e.aggregate_id == worker)
        .await;
    let reconnected = client
        .wait_event("WorkerReconnected", |e| e.aggregate_id == worker)
        .await;
    let running = payload(&reconnected)["running"].clone();
    assert_eq!(running, serde_json::json!([job.job_id]), "it kept its job");
    touch(&gate);
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert_eq!(done.attempt, 1, "no retry was needed");
    let texts = client.log_texts(&job.job_id).await;
    assert_eq!(texts, ["before", "after"]);
}

/// Connections lose what the agent sends and are then cut, three times,
/// while a job prints lines until told to stop: every line is stored
/// exactly once, in order (the agent sends again what a dead connection
/// took, the server ignores what it has).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_connections_lose_no_log_line_and_duplicate_none() {
    let (proxy, server) = proxied_server().await;
    let client = server.client().await;
    // 2,000 lines every 50 ms or so until the test says stop, so the job
    // is printing at every cut however slowly the machine runs the test.
    const CHUNK: u64 = 2_000;
    let stop = server.path("stop");
    let mut spec = sh(&format!(
        "i=0; while [ ! -e '{stop}' ] && [ -d '{dir}' ]; do \
         seq $((i*{CHUNK}+1)) $((i*{CHUNK}+{CHUNK})); i=$((i+1)); sleep 0.05; done; echo chunks $i",
        stop = stop.display(),
        dir = stop.parent().expect("test dir").display(),
    ));
    spec.timeout_secs = Some(300);
    let job = client.submit(spec).await;
    client.running_worker(&job.job_id).await;
    // Stored lines so far (paged from where the last look ended).
    let stored = std::sync::atomic::AtomicU64::new(0);
    let count = || async {
        loop {
            let after = stored.load(std::sync::atomic::Ordering::Relaxed);
            let page = client
                .logs()
                .page(proto::PageLogsRequest {
                    job_id: job.job_id.clone(),
                    after,
                    limit: 10_000,
                })
                .await
                .expect("logs")
                .into_inner();
            match page.lines.last() {
                Some(l) => stored.store(l.seq, std::sync::atomic::Ordering::Relaxed),
                None => return after,
            }
        }
    };
    let mut cuts = Vec::new();
    for _ in 0..3 {
        // Lines flow (again: the agent is connected), then the cut.
        let at_start = count().await;
        wait_for("log lines to flow", DEADLINE, || async {
            (count().await >= at_start + 3_000).then_some(())
        })
        .await;
        // The link starts losing what the agent sends; once some of it is
        // gone, the connection dies.
        let before = proxy.swallowed();
        proxy.swallow(true);
        wait_for("sent lines to be lost on the way", DEADLINE, || async {
            (proxy.swallowed() >= before + 16 * 1024).then_some(())
        })
        .await;
        let at_cut = count().await;
        proxy.cut_all();
        proxy.swallow(false);
        cuts.push(at_cut);
    }
    // Lines flow once more after the last cut, then the job stops.
    let at_start = count().await;
    wait_for("log lines to flow after the last cut", DEADLINE, || async {
        (count().await >= at_start + 3_000).then_some(())
    })
    .await;
    touch(&stop);
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert_eq!(done.attempt, 1, "no retry: {done:?}");
    let mut texts = client.log_texts(&job.job_id).await;
    // The job printed 1..=n in chunks of CHUNK, then "chunks <n / CHUNK>".
    let last = texts.pop().unwrap_or_default();
    let chunks: u64 = last
        .strip_prefix("chunks ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("last line {last:?} is not the job's closing line"));
    let printed = chunks * CHUNK;
    let missing: Vec<u64> = (1..=printed)
        .filter(|n| texts.get(*n as usize - 1) != Some(&n.to_string()))
        .take(10)
        .collect();
    assert!(
        texts.len() as u64 == printed && missing.is_empty(),
        "{} lines stored for {printed} printed (cuts at {cuts:?}); first lines out of place: \
         {missing:?}",
        texts.len()
    );
    assert!(
        cuts.last().is_some_and(|c| *c < printed),
        "the job was still printing at the last cut: {cuts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_worker_which_finishes_its_job_and_exits_cleanly() {
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
    let pid = server.agent_pid(&worker).expect("agent pid");
    signal(pid, Signal::SIGTERM);
    let draining = client
        .wait_event("WorkerDraining", |e| e.aggregate_id == worker)
        .await;
    assert_eq!(draining.actor, format!("worker:{worker}"));
    // Draining does not stop the running job.
    assert!(alive(pid));
    assert_eq!(
        client.job(&job.job_id).await.state,
        JobState::Running as i32
    );
    touch(&gate);
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32);
    wait_for("the agent to exit", DEADLINE, || async {
        (!alive(pid)).then_some(())
    })
    .await;
    let needle = "agent exited with code 0";
    wait_for("the provider to see a clean exit", DEADLINE, || async {
        server
            .log()
            .lines()
            .any(|l| l.contains(&worker) && l.contains(needle))
            .then_some(())
    })
    .await;
    let texts = client.log_texts(&job.job_id).await;
    assert_eq!(texts, ["working", "finished"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_token_works_once() {
    let server = TestServer::start();
    let client = server.client().await;
    let out = server.cli(&["--output", "json", "worker", "token", "--ttl", "5m"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let worker = v["worker_id"].as_str().unwrap().to_owned();
    let token = v["token"].as_str().unwrap().to_owned();
    let agent = |log: &str| {
        Command::new(WORKER_BIN)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HODEI_SERVER_URL", &server.url)
            .env("HODEI_WORKER_ID", &worker)
            .env("HODEI_WORKER_TOKEN", &token)
            .env("HODEI_PROVIDER", "manual")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(server.path(log)).unwrap())
            .spawn()
            .unwrap()
    };
    let mut first = agent("agent-1.log");
    client
        .wait_event("WorkerRegistered", |e| e.aggregate_id == worker)
        .await;
    // The same token again: refused, recorded, and the agent gives up.
    let mut second = agent("agent-2.log");
    let rejected = client
        .wait_event("WorkerRegistrationRejected", |e| e.aggregate_id == worker)
        .await;
    assert!(
        payload(&rejected)["reason"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{rejected:?}"
    );
    let status =
        tokio::task::block_in_place(|| wait_exit(&mut second, "the second agent", DEADLINE));
    assert_eq!(status.code(), Some(2), "rejected registration exits 2");
    // The first one is still registered and usable: it runs a job.
    let mut spec = sh("echo on-manual");
    spec.provider = None;
    let job = client.submit(spec).await;
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32);
    signal(first.id() as i32, Signal::SIGTERM);
    let status = tokio::task::block_in_place(|| wait_exit(&mut first, "the first agent", DEADLINE));
    assert_eq!(status.code(), Some(0));
    let out = server.cli(&["worker", "list"]);
    assert!(stdout(&out).contains(&worker), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_never_appears_in_logs_events_audit_or_the_agent_environment() {
    let server = TestServer::start();
    let client = server.client().await;
    let value = format!("s3cr3t-{}", uuid::Uuid::new_v4().simple());
    let mut set = server
        .cli_cmd(&["secret", "set", "DEPLOY_KEY"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = set.stdin.take().unwrap();
        writeln!(stdin, "{value}").unwrap();
    }
    let out = set.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = server.cli(&["secret", "list"]);
    assert!(stdout(&out).contains("DEPLOY_KEY"));
    assert!(!stdout(&out).contains(&value));

    let gate = server.path("gate");
    let mut spec = sh(&format!(
        "echo \"key=$DEPLOY_KEY\"; echo \"$DEPLOY_KEY\" >&2; {}",
        wait_file(&gate)
    ));
    spec.secrets = vec!["DEPLOY_KEY".into()];
    let job = client.submit(spec).await;
    let worker = client.running_worker(&job.job_id).await;
    let pid = server.agent_pid(&worker).expect("agent pid");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains(&value),
        "the agent's own environment holds the secret"
    );
    wait_for("both lines", DEADLINE, || async {
        (client.logs_of(&job.job_id).await.len() >= 2).then_some(())
    })
    .await;
    touch(&gate);
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32);

    let logs = client.logs_of(&job.job_id).await;
    let texts: Vec<&str> = logs.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["key=***", "***"], "the value is masked");
    let events = client.all_events().await;
    let dump = format!("{events:?}");
    assert!(!dump.contains(&value), "an event holds the secret");
    assert!(
        events
            .iter()
            .any(|e| e.event_type == "SecretAccessed" && payload(e)["name"] == "DEPLOY_KEY"),
        "access is audited by name"
    );
    for args in [
        &["--output", "json", "audit", "--limit", "1000"][..],
        &["--output", "json", "job", "events", &job.job_id][..],
        &["job", "logs", &job.job_id][..],
        &["--output", "json", "job", "get", &job.job_id][..],
    ] {
        let out = server.cli(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert!(!stdout(&out).contains(&value), "{args:?} shows the secret");
    }
    assert!(
        !server.log().contains(&value),
        "the server log holds the secret"
    );
    let agent_log = std::fs::read_to_string(server.state_dir().join(format!("{worker}.log")))
        .unwrap_or_default();
    assert!(
        !agent_log.contains(&value),
        "the agent log holds the secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_and_sigterm_stops_the_server() {
    let mut server = TestServer::start();
    let client = server.client().await;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(client.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = reflection
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let names: Vec<String> = match msg.message_response {
        Some(MessageResponse::ListServicesResponse(l)) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection reply {other:?}"),
    };
    for s in [
        "hodei.v1.JobService",
        "hodei.v1.LogService",
        "hodei.v1.WorkerService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == s), "{s} missing from {names:?}");
    }

    // A follower of a running job sees the stream end with UNAVAILABLE,
    // and the server exits 0 on SIGTERM.
    let gate = server.path("gate");
    let job = client.submit(sh(&wait_file(&gate))).await;
    client.running_worker(&job.job_id).await;
    let mut follow = client
        .logs()
        .follow(proto::FollowLogsRequest {
            job_id: job.job_id.clone(),
            after: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let status = tokio::task::block_in_place(|| server.stop()).expect("server was running");
    touch(&gate);
    assert!(status.success(), "server exit status {status:?}");
    let end = loop {
        match follow.message().await {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    match end {
        Err(s) => assert!(
            matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            ),
            "{s:?}"
        ),
        Ok(None) => {}
        Ok(Some(_)) => unreachable!(),
    }
}

/// A provider's `env` table reaches the agents it starts: here `TZ`, one of
/// the few variables an agent hands on to its jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_s_env_reaches_its_agents() {
    let state = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start_with(ServerOpts {
        extra_toml: format!(
            "\n[[providers]]\nkind = \"local\"\nname = \"with-env\"\nstate_dir = \"{}\"\n\
             env = {{ TZ = \"Etc/Hodei\", HODEI_LOG_BATCH_SIZE = \"7\" }}\n",
            state.path().display()
        ),
        ..Default::default()
    });
    let client = server.client().await;
    let mut spec = sh("echo \"tz=$TZ\"");
    spec.provider = Some("with-env".into());
    let job = client.submit(spec).await;
    let done = client.wait_terminal(&job.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    let logs = client.log_texts(&job.job_id).await;
    assert_eq!(logs, ["tz=Etc/Hodei"]);
}

/// A local worker orphaned by a server that died (SIGKILL) and that does
/// not come back (stopped, so it cannot reconnect) is removed by the next
/// server with the same server id and state dir: its process is killed
/// and the log says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_removes_the_local_workers_orphaned_by_its_crash() {
    let dir = tempfile::Builder::new()
        .prefix("hodei-orphans-")
        .tempdir()
        .unwrap();
    let mark = format!("HODEI_ORPHAN_MARK={}", uuid::Uuid::new_v4().simple());
    let (mark_name, mark_value) = mark.split_once('=').unwrap();
    let config = dir.path().join("hodei.toml");
    std::fs::write(
        &config,
        format!(
            "server_id = \"orphans-{id}\"\n\
             drain_grace = \"2s\"\n\n\
             [[providers]]\n\
             kind = \"local\"\n\
             name = \"local\"\n\
             max_workers = 2\n\
             warm_pool = 1\n\
             ephemeral = false\n\
             state_dir = \"{state}\"\n\
             env = {{ {mark_name} = \"{mark_value}\" }}\n\n\
             [engine]\n\
             reconnect_grace = \"1s\"\n\n\
             [runtime]\n\
             heartbeat_interval = \"1s\"\n\
             reconcile_interval = \"1s\"\n",
            id = uuid::Uuid::new_v4().simple(),
            state = dir.path().join("local").display(),
        ),
    )
    .unwrap();

    let (mut first, _, _) =
        spawn_server(&config, &dir.path().join("first.log"), "127.0.0.1:0", false);
    let agent = wait_for("the warm worker's agent", DEADLINE, || async {
        pids_with_env(&mark).first().copied()
    })
    .await;
    // The server dies; its agent is stopped so it cannot reconnect.
    signal(first.id() as i32, Signal::SIGKILL);
    let _ = first.wait();
    signal(agent, Signal::SIGSTOP);
    assert!(alive(agent), "the orphan outlives its server");

    let log = dir.path().join("second.log");
    let (mut second, _, _) = spawn_server(&config, &log, "127.0.0.1:0", false);
    wait_for("the orphan to be removed", DEADLINE, || async {
        (!alive(agent)).then_some(())
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("removing orphaned worker"),
        "the restarted server says it removed the orphan; log:\n{text}"
    );
    signal(second.id() as i32, Signal::SIGTERM);
    wait_exit(&mut second, "the second server", DEADLINE);
    for pid in pids_with_env(&mark) {
        signal(pid, Signal::SIGKILL);
    }
}

/// A reusable local worker with `worker_capacity = 3` runs three jobs at
/// once (each its own process, its own log, its own working directory,
/// emptied when it ends) and then more on the same worker: the pool stays
/// at one worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_capacity_three_runs_three_jobs_at_once() {
    let state = tempfile::tempdir().expect("temp dir");
    let server = TestServer::start_with(ServerOpts {
        extra_toml: format!(
            "\n[[providers]]\nkind = \"local\"\nname = \"wide\"\nstate_dir = \"{}\"\n\
             ephemeral = false\nmax_workers = 1\nwarm_pool = 1\nworker_capacity = 3\n",
            state.path().display()
        ),
        ..Default::default()
    });
    let client = server.client().await;
    let gate = server.path("gate");
    let mut ids = Vec::new();
    for i in 0..3 {
        // Each writes the same relative file while the others run: in a
        // directory of its own, each reads back what it wrote.
        let mut spec = sh(&format!(
            "echo start-{i}; echo {i} > mine; echo dir=$(pwd); {}; echo end-$(cat mine)",
            wait_file(&gate)
        ));
        spec.provider = Some("wide".into());
        ids.push(client.submit(spec).await.job_id);
    }
    // All three run at the same time, on one worker, before the gate opens.
    let mut workers = Vec::new();
    for id in &ids {
        workers.push(client.running_worker(id).await);
    }
    assert!(
        workers.iter().all(|w| *w == workers[0]),
        "one worker runs all three: {workers:?}"
    );
    for (i, id) in ids.iter().enumerate() {
        let job = client.job(id).await;
        assert_eq!(job.state, JobState::Running as i32, "job {i}: {job:?}");
    }
    touch(&gate);
    let mut dirs = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let done = client.wait_terminal(id).await;
        assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
        let logs = client.log_texts(id).await;
        assert_eq!(logs.len(), 3, "{logs:?}");
        assert_eq!(
            [&logs[0], &logs[2]],
            [&format!("start-{i}"), &format!("end-{i}")]
        );
        let dir = std::path::PathBuf::from(logs[1].strip_prefix("dir=").expect("dir= line"));
        let left = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "{} is emptied when the job ends", dir.display());
        dirs.push(dir);
    }
    assert!(
        dirs[0] != dirs[1] && dirs[1] != dirs[2] && dirs[0] != dirs[2],
        "each job had a directory of its own: {dirs:?}"
    );
    // A fourth job reuses the same worker.
    let mut spec = sh("echo again");
    spec.provider = Some("wide".into());
    let again = client.submit(spec).await;
    let done = client.wait_terminal(&again.job_id).await;
    assert_eq!(done.state, JobState::Succeeded as i32, "{done:?}");
    assert_eq!(
        done.attempts[0].worker_id.as_deref(),
        Some(workers[0].as_str())
    );
    let listed = client
        .workers()
        .list(proto::ListWorkersRequest::default())
        .await
        .expect("workers")
        .into_inner()
        .workers;
    let wide: Vec<_> = listed.iter().filter(|w| w.provider == "wide").collect();
    assert_eq!(wide.len(), 1, "{listed:?}");
    assert_eq!(wide[0].capacity, 3, "{:?}", wide[0]);
}
