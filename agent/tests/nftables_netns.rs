//! The nftables data plane against the real kernel, inside a network
//! namespace this test creates (and deletes, also on failure): a
//! transaction the kernel refuses is a NACK and the last good state stays
//! in force; `nft flush table` (rules gone, sets and elements kept) is
//! noticed and restored; a full sync keeps the clients the affinity map
//! remembers.

use std::sync::Arc;

use switchyard_agent::applier::{Applier, ApplyFailure};
use switchyard_agent::dataplane::{Change, DataPlane, Family, NodeConfig};
use switchyard_agent::nftables::NftablesDataPlane;
use switchyard_agent::state::{AgentState, ChangeSet, HeldResource};
use switchyard_agent::status::{Metrics, Status};
use switchyard_agent::store::Store;
use switchyard_model::{
    AddressType, Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServiceKey, ServicePort,
    ServiceState, TargetPort,
};
use switchyard_proto::v1;

mod support;
use support::Netns;

/// A namespace for the nftables data plane; `None` (with a note) where
/// one cannot be made or libnftables is missing.
fn nft_netns(tag: &str) -> Option<Netns> {
    let ns = Netns::new(&format!("nft-{tag}"))?;
    if switchyard_libnftables::Nft::open().is_err() {
        eprintln!("skipping: libnftables1 is not installed");
        return None;
    }
    Some(ns)
}

