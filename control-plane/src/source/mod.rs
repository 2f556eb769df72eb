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

pub mod debounce;
pub mod docker;
pub mod file;
pub mod kubernetes;
pub mod relay;

use std::collections::HashMap;
use std::future::Future;
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

/// Everything one source currently knows.
///
/// Objects are shared `Arc`s, and a source hands out the *same* `Arc` for an
/// object that did not change between two states it publishes: the index
/// recognises unchanged objects by pointer, so a rebuild costs what changed
/// plus one pointer comparison per object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceState {
    /// True once the source has completed its first full read (list, scan).
    pub synced: bool,
    /// Every Service, in no particular order.
    pub services: Vec<Arc<SourceService>>,
    /// Every IPv4/IPv6 EndpointSlice (FQDN slices are dropped by the source).
    pub slices: Vec<Arc<SourceSlice>>,
    /// Objects skipped and files not read, with the reason.
    pub errors: Vec<ObjectError>,
    /// Input used but partly ignored, or ignored whole: kinds and API
    /// versions that are not read, unknown fields (as kubectl's strict
    /// decoding warns). Nothing is skipped for a warning.
    pub warnings: Vec<ObjectError>,
    /// Nodes and their topology zones (sources that know nodes: kube).
    pub nodes: Vec<NodeInfo>,
    /// Services exported to the clusterset (ServiceExports; KEP-1645).
    pub exports: Vec<Export>,
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
}

/// A cluster node as a source saw it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    /// The node's name.
    pub name: String,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

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
    let services: HashMap<&ServiceKey, &Arc<SourceService>> =
        prev.services.iter().map(|s| (&s.key, s)).collect();
    for s in &mut next.services {
        if let Some(old) = services.get(&s.key)
            && **old == *s
        {
            *s = Arc::clone(old);
        }
    }
    let slices: HashMap<(&ServiceKey, &str), &Arc<SourceSlice>> = prev
        .slices
        .iter()
        .map(|s| ((&s.service, s.slice.name.as_str()), s))
        .collect();
    for s in &mut next.slices {
        if let Some(old) = slices.get(&(&s.service, s.slice.name.as_str()))
            && **old == *s
        {
            *s = Arc::clone(old);
        }
    }
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
