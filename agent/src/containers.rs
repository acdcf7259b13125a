//! The container report: the containers this agent manages, re-found by label
//! through the runtime driver, in the shape the controller is told about. The
//! uplink sends one in every hello (so a restarted agent reports what it finds)
//! and again after each command that may change them.

use std::time::Duration;

use flotilla_common::model::{Container, ContainerReport};
use flotilla_common::time::now_unix_ms;
use flotilla_proto::Limits;

use crate::runtime::{ContainerInfo, HealthState, Runtime};

/// How long a listing may take before it is reported as unanswered; it runs
/// before every hello, so a hung engine must not hold the connection up long.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// Lists the managed containers. A runtime that cannot be asked gives an empty
/// list with the reason, never an error: an agent without a container runtime
/// keeps working.
pub async fn report<R: Runtime>(runtime: &R, timeout: Duration) -> ContainerReport {
    // Stamped when the listing starts: what it finds is at least this fresh, so
    // of two reports the later stamp is never the staler one.
    let listed_unix_ms = now_unix_ms();
    let listed = tokio::time::timeout(timeout, runtime.list_managed()).await;
    let (containers, runtime_error) = match listed {
        Ok(Ok(list)) => (list.iter().take(Limits::DEFAULT.max_list).map(container).collect(), None),
        Ok(Err(e)) => (Vec::new(), Some(clamp(&e.to_string()))),
        Err(_) => (Vec::new(), Some(format!("the container runtime did not answer within {}s", timeout.as_secs()))),
    };
    ContainerReport { containers, runtime_error, listed_unix_ms }
}

fn container(c: &ContainerInfo) -> Container {
    Container {
        name: clamp(&c.name),
        id: c.id.chars().filter(char::is_ascii_hexdigit).take(Container::SHORT_ID_LEN).collect(),
        image: clamp(&c.image),
        state: c.state.as_str().to_owned(),
        health: match c.health {
            HealthState::None => None,
            other => Some(other.as_str().to_owned()),
        },
        deployment: c.deployment.as_deref().map(clamp),
        revision: c.revision.as_deref().map(clamp),
        created_unix_ms: c.created_unix_ms.filter(|ms| *ms > 0),
    }
}

/// A string the controller accepts: no control characters, at most the wire's
/// string limit (cut on a character boundary). The controller refuses a whole
/// hello over one bad string, so the agent makes sure of it here.
fn clamp(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(Limits::DEFAULT.max_string));
    for c in s.chars().map(|c| if c.is_control() { ' ' } else { c }) {
        if out.len() + c.len_utf8() > Limits::DEFAULT.max_string {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use flotilla_proto::pb;

    use super::*;
    use crate::runtime::fake::FakeRuntime;
    use crate::runtime::{ContainerSpec, RuntimeError};

    #[tokio::test]
    async fn managed_containers_are_reported_in_a_shape_the_controller_accepts() {
        let rt = FakeRuntime::with_images(["x:1"]);
        let spec =
            ContainerSpec::from_yaml("name: llama\nrevision: \"7\"\nimage: x:1\n").unwrap().validate(&[]).unwrap();
        rt.deploy(&spec).await.unwrap();
        let r = report(&rt, LIST_TIMEOUT).await;
        assert_eq!(r.runtime_error, None);
        let [c] = r.containers.as_slice() else { panic!("one container expected, got {:?}", r.containers) };
        assert_eq!((c.name.as_str(), c.state.as_str(), c.health.as_deref()), ("llama-7", "running", None));
        assert_eq!((c.deployment.as_deref(), c.revision.as_deref()), (Some("llama"), Some("7")));
        assert_eq!(c.id.len(), Container::SHORT_ID_LEN);
        assert_eq!(c.created_unix_ms, Some(1_700_000_000_000));
        let back = ContainerReport::try_from(pb::ContainerReport::from(r.clone())).unwrap();
        assert_eq!(back, r);
    }

    #[tokio::test]
    async fn an_unreachable_runtime_is_an_empty_list_with_the_reason() {
        let rt = FakeRuntime::default();
        rt.fail_next(
            "list_managed",
            RuntimeError::Engine { op: "list", target: "/nope.sock".into(), status: 500, message: "down".into() },
        );
        let r = report(&rt, LIST_TIMEOUT).await;
        assert!(r.containers.is_empty());
        assert!(r.runtime_error.as_deref().is_some_and(|e| e.contains("/nope.sock")), "{r:?}");
    }

    #[test]
    fn strings_are_clamped_to_what_the_wire_accepts() {
        let long = "é".repeat(200);
        let c = clamp(&long);
        assert!(c.len() <= Limits::DEFAULT.max_string && c.chars().all(|ch| ch == 'é'));
        assert_eq!(clamp("a\nb"), "a b");
    }
}
