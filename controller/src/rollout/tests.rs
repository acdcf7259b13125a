//! The pure core, exhaustively: plans for each strategy and the retire-first
//! fallback, the machine walking them with simulated observations and command
//! results, the health gates turning a rollout back, deadlines, operator
//! requests, and the stored form surviving a round trip.

use flotilla_common::command::{Command, CommandStatus};
use flotilla_common::model::Container;

use super::machine::{self, Request};
use super::model::{
    Action, Deployment, Issued, IssuedResult, Phase, Plan, Revision, RevisionOutcome, Rollout, RolloutState,
};
use super::observe::Observation;
use super::plan::{self, Fleet, GpuFacts, NodeFacts};
use super::spec::DeploymentSpec;

const GIB: u64 = 1 << 30;

fn spec(extra: &str) -> DeploymentSpec {
    let text = format!(
        "name: llama\nmodel: {{ name: llama-8b }}\nruntime: {{ image: 'vllm:1', port: 8000, host_port: 18000, gpus: 1 }}\n\
         placement: {{ nodes: [a, b, c], replicas: 3 }}\ngateway: {{ node: gw, upstream: llama }}\n{extra}"
    );
    DeploymentSpec::parse(&text).unwrap()
}

fn fleet(gpus_per_node: u32, used_fraction: f64) -> Fleet {
    let mut f = Fleet::default();
    for (i, n) in ["a", "b", "c"].into_iter().enumerate() {
        let gpus = (0..gpus_per_node)
            .map(|i| GpuFacts {
                index: i,
                memory_total_bytes: 80 * GIB,
                memory_used_bytes: Some((80.0 * GIB as f64 * used_fraction) as u64),
            })
            .collect();
        let labels = [(plan::ADDRESS_LABEL.to_owned(), format!("10.0.0.{}", i + 1))].into();
        f.nodes.insert(n.into(), NodeFacts { connected: true, labels, gpus, gateway: false });
    }
    f.nodes.insert("gw".into(), NodeFacts { connected: true, gateway: true, ..Default::default() });
    f
}

/// A deployment serving revision 1 on a, b, c (GPU 0 each), with revision 2 applied.
fn serving(fleet: &mut Fleet, s2: &DeploymentSpec) -> Deployment {
    let s1 = spec("");
    let mut dep = Deployment::new("llama");
    let planned = plan::plan_update(&dep, &s1, 1, fleet).unwrap();
    dep.replicas = planned.new_replicas;
    dep.active = Some(1);
    for (n, s) in [(1, s1), (2, s2.clone())] {
        dep.revisions.push(Revision {
            number: n,
            spec: s,
            spec_yaml: String::new(),
            applied_unix_ms: 0,
            applied_by: "t".into(),
            outcome: (n == 1).then_some(RevisionOutcome::Stable),
        });
    }
    for r in &dep.replicas {
        fleet.held_gpus.entry(r.node.clone()).or_default().extend(r.gpus.iter().copied());
    }
    dep
}

fn rollout(dep: &mut Deployment, s: &DeploymentSpec, plan: Plan) -> Rollout {
    dep.rollouts += 1;
    dep.current_rollout = Some(dep.rollouts);
    Rollout {
        deployment: dep.name.clone(),
        number: dep.rollouts,
        from: dep.active,
        to: 2,
        started_by: "t".into(),
        trigger: "apply".into(),
        plan,
        revert: None,
        state: RolloutState::Progressing,
        step: 0,
        phase: Phase::Ready,
        started_unix_ms: 0,
        step_started_unix_ms: 0,
        finished_unix_ms: None,
        strategy: s.strategy.clone(),
        gates: s.gates.clone(),
        readings: Vec::new(),
        events: Vec::new(),
        error: None,
        weights: None,
        share: 0,
        gateway_node: s.gateway.node.clone(),
        retired: Vec::new(),
    }
}

/// A simulated fleet: runs each command at once and keeps the containers.
struct World {
    obs: Observation,
    ids: u64,
    executed: Vec<(String, String)>,
    /// Containers that never become healthy.
    broken: Vec<String>,
}

impl World {
    fn new(dep: &Deployment) -> Self {
        let mut obs = Observation::default();
        for n in ["a", "b", "c", "gw"] {
            obs.connected.insert(n.into());
            obs.containers.insert(n.into(), Vec::new());
        }
        for r in &dep.replicas {
            Self::run_container(&mut obs, &r.node, &r.container);
        }
        Self { obs, ids: 0, executed: Vec::new(), broken: Vec::new() }
    }

