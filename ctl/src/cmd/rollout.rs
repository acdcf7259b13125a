//! `flotctl rollout status|pause|resume|abort|undo`, and the rollout and plan
//! views that `flotctl deploy` prints as well.

use std::io::{IsTerminal as _, Write as _};
use std::time::Duration;

use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use serde::Serialize;

use crate::cli::{Format, RolloutCmd, RolloutOpArgs};
use crate::client::{call, connect, status_error};
use crate::context::Connection;
use crate::output;

type Client = crate::client::Fleet;

/// How many of the newest events the human status shows.
const EVENTS_SHOWN: usize = 10;

/// A number for JSON and YAML: null when not finite (a gate with no data is NaN
/// on the wire, which JSON cannot carry).
pub(super) fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// `None` for an empty string, so that scripts see null rather than "".
pub(super) fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// One gateway server and its weight (0: listed but out of rotation).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(super) struct WeightView {
    pub address: String,
    pub weight: u32,
}

impl WeightView {
    pub(super) fn from_wire(w: pb::GatewayServer) -> Self {
        Self { address: w.address, weight: w.weight }
    }
}

/// `10.0.0.5:8000=90, 10.0.0.6:8000=10`, or `-` when there are none.
pub(super) fn weights_text(weights: &[WeightView]) -> String {
    if weights.is_empty() {
        return "-".to_owned();
    }
    weights.iter().map(|w| format!("{}={}", w.address, w.weight)).collect::<Vec<_>>().join(", ")
}

/// One replica of a deployment revision: a container on a node.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(super) struct ReplicaView {
    pub node: String,
    pub revision: u32,
    pub container: String,
    pub gpus: Vec<u32>,
    /// ADDRESS:PORT, as the gateway's upstream lists it.
    pub server: String,
}

impl ReplicaView {
    pub(super) fn from_wire(r: pb::DeploymentReplica) -> Self {
        Self { node: r.node, revision: r.revision, container: r.container, gpus: r.gpus, server: r.server }
    }

    /// `llama-3@gpu-b GPUs 0,1 server 10.0.0.6:8000`.
    fn text(&self) -> String {
        let gpus = if self.gpus.is_empty() {
            "-".to_owned()
        } else {
            self.gpus.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        };
        let server = if self.server.is_empty() { "-" } else { &self.server };
        format!("{}@{}  GPUs {gpus}  server {server}", self.container, self.node)
    }
}

/// One step of a rollout plan.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(super) struct StepView {
    /// From 1.
    pub number: usize,
    /// start, traffic, retire or await_promotion.
    pub kind: String,
    pub label: String,
    /// start and retire: the replicas.
    pub replicas: Vec<ReplicaView>,
    /// traffic: the gateway's servers and weights.
    pub weights: Vec<WeightView>,
    /// traffic: the new revision's share (%); null for other kinds.
    pub new_share: Option<u32>,
    /// traffic: how long the health gates watch it; null for other kinds.
    pub bake_ms: Option<u64>,
}

/// A rollout plan: its strategy, why it is what it is, and its steps.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(super) struct PlanView {
    /// blue-green, canary, rolling, retire-first, initial or revert.
    pub strategy: String,
    pub notes: Vec<String>,
    pub steps: Vec<StepView>,
}

