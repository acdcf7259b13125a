//! Live agent sessions: who is connected, since when, and when we last heard
//! from them, and which nodes may never connect again (revoked). Node state is
//! derived from this and the store, never stored twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flotilla_common::NodeId;
use flotilla_common::model::{NodeState, TelemetryBatch};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One connected agent stream.
#[derive(Debug, Clone)]
pub struct Session {
    /// Distinguishes a reconnect from the stream it replaces.
    pub id: u64,
    pub peer: Option<SocketAddr>,
    pub connected_at: Instant,
    pub last_heard: Instant,
    pub heartbeat_interval: Duration,
    /// The serial number (hex) of the client certificate the stream came with.
    pub cert_serial: Option<String>,
    /// Cancelled to close the stream (replaced, timed out, revoked, shutting down).
    pub cancel: CancellationToken,
    /// Messages for the agent, sent down its stream.
    pub downlink: tokio::sync::mpsc::Sender<Downlink>,
    /// The agent's clock against ours, once a heartbeat measured it.
    pub clock: Option<crate::clock::ClockReading>,
}

/// A message the controller sends down an agent's stream (besides acks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Downlink {
    /// Inject a fault into the agent's simulated GPUs.
    InjectFault { fault: flotilla_common::model::SimFault, gpu: Option<u32> },
    /// A signed command envelope.
    Command(flotilla_common::envelope::SignedEnvelope),
}

/// Why a node may no longer connect: who revoked it, when and why. Stored as
/// postcard (fields by position), so every field is always written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub node: NodeId,
    pub at_unix_ms: i64,
    /// The identity of the admin who revoked it, as the audit log names it.
    pub by: String,
    pub reason: String,
    /// Serial numbers (hex) of the certificates the node was seen with, when known.
    pub serials: Vec<String>,
}

impl std::fmt::Display for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = u64::try_from(self.at_unix_ms).unwrap_or(0);
        let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(at));
        write!(f, "node {} was revoked at {at} by {}: {}", self.node, self.by, self.reason)
    }
}

