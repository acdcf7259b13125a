//! The Flotilla controller: accepts agent streams over mTLS gRPC, stores
//! inventories and telemetry durably in sled (acknowledging only what is
//! flushed), derives node state from heartbeats, and serves the operator API
//! (`flotilla.v1.Fleet`), `grpc.health.v1` and server reflection.
//!
//! `main.rs` is thin: it parses flags and calls [`run`]; tests and `flotctl demo`
//! call [`Controller::bind`] to run it in-process.

pub mod alert;
pub mod approval;
pub mod audit;
pub mod auth;
pub mod capacity;
pub mod clock;
pub mod commands;
pub mod config;
pub mod enroll;
pub mod exporter;
pub mod fleetview;
pub mod ingest;
pub mod listener;
pub mod liveness;
pub mod metrics;
pub mod query;
pub mod registry;
pub mod rollout;
pub mod rollup;
pub mod selector;
pub mod series;
mod server;
pub mod service;
pub mod store;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::Config;
use tokio_util::sync::CancellationToken;

/// Why the controller cannot start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("TLS: {0}")]
    Tls(#[from] flotilla_common::tls::TlsError),
    #[error("{0}")]
    Store(#[from] store::StoreError),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("command signing key: {0}")]
    CommandKey(String),
    #[error("start-up: {0}")]
    Startup(String),
}

/// A controller whose port is bound and store opened, ready to serve.
pub struct Controller {
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    metrics_listener: Option<(tokio::net::TcpListener, SocketAddr)>,
    metrics_tls: Arc<rustls::ServerConfig>,
    store: Arc<dyn store::Store>,
    tls: Arc<rustls::ServerConfig>,
    config: Arc<Config>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl Controller {
    /// Loads TLS material, opens the store and binds the port. Fails fast with a
    /// message naming the file or address at fault.
    pub async fn bind(config: Config) -> Result<Self, ControllerError> {
        let tls = config.tls.files().server_config()?;
        let metrics_tls = config.tls.files().http1_server_config()?;
        let data_dir = config.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .map_err(|source| ControllerError::DataDir { path: data_dir.display().to_string(), source })?;
        let store_path = data_dir.join("store");
        let options =
            store::StoreOptions { cache_bytes: config.store_cache_bytes, compress_new: config.store_compression };
        if let Some(compressed) = store::created_compressed(&store_path).filter(|c| *c != options.compress_new) {
            tracing::info!(
                path = %store_path.display(),
                compressed,
                "store_compression = {} applies to new stores only: this store was created {}; \
                 to change it, back up and restore into a new data dir",
                options.compress_new,
                if compressed { "compressed" } else { "uncompressed" },
            );
        }
        let store: Arc<dyn store::Store> = Arc::new(
            tokio::task::spawn_blocking(move || store::HealingStore::open(&store_path, options)).await.map_err(
                |e| ControllerError::DataDir { path: data_dir.display().to_string(), source: std::io::Error::other(e) },
            )??,
        );
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| ControllerError::Bind { addr: config.listen, source })?;
        let local_addr =
            listener.local_addr().map_err(|source| ControllerError::Bind { addr: config.listen, source })?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| ControllerError::Bind { addr, source })?;
                let bound = l.local_addr().map_err(|source| ControllerError::Bind { addr, source })?;
                Some((l, bound))
            }
            None => None,
        };
        Ok(Self { listener, local_addr, metrics_listener, metrics_tls, store, tls, config: Arc::new(config) })
    }

    /// The bound address (useful when listening on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The bound metrics address, when `metrics_listen` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().map(|(_, a)| *a)
    }

    /// Serves until `shutdown` is cancelled, then drains: streams are closed,
    /// queued telemetry is committed and acknowledged, tasks are awaited.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), ControllerError> {
        server::serve(self, shutdown).await
    }
}

/// Binds and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), ControllerError> {
    Controller::bind(config).await?.serve(shutdown).await
}