impl PlanView {
    pub(super) fn from_wire(p: pb::RolloutPlan) -> Self {
        let steps = p
            .steps
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                let traffic = s.kind == "traffic";
                StepView {
                    number: i + 1,
                    label: s.label,
                    replicas: s.replicas.into_iter().map(ReplicaView::from_wire).collect(),
                    weights: s.weights.into_iter().map(WeightView::from_wire).collect(),
                    new_share: traffic.then_some(s.new_share),
                    bake_ms: traffic.then_some(s.bake_ms),
                    kind: s.kind,
                }
            })
            .collect();
        Self { strategy: p.strategy, notes: p.notes, steps }
    }

    /// The plan for people: strategy, notes, then each step with what it does.
    pub(super) fn text(&self) -> String {
        let mut out = format!("Strategy: {}\n", self.strategy);
        if !self.notes.is_empty() {
            out.push_str("Notes:\n");
            for n in &self.notes {
                out.push_str(&format!("  - {n}\n"));
            }
        }
        if self.steps.is_empty() {
            out.push_str("Steps: none\n");
            return out;
        }
        out.push_str("Steps:\n");
        for s in &self.steps {
            out.push_str(&format!("  {:>2}. {:<15} {}\n", s.number, s.kind, s.label));
            for r in &s.replicas {
                out.push_str(&format!("        {}\n", r.text()));
            }
            if s.kind == "traffic" {
                let bake = humantime::format_duration(Duration::from_millis(s.bake_ms.unwrap_or_default()));
                out.push_str(&format!(
                    "        weights {}; new share {}%; bake {bake}\n",
                    weights_text(&s.weights),
                    s.new_share.unwrap_or_default()
                ));
            }
        }
        out
    }
}

/// One health-gate reading; numbers are null when there is no data.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(super) struct GateView {
    /// readiness, error_ratio, p95_latency_seconds or p95_ttft_seconds.
    pub gate: String,
    pub value: Option<f64>,
    pub baseline: Option<f64>,
    pub limit: Option<f64>,
    /// pass, fail, waiting or "no data".
    pub verdict: String,
    pub detail: String,
}

/// One command of the current step.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(super) struct CommandView {
    pub id: String,
    pub node: String,
    pub command: String,
    /// pending, succeeded, failed or refused.
    pub status: String,
    pub detail: String,
}

/// One rollout event.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(super) struct EventView {
    pub at_unix_ms: i64,
    pub text: String,
}

/// A rollout as `flotctl rollout status -o json` prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(super) struct RolloutView {
    pub deployment: String,
    pub number: u64,
    /// progressing, paused, succeeded, rolled_back, failed or aborted.
    pub state: String,
    /// True once the state is final (succeeded, rolled_back, failed or aborted).
    #[serde(rename = "final")]
    pub is_final: bool,
    /// 0: none (a first deploy).
    pub from_revision: u32,
    pub to_revision: u32,
    /// The step running now, from 1, within the running plan (the revert plan once reverting).
    pub step: u32,
    pub steps: u32,
    pub step_label: String,
    /// ready, acting, settling or baking.
    pub phase: String,
    /// The gateway's weights as last confirmed.
    pub weights: Vec<WeightView>,
    /// The new revision's share of the traffic (%).
    pub new_share: u32,
    pub gates: Vec<GateView>,
    /// The current step's commands.
    pub commands: Vec<CommandView>,
    pub plan: Option<PlanView>,
    /// Set once the rollout turned back.
    pub revert_plan: Option<PlanView>,
    pub reverting: bool,
    pub error: Option<String>,
    /// Oldest first.
    pub events: Vec<EventView>,
    pub started_unix_ms: i64,
    /// Null while it runs.
    pub finished_unix_ms: Option<i64>,
    pub started_by: String,
    /// apply or undo.
    pub trigger: String,
}

/// Whether a rollout in `state` has ended.
pub(super) fn is_final(state: &str) -> bool {
    matches!(state, "succeeded" | "rolled_back" | "failed" | "aborted")
}

