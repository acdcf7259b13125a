//! A validated spec as the engine's create request: a pure function, so what the
//! agent asks the engine for is tested without an engine.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, DeviceRequest, HealthConfig, HostConfig, Mount, MountType, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};

use flotilla_common::NodeId;

use super::spec::{self, HealthCheck, ValidatedSpec};

/// Every label the agent sets starts with this; specs may not use it.
pub const LABEL_PREFIX: &str = "flotilla.";
/// `true` on every container the agent created: how it finds them after a restart.
pub const LABEL_MANAGED: &str = "flotilla.managed";
/// The deployment name.
pub const LABEL_DEPLOYMENT: &str = "flotilla.deployment";
/// The deployment revision.
pub const LABEL_REVISION: &str = "flotilla.revision";
/// [`ValidatedSpec::spec_hash`] of the spec the container was created from.
pub const LABEL_SPEC_HASH: &str = "flotilla.spec-hash";
/// The GPUs the spec asked for, as written (`0,1`, or UUIDs), whether or not
/// they were handed to the container ([`GpuDevices`]).
pub const LABEL_GPUS: &str = "flotilla.gpus";
/// The container port of the model server the agent scrapes (`inference.port`).
pub const LABEL_INFERENCE_PORT: &str = "flotilla.inference-port";
/// The model server's engine, when the spec names it (`inference.engine`).
pub const LABEL_INFERENCE_ENGINE: &str = "flotilla.inference-engine";
/// The node id of the agent that created the container, so that on an engine
/// several agents share each container says whose it is.
pub const LABEL_NODE: &str = "flotilla.node";

/// Whether a spec's `gpus` become a device request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuDevices {
    /// Real GPUs: the NVIDIA container toolkit hands them to the container.
    #[default]
    Nvidia,
    /// Simulated GPUs (`[gpu] source = "simulated"`): the request is checked and
    /// labelled, but no device is asked for, since such a host has no NVIDIA
    /// runtime and the engine would refuse to start the container.
    Bookkeeping,
}

/// The labels the agent on `node` puts on `spec`'s container: the spec's own and
/// the agent's.
pub(crate) fn labels(spec: &ValidatedSpec, node: Option<&NodeId>) -> BTreeMap<String, String> {
    let mut labels = spec.labels.clone();
    labels.insert(LABEL_MANAGED.into(), "true".into());
    if let Some(node) = node {
        labels.insert(LABEL_NODE.into(), node.as_str().to_owned());
    }
    labels.insert(LABEL_DEPLOYMENT.into(), spec.name.clone());
    labels.insert(LABEL_REVISION.into(), spec.revision.clone());
    labels.insert(LABEL_SPEC_HASH.into(), spec.spec_hash());
    if !spec.gpus.is_empty() {
        let ids: Vec<String> = spec.gpus.iter().map(spec::GpuRef::device_id).collect();
        labels.insert(LABEL_GPUS.into(), ids.join(","));
    }
    // The port, not a URL: with an engine-chosen host port the address is known
    // only once the container runs, so the agent reads it from the bindings then.
    if let Some(server) = &spec.inference {
        labels.insert(LABEL_INFERENCE_PORT.into(), server.port.to_string());
        if let Some(engine) = server.engine {
            labels.insert(LABEL_INFERENCE_ENGINE.into(), engine.as_str().to_owned());
        }
    }
    labels
}

