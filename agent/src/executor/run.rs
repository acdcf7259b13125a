//! What each command does on the host. Runtime failures come back as a failed
//! command with the engine's message; nothing here can take the agent down.

use std::path::Path;
use std::time::Duration;

use flotilla_common::command::{Command, CommandStatus, GatewayWeights};
use flotilla_common::model::GpuInfo;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::Host;
use crate::inference::{InferenceCollector, InferenceEndpoint};
use crate::runtime::{ContainerInfo, ContainerSpec, Runtime};

type Done = (CommandStatus, String, Value);

fn failed(detail: impl Into<String>) -> Done {
    (CommandStatus::Failed, detail.into(), json!({}))
}

fn info_json(c: &ContainerInfo) -> Value {
    json!({
        "id": c.id,
        "name": c.name,
        "image": c.image,
        "deployment": c.deployment,
        "revision": c.revision,
        "state": format!("{:?}", c.state).to_lowercase(),
        "health": format!("{:?}", c.health).to_lowercase(),
    })
}

pub async fn run(host: &Host, command: Command) -> Done {
    let rt = host.runtime.as_ref();
    match command {
        Command::Noop => (CommandStatus::Succeeded, "noop".into(), json!({ "noop": true })),
        Command::PrestartCheck { model_path, min_free_bytes, image } => {
            prestart(host, model_path.as_deref(), min_free_bytes, image.as_deref()).await
        }
        Command::Diagnostics { log_lines } => diagnostics(host, log_lines).await,
        Command::Inspect { container } => inspect(rt, &container).await,
        Command::Logs { container, tail } => logs(rt, &container, tail).await,
        Command::Stop { container, timeout_s } => stop(rt, &container, timeout_s).await,
        Command::Restart { container, timeout_s } => restart(rt, &container, timeout_s).await,
        Command::Deploy { spec_yaml } => deploy(rt, &host.gpus, &spec_yaml).await,
        Command::Drain { container, endpoint, deadline_s, timeout_s } => {
            drain(rt, &container, &endpoint, Duration::from_secs(u64::from(deadline_s)), timeout_s).await
        }
        Command::GatewaySet(weights) => gateway_set(host, &weights).await,
    }
}

// The container commands take the container as the controller names it
// (`NAME-REVISION`); the runtime adds this agent's `name_prefix` for the engine.

async fn inspect<R: Runtime>(rt: &R, container: &str) -> Done {
    match rt.inspect(container).await {
        Ok(info) => {
            (CommandStatus::Succeeded, format!("{} is {:?}", info.name, info.state).to_lowercase(), info_json(&info))
        }
        Err(e) => failed(e.to_string()),
    }
}

async fn logs<R: Runtime>(rt: &R, container: &str, tail: u32) -> Done {
    match rt.logs(container, tail as usize).await {
        Ok(lines) => {
            let lines: Vec<String> = lines.iter().map(ToString::to_string).collect();
            (CommandStatus::Succeeded, format!("{} lines", lines.len()), json!({ "lines": lines }))
        }
        Err(e) => failed(e.to_string()),
    }
}

async fn stop<R: Runtime>(rt: &R, container: &str, timeout_s: u32) -> Done {
    match rt.stop(container, Duration::from_secs(u64::from(timeout_s))).await {
        Ok(info) => (CommandStatus::Succeeded, format!("{container} stopped"), info_json(&info)),
        Err(e) => failed(e.to_string()),
    }
}

async fn restart<R: Runtime>(rt: &R, container: &str, timeout_s: u32) -> Done {
    match rt.restart(container, Duration::from_secs(u64::from(timeout_s))).await {
        Ok(info) => (CommandStatus::Succeeded, format!("{container} restarted"), info_json(&info)),
        Err(e) => failed(e.to_string()),
    }
}

