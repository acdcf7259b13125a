//! Which nodes, and which tensor-parallel sizes on them, can hold a model: the
//! per-GPU need of [`MemoryEstimate::per_gpu`] against each GPU's memory.

use serde::Serialize;

use super::memory::MemoryEstimate;
use super::{CapacityError, Shortfall, within};

/// One GPU's memory, from a node's inventory and latest sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuMemory {
    pub index: u32,
    pub total_bytes: u64,
    /// In use now; `None` when the node has not reported a sample.
    pub used_bytes: Option<u64>,
}

/// A node and its GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeGpus {
    pub node: String,
    pub gpus: Vec<GpuMemory>,
}

/// One tensor-parallel size on one node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    pub tensor_parallel: u32,
    pub per_gpu_bytes: u64,
    /// Enough memory is free on `tensor_parallel` of the node's GPUs now.
    pub fits_now: bool,
    /// It would fit if those GPUs were empty.
    pub fits_if_empty: bool,
    /// The GPUs it would use now (the ones with the most free memory), when it fits now.
    pub gpus: Vec<u32>,
    /// The smallest budget among the GPUs picked if they were empty.
    pub budget_if_empty_bytes: u64,
}

/// What one node can do for the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeFit {
    pub node: String,
    pub gpu_count: u32,
    /// Every tensor-parallel size the node and the model's heads allow, smallest first.
    pub placements: Vec<Placement>,
}

impl NodeFit {
    /// The smallest tensor-parallel size that fits now, if any.
    pub fn best_now(&self) -> Option<&Placement> {
        self.placements.iter().find(|p| p.fits_now)
    }

    /// The smallest tensor-parallel size that would fit on empty GPUs, if any.
    pub fn best_if_empty(&self) -> Option<&Placement> {
        self.placements.iter().find(|p| p.fits_if_empty)
    }
}

/// Fits the model onto each node's GPUs at every power-of-two tensor-parallel size up to
/// the node's GPU count that the heads allow. A GPU's budget is `utilization` × its memory
/// (vLLM's `gpu_memory_utilization`); now, it is also capped by what is free, since a
/// server cannot take memory another process holds. A GPU whose use is unknown (no
/// sample yet) counts as empty. GPU topology (NVLink islands) is not considered.
///
/// Fails when there are no GPUs, or when nothing fits even on empty GPUs, naming the
/// largest GPU set and the shortfall.
pub fn fit(estimate: &MemoryEstimate, nodes: &[NodeGpus], utilization: f64) -> Result<Vec<NodeFit>, CapacityError> {
    let utilization = gpu_memory_utilization(utilization)?;
    let mut out = Vec::new();
    // The largest set that falls short, for the error: (aggregate budget, node, tp, need, offer, gpu memory).
    let mut largest: Option<(f64, String, u32, u64, u64, u64)> = None;
    let mut any_gpu = false;
    for node in nodes {
        let gpus: Vec<&GpuMemory> = node.gpus.iter().filter(|g| g.total_bytes > 0).collect();
        any_gpu |= !gpus.is_empty();
        let budget_empty = |g: &GpuMemory| g.total_bytes as f64 * utilization;
        let budget_now = |g: &GpuMemory| {
            let free = g.total_bytes.saturating_sub(g.used_bytes.unwrap_or(0)) as f64;
            budget_empty(g).min(free)
        };
        let mut placements = Vec::new();
        let mut tp: u32 = 1;
        while (tp as usize) <= gpus.len() {
            if estimate.unsupported_reason(tp).is_none() {
                let need = estimate.per_gpu(tp)?.per_gpu_bytes;
                let (now_gpus, now_min) = pick(&gpus, tp, budget_now);
                let (empty_gpus, empty_min) = pick(&gpus, tp, budget_empty);
                let fits_now = now_min >= need as f64;
                let fits_if_empty = empty_min >= need as f64;
                if !fits_if_empty {
                    let aggregate = empty_min * f64::from(tp);
                    if largest.as_ref().is_none_or(|l| aggregate > l.0) {
                        let memory = empty_gpus
                            .iter()
                            .filter_map(|i| gpus.iter().find(|g| g.index == *i))
                            .map(|g| g.total_bytes)
                            .min()
                            .unwrap_or(0);
                        largest = Some((aggregate, node.node.clone(), tp, need, empty_min as u64, memory));
                    }
                }
                placements.push(Placement {
                    tensor_parallel: tp,
                    per_gpu_bytes: need,
                    fits_now,
                    fits_if_empty,
                    gpus: if fits_now { now_gpus } else { Vec::new() },
                    budget_if_empty_bytes: empty_min as u64,
                });
            }
            tp = match tp.checked_mul(2) {
                Some(next) => next,
                None => break,
            };
        }
        out.push(NodeFit { node: node.node.clone(), gpu_count: gpus.len() as u32, placements });
    }
    if !any_gpu {
        return Err(CapacityError::NoGpus);
    }
    let fits_somewhere = out.iter().any(|n| n.best_if_empty().is_some());
    match largest {
        Some((_, node, tp, need, offer, memory)) if !fits_somewhere => {
            Err(CapacityError::DoesNotFit(Box::new(Shortfall {
                node,
                tp,
                gpu_memory_bytes: memory,
                need_bytes: need,
                offer_bytes: offer,
                utilization,
            })))
        }
        _ => Ok(out),
    }
}

