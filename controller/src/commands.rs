//! Issuing signed commands: the controller's Ed25519 command key, and the
//! commands waiting for their results. The key lives in the data dir
//! (`command-signing.key`, 0600); its public half (`command-signing.pub`) is
//! what every agent pins (`command_key` in the agent config).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use flotilla_common::NodeId;
use flotilla_common::command::{Command, CommandStatus};
use flotilla_common::envelope::{CommandId, CommandKey, DEFAULT_TTL, KeyError, SignedEnvelope, Trailer};
use flotilla_common::trace::TraceParent;
use tokio::sync::oneshot;

/// What an agent answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandReply {
    pub status: CommandStatus,
    pub detail: String,
    pub output_json: String,
}

/// The signing key and the table of commands awaiting results.
pub struct CommandCenter {
    key: CommandKey,
    waiting: Mutex<HashMap<CommandId, (NodeId, oneshot::Sender<CommandReply>)>>,
}

impl std::fmt::Debug for CommandCenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandCenter").field("key_id", &self.key.key_id()).finish_non_exhaustive()
    }
}

/// Where the public key agents pin is written.
pub fn public_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("command-signing.pub")
}

impl CommandCenter {
    /// Loads (or creates) the key in `data_dir` and writes its public half beside it.
    pub fn load(data_dir: &Path) -> Result<Self, KeyError> {
        let key = CommandKey::load_or_create(&data_dir.join("command-signing.key"))?;
        key.public().write(&public_key_path(data_dir))?;
        Ok(Self { key, waiting: Mutex::new(HashMap::new()) })
    }

    /// The signing key's id.
    pub fn key_id(&self) -> &str {
        self.key.key_id()
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<CommandId, (NodeId, oneshot::Sender<CommandReply>)>> {
        // Each operation is one insert or remove: a poisoned map is still consistent.
        self.waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Signs `command` for `node` and registers a waiter for its result.
    pub fn prepare(
        &self,
        node: &NodeId,
        command: &Command,
        now_unix_ms: i64,
    ) -> Result<(CommandId, SignedEnvelope, oneshot::Receiver<CommandReply>), KeyError> {
        self.prepare_as(CommandId::new(), node, command, now_unix_ms)
    }

    /// [`Self::prepare`] under a given id: a resent command keeps its id, so the
    /// agent answers with its stored result instead of running it again. The
    /// envelope's signed trailer carries the current span's trace context (an
    /// `ExecCommand` call's span, or the rollout driver's), so that the agent's
    /// run of it joins that trace.
    pub fn prepare_as(
        &self,
        id: CommandId,
        node: &NodeId,
        command: &Command,
        now_unix_ms: i64,
    ) -> Result<(CommandId, SignedEnvelope, oneshot::Receiver<CommandReply>), KeyError> {
        let trailer = Trailer::traced(TraceParent::current().as_ref());
        let signed = self.key.sign_with(id, node, command, DEFAULT_TTL, now_unix_ms, &trailer)?;
        let (tx, rx) = oneshot::channel();
        self.waiting().insert(id, (node.clone(), tx));
        Ok((id, signed, rx))
    }

    /// Delivers a result from `node`; a result for a command sent to another node is ignored.
    pub fn complete(&self, node: &NodeId, id: CommandId, reply: CommandReply) -> bool {
        let mut waiting = self.waiting();
        match waiting.get(&id) {
            Some((target, _)) if target == node => {}
            Some(_) => {
                tracing::warn!(node_id = %node, command_id = %id, "ignoring a result for a command sent to another node");
                return false;
            }
            None => return false,
        }
        match waiting.remove(&id) {
            Some((_, tx)) => tx.send(reply).is_ok(),
            None => false,
        }
    }

    /// Forgets a command nobody waits for any more.
    pub fn abandon(&self, id: &CommandId) {
        self.waiting().remove(id);
    }
}

/// Why a command got no result.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error("node {0} is not connected")]
    NotConnected(NodeId),
    #[error("node {0}'s stream closed or is busy; the command was not sent")]
    NotSent(NodeId),
    #[error("signing the command failed: {0}")]
    Sign(#[from] KeyError),
    #[error("no result from {node} within {}s for command {id}; the node may still be running it", wait.as_secs())]
    NoResult { node: NodeId, id: CommandId, wait: Duration },
}

/// Sends a prepared envelope down `node`'s stream and waits for its result.
/// The waiter is dropped on every failure.
pub async fn deliver(
    registry: &crate::registry::Registry,
    center: &CommandCenter,
    node: &NodeId,
    prepared: (CommandId, SignedEnvelope, oneshot::Receiver<CommandReply>),
    wait: Duration,
) -> Result<CommandReply, DispatchError> {
    let (id, signed, reply) = prepared;
    let Some(session) = registry.session(node) else {
        center.abandon(&id);
        return Err(DispatchError::NotConnected(node.clone()));
    };
    let sent =
        tokio::time::timeout(Duration::from_secs(5), session.downlink.send(crate::registry::Downlink::Command(signed)))
            .await;
    if !matches!(sent, Ok(Ok(()))) {
        center.abandon(&id);
        return Err(DispatchError::NotSent(node.clone()));
    }
    match tokio::time::timeout(wait, reply).await {
        Ok(Ok(reply)) => Ok(reply),
        _ => {
            center.abandon(&id);
            Err(DispatchError::NoResult { node: node.clone(), id, wait })
        }
    }
}

/// How long the controller waits for a command's result.
pub fn result_wait(command: &Command) -> Duration {
    let base = DEFAULT_TTL + Duration::from_secs(30);
    match command {
        Command::Drain { deadline_s, timeout_s, .. } => base + Duration::from_secs(u64::from(*deadline_s + *timeout_s)),
        Command::Stop { timeout_s, .. } | Command::Restart { timeout_s, .. } => {
            base + Duration::from_secs(u64::from(*timeout_s))
        }
        // Starting a container may wait for the engine to create it.
        Command::Deploy { .. } => base + Duration::from_secs(120),
        // Up to four nginx steps (check, reload, confirm, reload back), each bounded
        // by the gateway's reload_timeout, which the agent caps at 15 s.
        Command::GatewaySet(_) => base + Duration::from_secs(60),
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_reach_only_their_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let center = CommandCenter::load(dir.path()).unwrap();
        assert!(public_key_path(dir.path()).exists());
        let a = NodeId::new("a").unwrap();
        let b = NodeId::new("b").unwrap();
        let (id, signed, mut rx) = center.prepare(&a, &Command::Noop, 1_800_000_000_000).unwrap();
        assert!(!signed.bytes.is_empty());
        let reply = CommandReply { status: CommandStatus::Succeeded, detail: String::new(), output_json: "{}".into() };
        assert!(!center.complete(&b, id, reply.clone()), "another node cannot answer");
        assert!(rx.try_recv().is_err());
        assert!(center.complete(&a, id, reply.clone()));
        assert_eq!(rx.try_recv().unwrap(), reply);
        assert!(!center.complete(&a, id, reply), "answered once");
        let again = CommandCenter::load(dir.path()).unwrap();
        assert_eq!(again.key_id(), center.key_id(), "the key persists");
    }
}
