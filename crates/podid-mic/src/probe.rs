//! The `/healthz` and `/metrics` HTTP servers of the `mic` binary.
//!
//! `/healthz` answers 200 always, with the body `Active` (no newline) while this replica leads and
//! its loop runs on synced caches, `Not Active` otherwise
//! (docs/upstream.md#mic-metrics-and-probes). `/metrics` renders [`crate::metrics`]. Other paths
//! are 404.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tracing::debug;

/// Whether this replica is the active one (leader with a running loop).
#[derive(Debug, Default)]
pub struct Health {
    active: AtomicBool,
}

impl Health {
    /// Marks the replica active or not.
    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::SeqCst);
        crate::metrics::leading(active);
    }

    /// Whether the replica is active.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }
}

/// What a probe server answers.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// `/healthz` from this state.
    Health(Arc<Health>),
    /// `/metrics`.
    Metrics,
}

fn respond(endpoint: &Endpoint, path: &str) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (endpoint, path) {
        (Endpoint::Health(health), "/healthz") => {
            let body = if health.is_active() {
                "Active"
            } else {
                "Not Active"
            };
            (StatusCode::OK, "text/plain; charset=utf-8", body.to_owned())
        }
        (Endpoint::Metrics, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            crate::metrics::render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "404 page not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// Serves `endpoint` on `listener` until `shutdown` resolves (open connections are dropped).
pub async fn serve(listener: TcpListener, endpoint: Endpoint, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!(error = %e, "probe accept failed");
                continue;
            }
        };
        let endpoint = endpoint.clone();
        connections.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let response = respond(&endpoint, request.uri().path());
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "probe connection failed");
            }
        });
        while connections.try_join_next().is_some() {}
    }
    connections.abort_all();
}
