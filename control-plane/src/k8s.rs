//! Conversion from Kubernetes API objects to the domain model.
//!
//! Both the `file:PATH` source and a Kubernetes watcher read the same
//! k8s-openapi types, so the mapping (and Kubernetes' defaulting rules) lives
//! here once:
//!
//! ```text
//!   core/v1 Service ───────────▶ service()        ─▶ model::Service (not validated)
//!   discovery/v1 EndpointSlice ▶ endpoint_slice() ─▶ SourceSlice     (validated)
//! ```
//!
//! Errors are [`ValidationError`]s that name the object the way the model
//! does (`Service shop/web`) and the field by its Kubernetes path
//! (`spec.ports[1].targetPort`), so a user can find the line at fault.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use switchyard_model::{
    AddressType, DEFAULT_AFFINITY_TIMEOUT_SECONDS, Endpoint, EndpointConditions, EndpointPort,
    EndpointSlice, IpFamily, IpFamilyPolicy, NOT_PROXIED_LABELS, Protocol, Service, ServiceKey,
    ServicePort, ServiceType, TargetPort, TrafficPolicy, ValidationError, ValidationErrors,
    shared_name,
};

use crate::source::{SlicePorts, SourceSlice};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The namespace Kubernetes assumes when an object names none.
const DEFAULT_NAMESPACE: &str = "default";

/// The cluster's DNS settings in a kube-dns ConfigMap: `stubDomains` (a
/// JSON object, `zone -> [server]`) and `upstreamNameservers` (a JSON list),
/// servers as `IP` or `IP:PORT`, as kube-dns and NodeLocal DNSCache read
/// them. What does not parse is left out and said (field, message); the
/// rest is used.
pub fn cluster_dns(cm: &core::ConfigMap) -> (crate::source::ClusterDns, Vec<(String, String)>) {
    let mut out = crate::source::ClusterDns::default();
    let mut problems = Vec::new();
    let data = cm.data.clone().unwrap_or_default();
    let server = |s: &str| s.parse::<std::net::SocketAddr>().is_ok() || s.parse::<IpAddr>().is_ok();
    if let Some(text) = data.get("stubDomains") {
        match serde_json::from_str::<std::collections::BTreeMap<String, Vec<String>>>(text) {
            Ok(domains) => {
                for (zone, servers) in domains {
                    let field = format!("data.stubDomains[{zone:?}]");
                    let name = zone.trim_end_matches('.');
                    if !switchyard_model::is_dns_subdomain(name) {
                        problems.push((field, "not a DNS name".to_owned()));
                        continue;
                    }
                    if let Some(bad) = servers.iter().find(|s| !server(s)) {
                        problems.push((field, format!("{bad:?} is not IP or IP:PORT")));
                        continue;
                    }
                    if !servers.is_empty() {
                        out.stub_domains.insert(name.to_owned(), servers);
                    }
                }
            }
            Err(e) => problems.push((
                "data.stubDomains".into(),
                format!("not a JSON object of zone -> [server]: {e}"),
            )),
        }
    }
    if let Some(text) = data.get("upstreamNameservers") {
        match serde_json::from_str::<Vec<String>>(text) {
            Ok(servers) => match servers.iter().find(|s| !server(s)) {
                Some(bad) => problems.push((
                    "data.upstreamNameservers".into(),
                    format!("{bad:?} is not IP or IP:PORT"),
                )),
                None => out.upstream_nameservers = servers,
            },
            Err(e) => problems.push((
                "data.upstreamNameservers".into(),
                format!("not a JSON list of servers: {e}"),
            )),
        }
    }
    (out, problems)
}

