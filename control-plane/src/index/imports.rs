//! The clusterset's imports: one Service `clusterset/<namespace>/<name>`
//! per exported namespace/name.
//!
//! ```text
//!  per export group: the exporters' valid resources ─▶ merge::import (cached: plan_import)
//!        ─▶ ClusterSet IPs per family (the ServiceImports' record, else allocated
//!           as cluster IPs are: assign_clusterset_ips) ─▶ validate + encode (finish_import)
//! ```
//!
//! A relay following a hub takes the hub's imports as they are instead
//! (`relayed_imports`). [`LastImports`] keeps what a patch needs to rebuild
//! the imports of the Services it touches alone; [`ImportMeta`] is what the
//! writer of ServiceImports (`crate::mcs`) needs beyond the resource.
//!
//! An import is cached by the pointers of its inputs' resources and the
//! exports' labels and annotations, so it is decoded and merged again only
//! when one of them changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use switchyard_model::{CLUSTERSET, IpFamily, ServiceKey, ServiceState};

use super::full::{Encoded, Valid, derive};
use super::{Index, Serving};
use crate::ipam::{self, RecordNote};
use crate::merge::{self, ClustersetIssue, Exported, Input};
use crate::snapshot::Resource;
use crate::source::{ExportedMeta, ObjectError};
use crate::status::ServiceSummary;

/// What a ServiceImport carries beyond the import's Service, for the
/// writer of ServiceImports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportMeta {
    /// The oldest export's exported labels and annotations.
    pub exported: ExportedMeta,
    /// The exporting clusters whose Services make the import, oldest export
    /// first (`status.clusters`).
    pub clusters: Vec<String>,
}

/// [`ImportMeta`] of every import the snapshot holds (not those a relay
/// takes from a hub), by (namespace, name), as a persistent map.
pub type ImportMetas = imbl::OrdMap<(String, String), Arc<ImportMeta>>;

/// What an import asks of the ClusterSet IP allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Wants {
    /// Nothing: it is headless.
    Nothing,
    /// An address of each family, primary first.
    Ips(Vec<IpFamily>),
    /// Addresses of families (those of its exports) no `--clusterset-cidr` serves.
    NoRange(Vec<IpFamily>),
}

/// The families an import wants ClusterSet IPs of, and the addresses it
/// was given (`None`: one could not be).
pub(super) type WantedIps = (Vec<IpFamily>, Option<Vec<IpAddr>>);

/// Each import's ClusterSet IPs, or why it has none, by (namespace, name).
pub(super) type ClustersetIps = HashMap<(String, String), Result<Vec<IpAddr>, String>>;

/// Clusterset issues by import (namespace, name).
pub(super) type IssuesByImport = BTreeMap<(String, String), Vec<ClustersetIssue>>;

/// The ClusterSet IPs each cluster's ServiceImports record, by import
/// (`clusterset/<namespace>/<name>`): (cluster, `spec.ips`), clusters in order.
pub(super) type Records = BTreeMap<ServiceKey, Vec<(String, Vec<IpAddr>)>>;

/// The imports of the last build (none when a relay brought them), so that
/// a patch rebuilds only those of the exported Services it touches.
#[derive(Debug, Default)]
pub(super) struct LastImports {
    /// The exporting Services of each (namespace, name) with their
    /// exported labels and annotations, oldest export first, as the merge
    /// ordered them.
    pub(super) groups: HashMap<(String, String), Vec<(ServiceKey, ExportedMeta)>>,
    /// The merge's own issues (exports without a Service).
    pub(super) merged: Vec<ClustersetIssue>,
    /// What [`merge::import`] found wrong, by import (only those with issues).
    pub(super) found: BTreeMap<(String, String), Vec<ClustersetIssue>>,
    /// An import without a ClusterSet IP or invalid, by import (the same).
    pub(super) failed: BTreeMap<(String, String), Vec<ClustersetIssue>>,
    /// Records that could not be kept as they are, by import (the same).
    pub(super) recorded: BTreeMap<(String, String), Vec<ClustersetIssue>>,
    /// The imports that want ClusterSet IPs of families there are ranges
    /// of: the families, and the addresses they were given (`None`: one
    /// could not be).
    pub(super) ips: BTreeMap<(String, String), WantedIps>,
    /// What the ServiceImport of each import in the snapshot carries.
    pub(super) metas: ImportMetas,
}

