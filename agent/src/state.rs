//! The agent's view of the world: every resource it holds, at one snapshot
//! version, and how an update turns one state into the next.

use std::sync::Arc;

use switchyard_model::ServiceState;
use switchyard_proto::convert::{DecodeError, decode_state_bytes};
use switchyard_proto::v1;

/// One resource the agent holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldResource {
    /// Its content version, as the control plane computed it.
    pub version: String,
    /// The decoded, validated Service and endpoints.
    pub state: Arc<ServiceState>,
}

/// Resources by name, in name order: a persistent B-tree, so the next
/// state shares every node of the previous one that an update did not
/// touch (a clone is a pointer copy, an insert copies one path).
pub type Resources = imbl::OrdMap<String, HeldResource>;

/// A complete, validated state. Cheap to clone: the map is persistent and
/// resources are `Arc`s.
#[derive(Debug, Clone, Default)]
pub struct AgentState {
    /// The snapshot version this state corresponds to (empty when none).
    pub version: String,
    /// Resources by name (`cluster/namespace/name`).
    pub resources: Resources,
}

/// What an update changed, for data planes that work incrementally.
#[derive(Debug, Clone, Default)]
pub struct ChangeSet {
    /// Names added or replaced.
    pub changed: Vec<String>,
    /// Names removed.
    pub removed: Vec<String>,
}

impl AgentState {
    /// Moves a copy of an older state to `next`, given what changed:
    /// O(changes), where a clone of `next` is O(resources) (about 1 ms at
    /// 10,000 Services, more than an nftables commit).
    pub fn follow(&mut self, next: &AgentState, changes: &ChangeSet) {
        self.version.clone_from(&next.version);
        for name in changes.changed.iter().chain(&changes.removed) {
            match next.resources.get(name) {
                Some(held) => {
                    self.resources.insert(name.clone(), held.clone());
                }
                None => {
                    self.resources.remove(name);
                }
            }
        }
    }

    /// Resource name -> version, as announced in a Hello.
    pub fn versions(&self) -> std::collections::HashMap<String, String> {
        self.resources
            .iter()
            .map(|(n, r)| (n.clone(), r.version.clone()))
            .collect()
    }

    /// Decodes and validates every resource of `update` and returns the
    /// state after it. Nothing is changed when any resource is invalid.
    pub fn apply(
        &self,
        update: &v1::SnapshotUpdate,
    ) -> Result<(AgentState, ChangeSet), DecodeError> {
        let mut next = self.clone();
        let mut changes = ChangeSet::default();
        for r in &update.resources {
            let state = decode_state_bytes(&r.name, &r.service_state)?;
            if state.service.key.to_string() != r.name {
                return Err(DecodeError::Field {
                    resource: r.name.clone(),
                    field: "name".into(),
                    message: format!(
                        "does not match the Service it carries ({})",
                        state.service.key
                    ),
                });
            }
            next.resources.insert(
                r.name.clone(),
                HeldResource {
                    version: r.version.clone(),
                    state: Arc::new(state),
                },
            );
            changes.changed.push(r.name.clone());
        }
        for name in &update.removed_resources {
            if next.resources.remove(name).is_some() {
                changes.removed.push(name.clone());
            }
        }
        next.version = update.snapshot_version.clone();
        Ok((next, changes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_model::{Service, ServiceKey};

    fn held(name: &str, version: &str) -> HeldResource {
        HeldResource {
            version: version.into(),
            state: Arc::new(ServiceState {
                service: Service::new(ServiceKey::new("default", "shop", name)),
                slices: Vec::new(),
            }),
        }
    }

    #[test]
    fn follow_moves_only_what_changed_to_the_next_state() {
        let mut old = AgentState {
            version: "v1".into(),
            resources: [("a", "1"), ("b", "1"), ("c", "1")]
                .into_iter()
                .map(|(n, v)| (n.to_owned(), held(n, v)))
                .collect(),
        };
        let mut next = old.clone();
        next.version = "v2".into();
        next.resources.insert("a".into(), held("a", "2"));
        next.resources.remove("b");
        next.resources.insert("d".into(), held("d", "2"));
        old.follow(
            &next,
            &ChangeSet {
                changed: vec!["a".into(), "d".into()],
                removed: vec!["b".into()],
            },
        );
        assert_eq!(old.version, "v2");
        assert_eq!(old.versions(), next.versions());
    }
}
