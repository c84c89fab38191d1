//! Route classification for the NMI port (docs/upstream.md#routing).
//!
//! Upstream serves the port with gorilla/mux: the request path is percent-decoded by Go's
//! `net/url`, cleaned (a path that changes under cleaning gets a 301 to the cleaned path, query
//! kept), then matched in order against the token prefix, the "invalid token path" regex,
//! `/host/token`, `/metadata/instance` and finally the catch-all proxy. No route restricts the
//! HTTP method. [`classify`] reproduces that decision on a raw request target.

use std::borrow::Cow;

use crate::error::{ErrorOptions, ImdsError};
use crate::gourl::{self, Mode};
use crate::response::{WireResponse, redirect_response};

/// What the NMI port does with a request, decided from its request target alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// The token endpoint (`/{metadata}/identity/oauth2/token…`, docs/upstream.md#routing rule 1,
    /// docs/upstream.md#token-endpoint). `query` is the raw query string (without `?`), to be given
    /// to [`parse_token_query`](crate::parse_token_query).
    Token {
        /// Raw query string, empty when there is none.
        query: &'a str,
    },
    /// The host token endpoint (`/host/token…`, docs/upstream.md#routing rule 3,
    /// docs/upstream.md#response-bodies).
    HostToken {
        /// Raw query string, empty when there is none.
        query: &'a str,
    },
    /// `/{metadata}/instance…` (docs/upstream.md#routing rule 4). With `--block-instance-metadata`
    /// the caller answers, before any Metadata-header check,
    /// [`ImdsError::InstanceMetadataBlocked`](crate::ImdsError::InstanceMetadataBlocked); otherwise
    /// it is proxied exactly like [`Route::Passthrough`].
    InstanceMetadata,
    /// Anything else: proxied to IMDS after the Metadata-header check
    /// (docs/upstream.md#passthrough).
    Passthrough,
    /// The path changes under gorilla/mux's cleaning (`//`, `/./`, `..`, also when they only
    /// appear after percent-decoding): answer **301** with this `Location` (relative: cleaned,
    /// re-escaped path plus the original query). See [`redirect_response`](crate::redirect_response).
    Redirect {
        /// Value of the `Location` header.
        location: String,
    },
    /// podid: the token path in another letter case (`/metadata/Identity/oauth2/token`,
    /// `/metadata/identity/OAUTH2/TOKEN`, …): a path whose part after the `metadata` segment
    /// starts with `/identity/oauth2/token` ignoring ASCII case but not exactly. Upstream proxied
    /// these to the node's IMDS unattributed; whether IMDS treats them as its token path is not
    /// known, so podid never proxies them and answers
    /// [`ImdsError::TokenPathCase`](crate::ImdsError::TokenPathCase) (400) instead.
    TokenPathCase,
    /// Looks like a token path but is malformed (docs/upstream.md#routing rule 2): answer
    /// [`ImdsError::InvalidTokenPath`](crate::ImdsError::InvalidTokenPath) (400 `Invalid request`).
    InvalidTokenPath,
    /// The request target cannot be parsed the way Go's server parses it (a `%` not followed by
    /// two hex digits in the path): Go's HTTP server rejects such a request before any handler
    /// runs. Answer [`ImdsError::MalformedRequestTarget`](crate::ImdsError::MalformedRequestTarget).
    MalformedRequestTarget,
}

impl Route<'_> {
    /// The answer for routes that need no handler: the 301 of [`Route::Redirect`], the 400 of
    /// [`Route::TokenPathCase`], [`Route::InvalidTokenPath`] and
    /// [`Route::MalformedRequestTarget`]. `None` for routes
    /// the NMI handler serves (token, host token, instance metadata, passthrough). These answers
    /// come before any Metadata-header check, as in upstream.
    pub fn immediate_response(&self, options: ErrorOptions) -> Option<WireResponse> {
        match self {
            Self::Redirect { location } => Some(
                redirect_response(location)
                    .unwrap_or_else(|| ImdsError::MalformedRequestTarget.response(options)),
            ),
            Self::TokenPathCase => Some(ImdsError::TokenPathCase.response(options)),
            Self::InvalidTokenPath => Some(ImdsError::InvalidTokenPath.response(options)),
            Self::MalformedRequestTarget => {
                Some(ImdsError::MalformedRequestTarget.response(options))
            }
            Self::Token { .. }
            | Self::HostToken { .. }
            | Self::InstanceMetadata
            | Self::Passthrough => None,
        }
    }
}

