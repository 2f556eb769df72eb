//! Test harness: a control plane and agents running in this process on
//! real sockets (`127.0.0.1:0`), with real YAML files, real sled state
//! directories and real certificates.
//!
//! Everything waits on events (watch channels of the control plane's status
//! and of each agent's state) with a bounded deadline and a message saying
//! what did not happen ([`WAIT`]); nothing sleeps to synchronise.
//! Certificates are made with rcgen (`certs.rs`).

pub mod apiserver;
pub mod bench;
pub mod certs;
pub mod dns;
pub mod netns;
pub mod restart;
pub mod testbed;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_agent::Agent;
use switchyard_agent::dataplane::{ApplyError, Change, DataPlane, NoneDataPlane, Recorded};
use switchyard_control_plane::ControlPlane;
use switchyard_control_plane::status::StatusDocument;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Default bound for waiting on one event.
pub const WAIT: Duration = Duration::from_secs(20);

/// Installs a log subscriber once (RUST_LOG controls it).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Awaits `fut` for at most `WAIT`, panicking with `what` on time-out.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A temporary directory holding a `manifests/` directory (what the
/// control plane's file source reads) and state directories.
#[derive(Debug)]
pub struct TestEnv {
    /// The directory; removed on drop.
    pub dir: tempfile::TempDir,
}

