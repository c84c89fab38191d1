//! Every error the NMI port answers with: status codes, headers and bodies
//! (docs/upstream.md#status-codes).
//!
//! The `Display` text of each variant is upstream NMI's message (or podid's where upstream has
//! none), and is what goes into the body. Two body styles exist:
//! * [`ErrorBodyStyle::ImdsJson`] (podid's default, docs/compatibility.md): IMDS-style
//!   `{"error":"…","error_description":"<message>"}` + `\n`, `application/json; charset=utf-8`,
//!   same status codes as upstream. Upstream's plain text crashes msal-py and `az`.
//! * [`ErrorBodyStyle::GoPlainText`]: upstream's bytes exactly — Go's `http.Error`, i.e.
//!   `<message>\n`, `text/plain; charset=utf-8`, `X-Content-Type-Options: nosniff`.
//!
//! The Metadata-header error is the same JSON in both styles (upstream already mirrors IMDS).
//! Messages never contain tokens or secrets: variants carry names, addresses and redacted client
//! ids only, and the `detail` strings of the token variants must be built by the caller from
//! upstream error text that holds no credential.

use std::net::IpAddr;

use http::header::{CONNECTION, RETRY_AFTER};
use http::{HeaderName, HeaderValue, StatusCode};
use serde::Serialize;

use crate::gojson;
use crate::query::redact_client_id;
use crate::response::{CONTENT_TYPE_JSON_UTF8, CONTENT_TYPE_TEXT_UTF8, WireResponse};

/// Seconds upstream puts in `Retry-After` with `--set-retry-after-header`
/// (docs/upstream.md#token-endpoint step 6).
pub const RETRY_AFTER_SECONDS: u32 = 20;

/// How error bodies are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ErrorBodyStyle {
    /// IMDS-style JSON bodies carrying upstream's message (podid default, docs/compatibility.md).
    #[default]
    ImdsJson,
    /// Upstream NMI's bytes: Go `http.Error` plain text (wire-compatibility mode).
    GoPlainText,
}

/// Options that change how an [`ImdsError`] is answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorOptions {
    /// Body style.
    pub style: ErrorBodyStyle,
    /// `--set-retry-after-header`: identity-selection errors become **503** with
    /// `Retry-After: 20` instead of 404. Upstream applies it on the token path only; pass `false`
    /// when answering `/host/token`.
    pub set_retry_after_header: bool,
    /// Upstream's status for final refusals: 404 (or 503 + `Retry-After` with
    /// `set_retry_after_header`) also where nothing can change the answer soon. Off (podid's
    /// default), a final refusal ([`ImdsError::is_final_refusal`]) is the real IMDS's answer for
    /// an identity the VM does not have, 400 `invalid_request`, which every Azure SDK treats as
    /// final at once instead of retrying a 404 for 20–100 s.
    pub not_found_for_final_refusals: bool,
}

