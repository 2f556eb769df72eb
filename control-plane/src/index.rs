//! The index: merges every source's state into one snapshot.
//!
//! ```text
//!  watch<SourceState> × N ──▶ debounce ──▶ merge ─▶ allocate IPs ─▶ group slices
//!                                          ─▶ validate ─▶ Snapshot::next ─▶ watch<Arc<Snapshot>>
//! ```
//!
//! The first snapshot is published only after every source has synced, so
//! an agent never receives a partial view that a later sync would have to
//! repair. After that, a burst of changes within the debounce window (capped
//! at `max_delay`) becomes one snapshot; a rebuild that changes nothing keeps
//! the version.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use switchyard_model::{Service, ServiceKey, ServiceState, ValidationError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ipam::ClusterIpAllocator;
use crate::metrics::Metrics;
use crate::snapshot::{Resource, Snapshot, VersionSource, make_resource};
use crate::source::{ObjectError, SourceSlice, SourceState};
use crate::status::{ServiceSummary, SourceStatus, Status};

/// How the index builds snapshots.
#[derive(Debug, Clone)]
pub struct IndexConfig {
    /// Ranges for cluster IPs of Services that name none, at most one per family.
    pub service_cidrs: Vec<IpNet>,
    /// Quiet time that ends a burst of changes.
    pub debounce: Duration,
    /// Longest a burst may delay a snapshot.
    pub max_delay: Duration,
    /// Where allocated cluster IPs are remembered; `None` keeps them in memory.
    pub state_dir: Option<PathBuf>,
}

/// The merging state carried between builds.
#[derive(Debug)]
pub struct Index {
    allocators: Vec<ClusterIpAllocator>,
    versions: VersionSource,
    current: Arc<Snapshot>,
    /// What each Service was built from last time, and the result, so a
    /// rebuild re-validates and re-encodes only the Services whose inputs
    /// changed: its cost is a comparison per Service plus the changes.
    cache: HashMap<ServiceKey, Built>,
    build_id: u64,
    /// The Services that got an address last build, in key order, and the
    /// addresses: reused while the same Services want one.
    last_allocation: Vec<(ServiceKey, IpAddr)>,
}

/// One Service's inputs and what they produced.
#[derive(Debug)]
struct Built {
    /// The Service as its source gave it (before IP allocation).
    service: Arc<Service>,
    /// The address allocated to it, if it named none.
    allocated: Option<IpAddr>,
    /// Its slices, ordered by name.
    slices: Vec<Arc<SourceSlice>>,
    /// The resource, or why the Service is invalid.
    result: Result<Valid, Vec<ValidationError>>,
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
        allocated: Option<IpAddr>,
        slices: &[&Arc<SourceSlice>],
    ) -> bool {
        self.allocated == allocated
            && Arc::ptr_eq(&self.service, service)
            && self.slices.len() == slices.len()
            && self
                .slices
                .iter()
                .zip(slices)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }
}

/// A valid Service's resource, under its name, and its `/status` line.
#[derive(Debug)]
struct Valid {
    name: Arc<str>,
    resource: Arc<Resource>,
    summary: Arc<ServiceSummary>,
}

/// What one build produced.
#[derive(Debug)]
pub struct Build {
    /// The new snapshot, if the content changed.
    pub snapshot: Option<Arc<Snapshot>>,
    /// Objects skipped, with the reason.
    pub invalid: Vec<ObjectError>,
    /// Every Service in the snapshot, in key order, as `/status` lists them.
    pub services: Vec<Arc<ServiceSummary>>,
}

impl Index {
    /// A fresh index.
    pub fn new(config: &IndexConfig) -> Self {
        let allocators = config
            .service_cidrs
            .iter()
            .map(|range| {
                let file = config.state_dir.as_ref().map(|d| {
                    d.join(format!(
                        "cluster-ips-{}.json",
                        range.to_string().replace(['/', ':'], "_")
                    ))
                });
                ClusterIpAllocator::new(*range, file)
            })
            .collect();
        Self {
            allocators,
            versions: VersionSource::new(),
            current: Arc::new(Snapshot::empty(String::new())),
            cache: HashMap::new(),
            build_id: 0,
            last_allocation: Vec::new(),
        }
    }

