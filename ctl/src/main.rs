//! `flotctl`: parses arguments and the environment once, then runs the command.

use std::process::ExitCode;

use clap::Parser;
use flotilla_ctl::cli::Cli;
use flotilla_ctl::context::Env;

fn main() -> ExitCode {
    let cli = Cli::parse();
    flotilla_common::tls::install_crypto_provider();
    let default_filter = if matches!(cli.command, flotilla_ctl::cli::Command::Demo(_)) { "info" } else { "warn" };
    flotilla_common::logging::init(flotilla_common::logging::LogFormat::Text, default_filter);
    let env = Env {
        config_path: Env::default_config_path(
            std::env::var_os("XDG_CONFIG_HOME").map(Into::into),
            std::env::var_os("HOME").map(Into::into),
        ),
    };
    flotilla_ctl::main_with(cli, env)
}
