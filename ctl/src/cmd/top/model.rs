//! The state behind `flotctl top`, pure and synchronous: fed by `WatchTelemetry`
//! batches and `ListNodes`/`ListAlerts` answers, moved by keys, read by the view.
//! It keeps a few minutes of history per node for the sparklines and derives
//! tokens/s from the inference servers' generation-token counters.

use std::collections::{BTreeMap, VecDeque};

use flotilla_proto::pb;

use crate::output::NodeView;

/// How much history a node keeps: the span of its sparklines.
pub const HISTORY_MS: i64 = 5 * 60_000;
/// Tokens/s is the counter's increase over about this long, so that one
/// scrape's rounding does not make the figure jump.
const RATE_WINDOW_MS: i64 = 10_000;
/// A node whose newest batch is older than this has no current tokens/s.
const STALE_MS: i64 = 30_000;
/// A bound on history points per node, whatever the agent's interval.
const MAX_POINTS: usize = 4096;
/// The normalised generation-token counter (the metric `capacity report` measures).
const TOKENS: &str = "flotilla_inference_generation_tokens_total";
/// At most this many GPUs of a node are shown, and a GPU's memory is capped at
/// this many bytes, so that no sum over them can overflow, whatever the wire says.
const MAX_GPUS: usize = 1024;
const MAX_GPU_BYTES: u64 = 1 << 48;

/// A key, as the model understands it (the event loop maps the terminal's keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Up,
    Down,
    Home,
    End,
    /// Open the selected node.
    Enter,
    /// Back to the fleet, or from the alerts to the nodes.
    Back,
    /// Switch between the node list and the alerts pane.
    Tab,
    /// Focus the alerts pane.
    Alerts,
    Quit,
}

/// What the event loop does after a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Quit,
}

/// Which screen is shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screen {
    /// A row per node, and the alerts.
    Fleet,
    /// One node's GPUs.
    Node(String),
}

/// Which pane of the fleet screen the arrow keys move in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    Nodes,
    Alerts,
}

/// The state of the telemetry stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Opening the stream.
    Connecting,
    /// The stream is open.
    Live,
    /// The stream failed; the next try is at `retry_at_ms`.
    Down { error: String, retry_at_ms: i64 },
}

/// One point of a node's history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// The batch's time (the agent's clock), Unix ms.
    pub at_ms: i64,
    /// The mean utilisation of the node's GPUs.
    pub util: Option<f64>,
    /// Generation tokens since the first batch seen, counter resets bridged.
    pub tokens: Option<f64>,
    /// Tokens/s since the previous batch.
    pub tokens_rate: Option<f64>,
}

/// One node: the controller's view of it, and what `top` has seen of it.
#[derive(Debug, Clone)]
pub struct Node {
    /// State, inventory and the newest batch's figures, as `nodes ls` shows them.
    pub view: NodeView,
    /// Oldest first, at most [`HISTORY_MS`] behind the newest.
    pub history: VecDeque<Point>,
    /// The node as last listed, with the newest batch as `latest`.
    wire: pb::Node,
    /// Each endpoint's last counter value, to take increases from.
    counters: BTreeMap<String, f64>,
    /// The sum of the increases so far.
    tokens_seen: f64,
}

impl Node {
    fn new(wire: pb::Node) -> Self {
        let wire = bounded(wire);
        let view = NodeView::from_wire(wire.clone(), false);
        Self { view, history: VecDeque::new(), wire, counters: BTreeMap::new(), tokens_seen: 0.0 }
    }

    /// Takes a newer listing of the node (state, inventory), keeping the newest batch.
    fn relist(&mut self, mut wire: pb::Node) {
        wire.latest = self.wire.latest.take();
        self.wire = bounded(wire);
        self.view = NodeView::from_wire(self.wire.clone(), false);
    }

    /// When the newest applied batch was made, Unix ms (0: none yet).
    fn newest_ms(&self) -> i64 {
        self.wire.latest.as_ref().map_or(0, |b| b.created_unix_ms)
    }

