//! The mapping table from engine series to `flotilla_inference_*` series. The table
//! is data (`mapping.toml`, compiled in), so a new engine version usually needs a
//! line there and a fixture, not code.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use serde::Deserialize;

use super::engine::Engine;
use super::error::InferenceError;

/// The table shipped with the agent.
const BUILTIN: &str = include_str!("mapping.toml");

/// Every target name starts with this.
pub(crate) const TARGET_PREFIX: &str = "flotilla_inference_";

/// What kind of series a target is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TargetKind {
    Gauge,
    Counter,
    Histogram,
}

/// How source series that land on the same output series combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Aggregate {
    #[default]
    Sum,
    Mean,
    Max,
}

/// How to recognise an engine's series and its model.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EngineSpec {
    /// Every series of the engine starts with this (`vllm:`).
    pub prefix: String,
    /// The label naming the served model (`model_name`), where the engine has one.
    #[serde(default)]
    pub model_label: Option<String>,
}

/// One row: one engine's way to one target.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MapEntry {
    pub engine: Engine,
    pub target: String,
    pub kind: TargetKind,
    /// Newest name first; the first one present on a page is used.
    pub sources: Vec<String>,
    #[serde(default = "unit_scale")]
    pub scale: f64,
    #[serde(default)]
    pub aggregate: Aggregate,
    /// Source series with any of these label values are skipped.
    #[serde(default)]
    pub exclude: BTreeMap<String, Vec<String>>,
}

fn unit_scale() -> f64 {
    1.0
}

impl MapEntry {
    /// Whether the table says to leave out a series with these labels.
    pub fn excludes(&self, labels: &[(String, String)]) -> bool {
        labels.iter().any(|(k, v)| self.exclude.get(k).is_some_and(|values| values.iter().any(|x| x == v)))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    engines: BTreeMap<String, EngineSpec>,
    map: Vec<MapEntry>,
}

/// A checked mapping table.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MappingTable {
    /// Indexed by [`engine_index`].
    engines: Vec<EngineSpec>,
    entries: Vec<MapEntry>,
}

fn engine_index(engine: Engine) -> usize {
    match engine {
        Engine::Vllm => 0,
        Engine::Sglang => 1,
        Engine::Tgi => 2,
        Engine::LlamaCpp => 3,
    }
}

