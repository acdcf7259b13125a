//! What one failed NVML read means for a sample: a missing field, a counted
//! failure, or a GPU that is gone.

use std::collections::BTreeMap;

use nvml_wrapper::error::NvmlError;

/// How a sample treats one NVML error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldOutcome {
    /// The GPU, driver or NVML build cannot give this value: leave it `None`
    /// quietly, as nvidia-smi shows "N/A".
    Unsupported,
    /// The read failed for another reason: leave it `None`, count and report it.
    Failed,
    /// The GPU fell off the bus or needs a reset: the whole sample fails.
    Vanished,
}

/// Classifies an error of a per-field read.
pub fn classify(error: &NvmlError) -> FieldOutcome {
    match error {
        // A symbol missing from an older libnvidia-ml is an unsupported query,
        // not a fault of the GPU.
        NvmlError::NotSupported | NvmlError::FunctionNotFound | NvmlError::FailedToLoadSymbol(_) => {
            FieldOutcome::Unsupported
        }
        NvmlError::GpuLost | NvmlError::ResetRequired => FieldOutcome::Vanished,
        _ => FieldOutcome::Failed,
    }
}

/// Failed reads per (GPU index, field name) since the source opened.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FieldErrors {
    counts: BTreeMap<(u32, &'static str), u64>,
}

impl FieldErrors {
    /// Counts a failure; true the first time this field fails on this GPU, so
    /// the caller logs it once rather than on every sample.
    pub fn record(&mut self, gpu: u32, field: &'static str) -> bool {
        let count = self.counts.entry((gpu, field)).or_insert(0);
        *count += 1;
        *count == 1
    }

    /// Every (GPU index, field, failures) so far, sorted by GPU then field.
    pub fn counts(&self) -> impl Iterator<Item = (u32, &'static str, u64)> + '_ {
        self.counts.iter().map(|(&(gpu, field), &count)| (gpu, field, count))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        assert_eq!(classify(&NvmlError::NotSupported), FieldOutcome::Unsupported);
        assert_eq!(
            classify(&NvmlError::FailedToLoadSymbol("nvmlDeviceGetMemoryInfo_v2".into())),
            FieldOutcome::Unsupported
        );
        assert_eq!(classify(&NvmlError::GpuLost), FieldOutcome::Vanished);
        assert_eq!(classify(&NvmlError::ResetRequired), FieldOutcome::Vanished);
        assert_eq!(classify(&NvmlError::NoPermission), FieldOutcome::Failed);
        assert_eq!(classify(&NvmlError::Unknown), FieldOutcome::Failed);
    }

    #[test]
    fn failures_are_counted_and_first_ones_flagged() {
        let mut errors = FieldErrors::default();
        assert!(errors.record(0, "power"));
        assert!(!errors.record(0, "power"));
        assert!(errors.record(1, "power"));
        assert!(errors.record(0, "energy"));
        assert_eq!(errors.counts().collect::<Vec<_>>(), [(0, "energy", 1), (0, "power", 2), (1, "power", 1)]);
    }
}