    /// Applies a batch newer than the last one; older or repeated batches are ignored.
    fn apply_batch(&mut self, batch: pb::TelemetryBatch) {
        if self.wire.latest.is_some() && batch.created_unix_ms <= self.newest_ms() {
            return;
        }
        let previous_ms = self.newest_ms();
        let increase = self.count_tokens(&batch);
        let at_ms = batch.created_unix_ms;
        self.wire.latest = Some(batch);
        self.wire = bounded(std::mem::take(&mut self.wire));
        self.view = NodeView::from_wire(self.wire.clone(), false);
        let util = finite(self.view.mean_gpu_utilization_ratio);
        let dt_s = at_ms.saturating_sub(previous_ms) as f64 / 1000.0;
        let tokens_rate = match increase {
            Some(Some(d)) if previous_ms > 0 && dt_s > 0.0 => finite(Some(d / dt_s)),
            _ => None,
        };
        let tokens = increase.map(|_| self.tokens_seen);
        self.history.push_back(Point { at_ms, util, tokens, tokens_rate });
        let oldest_kept = at_ms.saturating_sub(HISTORY_MS);
        while self.history.len() > MAX_POINTS || self.history.front().is_some_and(|p| p.at_ms < oldest_kept) {
            self.history.pop_front();
        }
    }

    /// Adds the batch's token counters: `None` when it has none, `Some(None)` for
    /// the first sight of them, else `Some(increase)` since the last batch.
    fn count_tokens(&mut self, batch: &pb::TelemetryBatch) -> Option<Option<f64>> {
        let mut now: BTreeMap<String, f64> = BTreeMap::new();
        for s in batch.samples.iter().filter(|s| s.name == TOKENS && s.value.is_finite() && s.value >= 0.0) {
            let endpoint = s.labels.get("endpoint").cloned().unwrap_or_default();
            *now.entry(endpoint).or_default() += s.value;
        }
        if now.is_empty() {
            return None;
        }
        let mut increase = None;
        for (endpoint, value) in &now {
            if let Some(before) = self.counters.get(endpoint) {
                // A counter that went down was reset: it counted from zero since.
                let d = if value >= before { value - before } else { *value };
                *increase.get_or_insert(0.0) += d;
            }
        }
        self.counters = now;
        if let Some(d) = increase {
            self.tokens_seen += d;
        }
        Some(increase)
    }

    /// Tokens/s over the last few seconds; `None` without token counters or when stale.
    pub fn tokens_per_second(&self, now_ms: i64) -> Option<f64> {
        let newest = self.history.iter().rev().find(|p| p.tokens.is_some())?;
        if now_ms.saturating_sub(newest.at_ms) > STALE_MS {
            return None;
        }
        let from = newest.at_ms.saturating_sub(RATE_WINDOW_MS);
        let oldest = self.history.iter().find(|p| p.tokens.is_some() && p.at_ms >= from && p.at_ms < newest.at_ms)?;
        let dt_s = newest.at_ms.saturating_sub(oldest.at_ms) as f64 / 1000.0;
        finite(Some((newest.tokens? - oldest.tokens?) / dt_s))
    }

    /// Whether the node has ever reported generation tokens.
    pub fn serves_tokens(&self) -> bool {
        !self.counters.is_empty() || self.history.iter().any(|p| p.tokens.is_some())
    }

    /// The sum of the GPUs' power draw, when any reports it.
    pub fn power_watts(&self) -> Option<f64> {
        let watts: Vec<f64> = self.view.gpus.iter().filter_map(|g| finite(g.power_watts)).collect();
        (!watts.is_empty()).then(|| watts.iter().sum())
    }
}

/// One pending or firing alert.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRow {
    pub id: String,
    pub name: String,
    pub firing: bool,
    /// The `node` label, if any.
    pub node: String,
    /// The `gpu` label, if any.
    pub gpu: String,
    pub severity: String,
    /// The `summary` annotation, else `description`.
    pub summary: String,
    /// Firing since, or pending since; Unix ms.
    pub since_ms: i64,
}

