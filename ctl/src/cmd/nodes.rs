//! `flotctl nodes ls|show|revoke`.

use std::collections::BTreeSet;

use comfy_table::Cell;
use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;

use crate::cli::{Format, NodesCmd};
use crate::client::{call, connect};
use crate::context::Connection;
use crate::output::{self, Columns, GpuView, NodeView, ago, bytes, celsius, percent, state_cell};

pub async fn run(cmd: NodesCmd, conn: &Connection) -> anyhow::Result<()> {
    let mut client = connect(conn).await?;
    match cmd {
        NodesCmd::Ls { output, watch } => {
            // The wide table shows host facts (driver, agent, address) that the list's
            // JSON and YAML leave out; the answer carries them either way.
            let detail = output == Format::Wide;
            let fetch = || {
                let mut client = client.clone();
                async move {
                    let resp = client.list_nodes(pb::ListNodesRequest {}).await?.into_inner();
                    Ok(resp.nodes.into_iter().map(|n| NodeView::from_wire(n, detail)).collect::<Vec<_>>())
                }
            };
            output::list("list nodes", output, watch, fetch, |nodes, columns| ls_table(nodes, columns, now_unix_ms()))
                .await
        }
        NodesCmd::Show { node, output } => {
            let resp =
                call(&format!("get node {node}"), client.get_node(pb::GetNodeRequest { node_id: node.clone() }).await)?;
            let view = NodeView::from_wire(resp, true);
            output::print(output, &view, |v| show_text(v, now_unix_ms()))
        }
        NodesCmd::Revoke { node, reason, output } => {
            let req = pb::RevokeNodeRequest { node_id: node.clone(), reason };
            let answer = client.revoke_node(req).await;
            let resp = crate::approval::call_held(&format!("revoke node {node}"), &mut client, answer).await?;
            output::print(output, &RevocationView::from(resp), revoke_text)
        }
    }
}

/// What `nodes revoke` prints.
#[derive(Debug, serde::Serialize)]
struct RevocationView {
    node_id: String,
    revoked_at_unix_ms: i64,
    revoked_by: String,
    reason: String,
    certificate_serials: Vec<String>,
    stream_closed: bool,
    already_revoked: bool,
}

impl From<pb::RevokeNodeResponse> for RevocationView {
    fn from(r: pb::RevokeNodeResponse) -> Self {
        Self {
            node_id: r.node_id,
            revoked_at_unix_ms: r.revoked_at_unix_ms,
            revoked_by: r.revoked_by,
            reason: r.reason,
            certificate_serials: r.certificate_serials,
            stream_closed: r.stream_closed,
            already_revoked: r.already_revoked,
        }
    }
}

fn revoke_text(r: &RevocationView) -> String {
    let at = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(r.revoked_at_unix_ms).unwrap_or(0)),
    );
    let what = if r.already_revoked { "was already revoked" } else { "revoked" };
    let mut out = format!("Node {} {what} at {at} by {}: {}", r.node_id, r.revoked_by, r.reason);
    if r.stream_closed {
        out.push_str("\nIts live stream was closed.");
    }
    if !r.certificate_serials.is_empty() {
        out.push_str(&format!("\nCertificate serials: {}", r.certificate_serials.join(", ")));
    }
    out.push_str("\nEvery later connection from this node is refused; un-revoking is not supported yet.");
    out
}

fn ls_table(nodes: &[NodeView], columns: Columns, now: i64) -> String {
    if nodes.is_empty() {
        return "No nodes have connected yet. Start an agent with a certificate from `flotctl cert issue --node ID`."
            .to_owned();
    }
    let mut header = vec!["NODE", "STATE", "GPUS", "UTIL", "MAX TEMP", "VRAM USED/TOTAL", "LAST SEEN"];
    if columns == Columns::Wide {
        header.extend(["GPU MODEL", "DRIVER", "AGENT", "ADDRESS", "HOSTNAME", "LABELS"]);
    }
    let mut t = output::table(&header);
    for n in nodes {
        let state = match columns {
            Columns::Wide if !n.state_reason.is_empty() => format!("{} ({})", n.state, n.state_reason),
            _ => n.state.clone(),
        };
        let mut row = vec![
            Cell::new(&n.id),
            state_cell(&state),
            Cell::new(n.gpus.len()),
            Cell::new(percent(n.mean_gpu_utilization_ratio)),
            Cell::new(celsius(n.max_gpu_temperature_celsius)),
            Cell::new(format!("{} / {}", bytes(n.gpu_memory_used_bytes), bytes(n.gpu_memory_total_bytes))),
            Cell::new(ago(n.last_seen_unix_ms, now)),
        ];
        if columns == Columns::Wide {
            row.extend(wide_cells(n).map(Cell::new));
        }
        t.add_row(row);
    }
    t.to_string()
}

