//! DNS stub benchmark: the agent's DNS serving 10,000 Services x 10
//! endpoints against unbound serving the same names as `local-data`, both
//! measured by dnsperf in one run on this machine.
//!
//! Run it pinned, the servers on CPU 0 and dnsperf on CPU 1:
//!
//! ```text
//! cargo build --release -p switchyard-integration-tests --bin bench_dns
//! taskset -c 0 target/release/bench_dns [--services 10000] [--seconds 5] [--load 20000]
//!     [--classes hit,srv,nxdomain,nodata,forwarded,uncached] [--uncached-names 400000]
//!     [--uncached-load 10000] [--repeat 1] [--upstream-cpu 1]
//! ```
//!
//! For each query class and server it runs dnsperf twice: unlimited (QPS),
//! then at a fixed offered load with per-query output (p99 latency, and
//! server CPU per query from `/proc/<pid>/stat`). With `--repeat N` the
//! fixed-load run is made N times per server, alternating between the two
//! servers, and the table gives each server's median with the range: on
//! this noisy machine one pair of runs cannot tell a few per cent apart.
//! Each run is also printed on stderr as it ends, with the upstream's CPU
//! time. "sent upstream" counts the queries the upstream answered during
//! the fixed-load run (its `unbound-control` statistics); "own p99 of
//! those" is each server's own view of them, from receipt to answer, as
//! the bound of its histogram's bucket (the stub's `dns_forward_seconds`,
//! with `dns_upstream_seconds` on stderr; unbound's `extended-statistics`
//! histogram): what dnsperf measures beyond it is spent before the server
//! reads the query or after it sends the answer (socket queues, waiting
//! for a CPU). `--upstream-cpu 0` puts the upstream with the servers
//! instead of with dnsperf. The stub is this process
//! (its DNS thread; the rest of the process idles while dnsperf runs).
//! The `srv` class asks `_http._tcp.<svc>...` SRV: the stub answers it
//! with the target's A in the additional section, through hickory's
//! parser and encoder (the plain address path takes A and AAAA only) once
//! there are more names than its encoded answers hold (16,384: above
//! that many Services); below, repeats come from those answers. unbound
//! answers it from local-data, whose additional section may differ.
//! Other names go to a second unbound (the "upstream", on CPU 1) answering
//! every `*.example.org` name from one `redirect` local-data record, TTL
//! 60 s, so it never recurses:
//! - `forwarded`: `--services` names `host-<rep>-<i>.example.org`, in
//!   the same scrambled order as the other classes, for both runs of a
//!   repetition and both servers, and new names in each repetition. The
//!   unlimited run fetches each name once from the upstream; the fixed-load
//!   run, 5 s later and within the 30 s the stub keeps an answer (unbound
//!   keeps it 60 s), measures the servers' caches of upstream answers: no
//!   query of it goes upstream. With the same names in every repetition,
//!   the stub's answers from the first one expired in the middle of a later
//!   fixed-load run, which then fetched all of them again.
//! - `uncached`: names that are never repeated (`--uncached-names` of them
//!   per dnsperf run, a fresh set for every run and server), so every query
//!   is forwarded to the upstream by both servers: their whole forwarding
//!   path, the upstream's CPU not counted. Its fixed load is
//!   `--uncached-load`: the upstream shares CPU 1 with dnsperf, and at
//!   20,000 QPS neither server kept up here. If a run asks more queries than
//!   there are names, dnsperf starts the file again and the rest are cache
//!   hits: the bench says so under the table.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use switchyard_agent::dns::DnsConfig;
use switchyard_agent::state::{AgentState, HeldResource};
use switchyard_agent::status::{Metrics, Status};
use switchyard_integration_tests::bench::dnsperf_field as field;
use switchyard_integration_tests::bench::{self, arg};
use switchyard_model::{
    AddressType, Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServiceKey, ServicePort,
    ServiceState, TargetPort,
};
use tokio_util::sync::CancellationToken;

const ZONE: &str = "cluster.local";

fn service_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

fn name(i: usize) -> (String, String) {
    (format!("svc-{i}"), format!("ns-{}", i % 100))
}

