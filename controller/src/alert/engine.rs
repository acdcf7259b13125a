//! The alert engine: keeps the samples rules read in a [`Window`], evaluates
//! every rule when telemetry is committed (coalesced) and on a timer, moves alert
//! instances through pending → firing → resolved, persists every transition
//! before it is delivered, and answers the operator API (list, ack, silences,
//! rules, reload).
//!
//! Architecture Invariant: an alert change is flushed to the store before it is
//! delivered or shown as done to an operator; after a restart the engine carries
//! on from the stored records (pending `for` timers keep their start), and it
//! evaluates nothing until agents have had `restart_grace` to reconnect, so a
//! restart never reads as a fleet-wide outage.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use flotilla_common::NodeId;
use flotilla_common::model::{NodeState, TelemetryBatch};
use flotilla_common::time::now_unix_ms;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::delivery::{DeliveryConfig, Dispatcher, OutgoingAlert};
use super::rules::{Rule, RuleSet, RulesError};
use super::state::{Ack, AlertEvent, AlertRecord, AlertState, Silence, SilenceMatcher, fingerprint};
use super::template::Data;
use super::window::Window;
use crate::fleetview::FleetView;
use crate::metrics::Metrics;
use crate::registry::{Registry, node_state};
use crate::series::batch_samples;
use crate::store::{AlertChanges, Store, StoreError};

/// The `[alerting]` section of the controller configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertingConfig {
    /// The rule file (Prometheus rule-group YAML); no rules when unset.
    pub rules: Option<PathBuf>,
    /// Rules are evaluated after every commit of telemetry, but not more often than this.
    #[serde(with = "humantime_serde")]
    pub min_eval_interval: Duration,
    /// And at least this often (for `for` expiry, `absent` and agent liveness).
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// After a controller start, nothing is evaluated until every known agent has
    /// reconnected or this long has passed, so that no agent is judged down
    /// before it had time to come back (agents retry at most every 30 s).
    #[serde(with = "humantime_serde")]
    pub restart_grace: Duration,
    /// After an outage longer than this (the controller not evaluating), pending
    /// `for` timers start over instead of carrying on: the condition was not
    /// watched while it was down (Prometheus' outage tolerance).
    #[serde(with = "humantime_serde")]
    pub outage_tolerance: Duration,
    /// A firing critical alert nobody acknowledged is delivered again this often.
    #[serde(with = "humantime_serde")]
    pub renotify_interval: Duration,
    /// Resolved alerts stay listed this long.
    #[serde(with = "humantime_serde")]
    pub resolved_retention: Duration,
    /// Alert history is kept this long.
    #[serde(with = "humantime_serde")]
    pub history_retention: Duration,
    /// Base of the `generatorURL` of delivered alerts.
    pub external_url: String,
    pub delivery: DeliveryConfig,
}

impl Default for AlertingConfig {
    fn default() -> Self {
        Self {
            rules: None,
            min_eval_interval: Duration::from_millis(200),
            tick: Duration::from_secs(1),
            restart_grace: Duration::from_secs(60),
            outage_tolerance: Duration::from_secs(3600),
            renotify_interval: Duration::from_secs(3600),
            resolved_retention: Duration::from_secs(15 * 60),
            history_retention: Duration::from_secs(30 * 86_400),
            external_url: "https://localhost:7443".to_owned(),
            delivery: DeliveryConfig::default(),
        }
    }
}

impl AlertingConfig {
    /// Checks what parsing cannot; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.tick.is_zero() || self.tick > Duration::from_secs(60) {
            return Err("alerting.tick must be between 1ms and 1m".to_owned());
        }
        if self.min_eval_interval > self.tick {
            return Err("alerting.min_eval_interval must not be above alerting.tick".to_owned());
        }
        if self.renotify_interval < Duration::from_secs(60) {
            return Err("alerting.renotify_interval must be at least 1m".to_owned());
        }
        if !(self.external_url.starts_with("http://") || self.external_url.starts_with("https://")) {
            return Err(format!("alerting.external_url {:?} must start with http:// or https://", self.external_url));
        }
        self.delivery.validate().map_err(|e| format!("alerting.delivery: {e}"))
    }
}

/// Why an operator request about alerts failed.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("no alert with id {0:?}: list them with `flotctl alerts ls`")]
    NoSuchAlert(String),
    #[error("no silence with id {0:?}: list them with `flotctl alerts silences`")]
    NoSuchSilence(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("the controller has no rule file configured (alerting.rules)")]
    NoRuleFile,
    #[error(transparent)]
    Rules(#[from] RulesError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("store task failed: {0}")]
    Task(String),
}

/// An alert as the API shows it: the record plus what is decided live.
#[derive(Debug, Clone)]
pub struct AlertView {
    pub record: AlertRecord,
    pub silenced_by: Vec<String>,
    pub inhibited: bool,
}

/// A rule as the API shows it.
#[derive(Debug, Clone)]
pub struct RuleView {
    pub group: String,
    pub name: String,
    pub expr: String,
    pub for_: Duration,
    pub keep_firing_for: Duration,
    pub labels: BTreeMap<String, String>,
    pub last_error: Option<String>,
    pub last_evaluation_unix_ms: i64,
    pub pending: u32,
    pub firing: u32,
}

/// The health of one rule's last evaluation.
#[derive(Debug, Clone, Default)]
struct Health {
    last_error: Option<String>,
    last_evaluation_unix_ms: i64,
}

/// The rule set in force.
#[derive(Debug)]
struct Loaded {
    rules: Arc<RuleSet>,
    loaded_unix_ms: i64,
}

/// Alert state, changed only under its lock (held across the store write so that
/// an ack and an evaluation never overwrite each other).
#[derive(Debug, Default)]
struct Book {
    alerts: HashMap<String, AlertRecord>,
    silences: Vec<(Silence, SilenceMatcher)>,
    health: HashMap<String, Health>,
    /// When each group with an `interval` was last evaluated (Unix ms).
    group_evaluated: HashMap<String, i64>,
    /// Firing alerts this process has handed to delivery. One delivered by an
    /// earlier process goes to Alertmanager again (its re-post schedule was in
    /// that process's memory) once it is deliverable.
    handed_over: HashSet<String>,
}

struct Inner {
    config: AlertingConfig,
    store: Arc<dyn Store>,
    registry: Registry,
    view: FleetView,
    missed_heartbeats: u32,
    metrics: Metrics,
    dispatcher: Dispatcher,
    window: Mutex<Window>,
    rules: RwLock<Loaded>,
    book: tokio::sync::Mutex<Book>,
    wake: Notify,
    /// Set when the restart grace is over and evaluation has started.
    evaluating: std::sync::atomic::AtomicBool,
    /// Committed batches on their way to [`Engine::ingest`].
    intake: tokio::sync::mpsc::Sender<Vec<(NodeId, Arc<TelemetryBatch>)>>,
}

/// The alert engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// What the engine needs from the rest of the controller.
#[derive(Clone)]
pub struct Deps {
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    pub view: FleetView,
    pub missed_heartbeats: u32,
    pub metrics: Metrics,
}

/// The label that says which part of a node an alert is about.
const COMPONENT: &str = "component";
/// Components whose alerts are inhibited while their node is down.
const INHIBITED_WHEN_DOWN: [&str; 2] = ["gpu", "inference"];
/// Commits the intake may queue before the committer waits for it.
const INTAKE_DEPTH: usize = 1024;
/// The series the engine writes itself, once per tick, for every known node.
const AGENT_UP: &str = "flotilla_agent_up";

