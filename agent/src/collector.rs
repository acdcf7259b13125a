//! The collection loop: every interval, one batch from every collector. A failing
//! collector is reported in the batch (the controller shows the node degraded)
//! instead of stopping the others.

use std::time::Duration;

use flotilla_common::model::{CollectorStatus, TelemetryBatch};
use flotilla_common::time::now_unix_ms;
use flotilla_proto::pb;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::gateway::traffic::TrafficCounters;
use crate::gpu::GpuSource;
use crate::host::HostCollector;
use crate::inference::InferenceCollector;

/// Named samples kept per batch: well under the controller's per-message limit.
const MAX_SAMPLES: usize = 5_000;

/// Everything the loop collects from.
pub struct Sources {
    pub gpu: Box<dyn GpuSource>,
    pub host: HostCollector,
    pub inference: InferenceCollector,
    /// The gateway's per-server traffic counters, when `[gateway] access_log` is set.
    pub traffic: Option<TrafficCounters>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

/// Runs until `cancel` fires or the uplink goes away. Batches carry no seq yet:
/// the uplink numbers them as it takes them.
pub async fn run(sources: Sources, interval: Duration, tx: mpsc::Sender<TelemetryBatch>, cancel: CancellationToken) {
    let Sources { mut gpu, mut host, mut inference, mut traffic } = sources;
    let start = Instant::now();
    let mut last_gpu_error: Option<String> = None;
    let mut last_refusal: Option<String> = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let mut collectors = Vec::with_capacity(2);
        let elapsed = start.elapsed();
        // NVML calls and /proc reads block for milliseconds; keep them off the async
        // workers. Inference servers are scraped meanwhile (each with its own timeout).
        let blocking = tokio::task::spawn_blocking(move || {
            let g = gpu.sample(elapsed);
            let h = host.sample();
            let t = traffic.as_mut().map(TrafficCounters::sample);
            (gpu, host, traffic, g, h, t)
        });
        let (joined, round) =
            tokio::join!(blocking, async { if inference.is_empty() { None } else { Some(inference.collect().await) } });
        let (gpu_back, host_back, traffic_back, gpu_result, mut host_sample, traffic_round) = match joined {
            Ok(parts) => parts,
            Err(error) => {
                tracing::error!(%error, "a collector panicked; stopping collection");
                return;
            }
        };
        gpu = gpu_back;
        host = host_back;
        traffic = traffic_back;
        let host_reading_samples = std::mem::take(&mut host_sample.samples);
        let gpus = match gpu_result {
            Ok(samples) => {
                if last_gpu_error.take().is_some() {
                    tracing::info!("GPU collection recovered");
                }
                collectors.push(CollectorStatus { name: "gpu".into(), healthy: true, error: String::new() });
                samples
            }
            Err(error) => {
                // Log a failure when it starts or changes, not on every interval.
                if last_gpu_error.as_deref() != Some(error.message.as_str()) {
                    tracing::warn!(%error, "GPU collection failed");
                    last_gpu_error = Some(error.message.clone());
                }
                collectors.push(CollectorStatus { name: "gpu".into(), healthy: false, error: error.message.clone() });
                error.partial
            }
        };
        collectors.push(CollectorStatus { name: "host".into(), healthy: true, error: String::new() });
        let host_sample = Some(host_sample.host);
        let mut samples = host_reading_samples;
        // Ahead of the inference pages, which can be large: should a batch be cut
        // to MAX_SAMPLES, the gateway counters the rollout gates read are kept.
        if let Some((traffic_samples, status)) = traffic_round {
            samples.extend(traffic_samples);
            collectors.push(status);
        }
        samples.extend(match round {
            Some(round) => {
                collectors.extend(round.statuses());
                round.samples
            }
            None => Vec::new(),
        });
        if samples.len() > MAX_SAMPLES {
            // The controller refuses oversized batches; keep the batch deliverable.
            collectors.push(CollectorStatus {
                name: "samples".into(),
                healthy: false,
                error: format!("{} named samples; only the first {MAX_SAMPLES} were kept", samples.len()),
            });
            samples.truncate(MAX_SAMPLES);
        }
        let batch =
            TelemetryBatch { seq: 0, created_unix_ms: now_unix_ms(), gpus, host: host_sample, samples, collectors };
        let (batch, refused) = deliverable(batch);
        match refused {
            None if last_refusal.take().is_some() => tracing::info!("telemetry passes the controller's checks again"),
            None => {}
            Some(reason) if last_refusal.as_deref() != Some(reason.as_str()) => {
                tracing::error!(%reason, "a reading the controller would refuse; this interval's readings were dropped");
                last_refusal = Some(reason);
            }
            Some(_) => {}
        }
        if tx.send(batch).await.is_err() {
            return;
        }
    }
}

