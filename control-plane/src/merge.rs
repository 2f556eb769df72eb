//! How sources and clusters merge: the one home of every rule that decides
//! what the snapshot holds when sources overlap, and of the clusterset
//! (the Multi-Cluster Services API, KEP-1645, as MCS API v0.5 / v1beta1
//! defines it).
//!
//! ```text
//!  sources, in --source order, each of one cluster
//!    ─▶ a key named by several sources: the first source wins, the others are reported
//!    ─▶ objects in the reserved cluster "clusterset": refused
//!    ─▶ per cluster, in key order: a cluster IP or node port already held
//!       refuses the later Service, naming both
//!    ─▶ slices join their Service, whichever source they come from
//!    ─▶ exports by namespace/name, oldest first                  = Merged
//!
//!  the exporting clusters' validated Services ─▶ import() ─▶ the clusterset Service
//!    + the families of its ClusterSet IPs + the labels and annotations its
//!      ServiceImports carry + what disagreed (ClustersetIssue, one per export and reason)
//! ```
//!
//! # The clusterset's rules
//!
//! The oldest export wins (`Exporter::age`: the ServiceExport's
//! creationTimestamp, then the cluster id). Exports of ExternalName
//! Services are not valid ([`INVALID_SERVICE_TYPE`]) and ServiceExports
//! without a Service neither ([`NO_SERVICE`]): they are left out. Among the
//! others, the import takes from the oldest its type (ClusterSetIP or
//! Headless), session affinity and its timeout, `internalTrafficPolicy`,
//! `trafficDistribution` (`PreferClose` and `PreferSameZone` count as one),
//! `publishNotReadyAddresses` and exported labels and annotations; every
//! export whose value differs raises the conflict of that property, and so
//! does the oldest (the MCS conformance suite checks Conflict on every
//! export that takes part): [`TYPE_CONFLICT`], [`SESSION_AFFINITY_CONFLICT`]
//! (ClientIP against None), [`SESSION_AFFINITY_CONFIG_CONFLICT`] (both
//! ClientIP, other timeouts), [`INTERNAL_TRAFFIC_POLICY_CONFLICT`],
//! [`TRAFFIC_DISTRIBUTION_CONFLICT`], [`LABELS_CONFLICT`],
//! [`ANNOTATIONS_CONFLICT`]. Exports in conflict still bring their
//! endpoints.
//!
//! The import is the clusterset Service `clusterset/<ns>/<name>`; its
//! slices are every exporting cluster's, each tagged with its cluster and
//! stripped of topology hints (a zone or node of one cluster means nothing
//! in another). An explicit cluster IP and a node port are per cluster:
//! health-check node ports count too, as they share the range.
//!
//! Ports are the union: they merge by name, then by protocol and number; a
//! port whose name or number is already in the union with another meaning
//! (or an unnamed port beside others) is left out, and its export's slices
//! lose that port, so its endpoints do not answer a port that means
//! something else. [`PORT_CONFLICT`] goes to the export whose port is left
//! out and to the one whose port is used; and, as the MCS conformance
//! suite expects, to every export when the exports do not all offer the
//! same ports (the union is still served).
//!
//! IP families: the import gets a ClusterSet IP of each family every export
//! has (the intersection, as Cilium does), in the oldest export's order; an
//! IPv6-only export therefore gets an IPv6 ClusterSet IP only, a dual-stack
//! one both. An export with no family in common with the older ones is left
//! out of the reckoning (its endpoints stay, reachable by no ClusterSet IP
//! of theirs) and raises [`IP_FAMILY_CONFLICT`], with the oldest. Narrowing
//! (a dual-stack export beside an IPv4-only one: IPv4 only) is no conflict.
//! The index then keeps the families it has a `--clusterset-cidr` of
//! ([`NO_CLUSTERSET_IP`] when none is left) and gives the addresses
//! (`crate::ipam`: the ServiceImports' record first).
//!
//! ```text
//!  sources ─▶ merge ─▶ per key: Service + slices ─▶ validate/encode (cached)
//!                  └─▶ exports by ns/name ─▶ exporters' resources ─▶ import (cached)
//!                                                  ─▶ ClusterSet IPs ─▶ validate/encode
//!  snapshot ranges:  east/… │ north/… │ clusterset/…   an agent of C gets C/… + clusterset/…
//! ```
//!
//! Where an import is used is decided on each node: an import carries a
//! `Locality` (the oldest export's `switchyard.io/min-local-endpoints` and
//! `switchyard.io/cluster-preference` annotations, else a threshold of 1),
//! which the agent's endpoint plan turns into tiers of clusters
//! (`agent/src/endpoints.rs`).
//!
//! Everything here is pure: the index (`crate::index`) owns the state
//! (caches, IP allocation) and calls these functions on every build.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;
use switchyard_model::{
    CLUSTERSET, IpFamily, Protocol, Service, ServiceKey, ServicePort, ServiceState, ServiceType,
    TargetPort, TrafficPolicy,
};

use crate::source::{ExportedMeta, ObjectError, SourceSlice, SourceState};

/// A ServiceExport without a Service of its name in its cluster (Valid=False).
pub const NO_SERVICE: &str = "NoService";
/// An exported ExternalName Service (Valid=False).
pub const INVALID_SERVICE_TYPE: &str = "InvalidServiceType";
/// Ports that collide by name or by protocol and number.
pub const PORT_CONFLICT: &str = "PortConflict";
/// ClusterSetIP against Headless.
pub const TYPE_CONFLICT: &str = "TypeConflict";
/// Session affinity ClientIP against None.
pub const SESSION_AFFINITY_CONFLICT: &str = "SessionAffinityConflict";
/// Both ClientIP, with different timeouts.
pub const SESSION_AFFINITY_CONFIG_CONFLICT: &str = "SessionAffinityConfigConflict";
/// Different `internalTrafficPolicy`.
pub const INTERNAL_TRAFFIC_POLICY_CONFLICT: &str = "InternalTrafficPolicyConflict";
/// Different `trafficDistribution`.
pub const TRAFFIC_DISTRIBUTION_CONFLICT: &str = "TrafficDistributionConflict";
/// No IP family in common with the older exports.
pub const IP_FAMILY_CONFLICT: &str = "IPFamilyConflict";
/// Different `spec.exportedLabels`.
pub const LABELS_CONFLICT: &str = "LabelsConflict";
/// Different `spec.exportedAnnotations`.
pub const ANNOTATIONS_CONFLICT: &str = "AnnotationsConflict";

