//! The async inference collector: each round it scrapes every configured endpoint,
//! and every model server the agent runs itself (`managed`), at once (`/metrics`,
//! `/v1/models` for readiness, `/health` for liveness), maps the pages and reports
//! one status per endpoint. A down, slow or broken server costs at most its own
//! timeout and never stops the others.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_common::model::{CollectorStatus, Sample};
use futures::future::join_all;
use serde::Deserialize;
use tokio::sync::{Semaphore, watch};

use super::drift::SchemaTracker;
use super::endpoint::{DEFAULT_TIMEOUT, InferenceEndpoint, Origin};
use super::engine::Engine;
use super::error::InferenceError;
use super::exposition;
use super::http::{self, Fetched, Get};
use super::managed::ManagedServer;
use super::mapping::MappingTable;
use super::normalise::{self, Normalised};

/// The largest `/metrics` body read (a real vLLM page is 50-100 KiB).
pub const MAX_METRICS_BYTES: usize = 8 << 20;

/// The largest `/v1/models` body read: a list of a few hundred LoRA adapters fits.
const MAX_MODELS_BYTES: usize = 1 << 20;

/// The largest `/health` body read; servers answer with a few bytes or none.
const MAX_HEALTH_BYTES: usize = 64 << 10;

/// Asks for text format 0.0.4: servers that can also write OpenMetrics (the Python
/// client behind vLLM and SGLang) would otherwise be free to choose it.
const ACCEPT_METRICS: &str = "text/plain;version=0.0.4;q=1,*/*;q=0.1";

/// Scrapes the configured inference servers; keeps per-endpoint drift memory.
#[derive(Debug)]
pub struct InferenceCollector {
    /// The `[[inference]]` endpoints, in config order.
    endpoints: Vec<Scraper>,
    /// The managed containers' servers, by container name.
    managed: Vec<Scraper>,
    /// Where the set of managed servers comes from, when the agent runs containers.
    managed_rx: Option<watch::Receiver<Vec<ManagedServer>>>,
    table: &'static MappingTable,
    /// One page is parsed at a time: parsing needs about ten times the body in
    /// memory, so with many endpoints sending pathological 8 MiB pages at once the
    /// peak stays near one parse (about 90 MiB) plus the bodies themselves.
    parse_gate: Semaphore,
}

/// One endpoint and what the collector remembers about it.
#[derive(Debug)]
struct Scraper {
    config: InferenceEndpoint,
    origin: Origin,
    drift: SchemaTracker,
    /// A managed container still in its health check's start period.
    starting: bool,
}

/// What one collection round produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct InferenceRound {
    /// Every endpoint's samples, each labelled with `endpoint`.
    pub samples: Vec<Sample>,
    /// One report per configured endpoint, in config order.
    pub endpoints: Vec<EndpointReport>,
}

impl InferenceRound {
    /// One collector status per endpoint, named `inference/<endpoint>`; none for a
    /// managed container whose model is still loading and cannot be scraped yet
    /// (its `up` and `ready` series say so), lest every deploy mark the node degraded.
    pub fn statuses(&self) -> Vec<CollectorStatus> {
        self.endpoints.iter().filter(|r| !r.starting || r.is_ok()).map(EndpointReport::status).collect()
    }
}

/// How one endpoint's scrape went.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointReport {
    /// The endpoint's configured name.
    pub endpoint: String,
    /// `/metrics` was fetched and parsed.
    pub up: bool,
    /// `/v1/models` answered 2xx: the model is loaded and served.
    pub ready: bool,
    /// `/health` answered 2xx.
    pub live: bool,
    /// The configured or detected engine, when known.
    pub engine: Option<Engine>,
    /// Targets seen on earlier pages that this page lacks.
    pub missing: Vec<String>,
    /// Everything that went wrong, one line each; empty when the scrape was clean.
    pub problems: Vec<String>,
    /// A managed container still in its health check's start period.
    pub starting: bool,
}

impl EndpointReport {
    /// Healthy when the page was fetched and mapped without any problem.
    pub fn is_ok(&self) -> bool {
        self.up && self.problems.is_empty()
    }

    /// This report as the batch's collector status.
    pub fn status(&self) -> CollectorStatus {
        CollectorStatus {
            name: format!("inference/{}", self.endpoint),
            healthy: self.is_ok(),
            error: self.problems.join("; "),
        }
    }
}

