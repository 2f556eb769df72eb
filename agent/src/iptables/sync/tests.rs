use std::sync::Arc;

use super::*;
use crate::iptables::rules::tests::{cfg, ep, slice, svc};
use crate::state::HeldResource;
use switchyard_model::{Protocol, ServiceKey, ServiceState};

fn state(services: Vec<ServiceState>) -> AgentState {
    let mut s = AgentState::default();
    for svc in services {
        s.resources.insert(
            svc.service.key.to_string(),
            HeldResource {
                version: "v".into(),
                state: Arc::new(svc),
            },
        );
    }
    s
}

fn named(mut s: ServiceState, name: &str, ip: &str) -> ServiceState {
    s.service.key = ServiceKey::new("default", "shop", name);
    s.service.cluster_ips = vec![ip.parse().expect("ip")];
    s
}

fn two_services(web_eps: &[&str]) -> AgentState {
    let eps = web_eps.iter().map(|ip| ep(ip, "node-b")).collect();
    state(vec![
        named(
            svc(Protocol::Udp, vec![slice("w", Protocol::Udp, 8080, eps)]),
            "web",
            "10.96.0.10",
        ),
        named(
            svc(
                Protocol::Tcp,
                vec![slice(
                    "a",
                    Protocol::Tcp,
                    8080,
                    vec![ep("10.244.9.9", "node-b")],
                )],
            ),
            "api",
            "10.96.0.11",
        ),
    ])
}

fn lines_starting<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

#[test]
fn full_sync_writes_everything_and_removes_leftovers() {
    let mut existing = Existing::default();
    existing.parse(
        Table::Nat,
        "*nat\n:PREROUTING ACCEPT [0:0]\n:SWY-SEP-OLD - [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -m comment --comment \"switchyard service portals\" -j SWY-SERVICES\n-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n",
    );
    assert_eq!(existing.jumps.len(), 1);
    let (tables, tx) = FamilyTables::full(
        &two_services(&["10.244.1.1"]),
        &cfg(),
        &existing,
        Family::V4,
    );
    let t = &tx.text;
    assert!(t.starts_with("*nat\n"));
    assert_eq!(t.matches("COMMIT").count(), 2);
    assert!(t.contains(":SWY-SERVICES - [0:0]\n"));
    assert!(t.contains("-A SWY-SERVICES -d 0.0.0.10/0.0.0.255 -j SWY-SB-0A\n"));
    assert!(t.contains("-A SWY-SERVICES -d 0.0.0.11/0.0.0.255 -j SWY-SB-0B\n"));
    assert!(t.contains("-X SWY-SEP-OLD\n"), "leftover chain deleted");
    assert!(!t.contains("KUBE-"), "chains we do not own are never named");
    // PREROUTING's jump exists; the others are inserted.
    assert!(!t.contains("-I PREROUTING"));
    assert!(t.contains(
        "-I OUTPUT 1 -m comment --comment \"switchyard service portals\" -j SWY-SERVICES\n"
    ));
    assert!(t.contains("-I FORWARD 1 -m conntrack --ctstate NEW"));
    assert!(tables.rule_count() > 10);
    // The nodeports jump is the last rule of SWY-SERVICES.
    let services = lines_starting(t, "-A SWY-SERVICES ");
    assert!(
        services
            .last()
            .expect("rules")
            .ends_with("-j SWY-NODEPORTS")
    );
}

#[test]
fn partial_sync_touches_only_the_changed_service() {
    let before = two_services(&["10.244.1.1", "10.244.1.2"]);
    let (mut tables, _) = FamilyTables::full(&before, &cfg(), &Existing::default(), Family::V4);
    let rules_before = tables.rule_count();
    let after = two_services(&["10.244.1.1"]);
    let changes = ChangeSet {
        changed: vec!["default/shop/web".into()],
        removed: Vec::new(),
    };
    let tx = tables.partial(&after, &changes, &cfg());
    let t = &tx.text;
    assert!(
        !t.contains(":SWY-SERVICES "),
        "dispatch chain not rewritten: {t}"
    );
    assert!(
        !t.contains("10.96.0.11"),
        "the other service is not touched: {t}"
    );
    assert!(
        t.contains(":SWY-SB-0A - [0:0]\n"),
        "its bucket is rewritten"
    );
    assert_eq!(
        lines_starting(t, "-X SWY-SEP-").len(),
        1,
        "the gone endpoint's chain: {t}"
    );
    assert!(!t.contains("*filter"), "nothing changed in filter");
    assert_eq!(
        tx.conntrack,
        vec![ConntrackFlush::Endpoint {
            destination: UdpDestination::Ip("10.96.0.10".parse().expect("ip"), 80),
            endpoint: "10.244.1.2".parse().expect("ip"),
        }]
    );
    assert_eq!(
        tables.rule_count(),
        rules_before - 3,
        "one SVC rule and two SEP rules fewer"
    );

    // The last endpoint goes: the service moves to a REJECT in a new filter bucket.
    let empty = two_services(&[]);
    let tx = tables.partial(&empty, &changes, &cfg());
    assert!(tx.text.contains("*filter\n:SWY-FB-0A - [0:0]\n"));
    assert!(
        tx.text
            .contains("-I SWY-SERVICES 1 -d 0.0.0.10/0.0.0.255 -j SWY-FB-0A\n")
    );
    assert!(tx.text.contains("-j REJECT"));
    assert!(lines_starting(&tx.text, "-X SWY-SVC-").len() == 1);
    // An endpoint comes back: flows that were refused are cleared.
    let tx = tables.partial(&before, &changes, &cfg());
    assert!(
        tx.conntrack
            .contains(&ConntrackFlush::Destination(UdpDestination::Ip(
                "10.96.0.10".parse().expect("ip"),
                80
            )))
    );
    assert!(
        !tx.text.contains("-I SWY-SERVICES"),
        "the bucket jump exists already"
    );

    // Removal deletes its chains and empties its bucket.
    let gone = state(vec![]);
    let tx = tables.partial(
        &gone,
        &ChangeSet {
            changed: Vec::new(),
            removed: vec!["default/shop/web".into(), "default/shop/api".into()],
        },
        &cfg(),
    );
    assert!(tx.text.contains(":SWY-SB-0A - [0:0]\n"));
    assert!(!tx.text.contains("-A SWY-SB-0A"));
    assert_eq!(tables.rule_count(), {
        let (fresh, _) = FamilyTables::full(&gone, &cfg(), &Existing::default(), Family::V4);
        // Three bucket jumps (nat 0A and 0B, filter 0A) stay until the next full sync.
        fresh.rule_count() + 3
    });
}

#[test]
fn cleanup_removes_our_jumps_and_chains_only() {
    let mut existing = Existing::default();
    existing.parse(
        Table::Nat,
        ":PREROUTING ACCEPT [0:0]\n:SWY-SERVICES - [0:0]\n:DOCKER - [0:0]\n-A PREROUTING -m comment --comment \"switchyard service portals\" -j SWY-SERVICES\n-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n-A SWY-SERVICES -j SWY-NODEPORTS\n",
    );
    let t = cleanup(&existing);
    assert_eq!(
        t,
        "*nat\n:SWY-SERVICES - [0:0]\n-D PREROUTING -m comment --comment \"switchyard service portals\" -j SWY-SERVICES\n-X SWY-SERVICES\nCOMMIT\n"
    );
    assert_eq!(cleanup(&Existing::default()), "");
}
