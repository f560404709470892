//! `hodei-server`: parses flags (and the config file they name), binds the
//! listeners and calls [`hodei_grpc::server::run`], which composes
//! everything else (HTTP API, PostgreSQL stores, metrics). SIGTERM or
//! SIGINT stops it gracefully. See `docs/SERVER.md`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use hodei_grpc::config::ServerArgs;
use hodei_grpc::server::{self, Listeners};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// mimalloc: the server allocates and frees many small buffers per job
/// (messages, JSON, rows); it gave 5–17 % more durable throughput than the
/// system allocator in `benches/durable_throughput.rs` (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let listeners = Listeners::bind(&addrs).await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    server::run(listeners, config, shutdown).await?;
    Ok(())
}
