//! `flotctl capacity fit`: a model's GPU memory (weights, KV cache, overhead) per
//! tensor-parallel size, and which live nodes can host it (`Fleet.ListNodes`).

use std::path::Path;

use anyhow::Context as _;
use flotilla_common::capacity::memory::{RUNTIME_FIXED_BYTES_PER_GPU, RUNTIME_WEIGHT_SHARE};
use flotilla_common::capacity::{
    self, CapacityError, Dtype, GpuMemory, MemoryEstimate, MemoryInput, ModelShape, NodeFit, NodeGpus, ParamsSource,
    TpNeed,
};
use flotilla_proto::pb;
use serde::Serialize;

use super::{SHOWN_TP_SIZES, optional, usage};
use crate::UsageError;
use crate::cli::{CapacityFitArgs, ConnArgs, DtypeArg};
use crate::output::{self, bytes};

/// `capacity fit` as `-o json` prints it.
#[derive(Debug, Serialize)]
struct FitView {
    model: ModelShape,
    memory: MemoryEstimate,
    gpu_memory_utilization: f64,
    /// Per-GPU needs at the usual tensor-parallel sizes.
    tensor_parallel: Vec<TpRow>,
    /// Why there is no fleet fit, when there is none.
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    /// Per node, from the live inventory; absent without a controller.
    #[serde(skip_serializing_if = "Option::is_none")]
    nodes: Option<Vec<NodeFitView>>,
    /// Nodes left out because they cannot take new work (down, cordoned, draining).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    skipped_nodes: Vec<String>,
    /// Why nothing in the fleet can host the model, when nothing can.
    #[serde(skip_serializing_if = "Option::is_none")]
    fit_error: Option<String>,
}

/// One tensor-parallel size's need, and the GPU memory that covers it at the utilisation cap.
#[derive(Debug, Serialize)]
struct TpRow {
    #[serde(flatten)]
    need: TpNeed,
    min_gpu_memory_bytes: u64,
}

/// One node's fit, with its GPUs' memory for people to see why.
#[derive(Debug, Serialize)]
struct NodeFitView {
    #[serde(flatten)]
    fit: NodeFit,
    gpu_memory_total_bytes: Vec<u64>,
}

fn dtype(d: DtypeArg) -> Dtype {
    match d {
        DtypeArg::Fp32 => Dtype::Fp32,
        DtypeArg::Bf16 => Dtype::Bf16,
        DtypeArg::Fp16 => Dtype::Fp16,
        DtypeArg::Fp8 => Dtype::Fp8,
        DtypeArg::Int8 => Dtype::Int8,
        DtypeArg::Int4 => Dtype::Int4,
        DtypeArg::Awq => Dtype::Awq,
        DtypeArg::Gptq => Dtype::Gptq,
    }
}

/// The model's shape from --model-config or the explicit sizes.
fn shape(args: &CapacityFitArgs) -> anyhow::Result<ModelShape> {
    let params = args.params.as_deref().map(|p| capacity::parse_count("params", p)).transpose().map_err(usage)?;
    if let Some(path) = &args.model_config {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        return ModelShape::from_hf_config(&text, params)
            .map_err(|e| UsageError(format!("{}: {e}", path.display())).into());
    }
    // clap requires these without --model-config; this is for a caller that built the args by hand.
    let (Some(params), Some(layers), Some(kv_heads), Some(head_dim)) =
        (params, args.layers, args.kv_heads, args.head_dim)
    else {
        return Err(
            UsageError("pass --model-config PATH, or --params, --layers, --kv-heads and --head-dim".into()).into()
        );
    };
    ModelShape::new(params, layers, kv_heads, head_dim, args.attention_heads).map_err(usage)
}

