//! The one `main` shape of the daemons: a config error is one line and exit 64;
//! then logging, the runtime, the shutdown signal, `run`, and exit 1 on failure.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::logging::{self, LogFormat};

/// Runs a daemon named `name` with a loaded `config`.
#[allow(clippy::print_stderr)] // a binary's last word goes to stderr
pub fn main<C, E, F>(
    name: &str,
    config: Result<C, ConfigError>,
    log_format: impl FnOnce(&C) -> LogFormat,
    run: impl FnOnce(C, CancellationToken) -> F,
) -> ExitCode
where
    E: Display,
    F: Future<Output = Result<(), E>>,
{
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: config error: {e}");
            return ExitCode::from(64);
        }
    };
    logging::init(log_format(&config), "info");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        let shutdown = crate::shutdown::on_signal();
        match run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "{name} failed");
                eprintln!("{name}: {e}");
                ExitCode::from(1)
            }
        }
    })
}
