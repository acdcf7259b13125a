//! The operator stack in `deploy/compose/`: every query of the Grafana dashboard
//! is PromQL that `promtool` accepts and reads only series the controller's
//! `/metrics` carries, through labels those series have; the seed playbook's
//! panels are all there; and the Prometheus and Alertmanager configs pass
//! `promtool check config` and `amtool check-config` with exactly the files
//! `compose.yaml` mounts. The stack itself is not started: its images cannot be
//! pulled here.

// Test helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use flotilla_agent::gateway::traffic::TrafficCounters;
use flotilla_agent::inference::{InferenceCollector, InferenceEndpoint};
use flotilla_common::NodeId;
use flotilla_common::model::{
    FilesystemSample, GpuInfo, GpuProcess, GpuSample, HostSample, Inventory, NetworkSample, TelemetryBatch, XidCount,
};
use flotilla_controller::exporter::Exporter;
use flotilla_controller::fleetview::FleetView;
use flotilla_controller::metrics::Metrics;
use flotilla_controller::registry::Registry;
use flotilla_controller::series::label_names;
use flotilla_controller::store::{SledStore, Store};
use promql_parser::label::Matchers;
use promql_parser::parser::value::ValueType;
use promql_parser::parser::{self, Expr, LabelModifier, VectorMatchCardinality, VectorSelector};
use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

/// The panels of the seed playbook's "Local LLM Operations" dashboard.
const SEED_PANELS: [&str; 6] =
    ["Requests per Second", "P95 Latency", "GPU Utilization", "GPU Memory Usage", "Tokens per Second", "Error Rate"];

/// Panels the issue asks for beyond the seed's.
const MORE_PANELS: [&str; 6] =
    ["GPU Temperature", "GPU Power", "Queue Depth", "Time to First Token", "Firing Alerts", "Alerts over Time"];

/// Series Prometheus itself makes from the rules it evaluates.
const PROMETHEUS_ALERT_SERIES: [&str; 2] = ["ALERTS", "ALERTS_FOR_STATE"];

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

fn compose_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &Path) -> Yaml {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dashboard() -> Json {
    let path = compose_dir().join("grafana/dashboards/flotilla.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs a checking tool, panicking with the way to install it when it is missing.
fn run_tool(tool: &str, args: &[&str], install: &str) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool}: {e}; install {install} (./x test installs it)"))
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---- the series the controller exports ------------------------------------------

/// Every series name on the controller's `/metrics`, with the label names it
/// carries there: a real [`Exporter`] renders one node whose batch has every GPU
/// and host value, the inference samples the agent's collector maps from real
/// vLLM, SGLang, TGI and llama.cpp pages, and the gateway counters the agent
/// reads from an nginx access log. Histograms appear as their `_bucket`, `_sum`
/// and `_count` series, as Prometheus stores them.
fn exported_series() -> BTreeMap<String, BTreeSet<String>> {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeId::new("gpu-01").unwrap();
    let mut samples = inference_samples();
    samples.extend(gateway_samples(dir.path()));
    let batch = TelemetryBatch {
        seq: 1,
        created_unix_ms: 1_700_000_000_000,
        gpus: vec![full_gpu_sample()],
        host: Some(full_host_sample()),
        samples,
        ..Default::default()
    };
    let inventory = Inventory {
        hostname: "gpu-01".into(),
        gpus: vec![GpuInfo { index: 0, uuid: "GPU-0".into(), model: "H100".into(), memory_total_bytes: 80 << 30 }],
        ..Default::default()
    };
    let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.path().join("store")).unwrap());
    let view = FleetView::default();
    view.set_inventory(&node, inventory);
    assert!(view.observe(&node, &Arc::new(batch.clone())));
    let exporter = Exporter {
        view,
        registry: Registry::default(),
        metrics: Metrics::new().unwrap(),
        missed_heartbeats: 3,
        store,
        alerts: None,
    };
    let series = parse_exposition(&exporter.render());
    for must in [
        "flotilla_agent_up",
        "flotilla_gpu_temperature_celsius",
        "flotilla_inference_time_to_first_token_seconds_bucket",
        "flotilla_gateway_response_seconds_bucket",
        "flotilla_controller_alerts_firing",
    ] {
        assert!(series.contains_key(must), "{must} missing from the rendered exposition: {:?}", series.keys());
    }
    series
}

