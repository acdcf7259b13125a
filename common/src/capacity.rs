//! Capacity planning maths, pure and synchronous: how many tokens per second a team
//! needs (the seed's sizing worksheet, [`plan`]), how much GPU memory a model needs
//! ([`memory`]: weights, KV cache and runtime overhead, from a Hugging Face
//! `config.json` or explicit sizes) and which GPU sets can hold it ([`fit`]).
//!
//! Every function here refuses bad input with a [`CapacityError`] naming the
//! parameter; none returns NaN or panics, because operators feed it by hand.

pub mod fit;
pub mod memory;
pub mod model;
pub mod plan;

pub use fit::{GpuMemory, NodeFit, NodeGpus, Placement, fit, gpu_memory_utilization};
pub use memory::{Dtype, MemoryEstimate, MemoryInput, TpNeed, estimate};
pub use model::{ModelShape, ParamsSource, parse_count};
pub use plan::{Plan, PlanInput, Usage, plan};

/// Why a capacity calculation was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CapacityError {
    /// A parameter is outside the range the formulas make sense for.
    #[error("{name} must be {expected}, got {got}")]
    OutOfRange { name: &'static str, expected: &'static str, got: String },
    /// A word that names nothing we know (usage tier, dtype).
    #[error("unknown {what} {got:?}: expected one of {expected}")]
    Unknown { what: &'static str, got: String, expected: &'static str },
    /// A count such as `8B` that does not parse.
    #[error("{name}: cannot read {got:?} as a count (e.g. 8B, 70.6B, 7240M, 8e9)")]
    BadCount { name: &'static str, got: String },
    /// A model `config.json` that is not JSON or lacks what the estimate needs.
    #[error("model config: {0}")]
    ModelConfig(String),
    /// The inputs are valid one by one, but the result does not fit in a number.
    #[error("{what} overflows: the inputs are too large to be meaningful")]
    Overflow { what: &'static str },
    /// There are no GPUs to fit a model onto.
    #[error("no GPUs to fit the model onto: no node reports any GPU memory")]
    NoGpus,
    /// No GPU set can hold the model, not even empty.
    #[error("{0}")]
    DoesNotFit(Box<Shortfall>),
}

/// How far the largest GPU set falls short of a model: what [`CapacityError::DoesNotFit`] says.
#[derive(Debug, Clone, PartialEq)]
pub struct Shortfall {
    /// The node with the largest set.
    pub node: String,
    /// Its tensor-parallel size: how many GPUs the set has.
    pub tp: u32,
    /// The memory of the set's smallest GPU.
    pub gpu_memory_bytes: u64,
    /// What each GPU would need to hold at that size.
    pub need_bytes: u64,
    /// What each GPU offers under the utilisation cap.
    pub offer_bytes: u64,
    pub utilization: f64,
}

impl std::fmt::Display for Shortfall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = self.need_bytes.saturating_sub(self.offer_bytes);
        write!(
            f,
            "the model does not fit on any GPU set: it needs {} per GPU at tensor-parallel size {}, \
             but the largest set, {} × {} on node {}, offers {} per GPU at gpu_memory_utilization {}: \
             short by {} per GPU ({} in all)",
            format_bytes(self.need_bytes),
            self.tp,
            self.tp,
            format_bytes(self.gpu_memory_bytes),
            self.node,
            format_bytes(self.offer_bytes),
            self.utilization,
            format_bytes(short),
            format_bytes(short.saturating_mul(u64::from(self.tp))),
        )
    }
}

/// A finite value that is greater than zero, or an error naming it.
pub(crate) fn positive(name: &'static str, v: f64) -> Result<f64, CapacityError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(CapacityError::OutOfRange { name, expected: "a finite number greater than 0", got: v.to_string() })
    }
}

/// A finite value within `lo..=hi` (or `lo < v <= hi` when `open_low`), or an error naming it.
pub(crate) fn within(
    name: &'static str,
    v: f64,
    lo: f64,
    hi: f64,
    open_low: bool,
    expected: &'static str,
) -> Result<f64, CapacityError> {
    let low_ok = if open_low { v > lo } else { v >= lo };
    if v.is_finite() && low_ok && v <= hi {
        Ok(v)
    } else {
        Err(CapacityError::OutOfRange { name, expected, got: v.to_string() })
    }
}

/// A byte count from an `f64`, refusing what `u64` cannot hold (and NaN).
pub(crate) fn to_bytes(what: &'static str, v: f64) -> Result<u64, CapacityError> {
    // 2^63 keeps well clear of the rounding at u64::MAX; no real memory size comes near it.
    if v.is_finite() && (0.0..9.2e18).contains(&v) {
        Ok(v.round() as u64)
    } else {
        Err(CapacityError::Overflow { what })
    }
}

/// `12.3 GiB`: the binary units nvidia-smi and flotctl use.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_refuse_nan_infinity_and_out_of_range() {
        assert!(positive("x", f64::NAN).is_err());
        assert!(positive("x", f64::INFINITY).is_err());
        assert!(positive("x", 0.0).is_err());
        assert!(positive("x", -1.0).is_err());
        assert_eq!(positive("x", 2.0), Ok(2.0));
        assert!(within("x", 0.0, 0.0, 1.0, true, "in (0, 1]").is_err());
        assert_eq!(within("x", 0.0, 0.0, 1.0, false, "in [0, 1]"), Ok(0.0));
        assert!(to_bytes("x", f64::NAN).is_err());
        assert!(to_bytes("x", 1e30).is_err());
        assert_eq!(to_bytes("x", 1.4), Ok(1));
        assert_eq!(format_bytes(128 * 1024), "128.0 KiB");
    }
}
