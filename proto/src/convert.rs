//! Conversion between the domain model and the wire types.
//!
//! Encoding cannot fail. Decoding parses addresses and enums and then runs
//! the model's validation, so an agent never applies data that a control
//! plane of another version (or a bug) got wrong; errors name the resource
//! and the field.

use std::net::IpAddr;

use ipnet::IpNet;
use switchyard_model as m;

use crate::v1;

/// A resource that could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A field is malformed (bad address, unknown enum value, out-of-range port).
    #[error("resource {resource}: {field}: {message}")]
    Field {
        /// The resource name.
        resource: String,
        /// The field path.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The decoded Service or slice breaks a model rule.
    #[error("resource {resource}: {source}")]
    Invalid {
        /// The resource name.
        resource: String,
        /// The validation errors.
        source: m::ValidationErrors,
    },
}

/// Encodes one Service with its slices.
pub fn encode_state(state: &m::ServiceState) -> v1::ServiceState {
    v1::ServiceState {
        service: Some(encode_service(&state.service)),
        endpoint_slices: state.slices.iter().map(encode_slice).collect(),
    }
}

fn encode_service(s: &m::Service) -> v1::Service {
    v1::Service {
        cluster: s.key.cluster.clone(),
        namespace: s.key.namespace.clone(),
        name: s.key.name.clone(),
        r#type: match s.service_type {
            m::ServiceType::ClusterIp => v1::ServiceType::ClusterIp,
            m::ServiceType::NodePort => v1::ServiceType::NodePort,
            m::ServiceType::LoadBalancer => v1::ServiceType::LoadBalancer,
            m::ServiceType::ExternalName => v1::ServiceType::ExternalName,
        } as i32,
        headless: s.headless,
        cluster_ips: strings(&s.cluster_ips),
        ports: s.ports.iter().map(encode_port).collect(),
        session_affinity_timeout_seconds: s.session_affinity_timeout,
        external_ips: strings(&s.external_ips),
        load_balancer_ips: strings(&s.load_balancer_ips),
        load_balancer_source_ranges: strings(&s.load_balancer_source_ranges),
        external_traffic_policy: encode_policy(s.external_traffic_policy),
        internal_traffic_policy: encode_policy(s.internal_traffic_policy),
        health_check_node_port: s.health_check_node_port.map_or(0, u32::from),
        publish_not_ready_addresses: s.publish_not_ready_addresses,
        external_name: s.external_name.clone().unwrap_or_default(),
        traffic_distribution: s.traffic_distribution.clone().unwrap_or_default(),
        not_proxied_by: s.not_proxied_by.clone().unwrap_or_default(),
        export: s.export.map(|e| v1::ServiceExport {
            created_unix_seconds: e.created_unix,
        }),
        locality: s.locality.as_ref().map(|l| v1::Locality {
            min_local_endpoints: l.min_local_endpoints,
            preference: l.preference.clone(),
        }),
    }
}

fn encode_port(p: &m::ServicePort) -> v1::ServicePort {
    v1::ServicePort {
        name: p.name.clone(),
        protocol: encode_protocol(p.protocol),
        port: u32::from(p.port),
        target_port: Some(match &p.target_port {
            m::TargetPort::Number(n) => {
                v1::service_port::TargetPort::TargetPortNumber(u32::from(*n))
            }
            m::TargetPort::Name(n) => v1::service_port::TargetPort::TargetPortName(n.clone()),
        }),
        node_port: p.node_port.map_or(0, u32::from),
    }
}

