//! Host metrics and inventory from the operating system (via `sysinfo`): CPU,
//! load, memory, swap, filesystems and network counters.

use flotilla_common::model::{FilesystemSample, HostSample, NetworkSample};
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

/// Collects host samples; keeps state between calls (CPU usage is a delta).
pub struct HostCollector {
    system: System,
    disks: Disks,
    networks: Networks,
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
        Self { system, disks: Disks::new_with_refreshed_list(), networks: Networks::new_with_refreshed_list() }
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

    /// One sample of the host. The first CPU figure after start is 0 (no delta yet).
    pub fn sample(&mut self) -> HostSample {
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
        let s = c.sample();
        assert!(s.memory_total_bytes >= s.memory_available_bytes);
        assert!((0.0..=1.0).contains(&s.cpu_utilization_ratio));
    }
}
