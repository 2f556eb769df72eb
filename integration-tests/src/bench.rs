//! Helpers the bench binaries share: percentiles, process memory and load,
//! command-line numbers, synthetic Services.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use switchyard_agent::dataplane::NodeConfig;
use switchyard_agent::state::{AgentState, HeldResource};
use switchyard_model::{
    AddressType, Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServiceKey, ServicePort,
    ServiceState, TargetPort, shared_name,
};

/// The `p`-th percentile (nearest rank) of ascending `sorted`; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50, p99 and max of `values` (sorted here), rounded to 0.1.
pub fn summary(values: &mut [f64]) -> serde_json::Value {
    values.sort_by(f64::total_cmp);
    let r = |v: f64| (v * 10.0).round() / 10.0;
    serde_json::json!({
        "n": values.len(),
        "p50": r(percentile(values, 50.0)),
        "p99": r(percentile(values, 99.0)),
        "max": r(values.last().copied().unwrap_or(f64::NAN)),
    })
}

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`); `pid` may be `self`.
pub fn proc_status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) of a process so far, in seconds, from
/// `/proc/PID/stat`; `pid` may be `self`. 0 when unreadable.
pub fn proc_cpu_seconds(pid: &str) -> f64 {
    // USER_HZ, which Linux fixes at 100 for /proc on every architecture
    // we run on.
    const TICKS: f64 = 100.0;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which may hold spaces: state is
            // field 3, utime and stime fields 14 and 15.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / TICKS)
        })
        .unwrap_or(0.0)
}

/// A free loopback port, as `127.0.0.1:PORT` (bound, then released, for a
/// child process to bind).
pub async fn reserve_port() -> std::io::Result<String> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?.to_string())
}

/// Polls `http://admin/readyz` every 5 ms until it answers 200, for at most
/// `deadline`; fails early when `child` exits.
pub async fn wait_ready(
    admin: &str,
    child: &mut tokio::process::Child,
    deadline: Duration,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let started = std::time::Instant::now();
    loop {
        anyhow::ensure!(
            started.elapsed() < deadline,
            "{admin}: not ready after {deadline:?}"
        );
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("{admin}: the control plane exited: {status}");
        }
        let ready = http
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Resets this process's peak resident size (`VmHWM`) to its current one,
/// so a later read gives the peak of what happened in between (Linux
/// `/proc/self/clear_refs`, value 5).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` has them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The value of the unlabelled series `name` in a Prometheus text
/// exposition, if it is there.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), 2.0);
        assert_eq!(percentile(&v, 99.0), 4.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert!(proc_status_kib("self", "VmRSS") > 0);
    }

    #[test]
    fn metric_values_by_exact_name() {
        let text = "# HELP a_total x\na_total 3\na_total_sum 1.5\nb{l=\"x\"} 2\n";
        assert_eq!(metric_value(text, "a_total"), Some(3.0));
        assert_eq!(metric_value(text, "a_total_sum"), Some(1.5));
        assert_eq!(metric_value(text, "b"), None);
    }
}