fn encode_slice(s: &m::EndpointSlice) -> v1::EndpointSlice {
    v1::EndpointSlice {
        name: s.name.clone(),
        cluster: s.cluster.clone().unwrap_or_default(),
        address_type: match s.address_type {
            m::AddressType::IPv4 => v1::AddressType::Ipv4,
            m::AddressType::IPv6 => v1::AddressType::Ipv6,
        } as i32,
        endpoints: s
            .endpoints
            .iter()
            .map(|e| v1::Endpoint {
                addresses: strings(&e.addresses),
                ready: e.conditions.ready,
                serving: e.conditions.serving,
                terminating: e.conditions.terminating,
                hostname: e.hostname().unwrap_or_default().to_owned(),
                target_pod: e.pod_name.as_deref().unwrap_or_default().to_owned(),
                node_name: e.node_name.as_deref().unwrap_or_default().to_owned(),
                zone: e.zone.as_deref().unwrap_or_default().to_owned(),
                hint_zones: strings(e.hint_zones()),
                hint_nodes: strings(e.hint_nodes()),
            })
            .collect(),
        ports: s
            .ports
            .iter()
            .map(|p| v1::EndpointPort {
                name: p.name.clone(),
                protocol: encode_protocol(p.protocol),
                port: u32::from(p.port),
            })
            .collect(),
        trigger_time_unix_nanos: s.trigger_time_unix_nanos.unwrap_or(0),
    }
}

fn encode_protocol(p: m::Protocol) -> i32 {
    let v = match p {
        m::Protocol::Tcp => v1::Protocol::Tcp,
        m::Protocol::Udp => v1::Protocol::Udp,
        m::Protocol::Sctp => v1::Protocol::Sctp,
    };
    v as i32
}

fn encode_policy(p: m::TrafficPolicy) -> i32 {
    let v = match p {
        m::TrafficPolicy::Cluster => v1::TrafficPolicy::Cluster,
        m::TrafficPolicy::Local => v1::TrafficPolicy::Local,
    };
    v as i32
}

fn strings<T: ToString>(items: &[T]) -> Vec<String> {
    items.iter().map(ToString::to_string).collect()
}

/// Encodes one Service with its slices as a resource payload.
pub fn encode_state_bytes(state: &m::ServiceState) -> bytes::Bytes {
    bytes::Bytes::from(prost::Message::encode_to_vec(&encode_state(state)))
}

/// Decodes and validates a resource payload (`Resource.service_state`).
pub fn decode_state_bytes(resource: &str, payload: &[u8]) -> Result<m::ServiceState, DecodeError> {
    let wire =
        <v1::ServiceState as prost::Message>::decode(payload).map_err(|e| DecodeError::Field {
            resource: resource.to_owned(),
            field: "service_state".into(),
            message: format!("undecodable: {e}"),
        })?;
    decode_state(resource, &wire)
}

/// Decodes and validates one resource. `resource` is its name, used in errors.
pub fn decode_state(
    resource: &str,
    state: &v1::ServiceState,
) -> Result<m::ServiceState, DecodeError> {
    let d = Decoder { resource };
    let service = state
        .service
        .as_ref()
        .ok_or_else(|| d.err("service", "missing"))?;
    let mut out = m::ServiceState {
        service: d.service(service)?,
        slices: state
            .endpoint_slices
            .iter()
            .enumerate()
            .map(|(i, s)| d.slice(i, s))
            .collect::<Result<_, _>>()?,
    };
    out.normalize();
    out.shrink_to_fit();
    out.validate().map_err(|source| DecodeError::Invalid {
        resource: resource.to_owned(),
        source,
    })?;
    Ok(out)
}

struct Decoder<'a> {
    resource: &'a str,
}

