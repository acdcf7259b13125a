//! The alert records the engine keeps and persists: alert instances with their
//! lifecycle, acknowledgements, silences and the history of transitions.

use serde::{Deserialize, Serialize};

use crate::selector::{Selector, SelectorError};

/// Where an alert instance is in its lifecycle. Inactive alerts are not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlertState {
    Pending,
    Firing,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Pending => "pending",
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }
}

/// Who acknowledged an alert, when and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub by: String,
    pub at_unix_ms: i64,
    pub comment: String,
}

/// One alert instance: a rule and one label set of its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// Hash of the rule key and the labels.
    pub id: String,
    /// `group/alert`.
    pub rule: String,
    pub name: String,
    pub state: AlertState,
    /// Sorted; includes `alertname` and the rule's labels.
    pub labels: Vec<(String, String)>,
    pub annotations: Vec<(String, String)>,
    pub value: f64,
    pub active_since_unix_ms: i64,
    pub firing_since_unix_ms: Option<i64>,
    pub resolved_unix_ms: Option<i64>,
    /// The last evaluation at which the expression held (for `keep_firing_for`).
    pub last_held_unix_ms: i64,
    pub ack: Option<Ack>,
    /// When it was last delivered; `None` while it never was.
    pub last_notified_unix_ms: Option<i64>,
    /// Whether its resolution was delivered (an explicit flag: comparing wall
    /// clock times would lose it to a clock step).
    pub resolved_notified: bool,
}

impl AlertRecord {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// When it entered its current state.
    pub fn since_unix_ms(&self) -> i64 {
        match self.state {
            AlertState::Pending => self.active_since_unix_ms,
            AlertState::Firing => self.firing_since_unix_ms.unwrap_or(self.active_since_unix_ms),
            AlertState::Resolved => self.resolved_unix_ms.unwrap_or(self.active_since_unix_ms),
        }
    }
}

/// One change of an alert's state, kept as history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    pub at_unix_ms: i64,
    pub id: String,
    pub name: String,
    pub labels: Vec<(String, String)>,
    /// `None`: the alert was inactive before.
    pub from: Option<AlertState>,
    /// `None`: the alert became inactive (a pending alert that stopped holding).
    pub to: Option<AlertState>,
    pub value: f64,
    /// Who or what made the change: `engine`, or the operator for an ack.
    pub by: String,
}

/// A silence: alerts matching every matcher are not delivered until it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Silence {
    pub id: String,
    pub matchers: Vec<String>,
    pub starts_unix_ms: i64,
    pub ends_unix_ms: i64,
    pub created_by: String,
    pub comment: String,
}

impl Silence {
    pub fn active_at(&self, now_unix_ms: i64) -> bool {
        self.starts_unix_ms <= now_unix_ms && now_unix_ms < self.ends_unix_ms
    }
}

/// A silence's matchers, compiled.
#[derive(Debug, Clone)]
pub struct SilenceMatcher {
    selectors: Vec<Selector>,
}

impl SilenceMatcher {
    /// Compiles matchers written as in PromQL and Alertmanager (`node="gpu-3"`,
    /// `alertname=~"GPU.*"`, `severity!="info"`). Together they must select
    /// something narrower than every alert.
    pub fn new(matchers: &[String]) -> Result<Self, SelectorError> {
        if matchers.is_empty() {
            return Err(SelectorError::Parse {
                selector: String::new(),
                reason: "give at least one matcher, such as node=\"gpu-3\"".to_owned(),
            });
        }
        let selectors = matchers
            .iter()
            .map(|m| {
                let m = m.trim();
                let inner = m.strip_prefix('{').and_then(|m| m.strip_suffix('}')).unwrap_or(m);
                Selector::parse(&format!("{{{inner}}}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { selectors })
    }

    /// Whether alert labels `labels` match every matcher.
    pub fn matches(&self, labels: &[(String, String)]) -> bool {
        self.selectors.iter().all(|s| s.matches("", labels))
    }
}

/// The stable id of an alert instance.
pub fn fingerprint(rule: &str, labels: &[(String, String)]) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(rule.as_bytes());
    for (k, v) in labels {
        h.update([0xff]);
        h.update(k.as_bytes());
        h.update([0xfe]);
        h.update(v.as_bytes());
    }
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn l(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn silence_matchers_follow_alertmanager() {
        let m = SilenceMatcher::new(&[r#"node="gpu-3""#.to_owned(), r#"alertname=~"GPU.*""#.to_owned()]).unwrap();
        assert!(m.matches(&l(&[("alertname", "GPUHighTemperature"), ("node", "gpu-3")])));
        assert!(!m.matches(&l(&[("alertname", "GPUHighTemperature"), ("node", "gpu-4")])));
        assert!(!m.matches(&l(&[("alertname", "AgentDown"), ("node", "gpu-3")])));
        assert!(SilenceMatcher::new(&[]).is_err());
        assert!(SilenceMatcher::new(&[r#"node=~".*""#.to_owned()]).is_err(), "must narrow");
        assert!(SilenceMatcher::new(&["node=gpu-3".to_owned()]).is_err(), "values are quoted");
        assert!(SilenceMatcher::new(&[r#"{node="a"}"#.to_owned()]).unwrap().matches(&l(&[("node", "a")])));
    }

    #[test]
    fn fingerprints_are_stable_and_distinct() {
        let a = fingerprint("g/A", &l(&[("node", "a")]));
        assert_eq!(a, fingerprint("g/A", &l(&[("node", "a")])));
        assert_ne!(a, fingerprint("g/A", &l(&[("node", "b")])));
        assert_ne!(a, fingerprint("g/B", &l(&[("node", "a")])));
        assert_ne!(fingerprint("g", &l(&[("ab", "c")])), fingerprint("g", &l(&[("a", "bc")])));
        assert_eq!(a.len(), 16);
    }
}
