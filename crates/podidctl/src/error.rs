//! The CLI's errors: each says what failed and names the object, in one line.

/// What can go wrong talking to the cluster or resolving what the user named.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig (or in-cluster configuration) could not be loaded.
    #[error("cannot load the Kubernetes client configuration")]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The API server could not be reached at all.
    #[error("cannot reach the Kubernetes API server at {url}")]
    Unreachable {
        /// The server URL from the configuration.
        url: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The API server answered a request with an error.
    #[error("reading {what} from the Kubernetes API server failed: {detail}")]
    Read {
        /// What was read (`pods in namespace apps`).
        what: String,
        /// The API server's status code and message.
        detail: String,
    },
    /// The pod named on the command line does not exist.
    #[error("pod {namespace}/{name} not found")]
    PodNotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The `AzureIdentity` named on the command line does not exist.
    #[error("AzureIdentity {namespace}/{name} not found")]
    IdentityNotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// `doctor` needs `<namespace>/<pod>` or `<pod>` (with `--namespace`).
    #[error("expected <namespace>/<pod> or <pod> with --namespace, got {0:?}")]
    BadPodRef(String),
    /// The issuer could not be discovered and was not given.
    #[error(
        "cannot discover the service-account issuer from {url}/.well-known/openid-configuration; pass --issuer"
    )]
    Issuer {
        /// The server URL.
        url: String,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The error and its causes on one line, `a: b: c`.
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out.replace('\n', " ")
}
