//! The request limits in front of every gRPC service, as tower layers assembled
//! in one place ([`layers`]): a bound on status messages, a per-client rate
//! limit keyed by the caller's certificate identity, global load shedding, and
//! a request timeout. Every refusal is a gRPC status that says which limit was
//! hit and when to retry.
//!
//! The limits count requests (RPCs), not the messages of a running stream: an
//! agent's telemetry is paced by the committer's queue, a watcher's by the feed.
//! Connection-level limits (handshakes, HTTP/2 streams and headers, message
//! size) are set on the listener and the tonic server builder in `server.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::layer::util::{Identity, Stack};
use tower::{Layer, Service, ServiceBuilder};

use crate::config::Limits;
use crate::metrics::Metrics;

/// The stack [`layers`] builds (tower nests it innermost first).
pub type Layers =
    ServiceBuilder<Stack<TimeoutLayer, Stack<ShedLayer, Stack<RateLimitLayer, Stack<BoundMessagesLayer, Identity>>>>>;

/// Builds the request limits from `[limits]`; tonic applies them to every service.
pub fn layers(limits: &Limits, metrics: &Metrics) -> Layers {
    ServiceBuilder::new()
        // Outermost, status messages are cut to size: a refusal quoting a huge input would exceed the client's header limit and take its whole connection down.
        .layer(BoundMessagesLayer)
        // Then the per-client rate: a noisy client is refused before it takes a slot that others need.
        .layer(RateLimitLayer::new(
            RateLimiter::new(limits.requests_per_second_per_client, limits.burst_per_client),
            metrics.requests_rate_limited.clone(),
        ))
        // Then load shedding: with every slot taken, refuse at once; a queue would only add latency until callers time out.
        .layer(ShedLayer::new(limits.max_concurrent_requests, metrics.requests_shed.clone()))
        // Innermost the timeout: it bounds the handler that holds a slot; a stream's response starts at once, so it is not cut.
        .layer(TimeoutLayer::new(limits.request_timeout, metrics.requests_timed_out.clone()))
}

/// The gRPC status `status` as an HTTP response (trailers-only), as tonic sends it.
fn refusal(status: tonic::Status) -> http::Response<Body> {
    status.into_http()
}

/// A status with `grpc-retry-pushback-ms`, the trailer gRPC clients with a retry
/// policy read to know when to try again.
fn with_pushback(mut status: tonic::Status, after: Duration) -> tonic::Status {
    let ms = after.as_millis().max(1).to_string();
    if let Ok(value) = ms.parse() {
        status.metadata_mut().insert("grpc-retry-pushback-ms", value);
    }
    status
}

/// Swaps in a clone of `inner` and returns the service that was polled ready
/// (tower's rule: call the instance that said it was ready).
fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

// ---------------------------------------------------------------------------
// Bounded status messages.

/// The longest `grpc-message` sent, percent-encoded. A client refuses a header
/// block over its limit (16 KiB by default in h2) with GOAWAY, which ends every
/// call on the connection: a refusal that quotes its input (a 100 KiB selector,
/// a 3 MiB node id) must be cut before it is sent.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 4096;

/// Cuts the `grpc-message` in `headers` (or trailers) to [`MAX_STATUS_MESSAGE_BYTES`].
fn bound_status_message(headers: &mut http::HeaderMap) {
    if headers.get("grpc-message").is_none_or(|v| v.len() <= MAX_STATUS_MESSAGE_BYTES) {
        return;
    }
    let Some(status) = tonic::Status::from_header_map(headers) else { return };
    let message = status.message();
    // Percent-encoding keeps printable ASCII and triples every other byte.
    let mut budget = MAX_STATUS_MESSAGE_BYTES - 64;
    let kept: String = message
        .chars()
        .take_while(|c| {
            let cost = if c.is_ascii_graphic() { 1 } else { 3 * c.len_utf8() };
            budget = budget.saturating_sub(cost);
            budget > 0
        })
        .collect();
    let cut = format!("{kept} … ({} more bytes cut)", message.len() - kept.len());
    let mut fresh = http::HeaderMap::new();
    if tonic::Status::new(status.code(), cut).add_header(&mut fresh).is_ok()
        && let Some(value) = fresh.remove("grpc-message")
    {
        headers.insert("grpc-message", value);
    } else {
        headers.remove("grpc-message");
    }
}

