//! Benchmark of the nftables data plane beside the iptables one, in the
//! same run, each in a fresh network namespace it creates and deletes.
//! For each size (Services x 10 endpoints), per data plane:
//! - `apply`: full sync into the fresh namespace; one endpoint changed
//!   (from `apply` called to the commit returned, median of many: 101 for
//!   nftables, 7 for iptables), for nftables also with its partial syncs
//!   through libnftables text (the path before netlink batches, the
//!   anchor); the endpoint count of one Service changed
//!   (10 -> 9 -> 10, median); a tenth of the Services changed in one update
//!   (one endpoint each);
//! - `memory`: the resident size of a process holding the state and the
//!   data plane after its full sync, beside the state alone (each plane
//!   and size in a child process of its own, so nothing is shared);
//! - `packets`: new TCP connections per second from a client namespace to
//!   a ClusterIP of the table, answered by `sy_echo` in a server namespace
//!   (every connection is a new conntrack entry, so every one pays the
//!   first-packet path through the rules), beside the same client straight
//!   to the server's address through the same node (the anchor), in pairs.
//!
//! Run as root: `cargo build --release -p switchyard-integration-tests --bin bench_nftables --bin sy_echo`,
//! then `./target/release/bench_nftables [apply] [memory] [packets] [nftables-only] [SIZES...]`
//! (all sections, 1000 and 10000 Services, by default; `nftables-only`
//! leaves the iptables plane out of `apply`, which takes many minutes at
//! 100,000 Services).

use std::time::{Duration, Instant};

use switchyard_agent::dataplane::{Change, DataPlane, Family, Runner};
use switchyard_agent::iptables::IptablesDataPlane;
use switchyard_agent::nftables::NftablesDataPlane;
use switchyard_agent::nftables::elements::Programmed;
use switchyard_agent::state::{AgentState, ChangeSet};
use switchyard_integration_tests::bench::{
    Netns, cfg, insert, loadavg, ms, percentile, proc_status_kib, service,
};
use switchyard_model::{
    AddressType, Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServiceKey, ServicePort,
    ServiceState, TargetPort,
};

/// What one data plane did at one size.
struct Row {
    plane: &'static str,
    services: usize,
    full: Duration,
    /// nftables: `nft -f` of the same skeleton and elements into a fresh
    /// namespace, in the same run (the kernel's floor through text).
    floor: Option<Duration>,
    one: f64,
    /// nftables: time in `sendmsg` of the one-endpoint batch (median).
    one_kernel: Option<f64>,
    count: f64,
    tenth: Duration,
}

fn apply<D: DataPlane + ?Sized>(
    dp: &mut D,
    state: &AgentState,
    changes: &ChangeSet,
    full: bool,
) -> Duration {
    let t = Instant::now();
    dp.apply(&Change {
        state,
        changes,
        full,
    })
    .unwrap_or_else(|e| panic!("{} apply: {}", dp.name(), switchyard_proto::tls::chain(&e)));
    t.elapsed()
}

fn changed(names: Vec<String>) -> ChangeSet {
    ChangeSet {
        changed: names,
        removed: Vec::new(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 50.0)
}

fn data_plane(plane: &str, ns: &Netns) -> Box<dyn DataPlane> {
    match plane {
        "nftables" => Box::new(NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &ns.0)),
        _ => Box::new(IptablesDataPlane::with_runner(
            cfg(),
            vec![Family::V4],
            Runner::in_netns(&ns.0),
        )),
    }
}

