use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    hostvol::app::run(hostvol::cli::args::Cli::parse()).await
}
