//! Rule files in the Prometheus rule-group format (`groups`, `name`, `interval`,
//! `rules` with `alert`, `expr`, `for`, `keep_firing_for`, `labels`,
//! `annotations`), loaded strictly: unknown fields, bad durations, PromQL that
//! the evaluator does not support, and templates that read labels the alert can
//! never carry are refused with the file, line, rule and reason. A file either
//! loads whole or not at all.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::promql::Expr;
use super::template::{Template, valid_label_name};

/// One problem in a rule file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleProblem {
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// `group/alert`, when the problem belongs to one rule.
    pub rule: Option<String>,
    pub message: String,
}

/// Why a rule file was refused: every problem found, each with its place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RulesError {
    pub file: String,
    pub problems: Vec<RuleProblem>,
}

impl std::fmt::Display for RulesError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file)?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
            }
            if let Some(rule) = &p.rule {
                write!(f, ": rule {rule}")?;
            }
            write!(f, ": {}", p.message)?;
        }
        Ok(())
    }
}

/// A loaded, checked rule set.
#[derive(Debug, Clone)]
pub struct RuleSet {
    /// Where it came from (a path, or a name given by the caller).
    pub source: String,
    pub groups: Vec<Group>,
}

/// One rule group.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    /// The group's `interval`: its rules are evaluated this often. Without one
    /// they are evaluated on ingest (every telemetry commit, coalesced) and every
    /// tick: the right choice for thresholds, while rules over long ranges
    /// (`avg_over_time(x[30m])`) are cheaper at an interval.
    pub interval: Option<Duration>,
    pub rules: Vec<Rule>,
}

/// One alerting rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub group: String,
    pub expr: Expr,
    pub for_: Duration,
    pub keep_firing_for: Duration,
    pub labels: Vec<(String, Template)>,
    pub annotations: Vec<(String, Template)>,
    /// The rule's line in its file, when known.
    pub line: Option<usize>,
}

impl Rule {
    /// `group/name`: unique within a rule set.
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.name)
    }
}

impl RuleSet {
    /// An empty rule set (no file configured).
    pub fn empty() -> Self {
        Self { source: "(no rules)".to_owned(), groups: Vec::new() }
    }