/// Literal after `/{metadata}` for the token route; matched case-sensitively.
const TOKEN_TAIL: &[u8] = b"/identity/oauth2/token";
/// Literal after `/{metadata}` for the instance route; matched case-sensitively.
const INSTANCE_TAIL: &[u8] = b"/instance";
/// Host token prefix; matched case-sensitively.
const HOST_TOKEN: &[u8] = b"/host/token";
/// The case-insensitive segment.
const METADATA: &[u8] = b"metadata";

/// Split a request target (origin form, `path[?query]`) into its raw path and raw query, the way
/// Go's `url.ParseRequestURI` does: at the first `?`; no fragment handling.
pub fn split_path_and_query(path_and_query: &str) -> (&str, Option<&str>) {
    match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    }
}

/// Classify a request for the NMI port from its method and raw request target
/// (`uri.path_and_query()` as received, e.g. `/metadata/identity/oauth2/token?resource=…`).
///
/// The method is accepted for API symmetry and future use: upstream routes every method the same
/// way (docs/upstream.md#routing: no route restricts the method), and so does podid.
/// Never panics; every input yields a [`Route`].
pub fn classify<'a>(_method: &http::Method, path_and_query: &'a str) -> Route<'a> {
    let (raw_path, raw_query) = split_path_and_query(path_and_query);
    let Ok(path) = gourl::unescape(raw_path.as_bytes(), Mode::Path) else {
        return Route::MalformedRequestTarget;
    };
    let cleaned = gourl::mux_clean_path(&path);
    if *cleaned != *path {
        let mut location =
            String::with_capacity(cleaned.len() + path_and_query.len() - raw_path.len());
        gourl::escape_path_into(&cleaned, &mut location);
        if let Some(query) = raw_query {
            // Go's URL.String() writes `?` when the query is non-empty or was explicitly empty.
            location.push('?');
            location.push_str(query);
        }
        return Route::Redirect { location };
    }
    let query = raw_query.unwrap_or("");
    classify_clean(&path, query)
}

/// The routes tried in upstream NMI's order on an already decoded and clean path, with
/// podid's [`Route::TokenPathCase`] right after the token route.
fn classify_clean<'a>(path: &[u8], query: &'a str) -> Route<'a> {
    let metadata_tail = strip_metadata_segment(path);
    if let Some(tail) = metadata_tail {
        if tail.starts_with(TOKEN_TAIL) {
            return Route::Token { query };
        }
        if tail
            .get(..TOKEN_TAIL.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(TOKEN_TAIL))
        {
            return Route::TokenPathCase;
        }
    }
    if matches_invalid_token_path(path) {
        return Route::InvalidTokenPath;
    }
    if path.starts_with(HOST_TOKEN) {
        return Route::HostToken { query };
    }
    if metadata_tail.is_some_and(|tail| tail.starts_with(INSTANCE_TAIL)) {
        return Route::InstanceMetadata;
    }
    Route::Passthrough
}

/// If `path` starts with `/` + `metadata` in any ASCII case, the rest after that segment name.
/// Go's `(?i:metadata)` folds Unicode too, but none of these letters has a non-ASCII fold.
fn strip_metadata_segment(path: &[u8]) -> Option<&[u8]> {
    let rest = path.strip_prefix(b"/")?;
    let head = rest.get(..METADATA.len())?;
    head.eq_ignore_ascii_case(METADATA)
        .then(|| &rest[METADATA.len()..])
}

