//! Shared harness of the podid-nmi integration tests: the real IMDS server (`serve`), probe and
//! metrics servers in-process on 127.0.0.1:0, a fake token provider that records what it was
//! asked for, a tiny fake IMDS for passthrough, object builders and a raw HTTP/1.1 client.
//!
//! The test process is the pod: by default its address 127.0.0.1 is indexed as pod `app/web`.
//! [`request_from`] binds the client socket to another loopback address (127.0.0.0/8 is all
//! local on Linux) so one test can be several pods.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    AzurePodIdentityException,
};
use podid_broker::{BrokerError, Token};
use podid_imds::ErrorOptions;
use podid_nmi::health::Health;
use podid_nmi::metrics::Metrics;
use podid_nmi::pods::PodIndex;
use podid_nmi::provider::{Issued, TokenFuture, TokenProvider, TokenRequest, TokenTarget};
use podid_nmi::server::{Limits, NmiState, ServerOptions, serve, serve_metrics, serve_probes};
use podid_nmi::state::Matcher;
use podid_select::matching::{MatchIndex, MatchOptions, NodeIdentity};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};

pub const CLIENT_A: &str = "aaaaaaaa-0000-0000-0000-00000000000a";
pub const CLIENT_B: &str = "bbbbbbbb-0000-0000-0000-00000000000b";
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const TOKEN_PATH: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
pub const META: &[(&str, &str)] = &[("Metadata", "true")];

// ---------------------------------------------------------------- fakes

/// What the fake provider was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    Identity(String),
    Node(NodeIdentity),
    /// A Workload Identity pod: client id and federated subject (`system:serviceaccount:…`).
    Workload {
        client_id: String,
        subject: String,
    },
}

/// Answers every request with `token-for-<client id>` (or `token-for-node`), valid one hour,
/// unless `fail` holds an error; records every request in `asked`.
#[derive(Debug, Default)]
pub struct FakeProvider {
    pub asked: Mutex<Vec<Asked>>,
    pub fail: Mutex<Option<BrokerError>>,
    /// Number of tokens per answer (more than one: primary plus auxiliary tenants).
    pub tokens_per_answer: Mutex<Option<usize>>,
}

impl FakeProvider {
    pub fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}

pub fn now_secs() -> u64 {
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
                TokenTarget::Workload(account) => {
                    let subject = match request.federated {
                        Some(podid_broker::Credential::Federated { subject, .. }) => {
                            subject.subject()
                        }
                        _ => String::new(),
                    };
                    (
                        Asked::Workload {
                            client_id: account.client_id.clone(),
                            subject,
                        },
                        account.client_id.clone(),
                    )
                }
            };
            self.asked.lock().unwrap().push(asked);
            if let Some(error) = self.fail.lock().unwrap().clone() {
                return Err(error);
            }
            let count = self.tokens_per_answer.lock().unwrap().unwrap_or(1);
            let tokens: Vec<_> = (0..count)
                .map(|i| {
                    let access = if i == 0 {
                        format!("token-for-{name}")
                    } else {
                        format!("token-for-{name}-aux{i}")
                    };
                    Arc::new(Token::new(access, request.resource, now_secs() + 3600))
                })
                .collect();
            Ok(Issued {
                tokens: tokens.into(),
                cache_hit: Some(false),
            })
        })
    }
}

/// A tiny IMDS: answers 404 `not found` (with `X-Imds: fake`) and reports each request head.
pub async fn fake_imds() -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
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