/// The extra columns of `nodes ls -o wide`; `-` where the node has not said.
fn wide_cells(n: &NodeView) -> [String; 6] {
    let dash = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
    let models: BTreeSet<&str> = n.gpus.iter().map(|g| g.model.as_str()).filter(|m| !m.is_empty()).collect();
    let host = n.host.as_ref();
    let driver = host.map_or_else(String::new, |h| match (h.driver_version.as_str(), h.cuda_version.as_str()) {
        ("", _) => String::new(),
        (driver, "") => driver.to_owned(),
        (driver, cuda) => format!("{driver}, CUDA {cuda}"),
    });
    let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    [
        dash(&models.into_iter().collect::<Vec<_>>().join(",")),
        dash(&driver),
        dash(host.map_or("", |h| h.agent_version.as_str())),
        dash(host.map_or("", |h| h.peer_addr.as_str())),
        dash(&n.hostname),
        dash(&labels.join(",")),
    ]
}

fn show_text(n: &NodeView, now: i64) -> String {
    let mut out = String::new();
    let state = if n.state_reason.is_empty() { n.state.clone() } else { format!("{} ({})", n.state, n.state_reason) };
    out.push_str(&format!("Node:       {}\nState:      {state}\nHostname:   {}\n", n.id, n.hostname));
    if let Some(h) = &n.host {
        out.push_str(&format!(
            "OS:         {} (kernel {})\nCPU:        {} × {}\nMemory:     {} total, {} available\nAgent:      {} from {}\n",
            h.os,
            h.kernel,
            h.cpu_cores,
            h.cpu_model,
            bytes(h.memory_total_bytes),
            h.memory_available_bytes.map_or_else(|| "-".to_owned(), bytes),
            h.agent_version,
            if h.peer_addr.is_empty() { "-" } else { &h.peer_addr },
        ));
        out.push_str(&format!("GPU source: {} ({})\n", n.gpu_source, h.gpu_source_note));
        if !h.driver_version.is_empty() {
            out.push_str(&format!("Driver:     {} (CUDA {})\n", h.driver_version, h.cuda_version));
        }
    }
    if !n.labels.is_empty() {
        let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!("Labels:     {}\n", labels.join(",")));
    }
    out.push_str(&format!("Last seen:  {}\n", ago(n.last_seen_unix_ms, now)));
    if !n.gpus.is_empty() {
        let mut t = output::table(&["GPU", "MODEL", "UTIL", "TEMP", "VRAM USED/TOTAL", "POWER", "UUID"]);
        for g in &n.gpus {
            t.add_row(vec![
                g.index.to_string(),
                g.model.clone(),
                percent(g.utilization_ratio),
                celsius(g.temperature_celsius),
                format!(
                    "{} / {}",
                    g.memory_used_bytes.map_or_else(|| "-".to_owned(), bytes),
                    bytes(g.memory_total_bytes)
                ),
                match (g.power_watts, g.power_limit_watts) {
                    (Some(p), Some(l)) => format!("{p:.0} / {l:.0} W"),
                    (Some(p), None) => format!("{p:.0} W"),
                    _ => "-".to_owned(),
                },
                g.uuid.clone(),
            ]);
        }
        out.push('\n');
        out.push_str(&t.to_string());
        out.push_str("\n\n");
        out.push_str(&health_table(&n.gpus));
    }
    out.push_str(&containers_text(n, now));
    out
}

