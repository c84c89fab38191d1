//! Which identity and which credential source a calling pod gets, or why not: the selection
//! policy of podid, shared by nmi (per token request), mic (which bindings select a pod, for its
//! desired assignments) and podidctl (`status`, `doctor`, `explain`), so the three cannot
//! disagree.
//!
//! Pure: plain values in, plain values out. No IO, no async, no clock, no locks.
//!
//! - [`select`] ([`decision`]): the decision for one request — the identity and its credential
//!   [`Source`], the node's identity, a Workload Identity grant, a wait, or a [`Refusal`] saying
//!   how it is answered and whether it is final;
//! - [`matching`]: [`matching::MatchIndex`], the indexes over identities, bindings, assignments
//!   and exceptions, and the matching decision for one request;
//! - [`federated`]: the federated switch (`podid.io/token-source: federated`) and its trust
//!   boundary; [`assigned`]: which binding copy decides it for a pod (the one recorded in the
//!   pod's assignment, else the live binding);
//! - [`workload`]: whether a Workload Identity pod that calls IMDS is served, and how;
//! - `cases` (feature `cases`): a table of requests and their expected answers that nmi's and
//!   podidctl's tests run through their own paths.

pub mod assigned;
#[cfg(any(test, feature = "cases"))]
pub mod cases;
pub mod decision;
pub mod federated;
pub mod matching;
pub mod workload;

pub use decision::{Refusal, Selection, Snapshot, Source, select};
