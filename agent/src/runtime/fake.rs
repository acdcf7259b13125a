//! An in-memory [`Runtime`] for unit tests of the code that drives containers (the
//! command executor): the same idempotency and naming rules as
//! [`super::DockerRuntime`], a log of calls, and injectable failures. Several fakes
//! can share one engine ([`FakeRuntime::sharing`]), as several agents share one
//! Docker engine in the end-to-end tests. Test builds only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use flotilla_common::NodeId;

use super::info::{BoundPort, ContainerInfo, ContainerState, HealthState, LogLine, LogStream};
use super::names::NamePrefix;
use super::render::LABEL_MANAGED;
use super::{RemoveMode, Runtime, RuntimeError, ValidatedSpec};

/// One agent's runtime over a fake engine; every container the engine "runs"
/// lives in a map, by the engine's name.
#[derive(Debug, Default)]
pub struct FakeRuntime {
    engine: Arc<Mutex<State>>,
    /// As `[runtime] name_prefix`.
    prefix: NamePrefix,
    /// As the node id the agent sets.
    node: Option<NodeId>,
}

#[derive(Debug, Default)]
struct State {
    images: BTreeSet<String>,
    /// By container name.
    containers: BTreeMap<String, ContainerInfo>,
    logs: HashMap<String, Vec<LogLine>>,
    failures: HashMap<&'static str, RuntimeError>,
    calls: Vec<String>,
    next_id: u64,
}

impl FakeRuntime {
    /// A fake engine holding `images`.
    pub fn with_images<'a>(images: impl IntoIterator<Item = &'a str>) -> Self {
        let fake = Self::default();
        fake.lock().images.extend(images.into_iter().map(str::to_owned));
        fake
    }

    /// Another agent's runtime on this fake's engine, naming its containers with
    /// `prefix` and labelling them with `node`.
    pub fn sharing(&self, prefix: &str, node: &str) -> Self {
        Self { engine: Arc::clone(&self.engine), ..Self::default().named(prefix, node) }
    }

    /// This runtime with `[runtime] name_prefix = prefix` on the agent `node`.
    pub fn named(self, prefix: &str, node: &str) -> Self {
        let prefix = NamePrefix::new(prefix).expect("a valid prefix in a test");
        Self { prefix, node: Some(NodeId::new(node).expect("a valid node id in a test")), ..self }
    }

    /// The engine's names of every container it holds, whoever made them.
    pub fn engine_names(&self) -> Vec<String> {
        self.lock().containers.keys().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has already failed.
        self.engine.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next call of `op` (`"deploy"`, `"stop"`, …) fails with `error`.
    pub fn fail_next(&self, op: &'static str, error: RuntimeError) {
        self.lock().failures.insert(op, error);
    }

    /// Sets a container's health (by the engine's name), as the engine's health check would.
    pub fn set_health(&self, container: &str, health: HealthState) {
        if let Some(c) = self.lock().containers.get_mut(container) {
            c.health = health;
        }
    }

    /// Lines `logs` returns for `container` (the engine's name).
    pub fn set_logs(&self, container: &str, lines: &[&str]) {
        let lines = lines.iter().map(|t| LogLine { stream: LogStream::Stdout, text: (*t).to_owned() }).collect();
        self.lock().logs.insert(container.to_owned(), lines);
    }

    /// Every call the engine had so far, from any runtime sharing it, as `"op
    /// target"` with the engine's name for the target.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Records the call and returns an injected failure, if any.
    fn enter(&self, op: &'static str, target: &str) -> Result<MutexGuard<'_, State>, RuntimeError> {
        let mut state = self.lock();
        state.calls.push(format!("{op} {target}"));
        match state.failures.remove(op) {
            Some(error) => Err(error),
            None => Ok(state),
        }
    }
}

/// The container the engine knows as `target` (a name or an id); a missing one is
/// reported as `shown`, the name the agent asked for.
fn find<'a>(state: &'a mut State, target: &str, shown: &str) -> Result<&'a mut ContainerInfo, RuntimeError> {
    let name = state.containers.iter().find(|(_, c)| c.id == target).map(|(n, _)| n.clone());
    let name = name.unwrap_or_else(|| target.to_owned());
    state.containers.get_mut(&name).ok_or_else(|| RuntimeError::NotFound { container: shown.to_owned() })
}

