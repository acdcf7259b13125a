//! The deployment spec as operators write it (YAML, `flotctl deploy apply -f`),
//! and its validation. Everything that can be checked without the fleet is
//! checked here, with the field's path in the message; what needs the fleet
//! (nodes, GPUs, the gateway) is the planner's job.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest deployment name: containers are named `NAME-REVISION`.
pub const MAX_NAME_LEN: usize = 40;
/// The most replicas one deployment may ask for: during a surge both revisions
/// share one upstream, which holds at most `gateway::MAX_SERVERS` (128) servers.
/// Split a larger fleet into several deployments.
pub const MAX_REPLICAS: u32 = 64;
/// The largest spec accepted.
pub const MAX_SPEC_BYTES: usize = 256 * 1024;

/// One model deployment across nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// `[a-z0-9-]`, starting with a letter; names the containers and the rollouts.
    pub name: String,
    pub model: ModelSpec,
    pub runtime: RuntimeSpec,
    pub placement: Placement,
    pub gateway: GatewaySpec,
    #[serde(default)]
    pub strategy: Strategy,
    #[serde(default)]
    pub gates: Gates,
}

/// What is served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The served model name.
    pub name: String,
    /// A host directory with the weights, mounted read-only at `/model`.
    #[serde(default)]
    pub path: Option<String>,
    /// The model's own revision (a tag or commit): a change makes a new deployment revision.
    #[serde(default)]
    pub revision: Option<String>,
}

/// How each replica runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeSpec {
    /// The image; it must already be on every node.
    pub image: String,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub args: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The port the server listens on inside the container (`/v1/*`, `/metrics`).
    pub port: u16,
    /// The published port. A replica started beside a running one on the same
    /// node (a surge) uses the other port of the pair `host_port`, `host_port + 1`.
    pub host_port: u16,
    /// GPUs per replica (0 for CPU servers).
    #[serde(default)]
    pub gpus: u32,
    /// VRAM each of those GPUs must have free for a replica to start beside
    /// another (e.g. `40GiB`); without it only whole free GPUs count.
    #[serde(default, with = "opt_bytes")]
    pub gpu_memory: Option<u64>,
    /// The container health check, in the container spec's form (see
    /// `deploy/examples/model-server.yaml`); absent, readiness comes from the
    /// agent's `GET /v1/models` probe alone.
    #[serde(default)]
    pub health: Option<JsonValue>,
    /// The inference engine, when it cannot be told from its `/metrics` page.
    #[serde(default)]
    pub engine: Option<String>,
    /// `/dev/shm` size, e.g. `16GiB`.
    #[serde(default)]
    pub shm_size: Option<String>,
}

/// Where replicas run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Candidate nodes, in order of preference.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Or: every node whose inventory labels include all of these.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// How many replicas (at most one per node).
    pub replicas: u32,
}

/// The nginx upstream in front of the replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    /// The agent node with the `[gateway]` role.
    pub node: String,
    /// The upstream's name in nginx.
    pub upstream: String,
}

/// How a new revision replaces the running one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StrategyKind {
    BlueGreen,
    Canary,
    Rolling,
}

impl StrategyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BlueGreen => "blue-green",
            Self::Canary => "canary",
            Self::Rolling => "rolling",
        }
    }
}

/// The strategy and Nomad's update knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    #[serde(rename = "type")]
    pub kind: StrategyKind,
    /// Blue-green: the new revision's traffic share (%) at each step. Canary: its
    /// share while only the canaries run.
    #[serde(default)]
    pub steps: Vec<u8>,
    /// Canary: how many replicas of the new revision go first.
    #[serde(default = "one")]
    pub canary: u32,
    /// Rolling: replicas replaced at once when stopping first (no spare GPU).
    #[serde(default = "one")]
    pub max_unavailable: u32,
    /// Rolling: new replicas started beside the old ones at once.
    #[serde(default = "one")]
    pub max_surge: u32,
    /// How long each traffic step is watched by the health gates.
    #[serde(with = "humantime_serde", default = "default_bake")]
    pub bake: Duration,
    /// A new replica counts as healthy once ready this long.
    #[serde(with = "humantime_serde", default = "default_min_healthy")]
    pub min_healthy_time: Duration,
    /// A new replica not healthy this long after its start fails the rollout.
    #[serde(with = "humantime_serde", default = "default_healthy_deadline")]
    pub healthy_deadline: Duration,
    /// A step (bake time aside) that does not finish within this fails the rollout.
    #[serde(with = "humantime_serde", default = "default_progress_deadline")]
    pub progress_deadline: Duration,
    /// Canary: go on after the canary bake without `flotctl rollout resume`.
    #[serde(default = "yes")]
    pub auto_promote: bool,
    /// Go back to the last stable revision when the rollout fails.
    #[serde(default = "yes")]
    pub auto_revert: bool,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_bake() -> Duration {
    Duration::from_secs(300)
}
fn default_min_healthy() -> Duration {
    Duration::from_secs(10)
}
fn default_healthy_deadline() -> Duration {
    Duration::from_secs(600)
}
fn default_progress_deadline() -> Duration {
    Duration::from_secs(1800)
}

