//! The alert engine: Prometheus-format rule files, a PromQL evaluator over an
//! in-memory window of recent samples, the alert lifecycle (inactive → pending →
//! firing → resolved) persisted in the store, acknowledgement and silences, and
//! delivery to Alertmanager (API v2) and plain webhooks.
//!
//! `rules` loads and checks rule files (`template` renders their labels and
//! annotations, `promql` parses and evaluates their expressions over `window`);
//! `engine` runs them and owns the alert `state`; `delivery` sends alerts out.

pub mod delivery;
pub mod engine;
pub mod promql;
pub mod rules;
pub mod state;
pub mod template;
pub mod window;
