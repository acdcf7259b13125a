//! The agent's container runtime driver against this machine's Docker engine, with
//! the stand-in model server as the workload (its image is built locally by
//! `docker import`; nothing is pulled), and the stand-in server itself as a process.
//!
//! Every container is named `flotilla-test-…` with a random suffix and removed by a
//! drop guard, so the tests run in parallel with each other and the rest of the suite.

// Test helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::future::Future;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla_agent::runtime::{
    ContainerSpec, ContainerState, DockerRuntime, HealthState, RemoveMode, Runtime, RuntimeConfig, RuntimeError,
    SpecError, ValidatedSpec,
};
use flotilla_tests::{
    ContainerCleanup, Proc, bin, eventually, http_get, metric_value, standin_image, unique_container_name,
};

/// How long a container may take to become healthy: a hang guard, not a speed claim.
const HANG_GUARD: Duration = Duration::from_secs(90);

fn docker() -> DockerRuntime {
    DockerRuntime::new(RuntimeConfig::default())
}

async fn image() -> String {
    tokio::task::spawn_blocking(standin_image).await.expect("build the stand-in image")
}

/// A stand-in deployment: port 8000 published on a loopback port the engine
/// chooses (no port can clash between parallel tests), health checked by the
/// stand-in's own probe since the image has no shell or curl.
fn standin_spec(name: &str, image: &str, extra: &str) -> ValidatedSpec {
    let yaml = format!(
        r#"
name: {name}
revision: "1"
image: {image}
env:
  STANDIN_MODEL: llama-test
  STANDIN_STARTUP_DELAY: 1s
ports:
  - container: 8000
health:
  command: [/flotilla-standin, probe, "http://127.0.0.1:8000/health"]
  interval: 500ms
  timeout: 2s
  retries: 3
  start_period: 10s
labels:
  suite: runtime
{extra}"#
    );
    ContainerSpec::from_yaml(&yaml).expect("spec parses").validate(&[]).expect("spec is valid")
}

