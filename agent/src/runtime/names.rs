//! How this agent's containers are named on an engine that other agents may share
//! (`[runtime] name_prefix`): the engine knows a container as
//! `{name_prefix}NAME-REVISION`, everything outside the runtime as `NAME-REVISION`.
//! Only the runtime drivers translate, with [`NamePrefix`], so the controller never
//! sees a prefix and commands name containers as the reports did.

use std::fmt;
use std::str::FromStr;

use flotilla_common::NodeId;
use serde::Deserialize;

use super::info::ContainerInfo;
use super::render::LABEL_NODE;

/// The longest `name_prefix` accepted; the engine's name still has room for the
/// deployment name and revision.
pub const MAX_NAME_PREFIX_LEN: usize = 64;

/// What this agent puts before every container name it gives the engine; empty
/// (the default) when the agent has the engine to itself. Valid by construction:
/// empty, or `[a-zA-Z0-9][a-zA-Z0-9_.-]*` of at most [`MAX_NAME_PREFIX_LEN`]
/// characters, so the prefixed name is still one the engine accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct NamePrefix(String);

/// Why a `name_prefix` is refused; the message names the config key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamePrefixError {
    #[error("runtime.name_prefix is {0} characters long; the limit is {MAX_NAME_PREFIX_LEN}")]
    TooLong(usize),
    #[error("runtime.name_prefix {0:?} must be empty or match [a-zA-Z0-9][a-zA-Z0-9_.-]* (e.g. \"gpu-1.\")")]
    BadCharacter(String),
}

impl NamePrefix {
    /// Validates and wraps `prefix`.
    pub fn new(prefix: impl Into<String>) -> Result<Self, NamePrefixError> {
        let prefix = prefix.into();
        let len = prefix.chars().count();
        if len > MAX_NAME_PREFIX_LEN {
            return Err(NamePrefixError::TooLong(len));
        }
        let mut chars = prefix.chars();
        let ok = match chars.next() {
            None => true,
            Some(first) => {
                first.is_ascii_alphanumeric()
                    && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
            }
        };
        if !ok {
            return Err(NamePrefixError::BadCharacter(prefix));
        }
        Ok(Self(prefix))
    }

    /// The prefix as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the agent has the engine to itself (no prefix).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The engine's name for the agent's container `name` (`NAME-REVISION`).
    pub fn to_engine(&self, name: &str) -> String {
        format!("{}{name}", self.0)
    }

    /// The agent's name for the engine's container `engine_name`, or `None` when
    /// the name does not carry this prefix (another agent's container).
    pub fn to_agent<'a>(&self, engine_name: &'a str) -> Option<&'a str> {
        engine_name.strip_prefix(self.0.as_str())
    }

    /// `info` as the agent tells of it: its name without the prefix. A name
    /// without the prefix (the container was renamed under us) is kept whole.
    pub(crate) fn agent_view(&self, mut info: ContainerInfo) -> ContainerInfo {
        if let Some(name) = self.to_agent(&info.name) {
            info.name = name.to_owned();
        }
        info
    }

    /// The agent on `node`'s view of `info`, a managed container listed on the
    /// engine, or `None` when it is another agent's: its name lacks the prefix,
    /// or, with a prefix, its `flotilla.node` names another node (one prefix may
    /// begin another: `gpu-1.` and `gpu-1.0.`). Without a prefix every managed
    /// container is the agent's, as when it has the engine to itself.
    pub(crate) fn claim(&self, node: Option<&NodeId>, mut info: ContainerInfo) -> Option<ContainerInfo> {
        info.name = self.to_agent(&info.name)?.to_owned();
        let creator = info.labels.get(LABEL_NODE);
        let others = !self.is_empty() && node.zip(creator).is_some_and(|(me, creator)| me.as_str() != creator);
        (!others).then_some(info)
    }
}

impl TryFrom<String> for NamePrefix {
    type Error = NamePrefixError;

    fn try_from(prefix: String) -> Result<Self, NamePrefixError> {
        Self::new(prefix)
    }
}

impl FromStr for NamePrefix {
    type Err = NamePrefixError;

    fn from_str(prefix: &str) -> Result<Self, NamePrefixError> {
        Self::new(prefix)
    }
}

impl fmt::Display for NamePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_gain_the_prefix_on_the_way_in_and_lose_it_on_the_way_out() {
        let none = NamePrefix::default();
        assert_eq!((none.to_engine("m-1"), none.to_agent("m-1")), ("m-1".to_owned(), Some("m-1")));
        let p = NamePrefix::new("gpu-1.").unwrap();
        assert_eq!(p.to_engine("m-1"), "gpu-1.m-1");
        assert_eq!(p.to_agent("gpu-1.m-1"), Some("m-1"));
        assert_eq!(p.to_agent("gpu-2.m-1"), None, "another agent's container");
        assert_eq!(p.to_agent("m-1"), None);
    }

    #[test]
    fn prefixes_are_names_the_engine_accepts() {
        for ok in ["", "a", "gpu-1.", "Lab_3-", "0.x", &"a".repeat(MAX_NAME_PREFIX_LEN)] {
            assert_eq!(NamePrefix::new(ok).unwrap().as_str(), ok);
        }
        for bad in ["-a", ".a", "_a", "a b", "a/", "é", "a:b"] {
            let err = NamePrefix::new(bad).unwrap_err().to_string();
            assert!(err.contains("runtime.name_prefix") && err.contains("[a-zA-Z0-9]"), "{bad:?}: {err}");
        }
        let err = NamePrefix::new("a".repeat(MAX_NAME_PREFIX_LEN + 1)).unwrap_err().to_string();
        assert!(err.contains("runtime.name_prefix") && err.contains("65 characters"), "{err}");
    }
}
