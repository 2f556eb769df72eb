//! `bench_dns_paths`: the DNS stub reached the two ways a pod reaches it on
//! a node, in one run: at the stub's own link-local address (NodeLocal
//! DNSCache's 169.254.20.10, which kubelet must hand to pods) and at the
//! cluster DNS Service's IP in transparent mode (`--dns-service`, no
//! kubelet change). Markdown on stdout, progress on stderr.
//!
//! ```text
//!  namespaces (root, iproute2): a node running this build's sy_agent (iptables data plane,
//!    --dns-service kube-system/kube-dns), a pod "client" on it, a pod standing in for CoreDNS
//!  dnsperf in the client pod: S Service names (every query a hit)
//!    unlimited, SECONDS s: queries per second
//!    at LOAD queries a second, SECONDS s: the agent's CPU per query (/proc/PID/stat)
//! ```
//!
//! Run as root: `cargo build --release -p switchyard-integration-tests --bins &&
//! ./target/release/bench_dns_paths --repeat 3` (needs dnsperf).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use switchyard_integration_tests::bench::{dnsperf_field as field, loadavg, process_cpu_seconds};
use switchyard_integration_tests::netns::{Bins, Cluster, KUBE_DNS, service_manifest, supported};

#[derive(Debug, Parser)]
#[command(
    name = "bench_dns_paths",
    about = "The DNS stub at its own address and in transparent mode"
)]
struct Cli {
    /// Services (names queried).
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Seconds per dnsperf run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Offered load of the fixed-load runs.
    #[arg(long, default_value_t = 10_000)]
    load: u64,
    /// Runs per path, alternating.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .expect("this binary")
        .with_file_name(name)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(supported(), "needs root, iproute2 and iptables");
    let bins = Bins {
        agent: sibling("sy_agent"),
        control_plane: sibling("sy_control_plane"),
        echo: sibling("sy_echo"),
    };
    let mut c = Cluster::new(bins.clone(), 1);
    c.add_pod("client", 1, 9);
    let a1 = c.add_pod("a1", 1, 2);
    c.add_pod("coredns", 1, 53);
    c.spawn_program(
        "coredns",
        &bins.echo,
        &["dns".into(), "53".into(), "192.0.2.53".into()],
        "coredns",
    );
    c.write_manifest("kube-dns.yaml", KUBE_DNS);
    let mut names = String::new();
    for f in 0..cli.services.div_ceil(100) {
        let mut docs = Vec::new();
        for i in f * 100..((f + 1) * 100).min(cli.services) {
            let ip = format!("10.97.{}.{}", i / 250, i % 250 + 1);
            docs.push(service_manifest(
                &format!("svc-{i}"),
                &ip,
                "TCP",
                "",
                "",
                &[(a1.as_str(), 1, true)],
            ));
            let _ = writeln!(names, "svc-{i}.test.svc.cluster.local A");
        }
        c.write_manifest(&format!("part-{f}.yaml"), &docs.join("---\n"));
    }
    let queries = c.dir.path().join("queries.txt");
    std::fs::write(&queries, names)?;
    c.start_control_plane();
    c.start_agent_with(1, &["--dns-service", "kube-system/kube-dns"]);
    let n1 = c.ns("n1");
    c.wait_until("the transparent takeover", || {
        c.sh(&n1, "iptables -t raw -S")
            .contains("-d 10.96.0.53/32 -p udp")
    });
    let last = format!("svc-{}.test.svc.cluster.local", cli.services - 1);
    let client = c.ns("client");
    for server in ["169.254.20.10", "10.96.0.53"] {
        c.wait_until(&format!("{server} to answer every Service"), || {
            c.sh(&client, &format!("dig @{server} +short +tries=1 {last}"))
                .contains("10.97.")
        });
    }
    let pid = c.agent_pid(1).expect("the agent").to_string();
    let dnsperf = |server: &str, load: Option<u64>| -> String {
        let rate = load.map(|q| format!(" -Q {q}")).unwrap_or_default();
        c.sh(
            &client,
            &format!(
                "dnsperf -s {server} -d {} -l {} -q 200 -t 2{rate} 2>/dev/null",
                queries.display(),
                cli.seconds
            ),
        )
    };
    let paths = [
        ("stub's own address (169.254.20.10)", "169.254.20.10"),
        ("transparent (kube-dns IP 10.96.0.53)", "10.96.0.53"),
    ];
    let mut qps: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); 2];
    let mut lost: Vec<u64> = vec![0; 2];
    let load_before = loadavg();
    for r in 0..cli.repeat {
        for (k, (what, server)) in paths.iter().enumerate() {
            let max = dnsperf(server, None);
            qps[k].push(field(&max, "Queries per second:"));
            let t0 = process_cpu_seconds(&pid);
            let fixed = dnsperf(server, Some(cli.load));
            let used = process_cpu_seconds(&pid) - t0;
            let done = field(&fixed, "Queries completed:");
            lost[k] += field(&fixed, "Queries lost:") as u64 + field(&max, "Queries lost:") as u64;
            cpu[k].push(if done > 0.0 { used / done * 1e6 } else { 0.0 });
            eprintln!(
                "run {}/{}: {what}: {:.0} QPS, {:.1} us CPU per query",
                r + 1,
                cli.repeat,
                qps[k].last().copied().unwrap_or(0.0),
                cpu[k].last().copied().unwrap_or(0.0)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!(
        "| path | max QPS (median of {}) | agent CPU per query at {} QPS | lost | load |\n|---|---|---|---|---|",
        cli.repeat, cli.load
    );
    for (k, (what, _)) in paths.iter().enumerate() {
        let (mut q, mut u) = (qps[k].clone(), cpu[k].clone());
        let range = |v: &[f64]| {
            let lo = v.iter().copied().fold(f64::MAX, f64::min);
            let hi = v.iter().copied().fold(0.0, f64::max);
            (lo, hi)
        };
        let (qlo, qhi) = range(&q);
        let (ulo, uhi) = range(&u);
        println!(
            "| {what} | {:.0} ({qlo:.0}-{qhi:.0}) | {:.1} us ({ulo:.1}-{uhi:.1}) | {} | {load_before} -> {} |",
            median(&mut q),
            median(&mut u),
            lost[k],
            loadavg()
        );
    }
    Ok(())
}