/// Polls `probe` until it returns `Ok`, or fails the test after [`HANG_GUARD`]
/// with `what` and the last `Err` it gave.
async fn until<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + HANG_GUARD;
    loop {
        match probe().await {
            Ok(value) => return value,
            Err(last) => {
                assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}; last: {last}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Containers of `deployment` the engine has, by label, running or not.
fn engine_count(deployment: &str) -> usize {
    let out = Command::new("docker")
        .args(["ps", "-a", "-q", "--filter", &format!("label=flotilla.deployment={deployment}")])
        .output()
        .expect("docker ps");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[tokio::test]
async fn deploy_becomes_healthy_serves_and_is_found_again_after_an_agent_restart() {
    let image = image().await;
    let name = unique_container_name("lifecycle");
    let container = format!("{name}-1");
    let _cleanup = ContainerCleanup::new([container.clone()]);
    let spec = standin_spec(&name, &image, "");

    let runtime = docker();
    runtime.ping().await.expect("the engine answers");
    assert!(runtime.image_present(&image).await.unwrap());
    let deployed = runtime.deploy(&spec).await.expect("deploy");
    assert_eq!(deployed.name, container);
    assert_eq!(deployed.state, ContainerState::Running);
    assert_eq!((deployed.deployment.as_deref(), deployed.revision.as_deref()), (Some(name.as_str()), Some("1")));
    assert_eq!(deployed.labels.get("suite").map(String::as_str), Some("runtime"));
    let port = deployed.host_port(8000).expect("8000 is published");

    let healthy = until("the container to become healthy", || async {
        let info = runtime.inspect(&container).await.map_err(|e| e.to_string())?;
        match (info.state, info.health) {
            (ContainerState::Running, HealthState::Healthy) => Ok(info),
            (ContainerState::Running, health) => Err(format!("health {health}")),
            (state, _) => panic!("container is {state}: {:?}", runtime.logs(&container, 20).await),
        }
    })
    .await;
    assert_eq!(healthy.id, deployed.id);

    let addr = format!("127.0.0.1:{port}");
    let (status, body) = tokio::task::spawn_blocking(move || http_get(&addr, "/v1/models")).await.unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"llama-test\""), "the model name came from the spec's env: {body}");

    let logs = runtime.logs(&container, 50).await.expect("logs");
    assert!(logs.iter().any(|l| l.text.contains("flotilla-standin listening")), "{logs:?}");

    // An agent that restarts has a new runtime and finds its containers by label.
    let restarted = docker();
    let managed = restarted.list_managed().await.expect("list");
    let found = managed.iter().find(|c| c.name == container).expect("found by label");
    assert_eq!((found.id.as_str(), found.health), (deployed.id.as_str(), HealthState::Healthy));
    let again = restarted.deploy(&spec).await.expect("second deploy");
    assert_eq!(again.id, deployed.id, "deploying what runs is a no-op");

    // SIGTERM, then the stand-in drains and exits 0 well within the grace period.
    let stopped = restarted.stop(&container, Duration::from_secs(20)).await.expect("stop");
    assert_eq!((stopped.state, stopped.exit_code), (ContainerState::Exited, Some(0)));
    let logs = restarted.logs(&container, 5).await.unwrap();
    assert!(logs.iter().any(|l| l.text.contains("flotilla-standin stopped")), "{logs:?}");
    // A second stop of a stopped container is not an error (commands are retried).
    restarted.stop(&container, Duration::from_secs(1)).await.expect("stop again");

    // Deploying the stopped revision starts the same container again.
    let revived = restarted.deploy(&spec).await.expect("deploy the stopped revision");
    assert_eq!((revived.id.as_str(), revived.state), (deployed.id.as_str(), ContainerState::Running));
    restarted.remove(&container, RemoveMode::Force).await.expect("remove");
    assert!(matches!(restarted.inspect(&container).await, Err(RuntimeError::NotFound { .. })));
    restarted.remove(&container, RemoveMode::Force).await.expect("removing what is gone succeeds");
}

#[tokio::test]
async fn invalid_specs_are_refused_before_anything_runs() {
    let image = image().await;
    let name = unique_container_name("invalid");
    let _cleanup = ContainerCleanup::new([format!("{name}-1")]);
    let before = engine_count(&name);
    let base = format!("name: {name}\nrevision: '1'\nimage: {image}\n");
    let gpus = vec![flotilla_common::model::GpuInfo {
        index: 0,
        uuid: "GPU-0".into(),
        model: "test".into(),
        memory_total_bytes: 1,
    }];
    let refuse = |extra: &str| {
        ContainerSpec::from_yaml(&format!("{base}{extra}")).and_then(|s| s.validate(&gpus)).expect_err(extra)
    };

    let err = refuse("ports: [{container: 8000, host: 70000}]");
    assert!(matches!(&err, SpecError::PortOutOfRange { field, value: 70000 } if field == "ports[0].host"), "{err}");
    let err = refuse("ports: [{container: 8000, host: 18000}, {container: 8001, host: 18000}]");
    assert!(matches!(err, SpecError::PortClash { .. }), "{err}");
    let err = refuse("gpus: [3]");
    assert!(matches!(err, SpecError::GpuNotFound { .. }) && err.to_string().contains("gpus[0]"), "{err}");
    let err = refuse("imagePullPolicy: Always");
    assert!(matches!(err, SpecError::Parse(_)) && err.to_string().contains("imagePullPolicy"), "{err}");
    let err = ContainerSpec::from_yaml(&format!("name: {name}\nrevision: '1'\nimage: 'Not/A Valid:image'\n"))
        .and_then(|s| s.validate(&gpus))
        .unwrap_err();
    assert!(matches!(err, SpecError::BadImage { .. }), "{err}");
    let err = ContainerSpec::from_yaml(&format!("name: ''\nrevision: '1'\nimage: {image}\n"))
        .and_then(|s| s.validate(&gpus))
        .unwrap_err();
    assert!(matches!(&err, SpecError::Empty { field } if field == "name"), "{err}");

    assert_eq!(engine_count(&name), before, "a refused spec creates nothing");
    assert!(docker().list_managed().await.unwrap().iter().all(|c| c.deployment.as_deref() != Some(name.as_str())));
}

#[tokio::test]
async fn a_missing_image_is_a_typed_error_and_creates_nothing() {
    let name = unique_container_name("noimage");
    let _cleanup = ContainerCleanup::new([format!("{name}-1")]);
    let image = format!("flotilla-test-absent/{name}:never-built");
    let spec = ContainerSpec::from_yaml(&format!("name: {name}\nrevision: '1'\nimage: {image}\n"))
        .unwrap()
        .validate(&[])
        .unwrap();
    let runtime = docker();
    assert!(!runtime.image_present(&image).await.unwrap());
    match runtime.deploy(&spec).await {
        Err(RuntimeError::ImageNotPresent { image: reported }) => assert_eq!(reported, image),
        other => panic!("expected ImageNotPresent, got {other:?}"),
    }
    assert!(matches!(runtime.inspect(&format!("{name}-1")).await, Err(RuntimeError::NotFound { .. })));
    assert_eq!(engine_count(&name), 0);
}

#[tokio::test]
async fn a_socket_that_does_not_exist_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("docker.sock");
    let runtime = DockerRuntime::new(RuntimeConfig { socket: socket.clone(), ..Default::default() });
    let err = runtime.ping().await.unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
    assert!(err.to_string().contains(&socket.display().to_string()), "{err}");
    let spec = ContainerSpec::from_yaml("name: x\nrevision: '1'\nimage: busybox\n").unwrap().validate(&[]).unwrap();
    assert!(matches!(runtime.deploy(&spec).await, Err(RuntimeError::Unreachable { .. })));
    assert!(matches!(runtime.list_managed().await, Err(RuntimeError::Unreachable { .. })));
}

