//! Evaluates a compiled expression as an instant query over a [`Window`]:
//! selectors, functions and the helpers the operators share. Binary operators
//! are in `binary.rs`, aggregations in `aggregate.rs`.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::compile::{Func, Node, RangeSelector, Selector};
use super::functions::{self, Bucket, Point};
use super::{EvalError, Sample};
use crate::alert::window::{Family, Label, LabelSet, NAME_LABEL, Series, Window, is_stale};

/// How far back an instant selector looks for a series' latest sample.
pub(super) const LOOKBACK_MS: i64 = 5 * 60 * 1000;

/// One element of an instant vector. The metric name is kept apart from the
/// labels so dropping it (as most operations do) costs nothing.
#[derive(Debug, Clone)]
pub(super) struct Elem<'w> {
    pub(super) name: Option<&'w str>,
    pub(super) labels: LabelSet,
    pub(super) value: f64,
}

/// What a node evaluates to.
pub(super) enum Value<'w> {
    Scalar(f64),
    Vector(Vec<Elem<'w>>),
}

/// One evaluation: the window and the evaluation time.
pub(super) struct Ctx<'w> {
    pub(super) window: &'w Window,
    pub(super) t: i64,
}

impl<'w> Ctx<'w> {
    pub(super) fn eval(&self, node: &Node) -> Result<Value<'w>, EvalError> {
        match node {
            Node::Number(v) => Ok(Value::Scalar(*v)),
            Node::Instant(sel) => Ok(Value::Vector(self.instant(sel))),
            Node::Range(_) => Err(EvalError::Internal { what: "a range vector outside a function" }),
            Node::Call(func, args) => self.call(*func, args),
            Node::Aggregate(a) => self.aggregate(a).map(Value::Vector),
            Node::Negate(inner) => match self.eval(inner)? {
                Value::Scalar(v) => Ok(Value::Scalar(-v)),
                Value::Vector(mut vec) => {
                    for e in &mut vec {
                        e.name = None;
                        e.value = -e.value;
                    }
                    check_unique(&vec)?;
                    Ok(Value::Vector(vec))
                }
            },
            Node::Binary(b) => self.binary(b),
        }
    }

    pub(super) fn scalar(&self, node: &Node) -> Result<f64, EvalError> {
        match self.eval(node)? {
            Value::Scalar(v) => Ok(v),
            Value::Vector(_) => Err(EvalError::Internal { what: "a vector where a scalar was expected" }),
        }
    }

    pub(super) fn vector(&self, node: &Node) -> Result<Vec<Elem<'w>>, EvalError> {
        match self.eval(node)? {
            Value::Vector(v) => Ok(v),
            Value::Scalar(_) => Err(EvalError::Internal { what: "a scalar where a vector was expected" }),
        }
    }

    /// Calls `f` for every series `sel` selects, in Prometheus' order (by labels).
    fn for_each_series(&self, sel: &Selector, mut f: impl FnMut(&'w str, &'w LabelSet, &'w Series)) {
        let mut visit = |name: &'w str, family: &'w Family| {
            if sel.matches_name(name) {
                for (labels, series) in family.series() {
                    if sel.matches_labels(labels) {
                        f(name, labels, series);
                    }
                }
            }
        };
        match &sel.name {
            Some(name) => {
                if let Some((name, family)) = self.window.family(name) {
                    visit(name, family);
                }
            }
            None => {
                for (name, family) in self.window.families() {
                    visit(name, family);
                }
            }
        }
    }

    /// An instant vector selector: each series' newest sample no older than the lookback.
    fn instant(&self, sel: &Selector) -> Vec<Elem<'w>> {
        let at = self.t.saturating_sub(sel.offset_ms);
        let oldest = at.saturating_sub(LOOKBACK_MS);
        let mut out = Vec::new();
        self.for_each_series(sel, |name, labels, series| {
            if let Some((t, value)) = series.last_at(at)
                && t >= oldest
                && !is_stale(value)
            {
                out.push(Elem { name: Some(name), labels: Arc::clone(labels), value });
            }
        });
        if sel.name.is_none() {
            out.sort_by(compare);
        }
        out
    }

    fn call(&self, func: Func, args: &[Node]) -> Result<Value<'w>, EvalError> {
        let arg = |i: usize| args.get(i).ok_or(EvalError::Internal { what: "a missing function argument" });
        let out = match func {
            Func::Time => return Ok(Value::Scalar(self.t as f64 / 1000.0)),
            Func::Scalar => {
                let v = self.vector(arg(0)?)?;
                return Ok(Value::Scalar(if let [e] = v.as_slice() { e.value } else { f64::NAN }));
            }
            Func::Vector => vec![Elem { name: None, labels: no_labels(), value: self.scalar(arg(0)?)? }],
            Func::Abs => map_values(self.vector(arg(0)?)?, f64::abs),
            Func::ClampMin => {
                let (v, min) = (self.vector(arg(0)?)?, self.scalar(arg(1)?)?);
                map_values(v, |x| functions::go_max(min, x))
            }
            Func::ClampMax => {
                let (v, max) = (self.vector(arg(0)?)?, self.scalar(arg(1)?)?);
                map_values(v, |x| functions::go_min(max, x))
            }
            Func::Absent => {
                let node = arg(0)?;
                if self.vector(node)?.is_empty() {
                    let labels = match node {
                        Node::Instant(sel) => Arc::clone(&sel.absent_labels),
                        _ => no_labels(),
                    };
                    vec![Elem { name: None, labels, value: 1.0 }]
                } else {
                    Vec::new()
                }
            }
            Func::HistogramQuantile => self.histogram_quantile(self.scalar(arg(0)?)?, self.vector(arg(1)?)?),
            _ => self.range_call(func, args)?,
        };
        check_unique(&out)?;
        Ok(Value::Vector(out))
    }

    /// A function over a range vector, applied to each selected series.
    fn range_call(&self, func: Func, args: &[Node]) -> Result<Vec<Elem<'w>>, EvalError> {
        let (param, range) = match args {
            [Node::Range(r)] => (None, r),
            [p, Node::Range(r)] => (Some(self.scalar(p)?), r),
            _ => return Err(EvalError::Internal { what: "a function without its range argument" }),
        };
        let RangeSelector { selector, range_ms, range_secs } = range;
        let end = self.t.saturating_sub(selector.offset_ms);
        let start = end.saturating_sub(*range_ms);
        let mut points: Vec<Point> = Vec::new();
        let mut values: Vec<f64> = Vec::new();
        let mut out = Vec::new();
        self.for_each_series(selector, |name, labels, series| {
            points.clear();
            points.extend(series.range(start, end).filter(|&(_, v)| !is_stale(v)));
            if points.is_empty() {
                return;
            }
            let value = match func {
                Func::Rate => functions::extrapolated_rate(&points, start, end, *range_secs, true, true),
                Func::Increase => functions::extrapolated_rate(&points, start, end, *range_secs, true, false),
                Func::Delta => functions::extrapolated_rate(&points, start, end, *range_secs, false, false),
                Func::Irate => functions::instant_value(&points, true),
                Func::Idelta => functions::instant_value(&points, false),
                Func::AvgOverTime => Some(functions::avg_over_time(&points)),
                Func::MinOverTime => Some(functions::min_over_time(&points)),
                Func::MaxOverTime => Some(functions::max_over_time(&points)),
                Func::SumOverTime => Some(functions::sum_over_time(&points)),
                Func::CountOverTime => Some(points.len() as f64),
                Func::LastOverTime => points.last().map(|p| p.1),
                Func::StddevOverTime => Some(functions::stddev_over_time(&points)),
                Func::QuantileOverTime => {
                    values.clear();
                    values.extend(points.iter().map(|p| p.1));
                    Some(functions::quantile(param.unwrap_or(f64::NAN), &mut values))
                }
                _ => Some(1.0),
            };
            if let Some(value) = value {
                // last_over_time acts like an offset and keeps the name.
                let name = (func == Func::LastOverTime).then_some(name);
                out.push(Elem { name, labels: Arc::clone(labels), value });
            }
        });
        check_unique(&out)?;
        if func == Func::AbsentOverTime {
            return Ok(if out.is_empty() {
                vec![Elem { name: None, labels: Arc::clone(&selector.absent_labels), value: 1.0 }]
            } else {
                Vec::new()
            });
        }
        if selector.name.is_none() {
            out.sort_by(compare);
        }
        Ok(out)
    }

    /// `histogram_quantile`: buckets grouped by all labels but `le` (the name
    /// included), one result per group, named nothing and without `le`.
    fn histogram_quantile(&self, q: f64, v: Vec<Elem<'w>>) -> Vec<Elem<'w>> {
        let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut groups: Vec<(LabelSet, Vec<Bucket>)> = Vec::new();
        let mut key = Vec::new();
        for e in &v {
            let Some(upper) = parse_go_float(label(e, "le")) else {
                continue;
            };
            key.clear();
            key.extend_from_slice(e.name.unwrap_or("").as_bytes());
            key.push(0xff);
            signature(e, false, &["le".to_owned()], &mut key);
            let i = *index.entry(key.clone()).or_insert_with(|| {
                let labels: LabelSet = e.labels.iter().filter(|(k, _)| k != "le").cloned().collect();
                groups.push((labels, Vec::new()));
                groups.len() - 1
            });
            if let Some(g) = groups.get_mut(i) {
                g.1.push(Bucket { upper, count: e.value });
            }
        }
        groups
            .into_iter()
            .map(|(labels, mut buckets)| Elem {
                name: None,
                labels,
                value: functions::bucket_quantile(q, &mut buckets),
            })
            .collect()
    }
}

