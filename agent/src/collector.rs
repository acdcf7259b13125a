//! The collection loop: every interval, one batch from every collector. A failing
//! collector is reported in the batch (the controller shows the node degraded)
//! instead of stopping the others.

use std::time::Duration;

use flotilla_common::model::{CollectorStatus, TelemetryBatch};
use flotilla_common::time::now_unix_ms;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::gpu::GpuSource;
use crate::host::HostCollector;

/// Runs until `cancel` fires or the uplink goes away. Batches carry no seq yet:
/// the uplink numbers them as it takes them.
pub async fn run(
    mut gpu: Box<dyn GpuSource>,
    mut host: HostCollector,
    interval: Duration,
    tx: mpsc::Sender<TelemetryBatch>,
    cancel: CancellationToken,
) {
    let start = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let mut collectors = Vec::with_capacity(2);
        let gpus = match gpu.sample(start.elapsed()) {
            Ok(samples) => {
                collectors.push(CollectorStatus { name: "gpu".into(), healthy: true, error: String::new() });
                samples
            }
            Err(error) => {
                tracing::warn!(%error, "GPU collection failed");
                collectors.push(CollectorStatus { name: "gpu".into(), healthy: false, error: error.message.clone() });
                error.partial
            }
        };
        // /proc reads are quick but blocking; keep them off the async workers.
        let host_sample = match tokio::task::spawn_blocking(move || {
            let s = host.sample();
            (host, s)
        })
        .await
        {
            Ok((back, sample)) => {
                host = back;
                collectors.push(CollectorStatus { name: "host".into(), healthy: true, error: String::new() });
                Some(sample)
            }
            Err(error) => {
                tracing::error!(%error, "host collector panicked; stopping collection");
                return;
            }
        };
        let batch = TelemetryBatch {
            seq: 0,
            created_unix_ms: now_unix_ms(),
            gpus,
            host: host_sample,
            samples: Vec::new(),
            collectors,
        };
        if tx.send(batch).await.is_err() {
            return;
        }
    }
}
