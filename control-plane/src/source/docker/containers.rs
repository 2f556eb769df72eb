//! From containers to Services and endpoints: the Docker source's rules,
//! with no engine in them (the engine side is `super`).
//!
//! ```text
//!  Container { labels, state, health, networks } × N
//!      ─▶ opt in? (switchyard.io/service) ─▶ parse labels ─┬▶ error: reported, container skipped
//!                                                          ▼
//!      group by Service key ─▶ oldest container with switchyard.io/ports declares the Service
//!                           ─▶ every container whose labels agree is an endpoint (address on its network)
//! ```
//!
//! Labels (all optional but the first):
//!
//! | label | meaning |
//! |---|---|
//! | `switchyard.io/service` | the Service this container backs (a DNS label) |
//! | `switchyard.io/namespace` | its namespace, default `default` |
//! | `switchyard.io/ports` | `[NAME=]PORT[:TARGET][/PROTOCOL]`, comma-separated: the Service's ports; without it the Service must be declared by another source (a YAML file) and the container's endpoint uses that Service's numeric target ports |
//! | `switchyard.io/headless` | `true`: no cluster IP, DNS answers the containers' addresses |
//! | `switchyard.io/cluster-ip` | a fixed cluster IP instead of one from `--service-cidr` |
//! | `switchyard.io/hostname` | the endpoint's hostname (headless DNS `<hostname>.<svc>.<ns>.svc.<zone>`) |
//! | `switchyard.io/network` | which network's address to use when the container is on several |
//! | `switchyard.io/export` | `true`: the Service is exported to the clusterset, as a ServiceExport would |
//!
//! Conditions follow Kubernetes' pods: running, not paused, and healthy (or
//! without a health check) is ready; a running container whose stop signal
//! was seen is terminating (serving while it stays healthy); anything else
//! is not ready.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use switchyard_model::{
    AddressType, Endpoint, EndpointConditions, EndpointSlice, Protocol, Service, ServiceKey,
    ServicePort, TargetPort, is_dns_label, is_port_name,
};

use crate::k8s;
use crate::source::{Export, ObjectError, SlicePorts, SourceService, SourceSlice};

/// The label that opts a container in: the Service it backs.
pub const SERVICE_LABEL: &str = "switchyard.io/service";
/// The Service's namespace.
pub const NAMESPACE_LABEL: &str = "switchyard.io/namespace";
/// The Service's ports.
pub const PORTS_LABEL: &str = "switchyard.io/ports";
/// `true` for a headless Service.
pub const HEADLESS_LABEL: &str = "switchyard.io/headless";
/// A fixed cluster IP.
pub const CLUSTER_IP_LABEL: &str = "switchyard.io/cluster-ip";
/// The endpoint's hostname.
pub const HOSTNAME_LABEL: &str = "switchyard.io/hostname";
/// The network whose address is the endpoint's.
pub const NETWORK_LABEL: &str = "switchyard.io/network";
/// `true`: the Service is exported to the clusterset (as a ServiceExport would).
pub const EXPORT_LABEL: &str = "switchyard.io/export";

/// A container's health check state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Health {
    /// No health check is configured.
    #[default]
    None,
    /// Checks run but none has passed yet.
    Starting,
    /// The last checks passed.
    Healthy,
    /// The checks fail.
    Unhealthy,
}

/// A container's addresses on one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkAddress {
    /// The network's name (`proj_default`).
    pub network: String,
    /// Its IPv4 address there, if any.
    pub ipv4: Option<IpAddr>,
    /// Its IPv6 address there, if any.
    pub ipv6: Option<IpAddr>,
}

/// What the source knows of one container.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Container {
    /// Engine id.
    pub id: String,
    /// Name, without the engine's leading `/`.
    pub name: String,
    /// Creation time as the engine writes it (RFC 3339, UTC); orders
    /// containers, oldest first.
    pub created: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Running (including paused).
    pub running: bool,
    /// Paused.
    pub paused: bool,
    /// Health check state.
    pub health: Health,
    /// A stop or kill signal was seen while it still runs: it is shutting down.
    pub stopping: bool,
    /// Its networks, in name order.
    pub networks: Vec<NetworkAddress>,
}

impl Container {
    /// How errors name the container.
    pub fn object_name(&self) -> String {
        format!("container {}", self.name)
    }

