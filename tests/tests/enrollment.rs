//! Enrollment end to end, with the real binaries: `flotctl token create`, an
//! agent that starts with only a join token and gets its certificate, CA and
//! command key from the controller's enrollment port; tokens that are spent or
//! expired; a CA fingerprint that does not match; renewal over the live stream.
// Test equipment: a failed setup step should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flotilla_common::enroll::{CaFingerprint, JoinToken};
use flotilla_common::pki::Validity;
use flotilla_common::{Identity, NodeId};
use flotilla_tests::{Controller, Pki, Proc, bin, eventually, eventually_within, flotctl, json, wait_state};

/// A controller with enrollment on (`enroll_listen`, `tls.ca_key`), and the
/// address of its enrollment port.
fn controller(dir: &Path, pki: &Pki, extra: &str) -> (Controller, String) {
    let config =
        format!("enroll_listen = \"127.0.0.1:0\"\n[tls]\nca_key = \"{}\"\n{extra}", pki.dir.join("ca.key").display());
    let controller = Controller::start_configured(dir, pki, &config);
    let line = eventually("the enrollment port to listen", |last| {
        let text = controller.proc.log_text();
        *last = text.lines().last().unwrap_or_default().to_owned();
        text.lines().find(|l| l.contains("enrollment listening")).map(str::to_owned)
    });
    let addr = line.split("enroll_addr=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap().to_owned();
    (controller, format!("https://{addr}"))
}

/// `flotctl token create` with `args`; the token text.
fn create_token(pki: &Pki, url: &str, args: &[&str]) -> String {
    let mut all = vec!["token", "create", "-o", "json"];
    all.extend_from_slice(args);
    let out = flotctl(pki, url, &all);
    assert!(out.status.success(), "{out:?}");
    json(&out)["token"].as_str().unwrap().to_owned()
}

/// The one token of `token ls`.
fn only_token(pki: &Pki, url: &str) -> serde_json::Value {
    let out = flotctl(pki, url, &["token", "ls", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let list = json(&out);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    list[0].clone()
}

/// An agent started with a join token and none of its TLS files: everything
/// it has comes from enrollment. Its files live in `dir/agents/NODE`.
struct Enrolling {
    proc: Proc,
    state: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl Enrolling {
    fn start(dir: &Path, controller: &Controller, enroll_url: &str, node: &str, token: &str, extra: &[&str]) -> Self {
        let state = dir.join("agents").join(node);
        std::fs::create_dir_all(&state).unwrap();
        let path = |name: &str| state.join(name).display().to_string();
        let mut args: Vec<String> = vec![
            "--controller".into(),
            controller.url(),
            "--enroll-url".into(),
            enroll_url.into(),
            "--node-id".into(),
            node.into(),
            "--ca".into(),
            path("pki/ca.pem"),
            "--cert".into(),
            path("pki/agent.pem"),
            "--key".into(),
            path("pki/agent.key"),
            "--data-dir".into(),
            path("data"),
            "--interval".into(),
            "200ms".into(),
            "--gpu-source".into(),
            "simulated".into(),
            "--simulated-gpus".into(),
            "1".into(),
            "--ack-log".into(),
            path("acks.log"),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let log = dir.join(format!("agent-{node}.log"));
        let proc = Self::spawn(&args, &log, token);
        Self { proc, state, args, log }
    }

    fn spawn(args: &[String], log: &Path, token: &str) -> Proc {
        let mut cmd = Command::new(bin("flotilla-agent"));
        // The environment, not a flag: other users can read a process's flags.
        cmd.args(args).env("FLOTILLA_JOIN_TOKEN", token);
        Proc::spawn_logged(cmd, log)
    }

    fn restart(&mut self, token: &str) {
        assert!(!self.proc.running());
        self.proc = Self::spawn(&self.args, &self.log, token);
    }

    fn cert(&self) -> PathBuf {
        self.state.join("pki/agent.pem")
    }

    fn key(&self) -> PathBuf {
        self.state.join("pki/agent.key")
    }

    /// Every acknowledged seq, sorted.
    fn acked(&self) -> Vec<u64> {
        let text = std::fs::read_to_string(self.state.join("acks.log")).unwrap_or_default();
        let mut seqs: Vec<u64> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        seqs.sort_unstable();
        seqs
    }

    /// Waits for the process to exit; its status and log.
    fn wait_exit(&mut self) -> (std::process::ExitStatus, String) {
        let proc = &mut self.proc;
        let status = eventually("the agent to exit", |last| {
            *last = proc.log_text().lines().last().unwrap_or_default().to_owned();
            proc.child.try_wait().unwrap()
        });
        (status, self.proc.log_text())
    }
}

fn not_after(cert: &Path) -> i64 {
    let der = flotilla_common::tls::certs_from_pem(cert, &std::fs::read(cert).unwrap()).unwrap().remove(0);
    Validity::of_der(&der).unwrap().not_after_unix_ms
}

fn audit_actions(pki: &Pki, url: &str) -> Vec<(String, String, String)> {
    let out = flotctl(pki, url, &["audit", "ls", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (s("action"), s("target"), r["detail"].to_string())
        })
        .collect()
}

#[test]
fn a_single_use_token_enrolls_one_agent_that_streams_and_runs_signed_commands() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let (controller, enroll_url) = controller(dir.path(), &pki, "");
    let url = controller.url();
    // The enrollment port serves Enrollment only: not Fleet, even to an admin.
    let out = flotctl(&pki, &enroll_url, &["nodes", "ls"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("does not serve"), "{out:?}");

    let token = create_token(&pki, &url, &["--labels", "rack=r9,zone=z1", "--ttl", "10m"]);
    assert!(token.starts_with("flt1."), "{token}");
    let secret = JoinToken::parse(&token).unwrap().secret.reveal();

    let first = Enrolling::start(dir.path(), &controller, &enroll_url, "gpu-new", &token, &[]);
    let nodes = wait_state(&pki, &url, "gpu-new", "up");
    let node = nodes.iter().find(|n| n["id"] == "gpu-new").unwrap();
    assert_eq!(node["labels"]["rack"], "r9", "the token's labels: {node}");

    // Its key was made on the node, mode 0600; its certificate names it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(first.key()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let der = flotilla_common::tls::certs_from_pem(&first.cert(), &std::fs::read(first.cert()).unwrap()).unwrap();
    assert_eq!(Identity::from_der(&der[0]).unwrap(), Identity::Node(NodeId::new("gpu-new").unwrap()));

    // It pinned the command key it was sent: a signed noop runs.
    let out = flotctl(&pki, &url, &["exec", "gpu-new", "noop", "-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out)["status"], "succeeded");

    // The token is spent: a second agent with it is refused, and says why.
    let mut second = Enrolling::start(dir.path(), &controller, &enroll_url, "gpu-other", &token, &[]);
    let (status, log) = second.wait_exit();
    assert!(!status.success());
    assert!(log.contains("refused enrollment") && log.contains("spent"), "{log}");
    assert!(!second.cert().exists() && !second.key().exists(), "nothing written for a refused agent");

    let listed = only_token(&pki, &url);
    assert_eq!(listed["state"], "spent");
    assert_eq!(listed["uses_left"], 0);
    assert_eq!(listed["enrolled"], serde_json::json!(["gpu-new"]));
    let actions = audit_actions(&pki, &url);
    assert!(actions.iter().any(|(a, _, _)| a == "token.create"), "{actions:?}");
    assert!(actions.iter().any(|(a, t, _)| a == "node.enroll" && t == "gpu-new"), "{actions:?}");
    assert!(
        actions.iter().any(|(a, t, d)| a == "node.enroll.refused" && t == "gpu-other" && d.contains("spent")),
        "{actions:?}"
    );

    // The secret appears in no log and no audit record.
    for (what, text) in [
        ("controller log", controller.proc.log_text()),
        ("agent log", first.proc.log_text()),
        ("refused agent log", log),
        ("audit", format!("{actions:?}")),
    ] {
        assert!(!text.contains(&secret), "the join token's secret is in the {what}");
    }
    wait_state(&pki, &url, "gpu-new", "up");
}

#[test]
fn an_expired_token_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let (controller, enroll_url) = controller(dir.path(), &pki, "");
    let url = controller.url();
    let token = create_token(&pki, &url, &["--ttl", "1s"]);
    eventually("the token to expire", |last| {
        let t = only_token(&pki, &url);
        *last = t.to_string();
        (t["state"] == "expired").then_some(())
    });
    let mut agent = Enrolling::start(dir.path(), &controller, &enroll_url, "gpu-late", &token, &[]);
    let (status, log) = agent.wait_exit();
    assert!(!status.success());
    assert!(log.contains("refused enrollment") && log.contains("expired"), "{log}");
    assert_eq!(only_token(&pki, &url)["uses_left"], 1, "a refused attempt takes no use");
    let actions = audit_actions(&pki, &url);
    assert!(actions.iter().any(|(a, t, d)| a == "node.enroll.refused" && t == "gpu-late" && d.contains("expired")));
}

#[test]
fn a_revoked_token_is_refused_as_unknown_and_the_revocation_audited() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let (controller, enroll_url) = controller(dir.path(), &pki, "");
    let url = controller.url();
    let token = create_token(&pki, &url, &["--uses", "5"]);
    let id = only_token(&pki, &url)["id"].as_str().unwrap().to_owned();
    let no_reason = flotctl(&pki, &url, &["token", "revoke", &id, "--reason", " "]);
    assert_eq!(no_reason.status.code(), Some(1), "{no_reason:?}");
    let unknown = flotctl(&pki, &url, &["token", "revoke", "0000000000000000", "--reason", "x"]);
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no join token"), "{unknown:?}");
    let revoked = flotctl(&pki, &url, &["token", "revoke", &id, "--reason", "posted in a chat", "-o", "json"]);
    assert!(revoked.status.success(), "{revoked:?}");
    assert_eq!(json(&revoked)["uses_left"], 5);
    let listed = json(&flotctl(&pki, &url, &["token", "ls", "-o", "json"]));
    assert_eq!(listed.as_array().unwrap().len(), 0, "gone: {listed}");

    let mut agent = Enrolling::start(dir.path(), &controller, &enroll_url, "gpu-leak", &token, &[]);
    let (status, log) = agent.wait_exit();
    assert!(!status.success());
    assert!(log.contains("refused enrollment"), "{log}");
    let actions = audit_actions(&pki, &url);
    assert!(
        actions.iter().any(|(a, t, d)| a == "token.revoke" && *t == id && d.contains("posted in a chat")),
        "{actions:?}"
    );
    assert!(actions.iter().any(|(a, t, _)| a == "node.enroll.refused" && t == "gpu-leak"), "{actions:?}");
}

#[test]
fn a_wrong_ca_fingerprint_makes_the_agent_refuse_the_controller() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let (controller, enroll_url) = controller(dir.path(), &pki, "");
    let url = controller.url();
    let token = create_token(&pki, &url, &[]);
    let mut parsed = JoinToken::parse(&token).unwrap();
    assert_eq!(
        parsed.ca,
        Some(CaFingerprint::of_der(
            &flotilla_common::tls::certs_from_pem(&pki.ca(), &std::fs::read(pki.ca()).unwrap()).unwrap()[0]
        )),
        "the token carries the fleet CA's fingerprint"
    );
    // The same secret, but pinning another CA: the agent must not talk to this controller.
    parsed.ca = Some(CaFingerprint::of_der(b"some other fleet's CA"));
    let mut agent = Enrolling::start(dir.path(), &controller, &enroll_url, "gpu-wary", &parsed.reveal(), &[]);
    let (status, log) = agent.wait_exit();
    assert!(!status.success());
    assert!(log.contains("pinned fingerprint"), "{log}");
    assert!(!agent.cert().exists());
    // The secret never left the agent: the token is untouched and nothing was refused.
    assert_eq!(only_token(&pki, &url)["uses_left"], 1);
    assert!(!audit_actions(&pki, &url).iter().any(|(a, _, _)| a.starts_with("node.enroll")));

    // A token without the fingerprint needs one from the operator, and it must agree.
    parsed.ca = None;
    let bare = parsed.reveal();
    let wrong = CaFingerprint::of_der(b"another").to_string();
    let mut agent =
        Enrolling::start(dir.path(), &controller, &enroll_url, "gpu-wary2", &bare, &["--ca-fingerprint", &wrong]);
    let (status, log) = agent.wait_exit();
    assert!(!status.success());
    assert!(log.contains("pinned fingerprint"), "{log}");
}

#[test]
fn an_enrolled_agent_renews_over_its_stream_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let (controller, enroll_url) = controller(dir.path(), &pki, "[agents]\ncert_ttl = \"30s\"\n");
    let url = controller.url();
    let token = create_token(&pki, &url, &[]);
    let mut agent = Enrolling::start(dir.path(), &controller, &enroll_url, "gpu-short", &token, &[]);
    wait_state(&pki, &url, "gpu-short", "up");
    let first = not_after(&agent.cert());
    let first_key = std::fs::read(agent.key()).unwrap();

    // Two thirds into 33 s (30 s + 3 s backdating): about 19 s after enrolling.
    eventually_within(Duration::from_secs(60), "the certificate to be renewed", |last| {
        let now = not_after(&agent.cert());
        *last = format!("not_after {now} (first {first})");
        (now > first).then_some(())
    });
    assert_ne!(std::fs::read(agent.key()).unwrap(), first_key, "a new key came with the new certificate");
    let log = agent.proc.log_text();
    assert!(log.contains("certificate renewed"), "{log}");
    assert_eq!(log.matches("connected to controller").count(), 1, "the stream was never interrupted: {log}");

    // Telemetry went on throughout, acknowledged without a gap.
    let before = agent.acked().len();
    eventually("more acknowledgements after the renewal", |_| (agent.acked().len() > before + 5).then_some(()));
    let seqs = agent.acked();
    let gaps: Vec<_> = seqs.windows(2).filter(|w| w[1] != w[0] + 1).collect();
    assert!(gaps.is_empty() && seqs.first() == Some(&1), "gaps in the acknowledged seqs: {gaps:?}");

    // Once the first certificate has expired, a restarted agent connects with the renewed one.
    eventually_within(Duration::from_secs(60), "the first certificate to expire", |_| {
        (flotilla_common::time::now_unix_ms() > first + 1000).then_some(())
    });
    agent.proc.terminate();
    agent.restart(&token);
    agent.proc.wait_for_log("connected to controller");
    let renewed_before = agent.acked().len();
    eventually("acknowledgements on the new connection", |_| (agent.acked().len() > renewed_before).then_some(()));
    let audit = audit_actions(&pki, &url);
    assert!(audit.iter().any(|(a, t, _)| a == "node.renew" && t == "gpu-short"), "{audit:?}");
}
