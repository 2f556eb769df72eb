//! `--dataplane none`: programs nothing and records what it was given, for
//! development and for tests of everything before the kernel.

use std::sync::{Arc, Mutex};

use super::{ApplyError, Change, DataPlane};

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
    use crate::state::{AgentState, ChangeSet, HeldResource};
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
