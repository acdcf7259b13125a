//! One-minute rollups of raw telemetry, kept far longer than the raw batches:
//! per node, series and minute, the min, max, sum and count of a gauge and the
//! last value of a counter.
//!
//! Rolling up is incremental and restart-safe: each node has a watermark, the
//! highest seq already folded in. A pass reads only the batches above it, merges
//! their minutes into what is stored and moves the watermark in the same store
//! transaction, so a crash neither loses nor double-counts a batch. Working by
//! seq rather than by minute means a batch that arrives late (an agent that was
//! offline resends its buffer) still lands in its minute.
//!
//! Architecture Invariant: raw batches are pruned only once rolled up
//! (`Store::prune_batches` never removes a batch above the node's watermark).

use std::collections::BTreeMap;

use std::time::Duration;

use flotilla_common::NodeId;
use flotilla_common::model::{Inventory, TelemetryBatch};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::series::{Kind, Labels, batch_samples};
use crate::store::{Store, StoreError};

/// The width of a rollup bucket.
pub const MINUTE_MS: i64 = 60_000;

/// How many batches one pass folds into one store transaction.
const CHUNK: usize = 512;

/// The identity of a series: its metric name and labels in exposition order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeriesKey {
    pub name: String,
    pub labels: Labels,
}

/// What one minute of one series keeps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Aggregate {
    /// A gauge's finite values in the minute.
    Gauge { min: f64, max: f64, sum: f64, count: u64 },
    /// A counter's newest value in the minute and when it was sampled.
    Counter { last: f64, at_unix_ms: i64 },
}

impl Aggregate {
    /// The aggregate of one sample; `None` for a gauge value that is not finite
    /// (NaN or ±Inf would poison the sum and the mean).
    pub fn of(kind: Kind, value: f64, at_unix_ms: i64) -> Option<Self> {
        match kind {
            Kind::Gauge if value.is_finite() => Some(Self::Gauge { min: value, max: value, sum: value, count: 1 }),
            Kind::Gauge => None,
            Kind::Counter => Some(Self::Counter { last: value, at_unix_ms }),
        }
    }

    /// Both aggregates as one. Merging is associative and commutative, so minutes
    /// can be folded in any order and in any number of passes. Should a series
    /// change kind, the newer aggregate wins.
    pub fn merge(self, newer: Self) -> Self {
        match (self, newer) {
            (Self::Gauge { min: a, max: b, sum: c, count: d }, Self::Gauge { min: e, max: f, sum: g, count: h }) => {
                Self::Gauge { min: a.min(e), max: b.max(f), sum: c + g, count: d + h }
            }
            (Self::Counter { last: a, at_unix_ms: t }, Self::Counter { last: b, at_unix_ms: u }) => {
                if u >= t {
                    Self::Counter { last: b, at_unix_ms: u }
                } else {
                    Self::Counter { last: a, at_unix_ms: t }
                }
            }
            (_, newer) => newer,
        }
    }

    /// The series' kind.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Gauge { .. } => Kind::Gauge,
            Self::Counter { .. } => Kind::Counter,
        }
    }
}

/// The start (Unix ms) of the minute that `unix_ms` falls in.
pub fn minute_of(unix_ms: i64) -> i64 {
    unix_ms.div_euclid(MINUTE_MS) * MINUTE_MS
}

/// One minute of one series, to be merged into the store.
#[derive(Debug, Clone, PartialEq)]
pub struct MinuteRollup {
    pub series: SeriesKey,
    /// The minute's start, Unix ms.
    pub minute_unix_ms: i64,
    pub aggregate: Aggregate,
}

/// Folds `batches` of one node into per-series, per-minute aggregates: the pure
/// core of a rollup pass.
pub fn fold(node: &NodeId, inventory: &Inventory, batches: &[TelemetryBatch]) -> Vec<MinuteRollup> {
    let mut minutes: BTreeMap<(SeriesKey, i64), Aggregate> = BTreeMap::new();
    for batch in batches {
        let minute = minute_of(batch.created_unix_ms);
        for s in batch_samples(node, inventory, batch) {
            let Some(agg) = Aggregate::of(s.kind, s.value, batch.created_unix_ms) else { continue };
            let key = (SeriesKey { name: s.name, labels: s.labels }, minute);
            minutes.entry(key).and_modify(|a| *a = a.merge(agg)).or_insert(agg);
        }
    }
    minutes
        .into_iter()
        .map(|((series, minute_unix_ms), aggregate)| MinuteRollup { series, minute_unix_ms, aggregate })
        .collect()
}

