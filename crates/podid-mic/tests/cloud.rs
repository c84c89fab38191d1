//! azure.json parsing, the environment fallback, endpoints and overrides, secrets kept out of
//! every printed form.

use std::path::{Path, PathBuf};

use podid_mic::cloud::{
    ArmCredential, AzureEnvironment, CloudConfig, CloudConfigSource, CloudError, Endpoints,
};
use podid_mic::config::EndpointOverrides;

const AKS_MSI: &str = r#"{
    "cloud": "AzurePublicCloud",
    "tenantId": "72f988bf-0000-0000-0000-000000000000",
    "subscriptionId": "sub-1",
    "aadClientId": "msi",
    "aadClientSecret": "msi",
    "resourceGroup": "MC_rg_aks_westeurope",
    "location": "westeurope",
    "vmType": "vmss",
    "subnetName": "aks-subnet",
    "securityGroupName": "aks-agentpool-nsg",
    "cloudProviderBackoffRetries": 6,
    "useManagedIdentityExtension": true,
    "userAssignedIdentityID": "AAAA0000-0000-0000-0000-00000000000C",
    "useInstanceMetadata": true
}"#;

const SP: &str = r#"{
    "cloud": "AzureChinaCloud",
    "tenantId": "t-1",
    "subscriptionId": "sub-2",
    "aadClientId": "app-1",
    "aadClientSecret": "s3cr3t-VALUE",
    "resourceGroup": "nodes",
    "vmType": "standard",
    "useManagedIdentityExtension": false
}"#;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("podid-mic-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        Self(dir)
    }

    fn write(&self, name: &str, content: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).expect("write");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn aks_managed_identity_file() {
    let dir = TempDir::new("aks");
    let path = dir.write("azure.json", AKS_MSI);
    let c = CloudConfig::load(Some(&path), no_env).expect("valid");
    assert_eq!(c.source, Some(CloudConfigSource::File(path.clone())));
    assert_eq!(c.cloud, "AzurePublicCloud");
    assert_eq!(c.tenant_id, "72f988bf-0000-0000-0000-000000000000");
    assert_eq!(c.subscription_id, "sub-1");
    assert_eq!(c.client_id, "msi");
    assert_eq!(c.client_secret.expose(), "msi");
    assert_eq!(c.resource_group, "MC_rg_aks_westeurope");
    assert_eq!(c.vm_type, "vmss");
    assert_eq!(c.security_group_name, "aks-agentpool-nsg");
    assert!(c.use_managed_identity);
    assert_eq!(
        c.cluster_identity().as_deref(),
        Some("aaaa0000-0000-0000-0000-00000000000c")
    );
    assert_eq!(
        c.credential().expect("usable"),
        ArmCredential::ManagedIdentity {
            client_id: Some("AAAA0000-0000-0000-0000-00000000000C".to_owned())
        }
    );
}

#[test]
fn service_principal_file_and_its_secret_never_printed() {
    let c = CloudConfig::parse(SP).expect("valid");
    assert!(!c.use_managed_identity);
    assert_eq!(c.cluster_identity(), None);
    let cred = c.credential().expect("usable");
    match &cred {
        ArmCredential::ClientSecret {
            tenant_id,
            client_id,
            secret,
        } => {
            assert_eq!(tenant_id, "t-1");
            assert_eq!(client_id, "app-1");
            assert_eq!(secret.expose(), "s3cr3t-VALUE");
        }
        other => panic!("want a client secret credential, got {other:?}"),
    }
    for printed in [format!("{c:?}"), format!("{cred:?}"), format!("{c:#?}")] {
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
    }
}

#[test]
fn yaml_is_accepted_like_upstreams_parser() {
    let c = CloudConfig::parse(
        "cloud: AzureCloud\nresourceGroup: rg\nuseManagedIdentityExtension: true\n",
    )
    .expect("valid yaml");
    assert_eq!(c.cloud, "AzureCloud");
    assert_eq!(c.resource_group, "rg");
    assert!(c.use_managed_identity);
}