impl InferenceCollector {
    /// Checks the endpoints (names unique, URLs usable) and loads the mapping table.
    pub fn new(endpoints: Vec<InferenceEndpoint>) -> Result<Self, InferenceError> {
        let table = MappingTable::builtin()?;
        let mut names = BTreeSet::new();
        let mut scrapers = Vec::with_capacity(endpoints.len());
        for config in endpoints {
            if !names.insert(config.name.clone()) {
                return Err(InferenceError::DuplicateEndpoint { name: config.name });
            }
            let origin = Origin::parse(&config)?;
            scrapers.push(Scraper { origin, config, drift: SchemaTracker::default(), starting: false });
        }
        Ok(Self { endpoints: scrapers, managed: Vec::new(), managed_rx: None, table, parse_gate: Semaphore::new(1) })
    }

    /// Also scrapes the managed model servers published on `rx`
    /// ([`super::ManagedServers::subscribe`]).
    pub fn with_managed(mut self, mut rx: watch::Receiver<Vec<ManagedServer>>) -> Self {
        // What was published before this receiver existed counts too.
        rx.mark_changed();
        self.managed_rx = Some(rx);
        self
    }

    /// Whether there is nothing to scrape, now or later.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.managed.is_empty() && self.managed_rx.is_none()
    }

    /// Scrapes every endpoint concurrently. Each request is bounded by its endpoint's
    /// timeout, so a round takes at most the largest timeout (plus parsing).
    pub async fn collect(&mut self) -> InferenceRound {
        self.sync_managed();
        let (table, gate) = (self.table, &self.parse_gate);
        let scrapers = self.endpoints.iter_mut().chain(self.managed.iter_mut());
        let results = join_all(scrapers.map(|s| s.scrape(table, gate))).await;
        let mut round = InferenceRound::default();
        for (samples, report) in results {
            round.samples.extend(samples);
            round.endpoints.push(report);
        }
        round
    }

    /// Takes the latest set of managed servers: new containers are added, gone ones
    /// dropped. A container that stays keeps its drift memory, even when a restart
    /// moved it to another host port, since its name (and revision) is the same.
    fn sync_managed(&mut self) {
        let Some(rx) = &mut self.managed_rx else { return };
        if !rx.has_changed().unwrap_or(false) {
            return;
        }
        let servers = rx.borrow_and_update().clone();
        let mut before: BTreeMap<String, Scraper> =
            std::mem::take(&mut self.managed).into_iter().map(|s| (s.config.name.clone(), s)).collect();
        for server in servers {
            // A configured endpoint of the same name keeps it: two series sets under
            // one endpoint label would be indistinguishable.
            if self.endpoints.iter().any(|e| e.config.name == server.container) {
                tracing::debug!(container = %server.container, "an [[inference]] endpoint has this name; not scraping it twice");
                continue;
            }
            let config = InferenceEndpoint {
                name: server.container.clone(),
                url: server.url.clone(),
                engine: server.engine,
                timeout: DEFAULT_TIMEOUT,
            };
            let origin = match Origin::parse(&config) {
                Ok(origin) => origin,
                Err(error) => {
                    tracing::debug!(%error, "not scraping a managed container");
                    continue;
                }
            };
            let drift = before.remove(&server.container).map(|s| s.drift).unwrap_or_default();
            self.managed.push(Scraper { config, origin, drift, starting: server.starting });
        }
    }
}