impl AlertRow {
    /// The alert as a row; `None` for resolved (and unknown) alerts.
    fn from_wire(a: &pb::Alert) -> Option<Self> {
        let firing = match pb::AlertState::try_from(a.state) {
            Ok(pb::AlertState::Firing) => true,
            Ok(pb::AlertState::Pending) => false,
            _ => return None,
        };
        let label = |k: &str| a.labels.get(k).cloned().unwrap_or_default();
        let summary = a.annotations.get("summary").or_else(|| a.annotations.get("description")).cloned();
        Some(Self {
            id: a.id.clone(),
            name: a.name.clone(),
            firing,
            node: label("node"),
            gpu: label("gpu"),
            severity: label("severity"),
            summary: summary.unwrap_or_default(),
            since_ms: if firing && a.firing_since_unix_ms > 0 {
                a.firing_since_unix_ms
            } else {
                a.active_since_unix_ms
            },
        })
    }
}

/// The figures of the summary line.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Summary {
    pub nodes: usize,
    pub up: usize,
    pub down: usize,
    /// Degraded, cordoned, draining, revoked or unknown.
    pub other: usize,
    pub gpus: usize,
    pub firing: usize,
    pub pending: usize,
    /// The sum over nodes that report tokens; `None` when none does.
    pub tokens_per_second: Option<f64>,
}

/// Everything `top` shows.
#[derive(Debug, Clone)]
pub struct Model {
    /// The controller's address, for the summary line.
    pub controller: String,
    nodes: BTreeMap<String, Node>,
    alerts: Vec<AlertRow>,
    link: Link,
    /// The last failed `ListNodes`/`ListAlerts`, until one succeeds.
    poll_error: Option<String>,
    /// Updates the controller skipped because `top` fell behind.
    missed_updates: u64,
    screen: Screen,
    focus: Focus,
    selected: usize,
    selected_gpu: usize,
    selected_alert: usize,
    /// Whether a node's telemetry arrived before it was listed.
    needs_listing: bool,
}

impl Model {
    pub fn new(controller: impl Into<String>) -> Self {
        Self {
            controller: controller.into(),
            nodes: BTreeMap::new(),
            alerts: Vec::new(),
            link: Link::Connecting,
            poll_error: None,
            missed_updates: 0,
            screen: Screen::Fleet,
            focus: Focus::Nodes,
            selected: 0,
            selected_gpu: 0,
            selected_alert: 0,
            needs_listing: false,
        }
    }

    /// Takes a `ListNodes` answer: every known node, with its newest stored batch.
    pub fn apply_nodes(&mut self, listed: Vec<pb::Node>) {
        let selected_id = self.selected_node().map(|n| n.view.id.clone());
        let mut next = BTreeMap::new();
        for mut wire in listed {
            let latest = wire.latest.take();
            let mut node = match self.nodes.remove(&wire.id) {
                Some(mut node) => {
                    node.relist(wire);
                    node
                }
                None => Node::new(wire),
            };
            // Of the listed batch and the streamed one, the newer stays.
            if let Some(batch) = latest {
                node.apply_batch(batch);
            }
            next.insert(node.view.id.clone(), node);
        }
        self.nodes = next;
        self.needs_listing = false;
        if let Some(pos) = selected_id.and_then(|id| self.nodes.keys().position(|k| *k == id)) {
            self.selected = pos;
        }
        self.clamp();
    }

    /// Takes a node's newest batch from `WatchTelemetry`.
    pub fn apply_telemetry(&mut self, node_id: &str, batch: pb::TelemetryBatch) {
        if node_id.is_empty() {
            return;
        }
        let node = self.nodes.entry(node_id.to_owned()).or_insert_with(|| {
            self.needs_listing = true;
            Node::new(pb::Node { id: node_id.to_owned(), ..Default::default() })
        });
        node.apply_batch(batch);
    }

