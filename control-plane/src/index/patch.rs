//! The patch: a change of endpoints alone, at the cost of the change.
//!
//! ```text
//!  slice maps (this build vs last) ─▶ diff: changed keys ─▶ their Services ─▶ validate/encode
//!                                                             ├▶ their imports (exported ones) ─▶ merge::import/encode
//!                                                             └▶ last snapshot's map with those replaced
//! ```
//!
//! The last build's merge, address allocation and imports stand while the
//! sources' Services, exports and errors are the very maps and lists they
//! were: [`LastBuild`] keeps them, and what the merge decided, for the next
//! build to compare with. Where a patch could differ from what a full
//! build makes, the full build (`full`) runs instead.
//!
//! Sources keep their Services and slices in persistent maps
//! (`source::Objects`) and derive each state from the one before, so an
//! unchanged map is the very same map and a changed one shares the rest
//! with its predecessor. When every source's Services, exports and errors
//! are those of the last build, no relay brings imports, the same clusters
//! are served and the ServiceImports' record is the same, the patch diffs
//! each source's slice map with the one it last built from, rebuilds the
//! Services whose slices changed and replaces them in the last snapshot's
//! resource map. Their imports, when exported, are rebuilt as the full
//! build makes them: from the exporting clusters the last merge found
//! (oldest export first), their valid resources unless a dropped
//! cluster's, with the ClusterSet IP they had, their issues replacing the
//! old ones; an import whose exporters all turned invalid leaves the
//! snapshot and comes back later. When an import comes or goes the
//! ClusterSet IP allocator sees every import, as in a full build; if that
//! would move another import's address (one was waiting for an address),
//! or a patched import had none, the full build runs. So does anything
//! else: a Service or an export changed, or more than [`PATCH_LIMIT`]
//! Services at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use switchyard_model::{CLUSTERSET, IpFamily, ServiceKey};

use super::full::{Admitted, object_error};
use super::imports::{ClustersetIps, LastImports, Wants, no_range};
use super::{Build, Index, Serving, Summaries};
use crate::merge::{ClustersetIssue, Input};
use crate::snapshot::Contents;
use crate::source::{ObjectError, SourceSlice, SourceState};

/// The most Services one patch rebuilds; a larger change takes the full
/// build, whose cost per Service is lower.
const PATCH_LIMIT: usize = 1024;

/// The last build's inputs and the decisions of its merge.
#[derive(Debug)]
pub(super) struct LastBuild {
    /// Each source's state (copies: persistent maps are shared).
    pub(super) states: Vec<SourceState>,
    /// The sources' names and clusters, in order.
    pub(super) names: Vec<(String, String)>,
    pub(super) ready: BTreeSet<String>,
    pub(super) dropped: BTreeSet<String>,
    /// The Services the merge admitted, with their address and export.
    pub(super) admitted: HashMap<ServiceKey, Admitted>,
    /// Objects the merge and the allocation refused.
    pub(super) refused: Vec<ObjectError>,
    /// The validation errors of admitted Services, by key.
    pub(super) service_errors: BTreeMap<ServiceKey, Vec<ObjectError>>,
    /// Every clusterset issue, as [`LastImports::issues`] orders them.
    pub(super) issues: Vec<ClustersetIssue>,
    pub(super) summaries: Summaries,
    /// What the build knew of the clusterset's imports.
    pub(super) imports: LastImports,
}

impl LastBuild {
    /// What the build skipped: the merge's refusals, then the invalid
    /// Services in key order.
    pub(super) fn invalid(&self) -> Vec<ObjectError> {
        self.refused
            .iter()
            .chain(self.service_errors.values().flatten())
            .cloned()
            .collect()
    }
}

