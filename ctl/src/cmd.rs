//! Command handlers, one file per command group.

mod admin;
mod alerts;
mod audit;
mod capacity;
mod completion;
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
mod top;

use crate::cli::{Cli, Command};
use crate::context::{CtlConfig, Env};

/// Runs the parsed command.
pub async fn dispatch(cli: Cli, env: Env) -> anyhow::Result<()> {
    let config_path = cli.config.clone().unwrap_or(env.config_path);
    crate::output::init_color(cli.color);
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
        Command::Top(args) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            top::run(args, &conn).await
        }
        Command::Approve(args) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            admin::approve(args, &conn).await
        }
        Command::Approvals(cmd) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            admin::approvals(cmd, &conn).await
        }
        Command::Backup(cmd) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            admin::backup(cmd, &conn).await
        }
        // The client's version needs no controller (nor a usable context).
        Command::Version(args) if args.client => admin::version(args, None).await,
        Command::Version(args) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            admin::version(args, Some(&conn)).await
        }
        Command::Ca(cmd) => pki::ca(cmd),
        Command::Cert(cmd) => pki::cert(cmd),
        Command::Token(cmd) => {
            let conn = CtlConfig::load(&config_path)?.resolve(&cli.conn, &config_path)?;
            token::run(cmd, &conn).await
        }
        Command::Context(cmd) => context::run(cmd, &cli.conn, &config_path),
        Command::Demo(args) => crate::demo::run(args, &config_path).await,
        // Generated from the grammar alone: no config, no controller.
        Command::Completion(args) => completion::completion(&args),
        Command::Man(args) => completion::man(&args),
    }
}
