use std::sync::Arc;

use super::*;
use crate::dataplane::fixtures::{cfg, ep, slice, svc};
use crate::state::HeldResource;
use switchyard_model::{ServiceType, TrafficPolicy};

fn state(services: Vec<ServiceState>) -> AgentState {
    let mut s = AgentState::default();
    for (i, svc) in services.into_iter().enumerate() {
        s.resources.insert(
            format!("default/shop/s{i}"),
            HeldResource {
                version: "v".into(),
                state: Arc::new(svc),
            },
        );
    }
    s
}

fn tcp(eps: &[&str]) -> ServiceState {
    let eps = eps.iter().map(|ip| ep(ip, "node-b")).collect();
    svc(Protocol::Tcp, vec![slice("w", Protocol::Tcp, 8080, eps)])
}

fn sets(e: &ServiceElements) -> BTreeSet<&str> {
    e.elements.iter().map(|e| e.set.as_str()).collect()
}

/// A partial sync's operations as nft text, without the marker's (see
/// `the_marker_moves_with_every_change_as_a_fresh_record_would`).
fn text(b: Option<Batch>) -> Option<String> {
    b.map(|b| {
        let mut t = String::new();
        b.write(&mut t, "ip switchyard");
        t.lines()
            .filter(|l| !l.contains(layout::DIGEST_SET))
            .map(|l| format!("{l}\n"))
            .collect()
    })
}

fn digest_of(st: &AgentState, cfg: &NodeConfig) -> u128 {
    Programmed::full_text(st, cfg, Family::V4).0.digest()
}

fn changed(name: &str) -> ChangeSet {
    ChangeSet {
        changed: vec![name.into()],
        removed: Vec::new(),
    }
}

#[test]
fn a_cluster_ip_is_its_frontend_and_one_slot_per_endpoint() {
    let e = service_elements(&tcp(&["10.244.2.2", "10.244.2.3"]), Family::V4, &cfg());
    assert_eq!(
        sets(&e),
        BTreeSet::from([
            "allocated_ips",
            "cluster_ips",
            "hairpin",
            "ip_frontends",
            "ip_main_slots"
        ])
    );
    assert!(
        e.elements
            .iter()
            .any(|e| e.set == "allocated_ips" && e.key == "10.96.0.10"),
        "its other ports are refused"
    );
    let slots: Vec<(&str, &str)> = e
        .elements
        .iter()
        .filter(|e| e.set == "ip_main_slots")
        .map(|e| (e.key.as_str(), e.data.as_str()))
        .collect();
    assert_eq!(
        slots,
        vec![
            // Class 2's range starts after class 1's one slot.
            ("10.96.0.10 . tcp . 80 . 1", "10.244.2.2 . 8080"),
            ("10.96.0.10 . tcp . 80 . 2", "10.244.2.3 . 8080"),
        ]
    );
    // No endpoints: only the REJECT set.
    let none = service_elements(&tcp(&[]), Family::V4, &cfg());
    assert_eq!(
        sets(&none),
        BTreeSet::from(["allocated_ips", "no_endpoints"])
    );
    // No IPv6 address: nothing in the ip6 table.
    assert!(
        service_elements(&tcp(&["10.244.2.2"]), Family::V6, &cfg())
            .elements
            .is_empty()
    );
}

#[test]
fn external_local_short_circuits_to_cluster_endpoints_and_drops_outside() {
    let mut s = tcp(&["10.244.2.2"]);
    s.service.service_type = ServiceType::NodePort;
    s.service.ports[0].node_port = Some(30080);
    s.service.external_traffic_policy = TrafficPolicy::Local;
    s.service.health_check_node_port = Some(32000);
    let e = service_elements(&s, Family::V4, &cfg());
    let got = sets(&e);
    for want in [
        "np_local",
        "np_short_slots",
        "np_no_local_endpoints",
        "node_ports",
        "health_checks",
    ] {
        assert!(got.contains(want), "{want} in {got:?}");
    }
    // No local endpoint on node-a: nothing in the node port's own map.
    assert!(!got.contains("np_main_slots"), "{got:?}");
}

