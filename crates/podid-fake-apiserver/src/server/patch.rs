//! PATCH: JSON merge, strategic merge (built-in kinds only), JSON patch and server-side apply.

use super::resource::parse_json;
use crate::status::ApiError;
use crate::store::{Store, Target};
use http::StatusCode;
use serde_json::{Value, json};

/// Server-side apply's parameters.
pub(super) struct Apply {
    pub(super) manager: String,
    pub(super) force: bool,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn patch(
    store: &mut Store,
    kind: usize,
    ns: &str,
    name: &str,
    target: Target,
    content_type: &str,
    body: &[u8],
    apply: &Apply,
) -> Result<(StatusCode, Value), ApiError> {
    let ct = content_type.split(';').next().unwrap_or("").trim();
    if ct == "application/strategic-merge-patch+json" && store.kinds()[kind].custom {
        // Custom resources have no patch strategy: the real server refuses.
        return Err(ApiError::unsupported_media(ct));
    }
    let existing = store.get(kind, ns, name);
    let patched = match ct {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let mut doc = existing?;
            json_patch::merge(&mut doc, &parse_json(body)?);
            doc
        }
        "application/json-patch+json" => {
            let mut doc = existing?;
            let ops: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(&mut doc, &ops).map_err(|e| ApiError {
                code: 422,
                reason: "Invalid",
                message: format!("the JSON patch could not be applied: {e}"),
                details: None,
                retry_after: None,
            })?;
            doc
        }
        "application/apply-patch+yaml" => {
            let applied: Value = serde_norway::from_slice(body)
                .map_err(|e| ApiError::bad_request(format!("invalid apply patch: {e}")))?;
            if apply.manager.is_empty() {
                return Err(ApiError::bad_request(
                    "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                ));
            }
            match existing {
                Ok(mut doc) => {
                    store.apply_ownership(
                        kind,
                        ns,
                        name,
                        &doc,
                        &applied,
                        &apply.manager,
                        apply.force,
                    )?;
                    json_patch::merge(&mut doc, &applied);
                    doc
                }
                Err(e) if e.code == 404 && target == Target::Main => {
                    let mut obj = applied.clone();
                    if obj.is_object() {
                        obj["metadata"]["name"] = json!(name);
                    }
                    let created = store.create(kind, ns, obj)?;
                    store.apply_ownership(
                        kind,
                        ns,
                        name,
                        &created,
                        &applied,
                        &apply.manager,
                        true,
                    )?;
                    return Ok((StatusCode::CREATED, created));
                }
                Err(e) => return Err(e),
            }
        }
        other => return Err(ApiError::unsupported_media(other)),
    };
    Ok((
        StatusCode::OK,
        store.update(kind, ns, name, patched, target)?,
    ))
}
