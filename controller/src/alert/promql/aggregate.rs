//! Aggregation operators (`sum`, `avg`, `min`, `max`, `count`, `group`,
//! `stddev`, `stdvar`, `topk`, `bottomk`) with `by`/`without`, following
//! Prometheus' `aggregation`: the same update order, so the same floats.

use std::collections::HashMap;
use std::sync::Arc;

use super::EvalError;
use super::compile::{AggOp, Aggregate, Grouping};
use super::eval::{Ctx, Elem, signature};
use crate::alert::window::{LabelSet, NAME_LABEL};

/// The running state of one group.
struct Group<'w> {
    name: Option<&'w str>,
    labels: LabelSet,
    value: f64,
    mean: f64,
    count: u64,
    /// topk/bottomk: a binary heap with the element to evict next on top.
    heap: Vec<Elem<'w>>,
}

impl<'w> Ctx<'w> {
    pub(super) fn aggregate(&self, a: &Aggregate) -> Result<Vec<Elem<'w>>, EvalError> {
        let param = a.param.as_ref().map(|p| self.scalar(p)).transpose()?;
        let input = self.vector(&a.inner)?;
        let mut k = 0usize;
        if matches!(a.op, AggOp::Topk | AggOp::Bottomk) {
            let p = param.unwrap_or(f64::NAN);
            // As Prometheus: a k outside int64 is an error, below 1 gives nothing.
            if !(p >= i64::MIN as f64 && p <= i64::MAX as f64) {
                return Err(EvalError::ParamOverflow { op: op_name(a.op), value: p });
            }
            let p = p as i64;
            if p < 1 {
                return Ok(Vec::new());
            }
            k = usize::try_from(p).unwrap_or(usize::MAX);
        }
        let (on, names) = match &a.grouping {
            Grouping::By(names) => (true, names),
            Grouping::Without(names) => (false, names),
        };
        let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut groups: Vec<Group<'w>> = Vec::new();
        let mut key = Vec::new();
        for e in input {
            key.clear();
            signature(&e, on, names, &mut key);
            let Some(g) = index.get(&key).and_then(|&i| groups.get_mut(i)) else {
                index.insert(key.clone(), groups.len());
                groups.push(new_group(a.op, on, names, e));
                continue;
            };
            let v = e.value;
            match a.op {
                AggOp::Sum => g.value += v,
                AggOp::Avg => {
                    g.count += 1;
                    let n = g.count as f64;
                    // An infinite mean stays unless a NaN or the other infinity arrives.
                    let keeps_infinite = g.mean.is_infinite()
                        && ((v.is_infinite() && (g.mean > 0.0) == (v > 0.0)) || (!v.is_infinite() && !v.is_nan()));
                    if !keeps_infinite {
                        g.mean += v / n - g.mean / n;
                    }
                }
                AggOp::Group => {}
                AggOp::Max => {
                    if g.value < v || g.value.is_nan() {
                        g.value = v;
                    }
                }
                AggOp::Min => {
                    if g.value > v || g.value.is_nan() {
                        g.value = v;
                    }
                }
                AggOp::Count => g.count += 1,
                AggOp::Stddev | AggOp::Stdvar => {
                    g.count += 1;
                    let delta = v - g.mean;
                    g.mean += delta / g.count as f64;
                    g.value += delta * (v - g.mean);
                }
                AggOp::Topk | AggOp::Bottomk => {
                    let top = a.op == AggOp::Topk;
                    let evict = |h: &Elem<'_>| h.value.is_nan() || if top { h.value < v } else { h.value > v };
                    if g.heap.len() < k || g.heap.first().is_some_and(evict) {
                        if g.heap.len() == k {
                            if k == 1 {
                                if let Some(slot) = g.heap.first_mut() {
                                    *slot = e;
                                }
                                continue;
                            }
                            heap_pop(&mut g.heap, top);
                        }
                        heap_push(&mut g.heap, e, top);
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            let value = match a.op {
                AggOp::Avg => g.mean,
                AggOp::Count => g.count as f64,
                AggOp::Stdvar => g.value / g.count as f64,
                AggOp::Stddev => (g.value / g.count as f64).sqrt(),
                AggOp::Topk | AggOp::Bottomk => {
                    out.extend(g.heap);
                    continue;
                }
                AggOp::Sum | AggOp::Min | AggOp::Max | AggOp::Group => g.value,
            };
            out.push(Elem { name: g.name, labels: g.labels, value });
        }
        Ok(out)
    }
}

/// A group started by its first element `e`.
fn new_group<'w>(op: AggOp, by: bool, names: &[String], e: Elem<'w>) -> Group<'w> {
    let listed = |k: &str| names.iter().any(|n| n == k);
    let (name, labels): (Option<&'w str>, LabelSet) = if by {
        let name = if listed(NAME_LABEL) { e.name } else { None };
        (name, e.labels.iter().filter(|(k, _)| listed(k)).cloned().collect())
    } else if e.labels.iter().any(|(k, _)| listed(k)) {
        (None, e.labels.iter().filter(|(k, _)| !listed(k)).cloned().collect())
    } else {
        (None, Arc::clone(&e.labels))
    };
    let v = e.value;
    let value = match op {
        AggOp::Stddev | AggOp::Stdvar => 0.0,
        AggOp::Group => 1.0,
        _ => v,
    };
    let heap = if matches!(op, AggOp::Topk | AggOp::Bottomk) { vec![e] } else { Vec::new() };
    Group { name, labels, value, mean: v, count: 1, heap }
}

fn op_name(op: AggOp) -> &'static str {
    match op {
        AggOp::Topk => "topk",
        AggOp::Bottomk => "bottomk",
        _ => "aggregation",
    }
}

/// Go's `vectorByValueHeap` order (topk: the smallest on top) or its reverse
/// (bottomk: the largest on top); NaN always comes first, to be evicted first.
fn less(a: &Elem<'_>, b: &Elem<'_>, top: bool) -> bool {
    if a.value.is_nan() {
        return true;
    }
    if top { a.value < b.value } else { a.value > b.value }
}

/// `container/heap.Push`, step for step, so ties resolve as in Prometheus.
fn heap_push<'w>(h: &mut Vec<Elem<'w>>, e: Elem<'w>, top: bool) {
    h.push(e);
    let mut j = h.len() - 1;
    while j > 0 {
        let i = (j - 1) / 2;
        if !less(&h[j], &h[i], top) {
            break;
        }
        h.swap(i, j);
        j = i;
    }
}

/// `container/heap.Pop`, step for step.
fn heap_pop(h: &mut Vec<Elem<'_>>, top: bool) {
    let Some(n) = h.len().checked_sub(1) else {
        return;
    };
    h.swap(0, n);
    let mut i = 0;
    loop {
        let j1 = 2 * i + 1;
        if j1 >= n {
            break;
        }
        let mut j = j1;
        if j1 + 1 < n && less(&h[j1 + 1], &h[j1], top) {
            j = j1 + 1;
        }
        if !less(&h[j], &h[i], top) {
            break;
        }
        h.swap(i, j);
        i = j;
    }
    h.pop();
}
