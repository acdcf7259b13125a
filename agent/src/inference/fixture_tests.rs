//! Parsing and mapping the real `/metrics` pages in `tests/fixtures/metrics/` (see
//! its SOURCES.md): every page parses, vLLM's old and new names meet, each engine's
//! core series map, histograms stay cumulative, drift shows across versions.

use std::collections::BTreeSet;

use flotilla_common::model::Sample;

use super::drift::SchemaTracker;
use super::engine::Engine;
use super::exposition;
use super::mapping::MappingTable;
use super::normalise::{Normalised, UnknownEngine, normalise};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/metrics");

pub(crate) fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{DIR}/{name}")).unwrap()
}

fn map(name: &str) -> Normalised {
    map_as(name, None)
}

fn map_as(name: &str, engine: Option<Engine>) -> Normalised {
    let page = exposition::parse(&fixture(name)).unwrap();
    normalise(&page, engine, None, MappingTable::builtin().unwrap()).unwrap()
}

fn names(n: &Normalised) -> BTreeSet<&str> {
    n.samples.iter().map(|s| s.name.as_str()).collect()
}

/// The value of the one series `name` (with no `le`).
fn value(n: &Normalised, name: &str) -> f64 {
    let found: Vec<&Sample> = n.samples.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "{name}: {found:?}");
    found[0].value
}

fn buckets<'a>(n: &'a Normalised, base: &str) -> Vec<(&'a str, f64)> {
    let name = format!("{base}_bucket");
    n.samples.iter().filter(|s| s.name == name).map(|s| (s.labels["le"].as_str(), s.value)).collect()
}

const VLLM_CORE: [&str; 8] = [
    "flotilla_inference_requests_running",
    "flotilla_inference_requests_waiting",
    "flotilla_inference_kv_cache_usage_ratio",
    "flotilla_inference_prompt_tokens_total",
    "flotilla_inference_generation_tokens_total",
    "flotilla_inference_requests_succeeded_total",
    "flotilla_inference_time_to_first_token_seconds_bucket",
    "flotilla_inference_e2e_request_latency_seconds_bucket",
];

#[test]
fn every_fixture_parses_and_maps() {
    let mut files: Vec<String> = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".txt"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 16, "{files:?}");
    let table = MappingTable::builtin().unwrap();
    for file in &files {
        let text = fixture(file);
        let page = exposition::parse(&text).unwrap_or_else(|e| panic!("{file}: {e:?}"));
        let lines = text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).count();
        assert_eq!(page.samples.len(), lines, "{file}: every sample line is kept");
        let expected = [
            ("vllm-", Engine::Vllm),
            ("sglang-", Engine::Sglang),
            ("tgi-", Engine::Tgi),
            ("llamacpp-", Engine::LlamaCpp),
        ]
        .into_iter()
        .find(|(prefix, _)| file.starts_with(prefix))
        .map(|(_, e)| e);
        let mapped = normalise(&page, None, None, table);
        match expected {
            // dcgm-exporter pages are GPU metrics, not an inference server's.
            None => assert_eq!(mapped, Err(UnknownEngine), "{file}"),
            // Families declared before any sample: nothing to detect from.
            Some(e) if page.samples.is_empty() => {
                assert_eq!(mapped, Err(UnknownEngine), "{file}");
                let n = normalise(&page, Some(e), None, table).unwrap();
                assert!(n.samples.is_empty() && n.problems.is_empty(), "{file}");
            }
            Some(e) => {
                let n = mapped.unwrap_or_else(|_| panic!("{file}: no engine detected"));
                assert_eq!(n.engine, e, "{file}");
                assert!(!n.samples.is_empty(), "{file}");
                assert!(n.problems.is_empty(), "{file}: {:?}", n.problems);
                for s in &n.samples {
                    assert!(s.name.starts_with("flotilla_inference_"), "{file}: {}", s.name);
                    assert!(s.value.is_finite() && s.value >= 0.0, "{file}: {s:?}");
                    assert_eq!(s.labels["engine"], e.as_str());
                    let allowed = ["engine", "model", "le"];
                    assert!(s.labels.keys().all(|k| allowed.contains(&k.as_str())), "{s:?}");
                }
            }
        }
    }
}