fn full_gpu_sample() -> GpuSample {
    GpuSample {
        index: 0,
        uuid: "GPU-0".into(),
        utilization_ratio: Some(0.5),
        memory_utilization_ratio: Some(0.3),
        memory_used_bytes: Some(40 << 30),
        memory_total_bytes: Some(80 << 30),
        temperature_celsius: Some(61.0),
        power_watts: Some(350.0),
        power_limit_watts: Some(700.0),
        sm_clock_mhz: Some(1980),
        memory_clock_mhz: Some(2619),
        memory_reserved_bytes: Some(1 << 29),
        memory_temperature_celsius: Some(70.0),
        energy_joules_total: Some(1e6),
        clock_event_reasons: Some(0x20),
        pcie_rx_bytes_per_second: Some(1e9),
        pcie_tx_bytes_per_second: Some(1e9),
        pcie_replay_total: Some(0),
        ecc_corrected_volatile_total: Some(0),
        ecc_uncorrected_volatile_total: Some(0),
        ecc_corrected_aggregate_total: Some(0),
        ecc_uncorrected_aggregate_total: Some(0),
        remapped_rows_correctable: Some(0),
        remapped_rows_uncorrectable: Some(0),
        remapped_rows_pending: Some(false),
        remapped_rows_failed: Some(false),
        retired_pages_single_bit: Some(0),
        retired_pages_double_bit: Some(0),
        xid_events: vec![XidCount { code: 48, count: 1 }],
        processes: vec![GpuProcess { pid: 7, name: "vllm".into(), used_memory_bytes: Some(1 << 30) }],
    }
}

fn full_host_sample() -> HostSample {
    HostSample {
        cpu_utilization_ratio: 0.2,
        load1: 1.0,
        load5: 1.0,
        load15: 1.0,
        memory_total_bytes: 1 << 40,
        memory_available_bytes: 1 << 39,
        swap_total_bytes: 0,
        swap_used_bytes: 0,
        filesystems: vec![FilesystemSample {
            mount_point: "/models".into(),
            device: "/dev/nvme0n1p1".into(),
            fs_type: "ext4".into(),
            size_bytes: 1 << 40,
            avail_bytes: 1 << 39,
        }],
        networks: vec![NetworkSample { interface: "eth0".into(), receive_bytes_total: 1, transmit_bytes_total: 1 }],
    }
}

/// What the agent's inference collector makes of a real page of each engine.
fn inference_samples() -> Vec<flotilla_common::model::Sample> {
    let pages = [
        ("vllm-v1", "vllm-v1-0.11.0.txt"),
        ("vllm-v0", "vllm-v0-0.6.6.post1.txt"),
        ("sglang", "sglang-0.5.9.txt"),
        ("tgi", "tgi-3.3.7.txt"),
        ("llamacpp", "llamacpp-8733e0c.txt"),
    ];
    let endpoints = pages
        .iter()
        .map(|(name, page)| {
            let addr = flotilla_tests::serve_inference_fixture(flotilla_tests::metrics_fixture(page));
            InferenceEndpoint::new(*name, format!("http://{addr}"))
        })
        .collect();
    let mut collector = InferenceCollector::new(endpoints).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let round = runtime.block_on(collector.collect());
    for report in &round.endpoints {
        assert!(report.is_ok(), "scraping the {} fixture: {:?}", report.endpoint, report.problems);
    }
    round.samples
}

/// What the agent's gateway collector counts from one nginx access-log line.
fn gateway_samples(dir: &Path) -> Vec<flotilla_common::model::Sample> {
    let log = dir.join("access.log");
    std::fs::write(&log, "").unwrap();
    let mut counters = TrafficCounters::new(&log);
    // `$proxy_host $upstream_addr $upstream_status $upstream_response_time $status`
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    writeln!(file, "llama 10.0.0.5:8000 200 0.120 200").unwrap();
    let (samples, status) = counters.sample();
    assert!(status.healthy, "{}", status.error);
    samples
}

/// Series names and the label names each carries, from text exposition format.
fn parse_exposition(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = out.entry(line[..name_end].to_owned()).or_default();
        if line[name_end..].starts_with('{') {
            labels.extend(label_names_of(&line[name_end + 1..]));
        }
    }
    out
}

/// The label names of `a="x",b="y\"z"} 1`, up to the closing brace.
fn label_names_of(labels: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut name = String::new();
    let (mut in_value, mut escaped) = (false, false);
    for c in labels.chars() {
        if in_value {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_value = false,
                _ => {}
            }
            continue;
        }
        match c {
            '}' => break,
            '"' => in_value = true,
            '=' => names.push(std::mem::take(&mut name)),
            ',' => {}
            c => name.push(c),
        }
    }
    names
}

