//! An in-memory [`Runtime`] for unit tests of the code that drives containers (the
//! command executor): the same idempotency rules as [`super::DockerRuntime`], a log
//! of calls, and injectable failures. Test builds only.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use super::info::{BoundPort, ContainerInfo, ContainerState, HealthState, LogLine, LogStream};
use super::render::{LABEL_DEPLOYMENT, LABEL_MANAGED, LABEL_REVISION, LABEL_SPEC_HASH};
use super::{RemoveMode, Runtime, RuntimeError, ValidatedSpec};

/// The fake engine; every container it "runs" lives in a map.
#[derive(Debug, Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
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

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has already failed.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next call of `op` (`"deploy"`, `"stop"`, …) fails with `error`.
    pub fn fail_next(&self, op: &'static str, error: RuntimeError) {
        self.lock().failures.insert(op, error);
    }

    /// Sets a container's health, as the engine's health check would.
    pub fn set_health(&self, container: &str, health: HealthState) {
        if let Some(c) = self.lock().containers.get_mut(container) {
            c.health = health;
        }
    }

    /// Lines `logs` returns for `container`.
    pub fn set_logs(&self, container: &str, lines: &[&str]) {
        let lines = lines.iter().map(|t| LogLine { stream: LogStream::Stdout, text: (*t).to_owned() }).collect();
        self.lock().logs.insert(container.to_owned(), lines);
    }

    /// Every call so far, as `"op target"`.
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

fn find<'a>(state: &'a mut State, container: &str) -> Result<&'a mut ContainerInfo, RuntimeError> {
    let name = state.containers.iter().find(|(_, c)| c.id == container).map(|(n, _)| n.clone());
    let name = name.unwrap_or_else(|| container.to_owned());
    state.containers.get_mut(&name).ok_or_else(|| RuntimeError::NotFound { container: container.to_owned() })
}

fn run(c: &mut ContainerInfo, has_health: bool) {
    c.state = ContainerState::Running;
    c.exit_code = None;
    c.health = if has_health { HealthState::Starting } else { HealthState::None };
}

impl Runtime for FakeRuntime {
    async fn deploy(&self, spec: &ValidatedSpec) -> Result<ContainerInfo, RuntimeError> {
        let name = spec.container_name();
        let mut state = self.enter("deploy", &name)?;
        let hash = spec.spec_hash();
        if let Some(existing) = state.containers.get_mut(&name) {
            let ours = existing.deployment.as_deref() == Some(spec.name.as_str())
                && existing.revision.as_deref() == Some(spec.revision.as_str());
            let same = existing.spec_hash.as_deref() == Some(hash.as_str());
            match (ours, existing.state.is_up(), same) {
                (false, ..) => return Err(RuntimeError::NameConflict { name, message: "not ours".into() }),
                (true, true, true) => return Ok(existing.clone()),
                (true, true, false) => {
                    return Err(RuntimeError::RevisionConflict {
                        deployment: spec.name.clone(),
                        revision: spec.revision.clone(),
                        container: name,
                    });
                }
                (true, false, true) => {
                    run(existing, spec.health.is_some());
                    return Ok(existing.clone());
                }
                (true, false, false) => {
                    state.containers.remove(&name);
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
        let mut labels = spec.labels.clone();
        labels.insert(LABEL_MANAGED.into(), "true".into());
        labels.insert(LABEL_DEPLOYMENT.into(), spec.name.clone());
        labels.insert(LABEL_REVISION.into(), spec.revision.clone());
        labels.insert(LABEL_SPEC_HASH.into(), hash.clone());
        let mut info = ContainerInfo {
            id,
            name: name.clone(),
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
        state.containers.insert(name, info.clone());
        Ok(info)
    }

    async fn stop(&self, container: &str, _timeout: Duration) -> Result<ContainerInfo, RuntimeError> {
        let mut state = self.enter("stop", container)?;
        let c = find(&mut state, container)?;
        if c.state.is_up() {
            c.state = ContainerState::Exited;
            c.exit_code = Some(0);
            c.health = if c.health == HealthState::None { HealthState::None } else { HealthState::Unhealthy };
        }
        Ok(c.clone())
    }

    async fn restart(&self, container: &str, _timeout: Duration) -> Result<ContainerInfo, RuntimeError> {
        let mut state = self.enter("restart", container)?;
        let c = find(&mut state, container)?;
        let has_health = c.health != HealthState::None;
        run(c, has_health);
        Ok(c.clone())
    }

    async fn remove(&self, container: &str, mode: RemoveMode) -> Result<(), RuntimeError> {
        let mut state = self.enter("remove", container)?;
        let Ok(c) = find(&mut state, container) else { return Ok(()) };
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
        let mut state = self.enter("logs", container)?;
        let name = find(&mut state, container)?.name.clone();
        let lines = state.logs.get(&name).cloned().unwrap_or_default();
        Ok(lines[lines.len().saturating_sub(tail)..].to_vec())
    }

    async fn inspect(&self, container: &str) -> Result<ContainerInfo, RuntimeError> {
        let mut state = self.enter("inspect", container)?;
        find(&mut state, container).map(|c| c.clone())
    }

    async fn list_managed(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let state = self.enter("list_managed", "")?;
        Ok(state
            .containers
            .values()
            .filter(|c| c.labels.get(LABEL_MANAGED).is_some_and(|v| v == "true"))
            .cloned()
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
}