/// Layer of [`BoundMessages`].
#[derive(Debug, Clone, Copy)]
pub struct BoundMessagesLayer;

impl<S> Layer<S> for BoundMessagesLayer {
    type Service = BoundMessages<S>;
    fn layer(&self, inner: S) -> BoundMessages<S> {
        BoundMessages { inner }
    }
}

/// Cuts long status messages, in the headers of a trailers-only answer (a
/// unary call's refusal) and in the trailers of a stream.
#[derive(Debug, Clone)]
pub struct BoundMessages<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for BoundMessages<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let response = take_ready(&mut self.inner).call(request);
        Box::pin(async move {
            let mut response = response.await?;
            bound_status_message(response.headers_mut());
            Ok(response.map(|body| Body::new(BoundTrailers { inner: body })))
        })
    }
}

/// A response body whose trailers pass through [`bound_status_message`].
struct BoundTrailers {
    inner: Body,
}

impl hyper::body::Body for BoundTrailers {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(frame.map(|frame| {
            frame.map(|frame| match frame.into_trailers() {
                Ok(mut trailers) => {
                    bound_status_message(&mut trailers);
                    hyper::body::Frame::trailers(trailers)
                }
                Err(frame) => frame,
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

// ---------------------------------------------------------------------------
// Per-client rate limit.

/// Token buckets per client: each holds up to `burst` tokens and gains `rate`
/// per second; a request takes one.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Whether the last request was refused, so a refusal streak is logged once.
    refusing: bool,
}

/// The limiter's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Allow,
    /// Over the limit: a token is there again after `retry_after`. `first` is
    /// set on the first refusal after an allowed request.
    Refuse {
        retry_after: Duration,
        first: bool,
    },
}

/// Buckets kept before idle (full) ones are dropped: one per certificate seen
/// recently, so this is reached only by a very large fleet.
const MAX_TRACKED_CLIENTS: usize = 16_384;

impl RateLimiter {
    /// `rate` requests per second sustained (above 0), `burst` at once (at least 1).
    pub fn new(rate: f64, burst: u32) -> Self {
        Self { rate, burst: f64::from(burst.max(1)), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes a token from `client`'s bucket at `now`, if there is one.
    pub fn check(&self, client: &str, now: Instant) -> Verdict {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if !buckets.contains_key(client) && buckets.len() >= MAX_TRACKED_CLIENTS {
            // A full bucket carries no state: dropping it changes no answer.
            buckets.retain(|_, b| self.refilled(b, now) < self.burst);
        }
        let bucket =
            buckets.entry(client.to_owned()).or_insert(Bucket { tokens: self.burst, at: now, refusing: false });
        bucket.tokens = self.refilled(bucket, now);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            bucket.refusing = false;
            return Verdict::Allow;
        }
        let first = !bucket.refusing;
        bucket.refusing = true;
        let retry_after = Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate);
        Verdict::Refuse { retry_after, first }
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.tokens + elapsed * self.rate).min(self.burst)
    }

    /// Clients with a bucket now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// The identity that a request's rate is counted against: the identity in the
/// client certificate, else the peer's IP address (such a caller is refused by
/// the services anyway, but must not escape the limit first).
fn client_key<B>(request: &http::Request<B>) -> String {
    let tls = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
    if let Some(leaf) = tls.and_then(|t| t.peer_certs()).and_then(|certs| certs.first().cloned())
        && let Ok(identity) = flotilla_common::Identity::from_der(&leaf)
    {
        return identity.to_string();
    }
    match tls.and_then(|t| t.get_ref().remote_addr()) {
        Some(addr) => format!("address {}", addr.ip()),
        None => "an unidentified client".to_owned(),
    }
}

/// Layer of [`RateLimit`].
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    limiter: Arc<RateLimiter>,
    refused: prometheus::IntCounter,
}

impl RateLimitLayer {
    pub fn new(limiter: RateLimiter, refused: prometheus::IntCounter) -> Self {
        Self { limiter: Arc::new(limiter), refused }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit { inner, limiter: self.limiter.clone(), refused: self.refused.clone() }
    }
}

/// Refuses a client's requests beyond its token bucket with RESOURCE_EXHAUSTED.
#[derive(Debug, Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<RateLimiter>,
    refused: prometheus::IntCounter,
}

impl<S, B> Service<http::Request<B>> for RateLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let client = client_key(&request);
        match self.limiter.check(&client, Instant::now()) {
            Verdict::Allow => Box::pin(take_ready(&mut self.inner).call(request)),
            Verdict::Refuse { retry_after, first } => {
                self.refused.inc();
                if first {
                    tracing::warn!(
                        %client,
                        path = request.uri().path(),
                        "client over its request rate (limits.requests_per_second_per_client); refusing until it slows down"
                    );
                }
                let status = tonic::Status::resource_exhausted(format!(
                    "rate limit: {client} may make {} requests per second (burst {}); retry in {} ms",
                    self.limiter.rate,
                    self.limiter.burst,
                    retry_after.as_millis().max(1)
                ));
                Box::pin(std::future::ready(Ok(refusal(with_pushback(status, retry_after)))))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Global concurrency limit with load shedding.

/// How long a shed caller is told to wait: long enough for a handler to finish,
/// short enough that a brief spike costs little.
const SHED_PUSHBACK: Duration = Duration::from_millis(250);

/// Layer of [`Shed`]; every service it wraps shares one set of slots.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    slots: Arc<Semaphore>,
    max: usize,
    shedding: Arc<AtomicBool>,
    refused: prometheus::IntCounter,
}

impl ShedLayer {
    pub fn new(max: usize, refused: prometheus::IntCounter) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self { slots: Arc::new(Semaphore::new(max)), max, shedding: Arc::default(), refused }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Shed<S> {
        Shed { inner, layer: self.clone() }
    }
}

/// Runs a request only with a free slot, held until its response starts;
/// without one it answers RESOURCE_EXHAUSTED at once.
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

impl<S, B> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Ok(slot) = self.layer.slots.clone().try_acquire_owned() else {
            self.layer.refused.inc();
            if !self.layer.shedding.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max = self.layer.max,
                    "every request slot is taken (limits.max_concurrent_requests); shedding new requests"
                );
            }
            let status = tonic::Status::resource_exhausted(format!(
                "overloaded: the controller is already handling {} requests (limits.max_concurrent_requests); retry in {} ms",
                self.layer.max,
                SHED_PUSHBACK.as_millis()
            ));
            return Box::pin(std::future::ready(Ok(refusal(with_pushback(status, SHED_PUSHBACK)))));
        };
        if self.layer.shedding.swap(false, Ordering::Relaxed) {
            tracing::info!("request slots free again; no longer shedding");
        }
        let response = take_ready(&mut self.inner).call(request);
        Box::pin(async move {
            let response = response.await;
            drop(slot);
            response
        })
    }
}

