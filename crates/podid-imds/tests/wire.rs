//! Wire-compatibility tests: every status, header set and body the NMI port can produce, as exact
//! bytes. Inline assertions pin the bodies quoted in docs/upstream.md (token endpoint, response
//! bodies, status codes); golden files under `tests/golden/` pin the full responses of every error
//! in both body styles.
//!
//! Regenerate the golden files after an intended change with
//! `UPDATE_GOLDEN=1 cargo test -p podid-imds --test wire` and review the diff.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use http::StatusCode;
use podid_imds::{
    ErrorBodyStyle, ErrorOptions, HostTokenResponse, ImdsError, TokenResponse, WireResponse,
    redirect_response, token_list_response,
};

const JSON: ErrorOptions = ErrorOptions {
    style: ErrorBodyStyle::ImdsJson,
    set_retry_after_header: false,
    not_found_for_final_refusals: false,
};
const GO: ErrorOptions = ErrorOptions {
    style: ErrorBodyStyle::GoPlainText,
    set_retry_after_header: false,
    not_found_for_final_refusals: false,
};
const GO_RETRY: ErrorOptions = ErrorOptions {
    style: ErrorBodyStyle::GoPlainText,
    set_retry_after_header: true,
    not_found_for_final_refusals: false,
};
const JSON_RETRY: ErrorOptions = ErrorOptions {
    style: ErrorBodyStyle::ImdsJson,
    set_retry_after_header: true,
    not_found_for_final_refusals: false,
};

/// `options` with upstream's 404 for final refusals.
const fn upstream_not_found(options: ErrorOptions) -> ErrorOptions {
    ErrorOptions {
        not_found_for_final_refusals: true,
        ..options
    }
}

/// `HTTP <code>`, headers sorted by name as `name: value`, a blank line, then the body bytes.
fn render(response: &WireResponse) -> Vec<u8> {
    let mut headers: Vec<(String, String)> = response
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect();
    headers.sort();
    let mut out = format!("HTTP {}\n", response.status.as_u16()).into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\n").as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(&response.body);
    out
}

fn golden(name: &str, response: &WireResponse) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let actual = render(response);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
            path.display()
        )
    });
    assert_eq!(
        String::from_utf8_lossy(&actual),
        String::from_utf8_lossy(&expected),
        "golden file {name} differs"
    );
    assert_eq!(actual, expected, "golden file {name} differs in bytes");
}

fn pod_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 244, 1, 7))
}

/// One value of every variant, named for its golden file.
fn all_errors() -> Vec<(&'static str, ImdsError)> {
    vec![
        ("missing-metadata-header", ImdsError::MissingMetadataHeader),
        ("empty-resource", ImdsError::EmptyResource),
        ("invalid-token-path", ImdsError::InvalidTokenPath),
        ("token-path-case", ImdsError::TokenPathCase),
        ("malformed-request-target", ImdsError::MalformedRequestTarget),
        ("missing-pod-headers", ImdsError::MissingPodHeaders),
        ("conflicting-selectors", ImdsError::ConflictingIdentitySelectors),
        (
            "invalid-parameter-encoding",
            ImdsError::InvalidParameterEncoding { parameter: "resource" },
        ),
        (
            "unsupported-selector",
            ImdsError::UnsupportedIdentitySelector { parameter: "object_id" },
        ),
        (
            "workload-identity-selector",
            ImdsError::WorkloadIdentitySelector {
                parameter: "msi_res_id",
            },
        ),
        ("instance-metadata-blocked", ImdsError::InstanceMetadataBlocked),
        (
            "identity-not-found",
            ImdsError::identity_not_found(Some("77788899-f67e-42e1-9a78-89985f6bff3e")),
        ),
        ("identity-not-found-no-client-id", ImdsError::identity_not_found(None)),
        (
            "no-identity-for-pod",
            ImdsError::NoIdentityForPod { namespace: "default".into(), pod: "web-0".into() },
        ),
        (
            "assignment-pending",
            ImdsError::AssignmentPending { namespace: "default".into(), pod: "web-0".into() },
        ),
        (
            "token-refused",
            ImdsError::TokenRefused {
                detail: "adal: Refresh request failed. Status Code = '400'. Response body: \
                         {\"error\":\"invalid_request\",\"error_description\":\"Identity not found\"} \
                         Endpoint http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01&client_id=c&resource=r"
                    .into(),
            },
        ),
        (
            "token-unavailable",
            ImdsError::TokenUnavailable {
                detail: "dial tcp 169.254.169.254:80: connect: connection refused".into(),
            },
        ),
        ("remote-address-empty", ImdsError::RemoteAddressEmpty),
        ("not-from-host", ImdsError::NotFromHost),
        ("no-pod-for-address", ImdsError::NoPodForAddress { ip: pod_ip() }),
        (
            "ambiguous-pod-address",
            ImdsError::AmbiguousPodAddress { ip: pod_ip(), count: 2 },
        ),
        (
            "internal",
            ImdsError::Internal { detail: "Get \"http://169.254.169.254:80/x\": EOF".into() },
        ),
    ]
}

