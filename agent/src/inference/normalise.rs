//! Turns a parsed page into `flotilla_inference_*` samples by the mapping table: picks
//! the engine, the first source name the page has for each target, drops the
//! engine-internal labels and combines the series that then coincide.
//!
//! Values that cannot be right are not passed on: a NaN or infinite value, a negative
//! counter or histogram count, a bucket without a numeric `le`, or buckets that are
//! not cumulative drop that output series (for that model) and add a problem line,
//! because a partial sum over data-parallel ranks would look plausible and be wrong.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use flotilla_common::model::Sample;

use super::engine::{self, Engine};
use super::exposition::{Page, PageSample};
use super::mapping::{Aggregate, MapEntry, MappingTable, TargetKind};

/// At most this many problem lines per page; a broken page should not flood the
/// status line (the rest are counted).
const MAX_PROBLEMS: usize = 8;

/// The longest rendering of one source series in a problem line.
const MAX_SERIES_CHARS: usize = 160;

/// The result of mapping one page.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Normalised {
    pub engine: Engine,
    /// Mapped samples, labelled `engine`, `model` (when known) and `le` (buckets).
    pub samples: Vec<Sample>,
    /// Targets whose source series are on the page, even where values were dropped:
    /// schema drift is about names, not values.
    pub present: BTreeSet<String>,
    /// What was dropped and why; empty when the page mapped cleanly.
    pub problems: Vec<String>,
}

/// The page has no series of any engine the table knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnknownEngine;

/// Maps `page`. `engine` is the configured engine (detected when `None`);
/// `fallback_model` names the model for engines whose series carry no model label.
pub(crate) fn normalise(
    page: &Page,
    engine: Option<Engine>,
    fallback_model: Option<&str>,
    table: &MappingTable,
) -> Result<Normalised, UnknownEngine> {
    let engine = match engine {
        Some(e) => e,
        None => engine::detect(page.samples.iter().map(|s| s.name.as_str()), |e| table.spec(e).prefix.as_str())
            .ok_or(UnknownEngine)?,
    };
    let spec = table.spec(engine);
    // Only the engine's own series can be sources; pages also carry hundreds of
    // process_, python_ and http_ series that need no index.
    let mut index: HashMap<&str, Vec<&PageSample>> = HashMap::new();
    for s in page.samples.iter().filter(|s| s.name.starts_with(spec.prefix.as_str())) {
        index.entry(s.name.as_str()).or_default().push(s);
    }
    let mut mapper = Mapper {
        index,
        engine,
        model_label: spec.model_label.as_deref(),
        fallback_model,
        samples: Vec::new(),
        present: BTreeSet::new(),
        problems: Vec::new(),
        more_problems: 0,
    };
    for entry in table.entries(engine) {
        match entry.kind {
            TargetKind::Gauge | TargetKind::Counter => mapper.scalar(entry),
            TargetKind::Histogram => mapper.histogram(entry),
        }
    }
    let mut problems = mapper.problems;
    if mapper.more_problems > 0 {
        problems.push(format!("… and {} more", mapper.more_problems));
    }
    Ok(Normalised { engine, samples: mapper.samples, present: mapper.present, problems })
}

struct Mapper<'p, 'c> {
    index: HashMap<&'p str, Vec<&'p PageSample>>,
    engine: Engine,
    model_label: Option<&'c str>,
    fallback_model: Option<&'c str>,
    samples: Vec<Sample>,
    present: BTreeSet<String>,
    problems: Vec<String>,
    more_problems: usize,
}

/// Several source values becoming one output value.
#[derive(Debug, Default)]
struct Acc {
    sum: f64,
    max: Option<f64>,
    n: u32,
}

impl Acc {
    fn add(&mut self, v: f64) {
        self.sum += v;
        self.max = Some(self.max.map_or(v, |m| m.max(v)));
        self.n += 1;
    }

    fn value(&self, how: Aggregate) -> f64 {
        match how {
            Aggregate::Sum => self.sum,
            Aggregate::Mean => self.sum / f64::from(self.n.max(1)),
            Aggregate::Max => self.max.unwrap_or(0.0),
        }
    }
}

