//! The iptables data plane against the real kernel, inside a network
//! namespace this test creates (and deletes, also on failure): full and
//! partial syncs, a refused transaction, the canary, cleanup, stale UDP
//! flows cleared through netlink after partial and full syncs, and syncs
//! large enough to be split into pieces.

use std::sync::Arc;

use switchyard_agent::dataplane::{Change, DataPlane, Family, NodeConfig, Runner};
use switchyard_agent::iptables::{IptablesDataPlane, cleanup};
use switchyard_agent::state::{AgentState, ChangeSet, HeldResource};
use switchyard_model::{
    AddressType, Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServiceKey, ServicePort,
    ServiceState, TargetPort,
};

mod support;
use support::Netns;

fn service(name: &str, ip: &str, eps: &[&str]) -> ServiceState {
    let mut s = Service::new(ServiceKey::new("default", "shop", name));
    s.cluster_ips = vec![ip.parse().expect("ip")];
    s.ports = vec![ServicePort {
        name: "p".into(),
        protocol: Protocol::Udp,
        port: 53,
        target_port: TargetPort::Number(5353),
        node_port: None,
    }];
    ServiceState {
        service: s,
        slices: vec![EndpointSlice {
            name: format!("{name}-1"),
            address_type: AddressType::IPv4,
            endpoints: eps
                .iter()
                .map(|ip| Endpoint {
                    addresses: vec![ip.parse().expect("ip")].into(),
                    ..Endpoint::default()
                })
                .collect(),
            ports: vec![EndpointPort {
                name: "p".into(),
                protocol: Protocol::Udp,
                port: 5353,
            }],
            cluster: None,
            trigger_time_unix_nanos: None,
        }],
    }
}

fn state(version: &str, services: Vec<ServiceState>) -> AgentState {
    let mut s = AgentState {
        version: version.into(),
        ..AgentState::default()
    };
    for svc in services {
        s.resources.insert(
            svc.service.key.to_string(),
            HeldResource {
                version: version.into(),
                state: Arc::new(svc),
            },
        );
    }
    s
}

fn cfg() -> NodeConfig {
    NodeConfig {
        node: "node-a".into(),
        zone: None,
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
        nodeport_addresses: Vec::new(),
        service_cidrs: Vec::new(),
        masquerade_mark: 0x4000,
        localhost_nodeports: true,
        addresses: Vec::new(),
        cluster: None,
    }
}

fn changed(names: &[&str]) -> ChangeSet {
    ChangeSet {
        changed: names.iter().map(|n| format!("default/shop/{n}")).collect(),
        removed: Vec::new(),
    }
}

fn apply(
    dp: &mut impl DataPlane,
    s: &AgentState,
    names: &[&str],
    full: bool,
) -> Result<(), String> {
    dp.apply(&Change {
        state: s,
        changes: &changed(names),
        full,
    })
    .map_err(|e| switchyard_proto::tls::chain(&e))
}

/// The name of the endpoint chain that DNATs to `ip`.
fn sep_chain_for(saved: &str, ip: &str) -> String {
    saved
        .lines()
        .filter_map(|l| l.strip_prefix("-A "))
        .find(|l| l.starts_with("SWY-SEP-") && l.contains(&format!("--to-destination {ip}:")))
        .and_then(|l| l.split_whitespace().next())
        .expect("an endpoint chain")
        .to_owned()
}

const PORTALS: &str =
    "-A PREROUTING -m comment --comment \"switchyard service portals\" -j SWY-SERVICES";

