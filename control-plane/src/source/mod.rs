//! Sources: where Services and EndpointSlices come from.
//!
//! Each source runs as its own task and publishes its *whole* current view
//! through a `tokio::sync::watch` channel as a [`SourceState`]. The index
//! (see `crate::index`) merges the latest state of every source into one
//! snapshot. Publishing whole states (rather than events) keeps a source's
//! relist, a file reload or a Docker resync atomic: the index never sees a
//! half-applied change, so no agent sees a Service vanish and come back.
//!
//! ```text
//!   file:PATH        ──┐
//!   kube             ──┤
//!   docker           ──┼─ watch<SourceState> ─▶ index ─▶ watch<Arc<Snapshot>> ─▶ streams
//!   switchyard:URL   ──┘  (another control plane: a cluster's exports, or a hub's imports)
//! ```
//!
//! Each source has a cluster id (`Source::cluster`: `--source SPEC=CLUSTER`,
//! else `--cluster`); the clusters of the sources are the clusters the
//! control plane serves. Objects from an API server always get their
//! source's cluster; only `file:` sources may move an object to another
//! cluster with the `switchyard.io/cluster` annotation, and only with
//! `--file-cluster-annotation`. Besides its objects, a state carries the
//! source's `errors` (objects that do not convert: skipped, reported, the
//! rest flows), `warnings` (the object is still used: unknown fields,
//! kinds and API versions that are not read; shown per source in
//! `/status`), `last_error` and `synced`.
//!
//! Sources keep their Services and slices in persistent maps ([`Objects`],
//! `imbl::OrdMap` keyed by Service key and by (Service key, slice name))
//! and derive each state they publish from the one before: the kube source
//! changes its maps per event and the file source per edited document;
//! the Docker and relay sources, which rebuild their objects, go through
//! [`share_unchanged`]. So an unchanged
//! map is the very same map and a changed one shares everything else with
//! its predecessor, which lets the index diff them in the size of the
//! change.

pub mod debounce;
pub mod docker;
pub mod file;
pub mod kubernetes;
pub mod relay;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use switchyard_model::{
    EndpointPort, EndpointSlice, Service, ServiceKey, ServiceState, TargetPort,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A Service as a source saw it. `service.cluster_ips` may be empty for a
/// non-headless Service: the index allocates one from `--service-cidr`.
pub type SourceService = Service;

/// An EndpointSlice with the Service it belongs to (its
/// `kubernetes.io/service-name` label, in the slice's namespace and cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSlice {
    /// The owning Service.
    pub service: ServiceKey,
    /// The slice.
    pub slice: EndpointSlice,
    /// Where the endpoints' port numbers come from.
    pub ports: SlicePorts,
}

impl SourceSlice {
    /// The slice with its port numbers, as the agents receive it.
    pub fn resolved(&self, service: &Service) -> EndpointSlice {
        match self.ports {
            SlicePorts::AsGiven => self.slice.clone(),
            SlicePorts::FromServiceTargets => EndpointSlice {
                ports: service
                    .ports
                    .iter()
                    .filter_map(|p| match p.target_port {
                        TargetPort::Number(port) => Some(EndpointPort {
                            name: p.name.clone(),
                            protocol: p.protocol,
                            port,
                        }),
                        // No container declares named ports: such a
                        // Service port has no endpoints here.
                        TargetPort::Name(_) => None,
                    })
                    .collect(),
                ..self.slice.clone()
            },
        }
    }
}

/// Where a slice's port numbers come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlicePorts {
    /// The slice's own `ports`, as Kubernetes' EndpointSlices carry them.
    #[default]
    AsGiven,
    /// The owning Service's numeric `targetPort`s, filled in by the index
    /// once it knows the Service: a source that knows endpoints but not the
    /// Service (Docker containers backing a Service declared in a file).
    FromServiceTargets,
}