#[test]
fn partial_is_element_operations_and_a_count_change_moves_classes() {
    let cfg = cfg();
    let before = state(vec![tcp(&["10.244.2.2", "10.244.2.3"])]);
    let (mut p, full) = Programmed::full_text(&before, &cfg, Family::V4);
    assert!(
        full.starts_with("add table ip switchyard\ndelete table ip switchyard\n"),
        "{full}"
    );
    assert!(
        full.contains("add element ip switchyard ip_main_slots {"),
        "{full}"
    );

    // One endpoint swapped: one map element replaced, one hairpin pair each way.
    let swapped = state(vec![tcp(&["10.244.2.2", "10.244.2.4"])]);
    let text =
        text(p.partial(&before, &swapped, &changed("default/shop/s0"), &cfg)).expect("elements");
    assert_eq!(
        text,
        "delete element ip switchyard hairpin { 10.244.2.3 . 10.244.2.3 }\n\
         delete element ip switchyard ip_main_slots { 10.96.0.10 . tcp . 80 . 2 }\n\
         add element ip switchyard hairpin { 10.244.2.4 . 10.244.2.4 }\n\
         add element ip switchyard ip_main_slots { 10.96.0.10 . tcp . 80 . 2 : 10.244.2.4 . 8080 }\n"
    );
    assert!(!text.contains("rule"), "{text}");

    // Three endpoints: the class-2 elements go, class-3 ones come (slots
    // 3..6, after classes 1 and 2), in the same map.
    let three = state(vec![tcp(&["10.244.2.2", "10.244.2.4", "10.244.2.5"])]);
    let text = self::text(p.partial(&swapped, &three, &changed("default/shop/s0"), &cfg))
        .expect("elements");
    assert!(text.contains("delete element ip switchyard ip_main_slots { 10.96.0.10 . tcp . 80 . 1, 10.96.0.10 . tcp . 80 . 2 }"), "{text}");
    assert!(text.contains("add element ip switchyard ip_main_slots { 10.96.0.10 . tcp . 80 . 3 : 10.244.2.2 . 8080, 10.96.0.10 . tcp . 80 . 4 : 10.244.2.4 . 8080, 10.96.0.10 . tcp . 80 . 5 : 10.244.2.5 . 8080 }"), "{text}");

    // Gone: every element goes; the same state again changes nothing.
    let removed = ChangeSet {
        changed: Vec::new(),
        removed: vec!["default/shop/s0".into()],
    };
    let text =
        self::text(p.partial(&three, &AgentState::default(), &removed, &cfg)).expect("elements");
    assert!(!text.contains("add "), "{text}");
    assert_eq!(p.element_count(), 0);
    let empty = AgentState::default();
    assert_eq!(
        self::text(p.partial(&empty, &empty, &changed("default/shop/s0"), &cfg)),
        Some(String::new())
    );
}