/// Every conflict reason (ServiceExport condition Conflict=True), in the
/// order an export's issues are listed.
pub const CONFLICT_REASONS: [&str; 9] = [
    TYPE_CONFLICT,
    PORT_CONFLICT,
    SESSION_AFFINITY_CONFLICT,
    SESSION_AFFINITY_CONFIG_CONFLICT,
    INTERNAL_TRAFFIC_POLICY_CONFLICT,
    TRAFFIC_DISTRIBUTION_CONFLICT,
    IP_FAMILY_CONFLICT,
    LABELS_CONFLICT,
    ANNOTATIONS_CONFLICT,
];

/// The import has no ClusterSet IP (none left in a range, or no
/// `--clusterset-cidr` of its families); its issue names cluster
/// [`CLUSTERSET`], not an export. Not a ServiceExport condition.
pub const NO_CLUSTERSET_IP: &str = "NoClusterSetIP";
/// The merged import fails validation; cluster [`CLUSTERSET`]. Not a
/// ServiceExport condition.
pub const INVALID_IMPORT: &str = "Invalid";
/// A cluster's ServiceImport records another ClusterSet IP than the one
/// used (clusters disagree, or two imports record one address); its issue
/// names that cluster. Gone once the record is rewritten. Not a
/// ServiceExport condition.
pub const RECORD_MISMATCH: &str = "ClusterSetIPRecordMismatch";

/// One source's state, with its name and cluster.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The source's name (`file:/etc/sy`, `kube:prod=east`).
    pub name: &'a str,
    /// The cluster of its objects.
    pub cluster: &'a str,
    /// What it currently knows.
    pub state: &'a SourceState,
}

/// A cluster that exports a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exporter<'a> {
    /// The exported Service in its own cluster.
    pub key: &'a ServiceKey,
    /// When its ServiceExport was created (Unix seconds), if known.
    pub created_unix: Option<i64>,
    /// Its ServiceExport's exported labels and annotations (none with
    /// `--export-all` and no ServiceExport).
    pub exported: &'a ExportedMeta,
}

/// The exported labels and annotations of an export without a ServiceExport.
static NO_META: ExportedMeta = ExportedMeta {
    labels: BTreeMap::new(),
    annotations: BTreeMap::new(),
};

impl Exporter<'_> {
    /// Oldest first; exports of unknown age after those of known age, then
    /// by cluster id, so the order is the same on every control plane.
    fn age(&self) -> (i64, &str) {
        (self.created_unix.unwrap_or(i64::MAX), &self.key.cluster)
    }
}

/// What the snapshot is built from.
#[derive(Debug, Default)]
pub struct Merged<'a> {
    /// The Service of every key, with the index of the source that gave it.
    pub services: BTreeMap<&'a ServiceKey, (usize, &'a Arc<Service>)>,
    /// The slices of each Service, by slice name.
    pub slices: HashMap<&'a ServiceKey, Vec<&'a Arc<SourceSlice>>>,
    /// Exported Services by (namespace, name): the exporting clusters, oldest first.
    pub exports: BTreeMap<(&'a str, &'a str), Vec<Exporter<'a>>>,
    /// Objects refused, with the reason.
    pub errors: Vec<ObjectError>,
    /// Exports that have no Service to export ([`NO_SERVICE`]).
    pub issues: Vec<ClustersetIssue>,
}

/// Something wrong with an export, as `/status` shows it (KEP-1645's
/// ServiceExport conditions): the export is used as far as it can be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClustersetIssue {
    /// `namespace/name`.
    pub service: String,
    /// The exporting cluster the issue is about.
    pub cluster: String,
    /// One of this module's reason constants: [`NO_SERVICE`] and
    /// [`INVALID_SERVICE_TYPE`] (the export is not valid), the
    /// [`CONFLICT_REASONS`] (one issue per export and reason; several
    /// reasons of one export make one Conflict condition, joined by
    /// commas), and, naming cluster [`CLUSTERSET`] or the recording
    /// cluster, [`NO_CLUSTERSET_IP`], [`INVALID_IMPORT`] and
    /// [`RECORD_MISMATCH`], which are `/status` only.
    pub reason: &'static str,
    /// What happened, naming the export whose properties are used.
    pub message: String,
}

/// What a Service claims that no other Service of its cluster may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Claim {
    ClusterIp(IpAddr),
    NodePort(Protocol, u16),
}

