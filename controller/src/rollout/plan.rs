//! The planner: a spec, the deployment as it stands and the fleet as the
//! controller sees it in, a [`Plan`] (or the reason there is none) out. Pure:
//! `flotctl deploy plan` shows exactly what `apply` would run.
//!
//! One replica of a revision per node. A new replica starts beside the old one
//! (a surge) only when the node has `runtime.gpus` GPUs that no replica holds
//! and, with `runtime.gpu_memory`, that much VRAM free on each. When any node
//! lacks them the whole rollout goes retire-first: `max_unavailable` replicas
//! at a time (one for blue-green and canary) lose their traffic, are drained
//! and stopped, and their replacement takes their GPUs. Waiting for a spare
//! GPU that will never come is the deadlock of rune#250.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_common::command::{GatewayWeights, WeightedServer};

use super::model::{Action, Deployment, Plan, Replica, Step};
use super::spec::{DeploymentSpec, StrategyKind};

/// The node label that says which address the gateway reaches a node on.
pub const ADDRESS_LABEL: &str = "address";
/// The address used when a node has no such label (gateway and replicas on one host).
pub const DEFAULT_ADDRESS: &str = "127.0.0.1";

/// What the planner knows of one node.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeFacts {
    pub connected: bool,
    pub labels: BTreeMap<String, String>,
    pub gpus: Vec<GpuFacts>,
    /// The agent has the `[gateway]` role (nginx).
    pub gateway: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct GpuFacts {
    pub index: u32,
    pub memory_total_bytes: u64,
    /// From the newest telemetry; `None` when there is none.
    pub memory_used_bytes: Option<u64>,
}

/// The fleet as the planner sees it.
#[derive(Debug, Clone, Default)]
pub struct Fleet {
    pub nodes: BTreeMap<String, NodeFacts>,
    /// GPUs held by replicas of every deployment, per node.
    pub held_gpus: BTreeMap<String, BTreeSet<u32>>,
}

/// Why no plan can be made; nothing has started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct PlanError(pub Vec<String>);

/// A plan with what it places.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub plan: Plan,
    /// The replicas of the new revision.
    pub new_replicas: Vec<Replica>,
}

