//! Revoking a node end to end: `flotctl nodes revoke` (admin only) closes the
//! real agent's stream, every reconnect is refused with the reason (the agent's
//! log says why), `nodes ls` shows the node revoked, the audit log has it, and
//! it holds across a controller restart.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::Duration;

use flotilla_common::Role;
use flotilla_tests::{
    Agent, AgentOpts, Controller, Pki, eventually, eventually_within, flotctl, flotctl_as, json, state_of, wait_state,
};

#[test]
fn a_revoked_node_is_cut_off_refused_and_audited() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let mut controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let agent = Agent::start(dir.path(), &pki, &url, "gpu-a", AgentOpts::default());
    let _other = Agent::start(dir.path(), &pki, &url, "gpu-b", AgentOpts::default());
    wait_state(&pki, &url, "gpu-a", "up");
    wait_state(&pki, &url, "gpu-b", "up");

    // A viewer and an operator may not revoke.
    for (user, role) in [("vic", Role::Viewer), ("olga", Role::Operator)] {
        let cert = pki.operator(user, role);
        let out = flotctl_as(&pki.ca(), &cert, &url, &["nodes", "revoke", "gpu-a", "--reason", "why not"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("RevokeNode needs role admin"), "{err}");
        // Reading is fine for both.
        assert!(flotctl_as(&pki.ca(), &cert, &url, &["nodes", "ls"]).status.success());
    }

    let out = flotctl(&pki, &url, &["nodes", "revoke", "gpu-a", "--reason", "key leaked", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let revoked = json(&out);
    assert_eq!(revoked["revoked_by"], "operator admin (admin)");
    assert_eq!(revoked["stream_closed"], true, "{revoked}");

    // The live stream is closed and every reconnect refused: the agent's log says why.
    eventually("the agent to be told it is revoked, on its stream and on reconnecting", |last| {
        let log = agent.proc.log_text();
        let told = log.matches("node gpu-a was revoked at").count();
        *last = format!("{told} refusals in the agent log");
        (told >= 2).then_some(())
    });
    assert!(agent.proc.log_text().contains("by operator admin (admin): key leaked"));
    controller.proc.wait_for_log("refused a revoked node");
    let list = wait_state(&pki, &url, "gpu-a", "revoked");
    assert_eq!(state_of(&list, "gpu-b").as_deref(), Some("up"), "the other node carries on");
    let table = flotctl(&pki, &url, &["nodes", "ls"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("revoked"), "{table:?}");

    // The audit log has the revocation, with who and why.
    let out = flotctl(&pki, &url, &["audit", "ls", "-o", "json"]);
    let records = json(&out);
    let entry = records.as_array().unwrap().iter().find(|r| r["action"] == "node.revoke").expect("audited");
    assert_eq!(entry["target"], "gpu-a");
    assert_eq!(entry["actor"], "operator admin (admin)");
    assert!(entry.to_string().contains("key leaked"), "{entry}");

    // A restarted controller still refuses it.
    controller.proc.kill9();
    let before = agent.proc.log_text().matches("was revoked").count();
    controller.restart();
    // The agent's reconnect backoff has grown by now (up to 30 s): a longer hang guard.
    eventually_within(Duration::from_secs(120), "the agent to be refused by the restarted controller", |last| {
        let told = agent.proc.log_text().matches("was revoked").count();
        *last = format!("{told} refusals, {before} before the restart");
        (told > before).then_some(())
    });
    let list = wait_state(&pki, &url, "gpu-b", "up");
    assert_eq!(state_of(&list, "gpu-a").as_deref(), Some("revoked"));
}
