//! The container report: the containers this agent manages, re-found by label
//! through the runtime driver, in the shape the controller is told about. The
//! uplink sends one in every hello (so a restarted agent reports what it finds),
//! after each command that may change them, and whenever a periodic re-listing
//! ([`Relister`]) finds that they changed on their own. Each successful listing
//! also tells the inference collector which model servers run
//! ([`ManagedServers`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use flotilla_common::model::{Container, ContainerReport};
use flotilla_common::time::now_unix_ms;
use flotilla_proto::Limits;
use tokio::time::Instant;

use crate::inference::ManagedServers;
use crate::runtime::{ContainerInfo, HealthState, Runtime};

/// How long a listing may take before it is reported as unanswered; it runs
/// before every hello, so a hung engine must not hold the connection up long.
pub const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// Lists the managed containers and publishes their model servers to `servers`.
/// A runtime that cannot be asked gives an empty list with the reason, never an
/// error: an agent without a container runtime keeps working (and the servers
/// last published stay: not knowing is not the same as gone).
pub async fn report<R: Runtime>(runtime: &R, timeout: Duration, servers: &ManagedServers) -> ContainerReport {
    // Stamped when the listing starts: what it finds is at least this fresh, so
    // of two reports the later stamp is never the staler one.
    let listed_unix_ms = now_unix_ms();
    let listed = tokio::time::timeout(timeout, runtime.list_managed()).await;
    let (containers, runtime_error) = match listed {
        Ok(Ok(list)) => {
            let list = &list[..list.len().min(Limits::DEFAULT.max_list)];
            servers.publish(list);
            (list.iter().map(container).collect(), None)
        }
        Ok(Err(e)) => (Vec::new(), Some(clamp(&e.to_string()))),
        Err(_) => (Vec::new(), Some(format!("the container runtime did not answer within {}s", timeout.as_secs()))),
    };
    ContainerReport { containers, runtime_error, listed_unix_ms }
}

/// Whether `report` tells the controller something `last` (the report last
/// sent on this stream) did not: a different list or runtime error. A listing
/// older than `last` (a slow one overtaken by a later one) never does.
pub fn is_news(last: Option<&ContainerReport>, report: &ContainerReport) -> bool {
    last.is_none_or(|last| report.listed_unix_ms >= last.listed_unix_ms && !report.same_as(last))
}

/// A listing on its way.
type Listing = Pin<Box<dyn Future<Output = ContainerReport> + Send>>;

/// Lists the managed containers again every `interval` while a stream is open,
/// so that a container that changes on its own (crashes, is OOM-killed, is
/// stopped with `docker stop`) reaches the controller without waiting for a
/// command or a reconnect. It owns no task: the uplink polls [`Relister::next`]
/// as one branch of its `select!`, so it stops with the stream, and a slow
/// listing never holds up heartbeats or telemetry.
pub struct Relister<R> {
    runtime: Arc<R>,
    servers: ManagedServers,
    interval: Duration,
    timeout: Duration,
    /// When the next listing starts.
    due: Instant,
    /// The listing in flight, kept when another `select!` branch wins.
    listing: Option<Listing>,
}

impl<R> std::fmt::Debug for Relister<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relister")
            .field("interval", &self.interval)
            .field("due", &self.due)
            .field("listing", &self.listing.is_some())
            .finish_non_exhaustive()
    }
}

