//! Output for people (tables) and scripts (JSON, YAML), and the views that
//! flotctl prints: stable field names, units in the names. Tables are coloured
//! only when [`style`] says so; list commands run once or watched ([`watch`]).

mod style;
mod watch;

use std::collections::BTreeMap;
use std::io::Write as _;

use comfy_table::Table;
use flotilla_proto::pb;
use serde::Serialize;

pub use self::style::{cell_colored_by, init as init_color, state_cell};
pub use self::watch::list;
use crate::cli::Format;

/// How many columns a table shows: `-o wide` asks for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Columns {
    Normal,
    Wide,
}

impl Columns {
    /// The columns of a table `format`; only `wide` widens.
    pub fn of(format: Format) -> Self {
        if format == Format::Wide { Columns::Wide } else { Columns::Normal }
    }
}

/// Prints `value` as JSON or YAML, or calls `table` for the table formats (`wide`
/// included: commands without a wide view print their one table).
pub fn print<T: Serialize>(format: Format, value: &T, table: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    let text = match format {
        Format::Json => format!("{}\n", serde_json::to_string_pretty(value)?),
        Format::Yaml => serde_yaml_ng::to_string(value)?,
        Format::Table | Format::Wide => format!("{}\n", table(value)),
    };
    write_stdout(&text)
}

/// Prints a list: like [`print`], with a table that knows `-o wide`.
pub fn print_list<T: Serialize>(
    format: Format,
    value: &T,
    table: impl Fn(&T, Columns) -> String,
) -> anyhow::Result<()> {
    print(format, value, |v| table(v, Columns::of(format)))
}

/// Writes `text` to stdout; a reader that went away (`| head -1`) ends the output, not flotctl.
pub(crate) fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(error) if reader_gone(&error) => Ok(()),
        other => Ok(other?),
    }
}

/// Whether writing failed because the reader went away.
fn reader_gone(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::BrokenPipe
}

/// A plain, borderless table with the given header, coloured when this run colours.
pub fn table(header: &[&str]) -> Table {
    style::styled_table(header, style::enabled())
}

/// `2023-11-14T22:13:20Z`, or `-` for no time.
pub fn rfc3339(unix_ms: i64) -> String {
    match u64::try_from(unix_ms) {
        Ok(ms) => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
        }
        Err(_) => "-".to_owned(),
    }
}

/// One node as flotctl shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub id: String,
    /// up, degraded, cordoned, draining or down.
    pub state: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub state_reason: String,
    pub hostname: String,
    pub gpu_source: String,
    pub gpus: Vec<GpuView>,
    pub mean_gpu_utilization_ratio: Option<f64>,
    pub max_gpu_temperature_celsius: Option<f64>,
    pub gpu_memory_used_bytes: u64,
    pub gpu_memory_total_bytes: u64,
    pub first_seen_unix_ms: i64,
    pub last_seen_unix_ms: i64,
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<HostView>,
    /// The managed containers the agent last reported (in `nodes show`); absent
    /// when it has reported none since the controller started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub containers: Option<Vec<ContainerView>>,
    /// Why the agent could not list its containers, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container_runtime_error: Option<String>,
}

/// One managed container in `nodes show`.
#[derive(Debug, Clone, Serialize)]
pub struct ContainerView {
    pub name: String,
    /// The engine's id, short form.
    pub id: String,
    pub image: String,
    /// created, running, paused, restarting, removing, exited, dead or unknown.
    pub state: String,
    /// starting, healthy or unhealthy; null without a health check.
    pub health: Option<String>,
    pub deployment: Option<String>,
    pub revision: Option<String>,
    pub created_unix_ms: Option<i64>,
}

impl ContainerView {
    fn from_wire(c: pb::Container) -> Self {
        let some = |s: String| (!s.is_empty()).then_some(s);
        ContainerView {
            name: c.name,
            id: c.id,
            image: c.image,
            state: c.state,
            health: some(c.health),
            deployment: some(c.deployment),
            revision: some(c.revision),
            created_unix_ms: (c.created_unix_ms > 0).then_some(c.created_unix_ms),
        }
    }
}

/// One GPU: inventory and its latest sample.
#[derive(Debug, Clone, Serialize)]
pub struct GpuView {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: Option<u64>,
    pub utilization_ratio: Option<f64>,
    pub temperature_celsius: Option<f64>,
    pub power_watts: Option<f64>,
    pub power_limit_watts: Option<f64>,
    pub sm_clock_mhz: Option<u32>,
    pub memory_temperature_celsius: Option<f64>,
    /// Why the clocks are held down, by name (`sw_thermal_slowdown`, ...); null when unknown.
    pub clock_event_reasons: Option<Vec<String>>,
    /// XID errors seen since the agent started, per code.
    pub xid_events: Vec<XidView>,
    pub ecc_uncorrected_volatile_total: Option<u64>,
    pub ecc_uncorrected_aggregate_total: Option<u64>,
    pub remapped_rows_pending: Option<bool>,
    pub remapped_rows_failed: Option<bool>,
}

