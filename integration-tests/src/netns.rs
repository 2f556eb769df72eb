//! A small cluster made of network namespaces, for tests with real packets.
//!
//! ```text
//!  infra ns: br0 10.99.0.1/24 + fd00:99::1/64, the control plane (gRPC on 10.99.0.1:18000)
//!    ├── node-1 ns: eth0 10.99.0.11 + fd00:99::11, the agent (--dataplane iptables or nftables),
//!    │              pods 10.244.1.k/32 + fd00:244:1::k/128 on veths
//!    ├── node-2 ns: eth0 10.99.0.12 + fd00:99::12, the agent, pods 10.244.2.k + fd00:244:2::k
//!    └── ext ns:    eth0 10.99.0.100 + fd00:99::100 (a client outside the cluster)
//! ```
//!
//! Pods are routed, not bridged (a /32 per pod, proxy ARP on the node side,
//! as Calico does; for IPv6 a /128 per pod and a default route to fe80::1,
//! which the node's end of the veth holds), so every pod packet crosses its
//! node's iptables or ip6tables (duplicate address detection is off, so
//! no address is tentative). The processes are `sy_agent`,
//! `sy_control_plane` and `sy_echo`, binaries of this package that call
//! the same library entry points as `switchyard-agent` and
//! `switchyard-control-plane`, so this works with `cargo test -p
//! switchyard-integration-tests` as well as with `--workspace`. Every
//! namespace and process belongs to the [`Cluster`]; dropping it (also on a
//! panic) kills the processes and deletes the namespaces. Nothing is
//! configured in the namespace the test runs in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The binaries the cluster runs (the test passes `env!("CARGO_BIN_EXE_...")`).
#[derive(Debug, Clone)]
pub struct Bins {
    /// `sy_agent`.
    pub agent: PathBuf,
    /// `sy_control_plane`.
    pub control_plane: PathBuf,
    /// `sy_echo`.
    pub echo: PathBuf,
}

/// The control plane's gRPC address inside the cluster.
pub const CONTROL_PLANE: &str = "10.99.0.1:18000";

/// Whether this process can build namespaces (root, iproute2, iptables).
pub fn supported() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let tools = ["ip", "iptables-restore"].iter().all(|t| {
        Command::new(t)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    });
    root && tools
}

/// Runs `cmd`, panicking with its output when it fails.
/// `ip -n NS ARGS` (ARGS split on spaces), which must succeed.
fn ip_in(ns: &str, args: &str) {
    let mut cmd = vec!["ip", "-n", ns];
    cmd.extend(args.split_whitespace());
    run(&cmd);
}

fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Which data plane the agents run; packet tests run once per plane and
/// must see the same packets. The helpers below ([`Cluster::rules`],
/// [`Cluster::frontend`], [`Cluster::dnat`], ...) read each plane's own
/// syntax, so a test states what it waits for once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// `--dataplane iptables`.
    Iptables,
    /// `--dataplane nftables`.
    Nftables,
}

impl Plane {
    /// The `--dataplane` value.
    pub fn flag(self) -> &'static str {
        match self {
            Plane::Iptables => "iptables",
            Plane::Nftables => "nftables",
        }
    }
}

/// The cluster; see the module docs.
#[derive(Debug)]
pub struct Cluster {
    prefix: String,
    bins: Bins,
    /// Scratch directory: manifests, state directories, logs.
    pub dir: tempfile::TempDir,
    namespaces: Vec<String>,
    control_plane: Option<Child>,
    agents: BTreeMap<u8, Child>,
    servers: Vec<Child>,
    pods: BTreeMap<String, (u8, String)>,
    nodes: u8,
    plane: Plane,
}

impl Cluster {
    /// Builds the infra namespace, `nodes` nodes and the external client;
    /// the agents run the iptables data plane.
    pub fn new(bins: Bins, nodes: u8) -> Self {
        Self::with_plane(bins, nodes, Plane::Iptables)
    }

