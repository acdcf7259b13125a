//! `flotctl`: parses arguments and the environment once, then runs the command.

use std::process::ExitCode;

use clap::{ArgMatches, CommandFactory, FromArgMatches};
use flotilla_ctl::cli::Cli;
use flotilla_ctl::context::Env;

/// The subcommands as typed, e.g. `nodes ls`: the name of the trace's root span.
fn command_path(matches: &ArgMatches) -> String {
    let mut path = Vec::new();
    let mut at = matches;
    while let Some((name, sub)) = at.subcommand() {
        path.push(name);
        at = sub;
    }
    path.join(" ")
}

fn main() -> ExitCode {
    let mut matches = Cli::command().get_matches();
    let command = command_path(&matches);
    let cli = Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.format(&mut Cli::command()).exit());
    flotilla_common::tls::install_crypto_provider();
    let env = Env {
        config_path: Env::default_config_path(
            std::env::var_os("XDG_CONFIG_HOME").map(Into::into),
            std::env::var_os("HOME").map(Into::into),
        ),
    };
    flotilla_ctl::main_with(cli, env, &command)
}
