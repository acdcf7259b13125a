//! The uplink loses nothing: an agent cut off from the controller keeps
//! collecting into its disk buffer and delivers every batch, with its original
//! timestamp, once the controller is back; an agent killed and restarted while
//! the controller is down still delivers what it had buffered.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use flotilla_common::NodeId;
use flotilla_common::model::TelemetryBatch;
use flotilla_common::time::now_unix_ms;
use flotilla_controller::store::{SledStore, Store};
use flotilla_tests::{Agent, AgentOpts, Controller, Pki, eventually};

fn stored(controller: &Controller, node: &str) -> Vec<TelemetryBatch> {
    let store = SledStore::open(&controller.data_dir.join("store")).unwrap();
    store.batches(&NodeId::new(node).unwrap(), 0, usize::MAX).unwrap()
}

fn wait_acks(agent: &Agent, at_least: usize) {
    eventually(&format!("{at_least} acks for {}", agent.node), |last| {
        let n = agent.acked().len();
        *last = format!("{n} acked");
        (n >= at_least).then_some(())
    });
}

/// Waits until the agent has failed to reach the controller `times` times.
fn wait_cut_off(agent: &Agent, times: usize) {
    eventually("the agent to notice the outage", |last| {
        let n = agent.proc.log_text().matches("cannot reach controller").count();
        *last = format!("{n} failed attempts");
        (n >= times).then_some(())
    });
}

#[test]
fn a_cut_off_agent_delivers_every_batch_with_its_original_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let mut controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let mut agent =
        Agent::start(dir.path(), &pki, &url, "edge-1", AgentOpts { interval: "100ms", gpus: 2, ..Default::default() });
    wait_acks(&agent, 10);

    controller.proc.kill9();
    let outage_start = now_unix_ms();
    wait_cut_off(&agent, 4);
    let outage_end = now_unix_ms();
    let before = agent.acked().len();
    controller.restart();
    wait_acks(&agent, before + 30);
    assert!(agent.proc.terminate().success());
    assert!(controller.proc.terminate().success());

    let batches = stored(&controller, "edge-1");
    let seqs: Vec<u64> = batches.iter().map(|b| b.seq).collect();
    assert_eq!(seqs.first(), Some(&1));
    let gaps: Vec<_> = seqs.windows(2).filter(|w| w[1] != w[0] + 1).collect();
    assert!(gaps.is_empty(), "sequence gaps: {gaps:?}");
    let during = batches.iter().filter(|b| (outage_start..outage_end).contains(&b.created_unix_ms)).count();
    assert!(during >= 3, "batches made during the outage keep their timestamps: {during}");
    let acked: std::collections::BTreeSet<u64> = agent.acked().into_iter().collect();
    assert!(acked.iter().all(|s| seqs.binary_search(s).is_ok()), "every ack is stored");
}

#[test]
fn an_agent_restarted_while_disconnected_delivers_its_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let mut controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let mut agent =
        Agent::start(dir.path(), &pki, &url, "edge-2", AgentOpts { interval: "100ms", gpus: 2, ..Default::default() });
    wait_acks(&agent, 10);
    let acked_before = agent.acked().into_iter().max().unwrap();

    controller.proc.kill9();
    let outage_start = now_unix_ms();
    wait_cut_off(&agent, 4);
    // The agent dies hard while holding unacknowledged batches, and comes back.
    agent.proc.kill9();
    let killed_at = now_unix_ms();
    agent.restart();
    agent.proc.wait_for_log("resending telemetry buffered by an earlier run");
    controller.restart();
    wait_acks(&agent, 20);
    eventually("batches after the restart to be stored", |_| {
        agent.proc.log_text().contains("connected to controller").then_some(())
    });
    let total = agent.acked().len();
    wait_acks(&agent, total + 10);
    assert!(agent.proc.terminate().success());
    assert!(controller.proc.terminate().success());

    let batches = stored(&controller, "edge-2");
    let seqs: Vec<u64> = batches.iter().map(|b| b.seq).collect();
    // The restart skips the rest of the reserved seq block (one gap); the run
    // before it must be whole and reach past what was acked before the outage.
    let first_gap = seqs.windows(2).position(|w| w[1] != w[0] + 1).map_or(seqs.len(), |i| i + 1);
    let run = &seqs[..first_gap];
    assert_eq!(run.first(), Some(&1));
    let last_before_restart = *run.last().unwrap();
    assert!(
        last_before_restart > acked_before + 3,
        "batches buffered during the outage were delivered: run ends at {last_before_restart}, acked before {acked_before}"
    );
    let buffered = batches
        .iter()
        .filter(|b| b.seq > acked_before && (outage_start..killed_at).contains(&b.created_unix_ms))
        .count();
    assert!(buffered >= 3, "{buffered} batches from before the agent's restart");
    let gaps = seqs.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert!(gaps <= 1, "at most the one reserved-block gap of the restart: {seqs:?}");
}
