//! What the rollout machine sees of the fleet at one moment: which nodes are
//! connected, the containers each reports, which replicas answer `/v1/models`,
//! and the cumulative counters the gates subtract. Built by the driver from the
//! fleet view; pure functions read it.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_common::model::{Container, Sample, TelemetryBatch};

use super::model::{Counters, Histogram, Replica};

/// The gateway's series (written by the agent's gateway role from nginx's access log).
pub const GATEWAY_RESPONSES: &str = "flotilla_gateway_responses_total";
pub const GATEWAY_LATENCY_BUCKET: &str = "flotilla_gateway_response_seconds_bucket";
/// A replica's readiness (`GET /v1/models`) and TTFT, from the agent's scrape of it.
pub const INFERENCE_READY: &str = "flotilla_inference_ready";
pub const TTFT_BUCKET: &str = "flotilla_inference_time_to_first_token_seconds_bucket";

#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub connected: BTreeSet<String>,
    /// The containers each node last reported (absent: not known).
    pub containers: BTreeMap<String, Vec<Container>>,
    /// `flotilla_inference_ready` per (node, endpoint = container name).
    pub ready: BTreeMap<(String, String), bool>,
    pub counters: Counters,
}

/// What is known of one replica's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Ready,
    /// Seen, and not ready: why.
    NotReady(String),
    /// Not known now (its node is not connected, or has not reported since a
    /// controller restart): neither a pass nor a failure of the revision.
    Unknown(String),
}

impl Observation {
    /// [`Health::Ready`] when `replica` is running, healthy by its container
    /// health check when it has one, and ready by the agent's `/v1/models` probe
    /// when the agent scrapes it.
    pub fn health(&self, replica: &Replica) -> Health {
        if !self.connected.contains(&replica.node) {
            return Health::Unknown(format!("node {} is not connected", replica.node));
        }
        let Some(list) = self.containers.get(&replica.node) else {
            return Health::Unknown(format!("node {} has not reported its containers", replica.node));
        };
        match self.seen_health(replica, list) {
            Ok(()) => Health::Ready,
            Err(why) => Health::NotReady(why),
        }
    }

    /// `Ok` when the replica is healthy; otherwise why not (unknown counts as not).
    pub fn replica_health(&self, replica: &Replica) -> Result<(), String> {
        match self.health(replica) {
            Health::Ready => Ok(()),
            Health::NotReady(why) | Health::Unknown(why) => Err(why),
        }
    }

    fn seen_health(&self, replica: &Replica, list: &[Container]) -> Result<(), String> {
        let Some(c) = list.iter().find(|c| c.name == replica.container) else {
            return Err(format!("{} is not on {}", replica.container, replica.node));
        };
        if c.state != "running" {
            return Err(format!("{} on {} is {}", replica.container, replica.node, c.state));
        }
        if let Some(health) = &c.health
            && health != "healthy"
        {
            return Err(format!("{} on {}: health check says {health}", replica.container, replica.node));
        }
        match self.ready.get(&(replica.node.clone(), replica.container.clone())) {
            Some(true) => Ok(()),
            Some(false) => Err(format!("{} on {} does not answer GET /v1/models", replica.container, replica.node)),
            // Not scraped (yet): the container state and health check decide.
            None if c.health.is_some() => Ok(()),
            None => Err(format!("{} on {}: no readiness reading yet", replica.container, replica.node)),
        }
    }
}

/// The readiness of each scraped endpoint of `node` in `batch`.
pub fn readiness(node: &str, batch: &TelemetryBatch, out: &mut BTreeMap<(String, String), bool>) {
    for s in batch.samples.iter().filter(|s| s.name == INFERENCE_READY) {
        if let Some(endpoint) = s.labels.get("endpoint") {
            out.insert((node.to_owned(), endpoint.clone()), s.value >= 1.0);
        }
    }
}

/// Adds the gateway counters of `upstream` found in the gateway node's `batch`.
pub fn gateway_counters(upstream: &str, batch: &TelemetryBatch, out: &mut Counters) {
    for s in batch.samples.iter().filter(|s| s.labels.get("upstream").map(String::as_str) == Some(upstream)) {
        let Some(server) = s.labels.get("server") else { continue };
        if s.name == GATEWAY_RESPONSES {
            let c = out.servers.entry(server.clone()).or_default();
            c.responses += s.value;
            if s.labels.get("code").map(String::as_str) == Some("5xx") {
                c.errors += s.value;
            }
        } else if s.name == GATEWAY_LATENCY_BUCKET {
            let c = out.servers.entry(server.clone()).or_default();
            add_bucket(&mut c.latency, s);
        }
    }
}

/// Adds each endpoint's TTFT buckets found in `node`'s `batch`, keyed `node/endpoint`.
pub fn ttft_counters(node: &str, batch: &TelemetryBatch, out: &mut Counters) {
    for s in batch.samples.iter().filter(|s| s.name == TTFT_BUCKET) {
        let Some(endpoint) = s.labels.get("endpoint") else { continue };
        add_bucket(out.ttft.entry(format!("{node}/{endpoint}")).or_default(), s);
    }
}

/// The key of a replica in [`Counters::ttft`].
pub fn ttft_key(replica: &Replica) -> String {
    format!("{}/{}", replica.node, replica.container)
}

fn add_bucket(h: &mut Histogram, s: &Sample) {
    let Some(le) = s.labels.get("le").and_then(|l| parse_le(l)) else { return };
    if !s.value.is_finite() {
        return;
    }
    match h.buckets.iter_mut().find(|(l, _)| *l == le) {
        Some((_, n)) => *n += s.value,
        None => {
            h.buckets.push((le, s.value));
            h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
    }
}

fn parse_le(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" | "inf" => Some(f64::INFINITY),
        t => t.parse::<f64>().ok().filter(|v| !v.is_nan()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.to_owned(),
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            value,
        }
    }

    #[test]
    fn gateway_and_ttft_series_become_counters() {
        let batch = TelemetryBatch {
            samples: vec![
                sample(GATEWAY_RESPONSES, &[("upstream", "llama"), ("server", "a:1"), ("code", "2xx")], 90.0),
                sample(GATEWAY_RESPONSES, &[("upstream", "llama"), ("server", "a:1"), ("code", "5xx")], 10.0),
                sample(GATEWAY_RESPONSES, &[("upstream", "other"), ("server", "a:1"), ("code", "5xx")], 99.0),
                sample(GATEWAY_LATENCY_BUCKET, &[("upstream", "llama"), ("server", "a:1"), ("le", "+Inf")], 100.0),
                sample(GATEWAY_LATENCY_BUCKET, &[("upstream", "llama"), ("server", "a:1"), ("le", "0.5")], 80.0),
                sample(TTFT_BUCKET, &[("endpoint", "llama-2"), ("model", "m"), ("le", "0.1")], 3.0),
                sample(INFERENCE_READY, &[("endpoint", "llama-2")], 1.0),
            ],
            ..Default::default()
        };
        let mut c = Counters::default();
        gateway_counters("llama", &batch, &mut c);
        ttft_counters("gpu-1", &batch, &mut c);
        let s = &c.servers["a:1"];
        assert_eq!((s.responses, s.errors), (100.0, 10.0));
        assert_eq!(s.latency.buckets, vec![(0.5, 80.0), (f64::INFINITY, 100.0)]);
        assert_eq!(c.ttft["gpu-1/llama-2"].buckets, vec![(0.1, 3.0)]);
        let mut ready = BTreeMap::new();
        readiness("gpu-1", &batch, &mut ready);
        assert!(ready[&("gpu-1".to_owned(), "llama-2".to_owned())]);
    }
}