#[test]
fn syncs_canary_failure_and_cleanup_in_a_namespace() {
    let Some(ns) = Netns::new("dp") else { return };
    let runner = || Runner::in_netns(&ns.0);
    let families = vec![Family::V4, Family::V6];
    let mut dp = IptablesDataPlane::with_runner(cfg(), families.clone(), runner());
    // Someone else's rules, which we must never touch.
    ns.sh("iptables -t nat -N OTHER && iptables -t nat -A PREROUTING -j OTHER && iptables -t nat -A OTHER -j RETURN");

    let s1 = state(
        "v1",
        vec![
            service("dns", "10.96.0.10", &["10.244.1.2", "10.244.2.2"]),
            service("web", "10.96.0.20", &["10.244.1.3"]),
        ],
    );
    apply(&mut dp, &s1, &["dns", "web"], true).expect("full sync");
    let nat = ns.sh("iptables-save -t nat | grep -v '^#'");
    assert!(nat.contains(PORTALS), "{nat}");
    assert_eq!(nat.matches("-j DNAT").count(), 3, "{nat}");
    assert!(
        nat.contains("-A SWY-SB-0A -d 10.96.0.10/32 -p udp"),
        "{nat}"
    );
    let rules = dp.rule_count();

    // A second full sync (a restarted agent) is idempotent: no duplicate jumps.
    let mut restarted = IptablesDataPlane::with_runner(cfg(), families, runner());
    apply(&mut restarted, &s1, &["dns", "web"], true).expect("full sync again");
    assert_eq!(ns.sh("iptables-save -t nat | grep -v '^#'"), nat);
    assert_eq!(restarted.rule_count(), rules);

    // Partial: one endpoint goes.
    let s2 = state(
        "v2",
        vec![
            service("dns", "10.96.0.10", &["10.244.1.2"]),
            service("web", "10.96.0.20", &["10.244.1.3"]),
        ],
    );
    apply(&mut dp, &s2, &["dns"], false).expect("partial sync");
    let nat2 = ns.sh("iptables-save -t nat");
    assert_eq!(nat2.matches("-j DNAT").count(), 2, "{nat2}");
    assert!(!nat2.contains("10.244.2.2"));
    assert!(nat2.contains("-A OTHER -j RETURN"));

    // A transaction the kernel refuses: a chain of ours that someone else
    // references cannot be deleted. The error is iptables'; the last good
    // rules stay in force.
    let sep = sep_chain_for(&nat2, "10.244.1.3");
    ns.sh(&format!("iptables -t nat -A OTHER -j {sep}"));
    let s3 = state(
        "v3",
        vec![
            service("dns", "10.96.0.10", &["10.244.1.2"]),
            service("web", "10.96.0.20", &["10.244.1.4"]),
        ],
    );
    let err = apply(&mut dp, &s3, &["web"], false).expect_err("refused");
    assert!(err.contains("iptables-restore"), "{err}");
    let nat3 = ns.sh("iptables-save -t nat");
    assert!(
        nat3.contains("10.244.1.3:5353") && !nat3.contains("10.244.1.4"),
        "{nat3}"
    );
    ns.sh(&format!("iptables -t nat -D OTHER -j {sep}"));
    apply(&mut dp, &s3, &["web"], false).expect("accepted once the reference is gone");
    assert!(ns.sh("iptables-save -t nat").contains("10.244.1.4:5353"));

    // Someone flushes the nat table: the canary sees it, the rules come back.
    ns.sh("iptables -t nat -F");
    dp.maintain().expect("maintain");
    let nat4 = ns.sh("iptables-save -t nat");
    assert!(nat4.contains(PORTALS), "{nat4}");
    assert!(nat4.contains("10.244.1.4:5353"), "{nat4}");
    dp.maintain().expect("nothing to do");

    // Cleanup leaves nothing of ours, and others' rules in place.
    ns.sh("iptables -t nat -A PREROUTING -j OTHER");
    cleanup(&runner()).expect("cleanup");
    let all = ns.sh("iptables-save; ip6tables-save");
    assert!(!all.contains("SWY-"), "{all}");
    assert!(all.contains("-A PREROUTING -j OTHER"), "{all}");
}

