//! Signed commands against the machine's real Docker engine: deploy the
//! stand-in model server (test equipment) through a signed command, see it
//! healthy, read its logs, drain it while requests are in flight (every one
//! completes) and find it stopped.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use flotilla_tests::{
    Agent, AgentOpts, ContainerCleanup, Controller, Pki, eventually_within, flotctl, free_port, http_get, json,
    standin_image, wait_state,
};

fn docker_inspect(container: &str, format: &str) -> String {
    let out = Command::new("docker").args(["inspect", "--format", format, container]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A chat completion over plain HTTP; returns the status code.
fn chat(addr: &str) -> u16 {
    let body = r#"{"model":"llama-test","messages":[{"role":"user","content":"hi"}]}"#;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

#[test]
fn deploy_logs_drain_and_stop_through_signed_commands() {
    let image = standin_image();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let key = controller.data_dir.join("command-signing.pub");
    let _agent = Agent::start(
        dir.path(),
        &pki,
        &url,
        "gpu-a",
        AgentOpts {
            gpus: 1,
            config_toml: Some(format!("command_key = \"{}\"\n", key.display())),
            ..Default::default()
        },
    );
    wait_state(&pki, &url, "gpu-a", "up");

    let name = format!("flotilla-test-cmd-{}", std::process::id());
    let container = format!("{name}-1");
    let _cleanup = ContainerCleanup::new([container.clone()]);
    let port = free_port();
    let spec = dir.path().join("spec.yaml");
    std::fs::write(
        &spec,
        format!(
            "name: {name}\nrevision: \"1\"\nimage: {image}\nenv: {{ STANDIN_LATENCY: 3s, STANDIN_MODEL: llama-test }}\n\
             ports:\n  - {{ container: 8000, host: {port} }}\n\
             health:\n  command: [/flotilla-standin, probe, \"http://127.0.0.1:8000/health\"]\n  interval: 1s\n  timeout: 2s\n  retries: 30\n"
        ),
    )
    .unwrap();
    let out = flotctl(&pki, &url, &["exec", "gpu-a", "deploy", "-f", spec.to_str().unwrap(), "-o", "json"]);
    let v = json(&out);
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["name"], container.as_str());

    let addr = format!("127.0.0.1:{port}");
    eventually_within(Duration::from_secs(120), "the stand-in to become healthy", |last| {
        let health = docker_inspect(&container, "{{.State.Health.Status}}");
        *last = health.clone();
        (health == "healthy").then_some(())
    });
    let (status, body) = http_get(&addr, "/v1/models").unwrap();
    assert_eq!(status, 200, "{body}");

    let out =
        flotctl(&pki, &url, &["exec", "gpu-a", "inspect", "--arg", &format!("container={container}"), "-o", "json"]);
    let v = json(&out);
    assert_eq!(v["health"], "healthy", "{v}");
    assert_eq!(v["deployment"], name.as_str());
    let out = flotctl(&pki, &url, &["exec", "gpu-a", "logs", "--arg", &format!("container={container}"), "-o", "json"]);
    let v = json(&out);
    assert_eq!(v["status"], "succeeded");
    assert!(!v["lines"].as_array().unwrap().is_empty(), "{v}");

    // Five requests in flight (3 s each); drain waits for them, then stops the container.
    let clients: Vec<_> = (0..5)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || chat(&addr))
        })
        .collect();
    eventually_within(Duration::from_secs(30), "five requests in flight", |last| {
        let (_, metrics) = http_get(&addr, "/metrics").ok()?;
        let running = metrics
            .lines()
            .find(|l| l.starts_with("vllm:num_requests_running"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        *last = format!("{running:?}");
        (running == Some(5.0)).then_some(())
    });
    let out = flotctl(
        &pki,
        &url,
        &[
            "exec",
            "gpu-a",
            "drain",
            "--arg",
            &format!("container={container}"),
            "--arg",
            &format!("endpoint=http://{addr}"),
            "--arg",
            "deadline_s=60",
            "-o",
            "json",
        ],
    );
    let v = json(&out);
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["in_flight_at_start"], 5.0);
    assert_eq!(v["reached_zero"], true);
    let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(statuses, [200; 5], "every in-flight request completed");
    assert_eq!(docker_inspect(&container, "{{.State.Running}}"), "false", "stopped after the drain");

    // A spec the host cannot satisfy is refused before anything runs.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, format!("name: {name}\nrevision: \"2\"\nimage: {image}\ngpus: [7]\n")).unwrap();
    let out = flotctl(&pki, &url, &["exec", "gpu-a", "deploy", "-f", bad.to_str().unwrap(), "-o", "json"]);
    let v = json(&out);
    assert_eq!(v["status"], "failed");
    assert!(v["detail"].as_str().unwrap().contains("gpu"), "{v}");
    let listed =
        Command::new("docker").args(["ps", "-a", "--filter", &format!("name={name}-2"), "-q"]).output().unwrap();
    assert!(listed.stdout.is_empty(), "nothing was created for the refused spec");
}
