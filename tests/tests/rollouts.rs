//! Rollouts end to end: the real controller, three GPU agents (simulated GPUs)
//! and a gateway agent in front of a real nginx (Debian package), the stand-in
//! model server (test equipment playing vLLM) in containers on this machine's
//! Docker engine. The three agents share that engine, so each gets its own
//! container name prefix and its own loopback address (127.0.0.2-4, all on
//! `lo`) for the replicas it publishes.
//!
//! - blue-green v1 → v2 in steps of 10/50/100: at each step the share of
//!   requests v2 answers through nginx matches the weight (nginx's smooth
//!   weighted round-robin in one worker is exact per cycle; tolerance ±3 points);
//! - v3 with an injected error rate: the error gate fails, traffic goes back to
//!   v2 (100 %), v3 is stopped;
//! - a rolling update with no spare GPU memory goes retire-first, one replica at
//!   a time, and a controller killed (SIGKILL) mid-rollout resumes it to the end
//!   with no container started twice and no command run twice.

// Test equipment: a failed setup step should stop the test loudly, with its reason.
#![allow(clippy::expect_used, clippy::unwrap_used)]
// A synchronous test: waiting is a plain sleep.
#![allow(clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use flotilla_tests::nginx::Nginx;
use flotilla_tests::{
    Agent, AgentOpts, ContainerCleanup, Controller, Pki, eventually_within, flotctl, free_port, standin_image,
    wait_state,
};

const NODES: [(&str, &str); 3] = [("gpu-a", "127.0.0.2"), ("gpu-b", "127.0.0.3"), ("gpu-c", "127.0.0.4")];
const MODEL: &str = "llama-test";

/// A chat completion through `addr`: (status, the `x-standin-tag` of the replica that answered).
fn chat(addr: &str) -> (u16, String) {
    let body = format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return (0, String::new()) };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    let status = raw.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let head = raw.split("\r\n\r\n").next().unwrap_or_default();
    let tag = head
        .lines()
        .find_map(|l| {
            l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("x-standin-tag")).map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, tag)
}

/// `n` requests through nginx; how many `tag` answered. Every request must succeed.
fn share_of(nginx: &Nginx, tag: &str, n: usize) -> usize {
    nginx.wait_for_one_worker();
    let addr = nginx.public_addr();
    (0..n)
        .filter(|_| {
            let (status, by) = chat(&addr);
            assert_eq!(status, 200, "a request through nginx failed");
            by == tag
        })
        .count()
}

/// Sends requests through nginx from four threads until dropped; counts failures.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    failed: Arc<AtomicUsize>,
}

impl Load {
    fn start(addr: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicUsize::new(0));
        let threads = (0..4)
            .map(|_| {
                let (stop, failed, addr) = (stop.clone(), failed.clone(), addr.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if chat(&addr).0 != 200 {
                            failed.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                })
            })
            .collect();
        Self { stop, threads, failed }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The fleet: controller, gateway agent + nginx, three GPU agents.
struct Fleet {
    dir: tempfile::TempDir,
    pki: Pki,
    controller: Controller,
    nginx: Nginx,
    agents: Vec<Agent>,
    /// Container name prefix per node, unique to this test run.
    prefix: String,
    _gateway: Agent,
}

impl Fleet {
    fn start(gpus: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(&dir.path().join("pki"));
        let controller = Controller::start(dir.path(), &pki);
        let url = controller.url();
        // The bootstrap upstream points at nothing yet: the first rollout replaces it.
        let nginx = Nginx::start(&dir.path().join("nginx"), free_port());
        let key = format!("command_key = \"{}\"\n", controller.data_dir.join("command-signing.pub").display());
        let gateway = Agent::start(
            dir.path(),
            &pki,
            &url,
            "gw",
            AgentOpts {
                gpus: 0,
                interval: "1s",
                config_toml: Some(format!("{key}{}", nginx.agent_section(free_port()))),
                ..Default::default()
            },
        );
        let prefix = format!("ft{:06x}", rand_u32() & 0xff_ffff);
        let agents = NODES
            .iter()
            .map(|(node, address)| {
                let toml = format!(
                    "{key}[labels]\naddress = \"{address}\"\n[runtime]\nrelist_interval = \"1s\"\nname_prefix = \"{prefix}-{node}-\"\n"
                );
                Agent::start(dir.path(), &pki, &url, node, AgentOpts { gpus, interval: "1s", config_toml: Some(toml), ..Default::default() })
            })
            .collect();
        for node in ["gw", "gpu-a", "gpu-b", "gpu-c"] {
            wait_state(&pki, &url, node, "up");
        }
        Self { dir, pki, controller, nginx, agents, prefix, _gateway: gateway }
    }

