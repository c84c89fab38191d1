//! Property tests: arbitrary request targets, queries and header values never panic, always get
//! a classification, and the classification is self-consistent.
#![allow(clippy::unwrap_used)]

use http::{HeaderMap, HeaderValue, Method};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use podid_imds::{
    ErrorBodyStyle, ErrorOptions, IdentitySelector, ImdsError, Route, check_metadata_header,
    classify, parse_token_query, pod_headers, redirect_response,
};
use proptest::prelude::*;

/// Request targets biased towards the interesting shapes: the token path, dot segments, doubled
/// slashes, percent escapes (valid and not), backslashes, newlines, case changes.
fn target() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("/".to_owned()),
        Just("//".to_owned()),
        Just("/.".to_owned()),
        Just("/..".to_owned()),
        Just("metadata".to_owned()),
        Just("MetaData".to_owned()),
        Just("/metadata/identity/oauth2/token".to_owned()),
        Just("identity".to_owned()),
        Just("oauth2".to_owned()),
        Just("token".to_owned()),
        Just("instance".to_owned()),
        Just("/host/token".to_owned()),
        Just("\\".to_owned()),
        Just("%2F".to_owned()),
        Just("%2e".to_owned()),
        Just("%0A".to_owned()),
        Just("%5C".to_owned()),
        Just("%".to_owned()),
        Just("%zz".to_owned()),
        Just("%FF".to_owned()),
        Just("?".to_owned()),
        Just("&".to_owned()),
        Just("=".to_owned()),
        Just("resource".to_owned()),
        "[ -~]{0,4}",
        any::<String>(),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// No letter case of the token path (plus any clean suffix) is ever proxied: it is the
    /// token route or the refused case variant.
    #[test]
    fn token_path_in_any_case_is_never_proxied(
        flips in proptest::collection::vec(any::<bool>(), 31),
        suffix in "[a-zA-Z0-9/?=&]{0,8}",
    ) {
        let path: String = "/metadata/identity/oauth2/token"
            .chars()
            .zip(flips)
            .map(|(c, flip)| if flip { c.to_ascii_uppercase() } else { c })
            .collect();
        let target = format!("{path}{suffix}");
        let route = classify(&Method::GET, &target);
        prop_assert!(
            matches!(
                route,
                Route::Token { .. } | Route::TokenPathCase | Route::Redirect { .. }
            ),
            "{target:?} -> {route:?}"
        );
        if let Route::Redirect { location } = route {
            let next = classify(&Method::GET, &location);
            prop_assert!(
                matches!(next, Route::Token { .. } | Route::TokenPathCase),
                "{target:?} -> {location:?} -> {next:?}"
            );
        }
    }

    #[test]
    fn classify_never_panics_and_redirects_are_stable(target in target()) {
        let route = classify(&Method::GET, &target);
        if let Route::Redirect { location } = &route {
            // Following the redirect never redirects again and never fails to parse.
            let next = classify(&Method::GET, location);
            prop_assert!(!matches!(next, Route::Redirect { .. }), "{target:?} -> {location:?} -> {next:?}");
            prop_assert!(!matches!(next, Route::MalformedRequestTarget), "{target:?} -> {location:?}");
            prop_assert!(location.starts_with('/'));
            // The query travels verbatim.
            let query = target.split_once('?').map(|(_, q)| q);
            prop_assert_eq!(location.split_once('?').map(|(_, q)| q), query);
            // For a target a server would accept (visible ASCII), the Location is a valid header.
            if target.bytes().all(|b| b.is_ascii_graphic()) {
                prop_assert!(redirect_response(location).is_some());
            }
        }
        if let Route::Token { query } | Route::HostToken { query } = route {
            prop_assert!(target.ends_with(query));
        }
        // The method never matters.
        prop_assert_eq!(classify(&Method::POST, &target), classify(&Method::GET, &target));
    }

    #[test]
    fn parse_token_query_never_panics(query in target()) {
        if let Ok(parsed) = parse_token_query(&query) {
            prop_assert!(!parsed.resource.is_empty());
            match parsed.selector {
                IdentitySelector::ClientId(id)
                | IdentitySelector::ResourceId(id)
                | IdentitySelector::ObjectId(id) => prop_assert!(!id.is_empty()),
                IdentitySelector::None => {}
            }
        }
    }

    #[test]
    fn escaped_values_round_trip(resource in "\\PC{1,40}", client_id in "\\PC{0,40}", raw in any::<bool>()) {
        let enc = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
        let query = format!("api-version=2018-02-01&resource={}&client_id={}", enc(&resource), enc(&client_id));
        let parsed = parse_token_query(&query).unwrap();
        prop_assert_eq!(&parsed.resource, &resource);
        if client_id.is_empty() {
            prop_assert_eq!(parsed.selector, IdentitySelector::None);
        } else {
            prop_assert_eq!(parsed.selector, IdentitySelector::ClientId(client_id.clone().into()));
        }
        // Python sends resource unescaped: anything without the separators `&`, `;`, `%`, `+`,
        // `#` survives as is.
        if raw && !resource.contains(['&', ';', '%', '+', '#']) {
            let raw_query = format!("resource={resource}");
            let parsed = parse_token_query(&raw_query).unwrap();
            prop_assert_eq!(&parsed.resource, &resource);
        }
    }

    #[test]
    fn header_checks_never_panic(value in proptest::collection::vec(any::<u8>(), 0..16), ns in "\\PC{0,8}") {
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            headers.insert("metadata", value.clone());
            headers.insert("podname", value);
            let ok = check_metadata_header(&headers).is_ok();
            prop_assert_eq!(ok, headers["metadata"].as_bytes() == b"true");
        }
        if let Ok(ns) = HeaderValue::from_str(&ns) {
            headers.insert("podns", ns);
        }
        let _ = pod_headers(&headers);
    }

    #[test]
    fn error_responses_are_well_formed(detail in any::<String>(), retry in any::<bool>(), go in any::<bool>(), upstream in any::<bool>()) {
        let options = ErrorOptions {
            style: if go { ErrorBodyStyle::GoPlainText } else { ErrorBodyStyle::ImdsJson },
            set_retry_after_header: retry,
            not_found_for_final_refusals: upstream,
        };
        for error in [
            ImdsError::TokenRefused { detail: detail.clone() },
            ImdsError::TokenUnavailable { detail: detail.clone() },
            ImdsError::Internal { detail: detail.clone() },
            ImdsError::identity_not_found(Some(&detail)),
        ] {
            let r = error.response(options);
            prop_assert_eq!(r.headers["content-length"].to_str().unwrap(), r.body.len().to_string());
            if !go {
                let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
                prop_assert_eq!(v["error_description"].as_str().unwrap(), error.to_string());
            }
        }
    }
}