/// Converts a `core/v1` Service seen in `cluster`.
///
/// Kubernetes' defaults are applied (type ClusterIP, protocol TCP, target
/// port = port, affinity timeout three hours, traffic policies Cluster).
/// Only conversion errors are reported: the result is *not* validated,
/// because a Service without a cluster IP is valid input here (the index
/// allocates one) but not a valid [`Service`]. Callers validate once the
/// cluster IPs are known, or use [`validate_unallocated`] before that.
pub fn service(cluster: &str, svc: &core::Service) -> Result<Service, ValidationErrors> {
    let key = ServiceKey::new(
        cluster,
        namespace(svc.metadata.namespace.as_deref()),
        svc.metadata.name.clone().unwrap_or_default(),
    );
    let mut out = Service::new(key);
    let mut errs = Errors::new(out.object_name());
    let default_spec = core::ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);

    out.service_type = match non_empty(&spec.type_) {
        None | Some("ClusterIP") => ServiceType::ClusterIp,
        Some("NodePort") => ServiceType::NodePort,
        Some("LoadBalancer") => ServiceType::LoadBalancer,
        Some("ExternalName") => ServiceType::ExternalName,
        Some(other) => {
            errs.push("spec.type", format!("unknown Service type {other:?}"));
            ServiceType::ClusterIp
        }
    };

    convert_cluster_ips(spec, &mut out, &mut errs);
    convert_ip_families(spec, &mut out, &mut errs);

    for (i, p) in spec.ports.iter().flatten().enumerate() {
        if let Some(port) = convert_service_port(i, p, &mut errs) {
            out.ports.push(port);
        }
    }

    out.session_affinity_timeout = match non_empty(&spec.session_affinity) {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_SECONDS),
                // Out-of-range positive values are left for `validate`.
                Some(t) => match u32::try_from(t) {
                    Ok(t) => Some(t),
                    Err(_) => {
                        errs.push(
                            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                            format!("{t} is negative"),
                        );
                        None
                    }
                },
            }
        }
        Some(other) => {
            errs.push(
                "spec.sessionAffinity",
                format!("{other:?} is not None or ClientIP"),
            );
            None
        }
    };

    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        if let Some(ip) = parse_ip(ip, || format!("spec.externalIPs[{i}]"), &mut errs) {
            out.external_ips.push(ip);
        }
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        // Hostname-only ingresses (some cloud load balancers) have nothing
        // to proxy, and `ipMode: Proxy` ones are reached through the load
        // balancer itself, which kube-proxy then leaves alone on the node.
        if ing.ip_mode.as_deref() == Some("Proxy") {
            continue;
        }
        if let Some(ip) = non_empty(&ing.ip)
            && let Some(ip) = parse_ip(
                ip,
                || format!("status.loadBalancer.ingress[{i}].ip"),
                &mut errs,
            )
        {
            out.load_balancer_ips.push(ip);
        }
    }
    for (i, range) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        // kube-proxy tolerates surrounding blanks, so do we.
        match range.trim().parse::<IpNet>() {
            Ok(net) => out.load_balancer_source_ranges.push(net),
            Err(_) => errs.push(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                format!("{range:?} is not a CIDR"),
            ),
        }
    }

    out.external_traffic_policy = match non_empty(&spec.external_traffic_policy) {
        // "Global" is the pre-1.0 spelling of Cluster that the API server still accepts.
        None | Some("Cluster") | Some("Global") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            errs.push(
                "spec.externalTrafficPolicy",
                format!("{other:?} is not Cluster or Local"),
            );
            TrafficPolicy::Cluster
        }
    };
    out.internal_traffic_policy = match non_empty(&spec.internal_traffic_policy) {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            errs.push(
                "spec.internalTrafficPolicy",
                format!("{other:?} is not Cluster or Local"),
            );
            TrafficPolicy::Cluster
        }
    };

    out.health_check_node_port = optional_port(
        spec.health_check_node_port,
        "spec.healthCheckNodePort",
        &mut errs,
    );
    out.publish_not_ready_addresses = spec.publish_not_ready_addresses.unwrap_or(false);
    out.external_name = non_empty(&spec.external_name).map(str::to_owned);
    out.traffic_distribution = non_empty(&spec.traffic_distribution).map(str::to_owned);
    out.locality = locality(svc.metadata.annotations.as_ref(), &mut errs);
    out.not_proxied_by = svc.metadata.labels.as_ref().and_then(|labels| {
        NOT_PROXIED_LABELS
            .into_iter()
            .find(|l| labels.contains_key(*l))
            .map(str::to_owned)
    });
    out.shrink_to_fit();

    errs.finish(out)
}

/// Validates a converted Service whose cluster IPs may still be unallocated:
/// everything [`Service::validate`] checks except that a cluster IP is set.
pub fn validate_unallocated(svc: &Service) -> Result<(), ValidationErrors> {
    let Err(ValidationErrors(errs)) = svc.validate() else {
        return Ok(());
    };
    let unallocated = svc.wants_cluster_ip() && svc.cluster_ips.is_empty();
    let errs: Vec<_> = errs
        .into_iter()
        .filter(|e| !(unallocated && e.field == "spec.clusterIP"))
        .collect();
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(errs))
    }
}

/// Converts and validates a `discovery/v1` EndpointSlice seen in `cluster`.
///
/// Returns `Ok(None)` for an FQDN slice: like kube-proxy, Switchyard does not
/// proxy to names. Kubernetes' defaults are applied to conditions (`ready`
/// unset means true, `serving` unset means `ready`, `terminating` unset means
/// false) and ports (name `""`, protocol TCP); a port without a number means
/// "all ports" in Kubernetes, which a proxy cannot use, so it is dropped.
pub fn endpoint_slice(
    cluster: &str,
    slice: &discovery::EndpointSlice,
) -> Result<Option<SourceSlice>, ValidationErrors> {
    let namespace = namespace(slice.metadata.namespace.as_deref());
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned();
    let service = ServiceKey::new(cluster, namespace, service_name.clone().unwrap_or_default());
    let mut out = EndpointSlice {
        name: slice.metadata.name.clone().unwrap_or_default(),
        ..EndpointSlice::default()
    };
    let mut errs = Errors::new(out.object_name(&service));
    if service_name.as_deref().is_none_or(str::is_empty) {
        errs.push(
            "metadata.labels",
            format!("the {SERVICE_NAME_LABEL} label is required"),
        );
    }

    out.address_type = match slice.address_type.as_str() {
        "IPv4" => AddressType::IPv4,
        "IPv6" => AddressType::IPv6,
        "FQDN" => return Ok(None),
        other => {
            errs.push(
                "addressType",
                format!("{other:?} is not IPv4, IPv6 or FQDN"),
            );
            AddressType::IPv4
        }
    };

    // Exact capacities: a slice's endpoints are most of a large state, and
    // a vector grown by pushes holds up to twice what it keeps (16
    // endpoints' room for 10).
    out.endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, e) in slice.endpoints.iter().enumerate() {
        out.endpoints.push(convert_endpoint(i, e, &mut errs));
    }
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(number) = p.port else { continue };
        let at = |field: &str| format!("ports[{i}].{field}");
        let protocol = protocol(&p.protocol, || at("protocol"), &mut errs);
        let Some(port) = port_number(number, || at("port"), &mut errs) else {
            continue;
        };
        out.ports.push(EndpointPort {
            name: p.name.clone().unwrap_or_default(),
            protocol,
            port,
        });
    }

    out.trigger_time_unix_nanos = trigger_time(&slice.metadata);

    out.shrink_to_fit();
    let out = errs.finish(out)?;
    out.validate(&service)?;
    Ok(Some(SourceSlice {
        service,
        slice: out,
        ports: SlicePorts::AsGiven,
    }))
}

