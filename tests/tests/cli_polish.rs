//! flotctl for people and for scripts, against a real controller and agent: plain
//! tables through a pipe and colour only when asked, `-o wide`, `--watch` frames
//! until a signal, shell completion scripts and man pages generated from the
//! grammar, and errors that say what went wrong and what to do.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use flotilla_common::Role;
use flotilla_tests::{Agent, AgentOpts, Controller, Pki, Proc, bin, eventually, flotctl, flotctl_as, flotctl_command};

/// One rule that holds for every GPU at once, so an alert with annotations is firing.
const ALWAYS_RULES: &str = r#"
groups:
  - name: polish
    rules:
      - alert: GPUSeen
        expr: flotilla_gpu_temperature_celsius >= 0
        for: 0s
        labels:
          severity: warning
        annotations:
          summary: "GPU {{ $labels.gpu }} on {{ $labels.node }} reports a temperature"
"#;

/// A controller with [`ALWAYS_RULES`] and one labelled agent, `gpu-a`, that is up.
fn fleet(dir: &Path) -> (Pki, Controller, Agent) {
    let pki = Pki::new(&dir.join("pki"));
    let rules = dir.join("rules.yml");
    std::fs::write(&rules, ALWAYS_RULES).unwrap();
    let controller = Controller::start_configured(
        dir,
        &pki,
        &format!("[alerting]\nrules = {:?}\nrestart_grace = \"0s\"\n", rules.display().to_string()),
    );
    let agent = Agent::start(
        dir,
        &pki,
        &controller.url(),
        "gpu-a",
        AgentOpts { gpus: 2, config_toml: Some("[labels]\nzone = \"z1\"\n".into()), ..Default::default() },
    );
    flotilla_tests::wait_state(&pki, &controller.url(), "gpu-a", "up");
    (pki, controller, agent)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn tables_are_plain_through_a_pipe_coloured_when_asked_and_wide_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, controller, _agent) = fleet(dir.path());
    let url = controller.url();

    let plain = flotctl(&pki, &url, &["nodes", "ls"]);
    assert!(plain.status.success(), "{plain:?}");
    assert!(stdout(&plain).contains("gpu-a") && !stdout(&plain).contains('\x1b'), "{plain:?}");
    // Not even with NO_COLOR unset: a pipe is not a terminal.
    let auto =
        flotctl_command(&pki.ca(), &pki.admin(), &url, &["nodes", "ls"]).env_remove("NO_COLOR").output().unwrap();
    assert!(!stdout(&auto).contains('\x1b'), "{auto:?}");
    // An explicit --color always wins over the pipe and over NO_COLOR (set by the harness).
    let colour = flotctl(&pki, &url, &["nodes", "ls", "--color", "always"]);
    assert!(colour.status.success() && stdout(&colour).contains("\x1b["), "{colour:?}");
    let json = flotctl(&pki, &url, &["nodes", "ls", "-o", "json", "--color", "always"]);
    assert!(!stdout(&json).contains('\x1b'), "JSON is never coloured");
    let nodes = flotilla_tests::json(&json);
    for key in ["id", "state", "hostname", "gpus", "labels", "last_seen_unix_ms", "gpu_memory_total_bytes"] {
        assert!(nodes[0].get(key).is_some(), "{key} missing from `nodes ls -o json`: {nodes}");
    }
    assert!(nodes[0].get("host").is_none(), "the list's JSON stays as it was");

    let wide = flotctl(&pki, &url, &["nodes", "ls", "-o", "wide"]);
    let text = stdout(&wide);
    for want in
        ["GPU MODEL", "DRIVER", "AGENT", "ADDRESS", "LABELS", "LAST SEEN", "zone=z1", "NVIDIA H100", "127.0.0.1:"]
    {
        assert!(text.contains(want), "{want} missing from\n{text}");
    }
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "the agent's version: {text}");
    assert!(!stdout(&plain).contains("zone=z1"), "labels only in the wide table");

    eventually("the always-true rule to fire", |last| {
        let out = flotctl(&pki, &url, &["alerts", "ls", "--state", "firing", "-o", "json"]);
        *last = stdout(&out) + &stderr(&out);
        let alerts: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
        (!alerts.is_empty()).then_some(())
    });
    let alerts = stdout(&flotctl(&pki, &url, &["alerts", "ls"]));
    assert!(alerts.contains("GPUSeen") && !alerts.contains("summary="), "{alerts}");
    let wide = stdout(&flotctl(&pki, &url, &["alerts", "ls", "-o", "wide"]));
    for want in ["ANNOTATIONS", "summary=GPU 0 on gpu-a reports a temperature", "polish/GPUSeen", "severity=warning"] {
        assert!(wide.contains(want), "{want} missing from\n{wide}");
    }
}

