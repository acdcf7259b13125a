//! Tier 2: telemetry streamed by an agent comes back out of `Fleet.QueryMetrics`
//! (raw, and from rollups once the raw window has passed) and
//! `Fleet.WatchTelemetry`, over real mTLS with the controller in-process.

// Helpers here fail the test on setup errors, as the #[test] bodies do.
#![allow(clippy::expect_used, clippy::unwrap_used)]

#[path = "support/running.rs"]
mod running;

use std::collections::HashMap;
use std::time::Duration;

use flotilla_common::time::now_unix_ms;
use flotilla_controller::rollup::{MINUTE_MS, minute_of};
use flotilla_controller::store::SledStore;
use flotilla_proto::pb;
use flotilla_proto::pb::watch_telemetry_response::Event;
use running::{Running, acked, start, start_in, telemetry};

/// A hang guard, not a speed claim.
const PATIENCE: Duration = Duration::from_secs(30);

const TEMP: &str = "flotilla_gpu_temperature_celsius";

fn inventory(node: &str) -> pb::Inventory {
    pb::Inventory {
        hostname: node.into(),
        gpus: vec![pb::GpuInfo { index: 0, uuid: "GPU-0".into(), model: "H100".into(), memory_total_bytes: 80 }],
        ..Default::default()
    }
}