    /// Builds the next snapshot from every source's state (in source order:
    /// the first source to name an object wins). Returns a snapshot only when
    /// the content changed; the first build always returns one.
    pub fn build(&mut self, sources: &[(&str, &SourceState)], changed_at_unix_nanos: i64) -> Build {
        self.build_id += 1;
        let build_id = self.build_id;
        let mut invalid: Vec<ObjectError> = Vec::new();
        let mut services: BTreeMap<&ServiceKey, (usize, &Arc<Service>)> = BTreeMap::new();
        for (i, (name, state)) in sources.iter().enumerate() {
            invalid.extend(state.errors.iter().cloned());
            for svc in &state.services {
                if let Some((first, _)) = services.get(&svc.key) {
                    invalid.push(ObjectError {
                        source: (*name).to_owned(),
                        object: svc.object_name(),
                        field: String::new(),
                        message: format!("also defined by {}; that one is used", sources[*first].0),
                    });
                    continue;
                }
                services.insert(&svc.key, (i, svc));
            }
        }

        let allocated = self.allocate_cluster_ips(&mut services, sources, &mut invalid);

        let mut slices: HashMap<&ServiceKey, Vec<&Arc<SourceSlice>>> = HashMap::new();
        for (_, state) in sources {
            for s in &state.slices {
                if services.contains_key(&s.service) {
                    slices.entry(&s.service).or_default().push(s);
                }
            }
        }

        let mut resources = BTreeMap::new();
        let mut summaries = Vec::with_capacity(services.len());
        for (key, (src, service)) in services {
            let mut group = slices.remove(key).unwrap_or_default();
            group.sort_by(|a, b| a.slice.name.cmp(&b.slice.name));
            let ip = allocated.get(key).copied();
            let built = match self.cache.get_mut(key) {
                Some(b) if b.same_inputs(service, ip, &group) => b,
                _ => {
                    let fresh = self.rebuild(service, ip, &group);
                    self.cache.insert(key.clone(), fresh);
                    self.cache.get_mut(key).expect("just inserted")
                }
            };
            built.seen = build_id;
            match &built.result {
                Ok(valid) => {
                    resources.insert(valid.name.clone(), valid.resource.clone());
                    summaries.push(valid.summary.clone());
                }
                Err(errs) => invalid.extend(errs.iter().map(|e| ObjectError {
                    source: sources[src].0.to_owned(),
                    object: e.object.clone(),
                    field: e.field.clone(),
                    message: e.message.clone(),
                })),
            }
        }
        self.cache.retain(|_, b| b.seen == build_id);

        let snapshot = Snapshot::from_resources(
            &self.current,
            resources,
            &mut self.versions,
            changed_at_unix_nanos,
        )
        .map(Arc::new);
        if let Some(s) = &snapshot {
            self.current = s.clone();
        }
        Build {
            snapshot,
            invalid,
            services: summaries,
        }
    }

    /// Validates and encodes one Service whose inputs changed. A resource
    /// whose content turns out equal to the current one keeps its `Arc`.
    fn rebuild(
        &self,
        service: &Arc<Service>,
        allocated: Option<IpAddr>,
        slices: &[&Arc<SourceSlice>],
    ) -> Built {
        let mut state = ServiceState {
            service: (**service).clone(),
            slices: slices.iter().map(|s| s.resolved(service)).collect(),
        };
        state.service.cluster_ips.extend(allocated);
        let result = match state.validate() {
            Ok(()) => {
                let fresh = make_resource(&state);
                let summary = Arc::new(ServiceSummary::of(&state));
                let (name, resource) =
                    match self.current.resources.get_key_value(fresh.name.as_str()) {
                        Some((name, old)) if **old == fresh => (name.clone(), old.clone()),
                        _ => (Arc::from(fresh.name.as_str()), Arc::new(fresh)),
                    };
                Ok(Valid {
                    name,
                    resource,
                    summary,
                })
            }
            Err(errs) => Err(errs.0),
        };
        Built {
            service: Arc::clone(service),
            allocated,
            slices: slices.iter().map(|s| Arc::clone(s)).collect(),
            result,
            seen: 0,
        }
    }

