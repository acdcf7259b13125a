//! The rollout state machine: a pure function from (deployment, rollout,
//! observation, now) to the next state and the commands to send. The driver
//! persists what this returns *before* it sends the commands, and sends every
//! command under an id chosen here and stored with it, so a controller killed
//! at any point resends the same ids and the agents run each command once.
//!
//! The anchors' holes, closed here: a revert runs its own plan (traffic back
//! first, no canary phase, no bake); every wait has a deadline (results and
//! steps by `progress_deadline`, replicas by `healthy_deadline`, bakes by their
//! length); old replicas are retired only by steps placed after their
//! replacements were started, were found healthy and took traffic.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_common::command::{Command, CommandStatus};

use super::gates::{self, Sides};
use super::model::{Action, Deployment, Issued, Phase, Replica, Revert, RevisionOutcome, Rollout, RolloutState};
use super::observe::{Health, Observation, ttft_key};
use super::plan;

/// How long a drain waits for in-flight requests before the container is stopped.
pub const DRAIN_DEADLINE_S: u32 = 30;
/// The grace a stopping server gets before it is killed.
pub const STOP_TIMEOUT_S: u32 = 30;
/// A gate reading's verdict while it cannot be judged yet.
pub const WAITING: &str = "waiting";
/// The most transitions one call makes (each persisted by the caller).
const MAX_TRANSITIONS: usize = 32;

/// What an operator asks of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Pause,
    Resume,
    Abort,
}

