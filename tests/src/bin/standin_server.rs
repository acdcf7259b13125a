//! `flotilla-standin`: a stand-in model server for the end-to-end tests (test
//! equipment, never shipped). It speaks enough of the OpenAI API and of vLLM's
//! `/metrics` page for the agent and the gateway to treat it as vLLM:
//!
//! - `GET /health`, `GET /v1/models`: 503 until `--startup-delay` has passed (a model
//!   loading), then 200;
//! - `POST /v1/chat/completions`: a canned answer after `--latency`, as one JSON
//!   body or, with `"stream": true`, as SSE chunks ending `data: [DONE]`; a share
//!   `--error-rate` of requests fails with 500;
//! - `GET /metrics`: vLLM V1 names (`vllm:num_requests_running`, `…_waiting`,
//!   `vllm:request_success_total`, `vllm:kv_cache_usage_perc`,
//!   `vllm:time_to_first_token_seconds`, `vllm:e2e_request_latency_seconds`,
//!   `vllm:prompt_tokens_total`, `vllm:generation_tokens_total`) with `model_name`.
//!
//! SIGTERM or SIGINT: stop accepting, let in-flight requests (streams included)
//! finish, exit 0; a second signal, or `--grace` running out, exits 1 at once.
//! `flotilla-standin probe URL` is the container health check (the image has no curl).
//!
//! With `--tag` (`STANDIN_TAG`) set, every response carries the header
//! `x-standin-tag: TAG` and every chat completion body (and stream chunk) carries
//! `"system_fingerprint": "TAG"`, so a test behind nginx can tell which revision
//! answered.
//!
//! Every flag also reads an environment variable (`STANDIN_LISTEN`, …), so a
//! container spec can tune it through `env`.

// Its log lines on stderr are this tool's whole output (there is no tracing stack
// in the test crate), so printing is the point here.
#![allow(clippy::print_stderr)]

use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// The canned answer, one word per token.
const ANSWER: &str = "This is the flotilla stand-in model answering your request with a fixed reply of plain words";
/// The largest request body read.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, Parser)]
#[command(name = "flotilla-standin", about = "An OpenAI-compatible stand-in model server for tests")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Serve,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// GET a URL; exit 0 on a 2xx answer, 1 otherwise (the container health check).
    Probe {
        /// `http://host:port/path`.
        url: String,
        /// Limit for connecting and answering.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

#[derive(Debug, Clone, clap::Args)]
struct Serve {
    /// Address to listen on.
    #[arg(long, env = "STANDIN_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// The model name served and reported (`model_name` label).
    #[arg(long, env = "STANDIN_MODEL", default_value = "standin-model")]
    model: String,
    /// Time each completion takes; streams send the first token at half of it.
    #[arg(long, env = "STANDIN_LATENCY", default_value = "0s", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Share of completions that fail with 500, 0..=1.
    #[arg(long, env = "STANDIN_ERROR_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    error_rate: f64,
    /// Time before /health and /v1/models answer 200 (model loading).
    #[arg(long, env = "STANDIN_STARTUP_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    startup_delay: Duration,
    /// Tokens in each answer (a request's max_tokens can lower it).
    #[arg(long, env = "STANDIN_TOKENS", default_value_t = 16)]
    tokens: u32,
    /// Marks every answer as this instance's (header `x-standin-tag`, and
    /// `system_fingerprint` in completions); empty: no mark.
    #[arg(long, env = "STANDIN_TAG", default_value = "", value_parser = parse_tag)]
    tag: String,
    /// Longest wait for in-flight requests after SIGTERM.
    #[arg(long, env = "STANDIN_GRACE", default_value = "60s", value_parser = humantime::parse_duration)]
    grace: Duration,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a number in 0..=1")),
    }
}

