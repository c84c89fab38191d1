//! The container images of `deploy/docker`, rebuilt from Debian packages so the real binaries
//! can run inside them on a machine without a container engine or registry.
//!
//! * [`Dockerfile`] reads what a Dockerfile says: its runtime base image, the packages its runtime
//!   stage installs, its `USER` and `ENTRYPOINT`.
//! * [`RootfsSpec::for_image`] turns that into a Debian bookworm package set: the base image's own
//!   packages ([`BASES`]) plus the runtime stage's `apt-get install` list, so a Dockerfile that
//!   drops a package builds a root filesystem without it.
//! * [`cached_rootfs`] builds it with `mmdebstrap` once and keeps it under
//!   `target/image-rootfs/`, keyed by the package list; [`RootfsCopy`] is a throw-away writable
//!   copy a test installs the binary into.
//! * [`contained`] runs a program inside such a root as a container runtime would: `chroot` as
//!   the image's user, a fresh `/proc`, nothing of the host's environment but `PATH`, in a mount
//!   namespace of its own, so every mount is gone when the process exits (also when a test
//!   fails or kills it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::workspace_root;

/// The Debian release the runtime bases are built from (debian-iptables `bookworm`,
/// distroless `debian12`).
pub const SUITE: &str = "bookworm";

/// The `PATH` a container runtime gives a process whose image sets none.
pub const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Bumped when the way a root filesystem is built changes, so stale caches are not reused.
const CACHE_VERSION: u32 = 1;

/// A runtime base image and the Debian packages it is made of.
#[derive(Debug, Clone, Copy)]
pub struct BaseImage {
    /// The image reference without its tag suffix beyond what identifies the release.
    pub prefix: &'static str,
    /// The mmdebstrap variant: `essential` for a Debian userland with dpkg and a shell,
    /// `extract` for a distroless image (the packages' files only, no maintainer scripts).
    pub variant: &'static str,
    /// The packages the base adds (their dependencies come along).
    pub packages: &'static [&'static str],
}

/// The runtime bases the Dockerfiles may use.
///
/// * Kubernetes' `debian-iptables` is Debian's essential set plus iptables and conntrack
///   (it also carries ebtables, arptables, ipset and kmod, which nmi does not use, and a wrapper
///   script choosing the legacy or nft backend; here Debian's default `iptables` alternative,
///   nft, is what runs).
/// * Distroless `cc-debian12` is glibc, libgcc, libssl, the CA bundle and time zones, with no
///   shell and no package manager.
pub const BASES: [BaseImage; 2] = [
    BaseImage {
        prefix: "registry.k8s.io/build-image/debian-iptables:bookworm",
        variant: "essential",
        packages: &["iptables", "conntrack"],
    },
    BaseImage {
        prefix: "gcr.io/distroless/cc-debian12",
        variant: "extract",
        packages: &["libc6", "libgcc-s1", "libssl3", "ca-certificates", "tzdata"],
    },
];

/// A Dockerfile under `deploy/docker`.
#[derive(Debug, Clone)]
pub struct Dockerfile {
    name: String,
    text: String,
}

impl Dockerfile {
    /// Reads `deploy/docker/<name>`.
    pub fn read(name: &str) -> anyhow::Result<Self> {
        let path = workspace_root().join("deploy/docker").join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(Self::parse(name, &text))
    }

    /// A Dockerfile named `name` with contents `text`.
    pub fn parse(name: &str, text: &str) -> Self {
        Self {
            name: name.to_owned(),
            text: text.to_owned(),
        }
    }

    /// The file name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The whole text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Images named by `ARG …_IMAGE=` defaults, in order.
    pub fn base_images(&self) -> Vec<String> {
        self.text
            .lines()
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("ARG ")
                    .and_then(|a| a.split_once("_IMAGE="))
                    .map(|(_, image)| image.to_owned())
            })
            .collect()
    }

    /// The image the last `FROM` names, `${ARG}` resolved to the argument's default.
    pub fn runtime_base(&self) -> anyhow::Result<String> {
        let from = self
            .text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("FROM "))
            .with_context(|| format!("{}: no FROM", self.name))?;
        let image = from.split_whitespace().next().unwrap_or_default();
        let Some(arg) = image.strip_prefix("${").and_then(|a| a.strip_suffix('}')) else {
            return Ok(image.to_owned());
        };
        self.text
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("ARG ")
                    .and_then(|a| a.strip_prefix(arg))
                    .and_then(|a| a.strip_prefix('='))
            })
            .map(str::to_owned)
            .with_context(|| format!("{}: ARG {arg} has no default", self.name))
    }

    /// Packages the runtime stage installs with `apt-get install`.
    pub fn runtime_packages(&self) -> Vec<String> {
        runtime_packages(&self.text)
    }

    /// The last `USER` (`uid:gid` or a name); `None` when the file sets none (root).
    pub fn user(&self) -> Option<String> {
        self.text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("USER "))
            .map(|u| u.trim().to_owned())
    }

    /// The program of the exec-form `ENTRYPOINT ["/path", …]`.
    pub fn entrypoint(&self) -> anyhow::Result<String> {
        let line = self
            .text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("ENTRYPOINT "))
            .with_context(|| format!("{}: no ENTRYPOINT", self.name))?;
        let words: Vec<String> = serde_json::from_str(line.trim())
            .with_context(|| format!("{}: ENTRYPOINT is not in exec form: {line}", self.name))?;
        words
            .into_iter()
            .next()
            .with_context(|| format!("{}: empty ENTRYPOINT", self.name))
    }
}

