//! The HTTPS endpoint for Prometheus (`/metrics`) and probes (`/healthz`,
//! `/readyz`). Like every Flotilla port it is mutual TLS: Prometheus scrapes
//! with an operator certificate (`tls_config` with `cert_file`/`key_file`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use flotilla_common::Identity;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Exporter;

/// Serves until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    exporter: Exporter,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => return,
        };
        let acceptor = acceptor.clone();
        let exporter = exporter.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(error)) => {
                    exporter.metrics.handshakes_refused.inc();
                    tracing::warn!(%peer, reason = %flotilla_common::tls::explain_handshake_error(&error), "metrics TLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let allowed = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|leaf| Identity::from_der(leaf))
                .is_some_and(|id| matches!(id, Ok(Identity::Operator { .. })));
            let service = hyper::service::service_fn(move |req| {
                let exporter = exporter.clone();
                async move { Ok::<_, Infallible>(respond(&exporter, allowed, peer, &req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(error) = r { tracing::debug!(%peer, %error, "metrics connection ended"); },
                () = cancel.cancelled() => conn.as_mut().graceful_shutdown(),
            }
        });
    }
}

async fn respond(
    exporter: &Exporter,
    allowed: bool,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    match req.uri().path() {
        "/healthz" | "/readyz" => text(StatusCode::OK, "ok\n".to_owned()),
        "/metrics" if !allowed => {
            tracing::warn!(%peer, "refused a /metrics scrape: the client certificate is not an operator's");
            text(
                StatusCode::FORBIDDEN,
                "scrape with an operator certificate (flotctl cert issue --user prometheus)\n".to_owned(),
            )
        }
        "/metrics" => {
            let exporter = exporter.clone();
            // Rendering reads the whole fleet view; keep it off the async workers.
            match tokio::task::spawn_blocking(move || exporter.render()).await {
                Ok(body) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    r
                }
                Err(error) => {
                    tracing::error!(%error, "rendering metrics failed");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "rendering failed; see the controller log\n".to_owned())
                }
            }
        }
        _ => text(StatusCode::NOT_FOUND, "try /metrics, /healthz or /readyz\n".to_owned()),
    }
}
