//! The in-memory window of recent samples the alert rules are evaluated over:
//! series indexed by metric name, each a time-ordered run of samples that is
//! searched by binary search, with label sets shared between series.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Label pairs sorted by label name. The window keeps the metric name apart, so
/// its label sets never contain `__name__` (nor empty values, which Prometheus
/// treats as absent); an evaluation result carries `__name__` where Prometheus
/// keeps it.
pub type Labels = Vec<(String, String)>;

/// One label pair.
pub(crate) type Label = (String, String);

/// A shared, sorted label set.
pub(crate) type LabelSet = Arc<[Label]>;

/// The label Prometheus keeps the metric name under.
pub(crate) const NAME_LABEL: &str = "__name__";

/// The NaN Prometheus writes to mark a series as gone (a staleness marker). A
/// series whose newest sample in the lookback is this marker is not selected, and
/// range selectors skip it, as in Prometheus.
pub const STALE_MARKER: f64 = f64::from_bits(0x7ff0_0000_0000_0002);

/// Whether `v` is the [`STALE_MARKER`] (any other NaN is an ordinary value).
pub(crate) fn is_stale(v: f64) -> bool {
    v.to_bits() == STALE_MARKER.to_bits()
}

/// Recent samples of every series some rule can read.
#[derive(Debug)]
pub struct Window {
    retention: Duration,
    /// Series by metric name, so a selector with a literal name looks at its
    /// own series only.
    families: HashMap<String, Family>,
    /// Every label set in use, so series that share labels (all the gauges of
    /// one GPU, say) share one allocation.
    interned: HashSet<LabelSet>,
    series: usize,
    samples: usize,
}

/// The series of one metric name, ordered by labels (the order Prometheus
/// evaluates them in, which keeps floating-point sums reproducible).
#[derive(Debug, Default)]
pub(crate) struct Family {
    series: BTreeMap<LabelSet, Series>,
}

/// The samples of one series, oldest first, timestamps strictly increasing.
#[derive(Debug, Default)]
pub(crate) struct Series {
    samples: VecDeque<(i64, f64)>,
    /// How long this series is kept, when shorter than the window's retention
    /// (only the rules that read it decide how far back they look).
    keep_ms: Option<i64>,
}

impl Window {
    /// An empty window keeping `retention` of history.
    pub fn new(retention: Duration) -> Self {
        Self { retention, families: HashMap::new(), interned: HashSet::new(), series: 0, samples: 0 }
    }

    /// How much history [`Window::prune`] keeps.
    pub fn retention(&self) -> Duration {
        self.retention
    }

    /// Changes how much history [`Window::prune`] keeps (for example when the
    /// rules change and reach further back).
    pub fn set_retention(&mut self, retention: Duration) {
        self.retention = retention;
    }

    /// Appends one sample of series `name{labels}` (labels in any order; stored
    /// sorted, with `__name__` and empty values dropped). A sample not newer than
    /// the series' newest is ignored; returns whether it was kept.
    pub fn push(&mut self, name: &str, labels: &[(String, String)], t_ms: i64, value: f64) -> bool {
        self.push_kept(name, labels, t_ms, value, None)
    }

    /// [`Window::push`], keeping this series for `keep` (at most the window's
    /// retention; the longest `keep` given for a series wins).
    pub fn push_kept(
        &mut self,
        name: &str,
        labels: &[(String, String)],
        t_ms: i64,
        value: f64,
        keep: Option<Duration>,
    ) -> bool {
        let keep_ms = keep.map(|k| i64::try_from(k.as_millis()).unwrap_or(i64::MAX));
        let normalized;
        let labels = if is_normal(labels) {
            labels
        } else {
            normalized = normalize(labels);
            normalized.as_slice()
        };
        let family = match self.families.get_mut(name) {
            Some(f) => f,
            None => self.families.entry(name.to_owned()).or_default(),
        };
        if let Some(series) = family.series.get_mut(labels) {
            if series.samples.back().is_some_and(|&(t, _)| t >= t_ms) {
                return false;
            }
            series.samples.push_back((t_ms, value));
            series.keep_ms = match (series.keep_ms, keep_ms) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            self.samples += 1;
            return true;
        }
        let set = match self.interned.get(labels) {
            Some(set) => Arc::clone(set),
            None => {
                let set: LabelSet = labels.into();
                self.interned.insert(Arc::clone(&set));
                set
            }
        };
        family.series.insert(set, Series { samples: VecDeque::from([(t_ms, value)]), keep_ms });
        self.series += 1;
        self.samples += 1;
        true
    }

