//! Prometheus instant selectors (`name{label="v",label!="v",label=~"re",label!~"re"}`),
//! parsed by `promql-parser` and matched against the series view of telemetry.
//! Anything beyond a plain vector selector is refused, naming what was found.

use promql_parser::label::Matcher;
use promql_parser::parser::{self, Expr};

/// The label Prometheus keeps the metric name under.
const NAME_LABEL: &str = "__name__";

/// Why a selector cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("selector {selector:?} does not parse: {reason}")]
    Parse { selector: String, reason: String },
    #[error(
        "selector {selector:?} uses {what}, which is not supported here: give a plain selector such as name{{label=\"value\"}}"
    )]
    Unsupported { selector: String, what: String },
}

/// Tokens a selector may have outside its braces before it is parsed at all. A
/// plain selector has its name and the braces; a few more let the parser say
/// what was found ("the aggregation sum"). `promql-parser` recurses per level of
/// nesting, and so does dropping its tree: fuzzing overflowed a 2 MiB stack with
/// 20 000 nested calls, and a long enough `x+x+...` does the same.
const MAX_TOKENS_OUTSIDE_BRACES: usize = 64;

/// Counts the tokens outside braces (names, numbers, brackets, operators; quoted
/// strings skipped) and the deepest brace nesting of `text`.
fn shape(text: &str) -> (usize, usize) {
    let (mut tokens, mut braces, mut deepest) = (0usize, 0usize, 0usize);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                // A string: skip to its end (backslash escapes, except in raw `...`).
                while let Some(d) = chars.next() {
                    if d == '\\' && c != '`' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
            }
            '{' => {
                braces += 1;
                deepest = deepest.max(braces);
            }
            '}' => braces = braces.saturating_sub(1),
            _ if braces > 0 || c.is_whitespace() => {}
            _ if c.is_alphanumeric() || matches!(c, '_' | ':' | '.') => {
                tokens += 1;
                while chars.peek().is_some_and(|d| d.is_alphanumeric() || matches!(d, '_' | ':' | '.')) {
                    chars.next();
                }
            }
            _ => tokens += 1,
        }
    }
    (tokens, deepest)
}

/// A parsed instant vector selector.
#[derive(Debug, Clone)]
pub struct Selector {
    /// Every matcher, the metric name as a `__name__` equality.
    matchers: Vec<Matcher>,
}