/// `nft -f` of the whole table (skeleton and elements) as text, into a
/// fresh namespace: wall time of the nft process.
fn nft_floor(state: &AgentState) -> Duration {
    use std::io::Write;
    let ns = Netns::new("floor");
    let (_, text) = Programmed::full_text(state, &cfg(), Family::V4);
    let path = std::env::temp_dir().join(format!("swy-floor-{}.nft", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .expect("writing the floor's nft file");
    drop(text);
    let t = Instant::now();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "-f"])
        .arg(&path)
        .output()
        .expect("running nft -f");
    let took = t.elapsed();
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "nft -f: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// The nftables plane with its partial syncs through libnftables text, as
/// before they went through our netlink batches: the anchor for a change.
const NFT_TEXT: &str = "nftables, partial syncs as text (anchor)";

fn measure(plane: &'static str, n: usize, rounds: u32) -> Row {
    let ns = Netns::new(plane);
    let mut state = AgentState::default();
    let names: Vec<String> = (0..n).map(|i| insert(&mut state, service(i, 0))).collect();
    if plane.starts_with("nftables") {
        let floor = nft_floor(&state);
        let mut dp = NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &ns.0);
        dp.set_partial_as_text(plane == NFT_TEXT);
        let full = apply(&mut dp, &state, &changed(names), true);
        let mut row = changes(&mut dp, &mut state, plane, n, rounds, |dp| {
            Some(ms(dp.last_send()))
        });
        row.full = full;
        row.floor = Some(floor);
        return row;
    }
    let mut dp = data_plane(plane, &ns);
    let full = apply(dp.as_mut(), &state, &changed(names), true);
    let mut row = changes(dp.as_mut(), &mut state, plane, n, rounds, |_| None);
    row.full = full;
    row
}

/// The changes after a full sync; `kernel` reads the kernel's time of the
/// last one, where the plane knows it.
fn changes<D: DataPlane + ?Sized>(
    dp: &mut D,
    state: &mut AgentState,
    plane: &'static str,
    n: usize,
    rounds: u32,
    kernel: impl Fn(&D) -> Option<f64>,
) -> Row {
    let mut kernel_one = Vec::new();

    // One endpoint changed, each round on another Service.
    let mut one = Vec::new();
    for round in 1..=rounds {
        let i = (round as usize * 7919) % n;
        let name = insert(state, service(i, round));
        one.push(ms(apply(dp, state, &changed(vec![name]), false)));
        kernel_one.extend(kernel(dp));
    }
    // The endpoint count: 10 -> 9 -> 10 on one Service.
    let mut count = Vec::new();
    for round in 0..rounds {
        let mut s = service(n / 2, 0);
        if round % 2 == 0 {
            s.slices[0].endpoints.pop();
        }
        let name = insert(state, s);
        count.push(ms(apply(dp, state, &changed(vec![name]), false)));
    }
    // A tenth of the Services, one endpoint each, in one update.
    let tenth: Vec<String> = (0..n / 10)
        .map(|k| insert(state, service(k * 10, 200)))
        .collect();
    let tenth = apply(dp, state, &changed(tenth), false);
    Row {
        plane,
        services: n,
        full: Duration::ZERO,
        floor: None,
        one: median(one),
        one_kernel: (!kernel_one.is_empty()).then(|| median(kernel_one)),
        count: median(count),
        tenth,
    }
}

/// `--child-memory PLANE N`: the state of `n` Services, then the data
/// plane's full sync of it; prints `RSS_STATE_KIB RSS_KIB HWM_KIB`.
fn child_memory(plane: &str, n: usize) {
    let mut state = AgentState::default();
    let names: Vec<String> = (0..n).map(|i| insert(&mut state, service(i, 0))).collect();
    let before = proc_status_kib("self", "VmRSS");
    let ns = Netns::new(&format!("mem-{plane}"));
    let mut dp = data_plane(plane, &ns);
    apply(dp.as_mut(), &state, &changed(names.clone()), true);
    // One change more: whatever a partial sync keeps (libnftables' cache).
    let name = insert(&mut state, service(0, 1));
    apply(dp.as_mut(), &state, &changed(vec![name]), false);
    println!(
        "{before} {} {}",
        proc_status_kib("self", "VmRSS"),
        proc_status_kib("self", "VmHWM")
    );
}

/// (state alone, after the full sync, peak) in MiB, from a child process.
fn memory(plane: &str, n: usize) -> (f64, f64, f64) {
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe)
        .args(["--child-memory", plane, &n.to_string()])
        .output()
        .expect("running the memory child");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .collect();
    assert!(
        v.len() == 3,
        "memory child for {plane} {n}: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (v[0], v[1], v[2])
}

