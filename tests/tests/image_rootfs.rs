//! The images' contents, for real. Each image's root filesystem is built from the Debian
//! packages its Dockerfile describes (base image plus the runtime stage's `apt-get install`,
//! `podid_e2e::image`), the just-built binary goes to its `ENTRYPOINT` path, and it runs inside
//! with `chroot` as the Dockerfile's `USER`, in a mount namespace of its own.
//!
//! * nmi starts (its libraries resolve); inside a simulated node it installs its chain with
//!   the image's own iptables and deletes conntrack entries with the image's own conntrack; its
//!   HTTPS client verifies the token endpoint against the image's CA bundle: an Entra whose
//!   certificate a test CA signed is refused, and after the CA is installed the Debian way
//!   (`update-ca-certificates`) a type 1 identity gets its token through it. The bundle holds
//!   the roots Entra's certificates chain to.
//! * mic starts as its non-root user with the libraries of a distroless cc image, whose bundle
//!   holds the same roots.
//! * Control: nmi in a root without iptables (mic's) stops at start-up, naming iptables, so
//!   the tools nmi finds are the image's, not the host's.
//!
//! Needs root and mmdebstrap (`make deps`). The root filesystems are built once into
//! `target/image-rootfs/` (keyed by package list) and copied per test.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use podid_api::{AzureIdentity, IdentityType};
use podid_e2e::cluster::{Cluster, LogFile, pod_get};
use podid_e2e::image::{Dockerfile, Provenance, RootfsCopy, RootfsSpec, cached_rootfs, contained};
use podid_e2e::{binary, netns};
use podid_test_keys::{ServerCertificate, TlsAuthority};
use serde_json::Value;

/// The subjects of the roots Entra's (login.microsoftonline.com) certificate chains lead to.
const ENTRA_ROOTS: [&str; 2] = [
    "C=US, O=DigiCert Inc, OU=www.digicert.com, CN=DigiCert Global Root G2",
    "C=US, O=Microsoft Corporation, CN=Microsoft RSA Root Certificate Authority 2017",
];

const TOKEN_PATH: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net";

/// The image's Dockerfile, its cached root filesystem and a fresh writable copy of it with the
/// binary installed at the `ENTRYPOINT`.
struct Image {
    dockerfile: Dockerfile,
    copy: RootfsCopy,
    entrypoint: String,
    user: String,
}

impl Image {
    fn build(image: &str) -> anyhow::Result<Self> {
        let dockerfile = Dockerfile::read(&format!("{image}.Dockerfile"))?;
        let spec = RootfsSpec::for_image(image, &dockerfile)?;
        let (cached, provenance) = cached_rootfs(&spec)?;
        match provenance {
            Provenance::Built(took) => eprintln!(
                "built the {image} root filesystem ({}) with mmdebstrap in {:.1} s",
                spec.packages.join(", "),
                took.as_secs_f64()
            ),
            Provenance::Cached => eprintln!(
                "the {image} root filesystem ({}) is cached at {}",
                spec.packages.join(", "),
                cached.display()
            ),
        }
        let copy = RootfsCopy::of(&cached, image)?;
        let entrypoint = dockerfile.entrypoint()?;
        copy.install(&binary(image)?, &entrypoint)?;
        let user = dockerfile.user().unwrap_or_else(|| "0:0".to_owned());
        Ok(Self {
            dockerfile,
            copy,
            entrypoint,
            user,
        })
    }

    fn root(&self) -> &Path {
        self.copy.root()
    }

    /// Runs the entrypoint with `args` inside the image as its user.
    fn run(&self, args: &[&str]) -> anyhow::Result<Output> {
        contained(Command::new, self.root(), &self.user, &[], &self.entrypoint)
            .args(args)
            .output()
            .with_context(|| format!("running {} in its image", self.entrypoint))
    }

    /// Runs `program` inside the image as root (what a Dockerfile's `RUN` would do).
    fn run_as_root(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        contained(Command::new, self.root(), "0:0", &[], program)
            .args(args)
            .output()
            .with_context(|| format!("running {program} in the image"))
    }
}