/// Plans the rollout of `spec` as revision `to` of `deployment`.
pub fn plan_update(
    deployment: &Deployment,
    spec: &DeploymentSpec,
    to: u32,
    fleet: &Fleet,
) -> Result<Planned, PlanError> {
    let mut bad = Vec::new();
    check_gateway(spec, fleet, &mut bad);
    let targets = choose_nodes(deployment, spec, fleet, &mut bad);
    // The gateway tells replicas apart by address and port: two nodes the gateway
    // reaches at one address would be one server.
    let mut by_address: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for node in &targets {
        by_address.entry(address_of(node, fleet)).or_default().push(node);
    }
    for (address, nodes) in &by_address {
        if nodes.len() > 1 {
            bad.push(format!(
                "nodes {} are all reached at {address}: give each node its own `{ADDRESS_LABEL}` label \
                 ([labels] {ADDRESS_LABEL} = \"10.0.0.5\" in its agent config)",
                nodes.join(", ")
            ));
        }
    }
    if !bad.is_empty() {
        return Err(PlanError(bad));
    }
    let old: Vec<Replica> = deployment.active.map(|a| deployment.replicas_of(a).cloned().collect()).unwrap_or_default();
    let need = spec.runtime.gpus as usize;
    let mut surge = true;
    let mut short = Vec::new();
    let mut free_by_node = BTreeMap::new();
    for node in &targets {
        let free = free_gpus(node, spec, fleet);
        let has_old = old.iter().any(|r| &r.node == node);
        if free.len() < need {
            if has_old {
                surge = false;
                short.push(node.clone());
            } else {
                bad.push(format!(
                    "node {node} has {} free GPU(s){} for a new replica, which needs {need}",
                    free.len(),
                    memory_note(spec)
                ));
            }
        }
        free_by_node.insert(node.clone(), free);
    }
    if !bad.is_empty() {
        return Err(PlanError(bad));
    }
    let mut notes = Vec::new();
    let new_replicas: Vec<Replica> = targets
        .iter()
        .map(|node| {
            let old_here = old.iter().find(|r| &r.node == node);
            let gpus = if surge || old_here.is_none() {
                free_by_node.get(node).map(|f| f.iter().take(need).copied().collect()).unwrap_or_default()
            } else {
                old_here.map(|r| r.gpus.clone()).unwrap_or_default()
            };
            let taken: BTreeSet<u16> =
                deployment.replicas.iter().filter(|r| &r.node == node).map(|r| r.host_port).collect();
            let host_port = if taken.contains(&spec.runtime.host_port) {
                spec.runtime.host_port + 1
            } else {
                spec.runtime.host_port
            };
            Replica {
                node: node.clone(),
                revision: to,
                container: format!("{}-{to}", spec.name),
                gpus,
                address: address_of(node, fleet),
                host_port,
            }
        })
        .collect();
    let specs = |rs: &[Replica]| rs.iter().map(|r| container_spec(spec, r)).collect::<Vec<_>>();
    let bake_ms = duration_ms(spec.strategy.bake);
    let upstream = &spec.gateway.upstream;
    let mut steps = Vec::new();
    let strategy;
    if old.is_empty() {
        strategy = "initial".to_owned();
        notes.push("no revision is serving: start every replica, then send all traffic to them".to_owned());
        steps.push(start(&new_replicas, specs(&new_replicas)));
        steps.push(traffic(upstream, &[], &new_replicas, 100, 0));
    } else if !surge {
        strategy = "retire-first".to_owned();
        let batch = match spec.strategy.kind {
            StrategyKind::Rolling => spec.strategy.max_unavailable as usize,
            _ => 1,
        };
        let total = new_replicas.len().max(old.len());
        notes.push(format!(
            "no spare GPU{} on {} for a replica beside the running one: {} replaced by retire-first, {batch} at a time; \
             serving capacity dips to {} of {total} replicas during each replacement",
            memory_note(spec),
            short.join(", "),
            spec.strategy.kind.as_str(),
            total.saturating_sub(batch)
        ));
        retire_first(&mut steps, upstream, &old, &new_replicas, batch, bake_ms, &specs);
    } else {
        strategy = spec.strategy.kind.as_str().to_owned();
        notes.push("spare GPUs on every node: new replicas start beside the old ones; no capacity dip".to_owned());
        match spec.strategy.kind {
            StrategyKind::BlueGreen => {
                steps.push(start(&new_replicas, specs(&new_replicas)));
                for share in spec.strategy.traffic_steps() {
                    steps.push(traffic(upstream, &old, &new_replicas, share, bake_ms));
                }
                steps.push(retire(&old));
            }
            StrategyKind::Canary => {
                let n = (spec.strategy.canary as usize).min(new_replicas.len());
                let (canaries, rest) = new_replicas.split_at(n);
                steps.push(start(canaries, specs(canaries)));
                for share in spec.strategy.traffic_steps() {
                    steps.push(traffic(upstream, &old, canaries, share, bake_ms));
                }
                if !spec.strategy.auto_promote {
                    steps.push(Step {
                        action: Action::AwaitPromotion,
                        label: "wait for promotion (flotctl rollout resume)".to_owned(),
                    });
                }
                if !rest.is_empty() {
                    steps.push(start(rest, specs(rest)));
                }
                steps.push(traffic(upstream, &old, &new_replicas, 100, bake_ms));
                steps.push(retire(&old));
            }
            StrategyKind::Rolling => {
                let batch = spec.strategy.max_surge as usize;
                let mut done: Vec<Replica> = Vec::new();
                for chunk in new_replicas.chunks(batch.max(1)) {
                    steps.push(start(chunk, specs(chunk)));
                    done.extend(chunk.iter().cloned());
                    let nodes: BTreeSet<&str> = done.iter().map(|r| r.node.as_str()).collect();
                    let (gone, staying): (Vec<Replica>, Vec<Replica>) =
                        old.iter().cloned().partition(|r| nodes.contains(r.node.as_str()));
                    steps.push(equal_traffic(upstream, &staying, &done, bake_ms));
                    let chunk_nodes: BTreeSet<&str> = chunk.iter().map(|r| r.node.as_str()).collect();
                    let now_gone: Vec<Replica> =
                        gone.into_iter().filter(|r| chunk_nodes.contains(r.node.as_str())).collect();
                    if !now_gone.is_empty() {
                        steps.push(retire(&now_gone));
                    }
                }
            }
        }
    }
    // Rolling and retire-first replace node by node; old replicas on nodes the
    // new placement no longer uses lose their traffic and go last.
    let placed: BTreeSet<&str> = new_replicas.iter().map(|r| r.node.as_str()).collect();
    let leftover: Vec<Replica> = old.iter().filter(|r| !placed.contains(r.node.as_str())).cloned().collect();
    if !leftover.is_empty() && (strategy == "rolling" || strategy == "retire-first") {
        steps.push(traffic(upstream, &[], &new_replicas, 100, 0));
        steps.push(retire(&leftover));
    }
    notes.push(format!(
        "{} step(s); gates watch each traffic step for {}",
        steps.len(),
        humantime::format_duration(spec.strategy.bake)
    ));
    Ok(Planned { plan: Plan { strategy, steps, notes }, new_replicas })
}

