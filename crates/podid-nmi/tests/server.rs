//! The IMDS server in-process on 127.0.0.1:0 with a fake token provider; the test is the pod
//! (its address 127.0.0.1 is indexed as pod `app/web`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    AzurePodIdentityException,
};
use podid_controller::broker::{BrokerError, SourceKind, Token};
use podid_controller::matching::{MatchIndex, MatchOptions, NodeIdentity};
use podid_imds::ErrorOptions;
use podid_nmi::metrics::Metrics;
use podid_nmi::pods::PodIndex;
use podid_nmi::provider::{Issued, TokenFuture, TokenProvider, TokenRequest, TokenTarget};
use podid_nmi::server::{
    Health, Limits, Matcher, NmiState, ServerOptions, serve, serve_metrics, serve_probes,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

const CLIENT_A: &str = "aaaaaaaa-0000-0000-0000-00000000000a";
const CLIENT_B: &str = "bbbbbbbb-0000-0000-0000-00000000000b";
const TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- fakes

/// What the fake provider was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Asked {
    Identity(String),
    Node(NodeIdentity),
}

#[derive(Debug, Default)]
struct FakeProvider {
    asked: Mutex<Vec<Asked>>,
    fail: Mutex<Option<BrokerError>>,
}

impl FakeProvider {
    fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl TokenProvider for FakeProvider {
    fn tokens<'a>(&'a self, request: TokenRequest<'a>) -> TokenFuture<'a> {
        Box::pin(async move {
            let (asked, name) = match request.target {
                TokenTarget::Identity(identity) => {
                    let id = identity.spec.client_id.clone().unwrap_or_default();
                    (Asked::Identity(id.clone()), id)
                }
                TokenTarget::Node(node) => (Asked::Node(node.clone()), "node".to_owned()),
            };
            self.asked.lock().unwrap().push(asked);
            if let Some(error) = self.fail.lock().unwrap().clone() {
                return Err(error);
            }
            let token = Token::new(
                format!("token-for-{name}"),
                request.resource,
                now_secs() + 3600,
            );
            Ok(Issued {
                tokens: vec![Arc::new(token)],
                cache_hit: Some(false),
            })
        })
    }
}

/// A tiny IMDS: answers 404 `not found` and reports each request head it saw.
async fn fake_imds() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let _ = tx.send(head);
                let _ = stream
                    .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nX-Imds: fake\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found")
                    .await;
            });
        }
    });
    (addr, rx)
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut byte).await.unwrap();
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&byte[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

// ---------------------------------------------------------------- objects

fn pod(ns: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> Pod {
    let mut p = Pod::default();
    p.metadata.namespace = Some(ns.into());
    p.metadata.name = Some(name.into());
    p.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    p.spec = Some(PodSpec {
        service_account_name: Some("web-sa".into()),
        ..Default::default()
    });
    p.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.into()),
        pod_ips: Some(vec![PodIP { ip: ip.into() }]),
        ..Default::default()
    });
    p
}