impl Engine {
    /// Loads the rule file (refusing to start on a bad one), the stored alerts and
    /// silences, refills the window from stored telemetry, and starts the loop.
    pub async fn start(
        config: AlertingConfig,
        deps: Deps,
        cancel: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Result<Self, AlertError> {
        let rules = match &config.rules {
            Some(path) => {
                let path = path.clone();
                blocking(move || Ok(RuleSet::load(&path)?)).await?
            }
            None => RuleSet::empty(),
        };
        let delivery = DeliveryConfig { external_url: config.external_url.clone(), ..config.delivery.clone() };
        let dispatcher = Dispatcher::spawn(delivery, cancel.clone(), tracker)
            .map_err(|e| AlertError::BadRequest(format!("alert delivery: {e}")))?;
        dispatcher
            .metrics()
            .register(&deps.metrics.registry)
            .map_err(|e| AlertError::BadRequest(format!("alert delivery metrics: {e}")))?;
        let store = deps.store.clone();
        let (alerts, silences, evaluated) =
            blocking(move || Ok((store.alerts()?, store.silences()?, store.alerts_evaluated()?))).await?;
        let mut book = Book::default();
        let loaded_at = now_unix_ms();
        let tolerance = i64::try_from(config.outage_tolerance.as_millis()).unwrap_or(i64::MAX);
        let long_outage = evaluated.is_some_and(|t| loaded_at - t > tolerance);
        let mut restarted = Vec::new();
        for mut a in alerts {
            // The controller was not looking while it was down: `keep_firing_for`
            // counts from now, not from before the restart.
            if a.state == AlertState::Firing {
                a.last_held_unix_ms = a.last_held_unix_ms.max(loaded_at);
            }
            if long_outage && a.state == AlertState::Pending {
                a.active_since_unix_ms = loaded_at;
                restarted.push(a.clone());
            }
            book.alerts.insert(a.id.clone(), a);
        }
        if !restarted.is_empty() {
            tracing::info!(
                alerts = restarted.len(),
                "the alert engine was off for longer than alerting.outage_tolerance: pending timers start over"
            );
            let store = deps.store.clone();
            let changes = AlertChanges { upsert: restarted, ..Default::default() };
            blocking(move || Ok(store.commit_alerts(&changes)?)).await?;
        }
        for s in silences {
            match SilenceMatcher::new(&s.matchers) {
                Ok(m) => book.silences.push((s, m)),
                Err(error) => tracing::warn!(silence = %s.id, %error, "stored silence no longer parses; ignored"),
            }
        }
        let (intake, mut intake_rx) = tokio::sync::mpsc::channel(INTAKE_DEPTH);
        let inner = Arc::new(Inner {
            evaluating: std::sync::atomic::AtomicBool::new(false),
            intake,
            window: Mutex::new(Window::new(rules.reach())),
            rules: RwLock::new(Loaded { rules: Arc::new(rules), loaded_unix_ms: now_unix_ms() }),
            book: tokio::sync::Mutex::new(book),
            wake: Notify::new(),
            store: deps.store,
            registry: deps.registry,
            view: deps.view,
            missed_heartbeats: deps.missed_heartbeats,
            metrics: deps.metrics,
            dispatcher,
            config,
        });
        let engine = Self { inner };
        engine.refill_window().await?;
        {
            let rules = engine.rules();
            tracing::info!(
                source = %rules.source,
                groups = rules.groups.len(),
                rules = rules.rules().count(),
                grace_s = engine.inner.config.restart_grace.as_secs(),
                "alert rules loaded; evaluation starts after the restart grace"
            );
        }
        tracker.spawn(engine.clone().run(cancel.clone()));
        {
            let engine = engine.clone();
            tracker.spawn(async move {
                loop {
                    let batches = tokio::select! {
                        b = intake_rx.recv() => b,
                        () = cancel.cancelled() => None,
                    };
                    let Some(batches) = batches else { break };
                    let engine = engine.clone();
                    let done = tokio::task::spawn_blocking(move || {
                        let refs: Vec<(&NodeId, &TelemetryBatch)> = batches.iter().map(|(n, b)| (n, &**b)).collect();
                        engine.ingest(&refs);
                    })
                    .await;
                    if done.is_err() {
                        tracing::error!("alert intake task failed");
                    }
                }
            });
        }
        Ok(engine)
    }

    /// Whether the engine is still waiting out its restart grace.
    pub fn in_restart_grace(&self) -> bool {
        !self.inner.evaluating.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn rules(&self) -> Arc<RuleSet> {
        self.inner.rules.read().unwrap_or_else(std::sync::PoisonError::into_inner).rules.clone()
    }

    fn window(&self) -> MutexGuard<'_, Window> {
        self.inner.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands committed batches to the engine's intake task (after their acks are
    /// out); waits while it is [`INTAKE_DEPTH`] commits behind.
    pub async fn submit(&self, batches: Vec<(NodeId, Arc<TelemetryBatch>)>) {
        if self.rules().groups.is_empty() {
            return;
        }
        if self.inner.intake.send(batches).await.is_err() {
            tracing::debug!("alert intake closed (shutting down)");
        }
    }

    /// Feeds committed batches into the window and wakes the evaluator.
    pub fn ingest(&self, batches: &[(&NodeId, &TelemetryBatch)]) {
        let rules = self.rules();
        if rules.groups.is_empty() {
            return;
        }
        let mut kept = 0usize;
        let now_ms = now_unix_ms();
        {
            let mut window = self.window();
            for (node, batch) in batches {
                let inventory = self.inner.view.inventory(node).unwrap_or_default();
                // An agent clock ahead of the controller's would put samples in the
                // future, where no evaluation sees them and every later sample of
                // the series is refused as older: they count as made now.
                let t = batch.created_unix_ms.min(now_ms);
                for s in batch_samples(node, &inventory, batch) {
                    if let Some(keep) = reach_for(&rules, &s.name, &s.labels)
                        && window.push_kept(&s.name, &s.labels, t, s.value, Some(keep))
                    {
                        kept += 1;
                    }
                }
            }
        }
        if kept > 0 {
            self.inner.wake.notify_one();
        }
    }

    /// Rebuilds the window from the store: the telemetry every rule can read,
    /// node by node on the blocking pool (a big fleet has millions of samples).
    async fn refill_window(&self) -> Result<(), AlertError> {
        let engine = self.clone();
        let window = blocking(move || {
            let rules = engine.rules();
            let reach = rules.reach();
            let mut window = Window::new(reach);
            if rules.groups.is_empty() {
                return Ok(window);
            }
            let now = now_unix_ms();
            let from = now - i64::try_from(reach.as_millis()).unwrap_or(i64::MAX);
            for node in engine.inner.view.nodes() {
                let inventory = engine.inner.view.inventory(&node).unwrap_or_default();
                for batch in engine.inner.store.batches_between(&node, from, i64::MAX)? {
                    let t = batch.created_unix_ms.min(now);
                    for s in batch_samples(&node, &inventory, &batch) {
                        if let Some(keep) = reach_for(&rules, &s.name, &s.labels) {
                            window.push_kept(&s.name, &s.labels, t, s.value, Some(keep));
                        }
                    }
                }
            }
            Ok(window)
        })
        .await?;
        tracing::debug!(series = window.series_count(), samples = window.sample_count(), "alert window filled");
        *self.window() = window;
        Ok(())
    }

    async fn run(self, cancel: CancellationToken) {
        // The grace ends early once every known node is connected again.
        let grace_end = Instant::now() + self.inner.config.restart_grace;
        loop {
            let missing = self.inner.view.nodes().iter().filter(|n| self.inner.registry.session(n).is_none()).count();
            if missing == 0 || Instant::now() >= grace_end {
                tracing::info!(not_reconnected = missing, "alert evaluation started");
                self.inner.evaluating.store(true, std::sync::atomic::Ordering::Relaxed);
                self.prune_history().await;
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = cancel.cancelled() => return,
            }
        }
        let mut tick = tokio::time::interval(self.inner.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Passes start at most every `min_eval_interval`, and never sooner than twice
        // the last pass took after it ended: on a big fleet evaluation uses at most
        // about a third of a core, and latency stays one pass plus the wait.
        let mut next = Instant::now();
        let mut last_prune = Instant::now();
        loop {
            tokio::select! {
                () = self.inner.wake.notified() => {}
                _ = tick.tick() => {}
                () = cancel.cancelled() => return,
            }
            if next > Instant::now() {
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    () = cancel.cancelled() => return,
                }
            }
            let started = Instant::now();
            self.evaluate(now_unix_ms()).await;
            let took = started.elapsed();
            next = started + self.inner.config.min_eval_interval.max(took * 3);
            if last_prune.elapsed() >= Duration::from_secs(60) {
                last_prune = Instant::now();
                self.prune_history().await;
            }
        }
    }

    /// Once a minute: prunes old history and notes that the engine is evaluating
    /// (the next start measures the outage from it).
    async fn prune_history(&self) {
        let store = self.inner.store.clone();
        let now = now_unix_ms();
        let cutoff = now - i64::try_from(self.inner.config.history_retention.as_millis()).unwrap_or(0);
        let done = blocking(move || {
            store.set_alerts_evaluated(now)?;
            Ok(store.prune_alert_history(cutoff)?)
        })
        .await;
        if let Err(error) = done {
            tracing::warn!(%error, "alert engine housekeeping failed");
        }
    }

    /// Writes `flotilla_agent_up` for every known node: 0 once the controller has
    /// lost its stream or its heartbeats.
    fn record_liveness(&self, now_ms: i64) {
        let now = Instant::now();
        let rules = self.rules();
        let mut window = self.window();
        for node in self.inner.view.nodes() {
            let up = !self.node_down(&node, now);
            let labels = [("node".to_owned(), node.to_string())];
            let keep = reach_for(&rules, AGENT_UP, &labels);
            if keep.is_some() {
                window.push_kept(AGENT_UP, &labels, now_ms, if up { 1.0 } else { 0.0 }, keep);
            }
        }
    }

    fn node_down(&self, node: &NodeId, now: Instant) -> bool {
        let session = self.inner.registry.session(node);
        matches!(node_state(session.as_ref(), None, now, self.inner.missed_heartbeats).0, NodeState::Down)
    }

    /// One pass at `now_ms` over every rule that is due: those of groups without
    /// an `interval`, and those whose group interval has passed.
    pub async fn evaluate(&self, now_ms: i64) {
        let started = std::time::Instant::now();
        let rules = self.rules();
        let due: HashSet<&str> = {
            let mut book = self.inner.book.lock().await;
            rules
                .groups
                .iter()
                .filter(|g| match g.interval {
                    None => true,
                    Some(every) => {
                        let every = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
                        let last = book.group_evaluated.get(&g.name).copied();
                        let due = last.is_none_or(|t| now_ms - t >= every || now_ms < t);
                        if due {
                            book.group_evaluated.insert(g.name.clone(), now_ms);
                        }
                        due
                    }
                })
                .map(|g| g.name.as_str())
                .collect()
        };
        let due: Vec<usize> =
            rules.rules().enumerate().filter(|(_, r)| due.contains(r.group.as_str())).map(|(i, _)| i).collect();
        // Evaluation is CPU work that can take a while on a big fleet: off the
        // async workers, so that streams and acks never wait for it.
        let engine = self.clone();
        let evaluated = {
            let rules = rules.clone();
            tokio::task::spawn_blocking(move || {
                engine.record_liveness(now_ms);
                let mut window = engine.window();
                window.prune(now_ms);
                let metrics = &engine.inner.metrics;
                metrics.alert_window_series.set(i64::try_from(window.series_count()).unwrap_or(i64::MAX));
                metrics.alert_window_samples.set(i64::try_from(window.sample_count()).unwrap_or(i64::MAX));
                let all: Vec<&Rule> = rules.rules().collect();
                due.into_iter()
                    .filter_map(|i| all.get(i).map(|r| (i, r.expr.eval(&window, now_ms).map_err(|e| e.to_string()))))
                    .collect::<Vec<_>>()
            })
            .await
        };
        let Ok(evaluated) = evaluated else {
            tracing::error!("rule evaluation task failed");
            return;
        };
        let all: Vec<&Rule> = rules.rules().collect();
        let results: Vec<(&Rule, Result<Vec<super::promql::Sample>, String>)> =
            evaluated.into_iter().filter_map(|(i, r)| all.get(i).map(|rule| (*rule, r))).collect();
        let mut book = self.inner.book.lock().await;
        let mut changes = AlertChanges::default();
        for (rule, result) in results {
            let health = book.health.entry(rule.key()).or_default();
            health.last_evaluation_unix_ms = now_ms;
            match result {
                Ok(samples) => {
                    health.last_error = None;
                    let now = Instant::now();
                    let held = |a: &AlertRecord| self.inhibited(a, now);
                    if let Err(e) = apply(&mut book, rule, samples, now_ms, &held, &mut changes) {
                        self.inner.metrics.rule_evaluation_failures.inc();
                        book.health.entry(rule.key()).or_default().last_error = Some(e);
                    }
                }
                Err(e) => {
                    // Keep the rule's alerts as they are: no data is not "resolved".
                    self.inner.metrics.rule_evaluation_failures.inc();
                    tracing::debug!(rule = %rule.key(), error = %e, "rule evaluation failed");
                    health.last_error = Some(e);
                }
            }
        }
        // Alerts of rules that are gone (reloaded away) resolve.
        let keys: HashSet<String> = rules.rules().map(Rule::key).collect();
        let orphans: Vec<String> =
            book.alerts.values().filter(|a| !keys.contains(&a.rule)).map(|a| a.id.clone()).collect();
        for id in orphans {
            if book.alerts.get_mut(&id).is_some_and(|a| transition_out(a, now_ms, &mut changes)) {
                book.alerts.remove(&id);
            }
        }
        let (outgoing, resumed) = self.deliverable(&mut book, now_ms, &mut changes);
        let (firing, pending) = book.alerts.values().fold((0, 0), |(f, p), a| match a.state {
            AlertState::Firing => (f + 1, p),
            AlertState::Pending => (f, p + 1),
            AlertState::Resolved => (f, p),
        });
        self.inner.metrics.alerts_firing.set(firing);
        self.inner.metrics.alerts_pending.set(pending);
        if !changes.is_empty() {
            let store = self.inner.store.clone();
            if let Err(error) = blocking(move || Ok(store.commit_alerts(&changes)?)).await {
                // Nothing is delivered, and the book goes back to what is stored, so
                // the next pass makes (and delivers) the same changes again.
                tracing::error!(%error, "persisting alert changes failed; nothing delivered this pass");
                let store = self.inner.store.clone();
                match blocking(move || Ok(store.alerts()?)).await {
                    Ok(stored) => book.alerts = stored.into_iter().map(|a| (a.id.clone(), a)).collect(),
                    Err(error) => tracing::error!(%error, "re-reading alerts after a failed write failed too"),
                }
                return;
            }
        }
        drop(book);
        if !outgoing.is_empty() {
            self.inner.dispatcher.notify(outgoing);
        }
        if !resumed.is_empty() {
            tracing::info!(alerts = resumed.len(), "re-posting alerts delivered before the restart to Alertmanager");
            self.inner.dispatcher.resume(resumed);
        }
        self.inner.metrics.alert_evaluations.inc();
        self.inner.metrics.alert_evaluation_seconds.observe(started.elapsed().as_secs_f64());
    }

    /// Decides what to deliver now (and what to re-post to Alertmanager after a
    /// restart), marks it notified and drops resolved alerts past their retention.
    fn deliverable(
        &self,
        book: &mut Book,
        now_ms: i64,
        changes: &mut AlertChanges,
    ) -> (Vec<OutgoingAlert>, Vec<OutgoingAlert>) {
        let renotify = i64::try_from(self.inner.config.renotify_interval.as_millis()).unwrap_or(i64::MAX);
        let retention = i64::try_from(self.inner.config.resolved_retention.as_millis()).unwrap_or(i64::MAX);
        let now = Instant::now();
        let mut out = Vec::new();
        let mut resumed = Vec::new();
        let mut expired = Vec::new();
        let ids: Vec<String> = book.alerts.keys().cloned().collect();
        for id in ids {
            let silenced = silenced_by(&book.silences, book.alerts.get(&id), now_ms);
            let Some(a) = book.alerts.get_mut(&id) else { continue };
            let inhibited = self.inhibited(a, now);
            let send = match a.state {
                AlertState::Firing if silenced.is_empty() && !inhibited => match a.last_notified_unix_ms {
                    None => true,
                    Some(t) => a.label("severity") == Some("critical") && a.ack.is_none() && now_ms - t >= renotify,
                },
                // A resolved alert whose firing was delivered is delivered resolved, once.
                AlertState::Resolved => a.last_notified_unix_ms.is_some() && !a.resolved_notified,
                _ => false,
            };
            let deliverable = a.state == AlertState::Firing && silenced.is_empty() && !inhibited;
            if send {
                a.last_notified_unix_ms = Some(now_ms);
                a.resolved_notified = a.state == AlertState::Resolved;
                out.push(self.outgoing(a));
                changes.upsert.retain(|r| r.id != a.id);
                changes.upsert.push(a.clone());
                book.handed_over.insert(id.clone());
            } else if deliverable && a.last_notified_unix_ms.is_some() && !book.handed_over.contains(&id) {
                resumed.push(self.outgoing(a));
                book.handed_over.insert(id.clone());
            }
            if a.state == AlertState::Resolved && a.resolved_unix_ms.is_some_and(|r| now_ms - r > retention) {
                expired.push(id);
            }
        }
        for id in expired {
            book.alerts.remove(&id);
            book.handed_over.remove(&id);
            changes.upsert.retain(|r| r.id != id);
            changes.remove.push(id);
        }
        (out, resumed)
    }

    fn inhibited(&self, a: &AlertRecord, now: Instant) -> bool {
        let Some(component) = a.label(COMPONENT) else { return false };
        if !INHIBITED_WHEN_DOWN.contains(&component) {
            return false;
        }
        a.label("node").and_then(|n| NodeId::new(n).ok()).is_some_and(|n| self.node_down(&n, now))
    }

    fn outgoing(&self, a: &AlertRecord) -> OutgoingAlert {
        OutgoingAlert {
            fingerprint: a.id.clone(),
            labels: a.labels.iter().cloned().collect(),
            annotations: a.annotations.iter().cloned().collect(),
            starts_at_unix_ms: a.firing_since_unix_ms.unwrap_or(a.active_since_unix_ms),
            ends_at_unix_ms: if a.state == AlertState::Resolved { a.resolved_unix_ms } else { None },
            generator_url: format!("{}/alerts/{}", self.inner.config.external_url.trim_end_matches('/'), a.id),
        }
    }

    /// Alerts, newest state change first, optionally only those in `state`.
    pub async fn alerts(&self, state: Option<AlertState>) -> Vec<AlertView> {
        let book = self.inner.book.lock().await;
        let now_ms = now_unix_ms();
        let now = Instant::now();
        let mut out: Vec<AlertView> = book
            .alerts
            .values()
            .filter(|a| state.is_none_or(|s| a.state == s))
            .map(|a| AlertView {
                silenced_by: silenced_by(&book.silences, Some(a), now_ms),
                inhibited: self.inhibited(a, now),
                record: a.clone(),
            })
            .collect();
        out.sort_by(|a, b| {
            b.record.since_unix_ms().cmp(&a.record.since_unix_ms()).then_with(|| a.record.id.cmp(&b.record.id))
        });
        out
    }

    /// Acknowledges an alert (flushed before this returns).
    pub async fn ack(&self, id: &str, by: &str, comment: &str) -> Result<AlertView, AlertError> {
        let mut book = self.inner.book.lock().await;
        let mut record = book.alerts.get(id).cloned().ok_or_else(|| AlertError::NoSuchAlert(id.to_owned()))?;
        let now_ms = now_unix_ms();
        record.ack = Some(Ack { by: by.to_owned(), at_unix_ms: now_ms, comment: comment.to_owned() });
        let changes = AlertChanges {
            upsert: vec![record.clone()],
            remove: Vec::new(),
            events: vec![AlertEvent {
                at_unix_ms: now_ms,
                id: record.id.clone(),
                name: record.name.clone(),
                labels: record.labels.clone(),
                from: Some(record.state),
                to: Some(record.state),
                value: record.value,
                by: format!("ack by {by}"),
            }],
        };
        let store = self.inner.store.clone();
        blocking(move || Ok(store.commit_alerts(&changes)?)).await?;
        book.alerts.insert(record.id.clone(), record.clone());
        let silenced = silenced_by(&book.silences, Some(&record), now_ms);
        Ok(AlertView { inhibited: self.inhibited(&record, Instant::now()), silenced_by: silenced, record })
    }

    /// Creates a silence (flushed before this returns); returns it and the ids of
    /// the alerts it silences now.
    pub async fn silence(
        &self,
        matchers: Vec<String>,
        duration: Duration,
        by: &str,
        comment: &str,
    ) -> Result<(Silence, Vec<String>), AlertError> {
        if duration.is_zero() || duration > Duration::from_secs(30 * 86_400) {
            return Err(AlertError::BadRequest("a silence lasts more than 0s and at most 30 days".to_owned()));
        }
        let matcher = SilenceMatcher::new(&matchers).map_err(|e| AlertError::BadRequest(e.to_string()))?;
        let now_ms = now_unix_ms();
        let silence = Silence {
            id: uuid::Uuid::now_v7().to_string(),
            matchers,
            starts_unix_ms: now_ms,
            ends_unix_ms: now_ms + i64::try_from(duration.as_millis()).unwrap_or(i64::MAX),
            created_by: by.to_owned(),
            comment: comment.to_owned(),
        };
        let mut book = self.inner.book.lock().await;
        let store = self.inner.store.clone();
        let saved = silence.clone();
        blocking(move || Ok(store.commit_silence(&saved)?)).await?;
        let mut matched: Vec<String> =
            book.alerts.values().filter(|a| matcher.matches(&a.labels)).map(|a| a.id.clone()).collect();
        matched.sort();
        book.silences.push((silence.clone(), matcher));
        Ok((silence, matched))
    }

    /// Ends a silence now (flushed before this returns).
    pub async fn expire_silence(&self, id: &str) -> Result<Silence, AlertError> {
        let mut book = self.inner.book.lock().await;
        let now_ms = now_unix_ms();
        let mut ended = book
            .silences
            .iter()
            .find(|(s, _)| s.id == id)
            .map(|(s, _)| s.clone())
            .ok_or_else(|| AlertError::NoSuchSilence(id.to_owned()))?;
        ended.ends_unix_ms = ended.ends_unix_ms.min(now_ms);
        let saved = ended.clone();
        let store = self.inner.store.clone();
        blocking(move || Ok(store.commit_silence(&saved)?)).await?;
        if let Some((s, _)) = book.silences.iter_mut().find(|(s, _)| s.id == id) {
            *s = ended.clone();
        }
        Ok(ended)
    }

    /// The newest `limit` alert events (of one alert when `id` is given), oldest first.
    pub async fn history(&self, limit: usize, id: Option<String>) -> Result<Vec<AlertEvent>, AlertError> {
        let store = self.inner.store.clone();
        blocking(move || {
            let events = match id {
                // One alert's events are rare among all: read a generous window and filter.
                Some(id) => {
                    let all = store.alert_history(limit.saturating_mul(100).max(10_000))?;
                    let mut mine: Vec<AlertEvent> = all.into_iter().filter(|e| e.id == id).collect();
                    let skip = mine.len().saturating_sub(limit);
                    mine.drain(..skip);
                    mine
                }
                None => store.alert_history(limit)?,
            };
            Ok(events)
        })
        .await
    }

    /// Silences, newest first; expired ones only when asked.
    pub async fn silences(&self, include_expired: bool) -> Vec<Silence> {
        let book = self.inner.book.lock().await;
        let now_ms = now_unix_ms();
        let mut out: Vec<Silence> = book
            .silences
            .iter()
            .map(|(s, _)| s.clone())
            .filter(|s| include_expired || now_ms < s.ends_unix_ms)
            .collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.starts_unix_ms));
        out
    }

