//! The gateway role: shifts traffic between model servers by rewriting one nginx
//! upstream per `gateway-set` command. It renders `deploy/nginx/upstream.conf.tmpl`
//! into `upstreams_dir/UPSTREAM.conf`, has nginx check (`-t`) and reload it, and
//! reports success only once nginx serves the new weights' revision on the admin
//! location the file defines. Any failure leaves the previous weights in force.
//! With `access_log` set it also counts the traffic nginx proxies, per upstream
//! server, from nginx's access log (`traffic`), for the rollout health gates.

mod apply;
mod nginx;
pub mod render;
pub mod traffic;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_common::command::GatewayWeights;
use flotilla_common::model::GatewayInfo;
use serde::Deserialize;

/// `[gateway]` in the agent config. Absent: this agent is not a gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The nginx binary.
    #[serde(default = "default_nginx")]
    pub nginx: PathBuf,
    /// nginx's main config (`-c`), which must `include UPSTREAMS_DIR/*.conf;` in `http`.
    pub config: PathBuf,
    /// Where the agent writes `UPSTREAM.conf` (and `.conf.new`, `.conf.bak` beside it).
    pub upstreams_dir: PathBuf,
    /// nginx's prefix (`-p`), when it is not the compiled-in one.
    #[serde(default)]
    pub nginx_prefix: Option<PathBuf>,
    /// `http://LOOPBACK-IP:PORT/PATH`: the admin server each rendered file defines
    /// listens there and answers `PATH/UPSTREAM` with the revision it runs.
    #[serde(default = "default_confirm_url")]
    pub confirm_url: String,
    /// Bound on each nginx run and on waiting for the reload to be confirmed.
    #[serde(with = "humantime_serde", default = "default_reload_timeout")]
    pub reload_timeout: Duration,
    /// The access log nginx writes in the `flotilla` format
    /// ([`traffic::LOG_FORMAT`]); when set, every telemetry batch carries the
    /// per-server response counters read from it.
    #[serde(default)]
    pub access_log: Option<PathBuf>,
}

fn default_nginx() -> PathBuf {
    PathBuf::from("/usr/sbin/nginx")
}

fn default_confirm_url() -> String {
    "http://127.0.0.1:8099/flotilla-gateway".to_owned()
}

fn default_reload_timeout() -> Duration {
    Duration::from_secs(10)
}

impl GatewayConfig {
    /// Checks the section; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.nginx.is_file() {
            return Err(format!("gateway.nginx {} is not a file", self.nginx.display()));
        }
        if !self.config.is_file() {
            return Err(format!("gateway.config {} is not a file", self.config.display()));
        }
        if !self.upstreams_dir.is_dir() {
            return Err(format!("gateway.upstreams_dir {} is not a directory", self.upstreams_dir.display()));
        }
        if let Some(prefix) = &self.nginx_prefix
            && !prefix.is_dir()
        {
            return Err(format!("gateway.nginx_prefix {} is not a directory", prefix.display()));
        }
        ConfirmTarget::parse(&self.confirm_url).map_err(|e| format!("gateway.confirm_url: {e}"))?;
        // The file itself may not exist yet (nginx creates it when it starts), but
        // its directory must: a path nginx can never write is a typo.
        if let Some(log) = &self.access_log
            && !(log.is_absolute() && log.parent().is_some_and(Path::is_dir))
        {
            return Err(format!(
                "gateway.access_log {} must be an absolute path in an existing directory",
                log.display()
            ));
        }
        // Bounded so that a whole gateway-set (check, reload, confirm, and on failure a
        // second reload) ends well inside the controller's wait for the result.
        if self.reload_timeout < Duration::from_secs(1) || self.reload_timeout > Duration::from_secs(15) {
            return Err(format!(
                "gateway.reload_timeout {} is outside 1s..15s",
                humantime::format_duration(self.reload_timeout)
            ));
        }
        Ok(())
    }
}

/// How long `nginx -v` may take at startup: it prints and exits at once, so
/// anything longer is a hung binary that must not hold the agent's start.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// The gateway role as the inventory reports it. A nginx that cannot be run is
/// logged and reported with an empty version: the role is configured either way,
/// and `gateway-set` will say what is wrong with nginx when it is used.
pub async fn info(config: &GatewayConfig) -> GatewayInfo {
    match nginx::version(&config.nginx, VERSION_TIMEOUT).await {
        Ok(nginx_version) => GatewayInfo { nginx_version },
        Err(error) => {
            tracing::warn!(%error, "cannot tell nginx's version; reporting the gateway role without it");
            GatewayInfo::default()
        }
    }
}

