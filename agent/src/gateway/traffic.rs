//! Gateway traffic counters from nginx's access log: per upstream server, the
//! responses by status class and the distribution of upstream response times,
//! counted since the agent started. The controller's rollout health gates compare
//! old and new revisions with them, so both are measured by the same nginx, in
//! the same way, at the place clients see them.
//!
//! nginx writes one line per request in the `flotilla` log format (see
//! `deploy/nginx/nginx.conf.example` and [`LOG_FORMAT`]) to the file named by
//! `[gateway] access_log`; the agent follows that file (`tail`), parses each line
//! (`line`) and emits, in every telemetry batch:
//!
//! - `flotilla_gateway_responses_total{upstream, server, code}`: `code` is `1xx`
//!   to `5xx`, from `$upstream_status` (or `$status` when the server gave none);
//! - `flotilla_gateway_response_seconds_bucket{upstream, server, le}`, `_sum`
//!   and `_count`: `$upstream_response_time`, buckets [`BUCKETS`];
//! - `flotilla_gateway_log_malformed_lines_total`: lines not in the format
//!   (or longer than a line of it can be), ignored;
//! - `flotilla_gateway_log_servers_evicted_total`: servers forgotten to keep
//!   the number of series bounded ([`MAX_SERVERS`]).
//!
//! Requests nginx answered without an upstream (`$upstream_addr` is `-`) are not
//! counted: there is no server to attribute them to.

mod line;
mod tail;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use flotilla_common::model::{CollectorStatus, Sample};

use line::{Line, Response};
use tail::Tail;

/// The nginx `log_format` the agent reads: `log_format flotilla '...';`.
pub const LOG_FORMAT: &str = "$proxy_host $upstream_addr $upstream_status $upstream_response_time $status";

/// Upper bounds of the latency buckets, in seconds (the `+Inf` bucket is the count).
/// From 5 ms (a cached or trivial answer) to 60 s (a long generation).
pub const BUCKETS: [f64; 13] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The most (upstream, server) pairs counted at once. Each costs 21 samples per
/// batch (5 classes, 14 buckets, sum, count), so 128 stay near 2 700, well inside
/// the agent's 5 000 named samples per batch; a gateway in a rollout has a handful.
pub const MAX_SERVERS: usize = 128;

/// The collector status name in each batch.
const STATUS_NAME: &str = "gateway/access_log";

/// What is counted for one upstream server.
#[derive(Debug, Clone, Default, PartialEq)]
struct Counts {
    /// Responses by class: index 0 is 1xx, 4 is 5xx.
    classes: [u64; 5],
    /// Responses with a measured time at or under each of [`BUCKETS`] (cumulative).
    buckets: [u64; BUCKETS.len()],
    /// Responses with a measured time.
    count: u64,
    sum: f64,
    /// The round this server last answered in, to forget the longest silent first.
    last_round: u64,
}

/// The counters, and the log they come from.
#[derive(Debug)]
pub struct TrafficCounters {
    path: PathBuf,
    tail: Tail,
    servers: HashMap<(String, String), Counts>,
    malformed: u64,
    evicted: u64,
    round: u64,
    /// The last read error, so it is logged when it starts or changes, not each round.
    last_error: Option<String>,
}