    /// The rules in force with their health.
    pub async fn rule_views(&self) -> (String, i64, Vec<RuleView>) {
        let (rules, loaded) = {
            let l = self.inner.rules.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            (l.rules.clone(), l.loaded_unix_ms)
        };
        let book = self.inner.book.lock().await;
        let views = rules
            .rules()
            .map(|r| {
                let key = r.key();
                let health = book.health.get(&key).cloned().unwrap_or_default();
                let count = |s| {
                    u32::try_from(book.alerts.values().filter(|a| a.rule == key && a.state == s).count()).unwrap_or(0)
                };
                RuleView {
                    group: r.group.clone(),
                    name: r.name.clone(),
                    expr: r.expr.text().to_owned(),
                    for_: r.for_,
                    keep_firing_for: r.keep_firing_for,
                    labels: r
                        .labels
                        .iter()
                        .map(|(k, t)| (k.clone(), t.render(Data { labels: &[], value: f64::NAN })))
                        .collect(),
                    last_error: health.last_error,
                    last_evaluation_unix_ms: health.last_evaluation_unix_ms,
                    pending: count(AlertState::Pending),
                    firing: count(AlertState::Firing),
                }
            })
            .collect();
        (rules.source.clone(), loaded, views)
    }

    /// Re-reads the rule file. A bad file changes nothing and the error says why.
    pub async fn reload(&self) -> Result<Arc<RuleSet>, AlertError> {
        let path = self.inner.config.rules.clone().ok_or(AlertError::NoRuleFile)?;
        let rules = Arc::new(blocking(move || Ok(RuleSet::load(&path)?)).await?);
        {
            let mut loaded = self.inner.rules.write().unwrap_or_else(std::sync::PoisonError::into_inner);
            *loaded = Loaded { rules: rules.clone(), loaded_unix_ms: now_unix_ms() };
        }
        // New rules may read series the old ones did not keep.
        self.refill_window().await?;
        tracing::info!(source = %rules.source, rules = rules.rules().count(), "alert rules reloaded");
        self.inner.wake.notify_one();
        Ok(rules)
    }
}

