//! Compiles `promql-parser`'s syntax tree into the evaluator's own tree,
//! refusing (with a column) every construct the evaluator does not implement,
//! so nothing unsupported can reach an evaluation.

use std::time::Duration;

use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::token::{self, TokenId};
use promql_parser::parser::{self as ast, LabelModifier, VectorMatchCardinality};

use super::PromqlError;
use super::locate::Tokens;
use crate::alert::window::{Label, LabelSet, NAME_LABEL};

/// The functions the evaluator implements, by name.
pub(super) const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "avg_over_time",
    "clamp_max",
    "clamp_min",
    "count_over_time",
    "delta",
    "histogram_quantile",
    "idelta",
    "increase",
    "irate",
    "last_over_time",
    "max_over_time",
    "min_over_time",
    "present_over_time",
    "quantile_over_time",
    "rate",
    "scalar",
    "stddev_over_time",
    "sum_over_time",
    "time",
    "vector",
];

/// The aggregations the evaluator implements, by name.
pub(super) const AGGREGATIONS: &[&str] =
    &["avg", "bottomk", "count", "group", "max", "min", "stddev", "stdvar", "sum", "topk"];

/// A node of a compiled expression.
#[derive(Debug, Clone)]
pub(super) enum Node {
    Number(f64),
    /// An instant vector selector.
    Instant(Selector),
    /// A range vector selector; only ever a function argument.
    Range(RangeSelector),
    Call(Func, Vec<Node>),
    Aggregate(Box<Aggregate>),
    Negate(Box<Node>),
    Binary(Box<Binary>),
}

/// A vector selector: which series, and how far back.
#[derive(Debug, Clone)]
pub(super) struct Selector {
    /// The metric name when one equality matcher fixes it: the index key.
    pub(super) name: Option<String>,
    /// Matchers on `__name__` (including the one `name` comes from).
    pub(super) name_matchers: Vec<Matcher>,
    /// Matchers on other labels.
    pub(super) label_matchers: Vec<Matcher>,
    pub(super) offset_ms: i64,
    /// The labels `absent()` gives when this selector selects nothing.
    pub(super) absent_labels: LabelSet,
}

/// A range vector selector.
#[derive(Debug, Clone)]
pub(super) struct RangeSelector {
    pub(super) selector: Selector,
    pub(super) range_ms: i64,
    /// The range in seconds, computed as Go's `time.Duration.Seconds` does.
    pub(super) range_secs: f64,
}

/// A function the evaluator implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Func {
    Rate,
    Irate,
    Increase,
    Delta,
    Idelta,
    AvgOverTime,
    MinOverTime,
    MaxOverTime,
    SumOverTime,
    CountOverTime,
    LastOverTime,
    QuantileOverTime,
    StddevOverTime,
    PresentOverTime,
    AbsentOverTime,
    HistogramQuantile,
    Absent,
    Abs,
    ClampMin,
    ClampMax,
    Time,
    Vector,
    Scalar,
}

/// An aggregation such as `sum by (node) (x)`.
#[derive(Debug, Clone)]
pub(super) struct Aggregate {
    pub(super) op: AggOp,
    pub(super) param: Option<Node>,
    pub(super) grouping: Grouping,
    pub(super) inner: Node,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AggOp {
    Sum,
    Avg,
    Min,
    Max,
    Count,
    Group,
    Stddev,
    Stdvar,
    Topk,
    Bottomk,
}

/// `by (...)` or `without (...)`; no clause is `by ()`.
#[derive(Debug, Clone)]
pub(super) enum Grouping {
    By(Vec<String>),
    Without(Vec<String>),
}

/// A binary operation.
#[derive(Debug, Clone)]
pub(super) struct Binary {
    pub(super) op: BinOp,
    pub(super) lhs: Node,
    pub(super) rhs: Node,
    pub(super) return_bool: bool,
    /// `on (...)` (true) or `ignoring (...)` (false) with its labels, sorted.
    pub(super) on: bool,
    pub(super) matching: Vec<String>,
    pub(super) card: Card,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Pow,
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    And,
    Or,
    Unless,
}

impl BinOp {
    pub(super) fn is_comparison(self) -> bool {
        matches!(self, BinOp::Eq | BinOp::Ne | BinOp::Gt | BinOp::Lt | BinOp::Ge | BinOp::Le)
    }

