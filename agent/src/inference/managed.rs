//! Model servers the agent runs itself: every running managed container whose
//! spec has `inference: { port }` (label `flotilla.inference-port`) is scraped
//! like an `[[inference]]` endpoint named after the container, so a rollout's
//! new and old revisions each report `flotilla_inference_*{endpoint="NAME-REV"}`
//! without anyone editing the agent config.
//!
//! The set comes from the container listings the agent makes anyway (at each
//! connect, every `runtime.relist_interval`, after each command that changes
//! containers): each successful listing is published here ([`ManagedServers`]),
//! and the collector picks up the latest at the start of its next round.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use tokio::sync::watch;

use super::engine::Engine;
use crate::runtime::{
    ContainerInfo, ContainerState, HealthState, LABEL_INFERENCE_ENGINE, LABEL_INFERENCE_PORT, Protocol,
};

/// One running container with a model server to scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedServer {
    /// The container name (`NAME-REVISION`): the `endpoint` label of its series.
    pub container: String,
    /// `http://HOST_IP:HOST_PORT` of the published inference port.
    pub url: String,
    /// From `inference.engine`; detected from the page when absent.
    pub engine: Option<Engine>,
    /// The container's health check is still in its start period (the model is
    /// loading): a failing scrape is expected then, not a failing collector.
    pub starting: bool,
}

impl ManagedServer {
    /// The server `c` runs, if it is running and its spec named an inference port.
    pub fn of(c: &ContainerInfo) -> Option<Self> {
        if c.state != ContainerState::Running {
            return None;
        }
        let port: u16 = c.labels.get(LABEL_INFERENCE_PORT)?.parse().ok()?;
        let mut bound: Vec<_> =
            c.ports.iter().filter(|p| p.container_port == port && p.protocol == Protocol::Tcp).collect();
        // IPv4 first, as `ContainerInfo::host_port` does: every engine binds it.
        bound.sort_by_key(|p| !p.host_ip.is_ipv4());
        let Some(binding) = bound.first() else {
            tracing::debug!(container = %c.name, port, "inference port not bound; not scraping it");
            return None;
        };
        // A server published on every address is reached on loopback.
        let ip = match binding.host_ip {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let host = match ip {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        };
        Some(Self {
            container: c.name.clone(),
            url: format!("http://{host}:{}", binding.host_port),
            engine: c.labels.get(LABEL_INFERENCE_ENGINE).and_then(|e| e.parse().ok()),
            starting: c.health == HealthState::Starting,
        })
    }
}

/// The latest set of managed model servers, shared between the listings that
/// publish it and the collector that scrapes it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ManagedServers {
    tx: Arc<watch::Sender<Vec<ManagedServer>>>,
}

impl Default for ManagedServers {
    fn default() -> Self {
        Self { tx: Arc::new(watch::Sender::new(Vec::new())) }
    }
}

impl ManagedServers {
    /// Replaces the set with the servers among `listed` (a whole, successful listing).
    pub fn publish(&self, listed: &[ContainerInfo]) {
        let mut servers: Vec<ManagedServer> = listed.iter().filter_map(ManagedServer::of).collect();
        servers.sort_by(|a, b| a.container.cmp(&b.container));
        self.tx.send_if_modified(|current| {
            let changed = *current != servers;
            if changed {
                *current = servers;
            }
            changed
        });
    }

    /// A receiver for the collector.
    pub fn subscribe(&self) -> watch::Receiver<Vec<ManagedServer>> {
        self.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::runtime::BoundPort;

    fn container(
        name: &str,
        state: ContainerState,
        labels: &[(&str, &str)],
        ports: &[(u16, &str, u16)],
    ) -> ContainerInfo {
        ContainerInfo {
            id: "0".repeat(64),
            name: name.into(),
            image: "x:1".into(),
            deployment: None,
            revision: None,
            spec_hash: None,
            state,
            health: HealthState::None,
            exit_code: None,
            error: None,
            ports: ports
                .iter()
                .map(|(c, ip, h)| BoundPort {
                    container_port: *c,
                    protocol: Protocol::Tcp,
                    host_ip: ip.parse().unwrap(),
                    host_port: *h,
                })
                .collect(),
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>(),
            created_unix_ms: None,
        }
    }

    #[test]
    fn running_containers_with_an_inference_port_are_servers() {
        let port = [(LABEL_INFERENCE_PORT, "8000")];
        let s = ManagedServer::of(&container("a-1", ContainerState::Running, &port, &[(8000, "127.0.0.1", 18001)]))
            .unwrap();
        assert_eq!((s.container.as_str(), s.url.as_str(), s.engine), ("a-1", "http://127.0.0.1:18001", None));
        let everywhere = container(
            "a-2",
            ContainerState::Running,
            &[(LABEL_INFERENCE_PORT, "8000"), (LABEL_INFERENCE_ENGINE, "sglang")],
            &[(8000, "::", 18002), (8000, "0.0.0.0", 18002)],
        );
        let s = ManagedServer::of(&everywhere).unwrap();
        assert_eq!((s.url.as_str(), s.engine), ("http://127.0.0.1:18002", Some(Engine::Sglang)));
        let v6 = container("a-3", ContainerState::Running, &port, &[(8000, "::", 18003)]);
        assert_eq!(ManagedServer::of(&v6).unwrap().url, "http://[::1]:18003");

        for not_a_server in [
            container("b", ContainerState::Exited, &port, &[(8000, "127.0.0.1", 1)]),
            container("c", ContainerState::Running, &[], &[(8000, "127.0.0.1", 1)]),
            container("d", ContainerState::Running, &port, &[(9000, "127.0.0.1", 1)]),
        ] {
            assert_eq!(ManagedServer::of(&not_a_server), None, "{}", not_a_server.name);
        }
    }

    #[test]
    fn a_listing_replaces_the_set_and_wakes_only_on_change() {
        let servers = ManagedServers::default();
        let mut rx = servers.subscribe();
        let port = [(LABEL_INFERENCE_PORT, "8000")];
        let a = container("a-1", ContainerState::Running, &port, &[(8000, "127.0.0.1", 18001)]);
        servers.publish(std::slice::from_ref(&a));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().len(), 1);
        servers.publish(std::slice::from_ref(&a));
        assert!(!rx.has_changed().unwrap(), "the same set again is no change");
        servers.publish(&[]);
        assert!(rx.borrow_and_update().is_empty());
    }
}
