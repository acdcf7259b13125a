//! A deployment spec as `Fleet.ApplyDeployment` reads it: first as plain YAML
//! for the audit record's name, then parsed and validated; an accepted spec is
//! planned onto a small fleet, and every container spec the plan would send is
//! read as the agent reads it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use flotilla_common::model::GpuInfo;
use flotilla_controller::rollout::model::{Action, Deployment};
use flotilla_controller::rollout::plan::{self, Fleet, GpuFacts, NodeFacts};
use flotilla_controller::rollout::spec::DeploymentSpec;

/// Four GPU nodes (pool a100, four 80 GiB GPUs each, one `address` each) and a
/// gateway, named as in `deploy/examples/`.
fn fleet() -> &'static Fleet {
    static FLEET: OnceLock<Fleet> = OnceLock::new();
    FLEET.get_or_init(|| {
        let mut nodes = BTreeMap::new();
        for n in 1..=4u32 {
            let labels = BTreeMap::from([
                ("pool".to_owned(), "a100".to_owned()),
                (plan::ADDRESS_LABEL.to_owned(), format!("10.0.0.{n}")),
            ]);
            let gpus = (0..4)
                .map(|index| GpuFacts { index, memory_total_bytes: 80 << 30, memory_used_bytes: Some(1 << 30) })
                .collect();
            nodes.insert(format!("gpu-{n:02}"), NodeFacts { connected: true, labels, gpus, gateway: false });
        }
        nodes.insert("gw-01".to_owned(), NodeFacts { connected: true, gateway: true, ..NodeFacts::default() });
        Fleet { nodes, held_gpus: BTreeMap::<String, BTreeSet<u32>>::new() }
    })
}

fn gpus_of(node: &str) -> Vec<GpuInfo> {
    let count = fleet().nodes.get(node).map_or(0, |n| n.gpus.len() as u32);
    (0..count)
        .map(|index| GpuInfo {
            index,
            uuid: format!("GPU-{index:08x}"),
            model: "NVIDIA A100 80GB".into(),
            memory_total_bytes: 80 << 30,
        })
        .collect()
}

pub fn run(data: &[u8]) {
    let text = super::text(data);
    // ApplyDeployment reads the name for the audit record before validating.
    let _ = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text)
        .ok()
        .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_owned));
    let Ok(spec) = DeploymentSpec::parse(&text) else { return };
    let _ = spec.strategy.traffic_steps();
    assert!(spec.same_workload(&spec));
    // Known gap, reported: the controller passes `runtime.shm_size` and
    // `runtime.health` to the agent unchecked, and the agent parses them with its
    // own grammar (`ByteSize`, `HealthCheck`), so a spec setting either can be
    // planned and then refused on every node. Until those checks are shared (as
    // the image reference check now is), agreement is asserted without them.
    let agreement = spec.runtime.shm_size.is_none() && spec.runtime.health.is_none();
    let deployment = Deployment::new(&spec.name);
    let Ok(planned) = plan::plan_update(&deployment, &spec, 1, fleet()) else { return };
    for step in &planned.plan.steps {
        match &step.action {
            Action::Start { replicas, specs } if agreement => {
                for (replica, text) in replicas.iter().zip(specs) {
                    // What the controller sends, the agent must read and accept.
                    let container = flotilla_agent::runtime::ContainerSpec::from_yaml(text)
                        .unwrap_or_else(|e| panic!("the agent cannot read a planned container spec: {e}\n{text}"));
                    if let Err(e) = container.validate(&gpus_of(&replica.node)) {
                        panic!("the agent refuses a planned container spec: {e}\n{text}");
                    }
                }
            }
            Action::Traffic { weights, .. } => {
                if let Err(e) = weights.validate() {
                    panic!("a planned traffic step has weights the gateway refuses: {e}");
                }
            }
            Action::Start { .. } | Action::Retire { .. } | Action::AwaitPromotion => {}
        }
    }
}