impl RolloutView {
    pub(super) fn from_wire(r: pb::RolloutStatus) -> Self {
        Self {
            is_final: is_final(&r.state),
            deployment: r.deployment,
            number: r.number,
            state: r.state,
            from_revision: r.from_revision,
            to_revision: r.to_revision,
            step: r.step,
            steps: r.steps,
            step_label: r.step_label,
            phase: r.phase,
            weights: r.weights.into_iter().map(WeightView::from_wire).collect(),
            new_share: r.new_share,
            gates: r
                .gates
                .into_iter()
                .map(|g| GateView {
                    gate: g.gate,
                    value: finite(g.value),
                    baseline: finite(g.baseline),
                    limit: finite(g.limit),
                    verdict: g.verdict,
                    detail: g.detail,
                })
                .collect(),
            commands: r
                .commands
                .into_iter()
                .map(|c| CommandView { id: c.id, node: c.node, command: c.command, status: c.status, detail: c.detail })
                .collect(),
            plan: r.plan.map(PlanView::from_wire),
            revert_plan: r.revert_plan.map(PlanView::from_wire),
            reverting: r.reverting,
            error: non_empty(r.error),
            events: r.events.into_iter().map(|e| EventView { at_unix_ms: e.at_unix_ms, text: e.text }).collect(),
            started_unix_ms: r.started_unix_ms,
            finished_unix_ms: (r.finished_unix_ms > 0).then_some(r.finished_unix_ms),
            started_by: r.started_by,
            trigger: r.trigger,
        }
    }

    /// `2 → 3`, or `none → 1` for a first deploy.
    pub(super) fn revisions_text(&self) -> String {
        let from = if self.from_revision == 0 { "none".to_owned() } else { self.from_revision.to_string() };
        format!("{from} → {}", self.to_revision)
    }

    /// `3/5`.
    pub(super) fn step_text(&self) -> String {
        format!("{}/{}", self.step, self.steps)
    }

    /// The running plan: the revert plan once reverting.
    fn running_plan(&self) -> Option<&PlanView> {
        if self.reverting { self.revert_plan.as_ref().or(self.plan.as_ref()) } else { self.plan.as_ref() }
    }

    /// The rollout for people, with times relative to `now_ms`.
    pub(super) fn text(&self, now_ms: i64) -> String {
        let mut out = String::new();
        let strategy = self.running_plan().map_or("", |p| p.strategy.as_str());
        let reverting = if self.reverting { ", reverting" } else { "" };
        out.push_str(&format!("Rollout:    {} #{} ({strategy}{reverting})\n", self.deployment, self.number));
        out.push_str(&format!("State:      {}\n", self.state));
        out.push_str(&format!("Revision:   {}\n", self.revisions_text()));
        let label = if self.step_label.is_empty() { String::new() } else { format!(" {}", self.step_label) };
        out.push_str(&format!("Step:       {}{label} ({})\n", self.step_text(), self.phase));
        out.push_str(&format!("Weights:    {} (new revision {}%)\n", weights_text(&self.weights), self.new_share));
        let finished = match self.finished_unix_ms {
            Some(at) => format!(", finished {}", output::ago(at, now_ms)),
            None => String::new(),
        };
        out.push_str(&format!(
            "Started:    {} by {} ({}){finished}\n",
            output::ago(self.started_unix_ms, now_ms),
            if self.started_by.is_empty() { "-" } else { &self.started_by },
            if self.trigger.is_empty() { "-" } else { &self.trigger },
        ));
        if let Some(e) = &self.error {
            out.push_str(&format!("Error:      {e}\n"));
        }
        if !self.gates.is_empty() {
            let mut t = output::table(&["GATE", "VALUE", "BASELINE", "LIMIT", "VERDICT", "DETAIL"]);
            for g in &self.gates {
                t.add_row(vec![
                    g.gate.clone(),
                    output::number(g.value),
                    output::number(g.baseline),
                    output::number(g.limit),
                    g.verdict.clone(),
                    g.detail.clone(),
                ]);
            }
            out.push_str(&format!("\nGates:\n{t}\n"));
        }
        if !self.commands.is_empty() {
            let mut t = output::table(&["NODE", "COMMAND", "STATUS", "DETAIL", "ID"]);
            for c in &self.commands {
                t.add_row(vec![c.node.clone(), c.command.clone(), c.status.clone(), c.detail.clone(), c.id.clone()]);
            }
            out.push_str(&format!("\nCommands of this step:\n{t}\n"));
        }
        if !self.events.is_empty() {
            let skip = self.events.len().saturating_sub(EVENTS_SHOWN);
            let shown = self.events.len() - skip;
            if skip > 0 {
                out.push_str(&format!("\nEvents (last {shown} of {}):\n", self.events.len()));
            } else {
                out.push_str("\nEvents:\n");
            }
            for e in &self.events[skip..] {
                out.push_str(&format!(
                    "  {}  {:>8}  {}\n",
                    time_text(e.at_unix_ms),
                    output::ago(e.at_unix_ms, now_ms),
                    e.text
                ));
            }
        }
        out.trim_end().to_owned()
    }
}