/// Fails with the process's output unless it succeeded.
fn succeeded(what: &str, output: &Output) -> anyhow::Result<String> {
    anyhow::ensure!(
        output.status.success(),
        "{what} failed ({}): stdout {:?} stderr {:?}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The subjects of every certificate in the image's system bundle.
fn bundle_subjects(root: &Path) -> anyhow::Result<Vec<String>> {
    let path = root.join("etc/ssl/certs/ca-certificates.crt");
    let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut subjects = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(&data) {
        let pem = pem.context("reading a PEM block of the bundle")?;
        let cert = pem
            .parse_x509()
            .map_err(|e| anyhow::anyhow!("parsing a certificate of the bundle: {e}"))?;
        subjects.push(cert.subject().to_string());
    }
    Ok(subjects)
}

fn assert_entra_roots(image: &str, root: &Path) -> anyhow::Result<()> {
    let subjects = bundle_subjects(root)?;
    assert!(
        subjects.len() > 100,
        "{image}: a full bundle, not {} certificates",
        subjects.len()
    );
    for expected in ENTRA_ROOTS {
        assert!(
            subjects.iter().any(|s| s == expected),
            "{image}: the bundle lacks {expected}"
        );
    }
    Ok(())
}

/// A TLS endpoint in front of the simulated Entra: terminates TLS with `cert` and relays the
/// bytes to `backend`. Counts completed and failed handshakes; stops when dropped.
struct TlsFront {
    addr: SocketAddr,
    completed: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsFront {
    async fn start(
        listen: SocketAddr,
        backend: SocketAddr,
        cert: &ServerCertificate,
    ) -> anyhow::Result<Self> {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der.clone())],
            PrivateKeyDer::Pkcs8(cert.key_pkcs8.clone().into()),
        )?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let completed = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let (ok, bad) = (Arc::clone(&completed), Arc::clone(&failed));
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let (ok, bad) = (Arc::clone(&ok), Arc::clone(&bad));
                tokio::spawn(async move {
                    match acceptor.accept(stream).await {
                        Ok(mut tls) => {
                            ok.fetch_add(1, Ordering::SeqCst);
                            if let Ok(mut upstream) = tokio::net::TcpStream::connect(backend).await
                            {
                                let _ =
                                    tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                            }
                        }
                        Err(_) => {
                            bad.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            completed,
            failed,
            task,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nmi_in_its_image_finds_its_tools_and_verifies_entra_against_the_image_roots()
-> anyhow::Result<()> {
    let image = Image::build("nmi")?;
    assert_eq!(
        image.dockerfile.user().as_deref(),
        Some("0:0"),
        "nmi runs as root (iptables)"
    );
    let version = succeeded("nmi --version in its image", &image.run(&["--version"])?)?;
    assert!(version.contains("NMI Version"), "{version}");
    assert_entra_roots("nmi", image.root())?;

    let mut cluster = Cluster::start().await?;
    let log = LogFile::for_test(&cluster, "image-nmi");
    cluster.child_log = Some(log.0.clone());

    // Entra over https, its certificate signed by a CA no image trusts.
    let ca = TlsAuthority::generate("podid image test CA")?;
    let host = cluster.node.host_ip();
    let server = ca.issue_server(&[host.to_string()])?;
    let backend = reqwest::Url::parse(&cluster.entra_url)?
        .socket_addrs(|| None)?
        .into_iter()
        .next()
        .context("the simulated Entra's address")?;
    let front = TlsFront::start(SocketAddr::from((host, 0)), backend, &server).await?;
    let authority = format!("https://{}/", front.addr);

    let sp = cluster.cloud.add_service_principal("image-sp");
    let secret = cluster.cloud.add_client_secret(&sp.client_id)?;
    cluster.create_secret("image-sp-secret", &[("clientSecret", secret.as_bytes())])?;
    let mut identity = AzureIdentity::service_principal(
        "default",
        "image-sp",
        IdentityType::ServicePrincipal,
        cluster.cloud.tenant_id(),
        &sp.client_id,
        "image-sp-secret",
    );
    identity.spec.ad_endpoint = Some(authority.clone());
    let pod = Arc::new(cluster.node.add_pod("app")?);
    cluster.add_pod("app-1", Some("image-sp"), pod.ip())?;
    cluster.bind(&identity, "image-sp", "app-1")?;

    let allowed = format!("--allowed-authorities={authority}");
    let flags = ["--enable-conntrack-deletion", allowed.as_str()];
    let user = image.user.clone();
    let entrypoint = image.entrypoint.clone();
    cluster.spawn_nmi_contained(image.root(), &user, &entrypoint, &flags)?;
    cluster.wait_ready().await?;

    // The image's iptables installed the interception in the node ...
    let chain = cluster.chain()?;
    assert_eq!(chain.len(), 3, "{chain:?}");
    assert!(chain[1].contains("DNAT"), "{chain:?}");
    // ... and the image's conntrack ran (nmi logs a warning instead when it finds none).
    let text = std::fs::read_to_string(&log.0)?;
    assert!(
        text.contains("deleted conntrack entries to the metadata address"),
        "{text}"
    );
    assert!(!text.contains("is not installed"), "{text}");

    // Without the test CA among the image's roots, nmi refuses Entra's certificate.
    let (status, body, _) = pod_get(&pod, TOKEN_PATH, true).await?;
    eprintln!("without the test CA among its roots nmi answered {status}: {body}");
    assert_ne!(status, 200, "{body}");
    assert!(
        body.contains("UnknownIssuer"),
        "refused for the certificate's unknown issuer: {body}"
    );
    assert!(
        front.failed.load(Ordering::SeqCst) > 0,
        "nmi reached the TLS endpoint and failed the handshake"
    );
    assert_eq!(front.completed.load(Ordering::SeqCst), 0);

    // Installed the Debian way, the CA is trusted by a restarted nmi and the token comes.
    if let Some(mut nmi) = cluster.nmi.take() {
        nmi.kill();
    }
    let anchors = image.copy.path("/usr/local/share/ca-certificates");
    std::fs::create_dir_all(&anchors)?;
    std::fs::write(anchors.join("podid-image-test.crt"), ca.pem())?;
    let added = succeeded(
        "update-ca-certificates in the image",
        &image.run_as_root("update-ca-certificates", &[])?,
    )?;
    assert!(added.contains("1 added"), "{added}");
    cluster.spawn_nmi_contained(image.root(), &user, &entrypoint, &flags)?;
    cluster.wait_ready().await?;
    let (status, body, _) = pod_get(&pod, TOKEN_PATH, true).await?;
    assert_eq!(status, 200, "{body}");
    let token: Value = serde_json::from_str(&body)?;
    assert!(
        token["access_token"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "a token"
    );
    assert_eq!(token["client_id"], sp.client_id.as_str());
    assert!(front.completed.load(Ordering::SeqCst) > 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mic_in_its_image_starts_as_its_non_root_user_with_the_entra_roots() -> anyhow::Result<()> {
    let image = Image::build("mic")?;
    assert_eq!(image.user, "65532:65532");
    let version = succeeded("mic --version in its image", &image.run(&["--version"])?)?;
    assert!(version.contains("MIC Version"), "{version}");
    let help = succeeded("mic --help in its image", &image.run(&["--help"])?)?;
    assert!(help.contains("--cloudconfig"), "{help}");
    assert_entra_roots("mic", image.root())?;
    assert!(
        !image.copy.path("/bin/sh").exists() && !image.copy.path("/usr/bin/sh").exists(),
        "a distroless image has no shell"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nmi_in_a_root_without_iptables_stops_at_start_up() -> anyhow::Result<()> {
    // mic's image has no iptables: nmi placed in it must not find the host's.
    let image = Image::build("mic")?;
    image.copy.install(&binary("nmi")?, "/usr/local/bin/nmi")?;
    let node = netns::SimNode::create()?;
    let output = contained(
        |program| node.command(program),
        image.root(),
        "0:0",
        &[],
        "/usr/local/bin/nmi",
    )
    .arg("--node=control")
    .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("finding the iptables command"), "{stderr}");
    let rules = node.iptables(&["-t", "nat", "-S"])?;
    assert!(!rules.contains("aad-metadata"), "{rules}");
    Ok(())
}