/// Runs `nft ARGS` in `ns`: (success, stdout and stderr).
fn nft(ns: &Netns, args: &str) -> (bool, String) {
    let out = ns.run(&format!("nft {args}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `default/shop/NAME`: ClusterIP `ip`:80/TCP to `eps` on 8080.
fn service(name: &str, ip: &str, eps: &[&str], affinity: Option<u32>) -> ServiceState {
    let mut s = Service::new(ServiceKey::new("default", "shop", name));
    s.cluster_ips = vec![ip.parse().expect("ip")];
    s.session_affinity_timeout = affinity;
    s.ports = vec![ServicePort {
        name: "p".into(),
        protocol: Protocol::Tcp,
        port: 80,
        target_port: TargetPort::Number(8080),
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
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            cluster: None,
            trigger_time_unix_nanos: None,
        }],
    }
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

fn update(version: &str, services: &[ServiceState]) -> v1::SnapshotUpdate {
    v1::SnapshotUpdate {
        snapshot_version: version.into(),
        nonce: version.into(),
        resources: services
            .iter()
            .map(|s| v1::Resource {
                name: s.service.key.to_string(),
                version: format!("{version}-{}", s.service.key),
                service_state: switchyard_proto::convert::encode_state_bytes(s),
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_refused_transaction_is_a_nack_and_the_last_good_state_stays() {
    let Some(ns) = nft_netns("nack") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = Store::open(dir.path()).expect("store");
    let dp = NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &ns.0);
    let status = Arc::new(Status::new(
        "node-a".into(),
        "default".into(),
        None,
        "nftables",
    ));
    let mut applier = Applier::new(store, Box::new(dp), status, Arc::new(Metrics::new()));

    let one = service("web", "10.96.0.20", &["10.244.1.3"], None);
    applier
        .apply_update(&update("v1", std::slice::from_ref(&one)))
        .await
        .expect("v1 ACKed");
    let (_, main) = nft(&ns, "list map ip switchyard ip_main_slots");
    assert!(
        main.contains("10.96.0.20 . tcp . 80 . 0 : 10.244.1.3 . 8080"),
        "{main}"
    );

    // Someone else holds a slot the next state needs (class 2: slots 1
    // and 2), with other data: the kernel refuses the whole transaction
    // (EEXIST).
    let (ok, out) = nft(
        &ns,
        "add element ip switchyard ip_main_slots '{ 10.96.0.20 . tcp . 80 . 2 : 10.9.9.9 . 1 }'",
    );
    assert!(ok, "{out}");
    let two = service("web", "10.96.0.20", &["10.244.1.3", "10.244.1.4"], None);
    let e = applier
        .apply_update(&update("v2", std::slice::from_ref(&two)))
        .await
        .expect_err("the kernel refuses v2");
    assert!(matches!(e, ApplyFailure::DataPlane(_)), "{e:?}");
    assert!(
        e.nack_detail().contains("File exists"),
        "the NACK says why: {}",
        e.nack_detail()
    );
    assert_eq!(applier.state().version, "v1", "v1 stays in force");
    // In the kernel: v1's endpoint, nothing of v2 (the full resync of the
    // last good state replaced the table, the intruder with it).
    let (_, main) = nft(&ns, "list map ip switchyard ip_main_slots");
    assert!(
        main.contains("10.96.0.20 . tcp . 80 . 0 : 10.244.1.3 . 8080"),
        "{main}"
    );
    assert!(
        !main.contains("10.244.1.4") && !main.contains("10.9.9.9"),
        "{main}"
    );

    // The same update once nothing is in the way: ACKed, in force.
    applier
        .apply_update(&update("v2", std::slice::from_ref(&two)))
        .await
        .expect("v2 ACKed");
    let (_, main) = nft(&ns, "list map ip switchyard ip_main_slots");
    assert!(
        main.contains("10.96.0.20 . tcp . 80 . 2 : 10.244.1.4 . 8080"),
        "{main}"
    );
    assert!(
        !main.contains(". 0 : 10.244.1.3"),
        "class 1's slot went: {main}"
    );
}

fn state(services: Vec<ServiceState>) -> AgentState {
    let mut s = AgentState {
        version: "v".into(),
        ..AgentState::default()
    };
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

fn apply(dp: &mut NftablesDataPlane, s: &AgentState, full: bool) {
    let changes = ChangeSet {
        changed: s.resources.keys().cloned().collect(),
        removed: Vec::new(),
    };
    dp.apply(&Change {
        state: s,
        changes: &changes,
        full,
    })
    .unwrap_or_else(|e| panic!("apply: {}", switchyard_proto::tls::chain(&e)));
}

#[test]
fn a_flushed_table_is_restored_and_a_full_sync_keeps_affinity() {
    let Some(ns) = nft_netns("flush") else {
        return;
    };
    let mut dp = NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &ns.0);
    let s = state(vec![service(
        "sticky",
        "10.96.0.12",
        &["10.244.1.2", "10.244.1.3"],
        Some(600),
    )]);
    apply(&mut dp, &s, true);
    dp.maintain().expect("nothing to restore");

    // A client the kernel remembered (as the affinity rule adds it), and
    // one remembered for an endpoint the frontend no longer has.
    let (ok, out) = nft(
        &ns,
        "add element ip switchyard affinity_ip '{ 10.244.2.9 . 10.96.0.12 . tcp . 80 timeout 600s : 10.244.1.3 . 8080, 10.244.2.8 . 10.96.0.12 . tcp . 80 timeout 600s : 10.244.1.77 . 8080 }'",
    );
    assert!(ok, "{out}");

    // `nft flush table`: rules gone, the table and its elements stay.
    let (ok, out) = nft(&ns, "flush table ip switchyard");
    assert!(ok, "{out}");
    let (_, chain) = nft(&ns, "list chain ip switchyard nat_prerouting");
    assert!(!chain.contains("jump services"), "{chain}");
    dp.maintain().expect("maintain restores");
    let (_, chain) = nft(&ns, "list chain ip switchyard nat_prerouting");
    assert!(
        chain.contains("jump services"),
        "the rules are back: {chain}"
    );

    // The full sync that restored the rules kept the live client, with
    // what was left of its time, and not the stale one.
    let (_, remembered) = nft(&ns, "list map ip switchyard affinity_ip");
    assert!(
        remembered.contains("10.244.2.9 . 10.96.0.12 . tcp . 80")
            && remembered.contains(": 10.244.1.3 . 8080"),
        "{remembered}"
    );
    assert!(!remembered.contains("10.244.1.77"), "{remembered}");

    // And a full sync asked for (a restarted agent) keeps it too.
    let mut restarted = NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &ns.0);
    apply(&mut restarted, &s, true);
    let (_, remembered) = nft(&ns, "list map ip switchyard affinity_ip");
    assert!(
        remembered.contains("10.244.2.9 . 10.96.0.12"),
        "{remembered}"
    );

    // A whole-ruleset flush is noticed as before.
    let (ok, out) = nft(&ns, "flush ruleset");
    assert!(ok, "{out}");
    restarted.maintain().expect("maintain restores");
    let (_, chain) = nft(&ns, "list chain ip switchyard nat_prerouting");
    assert!(chain.contains("jump services"), "{chain}");
}