impl Scraper {
    async fn scrape(&mut self, table: &'static MappingTable, gate: &Semaphore) -> (Vec<Sample>, EndpointReport) {
        let timeout = self.config.timeout;
        let get = |path, accept, limit| Get { path, accept, timeout, limit };
        let (metrics, models, health) = tokio::join!(
            http::get(&self.origin, get("/metrics", ACCEPT_METRICS, MAX_METRICS_BYTES)),
            http::get(&self.origin, get("/v1/models", "application/json", MAX_MODELS_BYTES)),
            http::get(&self.origin, get("/health", "*/*", MAX_HEALTH_BYTES)),
        );
        let (ready, model) = match &models {
            Ok(f) if f.status.is_success() => (true, served_model(&f.body)),
            _ => (false, None),
        };
        let live = matches!(&health, Ok(f) if f.status.is_success());
        let mut report = EndpointReport {
            endpoint: self.config.name.clone(),
            ready,
            live,
            engine: self.config.engine,
            starting: self.starting,
            ..EndpointReport::default()
        };
        let mut samples = Vec::new();
        match self.map_page(metrics, model, table, gate).await {
            Ok(n) => {
                report.up = true;
                report.engine = Some(n.engine);
                report.missing = self.drift.observe(n.engine, &n.present);
                if !report.missing.is_empty() {
                    report.problems.push(format!("expected series missing: {}", report.missing.join(", ")));
                }
                report.problems.extend(n.problems);
                samples = n.samples;
                for series in &report.missing {
                    samples.push(Sample {
                        name: "flotilla_inference_expected_series_missing".to_owned(),
                        labels: BTreeMap::from([
                            ("engine".to_owned(), n.engine.as_str().to_owned()),
                            ("series".to_owned(), series.clone()),
                        ]),
                        value: 1.0,
                    });
                }
            }
            Err(error) => {
                tracing::debug!(endpoint = %self.config.name, %error, "inference scrape failed");
                report.problems.push(error.to_string());
            }
        }
        for (name, ok) in [
            ("flotilla_inference_up", report.up),
            ("flotilla_inference_ready", report.ready),
            ("flotilla_inference_live", report.live),
        ] {
            samples.push(Sample { name: name.to_owned(), labels: BTreeMap::new(), value: if ok { 1.0 } else { 0.0 } });
        }
        for s in &mut samples {
            s.labels.insert("endpoint".to_owned(), self.config.name.clone());
        }
        (samples, report)
    }

    /// Checks, parses and maps a `/metrics` response. Parsing a page of up to 8 MiB
    /// is CPU work, so it runs on the blocking pool, away from the async workers.
    async fn map_page(
        &self,
        fetched: Result<Fetched, InferenceError>,
        model: Option<String>,
        table: &'static MappingTable,
        gate: &Semaphore,
    ) -> Result<Normalised, InferenceError> {
        let fetched = fetched?;
        let url = self.origin.url("/metrics");
        if !fetched.status.is_success() {
            return Err(InferenceError::Status { url, status: fetched.status.as_u16() });
        }
        let engine = self.config.engine;
        let task_url = url.clone();
        // The gate is never closed, so acquiring cannot fail; if it somehow did,
        // parsing ungated is still correct.
        let _permit = gate.acquire().await.ok();
        tokio::task::spawn_blocking(move || decode_page(&fetched.body, engine, model.as_deref(), table, &task_url))
            .await
            .map_err(|source| InferenceError::Task { url, source })?
    }
}

/// Decodes one `/metrics` body: UTF-8, the text format, then the mapping table
/// (`engine` as configured, detected when `None`). The body is whatever the
/// server sent, so nothing here may panic: `fuzz/` feeds it arbitrary bytes
/// through [`decode_metrics_page`].
fn decode_page(
    body: &[u8],
    engine: Option<Engine>,
    model: Option<&str>,
    table: &MappingTable,
    url: &str,
) -> Result<Normalised, InferenceError> {
    let text = std::str::from_utf8(body).map_err(|_| InferenceError::NotUtf8 { url: url.to_owned() })?;
    let page = exposition::parse(text).map_err(|e| InferenceError::Parse { url: url.to_owned(), message: e.0 })?;
    normalise::normalise(&page, engine, model, table).map_err(|_| InferenceError::UnknownEngine { url: url.to_owned() })
}

/// A scraped `/metrics` body decoded into flotilla samples exactly as a scrape
/// does, without the HTTP: the entry point of the fuzz targets in `fuzz/`.
#[doc(hidden)]
pub fn decode_metrics_page(
    body: &[u8],
    engine: Option<Engine>,
    model: Option<&str>,
) -> Result<Vec<Sample>, InferenceError> {
    let table = MappingTable::builtin()?;
    decode_page(body, engine, model, table, "/metrics").map(|n| n.samples)
}

