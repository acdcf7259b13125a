//! Named connection contexts in flotctl's config file
//! (`$XDG_CONFIG_HOME/flotilla/config.toml`, default `~/.config/flotilla/config.toml`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use flotilla_common::tls::TlsFiles;
use serde::{Deserialize, Serialize};

use crate::UsageError;
use crate::cli::ConnArgs;

/// What flotctl takes from its environment, resolved once in `main` so that the
/// rest never reads process-global state.
#[derive(Debug, Clone)]
pub struct Env {
    /// The config file with contexts.
    pub config_path: PathBuf,
}

impl Env {
    /// The default config path from `XDG_CONFIG_HOME` or `HOME`.
    pub fn default_config_path(xdg_config_home: Option<PathBuf>, home: Option<PathBuf>) -> PathBuf {
        xdg_config_home
            .filter(|p| p.is_absolute())
            .or_else(|| home.map(|h| h.join(".config")))
            .unwrap_or_else(|| PathBuf::from(".config"))
            .join("flotilla")
            .join("config.toml")
    }
}

/// The config file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlConfig {
    /// The context used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// How to reach one controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    pub controller: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A resolved connection.
#[derive(Debug, Clone)]
pub struct Connection {
    pub controller: String,
    pub tls: TlsFiles,
}

impl CtlConfig {
    /// Reads the file; a missing file is an empty config.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        Ok(flotilla_common::config::load_toml(path)?)
    }

    /// Writes the file atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        let text = toml::to_string_pretty(self).context("encode flotctl config")?;
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
        Ok(())
    }

    /// Combines the named (or current) context with the flags; flags win.
    pub fn resolve(&self, conn: &ConnArgs, path: &Path) -> anyhow::Result<Connection> {
        let name = conn.context.as_ref().or(self.current.as_ref());
        let ctx = match name {
            Some(n) => Some(self.contexts.get(n).ok_or_else(|| {
                UsageError(format!(
                    "context {n:?} is not in {}; `flotctl context ls` lists the contexts",
                    path.display()
                ))
            })?),
            None => None,
        };
        let pick = |flag: &Option<PathBuf>, from_ctx: Option<&PathBuf>, what: &str| -> anyhow::Result<PathBuf> {
            flag.clone().or_else(|| from_ctx.cloned()).ok_or_else(|| {
                UsageError(format!(
                    "no {what} given: pass --{what} or select a context (`flotctl context use NAME`; `flotctl demo` creates one named demo)"
                ))
                .into()
            })
        };
        let controller = conn
            .controller
            .clone()
            .or_else(|| ctx.map(|c| c.controller.clone()))
            .ok_or_else(|| {
                UsageError(
                    "no controller given: pass --controller https://HOST:PORT or select a context (`flotctl context use NAME`; `flotctl demo` creates one named demo)".to_owned(),
                )
            })?;
        Ok(Connection {
            controller,
            tls: TlsFiles {
                ca: pick(&conn.cacert, ctx.map(|c| &c.ca), "cacert")?,
                cert: pick(&conn.cert, ctx.map(|c| &c.cert), "cert")?,
                key: pick(&conn.key, ctx.map(|c| &c.key), "key")?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_context() {
        let mut cfg = CtlConfig::default();
        cfg.contexts.insert(
            "a".into(),
            Context { controller: "https://a:1".into(), ca: "ca".into(), cert: "c".into(), key: "k".into() },
        );
        cfg.current = Some("a".into());
        let conn = ConnArgs { controller: Some("https://b:2".into()), ..Default::default() };
        let r = cfg.resolve(&conn, Path::new("x")).unwrap();
        assert_eq!(r.controller, "https://b:2");
        assert_eq!(r.tls.ca, PathBuf::from("ca"));
    }

    #[test]
    fn missing_settings_are_usage_errors() {
        let err = CtlConfig::default().resolve(&ConnArgs::default(), Path::new("x")).unwrap_err();
        assert!(err.downcast_ref::<UsageError>().is_some());
    }

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f/config.toml");
        let mut cfg = CtlConfig { current: Some("demo".into()), ..Default::default() };
        cfg.contexts.insert(
            "demo".into(),
            Context { controller: "https://127.0.0.1:1".into(), ca: "a".into(), cert: "b".into(), key: "c".into() },
        );
        cfg.save(&path).unwrap();
        let back = CtlConfig::load(&path).unwrap();
        assert_eq!(back.current.as_deref(), Some("demo"));
        assert_eq!(back.contexts, cfg.contexts);
    }

    #[test]
    fn default_path_follows_xdg() {
        assert_eq!(
            Env::default_config_path(Some("/x".into()), Some("/home/u".into())),
            PathBuf::from("/x/flotilla/config.toml")
        );
        assert_eq!(
            Env::default_config_path(None, Some("/home/u".into())),
            PathBuf::from("/home/u/.config/flotilla/config.toml")
        );
    }
}
