//! RSA signing keys, JWKS documents and self-signed certificates shared by the test doubles
//! (the fake API server's ServiceAccount issuer, the simulated Entra, certificate credentials),
//! and a small certificate authority for TLS servers a test must be able to trust or not.
//!
//! Test-only. No IO, no async runtime.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rsa::pkcs1::EncodeRsaPrivateKey as _;
use rsa::pkcs8::EncodePrivateKey as _;
use rsa::traits::PublicKeyParts as _;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha1::Digest as _;

/// What can go wrong making or using keys.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("generating an RSA key")]
    Generate(#[source] rsa::Error),
    #[error("encoding an RSA key")]
    Encode(#[source] rsa::pkcs8::Error),
    #[error("encoding an RSA key as PKCS#1")]
    EncodePkcs1(#[source] rsa::pkcs1::Error),
    #[error("building a certificate")]
    Certificate(#[source] rcgen::Error),
    #[error("signing or verifying a JWT")]
    Jwt(#[source] jsonwebtoken::errors::Error),
}

/// Key size used everywhere: what Entra and Kubernetes use.
pub const RSA_BITS: usize = 2048;

/// An RS256 signing key with a stable key id.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    private: RsaPrivateKey,
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A fresh 2048-bit key. The key id is the RFC 7638 thumbprint of the public key.
    pub fn generate() -> Result<Self, Error> {
        let private =
            RsaPrivateKey::new(&mut rsa::rand_core::OsRng, RSA_BITS).map_err(Error::Generate)?;
        Self::from_private(private)
    }

    fn from_private(private: RsaPrivateKey) -> Result<Self, Error> {
        let der = private.to_pkcs1_der().map_err(Error::EncodePkcs1)?;
        let encoding = EncodingKey::from_rsa_der(der.as_bytes());
        let public = RsaPublicKey::from(&private);
        let n = URL_SAFE_NO_PAD.encode(public.n().to_bytes_be());
        let e = URL_SAFE_NO_PAD.encode(public.e().to_bytes_be());
        let decoding = DecodingKey::from_rsa_raw_components(
            &public.n().to_bytes_be(),
            &public.e().to_bytes_be(),
        );
        // RFC 7638: SHA-256 over the required members in lexicographic order.
        let thumb_input = format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#);
        let kid = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(thumb_input.as_bytes()));
        Ok(Self {
            kid,
            private,
            encoding,
            decoding,
        })
    }

    /// The key id put in JWT headers and in the JWK.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as a JWK (`kty`, `use`, `alg`, `kid`, `n`, `e`).
    pub fn jwk(&self) -> serde_json::Value {
        let public = RsaPublicKey::from(&self.private);
        serde_json::json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
        })
    }

    /// PKCS#8 PEM of the private key.
    pub fn private_pem(&self) -> Result<String, Error> {
        Ok(self
            .private
            .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
            .map_err(Error::Encode)?
            .to_string())
    }

    /// Signs `claims` with RS256, `kid` in the header, plus any extra header fields set by `edit`.
    pub fn sign_with<T: Serialize>(
        &self,
        claims: &T,
        edit: impl FnOnce(&mut Header),
    ) -> Result<String, Error> {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        edit(&mut header);
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(Error::Jwt)
    }

    /// Signs `claims` with RS256 and this key's `kid`.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, Error> {
        self.sign_with(claims, |_| {})
    }

    /// Verifies an RS256 signature made by this key and decodes the claims under `validation`.
    pub fn verify<T: DeserializeOwned>(
        &self,
        token: &str,
        validation: &Validation,
    ) -> Result<T, Error> {
        jsonwebtoken::decode::<T>(token, &self.decoding, validation)
            .map(|d| d.claims)
            .map_err(Error::Jwt)
    }

    /// The decoding (public) key, for callers that build their own validation.
    pub fn decoding_key(&self) -> &DecodingKey {
        &self.decoding
    }
}

/// A JWKS document (`{"keys":[…]}`) for the given keys.
pub fn jwks<'a>(keys: impl IntoIterator<Item = &'a SigningKey>) -> serde_json::Value {
    serde_json::json!({ "keys": keys.into_iter().map(SigningKey::jwk).collect::<Vec<_>>() })
}

/// A self-signed X.509 certificate over an RSA key, as used for service-principal certificate
/// credentials.
#[derive(Debug, Clone)]
pub struct Certificate {
    key: SigningKey,
    der: Vec<u8>,
    pem: String,
}