    /// [`Cluster::new`] with agents running `plane`.
    pub fn with_plane(bins: Bins, nodes: u8, plane: Plane) -> Self {
        let prefix = format!(
            "sy{}x{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut c = Self {
            prefix,
            bins,
            dir: tempfile::tempdir().expect("tempdir"),
            namespaces: Vec::new(),
            control_plane: None,
            agents: BTreeMap::new(),
            servers: Vec::new(),
            pods: BTreeMap::new(),
            nodes,
            plane,
        };
        std::fs::create_dir(c.manifests()).expect("manifests dir");
        let infra = c.add_ns("infra");
        ip_in(&infra, "link add br0 type bridge");
        ip_in(&infra, "addr add 10.99.0.1/24 dev br0");
        ip_in(&infra, "-6 addr add fd00:99::1/64 dev br0 nodad");
        ip_in(&infra, "link set br0 up");
        for i in 1..=nodes {
            let node = c.add_ns(&format!("n{i}"));
            c.attach(&node, &format!("n{i}"), &format!("10.99.0.1{i}/24"));
            ip_in(
                &node,
                &format!("-6 addr add fd00:99::1{i}/64 dev eth0 nodad"),
            );
            ip_in(&node, "route add default via 10.99.0.1");
            ip_in(&node, "-6 route add default via fd00:99::1");
            c.sh(&node, "sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 net.ipv6.conf.all.forwarding=1");
            for j in (1..=nodes).filter(|&j| j != i) {
                ip_in(
                    &node,
                    &format!("route add 10.244.{j}.0/24 via 10.99.0.1{j}"),
                );
                ip_in(
                    &node,
                    &format!("-6 route add fd00:244:{j}::/64 via fd00:99::1{j}"),
                );
            }
        }
        let ext = c.add_ns("ext");
        c.attach(&ext, "x0", "10.99.0.100/24");
        ip_in(&ext, "-6 addr add fd00:99::100/64 dev eth0 nodad");
        c
    }

    fn add_ns(&mut self, short: &str) -> String {
        let name = format!("{}-{short}", self.prefix);
        run(&["ip", "netns", "add", &name]);
        self.namespaces.push(name.clone());
        ip_in(&name, "link set lo up");
        // No duplicate address detection: a tentative address (even the
        // link-local one) would lose the first packets of a test.
        self.sh(
            &name,
            "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0",
        );
        name
    }

    /// A veth from the infra bridge to `ns`'s eth0 with `cidr`.
    fn attach(&self, ns: &str, port: &str, cidr: &str) {
        let infra = self.ns("infra");
        run(&[
            "ip", "-n", &infra, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", ns,
        ]);
        run(&[
            "ip", "-n", &infra, "link", "set", port, "master", "br0", "up",
        ]);
        ip_in(ns, &format!("addr add {cidr} dev eth0"));
        ip_in(ns, "link set eth0 up");
    }

