//! A real kubectl against the fake API server: what works against a real cluster works here
//! without `--validate=false`, and what a real cluster refuses is refused.

use std::path::{Path, PathBuf};

use podid_e2e::{kube, kubectl};
use serde_json::{Value, json};

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

async fn run(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Out {
    use tokio::io::AsyncWriteExt as _;
    let mut cmd = tokio::process::Command::new(kubectl().expect("kubectl installed"));
    cmd.env("KUBECONFIG", kubeconfig)
        .env("HOME", kubeconfig.parent().expect("dir"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("kubectl runs");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).await.expect("stdin");
    }
    drop(input);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("kubectl finishes within a minute")
        .expect("kubectl output");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ok(kubeconfig: &Path, args: &[&str]) -> String {
    let o = run(kubeconfig, args, None).await;
    assert!(o.ok, "kubectl {args:?} failed: {}{}", o.stdout, o.stderr);
    o.stdout
}

async fn fails(kubeconfig: &Path, args: &[&str]) -> String {
    let o = run(kubeconfig, args, None).await;
    assert!(!o.ok, "kubectl {args:?} should fail: {}", o.stdout);
    o.stderr
}

struct Fake {
    api: kube::FakeApiServer,
    dir: PathBuf,
    admin: PathBuf,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn fake(name: &str) -> Fake {
    // kubectl sends its credentials only over TLS.
    let api = kube::FakeApiServer::builder()
        .tls(true)
        .start()
        .await
        .expect("fake API server starts");
    let dir = std::env::temp_dir().join(format!(
        "podid-e2e-kubectl-{name}-{}-{}",
        std::process::id(),
        api.addr().port()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let admin = dir.join("admin");
    api.write_kubeconfig(&admin).expect("kubeconfig");
    Fake { api, dir, admin }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_creates_applies_explains_and_dry_runs_without_validate_false() {
    let f = fake("crud").await;
    let kc = f.admin.as_path();
    // Protobuf bodies (create namespace/secret/serviceaccount/token) are understood.
    ok(kc, &["create", "namespace", "app"]).await;
    ok(kc, &["get", "serviceaccount", "default", "-n", "app"]).await;
    ok(
        kc,
        &[
            "create",
            "secret",
            "generic",
            "s1",
            "--from-literal=k=v",
            "-n",
            "app",
        ],
    )
    .await;
    ok(kc, &["create", "serviceaccount", "web", "-n", "app"]).await;
    let token = ok(kc, &["create", "token", "web", "-n", "app"]).await;
    assert_eq!(token.trim().split('.').count(), 3, "a JWT: {token}");

    // Plain apply (validation on) of a Secret with stringData: read back as data.
    let manifest = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: applied\n  namespace: app\nstringData:\n  password: hunter2\n";
    let o = run(kc, &["apply", "-f", "-"], Some(manifest)).await;
    assert!(o.ok, "apply: {}{}", o.stdout, o.stderr);
    let s: Value = serde_json::from_str(
        &ok(kc, &["get", "secret", "applied", "-n", "app", "-o", "json"]).await,
    )
    .expect("json");
    assert_eq!(s["data"], json!({"password": "aHVudGVyMg=="}));
    assert_eq!(s.get("stringData"), None);

    // explain reads the served OpenAPI, built-in and custom kinds alike.
    let e = ok(kc, &["explain", "secret.data"]).await;
    assert!(
        e.contains("KIND:       Secret") && e.contains("map[string]string"),
        "{e}"
    );
    let e = ok(kc, &["explain", "azureidentity.spec"]).await;
    assert!(e.contains("KIND:       AzureIdentity"), "{e}");

    // --dry-run=server leaves nothing behind and takes nothing away.
    let rv = f.api.resource_version();
    ok(
        kc,
        &[
            "delete",
            "secret",
            "applied",
            "-n",
            "app",
            "--dry-run=server",
        ],
    )
    .await;
    ok(kc, &["create", "namespace", "ghost", "--dry-run=server"]).await;
    ok(
        kc,
        &[
            "create",
            "secret",
            "generic",
            "ghost",
            "--from-literal=a=b",
            "-n",
            "app",
            "--dry-run=server",
        ],
    )
    .await;
    assert_eq!(f.api.resource_version(), rv, "a dry run wrote");
    assert!(
        f.api
            .get_json("/api/v1/namespaces/app/secrets/applied")
            .is_ok()
    );
    assert_eq!(
        f.api
            .get_json("/api/v1/namespaces/ghost")
            .expect_err("not created")
            .code,
        404
    );

    // Objects in a namespace that does not exist are refused.
    let err = fails(
        kc,
        &[
            "create",
            "secret",
            "generic",
            "x",
            "--from-literal=a=b",
            "-n",
            "nowhere",
        ],
    )
    .await;
    assert!(err.contains("namespaces \"nowhere\" not found"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_as_a_service_account_gets_exactly_what_its_role_grants() {
    let f = fake("rbac").await;
    let kc = f.admin.as_path();
    ok(kc, &["create", "namespace", "app"]).await;
    ok(kc, &["create", "serviceaccount", "web", "-n", "app"]).await;
    for s in ["s1", "s2"] {
        ok(
            kc,
            &[
                "create",
                "secret",
                "generic",
                s,
                "--from-literal=k=v",
                "-n",
                "app",
            ],
        )
        .await;
    }
    ok(
        kc,
        &[
            "create",
            "role",
            "read-s1",
            "-n",
            "app",
            "--verb=get",
            "--resource=secrets",
            "--resource-name=s1",
        ],
    )
    .await;
    ok(
        kc,
        &[
            "create",
            "rolebinding",
            "web-read-s1",
            "-n",
            "app",
            "--role=read-s1",
            "--serviceaccount=app:web",
        ],
    )
    .await;
    assert_eq!(
        ok(kc, &["auth", "can-i", "delete", "nodes"]).await.trim(),
        "yes"
    );

    let sa = f.dir.join("web");
    f.api
        .write_service_account_kubeconfig("app", "web", &sa)
        .expect("service account kubeconfig");
    let sa = sa.as_path();
    let who = ok(sa, &["auth", "whoami"]).await;
    assert!(who.contains("system:serviceaccount:app:web"), "{who}");
    ok(sa, &["get", "secret", "s1", "-n", "app"]).await;
    let err = fails(sa, &["get", "secret", "s2", "-n", "app"]).await;
    assert!(
        err.contains("secrets \"s2\" is forbidden: User \"system:serviceaccount:app:web\" cannot get resource \"secrets\" in API group \"\" in the namespace \"app\""),
        "{err}"
    );
    fails(sa, &["get", "secrets", "-n", "app"]).await;
    fails(sa, &["get", "secret", "s1", "-n", "default"]).await;
    let o = run(
        sa,
        &["auth", "can-i", "get", "secret/s1", "-n", "app"],
        None,
    )
    .await;
    assert_eq!(o.stdout.trim(), "yes", "{}", o.stderr);
    let o = run(sa, &["auth", "can-i", "list", "secrets", "-n", "app"], None).await;
    assert_eq!(o.stdout.trim(), "no", "{}", o.stderr);
    let o = run(
        sa,
        &["auth", "can-i", "get", "secret/s1", "-n", "default"],
        None,
    )
    .await;
    assert_eq!(o.stdout.trim(), "no", "{}", o.stderr);
}