    fn conditions(&self) -> EndpointConditions {
        let healthy = matches!(self.health, Health::None | Health::Healthy);
        let serving = self.running && !self.paused && healthy;
        EndpointConditions {
            ready: serving && !self.stopping,
            serving,
            terminating: self.stopping,
        }
    }

    /// `created` as (seconds part, nanoseconds), so that `.5Z` and `.25Z`
    /// compare by value, not by text.
    fn created_order(&self) -> (&str, u32) {
        let (secs, frac) = self
            .created
            .trim_end_matches('Z')
            .split_once('.')
            .unwrap_or((self.created.trim_end_matches('Z'), ""));
        let digits: String = frac.chars().take_while(char::is_ascii_digit).collect();
        let nanos = format!("{digits:0<9}")[..9].parse().unwrap_or(0);
        (secs, nanos)
    }
}

/// What a container's labels ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    key: ServiceKey,
    /// The Service, when the container declares it (it has a ports label).
    service: Option<Service>,
    hostname: Option<String>,
    network: Option<String>,
    export: bool,
}

/// The Services, slices and errors of a set of containers.
#[derive(Debug, Default)]
pub struct Assembled {
    /// Services declared by labels, by key order.
    pub services: Vec<Arc<SourceService>>,
    /// One slice per Service and address family.
    pub slices: Vec<Arc<SourceSlice>>,
    /// Containers skipped, with the reason.
    pub errors: Vec<ObjectError>,
    /// Services a container exports (`switchyard.io/export: "true"`).
    pub exports: Vec<Export>,
}