    /// Every rule, group by group.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.groups.iter().flat_map(|g| g.rules.iter())
    }

    /// How much history the rules read: the window the engine must keep.
    pub fn reach(&self) -> Duration {
        self.rules().map(|r| r.expr.reach()).max().unwrap_or(Duration::from_secs(300))
    }

    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, RulesError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| RulesError {
            file: file.clone(),
            problems: vec![RuleProblem { line: None, rule: None, message: format!("cannot read: {e}") }],
        })?;
        Self::parse(&file, &text)
    }

    /// Checks `text` as the content of rule file `file`.
    pub fn parse(file: &str, text: &str) -> Result<Self, RulesError> {
        let fail = |problems| RulesError { file: file.to_owned(), problems };
        let doc: FileDoc = serde_yaml_ng::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            // serde_yaml_ng appends " at line L column C"; the line is shown already.
            let message = e.to_string();
            let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
            fail(vec![RuleProblem { line, rule: None, message }])
        })?;
        let rule_lines = rule_lines(text);
        let mut problems = Vec::new();
        let mut groups = Vec::new();
        let mut group_names = BTreeSet::new();
        let mut index = 0;
        for g in doc.groups {
            let mut bad = |line, rule: Option<String>, message: String| {
                problems.push(RuleProblem { line, rule, message });
            };
            if g.name.trim().is_empty() {
                bad(None, None, "a group has an empty name".to_owned());
            } else if !group_names.insert(g.name.clone()) {
                bad(None, None, format!("group {:?} is defined twice", g.name));
            }
            if g.limit.is_some_and(|l| l > 0) {
                bad(None, None, format!("group {}: `limit` is not supported (leave it out or set 0)", g.name));
            }
            let interval = match g.interval.as_deref().map(parse_duration) {
                None => None,
                Some(Ok(d)) if d > Duration::ZERO => Some(d),
                Some(Ok(_)) => {
                    bad(None, None, format!("group {}: interval must be above 0", g.name));
                    None
                }
                Some(Err(e)) => {
                    bad(None, None, format!("group {}: interval: {e}", g.name));
                    None
                }
            };
            let mut rules = Vec::new();
            let mut names = BTreeSet::new();
            for r in g.rules {
                let line = rule_lines.get(index).copied();
                index += 1;
                match compile_rule(&g.name, r) {
                    Ok(mut rule) => {
                        rule.line = line;
                        if !names.insert(rule.name.clone()) {
                            bad(line, Some(rule.key()), "defined twice in the group".to_owned());
                        }
                        rules.push(rule);
                    }
                    Err((rule, messages)) => {
                        for m in messages {
                            bad(line, Some(rule.clone()), m);
                        }
                    }
                }
            }
            groups.push(Group { name: g.name, interval, rules });
        }
        if !problems.is_empty() {
            return Err(fail(problems));
        }
        Ok(Self { source: file.to_owned(), groups })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    groups: Vec<GroupDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupDoc {
    name: String,
    #[serde(default)]
    interval: Option<String>,
    /// Prometheus' per-group alert limit; accepted only as 0 (no limit).
    #[serde(default)]
    limit: Option<u64>,
    rules: Vec<RuleDoc>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    #[serde(default)]
    alert: Option<String>,
    #[serde(default)]
    record: Option<String>,
    expr: serde_yaml_ng::Value,
    #[serde(default, rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    keep_firing_for: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// Compiles one rule, or returns its name and every problem with it.
fn compile_rule(group: &str, r: RuleDoc) -> Result<Rule, (String, Vec<String>)> {
    let mut problems = Vec::new();
    let name = match (&r.alert, &r.record) {
        (Some(a), None) => a.clone(),
        (None, Some(rec)) => {
            let key = format!("{group}/{rec}");
            return Err((
                key,
                vec!["recording rules are not supported: put the expression into the alert that uses it".to_owned()],
            ));
        }
        (Some(a), Some(_)) => {
            problems.push("has both `alert` and `record`".to_owned());
            a.clone()
        }
        (None, None) => {
            return Err((format!("{group}/?"), vec!["has neither `alert` nor `record`".to_owned()]));
        }
    };
    let key = format!("{group}/{name}");
    if !valid_label_name(&name) {
        problems.push(format!("the alert name {name:?} is not a valid metric name ([a-zA-Z_][a-zA-Z0-9_]*)"));
    }
    let text = match &r.expr {
        serde_yaml_ng::Value::String(s) => Some(s.clone()),
        serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
        _ => {
            problems.push("expr must be a PromQL string".to_owned());
            None
        }
    };
    let expr = text.and_then(|t| match Expr::parse(&t) {
        Ok(e) => Some(e),
        Err(e) => {
            problems.push(format!("expr {t:?}: {e}"));
            None
        }
    });
    let mut duration = |field: &str, v: &Option<String>| match v.as_deref().map(parse_duration) {
        None => Duration::ZERO,
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            problems.push(format!("{field}: {e}"));
            Duration::ZERO
        }
    };
    let for_ = duration("for", &r.for_);
    let keep_firing_for = duration("keep_firing_for", &r.keep_firing_for);
    let known = expr.as_ref().and_then(|e| e.label_names(&|n| crate::series::label_names(n)));
    let mut labels = Vec::new();
    for (k, v) in &r.labels {
        if !valid_label_name(k) || k.starts_with("__") {
            problems.push(format!("label name {k:?} is not valid"));
        }
        if k == "alertname" {
            problems.push("label `alertname` is set from the rule's `alert`".to_owned());
        }
        match Template::parse(v) {
            Ok(t) => labels.push((k.clone(), t)),
            Err(e) => problems.push(format!("label {k}: {e}")),
        }
    }
    let mut annotations = Vec::new();
    for (k, v) in &r.annotations {
        if !valid_label_name(k) {
            problems.push(format!("annotation name {k:?} is not valid"));
        }
        match Template::parse(v) {
            Ok(t) => annotations.push((k.clone(), t)),
            Err(e) => problems.push(format!("annotation {k}: {e}")),
        }
    }
    if let Some(known) = &known {
        let templates =
            labels.iter().map(|(k, t)| ("label", k, t)).chain(annotations.iter().map(|(k, t)| ("annotation", k, t)));
        for (what, k, t) in templates {
            // As in Prometheus, `$labels` is the expression's result labels, for
            // labels and annotations alike (not the rule's labels, not alertname).
            for read in t.labels_read() {
                if !known.contains(read) {
                    let have: Vec<&str> = known.iter().map(String::as_str).collect();
                    problems.push(format!(
                        "{what} {k} reads $labels.{read}, which the alert never has (its labels: {})",
                        if have.is_empty() { "none".to_owned() } else { have.join(", ") }
                    ));
                }
            }
        }
    }
    match (expr, problems.is_empty()) {
        (Some(expr), true) => {
            Ok(Rule { name, group: group.to_owned(), expr, for_, keep_firing_for, labels, annotations, line: None })
        }
        _ => Err((key, problems)),
    }
}

