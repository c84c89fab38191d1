//! A fake Kubernetes API server over plain HTTP that kube's `Client`, `Api<K>`, `watcher` and
//! `reflector` use unchanged, through a kubeconfig it writes.
//!
//! It stores raw JSON for any registered kind (core Pods, Nodes, Namespaces, Secrets,
//! ServiceAccounts, ConfigMaps, Events, Endpoints; events.k8s.io Events; Leases; the four
//! aad-pod-identity CRDs; anything added with `register_kind`), keeps a global
//! `resourceVersion`, serves list/watch with label and field selectors, create/replace/patch/
//! delete with finalizers and status subresources, ServiceAccount TokenRequest with an OIDC
//! issuer, and fault hooks for tests.
//!
//! Test-only: it must not be a dependency of shipped crates, and it must not depend on product
//! crates (nor on kube: it speaks the wire protocol, so a bug in kube's types cannot hide here).

pub mod kinds;
pub mod meta;
pub mod selector;
pub mod status;
pub mod store;

pub use kinds::KindSpec;
pub use status::ApiError;
