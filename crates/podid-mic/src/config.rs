//! `mic` command line: every upstream flag of docs/configuration.md with its name and default, the
//! env twins (`MIC_POD_NAMESPACE`, `FORCENAMESPACED`), and podid's additions — validated into a
//! typed [`Config`] before anything connects anywhere.
//!
//! Flags keep upstream's spelling, including the camel-case ones (`--forceNamespaced`,
//! `--syncRetryDuration`, `--createDeleteBatch`, `--clientQps` …). As with Go's `flag` package,
//! `-name` and `--name` are both accepted (see [`normalize_go_args`]); booleans accept `--flag`,
//! `--flag=true`, `--flag=false` and Go's other forms (`1`, `t`, `T`, `TRUE`, `True`, `0`, `f` …);
//! durations use Go's syntax (`3600s`, `1h`, `2m30s`, `500ms`). klog's flags (`-v`,
//! `--logtostderr`, `--log_dir` …) are accepted so existing manifests keep working.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use podid_runtime::flags::{
    InvalidFlag, KlogFlags, invalid, normalize_go_args, parse_go_duration, parse_port,
};
pub use podid_runtime::logging::LogFormat;
pub use podid_runtime::version_line;

/// The raw command line, exactly as upstream spells it. Turn it into a [`Config`] with
/// [`Flags::into_config`].
#[derive(Debug, Clone, Parser)]
#[command(
    mut_args = podid_runtime::flags::go_bool,
    name = "mic",
    about = "podid MIC: assigns pods' Azure identities to their nodes",
    disable_version_flag = true
)]
pub struct Flags {
    /// kubeconfig path; empty means in-cluster configuration.
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    /// Path to azure.json; empty means the environment variables of docs/configuration.md.
    #[arg(long, default_value = "")]
    pub cloudconfig: String,
    /// Namespaced matching (also env `FORCENAMESPACED=true`).
    #[arg(long = "forceNamespaced")]
    pub force_namespaced: bool,
    /// Print the version and exit.
    #[arg(long = "version")]
    pub version: bool,
    /// Period of the full sync pass.
    #[arg(long = "syncRetryDuration", default_value = "3600s")]
    pub sync_retry_duration: String,
    /// Leader lock holder identity; empty means the host name.
    #[arg(long = "leader-election-instance", default_value = "")]
    pub leader_election_instance: String,
    /// Namespace of the leader lock.
    #[arg(long = "leader-election-namespace", default_value = "default")]
    pub leader_election_namespace: String,
    /// Name of the leader lock.
    #[arg(long = "leader-election-name", default_value = "aad-pod-identity-mic")]
    pub leader_election_name: String,
    /// Lease duration of the leader lock.
    #[arg(long = "leader-election-duration", default_value = "15s")]
    pub leader_election_duration: String,
    /// Port of `/healthz`.
    #[arg(long = "http-probe-port", default_value = "8080")]
    pub http_probe_port: String,
    /// Port of `/metrics`.
    #[arg(long = "prometheus-port", default_value = "8888")]
    pub prometheus_port: String,
    /// Upstream's pprof server; podid has none and ignores it (logged).
    #[arg(long = "enableProfile")]
    pub enable_profile: bool,
    /// Deprecated no-op for MIC (logged).
    #[arg(long = "enableScaleFeatures")]
    pub enable_scale_features: bool,
    /// Concurrent AzureAssignedIdentity API calls per node or VM scale set.
    #[arg(
        long = "createDeleteBatch",
        default_value_t = 20,
        allow_negative_numbers = true
    )]
    pub create_delete_batch: i64,
    /// Kubernetes client queries per second (burst = the same integer).
    #[arg(
        long = "clientQps",
        default_value_t = 5.0,
        allow_negative_numbers = true
    )]
    pub client_qps: f64,
    /// Comma-separated client ids never removed from a VM or VM scale set.
    #[arg(long = "immutable-user-msis", default_value = "")]
    pub immutable_user_msis: String,
    /// ConfigMap (in `MIC_POD_NAMESPACE`) holding the type-upgrade marker.
    #[arg(long = "config-map-name", default_value = "aad-pod-identity-config")]
    pub config_map_name: String,
    /// Key of the type-upgrade marker in that ConfigMap.
    #[arg(
        long = "type-upgrade-status-key",
        default_value = "type-upgrade-status"
    )]
    pub type_upgrade_status_key: String,
    /// Run the one-time CRD casing upgrade.
    #[arg(long = "enable-type-upgrade", default_value = "true")]
    pub enable_type_upgrade: bool,
    /// Retries of a failed VM/VMSS identity PATCH after dropping the erroneous ids.
    #[arg(
        long = "update-user-msi-max-retry",
        default_value_t = 2,
        allow_negative_numbers = true
    )]
    pub update_user_msi_max_retry: i64,
    /// Pause between those retries.
    #[arg(long = "update-user-msi-retry-interval", default_value = "1s")]
    pub update_user_msi_retry_interval: String,
    /// Period of the "re-add identities missing from a VM/VMSS" pass.
    #[arg(long = "identity-assignment-reconcile-interval", default_value = "3m")]
    pub identity_assignment_reconcile_interval: String,
    /// `text` or `json`.
    #[arg(long = "log-format", default_value = "text")]
    pub log_format: String,
    /// Appended (space-separated) to the user agent of Kubernetes and Azure calls.
    #[arg(long = "custom-user-agent", default_value = "")]
    pub custom_user_agent: String,

    // podid additions (docs/configuration.md).
    /// podid: base URL of Azure Resource Manager instead of the cloud's (tests, private clouds).
    #[arg(long = "arm-endpoint", default_value = "")]
    pub arm_endpoint: String,
    /// podid: Entra authority base URL instead of the cloud's.
    #[arg(long = "aad-authority", default_value = "")]
    pub aad_authority: String,
    /// podid: base URL of IMDS, used when the cloud config says `useManagedIdentityExtension`.
    #[arg(long = "imds-endpoint", default_value = "http://169.254.169.254")]
    pub imds_endpoint: String,
    /// podid: drop the assignments of Succeeded and Failed pods (upstream keeps them until the
    /// pod is deleted; `--release-finished-pods=false` restores that).
    #[arg(long = "release-finished-pods", default_value = "true")]
    pub release_finished_pods: bool,
    /// podid: lead only when upstream's Endpoints leader lock (same namespace and name) is free
    /// or expired too, and renew it while leading, so Go MIC replicas of a release being
    /// upgraded stay followers; `--upstream-leader-lock=false` once no Go MIC runs (Lease only,
    /// Endpoints never read or written).
    #[arg(long = "upstream-leader-lock", default_value = "true")]
    pub upstream_leader_lock: bool,
    /// podid: how long an identity stays on a VM or VM scale set after the last pod using it
    /// there goes, so that the next pod finds it without an ARM round trip (`0`: released at
    /// once, as upstream).
    #[arg(long = "identity-release-grace-period", default_value = "5m")]
    pub identity_release_grace_period: String,
    /// podid: most user-assigned identities MIC keeps in use or held on one VM or VM scale set;
    /// beyond it, the oldest held identities are released first.
    #[arg(
        long = "identity-limit-per-vm",
        default_value_t = 100,
        allow_negative_numbers = true
    )]
    pub identity_limit_per_vm: i64,

    /// klog's flags (`-v` and the ignored others).
    #[command(flatten)]
    pub klog: KlogFlags,
}

