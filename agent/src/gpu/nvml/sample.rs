//! One sample of one GPU from NVML. Each field is its own query, so a value the
//! GPU cannot give leaves only that field empty; only a GPU that stopped
//! answering fails the sample.

use std::collections::HashMap;
use std::path::Path;

use flotilla_common::model::{GpuInfo, GpuProcess, GpuSample};
use nvml_wrapper::Device;
use nvml_wrapper::enum_wrappers::device::{Clock, PcieUtilCounter, TemperatureSensor};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_ECC_DBE_AGG_TOTAL, NVML_FI_DEV_ECC_DBE_VOL_TOTAL, NVML_FI_DEV_ECC_SBE_AGG_TOTAL,
    NVML_FI_DEV_ECC_SBE_VOL_TOTAL, NVML_FI_DEV_MEMORY_TEMP, NVML_FI_DEV_REMAPPED_COR, NVML_FI_DEV_REMAPPED_FAILURE,
    NVML_FI_DEV_REMAPPED_PENDING, NVML_FI_DEV_REMAPPED_UNC, NVML_FI_DEV_RETIRED_DBE, NVML_FI_DEV_RETIRED_SBE,
};

use super::convert::{
    clock_event_mask, kilobytes_per_second_to_bytes, merge_processes, millijoules_to_joules, milliwatts_to_watts,
    percent_to_ratio, process_name, sample_value_to_f64, sample_value_to_u64,
};
use super::field::{FieldErrors, FieldOutcome, classify};

/// Values that have no dedicated NVML getter (memory temperature, row
/// remapping) or that one `nvmlDeviceGetFieldValues` call fetches together, each
/// with the name its failures are counted under.
const FIELDS: [(u32, &str); 11] = [
    (NVML_FI_DEV_MEMORY_TEMP, "memory_temperature"),
    (NVML_FI_DEV_ECC_SBE_VOL_TOTAL, "ecc_corrected_volatile"),
    (NVML_FI_DEV_ECC_DBE_VOL_TOTAL, "ecc_uncorrected_volatile"),
    (NVML_FI_DEV_ECC_SBE_AGG_TOTAL, "ecc_corrected_aggregate"),
    (NVML_FI_DEV_ECC_DBE_AGG_TOTAL, "ecc_uncorrected_aggregate"),
    (NVML_FI_DEV_REMAPPED_COR, "remapped_rows_correctable"),
    (NVML_FI_DEV_REMAPPED_UNC, "remapped_rows_uncorrectable"),
    (NVML_FI_DEV_REMAPPED_PENDING, "remapped_rows_pending"),
    (NVML_FI_DEV_REMAPPED_FAILURE, "remapped_rows_failed"),
    (NVML_FI_DEV_RETIRED_SBE, "retired_pages_single_bit"),
    (NVML_FI_DEV_RETIRED_DBE, "retired_pages_double_bit"),
];

/// The GPU stopped answering while one of its fields was read.
#[derive(Debug)]
pub struct Vanished {
    pub field: &'static str,
    pub source: NvmlError,
}

/// Turns the result of each NVML query into an optional field, counting and
/// logging (once per GPU and field) the failures that are not plain "not supported".
#[derive(Debug)]
pub struct Reader<'a> {
    gpu: u32,
    errors: &'a mut FieldErrors,
}

impl<'a> Reader<'a> {
    pub fn new(gpu: u32, errors: &'a mut FieldErrors) -> Self {
        Self { gpu, errors }
    }

    fn read<T>(&mut self, field: &'static str, result: Result<T, NvmlError>) -> Result<Option<T>, Vanished> {
        let error = match result {
            Ok(value) => return Ok(Some(value)),
            Err(error) => error,
        };
        match classify(&error) {
            FieldOutcome::Unsupported => Ok(None),
            FieldOutcome::Vanished => Err(Vanished { field, source: error }),
            FieldOutcome::Failed => {
                if self.errors.record(self.gpu, field) {
                    tracing::warn!(
                        gpu = self.gpu,
                        field,
                        error = %error,
                        "NVML read failed; reporting the field as missing (later failures of it are only counted)"
                    );
                }
                Ok(None)
            }
        }
    }

    /// The batched field values by field id; the ones that failed are absent.
    fn field_values(&mut self, device: &Device) -> Result<HashMap<u32, SampleValue>, Vanished> {
        let ids = FIELDS.map(|(id, _)| FieldId(id));
        let Some(values) = self.read("field_values", device.field_values_for(&ids))? else {
            return Ok(HashMap::new());
        };
        let mut by_id = HashMap::with_capacity(FIELDS.len());
        // NVML answers in the order asked, one entry per id.
        for ((id, name), value) in FIELDS.into_iter().zip(values) {
            if let Some(value) = self.read(name, value.and_then(|v| v.value))? {
                by_id.insert(id, value);
            }
        }
        Ok(by_id)
    }
}