    fn run_container(obs: &mut Observation, node: &str, name: &str) {
        let list = obs.containers.entry(node.into()).or_default();
        list.retain(|c| c.name != name);
        list.push(Container { name: name.into(), state: "running".into(), ..Default::default() });
        obs.ready.insert((node.into(), name.into()), true);
    }

    fn execute(&mut self, i: &Issued) -> IssuedResult {
        self.executed.push((i.node.clone(), i.command.name().to_owned()));
        match &i.command {
            Command::Deploy { spec_yaml } => {
                let v: serde_json::Value = serde_json::from_str(spec_yaml).unwrap();
                let name = format!("{}-{}", v["name"].as_str().unwrap(), v["revision"].as_str().unwrap());
                Self::run_container(&mut self.obs, &i.node, &name);
                if self.broken.contains(&name) {
                    self.obs.ready.insert((i.node.clone(), name), false);
                }
            }
            Command::Drain { container, .. } => {
                if let Some(list) = self.obs.containers.get_mut(&i.node) {
                    for c in list.iter_mut().filter(|c| &c.name == container) {
                        c.state = "exited".into();
                    }
                }
            }
            _ => {}
        }
        IssuedResult { status: CommandStatus::Succeeded, detail: String::new() }
    }

    /// Advances the rollout at `now`, executing every issued command at once.
    fn run(&mut self, dep: &mut Deployment, r: &mut Rollout, now: i64) {
        for _ in 0..20 {
            let mut counter = self.ids;
            let issued = machine::advance(dep, r, &self.obs, now, &mut || {
                counter += 1;
                format!("id-{counter}")
            });
            self.ids = counter;
            if issued.is_empty() {
                return;
            }
            let results: Vec<IssuedResult> = issued.iter().map(|i| self.execute(i)).collect();
            if let Phase::Acting { issued: list } = &mut r.phase {
                for (i, res) in list.iter_mut().zip(results) {
                    i.result = Some(res);
                }
            }
        }
    }

    fn traffic(&mut self, server: &str, responses: f64, errors: f64) {
        let c = self.obs.counters.servers.entry(server.into()).or_default();
        c.responses += responses;
        c.errors += errors;
    }
}

fn kinds(plan: &Plan) -> Vec<String> {
    plan.steps
        .iter()
        .map(|s| match &s.action {
            Action::Start { replicas, .. } => format!("start {}", replicas.len()),
            Action::Traffic { new_share, .. } => format!("traffic {new_share}"),
            Action::Retire { replicas } => format!("retire {}", replicas.len()),
            Action::AwaitPromotion => "await".into(),
        })
        .collect()
}

#[test]
fn blue_green_with_spare_gpus_starts_green_beside_blue_and_steps_traffic() {
    let s2 = spec("strategy: { type: blue-green, bake: 10s, min_healthy_time: 2s }\n");
    let mut f = fleet(2, 0.1);
    let dep = serving(&mut f, &s2);
    let p = plan::plan_update(&dep, &s2, 2, &f).unwrap();
    assert_eq!(p.plan.strategy, "blue-green");
    assert_eq!(kinds(&p.plan), ["start 3", "traffic 10", "traffic 50", "traffic 100", "retire 3"]);
    assert!(p.new_replicas.iter().all(|r| r.gpus == vec![1] && r.host_port == 18001), "{:?}", p.new_replicas);
    let Action::Traffic { weights, .. } = &p.plan.steps[1].action else { panic!() };
    let w: Vec<(String, u8)> = weights.servers.iter().map(|s| (s.address.clone(), s.weight)).collect();
    assert_eq!(w[0], ("10.0.0.1:18000".to_owned(), 9));
    assert_eq!(w[3], ("10.0.0.1:18001".to_owned(), 1));
    let Action::Traffic { weights, .. } = &p.plan.steps[3].action else { panic!() };
    assert!(weights.servers.iter().all(|s| s.address.ends_with(":18001")), "blue leaves the upstream at 100 %");
}