/// A Unix time in ms as RFC 3339 (UTC, whole seconds), `-` for none.
pub(super) fn time_text(unix_ms: i64) -> String {
    match u64::try_from(unix_ms) {
        Ok(ms) if ms > 0 => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
        }
        _ => "-".to_owned(),
    }
}

/// The answer to a rollout operation as `-o json` prints it.
#[derive(Debug, Serialize)]
struct OperateView {
    operation: &'static str,
    message: String,
    rollout: Option<RolloutView>,
}

/// What `flotctl rollout pause|resume|abort|undo` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RolloutOp {
    Pause,
    Resume,
    Abort,
    Undo,
}

impl RolloutOp {
    fn to_wire(self) -> pb::RolloutOperation {
        match self {
            RolloutOp::Pause => pb::RolloutOperation::Pause,
            RolloutOp::Resume => pb::RolloutOperation::Resume,
            RolloutOp::Abort => pb::RolloutOperation::Abort,
            RolloutOp::Undo => pb::RolloutOperation::Undo,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            RolloutOp::Pause => "pause",
            RolloutOp::Resume => "resume",
            RolloutOp::Abort => "abort",
            RolloutOp::Undo => "undo",
        }
    }
}

pub async fn run(cmd: RolloutCmd, conn: &Connection) -> anyhow::Result<()> {
    let mut client = connect(conn).await?;
    match cmd {
        RolloutCmd::Status { name, number, watch, interval, output } => {
            let request = pb::GetRolloutRequest { name: name.clone(), number: number.unwrap_or_default() };
            let what = format!("get rollout of {name}");
            if watch {
                return watch_rollout(&mut client, request, &what, interval, output).await;
            }
            let view = RolloutView::from_wire(call(&what, client.get_rollout(request).await)?);
            output::print(output, &view, |v| v.text(now_unix_ms()))
        }
        RolloutCmd::Pause(args) => operate(&mut client, RolloutOp::Pause, args).await,
        RolloutCmd::Resume(args) => operate(&mut client, RolloutOp::Resume, args).await,
        RolloutCmd::Abort(args) => operate(&mut client, RolloutOp::Abort, args).await,
        RolloutCmd::Undo(args) => operate(&mut client, RolloutOp::Undo, args).await,
    }
}

async fn operate(client: &mut Client, op: RolloutOp, args: RolloutOpArgs) -> anyhow::Result<()> {
    let RolloutOpArgs { name, output } = args;
    let request = pb::OperateRolloutRequest { name: name.clone(), operation: op.to_wire().into() };
    let answer = client.operate_rollout(request).await;
    let resp = crate::approval::call_held(&format!("{} rollout of {name}", op.as_str()), client, answer).await?;
    let view = OperateView {
        operation: op.as_str(),
        message: resp.message,
        rollout: resp.rollout.map(RolloutView::from_wire),
    };
    output::print(output, &view, |v| match &v.rollout {
        Some(r) => {
            let label = if r.step_label.is_empty() { String::new() } else { format!(" {}", r.step_label) };
            format!(
                "{name}: {}\nrollout #{} ({}): {}, step {}{label}",
                v.message,
                r.number,
                r.revisions_text(),
                r.state,
                r.step_text()
            )
        }
        None => format!("{name}: {}", v.message),
    })
}

