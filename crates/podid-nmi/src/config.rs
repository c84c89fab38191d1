//! `nmi` command line: every upstream flag of docs/configuration.md with its name and default, the
//! env twins, and podid's additions — validated into a typed [`Config`] before anything binds.
//!
//! Flags keep upstream's spelling, including the camel-case ones (`--forceNamespaced`,
//! `--MICNamespace`, `--enableProfile`, `--enableScaleFeatures`). Boolean flags accept Go's forms:
//! `--flag`, `--flag=true`, `--flag=false` (and `1`, `t`, `T`, `TRUE`, `True`, `0`, `f`, …).
//! klog's flags (`-v`, `--logtostderr`, `--log_dir`, …) are accepted so existing manifests keep
//! working; `-v` sets the log verbosity, the others are ignored (logs always go to stderr).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use podid_api::OperationMode;
use podid_imds::ErrorBodyStyle;

use crate::interception::Interception;
use podid_runtime::flags::{InvalidFlag, KlogFlags, invalid, parse_port};
pub use podid_runtime::logging::LogFormat;
pub use podid_runtime::version_line;

/// The raw command line, exactly as upstream spells it. Turn it into a [`Config`] with
/// [`Flags::into_config`].
#[derive(Debug, Clone, Parser)]
#[command(
    mut_args = podid_runtime::flags::go_bool,
    name = "nmi",
    disable_help_subcommand = true,
    about = "podid NMI: answers pods' IMDS token requests with their own identity",
    disable_version_flag = true
)]
pub struct Flags {
    /// Node name (manifests pass `--node=$(NODE_NAME)`); falls back to env `NODE_NAME`.
    #[arg(long, default_value = "")]
    pub node: String,
    /// Where nmi listens and what it intercepts.
    #[command(flatten)]
    pub interception: InterceptionFlags,
    /// Seconds between iptables reconcile passes.
    #[arg(long = "ipt-update-interval-sec", default_value_t = 60)]
    pub ipt_update_interval_sec: i64,
    /// Namespaced matching (also env `FORCENAMESPACED=true`).
    #[arg(long = "forceNamespaced")]
    pub force_namespaced: bool,
    /// Upstream skipped all checks for `^mic` ReplicaSets in this namespace; podid keeps the flag
    /// for compatibility and uses an explicit exception instead (docs/compatibility.md).
    #[arg(long = "MICNamespace", default_value = "default")]
    pub mic_namespace: String,
    /// Port of `/healthz` and `/readyz`.
    #[arg(long = "http-probe-port", default_value = "8080")]
    pub http_probe_port: String,
    /// Polls of a `Created` assignment before giving up (docs/upstream.md#identity-selection).
    #[arg(long = "retry-attempts-for-created", default_value_t = 16)]
    pub retry_attempts_for_created: i64,
    /// Polls of an `Assigned` assignment before giving up (docs/upstream.md#identity-selection).
    #[arg(long = "retry-attempts-for-assigned", default_value_t = 4)]
    pub retry_attempts_for_assigned: i64,
    /// Seconds between identity polls (docs/upstream.md#identity-selection).
    #[arg(long = "find-identity-retry-interval", default_value_t = 5)]
    pub find_identity_retry_interval: i64,
    /// Upstream's pprof server; podid has none and ignores it (logged).
    #[arg(long = "enableProfile")]
    pub enable_profile: bool,
    /// Watch only this node's AzureAssignedIdentities (label `nodename`).
    #[arg(long = "enableScaleFeatures", default_value = "true")]
    pub enable_scale_features: bool,
    /// Answer 403 to `/metadata/instance*`.
    #[arg(long = "block-instance-metadata")]
    pub block_instance_metadata: bool,
    /// Require `Metadata: true`.
    #[arg(long = "metadata-header-required", default_value = "true")]
    pub metadata_header_required: bool,
    /// Port of `/metrics`.
    #[arg(long = "prometheus-port", default_value = "9090")]
    pub prometheus_port: String,
    /// `standard` or `managed` (any case).
    #[arg(long = "operation-mode", default_value = "standard")]
    pub operation_mode: String,
    /// Skip the start-up refusal on kubenet nodes.
    #[arg(long = "allow-network-plugin-kubenet")]
    pub allow_network_plugin_kubenet: bool,
    /// File scanned for `--network-plugin=kubenet`.
    #[arg(long = "kubelet-config", default_value = "/etc/default/kubelet")]
    pub kubelet_config: PathBuf,
    /// Identity-selection failures that waiting can fix (an assignment in progress) answer
    /// 503 + `Retry-After: 20` instead of 404.
    #[arg(long = "set-retry-after-header")]
    pub set_retry_after_header: bool,
    /// Flush conntrack entries to IMDS after the first rule install.
    #[arg(long = "enable-conntrack-deletion")]
    pub enable_conntrack_deletion: bool,
    /// Print the version and exit.
    #[arg(long = "version")]
    pub version: bool,
    /// `text` or `json`.
    #[arg(long = "log-format", default_value = "text")]
    pub log_format: String,
    /// Appended (space-separated) to the user agent of kube, Entra and IMDS calls.
    #[arg(long = "custom-user-agent", default_value = "")]
    pub custom_user_agent: String,

