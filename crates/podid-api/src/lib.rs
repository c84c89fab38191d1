//! Types of the `aadpodidentity.k8s.io/v1` custom resources, shared constants, and CRD generation.
//!
//! Must not depend on a Kubernetes client, tokio or any IO.
