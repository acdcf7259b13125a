//! `flotctl token create|ls`: join tokens for agent enrollment (admin).

use std::collections::BTreeMap;

use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use serde::Serialize;

use crate::cli::TokenCmd;
use crate::client::{call, connect};
use crate::context::Connection;
use crate::output;

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
        TokenCmd::Ls { output } => {
            let resp = call("list join tokens", client.list_join_tokens(pb::ListJoinTokensRequest {}).await)?;
            let rows: Vec<TokenView> = resp.tokens.into_iter().map(TokenView::from).collect();
            let now = now_unix_ms();
            output::print(output, &rows, |rows| {
                let mut t = output::table(&["ID", "STATE", "USES LEFT", "EXPIRES", "CREATED BY", "LABELS", "ENROLLED"]);
                for r in rows {
                    let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    t.add_row(vec![
                        r.id.clone(),
                        r.state.clone(),
                        format!("{}/{}", r.uses_left, r.uses),
                        output::ago(r.expires_unix_ms, now),
                        r.created_by.clone(),
                        labels.join(","),
                        r.enrolled.join(","),
                    ]);
                }
                t.to_string()
            })
        }
    }
}