/// The create request for `spec`, made by the agent on `node`.
pub(crate) fn create_body(spec: &ValidatedSpec, gpu_devices: GpuDevices, node: Option<&NodeId>) -> ContainerCreateBody {
    let labels: HashMap<String, String> = labels(spec, node).into_iter().collect();

    let mut exposed = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for p in &spec.ports {
        let key = format!("{}/{}", p.container, p.protocol);
        if !exposed.contains(&key) {
            exposed.push(key.clone());
        }
        // An empty host port asks the engine for a free one.
        let host_port = p.host.map(|h| h.to_string()).unwrap_or_default();
        bindings
            .entry(key)
            .or_default()
            .get_or_insert_with(Vec::new)
            .push(PortBinding { host_ip: Some(p.host_ip.to_string()), host_port: Some(host_port) });
    }

    let mounts: Vec<Mount> = spec
        .volumes
        .iter()
        .map(|v| Mount {
            typ: Some(MountType::BIND),
            source: Some(v.host.display().to_string()),
            target: Some(v.container.display().to_string()),
            read_only: Some(v.read_only),
            ..Default::default()
        })
        .collect();

    let device_requests = (!spec.gpus.is_empty() && gpu_devices == GpuDevices::Nvidia).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(spec.gpus.iter().map(spec::GpuRef::device_id).collect()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    });

    let (restart_name, max_retries) = match spec.restart {
        spec::RestartPolicy::No => (RestartPolicyNameEnum::NO, None),
        spec::RestartPolicy::Always => (RestartPolicyNameEnum::ALWAYS, None),
        spec::RestartPolicy::UnlessStopped => (RestartPolicyNameEnum::UNLESS_STOPPED, None),
        spec::RestartPolicy::OnFailure { max_retries } => {
            (RestartPolicyNameEnum::ON_FAILURE, max_retries.map(i64::from))
        }
    };

    let host_config = HostConfig {
        port_bindings: (!bindings.is_empty()).then_some(bindings),
        mounts: (!mounts.is_empty()).then_some(mounts),
        device_requests,
        // Saturate rather than wrap: a size past i64::MAX bytes is refused by the engine.
        shm_size: spec.shm_size.map(|s| i64::try_from(s.as_u64()).unwrap_or(i64::MAX)),
        restart_policy: Some(RestartPolicy { name: Some(restart_name), maximum_retry_count: max_retries }),
        ..Default::default()
    };

    ContainerCreateBody {
        image: Some(spec.image.clone()),
        entrypoint: spec.command.clone(),
        cmd: spec.args.clone(),
        env: (!spec.env.is_empty()).then(|| spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        labels: Some(labels),
        healthcheck: spec.health.as_ref().map(health_config),
        host_config: Some(host_config),
        ..Default::default()
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn health_config(h: &HealthCheck) -> HealthConfig {
    let test = if let Some(command) = &h.command {
        std::iter::once("CMD".to_owned()).chain(command.iter().cloned()).collect()
    } else if let Some(shell) = &h.shell {
        vec!["CMD-SHELL".to_owned(), shell.clone()]
    } else if let Some(http) = &h.http {
        vec!["CMD-SHELL".to_owned(), http_probe_line(http.port, &http.path, h.timeout)]
    } else {
        // validate() demands exactly one kind; should that ever slip, inheriting the
        // image's own check is the harmless reading.
        Vec::new()
    };
    HealthConfig {
        test: (!test.is_empty()).then_some(test),
        interval: Some(nanos(h.interval)),
        timeout: Some(nanos(h.timeout)),
        retries: Some(i64::from(h.retries)),
        start_period: Some(nanos(h.start_period)),
        // StartInterval needs API 1.44; older engines (Docker 20.10) would refuse it.
        start_interval: None,
    }
}

/// A probe that works in most model-server images: curl, else wget, else Python
/// (every vLLM/SGLang/TGI image has one of them). The path was checked to hold no
/// shell metacharacters.
fn http_probe_line(port: u32, path: &str, timeout: Duration) -> String {
    let url = format!("http://127.0.0.1:{port}{path}");
    let secs = timeout.as_secs().max(1);
    format!(
        "curl -fsS -m {secs} -o /dev/null {url} 2>/dev/null || wget -q -T {secs} -O /dev/null {url} 2>/dev/null || python3 -c \"import urllib.request; urllib.request.urlopen('{url}', timeout={secs})\""
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ContainerSpec;
    use flotilla_common::model::GpuInfo;

    fn render_with(yaml: &str, devices: GpuDevices) -> ContainerCreateBody {
        let gpus: Vec<GpuInfo> = (0..2)
            .map(|i| GpuInfo { index: i, uuid: format!("GPU-{i}"), model: "H100".into(), memory_total_bytes: 1 })
            .collect();
        create_body(&ContainerSpec::from_yaml(yaml).unwrap().validate(&gpus).unwrap(), devices, None)
    }

    fn render(yaml: &str) -> ContainerCreateBody {
        render_with(yaml, GpuDevices::Nvidia)
    }

    #[test]
    fn a_spec_becomes_a_create_request() {
        let body = render(
            r#"
name: llama
revision: "2"
image: vllm/vllm-openai:v1
command: [python3, -m, server]
args: [--port, "8000"]
env: {A: "1", B: two}
ports:
  - {container: 8000, host: 18000}
  - {container: 8000}
  - {container: 9000, host: 19000, host_ip: 0.0.0.0, protocol: udp}
volumes: [{host: /srv/m, container: /m}, {host: /srv/c, container: /c, read_only: false}]
gpus: [1, GPU-0]
shm_size: 2g
restart: on-failure:5
health: {command: [/probe, x], interval: 2s, timeout: 1s, retries: 4, start_period: 1m}
labels: {team: a}
"#,
        );
        assert_eq!(body.image.as_deref(), Some("vllm/vllm-openai:v1"));
        assert_eq!(body.entrypoint, Some(vec!["python3".into(), "-m".into(), "server".into()]));
        assert_eq!(body.cmd, Some(vec!["--port".into(), "8000".into()]));
        assert_eq!(body.env, Some(vec!["A=1".into(), "B=two".into()]));
        let mut exposed = body.exposed_ports.clone().unwrap();
        exposed.sort();
        assert_eq!(exposed, vec!["8000/tcp".to_owned(), "9000/udp".to_owned()]);
        let labels = body.labels.clone().unwrap();
        assert_eq!(labels[LABEL_MANAGED], "true");
        assert_eq!((labels[LABEL_DEPLOYMENT].as_str(), labels[LABEL_REVISION].as_str()), ("llama", "2"));
        assert_eq!(labels[LABEL_SPEC_HASH].len(), 16);
        assert_eq!(labels[LABEL_GPUS], "1,GPU-0");
        assert_eq!(labels["team"], "a");
        assert!(!labels.contains_key(LABEL_INFERENCE_PORT));

        let health = body.healthcheck.clone().unwrap();
        assert_eq!(health.test, Some(vec!["CMD".into(), "/probe".into(), "x".into()]));
        assert_eq!(health.interval, Some(2_000_000_000));
        assert_eq!((health.retries, health.start_period), (Some(4), Some(60_000_000_000)));

        let host = body.host_config.unwrap();
        let tcp = host.port_bindings.as_ref().unwrap()["8000/tcp"].clone().unwrap();
        assert_eq!(tcp.len(), 2);
        assert_eq!(tcp[0].host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(tcp[0].host_port.as_deref(), Some("18000"));
        assert_eq!(tcp[1].host_port.as_deref(), Some(""));
        let udp = host.port_bindings.as_ref().unwrap()["9000/udp"].clone().unwrap();
        assert_eq!(udp[0].host_ip.as_deref(), Some("0.0.0.0"));
        let mounts = host.mounts.unwrap();
        assert_eq!(mounts[0].typ, Some(MountType::BIND));
        assert_eq!((mounts[0].read_only, mounts[1].read_only), (Some(true), Some(false)));
        let dr = &host.device_requests.unwrap()[0];
        assert_eq!(dr.driver.as_deref(), Some("nvidia"));
        assert_eq!(dr.device_ids, Some(vec!["1".into(), "GPU-0".into()]));
        assert_eq!(dr.capabilities, Some(vec![vec!["gpu".into()]]));
        assert_eq!(host.shm_size, Some(2 << 30));
        let restart = host.restart_policy.unwrap();
        assert_eq!((restart.name, restart.maximum_retry_count), (Some(RestartPolicyNameEnum::ON_FAILURE), Some(5)));
    }

    #[test]
    fn a_minimal_spec_leaves_the_image_defaults_alone() {
        let body = render("name: m\nrevision: '1'\nimage: busybox\n");
        assert_eq!((body.entrypoint, body.cmd, body.env, body.healthcheck), (None, None, None, None));
        let host = body.host_config.unwrap();
        assert!(host.port_bindings.is_none() && host.mounts.is_none() && host.device_requests.is_none());
        assert_eq!(host.restart_policy.unwrap().name, Some(RestartPolicyNameEnum::NO));
    }

    #[test]
    fn simulated_gpus_are_labelled_but_not_requested() {
        let yaml = "name: m\nrevision: '1'\nimage: x\ngpus: [0, 1]\n";
        let real = render_with(yaml, GpuDevices::Nvidia);
        let simulated = render_with(yaml, GpuDevices::Bookkeeping);
        assert_eq!(real.labels.unwrap()[LABEL_GPUS], "0,1");
        assert_eq!(simulated.labels.unwrap()[LABEL_GPUS], "0,1");
        assert!(real.host_config.unwrap().device_requests.is_some());
        assert_eq!(simulated.host_config.unwrap().device_requests, None);
        let none = render("name: m\nrevision: '1'\nimage: x\n");
        assert!(!none.labels.unwrap().contains_key(LABEL_GPUS), "no GPUs asked for, no label");
    }

    #[test]
    fn the_inference_port_is_labelled() {
        let body = render(
            "name: m\nrevision: '1'\nimage: x\nports: [{container: 8000}]\ninference: {port: 8000, engine: vllm}\n",
        );
        let labels = body.labels.unwrap();
        assert_eq!((labels[LABEL_INFERENCE_PORT].as_str(), labels[LABEL_INFERENCE_ENGINE].as_str()), ("8000", "vllm"));
        let detected =
            render("name: m\nrevision: '1'\nimage: x\nports: [{container: 8000}]\ninference: {port: 8000}\n");
        assert!(!detected.labels.unwrap().contains_key(LABEL_INFERENCE_ENGINE));
    }

    #[test]
    fn the_creating_node_is_labelled_when_known() {
        let spec = ContainerSpec::from_yaml("name: m\nrevision: '1'\nimage: x\n").unwrap().validate(&[]).unwrap();
        let node = NodeId::new("gpu-1").unwrap();
        let body = create_body(&spec, GpuDevices::Nvidia, Some(&node));
        assert_eq!(body.labels.unwrap()[LABEL_NODE], "gpu-1");
        let body = create_body(&spec, GpuDevices::Nvidia, None);
        assert!(!body.labels.unwrap().contains_key(LABEL_NODE));
    }

    #[test]
    fn http_probes_become_a_portable_shell_line() {
        let body =
            render("name: m\nrevision: '1'\nimage: x\nhealth: {http: {port: 8000, path: /v1/models}, timeout: 3s}\n");
        let test = body.healthcheck.unwrap().test.unwrap();
        assert_eq!(test[0], "CMD-SHELL");
        for tool in ["curl -fsS -m 3 -o /dev/null http://127.0.0.1:8000/v1/models", "wget", "python3"] {
            assert!(test[1].contains(tool), "{}", test[1]);
        }
    }
}
