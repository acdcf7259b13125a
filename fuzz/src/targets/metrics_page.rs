//! A scraped `/metrics` body as the agent's inference collector decodes it:
//! UTF-8, Prometheus text format 0.0.4, normalisation to `flotilla_inference_*`
//! with the engine detected or as configured (the input's length picks which,
//! so that seeds stay plain pages).

use flotilla_agent::inference::{Engine, decode_metrics_page};

pub fn run(data: &[u8]) {
    let engine = match data.len() % 5 {
        0 => None,
        n => Engine::ALL.get(n - 1).copied(),
    };
    if let Ok(samples) = decode_metrics_page(data, engine, Some("fuzz-model")) {
        for s in &samples {
            assert!(s.name.starts_with("flotilla_inference_"), "a normalised series outside the namespace: {}", s.name);
        }
    }
}
