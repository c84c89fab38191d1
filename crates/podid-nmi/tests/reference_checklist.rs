//! The NMI compatibility checklist, one table per item, against the real IMDS server (`serve`),
//! the real pod index and matcher, and a fake token provider or the real broker with a fake IMDS.
//! The items, each checked against upstream's behaviour as docs/upstream.md describes it:
//!
//! 1. token path variants, malformed paths, path cleaning;
//! 2. the `Metadata` header on token and passthrough paths, and the exact 400 body;
//! 3. `resource` required, `api-version` not;
//! 4. finding the caller pod by source address;
//! 5. exceptions and the MIC short-circuit;
//! 6. standard-mode waiting on assignment states;
//! 7. requested client and resource ids, their case and precedence, `object_id`;
//! 8. namespaced filtering;
//! 9. token bodies (single, multi-tenant array, `/host/token`);
//! 10. token-source failures and `--set-retry-after-header`;
//! 11. `--block-instance-metadata` and the passthrough;
//! 12. `/healthz`, and no profiling endpoints;
//! 13. the iptables chain, its repair and its removal;
//! 14. metric names, types, labels and buckets;
//!
//! and the status-code table (docs/upstream.md#status-codes).
//!
//! Every row names its item, the input, and podid's expected answer. Where podid deliberately
//! differs from upstream the row says so (`fix:`), and docs/compatibility.md lists the
//! difference. A table reports every failing row at once.
//!
//! Item 13 (iptables) needs root and network namespaces (podid-netsim); it fails without root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser as _;
use common::*;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use podid_api::{
    AssignedIdentityState, AzureIdentity, AzurePodIdentityException, IdentityType, OperationMode,
};
use podid_broker::{
    BrokerConfig, BrokerError, ImdsConfig, ImdsLimiter, ImdsSource, LimiterConfig, SourceKind,
    Sources, SystemClock, TokenBroker,
};
use podid_fake_apiserver::FakeApiServer;
use podid_imds::ErrorBodyStyle;
use podid_netsim::SimNode;
use podid_nmi::config::Flags;
use podid_nmi::interception::{
    CHAIN, Interception, SystemIptables, enable_route_localnet, reconcile, uninstall,
};
use podid_nmi::provider::TokenProvider;
use podid_nmi::server::{ServerOptions, serve};
use podid_select::matching::{MatchOptions, NodeIdentity};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

// ---------------------------------------------------------------- table machinery

