//! The gateway role against a real nginx (Debian package `nginx`, installed by
//! `./x test`), run unprivileged under a temp prefix on loopback ports: signed
//! `gateway-set` commands shift traffic between two tiny backends by weight, a
//! set nginx rejects fails with nginx's reason and leaves the previous weights
//! serving, and a node without `[gateway]` refuses the command.

// Test equipment: a failed setup step should stop the test loudly, with its reason.
#![allow(clippy::expect_used, clippy::unwrap_used)]
// A synchronous test: waiting is a plain sleep.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flotilla_tests::{Agent, AgentOpts, Controller, Pki, eventually, flotctl, free_port, http_get, wait_state};

/// An HTTP backend on a loopback port that answers every request with `body`.
fn backend(body: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut reader = std::io::BufReader::new(&stream);
                let mut line = String::new();
                // The request head ends with an empty line; nginx sends no body on a GET.
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line.trim_end() != "" {
                    line.clear();
                }
                let _ = (&stream).write_all(
                    format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                        .as_bytes(),
                );
            });
        }
    });
    port
}

/// nginx under `dir`, proxying `127.0.0.1:public` to upstream `llama`, which
/// starts out as `first` alone. Stopped when dropped.
struct Nginx {
    binary: PathBuf,
    dir: PathBuf,
    public: u16,
}

impl Nginx {
    fn start(dir: &Path, first: u16) -> Self {
        let binary = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .expect("nginx is missing: install the Debian package nginx (./x test does)");
        std::fs::create_dir_all(dir.join("upstreams")).unwrap();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        // Run as root (as CI may), nginx would hand its workers to `nobody`, who
        // cannot enter the private temp dir; as anyone else `user` is ignored.
        let probe = dir.join("owner");
        std::fs::write(&probe, "").unwrap();
        let user = if std::fs::metadata(&probe).unwrap().uid() == 0 { "user root;" } else { "" };
        let d = dir.display();
        let public = free_port();
        // The operator's config is deploy/nginx/nginx.conf.example, with every path
        // nginx writes moved under the temp dir (`nginx -V` shows the compiled-in
        // /var/lib/nginx temp paths), the public port on loopback, and one worker,
        // so that its smooth weighted round-robin is the only balancer.
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx/nginx.conf.example");
        let mut conf = std::fs::read_to_string(example).unwrap();
        let temp = format!(
            "http {{\n    client_body_temp_path {d}/tmp/body;\n    proxy_temp_path {d}/tmp/proxy;\n    \
             fastcgi_temp_path {d}/tmp/fastcgi;\n    uwsgi_temp_path {d}/tmp/uwsgi;\n    scgi_temp_path {d}/tmp/scgi;\n"
        );
        for (from, to) in [
            ("user www-data;", user.to_owned()),
            ("worker_processes auto;", "worker_processes 1;".to_owned()),
            ("pid /run/nginx.pid;", format!("pid {d}/nginx.pid;")),
            ("error_log /var/log/nginx/error.log;", format!("error_log {d}/error.log info;")),
            ("access_log /var/log/nginx/access.log;", "access_log off;".to_owned()),
            ("include /etc/nginx/flotilla-upstreams/*.conf;", format!("include {d}/upstreams/*.conf;")),
            ("listen 8080;", format!("listen 127.0.0.1:{public};")),
            ("http {\n", temp),
        ] {
            assert!(conf.contains(from), "nginx.conf.example no longer has {from:?}");
            conf = conf.replacen(from, &to, 1);
        }
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        // The bootstrap file an operator writes before the first start.
        std::fs::write(dir.join("upstreams/llama.conf"), format!("upstream llama {{ server 127.0.0.1:{first}; }}\n"))
            .unwrap();
        let nginx = Self { binary, dir: dir.to_owned(), public };
        let out = nginx.command(&[]).output().unwrap();
        assert!(out.status.success(), "nginx did not start: {}", String::from_utf8_lossy(&out.stderr));
        nginx
    }

    fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-p").arg(&self.dir).arg("-c").arg(self.dir.join("nginx.conf")).args(extra);
        cmd
    }

    /// The agent's `[gateway]` section for this nginx.
    fn agent_section(&self, admin: u16) -> String {
        format!(
            "[gateway]\nnginx = \"{}\"\nconfig = \"{}\"\nupstreams_dir = \"{}\"\nnginx_prefix = \"{}\"\n\
             confirm_url = \"http://127.0.0.1:{admin}/flotilla-gateway\"\nreload_timeout = \"10s\"\n",
            self.binary.display(),
            self.dir.join("nginx.conf").display(),
            self.dir.join("upstreams").display(),
            self.dir.display()
        )
    }

    /// Waits until the master has one child: after a reload the old worker keeps
    /// accepting connections (with the old weights) for a moment while it exits,
    /// which is nginx's graceful reload, not something the agent's confirmation
    /// can see. Measuring after it is gone makes the shares exact.
    fn wait_for_one_worker(&self) {
        let master = std::fs::read_to_string(self.dir.join("nginx.pid")).unwrap().trim().to_owned();
        eventually("the old nginx worker to exit", |last| {
            let children: Vec<String> = std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
                // `pid (comm) state ppid ...`: comm may hold spaces, so split after it.
                .filter(|stat| {
                    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)) == Some(master.as_str())
                })
                .collect();
            *last = format!("{} children of {master}", children.len());
            (children.len() == 1).then_some(())
        });
    }

    /// Sends `n` requests through nginx's public port; how many each backend answered.
    fn traffic(&self, n: usize) -> (usize, usize) {
        self.wait_for_one_worker();
        let addr = format!("127.0.0.1:{}", self.public);
        let (mut v1, mut v2) = (0, 0);
        for _ in 0..n {
            let (status, body) = http_get(&addr, "/v1/completions").unwrap();
            assert_eq!(status, 200, "{body}");
            match body.as_str() {
                "v1" => v1 += 1,
                "v2" => v2 += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        (v1, v2)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.command(&["-s", "stop"]).output();
    }
}

fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    })
}

