//! Slot allocation and sweeping of leftovers from dead processes.
//!
//! Every node owns a slot `N` in `0..MAX_NODES`, claimed by creating
//! `/run/podid-netsim/slot-N` (holding the owner's pid) with `create_new`. All names derive
//! from the slot and the owner pid: netns `podid-n<N>-<pid>` and `podid-p<N>x<k>-<pid>`, host
//! link `pdh<N>`. Claiming and sweeping happen under an exclusive `flock` on
//! `/run/podid-netsim/lock`, so a sweeper never removes a slot that is being reused.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::cmd;
use crate::{Error, Result};

/// Number of node slots; slot `N` uses 198.18.N.0/30 and 198.19.N.0/24.
pub const MAX_NODES: u32 = 64;

/// Directory holding the slot files and the lock file.
pub const STATE_DIR: &str = "/run/podid-netsim";

/// Prefix of every network namespace this crate creates.
pub const NETNS_PREFIX: &str = "podid-";

/// Prefix of the host-side veth of a node (`pdh<N>`).
pub const HOST_LINK_PREFIX: &str = "pdh";

pub(crate) fn slot_path(slot: u32) -> PathBuf {
    Path::new(STATE_DIR).join(format!("slot-{slot}"))
}

fn lock() -> Result<Flock<File>> {
    fs::create_dir_all(STATE_DIR).map_err(|source| Error::Io {
        action: "create state directory",
        path: PathBuf::from(STATE_DIR),
        source,
    })?;
    let path = Path::new(STATE_DIR).join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::Io {
            action: "open lock file",
            path: path.clone(),
            source,
        })?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| Error::Io {
        action: "lock",
        path,
        source: errno.into(),
    })
}

/// Fails with [`Error::NeedsRoot`] unless the process runs as root.
pub(crate) fn require_root() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::NeedsRoot)
    }
}

/// Sweeps leftovers of dead processes, then claims the lowest free slot for this process.
pub(crate) fn claim_slot() -> Result<u32> {
    let _guard = lock()?;
    sweep_locked()?;
    let pid = std::process::id();
    for slot in 0..MAX_NODES {
        let path = slot_path(slot);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut file) => {
                file.write_all(pid.to_string().as_bytes())
                    .map_err(|source| Error::Io {
                        action: "write slot file",
                        path,
                        source,
                    })?;
                return Ok(slot);
            }
            Err(err) if err.kind() == ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(Error::Io {
                    action: "create slot file",
                    path,
                    source,
                });
            }
        }
    }
    Err(Error::NoFreeSlot)
}

/// Releases a slot claimed by this process.
pub(crate) fn release_slot(slot: u32) {
    let path = slot_path(slot);
    if let Err(err) = fs::remove_file(&path)
        && err.kind() != ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %err, "podid-netsim: cannot remove slot file");
    }
}

/// Whether a process with this pid exists and is not a zombie.
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state letter follows the last ')' (the command name may contain parentheses).
    match stat.rsplit_once(')') {
        Some((_, rest)) => !matches!(rest.trim_start().chars().next(), Some('Z' | 'X')),
        None => true,
    }
}

/// The owner pid encoded in one of this crate's namespace names (`podid-…-<pid>`).
pub(crate) fn netns_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NETNS_PREFIX)?;
    let (_, pid) = rest.rsplit_once('-')?;
    pid.parse().ok()
}

/// Names of all network namespaces pinned under `/run/netns`.
pub(crate) fn list_netns() -> Vec<String> {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Names of the host-namespace links called `pdh<N>`, with their slot.
fn list_host_links() -> Result<Vec<(String, u32)>> {
    let text = cmd::ip(&["-o", "link", "show"])?;
    Ok(text
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name))
        .filter_map(|name| {
            let slot = name.strip_prefix(HOST_LINK_PREFIX)?.parse().ok()?;
            Some((name.to_owned(), slot))
        })
        .collect())
}

/// Deletes a namespace, treating "already gone" as success.
pub(crate) fn delete_netns(name: &str) -> Result<()> {
    if !crate::ns::path(name).exists() {
        return Ok(());
    }
    match cmd::ip(&["netns", "delete", name]) {
        Ok(_) => Ok(()),
        Err(_) if !crate::ns::path(name).exists() => Ok(()),
        Err(err) => Err(err),
    }
}

/// Deletes a link (in `netns`, or the host when `None`), treating "already gone" as success.
pub(crate) fn delete_link(netns: Option<&str>, link: &str) -> Result<()> {
    let result = match netns {
        Some(ns) => cmd::ip_in(ns, &["link", "delete", link]),
        None => cmd::ip(&["link", "delete", link]),
    };
    match result {
        Ok(_) => Ok(()),
        Err(Error::Command { ref stderr, .. })
            if stderr.contains("Cannot find device") || stderr.contains("does not exist") =>
        {
            Ok(())
        }
        Err(err) => Err(err),
    }
}

/// What [`sweep`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Slot files whose owner was dead.
    pub slots: Vec<u32>,
    /// Network namespaces whose owner was dead.
    pub namespaces: Vec<String>,
    /// Host links `pdh<N>` without a live owner.
    pub links: Vec<String>,
}

impl SweepReport {
    /// True when nothing was left over.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.namespaces.is_empty() && self.links.is_empty()
    }
}

/// Removes namespaces, host links and slot files left by processes that are no longer alive
/// (for example a test killed by a signal, where `Drop` never ran). Anything owned by a live
/// process is left alone, so this is safe to call while other tests run.
pub fn sweep() -> Result<SweepReport> {
    require_root()?;
    let _guard = lock()?;
    sweep_locked()
}

fn sweep_locked() -> Result<SweepReport> {
    let mut report = SweepReport::default();
    let mut live_slots = BTreeSet::new();
    for slot in 0..MAX_NODES {
        let path = slot_path(slot);
        let owner = match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u32>().ok(),
            Err(err) if err.kind() == ErrorKind::NotFound => continue,
            Err(source) => {
                return Err(Error::Io {
                    action: "read slot file",
                    path,
                    source,
                });
            }
        };
        if owner.is_some_and(pid_alive) {
            live_slots.insert(slot);
            continue;
        }
        release_slot(slot);
        report.slots.push(slot);
    }
    for name in list_netns() {
        if let Some(pid) = netns_owner(&name)
            && !pid_alive(pid)
        {
            delete_netns(&name)?;
            report.namespaces.push(name);
        }
    }
    for (link, slot) in list_host_links()? {
        if !live_slots.contains(&slot) {
            delete_link(None, &link)?;
            report.links.push(link);
        }
    }
    if !report.is_empty() {
        tracing::info!(?report, "podid-netsim: swept leftovers of dead processes");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_is_parsed_from_both_name_shapes() {
        assert_eq!(netns_owner("podid-n3-4242"), Some(4242));
        assert_eq!(netns_owner("podid-p3x12-77"), Some(77));
        assert_eq!(netns_owner("other-n3-4242"), None);
        assert_eq!(netns_owner("podid-n3-x"), None);
    }

    #[test]
    fn own_pid_is_alive_and_absurd_pid_is_not() {
        assert!(pid_alive(std::process::id()));
        assert!(!pid_alive(u32::MAX - 1));
    }
}
