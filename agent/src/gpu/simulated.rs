//! Simulated GPUs for the demo and the tests, on machines without NVIDIA hardware.
//!
//! Each GPU follows a deterministic load curve (a function of the seed, its index
//! and the time since start), and everything else follows the load the way real
//! H100s do: memory is allocated as the load rises, power tracks utilisation,
//! and temperature lags behind power with a thermal time constant.
//!
//! Faults (`flotctl sim inject`) evolve the way they do on real cards: a failed
//! fan makes the temperature climb until the driver throttles the clocks; a
//! leaking process fills memory; an XID raises its counter and, by code, the
//! ECC, row-remapping or page-retirement counters; XID 79 or `gpu-lost` takes the
//! GPU off the bus, so it stops reporting and the collector says so.

use std::time::Duration;

use std::collections::BTreeMap;
use std::sync::mpsc;

use flotilla_common::model::{GpuInfo, GpuProcess, GpuSample, GpuSourceKind, SimFault, XidCount};

use super::{GpuError, GpuInventory, GpuSource};

const MODEL: &str = "NVIDIA H100 80GB HBM3 (simulated)";
const MEMORY_TOTAL: u64 = 80 * 1024 * 1024 * 1024;
const POWER_LIMIT_W: f64 = 700.0;
const IDLE_POWER_W: f64 = 70.0;
const AMBIENT_C: f64 = 32.0;
/// Degrees above ambient at full power, and how fast temperature follows power.
const THERMAL_RISE_C: f64 = 45.0;
const THERMAL_TAU_S: f64 = 10.0;
/// A failed fan adds this much to the temperature target per second, up to the cap.
const OVERHEAT_RISE_C_PER_S: f64 = 3.0;
const OVERHEAT_MAX_EXTRA_C: f64 = 60.0;
/// Where the driver starts throttling (software, then hardware slowdown).
const SW_THERMAL_C: f64 = 85.0;
const HW_THERMAL_C: f64 = 90.0;
/// A leaking process grows by this share of the card per second.
const CREEP_SHARE_PER_S: f64 = 0.02;
/// Utilisation of a saturated GPU (`saturate`): busy, not quite every cycle.
const SATURATED_UTILIZATION: f64 = 0.98;
const MAX_CLOCK_MHZ: u32 = 1980;

/// `count` simulated GPUs with curves derived from `seed`.
#[derive(Debug)]
pub struct SimulatedGpus {
    seed: u64,
    gpus: Vec<GpuState>,
    last: Option<Duration>,
    faults_tx: mpsc::Sender<(SimFault, Option<u32>)>,
    faults_rx: mpsc::Receiver<(SimFault, Option<u32>)>,
}

/// Injects faults into a running [`SimulatedGpus`]; cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct SimHandle {
    tx: mpsc::Sender<(SimFault, Option<u32>)>,
    count: u32,
}

impl SimHandle {
    /// Queues `fault` for GPU `gpu` (every GPU when `None`); applied at the next sample.
    pub fn inject(&self, fault: SimFault, gpu: Option<u32>) -> Result<(), String> {
        if let Some(i) = gpu
            && i >= self.count
        {
            return Err(format!("no simulated GPU {i}: this node has {} (0..{})", self.count, self.count));
        }
        self.tx.send((fault, gpu)).map_err(|_| "the GPU simulator has stopped".to_owned())
    }
}

#[derive(Debug, Clone, Default)]
struct GpuState {
    uuid: String,
    temperature: f64,
    /// When the fan failed (elapsed time), if it did.
    overheat_since: Option<Duration>,
    /// When the leak started, if one runs.
    creep_since: Option<Duration>,
    /// Requests beyond what the card can serve: utilisation pinned near 100 %.
    saturated: bool,
    lost: bool,
    xids: BTreeMap<u64, u64>,
    ecc_corrected_volatile: u64,
    ecc_uncorrected_volatile: u64,
    ecc_corrected_aggregate: u64,
    ecc_uncorrected_aggregate: u64,
    retired_double_bit: u64,
    remapped_correctable: u64,
    remapped_uncorrectable: u64,
    remap_failed: bool,
}

