//! Helpers shared by the simulator's integration tests.
#![allow(dead_code)]

use serde_json::Value;

pub fn client() -> reqwest::Client {
    podid_azure_sim::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("client")
}

/// POSTs a form, returns status and JSON body.
pub async fn post_form(url: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let r = client().post(url).form(form).send().await.expect("send");
    let status = r.status().as_u16();
    let body: Value = r.json().await.expect("json body");
    (status, body)
}

/// The first AADSTS code of an Entra error body.
pub fn aadsts(body: &Value) -> u64 {
    body["error_codes"][0].as_u64().expect("error_codes")
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A minimal OIDC issuer (discovery + JWKS over plain HTTP) standing in for the Kubernetes API
/// server's service-account issuer.
pub struct Issuer {
    pub url: String,
    pub key: podid_test_keys::SigningKey,
    pub fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Issuer {
    pub async fn start() -> Issuer {
        use http_body_util::Full;
        let key = podid_test_keys::SigningKey::generate().expect("key");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let fetches = Arc::new(AtomicUsize::new(0));
        let jwks = podid_test_keys::jwks([&key]).to_string();
        let discovery = serde_json::json!({
            "issuer": url,
            "jwks_uri": format!("{url}/openid/v1/jwks"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
        })
        .to_string();
        let f = fetches.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (jwks, discovery, f) = (jwks.clone(), discovery.clone(), f.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let body = match req.uri().path() {
                                "/.well-known/openid-configuration" => discovery.clone(),
                                "/openid/v1/jwks" => {
                                    f.fetch_add(1, Ordering::SeqCst);
                                    jwks.clone()
                                }
                                _ => String::new(),
                            };
                            async move {
                                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                    bytes::Bytes::from(body),
                                )))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Issuer {
            url,
            key,
            fetches,
            task,
        }
    }

    /// A service-account-like token.
    pub fn token(&self, sub: &str, aud: &str, exp: u64) -> String {
        self.key
            .sign(&serde_json::json!({
                "iss": self.url, "sub": sub, "aud": [aud], "exp": exp, "iat": now(), "nbf": now(),
            }))
            .expect("sign")
    }
}