/// Merges the sources' states (see the module docs). With `export_all`,
/// every Service counts as exported.
pub fn merge<'a>(inputs: &[Input<'a>], export_all: bool) -> Merged<'a> {
    let mut out = Merged::default();
    let error = |source: &str, object: String, field: &str, message: String| ObjectError {
        source: source.to_owned(),
        object,
        field: field.to_owned(),
        message,
    };
    let mut named: BTreeMap<&ServiceKey, (usize, &Arc<Service>)> = BTreeMap::new();
    for (i, input) in inputs.iter().enumerate() {
        out.errors.extend(input.state.errors.iter().cloned());
        for svc in input.state.services.iter() {
            if svc.key.cluster == CLUSTERSET {
                out.errors.push(error(
                    input.name,
                    svc.object_name(),
                    "cluster",
                    format!("{CLUSTERSET:?} is reserved for the clusterset's imports"),
                ));
                continue;
            }
            if let Some((first, _)) = named.get(&svc.key) {
                out.errors.push(error(
                    input.name,
                    svc.object_name(),
                    "",
                    format!("also defined by {}; that one is used", inputs[*first].name),
                ));
                continue;
            }
            named.insert(&svc.key, (i, svc));
        }
    }

    // Addresses and node ports are unique per cluster. Key order decides
    // which Service keeps one, so every control plane decides the same.
    let mut held: HashMap<(&str, Claim), &ServiceKey> = HashMap::new();
    for (key, (src, svc)) in named {
        let claims = claims(svc);
        let taken: Vec<_> = claims
            .iter()
            .filter_map(|(claim, field)| {
                held.get(&(key.cluster.as_str(), *claim))
                    .map(|owner| (*claim, field, *owner))
            })
            .collect();
        if taken.is_empty() {
            for (claim, _) in claims {
                held.insert((key.cluster.as_str(), claim), key);
            }
            out.services.insert(key, (src, svc));
            continue;
        }
        for (claim, field, owner) in taken {
            let what = match claim {
                Claim::ClusterIp(ip) => format!("{ip} is already the cluster IP"),
                Claim::NodePort(p, n) => format!("{n}/{p} is already a node port"),
            };
            out.errors.push(error(
                inputs[src].name,
                svc.object_name(),
                field,
                format!(
                    "{what} of Service {}/{}; this Service is left out until one of them changes",
                    owner.namespace, owner.name
                ),
            ));
        }
    }

    for input in inputs {
        for s in input.state.slices.iter() {
            if let Some((key, _)) = out.services.get_key_value(&s.service) {
                out.slices.entry(*key).or_default().push(s);
            }
        }
    }
    for group in out.slices.values_mut() {
        group.sort_by(|a, b| a.slice.name.cmp(&b.slice.name));
    }

    // Two sources of one cluster may both export a Service: the oldest
    // age counts, and the first source's labels and annotations.
    let mut exported: BTreeMap<&ServiceKey, (Option<i64>, &ExportedMeta)> = BTreeMap::new();
    for (i, input) in inputs.iter().enumerate() {
        for e in &input.state.exports {
            match out.services.get_key_value(&e.key) {
                Some((key, _)) => {
                    let (age, _) = exported
                        .entry(*key)
                        .or_insert((e.created_unix, &e.exported));
                    if let Some(c) = e.created_unix {
                        *age = Some(age.map_or(c, |a| a.min(c)));
                    }
                }
                None => out.issues.push(ClustersetIssue {
                    service: format!("{}/{}", e.key.namespace, e.key.name),
                    cluster: e.key.cluster.clone(),
                    reason: NO_SERVICE,
                    message: format!(
                        "exported by {} but cluster {} has no such Service",
                        inputs[i].name, e.key.cluster
                    ),
                }),
            }
        }
        if export_all {
            for (key, (src, _)) in &out.services {
                if *src == i {
                    exported.entry(*key).or_insert((None, &NO_META));
                }
            }
        }
    }
    for (key, (created_unix, exported)) in exported {
        out.exports
            .entry((key.namespace.as_str(), key.name.as_str()))
            .or_default()
            .push(Exporter {
                key,
                created_unix,
                exported,
            });
    }
    for group in out.exports.values_mut() {
        group.sort_by(|a, b| a.age().cmp(&b.age()));
    }
    out
}

/// The cluster IPs and node ports a Service holds, with the field that sets each.
fn claims(svc: &Service) -> Vec<(Claim, String)> {
    let mut out: Vec<(Claim, String)> = svc
        .cluster_ips
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let field = if i == 0 {
                "spec.clusterIP".to_owned()
            } else {
                format!("spec.clusterIPs[{i}]")
            };
            (Claim::ClusterIp(*ip), field)
        })
        .collect();
    for (i, p) in svc.ports.iter().enumerate() {
        if let Some(n) = p.node_port {
            out.push((
                Claim::NodePort(p.protocol, n),
                format!("spec.ports[{i}].nodePort"),
            ));
        }
    }
    // Health-check node ports come from the same range and serve TCP.
    if let Some(n) = svc.health_check_node_port {
        out.push((
            Claim::NodePort(Protocol::Tcp, n),
            "spec.healthCheckNodePort".to_owned(),
        ));
    }
    out
}

/// One exporting cluster's validated Service, for [`import`].
#[derive(Debug, Clone, Copy)]
pub struct Exported<'a> {
    /// The exporting cluster.
    pub cluster: &'a str,
    /// Its Service with its endpoints.
    pub state: &'a ServiceState,
    /// Its ServiceExport's `exportedLabels` and `exportedAnnotations`.
    pub exported: &'a ExportedMeta,
}

/// The clusterset's import of one namespace/name, as [`import`] merges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// The clusterset Service (`clusterset/<namespace>/<name>`) with every
    /// exporting cluster's endpoints, without its ClusterSet IPs (the index
    /// allocates them).
    pub state: ServiceState,
    /// The families it gets a ClusterSet IP of, primary first (the oldest
    /// export's order); empty when headless. Before the index keeps only
    /// those it has a `--clusterset-cidr` of.
    pub families: Vec<IpFamily>,
    /// The oldest export's exported labels and annotations, which the
    /// ServiceImports carry.
    pub exported: ExportedMeta,
    /// The clusters whose exports make it, oldest export first (a
    /// ServiceImport's `status.clusters`).
    pub clusters: Vec<String>,
}

/// The families of a Service's cluster IPs, in their order.
fn families_of(svc: &Service) -> Vec<IpFamily> {
    let mut out: Vec<IpFamily> = Vec::with_capacity(2);
    for ip in &svc.cluster_ips {
        let f = IpFamily::of(ip);
        if !out.contains(&f) {
            out.push(f);
        }
    }
    out
}

/// `spec.trafficDistribution` for comparison: Kubernetes 1.33 made
/// `PreferClose` the older name of `PreferSameZone`.
fn distribution(td: &Option<String>) -> Option<&str> {
    match td.as_deref() {
        Some("PreferClose") => Some("PreferSameZone"),
        other => other,
    }
}

/// What disagrees within one import: messages by (exporter, reason), both
/// as positions (exporters oldest first, reasons in [`CONFLICT_REASONS`]).
#[derive(Default)]
struct Conflicts(BTreeMap<(usize, usize), Vec<String>>);