impl TestEnv {
    /// A fresh environment (and logging, once per process).
    pub fn new() -> Self {
        init_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("manifests")).expect("manifests dir");
        Self { dir }
    }

    /// Where manifests go.
    pub fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// Writes a manifest by write-then-rename, as editors and config
    /// management do.
    pub fn write(&self, file: &str, body: &str) {
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, body).expect("writing manifest");
        std::fs::rename(&tmp, self.manifests().join(file)).expect("renaming manifest");
    }

    /// Removes a manifest.
    pub fn remove(&self, file: &str) {
        std::fs::remove_file(self.manifests().join(file)).expect("removing manifest");
    }

    /// A state directory named `name` (created by whoever uses it).
    pub fn state(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Control-plane arguments over the manifests, plain gRPC.
    pub fn cp_args(&self) -> switchyard_control_plane::Args {
        cp_args(&self.manifests(), &self.state("cp"), None)
    }

    /// Control-plane arguments with these `--source` flags instead.
    pub fn cp_args_with_sources(&self, sources: &[String]) -> switchyard_control_plane::Args {
        let mut argv: Vec<String> = vec!["switchyard-control-plane".into()];
        for s in sources {
            argv.extend(["--source".into(), s.clone()]);
        }
        argv.extend([
            "--state-dir".into(),
            self.state("cp").display().to_string(),
            "--debounce".into(),
            "20ms".into(),
        ]);
        <switchyard_control_plane::Args as clap::Parser>::parse_from(argv)
    }
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

/// A tmpfs of a fixed size mounted on a fresh directory (needs root),
/// unmounted when dropped, also on a panic (lazily, should a file in it
/// still be open).
#[derive(Debug)]
pub struct Tmpfs {
    /// The mount point.
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` bytes.
    pub fn mount(bytes: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "cannot mount a tmpfs on {} (run as root)",
            dir.path().display()
        );
        Self { dir }
    }

    /// Fills it with a file `name` until the file system is full; returns its size.
    pub fn fill(&self, name: &str) -> u64 {
        use std::io::Write;
        let mut f = std::fs::File::create(self.dir.path().join(name)).expect("filler file");
        let chunk = vec![0xa5u8; 64 << 10];
        let mut written = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(28), "filling: {e}");
                    break;
                }
            }
        }
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Hostile clients of a control plane's gRPC port (tests and benches):
/// streams that never send a Hello, and streams that send one and never
/// read what comes back. Each runs in a task of its own; abort to end it.
pub mod hostile {
    use std::net::IpAddr;

    use switchyard_proto::v1::snapshot_discovery_client::SnapshotDiscoveryClient;
    use switchyard_proto::v1::{self, agent_message};
    use tokio::task::JoinHandle;
    use tokio_stream::wrappers::ReceiverStream;

    /// Streams one HTTP/2 connection carries (the control plane's bound).
    const PER_CONNECTION: usize = 8;

    async fn channels(url: &str, from: IpAddr, streams: usize) -> Vec<tonic::transport::Channel> {
        let mut out = Vec::new();
        for _ in 0..streams.div_ceil(PER_CONNECTION) {
            let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
                .expect("url")
                .local_address(Some(from))
                // A small window: the control plane's sends stall soon.
                .initial_stream_window_size(1024)
                .initial_connection_window_size(8 * 1024)
                .connect()
                .await
                .expect("connect");
            out.push(channel);
        }
        out
    }

    /// Streams that never send anything, and how the control plane ended
    /// those it ended.
    #[derive(Debug)]
    pub struct Idle {
        /// One task per stream.
        pub tasks: Vec<JoinHandle<()>>,
        /// The status of each stream the control plane ended, as it ends.
        pub ended: tokio::sync::mpsc::UnboundedReceiver<tonic::Status>,
    }

    /// `n` streams from `from` that open and never send anything.
    pub async fn idle_streams(url: &str, from: IpAddr, n: usize) -> Idle {
        let channels = channels(url, from, n).await;
        let (ended_tx, ended) = tokio::sync::mpsc::unbounded_channel();
        let tasks = (0..n)
            .map(|i| {
                let mut client = SnapshotDiscoveryClient::new(channels[i / PER_CONNECTION].clone());
                let ended_tx = ended_tx.clone();
                tokio::spawn(async move {
                    let (_tx, rx) = tokio::sync::mpsc::channel::<v1::AgentMessage>(1);
                    if let Err(status) = client.stream_snapshots(ReceiverStream::new(rx)).await {
                        let _ = ended_tx.send(status);
                    }
                    std::future::pending::<()>().await;
                })
            })
            .collect();
        Idle { tasks, ended }
    }

    /// `n` streams from `from` that send a Hello as node `<prefix>-<i>` and
    /// then never read; returns once each was answered (or refused).
    pub async fn unread_streams(
        url: &str,
        from: IpAddr,
        n: usize,
        prefix: &str,
    ) -> Vec<JoinHandle<()>> {
        let channels = channels(url, from, n).await;
        let mut tasks = Vec::new();
        let (answered_tx, mut answered) = tokio::sync::mpsc::channel::<()>(n.max(1));
        for i in 0..n {
            let mut client = SnapshotDiscoveryClient::new(channels[i / PER_CONNECTION].clone());
            let node = format!("{prefix}-{i}");
            let answered_tx = answered_tx.clone();
            tasks.push(tokio::spawn(async move {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let hello = v1::AgentMessage {
                    kind: Some(agent_message::Kind::Hello(v1::Hello {
                        node_name: node,
                        ..Default::default()
                    })),
                };
                let _ = tx.send(hello).await;
                let call = client.stream_snapshots(ReceiverStream::new(rx)).await;
                let _ = answered_tx.send(()).await;
                // Hold the stream and never read it.
                let _held = (tx, call);
                std::future::pending::<()>().await;
            }));
        }
        for _ in 0..n {
            let _ = answered.recv().await;
        }
        tasks
    }
}

/// TLS material for a control plane.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Server certificate.
    pub cert: PathBuf,
    /// Server key.
    pub key: PathBuf,
    /// CA for client certificates (mTLS), if any.
    pub client_ca: Option<PathBuf>,
}

/// Control-plane arguments for a test: sources, a state dir, a short debounce.
pub fn cp_args(
    manifests: &Path,
    state_dir: &Path,
    tls: Option<&ServerTls>,
) -> switchyard_control_plane::Args {
    let mut argv: Vec<String> = vec![
        "switchyard-control-plane".into(),
        "--source".into(),
        format!("file:{}", manifests.display()),
        "--state-dir".into(),
        state_dir.display().to_string(),
        "--debounce".into(),
        "20ms".into(),
    ];
    if let Some(t) = tls {
        argv.extend(["--tls-cert".into(), t.cert.display().to_string()]);
        argv.extend(["--tls-key".into(), t.key.display().to_string()]);
        if let Some(ca) = &t.client_ca {
            argv.extend(["--tls-client-ca".into(), ca.display().to_string()]);
        }
    }
    <switchyard_control_plane::Args as clap::Parser>::parse_from(argv)
}

/// A control plane on fresh loopback ports.
pub async fn start_cp(args: switchyard_control_plane::Args) -> ControlPlane {
    start_cp_on(args, "127.0.0.1:0").await
}

/// A control plane whose gRPC listener binds `grpc` (to restart on the same port).
pub async fn start_cp_on(args: switchyard_control_plane::Args, grpc: &str) -> ControlPlane {
    let grpc = TcpListener::bind(grpc)
        .await
        .expect("binding gRPC listener");
    let admin = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding admin listener");
    let sources = switchyard_control_plane::sources_from_args(&args);
    switchyard_control_plane::start_with(args, grpc, admin, sources, CancellationToken::new())
        .await
        .expect("control plane starts")
}

/// Waits until the control plane's status satisfies `pred`; returns that status.
pub async fn cp_status_until(
    cp: &ControlPlane,
    what: &str,
    mut pred: impl FnMut(&StatusDocument) -> bool,
) -> StatusDocument {
    let mut rx = cp.status.subscribe();
    within(what, async {
        loop {
            let doc = cp.status.document();
            if pred(&doc) {
                return doc;
            }
            rx.changed().await.expect("status channel open");
        }
    })
    .await
}

/// Waits until the agent's status satisfies `pred`; returns that status.
pub async fn agent_status_until(
    agent: &Agent,
    what: &str,
    mut pred: impl FnMut(&switchyard_agent::status::StatusDocument) -> bool,
) -> switchyard_agent::status::StatusDocument {
    let mut rx = agent.status.subscribe();
    within(what, async {
        loop {
            let doc = agent.status.document();
            if pred(&doc) {
                return doc;
            }
            rx.changed().await.expect("status channel open");
        }
    })
    .await
}

/// Agent arguments for a test.
pub fn agent_args(node: &str, cp_url: &str, state_dir: &Path) -> switchyard_agent::Args {
    <switchyard_agent::Args as clap::Parser>::parse_from([
        "switchyard-agent",
        "--control-plane",
        cp_url,
        "--node-name",
        node,
        "--state-dir",
        &state_dir.display().to_string(),
        "--admin-listen",
        "127.0.0.1:0",
        // Tests never create interfaces in the root namespace; DNS tests
        // set their own address.
        "--dns-listen",
        "none",
        // In-process agents share the test's (root) network namespace: never program it.
        "--dataplane",
        "none",
    ])
}

/// Starts an agent with `dataplane`.
pub async fn start_agent(args: switchyard_agent::Args, dataplane: Box<dyn DataPlane>) -> Agent {
    let admin = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binding admin listener");
    switchyard_agent::start_with(args, admin, dataplane, CancellationToken::new())
        .await
        .expect("agent starts")
}

/// Starts an agent with the recording `none` data plane; returns what it records.
pub async fn start_recording_agent(args: switchyard_agent::Args) -> (Agent, Arc<Mutex<Recorded>>) {
    let dp = NoneDataPlane::default();
    let rec = dp.recorded();
    (start_agent(args, Box::new(dp)).await, rec)
}

/// Waits until the agent has `version` in force.
pub async fn agent_at_version(agent: &Agent, version: &str) {
    let mut rx = agent.state.clone();
    within(
        &format!("agent to apply {version}"),
        rx.wait_for(|s| s.version == version),
    )
    .await
    .expect("agent state channel open");
}

/// A data plane that rejects any state holding a Service whose name starts
/// with `reject-`, and records every version it was asked to apply.
#[derive(Debug, Default, Clone)]
pub struct PickyDataPlane {
    /// Versions offered, in order, with whether they were accepted.
    pub offered: Arc<Mutex<Vec<(String, bool)>>>,
}

impl DataPlane for PickyDataPlane {
    fn name(&self) -> &'static str {
        "picky"
    }

    fn apply(&mut self, change: &Change<'_>) -> Result<(), ApplyError> {
        let bad = change
            .state
            .resources
            .values()
            .find(|r| r.state.service.key.name.starts_with("reject-"));
        let ok = bad.is_none();
        self.offered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((change.state.version.clone(), ok));
        match bad {
            Some(r) => Err(ApplyError::Refused(format!(
                "Service {}: refused by the test data plane",
                r.state.service.key
            ))),
            None => Ok(()),
        }
    }
}

/// GETs `http://addr/path` and parses JSON.
pub async fn get_json(addr: std::net::SocketAddr, path: &str) -> serde_json::Value {
    reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("admin endpoint answers")
        .json()
        .await
        .expect("JSON body")
}

/// GETs `http://addr/path` and returns status and body.
pub async fn get_text(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect("admin endpoint answers");
    (r.status().as_u16(), r.text().await.expect("body"))
}

/// A Service manifest with one port and an EndpointSlice of `endpoints` addresses.
pub fn service_yaml(ns: &str, name: &str, port: u16, endpoints: &[&str]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  namespace: {ns}\n  name: {name}\nspec:\n  ports:\n  - name: http\n    port: {port}\n    targetPort: 8080\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  namespace: {ns}\n  name: {name}-1\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\nendpoints:\n"
    );
    for ip in endpoints {
        y.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions:\n    ready: true\n"
        ));
    }
    y
}