    /// Drops samples older than `now_ms - retention`, and series left empty.
    pub fn prune(&mut self, now_ms: i64) {
        let keep_ms = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        let (mut series_dropped, mut samples_dropped) = (0, 0);
        let mut released = false;
        self.families.retain(|_, family| {
            family.series.retain(|_, series| {
                let cutoff = now_ms.saturating_sub(series.keep_ms.map_or(keep_ms, |k| k.min(keep_ms)));
                let stale = series.samples.partition_point(|&(t, _)| t < cutoff);
                series.samples.drain(..stale);
                samples_dropped += stale;
                let keep = !series.samples.is_empty();
                if !keep {
                    series_dropped += 1;
                    released = true;
                }
                keep
            });
            !family.series.is_empty()
        });
        if released {
            // A label set only the interner still holds belongs to no series.
            self.interned.retain(|set| Arc::strong_count(set) > 1);
        }
        self.series -= series_dropped;
        self.samples -= samples_dropped;
    }

    /// How many series the window holds.
    pub fn series_count(&self) -> usize {
        self.series
    }

    /// How many samples the window holds, over all series.
    pub fn sample_count(&self) -> usize {
        self.samples
    }

    /// The series named `name`, if any, with the name as the window stores it.
    pub(crate) fn family(&self, name: &str) -> Option<(&str, &Family)> {
        self.families.get_key_value(name).map(|(name, family)| (name.as_str(), family))
    }

    /// Every metric name with its series, in no particular order.
    pub(crate) fn families(&self) -> impl Iterator<Item = (&str, &Family)> {
        self.families.iter().map(|(name, family)| (name.as_str(), family))
    }

    /// Whether the window holds series `name{labels}` (labels sorted).
    #[cfg(test)]
    pub(crate) fn contains(&self, name: &str, labels: &[Label]) -> bool {
        self.families.get(name).is_some_and(|f| f.series.contains_key(labels))
    }

    /// How many distinct label sets are shared between the series.
    #[cfg(test)]
    pub(crate) fn label_set_count(&self) -> usize {
        self.interned.len()
    }
}

impl Family {
    /// Every series of this name with its labels, ordered by labels.
    pub(crate) fn series(&self) -> impl Iterator<Item = (&LabelSet, &Series)> {
        self.series.iter()
    }
}

impl Series {
    /// The samples with `from_ms <= t <= to_ms`, oldest first.
    pub(crate) fn range(&self, from_ms: i64, to_ms: i64) -> impl Iterator<Item = (i64, f64)> + '_ {
        let start = self.samples.partition_point(|&(t, _)| t < from_ms);
        let end = self.samples.partition_point(|&(t, _)| t <= to_ms);
        self.samples.range(start..end.max(start)).copied()
    }

    /// The newest sample with `t <= at_ms`.
    pub(crate) fn last_at(&self, at_ms: i64) -> Option<(i64, f64)> {
        let end = self.samples.partition_point(|&(t, _)| t <= at_ms);
        end.checked_sub(1).and_then(|i| self.samples.get(i)).copied()
    }
}

/// Whether `labels` are already stored as-is: strictly sorted by name, without
/// `__name__` and without empty values.
fn is_normal(labels: &[Label]) -> bool {
    labels.windows(2).all(|w| w[0].0 < w[1].0) && labels.iter().all(|(k, v)| k != NAME_LABEL && !v.is_empty())
}