#[test]
fn a_blue_green_rollout_runs_to_the_end_and_blue_is_stopped_last() {
    let s2 = spec("strategy: { type: blue-green, bake: 10s, min_healthy_time: 2s }\n");
    let mut f = fleet(2, 0.1);
    let mut dep = serving(&mut f, &s2);
    let p = plan::plan_update(&dep, &s2, 2, &f).unwrap();
    let mut r = rollout(&mut dep, &s2, p.plan);
    let mut w = World::new(&dep);
    w.run(&mut dep, &mut r, 0);
    assert!(matches!(r.phase, Phase::Settling { .. }), "{:?}", r.phase);
    assert_eq!(w.executed.iter().filter(|(_, c)| c == "deploy").count(), 3);
    w.run(&mut dep, &mut r, 1_000);
    w.run(&mut dep, &mut r, 3_000);
    assert!(matches!(r.phase, Phase::Baking { .. }), "healthy for 2 s, then 10 %: {:?}", r.phase);
    assert_eq!(r.share, 10);
    for t in [13_000, 23_000, 33_000] {
        assert!(!w.executed.iter().any(|(_, c)| c == "drain"), "no blue replica stops before the last bake");
        w.run(&mut dep, &mut r, t);
    }
    assert_eq!(r.state, RolloutState::Succeeded, "{:?}", r.events);
    assert_eq!(dep.active, Some(2));
    assert_eq!(dep.current_rollout, None);
    assert!(dep.replicas.iter().all(|x| x.revision == 2) && dep.replicas.len() == 3);
    assert_eq!(dep.revision(2).unwrap().outcome, Some(RevisionOutcome::Stable));
    assert_eq!(w.executed.iter().filter(|(_, c)| c == "drain").count(), 3);
    assert_eq!(w.executed.iter().filter(|(n, c)| n == "gw" && c == "gateway-set").count(), 3);
}

#[test]
fn a_failed_error_gate_sends_traffic_back_to_blue_before_green_stops() {
    let s2 = spec("strategy: { type: blue-green, bake: 60s, min_healthy_time: 1s }\n");
    let mut f = fleet(2, 0.1);
    let mut dep = serving(&mut f, &s2);
    let p = plan::plan_update(&dep, &s2, 2, &f).unwrap();
    let mut r = rollout(&mut dep, &s2, p.plan);
    let mut w = World::new(&dep);
    w.run(&mut dep, &mut r, 0);
    w.run(&mut dep, &mut r, 1_000);
    w.run(&mut dep, &mut r, 2_000);
    assert!(matches!(r.phase, Phase::Baking { .. }));
    let executed_before = w.executed.len();
    w.traffic("10.0.0.1:18000", 900.0, 0.0);
    w.traffic("10.0.0.1:18001", 100.0, 30.0);
    w.run(&mut dep, &mut r, 5_000);
    assert_eq!(r.state, RolloutState::RolledBack, "{:?}", r.events);
    assert!(r.error.as_deref().unwrap().contains("error_ratio"), "{:?}", r.error);
    let after: Vec<&str> = w.executed[executed_before..].iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(after, ["gateway-set", "drain", "drain", "drain"], "traffic back first, then green stopped");
    let weights = r.weights.as_ref().unwrap();
    assert!(weights.servers.iter().all(|s| s.address.ends_with(":18000")), "100 % on blue: {weights:?}");
    assert_eq!(dep.active, Some(1));
    assert!(dep.replicas.iter().all(|x| x.revision == 1));
    assert_eq!(dep.revision(2).unwrap().outcome, Some(RevisionOutcome::Failed));
}

#[test]
fn a_canary_that_never_becomes_healthy_fails_at_its_deadline_and_the_revert_has_no_canary_phase() {
    let s2 = spec("strategy: { type: canary, canary: 1, bake: 10s, min_healthy_time: 1s, healthy_deadline: 30s }\n");
    let mut f = fleet(2, 0.1);
    let mut dep = serving(&mut f, &s2);
    let p = plan::plan_update(&dep, &s2, 2, &f).unwrap();
    assert_eq!(kinds(&p.plan), ["start 1", "traffic 10", "start 2", "traffic 100", "retire 3"]);
    let mut r = rollout(&mut dep, &s2, p.plan);
    let mut w = World::new(&dep);
    w.broken.push("llama-2".into());
    w.run(&mut dep, &mut r, 0);
    w.run(&mut dep, &mut r, 29_000);
    assert_eq!(r.state, RolloutState::Progressing);
    assert_eq!(r.readings[0].gate, "readiness");
    w.run(&mut dep, &mut r, 31_000);
    assert_eq!(r.state, RolloutState::RolledBack, "{:?}", r.events);
    let (_, revert) = r.revert.as_ref().unwrap();
    assert_eq!(revert.strategy, "revert");
    assert_eq!(kinds(revert), ["traffic 100", "retire 1"]);
    assert_eq!(w.executed.iter().filter(|(_, c)| c == "drain").count(), 1, "only the canary is stopped");
}