/// An error answer of the NMI port. Each variant documents its status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImdsError {
    /// 400: `Metadata: true` missing or wrong (token path and every proxied path).
    #[error("Required metadata header not specified")]
    MissingMetadataHeader,
    /// 400: `resource` query parameter absent or empty.
    #[error("parameter resource cannot be empty")]
    EmptyResource,
    /// 400: a path that looks like the token path but is malformed
    /// (docs/upstream.md#routing rule 2).
    #[error("Invalid request")]
    InvalidTokenPath,
    /// 400 (podid): the path is the token path in another letter case
    /// ([`Route::TokenPathCase`](crate::Route::TokenPathCase)). Upstream proxied it to IMDS.
    #[error(
        "Invalid request: the token path is case-sensitive; use /metadata/identity/oauth2/token"
    )]
    TokenPathCase,
    /// 400: the request target has a bad `%` escape in its path. Go's HTTP server answers this
    /// itself (plain `400 Bad Request`, connection closed) before any handler runs.
    #[error("malformed request target: invalid percent-encoding in the path")]
    MalformedRequestTarget,
    /// 400: `/host/token` without both `podns` and `podname` headers.
    #[error("missing 'podname' and 'podns' from request header")]
    MissingPodHeaders,
    /// 400 (podid): selectors of more than one kind in one request.
    #[error(
        "only one of client_id, msi_res_id (or mi_res_id) and object_id (or principal_id) may be given"
    )]
    ConflictingIdentitySelectors,
    /// 400 (podid): a value of an honoured query parameter is not UTF-8 after decoding.
    #[error("parameter {parameter} is not valid UTF-8")]
    InvalidParameterEncoding {
        /// The query parameter's name.
        parameter: &'static str,
    },
    /// 400 (podid): the request selects the identity by a parameter podid cannot match
    /// (e.g. `object_id`, which AzureIdentity does not record). Upstream ignored it and returned
    /// the pod's first identity.
    #[error(
        "parameter {parameter} is not supported for selecting an identity; use client_id or msi_res_id"
    )]
    UnsupportedIdentitySelector {
        /// The query parameter's name.
        parameter: &'static str,
    },
    /// 400 (podid): a Workload Identity pod (served with `--serve-workload-identity-pods`)
    /// selected its identity by resource or object id; its service account names a client id
    /// only, so the selector cannot be checked and is refused rather than ignored.
    #[error(
        "parameter {parameter} cannot select the identity of a Workload Identity pod: its service account names the identity by client id only; send client_id or no selector"
    )]
    WorkloadIdentitySelector {
        /// The query parameter's name.
        parameter: &'static str,
    },
    /// 403: `/{metadata}/instance…` with `--block-instance-metadata`.
    #[error("Request blocked by AAD Pod Identity NMI")]
    InstanceMetadataBlocked,
    /// 400 `invalid_request` (a final refusal; upstream: 404, or 503 + `Retry-After` with
    /// `--set-retry-after-header`): the pod has identities but none matches the requested one.
    #[error("no azure identity found for request clientID {client_id}")]
    IdentityNotFound {
        /// The requested client id, already redacted; empty when the caller selected by
        /// resource id. Build with [`ImdsError::identity_not_found`].
        client_id: String,
    },
    /// 400 `invalid_request` (a final refusal; upstream: 404, or 503 + `Retry-After`): no
    /// identity is bound to the calling pod at all.
    #[error("no azure identity is bound to pod {namespace}/{pod}")]
    NoIdentityForPod {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        pod: String,
    },
    /// 404, or 503 + `Retry-After`: an identity is bound but its assignment to this node has
    /// not completed in the time NMI waited.
    #[error(
        "identity assignment for pod {namespace}/{pod} is still in progress. Check MIC pod logs for identity assignment errors"
    )]
    AssignmentPending {
        /// Pod namespace.
        namespace: String,
        /// Pod name.
        pod: String,
    },
    /// 403: the token endpoint (IMDS or Entra) refused the request, or any error on the
    /// exception path. `detail` is upstream-style text such as
    /// `failed to get service principal token, error: …`; it must hold no credential.
    #[error("{detail}")]
    TokenRefused {
        /// Message for the body.
        detail: String,
    },
    /// 503: a token could not be obtained for another reason (network, secret read, …).
    /// `detail` must hold no credential.
    #[error("{detail}")]
    TokenUnavailable {
        /// Message for the body.
        detail: String,
    },
    /// 500: the peer address has no usable IPv4/IPv6 address.
    #[error("request remote address is empty")]
    RemoteAddressEmpty,
    /// 500: `/host/token` called from an address other than `127.0.0.1`.
    #[error("request remote address is not from a host")]
    NotFromHost,
    /// 500: no Pending/Running pod on this node has the caller's IP.
    #[error("pod list is empty")]
    NoPodForAddress {
        /// The caller's address (not part of the body, kept for logs).
        ip: IpAddr,
    },
    /// 500: several pods share the caller's IP; podid fails closed.
    #[error("failed to match pod IP {ip} with {count} pods")]
    AmbiguousPodAddress {
        /// The caller's address.
        ip: IpAddr,
        /// How many pods claim it.
        count: usize,
    },
    /// 500: anything else (e.g. the passthrough proxy could not reach IMDS). `detail` must hold
    /// no credential.
    #[error("{detail}")]
    Internal {
        /// Message for the body.
        detail: String,
    },
}

impl ImdsError {
    /// [`ImdsError::IdentityNotFound`] for a requested client id (redacted like upstream's
    /// `RedactClientID`), or for a request without one.
    pub fn identity_not_found(client_id: Option<&str>) -> Self {
        Self::IdentityNotFound {
            client_id: client_id
                .map(|id| redact_client_id(id).into_owned())
                .unwrap_or_default(),
        }
    }

    /// Whether nothing can change this answer soon: no binding gives the pod any identity, or
    /// the requested identity is not among the pod's. Waiting cannot help, so the answer is
    /// final (400) unless [`ErrorOptions::not_found_for_final_refusals`] asks for upstream's 404.
    pub fn is_final_refusal(&self) -> bool {
        matches!(
            self,
            Self::IdentityNotFound { .. } | Self::NoIdentityForPod { .. }
        )
    }

    /// Whether `--set-retry-after-header` turns this error into 503 + `Retry-After` (with the
    /// options, final refusals only when they keep upstream's status).
    fn retries_after(&self, options: ErrorOptions) -> bool {
        options.set_retry_after_header
            && self.is_identity_selection_error()
            && (options.not_found_for_final_refusals || !self.is_final_refusal())
    }

    /// Whether `--set-retry-after-header` turns this error into 503 + `Retry-After` under
    /// upstream's rules (final refusals included).
    pub fn is_identity_selection_error(&self) -> bool {
        matches!(
            self,
            Self::IdentityNotFound { .. }
                | Self::NoIdentityForPod { .. }
                | Self::AssignmentPending { .. }
        )
    }