async fn deploy<R: Runtime>(rt: &R, gpus: &[GpuInfo], spec_yaml: &str) -> Done {
    let spec = match ContainerSpec::from_yaml(spec_yaml).and_then(|s| s.validate(gpus)) {
        Ok(s) => s,
        Err(e) => return failed(format!("container spec refused: {e}")),
    };
    match rt.deploy(&spec).await {
        Ok(info) => (CommandStatus::Succeeded, format!("{} running", info.name), info_json(&info)),
        Err(e) => failed(e.to_string()),
    }
}

async fn gateway_set(host: &Host, weights: &GatewayWeights) -> Done {
    let Some(gateway) = &host.gateway else {
        return failed("this node is not a gateway: its agent config has no [gateway] section; nothing changed");
    };
    let servers: Vec<Value> =
        weights.servers.iter().map(|s| json!({ "address": s.address, "weight": s.weight })).collect();
    match gateway.set(weights).await {
        Ok(applied) => {
            let reload_ms = applied.reload_time.as_millis() as u64;
            (
                CommandStatus::Succeeded,
                format!(
                    "upstream {} now runs revision {} ({} server(s)); reload confirmed in {reload_ms} ms",
                    weights.upstream,
                    applied.revision,
                    servers.len()
                ),
                json!({
                    "upstream": weights.upstream,
                    "revision": applied.revision,
                    "servers": servers,
                    "file": applied.file.display().to_string(),
                    "reload_ms": reload_ms,
                }),
            )
        }
        Err(e) => failed(format!("upstream {}: {e}", weights.upstream)),
    }
}

async fn prestart(host: &Host, model_path: Option<&str>, min_free: u64, image: Option<&str>) -> Done {
    let mut checks = Vec::new();
    let mut check =
        |name: &str, ok: bool, detail: String| checks.push(json!({ "name": name, "ok": ok, "detail": detail }));
    match host.gpus.first() {
        Some(g) => check("gpu_visible", true, format!("{} GPU(s), {}", host.gpus.len(), g.model)),
        None => check("gpu_visible", false, "no GPU is visible to the agent".into()),
    }
    match model_path {
        Some(path) => {
            let (free_ok, free_detail) = free_space(Path::new(path), min_free);
            check("disk_space", free_ok, free_detail);
            let (files_ok, files_detail) = model_files(Path::new(path));
            check("model_files", files_ok, files_detail);
        }
        None => {
            check("disk_space", true, "skipped: pass model_path=DIR to check it".into());
            check("model_files", true, "skipped: pass model_path=DIR to check it".into());
        }
    }
    let runtime_ok = match host.runtime.ping().await {
        Ok(()) => {
            check("runtime_reachable", true, format!("{}", host.runtime.config().socket.display()));
            true
        }
        Err(e) => {
            check("runtime_reachable", false, e.to_string());
            false
        }
    };
    if let Some(image) = image {
        match host.runtime.image_present(image).await {
            Ok(true) => check("image_present", true, format!("{image} is present locally")),
            Ok(false) => {
                check("image_present", false, format!("{image} is not present locally; load or build it first"))
            }
            Err(e) if !runtime_ok => check("image_present", false, format!("runtime unreachable: {e}")),
            Err(e) => check("image_present", false, e.to_string()),
        }
    }
    let failing: Vec<String> =
        checks.iter().filter(|c| c["ok"] == false).filter_map(|c| c["name"].as_str().map(str::to_owned)).collect();
    let ok = failing.is_empty();
    let total = checks.len();
    let output = json!({ "ok": ok, "checks": checks });
    if ok {
        (CommandStatus::Succeeded, format!("all {total} checks passed"), output)
    } else {
        (CommandStatus::Failed, format!("{} of {total} checks failed: {}", failing.len(), failing.join(", ")), output)
    }
}

/// Free bytes on the filesystem holding `path` against the threshold.
fn free_space(path: &Path, min_free: u64) -> (bool, String) {
    let disks = sysinfo::Disks::new_with_refreshed_list();
    let Some(disk) = disks
        .list()
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
    else {
        return (false, format!("no mounted filesystem holds {}", path.display()));
    };
    let free = disk.available_space();
    let gib = |b: u64| b as f64 / (1024.0 * 1024.0 * 1024.0);
    let detail =
        format!("{:.1} GiB free on {} (needs {:.1} GiB)", gib(free), disk.mount_point().display(), gib(min_free));
    (free >= min_free, detail)
}

