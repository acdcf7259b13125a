//! Delivery against a scripted HTTP server on 127.0.0.1: retries, backoff,
//! coalescing, payload shapes, re-posting of firing alerts, shutdown.
//!
//! These run on real time (real sockets do not mix with a paused clock), with
//! millisecond backoffs; timing is only ever checked as a lower bound.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::test_server::{Recorded, Reply, TestServer};
use super::*;

fn config() -> DeliveryConfig {
    DeliveryConfig {
        timeout: Duration::from_secs(2),
        resend_interval: Duration::from_secs(3600),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        max_attempts: 5,
        external_url: "http://flotilla.test:7443".to_owned(),
        ..DeliveryConfig::default()
    }
}

fn firing(fp: &str) -> OutgoingAlert {
    OutgoingAlert {
        fingerprint: fp.to_owned(),
        labels: [("alertname", "GpuHot"), ("node", fp), ("severity", "page")]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        annotations: [("summary".to_owned(), format!("{fp} is hot"))].into_iter().collect(),
        starts_at_unix_ms: payload::now_unix_ms() - 1_000,
        ends_at_unix_ms: None,
        generator_url: format!("http://flotilla.test:7443/alerts/{fp}"),
    }
}

fn resolved(fp: &str) -> OutgoingAlert {
    OutgoingAlert { ends_at_unix_ms: Some(payload::now_unix_ms()), ..firing(fp) }
}

