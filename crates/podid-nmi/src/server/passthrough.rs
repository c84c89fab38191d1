//! The proxy to the real IMDS for every path nmi does not answer itself
//! (docs/upstream.md#passthrough): request and response bodies bounded, hop-by-hop headers
//! dropped, the exchange under a deadline.

use http::header::{self, HeaderValue};
use http::{HeaderMap, Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use podid_imds::{ImdsError, check_metadata_header};

use super::answer::error_response;
use super::{Body, NmiState};

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones a proxy must not forward.
const NOT_FORWARDED: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
];

fn strip_headers(headers: &mut HeaderMap) {
    for name in NOT_FORWARDED {
        headers.remove(name);
    }
}

/// Forward the request to IMDS and copy its answer back (docs/upstream.md#passthrough).
pub(super) async fn passthrough(state: &NmiState, request: Request<Incoming>) -> Response<Body> {
    let options = state.options.errors;
    let limits = &state.options.limits;
    if state.options.metadata_header_required
        && let Err(error) = check_metadata_header(request.headers())
    {
        return error_response(&error, options);
    }
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(
        limits.header_read_timeout,
        Limited::new(body, limits.max_passthrough_body).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(_)) | Err(_) => {
            let error = ImdsError::Internal {
                detail: "request body too large or not received in time".to_owned(),
            };
            return error_response(&error, options);
        }
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let authority = state.options.metadata.to_string();
    let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(target)
        .build()
    else {
        return error_response(&ImdsError::MalformedRequestTarget, options);
    };
    let mut headers = parts.headers;
    strip_headers(&mut headers);
    if let Ok(host) = HeaderValue::from_str(&authority) {
        headers.insert(header::HOST, host);
    }
    let mut upstream = Request::new(Full::new(body));
    *upstream.method_mut() = parts.method;
    *upstream.uri_mut() = uri;
    *upstream.headers_mut() = headers;
    let exchange = async {
        let response = state
            .proxy
            .request(upstream)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, limits.max_upstream_body)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((parts, body))
    };
    match tokio::time::timeout(limits.upstream_timeout, exchange).await {
        Ok(Ok((parts, body))) => {
            let mut headers = parts.headers;
            strip_headers(&mut headers);
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            let mut response = Response::new(Full::new(body));
            *response.status_mut() = parts.status;
            *response.headers_mut() = headers;
            response
        }
        Ok(Err(detail)) => {
            tracing::warn!(%detail, "passthrough to IMDS failed");
            error_response(
                &ImdsError::Internal {
                    detail: format!(
                        "passthrough to the instance metadata service failed: {detail}"
                    ),
                },
                options,
            )
        }
        Err(_) => error_response(
            &ImdsError::Internal {
                detail: "passthrough to the instance metadata service timed out".to_owned(),
            },
            options,
        ),
    }
}
