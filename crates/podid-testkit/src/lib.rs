//! Test doubles that speak the real wire protocols, so the product's code runs unchanged against
//! them: a fake Kubernetes API server, an Azure simulator (Entra, IMDS, ARM) and pods as network
//! namespaces. Never shipped (`publish = false`). Each part is its own crate so it can be built
//! and tested alone; this crate gathers them under one name.

pub use podid_azure_sim as azure;
pub use podid_fake_apiserver as kube;
pub use podid_netsim as netns;
