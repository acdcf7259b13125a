//! The container report: what an agent says about the containers it manages.
//! Validated like the rest of the wire input: bounded counts and strings, known
//! state names, ids that are short hex.

use flotilla_common::model::{Container, ContainerReport};

use super::{Limits, WireError, check_len, check_str, err};
use crate::pb;

/// Empty strings on the wire mean "absent".
fn optional(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl TryFrom<pb::ContainerReport> for ContainerReport {
    type Error = WireError;
    fn try_from(w: pb::ContainerReport) -> Result<Self, WireError> {
        let l = Limits::DEFAULT;
        check_len("containers", w.containers.len(), l.max_list)?;
        check_str("containers.runtime_error", &w.runtime_error, &l)?;
        let containers = w
            .containers
            .into_iter()
            .enumerate()
            .map(|(i, c)| container_from_wire(i, c, &l))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ContainerReport {
            containers,
            runtime_error: optional(w.runtime_error),
            listed_unix_ms: w.listed_unix_ms.max(0),
        })
    }
}

fn container_from_wire(i: usize, c: pb::Container, l: &Limits) -> Result<Container, WireError> {
    let field = |name: &str| format!("containers[{i}].{name}");
    for (name, value) in
        [("name", &c.name), ("image", &c.image), ("deployment", &c.deployment), ("revision", &c.revision)]
    {
        check_str(&field(name), value, l)?;
    }
    if c.name.is_empty() {
        return Err(err(field("name"), "empty"));
    }
    if c.id.len() > Container::SHORT_ID_LEN || !c.id.chars().all(|ch| ch.is_ascii_hexdigit()) {
        return Err(err(
            field("id"),
            format!("{:?} is not a short container id (at most {} hex digits)", c.id, Container::SHORT_ID_LEN),
        ));
    }
    if !Container::STATES.contains(&c.state.as_str()) {
        return Err(err(field("state"), format!("unknown state {:?}", truncated(&c.state))));
    }
    if !c.health.is_empty() && !Container::HEALTHS.contains(&c.health.as_str()) {
        return Err(err(field("health"), format!("unknown health {:?}", truncated(&c.health))));
    }
    if c.created_unix_ms < 0 {
        return Err(err(field("created_unix_ms"), format!("{} is before 1970", c.created_unix_ms)));
    }
    Ok(Container {
        name: c.name,
        id: c.id,
        image: c.image,
        state: c.state,
        health: optional(c.health),
        deployment: optional(c.deployment),
        revision: optional(c.revision),
        created_unix_ms: (c.created_unix_ms > 0).then_some(c.created_unix_ms),
    })
}

/// At most 32 characters of an untrusted string, for an error message.
fn truncated(s: &str) -> String {
    s.chars().take(32).collect()
}

impl From<ContainerReport> for pb::ContainerReport {
    fn from(d: ContainerReport) -> Self {
        pb::ContainerReport {
            containers: d.containers.into_iter().map(Into::into).collect(),
            runtime_error: d.runtime_error.unwrap_or_default(),
            listed_unix_ms: d.listed_unix_ms,
        }
    }
}

impl From<Container> for pb::Container {
    fn from(c: Container) -> Self {
        pb::Container {
            name: c.name,
            id: c.id,
            image: c.image,
            state: c.state,
            health: c.health.unwrap_or_default(),
            deployment: c.deployment.unwrap_or_default(),
            revision: c.revision.unwrap_or_default(),
            created_unix_ms: c.created_unix_ms.unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> ContainerReport {
        ContainerReport {
            containers: vec![Container {
                name: "llama-7".into(),
                id: "0123456789ab".into(),
                image: "vllm/vllm-openai:v0.8.5".into(),
                state: "running".into(),
                health: Some("healthy".into()),
                deployment: Some("llama".into()),
                revision: Some("7".into()),
                created_unix_ms: Some(1_700_000_000_000),
            }],
            runtime_error: None,
            listed_unix_ms: 1_700_000_001_000,
        }
    }

    #[test]
    fn a_report_round_trips() {
        let r = report();
        assert_eq!(ContainerReport::try_from(pb::ContainerReport::from(r.clone())).unwrap(), r);
        let unreachable = ContainerReport {
            containers: vec![],
            runtime_error: Some("no engine at /var/run/docker.sock".into()),
            listed_unix_ms: 5,
        };
        assert_eq!(ContainerReport::try_from(pb::ContainerReport::from(unreachable.clone())).unwrap(), unreachable);
        let bare = Container { name: "x".into(), state: "exited".into(), ..Default::default() };
        let w = pb::ContainerReport { containers: vec![bare.clone().into()], ..Default::default() };
        assert_eq!(ContainerReport::try_from(w).unwrap().containers, vec![bare]);
    }

    #[test]
    fn malformed_reports_are_refused_with_the_field() {
        let refused = |edit: fn(&mut pb::ContainerReport)| {
            let mut w = pb::ContainerReport::from(report());
            edit(&mut w);
            ContainerReport::try_from(w).unwrap_err()
        };
        assert!(refused(|w| w.containers = vec![w.containers[0].clone(); 513]).problem.contains("at most 512"));
        assert_eq!(refused(|w| w.containers[0].id = "0123456789abc".into()).field, "containers[0].id");
        assert_eq!(refused(|w| w.containers[0].id = "not-hex".into()).field, "containers[0].id");
        assert_eq!(refused(|w| w.containers[0].state = "on fire".into()).field, "containers[0].state");
        assert_eq!(refused(|w| w.containers[0].health = "meh".into()).field, "containers[0].health");
        assert_eq!(refused(|w| w.containers[0].name = String::new()).field, "containers[0].name");
        assert_eq!(refused(|w| w.containers[0].image = "i".repeat(300)).field, "containers[0].image");
        assert_eq!(refused(|w| w.containers[0].deployment = "a\nb".into()).field, "containers[0].deployment");
        assert_eq!(refused(|w| w.containers[0].created_unix_ms = -1).field, "containers[0].created_unix_ms");
        assert_eq!(refused(|w| w.runtime_error = "e".repeat(300)).field, "containers.runtime_error");
    }
}