/// The first model id of an OpenAI-style `/v1/models` list: the model label for
/// engines whose series carry none (TGI, llama.cpp).
fn served_model(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct List {
        data: Vec<Model>,
    }
    #[derive(Deserialize)]
    struct Model {
        id: String,
    }
    let list: List = serde_json::from_slice(body).ok()?;
    list.data.into_iter().map(|m| m.id).find(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::inference::fixture_tests::fixture;
    use crate::inference::test_server::{Reply, TestServer};

    /// A hang guard only: every test here finishes long before it.
    const GUARD: Duration = Duration::from_secs(10);

    const MODELS: &str = r#"{"object":"list","data":[{"id":"Qwen/Qwen2.5-7B-Instruct","object":"model"}]}"#;

    fn endpoint(name: &str, server: &TestServer, timeout: Duration) -> InferenceEndpoint {
        InferenceEndpoint { timeout, ..InferenceEndpoint::new(name, server.url.clone()) }
    }

    async fn healthy(page: &str) -> TestServer {
        TestServer::start([
            ("/metrics", Reply::Body(page.to_owned())),
            ("/v1/models", Reply::Body(MODELS.to_owned())),
            ("/health", Reply::Status(200)),
        ])
        .await
    }

    fn one(round: &InferenceRound, name: &str, endpoint: &str) -> f64 {
        let found: Vec<_> =
            round.samples.iter().filter(|s| s.name == name && s.labels["endpoint"] == endpoint).collect();
        assert_eq!(found.len(), 1, "{name} {endpoint}: {found:?}");
        found[0].value
    }

    #[tokio::test]
    async fn a_vllm_server_is_scraped_mapped_and_labelled() {
        let server = healthy(&fixture("vllm-v1-0.11.0.txt")).await;
        let mut c = InferenceCollector::new(vec![endpoint("a", &server, GUARD)]).unwrap();
        let round = c.collect().await;
        let report = &round.endpoints[0];
        assert!(report.is_ok(), "{report:?}");
        assert_eq!((report.up, report.ready, report.live), (true, true, true));
        assert_eq!(report.engine, Some(Engine::Vllm));
        assert_eq!(one(&round, "flotilla_inference_up", "a"), 1.0);
        assert_eq!(one(&round, "flotilla_inference_ready", "a"), 1.0);
        assert_eq!(one(&round, "flotilla_inference_live", "a"), 1.0);
        assert_eq!(one(&round, "flotilla_inference_requests_running", "a"), 7.0);
        assert!(round.samples.iter().all(|s| s.labels["endpoint"] == "a"));
        let status = &round.statuses()[0];
        assert_eq!((status.name.as_str(), status.healthy), ("inference/a", true));
    }

    #[tokio::test]
    async fn the_model_of_a_tgi_server_comes_from_v1_models() {
        let server = healthy(&fixture("tgi-3.3.7.txt")).await;
        let mut c = InferenceCollector::new(vec![endpoint("t", &server, GUARD)]).unwrap();
        let round = c.collect().await;
        let running = round.samples.iter().find(|s| s.name == "flotilla_inference_requests_running").unwrap();
        assert_eq!(running.labels["model"], "Qwen/Qwen2.5-7B-Instruct");
        assert_eq!(running.labels["engine"], "tgi");
    }

    #[tokio::test]
    async fn an_error_status_a_stall_and_a_huge_body_fail_alone() {
        let good = healthy(&fixture("sglang-0.5.9.txt")).await;
        let failing = TestServer::start([("/metrics", Reply::Status(500)), ("/v1/models", Reply::Status(503))]).await;
        let never = TestServer::start([("/metrics", Reply::Never), ("/health", Reply::Never)]).await;
        let stall = TestServer::start([("/metrics", Reply::StallBody)]).await;
        let huge =
            TestServer::start([("/metrics", Reply::Huge { size: MAX_METRICS_BYTES + (1 << 20), declared: false })])
                .await;
        let declared = TestServer::start([("/metrics", Reply::Huge { size: 1 << 30, declared: true })]).await;
        let short = Duration::from_millis(300);
        let mut c = InferenceCollector::new(vec![
            endpoint("good", &good, GUARD),
            endpoint("500", &failing, GUARD),
            endpoint("never", &never, short),
            endpoint("stall", &stall, short),
            endpoint("huge", &huge, GUARD),
            endpoint("declared", &declared, GUARD),
        ])
        .unwrap();
        let round = tokio::time::timeout(GUARD, c.collect()).await.unwrap();
        let by_name: BTreeMap<&str, &EndpointReport> =
            round.endpoints.iter().map(|r| (r.endpoint.as_str(), r)).collect();
        assert!(by_name["good"].is_ok(), "{:?}", by_name["good"]);
        assert_eq!(one(&round, "flotilla_inference_requests_running", "good"), 12.0);
        for (name, why) in [
            ("500", "HTTP status 500"),
            ("never", "no complete response within 300ms"),
            ("stall", "no complete response within 300ms"),
            ("huge", "larger than 8388608 bytes"),
            ("declared", "larger than 8388608 bytes"),
        ] {
            let r = by_name[name];
            assert!(!r.up && !r.is_ok(), "{name}");
            assert!(r.problems[0].contains(why), "{name}: {:?}", r.problems);
            assert!(r.problems[0].contains("/metrics"), "{name}: the URL is named");
            assert_eq!(one(&round, "flotilla_inference_up", name), 0.0);
            assert!(!round.statuses().iter().any(|s| s.name == format!("inference/{name}") && s.healthy));
        }
        assert!(!by_name["500"].ready, "503 on /v1/models is not ready");
        assert!(!by_name["never"].live);
    }

    #[tokio::test]
    async fn a_server_that_is_down_reports_up_zero() {
        let port = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let e = InferenceEndpoint::new("down", format!("http://127.0.0.1:{port}"));
        let mut c = InferenceCollector::new(vec![e]).unwrap();
        let round = tokio::time::timeout(GUARD, c.collect()).await.unwrap();
        let r = &round.endpoints[0];
        assert!(!r.up && !r.ready && !r.live);
        assert!(r.problems[0].contains("connect"), "{:?}", r.problems);
        assert_eq!(one(&round, "flotilla_inference_ready", "down"), 0.0);
    }

    #[tokio::test]
    async fn garbage_and_foreign_pages_are_reported() {
        let garbage = healthy("<html><body>It works!</body></html>\n").await;
        let dcgm = healthy(&fixture("dcgm-exporter-4.5.3-4.8.2.txt")).await;
        let binary = TestServer::start([("/metrics", Reply::Body("\u{0}\u{1}".repeat(10)))]).await;
        let mut c = InferenceCollector::new(vec![
            endpoint("garbage", &garbage, GUARD),
            endpoint("dcgm", &dcgm, GUARD),
            endpoint("binary", &binary, GUARD),
        ])
        .unwrap();
        let round = c.collect().await;
        assert!(round.endpoints[0].problems[0].contains("not Prometheus text format"));
        assert!(round.endpoints[1].problems[0].contains("cannot tell the inference engine"));
        assert!(round.endpoints[2].problems[0].contains("not Prometheus text format"));
        assert!(round.endpoints.iter().all(|r| !r.up));
        assert!(round.endpoints[..2].iter().all(|r| r.ready && r.live));
    }

    #[tokio::test]
    async fn a_vanished_series_is_reported_as_missing() {
        let page = fixture("vllm-v1-0.11.0.txt");
        let server = healthy(&page).await;
        let mut c = InferenceCollector::new(vec![endpoint("a", &server, GUARD)]).unwrap();
        assert!(c.collect().await.endpoints[0].is_ok());
        server.set("/metrics", Reply::Body(page.replace("vllm:kv_cache_usage_perc", "vllm:kv_cache_usage_fraction")));
        let round = c.collect().await;
        let r = &round.endpoints[0];
        assert!(r.up && !r.is_ok());
        assert_eq!(r.missing, ["flotilla_inference_kv_cache_usage_ratio"]);
        assert!(r.status().error.contains("expected series missing: flotilla_inference_kv_cache_usage_ratio"));
        let missing: Vec<_> =
            round.samples.iter().filter(|s| s.name == "flotilla_inference_expected_series_missing").collect();
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].labels["series"], "flotilla_inference_kv_cache_usage_ratio");
        assert_eq!(missing[0].labels["endpoint"], "a");
        assert_eq!(missing[0].value, 1.0);
        // An unreachable page is not drift: up=0 says it, and the memory stays.
        server.set("/metrics", Reply::Status(502));
        assert!(c.collect().await.endpoints[0].missing.is_empty());
        server.set("/metrics", Reply::Body(page));
        assert!(c.collect().await.endpoints[0].is_ok());
    }

    /// A model server the agent deploys itself is scraped as the container while it
    /// runs, and no longer once it stops: the listings drive the set.
    #[tokio::test]
    async fn managed_containers_are_scraped_while_they_run() {
        use crate::containers::{LIST_TIMEOUT, report};
        use crate::inference::ManagedServers;
        use crate::runtime::fake::FakeRuntime;
        use crate::runtime::{ContainerSpec, HealthState, Runtime};

        let server = healthy(&fixture("vllm-v1-0.11.0.txt")).await;
        let port = server.url.rsplit(':').next().unwrap();
        let rt = FakeRuntime::with_images(["vllm:1"]);
        let servers = ManagedServers::default();
        let configured = healthy(&fixture("sglang-0.5.9.txt")).await;
        let mut c = InferenceCollector::new(vec![endpoint("configured", &configured, GUARD)])
            .unwrap()
            .with_managed(servers.subscribe());
        let spec = |revision: &str, inference: &str| {
            let yaml = format!(
                "name: llama\nrevision: '{revision}'\nimage: vllm:1\nports: [{{container: 8000, host: {port}}}]\n{inference}"
            );
            ContainerSpec::from_yaml(&yaml).unwrap().validate(&[]).unwrap()
        };
        rt.deploy(&spec("2", "inference: {port: 8000, engine: vllm}\n")).await.unwrap();
        // Published on the same port but without `inference`: not a server to scrape.
        rt.deploy(&spec("3", "")).await.unwrap();
        report(&rt, LIST_TIMEOUT, &servers).await;

        let round = c.collect().await;
        let names: Vec<&str> = round.endpoints.iter().map(|r| r.endpoint.as_str()).collect();
        assert_eq!(names, ["configured", "llama-2"], "configured endpoints first, then containers by name");
        let r = &round.endpoints[1];
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(r.engine, Some(Engine::Vllm));
        assert_eq!(one(&round, "flotilla_inference_ready", "llama-2"), 1.0);
        assert_eq!(one(&round, "flotilla_inference_requests_running", "llama-2"), 7.0);
        assert!(round.statuses().iter().any(|s| s.name == "inference/llama-2" && s.healthy));

        // Still loading (its health check in the start period) and not answering yet:
        // the series say so, but no failing collector marks the node degraded.
        server.set("/metrics", Reply::Status(503));
        server.set("/v1/models", Reply::Status(503));
        rt.set_health("llama-2", HealthState::Starting);
        report(&rt, LIST_TIMEOUT, &servers).await;
        let round = c.collect().await;
        assert_eq!(one(&round, "flotilla_inference_up", "llama-2"), 0.0);
        assert_eq!(one(&round, "flotilla_inference_ready", "llama-2"), 0.0);
        assert!(!round.statuses().iter().any(|s| s.name == "inference/llama-2"), "{:?}", round.statuses());
        rt.set_health("llama-2", HealthState::Unhealthy);
        report(&rt, LIST_TIMEOUT, &servers).await;
        let round = c.collect().await;
        assert!(round.statuses().iter().any(|s| s.name == "inference/llama-2" && !s.healthy), "no longer starting");

        // Stopped: the next listing drops it, and its series with it.
        rt.stop("llama-2", Duration::ZERO).await.unwrap();
        report(&rt, LIST_TIMEOUT, &servers).await;
        let round = c.collect().await;
        assert!(round.samples.iter().all(|s| s.labels["endpoint"] == "configured"));
        assert_eq!(round.endpoints.len(), 1);
    }

    #[test]
    fn endpoint_names_must_be_unique() {
        let e = InferenceEndpoint::new("a", "http://127.0.0.1:1");
        let err = InferenceCollector::new(vec![e.clone(), e]).unwrap_err();
        assert!(err.to_string().contains("used twice"), "{err}");
        let bad = InferenceEndpoint::new("b", "https://x");
        assert!(InferenceCollector::new(vec![bad]).is_err());
    }

    #[test]
    fn served_model_reads_openai_lists() {
        assert_eq!(served_model(MODELS.as_bytes()).as_deref(), Some("Qwen/Qwen2.5-7B-Instruct"));
        assert_eq!(served_model(b"{\"data\":[]}"), None);
        assert_eq!(served_model(b"not json"), None);
    }
}