/// Rolls up every batch of `node` above its watermark, chunk by chunk, until
/// caught up or `stop` fires; returns how many batches were folded in.
/// Blocking: run it on the blocking pool.
pub fn roll_up_node(
    store: &dyn Store,
    node: &NodeId,
    inventory: &Inventory,
    stop: &CancellationToken,
) -> Result<usize, StoreError> {
    let mut done = 0;
    while !stop.is_cancelled() {
        let watermark = store.rollup_watermark(node)?;
        let batches = store.batches(node, watermark.saturating_add(1), CHUNK)?;
        let Some(last) = batches.last() else { return Ok(done) };
        let through = last.seq;
        store.commit_rollups(node, through, &fold(node, inventory, &batches))?;
        done += batches.len();
        if batches.len() < CHUNK {
            return Ok(done);
        }
    }
    Ok(done)
}

/// Rolls up every node's new batches; returns how many batches were folded in.
/// A node that fails is logged and skipped (its batches stay, unpruned, for the
/// next pass), so one bad record does not hold up the fleet.
pub fn roll_up(store: &dyn Store, stop: &CancellationToken) -> Result<usize, StoreError> {
    let mut done = 0;
    for record in store.nodes()? {
        match roll_up_node(store, &record.id, &record.inventory, stop) {
            Ok(n) => done += n,
            Err(error) => tracing::warn!(node_id = %record.id, %error, "rolling up telemetry failed"),
        }
    }
    Ok(done)
}

/// What one maintenance pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maintenance {
    pub batches_rolled_up: usize,
    pub batches_pruned: usize,
    pub minutes_pruned: usize,
}

/// One maintenance pass at `now_unix_ms`: roll up new batches, then prune raw
/// batches past `retention` and rollup minutes past `rollup_retention`. Rolling
/// up first means pruning finds everything old already rolled up.
pub fn maintain(
    store: &dyn Store,
    now_unix_ms: i64,
    retention: Duration,
    rollup_retention: Duration,
    stop: &CancellationToken,
) -> Result<Maintenance, StoreError> {
    let ago = |d: Duration| now_unix_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let batches_rolled_up = roll_up(store, stop)?;
    let batches_pruned = store.prune_batches(ago(retention))?;
    let minutes_pruned = store.prune_rollups(ago(rollup_retention))?;
    Ok(Maintenance { batches_rolled_up, batches_pruned, minutes_pruned })
}

#[cfg(test)]
mod tests {
    use flotilla_common::model::{GpuInfo, GpuSample, HostSample};

    use super::*;
    use crate::store::{NodeRecord, SledStore};

    fn gauge(min: f64, max: f64, sum: f64, count: u64) -> Aggregate {
        Aggregate::Gauge { min, max, sum, count }
    }

    #[test]
    fn gauges_merge_min_max_sum_count_and_counters_keep_the_newest() {
        let a = Aggregate::of(Kind::Gauge, 3.0, 0).unwrap();
        let b = Aggregate::of(Kind::Gauge, 5.0, 0).unwrap();
        let c = Aggregate::of(Kind::Gauge, -1.0, 0).unwrap();
        assert_eq!(a.merge(b).merge(c), gauge(-1.0, 5.0, 7.0, 3));
        assert_eq!(c.merge(a.merge(b)), a.merge(b.merge(c)), "order does not matter");
        assert_eq!(Aggregate::of(Kind::Gauge, f64::NAN, 0), None);

        let old = Aggregate::of(Kind::Counter, 10.0, 100).unwrap();
        let new = Aggregate::of(Kind::Counter, 12.0, 200).unwrap();
        assert_eq!(old.merge(new), new);
        assert_eq!(new.merge(old), new, "a late, older sample does not win");
    }

