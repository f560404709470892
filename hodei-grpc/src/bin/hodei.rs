//! `hodei`: the command-line client. See `docs/CLI.md`.

use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    ExitCode::from(hodei_grpc::cli::main().await)
}
