//! The `azure-sim` binary's flags and run loop: a world built from flags, the three services on
//! chosen addresses, and a JSON description of both (no secrets) on stdout.

use std::net::SocketAddr;

use anyhow::Context as _;
use serde_json::json;

use crate::{ArmHandle, Cloud, EntraHandle, ImdsHandle, serve_entra, serve_imds};

/// Flags of `azure-sim`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "azure-sim",
    about = "Simulated Entra ID, IMDS and ARM for podid tests"
)]
pub struct Args {
    /// Tenant id (random when absent).
    #[arg(long)]
    pub tenant_id: Option<String>,
    /// Address of the Entra token endpoint.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub entra_listen: SocketAddr,
    /// Address of ARM.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub arm_listen: SocketAddr,
    /// Address of the IMDS of instance 0 of `--vmss` (none when absent).
    #[arg(long)]
    pub imds_listen: Option<SocketAddr>,
    /// Scale set to create in the default subscription and resource group.
    #[arg(long, default_value = "aks-nodepool1-vmss")]
    pub vmss: String,
    /// User-assigned identity to create (repeatable).
    #[arg(long = "identity")]
    pub identities: Vec<String>,
    /// Identity (by name) to assign to the scale set at start (repeatable).
    #[arg(long = "assign")]
    pub assign: Vec<String>,
    /// Service principal `NAME:SECRET` to create (repeatable); the secret is never printed.
    #[arg(long = "service-principal")]
    pub service_principals: Vec<String>,
    /// Seconds a PATCH's long-running operation stays in progress.
    #[arg(long, default_value_t = 0)]
    pub operation_seconds: u64,
    /// How long a PATCH's long-running operation stays in progress, with a unit (`30s`,
    /// `2.5s`, `500ms`); overrides `--operation-seconds`.
    #[arg(long, value_parser = parse_duration)]
    pub operation_duration: Option<std::time::Duration>,
}

/// `30s`, `2.5s`, `500ms`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("invalid duration {text:?} (want e.g. 30s or 500ms)");
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(bad());
    };
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    if !value.is_finite() || value < 0.0 || value * scale > 86_400.0 {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs_f64(value * scale))
}

/// Validated configuration.
#[derive(Clone)]
pub struct Config {
    args: Args,
    service_principals: Vec<(String, String)>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .service_principals
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        f.debug_struct("Config")
            .field("args", &self.args)
            .field("service_principals", &names)
            .finish()
    }
}

impl Config {
    /// Checks the flags before anything is bound.
    pub fn from_args(args: Args) -> anyhow::Result<Self> {
        let mut sps = Vec::new();
        for sp in &args.service_principals {
            let (name, secret) = sp
                .split_once(':')
                .filter(|(n, s)| !n.is_empty() && !s.is_empty())
                .context("--service-principal must be NAME:SECRET")?;
            sps.push((name.to_owned(), secret.to_owned()));
        }
        for a in &args.assign {
            anyhow::ensure!(
                args.identities.contains(a),
                "--assign {a}: no --identity {a}"
            );
        }
        let mut args = args;
        args.service_principals.clear();
        Ok(Self {
            args,
            service_principals: sps,
        })
    }
}

/// The running services.
#[derive(Debug)]
pub struct Running {
    /// The world.
    pub cloud: Cloud,
    /// Entra.
    pub entra: EntraHandle,
    /// ARM.
    pub arm: ArmHandle,
    /// IMDS of the scale set's instance 0, when asked for.
    pub imds: Option<ImdsHandle>,
    /// Description printed on stdout.
    pub description: serde_json::Value,
}

