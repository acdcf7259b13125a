//! The controller is killed with SIGKILL mid-stream: every batch any agent saw
//! acknowledged is in the store, the inventory is there, and the agents resume
//! on the restarted controller without losing or duplicating anything.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeSet;

use flotilla_common::NodeId;
use flotilla_controller::store::{SledStore, Store};
use flotilla_tests::{Agent, AgentOpts, Controller, Pki, eventually};

fn stored_seqs(store: &SledStore, node: &str) -> BTreeSet<u64> {
    let id = NodeId::new(node).unwrap();
    store.batches(&id, 0, usize::MAX).unwrap().into_iter().map(|b| b.seq).collect()
}

#[test]
fn acknowledged_batches_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let mut controller = Controller::start(dir.path(), &pki);
    let url = controller.url();
    let opts = AgentOpts { interval: "100ms", gpus: 8, ..Default::default() };
    let mut agents: Vec<Agent> =
        ["node-1", "node-2"].iter().map(|n| Agent::start(dir.path(), &pki, &url, n, opts.clone())).collect();

    for a in &agents {
        eventually(&format!("acks for {}", a.node), |last| {
            let n = a.acked().len();
            *last = format!("{n} acked");
            (n >= 20).then_some(())
        });
    }

    controller.proc.kill9();
    // Everything acknowledged before the kill must be on disk now.
    let acked_before: Vec<BTreeSet<u64>> = agents.iter().map(|a| a.acked().into_iter().collect()).collect();
    let store_path = controller.data_dir.join("store");
    {
        let store = SledStore::open(&store_path).unwrap();
        let nodes = store.nodes().unwrap();
        assert_eq!(nodes.len(), 2, "both inventories survived");
        assert!(nodes.iter().all(|n| n.inventory.gpus.len() == 8));
        for (a, acked) in agents.iter().zip(&acked_before) {
            let stored = stored_seqs(&store, &a.node);
            let missing: Vec<_> = acked.difference(&stored).collect();
            assert!(missing.is_empty(), "{}: acknowledged but not stored: {missing:?}", a.node);
        }
    }

    controller.restart();
    for (a, before) in agents.iter().zip(&acked_before) {
        eventually(&format!("{} to resume after the restart", a.node), |last| {
            let n = a.acked().len();
            *last = format!("{n} acked, {} before the kill", before.len());
            (n >= before.len() + 20).then_some(())
        });
    }
    for a in &mut agents {
        assert!(a.proc.terminate().success());
    }
    assert!(controller.proc.terminate().success(), "clean shutdown");

    let store = SledStore::open(&store_path).unwrap();
    for a in &agents {
        let acked: BTreeSet<u64> = a.acked().into_iter().collect();
        let stored = stored_seqs(&store, &a.node);
        let missing: Vec<_> = acked.difference(&stored).collect();
        assert!(missing.is_empty(), "{}: acknowledged but not stored: {missing:?}", a.node);
        // Seqs are unique per agent and the store keys on them: no duplicates exist.
        assert!(stored.len() >= acked.len());
    }
}