    /// The status code this error is answered with.
    pub fn status(&self, options: ErrorOptions) -> StatusCode {
        match self {
            Self::MissingMetadataHeader
            | Self::EmptyResource
            | Self::InvalidTokenPath
            | Self::TokenPathCase
            | Self::MalformedRequestTarget
            | Self::MissingPodHeaders
            | Self::ConflictingIdentitySelectors
            | Self::InvalidParameterEncoding { .. }
            | Self::UnsupportedIdentitySelector { .. }
            | Self::WorkloadIdentitySelector { .. } => StatusCode::BAD_REQUEST,
            Self::InstanceMetadataBlocked | Self::TokenRefused { .. } => StatusCode::FORBIDDEN,
            Self::IdentityNotFound { .. } | Self::NoIdentityForPod { .. }
                if !options.not_found_for_final_refusals =>
            {
                StatusCode::BAD_REQUEST
            }
            Self::IdentityNotFound { .. }
            | Self::NoIdentityForPod { .. }
            | Self::AssignmentPending { .. } => {
                if options.set_retry_after_header {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::NOT_FOUND
                }
            }
            Self::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::RemoteAddressEmpty
            | Self::NotFromHost
            | Self::NoPodForAddress { .. }
            | Self::AmbiguousPodAddress { .. }
            | Self::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error` field of the IMDS-style JSON body (OAuth 2.0 error codes).
    pub fn error_code(&self) -> &'static str {
        match self {
            Self::MissingMetadataHeader
            | Self::EmptyResource
            | Self::InvalidTokenPath
            | Self::TokenPathCase
            | Self::MalformedRequestTarget
            | Self::MissingPodHeaders
            | Self::ConflictingIdentitySelectors
            | Self::InvalidParameterEncoding { .. }
            | Self::UnsupportedIdentitySelector { .. }
            | Self::WorkloadIdentitySelector { .. }
            | Self::IdentityNotFound { .. }
            | Self::NoIdentityForPod { .. } => "invalid_request",
            Self::InstanceMetadataBlocked | Self::TokenRefused { .. } => "access_denied",
            Self::AssignmentPending { .. } | Self::TokenUnavailable { .. } => {
                "temporarily_unavailable"
            }
            Self::RemoteAddressEmpty
            | Self::NotFromHost
            | Self::NoPodForAddress { .. }
            | Self::AmbiguousPodAddress { .. }
            | Self::Internal { .. } => "server_error",
        }
    }

    /// The body bytes for the given style.
    pub fn body(&self, options: ErrorOptions) -> Vec<u8> {
        self.body_and_type(options).0
    }

    fn body_and_type(&self, options: ErrorOptions) -> (Vec<u8>, &'static str) {
        let message = self.to_string();
        let json = matches!(self, Self::MissingMetadataHeader)
            || options.style == ErrorBodyStyle::ImdsJson;
        if json {
            #[derive(Serialize)]
            struct Body<'a> {
                error: &'a str,
                error_description: &'a str,
            }
            let mut body = Vec::with_capacity(message.len() + 48);
            gojson::write(
                &mut body,
                &Body {
                    error: self.error_code(),
                    error_description: &message,
                },
            );
            body.push(b'\n');
            (body, CONTENT_TYPE_JSON_UTF8)
        } else if matches!(self, Self::MalformedRequestTarget) {
            // Go's server writes this itself: status text, no newline.
            (b"400 Bad Request".to_vec(), CONTENT_TYPE_TEXT_UTF8)
        } else {
            let mut body = message.into_bytes();
            body.push(b'\n');
            (body, CONTENT_TYPE_TEXT_UTF8)
        }
    }

    /// The complete response: status, headers (`Content-Type`, `Content-Length`, and as upstream
    /// `X-Content-Type-Options: nosniff` for plain text, `Retry-After: 20` for identity-selection
    /// errors answered 503 with `--set-retry-after-header`, `Connection: close` for a malformed request
    /// target in plain-text style), body.
    pub fn response(&self, options: ErrorOptions) -> WireResponse {
        let (body, content_type) = self.body_and_type(options);
        let plain = content_type == CONTENT_TYPE_TEXT_UTF8;
        let mut response = WireResponse::new(self.status(options), Some(content_type), body);
        if plain && !matches!(self, Self::MalformedRequestTarget) {
            response.headers.insert(
                HeaderName::from_static("x-content-type-options"),
                HeaderValue::from_static("nosniff"),
            );
        }
        if plain && matches!(self, Self::MalformedRequestTarget) {
            response
                .headers
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        if self.retries_after(options) {
            response
                .headers
                .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }

    /// [`ImdsError::response`] split into `(status, headers, body)`.
    pub fn into_parts(self, options: ErrorOptions) -> (StatusCode, http::HeaderMap, Vec<u8>) {
        self.response(options).into_parts()
    }
}