impl LastImports {
    /// Every clusterset issue in the order of a full build: the merge's,
    /// then each import's from [`merge::import`], then each import's
    /// missing ClusterSet IP or validation errors, then the records not
    /// kept as they are, imports in name order.
    pub(super) fn issues(&self) -> Vec<ClustersetIssue> {
        self.merged
            .iter()
            .chain(self.found.values().flatten())
            .chain(self.failed.values().flatten())
            .chain(self.recorded.values().flatten())
            .cloned()
            .collect()
    }
}

/// One import's inputs (the exporting clusters' resources with their
/// exported labels and annotations, oldest export first) and what they
/// produced.
#[derive(Debug)]
pub(super) struct BuiltImport {
    inputs: Vec<(String, Arc<Resource>, ExportedMeta)>,
    /// The merged import before its ClusterSet IPs, and what disagreed.
    plan: Option<merge::Import>,
    issues: Vec<ClustersetIssue>,
    /// The ClusterSet IPs the result was made with, and the result.
    result: Option<(Vec<IpAddr>, Encoded)>,
    seen: u64,
}

impl BuiltImport {
    fn same_inputs(&self, inputs: &[(&str, &Arc<Resource>, &ExportedMeta)]) -> bool {
        self.inputs.len() == inputs.len()
            && self
                .inputs
                .iter()
                .zip(inputs)
                .all(|((c, r, m), (c2, r2, m2))| c == c2 && Arc::ptr_eq(r, r2) && m == *m2)
    }
}

impl Index {
    /// The imports a relay took from a hub, validated and encoded as they
    /// are (the hub merged them and gave them their ClusterSet IPs).
    pub(super) fn relayed_imports(
        &mut self,
        source: &str,
        imports: &[Arc<ServiceState>],
        resources: &mut BTreeMap<Arc<str>, Arc<Resource>>,
        summaries: &mut BTreeMap<Arc<str>, Arc<ServiceSummary>>,
        invalid: &mut Vec<ObjectError>,
    ) {
        self.imports.clear();
        let mut next = HashMap::with_capacity(imports.len());
        for state in imports {
            let name = state.service.key.to_string();
            let encoded = match self.relayed.remove(&name) {
                Some((held, encoded)) if Arc::ptr_eq(&held, state) => encoded,
                _ => self.encode(state),
            };
            match &encoded {
                Ok(valid) => {
                    resources.insert(valid.name.clone(), valid.resource.clone());
                    summaries.insert(valid.name.clone(), valid.summary.clone());
                }
                Err(errs) => invalid.extend(errs.iter().map(|e| ObjectError {
                    source: source.to_owned(),
                    object: e.object.clone(),
                    field: e.field.clone(),
                    message: e.message.clone(),
                })),
            }
            next.insert(name, (Arc::clone(state), encoded));
        }
        self.relayed = next;
    }

