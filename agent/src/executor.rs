//! The signed-command executor. An envelope from the controller is verified
//! against the pinned controller key ([`flotilla_common::envelope`]) before
//! anything in it is read; its id is recorded durably before it runs; every
//! refusal is reported back and logged with its reason, and nothing executes.
//! A resent command (same id, even in a newly signed envelope, for a day after
//! it expired: `seen`) gets its stored result, and does not run twice.

mod run;
mod seen;

use std::path::Path;
use std::sync::Arc;

use flotilla_common::NodeId;
use flotilla_common::command::{Command, CommandStatus};
use flotilla_common::envelope::{CommandId, PinnedKey, Refusal, SignedEnvelope};
use flotilla_common::logging::RecentEvents;
use flotilla_common::model::{ContainerReport, GpuInfo};
use flotilla_common::time::now_unix_ms;
use flotilla_common::trace::TraceParent;
use tracing::Instrument;

use crate::runtime::DockerRuntime;
pub use seen::{SeenIds, StoredResult};

/// What a command produced, or why it did not run.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The command id, when the envelope was readable.
    pub id: Option<CommandId>,
    pub status: CommandStatus,
    pub detail: String,
    pub output: serde_json::Value,
    /// The managed containers as listed right after a command that may have
    /// changed them (deploy, stop, restart, drain); sent to the controller
    /// before the result, so an operator who reads the node after the result
    /// sees the change. Not stored with the result.
    pub containers: Option<ContainerReport>,
}

impl Outcome {
    fn refused(id: Option<CommandId>, reason: impl Into<String>) -> Self {
        Self {
            id,
            status: CommandStatus::Refused,
            detail: reason.into(),
            output: serde_json::json!({}),
            containers: None,
        }
    }
}

/// Everything a command may use on this host.
#[derive(Debug, Clone)]
pub struct Host {
    pub gpus: Vec<GpuInfo>,
    pub runtime: Arc<DockerRuntime>,
    /// The agent's own recent warnings and errors, for diagnostics.
    pub recent: RecentEvents,
    /// The gateway role, when this agent has a `[gateway]` section.
    pub gateway: Option<Arc<crate::gateway::Gateway>>,
    /// Where each container listing publishes the model servers to scrape.
    pub servers: crate::inference::ManagedServers,
}

/// The verification half: decides whether an envelope may run.
#[derive(Debug)]
pub struct Gate {
    me: NodeId,
    key: Option<PinnedKey>,
    seen: SeenIds,
}

/// What to do with an arriving envelope.
#[derive(Debug)]
pub enum Admission {
    /// Answer at once (a refusal, or the stored result of a resent command).
    Answer(Outcome),
    /// Verified and recorded: run it, then call [`Gate::finish`]. `trace` is the
    /// issuing span's context from the envelope's signed trailer, if well formed.
    Run { id: CommandId, command: Command, trace: Option<TraceParent> },
}

impl Gate {
    /// Opens the seen-id store in `dir`. Without a pinned key every command is refused.
    pub fn open(me: NodeId, key: Option<PinnedKey>, dir: &Path) -> std::io::Result<Self> {
        Ok(Self { me, key, seen: SeenIds::open(dir, now_unix_ms())? })
    }

    /// Verifies `signed` and records its id.
    pub fn admit(&mut self, signed: &SignedEnvelope) -> Admission {
        let Some(key) = &self.key else {
            return Admission::Answer(Outcome::refused(
                untrusted_id(signed),
                "no controller command key is pinned on this agent (set command_key in its config); nothing runs",
            ));
        };
        // Everything but replay first, so that a resend can be told from a replay.
        let (envelope, trailer) = match key.verify_with_trailer::<Command>(signed, &self.me, now_unix_ms(), |_| false) {
            Ok(verified) => verified,
            Err(refusal) => return Admission::Answer(Outcome::refused(untrusted_id(signed), refusal.to_string())),
        };
        if self.seen.contains(&envelope.id) {
            return Admission::Answer(match self.seen.result(&envelope.id) {
                Some(stored) => Outcome {
                    id: Some(envelope.id),
                    status: stored.status,
                    detail: stored.detail,
                    output: stored.output,
                    containers: None,
                },
                None => Outcome::refused(Some(envelope.id), Refusal::Replayed(envelope.id).to_string()),
            });
        }
        if let Err(e) = self.seen.insert(envelope.id, envelope.expires_at_unix_ms) {
            // Without a durable record a replay could not be refused later: do not run.
            return Admission::Answer(Outcome::refused(
                Some(envelope.id),
                format!("cannot record the command id durably ({e}); not running it"),
            ));
        }
        Admission::Run { id: envelope.id, command: envelope.payload, trace: trailer.trace_parent() }
    }