/// One output histogram (one model) being assembled.
#[derive(Debug, Default)]
struct Hist {
    buckets: BTreeMap<Le, f64>,
    sum: Option<f64>,
    count: Option<f64>,
    bad: bool,
}

/// A bucket bound, ordered totally so it can key a map (+Inf sorts last).
#[derive(Debug, Clone, Copy)]
struct Le(f64);

impl PartialEq for Le {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Le {}
impl PartialOrd for Le {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Le {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

impl<'p> Mapper<'p, '_> {
    /// The first source name present on the page, with its samples.
    fn first_source(&self, mut names: impl Iterator<Item = String>) -> Option<(String, Vec<&'p PageSample>)> {
        names.find_map(|n| self.index.get(n.as_str()).map(|v| (n, v.clone())))
    }

    fn model(&self, s: &PageSample) -> Option<String> {
        self.model_label.and_then(|l| s.label(l)).filter(|m| !m.is_empty()).or(self.fallback_model).map(str::to_owned)
    }

    fn labels(&self, model: Option<&String>) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        labels.insert("engine".to_owned(), self.engine.as_str().to_owned());
        if let Some(m) = model {
            labels.insert("model".to_owned(), m.clone());
        }
        labels
    }

    fn problem(&mut self, message: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(message);
        } else {
            self.more_problems += 1;
        }
    }

    fn scalar(&mut self, entry: &MapEntry) {
        let counter = entry.kind == TargetKind::Counter;
        let Some((_, series)) = self.first_source(entry.sources.iter().cloned()) else {
            return;
        };
        self.present.insert(entry.target.clone());
        let mut groups: BTreeMap<Option<String>, Option<Acc>> = BTreeMap::new();
        for s in series.iter().copied() {
            if entry.excludes(&s.labels) {
                continue;
            }
            let slot = groups.entry(self.model(s)).or_insert_with(|| Some(Acc::default()));
            match invalid(s.value, counter) {
                None => {
                    if let Some(acc) = slot {
                        acc.add(s.value);
                    }
                }
                Some(why) => {
                    *slot = None;
                    self.problem(format!("{}: {} {why}; dropped", entry.target, render(s)));
                }
            }
        }
        for (model, acc) in groups {
            let Some(acc) = acc else { continue };
            let value = scale(acc.value(entry.aggregate), entry.scale);
            // Finite inputs can still sum past f64::MAX.
            if !value.is_finite() {
                self.problem(format!("{}: combining the {} source series overflows; dropped", entry.target, acc.n));
                continue;
            }
            self.samples.push(Sample { name: entry.target.clone(), labels: self.labels(model.as_ref()), value });
        }
    }

    fn histogram(&mut self, entry: &MapEntry) {
        let parts = [Part::Bucket, Part::Count, Part::Sum];
        let Some((found, _)) =
            self.first_source(entry.sources.iter().flat_map(|s| parts.map(|p| format!("{s}{}", p.suffix()))))
        else {
            return;
        };
        // The name found ends in one of the three suffixes; strip it back to the base.
        let base = parts.iter().find_map(|p| found.strip_suffix(p.suffix())).unwrap_or(&found).to_owned();
        self.present.insert(entry.target.clone());
        let mut hists: BTreeMap<Option<String>, Hist> = BTreeMap::new();
        for part in parts {
            let name = format!("{base}{}", part.suffix());
            let series = self.index.get(name.as_str()).cloned().unwrap_or_default();
            for s in series {
                if entry.excludes(&s.labels) {
                    continue;
                }
                let h = hists.entry(self.model(s)).or_default();
                if let Some(why) = h.add(part, s, entry.scale) {
                    self.problem(format!("{}: {} {why}; histogram dropped", entry.target, render(s)));
                }
            }
        }
        for (model, h) in hists {
            if h.bad {
                continue;
            }
            if let Some(why) = h.not_cumulative() {
                self.problem(format!("{}: {base} {why}; histogram dropped", entry.target));
                continue;
            }
            let labels = self.labels(model.as_ref());
            for (le, count) in &h.buckets {
                let mut l = labels.clone();
                l.insert("le".to_owned(), format_le(le.0));
                self.samples.push(Sample { name: format!("{}_bucket", entry.target), labels: l, value: *count });
            }
            for (part, value) in [(Part::Sum, h.sum), (Part::Count, h.count)] {
                if let Some(value) = value {
                    self.samples.push(Sample {
                        name: format!("{}{}", entry.target, part.suffix()),
                        labels: labels.clone(),
                        value,
                    });
                }
            }
        }
    }
}