pub(super) async fn run(args: CapacityFitArgs, conn: &ConnArgs, config_path: &Path) -> anyhow::Result<()> {
    let shape = shape(&args)?;
    let utilization = capacity::gpu_memory_utilization(args.gpu_memory_utilization).map_err(usage)?;
    let input = MemoryInput {
        // The checkpoint's own type unless told otherwise: an AWQ config.json means AWQ weights.
        dtype: args.dtype.map(dtype).or(shape.config_dtype).unwrap_or(Dtype::Bf16),
        kv_dtype: args.kv_dtype.map(dtype),
        context_length: args.context_length,
        concurrency: args.concurrency,
        shape,
    };
    let estimate = capacity::estimate(&input).map_err(usage)?;
    let nodes = optional(conn, config_path, "ListNodes", |mut c| async move {
        c.list_nodes(pb::ListNodesRequest {}).await.map(tonic::Response::into_inner)
    })
    .await;
    let view = fit_view(input.shape, estimate, utilization, nodes.map(|r| r.nodes))?;
    output::print(args.output, &view, fit_text)?;
    match view.fit_error {
        // The report is printed; the exit status says the answer is no.
        Some(e) => Err(anyhow::anyhow!(e)),
        None => Ok(()),
    }
}

fn fit_view(
    model: ModelShape,
    memory: MemoryEstimate,
    utilization: f64,
    nodes: Result<Vec<pb::Node>, String>,
) -> anyhow::Result<FitView> {
    let tensor_parallel = SHOWN_TP_SIZES
        .iter()
        .map(|&tp| {
            let need = memory.per_gpu(tp)?;
            let min_gpu_memory_bytes = (need.per_gpu_bytes as f64 / utilization).ceil() as u64;
            Ok(TpRow { need, min_gpu_memory_bytes })
        })
        .collect::<Result<Vec<_>, CapacityError>>()?;
    let mut view = FitView {
        model,
        memory,
        gpu_memory_utilization: utilization,
        tensor_parallel,
        note: None,
        nodes: None,
        skipped_nodes: Vec::new(),
        fit_error: None,
    };
    match nodes {
        Err(note) => view.note = Some(note),
        Ok(nodes) => {
            let (gpus, skipped) = node_gpus(nodes);
            view.skipped_nodes = skipped;
            match capacity::fit(&view.memory, &gpus, utilization) {
                Ok(fits) => {
                    let views = fits
                        .into_iter()
                        .map(|fit| {
                            let memory = gpus
                                .iter()
                                .find(|n| n.node == fit.node)
                                .map(|n| n.gpus.iter().map(|g| g.total_bytes).collect())
                                .unwrap_or_default();
                            NodeFitView { fit, gpu_memory_total_bytes: memory }
                        })
                        .collect();
                    view.nodes = Some(views);
                }
                Err(CapacityError::NoGpus) => view.note = Some(CapacityError::NoGpus.to_string()),
                Err(e) => view.fit_error = Some(e.to_string()),
            }
        }
    }
    Ok(view)
}

/// The GPUs of the nodes that can take new work: each GPU's memory from its latest sample
/// when there is one (it is what the driver reports now), else from the inventory.
fn node_gpus(nodes: Vec<pb::Node>) -> (Vec<NodeGpus>, Vec<String>) {
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for node in nodes {
        let state = pb::NodeState::try_from(node.state).unwrap_or(pb::NodeState::Unspecified);
        let why = match state {
            pb::NodeState::Down => Some("down"),
            pb::NodeState::Cordoned => Some("cordoned"),
            pb::NodeState::Draining => Some("draining"),
            pb::NodeState::Revoked => Some("revoked"),
            _ => None,
        };
        if let Some(why) = why {
            skipped.push(format!("{} ({why})", node.id));
            continue;
        }
        let latest = node.latest.unwrap_or_default();
        let gpus = node
            .inventory
            .unwrap_or_default()
            .gpus
            .iter()
            .map(|g| {
                let sample = latest.gpus.iter().find(|s| s.index == g.index);
                GpuMemory {
                    index: g.index,
                    total_bytes: sample.and_then(|s| s.memory_total_bytes).unwrap_or(g.memory_total_bytes),
                    used_bytes: sample.and_then(|s| s.memory_used_bytes),
                }
            })
            .collect();
        out.push(NodeGpus { node: node.id, gpus });
    }
    (out, skipped)
}