// ---- checking one expression -----------------------------------------------------

/// Label names an expression's result may carry; `None` when any (ALERTS carries
/// whatever labels the rules give their alerts).
type LabelSet = Option<BTreeSet<String>>;

struct Checker<'a> {
    series: &'a BTreeMap<String, BTreeSet<String>>,
    problems: Vec<String>,
}

impl Checker<'_> {
    /// The labels a series of `name` has once Prometheus scraped it, or a
    /// problem when the controller does not export `name`.
    fn selector_labels(&mut self, vs: &VectorSelector) -> LabelSet {
        let Some(name) = &vs.name else {
            self.problems.push(format!("selector {vs} has no metric name"));
            return None;
        };
        if PROMETHEUS_ALERT_SERIES.contains(&name.as_str()) {
            return None;
        }
        let Some(exported) = self.series.get(name) else {
            self.problems.push(format!("{name} is not on the controller's /metrics"));
            return None;
        };
        // `label_names` is the controller's catalogue of the labels its own
        // series carry (the alert engine checks rule templates against it); the
        // exposition shows the labels it actually wrote.
        let mut labels = exported.clone();
        labels.extend(label_names(name).unwrap_or_default());
        labels.extend(TARGET_LABELS.map(str::to_owned));
        self.check_matchers(name, &vs.matchers, &labels);
        Some(labels)
    }

    fn check_matchers(&mut self, name: &str, matchers: &Matchers, labels: &BTreeSet<String>) {
        let all = matchers.matchers.iter().chain(matchers.or_matchers.iter().flatten());
        for m in all.filter(|m| m.name != "__name__") {
            if !labels.contains(&m.name) {
                self.problems.push(format!("{name} has no label {:?} (it has {labels:?})", m.name));
            }
        }
    }

    fn check_subset(&mut self, what: &str, wanted: &[String], have: &LabelSet) {
        let Some(have) = have else { return };
        for label in wanted {
            if !have.contains(label) {
                self.problems.push(format!("{what} names {label:?}, which its input lacks ({have:?})"));
            }
        }
    }

    /// Walks `expr`, recording every problem, and returns its result's labels.
    fn labels(&mut self, expr: &Expr) -> LabelSet {
        match expr {
            Expr::VectorSelector(vs) => self.selector_labels(vs),
            Expr::MatrixSelector(ms) => self.selector_labels(&ms.vs),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) => Some(BTreeSet::new()),
            Expr::Paren(p) => self.labels(&p.expr),
            Expr::Unary(u) => self.labels(&u.expr),
            Expr::Subquery(s) => self.labels(&s.expr),
            Expr::Aggregate(a) => {
                if let Some(param) = &a.param {
                    self.labels(param);
                }
                let inner = self.labels(&a.expr);
                let op = a.op.to_string();
                match &a.modifier {
                    _ if matches!(op.as_str(), "topk" | "bottomk" | "limitk" | "limit_ratio") => inner,
                    Some(LabelModifier::Include(by)) => {
                        self.check_subset(&format!("{op} by"), &by.labels, &inner);
                        Some(by.labels.iter().cloned().collect())
                    }
                    Some(LabelModifier::Exclude(without)) => {
                        self.check_subset(&format!("{op} without"), &without.labels, &inner);
                        inner.map(|l| l.into_iter().filter(|x| !without.labels.contains(x)).collect())
                    }
                    None => Some(BTreeSet::new()),
                }
            }
            Expr::Call(call) => {
                let args: Vec<LabelSet> = call.args.args.iter().map(|a| self.labels(a)).collect();
                match call.func.name {
                    "histogram_quantile" => {
                        let buckets = args.get(1).cloned().flatten();
                        if let Some(b) = &buckets
                            && !b.contains("le")
                        {
                            self.problems.push("histogram_quantile over series without an le label".into());
                        }
                        buckets.map(|b| b.into_iter().filter(|l| l != "le").collect())
                    }
                    "absent" | "absent_over_time" | "vector" | "scalar" | "time" => Some(BTreeSet::new()),
                    _ => {
                        let vectors = call.args.args.iter().zip(args);
                        vectors
                            .filter(|(a, _)| matches!(a.value_type(), ValueType::Vector | ValueType::Matrix))
                            .map(|(_, l)| l)
                            .next()
                            .unwrap_or_else(|| Some(BTreeSet::new()))
                    }
                }
            }
            Expr::Binary(b) => {
                let lhs = self.labels(&b.lhs);
                let rhs = self.labels(&b.rhs);
                let vector = |e: &Expr| e.value_type() == ValueType::Vector;
                if !vector(&b.lhs) {
                    return rhs;
                }
                if !vector(&b.rhs) {
                    return lhs;
                }
                let both = match (&lhs, &rhs) {
                    (Some(l), Some(r)) => Some(l.union(r).cloned().collect::<BTreeSet<_>>()),
                    _ => None,
                };
                let op = b.op.to_string();
                if op == "or" {
                    return both;
                }
                let Some(modifier) = &b.modifier else { return lhs };
                if let Some(matching) = &modifier.matching {
                    self.check_subset("on/ignoring", &matching.labels().labels, &both);
                }
                if let Some(extra) = modifier.card.labels() {
                    self.check_subset("group_left/group_right", &extra.labels, &both);
                }
                match (&modifier.card, &modifier.matching) {
                    (VectorMatchCardinality::OneToMany(extra), _) => {
                        rhs.map(|r| r.into_iter().chain(extra.labels.iter().cloned()).collect())
                    }
                    (VectorMatchCardinality::ManyToOne(extra), _) => {
                        lhs.map(|l| l.into_iter().chain(extra.labels.iter().cloned()).collect())
                    }
                    (_, Some(LabelModifier::Include(on))) if op != "and" && op != "unless" => {
                        Some(on.labels.iter().cloned().collect())
                    }
                    (_, Some(LabelModifier::Exclude(ignoring))) if op != "and" && op != "unless" => {
                        lhs.map(|l| l.into_iter().filter(|x| !ignoring.labels.contains(x)).collect())
                    }
                    _ => lhs,
                }
            }
            Expr::Extension(_) => {
                self.problems.push("extension expression".into());
                None
            }
        }
    }
}

