//! Request header rules: the `Metadata: true` requirement (docs/upstream.md#token-endpoint step 1,
//! docs/upstream.md#passthrough) and the `/host/token` pod headers
//! (docs/upstream.md#response-bodies, `/host/token`).

use http::HeaderMap;

use crate::error::ImdsError;

/// Name of the header every IMDS request must carry (matched case-insensitively, as Go's
/// canonical header lookup and the `http` crate both do).
pub const METADATA_HEADER: &str = "metadata";

/// Check the Metadata header rule: the **first** `Metadata` header (name in any case) must be
/// exactly `true` (value case-sensitive: `True` and `TRUE` fail, as upstream and real IMDS).
/// Applies to token requests and to every proxied path when `--metadata-header-required` is on;
/// `/host/token` is exempt.
///
/// # Errors
/// [`ImdsError::MissingMetadataHeader`] when the header is absent or has another value.
pub fn check_metadata_header(headers: &HeaderMap) -> Result<(), ImdsError> {
    match headers.get(METADATA_HEADER) {
        Some(value) if value.as_bytes() == b"true" => Ok(()),
        _ => Err(ImdsError::MissingMetadataHeader),
    }
}

/// The pod a `/host/token` caller speaks for, from its `podns` and `podname` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodRef<'a> {
    /// Value of the `podns` header.
    pub namespace: &'a str,
    /// Value of the `podname` header.
    pub name: &'a str,
}

/// Read the `podns` and `podname` headers of a `/host/token` request (first value of each).
///
/// # Errors
/// [`ImdsError::MissingPodHeaders`] when either is absent or empty. A value that is not valid
/// UTF-8 cannot name a pod and is treated as absent.
pub fn pod_headers(headers: &HeaderMap) -> Result<PodRef<'_>, ImdsError> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    };
    match (get("podns"), get("podname")) {
        (Some(namespace), Some(name)) => Ok(PodRef { namespace, name }),
        _ => Err(ImdsError::MissingPodHeaders),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_bytes(value).unwrap());
        }
        map
    }

    #[test]
    fn metadata_true_passes_in_any_name_case() {
        for name in ["Metadata", "metadata", "METADATA", "mEtAdAtA"] {
            let map = headers(&[(name, b"true")]);
            assert_eq!(check_metadata_header(&map), Ok(()), "{name}");
        }
    }

    #[test]
    fn metadata_value_is_case_sensitive_and_exact() {
        for value in [
            &b"True"[..],
            b"TRUE",
            b"false",
            b"",
            b"1",
            b"yes",
            b"true ",
            b" true",
            b"\"true\"",
            b"tru\xffe",
        ] {
            let map = headers(&[("Metadata", value)]);
            assert_eq!(
                check_metadata_header(&map),
                Err(ImdsError::MissingMetadataHeader),
                "{value:?}"
            );
        }
        assert_eq!(
            check_metadata_header(&HeaderMap::new()),
            Err(ImdsError::MissingMetadataHeader)
        );
    }

    #[test]
    fn only_the_first_metadata_header_counts() {
        assert_eq!(
            check_metadata_header(&headers(&[("Metadata", b"true"), ("Metadata", b"no")])),
            Ok(())
        );
        assert_eq!(
            check_metadata_header(&headers(&[("Metadata", b"no"), ("Metadata", b"true")])),
            Err(ImdsError::MissingMetadataHeader)
        );
    }

    #[test]
    fn pod_headers_need_both() {
        let map = headers(&[("podns", b"default"), ("PodName", b"web-0")]);
        assert_eq!(
            pod_headers(&map),
            Ok(PodRef {
                namespace: "default",
                name: "web-0"
            })
        );
        for pairs in [
            &[("podns", &b"default"[..])][..],
            &[("podname", b"web-0")],
            &[("podns", b""), ("podname", b"web-0")],
            &[("podns", b"default"), ("podname", b"")],
            &[("podns", b"\xff"), ("podname", b"web-0")],
            &[],
        ] {
            assert_eq!(
                pod_headers(&headers(pairs)),
                Err(ImdsError::MissingPodHeaders),
                "{pairs:?}"
            );
        }
    }
}