/// The 1-based lines where rules start (`alert:` or `record:` keys), in order.
fn rule_lines(text: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let t = l.trim_start().trim_start_matches("- ").trim_start();
            t.starts_with("alert:") || t.starts_with("record:")
        })
        .map(|(i, _)| i + 1)
        .collect()
}

/// A Prometheus duration: one or more `<n><unit>` with units `y w d h m s ms`
/// in that order, e.g. `1h30m`, `0s`, `500ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration; write e.g. 30s, 5m, 1h30m");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let units: [(&str, u64); 7] = [
        ("y", 365 * 86_400_000),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
        ("ms", 1),
    ];
    let mut rest = text;
    let mut total: u64 = 0;
    let mut last_unit = None;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let pos = units.iter().position(|(u, _)| *u == unit).ok_or_else(bad)?;
        if last_unit.is_some_and(|l| pos <= l) {
            return Err(bad());
        }
        last_unit = Some(pos);
        total = n.checked_mul(units[pos].1).and_then(|v| total.checked_add(v)).ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_millis(total))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ONE: &str = r#"
groups:
  - name: gpu
    interval: 15s
    rules:
      - alert: GPUHighTemperature
        expr: flotilla_gpu_temperature_celsius > 80
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: "GPU {{ $labels.gpu }} on {{ $labels.node }} is hot"
          description: "{{ $value }}°C"
"#;

    #[test]
    fn a_rule_file_loads() {
        let set = RuleSet::parse("r.yml", ONE).unwrap();
        let rule = set.rules().next().unwrap();
        assert_eq!(rule.key(), "gpu/GPUHighTemperature");
        assert_eq!(rule.for_, Duration::from_secs(300));
        assert_eq!(rule.line, Some(6));
        assert_eq!(set.groups[0].interval, Some(Duration::from_secs(15)));
    }

    #[test]
    fn durations_follow_prometheus() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        for bad in ["", "5", "m", "5 m", "1m1h", "1.5h", "5mm", "-5m", "99999999999999999999y"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    fn problems(text: &str) -> String {
        RuleSet::parse("r.yml", text).unwrap_err().to_string()
    }

    #[test]
    fn bad_files_are_refused_with_place_and_reason() {
        let e = problems("groups:\n  - name: g\n    rulez: []\n");
        assert!(e.starts_with("r.yml:3") && e.contains("rulez"), "{e}");
        let e = problems(&ONE.replace("for: 5m", "for: 5 minutes"));
        assert!(e.contains("r.yml:6: rule gpu/GPUHighTemperature: for:") && e.contains("not a duration"), "{e}");
        let e =
            problems(&ONE.replace("severity: warning", "severity: warning\n          extra: \"{{ $labels.rack }}\""));
        assert!(e.contains("reads $labels.rack, which the alert never has"), "{e}");
        let e = problems(&ONE.replace("expr: flotilla_gpu_temperature_celsius > 80", "expr: foo(bar"));
        assert!(e.contains("rule gpu/GPUHighTemperature: expr"), "{e}");
        let e = problems(&ONE.replace("- alert: GPUHighTemperature", "- record: gpu:temp"));
        assert!(e.contains("recording rules are not supported"), "{e}");
        let e = problems(&format!("{ONE}{}", ONE.replace("groups:\n", "")));
        assert!(e.contains("group \"gpu\" is defined twice"), "{e}");
        let e = problems("groups: [");
        assert!(e.starts_with("r.yml:2: did not find expected node content"), "{e}");
    }

    #[test]
    fn the_default_rules_load() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rules/default.yml");
        let set = RuleSet::load(&path).unwrap();
        let names: BTreeSet<&str> = set.rules().map(|r| r.name.as_str()).collect();
        for want in [
            "GPUHighTemperature",
            "GPUMemoryNearFull",
            "HighLatency",
            "HighErrorRate",
            "QueueBacklog",
            "DiskSpaceLow",
            "ServiceDown",
            "AgentDown",
        ] {
            assert!(names.contains(want), "{want} missing from the default rules");
        }
    }
}
