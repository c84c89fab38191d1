//! Every `mic` flag, its upstream default, the env twins and the refusals.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use podid_mic::config::{Config, ConfigError, Flags, LogFormat, user_agent, version_line};

const NS_ENV: &[(&str, &str)] = &[("MIC_POD_NAMESPACE", "kube-system")];

fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Config, String> {
    let flags = Flags::parse_go(std::iter::once("mic").chain(args.iter().copied()))
        .map_err(|e| e.to_string())?;
    flags
        .into_config_with_env(
            |name| {
                env.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            },
            "mic-7d9f-abcde",
        )
        .map_err(|e| e.to_string())
}

fn parse(args: &[&str]) -> Result<Config, String> {
    parse_env(args, NS_ENV)
}

#[test]
fn defaults_are_upstreams() {
    let c = parse(&[]).expect("valid");
    assert_eq!(c.kubeconfig, None);
    assert_eq!(c.cloud_config, None);
    assert_eq!(c.pod_namespace, "kube-system");
    assert!(!c.namespaced);
    assert_eq!(c.sync_retry_interval, Duration::from_secs(3600));
    assert_eq!(c.leader_election_instance, "mic-7d9f-abcde");
    assert_eq!(c.leader_election_namespace, "default");
    assert_eq!(c.leader_election_name, "aad-pod-identity-mic");
    assert_eq!(c.leader_election_duration, Duration::from_secs(15));
    assert_eq!(c.probe_port, 8080);
    assert_eq!(c.prometheus_port, 8888);
    assert!(!c.profile_requested);
    assert!(!c.scale_features_requested);
    assert_eq!(c.create_delete_batch, 20);
    assert_eq!(c.client_qps, 5.0);
    assert_eq!(c.client_burst, 5);
    assert!(c.immutable_client_ids.is_empty());
    assert_eq!(c.config_map_name, "aad-pod-identity-config");
    assert_eq!(c.type_upgrade_status_key, "type-upgrade-status");
    assert!(c.type_upgrade);
    assert_eq!(c.update_user_msi_max_retry, 2);
    assert_eq!(c.update_user_msi_retry_interval, Duration::from_secs(1));
    assert_eq!(
        c.identity_assignment_reconcile_interval,
        Duration::from_secs(180)
    );
    assert_eq!(c.log_format, LogFormat::Text);
    assert_eq!(c.verbosity, 0);
    assert_eq!(c.custom_user_agent, None);
    assert_eq!(c.endpoints.arm, None);
    assert_eq!(c.endpoints.aad_authority, None);
    assert_eq!(c.endpoints.imds, "http://169.254.169.254");
    assert!(c.release_finished_pods);
    assert!(c.upstream_leader_lock);
}

#[test]
fn every_flag_is_honoured() {
    let c = parse(&[
        "--kubeconfig=/var/lib/kubelet/kubeconfig",
        "--cloudconfig=/etc/kubernetes/azure.json",
        "--forceNamespaced",
        "--syncRetryDuration=90s",
        "--leader-election-instance=mic-0",
        "--leader-election-namespace=kube-system",
        "--leader-election-name=lock",
        "--leader-election-duration=30s",
        "--http-probe-port=8081",
        "--prometheus-port=9999",
        "--enableProfile=true",
        "--enableScaleFeatures",
        "--createDeleteBatch=7",
        "--clientQps=12.7",
        "--immutable-user-msis=AAAA-1, bbbb-2,,",
        "--config-map-name=cm",
        "--type-upgrade-status-key=k",
        "--enable-type-upgrade=false",
        "--update-user-msi-max-retry=0",
        "--update-user-msi-retry-interval=250ms",
        "--identity-assignment-reconcile-interval=1m30s",
        "--log-format=json",
        "--custom-user-agent=acme",
        "--arm-endpoint=http://127.0.0.1:4000",
        "--aad-authority=http://127.0.0.1:4001/",
        "--imds-endpoint=http://127.0.0.1:4002",
        "--release-finished-pods=false",
        "--upstream-leader-lock=false",
        "-v=5",
        "--logtostderr",
        "--log_dir=/tmp",
    ])
    .expect("valid");
    assert_eq!(
        c.kubeconfig,
        Some(PathBuf::from("/var/lib/kubelet/kubeconfig"))
    );
    assert_eq!(
        c.cloud_config,
        Some(PathBuf::from("/etc/kubernetes/azure.json"))
    );
    assert!(c.namespaced);
    assert_eq!(c.sync_retry_interval, Duration::from_secs(90));
    assert_eq!(c.leader_election_instance, "mic-0");
    assert_eq!(c.leader_election_namespace, "kube-system");
    assert_eq!(c.leader_election_name, "lock");
    assert_eq!(c.leader_election_duration, Duration::from_secs(30));
    assert_eq!(c.probe_port, 8081);
    assert_eq!(c.prometheus_port, 9999);
    assert!(c.profile_requested);
    assert!(c.scale_features_requested);
    assert_eq!(c.create_delete_batch, 7);
    assert_eq!(c.client_qps, 12.7);
    assert_eq!(c.client_burst, 12);
    assert_eq!(
        c.immutable_client_ids,
        BTreeSet::from(["aaaa-1".to_owned(), "bbbb-2".to_owned()])
    );
    assert_eq!(c.config_map_name, "cm");
    assert_eq!(c.type_upgrade_status_key, "k");
    assert!(!c.type_upgrade);
    assert_eq!(c.update_user_msi_max_retry, 0);
    assert_eq!(c.update_user_msi_retry_interval, Duration::from_millis(250));
    assert_eq!(
        c.identity_assignment_reconcile_interval,
        Duration::from_secs(90)
    );
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.verbosity, 5);
    assert_eq!(c.custom_user_agent.as_deref(), Some("acme"));
    assert_eq!(c.endpoints.arm.as_deref(), Some("http://127.0.0.1:4000"));
    assert_eq!(
        c.endpoints.aad_authority.as_deref(),
        Some("http://127.0.0.1:4001/")
    );
    assert_eq!(c.endpoints.imds, "http://127.0.0.1:4002");
    assert!(!c.release_finished_pods);
    assert!(!c.upstream_leader_lock);
}