#[tokio::test]
async fn a_container_that_cannot_start_is_reported_and_removed() {
    let image = image().await;
    let first = unique_container_name("holder");
    let second = unique_container_name("clash");
    let _cleanup = ContainerCleanup::new([format!("{first}-1"), format!("{second}-1")]);
    let runtime = docker();
    let holder = runtime.deploy(&standin_spec(&first, &image, "")).await.expect("deploy the port holder");
    let port = holder.host_port(8000).unwrap();

    // The spec is valid on its own; only the engine can see that the port is taken.
    let clash = format!("name: {second}\nrevision: '1'\nimage: {image}\nports: [{{container: 8000, host: {port}}}]\n");
    let spec = ContainerSpec::from_yaml(&clash).unwrap().validate(&[]).unwrap();
    match runtime.deploy(&spec).await {
        Err(RuntimeError::Engine { op: "start", message, .. }) => assert!(!message.is_empty()),
        other => panic!("expected the engine's start refusal, got {other:?}"),
    }
    assert_eq!(engine_count(&second), 0, "the half-made container is removed");
}

#[tokio::test]
async fn revisions_are_immutable_and_foreign_names_are_not_taken_over() {
    let image = image().await;
    let name = unique_container_name("conflict");
    let foreign = unique_container_name("foreign");
    let _cleanup = ContainerCleanup::new([format!("{name}-1"), format!("{foreign}-1")]);
    let runtime = docker();
    runtime.deploy(&standin_spec(&name, &image, "")).await.expect("deploy");
    let changed = standin_spec(&name, &image, "args: [--tokens, '4']\n");
    match runtime.deploy(&changed).await {
        Err(RuntimeError::RevisionConflict { deployment, revision, .. }) => {
            assert_eq!((deployment.as_str(), revision.as_str()), (name.as_str(), "1"));
        }
        other => panic!("expected RevisionConflict, got {other:?}"),
    }

    // A container the agent did not create keeps its name.
    let out = Command::new("docker").args(["create", "--name", &format!("{foreign}-1"), &image]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    match runtime.deploy(&standin_spec(&foreign, &image, "")).await {
        Err(RuntimeError::NameConflict { name, .. }) => assert_eq!(name, format!("{foreign}-1")),
        other => panic!("expected NameConflict, got {other:?}"),
    }
}

// ---- the stand-in server as a process ------------------------------------------

/// Starts the stand-in on a free loopback port; returns it and its address.
fn start_standin(dir: &Path, flags: &[&str]) -> (Proc, String) {
    let mut cmd = Command::new(bin("flotilla-standin"));
    cmd.args(["--listen", "127.0.0.1:0", "--model", "m1"]).args(flags);
    let proc = Proc::spawn_logged(cmd, &dir.join("standin.log"));
    let line = eventually("the stand-in to listen", |last| {
        let text = proc.log_text();
        *last = text.clone();
        text.lines().find(|l| l.contains("flotilla-standin listening")).map(str::to_owned)
    });
    let addr = line.split("addr=").nth(1).and_then(|r| r.split_whitespace().next()).expect("addr in the line");
    (proc, addr.to_owned())
}

/// An HTTP/1.0 POST of JSON; the body is read until the server closes.
fn post(addr: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the answer");
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

fn metrics(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    body
}

/// The `data:` payloads of an SSE body.
fn sse_events(body: &str) -> Vec<&str> {
    body.split("\n\n").filter_map(|e| e.trim().strip_prefix("data: ")).collect()
}

#[test]
fn standin_answers_chat_completions_and_counts_them_like_vllm() {
    let dir = tempfile::tempdir().unwrap();
    let (_standin, addr) = start_standin(dir.path(), &["--latency", "100ms"]);
    assert_eq!(http_get(&addr, "/health").unwrap().0, 200);
    let (status, models) = http_get(&addr, "/v1/models").unwrap();
    assert_eq!(status, 200);
    let models: serde_json::Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "m1");

    let (status, body) = post(
        &addr,
        "/v1/chat/completions",
        r#"{"model":"m1","messages":[{"role":"user","content":"one two three"}],"max_tokens":4}"#,
    );
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["object"], "chat.completion");
    assert_eq!(reply["choices"][0]["message"]["content"].as_str().unwrap().split(' ').count(), 4);
    assert_eq!(reply["choices"][0]["finish_reason"], "length");
    assert_eq!(
        (reply["usage"]["prompt_tokens"].as_u64(), reply["usage"]["completion_tokens"].as_u64()),
        (Some(3), Some(4))
    );

    let (status, body) = post(
        &addr,
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi there"}],"stream":true,"stream_options":{"include_usage":true}}"#,
    );
    assert_eq!(status, 200);
    let events = sse_events(&body);
    assert_eq!(events.last(), Some(&"[DONE]"), "{body}");
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(text.split(' ').count(), 16, "{text}");
    assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"] == "stop"));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 16);

    assert_eq!(post(&addr, "/v1/chat/completions", r#"{"model":"other","messages":[]}"#).0, 404);
    assert_eq!(post(&addr, "/v1/chat/completions", "not json").0, 400);

    let page = metrics(&addr);
    let m = |name: &str, want: &[(&str, &str)]| {
        let mut labels = vec![("model_name", "m1")];
        labels.extend_from_slice(want);
        metric_value(&page, name, &labels).unwrap_or_else(|| panic!("{name} {want:?} missing:\n{page}"))
    };
    assert_eq!(m("vllm:request_success_total", &[("finished_reason", "length")]), 1.0);
    assert_eq!(m("vllm:request_success_total", &[("finished_reason", "stop")]), 1.0);
    assert_eq!(m("vllm:prompt_tokens_total", &[]), 5.0);
    assert_eq!(m("vllm:generation_tokens_total", &[]), 20.0);
    assert_eq!(m("vllm:time_to_first_token_seconds_count", &[]), 2.0);
    assert_eq!(m("vllm:e2e_request_latency_seconds_count", &[]), 2.0);
    assert_eq!(m("vllm:num_requests_running", &[]), 0.0);
    assert_eq!(m("vllm:num_requests_waiting", &[]), 0.0);
    assert_eq!(m("vllm:kv_cache_usage_perc", &[]), 0.0);
    assert!(page.contains("# TYPE vllm:e2e_request_latency_seconds histogram"));
}

#[test]
fn standin_is_unavailable_while_loading_and_fails_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let loading_dir = dir.path().join("loading");
    let failing_dir = dir.path().join("failing");
    std::fs::create_dir_all(&loading_dir).unwrap();
    std::fs::create_dir_all(&failing_dir).unwrap();
    let chat = r#"{"messages":[{"role":"user","content":"x"}]}"#;

    let (_loading, addr) = start_standin(&loading_dir, &["--startup-delay", "1h"]);
    assert_eq!(http_get(&addr, "/health").unwrap().0, 503);
    assert_eq!(http_get(&addr, "/v1/models").unwrap().0, 503);
    assert_eq!(post(&addr, "/v1/chat/completions", chat).0, 503);
    assert_eq!(http_get(&addr, "/metrics").unwrap().0, 200, "metrics are served while loading");

    let (_failing, addr) = start_standin(&failing_dir, &["--error-rate", "1"]);
    assert_eq!(http_get(&addr, "/health").unwrap().0, 200);
    let (status, body) = post(&addr, "/v1/chat/completions", chat);
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("injected failure"), "{body}");

    let out = Command::new(bin("flotilla-standin")).args(["--error-rate", "2"]).output().unwrap();
    assert!(!out.status.success(), "an error rate above 1 is refused");
}

#[test]
fn standin_finishes_in_flight_requests_on_sigterm_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (mut standin, addr) = start_standin(dir.path(), &["--latency", "3s"]);
    let target = addr.clone();
    let client = std::thread::spawn(move || {
        post(&target, "/v1/chat/completions", r#"{"messages":[{"role":"user","content":"x"}],"stream":true}"#)
    });
    eventually("the request to be in flight", |last| {
        let page = metrics(&addr);
        let running = metric_value(&page, "vllm:num_requests_running", &[("model_name", "m1")]);
        *last = format!("running {running:?}");
        (running == Some(1.0)).then_some(())
    });
    let status = standin.terminate();
    assert!(status.success(), "exit status {status:?}; log:\n{}", standin.log_text());
    let (code, body) = client.join().unwrap();
    assert_eq!(code, 200);
    assert_eq!(sse_events(&body).last(), Some(&"[DONE]"), "the stream was finished, not cut: {body}");
    let log = standin.log_text();
    assert!(log.contains("draining in_flight=1") && log.contains("flotilla-standin stopped"), "{log}");
}
