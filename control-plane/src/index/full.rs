//! The full build: the snapshot from scratch, when a patch cannot do.
//!
//! ```text
//!  every source's state ─▶ merge (crate::merge)
//!        ─▶ allocate cluster IPs (crate::ipam: per family, a function of the Services wanting one)
//!        ─▶ per Service: validate + encode (cached by input pointers)
//!        ─▶ per export group: import (cached) ─▶ ClusterSet IPs per family (the ServiceImports'
//!           record, else allocated as cluster IPs are) ─▶ validate + encode   (see `imports`)
//!        ─▶ Snapshot::from_resources (version moves only with content or readiness)
//! ```
//!
//! Each Service's result is cached with the pointers of its inputs, so an
//! unchanged Service costs one comparison; the patch rebuilds through the
//! same cache ([`Index::built`]) and ends the same way ([`Index::finish`]).
//! The cached result includes the Service's `/status` line, so an
//! unchanged Service costs `/status` nothing either. Each new resource is
//! compared with the previous snapshot's and the old `Arc` reused when
//! equal: unchanged resources are never copied, and the version moves only
//! when content does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use switchyard_model::{
    IpFamily, Service, ServiceExport, ServiceKey, ServiceState, ValidationError,
};

use super::imports::{LastImports, records};
use super::patch::LastBuild;
use super::{Build, Index, Serving};
use crate::ipam::{self, IpamError};
use crate::merge::{self, Input};
use crate::snapshot::{Contents, Names, Resource, Snapshot, make_resource};
use crate::source::{ObjectError, SourceSlice};
use crate::status::ServiceSummary;

/// The cluster IPs of one family, with the last answer remembered: while
/// the same keys want addresses and the same are taken (only endpoints or
/// other fields changed), a build costs one comparison per key.
#[derive(Debug)]
pub(super) struct FamilyAllocator {
    range: IpNet,
    wanting: Vec<ServiceKey>,
    taken: HashSet<IpAddr>,
    answer: Vec<Result<IpAddr, IpamError>>,
}

impl FamilyAllocator {
    pub(super) fn new(range: IpNet) -> Self {
        Self {
            range,
            wanting: Vec::new(),
            taken: HashSet::new(),
            answer: Vec::new(),
        }
    }

    /// An address for each of `wanting` (in key order), never one of `taken`.
    fn assign(
        &mut self,
        wanting: &[&ServiceKey],
        taken: &HashSet<IpAddr>,
    ) -> Vec<Result<IpAddr, IpamError>> {
        let taken: HashSet<IpAddr> = taken
            .iter()
            .copied()
            .filter(|ip| self.range.contains(ip))
            .collect();
        let unchanged = self.wanting.len() == wanting.len()
            && self.wanting.iter().zip(wanting).all(|(a, b)| a == *b)
            && self.taken == taken;
        if !unchanged {
            self.answer = ipam::allocate(self.range, wanting, &taken);
            self.wanting = wanting.iter().map(|k| (*k).clone()).collect();
            self.taken = taken;
        }
        self.answer.clone()
    }
}

/// A Service the merge admitted: from which source, with what addresses
/// allocated and whether it is exported.
#[derive(Debug)]
pub(super) struct Admitted {
    pub(super) source: usize,
    pub(super) service: Arc<Service>,
    pub(super) ips: Vec<IpAddr>,
    pub(super) export: Option<ServiceExport>,
}

/// One Service's inputs and what they produced.
#[derive(Debug)]
pub(super) struct Built {
    /// The Service as its source gave it (before IP allocation).
    service: Arc<Service>,
    /// The addresses allocated to it, if it named none.
    allocated: Vec<IpAddr>,
    /// Its export to the clusterset, if exported.
    export: Option<ServiceExport>,
    /// Its slices, ordered by name.
    slices: Vec<Arc<SourceSlice>>,
    /// The resource, or why the Service is invalid.
    pub(super) result: Encoded,
    /// The build that last saw this Service.
    seen: u64,
}

