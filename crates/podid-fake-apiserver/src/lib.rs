//! A fake Kubernetes API server over plain HTTP that kube's `Client`, `Api<K>`, `watcher` and
//! `reflector` use unchanged, through a kubeconfig it writes.
//!
//! It stores raw JSON for any registered kind (core Pods, Nodes, Namespaces, Secrets,
//! ServiceAccounts, ConfigMaps, Events, Endpoints; events.k8s.io Events; Leases; the four
//! aad-pod-identity CRDs; anything added with `register_kind`), keeps a global
//! `resourceVersion`, serves list/watch with label and field selectors, create/replace/patch/
//! delete with finalizers and status subresources, ServiceAccount TokenRequest with an OIDC
//! issuer, and fault hooks for tests.
//!
//! Test-only: it must not be a dependency of shipped crates, and it must not depend on product
//! crates (nor on kube: it speaks the wire protocol, so a bug in kube's types cannot hide here;
//! k8s-openapi serves only as the source of the built-in kinds' OpenAPI schemas).

pub mod auth;
pub mod cli;
pub mod kinds;
pub mod meta;
pub mod selector;
pub mod status;
pub mod store;

pub use kinds::KindSpec;
pub use status::ApiError;

mod faults;
mod openapi;
mod protobuf;
mod schema;
mod server;
mod token;

pub use faults::{FaultKind, FaultMatch, Faults, RequestRecord};

use http::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use podid_test_keys::SigningKey;
use serde_json::Value;
use server::Shared;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What can go wrong starting or using the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding the listen address failed.
    #[error("binding the fake API server to {addr}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Generating the ServiceAccount signing key failed.
    #[error("generating the ServiceAccount token signing key")]
    Key(#[source] podid_test_keys::Error),
    /// Writing the kubeconfig failed.
    #[error("writing the kubeconfig to {path}")]
    WriteKubeconfig {
        /// Where.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Default number of changes kept per kind for watches to resume from, whatever their age
/// (younger ones are kept beyond it: see [`store::HISTORY_FRESH`]).
pub const DEFAULT_HISTORY: usize = 10_000;

/// Namespaces that exist on a fresh server, as on a real cluster.
pub const DEFAULT_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

/// How to start a server.
#[derive(Debug, Clone)]
pub struct Builder {
    listen: SocketAddr,
    key: Option<SigningKey>,
    history: usize,
    history_fresh: std::time::Duration,
    kinds: Vec<KindSpec>,
    issuer: Option<String>,
    tls: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            key: None,
            history: DEFAULT_HISTORY,
            history_fresh: store::HISTORY_FRESH,
            kinds: Vec::new(),
            issuer: None,
            tls: false,
        }
    }
}

