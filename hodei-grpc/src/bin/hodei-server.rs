//! `hodei-server`: parses flags, binds the listeners and calls
//! [`hodei_grpc::server::run_with`], with the HTTP API of hodei-http and
//! the PostgreSQL stores of hodei-postgres plugged in. SIGTERM or SIGINT
//! stops it gracefully. See `docs/SERVER.md`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use hodei_core::runtime::Stores;
use hodei_grpc::config::ServerArgs;
use hodei_grpc::server::{self, Listeners, ServerOptions};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match serve(ServerArgs::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hodei-server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServerArgs) -> Result<(), Box<dyn std::error::Error>> {
    let tokens = std::env::var("HODEI_API_TOKENS").ok();
    let (addrs, config) = args.resolve(tokens.as_deref())?;
    let grpc = TcpListener::bind(addrs.grpc)
        .await
        .map_err(|e| format!("cannot listen on --grpc-addr {}: {e}", addrs.grpc))?;
    let http = match addrs.http {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on --http-addr {addr}: {e}"))?,
        ),
        None => None,
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    // One registry for HTTP and gRPC request metrics, served at /metrics.
    let metrics = hodei_http::metrics::Metrics::new();
    let http_config = hodei_http::HttpConfig {
        metrics: metrics.clone(),
        api_tokens: config
            .api_tokens
            .iter()
            .map(|t| (t.token.clone(), t.name.clone()))
            .collect(),
        max_body_bytes: hodei_http::body_limit_for_spec(config.runtime.limits.max_spec_bytes),
    };
    let options = ServerOptions {
        http: Some(Arc::new(move |listener, cp, stop| {
            let router = hodei_http::router(cp, http_config.clone());
            Box::pin(async move {
                hodei_http::serve(listener, router, async move { stop.cancelled().await }).await
            })
        })),
        postgres: Some(Arc::new(|url: String| {
            Box::pin(async move {
                let store = hodei_postgres::PgStore::connect(
                    &url,
                    hodei_postgres::PgStoreOptions::default(),
                )
                .await
                .map_err(|e| e.to_string())?;
                Ok(Stores::from_store(Arc::new(store)))
            })
        })),
        metrics: Some(metrics),
    };
    server::run_with(Listeners { grpc, http }, config, options, shutdown).await?;
    Ok(())
}
