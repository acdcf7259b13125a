//! The label names an expression's results can carry, worked out from the
//! expression alone (so rule templates can be checked before any data exists).

use std::collections::BTreeSet;

use super::compile::{AggOp, Card, Func, Grouping, Node, Selector};
use crate::alert::window::NAME_LABEL;

type Names = BTreeSet<String>;
type Catalog<'a> = &'a dyn Fn(&str) -> Option<Vec<String>>;

/// The label names of `node`'s results; `None` when they cannot be known.
pub(super) fn of(node: &Node, catalog: Catalog<'_>) -> Option<Names> {
    if node.is_scalar() {
        return Some(Names::new());
    }
    match node {
        Node::Number(_) => Some(Names::new()),
        Node::Instant(s) => selector(s, catalog),
        Node::Range(r) => selector(&r.selector, catalog),
        Node::Negate(inner) => of(inner, catalog),
        Node::Call(func, args) => match func {
            Func::Absent | Func::AbsentOverTime => Some(absent(args.first())),
            Func::Vector | Func::Time | Func::Scalar => Some(Names::new()),
            Func::HistogramQuantile => {
                let mut names = of(args.get(1)?, catalog)?;
                names.remove("le");
                Some(names)
            }
            // Every other function keeps the labels of its vector argument.
            _ => of(args.iter().find(|a| !a.is_scalar())?, catalog),
        },
        Node::Aggregate(a) => {
            let inner = of(&a.inner, catalog);
            if matches!(a.op, AggOp::Topk | AggOp::Bottomk) {
                return inner;
            }
            match &a.grouping {
                Grouping::By(by) => {
                    let by: Names = by.iter().filter(|n| *n != NAME_LABEL).cloned().collect();
                    Some(match inner {
                        Some(inner) => by.intersection(&inner).cloned().collect(),
                        None => by,
                    })
                }
                Grouping::Without(without) => {
                    let mut names = inner?;
                    names.retain(|n| !without.contains(n));
                    Some(names)
                }
            }
        }
        Node::Binary(b) => {
            if b.lhs.is_scalar() {
                return of(&b.rhs, catalog);
            }
            if b.rhs.is_scalar() {
                return of(&b.lhs, catalog);
            }
            if b.op.is_set() {
                let lhs = of(&b.lhs, catalog);
                if b.op == super::compile::BinOp::Or {
                    let mut names = lhs?;
                    names.extend(of(&b.rhs, catalog)?);
                    return Some(names);
                }
                return lhs;
            }
            match &b.card {
                Card::OneToOne if b.on => {
                    let on: Names = b.matching.iter().filter(|n| *n != NAME_LABEL).cloned().collect();
                    Some(match of(&b.lhs, catalog) {
                        Some(lhs) => on.intersection(&lhs).cloned().collect(),
                        None => on,
                    })
                }
                Card::OneToOne => {
                    let mut names = of(&b.lhs, catalog)?;
                    names.retain(|n| !b.matching.contains(n));
                    Some(names)
                }
                Card::ManyToOne(include) => {
                    let mut names = of(&b.lhs, catalog)?;
                    names.extend(include.iter().filter(|n| *n != NAME_LABEL).cloned());
                    Some(names)
                }
                Card::OneToMany(include) => {
                    let mut names = of(&b.rhs, catalog)?;
                    names.extend(include.iter().filter(|n| *n != NAME_LABEL).cloned());
                    Some(names)
                }
            }
        }
    }
}

/// A selector's labels: the catalog's for a literal metric name.
fn selector(s: &Selector, catalog: Catalog<'_>) -> Option<Names> {
    let names = catalog(s.name.as_deref()?)?;
    Some(names.into_iter().filter(|n| n != NAME_LABEL).collect())
}

/// `absent()`'s labels: those of its selector's equality matchers.
fn absent(arg: Option<&Node>) -> Names {
    let labels = match arg {
        Some(Node::Instant(s)) => &s.absent_labels,
        Some(Node::Range(r)) => &r.selector.absent_labels,
        _ => return Names::new(),
    };
    labels.iter().map(|(k, _)| k.clone()).collect()
}