/// Checks `batch` with the controller's own conversion before it is queued. The
/// controller refuses a batch that fails its checks (closing the stream), and an
/// unacknowledged batch is sent again on every reconnect: one bad reading would
/// stop the node's telemetry for good. A batch that fails loses the part the
/// failure names (its GPU readings, its host reading or its named samples), or
/// every reading should that not do, and gains a failing `telemetry` collector
/// saying why, so the node still reports and shows degraded with the reason.
/// Returns the batch to send and, when something was dropped, why.
fn deliverable(batch: TelemetryBatch) -> (TelemetryBatch, Option<String>) {
    let Err(error) = check(&batch) else { return (batch, None) };
    let mut kept = batch.clone();
    let part = if error.field.starts_with("telemetry.gpus") {
        kept.gpus.clear();
        "GPU readings"
    } else if error.field.starts_with("telemetry.host") {
        kept.host = None;
        "host reading"
    } else if error.field.starts_with("telemetry.samples") {
        kept.samples.clear();
        "named samples"
    } else {
        ""
    };
    let (mut kept, dropped) = if part.is_empty() || check(&kept).is_err() {
        (TelemetryBatch { gpus: Vec::new(), host: None, samples: Vec::new(), ..batch }, "readings")
    } else {
        (kept, part)
    };
    let reason = format!("the controller would refuse this interval's {dropped} ({error}); they were dropped");
    kept.collectors.push(CollectorStatus { name: "telemetry".into(), healthy: false, error: reason.clone() });
    (kept, Some(reason))
}

/// The controller's own checks on `batch` (numbered as the uplink will number it).
fn check(batch: &TelemetryBatch) -> Result<(), flotilla_proto::WireError> {
    let mut wire = pb::TelemetryBatch::from(batch.clone());
    wire.seq = 1;
    TelemetryBatch::try_from(wire).map(drop)
}

#[cfg(test)]
mod tests {
    use flotilla_common::model::GpuSample;

    use super::*;

    fn batch(used: u64) -> TelemetryBatch {
        TelemetryBatch {
            seq: 0,
            created_unix_ms: 1_700_000_000_000,
            gpus: vec![GpuSample {
                index: 0,
                uuid: "GPU-0".into(),
                memory_used_bytes: Some(used),
                memory_total_bytes: Some(80),
                ..Default::default()
            }],
            host: None,
            samples: Vec::new(),
            collectors: vec![CollectorStatus { name: "gpu".into(), healthy: true, error: String::new() }],
        }
    }

    #[test]
    fn a_batch_the_controller_would_refuse_loses_the_bad_part_and_says_why() {
        assert_eq!(deliverable(batch(40)), (batch(40), None));

        let mut bad = batch(90);
        bad.samples.push(flotilla_common::model::Sample { name: "up".into(), labels: Default::default(), value: 1.0 });
        let (sent, reason) = deliverable(bad);
        let reason = reason.expect("something dropped");
        assert!(reason.contains("GPU readings") && reason.contains("memory_used_bytes"), "{reason}");
        assert!(sent.gpus.is_empty(), "the bad GPU reading goes");
        assert_eq!(sent.samples.len(), 1, "the rest stays");
        let names: Vec<(&str, bool)> = sent.collectors.iter().map(|c| (c.name.as_str(), c.healthy)).collect();
        assert_eq!(names, [("gpu", true), ("telemetry", false)]);
        assert!(check(&sent).is_ok(), "what is sent instead passes");

        let mut bad = batch(40);
        bad.samples.push(flotilla_common::model::Sample {
            name: "no spaces".into(),
            labels: Default::default(),
            value: 1.0,
        });
        let (sent, reason) = deliverable(bad);
        assert!(reason.expect("dropped").contains("named samples"));
        assert_eq!((sent.gpus.len(), sent.samples.len()), (1, 0));
        assert!(check(&sent).is_ok());
    }
}