    // podid additions (docs/configuration.md).
    /// podid: serve `/host/token` (trusts the `podns`/`podname` headers; off by default).
    #[arg(long = "enable-host-token")]
    pub enable_host_token: bool,
    /// podid: error bodies as IMDS-style JSON (`json`, default) or upstream's Go plain text
    /// (`text`).
    #[arg(long = "error-format", default_value = "json")]
    pub error_format: String,
    /// podid: answer final refusals (no binding gives the pod an identity, the requested
    /// identity is not the pod's) with upstream's 404 (503 + `Retry-After` with
    /// `--set-retry-after-header`) instead of the real IMDS's final 400 `invalid_request`, which
    /// SDKs do not retry.
    #[arg(long = "not-found-for-final-refusals")]
    pub not_found_for_final_refusals: bool,
    /// podid: set and verify `net.ipv4.conf.all.route_localnet=1` so DNAT to 127.0.0.1 works on
    /// nodes without kube-proxy.
    #[arg(long = "manage-route-localnet", default_value = "true")]
    pub manage_route_localnet: bool,
    /// podid: tenant of the federated exchange for identities switched to
    /// `podid.io/token-source: federated` that have no `spec.tenantID` (type 0); also env
    /// `FEDERATED_DEFAULT_TENANT_ID`.
    #[arg(long = "federated-default-tenant-id", default_value = "")]
    pub federated_default_tenant_id: String,
    /// podid: serve pods labelled `azure.workload.identity/use: "true"` that no binding gives an
    /// identity through the federated exchange, with the client id their service account's
    /// `azure.workload.identity/client-id` names (watches ServiceAccounts; needs RBAC).
    #[arg(long = "serve-workload-identity-pods")]
    pub serve_workload_identity_pods: bool,
    /// podid: Entra authority of federated exchanges for identities without `spec.adEndpoint`
    /// and for Workload Identity pods (default the public cloud's
    /// `https://login.microsoftonline.com/`); also env `AZURE_AUTHORITY_HOST`, the variable
    /// Workload Identity's webhook sets.
    #[arg(long = "federated-authority-host", default_value = "")]
    pub federated_authority_host: String,
    /// podid: further Entra authorities an identity's `spec.adEndpoint` may name, comma-separated
    /// URLs compared by scheme, host and port (http only if listed so). Without it credentials
    /// go only over https to the Azure clouds' Entra hosts (login.microsoftonline.com,
    /// login.microsoftonline.us, login.chinacloudapi.cn, login.partner.microsoftonline.cn) and
    /// to `--federated-authority-host`.
    #[arg(long = "allowed-authorities", default_value = "")]
    pub allowed_authorities: String,
    /// podid: let `spec.clientPassword` name a Secret in another namespace than the identity's
    /// (upstream's behaviour; off by default: whoever may create an AzureIdentity could then
    /// have nmi send any namespace's Secret to an authority).
    #[arg(long = "allow-cross-namespace-secrets")]
    pub allow_cross_namespace_secrets: bool,
    /// podid: key of a NoSchedule taint the node pool carries from creation; nmi removes it from
    /// its own Node once the interception is installed and its caches are synced, so no workload
    /// pod runs before the node is closed (needs `get`/`patch` on nodes; empty: off).
    #[arg(long = "startup-taint", default_value = "")]
    pub startup_taint: String,
    /// podid: most connections one source address may hold open on the IMDS port at once;
    /// a further connection from it is closed at once (0: no per-source bound, as upstream).
    #[arg(long = "max-connections-per-source", default_value_t = 64)]
    pub max_connections_per_source: usize,

    /// klog's flags (`-v` and the ignored others).
    #[command(flatten)]
    pub klog: KlogFlags,

    /// A subcommand instead of serving.
    #[command(subcommand)]
    pub command: Option<NmiCommand>,
}

/// nmi's subcommands; without one, nmi serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum NmiCommand {
    /// Remove nmi's iptables chains and jumps and, if nmi turned route_localnet on, write back
    /// its earlier value, then exit. nmi never removes them when it stops (fail closed).
    UninstallInterception,
}

