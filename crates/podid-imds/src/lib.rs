//! The IMDS wire protocol as NMI speaks it: request classification and parsing, the Metadata
//! header rule, token bodies and every error status and body. No IO, no async runtime, no clock:
//! this crate must not depend on tokio, hyper, sockets or the system time (time is a parameter).
//! Everything is a pure function on plain values, so the NMI binary calls it from its hyper
//! handler and the wire-compatibility tests and the fuzzer exercise it directly.
//!
//! docs/upstream.md describes upstream's behaviour; docs/compatibility.md lists where podid
//! deliberately differs.
//!
//! # The protocol, in handler order
//!
//! 1. **Routing** (docs/upstream.md#routing) — [`classify`]: the path is percent-decoded as Go's
//!    `net/url` does (a bad `%` escape is [`Route::MalformedRequestTarget`]), then cleaned as
//!    gorilla/mux does: a path that changes (`//`, `/./`, `..`, also when percent-encoded) is a
//!    **301** [`Route::Redirect`] to the cleaned path with the query kept. Clean paths are matched
//!    in upstream's order, on prefixes, for every HTTP method: `/{metadata}/identity/oauth2/token…`
//!    ([`Route::Token`], `metadata` in any case) → podid: the same prefix in any other letter case
//!    ([`Route::TokenPathCase`], **400**, never proxied: whether IMDS treats it as its token path
//!    is unknown) → the malformed-token-path regex ([`Route::InvalidTokenPath`], **400** `Invalid
//!    request`) → `/host/token…` ([`Route::HostToken`]) → `/{metadata}/instance…`
//!    ([`Route::InstanceMetadata`], **403** with `--block-instance-metadata`) → everything else
//!    ([`Route::Passthrough`] to IMDS). `/healthz` is not served on this port.
//! 2. **Metadata header** (docs/upstream.md#token-endpoint step 1, docs/upstream.md#passthrough) —
//!    [`check_metadata_header`]: the first `Metadata` header (name in any case) must be exactly
//!    `true`; else **400** with IMDS's JSON body. Applies to token and passthrough requests, not to
//!    `/host/token` (which needs [`pod_headers`], docs/upstream.md#response-bodies).
//! 3. **Query** (docs/upstream.md#token-endpoint, docs/compatibility.md) — [`parse_token_query`]:
//!    Go `url.ParseQuery` semantics (first value wins, empty = absent, bad escapes and `;` drop the
//!    pair); `resource` is required (**400** `parameter resource cannot be empty`); one
//!    [`IdentitySelector`] from `client_id`, `msi_res_id`/`mi_res_id`, or — podid —
//!    `object_id`/`principal_id`; `api-version` is accepted whatever its value.
//! 4. **Success** (docs/upstream.md#response-bodies, docs/compatibility.md) — [`TokenResponse`]:
//!    string-valued JSON in upstream's key order plus IMDS's `client_id`/`ext_expires_in`;
//!    `expires_in` derived from `expires_on` and an injected `now`. [`token_list_response`] for
//!    multi-tenant service principals (JSON array), [`HostTokenResponse`] for `/host/token`
//!    (numeric fields, as upstream's adal token).
//! 5. **Errors** (docs/upstream.md#status-codes) — [`ImdsError`]: every status and body the port
//!    can answer, produced only here. [`ErrorOptions`] selects IMDS-style JSON bodies (podid
//!    default, docs/compatibility.md) or upstream's Go plain text byte for byte, and
//!    `--set-retry-after-header` (503 + `Retry-After: 20` for identity-selection errors).
//!
//! All bodies come out as a [`WireResponse`] (status, headers with `Content-Type` and
//! `Content-Length`, body) whose `Debug` never prints the body.

mod error;
mod gojson;
mod gourl;
mod header;
mod query;
mod response;
mod route;
mod token;

pub use error::{ErrorBodyStyle, ErrorOptions, ImdsError, RETRY_AFTER_SECONDS};
pub use header::{METADATA_HEADER, PodRef, check_metadata_header, pod_headers};
pub use query::{IdentitySelector, TokenQuery, parse_token_query, redact_client_id};
pub use response::{
    CONTENT_TYPE_JSON, CONTENT_TYPE_JSON_UTF8, CONTENT_TYPE_TEXT_UTF8, WireResponse,
    redirect_response,
};
pub use route::{Route, classify, decoded_path, split_path_and_query};
pub use token::{
    AccessToken, HostTokenResponse, TokenResponse, parse_expires_on, token_list_response,
    unix_seconds,
};