    pub(super) fn is_set(self) -> bool {
        matches!(self, BinOp::And | BinOp::Or | BinOp::Unless)
    }
}

/// Vector matching cardinality; set operators are many-to-many by definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Card {
    OneToOne,
    /// `group_left (...)`: the extra labels taken from the right ("one") side.
    ManyToOne(Vec<String>),
    /// `group_right (...)`: the extra labels taken from the left ("one") side.
    OneToMany(Vec<String>),
}

impl Node {
    /// Whether the node evaluates to a scalar (otherwise an instant vector).
    pub(super) fn is_scalar(&self) -> bool {
        match self {
            Node::Number(_) | Node::Call(Func::Time | Func::Scalar, _) => true,
            Node::Negate(inner) => inner.is_scalar(),
            Node::Binary(b) => b.lhs.is_scalar() && b.rhs.is_scalar(),
            Node::Instant(_) | Node::Range(_) | Node::Call(..) | Node::Aggregate(_) => false,
        }
    }

    /// Every selector of the expression, range selectors included.
    pub(super) fn selectors<'a>(&'a self, out: &mut Vec<(&'a Selector, i64)>) {
        match self {
            Node::Number(_) => {}
            Node::Instant(s) => out.push((s, 0)),
            Node::Range(r) => out.push((&r.selector, r.range_ms)),
            Node::Call(_, args) => args.iter().for_each(|a| a.selectors(out)),
            Node::Aggregate(a) => {
                if let Some(p) = &a.param {
                    p.selectors(out);
                }
                a.inner.selectors(out);
            }
            Node::Negate(inner) => inner.selectors(out),
            Node::Binary(b) => {
                b.lhs.selectors(out);
                b.rhs.selectors(out);
            }
        }
    }
}

impl Selector {
    /// Whether the matchers on `__name__` accept `name`.
    pub(super) fn matches_name(&self, name: &str) -> bool {
        self.name_matchers.iter().all(|m| m.is_match(name))
    }

    /// Whether the label matchers accept `labels` (sorted by name).
    pub(super) fn matches_labels(&self, labels: &[Label]) -> bool {
        self.label_matchers.iter().all(|m| {
            let value = labels.binary_search_by(|(k, _)| k.as_str().cmp(&m.name)).map_or("", |i| labels[i].1.as_str());
            m.is_match(value)
        })
    }
}

/// Compiles `text`.
pub(super) fn compile(text: &str) -> Result<Node, PromqlError> {
    let tokens = Tokens::scan(text);
    // `promql-parser` recurses per nesting level and so does dropping its tree:
    // bound both before parsing (fuzzing overflowed a 2 MiB stack with either).
    if tokens.len() > MAX_TOKENS {
        return Err(PromqlError {
            column: 1,
            message: format!("the expression has {} tokens; at most {MAX_TOKENS} are allowed", tokens.len()),
        });
    }
    let (deepest, column) = tokens.deepest();
    if deepest > MAX_DEPTH {
        return Err(PromqlError { column, message: format!("the expression nests deeper than {MAX_DEPTH} levels") });
    }
    let tree = ast::parse(text).map_err(|reason| PromqlError {
        column: 1,
        message: format!("the expression does not parse: {}", reason.trim()),
    })?;
    let compiler = Compiler { tokens, depth: std::cell::Cell::new(0) };
    let node = compiler.node(&tree)?;
    if matches!(node, Node::Range(_)) {
        return Err(compiler.error(
            Some(1),
            "a range vector cannot be a rule's result; wrap it in a function such as rate() or max_over_time()",
        ));
    }
    Ok(node)
}

/// How deep an expression may nest (parentheses, calls, operators). Every pass
/// over the compiled tree recurses (evaluation, label names, selectors), so an
/// unbounded depth would let a rules file overflow the stack of the thread that
/// checks it (fuzzing found 1 000 nested parentheses enough on a 2 MiB tokio
/// worker) and abort the controller; no real rule comes near this.
pub(super) const MAX_DEPTH: usize = 64;

/// The most tokens an expression may have: a chain of operators nests one level
/// per operator without a single parenthesis. Real rules have a few dozen.
pub(super) const MAX_TOKENS: usize = 2048;

struct Compiler {
    tokens: Tokens,
    /// The nesting depth of the node being compiled.
    depth: std::cell::Cell<usize>,
}