#[test]
fn old_and_new_vllm_pages_give_the_same_names() {
    let v0 = map("vllm-v0-0.6.6.post1.txt");
    let v1 = map("vllm-v1-0.11.0.txt");
    let dp2 = map("vllm-v1-0.11.0-dp2.txt");
    assert_eq!(names(&v0), names(&v1));
    assert_eq!(names(&v1), names(&dp2));
    assert_eq!(v0.present, v1.present);
    for core in VLLM_CORE {
        assert!(names(&v0).contains(core), "{core}");
    }
    // The rename itself: V0 and V1 up to 0.9 say gpu_cache_usage_perc, 0.10 on
    // kv_cache_usage_perc; both are the same flotilla series.
    let kv = "flotilla_inference_kv_cache_usage_ratio";
    for file in [
        "vllm-v0-0.6.6.post1.txt",
        "vllm-v1-0.8-excerpt.txt",
        "vllm-v1-0.10.0-excerpt.txt",
        "vllm-v1-0.11.0.txt",
        "vllm-v1-0.11.0-dp2.txt",
    ] {
        let ratio = value(&map(file), kv);
        assert!((0.0..=1.0).contains(&ratio), "{file}: {ratio}");
    }
    assert_eq!(value(&v0, kv), 0.07863720073664825);
    assert_eq!(value(&map("vllm-v1-0.10.0-excerpt.txt"), kv), 9.75010481363281e-06);
    let model = &v1.samples[0].labels["model"];
    assert_eq!(model, "Qwen/Qwen2.5-7B-Instruct");
}

#[test]
fn vllm_values_and_aborts() {
    let v1 = map("vllm-v1-0.11.0.txt");
    assert_eq!(value(&v1, "flotilla_inference_requests_running"), 7.0);
    assert_eq!(value(&v1, "flotilla_inference_requests_waiting"), 2.0);
    assert_eq!(value(&v1, "flotilla_inference_prompt_tokens_total"), 91437.0);
    assert_eq!(value(&v1, "flotilla_inference_generation_tokens_total"), 34815.0);
    // stop 118 + length 10; abort is left out.
    assert_eq!(value(&v1, "flotilla_inference_requests_succeeded_total"), 128.0);
    assert_eq!(value(&v1, "flotilla_inference_e2e_request_latency_seconds_count"), 128.0);
    let v0 = map("vllm-v0-0.6.6.post1.txt");
    assert_eq!(value(&v0, "flotilla_inference_requests_succeeded_total"), 96.0);
}

#[test]
fn data_parallel_ranks_are_combined() {
    let n = map("vllm-v1-0.11.0-dp2.txt");
    assert_eq!(value(&n, "flotilla_inference_requests_running"), 12.0);
    assert_eq!(value(&n, "flotilla_inference_requests_waiting"), 2.0);
    assert_eq!(value(&n, "flotilla_inference_prompt_tokens_total"), 37955.0 + 46938.0);
    assert_eq!(value(&n, "flotilla_inference_requests_succeeded_total"), 63.0 + 59.0 + 1.0 + 5.0);
    let kv = value(&n, "flotilla_inference_kv_cache_usage_ratio");
    assert!((kv - (0.18341708542713567 + 0.1306532663316583) / 2.0).abs() < 1e-12);
    let e2e = "flotilla_inference_e2e_request_latency_seconds";
    assert_eq!(value(&n, &format!("{e2e}_count")), 128.0);
    assert!((value(&n, &format!("{e2e}_sum")) - (280.0463347432276 + 326.1839707752879)).abs() < 1e-9);
    let inf = buckets(&n, e2e).last().copied().unwrap();
    assert_eq!(inf, ("+Inf", 128.0));
}