    /// Gives each proxied Service without an address one from the range of
    /// the primary family; conflicting explicit addresses make the later
    /// Service (in key order) invalid. Returns the allocated addresses.
    fn allocate_cluster_ips<'a>(
        &mut self,
        services: &mut BTreeMap<&'a ServiceKey, (usize, &'a Arc<Service>)>,
        sources: &[(&str, &SourceState)],
        invalid: &mut Vec<ObjectError>,
    ) -> HashMap<&'a ServiceKey, IpAddr> {
        let mut owner: HashMap<(&str, IpAddr), &ServiceKey> = HashMap::new();
        let mut conflicts = Vec::new();
        for (key, (src, svc)) in services.iter() {
            for ip in &svc.cluster_ips {
                match owner.get(&(key.cluster.as_str(), *ip)) {
                    Some(other) => conflicts.push((*key, *src, *ip, (*other).clone())),
                    None => {
                        owner.insert((key.cluster.as_str(), *ip), key);
                    }
                }
            }
        }
        for (key, src, ip, other) in conflicts {
            if let Some((_, svc)) = services.remove(key) {
                invalid.push(ObjectError {
                    source: sources[src].0.to_owned(),
                    object: svc.object_name(),
                    field: "spec.clusterIP".into(),
                    message: format!(
                        "{ip} is already used by Service {}/{}",
                        other.namespace, other.name
                    ),
                });
            }
        }
        let mut allocated = HashMap::new();
        let Some(alloc) = self.allocators.first_mut() else {
            return allocated;
        };
        let wanting: Vec<&ServiceKey> = services
            .iter()
            .filter(|(_, (_, s))| s.wants_cluster_ip() && s.cluster_ips.is_empty())
            .map(|(k, _)| *k)
            .collect();
        // The common case: the same Services want addresses as last time
        // (only endpoints changed), and no explicit address now collides.
        let unchanged = self.last_allocation.len() == wanting.len()
            && self
                .last_allocation
                .iter()
                .zip(&wanting)
                .all(|((k, ip), w)| k == *w && !owner.contains_key(&(k.cluster.as_str(), *ip)));
        if unchanged {
            for ((_, ip), key) in self.last_allocation.iter().zip(wanting) {
                allocated.insert(key, *ip);
            }
            return allocated;
        }
        let taken: HashSet<IpAddr> = owner.keys().map(|(_, ip)| *ip).collect();
        let results = alloc.assign(&wanting, &taken);
        self.last_allocation.clear();
        let mut complete = true;
        for (key, result) in wanting.into_iter().zip(results) {
            match result {
                Ok(ip) => {
                    allocated.insert(key, ip);
                    self.last_allocation.push((key.clone(), ip));
                }
                Err(e) => {
                    complete = false;
                    if let Some((src, svc)) = services.remove(key) {
                        invalid.push(ObjectError {
                            source: sources[src].0.to_owned(),
                            object: svc.object_name(),
                            field: "spec.clusterIP".into(),
                            message: e.to_string(),
                        });
                    }
                }
            }
        }
        if !complete {
            // Retry the allocator next time rather than trusting a partial list.
            self.last_allocation.clear();
        }
        allocated
    }
}

