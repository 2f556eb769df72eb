//! How sources and clusters merge: the one home of every rule that decides
//! what the snapshot holds when sources overlap, and of the clusterset
//! (the Multi-Cluster Services API, KEP-1645).
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
//!    (the oldest export's type, affinity and ports win; the ports of the
//!     others are added when they do not collide; every cluster's endpoints)
//! ```
//!
//! Everything here is pure: the index (`crate::index`) owns the state
//! (caches, IP allocation) and calls these functions on every build.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;
use switchyard_model::{
    CLUSTERSET, Protocol, Service, ServiceKey, ServicePort, ServiceState, ServiceType, TargetPort,
    TrafficPolicy,
};

use crate::source::{ObjectError, SourceSlice, SourceState};

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
}

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
    /// Exports that have no Service to export.
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
    /// `NoService`, `InvalidServiceType`, `TypeConflict`, `PortConflict`,
    /// `SessionAffinityConflict`.
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

    let mut exported: BTreeMap<&ServiceKey, Option<i64>> = BTreeMap::new();
    for (i, input) in inputs.iter().enumerate() {
        for e in &input.state.exports {
            match out.services.get_key_value(&e.key) {
                Some((key, _)) => {
                    let age = exported.entry(*key).or_insert(e.created_unix);
                    if let Some(c) = e.created_unix {
                        *age = Some(age.map_or(c, |a| a.min(c)));
                    }
                }
                None => out.issues.push(ClustersetIssue {
                    service: format!("{}/{}", e.key.namespace, e.key.name),
                    cluster: e.key.cluster.clone(),
                    reason: "NoService",
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
                    exported.entry(*key).or_insert(None);
                }
            }
        }
    }
    for (key, created_unix) in exported {
        out.exports
            .entry((key.namespace.as_str(), key.name.as_str()))
            .or_default()
            .push(Exporter { key, created_unix });
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
}

/// The clusterset Service (`clusterset/<namespace>/<name>`) of the exports
/// of one namespace/name, oldest first, without its ClusterSet IP (the
/// index allocates it), and what did not agree. `None` when no export is
/// usable.
pub fn import(
    namespace: &str,
    name: &str,
    exporters: &[Exported<'_>],
) -> (Option<ServiceState>, Vec<ClustersetIssue>) {
    let mut issues = Vec::new();
    let issue = |cluster: &str, reason: &'static str, message: String| ClustersetIssue {
        service: format!("{namespace}/{name}"),
        cluster: cluster.to_owned(),
        reason,
        message,
    };
    let usable: Vec<&Exported<'_>> = exporters
        .iter()
        .filter(|e| {
            let external = e.state.service.service_type == ServiceType::ExternalName;
            if external {
                issues.push(issue(
                    e.cluster,
                    "InvalidServiceType",
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
    service.internal_traffic_policy = TrafficPolicy::Cluster;
    service.external_traffic_policy = TrafficPolicy::Cluster;
    let mut slices = Vec::new();
    for e in &usable {
        let svc = &e.state.service;
        if svc.key.cluster != first.key.cluster {
            if svc.headless != first.headless {
                issues.push(issue(
                    e.cluster,
                    "TypeConflict",
                    format!(
                        "Conflicting type. Using {:?} from the oldest export in {:?}",
                        kind(first),
                        first.key.cluster
                    ),
                ));
            }
            if svc.session_affinity_timeout != first.session_affinity_timeout {
                issues.push(issue(
                    e.cluster,
                    "SessionAffinityConflict",
                    format!(
                        "Conflicting session affinity. Using the oldest export's, in {:?}",
                        first.key.cluster
                    ),
                ));
            }
        }
        for p in &svc.ports {
            if let Some(why) = merge_port(&mut service.ports, p) {
                issues.push(issue(
                    e.cluster,
                    "PortConflict",
                    format!("{why}; the port of the older export is used"),
                ));
            }
        }
        for s in &e.state.slices {
            let mut slice = s.clone();
            slice.name = format!("{}.{}", e.cluster, s.name);
            slice.cluster = Some(e.cluster.to_owned());
            for ep in &mut slice.endpoints {
                // Hints are for the zones of the endpoint's own cluster.
                ep.hint_zones.clear();
                ep.hint_nodes.clear();
            }
            slices.push(slice);
        }
    }
    (Some(ServiceState { service, slices }), issues)
}

fn kind(svc: &Service) -> &'static str {
    if svc.headless {
        "Headless"
    } else {
        "ClusterSetIP"
    }
}

/// Adds `p` to the union of ports unless it collides (KEP-1645: ports merge
/// by name, then by protocol and number; no name and no protocol/number
/// pair may appear twice). Returns why it was left out.
fn merge_port(ports: &mut Vec<ServicePort>, p: &ServicePort) -> Option<String> {
    let show = |q: &ServicePort| {
        let name = if q.name.is_empty() {
            "(unnamed)"
        } else {
            &q.name
        };
        format!("{name} {}/{}", q.port, q.protocol)
    };
    if let Some(same_name) = ports.iter().find(|q| q.name == p.name) {
        return (same_name.port != p.port || same_name.protocol != p.protocol)
            .then(|| format!("port {} collides with {} by name", show(p), show(same_name)));
    }
    if let Some(same_number) = ports
        .iter()
        .find(|q| q.port == p.port && q.protocol == p.protocol)
    {
        return Some(format!(
            "port {} collides with {} by number",
            show(p),
            show(same_number)
        ));
    }
    if !ports.is_empty() && (p.name.is_empty() || ports.iter().any(|q| q.name.is_empty())) {
        return Some(format!(
            "port {} cannot be added: with several ports every port needs a name",
            show(p)
        ));
    }
    ports.push(ServicePort {
        name: p.name.clone(),
        protocol: p.protocol,
        port: p.port,
        // Each slice carries its endpoints' numbers under the port's name.
        target_port: TargetPort::Number(p.port),
        node_port: None,
    });
    None
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
        assert_eq!(m.issues[0].reason, "NoService");
        let all = merge(&inputs, true);
        let web: Vec<&str> = all.exports[&("shop", "web")]
            .iter()
            .map(|e| e.key.cluster.as_str())
            .collect();
        assert_eq!(web, ["west", "east", "north"], "unknown age sorts last");
    }

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
                endpoints: vec![Endpoint {
                    addresses: vec![ip.parse().expect("ip")],
                    hint_zones: vec!["z1".into()],
                    ..Endpoint::default()
                }],
                ..EndpointSlice::default()
            }],
        }
    }

    #[test]
    fn an_import_merges_endpoints_and_the_oldest_export_wins_conflicts() {
        let west = exported("west", &[("http", 80), ("admin", 9000)], false, "10.2.0.1");
        let east = exported(
            "east",
            &[("http", 8080), ("metrics", 9100)],
            true,
            "10.1.0.1",
        );
        let (import, issues) = import(
            "shop",
            "web",
            &[
                Exported {
                    cluster: "west",
                    state: &west,
                },
                Exported {
                    cluster: "east",
                    state: &east,
                },
            ],
        );
        let import = import.expect("an import");
        assert_eq!(
            import.service.key,
            ServiceKey::new(CLUSTERSET, "shop", "web")
        );
        assert!(
            !import.service.headless,
            "the oldest (west) is not headless"
        );
        let ports: Vec<(&str, u16)> = import
            .service
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port))
            .collect();
        assert_eq!(ports, [("http", 80), ("admin", 9000), ("metrics", 9100)]);
        let reasons: Vec<(&str, &str)> = issues
            .iter()
            .map(|i| (i.cluster.as_str(), i.reason))
            .collect();
        assert_eq!(
            reasons,
            [("east", "TypeConflict"), ("east", "PortConflict")]
        );
        assert!(
            issues[1]
                .message
                .contains("http 8080/TCP collides with http 80/TCP")
        );
        let slices: Vec<(&str, Option<&str>)> = import
            .slices
            .iter()
            .map(|s| (s.name.as_str(), s.cluster.as_deref()))
            .collect();
        assert_eq!(
            slices,
            [("west.web-1", Some("west")), ("east.web-1", Some("east"))]
        );
        assert!(
            import
                .slices
                .iter()
                .all(|s| s.endpoints[0].hint_zones.is_empty())
        );
        let mut allocated = import.clone();
        allocated.service.cluster_ips = vec!["10.112.0.5".parse().expect("ip")];
        allocated
            .validate()
            .expect("a valid Service once it has its ClusterSet IP");
    }

    #[test]
    fn external_names_cannot_be_exported() {
        let mut ext = exported("east", &[], false, "10.1.0.1");
        ext.service.service_type = ServiceType::ExternalName;
        let (import, issues) = import(
            "shop",
            "web",
            &[Exported {
                cluster: "east",
                state: &ext,
            }],
        );
        assert!(import.is_none());
        assert_eq!(issues[0].reason, "InvalidServiceType");
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