/// `{{ label }}` placeholders of a Grafana legend format.
fn legend_labels(legend: &str) -> Vec<String> {
    legend
        .split("{{")
        .skip(1)
        .filter_map(|part| part.split_once("}}").map(|(name, _)| name.trim().to_owned()))
        .collect()
}

/// One query of the dashboard: where it is, and its text.
struct Query {
    place: String,
    expr: String,
    legend: String,
}

fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        // A collapsed row keeps its panels inside it.
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Every target expression, and the selector of every `label_values(...)` variable.
fn queries(dashboard: &Json) -> Vec<Query> {
    let mut out = Vec::new();
    for p in panels(dashboard) {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(Query {
                place: format!("panel {title:?} target {}", t["refId"].as_str().unwrap_or("?")),
                expr: t["expr"].as_str().unwrap_or_else(|| panic!("panel {title:?}: a target without expr")).to_owned(),
                legend: t["legendFormat"].as_str().unwrap_or("").to_owned(),
            });
        }
    }
    for v in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or("?");
        let query = v["query"].as_str().or_else(|| v["query"]["query"].as_str()).unwrap_or("");
        let (selector, label) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .unwrap_or_else(|| panic!("variable {name}: only label_values(SELECTOR, LABEL) is used, not {query:?}"));
        // The label must come out of the selector: check it as a legend would be.
        out.push(Query {
            place: format!("variable {name:?}"),
            expr: selector.trim().to_owned(),
            legend: format!("{{{{{}}}}}", label.trim()),
        });
    }
    out
}

#[test]
fn dashboard_has_the_seed_panels_and_more() {
    let dashboard = dashboard();
    let titles: BTreeSet<&str> = panels(&dashboard).iter().filter_map(|p| p["title"].as_str()).collect();
    for want in SEED_PANELS.iter().chain(&MORE_PANELS) {
        assert!(titles.contains(want), "panel {want:?} missing; the dashboard has {titles:?}");
    }
    let uid = provisioned_prometheus_uid();
    for p in panels(&dashboard) {
        let title = p["title"].as_str().unwrap_or("?");
        let kind = p["type"].as_str().unwrap_or("?");
        if kind == "row" {
            continue;
        }
        let targets = p["targets"].as_array().map_or(0, Vec::len);
        assert!(targets > 0, "panel {title:?} ({kind}) has no query");
        assert_eq!(p["datasource"]["uid"], uid, "panel {title:?} reads another data source");
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(t["datasource"]["uid"], uid, "panel {title:?}: a target reads another data source");
        }
    }
    let ids: Vec<&Json> = panels(&dashboard).iter().map(|p| &p["id"]).collect();
    let unique: BTreeSet<String> = ids.iter().map(|i| i.to_string()).collect();
    assert_eq!(unique.len(), ids.len(), "panel ids repeat");
}