fn rid(name: &str) -> String {
    format!(
        "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

struct Objects {
    identities: Vec<AzureIdentity>,
    bindings: Vec<AzureIdentityBinding>,
    assignments: Vec<AzureAssignedIdentity>,
    exceptions: Vec<AzurePodIdentityException>,
}

impl Objects {
    fn empty() -> Self {
        Self {
            identities: vec![],
            bindings: vec![],
            assignments: vec![],
            exceptions: vec![],
        }
    }

    /// Identity `id` in `ns` bound to label `kv` and assigned to `app/web` in `state`.
    fn bound(ns: &str, client_id: &str, state: AssignedIdentityState) -> Self {
        let mut objects = Self::empty();
        objects.add(
            AzureIdentity::user_assigned(ns, "id", &rid("id"), client_id),
            state,
        );
        objects
    }

    fn add(&mut self, identity: AzureIdentity, state: AssignedIdentityState) {
        let ns = identity.metadata.namespace.clone().unwrap();
        let name = identity.metadata.name.clone().unwrap();
        let binding =
            AzureIdentityBinding::for_selector(&ns, &format!("{name}-binding"), &name, "kv");
        let mut assigned = AzureAssignedIdentity::for_pod(
            "default",
            "web",
            "app",
            "node",
            identity.clone(),
            binding.clone(),
        );
        assigned.status.as_mut().unwrap().status = Some(state);
        self.identities.push(identity);
        self.bindings.push(binding);
        self.assignments.push(assigned);
    }

    fn index(&self, options: MatchOptions) -> MatchIndex {
        MatchIndex::new(
            options,
            self.identities.iter().cloned().map(Arc::new),
            self.bindings.iter().cloned().map(Arc::new),
            self.assignments.iter().cloned().map(Arc::new),
            self.exceptions.iter().cloned().map(Arc::new),
        )
    }
}

// ---------------------------------------------------------------- harness

struct Nmi {
    addr: std::net::SocketAddr,
    probes: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    state: Arc<NmiState>,
    provider: Arc<FakeProvider>,
    imds: mpsc::UnboundedReceiver<String>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

fn options(metadata: std::net::SocketAddr) -> ServerOptions {
    ServerOptions {
        metadata,
        metadata_header_required: true,
        block_instance_metadata: false,
        enable_host_token: false,
        errors: ErrorOptions::default(),
        pod_wait: Duration::from_millis(200),
        pending_wait: Duration::from_secs(5),
        limits: Limits::default(),
    }
}

async fn start_with(
    objects: &Objects,
    labels: &[(&str, &str)],
    tweak: impl FnOnce(&mut ServerOptions),
    match_options: MatchOptions,
) -> Nmi {
    let (imds_addr, imds) = fake_imds().await;
    let mut opts = options(imds_addr);
    tweak(&mut opts);
    let pods = Arc::new(PodIndex::new());
    pods.apply(&pod("app", "web", "127.0.0.1", labels));
    pods.mark_synced();
    let matcher = Arc::new(Matcher::new(match_options));
    matcher.replace(objects.index(match_options));
    matcher.mark_synced();
    let provider = Arc::new(FakeProvider::default());
    let state = Arc::new(NmiState::new(
        opts,
        pods,
        matcher,
        provider.clone(),
        Arc::new(Metrics::new()),
        Arc::new(Health::default()),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let probe_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let probes = probe_listener.local_addr().unwrap();
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = metrics_listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let (stop_aux, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut aux1 = stop_aux.subscribe();
    let mut aux2 = stop_aux.subscribe();
    tokio::spawn(serve_probes(probe_listener, state.clone(), async move {
        let _ = aux1.recv().await;
    }));
    tokio::spawn(serve_metrics(
        metrics_listener,
        state.metrics.clone(),
        Limits::default(),
        async move {
            let _ = aux2.recv().await;
        },
    ));
    let done = tokio::spawn(serve(listener, state.clone(), async move {
        let _ = stopped.await;
        drop(stop_aux);
    }));
    Nmi {
        addr,
        probes,
        metrics,
        state,
        provider,
        imds,
        stop: Some(stop),
        done: Some(done),
    }
}

async fn start(objects: &Objects) -> Nmi {
    start_with(
        objects,
        &[("aadpodidbinding", "kv")],
        |_| {},
        MatchOptions::default(),
    )
    .await
}

struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`).
async fn request(addr: std::net::SocketAddr, target: &str, headers: &[(&str, &str)]) -> Reply {
    let mut raw =
        format!("GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n");
    for (name, value) in headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    raw.push_str("\r\n");
    send_raw(addr, raw.as_bytes()).await
}

async fn send_raw(addr: std::net::SocketAddr, raw: &[u8]) -> Reply {
    tokio::time::timeout(TIMEOUT, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(raw).await.unwrap();
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("a complete response");
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Reply {
            status,
            headers,
            body: body.to_owned(),
        }
    })
    .await
    .expect("the server answers in time")
}

const TOKEN_PATH: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
const META: &[(&str, &str)] = &[("Metadata", "true")];

// ---------------------------------------------------------------- tests

#[tokio::test]
async fn token_success_has_the_imds_body() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.headers["content-type"], "application/json");
    let body = reply.json();
    assert_eq!(body["access_token"], format!("token-for-{CLIENT_A}"));
    assert_eq!(body["resource"], "https://vault.azure.net");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["client_id"], CLIENT_A);
    let expires_in: u64 = body["expires_in"].as_str().unwrap().parse().unwrap();
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    let expires_on: u64 = body["expires_on"].as_str().unwrap().parse().unwrap();
    assert!(expires_on >= now_secs() + 3590);
    assert_eq!(
        nmi.provider.asked(),
        vec![Asked::Identity(CLIENT_A.to_owned())]
    );
    // Rust SDK: lower-case header name.
    let reply = request(nmi.addr, TOKEN_PATH, &[("metadata", "true")]).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn missing_or_wrong_metadata_header_is_400() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    for headers in [&[][..], &[("Metadata", "True")][..]] {
        let reply = request(nmi.addr, TOKEN_PATH, headers).await;
        assert_eq!(reply.status, 400);
        assert_eq!(
            reply.json()["error_description"],
            "Required metadata header not specified"
        );
    }
    assert!(nmi.provider.asked().is_empty());
}

#[tokio::test]
async fn unknown_pod_is_500() {
    let nmi = start_with(
        &Objects::bound("app", CLIENT_A, AssignedIdentityState::Assigned),
        &[("aadpodidbinding", "kv")],
        |_| {},
        MatchOptions::default(),
    )
    .await;
    // Move the pod to another address: 127.0.0.1 now belongs to nobody.
    nmi.state
        .pods
        .apply(&pod("app", "web", "10.1.2.3", &[("aadpodidbinding", "kv")]));
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 500);
    assert_eq!(reply.json()["error_description"], "pod list is empty");
    // Two pods on one address: ambiguous, fail closed.
    nmi.state
        .pods
        .apply(&pod("app", "a", "127.0.0.1", &[("aadpodidbinding", "kv")]));
    nmi.state
        .pods
        .apply(&pod("app", "b", "127.0.0.1", &[("aadpodidbinding", "kv")]));
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 500);
    assert!(nmi.provider.asked().is_empty());
}

#[tokio::test]
async fn unbound_pod_gets_404_at_once() {
    let nmi = start_with(&Objects::empty(), &[], |_| {}, MatchOptions::default()).await;
    let started = Instant::now();
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(reply.status, 404);
    assert_eq!(
        reply.json()["error_description"],
        "no azure identity is bound to pod app/web"
    );
    assert!(nmi.provider.asked().is_empty());

    let nmi = start_with(
        &Objects::empty(),
        &[],
        |o| o.errors.set_retry_after_header = true,
        MatchOptions::default(),
    )
    .await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.headers["retry-after"], "20");
}

#[tokio::test]
async fn wrong_client_id_never_gets_another_identity() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    let started = Instant::now();
    let reply = request(
        nmi.addr,
        &format!("{TOKEN_PATH}&client_id={CLIENT_B}"),
        META,
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(reply.status, 404);
    assert!(!reply.body.contains("token-for"));
    let reply = request(
        nmi.addr,
        &format!("{TOKEN_PATH}&object_id={CLIENT_A}"),
        META,
    )
    .await;
    assert_eq!(reply.status, 400);
    assert!(nmi.provider.asked().is_empty(), "no token was fetched");
    // Upper-cased client id still matches.
    let upper = CLIENT_A.to_ascii_uppercase();
    let reply = request(nmi.addr, &format!("{TOKEN_PATH}&client_id={upper}"), META).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["client_id"], CLIENT_A);
}

#[tokio::test]
async fn exception_pod_gets_node_identity() {
    let mut objects = Objects::empty();
    objects
        .exceptions
        .push(AzurePodIdentityException::for_pod_labels(
            "app",
            "ex",
            [("app".to_owned(), "mic".to_owned())],
        ));
    let nmi = start_with(&objects, &[("app", "MIC")], |_| {}, MatchOptions::default()).await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let reply = request(
        nmi.addr,
        &format!("{TOKEN_PATH}&client_id={CLIENT_B}"),
        META,
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["client_id"], CLIENT_B);
    assert_eq!(
        nmi.provider.asked(),
        vec![
            Asked::Node(NodeIdentity::SystemAssigned),
            Asked::Node(NodeIdentity::ClientId(CLIENT_B.to_owned()))
        ]
    );
    // Exception-path failures are 403, as upstream.
    *nmi.provider.fail.lock().unwrap() = Some(BrokerError::Unavailable {
        source_kind: SourceKind::Imds,
        client_id: String::new(),
        reason: "down".into(),
        retry_after: None,
    });
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 403);
    assert!(
        reply.json()["error_description"]
            .as_str()
            .unwrap()
            .starts_with("failed to get service principal token, error:")
    );
}

#[tokio::test]
async fn broker_errors_map_to_403_and_503() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    *nmi.provider.fail.lock().unwrap() = Some(BrokerError::Refused {
        source_kind: SourceKind::Imds,
        client_id: CLIENT_A.into(),
        status: 400,
        error: "invalid_request".into(),
        description: "Identity not found".into(),
    });
    assert_eq!(request(nmi.addr, TOKEN_PATH, META).await.status, 403);
    *nmi.provider.fail.lock().unwrap() = Some(BrokerError::Unavailable {
        source_kind: SourceKind::Imds,
        client_id: CLIENT_A.into(),
        reason: "connection refused".into(),
        retry_after: None,
    });
    assert_eq!(request(nmi.addr, TOKEN_PATH, META).await.status, 503);
}

#[tokio::test]
async fn namespaced_identity_in_another_namespace_is_404() {
    let mut objects = Objects::empty();
    objects.add(
        AzureIdentity::user_assigned("other", "id", &rid("id"), CLIENT_A).namespaced(),
        AssignedIdentityState::Assigned,
    );
    let nmi = start(&objects).await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 404);
    // force_namespaced does the same for an unannotated identity.
    let nmi = start_with(
        &Objects::bound("other", CLIENT_A, AssignedIdentityState::Assigned),
        &[("aadpodidbinding", "kv")],
        |_| {},
        MatchOptions {
            force_namespaced: true,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(request(nmi.addr, TOKEN_PATH, META).await.status, 404);
    assert!(nmi.provider.asked().is_empty());
}

#[tokio::test]
async fn created_assignment_waits_until_assigned() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Created,
    ))
    .await;
    let addr = nmi.addr;
    let pending = tokio::spawn(async move { request(addr, TOKEN_PATH, META).await });
    // Wait until the request is parked on the matcher, then complete the assignment.
    tokio::time::timeout(TIMEOUT, async {
        while nmi.state.matcher.waiting() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the request waits for the assignment");
    assert!(!pending.is_finished());
    nmi.state.matcher.replace(
        Objects::bound("app", CLIENT_A, AssignedIdentityState::Assigned)
            .index(MatchOptions::default()),
    );
    let reply = pending.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["client_id"], CLIENT_A);
}

#[tokio::test]
async fn created_assignment_wait_is_bounded() {
    let nmi = start_with(
        &Objects::bound("app", CLIENT_A, AssignedIdentityState::Created),
        &[("aadpodidbinding", "kv")],
        |o| o.pending_wait = Duration::from_millis(300),
        MatchOptions::default(),
    )
    .await;
    let started = Instant::now();
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(reply.status, 404);
    assert!(
        reply.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("still in progress")
    );
}

#[tokio::test]
async fn host_token_is_proxied_unless_enabled() {
    let mut nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    let host = [("podns", "app"), ("podname", "web"), ("Metadata", "true")];
    let reply = request(
        nmi.addr,
        "/host/token?resource=https%3A%2F%2Fvault.azure.net",
        &host,
    )
    .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.headers["x-imds"], "fake");
    let head = nmi.imds.recv().await.unwrap();
    assert!(head.starts_with("GET /host/token?"), "{head}");
    assert!(nmi.provider.asked().is_empty());

    let nmi = start_with(
        &Objects::bound("app", CLIENT_A, AssignedIdentityState::Assigned),
        &[("aadpodidbinding", "kv")],
        |o| o.enable_host_token = true,
        MatchOptions::default(),
    )
    .await;
    let reply = request(
        nmi.addr,
        "/host/token?resource=https%3A%2F%2Fvault.azure.net",
        &host[..2],
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let body = reply.json();
    assert_eq!(body["clientid"], CLIENT_A);
    assert!(body["token"]["expires_in"].is_number());
    let reply = request(nmi.addr, "/host/token?resource=r", &[]).await;
    assert_eq!(reply.status, 400);
}

#[tokio::test]
async fn instance_metadata_block_and_passthrough() {
    let mut nmi = start(&Objects::empty()).await;
    let reply = request(
        nmi.addr,
        "/metadata/instance?api-version=2021-02-01",
        &[("Metadata", "true"), ("X-Forwarded-For", "6.6.6.6")],
    )
    .await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body, "not found");
    let head = nmi.imds.recv().await.unwrap();
    assert!(
        head.starts_with("GET /metadata/instance?api-version=2021-02-01 HTTP/1.1"),
        "{head}"
    );
    let lower = head.to_ascii_lowercase();
    assert!(!lower.contains("x-forwarded-for"), "{head}");
    assert!(lower.contains("metadata: true"), "{head}");
    // Without the header, passthrough is refused before IMDS sees anything.
    let reply = request(nmi.addr, "/doesnotexist", &[]).await;
    assert_eq!(reply.status, 400);

    let nmi = start_with(
        &Objects::empty(),
        &[],
        |o| o.block_instance_metadata = true,
        MatchOptions::default(),
    )
    .await;
    let reply = request(nmi.addr, "/metadata/instance/compute", &[]).await;
    assert_eq!(reply.status, 403);
    assert_eq!(
        reply.json()["error_description"],
        "Request blocked by AAD Pod Identity NMI"
    );
}

#[tokio::test]
async fn passthrough_without_imds_is_500() {
    let nmi = start(&Objects::empty()).await;
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let mut options = nmi.state.options.clone();
    options.metadata = dead;
    let state = Arc::new(NmiState::new(
        options,
        nmi.state.pods.clone(),
        nmi.state.matcher.clone(),
        nmi.provider.clone(),
        Arc::new(Metrics::new()),
        Arc::new(Health::default()),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, state, std::future::pending()));
    let reply = request(addr, "/x", META).await;
    assert_eq!(reply.status, 500);
}

#[tokio::test]
async fn oversized_headers_are_rejected_and_the_server_survives() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    let big = "x".repeat(64 * 1024);
    let reply = request(
        nmi.addr,
        TOKEN_PATH,
        &[("Metadata", "true"), ("X-Big", &big)],
    )
    .await;
    assert_eq!(reply.status, 431);
    let many: Vec<(String, String)> = (0..200)
        .map(|i| (format!("X-H{i}"), "v".to_owned()))
        .collect();
    let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let reply = request(nmi.addr, TOKEN_PATH, &refs).await;
    assert!(
        reply.status == 431 || reply.status == 400,
        "{}",
        reply.status
    );
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn redirect_and_invalid_token_path() {
    let nmi = start(&Objects::empty()).await;
    let reply = request(nmi.addr, "//metadata/identity/oauth2/token?resource=x", &[]).await;
    assert_eq!(reply.status, 301);
    assert_eq!(
        reply.headers["location"],
        "/metadata/identity/oauth2/token?resource=x"
    );
    let reply = request(nmi.addr, "/metadata/identity\\oauth2/token", META).await;
    assert_eq!(reply.status, 400);
}

#[tokio::test]
async fn metrics_and_probes() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    assert_eq!(request(nmi.addr, TOKEN_PATH, META).await.status, 200);
    nmi.state.pods.apply(&pod("app", "web", "10.9.9.9", &[]));
    assert_eq!(request(nmi.addr, TOKEN_PATH, META).await.status, 500);
    let reply = request(nmi.metrics, "/metrics", &[]).await;
    assert_eq!(reply.status, 200);
    let text = reply.body;
    for needle in [
        "aadpodidentity_nmi_operations_duration_seconds_bucket{namespace=\"app\",operation_type=\"token\",resource=\"https://vault.azure.net\",status_code=\"200\"",
        "aadpodidentity_imds_operations_duration_seconds_bucket{operation_type=\"adal_token_msi_userassignedid\"",
        "aadpodidentity_kubernetes_api_operations_errors_count{operation_type=\"get_pod_list\"} 1",
        "podid_nmi_attribution_failures_total{reason=\"not_found\"} 1",
        "podid_nmi_token_cache_hits_total",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(!text.contains("token-for-"), "no token in metrics");

    let reply = request(nmi.probes, "/healthz", &[]).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "Not Active"));
    assert_eq!(request(nmi.probes, "/readyz", &[]).await.status, 503);
    nmi.state.health.set_interception_installed(true);
    let reply = request(nmi.probes, "/healthz", &[]).await;
    assert_eq!((reply.status, reply.body.as_str()), (200, "Active"));
    assert_eq!(request(nmi.probes, "/readyz", &[]).await.status, 200);
}

#[tokio::test]
async fn unsynced_matcher_fails_closed() {
    let nmi = start(&Objects::bound(
        "app",
        CLIENT_A,
        AssignedIdentityState::Assigned,
    ))
    .await;
    let fresh = Matcher::new(MatchOptions::default());
    fresh.replace(
        Objects::bound("app", CLIENT_A, AssignedIdentityState::Assigned)
            .index(MatchOptions::default()),
    );
    let state = Arc::new(NmiState::new(
        nmi.state.options.clone(),
        nmi.state.pods.clone(),
        Arc::new(fresh),
        nmi.provider.clone(),
        Arc::new(Metrics::new()),
        Arc::new(Health::default()),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, state, std::future::pending()));
    assert_eq!(request(addr, TOKEN_PATH, META).await.status, 503);
    assert!(nmi.provider.asked().is_empty());
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let mut nmi = start(&Objects::empty()).await;
    nmi.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(TIMEOUT, nmi.done.take().unwrap())
        .await
        .expect("serve returns after shutdown")
        .unwrap();
    assert!(TcpStream::connect(nmi.addr).await.is_err());
}