/// The annotation the endpoint controllers stamp on a slice with the time
/// of the change (a Pod's, a Service's) that last moved its endpoints.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The slice's trigger time in Unix nanoseconds. Like kube-proxy, an
/// unparsable value counts as none: it only feeds a latency metric.
fn trigger_time(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<i64> {
    let value = meta.annotations.as_ref()?.get(TRIGGER_TIME_ANNOTATION)?;
    let t: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
    i64::try_from(t.as_nanosecond()).ok().filter(|n| *n > 0)
}

fn convert_cluster_ips(spec: &core::ServiceSpec, out: &mut Service, errs: &mut Errors) {
    let single = non_empty(&spec.cluster_ip);
    let many: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    if single == Some("None") || many.first() == Some(&"None") {
        out.headless = true;
        if many.len() > 1 {
            errs.push("spec.clusterIPs", "a headless Service has only \"None\"");
        }
        return;
    }
    if let (Some(single), Some(first)) = (single, many.first())
        && single != *first
    {
        errs.push(
            "spec.clusterIPs[0]",
            format!("{first:?} must equal spec.clusterIP {single:?}"),
        );
        return;
    }
    if !many.is_empty() {
        for (i, ip) in many.iter().enumerate() {
            if let Some(ip) = parse_ip(ip, || format!("spec.clusterIPs[{i}]"), errs) {
                out.cluster_ips.push(ip);
            }
        }
    } else if let Some(ip) = single.and_then(|ip| parse_ip(ip, || "spec.clusterIP".into(), errs)) {
        out.cluster_ips.push(ip);
    }
    if out.service_type == ServiceType::ExternalName && !out.cluster_ips.is_empty() {
        errs.push("spec.clusterIP", "must be empty for type ExternalName");
        out.cluster_ips.clear();
    }
}

/// `spec.ipFamilies` and `spec.ipFamilyPolicy`, checked as the API server
/// checks them on its own (the families configured are the index's to
/// check, when it allocates): known names, no family twice, one family for
/// SingleStack, each family matching the cluster IP at its place. Two
/// families and no policy mean RequireDualStack, as the API server
/// defaults it. Ignored for ExternalName Services (the API server clears them).
fn convert_ip_families(spec: &core::ServiceSpec, out: &mut Service, errs: &mut Errors) {
    if out.service_type == ServiceType::ExternalName {
        return;
    }
    let given = spec.ip_families.as_deref().unwrap_or_default();
    if given.len() > 2 {
        errs.push(
            "spec.ipFamilies",
            format!("at most two families (one of each); {} given", given.len()),
        );
    }
    for (i, name) in given.iter().enumerate().take(2) {
        let at = format!("spec.ipFamilies[{i}]");
        match name.parse::<IpFamily>() {
            Ok(f) if out.requested_ip_families.contains(&f) => {
                errs.push(at, format!("{f} is given twice"))
            }
            Ok(f) => {
                if let Some(ip) = out.cluster_ips.get(i)
                    && IpFamily::of(ip) != f
                {
                    errs.push(
                        at,
                        format!(
                            "{f} does not match spec.clusterIPs[{i}] {ip}, of {}",
                            IpFamily::of(ip)
                        ),
                    );
                }
                out.requested_ip_families.push(f);
            }
            Err(e) => errs.push(at, e),
        }
    }
    out.ip_family_policy = match non_empty(&spec.ip_family_policy) {
        None if out.requested_ip_families.len() == 2 => Some(IpFamilyPolicy::RequireDualStack),
        None => None,
        Some(p) => match p.parse::<IpFamilyPolicy>() {
            Ok(p) => Some(p),
            Err(e) => {
                errs.push("spec.ipFamilyPolicy", e);
                None
            }
        },
    };
    if out.ip_family_policy == Some(IpFamilyPolicy::SingleStack) {
        if out.requested_ip_families.len() > 1 {
            errs.push(
                "spec.ipFamilies",
                "SingleStack allows one family; two are given",
            );
        } else if out.cluster_ips.len() > 1 {
            errs.push(
                "spec.ipFamilyPolicy",
                "SingleStack allows one cluster IP; spec.clusterIPs has two",
            );
        }
    }
}

fn convert_service_port(i: usize, p: &core::ServicePort, errs: &mut Errors) -> Option<ServicePort> {
    // Field paths are made only for an error: most objects have none.
    let at = |field: &str| format!("spec.ports[{i}].{field}");
    let protocol = protocol(&p.protocol, || at("protocol"), errs);
    let node_port = optional_port(p.node_port, &at("nodePort"), errs);
    let port = port_number(p.port, || at("port"), errs)?;
    // The API server defaults a missing, zero or empty targetPort to the port.
    let target_port = match &p.target_port {
        None | Some(IntOrString::Int(0)) => TargetPort::Number(port),
        Some(IntOrString::String(s)) if s.is_empty() => TargetPort::Number(port),
        Some(IntOrString::Int(n)) => {
            TargetPort::Number(port_number(*n, || at("targetPort"), errs)?)
        }
        Some(IntOrString::String(s)) => TargetPort::Name(s.clone()),
    };
    Some(ServicePort {
        name: p.name.clone().unwrap_or_default(),
        protocol,
        port,
        target_port,
        node_port,
    })
}

fn convert_endpoint(i: usize, e: &discovery::Endpoint, errs: &mut Errors) -> Endpoint {
    // Collected into the inline form: no heap block for the one address.
    let addresses = e
        .addresses
        .iter()
        .enumerate()
        .filter_map(|(j, a)| parse_ip(a, || format!("endpoints[{i}].addresses[{j}]"), errs))
        .collect();
    let conditions = e
        .conditions
        .as_ref()
        .map_or_else(EndpointConditions::default, |c| {
            let ready = c.ready.unwrap_or(true);
            EndpointConditions {
                ready,
                serving: c.serving.unwrap_or(ready),
                terminating: c.terminating.unwrap_or(false),
            }
        });
    let hints = e.hints.as_ref();
    let mut endpoint = Endpoint {
        addresses,
        conditions,
        pod_name: e
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| non_empty(&r.name))
            .map(Box::from),
        node_name: non_empty(&e.node_name).map(shared_name),
        zone: non_empty(&e.zone).map(shared_name),
        extra: None,
    };
    endpoint.set_hostname(non_empty(&e.hostname).map(Box::from));
    endpoint.set_hints(
        hints
            .and_then(|h| h.for_zones.as_ref())
            .into_iter()
            .flatten()
            .map(|z| shared_name(&z.name))
            .collect(),
        hints
            .and_then(|h| h.for_nodes.as_ref())
            .into_iter()
            .flatten()
            .map(|n| shared_name(&n.name))
            .collect(),
    );
    endpoint
}

