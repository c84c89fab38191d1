//! The IMDS port's routes: a request classified by `podid-imds`; the token routes
//! (`/metadata/identity/oauth2/token` and `/host/token`) attributed to their pod, granted or
//! denied, timed and audited; everything else to [`super::passthrough`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Instant, SystemTime};

use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use podid_imds::{
    ErrorOptions, HostTokenResponse, ImdsError, Route, TokenResponse, WireResponse,
    check_metadata_header, classify, parse_token_query, pod_headers, token_list_response,
};
use podid_select::matching::CallerPod;

use crate::metrics::{Metrics, resource_label};
use crate::pods::LookupError;

use super::answer::{Denied, denied_response, error_response, report_event, to_response};
use super::grant::{Granted, grant};
use super::passthrough::passthrough;
use super::{Body, NmiState};

pub(super) async fn handle(
    state: &NmiState,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Response<Body> {
    let options = state.options.errors;
    // The token routes borrow their query from the request (no copy per request); only
    // passthrough consumes it.
    let target = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let route = classify(request.method(), target);
    if let Some(response) = route.immediate_response(options) {
        return to_response(response);
    }
    match route {
        Route::Token { query } => {
            let timed = Timed::start(state, "token");
            to_response(token_route(state, timed, peer.ip(), request.headers(), query).await)
        }
        Route::HostToken { query } if state.options.enable_host_token => {
            let timed = Timed::start(state, "host_token");
            let answer = Box::pin(host_token_route(
                state,
                timed,
                peer.ip(),
                request.headers(),
                query,
            ));
            to_response(answer.await)
        }
        Route::InstanceMetadata if state.options.block_instance_metadata => {
            error_response(&ImdsError::InstanceMetadataBlocked, options)
        }
        // Boxed: the proxy's state is large, and every token request would carry (and copy)
        // it inline.
        _ => Box::pin(passthrough(state, request)).await,
    }
}

/// A token route's request, timed for `aadpodidentity_nmi_operations_duration_seconds`: each
/// answer is recorded with the labels it earned (borrowed, no per-request label strings).
#[derive(Clone, Copy)]
struct Timed<'s> {
    state: &'s NmiState,
    route: &'static str,
    started: Instant,
}

impl<'s> Timed<'s> {
    fn start(state: &'s NmiState, route: &'static str) -> Self {
        Self {
            state,
            route,
            started: Instant::now(),
        }
    }

    /// Record `response` (labels `namespace` and `resource`, empty when unknown) and return it.
    fn done(self, response: WireResponse, namespace: &str, resource: &str) -> WireResponse {
        self.state
            .metrics
            .nmi_operations_duration
            .with_label_values(&[
                self.route,
                response.status.as_str(),
                namespace,
                resource_label(resource),
            ])
            .observe(self.started.elapsed().as_secs_f64());
        response
    }

    /// Record and return the answer for `error`.
    fn error(self, error: &ImdsError, options: ErrorOptions, namespace: &str) -> WireResponse {
        self.done(error.response(options), namespace, "")
    }

    /// Record and return the answer for a refused grant ([`denied_response`]).
    fn denied(self, denied: &Denied, options: ErrorOptions, namespace: &str) -> WireResponse {
        self.done(denied_response(denied, options), namespace, "")
    }
}

