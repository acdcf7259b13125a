//! A real nginx (Debian package `nginx`, installed by `./x test`) run
//! unprivileged under a temp prefix on loopback ports, from the operator's
//! `deploy/nginx/nginx.conf.example` with every path it writes moved under the
//! temp dir. The gateway role's end-to-end tests (`gateway.rs`, `rollouts.rs`)
//! point an agent's `[gateway]` section at it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{eventually, free_port};

/// nginx under `dir`, proxying `127.0.0.1:public` to upstream `llama`, which
/// starts out as `127.0.0.1:first` alone. Stopped when dropped.
pub struct Nginx {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub public: u16,
}

impl Nginx {
    pub fn start(dir: &Path, first: u16) -> Self {
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
            // Not `off`: that would turn off every access_log of the block, the
            // gateway's own log included.
            ("access_log /var/log/nginx/access.log;", format!("access_log {d}/access.log;")),
            (
                "access_log /var/log/nginx/flotilla-gateway.log flotilla;",
                format!("access_log {d}/flotilla-gateway.log flotilla;"),
            ),
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

    pub fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-p").arg(&self.dir).arg("-c").arg(self.dir.join("nginx.conf")).args(extra);
        cmd
    }

    /// The agent's `[gateway]` section for this nginx.
    pub fn agent_section(&self, admin: u16) -> String {
        format!(
            "[gateway]\nnginx = \"{}\"\nconfig = \"{}\"\nupstreams_dir = \"{}\"\nnginx_prefix = \"{}\"\n\
             confirm_url = \"http://127.0.0.1:{admin}/flotilla-gateway\"\nreload_timeout = \"10s\"\n\
             access_log = \"{}\"\n",
            self.binary.display(),
            self.dir.join("nginx.conf").display(),
            self.dir.join("upstreams").display(),
            self.dir.display(),
            self.dir.join("flotilla-gateway.log").display()
        )
    }

    /// Waits until the master has one child: after a reload the old worker keeps
    /// accepting connections (with the old weights) for a moment while it exits,
    /// which is nginx's graceful reload, not something the agent's confirmation
    /// can see. Measuring after it is gone makes the shares exact.
    pub fn wait_for_one_worker(&self) {
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

    /// `127.0.0.1:PORT` of the public side.
    pub fn public_addr(&self) -> String {
        format!("127.0.0.1:{}", self.public)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.command(&["-s", "stop"]).output();
    }
}