impl<R: Runtime + 'static> Relister<R> {
    /// The first listing is due one `interval` from now: the stream's hello has
    /// just carried a fresh one.
    pub fn new(runtime: Arc<R>, servers: ManagedServers, interval: Duration, timeout: Duration) -> Self {
        Self { runtime, servers, interval, timeout, due: Instant::now() + interval, listing: None }
    }

    /// The next listing, once it is due and done. Cancel-safe: dropped while
    /// waiting, nothing is lost; dropped while listing, the same listing is
    /// resumed by the next call. The next one is due `interval` after this one
    /// ends, so an engine that hangs until the timeout is asked at that pace,
    /// never back to back.
    pub async fn next(&mut self) -> ContainerReport {
        let listing = match &mut self.listing {
            Some(listing) => listing,
            None => {
                tokio::time::sleep_until(self.due).await;
                let (runtime, timeout, servers) = (Arc::clone(&self.runtime), self.timeout, self.servers.clone());
                self.listing.insert(Box::pin(async move { report(runtime.as_ref(), timeout, &servers).await }))
            }
        };
        let report = listing.await;
        self.listing = None;
        self.due = Instant::now() + self.interval;
        report
    }
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
        let r = report(&rt, LIST_TIMEOUT, &ManagedServers::default()).await;
        assert_eq!(r.runtime_error, None);
        let [c] = r.containers.as_slice() else { panic!("one container expected, got {:?}", r.containers) };
        assert_eq!((c.name.as_str(), c.state.as_str(), c.health.as_deref()), ("llama-7", "running", None));
        assert_eq!((c.deployment.as_deref(), c.revision.as_deref()), (Some("llama"), Some("7")));
        assert_eq!(c.id.len(), Container::SHORT_ID_LEN);
        assert_eq!(c.created_unix_ms, Some(1_700_000_000_000));
        let back = ContainerReport::try_from(pb::ContainerReport::from(r.clone())).unwrap();
        assert_eq!(back, r);
    }

    /// With `[runtime] name_prefix`, the controller is told of `llama-7`, never the
    /// engine's `gpu-1.llama-7`, and so are the model server's series (`endpoint`).
    #[tokio::test]
    async fn the_report_and_the_scraped_endpoints_use_names_without_the_prefix() {
        let engine = FakeRuntime::with_images(["x:1"]);
        let (rt, other) = (engine.sharing("gpu-1.", "gpu-1"), engine.sharing("gpu-2.", "gpu-2"));
        let yaml = "name: llama\nrevision: \"7\"\nimage: x:1\nports: [{container: 8000}]\ninference: {port: 8000}\n";
        let spec = ContainerSpec::from_yaml(yaml).unwrap().validate(&[]).unwrap();
        rt.deploy(&spec).await.unwrap();
        other.deploy(&spec).await.unwrap();
        let servers = ManagedServers::default();
        let r = report(&rt, LIST_TIMEOUT, &servers).await;
        let names: Vec<&str> = r.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["llama-7"], "only this agent's container, without the prefix");
        let scraped: Vec<String> = servers.subscribe().borrow().iter().map(|s| s.container.clone()).collect();
        assert_eq!(scraped, ["llama-7"]);
    }

    #[tokio::test]
    async fn an_unreachable_runtime_is_an_empty_list_with_the_reason() {
        let rt = FakeRuntime::default();
        rt.fail_next(
            "list_managed",
            RuntimeError::Engine { op: "list", target: "/nope.sock".into(), status: 500, message: "down".into() },
        );
        let r = report(&rt, LIST_TIMEOUT, &ManagedServers::default()).await;
        assert!(r.containers.is_empty());
        assert!(r.runtime_error.as_deref().is_some_and(|e| e.contains("/nope.sock")), "{r:?}");
    }

    async fn fake_with_llama() -> (Arc<FakeRuntime>, ContainerReport) {
        let rt = Arc::new(FakeRuntime::with_images(["x:1"]));
        let spec =
            ContainerSpec::from_yaml("name: llama\nrevision: \"7\"\nimage: x:1\n").unwrap().validate(&[]).unwrap();
        rt.deploy(&spec).await.unwrap();
        let first = report(rt.as_ref(), LIST_TIMEOUT, &ManagedServers::default()).await;
        (rt, first)
    }

    // The clock is paused: time moves only when every task waits, so the
    // intervals below are exact, whatever the machine's load.

    #[tokio::test(start_paused = true)]
    async fn a_container_stopped_behind_the_agents_back_is_news_within_one_interval() {
        let interval = Duration::from_millis(200);
        let (rt, hello) = fake_with_llama().await;
        let mut relister = Relister::new(Arc::clone(&rt), ManagedServers::default(), interval, LIST_TIMEOUT);
        let start = Instant::now();

        // Unchanged: listed once an interval, and nothing worth sending.
        let again = relister.next().await;
        assert_eq!(start.elapsed(), interval);
        assert!(!is_news(Some(&hello), &again), "{again:?}");

        // `docker stop` by someone else: no command passes through the agent.
        rt.stop("llama-7", Duration::ZERO).await.unwrap();
        let at = Instant::now();
        let stopped = relister.next().await;
        assert_eq!(at.elapsed(), interval);
        assert!(is_news(Some(&again), &stopped));
        assert_eq!(stopped.containers[0].state, "exited");
        let listings = rt.calls().iter().filter(|c| c.starts_with("list_managed")).count();
        assert_eq!(listings, 3, "the hello's listing and two re-listings: {:?}", rt.calls());
    }

    #[tokio::test(start_paused = true)]
    async fn a_relisting_interrupted_by_another_branch_keeps_its_schedule() {
        let (rt, _) = fake_with_llama().await;
        let mut relister =
            Relister::new(Arc::clone(&rt), ManagedServers::default(), Duration::from_millis(300), LIST_TIMEOUT);
        let due = relister.due;
        // Heartbeats win the select! several times before the listing is due.
        for _ in 0..3 {
            tokio::select! {
                _ = relister.next() => panic!("listed before it was due"),
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        assert_eq!(relister.due, due, "losing a select! does not push the listing back");
        assert_eq!(rt.calls().iter().filter(|c| c.starts_with("list_managed")).count(), 1);
        relister.next().await;
        assert!(Instant::now() >= due && relister.due >= due + Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unreachable_runtime_is_news_once_not_every_interval() {
        let (rt, hello) = fake_with_llama().await;
        let mut relister =
            Relister::new(Arc::clone(&rt), ManagedServers::default(), Duration::from_millis(20), LIST_TIMEOUT);
        let down =
            || RuntimeError::Engine { op: "list", target: "/nope.sock".into(), status: 500, message: "down".into() };
        let mut sent = hello;
        let mut news = Vec::new();
        for _ in 0..4 {
            rt.fail_next("list_managed", down());
            let r = relister.next().await;
            if is_news(Some(&sent), &r) {
                news.push(r.clone());
                sent = r;
            }
        }
        assert_eq!(news.len(), 1, "{news:?}");
        assert!(news[0].containers.is_empty() && news[0].runtime_error.is_some());
        // Back again: the containers are news once more.
        let back = relister.next().await;
        assert!(is_news(Some(&sent), &back) && back.runtime_error.is_none());
    }

    #[test]
    fn an_older_listing_is_never_news() {
        let newer = ContainerReport { listed_unix_ms: 20, ..Default::default() };
        let older = ContainerReport { runtime_error: Some("down".into()), listed_unix_ms: 10, ..Default::default() };
        assert!(is_news(None, &older));
        assert!(!is_news(Some(&newer), &older));
        assert!(!is_news(Some(&older), &ContainerReport { listed_unix_ms: 30, ..older.clone() }));
        assert!(is_news(Some(&older), &ContainerReport { listed_unix_ms: 30, ..newer }));
    }

    #[test]
    fn strings_are_clamped_to_what_the_wire_accepts() {
        let long = "é".repeat(200);
        let c = clamp(&long);
        assert!(c.len() <= Limits::DEFAULT.max_string && c.chars().all(|ch| ch == 'é'));
        assert_eq!(clamp("a\nb"), "a b");
    }
}
