//! Rollouts: deployments as versioned specs, and blue-green, canary and rolling
//! updates across nodes with health gates, traffic shifting through the gateway
//! role's nginx, and automatic rollback.
//!
//! - `spec`: the deployment YAML and its validation;
//! - `plan`: spec + deployment + fleet → the steps (pure; `deploy plan` shows it);
//! - `machine`: the pure state machine that walks a plan (and its revert);
//! - `gates` and `observe`: the health gates' readings from live telemetry;
//! - `model`: what is stored (sled trees `deployments` and `rollouts`);
//! - `driver`: the one task that owns rollouts, persists every step before its
//!   signed commands go out, and resends them under the same ids after a restart.
//!
//! [`Rollouts`] is the handle the `Fleet` service holds.

pub mod driver;
pub mod gates;
pub mod machine;
pub mod model;
pub mod observe;
pub mod plan;
pub mod spec;

#[cfg(test)]
mod tests;

pub use driver::{ApplyOutcome, Operation, Rollouts};
pub use model::{Deployment, Rollout, RolloutState};
pub use spec::DeploymentSpec;

/// Why a rollout request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error("invalid deployment spec: {0}")]
    Spec(#[from] spec::SpecError),
    #[error("cannot plan: {0}")]
    Plan(#[from] plan::PlanError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("the rollout driver has stopped (the controller is shutting down)")]
    Stopped,
}