    /// The clusterset's imports: one per exported namespace/name whose
    /// exporting clusters built valid Services, merged by
    /// [`merge::import`], with a ClusterSet IP of each of its families
    /// unless headless. Keeps in `last` what a patch needs to rebuild one
    /// of them alone.
    pub(super) fn build_imports(
        &mut self,
        merged: &merge::Merged<'_>,
        serving: &Serving,
        last: &mut LastImports,
        resources: &mut BTreeMap<Arc<str>, Arc<Resource>>,
        summaries: &mut BTreeMap<Arc<str>, Arc<ServiceSummary>>,
    ) {
        let build_id = self.build_id;
        let mut plans: Vec<((String, String), Wants)> = Vec::new();
        for ((namespace, name), exporters) in &merged.exports {
            let key = ((*namespace).to_owned(), (*name).to_owned());
            let exporters: Vec<(ServiceKey, ExportedMeta)> = exporters
                .iter()
                .map(|e| (e.key.clone(), e.exported.clone()))
                .collect();
            if let Some(wants) =
                self.plan_import(&key, &exporters, &serving.dropped, &mut last.found)
            {
                plans.push((key.clone(), wants));
            }
            last.groups.insert(key, exporters);
        }
        self.imports.retain(|_, b| b.seen == build_id);

        let wanting: BTreeMap<(String, String), Vec<IpFamily>> = plans
            .iter()
            .filter_map(|(k, wants)| match wants {
                Wants::Ips(families) => Some((k.clone(), families.clone())),
                _ => None,
            })
            .collect();
        let (mut ips, recorded) = self.assign_clusterset_ips(&wanting);
        last.recorded = recorded;
        let mut metas = BTreeMap::new();
        for (key, wants) in plans {
            let ip = match wants {
                Wants::Ips(families) => {
                    let r = ips.remove(&key).expect("assigned");
                    last.ips
                        .insert(key.clone(), (families, r.as_ref().ok().cloned()));
                    Some(r)
                }
                Wants::NoRange(families) => Some(Err(no_range(&families))),
                Wants::Nothing => None,
            };
            if let Some(valid) = self.finish_import(&key, ip, &mut last.failed) {
                resources.insert(valid.name.clone(), valid.resource.clone());
                summaries.insert(valid.name.clone(), valid.summary.clone());
                if let Some(meta) = self.import_meta(&key) {
                    metas.insert(key, meta);
                }
            }
        }
        let previous = self
            .last
            .as_ref()
            .map(|l| l.imports.metas.clone())
            .unwrap_or_default();
        last.metas = derive(&previous, metas);
    }

    /// What the ServiceImport of import `key` carries, from its plan
    /// (the last build's `Arc` while it is the same).
    pub(super) fn import_meta(&self, key: &(String, String)) -> Option<Arc<ImportMeta>> {
        let plan = self.imports.get(key)?.plan.as_ref()?;
        let meta = ImportMeta {
            exported: plan.exported.clone(),
            clusters: plan.clusters.clone(),
        };
        match self.last.as_ref().and_then(|l| l.imports.metas.get(key)) {
            Some(old) if **old == meta => Some(Arc::clone(old)),
            _ => Some(Arc::new(meta)),
        }
    }

    /// Merges import `key` from the valid resources of `exporters` (oldest
    /// export first), leaving out those of `dropped` clusters; the last
    /// merge stands while those resources (and the exports' labels and
    /// annotations) are the same. What the merge found wrong goes in
    /// `found`. Returns what the import asks of the ClusterSet IP
    /// allocation (the families of its exports there is a range of), or
    /// `None` when nothing is imported (no exporter valid, or none usable).
    pub(super) fn plan_import(
        &mut self,
        key: &(String, String),
        exporters: &[(ServiceKey, ExportedMeta)],
        dropped: &BTreeSet<String>,
        found: &mut BTreeMap<(String, String), Vec<ClustersetIssue>>,
    ) -> Option<Wants> {
        let inputs: Vec<(&str, &Arc<Resource>, &ExportedMeta)> = exporters
            .iter()
            .filter(|(k, _)| !dropped.contains(&k.cluster))
            .filter_map(|(k, meta)| match self.cache.get(k).map(|b| &b.result) {
                Some(Ok(valid)) => Some((k.cluster.as_str(), &valid.resource, meta)),
                _ => None,
            })
            .collect();
        if inputs.is_empty() {
            self.imports.remove(key);
            return None;
        }
        let reuse = self
            .imports
            .get(key)
            .is_some_and(|b| b.same_inputs(&inputs));
        if !reuse {
            let states: Vec<(&str, ServiceState, &ExportedMeta)> = inputs
                .iter()
                .filter_map(|(cluster, r, meta)| {
                    switchyard_proto::convert::decode_state_bytes(&r.name, &r.service_state)
                        .ok()
                        .map(|s| (*cluster, s, *meta))
                })
                .collect();
            let exported: Vec<Exported<'_>> = states
                .iter()
                .map(|(cluster, state, exported)| Exported {
                    cluster,
                    state,
                    exported,
                })
                .collect();
            let (plan, issues) = merge::import(&key.0, &key.1, &exported);
            self.imports.insert(
                key.clone(),
                BuiltImport {
                    inputs: inputs
                        .iter()
                        .map(|(c, r, m)| ((*c).to_owned(), Arc::clone(r), (*m).clone()))
                        .collect(),
                    plan,
                    issues,
                    result: None,
                    seen: 0,
                },
            );
        }
        let built = self.imports.get_mut(key).expect("present");
        built.seen = self.build_id;
        if !built.issues.is_empty() {
            found.insert(key.clone(), built.issues.clone());
        }
        let plan = built.plan.as_ref()?;
        if plan.state.service.headless {
            return Some(Wants::Nothing);
        }
        let served: Vec<IpFamily> = plan
            .families
            .iter()
            .copied()
            .filter(|f| self.clusterset_ranges.get(*f).is_some())
            .collect();
        Some(if served.is_empty() {
            Wants::NoRange(plan.families.clone())
        } else {
            Wants::Ips(served)
        })
    }

