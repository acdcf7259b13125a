//! `flotctl`, the operator CLI. Every command that reads or changes the fleet goes
//! through the public `flotilla.v1.Fleet` API ([`client`]); `ca`/`cert` work on
//! local files; `demo` (and only it) links the daemons to run them in-process.
// flotctl's job is to print results for people and scripts.
#![allow(clippy::print_stdout, clippy::print_stderr)]

pub mod approval;
pub mod cli;
pub mod client;
pub mod cmd;
pub mod context;
pub mod demo;
pub mod output;

use std::process::ExitCode;

use flotilla_common::logging::{self, LogFormat, TracingConfig};
use tracing::Instrument;

/// A mistake in how flotctl was called or configured: exit status 64.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Runs flotctl with parsed arguments; returns the process exit status.
/// `command` names what was run (`exec`, `nodes ls`) for the trace's root span.
pub fn main_with(args: cli::Cli, env: context::Env, command: &str) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flotctl: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let default_filter = if matches!(args.command, cli::Command::Demo(_)) { "info" } else { "warn" };
    let export = TracingConfig {
        otlp_endpoint: args.otlp_endpoint.clone(),
        otlp_ca: args.otlp_ca.clone(),
        ..TracingConfig::default()
    };
    // The exporter's gRPC channel starts its connection task on this runtime.
    let spans = {
        let _runtime = runtime.enter();
        logging::init(LogFormat::Text, default_filter, &export, "flotctl")
    };
    let spans = match spans {
        Ok(spans) => spans,
        Err(e) => {
            eprintln!(
                "flotctl: {}",
                e.to_string()
                    .replace("tracing.otlp_endpoint", "--otlp-endpoint")
                    .replace("tracing.otlp_ca", "--otlp-ca")
            );
            return ExitCode::from(64);
        }
    };
    // The root of this invocation's trace: every Fleet call carries its context (see `client`).
    let root = tracing::info_span!("flotctl", otel.name = format!("flotctl {command}"), otel.kind = "client");
    let result = runtime.block_on(cmd::dispatch(args, env).instrument(root));
    // Before the runtime ends: the root span has closed, so its batch goes now.
    spans.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flotctl: {}", render(&error));
            if error.downcast_ref::<UsageError>().is_some()
                || error.downcast_ref::<flotilla_common::config::ConfigError>().is_some()
            {
                ExitCode::from(64)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// One line: the error and its causes.
fn render(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let s = cause.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
    }
    text
}
