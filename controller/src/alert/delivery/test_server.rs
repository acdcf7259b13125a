//! A scripted HTTP server on 127.0.0.1:0 for the delivery tests: it answers each
//! request with the next scripted reply (200 once the script is used up) and
//! records every request with its arrival time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How the server answers one request.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    Status(u16),
    StatusWithBody(u16, &'static str),
    /// Never answers (the client times out).
    Hang,
}

/// One request as received.
#[derive(Debug, Clone)]
pub(crate) struct Recorded {
    pub(crate) at: Instant,
    pub(crate) path: String,
    pub(crate) content_type: String,
    pub(crate) body: serde_json::Value,
}

#[derive(Default)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    requests: Mutex<Vec<Recorded>>,
    arrived: Notify,
}

/// The running server; stops when dropped.
pub(crate) struct TestServer {
    addr: SocketAddr,
    scheme: &'static str,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TestServer {
    pub(crate) async fn start(script: impl IntoIterator<Item = Reply>) -> Self {
        Self::start_with(script, None).await
    }

    /// The same behind TLS with `tls` (then [`TestServer::url`] says https).
    pub(crate) async fn start_with(
        script: impl IntoIterator<Item = Reply>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared { script: Mutex::new(script.into_iter().collect()), ..Default::default() });
        let stop = CancellationToken::new();
        let (state, token) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = token.cancelled() => return,
                    accepted = listener.accept() => match accepted { Ok((stream, _)) => stream, Err(_) => continue },
                };
                let (state, token, acceptor) = (state.clone(), token.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor {
                        None => serve(stream, state, token).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                serve(stream, state, token).await;
                            }
                        }
                    }
                });
            }
        });
        Self { addr, scheme, shared, stop }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub(crate) fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub(crate) fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Waits until `n` requests have arrived (10 s hang guard) and returns them all.
    pub(crate) async fn wait_for(&self, n: usize) -> Vec<Recorded> {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let arrived = self.shared.arrived.notified();
                let requests = self.requests();
                if requests.len() >= n {
                    return requests;
                }
                arrived.await;
            }
        })
        .await;
        match waited {
            Ok(requests) => requests,
            Err(_) => panic!("waited 10 s for {n} requests; got {:#?}", self.requests()),
        }
    }
}

async fn serve<S>(stream: S, state: Arc<Shared>, token: CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| answer(state.clone(), request));
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        () = token.cancelled() => {}
        _ = conn => {}
    }
}

async fn answer(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let at = Instant::now();
    let path = request.uri().path().to_owned();
    let content_type =
        request.headers().get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let bytes = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    let reply = shared.script.lock().unwrap().pop_front().unwrap_or(Reply::Status(200));
    shared.requests.lock().unwrap().push(Recorded { at, path, content_type, body });
    shared.arrived.notify_waiters();
    let (status, text) = match reply {
        Reply::Status(code) => (code, ""),
        Reply::StatusWithBody(code, text) => (code, text),
        Reply::Hang => std::future::pending().await,
    };
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    Ok(response)
}
