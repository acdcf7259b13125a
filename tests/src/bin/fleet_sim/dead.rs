//! `--dead-agents`: how long the controller takes to call a dead agent `down`.
//! Some agents are killed (their stream and connection end at once, as the
//! kernel ends a killed process's), others fall silent (the connection stays
//! open and nothing more is sent, as with a hung agent or a cut network that
//! leaves no reset). An operator polls `Fleet.ListNodes` and notes when each
//! dead node is first reported `down`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Result, anyhow};
use flotilla_common::client;
use flotilla_common::tls::TlsFiles;
use flotilla_proto::pb;
use flotilla_proto::pb::fleet_client::FleetClient;
use tokio::time::Instant;

use super::{percentile_ms, round3};

/// How often the operator side lists the nodes.
const POLL: Duration = Duration::from_millis(100);
/// How long after the window a death may still go undetected before it is
/// reported as missed (a hang guard, above three heartbeats at the longest interval
/// the simulator is run with).
const GRACE: Duration = Duration::from_secs(30);

/// How an agent dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Death {
    /// Stream and connection closed at once.
    Kill,
    /// Connection held open, nothing sent.
    Silence,
}

/// Who dies when, and when each actually stopped; shared by the agents and the watcher.
pub struct Deaths {
    /// By agent index: when it dies and how.
    plan: Mutex<Vec<Option<(Instant, Death)>>>,
    /// By node id: how and when it stopped.
    died: Mutex<HashMap<String, (Death, Instant)>>,
}

impl Deaths {
    pub fn new(agents: usize) -> Self {
        Self { plan: Mutex::new(vec![None; agents]), died: Mutex::new(HashMap::new()) }
    }

    /// The last `count` agents die at random moments of the window's first half,
    /// killed and silenced by turns.
    pub fn plan(&self, count: usize, start: Instant, window: Duration) {
        let Ok(mut plan) = self.plan.lock() else { return };
        for (i, slot) in plan.iter_mut().rev().take(count).enumerate() {
            let death = if i % 2 == 0 { Death::Kill } else { Death::Silence };
            *slot = Some((start + window.mul_f64(rand::random::<f64>() * 0.5), death));
        }
    }

    /// Whether agent `index` (node `node`) dies at `now`; if so, records it.
    pub fn due(&self, index: usize, node: &str, now: Instant) -> Option<Death> {
        let mut plan = self.plan.lock().ok()?;
        let (at, death) = plan.get(index).copied().flatten()?;
        if now < at {
            return None;
        }
        plan[index] = None;
        self.died.lock().ok()?.insert(node.to_owned(), (death, now));
        Some(death)
    }

    /// Deaths planned and not yet happened.
    fn planned(&self) -> usize {
        self.plan.lock().map_or(0, |p| p.iter().flatten().count())
    }

    fn died(&self) -> HashMap<String, (Death, Instant)> {
        self.died.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

/// Detection times, per kind of death.
#[derive(Debug, serde::Serialize)]
pub struct DeadReport {
    dead_killed: usize,
    dead_kill_detected: usize,
    dead_kill_detect_p50_ms: Option<f64>,
    dead_kill_detect_p99_ms: Option<f64>,
    dead_kill_detect_max_ms: Option<f64>,
    dead_silenced: usize,
    dead_silence_detected: usize,
    dead_silence_detect_p50_ms: Option<f64>,
    dead_silence_detect_p99_ms: Option<f64>,
    dead_silence_detect_max_ms: Option<f64>,
}

/// Polls ListNodes as the admin operator until every planned death has happened
/// and been seen as `down`, or until `window_end` plus a grace.
pub async fn watch(url: &str, tls: &TlsFiles, deaths: &Deaths, window_end: Instant) -> Result<DeadReport> {
    let channel = client::endpoint(url, tls)?.connect().await.map_err(|e| anyhow!(client::describe(&e)))?;
    let mut fleet = FleetClient::new(channel);
    let mut seen: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let died = deaths.died();
        if died.is_empty() && deaths.planned() == 0 {
            break;
        }
        let nodes = fleet.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
        let now = Instant::now();
        for node in nodes {
            if node.state() == pb::NodeState::Down && died.contains_key(&node.id) {
                seen.entry(node.id).or_insert(now);
            }
        }
        let done = deaths.planned() == 0 && died.keys().all(|n| seen.contains_key(n));
        if done || now > window_end + GRACE {
            break;
        }
    }
    let died = deaths.died();
    let times = |kind: Death| -> (usize, Vec<Duration>) {
        let of_kind: Vec<(&String, &Instant)> =
            died.iter().filter(|(_, (d, _))| *d == kind).map(|(n, (_, at))| (n, at)).collect();
        let mut found: Vec<Duration> =
            of_kind.iter().filter_map(|(n, at)| seen.get(*n).map(|s| s.saturating_duration_since(**at))).collect();
        found.sort_unstable();
        (of_kind.len(), found)
    };
    let ((killed, kill), (silenced, silence)) = (times(Death::Kill), times(Death::Silence));
    let max = |v: &[Duration]| v.last().map(|d| round3(d.as_secs_f64() * 1000.0));
    eprintln!(
        "dead agents: {} of {killed} killed and {} of {silenced} silenced seen down (polling every {} ms)",
        kill.len(),
        silence.len(),
        POLL.as_millis()
    );
    Ok(DeadReport {
        dead_killed: killed,
        dead_kill_detected: kill.len(),
        dead_kill_detect_p50_ms: percentile_ms(&kill, 0.50),
        dead_kill_detect_p99_ms: percentile_ms(&kill, 0.99),
        dead_kill_detect_max_ms: max(&kill),
        dead_silenced: silenced,
        dead_silence_detected: silence.len(),
        dead_silence_detect_p50_ms: percentile_ms(&silence, 0.50),
        dead_silence_detect_p99_ms: percentile_ms(&silence, 0.99),
        dead_silence_detect_max_ms: max(&silence),
    })
}
