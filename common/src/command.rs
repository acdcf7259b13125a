//! The commands an agent executes (the payload of a signed envelope) and their
//! results. Parsing from the operator API's name + arguments happens here, so
//! that a bad argument is refused, with its name, before anything is signed.

pub mod gateway;
pub mod image_ref;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub use gateway::{GatewayWeights, WeightedServer};

/// One command for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Does nothing: proves the signed path end to end.
    Noop,
    /// The seed's pre-start checks.
    PrestartCheck {
        model_path: Option<String>,
        min_free_bytes: u64,
        image: Option<String>,
    },
    /// A bundle of GPU, disk and container state with recent log lines.
    Diagnostics {
        log_lines: u32,
    },
    /// A container's state, health, image and labels.
    Inspect {
        container: String,
    },
    /// The last `tail` log lines of a container.
    Logs {
        container: String,
        tail: u32,
    },
    /// SIGTERM, then a kill after `timeout_s`.
    Stop {
        container: String,
        timeout_s: u32,
    },
    Restart {
        container: String,
        timeout_s: u32,
    },
    /// Wait until the inference server at `endpoint` (http://HOST:PORT) has no running
    /// requests (or the deadline passes), then stop its container.
    Drain {
        container: String,
        endpoint: String,
        deadline_s: u32,
        timeout_s: u32,
    },
    /// Start a model-server container from a spec (YAML).
    Deploy {
        spec_yaml: String,
    },
    /// Gateway role: render an nginx upstream with these weights, check it with
    /// `nginx -t`, reload, and confirm nginx serves it; a failure keeps the old weights.
    GatewaySet(GatewayWeights),
}

/// Default free space the pre-start check asks for on the model path (20 GiB).
pub const DEFAULT_MIN_FREE_BYTES: u64 = 20 * 1024 * 1024 * 1024;

impl Command {
    /// The command's name as flotctl and the API spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Noop => "noop",
            Self::PrestartCheck { .. } => "prestart-check",
            Self::Diagnostics { .. } => "diagnostics",
            Self::Inspect { .. } => "inspect",
            Self::Logs { .. } => "logs",
            Self::Stop { .. } => "stop",
            Self::Restart { .. } => "restart",
            Self::Drain { .. } => "drain",
            Self::Deploy { .. } => "deploy",
            Self::GatewaySet(_) => "gateway-set",
        }
    }

    /// Builds a command from its name, arguments and (for deploy) spec text.
    pub fn parse(name: &str, args: &HashMap<String, String>, spec_yaml: &str) -> Result<Self, String> {
        let allowed: &[&str] = match name {
            "noop" => &[],
            "prestart-check" => &["model_path", "min_free_bytes", "image"],
            "diagnostics" => &["log_lines"],
            "logs" => &["container", "tail"],
            "inspect" => &["container"],
            "stop" | "restart" => &["container", "timeout_s"],
            "drain" => &["container", "endpoint", "deadline_s", "timeout_s"],
            "deploy" => &[],
            "gateway-set" => &["upstream", "servers"],
            other => {
                return Err(format!(
                    "unknown command {other:?}: use noop, prestart-check, diagnostics, inspect, logs, stop, restart, drain, deploy or gateway-set"
                ));
            }
        };
        if let Some(extra) = args.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(format!("{name} takes no argument {extra:?} (it takes: {})", allowed.join(", ")));
        }
        let text = |k: &str| args.get(k).filter(|v| !v.is_empty()).cloned();
        let required = |k: &str| text(k).ok_or_else(|| format!("{name} needs the argument {k}"));
        let number = |k: &str, default: u64, max: u64| -> Result<u64, String> {
            match args.get(k) {
                None => Ok(default),
                Some(v) => match v.parse::<u64>() {
                    Ok(n) if n <= max => Ok(n),
                    _ => Err(format!("{name}: {k}={v:?} must be a whole number up to {max}")),
                },
            }
        };
        let small = |k: &str, default: u32, max: u32| number(k, u64::from(default), u64::from(max)).map(|n| n as u32);
        Ok(match name {
            "noop" => Self::Noop,
            "prestart-check" => Self::PrestartCheck {
                model_path: text("model_path"),
                min_free_bytes: number("min_free_bytes", DEFAULT_MIN_FREE_BYTES, u64::MAX)?,
                image: text("image"),
            },
            "diagnostics" => Self::Diagnostics { log_lines: small("log_lines", 50, 10_000)? },
            "logs" => Self::Logs { container: required("container")?, tail: small("tail", 100, 100_000)? },
            "inspect" => Self::Inspect { container: required("container")? },
            "stop" => Self::Stop { container: required("container")?, timeout_s: small("timeout_s", 10, 600)? },
            "restart" => Self::Restart { container: required("container")?, timeout_s: small("timeout_s", 10, 600)? },
            "drain" => Self::Drain {
                container: required("container")?,
                endpoint: required("endpoint")?,
                deadline_s: small("deadline_s", 30, 3600)?,
                timeout_s: small("timeout_s", 10, 600)?,
            },
            "gateway-set" => Self::GatewaySet(
                GatewayWeights::parse(&required("upstream")?, &required("servers")?)
                    .map_err(|e| format!("gateway-set: {e}"))?,
            ),
            _ => {
                if spec_yaml.trim().is_empty() {
                    return Err("deploy needs a container spec (flotctl exec NODE deploy -f spec.yaml)".to_owned());
                }
                if spec_yaml.len() > 256 * 1024 {
                    return Err("the container spec is over 256 KiB".to_owned());
                }
                Self::Deploy { spec_yaml: spec_yaml.to_owned() }
            }
        })
    }
}

/// How a command ended on the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandStatus {
    Succeeded,
    Failed,
    /// Not executed: the envelope failed verification.
    Refused,
}

impl CommandStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Refused => "refused",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn commands_parse_with_defaults_and_refuse_bad_arguments() {
        assert_eq!(Command::parse("noop", &args(&[]), "").unwrap(), Command::Noop);
        assert_eq!(
            Command::parse("logs", &args(&[("container", "c")]), "").unwrap(),
            Command::Logs { container: "c".into(), tail: 100 }
        );
        assert!(Command::parse("logs", &args(&[]), "").unwrap_err().contains("container"));
        assert!(Command::parse("logs", &args(&[("container", "c"), ("tail", "-1")]), "").unwrap_err().contains("tail"));
        assert!(Command::parse("noop", &args(&[("x", "1")]), "").unwrap_err().contains("\"x\""));
        assert!(Command::parse("reboot", &args(&[]), "").unwrap_err().contains("unknown command"));
        assert!(Command::parse("deploy", &args(&[]), " ").is_err());
    }

    #[test]
    fn gateway_set_parses_upstream_and_weighted_servers() {
        let c = Command::parse(
            "gateway-set",
            &args(&[("upstream", "llama"), ("servers", "127.0.0.1:8001=90,127.0.0.1:8002=10")]),
            "",
        )
        .unwrap();
        let Command::GatewaySet(w) = c else { panic!("not gateway-set: {c:?}") };
        assert_eq!(w.servers.len(), 2);
        assert!(Command::parse("gateway-set", &args(&[("upstream", "llama")]), "").unwrap_err().contains("servers"));
        let dup = args(&[("upstream", "llama"), ("servers", "127.0.0.1:1=1,127.0.0.1:1=2")]);
        assert!(Command::parse("gateway-set", &dup, "").unwrap_err().starts_with("gateway-set: "));
    }
}
