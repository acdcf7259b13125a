//! Binary operators: arithmetic, comparisons (filtering or `bool`), set
//! operators and vector matching, following Prometheus' `VectorBinop`,
//! `VectorscalarBinop`, `VectorAnd`/`Or`/`Unless` and `resultMetric`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::EvalError;
use super::compile::{BinOp, Binary, Card};
use super::eval::{Ctx, Elem, Value, check_unique, label, render, signature};
use super::functions;
use crate::alert::window::{Label, NAME_LABEL};

impl<'w> Ctx<'w> {
    pub(super) fn binary(&self, b: &Binary) -> Result<Value<'w>, EvalError> {
        let lhs = self.eval(&b.lhs)?;
        let rhs = self.eval(&b.rhs)?;
        let out = match (lhs, rhs) {
            (Value::Scalar(l), Value::Scalar(r)) => {
                let (value, keep) = apply(b.op, l, r);
                return Ok(Value::Scalar(if b.op.is_comparison() { as_bool(keep) } else { value }));
            }
            (Value::Vector(v), Value::Scalar(s)) => vector_scalar(b, v, s, false),
            (Value::Scalar(s), Value::Vector(v)) => vector_scalar(b, v, s, true),
            (Value::Vector(l), Value::Vector(r)) => match b.op {
                BinOp::And => set_filter(b, l, &r, true),
                BinOp::Unless => set_filter(b, l, &r, false),
                BinOp::Or => or(b, l, r),
                _ => vector_vector(b, l, r)?,
            },
        };
        check_unique(&out)?;
        Ok(Value::Vector(out))
    }
}

/// The result of `l op r` and, for comparisons, whether it holds
/// (Prometheus' `vectorElemBinop`; a comparison's value is the left operand).
fn apply(op: BinOp, l: f64, r: f64) -> (f64, bool) {
    match op {
        BinOp::Add => (l + r, true),
        BinOp::Sub => (l - r, true),
        BinOp::Mul => (l * r, true),
        BinOp::Div => (l / r, true),
        // Go's math.Mod and Rust's `%` are both C's fmod: the sign of `l`.
        BinOp::Mod => (l % r, true),
        BinOp::Pow => (functions::go_pow(l, r), true),
        BinOp::Eq => (l, l == r),
        BinOp::Ne => (l, l != r),
        BinOp::Gt => (l, l > r),
        BinOp::Lt => (l, l < r),
        BinOp::Ge => (l, l >= r),
        BinOp::Le => (l, l <= r),
        BinOp::And | BinOp::Or | BinOp::Unless => (f64::NAN, false),
    }
}

fn as_bool(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// Arithmetic results lose the metric name; comparisons keep it.
fn drops_name(op: BinOp) -> bool {
    !op.is_comparison() && !op.is_set()
}

/// A vector and a scalar; `swapped` when the scalar is on the left.
fn vector_scalar<'w>(b: &Binary, v: Vec<Elem<'w>>, s: f64, swapped: bool) -> Vec<Elem<'w>> {
    let mut out = Vec::with_capacity(v.len());
    for mut e in v {
        let (l, r) = if swapped { (s, e.value) } else { (e.value, s) };
        let (mut value, mut keep) = apply(b.op, l, r);
        // A comparison always yields the vector's value, whichever side it is on.
        if b.op.is_comparison() && swapped {
            value = r;
        }
        if b.return_bool {
            value = as_bool(keep);
            keep = true;
        }
        if keep {
            e.value = value;
            if drops_name(b.op) || b.return_bool {
                e.name = None;
            }
            out.push(e);
        }
    }
    out
}

/// The matching signature of `e` for `b`.
fn sig(b: &Binary, e: &Elem<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    signature(e, b.on, &b.matching, &mut out);
    out
}

/// `and` (`keep_matched`) and `unless` (`!keep_matched`): the left elements
/// with (without) a match on the right.
fn set_filter<'w>(b: &Binary, lhs: Vec<Elem<'w>>, rhs: &[Elem<'w>], keep_matched: bool) -> Vec<Elem<'w>> {
    let right: HashSet<Vec<u8>> = rhs.iter().map(|e| sig(b, e)).collect();
    lhs.into_iter().filter(|e| right.contains(&sig(b, e)) == keep_matched).collect()
}

/// `or`: every left element, and the right ones without a match on the left.
fn or<'w>(b: &Binary, mut lhs: Vec<Elem<'w>>, rhs: Vec<Elem<'w>>) -> Vec<Elem<'w>> {
    let left: HashSet<Vec<u8>> = lhs.iter().map(|e| sig(b, e)).collect();
    lhs.extend(rhs.into_iter().filter(|e| !left.contains(&sig(b, e))));
    lhs
}

/// The result label sets produced for one match group (many-to-one matching).
type ResultLabels<'w> = HashSet<(Option<&'w str>, Vec<Label>)>;

