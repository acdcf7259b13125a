//! Range queries over stored telemetry (`Fleet.QueryMetrics`): the series that a
//! selector picks out of the series view, from raw batches inside the raw window
//! and from one-minute rollups before it, stepped and bounded in size.

use std::collections::BTreeMap;

use crate::rollup::{Aggregate, MINUTE_MS, SeriesKey, minute_of};
use crate::selector::{Selector, SelectorError};
use crate::series::batch_samples;
use crate::store::{Store, StoreError};

/// The most points one series may have (Prometheus' own resolution limit).
pub const MAX_POINTS_PER_SERIES: usize = 11_000;
/// The most points one answer may have, so that it fits a gRPC message.
pub const MAX_POINTS: usize = 100_000;

/// Why a query cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(transparent)]
    Selector(#[from] SelectorError),
    #[error("{0}")]
    Range(String),
    #[error(
        "the answer would have more than {limit} points {per}: use a larger step, a shorter range or a narrower selector"
    )]
    TooManyPoints { limit: usize, per: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A validated range query.
#[derive(Debug, Clone)]
pub struct RangeQuery {
    pub selector: Selector,
    pub start_unix_ms: i64,
    pub end_unix_ms: i64,
    /// 0: every raw sample and rollup minute as stored.
    pub step_ms: i64,
}

impl RangeQuery {
    /// Parses and checks a request; an `end_unix_ms` of 0 means `now_unix_ms`.
    pub fn new(
        selector: &str,
        start_unix_ms: i64,
        end_unix_ms: i64,
        step_ms: i64,
        now_unix_ms: i64,
    ) -> Result<Self, QueryError> {
        let selector = Selector::parse(selector)?;
        let end_unix_ms = if end_unix_ms == 0 { now_unix_ms } else { end_unix_ms };
        if start_unix_ms <= 0 || start_unix_ms > end_unix_ms {
            return Err(QueryError::Range(format!(
                "start_unix_ms {start_unix_ms} must be positive and not after end_unix_ms {end_unix_ms}"
            )));
        }
        if step_ms < 0 {
            return Err(QueryError::Range(format!("step_ms {step_ms} is negative")));
        }
        if step_ms > 0 {
            let steps = (end_unix_ms - start_unix_ms) / step_ms + 1;
            if usize::try_from(steps).map_or(true, |s| s > MAX_POINTS_PER_SERIES) {
                return Err(QueryError::TooManyPoints { limit: MAX_POINTS_PER_SERIES, per: "per series" });
            }
        }
        Ok(Self { selector, start_unix_ms, end_unix_ms, step_ms })
    }
}

/// One series of an answer: (Unix ms, value) points, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesPoints {
    pub series: SeriesKey,
    pub points: Vec<(i64, f64)>,
}

/// Folds samples and rollup minutes into per-series steps: the pure core of a
/// query. Each step keeps an [`Aggregate`], so raw samples and rollup minutes
/// mix in one step (where it straddles the raw window's edge) without special cases.
#[derive(Debug)]
pub struct Accumulator {
    step_ms: i64,
    series: BTreeMap<SeriesKey, BTreeMap<i64, Aggregate>>,
    points: usize,
}

impl Accumulator {
    /// An empty answer with steps of `step_ms` (0: a point per sample or minute).
    pub fn new(step_ms: i64) -> Self {
        Self { step_ms, series: BTreeMap::new(), points: 0 }
    }

    /// The step (its start) that `unix_ms` falls in.
    fn step_of(&self, unix_ms: i64) -> i64 {
        if self.step_ms > 0 { unix_ms.div_euclid(self.step_ms) * self.step_ms } else { unix_ms }
    }

