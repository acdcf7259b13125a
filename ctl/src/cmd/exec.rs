//! `flotctl exec`: signed commands through `Fleet.ExecCommand`, on one node or
//! fanned out by label selector in a sliding window (like Salt's `-b`).

use std::collections::{BTreeMap, HashMap};

use anyhow::Context as _;
use flotilla_proto::pb;
use serde_json::{Value, json};
use tokio::task::JoinSet;

use crate::UsageError;
use crate::cli::{ExecArgs, Format};
use crate::client::{call, connect};
use crate::context::Connection;
use crate::output;

/// What flotctl prints for one node.
fn result_json(resp: &pb::ExecCommandResponse) -> Value {
    let status = match pb::CommandStatus::try_from(resp.status) {
        Ok(pb::CommandStatus::Succeeded) => "succeeded",
        Ok(pb::CommandStatus::Refused) => "refused",
        _ => "failed",
    };
    // The command's own output first, then who/what/how at top level, so that
    // e.g. `prestart-check -o json` has `ok` and `checks` at the top.
    let mut v =
        serde_json::from_str::<Value>(&resp.output_json).ok().filter(Value::is_object).unwrap_or_else(|| json!({}));
    v["node"] = json!(resp.node_id);
    v["command_id"] = json!(resp.command_id);
    v["status"] = json!(status);
    v["detail"] = json!(resp.detail);
    v
}

fn parse_args(raw: &[String]) -> Result<HashMap<String, String>, UsageError> {
    raw.iter()
        .map(|a| {
            a.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| UsageError(format!("--arg {a:?}: use KEY=VALUE")))
        })
        .collect()
}

fn parse_selector(s: &str) -> Result<BTreeMap<String, String>, UsageError> {
    s.split(',')
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| UsageError(format!("--selector {s:?}: use KEY=VALUE[,KEY=VALUE...]")))
        })
        .collect()
}

pub async fn run(args: ExecArgs, conn: &Connection) -> anyhow::Result<()> {
    let cmd_args = parse_args(&args.args)?;
    let spec_yaml = match &args.file {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
        None => String::new(),
    };
    // Refuse a bad command here, before anything is signed or sent.
    let (node, command) = match (args.words.as_slice(), &args.selector) {
        ([node, command], None) => (Some(node.clone()), command.clone()),
        ([command], Some(_)) => (None, command.clone()),
        ([_, _], Some(_)) => return Err(UsageError("with --selector, name only the COMMAND".into()).into()),
        _ => {
            return Err(
                UsageError("usage: flotctl exec NODE COMMAND, or flotctl exec --selector K=V COMMAND".into()).into()
            );
        }
    };
    flotilla_common::command::Command::parse(&command, &cmd_args, &spec_yaml).map_err(UsageError)?;
    let mut client = connect(conn).await?;
    let targets: Vec<String> = match (&node, &args.selector) {
        (Some(node), _) => vec![node.clone()],
        (None, Some(selector)) => {
            let want = parse_selector(selector)?;
            let nodes = call("list nodes", client.list_nodes(pb::ListNodesRequest {}).await)?.nodes;
            let matching: Vec<String> = nodes
                .into_iter()
                .filter(|n| {
                    let labels = n.inventory.as_ref().map(|i| &i.labels);
                    want.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
                })
                .map(|n| n.id)
                .collect();
            if matching.is_empty() {
                return Err(UsageError(format!("no node matches --selector {selector}")).into());
            }
            matching
        }
        (None, None) => return Err(UsageError("name a NODE or pass --selector".into()).into()),
    };

    let single = node.is_some();
    let mut queue = targets.into_iter();
    let mut running = JoinSet::new();
    let mut results: Vec<Value> = Vec::new();
    let mut stop_launching = false;
    loop {
        while !stop_launching && running.len() < args.batch as usize {
            let Some(node) = queue.next() else { break };
            let mut client = client.clone();
            let command = command.clone();
            let req = pb::ExecCommandRequest {
                node_id: node.clone(),
                command: command.clone(),
                args: cmd_args.clone(),
                spec_yaml: spec_yaml.clone(),
            };
            running.spawn(async move {
                // Over the controller's rate limit, the call waits its turn; a
                // two-person-rule hold waits here for the second admin.
                let answer = crate::client::with_pushback(|| {
                    let (mut client, req) = (client.clone(), req.clone());
                    async move { client.exec_command(req).await }
                })
                .await;
                match crate::approval::call_held(&format!("{command} on {node}"), &mut client, answer).await {
                    Ok(resp) => result_json(&resp),
                    Err(error) => json!({ "node": node, "status": "error", "detail": format!("{error:#}") }),
                }
            });
        }
        let Some(joined) = running.join_next().await else { break };
        let v = joined.context("a command task failed")?;
        if v["status"] != "succeeded" && !args.continue_on_error {
            stop_launching = true;
        }
        results.push(v);
    }
    let not_run: Vec<String> = queue.collect();
    let failed = results.iter().filter(|v| v["status"] != "succeeded").count();
    if single && let Some(v) = results.first() {
        print_one(args.output, v)?;
    } else {
        print_many(args.output, &results, &not_run)?;
    }
    if failed > 0 {
        return Err(anyhow::anyhow!(
            "{failed} of {} node(s) did not succeed{}",
            results.len(),
            if not_run.is_empty() { String::new() } else { format!("; {} not started", not_run.len()) }
        ));
    }
    Ok(())
}

fn print_one(format: Format, v: &Value) -> anyhow::Result<()> {
    output::print(format, v, |v| {
        let mut out = format!(
            "{}: {} — {}\n",
            v["node"].as_str().unwrap_or_default(),
            v["status"].as_str().unwrap_or_default(),
            v["detail"].as_str().unwrap_or_default()
        );
        if let Some(checks) = v["checks"].as_array() {
            let mut t = output::table(&["CHECK", "OK", "DETAIL"]);
            for c in checks {
                t.add_row(vec![
                    c["name"].as_str().unwrap_or_default().to_owned(),
                    if c["ok"] == true { "yes" } else { "NO" }.to_owned(),
                    c["detail"].as_str().unwrap_or_default().to_owned(),
                ]);
            }
            out.push_str(&t.to_string());
        }
        if let Some(lines) = v["lines"].as_array() {
            for l in lines {
                out.push_str(l.as_str().unwrap_or_default());
                out.push('\n');
            }
        }
        out.trim_end().to_owned()
    })
}

fn print_many(format: Format, results: &[Value], not_run: &[String]) -> anyhow::Result<()> {
    let value = json!({ "results": results, "not_started": not_run });
    output::print(format, &value, |_| {
        let mut t = output::table(&["NODE", "STATUS", "DETAIL"]);
        for v in results {
            t.add_row(vec![
                v["node"].as_str().unwrap_or_default().to_owned(),
                v["status"].as_str().unwrap_or_default().to_owned(),
                v["detail"].as_str().unwrap_or_default().to_owned(),
            ]);
        }
        let ok = results.iter().filter(|v| v["status"] == "succeeded").count();
        format!("{t}\n{ok} succeeded, {} did not, {} not started", results.len() - ok, not_run.len())
    })
}
