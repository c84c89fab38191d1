//! The probe port (`/healthz`, `/readyz`, docs/upstream.md#nmi-probes-and-metrics) and the metrics
//! port (`/metrics`).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use tokio::net::TcpListener;

use crate::metrics::Metrics;
use crate::pods::WatchState;

use super::serve::{Limits, serve_with};
use super::{Body, NmiState};

fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `/readyz`: 200 `ok` only when ready, else 503 `not ready` and one line per reason; the last
/// line gives the pod watch's state (`pod watch: streaming`, or `pod watch: blind for <n>s` while it fails). A
/// blind watch does not make nmi unready: known pods keep being served (docs/security.md,
/// "Pod watch failure policy").
fn readyz(state: &NmiState) -> Response<Body> {
    let (status, first) = if state.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    };
    let watch = match state.pods.watch_state() {
        WatchState::NotSynced => "pod watch: not synced".to_owned(),
        WatchState::Streaming => "pod watch: streaming".to_owned(),
        WatchState::Blind { since } => format!(
            "pod watch: blind for {}s",
            std::time::Instant::now()
                .saturating_duration_since(since)
                .as_secs()
        ),
    };
    // One line per reason, so a probe failure in `kubectl describe` says why.
    let mut body = format!("{first}\n");
    for reason in state.not_ready_reasons() {
        body.push_str(&reason);
        body.push('\n');
    }
    body.push_str(&watch);
    body.push('\n');
    let mut response = plain(status, "");
    *response.body_mut() = Full::new(Bytes::from(body));
    response
}

/// Serve `/healthz` (`Active` / `Not Active`, always 200, no newline) and `/readyz` (200 only
/// when ready, else 503 with `not ready` and one line per reason; then the pod watch's state,
/// see `readyz`) on `listener` until `shutdown` completes.
pub async fn serve_probes(
    listener: TcpListener,
    state: Arc<NmiState>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let limits = state.options.limits.clone();
    serve_with(listener, &limits, None, shutdown, move |_| {
        let state = Arc::clone(&state);
        service_fn(move |request: Request<Incoming>| {
            let state = Arc::clone(&state);
            async move {
                Ok::<_, Infallible>(match request.uri().path() {
                    "/healthz" if state.health.interception_installed() => {
                        plain(StatusCode::OK, "Active")
                    }
                    "/healthz" => plain(StatusCode::OK, "Not Active"),
                    "/readyz" => readyz(&state),
                    _ => plain(StatusCode::NOT_FOUND, "404 page not found\n"),
                })
            }
        })
    })
    .await;
}

/// Serve `/metrics` on `listener` until `shutdown` completes.
pub async fn serve_metrics(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) {
    serve_with(listener, &limits, None, shutdown, move |_| {
        let metrics = Arc::clone(&metrics);
        service_fn(move |request: Request<Incoming>| {
            let metrics = Arc::clone(&metrics);
            async move {
                Ok::<_, Infallible>(if request.uri().path() == "/metrics" {
                    let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    response
                } else {
                    plain(StatusCode::NOT_FOUND, "404 page not found\n")
                })
            }
        })
    })
    .await;
}
