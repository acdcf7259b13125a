//! `flotctl deploy apply|plan|ls|history`: deployment specs, their plans,
//! revisions and rollouts through the Fleet deployment RPCs.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::Context as _;
use comfy_table::Cell;
use flotilla_proto::pb;
use serde::Serialize;

use super::rollout::{PlanView, ReplicaView, RolloutView, non_empty, time_text, weights_text};
use crate::cli::DeployCmd;
use crate::client::{call, connect};
use crate::context::Connection;
use crate::output::{self, Columns};

/// The answer to `deploy apply` or `deploy plan` as `-o json` prints it.
#[derive(Debug, Serialize)]
struct ApplyView {
    deployment: String,
    /// The revision the spec became (or, planning, would become).
    revision: u32,
    /// The serving revision already has this spec: nothing to do.
    unchanged: bool,
    dry_run: bool,
    /// The rollout started; null when none was (a dry run, or unchanged).
    rollout: Option<u64>,
    plan: Option<PlanView>,
}

impl ApplyView {
    fn from_wire(r: pb::ApplyDeploymentResponse, dry_run: bool) -> Self {
        Self {
            deployment: r.deployment,
            revision: r.revision,
            unchanged: r.unchanged,
            dry_run,
            rollout: (r.rollout > 0).then_some(r.rollout),
            plan: r.plan.map(PlanView::from_wire),
        }
    }

    fn text(&self) -> String {
        let strategy = self.plan.as_ref().map_or("-", |p| p.strategy.as_str());
        let head = match (self.unchanged, self.dry_run, self.rollout) {
            (true, _, _) => format!(
                "deployment {}: unchanged, revision {} already serves this spec",
                self.deployment, self.revision
            ),
            (false, true, _) => {
                format!(
                    "deployment {}: plan for revision {} ({strategy}); nothing applied",
                    self.deployment, self.revision
                )
            }
            (false, false, Some(n)) => {
                format!("deployment {}: revision {}, rollout {n} started ({strategy})", self.deployment, self.revision)
            }
            (false, false, None) => {
                format!("deployment {}: revision {}, no rollout started ({strategy})", self.deployment, self.revision)
            }
        };
        match &self.plan {
            Some(plan) if !self.unchanged || !plan.steps.is_empty() || !plan.notes.is_empty() => {
                format!("{head}\n\n{}", plan.text().trim_end())
            }
            _ => head,
        }
    }
}

/// One deployment in `deploy ls -o json`.
#[derive(Debug, Serialize)]
struct DeploymentView {
    name: String,
    model: String,
    image: String,
    /// 0: none serves yet.
    active_revision: u32,
    latest_revision: u32,
    replicas: Vec<ReplicaView>,
    /// The running or latest rollout; null when there has been none.
    rollout: Option<RolloutView>,
}

impl DeploymentView {
    fn from_wire(d: pb::DeploymentSummary) -> Self {
        Self {
            name: d.name,
            model: d.model,
            image: d.image,
            active_revision: d.active_revision,
            latest_revision: d.latest_revision,
            replicas: d.replicas.into_iter().map(ReplicaView::from_wire).collect(),
            rollout: d.rollout.map(RolloutView::from_wire),
        }
    }
}

/// `2 (gpu-a,gpu-b)`: how many replicas and on which nodes.
fn replicas_text(replicas: &[ReplicaView]) -> String {
    if replicas.is_empty() {
        return "0".to_owned();
    }
    let nodes: BTreeSet<&str> = replicas.iter().map(|r| r.node.as_str()).collect();
    format!("{} ({})", replicas.len(), nodes.into_iter().collect::<Vec<_>>().join(","))
}

/// A revision number, `-` for none.
fn revision_text(n: u32) -> String {
    if n == 0 { "-".to_owned() } else { n.to_string() }
}

