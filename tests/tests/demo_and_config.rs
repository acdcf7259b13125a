//! `flotctl demo` in the background serves another flotctl process; bad config
//! keys are refused with one line naming the key and file, and exit 64.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::{Command, Stdio};

use flotilla_tests::{Proc, bin, eventually};

#[test]
fn demo_serves_the_fleet_to_another_flotctl() {
    let dir = tempfile::tempdir().unwrap();
    let ctl_config = dir.path().join("flotctl.toml");
    let mut cmd = Command::new(bin("flotctl"));
    cmd.args(["demo", "--listen", "127.0.0.1:0", "--agents", "3", "--gpus-per-agent", "2", "--data-dir"])
        .arg(dir.path().join("demo"))
        .arg("--config")
        .arg(&ctl_config);
    let mut demo = Proc::spawn_logged(cmd, &dir.path().join("demo.log"));
    demo.wait_for_log("Press Ctrl-C to stop");

    let list = eventually("the demo fleet in `flotctl nodes ls`", |last| {
        let out = Command::new(bin("flotctl"))
            .args(["nodes", "ls", "-o", "json", "--config"])
            .arg(&ctl_config)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        *last = String::from_utf8_lossy(&out.stderr).into_owned();
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
        (list.len() == 3 && list.iter().all(|n| n["state"] == "up" && n["gpus"].as_array().unwrap().len() == 2))
            .then_some(list)
    });
    assert_eq!(list[0]["id"], "demo-01");

    let out = Command::new(bin("flotctl")).args(["context", "ls", "--config"]).arg(&ctl_config).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("demo") && text.contains('*'), "{text}");

    assert!(demo.terminate().success(), "the demo exits cleanly on SIGTERM");
    assert!(demo.log_text().contains("Demo stopped."));
}

fn run_with_config(binary: &str, toml: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, toml).unwrap();
    Command::new(bin(binary)).arg("--config").arg(&path).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn unknown_config_keys_exit_64_with_one_line() {
    for (binary, toml, key) in [
        ("flotilla-controller", "listen = \"127.0.0.1:0\"\nlisten_addr = 1\n", "listen_addr"),
        ("flotilla-agent", "controller = \"https://x:1\"\n[uplink]\nmax_pending = 3\n", "max_pending"),
    ] {
        let out = run_with_config(binary, toml);
        assert_eq!(out.status.code(), Some(64), "{binary}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{binary}: {err}");
        assert!(err.contains(key) && err.contains("bad.toml"), "{binary}: {err}");
    }
}

#[test]
fn malformed_flotctl_config_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flotctl.toml");
    std::fs::write(&path, "curent = \"x\"\n").unwrap();
    let out = Command::new(bin("flotctl")).args(["nodes", "ls", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("curent"));
}

#[test]
fn ca_init_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let run = || Command::new(bin("flotctl")).args(["ca", "init", "--dir"]).arg(dir.path()).output().unwrap();
    assert!(run().status.success());
    let again = run();
    assert_eq!(again.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    let issued = Command::new(bin("flotctl"))
        .args(["cert", "issue", "--node", "Bad/Id", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(issued.status.code(), Some(64));
}
