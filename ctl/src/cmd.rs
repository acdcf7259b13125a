//! Command handlers, one file per command group.

mod alerts;
mod audit;
mod capacity;
mod context;
mod deploy;
mod diagnose;
mod exec;
mod metrics;
mod nodes;
mod pki;
mod rollout;
mod sim;
mod token;

use crate::cli::{Cli, Command};
use crate::context::{CtlConfig, Env};

/// Runs the parsed command.
pub async fn dispatch(cli: Cli, env: Env) -> anyhow::Result<()> {
    let config_path = cli.config.clone().unwrap_or(env.config_path);
    match cli.command {
        Command::Nodes(cmd) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            nodes::run(cmd, &conn).await
        }
        Command::Metrics(cmd) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            metrics::run(cmd, &conn).await
        }
        Command::Exec(args) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            exec::run(args, &conn).await
        }
        Command::Audit(cmd) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            audit::run(cmd, &conn).await
        }
        Command::Alerts(cmd) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            alerts::run(cmd, &conn).await
        }
        Command::Rules(crate::cli::RulesCmd::Check { file }) => alerts::check(&file),
        Command::Rules(cmd) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            alerts::rules(cmd, &conn).await
        }
        Command::Deploy(cmd) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            deploy::run(cmd, &conn).await
        }
        Command::Rollout(cmd) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            rollout::run(cmd, &conn).await
        }
        Command::Sim(cmd) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            sim::run(cmd, &conn).await
        }
        // Plan and fit work without a controller, so they resolve the connection themselves.
        Command::Capacity(cmd) => capacity::run(cmd, &cli.conn, &config_path).await,
        Command::Diagnose(args) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            diagnose::run(args, &conn).await
        }
        Command::Ca(cmd) => pki::ca(cmd),
        Command::Cert(cmd) => pki::cert(cmd),
        Command::Token(cmd) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            token::run(cmd, &conn).await
        }
        Command::Context(cmd) => context::run(cmd, &cli.conn, &config_path),
        Command::Demo(args) => crate::demo::run(args, &config_path).await,
    }
}
