//! The handler fed with messages, no sockets (as hickory-dns's own catalog tests do).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use rand::{Rng, SeedableRng};
use switchyard_model::{
    AddressType, Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Protocol, Service,
    ServiceKey, ServicePort, ServiceState, ServiceType, TargetPort,
};

use hickory_server::net::xfer::Protocol as NetProtocol;
use hickory_server::server::Request;

use super::handler::{Answer, Decision, decide};
use super::index::Lookup;
use super::response::{Transport, handle_bytes};
use super::{Acl, DnsIndex};
use crate::state::{AgentState, HeldResource};

const LOCAL: &str = "127.0.0.1";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn port(name: &str, p: u16) -> ServicePort {
    ServicePort {
        name: name.into(),
        protocol: Protocol::Tcp,
        port: p,
        target_port: TargetPort::Number(8080),
        node_port: None,
    }
}

fn mk_service(ns: &str, name: &str, ips: &[&str]) -> ServiceState {
    ServiceState::new(Service {
        cluster_ips: ips.iter().map(|s| ip(s)).collect(),
        ports: vec![port("http", 80), port("metrics", 9090)],
        ..Service::new(ServiceKey::new("default", ns, name))
    })
}

fn endpoint(addr: &str, hostname: Option<&str>, ready: bool) -> Endpoint {
    let mut e = Endpoint {
        addresses: vec![ip(addr)].into(),
        conditions: EndpointConditions {
            ready,
            ..EndpointConditions::default()
        },
        ..Endpoint::default()
    };
    e.set_hostname(hostname.map(Box::from));
    e
}

fn mk_headless(ns: &str, name: &str, endpoints: Vec<Endpoint>) -> ServiceState {
    let mut st = ServiceState::new(Service {
        headless: true,
        ports: vec![port("http", 80)],
        ..Service::new(ServiceKey::new("default", ns, name))
    });
    let v6 = endpoints.first().is_some_and(|e| e.addresses[0].is_ipv6());
    st.slices.push(EndpointSlice {
        name: format!("{name}-1"),
        address_type: if v6 {
            AddressType::IPv6
        } else {
            AddressType::IPv4
        },
        endpoints,
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        cluster: None,
        trigger_time_unix_nanos: None,
    });
    st
}

fn mk_external(ns: &str, name: &str, target: &str) -> ServiceState {
    ServiceState::new(Service {
        service_type: ServiceType::ExternalName,
        external_name: Some(target.into()),
        ..Service::new(ServiceKey::new("default", ns, name))
    })
}

fn mk_state(version: &str, services: Vec<ServiceState>) -> Arc<AgentState> {
    let resources: crate::state::Resources = services
        .into_iter()
        .map(|s| {
            (
                s.service.key.to_string(),
                HeldResource {
                    version: "v".into(),
                    state: Arc::new(s),
                },
            )
        })
        .collect();
    Arc::new(AgentState {
        version: version.into(),
        resources,
    })
}

fn zone() -> Name {
    Name::from_ascii("cluster.local.").expect("zone")
}

fn cluster() -> DnsIndex {
    let many: Vec<Endpoint> = (0..60)
        .map(|i| endpoint(&format!("10.1.1.{i}"), None, true))
        .collect();
    DnsIndex::build(
        mk_state(
            "s1",
            vec![
                mk_service("shop", "web", &["10.96.0.10", "fd00::10"]),
                mk_headless(
                    "shop",
                    "db",
                    vec![
                        endpoint("10.1.0.1", Some("db-0"), true),
                        endpoint("10.1.0.2", None, true),
                        endpoint("10.1.0.3", Some("db-2"), false),
                    ],
                ),
                mk_headless("shop", "v6", vec![endpoint("fd00::1:2", None, true)]),
                mk_headless("shop", "empty", vec![endpoint("10.1.0.9", None, false)]),
                mk_headless("shop", "big", many),
                mk_external("shop", "pay", "pay.example.com"),
                mk_external("shop", "alias", "web.shop.svc.cluster.local"),
            ],
        ),
        &zone(),
        5,
    )
}

fn query_bytes(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().expect("encode")
}

/// The request as hickory-server parses it.
fn parsed(bytes: &[u8]) -> Request {
    Request::from_bytes(
        bytes.to_vec(),
        SocketAddr::new(ip(LOCAL), 5353),
        NetProtocol::Udp,
    )
    .expect("parsable")
}

fn decide_bytes<'i>(index: &'i DnsIndex, acl: &Acl, bytes: &[u8], src: IpAddr) -> Decision<'i> {
    decide(index, acl, &parsed(bytes), src)
}

fn ask_with(
    index: &DnsIndex,
    name: &str,
    qtype: RecordType,
    edns: Option<u16>,
    t: Transport,
) -> Message {
    let q = query_bytes(name, qtype, edns);
    let Some(bytes) = handle_bytes(index, &Acl::node_local(&[]), &q, ip(LOCAL), t) else {
        panic!("expected an answer for {name} {qtype}");
    };
    let m = Message::from_vec(&bytes).expect("decodable answer");
    assert_eq!(m.metadata.id, u16::from_be_bytes([q[0], q[1]]));
    m
}

fn ask(index: &DnsIndex, name: &str, qtype: RecordType) -> Message {
    ask_with(index, name, qtype, None, Transport::Udp)
}

fn rdata(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| r.data.to_string()).collect()
}

/// The owner (as text, in its case) and TTL of each of `records`.
fn owners(records: &[Record]) -> Vec<(String, u32)> {
    records
        .iter()
        .map(|r| (r.name.to_string(), r.ttl))
        .collect()
}

fn assert_negative(m: &Message, rcode: ResponseCode) {
    assert_eq!(m.metadata.response_code, rcode);
    assert!(m.answers.is_empty(), "{:?}", m.answers);
    assert!(m.metadata.authoritative);
    assert_eq!(m.authorities.len(), 1);
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
    assert_eq!(m.authorities[0].name, zone());
}

