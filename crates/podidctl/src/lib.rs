//! `podidctl`, the migration CLI: reads a cluster (read-only, through the usual kubeconfig) and
//! explains which pod gets which identity by which path (`status`), what one pod would get and
//! why with a concrete fix for every problem (`doctor`; without a pod, the cluster's
//! configurations that weaken the namespace boundary, [`risks`]), and the ordered, reversible steps that
//! move one identity to Workload Identity federation (`migrate`).
//!
//! The decisions are not re-implemented: [`explain`] feeds the cluster's objects to
//! `podid_select::matching::MatchIndex` (the matcher nmi uses) and to
//! `podid_select::federated::federated_credential` (nmi's federated switch), so the CLI says
//! what nmi would decide. [`explain`] (the snapshot it reads, the decision per pod, the findings
//! with their fixes, the report), [`migrate`] and [`render`] work on plain values;
//! only [`cluster`] talks to the API server.
//!
//! Must not depend on the test doubles, hyper servers or iptables, and must never write to the
//! cluster or print a Secret's content (only the names of its keys are looked at).

pub mod args;
pub mod cluster;
pub mod error;
pub mod explain;
pub mod migrate;
pub mod render;
pub mod risks;
pub mod run;

pub use error::Error;