impl Conflicts {
    fn add(&mut self, exporter: usize, reason: &'static str, message: String) {
        let at = CONFLICT_REASONS
            .iter()
            .position(|r| *r == reason)
            .expect("a conflict reason");
        self.0.entry((exporter, at)).or_default().push(message);
    }
}

/// The clusterset's import of `namespace/name` from its exports, oldest
/// first (see the module docs for every rule), and what did not agree:
/// one issue per export and reason. `None` when no export is usable.
pub fn import(
    namespace: &str,
    name: &str,
    exporters: &[Exported<'_>],
) -> (Option<Import>, Vec<ClustersetIssue>) {
    let service_name = format!("{namespace}/{name}");
    let issue = |cluster: &str, reason: &'static str, message: String| ClustersetIssue {
        service: service_name.clone(),
        cluster: cluster.to_owned(),
        reason,
        message,
    };
    let mut issues = Vec::new();
    let usable: Vec<&Exported<'_>> = exporters
        .iter()
        .filter(|e| {
            let external = e.state.service.service_type == ServiceType::ExternalName;
            if external {
                issues.push(issue(
                    e.cluster,
                    INVALID_SERVICE_TYPE,
                    "an ExternalName Service cannot be exported".into(),
                ));
            }
            !external
        })
        .collect();
    let Some(oldest) = usable.first() else {
        return (None, issues);
    };
    let first = &oldest.state.service;
    let mut service = Service::new(ServiceKey::new(CLUSTERSET, namespace, name));
    service.service_type = ServiceType::ClusterIp;
    service.headless = first.headless;
    service.session_affinity_timeout = first.session_affinity_timeout;
    service.publish_not_ready_addresses = first.publish_not_ready_addresses;
    service.locality = Some(first.locality.clone().unwrap_or_default());
    service.internal_traffic_policy = first.internal_traffic_policy;
    service.traffic_distribution = first.traffic_distribution.clone();
    service.external_traffic_policy = TrafficPolicy::Cluster;
    let mut families = if first.headless {
        Vec::new()
    } else {
        families_of(first)
    };
    let mut conflicts = Conflicts::default();
    // The export each port of the union comes from.
    let mut owners: Vec<usize> = Vec::new();
    let mut slices = Vec::new();
    for (i, e) in usable.iter().enumerate() {
        let svc = &e.state.service;
        if i > 0 {
            let mut disagree = |reason: &'static str, what: &str, ours: String, theirs: String| {
                conflicts.add(
                    i,
                    reason,
                    format!(
                        "Conflicting {what}: this export has {theirs}; using {ours} from the oldest export, in {:?}",
                        oldest.cluster
                    ),
                );
                conflicts.add(
                    0,
                    reason,
                    format!(
                        "Conflicting {what}: the export in {:?} has {theirs}; using this one's, {ours} (the oldest export)",
                        e.cluster
                    ),
                );
            };
            if svc.headless != first.headless {
                disagree(TYPE_CONFLICT, "type", kind(first).into(), kind(svc).into());
            }
            let affinity = |t: Option<u32>| if t.is_some() { "ClientIP" } else { "None" };
            match (first.session_affinity_timeout, svc.session_affinity_timeout) {
                (a, b) if a.is_some() != b.is_some() => disagree(
                    SESSION_AFFINITY_CONFLICT,
                    "session affinity",
                    affinity(a).into(),
                    affinity(b).into(),
                ),
                (Some(a), Some(b)) if a != b => disagree(
                    SESSION_AFFINITY_CONFIG_CONFLICT,
                    "session affinity config",
                    format!("timeoutSeconds {a}"),
                    format!("timeoutSeconds {b}"),
                ),
                _ => {}
            }
            if svc.internal_traffic_policy != first.internal_traffic_policy {
                disagree(
                    INTERNAL_TRAFFIC_POLICY_CONFLICT,
                    "internal traffic policy",
                    format!("{:?}", first.internal_traffic_policy),
                    format!("{:?}", svc.internal_traffic_policy),
                );
            }
            if distribution(&svc.traffic_distribution) != distribution(&first.traffic_distribution)
            {
                let show = |td: &Option<String>| td.clone().unwrap_or_else(|| "none".into());
                disagree(
                    TRAFFIC_DISTRIBUTION_CONFLICT,
                    "traffic distribution",
                    show(&first.traffic_distribution),
                    show(&svc.traffic_distribution),
                );
            }
            if e.exported.labels != oldest.exported.labels {
                disagree(
                    LABELS_CONFLICT,
                    "exported labels",
                    format!("{:?}", oldest.exported.labels),
                    format!("{:?}", e.exported.labels),
                );
            }
            if e.exported.annotations != oldest.exported.annotations {
                disagree(
                    ANNOTATIONS_CONFLICT,
                    "exported annotations",
                    format!("{:?}", oldest.exported.annotations),
                    format!("{:?}", e.exported.annotations),
                );
            }
            // The families common to every export so far; an export that
            // has none of them is left out of the reckoning.
            if !service.headless && !svc.headless && !svc.cluster_ips.is_empty() {
                let theirs = families_of(svc);
                let common: Vec<IpFamily> = families
                    .iter()
                    .copied()
                    .filter(|f| theirs.contains(f))
                    .collect();
                if common.is_empty() {
                    let show = |f: &[IpFamily]| {
                        f.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    disagree(
                        IP_FAMILY_CONFLICT,
                        "IP families",
                        show(&families),
                        show(&theirs),
                    );
                } else {
                    families = common;
                }
            }
        }
        // Ports that collide are left out, and so are this export's
        // endpoints for them: they would answer a port of another meaning.
        let mut refused: Vec<(&str, Protocol)> = Vec::new();
        for p in &svc.ports {
            match merge_port(&mut service.ports, p) {
                PortMerge::Added => owners.push(i),
                PortMerge::Same => {}
                PortMerge::Collides { why, with } => {
                    refused.push((&p.name, p.protocol));
                    let owner = owners[with];
                    conflicts.add(
                        i,
                        PORT_CONFLICT,
                        format!(
                            "{why} from the export in {:?}; that one is used, and this export's endpoints do not serve this one",
                            usable[owner].cluster
                        ),
                    );
                    if owner != i {
                        conflicts.add(
                            owner,
                            PORT_CONFLICT,
                            format!("{why} of the export in {:?}; this one's is used", e.cluster),
                        );
                    }
                }
            }
        }
        for s in &e.state.slices {
            let mut slice = s.clone();
            slice.name = format!("{}.{}", e.cluster, s.name);
            slice.cluster = Some(e.cluster.to_owned());
            slice
                .ports
                .retain(|p| !refused.contains(&(p.name.as_str(), p.protocol)));
            for ep in &mut slice.endpoints {
                // Hints are for the zones of the endpoint's own cluster.
                ep.set_hints(Box::default(), Box::default());
            }
            slices.push(slice);
        }
    }
    // Exports that do not offer the same ports all conflict, though none
    // collides: the union is served (the MCS conformance suite's "union
    // of the constituent service ports and raise a conflict").
    fn port_set(s: &Service) -> Vec<(&str, u16, Protocol)> {
        let mut set: Vec<(&str, u16, Protocol)> = s
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol))
            .collect();
        set.sort_unstable();
        set
    }
    let oldest_set = port_set(first);
    if usable
        .iter()
        .any(|e| port_set(&e.state.service) != oldest_set)
    {
        let union: Vec<String> = service.ports.iter().map(show_port).collect();
        for (i, e) in usable.iter().enumerate() {
            let own: Vec<String> = e.state.service.ports.iter().map(show_port).collect();
            conflicts.add(
                i,
                PORT_CONFLICT,
                format!(
                    "the exports do not offer the same ports: this one has {}; the union is served: {}",
                    own.join(", "),
                    union.join(", ")
                ),
            );
        }
    }
    for ((exporter, reason), messages) in conflicts.0 {
        issues.push(issue(
            usable[exporter].cluster,
            CONFLICT_REASONS[reason],
            messages.join("; "),
        ));
    }
    let import = Import {
        state: ServiceState { service, slices },
        families,
        exported: oldest.exported.clone(),
        clusters: usable.iter().map(|e| e.cluster.to_owned()).collect(),
    };
    (Some(import), issues)
}