/// A tag must fit in an HTTP header value.
fn parse_tag(s: &str) -> Result<String, String> {
    match hyper::header::HeaderValue::from_str(s) {
        Ok(_) => Ok(s.to_owned()),
        Err(_) => Err(format!("{s:?} cannot be an HTTP header value")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Probe { url, timeout }) => probe(&url, timeout),
        None => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(serve(cli.serve))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flotilla-standin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A plain HTTP/1.0 GET, so the image needs nothing but this binary.
fn probe(url: &str, timeout: Duration) -> Result<ExitCode> {
    let rest = url.strip_prefix("http://").context("probe URLs are http://host:port/path")?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let addr = authority.to_socket_addrs()?.next().with_context(|| format!("{authority}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n")?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    let status = String::from_utf8_lossy(&head[..n]).split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
    Ok(if status.is_some_and(|s| (200..300).contains(&s)) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn serve(args: Serve) -> Result<ExitCode> {
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr()?;
    let state = Arc::new(State::new(args.clone())?);
    eprintln!(
        "flotilla-standin listening addr={local} model={} tag={:?} latency={} error_rate={} startup_delay={}",
        args.model,
        args.tag,
        humantime::format_duration(args.latency),
        args.error_rate,
        humantime::format_duration(args.startup_delay)
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        eprintln!("accept failed: {e}");
                        continue;
                    }
                };
                let state = state.clone();
                let service = service_fn(move |req| handle(state.clone(), req));
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                // The watcher tracks the connection, so shutdown below waits for it.
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    drop(listener);
    eprintln!("flotilla-standin draining in_flight={}", state.running.get());
    tokio::select! {
        () = graceful.shutdown() => {
            eprintln!("flotilla-standin stopped");
            Ok(ExitCode::SUCCESS)
        }
        () = tokio::time::sleep(args.grace) => bail!("grace period ran out with {} requests in flight", state.running.get()),
        _ = term.recv() => bail!("second signal: exiting with {} requests in flight", state.running.get()),
        _ = int.recv() => bail!("second signal: exiting with {} requests in flight", state.running.get()),
    }
}

/// Shared state: the knobs, the clock the startup delay counts from, the metrics.
struct State {
    args: Serve,
    started: Instant,
    next_id: AtomicU64,
    registry: Registry,
    running: Gauge,
    kv_cache: Gauge,
    success: IntCounterVec,
    ttft: Histogram,
    e2e: Histogram,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
}

impl State {
    fn new(args: Serve) -> Result<Self> {
        let registry = Registry::new();
        // vLLM V1 labels every series with the engine index and the model name.
        let labels = [("engine", "0"), ("model_name", args.model.as_str())];
        let opts =
            |name: &str, help: &str| labels.iter().fold(Opts::new(name, help), |o, (k, v)| o.const_label(*k, *v));
        let running =
            Gauge::with_opts(opts("vllm:num_requests_running", "Number of requests in model execution batches."))?;
        let waiting =
            Gauge::with_opts(opts("vllm:num_requests_waiting", "Number of requests waiting to be processed."))?;
        let kv_cache =
            Gauge::with_opts(opts("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."))?;
        let success = IntCounterVec::new(
            opts("vllm:request_success_total", "Count of successfully processed requests."),
            &["finished_reason"],
        )?;
        for reason in ["stop", "length", "abort"] {
            success.with_label_values(&[reason]);
        }
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let o = opts(name, help);
            Histogram::with_opts(HistogramOpts { common_opts: o, buckets: buckets.to_vec() })
        };
        let ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            &[
                0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0,
            ],
        )?;
        let e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            &[0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0],
        )?;
        let prompt_tokens =
            IntCounter::with_opts(opts("vllm:prompt_tokens_total", "Number of prefill tokens processed."))?;
        let generation_tokens =
            IntCounter::with_opts(opts("vllm:generation_tokens_total", "Number of generation tokens processed."))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(waiting))?;
        registry.register(Box::new(kv_cache.clone()))?;
        registry.register(Box::new(success.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(e2e.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generation_tokens.clone()))?;
        Ok(Self {
            args,
            started: Instant::now(),
            next_id: AtomicU64::new(1),
            registry,
            running,
            kv_cache,
            success,
            ttft,
            e2e,
            prompt_tokens,
            generation_tokens,
        })
    }

    fn ready(&self) -> bool {
        self.started.elapsed() >= self.args.startup_delay
    }
}

/// Counts a request as running for as long as it lives: a stream that the client
/// drops mid-way stops counting when hyper drops its body.
struct InFlight(Arc<State>);

impl InFlight {
    fn new(state: Arc<State>) -> Self {
        state.running.inc();
        state.kv_cache.set((state.running.get() * 0.05).min(1.0));
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.running.dec();
        self.0.kv_cache.set((self.0.running.get() * 0.05).min(1.0));
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed()
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response<Body> {
    let body = json!({"error": {"message": message, "type": kind, "code": status.as_u16()}});
    respond(status, "application/json", body.to_string())
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let mut response = route(state.clone(), req).await;
    if !state.args.tag.is_empty()
        && let Ok(value) = hyper::header::HeaderValue::from_str(&state.args.tag)
    {
        response.headers_mut().insert("x-standin-tag", value);
    }
    Ok(response)
}

/// Adds `system_fingerprint` (the tag) to a completion body or chunk, when tagged.
fn fingerprint(state: &State, mut body: Value) -> Value {
    if !state.args.tag.is_empty()
        && let Some(object) = body.as_object_mut()
    {
        object.insert("system_fingerprint".to_owned(), Value::String(state.args.tag.clone()));
    }
    body
}

async fn route(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let ready = state.ready();
    let loading = || error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "the model is loading");
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") if ready => respond(StatusCode::OK, "text/plain", ""),
        (&Method::GET, "/v1/models") if ready => {
            let body = json!({"object": "list", "data": [{
                "id": state.args.model, "object": "model", "created": unix_now(), "owned_by": "flotilla-standin",
                "root": state.args.model, "max_model_len": 8192,
            }]});
            respond(StatusCode::OK, "application/json", body.to_string())
        }
        (&Method::GET, "/health" | "/v1/models") => loading(),
        (&Method::GET, "/metrics") => match TextEncoder::new().encode_to_string(&state.registry.gather()) {
            Ok(text) => respond(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", text),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", &e.to_string()),
        },
        (&Method::POST, "/v1/chat/completions") if ready => chat(state, req).await,
        (&Method::POST, "/v1/chat/completions") => loading(),
        _ => error(StatusCode::NOT_FOUND, "NotFoundError", "no such route"),
    }
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    model: Option<String>,
    #[serde(default)]
    messages: Vec<Value>,
    #[serde(default)]
    stream: bool,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

async fn chat(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let in_flight = InFlight::new(state.clone());
    let started = Instant::now();
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequestError", &format!("reading the body: {e}")),
    };
    let request: ChatRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequestError", &format!("not a chat request: {e}")),
    };
    if let Some(model) = request.model.as_deref().filter(|m| *m != state.args.model) {
        return error(StatusCode::NOT_FOUND, "NotFoundError", &format!("The model `{model}` does not exist."));
    }
    let prompt_tokens = request.messages.iter().map(count_words).sum::<u64>().max(1);
    state.prompt_tokens.inc_by(prompt_tokens);
    if rand::random::<f64>() < state.args.error_rate {
        tokio::time::sleep(state.args.latency / 2).await;
        return error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError", "injected failure (--error-rate)");
    }
    let limit = request.max_completion_tokens.or(request.max_tokens);
    let tokens = limit.map_or(state.args.tokens, |l| l.min(state.args.tokens)).max(1);
    let finish_reason = if limit.is_some_and(|l| l < state.args.tokens) { "length" } else { "stop" };
    let answer = Answer {
        id: format!("chatcmpl-{}", state.next_id.fetch_add(1, Ordering::Relaxed)),
        created: unix_now(),
        words: ANSWER.split(' ').cycle().take(tokens as usize).map(str::to_owned).collect(),
        finish_reason,
        prompt_tokens,
        include_usage: request.stream_options.is_some_and(|o| o.include_usage),
    };
    if request.stream {
        stream(in_flight, started, answer)
    } else {
        tokio::time::sleep(state.args.latency).await;
        state.ttft.observe((state.args.latency / 2).as_secs_f64());
        finish(&state, &answer, started);
        let completion = answer.words.len();
        let body = json!({
            "id": answer.id, "object": "chat.completion", "created": answer.created, "model": state.args.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.words.join(" ")},
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion as u64},
        });
        let body = fingerprint(&state, body);
        drop(in_flight);
        respond(StatusCode::OK, "application/json", body.to_string())
    }
}