/// Polls the rollout every `interval` and prints it until it ends (exit 0) or
/// the operator presses Ctrl-C (also exit 0: watching changes nothing).
async fn watch_rollout(
    client: &mut Client,
    request: pb::GetRolloutRequest,
    what: &str,
    interval: Duration,
    output: Format,
) -> anyhow::Result<()> {
    let stop = flotilla_common::shutdown::on_signal();
    let redraw = matches!(output, Format::Table | Format::Wide) && std::io::stdout().is_terminal();
    let mut last_printed: Option<RolloutView> = None;
    loop {
        let answer = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            answer = client.get_rollout(request.clone()) => answer,
        };
        match answer {
            Ok(resp) => {
                let view = RolloutView::from_wire(resp.into_inner());
                match print_watched(&view, output, redraw, &mut last_printed) {
                    Err(error) if reader_gone(&error) => return Ok(()),
                    other => other?,
                }
                if view.is_final {
                    return Ok(());
                }
            }
            // The controller restarting mid-rollout is no reason to stop watching it.
            Err(status) if status.code() == tonic::Code::Unavailable => {
                eprintln!("flotctl: {} (retrying)", status_error(what, &status));
            }
            Err(status) => return Err(status_error(what, &status)),
        }
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// One watch frame: a JSON line each poll; YAML documents and plain text only
/// when something changed; on a terminal the table view is redrawn in place.
fn print_watched(
    view: &RolloutView,
    output: Format,
    redraw: bool,
    last_printed: &mut Option<RolloutView>,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match output {
        Format::Json => writeln!(out, "{}", serde_json::to_string(view)?)?,
        _ if last_printed.as_ref() == Some(view) && !redraw => return Ok(()),
        Format::Yaml => write!(out, "---\n{}", serde_yaml_ng::to_string(view)?)?,
        Format::Table | Format::Wide if redraw => writeln!(out, "\x1b[2J\x1b[H{}", view.text(now_unix_ms()))?,
        Format::Table | Format::Wide => {
            writeln!(out, "--- {}\n{}\n", time_text(now_unix_ms()), view.text(now_unix_ms()))?
        }
    }
    out.flush()?;
    *last_printed = Some(view.clone());
    Ok(())
}

/// Whether printing failed because the reader went away (`| head -1`): the
/// watch is over, not failed.
fn reader_gone(error: &anyhow::Error) -> bool {
    error.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> pb::RolloutStatus {
        pb::RolloutStatus {
            deployment: "llama".into(),
            number: 3,
            state: "progressing".into(),
            from_revision: 2,
            to_revision: 3,
            step: 2,
            steps: 4,
            step_label: "canary 10%".into(),
            phase: "baking".into(),
            weights: vec![
                pb::GatewayServer { address: "10.0.0.5:8000".into(), weight: 90 },
                pb::GatewayServer { address: "10.0.0.6:8000".into(), weight: 10 },
            ],
            new_share: 10,
            gates: vec![
                pb::GateReading {
                    gate: "error_ratio".into(),
                    value: f64::NAN,
                    baseline: f64::INFINITY,
                    limit: 0.05,
                    verdict: "no data".into(),
                    detail: "no requests yet".into(),
                },
                pb::GateReading {
                    gate: "p95_latency_seconds".into(),
                    value: 0.25,
                    baseline: 0.2,
                    limit: 0.4,
                    verdict: "pass".into(),
                    detail: String::new(),
                },
            ],
            plan: Some(pb::RolloutPlan {
                strategy: "canary".into(),
                notes: vec!["spare GPU memory on gpu-b: surge".into()],
                steps: vec![
                    pb::RolloutStep {
                        label: "start revision 3".into(),
                        kind: "start".into(),
                        replicas: vec![pb::DeploymentReplica {
                            node: "gpu-b".into(),
                            revision: 3,
                            container: "llama-3".into(),
                            gpus: vec![0, 1],
                            server: "10.0.0.6:8000".into(),
                        }],
                        ..Default::default()
                    },
                    pb::RolloutStep {
                        label: "canary 10%".into(),
                        kind: "traffic".into(),
                        weights: vec![pb::GatewayServer { address: "10.0.0.6:8000".into(), weight: 10 }],
                        new_share: 10,
                        bake_ms: 300_000,
                        ..Default::default()
                    },
                ],
            }),
            events: (0..12)
                .map(|i| pb::RolloutEvent { at_unix_ms: 1_700_000_000_000 + i, text: format!("event {i}") })
                .collect(),
            started_unix_ms: 1_700_000_000_000,
            started_by: "operator:alice".into(),
            trigger: "apply".into(),
            ..Default::default()
        }
    }

    #[test]
    fn json_has_the_promised_keys_and_null_for_missing_gate_data() {
        let view = RolloutView::from_wire(status());
        let text = serde_json::to_string(&view).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        for key in [
            "state",
            "step",
            "steps",
            "weights",
            "new_share",
            "phase",
            "from_revision",
            "to_revision",
            "number",
            "deployment",
            "gates",
            "error",
            "reverting",
            "events",
            "plan",
        ] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
        assert_eq!(json["state"], "progressing");
        assert_eq!(json["step"], 2);
        assert_eq!(json["final"], false);
        assert_eq!(json["weights"][1], serde_json::json!({"address": "10.0.0.6:8000", "weight": 10}));
        assert!(json["gates"][0]["value"].is_null(), "NaN is null: {json}");
        assert!(json["gates"][0]["baseline"].is_null(), "infinity is null");
        assert_eq!(json["gates"][0]["limit"], 0.05);
        assert_eq!(json["gates"][1]["value"], 0.25);
        assert!(json["error"].is_null());
        assert!(json["finished_unix_ms"].is_null());
        assert_eq!(json["plan"]["steps"][1]["new_share"], 10);
        assert!(json["plan"]["steps"][0]["new_share"].is_null(), "only traffic steps have a share");
        assert!(!text.contains("NaN"));
        let yaml = serde_yaml_ng::to_string(&view).unwrap();
        assert!(!yaml.contains(".nan"), "{yaml}");
    }

    #[test]
    fn people_see_dashes_for_missing_gate_data_and_the_last_events() {
        let text = RolloutView::from_wire(status()).text(1_700_000_060_000);
        for want in [
            "llama #3 (canary)",
            "2 → 3",
            "2/4 canary 10% (baking)",
            "10.0.0.5:8000=90, 10.0.0.6:8000=10 (new revision 10%)",
            "error_ratio",
            "no data",
            "Events (last 10 of 12)",
            "event 11",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        assert!(!text.contains("NaN") && !text.contains("inf"), "{text}");
        assert!(!text.contains("event 1\n"), "only the last ten events:\n{text}");
        let gate_row = text.lines().find(|l| l.contains("error_ratio")).unwrap();
        assert!(gate_row.contains(" - "), "{gate_row}");
    }

    #[test]
    fn final_states_end_a_watch() {
        for s in ["succeeded", "rolled_back", "failed", "aborted"] {
            assert!(is_final(s));
        }
        for s in ["progressing", "paused", ""] {
            assert!(!is_final(s));
        }
        let mut done = status();
        done.state = "rolled_back".into();
        done.finished_unix_ms = 1_700_000_100_000;
        let json = serde_json::to_value(RolloutView::from_wire(done)).unwrap();
        assert_eq!(json["final"], true);
        assert_eq!(json["finished_unix_ms"], 1_700_000_100_000_i64);
    }

    #[test]
    fn plans_list_replicas_and_weights() {
        let plan = PlanView::from_wire(status().plan.unwrap());
        let text = plan.text();
        for want in [
            "Strategy: canary",
            "- spare GPU memory on gpu-b: surge",
            "1. start",
            "llama-3@gpu-b  GPUs 0,1  server 10.0.0.6:8000",
            "2. traffic",
            "weights 10.0.0.6:8000=10; new share 10%; bake 5m",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