/// The registry of live sessions and revoked nodes; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    next_id: u64,
    sessions: HashMap<NodeId, Session>,
    /// Held in memory (loaded at start) so the check on every connect is a lookup.
    revoked: HashMap<NodeId, Revocation>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map half-updated
        // (every operation is a single insert/remove), so poison is safe to clear.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A registry that already knows the stored revocations.
    pub fn with_revocations(revoked: impl IntoIterator<Item = Revocation>) -> Self {
        let registry = Self::default();
        registry.lock().revoked = revoked.into_iter().map(|r| (r.node.clone(), r)).collect();
        registry
    }

    /// Registers a new session for `node`, closing the one it replaces, if any.
    /// A revoked node gets no session: its revocation is returned instead. The
    /// check and the insert share one lock with [`Registry::revoke`], so a
    /// revocation never misses a stream that was opening at the same time.
    pub fn open(
        &self,
        node: &NodeId,
        peer: Option<SocketAddr>,
        cert_serial: Option<String>,
        heartbeat_interval: Duration,
        parent: &CancellationToken,
        downlink: tokio::sync::mpsc::Sender<Downlink>,
    ) -> Result<Session, Revocation> {
        let mut inner = self.lock();
        if let Some(revoked) = inner.revoked.get(node) {
            return Err(revoked.clone());
        }
        inner.next_id += 1;
        let now = Instant::now();
        let session = Session {
            id: inner.next_id,
            peer,
            connected_at: now,
            last_heard: now,
            heartbeat_interval,
            cert_serial,
            cancel: parent.child_token(),
            downlink,
            clock: None,
        };
        if let Some(old) = inner.sessions.insert(node.clone(), session.clone()) {
            tracing::info!(node_id = %node, old_peer = ?old.peer, "agent reconnected; closing its previous stream");
            old.cancel.cancel();
        }
        Ok(session)
    }

    /// Marks a node revoked and closes its live stream at once (the stream's own
    /// task then removes the session). Returns the closed session, if there was one.
    /// The caller has stored the revocation first.
    pub fn revoke(&self, revocation: Revocation) -> Option<Session> {
        let mut inner = self.lock();
        let node = revocation.node.clone();
        inner.revoked.insert(node.clone(), revocation);
        let session = inner.sessions.get(&node).cloned();
        if let Some(s) = &session {
            s.cancel.cancel();
        }
        session
    }

    /// Why `node` may not connect, if it was revoked.
    pub fn revocation(&self, node: &NodeId) -> Option<Revocation> {
        self.lock().revoked.get(node).cloned()
    }

    /// Notes that `node` was heard from on session `id`.
    pub fn touch(&self, node: &NodeId, id: u64) {
        if let Some(s) = self.lock().sessions.get_mut(node)
            && s.id == id
        {
            s.last_heard = Instant::now();
        }
    }

    /// Records what session `id` of `node` measured of the agent's clock.
    pub fn set_clock(&self, node: &NodeId, id: u64, reading: crate::clock::ClockReading) {
        if let Some(s) = self.lock().sessions.get_mut(node)
            && s.id == id
        {
            s.clock = Some(reading);
        }
    }

    /// `now_unix_ms` (controller time) on `node`'s own clock, as its heartbeats
    /// measured it; unchanged before the first reading. Commands are signed in
    /// the agent's time: it judges their validity by its clock, so an agent whose
    /// clock is off still takes them (it is degraded and told to fix its time).
    pub fn agent_time(&self, node: &NodeId, now_unix_ms: i64) -> i64 {
        let offset = self.lock().sessions.get(node).and_then(|s| s.clock).map_or(0, |c| c.offset_ms);
        now_unix_ms.saturating_add(offset)
    }

    /// Removes session `id` of `node` and returns it; a newer session is left alone.
    pub fn close(&self, node: &NodeId, id: u64) -> Option<Session> {
        let mut inner = self.lock();
        if inner.sessions.get(node).is_some_and(|s| s.id == id) {
            return inner.sessions.remove(node);
        }
        None
    }

    /// The current session of `node`.
    pub fn session(&self, node: &NodeId) -> Option<Session> {
        self.lock().sessions.get(node).cloned()
    }

    /// Sessions whose agent has been silent past `missed` heartbeat intervals.
    pub fn expired(&self, now: Instant, missed: u32) -> Vec<(NodeId, Session)> {
        self.lock()
            .sessions
            .iter()
            .filter(|(_, s)| !s.cancel.is_cancelled())
            .filter(|(_, s)| now.saturating_duration_since(s.last_heard) > s.heartbeat_interval * missed)
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect()
    }

    /// Number of connected agents.
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Whether no agent is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Wall-clock time (Unix ms) at which `instant` happened.
pub fn unix_ms_at(instant: Instant) -> i64 {
    let ago = Instant::now().saturating_duration_since(instant);
    flotilla_common::time::now_unix_ms() - i64::try_from(ago.as_millis()).unwrap_or(i64::MAX)
}

