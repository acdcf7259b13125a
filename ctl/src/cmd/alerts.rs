//! `flotctl alerts ls|ack|silence|unsilence|silences` and `flotctl rules check|ls|reload`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use comfy_table::Cell;
use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use serde::Serialize;

use crate::cli::{AlertStateArg, AlertsCmd, RulesCmd};
use crate::client::{call, connect};
use crate::context::Connection;
use crate::output::{self, Columns, state_cell};

/// One alert as `-o json` prints it.
#[derive(Debug, Serialize)]
struct AlertRow {
    id: String,
    name: String,
    /// pending | firing | resolved
    state: &'static str,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    value: f64,
    /// When it entered its current state (Unix ms).
    since: i64,
    active_since: i64,
    firing_since: Option<i64>,
    resolved_at: Option<i64>,
    acked: bool,
    acked_by: Option<String>,
    ack_comment: Option<String>,
    silenced_by: Vec<String>,
    inhibited: bool,
    rule: String,
}

fn state_name(s: i32) -> &'static str {
    match pb::AlertState::try_from(s) {
        Ok(pb::AlertState::Pending) => "pending",
        Ok(pb::AlertState::Firing) => "firing",
        Ok(pb::AlertState::Resolved) => "resolved",
        _ => "unknown",
    }
}

fn nonzero(v: i64) -> Option<i64> {
    (v != 0).then_some(v)
}

impl AlertRow {
    fn from_wire(a: pb::Alert) -> Self {
        let state = state_name(a.state);
        let since = match state {
            "firing" => a.firing_since_unix_ms,
            "resolved" => a.resolved_unix_ms,
            _ => a.active_since_unix_ms,
        };
        Self {
            id: a.id,
            name: a.name,
            state,
            labels: a.labels.into_iter().collect(),
            annotations: a.annotations.into_iter().collect(),
            value: a.value,
            since,
            active_since: a.active_since_unix_ms,
            firing_since: nonzero(a.firing_since_unix_ms),
            resolved_at: nonzero(a.resolved_unix_ms),
            acked: a.ack.is_some(),
            acked_by: a.ack.as_ref().map(|k| k.by.clone()),
            ack_comment: a.ack.map(|k| k.comment),
            silenced_by: a.silenced_by,
            inhibited: a.inhibited,
            rule: a.rule,
        }
    }
}

/// One alert event as `-o json` prints it; `from`/`to` are `inactive` for no alert.
#[derive(Debug, Serialize)]
struct EventRow {
    at: i64,
    alert_id: String,
    name: String,
    from: &'static str,
    to: &'static str,
    labels: BTreeMap<String, String>,
    value: f64,
    by: String,
}

impl EventRow {
    fn from_wire(e: pb::AlertEvent) -> Self {
        let state = |s: i32| match state_name(s) {
            "unknown" => "inactive",
            other => other,
        };
        Self {
            at: e.at_unix_ms,
            alert_id: e.alert_id,
            name: e.name,
            from: state(e.from),
            to: state(e.to),
            labels: e.labels.into_iter().collect(),
            value: e.value,
            by: e.by,
        }
    }
}

#[derive(Debug, Serialize)]
struct SilenceRow {
    id: String,
    matchers: Vec<String>,
    starts_at: i64,
    ends_at: i64,
    active: bool,
    created_by: String,
    comment: String,
}

