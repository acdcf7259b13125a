//! Tier 3: alerts delivered through the `Dispatcher` to a real Alertmanager
//! (Debian's `prometheus-alertmanager`) on 127.0.0.1, which routes them to a
//! webhook receiver in this test: firing, listed by the API, then resolved,
//! notified as resolved, and gone from the active list.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flotilla_controller::alert::delivery::{DeliveryConfig, Dispatcher, OutgoingAlert, TargetKind};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const ALERTMANAGER: &str = "/usr/bin/prometheus-alertmanager";

/// Hang guard for each wait: generous, never a timing assertion.
const PATIENCE: Duration = Duration::from_secs(60);

/// Alertmanager running on a free port; killed when dropped.
struct Alertmanager {
    child: tokio::process::Child,
    url: String,
    log: PathBuf,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Alertmanager {
    async fn start(dir: &Path, webhook: &str) -> Self {
        assert!(
            Path::new(ALERTMANAGER).exists(),
            "{ALERTMANAGER} is missing: install the Debian package prometheus-alertmanager \
             (apt-get install prometheus-alertmanager; ./x test installs it)"
        );
        let config = dir.join("alertmanager.yml");
        std::fs::write(
            &config,
            format!(
                "route:\n  receiver: flotilla-test\n  group_by: [alertname]\n  group_wait: 0s\n  \
                 group_interval: 1s\n  repeat_interval: 1h\n\
                 receivers:\n  - name: flotilla-test\n    webhook_configs:\n      - url: {webhook}\n        \
                 send_resolved: true\n"
            ),
        )
        .unwrap();
        let addr = free_port().await;
        let log = dir.join("alertmanager.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(ALERTMANAGER)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            // Empty: no cluster listener, no gossip.
            .arg("--cluster.listen-address=")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ALERTMANAGER}: {e}"));
        let mut am = Self { child, url: format!("http://{addr}"), log };
        am.wait_ready().await;
        am
    }

    async fn wait_ready(&mut self) {
        let client = reqwest::Client::new();
        let ready = format!("{}/-/ready", self.url);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("alertmanager exited with {status}:\n{}", self.log_text());
            }
            if let Ok(response) = client.get(&ready).send().await
                && response.status().is_success()
            {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "alertmanager never got ready:\n{}", self.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills Alertmanager and reaps it.
    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The alerts named `alertname` that Alertmanager holds as active (or suppressed).
    async fn alerts(&self, alertname: &str) -> Vec<Value> {
        let url = reqwest::Url::parse_with_params(
            &format!("{}/api/v2/alerts", self.url),
            [("filter", format!("alertname=\"{alertname}\""))],
        )
        .unwrap();
        let response = reqwest::Client::new().get(url).send().await.unwrap();
        assert!(response.status().is_success(), "GET /api/v2/alerts: {}", response.status());
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
    }
}

/// A port free a moment ago on 127.0.0.1.
async fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap()
}

/// A webhook receiver on 127.0.0.1:0 that forwards each JSON body to a channel.
async fn webhook_receiver(stop: CancellationToken) -> (String, mpsc::UnboundedReceiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                () = stop.cancelled() => return,
                accepted = listener.accept() => accepted.unwrap(),
            };
            let tx = tx.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let tx = tx.clone();
                async move {
                    let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let _ = tx.send(serde_json::from_slice(&body).unwrap_or(Value::Null));
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                }
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    (url, rx)
}

/// The next notification with `status` (earlier ones, e.g. repeats, are skipped).
async fn notification(rx: &mut mpsc::UnboundedReceiver<Value>, status: &str) -> Value {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let message = rx.recv().await.expect("webhook receiver stopped");
            if message["status"] == status {
                return message;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {status} notification reached the webhook"))
}

/// Polls until `check` holds on the alerts Alertmanager lists.
async fn until_listed(am: &Alertmanager, alertname: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let alerts = am.alerts(alertname).await;
        if check(&alerts) {
            return alerts;
        }
        assert!(tokio::time::Instant::now() < deadline, "alertmanager lists {alerts:#?}\n{}", am.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn now_ms() -> i64 {
    i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

#[tokio::test]
async fn alerts_reach_alertmanager_and_resolve() {
    flotilla_common::tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (webhook, mut notifications) = webhook_receiver(stop.clone()).await;
    let am = Alertmanager::start(dir.path(), &webhook).await;

    let tracker = TaskTracker::new();
    let config = DeliveryConfig { alertmanagers: vec![am.url.clone()], ..DeliveryConfig::default() };
    let dispatcher = Dispatcher::spawn(config, stop.clone(), &tracker).unwrap();

    let name = "FlotillaDeliveryTest";
    let alert = OutgoingAlert {
        fingerprint: "delivery-test-n1".to_owned(),
        labels: labels(&[("alertname", name), ("node", "n1"), ("severity", "page")]),
        annotations: labels(&[("summary", "GPU 0 on n1 is hot")]),
        starts_at_unix_ms: now_ms() - 5_000,
        ends_at_unix_ms: None,
        generator_url: "http://127.0.0.1:7443/alerts/delivery-test-n1".to_owned(),
    };
    dispatcher.notify(vec![alert.clone()]);

    let listed = until_listed(&am, name, |alerts| !alerts.is_empty()).await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let held = &listed[0];
    assert_eq!(held["labels"], serde_json::json!({"alertname": name, "node": "n1", "severity": "page"}));
    assert_eq!(held["annotations"]["summary"], "GPU 0 on n1 is hot");
    assert_eq!(held["generatorURL"], alert.generator_url);
    assert_eq!(held["status"]["state"], "active");

    let firing = notification(&mut notifications, "firing").await;
    assert_eq!(firing["alerts"][0]["labels"]["node"], "n1");

    dispatcher.notify(vec![OutgoingAlert { ends_at_unix_ms: Some(now_ms()), ..alert }]);
    let resolved = notification(&mut notifications, "resolved").await;
    assert_eq!(resolved["version"], "4");
    assert_eq!(resolved["groupLabels"]["alertname"], name);
    assert_eq!(resolved["alerts"][0]["status"], "resolved");
    assert_eq!(resolved["alerts"][0]["labels"]["node"], "n1");
    assert_eq!(resolved["alerts"][0]["generatorURL"], "http://127.0.0.1:7443/alerts/delivery-test-n1");
    until_listed(&am, name, <[Value]>::is_empty).await;

    let counts = dispatcher.metrics().counts(TargetKind::Alertmanager);
    assert!(counts.delivered >= 2 && counts.dropped == 0, "{counts:?}");
    stop.cancel();
    tracker.close();
    tokio::time::timeout(PATIENCE, tracker.wait()).await.expect("delivery stops");
    am.stop().await;
}