fn fit_text(v: &FitView) -> String {
    let m = &v.model;
    let e = &v.memory;
    let source = match m.params_source {
        ParamsSource::Given => "given",
        ParamsSource::Estimated => "estimated from config.json",
    };
    let heads = m.attention_heads.map_or_else(String::new, |h| format!(", {h} attention heads"));
    let mut out = format!(
        "Model:     {:.2}B parameters ({source}), {} layers, {} KV heads × {}{heads}\n\
         Weights:   {}  ({}: {} per parameter)\n\
         KV cache:  {}  ({}: {} a token × {} tokens × {} sequences)\n\
         Overhead:  {}  ({} + {:.0} % of the weights, per GPU)\n\
         Total:     {}  on one GPU\n",
        m.params / 1e9,
        m.layers,
        m.kv_heads,
        m.head_dim,
        bytes(e.weights_bytes),
        e.dtype,
        match e.bytes_per_param {
            1.0 => "1 byte".to_owned(),
            b => format!("{} bytes", output::number(Some(b))),
        },
        bytes(e.kv_cache_bytes),
        e.kv_dtype,
        bytes(e.kv_cache_bytes_per_token),
        e.context_length,
        e.concurrency,
        bytes(e.overhead_bytes),
        bytes(RUNTIME_FIXED_BYTES_PER_GPU as u64),
        RUNTIME_WEIGHT_SHARE * 100.0,
        bytes(e.total_bytes),
    );
    for n in &m.notes {
        out.push_str(&format!("note: {n}\n"));
    }
    let util = output::number(Some(v.gpu_memory_utilization));
    let mut t = output::table(&[
        "TP",
        "WEIGHTS/GPU",
        "KV CACHE/GPU",
        "OVERHEAD/GPU",
        "NEED/GPU",
        &format!("MIN GPU AT {util}"),
    ]);
    for r in &v.tensor_parallel {
        let n = &r.need;
        if let Some(why) = &n.unsupported_reason {
            t.add_row(vec![n.tensor_parallel.to_string(), format!("- ({why})")]);
            continue;
        }
        t.add_row(vec![
            n.tensor_parallel.to_string(),
            bytes(n.weights_bytes_per_gpu),
            bytes(n.kv_cache_bytes_per_gpu),
            bytes(n.overhead_bytes_per_gpu),
            bytes(n.per_gpu_bytes),
            format!("≥ {}", bytes(r.min_gpu_memory_bytes)),
        ]);
    }
    out.push('\n');
    out.push_str(&t.to_string());
    out.push_str("\n\n");
    if let Some(nodes) = &v.nodes {
        out.push_str(&nodes_table(nodes));
        out.push('\n');
    }
    if let Some(note) = &v.note {
        out.push_str(note);
        out.push('\n');
    }
    if !v.skipped_nodes.is_empty() {
        out.push_str(&format!("skipped: {}\n", v.skipped_nodes.join(", ")));
    }
    out.trim_end().to_owned()
}

fn nodes_table(nodes: &[NodeFitView]) -> String {
    let mut t = output::table(&["NODE", "GPUS", "FITS NOW", "ONLY IF EMPTY"]);
    for n in nodes {
        let memory = &n.gpu_memory_total_bytes;
        let gpus = match (memory.iter().min(), memory.iter().max()) {
            (Some(lo), Some(hi)) if lo == hi => format!("{} × {}", memory.len(), bytes(*lo)),
            (Some(lo), Some(hi)) => format!("{} × {}-{}", memory.len(), bytes(*lo), bytes(*hi)),
            _ => "none".to_owned(),
        };
        let now: Vec<String> = n
            .fit
            .placements
            .iter()
            .filter(|p| p.fits_now)
            .map(|p| {
                let list: Vec<String> = p.gpus.iter().map(u32::to_string).collect();
                let word = if p.gpus.len() == 1 { "GPU" } else { "GPUs" };
                format!("TP {} ({word} {})", p.tensor_parallel, list.join(","))
            })
            .collect();
        let empty: Vec<String> = n
            .fit
            .placements
            .iter()
            .filter(|p| p.fits_if_empty && !p.fits_now)
            .map(|p| format!("TP {}", p.tensor_parallel))
            .collect();
        let or_no = |v: Vec<String>| if v.is_empty() { "no".to_owned() } else { v.join(", ") };
        t.add_row(vec![n.fit.node.clone(), gpus, or_no(now), or_no(empty)]);
    }
    t.to_string()
}

