//! gRPC services, one file each. Only this module (and the agent's uplink and the
//! ctl client) touch `pb::*`; everything below works on domain types.

pub mod agent;
pub mod enroll;
pub mod fleet;

/// Shared state the services need, passed explicitly.
#[derive(Clone)]
pub struct Context {
    pub store: std::sync::Arc<dyn crate::store::Store>,
    pub registry: crate::registry::Registry,
    pub committer: crate::ingest::Committer,
    pub view: crate::fleetview::FleetView,
    pub commands: std::sync::Arc<crate::commands::CommandCenter>,
    pub feed: crate::watch::TelemetryFeed,
    pub config: std::sync::Arc<crate::config::Config>,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub tracker: tokio_util::task::TaskTracker,
    pub alerts: crate::alert::engine::Engine,
    pub rollouts: crate::rollout::Rollouts,
    /// The CA key (when configured) and what enrolling agents are sent.
    pub enrollment: std::sync::Arc<crate::enroll::Enrollment>,
    /// When this controller started (Unix ms), for `GetVersion`.
    pub started_unix_ms: i64,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// Runs blocking store work off the async workers and maps failures to a status
/// that hides internals from the caller (they are logged instead).
pub async fn blocking<T, F>(what: &'static str, f: F) -> Result<T, tonic::Status>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(error)) => {
            tracing::error!(%error, what, "store error");
            Err(tonic::Status::internal(format!("{what} failed; see the controller log")))
        }
        Err(error) => {
            tracing::error!(%error, what, "store task failed");
            Err(tonic::Status::internal(format!("{what} failed; see the controller log")))
        }
    }
}