/// An object a source had to skip, or a file it could not read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ObjectError {
    /// Which source reported it (for example `file:/etc/switchyard`).
    pub source: String,
    /// The object (`Service ns/name`) or the file and document (`/path/a.yaml#2`).
    pub object: String,
    /// The field at fault, empty when the whole object or file is unreadable.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// An object a source keeps in an [`Objects`] map, under its own key.
pub trait Keyed {
    /// What names the object within one source.
    type Key: Ord + Clone + std::fmt::Debug;
    /// The object's key.
    fn key(&self) -> Self::Key;
}

impl Keyed for SourceService {
    type Key = ServiceKey;
    fn key(&self) -> ServiceKey {
        self.key.clone()
    }
}

/// A slice's key within a source: its Service, then its name, so that one
/// Service's slices are one contiguous range.
pub type SliceKey = (ServiceKey, String);

impl Keyed for SourceSlice {
    type Key = SliceKey;
    fn key(&self) -> SliceKey {
        (self.service.clone(), self.slice.name.clone())
    }
}

/// A source's objects of one kind, by key, as a persistent map: a copy is a
/// pointer copy, a copy changed in one place shares everything else with
/// the original, and the difference between two such states costs what
/// changed (`imbl` skips the subtrees both share), which is what lets the
/// index do work in the size of a change.
pub struct Objects<T: Keyed>(imbl::OrdMap<T::Key, Arc<T>>);

impl<T: Keyed> Clone for Objects<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Keyed> Objects<T> {
    /// Adds `object` under its key, replacing what was there.
    pub fn push(&mut self, object: Arc<T>) {
        self.0.insert(object.key(), object);
    }

    /// Changes the object under `key` in place (a copy, when it is
    /// shared); `f` must not change its key. Whether there was one.
    pub fn modify(&mut self, key: &T::Key, f: impl FnOnce(&mut T)) -> bool
    where
        T: Clone,
    {
        match self.0.get_mut(key) {
            Some(object) => {
                f(Arc::make_mut(object));
                true
            }
            None => false,
        }
    }

    /// Removes the object under `key`.
    pub fn remove(&mut self, key: &T::Key) -> Option<Arc<T>> {
        self.0.remove(key)
    }

    /// The object under `key`.
    pub fn get(&self, key: &T::Key) -> Option<&Arc<T>> {
        self.0.get(key)
    }

    /// Every object, in key order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<T>> + '_ {
        self.0.values()
    }

    /// How many objects there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The object with the lowest key.
    pub fn first(&self) -> Option<&Arc<T>> {
        self.0.get_min().map(|(_, v)| v)
    }

    /// The objects whose keys lie in `range`, in key order.
    pub fn range<R: std::ops::RangeBounds<T::Key>>(
        &self,
        range: R,
    ) -> impl Iterator<Item = &Arc<T>> + '_ {
        self.0.range(range).map(|(_, v)| v)
    }

    /// The keys whose objects differ between `self` and `other` (added,
    /// removed or replaced by another `Arc`), in key order. Costs what
    /// differs when `other` was derived from `self` (or the reverse).
    pub fn changed_keys<'a>(&'a self, other: &'a Self) -> impl Iterator<Item = &'a T::Key> + 'a
    where
        T: PartialEq,
    {
        use imbl::ordmap::DiffItem;
        self.0.diff(&other.0).filter_map(|d| match d {
            DiffItem::Add(k, _) | DiffItem::Remove(k, _) => Some(k),
            DiffItem::Update {
                old: (k, a),
                new: (_, b),
            } => (!Arc::ptr_eq(a, b)).then_some(k),
        })
    }

    /// Whether both are the very same map (a copy nothing was changed in).
    pub fn same(&self, other: &Self) -> bool {
        self.0.ptr_eq(&other.0)
    }
}

impl<T: Keyed> Default for Objects<T> {
    fn default() -> Self {
        Self(imbl::OrdMap::new())
    }
}

impl<T: Keyed + PartialEq> PartialEq for Objects<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<T: Keyed + Eq> Eq for Objects<T> {}