struct Answer {
    id: String,
    created: u64,
    words: Vec<String>,
    finish_reason: &'static str,
    prompt_tokens: u64,
    /// Streams only: send a usage chunk before `[DONE]` (`stream_options.include_usage`).
    include_usage: bool,
}

fn finish(state: &State, answer: &Answer, started: Instant) {
    state.success.with_label_values(&[answer.finish_reason]).inc();
    state.generation_tokens.inc_by(answer.words.len() as u64);
    state.e2e.observe(started.elapsed().as_secs_f64());
}

/// What the stream sends next.
enum Step {
    Role,
    Word(usize),
    Finish,
    Usage,
    Done,
    End,
}

/// An SSE response: a role chunk after half the latency (the first token), one
/// chunk a word spread over the other half, a finish chunk, the usage chunk when
/// asked for, then `[DONE]`.
fn stream(in_flight: InFlight, started: Instant, answer: Answer) -> Response<Body> {
    let state = in_flight.0.clone();
    let per_word = state.args.latency / 2 / u32::try_from(answer.words.len()).unwrap_or(u32::MAX).max(1);
    let chunk = move |answer: &Answer, delta: Value, finish: Option<&str>| {
        let body = json!({
            "id": answer.id, "object": "chat.completion.chunk", "created": answer.created, "model": state.args.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        let body = fingerprint(&state, body);
        Bytes::from(format!("data: {body}\n\n"))
    };
    let body = futures::stream::unfold((Step::Role, answer, in_flight), move |(step, answer, in_flight)| {
        let chunk = chunk.clone();
        async move {
            let state = in_flight.0.clone();
            let (bytes, next) = match step {
                Step::Role => {
                    tokio::time::sleep(state.args.latency / 2).await;
                    state.ttft.observe(started.elapsed().as_secs_f64());
                    (chunk(&answer, json!({"role": "assistant", "content": ""}), None), Step::Word(0))
                }
                Step::Word(i) => {
                    tokio::time::sleep(per_word).await;
                    let text = if i == 0 { answer.words[i].clone() } else { format!(" {}", answer.words[i]) };
                    let next = if i + 1 < answer.words.len() { Step::Word(i + 1) } else { Step::Finish };
                    (chunk(&answer, json!({"content": text}), None), next)
                }
                Step::Finish => {
                    finish(&state, &answer, started);
                    let next = if answer.include_usage { Step::Usage } else { Step::Done };
                    (chunk(&answer, json!({}), Some(answer.finish_reason)), next)
                }
                Step::Usage => {
                    let completion = answer.words.len() as u64;
                    let body = json!({
                        "id": answer.id, "object": "chat.completion.chunk", "created": answer.created,
                        "model": state.args.model, "choices": [],
                        "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": completion,
                                  "total_tokens": answer.prompt_tokens + completion},
                    });
                    let body = fingerprint(&state, body);
                    (Bytes::from(format!("data: {body}\n\n")), Step::Done)
                }
                Step::Done => (Bytes::from_static(b"data: [DONE]\n\n"), Step::End),
                Step::End => return None,
            };
            Some((Ok::<_, Infallible>(Frame::data(bytes)), (next, answer, in_flight)))
        }
    });
    let mut response = Response::new(StreamBody::new(body).boxed());
    let headers = response.headers_mut();
    headers.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/event-stream"));
    headers.insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-cache"));
    response
}

/// Whitespace-separated words in a message's text, as a stand-in for tokens.
fn count_words(message: &Value) -> u64 {
    match &message["content"] {
        Value::String(s) => s.split_whitespace().count() as u64,
        Value::Array(parts) => {
            parts.iter().filter_map(|p| p["text"].as_str()).map(|s| s.split_whitespace().count() as u64).sum()
        }
        _ => 0,
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