impl Selector {
    /// Parses `text`, refusing everything but a plain vector selector.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let unsupported = |what: &str| SelectorError::Unsupported { selector: text.to_owned(), what: what.to_owned() };
        let (tokens, braces) = shape(text);
        if tokens > MAX_TOKENS_OUTSIDE_BRACES || braces > 1 {
            return Err(unsupported(&format!(
                "{tokens} tokens outside braces and braces {braces} deep (a plain selector has a name and one pair)"
            )));
        }
        let expr = parser::parse(text)
            .map_err(|reason| SelectorError::Parse { selector: text.to_owned(), reason: reason.trim().to_owned() })?;
        let vs = match expr {
            Expr::VectorSelector(vs) => vs,
            Expr::Aggregate(a) => return Err(unsupported(&format!("the aggregation {}", a.op))),
            Expr::Call(c) => return Err(unsupported(&format!("the function {}()", c.func.name))),
            Expr::MatrixSelector(_) => return Err(unsupported("a range selector [...]")),
            Expr::Subquery(_) => return Err(unsupported("a subquery")),
            Expr::Binary(b) => return Err(unsupported(&format!("the operator {}", b.op))),
            Expr::Unary(_) => return Err(unsupported("a unary minus")),
            Expr::Paren(_) => return Err(unsupported("parentheses")),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) => return Err(unsupported("a literal")),
            Expr::Extension(_) => return Err(unsupported("an extension expression")),
        };
        if vs.offset.is_some() {
            return Err(unsupported("an offset modifier"));
        }
        if vs.at.is_some() {
            return Err(unsupported("an @ modifier"));
        }
        if !vs.matchers.or_matchers.is_empty() {
            return Err(unsupported("`or` between matchers"));
        }
        let mut matchers = vs.matchers.matchers;
        if let Some(name) = vs.name {
            matchers.push(Matcher::new(promql_parser::label::MatchOp::Equal, NAME_LABEL, &name));
        }
        Ok(Self { matchers })
    }

    /// Whether the series `name{labels}` is selected. An absent label matches as
    /// the empty string, as in Prometheus.
    pub fn matches(&self, name: &str, labels: &[(String, String)]) -> bool {
        self.matchers.iter().all(|m| {
            let value = if m.name == NAME_LABEL {
                name
            } else {
                labels.iter().find(|(k, _)| *k == m.name).map_or("", |(_, v)| v.as_str())
            };
            m.is_match(value)
        })
    }

    /// Whether any series labelled `label="value"` could be selected, judging by
    /// the matchers on that label alone (to skip whole nodes early).
    pub fn may_match_label(&self, label: &str, value: &str) -> bool {
        self.matchers.iter().filter(|m| m.name == label).all(|m| m.is_match(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn deep_or_long_expressions_are_refused_before_parsing() {
        // On a thread with a tokio worker's stack: each of these overflowed it in the parser.
        std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(|| {
                for text in [
                    format!("{}x{}", "sum(".repeat(20_000), ")".repeat(20_000)),
                    vec!["x"; 100_000].join("+"),
                    vec!["x"; 100_000].join(" and "),
                    format!("{}x{}", "{".repeat(20_000), "}".repeat(20_000)),
                ] {
                    let err = Selector::parse(&text).unwrap_err().to_string();
                    let tail: String = err.chars().rev().take(120).collect::<Vec<_>>().into_iter().rev().collect();
                    assert!(err.contains("a plain selector has a name and one pair"), "{tail}");
                }
            })
            .unwrap()
            .join()
            .unwrap();
        // Long plain selectors and the parser's own refusals are unchanged.
        let many = (0..500).map(|i| format!("l{i}=~\"a|b|(c)\"")).collect::<Vec<_>>().join(",");
        assert!(Selector::parse(&format!("flotilla_x{{{many}}}")).is_ok());
        assert!(Selector::parse("sum(x)").unwrap_err().to_string().contains("the aggregation sum"));
    }

    #[test]
    fn matchers_follow_prometheus() {
        let s = Selector::parse(r#"flotilla_gpu_temperature_celsius{node="a",gpu!="1",uuid=~"GPU-.*",model!~"A.*"}"#)
            .unwrap();
        let temp = "flotilla_gpu_temperature_celsius";
        assert!(s.matches(temp, &labels(&[("node", "a"), ("gpu", "0"), ("uuid", "GPU-7"), ("model", "H100")])));
        assert!(!s.matches("flotilla_gpu_power_watts", &labels(&[("node", "a"), ("gpu", "0"), ("uuid", "GPU-7")])));
        assert!(!s.matches(temp, &labels(&[("node", "b"), ("gpu", "0"), ("uuid", "GPU-7")])));
        assert!(!s.matches(temp, &labels(&[("node", "a"), ("gpu", "1"), ("uuid", "GPU-7")])));
        assert!(
            !s.matches(temp, &labels(&[("node", "a"), ("gpu", "0"), ("uuid", "MIG-GPU-7")])),
            "regexes are anchored"
        );
        assert!(!s.matches(temp, &labels(&[("node", "a"), ("gpu", "0"), ("uuid", "GPU-7"), ("model", "A100")])));
        assert!(s.may_match_label("node", "a"));
        assert!(!s.may_match_label("node", "b"));
        assert!(s.may_match_label("rack", "r1"), "no matcher on the label: anything goes");
    }

    #[test]
    fn absent_labels_match_as_empty_and_names_can_be_matchers() {
        let s = Selector::parse(r#"{__name__=~"flotilla_node_load.*",interface=""}"#).unwrap();
        assert!(s.matches("flotilla_node_load1", &labels(&[("node", "a")])));
        assert!(!s.matches("flotilla_node_load1", &labels(&[("node", "a"), ("interface", "eth0")])));
        assert!(!s.matches("flotilla_node_swap_used_bytes", &labels(&[("node", "a")])));
        assert!(Selector::parse("up").unwrap().matches("up", &[]));
    }

    #[test]
    fn anything_but_a_plain_selector_is_refused_by_name() {
        for (text, what) in [
            ("rate(x_total[5m])", "rate()"),
            ("sum(x)", "aggregation sum"),
            ("x[5m]", "range selector"),
            ("x offset 5m", "offset"),
            ("x @ 100", "@ modifier"),
            ("x > 3", "operator >"),
            ("-x", "unary minus"),
            ("(x)", "parentheses"),
            ("42", "literal"),
            (r#"x{a="1" or b="2"}"#, "`or`"),
        ] {
            let err = Selector::parse(text).unwrap_err();
            assert!(matches!(err, SelectorError::Unsupported { .. }), "{text}: {err}");
            assert!(err.to_string().contains(what), "{text}: {err}");
        }
        let err = Selector::parse("x{").unwrap_err();
        assert!(matches!(err, SelectorError::Parse { .. }), "{err}");
        assert!(Selector::parse(r#"{a=~"("}"#).is_err(), "a bad regex is refused");
        let err = Selector::parse(r#"{gpu=~".*"}"#).unwrap_err().to_string();
        assert!(err.contains("non-empty matcher"), "as in Prometheus, a selector must narrow: {err}");
    }
}