/// The three kinds of line a histogram is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Bucket,
    Sum,
    Count,
}

impl Part {
    fn suffix(self) -> &'static str {
        match self {
            Self::Bucket => "_bucket",
            Self::Sum => "_sum",
            Self::Count => "_count",
        }
    }
}

impl Hist {
    /// Adds one source line; says why the histogram is unusable if it now is.
    fn add(&mut self, part: Part, s: &PageSample, factor: f64) -> Option<String> {
        if self.bad {
            return None;
        }
        let why = match part {
            Part::Bucket => {
                let le = s.label("le").and_then(|l| l.parse::<f64>().ok()).filter(|le| !le.is_nan());
                match (le, invalid(s.value, true)) {
                    (None, _) => Some("has no numeric le label"),
                    (Some(_), Some(why)) => Some(why),
                    (Some(le), None) => {
                        *self.buckets.entry(Le(scale(le, factor))).or_insert(0.0) += s.value;
                        None
                    }
                }
            }
            Part::Sum => match invalid(s.value, false) {
                Some(why) => Some(why),
                None => {
                    self.sum = Some(self.sum.unwrap_or(0.0) + scale(s.value, factor));
                    None
                }
            },
            Part::Count => match invalid(s.value, true) {
                Some(why) => Some(why),
                None => {
                    self.count = Some(self.count.unwrap_or(0.0) + s.value);
                    None
                }
            },
        };
        self.bad = why.is_some();
        why.map(str::to_owned)
    }

    /// Why the summed buckets cannot be a Prometheus histogram, if they cannot.
    fn not_cumulative(&self) -> Option<String> {
        match self.buckets.last_key_value() {
            None => return Some("has no buckets".to_owned()),
            Some((le, _)) if le.0 != f64::INFINITY => {
                return Some("has no +Inf bucket".to_owned());
            }
            Some(_) => {}
        }
        let mut totals = self.buckets.values().chain(self.sum.iter()).chain(self.count.iter());
        if totals.any(|v| !v.is_finite()) {
            return Some("overflows when its source series are combined".to_owned());
        }
        let mut previous = 0.0;
        for (le, count) in &self.buckets {
            if *count < previous {
                return Some(format!("bucket le={} is below the one before", format_le(le.0)));
            }
            previous = *count;
        }
        None
    }
}

/// Why `value` cannot be passed on, if it cannot.
fn invalid(value: f64, counter: bool) -> Option<&'static str> {
    if value.is_nan() {
        Some("is NaN")
    } else if value.is_infinite() {
        Some("is infinite")
    } else if counter && value < 0.0 {
        Some("is a negative counter")
    } else {
        None
    }
}

/// Applies a table scale factor. Factors below 1 that are exact reciprocals (0.001,
/// 0.01) divide instead of multiply, so 250 ms becomes 0.25 s, not 0.25000000000000006.
fn scale(value: f64, factor: f64) -> f64 {
    let inverse = 1.0 / factor;
    if factor < 1.0 && (inverse - inverse.round()).abs() < 1e-9 { value / inverse.round() } else { value * factor }
}

/// The canonical `le` text: `+Inf`, else the shortest decimal that reads back to the
/// same bound, so vLLM's `1.0` and SGLang's `1` land on one series.
pub(crate) fn format_le(le: f64) -> String {
    if le == f64::INFINITY { "+Inf".to_owned() } else { format!("{le}") }
}

