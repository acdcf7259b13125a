//! The one `main` shape of the daemons: a config error is one line and exit 64;
//! then the runtime, logging (and span export), the shutdown signal, `run`,
//! the last spans flushed, and exit 1 on failure.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::logging::{self, LogFormat, TracingConfig};

/// Runs a daemon named `name` with a loaded `config`; `logging` says its log
/// format and span export.
#[allow(clippy::print_stderr)] // a binary's last word goes to stderr
pub fn main<C, E, F>(
    name: &str,
    config: Result<C, ConfigError>,
    logging: impl FnOnce(&C) -> (LogFormat, TracingConfig),
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
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let (format, export) = logging(&config);
    // The exporter's gRPC channel starts its connection task on this runtime.
    let spans = {
        let _runtime = runtime.enter();
        logging::init(format, "info", &export, name)
    };
    let spans = match spans {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{name}: config error: {e}");
            return ExitCode::from(64);
        }
    };
    let code = runtime.block_on(async {
        let shutdown = crate::shutdown::on_signal();
        match run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "{name} failed");
                eprintln!("{name}: {e}");
                ExitCode::from(1)
            }
        }
    });
    // After `run` (its spans have ended), while the runtime still drives the channel.
    spans.shutdown();
    code
}
