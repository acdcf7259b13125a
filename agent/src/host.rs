//! Host metrics and inventory from the operating system: CPU, load, memory,
//! swap, filesystems and network counters via `sysinfo`; disk I/O utilisation
//! from `/proc/diskstats` via `procfs`; and the filesystem holding the model
//! directory, named, because that is the disk that fills up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flotilla_common::model::{FilesystemSample, HostSample, NetworkSample, Sample};
use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System};

/// Filesystem types that hold no user data and only clutter the list.
const PSEUDO_FS: &[&str] = &[
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "mqueue",
    "pstore",
    "bpf",
    "autofs",
    "fusectl",
    "configfs",
    "hugetlbfs",
    "nsfs",
    "squashfs",
    "ramfs",
    "binfmt_misc",
    "rpc_pipefs",
];
/// Bound on reported filesystems and interfaces (the wire limit is higher).
const MAX_ENTRIES: usize = 128;

/// Static facts about the host, for the inventory.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    pub hostname: String,
    pub os: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpu_cores: u32,
    pub memory_total_bytes: u64,
}

/// Collects host samples; keeps state between calls (CPU usage and disk
/// utilisation are deltas).
pub struct HostCollector {
    system: System,
    disks: Disks,
    networks: Networks,
    model_dir: Option<PathBuf>,
    /// Per block device: I/O milliseconds so far, and when they were read.
    last_io: HashMap<String, (u64, Instant)>,
}

/// One host reading: the typed sample and the named extras (disk I/O, model dir).
#[derive(Debug, Clone, Default)]
pub struct HostReading {
    pub host: HostSample,
    pub samples: Vec<Sample>,
}

impl std::fmt::Debug for HostCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCollector").finish_non_exhaustive()
    }
}

impl Default for HostCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl HostCollector {
    pub fn new() -> Self {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::everything()),
        );
        Self {
            system,
            disks: Disks::new_with_refreshed_list(),
            networks: Networks::new_with_refreshed_list(),
            model_dir: None,
            last_io: HashMap::new(),
        }
    }

    /// Names the filesystem that holds `dir` (the model directory) in every reading.
    pub fn with_model_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.model_dir = dir;
        self
    }

    /// Static host facts.
    pub fn facts(&mut self) -> HostFacts {
        self.system.refresh_cpu_list(CpuRefreshKind::nothing());
        self.system.refresh_memory();
        let cpus = self.system.cpus();
        HostFacts {
            hostname: System::host_name().unwrap_or_default(),
            os: System::long_os_version().unwrap_or_default(),
            kernel: System::kernel_version().unwrap_or_default(),
            cpu_model: cpus.first().map(|c| c.brand().trim().to_owned()).unwrap_or_default(),
            cpu_cores: u32::try_from(cpus.len()).unwrap_or(u32::MAX),
            memory_total_bytes: self.system.total_memory(),
        }
    }

    /// One reading of the host. The first CPU and disk-utilisation figures after
    /// start are 0 (no delta yet).
    pub fn sample(&mut self) -> HostReading {
        let host = self.host_sample();
        let mut samples = self.disk_io();
        if let Some(dir) = &self.model_dir {
            samples.extend(model_dir_samples(dir, &host.filesystems));
        }
        HostReading { host, samples }
    }

    fn host_sample(&mut self) -> HostSample {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory();
        self.disks.refresh(true);
        self.networks.refresh(true);
        let load = System::load_average();
        let filesystems = self
            .disks
            .list()
            .iter()
            .filter(|d| d.total_space() > 0)
            .filter(|d| !PSEUDO_FS.contains(&d.file_system().to_string_lossy().as_ref()))
            .take(MAX_ENTRIES)
            .map(|d| FilesystemSample {
                mount_point: d.mount_point().to_string_lossy().into_owned(),
                device: d.name().to_string_lossy().into_owned(),
                fs_type: d.file_system().to_string_lossy().into_owned(),
                size_bytes: d.total_space(),
                avail_bytes: d.available_space(),
            })
            .collect();
        let networks = self
            .networks
            .iter()
            .take(MAX_ENTRIES)
            .map(|(name, data)| NetworkSample {
                interface: name.clone(),
                receive_bytes_total: data.total_received(),
                transmit_bytes_total: data.total_transmitted(),
            })
            .collect();
        HostSample {
            cpu_utilization_ratio: (f64::from(self.system.global_cpu_usage()) / 100.0).clamp(0.0, 1.0),
            load1: finite(load.one),
            load5: finite(load.five),
            load15: finite(load.fifteen),
            memory_total_bytes: self.system.total_memory(),
            memory_available_bytes: self.system.available_memory(),
            swap_total_bytes: self.system.total_swap(),
            swap_used_bytes: self.system.used_swap(),
            filesystems,
            networks,
        }
    }
}