    fn url(&self) -> String {
        self.controller.url()
    }

    /// Every engine container name this fleet may create for deployment `name`.
    fn cleanup(&self, name: &str) -> ContainerCleanup {
        let mut c = ContainerCleanup::default();
        for (node, _) in NODES {
            for rev in 1..=4 {
                c.add(format!("{}-{node}-{name}-{rev}", self.prefix));
            }
        }
        c
    }

    fn spec(
        &self,
        name: &str,
        revision_tag: &str,
        extra_env: &str,
        strategy: &str,
        runtime_extra: &str,
    ) -> std::path::PathBuf {
        let image = standin_image();
        let text = format!(
            "name: {name}\n\
             model: {{ name: {MODEL}, revision: {revision_tag} }}\n\
             runtime:\n  image: {image}\n  port: 8000\n  host_port: 18000\n  gpus: 1\n{runtime_extra}\
             \x20 env: {{ STANDIN_MODEL: {MODEL}, STANDIN_TAG: {revision_tag}{extra_env} }}\n\
             \x20 health: {{ command: [/flotilla-standin, probe, \"http://127.0.0.1:8000/v1/models\"], interval: 1s, timeout: 2s, retries: 30 }}\n\
             placement: {{ nodes: [gpu-a, gpu-b, gpu-c], replicas: 3 }}\n\
             gateway: {{ node: gw, upstream: llama }}\n\
             strategy: {strategy}\n\
             # The stand-in answers in well under a millisecond: a relative latency\n\
             # comparison would be noise, so the factor is wide; errors still compare.\n\
             gates: {{ baseline_factor: 20, p95_latency: 5s, p95_ttft: 5s, min_requests: 20 }}\n"
        );
        let path = self.dir.path().join(format!("{name}-{revision_tag}.yaml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn flotctl(&self, args: &[&str]) -> std::process::Output {
        flotctl(&self.pki, &self.url(), args)
    }

    fn status(&self, name: &str) -> serde_json::Value {
        let out = self.flotctl(&["rollout", "status", name, "-o", "json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until `name`'s latest rollout satisfies `done`.
    fn wait_rollout(
        &self,
        name: &str,
        what: &str,
        patience: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually_within(patience, what, |last| {
            let s = self.status(name);
            *last = format!(
                "state {} step {}/{} {} phase {} error {}",
                s["state"], s["step"], s["steps"], s["step_label"], s["phase"], s["error"]
            );
            assert!(
                !(s["state"] == "failed" || (s["state"] == "rolled_back" && !what.contains("roll"))),
                "the rollout ended badly: {s:#}"
            );
            done(&s).then_some(s)
        })
    }

    fn apply(&self, spec: &Path) -> serde_json::Value {
        let out = self.flotctl(&["deploy", "apply", "-f", spec.to_str().unwrap(), "-o", "json"]);
        assert!(
            out.status.success(),
            "apply failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The engine's containers of deployment `name` on `node`: (name, running).
    fn containers(&self, node: &str, name: &str) -> Vec<(String, bool)> {
        let prefix = format!("{}-{node}-{name}-", self.prefix);
        let out = Command::new("docker")
            .args(["ps", "-a", "--filter", &format!("name=^{prefix}"), "--format", "{{.Names}} {{.State}}"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once(' ').map(|(n, s)| (n.to_owned(), s == "running")))
            .collect()
    }
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

fn is_step(s: &serde_json::Value, share: u64) -> bool {
    s["state"] == "progressing" && s["phase"] == "baking" && s["new_share"] == share
}

#[test]
fn blue_green_steps_traffic_and_a_failing_revision_rolls_back_to_the_last_good_one() {
    let fleet = Fleet::start(2);
    let name = "bg";
    let _cleanup = fleet.cleanup(name);
    let patience = Duration::from_secs(180);

    // Bad input is refused before anything starts, with the reason.
    let v1 = fleet.spec(name, "v1", "", "{ type: blue-green, bake: 8s, min_healthy_time: 1s }", "");
    let good = std::fs::read_to_string(&v1).unwrap();
    for (what, text, reason) in [
        ("an unknown field", good.replace("replicas: 3", "replicas: 3, zone: eu"), "unknown field `zone`"),
        ("an unknown node", good.replace("gpu-c]", "gpu-z]"), "no node gpu-z"),
        ("more GPUs than a node has", good.replace("gpus: 1", "gpus: 3"), "node gpu-a has 2 GPU(s); a replica needs 3"),
        ("a gateway without nginx", good.replace("node: gw,", "node: gpu-a,"), "has no [gateway] section"),
    ] {
        let path = fleet.dir.path().join("bad.yaml");
        std::fs::write(&path, text).unwrap();
        let out = fleet.flotctl(&["deploy", "apply", "-f", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(reason), "{what}: {out:?}");
    }
    let listed = fleet.flotctl(&["deploy", "ls", "-o", "json"]);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&listed.stdout).unwrap(), serde_json::json!([]));

    // v1: the first deploy starts every replica, then sends it all traffic.
    let plan = fleet.flotctl(&["deploy", "plan", "-f", v1.to_str().unwrap(), "-o", "json"]);
    assert!(plan.status.success(), "{plan:?}");
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["plan"]["strategy"], "initial", "{plan:#}");
    let applied = fleet.apply(&v1);
    assert_eq!(applied["revision"], 1, "{applied:#}");
    fleet.wait_rollout(name, "v1 to roll out", patience, |s| s["state"] == "succeeded");
    assert_eq!(share_of(&fleet.nginx, "v1", 30), 30);

    // v2, blue-green 10 → 50 → 100: the share v2 answers follows each step.
    let v2 =
        fleet.spec(name, "v2", "", "{ type: blue-green, steps: [10, 50, 100], bake: 8s, min_healthy_time: 1s }", "");
    let plan = fleet.flotctl(&["deploy", "plan", "-f", v2.to_str().unwrap(), "-o", "json"]);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["plan"]["strategy"], "blue-green", "spare simulated GPUs allow a surge: {plan:#}");
    fleet.apply(&v2);
    for share in [10u64, 50, 100] {
        let s = fleet.wait_rollout(name, &format!("the {share} % step"), patience, |s| is_step(s, share));
        if share == 10 {
            // A second rollout of the same deployment is refused while one runs.
            let out = fleet.flotctl(&["deploy", "apply", "-f", v1.to_str().unwrap()]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && stderr.contains("is progressing"), "{out:?}");
        }
        let weights = s["weights"].as_array().unwrap();
        assert!(!weights.is_empty(), "{s:#}");
        let got = share_of(&fleet.nginx, "v2", 100);
        eprintln!("step {share} %: v2 answered {got} of 100");
        assert!((got as i64 - share as i64).abs() <= 3, "step {share} %: v2 answered {got} of 100 (±3)");
        let after = fleet.status(name);
        assert_eq!(after["new_share"], share, "the step did not change while measuring: {after:#}");
    }
    let done = fleet.wait_rollout(name, "v2 to finish", patience, |s| s["state"] == "succeeded");
    assert_eq!(done["to_revision"], 2);
    for (node, _) in NODES {
        let list = fleet.containers(node, name);
        let running: Vec<&String> = list.iter().filter(|(_, r)| *r).map(|(n, _)| n).collect();
        assert_eq!(running, [&format!("{}-{node}-{name}-2", fleet.prefix)], "only v2 runs on {node}: {list:?}");
    }

    // v3 answers half its requests with 500: the error gate fails during the
    // first bake and the rollout goes back: all traffic to v2, v3 stopped.
    let load = Load::start(fleet.nginx.public_addr());
    let v3 = fleet.spec(
        name,
        "v3",
        ", STANDIN_ERROR_RATE: \"0.5\"",
        "{ type: blue-green, steps: [10, 50, 100], bake: 60s, min_healthy_time: 1s }",
        "",
    );
    fleet.apply(&v3);
    // An operator watching: one JSON line per change, and the watch ends with the rollout.
    let watch = flotilla_tests::flotctl_command(
        &fleet.pki.ca(),
        &fleet.pki.admin(),
        &fleet.url(),
        &["rollout", "status", name, "--watch", "-o", "json"],
    )
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let back = fleet.wait_rollout(name, "v3 to roll back", patience, |s| s["state"] == "rolled_back");
    let watched = watch.wait_with_output().unwrap();
    assert!(watched.status.success(), "{watched:?}");
    let last_line = String::from_utf8_lossy(&watched.stdout).lines().last().unwrap_or_default().to_owned();
    let last: serde_json::Value = serde_json::from_str(&last_line).unwrap();
    assert_eq!(last["state"], "rolled_back", "the watch ends on the final state: {last_line}");
    drop(load);
    eprintln!("rolled back: {}", back["error"]);
    let events = back["events"].as_array().unwrap();
    let turned = events.iter().find(|e| e["text"].as_str().unwrap().starts_with("going back")).unwrap();
    let took = back["finished_unix_ms"].as_i64().unwrap() - turned["at_unix_ms"].as_i64().unwrap();
    // Reported, not asserted (tests do not time things): the issue asks for 30 s.
    eprintln!("from the failed gate to v2 serving alone with v3 stopped: {took} ms");
    assert!(back["error"].as_str().unwrap().contains("error_ratio"), "{back:#}");
    let failed_gate = back["gates"].as_array().unwrap().iter().any(|g| g["gate"] == "error_ratio");
    assert!(failed_gate || back["reverting"] == true, "{back:#}");
    assert_eq!(share_of(&fleet.nginx, "v2", 50), 50, "100 % of traffic is back on v2");
    for (node, _) in NODES {
        let list = fleet.containers(node, name);
        let v3_running = list.iter().any(|(n, r)| n.ends_with("-3") && *r);
        assert!(!v3_running, "v3 is stopped on {node}: {list:?}");
    }
    let history = fleet.flotctl(&["deploy", "history", name, "-o", "json"]);
    let history: serde_json::Value = serde_json::from_slice(&history.stdout).unwrap();
    assert_eq!(history["active_revision"], 2, "{history:#}");
    let audit = fleet.flotctl(&["audit", "ls", "-o", "json"]);
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.contains("deploy.apply") && audit.contains("rollout.end"), "{audit}");
}

#[test]
fn retire_first_rolling_update_resumes_after_a_controller_kill_with_nothing_run_twice() {
    // One simulated GPU per node, about 91 % of its memory in use: no room for a
    // 40 GiB replica beside the running one.
    let mut fleet = Fleet::start(1);
    let name = "rf";
    let _cleanup = fleet.cleanup(name);
    let patience = Duration::from_secs(240);
    let memory = "  gpu_memory: 40GiB\n";
    let v1 = fleet.spec(name, "v1", "", "{ type: rolling, bake: 3s, min_healthy_time: 1s }", "");
    fleet.apply(&v1);
    fleet.wait_rollout(name, "v1 to roll out", patience, |s| s["state"] == "succeeded");

    let v2 = fleet.spec(name, "v2", "", "{ type: rolling, bake: 4s, min_healthy_time: 1s }", memory);
    let plan = fleet.flotctl(&["deploy", "plan", "-f", v2.to_str().unwrap(), "-o", "json"]);
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["plan"]["strategy"], "retire-first", "{plan:#}");
    let notes = plan["plan"]["notes"].to_string();
    assert!(notes.contains("no spare GPU") && notes.contains("2 of 3 replicas"), "{notes}");
    let load = Load::start(fleet.nginx.public_addr());
    fleet.apply(&v2);

    // Kill the controller in the middle: after the first replacement took traffic.
    fleet.wait_rollout(name, "the first replacement to bake", patience, |s| {
        s["phase"] == "baking" && s["step"].as_u64().unwrap_or(0) >= 4
    });
    fleet.controller.proc.kill9();
    std::thread::sleep(Duration::from_secs(2));
    fleet.controller.restart();
    let done = fleet.wait_rollout(name, "v2 to finish after the restart", patience, |s| s["state"] == "succeeded");
    let failed = load.failed.load(Ordering::Relaxed);
    drop(load);
    eprintln!("requests through nginx that failed during the retire-first rollout: {failed}");
    assert_eq!(done["to_revision"], 2);

    // One container per node and revision; only v2 runs.
    for (node, _) in NODES {
        let list = fleet.containers(node, name);
        assert_eq!(list.len(), 2, "exactly one v1 and one v2 container on {node}: {list:?}");
        let running: Vec<&String> = list.iter().filter(|(_, r)| *r).map(|(n, _)| n).collect();
        assert_eq!(running, [&format!("{}-{node}-{name}-2", fleet.prefix)], "{list:?}");
    }
    // No command ran twice on any agent: each id executed once.
    for agent in &fleet.agents {
        let log = agent.proc.log_text();
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for line in log.lines().filter(|l| l.contains("executing signed command")) {
            if let Some(id) = line.split("command_id=").nth(1).and_then(|r| r.split_whitespace().next()) {
                *seen.entry(id.to_owned()).or_default() += 1;
            }
        }
        assert!(!seen.is_empty(), "{} executed commands", agent.node);
        assert!(seen.values().all(|n| *n == 1), "{}: a command id ran twice: {seen:?}", agent.node);
    }
}