/// Decides a node's state from its session and latest batch: a pure function of
/// its inputs so that every rule is unit-tested.
pub fn node_state(
    session: Option<&Session>,
    latest: Option<&TelemetryBatch>,
    now: Instant,
    missed: u32,
) -> (NodeState, String) {
    let Some(session) = session else {
        return (NodeState::Down, "agent not connected".to_owned());
    };
    let silent = now.saturating_duration_since(session.last_heard);
    if silent > session.heartbeat_interval * missed {
        return (NodeState::Down, format!("no heartbeat for {}s", silent.as_secs()));
    }
    let failing: Vec<String> = session
        .clock
        .and_then(|c| c.reason())
        .into_iter()
        .chain(
            latest
                .into_iter()
                .flat_map(|b| b.failing_collectors())
                .map(|c| format!("collector {} failing: {}", c.name, c.error)),
        )
        .collect();
    if !failing.is_empty() {
        return (NodeState::Degraded, failing.join("; "));
    }
    (NodeState::Up, String::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_common::model::CollectorStatus;

    fn node(id: &str) -> NodeId {
        NodeId::new(id).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn state_follows_heartbeats_and_collectors() {
        let reg = Registry::default();
        let root = CancellationToken::new();
        let n = node("a");
        assert_eq!(node_state(None, None, Instant::now(), 3).0, NodeState::Down);

        let s = reg.open(&n, None, None, Duration::from_secs(1), &root, tokio::sync::mpsc::channel(1).0).unwrap();
        assert_eq!(node_state(Some(&s), None, Instant::now(), 3).0, NodeState::Up);

        let mut bad = TelemetryBatch::default();
        bad.collectors.push(CollectorStatus { name: "gpu".into(), healthy: false, error: "nvml".into() });
        let (state, reason) = node_state(Some(&s), Some(&bad), Instant::now(), 3);
        assert_eq!(state, NodeState::Degraded);
        assert!(reason.contains("gpu"));

        let skewed = crate::clock::ClockReading { offset_ms: 600_000, skewed: true };
        reg.set_clock(&n, s.id, skewed);
        let (state, reason) = node_state(reg.session(&n).as_ref(), Some(&bad), Instant::now(), 3);
        assert_eq!(state, NodeState::Degraded);
        assert!(reason.starts_with("agent clock 600.0s ahead") && reason.contains("collector gpu"), "{reason}");
        assert_eq!(reg.agent_time(&n, 1_000), 601_000, "commands are signed in the agent's time");
        assert_eq!(reg.agent_time(&NodeId::new("other").unwrap(), 1_000), 1_000);
        reg.set_clock(&n, s.id, crate::clock::ClockReading { offset_ms: 600_000, skewed: false });
        assert_eq!(node_state(reg.session(&n).as_ref(), None, Instant::now(), 3).0, NodeState::Up);

        tokio::time::advance(Duration::from_millis(3100)).await;
        let s = reg.session(&n).unwrap();
        assert_eq!(node_state(Some(&s), None, Instant::now(), 3).0, NodeState::Down);
        assert_eq!(reg.expired(Instant::now(), 3).len(), 1);
        reg.touch(&n, s.id);
        assert!(reg.expired(Instant::now(), 3).is_empty());
        tokio::time::advance(Duration::from_millis(3100)).await;
        s.cancel.cancel();
        assert!(reg.expired(Instant::now(), 3).is_empty(), "a stream already being closed is not reported again");
    }

    #[tokio::test]
    async fn a_reconnect_replaces_and_closes_the_old_session() {
        let reg = Registry::default();
        let root = CancellationToken::new();
        let n = node("a");
        let old = reg.open(&n, None, None, Duration::from_secs(1), &root, tokio::sync::mpsc::channel(1).0).unwrap();
        let new = reg.open(&n, None, None, Duration::from_secs(1), &root, tokio::sync::mpsc::channel(1).0).unwrap();
        assert!(old.cancel.is_cancelled());
        assert!(reg.close(&n, old.id).is_none(), "the old stream's cleanup must not remove the new session");
        assert_eq!(reg.session(&n).unwrap().id, new.id);
        assert!(reg.close(&n, new.id).is_some());
        assert!(reg.is_empty());
    }

    #[test]
    fn a_revoked_node_is_closed_and_cannot_open_again() {
        let reg = Registry::default();
        let root = CancellationToken::new();
        let (n, other) = (node("a"), node("b"));
        let live =
            reg.open(&n, None, Some("0a".into()), Duration::from_secs(1), &root, tokio::sync::mpsc::channel(1).0);
        let live = live.unwrap();
        let revocation = Revocation {
            node: n.clone(),
            at_unix_ms: 1_700_000_000_000,
            by: "operator root (admin)".into(),
            reason: "stolen".into(),
            serials: vec!["0a".into()],
        };
        let closed = reg.revoke(revocation.clone()).expect("the live session is returned");
        assert_eq!(closed.id, live.id);
        assert!(live.cancel.is_cancelled(), "the stream is closed at once");
        let refused = reg.open(&n, None, None, Duration::from_secs(1), &root, tokio::sync::mpsc::channel(1).0);
        assert_eq!(refused.unwrap_err(), revocation);
        assert_eq!(
            revocation.to_string(),
            "node a was revoked at 2023-11-14T22:13:20Z by operator root (admin): stolen"
        );
        assert!(reg.open(&other, None, None, Duration::from_secs(1), &root, tokio::sync::mpsc::channel(1).0).is_ok());

        let restarted = Registry::with_revocations([revocation]);
        assert!(restarted.revocation(&n).is_some());
        assert!(
            restarted.open(&n, None, None, Duration::from_secs(1), &root, tokio::sync::mpsc::channel(1).0).is_err()
        );
    }
}
