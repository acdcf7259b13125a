//! What the simulator reads about the machine and the controller process from
//! `/proc`: CPU time, resident memory, the whole machine's busy time (so that a
//! figure can say what else ran beside it) and the store's size on disk.

use std::path::Path;

use anyhow::{Context, Result};

/// User plus system CPU time of a process (`self` or a pid), in seconds.
pub fn cpu_seconds(pid: &str) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    // The command name (field 2) may hold spaces; the fields after its ')' do not.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        // Field n (1-based, man 5 proc) is at n - 3 once pid and comm are cut off.
        let v = fields.get(n - 3).with_context(|| format!("{path}: short"))?;
        v.parse().with_context(|| format!("{path}: field {n} is {v:?}"))
    };
    Ok((field(14)? + field(15)?) as f64 / clock_ticks())
}

/// CPU-seconds the whole machine spent busy (every state of `/proc/stat`'s `cpu`
/// line but idle and iowait), summed over its cores.
pub fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("/proc/stat")?;
    let line = stat.lines().find(|l| l.starts_with("cpu ")).context("/proc/stat: no cpu line")?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(|v| v.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    Ok(busy as f64 / clock_ticks())
}

/// A `VmRSS`-style field of `/proc/PID/status`, in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| path.clone())?;
    let prefix = format!("{field}:");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .with_context(|| format!("{path}: no {field}"))?;
    Ok(kib * 1024)
}

/// Bytes of the files under `dir`, recursively: their lengths and, second, the
/// blocks the file system allocated for them (what `du` counts).
pub fn disk_bytes(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    entries
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => (m.len(), m.blocks() * 512),
            Err(_) => (0, 0),
        })
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
}

/// Raises this process's open-file limit to its hard limit (children inherit
/// it): each simulated agent holds a socket, and so does the controller per agent.
#[allow(unsafe_code)]
pub fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

#[allow(unsafe_code)]
fn clock_ticks() -> f64 {
    // SAFETY: sysconf(3) only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}
