//! Pure conversions from NVML's units and encodings to the model's. They need no
//! device, so they are tested here on machines without a GPU or a driver.

use std::path::Path;

use flotilla_common::model::CLOCK_EVENT_REASONS;
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::struct_wrappers::device::ProcessInfo;

/// NVML power readings (`nvmlDeviceGetPowerUsage`, limits) are in milliwatts.
pub fn milliwatts_to_watts(milliwatts: u32) -> f64 {
    f64::from(milliwatts) / 1000.0
}

/// NVML's energy counter (`nvmlDeviceGetTotalEnergyConsumption`) is in millijoules.
pub fn millijoules_to_joules(millijoules: u64) -> f64 {
    millijoules as f64 / 1000.0
}

/// NVML reports PCIe throughput in KB/s, where NVIDIA's KB is 1024 bytes (the same
/// unit nvidia-smi prints), over a 20 ms window.
pub fn kilobytes_per_second_to_bytes(kilobytes_per_second: u32) -> f64 {
    f64::from(kilobytes_per_second) * 1024.0
}

/// NVML utilisation is a whole percentage; the model wants a ratio in 0..=1.
pub fn percent_to_ratio(percent: u32) -> f64 {
    (f64::from(percent) / 100.0).clamp(0.0, 1.0)
}

/// Formats NVML's CUDA driver version integer (1000 * major + 10 * minor, e.g.
/// 12040) the way nvidia-smi does ("12.4"); empty when NVML gives no version.
pub fn cuda_version(version: i32) -> String {
    if version <= 0 {
        return String::new();
    }
    format!("{}.{}", nvml_wrapper::cuda_driver_version_major(version), nvml_wrapper::cuda_driver_version_minor(version))
}