#[test]
fn shared_elements_go_with_their_last_owner_and_new_timeouts_add_rules() {
    let cfg = cfg();
    // Two Services on one endpoint: the hairpin pair is theirs together.
    let mut other = tcp(&["10.244.2.2"]);
    other.service.cluster_ips = vec!["10.96.0.11".parse().expect("ip")];
    let both = state(vec![tcp(&["10.244.2.2"]), other.clone()]);
    let (mut p, _) = Programmed::full_text(&both, &cfg, Family::V4);
    let mut one = both.clone();
    one.resources.remove("default/shop/s0");
    let removed = ChangeSet {
        changed: Vec::new(),
        removed: vec!["default/shop/s0".into()],
    };
    let text = text(p.partial(&both, &one, &removed, &cfg)).expect("elements");
    assert!(!text.contains("hairpin"), "still s1's: {text}");

    // The first Service with a 60 s affinity needs its rules: a full sync.
    let mut sticky = other;
    sticky.service.session_affinity_timeout = Some(60);
    let both = state(vec![tcp(&["10.244.2.2"]), sticky]);
    assert!(
        p.partial(&one, &both, &changed("default/shop/s1"), &cfg)
            .is_none()
    );
    assert_eq!(p.timeouts(), &BTreeSet::from([60]));
    let (p, full) = Programmed::full_text(&both, &cfg, Family::V4);
    assert!(full.contains("set affinity_60 {"), "{full}");
    assert!(
        full.contains("add element ip switchyard affinity_60 { 10.96.0.11 . tcp . 80 }"),
        "{full}"
    );
    // A second Service with the same timeout is elements only.
    let mut p = p;
    let mut third = tcp(&["10.244.2.3"]);
    third.service.cluster_ips = vec!["10.96.0.12".parse().expect("ip")];
    third.service.session_affinity_timeout = Some(60);
    let mut all = both.clone();
    all.resources.insert(
        "default/shop/s2".into(),
        HeldResource {
            version: "v".into(),
            state: Arc::new(third),
        },
    );
    let text =
        self::text(p.partial(&both, &all, &changed("default/shop/s2"), &cfg)).expect("elements");
    assert!(!text.contains("rule"), "{text}");
}

#[test]
fn udp_frontends_follow_the_udp_services_and_ipv6_affinity_is_flagged() {
    let cfg = cfg();
    let eps = vec![ep("10.244.2.2", "node-b")];
    let udp = svc(Protocol::Udp, vec![slice("d", Protocol::Udp, 5353, eps)]);
    let st = state(vec![tcp(&["10.244.2.3"]), udp]);
    let (mut p, _) = Programmed::full_text(&st, &cfg, Family::V4);
    assert_eq!(p.udp_frontends().len(), 1, "the UDP Service's cluster IP");
    // The UDP Service goes: nothing left to keep.
    let mut tcp_only = st.clone();
    tcp_only.resources.remove("default/shop/s1");
    let removed = ChangeSet {
        changed: Vec::new(),
        removed: vec!["default/shop/s1".into()],
    };
    p.partial(&st, &tcp_only, &removed, &cfg).expect("elements");
    assert!(p.udp_frontends().is_empty());

    // Sticky in IPv4, and flagged (not programmed) in IPv6.
    let mut sticky = tcp(&["10.244.2.3"]);
    sticky.service.session_affinity_timeout = Some(60);
    let v4 = service_elements(&sticky, Family::V4, &cfg);
    assert_eq!((v4.affinity, v4.affinity_unsupported), (Some(60), false));
    sticky.service.cluster_ips = vec!["fd00:96::12".parse().expect("ip")];
    sticky.slices[0].address_type = switchyard_model::AddressType::IPv6;
    sticky.slices[0].endpoints[0].addresses = vec!["fd00:244:2::3".parse().expect("ip")].into();
    let v6 = service_elements(&sticky, Family::V6, &cfg);
    assert!(!v6.elements.is_empty(), "an IPv6 frontend: {v6:?}");
    assert_eq!((v6.affinity, v6.affinity_unsupported), (None, true));
}