/// Applies `f` to every value, dropping the metric name.
fn map_values<'w>(mut v: Vec<Elem<'w>>, f: impl Fn(f64) -> f64) -> Vec<Elem<'w>> {
    for e in &mut v {
        e.name = None;
        e.value = f(e.value);
    }
    v
}

/// An empty label set.
pub(super) fn no_labels() -> LabelSet {
    Arc::from([])
}

/// The value of label `k` of `e` (`__name__` being the metric name), "" when absent.
pub(super) fn label<'a>(e: &'a Elem<'_>, k: &str) -> &'a str {
    if k == NAME_LABEL {
        return e.name.unwrap_or("");
    }
    e.labels.binary_search_by(|(n, _)| n.as_str().cmp(k)).map_or("", |i| e.labels[i].1.as_str())
}

/// Appends the matching signature of `e` to `out`: the listed labels (`on`) or
/// every label but the listed ones and the name (`ignoring`), as Prometheus'
/// `signatureFunc`. `names` is sorted.
pub(super) fn signature(e: &Elem<'_>, on: bool, names: &[String], out: &mut Vec<u8>) {
    let mut put = |k: &str, v: &str| {
        if !v.is_empty() {
            out.extend_from_slice(k.as_bytes());
            out.push(0xfe);
            out.extend_from_slice(v.as_bytes());
            out.push(0xff);
        }
    };
    if on {
        for k in names {
            put(k, label(e, k));
        }
    } else {
        for (k, v) in e.labels.iter() {
            if names.binary_search(k).is_err() {
                put(k, v);
            }
        }
    }
}

