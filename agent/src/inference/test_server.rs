//! A tiny HTTP/1.1 server for the scrape tests, on `127.0.0.1:0`: a fixed reply per
//! path, and the misbehaviours the collector must survive (never answering, a body
//! that stalls, a body past the cap, an error status).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What the server does for one path.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    /// 200 with this body.
    Body(String),
    /// This status with an empty body.
    Status(u16),
    /// Reads the request and never answers.
    Never,
    /// Sends the headers and a little of the body, then nothing more.
    StallBody,
    /// Sends `size` bytes of valid-looking metrics, with or without Content-Length.
    Huge { size: usize, declared: bool },
}

type Routes = Arc<Mutex<HashMap<String, Reply>>>;

/// A running server; stops (with every open connection) when dropped.
#[derive(Debug)]
pub(crate) struct TestServer {
    pub url: String,
    routes: Routes,
    accept: JoinHandle<()>,
}

impl TestServer {
    pub async fn start<'a>(routes: impl IntoIterator<Item = (&'a str, Reply)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let routes: Routes = Arc::new(Mutex::new(routes.into_iter().map(|(p, r)| (p.to_owned(), r)).collect()));
        let shared = routes.clone();
        let accept = tokio::spawn(async move {
            // Owned by the accept task, so aborting it ends every connection too.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(serve(stream, shared.clone()));
            }
        });
        Self { url, routes, accept }
    }

    /// Replaces the reply for `path`.
    pub fn set(&self, path: &str, reply: Reply) {
        self.routes.lock().unwrap().insert(path.to_owned(), reply);
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn serve(mut stream: TcpStream, routes: Routes) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let reply = routes.lock().unwrap().get(&path).cloned();
    let _ = match reply {
        None => respond(&mut stream, 404, None, b"").await,
        Some(Reply::Status(code)) => respond(&mut stream, code, None, b"").await,
        Some(Reply::Body(body)) => respond(&mut stream, 200, None, body.as_bytes()).await,
        Some(Reply::Never) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
        Some(Reply::StallBody) => {
            let r = respond(&mut stream, 200, Some(1000), b"vllm:num_req").await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            r
        }
        Some(Reply::Huge { size, declared }) => huge(&mut stream, size, declared).await,
    };
}

async fn respond(stream: &mut TcpStream, status: u16, declared: Option<usize>, body: &[u8]) -> std::io::Result<()> {
    let length = declared.unwrap_or(body.len());
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.flush().await
}

async fn huge(stream: &mut TcpStream, size: usize, declared: bool) -> std::io::Result<()> {
    let length = if declared { format!("Content-Length: {size}\r\n") } else { String::new() };
    let head = format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n{length}Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    let chunk = "vllm:num_requests_running 1\n".repeat(2048);
    let mut sent = 0;
    while sent < size {
        let n = chunk.len().min(size - sent);
        // The client hangs up once past its cap; the write error ends the loop.
        stream.write_all(&chunk.as_bytes()[..n]).await?;
        sent += n;
    }
    stream.shutdown().await
}