/// The addresses nmi listens on and intercepts. They are global, so that they may also follow
/// `uninstall-interception` (`nmi uninstall-interception --metadata-ip=…`).
#[derive(Debug, Clone, clap::Args)]
pub struct InterceptionFlags {
    /// Address the IMDS emulation binds to; `0.0.0.0` still DNATs to 127.0.0.1.
    #[arg(
        long = "nmi-listen-address",
        default_value = "127.0.0.1",
        global = true
    )]
    pub nmi_listen_address: String,
    /// Listen port and DNAT target port.
    #[arg(long = "nmi-port", default_value = "2579", global = true)]
    pub nmi_port: String,
    /// IMDS address: iptables match and the upstream for type-0 tokens and passthrough.
    #[arg(long = "metadata-ip", default_value = "169.254.169.254", global = true)]
    pub metadata_ip: String,
    /// IMDS port.
    #[arg(long = "metadata-port", default_value = "80", global = true)]
    pub metadata_port: String,
}

impl InterceptionFlags {
    /// Validates the addresses: where nmi listens, and the interception (the IMDS address
    /// matched and the DNAT target, 127.0.0.1 when nmi listens on 0.0.0.0).
    pub fn validate(&self) -> Result<(SocketAddr, Interception), ConfigError> {
        let listen_ip: Ipv4Addr = parse_ipv4("nmi-listen-address", &self.nmi_listen_address)?;
        let nmi_port = parse_port("nmi-port", &self.nmi_port)?;
        let metadata_ip = parse_ipv4("metadata-ip", &self.metadata_ip)?;
        let metadata_port = parse_port("metadata-port", &self.metadata_port)?;
        let dnat_ip = if listen_ip.is_unspecified() {
            Ipv4Addr::LOCALHOST
        } else {
            listen_ip
        };
        Ok((
            SocketAddr::new(IpAddr::V4(listen_ip), nmi_port),
            Interception {
                metadata: SocketAddrV4::new(metadata_ip, metadata_port),
                target: SocketAddrV4::new(dnat_ip, nmi_port),
            },
        ))
    }
}

/// A flag value that cannot be used. The message names the flag and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A flag has a value of the wrong shape.
    #[error(transparent)]
    Invalid(#[from] InvalidFlag),
    /// `--node` and `NODE_NAME` are both empty.
    #[error(
        "--node is required (manifests pass --node=$(NODE_NAME) from spec.nodeName; env NODE_NAME also works)"
    )]
    MissingNode,
    /// `--operation-mode` is neither standard nor managed.
    #[error("operation mode {0} not supported")]
    UnsupportedMode(String),
    /// Managed mode needs namespaced matching (docs/upstream.md#start-up step 4).
    #[error(
        "managed mode needs namespaced mode: pass --forceNamespaced=true or set FORCENAMESPACED=true"
    )]
    ManagedWithoutNamespaced,
}

/// Validated NMI configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// This node's name (lower-cased as Kubernetes node names are).
    pub node_name: String,
    /// Where the IMDS emulation listens.
    pub listen: SocketAddr,
    /// DNAT target of the interception rule (127.0.0.1 when listening on 0.0.0.0).
    pub dnat_target: SocketAddrV4,
    /// The real IMDS (iptables match and upstream).
    pub metadata: SocketAddrV4,
    /// iptables reconcile period.
    pub ipt_update_interval: Duration,
    /// Namespaced matching (`--forceNamespaced` or `FORCENAMESPACED=true`).
    pub namespaced: bool,
    /// `--MICNamespace`, kept for compatibility.
    pub mic_namespace: String,
    /// Port of `/healthz` and `/readyz`, all interfaces.
    pub probe_port: u16,
    /// Polls of a `Created` assignment.
    pub retry_attempts_for_created: u32,
    /// Polls of an `Assigned` assignment.
    pub retry_attempts_for_assigned: u32,
    /// Interval between identity polls.
    pub find_identity_retry_interval: Duration,
    /// Watch only this node's AzureAssignedIdentities.
    pub scale_features: bool,
    /// 403 for `/metadata/instance*`.
    pub block_instance_metadata: bool,
    /// Require `Metadata: true`.
    pub metadata_header_required: bool,
    /// Port of `/metrics`, all interfaces.
    pub prometheus_port: u16,
    /// Identity selection mode.
    pub mode: OperationMode,
    /// File to scan for kubenet, or `None` with `--allow-network-plugin-kubenet`.
    pub kubenet_check: Option<PathBuf>,
    /// 503 + `Retry-After` for identity-selection errors.
    pub set_retry_after_header: bool,
    /// Upstream's 404 for final refusals instead of 400.
    pub not_found_for_final_refusals: bool,
    /// Flush conntrack entries to IMDS after the first rule install.
    pub conntrack_deletion: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Log verbosity (klog `-v`).
    pub verbosity: u8,
    /// Suffix of the user agent, if any.
    pub custom_user_agent: Option<String>,
    /// `--enableProfile` was given (ignored, logged).
    pub profile_requested: bool,
    /// Serve `/host/token`.
    pub enable_host_token: bool,
    /// Error body style.
    pub error_bodies: ErrorBodyStyle,
    /// Set and verify `route_localnet`.
    pub manage_route_localnet: bool,
    /// Tenant of federated exchanges for identities without `tenantID` (`None`: such requests
    /// fail with 503 naming the flag).
    pub federated_default_tenant: Option<String>,
    /// Serve Workload Identity pods through IMDS (`--serve-workload-identity-pods`).
    pub serve_workload_identity_pods: bool,
    /// Authority of federated exchanges without `adEndpoint` (`None`: the public cloud).
    pub federated_authority_host: Option<String>,
    /// Authorities `adEndpoint` may name besides the clouds' Entra hosts
    /// (`--allowed-authorities`).
    pub allowed_authorities: Vec<url::Url>,
    /// `clientPassword` may name another namespace's Secret.
    pub allow_cross_namespace_secrets: bool,
    /// Key of the NoSchedule start-up taint nmi removes from its Node once ready to intercept
    /// (`--startup-taint`; `None`: off).
    pub startup_taint: Option<String>,
    /// Most connections per source address on the IMDS port (0: unbounded).
    pub max_connections_per_source: usize,
}