/// Arithmetic or comparison between two vectors, one-to-one or with
/// `group_left`/`group_right`.
fn vector_vector<'w>(b: &Binary, lhs: Vec<Elem<'w>>, rhs: Vec<Elem<'w>>) -> Result<Vec<Elem<'w>>, EvalError> {
    // Work as many-to-one: for group_right swap the sides, and swap back the
    // operands when computing values.
    let one_to_many = matches!(b.card, Card::OneToMany(_));
    let (many, one) = if one_to_many { (rhs, lhs) } else { (lhs, rhs) };
    let mut one_by_sig: HashMap<Vec<u8>, usize> = HashMap::with_capacity(one.len());
    for (i, e) in one.iter().enumerate() {
        let s = sig(b, e);
        if let Some(&j) = one_by_sig.get(&s) {
            return Err(EvalError::ManyToMany {
                group: match_group(b, e),
                side: if one_to_many { "left" } else { "right" },
                first: render(e.name, &e.labels),
                second: one.get(j).map_or_else(String::new, |d| render(d.name, &d.labels)),
            });
        }
        one_by_sig.insert(s, i);
    }
    let mut matched_one: HashSet<Vec<u8>> = HashSet::new();
    let mut matched_many: HashMap<Vec<u8>, ResultLabels<'w>> = HashMap::new();
    let mut out = Vec::new();
    for e in many {
        let s = sig(b, &e);
        let Some(r) = one_by_sig.get(&s).and_then(|&i| one.get(i)) else {
            continue;
        };
        let (vl, vr) = if one_to_many { (r.value, e.value) } else { (e.value, r.value) };
        let (mut value, keep) = apply(b.op, vl, vr);
        if b.return_bool {
            value = as_bool(keep);
        } else if !keep {
            continue;
        }
        let mut result = result_metric(b, &e, r);
        if b.return_bool {
            result.name = None;
        }
        result.value = value;
        if b.card == Card::OneToOne {
            if !matched_one.insert(s) {
                return Err(EvalError::OneToOneMultiple);
            }
        } else if !matched_many.entry(s).or_default().insert((result.name, result.labels.to_vec())) {
            return Err(EvalError::ManyToOneMultiple);
        }
        out.push(result);
    }
    Ok(out)
}

/// The labels of a matched pair's result (Prometheus' `resultMetric`): the
/// "many" (or left) side's, without the name for arithmetic; one-to-one
/// matching keeps only the `on` labels or drops the `ignoring` ones;
/// `group_x (...)` copies the listed labels from the "one" side.
fn result_metric<'w>(b: &Binary, many: &Elem<'w>, one: &Elem<'w>) -> Elem<'w> {
    let mut name = if drops_name(b.op) { None } else { many.name };
    let listed = |k: &str| b.matching.iter().any(|m| m == k);
    let mut labels: Option<Vec<Label>> = None;
    match &b.card {
        Card::OneToOne if b.on => {
            if !listed(NAME_LABEL) {
                name = None;
            }
            if many.labels.iter().any(|(k, _)| !listed(k)) {
                labels = Some(many.labels.iter().filter(|(k, _)| listed(k)).cloned().collect());
            }
        }
        Card::OneToOne => {
            if listed(NAME_LABEL) {
                name = None;
            }
            if many.labels.iter().any(|(k, _)| listed(k)) {
                labels = Some(many.labels.iter().filter(|(k, _)| !listed(k)).cloned().collect());
            }
        }
        Card::ManyToOne(include) | Card::OneToMany(include) => {
            let mut l = many.labels.to_vec();
            for k in include {
                let v = label(one, k);
                if k == NAME_LABEL {
                    name = (!v.is_empty()).then_some(one.name).flatten();
                    continue;
                }
                l.retain(|(n, _)| n != k);
                if !v.is_empty() {
                    l.push((k.clone(), v.to_owned()));
                }
            }
            l.sort();
            labels = Some(l);
        }
    }
    let labels = labels.map_or_else(|| Arc::clone(&many.labels), Into::into);
    Elem { name, labels, value: many.value }
}

/// The matching labels of `e`, for the many-to-many error.
fn match_group(b: &Binary, e: &Elem<'_>) -> String {
    let pairs: Vec<Label> = if b.on {
        b.matching.iter().map(|k| (k.clone(), label(e, k).to_owned())).filter(|(_, v)| !v.is_empty()).collect()
    } else {
        e.labels.iter().filter(|(k, _)| !b.matching.contains(k)).cloned().collect()
    };
    render(None, &pairs)
}