/// A flag or environment value that cannot be used. The message names the flag and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A flag has a value of the wrong shape.
    #[error(transparent)]
    Invalid(#[from] InvalidFlag),
    /// `MIC_POD_NAMESPACE` is unset or empty (upstream's fatal message).
    #[error("namespace not specified. Please add meta.namespace as env variable MIC_POD_NAMESPACE")]
    MissingPodNamespace,
}

/// Validated MIC configuration (without the cloud configuration, which [`crate::cloud`] loads
/// from [`Config::cloud_config`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// kubeconfig path; `None` means in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// azure.json path; `None` means the environment fallback.
    pub cloud_config: Option<PathBuf>,
    /// MIC's own namespace (env `MIC_POD_NAMESPACE`).
    pub pod_namespace: String,
    /// Namespaced matching (`--forceNamespaced` or `FORCENAMESPACED=true`).
    pub namespaced: bool,
    /// Period of the full sync pass.
    pub sync_retry_interval: Duration,
    /// Leader lock holder identity (`--leader-election-instance`, else the host name).
    pub leader_election_instance: String,
    /// Namespace of the leader lock.
    pub leader_election_namespace: String,
    /// Name of the leader lock.
    pub leader_election_name: String,
    /// Lease duration.
    pub leader_election_duration: Duration,
    /// Port of `/healthz`, all interfaces.
    pub probe_port: u16,
    /// Port of `/metrics`, all interfaces.
    pub prometheus_port: u16,
    /// `--enableProfile` was given (ignored, logged).
    pub profile_requested: bool,
    /// `--enableScaleFeatures` was given (deprecated no-op, logged).
    pub scale_features_requested: bool,
    /// Concurrent AzureAssignedIdentity API calls per node or VM scale set (≥ 1).
    pub create_delete_batch: usize,
    /// Kubernetes client QPS.
    pub client_qps: f64,
    /// Kubernetes client burst (`int(--clientQps)`, at least 1).
    pub client_burst: u32,
    /// Client ids from `--immutable-user-msis`, lower-cased (the cluster identity from the cloud
    /// config is added by the caller once it is loaded).
    pub immutable_client_ids: BTreeSet<String>,
    /// ConfigMap holding the type-upgrade marker.
    pub config_map_name: String,
    /// Key of the type-upgrade marker.
    pub type_upgrade_status_key: String,
    /// Run the one-time type upgrade.
    pub type_upgrade: bool,
    /// Retries of a failed identity PATCH.
    pub update_user_msi_max_retry: u32,
    /// Pause between those retries.
    pub update_user_msi_retry_interval: Duration,
    /// Period of the identity-assignment reconcile pass.
    pub identity_assignment_reconcile_interval: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log verbosity (klog `-v`).
    pub verbosity: u8,
    /// Suffix of the user agent, if any.
    pub custom_user_agent: Option<String>,
    /// Overrides of the Azure endpoints (podid additions).
    pub endpoints: EndpointOverrides,
    /// Drop the assignments of Succeeded and Failed pods.
    pub release_finished_pods: bool,
    /// Also honour and keep upstream's Endpoints leader lock.
    pub upstream_leader_lock: bool,
    /// How long an identity stays on its VM/VMSS after its last pod (zero: upstream).
    pub identity_release_grace_period: Duration,
    /// Most identities in use or held on one VM/VMSS (≥ 1).
    pub identity_limit_per_vm: usize,
}