impl Flags {
    /// Validates the flags with the process environment.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        self.into_config_with_env(|name| std::env::var(name).ok())
    }

    /// Validates the flags; `env` looks up environment variables (tests pass a map).
    pub fn into_config_with_env(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let node_name = if self.node.is_empty() {
            env("NODE_NAME").unwrap_or_default()
        } else {
            self.node.clone()
        };
        if node_name.trim().is_empty() {
            return Err(ConfigError::MissingNode);
        }
        let (listen, interception) = self.interception.validate()?;
        let namespaced = self.force_namespaced || env("FORCENAMESPACED").as_deref() == Some("true");
        let Some(mode) = OperationMode::parse(&self.operation_mode) else {
            return Err(ConfigError::UnsupportedMode(self.operation_mode));
        };
        if mode == OperationMode::Managed && !namespaced {
            return Err(ConfigError::ManagedWithoutNamespaced);
        }
        let Some(log_format) = LogFormat::parse(&self.log_format) else {
            return Err(invalid(
                "log-format",
                &self.log_format,
                "unable to apply logging options: want text or json",
            ));
        };
        let federated_default_tenant = if self.federated_default_tenant_id.trim().is_empty() {
            env("FEDERATED_DEFAULT_TENANT_ID").unwrap_or_default()
        } else {
            self.federated_default_tenant_id.clone()
        };
        let federated_default_tenant = federated_default_tenant.trim().to_owned();
        if !federated_default_tenant.is_empty()
            && !federated_default_tenant
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err(invalid(
                "federated-default-tenant-id",
                &federated_default_tenant,
                "want a tenant id or domain ([A-Za-z0-9._-])",
            ));
        }
        let federated_authority_host = if self.federated_authority_host.trim().is_empty() {
            env("AZURE_AUTHORITY_HOST").unwrap_or_default()
        } else {
            self.federated_authority_host.clone()
        };
        let federated_authority_host = federated_authority_host.trim().to_owned();
        if !federated_authority_host.is_empty() {
            let parsed = federated_authority_host.parse::<http::Uri>().map_err(|e| {
                invalid::<InvalidFlag>(
                    "federated-authority-host",
                    &federated_authority_host,
                    e.to_string(),
                )
            })?;
            if !matches!(parsed.scheme_str(), Some("https" | "http")) || parsed.host().is_none() {
                return Err(invalid(
                    "federated-authority-host",
                    &federated_authority_host,
                    "want an http(s) URL such as https://login.microsoftonline.com/",
                ));
            }
        }
        let mut allowed_authorities = Vec::new();
        for entry in self.allowed_authorities.split(',').map(str::trim) {
            if entry.is_empty() {
                continue;
            }
            let parsed = url::Url::parse(entry)
                .map_err(|e| invalid::<InvalidFlag>("allowed-authorities", entry, e.to_string()))?;
            if !matches!(parsed.scheme(), "https" | "http")
                || parsed.host_str().is_none()
                || !parsed.username().is_empty()
                || parsed.password().is_some()
            {
                return Err(invalid(
                    "allowed-authorities",
                    entry,
                    "want http(s) URLs without user info, such as https://login.example.net/",
                ));
            }
            allowed_authorities.push(parsed);
        }
        let startup_taint = self.startup_taint.trim().to_owned();
        if !startup_taint.is_empty() && !is_taint_key(&startup_taint) {
            return Err(invalid(
                "startup-taint",
                &startup_taint,
                "want a taint key: [prefix/]name, name up to 63 of [A-Za-z0-9._-], prefix a DNS subdomain",
            ));
        }
        let error_bodies = match self.error_format.as_str() {
            "json" => ErrorBodyStyle::ImdsJson,
            "text" => ErrorBodyStyle::GoPlainText,
            other => return Err(invalid("error-format", other, "want json or text")),
        };
        Ok(Config {
            node_name: node_name.trim().to_ascii_lowercase(),
            listen,
            dnat_target: interception.target,
            metadata: interception.metadata,
            ipt_update_interval: positive_secs(
                "ipt-update-interval-sec",
                self.ipt_update_interval_sec,
            )?,
            namespaced,
            mic_namespace: self.mic_namespace,
            probe_port: parse_port("http-probe-port", &self.http_probe_port)?,
            retry_attempts_for_created: non_negative(
                "retry-attempts-for-created",
                self.retry_attempts_for_created,
            )?,
            retry_attempts_for_assigned: non_negative(
                "retry-attempts-for-assigned",
                self.retry_attempts_for_assigned,
            )?,
            find_identity_retry_interval: positive_secs(
                "find-identity-retry-interval",
                self.find_identity_retry_interval,
            )?,
            scale_features: self.enable_scale_features,
            block_instance_metadata: self.block_instance_metadata,
            metadata_header_required: self.metadata_header_required,
            prometheus_port: parse_port("prometheus-port", &self.prometheus_port)?,
            mode,
            kubenet_check: (!self.allow_network_plugin_kubenet).then_some(self.kubelet_config),
            set_retry_after_header: self.set_retry_after_header,
            not_found_for_final_refusals: self.not_found_for_final_refusals,
            conntrack_deletion: self.enable_conntrack_deletion,
            log_format,
            verbosity: self.klog.verbosity,
            custom_user_agent: (!self.custom_user_agent.trim().is_empty())
                .then(|| self.custom_user_agent.trim().to_owned()),
            profile_requested: self.enable_profile,
            enable_host_token: self.enable_host_token,
            error_bodies,
            manage_route_localnet: self.manage_route_localnet,
            federated_default_tenant: (!federated_default_tenant.is_empty())
                .then_some(federated_default_tenant),
            serve_workload_identity_pods: self.serve_workload_identity_pods,
            federated_authority_host: (!federated_authority_host.is_empty())
                .then_some(federated_authority_host),
            allowed_authorities,
            allow_cross_namespace_secrets: self.allow_cross_namespace_secrets,
            startup_taint: (!startup_taint.is_empty()).then_some(startup_taint),
            max_connections_per_source: self.max_connections_per_source,
        })
    }
}