/// Packages installed with `apt-get install` in the runtime stage (after the last `FROM`) of the
/// Dockerfile `text`.
pub fn runtime_packages(text: &str) -> Vec<String> {
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

/// What to build for one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsSpec {
    /// The image (`nmi`, `mic`): part of the cache key.
    pub image: String,
    /// The mmdebstrap variant of the base.
    pub variant: &'static str,
    /// Every package asked for, sorted: the base's and the Dockerfile's.
    pub packages: Vec<String>,
}

impl RootfsSpec {
    /// The package set of `dockerfile`'s runtime stage: its base image's ([`BASES`]) plus what
    /// it installs with apt.
    pub fn for_image(image: &str, dockerfile: &Dockerfile) -> anyhow::Result<Self> {
        let base_ref = dockerfile.runtime_base()?;
        let Some(base) = BASES.iter().find(|b| base_ref.starts_with(b.prefix)) else {
            bail!(
                "{}: no Debian package set is known for the runtime base {base_ref}: describe it in BASES (tests/src/image.rs)",
                dockerfile.name()
            );
        };
        let installed = dockerfile.runtime_packages();
        if base.variant == "extract" && !installed.is_empty() {
            bail!(
                "{}: the runtime base {base_ref} has no shell or package manager, so it cannot apt-get install {installed:?}",
                dockerfile.name()
            );
        }
        let mut packages: Vec<String> = base
            .packages
            .iter()
            .map(|p| (*p).to_owned())
            .chain(installed)
            .collect();
        packages.sort();
        packages.dedup();
        Ok(Self {
            image: image.to_owned(),
            variant: base.variant,
            packages,
        })
    }

    /// The cache directory's name: image, release, variant and every package.
    pub fn key(&self) -> String {
        format!(
            "{}-{SUITE}-{}-v{CACHE_VERSION}-{}",
            self.image,
            self.variant,
            self.packages.join("+")
        )
    }
}

/// Where built root filesystems are kept: `$CARGO_TARGET_DIR/image-rootfs`, else
/// `target/image-rootfs` in the workspace.
pub fn cache_root() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("image-rootfs")
}

/// How [`cached_rootfs`] got its root filesystem.
#[derive(Debug, Clone, Copy)]
pub enum Provenance {
    /// Built now with mmdebstrap, in this long.
    Built(Duration),
    /// Found in the cache.
    Cached,
}

/// The path of `program` on `PATH`, if any.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// The root filesystem of `spec`, built with mmdebstrap from Debian's archive the first time
/// and reused afterwards (a lock file serialises concurrent test processes). Fails, saying how
/// to install it, when mmdebstrap is missing.
pub fn cached_rootfs(spec: &RootfsSpec) -> anyhow::Result<(PathBuf, Provenance)> {
    let Some(mmdebstrap) = on_path("mmdebstrap") else {
        bail!(
            "mmdebstrap is not installed: the image tests build each image's root filesystem from Debian packages with it. Install it as root with `apt-get install mmdebstrap` (tests/scripts/install-deps.sh, run by `make deps`, does)"
        );
    };
    let root = cache_root();
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let key = spec.key();
    let lock_path = root.join(format!(".{key}.lock"));
    let lock = std::fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    let done = root.join(&key);
    if done.join(COMPLETE).is_file() {
        return Ok((done, Provenance::Cached));
    }
    let started = Instant::now();
    let partial = root.join(format!(".{key}.partial"));
    if partial.exists() {
        anyhow::ensure!(
            !mounted_under(&partial)?,
            "something is mounted under {}: unmount it before the root filesystem is rebuilt",
            partial.display()
        );
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing {}", partial.display()))?;
    }
    // mmdebstrap mounts /proc, /sys and /dev inside the root while it installs; in a mount
    // namespace of its own those mounts die with it, even when a timeout kills it half-way.
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(mmdebstrap)
        .arg("--mode=root")
        .arg(format!("--variant={}", spec.variant))
        .arg(format!("--include={}", spec.packages.join(",")))
        .args([
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
        ])
        .arg(SUITE)
        .arg(&partial)
        .output()
        .context("running mmdebstrap")?;
    if !output.status.success() {
        let _ = std::fs::remove_dir_all(&partial);
        bail!(
            "mmdebstrap for {key} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    if spec.variant == "extract" && spec.packages.iter().any(|p| p == "ca-certificates") {
        // No maintainer script runs in a distroless image's build; it assembles the bundle
        // from the package's certificates itself. So does this.
        write_ca_bundle(&partial)?;
    }
    std::fs::write(partial.join(COMPLETE), format!("{key}\n"))?;
    if done.exists() {
        std::fs::remove_dir_all(&done).with_context(|| format!("removing {}", done.display()))?;
    }
    std::fs::rename(&partial, &done)
        .with_context(|| format!("moving {} into place", partial.display()))?;
    Ok((done, Provenance::Built(started.elapsed())))
}

/// Whether anything is mounted at or below `dir` in this process's mount namespace.
fn mounted_under(dir: &Path) -> anyhow::Result<bool> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let dir = dir.to_string_lossy();
    Ok(mounts.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|point| point == dir || point.starts_with(&format!("{dir}/")))
    }))
}

