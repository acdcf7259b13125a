//! The real nginx: `nginx -t` and `nginx -s reload` as child processes (same
//! `-c` and `-p` as the operator's nginx), and the confirmation GET against the
//! admin server the rendered file defines.

use std::path::{Path, PathBuf};
use std::pin::pin;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::apply::NginxControl;
use super::{ConfirmTarget, GatewayConfig};

/// The most of nginx's stderr carried into a result.
const MAX_REASON: usize = 2000;

/// The longest version text reported: the controller refuses longer strings.
const MAX_VERSION: usize = 200;

/// What `nginx -v` says after `nginx version: ` (`nginx/1.22.1`), or why it
/// could not be learned.
pub(crate) async fn version(binary: &Path, timeout: Duration) -> Result<String, String> {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("-v").stdin(std::process::Stdio::null()).kill_on_drop(true);
    let shown = format!("{} -v", binary.display());
    let output = match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => return Err(format!("{shown} did not finish within {}", humantime::format_duration(timeout))),
        Ok(Err(e)) => return Err(format!("cannot run {shown}: {e}")),
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        return Err(format!("{shown} failed ({})", output.status));
    }
    // nginx writes it to stderr; some builds and wrappers use stdout.
    let text = [output.stderr, output.stdout].concat();
    let text = String::from_utf8_lossy(&text);
    let found = text.lines().find_map(|l| l.trim().strip_prefix("nginx version:")).map(str::trim);
    let Some(found) = found.filter(|v| !v.is_empty()) else {
        return Err(format!("{shown} printed no \"nginx version:\" line"));
    };
    let mut clean: String = found.chars().filter(|c| !c.is_control()).collect();
    if clean.len() > MAX_VERSION {
        let cut = (0..=MAX_VERSION).rev().find(|&i| clean.is_char_boundary(i)).unwrap_or(0);
        clean.truncate(cut);
    }
    Ok(clean)
}

/// Runs the configured nginx binary.
#[derive(Debug, Clone)]
pub(crate) struct Nginx {
    binary: PathBuf,
    config: PathBuf,
    prefix: Option<PathBuf>,
    timeout: Duration,
    admin: ConfirmTarget,
}

impl Nginx {
    pub(crate) fn new(config: &GatewayConfig, admin: ConfirmTarget) -> Self {
        Self {
            binary: config.nginx.clone(),
            config: config.config.clone(),
            prefix: config.nginx_prefix.clone(),
            timeout: config.reload_timeout,
            admin,
        }
    }

    /// Runs nginx with `args` after `-c`/`-p`; `Err` is its stderr (or why it did not run).
    async fn run(&self, args: &[&str]) -> Result<(), String> {
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.arg("-c").arg(&self.config);
        if let Some(prefix) = &self.prefix {
            cmd.arg("-p").arg(prefix);
        }
        cmd.args(args).stdin(std::process::Stdio::null()).kill_on_drop(true);
        let shown = format!("{} {}", self.binary.display(), args.join(" "));
        let output = match tokio::time::timeout(self.timeout, cmd.output()).await {
            Err(_) => {
                return Err(format!("{shown} did not finish within {}", humantime::format_duration(self.timeout)));
            }
            Ok(Err(e)) => return Err(format!("cannot run {shown}: {e}")),
            Ok(Ok(output)) => output,
        };
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.trim();
        let tail = match stderr.char_indices().rev().nth(MAX_REASON) {
            Some((at, _)) => &stderr[at..],
            None => stderr,
        };
        Err(format!("{shown} failed ({}): {tail}", output.status))
    }

    /// One GET of the admin location: the status and body, or why there was none.
    async fn served(&self, upstream: &str) -> Result<(StatusCode, String), String> {
        let stream =
            TcpStream::connect(self.admin.addr).await.map_err(|e| format!("connect {}: {e}", self.admin.addr))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        let request = Request::get(self.admin.path(upstream))
            .header(header::HOST, self.admin.host(upstream))
            // A fresh connection each time: a kept-alive one could reach a worker
            // still running the configuration before the reload.
            .header(header::CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
            let status = response.status();
            let body = Limited::new(response.into_body(), 4096).collect().await.map_err(|e| e.to_string())?.to_bytes();
            Ok::<_, String>((status, String::from_utf8_lossy(&body).trim().to_owned()))
        };
        let mut conn = pin!(conn);
        let mut exchange = pin!(exchange);
        tokio::select! {
            result = &mut exchange => result,
            closed = &mut conn => {
                closed.map_err(|e| e.to_string())?;
                exchange.await
            }
        }
    }
}

impl NginxControl for Nginx {
    async fn test(&self) -> Result<(), String> {
        self.run(&["-t", "-q"]).await
    }

    async fn reload(&self) -> Result<(), String> {
        self.run(&["-s", "reload"]).await
    }

    async fn confirm(&self, upstream: &str, revision: &str) -> Result<(), String> {
        let deadline = Instant::now() + self.timeout;
        let url = self.admin.url(upstream);
        let mut last = String::from("nothing yet");
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.served(upstream)).await {
                Ok(Ok((StatusCode::OK, body))) if body == revision => return Ok(()),
                Ok(Ok((status, body))) => last = format!("{status} {body:?}"),
                Ok(Err(e)) => last = e,
                Err(_) => {}
            }
            if Instant::now() + Duration::from_millis(50) >= deadline {
                return Err(format!(
                    "nginx did not serve revision {revision} at {url} within {} (last answer: {last}); \
                     see nginx's error log",
                    humantime::format_duration(self.timeout)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn the_version_comes_from_nginx_v() {
        let dir = tempfile::tempdir().unwrap();
        let ok = script(dir.path(), "nginx", "echo 'nginx version: nginx/1.22.1' >&2");
        assert_eq!(version(&ok, Duration::from_secs(10)).await.unwrap(), "nginx/1.22.1");
        let silent = script(dir.path(), "silent", "true");
        assert!(version(&silent, Duration::from_secs(10)).await.unwrap_err().contains("no \"nginx version:\""));
        let failing = script(dir.path(), "failing", "exit 3");
        assert!(version(&failing, Duration::from_secs(10)).await.unwrap_err().contains("failed"));
        let missing = version(&dir.path().join("nope"), Duration::from_secs(10)).await.unwrap_err();
        assert!(missing.contains("cannot run"), "{missing}");
        let hung = script(dir.path(), "hung", "exec sleep 30");
        assert!(version(&hung, Duration::from_millis(200)).await.unwrap_err().contains("did not finish"));
    }
}
