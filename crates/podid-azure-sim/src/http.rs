//! HTTP/1 server plumbing shared by the simulated services.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::task::JoinSet;

use crate::error::Error;

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

/// A request with its body read.
#[derive(Debug)]
pub(crate) struct Req {
    /// The peer's address (the connection's source).
    pub(crate) peer: SocketAddr,
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Req {
    /// Decoded query parameters (first value wins).
    pub(crate) fn query(&self) -> Vec<(String, String)> {
        self.uri
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `http://<Host header>` (what clients used to reach us).
    pub(crate) fn base_url(&self) -> String {
        let host = self
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| self.uri.authority().map(|a| a.as_str()))
            .unwrap_or("localhost");
        format!("http://{host}")
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub(crate) type Resp = Response<Full<Bytes>>;

/// What a handler returns: a response, or `None` to drop the connection without answering.
pub(crate) type Answer = Option<Resp>;

pub(crate) type BoxFut = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// A request handler.
pub(crate) type Handler = Arc<dyn Fn(Req) -> BoxFut + Send + Sync>;

/// A JSON response.
pub(crate) fn json(status: StatusCode, body: &serde_json::Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// A plain-text response.
pub(crate) fn text(status: StatusCode, body: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A running simulated service. Dropping it stops the server and its connections.
#[derive(Debug)]
pub struct ServerHandle {
    addr: SocketAddr,
    closed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>` without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// While set, every connection is closed without an answer (the service is unreachable).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.closed.store(unreachable, Ordering::SeqCst);
    }

    /// Stops the server and drops its connections.
    pub fn shutdown(&self) {
        self.task.abort();
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `127.0.0.1:0`.
pub(crate) fn loopback_listener() -> Result<std::net::TcpListener, Error> {
    std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::Listen)
}

/// Serves `handler` on `listener`. Must be called inside a tokio runtime.
pub(crate) fn spawn_server(
    listener: std::net::TcpListener,
    handler: Handler,
) -> Result<ServerHandle, Error> {
    listener.set_nonblocking(true).map_err(Error::Listen)?;
    let addr = listener.local_addr().map_err(Error::Listen)?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(Error::Listen)?;
    let closed = Arc::new(AtomicBool::new(false));
    let closed2 = closed.clone();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            let Ok((stream, peer)) = accepted else {
                continue;
            };
            if closed2.load(Ordering::SeqCst) {
                drop(stream);
                continue;
            }
            let handler = handler.clone();
            let closed = closed2.clone();
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let handler = handler.clone();
                    let closed = closed.clone();
                    async move {
                        if closed.load(Ordering::SeqCst) {
                            return Err(Dropped);
                        }
                        let (parts, body) = req.into_parts();
                        let body = match Limited::new(body, MAX_BODY).collect().await {
                            Ok(b) => b.to_bytes(),
                            Err(_) => {
                                return Ok::<_, Dropped>(text(
                                    StatusCode::PAYLOAD_TOO_LARGE,
                                    "request body too large",
                                ));
                            }
                        };
                        let req = Req {
                            peer,
                            method: parts.method,
                            uri: parts.uri,
                            headers: parts.headers,
                            body,
                        };
                        handler(req).await.ok_or(Dropped)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(ServerHandle { addr, closed, task })
}

/// Error used to make hyper drop a connection without answering.
#[derive(Debug)]
pub(crate) struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by fault injection")
    }
}

impl std::error::Error for Dropped {}