impl Compiler {
    fn error(&self, column: Option<usize>, message: &str) -> PromqlError {
        PromqlError { column: column.unwrap_or(1), message: message.to_owned() }
    }

    fn node(&self, e: &ast::Expr) -> Result<Node, PromqlError> {
        let depth = self.depth.get() + 1;
        if depth > MAX_DEPTH {
            return Err(self.error(None, &format!("the expression nests deeper than {MAX_DEPTH} levels")));
        }
        self.depth.set(depth);
        let node = self.node_at_depth(e);
        self.depth.set(depth - 1);
        node
    }

    fn node_at_depth(&self, e: &ast::Expr) -> Result<Node, PromqlError> {
        match e {
            ast::Expr::NumberLiteral(n) => Ok(Node::Number(n.val)),
            ast::Expr::Paren(p) => self.node(&p.expr),
            ast::Expr::Unary(u) => Ok(Node::Negate(Box::new(self.node(&u.expr)?))),
            ast::Expr::VectorSelector(vs) => Ok(Node::Instant(self.selector(vs)?)),
            ast::Expr::MatrixSelector(ms) => {
                let selector = self.selector(&ms.vs)?;
                let range_ms = millis(ms.range);
                Ok(Node::Range(RangeSelector { selector, range_ms, range_secs: go_seconds(ms.range) }))
            }
            ast::Expr::Call(c) => self.call(c),
            ast::Expr::Aggregate(a) => self.aggregate(a),
            ast::Expr::Binary(b) => self.binary(b),
            ast::Expr::Subquery(_) => {
                Err(self.error(self.tokens.subquery(), "a subquery ([range:resolution]) is not supported"))
            }
            ast::Expr::StringLiteral(_) => {
                Err(self.error(self.tokens.string(), "a string literal is not supported here"))
            }
            ast::Expr::Extension(_) => Err(self.error(None, "an extension expression is not supported")),
        }
    }

    fn selector(&self, vs: &ast::VectorSelector) -> Result<Selector, PromqlError> {
        if vs.at.is_some() {
            return Err(self.error(self.tokens.punct("@"), "the @ modifier is not supported"));
        }
        if !vs.matchers.or_matchers.is_empty() {
            return Err(self.error(self.tokens.word_in_braces("or"), "`or` between label matchers is not supported"));
        }
        let offset_ms = match &vs.offset {
            None => 0,
            Some(ast::Offset::Pos(d)) => millis(*d),
            Some(ast::Offset::Neg(_)) => {
                return Err(self.error(
                    self.tokens.negative_offset(),
                    "a negative offset is not supported: rules are evaluated at the current time, so it reads nothing",
                ));
            }
        };
        let mut all: Vec<Matcher> = vs.matchers.matchers.clone();
        if let Some(name) = &vs.name {
            all.push(Matcher::new(MatchOp::Equal, NAME_LABEL, name));
        }
        let (name_matchers, label_matchers): (Vec<_>, Vec<_>) = all.into_iter().partition(|m| m.name == NAME_LABEL);
        let name = name_matchers.iter().find(|m| m.op == MatchOp::Equal).map(|m| m.value.clone());
        let absent_labels = absent_labels(&label_matchers);
        Ok(Selector { name, name_matchers, label_matchers, offset_ms, absent_labels })
    }