/// The Service the packet section connects to: ClusterIP 10.97.0.1:80 to
/// the server namespace's 10.244.2.2:8080.
fn echo_service() -> ServiceState {
    let mut s = Service::new(ServiceKey::new("default", "bench", "echo"));
    s.cluster_ips = vec!["10.97.0.1".parse().expect("ip")];
    s.ports = vec![ServicePort {
        name: "http".into(),
        protocol: Protocol::Tcp,
        port: 80,
        target_port: TargetPort::Number(8080),
        node_port: None,
    }];
    ServiceState {
        service: s,
        slices: vec![EndpointSlice {
            name: "echo-1".into(),
            address_type: AddressType::IPv4,
            endpoints: vec![Endpoint {
                addresses: vec!["10.244.2.2".parse().expect("ip")].into(),
                node_name: Some("node-1".into()),
                ..Endpoint::default()
            }],
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            cluster: None,
            trigger_time_unix_nanos: None,
        }],
    }
}

fn sh(ns: &str, cmd: &str) {
    let ok = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "in {ns}: {cmd}");
}

/// Connections per second of `sy_echo tcp TO COUNT` in `client`.
fn rate(echo: &std::path::Path, client: &str, to: &str, count: u32) -> f64 {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", client])
        .arg(echo)
        .args(["tcp", to, &count.to_string()])
        .output()
        .expect("running sy_echo");
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("sy_echo JSON");
    let ok: u64 = v["replies"].as_object().map_or(0, |r| {
        r.values().filter_map(serde_json::Value::as_u64).sum()
    });
    assert_eq!(ok, u64::from(count), "every connection answered: {v}");
    ok as f64 / (v["elapsed_ms"].as_f64().expect("elapsed") / 1e3)
}