/// How long the rules read series `name{labels}`; `None`: no rule reads it.
fn reach_for(rules: &RuleSet, name: &str, labels: &[(String, String)]) -> Option<Duration> {
    rules.rules().filter_map(|r| r.expr.reach_for(name, labels)).max()
}

/// Checks rule file content without loading it.
pub fn check(file_name: &str, content: &str) -> Result<RuleSet, RulesError> {
    RuleSet::parse(file_name, content)
}

fn silenced_by(silences: &[(Silence, SilenceMatcher)], a: Option<&AlertRecord>, now_ms: i64) -> Vec<String> {
    let Some(a) = a else { return Vec::new() };
    silences.iter().filter(|(s, m)| s.active_at(now_ms) && m.matches(&a.labels)).map(|(s, _)| s.id.clone()).collect()
}

fn event(a: &AlertRecord, from: Option<AlertState>, to: Option<AlertState>, at: i64) -> AlertEvent {
    AlertEvent {
        at_unix_ms: at,
        id: a.id.clone(),
        name: a.name.clone(),
        labels: a.labels.clone(),
        from,
        to,
        value: a.value,
        by: "engine".to_owned(),
    }
}

/// An alert whose expression no longer holds: a pending one goes inactive, a
/// firing one resolves (after `keep_firing_for`, which the caller checks).
fn transition_out(a: &mut AlertRecord, now_ms: i64, changes: &mut AlertChanges) -> bool {
    match a.state {
        AlertState::Pending => {
            changes.events.push(event(a, Some(AlertState::Pending), None, now_ms));
            changes.remove.push(a.id.clone());
            true
        }
        AlertState::Firing => {
            a.state = AlertState::Resolved;
            a.resolved_unix_ms = Some(now_ms);
            changes.events.push(event(a, Some(AlertState::Firing), Some(AlertState::Resolved), now_ms));
            changes.upsert.push(a.clone());
            false
        }
        AlertState::Resolved => false,
    }
}

