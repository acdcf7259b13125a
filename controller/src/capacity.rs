//! Measured capacity and automated diagnosis, from live telemetry.
//!
//! - `measure`: per endpoint (model server) and node, over a window of stored
//!   batches: sustained and peak tokens/s, GPU utilisation, the saturation
//!   point estimated from the observed relation (where queueing starts, else
//!   where utilisation would reach 95 %), headroom, days until it is gone from
//!   the trend of daily peaks, the seed's scaling triggers as recommendations
//!   with their evidence, energy and cost per 1,000 tokens, idle GPUs.
//! - `diagnose`: the seed's troubleshooting guide (high latency, out of memory,
//!   model loading failure, high error rate) plus GPU faults, as findings with
//!   evidence and the seed's resolutions ranked for the case.
//!
//! Both are pure functions over batches; `service/fleet/capacity.rs` reads the
//! store and the fleet view and converts the answers.

pub mod diagnose;
pub mod measure;

use std::time::Duration;

/// The default window rates and means are measured over.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(600);
/// The longest window a request may ask for (the raw telemetry window is 1 h by default).
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// The seed's scaling triggers ("Add Capacity When").
pub mod triggers {
    /// GPU utilisation, sustained.
    pub const GPU_UTILIZATION: f64 = 0.80;
    /// Requests waiting, sustained.
    pub const QUEUE_DEPTH: f64 = 5.0;
    /// p95 end-to-end latency, seconds.
    pub const P95_LATENCY_S: f64 = 5.0;
    /// Error ratio.
    pub const ERROR_RATIO: f64 = 0.01;
    /// "Sustained": the condition holds in at least this share of the window's samples.
    pub const SUSTAINED_SHARE: f64 = 0.8;
    /// A GPU below this mean utilisation over the window is a consolidation candidate.
    pub const IDLE_GPU: f64 = 0.10;
    /// The TTFT SLO of the default alert rules (p95 500 ms).
    pub const TTFT_SLO_S: f64 = 0.5;
    /// GPU memory share the seed calls near full.
    pub const MEMORY_NEAR_FULL: f64 = 0.90;
}
