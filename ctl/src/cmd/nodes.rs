//! `flotctl nodes ls|show`.

use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;

use crate::cli::NodesCmd;
use crate::client::{call, connect};
use crate::context::Connection;
use crate::output::{self, NodeView, ago, bytes, celsius, percent};

pub async fn run(cmd: NodesCmd, conn: &Connection) -> anyhow::Result<()> {
    let mut client = connect(conn).await?;
    match cmd {
        NodesCmd::Ls { output } => {
            let resp = call("list nodes", client.list_nodes(pb::ListNodesRequest {}).await)?;
            let nodes: Vec<NodeView> = resp.nodes.into_iter().map(|n| NodeView::from_wire(n, false)).collect();
            output::print(output, &nodes, |nodes| ls_table(nodes, now_unix_ms()))
        }
        NodesCmd::Show { node, output } => {
            let resp =
                call(&format!("get node {node}"), client.get_node(pb::GetNodeRequest { node_id: node.clone() }).await)?;
            let view = NodeView::from_wire(resp, true);
            output::print(output, &view, |v| show_text(v, now_unix_ms()))
        }
    }
}

fn ls_table(nodes: &[NodeView], now: i64) -> String {
    if nodes.is_empty() {
        return "No nodes have connected yet. Start an agent with a certificate from `flotctl cert issue --node ID`."
            .to_owned();
    }
    let mut t = output::table(&["NODE", "STATE", "GPUS", "UTIL", "MAX TEMP", "VRAM USED/TOTAL", "LAST SEEN"]);
    for n in nodes {
        t.add_row(vec![
            n.id.clone(),
            n.state.clone(),
            n.gpus.len().to_string(),
            percent(n.mean_gpu_utilization_ratio),
            celsius(n.max_gpu_temperature_celsius),
            format!("{} / {}", bytes(n.gpu_memory_used_bytes), bytes(n.gpu_memory_total_bytes)),
            ago(n.last_seen_unix_ms, now),
        ]);
    }
    t.to_string()
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
    }
    out
}