/// Connections per second through the node with `plane` holding `n`
/// Services: to the ClusterIP, straight to the server (the anchor), and
/// the ratio of the two; medians of 11 pairs of 1,000 connections each,
/// the two of a pair back to back (the machine's load drifts less within
/// a pair than over the run).
fn first_packet(plane: &str, n: usize) -> (f64, f64, f64) {
    let echo = std::env::current_exe()
        .expect("own path")
        .with_file_name("sy_echo");
    assert!(
        echo.exists(),
        "build sy_echo beside this bench: {}",
        echo.display()
    );
    let node = Netns::new(&format!("fp-{plane}"));
    let client = Netns::new(&format!("fpc-{plane}"));
    let server = Netns::new(&format!("fps-{plane}"));
    for (ns, port, node_ip, ip) in [
        (&client, "c0", "10.244.1.1", "10.244.1.2"),
        (&server, "s0", "10.244.2.1", "10.244.2.2"),
    ] {
        sh(
            &node.0,
            &format!(
                "ip link add {port} type veth peer name eth0 netns {0} && ip addr add {node_ip}/24 dev {port} && ip link set {port} up",
                ns.0
            ),
        );
        sh(
            &ns.0,
            &format!(
                "ip link set lo up && ip addr add {ip}/24 dev eth0 && ip link set eth0 up && ip route add default via {node_ip}"
            ),
        );
    }
    sh(
        &node.0,
        "ip link set lo up && sysctl -qw net.ipv4.ip_forward=1",
    );
    let mut srv = std::process::Command::new("ip")
        .args(["netns", "exec", &server.0])
        .arg(&echo)
        .args(["serve", "echo", "8080"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("starting the echo server");
    let mut dp = data_plane(plane, &node);
    let mut state = AgentState::default();
    let mut names: Vec<String> = (0..n).map(|i| insert(&mut state, service(i, 0))).collect();
    names.push(insert(&mut state, echo_service()));
    apply(dp.as_mut(), &state, &changed(names), true);
    // The server is up when the anchor answers (bounded).
    let started = Instant::now();
    while std::process::Command::new("ip")
        .args(["netns", "exec", &client.0])
        .arg(&echo)
        .args(["tcp", "10.244.2.2:8080", "1"])
        .output()
        .map(|o| !String::from_utf8_lossy(&o.stdout).contains("\"echo\":1"))
        .unwrap_or(true)
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the echo server did not answer in 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut through, mut direct, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..11 {
        let t = rate(&echo, &client.0, "10.97.0.1:80", 1000);
        let d = rate(&echo, &client.0, "10.244.2.2:8080", 1000);
        through.push(t);
        direct.push(d);
        ratio.push(t / d);
    }
    let _ = srv.kill();
    let _ = srv.wait();
    (median(through), median(direct), median(ratio))
}

/// `--profile N ROUNDS`: the nftables plane's full sync of N Services,
/// "ready" on stdout, then ROUNDS one-endpoint changes (for
/// `perf record -p PID` attached after "ready").
fn profile(n: usize, rounds: u32) {
    let ns = Netns::new("profile");
    let mut dp = data_plane("nftables", &ns);
    let mut state = AgentState::default();
    let names: Vec<String> = (0..n).map(|i| insert(&mut state, service(i, 0))).collect();
    apply(dp.as_mut(), &state, &changed(names), true);
    println!("ready {}", std::process::id());
    let mut one = Vec::new();
    for round in 1..=rounds {
        let i = (round as usize * 7919) % n;
        let name = insert(&mut state, service(i, round % 250 + 1));
        one.push(ms(apply(dp.as_mut(), &state, &changed(vec![name]), false)));
    }
    println!(
        "one endpoint changed, median of {rounds}: {:.3} ms",
        median(one)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--child-memory") {
        child_memory(&args[1], args[2].parse().expect("size"));
        return;
    }
    if args.first().map(String::as_str) == Some("--profile") {
        profile(
            args[1].parse().expect("size"),
            args[2].parse().expect("rounds"),
        );
        return;
    }
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    let sections: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| ["apply", "memory", "packets"].contains(a))
        .collect();
    let wants = |s: &str| sections.is_empty() || sections.contains(&s);
    println!("load average at start: {}", loadavg());
    if wants("apply") {
        apply_section(&sizes, !args.iter().any(|a| a == "nftables-only"));
    }
    if wants("memory") {
        println!(
            "| data plane | services x 10 endpoints | RSS, state alone | RSS after the full sync | above the state | peak RSS |"
        );
        println!("|---|---|---|---|---|---|");
        for &n in &sizes {
            for plane in ["nftables", "iptables"] {
                let (state, after, peak) = memory(plane, n);
                println!(
                    "| {plane} | {n} | {state:.1} MiB | {after:.1} MiB | {:.1} MiB | {peak:.1} MiB |",
                    after - state
                );
            }
        }
        println!("load average: {}", loadavg());
    }
    if wants("packets") {
        println!(
            "| data plane | services x 10 endpoints | new connections/s to the ClusterIP | straight to the server (anchor) | ratio within a pair |"
        );
        println!("|---|---|---|---|---|");
        for &n in &sizes {
            for plane in ["nftables", "iptables"] {
                let (through, direct, ratio) = first_packet(plane, n);
                println!("| {plane} | {n} | {through:.0} | {direct:.0} | {ratio:.2} |");
            }
        }
    }
    println!("load average at end: {}", loadavg());
}

fn apply_section(sizes: &[usize], with_iptables: bool) {
    println!(
        "| data plane | services x 10 endpoints | full sync | `nft -f` of the same table (floor, same run) | one endpoint changed (median) | of which in sendmsg (median) | endpoint count changed (median) | a tenth of the Services changed in one update |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    for &n in sizes {
        let mut planes = vec![("nftables", 101), (NFT_TEXT, 101)];
        if with_iptables {
            planes.push(("iptables", 7));
        }
        // Each row as soon as it is measured: a large size takes minutes.
        for (plane, rounds) in planes {
            let r = measure(plane, n, rounds);
            println!(
                "| {} | {} | {:.2} s | {} | {:.2} ms | {} | {:.2} ms | {:.0} ms |",
                r.plane,
                r.services,
                r.full.as_secs_f64(),
                or_dash(r.floor.map(|f| format!("{:.2} s", f.as_secs_f64()))),
                r.one,
                or_dash(r.one_kernel.map(|k| format!("{k:.3} ms"))),
                r.count,
                ms(r.tenth),
            );
        }
    }
}
