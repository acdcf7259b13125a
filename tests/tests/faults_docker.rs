//! Fault scenarios across hosts, on the Docker engine: the controller and three
//! or more agents run as containers on a private network of their own
//! (`flotilla_tests::cluster`), flotctl runs here against the controller's
//! published port.
//!
//! - a partition: an agent cut off (`docker network disconnect`) for 30 s is
//!   marked down within the silent-loss window, the model container it started
//!   keeps running (and nothing else starts one), and after it is reconnected its
//!   telemetry from the partition is in the store with no sequence gap;
//! - SIGKILL of the controller under a telemetry flood while a drain runs:
//!   every seq in every agent's ack ledger is in the store (read offline), the
//!   agents resume on the restarted controller, and the drain ran exactly once;
//! - a full disk (the controller's data dir on a small tmpfs, filled up): writes
//!   are refused with a clear "no space left" error, acks stop, the controller
//!   keeps answering, agents buffer, an agent restarted meanwhile is welcomed
//!   (not called down); once the filler is gone the store reopens
//!   itself and every buffered batch arrives, with no gap;
//! - an agent whose clock is 10 minutes ahead (libfaketime): its node is
//!   degraded with the reason, `flotilla_agent_clock_skew_seconds` says by how
//!   much, its batches are stored at controller time, and it still takes
//!   commands (the controller signs them in its time: it judges their validity
//!   by its own clock);
//! - SIGKILL of the controller mid-rollout (a rolling update over three agent
//!   containers, each with an address of its own for its replicas, behind a
//!   gateway agent and nginx on this host): the restarted controller finishes
//!   the rollout, one container per node and revision, no command run twice.

#![allow(clippy::expect_used, clippy::unwrap_used)]
// A synchronous test: waiting is a plain sleep.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use flotilla_common::NodeId;
use flotilla_common::model::TelemetryBatch;
use flotilla_common::time::now_unix_ms;
use flotilla_controller::store::{SledStore, Store};
use flotilla_tests::cluster::{AgentOpts, Cluster, ControllerOpts, docker, docker_available};
use flotilla_tests::nginx::Nginx;
use flotilla_tests::{eventually_within, free_port, https_get, json, metric_value, standin_image};

/// How long the scenarios wait for the fleet to settle: a hang guard.
const PATIENCE: Duration = Duration::from_secs(90);

/// Whether to run: only a machine without a Docker engine skips, saying so.
#[allow(clippy::print_stderr)] // the skip must be visible in the test output
fn docker_or_skip(test: &str) -> bool {
    if docker_available() {
        return true;
    }
    eprintln!("SKIPPED {test}: no Docker engine answers (`docker info` failed)");
    false
}

/// Every stored batch of `node`, read offline (the controller must be stopped).
fn stored(c: &Cluster, node: &str) -> Vec<TelemetryBatch> {
    let store = SledStore::open(&c.controller_data().join("store")).unwrap();
    store.batches(&NodeId::new(node).unwrap(), 0, usize::MAX).unwrap()
}

/// The seqs in `seqs` that break a run 1, 2, 3, … (empty when whole).
fn gaps(seqs: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = seqs.windows(2).filter(|w| w[1] != w[0] + 1).map(|w| (w[0], w[1])).collect();
    if seqs.first().is_some_and(|s| *s != 1) {
        out.insert(0, (0, seqs[0]));
    }
    out
}

/// Waits until `node`'s ack ledger is a whole run 1..=N with N ≥ `at_least`.
fn wait_whole_ledger(c: &Cluster, node: &str, at_least: u64) -> u64 {
    wait_ledger(c, node, at_least, false)
}

