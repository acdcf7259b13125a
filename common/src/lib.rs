//! Code that the agent, the controller and flotctl really share, and nothing else:
//! the domain model of telemetry and inventory, identifiers, certificate identities
//! and the fleet PKI (with the join-token format of enrollment), TLS configuration,
//! config-file loading, logging setup (with OTLP trace export and trace-context
//! propagation) and the shutdown signal.

pub mod capacity;
pub mod client;
pub mod command;
pub mod config;
pub mod daemon;
pub mod enroll;
pub mod envelope;
pub mod health;
pub mod identity;
pub mod ids;
pub mod logging;
pub mod model;
pub mod pki;
pub mod shutdown;
pub mod time;
pub mod tls;
pub mod trace;

pub use identity::{Identity, Role};
pub use ids::NodeId;