/// The way back from `to` to `from`: traffic to the old replicas still running
/// first, then the new ones drained and stopped, then any old replica that was
/// retired started again and given its traffic back. No canary phase, no bake.
pub fn plan_revert(
    deployment: &Deployment,
    from_spec: Option<&DeploymentSpec>,
    from_retired: &[Replica],
    to: u32,
) -> Plan {
    let upstream_spec = from_spec;
    let running_old: Vec<Replica> = match (deployment.active, from_spec) {
        (Some(a), Some(_)) => deployment.replicas_of(a).cloned().collect(),
        _ => Vec::new(),
    };
    let new: Vec<Replica> = deployment.replicas_of(to).cloned().collect();
    let mut steps = Vec::new();
    let mut notes = Vec::new();
    match upstream_spec {
        None => {
            notes.push("no earlier revision to go back to: the new replicas are stopped".to_owned());
            if !new.is_empty() {
                steps.push(retire(&new));
            }
        }
        Some(spec) => {
            let upstream = &spec.gateway.upstream;
            if !running_old.is_empty() {
                steps.push(traffic(upstream, &[], &running_old, 100, 0));
            }
            if !new.is_empty() {
                steps.push(retire(&new));
            }
            if !from_retired.is_empty() {
                let specs = from_retired.iter().map(|r| container_spec(spec, r)).collect();
                steps.push(start(from_retired, specs));
                let all: Vec<Replica> = running_old.iter().chain(from_retired).cloned().collect();
                steps.push(traffic(upstream, &[], &all, 100, 0));
            }
            notes.push("revert: traffic back to the old replicas first, then the new ones stopped".to_owned());
        }
    }
    Plan { strategy: "revert".to_owned(), steps, notes }
}

fn check_gateway(spec: &DeploymentSpec, fleet: &Fleet, bad: &mut Vec<String>) {
    match fleet.nodes.get(&spec.gateway.node) {
        None => bad.push(format!("gateway.node {}: no such node (flotctl nodes ls)", spec.gateway.node)),
        Some(n) if !n.gateway => bad.push(format!(
            "gateway.node {}: that agent has no [gateway] section, so it has no nginx to shift traffic with",
            spec.gateway.node
        )),
        Some(n) if !n.connected => bad.push(format!("gateway.node {}: not connected", spec.gateway.node)),
        Some(_) => {}
    }
}

