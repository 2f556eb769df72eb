//! Data planes: what the agent does with a state.
//!
//! The agent calls [`DataPlane::apply`] with the complete new state and what
//! changed; only when it returns `Ok` is the state persisted and ACKed. A
//! data plane that fails must leave the previous state in force (iptables
//! does so with one `iptables-restore` transaction). `none` only records.

use std::sync::{Arc, Mutex};

use crate::state::{AgentState, ChangeSet};
use crate::status::Metrics;

/// Why a data plane could not put a state in force. Either way the previous
/// state stays in force; the agent NACKs and retries with backoff (a held
/// xtables lock or a kernel that refused one transaction may pass later).
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A command the data plane runs failed or could not be started.
    #[error("programming the node failed")]
    Command(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The data plane refused the state itself (what and why).
    #[error("{0}")]
    Refused(String),
}

impl From<crate::iptables::runner::RunError> for ApplyError {
    fn from(e: crate::iptables::runner::RunError) -> Self {
        Self::Command(Box::new(e))
    }
}

/// One application of a state.
#[derive(Debug)]
pub struct Change<'a> {
    /// The complete state to put in force.
    pub state: &'a AgentState,
    /// What differs from the state last applied (everything on a full sync).
    pub changes: &'a ChangeSet,
    /// True at start-up and after errors: the data plane should not trust
    /// what it programmed before.
    pub full: bool,
}

/// What the kernel data planes (iptables, nftables) share: each puts a
/// state in force as one transaction, in full or for what changed, and
/// keeps the last state that went in to put back in full when one fails.
pub(crate) trait Transactional {
    /// For logs: `iptables`, `nftables`.
    const NAME: &'static str;

    /// One transaction of the whole state.
    fn full_sync(&mut self, state: &AgentState) -> Result<(), ApplyError>;

    /// One transaction of what `change` changed.
    fn partial_sync(&mut self, change: &Change<'_>) -> Result<(), ApplyError>;

    /// Whether the next sync must be a full one, and the last state that
    /// went in.
    fn record(&mut self) -> (&mut bool, &mut Option<AgentState>);

    /// A full sync of the last state that went in, if there is one.
    fn resync(&mut self) -> Result<(), ApplyError> {
        match self.record().1.take() {
            Some(state) => {
                let r = self.full_sync(&state);
                *self.record().1 = Some(state);
                r
            }
            None => Ok(()),
        }
    }

    /// [`DataPlane::apply`] for a transactional data plane.
    fn apply_transaction(&mut self, change: &Change<'_>) -> Result<(), ApplyError> {
        let result = if change.full || *self.record().0 {
            self.full_sync(change.state)
        } else {
            self.partial_sync(change)
        };
        match result {
            Ok(()) => {
                // A pointer copy: states are persistent maps.
                *self.record().1 = Some(change.state.clone());
                Ok(())
            }
            Err(e) => {
                // The refused transaction changed nothing in the kernel, but
                // our record may have moved: put the last good state back in
                // full.
                tracing::warn!(
                    "{} sync failed: {e}; resyncing the last good state",
                    Self::NAME
                );
                *self.record().0 = true;
                if let Err(again) = self.resync() {
                    tracing::error!("full resync failed too: {again}");
                }
                Err(e)
            }
        }
    }
}

/// Programs a node from a state.
pub trait DataPlane: Send + 'static {
    /// Short name for logs and `/status` (`none`, `iptables`).
    fn name(&self) -> &'static str;

    /// Puts `change.state` in force, or fails leaving the previous one.
    /// Called from a blocking thread: it may run commands.
    fn apply(&mut self, change: &Change<'_>) -> Result<(), ApplyError>;

    /// Called every sync period on a blocking thread: check that what was
    /// programmed is still there (a canary) and repair it from the last
    /// state applied. Default: nothing to check.
    fn maintain(&mut self) -> Result<(), ApplyError> {
        Ok(())
    }

    /// Gives the data plane the agent's metrics to report into.
    fn attach_metrics(&mut self, _metrics: Arc<Metrics>) {}

    /// This node's topology zone changed (learnt from the control plane);
    /// the next apply is a full one. Default: zones do not matter.
    fn set_zone(&mut self, _zone: Option<String>) {}

    /// What this data plane put in force for the resource `name`
    /// (`cluster/namespace/name`), for `/status?service=`; `None` when it
    /// holds nothing for it.
    fn describe(&self, _name: &str) -> Option<serde_json::Value> {
        None
    }

    /// The data plane's own record, for `/status` (`none` shows what it
    /// was given); `None` when it keeps none.
    fn record(&self) -> Option<serde_json::Value> {
        None
    }
}

/// Snapshot versions the `none` data plane remembers (the latest ones): an
/// agent that runs for months must not keep one per update.
pub const RECORDED_VERSIONS: usize = 1024;

/// What the `none` data plane has seen.
#[derive(Debug, Default, Clone)]
pub struct Recorded {
    /// Snapshot versions applied, oldest first: the last
    /// [`RECORDED_VERSIONS`] of them.
    pub versions: Vec<String>,
    /// Applies since start.
    pub applies: usize,
    /// Resources in the last state.
    pub resources: usize,
    /// Each resource of the last state and its version.
    pub resource_versions: std::collections::BTreeMap<String, String>,
    /// Applies that were full (start-up, zone change).
    pub full_applies: usize,
}

/// `--dataplane none`: applies nothing, records what it was given.
#[derive(Debug, Default, Clone)]
pub struct NoneDataPlane {
    recorded: Arc<Mutex<Recorded>>,
}

impl NoneDataPlane {
    /// What was applied so far (shared handle).
    pub fn recorded(&self) -> Arc<Mutex<Recorded>> {
        self.recorded.clone()
    }
}

impl DataPlane for NoneDataPlane {
    fn name(&self) -> &'static str {
        "none"
    }

