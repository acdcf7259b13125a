//! `flotctl token create|ls`: join tokens for agent enrollment (admin).

use std::collections::BTreeMap;

use comfy_table::Cell;
use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use serde::Serialize;

use crate::cli::TokenCmd;
use crate::client::{call, connect};
use crate::context::Connection;
use crate::output::{self, Columns, state_cell};

/// A join token as flotctl shows it: never the secret.
#[derive(Debug, Serialize)]
struct TokenView {
    id: String,
    /// active, expired or spent.
    state: String,
    created_by: String,
    created_unix_ms: i64,
    expires_unix_ms: i64,
    uses: u32,
    uses_left: u32,
    labels: BTreeMap<String, String>,
    enrolled: Vec<String>,
}

impl From<pb::JoinTokenInfo> for TokenView {
    fn from(t: pb::JoinTokenInfo) -> Self {
        Self {
            id: t.id,
            state: t.state,
            created_by: t.created_by,
            created_unix_ms: t.created_unix_ms,
            expires_unix_ms: t.expires_unix_ms,
            uses: t.uses,
            uses_left: t.uses_left,
            labels: t.labels.into_iter().collect(),
            enrolled: t.enrolled,
        }
    }
}

/// The answer of `token create`: the token itself, this once.
#[derive(Debug, Serialize)]
struct Created {
    token: String,
    #[serde(flatten)]
    info: TokenView,
}

pub async fn run(cmd: TokenCmd, conn: &Connection) -> anyhow::Result<()> {
    let mut client = connect(conn).await?;
    match cmd {
        TokenCmd::Create { ttl, labels, uses, output } => {
            let request = pb::CreateJoinTokenRequest {
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                uses,
                labels: labels.into_iter().collect(),
            };
            let resp = call("create join token", client.create_join_token(request).await)?;
            let info = TokenView::from(resp.info.unwrap_or_default());
            let created = Created { token: resp.token, info };
            let now = now_unix_ms();
            output::print(output, &created, |c| {
                format!(
                    "{}\n\nJoin token {} ({} use{}, expires {}). It is shown only now: the controller keeps its hash.\n\
                     On the new node: FLOTILLA_JOIN_TOKEN=<token> flotilla-agent --node-id ID \
                     --enroll-url https://CONTROLLER:ENROLL_PORT ...",
                    c.token,
                    c.info.id,
                    c.info.uses,
                    if c.info.uses == 1 { "" } else { "s" },
                    output::ago(c.info.expires_unix_ms, now),
                )
            })
        }
        TokenCmd::Revoke { id, reason, output } => {
            let request = pb::RevokeJoinTokenRequest { id: id.clone(), reason };
            let resp = call(&format!("revoke join token {id}"), client.revoke_join_token(request).await)?;
            let view = TokenView::from(resp.token.unwrap_or_default());
            output::print(output, &view, |t| {
                format!(
                    "join token {} revoked: nobody can enroll with it any more ({} of {} uses were left; enrolled: {})",
                    t.id,
                    t.uses_left,
                    t.uses,
                    if t.enrolled.is_empty() { "none".to_owned() } else { t.enrolled.join(", ") }
                )
            })
        }
        TokenCmd::Ls { output, watch } => {
            let fetch = || {
                let mut client = client.clone();
                async move {
                    let resp = client.list_join_tokens(pb::ListJoinTokensRequest {}).await?.into_inner();
                    Ok(resp.tokens.into_iter().map(TokenView::from).collect::<Vec<_>>())
                }
            };
            output::list("list join tokens", output, watch, fetch, |rows, columns| {
                ls_table(rows, columns, now_unix_ms())
            })
            .await
        }
    }
}

/// `token ls`; `-o wide` adds when each token was made and how many uses it had.
fn ls_table(rows: &[TokenView], columns: Columns, now: i64) -> String {
    if rows.is_empty() {
        return "no join tokens (flotctl token create)".to_owned();
    }
    let mut header = vec!["ID", "STATE", "USES LEFT", "EXPIRES", "CREATED BY", "LABELS", "ENROLLED"];
    if columns == Columns::Wide {
        header.extend(["CREATED", "EXPIRES AT"]);
    }
    let mut t = output::table(&header);
    for r in rows {
        let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut row = vec![
            Cell::new(&r.id),
            state_cell(&r.state),
            Cell::new(format!("{}/{}", r.uses_left, r.uses)),
            Cell::new(output::ago(r.expires_unix_ms, now)),
            Cell::new(&r.created_by),
            Cell::new(labels.join(",")),
            Cell::new(r.enrolled.join(",")),
        ];
        if columns == Columns::Wide {
            row.extend([Cell::new(output::ago(r.created_unix_ms, now)), Cell::new(output::rfc3339(r.expires_unix_ms))]);
        }
        t.add_row(row);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wide_adds_when_a_token_was_made_and_expires() {
        let row = TokenView::from(pb::JoinTokenInfo {
            id: "tok1".into(),
            state: "active".into(),
            created_by: "operator root (admin)".into(),
            created_unix_ms: 1_000,
            expires_unix_ms: 1_700_000_000_000,
            uses: 2,
            uses_left: 1,
            enrolled: vec!["gpu-a".into()],
            ..Default::default()
        });
        let rows = [row];
        let plain = ls_table(&rows, Columns::Normal, 61_000);
        assert!(plain.contains("1/2") && plain.contains("gpu-a") && !plain.contains("EXPIRES AT"), "{plain}");
        let wide = ls_table(&rows, Columns::Wide, 61_000);
        assert!(wide.contains("1m ago") && wide.contains("2023-11-14T22:13:20Z"), "{wide}");
        assert!(ls_table(&[], Columns::Normal, 0).contains("flotctl token create"));
    }
}