impl MappingTable {
    /// The table compiled into the agent, parsed and checked on first use.
    pub fn builtin() -> Result<&'static MappingTable, InferenceError> {
        static TABLE: OnceLock<Result<MappingTable, String>> = OnceLock::new();
        TABLE
            .get_or_init(|| Self::from_toml(BUILTIN))
            .as_ref()
            .map_err(|message| InferenceError::MappingTable { message: message.clone() })
    }

    /// Parses and checks a table in the `mapping.toml` format.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let raw: RawTable = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut engines = Vec::with_capacity(Engine::ALL.len());
        for engine in Engine::ALL {
            let spec = raw.engines.get(engine.as_str()).ok_or_else(|| format!("[engines.{engine}] is missing"))?;
            if spec.prefix.is_empty() {
                return Err(format!("[engines.{engine}] has an empty prefix"));
            }
            engines.push(spec.clone());
        }
        if let Some(unknown) = raw.engines.keys().find(|k| !Engine::ALL.iter().any(|e| e.as_str() == k.as_str())) {
            return Err(format!("[engines.{unknown}] is not a known engine"));
        }
        let table = Self { engines, entries: raw.map };
        table.check_entries()?;
        Ok(table)
    }

    fn check_entries(&self) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        let mut kinds: BTreeMap<&str, TargetKind> = BTreeMap::new();
        for e in &self.entries {
            let at = format!("[[map]] {} -> {}", e.engine, e.target);
            let name_ok = e.target.starts_with(TARGET_PREFIX)
                && e.target.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !name_ok {
                return Err(format!("{at}: target must be {TARGET_PREFIX}[a-z0-9_]*"));
            }
            if (e.kind == TargetKind::Counter) != e.target.ends_with("_total") {
                return Err(format!("{at}: counters, and only counters, end in _total"));
            }
            if e.sources.is_empty() {
                return Err(format!("{at}: sources is empty"));
            }
            let prefix = &self.spec(e.engine).prefix;
            if let Some(s) = e.sources.iter().find(|s| !s.starts_with(prefix.as_str())) {
                return Err(format!("{at}: source {s} lacks the engine prefix {prefix}"));
            }
            if !(e.scale.is_finite() && e.scale > 0.0) {
                return Err(format!("{at}: scale must be a positive number"));
            }
            if e.kind != TargetKind::Gauge && e.aggregate != Aggregate::Sum {
                return Err(format!("{at}: counters and histograms can only be summed"));
            }
            if !seen.insert((e.engine, e.target.as_str())) {
                return Err(format!("{at}: mapped twice"));
            }
            if let Some(other) = kinds.insert(&e.target, e.kind)
                && other != e.kind
            {
                return Err(format!("{at}: kind differs from another engine's row"));
            }
        }
        Ok(())
    }

    /// How to recognise `engine`.
    pub fn spec(&self, engine: Engine) -> &EngineSpec {
        &self.engines[engine_index(engine)]
    }

    /// The rows for `engine`, in table order.
    pub fn entries(&self, engine: Engine) -> impl Iterator<Item = &MapEntry> {
        self.entries.iter().filter(move |e| e.engine == engine)
    }

    /// The target names `engine` can produce.
    #[cfg(test)]
    pub fn targets(&self, engine: Engine) -> BTreeSet<&str> {
        self.entries(engine).map(|e| e.target.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_table_loads() {
        let t = MappingTable::builtin().unwrap();
        for target in [
            "flotilla_inference_requests_running",
            "flotilla_inference_requests_waiting",
            "flotilla_inference_time_to_first_token_seconds",
            "flotilla_inference_e2e_request_latency_seconds",
            "flotilla_inference_prompt_tokens_total",
            "flotilla_inference_generation_tokens_total",
            "flotilla_inference_requests_succeeded_total",
            "flotilla_inference_kv_cache_usage_ratio",
        ] {
            assert!(t.targets(Engine::Vllm).contains(target), "{target}");
        }
        for engine in [Engine::Sglang, Engine::Tgi, Engine::LlamaCpp] {
            let targets = t.targets(engine);
            for target in [
                "flotilla_inference_requests_running",
                "flotilla_inference_requests_waiting",
                "flotilla_inference_prompt_tokens_total",
                "flotilla_inference_generation_tokens_total",
            ] {
                assert!(targets.contains(target), "{engine} {target}");
            }
        }
        assert_eq!(t.spec(Engine::Vllm).model_label.as_deref(), Some("model_name"));
    }

    const ENGINES: &str = "[engines.vllm]\nprefix = \"vllm:\"\n[engines.sglang]\nprefix = \"sglang:\"\n[engines.tgi]\nprefix = \"tgi_\"\n[engines.llamacpp]\nprefix = \"llamacpp:\"\n";

    fn check(rows: &str) -> Result<MappingTable, String> {
        MappingTable::from_toml(&format!("{ENGINES}{rows}"))
    }

    #[test]
    fn inconsistent_rows_are_rejected() {
        let row = |target: &str, kind: &str, extra: &str| {
            format!(
                "[[map]]\nengine = \"vllm\"\ntarget = \"{target}\"\nkind = \"{kind}\"\nsources = [\"vllm:x\"]\n{extra}\n"
            )
        };
        assert!(check(&row("flotilla_inference_x_total", "counter", "")).is_ok());
        for (rows, why) in [
            (row("flotilla_inference_x", "counter", ""), "_total"),
            (row("flotilla_inference_x_total", "gauge", ""), "_total"),
            (row("other_x", "gauge", ""), "target must be"),
            (row("flotilla_inference_x", "gauge", "scale = 0.0"), "scale"),
            (row("flotilla_inference_x", "histogram", "aggregate = \"mean\""), "summed"),
            (row("flotilla_inference_x", "gauge", "sources = []").replace("sources = [\"vllm:x\"]\n", ""), "empty"),
            (row("flotilla_inference_x", "gauge", "").replace("vllm:x", "sglang:x"), "prefix"),
            (row("flotilla_inference_x", "gauge", "colour = 1"), "unknown field"),
            (row("flotilla_inference_x", "gauge", "").repeat(2), "twice"),
        ] {
            let err = check(&rows).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
        let err = MappingTable::from_toml("map = []\n[engines.vllm]\nprefix = \"v\"\n").unwrap_err();
        assert!(err.contains("sglang"), "{err}");
    }
}