impl<T: Keyed + std::fmt::Debug> std::fmt::Debug for Objects<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: Keyed> FromIterator<Arc<T>> for Objects<T> {
    fn from_iter<I: IntoIterator<Item = Arc<T>>>(iter: I) -> Self {
        let mut out = Self::default();
        out.extend(iter);
        out
    }
}

impl<T: Keyed> Extend<Arc<T>> for Objects<T> {
    fn extend<I: IntoIterator<Item = Arc<T>>>(&mut self, iter: I) {
        for o in iter {
            self.push(o);
        }
    }
}

impl<'a, T: Keyed> IntoIterator for &'a Objects<T> {
    type Item = &'a Arc<T>;
    type IntoIter = imbl::ordmap::Values<'a, T::Key, Arc<T>, imbl::shared_ptr::DefaultSharedPtr>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.values()
    }
}

/// Everything one source currently knows.
///
/// Objects are shared `Arc`s, and a source hands out the *same* `Arc` for an
/// object that did not change between two states it publishes, in maps
/// derived from the previous state's: the index finds what changed by
/// diffing the maps, so a rebuild after an endpoint change costs what
/// changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceState {
    /// True once the source has completed its first full read (list, scan).
    pub synced: bool,
    /// Every Service, by key.
    pub services: Objects<SourceService>,
    /// Every IPv4/IPv6 EndpointSlice (FQDN slices are dropped by the
    /// source), by its Service and name.
    pub slices: Objects<SourceSlice>,
    /// Objects skipped and files not read, with the reason.
    pub errors: Vec<ObjectError>,
    /// Input used but partly ignored, or ignored whole: kinds and API
    /// versions that are not read, unknown fields (as kubectl's strict
    /// decoding warns). Nothing is skipped for a warning.
    pub warnings: Vec<ObjectError>,
    /// Nodes and their topology zones (sources that know nodes: kube), by
    /// name; shared, so that a copy of the state does not copy every Node.
    pub nodes: Arc<[NodeInfo]>,
    /// Services exported to the clusterset (ServiceExports; KEP-1645).
    pub exports: Vec<Export>,
    /// The cluster's DNS settings (sources that read the kube-dns
    /// ConfigMap: kube), when it has some.
    pub dns: Option<Arc<ClusterDns>>,
    /// The ServiceImports in the cluster's API server (sources that read
    /// them: kube), by namespace and name.
    pub service_imports: Vec<RecordedImport>,
    /// The clusterset's imports, ready-made: set (even empty) by a relay
    /// that follows a hub's clusterset, which then replaces the local merge.
    pub imports: Option<Vec<Arc<ServiceState>>>,
    /// Why the source cannot currently follow its origin (an unreachable
    /// API server, a failing watch); it keeps serving what it had.
    pub last_error: Option<String>,
}

/// A ServiceExport: the Service of the same namespace and name in the
/// same cluster is part of the clusterset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The exported Service (the export's own cluster, namespace and name).
    pub key: ServiceKey,
    /// The ServiceExport's `metadata.creationTimestamp`, Unix seconds, when
    /// the source knows it: the oldest export's properties win a conflict.
    pub created_unix: Option<i64>,
    /// What the export asks the ServiceImport to carry.
    pub exported: ExportedMeta,
}

/// A ServiceExport's `spec.exportedLabels` and `spec.exportedAnnotations`
/// (MCS API v1beta1): put on the ServiceImport of every cluster, the
/// oldest export's winning a conflict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportedMeta {
    /// `spec.exportedLabels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.exportedAnnotations`.
    pub annotations: BTreeMap<String, String>,
}

