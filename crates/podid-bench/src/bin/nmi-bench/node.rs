//! The node and cluster the bench builds: its pods, the identities, bindings and assignments
//! of the match index, and the token source behind the broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Pod, PodIP, PodSpec, PodStatus};
use podid_api::{
    AssignedIdentityState, AzureAssignedIdentity, AzureIdentity, AzureIdentityBinding,
};
use podid_broker::{
    BrokerError, FetchRequest, ImdsLimiter, LimiterConfig, SourceFuture, SourceKind, Token,
    TokenSource,
};

use crate::noise::NOISY_IP;

const NAMESPACES: usize = 10;
/// Length of the fake access tokens: the size of a typical Entra access token.
const TOKEN_LEN: usize = 1400;

/// The node and cluster the bench builds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) pods: usize,
    pub(crate) identities: usize,
    pub(crate) used: usize,
}

/// A token source that answers at once and counts its calls; once `limited`, each call first
/// takes a turn in `limiter` and lasts 50 ms, like a call to IMDS.
#[derive(Debug)]
pub(crate) struct CountingSource {
    pub(crate) calls: AtomicU64,
    pub(crate) limited: std::sync::atomic::AtomicBool,
    limiter: ImdsLimiter,
}

impl Default for CountingSource {
    fn default() -> Self {
        Self {
            calls: AtomicU64::new(0),
            limited: std::sync::atomic::AtomicBool::new(false),
            limiter: ImdsLimiter::new(LimiterConfig::default()),
        }
    }
}

impl TokenSource for CountingSource {
    fn kind(&self) -> SourceKind {
        SourceKind::Imds
    }

    fn fetch<'a>(&'a self, request: &'a FetchRequest) -> SourceFuture<'a> {
        Box::pin(async move {
            if self.limited.load(Ordering::Relaxed) {
                let _turn = self
                    .limiter
                    .acquire_for(request.requester.clone())
                    .await
                    .map_err(|e| BrokerError::Unavailable {
                        source_kind: SourceKind::Imds,
                        client_id: request.identity.client_id.clone(),
                        reason: e.to_string(),
                        retry_after: None,
                    })?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let n = self.calls.fetch_add(1, Ordering::Relaxed);
            let mut access = format!("bench-token-{}-{n}-", request.identity.client_id);
            while access.len() < TOKEN_LEN {
                access.push('x');
            }
            Ok::<_, BrokerError>(Token::new(
                access,
                request.resource.clone(),
                unix_now() + 86_400,
            ))
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn pod(i: usize) -> Pod {
    // Pod 0 is this process: its address is the load client's; pod 1 is the noisy pod.
    let ip = if i == 0 {
        "127.0.0.1".to_owned()
    } else if i == 1 {
        std::net::Ipv4Addr::from(NOISY_IP).to_string()
    } else {
        format!("10.244.{}.{}", i / 250, i % 250 + 1)
    };
    let mut p = Pod::default();
    p.metadata.namespace = Some(format!("ns-{}", i % NAMESPACES));
    p.metadata.name = Some(format!("pod-{i}"));
    p.metadata.labels = Some(
        [
            ("aadpodidbinding".to_owned(), format!("sel-{i}")),
            ("app".to_owned(), format!("app-{i}")),
        ]
        .into(),
    );
    p.spec = Some(PodSpec {
        service_account_name: Some(format!("sa-{i}")),
        ..Default::default()
    });
    p.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.clone()),
        pod_ips: Some(vec![PodIP { ip }]),
        ..Default::default()
    });
    p
}

/// Identity `j < used` lives in pod `j % pods`'s namespace, is bound to that pod's selector
/// and assigned to it; identity `j ≥ used` is bound to a selector no pod on the node carries
/// (it is in the indexes, not in the assignments or the token cache).
pub(crate) struct Objects {
    pub(crate) identities: Vec<Arc<AzureIdentity>>,
    pub(crate) bindings: Vec<Arc<AzureIdentityBinding>>,
    pub(crate) assignments: Vec<Arc<AzureAssignedIdentity>>,
}

pub(crate) fn objects(shape: Shape) -> Objects {
    let mut out = Objects {
        identities: Vec::with_capacity(shape.identities),
        bindings: Vec::with_capacity(shape.identities),
        assignments: Vec::with_capacity(shape.used),
    };
    for j in 0..shape.identities {
        let owner = j % shape.pods;
        let ns = format!("ns-{}", owner % NAMESPACES);
        let name = format!("id-{j}");
        let client_id = format!("{j:08x}-0000-4000-8000-{j:012x}");
        let resource_id = format!(
            "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        );
        let identity = AzureIdentity::user_assigned(&ns, &name, &resource_id, &client_id);
        let selector = if j < shape.used {
            format!("sel-{owner}")
        } else {
            format!("sel-elsewhere-{j}")
        };
        let binding =
            AzureIdentityBinding::for_selector(&ns, &format!("{name}-binding"), &name, &selector);
        let mut assigned = AzureAssignedIdentity::for_pod(
            "default",
            &format!("pod-{owner}"),
            &ns,
            "node-0",
            identity.clone(),
            binding.clone(),
        );
        if let Some(status) = assigned.status.as_mut() {
            status.status = Some(AssignedIdentityState::Assigned);
        }
        out.identities.push(Arc::new(identity));
        out.bindings.push(Arc::new(binding));
        if j < shape.used {
            out.assignments.push(Arc::new(assigned));
        }
    }
    out
}