/// Upstream's unanchored regex `/(?i:metadata)/identity(.*?)oauth2(.*?)token`
/// (docs/upstream.md#routing rule 2). `.` does not match `\n` in Go's regexp, so the three literals
/// must appear in order within one newline-free stretch that starts at a `/metadata/identity`.
fn matches_invalid_token_path(path: &[u8]) -> bool {
    const IDENTITY: &[u8] = b"/identity";
    let mut start = 0;
    while let Some(offset) = path[start..].iter().position(|&b| b == b'/') {
        let at = start + offset;
        if let Some(after) =
            strip_metadata_segment(&path[at..]).and_then(|tail| tail.strip_prefix(IDENTITY))
        {
            let line = after.split(|&b| b == b'\n').next().unwrap_or(after);
            if find(line, b"oauth2")
                .is_some_and(|o| find(&line[o + b"oauth2".len()..], b"token").is_some())
            {
                return true;
            }
        }
        start = at + 1;
    }
    false
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The decoded path, for logging by the caller (lossy UTF-8). Never contains the query.
pub fn decoded_path(path_and_query: &str) -> Cow<'_, str> {
    let (raw_path, _) = split_path_and_query(path_and_query);
    match gourl::unescape(raw_path.as_bytes(), Mode::Path) {
        Ok(Cow::Borrowed(_)) | Err(_) => Cow::Borrowed(raw_path),
        Ok(Cow::Owned(bytes)) => Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::Method;

    fn route(target: &str) -> Route<'_> {
        classify(&Method::GET, target)
    }

    fn redirect(location: &str) -> Route<'static> {
        Route::Redirect {
            location: location.to_owned(),
        }
    }

    /// Upstream's `TestRouterPathPrefix` cases plus the prefix and case rules of
    /// docs/upstream.md#routing.
    #[test]
    fn upstream_router_table() {
        let token = Route::Token { query: "" };
        let host = Route::HostToken { query: "" };
        let cases: &[(&str, Route<'_>)] = &[
            ("/metadata/identity/oauth2/token/", token.clone()),
            ("/metadata/identity/oauth2/token", token.clone()),
            ("/Metadata/identity/oauth2/token/", token.clone()),
            ("/METADATA/identity/oauth2/token", token.clone()),
            ("/mEtAdAtA/identity/oauth2/token", token.clone()),
            ("/metadata/identity/oauth2/tokenXYZ", token.clone()),
            ("/metadata/identity/oauth2/token/extra", token.clone()),
            // podid: case variants of the token path are refused, never proxied.
            ("/metadata/Identity/oauth2/token/", Route::TokenPathCase),
            ("/metadata/identity/OAuth2/token", Route::TokenPathCase),
            ("/host/token/", host.clone()),
            ("/host/token", host.clone()),
            ("/host/tokenX", host.clone()),
            ("/Host/token", Route::Passthrough),
            ("/metadata/instance", Route::InstanceMetadata),
            ("/Metadata/instance", Route::InstanceMetadata),
            ("/Metadata/instance/", Route::InstanceMetadata),
            (
                "/metadata/instance/compute?api-version=2021-02-01",
                Route::InstanceMetadata,
            ),
            ("/metadata/Instance", Route::Passthrough),
            ("/metadata/", Route::Passthrough),
            ("/metadata", Route::Passthrough),
            ("/", Route::Passthrough),
            ("/healthz", Route::Passthrough),
            ("/doesnotexist", Route::Passthrough),
            ("/latest/meta-data/", Route::Passthrough),
            ("/metadata/identity\\oauth2/token/", Route::InvalidTokenPath),
            ("/metadata/identity/oauth2\\token/", Route::InvalidTokenPath),
            (
                "/metadata/identity\\oauth2\\token/",
                Route::InvalidTokenPath,
            ),
            (
                "/metadata/identity/\\oauth2\\token/",
                Route::InvalidTokenPath,
            ),
            (
                "/metadata/identity\\\\\\oauth2\\\\token/",
                Route::InvalidTokenPath,
            ),
            // Unanchored: anywhere in the path, case-insensitive `metadata` only.
            (
                "/x/METADATA/identityfoo-oauth2-bar-token",
                Route::InvalidTokenPath,
            ),
            ("/metadata/identity/oauth2/tok", Route::Passthrough),
            ("/metadata/identity/token/oauth2", Route::Passthrough),
        ];
        for (target, want) in cases {
            assert_eq!(&route(target), want, "classify({target:?})");
        }
    }

    /// Item 9 of the trust-boundary issue: every path that equals the token path ignoring ASCII
    /// case, but is not the token route, is answered 400 and never proxied. Each row fails
    /// alone (all rows are checked, then reported together).
    #[test]
    fn token_path_case_variants_are_refused() {
        let cases: &[(&str, Route<'_>)] = &[
            ("/metadata/Identity/oauth2/token", Route::TokenPathCase),
            ("/metadata/IDENTITY/OAUTH2/TOKEN", Route::TokenPathCase),
            ("/metadata/identity/OAUTH2/token", Route::TokenPathCase),
            ("/metadata/identity/oauth2/Token", Route::TokenPathCase),
            ("/Metadata/identity/oauth2/tOKEN/", Route::TokenPathCase),
            (
                "/METADATA/identity/Oauth2/token?resource=r",
                Route::TokenPathCase,
            ),
            ("/metadata/identity/oauth2/TOKENxyz", Route::TokenPathCase),
            (
                "/metadata/identity/oauth2/TOKEN/extra",
                Route::TokenPathCase,
            ),
            // Percent-encoded letters are decoded first.
            ("/metadata/%49dentity/oauth2/token", Route::TokenPathCase),
            // The exact token route is still the token route, in any case of `metadata`.
            (
                "/MetaData/identity/oauth2/token",
                Route::Token { query: "" },
            ),
            // Shorter or different paths are not the token path in any case.
            ("/metadata/Identity/oauth2/tok", Route::Passthrough),
            ("/metadata/Identity/oauth2", Route::Passthrough),
            ("/metadata/Identity", Route::Passthrough),
            ("/x/metadata/Identity/oauth2/token", Route::Passthrough),
            ("/metadata/Instance", Route::Passthrough),
        ];
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|(target, want)| {
                let got = route(target);
                (&got != want).then(|| format!("{target:?}: got {got:?}, want {want:?}"))
            })
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        let response = route("/metadata/Identity/oauth2/token")
            .immediate_response(ErrorOptions::default())
            .unwrap();
        assert_eq!(response.status.as_u16(), 400);
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body["error"], "invalid_request");
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("/metadata/identity/oauth2/token"),
            "{body}"
        );
    }

    #[test]
    fn query_is_split_at_first_question_mark() {
        assert_eq!(
            route("/metadata/identity/oauth2/token?resource=a?b&client_id=x"),
            Route::Token {
                query: "resource=a?b&client_id=x"
            }
        );
        assert_eq!(
            route("/host/token/?resource=r"),
            Route::HostToken {
                query: "resource=r"
            }
        );
        assert_eq!(
            route("/metadata/identity/oauth2/token?"),
            Route::Token { query: "" }
        );
    }

    #[test]
    fn percent_encoded_paths_are_decoded_before_matching() {
        assert_eq!(
            route("/%6Detadata/identity/oauth2/token"),
            Route::Token { query: "" }
        );
        assert_eq!(
            route("/metadata/identity%2Foauth2%2ftoken"),
            Route::Token { query: "" }
        );
        assert_eq!(
            route("/metadata/identity%5Coauth2/token"),
            Route::InvalidTokenPath
        );
        // A newline between the literals defeats upstream's regex (`.` excludes `\n`).
        assert_eq!(
            route("/metadata/identity%0A/oauth2/token"),
            Route::Passthrough
        );
        assert_eq!(
            route("/metadata/identity/x%0Aoauth2/token"),
            Route::Passthrough
        );
        assert_eq!(
            route("/metadata/identity%0A/a/metadata/identity\\oauth2\\token"),
            Route::InvalidTokenPath
        );
        assert_eq!(route("/host%2Ftoken"), Route::HostToken { query: "" });
        // Non-UTF-8 bytes are fine: Go strings are bytes.
        assert_eq!(
            route("/metadata/identity/oauth2/token%FF"),
            Route::Token { query: "" }
        );
        assert_eq!(route("/%FF"), Route::Passthrough);
    }

    #[test]
    fn bad_percent_encoding_in_path_is_malformed() {
        for target in [
            "/metadata/identity/oauth2/token%",
            "/%zz",
            "/a%4",
            "/a%4?q=1",
        ] {
            assert_eq!(route(target), Route::MalformedRequestTarget, "{target:?}");
        }
        // Bad escapes in the query do not concern routing.
        assert_eq!(
            route("/metadata/identity/oauth2/token?resource=%zz"),
            Route::Token {
                query: "resource=%zz"
            }
        );
    }

    #[test]
    fn unclean_paths_redirect_like_gorilla_mux() {
        let cases = [
            (
                "//metadata/identity/oauth2/token?resource=r",
                "/metadata/identity/oauth2/token?resource=r",
            ),
            (
                "//metadata/identity/oauth2/token/",
                "/metadata/identity/oauth2/token/",
            ),
            (
                "/metadata//identity/oauth2/token",
                "/metadata/identity/oauth2/token",
            ),
            (
                "/metadata/./identity/oauth2/token",
                "/metadata/identity/oauth2/token",
            ),
            (
                "/a/../metadata/identity/oauth2/token?",
                "/metadata/identity/oauth2/token?",
            ),
            ("/..", "/"),
            ("/metadata/instance/..", "/metadata"),
            ("/metadata/instance/../", "/metadata/"),
            ("//", "/"),
            // Dot segments hidden by percent-encoding are decoded first, then cleaned.
            ("/metadata%2F..%2Finstance", "/instance"),
            ("/%2e%2e/host/token", "/host/token"),
            // The Location path is re-escaped the way Go's URL.String() does.
            ("//a%20b/%3F", "/a%20b/%3F"),
            ("//%FF", "/%FF"),
            ("//x?q=%zz", "/x?q=%zz"),
        ];
        for (target, location) in cases {
            assert_eq!(route(target), redirect(location), "classify({target:?})");
        }
    }

    #[test]
    fn not_rooted_targets_redirect_to_rooted() {
        assert_eq!(route(""), redirect("/"));
        assert_eq!(route("*"), redirect("/%2A"));
        assert_eq!(
            route("metadata/identity/oauth2/token"),
            redirect("/metadata/identity/oauth2/token")
        );
    }

    #[test]
    fn immediate_responses() {
        let opts = ErrorOptions::default();
        let r = route("//x?y").immediate_response(opts).unwrap();
        assert_eq!(r.status.as_u16(), 301);
        assert_eq!(r.headers["location"], "/x?y");
        let r = route("/metadata/identity\\oauth2/token")
            .immediate_response(opts)
            .unwrap();
        assert_eq!(r.status.as_u16(), 400);
        let r = route("/%zz").immediate_response(opts).unwrap();
        assert_eq!(r.status.as_u16(), 400);
        // A query no server would accept still gets an answer, never a panic.
        let r = route("//x?\n").immediate_response(opts).unwrap();
        assert_eq!(r.status.as_u16(), 400);
        for target in [
            "/metadata/identity/oauth2/token",
            "/host/token",
            "/metadata/instance",
            "/x",
        ] {
            assert!(route(target).immediate_response(opts).is_none(), "{target}");
        }
    }

    #[test]
    fn method_does_not_matter() {
        for method in [
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert_eq!(
                classify(&method, "/metadata/identity/oauth2/token"),
                Route::Token { query: "" }
            );
        }
    }

    #[test]
    fn decoded_path_for_logs() {
        assert_eq!(decoded_path("/a%20b?resource=secret"), "/a b");
        assert_eq!(decoded_path("/plain?x"), "/plain");
        assert_eq!(decoded_path("/bad%zz"), "/bad%zz");
    }
}