fn build_state(services: usize, endpoints: usize) -> Arc<AgentState> {
    let mut resources = BTreeMap::new();
    for i in 0..services {
        let (svc, ns) = name(i);
        let mut st = ServiceState::new(Service {
            cluster_ips: vec![IpAddr::V4(service_ip(i))],
            ports: vec![ServicePort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: TargetPort::Number(8080),
                node_port: None,
            }],
            ..Service::new(ServiceKey::new("default", &ns, &svc))
        });
        let base = u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * endpoints) as u32;
        st.slices.push(EndpointSlice {
            name: format!("{svc}-1"),
            address_type: AddressType::IPv4,
            endpoints: (0..endpoints)
                .map(|k| Endpoint {
                    addresses: vec![IpAddr::V4(Ipv4Addr::from(base + k as u32))].into(),
                    ..Endpoint::default()
                })
                .collect(),
            ports: vec![EndpointPort {
                name: "http".into(),
                protocol: Protocol::Tcp,
                port: 8080,
            }],
            cluster: None,
            trigger_time_unix_nanos: None,
        });
        let key = st.service.key.to_string();
        resources.insert(
            key,
            HeldResource {
                version: "bench".into(),
                state: Arc::new(st),
            },
        );
    }
    Arc::new(AgentState {
        version: "bench-1".into(),
        resources: resources.into(),
    })
}

/// The text after `name` on the command line, if any.
fn string_arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: &str) -> u64 {
    bench::proc_status_kib(pid, "VmRSS")
}

/// A port free for both UDP and TCP now: unbound binds both, and a port
/// free only for UDP failed runs here ("can't bind socket: Address already
/// in use").
fn free_port() -> anyhow::Result<u16> {
    for _ in 0..64 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both UDP and TCP")
}

fn unbound_conf(dir: &Path, port: u16, body: &str) -> String {
    format!(
        "server:\n  interface: 127.0.0.1\n  port: {port}\n  num-threads: 1\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n  directory: \"{}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  access-control: 127.0.0.0/8 allow\n  do-not-query-localhost: no\n  module-config: \"iterator\"\n  qname-minimisation: no\n  so-reuseport: no\n{body}",
        dir.display()
    )
}

/// An unbound of the bench, stopped when dropped (also when the bench
/// fails half-way, which used to leave it running).
struct Unbound(Child, std::path::PathBuf);

impl Unbound {
    /// Its statistics so far, through `unbound-control` on the Unix socket
    /// of [`CONTROL`].
    fn stats(&self) -> anyhow::Result<String> {
        let out = Command::new("unbound-control")
            .arg("-c")
            .arg(&self.1)
            .arg("stats_noreset")
            .output()
            .context("unbound-control")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Queries it has answered so far (`total.num.queries`).
    fn queries(&self) -> anyhow::Result<u64> {
        let text = self.stats()?;
        text.lines()
            .find_map(|l| l.strip_prefix("total.num.queries="))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("unbound-control stats: {text}"))
    }

    /// Its histogram of the time queries that went upstream took, from
    /// receipt to answer, as cumulative buckets `(upper bound in seconds,
    /// count)` like the stub's (`extended-statistics`).
    fn recursion_buckets(&self) -> anyhow::Result<Vec<(f64, u64)>> {
        let mut total = 0;
        let mut out = Vec::new();
        for line in self.stats()?.lines() {
            // histogram.000000.000128.to.000000.000256=17
            let Some((range, count)) = line
                .strip_prefix("histogram.")
                .and_then(|l| l.split_once('='))
            else {
                continue;
            };
            let upper = range.split(".to.").nth(1).context("histogram line")?;
            let (sec, usec) = upper.split_once('.').context("histogram bound")?;
            total += count.trim().parse::<u64>()?;
            out.push((sec.parse::<f64>()? + usec.parse::<f64>()? / 1e6, total));
        }
        Ok(out)
    }
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The control socket of an unbound: the upstream's counts what the
/// measured server asked it during a run, the measured one's gives its
/// own view of the time a forwarded query took.
const CONTROL: &str =
    "remote-control:\n  control-enable: yes\n  control-use-cert: no\n  control-interface: ";

fn start_unbound(dir: &Path, file: &str, conf: &str, cpu: &str) -> anyhow::Result<Unbound> {
    let path = dir.join(file);
    std::fs::write(&path, conf)?;
    let check = Command::new("unbound-checkconf").arg(&path).output()?;
    if !check.status.success() {
        bail!("{file}: {}", String::from_utf8_lossy(&check.stdout));
    }
    Ok(Unbound(
        Command::new("taskset")
            .args(["-c", cpu, "unbound", "-d", "-c"])
            .arg(&path)
            .stdout(Stdio::null())
            .spawn()?,
        path,
    ))
}

/// Waits until the server on `port` answers `name` (one it serves itself:
/// the upstream has no cluster zone, and asked for one it tries the root
/// servers, which need not answer here).
fn wait_answering(port: u16, name: &str, qtype: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port.to_string(),
                "+tries=1",
                "+time=1",
                name,
                qtype,
            ])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).contains("status:") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("nothing answers on port {port}")
}