/// The managed containers, when the agent has reported them.
fn containers_text(n: &NodeView, now: i64) -> String {
    if let Some(error) = &n.container_runtime_error {
        return format!("\nContainers: unknown (container runtime unavailable: {error})\n");
    }
    let Some(containers) = &n.containers else { return String::new() };
    if containers.is_empty() {
        return "\nContainers: none\n".to_owned();
    }
    let mut t = output::table(&["CONTAINER", "STATE", "HEALTH", "DEPLOYMENT", "REVISION", "IMAGE", "ID", "CREATED"]);
    for c in containers {
        let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
        t.add_row(vec![
            c.name.clone(),
            c.state.clone(),
            or_dash(&c.health),
            or_dash(&c.deployment),
            or_dash(&c.revision),
            c.image.clone(),
            c.id.clone(),
            c.created_unix_ms.map_or_else(|| "-".to_owned(), |ms| ago(ms, now)),
        ]);
    }
    format!("\n{t}\n")
}

/// The second per-GPU table: what says a GPU needs attention.
fn health_table(gpus: &[GpuView]) -> String {
    let mut t =
        output::table(&["GPU", "MEM TEMP", "CLOCKS HELD BY", "XID ERRORS", "ECC UNCORR (VOL/AGG)", "ROW REMAP"]);
    for g in gpus {
        let held = match &g.clock_event_reasons {
            None => "-".to_owned(),
            Some(reasons) if reasons.is_empty() => "none".to_owned(),
            Some(reasons) => reasons.join(","),
        };
        let xids: Vec<String> = g.xid_events.iter().map(|x| format!("{}×{}", x.code, x.count)).collect();
        let count = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        let remap = match (g.remapped_rows_failed, g.remapped_rows_pending) {
            (Some(true), _) => "FAILED",
            (_, Some(true)) => "pending reset",
            (Some(false), _) | (_, Some(false)) => "ok",
            (None, None) => "-",
        };
        t.add_row(vec![
            g.index.to_string(),
            celsius(g.memory_temperature_celsius),
            held,
            if xids.is_empty() { "none".to_owned() } else { xids.join(", ") },
            format!("{} / {}", count(g.ecc_uncorrected_volatile_total), count(g.ecc_uncorrected_aggregate_total)),
            remap.to_owned(),
        ]);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use flotilla_proto::pb;

    use super::*;

    #[test]
    fn revoke_says_who_when_and_why() {
        let resp = pb::RevokeNodeResponse {
            node_id: "gpu-a".into(),
            revoked_at_unix_ms: 1_700_000_000_000,
            revoked_by: "operator root (admin)".into(),
            reason: "stolen".into(),
            certificate_serials: vec!["0a1b".into()],
            stream_closed: true,
            already_revoked: false,
        };
        let text = revoke_text(&RevocationView::from(resp.clone()));
        assert!(
            text.starts_with("Node gpu-a revoked at 2023-11-14T22:13:20Z by operator root (admin): stolen"),
            "{text}"
        );
        assert!(text.contains("stream was closed") && text.contains("0a1b"), "{text}");
        let again = revoke_text(&RevocationView::from(pb::RevokeNodeResponse { already_revoked: true, ..resp }));
        assert!(again.contains("was already revoked"), "{again}");
    }

    #[test]
    fn show_prints_gpu_health_by_name() {
        let node = pb::Node {
            id: "a".into(),
            inventory: Some(pb::Inventory {
                gpus: vec![pb::GpuInfo { index: 0, uuid: "GPU-0".into(), ..Default::default() }],
                ..Default::default()
            }),
            latest: Some(pb::TelemetryBatch {
                gpus: vec![pb::GpuSample {
                    index: 0,
                    memory_temperature_celsius: Some(81.0),
                    clock_event_reasons: Some(0x20 | 0x4),
                    xid_events: vec![pb::XidCount { code: 48, count: 2 }],
                    ecc_uncorrected_volatile_total: Some(2),
                    ecc_uncorrected_aggregate_total: Some(5),
                    remapped_rows_pending: Some(true),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let view = NodeView::from_wire(node, true);
        let text = show_text(&view, 0);
        for want in ["81°C", "sw_power_cap,sw_thermal_slowdown", "48×2", "2 / 5", "pending reset"] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        assert!(!text.contains("Containers"), "nothing reported, nothing shown");
        let json = serde_json::to_value(&view).unwrap();
        assert!(json.get("containers").is_none());
        assert_eq!(json["gpus"][0]["clock_event_reasons"], serde_json::json!(["sw_power_cap", "sw_thermal_slowdown"]));
        assert_eq!(json["gpus"][0]["xid_events"][0]["count"], 2);
    }

    fn listed_node() -> pb::Node {
        pb::Node {
            id: "gpu-a".into(),
            state: pb::NodeState::Degraded.into(),
            state_reason: "gpu 1 hot".into(),
            peer_addr: "10.0.0.5:51234".into(),
            last_seen_unix_ms: 1_000,
            inventory: Some(pb::Inventory {
                hostname: "rack1-a".into(),
                driver_version: "550.54.15".into(),
                cuda_version: "12.4".into(),
                agent_version: "0.1.0".into(),
                labels: [("zone".to_owned(), "z1".to_owned())].into_iter().collect(),
                gpus: vec![
                    pb::GpuInfo { index: 0, model: "NVIDIA H100 80GB HBM3".into(), ..Default::default() },
                    pb::GpuInfo { index: 1, model: "NVIDIA H100 80GB HBM3".into(), ..Default::default() },
                ],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn wide_adds_model_driver_agent_address_and_labels() {
        let wide = ls_table(&[NodeView::from_wire(listed_node(), true)], Columns::Wide, 61_000);
        for want in [
            "GPU MODEL",
            "NVIDIA H100 80GB HBM3",
            "550.54.15, CUDA 12.4",
            "0.1.0",
            "10.0.0.5:51234",
            "rack1-a",
            "zone=z1",
            "degraded (gpu 1 hot)",
            "1m ago",
        ] {
            assert!(wide.contains(want), "{want} missing from\n{wide}");
        }
        assert_eq!(wide.matches("NVIDIA H100").count(), 1, "one model, named once");
        let plain = ls_table(&[NodeView::from_wire(listed_node(), false)], Columns::Normal, 61_000);
        for absent in ["GPU MODEL", "550.54.15", "10.0.0.5", "zone=z1", "gpu 1 hot"] {
            assert!(!plain.contains(absent), "{absent} in the plain table\n{plain}");
        }
        assert!(!plain.contains('\x1b') && !wide.contains('\x1b'), "no colour unless this run colours");
    }

    #[test]
    fn the_listed_json_keeps_its_fields() {
        let json = serde_json::to_value(NodeView::from_wire(listed_node(), false)).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "first_seen_unix_ms",
                "gpu_memory_total_bytes",
                "gpu_memory_used_bytes",
                "gpu_source",
                "gpus",
                "hostname",
                "id",
                "labels",
                "last_seen_unix_ms",
                "max_gpu_temperature_celsius",
                "mean_gpu_utilization_ratio",
                "state",
                "state_reason",
            ],
            "`nodes ls -o json` is a public interface: add fields, never rename or drop them"
        );
    }

    #[test]
    fn show_lists_reported_containers() {
        let container = pb::Container {
            name: "llama-7".into(),
            id: "0123456789ab".into(),
            image: "vllm/vllm-openai:v0.8.5".into(),
            state: "running".into(),
            health: "healthy".into(),
            deployment: "llama".into(),
            revision: "7".into(),
            created_unix_ms: 1_000,
        };
        let node = |report: pb::ContainerReport| pb::Node {
            id: "a".into(),
            inventory: Some(pb::Inventory { containers: Some(report), ..Default::default() }),
            ..Default::default()
        };
        let view =
            NodeView::from_wire(node(pb::ContainerReport { containers: vec![container], ..Default::default() }), true);
        let text = show_text(&view, 61_000);
        for want in ["llama-7", "running", "healthy", "llama", "0123456789ab", "1m ago"] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["containers"][0]["deployment"], "llama");
        assert_eq!(json["containers"][0]["created_unix_ms"], 1_000);
        assert!(json.get("container_runtime_error").is_none());

        let down = pb::ContainerReport { runtime_error: "no engine".into(), ..Default::default() };
        let view = NodeView::from_wire(node(down), true);
        assert!(show_text(&view, 0).contains("unknown (container runtime unavailable: no engine)"));
        assert_eq!(serde_json::to_value(&view).unwrap()["container_runtime_error"], "no engine");
        let listed = NodeView::from_wire(node(pb::ContainerReport::default()), false);
        assert!(listed.containers.is_none(), "`nodes ls` leaves them out");
    }
}