impl Builder {
    /// Listen on `addr` (default `127.0.0.1:0`).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen = addr;
        self
    }

    /// Sign ServiceAccount tokens with `key` (default: a fresh key).
    pub fn signing_key(mut self, key: SigningKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Keep at least `n` changes of history per kind for watches (default
    /// [`DEFAULT_HISTORY`]).
    pub fn history(mut self, n: usize) -> Self {
        self.history = n;
        self
    }

    /// Also keep every change younger than `fresh` (default [`store::HISTORY_FRESH`], as
    /// kube-apiserver's watch cache), up to [`store::HISTORY_CAP`] per kind;
    /// `Duration::ZERO` keeps exactly [`Builder::history`] changes per kind.
    pub fn history_fresh(mut self, fresh: std::time::Duration) -> Self {
        self.history_fresh = fresh;
        self
    }

    /// Serve this kind in addition to the built-in ones.
    pub fn kind(mut self, spec: KindSpec) -> Self {
        self.kinds.push(spec);
        self
    }

    /// Use `issuer` as the token issuer (default: the server's base URL).
    pub fn issuer(mut self, issuer: &str) -> Self {
        self.issuer = Some(issuer.to_string());
        self
    }

    /// Serve HTTPS with a fresh self-signed certificate (default: plain HTTP). kubectl (like
    /// every client-go client) sends its bearer token only over TLS, so kubectl tests need it;
    /// the kubeconfig then skips verification of the certificate.
    pub fn tls(mut self, on: bool) -> Self {
        self.tls = on;
        self
    }

    /// Binds and starts serving.
    pub async fn start(self) -> Result<FakeApiServer, Error> {
        let listener = TcpListener::bind(self.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: self.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: self.listen,
            source,
        })?;
        let key = match self.key {
            Some(k) => k,
            None => tokio::task::spawn_blocking(SigningKey::generate)
                .await
                .map_err(|e| Error::Bind {
                    addr,
                    source: std::io::Error::other(e),
                })?
                .map_err(Error::Key)?,
        };
        let tls = if self.tls {
            Some(tls_acceptor().await.map_err(|e| Error::Bind {
                addr,
                source: std::io::Error::other(e),
            })?)
        } else {
            None
        };
        let url = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
        let mut store = store::Store::new(kinds::builtin(), self.history);
        store.set_history_fresh(self.history_fresh);
        store.register(KindSpec::cluster(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
        ));
        for k in self.kinds {
            store.register(k);
        }
        if let Some(ns) = store.find("", "v1", "namespaces") {
            for name in DEFAULT_NAMESPACES {
                let obj = serde_json::json!({"metadata": {"name": name}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
                store.create(ns, "", obj).map_err(|e| Error::Bind {
                    addr,
                    source: std::io::Error::other(e.message),
                })?;
            }
        }
        for (plural, obj) in auth::bootstrap_objects() {
            if let Some(k) = store.find("rbac.authorization.k8s.io", "v1", plural) {
                store.create(k, "", obj).map_err(|e| Error::Bind {
                    addr,
                    source: std::io::Error::other(e.message),
                })?;
            }
        }
        let issuer = self.issuer.unwrap_or_else(|| url.clone());
        let shared = Arc::new(Shared::new(store, key, issuer, addr.to_string()));
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx, tls));
        tracing::info!(%url, "fake API server listening");
        Ok(FakeApiServer {
            addr,
            url,
            shared,
            shutdown: shutdown_tx,
            task: Some(task),
        })
    }
}

/// A TLS acceptor with a fresh self-signed certificate.
async fn tls_acceptor() -> Result<tokio_rustls::TlsAcceptor, String> {
    let cert =
        tokio::task::spawn_blocking(|| podid_test_keys::Certificate::generate("fake-apiserver"))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    let pem = cert.key().private_pem().map_err(|e| e.to_string())?;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
        .map_err(|e| e.to_string())?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(der.into());
    let chain = vec![rustls::pki_types::CertificateDer::from(cert.der().to_vec())];
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => return,
            a = listener.accept() => a,
        };
        let (stream, _) = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        match &tls {
            None => {
                tokio::spawn(serve(stream, shared, shutdown));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor.accept(stream).await {
                        Ok(s) => serve(s, shared, shutdown).await,
                        Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
                    }
                });
            }
        }
    }
}

async fn serve<I>(io: I, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| server::handle(shared.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(io), svc);
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!(error = %e, "connection ended with an error");
        },
        _ = shutdown.changed() => {}
    }
}

/// In-process access to a [`FakeApiServer`]'s store, as the admin; see [`FakeApiServer::handle`].
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Runs a request in-process, bypassing HTTP, faults and the log. `path` may carry a query.
    pub fn request_json(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), ApiError> {
        let (p, q) = path.split_once('?').unwrap_or((path, ""));
        let query = server::parse_query(Some(q));
        let route = server::route(&self.shared.store(), p);
        let bytes = body.map(Value::to_string).unwrap_or_default();
        server::dispatch(
            &self.shared,
            &method,
            route,
            &query,
            content_type,
            bytes.as_bytes(),
            &auth::Identity::admin(),
        )
    }

    /// Reads the object or list at `path`.
    pub fn get_json(&self, path: &str) -> Result<Value, ApiError> {
        self.request_json(Method::GET, path, "", None)
            .map(|(_, v)| v)
    }

    /// Creates `obj` in the collection at `collection_path` (the namespace must exist).
    pub fn create_json(&self, collection_path: &str, obj: Value) -> Result<Value, ApiError> {
        self.request_json(
            Method::POST,
            collection_path,
            "application/json",
            Some(&obj),
        )
        .map(|(_, v)| v)
    }

    /// Replaces the object at `path` (a stale `resourceVersion` is a 409).
    pub fn replace_json(&self, path: &str, obj: Value) -> Result<Value, ApiError> {
        self.request_json(Method::PUT, path, "application/json", Some(&obj))
            .map(|(_, v)| v)
    }
}

