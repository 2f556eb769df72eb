//! Benchmark of the iptables data plane, in network namespaces it creates
//! and deletes. For each size (services x 10 endpoints):
//! - full sync (save + generate + one restore) into a fresh namespace,
//!   beside a plain `iptables-restore --noflush` of the same text into
//!   another fresh namespace;
//! - one endpoint changed (partial sync), median of several;
//! - resident memory of the state plus the data plane's record.
//!
//! Run as root: `cargo run --release -p switchyard-integration-tests --bin bench_iptables`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_agent::dataplane::{Change, DataPlane};
use switchyard_agent::iptables::sync::{Existing, FamilyTables};
use switchyard_agent::iptables::{Family, IptablesDataPlane, NodeConfig, Runner};
use switchyard_agent::state::{AgentState, ChangeSet, HeldResource};
use switchyard_model::{
    AddressType, Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServiceKey, ServicePort,
    ServiceState, TargetPort,
};

struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("swy-bench-{tag}-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot create a network namespace (run as root)");
        Self(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn service(i: usize, generation: u32) -> ServiceState {
    let mut s = Service::new(ServiceKey::new("default", "bench", format!("svc-{i}")));
    s.cluster_ips = vec![
        format!("10.96.{}.{}", i / 250, i % 250 + 1)
            .parse()
            .expect("ip"),
    ];
    s.ports = vec![ServicePort {
        name: "http".into(),
        protocol: Protocol::Tcp,
        port: 80,
        target_port: TargetPort::Number(8080),
        node_port: None,
    }];
    let endpoints = (0..10u32)
        .map(|e| {
            let n = i as u32 * 10 + e + generation * 7;
            Endpoint {
                addresses: vec![
                    format!("10.{}.{}.{}", 128 + (n >> 16) % 64, (n >> 8) & 255, n & 255)
                        .parse()
                        .expect("ip"),
                ],
                node_name: Some(format!("node-{}", e % 5)),
                ..Endpoint::default()
            }
        })
        .collect();
    ServiceState {
        service: s,
        slices: vec![EndpointSlice {
            name: format!("svc-{i}-1"),
            address_type: AddressType::IPv4,
            endpoints,
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
        }],
    }
}

fn insert(state: &mut AgentState, svc: ServiceState) -> String {
    let name = svc.service.key.to_string();
    state.resources.insert(
        name.clone(),
        HeldResource {
            version: "v".into(),
            state: Arc::new(svc),
        },
    );
    name
}

fn cfg() -> NodeConfig {
    NodeConfig {
        node: "node-0".into(),
        zone: None,
        cluster_cidrs: vec!["10.244.0.0/16".parse().expect("cidr")],
        nodeport_addresses: Vec::new(),
        masquerade_mark: 0x4000,
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Row {
    services: usize,
    lines: usize,
    full: Duration,
    plain: Duration,
    partial: Duration,
    rss_mib: f64,
}

fn measure(n: usize) -> Row {
    let rss0 = rss_kib();
    let mut state = AgentState::default();
    for i in 0..n {
        insert(&mut state, service(i, 0));
    }
    let all = ChangeSet {
        changed: state.resources.keys().cloned().collect(),
        removed: Vec::new(),
    };

    // The text a full sync writes into an empty namespace, restored plainly.
    let (_, tx) = FamilyTables::full(&state, &cfg(), &Existing::default(), Family::V4);
    let lines = tx.text.lines().count();
    let file = std::env::temp_dir().join(format!("swy-bench-{n}.rules"));
    std::fs::write(&file, &tx.text).expect("writing rules");
    let plain_ns = Netns::new("plain");
    let t = Instant::now();
    let ok = Command::new("ip")
        .args([
            "netns",
            "exec",
            &plain_ns.0,
            "iptables-restore",
            "-w",
            "5",
            "--noflush",
        ])
        .stdin(std::fs::File::open(&file).expect("rules file"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let plain = t.elapsed();
    assert!(ok, "plain iptables-restore failed");
    drop(plain_ns);
    let _ = std::fs::remove_file(&file);

    let ns = Netns::new("dp");
    let mut dp = IptablesDataPlane::with_runner(cfg(), vec![Family::V4], Runner::in_netns(&ns.0));
    let t = Instant::now();
    dp.apply(&Change {
        state: &state,
        changes: &all,
        full: true,
    })
    .expect("full sync");
    let full = t.elapsed();
    let rss_mib = rss_kib().saturating_sub(rss0) as f64 / 1024.0;

    let mut partials = Vec::new();
    for round in 1..=7u32 {
        let i = (round as usize * 7919) % n;
        let mut next = state.clone();
        let name = insert(&mut next, service(i, round));
        let changes = ChangeSet {
            changed: vec![name],
            removed: Vec::new(),
        };
        let t = Instant::now();
        dp.apply(&Change {
            state: &next,
            changes: &changes,
            full: false,
        })
        .expect("partial sync");
        partials.push(t.elapsed());
        state = next;
    }
    partials.sort();
    Row {
        services: n,
        lines,
        full,
        plain,
        partial: partials[partials.len() / 2],
        rss_mib,
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    let rows: Vec<Row> = sizes.into_iter().map(measure).collect();
    println!(
        "| services x 10 endpoints | restore lines | full sync | plain iptables-restore | ratio | one endpoint changed (median of 7) | RSS of state + record |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} s | {:.2} s | {:.2} | {:.1} ms | {:.1} MiB |",
            r.services,
            r.lines,
            r.full.as_secs_f64(),
            r.plain.as_secs_f64(),
            r.full.as_secs_f64() / r.plain.as_secs_f64(),
            r.partial.as_secs_f64() * 1e3,
            r.rss_mib,
        );
    }
}
