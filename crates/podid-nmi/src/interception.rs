//! The iptables interception of docs/upstream.md#interception: table `nat`, chain `aad-metadata`
//! jumped to from `PREROUTING`, DNAT of pod traffic to the IMDS address onto NMI's listener.
//!
//! The rules are upstream's, string for string, so nodes moving between the Go NMI and podid see
//! the same chain. Differences (docs/compatibility.md): the rules stay when NMI stops (fail
//! closed; [`uninstall`] is an explicit step), and `route_localnet` is set and verified so the DNAT
//! to 127.0.0.1 works on nodes without kube-proxy ([`enable_route_localnet`]).
//!
//! `route_localnet=1` lets the kernel route packets from other hosts to 127.0.0.0/8, which
//! exposes every service listening on the node's loopback to its network neighbours
//! (CVE-2020-8558). kube-proxy guards against it with a `filter` rule dropping traffic to
//! 127.0.0.0/8 that neither comes from 127.0.0.0/8 nor was DNAT-ed. When nmi turns
//! `route_localnet` on itself, it first installs the same guard in its own `filter` chain
//! [`LOCALNET_CHAIN`] (jumped to from `INPUT`), unless an equivalent rule is already reachable from
//! `INPUT`; the chain's last rule records the value the sysctl had before, so
//! [`uninstall_localnet`] can remove only what nmi added and restore the sysctl. The record lives
//! in the kernel next to the state it describes: both vanish together on reboot.
//!
//! Behind the DNAT sits a guard of nmi's own ([`GUARD_CHAIN`] in `filter`, jumped to from
//! `INPUT` and `FORWARD`): it resets every pod connection to the IMDS address and port that was
//! not DNAT-ed. While the chain stands it never matches (DNAT-ed packets no longer carry the IMDS
//! address); when the chain or its jump goes, whoever removes it (the Go NMI's SIGTERM clean-up,
//! an operator's `iptables -t nat -F`), pods get a reset instead of the VM's IMDS until nmi puts
//! the chain back. Upstream has no filter rules; the Go NMI's clean-up leaves this chain alone.
//!
//! Everything goes through the [`Backend`] trait: [`SystemIptables`] runs the `iptables` command
//! (with the xtables lock, `--wait`) via the `iptables` crate; tests use an in-memory backend.

use std::net::SocketAddrV4;
use std::path::Path;

/// The custom chain's name.
pub const CHAIN: &str = "aad-metadata";
/// The table the chain lives in.
pub const TABLE: &str = "nat";
/// The built-in chain that jumps to [`CHAIN`].
pub const PREROUTING: &str = "PREROUTING";

/// An iptables command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("iptables {operation} failed: {message}")]
pub struct IptablesError {
    /// What was being done (`list nat aad-metadata`, …).
    pub operation: String,
    /// The command's error output.
    pub message: String,
}

/// The few iptables operations the interception needs.
pub trait Backend {
    /// `iptables -t <table> -S <chain>` lines, or an error when the chain does not exist.
    fn list(&self, table: &str, chain: &str) -> Result<Vec<String>, IptablesError>;
    /// `-N`.
    fn new_chain(&self, table: &str, chain: &str) -> Result<(), IptablesError>;
    /// `-F`.
    fn flush_chain(&self, table: &str, chain: &str) -> Result<(), IptablesError>;
    /// `-X`.
    fn delete_chain(&self, table: &str, chain: &str) -> Result<(), IptablesError>;
    /// `-A`.
    fn append(&self, table: &str, chain: &str, rule: &str) -> Result<(), IptablesError>;
    /// `-I <chain> <position>`.
    fn insert(
        &self,
        table: &str,
        chain: &str,
        rule: &str,
        position: i32,
    ) -> Result<(), IptablesError>;
    /// `-C`.
    fn exists(&self, table: &str, chain: &str, rule: &str) -> Result<bool, IptablesError>;
    /// `-D`.
    fn delete(&self, table: &str, chain: &str, rule: &str) -> Result<(), IptablesError>;
}

/// What to intercept and where to send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interception {
    /// The IMDS address matched (`--metadata-ip:--metadata-port`).
    pub metadata: SocketAddrV4,
    /// The DNAT target (NMI's listener; 127.0.0.1 when it listens on 0.0.0.0).
    pub target: SocketAddrV4,
}

/// nmi's `filter` chain resetting pod connections to the IMDS address that were not DNAT-ed.
pub const GUARD_CHAIN: &str = "aad-metadata-guard";
/// The built-in `filter` chains that jump to [`GUARD_CHAIN`]: `INPUT` for an IMDS address local
/// to the node, `FORWARD` for one routed out of it (Azure's).
pub const GUARD_HOOKS: [&str; 2] = ["INPUT", "FORWARD"];

/// What a reconcile pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reconciled {
    /// The chain was missing and created.
    pub chain_created: bool,
    /// The chain's rules were wrong and rewritten.
    pub chain_rewritten: bool,
    /// The `PREROUTING` jump was missing and inserted at position 1.
    pub jump_inserted: bool,
    /// The guard chain or one of its jumps was missing or wrong and put back.
    pub guard_repaired: bool,
}

impl Reconciled {
    /// True when the pass changed nothing.
    pub fn unchanged(&self) -> bool {
        !(self.chain_created || self.chain_rewritten || self.jump_inserted || self.guard_repaired)
    }

    /// The parts put back, as the `part` label of `podid_nmi_interception_repairs_total`:
    /// `chain` (created or rewritten), `jump`, `guard`.
    pub fn parts(&self) -> impl Iterator<Item = &'static str> {
        [
            (self.chain_created || self.chain_rewritten, "chain"),
            (self.jump_inserted, "jump"),
            (self.guard_repaired, "guard"),
        ]
        .into_iter()
        .filter_map(|(repaired, part)| repaired.then_some(part))
    }
}