/// A running fake API server. Dropping it stops it.
#[derive(Debug)]
pub struct FakeApiServer {
    addr: SocketAddr,
    url: String,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// A builder for non-default settings.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Starts a server on `127.0.0.1:0` with a fresh signing key.
    pub async fn start() -> Result<Self, Error> {
        Builder::default().start().await
    }

    /// Starts a server on `addr` with a fresh signing key.
    pub async fn start_on(addr: SocketAddr) -> Result<Self, Error> {
        Builder::default().listen(addr).start().await
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The ServiceAccount token issuer (`iss`), by default the base URL.
    pub fn issuer(&self) -> &str {
        &self.shared.issuer
    }

    /// The key ServiceAccount tokens are signed with.
    pub fn signing_key(&self) -> &SigningKey {
        &self.shared.key
    }

    /// The JWKS document served at `/openid/v1/jwks`.
    pub fn jwks(&self) -> Value {
        podid_test_keys::jwks([&self.shared.key])
    }

    /// The bearer token of the admin identity (user `podid-test-admin`, group `system:masters`,
    /// which bypasses RBAC). Requests without a valid token get `401`.
    pub fn admin_token(&self) -> &str {
        &self.shared.admin_token
    }

    /// A kubeconfig pointing at this server as the admin (context `fake`, namespace
    /// `default`, the admin bearer token).
    pub fn kubeconfig_yaml(&self) -> String {
        self.kubeconfig_with_token(&self.shared.admin_token)
    }

    /// A kubeconfig pointing at this server that authenticates with `token`.
    pub fn kubeconfig_with_token(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n{skip}contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: {token}\npreferences: {{}}\n",
            url = self.url,
            skip = if self.url.starts_with("https") {
                "    insecure-skip-tls-verify: true\n"
            } else {
                ""
            }
        )
    }

