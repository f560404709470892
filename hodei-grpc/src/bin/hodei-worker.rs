//! `hodei-worker`: the worker agent. Parses flags and `HODEI_*` variables,
//! then runs [`hodei_grpc::agent`]. SIGTERM or SIGINT drains (a second one
//! cancels running jobs at once). Exit code: 0 clean, 1 forced drain or
//! failure, 2 rejected registration or bad configuration.

use std::process::ExitCode;

use clap::Parser;
use hodei_grpc::agent::{self, WorkerArgs};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let code = match run(WorkerArgs::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hodei-worker: {e}");
            e.exit_code()
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

async fn run(args: WorkerArgs) -> Result<i32, agent::AgentError> {
    let config = args.into_config()?;
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            return Err(agent::AgentError::Crashed(format!(
                "cannot install signal handlers: {e}"
            )));
        }
    };
    let mut handle = agent::spawn(config);
    let mut signals = 0;
    loop {
        tokio::select! {
            exit = handle.wait() => return exit.map(agent::AgentExit::exit_code),
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        signals += 1;
        if signals == 1 {
            tracing::info!("signal received: draining (send another to cancel running jobs now)");
            handle.drain();
        } else {
            tracing::warn!("second signal: cancelling running jobs");
            handle.kill();
        }
    }
}
