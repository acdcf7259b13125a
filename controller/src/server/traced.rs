//! One span per Fleet call, a child of the caller's trace when the request's
//! metadata carries a W3C `traceparent` (flotctl sends one when it exports
//! spans). The span covers the allow-list check and the handler, and is what a
//! signed command's envelope carries on to the agent. A malformed or missing
//! `traceparent` is ignored: the call starts its own trace.

use std::task::{Context, Poll};

use flotilla_common::trace::{METADATA_KEY, adopt_untrusted};
use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;
use tracing::Instrument;
use tracing::instrument::Instrumented;

/// Wraps a service (the Fleet service, outside its allow-list) in per-call spans.
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

impl<S> Traced<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for Traced<S> {
    const NAME: &'static str = S::NAME;
}

/// The span of one call of `path` (`/flotilla.v1.Fleet/ExecCommand`), parented on `traceparent`.
fn call_span(path: &str, traceparent: Option<&str>) -> tracing::Span {
    let method = path.trim_start_matches('/');
    let span = tracing::info_span!("fleet_call", otel.name = method, otel.kind = "server", rpc.system = "grpc",);
    adopt_untrusted(&span, traceparent);
    span
}

impl<S> Service<http::Request<Body>> for Traced<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // A header that is not visible ASCII is no traceparent: ignored.
        let traceparent = request.headers().get(METADATA_KEY).and_then(|v| v.to_str().ok());
        let span = call_span(request.uri().path(), traceparent);
        // Entered while the inner service builds its future, so what it logs there is in the span too.
        let future = span.in_scope(|| self.inner.call(request));
        future.instrument(span)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use flotilla_common::trace::{TraceParent, with_span_ids};

    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// The trace context a handler behind `Traced` runs in, for a request with `header`.
    fn handler_sees(header: Option<&str>) -> Option<TraceParent> {
        let handler = tower::service_fn(|_: http::Request<Body>| async { Ok::<_, Infallible>(TraceParent::current()) });
        let mut request = http::Request::builder().uri("/flotilla.v1.Fleet/ListNodes");
        if let Some(value) = header {
            request = request.header(METADATA_KEY, value);
        }
        let request = request.body(Body::empty()).expect("a valid request");
        futures::executor::block_on(Traced::new(handler).call(request)).expect("infallible")
    }

    #[test]
    fn the_call_joins_the_callers_trace() {
        with_span_ids(|| {
            let seen = handler_sees(Some(GOOD)).expect("the call has a span");
            assert_eq!(seen.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_ne!(seen.to_string(), GOOD, "a child, not the caller's span");
        });
    }

    #[test]
    fn a_malformed_or_missing_traceparent_is_ignored() {
        with_span_ids(|| {
            let long = "f".repeat(10_000);
            for header in [
                None,
                Some(""),
                Some("00-zz"),
                Some(long.as_str()),
                Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            ] {
                let seen = handler_sees(header).expect("the call still has its own span");
                assert_ne!(seen.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736", "{header:?}");
            }
        });
    }
}