/// Builds Services and endpoints from `containers` (any order).
pub fn assemble(containers: &[Container], cluster: &str, source: &str) -> Assembled {
    let mut out = Assembled::default();
    let error = |c: &Container, field: String, message: String| ObjectError {
        source: source.to_owned(),
        object: c.object_name(),
        field,
        message,
    };
    let mut sorted: Vec<&Container> = containers
        .iter()
        .filter(|c| c.labels.contains_key(SERVICE_LABEL))
        .collect();
    sorted.sort_by(|a, b| (a.created_order(), &a.name).cmp(&(b.created_order(), &b.name)));

    // Per Service: the declaring container and the endpoints, in age order.
    struct Group<'a> {
        declared: Option<(&'a Container, Service)>,
        members: Vec<(&'a Container, Wanted)>,
    }
    let mut groups: BTreeMap<ServiceKey, Group<'_>> = BTreeMap::new();
    for c in sorted {
        let wanted = match parse_labels(c, cluster) {
            Ok(w) => w,
            Err((label, message)) => {
                out.errors
                    .push(error(c, format!("labels[\"{label}\"]"), message));
                continue;
            }
        };
        let group = groups.entry(wanted.key.clone()).or_insert(Group {
            declared: None,
            members: Vec::new(),
        });
        if let Some(service) = &wanted.service {
            match &group.declared {
                None => group.declared = Some((c, service.clone())),
                Some((first, declared)) if declared != service => {
                    out.errors.push(error(
                        c,
                        "labels".into(),
                        format!(
                            "declare {} differently from the older container {}, whose labels are used; this container is left out",
                            service.object_name(),
                            first.name
                        ),
                    ));
                    continue;
                }
                Some(_) => {}
            }
        }
        group.members.push((c, wanted));
    }

    for (key, group) in groups {
        if let Some((_, service)) = group.declared {
            out.services.push(Arc::new(service));
        }
        if group.members.iter().any(|(_, w)| w.export) {
            out.exports.push(Export {
                key: key.clone(),
                created_unix: None,
                exported: Default::default(),
            });
        }
        for family in [AddressType::IPv4, AddressType::IPv6] {
            let mut endpoints = Vec::new();
            for (c, wanted) in &group.members {
                let address = match endpoint_address(c, wanted.network.as_deref(), family) {
                    Ok(Some(a)) => a,
                    Ok(None) => continue,
                    Err((field, message)) => {
                        if family == AddressType::IPv4 {
                            out.errors.push(error(c, field, message));
                        }
                        continue;
                    }
                };
                let mut endpoint = Endpoint {
                    addresses: address.into(),
                    conditions: c.conditions(),
                    ..Endpoint::default()
                };
                endpoint.set_hostname(wanted.hostname.as_deref().map(Box::from));
                endpoints.push(endpoint);
            }
            if endpoints.is_empty() {
                continue;
            }
            let suffix = match family {
                AddressType::IPv4 => "ipv4",
                AddressType::IPv6 => "ipv6",
            };
            out.slices.push(Arc::new(SourceSlice {
                service: key.clone(),
                slice: EndpointSlice {
                    name: format!("{}-docker-{suffix}", key.name),
                    address_type: family,
                    endpoints,
                    ports: Vec::new(),
                    cluster: None,
                    trigger_time_unix_nanos: None,
                },
                ports: SlicePorts::FromServiceTargets,
            }));
        }
    }
    out
}

/// The container's address of `family` on the network it is reached by.
/// `Ok(None)`: it has no address of that family (or none yet).
fn endpoint_address(
    c: &Container,
    network: Option<&str>,
    family: AddressType,
) -> Result<Option<IpAddr>, (String, String)> {
    let pick = |n: &NetworkAddress| match family {
        AddressType::IPv4 => n.ipv4,
        AddressType::IPv6 => n.ipv6,
    };
    if let Some(name) = network {
        return match c.networks.iter().find(|n| n.network == name) {
            Some(n) => Ok(pick(n)),
            None if !c.running => Ok(None),
            None => Err((
                format!("labels[\"{NETWORK_LABEL}\"]"),
                format!(
                    "the container is not on network {name:?} (it is on: {})",
                    network_names(c)
                ),
            )),
        };
    }
    let addressed: Vec<&NetworkAddress> = c
        .networks
        .iter()
        .filter(|n| n.ipv4.is_some() || n.ipv6.is_some())
        .collect();
    match addressed.as_slice() {
        [] => Ok(None),
        [one] => Ok(pick(one)),
        _ => Err((
            format!("labels[\"{NETWORK_LABEL}\"]"),
            format!(
                "the container is on several networks ({}); name the one to use in this label",
                network_names(c)
            ),
        )),
    }
}

fn network_names(c: &Container) -> String {
    let names: Vec<&str> = c.networks.iter().map(|n| n.network.as_str()).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// Reads a container's labels; an error names the label and what is wrong.
fn parse_labels(c: &Container, cluster: &str) -> Result<Wanted, (&'static str, String)> {
    let label = |name: &str| {
        c.labels
            .get(name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    };
    let name = label(SERVICE_LABEL).unwrap_or_default();
    if !is_dns_label(name) {
        return Err((
            SERVICE_LABEL,
            format!(
                "{name:?} is not a valid Service name (lowercase letters, digits and '-', at most 63)"
            ),
        ));
    }
    let namespace = label(NAMESPACE_LABEL).unwrap_or("default");
    if !is_dns_label(namespace) {
        return Err((
            NAMESPACE_LABEL,
            format!("{namespace:?} is not a valid namespace name"),
        ));
    }
    let key = ServiceKey::new(cluster, namespace, name);
    let headless = match label(HEADLESS_LABEL) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err((HEADLESS_LABEL, format!("{other:?} is not true or false"))),
    };
    let hostname = match label(HOSTNAME_LABEL) {
        Some(h) if !is_dns_label(h) => {
            return Err((HOSTNAME_LABEL, format!("{h:?} is not a DNS label")));
        }
        h => h.map(str::to_owned),
    };
    let network = label(NETWORK_LABEL).map(str::to_owned);
    let export = match label(EXPORT_LABEL) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err((EXPORT_LABEL, format!("{other:?} is not true or false"))),
    };
    let cluster_ip = match label(CLUSTER_IP_LABEL) {
        None => None,
        Some(ip) => Some(
            ip.parse::<IpAddr>()
                .map_err(|_| (CLUSTER_IP_LABEL, format!("{ip:?} is not an IP address")))?,
        ),
    };
    let service = match label(PORTS_LABEL) {
        None => {
            if headless || cluster_ip.is_some() {
                let which = if headless {
                    HEADLESS_LABEL
                } else {
                    CLUSTER_IP_LABEL
                };
                return Err((
                    which,
                    format!(
                        "only a container that declares the Service ({PORTS_LABEL}) may set it"
                    ),
                ));
            }
            None
        }
        Some(ports) => {
            let mut svc = Service::new(key.clone());
            svc.ports = parse_ports(ports).map_err(|m| (PORTS_LABEL, m))?;
            svc.headless = headless;
            if let Some(ip) = cluster_ip {
                if headless {
                    return Err((
                        CLUSTER_IP_LABEL,
                        "a headless Service has no cluster IP".into(),
                    ));
                }
                svc.cluster_ips.push(ip);
            }
            if let Err(errs) = k8s::validate_unallocated(&svc) {
                let e = errs.first();
                return Err((PORTS_LABEL, format!("{}: {}", e.field, e.message)));
            }
            Some(svc)
        }
    };
    Ok(Wanted {
        key,
        service,
        hostname,
        network,
        export,
    })
}

/// Parses `[NAME=]PORT[:TARGET][/PROTOCOL]`, comma-separated.
pub fn parse_ports(s: &str) -> Result<Vec<ServicePort>, String> {
    let mut ports = Vec::new();
    for entry in s.split(',').map(str::trim) {
        let bad = |why: &str| {
            format!(
                "{entry:?}: {why} (expected [NAME=]PORT[:TARGET][/tcp|udp|sctp], comma-separated)"
            )
        };
        if entry.is_empty() {
            return Err(bad("empty entry"));
        }
        let (name, rest) = match entry.split_once('=') {
            Some((n, r)) => (n.trim(), r.trim()),
            None => ("", entry),
        };
        if !name.is_empty() && !is_port_name(name) {
            return Err(bad(&format!(
                "{name:?} is not a port name (at most 15 lowercase letters, digits, '-')"
            )));
        }
        let (numbers, protocol) = match rest.split_once('/') {
            Some((n, p)) => (
                n,
                match p.to_ascii_lowercase().as_str() {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    "sctp" => Protocol::Sctp,
                    _ => return Err(bad(&format!("{p:?} is not tcp, udp or sctp"))),
                },
            ),
            None => (rest, Protocol::Tcp),
        };
        let number = |s: &str| match s.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(bad(&format!("{s:?} is not a port number (1-65535)"))),
        };
        let (port, target) = match numbers.split_once(':') {
            Some((p, t)) => (number(p)?, number(t)?),
            None => {
                let p = number(numbers)?;
                (p, p)
            }
        };
        ports.push(ServicePort {
            name: name.to_owned(),
            protocol,
            port,
            target_port: TargetPort::Number(target),
            node_port: None,
        });
    }
    if ports.len() > 1 && ports.iter().any(|p| p.name.is_empty()) {
        return Err(format!(
            "{s:?}: with several ports every port needs a NAME= (as in Kubernetes)"
        ));
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, created: &str, labels: &[(&str, &str)], ip: &str) -> Container {
        Container {
            id: format!("id-{name}"),
            name: name.into(),
            created: created.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            running: true,
            networks: vec![NetworkAddress {
                network: "tb_default".into(),
                ipv4: Some(ip.parse().expect("ip")),
                ipv6: None,
            }],
            ..Container::default()
        }
    }

    const WEB: &[(&str, &str)] = &[(SERVICE_LABEL, "web"), (PORTS_LABEL, "http=80:8080")];

    #[test]
    fn labelled_containers_become_a_service_and_its_endpoints() {
        let cs = [
            container("tb_web_2", "2026-12-01T08:00:01.5Z", WEB, "172.30.0.12"),
            container("tb_web_1", "2026-12-01T08:00:01.25Z", WEB, "172.30.0.11"),
            container("tb_other", "2026-12-01T08:00:00Z", &[], "172.30.0.9"),
        ];
        let out = assemble(&cs, "default", "docker");
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(out.services.len(), 1);
        let svc = &out.services[0];
        assert_eq!(svc.key, ServiceKey::new("default", "default", "web"));
        assert_eq!(svc.ports[0].port, 80);
        assert_eq!(svc.ports[0].target_port, TargetPort::Number(8080));
        assert_eq!(out.slices.len(), 1);
        let slice = &out.slices[0];
        assert_eq!(slice.ports, SlicePorts::FromServiceTargets);
        let ips: Vec<String> = slice
            .slice
            .endpoints
            .iter()
            .map(|e| e.addresses[0].to_string())
            .collect();
        // Oldest first: .25 s is older than .5 s.
        assert_eq!(ips, ["172.30.0.11", "172.30.0.12"]);
        assert!(slice.slice.endpoints.iter().all(|e| e.conditions.ready));
    }

    #[test]
    fn conditions_follow_health_pause_and_stop() {
        let mut c = container("w", "2026-12-01T08:00:00Z", WEB, "172.30.0.2");
        let cond = |c: &Container| {
            let out = assemble(std::slice::from_ref(c), "default", "docker");
            out.slices[0].slice.endpoints[0].conditions
        };
        assert!(cond(&c).ready);
        c.health = Health::Starting;
        assert!(!cond(&c).ready && !cond(&c).serving);
        c.health = Health::Healthy;
        c.stopping = true;
        let stopping = cond(&c);
        assert!(!stopping.ready && stopping.serving && stopping.terminating);
        c.stopping = false;
        c.paused = true;
        assert!(!cond(&c).serving);
    }

    #[test]
    fn bad_labels_are_reported_and_skipped_and_the_rest_flows() {
        let cs = [
            container("good", "2026-12-01T08:00:00Z", WEB, "172.30.0.2"),
            container(
                "bad-port",
                "2026-12-01T08:00:01Z",
                &[(SERVICE_LABEL, "api"), (PORTS_LABEL, "http=eighty")],
                "172.30.0.3",
            ),
            container(
                "bad-name",
                "2026-12-01T08:00:02Z",
                &[(SERVICE_LABEL, "Web_1")],
                "172.30.0.4",
            ),
            container(
                "differs",
                "2026-12-01T08:00:03Z",
                &[(SERVICE_LABEL, "web"), (PORTS_LABEL, "81")],
                "172.30.0.5",
            ),
        ];
        let out = assemble(&cs, "default", "docker");
        let errs: Vec<(&str, &str)> = out
            .errors
            .iter()
            .map(|e| (e.object.as_str(), e.field.as_str()))
            .collect();
        assert_eq!(
            errs,
            [
                ("container bad-port", "labels[\"switchyard.io/ports\"]"),
                ("container bad-name", "labels[\"switchyard.io/service\"]"),
                ("container differs", "labels"),
            ]
        );
        assert!(
            out.errors[0]
                .message
                .contains("\"eighty\" is not a port number")
        );
        assert!(out.errors[2].message.contains("older container good"));
        assert_eq!(out.services.len(), 1);
        assert_eq!(out.slices[0].slice.endpoints.len(), 1);
    }

    #[test]
    fn endpoints_only_containers_follow_a_service_declared_elsewhere() {
        let cs = [container(
            "api-1",
            "2026-12-01T08:00:00Z",
            &[(SERVICE_LABEL, "api"), (NAMESPACE_LABEL, "shop")],
            "172.30.0.7",
        )];
        let out = assemble(&cs, "east", "docker");
        assert!(out.services.is_empty());
        assert!(out.exports.is_empty());
        assert_eq!(
            out.slices[0].service,
            ServiceKey::new("east", "shop", "api")
        );
        let mut exported = cs[0].clone();
        exported.labels.insert(EXPORT_LABEL.into(), "true".into());
        let out = assemble(&[exported], "east", "docker");
        assert_eq!(out.exports[0].key, ServiceKey::new("east", "shop", "api"));
        assert_eq!(out.slices[0].ports, SlicePorts::FromServiceTargets);
    }

    #[test]
    fn several_networks_need_a_choice() {
        let mut c = container("w", "2026-12-01T08:00:00Z", WEB, "172.30.0.2");
        c.networks.push(NetworkAddress {
            network: "other".into(),
            ipv4: Some("10.1.0.2".parse().expect("ip")),
            ipv6: None,
        });
        let out = assemble(std::slice::from_ref(&c), "default", "docker");
        assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
        assert!(
            out.errors[0]
                .message
                .contains("several networks (tb_default, other)")
        );
        c.labels.insert(NETWORK_LABEL.into(), "other".into());
        let out = assemble(std::slice::from_ref(&c), "default", "docker");
        assert!(out.errors.is_empty());
        assert_eq!(
            out.slices[0].slice.endpoints[0].addresses[0].to_string(),
            "10.1.0.2"
        );
    }

    #[test]
    fn port_label_forms() {
        let p = parse_ports("http=80:8080/tcp, dns=53/UDP").expect("valid");
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[1].name.as_str(), p[1].port, p[1].protocol),
            ("dns", 53, Protocol::Udp)
        );
        assert_eq!(p[1].target_port, TargetPort::Number(53));
        assert_eq!(parse_ports("80").expect("valid")[0].name, "");
        for bad in ["", "80,81", "http=0", "http=80/icmp", "Bad=80", "http=80:x"] {
            assert!(parse_ports(bad).is_err(), "{bad:?}");
        }
    }
}
