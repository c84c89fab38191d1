//! Token success bodies (docs/upstream.md#response-bodies; docs/compatibility.md).
//!
//! The token endpoint answers with string-valued JSON in upstream's key order: `access_token,
//! refresh_token, expires_in, expires_on, not_before, resource, token_type`, and — podid's default,
//! docs/compatibility.md — the two keys real IMDS adds and upstream dropped, `client_id` and
//! `ext_expires_in`, after them (only when a client id is given, so a body without it is
//! byte-identical to upstream's). `expires_in` is always derived from `expires_on` and the injected
//! `now`; the crate never reads the clock.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;
use serde::ser::{Serialize, SerializeStruct, Serializer};

use crate::gojson;
use crate::response::{CONTENT_TYPE_JSON, WireResponse};

/// An access token, checked once for what writing it as a JSON string needs. A token made only
/// of printable ASCII that neither JSON nor Go escapes (every JWT) is copied into each answer
/// as it is; any other is escaped on every write, as [`TokenResponse::new`] does. Token
/// sources' tokens are kept in this form so the per-request body costs one copy, not a scan
/// of a ~1.4 KB string. `Debug` never shows the token.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    text: String,
    plain: bool,
}

impl AccessToken {
    /// Check `text` once.
    pub fn new(text: impl Into<String>) -> Self {
        let text = text.into();
        let plain = is_plain(&text);
        Self { text, plain }
    }

    /// The token. Never log or format it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// One token as NMI hands it out. Borrows everything; serialising is the only allocation.
/// `Debug` never shows the access token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenResponse<'a> {
    access_token: &'a str,
    /// `access_token` needs no escaping (checked by [`AccessToken::new`]).
    access_token_plain: bool,
    resource: &'a str,
    token_type: &'a str,
    expires_on: u64,
    expires_in: u64,
    not_before: Option<u64>,
    client_id: Option<&'a str>,
}

