//! The async shell around the rollout machine: one task owns every deployment
//! and running rollout. Operator requests, command results and a one-second
//! tick arrive as messages; after each, the machine runs, its new state is
//! committed to the store (flushed), and only then are the commands it issued
//! signed and sent, each under the id stored with it. On start the task loads
//! the running rollouts and resends every command still without a result,
//! under its stored id: an agent that ran it answers with its stored result.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use flotilla_common::NodeId;
use flotilla_common::command::Command;
use flotilla_common::envelope::CommandId;
use flotilla_common::time::now_unix_ms;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::RolloutError;
use super::machine::{self, Request};
use super::model::{Deployment, Issued, IssuedResult, Phase, Plan, Revision, Rollout, RolloutState};
use super::observe::{self, Observation};
use super::plan::{self, Fleet, GpuFacts, NodeFacts};
use super::spec::{DeploymentSpec, StrategyKind};
use crate::audit::AuditEntry;
use crate::commands::{CommandCenter, deliver, result_wait};
use crate::fleetview::FleetView;
use crate::registry::Registry;
use crate::store::Store;

/// How often running rollouts are re-evaluated without any other event.
const TICK: Duration = Duration::from_secs(1);
/// The wait before a command that could not be delivered is sent again.
const RESEND_AFTER: Duration = Duration::from_secs(2);

/// What the driver needs.
#[derive(Clone)]
pub struct Deps {
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    pub commands: Arc<CommandCenter>,
    pub view: FleetView,
}

/// An operator's action on a deployment's rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Pause,
    Resume,
    Abort,
    /// Abort the running rollout, or roll back to the last stable revision before the active one.
    Undo,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Abort => "abort",
            Self::Undo => "undo",
        }
    }
}

/// The answer to `deploy apply` (or `deploy plan` with `dry_run`).
#[derive(Debug, Clone)]
pub struct ApplyOutcome {
    pub deployment: String,
    /// The revision the spec became (or would become).
    pub revision: u32,
    pub plan: Plan,
    /// The spec is the serving revision's: nothing to do.
    pub unchanged: bool,
    /// The rollout started, unless a dry run or unchanged.
    pub rollout: Option<u64>,
}

enum Msg {
    Apply { yaml: String, actor: String, dry_run: bool, reply: oneshot::Sender<Result<ApplyOutcome, RolloutError>> },
    Operate { name: String, op: Operation, actor: String, reply: oneshot::Sender<Result<String, RolloutError>> },
    Result { deployment: String, number: u64, id: String, result: IssuedResult },
    Resend { deployment: String, number: u64, id: String },
}

/// The handle: requests go to the driver task; reads go to the store.
#[derive(Clone)]
pub struct Rollouts {
    tx: mpsc::Sender<Msg>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Rollouts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollouts").finish_non_exhaustive()
    }
}

