//! podid's node agent (`nmi`): intercepts pods' traffic to the instance metadata address with
//! iptables, attributes each request to the calling pod by its source address, chooses the pod's
//! identity and answers with a token from the controller crate's broker — or an IMDS-shaped error.
//!
//! Built so far: the command line ([`config`]) and the interception rules ([`interception`]).
//! Wire formats come from `podid-imds`; this crate must not write IMDS bodies itself.
//! Must not depend on the test doubles (`podid-testkit` and friends).

pub mod config;
pub mod interception;
pub mod pods;