/// The user agent of NMI's outgoing calls: `podid/NMI/<version>[ <custom>]`.
pub fn user_agent(custom: Option<&str>) -> String {
    podid_runtime::user_agent("NMI", custom)
}

/// Why NMI refuses to start on this node (docs/upstream.md#start-up step 2).
#[derive(Debug, thiserror::Error)]
pub enum KubenetError {
    /// The kubelet config could not be read.
    #[error("failed to check if CNI plugin is kubenet, error: {0}")]
    Unreadable(#[source] std::io::Error),
    /// The node runs kubenet, where pods can ARP-spoof each other (CVE-2021-1677).
    #[error(
        "AAD Pod Identity is not supported for Kubenet. Review https://azure.github.io/aad-pod-identity/docs/configure/aad_pod_identity_on_kubenet/ for more details."
    )]
    Kubenet,
}

/// Refuses kubenet nodes unless allowed (`config.kubenet_check` is `None`).
pub fn check_kubenet(config: &Config) -> Result<(), KubenetError> {
    let Some(path) = &config.kubenet_check else {
        return Ok(());
    };
    let content = std::fs::read(path).map_err(KubenetError::Unreadable)?;
    let needle = b"--network-plugin=kubenet";
    if content.windows(needle.len()).any(|w| w == needle) {
        return Err(KubenetError::Kubenet);
    }
    Ok(())
}

