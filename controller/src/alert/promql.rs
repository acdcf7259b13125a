//! A PromQL evaluator for alert rules: an expression is parsed by
//! `promql-parser`, checked against what this evaluator implements (anything
//! else is refused at parse time, with its column), then evaluated as an
//! instant query over the [`Window`] with Prometheus 2.x semantics: the 5-minute
//! lookback, closed range boundaries, extrapolated rates, metric-name dropping,
//! vector matching and its cardinality errors.

mod aggregate;
mod binary;
mod compile;
mod eval;
mod functions;
mod label_names;
mod locate;

use std::collections::BTreeSet;
use std::time::Duration;

use compile::Node;

use super::window::{Labels, Window};

/// A compiled expression: parsed and checked once, evaluated many times.
#[derive(Debug, Clone)]
pub struct Expr {
    text: String,
    root: Node,
    /// Every selector with its range (0 for instant selectors), for
    /// [`Expr::selects`] and [`Expr::reach`], which the engine calls often.
    selectors: Vec<(compile::Selector, i64)>,
}

/// Why an expression is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("at column {column}: {message}")]
pub struct PromqlError {
    /// 1-based character column in the expression text (counted over the whole
    /// text, newlines included); 1 when unknown.
    pub column: usize,
    pub message: String,
}

/// Why an evaluation failed; the messages are Prometheus'.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    #[error(
        "found duplicate series for the match group {group} on the {side} hand-side of the operation: [{first}, {second}];many-to-many matching not allowed: matching labels must be unique on one side"
    )]
    ManyToMany { group: String, side: &'static str, first: String, second: String },
    #[error("multiple matches for labels: many-to-one matching must be explicit (group_left/group_right)")]
    OneToOneMultiple,
    #[error(
        "multiple matches for matching labels in many-to-one matching: many-to-one matching must be explicit (group_left/group_right)"
    )]
    ManyToOneMultiple,
    #[error("vector cannot contain metrics with the same labelset: {labels}")]
    DuplicateSeries { labels: String },
    #[error("scalar value {value} overflows int64 in {op}")]
    ParamOverflow { op: &'static str, value: f64 },
    /// A compiled expression of a shape the compiler never produces.
    #[error("internal error: {what}")]
    Internal { what: &'static str },
}

/// One element of a result.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Sorted by name; includes `("__name__", ..)` exactly where Prometheus
    /// keeps the metric name.
    pub labels: Labels,
    pub value: f64,
}

impl Expr {
    /// Parses `text` with `promql_parser::parser::parse` and checks that every
    /// construct is supported; anything else is refused here (never at
    /// evaluation) with its column and what it is.
    pub fn parse(text: &str) -> Result<Expr, PromqlError> {
        let root = compile::compile(text)?;
        let mut selectors = Vec::new();
        root.selectors(&mut selectors);
        let selectors = selectors.into_iter().map(|(s, range)| (s.clone(), range)).collect();
        Ok(Expr { text: text.to_owned(), root, selectors })
    }

    /// The expression as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Evaluates as an instant query at `t_ms` (Unix ms) over `window`. A scalar
    /// result is one sample without labels; the samples are sorted by labels.
    pub fn eval(&self, window: &Window, t_ms: i64) -> Result<Vec<Sample>, EvalError> {
        let ctx = eval::Ctx { window, t: t_ms };
        Ok(eval::to_samples(ctx.eval(&self.root)?))
    }

    /// Whether series `name{labels}` can be read by any selector of this
    /// expression (labels in any order).
    pub fn selects(&self, name: &str, labels: &[(String, String)]) -> bool {
        self.reach_for(name, labels).is_some()
    }

    /// How far back series `name{labels}` is read: range plus offset of the
    /// selectors that match it (the longest), plus the 5-minute lookback; `None`
    /// when no selector reads it. The window keeps each series this long.
    pub fn reach_for(&self, name: &str, labels: &[(String, String)]) -> Option<Duration> {
        self.selectors
            .iter()
            .filter(|(s, _)| {
                s.matches_name(name)
                    && s.label_matchers
                        .iter()
                        .all(|m| m.is_match(labels.iter().find(|(k, _)| *k == m.name).map_or("", |(_, v)| v.as_str())))
            })
            .map(|(s, range)| range.saturating_add(s.offset_ms))
            .max()
            .map(|back| {
                Duration::from_millis(u64::try_from(back.saturating_add(eval::LOOKBACK_MS)).unwrap_or(u64::MAX))
            })
    }

    /// How far before the evaluation time data must be kept: the longest range
    /// plus offset over the selectors, plus the 5-minute lookback.
    pub fn reach(&self) -> Duration {
        let back = self.selectors.iter().map(|(s, range)| range.saturating_add(s.offset_ms)).max().unwrap_or(0);
        Duration::from_millis(u64::try_from(back.saturating_add(eval::LOOKBACK_MS)).unwrap_or(u64::MAX))
    }

    /// The label names each output sample can carry, when they are known
    /// statically; `None` when unknown. `catalog(metric)` gives the label names
    /// of known metrics. Never includes `__name__`.
    pub fn label_names(&self, catalog: &dyn Fn(&str) -> Option<Vec<String>>) -> Option<BTreeSet<String>> {
        label_names::of(&self.root, catalog)
    }
}

#[cfg(test)]
mod tests;