/// Our lines in a namespace's rules, sorted (partial syncs insert bucket
/// jumps at the top of `SWY-SERVICES`, full syncs write them in order).
fn ours(ns: &Netns) -> Vec<String> {
    let mut v: Vec<String> = ns
        .sh("iptables-save")
        .lines()
        .filter(|l| l.contains("SWY-"))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// `n` TCP Services with three endpoints each; `generation` moves every
/// endpoint. (TCP: no conntrack clean-up runs for the moved endpoints.)
fn many(n: usize, generation: usize) -> AgentState {
    let services = (0..n)
        .map(|i| {
            let eps: Vec<String> = (0..3)
                .map(|e| {
                    format!(
                        "10.{}.{}.{}",
                        128 + e + 3 * generation,
                        i / 250,
                        i % 250 + 1
                    )
                })
                .collect();
            let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
            let mut s = service(
                &format!("s{i}"),
                &format!("10.96.{}.{}", i / 250, i % 250 + 1),
                &eps,
            );
            s.service.ports[0].protocol = Protocol::Tcp;
            s.slices[0].ports[0].protocol = Protocol::Tcp;
            s
        })
        .collect();
    state("v", services)
}

#[test]
fn large_syncs_in_pieces_match_one_transaction() {
    use switchyard_agent::iptables::sync::{Existing, FamilyTables};

    let Some(split) = Netns::new("split") else {
        return;
    };
    let Some(whole) = Netns::new("whole") else {
        return;
    };
    let restore = |ns: &Netns, texts: &[String]| {
        for t in texts {
            Runner::in_netns(&ns.0)
                .restore(Family::V4, t)
                .expect("restore");
        }
    };

    // 700 Services: about 2,800 chains, so the data plane's full sync runs
    // in several pieces; the other namespace gets the same rules unsplit.
    let before = many(700, 0);
    let mut dp =
        IptablesDataPlane::with_runner(cfg(), vec![Family::V4], Runner::in_netns(&split.0));
    let names: Vec<String> = (0..700).map(|i| format!("s{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    apply(&mut dp, &before, &names, true).expect("full sync");
    let (mut record, texts) = FamilyTables::full_texts(
        &before,
        &cfg(),
        &Existing::default(),
        Family::V4,
        usize::MAX,
    );
    restore(&whole, &texts);
    assert_eq!(ours(&split), ours(&whole));

    // 500 of them change every endpoint in one update: a partial sync of
    // about 4,000 chains, which the data plane splits.
    let mut after = many(700, 1);
    for i in 500..700 {
        let name = format!("default/shop/s{i}");
        let kept = before.resources[&name].clone();
        after.resources.insert(name, kept);
    }
    apply(&mut dp, &after, &names[..500], false).expect("partial sync");
    let tx = record.partial(&after, &changed(&names[..500]), &cfg(), usize::MAX);
    assert_eq!(tx.texts.len(), 1);
    restore(&whole, &tx.texts);
    let split_rules = ours(&split);
    assert_eq!(split_rules, ours(&whole));
    assert_eq!(
        split_rules.iter().filter(|l| l.contains("-j DNAT")).count(),
        2100
    );

    // A restarted agent over these rules changes nothing.
    let mut restarted =
        IptablesDataPlane::with_runner(cfg(), vec![Family::V4], Runner::in_netns(&split.0));
    apply(&mut restarted, &after, &names, true).expect("full sync over intact rules");
    assert_eq!(ours(&split), split_rules);
}

#[test]
fn stale_udp_flows_are_cleared_after_partial_and_full_syncs() {
    let Some(ns) = Netns::new("ct") else { return };
    let mut dp = IptablesDataPlane::with_runner(cfg(), vec![Family::V4], Runner::in_netns(&ns.0));
    let udp = |generation: usize, changed: usize| {
        let services = (0..10)
            .map(|i| {
                let g = if i < changed { generation } else { 0 };
                let eps: Vec<String> = (0..3)
                    .map(|e| format!("10.{}.0.{}", 128 + e + 3 * g, i + 1))
                    .collect();
                let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
                service(&format!("u{i}"), &format!("10.96.0.{}", i + 1), &eps)
            })
            .collect();
        state("v", services)
    };
    let names: Vec<String> = (0..10).map(|i| format!("u{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    apply(&mut dp, &udp(0, 0), &names, true).expect("full sync");
    // One live flow per Service: a datagram from this namespace, DNATed by
    // our rules on its way out of a veth.
    ns.sh("ip link add v0 type veth peer name v1 && ip addr add 10.0.0.1/8 dev v0 && ip link set v0 up && ip link set v1 up");
    for i in 0..10 {
        ns.sh(&format!("bash -c 'echo x > /dev/udp/10.96.0.{}/53'", i + 1));
    }
    let flows = ns.sh("conntrack -L -p udp 2>/dev/null");
    assert_eq!(
        flows.lines().count(),
        10,
        "one UDP flow per Service (is the conntrack tool installed? .ci/run installs it): {flows}"
    );

    // Five Services move every endpoint in one update: their flows go
    // (through netlink, inside this namespace), the others stay.
    apply(&mut dp, &udp(1, 5), &names[..5], false).expect("partial sync");
    let left = ns.sh("conntrack -L -p udp 2>/dev/null");
    assert_eq!(left.lines().count(), 5, "{left}");
    for i in 5..10 {
        assert!(left.contains(&format!("dst=10.96.0.{} ", i + 1)), "{left}");
    }

    // Flows sent while none of our rules existed were never translated; the
    // next agent's first (full) sync clears them, so they meet the rules.
    cleanup(&Runner::in_netns(&ns.0)).expect("cleanup");
    // A node keeps tracking connections without us (CNI and firewall
    // rules); without any rule that needs conntrack the kernel would not.
    ns.sh("iptables -A OUTPUT -m conntrack --ctstate INVALID -j DROP");
    ns.sh("conntrack -F 2>/dev/null");
    for i in 0..3 {
        ns.sh(&format!("bash -c 'echo x > /dev/udp/10.96.0.{}/53'", i + 1));
    }
    let untranslated = ns.sh("conntrack -L -p udp 2>/dev/null");
    assert_eq!(untranslated.lines().count(), 3, "{untranslated}");
    assert!(
        untranslated
            .lines()
            .all(|l| l.matches("10.96.0.").count() == 2),
        "reply from the cluster IP itself: {untranslated}"
    );
    let mut restarted =
        IptablesDataPlane::with_runner(cfg(), vec![Family::V4], Runner::in_netns(&ns.0));
    apply(&mut restarted, &udp(1, 5), &names, true).expect("full sync");
    let left = ns.sh("conntrack -L -p udp 2>/dev/null");
    assert_eq!(left.lines().count(), 0, "{left}");
}

#[test]
fn starting_in_one_mode_removes_the_other_modes_rules() {
    let Some(ns) = Netns::new("mode") else { return };
    let st = state("v1", vec![service("dns", "10.96.0.10", &["10.244.1.5"])]);
    let names = ["default/shop/dns"];
    let mut nft =
        switchyard_agent::nftables::NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &ns.0);
    apply(&mut nft, &st, &names, true).expect("nftables full sync");
    assert!(
        ns.sh("nft list tables").contains("table ip switchyard"),
        "the nftables plane's table"
    );
    // The iptables plane starts in the same namespace: its first sync
    // removes the nftables tables and puts its own chains in.
    let mut ipt = IptablesDataPlane::with_runner(cfg(), vec![Family::V4], Runner::in_netns(&ns.0));
    apply(&mut ipt, &st, &names, true).expect("iptables full sync");
    let tables = ns.sh("nft list tables");
    assert!(
        !tables.contains("switchyard"),
        "nftables tables left: {tables}"
    );
    assert!(ns.sh("iptables-save -t nat").contains("SWY-SERVICES"));
    // And back: the nftables plane removes the iptables chains.
    let mut nft =
        switchyard_agent::nftables::NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &ns.0);
    apply(&mut nft, &st, &names, true).expect("nftables full sync again");
    let nat = ns.sh("iptables-save -t nat");
    assert!(!nat.contains("SWY-"), "iptables chains left: {nat}");
}