/// `labels` sorted by name, without `__name__` or empty values; of two labels
/// with one name the first given is kept.
fn normalize(labels: &[Label]) -> Labels {
    let mut out: Labels = labels.iter().filter(|(k, v)| k != NAME_LABEL && !v.is_empty()).cloned().collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|later, earlier| later.0 == earlier.0);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn each_series_is_kept_as_long_as_its_readers_need_within_the_retention() {
        let mut w = Window::new(Duration::from_secs(600));
        let a = l(&[("node", "a")]);
        for t in 0..=600 {
            w.push_kept("short", &a, t * 1000, 1.0, Some(Duration::from_secs(60)));
            w.push_kept("long", &a, t * 1000, 1.0, Some(Duration::from_secs(3600)));
            w.push("default", &a, t * 1000, 1.0);
        }
        w.prune(600_000);
        let count = |name: &str| w.family(name).unwrap().1.series().next().unwrap().1.range(0, i64::MAX).count();
        assert_eq!(count("short"), 61, "kept 60 s");
        assert_eq!(count("long"), 601, "capped by the window's 600 s retention");
        assert_eq!(count("default"), 601);
        assert_eq!(w.sample_count(), 61 + 601 + 601);
    }

    #[test]
    fn push_keeps_order_and_ignores_old_samples() {
        let mut w = Window::new(Duration::from_secs(60));
        let labels = l(&[("node", "a")]);
        assert!(w.push("x", &labels, 1_000, 1.0));
        assert!(w.push("x", &labels, 2_000, 2.0));
        assert!(!w.push("x", &labels, 2_000, 3.0), "same timestamp");
        assert!(!w.push("x", &labels, 1_500, 3.0), "older");
        assert_eq!((w.series_count(), w.sample_count()), (1, 2));
        let s = w.family("x").unwrap().1.series().next().unwrap().1;
        assert_eq!(s.range(0, 10_000).collect::<Vec<_>>(), vec![(1_000, 1.0), (2_000, 2.0)]);
        assert_eq!(s.range(1_000, 1_999).collect::<Vec<_>>(), vec![(1_000, 1.0)]);
        assert_eq!(s.range(1_001, 2_000).collect::<Vec<_>>(), vec![(2_000, 2.0)]);
        assert_eq!(s.range(3_000, 2_000).count(), 0);
        assert_eq!(s.last_at(1_999), Some((1_000, 1.0)));
        assert_eq!(s.last_at(999), None);
    }

    #[test]
    fn labels_are_normalized_and_shared() {
        let mut w = Window::new(Duration::from_secs(60));
        let messy = l(&[("node", "a"), ("empty", ""), ("__name__", "y"), ("gpu", "0"), ("node", "b")]);
        assert!(w.push("x", &messy, 1, 1.0));
        assert!(w.contains("x", &l(&[("gpu", "0"), ("node", "a")])));
        assert!(w.push("x", &l(&[("gpu", "0"), ("node", "a")]), 2, 1.0), "the same series");
        assert_eq!(w.series_count(), 1);
        assert!(w.push("y", &l(&[("node", "a"), ("gpu", "0")]), 1, 1.0));
        assert_eq!((w.series_count(), w.label_set_count()), (2, 1), "one label set for both names");
    }

    #[test]
    fn prune_drops_old_samples_series_and_label_sets() {
        let mut w = Window::new(Duration::from_secs(10));
        for t in 0..20 {
            w.push("x", &l(&[("node", "a")]), t * 1_000, t as f64);
        }
        w.push("y", &l(&[("node", "b")]), 0, 0.0);
        w.prune(19_000);
        assert_eq!(w.sample_count(), 11, "samples at 9s..=19s stay");
        assert_eq!((w.series_count(), w.label_set_count()), (1, 1));
        assert!(w.family("y").is_none());
        w.set_retention(Duration::ZERO);
        w.prune(100_000);
        assert_eq!((w.series_count(), w.sample_count(), w.label_set_count()), (0, 0, 0));
        assert_eq!(w.retention(), Duration::ZERO);
    }
}