#[test]
fn dashboard_queries_read_only_exported_series() {
    let dashboard = dashboard();
    let series = exported_series();
    let mut checker = Checker { series: &series, problems: Vec::new() };
    let queries = queries(&dashboard);
    assert!(queries.len() > 20, "only {} queries", queries.len());
    for q in &queries {
        let before = checker.problems.len();
        match parser::parse(&q.expr) {
            Ok(expr) => {
                let labels = checker.labels(&expr);
                if let Some(labels) = labels {
                    for l in legend_labels(&q.legend) {
                        if !labels.contains(&l) {
                            checker
                                .problems
                                .push(format!("legend {{{{{l}}}}} is not a label of the result {labels:?}"));
                        }
                    }
                }
            }
            Err(e) => checker.problems.push(format!("does not parse: {e}")),
        }
        for p in &mut checker.problems[before..] {
            *p = format!("{}: {p}\n    {}", q.place, q.expr);
        }
    }
    assert!(checker.problems.is_empty(), "{}", checker.problems.join("\n"));
}

#[test]
fn dashboard_queries_pass_promtool() {
    let queries = queries(&dashboard());
    // Every expression as a recording rule: `promtool check rules` parses each
    // with Prometheus' own parser (a Grafana variable like "$node" sits inside a
    // label value, where it is plain text to PromQL).
    let rules: Vec<Yaml> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let mut rule = serde_yaml_ng::Mapping::new();
            rule.insert("record".into(), format!("dashboard:query_{i}").into());
            rule.insert("expr".into(), q.expr.clone().into());
            Yaml::Mapping(rule)
        })
        .collect();
    let mut group = serde_yaml_ng::Mapping::new();
    group.insert("name".into(), "flotilla-dashboard".into());
    group.insert("rules".into(), Yaml::Sequence(rules));
    let mut file = serde_yaml_ng::Mapping::new();
    file.insert("groups".into(), Yaml::Sequence(vec![Yaml::Mapping(group)]));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dashboard-rules.yml");
    std::fs::write(&path, serde_yaml_ng::to_string(&file).unwrap()).unwrap();
    let out = run_tool("promtool", &["check", "rules", path.to_str().unwrap()], "Debian's prometheus package");
    let names: Vec<String> =
        queries.iter().enumerate().map(|(i, q)| format!("dashboard:query_{i} is {}", q.place)).collect();
    assert_success(&format!("promtool check rules (the dashboard's queries; {})", names.join(", ")), &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("{} rules found", queries.len())), "{stdout}");
}

// ---- the compose stack's configuration -----------------------------------------

/// One mount of a compose service: where it comes from on the host (`None` for
/// a named volume) and where it lands in the container.
#[derive(Debug)]
struct Mount {
    source: Option<PathBuf>,
    target: String,
}

fn compose() -> Yaml {
    yaml(&compose_dir().join("compose.yaml"))
}

fn mounts(compose: &Yaml, service: &str) -> Vec<Mount> {
    let volumes = compose["services"][service]["volumes"].as_sequence().unwrap_or_else(|| panic!("{service} volumes"));
    volumes
        .iter()
        .map(|v| match v {
            Yaml::String(short) => {
                let mut parts = short.split(':');
                let source = parts.next().unwrap();
                let target = parts.next().unwrap_or_else(|| panic!("{short}")).to_owned();
                let bind = source.starts_with('.') || source.starts_with('/');
                Mount { source: bind.then(|| compose_dir().join(source)), target }
            }
            long => {
                let source = long["source"].as_str().unwrap_or_else(|| panic!("{long:?}"));
                let bind = long["type"].as_str() == Some("bind");
                Mount {
                    source: bind.then(|| compose_dir().join(source)),
                    target: long["target"].as_str().unwrap_or_else(|| panic!("{long:?}")).to_owned(),
                }
            }
        })
        .collect()
}

/// A file the operator makes by hand before `docker compose up` (README.md).
fn made_by_operator(source: &Path) -> bool {
    source.starts_with(compose_dir().join("pki"))
}

fn provisioned_prometheus_uid() -> Json {
    let datasources = yaml(&compose_dir().join("grafana/provisioning/datasources/flotilla.yml"));
    let prometheus = datasources["datasources"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|d| d["type"].as_str() == Some("prometheus"))
        .expect("a prometheus data source");
    assert_eq!(prometheus["url"].as_str(), Some("http://prometheus:9090"));
    Json::String(prometheus["uid"].as_str().unwrap().to_owned())
}

