//! `flotctl audit ls|verify`.

use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use serde::Serialize;

use crate::cli::AuditCmd;
use crate::client::{call, connect};
use crate::context::Connection;
use crate::output;

#[derive(Debug, Serialize)]
struct Row {
    seq: u64,
    at_unix_ms: i64,
    actor: String,
    action: String,
    target: String,
    detail: serde_json::Value,
    hash: String,
}

pub async fn run(cmd: AuditCmd, conn: &Connection) -> anyhow::Result<()> {
    let mut client = connect(conn).await?;
    match cmd {
        AuditCmd::Ls { since, limit, output } => {
            let since_unix_ms = since.map_or(0, |d| now_unix_ms() - d.as_millis() as i64);
            let resp = call("list audit", client.list_audit(pb::ListAuditRequest { since_unix_ms, limit }).await)?;
            let rows: Vec<Row> = resp
                .records
                .into_iter()
                .map(|r| Row {
                    seq: r.seq,
                    at_unix_ms: r.at_unix_ms,
                    actor: r.actor,
                    action: r.action,
                    target: r.target,
                    detail: serde_json::from_str(&r.detail_json).unwrap_or(serde_json::Value::String(r.detail_json)),
                    hash: r.hash,
                })
                .collect();
            let now = now_unix_ms();
            output::print(output, &rows, |rows| {
                let mut t = output::table(&["SEQ", "WHEN", "ACTOR", "ACTION", "TARGET", "DETAIL"]);
                for r in rows {
                    t.add_row(vec![
                        r.seq.to_string(),
                        output::ago(r.at_unix_ms, now),
                        r.actor.clone(),
                        r.action.clone(),
                        r.target.clone(),
                        r.detail.to_string(),
                    ]);
                }
                t.to_string()
            })
        }
        AuditCmd::Verify => {
            let resp = call("verify audit", client.verify_audit(pb::VerifyAuditRequest {}).await)?;
            if resp.intact {
                println!("audit log intact: {} records", resp.records);
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "audit log broken at record {} of {}: {}",
                    resp.first_broken_seq,
                    resp.records,
                    resp.detail
                ))
            }
        }
    }
}
