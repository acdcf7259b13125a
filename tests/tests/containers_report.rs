//! The agent's managed containers reach the controller: deployed through a
//! signed command, listed in `flotctl nodes show`, re-found by label and
//! reported again after the agent is killed (with the controller restarted, so
//! nothing but the agent's fresh report can show them), updated when changed
//! behind the agent's back (`docker stop`, found by the periodic re-listing)
//! and when stopped by a command. Diagnostics carry the agent's own recent warnings. Real Docker.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use flotilla_tests::{
    Agent, AgentOpts, ContainerCleanup, Controller, Pki, eventually_within, flotctl, json, standin_image,
    unique_container_name, wait_state,
};

/// The containers `nodes show -o json` lists for `node` (`None` when not reported).
fn containers(pki: &Pki, url: &str, node: &str) -> Option<Vec<serde_json::Value>> {
    let v = json(&flotctl(pki, url, &["nodes", "show", node, "-o", "json"]));
    v["containers"].as_array().cloned()
}

fn find<'a>(list: &'a [serde_json::Value], deployment: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|c| c["deployment"] == deployment)
}

#[test]
fn deployed_containers_are_reported_refound_after_a_restart_and_updated() {
    let image = standin_image();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let mut controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let key = controller.data_dir.join("command-signing.pub");
    let mut agent = Agent::start(
        dir.path(),
        &pki,
        &url,
        "gpu-a",
        AgentOpts {
            gpus: 1,
            // A short re-listing interval, so that `docker stop` shows up quickly.
            config_toml: Some(format!("command_key = \"{}\"\n[runtime]\nrelist_interval = \"1s\"\n", key.display())),
            ..Default::default()
        },
    );
    wait_state(&pki, &url, "gpu-a", "up");
    assert!(containers(&pki, &url, "gpu-a").is_some(), "an agent with a reachable runtime reports a list in its hello");

    let name = unique_container_name("report");
    let container = format!("{name}-1");
    let _cleanup = ContainerCleanup::new([container.clone()]);
    let spec = dir.path().join("spec.yaml");
    std::fs::write(&spec, format!("name: {name}\nrevision: \"1\"\nimage: {image}\n")).unwrap();
    let v = json(&flotctl(&pki, &url, &["exec", "gpu-a", "deploy", "-f", spec.to_str().unwrap(), "-o", "json"]));
    assert_eq!(v["status"], "succeeded", "{v}");

    // The report travels ahead of the result: listed as soon as the command returns.
    let list = containers(&pki, &url, "gpu-a").expect("containers reported");
    let c = find(&list, &name).unwrap_or_else(|| panic!("{name} missing from {list:?}"));
    assert_eq!(
        (c["name"].as_str(), c["state"].as_str(), c["revision"].as_str()),
        (Some(&*container), Some("running"), Some("1"))
    );
    assert_eq!(c["image"], image.as_str());
    assert_eq!(c["id"].as_str().map(str::len), Some(12), "{c}");
    assert!(c["created_unix_ms"].as_i64().is_some_and(|ms| ms > 0), "{c}");

    // Kill the agent, and restart the controller so that it forgets what it held.
    agent.proc.kill9();
    controller.proc.kill9();
    controller.restart();
    wait_state(&pki, &url, "gpu-a", "down");
    assert_eq!(containers(&pki, &url, "gpu-a"), None, "a fresh controller knows no containers until the agent reports");
    agent.restart();
    wait_state(&pki, &url, "gpu-a", "up");
    eventually_within(Duration::from_secs(30), "the restarted agent to report the container", |last| {
        let list = containers(&pki, &url, "gpu-a")?;
        *last = format!("{list:?}");
        find(&list, &name).filter(|c| c["state"] == "running").map(|_| ())
    });

    // Changed behind the agent's back, with no command passing through it:
    // the periodic re-listing reports it.
    for (verb, state) in [("stop", "exited"), ("start", "running")] {
        let mut cmd = std::process::Command::new("docker");
        cmd.arg(verb);
        if verb == "stop" {
            cmd.args(["-t", "1"]);
        }
        let out = cmd.arg(&container).output().expect("run docker");
        assert!(out.status.success(), "docker {verb}: {}", String::from_utf8_lossy(&out.stderr));
        eventually_within(Duration::from_secs(15), &format!("the agent to report `docker {verb}`"), |last| {
            let list = containers(&pki, &url, "gpu-a")?;
            *last = format!("{list:?}");
            find(&list, &name).filter(|c| c["state"] == state).map(|_| ())
        });
    }

    let v = json(&flotctl(
        &pki,
        &url,
        &["exec", "gpu-a", "stop", "--arg", &format!("container={container}"), "--arg", "timeout_s=2", "-o", "json"],
    ));
    assert_eq!(v["status"], "succeeded", "{v}");
    let list = containers(&pki, &url, "gpu-a").expect("containers reported");
    assert_eq!(find(&list, &name).map(|c| c["state"].clone()), Some("exited".into()), "{list:?}");

    // A failed command is a warning on the agent; diagnostics carry it.
    let missing = format!("{name}-missing");
    let v = json(&flotctl(
        &pki,
        &url,
        &["exec", "gpu-a", "inspect", "--arg", &format!("container={missing}"), "-o", "json"],
    ));
    assert_eq!(v["status"], "failed", "{v}");
    let v = json(&flotctl(&pki, &url, &["exec", "gpu-a", "diagnostics", "-o", "json"]));
    assert_eq!(v["status"], "succeeded", "{v}");
    let recent = v["recent_agent_errors"].as_array().unwrap_or_else(|| panic!("no recent_agent_errors in {v}"));
    let failed = recent
        .iter()
        .find(|e| {
            e["message"] == "command failed" && e["fields"]["detail"].as_str().is_some_and(|d| d.contains(&missing))
        })
        .unwrap_or_else(|| panic!("the failed inspect is not among {recent:?}"));
    assert_eq!(failed["level"], "WARN");
    assert!(failed["at_unix_ms"].as_i64().is_some_and(|ms| ms > 0));
    assert!(find(v["containers"].as_array().unwrap(), &name).is_some(), "diagnostics list the container too: {v}");
}
