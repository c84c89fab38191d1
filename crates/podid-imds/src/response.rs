//! A finished response (status, headers, body) and the helpers every producer shares.

use std::fmt;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use http::{HeaderMap, HeaderValue, StatusCode};

/// `Content-Type` of upstream's token bodies.
pub const CONTENT_TYPE_JSON: &str = "application/json";
/// `Content-Type` of IMDS-style JSON error bodies (upstream's Metadata-header error uses it).
pub const CONTENT_TYPE_JSON_UTF8: &str = "application/json; charset=utf-8";
/// `Content-Type` Go's `http.Error` sets.
pub const CONTENT_TYPE_TEXT_UTF8: &str = "text/plain; charset=utf-8";

/// A complete response for the NMI port: what the hyper handler writes, nothing more to add.
/// `Content-Length` is always set. `Debug` prints the body length only, never the body, because
/// token responses carry access tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct WireResponse {
    /// Status code.
    pub status: StatusCode,
    /// Headers, including `Content-Type` (when there is a body) and `Content-Length`.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl WireResponse {
    /// Build a response; sets `Content-Length` from the body and `Content-Type` when given.
    pub(crate) fn new(
        status: StatusCode,
        content_type: Option<&'static str>,
        body: Vec<u8>,
    ) -> Self {
        let mut headers = HeaderMap::with_capacity(4);
        if let Some(content_type) = content_type {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        }
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        Self {
            status,
            headers,
            body,
        }
    }

    /// Split into `(status, headers, body)`.
    pub fn into_parts(self) -> (StatusCode, HeaderMap, Vec<u8>) {
        (self.status, self.headers, self.body)
    }

    /// Convert into an [`http::Response`] with the body as bytes.
    pub fn into_http(self) -> http::Response<Vec<u8>> {
        let mut response = http::Response::new(self.body);
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}

impl fmt::Debug for WireResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireResponse")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl From<WireResponse> for http::Response<Vec<u8>> {
    fn from(response: WireResponse) -> Self {
        response.into_http()
    }
}

/// The **301** gorilla/mux answers for an unclean path
/// ([`Route::Redirect`](crate::Route::Redirect)): `Location` set, empty body, no `Content-Type`
/// (docs/upstream.md#routing, docs/upstream.md#status-codes).
///
/// Returns `None` only if `location` is not a valid header value, which cannot happen for
/// locations produced by [`classify`](crate::classify) (they are escaped ASCII, except for a
/// query passed through verbatim that a server would not have accepted in the first place).
pub fn redirect_response(location: &str) -> Option<WireResponse> {
    let value = HeaderValue::from_str(location).ok()?;
    let mut response = WireResponse::new(StatusCode::MOVED_PERMANENTLY, None, Vec::new());
    response.headers.insert(LOCATION, value);
    Some(response)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn redirect_has_location_and_empty_body() {
        let r = redirect_response("/metadata/identity/oauth2/token?resource=r").unwrap();
        assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY);
        assert_eq!(
            r.headers[LOCATION],
            "/metadata/identity/oauth2/token?resource=r"
        );
        assert_eq!(r.headers[CONTENT_LENGTH], "0");
        assert!(r.headers.get(CONTENT_TYPE).is_none());
        assert!(r.body.is_empty());
        assert!(redirect_response("/x\n").is_none());
    }

    #[test]
    fn debug_hides_body() {
        let r = WireResponse::new(
            StatusCode::OK,
            Some(CONTENT_TYPE_JSON),
            b"secret-token".to_vec(),
        );
        let shown = format!("{r:?}");
        assert!(!shown.contains("secret-token"), "{shown}");
        assert!(shown.contains("body_len: 12"), "{shown}");
        let http = r.into_http();
        assert_eq!(http.body(), b"secret-token");
    }
}
