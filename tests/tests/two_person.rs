//! The two-person rule end to end, with real flotctl processes: a held revoke
//! waits (nothing happens) until a second admin approves it, then runs as its
//! requester asked and the waiting flotctl prints its result; the requester
//! cannot approve their own request and an operator cannot approve at all; a
//! held stop is withdrawn; a verb outside the rule runs at once; every step is
//! in the audit log.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Stdio;

use flotilla_common::Role;
use flotilla_tests::{
    Agent, AgentOpts, Controller, Pki, eventually, flotctl, flotctl_as, flotctl_command, json, state_of, wait_state,
};

/// The pending approvals, as `approvals ls -o json` lists them.
fn pending(pki: &Pki, url: &str) -> Vec<serde_json::Value> {
    json(&flotctl(pki, url, &["approvals", "ls", "-o", "json"])).as_array().unwrap().clone()
}

#[test]
fn destructive_verbs_wait_for_a_second_admin() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let config = "[approvals]\nrequire = [\"stop\", \"revoke\"]\nttl = \"10m\"\n";
    let controller = Controller::start_configured(dir.path(), &pki, config);
    let url = controller.url();
    // gpu-a runs commands (it pins the controller's command key).
    let key = controller.data_dir.join("command-signing.pub");
    let pinned =
        AgentOpts { config_toml: Some(format!("command_key = \"{}\"\n", key.display())), ..Default::default() };
    let _a = Agent::start(dir.path(), &pki, &url, "gpu-a", pinned);
    let _b = Agent::start(dir.path(), &pki, &url, "gpu-b", AgentOpts::default());
    wait_state(&pki, &url, "gpu-a", "up");
    wait_state(&pki, &url, "gpu-b", "up");
    let alice = pki.operator("alice", Role::Admin);
    let olga = pki.operator("olga", Role::Operator);

    // Alice asks to revoke gpu-b: held. Her flotctl says so and waits.
    let waiting =
        flotctl_command(&pki.ca(), &alice, &url, &["nodes", "revoke", "gpu-b", "--reason", "rma", "-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let held = eventually("the revoke to be held", |last| {
        let list = pending(&pki, &url);
        *last = format!("{list:?}");
        list.into_iter().find(|a| a["verb"] == "revoke")
    });
    let id = held["id"].as_str().unwrap().to_owned();
    assert_eq!(held["state"], "pending");
    assert_eq!(held["target"], "gpu-b");
    assert_eq!(held["requested_by"], "operator alice (admin)");
    assert!(held["summary"].as_str().unwrap().contains("revocation of node gpu-b"), "{held}");
    let nodes = flotilla_tests::nodes(&pki, &url).unwrap();
    assert_eq!(state_of(&nodes, "gpu-b").as_deref(), Some("up"), "nothing happens while it waits");

    // Not by herself, not by an operator.
    let own = flotctl_as(&pki.ca(), &alice, &url, &["approve", &id]);
    assert_eq!(own.status.code(), Some(1), "{own:?}");
    assert!(String::from_utf8_lossy(&own.stderr).contains("needs a different admin"), "{own:?}");
    let by_operator = flotctl_as(&pki.ca(), &olga, &url, &["approve", &id]);
    assert_eq!(by_operator.status.code(), Some(1), "{by_operator:?}");
    assert!(String::from_utf8_lossy(&by_operator.stderr).contains("approving needs role admin"), "{by_operator:?}");

    // A second admin approves: the revoke runs as Alice asked.
    let approved = flotctl(&pki, &url, &["approve", &id, "-o", "json"]);
    assert!(approved.status.success(), "{approved:?}");
    let approved = json(&approved);
    assert_eq!(approved["state"], "succeeded", "{approved}");
    assert_eq!(approved["decided_by"], "operator admin (admin)");
    let out = waiting.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("flotctl approve {id}")), "the requester is told what to ask for: {stderr}");
    let revoked = json(&out);
    assert_eq!(revoked["revoked_by"], "operator alice (admin)", "it ran as its requester: {revoked}");
    wait_state(&pki, &url, "gpu-b", "revoked");
    let again = flotctl(&pki, &url, &["approve", &id]);
    assert_eq!(again.status.code(), Some(1), "decided once: {again:?}");
    assert!(String::from_utf8_lossy(&again.stderr).contains("not pending"), "{again:?}");

    // Olga's stop is held too; she withdraws it, and her waiting flotctl says so.
    let stop = flotctl_command(&pki.ca(), &olga, &url, &["exec", "gpu-a", "stop", "--arg", "container=vllm-a"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let held = eventually("the stop to be held", |last| {
        let list = pending(&pki, &url);
        *last = format!("{list:?}");
        list.into_iter().find(|a| a["verb"] == "stop")
    });
    let stop_id = held["id"].as_str().unwrap().to_owned();
    assert!(held["summary"].as_str().unwrap().contains("stop of container vllm-a on node gpu-a"), "{held}");
    let no_reason = flotctl_as(&pki.ca(), &olga, &url, &["approve", &stop_id, "--reject"]);
    assert_eq!(no_reason.status.code(), Some(64), "a rejection needs a reason: {no_reason:?}");
    let withdrawn = flotctl_as(&pki.ca(), &olga, &url, &["approve", &stop_id, "--reject", "--reason", "wrong node"]);
    assert!(withdrawn.status.success(), "{withdrawn:?}");
    let out = stop.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("rejected by operator olga (operator): wrong node"), "{text}");
    assert!(pending(&pki, &url).is_empty(), "nothing left pending");

    // A verb outside the rule runs at once.
    let noop = flotctl_as(&pki.ca(), &olga, &url, &["exec", "gpu-a", "noop"]);
    assert!(noop.status.success(), "{noop:?}");

    // Every step is in the audit log, in order, and the chain holds.
    let audit = json(&flotctl(&pki, &url, &["audit", "ls", "-o", "json"]));
    let actions: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["action"].as_str().unwrap().to_owned(), r["actor"].as_str().unwrap().to_owned()))
        .filter(|(a, _)| a.starts_with("approval.") || a == "node.revoke")
        .collect();
    let expected = [
        ("approval.request", "operator alice (admin)"),
        ("approval.approve", "operator admin (admin)"),
        ("node.revoke", "operator alice (admin)"),
        ("approval.request", "operator olga (operator)"),
        ("approval.reject", "operator olga (operator)"),
    ];
    let expected: Vec<(String, String)> = expected.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect();
    assert_eq!(actions, expected);
    let all = json(&flotctl(&pki, &url, &["approvals", "ls", "--all", "-o", "json"]));
    let states: Vec<&str> = all.as_array().unwrap().iter().map(|a| a["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["succeeded", "rejected"]);
    assert!(flotctl(&pki, &url, &["audit", "verify"]).status.success());
}
