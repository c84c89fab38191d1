//! The decision part of an identity update, without IO: the identity a VM/VMSS has
//! ([`IdentityState`], read from a GET body), and the PATCH bodies that move it to the wanted
//! set ([`plan_patches`]): only real changes, `{}` to add and `null` to remove, the right
//! `type` for each step, at most [`MAX_IDS_PER_PATCH`] entries per body.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use super::ids::IdentityResourceId;

/// ARM's limit of user-assigned identity entries in one request (docs/upstream.md#arm-calls).
pub const MAX_IDS_PER_PATCH: usize = 150;

/// `identity.type` of a VM or VMSS, ARM's `ResourceIdentityType` (not an `AzureIdentity`'s
/// `spec.type`, which is `podid_api::IdentityType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceIdentityType {
    /// No managed identity (also an absent `identity`).
    None,
    /// Only the system-assigned identity.
    SystemAssigned,
    /// Only user-assigned identities.
    UserAssigned,
    /// Both.
    SystemAssignedUserAssigned,
}

impl ResourceIdentityType {
    /// ARM's spelling (`SystemAssigned, UserAssigned` for both).
    pub fn as_arm_str(self) -> &'static str {
        match self {
            Self::None => "None",
            Self::SystemAssigned => "SystemAssigned",
            Self::UserAssigned => "UserAssigned",
            Self::SystemAssignedUserAssigned => "SystemAssigned, UserAssigned",
        }
    }

    /// Parses ARM's spelling, ignoring case and spaces; `""` is `None`.
    pub fn parse(value: &str) -> Option<Self> {
        let norm: String = value
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        match norm.as_str() {
            "" | "none" => Some(Self::None),
            "systemassigned" => Some(Self::SystemAssigned),
            "userassigned" => Some(Self::UserAssigned),
            "systemassigned,userassigned" | "userassigned,systemassigned" => {
                Some(Self::SystemAssignedUserAssigned)
            }
            _ => None,
        }
    }

    /// Whether the system-assigned identity is on.
    pub fn has_system(self) -> bool {
        matches!(
            self,
            Self::SystemAssigned | Self::SystemAssignedUserAssigned
        )
    }

    /// The type for a resource with (or without) the system identity and with `users`
    /// user-assigned identities (docs/upstream.md#arm-calls).
    pub fn for_parts(system: bool, users: bool) -> Self {
        match (system, users) {
            (false, false) => Self::None,
            (true, false) => Self::SystemAssigned,
            (false, true) => Self::UserAssigned,
            (true, true) => Self::SystemAssignedUserAssigned,
        }
    }
}

/// The identity part of a VM or VMSS as a GET returned it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityState {
    /// `identity.type`.
    pub identity_type: ResourceIdentityType,
    /// Keys of `identity.userAssignedIdentities`, lower-cased (they need not be ids MIC manages).
    pub user_assigned: BTreeSet<String>,
    /// `properties.provisioningState` (`Succeeded`, `Updating`, `Deleting`, …; empty if absent).
    pub provisioning_state: String,
}

impl IdentityState {
    /// Reads a VM/VMSS GET body. An absent `identity` is type `None` with no ids.
    pub fn from_resource(body: &Value) -> Result<Self, String> {
        let provisioning_state = body
            .pointer("/properties/provisioningState")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let identity = match body.get("identity") {
            None | Some(Value::Null) => {
                return Ok(Self {
                    identity_type: ResourceIdentityType::None,
                    user_assigned: BTreeSet::new(),
                    provisioning_state,
                });
            }
            Some(Value::Object(m)) => m,
            Some(_) => return Err("`identity` is not an object".to_owned()),
        };
        let type_str = identity.get("type").and_then(Value::as_str).unwrap_or("");
        let identity_type = ResourceIdentityType::parse(type_str)
            .ok_or_else(|| format!("unknown identity type {type_str:?}"))?;
        let user_assigned = match identity.get("userAssignedIdentities") {
            None | Some(Value::Null) => BTreeSet::new(),
            Some(Value::Object(m)) => m.keys().map(|k| k.to_ascii_lowercase()).collect(),
            Some(_) => return Err("`userAssignedIdentities` is not an object".to_owned()),
        };
        Ok(Self {
            identity_type,
            user_assigned,
            provisioning_state,
        })
    }

    /// Whether `id` is assigned (ids are compared lower-cased).
    pub fn contains(&self, id: &IdentityResourceId) -> bool {
        self.user_assigned.contains(id.as_str())
    }