/// [`wait_whole_ledger`] for an agent that was killed: seqs are reserved on
/// disk in blocks of 1024 (`agent/src/seq.rs`), and a killed agent resumes past
/// its block, so a gap that ends where a block starts is no loss.
fn wait_ledger(c: &Cluster, node: &str, at_least: u64, killed: bool) -> u64 {
    eventually_within(PATIENCE, &format!("{node}'s acks to be whole up to {at_least}"), |last| {
        let acked: BTreeSet<u64> = c.acked(node).into_iter().collect();
        let seqs: Vec<u64> = acked.into_iter().collect();
        let max = seqs.last().copied().unwrap_or(0);
        let mut holes = gaps(&seqs);
        if killed {
            holes.retain(|(_, resumed_at)| (resumed_at - 1) % 1024 != 0);
        }
        *last = format!("max {max}, holes {holes:?}");
        (max >= at_least && holes.is_empty()).then_some(max)
    })
}

/// A model-server container spec for `flotctl exec NODE deploy`: the stand-in.
fn model_spec(c: &Cluster, name: &str) -> std::path::PathBuf {
    let text = format!(
        "name: {name}\nrevision: \"1\"\nimage: {}\nenv: {{ STANDIN_LISTEN: \"0.0.0.0:8000\" }}\nrestart: unless-stopped\n",
        standin_image()
    );
    let path = c.dir.path().join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Deploys the stand-in as `NAME-1` through `node`'s agent; its engine name.
fn deploy_model(c: &Cluster, node: &str, name: &str) -> String {
    let spec = model_spec(c, name);
    let out = c.flotctl(&["exec", node, "deploy", "-f", spec.to_str().unwrap(), "-o", "json"]);
    assert!(out.status.success(), "deploy: {out:?}");
    assert_eq!(json(&out)["status"], "succeeded");
    let engine_name = format!("{}{name}-1", c.model_prefix(node));
    assert!(c.running(&engine_name), "{engine_name} runs");
    engine_name
}

/// Waits until a line of `container`'s log contains every one of `needles`; returns it.
/// (The engine shows a log line a moment after the process wrote it.)
fn wait_line(c: &Cluster, container: &str, needles: &[&str]) -> String {
    eventually_within(PATIENCE, &format!("a line with {needles:?} in the log of {container}"), |last| {
        let logs = c.logs(container);
        *last = logs.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
        logs.lines().find(|l| needles.iter().all(|n| l.contains(n))).map(str::to_owned)
    })
}

/// The ids of the signed commands `node`'s agent executed, with how often each ran.
fn executed(c: &Cluster, node: &str) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in c.logs(&c.agent(node)).lines().filter(|l| l.contains("executing signed command")) {
        if let Some(id) = line.split("command_id=").nth(1).and_then(|r| r.split_whitespace().next()) {
            let id = id.trim_matches(|c| matches!(c, '"' | '}' | ':' | ','));
            *seen.entry(id.to_owned()).or_default() += 1;
        }
    }
    seen
}