/// A Kubernetes label-style key: optional DNS-subdomain prefix and `/`, then a name of 1–63
/// characters `[A-Za-z0-9._-]` starting and ending alphanumeric.
fn is_taint_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let edges_alnum = |s: &str| {
        s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
    };
    let name_ok = (1..=63).contains(&name.len())
        && edges_alnum(name)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    let prefix_ok = prefix.is_none_or(|p| {
        (1..=253).contains(&p.len())
            && p.split('.').all(|label| {
                !label.is_empty()
                    && edges_alnum(label)
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    });
    name_ok && prefix_ok
}

fn parse_ipv4(flag: &'static str, value: &str) -> Result<Ipv4Addr, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(flag, value, "want an IPv4 address"))
}

fn positive_secs(flag: &'static str, value: i64) -> Result<Duration, ConfigError> {
    u64::try_from(value)
        .ok()
        .filter(|secs| *secs > 0)
        .map(Duration::from_secs)
        .ok_or_else(|| {
            invalid(
                flag,
                &value.to_string(),
                "want a positive number of seconds",
            )
        })
}

fn non_negative(flag: &'static str, value: i64) -> Result<u32, ConfigError> {
    u32::try_from(value)
        .map_err(|_| invalid(flag, &value.to_string(), "want a non-negative number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        parse_env(args, &[])
    }

    fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
        let flags = Flags::try_parse_from(std::iter::once("nmi").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        flags
            .into_config_with_env(|name| {
                env.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_upstreams() {
        let c = parse(&["--node=Node-A"]).expect("valid");
        assert_eq!(c.node_name, "node-a");
        assert_eq!(
            c.listen,
            "127.0.0.1:2579".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(c.dnat_target, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2579));
        assert_eq!(
            c.metadata,
            "169.254.169.254:80".parse::<SocketAddrV4>().expect("addr")
        );
        assert_eq!(c.ipt_update_interval, Duration::from_secs(60));
        assert!(!c.namespaced);
        assert_eq!(c.mic_namespace, "default");
        assert_eq!(c.probe_port, 8080);
        assert_eq!(c.retry_attempts_for_created, 16);
        assert_eq!(c.retry_attempts_for_assigned, 4);
        assert_eq!(c.find_identity_retry_interval, Duration::from_secs(5));
        assert!(c.scale_features);
        assert!(!c.block_instance_metadata);
        assert!(c.metadata_header_required);
        assert_eq!(c.prometheus_port, 9090);
        assert_eq!(c.mode, OperationMode::Standard);
        assert_eq!(c.kubenet_check, Some(PathBuf::from("/etc/default/kubelet")));
        assert!(!c.set_retry_after_header);
        assert!(!c.conntrack_deletion);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.custom_user_agent, None);
        assert!(!c.enable_host_token);
        assert_eq!(c.error_bodies, ErrorBodyStyle::ImdsJson);
        assert!(c.manage_route_localnet);
        assert_eq!(c.federated_default_tenant, None);
        assert!(!c.serve_workload_identity_pods);
        assert!(c.allowed_authorities.is_empty());
        assert!(!c.allow_cross_namespace_secrets);
        assert_eq!(c.startup_taint, None);
    }

    #[test]
    fn every_flag_is_honoured() {
        let c = parse(&[
            "--node=n1",
            "--nmi-listen-address=0.0.0.0",
            "--nmi-port=3000",
            "--metadata-ip=10.1.2.3",
            "--metadata-port=8080",
            "--ipt-update-interval-sec=7",
            "--forceNamespaced",
            "--MICNamespace=kube-system",
            "--http-probe-port=8085",
            "--retry-attempts-for-created=2",
            "--retry-attempts-for-assigned=1",
            "--find-identity-retry-interval=3",
            "--enableProfile=true",
            "--enableScaleFeatures=false",
            "--block-instance-metadata",
            "--metadata-header-required=false",
            "--prometheus-port=9091",
            "--operation-mode=MANAGED",
            "--allow-network-plugin-kubenet=T",
            "--set-retry-after-header=1",
            "--enable-conntrack-deletion",
            "--log-format=json",
            "--custom-user-agent=acme",
            "--enable-host-token",
            "--error-format=text",
            "--manage-route-localnet=false",
            "--federated-default-tenant-id=72f988bf-86f1-41af-91ab-2d7cd011db47",
            "--serve-workload-identity-pods",
            "--federated-authority-host=https://login.microsoftonline.us/",
            "--allowed-authorities=https://login.example.net/, http://10.0.0.5:8080",
            "--allow-cross-namespace-secrets",
            "--startup-taint=podid.io/nmi-not-ready",
            "-v=4",
            "--logtostderr=true",
            "--log_dir=/tmp",
        ])
        .expect("valid");
        assert_eq!(
            c.listen,
            "0.0.0.0:3000".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(c.dnat_target, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 3000));
        assert_eq!(
            c.metadata,
            "10.1.2.3:8080".parse::<SocketAddrV4>().expect("addr")
        );
        assert_eq!(c.ipt_update_interval, Duration::from_secs(7));
        assert!(c.namespaced);
        assert_eq!(c.mic_namespace, "kube-system");
        assert_eq!(c.probe_port, 8085);
        assert_eq!(c.retry_attempts_for_created, 2);
        assert_eq!(c.retry_attempts_for_assigned, 1);
        assert_eq!(c.find_identity_retry_interval, Duration::from_secs(3));
        assert!(c.profile_requested);
        assert!(!c.scale_features);
        assert!(c.block_instance_metadata);
        assert!(!c.metadata_header_required);
        assert_eq!(c.prometheus_port, 9091);
        assert_eq!(c.mode, OperationMode::Managed);
        assert_eq!(c.kubenet_check, None);
        assert!(c.set_retry_after_header);
        assert!(c.conntrack_deletion);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.custom_user_agent.as_deref(), Some("acme"));
        assert!(c.enable_host_token);
        assert_eq!(c.error_bodies, ErrorBodyStyle::GoPlainText);
        assert!(!c.manage_route_localnet);
        assert_eq!(
            c.federated_default_tenant.as_deref(),
            Some("72f988bf-86f1-41af-91ab-2d7cd011db47")
        );
        assert!(c.serve_workload_identity_pods);
        assert_eq!(
            c.federated_authority_host.as_deref(),
            Some("https://login.microsoftonline.us/")
        );
        assert_eq!(
            c.allowed_authorities
                .iter()
                .map(url::Url::as_str)
                .collect::<Vec<_>>(),
            ["https://login.example.net/", "http://10.0.0.5:8080/"]
        );
        assert!(c.allow_cross_namespace_secrets);
        assert_eq!(c.startup_taint.as_deref(), Some("podid.io/nmi-not-ready"));
        assert_eq!(c.verbosity, 4);
    }

    #[test]
    fn a_specific_listen_address_is_the_dnat_target() {
        let c = parse(&["--node=n", "--nmi-listen-address=10.0.0.4"]).expect("valid");
        assert_eq!(
            c.dnat_target,
            "10.0.0.4:2579".parse::<SocketAddrV4>().expect("addr")
        );
    }

    #[test]
    fn env_twins() {
        let c = parse_env(
            &[],
            &[("NODE_NAME", "from-env"), ("FORCENAMESPACED", "true")],
        )
        .expect("valid");
        assert_eq!(c.node_name, "from-env");
        assert!(c.namespaced);
        // Upstream compares with "true" exactly.
        let c = parse_env(&["--node=n"], &[("FORCENAMESPACED", "1")]).expect("valid");
        assert!(!c.namespaced);
        let c =
            parse_env(&["--node=n"], &[("FEDERATED_DEFAULT_TENANT_ID", " tid ")]).expect("valid");
        assert_eq!(c.federated_default_tenant.as_deref(), Some("tid"));
        let c = parse_env(
            &["--node=n", "--federated-default-tenant-id=flag"],
            &[("FEDERATED_DEFAULT_TENANT_ID", "env")],
        )
        .expect("valid");
        assert_eq!(c.federated_default_tenant.as_deref(), Some("flag"));
        let c = parse_env(
            &["--node=n"],
            &[("AZURE_AUTHORITY_HOST", "https://login.chinacloudapi.cn/")],
        )
        .expect("valid");
        assert_eq!(
            c.federated_authority_host.as_deref(),
            Some("https://login.chinacloudapi.cn/")
        );
        for bad in ["login.microsoftonline.com", "ftp://x/", "https://"] {
            let error =
                parse(&["--node=n", &format!("--federated-authority-host={bad}")]).expect_err(bad);
            assert!(
                error.to_string().contains("federated-authority-host"),
                "{error}"
            );
        }
        // The flag wins over the env.
        let c = parse_env(&["--node=flag"], &[("NODE_NAME", "env")]).expect("valid");
        assert_eq!(c.node_name, "flag");
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, needle) in [
            (&["--nmi-port=0"][..], "--nmi-port"),
            (&["--nmi-port=70000"][..], "--nmi-port"),
            (&["--metadata-port=http"][..], "--metadata-port"),
            (&["--metadata-ip=::1"][..], "--metadata-ip"),
            (
                &["--nmi-listen-address=localhost"][..],
                "--nmi-listen-address",
            ),
            (&["--http-probe-port=-1"][..], "--http-probe-port"),
            (
                &["--ipt-update-interval-sec=0"][..],
                "--ipt-update-interval-sec",
            ),
            (
                &["--find-identity-retry-interval=-5"][..],
                "--find-identity-retry-interval",
            ),
            (
                &["--retry-attempts-for-created=-1"][..],
                "--retry-attempts-for-created",
            ),
            (&["--log-format=xml"][..], "--log-format"),
            (&["--startup-taint=a b"][..], "--startup-taint"),
            (&["--startup-taint=Bad_Prefix/x"][..], "--startup-taint"),
            (&["--startup-taint=x/-y"][..], "--startup-taint"),
            (&["--error-format=html"][..], "--error-format"),
            (
                &["--federated-default-tenant-id=a/b"][..],
                "--federated-default-tenant-id",
            ),
            (
                &["--allowed-authorities=login.example.net"][..],
                "--allowed-authorities",
            ),
            (
                &["--allowed-authorities=ftp://x/"][..],
                "--allowed-authorities",
            ),
            (
                &["--allowed-authorities=https://u:p@x/"][..],
                "--allowed-authorities",
            ),
        ] {
            let mut all = vec!["--node=n"];
            all.extend_from_slice(args);
            let err = parse(&all).expect_err("must be refused");
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        assert!(
            parse(&["--node=n", "--forceNamespaced=maybe"])
                .expect_err("bad bool")
                .contains("forceNamespaced")
        );
        assert_eq!(
            parse(&["--node=n", "--operation-mode=sidecar"]).expect_err("bad mode"),
            "operation mode sidecar not supported"
        );
        assert!(
            parse(&["--node=n", "--operation-mode=managed"])
                .expect_err("managed needs namespaced")
                .contains("namespaced")
        );
        assert!(
            parse(&[])
                .expect_err("no node")
                .contains("--node is required")
        );
        assert!(parse(&["--node=n", "--no-such-flag"]).is_err());
    }

    #[test]
    fn uninstall_interception_is_a_subcommand_that_needs_no_node() {
        let parse = |args: &[&str]| {
            Flags::try_parse_from(std::iter::once("nmi").chain(args.iter().copied()))
        };
        let flags = parse(&["uninstall-interception"]).expect("parses without --node");
        assert_eq!(flags.command, Some(NmiCommand::UninstallInterception));
        let (_, interception) = flags.interception.validate().expect("defaults are valid");
        assert_eq!(
            interception,
            Interception {
                metadata: "169.254.169.254:80".parse().expect("addr"),
                target: "127.0.0.1:2579".parse().expect("addr"),
            }
        );
        // The interception flags may follow the subcommand …
        let after = parse(&[
            "uninstall-interception",
            "--metadata-ip=10.1.2.3",
            "--metadata-port=8080",
            "--nmi-listen-address=0.0.0.0",
            "--nmi-port=3000",
        ])
        .expect("parses");
        let (listen, interception) = after.interception.validate().expect("valid");
        assert_eq!(listen, "0.0.0.0:3000".parse::<SocketAddr>().expect("addr"));
        assert_eq!(
            interception,
            Interception {
                metadata: "10.1.2.3:8080".parse().expect("addr"),
                target: "127.0.0.1:3000".parse().expect("addr"),
            }
        );
        // … or precede it, with nmi's other flags.
        let before = parse(&[
            "--node=n",
            "--metadata-ip=10.9.9.9",
            "uninstall-interception",
        ])
        .expect("parses");
        assert_eq!(before.command, Some(NmiCommand::UninstallInterception));
        let (_, interception) = before.interception.validate().expect("valid");
        assert_eq!(interception.metadata, "10.9.9.9:80".parse().expect("addr"));
        // A bad address names its flag.
        let bad = parse(&["uninstall-interception", "--nmi-port=0"]).expect("parses");
        let error = bad.interception.validate().expect_err("port 0");
        assert!(error.to_string().contains("--nmi-port"), "{error}");
        // Serving flags do not follow it, and nothing else is a subcommand.
        assert!(parse(&["uninstall-interception", "--node=n"]).is_err());
        assert!(parse(&["uninstall"]).is_err());
        assert!(parse(&["help"]).is_err());
        // Without the subcommand nmi serves, and needs its node.
        let serve = parse(&["--node=n"]).expect("parses");
        assert_eq!(serve.command, None);
    }

    #[test]
    fn kubenet_refusal() {
        let dir = std::env::temp_dir().join(format!("podid-nmi-kubenet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let kubenet = dir.join("kubenet");
        std::fs::write(
            &kubenet,
            "KUBELET_FLAGS=--network-plugin=kubenet --max-pods=110",
        )
        .expect("write");
        let cni = dir.join("cni");
        std::fs::write(&cni, "KUBELET_FLAGS=--network-plugin=cni").expect("write");
        let cfg = |path: &std::path::Path| {
            parse(&["--node=n", &format!("--kubelet-config={}", path.display())]).expect("valid")
        };
        assert!(matches!(
            check_kubenet(&cfg(&kubenet)),
            Err(KubenetError::Kubenet)
        ));
        assert!(check_kubenet(&cfg(&cni)).is_ok());
        let missing = check_kubenet(&cfg(&dir.join("missing"))).expect_err("unreadable");
        assert!(
            missing
                .to_string()
                .starts_with("failed to check if CNI plugin is kubenet")
        );
        let allowed = parse(&[
            "--node=n",
            "--allow-network-plugin-kubenet",
            &format!("--kubelet-config={}", kubenet.display()),
        ])
        .expect("valid");
        assert!(check_kubenet(&allowed).is_ok());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn version_has_upstreams_shape() {
        let line = version_line();
        assert!(line.starts_with("MIC Version: "), "{line}");
        assert!(line.contains(" - NMI Version: ") && line.contains(" - Commit: "));
        assert_eq!(user_agent(Some("x")), format!("{} x", user_agent(None)));
    }
}