impl TrafficCounters {
    /// Follows `path` from its current end.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            tail: Tail::new(path),
            servers: HashMap::new(),
            malformed: 0,
            evicted: 0,
            round: 0,
            last_error: None,
        }
    }

    /// Reads what nginx logged since the last round (bounded) and returns every
    /// counter, plus the collector's status. Blocking file I/O: call it off the
    /// async workers.
    pub fn sample(&mut self) -> (Vec<Sample>, CollectorStatus) {
        self.round += 1;
        let status = match self.tail.read() {
            Ok(read) => {
                if self.last_error.take().is_some() {
                    tracing::info!(path = %self.path.display(), "gateway access log readable again");
                }
                self.malformed += read.too_long;
                for text in &read.lines {
                    self.observe(text);
                }
                CollectorStatus { name: STATUS_NAME.into(), healthy: true, error: String::new() }
            }
            Err(error) => {
                let message = format!("{}: {error}", self.path.display());
                if self.last_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!(error = %message, "cannot read the gateway access log");
                    self.last_error = Some(message.clone());
                }
                CollectorStatus { name: STATUS_NAME.into(), healthy: false, error: message }
            }
        };
        (self.samples(), status)
    }

    fn observe(&mut self, text: &str) {
        match line::parse(text) {
            Ok(Line::Proxied(response)) => self.count(response),
            Ok(Line::NoUpstream) => {}
            Err(why) => {
                tracing::debug!(reason = why.0, line = %text, "ignoring a gateway access log line");
                self.malformed += 1;
            }
        }
    }

    fn count(&mut self, r: Response) {
        let key = (r.upstream, r.server);
        if !self.servers.contains_key(&key) && self.servers.len() >= MAX_SERVERS {
            // Forget the server that has been silent longest: after a rollout the
            // old revision's servers stop answering and are the ones to go.
            if let Some(oldest) = self.servers.iter().min_by_key(|(_, c)| c.last_round).map(|(k, _)| k.clone()) {
                self.servers.remove(&oldest);
                self.evicted += 1;
            }
        }
        let counts = self.servers.entry(key).or_default();
        counts.last_round = self.round;
        let class = usize::from(r.class.clamp(1, 5)) - 1;
        counts.classes[class] += 1;
        if let Some(seconds) = r.seconds {
            counts.count += 1;
            counts.sum += seconds;
            for (bucket, le) in counts.buckets.iter_mut().zip(BUCKETS) {
                if seconds <= le {
                    *bucket += 1;
                }
            }
        }
    }

    /// Every counter as named samples, in a stable order.
    fn samples(&self) -> Vec<Sample> {
        let sample =
            |name: &str, labels: BTreeMap<String, String>, value: f64| Sample { name: name.to_owned(), labels, value };
        let mut keys: Vec<&(String, String)> = self.servers.keys().collect();
        keys.sort();
        let mut out = Vec::with_capacity(keys.len() * 21 + 2);
        for key in keys {
            let (upstream, server) = key;
            let c = &self.servers[key];
            let labels = |extra: Option<(&str, String)>| {
                let mut l =
                    BTreeMap::from([("upstream".to_owned(), upstream.clone()), ("server".to_owned(), server.clone())]);
                if let Some((k, v)) = extra {
                    l.insert(k.to_owned(), v);
                }
                l
            };
            // Every class from the first response on, zeros included: a rate over a
            // counter that appears only at its first 5xx would miss that 5xx.
            for (i, n) in c.classes.iter().enumerate() {
                let code = format!("{}xx", i + 1);
                out.push(sample("flotilla_gateway_responses_total", labels(Some(("code", code))), *n as f64));
            }
            for (le, n) in BUCKETS.iter().zip(c.buckets) {
                let l = labels(Some(("le", le.to_string())));
                out.push(sample("flotilla_gateway_response_seconds_bucket", l, n as f64));
            }
            let inf = labels(Some(("le", "+Inf".to_owned())));
            out.push(sample("flotilla_gateway_response_seconds_bucket", inf, c.count as f64));
            out.push(sample("flotilla_gateway_response_seconds_sum", labels(None), c.sum));
            out.push(sample("flotilla_gateway_response_seconds_count", labels(None), c.count as f64));
        }
        out.push(sample("flotilla_gateway_log_malformed_lines_total", BTreeMap::new(), self.malformed as f64));
        out.push(sample("flotilla_gateway_log_servers_evicted_total", BTreeMap::new(), self.evicted as f64));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0].value
    }

    #[test]
    fn responses_are_counted_per_server_and_class_with_latency() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flotilla-gateway.log");
        append(&path, "llama 127.0.0.1:1 200 9.0 200\n");
        let mut t = TrafficCounters::new(&path);
        append(
            &path,
            "llama 127.0.0.1:18001 200 0.004 200\n\
             llama 127.0.0.1:18002 502, 200 0.001, 0.3 200\n\
             llama 127.0.0.1:18001 503 0.020 503\n\
             llama 127.0.0.1:18001 - - 499\n\
             - - - - 200\n\
             this is not our format\n",
        );
        let (s, status) = t.sample();
        assert!(status.healthy, "{status:?}");
        let a = [("upstream", "llama"), ("server", "127.0.0.1:18001")];
        let code = |server: &str, code: &str| {
            value(&s, "flotilla_gateway_responses_total", &[("server", server), ("code", code)])
        };
        assert_eq!(code("127.0.0.1:18001", "2xx"), 1.0, "the line before the agent started is not counted");
        assert_eq!(code("127.0.0.1:18001", "5xx"), 1.0);
        assert_eq!(code("127.0.0.1:18001", "4xx"), 1.0, "no upstream status: $status stands for it");
        assert_eq!(code("127.0.0.1:18001", "1xx"), 0.0, "every class is there from the start");
        assert_eq!(code("127.0.0.1:18002", "2xx"), 1.0, "a retried request counts for the last server");
        assert_eq!(code("127.0.0.1:18002", "5xx"), 0.0);
        let bucket = |le: &str| {
            let l: Vec<(&str, &str)> = a.iter().copied().chain([("le", le)]).collect();
            value(&s, "flotilla_gateway_response_seconds_bucket", &l)
        };
        assert_eq!((bucket("0.005"), bucket("0.01"), bucket("0.025"), bucket("+Inf")), (1.0, 1.0, 2.0, 2.0));
        assert_eq!(value(&s, "flotilla_gateway_response_seconds_count", &a), 2.0, "no time measured for the 499");
        assert!((value(&s, "flotilla_gateway_response_seconds_sum", &a) - 0.024).abs() < 1e-9);
        assert_eq!(value(&s, "flotilla_gateway_log_malformed_lines_total", &[]), 1.0);
        assert_eq!(s.len(), 2 * 21 + 2);

        // Cumulative: the next round adds to what was counted.
        append(&path, "llama 127.0.0.1:18001 200 0.004 200\n");
        let (s, _) = t.sample();
        assert_eq!(
            value(&s, "flotilla_gateway_responses_total", &[("server", "127.0.0.1:18001"), ("code", "2xx")]),
            2.0
        );
    }

    #[test]
    fn the_example_nginx_config_logs_in_the_format_parsed_here() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nginx/nginx.conf.example");
        let text = std::fs::read_to_string(example).unwrap();
        assert!(text.contains(&format!("log_format flotilla '{LOG_FORMAT}';")), "log_format drifted from LOG_FORMAT");
        assert!(text.contains("access_log /var/log/nginx/flotilla-gateway.log flotilla;"));
    }

    #[test]
    fn the_longest_silent_server_is_forgotten_past_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        append(&path, "");
        let mut t = TrafficCounters::new(&path);
        let lines: String = (0..MAX_SERVERS).map(|i| format!("old 10.0.0.1:{i} 200 0.1 200\n")).collect();
        append(&path, &lines);
        t.sample();
        append(&path, "old 10.0.0.1:0 200 0.1 200\n");
        t.sample();
        append(&path, "new 10.0.0.2:80 200 0.1 200\n");
        let (s, _) = t.sample();
        assert_eq!(t.servers.len(), MAX_SERVERS);
        assert_eq!(value(&s, "flotilla_gateway_log_servers_evicted_total", &[]), 1.0);
        assert!(t.servers.contains_key(&("old".to_owned(), "10.0.0.1:0".to_owned())), "it answered recently");
        assert!(t.servers.contains_key(&("new".to_owned(), "10.0.0.2:80".to_owned())));
    }

    #[test]
    fn an_unreadable_log_is_a_failing_collector_and_the_counters_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.log");
        let mut t = TrafficCounters::new(&path);
        let (s, status) = t.sample();
        assert!(!status.healthy && status.error.contains("missing.log"), "{status:?}");
        assert_eq!(status.name, "gateway/access_log");
        assert_eq!(s.len(), 2, "the log counters only");
        append(&path, "llama 127.0.0.1:1 200 0.1 200\n");
        let (s, status) = t.sample();
        assert!(status.healthy);
        assert_eq!(s.len(), 21 + 2, "a file that appears later is read from its start");
    }
}
