//! podid's node agent (`nmi`): intercepts pods' traffic to the instance metadata address with
//! iptables, attributes each request to the calling pod by its source address, chooses the pod's
//! identity and answers with a token from podid-broker's token broker — or an IMDS-shaped error.
//!
//! Modules: the command line ([`config`]), the interception rules ([`interception`]), what keeps
//! the node from serving ([`health`]), when to repair the rules ([`ruleset`]), the start-up taint ([`taint`]), the IP → pod
//! index ([`pods`]), the kernel route probe anchoring pod addresses ([`route`]), the token
//! provider seam ([`provider`]), the matcher the watches fill ([`state`]), the HTTP servers
//! ([`server`]: accept loop and bounds, routes, the grant, IMDS answers, passthrough, probes),
//! metrics ([`metrics`]), Kubernetes Events on pods whose requests fail ([`events`]), the
//! conntrack flush ([`conntrack`]), Workload Identity pods served through IMDS ([`workload`]), the watches feeding them ([`run`]) and the running agent that
//! wires it all together ([`agent`]). Identity matching lives in `podid_select::matching`.
//! Wire formats come from `podid-imds`; this crate must not write IMDS bodies itself.
//! Must not depend on the test doubles (`podid-testkit` and friends).

pub mod agent;
pub mod config;
pub mod conntrack;
pub mod events;
pub mod health;
pub mod interception;
pub mod metrics;
pub mod pods;
pub mod provider;
pub mod route;
pub mod ruleset;
pub mod run;
pub mod server;
pub mod state;
pub mod taint;
mod watchdog;
pub mod workload;
