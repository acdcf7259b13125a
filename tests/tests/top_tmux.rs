#![allow(clippy::expect_used, clippy::unwrap_used)]
//! `flotctl top` for real: a controller and a simulated-GPU agent whose model
//! server generates tokens, a rule that fires at once, and `flotctl top` in a
//! detached 160×40 tmux session. The pane must show the node's row with its GPU
//! figures, tokens/s and the firing alert; "disconnected" while the controller
//! is down and "live" once it is back; the node's per-GPU view after Enter, the
//! fleet again after Esc; after `q`, a restored terminal and exit status 0.
//! Without a terminal, `top` refuses with exit status 64 and names the alternatives.
// A synchronous test: waiting is a plain sleep.
#![allow(clippy::disallowed_methods)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use flotilla_tests::{
    Agent, AgentOpts, Controller, Pki, eventually_within, flotctl_command, serve_inference, wait_state,
};

/// A rule on every simulated GPU's temperature, so that an alert fires at once.
const WARM_RULES: &str = r#"
groups:
  - name: top
    rules:
      - alert: TopTestWarm
        expr: flotilla_gpu_temperature_celsius{gpu="0"} > 0
        for: 0s
        labels:
          severity: warning
        annotations:
          summary: "GPU {{ $labels.gpu }} on {{ $labels.node }} is warm"
"#;

/// A vLLM page whose generation-token counter grows by 100 a second.
fn vllm_page(start: Instant) -> String {
    let tokens = (start.elapsed().as_secs_f64() * 100.0).floor();
    format!(
        "# TYPE vllm:generation_tokens_total counter\n\
         vllm:generation_tokens_total{{engine=\"0\",model_name=\"llama-test\"}} {tokens}\n\
         # TYPE vllm:num_requests_waiting gauge\n\
         vllm:num_requests_waiting{{engine=\"0\",model_name=\"llama-test\"}} 0.0\n"
    )
}

/// A tmux server of its own (its own socket, no user config), killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("-f")
            .arg("/dev/null")
            .args(args)
            .output()
            .expect("run tmux (./x test installs it)")
    }

    fn pane(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success(), "send-keys {keys:?}");
    }

    /// Waits until the pane satisfies `ok`, showing the last pane on timeout.
    fn wait_for(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        eventually_within(Duration::from_secs(60), what, |last| {
            let pane = self.pane();
            *last = format!("\n{pane}");
            ok(&pane).then_some(pane)
        })
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The line of the pane that starts the node's row.
fn row<'a>(pane: &'a str, node: &str) -> Option<&'a str> {
    pane.lines().find(|l| l.trim_start_matches(['│', '▶', ' ']).starts_with(node))
}

/// The tokens/s figure of the summary line.
fn summary_tokens(pane: &str) -> Option<f64> {
    let line = pane.lines().next()?;
    let before = line.split(" tok/s").next()?;
    before.rsplit(' ').next()?.parse().ok()
}

#[test]
fn top_shows_the_fleet_opens_a_node_and_quits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let rules = dir.path().join("rules.yml");
    std::fs::write(&rules, WARM_RULES).unwrap();
    let mut controller = Controller::start_configured(
        dir.path(),
        &pki,
        &format!("[alerting]\nrules = {:?}\nrestart_grace = \"0s\"\n", rules.display().to_string()),
    );
    let url = controller.url();
    let start = Instant::now();
    let addr = serve_inference(move || vllm_page(start));
    let toml = format!("[[inference]]\nname = \"llama\"\nurl = \"http://{addr}\"\nengine = \"vllm\"\n");
    let _agent = Agent::start(
        dir.path(),
        &pki,
        &url,
        "gpu-top",
        AgentOpts { gpus: 2, interval: "500ms", config_toml: Some(toml), ..Default::default() },
    );
    wait_state(&pki, &url, "gpu-top", "up");

    // flotctl top in a detached tmux session; the shell records its exit status.
    let admin = pki.admin();
    let cmd = flotctl_command(&pki.ca(), &admin, &url, &["top", "--refresh", "500ms"]);
    let (rc, err) = (dir.path().join("top.rc"), dir.path().join("top.err"));
    let mut line = vec![quote(&cmd.get_program().to_string_lossy())];
    line.extend(cmd.get_args().map(|a| quote(&a.to_string_lossy())));
    let shell = format!(
        "{} 2>{}; echo $? > {}",
        line.join(" "),
        quote(&err.display().to_string()),
        quote(&rc.display().to_string())
    );
    let tmux = Tmux { socket: dir.path().join("tmux.sock") };
    let out = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "160",
        "-y",
        "40",
        &shell,
        ";",
        "set-option",
        "-t",
        "top",
        "remain-on-exit",
        "on",
    ]);
    assert!(out.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&out.stderr));

    // The node's row with its GPU figures, tokens/s and the firing alert.
    let pane = tmux.wait_for("the node row with GPU figures, tokens/s and the alert", |pane| {
        let Some(row) = row(pane, "gpu-top") else { return false };
        row.contains(" up ")
            && row.contains("°C")
            && row.contains("GiB")
            && row.contains(" W ")
            && summary_tokens(pane).is_some_and(|t| t > 0.0)
            && pane.contains("1 alert firing")
            && pane.contains("TopTestWarm")
            && pane.contains("● live")
    });
    assert!(pane.lines().next().unwrap().contains("1/1 nodes up"), "{pane}");
    assert!(pane.contains("2 GPUs"), "{pane}");
    assert!(pane.contains("GPU 0 on gpu-top is warm"), "the alert's summary: {pane}");

    // The controller goes away: the summary line says so; back, the stream reopens.
    controller.proc.kill9();
    tmux.wait_for("the summary to say disconnected", |pane| pane.contains("○ disconnected, retry in"));
    controller.restart();
    tmux.wait_for("the stream to reopen", |pane| {
        pane.lines().next().is_some_and(|l| l.contains("● live") && !l.contains("poll failed"))
    });

    // Enter opens the selected (only) node: a row per GPU.
    tmux.keys(&["Enter"]);
    let pane = tmux.wait_for("the node's per-GPU view", |pane| {
        pane.contains("Node gpu-top") && pane.contains("GPUs (last 5m") && pane.contains("/ 80.0 GiB")
    });
    assert!(pane.contains("NVIDIA H100"), "{pane}");
    assert!(pane.contains("tok/s"), "{pane}");

    // Esc goes back to the fleet; q quits.
    tmux.keys(&["Escape"]);
    tmux.wait_for("the fleet screen again", |pane| pane.contains("Nodes (1)") && !pane.contains("Node gpu-top"));
    tmux.keys(&["q"]);
    let status = eventually_within(Duration::from_secs(30), "flotctl top to exit", |last| {
        *last = tmux.pane();
        std::fs::read_to_string(&rc).ok().filter(|s| s.ends_with('\n')).map(|s| s.trim().to_owned())
    });
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    assert_eq!(status, "0", "flotctl top exit status; stderr: {stderr}");
    let pane = tmux.pane();
    assert!(!pane.contains("flotilla top") && !pane.contains("Nodes (1)"), "the alternate screen is gone:\n{pane}");
}

#[test]
fn top_refuses_a_pipe_and_says_what_to_use_instead() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    // Refused before connecting: no controller listens here.
    let out = flotctl_command(&pki.ca(), &pki.admin(), "https://127.0.0.1:9", &["top"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs an interactive terminal") && err.contains("nodes ls --watch"), "{err}");
    assert!(out.stdout.is_empty(), "nothing drawn into the pipe");
}