#[test]
fn the_marker_moves_with_every_change_as_a_fresh_record_would() {
    let cfg = cfg();
    let mut other = tcp(&["10.244.2.2"]);
    other.service.cluster_ips = vec!["10.96.0.11".parse().expect("ip")];
    let steps = [
        state(vec![tcp(&["10.244.2.2", "10.244.2.3"]), other.clone()]),
        // An endpoint swapped, then a class move.
        state(vec![tcp(&["10.244.2.2", "10.244.2.4"]), other.clone()]),
        state(vec![
            tcp(&["10.244.2.2", "10.244.2.4", "10.244.2.5"]),
            other.clone(),
        ]),
        // Back to one endpoint shared with s1 (their hairpin pair is shared).
        state(vec![tcp(&["10.244.2.2"]), other.clone()]),
    ];
    let (mut p, full) = Programmed::full_text(&steps[0], &cfg, Family::V4);
    let marker = |d: u128| format!("ip switchyard programmed {{ {} }}", digest_key(d));
    assert!(
        full.contains(&format!("add element {}", marker(p.digest()))),
        "{full}"
    );
    for w in steps.windows(2) {
        let was = p.digest();
        let batch = p
            .partial(&w[0], &w[1], &changed("default/shop/s0"), &cfg)
            .expect("elements");
        assert_eq!(
            p.digest(),
            digest_of(&w[1], &cfg),
            "the record after a change and a fresh one"
        );
        assert_ne!(p.digest(), was);
        let mut t = String::new();
        batch.write(&mut t, "ip switchyard");
        assert!(
            t.contains(&format!("delete element {}", marker(was))),
            "{t}"
        );
        assert!(
            t.contains(&format!("add element {}", marker(p.digest()))),
            "{t}"
        );
    }
    // s0 gone: its shared hairpin pair stays with s1, the rest goes.
    let mut last = steps[3].clone();
    last.resources.remove("default/shop/s0");
    let removed = ChangeSet {
        changed: Vec::new(),
        removed: vec!["default/shop/s0".into()],
    };
    p.partial(&steps[3], &last, &removed, &cfg)
        .expect("elements");
    assert_eq!(p.digest(), digest_of(&last, &cfg));
    // Nothing changed: no marker operations.
    let same = p
        .partial(&last, &last, &changed("default/shop/s1"), &cfg)
        .expect("elements");
    assert!(same.is_empty(), "{same:?}");
    // The same elements on another skeleton (another node setting) differ.
    let mut other_cfg = cfg.clone();
    other_cfg.masquerade_mark ^= 1;
    assert_ne!(digest_of(&last, &other_cfg), digest_of(&last, &cfg));
}

#[test]
fn a_large_record_moves_as_a_fresh_one_would() {
    // Some 7,000 elements: enough for the record's sorted array and its
    // merges (the tests above stay within its small map). Services i and
    // i + 250 share endpoint addresses, so some elements have two owners.
    let make = |i: usize, generation: usize| {
        let eps: Vec<String> = (0..10)
            .map(|e| format!("10.244.{}.{}", i % 250, e + 1 + generation * 20))
            .collect();
        let mut s = tcp(&eps.iter().map(String::as_str).collect::<Vec<_>>());
        s.service.cluster_ips = vec![
            format!("10.96.{}.{}", i / 250, i % 250 + 1)
                .parse()
                .expect("ip"),
        ];
        s
    };
    let cfg = cfg();
    let mut st = state((0..300).map(|i| make(i, 0)).collect());
    let (mut p, _) = Programmed::full_text(&st, &cfg, Family::V4);
    assert!(p.element_count() > 5_000, "{}", p.element_count());
    let mut apply = |st: &mut AgentState, name: String, to: Option<ServiceState>| {
        let old = st.clone();
        let change = match to {
            Some(s) => {
                st.resources.insert(
                    name.clone(),
                    HeldResource {
                        version: "v2".into(),
                        state: Arc::new(s),
                    },
                );
                changed(&name)
            }
            None => {
                st.resources.remove(&name);
                ChangeSet {
                    changed: Vec::new(),
                    removed: vec![name],
                }
            }
        };
        p.partial(&old, st, &change, &cfg).expect("no new timeout");
    };
    // Every third Service's endpoints move (new elements past an eighth
    // of the array: a merge), then every seventh Service leaves (marks
    // past a quarter: another).
    for i in (0..300).step_by(3) {
        apply(&mut st, format!("default/shop/s{i}"), Some(make(i, 1)));
    }
    for i in (1..300).step_by(7) {
        apply(&mut st, format!("default/shop/s{i}"), None);
    }
    let fresh = Programmed::full_text(&st, &cfg, Family::V4).0;
    assert_eq!(p.element_count(), fresh.element_count());
    assert_eq!(p.digest(), fresh.digest());
}