/// NVML's clock-event (throttle) flags beside the model's name for each, so the
/// mapping is spelled out rather than relying on both using the same bit values.
const REASON_NAMES: [(ThrottleReasons, &str); 9] = [
    (ThrottleReasons::GPU_IDLE, "gpu_idle"),
    (ThrottleReasons::APPLICATIONS_CLOCKS_SETTING, "applications_clocks_setting"),
    (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
    (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
    (ThrottleReasons::SYNC_BOOST, "sync_boost"),
    (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
    (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
    (ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN, "hw_power_brake_slowdown"),
    (ThrottleReasons::DISPLAY_CLOCK_SETTING, "display_clock_setting"),
];

/// The model's clock-event mask ([`CLOCK_EVENT_REASONS`]) for NVML's reasons.
/// Reasons the model has no name for are dropped, so the mask only ever holds
/// bits that consumers can name.
pub fn clock_event_mask(reasons: ThrottleReasons) -> u64 {
    REASON_NAMES
        .iter()
        .filter(|(flag, _)| reasons.contains(*flag))
        .filter_map(|(_, name)| {
            CLOCK_EVENT_REASONS.iter().find(|(_, model_name)| model_name == name).map(|(bit, _)| *bit)
        })
        .fold(0, |mask, bit| mask | bit)
}

/// A counter from `nvmlDeviceGetFieldValues`, whatever integer type NVML chose
/// for it; `None` for a negative or non-finite value, which a counter cannot be.
pub fn sample_value_to_u64(value: SampleValue) -> Option<u64> {
    match value {
        SampleValue::U32(v) => Some(u64::from(v)),
        SampleValue::U64(v) => Some(v),
        SampleValue::I64(v) => u64::try_from(v).ok(),
        SampleValue::F64(v) if v.is_finite() && v >= 0.0 => Some(v as u64),
        SampleValue::F64(_) => None,
    }
}

/// A gauge from `nvmlDeviceGetFieldValues` as a float.
pub fn sample_value_to_f64(value: SampleValue) -> Option<f64> {
    match value {
        SampleValue::U32(v) => Some(f64::from(v)),
        SampleValue::U64(v) => Some(v as f64),
        SampleValue::I64(v) => Some(v as f64),
        SampleValue::F64(v) => v.is_finite().then_some(v),
    }
}

/// Compute and graphics processes of one GPU, one entry per PID sorted by PID.
/// A process that is both (nvidia-smi's "C+G") appears in both lists with the
/// same allocation, so it is kept once with the larger known figure.
pub fn merge_processes(compute: &[ProcessInfo], graphics: &[ProcessInfo]) -> Vec<(u32, Option<u64>)> {
    let mut merged = std::collections::BTreeMap::<u32, Option<u64>>::new();
    for process in compute.iter().chain(graphics) {
        let used = match process.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(bytes),
            UsedGpuMemory::Unavailable => None,
        };
        let entry = merged.entry(process.pid).or_insert(None);
        *entry = (*entry).max(used);
    }
    merged.into_iter().collect()
}

/// The command name of `pid` from `<proc_root>/<pid>/comm`, or an empty string
/// when it cannot be read (the process exited, or the agent runs in another PID
/// namespace than the process and cannot see it).
pub fn process_name(proc_root: &Path, pid: u32) -> String {
    std::fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
        .map(|comm| comm.trim_end().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use flotilla_common::model::clock_event_reason_names;

    use super::*;

    #[test]
    fn units_convert_to_the_model() {
        assert_eq!(milliwatts_to_watts(312_456), 312.456);
        assert_eq!(millijoules_to_joules(7_500), 7.5);
        assert_eq!(kilobytes_per_second_to_bytes(2), 2048.0);
        assert_eq!(percent_to_ratio(0), 0.0);
        assert_eq!(percent_to_ratio(57), 0.57);
        // NVML has been seen to report just over 100 during counter resets.
        assert_eq!(percent_to_ratio(101), 1.0);
    }

    #[test]
    fn cuda_version_is_major_dot_minor() {
        assert_eq!(cuda_version(12040), "12.4");
        assert_eq!(cuda_version(12020), "12.2");
        assert_eq!(cuda_version(11080), "11.8");
        assert_eq!(cuda_version(13000), "13.0");
        assert_eq!(cuda_version(0), "");
        assert_eq!(cuda_version(-1), "");
    }

    #[test]
    fn every_model_reason_has_an_nvml_flag_with_the_same_bit() {
        for (bit, name) in CLOCK_EVENT_REASONS {
            let (flag, _) =
                REASON_NAMES.iter().find(|(_, n)| *n == name).unwrap_or_else(|| panic!("no NVML flag for {name}"));
            assert_eq!(clock_event_mask(*flag), bit, "{name}");
            // The model documents its bits as NVML's own.
            assert_eq!(flag.bits(), bit, "{name}");
        }
    }

    #[test]
    fn clock_event_mask_combines_and_names_reasons() {
        let reasons = ThrottleReasons::SW_POWER_CAP | ThrottleReasons::HW_THERMAL_SLOWDOWN;
        let mask = clock_event_mask(reasons);
        assert_eq!(mask, 0x4 | 0x40);
        let names: Vec<_> = clock_event_reason_names(mask).collect();
        assert_eq!(names, ["sw_power_cap", "hw_thermal_slowdown"]);
        assert_eq!(clock_event_mask(ThrottleReasons::NONE), 0);
        assert_eq!(clock_event_mask(ThrottleReasons::empty()), 0);
        assert_eq!(clock_event_mask(ThrottleReasons::all()), 0x1ff);
    }

    #[test]
    fn field_values_convert_by_type() {
        assert_eq!(sample_value_to_u64(SampleValue::U32(3)), Some(3));
        assert_eq!(sample_value_to_u64(SampleValue::U64(u64::MAX)), Some(u64::MAX));
        assert_eq!(sample_value_to_u64(SampleValue::I64(-1)), None);
        assert_eq!(sample_value_to_u64(SampleValue::I64(9)), Some(9));
        assert_eq!(sample_value_to_u64(SampleValue::F64(2.9)), Some(2));
        assert_eq!(sample_value_to_u64(SampleValue::F64(f64::NAN)), None);
        assert_eq!(sample_value_to_f64(SampleValue::U32(71)), Some(71.0));
        assert_eq!(sample_value_to_f64(SampleValue::I64(-5)), Some(-5.0));
        assert_eq!(sample_value_to_f64(SampleValue::F64(f64::INFINITY)), None);
    }

    fn process(pid: u32, used: UsedGpuMemory) -> ProcessInfo {
        ProcessInfo { pid, used_gpu_memory: used, gpu_instance_id: None, compute_instance_id: None }
    }

    #[test]
    fn processes_merge_by_pid() {
        let compute = [process(40, UsedGpuMemory::Used(1 << 30)), process(7, UsedGpuMemory::Unavailable)];
        let graphics = [
            process(40, UsedGpuMemory::Used(1 << 30)),
            process(7, UsedGpuMemory::Used(512)),
            process(3, UsedGpuMemory::Unavailable),
        ];
        assert_eq!(merge_processes(&compute, &graphics), [(3, None), (7, Some(512)), (40, Some(1 << 30))]);
        assert!(merge_processes(&[], &[]).is_empty());
    }

    #[test]
    fn process_names_come_from_comm() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("42")).unwrap();
        std::fs::write(root.path().join("42/comm"), "vllm-worker\n").unwrap();
        assert_eq!(process_name(root.path(), 42), "vllm-worker");
        assert_eq!(process_name(root.path(), 43), "");
    }
}