    /// ClusterSet IPs for the imports `wanting` them, one per family given
    /// (primary first): per family, the ServiceImports' record and then
    /// [`ipam::allocate_recorded`]. Returns each import's addresses (or why
    /// one could not be given), and the records not kept as they are.
    pub(super) fn assign_clusterset_ips(
        &self,
        wanting: &BTreeMap<(String, String), Vec<IpFamily>>,
    ) -> (ClustersetIps, IssuesByImport) {
        let keys: BTreeMap<&(String, String), ServiceKey> = wanting
            .keys()
            .map(|k| (k, ServiceKey::new(CLUSTERSET, &k.0, &k.1)))
            .collect();
        // (import, family) -> its address, or why it has none.
        let mut given = HashMap::new();
        let mut notes = Vec::new();
        for family in self.clusterset_ranges.families() {
            let Some(range) = self.clusterset_ranges.get(family) else {
                continue;
            };
            let of_family: Vec<&(String, String)> = wanting
                .iter()
                .filter(|(_, f)| f.contains(&family))
                .map(|(k, _)| k)
                .collect();
            if of_family.is_empty() {
                continue;
            }
            // Each cluster's first address of this family in the range.
            let mut recorded: BTreeMap<&ServiceKey, Vec<ipam::Recorded<'_>>> = BTreeMap::new();
            let mut reserved: HashSet<IpAddr> = HashSet::new();
            for (key, records) in &self.records {
                for (cluster, ips) in records {
                    if let Some(ip) = ips
                        .iter()
                        .find(|ip| IpFamily::of(ip) == family && range.contains(*ip))
                    {
                        recorded
                            .entry(key)
                            .or_default()
                            .push((cluster.as_str(), *ip));
                        reserved.insert(*ip);
                    }
                }
            }
            let service_keys: Vec<&ServiceKey> = of_family.iter().map(|k| &keys[k]).collect();
            let (answers, family_notes) =
                ipam::allocate_recorded(range, &service_keys, &recorded, &reserved);
            for (key, answer) in of_family.into_iter().zip(answers) {
                given.insert((key, family), answer);
            }
            notes.extend(family_notes);
        }
        let mut out = HashMap::with_capacity(wanting.len());
        for (key, families) in wanting {
            let answer: Result<Vec<IpAddr>, String> = families
                .iter()
                .map(|f| match given.remove(&(key, *f)) {
                    Some(r) => r.map_err(|e| e.to_string()),
                    None => Err(format!("no --clusterset-cidr of {f}")),
                })
                .collect();
            out.insert(key.clone(), answer);
        }
        let mut issues = IssuesByImport::new();
        for note in notes {
            let (key, lines) = match note {
                RecordNote::Disagrees {
                    key,
                    kept,
                    differing,
                } => {
                    let lines: Vec<(String, String)> = differing
                        .into_iter()
                        .map(|(cluster, ip)| {
                            (
                                cluster,
                                format!(
                                    "its ServiceImport records {ip}, other clusters' {kept}, which is used \
                                     (recorded by the most clusters, then by the lowest cluster id)"
                                ),
                            )
                        })
                        .collect();
                    (key, lines)
                }
                RecordNote::HeldByAnother {
                    key,
                    ip,
                    holder,
                    clusters,
                } => {
                    let lines = clusters
                        .into_iter()
                        .map(|cluster| {
                            (
                                cluster,
                                format!(
                                    "its ServiceImport records {ip}, which {}/{} keeps (recorded by \
                                     more clusters, or the smaller name); this import gets another",
                                    holder.namespace, holder.name
                                ),
                            )
                        })
                        .collect();
                    (key, lines)
                }
            };
            let entry = issues
                .entry((key.namespace.clone(), key.name.clone()))
                .or_default();
            for (cluster, message) in lines {
                entry.push(ClustersetIssue {
                    service: format!("{}/{}", key.namespace, key.name),
                    cluster,
                    reason: merge::RECORD_MISMATCH,
                    message,
                });
            }
        }
        (out, issues)
    }