/// A dispatcher and what stops it.
struct Running {
    dispatcher: Dispatcher,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Running {
    fn start(config: DeliveryConfig) -> Self {
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let dispatcher = Dispatcher::spawn(config, cancel.clone(), &tracker).unwrap();
        Self { dispatcher, cancel, tracker }
    }

    fn counts(&self, kind: TargetKind) -> DeliveryCounts {
        self.dispatcher.metrics().counts(kind)
    }

    /// Cancels and waits for every task (10 s hang guard).
    async fn stop(self) -> Dispatcher {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await.expect("delivery tasks stop");
        self.dispatcher
    }
}

/// Waits until `check` holds (10 s hang guard).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

/// The fingerprints (node labels) of an Alertmanager body, in order.
fn am_nodes(request: &Recorded) -> Vec<String> {
    request.body.as_array().unwrap().iter().map(|a| a["labels"]["node"].as_str().unwrap().to_owned()).collect()
}

fn parse_time(value: &Value) -> SystemTime {
    humantime::parse_rfc3339(value.as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn server_errors_are_retried_with_growing_backoff() {
    let server = TestServer::start([Reply::Status(500), Reply::Status(503), Reply::Status(429)]).await;
    let running = Running::start(DeliveryConfig { alertmanagers: vec![server.url()], ..config() });
    running.dispatcher.notify(vec![firing("n1")]);

    let requests = server.wait_for(4).await;
    for request in &requests {
        assert_eq!(am_nodes(request), ["n1"]);
    }
    // Jitter keeps each wait between half and all of 20 ms, 40 ms, 80 ms.
    for (i, floor_ms) in [10, 20, 40].into_iter().enumerate() {
        let gap = requests[i + 1].at - requests[i].at;
        assert!(gap >= Duration::from_millis(floor_ms), "wait {i} was {gap:?}, below {floor_ms} ms");
    }
    eventually("the delivery to be counted", || running.counts(TargetKind::Alertmanager).delivered == 1).await;
    let counts = running.counts(TargetKind::Alertmanager);
    assert_eq!((counts.failed_attempts, counts.dropped), (3, 0));
    running.stop().await;
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let server = TestServer::start([Reply::StatusWithBody(400, "bad alert\nlabels")]).await;
    let running = Running::start(DeliveryConfig { webhooks: vec![format!("{}/hook", server.url())], ..config() });
    running.dispatcher.notify(vec![firing("n1")]);
    server.wait_for(1).await;
    running.dispatcher.notify(vec![firing("n2")]);

    let requests = server.wait_for(2).await;
    assert_eq!(requests[1].body["alerts"][0]["labels"]["node"], "n2", "the refused request was not repeated");
    eventually("the second delivery", || running.counts(TargetKind::Webhook).delivered == 1).await;
    let counts = running.counts(TargetKind::Webhook);
    assert_eq!((counts.failed_attempts, counts.dropped), (1, 1));
    assert_eq!(server.requests().len(), 2);
    running.stop().await;
}

#[tokio::test]
async fn a_request_is_given_up_after_max_attempts() {
    let server = TestServer::start(vec![Reply::Status(502); 3]).await;
    let running = Running::start(DeliveryConfig {
        webhooks: vec![format!("{}/hook", server.url())],
        max_attempts: 3,
        ..config()
    });
    running.dispatcher.notify(vec![firing("n1")]);
    server.wait_for(3).await;
    eventually("the give-up", || running.counts(TargetKind::Webhook).dropped == 1).await;
    running.dispatcher.notify(vec![firing("n2")]);

    let requests = server.wait_for(4).await;
    let nodes: Vec<&str> = requests.iter().map(|r| r.body["alerts"][0]["labels"]["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["n1", "n1", "n1", "n2"]);
    running.stop().await;
}

#[tokio::test]
async fn states_queued_behind_a_failing_request_are_coalesced() {
    let server = TestServer::start([Reply::Status(500)]).await;
    let running = Running::start(DeliveryConfig {
        webhooks: vec![format!("{}/hook", server.url())],
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(1),
        ..config()
    });
    running.dispatcher.notify(vec![firing("n1")]);
    server.wait_for(1).await;
    // The worker now waits at least half a second before its retry: these queue up.
    running.dispatcher.notify(vec![firing("n2")]);
    running.dispatcher.notify(vec![resolved("n2")]);
    let mut newest = firing("n2");
    newest.annotations.insert("summary".to_owned(), "hot again".to_owned());
    running.dispatcher.notify(vec![newest, firing("n3")]);

    let requests = server.wait_for(3).await;
    assert_eq!(requests[1].body["alerts"][0]["labels"]["node"], "n1");
    let alerts = requests[2].body["alerts"].as_array().unwrap();
    let nodes: Vec<&str> = alerts.iter().map(|a| a["labels"]["node"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["n2", "n3"]);
    assert_eq!(alerts[0]["status"], "firing");
    assert_eq!(alerts[0]["annotations"]["summary"], "hot again");
    assert_eq!(running.counts(TargetKind::Webhook).coalesced, 2);
    running.stop().await;
}

#[tokio::test]
async fn alertmanager_requests_are_postable_alerts() {
    let server = TestServer::start([]).await;
    let resend = Duration::from_secs(60);
    let running = Running::start(DeliveryConfig {
        alertmanagers: vec![format!("{}/am/", server.url())],
        resend_interval: resend,
        ..config()
    });
    let before = SystemTime::now();
    running.dispatcher.notify(vec![firing("n1"), firing("n2")]);

    let request = &server.wait_for(1).await[0];
    assert_eq!(request.path, "/am/api/v2/alerts");
    assert_eq!(request.content_type, "application/json");
    assert_eq!(am_nodes(request), ["n1", "n2"]);
    let alert = &request.body[0];
    assert_eq!(alert["labels"]["alertname"], "GpuHot");
    assert_eq!(alert["annotations"]["summary"], "n1 is hot");
    assert_eq!(alert["generatorURL"], "http://flotilla.test:7443/alerts/n1");
    // Firing: endsAt is four resend intervals ahead, so Alertmanager expires it if we stop.
    let ends = parse_time(&alert["endsAt"]);
    let lease = ends.duration_since(before).unwrap();
    assert!(lease >= resend * 4 - Duration::from_secs(1) && lease <= resend * 4 + Duration::from_secs(10), "{lease:?}");
    assert!(parse_time(&alert["startsAt"]) < before);
    running.stop().await;
}

#[tokio::test]
async fn webhook_requests_are_alertmanager_notifications() {
    let server = TestServer::start([]).await;
    let running =
        Running::start(DeliveryConfig { webhooks: vec![format!("{}/hook?token=x", server.url())], ..config() });
    let mut other = firing("n9");
    other.labels.insert("alertname".to_owned(), "NodeDown".to_owned());
    running.dispatcher.notify(vec![firing("n1"), resolved("n2"), other]);

    let requests = server.wait_for(2).await;
    assert!(requests.iter().all(|r| r.path == "/hook" && r.content_type == "application/json"));
    let gpu_hot = requests.iter().find(|r| r.body["groupLabels"]["alertname"] == "GpuHot").unwrap();
    let body = &gpu_hot.body;
    assert_eq!(body["version"], "4");
    assert_eq!(body["status"], "firing");
    assert_eq!(body["receiver"], "flotilla");
    assert_eq!(body["groupKey"], r#"{}:{alertname="GpuHot"}"#);
    assert_eq!(body["truncatedAlerts"], 0);
    assert_eq!(body["externalURL"], "http://flotilla.test:7443");
    assert_eq!(body["commonLabels"]["severity"], "page");
    assert!(body["commonLabels"].get("node").is_none());
    let alerts = body["alerts"].as_array().unwrap();
    assert_eq!(alerts.len(), 2);
    assert_eq!((&alerts[0]["status"], &alerts[0]["endsAt"]), (&Value::from("firing"), &Value::from(ZERO)));
    assert_eq!(alerts[0]["fingerprint"], "n1");
    assert_eq!(alerts[1]["status"], "resolved");
    assert!(parse_time(&alerts[1]["endsAt"]) >= parse_time(&alerts[1]["startsAt"]));
    let node_down = requests.iter().find(|r| r.body["groupLabels"]["alertname"] == "NodeDown").unwrap();
    assert_eq!(node_down.body["alerts"].as_array().unwrap().len(), 1);
    running.stop().await;
}

const ZERO: &str = "0001-01-01T00:00:00Z";

#[tokio::test]
async fn firing_alerts_are_reposted_until_resolved() {
    let server = TestServer::start([]).await;
    let resend = Duration::from_millis(150);
    let running =
        Running::start(DeliveryConfig { alertmanagers: vec![server.url()], resend_interval: resend, ..config() });
    running.dispatcher.notify(vec![firing("n1")]);

    let requests = server.wait_for(3).await;
    for pair in requests.windows(2) {
        assert_eq!(am_nodes(&pair[1]), ["n1"]);
        assert!(pair[1].at - pair[0].at >= resend, "re-posted after {:?}", pair[1].at - pair[0].at);
    }
    let resolved_alert = resolved("n1");
    let resolved_at = resolved_alert.ends_at_unix_ms.unwrap();
    running.dispatcher.notify(vec![resolved_alert]);

    let last = loop {
        let requests = server.wait_for(server.requests().len() + 1).await;
        let last = requests.last().unwrap().clone();
        if last.body[0]["endsAt"] == payload::rfc3339(resolved_at) {
            break last;
        }
    };
    assert_eq!(am_nodes(&last), ["n1"]);
    // Nothing more once resolved: wait several resend intervals.
    let count = server.requests().len();
    tokio::time::sleep(resend * 4).await;
    assert_eq!(server.requests().len(), count, "a resolved alert was posted again");
    running.stop().await;
}

#[tokio::test]
async fn a_dead_target_does_not_delay_another() {
    let hung = TestServer::start([Reply::Hang]).await;
    let healthy = TestServer::start([]).await;
    let running = Running::start(DeliveryConfig {
        alertmanagers: vec![hung.url()],
        webhooks: vec![format!("{}/hook", healthy.url())],
        timeout: Duration::from_secs(30),
        ..config()
    });
    running.dispatcher.notify(vec![firing("n1")]);
    hung.wait_for(1).await;
    healthy.wait_for(1).await;
    eventually("the webhook delivery", || running.counts(TargetKind::Webhook).delivered == 1).await;
    assert_eq!(running.counts(TargetKind::Alertmanager).delivered, 0, "the hung request is still open");
    running.stop().await;
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_but_never_blocks() {
    let hung = TestServer::start([Reply::Hang]).await;
    let running = Running::start(DeliveryConfig {
        webhooks: vec![hung.url()],
        timeout: Duration::from_secs(30),
        queue_capacity: 2,
        max_batch: 1,
        ..config()
    });
    running.dispatcher.notify(vec![firing("n0")]);
    hung.wait_for(1).await;
    // The worker is stuck on n0; five more distinct alerts meet a queue of two.
    running.dispatcher.notify((1..=5).map(|i| firing(&format!("n{i}"))).collect());
    let counts = running.counts(TargetKind::Webhook);
    assert_eq!(counts.dropped, 3);
    running.stop().await;
}

#[tokio::test]
async fn shutdown_makes_one_last_attempt_at_queued_resolutions() {
    let server = TestServer::start([Reply::Status(500)]).await;
    let running = Running::start(DeliveryConfig {
        alertmanagers: vec![server.url()],
        backoff_initial: Duration::from_secs(60),
        backoff_max: Duration::from_secs(60),
        ..config()
    });
    running.dispatcher.notify(vec![firing("n1")]);
    server.wait_for(1).await;
    // The worker now waits a minute before retrying n1; n1 resolves meanwhile, and
    // n2 starts firing.
    let resolution = resolved("n1");
    running.dispatcher.notify(vec![resolution.clone(), firing("n2")]);
    let dispatcher = running.stop().await;

    let requests = server.requests();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    assert_eq!(am_nodes(&requests[1]), ["n1"]);
    assert_eq!(requests[1].body[0]["endsAt"], payload::rfc3339(resolution.ends_at_unix_ms.unwrap()));
    let counts = dispatcher.metrics().counts(TargetKind::Alertmanager);
    assert_eq!((counts.delivered, counts.dropped), (1, 1), "n2's firing state is dropped at shutdown");
}

#[tokio::test]
async fn alerts_alertmanager_would_refuse_are_not_sent() {
    let server = TestServer::start([]).await;
    let running = Running::start(DeliveryConfig { alertmanagers: vec![server.url()], ..config() });
    let mut bad = firing("bad");
    bad.labels.insert("gpu.index".to_owned(), "0".to_owned());
    running.dispatcher.notify(vec![bad, firing("good")]);
    let requests = server.wait_for(1).await;
    assert_eq!(am_nodes(&requests[0]), ["good"]);
    assert_eq!(running.counts(TargetKind::Alertmanager).dropped, 1);
    running.stop().await;
}

#[tokio::test]
async fn https_targets_are_verified_against_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = flotilla_common::pki::init_ca(dir.path(), &flotilla_common::pki::CaInit::default()).unwrap();
    let files = flotilla_common::tls::TlsFiles {
        ca: pki.ca_cert.clone(),
        cert: pki.controller.cert.clone(),
        key: pki.controller.key.clone(),
    };
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(files.chain().unwrap(), files.private_key().unwrap())
        .unwrap();
    let server = TestServer::start_with([], Some(Arc::new(tls))).await;
    assert!(server.url().starts_with("https://127.0.0.1:"));

    // Without the CA, the handshake fails (and is retried, as a connection error);
    // a host without system roots refuses to start instead.
    let untrusting = DeliveryConfig { webhooks: vec![server.url()], max_attempts: 1, ..config() };
    let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
    match Dispatcher::spawn(untrusting, cancel.clone(), &tracker) {
        Ok(dispatcher) => {
            let untrusting = Running { dispatcher, cancel, tracker };
            untrusting.dispatcher.notify(vec![firing("n1")]);
            eventually("the failed handshake", || untrusting.counts(TargetKind::Webhook).failed_attempts == 1).await;
            untrusting.stop().await;
        }
        Err(error) => assert!(matches!(error, DeliveryError::Tls(_)), "{error}"),
    }
    assert!(server.requests().is_empty());

    let trusting =
        Running::start(DeliveryConfig { webhooks: vec![server.url()], ca_file: Some(pki.ca_cert), ..config() });
    trusting.dispatcher.notify(vec![firing("n1")]);
    server.wait_for(1).await;
    trusting.stop().await;
}

#[tokio::test]
async fn spawn_refuses_bad_config_and_ca_files() {
    let tracker = TaskTracker::new();
    let bad = DeliveryConfig { webhooks: vec!["ftp://127.0.0.1/x".to_owned()], ..config() };
    let error = Dispatcher::spawn(bad, CancellationToken::new(), &tracker).unwrap_err();
    assert!(matches!(error, DeliveryError::Config(_)), "{error}");

    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    for ca in [dir.path().join("missing.pem"), not_pem] {
        let config =
            DeliveryConfig { webhooks: vec!["https://127.0.0.1:1/x".to_owned()], ca_file: Some(ca), ..config() };
        let error = Dispatcher::spawn(config, CancellationToken::new(), &tracker).unwrap_err();
        assert!(matches!(error, DeliveryError::CaFile { .. }), "{error}");
        assert!(error.to_string().contains(".pem"), "{error}");
    }
    assert!(tracker.is_empty(), "no task starts on a refused config");

    // No targets: nothing runs, notify is a no-op.
    let idle = Dispatcher::spawn(DeliveryConfig::default(), CancellationToken::new(), &tracker).unwrap();
    idle.notify(vec![firing("n1")]);
    assert!(tracker.is_empty());
}