    /// Adds what happened at `unix_ms` (one sample, or one rollup minute stamped
    /// with its start).
    pub fn add(&mut self, series: SeriesKey, unix_ms: i64, aggregate: Aggregate) -> Result<(), QueryError> {
        let at = self.step_of(unix_ms);
        let steps = self.series.entry(series).or_default();
        match steps.get_mut(&at) {
            Some(a) => *a = a.merge(aggregate),
            None => {
                if steps.len() >= MAX_POINTS_PER_SERIES {
                    return Err(QueryError::TooManyPoints { limit: MAX_POINTS_PER_SERIES, per: "per series" });
                }
                if self.points >= MAX_POINTS {
                    return Err(QueryError::TooManyPoints { limit: MAX_POINTS, per: "in all" });
                }
                self.points += 1;
                steps.insert(at, aggregate);
            }
        }
        Ok(())
    }

    /// The answer: a gauge's mean and a counter's last value per step, series
    /// ordered by name and labels.
    pub fn finish(self) -> Vec<SeriesPoints> {
        self.series
            .into_iter()
            .map(|(series, steps)| SeriesPoints {
                series,
                points: steps.into_iter().map(|(at, a)| (at, value(&a))).collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    }
}

/// The value a step shows.
fn value(a: &Aggregate) -> f64 {
    match *a {
        Aggregate::Gauge { sum, count, .. } => sum / count.max(1) as f64,
        Aggregate::Counter { last, .. } => last,
    }
}

/// Answers `query` from `store`: raw batches from `raw_from_unix_ms` (rounded up
/// to a minute) on, rollups before. Blocking: run it on the blocking pool.
pub fn run(store: &dyn Store, query: &RangeQuery, raw_from_unix_ms: i64) -> Result<Vec<SeriesPoints>, QueryError> {
    let (start, end) = (query.start_unix_ms, query.end_unix_ms);
    let split = minute_of(raw_from_unix_ms.saturating_sub(1)) + MINUTE_MS;
    let mut acc = Accumulator::new(query.step_ms);
    for record in store.nodes()? {
        let node = &record.id;
        if !query.selector.may_match_label("node", node.as_str()) {
            continue;
        }
        if start < split {
            for series in store.rollup_series(node)? {
                if !query.selector.matches(&series.name, &series.labels) {
                    continue;
                }
                for (minute, aggregate) in store.rollups(node, &series, minute_of(start), split.min(end + 1))? {
                    acc.add(series.clone(), minute, aggregate)?;
                }
            }
        }
        if end >= split {
            for batch in store.batches_between(node, start.max(split), end)? {
                for s in batch_samples(node, &record.inventory, &batch) {
                    if !query.selector.matches(&s.name, &s.labels) {
                        continue;
                    }
                    if let Some(a) = Aggregate::of(s.kind, s.value, batch.created_unix_ms) {
                        acc.add(SeriesKey { name: s.name, labels: s.labels }, batch.created_unix_ms, a)?;
                    }
                }
            }
        }
    }
    Ok(acc.finish())
}

#[cfg(test)]
mod tests {
    use flotilla_common::NodeId;
    use flotilla_common::model::{GpuSample, TelemetryBatch};

    use super::*;
    use crate::series::Kind;
    use crate::store::{NodeRecord, SledStore};

    fn key(name: &str) -> SeriesKey {
        SeriesKey { name: name.into(), labels: vec![("node".into(), "a".into())] }
    }

    fn gauge(v: f64) -> Aggregate {
        Aggregate::of(Kind::Gauge, v, 0).unwrap()
    }

    #[test]
    fn steps_average_gauges_and_keep_the_last_counter_value() {
        let mut acc = Accumulator::new(10);
        for (at, v) in [(0, 1.0), (5, 3.0), (12, 10.0)] {
            acc.add(key("g"), at, gauge(v)).unwrap();
        }
        for (at, v) in [(1, 100.0), (9, 104.0), (3, 102.0)] {
            acc.add(key("c_total"), at, Aggregate::of(Kind::Counter, v, at).unwrap()).unwrap();
        }
        // A rollup minute counts with its weight: two samples summing to 40.
        acc.add(key("g"), 14, Aggregate::Gauge { min: 10.0, max: 30.0, sum: 40.0, count: 2 }).unwrap();
        let out = acc.finish();
        assert_eq!(out[0].series, key("c_total"));
        assert_eq!(out[0].points, [(0, 104.0)]);
        assert_eq!(out[1].points, [(0, 2.0), (10, 50.0 / 3.0)]);
    }

    #[test]
    fn native_resolution_keeps_every_sample() {
        let mut acc = Accumulator::new(0);
        acc.add(key("g"), 7, gauge(1.0)).unwrap();
        acc.add(key("g"), 8, gauge(2.0)).unwrap();
        assert_eq!(acc.finish()[0].points, [(7, 1.0), (8, 2.0)]);
    }

    #[test]
    fn answers_are_bounded() {
        assert!(matches!(
            RangeQuery::new("x", 1, 1_000_000, 1, 0),
            Err(QueryError::TooManyPoints { limit: MAX_POINTS_PER_SERIES, .. })
        ));
        let mut acc = Accumulator::new(0);
        let err = (0..=MAX_POINTS_PER_SERIES as i64).try_for_each(|t| acc.add(key("g"), t, gauge(1.0))).unwrap_err();
        assert!(err.to_string().contains("11000 points per series"), "{err}");
        let mut acc = Accumulator::new(0);
        let err =
            (0..=MAX_POINTS as i64).try_for_each(|t| acc.add(key(&format!("g{}", t % 20)), t, gauge(1.0))).unwrap_err();
        assert!(err.to_string().contains("points in all"), "{err}");
    }

    #[test]
    fn requests_are_checked() {
        assert!(matches!(RangeQuery::new("x", 0, 10, 0, 0), Err(QueryError::Range(_))));
        assert!(matches!(RangeQuery::new("x", 20, 10, 0, 0), Err(QueryError::Range(_))));
        assert!(matches!(RangeQuery::new("x", 1, 10, -1, 0), Err(QueryError::Range(_))));
        assert!(matches!(RangeQuery::new("sum(x)", 1, 10, 0, 0), Err(QueryError::Selector(_))));
        assert_eq!(RangeQuery::new("x", 1, 0, 0, 99).unwrap().end_unix_ms, 99, "end 0 means now");
    }

    #[test]
    fn old_ranges_come_from_rollups_and_recent_ones_from_raw_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path()).unwrap();
        let a = NodeId::new("a").unwrap();
        store
            .commit_node(&NodeRecord {
                id: a.clone(),
                inventory: Default::default(),
                first_seen_unix_ms: 1,
                last_seen_unix_ms: 1,
            })
            .unwrap();
        let batch = |seq: u64, at: i64, t: f64| TelemetryBatch {
            seq,
            created_unix_ms: at,
            gpus: vec![GpuSample { index: 0, temperature_celsius: Some(t), ..Default::default() }],
            ..Default::default()
        };
        let m = MINUTE_MS;
        // Minute 10 (old): 40 and 60; minute 20 (recent): 70 and 90.
        let batches =
            [batch(1, 10 * m, 40.0), batch(2, 10 * m + 1, 60.0), batch(3, 20 * m, 70.0), batch(4, 20 * m + 5, 90.0)];
        store.commit_batches(&batches.map(|b| (a.clone(), b))).unwrap();
        crate::rollup::roll_up(&store, &Default::default()).unwrap();
        // The raw window starts at minute 15: pruning drops the old batches, the rollup stays.
        assert_eq!(store.prune_batches(15 * m).unwrap(), 2);
        let q = RangeQuery::new(r#"flotilla_gpu_temperature_celsius{node="a"}"#, 1, 30 * m, 0, 0).unwrap();
        let out = run(&store, &q, 15 * m).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].points, [(10 * m, 50.0), (20 * m, 70.0), (20 * m + 5, 90.0)]);
        // With a step, the rollup minute and the raw samples average per step.
        let q = RangeQuery::new("flotilla_gpu_temperature_celsius", 1, 30 * m, 30 * m, 0).unwrap();
        assert_eq!(run(&store, &q, 15 * m).unwrap()[0].points, [(0, (100.0 + 70.0 + 90.0) / 4.0)]);
        let q = RangeQuery::new(r#"flotilla_gpu_temperature_celsius{node="b"}"#, 1, 30 * m, 0, 0).unwrap();
        assert!(run(&store, &q, 15 * m).unwrap().is_empty());
    }
}
