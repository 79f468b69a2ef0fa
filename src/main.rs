use clap::Parser;

fn main() -> std::process::ExitCode {
    // Before the runtime starts its threads: the allocator's arenas are set per process.
    hostvol::node::memory::configure();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(hostvol::app::run(hostvol::cli::args::Cli::parse()))
}