#[test]
fn a_partitioned_agent_goes_down_in_the_window_keeps_its_model_and_backfills_without_a_gap() {
    if !docker_or_skip("partition") {
        return;
    }
    let started = Instant::now();
    let c = Cluster::start(ControllerOpts::default());
    // A 500 ms heartbeat: the silent-loss window is missed_heartbeats (3) × 500 ms.
    let window_ms: u64 = 3 * 500;
    for node in ["gpu-a", "gpu-b", "gpu-c"] {
        c.start_agent(AgentOpts { interval: "500ms".into(), docker_socket: true, ..AgentOpts::new(node) });
    }
    let model = deploy_model(&c, "gpu-a", "model");
    let model_started = c.started_at(&model);
    let agent_started = c.started_at(&c.agent("gpu-a"));
    c.wait_acks("gpu-a", 5);

    let cut_at = now_unix_ms();
    c.partition("gpu-a");
    let down = c.wait_state("gpu-a", "down");
    eprintln!("gpu-a while partitioned: {} ({})", down["state"], down["state_reason"]);
    // The controller's own account of how long gpu-a had been silent when it
    // called it down; its sweep runs every 250 ms, the slack is for a busy machine.
    let line = wait_line(&c, &c.controller(), &["node down: missed", "gpu-a"]);
    let silent_ms: u64 = line
        .split("silent_ms=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("silent_ms in {line}"));
    eprintln!("down after {silent_ms} ms of silence (window {window_ms} ms)");
    assert!(silent_ms >= window_ms, "not before the window: {line}");
    assert!(silent_ms <= 2 * window_ms + 5_000, "within the window, with slack for a busy machine: {line}");
    let nodes = c.nodes().unwrap();
    for other in ["gpu-b", "gpu-c"] {
        let state = nodes.iter().find(|n| n["id"] == other).map(|n| n["state"].clone());
        assert_eq!(state, Some("up".into()), "{other} is unaffected");
    }

    // The partition lasts 30 s in all; the agent and its model keep running.
    let until = Duration::from_secs(30).saturating_sub(Duration::from_millis((now_unix_ms() - cut_at) as u64));
    std::thread::sleep(until);
    assert!(c.running(&c.agent("gpu-a")) && c.running(&model), "the cut-off node keeps running");
    assert_eq!(c.started_at(&model), model_started, "its model container was not restarted");
    let models: Vec<String> = String::from_utf8_lossy(
        &docker(&["ps", "-a", "--filter", &format!("name={}", c.id), "--format", "{{.Names}}"]).stdout,
    )
    .lines()
    .filter(|n| n.ends_with("model-1"))
    .map(str::to_owned)
    .collect();
    assert_eq!(models, std::slice::from_ref(&model), "no second placement of the model anywhere");
    let healed_at = now_unix_ms();
    let acked_before = c.acked("gpu-a").into_iter().max().unwrap_or(0);
    c.heal("gpu-a");
    c.wait_state("gpu-a", "up");
    // About 60 batches were made during the partition; all of them, and some after, are acknowledged.
    wait_whole_ledger(&c, "gpu-a", acked_before + 40);
    assert_eq!(c.started_at(&c.agent("gpu-a")), agent_started, "the agent was never restarted");
    assert_eq!(c.stop_controller(), 0, "the controller stops cleanly");

    let batches = stored(&c, "gpu-a");
    let seqs: Vec<u64> = batches.iter().map(|b| b.seq).collect();
    assert_eq!(gaps(&seqs), [], "no sequence gap in the store");
    let during: Vec<&TelemetryBatch> =
        batches.iter().filter(|b| (cut_at..healed_at).contains(&b.created_unix_ms)).collect();
    assert!(during.len() >= 20, "batches made during the 30 s partition are stored: {}", during.len());
    let acked: BTreeSet<u64> = c.acked("gpu-a").into_iter().collect();
    let stored_seqs: BTreeSet<u64> = seqs.iter().copied().collect();
    assert!(acked.is_subset(&stored_seqs), "every acknowledged seq is stored");
    eprintln!("partition scenario: {} batches during the partition, {:?} in all", during.len(), started.elapsed());
}

#[test]
fn sigkill_under_a_flood_loses_no_acknowledged_batch_and_runs_no_command_twice() {
    if !docker_or_skip("sigkill") {
        return;
    }
    let started = Instant::now();
    let c = Cluster::start(ControllerOpts::default());
    let nodes = ["gpu-a", "gpu-b", "gpu-c"];
    for node in nodes {
        c.start_agent(AgentOpts { interval: "100ms".into(), docker_socket: node == "gpu-a", ..AgentOpts::new(node) });
    }
    let model = deploy_model(&c, "gpu-a", "slow");
    for node in nodes {
        c.wait_acks(node, 30);
    }

    // A drain that takes its whole deadline: nothing answers at the endpoint, so
    // the in-flight count never reaches zero. The controller dies while it runs.
    let drain = flotilla_tests::flotctl_command(
        &c.pki.ca(),
        &c.pki.admin(),
        &c.url(),
        &[
            "exec",
            "gpu-a",
            "drain",
            "--arg",
            "container=slow-1",
            "--arg",
            "endpoint=http://127.0.0.1:9",
            "--arg",
            "deadline_s=8",
            "-o",
            "json",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    wait_line(&c, &c.agent("gpu-a"), &["executing signed command", "drain"]);
    c.kill9_controller();
    let answered = drain.wait_with_output().unwrap();
    assert!(!answered.status.success(), "the caller hears the controller went away: {answered:?}");

    // Offline, before the restart: every acknowledged seq is on disk.
    let ledgers: Vec<BTreeSet<u64>> = nodes.iter().map(|n| c.acked(n).into_iter().collect()).collect();
    for (node, acked) in nodes.iter().zip(&ledgers) {
        let seqs: BTreeSet<u64> = stored(&c, node).iter().map(|b| b.seq).collect();
        let missing: Vec<&u64> = acked.difference(&seqs).collect();
        assert!(missing.is_empty(), "{node}: acknowledged but not stored after SIGKILL: {missing:?}");
        eprintln!("{node}: {} acknowledged before the kill, all stored", acked.len());
    }

    c.restart_controller();
    for (node, acked) in nodes.iter().zip(&ledgers) {
        wait_whole_ledger(&c, node, acked.iter().max().copied().unwrap_or(0) + 20);
    }
    // The drain finishes on the agent (the deadline passes, the container is
    // stopped) and its result goes to the restarted controller.
    let failed = wait_line(&c, &c.agent("gpu-a"), &["command failed", "drain"]);
    assert!(failed.contains("deadline passed"), "{failed}");
    eventually_within(PATIENCE, "the drained container to stop", |_| (!c.running(&model)).then_some(()));
    let runs = executed(&c, "gpu-a");
    assert_eq!(runs.len(), 2, "the deploy and the drain: {runs:?}");
    assert!(runs.values().all(|n| *n == 1), "a command id ran twice: {runs:?}");
    for node in ["gpu-b", "gpu-c"] {
        assert!(executed(&c, node).is_empty(), "{node} ran nothing");
    }

    assert_eq!(c.stop_controller(), 0, "the controller stops cleanly");
    for node in nodes {
        let acked: BTreeSet<u64> = c.acked(node).into_iter().collect();
        let seqs: Vec<u64> = stored(&c, node).iter().map(|b| b.seq).collect();
        assert_eq!(gaps(&seqs), [], "{node}: no sequence gap in the store");
        let stored_seqs: BTreeSet<u64> = seqs.into_iter().collect();
        assert!(acked.is_subset(&stored_seqs), "{node}: every acknowledged seq is stored");
    }
    eprintln!("sigkill scenario: {:?}", started.elapsed());
}

#[test]
fn a_full_disk_refuses_writes_clearly_and_everything_buffered_arrives_once_space_returns() {
    if !docker_or_skip("disk full") {
        return;
    }
    let started = Instant::now();
    let c = Cluster::start(ControllerOpts { data_tmpfs: Some("64m".into()), ..Default::default() });
    let nodes = ["gpu-a", "gpu-b", "gpu-c"];
    for node in nodes {
        // A short ack timeout: batches refused during the outage are resent soon after it.
        c.start_agent(AgentOpts { interval: "100ms".into(), ack_timeout: Some("5s".into()), ..AgentOpts::new(node) });
    }
    for node in nodes {
        c.wait_acks(node, 20);
    }
    let controller = c.controller();
    let controller_started = c.started_at(&controller);

    // Fill the disk until writes fail.
    let fill = c.busybox(&controller, &["dd", "if=/dev/zero", "of=/data/filler", "bs=1M"]);
    let said = String::from_utf8_lossy(&fill.stderr);
    assert!(!fill.status.success() && said.contains("No space left"), "the filler fills the disk: {said}");
    c.wait_log(&controller, "no space left on its disk");
    let logs = c.logs(&controller);
    let error = logs.lines().find(|l| l.contains("telemetry commit failed")).unwrap_or_default();
    eprintln!("the controller says: {error}");
    assert!(error.contains("no space left on its disk") && error.contains("nothing is acknowledged"), "{error}");

    // Acks stop (a commit in flight when the disk filled may still be acknowledged).
    std::thread::sleep(Duration::from_secs(1));
    let stalled: Vec<usize> = nodes.iter().map(|n| c.acked(n).len()).collect();
    let buffer_before = buffer_bytes(&c, "gpu-a");
    std::thread::sleep(Duration::from_secs(4));
    let still: Vec<usize> = nodes.iter().map(|n| c.acked(n).len()).collect();
    assert_eq!(still, stalled, "nothing is acknowledged while the disk is full");
    // The controller stays up and answers: a read, and its health endpoint.
    let listed = c.nodes().expect("ListNodes answers while the disk is full");
    assert_eq!(listed.len(), 3);
    let health = https_get(&c.metrics_addr(), "/healthz", &c.pki.ca(), &c.pki.admin()).unwrap();
    assert_eq!(health.0, 200);
    // The agents keep what they make, on their own disks.
    assert!(buffer_bytes(&c, "gpu-a") > buffer_before, "gpu-a buffers while unacknowledged");
    // An agent that connects again meanwhile (restarted here) is welcomed, not
    // refused and called down: the controller knows its node, and keeps the new
    // inventory in memory until it can save it.
    let before_restart = c.logs(&controller).matches("welcoming a known node").count();
    let restart = docker(&["restart", "--time", "0", &c.agent("gpu-c")]);
    assert!(restart.status.success(), "{restart:?}");
    eventually_within(PATIENCE, "gpu-c welcomed again while the disk is full", |last| {
        let logs = c.logs(&controller);
        *last = logs.lines().last().unwrap_or_default().to_owned();
        (logs.matches("welcoming a known node").count() > before_restart).then_some(())
    });
    c.wait_state("gpu-c", "up");
    assert_eq!(c.acked("gpu-c").len(), stalled[2], "still nothing acknowledged");

    // Space returns: the store reopens itself and everything buffered arrives.
    let rm = c.busybox(&controller, &["rm", "/data/filler"]);
    assert!(rm.status.success(), "{rm:?}");
    c.wait_log(&controller, "store reopened after a failed write; writes resume");
    for (node, before) in nodes.iter().zip(&stalled) {
        wait_ledger(&c, node, *before as u64 + 50, *node == "gpu-c");
    }
    assert!(c.running(&controller), "the controller never stopped");
    assert_eq!(c.started_at(&controller), controller_started, "nor restarted");
    eprintln!("disk-full scenario: {:?}", started.elapsed());
}

/// Bytes in `node`'s disk buffer (its unacknowledged batches).
fn buffer_bytes(c: &Cluster, node: &str) -> u64 {
    let dir = c.agent_state(node).join("buffer");
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

#[test]
fn an_agent_with_a_skewed_clock_is_degraded_and_stored_at_controller_time() {
    if !docker_or_skip("skewed clock") {
        return;
    }
    let started = Instant::now();
    let c = Cluster::start(ControllerOpts::default());
    for node in ["gpu-a", "gpu-b"] {
        c.start_agent(AgentOpts::new(node));
    }
    // Ten minutes ahead: every wall-clock reading of the agent (batch times,
    // heartbeats, TLS validity checks) is off; its timers are not.
    let skewed = c.start_agent(AgentOpts { faketime: Some("+10m".into()), ..AgentOpts::new("gpu-skew") });
    let entry = c.wait_state("gpu-skew", "degraded");
    let reason = entry["state_reason"].as_str().unwrap_or_default().to_owned();
    eprintln!("gpu-skew on connect: {}; then: {reason}", skewed["state"]);
    assert!(reason.contains("ahead of the controller's"), "{reason}");
    c.wait_state("gpu-a", "up");
    c.wait_acks("gpu-skew", 10);

    let skew_of = |node: &str| {
        let (status, body) = https_get(&c.metrics_addr(), "/metrics", &c.pki.ca(), &c.pki.admin()).unwrap();
        assert_eq!(status, 200);
        metric_value(&body, "flotilla_agent_clock_skew_seconds", &[("node", node)])
    };
    let skew = eventually_within(PATIENCE, "the skew metric", |last| {
        let v = skew_of("gpu-skew");
        *last = format!("{v:?}");
        v
    });
    eprintln!("flotilla_agent_clock_skew_seconds{{node=\"gpu-skew\"}} {skew}");
    assert!((590.0..=610.0).contains(&skew), "about +600 s: {skew}");
    let fine = skew_of("gpu-a").expect("measured for every agent");
    assert!(fine.abs() < 10.0, "gpu-a's clock is the controller's: {fine}");

    // The agent judges a command's validity by its own clock, ten minutes ahead:
    // signed at controller time the envelope would look 10 minutes expired to it.
    // The controller signs in the agent's time, so the command runs.
    let out = c.flotctl(&["exec", "gpu-skew", "noop", "-o", "json"]);
    let answer = json(&out);
    assert_eq!(answer["status"], "succeeded", "{answer}");

    let stop_at = now_unix_ms();
    assert_eq!(c.stop_controller(), 0);
    let batches = stored(&c, "gpu-skew");
    assert!(!batches.is_empty());
    let sample =
        |b: &TelemetryBatch| b.samples.iter().find(|s| s.name == "flotilla_agent_clock_skew_seconds").map(|s| s.value);
    for b in &batches {
        assert!(b.created_unix_ms <= stop_at + 5_000, "batch {} is not in the future: {}", b.seq, b.created_unix_ms);
        let skew = sample(b).unwrap_or_else(|| panic!("batch {} carries the skew it was shifted by", b.seq));
        assert!(skew > 590.0, "batch {}: {skew}", b.seq);
    }
    let normal = stored(&c, "gpu-a");
    assert!(normal.iter().all(|b| sample(b).is_some_and(|s| s.abs() < 10.0)));
    eprintln!("skew scenario: {} batches of gpu-skew, {:?}", batches.len(), started.elapsed());
}

/// A deployment spec: the stand-in on gpu-a/b/c behind the gateway `gw`, rolling.
fn rollout_spec(c: &Cluster, name: &str, tag: &str) -> std::path::PathBuf {
    let text = format!(
        "name: {name}\n\
         model: {{ name: llama-test, revision: {tag} }}\n\
         runtime:\n  image: {image}\n  port: 8000\n  host_port: 18000\n  gpus: 1\n\
         \x20 env: {{ STANDIN_MODEL: llama-test, STANDIN_TAG: {tag} }}\n\
         \x20 health: {{ command: [/flotilla-standin, probe, \"http://127.0.0.1:8000/v1/models\"], interval: 1s, timeout: 2s, retries: 30 }}\n\
         placement: {{ nodes: [gpu-a, gpu-b, gpu-c], replicas: 3 }}\n\
         gateway: {{ node: gw, upstream: llama }}\n\
         strategy: {{ type: rolling, bake: 3s, min_healthy_time: 1s }}\n\
         gates: {{ baseline_factor: 20, p95_latency: 5s, p95_ttft: 5s, min_requests: 20 }}\n",
        image = standin_image()
    );
    let path = c.dir.path().join(format!("{name}-{tag}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The tag of the replica that answers a chat completion through `addr` (nginx).
fn answered_by(addr: &str) -> String {
    use std::io::{Read, Write};
    let body = r#"{"model":"llama-test","messages":[{"role":"user","content":"hi"}]}"#;
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    raw.lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| {
            l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("x-standin-tag")).map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default()
}

#[test]
fn sigkill_mid_rollout_resumes_it_with_no_command_run_twice() {
    if !docker_or_skip("rollout") {
        return;
    }
    let started = Instant::now();
    let c = Cluster::start(ControllerOpts::default());
    let nodes = ["gpu-a", "gpu-b", "gpu-c"];
    for node in nodes {
        c.start_agent(AgentOpts {
            interval: "1s".into(),
            docker_socket: true,
            own_address: true,
            ..AgentOpts::new(node)
        });
    }
    // The gateway: an agent on this host in front of a real nginx, which reaches
    // each node's replicas at that node's address.
    let nginx = Nginx::start(&c.dir.path().join("nginx"), free_port());
    let key = format!("command_key = \"{}\"\n", c.controller_data().join("command-signing.pub").display());
    let gateway = flotilla_tests::Agent::start(
        c.dir.path(),
        &c.pki,
        &c.url(),
        "gw",
        flotilla_tests::AgentOpts {
            gpus: 0,
            interval: "1s",
            config_toml: Some(format!("{key}{}", nginx.agent_section(free_port()))),
            ..Default::default()
        },
    );
    c.wait_state("gw", "up");
    let status = |name: &str| json(&c.flotctl(&["rollout", "status", name, "-o", "json"]));
    let wait_rollout = |what: &str, done: &dyn Fn(&serde_json::Value) -> bool| {
        eventually_within(Duration::from_secs(180), what, |last| {
            let s = status("rf");
            *last = format!(
                "state {} step {}/{} phase {} error {}",
                s["state"], s["step"], s["steps"], s["phase"], s["error"]
            );
            assert!(s["state"] != "failed" && s["state"] != "rolled_back", "the rollout ended badly: {s:#}");
            done(&s).then_some(s)
        })
    };
    let apply = |spec: &std::path::Path| {
        let out = c.flotctl(&["deploy", "apply", "-f", spec.to_str().unwrap(), "-o", "json"]);
        assert!(out.status.success(), "apply: {out:?}");
    };

    apply(&rollout_spec(&c, "rf", "v1"));
    wait_rollout("v1 to roll out", &|s| s["state"] == "succeeded");
    nginx.wait_for_one_worker();
    eventually_within(PATIENCE, "v1 to answer through nginx", |last| {
        *last = answered_by(&nginx.public_addr());
        (last == "v1").then_some(())
    });
    apply(&rollout_spec(&c, "rf", "v2"));
    // Kill the controller once the first replacement has taken traffic.
    let at_kill = wait_rollout("the first replacement to bake", &|s| {
        s["phase"] == "baking" && s["step"].as_u64().unwrap_or(0) >= 3
    });
    c.kill9_controller();
    eprintln!(
        "killed at step {}/{} ({}), phase {}",
        at_kill["step"], at_kill["steps"], at_kill["step_label"], at_kill["phase"]
    );
    assert!(at_kill["step"].as_u64() < at_kill["steps"].as_u64(), "mid-rollout: {at_kill:#}");
    c.restart_controller();
    let done = wait_rollout("v2 to finish after the restart", &|s| s["state"] == "succeeded");
    assert_eq!(done["to_revision"], 2);
    nginx.wait_for_one_worker();
    for _ in 0..6 {
        assert_eq!(answered_by(&nginx.public_addr()), "v2", "nginx sends everything to v2");
    }

    // One container per node and revision; only v2 runs.
    let listed = String::from_utf8_lossy(
        &docker(&["ps", "-a", "--filter", &format!("name={}", c.id), "--format", "{{.Names}} {{.State}}"]).stdout,
    )
    .into_owned();
    for node in nodes {
        let prefix = format!("{}rf-", c.model_prefix(node));
        let mine: Vec<&str> = listed.lines().filter(|l| l.starts_with(&prefix)).collect();
        let mut want = vec![format!("{prefix}1 exited"), format!("{prefix}2 running")];
        let mut got: Vec<String> = mine.iter().map(|l| (*l).to_owned()).collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "{node}: one v1 (stopped) and one v2 (running)");
    }
    // No command ran twice on any agent, the gateway included.
    for node in nodes {
        let runs = executed(&c, node);
        assert!(!runs.is_empty(), "{node} ran the rollout's commands");
        assert!(runs.values().all(|n| *n == 1), "{node}: a command id ran twice: {runs:?}");
    }
    let mut gw_runs = BTreeMap::<String, usize>::new();
    for line in gateway.proc.log_text().lines().filter(|l| l.contains("executing signed command")) {
        if let Some(id) = line.split("command_id=").nth(1).and_then(|r| r.split_whitespace().next()) {
            *gw_runs.entry(id.trim_matches(|c| matches!(c, '"' | '}' | ':' | ',')).to_owned()).or_default() += 1;
        }
    }
    assert!(!gw_runs.is_empty() && gw_runs.values().all(|n| *n == 1), "gw: {gw_runs:?}");
    drop(gateway);
    eprintln!("rollout scenario: {:?}", started.elapsed());
}