#[test]
fn without_spare_gpu_memory_a_rolling_update_retires_first_one_at_a_time() {
    let mut s2 = spec("strategy: { type: rolling, bake: 5s, min_healthy_time: 1s }\n");
    s2.runtime.gpu_memory = Some(40 * GIB);
    let mut f = fleet(2, 0.9);
    let mut dep = serving(&mut f, &s2);
    let p = plan::plan_update(&dep, &s2, 2, &f).unwrap();
    assert_eq!(p.plan.strategy, "retire-first");
    assert!(p.plan.notes[0].contains("no spare GPU with 40.0 GiB free"), "{:?}", p.plan.notes);
    assert!(p.plan.notes[0].contains("2 of 3 replicas"), "{:?}", p.plan.notes);
    assert_eq!(
        kinds(&p.plan),
        [
            "traffic 0", // take a's old replica out of the upstream (b and c serve)
            "retire 1",
            "start 1",
            "traffic 33", // a's new replica joins: 1 of 3
            "traffic 50", // b's old one leaves: a new + c old
            "retire 1",
            "start 1",
            "traffic 66",
            "traffic 100", // c's old one leaves
            "retire 1",
            "start 1",
            "traffic 100"
        ]
    );
    assert!(p.new_replicas.iter().all(|r| r.gpus == vec![0]), "replacements take the retired replica's GPU");
    let mut r = rollout(&mut dep, &s2, p.plan);
    let mut w = World::new(&dep);
    let mut t = 0;
    while r.state == RolloutState::Progressing && t < 200_000 {
        w.run(&mut dep, &mut r, t);
        let running = |obs: &Observation| obs.containers.values().flatten().filter(|c| c.state == "running").count();
        assert!(
            running(&w.obs) >= 2 || matches!(r.phase, Phase::Acting { .. }) || running(&w.obs) + 1 >= 3,
            "never more than one replica down"
        );
        t += 1_000;
    }
    assert_eq!(r.state, RolloutState::Succeeded, "{:?}", r.events);
    let order: Vec<&str> = w.executed.iter().filter(|(n, _)| n == "a").map(|(_, c)| c.as_str()).collect();
    assert_eq!(order, ["drain", "deploy"], "on node a the old replica goes before the new one starts");
}

#[test]
fn a_command_without_result_fails_at_the_progress_deadline_and_ids_survive_a_restart() {
    let s2 = spec(
        "strategy: { type: blue-green, bake: 10s, min_healthy_time: 1s, healthy_deadline: 60s, progress_deadline: 120s }\n",
    );
    let mut f = fleet(2, 0.1);
    let mut dep = serving(&mut f, &s2);
    let p = plan::plan_update(&dep, &s2, 2, &f).unwrap();
    let mut r = rollout(&mut dep, &s2, p.plan);
    let obs = World::new(&dep).obs;
    let mut n = 0;
    let issued = machine::advance(&mut dep, &mut r, &obs, 0, &mut || {
        n += 1;
        format!("id-{n}")
    });
    assert_eq!(issued.len(), 3);
    // The controller restarts: the stored rollout comes back with the same ids.
    let bytes = crate::store::codec::encode(&r).unwrap();
    let mut back: Rollout = crate::store::codec::decode(b"k", &bytes).unwrap();
    assert_eq!(back, r);
    let Phase::Acting { issued: stored } = &back.phase else { panic!() };
    assert_eq!(stored.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["id-1", "id-2", "id-3"]);
    let none = machine::advance(&mut dep, &mut back, &obs, 60_000, &mut || unreachable!("no new ids while waiting"));
    assert!(none.is_empty());
    machine::advance(&mut dep, &mut back, &obs, 121_000, &mut || "revert-id".into());
    assert!(back.revert.is_some(), "the deadline fired");
    assert!(back.error.as_deref().unwrap().contains("progress_deadline"), "{:?}", back.error);
}

#[test]
fn operators_pause_resume_and_abort() {
    let s2 = spec("strategy: { type: blue-green, bake: 10s, min_healthy_time: 1s }\n");
    let mut f = fleet(2, 0.1);
    let mut dep = serving(&mut f, &s2);
    let p = plan::plan_update(&dep, &s2, 2, &f).unwrap();
    let mut r = rollout(&mut dep, &s2, p.plan);
    let mut w = World::new(&dep);
    w.run(&mut dep, &mut r, 0);
    machine::request(&mut dep, &mut r, Request::Pause, "op", 500).unwrap();
    assert!(machine::request(&mut dep, &mut r, Request::Pause, "op", 500).is_err());
    let before = w.executed.len();
    w.run(&mut dep, &mut r, 100_000);
    assert_eq!(w.executed.len(), before, "a paused rollout does nothing");
    machine::request(&mut dep, &mut r, Request::Resume, "op", 100_000).unwrap();
    w.run(&mut dep, &mut r, 100_000);
    w.run(&mut dep, &mut r, 102_000);
    machine::request(&mut dep, &mut r, Request::Abort, "op", 103_000).unwrap();
    w.run(&mut dep, &mut r, 103_000);
    assert_eq!(r.state, RolloutState::Aborted, "{:?}", r.events);
    assert!(machine::request(&mut dep, &mut r, Request::Resume, "op", 104_000).unwrap_err().contains("ended"));
}