fn gpu_batch(seq: u64, at: i64, temp: f64) -> pb::TelemetryBatch {
    pb::TelemetryBatch {
        seq,
        created_unix_ms: at,
        gpus: vec![pb::GpuSample {
            index: 0,
            uuid: "GPU-0".into(),
            temperature_celsius: Some(temp),
            energy_joules_total: Some(seq as f64 * 10.0),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Streams `batches` as node `node` and waits until all are acknowledged.
async fn stream(c: &Running, node: &str, batches: Vec<pb::TelemetryBatch>) {
    let (tx, mut inbound, _) = c.agent_with(node, 1000, inventory(node)).await;
    let count = batches.len();
    for b in batches {
        tx.send(telemetry(b)).await.unwrap();
    }
    tokio::time::timeout(PATIENCE, acked(&mut inbound, count)).await.expect("hang guard: acks");
}

async fn query(
    c: &Running,
    selector: &str,
    start: i64,
    step_ms: i64,
) -> Result<pb::QueryMetricsResponse, tonic::Status> {
    let req = pb::QueryMetricsRequest { selector: selector.into(), start_unix_ms: start, end_unix_ms: 0, step_ms };
    c.fleet().await.query_metrics(req).await.map(tonic::Response::into_inner)
}

fn values(s: &pb::MetricSeries) -> Vec<f64> {
    s.points.iter().map(|p| p.value).collect()
}

/// The seq of the next telemetry event, skipping none.
async fn next_seq(watch: &mut tonic::Streaming<pb::WatchTelemetryResponse>) -> (String, u64) {
    let msg = tokio::time::timeout(PATIENCE, watch.message()).await.expect("hang guard: watch").unwrap().unwrap();
    match msg.event {
        Some(Event::Telemetry(t)) => (t.node_id, t.batch.unwrap().seq),
        other => panic!("expected telemetry, got {other:?}"),
    }
}

#[tokio::test]
async fn streamed_batches_are_queried_back_and_watched() {
    let c = start().await;
    let mut fleet = c.fleet().await;
    let mut watch =
        fleet.watch_telemetry(pb::WatchTelemetryRequest { node_ids: vec!["n1".into()] }).await.unwrap().into_inner();
    let now = now_unix_ms();
    // Every batch within 3 s after a multiple of 10 s: no hour boundary falls among them.
    let base = (now - 5000).div_euclid(10_000) * 10_000;
    stream(&c, "n2", vec![gpu_batch(1, base + 1500, 99.0)]).await;
    stream(&c, "n1", (1..=3).map(|s| gpu_batch(s, base + s as i64 * 500, 50.0 + s as f64)).collect()).await;

    let mut seen = Vec::new();
    while seen.last() != Some(&3) {
        let (node, seq) = next_seq(&mut watch).await;
        assert_eq!(node, "n1", "only the watched node");
        seen.push(seq);
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "newest batches in order: {seen:?}");

    let resp = query(&c, &format!("{TEMP}{{node=\"n1\"}}"), now - 60_000, 0).await.unwrap();
    assert_eq!(resp.series.len(), 1, "{resp:?}");
    let s = &resp.series[0];
    assert_eq!(s.name, TEMP);
    let want: HashMap<String, String> =
        [("node", "n1"), ("gpu", "0"), ("uuid", "GPU-0"), ("model", "H100")].map(|(k, v)| (k.into(), v.into())).into();
    assert_eq!(s.labels, want);
    assert_eq!(values(s), [51.0, 52.0, 53.0]);

    // Every node, one step: a gauge's mean and a counter's last value.
    let resp =
        query(&c, &format!("{{__name__=~\"{TEMP}|flotilla_gpu_energy_joules_total\"}}"), now - 60_000, 3_600_000)
            .await
            .unwrap();
    let found: Vec<(String, String, Vec<f64>)> =
        resp.series.iter().map(|s| (s.name.clone(), s.labels["node"].clone(), values(s))).collect();
    assert_eq!(
        found,
        [
            ("flotilla_gpu_energy_joules_total".to_owned(), "n1".to_owned(), vec![30.0]),
            ("flotilla_gpu_energy_joules_total".to_owned(), "n2".to_owned(), vec![10.0]),
            (TEMP.to_owned(), "n1".to_owned(), vec![52.0]),
            (TEMP.to_owned(), "n2".to_owned(), vec![99.0]),
        ]
    );

    let err = query(&c, &format!("rate({TEMP}[5m])"), now - 60_000, 0).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("the function rate()") && err.message().contains("not supported"), "{err:?}");
    let err = query(&c, TEMP, now - 3_600_000, 1).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("11000 points"), "{err:?}");
    c.shutdown().await;
}

#[tokio::test]
async fn past_the_raw_window_answers_come_from_rollups_and_survive_a_restart() {
    let c = start().await;
    let now = now_unix_ms();
    // Six batches in one minute three hours ago (past the one-hour raw window), one now.
    let old_minute = minute_of(now - 3 * 3_600_000);
    let mut batches: Vec<pb::TelemetryBatch> =
        (1..=6).map(|s| gpu_batch(s, old_minute + s as i64 * 5_000, 40.0 + s as f64)).collect();
    batches.push(gpu_batch(7, now - 1000, 70.0));
    stream(&c, "n1", batches).await;
    let (dir, data) = c.shutdown().await;

    // The maintenance pass the controller runs every minute, run here with a known clock.
    {
        let store = SledStore::open(&data.join("store")).unwrap();
        let done = flotilla_controller::rollup::maintain(
            &store,
            now,
            Duration::from_secs(3600),
            Duration::from_secs(30 * 86_400),
            &Default::default(),
        )
        .unwrap();
        assert_eq!((done.batches_rolled_up, done.batches_pruned), (7, 6), "{done:?}");
    }

    let c = start_in(dir).await;
    let resp = query(&c, &format!("{TEMP}{{gpu=\"0\"}}"), now - 4 * 3_600_000, 0).await.unwrap();
    assert_eq!(resp.series.len(), 1, "{resp:?}");
    let points: Vec<(i64, f64)> = resp.series[0].points.iter().map(|p| (p.unix_ms, p.value)).collect();
    assert_eq!(points, [(old_minute, 43.5), (now - 1000, 70.0)], "the old minute is the mean of 41..=46");
    // The counter's rollup keeps its last value in the minute.
    let resp = query(&c, "flotilla_gpu_energy_joules_total", now - 4 * 3_600_000, MINUTE_MS).await.unwrap();
    assert_eq!(values(&resp.series[0]).first(), Some(&60.0));

    // A new watcher starts from the newest batch the controller knows.
    let mut watch =
        c.fleet().await.watch_telemetry(pb::WatchTelemetryRequest { node_ids: vec![] }).await.unwrap().into_inner();
    assert_eq!(next_seq(&mut watch).await, ("n1".to_owned(), 7));
    c.shutdown().await;
}
