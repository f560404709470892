//! HTTP API throughput and latency on loopback.
//!
//! A server (in-memory store, a provider with no workers, so that jobs stay
//! queued and only the API path is measured) and a load generator of 32
//! concurrent tasks share this process and its cores. It prints:
//! - submit throughput: `POST /api/v1/jobs`, jobs/s;
//! - `GET /api/v1/jobs/{id}` latency, p50/p99, and its throughput.
//!
//! `cargo bench -p hodei-http --bench http` runs the full measurement;
//! under `cargo test` (no `--bench` argument) it runs a short smoke pass.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hodei_http::HttpConfig;
use serde_json::{Value, json};

const CONCURRENCY: usize = 32;

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (submits, gets) = if full { (20_000, 40_000) } else { (200, 400) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    rt.block_on(run(submits, gets));
}

async fn run(submits: usize, gets: usize) {
    let cp = support::control_plane_with(0).await;
    let server = support::Server::start_with(cp.clone(), HttpConfig::default()).await;
    let base = Arc::new(server.base.clone());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .expect("a client");

    // Warm-up: connections, allocator, first-use paths.
    let (c0, b0) = (client.clone(), base.clone());
    let warm = spread(submits / 10 + 1, move |_| {
        let (c, b) = (c0.clone(), b0.clone());
        async move { submit(&c, &b).await }
    })
    .await;
    drop(warm);

    let start = Instant::now();
    let (c0, b0) = (client.clone(), base.clone());
    let ids = spread(submits, move |_| {
        let (c, b) = (c0.clone(), b0.clone());
        async move { submit(&c, &b).await }
    })
    .await;
    let submit_secs = start.elapsed().as_secs_f64();
    let ids: Arc<Vec<String>> = Arc::new(ids.into_iter().map(|(id, _)| id).collect());

    let start = Instant::now();
    let (c0, b0) = (client.clone(), base.clone());
    let mut latencies: Vec<Duration> = spread(gets, move |i| {
        let (c, b, ids) = (c0.clone(), b0.clone(), ids.clone());
        async move {
            let id = &ids[i % ids.len()];
            let t = Instant::now();
            let r = c
                .get(format!("{b}/api/v1/jobs/{id}"))
                .send()
                .await
                .expect("GET");
            assert!(r.status().is_success(), "GET job: {}", r.status());
            let _: Value = r.json().await.expect("a job");
            t.elapsed()
        }
    })
    .await;
    let get_secs = start.elapsed().as_secs_f64();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];

    println!(
        "HTTP API on loopback, concurrency {CONCURRENCY}, in-memory store, server and client in one process"
    );
    println!(
        "  POST /api/v1/jobs       {submits} jobs in {submit_secs:.2} s: {:.0} jobs/s",
        submits as f64 / submit_secs
    );
    println!(
        "  GET  /api/v1/jobs/{{id}}  {gets} requests in {get_secs:.2} s: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms",
        gets as f64 / get_secs,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
    );
    drop(server);
    cp.shutdown().await;
}

async fn submit(c: &reqwest::Client, base: &str) -> (String, Duration) {
    let t = Instant::now();
    let r = c
        .post(format!("{base}/api/v1/jobs"))
        .json(&json!({"command": ["true"], "labels": {"bench": "http"}}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    let job: Value = r.json().await.expect("a job");
    (job["id"].as_str().expect("an id").to_owned(), t.elapsed())
}

/// Runs `n` operations on `CONCURRENCY` tasks; returns their results.
async fn spread<T, F, Fut>(n: usize, op: F) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let op = Arc::new(op);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (op, next) = (op.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return out;
                }
                out.push(op(i).await);
            }
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.expect("a load task"));
    }
    all
}