/// Marks a completely built root filesystem in the cache.
const COMPLETE: &str = ".podid-rootfs-complete";

/// `/etc/ssl/certs/ca-certificates.crt` from every certificate the ca-certificates package
/// ships, in name order.
fn write_ca_bundle(root: &Path) -> anyhow::Result<()> {
    let mut files = Vec::new();
    let mut dirs = vec![root.join("usr/share/ca-certificates")];
    while let Some(dir) = dirs.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "crt") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut bundle = String::new();
    for file in &files {
        let pem = std::fs::read_to_string(file)?;
        bundle.push_str(pem.trim_end());
        bundle.push('\n');
    }
    let certs = root.join("etc/ssl/certs");
    std::fs::create_dir_all(&certs)?;
    std::fs::write(certs.join("ca-certificates.crt"), bundle)?;
    Ok(())
}

/// A writable copy of a cached root filesystem, removed when dropped.
#[derive(Debug)]
pub struct RootfsCopy {
    dir: PathBuf,
    root: PathBuf,
}

impl RootfsCopy {
    /// Copies `cached` (ownership, modes and device nodes kept) into a fresh temporary
    /// directory named after `label`.
    pub fn of(cached: &Path, label: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "podid-e2e-rootfs-{label}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir)?;
        let copy = Self {
            root: dir.join("rootfs"),
            dir,
        };
        let output = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(cached)
            .arg(&copy.root)
            .output()
            .context("running cp")?;
        anyhow::ensure!(
            output.status.success(),
            "copying {}: {}",
            cached.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let _ = std::fs::remove_file(copy.root.join(COMPLETE));
        Ok(copy)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path` (absolute, inside the image) on the host.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Installs the host file `from` at `at` inside the image, mode 0755 (Docker's `COPY` of
    /// a build output).
    pub fn install(&self, from: &Path, at: &str) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let target = self.path(at);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from, &target)
            .with_context(|| format!("copying {} to {}", from.display(), target.display()))?;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
        Ok(())
    }
}

impl Drop for RootfsCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs in the new mount namespace: mounts `/proc` and the read-only binds inside the root,
/// then `chroot`s as the user and execs the program.
const CONTAIN: &str = r#"set -e
root=$1 user=$2 binds=$3
shift 3
mkdir -p "$root/proc"
mount -t proc proc "$root/proc"
while [ "$binds" -gt 0 ]; do
  mkdir -p "$root$1"
  mount --bind "$1" "$root$1"
  mount -o remount,bind,ro "$root$1"
  shift
  binds=$((binds - 1))
done
exec chroot --userspec="$user" "$root" "$@"
"#;

/// A command that runs `program` inside `root` as `user` (`uid:gid`), the way a container
/// runtime runs an image's process: a mount namespace of its own (`unshare --mount`, private
/// propagation) with a fresh `/proc`, each of `binds` mounted read-only at the same path inside
/// (a pod's mounted files), and an environment of `PATH` alone ([`CONTAINER_PATH`]; add more
/// with `.env`). `launch` makes the outer command for a program name (`Command::new`, or a
/// node's `command` to run it inside a network namespace). Append the program's arguments with
/// `.arg`. Every mount belongs to the namespace and is gone when the process exits.
pub fn contained(
    launch: impl FnOnce(&'static str) -> Command,
    root: &Path,
    user: &str,
    binds: &[&Path],
    program: &str,
) -> Command {
    let mut command = launch("unshare");
    command
        .env_clear()
        .env("PATH", CONTAINER_PATH)
        .args(["--mount", "--propagation", "private", "sh", "-c", CONTAIN])
        .arg("contain")
        .arg(root)
        .arg(user)
        .arg(binds.len().to_string())
        .args(binds)
        .arg(program);
    command
}