fn render(s: &PageSample) -> String {
    let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    let text = format!("{}{{{}}} = {}", s.name, labels.join(","), s.value);
    if text.chars().count() <= MAX_SERIES_CHARS {
        text
    } else {
        let cut: String = text.chars().take(MAX_SERIES_CHARS).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::exposition::parse;

    fn map(text: &str, table: &MappingTable) -> Normalised {
        normalise(&parse(text).unwrap(), None, None, table).unwrap()
    }

    fn builtin() -> &'static MappingTable {
        MappingTable::builtin().unwrap()
    }

    fn value(n: &Normalised, name: &str) -> Option<f64> {
        let mut found = n.samples.iter().filter(|s| s.name == name);
        let first = found.next().map(|s| s.value);
        assert!(found.next().is_none(), "{name} is not a single series");
        first
    }

    const RUNNING: &str = "# TYPE vllm:num_requests_running gauge\n";

    #[test]
    fn bad_values_drop_the_series_and_say_why() {
        let n = map(
            &format!(
                "{RUNNING}vllm:num_requests_running{{model_name=\"m\"}} NaN\n\
                 vllm:num_requests_waiting{{model_name=\"m\"}} 2\n\
                 vllm:prompt_tokens_total{{model_name=\"m\"}} -4\n\
                 vllm:generation_tokens_total{{model_name=\"m\"}} +Inf\n\
                 vllm:kv_cache_usage_perc{{model_name=\"m\"}} -Inf\n"
            ),
            builtin(),
        );
        assert_eq!(value(&n, "flotilla_inference_requests_waiting"), Some(2.0));
        for (target, why) in [
            ("flotilla_inference_requests_running", "is NaN"),
            ("flotilla_inference_prompt_tokens_total", "is a negative counter"),
            ("flotilla_inference_generation_tokens_total", "is infinite"),
            ("flotilla_inference_kv_cache_usage_ratio", "is infinite"),
        ] {
            assert_eq!(value(&n, target), None, "{target}");
            assert!(n.present.contains(target), "{target} is still on the page");
            assert!(n.problems.iter().any(|p| p.starts_with(target) && p.contains(why)), "{target}: {:?}", n.problems);
        }
        assert!(n.samples.iter().all(|s| s.value.is_finite()));
    }

    #[test]
    fn sums_past_f64_max_are_dropped() {
        let n = map(
            &format!(
                "{RUNNING}vllm:num_requests_running{{engine=\"0\"}} 1e308\nvllm:num_requests_running{{engine=\"1\"}} 1e308\n"
            ),
            builtin(),
        );
        assert_eq!(value(&n, "flotilla_inference_requests_running"), None);
        assert!(n.problems[0].contains("overflows"), "{:?}", n.problems);
    }

    #[test]
    fn one_bad_rank_drops_the_whole_sum() {
        let n = map(
            &format!(
                "{RUNNING}vllm:num_requests_running{{engine=\"0\",model_name=\"m\"}} 3\n\
                 vllm:num_requests_running{{engine=\"1\",model_name=\"m\"}} NaN\n"
            ),
            builtin(),
        );
        assert_eq!(value(&n, "flotilla_inference_requests_running"), None);
    }

    #[test]
    fn gauges_combine_by_the_table_and_models_stay_apart() {
        let n = map(
            "vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"a\"} 0.2\n\
             vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"a\"} 0.4\n\
             vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"b\"} 0.9\n",
            builtin(),
        );
        let got: Vec<_> = n.samples.iter().map(|s| (s.labels["model"].as_str(), (s.value * 100.0).round())).collect();
        assert_eq!(got, [("a", 30.0), ("b", 90.0)]);
        assert_eq!(n.samples[0].labels["engine"], "vllm");
    }

    fn scaled_table() -> MappingTable {
        let engines = "[engines.vllm]\nprefix = \"vllm:\"\nmodel_label = \"model_name\"\n[engines.sglang]\nprefix = \"sglang:\"\n[engines.tgi]\nprefix = \"tgi_\"\n[engines.llamacpp]\nprefix = \"llamacpp:\"\n";
        let rows = "[[map]]\nengine = \"vllm\"\ntarget = \"flotilla_inference_kv_cache_usage_ratio\"\nkind = \"gauge\"\nsources = [\"vllm:cache_percent\"]\nscale = 0.01\naggregate = \"max\"\n\
                    [[map]]\nengine = \"vllm\"\ntarget = \"flotilla_inference_time_to_first_token_seconds\"\nkind = \"histogram\"\nsources = [\"vllm:ttft_ms\"]\nscale = 0.001\n";
        MappingTable::from_toml(&format!("{engines}{rows}")).unwrap()
    }

    #[test]
    fn scale_turns_percent_into_ratio_and_ms_into_seconds() {
        let n = map(
            "vllm:cache_percent{engine=\"0\"} 35\nvllm:cache_percent{engine=\"1\"} 70\n\
             # TYPE vllm:ttft_ms histogram\n\
             vllm:ttft_ms_bucket{le=\"250\"} 3\nvllm:ttft_ms_bucket{le=\"1000\"} 5\n\
             vllm:ttft_ms_bucket{le=\"+Inf\"} 6\nvllm:ttft_ms_sum 2500\nvllm:ttft_ms_count 6\n",
            &scaled_table(),
        );
        assert_eq!(value(&n, "flotilla_inference_kv_cache_usage_ratio"), Some(0.7));
        let les: Vec<_> = n
            .samples
            .iter()
            .filter(|s| s.name.ends_with("_bucket"))
            .map(|s| (s.labels["le"].as_str(), s.value))
            .collect();
        assert_eq!(les, [("0.25", 3.0), ("1", 5.0), ("+Inf", 6.0)]);
        assert_eq!(value(&n, "flotilla_inference_time_to_first_token_seconds_sum"), Some(2.5));
        assert_eq!(value(&n, "flotilla_inference_time_to_first_token_seconds_count"), Some(6.0));
    }

    #[test]
    fn broken_histograms_are_dropped() {
        let h = "# TYPE vllm:time_to_first_token_seconds histogram\n";
        for (body, why) in [
            (
                "vllm:time_to_first_token_seconds_bucket{le=\"1\"} 2\nvllm:time_to_first_token_seconds_bucket{le=\"+Inf\"} 1\n",
                "below",
            ),
            ("vllm:time_to_first_token_seconds_bucket{le=\"1\"} 2\n", "+Inf"),
            ("vllm:time_to_first_token_seconds_bucket{le=\"x\"} 2\n", "numeric le"),
            ("vllm:time_to_first_token_seconds_bucket{le=\"+Inf\"} -1\n", "negative"),
            ("vllm:time_to_first_token_seconds_sum NaN\n", "NaN"),
            ("vllm:time_to_first_token_seconds_count 3\n", "no buckets"),
        ] {
            let n = map(&format!("{h}{body}"), builtin());
            assert!(n.samples.is_empty(), "{body}");
            assert!(n.present.contains("flotilla_inference_time_to_first_token_seconds"));
            assert!(n.problems.iter().any(|p| p.contains(why)), "{why}: {:?}", n.problems);
        }
    }

    #[test]
    fn problem_lines_are_bounded() {
        let mut page = String::from(RUNNING);
        for i in 0..100 {
            page.push_str(&format!("vllm:num_requests_running{{model_name=\"m{i}\"}} NaN\n"));
        }
        let n = map(&page, builtin());
        assert_eq!(n.problems.len(), MAX_PROBLEMS + 1);
        assert!(n.problems[MAX_PROBLEMS].contains("92 more"), "{:?}", n.problems);
    }

    #[test]
    fn pages_without_an_engine_need_one_configured() {
        let page = parse("DCGM_FI_DEV_GPU_TEMP{gpu=\"0\"} 40\n").unwrap();
        assert_eq!(normalise(&page, None, None, builtin()), Err(UnknownEngine));
        let n = normalise(&page, Some(Engine::Tgi), Some("m"), builtin()).unwrap();
        assert_eq!((n.engine, n.samples.len()), (Engine::Tgi, 0));
    }

    #[test]
    fn le_text_is_canonical() {
        assert_eq!(format_le(1.0), "1");
        assert_eq!(format_le(0.00015000000000000001), "0.00015000000000000001");
        assert_eq!(format_le(f64::INFINITY), "+Inf");
        assert_eq!(scale(250.0, 0.001), 0.25);
        assert_eq!(scale(3.0, 2.0), 6.0);
    }
}