#[test]
fn sglang_tgi_and_llamacpp_map_their_core_series() {
    let sglang = map("sglang-0.5.9.txt");
    assert_eq!(value(&sglang, "flotilla_inference_requests_running"), 12.0);
    assert_eq!(value(&sglang, "flotilla_inference_requests_waiting"), 2.0);
    assert_eq!(value(&sglang, "flotilla_inference_prompt_tokens_total"), 103756.0);
    assert_eq!(value(&sglang, "flotilla_inference_generation_tokens_total"), 40519.0);
    assert_eq!(value(&sglang, "flotilla_inference_kv_cache_usage_ratio"), 0.02);
    assert_eq!(value(&sglang, "flotilla_inference_requests_aborted_total"), 4.0);
    assert_eq!(value(&sglang, "flotilla_inference_time_to_first_token_seconds_count"), 150.0);
    assert_eq!(sglang.samples[0].labels["model"], "Qwen/Qwen3-8B");
    let old = map("sglang-0.4.4-excerpt.txt");
    assert_eq!(value(&old, "flotilla_inference_kv_cache_usage_ratio"), 0.0);

    let tgi = map("tgi-3.3.7.txt");
    assert_eq!(value(&tgi, "flotilla_inference_requests_running"), 0.0);
    assert_eq!(value(&tgi, "flotilla_inference_requests_waiting"), 0.0);
    assert_eq!(value(&tgi, "flotilla_inference_prompt_tokens_total"), 75170.0);
    assert_eq!(value(&tgi, "flotilla_inference_generation_tokens_total"), 22578.0);
    assert_eq!(value(&tgi, "flotilla_inference_requests_succeeded_total"), 63.0);
    assert_eq!(value(&tgi, "flotilla_inference_requests_failed_total"), 1.0);
    assert_eq!(value(&tgi, "flotilla_inference_e2e_request_latency_seconds_count"), 63.0);
    assert!(tgi.samples.iter().all(|s| !s.labels.contains_key("model")));

    let llama = map("llamacpp-8733e0c.txt");
    assert_eq!(value(&llama, "flotilla_inference_requests_running"), 2.0);
    assert_eq!(value(&llama, "flotilla_inference_requests_waiting"), 0.0);
    assert_eq!(value(&llama, "flotilla_inference_prompt_tokens_total"), 1_187_340.0);
    assert_eq!(value(&llama, "flotilla_inference_generation_tokens_total"), 402871.0);
    assert_eq!(value(&llama, "flotilla_inference_kv_cache_usage_ratio"), 0.214905);
    let newer = map("llamacpp-0c1e570.txt");
    assert_eq!(value(&newer, "flotilla_inference_generation_tokens_total"), 2_418_730.0);
}

#[test]
fn the_model_comes_from_v1_models_where_the_page_has_none() {
    let page = exposition::parse(&fixture("tgi-3.3.7.txt")).unwrap();
    let n = normalise(&page, None, Some("bigscience/bloom-560m"), MappingTable::builtin().unwrap()).unwrap();
    assert!(n.samples.iter().all(|s| s.labels["model"] == "bigscience/bloom-560m"));
}

#[test]
fn histograms_keep_cumulative_buckets_with_le() {
    for file in
        ["vllm-v0-0.6.6.post1.txt", "vllm-v1-0.11.0.txt", "vllm-v1-0.11.0-dp2.txt", "sglang-0.5.9.txt", "tgi-3.3.7.txt"]
    {
        let n = map(file);
        let bases: BTreeSet<&str> = n.samples.iter().filter_map(|s| s.name.strip_suffix("_bucket")).collect();
        assert!(!bases.is_empty(), "{file}");
        for base in bases {
            let b = buckets(&n, base);
            assert!(b.len() > 2, "{file} {base}");
            let bounds: Vec<f64> = b.iter().map(|(le, _)| le.parse().unwrap()).collect();
            assert!(bounds.windows(2).all(|w| w[0] < w[1]), "{file} {base}: {bounds:?}");
            assert!(b.windows(2).all(|w| w[0].1 <= w[1].1), "{file} {base}: not cumulative");
            assert_eq!(b.last().unwrap().0, "+Inf");
            assert_eq!(b.last().unwrap().1, value(&n, &format!("{base}_count")), "{file} {base}");
            value(&n, &format!("{base}_sum"));
        }
    }
    // vLLM writes "1.0", the canonical form is "1".
    let v1 = map("vllm-v1-0.11.0.txt");
    let ttft = buckets(&v1, "flotilla_inference_time_to_first_token_seconds");
    assert!(ttft.contains(&("1", 122.0)), "{ttft:?}");
    assert!(ttft.contains(&("0.001", 0.0)), "{ttft:?}");
}