/// Applies one rule's result at `now_ms` to the book.
/// `held(alert)`: an alert that must not resolve now (its node is down, so its
/// series went stale rather than healthy).
fn apply(
    book: &mut Book,
    rule: &Rule,
    samples: Vec<super::promql::Sample>,
    now_ms: i64,
    held: &dyn Fn(&AlertRecord) -> bool,
    changes: &mut AlertChanges,
) -> Result<(), String> {
    let key = rule.key();
    let mut seen: HashSet<String> = HashSet::new();
    let mut duplicate = None;
    for sample in samples {
        let expr_labels: Vec<(String, String)> = sample.labels.into_iter().filter(|(k, _)| k != "__name__").collect();
        let mut labels: BTreeMap<String, String> = expr_labels.iter().cloned().collect();
        for (k, t) in &rule.labels {
            labels.insert(k.clone(), t.render(Data { labels: &expr_labels, value: sample.value }));
        }
        labels.insert("alertname".to_owned(), rule.name.clone());
        let labels: Vec<(String, String)> = labels.into_iter().collect();
        let annotations: Vec<(String, String)> = rule
            .annotations
            .iter()
            .map(|(k, t)| (k.clone(), t.render(Data { labels: &expr_labels, value: sample.value })))
            .collect();
        let id = fingerprint(&key, &labels);
        if !seen.insert(id.clone()) {
            duplicate = Some(labels);
            continue;
        }
        let live = book.alerts.get(&id).is_some_and(|a| a.state != AlertState::Resolved);
        if !live {
            let mut a = AlertRecord {
                id: id.clone(),
                rule: key.clone(),
                name: rule.name.clone(),
                state: AlertState::Pending,
                labels,
                annotations,
                value: sample.value,
                active_since_unix_ms: now_ms,
                firing_since_unix_ms: None,
                resolved_unix_ms: None,
                last_held_unix_ms: now_ms,
                ack: None,
                last_notified_unix_ms: None,
                resolved_notified: false,
            };
            changes.events.push(event(&a, None, Some(AlertState::Pending), now_ms));
            if rule.for_.is_zero() {
                a.state = AlertState::Firing;
                a.firing_since_unix_ms = Some(now_ms);
                changes.events.push(event(&a, Some(AlertState::Pending), Some(AlertState::Firing), now_ms));
            }
            changes.upsert.push(a.clone());
            book.alerts.insert(id, a);
            continue;
        }
        let Some(a) = book.alerts.get_mut(&id) else { continue };
        a.value = sample.value;
        a.annotations = annotations;
        a.last_held_unix_ms = now_ms;
        let for_ms = i64::try_from(rule.for_.as_millis()).unwrap_or(i64::MAX);
        if a.state == AlertState::Pending && now_ms - a.active_since_unix_ms >= for_ms {
            a.state = AlertState::Firing;
            a.firing_since_unix_ms = Some(now_ms);
            changes.events.push(event(a, Some(AlertState::Pending), Some(AlertState::Firing), now_ms));
            changes.upsert.push(a.clone());
        }
    }
    let keep_ms = i64::try_from(rule.keep_firing_for.as_millis()).unwrap_or(i64::MAX);
    let gone: Vec<String> = book
        .alerts
        .values()
        .filter(|a| a.rule == key && a.state != AlertState::Resolved && !seen.contains(&a.id))
        .filter(|a| a.state == AlertState::Pending || now_ms - a.last_held_unix_ms >= keep_ms)
        .filter(|a| !held(a))
        .map(|a| a.id.clone())
        .collect();
    for id in gone {
        let inactive = book.alerts.get_mut(&id).is_some_and(|a| transition_out(a, now_ms, changes));
        if inactive {
            book.alerts.remove(&id);
        }
    }
    match duplicate {
        Some(labels) => Err(format!("the result has more than one series with the alert labels {labels:?}")),
        None => Ok(()),
    }
}