#[test]
fn gateway_set_shifts_traffic_through_a_real_nginx() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let (v1, v2) = (backend("v1"), backend("v2"));
    let nginx = Nginx::start(&dir.path().join("nginx"), v1);
    assert_eq!(nginx.traffic(10), (10, 0), "the bootstrap file sends everything to v1");

    let key = format!("command_key = \"{}\"\n", controller.data_dir.join("command-signing.pub").display());
    let gateway_toml = format!("{key}{}", nginx.agent_section(free_port()));
    let opts = |toml: String| AgentOpts { gpus: 1, config_toml: Some(toml), ..Default::default() };
    let _gw = Agent::start(dir.path(), &pki, &url, "gw-1", opts(gateway_toml));
    let _plain = Agent::start(dir.path(), &pki, &url, "gpu-plain", opts(key));
    wait_state(&pki, &url, "gw-1", "up");
    wait_state(&pki, &url, "gpu-plain", "up");
    let set = |node: &str, servers: &str| {
        let servers = format!("servers={servers}");
        flotctl(&pki, &url, &["exec", node, "gateway-set", "--arg", "upstream=llama", "--arg", &servers, "-o", "json"])
    };

    // 90/10: nginx's smooth weighted round-robin in one fresh worker sends exactly
    // 10 of every 100 requests to v2 (40 of 400); the tolerance is ±1 point.
    let out = set("gw-1", &format!("127.0.0.1:{v1}=90,127.0.0.1:{v2}=10"));
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["upstream"], "llama");
    assert_eq!(v["servers"][1]["weight"], 10);
    assert!(v["reload_ms"].is_u64() && v["revision"].as_str().unwrap().len() == 16, "{v}");
    let first_revision = v["revision"].clone();
    let (to_v1, to_v2) = nginx.traffic(400);
    assert_eq!(to_v1 + to_v2, 400);
    eprintln!("90/10: v2 answered {to_v2} of 400");
    assert!((36..=44).contains(&to_v2), "v2 answered {to_v2} of 400, want 10 % ± 1 point");
    let live = std::fs::read_to_string(dir.path().join("nginx/upstreams/llama.conf")).unwrap();
    assert!(live.contains(&format!("server 127.0.0.1:{v2} weight=10;")), "{live}");
    let bak = std::fs::read_to_string(dir.path().join("nginx/upstreams/llama.conf.bak")).unwrap();
    assert!(bak.starts_with("upstream llama { server"), "the bootstrap file is kept: {bak}");

    // 0/100: v1 is kept in the file as `down`; everything goes to v2.
    let out = set("gw-1", &format!("127.0.0.1:{v1}=0,127.0.0.1:{v2}=100"));
    let v = json(&out);
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_ne!(v["revision"], first_revision);
    assert_eq!(nginx.traffic(100), (0, 100));

    let live = std::fs::read_to_string(dir.path().join("nginx/upstreams/llama.conf")).unwrap();
    assert!(live.contains(&format!("server 127.0.0.1:{v1} down;")), "{live}");

    // A config nginx refuses at `nginx -t` (here a file beside ours with weight=0,
    // which is why the agent renders weight 0 as `down`; no DNS: tests send
    // traffic only to loopback) fails the step with nginx's reason naming it,
    // puts the previous file back, and the previous weights keep serving.
    let broken = dir.path().join("nginx/upstreams/hand-edited.conf");
    std::fs::write(&broken, "upstream hand-edited { server 127.0.0.1:1 weight=0; }\n").unwrap();
    let out = set("gw-1", &format!("127.0.0.1:{v1}=50,127.0.0.1:{v2}=50"));
    let v = json(&out);
    assert_eq!(v["status"], "failed", "{v}");
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains("invalid parameter \"weight=0\"") && detail.contains("hand-edited.conf"), "{detail}");
    assert!(detail.contains("nginx -t rejected") && detail.contains("previous file is back"), "{detail}");
    assert_eq!(std::fs::read_to_string(dir.path().join("nginx/upstreams/llama.conf")).unwrap(), live);
    assert_eq!(nginx.traffic(100), (0, 100));
    std::fs::remove_file(&broken).unwrap();

    // Refused before signing: flotctl checks the weights (usage error, exit 64).
    let out = set("gw-1", &format!("127.0.0.1:{v1}=0,127.0.0.1:{v2}=0"));
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("weight 0"), "{out:?}");

    // A node without [gateway] refuses, saying why, and changes nothing.
    let out = set("gpu-plain", &format!("127.0.0.1:{v1}=50,127.0.0.1:{v2}=50"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let v = json(&out);
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("not a gateway"), "{v}");
    assert_eq!(nginx.traffic(20), (0, 20));

    // nginx is not running: the file passes `nginx -t` but the reload fails, and
    // the previous file is put back.
    let live = std::fs::read_to_string(dir.path().join("nginx/upstreams/llama.conf")).unwrap();
    assert!(nginx.command(&["-s", "stop"]).output().unwrap().status.success());
    eventually("nginx to stop", |_| (!dir.path().join("nginx/nginx.pid").exists()).then_some(()));
    let out = set("gw-1", &format!("127.0.0.1:{v1}=50,127.0.0.1:{v2}=50"));
    let v = json(&out);
    assert_eq!(v["status"], "failed", "{v}");
    assert!(v["detail"].as_str().unwrap().contains("nginx reload failed"), "{v}");
    assert_eq!(std::fs::read_to_string(dir.path().join("nginx/upstreams/llama.conf")).unwrap(), live);
}
