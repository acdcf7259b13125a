//! `flotctl context ls|use|set`.

use std::path::Path;

use serde::Serialize;

use crate::UsageError;
use crate::cli::{ConnArgs, ContextCmd};
use crate::context::{Context, CtlConfig};
use crate::output;

#[derive(Debug, Serialize)]
struct Row {
    name: String,
    current: bool,
    controller: String,
}

pub fn run(cmd: ContextCmd, conn: &ConnArgs, path: &Path) -> anyhow::Result<()> {
    let mut config = CtlConfig::load(path)?;
    match cmd {
        ContextCmd::Ls { output } => {
            let rows: Vec<Row> = config
                .contexts
                .iter()
                .map(|(name, c)| Row {
                    name: name.clone(),
                    current: config.current.as_ref() == Some(name),
                    controller: c.controller.clone(),
                })
                .collect();
            output::print(output, &rows, |rows| {
                if rows.is_empty() {
                    return format!(
                        "No contexts in {}. `flotctl context set NAME --controller … --cacert … --cert … --key …` adds one.",
                        path.display()
                    );
                }
                let mut t = output::table(&["CURRENT", "NAME", "CONTROLLER"]);
                for r in rows {
                    t.add_row(vec![if r.current { "*" } else { "" }.to_owned(), r.name.clone(), r.controller.clone()]);
                }
                t.to_string()
            })
        }
        ContextCmd::Use { name } => {
            if !config.contexts.contains_key(&name) {
                return Err(UsageError(format!(
                    "no context {name:?} in {}; `flotctl context ls` lists them",
                    path.display()
                ))
                .into());
            }
            config.current = Some(name.clone());
            config.save(path)?;
            println!("Switched to context {name}.");
            Ok(())
        }
        ContextCmd::Set { name, activate } => {
            let missing = |flag: &str| UsageError(format!("context set needs --{flag}"));
            let ctx = Context {
                controller: conn.controller.clone().ok_or_else(|| missing("controller"))?,
                ca: absolute(conn.cacert.clone().ok_or_else(|| missing("cacert"))?)?,
                cert: absolute(conn.cert.clone().ok_or_else(|| missing("cert"))?)?,
                key: absolute(conn.key.clone().ok_or_else(|| missing("key"))?)?,
            };
            config.contexts.insert(name.clone(), ctx);
            if activate || config.current.is_none() {
                config.current = Some(name.clone());
            }
            config.save(path)?;
            println!("Context {name} saved in {}.", path.display());
            Ok(())
        }
    }
}

fn absolute(p: std::path::PathBuf) -> anyhow::Result<std::path::PathBuf> {
    Ok(if p.is_absolute() { p } else { std::env::current_dir()?.join(p) })
}