/// Runs `rollout` forward as far as `obs` and `now` allow. Returns the commands
/// newly issued (already recorded in the rollout's phase).
pub fn advance(
    dep: &mut Deployment,
    r: &mut Rollout,
    obs: &Observation,
    now: i64,
    new_id: &mut dyn FnMut() -> String,
) -> Vec<Issued> {
    let mut out = Vec::new();
    for _ in 0..MAX_TRANSITIONS {
        if r.state != RolloutState::Progressing {
            break;
        }
        let Some(step) = r.current_step().cloned() else {
            finish(dep, r, now);
            break;
        };
        match r.phase.clone() {
            Phase::Ready => {
                let commands = commands_for(&step.action, r);
                if commands.is_empty() {
                    if matches!(step.action, Action::AwaitPromotion) {
                        r.state = RolloutState::Paused;
                        r.log(now, "canary baked: waiting for promotion (flotctl rollout resume)");
                        r.step += 1;
                        r.step_started_unix_ms = now;
                        break;
                    }
                    next_step(r, now);
                    continue;
                }
                let issued: Vec<Issued> = commands
                    .into_iter()
                    .map(|(node, command)| Issued { id: new_id(), node, command, result: None })
                    .collect();
                r.log(now, format!("step {}: {}", r.step + 1, step.label));
                out.extend(issued.iter().cloned());
                r.phase = Phase::Acting { issued };
                // The caller persists this before sending anything.
                break;
            }
            Phase::Acting { issued } => {
                if let Some(failed) =
                    issued.iter().find(|i| i.result.as_ref().is_some_and(|x| x.status != CommandStatus::Succeeded))
                {
                    let detail = failed.result.as_ref().map(|x| x.detail.clone()).unwrap_or_default();
                    fail(dep, r, now, format!("{} on {} failed: {detail}", failed.command.name(), failed.node));
                    continue;
                }
                if issued.iter().all(|i| i.result.is_some()) {
                    acted(dep, r, &step.action, obs, now);
                    continue;
                }
                if overdue(r, now) {
                    let waiting: Vec<&str> =
                        issued.iter().filter(|i| i.result.is_none()).map(|i| i.node.as_str()).collect();
                    fail(
                        dep,
                        r,
                        now,
                        format!(
                            "no result from {} within progress_deadline ({})",
                            waiting.join(", "),
                            humantime::format_duration(r.strategy.progress_deadline)
                        ),
                    );
                    continue;
                }
                break;
            }
            Phase::Settling { since_ms, mut healthy_since } => {
                let Action::Start { replicas, .. } = &step.action else {
                    next_step(r, now);
                    continue;
                };
                let min_healthy = ms(r.strategy.min_healthy_time);
                let mut why = Vec::new();
                for rep in replicas {
                    match obs.replica_health(rep) {
                        Ok(()) => {
                            healthy_since.entry(rep.container_key()).or_insert(now);
                        }
                        Err(e) => {
                            healthy_since.remove(&rep.container_key());
                            why.push(e);
                        }
                    }
                }
                let settled = replicas
                    .iter()
                    .all(|rep| healthy_since.get(&rep.container_key()).is_some_and(|since| now - since >= min_healthy));
                let mut readiness = readiness_reading(replicas.len() - why.len(), replicas.len(), &why);
                if !why.is_empty() {
                    // Not ready yet is expected while a replica starts: the deadline judges.
                    readiness.verdict = WAITING.to_owned();
                }
                r.readings = vec![readiness];
                if settled {
                    r.log(
                        now,
                        format!(
                            "{} healthy for {}",
                            names(replicas),
                            humantime::format_duration(r.strategy.min_healthy_time)
                        ),
                    );
                    next_step(r, now);
                    continue;
                }
                if now - since_ms > ms(r.strategy.healthy_deadline) {
                    fail(
                        dep,
                        r,
                        now,
                        format!(
                            "not healthy within healthy_deadline ({}): {}",
                            humantime::format_duration(r.strategy.healthy_deadline),
                            why.join("; ")
                        ),
                    );
                    continue;
                }
                r.phase = Phase::Settling { since_ms, healthy_since };
                break;
            }
            Phase::Baking { since_ms, baseline } => {
                let Action::Traffic { bake_ms, weights, .. } = &step.action else {
                    next_step(r, now);
                    continue;
                };
                let serving: Vec<&Replica> = dep
                    .replicas
                    .iter()
                    .filter(|rep| weights.servers.iter().any(|s| s.weight > 0 && s.address == rep.server()))
                    .collect();
                let new: Vec<Replica> =
                    serving.iter().filter(|rep| rep.revision == r.to).map(|rep| (*rep).clone()).collect();
                let old: Vec<Replica> =
                    serving.iter().filter(|rep| rep.revision != r.to).map(|rep| (*rep).clone()).collect();
                let (mut why, mut unknown) = (Vec::new(), Vec::new());
                for rep in &new {
                    match obs.health(rep) {
                        Health::Ready => {}
                        Health::NotReady(e) => why.push(e),
                        Health::Unknown(e) => unknown.push(e),
                    }
                }
                let sides = Sides {
                    old_servers: old.iter().map(Replica::server).collect(),
                    new_servers: new.iter().map(Replica::server).collect(),
                    old_replicas: old.iter().map(ttft_key).collect(),
                    new_replicas: new.iter().map(ttft_key).collect(),
                };
                let mut readiness = readiness_reading(new.len() - why.len() - unknown.len(), new.len(), &why);
                if why.is_empty() && !unknown.is_empty() {
                    readiness.verdict = WAITING.to_owned();
                    readiness.detail = unknown.join("; ");
                }
                let mut readings = vec![readiness];
                readings.extend(gates::evaluate(&r.gates, &baseline, &obs.counters, &sides));
                let failed: Vec<String> = readings
                    .iter()
                    .filter(|g| g.verdict == gates::FAIL)
                    .map(|g| format!("{} {:.4} over the limit {:.4} ({})", g.gate, g.value, g.limit, g.detail))
                    .collect();
                r.readings = readings;
                if !failed.is_empty() && r.revert.is_none() {
                    fail(dep, r, now, format!("health gate failed: {}", failed.join("; ")));
                    continue;
                }
                // A bake completes only with every new replica seen ready; one
                // whose node is away holds it (progress_deadline still applies).
                if unknown.is_empty() && now - since_ms >= i64::try_from(*bake_ms).unwrap_or(i64::MAX) {
                    r.log(
                        now,
                        format!(
                            "{}: gates passed for {}",
                            step.label,
                            humantime::format_duration(Duration::from_millis(*bake_ms))
                        ),
                    );
                    next_step(r, now);
                    continue;
                }
                break;
            }
        }
    }
    out
}