impl Certificate {
    /// A fresh key and a self-signed certificate for `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, Error> {
        let key = SigningKey::generate()?;
        let key_pair =
            rcgen::KeyPair::from_pem_and_sign_algo(&key.private_pem()?, &rcgen::PKCS_RSA_SHA256)
                .map_err(Error::Certificate)?;
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(Error::Certificate)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let cert = params.self_signed(&key_pair).map_err(Error::Certificate)?;
        Ok(Self {
            key,
            der: cert.der().to_vec(),
            pem: cert.pem(),
        })
    }

    /// The certificate's key.
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// DER bytes of the certificate.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// PEM text of the certificate.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// `x5t`: base64url SHA-1 thumbprint of the DER certificate (what Entra matches).
    pub fn x5t(&self) -> String {
        URL_SAFE_NO_PAD.encode(sha1::Sha1::digest(&self.der))
    }

    /// `x5t#S256`: base64url SHA-256 thumbprint of the DER certificate.
    pub fn x5t_s256(&self) -> String {
        URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(&self.der))
    }

    /// `x5c` entry: standard base64 of the DER certificate.
    pub fn x5c(&self) -> String {
        STANDARD.encode(&self.der)
    }
}

/// A certificate authority for TLS tests: a self-signed CA certificate (ECDSA P-256) that
/// issues server certificates. A client trusts the servers only once the CA is among its roots.
pub struct TlsAuthority {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    der: Vec<u8>,
    pem: String,
}

impl std::fmt::Debug for TlsAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsAuthority").finish_non_exhaustive()
    }
}

/// A server certificate issued by a [`TlsAuthority`], with its private key.
pub struct ServerCertificate {
    /// DER bytes of the certificate.
    pub der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_pkcs8: Vec<u8>,
}

impl std::fmt::Debug for ServerCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCertificate").finish_non_exhaustive()
    }
}

impl TlsAuthority {
    /// A fresh CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<Self, Error> {
        let key = rcgen::KeyPair::generate().map_err(Error::Certificate)?;
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(Error::Certificate)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(Error::Certificate)?;
        Ok(Self {
            der: cert.der().to_vec(),
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// DER bytes of the CA certificate.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// PEM text of the CA certificate (what goes into a trust store).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn issue_server(&self, names: &[String]) -> Result<ServerCertificate, Error> {
        let key = rcgen::KeyPair::generate().map_err(Error::Certificate)?;
        let mut params =
            rcgen::CertificateParams::new(names.to_vec()).map_err(Error::Certificate)?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(Error::Certificate)?;
        Ok(ServerCertificate {
            der: cert.der().to_vec(),
            key_pkcs8: key.serialize_der(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Claims {
        sub: String,
        aud: String,
        exp: u64,
    }

    fn far_future() -> u64 {
        4_000_000_000
    }

    #[test]
    fn signed_token_verifies_with_same_key_and_not_with_another() {
        let key = SigningKey::generate().expect("key");
        let other = SigningKey::generate().expect("key");
        let claims = Claims {
            sub: "s".into(),
            aud: "a".into(),
            exp: far_future(),
        };
        let token = key.sign(&claims).expect("sign");
        let mut v = Validation::new(Algorithm::RS256);
        v.set_audience(&["a"]);
        assert_eq!(key.verify::<Claims>(&token, &v).expect("verify"), claims);
        assert!(other.verify::<Claims>(&token, &v).is_err());
        let header = jsonwebtoken::decode_header(&token).expect("header");
        assert_eq!(header.kid.as_deref(), Some(key.kid()));
        assert_ne!(key.kid(), other.kid());
    }

    #[test]
    fn jwk_round_trips_into_a_decoding_key() {
        let key = SigningKey::generate().expect("key");
        let doc = jwks([&key]);
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(doc).expect("jwks parses");
        let jwk = set.find(key.kid()).expect("kid present");
        let dk = DecodingKey::from_jwk(jwk).expect("decoding key");
        let claims = Claims {
            sub: "s".into(),
            aud: "a".into(),
            exp: far_future(),
        };
        let token = key.sign(&claims).expect("sign");
        let mut v = Validation::new(Algorithm::RS256);
        v.set_audience(&["a"]);
        assert!(jsonwebtoken::decode::<Claims>(&token, &dk, &v).is_ok());
    }

    #[test]
    fn certificate_thumbprint_is_sha1_of_der() {
        let cert = Certificate::generate("podid-test").expect("cert");
        assert!(cert.pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let decoded = URL_SAFE_NO_PAD.decode(cert.x5t()).expect("b64");
        assert_eq!(decoded.len(), 20);
        assert_eq!(decoded, sha1::Sha1::digest(cert.der()).to_vec());
        assert_eq!(STANDARD.decode(cert.x5c()).expect("b64"), cert.der());
    }
}
