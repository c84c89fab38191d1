//! The Dockerfiles build the right binaries in a multi-stage build on pinned bases, and MIC's image
//! runs as non-root. Checked textually here; `image_rootfs.rs` builds each image's root
//! filesystem from the package set derived below and runs the binaries inside it.

use std::path::Path;

use podid_e2e::image::{Dockerfile, RootfsSpec, runtime_packages};

fn dockerfile(name: &str) -> Dockerfile {
    Dockerfile::read(name).unwrap_or_else(|e| panic!("{e:#}"))
}

fn check(name: &str, package: &str, bin: &str) -> Dockerfile {
    let file = dockerfile(name);
    let text = file.text();
    let froms = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert_eq!(froms, 2, "{name}: builder + runtime stages");
    assert!(
        text.contains(&format!(
            "cargo build --release --locked -p {package} --bin {bin}"
        )),
        "{name}: builds {package}/{bin}"
    );
    assert!(
        text.contains(&format!("ENTRYPOINT [\"/usr/local/bin/{bin}\"]")),
        "{name}: entrypoint"
    );
    let images = file.base_images();
    assert_eq!(images.len(), 2, "{name}: {images:?}");
    for image in &images {
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
        assert!(
            !tag.is_empty() && tag != "latest" && !image.ends_with(":slim"),
            "{name}: base {image} must be pinned"
        );
    }
    let toolchain = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../rust-toolchain.toml"),
    )
    .expect("rust-toolchain.toml");
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|c| c.trim_matches('"').to_owned())
        .expect("channel");
    assert!(
        images[0].contains(&format!("rust:{channel}-")),
        "{name}: builder {} must use the pinned toolchain {channel}",
        images[0]
    );
    file
}

#[test]
fn nmi_image_builds_nmi_on_an_iptables_base_with_a_ca_bundle() {
    let file = check("nmi.Dockerfile", "podid-nmi", "nmi");
    assert!(
        file.base_images()[1].contains("iptables"),
        "nmi needs iptables"
    );
    // The debian-iptables base ships iptables and conntrack but no CA bundle; without one,
    // nmi's HTTPS client cannot verify Entra and type 1, 2 and federated identities fail.
    let packages = file.runtime_packages();
    assert!(
        packages.iter().any(|p| p == "ca-certificates"),
        "nmi's runtime stage must install ca-certificates: {packages:?}"
    );
}

#[test]
fn runtime_packages_reads_the_last_stage_only() {
    let text = "FROM a AS b\nRUN apt-get install -y curl\nFROM c\nRUN apt-get update \\\n && apt-get install -y --no-install-recommends ca-certificates tzdata \\\n && rm -rf x\n";
    assert_eq!(runtime_packages(text), ["ca-certificates", "tzdata"]);
}

#[test]
fn mic_image_builds_mic_and_runs_as_non_root() {
    let file = check("mic.Dockerfile", "podid-mic", "mic");
    let user = file.user().expect("USER");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "USER {user}"
    );
}

#[test]
fn the_package_sets_follow_the_dockerfiles() {
    let nmi = RootfsSpec::for_image("nmi", &dockerfile("nmi.Dockerfile")).expect("nmi");
    assert_eq!(nmi.variant, "essential");
    assert_eq!(nmi.packages, ["ca-certificates", "conntrack", "iptables"]);
    let mic = RootfsSpec::for_image("mic", &dockerfile("mic.Dockerfile")).expect("mic");
    assert_eq!(mic.variant, "extract");
    assert_eq!(
        mic.packages,
        ["ca-certificates", "libc6", "libgcc-s1", "libssl3", "tzdata"]
    );
    // A runtime stage that stops installing ca-certificates builds a root without it.
    let text = dockerfile("nmi.Dockerfile")
        .text()
        .replace("ca-certificates", "netbase");
    let changed =
        RootfsSpec::for_image("nmi", &Dockerfile::parse("nmi.Dockerfile", &text)).expect("changed");
    assert_eq!(changed.packages, ["conntrack", "iptables", "netbase"]);
    assert_ne!(
        changed.key(),
        nmi.key(),
        "a new package set is a new cache entry"
    );
    // A base nobody described is an error, not a guess.
    let text = dockerfile("mic.Dockerfile")
        .text()
        .replace("gcr.io/distroless/cc-debian12", "docker.io/library/alpine");
    let error = RootfsSpec::for_image("mic", &Dockerfile::parse("mic.Dockerfile", &text))
        .expect_err("unknown base");
    assert!(error.to_string().contains("BASES"), "{error}");
}

#[test]
fn user_and_entrypoint_are_read_from_the_runtime_stage() {
    let nmi = dockerfile("nmi.Dockerfile");
    assert_eq!(nmi.user().as_deref(), Some("0:0"));
    assert_eq!(nmi.entrypoint().expect("entrypoint"), "/usr/local/bin/nmi");
    let mic = dockerfile("mic.Dockerfile");
    assert_eq!(mic.user().as_deref(), Some("65532:65532"));
    assert_eq!(mic.entrypoint().expect("entrypoint"), "/usr/local/bin/mic");
}