impl Interception {
    /// The DNAT rule as `iptables -S` prints it (and as it is appended).
    pub fn dnat_rule(&self) -> String {
        format!(
            "! -s 127.0.0.1/32 -d {}/32 -p tcp -m tcp --dport {} -j DNAT --to-destination {}",
            self.metadata.ip(),
            self.metadata.port(),
            self.target
        )
    }

    /// The rule that ends the chain.
    pub fn return_rule(&self) -> &'static str {
        "-j RETURN"
    }

    /// The jump from `PREROUTING`.
    pub fn jump_rule(&self) -> String {
        format!("-j {CHAIN}")
    }

    /// The guard's rule as `iptables -S` prints it (and as it is appended): reset TCP
    /// connections to the IMDS address and port that did not come from the node itself.
    pub fn guard_rule(&self) -> String {
        format!(
            "-d {}/32 ! -i lo -p tcp -m tcp --dport {} -j REJECT --reject-with tcp-reset",
            self.metadata.ip(),
            self.metadata.port()
        )
    }

    /// `iptables -t filter -S aad-metadata-guard` of a correct guard, line for line.
    pub fn expected_guard_listing(&self) -> [String; 2] {
        [
            format!("-N {GUARD_CHAIN}"),
            format!("-A {GUARD_CHAIN} {}", self.guard_rule()),
        ]
    }

    /// `iptables -t nat -S aad-metadata` of a correct chain, line for line.
    pub fn expected_listing(&self) -> [String; 3] {
        [
            format!("-N {CHAIN}"),
            format!("-A {CHAIN} {}", self.dnat_rule()),
            format!("-A {CHAIN} {}", self.return_rule()),
        ]
    }
}

/// One reconcile pass with upstream's semantics: list the chain (create it when listing fails);
/// count the leading lines that match the expected ones, stopping at the first that does not;
/// unless exactly all three match, flush and re-add the DNAT and RETURN rules. Then make sure the
/// `PREROUTING` jump exists anywhere, inserting it at position 1 when missing. The guard
/// ([`GUARD_CHAIN`]) goes in first, so no pass opens the node even when a later step fails.
pub fn reconcile(
    backend: &dyn Backend,
    interception: &Interception,
) -> Result<Reconciled, IptablesError> {
    let mut outcome = Reconciled {
        guard_repaired: reconcile_guard(backend, interception)?,
        ..Reconciled::default()
    };
    // `iptables -S` of a missing chain fails; some wrappers report that as an empty listing.
    let header = format!("-N {CHAIN}");
    let listing = match backend.list(TABLE, CHAIN) {
        Ok(lines) if lines.iter().any(|l| l.trim() == header) => lines,
        _ => {
            backend.new_chain(TABLE, CHAIN)?;
            outcome.chain_created = true;
            vec![header]
        }
    };
    let expected = interception.expected_listing();
    let matching = listing
        .iter()
        .zip(expected.iter())
        .take_while(|(have, want)| have.trim() == want.as_str())
        .count();
    if matching != expected.len() {
        backend.flush_chain(TABLE, CHAIN)?;
        backend.append(TABLE, CHAIN, &interception.dnat_rule())?;
        backend.append(TABLE, CHAIN, interception.return_rule())?;
        outcome.chain_rewritten = true;
    }
    let jump = interception.jump_rule();
    if !backend.exists(TABLE, PREROUTING, &jump)? {
        backend.insert(TABLE, PREROUTING, &jump, 1)?;
        outcome.jump_inserted = true;
    }
    Ok(outcome)
}

/// Makes [`GUARD_CHAIN`] hold exactly the guard rule and be jumped to from the top of `INPUT`
/// and `FORWARD` (anywhere in them: like the `PREROUTING` jump, it is not moved back to the top).
/// Returns whether anything was missing or wrong.
fn reconcile_guard(
    backend: &dyn Backend,
    interception: &Interception,
) -> Result<bool, IptablesError> {
    let mut repaired = false;
    let expected = interception.expected_guard_listing();
    let listing = backend.list(FILTER, GUARD_CHAIN).unwrap_or_default();
    let have: Vec<&str> = listing.iter().map(|l| l.trim()).collect();
    if have != expected.iter().map(String::as_str).collect::<Vec<_>>() {
        if have.first() != Some(&expected[0].as_str()) {
            backend.new_chain(FILTER, GUARD_CHAIN)?;
        } else {
            backend.flush_chain(FILTER, GUARD_CHAIN)?;
        }
        backend.append(FILTER, GUARD_CHAIN, &interception.guard_rule())?;
        repaired = true;
    }
    let jump = format!("-j {GUARD_CHAIN}");
    for hook in GUARD_HOOKS {
        if !backend.exists(FILTER, hook, &jump)? {
            backend.insert(FILTER, hook, &jump, 1)?;
            repaired = true;
        }
    }
    Ok(repaired)
}

/// Removes the interception: every `PREROUTING` jump, then the chain, then the guard. Idempotent.
pub fn uninstall(backend: &dyn Backend, interception: &Interception) -> Result<(), IptablesError> {
    let jump = interception.jump_rule();
    while backend.exists(TABLE, PREROUTING, &jump)? {
        backend.delete(TABLE, PREROUTING, &jump)?;
    }
    if chain_exists(backend, TABLE, CHAIN) {
        backend.flush_chain(TABLE, CHAIN)?;
        backend.delete_chain(TABLE, CHAIN)?;
    }
    let guard_jump = format!("-j {GUARD_CHAIN}");
    for hook in GUARD_HOOKS {
        while backend.exists(FILTER, hook, &guard_jump)? {
            backend.delete(FILTER, hook, &guard_jump)?;
        }
    }
    if chain_exists(backend, FILTER, GUARD_CHAIN) {
        backend.flush_chain(FILTER, GUARD_CHAIN)?;
        backend.delete_chain(FILTER, GUARD_CHAIN)?;
    }
    Ok(())
}