#[test]
fn every_error_matches_its_golden_files() {
    for (name, error) in all_errors() {
        golden(&format!("error-{name}.json.http"), &error.response(JSON));
        golden(&format!("error-{name}.go.http"), &error.response(GO));
        if error.is_identity_selection_error() {
            golden(
                &format!("error-{name}.go-retry-after.http"),
                &error.response(GO_RETRY),
            );
            golden(
                &format!("error-{name}.json-retry-after.http"),
                &error.response(JSON_RETRY),
            );
        }
        if error.is_final_refusal() {
            for (style, options) in [
                ("json", JSON),
                ("go", GO),
                ("json-retry-after", JSON_RETRY),
                ("go-retry-after", GO_RETRY),
            ] {
                golden(
                    &format!("error-{name}.{style}-upstream-404.http"),
                    &error.response(upstream_not_found(options)),
                );
            }
        }
    }
}

/// The bodies quoted in the reference, asserted byte for byte without golden files.
#[test]
fn upstream_bodies_byte_for_byte() {
    let metadata = br#"{"error":"invalid_request","error_description":"Required metadata header not specified"}
"#;
    assert_eq!(metadata.len(), 89, "89 bytes");
    for options in [JSON, GO, GO_RETRY] {
        let r = ImdsError::MissingMetadataHeader.response(options);
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        assert_eq!(r.body, metadata);
        assert_eq!(r.headers["content-type"], "application/json; charset=utf-8");
        assert_eq!(r.headers["content-length"], "89");
        assert!(r.headers.get("x-content-type-options").is_none());
        assert!(r.headers.get("retry-after").is_none());
    }

    let plain: [(ImdsError, u16, &[u8]); 7] = [
        (
            ImdsError::EmptyResource,
            400,
            b"parameter resource cannot be empty\n",
        ),
        (ImdsError::InvalidTokenPath, 400, b"Invalid request\n"),
        (
            ImdsError::MissingPodHeaders,
            400,
            b"missing 'podname' and 'podns' from request header\n",
        ),
        (
            ImdsError::InstanceMetadataBlocked,
            403,
            b"Request blocked by AAD Pod Identity NMI\n",
        ),
        (
            ImdsError::RemoteAddressEmpty,
            500,
            b"request remote address is empty\n",
        ),
        (
            ImdsError::NotFromHost,
            500,
            b"request remote address is not from a host\n",
        ),
        (
            ImdsError::NoPodForAddress { ip: pod_ip() },
            500,
            b"pod list is empty\n",
        ),
    ];
    for (error, status, body) in plain {
        let r = error.response(GO);
        assert_eq!(r.status.as_u16(), status, "{error:?}");
        assert_eq!(r.body, body, "{error:?}");
        assert_eq!(r.headers["content-type"], "text/plain; charset=utf-8");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
        assert_eq!(r.headers["content-length"], body.len().to_string().as_str());
    }

    // Upstream's status for a refusal, restored by --not-found-for-final-refusals.
    let not_found = ImdsError::identity_not_found(Some("77788899-f67e-42e1-9a78-89985f6bff3e"));
    let r = not_found.response(upstream_not_found(GO));
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(
        r.body,
        b"no azure identity found for request clientID 7778##### REDACTED #####ff3e\n"
    );
    assert!(r.headers.get("retry-after").is_none());
    let r = not_found.response(upstream_not_found(GO_RETRY));
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["retry-after"], "20");

    // Retry-After is only for identity selection; token 503s and other errors never get it.
    for error in [
        ImdsError::TokenUnavailable { detail: "x".into() },
        ImdsError::TokenRefused { detail: "x".into() },
        ImdsError::EmptyResource,
    ] {
        let r = error.response(GO_RETRY);
        assert!(r.headers.get("retry-after").is_none(), "{error:?}");
        assert_eq!(r.status, error.status(GO), "{error:?}");
    }
}

/// A final refusal is the real IMDS's answer for an identity the VM lacks (400
/// `invalid_request`, never retried by the SDKs) whatever `--set-retry-after-header` says; an
/// assignment in progress keeps the answers that ask the client to come back.
#[test]
fn final_refusals_are_400_and_pending_assignments_stay_retryable() {
    let pod = || ("default".to_owned(), "web-0".to_owned());
    let finals = [
        ImdsError::identity_not_found(Some("77788899-f67e-42e1-9a78-89985f6bff3e")),
        ImdsError::identity_not_found(None),
        ImdsError::NoIdentityForPod {
            namespace: pod().0,
            pod: pod().1,
        },
    ];
    for error in &finals {
        assert!(error.is_final_refusal(), "{error:?}");
        for options in [JSON, GO, JSON_RETRY, GO_RETRY] {
            let r = error.response(options);
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{error:?} {options:?}");
            assert!(r.headers.get("retry-after").is_none(), "{error:?}");
        }
        let v: serde_json::Value = serde_json::from_slice(&error.response(JSON).body).unwrap();
        assert_eq!(v["error"], "invalid_request");
        assert_eq!(v["error_description"], error.to_string());
    }
    let pending = ImdsError::AssignmentPending {
        namespace: pod().0,
        pod: pod().1,
    };
    assert!(!pending.is_final_refusal());
    assert_eq!(pending.response(JSON).status, StatusCode::NOT_FOUND);
    let r = pending.response(JSON_RETRY);
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers["retry-after"], "20");
}