impl Rollouts {
    /// Loads the deployments, resends what running rollouts were waiting for,
    /// and starts the driver task.
    pub fn start(deps: Deps, cancel: CancellationToken, tracker: &TaskTracker) -> Result<Self, RolloutError> {
        let (tx, rx) = mpsc::channel(256);
        let mut driver = Driver {
            deps: deps.clone(),
            deployments: BTreeMap::new(),
            running: BTreeMap::new(),
            tx: tx.clone(),
            tracker: tracker.clone(),
            in_flight: BTreeSet::new(),
        };
        for dep in deps.store.deployments()? {
            if let Some(n) = dep.current_rollout {
                let rollouts = deps.store.rollouts(&dep.name)?;
                match rollouts.into_iter().find(|r| r.number == n) {
                    Some(r) => {
                        tracing::info!(deployment = %dep.name, rollout = n, step = r.step + 1, state = r.state.as_str(), "resuming rollout");
                        driver.running.insert(dep.name.clone(), r);
                    }
                    None => {
                        tracing::error!(deployment = %dep.name, rollout = n, "the running rollout is missing from the store")
                    }
                }
            }
            driver.deployments.insert(dep.name.clone(), dep);
        }
        let names: Vec<String> = driver.running.keys().cloned().collect();
        for name in names {
            driver.send_pending(&name);
        }
        tracker.spawn(driver.run(rx, cancel));
        Ok(Self { tx, store: deps.store })
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, RolloutError>>) -> Msg,
    ) -> Result<T, RolloutError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| RolloutError::Stopped)?;
        rx.await.map_err(|_| RolloutError::Stopped)?
    }

    /// Applies a spec: a new revision and its rollout (or, with `dry_run`, the plan only).
    pub async fn apply(&self, yaml: String, actor: String, dry_run: bool) -> Result<ApplyOutcome, RolloutError> {
        self.ask(|reply| Msg::Apply { yaml, actor, dry_run, reply }).await
    }

    /// Pauses, resumes, aborts or undoes `name`'s rollout.
    pub async fn operate(&self, name: String, op: Operation, actor: String) -> Result<String, RolloutError> {
        self.ask(|reply| Msg::Operate { name, op, actor, reply }).await
    }

    /// Every deployment, with its running or latest rollout.
    pub fn list(&self) -> Result<Vec<(Deployment, Option<Rollout>)>, RolloutError> {
        let mut out = Vec::new();
        for dep in self.store.deployments()? {
            let latest = self.store.rollouts(&dep.name)?.pop();
            out.push((dep, latest));
        }
        Ok(out)
    }

    /// One deployment with all its rollouts, oldest first.
    pub fn history(&self, name: &str) -> Result<(Deployment, Vec<Rollout>), RolloutError> {
        let dep = self
            .store
            .deployments()?
            .into_iter()
            .find(|d| d.name == name)
            .ok_or_else(|| RolloutError::NotFound(format!("no deployment {name:?} (flotctl deploy ls)")))?;
        let rollouts = self.store.rollouts(name)?;
        Ok((dep, rollouts))
    }
}

