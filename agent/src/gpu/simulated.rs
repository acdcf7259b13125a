//! Simulated GPUs for the demo and the tests, on machines without NVIDIA hardware.
//!
//! Each GPU follows a deterministic load curve (a function of the seed, its index
//! and the time since start), and everything else follows the load the way real
//! H100s do: memory is allocated as the load rises, power tracks utilisation,
//! and temperature lags behind power with a thermal time constant.

use std::time::Duration;

use flotilla_common::model::{GpuInfo, GpuSample, GpuSourceKind};

use super::{GpuError, GpuInventory, GpuSource};

const MODEL: &str = "NVIDIA H100 80GB HBM3 (simulated)";
const MEMORY_TOTAL: u64 = 80 * 1024 * 1024 * 1024;
const POWER_LIMIT_W: f64 = 700.0;
const IDLE_POWER_W: f64 = 70.0;
const AMBIENT_C: f64 = 32.0;
/// Degrees above ambient at full power, and how fast temperature follows power.
const THERMAL_RISE_C: f64 = 45.0;
const THERMAL_TAU_S: f64 = 20.0;

/// `count` simulated GPUs with curves derived from `seed`.
#[derive(Debug, Clone)]
pub struct SimulatedGpus {
    seed: u64,
    gpus: Vec<GpuState>,
    last: Option<Duration>,
}

#[derive(Debug, Clone)]
struct GpuState {
    uuid: String,
    temperature: f64,
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
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
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
                GpuState {
                    uuid,
                    temperature: AMBIENT_C + 5.0,
                }
            })
            .collect();
        Self {
            seed,
            gpus,
            last: None,
        }
    }

    /// Utilisation of GPU `i` at time `t` seconds: a slow diurnal-like wave plus a
    /// faster request-burst wave, each with a per-GPU phase.
    fn utilization(&self, i: usize, t: f64) -> f64 {
        let h = mix(self.seed ^ (i as u64).wrapping_mul(0x1000_0001));
        let phase = (h % 10_000) as f64 / 10_000.0 * std::f64::consts::TAU;
        let base = 0.25 + 0.5 * (h >> 40) as f64 / f64::from(1u32 << 24);
        let slow = 0.2 * (t / 300.0 * std::f64::consts::TAU + phase).sin();
        let fast = 0.1 * (t / 17.0 * std::f64::consts::TAU + phase * 3.0).sin();
        (base + slow + fast).clamp(0.0, 1.0)
    }
}

impl GpuSource for SimulatedGpus {
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
        let t = elapsed.as_secs_f64();
        let dt = self.last.map_or(THERMAL_TAU_S, |last| {
            elapsed.saturating_sub(last).as_secs_f64()
        });
        self.last = Some(elapsed);
        let alpha = 1.0 - (-dt / THERMAL_TAU_S).exp();
        let utils: Vec<f64> = (0..self.gpus.len())
            .map(|i| self.utilization(i, t))
            .collect();
        Ok(self
            .gpus
            .iter_mut()
            .zip(utils)
            .enumerate()
            .map(|(i, (gpu, util))| {
                let power = IDLE_POWER_W + (POWER_LIMIT_W - IDLE_POWER_W) * util;
                let target = AMBIENT_C + THERMAL_RISE_C * power / POWER_LIMIT_W;
                gpu.temperature += (target - gpu.temperature) * alpha;
                // Model weights stay resident; the KV cache grows with load.
                let mem_ratio = (0.55 + 0.4 * util).min(0.97);
                GpuSample {
                    index: i as u32,
                    uuid: gpu.uuid.clone(),
                    utilization_ratio: Some(util),
                    memory_utilization_ratio: Some((util * 0.8).clamp(0.0, 1.0)),
                    memory_used_bytes: Some((MEMORY_TOTAL as f64 * mem_ratio) as u64),
                    memory_total_bytes: Some(MEMORY_TOTAL),
                    temperature_celsius: Some((gpu.temperature * 10.0).round() / 10.0),
                    power_watts: Some((power * 10.0).round() / 10.0),
                    power_limit_watts: Some(POWER_LIMIT_W),
                    sm_clock_mhz: Some(if util > 0.05 { 1980 } else { 345 }),
                    memory_clock_mhz: Some(2619),
                    ..Default::default()
                }
            })
            .collect())
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
                assert!(
                    (AMBIENT_C..=AMBIENT_C + THERMAL_RISE_C + 0.1).contains(&temp),
                    "{temp}"
                );
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
            assert!(
                (temp - target).abs() < 6.0,
                "temperature {temp} far from load target {target}"
            );
        }
    }
}
