//! Command-line arguments (clap derive).

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand, ValueEnum};
use podid_api::OperationMode;
use std::path::PathBuf;

/// podidctl: explain and migrate pod identities.
#[derive(Debug, Parser)]
#[command(name = "podidctl", version, about)]
pub struct Args {
    /// Path to the kubeconfig (default: $KUBECONFIG, ~/.kube/config, then in-cluster).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// nmi's operation mode on this cluster (`--operation-mode`).
    #[arg(long, global = true, default_value = "standard", value_parser = operation_mode())]
    pub operation_mode: OperationMode,
    /// nmi and mic run with `--forceNamespaced`.
    #[arg(long = "force-namespaced", global = true)]
    pub force_namespaced: bool,
    /// nmi runs with `--serve-workload-identity-pods`: pods labelled
    /// `azure.workload.identity/use: "true"` without a binding get their service account's
    /// identity through IMDS too.
    #[arg(long = "serve-workload-identity-pods", global = true)]
    pub serve_workload_identity_pods: bool,
    /// nmi's `--federated-default-tenant-id`: Workload Identity service accounts without
    /// `azure.workload.identity/tenant-id` are served in this tenant (without it nmi refuses them
    /// with 403). Only whether it is set matters here.
    #[arg(
        long = "federated-default-tenant-id",
        global = true,
        value_name = "TENANT"
    )]
    pub federated_default_tenant_id: Option<String>,
    /// nmi runs with `--allow-cross-namespace-secrets` (`doctor`: such references are then
    /// risks rather than refusals).
    #[arg(long = "allow-cross-namespace-secrets", global = true)]
    pub allow_cross_namespace_secrets: bool,
    /// nmi's `--allowed-authorities` (comma-separated URLs): authorities besides the Azure
    /// clouds' Entra hosts that identities may send credentials to.
    #[arg(long = "allowed-authorities", global = true, value_delimiter = ',')]
    pub allowed_authorities: Vec<url::Url>,
    /// The namespace podid is installed in (default: the namespace of the exception that
    /// matches podid's MIC label).
    #[arg(long = "release-namespace", global = true)]
    pub release_namespace: Option<String>,
    /// mic's `--config-map-name` (in the release namespace), where it records the identities
    /// it holds after their last pod (`status` lists them).
    #[arg(
        long = "mic-config-map",
        global = true,
        default_value = "aad-pod-identity-config"
    )]
    pub mic_config_map: String,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// `--operation-mode`: nmi's [`OperationMode`], listed with a line each in `--help`.
fn operation_mode() -> impl TypedValueParser<Value = OperationMode> {
    PossibleValuesParser::new(OperationMode::ALL.map(|mode| {
        PossibleValue::new(mode.as_str()).help(match mode {
            OperationMode::Standard => {
                "MIC assigns identities; nmi needs an `Assigned` AzureAssignedIdentity"
            }
            OperationMode::Managed => {
                "No MIC; bindings and identities in the pod's namespace decide"
            }
        })
    }))
    .try_map(|value| {
        OperationMode::parse(&value).ok_or_else(|| format!("unknown operation mode {value:?}"))
    })
}

/// Output format of `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// A table.
    Table,
    /// JSON (one document).
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Per namespace, which identity each pod gets by which path, or why none.
    Status {
        /// Namespace (default: the kubeconfig's namespace).
        #[arg(short, long, conflicts_with = "all_namespaces")]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The ordered steps (with rollback) that move one AzureIdentity to federated tokens.
    Migrate {
        /// The AzureIdentity's name.
        identity: String,
        /// The identity's namespace (default: the kubeconfig's namespace).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Service-account issuer (default: the API server's /.well-known/openid-configuration).
        #[arg(long)]
        issuer: Option<String>,
        /// Register one shared service account (`<name>` in the identity's namespace or
        /// `<namespace>/<name>`) instead of one subject per service account.
        #[arg(long)]
        shared_service_account: Option<String>,
        /// Tenant for type-0 identities (they carry no tenantID).
        #[arg(long)]
        tenant_id: Option<String>,
        /// Output format (`table` is the commented script).
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// What `<namespace>/<pod>` would get and why, with a fix for every problem (also
    /// `explain`); without a
    /// pod, every configuration in the cluster that weakens the namespace boundary or that nmi
    /// refuses because of it.
    #[command(alias = "explain")]
    Doctor {
        /// `<namespace>/<pod>`, or `<pod>` in `--namespace` (default: the kubeconfig's
        /// namespace); omit for the cluster-wide report.
        pod: Option<String>,
        /// The pod's namespace when `pod` names none.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}