/// SplitMix64: a tiny, well-known mixer; good enough to spread seeds.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A seed derived from a string (the node id), stable across runs and builds.
pub fn seed_from(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl SimulatedGpus {
    pub fn new(count: u32, seed: u64) -> Self {
        let gpus = (0..count)
            .map(|i| {
                let h = mix(seed ^ u64::from(i));
                let uuid = format!(
                    "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                    h >> 32,
                    (h >> 16) & 0xffff,
                    h & 0xffff,
                    mix(h) >> 48,
                    mix(h) & 0xffff_ffff_ffff
                );
                GpuState { uuid, temperature: AMBIENT_C + 5.0, ..Default::default() }
            })
            .collect();
        let (faults_tx, faults_rx) = mpsc::channel();
        Self { seed, gpus, last: None, faults_tx, faults_rx }
    }

    /// A handle to inject faults while the source runs elsewhere.
    pub fn handle(&self) -> SimHandle {
        SimHandle { tx: self.faults_tx.clone(), count: self.gpus.len() as u32 }
    }

    fn apply(&mut self, fault: SimFault, gpu: Option<u32>, now: Duration) {
        for (i, g) in self.gpus.iter_mut().enumerate() {
            if gpu.is_some_and(|want| want as usize != i) {
                continue;
            }
            tracing::info!(gpu = i, %fault, "simulated fault injected");
            match fault {
                SimFault::Overheat => g.overheat_since = Some(now),
                SimFault::MemoryCreep => g.creep_since = Some(now),
                SimFault::Saturate => g.saturated = true,
                SimFault::GpuLost => g.lost = true,
                SimFault::Clear => {
                    // A reset clears the volatile counters and the GPU comes back.
                    g.overheat_since = None;
                    g.creep_since = None;
                    g.saturated = false;
                    g.lost = false;
                    g.ecc_corrected_volatile = 0;
                    g.ecc_uncorrected_volatile = 0;
                }
                SimFault::Xid(code) => g.raise_xid(code),
            }
        }
    }

    /// Utilisation of GPU `i` at time `t` seconds: a slow diurnal-like wave plus a
    /// faster request-burst wave, each with a per-GPU phase.
    fn utilization(&self, i: usize, t: f64) -> f64 {
        if self.gpus.get(i).is_some_and(|g| g.saturated) {
            return SATURATED_UTILIZATION;
        }
        let h = mix(self.seed ^ (i as u64).wrapping_mul(0x1000_0001));
        let phase = (h % 10_000) as f64 / 10_000.0 * std::f64::consts::TAU;
        let base = 0.25 + 0.5 * (h >> 40) as f64 / f64::from(1u32 << 24);
        let slow = 0.2 * (t / 300.0 * std::f64::consts::TAU + phase).sin();
        let fast = 0.1 * (t / 17.0 * std::f64::consts::TAU + phase * 3.0).sin();
        (base + slow + fast).clamp(0.0, 1.0)
    }
}

impl GpuSource for SimulatedGpus {
    fn simulation(&self) -> Option<SimHandle> {
        Some(self.handle())
    }

    fn inventory(&self) -> GpuInventory {
        GpuInventory {
            kind: GpuSourceKind::Simulated,
            gpus: self
                .gpus
                .iter()
                .enumerate()
                .map(|(i, g)| GpuInfo {
                    index: i as u32,
                    uuid: g.uuid.clone(),
                    model: MODEL.to_owned(),
                    memory_total_bytes: MEMORY_TOTAL,
                })
                .collect(),
            driver_version: "550.54.15 (simulated)".to_owned(),
            cuda_version: "12.4 (simulated)".to_owned(),
            note: "simulated GPUs: no NVIDIA hardware is read".to_owned(),
        }
    }

    fn sample(&mut self, elapsed: Duration) -> Result<Vec<GpuSample>, GpuError> {
        while let Ok((fault, gpu)) = self.faults_rx.try_recv() {
            self.apply(fault, gpu, elapsed);
        }
        let t = elapsed.as_secs_f64();
        let dt = self.last.map_or(THERMAL_TAU_S, |last| elapsed.saturating_sub(last).as_secs_f64());
        self.last = Some(elapsed);
        let alpha = 1.0 - (-dt / THERMAL_TAU_S).exp();
        let utils: Vec<f64> = (0..self.gpus.len()).map(|i| self.utilization(i, t)).collect();
        let mut samples = Vec::with_capacity(self.gpus.len());
        let mut lost = Vec::new();
        for (i, (gpu, util)) in self.gpus.iter_mut().zip(utils).enumerate() {
            if gpu.lost {
                lost.push(format!("GPU {i} ({}) has fallen off the bus", gpu.uuid));
                continue;
            }
            samples.push(gpu.step(i as u32, util, elapsed, alpha));
        }
        if !lost.is_empty() {
            // The healthy GPUs still report; the error marks the node degraded.
            return Err(GpuError {
                source_name: "simulated",
                message: format!("{} (simulated)", lost.join("; ")),
                partial: samples,
            });
        }
        Ok(samples)
    }
}

impl GpuState {
    /// Counts an XID and moves the counters that error implies on real cards.
    fn raise_xid(&mut self, code: u64) {
        *self.xids.entry(code).or_default() += 1;
        match code {
            // Double-bit ECC: uncorrectable error, the page is retired.
            48 => {
                self.ecc_uncorrected_volatile += 1;
                self.ecc_uncorrected_aggregate += 1;
                self.retired_double_bit += 1;
            }
            // Row remapping recorded an error (corrected by the remap).
            63 => {
                self.ecc_corrected_volatile += 1;
                self.ecc_corrected_aggregate += 1;
                self.remapped_correctable += 1;
            }
            // Row remapping failed: the GPU needs a reset and RMA triage.
            64 => {
                self.remapped_uncorrectable += 1;
                self.remap_failed = true;
            }
            // Contained / uncontained ECC errors.
            94 | 95 => {
                self.ecc_uncorrected_volatile += 1;
                self.ecc_uncorrected_aggregate += 1;
            }
            // Fallen off the bus.
            79 => self.lost = true,
            _ => {}
        }
    }

    /// Advances one GPU by one sample and returns its values.
    fn step(&mut self, index: u32, util: f64, now: Duration, alpha: f64) -> GpuSample {
        let extra_heat = self.overheat_since.map_or(0.0, |since| {
            (now.saturating_sub(since).as_secs_f64() * OVERHEAT_RISE_C_PER_S).min(OVERHEAT_MAX_EXTRA_C)
        });
        // Throttling: past the slowdown points the driver cuts clocks, so power drops.
        let mut reasons = 0u64;
        let mut clock_scale = 1.0;
        if self.temperature >= SW_THERMAL_C {
            reasons |= 0x20;
            clock_scale = (1.0 - (self.temperature - SW_THERMAL_C) / 20.0).clamp(0.3, 1.0);
        }
        if self.temperature >= HW_THERMAL_C {
            reasons |= 0x40;
            clock_scale = clock_scale.min(0.5);
        }
        if util <= 0.05 {
            reasons |= 0x1;
        }
        let power = IDLE_POWER_W + (POWER_LIMIT_W - IDLE_POWER_W) * util * clock_scale;
        let target = AMBIENT_C + THERMAL_RISE_C * power / POWER_LIMIT_W + extra_heat;
        self.temperature += (target - self.temperature) * alpha;
        // Model weights stay resident; the KV cache grows with load; a leak grows with time.
        let creep = self.creep_since.map_or(0.0, |since| now.saturating_sub(since).as_secs_f64() * CREEP_SHARE_PER_S);
        let mem_ratio = (0.55 + 0.4 * util + creep).min(0.995);
        let used = (MEMORY_TOTAL as f64 * mem_ratio) as u64;
        let sm_clock = if util > 0.05 { (f64::from(MAX_CLOCK_MHZ) * clock_scale) as u32 } else { 345 };
        GpuSample {
            index,
            uuid: self.uuid.clone(),
            utilization_ratio: Some(util),
            memory_utilization_ratio: Some((util * 0.8).clamp(0.0, 1.0)),
            memory_used_bytes: Some(used),
            memory_total_bytes: Some(MEMORY_TOTAL),
            memory_reserved_bytes: Some(512 * 1024 * 1024),
            temperature_celsius: Some((self.temperature * 10.0).round() / 10.0),
            memory_temperature_celsius: Some(((self.temperature + 4.0) * 10.0).round() / 10.0),
            power_watts: Some((power * 10.0).round() / 10.0),
            power_limit_watts: Some(POWER_LIMIT_W),
            energy_joules_total: Some(now.as_secs_f64() * power),
            sm_clock_mhz: Some(sm_clock),
            memory_clock_mhz: Some(2619),
            clock_event_reasons: Some(reasons),
            pcie_rx_bytes_per_second: Some(2.0e9 * util),
            pcie_tx_bytes_per_second: Some(0.5e9 * util),
            pcie_replay_total: Some(0),
            ecc_corrected_volatile_total: Some(self.ecc_corrected_volatile),
            ecc_uncorrected_volatile_total: Some(self.ecc_uncorrected_volatile),
            ecc_corrected_aggregate_total: Some(self.ecc_corrected_aggregate),
            ecc_uncorrected_aggregate_total: Some(self.ecc_uncorrected_aggregate),
            remapped_rows_correctable: Some(self.remapped_correctable),
            remapped_rows_uncorrectable: Some(self.remapped_uncorrectable),
            remapped_rows_pending: Some(false),
            remapped_rows_failed: Some(self.remap_failed),
            retired_pages_single_bit: Some(0),
            retired_pages_double_bit: Some(self.retired_double_bit),
            xid_events: self.xids.iter().map(|(&code, &count)| XidCount { code, count }).collect(),
            processes: vec![GpuProcess {
                pid: 4242 + index,
                name: "vllm (simulated)".to_owned(),
                used_memory_bytes: Some(used.saturating_sub(512 * 1024 * 1024)),
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_are_deterministic_and_plausible() {
        let mut a = SimulatedGpus::new(8, 42);
        let mut b = SimulatedGpus::new(8, 42);
        for s in 0..600 {
            let t = Duration::from_secs(s);
            let (x, y) = (a.sample(t).unwrap(), b.sample(t).unwrap());
            assert_eq!(x, y);
            for g in &x {
                let u = g.utilization_ratio.unwrap();
                assert!((0.0..=1.0).contains(&u));
                assert!(g.memory_used_bytes.unwrap() <= g.memory_total_bytes.unwrap());
                let temp = g.temperature_celsius.unwrap();
                assert!((AMBIENT_C..=AMBIENT_C + THERMAL_RISE_C + 0.1).contains(&temp), "{temp}");
                assert!(g.power_watts.unwrap() <= POWER_LIMIT_W);
            }
        }
        assert_ne!(
            SimulatedGpus::new(1, 1).inventory().gpus[0].uuid,
            SimulatedGpus::new(1, 2).inventory().gpus[0].uuid
        );
    }

    #[test]
    fn temperature_tracks_power_with_lag() {
        let mut gpus = SimulatedGpus::new(2, 7);
        let mut last = Vec::new();
        for s in 0..300 {
            last = gpus.sample(Duration::from_secs(s)).unwrap();
        }
        for g in last {
            let target = AMBIENT_C + THERMAL_RISE_C * g.power_watts.unwrap() / POWER_LIMIT_W;
            let temp = g.temperature_celsius.unwrap();
            assert!((temp - target).abs() < 6.0, "temperature {temp} far from load target {target}");
        }
    }

    fn run(gpus: &mut SimulatedGpus, from: u64, to: u64) -> Vec<GpuSample> {
        let mut last = Vec::new();
        for s in from..to {
            last = gpus.sample(Duration::from_secs(s)).unwrap();
        }
        last
    }

    #[test]
    fn overheat_climbs_and_throttles_then_clears() {
        let mut gpus = SimulatedGpus::new(2, 3);
        let before = run(&mut gpus, 0, 60);
        gpus.handle().inject(SimFault::Overheat, Some(1)).unwrap();
        let hot = run(&mut gpus, 60, 240);
        assert!(hot[1].temperature_celsius.unwrap() > 85.0, "{:?}", hot[1].temperature_celsius);
        assert!(hot[1].clock_event_reasons.unwrap() & 0x20 != 0, "software thermal slowdown");
        assert!(hot[1].sm_clock_mhz.unwrap() < before[1].sm_clock_mhz.unwrap().max(1000));
        assert!(hot[0].temperature_celsius.unwrap() < 80.0, "only GPU 1 overheats");
        gpus.handle().inject(SimFault::Clear, None).unwrap();
        let cooled = run(&mut gpus, 240, 400);
        assert!(cooled[1].temperature_celsius.unwrap() < 80.0);
    }

    #[test]
    fn memory_creep_fills_the_card() {
        let mut gpus = SimulatedGpus::new(1, 3);
        gpus.handle().inject(SimFault::MemoryCreep, None).unwrap();
        let full = run(&mut gpus, 0, 60);
        let ratio = full[0].memory_used_bytes.unwrap() as f64 / full[0].memory_total_bytes.unwrap() as f64;
        assert!(ratio > 0.99, "{ratio}");
    }

    #[test]
    fn xids_count_and_evolve_counters() {
        let mut gpus = SimulatedGpus::new(2, 3);
        let h = gpus.handle();
        h.inject(SimFault::Xid(48), Some(0)).unwrap();
        h.inject(SimFault::Xid(48), Some(0)).unwrap();
        h.inject(SimFault::Xid(13), Some(0)).unwrap();
        let s = gpus.sample(Duration::from_secs(1)).unwrap();
        assert_eq!(s[0].xid_events, [XidCount { code: 13, count: 1 }, XidCount { code: 48, count: 2 }]);
        assert_eq!(s[0].ecc_uncorrected_volatile_total, Some(2));
        assert_eq!(s[0].retired_pages_double_bit, Some(2));
        assert!(s[1].xid_events.is_empty());
        assert!(h.inject(SimFault::Overheat, Some(2)).is_err(), "GPU 2 does not exist");
    }

    #[test]
    fn a_lost_gpu_stops_reporting_and_comes_back_on_clear() {
        let mut gpus = SimulatedGpus::new(3, 3);
        gpus.handle().inject(SimFault::Xid(79), Some(2)).unwrap();
        let err = gpus.sample(Duration::from_secs(1)).unwrap_err();
        assert!(err.message.contains("GPU 2"), "{}", err.message);
        assert_eq!(err.partial.iter().map(|g| g.index).collect::<Vec<_>>(), [0, 1]);
        gpus.handle().inject(SimFault::Clear, Some(2)).unwrap();
        assert_eq!(gpus.sample(Duration::from_secs(2)).unwrap().len(), 3);
    }
}