#[test]
fn every_mounted_file_is_in_the_repository() {
    let compose = compose();
    let services = compose["services"].as_mapping().unwrap();
    for name in ["controller", "prometheus", "alertmanager", "grafana"] {
        assert!(services.contains_key(name), "service {name} missing");
        for m in mounts(&compose, name) {
            let Some(source) = m.source else { continue };
            assert!(
                made_by_operator(&source) || source.exists(),
                "{name}: {} (mounted at {}) does not exist",
                source.display(),
                m.target
            );
        }
    }
    // The dashboard provider reads the directory compose mounts the JSON into.
    let providers = yaml(&compose_dir().join("grafana/provisioning/dashboards/flotilla.yml"));
    let path = providers["providers"][0]["options"]["path"].as_str().unwrap();
    let grafana = mounts(&compose, "grafana");
    let dashboards = grafana.iter().find(|m| m.target == path).expect("the dashboards directory is mounted");
    assert!(dashboards.source.as_ref().unwrap().join("flotilla.json").exists());
}

#[test]
fn controller_config_loads_and_matches_the_stack() {
    use flotilla_controller::config::{Config, Overrides};
    let compose = compose();
    let config = Config::load(Some(&compose_dir().join("controller.toml")), Overrides::default()).unwrap();
    let targets: BTreeSet<String> = mounts(&compose, "controller").into_iter().map(|m| m.target).collect();
    let rules = config.alerting.rules.clone().expect("the controller evaluates the rules");
    for file in [&config.tls.ca, &config.tls.cert, &config.tls.key, &rules, &config.data_dir] {
        let file = file.to_str().unwrap();
        assert!(targets.contains(file), "controller.toml reads {file}, which compose.yaml does not mount");
    }
    assert_eq!(config.alerting.delivery.alertmanagers, ["http://alertmanager:9093"]);
    // Prometheus scrapes the port the controller serves /metrics on.
    let metrics = config.metrics_listen.expect("metrics_listen is set");
    let prometheus = yaml(&compose_dir().join("prometheus.yml"));
    let job = prometheus["scrape_configs"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|j| j["job_name"].as_str() == Some("flotilla"))
        .expect("the flotilla scrape job");
    assert_eq!(job["scheme"].as_str(), Some("https"));
    assert_eq!(
        job["static_configs"][0]["targets"][0].as_str(),
        Some(format!("controller:{}", metrics.port()).as_str())
    );
    // Agents reach the gRPC port from outside.
    let ports = compose["services"]["controller"]["ports"].as_sequence().unwrap();
    let published = format!("{0}:{0}", config.listen.port());
    assert!(ports.iter().any(|p| p.as_str() == Some(published.as_str())), "{ports:?}");
}

#[test]
fn prometheus_config_passes_promtool_with_the_mounted_files() {
    // The prometheus container's filesystem, as compose.yaml mounts it, under a
    // temporary root: the repository's files where they are mounted, empty
    // stand-ins for the certificate and key the operator makes (promtool checks
    // that they exist, not what they hold).
    let root = tempfile::tempdir().unwrap();
    let compose = compose();
    for m in mounts(&compose, "prometheus") {
        let Some(source) = m.source else { continue };
        let dest = root.path().join(m.target.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        if made_by_operator(&source) {
            std::fs::write(&dest, "").unwrap();
        } else {
            std::fs::copy(&source, &dest).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
        }
    }
    let in_container = root.path().join("etc/prometheus/prometheus.yml");
    let text = read(&in_container).replace("/etc/prometheus/", &format!("{}/etc/prometheus/", root.path().display()));
    std::fs::write(&in_container, text).unwrap();
    let out = run_tool("promtool", &["check", "config", in_container.to_str().unwrap()], "Debian's prometheus package");
    assert_success("promtool check config deploy/compose/prometheus.yml", &out);
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains("rules found"), "the rule file was checked too: {all}");
}

#[test]
fn alertmanager_config_passes_amtool() {
    let path = compose_dir().join("alertmanager.yml");
    let out = match Command::new("amtool").args(["check-config", path.to_str().unwrap()]).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipping: amtool ({e}); Debian's prometheus-alertmanager package has it");
            return;
        }
    };
    assert_success("amtool check-config deploy/compose/alertmanager.yml", &out);
}