/// Starts `flotctl ARGS` with stdout and stderr in `dir/NAME.log`, killed when dropped.
fn spawn_watch(dir: &Path, pki: &Pki, url: &str, name: &str, args: &[&str]) -> Proc {
    Proc::spawn_logged(flotctl_command(&pki.ca(), &pki.admin(), url, args), &dir.join(format!("{name}.log")))
}

#[test]
fn watch_reprints_the_list_until_a_signal_ends_it_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, controller, _agent) = fleet(dir.path());
    let url = controller.url();

    // JSON: one compact document a line, each a whole list.
    let mut json =
        spawn_watch(dir.path(), &pki, &url, "json", &["nodes", "ls", "--watch", "--interval", "200ms", "-o", "json"]);
    let frames = eventually("two JSON frames", |last| {
        let text = json.log_text();
        *last = text.clone();
        let frames: Vec<serde_json::Value> =
            text.lines().filter(|l| l.starts_with('[')).map(|l| serde_json::from_str(l).unwrap()).collect();
        (frames.len() >= 2).then_some(frames)
    });
    for frame in &frames[..2] {
        assert_eq!(frame[0]["id"], "gpu-a", "{frame}");
    }
    let status = json.terminate();
    assert!(status.success(), "a watch stopped by a signal exits 0: {status:?}\n{}", json.log_text());

    // A table through a pipe: whole tables one after another, a blank line between,
    // no screen clearing and no colour.
    let mut table = spawn_watch(dir.path(), &pki, &url, "table", &["nodes", "ls", "-w", "--interval", "200ms"]);
    let text = eventually("two table frames", |last| {
        let text = table.log_text();
        *last = text.clone();
        let headers = text.lines().filter(|l| l.trim_start().starts_with("NODE")).count();
        (headers >= 2).then_some(text)
    });
    assert!(text.contains("gpu-a") && text.contains("\n\n"), "{text}");
    assert!(!text.contains('\x1b'), "{text:?}");
    let status = table.terminate();
    assert!(status.success(), "{status:?}\n{}", table.log_text());

    // --interval means nothing without --watch, and a typo cannot hammer the controller.
    let out = flotctl(&pki, &url, &["nodes", "ls", "--interval", "1s"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = flotctl(&pki, &url, &["nodes", "ls", "-w", "--interval", "1ms"]);
    assert!(stderr(&out).contains("at least 100ms"), "{out:?}");
}

/// Whether `program` runs here (`program --version`).
fn installed(program: &str) -> bool {
    Command::new(program).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

fn flotctl_local(args: &[&str]) -> Output {
    Command::new(bin("flotctl")).args(args).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn completion_scripts_and_man_pages_come_from_the_grammar() {
    let dir = tempfile::tempdir().unwrap();
    for (shell, checker) in [("bash", "bash"), ("zsh", "zsh"), ("fish", "fish")] {
        let out = flotctl_local(&["completion", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = stdout(&out);
        assert!(script.contains("nodes") && script.contains("rollout") && script.contains("completion"), "{shell}");
        let path = dir.path().join(format!("flotctl.{shell}"));
        std::fs::write(&path, &script).unwrap();
        // bash is always here; zsh and fish are checked where installed.
        if shell == "bash" || installed(checker) {
            let check = Command::new(checker).arg("-n").arg(&path).output().unwrap();
            assert!(check.status.success(), "{checker} -n rejects the script: {}", stderr(&check));
        }
    }
    let out = flotctl_local(&["completion", "--dir", dir.path().join("completions").to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    for name in ["flotctl.bash", "_flotctl", "flotctl.fish"] {
        assert!(dir.path().join("completions").join(name).is_file(), "{name}: {}", stdout(&out));
    }

    let man = dir.path().join("man");
    let out = flotctl_local(&["man", "--dir", man.to_str().unwrap()]);
    assert!(out.status.success() && stdout(&out).contains("man pages"), "{out:?}");
    let pages: Vec<_> = std::fs::read_dir(&man).unwrap().map(|e| e.unwrap().path()).collect();
    for name in ["flotctl.1", "flotctl-nodes-ls.1", "flotctl-completion.1", "flotctl-man.1"] {
        assert!(man.join(name).is_file(), "{name} missing from {pages:?}");
    }
    if installed("groff") {
        for page in &pages {
            let check = Command::new("groff").args(["-man", "-Tutf8", "-ww", "-z"]).arg(page).output().unwrap();
            assert!(check.status.success() && check.stderr.is_empty(), "{}: {}", page.display(), stderr(&check));
        }
    }
    if installed("man") {
        let shown =
            Command::new("man").arg("-l").arg(man.join("flotctl-nodes-ls.1")).env("MANPAGER", "cat").output().unwrap();
        let text = stdout(&shown);
        assert!(shown.status.success() && text.contains("watch") && text.contains("controller"), "{shown:?}");
    }
}

#[test]
fn errors_say_what_went_wrong_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (pki, controller, _agent) = fleet(dir.path());
    let url = controller.url();
    let failed = |out: &Output| {
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        stderr(out)
    };

    // Nothing listens there.
    let nowhere = format!("https://127.0.0.1:{}", flotilla_tests::free_port());
    let err = failed(&flotctl(&pki, &nowhere, &["nodes", "ls"]));
    assert!(err.contains(&format!("cannot reach the controller at {nowhere}")), "{err}");
    assert!(err.contains("is the controller running?") && err.contains("flotctl context ls"), "{err}");

    // The controller's certificate is from another fleet's CA.
    let foreign = Pki::new(&dir.path().join("foreign"));
    let err = failed(&flotctl_as(&foreign.ca(), &pki.admin(), &url, &["nodes", "ls"]));
    assert!(err.contains("not from the CA in --cacert"), "{err}");

    // A TLS file that is not there.
    let err = failed(&flotctl_as(&dir.path().join("nope.pem"), &pki.admin(), &url, &["nodes", "ls"]));
    assert!(err.contains("nope.pem") && err.contains("--cacert, --cert and --key paths"), "{err}");

    // The wrong role: PERMISSION_DENIED names the role needed and who can help.
    let viewer = pki.operator("val", Role::Viewer);
    let err = failed(&flotctl_as(&pki.ca(), &viewer, &url, &["nodes", "revoke", "gpu-a", "--reason", "test"]));
    assert!(err.contains("needs role admin") && err.contains("ask an admin"), "{err}");

    // Not found: where to look up what exists.
    let err = failed(&flotctl(&pki, &url, &["nodes", "show", "nope"]));
    assert!(err.contains("no node nope") && err.contains("flotctl nodes ls"), "{err}");
    let err = failed(&flotctl(&pki, &url, &["rollout", "status", "nope"]));
    assert!(err.contains("nope") && err.contains("flotctl deploy ls"), "{err}");

    // Invalid argument: which value, and to fix it.
    let err = failed(&flotctl(&pki, &url, &["alerts", "silence", "--match", "bad", "--for", "1h", "--comment", "x"]));
    assert!(err.contains("bad") && err.contains("correct the value"), "{err}");
}
