//! The last few WARN and ERROR events of this process, kept in memory so that a
//! diagnostics bundle can say what went wrong recently without reading log
//! files. A `tracing_subscriber` layer fills a bounded ring; recording is a
//! lock and a few short strings, and happens only for WARN and above.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};

use serde::Serialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::time::now_unix_ms;

/// How many events the process-wide ring keeps.
pub const CAPACITY: usize = 50;
/// Longest message kept, in bytes; longer ones are cut.
const MAX_MESSAGE: usize = 1024;
/// Longest field value kept, in bytes.
const MAX_VALUE: usize = 256;
/// Most fields kept per event.
const MAX_FIELDS: usize = 16;

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecentEvent {
    pub at_unix_ms: i64,
    /// `WARN` or `ERROR`.
    pub level: String,
    /// The module that logged it.
    pub target: String,
    pub message: String,
    /// The event's other fields, rendered as text.
    pub fields: BTreeMap<String, String>,
}

/// A bounded ring of recent WARN and ERROR events; cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct RecentEvents {
    ring: Arc<Mutex<VecDeque<RecentEvent>>>,
    capacity: usize,
}

static GLOBAL: LazyLock<RecentEvents> = LazyLock::new(|| RecentEvents::new(CAPACITY));

impl RecentEvents {
    /// An empty ring keeping the last `capacity` events.
    pub fn new(capacity: usize) -> Self {
        Self { ring: Arc::new(Mutex::new(VecDeque::with_capacity(capacity))), capacity }
    }

    /// The process-wide ring that [`super::init`] records into.
    pub fn global() -> &'static RecentEvents {
        &GLOBAL
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<RecentEvent>> {
        // Only whole events are pushed: a poisoned lock holds consistent data.
        self.ring.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The recorded events, oldest first.
    pub fn snapshot(&self) -> Vec<RecentEvent> {
        self.lock().iter().cloned().collect()
    }

    fn push(&self, event: RecentEvent) {
        if self.capacity == 0 {
            return;
        }
        let mut ring = self.lock();
        while ring.len() >= self.capacity {
            ring.pop_front();
        }
        ring.push_back(event);
    }

    /// A layer that records this process's WARN and ERROR events here.
    pub fn layer(&self) -> RecentEventsLayer {
        RecentEventsLayer { events: self.clone() }
    }
}

/// The `tracing_subscriber` layer behind [`RecentEvents::layer`].
#[derive(Debug, Clone)]
pub struct RecentEventsLayer {
    events: RecentEvents,
}

impl<S: Subscriber> Layer<S> for RecentEventsLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        // Levels order by verbosity: ERROR is the least, so this keeps WARN and ERROR.
        if *meta.level() > Level::WARN {
            return;
        }
        let mut visitor = Fields::default();
        event.record(&mut visitor);
        self.events.push(RecentEvent {
            at_unix_ms: now_unix_ms(),
            level: meta.level().to_string(),
            target: cut(meta.target(), MAX_VALUE),
            message: visitor.message,
            fields: visitor.fields,
        });
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: BTreeMap<String, String>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.keep(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.keep(field, &format!("{value:?}"));
    }
}

impl Fields {
    fn keep(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = cut(value, MAX_MESSAGE);
        } else if self.fields.len() < MAX_FIELDS {
            self.fields.insert(field.name().to_owned(), cut(value, MAX_VALUE));
        }
    }
}

/// At most `max` bytes of `s`, cut on a character boundary.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn with_ring(capacity: usize, f: impl FnOnce()) -> Vec<RecentEvent> {
        let events = RecentEvents::new(capacity);
        let subscriber = tracing_subscriber::registry().with(events.layer());
        tracing::subscriber::with_default(subscriber, f);
        events.snapshot()
    }

    #[test]
    fn keeps_warnings_and_errors_with_their_fields() {
        let got = with_ring(10, || {
            tracing::info!("not kept");
            tracing::debug!("not kept either");
            tracing::warn!(container = "llama-7", code = 137, "container exited");
            tracing::error!(error = %"disk full", "cannot write the buffer");
        });
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].level.as_str(), got[0].message.as_str()), ("WARN", "container exited"));
        assert_eq!(got[0].fields.get("container").map(String::as_str), Some("llama-7"));
        assert_eq!(got[0].fields.get("code").map(String::as_str), Some("137"));
        assert_eq!(got[1].level, "ERROR");
        assert_eq!(got[1].fields.get("error").map(String::as_str), Some("disk full"));
        assert!(got[1].target.contains("recent"), "{}", got[1].target);
        assert!(got[0].at_unix_ms > 0);
    }

    #[test]
    fn the_ring_is_bounded_and_keeps_the_newest() {
        let got = with_ring(3, || {
            for i in 0..10 {
                tracing::warn!(i, "warning");
            }
        });
        let kept: Vec<&str> = got.iter().map(|e| e.fields["i"].as_str()).collect();
        assert_eq!(kept, ["7", "8", "9"]);
        assert!(with_ring(0, || tracing::warn!("dropped")).is_empty());
    }

    #[test]
    fn long_strings_and_many_fields_are_cut() {
        let long = "é".repeat(1000);
        let got = with_ring(1, || {
            tracing::warn!(
                value = %long, f1 = 1, f2 = 2, f3 = 3, f4 = 4, f5 = 5, f6 = 6, f7 = 7, f8 = 8, f9 = 9,
                f10 = 10, f11 = 11, f12 = 12, f13 = 13, f14 = 14, f15 = 15, f16 = 16, f17 = 17,
                "{long}"
            );
        });
        let e = &got[0];
        assert!(e.message.len() <= MAX_MESSAGE + '…'.len_utf8() && e.message.ends_with('…'));
        assert!(e.fields["value"].len() <= MAX_VALUE + '…'.len_utf8());
        assert_eq!(e.fields.len(), MAX_FIELDS);
    }
}