/// Checks a `gpu_memory_utilization`: a share of a GPU's memory, in (0, 1].
pub fn gpu_memory_utilization(v: f64) -> Result<f64, CapacityError> {
    within("gpu_memory_utilization", v, 0.0, 1.0, true, "in (0, 1]")
}

/// The `tp` GPUs with the largest budgets (indices ascending) and the smallest budget among them.
fn pick(gpus: &[&GpuMemory], tp: u32, budget: impl Fn(&GpuMemory) -> f64) -> (Vec<u32>, f64) {
    let mut ranked: Vec<(f64, u32)> = gpus.iter().map(|g| (budget(g), g.index)).collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.truncate(tp as usize);
    let min = ranked.iter().map(|r| r.0).fold(f64::INFINITY, f64::min);
    let mut indices: Vec<u32> = ranked.into_iter().map(|r| r.1).collect();
    indices.sort_unstable();
    (indices, if min.is_finite() { min } else { 0.0 })
}

#[cfg(test)]
mod tests {
    use super::super::memory::{Dtype, MemoryInput, estimate};
    use super::super::model::ModelShape;
    use super::*;

    const GIB: u64 = 1024 * 1024 * 1024;

    fn node(name: &str, count: u32, total_gib: u64, used_gib: Option<u64>) -> NodeGpus {
        NodeGpus {
            node: name.to_owned(),
            gpus: (0..count)
                .map(|index| GpuMemory { index, total_bytes: total_gib * GIB, used_bytes: used_gib.map(|u| u * GIB) })
                .collect(),
        }
    }

    fn llama_70b() -> MemoryEstimate {
        let shape = ModelShape::new(70.6e9, 80, 8, 128, Some(64)).unwrap();
        estimate(&MemoryInput { shape, dtype: Dtype::Bf16, kv_dtype: None, context_length: 8192, concurrency: 16 })
            .unwrap()
    }

    #[test]
    fn a_70b_model_needs_four_80_gib_gpus() {
        // 141 GB of weights + 40 GiB of cache + overhead: 2 × 80 GiB at 0.9 is too little, 4 is enough.
        let fits = fit(&llama_70b(), &[node("h100", 8, 80, Some(1))], 0.9).unwrap();
        let tps: Vec<(u32, bool)> = fits[0].placements.iter().map(|p| (p.tensor_parallel, p.fits_now)).collect();
        assert_eq!(tps, vec![(1, false), (2, false), (4, true), (8, true)]);
        assert_eq!(fits[0].best_now().unwrap().gpus, vec![0, 1, 2, 3]);
    }

    #[test]
    fn busy_gpus_fit_only_if_empty_and_the_freest_are_picked() {
        let mut n = node("a100", 4, 80, Some(75));
        n.gpus[2].used_bytes = Some(0);
        n.gpus[3].used_bytes = None;
        let shape = ModelShape::new(8.03e9, 32, 8, 128, Some(32)).unwrap();
        let e =
            estimate(&MemoryInput { shape, dtype: Dtype::Bf16, kv_dtype: None, context_length: 8192, concurrency: 16 })
                .unwrap();
        let fits = fit(&e, &[n], 0.9).unwrap();
        let p = &fits[0].placements;
        assert!(p[0].fits_now && p[0].gpus == vec![2], "{p:?}");
        assert!(p[1].fits_now && p[1].gpus == vec![2, 3], "{p:?}");
        assert!(!p[2].fits_now && p[2].fits_if_empty, "{p:?}");
    }

    #[test]
    fn too_big_for_every_set_names_the_largest_and_the_shortfall() {
        let err = fit(&llama_70b(), &[node("small", 2, 24, None), node("mid", 4, 24, None)], 0.9).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("4 × 24.0 GiB on node mid"), "{text}");
        assert!(text.contains("short by"), "{text}");
        assert!(matches!(err, CapacityError::DoesNotFit(s) if s.tp == 4));
    }

    #[test]
    fn sizes_the_heads_cannot_split_are_skipped() {
        // 20 attention heads do not split over 8 GPUs (4 KV heads could be replicated).
        let shape = ModelShape::new(1e9, 16, 4, 128, Some(20)).unwrap();
        let e =
            estimate(&MemoryInput { shape, dtype: Dtype::Bf16, kv_dtype: None, context_length: 1024, concurrency: 1 })
                .unwrap();
        let fits = fit(&e, &[node("n", 8, 80, None)], 0.9).unwrap();
        let tps: Vec<u32> = fits[0].placements.iter().map(|p| p.tensor_parallel).collect();
        assert_eq!(tps, vec![1, 2, 4]);
    }

    #[test]
    fn no_gpus_and_bad_utilisation_are_refused() {
        assert_eq!(fit(&llama_70b(), &[], 0.9), Err(CapacityError::NoGpus));
        assert_eq!(fit(&llama_70b(), &[node("cpu", 0, 0, None)], 0.9), Err(CapacityError::NoGpus));
        for bad in [0.0, 1.1, f64::NAN] {
            assert!(fit(&llama_70b(), &[node("n", 1, 80, None)], bad).unwrap_err().to_string().contains("gpu_memory"));
        }
    }
}
