//! The agent's view of the world: every resource it holds, at one snapshot
//! version, and how an update turns one state into the next.
//!
//! An [`AgentState`] is a version and `name -> {version, Arc<ServiceState>}`
//! in a persistent B-tree (`imbl::OrdMap`): the next state shares every node
//! an update did not touch, so making it, and diffing it against the last
//! one as the DNS index does, cost what changed. `AgentState::apply`
//! decodes and validates every resource of an update first and changes
//! nothing if any is bad.

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

/// A resource as the control plane sends it: `default/ns/<name>`, a
/// ClusterIP Service with one TCP port (the applier's and store's tests).
#[cfg(test)]
pub(crate) fn test_resource(name: &str, version: String) -> v1::Resource {
    use switchyard_model::{Protocol, Service, ServiceKey, ServicePort, TargetPort};
    let state = ServiceState::new(Service {
        cluster_ips: vec!["10.96.0.1".parse().expect("ip")],
        ports: vec![ServicePort {
            name: String::new(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: TargetPort::Number(80),
            node_port: None,
        }],
        ..Service::new(ServiceKey::new("default", "ns", name))
    });
    v1::Resource {
        name: format!("default/ns/{name}"),
        version,
        service_state: switchyard_proto::convert::encode_state_bytes(&state),
    }
}