/// Whether `chain` exists: its listing holds its `-N` line (listing a missing chain fails, or,
/// with some iptables wrappers, is empty).
fn chain_exists(backend: &dyn Backend, table: &str, chain: &str) -> bool {
    let header = format!("-N {chain}");
    backend
        .list(table, chain)
        .is_ok_and(|lines| lines.iter().any(|l| l.trim() == header))
}

/// The sysctl, relative to `/proc/sys`.
pub const ROUTE_LOCALNET: &str = "net/ipv4/conf/all/route_localnet";
/// nmi's `filter` chain holding the CVE-2020-8558 guard and the record of the sysctl's prior
/// value; it exists only while nmi's change of `route_localnet` stands.
pub const LOCALNET_CHAIN: &str = "aad-metadata-localnet";
/// The table of [`LOCALNET_CHAIN`].
pub const FILTER: &str = "filter";
/// The built-in chain that jumps to [`LOCALNET_CHAIN`].
pub const INPUT: &str = "INPUT";
/// Comment of the marker rule, followed by the prior value (`…-was-0`).
const MARKER_PREFIX: &str = "podid-route-localnet-was-";

/// The guard as `iptables -S` prints it (and as it is appended): drop packets to 127.0.0.0/8
/// that neither come from 127.0.0.0/8 nor belong to a DNAT-ed (or established) connection.
pub fn localnet_guard_rule() -> &'static str {
    "! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"podid: block incoming localnet connections (CVE-2020-8558)\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
}

/// The marker rule recording that `route_localnet` was `prior` before nmi set it; it also ends
/// [`LOCALNET_CHAIN`].
fn marker_rule(prior: &str) -> String {
    format!("-m comment --comment {MARKER_PREFIX}{prior} -j RETURN")
}

/// The jump from `INPUT`.
fn localnet_jump() -> String {
    format!("-j {LOCALNET_CHAIN}")
}

/// Whether `rule` (an `iptables -S` line, with or without its `-A <chain>` prefix) is
/// equivalent to [`localnet_guard_rule`]: exactly the source, destination and conntrack-state
/// matches of kube-proxy's guard with a `DROP` target, whatever its comment and match order.
/// A rule with any further match (an interface, a protocol) guards less and does not count.
pub fn is_localnet_guard(rule: &str) -> bool {
    let mut tokens = split_rule(rule);
    if tokens.first().is_some_and(|t| t == "-A") {
        tokens.drain(..tokens.len().min(2));
    }
    let mut source = false;
    let mut destination = false;
    let mut states = false;
    let mut drop = false;
    let mut i = 0;
    while i < tokens.len() {
        let negated = tokens[i] == "!";
        if negated {
            i += 1;
        }
        let (Some(flag), value) = (tokens.get(i), tokens.get(i + 1)) else {
            return false;
        };
        let value = value.map(String::as_str).unwrap_or("");
        match (negated, flag.as_str()) {
            (true, "-s" | "--source") if is_loopback_net(value) => source = true,
            (false, "-d" | "--destination") if is_loopback_net(value) => destination = true,
            (false, "-m") if value == "comment" || value == "conntrack" => {}
            (false, "--comment") => {}
            (true, "--ctstate") => {
                let mut got: Vec<&str> = value.split(',').collect();
                got.sort_unstable();
                states = got == ["DNAT", "ESTABLISHED", "RELATED"];
            }
            (false, "-j" | "--jump") if value == "DROP" => drop = true,
            _ => return false,
        }
        i += 2;
    }
    source && destination && states && drop
}

fn is_loopback_net(value: &str) -> bool {
    value == "127.0.0.0/8"
}

/// Splits an `iptables -S` line into words, keeping double-quoted words whole (unquoted).
fn split_rule(rule: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in rule.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    words.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(current);
    }
    words
}

