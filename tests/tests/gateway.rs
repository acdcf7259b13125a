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
use std::time::Duration;

use flotilla_tests::nginx::Nginx;
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

/// Sends `n` requests through nginx's public port; how many each backend answered.
fn traffic(nginx: &Nginx, n: usize) -> (usize, usize) {
    nginx.wait_for_one_worker();
    let addr = nginx.public_addr();
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
    assert_eq!(traffic(&nginx, 10), (10, 0), "the bootstrap file sends everything to v1");

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
    let (to_v1, to_v2) = traffic(&nginx, 400);
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
    assert_eq!(traffic(&nginx, 100), (0, 100));

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
    assert_eq!(traffic(&nginx, 100), (0, 100));
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
    assert_eq!(traffic(&nginx, 20), (0, 20));

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
