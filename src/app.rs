//! Dispatches a parsed command line; shared by the `hostvol` and `kubectl-hostvol` binaries.

use std::process::ExitCode;

use crate::cli::args::{Cli, Command};

pub async fn run(cli: Cli) -> ExitCode {
    let result: Result<bool, String> = match cli.command {
        Command::Agent(args) => {
            crate::telemetry::init(args.log_format);
            crate::agent::run(args)
                .await
                .map(|()| true)
                .map_err(|e| e.to_string())
        }
        Command::Capacity(args) => {
            crate::telemetry::init_cli();
            crate::cli::report::capacity(&args).await
        }
        Command::Volumes(args) => {
            crate::telemetry::init_cli();
            crate::cli::report::volumes(&args).await
        }
        Command::Purge(args) => {
            crate::telemetry::init_cli();
            crate::cli::purge::run(&args).await
        }
        Command::Reuse(args) => {
            crate::telemetry::init_cli();
            crate::cli::reuse::run(&args).await
        }
        Command::Doctor(args) => {
            crate::telemetry::init_cli();
            crate::cli::report::doctor(&args).await
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        // Partial answers (an unreachable agent) were printed; the exit code says they are partial.
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("hostvol: {error}");
            ExitCode::from(1)
        }
    }
}