/// Builds the world and starts the services. Must be called inside a tokio runtime.
pub fn start(config: &Config) -> anyhow::Result<Running> {
    let a = &config.args;
    let cloud = match &a.tenant_id {
        Some(t) => Cloud::with_tenant(t)?,
        None => Cloud::new()?,
    };
    let vmss = cloud.add_vmss(cloud.subscription_id(), cloud.resource_group(), &a.vmss);
    let mut identities = Vec::new();
    for name in &a.identities {
        let id = cloud.add_user_assigned_identity(name);
        if a.assign.contains(name) {
            cloud.assign_identity(&vmss, &id)?;
        }
        identities.push(json!({
            "name": id.name, "resource_id": id.resource_id,
            "client_id": id.client_id, "principal_id": id.principal_id,
        }));
    }
    let mut sps = Vec::new();
    for (name, secret) in &config.service_principals {
        let sp = cloud.add_service_principal(name);
        cloud.add_client_secret_value(&sp.client_id, secret)?;
        sps.push(json!({"name": name, "client_id": sp.client_id, "object_id": sp.object_id}));
    }
    let bind = |addr: SocketAddr| {
        std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))
    };
    let entra = serve_entra(&cloud, bind(a.entra_listen)?)?;
    let arm = ArmHandle::builder()
        .operation_duration(
            a.operation_duration
                .unwrap_or(std::time::Duration::from_secs(a.operation_seconds)),
        )
        .serve(&cloud, bind(a.arm_listen)?)?;
    let imds = match a.imds_listen {
        Some(addr) => Some(serve_imds(&cloud, &vmss.instance("0"), bind(addr)?)?),
        None => None,
    };
    let description = json!({
        "tenant_id": cloud.tenant_id(),
        "subscription_id": cloud.subscription_id(),
        "resource_group": cloud.resource_group(),
        "entra_url": entra.url(),
        "arm_url": arm.url(),
        "imds_url": imds.as_ref().map(ImdsHandle::url),
        "vmss": vmss.resource_id(),
        "identities": identities,
        "service_principals": sps,
    });
    Ok(Running {
        cloud,
        entra,
        arm,
        imds,
        description,
    })
}

/// Starts everything, prints the description, and serves until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let running = start(&config)?;
    println!("{}", running.description);
    tracing::info!(entra = %running.entra.url(), arm = %running.arm.url(), "azure-sim serving");
    shutdown.await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn operation_durations_take_a_unit() {
        let parse = |text: &str| {
            Args::try_parse_from(["azure-sim", "--operation-duration", text])
                .map(|a| a.operation_duration)
        };
        assert_eq!(
            parse("30s").ok().flatten(),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(
            parse("2.5s").ok().flatten(),
            Some(std::time::Duration::from_millis(2500))
        );
        assert_eq!(
            parse("500ms").ok().flatten(),
            Some(std::time::Duration::from_millis(500))
        );
        for bad in ["30", "-1s", "xs", "1e9s"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_flags_fail_before_binding() {
        let args =
            Args::try_parse_from(["azure-sim", "--service-principal", "nosecret"]).expect("parses");
        assert!(Config::from_args(args).is_err());
        let args = Args::try_parse_from(["azure-sim", "--assign", "ghost"]).expect("parses");
        assert!(Config::from_args(args).is_err());
    }

    #[tokio::test]
    async fn start_builds_the_world_and_hides_secrets() {
        let args = Args::try_parse_from([
            "azure-sim",
            "--identity",
            "web",
            "--assign",
            "web",
            "--service-principal",
            "mic:s3cret-value",
            "--imds-listen",
            "127.0.0.1:0",
        ])
        .expect("parses");
        let config = Config::from_args(args).expect("valid");
        assert!(!format!("{config:?}").contains("s3cret-value"));
        let running = start(&config).expect("start");
        let d = running.description.to_string();
        assert!(!d.contains("s3cret-value"));
        assert_eq!(running.description["identities"][0]["name"], "web");
        assert!(running.imds.is_some());
        let vmss = running.description["vmss"]
            .as_str()
            .expect("vmss")
            .to_owned();
        let ids = running
            .cloud
            .assigned_identities(&crate::ComputeRef {
                kind: crate::ComputeKind::Vmss,
                subscription_id: running.cloud.subscription_id().to_owned(),
                resource_group: running.cloud.resource_group().to_owned(),
                name: "aks-nodepool1-vmss".to_owned(),
                instance_id: None,
            })
            .expect("ids");
        assert_eq!(ids.len(), 1);
        assert!(vmss.ends_with("/aks-nodepool1-vmss"));
    }
}