#[test]
fn go_single_dash_flags_and_space_separated_values() {
    let c = parse(&[
        "-kubeconfig",
        "/k",
        "-forceNamespaced=true",
        "-syncRetryDuration=1h",
        "--createDeleteBatch",
        "3",
    ])
    .expect("valid");
    assert_eq!(c.kubeconfig, Some(PathBuf::from("/k")));
    assert!(c.namespaced);
    assert_eq!(c.sync_retry_interval, Duration::from_secs(3600));
    assert_eq!(c.create_delete_batch, 3);
}

#[test]
fn env_twins() {
    let c = parse_env(
        &[],
        &[("MIC_POD_NAMESPACE", "ns"), ("FORCENAMESPACED", "true")],
    )
    .expect("valid");
    assert!(c.namespaced);
    // Upstream compares FORCENAMESPACED with "true" exactly.
    let c = parse_env(
        &[],
        &[("MIC_POD_NAMESPACE", "ns"), ("FORCENAMESPACED", "True")],
    )
    .expect("valid");
    assert!(!c.namespaced);
}

#[test]
fn pod_namespace_is_mandatory_with_upstreams_message() {
    for env in [&[][..], &[("MIC_POD_NAMESPACE", "  ")][..]] {
        let err = parse_env(&[], env).expect_err("must be refused");
        assert_eq!(
            err,
            "namespace not specified. Please add meta.namespace as env variable MIC_POD_NAMESPACE"
        );
    }
    let flags = Flags::parse_go(["mic"]).expect("parses");
    assert_eq!(
        flags.into_config_with_env(|_| None, "h"),
        Err(ConfigError::MissingPodNamespace)
    );
}

#[test]
fn instance_falls_back_to_hostname_and_needs_one() {
    let flags = Flags::parse_go(["mic"]).expect("parses");
    let err = flags
        .into_config_with_env(|_| Some("ns".to_owned()), "")
        .expect_err("no instance");
    assert!(
        err.to_string().contains("--leader-election-instance"),
        "{err}"
    );
}

#[test]
fn bad_values_name_the_flag() {
    for (arg, needle) in [
        ("--syncRetryDuration=3600", "--syncRetryDuration"),
        ("--syncRetryDuration=0s", "--syncRetryDuration"),
        (
            "--leader-election-duration=-1s",
            "--leader-election-duration",
        ),
        (
            "--update-user-msi-retry-interval=soon",
            "--update-user-msi-retry-interval",
        ),
        (
            "--identity-assignment-reconcile-interval=0",
            "--identity-assignment-reconcile-interval",
        ),
        ("--http-probe-port=0", "--http-probe-port"),
        ("--prometheus-port=65536", "--prometheus-port"),
        ("--createDeleteBatch=0", "--createDeleteBatch"),
        ("--createDeleteBatch=-2", "--createDeleteBatch"),
        ("--clientQps=0", "--clientQps"),
        ("--clientQps=-1.5", "--clientQps"),
        (
            "--update-user-msi-max-retry=-1",
            "--update-user-msi-max-retry",
        ),
        ("--log-format=xml", "--log-format"),
        ("--leader-election-name=", "--leader-election-name"),
        ("--arm-endpoint=management.azure.com", "--arm-endpoint"),
        ("--aad-authority=https://", "--aad-authority"),
        ("--imds-endpoint=", "--imds-endpoint"),
        ("--forceNamespaced=maybe", "forceNamespaced"),
        ("--enable-type-upgrade=yes", "enable-type-upgrade"),
        ("--clientQps=fast", "clientQps"),
    ] {
        let err = parse(&[arg]).expect_err(arg);
        assert!(err.contains(needle), "{arg}: {err}");
    }
    assert!(parse(&["--no-such-flag"]).is_err());
}

#[test]
fn clientqps_below_one_still_has_a_burst() {
    let c = parse(&["--clientQps=0.5"]).expect("valid");
    assert_eq!(c.client_burst, 1);
}

#[test]
fn version_line_has_upstreams_shape() {
    let flags = Flags::parse_go(["mic", "--version"]).expect("parses");
    assert!(flags.version);
    let line = version_line();
    assert!(line.starts_with("MIC Version: "), "{line}");
    assert!(line.contains(" - NMI Version: ") && line.contains(" - Commit: "));
    assert!(line.contains(" - Date: "));
    assert_eq!(user_agent(Some("x")), format!("{} x", user_agent(None)));
    assert!(user_agent(None).starts_with("podid/MIC/"));
}