// ---------------------------------------------------------------------------
// Request timeout.

/// Layer of [`Timeout`].
#[derive(Debug, Clone)]
pub struct TimeoutLayer {
    limit: Duration,
    timed_out: prometheus::IntCounter,
}

impl TimeoutLayer {
    pub fn new(limit: Duration, timed_out: prometheus::IntCounter) -> Self {
        Self { limit, timed_out }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout { inner, layer: self.clone() }
    }
}

/// Answers DEADLINE_EXCEEDED when a request's response has not started within
/// the limit. Only the response's start is timed: a unary call ends with it, a
/// stream (AgentService.Connect, Fleet.WatchTelemetry) goes on for as long as
/// it runs.
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    layer: TimeoutLayer,
}

impl<S, B> Service<http::Request<B>> for Timeout<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_owned();
        let response = take_ready(&mut self.inner).call(request);
        let TimeoutLayer { limit, timed_out } = self.layer.clone();
        Box::pin(async move {
            match tokio::time::timeout(limit, response).await {
                Ok(response) => response,
                Err(_) => {
                    timed_out.inc();
                    tracing::warn!(%path, limit = %humantime::format_duration(limit), "request cut off at limits.request_timeout");
                    Ok(refusal(tonic::Status::deadline_exceeded(format!(
                        "the request took longer than the controller allows ({}, limits.request_timeout)",
                        humantime::format_duration(limit)
                    ))))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    fn counter() -> prometheus::IntCounter {
        prometheus::IntCounter::new("test_total", "test").unwrap()
    }

    fn request() -> http::Request<Body> {
        http::Request::builder().uri("/flotilla.v1.Fleet/ListNodes").body(Body::empty()).unwrap()
    }

    fn status_of(response: &http::Response<Body>) -> Option<tonic::Status> {
        tonic::Status::from_header_map(response.headers())
    }

    fn ok() -> http::Response<Body> {
        http::Response::new(Body::empty())
    }

    #[tokio::test]
    async fn long_status_messages_are_cut_in_headers_and_trailers() {
        let huge = format!("selector {:?} does not parse", "sum(".repeat(50_000));
        let svc = BoundMessagesLayer.layer(tower::service_fn(move |req: http::Request<Body>| {
            let huge = huge.clone();
            async move {
                if req.uri().path().ends_with("Unary") {
                    return Ok::<_, Infallible>(tonic::Status::invalid_argument(huge).into_http());
                }
                // A stream: one message, then trailers with the refusal.
                let mut trailers = http::HeaderMap::new();
                tonic::Status::invalid_argument(format!("é\n{huge}")).add_header(&mut trailers).unwrap();
                let frames = futures::stream::iter([
                    Ok::<_, tonic::Status>(hyper::body::Frame::data(tonic::codegen::Bytes::from_static(b"x"))),
                    Ok(hyper::body::Frame::trailers(trailers)),
                ]);
                Ok(http::Response::new(Body::new(http_body_util::StreamBody::new(frames))))
            }
        }));
        let unary = http::Request::builder().uri("/s/Unary").body(Body::empty()).unwrap();
        let response = svc.clone().oneshot(unary).await.unwrap();
        assert!(response.headers()["grpc-message"].len() <= MAX_STATUS_MESSAGE_BYTES);
        let status = status_of(&response).unwrap();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("selector \"sum(sum("), "{}", status.message());
        assert!(status.message().ends_with("more bytes cut)"), "{}", status.message());

        let stream = http::Request::builder().uri("/s/Stream").body(Body::empty()).unwrap();
        let collected = svc.oneshot(stream).await.unwrap().into_body().collect().await.unwrap();
        let trailers = collected.trailers().unwrap();
        assert!(trailers["grpc-message"].len() <= MAX_STATUS_MESSAGE_BYTES);
        let status = tonic::Status::from_header_map(trailers).unwrap();
        assert!(status.message().starts_with("é\nselector"), "{}", status.message());
        assert_eq!(&collected.to_bytes()[..], b"x");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_gets_its_burst_then_its_rate() {
        let limiter = RateLimiter::new(2.0, 3);
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check("node gpu-a", now), Verdict::Allow);
        }
        let Verdict::Refuse { retry_after, first } = limiter.check("node gpu-a", now) else {
            panic!("the fourth request at once is over the burst");
        };
        assert!(first);
        assert_eq!(retry_after, Duration::from_millis(500), "one token at 2 per second");
        assert!(matches!(limiter.check("node gpu-a", now), Verdict::Refuse { first: false, .. }));
        // Other clients have their own buckets.
        assert_eq!(limiter.check("operator alice", now), Verdict::Allow);

        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(matches!(limiter.check("node gpu-a", Instant::now()), Verdict::Refuse { .. }));
        tokio::time::advance(Duration::from_millis(501)).await;
        // 1 s at 2/s: two tokens, minus the fraction the refused checks did not take.
        assert_eq!(limiter.check("node gpu-a", Instant::now()), Verdict::Allow);
        assert_eq!(limiter.check("node gpu-a", Instant::now()), Verdict::Allow);
        assert!(matches!(limiter.check("node gpu-a", Instant::now()), Verdict::Refuse { first: true, .. }));

        // A long pause refills to the burst, never beyond it.
        tokio::time::advance(Duration::from_secs(3600)).await;
        let now = Instant::now();
        let allowed = (0..10).filter(|_| limiter.check("node gpu-a", now) == Verdict::Allow).count();
        assert_eq!(allowed, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_clients_are_forgotten_when_many_are_tracked() {
        let limiter = RateLimiter::new(1.0, 1);
        let start = Instant::now();
        for i in 0..MAX_TRACKED_CLIENTS {
            assert_eq!(limiter.check(&format!("node n{i}"), start), Verdict::Allow);
        }
        assert_eq!(limiter.tracked(), MAX_TRACKED_CLIENTS);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(limiter.check("node newcomer", Instant::now()), Verdict::Allow);
        assert_eq!(limiter.tracked(), 1, "every earlier bucket was full again, so carried no state");
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_layer_refuses_with_resource_exhausted_and_when_to_retry() {
        let calls = Arc::new(AtomicUsize::new(0));
        let inner = {
            let calls = calls.clone();
            tower::service_fn(move |_req: http::Request<Body>| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, Infallible>(ok()) }
            })
        };
        let svc = RateLimitLayer::new(RateLimiter::new(10.0, 2), counter()).layer(inner);
        for _ in 0..2 {
            let response = svc.clone().oneshot(request()).await.unwrap();
            assert!(status_of(&response).is_none());
        }
        let response = svc.clone().oneshot(request()).await.unwrap();
        let status = status_of(&response).expect("a refusal");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("10 requests per second (burst 2); retry in 100 ms"), "{status:?}");
        assert_eq!(response.headers()["grpc-retry-pushback-ms"], "100");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "the refused request never reached the service");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_over_the_concurrency_limit_are_shed_not_queued() {
        // Each call waits for a permit of `gate`: the test decides when handlers finish.
        let gate = Arc::new(Semaphore::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let inner = {
            let (gate, started) = (gate.clone(), started.clone());
            tower::service_fn(move |_req: http::Request<Body>| {
                let (gate, started) = (gate.clone(), started.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.unwrap().forget();
                    Ok::<_, Infallible>(ok())
                }
            })
        };
        let svc = ShedLayer::new(2, counter()).layer(inner);
        let first = tokio::spawn(svc.clone().oneshot(request()));
        let second = tokio::spawn(svc.clone().oneshot(request()));
        while started.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        // The third is answered at once, without waiting for a slot.
        let response = svc.clone().oneshot(request()).await.unwrap();
        let status = status_of(&response).expect("shed");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("already handling 2 requests"), "{status:?}");
        assert_eq!(response.headers()["grpc-retry-pushback-ms"], "250");
        assert_eq!(started.load(Ordering::SeqCst), 2);

        // Finished requests free their slots for the next.
        gate.add_permits(2);
        assert!(status_of(&first.await.unwrap().unwrap()).is_none());
        assert!(status_of(&second.await.unwrap().unwrap()).is_none());
        let next = tokio::spawn(svc.clone().oneshot(request()));
        gate.add_permits(1);
        assert!(status_of(&next.await.unwrap().unwrap()).is_none());
        assert_eq!(started.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn the_default_timeout_outlasts_the_longest_command() {
        use flotilla_common::command::Command;
        // The largest drain `Command::parse` accepts.
        let drain =
            Command::Drain { container: "c".into(), endpoint: "http://h:1".into(), deadline_s: 3600, timeout_s: 600 };
        assert!(crate::commands::result_wait(&drain) < Limits::default().request_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_unary_call_is_cut_off_with_deadline_exceeded() {
        let svc = TimeoutLayer::new(Duration::from_secs(30), counter()).layer(tower::service_fn(
            |_req: http::Request<Body>| async {
                tokio::time::sleep(Duration::from_secs(31)).await;
                Ok::<_, Infallible>(ok())
            },
        ));
        let response = svc.oneshot(request()).await.unwrap();
        let status = status_of(&response).expect("cut off");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("30s, limits.request_timeout"), "{status:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_running_stream_outlives_the_timeout() {
        // A streaming handler answers at once and keeps sending: 5 messages, 20 s apart.
        let svc = TimeoutLayer::new(Duration::from_secs(30), counter()).layer(tower::service_fn(
            |_req: http::Request<Body>| async {
                let frames = futures::stream::unfold(0u32, |n| async move {
                    if n == 5 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    let frame = hyper::body::Frame::data(tonic::codegen::Bytes::from(vec![n as u8]));
                    Some((Ok::<_, tonic::Status>(frame), n + 1))
                });
                Ok::<_, Infallible>(http::Response::new(Body::new(http_body_util::StreamBody::new(frames))))
            },
        ));
        let response = svc.oneshot(request()).await.unwrap();
        assert!(status_of(&response).is_none());
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], &[0, 1, 2, 3, 4], "100 s of stream, all delivered past the 30 s limit");
    }
}