/// The model directory exists, holds weights, and its `config.json` parses.
fn model_files(path: &Path) -> (bool, String) {
    if !path.is_dir() {
        return (false, format!("{} is not a directory", path.display()));
    }
    let config = path.join("config.json");
    let parsed = std::fs::read(&config)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()));
    match parsed {
        Ok(Value::Object(_)) => {}
        Ok(_) => return (false, format!("{} is not a JSON object", config.display())),
        Err(e) => return (false, format!("{}: {e}", config.display())),
    }
    let weights = std::fs::read_dir(path)
        .map(|dir| {
            dir.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().to_lowercase();
                    n.ends_with(".safetensors") || n.ends_with(".bin") || n.ends_with(".gguf") || n.ends_with(".pt")
                })
                .count()
        })
        .unwrap_or(0);
    if weights == 0 {
        return (false, format!("no weight files (*.safetensors, *.bin, *.gguf, *.pt) in {}", path.display()));
    }
    (true, format!("config.json parses; {weights} weight file(s)"))
}

async fn diagnostics(host: &Host, log_lines: u32) -> Done {
    let gpus: Vec<Value> = host
        .gpus
        .iter()
        .map(|g| json!({ "index": g.index, "uuid": g.uuid, "model": g.model, "memory_total_bytes": g.memory_total_bytes }))
        .collect();
    let disks: Vec<Value> = sysinfo::Disks::new_with_refreshed_list()
        .list()
        .iter()
        .map(|d| {
            json!({
                "mount_point": d.mount_point().display().to_string(),
                "size_bytes": d.total_space(),
                "avail_bytes": d.available_space(),
            })
        })
        .collect();
    let containers = match host.runtime.list_managed().await {
        Ok(list) => {
            let mut out = Vec::new();
            for c in list {
                // By name: the runtime speaks the agent's names, not the engine's ids.
                let logs = match host.runtime.logs(&c.name, log_lines as usize).await {
                    Ok(lines) => lines.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    Err(e) => vec![format!("(logs unavailable: {e})")],
                };
                let mut v = info_json(&c);
                v["last_log_lines"] = json!(logs);
                out.push(v);
            }
            json!(out)
        }
        Err(e) => json!({ "error": e.to_string() }),
    };
    (
        CommandStatus::Succeeded,
        "diagnostics collected".into(),
        json!({
            "gpus": gpus,
            "filesystems": disks,
            "containers": containers,
            // The agent's own last WARN and ERROR events, oldest first.
            "recent_agent_errors": host.recent.snapshot(),
        }),
    )
}

/// Running requests at `endpoint`, from its /metrics (summed over models).
async fn running_requests(collector: &mut InferenceCollector) -> Option<f64> {
    let round = collector.collect().await;
    let running: Vec<f64> =
        round.samples.iter().filter(|s| s.name == "flotilla_inference_requests_running").map(|s| s.value).collect();
    (!running.is_empty()).then(|| running.iter().sum())
}

