//! Feeds arbitrary bytes to the IMDS protocol functions the NMI handler calls on client input.
//!
//! Input layout: byte 0 picks the method; the rest is split at the first NUL into the request
//! target (path + query, lossily decoded as UTF-8, as a server hands it over) and a `Metadata`
//! header value; the bytes after a second NUL, if any, are the `podns` header value.
//! Beyond "no panic" it checks the invariants the handler relies on: a redirect never leads to
//! another redirect, a parsed query always has a resource, error responses carry a correct
//! `Content-Length`.
#![no_main]

use http::{HeaderMap, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use podid_imds::{
    ErrorBodyStyle, ErrorOptions, Route, check_metadata_header, classify, parse_token_query,
    pod_headers,
};

const METHODS: [Method; 4] = [Method::GET, Method::POST, Method::OPTIONS, Method::CONNECT];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let method = &METHODS[usize::from(selector) % METHODS.len()];
    let mut parts = rest.splitn(3, |&b| b == 0);
    let target = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let metadata = parts.next().unwrap_or_default();
    let podns = parts.next().unwrap_or_default();

    let mut headers = HeaderMap::new();
    if let Ok(value) = HeaderValue::from_bytes(metadata) {
        headers.insert("metadata", value);
    }
    if let Ok(value) = HeaderValue::from_bytes(podns) {
        headers.insert("podns", value.clone());
        headers.insert("podname", value);
    }
    let options = ErrorOptions {
        style: if selector & 0x80 == 0 {
            ErrorBodyStyle::ImdsJson
        } else {
            ErrorBodyStyle::GoPlainText
        },
        set_retry_after_header: selector & 0x40 != 0,
        not_found_for_final_refusals: selector & 0x20 != 0,
    };
    let answer = |error: podid_imds::ImdsError| {
        let response = error.response(options);
        assert_eq!(
            response.headers["content-length"].to_str().ok(),
            Some(response.body.len().to_string().as_str())
        );
    };

    match classify(method, &target) {
        Route::Redirect { location } => {
            let next = classify(method, &location);
            assert!(!matches!(
                next,
                Route::Redirect { .. } | Route::MalformedRequestTarget
            ));
        }
        Route::Token { query } | Route::HostToken { query } => {
            if let Err(error) = check_metadata_header(&headers) {
                answer(error);
            }
            if let Err(error) = pod_headers(&headers) {
                answer(error);
            }
            match parse_token_query(query) {
                Ok(parsed) => assert!(!parsed.resource.is_empty()),
                Err(error) => answer(error),
            }
        }
        Route::InvalidTokenPath => answer(podid_imds::ImdsError::InvalidTokenPath),
        Route::TokenPathCase => answer(podid_imds::ImdsError::TokenPathCase),
        Route::MalformedRequestTarget => answer(podid_imds::ImdsError::MalformedRequestTarget),
        Route::InstanceMetadata | Route::Passthrough => {
            if let Err(error) = check_metadata_header(&headers) {
                answer(error);
            }
        }
    }
});
