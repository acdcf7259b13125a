//! The inference-server collector: scrapes the Prometheus `/metrics` page of vLLM,
//! SGLang, TGI and llama.cpp servers, normalises it to `flotilla_inference_*` series
//! and checks readiness (`GET /v1/models`) and liveness (`GET /health`).
//!
//! The pieces, in the order a scrape uses them:
//! - [`InferenceEndpoint`] (config) and `endpoint::Origin` (its checked URL);
//! - `http`: one bounded GET (timeout, 8 MiB body cap);
//! - `exposition`: text format 0.0.4 through the `prom_text_format_parser` crate
//!   (why that crate: see that module);
//! - `mapping` (with `mapping.toml`): the engine-to-flotilla table, kept as data;
//! - `normalise`: applies the table (engine detection, renames, label dropping,
//!   summing data-parallel ranks, bad-value checks);
//! - `drift`: remembers mapped targets per endpoint, to report vanished ones;
//! - `managed`: the model servers in the agent's own containers
//!   (`inference: { port }` in their spec), scraped as endpoints named after
//!   the container;
//! - [`InferenceCollector`]: the async shell that runs a round over all endpoints.
//!
//! Series produced, each with an `endpoint` label: `flotilla_inference_up`,
//! `_ready` and `_live` (1/0), the mapped series (labels `engine`, `model` where
//! known, `le` on buckets), and `flotilla_inference_expected_series_missing{series}`
//! for each vanished target.
//!
//! Agent config (`Config::inference`, one table per server):
//! ```toml
//! [[inference]]
//! name = "llama-8b"
//! url = "http://127.0.0.1:8000"
//! engine = "vllm"   # optional: detected from the page
//! timeout = "2s"    # optional
//! ```

mod drift;
mod endpoint;
mod engine;
mod error;
mod exposition;
mod http;
mod managed;
mod mapping;
mod normalise;
mod scrape;

#[cfg(test)]
mod fixture_tests;
#[cfg(test)]
pub(crate) mod test_server;

pub use endpoint::{DEFAULT_TIMEOUT, InferenceEndpoint, MAX_TIMEOUT};
pub use engine::Engine;
pub use error::InferenceError;
pub use managed::{ManagedServer, ManagedServers};
pub use scrape::{EndpointReport, InferenceCollector, InferenceRound, MAX_METRICS_BYTES, decode_metrics_page};