/// A network namespace of a bench or test, deleted when dropped (also on
/// a panic).
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    /// Creates `swy-bench-TAG-PID` (needs root).
    pub fn new(tag: &str) -> Self {
        Self::try_new(tag).expect("cannot create a network namespace (run as root)")
    }

    /// Creates `swy-bench-TAG-PID`; `None` where namespaces cannot be made.
    pub fn try_new(tag: &str) -> Option<Self> {
        let name = format!("swy-bench-{tag}-{}", std::process::id());
        Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success())
            .then_some(Self(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Service `i` of a bench: ClusterIP 10.96.x.y:80/TCP with ten endpoints
/// on port 8080; generation g > 0 moves its first endpoint (one endpoint
/// changed).
pub fn service(i: usize, generation: u32) -> ServiceState {
    let mut s = Service::new(ServiceKey::new("default", "bench", format!("svc-{i}")));
    s.cluster_ips = vec![
        // 10.96.0.0/12 holds 16 x 62,500 of them.
        format!("10.{}.{}.{}", 96 + i / 62_500, (i / 250) % 250, i % 250 + 1)
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
            let n = i as u32 * 10 + e;
            // Generation g > 0 moves the first endpoint to 10.200.g.x: one
            // endpoint changed.
            let ip = if e == 0 && generation > 0 {
                format!("10.200.{generation}.{}", i % 250 + 1)
            } else {
                format!("10.{}.{}.{}", 128 + (n >> 16) % 64, (n >> 8) & 255, n & 255)
            };
            Endpoint {
                addresses: vec![ip.parse().expect("ip")].into(),
                // Shared, as the agent's decoding and the sources share them.
                node_name: Some(shared_name(&format!("node-{}", e % 5))),
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
            cluster: None,
            trigger_time_unix_nanos: None,
        }],
    }
}

/// Puts `svc` into `state`; its resource name.
pub fn insert(state: &mut AgentState, svc: ServiceState) -> String {
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

/// The node settings of the benches (node-0, pod CIDR 10.244.0.0/16).
pub fn cfg() -> NodeConfig {
    NodeConfig {
        node: "node-0".into(),
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

/// The number after `name` on the command line (`--services 10000`), else `default`.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Service `i` of a synthetic cluster: `default/ns-<i % 100>/svc-<i>`, a
/// cluster IP from 10.96.0.1 on, port 80 to 8080, one slice of 10
/// endpoints whose addresses move with `generation`.
pub fn ten_endpoint_service(i: usize, generation: u32) -> ServiceState {
    let ns = format!("ns-{}", i % 100);
    let svc = format!("svc-{i}");
    let mut st = ServiceState::new(Service {
        cluster_ips: vec![Ipv4Addr::from(0x0a60_0001 + i as u32).into()],
        ports: vec![ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: TargetPort::Number(8080),
            node_port: None,
        }],
        ..Service::new(ServiceKey::new("default", &ns, &svc))
    });
    st.slices.push(EndpointSlice {
        name: format!("{svc}-1"),
        address_type: AddressType::IPv4,
        endpoints: (0..10)
            .map(|e| Endpoint {
                addresses: IpAddr::from(Ipv4Addr::from(
                    0x0af4_0000 + (i as u32) * 16 + e + generation,
                ))
                .into(),
                ..Endpoint::default()
            })
            .collect(),
        ports: vec![EndpointPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
        ..EndpointSlice::default()
    });
    st
}

/// A headless Service `team-a/web-headless` with `endpoints` ready
/// endpoints in slices of 100 (the EndpointSlice controller's default
/// size) and `ports` named ports (`port-0`...): one SRV per endpoint and
/// port. `moved` gives endpoint `moved` another address, for a one-endpoint
/// change.
pub fn big_headless_service(endpoints: usize, ports: usize, moved: Option<usize>) -> ServiceState {
    let ports: Vec<EndpointPort> = (0..ports)
        .map(|p| EndpointPort {
            name: format!("port-{p}"),
            protocol: Protocol::Tcp,
            port: 8000 + p as u16,
        })
        .collect();
    let mut st = ServiceState::new(Service {
        headless: true,
        cluster_ips: Vec::new(),
        ports: ports
            .iter()
            .map(|p| ServicePort {
                name: p.name.clone(),
                protocol: p.protocol,
                port: p.port,
                target_port: TargetPort::Number(p.port),
                node_port: None,
            })
            .collect(),
        ..Service::new(ServiceKey::new("default", "team-a", "web-headless"))
    });
    let address = |e: usize| {
        let e = if moved == Some(e) { e + 1_000_000 } else { e };
        Ipv4Addr::from(0x0a80_0000 + e as u32)
    };
    for (n, chunk) in (0..endpoints).collect::<Vec<_>>().chunks(100).enumerate() {
        st.slices.push(EndpointSlice {
            name: format!("web-headless-{n:04}"),
            address_type: AddressType::IPv4,
            endpoints: chunk
                .iter()
                .map(|&e| Endpoint {
                    addresses: vec![address(e).into()].into(),
                    ..Endpoint::default()
                })
                .collect(),
            ports: ports.clone(),
            ..EndpointSlice::default()
        });
    }
    st
}

/// CPU time (user + system) of process `pid` so far, in seconds, from
/// `/proc/PID/stat` (clock ticks of 1/100 s); `pid` may be `self`.
pub fn process_cpu_seconds(pid: &str) -> f64 {
    let (user, system) = process_cpu_split(pid);
    user + system
}

/// [`process_cpu_seconds`] as user and system time.
pub fn process_cpu_split(pid: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command, which may hold spaces and parentheses.
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime: fields 14 and 15 of stat, 11 and 12 after the command.
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

/// The number after `label` in dnsperf's report (`Queries per second:`),
/// 0 when it is not there.
pub fn dnsperf_field(text: &str, label: &str) -> f64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