fn run(c: &mut ContainerInfo, has_health: bool) {
    c.state = ContainerState::Running;
    c.exit_code = None;
    c.health = if has_health { HealthState::Starting } else { HealthState::None };
}

impl Runtime for FakeRuntime {
    async fn deploy(&self, spec: &ValidatedSpec) -> Result<ContainerInfo, RuntimeError> {
        let name = spec.container_name();
        let engine_name = self.prefix.to_engine(&name);
        let mut state = self.enter("deploy", &engine_name)?;
        let hash = spec.spec_hash();
        if let Some(existing) = state.containers.get_mut(&engine_name) {
            let ours = existing.deployment.as_deref() == Some(spec.name.as_str())
                && existing.revision.as_deref() == Some(spec.revision.as_str());
            let same = existing.spec_hash.as_deref() == Some(hash.as_str());
            match (ours, existing.state.is_up(), same) {
                (false, ..) => return Err(RuntimeError::NameConflict { name, message: "not ours".into() }),
                (true, true, true) => return Ok(self.prefix.agent_view(existing.clone())),
                (true, true, false) => {
                    return Err(RuntimeError::RevisionConflict {
                        deployment: spec.name.clone(),
                        revision: spec.revision.clone(),
                        container: name,
                    });
                }
                (true, false, true) => {
                    run(existing, spec.health.is_some());
                    return Ok(self.prefix.agent_view(existing.clone()));
                }
                (true, false, false) => {
                    state.containers.remove(&engine_name);
                }
            }
        }
        if !state.images.contains(&spec.image) {
            return Err(RuntimeError::ImageNotPresent { image: spec.image.clone() });
        }
        state.next_id += 1;
        let id = format!("{:064x}", state.next_id);
        let ports = spec
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| BoundPort {
                container_port: u16::try_from(p.container).unwrap_or_default(),
                protocol: p.protocol,
                host_ip: p.host_ip,
                // Stands in for the engine's choice when the spec leaves it open.
                host_port: p.host.and_then(|h| u16::try_from(h).ok()).unwrap_or(32768 + i as u16),
            })
            .collect();
        let labels = super::render::labels(spec, self.node.as_ref());
        let mut info = ContainerInfo {
            id,
            name: engine_name.clone(),
            image: spec.image.clone(),
            deployment: Some(spec.name.clone()),
            revision: Some(spec.revision.clone()),
            spec_hash: Some(hash),
            state: ContainerState::Created,
            health: HealthState::None,
            exit_code: None,
            error: None,
            ports,
            labels,
            created_unix_ms: Some(1_700_000_000_000),
        };
        run(&mut info, spec.health.is_some());
        state.containers.insert(engine_name, info.clone());
        Ok(self.prefix.agent_view(info))
    }

    async fn stop(&self, container: &str, _timeout: Duration) -> Result<ContainerInfo, RuntimeError> {
        let target = self.prefix.to_engine(container);
        let mut state = self.enter("stop", &target)?;
        let c = find(&mut state, &target, container)?;
        if c.state.is_up() {
            c.state = ContainerState::Exited;
            c.exit_code = Some(0);
            c.health = if c.health == HealthState::None { HealthState::None } else { HealthState::Unhealthy };
        }
        Ok(self.prefix.agent_view(c.clone()))
    }

    async fn restart(&self, container: &str, _timeout: Duration) -> Result<ContainerInfo, RuntimeError> {
        let target = self.prefix.to_engine(container);
        let mut state = self.enter("restart", &target)?;
        let c = find(&mut state, &target, container)?;
        let has_health = c.health != HealthState::None;
        run(c, has_health);
        Ok(self.prefix.agent_view(c.clone()))
    }

    async fn remove(&self, container: &str, mode: RemoveMode) -> Result<(), RuntimeError> {
        let target = self.prefix.to_engine(container);
        let mut state = self.enter("remove", &target)?;
        let Ok(c) = find(&mut state, &target, container) else { return Ok(()) };
        if c.state.is_up() && mode == RemoveMode::IfStopped {
            return Err(RuntimeError::Engine {
                op: "remove",
                target: container.to_owned(),
                status: 409,
                message: "cannot remove a running container".into(),
            });
        }
        let name = c.name.clone();
        state.containers.remove(&name);
        Ok(())
    }

    async fn logs(&self, container: &str, tail: usize) -> Result<Vec<LogLine>, RuntimeError> {
        let target = self.prefix.to_engine(container);
        let mut state = self.enter("logs", &target)?;
        let name = find(&mut state, &target, container)?.name.clone();
        let lines = state.logs.get(&name).cloned().unwrap_or_default();
        Ok(lines[lines.len().saturating_sub(tail)..].to_vec())
    }

    async fn inspect(&self, container: &str) -> Result<ContainerInfo, RuntimeError> {
        let target = self.prefix.to_engine(container);
        let mut state = self.enter("inspect", &target)?;
        find(&mut state, &target, container).map(|c| self.prefix.agent_view(c.clone()))
    }

    async fn list_managed(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let state = self.enter("list_managed", "")?;
        Ok(state
            .containers
            .values()
            .filter(|c| c.labels.get(LABEL_MANAGED).is_some_and(|v| v == "true"))
            .filter_map(|c| self.prefix.claim(self.node.as_ref(), c.clone()))
            .collect())
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        Ok(self.enter("image_present", image)?.images.contains(image))
    }

    async fn ping(&self) -> Result<(), RuntimeError> {
        self.enter("ping", "").map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ContainerSpec;

    fn spec(revision: &str, env: &str) -> ValidatedSpec {
        let yaml =
            format!("name: m\nrevision: '{revision}'\nimage: img:1\nenv: {{A: '{env}'}}\nports: [{{container: 80}}]\n");
        ContainerSpec::from_yaml(&yaml).unwrap().validate(&[]).unwrap()
    }

    #[tokio::test]
    async fn the_fake_keeps_the_runtime_contract() {
        let rt = FakeRuntime::with_images(["img:1"]);
        let first = rt.deploy(&spec("1", "a")).await.unwrap();
        assert_eq!((first.name.as_str(), first.state), ("m-1", ContainerState::Running));
        assert_eq!(first.host_port(80), Some(32768));
        assert_eq!(rt.deploy(&spec("1", "a")).await.unwrap().id, first.id, "deploy is idempotent");
        assert!(matches!(rt.deploy(&spec("1", "b")).await, Err(RuntimeError::RevisionConflict { .. })));
        assert_eq!(rt.list_managed().await.unwrap().len(), 1);

        assert_eq!(rt.stop("m-1", Duration::from_secs(1)).await.unwrap().exit_code, Some(0));
        let replaced = rt.deploy(&spec("1", "b")).await.unwrap();
        assert_ne!(replaced.id, first.id, "a stopped container of another spec is replaced");
        assert!(matches!(rt.remove("m-1", RemoveMode::IfStopped).await, Err(RuntimeError::Engine { status: 409, .. })));
        rt.remove(&replaced.id, RemoveMode::Force).await.unwrap();
        rt.remove("m-1", RemoveMode::Force).await.unwrap();
        assert!(matches!(rt.inspect("m-1").await, Err(RuntimeError::NotFound { .. })));

        let missing =
            ContainerSpec::from_yaml("name: m\nrevision: '2'\nimage: other:1\n").unwrap().validate(&[]).unwrap();
        assert!(matches!(rt.deploy(&missing).await, Err(RuntimeError::ImageNotPresent { .. })));
        rt.fail_next("ping", RuntimeError::NotFound { container: "x".into() });
        assert!(rt.ping().await.is_err());
        rt.ping().await.unwrap();
        assert_eq!(rt.calls().first().map(String::as_str), Some("deploy m-1"));
    }

    /// Three agents on one engine, as in the end-to-end tests: each deploys revision
    /// 1 of the same deployment, and each sees and acts on its own container only,
    /// by the name the controller knows (`m-1`).
    #[tokio::test]
    async fn agents_sharing_an_engine_keep_to_their_own_containers() {
        let engine = FakeRuntime::with_images(["img:1"]);
        let a = engine.sharing("gpu-1.", "gpu-1");
        let b = engine.sharing("gpu-2.", "gpu-2");
        let a_info = a.deploy(&spec("1", "a")).await.unwrap();
        let b_info = b.deploy(&spec("1", "a")).await.unwrap();
        assert_ne!(a_info.id, b_info.id, "no name collision: two containers");
        assert_eq!((a_info.name.as_str(), b_info.name.as_str()), ("m-1", "m-1"), "told of without the prefix");
        assert_eq!(a_info.labels[crate::runtime::LABEL_NODE], "gpu-1");
        // An agent without a prefix has the engine to itself, as before: it lists
        // every managed container, by the engine's names.
        engine.deploy(&spec("1", "a")).await.unwrap();
        assert_eq!(engine.engine_names(), ["gpu-1.m-1", "gpu-2.m-1", "m-1"]);

        let listed = a.list_managed().await.unwrap();
        assert_eq!(
            listed.iter().map(|c| (c.name.as_str(), c.id.as_str())).collect::<Vec<_>>(),
            [("m-1", a_info.id.as_str())]
        );
        let unprefixed: Vec<String> = engine.list_managed().await.unwrap().into_iter().map(|c| c.name).collect();
        assert_eq!(unprefixed, ["gpu-1.m-1", "gpu-2.m-1", "m-1"]);

        let stopped = b.stop("m-1", Duration::ZERO).await.unwrap();
        assert_eq!((stopped.id.as_str(), stopped.name.as_str()), (b_info.id.as_str(), "m-1"));
        assert!(engine.calls().contains(&"stop gpu-2.m-1".to_owned()), "{:?}", engine.calls());
        assert_eq!(a.inspect("m-1").await.unwrap().state, ContainerState::Running, "a's container is untouched");
        let missing = a.inspect("m-2").await.unwrap_err().to_string();
        assert!(missing.contains("\"m-2\"") && !missing.contains("gpu-1."), "{missing}");
        // Another agent's container cannot be reached by its engine name either.
        assert!(matches!(a.stop("gpu-2.m-1", Duration::ZERO).await, Err(RuntimeError::NotFound { .. })));
        b.remove("m-1", RemoveMode::Force).await.unwrap();
        assert_eq!(engine.engine_names(), ["gpu-1.m-1", "m-1"]);
    }

    /// One prefix may begin another (`gpu-1.` and `gpu-1.0.`): the node label keeps
    /// the shorter one's agent from claiming the other's containers.
    #[tokio::test]
    async fn a_prefix_that_begins_another_does_not_claim_its_containers() {
        let engine = FakeRuntime::with_images(["img:1"]);
        let short = engine.sharing("gpu-1.", "gpu-1");
        let long = engine.sharing("gpu-1.0.", "gpu-1-0");
        long.deploy(&spec("1", "a")).await.unwrap();
        assert!(short.list_managed().await.unwrap().is_empty());
        assert_eq!(long.list_managed().await.unwrap()[0].name, "m-1");
    }
}
