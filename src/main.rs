use clap::Parser;
use hostvol::cli::{Cli, Command};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Agent(args) => {
            hostvol::telemetry::init(args.log_format);
            hostvol::agent::run(args).await.map_err(Into::into)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hostvol: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