struct Driver {
    deps: Deps,
    deployments: BTreeMap<String, Deployment>,
    /// Rollouts progressing or paused, by deployment.
    running: BTreeMap<String, Rollout>,
    tx: mpsc::Sender<Msg>,
    tracker: TaskTracker,
    /// Command ids being delivered now, so a tick does not send one twice at once.
    in_flight: BTreeSet<String>,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => return,
                },
                _ = tick.tick() => {
                    let names: Vec<String> = self.running.keys().cloned().collect();
                    for name in names {
                        self.step(&name);
                    }
                }
            }
        }
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Apply { yaml, actor, dry_run, reply } => {
                let result = self.apply(&yaml, &actor, dry_run);
                if let Ok(ApplyOutcome { deployment, rollout: Some(_), .. }) = &result {
                    let name = deployment.clone();
                    let _ = reply.send(result);
                    self.step(&name);
                } else {
                    let _ = reply.send(result);
                }
            }
            Msg::Operate { name, op, actor, reply } => {
                let result = self.operate(&name, op, &actor);
                let _ = reply.send(result);
                if self.running.contains_key(&name) {
                    self.step(&name);
                }
            }
            Msg::Result { deployment, number, id, result } => {
                self.in_flight.remove(&id);
                let Some(r) = self.running.get_mut(&deployment).filter(|r| r.number == number) else { return };
                if let Phase::Acting { issued } = &mut r.phase
                    && let Some(i) = issued.iter_mut().find(|i| i.id == id && i.result.is_none())
                {
                    i.result = Some(result);
                    self.step(&deployment);
                }
            }
            Msg::Resend { deployment, number, id } => {
                self.in_flight.remove(&id);
                if self.running.get(&deployment).is_some_and(|r| r.number == number) {
                    self.send_pending(&deployment);
                }
            }
        }
    }

    fn apply(&mut self, yaml: &str, actor: &str, dry_run: bool) -> Result<ApplyOutcome, RolloutError> {
        let spec = DeploymentSpec::parse(yaml)?;
        let mut dep = self.deployments.get(&spec.name).cloned().unwrap_or_else(|| Deployment::new(&spec.name));
        if let Some(r) = self.running.get(&spec.name) {
            return Err(RolloutError::Conflict(format!(
                "rollout {} of {} (revision {} → {}) is {}: wait for it, or `flotctl rollout abort {}`",
                r.number,
                r.deployment,
                r.from.map_or_else(|| "none".to_owned(), |f| f.to_string()),
                r.to,
                r.state.as_str(),
                r.deployment
            )));
        }
        let to = dep.revisions.last().map_or(1, |r| r.number + 1);
        if let Some(active) = dep.active.and_then(|a| dep.revision(a))
            && active.spec == spec
        {
            return Ok(ApplyOutcome {
                deployment: spec.name.clone(),
                revision: active.number,
                plan: Plan {
                    strategy: "none".to_owned(),
                    steps: Vec::new(),
                    notes: vec![format!("revision {} already serves this spec", active.number)],
                },
                unchanged: true,
                rollout: None,
            });
        }
        let fleet = self.fleet();
        let planned = plan::plan_update(&dep, &spec, to, &fleet)?;
        if dry_run {
            return Ok(ApplyOutcome {
                deployment: spec.name.clone(),
                revision: to,
                plan: planned.plan,
                unchanged: false,
                rollout: None,
            });
        }
        let now = now_unix_ms();
        dep.revisions.push(Revision {
            number: to,
            spec: spec.clone(),
            spec_yaml: yaml.to_owned(),
            applied_unix_ms: now,
            applied_by: actor.to_owned(),
            outcome: None,
        });
        let rollout = self.new_rollout(&mut dep, &spec, to, planned.plan, actor, "apply", now);
        self.deps.store.commit_deployment(&dep, Some(&rollout))?;
        let outcome = ApplyOutcome {
            deployment: spec.name.clone(),
            revision: to,
            plan: rollout.plan.clone(),
            unchanged: false,
            rollout: Some(rollout.number),
        };
        self.deployments.insert(spec.name.clone(), dep);
        self.running.insert(spec.name.clone(), rollout);
        Ok(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    fn new_rollout(
        &self,
        dep: &mut Deployment,
        spec: &DeploymentSpec,
        to: u32,
        plan: Plan,
        actor: &str,
        trigger: &str,
        now: i64,
    ) -> Rollout {
        dep.rollouts += 1;
        dep.current_rollout = Some(dep.rollouts);
        let mut r = Rollout {
            deployment: dep.name.clone(),
            number: dep.rollouts,
            from: dep.active,
            to,
            started_by: actor.to_owned(),
            trigger: trigger.to_owned(),
            plan,
            revert: None,
            state: RolloutState::Progressing,
            step: 0,
            phase: Phase::Ready,
            started_unix_ms: now,
            step_started_unix_ms: now,
            finished_unix_ms: None,
            strategy: spec.strategy.clone(),
            gates: spec.gates.clone(),
            readings: Vec::new(),
            events: Vec::new(),
            error: None,
            weights: None,
            share: 0,
            gateway_node: spec.gateway.node.clone(),
            retired: Vec::new(),
        };
        let from = r.from.map_or_else(|| "nothing".to_owned(), |f| format!("revision {f}"));
        r.log(now, format!("{trigger} by {actor}: {from} → revision {to}, {}", r.plan.strategy));
        r
    }

    fn operate(&mut self, name: &str, op: Operation, actor: &str) -> Result<String, RolloutError> {
        let Some(mut dep) = self.deployments.get(name).cloned() else {
            return Err(RolloutError::NotFound(format!("no deployment {name:?} (flotctl deploy ls)")));
        };
        let now = now_unix_ms();
        if let Some(mut r) = self.running.get(name).cloned() {
            let req = match op {
                Operation::Pause => Request::Pause,
                Operation::Resume => Request::Resume,
                Operation::Abort | Operation::Undo => Request::Abort,
            };
            let said = machine::request(&mut dep, &mut r, req, actor, now).map_err(RolloutError::Conflict)?;
            self.deps.store.commit_deployment(&dep, Some(&r))?;
            self.deployments.insert(name.to_owned(), dep);
            self.running.insert(name.to_owned(), r);
            return Ok(said);
        }
        if op != Operation::Undo {
            return Err(RolloutError::Conflict(format!("{name} has no rollout in progress to {}", op.as_str())));
        }
        let Some(active) = dep.active else {
            return Err(RolloutError::Conflict(format!("{name} has no serving revision to undo")));
        };
        let Some(target) = dep.stable_before(active) else {
            return Err(RolloutError::Conflict(format!("{name} has no stable revision before {active} to go back to")));
        };
        let Some(rev) = dep.revision(target) else {
            return Err(RolloutError::NotFound(format!("revision {target} of {name} is missing")));
        };
        // Going back to a known-good revision: all replicas at once, straight to
        // full traffic, no canary phase, no bake (retire-first still applies
        // where no GPU is spare).
        let mut spec = rev.spec.clone();
        spec.strategy.kind = StrategyKind::BlueGreen;
        spec.strategy.steps = vec![100];
        spec.strategy.bake = Duration::ZERO;
        let planned = plan::plan_update(&dep, &spec, target, &self.fleet())?;
        let rollout = self.new_rollout(&mut dep, &spec, target, planned.plan, actor, "undo", now);
        self.deps.store.commit_deployment(&dep, Some(&rollout))?;
        let said =
            format!("rolling back {name} from revision {active} to revision {target} (rollout {})", rollout.number);
        self.deployments.insert(name.to_owned(), dep);
        self.running.insert(name.to_owned(), rollout);
        Ok(said)
    }

    /// Runs the machine for `name`, persists what changed, then sends what it issued.
    fn step(&mut self, name: &str) {
        let (Some(dep), Some(r)) = (self.deployments.get(name), self.running.get(name)) else { return };
        let obs = self.observe(dep, r);
        let mut dep2 = dep.clone();
        let mut r2 = r.clone();
        let issued = machine::advance(&mut dep2, &mut r2, &obs, now_unix_ms(), &mut || CommandId::new().to_string());
        if dep2 == *dep && same_rollout(&r2, r) {
            return;
        }
        if let Err(error) = self.deps.store.commit_deployment(&dep2, Some(&r2)) {
            // Nothing was sent: the next tick decides again, with fresh ids.
            tracing::error!(%error, deployment = name, "cannot persist the rollout step; retrying on the next tick");
            return;
        }
        let ended = r2.state.is_final();
        if ended {
            tracing::info!(deployment = name, rollout = r2.number, state = r2.state.as_str(), "rollout ended");
            self.audit(
                "controller",
                "rollout.end",
                name,
                serde_json::json!({ "rollout": r2.number, "state": r2.state.as_str(), "error": r2.error }),
            );
        }
        self.deployments.insert(name.to_owned(), dep2);
        if ended {
            self.running.remove(name);
        } else {
            self.running.insert(name.to_owned(), r2);
        }
        if !issued.is_empty() {
            self.send_pending(name);
        }
    }

    /// Sends every command of the current step that has no result and is not on its way.
    fn send_pending(&mut self, name: &str) {
        let Some(r) = self.running.get(name) else { return };
        let Phase::Acting { issued } = &r.phase else { return };
        let pending: Vec<Issued> =
            issued.iter().filter(|i| i.result.is_none() && !self.in_flight.contains(&i.id)).cloned().collect();
        for i in pending {
            self.in_flight.insert(i.id.clone());
            let deps = self.deps.clone();
            let tx = self.tx.clone();
            let (deployment, number) = (r.deployment.clone(), r.number);
            self.tracker.spawn(async move {
                let msg = match send(&deps, &deployment, number, &i).await {
                    Ok(result) => Msg::Result { deployment, number, id: i.id, result },
                    Err(error) => {
                        tracing::warn!(%error, node = %i.node, command = i.command.name(), command_id = %i.id, "rollout command not delivered; resending");
                        tokio::time::sleep(RESEND_AFTER).await;
                        Msg::Resend { deployment, number, id: i.id }
                    }
                };
                let _ = tx.send(msg).await;
            });
        }
    }

    fn observe(&self, dep: &Deployment, r: &Rollout) -> Observation {
        let mut nodes: BTreeSet<String> = dep.replicas.iter().map(|x| x.node.clone()).collect();
        for plan in std::iter::once(&r.plan).chain(r.revert.as_ref().map(|(_, p)| p)) {
            for step in &plan.steps {
                if let super::model::Action::Start { replicas, .. } = &step.action {
                    nodes.extend(replicas.iter().map(|x| x.node.clone()));
                }
            }
        }
        let mut obs = Observation::default();
        for node in &nodes {
            let Ok(id) = NodeId::new(node.clone()) else { continue };
            if self.deps.registry.session(&id).is_some() {
                obs.connected.insert(node.clone());
            }
            if let Some(report) = self.deps.view.containers(&id)
                && report.runtime_error.is_none()
            {
                obs.containers.insert(node.clone(), report.containers);
            }
            if let Some(batch) = self.deps.view.latest(&id) {
                observe::readiness(node, &batch, &mut obs.ready);
                observe::ttft_counters(node, &batch, &mut obs.counters);
            }
        }
        let upstream = dep.revision(r.to).map(|rev| rev.spec.gateway.upstream.clone()).unwrap_or_default();
        if let Ok(gw) = NodeId::new(r.gateway_node.clone())
            && let Some(batch) = self.deps.view.latest(&gw)
        {
            observe::gateway_counters(&upstream, &batch, &mut obs.counters);
        }
        obs
    }

    /// The fleet as the planner needs it.
    fn fleet(&self) -> Fleet {
        let mut fleet = Fleet::default();
        for id in self.deps.view.nodes() {
            let Some(inv) = self.deps.view.inventory(&id) else { continue };
            let latest = self.deps.view.latest(&id);
            let gpus = inv
                .gpus
                .iter()
                .map(|g| GpuFacts {
                    index: g.index,
                    memory_total_bytes: g.memory_total_bytes,
                    memory_used_bytes: latest
                        .as_ref()
                        .and_then(|b| b.gpus.iter().find(|s| s.index == g.index))
                        .and_then(|s| s.memory_used_bytes),
                })
                .collect();
            fleet.nodes.insert(
                id.to_string(),
                NodeFacts {
                    connected: self.deps.registry.session(&id).is_some(),
                    labels: inv.labels.clone(),
                    gpus,
                    gateway: inv.gateway.is_some(),
                },
            );
        }
        for dep in self.deployments.values() {
            for rep in &dep.replicas {
                fleet.held_gpus.entry(rep.node.clone()).or_default().extend(rep.gpus.iter().copied());
            }
        }
        fleet
    }

    fn audit(&self, actor: &str, action: &str, target: &str, detail: serde_json::Value) {
        let entry = AuditEntry::now(actor, action, target, &detail);
        if let Err(error) = self.deps.store.append_audit(entry) {
            tracing::error!(%error, "cannot write the audit log");
        }
    }
}

/// Whether two rollouts differ in anything but NaN readings (NaN ≠ NaN).
fn same_rollout(a: &Rollout, b: &Rollout) -> bool {
    let strip = |r: &Rollout| {
        let mut r = r.clone();
        r.readings.clear();
        r
    };
    strip(a) == strip(b) && format!("{:?}", a.readings) == format!("{:?}", b.readings)
}

/// Audits, signs under the stored id, sends, and waits for one command's result.
async fn send(deps: &Deps, deployment: &str, number: u64, i: &Issued) -> Result<IssuedResult, String> {
    let node = NodeId::new(i.node.clone()).map_err(|e| e.to_string())?;
    let id: CommandId = i.id.parse().map_err(|_| format!("stored command id {:?} is not a UUID", i.id))?;
    let entry = AuditEntry::now(
        &format!("rollout:{deployment}#{number}"),
        "command.issue",
        node.as_str(),
        &serde_json::json!({ "command_id": i.id, "command": i.command.name() }),
    );
    let store = deps.store.clone();
    tokio::task::spawn_blocking(move || store.append_audit(entry))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("audit log: {e}"))?;
    let signed_at = deps.registry.agent_time(&node, now_unix_ms());
    let prepared = deps.commands.prepare_as(id, &node, &i.command, signed_at).map_err(|e| e.to_string())?;
    let wait = result_wait(&i.command);
    let reply = deliver(&deps.registry, &deps.commands, &node, prepared, wait).await.map_err(|e| e.to_string())?;
    if matches!(i.command, Command::Deploy { .. } | Command::Drain { .. } | Command::GatewaySet(_)) {
        tracing::info!(deployment, rollout = number, node = %node, command = i.command.name(), status = reply.status.as_str(), detail = %reply.detail, "rollout command answered");
    }
    Ok(IssuedResult { status: reply.status, detail: reply.detail })
}