impl ExportedMeta {
    /// The exported labels and annotations of a ServiceExport object
    /// (either MCS version: the fields are the same); values that are not
    /// strings are left out.
    pub fn of(export: &serde_json::Value) -> Self {
        let map = |field: &str| -> BTreeMap<String, String> {
            export
                .pointer(&format!("/spec/{field}"))
                .and_then(serde_json::Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        };
        Self {
            labels: map("exportedLabels"),
            annotations: map("exportedAnnotations"),
        }
    }
}

/// A ServiceImport found in a cluster's API server: the record of the
/// ClusterSet IPs given out, read back on start and honoured by every
/// control plane (as a Service's `spec.clusterIP` is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedImport {
    /// Its namespace.
    pub namespace: String,
    /// Its name (the imported Service's).
    pub name: String,
    /// `spec.ips`, the addresses that parse.
    pub ips: Vec<IpAddr>,
    /// Whether Switchyard manages it (its `app.kubernetes.io/managed-by`
    /// label): only those are written, deleted and honoured.
    pub ours: bool,
}

/// The cluster's DNS settings, from the kube-dns ConfigMap
/// (`stubDomains`, `upstreamNameservers`), for the agents' DNS stubs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClusterDns {
    /// Zone -> the servers names in it go to (`IP` or `IP:PORT`).
    pub stub_domains: BTreeMap<String, Vec<String>>,
    /// Where names outside the cluster go instead of the agents' own
    /// upstreams (`IP` or `IP:PORT`).
    pub upstream_nameservers: Vec<String>,
}

/// A cluster node as a source saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// Why it is leaving the cluster (KEP-3836): `deleted` (it has a
    /// deletionTimestamp) or the cluster autoscaler's
    /// `ToBeDeletedByClusterAutoscaler` taint; `None` while it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draining: Option<String>,
}

/// The taint the cluster autoscaler puts on a node it is about to delete
/// (kube-proxy's health server fails for such a node, KEP-3836).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// A running source: it publishes into `state` until `shutdown` is cancelled.
pub trait Source: Send + 'static {
    /// A stable, human-readable name (`file:/path`, `kube:context`).
    fn name(&self) -> String;

    /// The cluster its objects belong to.
    fn cluster(&self) -> String;

    /// Whether the source publishes its cluster's Nodes (`SourceState::nodes`),
    /// so that a node certificate can be checked against them.
    fn knows_nodes(&self) -> bool {
        false
    }

    /// Gives the source the clusterset to write back into its origin
    /// (sources with an API server: kube); others ignore it.
    fn attach_write_back(&mut self, _write_back: crate::mcs::writer::WriteBack) {}

    /// Runs the source. It must publish a state with `synced: true` once its
    /// first full read is done, and whole new states after every change.
    fn run(
        self: Box<Self>,
        state: watch::Sender<SourceState>,
        shutdown: CancellationToken,
    ) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Gives `next` the `Arc`s of `prev` for every object that did not change,
/// so the index recognises them by pointer (see [`SourceState`]). For
/// sources that rebuild their objects from scratch on every change.
pub fn share_unchanged(prev: &SourceState, next: &mut SourceState) {
    next.services = share(&prev.services, &next.services);
    next.slices = share(&prev.slices, &next.slices);
}

/// `next` as a copy of `prev` changed where they differ, so that the two
/// share their structure and every unchanged `Arc`.
fn share<T: Keyed + PartialEq>(prev: &Objects<T>, next: &Objects<T>) -> Objects<T> {
    let mut out = prev.clone();
    for key in prev.0.keys() {
        if next.get(key).is_none() {
            out.remove(key);
        }
    }
    for object in next.iter() {
        match prev.get(&object.key()) {
            Some(old) if Arc::ptr_eq(old, object) || **old == **object => {}
            _ => out.push(Arc::clone(object)),
        }
    }
    out
}

/// Publishes `new` unless it equals the current state, logging a summary
/// when it changed. Returns whether it did.
pub fn publish(state: &watch::Sender<SourceState>, name: &str, new: SourceState) -> bool {
    let changed = state.send_if_modified(|current| {
        if *current == new {
            false
        } else {
            *current = new;
            true
        }
    });
    if changed {
        let s = state.borrow();
        tracing::info!(
            source = %name,
            services = s.services.len(),
            slices = s.slices.len(),
            nodes = s.nodes.len(),
            errors = s.errors.len(),
            "source state published"
        );
    }
    changed
}