    /// Whether ARM will refuse updates (`provisioningState` is `Deleting`).
    pub fn is_deleting(&self) -> bool {
        self.provisioning_state.eq_ignore_ascii_case("Deleting")
    }
}

/// One PATCH body and what it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPatch {
    /// Ids this PATCH adds.
    pub add: Vec<IdentityResourceId>,
    /// Ids this PATCH removes.
    pub remove: Vec<IdentityResourceId>,
    /// The `type` sent.
    pub identity_type: ResourceIdentityType,
}

impl PlannedPatch {
    /// Every id this PATCH touches.
    pub fn ids(&self) -> Vec<IdentityResourceId> {
        self.add.iter().chain(&self.remove).cloned().collect()
    }

    /// The body: `{"identity":{"type":…,"userAssignedIdentities":{"<id>":{}|null}}}`; the map is
    /// left out when no user-assigned identity remains (the type then clears them all).
    pub fn body(&self) -> Value {
        let mut identity = json!({ "type": self.identity_type.as_arm_str() });
        if matches!(
            self.identity_type,
            ResourceIdentityType::UserAssigned | ResourceIdentityType::SystemAssignedUserAssigned
        ) {
            let mut map = Map::new();
            for id in &self.add {
                map.insert(id.as_str().to_owned(), json!({}));
            }
            for id in &self.remove {
                map.insert(id.as_str().to_owned(), Value::Null);
            }
            identity["userAssignedIdentities"] = Value::Object(map);
        }
        json!({ "identity": identity })
    }
}

/// The real changes: ids to add that are absent, ids to remove that are present. An id in both
/// lists is added (docs/upstream.md#arm-calls). Both results are sorted and free of duplicates.
pub fn changes(
    state: &IdentityState,
    add: &[IdentityResourceId],
    remove: &[IdentityResourceId],
) -> (Vec<IdentityResourceId>, Vec<IdentityResourceId>) {
    let adds: BTreeSet<&IdentityResourceId> = add.iter().collect();
    let to_add = adds
        .iter()
        .filter(|id| !state.contains(id))
        .map(|id| (*id).clone())
        .collect();
    let to_remove = remove
        .iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|id| !adds.contains(id) && state.contains(id))
        .cloned()
        .collect();
    (to_add, to_remove)
}