/// Applies an operator's request. Returns what happened, for the reply.
pub fn request(dep: &mut Deployment, r: &mut Rollout, req: Request, actor: &str, now: i64) -> Result<String, String> {
    if r.state.is_final() {
        return Err(format!("rollout {} of {} has already ended ({})", r.number, r.deployment, r.state.as_str()));
    }
    match req {
        Request::Pause if r.state == RolloutState::Paused => Err("the rollout is already paused".to_owned()),
        Request::Pause => {
            r.state = RolloutState::Paused;
            r.log(now, format!("paused by {actor}"));
            Ok("paused".to_owned())
        }
        Request::Resume if r.state == RolloutState::Progressing => Err("the rollout is not paused".to_owned()),
        Request::Resume => {
            r.state = RolloutState::Progressing;
            // A deadline should not fire for the time an operator held the rollout.
            r.step_started_unix_ms = now;
            if let Phase::Settling { since_ms, .. } = &mut r.phase {
                *since_ms = now;
            }
            r.log(now, format!("resumed by {actor}"));
            Ok("resumed".to_owned())
        }
        Request::Abort if r.revert.is_some() => {
            Err("the rollout is already going back; wait for it to finish".to_owned())
        }
        Request::Abort => {
            r.state = RolloutState::Progressing;
            begin_revert(dep, r, now, RolloutState::Aborted, format!("aborted by {actor}"));
            Ok("aborting: traffic goes back to the previous revision".to_owned())
        }
    }
}

fn commands_for(action: &Action, r: &Rollout) -> Vec<(String, Command)> {
    match action {
        Action::Start { replicas, specs } => replicas
            .iter()
            .zip(specs)
            .map(|(rep, spec)| (rep.node.clone(), Command::Deploy { spec_yaml: spec.clone() }))
            .collect(),
        Action::Traffic { weights, .. } => {
            let gateway = r.gateway_node.clone();
            vec![(gateway, Command::GatewaySet(weights.clone()))]
        }
        Action::Retire { replicas } => replicas
            .iter()
            .map(|rep| {
                (
                    rep.node.clone(),
                    Command::Drain {
                        container: rep.container.clone(),
                        endpoint: format!("http://{}", rep.server()),
                        deadline_s: DRAIN_DEADLINE_S,
                        timeout_s: STOP_TIMEOUT_S,
                    },
                )
            })
            .collect(),
        Action::AwaitPromotion => Vec::new(),
    }
}

/// Every command of the step succeeded.
fn acted(dep: &mut Deployment, r: &mut Rollout, action: &Action, obs: &Observation, now: i64) {
    match action {
        Action::Start { replicas, .. } => {
            for rep in replicas {
                dep.replicas.retain(|x| !(x.node == rep.node && x.container == rep.container));
                dep.replicas.push(rep.clone());
            }
            r.phase = Phase::Settling { since_ms: now, healthy_since: BTreeMap::new() };
        }
        Action::Traffic { weights, new_share, bake_ms } => {
            r.weights = Some(weights.clone());
            r.share = if r.revert.is_some() { 0 } else { *new_share };
            match (&r.revert, r.from) {
                (Some(_), Some(from)) => r.log(now, format!("gateway serves revision {from} again")),
                _ => r.log(now, format!("gateway serves {new_share} % on revision {}", r.to)),
            }
            if *bake_ms > 0 && r.revert.is_none() {
                r.phase = Phase::Baking { since_ms: now, baseline: obs.counters.clone() };
            } else {
                next_step(r, now);
            }
        }
        Action::Retire { replicas } => {
            for rep in replicas {
                dep.replicas.retain(|x| !(x.node == rep.node && x.container == rep.container));
                if Some(rep.revision) == r.from && !r.retired.contains(rep) {
                    r.retired.push(rep.clone());
                }
            }
            next_step(r, now);
        }
        Action::AwaitPromotion => next_step(r, now),
    }
}