#[test]
fn keys_are_case_sensitive() {
    let c = CloudConfig::parse(r#"{"TenantId": "x", "ResourceGroup": "rg"}"#).expect("valid");
    assert_eq!(c.tenant_id, "");
    assert_eq!(c.resource_group, "");
}

#[test]
fn malformed_file_names_file_and_field_without_values() {
    let dir = TempDir::new("bad");
    let path = dir.write(
        "azure.json",
        "{\n  \"cloud\": \"AzurePublicCloud\",\n  \"useManagedIdentityExtension\": \"s3cr3t\"\n}",
    );
    let err = CloudConfig::from_file(&path).expect_err("wrong type");
    let text = err.to_string();
    assert!(matches!(err, CloudError::Parse { .. }), "{err:?}");
    assert!(text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("useManagedIdentityExtension"), "{text}");
    assert!(!text.contains("s3cr3t"), "{text}");

    let path = dir.write("broken.json", "{\"cloud\": \"AzurePublicCloud\",");
    let text = CloudConfig::from_file(&path)
        .expect_err("not json")
        .to_string();
    assert!(text.starts_with("failed to parse cloud config "), "{text}");
    assert!(text.contains("broken.json"), "{text}");

    let path = dir.write("empty.json", "  \n");
    let text = CloudConfig::from_file(&path)
        .expect_err("empty")
        .to_string();
    assert!(
        text.contains("empty.json") && text.contains("empty"),
        "{text}"
    );

    let path = dir.write("tenant.json", "{\"tenantId\": {\"nested\": 1}}");
    let text = CloudConfig::from_file(&path)
        .expect_err("an object")
        .to_string();
    assert!(text.contains("tenantId"), "{text}");
}

#[test]
fn missing_file_is_an_error_not_the_env_fallback() {
    let path = Path::new("/nonexistent/podid/azure.json");
    let err = CloudConfig::load(Some(path), |_| Some("x".to_owned())).expect_err("missing");
    assert!(matches!(err, CloudError::Read { .. }));
    assert_eq!(
        err.to_string(),
        "failed to read cloud config /nonexistent/podid/azure.json"
    );
}

#[test]
fn env_fallback_without_cloudconfig() {
    let env = |name: &str| {
        Some(
            match name {
                "CLOUD" => "AzureUSGovernment",
                "TENANT_ID" => "t",
                "CLIENT_ID" => "c",
                "CLIENT_SECRET" => "env-s3cr3t",
                "SUBSCRIPTION_ID" => "s",
                "RESOURCE_GROUP" => "rg",
                "VM_TYPE" => "vmss",
                "USE_MSI" => "TRUE",
                "USER_ASSIGNED_MSI_CLIENT_ID" => "Cluster-Id",
                _ => return None,
            }
            .to_owned(),
        )
    };
    let c = CloudConfig::load(None, env).expect("valid");
    assert_eq!(c.source, Some(CloudConfigSource::Environment));
    assert_eq!(c.cloud, "AzureUSGovernment");
    assert_eq!(c.tenant_id, "t");
    assert_eq!(c.client_id, "c");
    assert_eq!(c.client_secret.expose(), "env-s3cr3t");
    assert_eq!(c.subscription_id, "s");
    assert_eq!(c.resource_group, "rg");
    assert_eq!(c.vm_type, "vmss");
    assert!(c.use_managed_identity, "USE_MSI is compared ignoring case");
    assert_eq!(c.cluster_identity().as_deref(), Some("cluster-id"));
    assert!(!format!("{c:?}").contains("env-s3cr3t"));

    let c = CloudConfig::from_env(|name| (name == "USE_MSI").then(|| "1".to_owned()));
    assert!(!c.use_managed_identity, "only the word true counts");
}

#[test]
fn missing_values_name_the_key_or_variable() {
    let c = CloudConfig::parse(r#"{"cloud":"AzureCloud","subscriptionId":"s"}"#).expect("valid");
    let text = c.credential().expect_err("no rg").to_string();
    assert!(text.contains("resourceGroup is required"), "{text}");

    let c = CloudConfig::from_env(|name| {
        matches!(
            name,
            "SUBSCRIPTION_ID" | "RESOURCE_GROUP" | "TENANT_ID" | "CLIENT_ID"
        )
        .then(|| "v".to_owned())
    });
    let text = c.credential().expect_err("no secret").to_string();
    assert!(
        text.contains("environment") && text.contains("CLIENT_SECRET"),
        "{text}"
    );
}

#[test]
fn cloud_names_as_autorest() {
    for (name, arm, aad) in [
        (
            "AzurePublicCloud",
            "https://management.azure.com/",
            "https://login.microsoftonline.com/",
        ),
        (
            "azurecloud",
            "https://management.azure.com/",
            "https://login.microsoftonline.com/",
        ),
        (
            "AzureChinaCloud",
            "https://management.chinacloudapi.cn/",
            "https://login.chinacloudapi.cn/",
        ),
        (
            "AZUREGERMANCLOUD",
            "https://management.microsoftazure.de/",
            "https://login.microsoftonline.de/",
        ),
        (
            "AzureUSGovernment",
            "https://management.usgovcloudapi.net/",
            "https://login.microsoftonline.us/",
        ),
        (
            "AzureUSGovernmentCloud",
            "https://management.usgovcloudapi.net/",
            "https://login.microsoftonline.us/",
        ),
    ] {
        let e = AzureEnvironment::from_name(name, no_env).expect(name);
        assert_eq!(e.resource_manager_endpoint, arm, "{name}");
        assert_eq!(e.active_directory_endpoint, aad, "{name}");
    }
    for bad in ["", "Mars"] {
        assert_eq!(
            AzureEnvironment::from_name(bad, no_env)
                .expect_err(bad)
                .to_string(),
            format!("autorest/azure: There is no cloud environment matching the name {bad:?}")
        );
    }
}

#[test]
fn azure_stack_reads_the_environment_file() {
    let dir = TempDir::new("stack");
    let path = dir.write(
        "akscustom.json",
        r#"{"name":"AzureStackCloud","resourceManagerEndpoint":"https://management.local.azurestack.external/","activeDirectoryEndpoint":"https://login.local/adfs/","managementPortalURL":"x"}"#,
    );
    let p = path.display().to_string();
    let e = AzureEnvironment::from_name("AzureStackCloud", |name| {
        (name == "AZURE_ENVIRONMENT_FILEPATH").then(|| p.clone())
    })
    .expect("valid");
    assert_eq!(
        e.resource_manager_endpoint,
        "https://management.local.azurestack.external/"
    );
    assert_eq!(e.active_directory_endpoint, "https://login.local/adfs/");
    let err = AzureEnvironment::from_name("AzureStackCloud", no_env).expect_err("unset");
    assert!(
        err.to_string().contains("AZURE_ENVIRONMENT_FILEPATH"),
        "{err}"
    );
}

#[test]
fn endpoints_and_overrides() {
    let cloud = CloudConfig::parse(AKS_MSI).expect("valid");
    let defaults = EndpointOverrides {
        arm: None,
        aad_authority: None,
        imds: "http://169.254.169.254".to_owned(),
    };
    let e = Endpoints::resolve(&cloud, &defaults, no_env).expect("valid");
    assert_eq!(e.arm, "https://management.azure.com");
    assert_eq!(e.arm_resource, "https://management.azure.com/");
    assert_eq!(e.aad_authority, "https://login.microsoftonline.com");
    assert_eq!(e.imds, "http://169.254.169.254");

    let sims = EndpointOverrides {
        arm: Some("http://127.0.0.1:9001/".to_owned()),
        aad_authority: Some("http://127.0.0.1:9002".to_owned()),
        imds: "http://127.0.0.1:9003/".to_owned(),
    };
    let e = Endpoints::resolve(&cloud, &sims, no_env).expect("valid");
    assert_eq!(e.arm, "http://127.0.0.1:9001");
    assert_eq!(e.arm_resource, "https://management.azure.com/");
    assert_eq!(e.aad_authority, "http://127.0.0.1:9002");
    assert_eq!(e.imds, "http://127.0.0.1:9003");

    // With both overrides the cloud name may be empty; with one it may not.
    let nameless = CloudConfig::parse(r#"{"resourceGroup":"rg"}"#).expect("valid");
    assert!(Endpoints::resolve(&nameless, &sims, no_env).is_ok());
    let half = EndpointOverrides {
        aad_authority: None,
        ..sims
    };
    assert!(matches!(
        Endpoints::resolve(&nameless, &half, no_env),
        Err(CloudError::UnknownCloud(_))
    ));
}