async fn token_route(
    state: &NmiState,
    timed: Timed<'_>,
    ip: IpAddr,
    headers: &HeaderMap,
    query: &str,
) -> WireResponse {
    let options = state.options.errors;
    if state.options.metadata_header_required
        && let Err(error) = check_metadata_header(headers)
    {
        return timed.error(&error, options, "");
    }
    let query = match parse_token_query(query) {
        Ok(query) => query,
        Err(error) => return timed.error(&error, options, ""),
    };
    // A pod not indexed yet, or an address its old pod may have just released to a new one,
    // is waited for (boxed: the wait's timer would make every request's future larger).
    let pod = match state.pods.lookup(ip) {
        Err(LookupError::NotFound { .. } | LookupError::Reassigning { .. }) => {
            Box::pin(state.pods.wait_for(ip, state.options.pod_wait)).await
        }
        found => found,
    };
    let pod = match pod {
        Ok(pod) => pod,
        Err(error) => {
            record_attribution_failure(&state.metrics, error);
            tracing::info!(client_ip = %ip, %error, "token request from an unattributed address");
            return timed.error(&error.to_imds_error(), options, "");
        }
    };
    match grant(state, &pod, &query.selector, &query.resource).await {
        Ok(granted) => {
            let now = SystemTime::now();
            let client_id = granted.client_id.as_deref();
            let response = match &*granted.tokens {
                // The usual case, without collecting the one answer into a Vec.
                [token] => token.response(client_id, now).response(),
                tokens => {
                    let responses: Vec<TokenResponse<'_>> =
                        tokens.iter().map(|t| t.response(client_id, now)).collect();
                    token_list_response(&responses)
                }
            };
            audit(&state.metrics, &pod, &granted, &query.resource, "token");
            timed.done(response, &pod.namespace, &query.resource)
        }
        Err(denied) => {
            report_event(state, &pod, &denied);
            timed.denied(&denied, options, &pod.namespace)
        }
    }
}

async fn host_token_route(
    state: &NmiState,
    timed: Timed<'_>,
    ip: IpAddr,
    headers: &HeaderMap,
    query: &str,
) -> WireResponse {
    // Upstream answers /host/token errors without the Retry-After variant.
    let options = ErrorOptions {
        set_retry_after_header: false,
        ..state.options.errors
    };
    let pod_ref = match pod_headers(headers) {
        Ok(pod_ref) => pod_ref,
        Err(error) => return timed.error(&error, options, ""),
    };
    if ip.to_canonical() != IpAddr::V4(Ipv4Addr::LOCALHOST) {
        return timed.error(&ImdsError::NotFromHost, options, "");
    }
    let query = match parse_token_query(query) {
        Ok(query) => query,
        Err(error) => return timed.error(&error, options, ""),
    };
    let Some(pod) = state.pods.get(pod_ref.namespace, pod_ref.name) else {
        let error = ImdsError::NoIdentityForPod {
            namespace: pod_ref.namespace.to_owned(),
            pod: pod_ref.name.to_owned(),
        };
        return timed.error(&error, options, pod_ref.namespace);
    };
    match grant(state, &pod, &query.selector, &query.resource).await {
        Ok(granted) => {
            let Some(first) = granted.tokens.first() else {
                let error = ImdsError::TokenUnavailable {
                    detail: "the token source returned no token".to_owned(),
                };
                return timed.error(&error, options, &pod.namespace);
            };
            let client_id = granted.client_id.as_deref().unwrap_or("");
            let body = HostTokenResponse {
                token: first.response(None, SystemTime::now()),
                client_id,
            };
            audit(
                &state.metrics,
                &pod,
                &granted,
                &query.resource,
                "host_token",
            );
            timed.done(body.response(), &pod.namespace, &query.resource)
        }
        Err(denied) => {
            report_event(state, &pod, &denied);
            timed.denied(&denied, options, &pod.namespace)
        }
    }
}

fn record_attribution_failure(metrics: &Metrics, error: LookupError) {
    metrics
        .kubernetes_api_errors
        .with_label_values(&["get_pod_list"])
        .inc();
    metrics
        .attribution_failures
        .with_label_values(&[error.reason()])
        .inc();
}

/// One structured audit line per issued token; never the token itself.
fn audit(metrics: &Metrics, pod: &CallerPod, granted: &Granted, resource: &str, route: &str) {
    let cache = match granted.cache_hit {
        Some(true) => "hit",
        Some(false) => "miss",
        None => "unknown",
    };
    metrics.token_issued(granted.source_label(), cache);
    tracing::info!(
        target: "podid::audit",
        route,
        pod = %pod.name,
        namespace = %pod.namespace,
        service_account = %pod.service_account,
        client_id = granted.client_id.as_deref().unwrap_or(""),
        exception = granted.exception,
        workload_identity = granted.workload_identity,
        resource,
        cache,
        "token issued"
    );
}