fn next_step(r: &mut Rollout, now: i64) {
    r.step += 1;
    r.phase = Phase::Ready;
    r.step_started_unix_ms = now;
}

fn overdue(r: &Rollout, now: i64) -> bool {
    now - r.step_started_unix_ms > ms(r.strategy.progress_deadline)
}

fn fail(dep: &mut Deployment, r: &mut Rollout, now: i64, reason: String) {
    if r.revert.is_some() {
        r.log(now, format!("the way back failed: {reason}"));
        r.error = Some(format!("{}; then the revert failed: {reason}", r.error.clone().unwrap_or_default()));
        end(dep, r, now, RolloutState::Failed);
    } else if r.strategy.auto_revert {
        begin_revert(dep, r, now, RolloutState::RolledBack, reason);
    } else {
        r.log(now, format!("failed: {reason} (auto_revert is off: everything stays as it is)"));
        r.error = Some(reason);
        end(dep, r, now, RolloutState::Failed);
    }
}

fn begin_revert(dep: &mut Deployment, r: &mut Rollout, now: i64, ends_as: RolloutState, reason: String) {
    let from_spec = r.from.and_then(|f| dep.revision(f)).map(|rev| rev.spec.clone());
    let plan = plan::plan_revert(dep, from_spec.as_ref(), &r.retired, r.to);
    r.log(
        now,
        format!("going back to revision {}: {reason}", r.from.map_or_else(|| "none".to_owned(), |f| f.to_string())),
    );
    r.error = Some(reason.clone());
    r.revert = Some((Revert { ends_as, reason }, plan));
    r.step = 0;
    r.phase = Phase::Ready;
    r.step_started_unix_ms = now;
}

fn finish(dep: &mut Deployment, r: &mut Rollout, now: i64) {
    match r.revert.clone() {
        Some((revert, _)) => {
            r.log(now, format!("back on revision {}", r.from.map_or_else(|| "none".to_owned(), |f| f.to_string())));
            end(dep, r, now, revert.ends_as);
        }
        None => {
            dep.active = Some(r.to);
            r.log(now, format!("revision {} serves all traffic", r.to));
            end(dep, r, now, RolloutState::Succeeded);
        }
    }
}

fn end(dep: &mut Deployment, r: &mut Rollout, now: i64, state: RolloutState) {
    r.state = state;
    r.finished_unix_ms = Some(now);
    r.phase = Phase::Ready;
    dep.current_rollout = None;
    let outcome = if state == RolloutState::Succeeded { RevisionOutcome::Stable } else { RevisionOutcome::Failed };
    // An undo returns to a revision that stays stable whatever happens to the way back.
    if let Some(rev) = dep.revisions.iter_mut().find(|x| x.number == r.to)
        && !(r.trigger == "undo" && rev.outcome == Some(RevisionOutcome::Stable))
    {
        rev.outcome = Some(outcome);
    }
}

fn readiness_reading(ready: usize, of: usize, why: &[String]) -> super::model::GateReading {
    super::model::GateReading {
        gate: "readiness".to_owned(),
        value: ready as f64,
        baseline: f64::NAN,
        limit: of as f64,
        verdict: if ready == of { gates::PASS } else { gates::FAIL }.to_owned(),
        detail: if why.is_empty() { format!("{ready} of {of} replicas ready") } else { why.join("; ") },
    }
}

fn names(replicas: &[Replica]) -> String {
    replicas.iter().map(|r| format!("{}@{}", r.container, r.node)).collect::<Vec<_>>().join(", ")
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