/// Reads every field of `info`'s GPU that NVML can give; `xid_events` is left
/// for the caller, which owns the event counts.
pub fn read(device: &Device, info: &GpuInfo, reader: &mut Reader, proc_root: &Path) -> Result<GpuSample, Vanished> {
    let utilization = reader.read("utilization", device.utilization_rates())?;
    let memory = reader.read("memory", device.memory_info())?;
    let fields = reader.field_values(device)?;
    let counter = |id: u32| fields.get(&id).cloned().and_then(sample_value_to_u64);
    let compute = reader.read("compute_processes", device.running_compute_processes())?;
    let graphics = reader.read("graphics_processes", device.running_graphics_processes())?;
    let processes = merge_processes(compute.as_deref().unwrap_or_default(), graphics.as_deref().unwrap_or_default())
        .into_iter()
        .map(|(pid, used_memory_bytes)| GpuProcess { pid, name: process_name(proc_root, pid), used_memory_bytes })
        .collect();
    Ok(GpuSample {
        index: info.index,
        uuid: info.uuid.clone(),
        utilization_ratio: utilization.as_ref().map(|u| percent_to_ratio(u.gpu)),
        memory_utilization_ratio: utilization.as_ref().map(|u| percent_to_ratio(u.memory)),
        memory_used_bytes: memory.as_ref().map(|m| m.used),
        memory_total_bytes: memory.as_ref().map(|m| m.total),
        memory_reserved_bytes: memory.as_ref().map(|m| m.reserved),
        temperature_celsius: reader.read("temperature", device.temperature(TemperatureSensor::Gpu))?.map(f64::from),
        // GPUs without a memory sensor report 0 rather than an error, and a
        // running GPU's memory is never at 0 °C.
        memory_temperature_celsius: fields
            .get(&NVML_FI_DEV_MEMORY_TEMP)
            .cloned()
            .and_then(sample_value_to_f64)
            .filter(|celsius| *celsius > 0.0),
        power_watts: reader.read("power", device.power_usage())?.map(milliwatts_to_watts),
        power_limit_watts: reader.read("power_limit", device.enforced_power_limit())?.map(milliwatts_to_watts),
        energy_joules_total: reader.read("energy", device.total_energy_consumption())?.map(millijoules_to_joules),
        sm_clock_mhz: reader.read("sm_clock", device.clock_info(Clock::SM))?,
        memory_clock_mhz: reader.read("memory_clock", device.clock_info(Clock::Memory))?,
        clock_event_reasons: reader
            .read("clock_event_reasons", device.current_throttle_reasons())?
            .map(clock_event_mask),
        pcie_rx_bytes_per_second: reader
            .read("pcie_rx", device.pcie_throughput(PcieUtilCounter::Receive))?
            .map(kilobytes_per_second_to_bytes),
        pcie_tx_bytes_per_second: reader
            .read("pcie_tx", device.pcie_throughput(PcieUtilCounter::Send))?
            .map(kilobytes_per_second_to_bytes),
        pcie_replay_total: reader.read("pcie_replay", device.pcie_replay_counter())?.map(u64::from),
        ecc_corrected_volatile_total: counter(NVML_FI_DEV_ECC_SBE_VOL_TOTAL),
        ecc_uncorrected_volatile_total: counter(NVML_FI_DEV_ECC_DBE_VOL_TOTAL),
        ecc_corrected_aggregate_total: counter(NVML_FI_DEV_ECC_SBE_AGG_TOTAL),
        ecc_uncorrected_aggregate_total: counter(NVML_FI_DEV_ECC_DBE_AGG_TOTAL),
        remapped_rows_correctable: counter(NVML_FI_DEV_REMAPPED_COR),
        remapped_rows_uncorrectable: counter(NVML_FI_DEV_REMAPPED_UNC),
        remapped_rows_pending: counter(NVML_FI_DEV_REMAPPED_PENDING).map(|v| v != 0),
        remapped_rows_failed: counter(NVML_FI_DEV_REMAPPED_FAILURE).map(|v| v != 0),
        retired_pages_single_bit: counter(NVML_FI_DEV_RETIRED_SBE),
        retired_pages_double_bit: counter(NVML_FI_DEV_RETIRED_DBE),
        xid_events: Vec::new(),
        processes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_are_unique_and_ids_distinct() {
        let mut ids: Vec<_> = FIELDS.iter().map(|(id, _)| *id).collect();
        let mut names: Vec<_> = FIELDS.iter().map(|(_, name)| *name).collect();
        ids.sort_unstable();
        ids.dedup();
        names.sort_unstable();
        names.dedup();
        assert_eq!(ids.len(), FIELDS.len());
        assert_eq!(names.len(), FIELDS.len());
    }

    #[test]
    fn reader_maps_errors_to_fields() {
        let mut errors = FieldErrors::default();
        let mut reader = Reader::new(2, &mut errors);
        assert_eq!(reader.read("power", Ok::<_, NvmlError>(5)).unwrap(), Some(5));
        assert_eq!(reader.read::<u32>("energy", Err(NvmlError::NotSupported)).unwrap(), None);
        assert_eq!(reader.read::<u32>("temperature", Err(NvmlError::NoPermission)).unwrap(), None);
        let gone = reader.read::<u32>("memory", Err(NvmlError::GpuLost)).unwrap_err();
        assert_eq!(gone.field, "memory");
        // Only the real failure is counted; "not supported" is normal.
        assert_eq!(errors.counts().collect::<Vec<_>>(), [(2, "temperature", 1)]);
    }
}
