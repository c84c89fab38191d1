//! The iptables interception of reference §2.15: table `nat`, chain `aad-metadata` jumped to from
//! `PREROUTING`, DNAT of pod traffic to the IMDS address onto NMI's listener.
//!
//! The rules are upstream's, string for string, so nodes moving between the Go NMI and podid see
//! the same chain. Differences (docs/compatibility.md): the rules stay when NMI stops (fail
//! closed; [`uninstall`] is an explicit step), and `route_localnet` is set and verified so the DNAT
//! to 127.0.0.1 works on nodes without kube-proxy ([`ensure_route_localnet`]).
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

/// What a reconcile pass did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reconciled {
    /// The chain was missing and created.
    pub chain_created: bool,
    /// The chain's rules were wrong and rewritten.
    pub chain_rewritten: bool,
    /// The `PREROUTING` jump was missing and inserted at position 1.
    pub jump_inserted: bool,
}

impl Reconciled {
    /// True when the pass changed nothing.
    pub fn unchanged(&self) -> bool {
        !(self.chain_created || self.chain_rewritten || self.jump_inserted)
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
/// `PREROUTING` jump exists anywhere, inserting it at position 1 when missing.
pub fn reconcile(
    backend: &dyn Backend,
    interception: &Interception,
) -> Result<Reconciled, IptablesError> {
    let mut outcome = Reconciled::default();
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

/// Removes the interception: every `PREROUTING` jump, then the chain. Idempotent.
pub fn uninstall(backend: &dyn Backend, interception: &Interception) -> Result<(), IptablesError> {
    let jump = interception.jump_rule();
    while backend.exists(TABLE, PREROUTING, &jump)? {
        backend.delete(TABLE, PREROUTING, &jump)?;
    }
    if backend.list(TABLE, CHAIN).is_ok() {
        backend.flush_chain(TABLE, CHAIN)?;
        backend.delete_chain(TABLE, CHAIN)?;
    }
    Ok(())
}

/// Sets `net.ipv4.conf.all.route_localnet=1` under `proc_sys` (normally `/proc/sys`) unless it
/// is already set, then reads it back. Without it the kernel drops packets DNAT-ed from
/// `PREROUTING` to 127.0.0.1 (kube-proxy sets it; a node without kube-proxy may not).
/// Returns whether it had to be changed.
pub fn ensure_route_localnet(proc_sys: &Path) -> Result<bool, std::io::Error> {
    let path = proc_sys.join("net/ipv4/conf/all/route_localnet");
    let current = std::fs::read_to_string(&path)?;
    if current.trim() == "1" {
        return Ok(false);
    }
    std::fs::write(&path, "1")?;
    let after = std::fs::read_to_string(&path)?;
    if after.trim() != "1" {
        return Err(std::io::Error::other(format!(
            "{} reads {:?} after writing 1",
            path.display(),
            after.trim()
        )));
    }
    Ok(true)
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
            m.chains.borrow_mut().insert(PREROUTING.into(), vec![]);
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
        assert!(first.chain_created && first.chain_rewritten && first.jump_inserted);
        assert_eq!(m.list(TABLE, CHAIN).expect("chain"), i.expected_listing());
        assert_eq!(m.rules(PREROUTING), vec!["-j aad-metadata".to_owned()]);
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
        uninstall(&m, &i).expect("second uninstall");
    }

    #[test]
    fn route_localnet_is_set_and_verified() {
        let root = std::env::temp_dir().join(format!("podid-nmi-sysctl-{}", std::process::id()));
        let dir = root.join("net/ipv4/conf/all");
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("route_localnet");
        std::fs::write(&file, "0\n").expect("write");
        assert!(ensure_route_localnet(&root).expect("set"));
        assert_eq!(std::fs::read_to_string(&file).expect("read").trim(), "1");
        assert!(!ensure_route_localnet(&root).expect("already set"));
        std::fs::remove_dir_all(&root).expect("cleanup");
        assert!(
            ensure_route_localnet(&root).is_err(),
            "missing file is an error"
        );
    }
}