impl Built {
    /// Sources hand out the same `Arc` for an unchanged object, so pointer
    /// equality is the test. (An equal object in a new `Arc` only costs a
    /// rebuild, which then finds the resource unchanged and keeps it.)
    fn same_inputs(
        &self,
        service: &Arc<Service>,
        allocated: &[IpAddr],
        export: Option<ServiceExport>,
        slices: &[&Arc<SourceSlice>],
    ) -> bool {
        self.allocated == allocated
            && self.export == export
            && Arc::ptr_eq(&self.service, service)
            && self.slices.len() == slices.len()
            && self
                .slices
                .iter()
                .zip(slices)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// A resource, or why its Service is invalid.
pub(super) type Encoded = Result<Valid, Vec<ValidationError>>;

/// A valid Service's resource, under its name, and its `/status` line.
#[derive(Debug)]
pub(super) struct Valid {
    pub(super) name: Arc<str>,
    pub(super) resource: Arc<Resource>,
    pub(super) summary: Arc<ServiceSummary>,
}

impl Index {
    /// The build from scratch: merges every source, allocates addresses,
    /// builds the imports; unchanged Services cost a pointer comparison.
    pub(super) fn full_build(
        &mut self,
        inputs: &[Input<'_>],
        serving: &Serving,
        changed_at_unix_nanos: i64,
    ) -> Build {
        let build_id = self.build_id;
        let mut merged = merge::merge(inputs, self.export_all);
        let mut refused = std::mem::take(&mut merged.errors);
        let allocated = self.allocate_cluster_ips(&mut merged.services, inputs, &mut refused);

        let exports: HashMap<&ServiceKey, ServiceExport> = merged
            .exports
            .values()
            .flatten()
            .map(|e| {
                (
                    e.key,
                    ServiceExport {
                        created_unix: e.created_unix,
                    },
                )
            })
            .collect();
        let mut resources = BTreeMap::new();
        let mut exported = Names::new();
        let mut summaries = BTreeMap::new();
        let mut admitted = HashMap::with_capacity(merged.services.len());
        let mut service_errors = BTreeMap::new();
        for (key, (src, service)) in &merged.services {
            let group = merged.slices.remove(key).unwrap_or_default();
            let this = Admitted {
                source: *src,
                service: Arc::clone(service),
                ips: allocated.get(key).cloned().unwrap_or_default(),
                export: exports.get(key).copied(),
            };
            match self.built(key, &this, &group) {
                Ok(valid) => {
                    resources.insert(valid.name.clone(), valid.resource.clone());
                    if this.export.is_some() {
                        exported.insert(valid.name.clone());
                    }
                    summaries.insert(valid.name.clone(), valid.summary.clone());
                }
                Err(errs) => {
                    let errors = errs
                        .iter()
                        .map(|e| object_error(inputs[*src].name, e))
                        .collect();
                    service_errors.insert((*key).clone(), errors);
                }
            }
            admitted.insert((*key).clone(), this);
        }
        self.cache.retain(|_, b| b.seen == build_id);

        let mut imports = LastImports {
            merged: std::mem::take(&mut merged.issues),
            ..LastImports::default()
        };
        self.records = records(inputs);
        // A relay following a hub's clusterset replaces the local merge: the
        // first one that follows its hub, else the first one.
        let relayed = inputs
            .iter()
            .filter_map(|i| i.state.imports.as_ref().map(|imports| (i, imports)))
            .min_by_key(|(i, _)| i.state.last_error.is_some() || !i.state.synced);
        match relayed {
            Some((input, imports)) => self.relayed_imports(
                input.name,
                imports,
                &mut resources,
                &mut summaries,
                &mut refused,
            ),
            None => {
                self.relayed.clear();
                self.build_imports(
                    &merged,
                    serving,
                    &mut imports,
                    &mut resources,
                    &mut summaries,
                )
            }
        }

        let resources = derive(&self.current.resources, resources);
        let last_summaries = self.last.take().map(|l| l.summaries).unwrap_or_default();
        let last = LastBuild {
            states: inputs.iter().map(|i| i.state.clone()).collect(),
            names: inputs
                .iter()
                .map(|i| (i.name.to_owned(), i.cluster.to_owned()))
                .collect(),
            ready: serving.ready.clone(),
            dropped: serving.dropped.clone(),
            admitted,
            refused,
            service_errors,
            issues: imports.issues(),
            summaries: derive(&last_summaries, summaries),
            imports,
        };
        self.finish(
            last,
            Contents {
                resources,
                ready: serving.ready.clone(),
                exported,
            },
            changed_at_unix_nanos,
            false,
        )
    }

    /// Makes the next snapshot of `contents` (when it changed) and the
    /// build's report, and keeps `last` for the next build.
    pub(super) fn finish(
        &mut self,
        last: LastBuild,
        contents: Contents,
        changed_at_unix_nanos: i64,
        patched: bool,
    ) -> Build {
        let snapshot = Snapshot::from_resources(
            &self.current,
            contents,
            &mut self.versions,
            changed_at_unix_nanos,
        )
        .map(Arc::new);
        if let Some(s) = &snapshot {
            self.current = s.clone();
        }
        let build = Build {
            snapshot,
            invalid: last.invalid(),
            services: last.summaries.clone(),
            issues: last.issues.clone(),
            imports: last.imports.metas.clone(),
            patched,
        };
        self.last = Some(last);
        build
    }

    /// The cached result for an admitted Service, rebuilt if its inputs changed.
    pub(super) fn built(
        &mut self,
        key: &ServiceKey,
        admitted: &Admitted,
        slices: &[&Arc<SourceSlice>],
    ) -> &Encoded {
        let fresh = match self.cache.get(key) {
            Some(b) if b.same_inputs(&admitted.service, &admitted.ips, admitted.export, slices) => {
                None
            }
            _ => Some(self.rebuild(
                &admitted.service,
                admitted.ips.clone(),
                admitted.export,
                slices,
            )),
        };
        if let Some(fresh) = fresh {
            self.cache.insert(key.clone(), fresh);
        }
        let built = self.cache.get_mut(key).expect("present");
        built.seen = self.build_id;
        &built.result
    }

    /// Validates and encodes one Service whose inputs changed. A resource
    /// whose content turns out equal to the current one keeps its `Arc`.
    fn rebuild(
        &self,
        service: &Arc<Service>,
        allocated: Vec<IpAddr>,
        export: Option<ServiceExport>,
        slices: &[&Arc<SourceSlice>],
    ) -> Built {
        let mut state = ServiceState {
            service: (**service).clone(),
            slices: slices.iter().map(|s| s.resolved(service)).collect(),
        };
        state.service.cluster_ips.extend(allocated.iter().copied());
        state.service.export = export;
        Built {
            service: Arc::clone(service),
            allocated,
            export,
            slices: slices.iter().map(|s| Arc::clone(s)).collect(),
            result: self.encode(&state),
            seen: 0,
        }
    }

    /// Validates and encodes `state`, keeping the current `Arc` when equal.
    pub(super) fn encode(&self, state: &ServiceState) -> Encoded {
        state.validate().map_err(|e| e.0)?;
        let fresh = make_resource(state);
        let summary = Arc::new(ServiceSummary::of(state));
        let (name, resource) = match self.current.resources.get_key_value(fresh.name.as_str()) {
            Some((name, old)) if **old == fresh => (name.clone(), old.clone()),
            _ => (Arc::from(fresh.name.as_str()), Arc::new(fresh)),
        };
        Ok(Valid {
            name,
            resource,
            summary,
        })
    }

    /// Gives each proxied Service without an address one of each family
    /// its `spec.ipFamilies` and `spec.ipFamilyPolicy` ask for
    /// ([`ipam::families_for`]), from that family's `--service-cidr` (the
    /// merge already refused conflicting explicit addresses). A Service
    /// that cannot have them is refused, naming the field. Returns the
    /// allocated addresses, primary first.
    fn allocate_cluster_ips<'a>(
        &mut self,
        services: &mut BTreeMap<&'a ServiceKey, (usize, &'a Arc<Service>)>,
        inputs: &[Input<'_>],
        invalid: &mut Vec<ObjectError>,
    ) -> HashMap<&'a ServiceKey, Vec<IpAddr>> {
        let mut allocated = HashMap::new();
        let mut wants: Vec<(&'a ServiceKey, Vec<IpFamily>)> = Vec::new();
        let mut refused: Vec<(&'a ServiceKey, String, String)> = Vec::new();
        for (key, (_, svc)) in services.iter() {
            if !svc.wants_cluster_ip() || !svc.cluster_ips.is_empty() {
                continue;
            }
            match ipam::families_for(svc, &self.service_ranges, "--service-cidr") {
                Ok(families) => wants.push((*key, families)),
                Err(e) => refused.push((*key, e.field, e.message)),
            }
        }
        if !wants.is_empty() {
            let taken: HashSet<IpAddr> = services
                .values()
                .flat_map(|(_, s)| s.cluster_ips.iter().copied())
                .collect();
            let mut given: HashMap<(&ServiceKey, IpFamily), Result<IpAddr, IpamError>> =
                HashMap::new();
            for (family, alloc) in &mut self.cluster_ips {
                let keys: Vec<&ServiceKey> = wants
                    .iter()
                    .filter(|(_, f)| f.contains(family))
                    .map(|(k, _)| *k)
                    .collect();
                if keys.is_empty() {
                    continue;
                }
                let answers = alloc.assign(&keys, &taken);
                for (key, answer) in keys.into_iter().zip(answers) {
                    given.insert((key, *family), answer);
                }
            }
            for (key, families) in wants {
                let mut ips = Vec::with_capacity(families.len());
                for (i, family) in families.iter().enumerate() {
                    match given.remove(&(key, *family)) {
                        Some(Ok(ip)) => ips.push(ip),
                        Some(Err(e)) => {
                            let field = if i == 0 {
                                "spec.clusterIP".to_owned()
                            } else {
                                format!("spec.clusterIPs[{i}]")
                            };
                            refused.push((key, field, e.to_string()));
                            break;
                        }
                        None => unreachable!("every family asked for has an allocator"),
                    }
                }
                if ips.len() == families.len() {
                    allocated.insert(key, ips);
                }
            }
        }
        for (key, field, message) in refused {
            if let Some((src, svc)) = services.remove(key) {
                invalid.push(ObjectError {
                    source: inputs[src].name.to_owned(),
                    object: svc.object_name(),
                    field,
                    message,
                });
            }
        }
        allocated
    }
}

/// A Service's validation error, reported against its source.
pub(super) fn object_error(source: &str, e: &ValidationError) -> ObjectError {
    ObjectError {
        source: source.to_owned(),
        object: e.object.clone(),
        field: e.field.clone(),
        message: e.message.clone(),
    }
}

/// `fresh` as a persistent map derived from `previous`: what did not change
/// stays shared with it, so the next difference between the two costs only
/// what changed.
pub(super) fn derive<K: Ord + Clone, V>(
    previous: &imbl::OrdMap<K, Arc<V>>,
    fresh: BTreeMap<K, Arc<V>>,
) -> imbl::OrdMap<K, Arc<V>> {
    let mut out = previous.clone();
    for name in previous.keys() {
        if !fresh.contains_key(name) {
            out.remove(name);
        }
    }
    for (name, value) in fresh {
        if !previous.get(&name).is_some_and(|v| Arc::ptr_eq(v, &value)) {
            out.insert(name, value);
        }
    }
    out
}
