//! `--startup-taint=<key>`: a node pool created with a `NoSchedule` taint of that key runs no
//! workload pod until nmi on the node removes the taint, which it does once its interception is
//! installed and its caches are synced. The node is then closed before its first workload pod.
//!
//! Only that one taint is removed, with a JSON patch that tests the taint's key and effect at
//! its index before removing it: a taint added, removed or reordered concurrently by anyone
//! else makes the test fail (422), and nmi reads the Node again and retries, so it never
//! rewrites the list and never drops another component's taint. Needs `get` and `patch` on
//! `nodes` (granted only when the flag is set).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::serde_json::{self, Value, json};
use kube::Api;

/// The effect of the start-up taint.
pub const EFFECT: &str = "NoSchedule";

/// The JSON patch removing the `NoSchedule` taint `key` from `taints` (the Node's
/// `spec.taints`, in order), or `None` when the Node does not carry it. Tests the key and the
/// effect at the index first, so it applies only to the list it was computed from.
pub fn removal_patch(taints: &[Taint], key: &str) -> Option<Value> {
    let index = taints
        .iter()
        .position(|t| t.key == key && t.effect == EFFECT)?;
    Some(json!([
        {"op": "test", "path": format!("/spec/taints/{index}/key"), "value": key},
        {"op": "test", "path": format!("/spec/taints/{index}/effect"), "value": EFFECT},
        {"op": "remove", "path": format!("/spec/taints/{index}")},
    ]))
}

/// What [`remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// The taint was on the Node and is gone now.
    Removed,
    /// The Node did not carry the taint.
    Absent,
}

/// Remove the `NoSchedule` taint `key` from the Node `node`, retrying until it is gone: a lost
/// race (the test op failed, 422, or a conflict, 409) re-reads the Node at once; other failures
/// (RBAC, API server down) are logged and retried with backoff up to 10 s. Runs until done.
pub async fn remove(client: kube::Client, node: &str, key: &str) -> Removed {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut backoff = Duration::from_millis(200);
    let mut removed_once = false;
    loop {
        let attempt = async {
            let current = nodes.get(node).await?;
            let taints = current
                .spec
                .and_then(|spec| spec.taints)
                .unwrap_or_default();
            let Some(patch) = removal_patch(&taints, key) else {
                return Ok(false);
            };
            let body = serde_json::to_vec(&patch).map_err(kube::Error::SerdeError)?;
            let request = http::Request::patch(format!("/api/v1/nodes/{node}"))
                .header(http::header::CONTENT_TYPE, "application/json-patch+json")
                .body(body)
                .map_err(kube::Error::HttpError)?;
            client.request::<Node>(request).await?;
            Ok::<bool, kube::Error>(true)
        };
        match attempt.await {
            Ok(true) => {
                removed_once = true;
                tracing::info!(%node, key, "removed the start-up taint: the node is closed");
            }
            Ok(false) if removed_once => return Removed::Removed,
            Ok(false) => return Removed::Absent,
            Err(kube::Error::Api(status)) if matches!(status.code, 409 | 422) => {
                tracing::debug!(%node, key, reason = %status.message, "taints changed meanwhile, retrying");
                continue;
            }
            Err(error) => {
                tracing::warn!(%node, key, %error, "removing the start-up taint failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint {
            key: key.to_owned(),
            effect: effect.to_owned(),
            ..Taint::default()
        }
    }

    #[test]
    fn the_patch_removes_only_the_noschedule_taint_of_that_key() {
        let taints = [
            taint("a", "NoSchedule"),
            taint("podid.io/closed", "NoExecute"),
            taint("podid.io/closed", "NoSchedule"),
            taint("b", "NoSchedule"),
        ];
        let patch = removal_patch(&taints, "podid.io/closed").expect("present");
        assert_eq!(
            patch,
            json!([
                {"op": "test", "path": "/spec/taints/2/key", "value": "podid.io/closed"},
                {"op": "test", "path": "/spec/taints/2/effect", "value": "NoSchedule"},
                {"op": "remove", "path": "/spec/taints/2"},
            ])
        );
        assert_eq!(removal_patch(&taints[..2], "podid.io/closed"), None);
        assert_eq!(removal_patch(&[], "podid.io/closed"), None);
    }
}