/// Seconds since the Unix epoch of `now` (0 for times before it).
pub fn unix_seconds(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl<'a> TokenResponse<'a> {
    /// A `Bearer` token for `resource` that expires at `expires_on` (Unix seconds), answered at
    /// `now`: `expires_in = max(expires_on - now, 0)`.
    pub fn new(access_token: &'a str, resource: &'a str, expires_on: u64, now: SystemTime) -> Self {
        Self {
            access_token,
            access_token_plain: false,
            resource,
            token_type: "Bearer",
            expires_on,
            expires_in: expires_on.saturating_sub(unix_seconds(now)),
            not_before: None,
            client_id: None,
        }
    }

    /// [`TokenResponse::new`] for a checked [`AccessToken`], whose body is written without
    /// scanning the token again.
    pub fn from_access_token(
        access_token: &'a AccessToken,
        resource: &'a str,
        expires_on: u64,
        now: SystemTime,
    ) -> Self {
        Self {
            access_token_plain: access_token.plain,
            ..Self::new(&access_token.text, resource, expires_on, now)
        }
    }

    /// Set `not_before` (Unix seconds). Without it the field is `""`, as upstream writes when
    /// the token source gave none.
    #[must_use]
    pub fn with_not_before(mut self, not_before: u64) -> Self {
        self.not_before = Some(not_before);
        self
    }

    /// Set `token_type` (default `Bearer`).
    #[must_use]
    pub fn with_token_type(mut self, token_type: &'a str) -> Self {
        self.token_type = token_type;
        self
    }

    /// Add real IMDS's `client_id` (the identity's client id) and `ext_expires_in` (equal to
    /// `expires_in`: podid grants no extended lifetime) keys after upstream's seven.
    #[must_use]
    pub fn with_client_id(mut self, client_id: &'a str) -> Self {
        self.client_id = Some(client_id);
        self
    }

    /// Seconds until expiry at the `now` given to [`TokenResponse::new`].
    pub fn expires_in(&self) -> u64 {
        self.expires_in
    }

    /// The JSON body, byte-identical to Go's `json.Marshal` of the same fields (and to this
    /// type's `Serialize`, which arrays of tokens use). Written directly, not through serde:
    /// it is the body of every cache hit.
    pub fn to_json(&self) -> Vec<u8> {
        const OPEN: &[u8] = b"{\"access_token\":";
        const REFRESH_EXPIRES_IN: &[u8] = b",\"refresh_token\":\"\",\"expires_in\":\"";
        const EXPIRES_ON: &[u8] = b"\",\"expires_on\":\"";
        const NOT_BEFORE: &[u8] = b"\",\"not_before\":\"";
        const RESOURCE: &[u8] = b"\",\"resource\":";
        const TOKEN_TYPE: &[u8] = b",\"token_type\":";
        const CLIENT_ID: &[u8] = b",\"client_id\":";
        const EXT_EXPIRES_IN: &[u8] = b",\"ext_expires_in\":\"";
        // A checked token (`AccessToken`) is not scanned again.
        let token_plain = self.access_token_plain || is_plain(self.access_token);
        let resource_plain = is_plain(self.resource);
        let token_type_plain = is_plain(self.token_type);
        let client_id_plain = self.client_id.is_none_or(is_plain);
        // The exact length when nothing needs escaping (the rule): a body whose capacity is
        // its length becomes the response's bytes without another allocation. Escaping only
        // grows the strings, which costs a reallocation.
        let quoted = |text: &str| text.len() + 2;
        let mut len = OPEN.len()
            + quoted(self.access_token)
            + REFRESH_EXPIRES_IN.len()
            + digit_count(self.expires_in)
            + EXPIRES_ON.len()
            + digit_count(self.expires_on)
            + NOT_BEFORE.len()
            + self.not_before.map_or(0, digit_count)
            + RESOURCE.len()
            + quoted(self.resource)
            + TOKEN_TYPE.len()
            + quoted(self.token_type)
            + 1;
        if let Some(client_id) = self.client_id {
            len += CLIENT_ID.len()
                + quoted(client_id)
                + EXT_EXPIRES_IN.len()
                + digit_count(self.expires_in)
                + 1;
        }
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(OPEN);
        push_str(&mut out, self.access_token, token_plain);
        out.extend_from_slice(REFRESH_EXPIRES_IN);
        push_digits(&mut out, self.expires_in);
        out.extend_from_slice(EXPIRES_ON);
        push_digits(&mut out, self.expires_on);
        out.extend_from_slice(NOT_BEFORE);
        if let Some(not_before) = self.not_before {
            push_digits(&mut out, not_before);
        }
        out.extend_from_slice(RESOURCE);
        push_str(&mut out, self.resource, resource_plain);
        out.extend_from_slice(TOKEN_TYPE);
        push_str(&mut out, self.token_type, token_type_plain);
        if let Some(client_id) = self.client_id {
            out.extend_from_slice(CLIENT_ID);
            push_str(&mut out, client_id, client_id_plain);
            out.extend_from_slice(EXT_EXPIRES_IN);
            push_digits(&mut out, self.expires_in);
            out.push(b'"');
        }
        out.push(b'}');
        debug_assert!(
            !(token_plain && resource_plain && token_type_plain && client_id_plain)
                || out.len() == len,
            "the computed body length is exact"
        );
        out
    }

    /// The **200** response: `Content-Type: application/json`, `Content-Length`, JSON body.
    pub fn response(&self) -> WireResponse {
        WireResponse::new(StatusCode::OK, Some(CONTENT_TYPE_JSON), self.to_json())
    }

    fn serialize_fields<S: Serializer>(
        &self,
        serializer: S,
        numbers: bool,
    ) -> Result<S::Ok, S::Error> {
        let extra = if self.client_id.is_some() { 2 } else { 0 };
        let mut s = serializer.serialize_struct("Token", 7 + extra)?;
        s.serialize_field("access_token", self.access_token)?;
        s.serialize_field("refresh_token", "")?;
        if numbers {
            // adal.Token's json.Number fields: bare numbers, "" encodes as 0.
            s.serialize_field("expires_in", &self.expires_in)?;
            s.serialize_field("expires_on", &self.expires_on)?;
            s.serialize_field("not_before", &self.not_before.unwrap_or(0))?;
        } else {
            s.serialize_field("expires_in", &Digits(Some(self.expires_in)))?;
            s.serialize_field("expires_on", &Digits(Some(self.expires_on)))?;
            s.serialize_field("not_before", &Digits(self.not_before))?;
        }
        s.serialize_field("resource", self.resource)?;
        s.serialize_field("token_type", self.token_type)?;
        if let Some(client_id) = self.client_id {
            s.serialize_field("client_id", client_id)?;
            if numbers {
                s.serialize_field("ext_expires_in", &self.expires_in)?;
            } else {
                s.serialize_field("ext_expires_in", &Digits(Some(self.expires_in)))?;
            }
        }
        s.end()
    }
}

impl Serialize for TokenResponse<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.serialize_fields(serializer, false)
    }
}

