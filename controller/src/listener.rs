//! The TLS accept loop. Handshakes run concurrently (bounded) with a timeout, so
//! a slow or hostile client never blocks others; every refusal is logged with a
//! reason an operator can act on; only authenticated streams reach tonic.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Accepts TCP connections on `listener` and yields those that complete the mTLS handshake.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handshake_timeout: Duration,
    max_handshakes: usize,
    cancel: CancellationToken,
    tracker: &TaskTracker,
    refused: prometheus::IntCounter,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(max_handshakes);
    let acceptor = TlsAcceptor::from(tls);
    let permits = Arc::new(Semaphore::new(max_handshakes));
    let handshakes = tracker.clone();
    tracker.spawn(async move {
        loop {
            let permit = tokio::select! {
                p = Arc::clone(&permits).acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                () = cancel.cancelled() => return,
            };
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(pair) => pair,
                    Err(error) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = cancel.cancelled() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let refused = refused.clone();
            handshakes.spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => {
                        refused.inc();
                        tracing::warn!(%peer, reason = %flotilla_common::tls::explain_handshake_error(&error), "TLS handshake refused");
                    }
                    Err(_) => {
                        refused.inc();
                        tracing::warn!(%peer, timeout_ms = handshake_timeout.as_millis() as u64, "TLS handshake refused: not completed in time");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