impl Default for Strategy {
    fn default() -> Self {
        Self {
            kind: StrategyKind::BlueGreen,
            steps: Vec::new(),
            canary: 1,
            max_unavailable: 1,
            max_surge: 1,
            bake: default_bake(),
            min_healthy_time: default_min_healthy(),
            healthy_deadline: default_healthy_deadline(),
            progress_deadline: default_progress_deadline(),
            auto_promote: true,
            auto_revert: true,
        }
    }
}

impl Strategy {
    /// The traffic steps with their defaults applied.
    pub fn traffic_steps(&self) -> Vec<u8> {
        match (self.kind, self.steps.is_empty()) {
            (StrategyKind::BlueGreen, true) => vec![10, 50, 100],
            (StrategyKind::Canary, true) => vec![10],
            _ => self.steps.clone(),
        }
    }
}

/// The health gates applied while a traffic step bakes. The new revision fails
/// a gate when it crosses the absolute limit, or when it is worse than the old
/// revision over the same window by more than `baseline_factor` (error ratios
/// also get `error_ratio_margin` of slack, so that 0 → 0.1 % is not "infinitely worse").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// Largest share of 5xx answers (and failed connections) through the gateway.
    #[serde(default = "default_error_ratio")]
    pub error_ratio: f64,
    /// Largest p95 of the gateway's upstream response time.
    #[serde(with = "humantime_serde", default = "default_p95_latency")]
    pub p95_latency: Duration,
    /// Largest p95 time to first token, from the replicas' own metrics.
    #[serde(with = "humantime_serde", default = "default_p95_ttft")]
    pub p95_ttft: Duration,
    #[serde(default = "default_factor")]
    pub baseline_factor: f64,
    #[serde(default = "default_margin")]
    pub error_ratio_margin: f64,
    /// Fewer requests than this in the window: the ratio and latency gates say
    /// "not enough traffic" and pass; readiness still gates.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
}

fn default_error_ratio() -> f64 {
    0.05
}
fn default_p95_latency() -> Duration {
    Duration::from_secs(5)
}
fn default_p95_ttft() -> Duration {
    Duration::from_millis(500)
}
fn default_factor() -> f64 {
    1.5
}
fn default_margin() -> f64 {
    0.01
}
fn default_min_requests() -> u64 {
    20
}

impl Default for Gates {
    fn default() -> Self {
        Self {
            error_ratio: default_error_ratio(),
            p95_latency: default_p95_latency(),
            p95_ttft: default_p95_ttft(),
            baseline_factor: default_factor(),
            error_ratio_margin: default_margin(),
            min_requests: default_min_requests(),
        }
    }
}

/// A free-form value passed through to the agent (the health check). Stored as
/// JSON text, since the store's postcard cannot hold a self-describing value.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonValue(pub serde_json::Value);

impl Serialize for JsonValue {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { self.0.serialize(s) } else { s.serialize_str(&self.0.to_string()) }
    }
}

impl<'de> Deserialize<'de> for JsonValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            serde_json::Value::deserialize(d).map(Self)
        } else {
            let text = String::deserialize(d)?;
            serde_json::from_str(&text).map(Self).map_err(serde::de::Error::custom)
        }
    }
}

