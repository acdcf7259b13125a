//! Closes the streams of agents that stopped heartbeating, so that a half-open
//! connection cannot keep a dead node looking alive.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// Checks every `period` for sessions silent past `missed` intervals.
pub async fn run(registry: Registry, missed: u32, period: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let now = Instant::now();
        for (node, session) in registry.expired(now, missed) {
            let silent = now.saturating_duration_since(session.last_heard);
            tracing::warn!(node_id = %node, silent_ms = silent.as_millis() as u64, "node down: missed {missed} heartbeats; closing its stream");
            // The stream's own cleanup removes the session and records last-seen.
            session.cancel.cancel();
        }
    }
}