fn kind(svc: &Service) -> &'static str {
    if svc.headless {
        "Headless"
    } else {
        "ClusterSetIP"
    }
}

/// `name port/protocol`, as conflict messages show a port.
fn show_port(q: &ServicePort) -> String {
    let name = if q.name.is_empty() {
        "(unnamed)"
    } else {
        &q.name
    };
    format!("{name} {}/{}", q.port, q.protocol)
}

/// What became of a port offered to the union.
enum PortMerge {
    /// It joined the union.
    Added,
    /// The union has it already (same name, number and protocol).
    Same,
    /// It collides with the union's port at index `with`, and why.
    Collides { why: String, with: usize },
}

/// Adds `p` to the union of ports unless it collides (KEP-1645: ports merge
/// by name, then by protocol and number; no name and no protocol/number
/// pair may appear twice).
fn merge_port(ports: &mut Vec<ServicePort>, p: &ServicePort) -> PortMerge {
    let show = show_port;
    if let Some(with) = ports.iter().position(|q| q.name == p.name) {
        let same = &ports[with];
        if same.port == p.port && same.protocol == p.protocol {
            return PortMerge::Same;
        }
        return PortMerge::Collides {
            why: format!("port {} collides by name with {}", show(p), show(same)),
            with,
        };
    }
    if let Some(with) = ports
        .iter()
        .position(|q| q.port == p.port && q.protocol == p.protocol)
    {
        return PortMerge::Collides {
            why: format!(
                "port {} collides by number with {}",
                show(p),
                show(&ports[with])
            ),
            with,
        };
    }
    if !ports.is_empty() && (p.name.is_empty() || ports.iter().any(|q| q.name.is_empty())) {
        let with = ports.iter().position(|q| q.name.is_empty()).unwrap_or(0);
        return PortMerge::Collides {
            why: format!(
                "port {} and {} cannot both be served: with several ports every port needs a name",
                show(p),
                show(&ports[with])
            ),
            with,
        };
    }
    ports.push(ServicePort {
        name: p.name.clone(),
        protocol: p.protocol,
        port: p.port,
        // Each slice carries its endpoints' numbers under the port's name.
        target_port: TargetPort::Number(p.port),
        node_port: None,
    });
    PortMerge::Added
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Export, SlicePorts};
    use switchyard_model::{Endpoint, EndpointSlice};

    fn svc(cluster: &str, name: &str, ip: Option<&str>, node_port: Option<u16>) -> Arc<Service> {
        Arc::new(Service {
            cluster_ips: ip.map(|ip| ip.parse().expect("ip")).into_iter().collect(),
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: TargetPort::Number(8080),
                node_port,
            }],
            service_type: if node_port.is_some() {
                ServiceType::NodePort
            } else {
                ServiceType::ClusterIp
            },
            ..Service::new(ServiceKey::new(cluster, "shop", name))
        })
    }

    fn state(services: Vec<Arc<Service>>) -> SourceState {
        SourceState {
            synced: true,
            services: services.into_iter().collect(),
            ..SourceState::default()
        }
    }

    #[test]
    fn the_first_source_wins_a_key() {
        let a = state(vec![svc("east", "web", None, None)]);
        let b = state(vec![svc("east", "web", Some("10.96.0.9"), None)]);
        let m = merge(
            &[
                Input {
                    name: "file:a",
                    cluster: "east",
                    state: &a,
                },
                Input {
                    name: "file:b",
                    cluster: "east",
                    state: &b,
                },
            ],
            false,
        );
        assert_eq!(m.services.len(), 1);
        assert_eq!(m.services.values().next().expect("one").0, 0);
        assert_eq!(m.errors.len(), 1);
        assert_eq!(m.errors[0].source, "file:b");
        assert!(m.errors[0].message.contains("also defined by file:a"));
    }

    #[test]
    fn duplicate_node_ports_and_cluster_ips_refuse_the_later_service_per_cluster() {
        let s = state(vec![
            svc("east", "a", Some("10.96.0.1"), Some(30080)),
            svc("east", "b", None, Some(30080)),
            svc("east", "c", Some("10.96.0.1"), None),
            // Another cluster may hold the same port and address.
            svc("west", "a", Some("10.96.0.1"), Some(30080)),
        ]);
        let m = merge(
            &[Input {
                name: "f",
                cluster: "east",
                state: &s,
            }],
            false,
        );
        let kept: Vec<String> = m.services.keys().map(|k| k.to_string()).collect();
        assert_eq!(kept, ["east/shop/a", "west/shop/a"]);
        let errs: Vec<(&str, &str)> = m
            .errors
            .iter()
            .map(|e| (e.object.as_str(), e.field.as_str()))
            .collect();
        assert_eq!(
            errs,
            [
                ("Service east/shop/b", "spec.ports[0].nodePort"),
                ("Service east/shop/c", "spec.clusterIP"),
            ],
            "{:?}",
            m.errors
        );
        assert!(
            m.errors[0]
                .message
                .contains("30080/TCP is already a node port of Service shop/a"),
            "{}",
            m.errors[0].message
        );
    }

    #[test]
    fn health_check_node_ports_share_the_node_port_range() {
        let mut local = (*svc("east", "a", None, Some(30080))).clone();
        local.health_check_node_port = Some(30090);
        let s = state(vec![Arc::new(local), svc("east", "b", None, Some(30090))]);
        let m = merge(
            &[Input {
                name: "f",
                cluster: "east",
                state: &s,
            }],
            false,
        );
        assert_eq!(m.services.len(), 1);
        assert_eq!(m.errors[0].field, "spec.ports[0].nodePort");
    }

    #[test]
    fn the_reserved_cluster_is_refused() {
        let s = state(vec![svc(CLUSTERSET, "web", None, None)]);
        let m = merge(
            &[Input {
                name: "f",
                cluster: "east",
                state: &s,
            }],
            false,
        );
        assert!(m.services.is_empty());
        assert_eq!(m.errors[0].field, "cluster");
    }

    #[test]
    fn exports_are_ordered_oldest_first_and_need_a_service() {
        let mut east = state(vec![svc("east", "web", None, None)]);
        east.exports = vec![
            Export {
                key: ServiceKey::new("east", "shop", "web"),
                created_unix: Some(200),
                exported: Default::default(),
            },
            Export {
                key: ServiceKey::new("east", "shop", "gone"),
                created_unix: Some(1),
                exported: Default::default(),
            },
        ];
        let mut west = state(vec![svc("west", "web", None, None)]);
        west.exports = vec![Export {
            key: ServiceKey::new("west", "shop", "web"),
            created_unix: Some(100),
            exported: Default::default(),
        }];
        let north = state(vec![svc("north", "web", None, None)]);
        let inputs = [
            Input {
                name: "kube=east",
                cluster: "east",
                state: &east,
            },
            Input {
                name: "kube=west",
                cluster: "west",
                state: &west,
            },
            Input {
                name: "kube=north",
                cluster: "north",
                state: &north,
            },
        ];
        let m = merge(&inputs, false);
        let web: Vec<&str> = m.exports[&("shop", "web")]
            .iter()
            .map(|e| e.key.cluster.as_str())
            .collect();
        assert_eq!(web, ["west", "east"], "north does not export");
        assert_eq!(m.issues.len(), 1);
        assert_eq!(m.issues[0].reason, NO_SERVICE);
        let all = merge(&inputs, true);
        let web: Vec<&str> = all.exports[&("shop", "web")]
            .iter()
            .map(|e| e.key.cluster.as_str())
            .collect();
        assert_eq!(web, ["west", "east", "north"], "unknown age sorts last");
    }

    /// A Service `web` of `cluster` with `ports` (name, port; the slice
    /// serves each on port + 1000) and one endpoint at `ip`.
    fn exported(cluster: &str, ports: &[(&str, u16)], headless: bool, ip: &str) -> ServiceState {
        let mut s = (*svc(cluster, "web", Some("10.96.0.1"), None)).clone();
        s.ports = ports
            .iter()
            .map(|(n, p)| ServicePort {
                name: (*n).into(),
                protocol: Protocol::Tcp,
                port: *p,
                target_port: TargetPort::Number(8080),
                node_port: None,
            })
            .collect();
        s.headless = headless;
        if headless {
            s.cluster_ips.clear();
        }
        ServiceState {
            service: s,
            slices: vec![EndpointSlice {
                name: "web-1".into(),
                endpoints: vec![{
                    let mut e = Endpoint {
                        addresses: vec![ip.parse().expect("ip")].into(),
                        ..Endpoint::default()
                    };
                    e.set_hints(["z1".into()].into(), Box::default());
                    e
                }],
                ports: ports
                    .iter()
                    .map(|(n, p)| switchyard_model::EndpointPort {
                        name: (*n).into(),
                        protocol: Protocol::Tcp,
                        port: p + 1000,
                    })
                    .collect(),
                ..EndpointSlice::default()
            }],
        }
    }

    static NONE: ExportedMeta = ExportedMeta {
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    };

    /// The exports of `states` (cluster, state), oldest first, without
    /// exported labels or annotations.
    fn exports<'a>(states: &'a [(&'a str, ServiceState)]) -> Vec<Exported<'a>> {
        states
            .iter()
            .map(|(cluster, state)| Exported {
                cluster,
                state,
                exported: &NONE,
            })
            .collect()
    }

    fn reasons(issues: &[ClustersetIssue]) -> Vec<(&str, &str)> {
        issues
            .iter()
            .map(|i| (i.cluster.as_str(), i.reason))
            .collect()
    }

    #[test]
    fn an_import_merges_endpoints_and_the_oldest_export_wins_conflicts() {
        let states = [
            (
                "west",
                exported("west", &[("http", 80), ("admin", 9000)], false, "10.2.0.1"),
            ),
            (
                "east",
                exported(
                    "east",
                    &[("http", 8080), ("metrics", 9100)],
                    true,
                    "10.1.0.1",
                ),
            ),
        ];
        let (import, issues) = import("shop", "web", &exports(&states));
        let import = import.expect("an import");
        assert_eq!(
            import.state.service.key,
            ServiceKey::new(CLUSTERSET, "shop", "web")
        );
        assert!(
            !import.state.service.headless,
            "the oldest (west) is not headless"
        );
        assert_eq!(import.clusters, ["west", "east"]);
        let ports: Vec<(&str, u16)> = import
            .state
            .service
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port))
            .collect();
        assert_eq!(ports, [("http", 80), ("admin", 9000), ("metrics", 9100)]);
        // Both exports that take part in each conflict are told.
        assert_eq!(
            reasons(&issues),
            [
                ("west", TYPE_CONFLICT),
                ("west", PORT_CONFLICT),
                ("east", TYPE_CONFLICT),
                ("east", PORT_CONFLICT),
            ]
        );
        assert!(
            issues[3].message.contains(
                "port http 8080/TCP collides by name with http 80/TCP from the export in \"west\""
            ),
            "{}",
            issues[3].message
        );
        assert!(
            issues[1]
                .message
                .contains("of the export in \"east\"; this one's is used")
        );
        assert!(
            issues[0]
                .message
                .contains("the export in \"east\" has Headless")
        );
        let slices: Vec<(&str, Option<&str>, Vec<&str>)> = import
            .state
            .slices
            .iter()
            .map(|s| {
                let ports = s.ports.iter().map(|p| p.name.as_str()).collect();
                (s.name.as_str(), s.cluster.as_deref(), ports)
            })
            .collect();
        // East's endpoints no longer serve "http": the import's http is
        // west's port 80, which east's 8080 does not mean.
        assert_eq!(
            slices,
            [
                ("west.web-1", Some("west"), vec!["http", "admin"]),
                ("east.web-1", Some("east"), vec!["metrics"]),
            ]
        );
        assert!(
            import
                .state
                .slices
                .iter()
                .all(|s| s.endpoints[0].extra.is_none())
        );
        let mut allocated = import.state.clone();
        allocated.service.cluster_ips = vec!["10.112.0.5".parse().expect("ip")];
        allocated
            .validate()
            .expect("a valid Service once it has its ClusterSet IP");
    }

    #[test]
    fn a_port_collision_by_number_or_without_a_name_is_a_conflict_too() {
        let states = [
            ("west", exported("west", &[("http", 80)], false, "10.2.0.1")),
            (
                "east",
                exported("east", &[("web", 80), ("tls", 443)], false, "10.1.0.1"),
            ),
            ("north", exported("north", &[("", 8443)], false, "10.3.0.1")),
        ];
        let (import, issues) = import("shop", "web", &exports(&states));
        let import = import.expect("an import");
        let ports: Vec<(&str, u16)> = import
            .state
            .service
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port))
            .collect();
        assert_eq!(ports, [("http", 80), ("tls", 443)]);
        assert_eq!(
            reasons(&issues),
            [
                ("west", PORT_CONFLICT),
                ("east", PORT_CONFLICT),
                ("north", PORT_CONFLICT),
            ]
        );
        assert!(
            issues[1].message.contains("collides by number"),
            "{}",
            issues[1].message
        );
        assert!(
            issues[2].message.contains("every port needs a name"),
            "{}",
            issues[2].message
        );
    }

    /// One property of the newer export (east) or of its ServiceExport changed.
    type Change = fn(&mut Service, &mut ExportedMeta);

    #[test]
    fn each_property_of_the_oldest_export_wins_and_both_exports_hear_of_a_conflict() {
        fn label(m: &mut ExportedMeta) {
            m.labels.insert("tier".into(), "front".into());
        }
        let cases: [(&str, Change, Change, Option<&str>); 13] = [
            ("the same", |_, _| {}, |_, _| {}, None),
            (
                "headless",
                |_, _| {},
                |s, _| {
                    s.headless = true;
                    s.cluster_ips.clear();
                },
                Some(TYPE_CONFLICT),
            ),
            (
                "ClientIP against None",
                |_, _| {},
                |s, _| s.session_affinity_timeout = Some(60),
                Some(SESSION_AFFINITY_CONFLICT),
            ),
            (
                "other timeouts",
                |s, _| s.session_affinity_timeout = Some(60),
                |s, _| s.session_affinity_timeout = Some(120),
                Some(SESSION_AFFINITY_CONFIG_CONFLICT),
            ),
            (
                "same timeouts",
                |s, _| s.session_affinity_timeout = Some(60),
                |s, _| s.session_affinity_timeout = Some(60),
                None,
            ),
            (
                "internal traffic policy",
                |s, _| s.internal_traffic_policy = TrafficPolicy::Local,
                |_, _| {},
                Some(INTERNAL_TRAFFIC_POLICY_CONFLICT),
            ),
            (
                "both Local",
                |s, _| s.internal_traffic_policy = TrafficPolicy::Local,
                |s, _| s.internal_traffic_policy = TrafficPolicy::Local,
                None,
            ),
            (
                "traffic distribution",
                |s, _| s.traffic_distribution = Some("PreferClose".into()),
                |_, _| {},
                Some(TRAFFIC_DISTRIBUTION_CONFLICT),
            ),
            (
                "PreferClose is PreferSameZone",
                |s, _| s.traffic_distribution = Some("PreferClose".into()),
                |s, _| s.traffic_distribution = Some("PreferSameZone".into()),
                None,
            ),
            (
                "no family in common",
                |_, _| {},
                |s, _| s.cluster_ips = vec!["fd00::1".parse().expect("ip")],
                Some(IP_FAMILY_CONFLICT),
            ),
            ("labels", |_, m| label(m), |_, _| {}, Some(LABELS_CONFLICT)),
            (
                "annotations",
                |_, _| {},
                |_, m| {
                    m.annotations.insert("note".into(), "x".into());
                },
                Some(ANNOTATIONS_CONFLICT),
            ),
            ("the same labels", |_, m| label(m), |_, m| label(m), None),
        ];
        for (what, oldest_change, newer_change, conflict) in cases {
            let mut west = exported("west", &[("http", 80)], false, "10.2.0.1");
            let mut east = exported("east", &[("http", 80)], false, "10.1.0.1");
            let (mut west_meta, mut east_meta) = (ExportedMeta::default(), ExportedMeta::default());
            oldest_change(&mut west.service, &mut west_meta);
            newer_change(&mut east.service, &mut east_meta);
            let (import, issues) = import(
                "shop",
                "web",
                &[
                    Exported {
                        cluster: "west",
                        state: &west,
                        exported: &west_meta,
                    },
                    Exported {
                        cluster: "east",
                        state: &east,
                        exported: &east_meta,
                    },
                ],
            );
            let import = import.expect(what);
            match conflict {
                Some(reason) => {
                    assert_eq!(
                        reasons(&issues),
                        [("west", reason), ("east", reason)],
                        "{what}"
                    )
                }
                None => assert!(issues.is_empty(), "{what}: {issues:?}"),
            }
            // The oldest export's properties, whatever the other's.
            let (got, want) = (&import.state.service, &west.service);
            assert_eq!(got.headless, want.headless, "{what}");
            assert_eq!(
                got.session_affinity_timeout, want.session_affinity_timeout,
                "{what}"
            );
            assert_eq!(
                got.internal_traffic_policy, want.internal_traffic_policy,
                "{what}"
            );
            assert_eq!(
                got.traffic_distribution, want.traffic_distribution,
                "{what}"
            );
            assert_eq!(import.exported, west_meta, "{what}");
            assert_eq!(import.families, [IpFamily::V4], "{what}");
            assert_eq!(import.state.slices.len(), 2, "{what}: both bring endpoints");
        }
    }

    #[test]
    fn a_conflict_leaves_out_the_exports_that_agree() {
        let west = exported("west", &[("http", 80)], false, "10.2.0.1");
        let mut north = exported("north", &[("http", 80)], false, "10.3.0.1");
        let mut east = exported("east", &[("http", 80)], false, "10.1.0.1");
        east.service.session_affinity_timeout = Some(30);
        north.service.traffic_distribution = west.service.traffic_distribution.clone();
        let states = [("west", west), ("north", north), ("east", east)];
        let (_, issues) = import("shop", "web", &exports(&states));
        assert_eq!(
            reasons(&issues),
            [
                ("west", SESSION_AFFINITY_CONFLICT),
                ("east", SESSION_AFFINITY_CONFLICT)
            ]
        );
    }

    #[test]
    fn the_import_has_the_families_every_export_has() {
        use IpFamily::{V4, V6};
        let with_ips = |cluster: &str, ips: &[&str]| {
            let mut s = exported(cluster, &[("http", 80)], false, "10.2.0.1");
            s.service.cluster_ips = ips.iter().map(|ip| ip.parse().expect("ip")).collect();
            s
        };
        type Case<'a> = (&'a str, &'a [&'a [&'a str]], &'a [IpFamily], bool);
        let cases: [Case<'_>; 6] = [
            ("IPv6 only", &[&["fd00::1"]], &[V6], false),
            (
                "dual-stack",
                &[&["10.96.0.1", "fd00::1"], &["10.96.0.2", "fd00::2"]],
                &[V4, V6],
                false,
            ),
            (
                "IPv6 primary first",
                &[&["fd00::1", "10.96.0.1"], &["10.96.0.2", "fd00::2"]],
                &[V6, V4],
                false,
            ),
            (
                "narrowed, no conflict",
                &[&["10.96.0.1", "fd00::1"], &["10.96.0.2"]],
                &[V4],
                false,
            ),
            (
                "none in common",
                &[&["10.96.0.1"], &["fd00::2"]],
                &[V4],
                true,
            ),
            (
                "the odd one left out",
                &[&["fd00::1", "10.96.0.1"], &["10.96.0.2"], &["fd00::3"]],
                &[V4],
                true,
            ),
        ];
        for (what, exporters, families, conflict) in cases {
            let clusters = ["west", "east", "north"];
            let states: Vec<(&str, ServiceState)> = exporters
                .iter()
                .zip(clusters)
                .map(|(ips, c)| (c, with_ips(c, ips)))
                .collect();
            let (import, issues) = import("shop", "web", &exports(&states));
            assert_eq!(import.expect(what).families, families, "{what}");
            assert_eq!(
                issues.iter().any(|i| i.reason == IP_FAMILY_CONFLICT),
                conflict,
                "{what}: {issues:?}"
            );
        }
        let headless = [("west", exported("west", &[("http", 80)], true, "10.2.0.1"))];
        let (import, _) = import("shop", "web", &exports(&headless));
        assert!(import.expect("headless").families.is_empty());
    }

    #[test]
    fn external_names_cannot_be_exported() {
        let mut ext = exported("east", &[], false, "10.1.0.1");
        ext.service.service_type = ServiceType::ExternalName;
        let states = [("east", ext)];
        let (import, issues) = import("shop", "web", &exports(&states));
        assert!(import.is_none());
        assert_eq!(reasons(&issues), [("east", INVALID_SERVICE_TYPE)]);
    }

    #[test]
    fn slices_keep_their_port_resolution() {
        // A slice of a source whose ports follow the Service: unaffected here.
        let s = SourceSlice {
            service: ServiceKey::new("east", "shop", "web"),
            slice: EndpointSlice::default(),
            ports: SlicePorts::FromServiceTargets,
        };
        let st = SourceState {
            synced: true,
            services: [svc("east", "web", None, None)].into_iter().collect(),
            slices: [Arc::new(s)].into_iter().collect(),
            ..SourceState::default()
        };
        let m = merge(
            &[Input {
                name: "d",
                cluster: "east",
                state: &st,
            }],
            false,
        );
        assert_eq!(m.slices.values().next().expect("a group").len(), 1);
    }
}