impl SilenceRow {
    fn from_wire(s: pb::Silence) -> Self {
        Self {
            id: s.id,
            matchers: s.matchers,
            starts_at: s.starts_unix_ms,
            ends_at: s.ends_unix_ms,
            active: s.active,
            created_by: s.created_by,
            comment: s.comment,
        }
    }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .filter(|(k, _)| k.as_str() != "alertname")
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// `alerts ls`; `-o wide` adds every label, the annotations, the rule and the silences.
fn ls_table(rows: &[AlertRow], columns: Columns, now: i64) -> String {
    if rows.is_empty() {
        return "no alerts".to_owned();
    }
    let mut header = vec!["ID", "ALERT", "STATE", "SINCE", "SEVERITY", "LABELS", "VALUE", "NOTES"];
    if columns == Columns::Wide {
        header.extend(["ANNOTATIONS", "RULE", "ACTIVE SINCE", "SILENCED BY"]);
    }
    let mut t = output::table(&header);
    for r in rows {
        let mut notes = Vec::new();
        if let Some(by) = &r.acked_by {
            notes.push(format!("acked by {by}"));
        }
        if !r.silenced_by.is_empty() {
            notes.push("silenced".to_owned());
        }
        if r.inhibited {
            notes.push("inhibited (node down)".to_owned());
        }
        let severity = r.labels.get("severity").map_or("", String::as_str);
        let mut row = vec![
            Cell::new(&r.id),
            Cell::new(&r.name),
            state_cell(r.state),
            Cell::new(output::ago(r.since, now)),
            state_cell(severity),
            Cell::new(labels_text(&r.labels)),
            Cell::new(output::number(Some(r.value))),
            Cell::new(notes.join("; ")),
        ];
        if columns == Columns::Wide {
            let annotations: Vec<String> = r.annotations.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
            row.extend([
                Cell::new(dash(annotations.join("; "))),
                Cell::new(dash(r.rule.clone())),
                Cell::new(output::ago(r.active_since, now)),
                Cell::new(dash(r.silenced_by.join(","))),
            ]);
        }
        t.add_row(row);
    }
    t.to_string()
}

pub async fn run(cmd: AlertsCmd, conn: &Connection) -> anyhow::Result<()> {
    let mut client = connect(conn).await?;
    match cmd {
        AlertsCmd::Ls { state, output, watch } => {
            let state = match state {
                None => pb::AlertState::Unspecified,
                Some(AlertStateArg::Pending) => pb::AlertState::Pending,
                Some(AlertStateArg::Firing) => pb::AlertState::Firing,
                Some(AlertStateArg::Resolved) => pb::AlertState::Resolved,
            };
            let fetch = || {
                let mut client = client.clone();
                async move {
                    let resp = client.list_alerts(pb::ListAlertsRequest { state: state.into() }).await?.into_inner();
                    Ok(resp.alerts.into_iter().map(AlertRow::from_wire).collect::<Vec<_>>())
                }
            };
            output::list("list alerts", output, watch, fetch, |rows, columns| ls_table(rows, columns, now_unix_ms()))
                .await
        }
        AlertsCmd::Ack { id, comment } => {
            let resp = call("acknowledge alert", client.ack_alert(pb::AckAlertRequest { id, comment }).await)?;
            if let Some(a) = resp.alert {
                println!("acknowledged {} {} ({})", a.id, a.name, state_name(a.state));
            }
            Ok(())
        }
        AlertsCmd::Silence { matchers, duration, comment } => {
            if comment.trim().is_empty() {
                anyhow::bail!("--comment must say why the alerts are silenced");
            }
            let duration_ms = i64::try_from(duration.as_millis()).context("--for is too long")?;
            let resp = call(
                "create silence",
                client.create_silence(pb::CreateSilenceRequest { matchers, duration_ms, comment }).await,
            )?;
            if let Some(s) = resp.silence {
                println!(
                    "silence {} ends {} ({}); it matches {} alert(s) now",
                    s.id,
                    output::ago(s.ends_unix_ms, now_unix_ms()),
                    s.matchers.join(", "),
                    resp.alert_ids.len()
                );
            }
            Ok(())
        }
        AlertsCmd::Unsilence { id } => {
            let resp = call("expire silence", client.expire_silence(pb::ExpireSilenceRequest { id }).await)?;
            if let Some(s) = resp.silence {
                println!("silence {} ended", s.id);
            }
            Ok(())
        }
        AlertsCmd::History { id, limit, output } => {
            let resp = call(
                "list alert history",
                client
                    .list_alert_history(pb::ListAlertHistoryRequest { limit, alert_id: id.unwrap_or_default() })
                    .await,
            )?;
            let rows: Vec<EventRow> = resp.events.into_iter().map(EventRow::from_wire).collect();
            let now = now_unix_ms();
            output::print(output, &rows, |rows| {
                if rows.is_empty() {
                    return "no alert history".to_owned();
                }
                let mut t = output::table(&["WHEN", "ID", "ALERT", "FROM", "TO", "LABELS", "VALUE", "BY"]);
                for r in rows {
                    t.add_row(vec![
                        output::ago(r.at, now),
                        r.alert_id.clone(),
                        r.name.clone(),
                        r.from.to_owned(),
                        r.to.to_owned(),
                        labels_text(&r.labels),
                        output::number(Some(r.value)),
                        r.by.clone(),
                    ]);
                }
                t.to_string()
            })
        }
        AlertsCmd::Silences { all, output } => {
            let resp =
                call("list silences", client.list_silences(pb::ListSilencesRequest { include_expired: all }).await)?;
            let rows: Vec<SilenceRow> = resp.silences.into_iter().map(SilenceRow::from_wire).collect();
            let now = now_unix_ms();
            output::print(output, &rows, |rows| {
                if rows.is_empty() {
                    return "no silences".to_owned();
                }
                let mut t = output::table(&["ID", "MATCHERS", "ENDS", "ACTIVE", "BY", "COMMENT"]);
                for r in rows {
                    t.add_row(vec![
                        r.id.clone(),
                        r.matchers.join(", "),
                        output::ago(r.ends_at, now),
                        r.active.to_string(),
                        r.created_by.clone(),
                        r.comment.clone(),
                    ]);
                }
                t.to_string()
            })
        }
    }
}

/// `flotctl rules check FILE`: local, no controller.
pub fn check(file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    match flotilla_controller::alert::engine::check(&file.display().to_string(), &text) {
        Ok(set) => {
            println!("{}: {} groups, {} rules: OK", file.display(), set.groups.len(), set.rules().count());
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

#[derive(Debug, Serialize)]
struct RuleRow {
    group: String,
    name: String,
    expr: String,
    for_ms: i64,
    labels: BTreeMap<String, String>,
    health: &'static str,
    last_error: Option<String>,
    last_evaluation: Option<i64>,
    pending: u32,
    firing: u32,
}

pub async fn rules(cmd: RulesCmd, conn: &Connection) -> anyhow::Result<()> {
    let mut client = connect(conn).await?;
    match cmd {
        RulesCmd::Check { file } => check(&file),
        RulesCmd::Ls { output } => {
            let resp = call("list rules", client.list_rules(pb::ListRulesRequest {}).await)?;
            let rows: Vec<RuleRow> = resp
                .rules
                .into_iter()
                .map(|r| RuleRow {
                    health: match (r.last_evaluation_unix_ms, r.last_error.is_empty()) {
                        (0, _) => "unknown",
                        (_, true) => "ok",
                        (_, false) => "error",
                    },
                    group: r.group,
                    name: r.name,
                    expr: r.expr,
                    for_ms: r.for_ms,
                    labels: r.labels.into_iter().collect(),
                    last_error: (!r.last_error.is_empty()).then_some(r.last_error),
                    last_evaluation: nonzero(r.last_evaluation_unix_ms),
                    pending: r.pending,
                    firing: r.firing,
                })
                .collect();
            let now = now_unix_ms();
            let source = resp.source;
            output::print(output, &rows, |rows| {
                let mut t = output::table(&["GROUP", "RULE", "FOR", "HEALTH", "LAST EVAL", "PENDING", "FIRING"]);
                for r in rows {
                    let health = match &r.last_error {
                        Some(e) => format!("error: {e}"),
                        None => r.health.to_owned(),
                    };
                    t.add_row(vec![
                        r.group.clone(),
                        r.name.clone(),
                        humantime::format_duration(std::time::Duration::from_millis(r.for_ms.max(0) as u64))
                            .to_string(),
                        health,
                        r.last_evaluation.map_or_else(|| "never".to_owned(), |t| output::ago(t, now)),
                        r.pending.to_string(),
                        r.firing.to_string(),
                    ]);
                }
                format!("rules from {source}\n{t}")
            })
        }
        RulesCmd::Reload => {
            let resp = call("reload rules", client.reload_rules(pb::ReloadRulesRequest {}).await)?;
            println!("reloaded {}: {} groups, {} rules", resp.source, resp.groups, resp.rules);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert() -> pb::Alert {
        pb::Alert {
            id: "76e7d434".into(),
            name: "GPUHot".into(),
            state: pb::AlertState::Firing.into(),
            labels: [("alertname", "GPUHot"), ("severity", "critical"), ("node", "gpu-a")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            annotations: [("summary".to_owned(), "GPU 0 at 91°C".to_owned())].into_iter().collect(),
            value: 91.0,
            active_since_unix_ms: 1_000,
            firing_since_unix_ms: 61_000,
            rule: "gpu/GPUHot".into(),
            silenced_by: vec!["s1".into()],
            ..Default::default()
        }
    }

    #[test]
    fn wide_adds_annotations_the_rule_and_the_silences() {
        let rows = [AlertRow::from_wire(alert())];
        let plain = ls_table(&rows, Columns::Normal, 121_000);
        assert!(plain.contains("firing") && plain.contains("node=gpu-a,severity=critical"), "{plain}");
        assert!(!plain.contains("summary=") && !plain.contains("gpu/GPUHot"), "{plain}");
        let wide = ls_table(&rows, Columns::Wide, 121_000);
        for want in ["ANNOTATIONS", "summary=GPU 0 at 91°C", "gpu/GPUHot", "2m ago", "s1"] {
            assert!(wide.contains(want), "{want} missing from\n{wide}");
        }
        assert_eq!(ls_table(&[], Columns::Wide, 0), "no alerts");
    }

    #[test]
    fn the_listed_json_keeps_its_fields() {
        let json = serde_json::to_value(AlertRow::from_wire(alert())).unwrap();
        for key in ["id", "name", "state", "labels", "annotations", "value", "since", "acked", "silenced_by", "rule"] {
            assert!(json.get(key).is_some(), "{key} missing: `alerts ls -o json` is a public interface");
        }
        assert_eq!(json["since"], 61_000, "firing: since it fired");
    }
}