fn choose_nodes(deployment: &Deployment, spec: &DeploymentSpec, fleet: &Fleet, bad: &mut Vec<String>) -> Vec<String> {
    let p = &spec.placement;
    let mut candidates: Vec<String> = Vec::new();
    if p.nodes.is_empty() {
        for (id, n) in &fleet.nodes {
            if p.selector.iter().all(|(k, v)| n.labels.get(k) == Some(v)) {
                candidates.push(id.clone());
            }
        }
    } else {
        for id in &p.nodes {
            if fleet.nodes.contains_key(id) {
                candidates.push(id.clone());
            } else {
                bad.push(format!("placement.nodes: no node {id} (flotctl nodes ls lists the fleet)"));
            }
        }
    }
    let mut usable = Vec::new();
    for id in candidates {
        let Some(n) = fleet.nodes.get(&id) else { continue };
        if (n.gpus.len() as u64) < u64::from(spec.runtime.gpus) {
            bad.push(format!("node {id} has {} GPU(s); a replica needs {}", n.gpus.len(), spec.runtime.gpus));
        } else if !n.connected {
            if !p.nodes.is_empty() {
                bad.push(format!("node {id} is not connected"));
            }
        } else {
            usable.push(id);
        }
    }
    // Nodes that serve the deployment now come first, so replicas stay where they are.
    let serving: BTreeSet<&str> = deployment.replicas.iter().map(|r| r.node.as_str()).collect();
    usable.sort_by_key(|id| !serving.contains(id.as_str()));
    let want = p.replicas as usize;
    if bad.is_empty() && usable.len() < want {
        bad.push(format!(
            "placement: {want} replica(s) need {want} connected node(s){}, {} found",
            if p.selector.is_empty() { String::new() } else { format!(" matching {:?}", p.selector) },
            usable.len()
        ));
    }
    usable.truncate(want);
    usable
}

fn free_gpus(node: &str, spec: &DeploymentSpec, fleet: &Fleet) -> Vec<u32> {
    let Some(n) = fleet.nodes.get(node) else { return Vec::new() };
    let held = fleet.held_gpus.get(node);
    n.gpus
        .iter()
        .filter(|g| !held.is_some_and(|h| h.contains(&g.index)))
        .filter(|g| match (spec.runtime.gpu_memory, g.memory_used_bytes) {
            (Some(want), Some(used)) => g.memory_total_bytes.saturating_sub(used) >= want,
            (Some(want), None) => g.memory_total_bytes >= want,
            (None, _) => true,
        })
        .map(|g| g.index)
        .collect()
}

fn memory_note(spec: &DeploymentSpec) -> String {
    spec.runtime.gpu_memory.map(|m| format!(" with {} free", bytes_text(m))).unwrap_or_default()
}

fn bytes_text(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30))
}

fn address_of(node: &str, fleet: &Fleet) -> String {
    fleet
        .nodes
        .get(node)
        .and_then(|n| n.labels.get(ADDRESS_LABEL))
        .cloned()
        .unwrap_or_else(|| DEFAULT_ADDRESS.to_owned())
}

fn duration_ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn names(rs: &[Replica]) -> String {
    rs.iter().map(|r| format!("{}@{}", r.container, r.node)).collect::<Vec<_>>().join(", ")
}

fn start(replicas: &[Replica], specs: Vec<String>) -> Step {
    Step { label: format!("start {}", names(replicas)), action: Action::Start { replicas: replicas.to_vec(), specs } }
}

fn retire(replicas: &[Replica]) -> Step {
    Step {
        label: format!("drain and stop {}", names(replicas)),
        action: Action::Retire { replicas: replicas.to_vec() },
    }
}

/// `share` % of requests to `new`, the rest to `old`, each group split evenly.
fn traffic(upstream: &str, old: &[Replica], new: &[Replica], share: u8, bake_ms: u64) -> Step {
    let (old_w, new_w) = split(old.len(), new.len(), share);
    let mut servers: Vec<WeightedServer> = Vec::new();
    if share < 100 {
        servers.extend(old.iter().map(|r| WeightedServer { address: r.server(), weight: old_w }));
    }
    if share > 0 {
        servers.extend(new.iter().map(|r| WeightedServer { address: r.server(), weight: new_w }));
    }
    let revision = new.first().map(|r| r.revision).unwrap_or_default();
    Step {
        label: format!("traffic {share} % to revision {revision}"),
        action: Action::Traffic {
            weights: GatewayWeights { upstream: upstream.to_owned(), servers },
            new_share: share,
            bake_ms,
        },
    }
}

/// Every listed replica gets the same share; `old` ones first.
fn equal_traffic(upstream: &str, old: &[Replica], new: &[Replica], bake_ms: u64) -> Step {
    let total = old.len() + new.len();
    let share = (new.len() * 100).checked_div(total).map_or(0, |s| s as u8);
    let servers = old.iter().chain(new).map(|r| WeightedServer { address: r.server(), weight: 1 }).collect();
    let revision = new.first().map(|r| r.revision).unwrap_or_default();
    Step {
        label: format!("traffic {share} % to revision {revision} ({} of {total} replicas)", new.len()),
        action: Action::Traffic {
            weights: GatewayWeights { upstream: upstream.to_owned(), servers },
            new_share: share,
            bake_ms,
        },
    }
}