fn namespace(ns: Option<&str>) -> String {
    match ns {
        Some(ns) if !ns.is_empty() => ns.to_owned(),
        _ => DEFAULT_NAMESPACE.to_owned(),
    }
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

fn protocol(p: &Option<String>, field: impl FnOnce() -> String, errs: &mut Errors) -> Protocol {
    match non_empty(p) {
        None | Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some(other) => {
            errs.push(field(), format!("{other:?} is not TCP, UDP or SCTP"));
            Protocol::Tcp
        }
    }
}

fn port_number(n: i32, field: impl FnOnce() -> String, errs: &mut Errors) -> Option<u16> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Some(p),
        _ => {
            errs.push(field(), format!("{n} is not between 1 and 65535"));
            None
        }
    }
}

/// A port Kubernetes leaves unset as 0 (`nodePort`, `healthCheckNodePort`).
/// An exported Service's locality, from its annotations
/// (`switchyard.io/min-local-endpoints`, `switchyard.io/cluster-preference`);
/// `None` when it gives neither.
fn locality(
    annotations: Option<&std::collections::BTreeMap<String, String>>,
    errs: &mut Errors,
) -> Option<switchyard_model::Locality> {
    use switchyard_model::{CLUSTER_PREFERENCE_ANNOTATION, MIN_LOCAL_ENDPOINTS_ANNOTATION};
    let annotations = annotations?;
    let min = annotations.get(MIN_LOCAL_ENDPOINTS_ANNOTATION);
    let preference = annotations.get(CLUSTER_PREFERENCE_ANNOTATION);
    if min.is_none() && preference.is_none() {
        return None;
    }
    let mut out = switchyard_model::Locality::default();
    if let Some(m) = min {
        match m.trim().parse::<u32>() {
            Ok(n) => out.min_local_endpoints = n,
            Err(_) => errs.push(
                format!("metadata.annotations[{MIN_LOCAL_ENDPOINTS_ANNOTATION}]"),
                format!("{m:?} is not a number of endpoints"),
            ),
        }
    }
    for c in preference.into_iter().flat_map(|p| p.split(',')) {
        let c = c.trim();
        if c.is_empty() {
            continue;
        }
        if switchyard_model::is_dns_label(c) {
            out.preference.push(c.to_owned());
        } else {
            errs.push(
                format!("metadata.annotations[{CLUSTER_PREFERENCE_ANNOTATION}]"),
                format!("{c:?} is not a cluster id (a DNS label)"),
            );
        }
    }
    Some(out)
}

fn optional_port(n: Option<i32>, field: &str, errs: &mut Errors) -> Option<u16> {
    match n {
        None | Some(0) => None,
        Some(n) => port_number(n, || field.to_owned(), errs),
    }
}

fn parse_ip(s: &str, field: impl FnOnce() -> String, errs: &mut Errors) -> Option<IpAddr> {
    match s.parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            errs.push(field(), format!("{s:?} is not an IP address"));
            None
        }
    }
}

/// The conversion errors of one object (the model's collector is private to it).
struct Errors {
    object: String,
    errors: Vec<ValidationError>,
}