impl Decoder<'_> {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> DecodeError {
        DecodeError::Field {
            resource: self.resource.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }

    fn service(&self, s: &v1::Service) -> Result<m::Service, DecodeError> {
        let service_type = match v1::ServiceType::try_from(s.r#type) {
            Ok(v1::ServiceType::ClusterIp) => m::ServiceType::ClusterIp,
            Ok(v1::ServiceType::NodePort) => m::ServiceType::NodePort,
            Ok(v1::ServiceType::LoadBalancer) => m::ServiceType::LoadBalancer,
            Ok(v1::ServiceType::ExternalName) => m::ServiceType::ExternalName,
            _ => return Err(self.err("service.type", format!("unknown value {}", s.r#type))),
        };
        Ok(m::Service {
            key: m::ServiceKey::new(&s.cluster, &s.namespace, &s.name),
            service_type,
            headless: s.headless,
            cluster_ips: self.ips(|| "service.cluster_ips".into(), &s.cluster_ips)?,
            ports: s
                .ports
                .iter()
                .enumerate()
                .map(|(i, p)| self.port(i, p))
                .collect::<Result<_, _>>()?,
            session_affinity_timeout: s.session_affinity_timeout_seconds,
            external_ips: self.ips(|| "service.external_ips".into(), &s.external_ips)?,
            load_balancer_ips: self
                .ips(|| "service.load_balancer_ips".into(), &s.load_balancer_ips)?,
            load_balancer_source_ranges: s
                .load_balancer_source_ranges
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    c.parse::<IpNet>().map_err(|e| {
                        self.err(
                            format!("service.load_balancer_source_ranges[{i}]"),
                            format!("{c:?}: {e}"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            external_traffic_policy: self
                .policy("service.external_traffic_policy", s.external_traffic_policy)?,
            internal_traffic_policy: self
                .policy("service.internal_traffic_policy", s.internal_traffic_policy)?,
            health_check_node_port: self
                .opt_port("service.health_check_node_port", s.health_check_node_port)?,
            publish_not_ready_addresses: s.publish_not_ready_addresses,
            external_name: non_empty(&s.external_name),
            traffic_distribution: non_empty(&s.traffic_distribution),
            not_proxied_by: non_empty(&s.not_proxied_by),
            export: s.export.map(|e| m::ServiceExport {
                created_unix: e.created_unix_seconds,
            }),
            locality: s.locality.as_ref().map(|l| m::Locality {
                min_local_endpoints: l.min_local_endpoints,
                preference: l.preference.clone(),
            }),
            // Requests the control plane turned into `cluster_ips`: not sent.
            requested_ip_families: Vec::new(),
            ip_family_policy: None,
        })
    }

    fn port(&self, i: usize, p: &v1::ServicePort) -> Result<m::ServicePort, DecodeError> {
        let at = format!("service.ports[{i}]");
        let target_port = match &p.target_port {
            Some(v1::service_port::TargetPort::TargetPortNumber(n)) => {
                m::TargetPort::Number(self.port_number(&format!("{at}.target_port"), *n)?)
            }
            Some(v1::service_port::TargetPort::TargetPortName(n)) => m::TargetPort::Name(n.clone()),
            None => return Err(self.err(format!("{at}.target_port"), "missing")),
        };
        Ok(m::ServicePort {
            name: p.name.clone(),
            protocol: self.protocol(&format!("{at}.protocol"), p.protocol)?,
            port: self.port_number(&format!("{at}.port"), p.port)?,
            target_port,
            node_port: self.opt_port(&format!("{at}.node_port"), p.node_port)?,
        })
    }

    fn slice(&self, i: usize, s: &v1::EndpointSlice) -> Result<m::EndpointSlice, DecodeError> {
        let at = format!("endpoint_slices[{i}]");
        let address_type = match v1::AddressType::try_from(s.address_type) {
            Ok(v1::AddressType::Ipv4) => m::AddressType::IPv4,
            Ok(v1::AddressType::Ipv6) => m::AddressType::IPv6,
            _ => {
                return Err(self.err(
                    format!("{at}.address_type"),
                    format!("unknown value {}", s.address_type),
                ));
            }
        };
        let endpoints = s
            .endpoints
            .iter()
            .enumerate()
            .map(|(j, e)| {
                let mut endpoint = m::Endpoint {
                    addresses: self
                        .ips(|| format!("{at}.endpoints[{j}].addresses"), &e.addresses)?,
                    conditions: m::EndpointConditions {
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                    },
                    pod_name: non_empty(&e.target_pod).map(Into::into),
                    node_name: (!e.node_name.is_empty()).then(|| m::shared_name(&e.node_name)),
                    zone: (!e.zone.is_empty()).then(|| m::shared_name(&e.zone)),
                    extra: None,
                };
                endpoint.set_hostname(non_empty(&e.hostname).map(Into::into));
                endpoint.set_hints(
                    e.hint_zones.iter().map(|z| m::shared_name(z)).collect(),
                    e.hint_nodes.iter().map(|n| m::shared_name(n)).collect(),
                );
                Ok(endpoint)
            })
            .collect::<Result<_, DecodeError>>()?;
        let ports = s
            .ports
            .iter()
            .enumerate()
            .map(|(j, p)| {
                Ok(m::EndpointPort {
                    name: p.name.clone(),
                    protocol: self.protocol(&format!("{at}.ports[{j}].protocol"), p.protocol)?,
                    port: self.port_number(&format!("{at}.ports[{j}].port"), p.port)?,
                })
            })
            .collect::<Result<_, DecodeError>>()?;
        Ok(m::EndpointSlice {
            name: s.name.clone(),
            address_type,
            endpoints,
            ports,
            cluster: non_empty(&s.cluster),
            trigger_time_unix_nanos: (s.trigger_time_unix_nanos > 0)
                .then_some(s.trigger_time_unix_nanos),
        })
    }

    /// The addresses of `items`, parsed, collected into a `Vec` (which the
    /// state's `shrink_to_fit` trims) or an endpoint's inline
    /// [`m::Addresses`]; `field` names them in an error (made only then: a
    /// full state decodes a million endpoints).
    fn ips<C: FromIterator<IpAddr>>(
        &self,
        field: impl Fn() -> String,
        items: &[String],
    ) -> Result<C, DecodeError> {
        items
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.parse().map_err(|_| {
                    self.err(
                        format!("{}[{i}]", field()),
                        format!("{s:?} is not an IP address"),
                    )
                })
            })
            .collect()
    }

    fn port_number(&self, field: &str, n: u32) -> Result<u16, DecodeError> {
        u16::try_from(n)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| self.err(field, format!("{n} is not between 1 and 65535")))
    }

    fn opt_port(&self, field: &str, n: u32) -> Result<Option<u16>, DecodeError> {
        if n == 0 {
            Ok(None)
        } else {
            self.port_number(field, n).map(Some)
        }
    }

    fn protocol(&self, field: &str, p: i32) -> Result<m::Protocol, DecodeError> {
        match v1::Protocol::try_from(p) {
            Ok(v1::Protocol::Tcp) => Ok(m::Protocol::Tcp),
            Ok(v1::Protocol::Udp) => Ok(m::Protocol::Udp),
            Ok(v1::Protocol::Sctp) => Ok(m::Protocol::Sctp),
            _ => Err(self.err(field, format!("unknown value {p}"))),
        }
    }

    fn policy(&self, field: &str, p: i32) -> Result<m::TrafficPolicy, DecodeError> {
        match v1::TrafficPolicy::try_from(p) {
            Ok(v1::TrafficPolicy::Cluster) => Ok(m::TrafficPolicy::Cluster),
            Ok(v1::TrafficPolicy::Local) => Ok(m::TrafficPolicy::Local),
            _ => Err(self.err(field, format!("unknown value {p}"))),
        }
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_state() -> m::ServiceState {
        let key = m::ServiceKey::new("east", "shop", "web");
        m::ServiceState {
            service: m::Service {
                service_type: m::ServiceType::LoadBalancer,
                cluster_ips: vec![
                    "10.96.0.10".parse().expect("ip"),
                    "fd00::10".parse().expect("ip"),
                ],
                ports: vec![
                    m::ServicePort {
                        name: "http".into(),
                        protocol: m::Protocol::Tcp,
                        port: 80,
                        target_port: m::TargetPort::Name("web".into()),
                        node_port: Some(30080),
                    },
                    m::ServicePort {
                        name: "dns".into(),
                        protocol: m::Protocol::Udp,
                        port: 53,
                        target_port: m::TargetPort::Number(5353),
                        node_port: Some(30053),
                    },
                ],
                session_affinity_timeout: Some(600),
                external_ips: vec!["192.0.2.7".parse().expect("ip")],
                load_balancer_ips: vec!["198.51.100.1".parse().expect("ip")],
                load_balancer_source_ranges: vec!["203.0.113.0/24".parse().expect("cidr")],
                external_traffic_policy: m::TrafficPolicy::Local,
                internal_traffic_policy: m::TrafficPolicy::Local,
                health_check_node_port: Some(32000),
                publish_not_ready_addresses: true,
                traffic_distribution: Some("PreferClose".into()),
                not_proxied_by: Some("service.kubernetes.io/service-proxy-name".into()),
                ..m::Service::new(key)
            },
            slices: vec![m::EndpointSlice {
                name: "web-1".into(),
                address_type: m::AddressType::IPv4,
                endpoints: vec![
                    {
                        let mut e = m::Endpoint {
                            addresses: vec!["10.244.0.5".parse().expect("ip")].into(),
                            conditions: m::EndpointConditions {
                                ready: false,
                                serving: true,
                                terminating: true,
                            },
                            pod_name: Some("web-0".into()),
                            node_name: Some("n1".into()),
                            zone: Some("z1".into()),
                            extra: None,
                        }
                        .with_hostname("web-0");
                        e.set_hints(["z1".into()].into(), ["n1".into()].into());
                        e
                    },
                    m::Endpoint {
                        addresses: vec!["10.244.0.6".parse().expect("ip")].into(),
                        ..m::Endpoint::default()
                    },
                ],
                ports: vec![m::EndpointPort {
                    name: "http".into(),
                    protocol: m::Protocol::Tcp,
                    port: 8080,
                }],
                cluster: None,
                trigger_time_unix_nanos: Some(1_700_000_000_123_456_789),
            }],
        }
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let state = full_state();
        let wire = encode_state(&state);
        let back = decode_state("east/shop/web", &wire).expect("decodes");
        assert_eq!(back, state);
        assert!(back.slices[0].endpoints[0].extra.is_some());
        assert_eq!(
            back.slices[0].endpoints[1].extra, None,
            "nothing boxed for nothing"
        );
        // Decoded by collecting: no room kept beyond what is held.
        let s = &back.slices[0];
        assert_eq!(s.endpoints.capacity(), s.endpoints.len());
        assert_eq!(back.service.ports.capacity(), back.service.ports.len());
    }

    #[test]
    fn payload_round_trip_and_garbage() {
        let state = full_state();
        let bytes = encode_state_bytes(&state);
        assert_eq!(
            decode_state_bytes("east/shop/web", &bytes).expect("decodes"),
            state
        );
        let err = decode_state_bytes("east/shop/web", b"\xff\xff").expect_err("garbage");
        assert!(
            err.to_string()
                .starts_with("resource east/shop/web: service_state: undecodable"),
            "{err}"
        );
    }

    #[test]
    fn bad_address_names_resource_and_field() {
        let mut wire = encode_state(&full_state());
        wire.endpoint_slices[0].endpoints[0].addresses[0] = "not-an-ip".into();
        let err = decode_state("east/shop/web", &wire)
            .expect_err("bad ip")
            .to_string();
        assert_eq!(
            err,
            "resource east/shop/web: endpoint_slices[0].endpoints[0].addresses[0]: \"not-an-ip\" is not an IP address"
        );
    }

    #[test]
    fn model_rules_apply_after_decoding() {
        let mut wire = encode_state(&full_state());
        wire.service.as_mut().expect("service").ports[1].name = "http".into();
        let err = decode_state("east/shop/web", &wire)
            .expect_err("dup name")
            .to_string();
        assert!(
            err.contains("spec.ports[1].name: duplicates spec.ports[0].name"),
            "{err}"
        );
    }
}
