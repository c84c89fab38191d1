//! A rogue token endpoint: what an attacker who controls one namespace would run and point an
//! identity's `adEndpoint` at. It accepts every token request (any path ending in
//! `/oauth2/token` or `/oauth2/v2.0/token`), records everything it received — the form fields
//! *including* client secrets and assertions, since showing that none reached it is its
//! purpose — and answers with a token it minted itself (`rogue-<n>`), valid for an hour.
//!
//! Unlike the rest of the simulator this records credentials: tests use it to prove that nmi
//! never sends them here. It keeps them in memory only and never logs them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, StatusCode};
use serde_json::json;

use crate::error::Error;
use crate::http::{Handler, ServerHandle, json, loopback_listener, spawn_server};

/// One request the rogue endpoint received.
#[derive(Clone, PartialEq, Eq)]
pub struct RogueRequest {
    /// The request path (e.g. `/<tenant>/oauth2/token`).
    pub path: String,
    /// The form fields as received (`client_secret`, `client_assertion`, …).
    pub form: BTreeMap<String, String>,
}

impl std::fmt::Debug for RogueRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Field names only: the values are credentials.
        f.debug_struct("RogueRequest")
            .field("path", &self.path)
            .field("fields", &self.form.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// A running rogue token endpoint.
#[derive(Debug)]
pub struct RogueHandle {
    server: ServerHandle,
    received: Arc<Mutex<Vec<RogueRequest>>>,
}

impl RogueHandle {
    /// Binds `127.0.0.1:0` and serves. Must be called inside a tokio runtime.
    pub fn start() -> Result<Self, Error> {
        serve_rogue(loopback_listener()?)
    }

    /// Its base URL with a trailing slash, as an `adEndpoint`.
    pub fn url(&self) -> String {
        format!("{}/", self.server.url())
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<RogueRequest> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether `value` appeared in any form field it received.
    pub fn saw(&self, value: &str) -> bool {
        self.received()
            .iter()
            .any(|r| r.form.values().any(|v| v.contains(value)))
    }
}

/// The token the rogue endpoint minted for its `n`-th answer (1-based).
pub fn rogue_token(n: usize) -> String {
    format!("rogue-{n}")
}

/// Serves the rogue endpoint on `listener`. Must be called inside a tokio runtime.
pub fn serve_rogue(listener: std::net::TcpListener) -> Result<RogueHandle, Error> {
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    let handler: Handler = Arc::new(move |req| {
        let log = log.clone();
        Box::pin(async move {
            let path = req.uri.path().to_owned();
            let token_path =
                path.ends_with("/oauth2/token") || path.ends_with("/oauth2/v2.0/token");
            if req.method != Method::POST || !token_path {
                return Some(json(
                    StatusCode::NOT_FOUND,
                    &json!({"error": "not_found", "error_description": "rogue: no such route"}),
                ));
            }
            let form: BTreeMap<String, String> = url::form_urlencoded::parse(&req.body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            let resource = form
                .get("resource")
                .or_else(|| form.get("scope"))
                .cloned()
                .unwrap_or_default();
            let n = {
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                log.push(RogueRequest { path, form });
                log.len()
            };
            let now = crate::util::now_secs();
            Some(json(
                StatusCode::OK,
                &json!({
                    "token_type": "Bearer",
                    "access_token": rogue_token(n),
                    "expires_in": 3600,
                    "ext_expires_in": 3600,
                    "expires_on": (now + 3600).to_string(),
                    "not_before": now.to_string(),
                    "resource": resource,
                }),
            ))
        })
    });
    Ok(RogueHandle {
        server: spawn_server(listener, handler)?,
        received,
    })
}
