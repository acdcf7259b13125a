//! Trace context across process boundaries: the W3C `traceparent` that flotctl
//! puts in a Fleet request's metadata, that the controller reads there and signs
//! into a command envelope, and that the agent reads back to run the command in
//! a child span. One operator action is then one trace over all three.
//!
//! A `traceparent` from the wire is untrusted text: [`TraceParent::parse`]
//! accepts only the exact version-00 form, and anything else is ignored, never
//! an error. A trace context only links spans; it never changes what runs.

use std::fmt;

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The gRPC metadata key (an HTTP/2 header) that carries a [`TraceParent`].
pub const METADATA_KEY: &str = "traceparent";

/// A validated W3C trace-context `traceparent`:
/// `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`.
#[derive(Clone, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: TraceId,
    span_id: SpanId,
    flags: TraceFlags,
}

impl TraceParent {
    /// Parses `text`, or `None` when it is not a well-formed version-00
    /// `traceparent` with non-zero ids (the W3C rules: lowercase hex, fixed lengths).
    pub fn parse(text: &str) -> Option<Self> {
        let lower_hex =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        // Version 00 is exactly 55 bytes; checking the length first bounds the work on any input.
        if text.len() != 55 {
            return None;
        }
        let mut parts = text.split('-');
        let (Some(version), Some(trace), Some(span), Some(flags), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if version != "00" || !lower_hex(trace, 32) || !lower_hex(span, 16) || !lower_hex(flags, 2) {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok()?;
        let span_id = SpanId::from_hex(span).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        // Only the sampled bit is defined; the others are not passed on.
        Some(Self { trace_id, span_id, flags: TraceFlags::new(flags) & TraceFlags::SAMPLED })
    }

    /// The context of `span`, when spans are being exported (no OTLP endpoint: `None`).
    pub fn of(span: &tracing::Span) -> Option<Self> {
        let context = span.context();
        let span_context = context.span().span_context().clone();
        span_context.is_valid().then(|| Self {
            trace_id: span_context.trace_id(),
            span_id: span_context.span_id(),
            flags: span_context.trace_flags(),
        })
    }

    /// The context of the current span (see [`Self::of`]).
    pub fn current() -> Option<Self> {
        Self::of(&tracing::Span::current())
    }

    /// Makes `span` a child of this remote span. It must be called before the
    /// span is first entered; later, or without an exporter, it does nothing.
    pub fn adopt(&self, span: &tracing::Span) {
        let remote = SpanContext::new(self.trace_id, self.span_id, self.flags, true, TraceState::default());
        // Err only when the span already started or is not exported: then it
        // stays where it is, which is what an unusable context should do.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        self.trace_id.to_string()
    }
}

/// Makes `span` a child of `traceparent` if that parses; otherwise leaves it alone.
pub fn adopt_untrusted(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(parent) = traceparent.and_then(TraceParent::parse) {
        parent.adopt(span);
    }
}

/// Runs `f` under a thread-local subscriber that gives spans OpenTelemetry ids
/// but exports nothing: for tests of propagation.
pub fn with_span_ids<R>(f: impl FnOnce() -> R) -> R {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("test"));
    tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), f)
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags.to_u8())
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_well_formed_traceparent_round_trips() {
        let parent = TraceParent::parse(GOOD).unwrap();
        assert_eq!(parent.to_string(), GOOD);
        assert_eq!(parent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert_eq!(TraceParent::parse(unsampled).unwrap().to_string(), unsampled);
        // Undefined flag bits are dropped, not passed on.
        assert_eq!(
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff").unwrap().to_string(),
            GOOD
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        let long = "0".repeat(100_000);
        for bad in [
            "",
            "garbage",
            &long,
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7+01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1é",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_span_adopts_a_good_parent_and_ignores_a_malformed_one() {
        with_span_ids(|| {
            let parent = TraceParent::parse(GOOD).unwrap();
            let child = tracing::info_span!("child");
            parent.adopt(&child);
            let seen = TraceParent::of(&child).unwrap();
            assert_eq!(seen.trace_id(), parent.trace_id(), "same trace");
            assert_ne!(seen, parent, "its own span id");

            let orphan = tracing::info_span!("orphan");
            adopt_untrusted(&orphan, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g"));
            let own = TraceParent::of(&orphan).unwrap();
            assert_ne!(own.trace_id(), parent.trace_id(), "a malformed parent starts no link");
        });
    }

    #[test]
    fn adopting_a_malformed_or_any_parent_without_an_exporter_is_harmless() {
        let span = tracing::info_span!("test");
        adopt_untrusted(&span, Some("00-nope"));
        adopt_untrusted(&span, None);
        adopt_untrusted(&span, Some(GOOD));
        // No subscriber with the OpenTelemetry layer here: nothing to propagate.
        assert_eq!(TraceParent::of(&span), None);
    }
}