/// Where the agent asks nginx which revision it runs: a loopback address and a path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmTarget {
    pub addr: SocketAddr,
    /// Starts with `/`, no trailing `/`.
    pub prefix: String,
}

impl ConfirmTarget {
    /// Parses `http://LOOPBACK-IP:PORT/PATH`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url:?} must start with http://"))?;
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        let addr: SocketAddr =
            authority.parse().map_err(|_| format!("{url:?}: the host must be an IP address with a port"))?;
        if !addr.ip().is_loopback() || addr.port() == 0 {
            return Err(format!("{url:?}: the admin server must listen on a loopback address and a port"));
        }
        let path = path.trim_end_matches('/');
        if path.is_empty() || !path.chars().all(|c| c.is_ascii_alphanumeric() || "/_-.".contains(c)) {
            return Err(format!("{url:?}: the path must be non-empty and only [a-zA-Z0-9/_.-]"));
        }
        Ok(Self { addr, prefix: format!("/{path}") })
    }

    /// The location that answers for `upstream`.
    pub fn path(&self, upstream: &str) -> String {
        format!("{}/{upstream}", self.prefix)
    }

    /// The `server_name` (and `Host`) of `upstream`'s admin server: one per upstream,
    /// so several upstream files can share the admin port.
    pub fn host(&self, upstream: &str) -> String {
        format!("flotilla-gateway-{upstream}")
    }

    pub fn url(&self, upstream: &str) -> String {
        format!("http://{}{}", self.addr, self.path(upstream))
    }
}

/// Why a `gateway-set` did not take effect. In every case nginx keeps the
/// previous weights; `restored` says how the previous file was put back.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("weights refused: {0}")]
    Invalid(String),
    #[error(transparent)]
    Render(#[from] render::RenderError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nginx -t rejected the new upstream file: {reason}; {restored}")]
    Rejected { reason: String, restored: String },
    #[error("nginx reload failed: {reason}; {restored}")]
    Reload { reason: String, restored: String },
    #[error("the reload was not confirmed: {reason}; {restored}")]
    NotConfirmed { reason: String, restored: String },
}

/// What a successful `gateway-set` applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub revision: String,
    pub file: PathBuf,
    /// From `nginx -s reload` until nginx served the new revision.
    pub reload_time: Duration,
}

/// The gateway role of this agent.
#[derive(Debug)]
pub struct Gateway {
    config: GatewayConfig,
    admin: ConfirmTarget,
    /// One change at a time: two swaps of the same file, or two reloads racing
    /// each other's confirmation, would confuse which weights are in force.
    serial: tokio::sync::Mutex<()>,
}

impl Gateway {
    /// Builds the role from a validated `[gateway]` section.
    pub fn new(config: GatewayConfig) -> Result<Self, GatewayError> {
        let admin = ConfirmTarget::parse(&config.confirm_url).map_err(GatewayError::Invalid)?;
        Ok(Self { config, admin, serial: tokio::sync::Mutex::new(()) })
    }

    /// Renders, checks, reloads and confirms `weights`.
    pub async fn set(&self, weights: &GatewayWeights) -> Result<Applied, GatewayError> {
        // Checked again here: the envelope is signed, but this text goes into nginx.
        weights.validate().map_err(GatewayError::Invalid)?;
        let text = render::render(render::TEMPLATE, weights, &self.admin)?;
        let revision = weights.revision();
        let nginx = nginx::Nginx::new(&self.config, self.admin.clone());
        let _one_at_a_time = self.serial.lock().await;
        let reload_time = apply::apply(&self.config.upstreams_dir, &weights.upstream, &text, &revision, &nginx).await?;
        Ok(Applied {
            revision,
            file: self.config.upstreams_dir.join(format!("{}.conf", weights.upstream)),
            reload_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirm_urls_must_be_loopback_with_a_path() {
        let t = ConfirmTarget::parse("http://127.0.0.1:8099/flotilla-gateway/").unwrap();
        assert_eq!(t.url("llama"), "http://127.0.0.1:8099/flotilla-gateway/llama");
        assert_eq!(ConfirmTarget::parse("http://[::1]:9/a/b").unwrap().path("x"), "/a/b/x");
        for bad in [
            "https://127.0.0.1:8099/x",
            "http://127.0.0.1/x",
            "http://localhost:8099/x",
            "http://10.0.0.1:8099/x",
            "http://127.0.0.1:8099",
            "http://127.0.0.1:8099/a b",
            "http://127.0.0.1:8099/a;",
        ] {
            assert!(ConfirmTarget::parse(bad).is_err(), "{bad}");
        }
    }
}