    /// The resource of planned import `key` with its ClusterSet IPs (`None`:
    /// headless), encoded again only when the plan or the addresses
    /// changed. Why it has none goes in `failed`.
    pub(super) fn finish_import(
        &mut self,
        key: &(String, String),
        ips: Option<Result<Vec<IpAddr>, String>>,
        failed: &mut BTreeMap<(String, String), Vec<ClustersetIssue>>,
    ) -> Option<&Valid> {
        let service = format!("{}/{}", key.0, key.1);
        let ips = match ips {
            Some(Ok(ips)) => ips,
            Some(Err(message)) => {
                failed.insert(
                    key.clone(),
                    vec![ClustersetIssue {
                        service,
                        cluster: CLUSTERSET.to_owned(),
                        reason: merge::NO_CLUSTERSET_IP,
                        message,
                    }],
                );
                return None;
            }
            None => Vec::new(),
        };
        let built = self.imports.get(key).expect("present");
        let fresh = match &built.result {
            Some((made_with, _)) if *made_with == ips => None,
            _ => {
                let mut state = built.plan.as_ref().expect("a plan").state.clone();
                state.service.cluster_ips.clone_from(&ips);
                Some(self.encode(&state))
            }
        };
        let built = self.imports.get_mut(key).expect("present");
        if let Some(result) = fresh {
            built.result = Some((ips, result));
        }
        match built.result.as_ref().map(|(_, r)| r) {
            Some(Ok(valid)) => Some(valid),
            Some(Err(errs)) => {
                failed.insert(
                    key.clone(),
                    errs.iter()
                        .map(|e| ClustersetIssue {
                            service: service.clone(),
                            cluster: CLUSTERSET.to_owned(),
                            reason: merge::INVALID_IMPORT,
                            message: format!("{}: {}", e.field, e.message),
                        })
                        .collect(),
                );
                None
            }
            None => None,
        }
    }
}

/// Why an import whose exports have `families` gets no ClusterSet IP.
pub(super) fn no_range(families: &[IpFamily]) -> String {
    if families.is_empty() {
        return "its exports have no cluster IP to take a family from".to_owned();
    }
    let families: Vec<String> = families.iter().map(ToString::to_string).collect();
    format!(
        "no --clusterset-cidr of {}, the families its exports have in common",
        families.join(" or ")
    )
}

/// The ClusterSet IPs recorded by the ServiceImports Switchyard manages
/// (`RecordedImport::ours`) in each source's cluster, by import; a
/// cluster's first source with a record of an import counts.
pub(super) fn records(inputs: &[Input<'_>]) -> Records {
    let mut out = Records::new();
    for input in inputs {
        for r in input.state.service_imports.iter().filter(|r| r.ours) {
            let list = out
                .entry(ServiceKey::new(CLUSTERSET, &r.namespace, &r.name))
                .or_default();
            if !list.iter().any(|(c, _)| c == input.cluster) {
                list.push((input.cluster.to_owned(), r.ips.clone()));
            }
        }
    }
    for list in out.values_mut() {
        list.sort_by(|a, b| a.0.cmp(&b.0));
    }
    out
}
