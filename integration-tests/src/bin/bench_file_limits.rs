//! `bench_file_limits`: what the `file:` source's YAML limits must allow
//! for an export of a large cluster, printed as Markdown.
//!
//! ```text
//!  generate `kubectl get svc,endpointslices -A -o yaml`-shaped text (N Services,
//!  one slice of E endpoints each, with the metadata and status an export carries)
//!    ├─▶ serde-saphyr's budget scan, no limits: documents, nodes, events, scalar bytes
//!    └─▶ FileSource (the real loader, with its limits): time and peak memory until synced
//! ```
//!
//! Both shapes: one `List` document, and one document per object (`---`).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use switchyard_control_plane::source::debounce::Debounce;
use switchyard_control_plane::source::file::FileSource;
use switchyard_control_plane::source::{Source, SourceState};
use switchyard_integration_tests::bench::proc_status_kib;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "bench_file_limits",
    about = "file source limits for large exports"
)]
struct Cli {
    /// Services (one EndpointSlice each).
    #[arg(long, default_value_t = 50_000)]
    services: usize,
    /// Endpoints per slice.
    #[arg(long, default_value_t = 3)]
    endpoints: usize,
}

/// One Service and its slice as `kubectl get -o yaml` prints them, at `indent`.
fn objects(i: usize, endpoints: usize, indent: &str) -> [String; 2] {
    let ns = format!("ns-{}", i % 100);
    let name = format!("svc-{i}");
    let ip = format!("10.{}.{}.{}", 96 + i / 65_536 % 16, i / 256 % 256, i % 256);
    let svc = format!(
        "apiVersion: v1
kind: Service
metadata:
  annotations:
    meta.helm.sh/release-name: {name}
  creationTimestamp: \"2026-01-01T00:00:00Z\"
  labels:
    app.kubernetes.io/name: {name}
    app.kubernetes.io/managed-by: Helm
  name: {name}
  namespace: {ns}
  resourceVersion: \"{rv}\"
  uid: 6f1c2a3e-0000-4000-8000-{i:012}
spec:
  clusterIP: {ip}
  clusterIPs:
  - {ip}
  internalTrafficPolicy: Cluster
  ipFamilies:
  - IPv4
  ipFamilyPolicy: SingleStack
  ports:
  - name: http
    port: 80
    protocol: TCP
    targetPort: 8080
  - name: metrics
    port: 9090
    protocol: TCP
    targetPort: 9090
  selector:
    app.kubernetes.io/name: {name}
  sessionAffinity: None
  type: ClusterIP
status:
  loadBalancer: {{}}
",
        rv = 1000 + 2 * i
    );
    let mut eps = String::new();
    for e in 0..endpoints {
        let _ = write!(
            eps,
            "- addresses:
  - 10.244.{}.{}
  conditions:
    ready: true
    serving: true
    terminating: false
  nodeName: node-{}
  targetRef:
    kind: Pod
    name: {name}-{e}
    namespace: {ns}
    uid: 9a8b7c6d-0000-4000-8000-{i:012}
  zone: zone-{}
",
            (i * endpoints + e) / 250 % 256,
            (i * endpoints + e) % 250 + 1,
            e % 50,
            e % 3
        );
    }
    let slice = format!(
        "addressType: IPv4
apiVersion: discovery.k8s.io/v1
endpoints:
{eps}kind: EndpointSlice
metadata:
  annotations:
    endpoints.kubernetes.io/last-change-trigger-time: \"2026-01-01T00:00:00Z\"
  creationTimestamp: \"2026-01-01T00:00:00Z\"
  generateName: {name}-
  generation: 3
  labels:
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
    kubernetes.io/service-name: {name}
  name: {name}-abcde
  namespace: {ns}
  ownerReferences:
  - apiVersion: v1
    blockOwnerDeletion: true
    controller: true
    kind: Service
    name: {name}
    uid: 6f1c2a3e-0000-4000-8000-{i:012}
  resourceVersion: \"{rv}\"
  uid: 1b2c3d4e-0000-4000-8000-{i:012}
ports:
- name: http
  port: 8080
  protocol: TCP
- name: metrics
  port: 9090
  protocol: TCP
",
        rv = 1001 + 2 * i
    );
    [svc, slice].map(|o| {
        o.lines()
            .enumerate()
            .map(|(n, l)| {
                if n == 0 {
                    format!("{indent}{l}\n")
                } else {
                    format!("{}{l}\n", " ".repeat(indent.len()))
                }
            })
            .collect()
    })
}

fn list_export(n: usize, e: usize) -> String {
    let mut out = String::from("apiVersion: v1\nitems:\n");
    for i in 0..n {
        for o in objects(i, e, "- ") {
            out.push_str(&o);
        }
    }
    out.push_str("kind: List\nmetadata:\n  resourceVersion: \"\"\n");
    out
}

fn split_export(n: usize, e: usize) -> String {
    let mut out = String::new();
    for i in 0..n {
        for o in objects(i, e, "") {
            out.push_str("---\n");
            out.push_str(&o);
        }
    }
    out
}

/// Loads `dir` with the real file source; returns the time until synced.
async fn load(dir: &std::path::Path, services: usize) -> anyhow::Result<(Duration, SourceState)> {
    let source = Box::new(FileSource::new(
        vec![dir.to_path_buf()],
        "default".into(),
        Debounce::quiet(Duration::from_millis(100)),
    ));
    let (tx, mut rx) = watch::channel(SourceState::default());
    let shutdown = CancellationToken::new();
    let t = Instant::now();
    let task = tokio::spawn(source.run(tx, shutdown.clone()));
    let state = tokio::time::timeout(
        Duration::from_secs(600),
        rx.wait_for(|s| s.synced && (s.services.len() == services || !s.errors.is_empty())),
    )
    .await
    .context("loading timed out")??
    .clone();
    let elapsed = t.elapsed();
    shutdown.cancel();
    task.await?;
    Ok((elapsed, state))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    println!(
        "## file source limits: {} Services, {} endpoints per slice\n",
        cli.services, cli.endpoints
    );
    println!(
        "| shape | bytes | documents | nodes | events | scalar bytes | max depth | load until synced | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (shape, text) in [
        ("one List", list_export(cli.services, cli.endpoints)),
        ("--- per object", split_export(cli.services, cli.endpoints)),
    ] {
        let mut unlimited = serde_saphyr::Budget::default();
        unlimited.max_documents = usize::MAX;
        unlimited.max_nodes = usize::MAX;
        unlimited.max_events = usize::MAX;
        unlimited.max_total_scalar_bytes = usize::MAX;
        let report = serde_saphyr::budget::check_yaml_budget(
            &text,
            unlimited,
            serde_saphyr::budget::EnforcingPolicy::AllContent,
        )
        .context("scanning")?;
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("export.yaml"), &text)?;
        let bytes = text.len();
        drop(text);
        eprintln!("{shape}: loading {bytes} bytes");
        let (elapsed, state) = load(dir.path(), cli.services).await?;
        if state.services.len() != cli.services {
            bail!(
                "{shape}: {} Services loaded; errors: {:?}",
                state.services.len(),
                state.errors.first()
            );
        }
        println!(
            "| {shape} | {bytes} | {} | {} | {} | {} | {} | {:.1} s | {} MiB |",
            report.documents,
            report.nodes,
            report.events,
            report.total_scalar_bytes,
            report.max_depth,
            elapsed.as_secs_f64(),
            proc_status_kib("self", "VmHWM") / 1024
        );
    }
    Ok(())
}