/// The PATCHes that apply `to_add` and `to_remove` (already real changes, see [`changes`]) to
/// `state`: additions first, then removals, at most `max_per_patch` entries each. Each body's
/// `type` is the one the resource has after that step: the system-assigned identity is kept,
/// and when no user-assigned identity is left the type becomes `SystemAssigned` or `None` and
/// the map is left out. No changes → no PATCH.
pub fn plan_patches(
    state: &IdentityState,
    to_add: &[IdentityResourceId],
    to_remove: &[IdentityResourceId],
    max_per_patch: usize,
) -> Vec<PlannedPatch> {
    let max = max_per_patch.max(1);
    let system = state.identity_type.has_system();
    let mut current: BTreeSet<String> = state.user_assigned.clone();
    let mut patches = Vec::new();
    let steps = to_add
        .iter()
        .map(|id| (id, true))
        .chain(to_remove.iter().map(|id| (id, false)))
        .collect::<Vec<_>>();
    for chunk in steps.chunks(max) {
        let mut patch = PlannedPatch {
            add: Vec::new(),
            remove: Vec::new(),
            identity_type: ResourceIdentityType::None,
        };
        for (id, is_add) in chunk {
            if *is_add {
                current.insert(id.as_str().to_owned());
                patch.add.push((*id).clone());
            } else {
                current.remove(id.as_str());
                patch.remove.push((*id).clone());
            }
        }
        patch.identity_type = ResourceIdentityType::for_parts(system, !current.is_empty());
        patches.push(patch);
    }
    patches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> IdentityResourceId {
        IdentityResourceId::parse(&format!(
            "/subscriptions/s/resourceGroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        ))
        .expect("valid")
    }

    fn state(t: ResourceIdentityType, ids: &[&IdentityResourceId]) -> IdentityState {
        IdentityState {
            identity_type: t,
            user_assigned: ids.iter().map(|i| i.as_str().to_owned()).collect(),
            provisioning_state: "Succeeded".to_owned(),
        }
    }

    #[test]
    fn reads_get_bodies() {
        let body = json!({
            "identity": {
                "type": "SystemAssigned, UserAssigned",
                "principalId": "p",
                "userAssignedIdentities": {
                    "/subscriptions/s/resourceGroups/RG/providers/Microsoft.ManagedIdentity/userAssignedIdentities/A": {"clientId": "c"}
                }
            },
            "properties": {"provisioningState": "Updating"}
        });
        let s = IdentityState::from_resource(&body).expect("parses");
        assert_eq!(
            s.identity_type,
            ResourceIdentityType::SystemAssignedUserAssigned
        );
        assert!(s.contains(&id("a")));
        assert_eq!(s.provisioning_state, "Updating");
        assert!(!s.is_deleting());

        let none =
            IdentityState::from_resource(&json!({"properties": {"provisioningState": "Deleting"}}))
                .expect("parses");
        assert_eq!(none.identity_type, ResourceIdentityType::None);
        assert!(none.user_assigned.is_empty());
        assert!(none.is_deleting());

        assert!(IdentityState::from_resource(&json!({"identity": {"type": "Weird"}})).is_err());
        assert!(IdentityState::from_resource(&json!({"identity": 3})).is_err());
    }

    #[test]
    fn only_real_changes_add_wins() {
        let (a, b, c) = (id("a"), id("b"), id("c"));
        let s = state(ResourceIdentityType::UserAssigned, &[&a, &b]);
        let (add, remove) = changes(
            &s,
            &[a.clone(), c.clone(), c.clone()],
            &[b.clone(), c.clone(), id("zz")],
        );
        assert_eq!(add, vec![c.clone()]);
        assert_eq!(remove, vec![b.clone()]);
        assert!(plan_patches(&s, &[], &[], 150).is_empty());
    }

    #[test]
    fn add_body_shape() {
        let a = id("a");
        let s = state(ResourceIdentityType::None, &[]);
        let p = plan_patches(&s, std::slice::from_ref(&a), &[], 150);
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].body(),
            json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {
                "/subscriptions/s/resourcegroups/rg/providers/microsoft.managedidentity/userassignedidentities/a": {}
            }}})
        );
    }

    #[test]
    fn system_assigned_kept() {
        let a = id("a");
        let s = state(ResourceIdentityType::SystemAssigned, &[]);
        let p = plan_patches(&s, std::slice::from_ref(&a), &[], 150);
        assert_eq!(
            p[0].identity_type,
            ResourceIdentityType::SystemAssignedUserAssigned
        );

        let s = state(ResourceIdentityType::SystemAssignedUserAssigned, &[&a]);
        let p = plan_patches(&s, &[], std::slice::from_ref(&a), 150);
        assert_eq!(p[0].identity_type, ResourceIdentityType::SystemAssigned);
        assert_eq!(p[0].body(), json!({"identity": {"type": "SystemAssigned"}}));
    }

    #[test]
    fn last_removal_gives_none_and_partial_removal_nulls() {
        let (a, b) = (id("a"), id("b"));
        let s = state(ResourceIdentityType::UserAssigned, &[&a, &b]);
        let p = plan_patches(&s, &[], std::slice::from_ref(&a), 150);
        assert_eq!(
            p[0].body(),
            json!({"identity": {"type": "UserAssigned", "userAssignedIdentities": {a.as_str(): null}}})
        );
        let p = plan_patches(&s, &[], &[a.clone(), b.clone()], 150);
        assert_eq!(p[0].body(), json!({"identity": {"type": "None"}}));
    }

    #[test]
    fn chunks_of_at_most_150_adds_first() {
        let adds: Vec<_> = (0..320).map(|i| id(&format!("add{i:03}"))).collect();
        let old: Vec<_> = (0..5).map(|i| id(&format!("old{i}"))).collect();
        let s = state(
            ResourceIdentityType::UserAssigned,
            &old.iter().collect::<Vec<_>>(),
        );
        let p = plan_patches(&s, &adds, &old, MAX_IDS_PER_PATCH);
        let sizes: Vec<usize> = p.iter().map(|p| p.add.len() + p.remove.len()).collect();
        assert_eq!(sizes, vec![150, 150, 25]);
        assert!(p[..2].iter().all(|p| p.remove.is_empty()));
        assert_eq!(p[2].add.len(), 20);
        assert_eq!(p[2].remove, old);
        assert!(
            p.iter()
                .all(|p| p.identity_type == ResourceIdentityType::UserAssigned)
        );
        assert!(p.iter().all(|p| {
            p.body()["identity"]["userAssignedIdentities"]
                .as_object()
                .is_some_and(|m| m.len() <= MAX_IDS_PER_PATCH)
        }));
    }
}