impl fmt::Debug for TokenResponse<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"<redacted>")
            .field("resource", &self.resource)
            .field("token_type", &self.token_type)
            .field("expires_on", &self.expires_on)
            .field("expires_in", &self.expires_in)
            .field("not_before", &self.not_before)
            .field("client_id", &self.client_id)
            .finish()
    }
}

/// Whether `text` is written into a JSON string unchanged by Go's encoder: printable ASCII
/// without `"`, `\\`, `<`, `>` or `&`.
fn is_plain(text: &str) -> bool {
    text.bytes()
        .all(|b| matches!(b, 0x20..=0x7e) && !matches!(b, b'"' | b'\\' | b'<' | b'>' | b'&'))
}

/// Append `text` as a JSON string: copied between quotes when `plain` (the caller checked
/// [`is_plain`]), else escaped like Go.
fn push_str(out: &mut Vec<u8>, text: &str, plain: bool) {
    if plain {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        gojson::write(out, text);
    }
}

/// How many decimal digits `n` has.
fn digit_count(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |log| log as usize + 1)
}

/// Append `n`'s decimal digits.
fn push_digits(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b"0123456789"[usize::try_from(n % 10).unwrap_or_default()];
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// A number written as a JSON string of digits; `None` as `""`.
struct Digits(Option<u64>);

impl Serialize for Digits {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(n) => serializer.collect_str(&n),
            None => serializer.serialize_str(""),
        }
    }
}

/// The **200** body for a service principal with auxiliary tenants: a JSON **array** of token
/// objects, primary tenant first (docs/upstream.md#response-bodies; IMDS-compatible SDKs cannot
/// parse it, but it is what upstream sends). A single token is answered as a plain object, like
/// upstream.
pub fn token_list_response(tokens: &[TokenResponse<'_>]) -> WireResponse {
    let body = match tokens {
        [single] => single.to_json(),
        many => {
            let mut out = Vec::new();
            gojson::write(&mut out, many);
            out
        }
    };
    WireResponse::new(StatusCode::OK, Some(CONTENT_TYPE_JSON), body)
}

/// The `/host/token` body `{"token":{…},"clientid":"…"}` (docs/upstream.md#response-bodies).
/// Upstream marshals adal's `Token` here, whose `expires_in`, `expires_on` and `not_before` are
/// `json.Number`: bare JSON numbers, unlike the token endpoint's strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostTokenResponse<'a> {
    /// The token (its `client_id` extension, if set, is written too).
    pub token: TokenResponse<'a>,
    /// The identity's client id.
    pub client_id: &'a str,
}