    fn call(&self, c: &ast::Call) -> Result<Node, PromqlError> {
        let name = c.func.name;
        let func = match name {
            "rate" => Func::Rate,
            "irate" => Func::Irate,
            "increase" => Func::Increase,
            "delta" => Func::Delta,
            "idelta" => Func::Idelta,
            "avg_over_time" => Func::AvgOverTime,
            "min_over_time" => Func::MinOverTime,
            "max_over_time" => Func::MaxOverTime,
            "sum_over_time" => Func::SumOverTime,
            "count_over_time" => Func::CountOverTime,
            "last_over_time" => Func::LastOverTime,
            "quantile_over_time" => Func::QuantileOverTime,
            "stddev_over_time" => Func::StddevOverTime,
            "present_over_time" => Func::PresentOverTime,
            "absent_over_time" => Func::AbsentOverTime,
            "histogram_quantile" => Func::HistogramQuantile,
            "absent" => Func::Absent,
            "abs" => Func::Abs,
            "clamp_min" => Func::ClampMin,
            "clamp_max" => Func::ClampMax,
            "time" => Func::Time,
            "vector" => Func::Vector,
            "scalar" => Func::Scalar,
            _ => {
                let message =
                    format!("the function {name}() is not supported; supported functions: {}", FUNCTIONS.join(", "));
                return Err(self.error(self.tokens.call(name), &message));
            }
        };
        let mut args = c.args.args.iter().map(|a| self.node(a)).collect::<Result<Vec<_>, _>>()?;
        // Prometheus takes absent()'s labels from a bare selector only, not a
        // parenthesised one.
        if let (Func::Absent, Some(Node::Instant(s)), Some(ast::Expr::Paren(_))) =
            (func, args.first_mut(), c.args.args.first().map(|a| &**a))
        {
            s.absent_labels = LabelSet::from([]);
        }
        // The parser checks argument counts and types; check again what the
        // evaluator relies on, so a parser change cannot make it misbehave.
        let wants_range = matches!(
            func,
            Func::Rate
                | Func::Irate
                | Func::Increase
                | Func::Delta
                | Func::Idelta
                | Func::AvgOverTime
                | Func::MinOverTime
                | Func::MaxOverTime
                | Func::SumOverTime
                | Func::CountOverTime
                | Func::LastOverTime
                | Func::StddevOverTime
                | Func::PresentOverTime
                | Func::AbsentOverTime
        );
        let shape_ok = match (func, args.as_slice()) {
            (_, [Node::Range(_)]) if wants_range => true,
            (Func::QuantileOverTime, [q, Node::Range(_)]) => q.is_scalar(),
            (Func::HistogramQuantile, [q, v]) => q.is_scalar() && is_vector(v),
            (Func::ClampMin | Func::ClampMax, [v, s]) => is_vector(v) && s.is_scalar(),
            (Func::Absent | Func::Abs | Func::Scalar, [v]) => is_vector(v),
            (Func::Vector, [s]) => s.is_scalar(),
            (Func::Time, []) => true,
            _ => false,
        };
        if !shape_ok {
            return Err(self.error(self.tokens.call(name), &format!("unexpected arguments to {name}()")));
        }
        Ok(Node::Call(func, args))
    }

    fn aggregate(&self, a: &ast::AggregateExpr) -> Result<Node, PromqlError> {
        let op = match a.op.id() {
            token::T_SUM => AggOp::Sum,
            token::T_AVG => AggOp::Avg,
            token::T_MIN => AggOp::Min,
            token::T_MAX => AggOp::Max,
            token::T_COUNT => AggOp::Count,
            token::T_GROUP => AggOp::Group,
            token::T_STDDEV => AggOp::Stddev,
            token::T_STDVAR => AggOp::Stdvar,
            token::T_TOPK => AggOp::Topk,
            token::T_BOTTOMK => AggOp::Bottomk,
            _ => {
                let name = a.op.to_string();
                let message = format!(
                    "the aggregation {name} is not supported; supported aggregations: {}",
                    AGGREGATIONS.join(", ")
                );
                return Err(self.error(self.tokens.call(&name), &message));
            }
        };
        let grouping = match &a.modifier {
            None => Grouping::By(Vec::new()),
            Some(LabelModifier::Include(l)) => Grouping::By(sorted(&l.labels)),
            Some(LabelModifier::Exclude(l)) => Grouping::Without(sorted(&l.labels)),
        };
        let param = a.param.as_deref().map(|p| self.node(p)).transpose()?;
        let inner = self.node(&a.expr)?;
        let wants_param = matches!(op, AggOp::Topk | AggOp::Bottomk);
        let param_ok = match &param {
            Some(p) => wants_param && p.is_scalar(),
            None => !wants_param,
        };
        if !param_ok || !is_vector(&inner) {
            let name = a.op.to_string();
            return Err(self.error(self.tokens.call(&name), &format!("unexpected arguments to {name}")));
        }
        Ok(Node::Aggregate(Box::new(Aggregate { op, param, grouping, inner })))
    }