/// What a row expects in the body.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// 200 with a token minted by NMI for this client id (`token-for-<id>`).
    TokenFor(&'static str),
    /// The fake IMDS answered (passthrough): its 404 `not found` with `X-Imds: fake`.
    Proxied,
    /// An IMDS-style JSON error whose `error_description` is exactly this.
    Description(&'static str),
    /// An IMDS-style JSON error whose `error_description` starts with this.
    DescriptionPrefix(&'static str),
    /// Exactly this body.
    Body(&'static str),
    /// A redirect to this `Location`.
    Location(&'static str),
}

/// One table row.
#[derive(Debug, Clone, Copy)]
struct Row {
    /// Checklist item and case, e.g. `#1 trailing slash`.
    item: &'static str,
    /// Request target.
    target: &'static str,
    /// Request headers.
    headers: &'static [(&'static str, &'static str)],
    /// Expected status.
    status: u16,
    /// Expected body.
    expect: Expect,
}

const NO_HEADERS: &[(&str, &str)] = &[];

/// Check one reply against `row`; `Err` describes the mismatch.
fn check(row: &Row, reply: &Reply) -> Result<(), String> {
    let mut problems = String::new();
    if reply.status != row.status {
        let _ = write!(problems, "status {} (want {}); ", reply.status, row.status);
    }
    let description = || {
        serde_json::from_str::<serde_json::Value>(&reply.body)
            .ok()
            .and_then(|v| v["error_description"].as_str().map(str::to_owned))
    };
    match row.expect {
        Expect::TokenFor(client_id) => {
            let want = format!("token-for-{client_id}");
            let got = serde_json::from_str::<serde_json::Value>(&reply.body)
                .ok()
                .and_then(|v| v["access_token"].as_str().map(str::to_owned));
            if got.as_deref() != Some(want.as_str()) {
                let _ = write!(problems, "access_token {got:?} (want {want}); ");
            }
        }
        Expect::Proxied => {
            if reply.headers.get("x-imds").map(String::as_str) != Some("fake")
                || reply.body != "not found"
            {
                let _ = write!(problems, "not the fake IMDS's answer; ");
            }
        }
        Expect::Description(want) => {
            if description().as_deref() != Some(want) {
                let _ = write!(
                    problems,
                    "error_description {:?} (want {want:?}); ",
                    description()
                );
            }
        }
        Expect::DescriptionPrefix(want) => {
            if !description().is_some_and(|d| d.starts_with(want)) {
                let _ = write!(
                    problems,
                    "error_description {:?} (want prefix {want:?}); ",
                    description()
                );
            }
        }
        Expect::Body(want) => {
            if reply.body != want {
                let _ = write!(problems, "body {:?} (want {want:?}); ", reply.body);
            }
        }
        Expect::Location(want) => {
            if reply.headers.get("location").map(String::as_str) != Some(want) {
                let _ = write!(
                    problems,
                    "location {:?} (want {want:?}); ",
                    reply.headers.get("location")
                );
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} — GET {} {:?}: {problems}body {:?}",
            row.item, row.target, row.headers, reply.body
        ))
    }
}

/// Send every row to `nmi` (from 127.0.0.1) and fail listing all mismatching rows.
async fn run_table(nmi: &Nmi, rows: &[Row]) {
    let mut failures = Vec::new();
    for row in rows {
        let reply = request(nmi.addr, row.target, row.headers).await;
        if let Err(problem) = check(row, &reply) {
            failures.push(problem);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

fn assigned_a() -> Objects {
    Objects::bound("app", CLIENT_A, AssignedIdentityState::Assigned)
}

const BINDING_LABEL: &[(&str, &str)] = &[("aadpodidbinding", "kv")];

// ---------------------------------------------------------------- #1 token path variants

const CASE_VARIANT: &str =
    "Invalid request: the token path is case-sensitive; use /metadata/identity/oauth2/token";

/// #1 (docs/upstream.md#routing): token path variants are served, `Identity` with a capital I is
/// refused (podid), backslash variants are 400 `Invalid request`, unclean paths are 301 to the
/// cleaned path.
#[tokio::test]
async fn item_01_token_path_variants() {
    let nmi = start(&assigned_a()).await;
    run_table(
        &nmi,
        &[
            Row {
                item: "#1 canonical path",
                target: "/metadata/identity/oauth2/token?resource=r",
                headers: META,
                status: 200,
                expect: Expect::TokenFor(CLIENT_A),
            },
            Row {
                item: "#1 trailing slash",
                target: "/metadata/identity/oauth2/token/?resource=r",
                headers: META,
                status: 200,
                expect: Expect::TokenFor(CLIENT_A),
            },
            Row {
                item: "#1 /Metadata (segment case-insensitive)",
                target: "/Metadata/identity/oauth2/token?resource=r",
                headers: META,
                status: 200,
                expect: Expect::TokenFor(CLIENT_A),
            },
            Row {
                item: "#1 /METADATA",
                target: "/METADATA/identity/oauth2/token?resource=r",
                headers: META,
                status: 200,
                expect: Expect::TokenFor(CLIENT_A),
            },
            Row {
                item: "#1 string prefix match (tokenXYZ)",
                target: "/metadata/identity/oauth2/tokenXYZ?resource=r",
                headers: META,
                status: 200,
                expect: Expect::TokenFor(CLIENT_A),
            },
            // podid deviation (docs/compatibility.md): upstream proxied case variants of the
            // token path to IMDS unattributed; podid answers 400 and never proxies them.
            Row {
                item: "#1 /metadata/Identity (capital I) is refused, not proxied",
                target: "/metadata/Identity/oauth2/token?resource=r",
                headers: META,
                status: 400,
                expect: Expect::Description(CASE_VARIANT),
            },
            Row {
                item: "#1 /metadata/identity/OAUTH2/token is refused, not proxied",
                target: "/metadata/identity/OAUTH2/token?resource=r",
                headers: NO_HEADERS,
                status: 400,
                expect: Expect::Description(CASE_VARIANT),
            },
            Row {
                item: "#1 backslash before oauth2",
                target: "/metadata/identity\\oauth2/token/",
                headers: META,
                status: 400,
                expect: Expect::Description("Invalid request"),
            },
            Row {
                item: "#1 backslashes around oauth2",
                target: "/metadata/identity/\\oauth2\\token/",
                headers: META,
                status: 400,
                expect: Expect::Description("Invalid request"),
            },
            Row {
                item: "#1 invalid path is 400 before the header check",
                target: "/metadata/identity\\oauth2/token/",
                headers: NO_HEADERS,
                status: 400,
                expect: Expect::Description("Invalid request"),
            },
            Row {
                item: "#1 //metadata → 301, query kept",
                target: "//metadata/identity/oauth2/token?resource=r",
                headers: NO_HEADERS,
                status: 301,
                expect: Expect::Location("/metadata/identity/oauth2/token?resource=r"),
            },
            Row {
                item: "#1 dot-dot → 301 to the cleaned path",
                target: "/metadata/x/../identity/oauth2/token?resource=r",
                headers: META,
                status: 301,
                expect: Expect::Location("/metadata/identity/oauth2/token?resource=r"),
            },
            Row {
                item: "#1 cleaning keeps a trailing slash",
                target: "//metadata/identity/oauth2/token/",
                headers: NO_HEADERS,
                status: 301,
                expect: Expect::Location("/metadata/identity/oauth2/token/"),
            },
            Row {
                item: "#1 percent-encoded slashes are decoded before routing (Go's URL.Path)",
                target: "/metadata/identity%2Foauth2%2Ftoken?resource=r",
                headers: META,
                status: 200,
                expect: Expect::TokenFor(CLIENT_A),
            },
        ],
    )
    .await;
    // No method restrictions: POST is served like GET.
    let reply = send_raw(
        nmi.addr,
        b"POST /metadata/identity/oauth2/token?resource=r HTTP/1.1\r\nHost: x\r\nMetadata: true\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 200, "#1 POST: {}", reply.body);
}

// ---------------------------------------------------------------- #2 Metadata header

/// IMDS's own 400 body for a missing header, byte for byte (89 bytes with the newline).
const MISSING_HEADER_BODY: &str = "{\"error\":\"invalid_request\",\"error_description\":\"Required metadata header not specified\"}\n";

/// #2 (docs/upstream.md#token-endpoint step 1, docs/upstream.md#passthrough): `Metadata: true`
/// (name in any case, value exact) on token and passthrough paths; IMDS's exact 400 body and
/// content type otherwise.
#[tokio::test]
async fn item_02_metadata_header() {
    assert_eq!(MISSING_HEADER_BODY.len(), 89);
    let nmi = start(&assigned_a()).await;
    let rows = [
        Row {
            item: "#2 token, no header",
            target: TOKEN_PATH,
            headers: NO_HEADERS,
            status: 400,
            expect: Expect::Body(MISSING_HEADER_BODY),
        },
        Row {
            item: "#2 token, Metadata: True (value case-sensitive)",
            target: TOKEN_PATH,
            headers: &[("Metadata", "True")],
            status: 400,
            expect: Expect::Body(MISSING_HEADER_BODY),
        },
        Row {
            item: "#2 token, Metadata: false",
            target: TOKEN_PATH,
            headers: &[("Metadata", "false")],
            status: 400,
            expect: Expect::Body(MISSING_HEADER_BODY),
        },
        Row {
            item: "#2 token, Metadata: true",
            target: TOKEN_PATH,
            headers: META,
            status: 200,
            expect: Expect::TokenFor(CLIENT_A),
        },
        Row {
            item: "#2 token, metadata: true (name case-insensitive, Rust SDK)",
            target: TOKEN_PATH,
            headers: &[("metadata", "true")],
            status: 200,
            expect: Expect::TokenFor(CLIENT_A),
        },
        Row {
            item: "#2 passthrough, no header",
            target: "/metadata/instance?api-version=2021-02-01",
            headers: NO_HEADERS,
            status: 400,
            expect: Expect::Body(MISSING_HEADER_BODY),
        },
        Row {
            item: "#2 passthrough of a non-Azure path, no header (issue #1239)",
            target: "/latest/meta-data/",
            headers: NO_HEADERS,
            status: 400,
            expect: Expect::Body(MISSING_HEADER_BODY),
        },
        Row {
            item: "#2 passthrough, Metadata: True",
            target: "/doesnotexist",
            headers: &[("Metadata", "True")],
            status: 400,
            expect: Expect::Body(MISSING_HEADER_BODY),
        },
        Row {
            item: "#2 passthrough, Metadata: true",
            target: "/doesnotexist",
            headers: META,
            status: 404,
            expect: Expect::Proxied,
        },
    ];
    run_table(&nmi, &rows).await;
    let reply = request(nmi.addr, TOKEN_PATH, NO_HEADERS).await;
    assert_eq!(
        reply.headers["content-type"], "application/json; charset=utf-8",
        "#2 content type of the 400"
    );
    assert_eq!(reply.headers["content-length"], "89");
    // The body is IMDS's JSON also with upstream's plain-text error style (as upstream).
    let text = start_with(
        &assigned_a(),
        BINDING_LABEL,
        |o| o.errors.style = ErrorBodyStyle::GoPlainText,
        Default::default(),
    )
    .await;
    run_table(&text, &rows[..1]).await;
    // --metadata-header-required=false: neither route checks it.
    let off = start_with(
        &assigned_a(),
        BINDING_LABEL,
        |o| o.metadata_header_required = false,
        Default::default(),
    )
    .await;
    run_table(
        &off,
        &[
            Row {
                item: "#2 header not required: token",
                target: TOKEN_PATH,
                headers: NO_HEADERS,
                status: 200,
                expect: Expect::TokenFor(CLIENT_A),
            },
            Row {
                item: "#2 header not required: passthrough",
                target: "/doesnotexist",
                headers: NO_HEADERS,
                status: 404,
                expect: Expect::Proxied,
            },
        ],
    )
    .await;
}

// ---------------------------------------------------------------- #3 resource, api-version

/// #3 (docs/upstream.md#token-endpoint step 3): `resource` is required; `api-version` is never
/// required or validated.
#[tokio::test]
async fn item_03_resource_and_api_version() {
    let nmi = start(&assigned_a()).await;
    let rows = [
        Row {
            item: "#3 no resource",
            target: "/metadata/identity/oauth2/token?api-version=2018-02-01",
            headers: META,
            status: 400,
            expect: Expect::Description("parameter resource cannot be empty"),
        },
        Row {
            item: "#3 empty resource",
            target: "/metadata/identity/oauth2/token?resource=&api-version=2018-02-01",
            headers: META,
            status: 400,
            expect: Expect::Description("parameter resource cannot be empty"),
        },
        Row {
            item: "#3 no query at all",
            target: "/metadata/identity/oauth2/token",
            headers: META,
            status: 400,
            expect: Expect::Description("parameter resource cannot be empty"),
        },
        Row {
            item: "#3 api-version absent → still 200",
            target: "/metadata/identity/oauth2/token?resource=https%3A%2F%2Fvault.azure.net",
            headers: META,
            status: 200,
            expect: Expect::TokenFor(CLIENT_A),
        },
        Row {
            item: "#3 any api-version (Rust SDK 2019-08-01)",
            target: "/metadata/identity/oauth2/token?api-version=2019-08-01&resource=r",
            headers: META,
            status: 200,
            expect: Expect::TokenFor(CLIENT_A),
        },
        Row {
            item: "#3 nonsense api-version",
            target: "/metadata/identity/oauth2/token?api-version=garbage&resource=r",
            headers: META,
            status: 200,
            expect: Expect::TokenFor(CLIENT_A),
        },
        Row {
            item: "#3 unescaped resource (Python SDK)",
            target: "/metadata/identity/oauth2/token?resource=https://vault.azure.net",
            headers: META,
            status: 200,
            expect: Expect::TokenFor(CLIENT_A),
        },
        Row {
            item: "#3 a pair with ';' is dropped (Go's url.ParseQuery) → no resource",
            target: "/metadata/identity/oauth2/token?resource=https://vault.azure.net;x",
            headers: META,
            status: 400,
            expect: Expect::Description("parameter resource cannot be empty"),
        },
    ];
    run_table(&nmi, &rows).await;
    // Only the missing resource is refused before any token is fetched.
    assert_eq!(nmi.provider.asked().len(), 4);
    let reply = request(
        nmi.addr,
        "/metadata/identity/oauth2/token?resource=https://vault.azure.net",
        META,
    )
    .await;
    assert_eq!(reply.json()["resource"], "https://vault.azure.net");
    // Upstream's plain-text body with --error-format=text.
    let text = start_with(
        &assigned_a(),
        BINDING_LABEL,
        |o| o.errors.style = ErrorBodyStyle::GoPlainText,
        Default::default(),
    )
    .await;
    let reply = request(text.addr, rows[0].target, META).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (400, "parameter resource cannot be empty\n")
    );
    assert_eq!(reply.headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(reply.headers["x-content-type-options"], "nosniff");
}

// ---------------------------------------------------------------- rows with a source address

/// A row sent from `127.0.0.<source>`, checking what the token provider was asked for.
#[derive(Debug, Clone)]
struct Case {
    item: &'static str,
    /// Last octet of the 127.0.0.0/8 source address.
    source: u8,
    target: String,
    headers: &'static [(&'static str, &'static str)],
    status: u16,
    expect: Expect,
    /// What the provider must have been asked for by this request (`None`: nothing).
    asked: Option<Asked>,
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn token_path(extra: &str) -> String {
    format!("{TOKEN_PATH}{extra}")
}

async fn run_cases(nmi: &Nmi, cases: &[Case]) {
    let mut failures = Vec::new();
    for case in cases {
        let before = nmi.provider.asked();
        let reply = request_from(loopback(case.source), nmi.addr, &case.target, case.headers).await;
        let row = Row {
            item: case.item,
            target: "",
            headers: case.headers,
            status: case.status,
            expect: case.expect,
        };
        let mut problem = check(&row, &reply).err().unwrap_or_default();
        let after = nmi.provider.asked();
        let new: Vec<Asked> = after[before.len()..].to_vec();
        let want: Vec<Asked> = case.asked.iter().cloned().collect();
        if new != want {
            let _ = write!(problem, " provider asked {new:?} (want {want:?});");
        }
        if !problem.is_empty() {
            failures.push(format!(
                "{} [from 127.0.0.{} {}]: {problem}",
                case.item, case.source, case.target
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn with_phase(mut pod: Pod, phase: &str) -> Pod {
    pod.status.as_mut().unwrap().phase = Some(phase.into());
    pod
}

fn on_host_network(mut pod: Pod) -> Pod {
    pod.spec.as_mut().unwrap().host_network = Some(true);
    pod
}

fn owned_by_replica_set(mut pod: Pod, replica_set: &str) -> Pod {
    pod.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: replica_set.into(),
        uid: "uid".into(),
        ..Default::default()
    }]);
    pod
}

fn identity(ns: &str, name: &str, client_id: &str) -> AzureIdentity {
    AzureIdentity::user_assigned(ns, name, &rid(name), client_id)
}

// ---------------------------------------------------------------- #4 caller pod

/// #4 (docs/upstream.md#finding-the-caller): the caller is the one Pending/Running pod with the
/// source address; unknown and ambiguous addresses are 500; finished and host-network pods never
/// match.
#[tokio::test]
async fn item_04_caller_pod_attribution() {
    let mut objects = Objects::empty();
    objects.add_for_pod(
        identity("app", "id", CLIENT_A),
        "web",
        AssignedIdentityState::Assigned,
    );
    objects.add_for_pod(
        identity("app", "id-b", CLIENT_B),
        "alive",
        AssignedIdentityState::Assigned,
    );
    let mut setup = Setup::new(&objects, BINDING_LABEL);
    setup.pods.extend([
        pod("app", "a", "127.0.0.2", BINDING_LABEL),
        pod("app", "b", "127.0.0.2", BINDING_LABEL),
        pod("app", "alive", "127.0.0.3", BINDING_LABEL),
        with_phase(pod("app", "done", "127.0.0.3", BINDING_LABEL), "Succeeded"),
        with_phase(
            pod("app", "finished", "127.0.0.4", BINDING_LABEL),
            "Succeeded",
        ),
        with_phase(pod("app", "failed", "127.0.0.8", BINDING_LABEL), "Failed"),
        on_host_network(pod("app", "hostnet", "127.0.0.5", BINDING_LABEL)),
        with_phase(pod("app", "starting", "127.0.0.6", &[]), "Pending"),
    ]);
    let nmi = start_setup(setup, |_| {}).await;
    let case = |item, source, status, expect, asked| Case {
        item,
        source,
        target: TOKEN_PATH.to_owned(),
        headers: META,
        status,
        expect,
        asked,
    };
    run_cases(
        &nmi,
        &[
            case(
                "#4 the Running pod with the address",
                1,
                200,
                Expect::TokenFor(CLIENT_A),
                Some(Asked::Identity(CLIENT_A.into())),
            ),
            case(
                "#4 unknown source address → 500",
                9,
                500,
                Expect::Description("pod list is empty"),
                None,
            ),
            // Upstream lists Go pointers here; podid names the address and the count.
            case(
                "#4 two pods with one address → 500 (fail closed)",
                2,
                500,
                Expect::Description("failed to match pod IP 127.0.0.2 with 2 pods"),
                None,
            ),
            case(
                "#4 a Succeeded pod sharing the address is ignored",
                3,
                200,
                Expect::TokenFor(CLIENT_B),
                Some(Asked::Identity(CLIENT_B.into())),
            ),
            case(
                "#4 only a Succeeded pod has the address → 500",
                4,
                500,
                Expect::Description("pod list is empty"),
                None,
            ),
            case(
                "#4 only a Failed pod has the address → 500",
                8,
                500,
                Expect::Description("pod list is empty"),
                None,
            ),
            // docs/ARCHITECTURE.md: host-network pods share the node's address and are never
            // indexed.
            case(
                "#4 a hostNetwork pod is never the caller",
                5,
                500,
                Expect::Description("pod list is empty"),
                None,
            ),
            case(
                "#4 a Pending pod is attributed",
                6,
                400,
                Expect::Description("no azure identity is bound to pod app/starting"),
                None,
            ),
        ],
    )
    .await;

    // The unknown-address answer comes after upstream's ≈1.2 s (5 lookups 300 ms apart); podid
    // waits that long on the pod watch instead of polling.
    let config = Flags::try_parse_from(["nmi", "--node=n"])
        .unwrap()
        .into_config_with_env(|_| None)
        .unwrap();
    let options = ServerOptions::from_config(&config);
    assert_eq!(options.pod_wait, Duration::from_millis(1200), "#4 pod wait");
    let nmi = start_with(
        &assigned_a(),
        BINDING_LABEL,
        |o| o.pod_wait = options.pod_wait,
        Default::default(),
    )
    .await;
    let started = Instant::now();
    let reply = request_from(loopback(9), nmi.addr, TOKEN_PATH, META).await;
    let elapsed = started.elapsed();
    assert_eq!(reply.status, 500, "#4 unknown address after the wait");
    assert!(
        elapsed >= Duration::from_millis(1200) && elapsed < Duration::from_secs(5),
        "#4 ≈1.2 s, took {elapsed:?}"
    );
    // A pod that shows up within the wait is served.
    let addr = nmi.addr;
    let late = tokio::spawn(async move { request_from(loopback(7), addr, TOKEN_PATH, META).await });
    nmi.state
        .pods
        .apply(&pod("app", "web", "127.0.0.7", BINDING_LABEL));
    let reply = late.await.unwrap();
    assert_eq!(
        reply.status, 200,
        "#4 pod appearing within the wait: {}",
        reply.body
    );
}

// ---------------------------------------------------------------- #5 exceptions

/// #5 (docs/upstream.md#exceptions): any single label of an exception in the pod's namespace (value
/// compared ignoring case) sends the request to the node's own identity; `client_id` is forwarded,
/// no selector means system-assigned.
#[tokio::test]
async fn item_05_exceptions() {
    let mut objects = Objects::empty();
    objects.exceptions.extend([
        AzurePodIdentityException::for_pod_labels(
            "app",
            "mic-exception",
            [
                ("app".to_owned(), "mic".to_owned()),
                ("component".to_owned(), "mic".to_owned()),
            ],
        ),
        AzurePodIdentityException::for_pod_labels(
            "other",
            "elsewhere",
            [("team".to_owned(), "x".to_owned())],
        ),
    ]);
    let mut setup = Setup::new(&objects, &[("app", "MIC")]);
    setup.pods.extend([
        pod("app", "team-x", "127.0.0.2", &[("team", "x")]),
        pod("app", "micro", "127.0.0.3", &[("app", "micro")]),
        owned_by_replica_set(
            pod("default", "mic-5d8f-abcde", "127.0.0.4", &[]),
            "mic-5d8f",
        ),
        owned_by_replica_set(
            pod("default", "microservice-7f9-xyz", "127.0.0.5", &[]),
            "microservice-7f9",
        ),
    ]);
    let nmi = start_setup(setup, |_| {}).await;
    let node = |n: NodeIdentity| Some(Asked::Node(n));
    let b_rid = rid("node-b");
    let cases = [
        Case {
            item: "#5 one matching label (value ignoring case), no selector → system-assigned",
            source: 1,
            target: TOKEN_PATH.to_owned(),
            headers: META,
            status: 200,
            expect: Expect::TokenFor("node"),
            asked: node(NodeIdentity::SystemAssigned),
        },
        Case {
            item: "#5 client_id forwarded to the node's IMDS",
            source: 1,
            target: token_path(&format!("&client_id={CLIENT_B}")),
            headers: META,
            status: 200,
            expect: Expect::TokenFor("node"),
            asked: node(NodeIdentity::ClientId(CLIENT_B.into())),
        },
        // fix (docs/compatibility.md "exception path ignores msi_res_id" → honours it): upstream
        // would return the system-assigned token here.
        Case {
            item: "#5 msi_res_id honoured on the exception path (fix)",
            source: 1,
            target: token_path(&format!("&msi_res_id={b_rid}")),
            headers: META,
            status: 200,
            expect: Expect::TokenFor("node"),
            asked: node(NodeIdentity::ResourceId(b_rid.clone())),
        },
        Case {
            item: "#5 mi_res_id honoured on the exception path (fix)",
            source: 1,
            target: token_path(&format!("&mi_res_id={b_rid}")),
            headers: META,
            status: 200,
            expect: Expect::TokenFor("node"),
            asked: node(NodeIdentity::ResourceId(b_rid.clone())),
        },
        Case {
            item: "#5 the Metadata header still applies",
            source: 1,
            target: TOKEN_PATH.to_owned(),
            headers: NO_HEADERS,
            status: 400,
            expect: Expect::Body(MISSING_HEADER_BODY),
            asked: None,
        },
        Case {
            item: "#5 an exception of another namespace does not apply",
            source: 2,
            target: TOKEN_PATH.to_owned(),
            headers: META,
            status: 400,
            expect: Expect::Description("no azure identity is bound to pod app/team-x"),
            asked: None,
        },
        Case {
            item: "#5 same key, other value → not excepted",
            source: 3,
            target: TOKEN_PATH.to_owned(),
            headers: META,
            status: 400,
            expect: Expect::Description("no azure identity is bound to pod app/micro"),
            asked: None,
        },
        // fix (docs/compatibility.md "ReplicaSet name ^mic in --MICNamespace skips all checks" → no
        // name-based bypass; the chart ships an AzurePodIdentityException instead).
        Case {
            item: "#5 ReplicaSet mic-* in --MICNamespace gets no bypass (fix)",
            source: 4,
            target: TOKEN_PATH.to_owned(),
            headers: META,
            status: 400,
            expect: Expect::Description("no azure identity is bound to pod default/mic-5d8f-abcde"),
            asked: None,
        },
        Case {
            item: "#5 ReplicaSet microservice-* (upstream's ^mic-* matched it) gets no bypass (fix)",
            source: 5,
            target: TOKEN_PATH.to_owned(),
            headers: META,
            status: 400,
            expect: Expect::Description(
                "no azure identity is bound to pod default/microservice-7f9-xyz",
            ),
            asked: None,
        },
    ];
    run_cases(&nmi, &cases).await;
    // Any exception-path failure is 403 (no 503 split), as upstream.
    *nmi.provider.fail.lock().unwrap() = Some(BrokerError::Unavailable {
        source_kind: SourceKind::Imds,
        client_id: String::new(),
        reason: "connection refused".into(),
        retry_after: None,
    });
    run_cases(
        &nmi,
        &[Case {
            item: "#5 exception-path failure → 403",
            source: 1,
            target: TOKEN_PATH.to_owned(),
            headers: META,
            status: 403,
            expect: Expect::DescriptionPrefix("failed to get service principal token, error: "),
            asked: node(NodeIdentity::SystemAssigned),
        }],
    )
    .await;
}

// ---------------------------------------------------------------- #6 standard-mode timing

/// #6 (docs/upstream.md#identity-selection): `Assigned` and the legacy empty state answer at once;
/// a pod without any assignment gets 404 at once (fix: upstream waited 16 × 5 s = 80 s); `Created`
/// waits at most the retry budget, then 404 (upstream: 20 × 5 s = 100 s).
#[tokio::test]
async fn item_06_standard_mode_timing() {
    const WAIT: Duration = Duration::from_millis(300);
    struct Timing {
        item: &'static str,
        objects: Objects,
        status: u16,
        expect: Expect,
        /// The answer must come after the pending wait (else well before it).
        waits: bool,
    }
    let with_state = |state| Objects::bound("app", CLIENT_A, state);
    // A binding that selects the pod, without an assignment yet (MIC has not caught up).
    let mut awaiting = Objects::bound("app", CLIENT_A, AssignedIdentityState::Assigned);
    awaiting.assignments.clear();
    let rows = [
        Timing {
            item: "#6 Assigned → immediate token",
            objects: with_state(AssignedIdentityState::Assigned),
            status: 200,
            expect: Expect::TokenFor(CLIENT_A),
            waits: false,
        },
        Timing {
            item: "#6 legacy \"\" state → usable",
            objects: with_state(AssignedIdentityState::Other(String::new())),
            status: 200,
            expect: Expect::TokenFor(CLIENT_A),
            waits: false,
        },
        // fix (docs/compatibility.md: "pod with no matching binding waits 80–100 s, then 404" → at
        // once).
        Timing {
            item: "#6 no AzureAssignedIdentity and no binding → final 400 at once (fix: upstream 404 after 80 s)",
            objects: Objects::empty(),
            status: 400,
            expect: Expect::Description("no azure identity is bound to pod app/web"),
            waits: false,
        },
        Timing {
            item: "#6 Created only → 404 after the bounded wait",
            objects: with_state(AssignedIdentityState::Created),
            status: 404,
            expect: Expect::DescriptionPrefix(
                "identity assignment for pod app/web is still in progress",
            ),
            waits: true,
        },
        Timing {
            item: "#6 binding selects the pod, no assignment yet → bounded wait, then 404",
            objects: awaiting,
            status: 404,
            expect: Expect::DescriptionPrefix(
                "identity assignment for pod app/web is still in progress",
            ),
            waits: true,
        },
    ];
    let mut failures = Vec::new();
    for row in &rows {
        let nmi = start_with(
            &row.objects,
            BINDING_LABEL,
            |o| o.pending_wait = WAIT,
            Default::default(),
        )
        .await;
        let started = Instant::now();
        let reply = request(nmi.addr, TOKEN_PATH, META).await;
        let elapsed = started.elapsed();
        let table_row = Row {
            item: row.item,
            target: TOKEN_PATH,
            headers: META,
            status: row.status,
            expect: row.expect,
        };
        if let Err(problem) = check(&table_row, &reply) {
            failures.push(problem);
        }
        let timing_ok = if row.waits {
            elapsed >= WAIT
        } else {
            elapsed < WAIT
        };
        if !timing_ok {
            failures.push(format!(
                "{}: answered after {elapsed:?} (pending wait {WAIT:?})",
                row.item
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The wait budget is upstream's: (created + assigned attempts) × interval.
    let budget = |args: &[&str]| {
        let mut argv = vec!["nmi", "--node=n"];
        argv.extend_from_slice(args);
        let config = Flags::try_parse_from(argv)
            .unwrap()
            .into_config_with_env(|_| None)
            .unwrap();
        ServerOptions::from_config(&config).pending_wait
    };
    assert_eq!(
        budget(&[]),
        Duration::from_secs(100),
        "#6 default (16 + 4) × 5 s"
    );
    assert_eq!(
        budget(&[
            "--retry-attempts-for-created=1",
            "--retry-attempts-for-assigned=1",
            "--find-identity-retry-interval=1",
        ]),
        Duration::from_secs(2),
        "#6 the three retry flags"
    );

    // With --set-retry-after-header the pending answer is 503 + Retry-After: 20.
    let nmi = start_with(
        &Objects::bound("app", CLIENT_A, AssignedIdentityState::Created),
        BINDING_LABEL,
        |o| {
            o.pending_wait = WAIT;
            o.errors.set_retry_after_header = true;
        },
        Default::default(),
    )
    .await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(
        reply.status, 503,
        "#6 pending with --set-retry-after-header"
    );
    assert_eq!(reply.headers["retry-after"], "20");
}

// ---------------------------------------------------------------- #7 selectors

/// #7 (docs/upstream.md#token-endpoint, docs/upstream.md#identity-selection): `client_id` in any
/// case, `msi_res_id` before `mi_res_id`, `object_id`.
#[tokio::test]
async fn item_07_identity_selectors() {
    const CLIENT_C: &str = "cccccccc-0000-0000-0000-00000000000c";
    let mut objects = Objects::empty();
    objects.add(
        identity("app", "id", CLIENT_A),
        AssignedIdentityState::Assigned,
    );
    objects.add(
        identity("app", "id2", CLIENT_B),
        AssignedIdentityState::Assigned,
    );
    let nmi = start(&objects).await;
    let a = || Some(Asked::Identity(CLIENT_A.into()));
    let b = || Some(Asked::Identity(CLIENT_B.into()));
    let rid_b = rid("id2");
    let rid_b_camel = rid_b.replace("resourcegroups", "resourceGroups");
    let case = |item, extra: String, status, expect, asked| Case {
        item,
        source: 1,
        target: token_path(&extra),
        headers: META,
        status,
        expect,
        asked,
    };
    run_cases(
        &nmi,
        &[
            // fix (docs/compatibility.md "no selector and several identities bound: the first one
            // found" → deterministic, sorted by name).
            case("#7 no selector → first identity by name (fix: deterministic)", String::new(), 200, Expect::TokenFor(CLIENT_A), a()),
            case("#7 empty client_id counts as absent", "&client_id=".to_owned(), 200, Expect::TokenFor(CLIENT_A), a()),
            case("#7 client_id lower case", format!("&client_id={CLIENT_B}"), 200, Expect::TokenFor(CLIENT_B), b()),
            // fix (docs/compatibility.md: case-sensitive final match → case-insensitive
            // everywhere).
            case(
                "#7 client_id upper case (fix: upstream 404 after 80 s)",
                format!("&client_id={}", CLIENT_B.to_ascii_uppercase()),
                200,
                Expect::TokenFor(CLIENT_B),
                b(),
            ),
            case(
                "#7 client_id of no identity of the pod → final 400 at once, redacted (upstream 404)",
                format!("&client_id={CLIENT_C}"),
                400,
                Expect::Description("no azure identity found for request clientID cccc##### REDACTED #####000c"),
                None,
            ),
            case("#7 msi_res_id", format!("&msi_res_id={rid_b}"), 200, Expect::TokenFor(CLIENT_B), b()),
            case(
                "#7 msi_res_id with resourceGroups spelling (fix: case-insensitive)",
                format!("&msi_res_id={rid_b_camel}"),
                200,
                Expect::TokenFor(CLIENT_B),
                b(),
            ),
            case("#7 mi_res_id alone", format!("&mi_res_id={rid_b}"), 200, Expect::TokenFor(CLIENT_B), b()),
            case(
                "#7 empty msi_res_id → mi_res_id is used",
                format!("&msi_res_id=&mi_res_id={rid_b}"),
                200,
                Expect::TokenFor(CLIENT_B),
                b(),
            ),
            case(
                "#7 msi_res_id wins over mi_res_id",
                format!("&msi_res_id={}&mi_res_id={rid_b}", rid("id")),
                200,
                Expect::TokenFor(CLIENT_A),
                a(),
            ),
            case(
                "#7 unknown msi_res_id → final 400 with an empty clientID (upstream 404)",
                format!("&msi_res_id={}", rid("nope")),
                400,
                Expect::Description("no azure identity found for request clientID "),
                None,
            ),
            // fix (docs/compatibility.md "object_id ignored → first identity silently returned" →
            // never an identity other than the one asked for).
            case(
                "#7 object_id → 400, never the first identity (fix)",
                format!("&object_id={CLIENT_B}"),
                400,
                Expect::Description(
                    "parameter object_id is not supported for selecting an identity; use client_id or msi_res_id",
                ),
                None,
            ),
            case(
                "#7 principal_id → 400 (fix)",
                format!("&principal_id={CLIENT_B}"),
                400,
                Expect::DescriptionPrefix("parameter object_id is not supported"),
                None,
            ),
            // fix (docs/compatibility.md: several selectors → 400 naming the conflict).
            case(
                "#7 client_id and msi_res_id together → 400 (fix)",
                format!("&client_id={CLIENT_A}&msi_res_id={rid_b}"),
                400,
                Expect::DescriptionPrefix("only one of client_id, msi_res_id"),
                None,
            ),
        ],
    )
    .await;
}

// ---------------------------------------------------------------- #8 namespaced

/// #8 (docs/upstream.md#identity-selection): the namespaced filter (flag or annotation) drops
/// identities of other namespaces; an emptied candidate list is 404 (fix: upstream panicked → 500).
#[tokio::test]
async fn item_08_namespaced_filter() {
    struct Namespaced {
        item: &'static str,
        identity_ns: &'static str,
        annotated: bool,
        options: MatchOptions,
        status: u16,
        expect: Expect,
    }
    let flag = MatchOptions {
        force_namespaced: true,
        ..Default::default()
    };
    let managed = MatchOptions {
        mode: OperationMode::Managed,
        force_namespaced: true,
    };
    let no_identity = Expect::Description("no azure identity is bound to pod app/web");
    let rows = [
        // fix (docs/compatibility.md "panic → 500 when the namespaced filter empties the candidate
        // list").
        Namespaced {
            item: "#8 annotation, identity in another namespace → final 400 (fix: upstream 500)",
            identity_ns: "other",
            annotated: true,
            options: MatchOptions::default(),
            status: 400,
            expect: no_identity,
        },
        Namespaced {
            item: "#8 annotation, identity in the pod's namespace",
            identity_ns: "app",
            annotated: true,
            options: MatchOptions::default(),
            status: 200,
            expect: Expect::TokenFor(CLIENT_A),
        },
        Namespaced {
            item: "#8 --forceNamespaced, identity in another namespace → final 400 (fix: upstream 500)",
            identity_ns: "other",
            annotated: false,
            options: flag,
            status: 400,
            expect: no_identity,
        },
        Namespaced {
            item: "#8 --forceNamespaced, identity in the pod's namespace",
            identity_ns: "app",
            annotated: false,
            options: flag,
            status: 200,
            expect: Expect::TokenFor(CLIENT_A),
        },
        Namespaced {
            item: "#8 not namespaced: an identity of another namespace is usable",
            identity_ns: "other",
            annotated: false,
            options: MatchOptions::default(),
            status: 200,
            expect: Expect::TokenFor(CLIENT_A),
        },
        Namespaced {
            item: "#8 managed mode, binding and identity in the pod's namespace",
            identity_ns: "app",
            annotated: false,
            options: managed,
            status: 200,
            expect: Expect::TokenFor(CLIENT_A),
        },
        Namespaced {
            item: "#8 managed mode, binding in another namespace → final 400 at once (upstream 404)",
            identity_ns: "other",
            annotated: false,
            options: managed,
            status: 400,
            expect: no_identity,
        },
    ];
    let mut failures = Vec::new();
    for row in &rows {
        let mut id = identity(row.identity_ns, "id", CLIENT_A);
        if row.annotated {
            id = id.namespaced();
        }
        let mut objects = Objects::empty();
        objects.add(id, AssignedIdentityState::Assigned);
        let nmi = start_with(
            &objects,
            BINDING_LABEL,
            |o| o.pending_wait = Duration::from_secs(30),
            row.options,
        )
        .await;
        let started = Instant::now();
        let reply = request(nmi.addr, TOKEN_PATH, META).await;
        let table_row = Row {
            item: row.item,
            target: TOKEN_PATH,
            headers: META,
            status: row.status,
            expect: row.expect,
        };
        if let Err(problem) = check(&table_row, &reply) {
            failures.push(problem);
        }
        if started.elapsed() > Duration::from_secs(5) {
            failures.push(format!("{}: took {:?}", row.item, started.elapsed()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------- #9 bodies

/// #9 (docs/upstream.md#response-bodies): the token body's keys and string types, the multi-tenant
/// array, the `/host/token` wrapper.
#[tokio::test]
async fn item_09_token_bodies() {
    let nmi = start(&assigned_a()).await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(
        reply.headers["content-length"],
        reply.body.len().to_string()
    );
    let body = reply.json();
    let object = body.as_object().unwrap();
    // Upstream's seven keys in upstream's order, then (fix, docs/compatibility.md "token body
    // drops client_id and ext_expires_in" → the full key set of real IMDS) the two IMDS adds.
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    let mut sorted_want = vec![
        "access_token",
        "refresh_token",
        "expires_in",
        "expires_on",
        "not_before",
        "resource",
        "token_type",
        "client_id",
        "ext_expires_in",
    ];
    let mut positions: Vec<usize> = sorted_want
        .iter()
        .map(|k| {
            reply
                .body
                .find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("#9 key {k} missing: {}", reply.body))
        })
        .collect();
    let ordered = positions.windows(2).all(|w| w[0] < w[1]);
    assert!(ordered, "#9 key order {keys:?}");
    positions.clear();
    sorted_want.sort_unstable();
    let mut got = keys.clone();
    got.sort_unstable();
    assert_eq!(got, sorted_want, "#9 key set");
    for (key, value) in object {
        assert!(value.is_string(), "#9 {key} must be a JSON string: {value}");
    }
    assert_eq!(body["refresh_token"], "");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["client_id"], CLIENT_A);

    // Multi-tenant service principal: a JSON array, primary first.
    *nmi.provider.tokens_per_answer.lock().unwrap() = Some(3);
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    let body = reply.json();
    let array = body
        .as_array()
        .unwrap_or_else(|| panic!("#9 multi-tenant array: {body}"));
    assert_eq!(array.len(), 3);
    assert_eq!(array[0]["access_token"], format!("token-for-{CLIENT_A}"));
    assert_eq!(
        array[1]["access_token"],
        format!("token-for-{CLIENT_A}-aux1")
    );
    assert!(array.iter().all(|t| t["expires_on"].is_string()));

    // /host/token (fix: off unless --enable-host-token; then upstream's wrapper).
    let host = start_with(
        &assigned_a(),
        BINDING_LABEL,
        |o| o.enable_host_token = true,
        Default::default(),
    )
    .await;
    let reply = request(
        host.addr,
        "/host/token/?resource=https%3A%2F%2Fvault.azure.net",
        &[("podns", "app"), ("podname", "web")],
    )
    .await;
    assert_eq!(reply.status, 200, "#9 /host/token: {}", reply.body);
    let body = reply.json();
    let mut keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    keys.sort_unstable();
    assert_eq!(keys, ["clientid", "token"], "#9 wrapper keys");
    assert_eq!(body["clientid"], CLIENT_A);
    assert_eq!(
        body["token"]["access_token"],
        format!("token-for-{CLIENT_A}")
    );
    // adal.Token's json.Number fields: bare numbers inside the wrapper.
    assert!(body["token"]["expires_in"].is_number() && body["token"]["expires_on"].is_number());
    run_cases(
        &host,
        &[
            Case {
                item: "#9 /host/token without pod headers → 400",
                source: 1,
                target: "/host/token?resource=r".into(),
                headers: &[("podns", "app")],
                status: 400,
                expect: Expect::Description("missing 'podname' and 'podns' from request header"),
                asked: None,
            },
            Case {
                item: "#9 /host/token not from 127.0.0.1 → 500",
                source: 2,
                target: "/host/token?resource=r".into(),
                headers: &[("podns", "app"), ("podname", "web")],
                status: 500,
                expect: Expect::Description("request remote address is not from a host"),
                asked: None,
            },
            Case {
                item: "#9 /host/token without resource → 400",
                source: 1,
                target: "/host/token".into(),
                headers: &[("podns", "app"), ("podname", "web")],
                status: 400,
                expect: Expect::Description("parameter resource cannot be empty"),
                asked: None,
            },
            Case {
                item: "#9 /host/token for a pod without identity → final 400 (upstream 404)",
                source: 1,
                target: "/host/token?resource=r".into(),
                headers: &[("podns", "app"), ("podname", "nope")],
                status: 400,
                expect: Expect::DescriptionPrefix("no azure identity is bound to pod app/nope"),
                asked: None,
            },
        ],
    )
    .await;
    // /host/token errors have no Retry-After variant (upstream), even with the flag.
    let retry = start_with(
        &Objects::empty(),
        BINDING_LABEL,
        |o| {
            o.enable_host_token = true;
            o.errors.set_retry_after_header = true;
        },
        Default::default(),
    )
    .await;
    let reply = request(
        retry.addr,
        "/host/token?resource=r",
        &[("podns", "app"), ("podname", "web")],
    )
    .await;
    assert_eq!(
        reply.status, 400,
        "#9 /host/token ignores --set-retry-after-header (a final refusal): {}",
        reply.body
    );
    assert!(!reply.headers.contains_key("retry-after"));
    // Without the flag the path is proxied like any other (IMDS has no such path).
    let reply = request(
        nmi.addr,
        "/host/token?resource=r",
        &[("podns", "app"), ("podname", "web"), ("Metadata", "true")],
    )
    .await;
    assert_eq!(
        (
            reply.status,
            reply.headers.get("x-imds").map(String::as_str)
        ),
        (404, Some("fake"))
    );
}

// ---------------------------------------------------------------- #10 upstream errors

/// An HTTP server answering every request with `status_line` and a JSON `body`.
async fn canned_imds(status_line: &'static str, body: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = read_head(&mut stream).await;
                let response = format!(
                    "HTTP/1.1 {status_line}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });
    addr
}

/// The real broker with its IMDS source pointed at `endpoint`, no retries.
fn broker_for(endpoint: std::net::SocketAddr) -> Arc<dyn TokenProvider> {
    let clock = Arc::new(SystemClock);
    let source = ImdsSource::new(
        ImdsConfig {
            endpoint: format!("http://{endpoint}"),
            max_retries: 0,
            ..Default::default()
        },
        Arc::new(ImdsLimiter::new(LimiterConfig::default())),
        clock.clone(),
    )
    .unwrap();
    Arc::new(TokenBroker::new(
        BrokerConfig::default(),
        Sources::all(Arc::new(source)),
        clock,
    ))
}

/// #10 (docs/upstream.md#token-endpoint step 7, docs/upstream.md#token-sources): through the real
/// broker, IMDS refusing (400) is 403 with IMDS's message, IMDS unreachable or failing (5xx) is
/// 503, and `--set-retry-after-header` turns identity-selection errors into 503 + `Retry-After:
/// 20`.
#[tokio::test]
async fn item_10_upstream_errors() {
    let refusing = canned_imds(
        "400 Bad Request",
        r#"{"error":"invalid_request","error_description":"Identity not found"}"#,
    )
    .await;
    let failing = canned_imds(
        "500 Internal Server Error",
        r#"{"error":"server_error","error_description":"boom"}"#,
    )
    .await;
    let garbled = canned_imds("200 OK", "this is not json").await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let unreachable = closed.local_addr().unwrap();
    drop(closed);
    struct Upstream {
        item: &'static str,
        imds: std::net::SocketAddr,
        status: u16,
        expect: Expect,
        retry_after: bool,
    }
    let rows = [
        Upstream {
            item: "#10 IMDS 400 → 403 carrying IMDS's message",
            imds: refusing,
            status: 403,
            expect: Expect::DescriptionPrefix(""),
            retry_after: false,
        },
        // fix (docs/compatibility.md "Entra 5xx on the token path → 403" → 503: a retry can help).
        Upstream {
            item: "#10 IMDS 500 → 503 (fix)",
            imds: failing,
            status: 503,
            expect: Expect::DescriptionPrefix(""),
            retry_after: false,
        },
        // fix (docs/compatibility.md: upstream's adal TokenRefreshError made a 200 whose body
        // is not a token a 403, which tells SDKs to stop; podid answers 503 like other
        // transient upstream failures, as for Entra 5xx).
        Upstream {
            item: "#10 IMDS 200 with an unparsable body → 503 (fix: upstream 403)",
            imds: garbled,
            status: 503,
            expect: Expect::DescriptionPrefix("imds token source unavailable for client "),
            retry_after: false,
        },
        Upstream {
            item: "#10 IMDS unreachable → 503",
            imds: unreachable,
            status: 503,
            expect: Expect::DescriptionPrefix(""),
            retry_after: false,
        },
    ];
    let mut failures = Vec::new();
    for row in &rows {
        let objects = assigned_a();
        let mut setup = Setup::new(&objects, BINDING_LABEL);
        setup.tokens = Some(broker_for(row.imds));
        let nmi = start_setup(setup, |_| {}).await;
        let reply = request(nmi.addr, TOKEN_PATH, META).await;
        let table_row = Row {
            item: row.item,
            target: TOKEN_PATH,
            headers: META,
            status: row.status,
            expect: row.expect,
        };
        if let Err(problem) = check(&table_row, &reply) {
            failures.push(problem);
        }
        if reply.headers.contains_key("retry-after") != row.retry_after {
            failures.push(format!(
                "{}: retry-after {:?}",
                row.item,
                reply.headers.get("retry-after")
            ));
        }
        if row.imds == refusing && !reply.body.contains("Identity not found") {
            failures.push(format!(
                "{}: IMDS's message missing: {}",
                row.item, reply.body
            ));
        }
        if reply.body.contains("access_token") {
            failures.push(format!("{}: a token in an error: {}", row.item, reply.body));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // --set-retry-after-header: identity-selection errors → 503 + Retry-After: 20 (token path),
    // with upstream's statuses for final refusals (--not-found-for-final-refusals); without
    // that flag a final refusal stays 400 (waiting cannot change it).
    let upstream_statuses = |o: &mut ServerOptions| {
        o.errors.set_retry_after_header = true;
        o.errors.not_found_for_final_refusals = true;
    };
    let nmi = start_with(
        &assigned_a(),
        BINDING_LABEL,
        upstream_statuses,
        Default::default(),
    )
    .await;
    let reply = request(
        nmi.addr,
        &token_path(&format!("&client_id={CLIENT_B}")),
        META,
    )
    .await;
    assert_eq!(reply.status, 503, "#10 retry-after: wrong client id");
    assert_eq!(reply.headers["retry-after"], "20");
    let nmi = start_with(
        &Objects::empty(),
        BINDING_LABEL,
        upstream_statuses,
        Default::default(),
    )
    .await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 503, "#10 retry-after: unbound pod");
    assert_eq!(reply.headers["retry-after"], "20");
    let nmi = start_with(
        &Objects::empty(),
        BINDING_LABEL,
        |o| o.errors.set_retry_after_header = true,
        Default::default(),
    )
    .await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(
        reply.status, 400,
        "#10 retry-after: an unbound pod is a final refusal"
    );
    assert!(!reply.headers.contains_key("retry-after"));
    // Request errors keep their status with the flag.
    let reply = request(nmi.addr, "/metadata/identity/oauth2/token", META).await;
    assert_eq!(reply.status, 400, "#10 retry-after does not touch 400s");
}

// ---------------------------------------------------------------- #11 instance metadata

/// #11 (docs/upstream.md#routing rule 4, docs/upstream.md#passthrough): `--block-instance-metadata`
/// answers 403 before the header check; otherwise everything else is proxied with status, headers
/// and body copied back.
#[tokio::test]
async fn item_11_instance_metadata_and_passthrough() {
    let blocked = start_with(
        &assigned_a(),
        BINDING_LABEL,
        |o| o.block_instance_metadata = true,
        Default::default(),
    )
    .await;
    let blocked_row = |item, target| Row {
        item,
        target,
        headers: NO_HEADERS,
        status: 403,
        expect: Expect::Description("Request blocked by AAD Pod Identity NMI"),
    };
    run_table(
        &blocked,
        &[
            blocked_row(
                "#11 /metadata/instance, no header → 403 first",
                "/metadata/instance?api-version=2021-02-01",
            ),
            blocked_row(
                "#11 /metadata/instance/compute",
                "/metadata/instance/compute",
            ),
            blocked_row(
                "#11 /METADATA/instance (segment case-insensitive)",
                "/METADATA/instance",
            ),
            blocked_row(
                "#11 prefix match /metadata/instancefoo",
                "/metadata/instancefoo",
            ),
            Row {
                item: "#11 token path unaffected by the block",
                target: TOKEN_PATH,
                headers: META,
                status: 200,
                expect: Expect::TokenFor(CLIENT_A),
            },
            Row {
                item: "#11 other paths still proxied",
                target: "/metadata/versions",
                headers: META,
                status: 404,
                expect: Expect::Proxied,
            },
        ],
    )
    .await;
    let reply = request(blocked.addr, "/metadata/instance", NO_HEADERS).await;
    assert_eq!(
        reply.headers["content-type"],
        "application/json; charset=utf-8"
    );
    let text = start_with(
        &assigned_a(),
        BINDING_LABEL,
        |o| {
            o.block_instance_metadata = true;
            o.errors.style = ErrorBodyStyle::GoPlainText;
        },
        Default::default(),
    )
    .await;
    let reply = request(text.addr, "/metadata/instance", NO_HEADERS).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (403, "Request blocked by AAD Pod Identity NMI\n"),
        "#11 upstream's text body with --error-format=text"
    );

    // Passthrough: same method, path and query, headers, Host = the metadata address; the
    // answer's status, headers and body come back.
    let mut nmi = start(&assigned_a()).await;
    let reply = send_raw(
        nmi.addr,
        b"POST /metadata/instance/compute?api-version=2021-02-01&format=json HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nX-Custom: kept\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(reply.status, 404, "#11 upstream status copied");
    assert_eq!(reply.body, "not found", "#11 upstream body copied");
    assert_eq!(
        reply.headers["x-imds"], "fake",
        "#11 upstream headers copied"
    );
    assert_eq!(reply.headers["content-type"], "text/plain");
    let head = nmi.imds.recv().await.unwrap();
    assert!(
        head.starts_with(
            "POST /metadata/instance/compute?api-version=2021-02-01&format=json HTTP/1.1\r\n"
        ),
        "#11 method, path and query forwarded: {head}"
    );
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("x-custom: kept"), "{head}");
    assert!(lower.contains("content-length: 5"), "{head}");
    let host = format!("host: {}", nmi.state.options.metadata).to_ascii_lowercase();
    assert!(
        lower.contains(&host),
        "#11 Host is the metadata address with port: {head}"
    );
    assert!(nmi.provider.asked().is_empty());
}

// ---------------------------------------------------------------- #12 probes, pprof

/// #12 (docs/upstream.md#nmi-probes-and-metrics): `/healthz` is always 200 with `Not Active` /
/// `Active` (no newline). pprof: decided not to serve it anywhere (docs/compatibility.md "pprof on
/// the probe port" → none; docs/compatibility.md: `--enableProfile` accepted and ignored).
#[tokio::test]
async fn item_12_probes_and_no_pprof() {
    let mut nmi = start(&assigned_a()).await;
    let reply = request(nmi.probes, "/healthz", NO_HEADERS).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "Not Active"),
        "#12 before install"
    );
    nmi.state.health.set_interception_installed(true);
    let reply = request(nmi.probes, "/healthz", NO_HEADERS).await;
    assert_eq!(
        (reply.status, reply.body.as_str()),
        (200, "Active"),
        "#12 after install"
    );
    assert_eq!(
        reply.headers["content-length"], "6",
        "#12 no trailing newline"
    );
    for path in [
        "/debug/pprof/",
        "/debug/pprof/goroutine?debug=2",
        "/debug/pprof/cmdline",
    ] {
        for (port, name) in [(nmi.probes, "probe"), (nmi.metrics, "metrics")] {
            let reply = request(port, path, NO_HEADERS).await;
            assert_eq!(reply.status, 404, "#12 no pprof on the {name} port: {path}");
            assert!(!reply.body.contains("goroutine"), "{}", reply.body);
        }
    }
    // On the IMDS port it is just another proxied path, never served by nmi itself.
    let reply = request(nmi.addr, "/debug/pprof/", META).await;
    assert_eq!(
        reply.headers.get("x-imds").map(String::as_str),
        Some("fake")
    );
    assert!(
        nmi.imds
            .recv()
            .await
            .unwrap()
            .starts_with("GET /debug/pprof/ ")
    );
    // /healthz is not served on the IMDS port either (upstream proxies it too).
    let reply = request(nmi.addr, "/healthz", META).await;
    assert_eq!(
        reply.headers.get("x-imds").map(String::as_str),
        Some("fake")
    );
    // --enableProfile is accepted (manifests pass it) and changes nothing.
    let config = Flags::try_parse_from(["nmi", "--node=n", "--enableProfile"])
        .unwrap()
        .into_config_with_env(|_| None)
        .unwrap();
    assert!(config.profile_requested);
    // Upstream's ports: probes on 8080 by default (manifests pass 8085), metrics on 9090.
    assert_eq!((config.probe_port, config.prometheus_port), (8080, 9090));
}

// ---------------------------------------------------------------- #14 metrics

/// The label names of the first series of `family` in a text exposition.
fn label_names(text: &str, series: &str) -> Vec<String> {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{series}{{")))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"));
    let labels = &line[series.len() + 1..line.find('}').unwrap()];
    let mut names: Vec<String> = labels
        .split("\",")
        .map(|pair| pair.split('=').next().unwrap().to_owned())
        .collect();
    names.sort_unstable();
    names
}

/// #14 (docs/upstream.md#nmi-probes-and-metrics): upstream's family names, types, labels and
/// buckets on /metrics; the NMI histogram's `operation_type` is the route (fix: upstream used the
/// raw path, unbounded).
#[tokio::test]
async fn item_14_metrics_names_and_labels() {
    let mut objects = assigned_a();
    objects.add(
        AzureIdentity::service_principal(
            "app",
            "sp",
            IdentityType::ServicePrincipal,
            "tenant",
            CLIENT_B,
            "sp-secret",
        ),
        AssignedIdentityState::Assigned,
    );
    objects
        .exceptions
        .push(AzurePodIdentityException::for_pod_labels(
            "app",
            "ex",
            [("app".to_owned(), "mic".to_owned())],
        ));
    let mut setup = Setup::new(&objects, BINDING_LABEL);
    setup
        .pods
        .push(pod("app", "mic", "127.0.0.2", &[("app", "mic")]));
    let nmi = start_setup(setup, |o| o.enable_host_token = true).await;
    let send = |source, target: String| {
        let addr = nmi.addr;
        async move {
            request_from(loopback(source), addr, &target, META)
                .await
                .status
        }
    };
    assert_eq!(send(1, TOKEN_PATH.to_owned()).await, 200);
    assert_eq!(
        send(
            1,
            "/metadata/identity/oauth2/token/?resource=https%3A%2F%2Fvault.azure.net".to_owned()
        )
        .await,
        200
    );
    assert_eq!(
        send(1, token_path(&format!("&client_id={CLIENT_B}"))).await,
        200
    );
    assert_eq!(send(2, TOKEN_PATH.to_owned()).await, 200);
    assert_eq!(send(9, TOKEN_PATH.to_owned()).await, 500);
    assert_eq!(send(1, "/metadata/instance".to_owned()).await, 404);
    let reply = request(
        nmi.addr,
        "/host/token?resource=r",
        &[("podns", "app"), ("podname", "web")],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    *nmi.provider.fail.lock().unwrap() = Some(BrokerError::Unavailable {
        source_kind: SourceKind::Imds,
        client_id: CLIENT_A.into(),
        reason: "down".into(),
        retry_after: None,
    });
    assert_eq!(send(1, TOKEN_PATH.to_owned()).await, 503);

    let text = request(nmi.metrics, "/metrics", NO_HEADERS).await.body;
    let nmi_hist = "aadpodidentity_nmi_operations_duration_seconds";
    let imds_hist = "aadpodidentity_imds_operations_duration_seconds";
    for (family, kind) in [
        (nmi_hist, "histogram"),
        (imds_hist, "histogram"),
        ("aadpodidentity_imds_operations_errors_count", "counter"),
        (
            "aadpodidentity_kubernetes_api_operations_errors_count",
            "counter",
        ),
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n")),
            "#14 family {family} ({kind}) in\n{text}"
        );
    }
    assert_eq!(
        label_names(&text, &format!("{nmi_hist}_count")),
        ["namespace", "operation_type", "resource", "status_code"],
        "#14 NMI histogram labels"
    );
    assert_eq!(
        label_names(&text, &format!("{imds_hist}_count")),
        ["operation_type"]
    );
    let needles = [
        // Both token path spellings are one series: the route, not the raw path (fix).
        format!("{nmi_hist}_count{{namespace=\"app\",operation_type=\"token\",resource=\"https://vault.azure.net\",status_code=\"200\"}} 4"),
        // Answers without a token carry resource="" (documented difference: upstream labelled
        // every answer with the requested resource, so any caller could add series).
        format!("{nmi_hist}_count{{namespace=\"\",operation_type=\"token\",resource=\"\",status_code=\"500\"}} 1"),
        format!("{nmi_hist}_count{{namespace=\"app\",operation_type=\"token\",resource=\"\",status_code=\"503\"}} 1"),
        // A resource outside the well-known audiences is recorded as `other` (bounded label).
        format!("{nmi_hist}_count{{namespace=\"app\",operation_type=\"host_token\",resource=\"other\",status_code=\"200\"}} 1"),
        format!("{imds_hist}_count{{operation_type=\"adal_token_msi_userassignedid\"}} 4"),
        format!("{imds_hist}_count{{operation_type=\"adal_token\"}} 1"),
        format!("{imds_hist}_count{{operation_type=\"adal_token_msi\"}} 1"),
        "aadpodidentity_imds_operations_errors_count{operation_type=\"adal_token_msi_userassignedid\"} 1".to_owned(),
        // One per unattributed request (documented difference: upstream counted 5 poll misses).
        "aadpodidentity_kubernetes_api_operations_errors_count{operation_type=\"get_pod_list\"} 1".to_owned(),
    ];
    let missing: Vec<&String> = needles
        .iter()
        .filter(|n| !text.contains(n.as_str()))
        .collect();
    assert!(missing.is_empty(), "#14 missing {missing:#?} in\n{text}");
    // Upstream's buckets.
    for le in [
        "0.5", "1", "2", "3", "4", "5", "10", "15", "20", "25", "30", "40", "50", "60", "70", "80",
        "90", "100", "+Inf",
    ] {
        let bucket = format!(
            "{nmi_hist}_bucket{{namespace=\"app\",operation_type=\"token\",resource=\"https://vault.azure.net\",status_code=\"200\",le=\"{le}\"}}"
        );
        assert!(text.contains(&bucket), "#14 NMI bucket {le}");
    }
    for le in ["0.01", "0.1", "1", "10", "+Inf"] {
        let bucket = format!("{imds_hist}_bucket{{operation_type=\"adal_token\",le=\"{le}\"}}");
        assert!(text.contains(&bucket), "#14 IMDS bucket {le}");
    }
    let nmi_buckets = text.lines().filter(|l| l.starts_with(&format!("{nmi_hist}_bucket{{namespace=\"app\",operation_type=\"token\",resource=\"https://vault.azure.net\",status_code=\"200\""))).count();
    assert_eq!(nmi_buckets, 19, "#14 18 upstream buckets + Inf");
    // Passthrough is not counted; no raw path and no token ever appears.
    assert!(
        !text.contains("operation_type=\"/"),
        "#14 no raw paths:\n{text}"
    );
    assert!(!text.contains("instance"), "#14 passthrough not counted");
    assert!(!text.contains("token-for-"), "#14 no token in metrics");
}

// ---------------------------------------------------------------- status codes

/// Every row of the status-code table of docs/upstream.md#status-codes, driven through the server.
/// Bodies are IMDS-style JSON carrying upstream's message (fix, docs/compatibility.md); the
/// plain-text bodies of `--error-format=text` are pinned by podid-imds's golden files.
#[tokio::test]
async fn status_catalogue_2_14() {
    let mut objects = assigned_a();
    objects
        .exceptions
        .push(AzurePodIdentityException::for_pod_labels(
            "app",
            "ex",
            [("app".to_owned(), "mic".to_owned())],
        ));
    let mut setup = Setup::new(&objects, BINDING_LABEL);
    setup.pods.extend([
        pod("app", "mic", "127.0.0.2", &[("app", "mic")]),
        pod("app", "x", "127.0.0.3", &[]),
        pod("app", "y", "127.0.0.3", &[]),
        pod("app", "lonely", "127.0.0.4", &[]),
    ]);
    let nmi = start_setup(setup, |o| {
        o.enable_host_token = true;
        o.block_instance_metadata = true;
    })
    .await;
    let case = |item, source, target: &str, headers, status, expect| Case {
        item,
        source,
        target: target.to_owned(),
        headers,
        status,
        expect,
        asked: None,
    };
    let mut cases = vec![
        Case {
            asked: Some(Asked::Identity(CLIENT_A.into())),
            ..case(
                "status: 200 token",
                1,
                TOKEN_PATH,
                META,
                200,
                Expect::TokenFor(CLIENT_A),
            )
        },
        case(
            "status: 301 unclean path",
            1,
            "//metadata/identity/oauth2/token",
            NO_HEADERS,
            301,
            Expect::Location("/metadata/identity/oauth2/token"),
        ),
        case(
            "status: 400 Metadata header (token)",
            1,
            TOKEN_PATH,
            NO_HEADERS,
            400,
            Expect::Body(MISSING_HEADER_BODY),
        ),
        case(
            "status: 400 Metadata header (passthrough)",
            1,
            "/metadata/versions",
            NO_HEADERS,
            400,
            Expect::Body(MISSING_HEADER_BODY),
        ),
        case(
            "status: 400 empty resource",
            1,
            "/metadata/identity/oauth2/token?resource=",
            META,
            400,
            Expect::Description("parameter resource cannot be empty"),
        ),
        case(
            "status: 400 malformed token path",
            1,
            "/metadata/identity\\oauth2/token",
            META,
            400,
            Expect::Description("Invalid request"),
        ),
        case(
            "status: 400 /host/token without pod headers",
            1,
            "/host/token?resource=r",
            NO_HEADERS,
            400,
            Expect::Description("missing 'podname' and 'podns' from request header"),
        ),
        case(
            "status: 403 /metadata/instance with --block-instance-metadata",
            1,
            "/metadata/instance",
            NO_HEADERS,
            403,
            Expect::Description("Request blocked by AAD Pod Identity NMI"),
        ),
        // fix (docs/compatibility.md): upstream answered after 80 s.
        case(
            "status: no usable identity: final 400 (upstream 404)",
            4,
            TOKEN_PATH,
            META,
            400,
            Expect::Description("no azure identity is bound to pod app/lonely"),
        ),
        case(
            "status: 500 no pod for the source address",
            9,
            TOKEN_PATH,
            META,
            500,
            Expect::Description("pod list is empty"),
        ),
        case(
            "status: 500 ambiguous source address",
            3,
            TOKEN_PATH,
            META,
            500,
            Expect::DescriptionPrefix("failed to match pod IP 127.0.0.3"),
        ),
        case(
            "status: 500 /host/token not from 127.0.0.1",
            2,
            "/host/token?resource=r",
            &[("podns", "app"), ("podname", "web")],
            500,
            Expect::Description("request remote address is not from a host"),
        ),
    ];
    run_cases(&nmi, &cases).await;
    // 403 / 503 from the token source.
    let refused = BrokerError::Refused {
        source_kind: SourceKind::Imds,
        client_id: CLIENT_A.into(),
        status: 400,
        error: "invalid_request".into(),
        description: "Identity not found".into(),
    };
    *nmi.provider.fail.lock().unwrap() = Some(refused.clone());
    cases = vec![
        Case {
            asked: Some(Asked::Identity(CLIENT_A.into())),
            ..case(
                "status: 403 upstream token error",
                1,
                TOKEN_PATH,
                META,
                403,
                Expect::Description(""),
            )
        },
        Case {
            asked: Some(Asked::Node(NodeIdentity::SystemAssigned)),
            ..case(
                "status: 403 any exception-path error",
                2,
                TOKEN_PATH,
                META,
                403,
                Expect::DescriptionPrefix("failed to get service principal token, error: "),
            )
        },
    ];
    // The refused message is the broker's text; compare it whole.
    let message = refused.to_string();
    let leaked: &'static str = Box::leak(message.into_boxed_str());
    cases[0].expect = Expect::Description(leaked);
    run_cases(&nmi, &cases).await;
    *nmi.provider.fail.lock().unwrap() = Some(BrokerError::Unavailable {
        source_kind: SourceKind::Imds,
        client_id: CLIENT_A.into(),
        reason: "connection refused".into(),
        retry_after: None,
    });
    run_cases(
        &nmi,
        &[Case {
            asked: Some(Asked::Identity(CLIENT_A.into())),
            ..case(
                "status: 503 token acquisition failed (no TokenRefreshError)",
                1,
                TOKEN_PATH,
                META,
                503,
                Expect::DescriptionPrefix(""),
            )
        }],
    )
    .await;
    // 503 + Retry-After for identity lookups with --set-retry-after-header (final refusals
    // too with upstream's statuses, --not-found-for-final-refusals).
    let retry = start_with(
        &Objects::empty(),
        BINDING_LABEL,
        |o| {
            o.errors.set_retry_after_header = true;
            o.errors.not_found_for_final_refusals = true;
        },
        Default::default(),
    )
    .await;
    let reply = request(retry.addr, TOKEN_PATH, META).await;
    assert_eq!(
        (
            reply.status,
            reply.headers.get("retry-after").map(String::as_str)
        ),
        (503, Some("20")),
        "status: 503 + Retry-After"
    );
    // 500 on a passthrough transport error.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let objects = Objects::empty();
    let mut setup = Setup::new(&objects, BINDING_LABEL);
    setup.metadata = Some(dead);
    let broken = start_setup(setup, |_| {}).await;
    let reply = request(broken.addr, "/metadata/versions", META).await;
    assert_eq!(
        reply.status, 500,
        "status: 500 passthrough transport error: {}",
        reply.body
    );
    // Not reachable in podid: "500 empty remote address" (IPv6 callers) — nmi listens on an IPv4
    // address only (`--nmi-listen-address` must be IPv4) and the DNAT is IPv4; "500 panic" — no
    // handler panics (the namespaced-filter panic is a 404, item 8).
}

// ---------------------------------------------------------------- #13 iptables

/// Upstream's `iptables -t nat -S aad-metadata`, string for string (docs/upstream.md#interception).
const UPSTREAM_CHAIN: [&str; 3] = [
    "-N aad-metadata",
    "-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579",
    "-A aad-metadata -j RETURN",
];

fn lines(output: &str) -> Vec<String> {
    output
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

/// #13 (docs/upstream.md#interception) in a simulated node (its own network namespace and nat
/// table; needs root, and fails without it): the exact rule strings, the jump at position 1 of `nat
/// PREROUTING`, repair of every kind of tampering with upstream's reconcile semantics, a pod's
/// request reaching the real server through the DNAT with its own source address, and the explicit
/// uninstall.
///
/// SIGTERM: [`item_13_sigterm_keeps_the_rules`]. Not here: the periodic repair by the running
/// agent (tests/tests/nmi.rs flushes the chain of a running `nmi` and waits for the repair).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_13_iptables_interception() {
    let node = SimNode::create()
        .expect("#13 needs root (CAP_NET_ADMIN) for a simulated node; run the tests as root");
    let config = Flags::try_parse_from(["nmi", "--node=n"])
        .unwrap()
        .into_config_with_env(|_| None)
        .unwrap();
    assert_eq!(
        config.ipt_update_interval,
        Duration::from_secs(60),
        "#13 reconcile period"
    );
    let interception = Interception {
        metadata: config.metadata,
        target: config.dnat_target,
    };
    let reconcile_in_node = |node: &SimNode| {
        node.run(move || {
            let backend = SystemIptables::new().expect("iptables");
            reconcile(&backend, &interception)
        })
        .expect("enter the node")
        .expect("reconcile")
    };
    let chain = |node: &SimNode| lines(&node.iptables(&["-t", "nat", "-S", CHAIN]).unwrap());
    let prerouting =
        |node: &SimNode| lines(&node.iptables(&["-t", "nat", "-S", "PREROUTING"]).unwrap());

    // First install: chain, rules and jump.
    let first = reconcile_in_node(&node);
    assert!(
        first.chain_created && first.chain_rewritten && first.jump_inserted,
        "{first:?}"
    );
    assert_eq!(chain(&node), UPSTREAM_CHAIN, "#13 rule strings");
    assert_eq!(
        prerouting(&node),
        ["-P PREROUTING ACCEPT", "-A PREROUTING -j aad-metadata"],
        "#13 jump in nat PREROUTING"
    );
    assert!(
        !node
            .iptables(&["-t", "nat", "-S", "OUTPUT"])
            .unwrap()
            .contains(CHAIN),
        "#13 no OUTPUT rule: host-network traffic is not redirected"
    );
    assert!(
        reconcile_in_node(&node).unchanged(),
        "#13 steady state writes nothing"
    );

    // Tampering table: what was done, and what the next pass must do.
    struct Tamper {
        item: &'static str,
        commands: Vec<Vec<String>>,
        rewritten: bool,
        jump_inserted: bool,
        created: bool,
        /// The chain afterwards (None: upstream's three lines).
        chain_after: Option<Vec<&'static str>>,
    }
    let dnat: Vec<String> = UPSTREAM_CHAIN[1]
        .split(' ')
        .skip(2)
        .map(str::to_owned)
        .collect();
    let cmd = |head: &[&str], tail: &[String]| -> Vec<String> {
        head.iter()
            .map(|s| (*s).to_owned())
            .chain(tail.iter().cloned())
            .collect()
    };
    let table = [
        Tamper {
            item: "#13 chain flushed → rewritten",
            commands: vec![cmd(&["-t", "nat", "-F", CHAIN], &[])],
            rewritten: true,
            jump_inserted: false,
            created: false,
            chain_after: None,
        },
        Tamper {
            item: "#13 foreign rule in front → rewritten",
            commands: vec![cmd(&["-t", "nat", "-I", CHAIN, "1", "-j", "ACCEPT"], &[])],
            rewritten: true,
            jump_inserted: false,
            created: false,
            chain_after: None,
        },
        Tamper {
            item: "#13 duplicated DNAT → rewritten",
            commands: vec![cmd(&["-t", "nat", "-I", CHAIN, "1"], &dnat)],
            rewritten: true,
            jump_inserted: false,
            created: false,
            chain_after: None,
        },
        Tamper {
            item: "#13 DNAT target changed → rewritten",
            commands: vec![cmd(
                &["-t", "nat", "-R", CHAIN, "1"],
                &dnat
                    .iter()
                    .map(|a| a.replace("2579", "9999"))
                    .collect::<Vec<_>>(),
            )],
            rewritten: true,
            jump_inserted: false,
            created: false,
            chain_after: None,
        },
        Tamper {
            item: "#13 RETURN deleted → rewritten",
            commands: vec![cmd(&["-t", "nat", "-D", CHAIN, "-j", "RETURN"], &[])],
            rewritten: true,
            jump_inserted: false,
            created: false,
            chain_after: None,
        },
        Tamper {
            item: "#13 rule appended after RETURN → tolerated (as upstream)",
            commands: vec![cmd(&["-t", "nat", "-A", CHAIN, "-j", "ACCEPT"], &[])],
            rewritten: false,
            jump_inserted: false,
            created: false,
            chain_after: Some(vec![
                UPSTREAM_CHAIN[0],
                UPSTREAM_CHAIN[1],
                UPSTREAM_CHAIN[2],
                "-A aad-metadata -j ACCEPT",
            ]),
        },
        Tamper {
            item: "#13 jump deleted → re-inserted at position 1",
            commands: vec![
                cmd(&["-t", "nat", "-F", CHAIN], &[]),
                cmd(&["-t", "nat", "-D", "PREROUTING", "-j", CHAIN], &[]),
                cmd(&["-t", "nat", "-A", "PREROUTING", "-j", "RETURN"], &[]),
            ],
            rewritten: true,
            jump_inserted: true,
            created: false,
            chain_after: None,
        },
        Tamper {
            item: "#13 chain and jump deleted → created, rules and jump added",
            commands: vec![
                cmd(&["-t", "nat", "-D", "PREROUTING", "-j", CHAIN], &[]),
                cmd(&["-t", "nat", "-F", CHAIN], &[]),
                cmd(&["-t", "nat", "-X", CHAIN], &[]),
            ],
            rewritten: true,
            jump_inserted: true,
            created: true,
            chain_after: None,
        },
    ];
    let mut failures = Vec::new();
    for row in &table {
        for command in &row.commands {
            let args: Vec<&str> = command.iter().map(String::as_str).collect();
            node.iptables(&args)
                .unwrap_or_else(|e| panic!("{}: {args:?}: {e}", row.item));
        }
        let done = reconcile_in_node(&node);
        if (done.chain_rewritten, done.jump_inserted, done.chain_created)
            != (row.rewritten, row.jump_inserted, row.created)
        {
            failures.push(format!("{}: {done:?}", row.item));
        }
        let want: Vec<&str> = row
            .chain_after
            .clone()
            .unwrap_or_else(|| UPSTREAM_CHAIN.to_vec());
        if chain(&node) != want {
            failures.push(format!("{}: chain {:?}", row.item, chain(&node)));
        }
        if prerouting(&node).get(1).map(String::as_str) != Some("-A PREROUTING -j aad-metadata") {
            failures.push(format!("{}: PREROUTING {:?}", row.item, prerouting(&node)));
        }
        // Back to the clean state for the next row.
        node.iptables(&["-t", "nat", "-F", CHAIN]).unwrap();
        node.iptables(&["-t", "nat", "-F", "PREROUTING"]).unwrap();
        reconcile_in_node(&node);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A rule another agent inserts before the jump is left alone (the jump is not moved back).
    node.iptables(&[
        "-t",
        "nat",
        "-I",
        "PREROUTING",
        "1",
        "-s",
        "10.255.255.1/32",
        "-j",
        "RETURN",
    ])
    .unwrap();
    assert!(
        reconcile_in_node(&node).unchanged(),
        "#13 jump anywhere in PREROUTING is enough"
    );
    node.iptables(&[
        "-t",
        "nat",
        "-D",
        "PREROUTING",
        "-s",
        "10.255.255.1/32",
        "-j",
        "RETURN",
    ])
    .unwrap();

    // A pod's request to 169.254.169.254:80 reaches the real server on the node's 127.0.0.1:2579
    // with the pod's own address (route_localnet set by nmi, as podid does on nodes without
    // kube-proxy).
    node.run(|| {
        let iptables = SystemIptables::new().expect("iptables");
        enable_route_localnet(&iptables, std::path::Path::new("/proc/sys"))
    })
    .unwrap()
    .expect("#13 route_localnet");
    assert_eq!(
        node.read_sysctl("net.ipv4.conf.all.route_localnet")
            .unwrap()
            .trim(),
        "1"
    );
    let sim_pod = node.add_pod("web").unwrap();
    let std_listener = node.bind_tcp(config.listen).unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(std_listener).unwrap();
    let objects = assigned_a();
    let mut setup = Setup::new(&objects, BINDING_LABEL);
    setup.pods = vec![pod("app", "web", &sim_pod.ip().to_string(), BINDING_LABEL)];
    let harness = start_setup(setup, |_| {}).await;
    tokio::spawn(serve(
        listener,
        harness.state.clone(),
        std::future::pending(),
    ));
    let sim_pod = Arc::new(sim_pod);
    let from_pod = Arc::clone(&sim_pod);
    let raw = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = from_pod
            .connect_tcp("169.254.169.254:80".parse().unwrap())
            .expect("#13 the DNAT takes the pod to nmi");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let request = format!(
            "GET {TOKEN_PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).unwrap();
        buf
    })
    .await
    .unwrap();
    let reply = parse_reply(&raw);
    assert_eq!(reply.status, 200, "#13 intercepted request: {}", reply.body);
    assert_eq!(
        reply.json()["access_token"],
        format!("token-for-{CLIENT_A}")
    );
    assert_eq!(harness.provider.asked(), [Asked::Identity(CLIENT_A.into())]);

    // The explicit uninstall removes the jump and the chain.
    node.run(move || uninstall(&SystemIptables::new().expect("iptables"), &interception))
        .unwrap()
        .expect("#13 uninstall");
    assert!(
        node.iptables(&["-t", "nat", "-S", CHAIN]).is_err(),
        "#13 chain removed"
    );
    assert_eq!(
        prerouting(&node),
        ["-P PREROUTING ACCEPT"],
        "#13 jump removed"
    );

    // Custom addresses flow into the rule; a 0.0.0.0 listener still DNATs to 127.0.0.1.
    let custom = Flags::try_parse_from([
        "nmi",
        "--node=n",
        "--nmi-listen-address=0.0.0.0",
        "--nmi-port=3000",
        "--metadata-ip=10.9.8.7",
        "--metadata-port=8080",
    ])
    .unwrap()
    .into_config_with_env(|_| None)
    .unwrap();
    let custom = Interception {
        metadata: custom.metadata,
        target: custom.dnat_target,
    };
    assert_eq!(
        custom.expected_listing()[1],
        "-A aad-metadata ! -s 127.0.0.1/32 -d 10.9.8.7/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 127.0.0.1:3000"
    );
}

/// #13 SIGTERM: fix (docs/compatibility.md "rules deleted on SIGTERM" → rules stay,
/// fail closed). The real `nmi` binary runs in a simulated node against the fake API server,
/// installs the chain, and on SIGTERM exits 0 promptly (no 10 s sleep) leaving the chain and the
/// jump in place. Needs root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_13_sigterm_keeps_the_rules() {
    let node = SimNode::create()
        .expect("#13 needs root (CAP_NET_ADMIN) for a simulated node; run the tests as root");
    let api = FakeApiServer::start_on(std::net::SocketAddr::from((node.host_ip(), 0)))
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("podid-s7-sigterm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    api.write_kubeconfig(dir.join("kubeconfig")).unwrap();
    std::fs::write(dir.join("kubelet"), "KUBELET_FLAGS=--network-plugin=cni\n").unwrap();
    let mut child = node
        .command(env!("CARGO_BIN_EXE_nmi"))
        .arg("--node=node-a")
        .arg("--http-probe-port=8085")
        .arg(format!(
            "--kubelet-config={}",
            dir.join("kubelet").display()
        ))
        .env("KUBECONFIG", dir.join("kubeconfig"))
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Ready = caches synced and the interception installed.
    let probe = std::net::SocketAddr::from((node.ip(), 8085));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("#13 nmi exited early: {status}");
        }
        if let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(probe)).await
        {
            drop(stream);
            if request(probe, "/readyz", NO_HEADERS).await.status == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "#13 nmi not ready within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let chain = || lines(&node.iptables(&["-t", "nat", "-S", CHAIN]).unwrap());
    assert_eq!(chain(), UPSTREAM_CHAIN, "#13 installed by the binary");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(15),
            "#13 nmi did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "#13 SIGTERM exit status {status}");
    assert_eq!(
        chain(),
        UPSTREAM_CHAIN,
        "#13 the chain stays after SIGTERM (fix)"
    );
    assert!(
        lines(&node.iptables(&["-t", "nat", "-S", "PREROUTING"]).unwrap())
            .contains(&"-A PREROUTING -j aad-metadata".to_owned()),
        "#13 the jump stays after SIGTERM (fix)"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