pub async fn read_head(stream: &mut TcpStream) -> String {
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

/// A `Running` pod with `ip` and `labels`.
pub fn pod(ns: &str, name: &str, ip: &str, labels: &[(&str, &str)]) -> Pod {
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

pub fn rid(name: &str) -> String {
    format!(
        "/subscriptions/S/resourcegroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

pub struct Objects {
    pub identities: Vec<AzureIdentity>,
    pub bindings: Vec<AzureIdentityBinding>,
    pub assignments: Vec<AzureAssignedIdentity>,
    pub exceptions: Vec<AzurePodIdentityException>,
}

impl Objects {
    pub fn empty() -> Self {
        Self {
            identities: vec![],
            bindings: vec![],
            assignments: vec![],
            exceptions: vec![],
        }
    }

    /// Identity `id` in `ns` bound to label `kv` and assigned to `app/web` in `state`.
    pub fn bound(ns: &str, client_id: &str, state: AssignedIdentityState) -> Self {
        let mut objects = Self::empty();
        objects.add(
            AzureIdentity::user_assigned(ns, "id", &rid("id"), client_id),
            state,
        );
        objects
    }

    /// `identity`, a binding `<name>-binding` for label `kv` in its namespace, and an
    /// assignment of it to pod `app/web` in `state`.
    pub fn add(&mut self, identity: AzureIdentity, state: AssignedIdentityState) {
        self.add_for_pod(identity, "web", state);
    }

    /// Like [`Objects::add`] for pod `app/<pod>`.
    pub fn add_for_pod(
        &mut self,
        identity: AzureIdentity,
        pod: &str,
        state: AssignedIdentityState,
    ) {
        let ns = identity.metadata.namespace.clone().unwrap();
        let name = identity.metadata.name.clone().unwrap();
        let binding =
            AzureIdentityBinding::for_selector(&ns, &format!("{name}-binding"), &name, "kv");
        let mut assigned = AzureAssignedIdentity::for_pod(
            "default",
            pod,
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

    pub fn index(&self, options: MatchOptions) -> MatchIndex {
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

pub struct Nmi {
    pub addr: SocketAddr,
    pub probes: SocketAddr,
    pub metrics: SocketAddr,
    pub state: Arc<NmiState>,
    pub provider: Arc<FakeProvider>,
    pub imds: mpsc::UnboundedReceiver<String>,
    pub stop: Option<oneshot::Sender<()>>,
    pub done: Option<tokio::task::JoinHandle<()>>,
}

/// The test defaults: header required, JSON errors, short pod wait (200 ms) and pending wait (5 s).
pub fn options(metadata: SocketAddr) -> ServerOptions {
    ServerOptions {
        metadata,
        metadata_header_required: true,
        block_instance_metadata: false,
        enable_host_token: false,
        errors: ErrorOptions::default(),
        pod_wait: Duration::from_millis(200),
        pending_wait: Duration::from_secs(5),
        limits: Limits::default(),
        federated_default_tenant: true,
    }
}

/// Everything a harness can vary.
pub struct Setup<'a> {
    pub objects: &'a Objects,
    /// The pods in the index (synced).
    pub pods: Vec<Pod>,
    pub match_options: MatchOptions,
    /// Replaces the fake provider (which then records nothing).
    pub tokens: Option<Arc<dyn TokenProvider>>,
    /// The IMDS for passthrough; a fresh [`fake_imds`] when `None`.
    pub metadata: Option<SocketAddr>,
    /// `Some`: serve Workload Identity pods (`--serve-workload-identity-pods`) with these
    /// service accounts (synced).
    pub service_accounts: Option<Vec<k8s_openapi::api::core::v1::ServiceAccount>>,
}

impl<'a> Setup<'a> {
    /// Pod `app/web` on 127.0.0.1 with `labels`, default matcher options.
    pub fn new(objects: &'a Objects, labels: &[(&str, &str)]) -> Self {
        Self {
            objects,
            pods: vec![pod("app", "web", "127.0.0.1", labels)],
            match_options: MatchOptions::default(),
            tokens: None,
            metadata: None,
            service_accounts: None,
        }
    }
}

/// Start the three servers for `setup`, `tweak`ing the server options first.
pub async fn start_setup(setup: Setup<'_>, tweak: impl FnOnce(&mut ServerOptions)) -> Nmi {
    let (fake_addr, imds) = fake_imds().await;
    let mut opts = options(setup.metadata.unwrap_or(fake_addr));
    tweak(&mut opts);
    let pods = Arc::new(PodIndex::new());
    for pod in &setup.pods {
        pods.apply(pod);
    }
    pods.mark_synced();
    let matcher = Arc::new(Matcher::new(setup.match_options));
    matcher.replace(setup.objects.index(setup.match_options));
    matcher.mark_synced();
    let provider = Arc::new(FakeProvider::default());
    let tokens: Arc<dyn TokenProvider> = match setup.tokens {
        Some(tokens) => tokens,
        None => provider.clone(),
    };
    let mut state = NmiState::new(
        opts,
        pods,
        matcher,
        tokens,
        Arc::new(Metrics::new()),
        Arc::new(Health::default()),
    );
    if let Some(service_accounts) = &setup.service_accounts {
        let accounts = Arc::new(podid_nmi::workload::ServiceAccounts::default());
        accounts.replace_all(service_accounts);
        accounts.mark_synced();
        state = state.with_workload_identity(accounts);
    }
    let state = Arc::new(state);
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

/// Pod `app/web` on 127.0.0.1 with `labels`.
pub async fn start_with(
    objects: &Objects,
    labels: &[(&str, &str)],
    tweak: impl FnOnce(&mut ServerOptions),
    match_options: MatchOptions,
) -> Nmi {
    let mut setup = Setup::new(objects, labels);
    setup.match_options = match_options;
    start_setup(setup, tweak).await
}

/// Pod `app/web` on 127.0.0.1 labelled `aadpodidbinding: kv`, default options.
pub async fn start(objects: &Objects) -> Nmi {
    start_with(
        objects,
        &[("aadpodidbinding", "kv")],
        |_| {},
        MatchOptions::default(),
    )
    .await
}

// ---------------------------------------------------------------- client

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Lower-cased names.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

fn raw_get(target: &str, headers: &[(&str, &str)]) -> String {
    let mut raw =
        format!("GET {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n");
    for (name, value) in headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    raw.push_str("\r\n");
    raw
}

/// One HTTP/1.1 GET over a fresh connection (`Connection: close`).
pub async fn request(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Reply {
    send_raw(addr, raw_get(target, headers).as_bytes()).await
}

/// Like [`request`], from the local address `source` (any 127.0.0.0/8 address).
pub async fn request_from(
    source: IpAddr,
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let stream = tokio::time::timeout(TIMEOUT, socket.connect(addr))
        .await
        .expect("connect in time")
        .unwrap();
    exchange(stream, raw_get(target, headers).as_bytes()).await
}

pub async fn send_raw(addr: SocketAddr, raw: &[u8]) -> Reply {
    let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .unwrap();
    exchange(stream, raw).await
}

async fn exchange(mut stream: TcpStream, raw: &[u8]) -> Reply {
    tokio::time::timeout(TIMEOUT, async {
        stream.write_all(raw).await.unwrap();
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.unwrap();
        parse_reply(&buf)
    })
    .await
    .expect("the server answers in time")
}

/// Parse a complete `Connection: close` HTTP/1.1 response.
pub fn parse_reply(buf: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(buf).into_owned();
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
}
