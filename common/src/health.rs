//! A container's health check as deployment and container specs write it, and
//! its validation: one definition for the controller (which refuses a bad one
//! when a deployment is applied) and the agent (which renders it for the engine).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The engine's health check: exactly one of `command`, `shell` or `http`, run
/// inside the container every `interval`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// A program and its arguments, run without a shell (`CMD`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// A shell command line (`CMD-SHELL`); needs `/bin/sh` in the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// An HTTP GET on loopback inside the container; rendered as a shell line that
    /// tries `curl`, then `wget`, then `python3`, so the image needs `/bin/sh` and
    /// one of them (model-server images have at least Python).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    /// Time between checks.
    #[serde(with = "humantime_serde", default = "default_interval")]
    pub interval: Duration,
    /// How long one check may take.
    #[serde(with = "humantime_serde", default = "default_timeout")]
    pub timeout: Duration,
    /// Consecutive failures before the container is unhealthy.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Failures during this time after start do not count (model loading).
    #[serde(with = "humantime_serde", default)]
    pub start_period: Duration,
}

fn default_interval() -> Duration {
    Duration::from_secs(10)
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_retries() -> u32 {
    3
}

/// An HTTP health probe against the container's own port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    /// The port inside the container.
    pub port: u32,
    /// The path, e.g. `/health`.
    #[serde(default = "default_path")]
    pub path: String,
}

fn default_path() -> String {
    "/health".to_owned()
}

impl HealthCheck {
    /// Checks what parsing cannot: one kind of probe, a runnable command, a
    /// shell-safe HTTP path, the engine's floors. The error says what to change.
    pub fn check(&self) -> Result<(), String> {
        let kinds =
            usize::from(self.command.is_some()) + usize::from(self.shell.is_some()) + usize::from(self.http.is_some());
        if kinds != 1 {
            return Err(format!("set exactly one of command, shell or http (found {kinds})"));
        }
        if self.command.as_ref().is_some_and(|c| c.first().is_none_or(String::is_empty)) {
            return Err("command must name a program".into());
        }
        if self.shell.as_ref().is_some_and(|s| s.trim().is_empty()) {
            return Err("shell must not be empty".into());
        }
        if let Some(http) = &self.http {
            if !(1..=65535).contains(&http.port) {
                return Err(format!("http.port {} must be within 1..65535", http.port));
            }
            // The path is pasted into a shell line, so only URL characters that mean
            // nothing to the shell are allowed.
            let safe = |c: char| c.is_ascii_alphanumeric() || "-._~/%=:,+@".contains(c);
            if !http.path.starts_with('/') || !http.path.chars().all(safe) {
                return Err(format!(
                    "http.path {:?} must start with '/' and use only letters, digits and -._~/%=:,+@",
                    http.path
                ));
            }
        }
        // The engine's own floor; below it the create request is refused.
        let floor = Duration::from_millis(1);
        for (name, value, zero_ok) in [
            ("interval", self.interval, false),
            ("timeout", self.timeout, false),
            ("start_period", self.start_period, true),
        ] {
            if value < floor && !(zero_ok && value.is_zero()) {
                return Err(format!("{name} must be at least 1ms"));
            }
        }
        if self.retries == 0 {
            return Err("retries must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<(), String> {
        serde_json::from_str::<HealthCheck>(json).map_err(|e| e.to_string())?.check()
    }

    #[test]
    fn one_probe_with_sane_values() {
        assert!(parse(r#"{"http": {"port": 8000}}"#).is_ok());
        assert!(parse(r#"{"command": ["/probe", "x"], "interval": "1s"}"#).is_ok());
        assert!(parse("{}").unwrap_err().contains("found 0"));
        assert!(parse(r#"{"shell": "x", "command": ["y"]}"#).unwrap_err().contains("found 2"));
        assert!(parse(r#"{"http": {"port": 0}}"#).unwrap_err().contains("http.port"));
        assert!(parse(r#"{"http": {"port": 80, "path": "/h; rm -rf /"}}"#).unwrap_err().contains("http.path"));
        assert!(parse(r#"{"shell": "x", "retries": 0}"#).unwrap_err().contains("retries"));
        assert!(parse(r#"{"shell": "x", "probe": 1}"#).unwrap_err().contains("unknown field"));
    }
}