/// The cumulative buckets `(le, count)` of the histogram `name` in the
/// agent's metrics text (`Metrics::encode`).
fn buckets(metrics: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("switchyard_agent_dns_{name}_bucket{{le=\"");
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bound under which 99% of what was observed between the two
/// readings fell (milliseconds), or `None` if nothing was.
fn p99_bound(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<f64> {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|(a, b)| (a.0, a.1 - b.1))
        .collect();
    let total = delta.last()?.1;
    (total > 0).then(|| {
        delta
            .iter()
            .find(|(_, n)| *n as f64 >= 0.99 * total as f64)
            .map_or(f64::INFINITY, |(le, _)| le * 1e3)
    })
}

/// The dnsperf input line for service number `i` in repetition `rep`.
type QueryLine = Box<dyn Fn(usize, usize) -> String>;

struct Run {
    /// Queries sent in the fixed-load run.
    sent: f64,
    qps: f64,
    p99_us: f64,
    avg_us: f64,
    cpu_us: f64,
    /// The share of `cpu_us` spent in the kernel.
    system: f64,
    lost: u64,
    /// Queries the upstream answered during the fixed-load run: the ones
    /// the server did not answer from its own state or cache.
    upstream: u64,
    /// The upstream's CPU time during the fixed-load run (s).
    upstream_cpu_s: f64,
    /// The server's own p99 from receipt to answer of the queries it
    /// forwarded in the fixed-load run, as the bound of its histogram's
    /// bucket (ms); `None` if it forwarded none.
    own_p99_ms: Option<f64>,
    /// The stub's p99 wait for the upstream alone, likewise.
    waited_p99_ms: Option<f64>,
}

/// What the upstream and the measured server count, read before and after
/// a fixed-load run.
struct Counters {
    /// Queries the upstream answered so far.
    upstream_queries: u64,
    /// The upstream's CPU time so far (s).
    upstream_cpu_s: f64,
    /// The server's own histogram of forwarded queries, receipt to answer.
    own: Vec<(f64, u64)>,
    /// The stub's histogram of waits for the upstream (empty for unbound).
    waited: Vec<(f64, u64)>,
}

fn dnsperf(
    port: u16,
    file: &Path,
    seconds: u64,
    load: Option<u64>,
    verbose: bool,
) -> anyhow::Result<String> {
    let mut cmd = Command::new("taskset");
    cmd.args([
        "-c",
        "1",
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ])
    .arg("-d")
    .arg(file)
    .args(["-l", &seconds.to_string(), "-q", "200", "-t", "2"]);
    if let Some(q) = load {
        cmd.args(["-Q", &q.to_string()]);
    }
    if verbose {
        cmd.arg("-v");
    }
    // Into a file, not a pipe: this process is the stub's, and reading
    // 100,000 lines of `-v` output through a pipe while dnsperf runs was
    // charged to the stub's CPU (a fifth of this process's samples under
    // `perf record` were its main thread in poll and pipe reads).
    let out_path = file.with_extension("out");
    let out = std::fs::File::create(&out_path)?;
    let status = cmd
        .stdout(out)
        .stderr(Stdio::null())
        .status()
        .context("dnsperf (apt-get install dnsperf)")?;
    if !status.success() {
        bail!("dnsperf: {status}");
    }
    Ok(std::fs::read_to_string(&out_path)?)
}

/// The unlimited run on `file`: queries per second and queries lost.
fn unlimited(port: u16, file: &Path, seconds: u64) -> anyhow::Result<(f64, u64)> {
    let max = dnsperf(port, file, seconds, None, false)?;
    Ok((
        field(&max, "Queries per second:"),
        field(&max, "Queries lost:") as u64,
    ))
}

/// The fixed-load run on `file`, with the unlimited run's figures and
/// what `counters` moved by during it.
fn fixed(
    pid: &str,
    port: u16,
    file: &Path,
    seconds: u64,
    load: u64,
    (qps, lost): (f64, u64),
    counters: impl Fn() -> anyhow::Result<Counters>,
) -> anyhow::Result<Run> {
    let before = counters()?;
    let (user0, system0) = bench::process_cpu_split(pid);
    let fixed = dnsperf(port, file, seconds, Some(load), true)?;
    let (user1, system1) = bench::process_cpu_split(pid);
    let after = counters()?;
    let (user, system) = (user1 - user0, system1 - system0);
    let cpu = user + system;
    let completed = field(&fixed, "Queries completed:");
    let sent = field(&fixed, "Queries sent:");
    let mut lat: Vec<f64> = fixed
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse().ok())
        .collect();
    lat.sort_by(f64::total_cmp);
    let p99 = bench::percentile(&lat, 99.0) * 1e6;
    let avg = lat.iter().sum::<f64>() / lat.len().max(1) as f64 * 1e6;
    Ok(Run {
        sent,
        qps,
        p99_us: p99,
        avg_us: avg,
        cpu_us: if completed > 0.0 {
            cpu / completed * 1e6
        } else {
            0.0
        },
        system: if cpu > 0.0 { system / cpu } else { 0.0 },
        lost,
        upstream: after.upstream_queries - before.upstream_queries,
        upstream_cpu_s: after.upstream_cpu_s - before.upstream_cpu_s,
        own_p99_ms: p99_bound(&before.own, &after.own),
        waited_p99_ms: p99_bound(&before.waited, &after.waited),
    })
}