    /// Takes a `ListAlerts` answer; resolved alerts are left out.
    pub fn apply_alerts(&mut self, alerts: &[pb::Alert]) {
        let mut rows: Vec<AlertRow> = alerts.iter().filter_map(AlertRow::from_wire).collect();
        // Firing first, then the newest.
        rows.sort_by(|a, b| b.firing.cmp(&a.firing).then(b.since_ms.cmp(&a.since_ms)).then(a.id.cmp(&b.id)));
        self.alerts = rows;
        self.clamp();
    }

    pub fn set_link(&mut self, link: Link) {
        self.link = link;
    }

    /// Records a failed poll (`Some`) or a successful one (`None`).
    pub fn set_poll_error(&mut self, error: Option<String>) {
        self.poll_error = error;
    }

    pub fn add_missed_updates(&mut self, n: u64) {
        self.missed_updates = self.missed_updates.saturating_add(n);
    }

    /// Whether a node streamed telemetry before it was listed: list again soon.
    pub fn needs_listing(&self) -> bool {
        self.needs_listing
    }

    /// Moves the state by one key.
    pub fn on_key(&mut self, key: Key) -> Flow {
        match (key, &self.screen, self.focus) {
            (Key::Quit, _, _) => return Flow::Quit,
            (Key::Up, Screen::Fleet, Focus::Nodes) => self.selected = self.selected.saturating_sub(1),
            (Key::Down, Screen::Fleet, Focus::Nodes) => self.selected = self.selected.saturating_add(1),
            (Key::Home, Screen::Fleet, Focus::Nodes) => self.selected = 0,
            (Key::End, Screen::Fleet, Focus::Nodes) => self.selected = usize::MAX,
            (Key::Up, Screen::Fleet, Focus::Alerts) => self.selected_alert = self.selected_alert.saturating_sub(1),
            (Key::Down, Screen::Fleet, Focus::Alerts) => self.selected_alert = self.selected_alert.saturating_add(1),
            (Key::Home, Screen::Fleet, Focus::Alerts) => self.selected_alert = 0,
            (Key::End, Screen::Fleet, Focus::Alerts) => self.selected_alert = usize::MAX,
            (Key::Enter, Screen::Fleet, Focus::Nodes) => {
                if let Some(id) = self.selected_node().map(|n| n.view.id.clone()) {
                    self.screen = Screen::Node(id);
                    self.selected_gpu = 0;
                }
            }
            (Key::Tab, Screen::Fleet, Focus::Nodes) | (Key::Alerts, Screen::Fleet, _) => self.focus = Focus::Alerts,
            (Key::Tab | Key::Back, Screen::Fleet, Focus::Alerts) => self.focus = Focus::Nodes,
            (Key::Up, Screen::Node(_), _) => self.selected_gpu = self.selected_gpu.saturating_sub(1),
            (Key::Down, Screen::Node(_), _) => self.selected_gpu = self.selected_gpu.saturating_add(1),
            (Key::Home, Screen::Node(_), _) => self.selected_gpu = 0,
            (Key::End, Screen::Node(_), _) => self.selected_gpu = usize::MAX,
            (Key::Back, Screen::Node(_), _) => self.screen = Screen::Fleet,
            _ => {}
        }
        self.clamp();
        Flow::Continue
    }

    /// Keeps the selections inside their lists.
    fn clamp(&mut self) {
        self.selected = self.selected.min(self.nodes.len().saturating_sub(1));
        self.selected_alert = self.selected_alert.min(self.alerts.len().saturating_sub(1));
        let gpus = self.open_node().map_or(0, |n| n.view.gpus.len());
        self.selected_gpu = self.selected_gpu.min(gpus.saturating_sub(1));
    }

    /// The nodes, ordered by id.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// The pending and firing alerts, firing first.
    pub fn alerts(&self) -> &[AlertRow] {
        &self.alerts
    }

    pub fn link(&self) -> &Link {
        &self.link
    }

    pub fn poll_error(&self) -> Option<&str> {
        self.poll_error.as_deref()
    }

