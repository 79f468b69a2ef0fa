//! Logging setup: `RUST_LOG` filter (default info for the agent, warn for commands), plain or JSON on stderr.

use std::io::IsTerminal;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::cli::args::LogFormat;

pub fn init(format: LogFormat) {
    init_with_default(format, "info");
}

/// Commands for people log only warnings unless `RUST_LOG` asks for more, so their tables stay clean.
pub fn init_cli() {
    init_with_default(LogFormat::Plain, "warn");
}

fn init_with_default(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Plain => registry
            // Colour codes only for a person at a terminal, never in `kubectl logs` or files.
            .with(
                fmt::layer()
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