/// Per-server weights (old, new) so that the new servers together take `share` %.
fn split(old: usize, new: usize, share: u8) -> (u8, u8) {
    if old == 0 || new == 0 {
        return (1, 1);
    }
    let mut o = u64::from(100 - share.min(100)) * new as u64;
    let mut n = u64::from(share.min(100)) * old as u64;
    let g = gcd(o, n).max(1);
    o /= g;
    n /= g;
    let top = o.max(n);
    if top > 100 {
        // Scale into nginx's range; a share that rounds to nothing keeps weight 1.
        o = (o * 100).div_ceil(top).max(u64::from(o > 0));
        n = (n * 100).div_ceil(top).max(u64::from(n > 0));
    }
    (u8::try_from(o).unwrap_or(100), u8::try_from(n).unwrap_or(100))
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[allow(clippy::too_many_arguments)]
fn retire_first(
    steps: &mut Vec<Step>,
    upstream: &str,
    old: &[Replica],
    new: &[Replica],
    batch: usize,
    bake_ms: u64,
    specs: &dyn Fn(&[Replica]) -> Vec<String>,
) {
    let mut done: Vec<Replica> = Vec::new();
    for chunk in new.chunks(batch.max(1)) {
        let chunk_nodes: BTreeSet<&str> = chunk.iter().map(|r| r.node.as_str()).collect();
        let done_nodes: BTreeSet<&str> = done.iter().map(|r| r.node.as_str()).collect();
        let (going, staying): (Vec<Replica>, Vec<Replica>) = old
            .iter()
            .filter(|r| !done_nodes.contains(r.node.as_str()))
            .cloned()
            .partition(|r| chunk_nodes.contains(r.node.as_str()));
        if !going.is_empty() {
            if !(staying.is_empty() && done.is_empty()) {
                let mut s = equal_traffic(upstream, &staying, &done, 0);
                s.label = format!("take traffic off {}", names(&going));
                steps.push(s);
            }
            steps.push(retire(&going));
        }
        steps.push(start(chunk, specs(chunk)));
        done.extend(chunk.iter().cloned());
        steps.push(equal_traffic(upstream, &staying, &done, bake_ms));
    }
}

/// The container spec (JSON, which the agent reads as YAML) for one replica.
pub fn container_spec(spec: &DeploymentSpec, replica: &Replica) -> String {
    let rt = &spec.runtime;
    let mut labels = serde_json::Map::new();
    labels.insert("model".into(), spec.model.name.clone().into());
    if let Some(rev) = &spec.model.revision {
        labels.insert("model-revision".into(), rev.clone().into());
    }
    let mut value = serde_json::json!({
        "name": spec.name,
        "revision": replica.revision.to_string(),
        "image": rt.image,
        "env": rt.env,
        "ports": [{ "container": rt.port, "host": replica.host_port, "host_ip": replica.address }],
        "gpus": replica.gpus,
        "restart": "unless-stopped",
        "labels": labels,
        "inference": { "port": rt.port },
    });
    if let Some(obj) = value.as_object_mut() {
        if let Some(c) = &rt.command {
            obj.insert("command".into(), c.clone().into());
        }
        if let Some(a) = &rt.args {
            obj.insert("args".into(), a.clone().into());
        }
        if let Some(h) = &rt.health {
            obj.insert("health".into(), h.0.clone());
        }
        if let Some(s) = &rt.shm_size {
            obj.insert("shm_size".into(), s.clone().into());
        }
        if let Some(engine) = &rt.engine
            && let Some(inf) = obj.get_mut("inference").and_then(|v| v.as_object_mut())
        {
            inf.insert("engine".into(), engine.clone().into());
        }
        if let Some(path) = &spec.model.path {
            obj.insert("volumes".into(), serde_json::json!([{ "host": path, "container": "/model" }]));
        }
    }
    value.to_string()
}
