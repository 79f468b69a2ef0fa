//! The same program as `hostvol`, under the name kubectl looks for: `kubectl hostvol capacity`.
use clap::{CommandFactory, FromArgMatches};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let matches = hostvol::cli::args::Cli::command()
        .bin_name("kubectl hostvol")
        .get_matches();
    let cli = hostvol::cli::args::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    hostvol::app::run(cli).await
}