    pub fn missed_updates(&self) -> u64 {
        self.missed_updates
    }

    pub fn screen(&self) -> &Screen {
        &self.screen
    }

    pub fn focus(&self) -> Focus {
        self.focus
    }

    /// The index of the selected node in [`Model::nodes`].
    pub fn selected(&self) -> usize {
        self.selected
    }

    pub fn selected_node(&self) -> Option<&Node> {
        self.nodes.values().nth(self.selected)
    }

    pub fn selected_gpu(&self) -> usize {
        self.selected_gpu
    }

    pub fn selected_alert(&self) -> usize {
        self.selected_alert
    }

    /// The node of the node screen, if it is shown and still listed.
    pub fn open_node(&self) -> Option<&Node> {
        match &self.screen {
            Screen::Node(id) => self.nodes.get(id),
            Screen::Fleet => None,
        }
    }

    /// The figures of the summary line at `now_ms`.
    pub fn summary(&self, now_ms: i64) -> Summary {
        let mut s = Summary { nodes: self.nodes.len(), ..Summary::default() };
        for n in self.nodes.values() {
            match n.view.state.as_str() {
                "up" => s.up += 1,
                "down" => s.down += 1,
                _ => s.other += 1,
            }
            s.gpus += n.view.gpus.len();
            if let Some(t) = n.tokens_per_second(now_ms) {
                *s.tokens_per_second.get_or_insert(0.0) += t;
            }
        }
        s.firing = self.alerts.iter().filter(|a| a.firing).count();
        s.pending = self.alerts.len() - s.firing;
        s
    }
}

/// `wire` with at most [`MAX_GPUS`] GPUs of at most [`MAX_GPU_BYTES`] each.
fn bounded(mut wire: pb::Node) -> pb::Node {
    let cap = |b: &mut u64| *b = (*b).min(MAX_GPU_BYTES);
    if let Some(inv) = wire.inventory.as_mut() {
        inv.gpus.truncate(MAX_GPUS);
        inv.gpus.iter_mut().for_each(|g| cap(&mut g.memory_total_bytes));
    }
    if let Some(batch) = wire.latest.as_mut() {
        batch.gpus.truncate(MAX_GPUS);
        for g in &mut batch.gpus {
            g.memory_used_bytes.iter_mut().chain(g.memory_total_bytes.iter_mut()).for_each(cap);
        }
    }
    wire
}

/// `v` when it is a finite number.
pub fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|v| v.is_finite())
}