impl HostCollector {
    /// Utilisation (share of wall time with I/O in flight) and bytes of each whole disk.
    fn disk_io(&mut self) -> Vec<Sample> {
        let Ok(stats) = procfs::diskstats() else { return Vec::new() };
        let now = Instant::now();
        let mut out = Vec::new();
        for d in stats.into_iter().filter(|d| is_whole_disk(&d.name)).take(MAX_ENTRIES) {
            let labels =
                [("device".to_owned(), d.name.clone())].into_iter().collect::<std::collections::BTreeMap<_, _>>();
            if let Some((ticks, at)) = self.last_io.get(&d.name) {
                let wall_ms = now.saturating_duration_since(*at).as_secs_f64() * 1000.0;
                if wall_ms > 0.0 {
                    let busy = d.time_in_progress.saturating_sub(*ticks) as f64;
                    out.push(Sample {
                        name: "flotilla_node_disk_io_utilization_ratio".into(),
                        labels: labels.clone(),
                        value: (busy / wall_ms).clamp(0.0, 1.0),
                    });
                }
            }
            // /proc/diskstats counts 512-byte sectors whatever the device's sector size.
            out.push(Sample {
                name: "flotilla_node_disk_read_bytes_total".into(),
                labels: labels.clone(),
                value: d.sectors_read as f64 * 512.0,
            });
            out.push(Sample {
                name: "flotilla_node_disk_written_bytes_total".into(),
                labels,
                value: d.sectors_written as f64 * 512.0,
            });
            self.last_io.insert(d.name, (d.time_in_progress, now));
        }
        out
    }
}

/// Whole block devices (not partitions, loop or RAM disks): `/sys/block/NAME` exists.
fn is_whole_disk(name: &str) -> bool {
    !name.starts_with("loop") && !name.starts_with("ram") && Path::new("/sys/block").join(name).exists()
}

/// Size and free space of the filesystem that holds `dir`: the longest mount
/// point that is a prefix of it.
fn model_dir_samples(dir: &Path, filesystems: &[FilesystemSample]) -> Vec<Sample> {
    let Some(fs) =
        filesystems.iter().filter(|fs| dir.starts_with(&fs.mount_point)).max_by_key(|fs| fs.mount_point.len())
    else {
        return Vec::new();
    };
    let labels: std::collections::BTreeMap<String, String> =
        [("path".to_owned(), dir.display().to_string()), ("mountpoint".to_owned(), fs.mount_point.clone())]
            .into_iter()
            .collect();
    vec![
        Sample {
            name: "flotilla_node_model_dir_size_bytes".into(),
            labels: labels.clone(),
            value: fs.size_bytes as f64,
        },
        Sample { name: "flotilla_node_model_dir_avail_bytes".into(), labels, value: fs.avail_bytes as f64 },
    ]
}

fn finite(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_host() {
        let mut c = HostCollector::new();
        let facts = c.facts();
        assert!(facts.cpu_cores >= 1);
        assert!(facts.memory_total_bytes > 0);
        let s = c.sample().host;
        assert!(s.memory_total_bytes >= s.memory_available_bytes);
        assert!((0.0..=1.0).contains(&s.cpu_utilization_ratio));
    }

    #[test]
    fn the_model_dir_is_found_on_its_mount() {
        let fs = |m: &str| FilesystemSample {
            mount_point: m.into(),
            size_bytes: 100,
            avail_bytes: 40,
            ..Default::default()
        };
        let found = model_dir_samples(Path::new("/data/models/llama"), &[fs("/"), fs("/data"), fs("/data2")]);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].labels["mountpoint"], "/data");
        assert_eq!(found[1].value, 40.0);
        assert!(model_dir_samples(Path::new("relative"), &[fs("/")]).is_empty());
    }

    #[test]
    fn disk_utilisation_is_a_ratio() {
        let mut c = HostCollector::new();
        let _ = c.sample();
        for s in c.sample().samples.iter().filter(|s| s.name.ends_with("utilization_ratio")) {
            assert!((0.0..=1.0).contains(&s.value), "{s:?}");
        }
    }
}