#[test]
fn drift_shows_when_an_upgrade_drops_a_series() {
    let mut drift = SchemaTracker::default();
    let old = map("llamacpp-8733e0c.txt");
    assert!(drift.observe(old.engine, &old.present).is_empty());
    // The newer llama-server no longer exports KV-cache usage.
    let new = map("llamacpp-0c1e570.txt");
    assert_eq!(drift.observe(new.engine, &new.present), ["flotilla_inference_kv_cache_usage_ratio"]);

    // A vLLM page that lost its KV-cache series (a rename the table does not know).
    let mut drift = SchemaTracker::default();
    let full = map("vllm-v1-0.11.0.txt");
    drift.observe(full.engine, &full.present);
    let renamed = fixture("vllm-v1-0.11.0.txt").replace("vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_v2");
    let page = exposition::parse(&renamed).unwrap();
    let n = normalise(&page, None, None, MappingTable::builtin().unwrap()).unwrap();
    assert_eq!(drift.observe(n.engine, &n.present), ["flotilla_inference_kv_cache_usage_ratio"]);
    // An old page is not drift: the V0 names map to the same targets.
    let v0 = map("vllm-v0-0.6.6.post1.txt");
    drift.observe(full.engine, &full.present);
    assert!(drift.observe(v0.engine, &v0.present).is_empty());
}

#[test]
fn a_huge_page_parses_within_bounds() {
    // About 8 MiB (the body cap) of one family with many label sets.
    let mut page = String::from("# TYPE vllm:num_requests_running gauge\n");
    let mut i = 0;
    while page.len() < super::MAX_METRICS_BYTES - 100 {
        page.push_str(&format!("vllm:num_requests_running{{model_name=\"m\",engine=\"{i}\"}} 1\n"));
        i += 1;
    }
    let parsed = exposition::parse(&page).unwrap();
    assert_eq!(parsed.samples.len(), i);
    let n = normalise(&parsed, None, None, MappingTable::builtin().unwrap()).unwrap();
    assert_eq!(value(&n, "flotilla_inference_requests_running"), i as f64);
}

#[test]
fn mutated_pages_never_panic() {
    // Deterministic stand-in for a fuzzer: small random edits of the small pages,
    // through parse and map. Either outcome is fine; a panic is not.
    let pages: Vec<String> = [
        "vllm-v1-0.8-excerpt.txt",
        "vllm-v1-0.10.0-excerpt.txt",
        "sglang-0.4.9-excerpt.txt",
        "llamacpp-8733e0c.txt",
        "dcgm-exporter-3.3-excerpt.txt",
    ]
    .map(fixture)
    .into();
    let alphabet: Vec<char> = "{}\",=\n#+-.eE:_ 09\\NaInfTYPE HELP histogram le".chars().collect();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound as u64) as usize
    };
    let table = MappingTable::builtin().unwrap();
    let mut parsed = 0;
    for _ in 0..1500 {
        let mut chars: Vec<char> = pages[next(pages.len())].chars().collect();
        for _ in 0..=next(4) {
            let at = next(chars.len() + 1);
            let c = alphabet[next(alphabet.len())];
            match next(3) {
                0 => chars.insert(at, c),
                1 if at < chars.len() => {
                    chars.remove(at);
                }
                _ if at < chars.len() => chars[at] = c,
                _ => {}
            }
        }
        let text: String = chars.into_iter().collect();
        if let Ok(page) = exposition::parse(&text) {
            parsed += 1;
            if let Ok(n) = normalise(&page, None, None, table) {
                assert!(n.samples.iter().all(|s| s.value.is_finite()), "{text}");
            }
        }
    }
    assert!(parsed > 100, "the edits are small, so many pages still parse: {parsed}");
}

/// Parse+map time of the real-size vLLM page. Run once, in release:
/// `cargo test -p flotilla-agent --release --lib inference::fixture_tests::bench -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
#[allow(clippy::print_stderr)] // The figure is the output.
fn bench_parse_and_map_vllm_page() {
    let text = fixture("vllm-v1-0.11.0.txt");
    let table = MappingTable::builtin().unwrap();
    let run = || {
        let page = exposition::parse(&text).unwrap();
        normalise(&page, None, None, table).unwrap().samples.len()
    };
    for _ in 0..20 {
        run();
    }
    let rounds = 500;
    let start = std::time::Instant::now();
    let mut mapped = 0;
    for _ in 0..rounds {
        mapped += run();
    }
    let per = start.elapsed() / rounds;
    let parse_start = std::time::Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(exposition::parse(&text).unwrap());
    }
    let parse_per = parse_start.elapsed() / rounds;
    eprintln!(
        "vllm-v1-0.11.0.txt ({} bytes, {} samples mapped): parse+map {per:?} per page (parse alone {parse_per:?}), {rounds} rounds",
        text.len(),
        mapped / rounds as usize
    );
}