fn ls_table(rows: &[DeploymentView], columns: Columns) -> String {
    if rows.is_empty() {
        return "no deployments (flotctl deploy apply -f SPEC)".to_owned();
    }
    let mut header = vec!["NAME", "MODEL", "ACTIVE", "LATEST", "REPLICAS", "ROLLOUT", "IMAGE"];
    if columns == Columns::Wide {
        header.extend(["SERVERS", "GATEWAY WEIGHTS", "ROLLOUT REVISIONS", "STARTED BY"]);
    }
    let mut t = output::table(&header);
    for d in rows {
        let rollout = d.rollout.as_ref().map_or_else(
            || "-".to_owned(),
            |r| {
                if r.is_final {
                    format!("#{} {}", r.number, r.state)
                } else {
                    format!("#{} {} {}", r.number, r.state, r.step_text())
                }
            },
        );
        let state = d.rollout.as_ref().map_or("", |r| r.state.as_str());
        let mut row = vec![
            Cell::new(&d.name),
            Cell::new(&d.model),
            Cell::new(revision_text(d.active_revision)),
            Cell::new(revision_text(d.latest_revision)),
            Cell::new(replicas_text(&d.replicas)),
            output::cell_colored_by(&rollout, state),
            Cell::new(&d.image),
        ];
        if columns == Columns::Wide {
            row.extend(wide_cells(d).map(Cell::new));
        }
        t.add_row(row);
    }
    t.to_string()
}

/// The extra columns of `deploy ls -o wide`: where the replicas serve, the gateway's
/// weights and the latest rollout's revisions and author.
fn wide_cells(d: &DeploymentView) -> [String; 4] {
    let servers: Vec<String> = d
        .replicas
        .iter()
        .map(|r| format!("{}={}", r.container, if r.server.is_empty() { "-" } else { &r.server }))
        .collect();
    let rollout = d.rollout.as_ref();
    [
        if servers.is_empty() { "-".to_owned() } else { servers.join(",") },
        rollout.map_or_else(|| "-".to_owned(), |r| weights_text(&r.weights)),
        rollout.map_or_else(|| "-".to_owned(), RolloutView::revisions_text),
        rollout.map_or("-", |r| if r.started_by.is_empty() { "-" } else { r.started_by.as_str() }).to_owned(),
    ]
}

/// One revision in `deploy history -o json`.
#[derive(Debug, Serialize)]
struct RevisionView {
    number: u32,
    /// The revision serving now.
    active: bool,
    applied_unix_ms: i64,
    applied_by: String,
    /// stable, failed, or null while its rollout has not ended.
    outcome: Option<String>,
    image: String,
    model: String,
    model_revision: Option<String>,
    spec_yaml: String,
}

/// `deploy history -o json`.
#[derive(Debug, Serialize)]
struct HistoryView {
    name: String,
    /// 0: none serves.
    active_revision: u32,
    revisions: Vec<RevisionView>,
    /// Oldest first.
    rollouts: Vec<RolloutView>,
}

impl HistoryView {
    fn from_wire(h: pb::GetDeploymentHistoryResponse) -> Self {
        let active = h.active_revision;
        Self {
            name: h.name,
            active_revision: active,
            revisions: h
                .revisions
                .into_iter()
                .map(|r| RevisionView {
                    active: active != 0 && r.number == active,
                    number: r.number,
                    applied_unix_ms: r.applied_unix_ms,
                    applied_by: r.applied_by,
                    outcome: non_empty(r.outcome),
                    image: r.image,
                    model: r.model,
                    model_revision: non_empty(r.model_revision),
                    spec_yaml: r.spec_yaml,
                })
                .collect(),
            rollouts: h.rollouts.into_iter().map(RolloutView::from_wire).collect(),
        }
    }