/// `points` in `n` equal buckets ending at `end_ms` and spanning `span_ms`, oldest
/// first: the mean of `value` over each bucket's points, `None` for an empty one.
pub fn buckets(
    points: &VecDeque<Point>,
    value: impl Fn(&Point) -> Option<f64>,
    end_ms: i64,
    span_ms: i64,
    n: usize,
) -> Vec<Option<f64>> {
    if n == 0 || span_ms <= 0 {
        return Vec::new();
    }
    let mut sums = vec![(0.0, 0u32); n];
    let start = end_ms.saturating_sub(span_ms);
    for p in points {
        let Some(v) = finite(value(p)) else { continue };
        if p.at_ms <= start || p.at_ms > end_ms {
            continue;
        }
        // (at - start) is in (0, span]; bucket i holds (start + i·w, start + (i+1)·w].
        let offset = i128::from(p.at_ms) - i128::from(start) - 1;
        let i = usize::try_from(offset * n as i128 / i128::from(span_ms)).unwrap_or(usize::MAX);
        if let Some(slot) = sums.get_mut(i) {
            slot.0 += v;
            slot.1 += 1;
        }
    }
    sums.into_iter().map(|(sum, count)| (count > 0).then(|| sum / f64::from(count))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, util: f64) -> pb::GpuSample {
        pb::GpuSample { index, utilization_ratio: Some(util), ..Default::default() }
    }

    fn tokens(endpoint: &str, value: f64) -> pb::Sample {
        pb::Sample { name: TOKENS.into(), labels: [("endpoint".to_owned(), endpoint.to_owned())].into(), value }
    }

    fn batch(at_ms: i64, gpus: Vec<pb::GpuSample>, samples: Vec<pb::Sample>) -> pb::TelemetryBatch {
        pb::TelemetryBatch { seq: at_ms as u64, created_unix_ms: at_ms, gpus, samples, ..Default::default() }
    }

    fn listed(id: &str, state: pb::NodeState, gpus: u32) -> pb::Node {
        pb::Node {
            id: id.into(),
            state: state as i32,
            inventory: Some(pb::Inventory {
                gpus: (0..gpus).map(|i| pb::GpuInfo { index: i, ..Default::default() }).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn tokens_per_second_bridges_counter_resets_and_goes_stale() {
        let mut m = Model::new("c");
        m.apply_nodes(vec![listed("a", pb::NodeState::Up, 1)]);
        for (t, v) in [(1_000, 100.0), (2_000, 200.0), (3_000, 50.0), (4_000, 150.0)] {
            m.apply_telemetry("a", batch(t, vec![gpu(0, 0.5)], vec![tokens("llama", v)]));
        }
        let node = m.nodes().next().unwrap();
        // 100 + 50 (reset: counted from zero) + 100 over 3 s.
        assert_eq!(node.tokens_per_second(4_000), Some(250.0 / 3.0));
        assert_eq!(
            node.history.iter().map(|p| p.tokens_rate).collect::<Vec<_>>(),
            [None, Some(100.0), Some(50.0), Some(100.0)]
        );
        assert_eq!(node.tokens_per_second(4_000 + STALE_MS + 1), None, "stale");
        assert_eq!(m.summary(4_000).tokens_per_second, Some(250.0 / 3.0));
    }

    #[test]
    fn old_and_repeated_batches_are_ignored_and_history_is_bounded() {
        let mut m = Model::new("c");
        m.apply_telemetry("a", batch(HISTORY_MS * 3, vec![gpu(0, 0.5)], vec![]));
        m.apply_telemetry("a", batch(HISTORY_MS * 3, vec![gpu(0, 0.9)], vec![]));
        m.apply_telemetry("a", batch(1, vec![gpu(0, 0.9)], vec![]));
        assert!(m.needs_listing(), "streamed before it was listed");
        let node = m.nodes().next().unwrap();
        assert_eq!(node.history.len(), 1);
        assert_eq!(node.history[0].util, None, "no inventory yet, so no GPUs");
        m.apply_nodes(vec![listed("a", pb::NodeState::Up, 1)]);
        assert!(!m.needs_listing());
        m.apply_telemetry("a", batch(HISTORY_MS * 4 + 1, vec![gpu(0, 0.25)], vec![]));
        let node = m.nodes().next().unwrap();
        assert_eq!(node.history.len(), 1, "the older point fell out of the window");
        assert_eq!(node.view.mean_gpu_utilization_ratio, Some(0.25));
        assert!(!node.serves_tokens());
        assert_eq!(node.tokens_per_second(HISTORY_MS * 4), None);
    }

    #[test]
    fn listing_keeps_the_streamed_batch_and_drops_unlisted_nodes() {
        let mut m = Model::new("c");
        m.apply_nodes(vec![listed("a", pb::NodeState::Up, 1), listed("b", pb::NodeState::Down, 2)]);
        m.apply_telemetry("a", batch(5_000, vec![gpu(0, 0.75)], vec![]));
        let mut a = listed("a", pb::NodeState::Degraded, 1);
        a.latest = Some(batch(4_000, vec![gpu(0, 0.1)], vec![]));
        m.on_key(Key::Down);
        assert_eq!(m.selected_node().unwrap().view.id, "b");
        m.apply_nodes(vec![a, listed("b", pb::NodeState::Down, 2)]);
        let s = m.summary(5_000);
        assert_eq!((s.nodes, s.up, s.down, s.other, s.gpus), (2, 0, 1, 1, 3));
        let node = m.nodes().next().unwrap();
        assert_eq!(node.view.mean_gpu_utilization_ratio, Some(0.75), "the newer streamed batch stays");
        assert_eq!(node.view.state, "degraded");
        m.apply_nodes(vec![listed("b", pb::NodeState::Down, 2)]);
        assert_eq!(m.node_count(), 1);
        assert_eq!(m.selected_node().unwrap().view.id, "b", "the selection follows its node");
    }

    #[test]
    fn keys_move_open_and_close() {
        let mut m = Model::new("c");
        assert_eq!(m.on_key(Key::Enter), Flow::Continue, "nothing to open");
        assert_eq!(m.screen(), &Screen::Fleet);
        m.apply_nodes(vec![listed("a", pb::NodeState::Up, 2), listed("b", pb::NodeState::Up, 4)]);
        m.on_key(Key::End);
        m.on_key(Key::Down);
        assert_eq!(m.selected(), 1);
        m.on_key(Key::Enter);
        assert_eq!(m.screen(), &Screen::Node("b".into()));
        m.on_key(Key::End);
        assert_eq!(m.selected_gpu(), 3);
        m.on_key(Key::Up);
        assert_eq!(m.selected_gpu(), 2);
        m.on_key(Key::Back);
        assert_eq!(m.screen(), &Screen::Fleet);
        m.on_key(Key::Tab);
        assert_eq!(m.focus(), Focus::Alerts);
        m.on_key(Key::Down);
        assert_eq!(m.selected_alert(), 0, "no alerts to move to");
        m.on_key(Key::Back);
        assert_eq!(m.focus(), Focus::Nodes);
        m.on_key(Key::Up);
        assert_eq!(m.selected(), 0);
        assert_eq!(m.on_key(Key::Quit), Flow::Quit);
    }

    #[test]
    fn alerts_firing_first_resolved_left_out() {
        let alert = |id: &str, state: pb::AlertState, since: i64| pb::Alert {
            id: id.into(),
            name: id.into(),
            state: state as i32,
            active_since_unix_ms: since,
            firing_since_unix_ms: if state == pb::AlertState::Firing { since + 1 } else { 0 },
            labels: [("node".to_owned(), "a".to_owned())].into(),
            annotations: [("description".to_owned(), "why".to_owned())].into(),
            ..Default::default()
        };
        let mut m = Model::new("c");
        m.apply_alerts(&[
            alert("p", pb::AlertState::Pending, 9),
            alert("f1", pb::AlertState::Firing, 1),
            alert("r", pb::AlertState::Resolved, 5),
            alert("f2", pb::AlertState::Firing, 3),
            pb::Alert { id: "x".into(), state: 42, ..Default::default() },
        ]);
        let ids: Vec<&str> = m.alerts().iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["f2", "f1", "p"]);
        assert_eq!(
            (m.alerts()[0].since_ms, m.alerts()[0].node.as_str(), m.alerts()[0].summary.as_str()),
            (4, "a", "why")
        );
        let s = m.summary(0);
        assert_eq!((s.firing, s.pending), (2, 1));
    }

    #[test]
    fn buckets_take_means_and_leave_gaps() {
        let p = |at_ms, util| Point { at_ms, util, tokens: None, tokens_rate: None };
        let points: VecDeque<Point> =
            [p(0, Some(1.0)), p(1, Some(0.2)), p(10, Some(0.4)), p(25, Some(f64::NAN)), p(30, Some(0.9)), p(31, None)]
                .into();
        let b = buckets(&points, |p| p.util, 30, 30, 3);
        assert_eq!(b.len(), 3);
        assert!((b[0].unwrap() - 0.3).abs() < 1e-9, "{b:?}");
        assert_eq!(&b[1..], [None, Some(0.9)], "NaN skipped, beyond the end skipped");
        assert!(buckets(&points, |p| p.util, 30, 0, 3).is_empty());
        assert!(buckets(&points, |p| p.util, 30, 30, 0).is_empty());
    }
}
