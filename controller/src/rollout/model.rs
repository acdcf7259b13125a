//! What the rollout subsystem stores: deployments with their revisions and
//! replicas, and rollouts with their plan, position and readings. Plain data
//! (versioned postcard in sled, see `store::codec`); the decisions live in
//! `machine`, the plans in `plan`.

use std::collections::BTreeMap;

use flotilla_common::command::{Command, CommandStatus, GatewayWeights};
use serde::{Deserialize, Serialize};

use super::spec::DeploymentSpec;

/// A deployment and everything Flotilla remembers of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub name: String,
    /// Every applied revision, oldest first (numbered from 1).
    pub revisions: Vec<Revision>,
    /// The revision serving traffic (the last one that finished rolling out).
    pub active: Option<u32>,
    /// The replicas Flotilla started and has not retired, of any revision.
    pub replicas: Vec<Replica>,
    /// The rollout in progress or paused, by its number.
    pub current_rollout: Option<u64>,
    /// Rollouts are numbered per deployment from 1.
    pub rollouts: u64,
}

impl Deployment {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            revisions: Vec::new(),
            active: None,
            replicas: Vec::new(),
            current_rollout: None,
            rollouts: 0,
        }
    }

    pub fn revision(&self, number: u32) -> Option<&Revision> {
        self.revisions.iter().find(|r| r.number == number)
    }

    /// The replicas of `revision`.
    pub fn replicas_of(&self, revision: u32) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().filter(move |r| r.revision == revision)
    }

    /// The newest revision before `number` whose rollout succeeded.
    pub fn stable_before(&self, number: u32) -> Option<u32> {
        self.revisions
            .iter()
            .rev()
            .find(|r| r.number < number && r.outcome == Some(RevisionOutcome::Stable))
            .map(|r| r.number)
    }
}

/// One applied spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    pub number: u32,
    pub spec: DeploymentSpec,
    /// The YAML as applied, for `deploy history`.
    pub spec_yaml: String,
    pub applied_unix_ms: i64,
    pub applied_by: String,
    /// How its last rollout ended; `None` while it has not.
    pub outcome: Option<RevisionOutcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevisionOutcome {
    /// Rolled out and healthy: a target for `auto_revert` and `undo`.
    Stable,
    /// Its rollout failed or was aborted.
    Failed,
}

/// One replica as placed: a container of a revision on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub node: String,
    pub revision: u32,
    /// `NAME-REVISION`, as the agent names it.
    pub container: String,
    /// GPU indices on the node.
    pub gpus: Vec<u32>,
    /// The address the gateway reaches the node on.
    pub address: String,
    pub host_port: u16,
}

impl Replica {
    /// `NODE/CONTAINER`: unique across the fleet.
    pub fn container_key(&self) -> String {
        format!("{}/{}", self.node, self.container)
    }

    /// `ADDRESS:PORT`, as the gateway's upstream lists it.
    pub fn server(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.host_port)
        } else {
            format!("{}:{}", self.address, self.host_port)
        }
    }
}

/// The states `flotctl rollout status` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Progressing,
    Paused,
    Succeeded,
    RolledBack,
    Failed,
    Aborted,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Progressing => "progressing",
            Self::Paused => "paused",
            Self::Succeeded => "succeeded",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
            Self::Aborted => "aborted",
        }
    }

    /// Whether the rollout has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, Self::Progressing | Self::Paused)
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Start these replicas, then wait until each is healthy.
    Start { replicas: Vec<Replica>, specs: Vec<String> },
    /// Set the gateway's weights; `new_share` is the new revision's % of traffic.
    /// With a bake, the health gates watch it that long.
    Traffic { weights: GatewayWeights, new_share: u8, bake_ms: u64 },
    /// Drain, then stop these replicas.
    Retire { replicas: Vec<Replica> },
    /// Wait for `flotctl rollout resume` (a canary without auto_promote).
    AwaitPromotion,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub action: Action,
    /// For people: "start llama-2 on gpu-1, gpu-2", "traffic 10 % → revision 2".
    pub label: String,
}