/// Sizes as `40GiB`, `512MiB`, `1.5GB` or a plain number of bytes. No field of a
/// stored type may skip serialising: the store's postcard reads fields by position.
mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(v, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        // The store's postcard is not self-describing: it holds the number.
        if !d.is_human_readable() {
            return Option::<u64>::deserialize(d);
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Option::<Raw>::deserialize(d)? {
            None => Ok(None),
            Some(Raw::Number(n)) => Ok(Some(n)),
            Some(Raw::Text(t)) => super::parse_bytes(&t).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `40GiB`, `512MiB`, `2GB`, `1024`.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: f64 = number.parse().map_err(|_| format!("{text:?} is not a size (use e.g. 40GiB)"))?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "k" | "K" | "KB" | "kB" => 1e3,
        "M" | "MB" => 1e6,
        "G" | "GB" => 1e9,
        "T" | "TB" => 1e12,
        "Ki" | "KiB" => 1024.0,
        "Mi" | "MiB" => 1024.0 * 1024.0,
        "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
        "Ti" | "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => return Err(format!("{text:?}: unknown unit {other:?} (use B, KB, MB, GB, KiB, MiB, GiB, TiB)")),
    };
    let bytes = n * scale;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// A spec that failed to parse or validate: every problem, each with its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct SpecError(pub Vec<String>);

impl DeploymentSpec {
    /// Parses and validates `text`.
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        if text.len() > MAX_SPEC_BYTES {
            return Err(SpecError(vec![format!("the spec is {} bytes, over {MAX_SPEC_BYTES}", text.len())]));
        }
        let spec: Self = serde_yaml_ng::from_str(text).map_err(|e| SpecError(vec![e.to_string()]))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Every check that needs no fleet, all problems at once.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut bad = Vec::new();
        if let Err(e) = check_name(&self.name) {
            bad.push(format!("name: {e}"));
        }
        if self.model.name.trim().is_empty() {
            bad.push("model.name: must not be empty".to_owned());
        }
        if let Some(path) = &self.model.path
            && !path.starts_with('/')
        {
            bad.push(format!("model.path {path:?}: must be an absolute host path"));
        }
        if self.runtime.image.trim().is_empty() {
            bad.push("runtime.image: must not be empty".to_owned());
        } else if let Some(reason) = flotilla_common::command::image_ref::check(&self.runtime.image) {
            // The agents would refuse every replica's container spec for it.
            bad.push(format!("runtime.image {:?}: not an image reference: {reason}", self.runtime.image));
        }
        if self.runtime.port == 0 {
            bad.push("runtime.port: must be 1..=65535".to_owned());
        }
        if self.runtime.host_port == 0 || self.runtime.host_port == u16::MAX {
            bad.push("runtime.host_port: must be 1..=65534 (host_port + 1 is the surge port)".to_owned());
        }
        if self.runtime.gpus > 64 {
            bad.push(format!("runtime.gpus: {} is more than any node has", self.runtime.gpus));
        }
        if self.runtime.gpu_memory.is_some() && self.runtime.gpus == 0 {
            bad.push("runtime.gpu_memory: set without runtime.gpus".to_owned());
        }
        if let Some(engine) = &self.runtime.engine
            && !["vllm", "sglang", "tgi", "llamacpp"].contains(&engine.as_str())
        {
            bad.push(format!("runtime.engine {engine:?}: use vllm, sglang, tgi or llamacpp"));
        }
        // Checked here with the agent's own rules, so a bad health block is refused
        // at apply instead of failing the rollout's first start step.
        if let Some(JsonValue(health)) = &self.runtime.health {
            let checked = serde_json::from_value::<flotilla_common::health::HealthCheck>(health.clone())
                .map_err(|e| e.to_string())
                .and_then(|h| h.check());
            if let Err(reason) = checked {
                bad.push(format!("runtime.health: {reason}"));
            }
        }
        for key in self.runtime.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                bad.push(format!("runtime.env: {key:?} is not a variable name"));
            }
        }
        let p = &self.placement;
        if p.replicas == 0 || p.replicas > MAX_REPLICAS {
            bad.push(format!("placement.replicas: {} must be 1..={MAX_REPLICAS}", p.replicas));
        }
        match (p.nodes.is_empty(), p.selector.is_empty()) {
            (true, true) => bad.push("placement: give nodes or a selector".to_owned()),
            (false, false) => bad.push("placement: give nodes or a selector, not both".to_owned()),
            _ => {}
        }
        for (i, n) in p.nodes.iter().enumerate() {
            if let Err(e) = flotilla_common::NodeId::new(n.clone()) {
                bad.push(format!("placement.nodes[{i}] {n:?}: {e}"));
            }
            if p.nodes[..i].contains(n) {
                bad.push(format!("placement.nodes[{i}] {n:?}: listed twice"));
            }
        }
        if !p.nodes.is_empty() && (p.nodes.len() as u64) < u64::from(p.replicas) {
            bad.push(format!(
                "placement: {} replicas need {} nodes (one replica per node), {} listed",
                p.replicas,
                p.replicas,
                p.nodes.len()
            ));
        }
        if let Err(e) = flotilla_common::NodeId::new(self.gateway.node.clone()) {
            bad.push(format!("gateway.node {:?}: {e}", self.gateway.node));
        }
        if let Err(e) = flotilla_common::command::gateway::validate_upstream(&self.gateway.upstream) {
            bad.push(format!("gateway.upstream: {e}"));
        }
        self.validate_strategy(&mut bad);
        self.validate_gates(&mut bad);
        if bad.is_empty() { Ok(()) } else { Err(SpecError(bad)) }
    }

    fn validate_strategy(&self, bad: &mut Vec<String>) {
        let s = &self.strategy;
        let steps = s.traffic_steps();
        if steps.is_empty() && s.kind != StrategyKind::Rolling {
            bad.push("strategy.steps: give at least one traffic share".to_owned());
        }
        for (i, w) in steps.iter().enumerate() {
            if *w == 0 || *w > 100 {
                bad.push(format!("strategy.steps[{i}]: {w} must be 1..=100"));
            }
            if i > 0 && *w <= steps[i - 1] {
                bad.push(format!("strategy.steps[{i}]: {w} must be above the step before ({})", steps[i - 1]));
            }
        }
        match s.kind {
            StrategyKind::BlueGreen if steps.last().is_some_and(|w| *w != 100) => {
                bad.push("strategy.steps: a blue-green rollout's last step must be 100".to_owned());
            }
            StrategyKind::Canary if steps.contains(&100) => {
                bad.push(
                    "strategy.steps: canary shares must stay below 100 (the rest follows the canaries)".to_owned(),
                );
            }
            StrategyKind::Canary if s.canary == 0 || s.canary >= self.placement.replicas.max(2) => {
                bad.push(format!(
                    "strategy.canary: {} must be at least 1 and below placement.replicas ({})",
                    s.canary, self.placement.replicas
                ));
            }
            StrategyKind::Rolling if !s.steps.is_empty() => {
                bad.push("strategy.steps: a rolling update shifts traffic replica by replica; remove steps".to_owned());
            }
            _ => {}
        }
        if s.max_unavailable == 0 {
            bad.push("strategy.max_unavailable: must be at least 1".to_owned());
        }
        if s.max_surge == 0 {
            bad.push("strategy.max_surge: must be at least 1".to_owned());
        }
        if s.healthy_deadline <= s.min_healthy_time {
            bad.push(format!(
                "strategy.healthy_deadline ({}) must be longer than min_healthy_time ({})",
                humantime::format_duration(s.healthy_deadline),
                humantime::format_duration(s.min_healthy_time)
            ));
        }
        if s.progress_deadline < s.healthy_deadline {
            bad.push("strategy.progress_deadline must be at least healthy_deadline".to_owned());
        }
    }

    fn validate_gates(&self, bad: &mut Vec<String>) {
        let g = &self.gates;
        if !(0.0..=1.0).contains(&g.error_ratio) {
            bad.push(format!("gates.error_ratio: {} must be within 0..=1", g.error_ratio));
        }
        if !(0.0..=1.0).contains(&g.error_ratio_margin) {
            bad.push(format!("gates.error_ratio_margin: {} must be within 0..=1", g.error_ratio_margin));
        }
        if !(g.baseline_factor.is_finite() && g.baseline_factor >= 1.0) {
            bad.push(format!("gates.baseline_factor: {} must be at least 1", g.baseline_factor));
        }
    }

    /// Whether `other` would run the same replicas (a re-apply changes nothing).
    pub fn same_workload(&self, other: &Self) -> bool {
        self.model == other.model && self.runtime == other.runtime
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} must be 1 to {MAX_NAME_LEN} of [a-z0-9-], start with a letter and not end with '-'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "name: llama\nmodel: { name: llama-8b }\nruntime: { image: vllm:1, port: 8000, host_port: 18000, gpus: 1 }\n\
                           placement: { nodes: [a, b], replicas: 2 }\ngateway: { node: gw, upstream: llama }\n";

    #[test]
    fn a_minimal_spec_gets_blue_green_with_the_seed_steps() {
        let spec = DeploymentSpec::parse(MINIMAL).unwrap();
        assert_eq!(spec.strategy.kind, StrategyKind::BlueGreen);
        assert_eq!(spec.strategy.traffic_steps(), vec![10, 50, 100]);
        assert!(spec.strategy.auto_revert);
        assert_eq!(spec.gates.min_requests, 20);
    }

    #[test]
    fn an_image_the_agents_would_refuse_is_refused_here() {
        for image in ["ghcr.io/huggingface/Text-generation-inference:3", "vllm:bad tag", "a//b", "-x:1"] {
            let text = MINIMAL.replace("vllm:1", &format!("'{image}'"));
            let err = DeploymentSpec::parse(&text).unwrap_err().to_string();
            assert!(err.contains("runtime.image") && err.contains("not an image reference"), "{image}: {err}");
        }
        let pinned = format!("registry.example:5000/vllm/vllm-openai:v0.8.5@sha256:{}", "a".repeat(64));
        let text = MINIMAL.replace("vllm:1", &pinned);
        assert!(DeploymentSpec::parse(&text).is_ok());
    }

    #[test]
    fn a_health_check_the_agents_would_refuse_is_refused_here() {
        let with = |health: &str| MINIMAL.replace("gpus: 1 }", &format!("gpus: 1, health: {health} }}"));
        for (health, why) in [
            ("{}", "found 0"),
            ("{ http: { port: 8000, path: '/x; reboot' } }", "http.path"),
            ("{ shell: x, retries: 0 }", "retries"),
            ("{ shell: x, every: 1s }", "unknown field"),
        ] {
            let err = DeploymentSpec::parse(&with(health)).unwrap_err().to_string();
            assert!(err.contains("runtime.health") && err.contains(why), "{health}: {err}");
        }
        assert!(DeploymentSpec::parse(&with("{ http: { port: 8000, path: /health }, interval: 2s }")).is_ok());
    }

    #[test]
    fn every_problem_is_named_with_its_field() {
        let text = "name: Llama_\nmodel: { name: '' }\nruntime: { image: x, port: 0, host_port: 18000, gpu_memory: 1GiB }\n\
                    placement: { nodes: [a, a], selector: {x: y}, replicas: 3 }\ngateway: { node: gw, upstream: 'a b' }\n\
                    strategy: { type: blue-green, steps: [50, 10], healthy_deadline: 1s, min_healthy_time: 5s }\n\
                    gates: { error_ratio: 2 }\n";
        let err = DeploymentSpec::parse(text).unwrap_err().to_string();
        for needle in [
            "name: \"Llama_\"",
            "model.name",
            "runtime.port",
            "runtime.gpu_memory",
            "not both",
            "listed twice",
            "gateway.upstream",
            "steps[1]",
            "last step must be 100",
            "healthy_deadline",
            "gates.error_ratio",
        ] {
            assert!(err.contains(needle), "{needle:?} missing from: {err}");
        }
        let unknown = DeploymentSpec::parse(&format!("{MINIMAL}colour: blue\n")).unwrap_err().to_string();
        assert!(unknown.contains("unknown field `colour`"), "{unknown}");
    }

    #[test]
    fn canary_and_rolling_have_their_own_rules() {
        let canary = format!("{MINIMAL}strategy: {{ type: canary, canary: 2 }}\n");
        assert!(DeploymentSpec::parse(&canary).unwrap_err().to_string().contains("strategy.canary"));
        let rolling = format!("{MINIMAL}strategy: {{ type: rolling, steps: [10] }}\n");
        assert!(DeploymentSpec::parse(&rolling).unwrap_err().to_string().contains("remove steps"));
        let ok = format!("{MINIMAL}strategy: {{ type: rolling, max_unavailable: 1, bake: 0s }}\n");
        assert_eq!(DeploymentSpec::parse(&ok).unwrap().strategy.bake, Duration::ZERO);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("40GiB").unwrap(), 40 << 30);
        assert_eq!(parse_bytes("1.5GB").unwrap(), 1_500_000_000);
        assert!(parse_bytes("12 parsecs").unwrap_err().contains("unknown unit"));
        let spec = DeploymentSpec::parse(&MINIMAL.replace("gpus: 1", "gpus: 1, gpu_memory: 20GiB")).unwrap();
        assert_eq!(spec.runtime.gpu_memory, Some(20 << 30));
    }
}
