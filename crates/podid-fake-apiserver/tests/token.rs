//! ServiceAccount TokenRequest and the OIDC issuer documents.

mod common;

use common::{pod, setup, status};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk::JwkSet};
use k8s_openapi::api::core::v1::{Node, Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

async fn sa_and_pod(client: &kube::Client) -> (ServiceAccount, Pod) {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "app");
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "web"}})).expect("sa");
    let sa = sas
        .create(&PostParams::default(), &sa)
        .await
        .expect("create sa");
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1"}})).expect("node");
    nodes
        .create(&PostParams::default(), &node)
        .await
        .expect("create node");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "app");
    let p = pods
        .create(&PostParams::default(), &pod("web-1", &[], Some("n1")))
        .await
        .expect("create pod");
    (sa, p)
}

fn request(audiences: &[&str], seconds: Option<i64>, pod: Option<(&str, &str)>) -> Value {
    let mut spec = json!({"audiences": audiences});
    if let Some(s) = seconds {
        spec["expirationSeconds"] = json!(s);
    }
    if let Some((name, uid)) = pod {
        spec["boundObjectRef"] =
            json!({"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid});
    }
    serde_json::from_value(
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}),
    )
    .expect("tr")
}

#[tokio::test]
async fn token_request_jwt_verifies_against_the_served_jwks() {
    let (server, client) = setup().await;
    let (sa, p) = sa_and_pod(&client).await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "app");
    let pod_uid = p.metadata.uid.clone().expect("uid");
    let tr: Value = sas
        .create_subresource(
            "token",
            "web",
            &PostParams::default(),
            &request(
                &["api://AzureADTokenExchange"],
                Some(3600),
                Some(("web-1", &pod_uid)),
            ),
        )
        .await
        .expect("token request");
    assert_eq!(tr["kind"], "TokenRequest");
    let token = tr["status"]["token"].as_str().expect("token").to_string();
    let expiry = tr["status"]["expirationTimestamp"]
        .as_str()
        .expect("expiry");
    assert!(expiry.ends_with('Z') && expiry.len() == 20, "{expiry}");

    // Discover the issuer the way a relying party (the simulated Entra) does.
    let http = reqwest::Client::new();
    let conf: Value = http
        .get(format!("{}/.well-known/openid-configuration", server.url()))
        .send()
        .await
        .expect("conf")
        .json()
        .await
        .expect("json");
    assert_eq!(conf["issuer"], server.issuer());
    assert_eq!(
        conf["id_token_signing_alg_values_supported"],
        json!(["RS256"])
    );
    assert_eq!(conf["response_types_supported"], json!(["id_token"]));
    assert_eq!(conf["subject_types_supported"], json!(["public"]));
    let jwks: JwkSet = http
        .get(conf["jwks_uri"].as_str().expect("jwks_uri"))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");

    let header = jsonwebtoken::decode_header(&token).expect("header");
    assert_eq!(header.alg, Algorithm::RS256);
    let jwk = jwks
        .find(header.kid.as_deref().expect("kid"))
        .expect("kid in jwks");
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&["api://AzureADTokenExchange"]);
    v.set_issuer(&[server.issuer()]);
    let claims =
        jsonwebtoken::decode::<Value>(&token, &DecodingKey::from_jwk(jwk).expect("key"), &v)
            .expect("verifies")
            .claims;
    assert_eq!(claims["sub"], "system:serviceaccount:app:web");
    assert_eq!(claims["aud"], json!(["api://AzureADTokenExchange"]));
    let (iat, nbf, exp) = (
        claims["iat"].as_i64().expect("iat"),
        claims["nbf"].as_i64().expect("nbf"),
        claims["exp"].as_i64().expect("exp"),
    );
    assert!((iat - unix_now()).abs() < 60, "iat is now");
    assert_eq!((exp - iat, nbf), (3600, iat));
    let k = &claims["kubernetes.io"];
    assert_eq!(k["namespace"], "app");
    assert_eq!(
        k["serviceaccount"],
        json!({"name": "web", "uid": sa.metadata.uid.expect("sa uid")})
    );
    assert_eq!(k["pod"], json!({"name": "web-1", "uid": pod_uid}));
    assert_eq!(k["node"]["name"], "n1");

    // A token from another key does not verify against this JWKS.
    let other = podid_test_keys::SigningKey::generate().expect("key");
    let forged = other.sign(&claims).expect("sign");
    assert!(
        jsonwebtoken::decode::<Value>(&forged, &DecodingKey::from_jwk(jwk).expect("key"), &v)
            .is_err()
    );
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after epoch")
        .as_secs() as i64
}

#[tokio::test]
async fn token_request_defaults_and_refusals() {
    let (server, client) = setup().await;
    let (_sa, _p) = sa_and_pod(&client).await;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "app");
    let pp = PostParams::default();

    // No audiences: the issuer; no expiration: one hour.
    let tr: Value = sas
        .create_subresource("token", "web", &pp, &request(&[], None, None))
        .await
        .expect("defaults");
    assert_eq!(tr["spec"]["expirationSeconds"], 3600);
    let claims =
        server
            .signing_key()
            .verify::<Value>(tr["status"]["token"].as_str().expect("token"), &{
                let mut v = Validation::new(Algorithm::RS256);
                v.set_audience(&[server.issuer()]);
                v
            });
    assert!(
        claims.expect("aud is the issuer")["kubernetes.io"]
            .get("pod")
            .is_none()
    );

    let missing = status(
        sas.create_subresource::<_, Value>("token", "nobody", &pp, &request(&["a"], None, None))
            .await
            .expect_err("no sa"),
    );
    assert_eq!(
        (missing.code, missing.message.as_str()),
        (404, "serviceaccounts \"nobody\" not found")
    );

    let short = status(
        sas.create_subresource::<_, Value>("token", "web", &pp, &request(&["a"], Some(60), None))
            .await
            .expect_err("short"),
    );
    assert_eq!((short.code, short.reason.as_str()), (422, "Invalid"));

    let gone = status(
        sas.create_subresource::<_, Value>(
            "token",
            "web",
            &pp,
            &request(&["a"], None, Some(("ghost", ""))),
        )
        .await
        .expect_err("no pod"),
    );
    assert_eq!(gone.code, 404);

    let stale = status(
        sas.create_subresource::<_, Value>(
            "token",
            "web",
            &pp,
            &request(&["a"], None, Some(("web-1", "not-the-uid"))),
        )
        .await
        .expect_err("uid mismatch"),
    );
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));
}