/// Azure endpoints given on the command line instead of the cloud's (podid additions).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointOverrides {
    /// Azure Resource Manager base URL (`--arm-endpoint`).
    pub arm: Option<String>,
    /// Entra authority base URL (`--aad-authority`).
    pub aad_authority: Option<String>,
    /// IMDS base URL (`--imds-endpoint`).
    pub imds: String,
}

impl Flags {
    /// Parses a command line, accepting Go's single-dash long flags.
    pub fn parse_go<I, S>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::try_parse_from(normalize_go_args(args))
    }

    /// Validates the flags with the process environment and host name.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        self.into_config_with_env(|name| std::env::var(name).ok(), &hostname)
    }

    /// Validates the flags; `env` looks up environment variables (tests pass a map) and
    /// `hostname` is the default leader-election instance.
    pub fn into_config_with_env(
        self,
        env: impl Fn(&str) -> Option<String>,
        hostname: &str,
    ) -> Result<Config, ConfigError> {
        let pod_namespace = env("MIC_POD_NAMESPACE")
            .filter(|ns| !ns.trim().is_empty())
            .ok_or(ConfigError::MissingPodNamespace)?;
        let namespaced = self.force_namespaced || env("FORCENAMESPACED").as_deref() == Some("true");
        let Some(log_format) = LogFormat::parse(&self.log_format) else {
            return Err(invalid(
                "log-format",
                &self.log_format,
                "unable to apply logging options: want text or json",
            ));
        };
        let create_delete_batch = usize::try_from(self.create_delete_batch)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                invalid::<InvalidFlag>(
                    "createDeleteBatch",
                    &self.create_delete_batch.to_string(),
                    "want a positive number",
                )
            })?;
        if !(self.client_qps.is_finite() && self.client_qps > 0.0) {
            return Err(invalid(
                "clientQps",
                &self.client_qps.to_string(),
                "want a positive number",
            ));
        }
        // Upstream: Burst = int(QPS); a burst of 0 would block every call, so at least 1.
        let client_burst = (self.client_qps.trunc().min(f64::from(u32::MAX)) as u32).max(1);
        let update_user_msi_max_retry =
            u32::try_from(self.update_user_msi_max_retry).map_err(|_| {
                invalid::<InvalidFlag>(
                    "update-user-msi-max-retry",
                    &self.update_user_msi_max_retry.to_string(),
                    "want a non-negative number",
                )
            })?;
        let leader_election_instance = if self.leader_election_instance.trim().is_empty() {
            hostname.trim().to_owned()
        } else {
            self.leader_election_instance.trim().to_owned()
        };
        if leader_election_instance.is_empty() {
            return Err(invalid(
                "leader-election-instance",
                "",
                "empty and the host name is unknown",
            ));
        }
        for (flag, value) in [
            ("leader-election-namespace", &self.leader_election_namespace),
            ("leader-election-name", &self.leader_election_name),
            ("config-map-name", &self.config_map_name),
            ("type-upgrade-status-key", &self.type_upgrade_status_key),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(flag, value, "must not be empty"));
            }
        }
        let immutable_client_ids = self
            .immutable_user_msis
            .split(',')
            .map(|id| id.trim().to_ascii_lowercase())
            .filter(|id| !id.is_empty())
            .collect();
        let endpoints = EndpointOverrides {
            arm: optional_url("arm-endpoint", &self.arm_endpoint)?,
            aad_authority: optional_url("aad-authority", &self.aad_authority)?,
            imds: optional_url("imds-endpoint", &self.imds_endpoint)?.ok_or_else(|| {
                invalid::<InvalidFlag>("imds-endpoint", &self.imds_endpoint, "must not be empty")
            })?,
        };
        Ok(Config {
            kubeconfig: non_empty_path(&self.kubeconfig),
            cloud_config: non_empty_path(&self.cloudconfig),
            pod_namespace: pod_namespace.trim().to_owned(),
            namespaced,
            sync_retry_interval: positive_duration("syncRetryDuration", &self.sync_retry_duration)?,
            leader_election_instance,
            leader_election_namespace: self.leader_election_namespace,
            leader_election_name: self.leader_election_name,
            leader_election_duration: positive_duration(
                "leader-election-duration",
                &self.leader_election_duration,
            )?,
            probe_port: parse_port("http-probe-port", &self.http_probe_port)?,
            prometheus_port: parse_port("prometheus-port", &self.prometheus_port)?,
            profile_requested: self.enable_profile,
            scale_features_requested: self.enable_scale_features,
            create_delete_batch,
            client_qps: self.client_qps,
            client_burst,
            immutable_client_ids,
            config_map_name: self.config_map_name,
            type_upgrade_status_key: self.type_upgrade_status_key,
            type_upgrade: self.enable_type_upgrade,
            update_user_msi_max_retry,
            update_user_msi_retry_interval: duration(
                "update-user-msi-retry-interval",
                &self.update_user_msi_retry_interval,
            )?,
            identity_assignment_reconcile_interval: positive_duration(
                "identity-assignment-reconcile-interval",
                &self.identity_assignment_reconcile_interval,
            )?,
            log_format,
            verbosity: self.klog.verbosity,
            custom_user_agent: (!self.custom_user_agent.trim().is_empty())
                .then(|| self.custom_user_agent.trim().to_owned()),
            endpoints,
            release_finished_pods: self.release_finished_pods,
            upstream_leader_lock: self.upstream_leader_lock,
            identity_release_grace_period: duration(
                "identity-release-grace-period",
                &self.identity_release_grace_period,
            )?,
            identity_limit_per_vm: usize::try_from(self.identity_limit_per_vm)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    invalid::<InvalidFlag>(
                        "identity-limit-per-vm",
                        &self.identity_limit_per_vm.to_string(),
                        "want a positive number",
                    )
                })?,
        })
    }
}

/// The user agent of MIC's outgoing calls: `podid/MIC/<version>[ <custom>]`.
pub fn user_agent(custom: Option<&str>) -> String {
    podid_runtime::user_agent("MIC", custom)
}

fn non_empty_path(value: &str) -> Option<PathBuf> {
    (!value.trim().is_empty()).then(|| PathBuf::from(value.trim()))
}

fn duration(flag: &'static str, value: &str) -> Result<Duration, ConfigError> {
    parse_go_duration(value).map_err(|reason| invalid(flag, value, reason))
}

fn positive_duration(flag: &'static str, value: &str) -> Result<Duration, ConfigError> {
    let d = duration(flag, value)?;
    if d.is_zero() {
        return Err(invalid(flag, value, "want a positive duration"));
    }
    Ok(d)
}

fn optional_url(flag: &'static str, value: &str) -> Result<Option<String>, ConfigError> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or_else(|| invalid::<InvalidFlag>(flag, value, "want an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') || rest.contains(char::is_whitespace) {
        return Err(invalid(
            flag,
            value,
            "want an http:// or https:// URL with a host",
        ));
    }
    Ok(Some(value.to_owned()))
}