#[test]
fn cluster_ip_service_has_a_and_aaaa() {
    let idx = cluster();
    let a = ask(&idx, "web.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.authoritative);
    assert_eq!(rdata(&a), ["10.96.0.10"]);
    assert_eq!(a.answers[0].ttl, 5);
    let aaaa = ask(&idx, "web.shop.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(rdata(&aaaa), ["fd00::10"]);
}

#[test]
fn names_match_case_insensitively_and_answers_keep_the_case_asked() {
    let idx = cluster();
    let a = ask(&idx, "WeB.sHoP.SVC.Cluster.Local.", RecordType::A);
    assert_eq!(rdata(&a), ["10.96.0.10"]);
    assert_eq!(a.answers[0].name.to_ascii(), "WeB.sHoP.SVC.Cluster.Local.");
    assert_eq!(a.queries[0].name.to_ascii(), "WeB.sHoP.SVC.Cluster.Local.");
}

#[test]
fn srv_for_named_ports_with_target_addresses() {
    let idx = cluster();
    let srv = ask(
        &idx,
        "_http._tcp.web.shop.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(rdata(&srv), ["0 100 80 web.shop.svc.cluster.local."]);
    let extra: Vec<_> = srv.additionals.iter().map(|r| r.data.to_string()).collect();
    assert_eq!(extra, ["10.96.0.10", "fd00::10"]);
    // The additional addresses are owned by the SRV target, whatever the
    // case of the question; the SRV by the name as asked.
    let mixed = ask(
        &idx,
        "_HTTP._tcp.Web.shop.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(
        mixed.answers[0].name.to_string(),
        "_HTTP._tcp.Web.shop.svc.cluster.local."
    );
    assert_eq!(
        owners(&mixed.additionals),
        [
            ("web.shop.svc.cluster.local.".to_owned(), 5),
            ("web.shop.svc.cluster.local.".to_owned(), 5)
        ]
    );
    let m = ask(
        &idx,
        "_metrics._tcp.web.shop.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(rdata(&m), ["0 100 9090 web.shop.svc.cluster.local."]);
    // Wrong protocol: the name does not exist.
    let udp = ask(
        &idx,
        "_http._udp.web.shop.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_negative(&udp, ResponseCode::NXDomain);
    // `_tcp.<svc>` is an empty non-terminal.
    let ent = ask(&idx, "_tcp.web.shop.svc.cluster.local.", RecordType::SRV);
    assert_negative(&ent, ResponseCode::NoError);
}

#[test]
fn ptr_for_ipv4_and_ipv6() {
    let idx = cluster();
    let v4 = ask(&idx, "10.0.96.10.in-addr.arpa.", RecordType::PTR);
    assert_eq!(rdata(&v4), ["web.shop.svc.cluster.local."]);
    let nibbles = "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.";
    let v6 = ask(&idx, nibbles, RecordType::PTR);
    assert_eq!(rdata(&v6), ["web.shop.svc.cluster.local."]);
    let ep = ask(&idx, "1.0.1.10.in-addr.arpa.", RecordType::PTR);
    assert_eq!(rdata(&ep), ["db-0.db.shop.svc.cluster.local."]);
    // Addresses we do not know go upstream (CoreDNS `fallthrough`).
    let q = query_bytes("9.9.9.9.in-addr.arpa.", RecordType::PTR, None);
    assert!(matches!(
        decide_bytes(&idx, &Acl::node_local(&[]), &q, ip(LOCAL)),
        Decision::Forward(_)
    ));
}

#[test]
fn headless_service_answers_ready_endpoints_and_their_hostnames() {
    let idx = cluster();
    let a = ask(&idx, "db.shop.svc.cluster.local.", RecordType::A);
    let mut got = rdata(&a);
    got.sort();
    assert_eq!(got, ["10.1.0.1", "10.1.0.2"]);
    assert_eq!(
        rdata(&ask(&idx, "db-0.db.shop.svc.cluster.local.", RecordType::A)),
        ["10.1.0.1"]
    );
    assert_eq!(
        rdata(&ask(
            &idx,
            "10-1-0-2.db.shop.svc.cluster.local.",
            RecordType::A
        )),
        ["10.1.0.2"]
    );
    // Not ready: not published.
    let nr = ask(&idx, "db-2.db.shop.svc.cluster.local.", RecordType::A);
    assert_negative(&nr, ResponseCode::NXDomain);
    let srv = ask(
        &idx,
        "_http._tcp.db.shop.svc.cluster.local.",
        RecordType::SRV,
    );
    let mut got = rdata(&srv);
    got.sort();
    assert_eq!(
        got,
        [
            "0 100 8080 10-1-0-2.db.shop.svc.cluster.local.",
            "0 100 8080 db-0.db.shop.svc.cluster.local."
        ]
    );
    assert_eq!(srv.additionals.len(), 2);
    // SRV on the Service's own name: one per endpoint and port.
    let mut got = rdata(&ask(&idx, "db.shop.svc.cluster.local.", RecordType::SRV));
    got.sort();
    assert_eq!(
        got,
        [
            "0 100 8080 10-1-0-2.db.shop.svc.cluster.local.",
            "0 100 8080 db-0.db.shop.svc.cluster.local."
        ]
    );
    // IPv6 endpoints: AAAA and the dashed address.
    let v6 = ask(
        &idx,
        "fd00--1-2.v6.shop.svc.cluster.local.",
        RecordType::AAAA,
    );
    assert_eq!(rdata(&v6), ["fd00::1:2"]);
    // No ready endpoint at all: the service name does not exist.
    let empty = ask(&idx, "empty.shop.svc.cluster.local.", RecordType::A);
    assert_negative(&empty, ResponseCode::NXDomain);
}

/// CoreDNS's `endpoint_pod_names`: an endpoint without a hostname is named
/// after its Pod when the index is asked to (and the Pod's name is a DNS
/// label); a hostname still wins, and without the option the dashed
/// address stays, also in the index made from the previous one.
#[test]
fn endpoint_pod_names_name_an_endpoint_after_its_pod() {
    let pod = |addr: &str, hostname: Option<&str>, pod: &str| Endpoint {
        pod_name: Some(pod.into()),
        ..endpoint(addr, hostname, true)
    };
    let eps = vec![
        pod("10.1.0.1", Some("db-0"), "ignored"),
        pod("10.1.0.2", None, "db-7f9c"),
        pod("10.1.0.3", None, "Not_A-Label"),
    ];
    let state = mk_state("v1", vec![mk_headless("shop", "db", eps)]);
    let named = DnsIndex::build_naming(state.clone(), &zone(), 5, true);
    let a = |idx: &DnsIndex, n: &str| rdata(&ask(idx, n, RecordType::A));
    assert_eq!(a(&named, "db-0.db.shop.svc.cluster.local."), ["10.1.0.1"]);
    assert_eq!(
        a(&named, "db-7f9c.db.shop.svc.cluster.local."),
        ["10.1.0.2"]
    );
    assert!(a(&named, "10-1-0-2.db.shop.svc.cluster.local.").is_empty());
    assert_eq!(
        a(&named, "10-1-0-3.db.shop.svc.cluster.local."),
        ["10.1.0.3"],
        "a Pod name that is no DNS label: the address"
    );
    let plain = DnsIndex::build(state.clone(), &zone(), 5);
    assert_eq!(
        a(&plain, "10-1-0-2.db.shop.svc.cluster.local."),
        ["10.1.0.2"]
    );
    assert!(a(&plain, "db-7f9c.db.shop.svc.cluster.local.").is_empty());
    // Made from the previous index: the same naming.
    let moved = mk_state(
        "v2",
        vec![mk_headless(
            "shop",
            "db",
            vec![pod("10.1.0.9", None, "db-7f9c")],
        )],
    );
    let next = named.next(moved);
    assert_eq!(a(&next, "db-7f9c.db.shop.svc.cluster.local."), ["10.1.0.9"]);
}

#[test]
fn publish_not_ready_addresses_publishes_them() {
    let mut st = mk_headless(
        "shop",
        "db",
        vec![endpoint("10.1.0.3", Some("db-2"), false)],
    );
    st.service.publish_not_ready_addresses = true;
    let idx = DnsIndex::build(mk_state("s", vec![st]), &zone(), 5);
    assert_eq!(
        rdata(&ask(&idx, "db-2.db.shop.svc.cluster.local.", RecordType::A)),
        ["10.1.0.3"]
    );
}

#[test]
fn external_name_is_a_cname() {
    let idx = cluster();
    let c = ask(&idx, "pay.shop.svc.cluster.local.", RecordType::CNAME);
    assert_eq!(rdata(&c), ["pay.example.com."]);
    // An address query is answered with the CNAME plus what the upstream says.
    let q = query_bytes("pay.shop.svc.cluster.local.", RecordType::A, None);
    match decide_bytes(&idx, &Acl::node_local(&[]), &q, ip(LOCAL)) {
        Decision::Forward(f) => {
            assert_eq!(f.query.name.to_ascii(), "pay.example.com.");
            assert_eq!(f.query.query_type, RecordType::A);
            assert_eq!(f.cname.expect("cname").data.to_string(), "pay.example.com.");
        }
        other => panic!("expected a forward, got {other:?}"),
    }
    // A target inside the zone is followed here: the CNAME is owned by the
    // name as asked, the target's records by the target.
    let alias = ask(&idx, "Alias.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(rdata(&alias), ["web.shop.svc.cluster.local.", "10.96.0.10"]);
    assert_eq!(
        owners(&alias.answers),
        [
            ("Alias.shop.svc.cluster.local.".to_owned(), 5),
            ("web.shop.svc.cluster.local.".to_owned(), 5)
        ]
    );
}

#[test]
fn any_gets_one_rrset_and_zone_transfers_are_refused() {
    let idx = cluster();
    // web.shop has A and AAAA: RFC 8482 answers ANY with one RRset.
    let any = ask(&idx, "web.shop.svc.cluster.local.", RecordType::ANY);
    assert_eq!(any.metadata.response_code, ResponseCode::NoError);
    let types: std::collections::BTreeSet<RecordType> =
        any.answers.iter().map(Record::record_type).collect();
    assert_eq!(types.len(), 1, "{:?}", any.answers);
    // Zone transfers: refused in the zone and outside it (never forwarded).
    for name in ["cluster.local.", "example.com."] {
        for qtype in [RecordType::AXFR, RecordType::IXFR] {
            let q = query_bytes(name, qtype, None);
            match decide_bytes(&idx, &Acl::node_local(&[]), &q, ip(LOCAL)) {
                Decision::Answer(a) => assert_eq!(a.rcode, ResponseCode::Refused, "{name} {qtype}"),
                other => panic!("{name} {qtype}: {other:?}"),
            }
        }
    }
}

#[test]
fn dns_version_txt() {
    let idx = cluster();
    let t = ask(&idx, "dns-version.cluster.local.", RecordType::TXT);
    assert_eq!(rdata(&t), ["1.1.0"]);
}

#[test]
fn nodata_and_nxdomain_carry_the_soa() {
    let idx = cluster();
    // Existing name, other type.
    assert_negative(
        &ask(&idx, "web.shop.svc.cluster.local.", RecordType::TXT),
        ResponseCode::NoError,
    );
    assert_negative(
        &ask(&idx, "db.shop.svc.cluster.local.", RecordType::AAAA),
        ResponseCode::NoError,
    );
    // Empty non-terminals.
    assert_negative(
        &ask(&idx, "shop.svc.cluster.local.", RecordType::A),
        ResponseCode::NoError,
    );
    assert_negative(
        &ask(&idx, "svc.cluster.local.", RecordType::A),
        ResponseCode::NoError,
    );
    // Unknown names.
    assert_negative(
        &ask(&idx, "nope.shop.svc.cluster.local.", RecordType::A),
        ResponseCode::NXDomain,
    );
    assert_negative(
        &ask(&idx, "web.other.svc.cluster.local.", RecordType::A),
        ResponseCode::NXDomain,
    );
    assert_negative(
        &ask(&idx, "x.web.shop.svc.cluster.local.", RecordType::A),
        ResponseCode::NXDomain,
    );
    // The apex has an SOA and NS.
    let soa = ask(&idx, "cluster.local.", RecordType::SOA);
    assert_eq!(soa.answers[0].record_type(), RecordType::SOA);
    let ns = ask(&idx, "cluster.local.", RecordType::NS);
    assert_eq!(rdata(&ns), ["ns.dns.cluster.local."]);
}

#[test]
fn pod_names_answer_the_address_they_spell() {
    let idx = cluster();
    let a = ask(&idx, "10-250-1-2.default.pod.cluster.local.", RecordType::A);
    assert_eq!(a.metadata.response_code, ResponseCode::NoError);
    assert!(a.metadata.authoritative);
    assert_eq!(rdata(&a), ["10.250.1.2"]);
    assert_eq!(a.answers[0].ttl, 5);
    // IPv6: dashes for colons; the case asked is kept.
    let aaaa = ask(&idx, "FD00--A.Shop.pod.cluster.local.", RecordType::AAAA);
    assert_eq!(rdata(&aaaa), ["fd00::a"]);
    assert_eq!(
        aaaa.answers[0].name.to_string(),
        "FD00--A.Shop.pod.cluster.local."
    );
    // The other type: NODATA; the namespace and `pod` themselves exist.
    for (name, qtype) in [
        ("10-250-1-2.default.pod.cluster.local.", RecordType::AAAA),
        ("default.pod.cluster.local.", RecordType::A),
        ("pod.cluster.local.", RecordType::A),
    ] {
        assert_negative(&ask(&idx, name, qtype), ResponseCode::NoError);
    }
    // Not an address, or deeper: NXDOMAIN.
    for name in [
        "web.default.pod.cluster.local.",
        "10-250-1.default.pod.cluster.local.",
        "1-2-3-4-5.default.pod.cluster.local.",
        "x.10-250-1-2.default.pod.cluster.local.",
    ] {
        assert_negative(&ask(&idx, name, RecordType::A), ResponseCode::NXDomain);
    }
}

#[test]
fn servfail_before_the_first_snapshot() {
    let idx = DnsIndex::build(Arc::new(AgentState::default()), &zone(), 5);
    let m = ask(&idx, "web.shop.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    // Other names are still forwarded.
    let q = query_bytes("example.com.", RecordType::A, None);
    assert!(matches!(
        decide_bytes(&idx, &Acl::node_local(&[]), &q, ip(LOCAL)),
        Decision::Forward(_)
    ));
}

#[test]
fn edns_is_echoed_and_an_unknown_version_is_badvers() {
    let idx = cluster();
    let m = ask_with(
        &idx,
        "web.shop.svc.cluster.local.",
        RecordType::A,
        Some(4096),
        Transport::Udp,
    );
    let edns = m.edns.expect("OPT in the answer");
    assert_eq!(edns.max_payload(), 1232);
    let plain = ask(&idx, "web.shop.svc.cluster.local.", RecordType::A);
    assert!(plain.edns.is_none());

    let mut q = Message::query();
    q.add_query(Query::query(
        Name::from_ascii("web.shop.svc.cluster.local.").expect("name"),
        RecordType::A,
    ));
    let mut e = Edns::new();
    e.set_version(1);
    q.set_edns(e);
    let bytes = q.to_vec().expect("encode");
    let Some(out) = handle_bytes(
        &idx,
        &Acl::node_local(&[]),
        &bytes,
        ip(LOCAL),
        Transport::Udp,
    ) else {
        panic!("no answer");
    };
    let m = Message::from_vec(&out).expect("decode");
    // BADVERS and BADSIG share code 16.
    assert_eq!(u16::from(m.metadata.response_code), 16);
    assert!(m.edns.is_some());
}

#[test]
fn large_answers_are_truncated_over_udp_and_whole_over_tcp() {
    let idx = cluster();
    // hickory-server keeps the records that fit and sets TC (RFC 2181 §9
    // allows either that or an empty answer; the client retries over TCP).
    let udp = ask(&idx, "big.shop.svc.cluster.local.", RecordType::A);
    assert!(udp.metadata.truncation);
    assert!(udp.answers.len() < 60, "{}", udp.answers.len());
    let edns = ask_with(
        &idx,
        "big.shop.svc.cluster.local.",
        RecordType::A,
        Some(1232),
        Transport::Udp,
    );
    assert!(!edns.metadata.truncation, "60 A records fit in 1232 bytes");
    assert_eq!(edns.answers.len(), 60);
    let srv = ask_with(
        &idx,
        "_http._tcp.big.shop.svc.cluster.local.",
        RecordType::SRV,
        Some(1232),
        Transport::Udp,
    );
    assert!(srv.metadata.truncation, "60 SRV + 60 A do not");
    let tcp = ask_with(
        &idx,
        "_http._tcp.big.shop.svc.cluster.local.",
        RecordType::SRV,
        None,
        Transport::Tcp,
    );
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 60);
    assert_eq!(tcp.additionals.len(), 60);
}

#[test]
fn sources_outside_the_allowed_ranges_are_refused() {
    let idx = cluster();
    let acl = Acl::new(vec!["10.244.0.0/16".parse().expect("net")]);
    let q = query_bytes("web.shop.svc.cluster.local.", RecordType::A, None);
    let Decision::Answer(a) = decide_bytes(&idx, &acl, &q, ip("192.0.2.1")) else {
        panic!("expected REFUSED");
    };
    assert!(a.refused_source);
    assert_eq!(a.rcode, ResponseCode::Refused);
    let fwd = query_bytes("example.com.", RecordType::A, None);
    assert!(matches!(
        decide_bytes(&idx, &acl, &fwd, ip("192.0.2.1")),
        Decision::Answer(Answer {
            refused_source: true,
            ..
        })
    ));
    assert!(matches!(
        decide_bytes(&idx, &acl, &q, ip("10.244.1.1")),
        Decision::Answer(Answer {
            refused_source: false,
            ..
        })
    ));
}

#[test]
fn other_names_are_forwarded() {
    let idx = cluster();
    let q = query_bytes("example.com.", RecordType::A, None);
    assert!(matches!(
        decide_bytes(&idx, &Acl::node_local(&[]), &q, ip(LOCAL)),
        Decision::Forward(_)
    ));
}

#[test]
fn malformed_messages_get_formerr_or_nothing() {
    let idx = cluster();
    let acl = Acl::node_local(&[]);
    // Too short for a header, or a response: dropped.
    assert!(handle_bytes(&idx, &acl, &[1, 2, 3], ip(LOCAL), Transport::Udp).is_none());
    let mut resp = query_bytes("web.shop.svc.cluster.local.", RecordType::A, None);
    resp[2] |= 0x80;
    assert!(handle_bytes(&idx, &acl, &resp, ip(LOCAL), Transport::Udp).is_none());
    // A header that promises a question that is not there: FORMERR, same id
    // (hickory-server answers it before our handler sees it).
    let bad = [0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'x'];
    let out = handle_bytes(&idx, &acl, &bad, ip(LOCAL), Transport::Udp).expect("FORMERR");
    assert_eq!(&out[..2], &[0xab, 0xcd]);
    assert_eq!(out[3] & 0x0f, 1);
    // Two questions: FORMERR.
    let mut two = Message::query();
    for n in ["a.cluster.local.", "b.cluster.local."] {
        two.add_query(Query::query(
            Name::from_ascii(n).expect("name"),
            RecordType::A,
        ));
    }
    let out = handle_bytes(
        &idx,
        &acl,
        &two.to_vec().expect("encode"),
        ip(LOCAL),
        Transport::Udp,
    )
    .expect("FORMERR");
    assert_eq!(out[3] & 0x0f, 1);
    // A class other than IN in our zone.
    let mut ch = Message::query();
    let mut q = Query::query(
        Name::from_ascii("web.shop.svc.cluster.local.").expect("name"),
        RecordType::TXT,
    );
    q.query_class = DNSClass::CH;
    ch.add_query(q);
    let out = handle_bytes(
        &idx,
        &acl,
        &ch.to_vec().expect("encode"),
        ip(LOCAL),
        Transport::Udp,
    )
    .expect("REFUSED");
    assert_eq!(out[3] & 0x0f, 5);
}

/// Random bytes, and valid queries with random bytes flipped: every answer
/// decodes and carries the query's id; nothing panics.
#[test]
fn random_and_mutated_packets_never_crash() {
    let idx = cluster();
    let acl = Acl::node_local(&[]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let seeds: Vec<Vec<u8>> = [
        ("web.shop.svc.cluster.local.", RecordType::A),
        ("_http._tcp.db.shop.svc.cluster.local.", RecordType::SRV),
        ("10.0.96.10.in-addr.arpa.", RecordType::PTR),
        ("pay.shop.svc.cluster.local.", RecordType::A),
        ("big.shop.svc.cluster.local.", RecordType::ANY),
    ]
    .iter()
    .map(|(n, t)| query_bytes(n, *t, Some(1232)))
    .collect();
    for i in 0..50_000 {
        let packet: Vec<u8> = if i % 2 == 0 {
            let len = rng.random_range(0..300);
            (0..len).map(|_| rng.random()).collect()
        } else {
            let mut p = seeds[i % seeds.len()].clone();
            for _ in 0..rng.random_range(1..6) {
                let at = rng.random_range(0..p.len());
                p[at] = rng.random();
            }
            if rng.random_bool(0.2) {
                p.truncate(rng.random_range(0..p.len()));
            }
            p
        };
        for t in [Transport::Udp, Transport::Tcp] {
            if let Some(out) = handle_bytes(&idx, &acl, &packet, ip(LOCAL), t) {
                assert!(out.len() >= 12);
                assert_eq!(out[..2], packet[..2]);
                assert!(t == Transport::Tcp || out.len() <= 1232);
            }
        }
        let mut direct = Vec::new();
        if super::direct::answer(&idx, &packet, &mut direct) {
            let general = handle_bytes(&idx, &acl, &packet, ip(LOCAL), Transport::Udp);
            assert_eq!(Some(direct), general, "{packet:?}");
        }
    }
}

/// What `direct.rs` writes for a question, when it answers it.
fn direct(index: &DnsIndex, query: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    super::direct::answer(index, query, &mut out).then_some(out)
}

#[test]
fn direct_answers_are_hickorys_bytes() {
    let idx = cluster();
    let acl = Acl::node_local(&[]);
    let mut names: Vec<String> = idx.names.iter().map(|(n, _)| n.to_string()).collect();
    names.extend(
        [
            "Web.shop.svc.cluster.local.",
            "nope.shop.svc.cluster.local.",
            "10-244-1-2.shop.pod.cluster.local.",
            "10.0.96.10.in-addr.arpa.",
            "example.com.",
        ]
        .map(String::from),
    );
    let qtypes = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::TXT,
        RecordType::ANY,
        RecordType::CNAME,
    ];
    // Header bytes 2 and 3 as sent: RD, none, CD, AD, AA and RA, TC.
    let flags = [
        (0x01, 0),
        (0, 0),
        (0x01, 0x10),
        (0x01, 0x20),
        (0x05, 0x80),
        (0x03, 0),
    ];
    let mut answered = 0;
    for name in &names {
        for qtype in qtypes {
            for edns in [None, Some(0), Some(512), Some(1232), Some(4096)] {
                for (b2, b3) in flags {
                    let mut q = query_bytes(name, qtype, edns);
                    (q[0], q[1], q[2], q[3]) = (0x12, 0x34, b2, b3);
                    let Some(out) = direct(&idx, &q) else {
                        continue;
                    };
                    let general = handle_bytes(&idx, &acl, &q, ip(LOCAL), Transport::Udp);
                    assert_eq!(Some(out), general, "{name} {qtype} {edns:?} {b2} {b3}");
                    answered += 1;
                }
            }
        }
    }
    assert!(answered > 100, "{answered}");
    let plain = |name, qtype, edns| direct(&idx, &query_bytes(name, qtype, edns)).is_some();
    assert!(plain("web.shop.svc.cluster.local.", RecordType::A, None));
    assert!(plain(
        "web.shop.svc.cluster.local.",
        RecordType::AAAA,
        Some(1232)
    ));
    assert!(plain("db.shop.svc.cluster.local.", RecordType::A, None));
    assert!(plain("v6.shop.svc.cluster.local.", RecordType::AAAA, None));
    // Mixed case, CNAMEs, pods, other types, negative answers, and answers
    // hickory truncates (60 addresses in 512 bytes) take the general path.
    assert!(!plain("Web.shop.svc.cluster.local.", RecordType::A, None));
    assert!(!plain("alias.shop.svc.cluster.local.", RecordType::A, None));
    assert!(!plain(
        "10-244-1-2.shop.pod.cluster.local.",
        RecordType::A,
        None
    ));
    assert!(!plain(
        "_http._tcp.db.shop.svc.cluster.local.",
        RecordType::SRV,
        None
    ));
    assert!(!plain("web.shop.svc.cluster.local.", RecordType::TXT, None));
    assert!(!plain("nope.shop.svc.cluster.local.", RecordType::A, None));
    assert!(!plain("big.shop.svc.cluster.local.", RecordType::A, None));
    // Without a snapshot: SERVFAIL, the general path's.
    let empty = DnsIndex::build(mk_state("", vec![]), &zone(), 5);
    let q = query_bytes("web.shop.svc.cluster.local.", RecordType::A, None);
    assert!(direct(&empty, &q).is_none());
}

#[test]
fn resolv_conf_upstreams_skip_ourselves() {
    let text =
        "search x\nnameserver 169.254.20.10\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\n";
    let (got, ours) =
        super::resolv_conf_upstreams(text, "169.254.20.10:53".parse().expect("addr"), &[]);
    let want: Vec<SocketAddr> = vec![
        "10.96.0.10:53".parse().expect("a"),
        "[fe80::1]:53".parse().expect("a"),
    ];
    assert_eq!(got, want);
    assert_eq!(ours, [ip("169.254.20.10")]);
    // Listening on every address of port 53: loopback and the node's own
    // addresses are the stub too.
    let text = "nameserver 127.0.0.1\nnameserver 10.0.0.5\nnameserver 10.96.0.10\n";
    let (got, ours) =
        super::resolv_conf_upstreams(text, "0.0.0.0:53".parse().expect("addr"), &[ip("10.0.0.5")]);
    assert_eq!(got, ["10.96.0.10:53".parse::<SocketAddr>().expect("a")]);
    assert_eq!(ours, [ip("127.0.0.1"), ip("10.0.0.5")]);
    // On another port they are real servers.
    let (got, _) = super::resolv_conf_upstreams(
        text,
        "0.0.0.0:5353".parse().expect("addr"),
        &[ip("10.0.0.5")],
    );
    assert_eq!(got.len(), 3);
}

#[test]
fn the_index_holds_record_data_compactly_and_gives_it_back_unchanged() {
    use super::index::Data;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SRV, TXT};
    assert!(size_of::<Data>() <= 88, "{} bytes", size_of::<Data>());
    let target = Name::from_ascii("web.shop.svc.cluster.local.").expect("name");
    let all = [
        RData::A(A("10.1.2.3".parse().expect("v4"))),
        RData::AAAA(AAAA("fd00::1".parse().expect("v6"))),
        RData::SRV(SRV::new(1, 2, 80, target.clone())),
        RData::PTR(PTR(target.clone())),
        RData::CNAME(CNAME(target.clone())),
        RData::TXT(TXT::new(vec!["1.1.0".into()])),
    ];
    for (i, data) in all.iter().enumerate() {
        let held = Data::new(data.clone());
        assert_eq!(held.rdata(), *data);
        assert_eq!(held.record_type(), data.record_type());
        for (j, other) in all.iter().enumerate() {
            assert_eq!(held.is(other), i == j, "{data} against {other}");
        }
    }
    // Names compare as DNS compares them, as `RData`'s equality does.
    let upper = Name::from_ascii("WEB.shop.svc.cluster.local.").expect("name");
    assert!(Data::new(RData::PTR(PTR(target))).is(&RData::PTR(PTR(upper))));
    assert!(
        !Data::new(RData::SRV(SRV::new(1, 2, 80, Name::root()))).is(&RData::SRV(SRV::new(
            1,
            2,
            81,
            Name::root()
        )))
    );
}

#[test]
fn records_have_the_configured_ttl() {
    let idx = cluster();
    let acl = Acl::node_local(&[]);
    let mut answered = 0;
    // Every record of every name, as a query for its name and type gets it.
    for (name, node) in idx.names.iter().chain(idx.reverse.iter()) {
        let mut types: Vec<RecordType> = node.records().iter().map(|d| d.record_type()).collect();
        types.dedup();
        for t in types.into_iter().filter(|t| *t != RecordType::SOA) {
            let q = query_bytes(&name.to_string(), t, None);
            let Decision::Answer(a) = decide_bytes(&idx, &acl, &q, ip(LOCAL)) else {
                panic!("{name} {t}: expected an answer");
            };
            assert!(!a.answers.is_empty(), "{name} {t}: no records");
            for r in a.answers.iter().chain(&a.chased).chain(&a.additionals) {
                assert_eq!(r.ttl, 5, "{name} {t}: {r}");
                assert_eq!(r.dns_class, DNSClass::IN, "{name} {t}: {r}");
            }
            answered += a.answers.len();
        }
    }
    assert!(answered > 60, "only {answered} records answered");
    assert!(matches!(idx.soa().data, RData::SOA(ref s) if s.minimum == 5));
}

#[test]
fn answers_are_owned_by_the_name_as_asked() {
    let idx = cluster();
    let acl = Acl::node_local(&[]);
    for asked in ["web.shop.svc.cluster.local.", "Web.SHOP.svc.cluster.local."] {
        let q = query_bytes(asked, RecordType::A, None);
        let Decision::Answer(a) = decide_bytes(&idx, &acl, &q, ip(LOCAL)) else {
            panic!("{asked}: expected an answer");
        };
        assert_eq!(a.answers.len(), 1, "{asked}");
        // `Name`'s equality ignores case: compare the text.
        assert_eq!(a.answers[0].name.to_string(), asked);
    }
    // A negative answer carries the index's SOA itself.
    let nx = query_bytes("nope.shop.svc.cluster.local.", RecordType::A, None);
    let Decision::Answer(a) = decide_bytes(&idx, &acl, &nx, ip(LOCAL)) else {
        panic!("expected an answer");
    };
    assert!(std::ptr::eq(a.soa.expect("soa"), idx.soa()));
}

#[test]
fn a_smaller_client_edns_size_is_the_limit() {
    let idx = cluster();
    let m = ask_with(
        &idx,
        "big.shop.svc.cluster.local.",
        RecordType::A,
        Some(600),
        Transport::Udp,
    );
    assert!(m.metadata.truncation);
    assert_eq!(m.edns.expect("OPT").max_payload(), 600);
    let q = query_bytes("big.shop.svc.cluster.local.", RecordType::A, Some(600));
    let out =
        handle_bytes(&idx, &Acl::node_local(&[]), &q, ip(LOCAL), Transport::Udp).expect("answer");
    assert!(out.len() <= 600, "{}", out.len());
}

#[test]
fn responses_are_dropped_by_the_core() {
    let idx = cluster();
    let mut q = query_bytes("web.shop.svc.cluster.local.", RecordType::A, None);
    q[2] |= 0x80;
    assert!(matches!(
        decide_bytes(&idx, &Acl::node_local(&[]), &q, ip(LOCAL)),
        Decision::Drop
    ));
}

#[test]
fn cached_answers_count_down_and_are_shared_within_a_second() {
    use std::time::{Duration, Instant};

    use hickory_proto::rr::rdata::A;

    let cache = super::cache::AnswerCache::new(10);
    let q = Query::query(
        Name::from_ascii("x.example.org.").expect("name"),
        RecordType::A,
    );
    let mut answer = Message::query();
    answer.add_query(q.clone());
    answer.answers.push(Record::from_rdata(
        q.name.clone(),
        300,
        RData::A(A::new(192, 0, 2, 1)),
    ));
    let t0 = Instant::now();
    cache.put(&q, &answer, t0);
    let first = cache.get(&q, t0).expect("cached");
    assert_eq!(first.answers[0].ttl, 30, "capped at 30 s");
    assert!(Arc::ptr_eq(&first, &cache.get(&q, t0).expect("cached")));
    let later = cache.get(&q, t0 + Duration::from_secs(2)).expect("cached");
    assert_eq!(later.answers[0].ttl, 28);
    assert!(cache.get(&q, t0 + Duration::from_secs(30)).is_none());
}

/// An import as the control plane builds it: cluster `clusterset`, slices
/// tagged with their exporting cluster.
fn mk_import(
    name: &str,
    clusterset_ip: Option<&str>,
    slices: &[(&str, &str, Option<&str>)],
) -> ServiceState {
    let mut st = ServiceState::new(Service {
        headless: clusterset_ip.is_none(),
        cluster_ips: clusterset_ip.map(ip).into_iter().collect(),
        ports: vec![port("http", 80)],
        ..Service::new(ServiceKey::new(switchyard_model::CLUSTERSET, "shop", name))
    });
    for (cluster, addr, host) in slices {
        st.slices.push(EndpointSlice {
            name: format!("{cluster}.{name}-1"),
            endpoints: vec![endpoint(addr, *host, true)],
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            cluster: Some((*cluster).into()),
            ..EndpointSlice::default()
        });
    }
    st
}

#[test]
fn the_clusterset_zone_answers_imports_as_the_mcs_dns_specification_says() {
    let idx = DnsIndex::build(
        mk_state(
            "s1",
            vec![
                mk_service("shop", "web", &["10.96.0.10"]),
                mk_import("web", Some("10.112.0.7"), &[("east", "10.1.0.1", None)]),
                mk_import(
                    "db",
                    None,
                    &[
                        ("east", "10.1.0.5", Some("db-0")),
                        ("west", "10.2.0.5", None),
                    ],
                ),
            ],
        ),
        &zone(),
        5,
    );
    // The cluster's own name stays its own; the clusterset name is the import.
    assert_eq!(
        rdata(&ask(&idx, "web.shop.svc.cluster.local.", RecordType::A)),
        ["10.96.0.10"]
    );
    let a = ask(&idx, "web.shop.svc.clusterset.local.", RecordType::A);
    assert!(a.metadata.authoritative);
    assert_eq!(rdata(&a), ["10.112.0.7"]);
    let srv = ask(
        &idx,
        "_http._tcp.web.shop.svc.clusterset.local.",
        RecordType::SRV,
    );
    assert_eq!(rdata(&srv), ["0 100 80 web.shop.svc.clusterset.local."]);
    let ptr = ask(&idx, "7.0.112.10.in-addr.arpa.", RecordType::PTR);
    assert_eq!(rdata(&ptr), ["web.shop.svc.clusterset.local."]);
    // Headless: every cluster's ready endpoints, and one name per endpoint
    // under its cluster id.
    let mut all = rdata(&ask(&idx, "db.shop.svc.clusterset.local.", RecordType::A));
    all.sort();
    assert_eq!(all, ["10.1.0.5", "10.2.0.5"]);
    assert_eq!(
        rdata(&ask(
            &idx,
            "db-0.east.db.shop.svc.clusterset.local.",
            RecordType::A
        )),
        ["10.1.0.5"]
    );
    assert_eq!(
        rdata(&ask(
            &idx,
            "10-2-0-5.west.db.shop.svc.clusterset.local.",
            RecordType::A
        )),
        ["10.2.0.5"]
    );
    let mut srvs = rdata(&ask(
        &idx,
        "_http._tcp.db.shop.svc.clusterset.local.",
        RecordType::SRV,
    ));
    srvs.sort();
    assert_eq!(
        srvs,
        [
            "0 100 8080 10-2-0-5.west.db.shop.svc.clusterset.local.",
            "0 100 8080 db-0.east.db.shop.svc.clusterset.local.",
        ]
    );
    // SRV on the bare names (what the MCS conformance suite queries): one
    // record per port for the ClusterSet IP, one per endpoint for headless.
    let web = ask(&idx, "web.shop.svc.clusterset.local.", RecordType::SRV);
    assert_eq!(rdata(&web), ["0 100 80 web.shop.svc.clusterset.local."]);
    let mut srvs = rdata(&ask(&idx, "db.shop.svc.clusterset.local.", RecordType::SRV));
    srvs.sort();
    assert_eq!(
        srvs,
        [
            "0 100 8080 10-2-0-5.west.db.shop.svc.clusterset.local.",
            "0 100 8080 db-0.east.db.shop.svc.clusterset.local.",
        ]
    );
    // `<cluster-id>.<svc>...` must not exist; unknown names are NXDOMAIN
    // with the clusterset zone's SOA; the apex answers its schema version.
    for missing in [
        "east.db.shop.svc.clusterset.local.",
        "nope.shop.svc.clusterset.local.",
    ] {
        let m = ask(&idx, missing, RecordType::A);
        assert_eq!(
            m.metadata.response_code,
            ResponseCode::NXDomain,
            "{missing}"
        );
        assert_eq!(m.authorities[0].name.to_ascii(), "clusterset.local.");
    }
    let txt = ask(&idx, "dns-version.clusterset.local.", RecordType::TXT);
    assert_eq!(rdata(&txt), ["1.0.0"]);
    let nodata = ask(&idx, "shop.svc.clusterset.local.", RecordType::A);
    assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
    assert!(nodata.answers.is_empty());
}

/// Every name with its records as text, SOAs left out (their serial is the
/// build's second), records sorted: two indexes that answer alike are equal.
fn canonical(idx: &DnsIndex) -> (BTreeMap<String, Vec<String>>, BTreeMap<String, Vec<String>>) {
    let text = |owner: &LowerName, records: super::index::Records<'_>| {
        let mut v: Vec<String> = records
            .iter()
            .filter(|r| r.record_type() != RecordType::SOA)
            .map(|r| format!("{owner} {}", r.rdata()))
            .collect();
        v.sort();
        v
    };
    let names = idx
        .names
        .iter()
        .map(|(k, n)| (k.to_string(), text(k, n.records())))
        .collect();
    let reverse = idx
        .reverse
        .iter()
        .map(|(k, r)| (k.to_string(), text(k, r.records())))
        .collect();
    (names, reverse)
}

#[test]
fn an_index_made_from_the_previous_one_answers_as_one_built_whole() {
    let pod = |a: &str, h: Option<&str>| endpoint(a, h, true);
    let steps: Vec<(Vec<ServiceState>, usize)> = vec![
        (
            vec![
                mk_service("shop", "web", &["10.96.0.10", "fd00::10"]),
                // Two headless Services select one pod: its PTR has two targets.
                mk_headless(
                    "shop",
                    "db",
                    vec![pod("10.1.0.1", Some("db-0")), pod("10.1.0.2", None)],
                ),
                mk_headless("shop", "db-replica", vec![pod("10.1.0.1", None)]),
                mk_external("shop", "pay", "pay.example.com"),
                mk_service("other", "x", &["10.96.0.20"]),
                mk_import("web", Some("10.112.0.10"), &[]),
            ],
            6,
        ),
        (
            // An endpoint moves, a Service goes, one comes, the import turns headless.
            vec![
                mk_service("shop", "web", &["10.96.0.10", "fd00::10"]),
                mk_headless(
                    "shop",
                    "db",
                    vec![pod("10.1.0.1", Some("db-0")), pod("10.1.0.3", None)],
                ),
                mk_headless("shop", "db-replica", vec![pod("10.1.0.1", None)]),
                mk_external("shop", "pay", "pay.example.com"),
                mk_service("other", "x", &["10.96.0.20"]),
                mk_service("other", "y", &["10.96.0.21"]),
                mk_import(
                    "web",
                    None,
                    &[
                        ("east", "10.2.0.1", Some("web-0")),
                        ("west", "10.3.0.1", None),
                    ],
                ),
            ],
            3,
        ),
        (
            // The namespace `other` empties: `other.svc` must stop existing;
            // the pod shared by two Services keeps the PTR of the one left.
            vec![
                mk_service("shop", "web", &["10.96.0.11"]),
                mk_headless("shop", "db", vec![pod("10.1.0.3", None)]),
                mk_headless("shop", "db-replica", vec![pod("10.1.0.1", None)]),
                mk_external("shop", "pay", "pay2.example.com"),
            ],
            6,
        ),
        (Vec::new(), 4),
    ];
    let mut prev = DnsIndex::build(Arc::new(AgentState::default()), &zone(), 5);
    for (i, (services, changed)) in steps.into_iter().enumerate() {
        let state = mk_state(&format!("v{i}"), services);
        let next = prev.next(state.clone());
        let whole = DnsIndex::build(state, &zone(), 5);
        assert_eq!(next.changed, Some(changed), "step {i}: Services changed");
        assert_eq!(canonical(&next), canonical(&whole), "step {i}");
        assert_eq!(next.len(), whole.len(), "step {i}: name count");
        assert_eq!(next.version, format!("v{i}"));
        // The index it was made from still answers as before.
        assert_eq!(
            prev.version,
            if i == 0 {
                String::new()
            } else {
                format!("v{}", i - 1)
            }
        );
        prev = next;
    }
    let gone = Name::from_ascii("other.svc.cluster.local.").expect("name");
    assert!(matches!(
        prev.lookup(&gone.into(), RecordType::A),
        Lookup::NxDomain
    ));
}

#[test]
fn a_zone_whose_names_change_gets_a_serial_ahead_of_its_last() {
    fn serial_of(m: &Message, section: &[Record]) -> u32 {
        match section.first().map(|r| &r.data) {
            Some(RData::SOA(soa)) => soa.serial,
            other => panic!("no SOA in {m:?}: {other:?}"),
        }
    }
    let serials = |idx: &DnsIndex| {
        let cluster = ask(idx, "cluster.local.", RecordType::SOA);
        let clusterset = ask(idx, "clusterset.local.", RecordType::SOA);
        (
            serial_of(&cluster, &cluster.answers),
            serial_of(&clusterset, &clusterset.answers),
        )
    };
    let web = |addr: &str| mk_service("shop", "web", &[addr]);
    let a = DnsIndex::build(mk_state("a", vec![web("10.96.0.10")]), &zone(), 5);
    let (c0, s0) = serials(&a);
    let same = a.next(mk_state("a2", vec![web("10.96.0.10")]));
    assert_eq!(serials(&same), (c0, s0), "no name changed");
    // Within the same second as the build: one past its serial.
    let b = same.next(mk_state("b", vec![web("10.96.0.11")]));
    let (c1, s1) = serials(&b);
    assert!(c1 > c0, "cluster.local changed: {c1} after {c0}");
    assert_eq!(s1, s0, "clusterset.local did not change");
    // The SOA of a NODATA answer is the apex's.
    let nodata = ask(&b, "web.shop.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(serial_of(&nodata, &nodata.authorities), c1);
    let imported = b.next(mk_state(
        "c",
        vec![
            web("10.96.0.11"),
            mk_import("web", Some("10.97.0.1"), &[("east", "10.2.0.1", None)]),
        ],
    ));
    let (c2, s2) = serials(&imported);
    assert_eq!(c2, c1, "cluster.local did not change");
    assert!(s2 > s1, "clusterset.local changed: {s2} after {s1}");
    // Built whole (most Services changed): still ahead of the index before.
    let many = |v: &str, p: &str| {
        mk_state(
            v,
            (0..400)
                .map(|i| mk_service("ns", &format!("{p}{i}"), &["10.96.0.1"]))
                .collect(),
        )
    };
    let before = imported.next(many("d", "s"));
    assert_eq!(before.changed, None);
    let (c3, s3) = serials(&before);
    let whole = before.next(many("e", "t"));
    assert_eq!(whole.changed, None, "built whole");
    let (c4, s4) = serials(&whole);
    assert!(
        c3 > c2 && c4 > c3 && s3 > s2 && s4 > s3,
        "{c2} {c3} {c4}, {s2} {s3} {s4}"
    );
}

#[test]
fn most_services_changing_builds_whole() {
    let a = mk_state(
        "a",
        (0..10)
            .map(|i| mk_service("ns", &format!("s{i}"), &["10.96.0.1"]))
            .collect(),
    );
    let b = mk_state(
        "b",
        (0..10)
            .map(|i| mk_service("ns", &format!("t{i}"), &["10.96.0.1"]))
            .collect(),
    );
    let idx = DnsIndex::build(a, &zone(), 5);
    // 20 changes (10 out, 10 in) against 10 Services: below the floor of 64,
    // so still incremental; a state of thousands changing whole is rebuilt.
    assert_eq!(idx.next(b).changed, Some(20));
    let many = |v: &str, p: &str| {
        mk_state(
            v,
            (0..400)
                .map(|i| mk_service("ns", &format!("{p}{i}"), &["10.96.0.1"]))
                .collect(),
        )
    };
    let idx = DnsIndex::build(many("a", "s"), &zone(), 5);
    assert_eq!(idx.next(many("b", "t")).changed, None, "built whole");
}

/// Records of one type next to each other in every name: a lookup
/// returns one slice per type.
fn assert_grouped(idx: &DnsIndex, step: usize) {
    for (name, node) in idx.names.iter() {
        let mut seen = Vec::new();
        for r in node.records().iter() {
            let t = r.record_type();
            if seen.last() != Some(&t) {
                assert!(
                    !seen.contains(&t),
                    "step {step}: {name} has {t} in two runs"
                );
                seen.push(t);
            }
        }
    }
}

/// A headless Service (or an import of one) drawn from small pools, so
/// that addresses, host names and ports repeat across endpoints and slices.
fn random_headless(rng: &mut rand::rngs::StdRng, name: &str, import: bool) -> ServiceState {
    let cluster = if import {
        switchyard_model::CLUSTERSET
    } else {
        "default"
    };
    let mut st = ServiceState::new(Service {
        headless: true,
        publish_not_ready_addresses: rng.random_bool(0.2),
        ports: vec![port("http", 80)],
        ..Service::new(ServiceKey::new(cluster, "shop", name))
    });
    let port_names = ["http", "grpc", "", "admin"];
    for s in 0..rng.random_range(0..4) {
        let ports = (0..rng.random_range(0..3))
            .map(|_| EndpointPort {
                name: port_names[rng.random_range(0..port_names.len())].into(),
                protocol: if rng.random_bool(0.8) {
                    Protocol::Tcp
                } else {
                    Protocol::Udp
                },
                port: 8080 + rng.random_range(0..2),
            })
            .collect();
        let endpoints = (0..rng.random_range(0..6))
            .map(|_| {
                let addr = if rng.random_bool(0.7) {
                    format!("10.1.0.{}", rng.random_range(1..6))
                } else {
                    format!("fd00::{}", rng.random_range(1..4))
                };
                let host = ["a", "b"][rng.random_range(0..2)];
                endpoint(
                    &addr,
                    rng.random_bool(0.4).then_some(host),
                    rng.random_bool(0.8),
                )
            })
            .collect();
        st.slices.push(EndpointSlice {
            name: format!("{name}-{s}"),
            endpoints,
            ports,
            cluster: import.then(|| ["east", "west"][rng.random_range(0..2)].into()),
            ..EndpointSlice::default()
        });
    }
    st
}

#[test]
fn random_changes_to_headless_services_answer_as_a_whole_build() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(30);
    let mut services = vec![
        random_headless(&mut rng, "db", false),
        random_headless(&mut rng, "cache", false),
        random_headless(&mut rng, "db", true),
        mk_service("shop", "web", &["10.96.0.10"]),
    ];
    let mut prev = DnsIndex::build(mk_state("v0", services.clone()), &zone(), 5);
    for step in 1..300 {
        let i = rng.random_range(0..services.len());
        let key = services[i].service.key.clone();
        services[i] = match rng.random_range(0..10) {
            // Now and then a Service of another kind under the same name.
            0 => mk_service(&key.namespace, &key.name, &["10.96.0.11"]),
            1 => mk_external(&key.namespace, &key.name, "example.com"),
            _ => random_headless(
                &mut rng,
                &key.name,
                key.cluster == switchyard_model::CLUSTERSET,
            ),
        };
        if key.cluster == switchyard_model::CLUSTERSET
            && services[i].service.key.cluster != key.cluster
        {
            services[i].service.key = key;
        }
        let state = mk_state(&format!("v{step}"), services.clone());
        let next = prev.next(state.clone());
        let whole = DnsIndex::build(state, &zone(), 5);
        assert_eq!(canonical(&next), canonical(&whole), "step {step}");
        assert_eq!(next.len(), whole.len(), "step {step}: name count");
        assert_grouped(&next, step);
        prev = next;
    }
}

#[test]
fn one_endpoint_change_to_a_large_headless_service_writes_what_changed() {
    // 2,000 endpoints x 50 named ports: 100,000 SRV records. Its index took
    // 28 s, quadratic in the records of one name; a one-endpoint change
    // took out and put back all of them.
    let big = |moved: Option<u32>| {
        let ports: Vec<EndpointPort> = (0..50)
            .map(|p| EndpointPort {
                name: format!("port-{p}"),
                protocol: Protocol::Tcp,
                port: 8000 + p,
            })
            .collect();
        let mut st = ServiceState::new(Service {
            headless: true,
            ..Service::new(ServiceKey::new("default", "team-a", "web"))
        });
        for s in 0..20u32 {
            st.slices.push(EndpointSlice {
                name: format!("web-{s:02}"),
                endpoints: (0..100u32)
                    .map(|e| {
                        let n = s * 100 + e;
                        let n = if moved == Some(n) { 1_000_000 } else { n };
                        let addr = std::net::Ipv4Addr::from(0x0a80_0000 + n);
                        endpoint(&addr.to_string(), None, true)
                    })
                    .collect(),
                ports: ports.clone(),
                ..EndpointSlice::default()
            });
        }
        st
    };
    let idx = DnsIndex::build(mk_state("v1", vec![big(None)]), &zone(), 5);
    let next = idx.next(mk_state("v2", vec![big(Some(7))]));
    assert_eq!(next.changed, Some(1));
    // Out: the endpoint's A at the Service, its host name's A, its PTR,
    // 50 SRV under `_port._tcp` and 50 on the Service's name; in: the same
    // for its new address.
    assert_eq!(next.changed_records(), 2 * (3 + 50 + 50));
    // Too many for one message: read the name's records in the index.
    let srv = Name::from_ascii("_port-9._tcp.web.team-a.svc.cluster.local.").expect("name");
    let Lookup::Records(records, RecordType::SRV) = next.lookup(&srv.into(), RecordType::SRV)
    else {
        panic!("SRV records")
    };
    assert!(records.as_slice().is_none(), "in several chunks");
    let targets: Vec<String> = records.iter().map(|r| r.rdata().to_string()).collect();
    assert_eq!(targets.len(), 2000);
    assert!(
        targets.iter().any(|t| t.contains("10-143-66-64.web")),
        "new target"
    );
    assert!(
        !targets.iter().any(|t| t.contains("10-128-0-7.web")),
        "old target"
    );
    assert_negative(
        &ask(
            &next,
            "10-128-0-7.web.team-a.svc.cluster.local.",
            RecordType::A,
        ),
        ResponseCode::NXDomain,
    );
    assert_eq!(
        rdata(&ask(
            &next,
            "10-143-66-64.web.team-a.svc.cluster.local.",
            RecordType::A
        )),
        ["10.143.66.64"]
    );
    // The index it was made from still answers as before.
    assert_eq!(
        rdata(&ask(
            &idx,
            "10-128-0-7.web.team-a.svc.cluster.local.",
            RecordType::A
        )),
        ["10.128.0.7"]
    );
}

/// A handler answering from a cell that follows `state`, as `dns::start`
/// makes it; the sender moves the state on.
fn udp_handler(
    state: Arc<AgentState>,
) -> (
    super::server::StubHandler,
    Arc<super::IndexCell>,
    tokio::sync::watch::Sender<Arc<AgentState>>,
) {
    let (tx, rx) = tokio::sync::watch::channel(state);
    let cell = Arc::new(super::IndexCell::new(rx, zone(), 5, None, None));
    let cfg = super::DnsConfig {
        max_inflight: 16,
        ..super::DnsConfig::plain("127.0.0.1:53".parse().expect("addr"), zone())
    };
    let metrics = Arc::new(crate::status::Metrics::new());
    (
        super::server::StubHandler::new(cfg, cell.clone(), metrics, Arc::default()),
        cell,
        tx,
    )
}

/// What the UDP loop does with `bytes` from a local pod at `now`, and the
/// bytes it would send at once.
fn reply_udp_raw(
    handler: &super::server::StubHandler,
    encoded: &mut super::encoded::EncodedAnswers,
    bytes: &[u8],
    now: std::time::Instant,
) -> (super::server::Reply, Vec<u8>) {
    let mut out = Vec::new();
    let src = SocketAddr::new(ip(LOCAL), 5353);
    let reply = handler.reply_now(encoded, bytes, src, || now, &mut out);
    (reply, out)
}

/// `bytes` as the UDP loop answers them at `now`, decoded.
fn reply_udp(
    handler: &super::server::StubHandler,
    encoded: &mut super::encoded::EncodedAnswers,
    bytes: &[u8],
    now: std::time::Instant,
) -> Message {
    match reply_udp_raw(handler, encoded, bytes, now) {
        (super::server::Reply::Now, out) => Message::from_vec(&out).expect("decodable answer"),
        (super::server::Reply::Later(_), _) => panic!("waits for an upstream"),
        (super::server::Reply::Nothing, _) => panic!("no answer"),
    }
}

fn with_id(mut bytes: Vec<u8>, id: u16) -> Vec<u8> {
    bytes[..2].copy_from_slice(&id.to_be_bytes());
    bytes
}

#[test]
fn an_encoded_answer_is_sent_with_the_id_of_the_query_it_answers() {
    use super::encoded::{Encoded, EncodedAnswers, Valid};

    let index = Arc::new(cluster());
    let mut encoded = EncodedAnswers::new(8, 1 << 20);
    let q = with_id(
        query_bytes("web.shop.svc.cluster.local.", RecordType::A, None),
        1,
    );
    let answer =
        handle_bytes(&index, &Acl::node_local(&[]), &q, ip(LOCAL), Transport::Udp).expect("answer");
    let entry = Encoded {
        bytes: answer.as_slice().into(),
        rcode: 0,
        truncated: false,
        valid: Valid::Index,
    };
    encoded.put(&index, &q, entry);
    let mut out = Vec::new();
    let now = std::time::Instant::now;
    let again = with_id(q.clone(), 0xbeef);
    assert!(encoded.answer(&index, &again, 0, now, &mut out).is_some());
    assert_eq!(&out[..2], &[0xbe, 0xef]);
    assert_eq!(&out[2..], &answer[2..]);
    // Another question (here: another case) is another key.
    let upper = with_id(
        query_bytes("WEB.shop.svc.cluster.local.", RecordType::A, None),
        1,
    );
    assert!(encoded.answer(&index, &upper, 0, now, &mut out).is_none());
    // Another index, even with the same names, starts empty.
    let other = Arc::new(cluster());
    assert!(encoded.answer(&other, &again, 0, now, &mut out).is_none());
    assert_eq!(encoded.len(), 0);
}

#[test]
fn a_spare_answer_is_kept_only_where_it_evicts_nothing() {
    use super::encoded::{Encoded, EncodedAnswers, Valid};

    let index = Arc::new(cluster());
    let mut encoded = EncodedAnswers::new(2, 1 << 20);
    let entry = |q: &[u8]| Encoded {
        bytes: handle_bytes(&index, &Acl::node_local(&[]), q, ip(LOCAL), Transport::Udp)
            .expect("answer")
            .into(),
        rcode: 0,
        truncated: false,
        valid: Valid::Index,
    };
    let q: Vec<Vec<u8>> = ["web", "db", "v6"]
        .iter()
        .map(|s| query_bytes(&format!("{s}.shop.svc.cluster.local."), RecordType::A, None))
        .collect();
    for q in &q {
        encoded.put_spare(&index, q, entry(q));
    }
    let mut out = Vec::new();
    let now = std::time::Instant::now;
    let mut kept = |q: &[u8]| encoded.answer(&index, q, 0, now, &mut out).is_some();
    assert!(kept(&q[0]) && kept(&q[1]) && !kept(&q[2]));
    // An answer of the general path makes room.
    encoded.put(&index, &q[2], entry(&q[2]));
    assert_eq!(encoded.len(), 2);
    assert!(encoded.answer(&index, &q[2], 0, now, &mut out).is_some());
}

#[test]
fn udp_answers_are_those_of_the_uncached_path_and_keep_the_id_and_case_asked() {
    let (handler, cell, _tx) = udp_handler(mk_state(
        "s1",
        vec![mk_service("shop", "web", &["10.96.0.10"])],
    ));
    let mut encoded = super::encoded::EncodedAnswers::new(64, 1 << 20);
    let now = std::time::Instant::now();
    let acl = Acl::node_local(&[]);
    for (name, qtype, edns) in [
        ("WEB.Shop.svc.cluster.local.", RecordType::A, None),
        ("web.shop.svc.cluster.local.", RecordType::A, Some(1232)),
        ("web.shop.svc.cluster.local.", RecordType::AAAA, None),
        ("nothere.shop.svc.cluster.local.", RecordType::A, None),
    ] {
        for id in [1, 2, 3] {
            let q = with_id(query_bytes(name, qtype, edns), id);
            let m = reply_udp(&handler, &mut encoded, &q, now);
            assert_eq!(m.metadata.id, id);
            assert_eq!(m.queries[0].name().to_string(), name, "the case asked");
            let uncached =
                handle_bytes(&cell.current(), &acl, &q, ip(LOCAL), Transport::Udp).expect("answer");
            assert_eq!(
                m.to_vec().expect("encode"),
                Message::from_vec(&uncached)
                    .expect("decode")
                    .to_vec()
                    .expect("encode")
            );
        }
    }
    assert_eq!(encoded.len(), 4, "one encoding per distinct query");
    let a = reply_udp(
        &handler,
        &mut encoded,
        &query_bytes("WEB.Shop.svc.cluster.local.", RecordType::A, None),
        now,
    );
    assert_eq!(a.answers[0].name.to_string(), "WEB.Shop.svc.cluster.local.");
}

#[test]
fn udp_answers_follow_the_index_in_force() {
    let (handler, cell, tx) = udp_handler(mk_state(
        "s1",
        vec![mk_service("shop", "web", &["10.96.0.10"])],
    ));
    let mut encoded = super::encoded::EncodedAnswers::new(64, 1 << 20);
    let now = std::time::Instant::now();
    let q = query_bytes("web.shop.svc.cluster.local.", RecordType::A, None);
    assert_eq!(
        rdata(&reply_udp(&handler, &mut encoded, &q, now)),
        ["10.96.0.10"]
    );
    assert_eq!(
        rdata(&reply_udp(&handler, &mut encoded, &q, now)),
        ["10.96.0.10"]
    );
    tx.send_replace(mk_state(
        "s2",
        vec![mk_service("shop", "web", &["10.96.0.99"])],
    ));
    cell.refresh();
    assert_eq!(
        rdata(&reply_udp(&handler, &mut encoded, &q, now)),
        ["10.96.0.99"]
    );
    tx.send_replace(mk_state("s3", Vec::new()));
    cell.refresh();
    let gone = reply_udp(&handler, &mut encoded, &q, now);
    assert_eq!(gone.metadata.response_code, ResponseCode::NXDomain);
}

/// An upstream answer to `q`: one A record of TTL `ttl` ending in `last`,
/// an NS record in the authority section (TTL 10) and its address in the
/// additional one (TTL 3), so TTLs of every section count down, and one
/// reaches 0 before the answer expires.
fn upstream_answer(q: &Query, ttl: u32, last: u8) -> Message {
    use hickory_proto::rr::rdata::{A, NS};

    let ns = Name::from_ascii("ns.example.org.").expect("name");
    let mut answer = Message::query();
    answer.add_query(q.clone());
    answer.answers.push(Record::from_rdata(
        q.name.clone(),
        ttl,
        RData::A(A::new(192, 0, 2, last)),
    ));
    answer.authorities.push(Record::from_rdata(
        Name::from_ascii("example.org.").expect("name"),
        10,
        RData::NS(NS(ns.clone())),
    ));
    answer
        .additionals
        .push(Record::from_rdata(ns, 3, RData::A(A::new(192, 0, 2, 53))));
    answer
}

/// The UDP loop's answer to `bytes` at `now` as sent: from `encoded` if it
/// holds one (`true`), else through the whole path.
fn reply_udp_bytes(
    (handler, cell): (&super::server::StubHandler, &super::IndexCell),
    encoded: &mut super::encoded::EncodedAnswers,
    bytes: &[u8],
    now: std::time::Instant,
) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let index = cell.current();
    let retired = handler.cache.retired();
    let kept = encoded
        .answer(&index, bytes, retired, || now, &mut out)
        .is_some();
    match reply_udp_raw(handler, encoded, bytes, now) {
        (super::server::Reply::Now, out) => (out, kept),
        _ => panic!("no answer now"),
    }
}

#[test]
fn relayed_answers_count_down_in_place_as_a_fresh_encoding_would() {
    use std::time::Duration;

    let (handler, cell, _tx) = udp_handler(mk_state("s1", Vec::new()));
    let mut encoded = super::encoded::EncodedAnswers::new(64, 1 << 20);
    let q = Query::query(
        Name::from_ascii("x.example.org.").expect("name"),
        RecordType::A,
    );
    let t0 = std::time::Instant::now();
    for edns in [None, Some(1232)] {
        // Put again: the first pass's lookup after it expired dropped it.
        handler.cache.put(&q, &upstream_answer(&q, 300, 1), t0);
        let asked = with_id(query_bytes("X.Example.org.", RecordType::A, edns), 7);
        let mut step = Duration::ZERO;
        while step < Duration::from_secs(30) {
            let now = t0 + step;
            // Through the encoded answers (kept after the first query), and
            // encoded afresh with nothing kept.
            let (sent, kept) = reply_udp_bytes((&handler, &cell), &mut encoded, &asked, now);
            let mut none = super::encoded::EncodedAnswers::new(0, 0);
            let (fresh, _) = reply_udp_bytes((&handler, &cell), &mut none, &asked, now);
            assert_eq!(sent, fresh, "at {step:?}");
            assert_eq!(kept, step > Duration::ZERO, "encoded once, at {step:?}");
            let m = Message::from_vec(&sent).expect("decodable");
            let age = step.as_secs() as u32;
            assert_eq!(m.answers[0].ttl, 30 - age);
            assert_eq!(m.authorities[0].ttl, 10u32.saturating_sub(age));
            assert_eq!(m.additionals[0].ttl, 3u32.saturating_sub(age));
            assert_eq!(m.queries[0].name().to_string(), "X.Example.org.");
            assert_eq!(m.metadata.id, 7);
            assert_eq!(m.edns.is_some(), edns.is_some());
            step += Duration::from_millis(700);
        }
        assert!(
            reply_udp_later(&handler, &mut encoded, &asked, t0 + Duration::from_secs(30)),
            "expired: asked upstream again"
        );
    }
}

#[test]
fn a_refetched_name_invalidates_its_own_encoded_answer_and_no_other() {
    use std::time::Duration;

    let (handler, cell, _tx) = udp_handler(mk_state("s1", Vec::new()));
    let mut encoded = super::encoded::EncodedAnswers::new(64, 1 << 20);
    let query = |name: &str| Query::query(Name::from_ascii(name).expect("name"), RecordType::A);
    let (x, y) = (query("x.example.org."), query("y.example.org."));
    let t0 = std::time::Instant::now();
    handler.cache.put(&x, &upstream_answer(&x, 300, 1), t0);
    handler.cache.put(&y, &upstream_answer(&y, 300, 1), t0);
    let ask_x = query_bytes("x.example.org.", RecordType::A, None);
    let ask_y = query_bytes("y.example.org.", RecordType::A, None);
    let t1 = t0 + Duration::from_secs(1);
    for asked in [&ask_x, &ask_y] {
        assert!(!reply_udp_bytes((&handler, &cell), &mut encoded, asked, t1).1);
    }
    // y fetched again, with another address.
    handler.cache.put(
        &y,
        &upstream_answer(&y, 300, 2),
        t0 + Duration::from_secs(2),
    );
    let t3 = t0 + Duration::from_secs(3);
    let (x_now, kept) = reply_udp_bytes((&handler, &cell), &mut encoded, &ask_x, t3);
    assert!(kept, "x's encoding is still x's answer");
    assert_eq!(
        Message::from_vec(&x_now).expect("decode").answers[0].ttl,
        27
    );
    let (y_now, kept) = reply_udp_bytes((&handler, &cell), &mut encoded, &ask_y, t3);
    assert!(!kept, "y's encoding was of its old answer");
    let y_now = Message::from_vec(&y_now).expect("decode");
    assert_eq!(
        (rdata(&y_now), y_now.answers[0].ttl),
        (vec!["192.0.2.2".to_owned()], 29),
        "the cache's new answer, aged from its own fetch"
    );
    // Evicted from a full cache: nothing encoded from it is sent.
    let small = super::cache::AnswerCache::new(1);
    small.put(&x, &upstream_answer(&x, 300, 1), t0);
    let before = small.lookup(&x, t0).expect("cached");
    small.put(&y, &upstream_answer(&y, 300, 1), t0);
    assert!(!before.current.holds(), "evicted");
    assert_eq!(small.retired(), before.retired + 1);
    assert!(small.lookup(&y, t0).expect("cached").current.holds());
}

#[test]
fn relayed_answers_after_our_cname_count_down_only_the_upstreams_records() {
    let (handler, cell, _tx) = udp_handler(mk_state(
        "s1",
        vec![mk_external("shop", "pay", "pay.example.com")],
    ));
    let mut encoded = super::encoded::EncodedAnswers::new(64, 1 << 20);
    let target = Query::query(
        Name::from_ascii("pay.example.com.").expect("name"),
        RecordType::A,
    );
    let t0 = std::time::Instant::now();
    handler
        .cache
        .put(&target, &upstream_answer(&target, 20, 9), t0);
    let asked = query_bytes("pay.shop.svc.cluster.local.", RecordType::A, None);
    for secs in [0, 4, 12] {
        let now = t0 + std::time::Duration::from_secs(secs);
        let (sent, kept) = reply_udp_bytes((&handler, &cell), &mut encoded, &asked, now);
        assert_eq!(kept, secs > 0);
        let mut none = super::encoded::EncodedAnswers::new(0, 0);
        assert_eq!(
            sent,
            reply_udp_bytes((&handler, &cell), &mut none, &asked, now).0
        );
        let m = Message::from_vec(&sent).expect("decode");
        let ttls: Vec<u32> = m.answers.iter().map(|r| r.ttl).collect();
        assert_eq!(
            ttls,
            [5, 20 - secs as u32],
            "our CNAME keeps the zone's TTL"
        );
    }
}

/// Whether the UDP loop leaves `bytes` to a task that asks the upstreams.
fn reply_udp_later(
    handler: &super::server::StubHandler,
    encoded: &mut super::encoded::EncodedAnswers,
    bytes: &[u8],
    now: std::time::Instant,
) -> bool {
    matches!(
        reply_udp_raw(handler, encoded, bytes, now).0,
        super::server::Reply::Later(_)
    )
}

#[test]
fn an_encoded_answer_holds_what_a_relayed_one_needs_inline_in_little_room() {
    // A key and its entry, as the map holds them with their hash and
    // their clock bit (room for up to twice `ENCODED_ENTRIES` of them):
    // udp.rs's bound.
    assert!(size_of::<(u64, Box<[u8]>, (super::encoded::Encoded, bool))>() <= 128);
}

#[test]
fn encoded_answers_are_bounded_in_bytes_as_well_as_in_number() {
    use super::encoded::{Encoded, EncodedAnswers, Valid};

    let index = Arc::new(cluster());
    let entry = |len: usize| Encoded {
        bytes: vec![0; len].into(),
        rcode: 0,
        truncated: false,
        valid: Valid::Index,
    };
    let mut encoded = EncodedAnswers::new(100, 200);
    let q = |name: &str| query_bytes(name, RecordType::A, None);
    encoded.put(&index, &q("a.example.org."), entry(300));
    assert_eq!(encoded.len(), 0, "larger than the whole bound");
    encoded.put(&index, &q("a.example.org."), entry(60));
    encoded.put(&index, &q("b.example.org."), entry(60));
    assert_eq!(encoded.len(), 2);
    encoded.put(&index, &q("b.example.org."), entry(60));
    assert_eq!(encoded.len(), 2, "a replaced answer counts once");
    encoded.put(&index, &q("c.example.org."), entry(60));
    assert_eq!(encoded.len(), 2, "over the bytes: one answer made room");
    let mut out = Vec::new();
    let now = std::time::Instant::now;
    let c = with_id(q("c.example.org."), 0);
    assert!(encoded.answer(&index, &c, 0, now, &mut out).is_some());
    // And over the count of entries: one at a time too.
    let mut few = EncodedAnswers::new(3, 1 << 20);
    for i in 0..10 {
        let name = format!("n{i}.example.org.");
        few.put(&index, &q(&name), entry(60));
        assert_eq!(few.len(), (i + 1).min(3));
        let asked = with_id(q(&name), 0);
        assert!(few.answer(&index, &asked, 0, now, &mut out).is_some());
    }
}