/// Runs the index until `shutdown`: rebuilds after each debounced burst of
/// source changes and publishes snapshots whose content changed.
pub async fn run(
    config: IndexConfig,
    sources: Vec<(String, watch::Receiver<SourceState>)>,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let mut index = Index::new(&config);
    // Each source's watch channel wakes one shared Notify: a burst of
    // changes leaves at most one stored permit, and no state is cloned until
    // the index actually rebuilds.
    let changes = Arc::new(tokio::sync::Notify::new());
    for (_, rx) in &sources {
        let mut rx = rx.clone();
        let changes = changes.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
                changes.notify_one();
            }
        });
    }
    let mut first_change = Some(Instant::now());
    let mut changed_at = unix_nanos();
    loop {
        if let Some(started) = first_change.take() {
            // Debounce: wait for a quiet period, but never past max_delay.
            let deadline = started + config.max_delay;
            loop {
                let quiet = tokio::time::sleep(
                    config
                        .debounce
                        .min(deadline.saturating_duration_since(Instant::now())),
                );
                tokio::select! {
                    _ = quiet => break,
                    _ = changes.notified() => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            // Read every source's state in place: sources wait for the
            // duration of a build instead of the index copying their state.
            let guards: Vec<_> = sources
                .iter()
                .map(|(name, rx)| (name.as_str(), rx.borrow()))
                .collect();
            let states: Vec<(&str, &SourceState)> =
                guards.iter().map(|(n, g)| (*n, &**g)).collect();
            status.set_sources(
                states
                    .iter()
                    .map(|(name, s)| SourceStatus {
                        name: (*name).to_owned(),
                        synced: s.synced,
                        last_error: s.last_error.clone(),
                        nodes: s.nodes.clone(),
                        warnings: s.warnings.clone(),
                    })
                    .collect(),
            );
            let all_synced = states.iter().all(|(_, s)| s.synced);
            let build = all_synced.then(|| {
                let t = Instant::now();
                let build = index.build(&states, changed_at);
                metrics
                    .snapshot_build_seconds
                    .observe(t.elapsed().as_secs_f64());
                build
            });
            drop(states);
            drop(guards);
            if let Some(build) = build {
                metrics.invalid_objects.set(build.invalid.len() as i64);
                for e in &build.invalid {
                    tracing::warn!(source = %e.source, object = %e.object, field = %e.field, "skipped: {}", e.message);
                }
                match build.snapshot {
                    Some(snapshot) => {
                        tracing::info!(version = %snapshot.version, resources = snapshot.resources.len(), "snapshot built");
                        metrics.snapshots.inc();
                        metrics.resources.set(snapshot.resources.len() as i64);
                        status.set_snapshot(
                            &snapshot.version,
                            snapshot.resources.len(),
                            build.invalid,
                            build.services,
                        );
                        snapshots.send_replace(Some(snapshot));
                    }
                    None => status.set_invalid(build.invalid),
                }
            }
        }
        tokio::select! {
            _ = changes.notified() => {
                first_change = Some(Instant::now());
                changed_at = unix_nanos();
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Now, in Unix nanoseconds.
pub fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::SlicePorts;
    use switchyard_model::{Endpoint, EndpointSlice, Protocol, ServicePort, TargetPort};

    fn source(n: usize) -> SourceState {
        let mut state = SourceState {
            synced: true,
            ..SourceState::default()
        };
        for i in 0..n {
            let key = ServiceKey::new("default", "ns", format!("s{i}"));
            state.services.push(Arc::new(Service {
                ports: vec![ServicePort {
                    name: String::new(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target_port: TargetPort::Number(8080),
                    node_port: None,
                }],
                ..Service::new(key.clone())
            }));
            state.slices.push(Arc::new(SourceSlice {
                service: key,
                slice: EndpointSlice {
                    name: format!("s{i}-1"),
                    endpoints: vec![Endpoint {
                        addresses: vec![format!("10.244.0.{}", i + 1).parse().expect("ip")],
                        ..Endpoint::default()
                    }],
                    ..EndpointSlice::default()
                },
                ports: SlicePorts::AsGiven,
            }));
        }
        state
    }

    fn index() -> Index {
        Index::new(&IndexConfig {
            service_cidrs: vec!["10.96.0.0/16".parse().expect("cidr")],
            debounce: Duration::ZERO,
            max_delay: Duration::ZERO,
            state_dir: None,
        })
    }

    #[test]
    fn a_rebuild_touches_only_what_changed() {
        let mut idx = index();
        let mut state = source(20);
        let first = idx
            .build(&[("t", &state)], 1)
            .snapshot
            .expect("first snapshot");
        assert_eq!(first.resources.len(), 20);
        assert!(
            idx.build(&[("t", &state)], 2).snapshot.is_none(),
            "no change, no version"
        );

        Arc::make_mut(&mut state.slices[7]).slice.endpoints[0].addresses =
            vec!["10.244.9.9".parse().expect("ip")];
        let second = idx.build(&[("t", &state)], 3).snapshot.expect("a change");
        for (name, r) in &second.resources {
            let same = Arc::ptr_eq(r, &first.resources[name]);
            assert_eq!(same, &**name != "default/ns/s7", "{name}");
        }
        // Allocated cluster IPs do not move.
        let ips = |snap: &Snapshot, name: &str| {
            switchyard_proto::convert::decode_state_bytes(name, &snap.resources[name].service_state)
                .expect("decodes")
                .service
                .cluster_ips
        };
        for name in first.resources.keys() {
            assert_eq!(ips(&first, name), ips(&second, name), "{name}");
            assert_eq!(ips(&first, name).len(), 1);
        }
    }

    #[test]
    fn slices_of_another_source_take_the_services_target_ports() {
        let mut idx = index();
        let files = source(1);
        let key = files.services[0].key.clone();
        let docker = SourceState {
            synced: true,
            slices: vec![Arc::new(SourceSlice {
                service: key,
                slice: EndpointSlice {
                    name: "s0-docker-ipv4".into(),
                    endpoints: vec![Endpoint {
                        addresses: vec!["172.30.0.5".parse().expect("ip")],
                        ..Endpoint::default()
                    }],
                    ..EndpointSlice::default()
                },
                ports: SlicePorts::FromServiceTargets,
            })],
            ..SourceState::default()
        };
        let build = idx.build(&[("file", &files), ("docker", &docker)], 1);
        let snap = build.snapshot.expect("snapshot");
        let name = "default/ns/s0";
        let state = switchyard_proto::convert::decode_state_bytes(
            name,
            &snap.resources[name].service_state,
        )
        .expect("decodes");
        let slice = state
            .slices
            .iter()
            .find(|s| s.name == "s0-docker-ipv4")
            .expect("the docker slice");
        assert_eq!(slice.port_for("", Protocol::Tcp), Some(8080));
        assert_eq!(build.services.len(), 1);
        assert_eq!(build.services[0].endpoints, 2);
        assert_eq!(build.services[0].ready_endpoints, 2);
    }

    #[test]
    fn an_equal_object_in_a_new_arc_keeps_the_version() {
        let mut idx = index();
        let state = source(3);
        let first = idx
            .build(&[("t", &state)], 1)
            .snapshot
            .expect("first snapshot");
        let copy = SourceState {
            services: state
                .services
                .iter()
                .map(|s| Arc::new((**s).clone()))
                .collect(),
            slices: state
                .slices
                .iter()
                .map(|s| Arc::new((**s).clone()))
                .collect(),
            ..state.clone()
        };
        assert!(idx.build(&[("t", &copy)], 2).snapshot.is_none());
        assert_eq!(idx.current.version, first.version);
    }
}