    /// Stores a finished command's result for resends.
    pub fn finish(&self, outcome: &Outcome) {
        let Some(id) = outcome.id else { return };
        let stored =
            StoredResult { status: outcome.status, detail: outcome.detail.clone(), output: outcome.output.clone() };
        if let Err(error) = self.seen.store_result(&id, &stored) {
            tracing::warn!(%error, command_id = %id, "cannot store the command result");
        }
    }
}

/// The id of an envelope that failed verification, read without trusting it,
/// only so that the refusal reaches the operator who sent it.
fn untrusted_id(signed: &SignedEnvelope) -> Option<CommandId> {
    let body = signed.bytes.get(2..)?;
    postcard::from_bytes::<flotilla_common::envelope::Envelope<Command>>(body).ok().map(|e| e.id)
}

/// Runs an admitted command in its own span, a child of the issuing span when
/// the envelope carried its trace context.
pub async fn execute(host: &Host, id: CommandId, command: Command, trace: Option<TraceParent>) -> Outcome {
    let name = command.name();
    let span = tracing::info_span!(
        "command",
        otel.name = format!("command {name}"),
        otel.kind = "consumer",
        command_id = %id,
    );
    if let Some(parent) = &trace {
        parent.adopt(&span);
    }
    execute_in_span(host, id, command).instrument(span).await
}