/// Whether a rule equivalent to the guard is reachable from `filter INPUT`: in `INPUT` itself or
/// in a chain `INPUT` jumps to (one level, as kube-proxy's `KUBE-FIREWALL`). nmi's own chain
/// does not count.
pub fn localnet_guard_present(backend: &dyn Backend) -> Result<bool, IptablesError> {
    let input = backend.list(FILTER, INPUT)?;
    for line in &input {
        if is_localnet_guard(line) {
            return Ok(true);
        }
        let words = split_rule(line);
        let target = words
            .windows(2)
            .find(|w| w[0] == "-j" || w[0] == "--jump")
            .map(|w| w[1].as_str());
        let Some(target) = target else { continue };
        if target == LOCALNET_CHAIN
            || matches!(target, "ACCEPT" | "DROP" | "REJECT" | "RETURN" | "LOG")
        {
            continue;
        }
        // A chain that cannot be listed (a target extension, not a chain) holds no rule.
        if let Ok(rules) = backend.list(FILTER, target)
            && rules.iter().any(|r| is_localnet_guard(r))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// What [`enable_route_localnet`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Localnet {
    /// `route_localnet` was already 1 and nmi did not set it (kube-proxy or the node image did):
    /// nothing added.
    AlreadySet,
    /// nmi set `route_localnet` (now or in an earlier run: its [`LOCALNET_CHAIN`] records it).
    SetByNmi {
        /// The value before nmi changed it.
        prior: String,
        /// Whether nmi's guard rule is in place (false: an equivalent rule already existed).
        guard: bool,
        /// Whether this call wrote the sysctl (false: an earlier run did).
        now: bool,
    },
}

/// Why `route_localnet` could not be turned on. The interception stays installed regardless:
/// DNAT-ed packets are then dropped by the kernel (closed).
#[derive(Debug, thiserror::Error)]
pub enum LocalnetError {
    /// Reading or writing the sysctl failed (read-only `/proc/sys`, no such file, …).
    #[error("{action} {path}: {source}")]
    Sysctl {
        /// `reading` or `writing`.
        action: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The write succeeded but the value read back is not 1.
    #[error("{path} reads {value:?} after writing 1")]
    NotApplied {
        /// The file.
        path: String,
        /// What it reads.
        value: String,
    },
    /// Reading, installing or removing the guard chain failed (when turning `route_localnet`
    /// on: nmi did not turn it on).
    #[error("the CVE-2020-8558 guard chain: {0}")]
    Guard(#[source] IptablesError),
}

fn read_sysctl(path: &Path) -> Result<String, LocalnetError> {
    std::fs::read_to_string(path)
        .map(|v| v.trim().to_owned())
        .map_err(|source| LocalnetError::Sysctl {
            action: "reading",
            path: path.display().to_string(),
            source,
        })
}

fn write_sysctl(path: &Path, value: &str) -> Result<(), LocalnetError> {
    std::fs::write(path, value).map_err(|source| LocalnetError::Sysctl {
        action: "writing",
        path: path.display().to_string(),
        source,
    })
}

/// The prior value recorded in nmi's [`LOCALNET_CHAIN`], if the chain exists and holds a marker.
fn recorded_prior(backend: &dyn Backend) -> Option<String> {
    let rules = backend.list(FILTER, LOCALNET_CHAIN).ok()?;
    rules.iter().find_map(|rule| {
        split_rule(rule)
            .iter()
            .find_map(|w| w.strip_prefix(MARKER_PREFIX).map(str::to_owned))
    })
}

/// Makes sure `net.ipv4.conf.all.route_localnet` (under `proc_sys`, normally `/proc/sys`) is 1,
/// without which the kernel drops packets DNAT-ed from `PREROUTING` to 127.0.0.1.
///
/// Already 1 and not nmi's doing: nothing is added. Otherwise nmi installs its guard chain
/// first (the CVE-2020-8558 guard unless an equivalent rule is reachable from `INPUT`, then the
/// marker recording the prior value, then the `INPUT` jump at position 1), writes 1 and reads it
/// back; if the write fails, the chain it just added is removed again and the error returned.
/// Repeated calls (the reconcile loop) repair a missing jump and a missing guard (also when
/// the equivalent rule it relied on went away) and are otherwise no-ops.
pub fn enable_route_localnet(
    backend: &dyn Backend,
    proc_sys: &Path,
) -> Result<Localnet, LocalnetError> {
    let path = proc_sys.join(ROUTE_LOCALNET);
    let current = read_sysctl(&path)?;
    let recorded = recorded_prior(backend);
    if current == "1" {
        let Some(prior) = recorded else {
            return Ok(Localnet::AlreadySet);
        };
        let jump = localnet_jump();
        if !backend
            .exists(FILTER, INPUT, &jump)
            .map_err(LocalnetError::Guard)?
        {
            backend
                .insert(FILTER, INPUT, &jump, 1)
                .map_err(LocalnetError::Guard)?;
        }
        let mut guard = backend
            .exists(FILTER, LOCALNET_CHAIN, localnet_guard_rule())
            .map_err(LocalnetError::Guard)?;
        // nmi's change stands, so the node must stay guarded: put the guard back when it was
        // removed, or when the equivalent rule it relied on went away.
        if !guard && !localnet_guard_present(backend).map_err(LocalnetError::Guard)? {
            backend
                .insert(FILTER, LOCALNET_CHAIN, localnet_guard_rule(), 1)
                .map_err(LocalnetError::Guard)?;
            guard = true;
        }
        return Ok(Localnet::SetByNmi {
            prior,
            guard,
            now: false,
        });
    }
    // A chain left from an earlier run whose change was undone by someone else: start afresh,
    // keeping the oldest record of the value before nmi.
    let prior = recorded.unwrap_or_else(|| current.clone());
    remove_localnet_chain(backend).map_err(LocalnetError::Guard)?;
    let guard = !localnet_guard_present(backend).map_err(LocalnetError::Guard)?;
    install_localnet_chain(backend, &prior, guard).map_err(LocalnetError::Guard)?;
    let written = write_sysctl(&path, "1").and_then(|()| read_sysctl(&path));
    let failure = match written {
        Ok(value) if value == "1" => None,
        Ok(value) => Some(LocalnetError::NotApplied {
            path: path.display().to_string(),
            value,
        }),
        Err(error) => Some(error),
    };
    if let Some(error) = failure {
        // nmi changed nothing: its guard chain would only be a stale record.
        if let Err(cleanup) = remove_localnet_chain(backend) {
            tracing::warn!(error = %cleanup, "removing the unused localnet guard chain failed");
        }
        return Err(error);
    }
    Ok(Localnet::SetByNmi {
        prior,
        guard,
        now: true,
    })
}

fn install_localnet_chain(
    backend: &dyn Backend,
    prior: &str,
    guard: bool,
) -> Result<(), IptablesError> {
    backend.new_chain(FILTER, LOCALNET_CHAIN)?;
    if guard {
        backend.append(FILTER, LOCALNET_CHAIN, localnet_guard_rule())?;
    }
    backend.append(FILTER, LOCALNET_CHAIN, &marker_rule(prior))?;
    backend.insert(FILTER, INPUT, &localnet_jump(), 1)
}

/// Removes every `INPUT` jump to [`LOCALNET_CHAIN`] and the chain, if present.
fn remove_localnet_chain(backend: &dyn Backend) -> Result<(), IptablesError> {
    let jump = localnet_jump();
    while backend.exists(FILTER, INPUT, &jump)? {
        backend.delete(FILTER, INPUT, &jump)?;
    }
    if chain_exists(backend, FILTER, LOCALNET_CHAIN) {
        backend.flush_chain(FILTER, LOCALNET_CHAIN)?;
        backend.delete_chain(FILTER, LOCALNET_CHAIN)?;
    }
    Ok(())
}

/// Undoes [`enable_route_localnet`]: when nmi's chain records that nmi changed
/// `route_localnet`, writes the recorded prior value back (before the guard goes, so the node is
/// never open without it), then removes nmi's jump and chain. Rules nmi did not add (kube-proxy's
/// guard) and a sysctl nmi did not change are left alone. Returns the value restored, if any.
pub fn uninstall_localnet(
    backend: &dyn Backend,
    proc_sys: &Path,
) -> Result<Option<String>, LocalnetError> {
    let restored = match recorded_prior(backend) {
        Some(prior) => {
            write_sysctl(&proc_sys.join(ROUTE_LOCALNET), &prior)?;
            Some(prior)
        }
        None => None,
    };
    remove_localnet_chain(backend).map_err(LocalnetError::Guard)?;
    Ok(restored)
}

/// The `iptables` command (IPv4), through the `iptables` crate, with the xtables lock.
pub struct SystemIptables {
    inner: iptables::IPTables,
}

impl std::fmt::Debug for SystemIptables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemIptables")
            .field("cmd", &self.inner.cmd)
            .field("has_wait", &self.inner.has_wait)
            .finish()
    }
}

impl SystemIptables {
    /// Finds the `iptables` command and its capabilities.
    pub fn new() -> Result<Self, IptablesError> {
        let inner = iptables::new(false).map_err(|e| IptablesError {
            operation: "init".into(),
            message: e.to_string(),
        })?;
        Ok(Self { inner })
    }

    /// The command run (`iptables`).
    pub fn command(&self) -> &str {
        self.inner.cmd
    }
}

fn wrap<T>(
    operation: impl FnOnce() -> String,
    result: Result<T, Box<dyn std::error::Error>>,
) -> Result<T, IptablesError> {
    result.map_err(|e| IptablesError {
        operation: operation(),
        message: e.to_string().trim().to_owned(),
    })
}

impl Backend for SystemIptables {
    fn list(&self, table: &str, chain: &str) -> Result<Vec<String>, IptablesError> {
        wrap(
            || format!("-t {table} -S {chain}"),
            self.inner.list(table, chain),
        )
    }
    fn new_chain(&self, table: &str, chain: &str) -> Result<(), IptablesError> {
        wrap(
            || format!("-t {table} -N {chain}"),
            self.inner.new_chain(table, chain),
        )
    }
    fn flush_chain(&self, table: &str, chain: &str) -> Result<(), IptablesError> {
        wrap(
            || format!("-t {table} -F {chain}"),
            self.inner.flush_chain(table, chain),
        )
    }
    fn delete_chain(&self, table: &str, chain: &str) -> Result<(), IptablesError> {
        wrap(
            || format!("-t {table} -X {chain}"),
            self.inner.delete_chain(table, chain),
        )
    }
    fn append(&self, table: &str, chain: &str, rule: &str) -> Result<(), IptablesError> {
        wrap(
            || format!("-t {table} -A {chain} {rule}"),
            self.inner.append(table, chain, rule),
        )
    }
    fn insert(
        &self,
        table: &str,
        chain: &str,
        rule: &str,
        position: i32,
    ) -> Result<(), IptablesError> {
        wrap(
            || format!("-t {table} -I {chain} {position} {rule}"),
            self.inner.insert(table, chain, rule, position),
        )
    }
    fn exists(&self, table: &str, chain: &str, rule: &str) -> Result<bool, IptablesError> {
        wrap(
            || format!("-t {table} -C {chain} {rule}"),
            self.inner.exists(table, chain, rule),
        )
    }
    fn delete(&self, table: &str, chain: &str, rule: &str) -> Result<(), IptablesError> {
        wrap(
            || format!("-t {table} -D {chain} {rule}"),
            self.inner.delete(table, chain, rule),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use super::*;

    /// An in-memory nat table: chain → rules (without the `-A <chain>` prefix).
    #[derive(Default)]
    struct Memory {
        chains: RefCell<BTreeMap<String, Vec<String>>>,
        writes: RefCell<usize>,
    }

    impl Memory {
        fn with_prerouting() -> Self {
            let m = Self::default();
            for chain in [PREROUTING, "INPUT", "FORWARD"] {
                m.chains.borrow_mut().insert(chain.into(), vec![]);
            }
            m
        }
        fn rules(&self, chain: &str) -> Vec<String> {
            self.chains.borrow().get(chain).cloned().unwrap_or_default()
        }
        fn missing(chain: &str) -> IptablesError {
            IptablesError {
                operation: chain.into(),
                message: "No chain/target/match by that name.".into(),
            }
        }
    }

    impl Backend for Memory {
        fn list(&self, _: &str, chain: &str) -> Result<Vec<String>, IptablesError> {
            let chains = self.chains.borrow();
            let rules = chains.get(chain).ok_or_else(|| Self::missing(chain))?;
            let mut out = vec![format!("-N {chain}")];
            out.extend(rules.iter().map(|r| format!("-A {chain} {r}")));
            Ok(out)
        }
        fn new_chain(&self, _: &str, chain: &str) -> Result<(), IptablesError> {
            *self.writes.borrow_mut() += 1;
            self.chains.borrow_mut().insert(chain.into(), vec![]);
            Ok(())
        }
        fn flush_chain(&self, _: &str, chain: &str) -> Result<(), IptablesError> {
            *self.writes.borrow_mut() += 1;
            self.chains
                .borrow_mut()
                .get_mut(chain)
                .ok_or_else(|| Self::missing(chain))?
                .clear();
            Ok(())
        }
        fn delete_chain(&self, _: &str, chain: &str) -> Result<(), IptablesError> {
            *self.writes.borrow_mut() += 1;
            self.chains.borrow_mut().remove(chain);
            Ok(())
        }
        fn append(&self, _: &str, chain: &str, rule: &str) -> Result<(), IptablesError> {
            *self.writes.borrow_mut() += 1;
            self.chains
                .borrow_mut()
                .get_mut(chain)
                .ok_or_else(|| Self::missing(chain))?
                .push(rule.into());
            Ok(())
        }
        fn insert(&self, _: &str, chain: &str, rule: &str, pos: i32) -> Result<(), IptablesError> {
            *self.writes.borrow_mut() += 1;
            let mut chains = self.chains.borrow_mut();
            let rules = chains.get_mut(chain).ok_or_else(|| Self::missing(chain))?;
            let at = usize::try_from(pos - 1).unwrap_or(0).min(rules.len());
            rules.insert(at, rule.into());
            Ok(())
        }
        fn exists(&self, _: &str, chain: &str, rule: &str) -> Result<bool, IptablesError> {
            Ok(self.rules(chain).iter().any(|r| r == rule))
        }
        fn delete(&self, _: &str, chain: &str, rule: &str) -> Result<(), IptablesError> {
            *self.writes.borrow_mut() += 1;
            let mut chains = self.chains.borrow_mut();
            let rules = chains.get_mut(chain).ok_or_else(|| Self::missing(chain))?;
            let at = rules
                .iter()
                .position(|r| r == rule)
                .ok_or_else(|| Self::missing(rule))?;
            rules.remove(at);
            Ok(())
        }
    }

    fn default_interception() -> Interception {
        Interception {
            metadata: "169.254.169.254:80".parse().expect("addr"),
            target: "127.0.0.1:2579".parse().expect("addr"),
        }
    }

    #[test]
    fn listing_is_upstreams_string_for_string() {
        assert_eq!(
            default_interception().expected_listing(),
            [
                "-N aad-metadata".to_owned(),
                "-A aad-metadata ! -s 127.0.0.1/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:2579".to_owned(),
                "-A aad-metadata -j RETURN".to_owned(),
            ]
        );
    }

    #[test]
    fn install_then_steady_state() {
        let m = Memory::with_prerouting();
        let i = default_interception();
        let first = reconcile(&m, &i).expect("install");
        assert!(
            first.chain_created
                && first.chain_rewritten
                && first.jump_inserted
                && first.guard_repaired
        );
        assert_eq!(m.list(TABLE, CHAIN).expect("chain"), i.expected_listing());
        assert_eq!(m.rules(PREROUTING), vec!["-j aad-metadata".to_owned()]);
        assert_eq!(
            m.list(FILTER, GUARD_CHAIN).expect("guard"),
            i.expected_guard_listing()
        );
        for hook in GUARD_HOOKS {
            assert_eq!(m.rules(hook), vec!["-j aad-metadata-guard".to_owned()]);
        }
        let writes = *m.writes.borrow();
        let second = reconcile(&m, &i).expect("steady");
        assert!(second.unchanged());
        assert_eq!(
            *m.writes.borrow(),
            writes,
            "a correct chain is not rewritten"
        );
    }

    #[test]
    fn tampering_is_repaired() {
        let i = default_interception();
        // A foreign rule in front, a duplicated DNAT, a deleted RETURN, a changed target.
        let tampered: [Vec<String>; 4] = [
            vec!["-j ACCEPT".into(), i.dnat_rule(), "-j RETURN".into()],
            vec![i.dnat_rule(), i.dnat_rule(), "-j RETURN".into()],
            vec![i.dnat_rule()],
            vec![i.dnat_rule().replace("2579", "9999"), "-j RETURN".into()],
        ];
        for rules in tampered {
            let m = Memory::with_prerouting();
            m.chains.borrow_mut().insert(CHAIN.into(), rules.clone());
            m.chains
                .borrow_mut()
                .insert(PREROUTING.into(), vec!["-j aad-metadata".into()]);
            let r = reconcile(&m, &i).expect("repair");
            assert!(r.chain_rewritten && !r.jump_inserted, "{rules:?}");
            assert_eq!(m.list(TABLE, CHAIN).expect("chain"), i.expected_listing());
        }
    }

    #[test]
    fn a_removed_or_altered_guard_is_put_back() {
        let i = default_interception();
        let m = Memory::with_prerouting();
        reconcile(&m, &i).expect("install");
        assert_eq!(
            i.guard_rule(),
            "-d 169.254.169.254/32 ! -i lo -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset"
        );
        // Flushed, altered, deleted, its jumps gone: each is repaired and reported as the guard.
        let tamper: [&dyn Fn(&Memory); 4] = [
            &|m| m.flush_chain(FILTER, GUARD_CHAIN).expect("flush"),
            &|m| {
                m.chains
                    .borrow_mut()
                    .insert(GUARD_CHAIN.into(), vec!["-j RETURN".into()]);
            },
            &|m| {
                m.chains.borrow_mut().remove(GUARD_CHAIN);
            },
            &|m| {
                m.chains.borrow_mut().insert("FORWARD".into(), vec![]);
            },
        ];
        for (n, tamper) in tamper.iter().enumerate() {
            tamper(&m);
            let r = reconcile(&m, &i).expect("repair");
            assert!(
                r.guard_repaired && !r.chain_rewritten && !r.jump_inserted,
                "{n}"
            );
            assert_eq!(r.parts().collect::<Vec<_>>(), vec!["guard"], "{n}");
            assert_eq!(
                m.list(FILTER, GUARD_CHAIN).expect("guard"),
                i.expected_guard_listing(),
                "{n}"
            );
            for hook in GUARD_HOOKS {
                assert_eq!(
                    m.rules(hook),
                    vec!["-j aad-metadata-guard".to_owned()],
                    "{n}"
                );
            }
        }
        assert!(reconcile(&m, &i).expect("steady").unchanged());
    }

    #[test]
    fn rules_after_return_are_tolerated_as_upstream() {
        let i = default_interception();
        let m = Memory::with_prerouting();
        m.chains.borrow_mut().insert(
            CHAIN.into(),
            vec![i.dnat_rule(), "-j RETURN".into(), "-j ACCEPT".into()],
        );
        let r = reconcile(&m, &i).expect("reconcile");
        assert!(!r.chain_rewritten);
    }

    #[test]
    fn a_removed_jump_is_reinserted_first() {
        let i = default_interception();
        let m = Memory::with_prerouting();
        reconcile(&m, &i).expect("install");
        m.chains
            .borrow_mut()
            .insert(PREROUTING.into(), vec!["-j KUBE-SERVICES".into()]);
        let r = reconcile(&m, &i).expect("repair");
        assert!(r.jump_inserted && !r.chain_rewritten);
        assert_eq!(m.rules(PREROUTING)[0], "-j aad-metadata");
    }

    #[test]
    fn custom_addresses_flow_into_the_rule() {
        let i = Interception {
            metadata: "10.9.8.7:8080".parse().expect("addr"),
            target: "10.0.0.4:3000".parse().expect("addr"),
        };
        assert_eq!(
            i.dnat_rule(),
            "! -s 127.0.0.1/32 -d 10.9.8.7/32 -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.0.0.4:3000"
        );
    }

    #[test]
    fn uninstall_removes_everything_and_is_idempotent() {
        let i = default_interception();
        let m = Memory::with_prerouting();
        reconcile(&m, &i).expect("install");
        m.insert(TABLE, PREROUTING, "-j aad-metadata", 2)
            .expect("dup jump");
        uninstall(&m, &i).expect("uninstall");
        assert!(m.rules(PREROUTING).is_empty());
        assert!(m.list(TABLE, CHAIN).is_err());
        assert!(m.list(FILTER, GUARD_CHAIN).is_err());
        for hook in GUARD_HOOKS {
            assert!(m.rules(hook).is_empty(), "{hook}");
        }
        uninstall(&m, &i).expect("second uninstall");
    }

    /// A fake `/proc/sys` holding `route_localnet` = `value`; removed on drop.
    struct ProcSys(std::path::PathBuf);

    impl ProcSys {
        fn new(name: &str, value: &str) -> Self {
            let root = std::env::temp_dir()
                .join(format!("podid-nmi-sysctl-{name}-{}", std::process::id()));
            let dir = root.join("net/ipv4/conf/all");
            std::fs::create_dir_all(&dir).expect("dir");
            std::fs::write(dir.join("route_localnet"), format!("{value}\n")).expect("write");
            Self(root)
        }
        fn value(&self) -> String {
            std::fs::read_to_string(self.0.join(ROUTE_LOCALNET))
                .expect("read")
                .trim()
                .to_owned()
        }
    }

    impl Drop for ProcSys {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn with_input() -> Memory {
        let m = Memory::with_prerouting();
        m.chains.borrow_mut().insert(INPUT.into(), vec![]);
        m
    }

    /// kube-proxy's guard as `iptables -S` prints it.
    const KUBE_PROXY_GUARD: &str = "-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP";

    #[test]
    fn route_localnet_set_by_nmi_comes_with_the_guard_first_and_a_record() {
        let sys = ProcSys::new("set", "0");
        let m = with_input();
        let outcome = enable_route_localnet(&m, &sys.0).expect("set");
        assert_eq!(
            outcome,
            Localnet::SetByNmi {
                prior: "0".into(),
                guard: true,
                now: true
            }
        );
        assert_eq!(sys.value(), "1");
        assert_eq!(m.rules(INPUT), vec![format!("-j {LOCALNET_CHAIN}")]);
        let chain = m.rules(LOCALNET_CHAIN);
        assert_eq!(chain[0], localnet_guard_rule());
        assert!(is_localnet_guard(&chain[0]));
        assert_eq!(chain.len(), 2, "{chain:?}");
        // A restart finds the sysctl at 1 but knows from the record that nmi set it; a removed
        // jump and a removed guard are put back.
        m.chains.borrow_mut().insert(INPUT.into(), vec![]);
        m.chains
            .borrow_mut()
            .get_mut(LOCALNET_CHAIN)
            .expect("chain")
            .remove(0);
        let again = enable_route_localnet(&m, &sys.0).expect("again");
        assert_eq!(
            again,
            Localnet::SetByNmi {
                prior: "0".into(),
                guard: true,
                now: false
            }
        );
        assert_eq!(
            m.rules(INPUT),
            vec![format!("-j {LOCALNET_CHAIN}")],
            "jump repaired"
        );
        assert_eq!(m.rules(LOCALNET_CHAIN), chain, "guard repaired");
        // Uninstall restores the sysctl and removes only nmi's chain and jump.
        m.chains
            .borrow_mut()
            .get_mut(INPUT)
            .expect("INPUT")
            .push("-j ACCEPT".into());
        assert_eq!(
            uninstall_localnet(&m, &sys.0).expect("uninstall"),
            Some("0".into())
        );
        assert_eq!(sys.value(), "0");
        assert_eq!(m.rules(INPUT), vec!["-j ACCEPT".to_owned()]);
        assert!(m.list(FILTER, LOCALNET_CHAIN).is_err());
        assert_eq!(uninstall_localnet(&m, &sys.0).expect("idempotent"), None);
    }

    #[test]
    fn route_localnet_already_set_is_left_alone_and_never_restored() {
        let sys = ProcSys::new("already", "1");
        let m = with_input();
        assert_eq!(
            enable_route_localnet(&m, &sys.0).expect("read"),
            Localnet::AlreadySet
        );
        assert!(m.rules(INPUT).is_empty());
        assert!(m.list(FILTER, LOCALNET_CHAIN).is_err());
        assert_eq!(uninstall_localnet(&m, &sys.0).expect("uninstall"), None);
        assert_eq!(sys.value(), "1", "a sysctl nmi did not change stays");
    }

    #[test]
    fn an_equivalent_guard_is_not_duplicated() {
        let sys = ProcSys::new("equivalent", "0");
        let m = with_input();
        m.chains
            .borrow_mut()
            .insert(INPUT.into(), vec!["-j KUBE-FIREWALL".into()]);
        let guard = KUBE_PROXY_GUARD
            .strip_prefix("-A KUBE-FIREWALL ")
            .expect("prefix");
        m.chains
            .borrow_mut()
            .insert("KUBE-FIREWALL".into(), vec![guard.into()]);
        let outcome = enable_route_localnet(&m, &sys.0).expect("set");
        assert_eq!(
            outcome,
            Localnet::SetByNmi {
                prior: "0".into(),
                guard: false,
                now: true
            }
        );
        assert_eq!(sys.value(), "1");
        let chain = m.rules(LOCALNET_CHAIN);
        assert!(!chain.iter().any(|r| is_localnet_guard(r)), "{chain:?}");
        // kube-proxy's rule goes away while nmi's change stands: the next pass adds nmi's own.
        m.chains.borrow_mut().insert("KUBE-FIREWALL".into(), vec![]);
        let again = enable_route_localnet(&m, &sys.0).expect("repair");
        assert!(
            matches!(
                again,
                Localnet::SetByNmi {
                    guard: true,
                    now: false,
                    ..
                }
            ),
            "{again:?}"
        );
        assert_eq!(m.rules(LOCALNET_CHAIN)[0], localnet_guard_rule());
        m.chains
            .borrow_mut()
            .insert("KUBE-FIREWALL".into(), vec![guard.into()]);
        assert_eq!(
            uninstall_localnet(&m, &sys.0).expect("uninstall"),
            Some("0".into())
        );
        assert_eq!(
            m.rules("KUBE-FIREWALL"),
            vec![guard.to_owned()],
            "kube-proxy's rule stays"
        );
        assert_eq!(m.rules(INPUT), vec!["-j KUBE-FIREWALL".to_owned()]);
    }

    #[test]
    fn a_sysctl_that_cannot_be_written_leaves_no_chain() {
        let sys = ProcSys::new("missing", "0");
        let m = with_input();
        let missing = sys.0.join("nowhere");
        let error = enable_route_localnet(&m, &missing).expect_err("no such file");
        assert!(
            matches!(
                error,
                LocalnetError::Sysctl {
                    action: "reading",
                    ..
                }
            ),
            "{error}"
        );
        // A directory where the file should be: reading fails the same way; a write failure
        // after the guard went in removes the guard again.
        let dir = sys.0.join(ROUTE_LOCALNET);
        std::fs::remove_file(&dir).expect("rm");
        std::fs::create_dir_all(&dir).expect("dir");
        assert!(enable_route_localnet(&m, &sys.0).is_err());
        assert!(m.rules(INPUT).is_empty());
        assert!(m.list(FILTER, LOCALNET_CHAIN).is_err());
    }

    #[test]
    fn guard_equivalence_table() {
        let rows: &[(&str, bool)] = &[
            (KUBE_PROXY_GUARD, true),
            (localnet_guard_rule(), true),
            // Match order and comment do not matter.
            (
                "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate DNAT,RELATED,ESTABLISHED -j DROP",
                true,
            ),
            // Narrower or different rules are not the guard.
            (
                "! -s 127.0.0.0/8 -d 127.0.0.0/8 -i eth0 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
                false,
            ),
            (
                "! -s 127.0.0.0/8 -d 127.0.0.0/8 -p tcp -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
                false,
            ),
            (
                "! -s 127.0.0.0/8 -d 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED -j DROP",
                false,
            ),
            (
                "! -s 127.0.0.0/8 -d 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j ACCEPT",
                false,
            ),
            (
                "-s 127.0.0.0/8 -d 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
                false,
            ),
            (
                "! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
                false,
            ),
            ("-j DROP", false),
            ("", false),
        ];
        let failures: Vec<String> = rows
            .iter()
            .filter(|(rule, want)| is_localnet_guard(rule) != *want)
            .map(|(rule, want)| format!("{rule:?}: want {want}"))
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