/// How many XID errors of one code a GPU raised.
#[derive(Debug, Clone, Serialize)]
pub struct XidView {
    pub code: u64,
    pub count: u64,
}

/// Host facts and latest host sample (in `nodes show`).
#[derive(Debug, Clone, Serialize)]
pub struct HostView {
    pub os: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpu_cores: u32,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: Option<u64>,
    pub cpu_utilization_ratio: Option<f64>,
    pub load1: Option<f64>,
    pub driver_version: String,
    pub cuda_version: String,
    pub gpu_source_note: String,
    pub agent_version: String,
    pub peer_addr: String,
    pub filesystems: Vec<FilesystemView>,
}

/// One filesystem in `nodes show`.
#[derive(Debug, Clone, Serialize)]
pub struct FilesystemView {
    pub mount_point: String,
    pub size_bytes: u64,
    pub avail_bytes: u64,
}

impl NodeView {
    /// Builds the view; `detail` adds host facts.
    pub fn from_wire(node: pb::Node, detail: bool) -> Self {
        let inv = node.inventory.unwrap_or_default();
        let latest = node.latest.unwrap_or_default();
        let gpus: Vec<GpuView> = inv
            .gpus
            .iter()
            .map(|g| {
                let s = latest.gpus.iter().find(|s| s.index == g.index);
                GpuView {
                    index: g.index,
                    uuid: g.uuid.clone(),
                    model: g.model.clone(),
                    memory_total_bytes: s.and_then(|s| s.memory_total_bytes).unwrap_or(g.memory_total_bytes),
                    memory_used_bytes: s.and_then(|s| s.memory_used_bytes),
                    utilization_ratio: s.and_then(|s| s.utilization_ratio),
                    temperature_celsius: s.and_then(|s| s.temperature_celsius),
                    power_watts: s.and_then(|s| s.power_watts),
                    power_limit_watts: s.and_then(|s| s.power_limit_watts),
                    sm_clock_mhz: s.and_then(|s| s.sm_clock_mhz),
                    memory_temperature_celsius: s.and_then(|s| s.memory_temperature_celsius),
                    clock_event_reasons: s.and_then(|s| s.clock_event_reasons).map(|mask| {
                        flotilla_common::model::clock_event_reason_names(mask).map(str::to_owned).collect()
                    }),
                    xid_events: s
                        .map(|s| s.xid_events.iter().map(|x| XidView { code: x.code, count: x.count }).collect())
                        .unwrap_or_default(),
                    ecc_uncorrected_volatile_total: s.and_then(|s| s.ecc_uncorrected_volatile_total),
                    ecc_uncorrected_aggregate_total: s.and_then(|s| s.ecc_uncorrected_aggregate_total),
                    remapped_rows_pending: s.and_then(|s| s.remapped_rows_pending),
                    remapped_rows_failed: s.and_then(|s| s.remapped_rows_failed),
                }
            })
            .collect();
        let utils: Vec<f64> = gpus.iter().filter_map(|g| g.utilization_ratio).collect();
        let mean = (!utils.is_empty()).then(|| utils.iter().sum::<f64>() / utils.len() as f64);
        let max_temp = gpus.iter().filter_map(|g| g.temperature_celsius).reduce(f64::max);
        let host = detail.then(|| {
            let h = latest.host.clone();
            HostView {
                os: inv.os.clone(),
                kernel: inv.kernel.clone(),
                cpu_model: inv.cpu_model.clone(),
                cpu_cores: inv.cpu_cores,
                memory_total_bytes: inv.memory_total_bytes,
                memory_available_bytes: h.as_ref().map(|h| h.memory_available_bytes),
                cpu_utilization_ratio: h.as_ref().map(|h| h.cpu_utilization_ratio),
                load1: h.as_ref().map(|h| h.load1),
                driver_version: inv.driver_version.clone(),
                cuda_version: inv.cuda_version.clone(),
                gpu_source_note: inv.gpu_source_note.clone(),
                agent_version: inv.agent_version.clone(),
                peer_addr: node.peer_addr.clone(),
                filesystems: h
                    .map(|h| {
                        h.filesystems
                            .into_iter()
                            .map(|f| FilesystemView {
                                mount_point: f.mount_point,
                                size_bytes: f.size_bytes,
                                avail_bytes: f.avail_bytes,
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        });
        let state = pb::NodeState::try_from(node.state).unwrap_or(pb::NodeState::Unspecified);
        let report = inv.containers.clone().filter(|_| detail);
        let container_runtime_error = report.as_ref().map(|r| r.runtime_error.clone()).filter(|e| !e.is_empty());
        let containers = report.map(|r| r.containers.into_iter().map(ContainerView::from_wire).collect());
        NodeView {
            id: node.id,
            state: state_name(state).to_owned(),
            state_reason: node.state_reason,
            hostname: inv.hostname,
            gpu_source: inv.gpu_source,
            gpu_memory_used_bytes: gpus.iter().filter_map(|g| g.memory_used_bytes).fold(0, u64::saturating_add),
            gpu_memory_total_bytes: gpus.iter().map(|g| g.memory_total_bytes).fold(0, u64::saturating_add),
            gpus,
            mean_gpu_utilization_ratio: mean,
            max_gpu_temperature_celsius: max_temp,
            first_seen_unix_ms: node.first_seen_unix_ms,
            last_seen_unix_ms: node.last_seen_unix_ms,
            labels: inv.labels.into_iter().collect(),
            host,
            containers,
            container_runtime_error,
        }
    }
}

/// One series of `flotctl metrics get`, shaped like a Prometheus API result.
#[derive(Debug, Clone, Serialize)]
pub struct SeriesView {
    /// The labels, with the metric name under `__name__`.
    pub metric: BTreeMap<String, String>,
    /// `[unix_ms, value]` pairs, oldest first.
    pub points: Vec<(i64, f64)>,
}

impl SeriesView {
    /// Builds the view of one answered series.
    pub fn from_wire(s: pb::MetricSeries) -> Self {
        let mut metric: BTreeMap<String, String> = s.labels.into_iter().collect();
        metric.insert("__name__".to_owned(), s.name);
        Self { metric, points: s.points.into_iter().map(|p| (p.unix_ms, p.value)).collect() }
    }

    /// `name{label="value",...}`, as Prometheus prints a series.
    pub fn selector(&self) -> String {
        let name = self.metric.get("__name__").map_or("", String::as_str);
        let labels: Vec<String> =
            self.metric.iter().filter(|(k, _)| *k != "__name__").map(|(k, v)| format!("{k}={v:?}")).collect();
        format!("{name}{{{}}}", labels.join(","))
    }
}

fn state_name(s: pb::NodeState) -> &'static str {
    match s {
        pb::NodeState::Up => "up",
        pb::NodeState::Degraded => "degraded",
        pb::NodeState::Cordoned => "cordoned",
        pb::NodeState::Draining => "draining",
        pb::NodeState::Down => "down",
        pb::NodeState::Revoked => "revoked",
        pb::NodeState::Unspecified => "unknown",
    }
}

/// `12.3 GiB` style.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

/// `42%` or `-`.
pub fn percent(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{:.0}%", r * 100.0))
}

/// A value for people: whole numbers as they are, others to three decimals
/// without trailing zeros, `-` for none.
pub fn number(v: Option<f64>) -> String {
    let Some(v) = v else { return "-".to_owned() };
    if v.fract() == 0.0 && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    if !v.is_finite() {
        return v.to_string();
    }
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// `71°C` or `-`.
pub fn celsius(t: Option<f64>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| format!("{t:.0}°C"))
}

/// How long ago `unix_ms` was, relative to `now_ms`: `3s ago`, `5m ago`, `never`.
pub fn ago(unix_ms: i64, now_ms: i64) -> String {
    if unix_ms <= 0 {
        return "never".to_owned();
    }
    // A time ahead (a silence's end) reads "in 2h"; clock skew of under a second is "0s ago".
    if unix_ms - now_ms >= 1000 {
        return format!("in {}", span((unix_ms - now_ms) / 1000));
    }
    format!("{} ago", span((now_ms - unix_ms).max(0) / 1000))
}

/// Whole seconds as the largest unit that fits: `59s`, `4m`, `3h`, `2d`.
fn span(s: i64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(80 * 1024 * 1024 * 1024), "80.0 GiB");
        assert_eq!(percent(Some(0.423)), "42%");
        assert_eq!(percent(None), "-");
        assert_eq!(ago(1_000, 61_000), "1m ago");
        assert_eq!(ago(0, 5), "never");
        assert_eq!(ago(7_201_000, 1_000), "in 2h", "a time ahead");
        assert_eq!(ago(1_500, 1_000), "0s ago", "sub-second skew");
        assert_eq!(number(Some(85_899_345_920.0)), "85899345920");
        assert_eq!(number(Some(61.25)), "61.25");
        assert_eq!(number(Some(0.1234)), "0.123");
        assert_eq!(number(None), "-");
    }

    #[test]
    fn series_print_like_prometheus() {
        let s = SeriesView::from_wire(pb::MetricSeries {
            name: "flotilla_gpu_temperature_celsius".into(),
            labels: [("node".to_owned(), "a".to_owned()), ("gpu".to_owned(), "0".to_owned())].into_iter().collect(),
            points: vec![pb::MetricPoint { unix_ms: 5, value: 61.0 }],
        });
        assert_eq!(s.selector(), r#"flotilla_gpu_temperature_celsius{gpu="0",node="a"}"#);
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"metric":{"__name__":"flotilla_gpu_temperature_celsius","gpu":"0","node":"a"},"points":[[5,61.0]]}"#
        );
    }
}