fn main() -> anyhow::Result<()> {
    let services = arg("--services", 10_000) as usize;
    let endpoints = arg("--endpoints", 10) as usize;
    let seconds = arg("--seconds", 5);
    let load = arg("--load", 20_000);
    let dir = tempfile::tempdir()?;
    let me = std::process::id().to_string();

    // The agent's side: the state as the applier would publish it, and the
    // DNS stub following it, exactly as in the agent.
    let rss_start = rss_kib(&me);
    let state = build_state(services, endpoints);
    let rss_state = rss_kib(&me);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let upstream_port = free_port()?;
    let upstream_cpu = string_arg("--upstream-cpu").unwrap_or_else(|| "1".into());
    let upstream = start_unbound(
        dir.path(),
        "upstream.conf",
        &format!(
            "{}{CONTROL}\"{}\"\n",
            unbound_conf(
                dir.path(),
                upstream_port,
                "  local-zone: \"example.org.\" redirect\n  local-data: \"example.org. 60 IN A 192.0.2.7\"\n",
            ),
            dir.path().join("upstream.ctl").display()
        ),
        &upstream_cpu,
    )?;
    // Answering, so its port is bound before the stub binds a free one:
    // otherwise the stub may be given the port just found free for it.
    wait_answering(upstream_port, "example.org", "A")?;
    let (_tx, rx) = tokio::sync::watch::channel(state.clone());
    let status = Arc::new(Status::new("bench".into(), "default".into(), None, "none"));
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let cfg = DnsConfig {
        upstreams: vec![SocketAddr::from(([127, 0, 0, 1], upstream_port))],
        ..DnsConfig::plain(
            "127.0.0.1:0".parse()?,
            switchyard_agent::dns::zone_name(ZONE)?,
        )
    };
    let stub = rt
        .block_on(async {
            switchyard_agent::dns::start(
                cfg,
                rx,
                status.clone(),
                metrics.clone(),
                &mut tasks,
                shutdown.clone(),
            )
        })?
        .addr;
    let rss_index = rss_kib(&me);
    let doc = status.document().dns.unwrap_or_default();

    // unbound with the same names as local-data.
    let mut local = String::from(
        "  local-zone: \"cluster.local.\" static\n  local-data: \"cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\"\n  local-data: 'dns-version.cluster.local. 5 IN TXT \"1.1.0\"'\n",
    );
    for i in 0..services {
        let (svc, ns) = name(i);
        let fq = format!("{svc}.{ns}.svc.{ZONE}.");
        let _ = writeln!(local, "  local-data: \"{fq} 5 IN A {}\"", service_ip(i));
        let _ = writeln!(
            local,
            "  local-data: \"_http._tcp.{fq} 5 IN SRV 0 100 80 {fq}\""
        );
        let _ = writeln!(local, "  local-data-ptr: \"{} {fq}\"", service_ip(i));
    }
    let unbound_port = free_port()?;
    let unbound = start_unbound(
        dir.path(),
        "unbound.conf",
        &unbound_conf(
            dir.path(),
            unbound_port,
            &format!(
                "{local}  extended-statistics: yes\nforward-zone:\n  name: \".\"\n  forward-addr: 127.0.0.1@{upstream_port}\n{CONTROL}\"{}\"\n",
                dir.path().join("unbound.ctl").display()
            ),
        ),
        "0",
    )?;
    wait_answering(stub.port(), "dns-version.cluster.local", "TXT")?;
    wait_answering(unbound_port, "dns-version.cluster.local", "TXT")?;
    let unbound_pid = unbound.0.id().to_string();
    let upstream_pid = upstream.0.id().to_string();
    let unbound_rss = rss_kib(&unbound_pid);

    // Query files: every service name in a scrambled order.
    let order: Vec<usize> = (0..services).map(|k| k * 7919 % services).collect();
    // (label, --classes key, query line; None: never-repeated names).
    let classes: [(&str, &str, Option<QueryLine>); 6] = [
        (
            "hit (A)",
            "hit",
            Some(Box::new(|_, i| {
                let (s, n) = name(i);
                format!("{s}.{n}.svc.{ZONE} A")
            })),
        ),
        (
            // Through hickory's parser and encoder (not a plain address
            // question): the SRV record and its target's A, made per answer.
            "hit (SRV)",
            "srv",
            Some(Box::new(|_, i| {
                let (s, n) = name(i);
                format!("_http._tcp.{s}.{n}.svc.{ZONE} SRV")
            })),
        ),
        (
            "NXDOMAIN",
            "nxdomain",
            Some(Box::new(|_, i| {
                let (s, n) = name(i);
                format!("{s}.{n}.svc.{ZONE}.{n}.svc.{ZONE} A")
            })),
        ),
        (
            "NODATA (AAAA)",
            "nodata",
            Some(Box::new(|_, i| {
                let (s, n) = name(i);
                format!("{s}.{n}.svc.{ZONE} AAAA")
            })),
        ),
        (
            "forwarded (cached)",
            "forwarded",
            Some(Box::new(|rep, i| format!("host-{rep}-{i}.example.org A"))),
        ),
        ("forwarded, uncached", "uncached", None),
    ];
    let wanted = string_arg("--classes");
    let uncached_names = arg("--uncached-names", 400_000) as usize;
    let uncached_load = arg("--uncached-load", 10_000);
    let repeat = arg("--repeat", 1).max(1) as usize;
    let mut notes = Vec::new();
    println!(
        "DNS stub benchmark: {services} services x {endpoints} endpoints; servers on CPU 0, dnsperf (and the upstream) on CPU 1; {seconds} s per run; fixed load {load} QPS for latency and CPU; load average {}\n",
        bench::loadavg()
    );
    println!(
        "| query class | server | max QPS | lost | p99 at {load} QPS | avg at {load} QPS | server CPU/query | of it in the kernel | sent upstream | own p99 of those |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (label, key, make) in &classes {
        if wanted
            .as_deref()
            .is_some_and(|w| !w.split(',').any(|k| k == *key))
        {
            continue;
        }
        let same = dir.path().join(format!("{key}.txt"));
        let servers = [
            ("switchyard", me.as_str(), stub.port()),
            ("unbound 1.17", unbound_pid.as_str(), unbound_port),
        ];
        let mut runs: [Vec<Run>; 2] = Default::default();
        // Each repetition is an unlimited and a fixed-load run per server,
        // the servers in turn (the unlimited run also fills the caches of
        // upstream answers again for the forwarded class).
        for rep in 0..repeat {
            if let Some(make) = make {
                let body: String = order.iter().map(|i| make(rep, *i) + "\n").collect();
                std::fs::write(&same, body)?;
            }
            for (s, (server, pid, port)) in servers.into_iter().enumerate() {
                let (max_file, fixed_file) = if make.is_some() {
                    (same.clone(), same.clone())
                } else {
                    let fresh = |run: &str| -> anyhow::Result<std::path::PathBuf> {
                        let path = dir.path().join(format!("{key}-{s}-{run}{rep}.txt"));
                        let body: String = (0..uncached_names)
                            .map(|i| format!("u{s}{run}{rep}-{i}.example.org A\n"))
                            .collect();
                        std::fs::write(&path, body)?;
                        Ok(path)
                    };
                    (fresh("m")?, fresh("f")?)
                };
                let fixed_load = if make.is_some() { load } else { uncached_load };
                let max = unlimited(port, &max_file, seconds)?;
                let counters = || -> anyhow::Result<Counters> {
                    let (user, system) = bench::process_cpu_split(&upstream_pid);
                    let (own, waited) = if s == 0 {
                        let text = metrics.encode();
                        (
                            buckets(&text, "forward_seconds"),
                            buckets(&text, "upstream_seconds"),
                        )
                    } else {
                        (unbound.recursion_buckets()?, Vec::new())
                    };
                    Ok(Counters {
                        upstream_queries: upstream.queries()?,
                        upstream_cpu_s: user + system,
                        own,
                        waited,
                    })
                };
                let r = fixed(pid, port, &fixed_file, seconds, fixed_load, max, counters)?;
                let ms = |v: Option<f64>| v.map_or("-".into(), |v| v.to_string());
                eprintln!(
                    "{label}, {server}, run {}: max {:.0} QPS, p99 {:.0} us, CPU {:.1} us/query, {} sent upstream, upstream CPU {:.2} s, own p99 of forwarded queries <= {} ms, waiting for the upstream <= {} ms",
                    rep + 1,
                    r.qps,
                    r.p99_us,
                    r.cpu_us,
                    r.upstream,
                    r.upstream_cpu_s,
                    ms(r.own_p99_ms),
                    ms(r.waited_p99_ms),
                );
                if make.is_none() {
                    let unlimited = r.qps * seconds as f64;
                    if unlimited > uncached_names as f64 || r.sent > uncached_names as f64 {
                        notes.push(format!(
                            "{label}, {server}: more queries ({unlimited:.0} unlimited, {:.0} at fixed load) than names ({uncached_names}): some were cache hits.",
                            r.sent
                        ));
                    }
                }
                runs[s].push(r);
            }
        }
        for ((server, _, _), runs) in servers.iter().zip(&runs) {
            let cell = |get: fn(&Run) -> f64, unit: &str, digits: usize| {
                let mut v: Vec<f64> = runs.iter().map(get).collect();
                v.sort_by(f64::total_cmp);
                let median = bench::percentile(&v, 50.0);
                if v.len() == 1 {
                    format!("{median:.digits$}{unit}")
                } else {
                    format!(
                        "{median:.digits$}{unit} ({:.digits$}-{:.digits$})",
                        v[0],
                        v[v.len() - 1]
                    )
                }
            };
            println!(
                "| {label} | {server} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(|r| r.qps, "", 0),
                cell(|r| r.lost as f64, "", 0),
                cell(|r| r.p99_us, " us", 0),
                cell(|r| r.avg_us, " us", 0),
                cell(|r| r.cpu_us, " us", 1),
                cell(|r| r.system * 100.0, "%", 0),
                cell(|r| r.upstream as f64, "", 0),
                if runs.iter().any(|r| r.own_p99_ms.is_some()) {
                    cell(|r| r.own_p99_ms.unwrap_or(0.0), " ms", 1)
                } else {
                    "-".into()
                },
            );
        }
    }
    if repeat > 1 {
        println!(
            "Each cell: the median of {repeat} runs per server, the servers in turn, and the range."
        );
    }
    if wanted
        .as_deref()
        .is_none_or(|w| w.split(',').any(|k| k == "uncached"))
    {
        println!("forwarded, uncached: p99, avg and CPU at {uncached_load} QPS.");
    }
    for n in &notes {
        println!("{n}");
    }
    println!();
    println!(
        "Memory: the state of {services} services x {endpoints} endpoints {:.1} MiB; the DNS stub (index of {} names, runtime, sockets) {:.1} MiB more; unbound with the same names as local-data: {:.1} MiB RSS.",
        rss_state.saturating_sub(rss_start) as f64 / 1024.0,
        doc.names,
        rss_index.saturating_sub(rss_state) as f64 / 1024.0,
        unbound_rss as f64 / 1024.0
    );
    println!("Index build: {:.1} ms.", doc.index_build_ms);
    println!("Load average at the end: {}.", bench::loadavg());
    let m = &metrics.dns;
    println!(
        "Stub counters: {:?}, forwarded {}, forward failures {}, overload {}.",
        m.responses_by_rcode(),
        m.forwarded.get(),
        m.forward_failures.get(),
        m.forward_overload.get()
    );
    shutdown.cancel();
    drop((unbound, upstream));
    Ok(())
}