    fn text(&self) -> String {
        let dash = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
        let mut revisions = output::table(&["", "REVISION", "APPLIED", "BY", "OUTCOME", "IMAGE", "MODEL REVISION"]);
        for r in &self.revisions {
            revisions.add_row(vec![
                if r.active { "*" } else { "" }.to_owned(),
                r.number.to_string(),
                time_text(r.applied_unix_ms),
                dash(&r.applied_by),
                r.outcome.clone().unwrap_or_else(|| "-".to_owned()),
                dash(&r.image),
                r.model_revision.clone().unwrap_or_else(|| "-".to_owned()),
            ]);
        }
        let mut out = format!(
            "deployment {}: revision {} serves (* below)\n\nRevisions:\n{revisions}\n",
            self.name,
            revision_text(self.active_revision)
        );
        if self.rollouts.is_empty() {
            out.push_str("\nRollouts: none");
            return out;
        }
        let mut rollouts = output::table(&["NUMBER", "FROM→TO", "TRIGGER", "STATE", "STARTED", "FINISHED", "ERROR"]);
        for r in &self.rollouts {
            rollouts.add_row(vec![
                r.number.to_string(),
                r.revisions_text(),
                dash(&r.trigger),
                r.state.clone(),
                time_text(r.started_unix_ms),
                r.finished_unix_ms.map_or_else(|| "-".to_owned(), time_text),
                r.error.clone().unwrap_or_else(|| "-".to_owned()),
            ]);
        }
        out.push_str(&format!("\nRollouts:\n{rollouts}"));
        out
    }
}

fn read_spec(file: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("read deployment spec {}", file.display()))
}

pub async fn run(cmd: DeployCmd, conn: &Connection) -> anyhow::Result<()> {
    match cmd {
        DeployCmd::Apply { file, output } => apply(&file, false, output, conn).await,
        DeployCmd::Plan { file, output } => apply(&file, true, output, conn).await,
        DeployCmd::Ls { output, watch } => {
            let client = connect(conn).await?;
            let fetch = || {
                let mut client = client.clone();
                async move {
                    let resp = client.list_deployments(pb::ListDeploymentsRequest {}).await?.into_inner();
                    Ok(resp.deployments.into_iter().map(DeploymentView::from_wire).collect::<Vec<_>>())
                }
            };
            output::list("list deployments", output, watch, fetch, |rows, columns| ls_table(rows, columns)).await
        }
        DeployCmd::History { name, output } => {
            let mut client = connect(conn).await?;
            let resp = call(
                &format!("get history of {name}"),
                client.get_deployment_history(pb::GetDeploymentHistoryRequest { name: name.clone() }).await,
            )?;
            output::print(output, &HistoryView::from_wire(resp), HistoryView::text)
        }
    }
}