#[test]
fn bad_placements_are_refused_before_anything_starts() {
    let f = fleet(1, 0.1);
    let dep = Deployment::new("llama");
    let s = DeploymentSpec::parse(
        "name: llama\nmodel: { name: m }\nruntime: { image: x, port: 1, host_port: 2, gpus: 2 }\n\
         placement: { nodes: [a, zz], replicas: 2 }\ngateway: { node: a, upstream: u }\n",
    )
    .unwrap();
    let err = plan::plan_update(&dep, &s, 1, &f).unwrap_err().to_string();
    assert!(err.contains("no node zz"), "{err}");
    assert!(err.contains("node a has 1 GPU(s); a replica needs 2"), "{err}");
    assert!(err.contains("gateway.node a: that agent has no [gateway] section"), "{err}");
    // Two nodes without an address label would be one server to the gateway.
    let mut same = fleet(1, 0.1);
    for n in same.nodes.values_mut() {
        n.labels.clear();
    }
    let mut two = spec("");
    two.placement.replicas = 2;
    two.placement.nodes.truncate(2);
    let err = plan::plan_update(&dep, &two, 1, &same).unwrap_err().to_string();
    assert!(err.contains("all reached at 127.0.0.1"), "{err}");
}

#[test]
fn deployments_survive_the_store_codec_with_health_checks_and_sizes() {
    let mut s = spec("");
    s.runtime.health = Some(super::spec::JsonValue(serde_json::json!({"command": ["probe"], "interval": "1s"})));
    s.runtime.gpu_memory = Some(40 * GIB);
    let mut f = fleet(1, 0.0);
    let mut dep = serving(&mut f, &s);
    dep.revisions[1].spec = s;
    let bytes = crate::store::codec::encode(&dep).unwrap();
    let back: Deployment = crate::store::codec::decode(b"k", &bytes).unwrap();
    assert_eq!(back, dep);
}

#[test]
fn the_example_specs_in_deploy_parse() {
    for (file, text, kind) in [
        ("blue-green.yaml", include_str!("../../../deploy/examples/blue-green.yaml"), "blue-green"),
        ("canary.yaml", include_str!("../../../deploy/examples/canary.yaml"), "canary"),
        ("rolling.yaml", include_str!("../../../deploy/examples/rolling.yaml"), "rolling"),
    ] {
        let spec = DeploymentSpec::parse(text).unwrap_or_else(|e| panic!("deploy/examples/{file}: {e}"));
        assert_eq!(spec.strategy.kind.as_str(), kind, "{file}");
    }
}

#[test]
fn a_node_away_during_a_bake_holds_it_instead_of_failing_the_revision() {
    let s2 = spec("strategy: { type: blue-green, bake: 10s, min_healthy_time: 1s }\n");
    let mut f = fleet(2, 0.1);
    let mut dep = serving(&mut f, &s2);
    let p = plan::plan_update(&dep, &s2, 2, &f).unwrap();
    let mut r = rollout(&mut dep, &s2, p.plan);
    let mut w = World::new(&dep);
    w.run(&mut dep, &mut r, 0);
    w.run(&mut dep, &mut r, 1_000);
    w.run(&mut dep, &mut r, 2_000);
    assert!(matches!(r.phase, Phase::Baking { .. }));
    // The controller restarted: no agent is back yet.
    let saved = std::mem::take(&mut w.obs.connected);
    w.run(&mut dep, &mut r, 20_000);
    assert_eq!(r.state, RolloutState::Progressing, "{:?}", r.events);
    assert!(matches!(r.phase, Phase::Baking { .. }), "the bake waits for the replicas to be seen again");
    assert_eq!(r.readings[0].verdict, machine::WAITING);
    w.obs.connected = saved;
    w.run(&mut dep, &mut r, 21_000);
    assert!(!matches!(r.phase, Phase::Baking { .. }) || r.share > 10, "{:?}", r.phase);
}