impl Index {
    /// A build after a change of endpoints alone. When every source's
    /// Services, exports and errors are the very maps and lists of the last
    /// build, no relay brings imports, and the same clusters are served, the
    /// merge, the address allocation and the imports of the last build
    /// stand: only the Services whose slices changed (found by diffing the
    /// persistent slice maps) are rebuilt, then the clusterset imports of
    /// those that are exported (see [`Index::patch_imports`]), and the
    /// snapshot is the last one with those resources replaced. Its cost is
    /// that of the change, at any fleet size. `None` when the change is of
    /// another kind, touches more than [`PATCH_LIMIT`] Services, or leaves
    /// an import that only a full build can tell.
    pub(super) fn patch(
        &mut self,
        inputs: &[Input<'_>],
        serving: &Serving,
        changed_at_unix_nanos: i64,
    ) -> Option<Build> {
        let last = self.last.as_ref()?;
        if inputs.len() != last.states.len()
            || serving.ready != last.ready
            || serving.dropped != last.dropped
        {
            return None;
        }
        let mut affected: BTreeSet<ServiceKey> = BTreeSet::new();
        for ((input, before), (name, cluster)) in inputs.iter().zip(&last.states).zip(&last.names) {
            let now = input.state;
            let same = input.name == name
                && input.cluster == cluster
                && now.synced == before.synced
                && now.imports.is_none()
                && before.imports.is_none()
                && now.services.same(&before.services)
                && now.errors == before.errors
                && now.exports == before.exports
                && now.service_imports == before.service_imports;
            if !same {
                return None;
            }
            for (service, _) in before.slices.changed_keys(&now.slices) {
                affected.insert(service.clone());
                if affected.len() > PATCH_LIMIT {
                    return None;
                }
            }
        }
        let mut last = self.last.take().expect("checked above");
        let mut resources = self.current.resources.clone();
        let mut exported = self.current.exported.clone();
        // The imports of the exported Services among them.
        let mut groups: BTreeSet<(String, String)> = BTreeSet::new();
        for key in &affected {
            let Some(admitted) = last.admitted.get(key) else {
                // Slices of a Service the snapshot does not hold.
                continue;
            };
            let mut group: Vec<&Arc<SourceSlice>> = inputs
                .iter()
                .flat_map(|i| {
                    i.state
                        .slices
                        .range((key.clone(), String::new())..)
                        .take_while(|s| s.service == *key)
                })
                .collect();
            group.sort_by(|a, b| a.slice.name.cmp(&b.slice.name));
            let name: Arc<str> = Arc::from(key.to_string());
            if admitted.export.is_some() {
                groups.insert((key.namespace.clone(), key.name.clone()));
            }
            match self.built(key, admitted, &group) {
                Ok(valid) => {
                    resources.insert(valid.name.clone(), valid.resource.clone());
                    if admitted.export.is_some() {
                        exported.insert(valid.name.clone());
                    }
                    last.summaries
                        .insert(valid.name.clone(), valid.summary.clone());
                    last.service_errors.remove(key);
                }
                Err(errs) => {
                    resources.remove(&name);
                    exported.remove(&name);
                    last.summaries.remove(&name);
                    let errors = errs
                        .iter()
                        .map(|e| object_error(inputs[admitted.source].name, e))
                        .collect();
                    last.service_errors.insert(key.clone(), errors);
                }
            }
        }
        if !groups.is_empty()
            && self
                .patch_imports(&groups, &serving.dropped, &mut last, &mut resources)
                .is_none()
        {
            // The caches hold what was rebuilt: the full build reuses it.
            self.last = Some(last);
            return None;
        }
        for (before, input) in last.states.iter_mut().zip(inputs) {
            // The rest of each state is what was compared above (the exports
            // equal, not copied again).
            before.slices = input.state.slices.clone();
        }
        Some(self.finish(
            last,
            Contents {
                resources,
                ready: serving.ready.clone(),
                exported,
            },
            changed_at_unix_nanos,
            true,
        ))
    }

    /// Rebuilds the imports `groups` after a patch rebuilt exporters of
    /// theirs, as [`Index::build_imports`] would: the exporters the last
    /// merge found, in its order; the same ClusterSet IPs; their issues in
    /// place of the old ones. When an import comes or goes (or the families
    /// it wants change), the allocation runs again for every import, as in
    /// a full build. `None` when the result could differ from a full
    /// build's (an import that had no ClusterSet IP left, an allocation
    /// that would move another import).
    fn patch_imports(
        &mut self,
        groups: &BTreeSet<(String, String)>,
        dropped: &BTreeSet<String>,
        last: &mut LastBuild,
        resources: &mut crate::snapshot::Resources,
    ) -> Option<()> {
        let imports = &mut last.imports;
        let mut plans: Vec<(&(String, String), Wants)> = Vec::with_capacity(groups.len());
        let mut moved = false;
        for key in groups {
            let exporters = imports.groups.get(key)?;
            let name: Arc<str> = Arc::from(ServiceKey::new(CLUSTERSET, &key.0, &key.1).to_string());
            resources.remove(&name);
            last.summaries.remove(&name);
            imports.metas.remove(key);
            imports.found.remove(key);
            imports.failed.remove(key);
            let planned = self.plan_import(key, exporters, dropped, &mut imports.found);
            let families = match &planned {
                Some(Wants::Ips(families)) => Some(families),
                _ => None,
            };
            if families != imports.ips.get(key).map(|(f, _)| f) {
                moved = true;
                match families {
                    Some(f) => {
                        imports.ips.insert(key.clone(), (f.clone(), None));
                    }
                    None => {
                        imports.ips.remove(key);
                    }
                }
            }
            if let Some(wants) = planned {
                plans.push((key, wants));
            }
        }
        let mut ips = ClustersetIps::new();
        if moved {
            let wanting: BTreeMap<(String, String), Vec<IpFamily>> = imports
                .ips
                .iter()
                .map(|(k, (f, _))| (k.clone(), f.clone()))
                .collect();
            let (mut assigned, recorded) = self.assign_clusterset_ips(&wanting);
            for (key, (_, ip)) in &mut imports.ips {
                let r = assigned.remove(key)?;
                if groups.contains(key) {
                    *ip = r.as_ref().ok().cloned();
                    ips.insert(key.clone(), r);
                } else if *ip != r.ok() {
                    return None;
                }
            }
            imports.recorded = recorded;
        }
        for (key, wants) in plans {
            let ip = match (ips.remove(key), wants) {
                (Some(r), _) => Some(r),
                (None, Wants::Ips(_)) => Some(Ok(imports.ips.get(key)?.1.clone()?)),
                (None, Wants::NoRange(families)) => Some(Err(no_range(&families))),
                (None, Wants::Nothing) => None,
            };
            if let Some(valid) = self.finish_import(key, ip, &mut imports.failed) {
                resources.insert(valid.name.clone(), valid.resource.clone());
                last.summaries
                    .insert(valid.name.clone(), valid.summary.clone());
                if let Some(meta) = self.import_meta(key) {
                    imports.metas.insert(key.clone(), meta);
                }
            }
        }
        last.issues = imports.issues();
        Some(())
    }
}
