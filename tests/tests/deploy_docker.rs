//! The Dockerfiles build the right binaries in a multi-stage build on pinned bases, and MIC's image
//! runs as non-root. Checked textually: no image is built here.

use std::path::Path;

fn dockerfile(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .join("deploy/docker")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Images named by `FROM` and by `ARG …_IMAGE=` defaults.
fn base_images(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            l.strip_prefix("ARG ")
                .and_then(|a| a.split_once("_IMAGE="))
                .map(|(_, image)| image.to_owned())
        })
        .collect()
}

fn check(name: &str, package: &str, bin: &str) -> String {
    let text = dockerfile(name);
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
    let images = base_images(&text);
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
    text
}

/// Packages installed with `apt-get install` in the runtime stage (after the last `FROM`).
fn runtime_packages(text: &str) -> Vec<String> {
    let runtime = text
        .rsplit_once("\nFROM ")
        .map(|(_, r)| r)
        .unwrap_or_default();
    let joined = runtime.replace("\\\n", " ");
    joined
        .lines()
        .filter_map(|l| l.split_once("apt-get install").map(|(_, rest)| rest))
        .flat_map(|rest| {
            rest.split("&&")
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .filter(|w| !w.starts_with('-'))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn nmi_image_builds_nmi_on_an_iptables_base_with_a_ca_bundle() {
    let text = check("nmi.Dockerfile", "podid-nmi", "nmi");
    assert!(
        base_images(&text)[1].contains("iptables"),
        "nmi needs iptables"
    );
    // The debian-iptables base ships iptables and conntrack but no CA bundle; without one,
    // nmi's HTTPS client cannot verify Entra and type 1, 2 and federated identities fail.
    let packages = runtime_packages(&text);
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
    let text = check("mic.Dockerfile", "podid-mic", "mic");
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "USER {user}"
    );
}