async fn execute_in_span(host: &Host, id: CommandId, command: Command) -> Outcome {
    let name = command.name();
    tracing::info!(command_id = %id, command = name, "executing signed command");
    let changes_containers = matches!(
        command,
        Command::Deploy { .. } | Command::Stop { .. } | Command::Restart { .. } | Command::Drain { .. }
    );
    let (status, detail, output) = run::run(host, command).await;
    if status == CommandStatus::Succeeded {
        tracing::info!(command_id = %id, command = name, %detail, "command finished");
    } else {
        // A warning, so that it lands among the recent errors diagnostics report.
        tracing::warn!(command_id = %id, command = name, status = status.as_str(), %detail, "command failed");
    }
    // Listed whether it succeeded or not: a failed deploy may still leave a container behind.
    let containers = if changes_containers {
        Some(crate::containers::report(host.runtime.as_ref(), crate::containers::LIST_TIMEOUT, &host.servers).await)
    } else {
        None
    };
    Outcome { id: Some(id), status, detail, output, containers }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use flotilla_common::envelope::{CommandKey, DEFAULT_TTL, Envelope};

    use super::*;

    fn gate(dir: &Path, key: &CommandKey) -> Gate {
        Gate::open(NodeId::new("gpu-1").unwrap(), Some(key.public()), dir).unwrap()
    }

    fn noop(key: &CommandKey, target: &str) -> SignedEnvelope {
        key.sign(CommandId::new(), &NodeId::new(target).unwrap(), Command::Noop, DEFAULT_TTL, now_unix_ms()).unwrap()
    }

    fn refused(a: Admission) -> String {
        match a {
            Admission::Answer(o) if o.status == CommandStatus::Refused => o.detail,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn only_verified_fresh_envelopes_for_this_node_run() {
        let dir = tempfile::tempdir().unwrap();
        let key = CommandKey::generate();
        let mut g = gate(dir.path(), &key);
        let good = noop(&key, "gpu-1");
        assert!(matches!(g.admit(&good), Admission::Run { command: Command::Noop, .. }));
        assert!(refused(g.admit(&good)).contains("replay"), "the same envelope again");

        let mut tampered = noop(&key, "gpu-1");
        let last = tampered.bytes.len() - 1;
        tampered.bytes[last] ^= 1;
        assert!(refused(g.admit(&tampered)).contains("signature"));
        assert!(refused(g.admit(&noop(&key, "gpu-2"))).contains("targets node gpu-2"));
        assert!(refused(g.admit(&noop(&CommandKey::generate(), "gpu-1"))).contains("signature"));
        let expired = key
            .sign(
                CommandId::new(),
                &NodeId::new("gpu-1").unwrap(),
                Command::Noop,
                Duration::from_secs(1),
                now_unix_ms() - 120_000,
            )
            .unwrap();
        assert!(refused(g.admit(&expired)).contains("expired"));
        let old = Envelope {
            version: 0,
            id: CommandId::new(),
            target: NodeId::new("gpu-1").unwrap(),
            issued_at_unix_ms: now_unix_ms(),
            expires_at_unix_ms: now_unix_ms() + 10_000,
            key_id: key.key_id().to_owned(),
            payload: Command::Noop,
        };
        assert!(refused(g.admit(&key.sign_envelope(&old).unwrap())).contains("version 0"));
        let unsigned = SignedEnvelope { bytes: good.bytes.clone(), signature: vec![0; 64] };
        assert!(refused(g.admit(&unsigned)).contains("signature"));
    }

    #[test]
    fn replays_are_refused_after_a_restart_and_resends_get_the_stored_result() {
        let dir = tempfile::tempdir().unwrap();
        let key = CommandKey::generate();
        let finished = noop(&key, "gpu-1");
        let crashed = noop(&key, "gpu-1");
        {
            let mut g = gate(dir.path(), &key);
            let Admission::Run { id, .. } = g.admit(&finished) else { panic!("should run") };
            g.finish(&Outcome {
                id: Some(id),
                status: CommandStatus::Succeeded,
                detail: "done".into(),
                output: serde_json::json!({"x": 1}),
                containers: None,
            });
            assert!(matches!(g.admit(&crashed), Admission::Run { .. }), "admitted, then the agent dies mid-run");
        }
        let mut g = gate(dir.path(), &key);
        match g.admit(&finished) {
            Admission::Answer(o) => {
                assert_eq!(o.status, CommandStatus::Succeeded);
                assert_eq!(o.detail, "done");
            }
            other => panic!("expected the stored result, got {other:?}"),
        }
        assert!(refused(g.admit(&crashed)).contains("replay"));
    }

    /// The rollout driver after a controller restart: the same command id in a
    /// newly signed envelope gets the first run's result, after an agent restart too.
    #[test]
    fn a_resigned_resend_of_the_same_id_gets_the_stored_result() {
        let dir = tempfile::tempdir().unwrap();
        let key = CommandKey::generate();
        let id = CommandId::new();
        let target = NodeId::new("gpu-1").unwrap();
        let sign = || key.sign(id, &target, Command::Noop, DEFAULT_TTL, now_unix_ms()).unwrap();
        {
            let mut g = gate(dir.path(), &key);
            let Admission::Run { id, .. } = g.admit(&sign()) else { panic!("should run") };
            g.finish(&Outcome {
                id: Some(id),
                status: CommandStatus::Failed,
                detail: "image missing".into(),
                output: serde_json::json!({}),
                containers: None,
            });
        }
        let mut g = gate(dir.path(), &key);
        match g.admit(&sign()) {
            Admission::Answer(o) => {
                assert_eq!((o.id, o.status, o.detail.as_str()), (Some(id), CommandStatus::Failed, "image missing"))
            }
            other => panic!("expected the stored result, got {other:?}"),
        }
    }

    #[test]
    fn without_a_pinned_key_nothing_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = Gate::open(NodeId::new("gpu-1").unwrap(), None, dir.path()).unwrap();
        assert!(refused(g.admit(&noop(&CommandKey::generate(), "gpu-1"))).contains("no controller command key"));
    }
}