async fn blocking<T, F>(f: F) -> Result<T, AlertError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, AlertError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(|e| AlertError::Task(e.to_string()))?
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::path::Path;

    use super::*;
    use crate::store::SledStore;

    const T0: i64 = 1_800_000_000_000;

    async fn engine(dir: &Path, rules: &str) -> (Engine, Arc<dyn Store>) {
        let path = dir.join("rules.yml");
        std::fs::write(&path, rules).unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&dir.join("store")).unwrap());
        (start(dir, store.clone()).await, store)
    }

    async fn start(dir: &Path, store: Arc<dyn Store>) -> Engine {
        let config = AlertingConfig {
            rules: Some(dir.join("rules.yml")),
            // The loop never runs on its own here: tests call `evaluate`.
            restart_grace: Duration::from_secs(3600),
            ..Default::default()
        };
        // A known node that never connects keeps the restart grace (an hour) going,
        // so the engine's own loop never evaluates: tests call `evaluate`.
        let view = FleetView::default();
        view.set_inventory(&NodeId::new("never-connects").unwrap(), flotilla_common::model::Inventory::default());
        let deps =
            Deps { store, registry: Registry::default(), view, missed_heartbeats: 3, metrics: Metrics::new().unwrap() };
        Engine::start(config, deps, CancellationToken::new(), &tokio_util::task::TaskTracker::new()).await.unwrap()
    }

    fn push(e: &Engine, node: &str, t: i64, v: f64) {
        e.window().push("temp", &[("node".to_owned(), node.to_owned())], t, v);
    }

    const RULES: &str = r#"
groups:
  - name: g
    rules:
      - alert: Hot
        expr: temp > 80
        for: 10s
        keep_firing_for: 5s
        labels: { severity: critical }
        annotations: { summary: "{{ $labels.node }} at {{ $value }}" }