impl HostTokenResponse<'_> {
    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.token.access_token.len() + 256);
        gojson::write(&mut out, self);
        out
    }

    /// The **200** response: `Content-Type: application/json`, `Content-Length`, JSON body.
    pub fn response(&self) -> WireResponse {
        WireResponse::new(StatusCode::OK, Some(CONTENT_TYPE_JSON), self.to_json())
    }
}

impl Serialize for HostTokenResponse<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct AdalToken<'b>(&'b TokenResponse<'b>);
        impl Serialize for AdalToken<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                self.0.serialize_fields(serializer, true)
            }
        }
        let mut s = serializer.serialize_struct("NMIResponse", 2)?;
        s.serialize_field("token", &AdalToken(&self.token))?;
        s.serialize_field("clientid", self.client_id)?;
        s.end()
    }
}

/// Parse an `expires_on` as token sources send it, the way adal normalises it
/// (docs/upstream.md#response-bodies): a JSON number or numeric string of Unix seconds, or an
/// App-Service-style date `M/D/YYYY H:MM:SS [AM|PM] +00:00` (UTC). Returns Unix seconds, `None` if
/// unparsable.
pub fn parse_expires_on(value: &str) -> Option<u64> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(seconds);
    }
    parse_app_service_date(value)
}

/// `1/2/2006 15:04:05 PM +00:00` or `1/2/2006 15:04:05 +00:00` (Go layouts used by adal). Go's
/// parser takes the hour as 24-hour `15` and then only checks that `PM`/`AM` is present, so the
/// marker does not shift the hour; the same here.
fn parse_app_service_date(value: &str) -> Option<u64> {
    let mut parts = value.split(' ');
    let date = parts.next()?;
    let time = parts.next()?;
    let mut zone = parts.next()?;
    if matches!(zone, "AM" | "PM") {
        zone = parts.next()?;
    }
    if parts.next().is_some() || zone != "+00:00" {
        return None;
    }
    let mut d = date.split('/');
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    let year: i64 = d.next()?.parse().ok()?;
    let mut t = time.split(':');
    let hour: u64 = t.next()?.parse().ok()?;
    let minute: u64 = t.next()?.parse().ok()?;
    let second: u64 = t.next()?.parse().ok()?;
    if d.next().is_some() || t.next().is_some() || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    let days = days_from_civil(year, month, day)?;
    let days = u64::try_from(days).ok()?;
    Some(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> Option<i64> {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    let max_day = *month_days.get(usize::try_from(month.checked_sub(1)?).ok()?)?;
    if day == 0 || day > max_day || !(1..=9999).contains(&year) {
        return None;
    }
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn expires_in_is_derived_from_expires_on_and_now() {
        let t = TokenResponse::new("tok", "r", 1_690_000_000, at(1_689_913_601));
        assert_eq!(t.expires_in(), 86_399);
        let expired = TokenResponse::new("tok", "r", 1_000, at(2_000));
        assert_eq!(expired.expires_in(), 0);
        let before_epoch = TokenResponse::new("tok", "r", 5, UNIX_EPOCH - Duration::from_secs(10));
        assert_eq!(before_epoch.expires_in(), 5);
    }

    #[test]
    fn debug_never_shows_the_token() {
        let t = TokenResponse::new("eyJ.secret.sig", "r", 1, at(0));
        let shown = format!(
            "{t:?} {:?}",
            HostTokenResponse {
                token: t,
                client_id: "c"
            }
        );
        assert!(!shown.contains("secret"), "{shown}");
    }

    /// The body every cache hit gets is written by hand; it must stay byte-identical to the
    /// serde encoding (Go's `json.Marshal` order and escaping, covered by the golden tests).
    #[test]
    fn direct_body_matches_the_serde_encoding() {
        let tokens = [
            "eyJ0eXAi.eyJhdWQi.c2ln-_",
            "",
            "a<b>&\"q\"\\\n\u{2028}é\u{7f}",
            "x y~",
        ];
        let mut checked = 0;
        for text in tokens {
            let checked_token = AccessToken::new(text);
            for resource in ["https://vault.azure.net", "r&<\u{2029}>"] {
                for token_type in ["Bearer", "po\"p"] {
                    for not_before in [None, Some(0), Some(u64::MAX)] {
                        for (expires_on, now) in
                            [(0, 5), (1_700_003_599, 1_700_000_000), (u64::MAX, 0)]
                        {
                            for client_id in [None, Some("0d1c2b3a"), Some("c<\"&")] {
                                let plain = TokenResponse::new(text, resource, expires_on, at(now));
                                let fast = TokenResponse::from_access_token(
                                    &checked_token,
                                    resource,
                                    expires_on,
                                    at(now),
                                );
                                for t in [plain, fast] {
                                    let mut t = t.with_token_type(token_type);
                                    if let Some(n) = not_before {
                                        t = t.with_not_before(n);
                                    }
                                    if let Some(c) = client_id {
                                        t = t.with_client_id(c);
                                    }
                                    let mut serde = Vec::new();
                                    gojson::write(&mut serde, &t);
                                    let body = t.to_json();
                                    // Nothing to escape: allocated at its exact length.
                                    let escapes =
                                        [Some(text), Some(resource), Some(token_type), client_id]
                                            .into_iter()
                                            .flatten()
                                            .any(|s| !is_plain(s));
                                    if !escapes {
                                        assert_eq!(body.capacity(), body.len());
                                    }
                                    assert_eq!(
                                        String::from_utf8(body).unwrap(),
                                        String::from_utf8(serde).unwrap()
                                    );
                                    checked += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 4 * 2 * 2 * 3 * 3 * 3 * 2);
    }

    #[test]
    fn only_tokens_nothing_escapes_are_copied_unchecked() {
        assert!(AccessToken::new("eyJ0eXAi.eyJhdWQi.c2ln-_~ =/+").plain);
        assert!(AccessToken::new("").plain);
        for special in [
            "\"", "\\", "<", ">", "&", "\n", "\u{1f}", "\u{7f}", "é", "\u{2028}",
        ] {
            let token = AccessToken::new(format!("eyJ{special}x"));
            assert!(!token.plain, "{special:?}");
            assert_eq!(token.as_str(), format!("eyJ{special}x"));
        }
        let shown = format!("{:?}", AccessToken::new("eyJ.secret.sig"));
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn single_token_list_is_an_object() {
        let t = TokenResponse::new("a", "r", 10, at(0));
        assert_eq!(token_list_response(&[t]).body, t.to_json());
        assert!(token_list_response(&[t, t]).body.starts_with(b"[{"));
    }

    #[test]
    fn expires_on_formats() {
        assert_eq!(parse_expires_on("1690000000"), Some(1_690_000_000));
        assert_eq!(parse_expires_on(" 42 "), Some(42));
        assert_eq!(
            parse_expires_on("1/2/2006 15:04:05 +00:00"),
            Some(1_136_214_245)
        );
        assert_eq!(
            parse_expires_on("1/2/2006 15:04:05 PM +00:00"),
            Some(1_136_214_245)
        );
        assert_eq!(
            parse_expires_on("2/29/2024 00:00:00 +00:00"),
            Some(1_709_164_800)
        );
        assert_eq!(parse_expires_on("12/31/1969 23:59:59 +00:00"), None);
        assert_eq!(parse_expires_on("2/29/2023 00:00:00 +00:00"), None);
        assert_eq!(parse_expires_on("1/2/2006 15:04:05 +01:00"), None);
        assert_eq!(parse_expires_on("1/2/2006 24:00:00 +00:00"), None);
        assert_eq!(parse_expires_on("-1"), None);
        assert_eq!(parse_expires_on(""), None);
        assert_eq!(parse_expires_on("soon"), None);
    }
}
