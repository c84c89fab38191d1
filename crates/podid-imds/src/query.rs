//! Token request query parsing (docs/upstream.md#token-endpoint, docs/compatibility.md).
//!
//! Pairs are split and decoded exactly like Go's `url.ParseQuery` as upstream NMI used it:
//! split on `&`; a pair containing `;` is dropped; empty pairs are dropped; key and value are
//! split at the first `=`; `%XX` and `+` are decoded in key and value; a pair whose key or value
//! has a bad `%` escape is dropped; for a repeated key the first surviving value wins; an empty
//! value counts as absent. Decoding both escaped and unescaped values covers Python's unescaped
//! `resource`/`msi_res_id` as well as the other SDKs' escaped ones.
//!
//! Where podid deliberately differs (listed in docs/compatibility.md):
//! * `object_id` / `principal_id` are recognised as a selector instead of being ignored, so the
//!   caller can refuse them rather than hand out some other identity;
//! * giving selectors of more than one kind (`client_id`, `msi_res_id`/`mi_res_id`,
//!   `object_id`/`principal_id`) is a 400, since no single identity can be chosen;
//! * a value of an honoured parameter that is not UTF-8 after decoding is a 400 (upstream would
//!   forward the raw bytes to IMDS).

use std::borrow::Cow;

use crate::error::ImdsError;
use crate::gourl::{self, Mode};

/// Which identity the caller asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySelector<'a> {
    /// No selector: the pod's only (or default) identity.
    None,
    /// `client_id`: the identity's Entra client (application) id. Compare case-insensitively.
    ClientId(Cow<'a, str>),
    /// `msi_res_id`, or `mi_res_id` when `msi_res_id` is absent or empty: the ARM resource id of a
    /// user-assigned identity. Compare case-insensitively.
    ResourceId(Cow<'a, str>),
    /// `object_id`, or `principal_id` when `object_id` is absent or empty: the identity's
    /// service principal object id. Upstream ignores it; podid surfaces it so NMI never returns a
    /// different identity than the one asked for.
    ObjectId(Cow<'a, str>),
}

impl IdentitySelector<'_> {
    /// Query parameter name the selector came from, for messages (`"client_id"`, …).
    pub fn parameter(&self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::ClientId(_) => Some("client_id"),
            Self::ResourceId(_) => Some("msi_res_id"),
            Self::ObjectId(_) => Some("object_id"),
        }
    }
}

/// A parsed token request query (`/metadata/identity/oauth2/token?…` or `/host/token?…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenQuery<'a> {
    /// `resource`: the audience the token is for, e.g. `https://vault.azure.net`. Never empty.
    pub resource: Cow<'a, str>,
    /// The identity the caller selected, if any.
    pub selector: IdentitySelector<'a>,
    /// `api-version` as sent (upstream never validates it; any value is accepted). `None` when
    /// absent, empty or not UTF-8.
    pub api_version: Option<Cow<'a, str>>,
}

/// Parameters the parser looks at, in slot order.
const KEYS: [&str; 7] = [
    "resource",
    "client_id",
    "msi_res_id",
    "mi_res_id",
    "object_id",
    "principal_id",
    "api-version",
];

/// Parse a raw query string (without the leading `?`). Borrows from `query` unless a value had
/// to be decoded.
///
/// # Errors
/// * [`ImdsError::EmptyResource`] when `resource` is absent or empty (upstream 400);
/// * [`ImdsError::InvalidParameterEncoding`] when an honoured value is not UTF-8;
/// * [`ImdsError::ConflictingIdentitySelectors`] when selectors of different kinds are given.
pub fn parse_token_query(query: &str) -> Result<TokenQuery<'_>, ImdsError> {
    let mut slots: [Option<Cow<'_, [u8]>>; KEYS.len()] = Default::default();
    for pair in query.as_bytes().split(|&b| b == b'&') {
        if pair.is_empty() || pair.contains(&b';') {
            continue;
        }
        let (raw_key, raw_value) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        let Ok(key) = gourl::unescape(raw_key, Mode::QueryComponent) else {
            continue;
        };
        let Some(slot) = KEYS.iter().position(|k| k.as_bytes() == &*key) else {
            continue;
        };
        let Ok(value) = gourl::unescape(raw_value, Mode::QueryComponent) else {
            continue;
        };
        if slots[slot].is_none() {
            slots[slot] = Some(value);
        }
    }
    let [
        resource,
        client_id,
        msi_res_id,
        mi_res_id,
        object_id,
        principal_id,
        api_version,
    ] = slots;

    let resource = non_empty_utf8("resource", resource)?.ok_or(ImdsError::EmptyResource)?;
    let client_id = non_empty_utf8("client_id", client_id)?;
    let resource_id = match non_empty_utf8("msi_res_id", msi_res_id)? {
        Some(id) => Some(id),
        None => non_empty_utf8("mi_res_id", mi_res_id)?,
    };
    let object_id = match non_empty_utf8("object_id", object_id)? {
        Some(id) => Some(id),
        None => non_empty_utf8("principal_id", principal_id)?,
    };
    let api_version = non_empty_utf8("api-version", api_version).ok().flatten();

    let selector = match (client_id, resource_id, object_id) {
        (None, None, None) => IdentitySelector::None,
        (Some(id), None, None) => IdentitySelector::ClientId(id),
        (None, Some(id), None) => IdentitySelector::ResourceId(id),
        (None, None, Some(id)) => IdentitySelector::ObjectId(id),
        _ => return Err(ImdsError::ConflictingIdentitySelectors),
    };
    Ok(TokenQuery {
        resource,
        selector,
        api_version,
    })
}