"#;

    fn states(e: &[AlertView]) -> Vec<(String, AlertState)> {
        e.iter().map(|a| (a.record.label("node").unwrap_or_default().to_owned(), a.record.state)).collect()
    }

    #[tokio::test]
    async fn an_alert_goes_pending_firing_resolved_with_for_and_keep_firing_for() {
        let dir = tempfile::tempdir().unwrap();
        let (e, store) = engine(dir.path(), RULES).await;
        push(&e, "a", T0, 90.0);
        push(&e, "b", T0, 50.0);
        e.evaluate(T0).await;
        assert_eq!(states(&e.alerts(None).await), [("a".to_owned(), AlertState::Pending)]);
        push(&e, "a", T0 + 5_000, 91.0);
        e.evaluate(T0 + 5_000).await;
        assert_eq!(e.alerts(Some(AlertState::Pending)).await.len(), 1, "still within for");
        push(&e, "a", T0 + 10_000, 92.0);
        e.evaluate(T0 + 10_000).await;
        let firing = e.alerts(Some(AlertState::Firing)).await;
        assert_eq!(firing.len(), 1);
        let a = &firing[0].record;
        assert_eq!((a.active_since_unix_ms, a.firing_since_unix_ms), (T0, Some(T0 + 10_000)));
        assert_eq!(a.annotations, [("summary".to_owned(), "a at 92".to_owned())]);
        assert_eq!(a.label("alertname"), Some("Hot"));
        assert_eq!(a.label("severity"), Some("critical"));
        assert!(a.last_notified_unix_ms.is_some(), "a firing alert is delivered");
        // The condition stops: keep_firing_for holds it for 5 s.
        push(&e, "a", T0 + 11_000, 20.0);
        e.evaluate(T0 + 12_000).await;
        assert_eq!(e.alerts(Some(AlertState::Firing)).await.len(), 1, "kept firing");
        e.evaluate(T0 + 15_000).await;
        let resolved = e.alerts(Some(AlertState::Resolved)).await;
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].record.resolved_unix_ms, Some(T0 + 15_000));
        // Durable, with history.
        let stored = store.alerts().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].state, AlertState::Resolved);
        let history: Vec<(Option<AlertState>, Option<AlertState>)> =
            store.alert_history(100).unwrap().into_iter().map(|h| (h.from, h.to)).collect();
        assert_eq!(
            history,
            [
                (None, Some(AlertState::Pending)),
                (Some(AlertState::Pending), Some(AlertState::Firing)),
                (Some(AlertState::Firing), Some(AlertState::Resolved)),
            ]
        );
    }

    #[tokio::test]
    async fn a_pending_alert_that_stops_holding_goes_inactive() {
        let dir = tempfile::tempdir().unwrap();
        let (e, store) = engine(dir.path(), RULES).await;
        push(&e, "a", T0, 90.0);
        e.evaluate(T0).await;
        push(&e, "a", T0 + 1_000, 10.0);
        e.evaluate(T0 + 1_000).await;
        assert!(e.alerts(None).await.is_empty());
        assert!(store.alerts().unwrap().is_empty());
        assert_eq!(store.alert_history(10).unwrap().last().unwrap().to, None);
    }

    #[tokio::test]
    async fn pending_timers_firing_state_acks_and_silences_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (e, store) = engine(dir.path(), RULES).await;
        push(&e, "a", T0, 90.0);
        e.evaluate(T0).await;
        push(&e, "a", T0 + 5_000, 90.0);
        push(&e, "b", T0 + 5_000, 90.0);
        e.evaluate(T0 + 5_000).await;
        push(&e, "a", T0 + 10_000, 90.0);
        push(&e, "b", T0 + 10_000, 90.0);
        e.evaluate(T0 + 10_000).await;
        let firing = e.alerts(Some(AlertState::Firing)).await;
        let a_id = firing[0].record.id.clone();
        e.ack(&a_id, "urn:flotilla:operator:operator:alice", "on it").await.unwrap();
        let (silence, matched) =
            e.silence(vec![r#"node="a""#.to_owned()], Duration::from_secs(3600), "alice", "maint").await.unwrap();
        assert_eq!(matched, std::slice::from_ref(&a_id));
        drop(e);

        let e = start(dir.path(), store).await;
        let alerts = e.alerts(None).await;
        let a = alerts.iter().find(|v| v.record.id == a_id).unwrap();
        assert_eq!(a.record.state, AlertState::Firing);
        assert_eq!(a.record.ack.as_ref().unwrap().comment, "on it");
        assert_eq!(a.silenced_by, std::slice::from_ref(&silence.id));
        let b = alerts.iter().find(|v| v.record.label("node") == Some("b")).unwrap();
        assert_eq!((b.record.state, b.record.active_since_unix_ms), (AlertState::Pending, T0 + 5_000));
        // The pending timer runs from its original start: it fires 10 s after it.
        push(&e, "b", T0 + 15_000, 90.0);
        e.evaluate(T0 + 15_000).await;
        let b = e.alerts(Some(AlertState::Firing)).await;
        assert!(b.iter().any(|v| v.record.label("node") == Some("b")), "{b:?}");
        e.expire_silence(&silence.id).await.unwrap();
        assert!(e.silences(false).await.is_empty());
        assert_eq!(e.silences(true).await.len(), 1);
    }

    #[tokio::test]
    async fn bad_requests_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), RULES).await;
        assert!(matches!(e.ack("nope", "x", "").await, Err(AlertError::NoSuchAlert(_))));
        assert!(matches!(e.expire_silence("nope").await, Err(AlertError::NoSuchSilence(_))));
        let too_long = e.silence(vec![r#"node="a""#.into()], Duration::from_secs(31 * 86_400), "x", "").await;
        assert!(matches!(too_long, Err(AlertError::BadRequest(_))));
        let broad = e.silence(vec![r#"node=~".*""#.into()], Duration::from_secs(60), "x", "").await;
        assert!(matches!(broad, Err(AlertError::BadRequest(_))));
        std::fs::write(dir.path().join("rules.yml"), "groups: [").unwrap();
        assert!(matches!(e.reload().await, Err(AlertError::Rules(_))));
        assert_eq!(e.rule_views().await.2.len(), 1, "the running rules stay");
    }

    #[tokio::test]
    async fn a_result_with_duplicate_alert_labels_is_a_rule_error() {
        let dir = tempfile::tempdir().unwrap();
        // Two series that differ only in their name: the alert drops the name.
        let rules =
            RULES.replace("expr: temp > 80", r#"expr: '{__name__=~"temp|temp2"} > 80'"#).replace("for: 10s", "for: 0s");
        let (e, _) = engine(dir.path(), &rules).await;
        push(&e, "a", T0, 90.0);
        e.window().push("temp2", &[("node".to_owned(), "a".to_owned())], T0, 95.0);
        e.evaluate(T0).await;
        let (_, _, views) = e.rule_views().await;
        assert!(views[0].last_error.as_deref().unwrap_or_default().contains("more than one series"), "{views:?}");
        assert_eq!(e.alerts(Some(AlertState::Firing)).await.len(), 1, "the first series still alerts");
    }

    #[tokio::test]
    async fn unacknowledged_critical_alerts_renotify_and_acked_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (e, _) = engine(dir.path(), &RULES.replace("for: 10s", "for: 0s")).await;
        let hour = 3_600_000;
        let notified = |e: &Engine| {
            let e = e.clone();
            async move { e.alerts(Some(AlertState::Firing)).await[0].record.last_notified_unix_ms }
        };
        push(&e, "a", T0, 90.0);
        e.evaluate(T0).await;
        assert_eq!(notified(&e).await, Some(T0));
        push(&e, "a", T0 + hour / 2, 90.0);
        e.evaluate(T0 + hour / 2).await;
        assert_eq!(notified(&e).await, Some(T0), "not before renotify_interval");
        push(&e, "a", T0 + hour, 90.0);
        e.evaluate(T0 + hour).await;
        assert_eq!(notified(&e).await, Some(T0 + hour), "re-notified after an hour unacknowledged");
        let id = e.alerts(Some(AlertState::Firing)).await[0].record.id.clone();
        e.ack(&id, "alice", "").await.unwrap();
        push(&e, "a", T0 + 2 * hour, 90.0);
        e.evaluate(T0 + 2 * hour).await;
        assert_eq!(notified(&e).await, Some(T0 + hour), "acknowledged: quiet");
    }

    #[tokio::test]
    async fn a_reload_that_drops_a_rule_ends_its_alerts() {
        let dir = tempfile::tempdir().unwrap();
        let (e, store) = engine(dir.path(), RULES).await;
        push(&e, "a", T0, 90.0);
        e.evaluate(T0).await;
        assert_eq!(e.alerts(Some(AlertState::Pending)).await.len(), 1);
        std::fs::write(dir.path().join("rules.yml"), RULES.replace("alert: Hot", "alert: Warm")).unwrap();
        e.reload().await.unwrap();
        push(&e, "a", T0 + 1_000, 10.0);
        e.evaluate(T0 + 1_000).await;
        e.evaluate(T0 + 2_000).await;
        assert!(e.alerts(None).await.is_empty(), "the old rule's pending alert is gone");
        assert!(store.alerts().unwrap().is_empty());
        let events = store.alert_history(100).unwrap();
        assert_eq!(events.iter().filter(|h| h.to.is_none()).count(), 1, "it went inactive once: {events:?}");
    }

    #[tokio::test]
    async fn a_down_nodes_gpu_alerts_are_inhibited_and_do_not_resolve_on_stale_data() {
        let dir = tempfile::tempdir().unwrap();
        let rules = RULES
            .replace("for: 10s", "for: 0s")
            .replace("labels: { severity: critical }", "labels: { severity: critical, component: gpu }");
        let (e, _) = engine(dir.path(), &rules).await;
        // "never-connects" is known and has no session: it is down.
        push(&e, "never-connects", T0, 90.0);
        e.evaluate(T0).await;
        let firing = e.alerts(Some(AlertState::Firing)).await;
        assert_eq!(firing.len(), 1);
        assert!(firing[0].inhibited);
        assert_eq!(firing[0].record.last_notified_unix_ms, None, "inhibited: not delivered");
        // Its series goes stale (no data for 5 minutes): the alert holds.
        e.evaluate(T0 + 600_000).await;
        assert_eq!(e.alerts(Some(AlertState::Firing)).await.len(), 1, "held while the node is down");
    }

    #[tokio::test]
    async fn samples_from_an_agent_clock_ahead_count_as_made_now() {
        let dir = tempfile::tempdir().unwrap();
        let rules = RULES
            .replace("expr: temp > 80", "expr: flotilla_gpu_temperature_celsius > 80")
            .replace("for: 10s", "for: 0s");
        let (e, _) = engine(dir.path(), &rules).await;
        let node = NodeId::new("ahead").unwrap();
        let now = now_unix_ms();
        let hot = |seq, t| TelemetryBatch {
            seq,
            created_unix_ms: t,
            gpus: vec![flotilla_common::model::GpuSample {
                index: 0,
                temperature_celsius: Some(90.0),
                ..Default::default()
            }],
            ..Default::default()
        };
        // An hour ahead: without the clamp no evaluation at "now" would see it.
        e.ingest(&[(&node, &hot(1, now + 3_600_000))]);
        e.evaluate(now_unix_ms()).await;
        assert_eq!(e.alerts(Some(AlertState::Firing)).await.len(), 1);
    }

    #[tokio::test]
    async fn after_a_long_outage_pending_timers_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let (e, store) = engine(dir.path(), RULES).await;
        let now = now_unix_ms();
        push(&e, "a", now - 10_000, 90.0);
        e.evaluate(now - 10_000).await;
        let before = e.alerts(Some(AlertState::Pending)).await[0].record.active_since_unix_ms;
        assert_eq!(before, now - 10_000);
        drop(e);
        // The engine last evaluated two hours ago (tolerance: one hour).
        store.set_alerts_evaluated(now - 2 * 3_600_000).unwrap();
        let e = start(dir.path(), store.clone()).await;
        let after = e.alerts(Some(AlertState::Pending)).await[0].record.active_since_unix_ms;
        assert!(after >= now, "timer restarted: {before} -> {after}");
        assert_eq!(store.alerts().unwrap()[0].active_since_unix_ms, after, "and stored");
    }

    /// A realistic batch: 8 GPUs, a host with two filesystems, one vLLM endpoint.
    fn batch(seq: u64, t: i64, node: usize) -> TelemetryBatch {
        use flotilla_common::model::{FilesystemSample, GpuSample, HostSample, Sample};
        let wave = ((t / 1000) as f64 / 30.0 + node as f64).sin();
        let sample = |name: &str, labels: &[(&str, &str)], value: f64| Sample {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .chain([("endpoint".to_owned(), "vllm".to_owned())])
                .collect(),
            value,
        };
        let n = (t / 1000 - T0 / 1000) as f64;
        let mut samples = vec![
            sample("flotilla_inference_up", &[], 1.0),
            sample("flotilla_inference_requests_waiting", &[("engine", "vllm"), ("model", "m")], 2.0 + wave),
            sample("flotilla_inference_requests_running", &[("engine", "vllm"), ("model", "m")], 8.0),
            sample("flotilla_inference_generation_tokens_total", &[("engine", "vllm"), ("model", "m")], 900.0 * n),
            sample("flotilla_inference_requests_succeeded_total", &[("engine", "vllm"), ("model", "m")], 3.0 * n),
        ];
        for family in
            ["flotilla_inference_e2e_request_latency_seconds", "flotilla_inference_time_to_first_token_seconds"]
        {
            for (le, share) in [("0.1", 0.2), ("0.5", 0.6), ("1", 0.8), ("5", 0.97), ("10", 1.0), ("+Inf", 1.0)] {
                samples.push(sample(
                    &format!("{family}_bucket"),
                    &[("engine", "vllm"), ("model", "m"), ("le", le)],
                    share * 3.0 * n,
                ));
            }
            samples.push(sample(&format!("{family}_sum"), &[("engine", "vllm"), ("model", "m")], 2.0 * n));
            samples.push(sample(&format!("{family}_count"), &[("engine", "vllm"), ("model", "m")], 3.0 * n));
        }
        TelemetryBatch {
            seq,
            created_unix_ms: t,
            gpus: (0..8)
                .map(|i| GpuSample {
                    index: i,
                    uuid: format!("GPU-{node}-{i}"),
                    temperature_celsius: Some(60.0 + 10.0 * wave),
                    utilization_ratio: Some(0.7 + 0.2 * wave),
                    memory_used_bytes: Some(60 << 30),
                    memory_total_bytes: Some(80 << 30),
                    ecc_uncorrected_volatile_total: Some(0),
                    ..Default::default()
                })
                .collect(),
            host: Some(HostSample {
                cpu_utilization_ratio: 0.3,
                memory_total_bytes: 512 << 30,
                memory_available_bytes: 300 << 30,
                filesystems: ["/", "/models"]
                    .iter()
                    .map(|m| FilesystemSample {
                        mount_point: (*m).to_owned(),
                        device: "/dev/nvme0n1".to_owned(),
                        fs_type: "ext4".to_owned(),
                        size_bytes: 2 << 40,
                        avail_bytes: 1 << 40,
                    })
                    .collect(),
                ..Default::default()
            }),
            samples,
            ..Default::default()
        }
    }

    /// Rule evaluation cost with the default rules, for BENCHMARKS.md:
    /// `FLOTILLA_BENCH_NODES=1000 cargo test --release -p flotilla-controller --lib \
    ///  alert::engine::tests::evaluation_cost -- --ignored --nocapture`
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "a benchmark: run by hand, in release"]
    async fn evaluation_cost_with_the_default_rules() {
        let nodes: usize = std::env::var("FLOTILLA_BENCH_NODES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
        let seconds: i64 = std::env::var("FLOTILLA_BENCH_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(600);
        let dir = tempfile::tempdir().unwrap();
        let rules =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/rules/default.yml")).unwrap();
        let (e, _) = engine(dir.path(), &rules).await;
        let ids: Vec<NodeId> = (0..nodes).map(|i| NodeId::new(format!("gpu-{i:04}")).unwrap()).collect();
        for id in &ids {
            e.inner.view.set_inventory(id, flotilla_common::model::Inventory::default());
        }
        let started = std::time::Instant::now();
        let mut batches = 0u64;
        for s in 0..seconds {
            let t = T0 + s * 1000;
            let round: Vec<TelemetryBatch> = (0..nodes).map(|i| batch(s as u64 + 1, t, i)).collect();
            let refs: Vec<(&NodeId, &TelemetryBatch)> = ids.iter().zip(&round).collect();
            e.ingest(&refs);
            batches += nodes as u64;
        }
        let ingest = started.elapsed();
        let now = T0 + seconds * 1000;
        let mut passes = Vec::new();
        for _ in 0..20 {
            let t = std::time::Instant::now();
            e.evaluate(now).await;
            passes.push(t.elapsed());
        }
        passes.sort();
        let (series, samples) = {
            let w = e.window();
            (w.series_count(), w.sample_count())
        };
        let median = passes[passes.len() / 2];
        // At 1 s batches and the default 200 ms coalescing, one pass covers nodes / 5 batches.
        let per_batch_us = median.as_secs_f64() * 1e6 / (nodes as f64 / 5.0);
        println!(
            "{{\"nodes\":{nodes},\"window_series\":{series},\"window_samples\":{samples},\"ingest_us_per_batch\":{:.1},\"pass_ms_median\":{:.2},\"pass_ms_max\":{:.2},\"eval_us_per_batch_at_1s_200ms\":{per_batch_us:.1}}}",
            ingest.as_secs_f64() * 1e6 / batches as f64,
            median.as_secs_f64() * 1e3,
            passes[passes.len() - 1].as_secs_f64() * 1e3,
        );
        let (_, _, views) = e.rule_views().await;
        for v in &views {
            assert!(v.last_error.is_none(), "{} failed: {:?}", v.name, v.last_error);
        }
        let rules = e.rules();
        let window = e.window();
        for r in rules.rules() {
            let t = std::time::Instant::now();
            let out = r.expr.eval(&window, now).unwrap();
            println!("  {:<28} {:>8.2} ms  {} results", r.name, t.elapsed().as_secs_f64() * 1e3, out.len());
        }
    }
}