/// `deploy apply` and, with `dry_run`, `deploy plan`.
async fn apply(file: &Path, dry_run: bool, output: crate::cli::Format, conn: &Connection) -> anyhow::Result<()> {
    // Read the spec first: a wrong path should not wait on the network.
    let spec_yaml = read_spec(file)?;
    let mut client = connect(conn).await?;
    let what = if dry_run { "plan deployment" } else { "apply deployment" };
    let resp = call(what, client.apply_deployment(pb::ApplyDeploymentRequest { spec_yaml, dry_run }).await)?;
    output::print(output, &ApplyView::from_wire(resp, dry_run), ApplyView::text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(node: &str, revision: u32) -> pb::DeploymentReplica {
        pb::DeploymentReplica {
            node: node.into(),
            revision,
            container: format!("llama-{revision}"),
            gpus: vec![0],
            server: format!("{node}:8000"),
        }
    }

    fn plan() -> pb::RolloutPlan {
        pb::RolloutPlan {
            strategy: "blue-green".into(),
            notes: vec!["no spare GPU memory: retire first, capacity dips to 1 of 2".into()],
            steps: vec![
                pb::RolloutStep {
                    label: "start revision 2".into(),
                    kind: "start".into(),
                    replicas: vec![replica("gpu-a", 2)],
                    ..Default::default()
                },
                pb::RolloutStep {
                    label: "switch".into(),
                    kind: "traffic".into(),
                    weights: vec![
                        pb::GatewayServer { address: "gpu-a:8000".into(), weight: 100 },
                        pb::GatewayServer { address: "gpu-b:8000".into(), weight: 0 },
                    ],
                    new_share: 100,
                    bake_ms: 60_000,
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn apply_says_what_started_and_the_plan() {
        let resp = pb::ApplyDeploymentResponse {
            deployment: "llama".into(),
            revision: 2,
            unchanged: false,
            rollout: 5,
            plan: Some(plan()),
        };
        let text = ApplyView::from_wire(resp.clone(), false).text();
        for want in [
            "deployment llama: revision 2, rollout 5 started (blue-green)",
            "capacity dips",
            "1. start",
            "llama-2@gpu-a  GPUs 0  server gpu-a:8000",
            "weights gpu-a:8000=100, gpu-b:8000=0; new share 100%; bake 1m",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        let planned = ApplyView::from_wire(pb::ApplyDeploymentResponse { rollout: 0, ..resp.clone() }, true);
        assert!(planned.text().contains("plan for revision 2 (blue-green); nothing applied"));
        let json = serde_json::to_value(&planned).unwrap();
        assert!(json["rollout"].is_null());
        assert_eq!(json["plan"]["steps"][1]["weights"][1]["weight"], 0);

        let same =
            pb::ApplyDeploymentResponse { unchanged: true, rollout: 0, plan: Some(pb::RolloutPlan::default()), ..resp };
        assert_eq!(
            ApplyView::from_wire(same, false).text(),
            "deployment llama: unchanged, revision 2 already serves this spec"
        );
    }

    #[test]
    fn ls_shows_replicas_by_node_and_the_rollout_step() {
        let row = DeploymentView::from_wire(pb::DeploymentSummary {
            name: "llama".into(),
            active_revision: 1,
            latest_revision: 2,
            replicas: vec![replica("gpu-b", 1), replica("gpu-a", 2), replica("gpu-a", 1)],
            rollout: Some(pb::RolloutStatus {
                number: 5,
                state: "progressing".into(),
                step: 1,
                steps: 2,
                ..Default::default()
            }),
            model: "llama-8b".into(),
            image: "vllm/vllm-openai:v0.8.5".into(),
        });
        let text = ls_table(std::slice::from_ref(&row), Columns::Normal);
        for want in ["llama-8b", "3 (gpu-a,gpu-b)", "#5 progressing 1/2", "vllm/vllm-openai:v0.8.5"] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        assert!(!text.contains("gpu-a:8000"), "servers only in the wide table\n{text}");
        let wide = ls_table(&[row], Columns::Wide);
        for want in ["SERVERS", "llama-2=gpu-a:8000", "llama-1=gpu-b:8000", "GATEWAY WEIGHTS"] {
            assert!(wide.contains(want), "{want} missing from\n{wide}");
        }
    }

    #[test]
    fn history_marks_the_active_revision() {
        let view = HistoryView::from_wire(pb::GetDeploymentHistoryResponse {
            name: "llama".into(),
            active_revision: 1,
            revisions: vec![
                pb::RevisionInfo { number: 1, outcome: "stable".into(), ..Default::default() },
                pb::RevisionInfo { number: 2, outcome: "failed".into(), ..Default::default() },
            ],
            rollouts: vec![pb::RolloutStatus {
                number: 2,
                from_revision: 1,
                to_revision: 2,
                state: "rolled_back".into(),
                trigger: "apply".into(),
                error: "error_ratio 0.2 over 0.05".into(),
                finished_unix_ms: 1_700_000_000_000,
                ..Default::default()
            }],
        });
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["revisions"][0]["active"], true);
        assert_eq!(json["revisions"][1]["active"], false);
        let text = view.text();
        for want in ["1 → 2", "rolled_back", "error_ratio 0.2 over 0.05", "2023-11-14T22:13:20Z"] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        let active = text.lines().find(|l| l.trim_start().starts_with('*')).unwrap();
        assert!(active.contains("stable"), "{active}");
    }
}