async fn drain<R: Runtime>(rt: &R, container: &str, endpoint: &str, deadline: Duration, timeout_s: u32) -> Done {
    let started = Instant::now();
    let mut collector = match InferenceCollector::new(vec![InferenceEndpoint::new("drain", endpoint)]) {
        Ok(c) => c,
        Err(e) => return failed(format!("endpoint {endpoint}: {e}")),
    };
    let at_start = running_requests(&mut collector).await;
    let mut last = at_start;
    let mut reached_zero = at_start == Some(0.0);
    while !reached_zero && started.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        last = running_requests(&mut collector).await;
        reached_zero = last == Some(0.0);
    }
    let waited_ms = started.elapsed().as_millis() as u64;
    let stopped = rt.stop(container, Duration::from_secs(u64::from(timeout_s))).await;
    let output = json!({
        "in_flight_at_start": at_start,
        "in_flight_at_stop": last,
        "reached_zero": reached_zero,
        "waited_ms": waited_ms,
    });
    match stopped {
        Ok(_) if reached_zero => (
            CommandStatus::Succeeded,
            format!("drained {} request(s) in {waited_ms} ms, then stopped {container}", at_start.unwrap_or(0.0)),
            output,
        ),
        Ok(_) => (
            CommandStatus::Failed,
            format!("deadline passed with {:?} request(s) still running; {container} stopped anyway", last),
            output,
        ),
        Err(e) => (CommandStatus::Failed, format!("stopping {container}: {e}"), output),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::test_server::{Reply, TestServer};
    use crate::runtime::fake::FakeRuntime;
    use crate::runtime::{ContainerState, Runtime};

    const SPEC: &str = "name: m\nrevision: '1'\nimage: img:1\n";

    /// Two agents on one engine, each with its `name_prefix`, both running `m-1`.
    async fn two_agents() -> (FakeRuntime, FakeRuntime, FakeRuntime) {
        let engine = FakeRuntime::with_images(["img:1"]);
        let (a, b) = (engine.sharing("gpu-1.", "gpu-1"), engine.sharing("gpu-2.", "gpu-2"));
        for agent in [&a, &b] {
            let (status, detail, output) = deploy(agent, &[], SPEC).await;
            assert_eq!(status, CommandStatus::Succeeded, "{detail}");
            assert_eq!((detail.as_str(), output["name"].as_str()), ("m-1 running", Some("m-1")), "no prefix told");
        }
        assert_eq!(engine.engine_names(), ["gpu-1.m-1", "gpu-2.m-1"]);
        (engine, a, b)
    }

    async fn state_of(agent: &FakeRuntime) -> ContainerState {
        agent.inspect("m-1").await.unwrap().state
    }

    #[tokio::test]
    async fn commands_name_containers_without_the_prefix_and_reach_only_their_own() {
        let (engine, a, b) = two_agents().await;
        let (status, detail, output) = stop(&a, "m-1", 1).await;
        assert_eq!(
            (status, detail.as_str(), output["name"].as_str()),
            (CommandStatus::Succeeded, "m-1 stopped", Some("m-1"))
        );
        assert!(engine.calls().contains(&"stop gpu-1.m-1".to_owned()), "{:?}", engine.calls());
        assert_eq!((state_of(&a).await, state_of(&b).await), (ContainerState::Exited, ContainerState::Running));

        let (status, detail, _) = inspect(&a, "m-1").await;
        assert_eq!((status, detail.as_str()), (CommandStatus::Succeeded, "m-1 is exited"));
        engine.set_logs("gpu-2.m-1", &["b's line"]);
        let (_, _, output) = logs(&b, "m-1", 10).await;
        assert_eq!(output["lines"][0].as_str().map(|l| l.contains("b's line")), Some(true), "{output}");
        let (status, _, _) = restart(&a, "m-1", 1).await;
        assert_eq!((status, state_of(&a).await), (CommandStatus::Succeeded, ContainerState::Running));
        let (status, detail, _) = stop(&a, "gpu-2.m-1", 1).await;
        assert_eq!(status, CommandStatus::Failed, "another agent's container is out of reach: {detail}");
    }

    #[tokio::test]
    async fn a_drain_stops_the_prefixed_container_by_its_unprefixed_name() {
        let (engine, a, b) = two_agents().await;
        let page = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 0\n";
        let server = TestServer::start([("/metrics", Reply::Body(page.to_owned()))]).await;
        let (status, detail, output) = drain(&b, "m-1", &server.url, Duration::from_secs(5), 1).await;
        assert_eq!(status, CommandStatus::Succeeded, "{detail} {output}");
        assert!(detail.ends_with("then stopped m-1"), "{detail}");
        assert!(engine.calls().contains(&"stop gpu-2.m-1".to_owned()), "{:?}", engine.calls());
        assert_eq!((state_of(&a).await, state_of(&b).await), (ContainerState::Running, ContainerState::Exited));
    }
}