impl Errors {
    fn new(object: String) -> Self {
        Self {
            object,
            errors: Vec::new(),
        }
    }

    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors
            .push(ValidationError::new(self.object.clone(), field, message));
    }

    fn finish<T>(self, value: T) -> Result<T, ValidationErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(ValidationErrors(self.errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn mk_service(v: serde_json::Value) -> core::Service {
        serde_json::from_value(v).expect("a k8s Service")
    }

    fn mk_slice(v: serde_json::Value) -> discovery::EndpointSlice {
        serde_json::from_value(v).expect("a k8s EndpointSlice")
    }

    fn fields(e: &ValidationErrors) -> Vec<&str> {
        e.0.iter().map(|e| e.field.as_str()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn converted_objects_keep_no_room_beyond_what_they_hold() {
        // Most of a large state is endpoints: a vector grown by pushes
        // would hold 16 for 10.
        let endpoints: Vec<_> = (0..10)
            .map(|i| json!({"addresses": [format!("10.0.0.{i}")], "hints": {"forZones": [{"name": "a"}]}}))
            .collect();
        let slice = mk_slice(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080}],
        }));
        let slice = endpoint_slice("c", &slice)
            .expect("valid")
            .expect("IPv4")
            .slice;
        assert_eq!(slice.endpoints.len(), 10);
        assert_eq!(slice.endpoints.capacity(), 10);
        assert_eq!(slice.ports.capacity(), 1);
        let svc = mk_service(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80}]},
        }));
        let svc = service("c", &svc).expect("valid");
        assert_eq!((svc.cluster_ips.capacity(), svc.ports.capacity()), (1, 1));
    }

    #[test]
    fn ip_families_and_policy_are_read_and_checked_as_the_api_server_does() {
        use IpFamily::{V4, V6};
        use IpFamilyPolicy::{PreferDualStack, RequireDualStack, SingleStack};
        type Case<'a> = (
            &'a str,
            serde_json::Value,
            Result<(&'a [IpFamily], Option<IpFamilyPolicy>), &'a [&'a str]>,
        );
        let cases: Vec<Case<'_>> = vec![
            ("nothing asked", json!({}), Ok((&[], None))),
            ("IPv6", json!({"ipFamilies": ["IPv6"]}), Ok((&[V6], None))),
            (
                "two families default to RequireDualStack",
                json!({"ipFamilies": ["IPv6", "IPv4"]}),
                Ok((&[V6, V4], Some(RequireDualStack))),
            ),
            (
                "PreferDualStack",
                json!({"ipFamilyPolicy": "PreferDualStack"}),
                Ok((&[], Some(PreferDualStack))),
            ),
            (
                "SingleStack",
                json!({"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv4"]}),
                Ok((&[V4], Some(SingleStack))),
            ),
            (
                "matching cluster IPs",
                json!({"clusterIPs": ["fd00::1", "10.96.0.1"], "ipFamilies": ["IPv6", "IPv4"]}),
                Ok((&[V6, V4], Some(RequireDualStack))),
            ),
            (
                "an unknown family",
                json!({"ipFamilies": ["IPv5"]}),
                Err(&["spec.ipFamilies[0]"]),
            ),
            (
                "a family twice",
                json!({"ipFamilies": ["IPv4", "IPv4"]}),
                Err(&["spec.ipFamilies[1]"]),
            ),
            (
                "three families",
                json!({"ipFamilies": ["IPv4", "IPv6", "IPv4"]}),
                Err(&["spec.ipFamilies"]),
            ),
            (
                "an unknown policy",
                json!({"ipFamilyPolicy": "Dual"}),
                Err(&["spec.ipFamilyPolicy"]),
            ),
            (
                "SingleStack with two families",
                json!({"ipFamilyPolicy": "SingleStack", "ipFamilies": ["IPv4", "IPv6"]}),
                Err(&["spec.ipFamilies"]),
            ),
            (
                "SingleStack with two cluster IPs",
                json!({"ipFamilyPolicy": "SingleStack", "clusterIPs": ["10.96.0.1", "fd00::1"]}),
                Err(&["spec.ipFamilyPolicy"]),
            ),
            (
                "a family unlike its cluster IP",
                json!({"clusterIP": "10.96.0.1", "ipFamilies": ["IPv6"]}),
                Err(&["spec.ipFamilies[0]"]),
            ),
        ];
        for (what, mut spec, want) in cases {
            spec["ports"] = json!([{"port": 80}]);
            let svc = mk_service(json!({"metadata": {"name": "web"}, "spec": spec}));
            match (service("default", &svc), want) {
                (Ok(s), Ok((families, policy))) => {
                    assert_eq!(s.requested_ip_families, families, "{what}");
                    assert_eq!(s.ip_family_policy, policy, "{what}");
                }
                (Err(e), Err(want)) => {
                    assert_eq!(fields(&e), want, "{what}: {e:?}");
                    assert!(
                        e.0.iter().all(|e| e.object == "Service default/web"),
                        "{what}"
                    );
                }
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn cluster_ip_service_with_defaults() {
        let svc = mk_service(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "clusterIP": "10.96.0.10",
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "web"},
                    {"name": "metrics", "port": 9090},
                ],
            },
        }));
        let s = service("default", &svc).expect("converts");
        assert_eq!(s.key, ServiceKey::new("default", "shop", "web"));
        assert_eq!(s.service_type, ServiceType::ClusterIp);
        assert!(!s.headless);
        assert_eq!(s.cluster_ips, [ip("10.96.0.10")]);
        assert_eq!(
            s.ports,
            [
                ServicePort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 80,
                    target_port: TargetPort::Name("web".into()),
                    node_port: None,
                },
                ServicePort {
                    name: "metrics".into(),
                    protocol: Protocol::Tcp,
                    port: 9090,
                    target_port: TargetPort::Number(9090),
                    node_port: None,
                },
            ]
        );
        assert_eq!(s.session_affinity_timeout, None);
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Cluster);
        assert_eq!(s.internal_traffic_policy, TrafficPolicy::Cluster);
        assert!(!s.publish_not_ready_addresses);
        s.validate().expect("valid");
    }

    #[test]
    fn missing_namespace_is_default_and_cluster_is_kept() {
        let svc = mk_service(json!({
            "metadata": {"name": "web"},
            "spec": {"ports": [{"port": 80, "targetPort": 0}]},
        }));
        let s = service("east", &svc).expect("converts");
        assert_eq!(s.key, ServiceKey::new("east", "default", "web"));
        assert!(s.cluster_ips.is_empty(), "left for allocation");
        assert_eq!(s.ports[0].target_port, TargetPort::Number(80));
        assert_eq!(
            s.validate().expect_err("unallocated").first().field,
            "spec.clusterIP"
        );
        validate_unallocated(&s).expect("valid apart from its cluster IP");
    }

    #[test]
    fn locality_annotations_convert_and_bad_ones_name_their_field() {
        let annotated = |a: serde_json::Value| {
            mk_service(json!({
                "metadata": {"name": "web", "namespace": "shop", "annotations": a},
                "spec": {"clusterIP": "10.96.0.9", "ports": [{"port": 80}]},
            }))
        };
        let s = service(
            "east",
            &annotated(json!({"switchyard.io/min-local-endpoints": "2",
                              "switchyard.io/cluster-preference": "west, north"})),
        )
        .expect("converts");
        assert_eq!(
            s.locality,
            Some(switchyard_model::Locality {
                min_local_endpoints: 2,
                preference: vec!["west".into(), "north".into()],
            })
        );
        let plain = service("east", &annotated(json!({"other": "x"}))).expect("converts");
        assert_eq!(plain.locality, None);
        let e = service(
            "east",
            &annotated(json!({"switchyard.io/min-local-endpoints": "two",
                              "switchyard.io/cluster-preference": "west,Not_A_Label"})),
        )
        .expect_err("invalid");
        assert_eq!(
            fields(&e),
            [
                "metadata.annotations[switchyard.io/min-local-endpoints]",
                "metadata.annotations[switchyard.io/cluster-preference]",
            ]
        );
    }

    #[test]
    fn full_load_balancer_service() {
        let svc = mk_service(json!({
            "metadata": {"name": "lb", "namespace": "edge"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIPs": ["10.96.1.1", "fd00:96::1"],
                "ports": [{"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353, "nodePort": 30053}],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
                "externalIPs": ["192.0.2.10"],
                "loadBalancerSourceRanges": ["203.0.113.0/24", " 2001:db8::/32 "],
                "externalTrafficPolicy": "Local",
                "internalTrafficPolicy": "Local",
                "healthCheckNodePort": 31000,
                "publishNotReadyAddresses": true,
                "trafficDistribution": "PreferClose",
            },
            "status": {"loadBalancer": {"ingress": [
                {"ip": "198.51.100.7", "ipMode": "VIP"},
                {"hostname": "lb.example.com"},
                {"ip": "198.51.100.8", "ipMode": "Proxy"},
            ]}},
        }));
        let s = service("default", &svc).expect("converts");
        assert_eq!(s.service_type, ServiceType::LoadBalancer);
        assert_eq!(s.cluster_ips, [ip("10.96.1.1"), ip("fd00:96::1")]);
        assert_eq!(s.ports[0].protocol, Protocol::Udp);
        assert_eq!(s.ports[0].target_port, TargetPort::Number(5353));
        assert_eq!(s.ports[0].node_port, Some(30053));
        assert_eq!(s.session_affinity_timeout, Some(600));
        assert_eq!(s.external_ips, [ip("192.0.2.10")]);
        assert_eq!(s.load_balancer_ips, [ip("198.51.100.7")]);
        assert_eq!(
            s.load_balancer_source_ranges,
            [
                "203.0.113.0/24".parse::<IpNet>().expect("net"),
                "2001:db8::/32".parse().expect("net")
            ]
        );
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(s.internal_traffic_policy, TrafficPolicy::Local);
        assert_eq!(s.health_check_node_port, Some(31000));
        assert!(s.publish_not_ready_addresses);
        assert_eq!(s.traffic_distribution.as_deref(), Some("PreferClose"));
        assert_eq!(s.not_proxied_by, None);
        s.validate().expect("valid");
    }

    #[test]
    fn proxy_labels_mark_the_service_as_not_proxied() {
        for label in NOT_PROXIED_LABELS {
            let svc = mk_service(json!({
                "metadata": {"name": "web", "labels": {label: "", "app": "web"}},
                "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
            }));
            let s = service("default", &svc).expect("converts");
            assert_eq!(s.not_proxied_by.as_deref(), Some(label));
            assert!(!s.is_proxied());
        }
        let svc = mk_service(json!({
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}]},
        }));
        assert!(service("default", &svc).expect("converts").is_proxied());
    }

    #[test]
    fn client_ip_affinity_defaults_to_three_hours() {
        let svc = mk_service(json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "10.96.0.1", "ports": [{"port": 80}], "sessionAffinity": "ClientIP"},
        }));
        let s = service("default", &svc).expect("converts");
        assert_eq!(s.session_affinity_timeout, Some(10_800));
    }

    #[test]
    fn legacy_global_policy_is_cluster() {
        let svc = mk_service(json!({
            "metadata": {"name": "np"},
            "spec": {"type": "NodePort", "externalTrafficPolicy": "Global", "ports": [{"port": 80, "nodePort": 30080}]},
        }));
        let s = service("default", &svc).expect("converts");
        assert_eq!(s.service_type, ServiceType::NodePort);
        assert_eq!(s.external_traffic_policy, TrafficPolicy::Cluster);
    }

    #[test]
    fn headless_and_external_name() {
        let svc = mk_service(json!({
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 5432}]},
        }));
        let s = service("default", &svc).expect("converts");
        assert!(s.headless);
        assert!(s.cluster_ips.is_empty());
        assert!(!s.wants_cluster_ip());
        s.validate().expect("valid headless");

        let svc = mk_service(json!({
            "metadata": {"name": "ext", "namespace": "shop"},
            "spec": {"type": "ExternalName", "externalName": "db.example.com"},
        }));
        let s = service("default", &svc).expect("converts");
        assert_eq!(s.service_type, ServiceType::ExternalName);
        assert_eq!(s.external_name.as_deref(), Some("db.example.com"));
        s.validate().expect("valid ExternalName");
    }

    #[test]
    fn conversion_errors_name_object_and_field() {
        let svc = mk_service(json!({
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {
                "type": "Magic",
                "clusterIPs": ["10.96.0.1", "not-an-ip"],
                "ports": [
                    {"name": "a", "port": 70000},
                    {"name": "b", "port": 80, "protocol": "QUIC", "targetPort": -1},
                    {"name": "c", "port": 81, "nodePort": 99999},
                ],
                "sessionAffinity": "Sticky",
                "externalIPs": ["1.2.3"],
                "loadBalancerSourceRanges": ["10.0.0.0/33"],
                "externalTrafficPolicy": "Nearby",
                "internalTrafficPolicy": "Global",
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "x"}]}},
        }));
        let e = service("default", &svc).expect_err("invalid");
        assert_eq!(
            fields(&e),
            [
                "spec.type",
                "spec.clusterIPs[1]",
                "spec.ports[0].port",
                "spec.ports[1].protocol",
                "spec.ports[1].targetPort",
                "spec.ports[2].nodePort",
                "spec.sessionAffinity",
                "spec.externalIPs[0]",
                "status.loadBalancer.ingress[0].ip",
                "spec.loadBalancerSourceRanges[0]",
                "spec.externalTrafficPolicy",
                "spec.internalTrafficPolicy",
            ]
        );
        assert!(e.0.iter().all(|e| e.object == "Service shop/bad"));
    }

    #[test]
    fn single_cluster_ip_errors_name_cluster_ip() {
        let svc = mk_service(json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "10.96.0.300", "ports": [{"port": 80}]},
        }));
        let e = service("east", &svc).expect_err("invalid");
        assert_eq!(fields(&e), ["spec.clusterIP"]);
        assert_eq!(e.first().object, "Service east/default/web");

        let svc = mk_service(json!({
            "metadata": {"name": "web"},
            "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.2"], "ports": [{"port": 80}]},
        }));
        let e = service("default", &svc).expect_err("mismatch");
        assert_eq!(fields(&e), ["spec.clusterIPs[0]"]);

        let svc = mk_service(json!({
            "metadata": {"name": "web"},
            "spec": {"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": -5}}},
        }));
        let e = service("default", &svc).expect_err("negative timeout");
        assert_eq!(
            fields(&e),
            ["spec.sessionAffinityConfig.clientIP.timeoutSeconds"]
        );
    }

    #[test]
    fn external_name_with_cluster_ip_is_rejected() {
        let svc = mk_service(json!({
            "metadata": {"name": "ext"},
            "spec": {"type": "ExternalName", "externalName": "a.example", "clusterIP": "10.96.0.5"},
        }));
        let e = service("default", &svc).expect_err("invalid");
        assert_eq!(fields(&e), ["spec.clusterIP"]);
    }

    #[test]
    fn validate_unallocated_keeps_other_errors() {
        let svc = mk_service(json!({
            "metadata": {"name": "web"},
            "spec": {"ports": [{"port": 80}, {"port": 81}]},
        }));
        let s = service("default", &svc).expect("converts");
        let e = validate_unallocated(&s).expect_err("unnamed ports");
        assert_eq!(fields(&e), ["spec.ports[0].name", "spec.ports[1].name"]);
    }

    fn web_slice() -> serde_json::Value {
        json!({
            "metadata": {
                "name": "web-abc12",
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": ["10.244.1.5"],
                    "hostname": "web-0",
                    "nodeName": "node-a",
                    "zone": "zone-1",
                    "hints": {"forZones": [{"name": "zone-1"}], "forNodes": [{"name": "node-a"}]},
                },
                {"addresses": ["10.244.2.7"], "conditions": {"ready": false}},
                {"addresses": ["10.244.2.8"], "conditions": {"ready": false, "serving": true, "terminating": true}},
            ],
            "ports": [
                {"name": "http", "port": 8080},
                {"name": "dns", "protocol": "UDP", "port": 53},
                {"name": "all"},
            ],
        })
    }

    #[test]
    fn the_kube_dns_configmap_gives_stub_domains_and_upstreams() {
        let cm: core::ConfigMap = serde_json::from_value(json!({
            "metadata": {"namespace": "kube-system", "name": "kube-dns"},
            "data": {
                "stubDomains": "{\"acme.local.\": [\"1.2.3.4\"], \"corp.example\": [\"10.0.0.1:5353\", \"10.0.0.2\"], \"bad zone\": [\"1.1.1.1\"], \"x.example\": [\"nope\"]}",
                "upstreamNameservers": "[\"8.8.8.8\", \"[2001:db8::1]:53\"]",
            },
        }))
        .expect("a ConfigMap");
        let (dns, problems) = cluster_dns(&cm);
        assert_eq!(
            dns.stub_domains.keys().collect::<Vec<_>>(),
            ["acme.local", "corp.example"]
        );
        assert_eq!(
            dns.stub_domains["corp.example"],
            ["10.0.0.1:5353", "10.0.0.2"]
        );
        assert_eq!(dns.upstream_nameservers, ["8.8.8.8", "[2001:db8::1]:53"]);
        let fields: Vec<&str> = problems.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            fields,
            [
                "data.stubDomains[\"bad zone\"]",
                "data.stubDomains[\"x.example\"]"
            ]
        );
        let broken: core::ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "kube-dns"},
            "data": {"stubDomains": "{not json", "upstreamNameservers": "\"8.8.8.8\""},
        }))
        .expect("a ConfigMap");
        let (dns, problems) = cluster_dns(&broken);
        assert_eq!(dns, crate::source::ClusterDns::default());
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn a_pod_target_ref_names_the_endpoints_pod() {
        let mut v = web_slice();
        v["endpoints"][0]["targetRef"] =
            json!({"kind": "Pod", "name": "web-7f9c", "namespace": "shop"});
        v["endpoints"][1]["targetRef"] = json!({"kind": "Node", "name": "node-b"});
        let s = endpoint_slice("default", &mk_slice(v))
            .expect("valid")
            .expect("not FQDN");
        assert_eq!(s.slice.endpoints[0].pod_name.as_deref(), Some("web-7f9c"));
        assert_eq!(s.slice.endpoints[1].pod_name, None, "not a Pod");
    }

    #[test]
    fn the_trigger_time_annotation_is_carried() {
        let mut v = web_slice();
        v["metadata"]["annotations"] = json!({TRIGGER_TIME_ANNOTATION: "2024-05-01T10:00:00.25Z"});
        let s = endpoint_slice("default", &mk_slice(v.clone()))
            .expect("valid")
            .expect("not FQDN");
        assert_eq!(
            s.slice.trigger_time_unix_nanos,
            Some(1_714_557_600_250_000_000)
        );
        // Unparsable or absent: none, as kube-proxy treats it.
        v["metadata"]["annotations"] = json!({TRIGGER_TIME_ANNOTATION: "yesterday"});
        let s = endpoint_slice("default", &mk_slice(v))
            .expect("valid")
            .expect("slice");
        assert_eq!(s.slice.trigger_time_unix_nanos, None);
        let s = endpoint_slice("default", &mk_slice(web_slice()))
            .expect("valid")
            .expect("slice");
        assert_eq!(s.slice.trigger_time_unix_nanos, None);
    }

    #[test]
    fn slice_with_defaults() {
        let s = endpoint_slice("default", &mk_slice(web_slice()))
            .expect("valid")
            .expect("not FQDN");
        assert_eq!(s.service, ServiceKey::new("default", "shop", "web"));
        assert_eq!(s.slice.name, "web-abc12");
        assert_eq!(s.slice.address_type, AddressType::IPv4);
        let e = &s.slice.endpoints;
        assert_eq!(&*e[0].addresses, [ip("10.244.1.5")]);
        assert_eq!(e[0].conditions, EndpointConditions::default());
        assert_eq!(e[0].hostname(), Some("web-0"));
        assert_eq!(e[0].node_name.as_deref(), Some("node-a"));
        assert_eq!(e[0].zone.as_deref(), Some("zone-1"));
        assert_eq!(e[0].hint_zones(), [std::sync::Arc::from("zone-1")]);
        assert_eq!(e[0].hint_nodes(), [std::sync::Arc::from("node-a")]);
        assert_eq!(
            e[1].conditions,
            EndpointConditions {
                ready: false,
                serving: false,
                terminating: false
            },
            "serving follows ready when unset"
        );
        assert_eq!(
            e[2].conditions,
            EndpointConditions {
                ready: false,
                serving: true,
                terminating: true
            }
        );
        assert_eq!(
            s.slice.ports,
            [
                EndpointPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8080
                },
                EndpointPort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53
                },
            ],
            "a port without a number is dropped"
        );
    }

    #[test]
    fn ipv6_slice_and_unnamed_port() {
        let s = endpoint_slice(
            "default",
            &mk_slice(json!({
                "metadata": {"name": "web-v6", "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv6",
                "endpoints": [{"addresses": ["fd00:244::5"]}],
                "ports": [{"port": 8080}],
            })),
        )
        .expect("valid")
        .expect("not FQDN");
        assert_eq!(s.service, ServiceKey::new("default", "default", "web"));
        assert_eq!(s.slice.address_type, AddressType::IPv6);
        assert_eq!(s.slice.port_for("", Protocol::Tcp), Some(8080));
    }

    #[test]
    fn fqdn_slice_is_ignored() {
        let got = endpoint_slice(
            "default",
            &mk_slice(json!({
                "metadata": {"name": "ext-1", "labels": {"kubernetes.io/service-name": "ext"}},
                "addressType": "FQDN",
                "endpoints": [{"addresses": ["db.example.com"]}],
            })),
        )
        .expect("not an error");
        assert_eq!(got, None);
    }

    #[test]
    fn slice_errors_name_object_and_field() {
        let mut v = web_slice();
        v["metadata"]["labels"] = json!({});
        v["endpoints"][1]["addresses"] = json!(["10.244.2.300"]);
        v["ports"][0]["protocol"] = json!("ICMP");
        v["ports"][1]["port"] = json!(0);
        let e = endpoint_slice("default", &mk_slice(v)).expect_err("invalid");
        assert_eq!(
            fields(&e),
            [
                "metadata.labels",
                "endpoints[1].addresses[0]",
                "ports[0].protocol",
                "ports[1].port"
            ]
        );
        assert!(
            e.0.iter()
                .all(|e| e.object == "EndpointSlice shop/web-abc12")
        );

        let mut v = web_slice();
        v["addressType"] = json!("IPX");
        let e = endpoint_slice("default", &mk_slice(v)).expect_err("invalid");
        assert_eq!(fields(&e), ["addressType"]);
    }

    #[test]
    fn slice_is_validated_after_conversion() {
        let mut v = web_slice();
        v["endpoints"][0]["addresses"] = json!(["fd00::1"]);
        let e = endpoint_slice("c2", &mk_slice(v)).expect_err("family mismatch");
        assert_eq!(fields(&e), ["endpoints[0].addresses[0]"]);
        assert_eq!(e.first().object, "EndpointSlice c2/shop/web-abc12");
    }
}