    /// Writes [`Self::kubeconfig_yaml`] to `path`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        std::fs::write(path, self.kubeconfig_yaml()).map_err(|source| Error::WriteKubeconfig {
            path: path.to_path_buf(),
            source,
        })
    }

    /// A token for ServiceAccount `ns/name` (which must exist), from TokenRequest with the
    /// server's own audience, valid for `seconds`: it authenticates as
    /// `system:serviceaccount:<ns>:<name>` and is authorized by RBAC.
    pub fn service_account_token(
        &self,
        ns: &str,
        name: &str,
        seconds: i64,
    ) -> Result<String, ApiError> {
        let body = serde_json::json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": seconds}});
        let tr = self.create_json(
            &format!("/api/v1/namespaces/{ns}/serviceaccounts/{name}/token"),
            body,
        )?;
        tr.pointer("/status/token")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ApiError::internal("TokenRequest answered without a token"))
    }

    /// Writes a kubeconfig that authenticates as ServiceAccount `ns/name` (a 24-hour token), so
    /// a process runs under that ServiceAccount's RBAC, as in a cluster.
    pub fn write_service_account_kubeconfig(
        &self,
        ns: &str,
        name: &str,
        path: impl AsRef<Path>,
    ) -> Result<(), Error> {
        let path = path.as_ref();
        let token =
            self.service_account_token(ns, name, 86_400)
                .map_err(|e| Error::WriteKubeconfig {
                    path: path.to_path_buf(),
                    source: std::io::Error::other(e.message),
                })?;
        std::fs::write(path, self.kubeconfig_with_token(&token)).map_err(|source| {
            Error::WriteKubeconfig {
                path: path.to_path_buf(),
                source,
            }
        })
    }

    /// Serves another kind (for example a CRD); creating a `CustomResourceDefinition` through
    /// the API does the same.
    pub fn register_kind(&self, spec: KindSpec) {
        self.shared.store().register(spec);
    }

    /// The fault hooks and request log.
    pub fn faults(&self) -> Faults {
        Faults {
            cell: self.shared.faults.clone(),
            shared: self.shared.clone(),
        }
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Runs a request in-process, bypassing HTTP, faults and the log. `path` may carry a query.
    pub fn request_json(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), ApiError> {
        self.handle().request_json(method, path, content_type, body)
    }

    /// A clonable handle for in-process requests as the admin (bypassing HTTP, faults and the
    /// log), for test doubles that run beside the server in their own tasks: their requests
    /// never show in [`Faults::requests`], which then holds only what the programs under test
    /// sent.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// Creates `obj` in the collection at `collection_path` (`/api/v1/namespaces/ns/pods`), as
    /// the admin. Seeding helper: a namespace in the path that does not exist yet is created
    /// first, as a test's setup would (requests over HTTP get `404` instead, as on a real
    /// server).
    pub fn create_json(&self, collection_path: &str, obj: Value) -> Result<Value, ApiError> {
        let create = || {
            self.request_json(
                Method::POST,
                collection_path,
                "application/json",
                Some(&obj),
            )
            .map(|(_, v)| v)
        };
        match create() {
            Err(e) if e.code == 404 && namespace_missing(&e, collection_path) => {
                let ns = e
                    .details
                    .as_ref()
                    .and_then(|d| d.get("name"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                self.request_json(
                    Method::POST,
                    "/api/v1/namespaces",
                    "application/json",
                    Some(&serde_json::json!({"metadata": {"name": ns}})),
                )?;
                create()
            }
            r => r,
        }
    }

    /// Like [`Self::create_json`], but a custom resource is stored exactly as given, without
    /// schema validation or pruning: an object written before its CRD had a structural schema
    /// (upstream's Go mic wrote capitalised field names), which a real server keeps as stored.
    pub fn seed_legacy_json(&self, collection_path: &str, obj: Value) -> Result<Value, ApiError> {
        self.shared.store().skip_schema = true;
        let r = self.create_json(collection_path, obj);
        self.shared.store().skip_schema = false;
        r
    }

    /// Reads the object or list at `path` (a query such as `?labelSelector=` is allowed).
    pub fn get_json(&self, path: &str) -> Result<Value, ApiError> {
        self.request_json(Method::GET, path, "", None)
            .map(|(_, v)| v)
    }

    /// Replaces the object at `path` (`/status` paths write only status).
    pub fn replace_json(&self, path: &str, obj: Value) -> Result<Value, ApiError> {
        self.request_json(Method::PUT, path, "application/json", Some(&obj))
            .map(|(_, v)| v)
    }

    /// JSON-merge-patches the object at `path`.
    pub fn merge_patch_json(&self, path: &str, patch: Value) -> Result<Value, ApiError> {
        self.request_json(
            Method::PATCH,
            path,
            "application/merge-patch+json",
            Some(&patch),
        )
        .map(|(_, v)| v)
    }

    /// Deletes the object at `path`.
    pub fn delete_json(&self, path: &str) -> Result<Value, ApiError> {
        self.request_json(Method::DELETE, path, "", None)
            .map(|(_, v)| v)
    }

    /// Stops accepting, ends every connection and watch, and waits for the accept loop.
    pub async fn shutdown(mut self) {
        self.stop();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    fn stop(&self) {
        let _ = self.shutdown.send(true);
        self.shared.drop_watches();
    }
}

/// Whether `e` says the namespace named in `path` does not exist.
fn namespace_missing(e: &ApiError, path: &str) -> bool {
    let Some(d) = &e.details else {
        return false;
    };
    let name = d.get("name").and_then(Value::as_str).unwrap_or("");
    d.get("kind").and_then(Value::as_str) == Some("namespaces")
        && !name.is_empty()
        && path.contains(&format!("/namespaces/{name}/"))
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