    #[test]
    fn minutes_are_floored() {
        assert_eq!(minute_of(119_999), 60_000);
        assert_eq!(minute_of(120_000), 120_000);
    }

    fn batch(seq: u64, at: i64, temp: f64, energy: f64) -> TelemetryBatch {
        TelemetryBatch {
            seq,
            created_unix_ms: at,
            gpus: vec![GpuSample {
                index: 0,
                uuid: "GPU-0".into(),
                temperature_celsius: Some(temp),
                energy_joules_total: Some(energy),
                ..Default::default()
            }],
            host: Some(HostSample::default()),
            ..Default::default()
        }
    }

    fn inventory() -> Inventory {
        Inventory {
            gpus: vec![GpuInfo { index: 0, uuid: "GPU-0".into(), model: "H100".into(), memory_total_bytes: 1 }],
            ..Default::default()
        }
    }

    fn find(rollups: &[MinuteRollup], name: &str, minute: i64) -> Option<Aggregate> {
        rollups.iter().find(|r| r.series.name == name && r.minute_unix_ms == minute).map(|r| r.aggregate)
    }

    #[test]
    fn fold_groups_by_series_and_minute() {
        let n = NodeId::new("n").unwrap();
        let batches = [
            batch(1, 60_000, 50.0, 1.0),
            batch(2, 90_000, 70.0, 2.0),
            batch(3, 119_999, 60.0, 3.0),
            batch(4, 120_000, 40.0, 4.0),
        ];
        let r = fold(&n, &inventory(), &batches);
        assert_eq!(find(&r, "flotilla_gpu_temperature_celsius", 60_000), Some(gauge(50.0, 70.0, 180.0, 3)));
        assert_eq!(find(&r, "flotilla_gpu_temperature_celsius", 120_000), Some(gauge(40.0, 40.0, 40.0, 1)));
        assert_eq!(
            find(&r, "flotilla_gpu_energy_joules_total", 60_000),
            Some(Aggregate::Counter { last: 3.0, at_unix_ms: 119_999 })
        );
        let temp = r.iter().find(|r| r.series.name == "flotilla_gpu_temperature_celsius").unwrap();
        assert!(temp.series.labels.contains(&("model".to_owned(), "H100".to_owned())));
    }

    #[test]
    fn passes_are_incremental_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let n = NodeId::new("n").unwrap();
        let record = NodeRecord { id: n.clone(), inventory: inventory(), first_seen_unix_ms: 1, last_seen_unix_ms: 1 };
        let temp = SeriesKey {
            name: "flotilla_gpu_temperature_celsius".into(),
            labels: [("node", "n"), ("gpu", "0"), ("uuid", "GPU-0"), ("model", "H100")]
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .to_vec(),
        };
        {
            let store = SledStore::open(dir.path()).unwrap();
            store.commit_node(&record).unwrap();
            store
                .commit_batches(&[(n.clone(), batch(1, 60_000, 50.0, 1.0)), (n.clone(), batch(2, 61_000, 70.0, 2.0))])
                .unwrap();
            assert_eq!(roll_up(&store, &CancellationToken::new()).unwrap(), 2);
            assert_eq!(roll_up(&store, &CancellationToken::new()).unwrap(), 0, "nothing new: nothing is read again");
            assert_eq!(store.rollup_watermark(&n).unwrap(), 2);
        }
        // After a restart, a new batch of the same minute is merged into it, not counted from scratch.
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.rollup_watermark(&n).unwrap(), 2);
        store.commit_batches(&[(n.clone(), batch(3, 62_000, 30.0, 3.0))]).unwrap();
        assert_eq!(roll_up(&store, &CancellationToken::new()).unwrap(), 1);
        let minutes = store.rollups(&n, &temp, 0, i64::MAX).unwrap();
        assert_eq!(minutes, [(60_000, gauge(30.0, 70.0, 150.0, 3))]);
        assert!(store.rollup_series(&n).unwrap().contains(&temp));
    }
}
