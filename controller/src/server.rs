//! Assembles the gRPC server: services, health, reflection, the tower layers and
//! the background loops, with one shutdown path.

use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::pb::agent_service_server::AgentServiceServer;
use flotilla_proto::pb::fleet_server::FleetServer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod limits;
mod traced;

use crate::service::{Context, agent::AgentApi, fleet::FleetApi};
use crate::{Controller, ControllerError, ingest, liveness, registry::Registry};

/// How long in-flight work may take to finish after shutdown starts.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

pub async fn serve(controller: Controller, shutdown: CancellationToken) -> Result<(), ControllerError> {
    let Controller { listener, local_addr, metrics_listener, metrics_tls, store, tls, config } = controller;
    let tracker = TaskTracker::new();
    // Streams and background loops stop on `work`; the committer stops last, on
    // `commit`, so that batches received before shutdown are still acknowledged.
    let work = shutdown.child_token();
    let commit = CancellationToken::new();
    // Revoked nodes are held in memory, so refusing one on connect is a lookup.
    let registry = {
        let store = store.clone();
        let revoked = tokio::task::spawn_blocking(move || store.revocations())
            .await
            .map_err(|e| ControllerError::Startup(format!("loading revoked nodes: {e}")))??;
        Registry::with_revocations(revoked)
    };
    {
        let store = store.clone();
        tokio::task::spawn_blocking(move || crate::service::fleet::recover_approvals(store.as_ref()))
            .await
            .map_err(|e| ControllerError::Startup(format!("recovering approvals: {e}")))??;
    }
    let metrics = crate::metrics::Metrics::new().map_err(|e| ControllerError::Startup(format!("self-metrics: {e}")))?;
    let view = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || crate::fleetview::FleetView::load(store.as_ref()))
            .await
            .map_err(|e| ControllerError::Startup(format!("loading the fleet view: {e}")))??
    };
    let feed = crate::watch::TelemetryFeed::default();
    let alerts = crate::alert::engine::Engine::start(
        config.alerting.clone(),
        crate::alert::engine::Deps {
            store: store.clone(),
            registry: registry.clone(),
            view: view.clone(),
            missed_heartbeats: config.agents.missed_heartbeats,
            metrics: metrics.clone(),
        },
        work.clone(),
        &tracker,
    )
    .await
    .map_err(|e| ControllerError::Startup(format!("alerting: {e}")))?;
    let committer = ingest::spawn(
        store.clone(),
        view.clone(),
        feed.clone(),
        metrics.clone(),
        alerts.clone(),
        &config.telemetry,
        commit.clone(),
        &tracker,
    );
    let commands = {
        let dir = config.data_dir.clone();
        tokio::task::spawn_blocking(move || crate::commands::CommandCenter::load(&dir))
            .await
            .map_err(|e| ControllerError::CommandKey(e.to_string()))?
            .map_err(|e| ControllerError::CommandKey(e.to_string()))?
    };
    tracing::info!(
        key_id = commands.key_id(),
        public_key = %crate::commands::public_key_path(&config.data_dir).display(),
        "command signing key ready; agents pin its public key (command_key)"
    );
    let commands = std::sync::Arc::new(commands);
    let rollouts = {
        let deps = crate::rollout::driver::Deps {
            store: store.clone(),
            registry: registry.clone(),
            commands: commands.clone(),
            view: view.clone(),
        };
        let (work, tracker) = (work.clone(), tracker.clone());
        tokio::task::spawn_blocking(move || crate::rollout::Rollouts::start(deps, work, &tracker))
            .await
            .map_err(|e| ControllerError::Startup(format!("rollouts: {e}")))?
            .map_err(|e| ControllerError::Startup(format!("rollouts: {e}")))?
    };
    // After the command key exists: enrolling agents are sent its public half.
    let enrollment = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || crate::enroll::Enrollment::load(&config))
            .await
            .map_err(|e| ControllerError::Startup(format!("enrollment: {e}")))?
            .map_err(|e| ControllerError::Startup(format!("enrollment: {e}")))?
    };
    let ctx = Context {
        enrollment: Arc::new(enrollment),
        commands,
        rollouts,
        store: store.clone(),
        registry: registry.clone(),
        committer,
        view: view.clone(),
        feed,
        config: config.clone(),
        shutdown: work.clone(),
        tracker: tracker.clone(),
        alerts,
        started_unix_ms: flotilla_common::time::now_unix_ms(),
    };

    tracker.spawn(liveness::run(
        registry.clone(),
        config.agents.missed_heartbeats,
        Duration::from_millis(250),
        work.clone(),
    ));
    tracker.spawn(maintenance_loop(store.clone(), config.telemetry.clone(), work.clone()));

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AgentServiceServer<AgentApi>>().await;
    health.set_serving::<FleetServer<FleetApi>>().await;
    // Both reflection revisions: grpcurl and older tools still ask v1alpha.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(flotilla_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection =
        reflection_builder().build_v1().map_err(|e| ControllerError::Startup(format!("server reflection: {e}")))?;
    let reflection_alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| ControllerError::Startup(format!("server reflection: {e}")))?;

    let max = config.limits.max_message_bytes;
    let incoming = crate::listener::incoming(
        listener,
        tls,
        config.limits.handshake_timeout,
        config.limits.max_concurrent_handshakes,
        work.clone(),
        &tracker,
        metrics.handshakes_refused.clone(),
    );
    let metrics_addr = metrics_listener.as_ref().map(|(_, a)| a.to_string()).unwrap_or_else(|| "off".into());
    if let Some((listener, _)) = metrics_listener {
        let exporter = crate::exporter::Exporter {
            view,
            registry: registry.clone(),
            metrics: metrics.clone(),
            missed_heartbeats: config.agents.missed_heartbeats,
            store: store.clone(),
            alerts: Some(ctx.alerts.clone()),
        };
        tracker.spawn(crate::exporter::http::serve(listener, metrics_tls, exporter, work.clone(), tracker.clone()));
    }
    // The enrollment port, when configured: its own listener, TLS without client certificates.
    crate::service::enroll::serve_port(ctx.clone(), &tracker, metrics.handshakes_refused.clone()).await?;
    tracing::info!(%local_addr, %metrics_addr, data_dir = %config.data_dir.display(), "controller listening (mTLS)");

    let limits = &config.limits;
    let served = tonic::transport::Server::builder()
        // Keepalives find dead peers behind NAT.
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // The stream cap stops one connection from hogging the server.
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        // Metadata is small; a huge header block only costs memory.
        .http2_max_header_list_size(Some(limits.max_header_list_bytes))
        // Rapid reset (CVE-2023-44487): a client resetting streams as fast as it opens them is cut off (h2's default, pinned).
        .http2_max_pending_accept_reset_streams(Some(20))
        // Rate limit, load shedding and the request timeout: see `limits::layers`.
        .layer(limits::layers(limits, &metrics))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            AgentServiceServer::new(AgentApi::new(ctx.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        // Every Fleet call gets a span (in the caller's trace, if it sent one), then
        // passes the per-role allow-list before its handler runs.
        .add_service(traced::Traced::new(crate::auth::FleetAuthorized::new(
            FleetServer::new(FleetApi::new(ctx)).max_decoding_message_size(max).max_encoding_message_size(max),
        )))
        .serve_with_incoming_shutdown(incoming, work.clone().cancelled_owned())
        .await;

    // Drain: streams end (their tasks see `work` cancelled), then the committer
    // flushes what is queued, then every task is awaited within the grace period.
    work.cancel();
    commit.cancel();
    tracker.close();
    if tokio::time::timeout(DRAIN_GRACE, tracker.wait()).await.is_err() {
        tracing::warn!("some tasks did not finish within the shutdown grace period");
    }
    tracing::info!("controller stopped");
    served.map_err(ControllerError::from)
}

/// How often new telemetry is rolled up and old telemetry pruned: each pass
/// reads only what arrived since the last, so once a minute stays cheap.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(60);

async fn maintenance_loop(
    store: Arc<dyn crate::store::Store>,
    policy: crate::config::TelemetryPolicy,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let store = store.clone();
        let (retention, rollup_retention) = (policy.retention, policy.rollup_retention);
        let stop = cancel.clone();
        let now = flotilla_common::time::now_unix_ms();
        let pass = tokio::task::spawn_blocking(move || {
            crate::rollup::maintain(store.as_ref(), now, retention, rollup_retention, &stop)
        });
        match pass.await {
            Ok(Ok(done)) if done == crate::rollup::Maintenance::default() => {}
            Ok(Ok(done)) if done.batches_pruned == 0 && done.minutes_pruned == 0 => {
                tracing::debug!(rolled_up = done.batches_rolled_up, "telemetry rolled up");
            }
            Ok(Ok(done)) => tracing::info!(
                rolled_up = done.batches_rolled_up,
                pruned_batches = done.batches_pruned,
                pruned_minutes = done.minutes_pruned,
                "telemetry rolled up and pruned past retention"
            ),
            Ok(Err(error)) => tracing::warn!(%error, "telemetry maintenance failed"),
            Err(error) => tracing::warn!(%error, "telemetry maintenance task failed"),
        }
    }
}
