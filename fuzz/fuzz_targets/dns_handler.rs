//! Fuzzes the DNS request handler: any bytes, over UDP and TCP, from an
//! allowed and a refused source. It must never panic, and every answer
//! must be at least a header carrying the query's id.
//!
//! `cargo +nightly fuzz run dns_handler` (from the repository root).

#![no_main]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use switchyard_agent::dns::{Acl, DnsIndex, Transport, handle_bytes, zone_name};
use switchyard_agent::state::{AgentState, HeldResource};
use switchyard_model::{
    AddressType, Endpoint, EndpointSlice, Service, ServiceKey, ServiceState, ServiceType,
};

fn index() -> &'static DnsIndex {
    static INDEX: OnceLock<DnsIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let web = ServiceState::new(Service {
            cluster_ips: vec!["10.96.0.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            ..Service::new(ServiceKey::new("default", "shop", "web"))
        });
        let mut db = ServiceState::new(Service {
            headless: true,
            ..Service::new(ServiceKey::new("default", "shop", "db"))
        });
        db.slices.push(EndpointSlice {
            name: "db-1".into(),
            address_type: AddressType::IPv4,
            endpoints: (0..50)
                .map(|i| Endpoint {
                    addresses: vec![IpAddr::from([10, 1, 0, i])],
                    ..Endpoint::default()
                })
                .collect(),
            ports: Vec::new(),
            cluster: None,
        });
        let pay = ServiceState::new(Service {
            service_type: ServiceType::ExternalName,
            external_name: Some("pay.example.com".into()),
            ..Service::new(ServiceKey::new("default", "shop", "pay"))
        });
        let resources: BTreeMap<String, HeldResource> = [web, db, pay]
            .into_iter()
            .map(|s| {
                let held = HeldResource {
                    version: "f".into(),
                    state: Arc::new(s),
                };
                (held.state.service.key.to_string(), held)
            })
            .collect();
        let state = Arc::new(AgentState {
            version: "fuzz".into(),
            resources,
        });
        DnsIndex::build(state, &zone_name("cluster.local").unwrap(), 5)
    })
}

fuzz_target!(|data: &[u8]| {
    let acl = Acl::new(vec!["127.0.0.0/8".parse().unwrap()]);
    for (src, transport) in [
        ("127.0.0.1", Transport::Udp),
        ("127.0.0.1", Transport::Tcp),
        ("192.0.2.1", Transport::Udp),
    ] {
        if let Some(out) = handle_bytes(index(), &acl, data, src.parse().unwrap(), transport) {
            assert!(out.len() >= 12);
            assert_eq!(out[..2], data[..2]);
            if transport == Transport::Udp {
                assert!(out.len() <= 1232);
            }
        }
    }
});