#[test]
fn json_error_bodies_carry_upstream_messages() {
    for (name, error) in all_errors() {
        let r = error.response(JSON);
        assert_eq!(
            r.status,
            error.status(GO),
            "{name}: same status in both styles"
        );
        assert_eq!(
            r.headers["content-type"], "application/json; charset=utf-8",
            "{name}"
        );
        assert_eq!(*r.body.last().unwrap(), b'\n', "{name}");
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["error"], error.error_code(), "{name}");
        assert_eq!(v["error_description"], error.to_string(), "{name}");
        assert_eq!(v.as_object().unwrap().len(), 2, "{name}");
    }
}

#[test]
fn token_body_matches_reference_example() {
    // docs/upstream.md#response-bodies, with now = expires_on - 86399.
    let now = UNIX_EPOCH + Duration::from_secs(1_690_000_000 - 86_399);
    let token = TokenResponse::new("…", "https://vault.azure.net", 1_690_000_000, now)
        .with_not_before(1_689_913_300);
    let expected = r#"{"access_token":"…","refresh_token":"","expires_in":"86399","expires_on":"1690000000","not_before":"1689913300","resource":"https://vault.azure.net","token_type":"Bearer"}"#;
    assert_eq!(String::from_utf8(token.to_json()).unwrap(), expected);
    let r = token.response();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(
        r.headers["content-length"],
        expected.len().to_string().as_str()
    );
    assert_eq!(r.headers.len(), 2);
}

fn sample_token() -> TokenResponse<'static> {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    TokenResponse::new(
        "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL3ZhdWx0LmF6dXJlLm5ldCJ9.c2ln",
        "https://vault.azure.net",
        1_700_086_399,
        now,
    )
    .with_not_before(1_699_999_700)
}

#[test]
fn token_bodies_match_golden_files() {
    let token = sample_token();
    golden("token-upstream-keys.http", &token.response());
    golden(
        "token-imds-keys.http",
        &token
            .with_client_id("77788899-f67e-42e1-9a78-89985f6bff3e")
            .response(),
    );
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    golden(
        "token-no-not-before.http",
        &TokenResponse::new("t", "https://management.azure.com/", 1_700_003_600, now).response(),
    );
    let aux = TokenResponse::new("aux", "https://management.azure.com/", 1_700_003_000, now);
    golden(
        "token-multi-tenant.http",
        &token_list_response(&[token, aux]),
    );
    golden(
        "host-token.http",
        &HostTokenResponse {
            token,
            client_id: "77788899-f67e-42e1-9a78-89985f6bff3e",
        }
        .response(),
    );
    golden(
        "redirect.http",
        &redirect_response("/metadata/identity/oauth2/token?resource=https://vault.azure.net")
            .unwrap(),
    );
}

#[test]
fn token_with_imds_keys_exactly() {
    let body = sample_token().with_client_id("cid").to_json();
    let expected = concat!(
        r#"{"access_token":"eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL3ZhdWx0LmF6dXJlLm5ldCJ9.c2ln","#,
        r#""refresh_token":"","expires_in":"86399","expires_on":"1700086399","not_before":"1699999700","#,
        r#""resource":"https://vault.azure.net","token_type":"Bearer","client_id":"cid","ext_expires_in":"86399"}"#
    );
    assert_eq!(String::from_utf8(body).unwrap(), expected);
}

#[test]
fn host_token_uses_numbers_like_adal() {
    let now = UNIX_EPOCH + Duration::from_secs(100);
    let token = TokenResponse::new("t", "r", 160, now);
    let body = HostTokenResponse {
        token,
        client_id: "c",
    }
    .to_json();
    assert_eq!(
        String::from_utf8(body).unwrap(),
        r#"{"token":{"access_token":"t","refresh_token":"","expires_in":60,"expires_on":160,"not_before":0,"resource":"r","token_type":"Bearer"},"clientid":"c"}"#
    );
}

#[test]
fn token_strings_are_escaped_like_go() {
    let now = UNIX_EPOCH;
    let body = TokenResponse::new("a&b", "https://x/?a=1&b=<2>", 1, now).to_json();
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains(r#""access_token":"a\u0026b""#), "{body}");
    assert!(
        body.contains(r#""resource":"https://x/?a=1\u0026b=\u003c2\u003e""#),
        "{body}"
    );
}