#[cfg(test)]
mod tests {
    use super::super::CALCULATION_ONLY;
    use super::*;

    fn llama_8b() -> (ModelShape, MemoryEstimate) {
        let shape = ModelShape::new(8.03e9, 32, 8, 128, Some(32)).unwrap();
        let input = MemoryInput { shape, dtype: Dtype::Bf16, kv_dtype: None, context_length: 8192, concurrency: 16 };
        let e = capacity::estimate(&input).unwrap();
        (input.shape, e)
    }

    fn wire_node(id: &str, state: pb::NodeState, gpus: &[(u64, Option<u64>)]) -> pb::Node {
        const GIB: u64 = 1 << 30;
        pb::Node {
            id: id.to_owned(),
            state: state as i32,
            inventory: Some(pb::Inventory {
                gpus: (0..gpus.len() as u32)
                    .map(|index| pb::GpuInfo {
                        index,
                        memory_total_bytes: gpus[index as usize].0 * GIB,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            latest: Some(pb::TelemetryBatch {
                gpus: gpus
                    .iter()
                    .enumerate()
                    .map(|(i, (_, used))| pb::GpuSample {
                        index: i as u32,
                        memory_used_bytes: used.map(|u| u * GIB),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn fit_without_a_controller_shows_the_sizes_only() {
        let (shape, e) = llama_8b();
        let v = fit_view(shape, e, 0.9, Err(format!("{CALCULATION_ONLY} (no controller configured)"))).unwrap();
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["memory"]["kv_cache_bytes_per_token"], 131_072);
        assert_eq!(json["tensor_parallel"].as_array().unwrap().len(), 4);
        assert_eq!(json["tensor_parallel"][1]["tensor_parallel"], 2);
        assert!(json.get("nodes").is_none());
        let text = fit_text(&v);
        assert!(text.contains("KV cache:  16.0 GiB  (bf16: 128.0 KiB a token × 8192 tokens × 16 sequences)"), "{text}");
        assert!(text.contains("calculation only"), "{text}");
    }

    #[test]
    fn fit_against_the_fleet_lists_nodes_and_skips_unavailable_ones() {
        let (shape, e) = llama_8b();
        let nodes = vec![
            wire_node("busy", pb::NodeState::Up, &[(80, Some(75)), (80, Some(75))]),
            wire_node("free", pb::NodeState::Up, &[(80, Some(1)), (80, None)]),
            wire_node("gone", pb::NodeState::Down, &[(80, None)]),
        ];
        let v = fit_view(shape, e, 0.9, Ok(nodes)).unwrap();
        assert_eq!(v.skipped_nodes, ["gone (down)"]);
        let text = fit_text(&v);
        let busy = text.lines().find(|l| l.trim_start().starts_with("busy")).unwrap();
        assert!(busy.contains("2 × 80.0 GiB") && busy.contains("no") && busy.contains("TP 1, TP 2"), "{busy}");
        let free = text.lines().find(|l| l.trim_start().starts_with("free")).unwrap();
        assert!(free.contains("TP 1 (GPU 0), TP 2 (GPUs 0,1)"), "{free}");
        assert!(text.contains("skipped: gone (down)"), "{text}");
    }

    #[test]
    fn fit_says_when_nothing_can_host_the_model() {
        let (shape, e) = llama_8b();
        let v = fit_view(shape, e, 0.9, Ok(vec![wire_node("tiny", pb::NodeState::Up, &[(16, None)])])).unwrap();
        assert!(v.fit_error.as_deref().unwrap().contains("short by"), "{:?}", v.fit_error);
        let v = fit_view(llama_8b().0, llama_8b().1, 0.9, Ok(vec![wire_node("cpu", pb::NodeState::Up, &[])])).unwrap();
        assert!(v.note.unwrap().contains("no GPUs"));
    }
}
