//! Benchmark of stale-UDP-flow clean-up, in a network namespace it creates
//! and deletes. For each size S (UDP Services with three endpoints, one
//! live flow each, DNATed by the iptables data plane's rules):
//! - a reconciliation that finds nothing stale (the cost every sync now
//!   pays: one netlink dump of the UDP table), median of 5;
//! - every Service's endpoints moved: the reconciliation that deletes the
//!   S stale entries through netlink;
//! - beside it, the same deletions the way the agent did them before: one
//!   `conntrack -L` and one `conntrack -D ... --dst-nat ENDPOINT` process per
//!   stale filter that matches an entry.
//!
//! Run as root: `cargo run --release -p switchyard-integration-tests --bin bench_conntrack -- 100 1000`.
//! (`bench_conntrack send N` is the flow sender it runs inside the namespace.)

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use switchyard_agent::conntrack::{Conntrack, Desired};
use switchyard_agent::dataplane::{Change, DataPlane, Family, NodeConfig, Runner};
use switchyard_agent::endpoints::{self, NodeView};
use switchyard_agent::iptables::IptablesDataPlane;
use switchyard_agent::state::{AgentState, ChangeSet, HeldResource};
use switchyard_integration_tests::bench::{Netns, loadavg, ms};
use switchyard_model::{
    AddressType, Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServiceKey, ServicePort,
    ServiceState, TargetPort,
};

fn cluster_ip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

fn service(i: usize, generation: usize) -> ServiceState {
    let mut s = Service::new(ServiceKey::new("default", "bench", format!("u{i}")));
    s.cluster_ips = vec![cluster_ip(i).parse().expect("ip")];
    s.ports = vec![ServicePort {
        name: "dns".into(),
        protocol: Protocol::Udp,
        port: 53,
        target_port: TargetPort::Number(5353),
        node_port: None,
    }];
    let endpoints = (0..3)
        .map(|e| Endpoint {
            addresses: vec![
                format!(
                    "10.{}.{}.{}",
                    128 + e + 3 * generation,
                    i / 250,
                    i % 250 + 1
                )
                .parse()
                .expect("ip"),
            ]
            .into(),
            ..Endpoint::default()
        })
        .collect();
    ServiceState {
        service: s,
        slices: vec![EndpointSlice {
            name: format!("u{i}-1"),
            address_type: AddressType::IPv4,
            endpoints,
            ports: vec![EndpointPort {
                name: "dns".into(),
                protocol: Protocol::Udp,
                port: 5353,
            }],
            cluster: None,
            trigger_time_unix_nanos: None,
        }],
    }
}

fn state(n: usize, generation: usize) -> AgentState {
    let mut s = AgentState {
        version: format!("g{generation}"),
        ..AgentState::default()
    };
    for i in 0..n {
        let svc = service(i, generation);
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

fn desired(s: &AgentState) -> Desired {
    let node = NodeView {
        name: "bench",
        zone: None,
        addresses: &[],
        cluster: None,
    };
    let mut out = Desired::new();
    for held in s.resources.values() {
        for (f, serving) in endpoints::udp_frontends(&held.state, AddressType::IPv4, &node) {
            out.entry(f).or_default().extend(serving);
        }
    }
    out
}

fn sh(ns: &str, cmd: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One datagram from a fresh socket to each of the first `n` cluster IPs.
fn send(n: usize) {
    for i in 0..n {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        let to: SocketAddr = format!("{}:53", cluster_ip(i)).parse().expect("addr");
        let _ = sock.send_to(b"x", to);
    }
}

fn flows(ns: &str, n: usize) {
    let me = std::env::current_exe().expect("exe");
    let ok = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(me)
        .args(["send", &n.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "sending the flows");
}

fn udp_entries(ns: &str) -> usize {
    sh(ns, "conntrack -L -p udp 2>/dev/null").lines().count()
}

fn run(n: usize) -> serde_json::Value {
    let ns = Netns::new(&format!("ct-{n}"));
    sh(
        &ns.0,
        "ip link set lo up && ip link add v0 type veth peer name v1 && ip addr add 10.0.0.1/8 dev v0 && ip link set v0 up && ip link set v1 up",
    );
    let cfg = NodeConfig {
        node: "bench".into(),
        zone: None,
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
        nodeport_addresses: Vec::new(),
        service_cidrs: Vec::new(),
        masquerade_mark: 0x4000,
        localhost_nodeports: false,
        addresses: Vec::new(),
        cluster: None,
    };
    let mut dp = IptablesDataPlane::with_runner(cfg, vec![Family::V4], Runner::in_netns(&ns.0));
    let before = state(n, 0);
    let changes = ChangeSet {
        changed: before.resources.keys().cloned().collect(),
        removed: Vec::new(),
    };
    dp.apply(&Change {
        state: &before,
        changes: &changes,
        full: true,
    })
    .expect("full sync");
    flows(&ns.0, n);
    let live = udp_entries(&ns.0);
    let ct = Conntrack::in_netns(&ns.0);
    let none: [IpAddr; 0] = [];

    let kept = desired(&before);
    let mut idle: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let deleted = ct.reconcile(false, &kept, &none).expect("reconcile");
            assert_eq!(deleted, 0);
            ms(t.elapsed())
        })
        .collect();
    idle.sort_by(f64::total_cmp);

    let moved = desired(&state(n, 1));
    let t = Instant::now();
    let deleted = ct.reconcile(false, &moved, &none).expect("reconcile");
    let netlink_delete = ms(t.elapsed());
    let left_after_netlink = udp_entries(&ns.0);

    // The same flows again, cleared the old way.
    flows(&ns.0, n);
    let t = Instant::now();
    let listing = sh(&ns.0, "conntrack -L -p udp 2>/dev/null");
    let mut filters = BTreeSet::new();
    for line in listing.lines() {
        let values = |key: &str| -> Vec<String> {
            line.split_whitespace()
                .filter_map(|w| w.strip_prefix(key))
                .map(str::to_owned)
                .collect()
        };
        if let (Some(dst), Some(ep)) = (
            values("dst=").first().cloned(),
            values("src=").get(1).cloned(),
        ) {
            filters.insert((dst, ep));
        }
    }
    for (dst, ep) in &filters {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.0,
                "conntrack",
                "-D",
                "-f",
                "ipv4",
                "-p",
                "udp",
            ])
            .args(["--orig-dst", dst, "--orig-port-dst", "53", "--dst-nat", ep])
            .output();
    }
    let processes = ms(t.elapsed());
    serde_json::json!({
        "services": n,
        "live_udp_entries": live,
        "reconcile_nothing_stale_ms_p50": (idle[2] * 10.0).round() / 10.0,
        "netlink_delete_all_ms": (netlink_delete * 10.0).round() / 10.0,
        "netlink_deleted": deleted,
        "left_after_netlink": left_after_netlink,
        "conntrack_processes": filters.len() + 1,
        "conntrack_processes_ms": (processes * 10.0).round() / 10.0,
        "left_after_processes": udp_entries(&ns.0),
        "loadavg": loadavg(),
    })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("send") {
        send(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(0));
        return;
    }
    let sizes: Vec<usize> = if args.is_empty() {
        vec![100, 1000]
    } else {
        args.iter().filter_map(|a| a.parse().ok()).collect()
    };
    for n in sizes {
        println!("{}", run(n));
    }
}