    fn binary(&self, b: &ast::BinaryExpr) -> Result<Node, PromqlError> {
        let op = match b.op.id() {
            token::T_ADD => BinOp::Add,
            token::T_SUB => BinOp::Sub,
            token::T_MUL => BinOp::Mul,
            token::T_DIV => BinOp::Div,
            token::T_MOD => BinOp::Mod,
            token::T_POW => BinOp::Pow,
            token::T_EQLC => BinOp::Eq,
            token::T_NEQ => BinOp::Ne,
            token::T_GTR => BinOp::Gt,
            token::T_LSS => BinOp::Lt,
            token::T_GTE => BinOp::Ge,
            token::T_LTE => BinOp::Le,
            token::T_LAND => BinOp::And,
            token::T_LOR => BinOp::Or,
            token::T_LUNLESS => BinOp::Unless,
            id => return Err(self.unsupported_operator(id, &b.op.to_string())),
        };
        let (mut return_bool, mut on, mut matching, mut card) = (false, false, Vec::new(), Card::OneToOne);
        if let Some(m) = &b.modifier {
            if m.fill_values.lhs.is_some() || m.fill_values.rhs.is_some() {
                let column = ["fill", "fill_left", "fill_right"].iter().find_map(|w| self.tokens.word(w));
                return Err(self.error(column, "the fill modifiers (fill, fill_left, fill_right) are not supported"));
            }
            return_bool = m.return_bool;
            if let Some(l) = &m.matching {
                on = l.is_include();
                matching = sorted(&l.labels().labels);
            }
            card = match &m.card {
                VectorMatchCardinality::OneToOne | VectorMatchCardinality::ManyToMany => Card::OneToOne,
                VectorMatchCardinality::ManyToOne(l) => Card::ManyToOne(sorted(&l.labels)),
                VectorMatchCardinality::OneToMany(l) => Card::OneToMany(sorted(&l.labels)),
            };
        }
        let lhs = self.node(&b.lhs)?;
        let rhs = self.node(&b.rhs)?;
        let vectors = !lhs.is_scalar() && !rhs.is_scalar();
        let matches_vectors = b.modifier.as_ref().is_some_and(|m| m.matching.is_some()) || card != Card::OneToOne;
        if matches_vectors && !vectors {
            let message = "vector matching (on, ignoring, group_left, group_right) needs two instant vectors";
            return Err(self.error(None, message));
        }
        let operands_ok = is_value(&lhs) && is_value(&rhs) && (vectors || !op.is_set());
        let comparison_ok = !op.is_comparison() || return_bool || !(lhs.is_scalar() && rhs.is_scalar());
        if !operands_ok || !comparison_ok || (return_bool && !op.is_comparison()) {
            return Err(self.error(None, &format!("unexpected operands or modifiers for the operator {}", b.op)));
        }
        Ok(Node::Binary(Box::new(Binary { op, lhs, rhs, return_bool, on, matching, card })))
    }

    fn unsupported_operator(&self, id: TokenId, name: &str) -> PromqlError {
        let column = if id == token::T_ATAN2 { self.tokens.word("atan2") } else { self.tokens.punct(name) };
        self.error(column, &format!("the operator {name} is not supported"))
    }
}

/// Whether `n` is an instant vector.
fn is_vector(n: &Node) -> bool {
    !n.is_scalar() && !matches!(n, Node::Range(_))
}

/// Whether `n` is a scalar or an instant vector.
fn is_value(n: &Node) -> bool {
    !matches!(n, Node::Range(_))
}

fn sorted(labels: &[String]) -> Vec<String> {
    let mut l = labels.to_vec();
    l.sort();
    l.dedup();
    l
}

/// A duration in whole milliseconds, as Prometheus' `durationMilliseconds`.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Seconds as Go's `time.Duration.Seconds` computes them (whole seconds plus
/// the nanosecond remainder), so rates divide by exactly the same number.
fn go_seconds(d: Duration) -> f64 {
    d.as_secs() as f64 + f64::from(d.subsec_nanos()) / 1e9
}

/// The labels `absent()` reports for a selector that selects nothing: each
/// equality matcher's label, unless another matcher also constrains that label
/// (as Prometheus' `createLabelsForAbsentFunction`).
fn absent_labels(matchers: &[Matcher]) -> LabelSet {
    let mut out: Vec<Label> = Vec::new();
    let mut dropped: Vec<&str> = Vec::new();
    for m in matchers {
        if m.op == MatchOp::Equal && !out.iter().any(|(k, _)| *k == m.name) {
            out.push((m.name.clone(), m.value.clone()));
        } else {
            dropped.push(&m.name);
        }
    }
    out.retain(|(k, v)| !v.is_empty() && !dropped.contains(&k.as_str()));
    out.sort();
    out.into()
}