/// Empty → `None`; non-UTF-8 → error naming the parameter (never the value).
fn non_empty_utf8<'a>(
    parameter: &'static str,
    value: Option<Cow<'a, [u8]>>,
) -> Result<Option<Cow<'a, str>>, ImdsError> {
    let Some(value) = value else { return Ok(None) };
    if value.is_empty() {
        return Ok(None);
    }
    let text = match value {
        Cow::Borrowed(bytes) => std::str::from_utf8(bytes).map(Cow::Borrowed).ok(),
        Cow::Owned(bytes) => String::from_utf8(bytes).map(Cow::Owned).ok(),
    };
    text.map(Some)
        .ok_or(ImdsError::InvalidParameterEncoding { parameter })
}

/// Upstream's `RedactClientID` (docs/upstream.md#identity-selection): a value of at least eight
/// characters whose first four and last four characters are not ASCII whitespace (Go's `\S`) is
/// shown as its first four characters, `##### REDACTED #####` and its last four; anything else
/// unchanged.
pub fn redact_client_id(client_id: &str) -> Cow<'_, str> {
    let is_space = |c: char| matches!(c, '\t' | '\n' | '\x0c' | '\r' | ' ');
    let chars = client_id.chars().count();
    if chars < 8 {
        return Cow::Borrowed(client_id);
    }
    let head_ok = client_id.chars().take(4).all(|c| !is_space(c));
    let tail_ok = client_id.chars().skip(chars - 4).all(|c| !is_space(c));
    if !(head_ok && tail_ok) {
        return Cow::Borrowed(client_id);
    }
    let head: String = client_id.chars().take(4).collect();
    let tail: String = client_id.chars().skip(chars - 4).collect();
    Cow::Owned(format!("{head}##### REDACTED #####{tail}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ok(query: &str) -> TokenQuery<'_> {
        parse_token_query(query).unwrap()
    }

    fn client(id: &str) -> IdentitySelector<'_> {
        IdentitySelector::ClientId(Cow::Borrowed(id))
    }

    #[test]
    fn resource_only() {
        let q = ok("resource=https://vault.azure.net&api-version=2018-02-01");
        assert_eq!(q.resource, "https://vault.azure.net");
        assert_eq!(q.selector, IdentitySelector::None);
        assert_eq!(q.api_version.as_deref(), Some("2018-02-01"));
        assert!(
            matches!(q.resource, Cow::Borrowed(_)),
            "unescaped values are borrowed"
        );
    }

    #[test]
    fn escaped_and_unescaped_values_decode_the_same() {
        let escaped = ok(
            "resource=https%3A%2F%2Fvault.azure.net%2F&msi_res_id=%2Fsubscriptions%2Fs%2FresourceGroups%2Frg",
        );
        let raw =
            ok("resource=https://vault.azure.net/&msi_res_id=/subscriptions/s/resourceGroups/rg");
        assert_eq!(escaped, raw);
        assert_eq!(
            raw.selector,
            IdentitySelector::ResourceId(Cow::Borrowed("/subscriptions/s/resourceGroups/rg"))
        );
    }

    #[test]
    fn plus_is_space_and_keys_are_decoded() {
        let q = ok("resourc%65=a+b&client%5Fid=c");
        assert_eq!(q.resource, "a b");
        assert_eq!(q.selector, client("c"));
    }

    #[test]
    fn first_value_wins_and_empty_first_value_means_absent() {
        assert_eq!(ok("resource=a&resource=b").resource, "a");
        assert_eq!(
            parse_token_query("resource=&resource=b"),
            Err(ImdsError::EmptyResource)
        );
        assert_eq!(
            ok("resource=r&client_id=&client_id=x").selector,
            IdentitySelector::None
        );
    }

    #[test]
    fn missing_or_empty_resource() {
        for q in [
            "",
            "resource",
            "resource=",
            "client_id=x",
            "Resource=x",
            "resource=%zz",
            "&&&",
        ] {
            assert_eq!(parse_token_query(q), Err(ImdsError::EmptyResource), "{q:?}");
        }
    }

    #[test]
    fn bad_escapes_drop_only_their_pair() {
        let q = ok("resource=%zz&resource=ok&client_id=%4&client_id=cid");
        assert_eq!(q.resource, "ok");
        assert_eq!(q.selector, client("cid"));
        // A bad escape in the key drops the pair too.
        assert_eq!(
            ok("resource=r&client%ZZid=x").selector,
            IdentitySelector::None
        );
    }

    #[test]
    fn semicolon_pairs_are_dropped_like_go() {
        assert_eq!(
            parse_token_query("resource=a;b"),
            Err(ImdsError::EmptyResource)
        );
        assert_eq!(ok("resource=a;x=y&resource=c").resource, "c");
        assert_eq!(ok("resource=r&x;=1&client_id=c").selector, client("c"));
    }

    #[test]
    fn msi_res_id_takes_precedence_over_mi_res_id() {
        let q = ok("resource=r&mi_res_id=mi&msi_res_id=msi");
        assert_eq!(
            q.selector,
            IdentitySelector::ResourceId(Cow::Borrowed("msi"))
        );
        let q = ok("resource=r&msi_res_id=&mi_res_id=mi");
        assert_eq!(
            q.selector,
            IdentitySelector::ResourceId(Cow::Borrowed("mi"))
        );
    }

    #[test]
    fn object_and_principal_id_are_surfaced() {
        let q = ok("resource=r&object_id=o");
        assert_eq!(q.selector, IdentitySelector::ObjectId(Cow::Borrowed("o")));
        assert_eq!(q.selector.parameter(), Some("object_id"));
        let q = ok("resource=r&principal_id=p");
        assert_eq!(q.selector, IdentitySelector::ObjectId(Cow::Borrowed("p")));
        let q = ok("resource=r&object_id=o&principal_id=p");
        assert_eq!(q.selector, IdentitySelector::ObjectId(Cow::Borrowed("o")));
    }

    #[test]
    fn selectors_of_different_kinds_conflict() {
        for q in [
            "resource=r&client_id=c&msi_res_id=m",
            "resource=r&client_id=c&object_id=o",
            "resource=r&mi_res_id=m&principal_id=p",
        ] {
            assert_eq!(
                parse_token_query(q),
                Err(ImdsError::ConflictingIdentitySelectors),
                "{q:?}"
            );
        }
    }

    #[test]
    fn resource_is_checked_before_selectors() {
        assert_eq!(
            parse_token_query("client_id=c&msi_res_id=m"),
            Err(ImdsError::EmptyResource)
        );
    }

    #[test]
    fn non_utf8_values() {
        assert_eq!(
            parse_token_query("resource=%FF"),
            Err(ImdsError::InvalidParameterEncoding {
                parameter: "resource"
            })
        );
        assert_eq!(
            parse_token_query("resource=r&client_id=%C3%28"),
            Err(ImdsError::InvalidParameterEncoding {
                parameter: "client_id"
            })
        );
        // Ignored parameters may hold anything.
        let q = ok("resource=r&api-version=%FF&bypass_cache=%FE");
        assert_eq!(q.api_version, None);
        // A non-UTF-8 key is just an unknown key.
        assert_eq!(ok("resource=r&%FF=1").selector, IdentitySelector::None);
        // Decoded multi-byte UTF-8 is fine.
        assert_eq!(ok("resource=%C3%A9").resource, "é");
    }

    #[test]
    fn unknown_parameters_are_ignored() {
        let q = ok("bypass_cache=true&resource=r&foo=bar&=x&client_id=c");
        assert_eq!(q.selector, client("c"));
    }

    #[test]
    fn redaction_like_upstream() {
        assert_eq!(
            redact_client_id("77788899-f67e-42e1-9a78-89985f6bff3e"),
            "7778##### REDACTED #####ff3e"
        );
        assert_eq!(redact_client_id("12345678"), "1234##### REDACTED #####5678");
        assert_eq!(redact_client_id("1234567"), "1234567");
        assert_eq!(redact_client_id(""), "");
        assert_eq!(redact_client_id(" 2345678"), " 2345678");
        assert_eq!(redact_client_id("1234567 "), "1234567 ");
        assert_eq!(
            redact_client_id("1234 \n 5678"),
            "1234##### REDACTED #####5678"
        );
        assert_eq!(
            redact_client_id("ééééxxxxéééé"),
            "éééé##### REDACTED #####éééé"
        );
    }
}