/// All labels of `e` in order, the name among them where it sorts.
pub(super) fn full_labels<'a>(name: Option<&'a str>, labels: &'a [Label]) -> impl Iterator<Item = (&'a str, &'a str)> {
    let split = labels.partition_point(|(k, _)| k.as_str() < NAME_LABEL);
    let (before, after) = labels.split_at(split);
    let pair = |(k, v): &'a Label| (k.as_str(), v.as_str());
    before.iter().map(pair).chain(name.map(|n| (NAME_LABEL, n))).chain(after.iter().map(pair))
}

/// Prometheus' order of label sets, the name included.
pub(super) fn compare(a: &Elem<'_>, b: &Elem<'_>) -> Ordering {
    full_labels(a.name, &a.labels).cmp(full_labels(b.name, &b.labels))
}

/// `name{a="b",...}` for messages.
pub(super) fn render(name: Option<&str>, labels: &[Label]) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{}{{{}}}", name.unwrap_or(""), pairs.join(", "))
}

/// Fails when two elements carry the same labels (after a name was dropped), as
/// Prometheus does.
pub(super) fn check_unique(v: &[Elem<'_>]) -> Result<(), EvalError> {
    if v.len() < 2 {
        return Ok(());
    }
    let mut seen: HashSet<(Option<&str>, &[Label])> = HashSet::with_capacity(v.len());
    for e in v {
        if !seen.insert((e.name, &e.labels)) {
            return Err(EvalError::DuplicateSeries { labels: render(e.name, &e.labels) });
        }
    }
    Ok(())
}

/// Parses a bucket bound as Go's `strconv.ParseFloat` does for the forms
/// Prometheus writes (decimal, exponent, `+Inf`).
fn parse_go_float(s: &str) -> Option<f64> {
    s.parse().ok()
}

/// Converts a result to samples: labels with the name where Prometheus keeps
/// it, sorted by labels; a scalar is one sample without labels.
pub(super) fn to_samples(value: Value<'_>) -> Vec<Sample> {
    match value {
        Value::Scalar(value) => vec![Sample { labels: Vec::new(), value }],
        Value::Vector(mut v) => {
            v.sort_by(compare);
            v.into_iter()
                .map(|e| Sample {
                    labels: full_labels(e.name, &e.labels).map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
                    value: e.value,
                })
                .collect()
        }
    }
}
