//! Hodei's quick start: an embedded control plane (in-memory store,
//! in-process local workers) in one process, running real jobs end to end.
//!
//! `cargo run --example quickstart`
//!
//! It runs three jobs: one succeeds, one fails and is retried (then
//! succeeds), and a long one is cancelled. It prints their live logs, final
//! states and each job's event trail, and exits 0.

use std::time::Duration;

use futures::StreamExt;
use hodei::core::ids::{Actor, CorrelationId, JobId};
use hodei::core::job::JobState;
use hodei::core::ports::RequestContext;
use hodei::core::runtime::ControlPlane;
use hodei::core::spec::RawJobSpec;
use hodei::grpc::config::{ProviderKind, ProviderSettings, ServerConfig};
use hodei::grpc::server::{Listeners, start};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // 1. An embedded control plane: in-memory store, workers that are
    //    in-process agents talking gRPC to it over loopback.
    let mut config = ServerConfig {
        providers: vec![ProviderSettings::new(ProviderKind::Inprocess)],
        ..ServerConfig::default()
    };
    config.runtime.engine.retry.base = Duration::from_millis(500);
    let listeners = Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        http: None,
    };
    let server = start(listeners, config).await?;
    let cp = server.control_plane().clone();
    println!(
        "== hodei control plane up on grpc://{} (in-memory store)\n",
        server.grpc_addr()
    );

    // 2. Three jobs.
    let marker = std::env::temp_dir().join(format!("hodei-quickstart-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let ok = submit(&cp, "hello", script("echo \"hello from $(hostname 2>/dev/null || echo hodei)\"\nfor i in 1 2 3; do echo \"step $i\"; done\necho 'a warning' >&2\n"), |_| {}).await?;
    let flaky = submit(
        &cp,
        "flaky",
        script(&format!(
            "if [ -e {m} ]; then echo 'second attempt: ok'; else touch {m}; echo 'first attempt: failing' >&2; exit 3; fi\n",
            m = marker.display()
        )),
        |s| {
            s.max_attempts = Some(3);
            s.retry_on_failure = Some(true);
        },
    )
    .await?;
    let long = submit(
        &cp,
        "long",
        script("echo 'working for a long time...'\nsleep 300\necho never\n"),
        |_| {},
    )
    .await?;

    // 3. Live logs of all three, as they arrive.
    let mut followers = Vec::new();
    for (id, name) in [(ok, "hello"), (flaky, "flaky"), (long, "long")] {
        let cp = cp.clone();
        followers.push(tokio::spawn(async move {
            let mut lines = cp.follow_logs(id, 0);
            let mut first = true;
            while let Some(Ok(line)) = lines.next().await {
                println!("[{name} #{} {:?}] {}", line.attempt, line.stream, line.text);
                if name == "long" && first {
                    first = false;
                    let ctx = ctx("quickstart-cancel");
                    match cp.cancel(id, &ctx).await {
                        Ok(job) => println!("[long] cancel requested -> {}", job.state()),
                        Err(e) => println!("[long] cancel failed: {e}"),
                    }
                }
            }
        }));
    }

    // 4. Wait for the three to end (their log streams end with them), then
    //    print final states and event trails.
    let mut finished = Vec::new();
    for (id, want) in [
        (ok, JobState::Succeeded),
        (flaky, JobState::Succeeded),
        (long, JobState::Cancelled),
    ] {
        let job = tokio::time::timeout(Duration::from_secs(60), cp.wait_terminal(id)).await??;
        finished.push((job, want));
    }
    for f in followers {
        let _ = f.await;
    }
    let mut all_ok = true;
    for (job, want) in finished {
        println!(
            "\n== job {} ({}) -> {} after {} attempt(s)",
            job.id,
            job.spec.name(),
            job.state(),
            job.attempts.len().max(1)
        );
        for e in cp.job_events(job.id).await? {
            println!(
                "   #{:<4} {:<28} actor={:<48} correlation={}",
                e.sequence,
                e.event_type(),
                e.actor,
                e.correlation_id
            );
        }
        all_ok &= job.state() == want;
    }
    let _ = std::fs::remove_file(&marker);
    server.stop().await?;
    anyhow::ensure!(all_ok, "a job did not end as expected");
    println!("\nall three jobs ended as expected.");
    Ok(())
}

fn ctx(correlation: &str) -> RequestContext {
    RequestContext {
        correlation_id: CorrelationId::new(correlation),
        actor: Actor::new("quickstart"),
    }
}

fn script(text: &str) -> RawJobSpec {
    RawJobSpec {
        script: Some(format!("#!/bin/sh\n{text}")),
        ..Default::default()
    }
}

async fn submit(
    cp: &ControlPlane,
    name: &str,
    mut spec: RawJobSpec,
    tweak: impl FnOnce(&mut RawJobSpec),
) -> anyhow::Result<JobId> {
    spec.name = Some(name.into());
    spec.timeout_secs = Some(120);
    tweak(&mut spec);
    let job = cp.submit(spec, &ctx(&format!("quickstart-{name}"))).await?;
    println!("submitted {name}: {} ({})", job.id, job.state());
    Ok(job.id)
}