    /// The full name of a namespace (`infra`, `n1`, `ext`, a pod name).
    pub fn ns(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    /// Runs a shell command in a namespace; returns stdout (failures are not checked).
    pub fn sh(&self, ns: &str, cmd: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", cmd])
            .output()
            .expect("ip netns exec");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The manifests directory the control plane reads.
    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// Writes a manifest (write + rename).
    pub fn write_manifest(&self, file: &str, body: &str) {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, body).expect("writing manifest");
        std::fs::rename(&tmp, self.manifests().join(file)).expect("renaming manifest");
    }

    fn log(&self, name: &str) -> Stdio {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .expect("log file")
            .into()
    }

    fn spawn_in(&self, ns: &str, program: &Path, args: &[String], log: &str) -> Child {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(self.log(log))
            .stderr(self.log(log))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()))
    }

    /// Starts the control plane in the infra namespace.
    pub fn start_control_plane(&mut self) {
        let source = [
            "--source".to_owned(),
            format!("file:{}", self.manifests().display()),
        ];
        self.start_control_plane_with(&source);
    }

    /// Starts the control plane in the infra namespace with `sources` (and
    /// any other flags) instead of the manifests directory.
    pub fn start_control_plane_with(&mut self, sources: &[String]) {
        let mut args: Vec<String> = sources.to_vec();
        args.extend(
            [
                "--state-dir",
                &self.dir.path().join("cp").display().to_string(),
                "--debounce",
                "20ms",
                "--grpc-listen",
                CONTROL_PLANE,
                "--admin-listen",
                "127.0.0.1:9901",
            ]
            .map(String::from),
        );
        let child = self.spawn_in(
            &self.ns("infra"),
            &self.bins.control_plane,
            &args,
            "control-plane",
        );
        self.control_plane = Some(child);
    }

    /// Starts `program ARGS` in namespace `short` (`infra`, a node, a pod),
    /// logging to `log`; it is killed when the cluster is dropped.
    pub fn spawn_program(&mut self, short: &str, program: &Path, args: &[String], log: &str) {
        let child = self.spawn_in(&self.ns(short), program, args, log);
        self.servers.push(child);
    }

    /// Stops the control plane (SIGKILL: as if it died).
    pub fn stop_control_plane(&mut self) {
        if let Some(mut c) = self.control_plane.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the agent of node `i` (`node-i`, zone `zone-i`).
    pub fn start_agent(&mut self, i: u8) {
        self.start_agent_with(i, &[]);
    }

    /// Upgrades node `i`'s agent the way a DaemonSet with surge does: a
    /// new agent with `extra` flags starts while the old one runs, takes
    /// its sockets and state over, and the old one then gets SIGTERM.
    pub fn upgrade_agent(&mut self, i: u8, extra: &[&str]) {
        let old = self.agents.remove(&i).expect("an agent runs on the node");
        let log = self.dir.path().join(format!("node-{i}.log"));
        let handed = |log: &Path| {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .matches("the successor serves")
                .count()
        };
        let before = handed(&log);
        self.start_agent_with(i, extra);
        self.wait_until(&format!("node {i}'s new agent to take over"), || {
            handed(&log) > before
        });
        self.agents.insert(100 + i, old);
        self.stop_agent(100 + i);
    }

    /// Starts the agent of node `i` with `extra` flags (`--cluster east`).
    pub fn start_agent_with(&mut self, i: u8, extra: &[&str]) {
        let mut args: Vec<String> = [
            "--control-plane",
            &format!("http://{CONTROL_PLANE}"),
            "--node-name",
            &format!("node-{i}"),
            "--zone",
            &format!("zone-{i}"),
            "--state-dir",
            &self
                .dir
                .path()
                .join(format!("node-{i}"))
                .display()
                .to_string(),
            "--admin-listen",
            "127.0.0.1:9902",
            "--dataplane",
            self.plane.flag(),
            "--cluster-cidr",
            "10.244.0.0/16",
            "--cluster-cidr",
            "fd00:244::/32",
            "--iptables-sync-period",
            "300ms",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let child = self.spawn_in(
            &self.ns(&format!("n{i}")),
            &self.bins.agent,
            &args,
            &format!("node-{i}"),
        );
        self.agents.insert(i, child);
    }

    /// Starts every node's agent.
    pub fn start_agents(&mut self) {
        for i in 1..=self.nodes {
            self.start_agent(i);
        }
    }

    /// Stops node `i`'s agent with SIGKILL (rules stay, as on any exit).
    pub fn kill_agent(&mut self, i: u8) {
        if let Some(mut c) = self.agents.remove(&i) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The process id of node `i`'s agent (for its CPU time).
    pub fn agent_pid(&self, i: u8) -> Option<u32> {
        self.agents.get(&i).map(Child::id)
    }

    /// Stops node `i`'s agent with SIGTERM, as a DaemonSet update or a
    /// service manager does, and waits for it to exit.
    pub fn stop_agent(&mut self, i: u8) {
        if let Some(mut c) = self.agents.remove(&i) {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Runs `sy_agent cleanup` in node `i` (its agent should be stopped).
    pub fn cleanup_node(&self, i: u8) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(&format!("n{i}"))])
            .arg(&self.bins.agent)
            .arg("cleanup")
            .output()
            .expect("running cleanup");
        assert!(
            out.status.success(),
            "cleanup on node {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Adds pod `name` with address 10.244.`node`.`k` on node `node`, running
    /// an echo server on port 8080 (TCP and UDP) that answers with `name`.
    pub fn add_pod(&mut self, name: &str, node: u8, k: u8) -> String {
        let pod = self.add_ns(name);
        let nodens = self.ns(&format!("n{node}"));
        let ip = format!("10.244.{node}.{k}");
        let port = format!("p{k}");
        run(&[
            "ip", "-n", &nodens, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            "netns", &pod,
        ]);
        ip_in(&pod, &format!("addr add {ip}/32 dev eth0"));
        ip_in(&pod, "link set eth0 up");
        ip_in(&pod, "route add 169.254.1.1 dev eth0");
        ip_in(&pod, "route add default via 169.254.1.1");
        ip_in(&nodens, &format!("link set {port} up"));
        ip_in(&nodens, &format!("route add {ip}/32 dev {port}"));
        self.sh(
            &nodens,
            &format!(
                "sysctl -qw net.ipv4.conf.{port}.proxy_arp=1 net.ipv4.neigh.{port}.proxy_delay=0"
            ),
        );
        // IPv6: the pod's /128 routed to its veth; the pod's default route
        // goes to a link-local address the node's end holds.
        let ip6 = pod_ip6(&ip);
        ip_in(&pod, &format!("-6 addr add {ip6}/128 dev eth0 nodad"));
        ip_in(&pod, "-6 route add default via fe80::1 dev eth0");
        ip_in(&nodens, &format!("-6 addr add fe80::1/64 dev {port} nodad"));
        ip_in(&nodens, &format!("-6 route add {ip6}/128 dev {port}"));
        let server = self.spawn_in(
            &pod,
            &self.bins.echo,
            &["serve".into(), name.into(), "8080".into()],
            name,
        );
        self.servers.push(server);
        self.pods.insert(name.into(), (node, ip.clone()));
        // The server is ready when it answers on its own address.
        self.wait_until(&format!("{name} to serve"), || {
            self.echo(name, &["tcp", &format!("{ip}:8080"), "1"])["replies"][name] == 1
        });
        ip
    }

    /// More IPv4 addresses for pod `name` (`10.244.NODE.K` for each `k`),
    /// routed to it by its node: endpoints its echo server answers on (it
    /// listens on every address), without a namespace each.
    pub fn add_pod_addresses(&self, name: &str, ks: impl IntoIterator<Item = u8>) -> Vec<String> {
        let (node, ip) = self.pods.get(name).expect("a pod of this cluster").clone();
        let port = format!("p{}", ip.rsplit('.').next().expect("an IPv4 address"));
        let (pod, nodens) = (self.ns(name), self.ns(&format!("n{node}")));
        ks.into_iter()
            .map(|k| {
                let extra = format!("10.244.{node}.{k}");
                ip_in(&pod, &format!("addr add {extra}/32 dev eth0"));
                ip_in(&nodens, &format!("route add {extra}/32 dev {port}"));
                extra
            })
            .collect()
    }

    /// Runs `sy_echo ARGS` in namespace `short` and parses its JSON line.
    pub fn echo(&self, short: &str, args: &[&str]) -> serde_json::Value {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(short)])
            .arg(&self.bins.echo)
            .args(args)
            .output()
            .expect("running sy_echo");
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.trim()).unwrap_or(serde_json::Value::Null)
    }

    /// Starts `sy_echo ARGS` in namespace `short`; [`finish_echo`] reads its result.
    pub fn spawn_echo(&self, short: &str, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(short)])
            .arg(&self.bins.echo)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting sy_echo")
    }

    /// Runs `sy_echo http ADDR PATH` in `short`: (status, body).
    pub fn http(&self, short: &str, addr: &str, path: &str) -> (u16, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns(short)])
            .arg(&self.bins.echo)
            .args(["http", addr, path])
            .output()
            .expect("running sy_echo");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let (code, body) = text.split_once(' ').unwrap_or((&text, ""));
        (code.parse().unwrap_or(0), body.to_owned())
    }

    /// What node `i`'s data plane programmed for IPv4: `iptables-save` of
    /// the nat and filter tables, or our nftables table with its elements.
    pub fn rules(&self, i: u8) -> String {
        let cmd = match self.plane {
            Plane::Iptables => "iptables-save -t nat; iptables-save -t filter",
            Plane::Nftables => "nft list table ip switchyard",
        };
        self.sh(&self.ns(&format!("n{i}")), cmd)
    }

    /// [`Cluster::rules`] for IPv6.
    pub fn rules6(&self, i: u8) -> String {
        let cmd = match self.plane {
            Plane::Iptables => "ip6tables-save -t nat; ip6tables-save -t filter",
            Plane::Nftables => "nft list table ip6 switchyard",
        };
        self.sh(&self.ns(&format!("n{i}")), cmd)
    }

    /// What the rules hold once a frontend address is programmed (as a
    /// destination that is translated, refused or dropped).
    pub fn frontend(&self, ip: &str) -> String {
        match (self.plane, ip.contains(':')) {
            (Plane::Iptables, false) => format!("-d {ip}/32"),
            (Plane::Iptables, true) => format!("-d {ip}/128"),
            (Plane::Nftables, _) => format!("{ip} . "),
        }
    }

    /// What the rules hold once per frontend (and slot) translated to `ip:port`.
    pub fn dnat(&self, ip: &str, port: u16) -> String {
        match (self.plane, ip.contains(':')) {
            (Plane::Iptables, false) => format!("--to-destination {ip}:{port}"),
            (Plane::Iptables, true) => format!("--to-destination [{ip}]:{port}"),
            (Plane::Nftables, _) => format!(": {ip} . {port}"),
        }
    }

    /// Whether node `i` refuses new connections to `ip` (a frontend
    /// without endpoints).
    pub fn refuses(&self, i: u8, ip: &str) -> bool {
        let ns = self.ns(&format!("n{i}"));
        let v6 = ip.contains(':');
        match self.plane {
            Plane::Iptables => {
                let tool = if v6 {
                    "ip6tables-save"
                } else {
                    "iptables-save"
                };
                let needle = self.frontend(ip);
                self.sh(&ns, &format!("{tool} -t filter")).lines().any(|l| {
                    l.contains(&needle) && l.contains("has no endpoints") && l.contains("REJECT")
                })
            }
            Plane::Nftables => {
                let family = if v6 { "ip6" } else { "ip" };
                self.sh(
                    &ns,
                    &format!("nft list set {family} switchyard no_endpoints"),
                )
                .contains(&self.frontend(ip))
            }
        }
    }

    /// Removes node `i`'s rules the way an operator would by hand
    /// (`iptables -F` of our tables, `nft flush ruleset`).
    pub fn flush_rules(&self, i: u8) {
        let cmd = match self.plane {
            Plane::Iptables => "iptables -t nat -F; iptables -t filter -F",
            Plane::Nftables => "nft flush ruleset",
        };
        self.sh(&self.ns(&format!("n{i}")), cmd);
    }

    /// Whether node `i`'s data plane is hooked in (the jump from
    /// PREROUTING, or our table's nat chain).
    pub fn hooked(&self, i: u8) -> bool {
        let needle = match self.plane {
            Plane::Iptables => {
                "-A PREROUTING -m comment --comment \"switchyard service portals\" -j SWY-SERVICES"
            }
            Plane::Nftables => "chain nat_prerouting",
        };
        self.rules(i).contains(needle)
    }

    /// Polls `pred` (processes in other namespaces cannot be awaited) for at most 20 s.
    pub fn wait_until(&self, what: &str, mut pred: impl FnMut() -> bool) {
        let deadline = Instant::now() + crate::WAIT;
        while !pred() {
            if Instant::now() > deadline {
                let logs: String = std::fs::read_dir(self.dir.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                    .map(|e| {
                        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(15).collect();
                        format!(
                            "--- {}\n{}\n",
                            e.path().display(),
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                panic!("timed out waiting for {what}\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every node's rules contain `needle`.
    pub fn wait_rules(&self, what: &str, needle: &str) {
        self.wait_until(what, || {
            (1..=self.nodes).all(|i| self.rules(i).contains(needle))
        });
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let children = self
            .servers
            .iter_mut()
            .chain(self.agents.values_mut())
            .chain(self.control_plane.as_mut());
        for c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Waits for a client started with [`Cluster::spawn_echo`]; its JSON line.
pub fn finish_echo(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().expect("sy_echo");
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim())
        .unwrap_or(serde_json::Value::Null)
}

/// A pod's IPv6 address: `10.244.N.K` has `fd00:244:N::K`.
pub fn pod_ip6(ip4: &str) -> String {
    let parts: Vec<&str> = ip4.split('.').collect();
    format!("fd00:244:{}::{}", parts[2], parts[3])
}

/// A Service manifest on port 80 (`port_extra`: lines for the port item,
/// indented 4; `spec_extra`: lines for `spec`, indented 2) with one slice
/// of endpoints `(ip, node, ready)` resolving the named target port `http`
/// to 8080.
pub fn service_manifest(
    name: &str,
    cluster_ip: &str,
    proto: &str,
    port_extra: &str,
    spec_extra: &str,
    endpoints: &[(&str, u8, bool)],
) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  namespace: test\n  name: {name}\nspec:\n  clusterIP: {cluster_ip}\n{spec_extra}  ports:\n  - name: http\n    protocol: {proto}\n    port: 80\n    targetPort: http\n{port_extra}---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: test\n  name: {name}-1\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: {proto}\n"
    );
    y.push_str(if endpoints.is_empty() {
        "endpoints: []\n"
    } else {
        "endpoints:\n"
    });
    for (ip, node, ready) in endpoints {
        y.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  nodeName: node-{node}\n  conditions:\n    ready: {ready}\n"
        ));
    }
    y
}

/// The cluster DNS Service, `kube-system/kube-dns` at 10.96.0.53 (UDP and
/// TCP port 53), with one endpoint: the pod at 10.244.1.53 on node 1.
pub const KUBE_DNS: &str = "apiVersion: v1
kind: Service
metadata: {namespace: kube-system, name: kube-dns}
spec:
  clusterIP: 10.96.0.53
  ports:
  - {name: dns, protocol: UDP, port: 53, targetPort: 53}
  - {name: dns-tcp, protocol: TCP, port: 53, targetPort: 53}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  namespace: kube-system
  name: kube-dns-1
  labels: {kubernetes.io/service-name: kube-dns}
addressType: IPv4
ports:
- {name: dns, protocol: UDP, port: 53}
- {name: dns-tcp, protocol: TCP, port: 53}
endpoints:
- addresses: [10.244.1.53]
  nodeName: node-1
  conditions: {ready: true}
";

/// How an endpoint stands, for [`with_endpoints`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Ready (and serving).
    Ready,
    /// Serving while terminating: used only when nothing is ready.
    Terminating,
}

/// `manifest` (from [`service_manifest`] with no endpoints) with these
/// endpoints `(ip, node, condition)`.
pub fn with_endpoints(manifest: String, endpoints: &[(&str, u8, Condition)]) -> String {
    let mut list = String::from("endpoints:\n");
    for (ip, node, c) in endpoints {
        let conditions = match c {
            Condition::Ready => "ready: true",
            Condition::Terminating => "ready: false, serving: true, terminating: true",
        };
        list.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  nodeName: node-{node}\n  conditions: {{{conditions}}}\n"
        ));
    }
    manifest.replace("endpoints: []\n", &list)
}

/// `manifest` with labels on its Service (`key: value` pairs).
pub fn with_labels(manifest: String, labels: &[(&str, &str)]) -> String {
    let mut block = String::from("  labels:\n");
    for (k, v) in labels {
        block.push_str(&format!("    {k}: \"{v}\"\n"));
    }
    manifest.replacen("spec:\n", &format!("{block}spec:\n"), 1)
}

/// `manifest` with load-balancer ingress entries `(ip, ipMode)` in its
/// Service's status (`ipMode` empty: none given).
pub fn with_ingress(manifest: String, ingress: &[(&str, &str)]) -> String {
    let mut status = String::from("status:\n  loadBalancer:\n    ingress:\n");
    for (ip, mode) in ingress {
        status.push_str(&format!("    - ip: {ip}\n"));
        if !mode.is_empty() {
            status.push_str(&format!("      ipMode: {mode}\n"));
        }
    }
    manifest.replacen("---\n", &format!("{status}---\n"), 1)
}