/// Control-plane arguments for a `kube` source reading `kubeconfig` (the
/// path is passed as a flag: tests run in parallel threads and must not
/// touch the process environment), plus `extra` flags (a 20 ms debounce
/// unless they set one).
pub fn kube_cp_args(
    kubeconfig: &Path,
    state_dir: &Path,
    extra: &[&str],
) -> switchyard_control_plane::Args {
    let mut argv: Vec<String> = vec![
        "switchyard-control-plane".into(),
        "--source".into(),
        "kube".into(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--state-dir".into(),
        state_dir.display().to_string(),
    ];
    if !extra.contains(&"--debounce") {
        argv.extend(["--debounce".into(), "20ms".into()]);
    }
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    <switchyard_control_plane::Args as clap::Parser>::parse_from(argv)
}

/// One state a data plane was asked to apply.
#[derive(Debug, Clone)]
pub struct Applied {
    /// Its snapshot version.
    pub version: String,
    /// Resource names (`cluster/namespace/name`) and their resource versions.
    pub resources: std::collections::BTreeMap<String, String>,
}

/// A data plane that records every state it applies, in order (a watch on
/// the agent's state could skip a short-lived one; this cannot).
#[derive(Debug, Default, Clone)]
pub struct HistoryDataPlane {
    /// Every state applied, oldest first.
    pub history: Arc<Mutex<Vec<Applied>>>,
}

impl DataPlane for HistoryDataPlane {
    fn name(&self) -> &'static str {
        "history"
    }

    fn apply(&mut self, change: &Change<'_>) -> Result<(), ApplyError> {
        let resources = change
            .state
            .resources
            .iter()
            .map(|(name, r)| (name.clone(), r.version.clone()))
            .collect();
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Applied {
                version: change.state.version.clone(),
                resources,
            });
        Ok(())
    }
}

impl HistoryDataPlane {
    /// Names that disappeared from an applied state after being in an
    /// earlier one, except those in `allowed` (really deleted).
    pub fn flapped(&self, allowed: &[&str]) -> Vec<String> {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let mut flapped = std::collections::BTreeSet::new();
        for state in history.iter() {
            for name in &seen {
                if !state.resources.contains_key(name) && !allowed.contains(&name.as_str()) {
                    flapped.insert(name.clone());
                }
            }
            seen.extend(state.resources.keys().cloned());
        }
        flapped.into_iter().collect()
    }

    /// How many states were applied.
    pub fn applied(&self) -> usize {
        self.history.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}
