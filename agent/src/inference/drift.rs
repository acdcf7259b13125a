//! Schema drift: remembers which mapped targets an endpoint has shown, so that a
//! series that vanishes after an engine upgrade (a rename the table does not know
//! yet) is reported instead of silently going flat.

use std::collections::BTreeSet;

use super::engine::Engine;

/// The targets one endpoint has shown since the agent started (or since its engine
/// changed). Bounded by the mapping table: only target names are kept.
#[derive(Debug, Clone, Default)]
pub(crate) struct SchemaTracker {
    engine: Option<Engine>,
    seen: BTreeSet<String>,
}

impl SchemaTracker {
    /// Records a successfully mapped page and returns the previously seen targets it
    /// lacks, sorted. A page from a different engine starts the memory afresh: the
    /// endpoint now runs another server, and its old names mean nothing.
    pub fn observe(&mut self, engine: Engine, present: &BTreeSet<String>) -> Vec<String> {
        if self.engine != Some(engine) {
            self.engine = Some(engine);
            self.seen.clear();
        }
        let missing = self.seen.difference(present).cloned().collect();
        self.seen.extend(present.iter().cloned());
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_vanished_target_is_reported_until_it_returns() {
        let mut t = SchemaTracker::default();
        assert!(t.observe(Engine::Vllm, &set(&["a", "b"])).is_empty());
        assert_eq!(t.observe(Engine::Vllm, &set(&["a"])), ["b"]);
        assert_eq!(t.observe(Engine::Vllm, &set(&[])), ["a", "b"]);
        assert!(t.observe(Engine::Vllm, &set(&["a", "b", "c"])).is_empty());
    }

    #[test]
    fn another_engine_starts_afresh() {
        let mut t = SchemaTracker::default();
        t.observe(Engine::Vllm, &set(&["a", "b"]));
        assert!(t.observe(Engine::Sglang, &set(&["a"])).is_empty());
        assert_eq!(t.observe(Engine::Sglang, &set(&[])), ["a"]);
    }
}