    fn apply(&mut self, change: &Change<'_>) -> Result<(), ApplyError> {
        let mut r = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        r.versions.push(change.state.version.clone());
        if r.versions.len() > RECORDED_VERSIONS {
            let over = r.versions.len() - RECORDED_VERSIONS;
            r.versions.drain(..over);
        }
        r.applies += 1;
        r.resources = change.state.resources.len();
        if change.full {
            r.resource_versions = change
                .state
                .resources
                .iter()
                .map(|(n, h)| (n.clone(), h.version.clone()))
                .collect();
        } else {
            // What changed only: the record costs what the update does.
            for name in change.changes.changed.iter().chain(&change.changes.removed) {
                match change.state.resources.get(name) {
                    Some(h) => {
                        r.resource_versions.insert(name.clone(), h.version.clone());
                    }
                    None => {
                        r.resource_versions.remove(name);
                    }
                }
            }
        }
        r.full_applies += usize::from(change.full);
        Ok(())
    }

    fn describe(&self, name: &str) -> Option<serde_json::Value> {
        let r = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        let version = r.resource_versions.get(name)?;
        Some(serde_json::json!({
            "recorded": {
                "resource_version": version,
                "snapshot_version": r.versions.last(),
            },
            "programmed": "nothing: the none data plane only records",
        }))
    }

    fn record(&self) -> Option<serde_json::Value> {
        let r = self.recorded.lock().unwrap_or_else(|e| e.into_inner());
        Some(serde_json::json!({
            "applies": r.applies,
            "full_applies": r.full_applies,
            "last_version": r.versions.last(),
            "resources": r.resources,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::HeldResource;
    use switchyard_model::{Service, ServiceKey, ServiceState};

    fn state(version: &str, names: &[&str]) -> AgentState {
        AgentState {
            version: version.into(),
            resources: names
                .iter()
                .map(|n| {
                    let held = HeldResource {
                        version: format!("{n}@{version}"),
                        state: Arc::new(ServiceState::new(Service::new(ServiceKey::new(
                            "default", "shop", *n,
                        )))),
                    };
                    (format!("default/shop/{n}"), held)
                })
                .collect(),
        }
    }

    #[test]
    fn the_none_record_follows_changes_and_keeps_the_latest_versions_only() {
        let mut dp = NoneDataPlane::default();
        let all = ChangeSet {
            changed: vec!["default/shop/a".into(), "default/shop/b".into()],
            removed: vec![],
        };
        dp.apply(&Change {
            state: &state("v0", &["a", "b"]),
            changes: &all,
            full: true,
        })
        .expect("full");
        // A partial apply touches only what changed: b goes, c comes, a stays.
        let next = state("v1", &["a", "c"]);
        let partial = ChangeSet {
            changed: vec!["default/shop/c".into()],
            removed: vec!["default/shop/b".into()],
        };
        dp.apply(&Change {
            state: &next,
            changes: &partial,
            full: false,
        })
        .expect("partial");
        let r = dp.recorded().lock().expect("lock").clone();
        let names: Vec<(&str, &str)> = r
            .resource_versions
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            names,
            [("default/shop/a", "a@v0"), ("default/shop/c", "c@v1")]
        );
        for i in 0..RECORDED_VERSIONS + 10 {
            dp.apply(&Change {
                state: &state(&format!("w{i}"), &[]),
                changes: &ChangeSet::default(),
                full: false,
            })
            .expect("apply");
        }
        let r = dp.recorded().lock().expect("lock").clone();
        assert_eq!(r.versions.len(), RECORDED_VERSIONS);
        assert_eq!(r.versions.last().map(String::as_str), Some("w1033"));
        assert_eq!(r.applies, RECORDED_VERSIONS + 12);
    }
}
