//! `--serve-workload-identity-pods`: pods labelled `azure.workload.identity/use: "true"` that no
//! binding gives an identity are served through the real IMDS server with their service account's
//! client id by federated exchange; selectors are honoured, never ignored.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::*;
use k8s_openapi::api::core::v1::ServiceAccount;
use podid_api::{
    AssignedIdentityState, WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION, WORKLOAD_IDENTITY_USE_LABEL,
};

const WI_CLIENT: &str = "c0ffee00-0000-4000-8000-0000000000c1";

fn service_account(ns: &str, name: &str, client_id: Option<&str>) -> ServiceAccount {
    let mut sa = ServiceAccount::default();
    sa.metadata.namespace = Some(ns.into());
    sa.metadata.name = Some(name.into());
    if let Some(client_id) = client_id {
        sa.metadata.annotations = Some(
            [(
                WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION.to_owned(),
                client_id.to_owned(),
            )]
            .into(),
        );
    }
    sa
}

/// Pods on 127.0.0.1..: `app/web` (WI label, service account `web-sa`), `app/bare` on
/// 127.0.0.2 (WI label, service account `bare-sa` without annotation), `app/both` on 127.0.0.3
/// (WI label and `aadpodidbinding: kv`, bound to CLIENT_A), `app/plain` on 127.0.0.4 (no label).
async fn start_cluster(serve_wi: bool) -> Nmi {
    let mut objects = Objects::empty();
    objects.add_for_pod(
        podid_api::AzureIdentity::user_assigned("app", "id", &rid("id"), CLIENT_A),
        "both",
        AssignedIdentityState::Assigned,
    );
    let wi = (WORKLOAD_IDENTITY_USE_LABEL, "true");
    let mut bare = pod("app", "bare", "127.0.0.2", &[wi]);
    bare.spec.as_mut().unwrap().service_account_name = Some("bare-sa".into());
    let mut setup = Setup::new(&objects, &[wi]);
    setup.pods.push(bare);
    setup.pods.push(pod(
        "app",
        "both",
        "127.0.0.3",
        &[wi, ("aadpodidbinding", "kv")],
    ));
    setup.pods.push(pod("app", "plain", "127.0.0.4", &[]));
    if serve_wi {
        setup.service_accounts = Some(vec![
            service_account("app", "web-sa", Some(WI_CLIENT)),
            service_account("app", "bare-sa", None),
        ]);
    }
    start_setup(setup, |_| {}).await
}

fn from(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

#[tokio::test]
async fn a_workload_identity_pod_gets_its_service_accounts_identity_by_federation() {
    let nmi = start_cluster(true).await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.json()["access_token"],
        format!("token-for-{WI_CLIENT}")
    );
    assert_eq!(reply.json()["client_id"], WI_CLIENT);
    // The same client id asked for explicitly (upper case) is the same identity.
    let explicit = format!("{TOKEN_PATH}&client_id={}", WI_CLIENT.to_ascii_uppercase());
    assert_eq!(request(nmi.addr, &explicit, META).await.status, 200);
    let subject = "system:serviceaccount:app:web-sa".to_owned();
    assert_eq!(
        nmi.provider.asked(),
        vec![
            Asked::Workload {
                client_id: WI_CLIENT.into(),
                subject: subject.clone()
            },
            Asked::Workload {
                client_id: WI_CLIENT.into(),
                subject
            },
        ]
    );
}

#[tokio::test]
async fn selectors_are_honoured_never_ignored() {
    let nmi = start_cluster(true).await;
    let other = format!("{TOKEN_PATH}&client_id={CLIENT_B}");
    let reply = request(nmi.addr, &other, META).await;
    assert_eq!(reply.status, 400, "a final refusal: {}", reply.body);
    for selector in ["msi_res_id", "mi_res_id", "object_id"] {
        let target = format!("{TOKEN_PATH}&{selector}=%2Fsubscriptions%2Fs%2Fx");
        let reply = request(nmi.addr, &target, META).await;
        assert_eq!(reply.status, 400, "{selector}: {}", reply.body);
        assert_eq!(reply.json()["error"], "invalid_request");
        assert!(
            reply.json()["error_description"]
                .as_str()
                .unwrap()
                .contains("Workload Identity pod"),
            "{}",
            reply.body
        );
    }
    assert!(nmi.provider.asked().is_empty(), "no token was fetched");
}

#[tokio::test]
async fn a_service_account_without_client_id_gets_a_403_naming_the_annotation() {
    let nmi = start_cluster(true).await;
    let reply = request_from(from(2), nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 403, "{}", reply.body);
    let description = reply.json()["error_description"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        description.contains("app/bare-sa")
            && description.contains(WORKLOAD_IDENTITY_CLIENT_ID_ANNOTATION),
        "{description}"
    );
    assert!(nmi.provider.asked().is_empty());
}

#[tokio::test]
async fn a_binding_wins_over_the_workload_identity_label_and_unlabelled_pods_are_untouched() {
    let nmi = start_cluster(true).await;
    let reply = request_from(from(3), nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["client_id"], CLIENT_A);
    let reply = request_from(from(4), nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 400, "a final refusal: {}", reply.body);
    assert_eq!(nmi.provider.asked(), vec![Asked::Identity(CLIENT_A.into())]);
}

#[tokio::test]
async fn without_the_flag_a_workload_identity_pod_is_not_served() {
    let nmi = start_cluster(false).await;
    let reply = request(nmi.addr, TOKEN_PATH, META).await;
    assert_eq!(reply.status, 400, "a final refusal: {}", reply.body);
    assert!(nmi.provider.asked().is_empty());
}