/// A rollout's steps and how they were chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// blue-green, canary, rolling, retire-first or revert.
    pub strategy: String,
    pub steps: Vec<Step>,
    /// Why the plan is what it is (no spare GPU, capacity dip, ...).
    pub notes: Vec<String>,
}

/// A command of a step as persisted before it is sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Issued {
    /// The command id (UUID text): resends use it, so the agent runs it once.
    pub id: String,
    pub node: String,
    pub command: Command,
    pub result: Option<IssuedResult>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedResult {
    pub status: CommandStatus,
    pub detail: String,
}

/// Where the current step is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Phase {
    /// Not begun.
    Ready,
    /// Its commands are persisted and sent; waiting for every result.
    Acting { issued: Vec<Issued> },
    /// After a start: each new replica must be ready for min_healthy_time.
    Settling { since_ms: i64, healthy_since: BTreeMap<String, i64> },
    /// After a traffic shift: the gates watch the window from `since_ms`.
    Baking { since_ms: i64, baseline: Counters },
}

/// Cumulative counters read at one moment, to subtract from later readings.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Per gateway server (`ADDRESS:PORT`).
    pub servers: BTreeMap<String, ServerCounters>,
    /// Time-to-first-token buckets per replica container (`node/container`).
    pub ttft: BTreeMap<String, Histogram>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ServerCounters {
    pub responses: f64,
    pub errors: f64,
    pub latency: Histogram,
}

/// Cumulative bucket counts, `(upper bound, count)`, ascending, `+Inf` last.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
}

/// One gate's latest reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReading {
    /// readiness, error_ratio, p95_latency_seconds, p95_ttft_seconds.
    pub gate: String,
    /// The new revision's value (NaN: no data).
    pub value: f64,
    /// The old revision's value over the same window (NaN: none).
    pub baseline: f64,
    pub limit: f64,
    /// pass, fail or "no data".
    pub verdict: String,
    pub detail: String,
}

/// Why a revert plan runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revert {
    /// The state the rollout ends in: rolled_back or aborted.
    pub ends_as: RolloutState,
    pub reason: String,
}

/// An entry of a rollout's event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at_unix_ms: i64,
    pub text: String,
}

/// The most events a rollout keeps (the oldest go first).
pub const MAX_EVENTS: usize = 200;

/// One rollout of a deployment from one revision to another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub deployment: String,
    /// Numbered per deployment from 1.
    pub number: u64,
    /// The revision serving when it began (none for a first deploy).
    pub from: Option<u32>,
    pub to: u32,
    /// Who started it, and how (apply or undo).
    pub started_by: String,
    pub trigger: String,
    pub plan: Plan,
    /// Set once the rollout turns back: the remaining work is this plan's.
    pub revert: Option<(Revert, Plan)>,
    pub state: RolloutState,
    /// Index into the plan running now (the revert plan's, once reverting).
    pub step: usize,
    pub phase: Phase,
    pub started_unix_ms: i64,
    pub step_started_unix_ms: i64,
    pub finished_unix_ms: Option<i64>,
    pub strategy: super::spec::Strategy,
    pub gates: super::spec::Gates,
    pub readings: Vec<GateReading>,
    pub events: Vec<Event>,
    /// The failure that ended it or turned it back.
    pub error: Option<String>,
    /// The gateway's weights as last confirmed, and the new revision's share of them (%).
    pub weights: Option<GatewayWeights>,
    pub share: u8,
    /// The agent node that runs the gateway.
    pub gateway_node: String,
    /// Replicas of the old revision this rollout has retired (a revert starts them again).
    pub retired: Vec<Replica>,
}

impl Rollout {
    /// The plan being executed now.
    pub fn running_plan(&self) -> &Plan {
        self.revert.as_ref().map_or(&self.plan, |(_, p)| p)
    }

    pub fn current_step(&self) -> Option<&Step> {
        self.running_plan().steps.get(self.step)
    }

    pub fn log(&mut self, at_unix_ms: i64, text: impl Into<String>) {
        let text = text.into();
        tracing::info!(deployment = %self.deployment, rollout = self.number, "{text}");
        self.events.push(Event { at_unix_ms, text });
        if self.events.len() > MAX_EVENTS {
            let excess = self.events.len() - MAX_EVENTS;
            self.events.drain(..excess);
        }
    }
}
