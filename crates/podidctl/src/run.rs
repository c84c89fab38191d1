//! Runs one subcommand against the cluster and returns its output text; [`main_as`] is the
//! whole program of both binaries (`podidctl` and the kubectl plugin `kubectl-podid`).

use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};

use podid_api::OperationMode;
use podid_select::matching::MatchOptions;

use crate::args::{Args, Command, Output};
use crate::cluster::{Cluster, Scope};
use crate::error::Error;
use crate::explain::{Explainer, Options, is_identity_pod};
use crate::render::{StatusDocument, doctor_text, status_table};

fn options(args: &Args) -> Options {
    Options {
        matching: MatchOptions {
            mode: args.operation_mode,
            force_namespaced: args.force_namespaced,
        },
        serve_workload_identity_pods: args.serve_workload_identity_pods,
        federated_default_tenant: args.federated_default_tenant_id.is_some(),
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Serializing plain report structs cannot fail (string keys, no custom serializers).
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

/// Runs the subcommand in `args` and returns what to print.
pub async fn run(args: Args) -> Result<String, Error> {
    let cluster = Cluster::connect(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
    let options = options(&args);
    let standard = options.matching.mode == OperationMode::Standard;
    match &args.command {
        Command::Status {
            namespace,
            all_namespaces,
            output,
        } => {
            let scope = if *all_namespaces {
                Scope::All
            } else {
                Scope::Namespace(
                    namespace
                        .clone()
                        .unwrap_or_else(|| cluster.default_namespace().to_owned()),
                )
            };
            let mut pods = cluster.pods(&scope).await?;
            pods.retain(is_identity_pod);
            pods.sort_by(|a, b| {
                (&a.metadata.namespace, &a.metadata.name)
                    .cmp(&(&b.metadata.namespace, &b.metadata.name))
            });
            let snapshot = cluster.snapshot(pods, &[]).await?;
            let explainer = Explainer::new(&snapshot, options);
            let reports: Vec<_> = snapshot.pods.iter().map(|p| explainer.explain(p)).collect();
            let held = if standard {
                let namespace = args
                    .release_namespace
                    .clone()
                    .or_else(|| crate::risks::shipped_exception_namespace(&snapshot.exceptions))
                    .unwrap_or_else(|| "default".to_owned());
                cluster
                    .held_identities(&namespace, &args.mic_config_map)
                    .await
            } else {
                Vec::new()
            };
            Ok(match output {
                Output::Table => {
                    status_table(&reports, standard) + &crate::render::held_table(&held)
                }
                Output::Json => to_json(&StatusDocument {
                    mode: options.matching.mode.as_str(),
                    force_namespaced: options.matching.force_namespaced,
                    pods: &reports,
                    held_identities: &held,
                }),
            })
        }
        Command::Doctor {
            pod: None, output, ..
        } => {
            let snapshot = cluster.snapshot(Vec::new(), &[]).await?;
            let report = crate::risks::risks(
                &snapshot,
                &crate::risks::RiskOptions {
                    allow_cross_namespace_secrets: args.allow_cross_namespace_secrets,
                    allowed_authorities: args.allowed_authorities.clone(),
                    release_namespace: args.release_namespace.clone(),
                },
            );
            Ok(match output {
                Output::Table => crate::render::risks_text(&report),
                Output::Json => to_json(&report),
            })
        }
        Command::Doctor {
            pod: Some(pod),
            namespace,
            output,
        } => {
            let default_namespace = namespace
                .as_deref()
                .unwrap_or_else(|| cluster.default_namespace());
            let (namespace, name) = match pod.split_once('/') {
                Some(parts) => parts,
                None => (default_namespace, pod.as_str()),
            };
            if namespace.is_empty() || name.is_empty() || name.contains('/') {
                return Err(Error::BadPodRef(pod.clone()));
            }
            let pod = cluster.pod(namespace, name).await?;
            let snapshot = cluster.snapshot(vec![pod], &[]).await?;
            let explainer = Explainer::new(&snapshot, options);
            let report = explainer.explain(&snapshot.pods[0]);
            Ok(match output {
                Output::Table => doctor_text(&report, standard),
                Output::Json => to_json(&report),
            })
        }
        Command::Migrate {
            identity,
            namespace,
            issuer,
            shared_service_account,
            tenant_id,
            output,
        } => {
            let namespace = namespace
                .clone()
                .unwrap_or_else(|| cluster.default_namespace().to_owned());
            let pods = cluster.pods(&Scope::All).await?;
            let extra: Vec<(String, String)> = shared_service_account
                .iter()
                .map(|s| match s.split_once('/') {
                    Some((ns, name)) => (ns.to_owned(), name.to_owned()),
                    None => (namespace.clone(), s.clone()),
                })
                .collect();
            let snapshot = cluster.snapshot(pods, &extra).await?;
            let target = snapshot
                .identities
                .iter()
                .find(|i| {
                    i.metadata.namespace.as_deref() == Some(namespace.as_str())
                        && i.metadata.name.as_deref() == Some(identity.as_str())
                })
                .ok_or_else(|| Error::IdentityNotFound {
                    namespace: namespace.clone(),
                    name: identity.clone(),
                })?;
            let issuer = match issuer {
                Some(issuer) => issuer.clone(),
                None => cluster.issuer().await?,
            };
            let explainer = Explainer::new(&snapshot, options);
            let plan = crate::migrate::plan(&crate::migrate::Input {
                identity: target,
                users: explainer.pods_using(&namespace, identity),
                service_accounts: &snapshot.service_accounts,
                issuer,
                shared_service_account: shared_service_account.clone(),
                tenant_id: tenant_id.clone(),
            });
            Ok(match output {
                Output::Table => crate::migrate::render(&plan),
                Output::Json => to_json(&plan),
            })
        }
    }
}

/// Parses the process arguments (usage shown as `bin_name`), runs the subcommand, prints its
/// output; one clear line and exit 1 on failure.
pub fn main_as(bin_name: &'static str) -> ExitCode {
    let matches = Args::command().bin_name(bin_name).get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", crate::error::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
