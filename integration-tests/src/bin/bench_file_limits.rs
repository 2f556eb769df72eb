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
//!
//! `bench_file_limits scale` measures issue 28's `file:` figures instead,
//! each load in a child process of its own (so that its peak RSS is its own):
//!
//! ```text
//!  N Services x E endpoints, one port (the compact manifests of the tests),
//!  one file, `---` per object (YAML) or one `List` (JSON); `--no-parse`
//!  skips the parse floors, `--no-edits` the edits
//!    ├─▶ load: FileSource until synced; time and peak RSS
//!    ├─▶ parse floor: serde-saphyr alone on the same bytes (into serde_json::Value,
//!    │   and into IgnoredAny), serde_json alone on the JSON; for YAML also its
//!    │   event parser alone (granit-parser), and serde-saphyr one document at a
//!    │   time as the loader parses (both on one core)
//!    └─▶ edits: one document of a 5,000-Service file, or a small file beside a
//!        100,000-Service one: Reloader::reload (reload start to SourceState
//!        returned), and that plus publishing into a watch channel; p50/p99
//! ```

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use switchyard_control_plane::source::debounce::Debounce;
use switchyard_control_plane::source::file::{FileSource, Reloader};
use switchyard_control_plane::source::{Source, SourceState};
use switchyard_integration_tests::bench::{ms, percentile, proc_status_kib};
use switchyard_model::ServiceKey;
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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Issue 28's figures: load, parse floor and edit cost (see the module docs).
    Scale {
        /// Services of the files loaded (comma-separated sizes).
        #[arg(long, default_value = "10000,100000", value_delimiter = ',')]
        sizes: Vec<usize>,
        /// Endpoints per slice.
        #[arg(long, default_value_t = 10)]
        endpoints: usize,
        /// Services of the file one document of which is edited.
        #[arg(long, default_value_t = 5_000)]
        edited: usize,
        /// Services of the file beside which a small file is edited.
        #[arg(long, default_value_t = 100_000)]
        beside: usize,
        /// Edits per case.
        #[arg(long, default_value_t = 20)]
        edits: usize,
        /// Skip the JSON loads.
        #[arg(long)]
        no_json: bool,
        /// Skip the parse floors (the parsers alone on the same bytes).
        #[arg(long)]
        no_parse: bool,
        /// Skip the edits: the loads (and their parse floors) only.
        #[arg(long)]
        no_edits: bool,
    },
    /// Child: loads DIR with the file source; prints a JSON line.
    #[command(hide = true)]
    Load { dir: PathBuf, services: usize },
    /// Child: parses FILE with the parser alone; prints a JSON line.
    #[command(hide = true)]
    Parse { file: PathBuf },
    /// Child: edits FILE in DIR (Service `edit-svc` of its own when
    /// `small`, else Service `svc-K` of a `services`-Service file); prints a JSON line.
    #[command(hide = true)]
    Edit {
        dir: PathBuf,
        file: PathBuf,
        services: usize,
        endpoints: usize,
        edits: usize,
        #[arg(long)]
        small: bool,
    },
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

/// Loads `dir` with the real file source; returns the time until synced,
/// the state, and the resident size and heap in use (MiB) right then, the
/// source still running.
async fn load_measured(
    dir: &Path,
    services: usize,
) -> anyhow::Result<(Duration, SourceState, f64, Option<f64>)> {
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
    let rss = proc_status_kib("self", "VmRSS") as f64 / 1024.0;
    let heap = switchyard_heap::usage().map(|u| u.in_use as f64 / 1_048_576.0);
    shutdown.cancel();
    task.await?;
    Ok((elapsed, state, rss, heap))
}

/// Loads `dir` with the real file source; returns the time until synced.
async fn load(dir: &Path, services: usize) -> anyhow::Result<(Duration, SourceState)> {
    let (elapsed, state, _, _) = load_measured(dir, services).await?;
    Ok((elapsed, state))
}

/// The endpoint addresses of Service `i` (edit generation `generation`).
fn endpoint_ips(i: usize, endpoints: usize, generation: usize) -> Vec<String> {
    (0..endpoints)
        .map(|j| {
            let n = i * endpoints + j + generation * 7;
            format!("10.{}.{}.{}", 128 + n / 65_536 % 64, n / 256 % 256, n % 256)
        })
        .collect()
}

/// Service `i` and its slice as YAML documents (`---` between them).
fn compact_yaml(i: usize, endpoints: usize, generation: usize) -> String {
    let ips = endpoint_ips(i, endpoints, generation);
    let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
    switchyard_integration_tests::service_yaml(
        &format!("ns-{}", i % 100),
        &format!("svc-{i}"),
        80,
        &ips,
    )
}

/// `services` Services, `---` per object; Service `edit` at `generation`.
fn compact_file(services: usize, endpoints: usize, edit: Option<(usize, usize)>) -> String {
    let mut out = String::new();
    for i in 0..services {
        let generation = match edit {
            Some((k, g)) if k == i => g,
            _ => 0,
        };
        out.push_str("---\n");
        out.push_str(&compact_yaml(i, endpoints, generation));
    }
    out
}

/// The same objects as one JSON `List`.
fn compact_json(services: usize, endpoints: usize) -> String {
    let mut items = Vec::with_capacity(2 * services);
    for i in 0..services {
        let (ns, name) = (format!("ns-{}", i % 100), format!("svc-{i}"));
        items.push(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": ns, "name": name},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }));
        let eps: Vec<Value> = endpoint_ips(i, endpoints, 0)
            .into_iter()
            .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
            .collect();
        items.push(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": format!("{name}-1"),
                "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": eps,
        }));
    }
    serde_json::to_string_pretty(&json!({"apiVersion": "v1", "kind": "List", "items": items}))
        .expect("serialises")
}

/// Runs this binary with `args`; its last stdout line, as JSON.
fn child(args: &[String]) -> anyhow::Result<Value> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("{args:?}: {}", out.status);
    }
    let text = String::from_utf8(out.stdout)?;
    let line = text.lines().last().context("no output")?;
    Ok(serde_json::from_str(line)?)
}

fn peak_mib() -> f64 {
    proc_status_kib("self", "VmHWM") as f64 / 1024.0
}

fn p50_p99(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let r = |x: f64| (x * 100.0).round() / 100.0;
    json!({"p50": r(percentile(&v, 50.0)), "p99": r(percentile(&v, 99.0)), "n": v.len()})
}

async fn child_load(dir: &Path, services: usize) -> anyhow::Result<()> {
    let (elapsed, state, rss, heap) = load_measured(dir, services).await?;
    // The source stopped: what is left is the state it published (the
    // objects any source would hold), beside the runtime.
    let state_alone = switchyard_heap::usage().map(|u| (u.in_use as f64 / 1_048_576.0).round());
    if state.services.len() != services {
        bail!(
            "{} Services loaded; errors: {:?}",
            state.services.len(),
            state.errors.first()
        );
    }
    let (services_n, slices_n) = (state.services.len(), state.slices.len());
    let (errors, warnings) = (state.errors.len(), state.warnings.len());
    // What the slices alone hold: the state's heap with and without them.
    let SourceState { slices, .. } = state;
    drop(slices);
    let without_slices = switchyard_heap::usage().map(|u| (u.in_use as f64 / 1_048_576.0).round());
    let slices_mib = state_alone.zip(without_slices).map(|(a, b)| a - b);
    println!(
        "{}",
        json!({"load_ms": ms(elapsed).round(), "peak_mib": peak_mib().round(),
            "rss_when_synced_mib": rss.round(), "heap_in_use_when_synced_mib": heap.map(f64::round),
            "heap_in_use_state_alone_mib": state_alone, "heap_in_use_slices_mib": slices_mib,
            "services": services_n, "slices": slices_n,
            "errors": errors, "warnings": warnings})
    );
    Ok(())
}

fn child_parse(file: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(file)?;
    let text = std::str::from_utf8(&bytes)?;
    let mut unlimited = serde_saphyr::Budget::default();
    unlimited.max_documents = usize::MAX;
    unlimited.max_nodes = usize::MAX;
    unlimited.max_events = usize::MAX;
    unlimited.max_total_scalar_bytes = usize::MAX;
    let options =
        || serde_saphyr::options! { with_snippet: false, budget: Some(unlimited.clone()) };
    let t = Instant::now();
    let ignored: Vec<serde::de::IgnoredAny> =
        serde_saphyr::from_multiple_with_options(text, options())?;
    let ignored_ms = ms(t.elapsed());
    let t = Instant::now();
    let values: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options())?;
    let value_ms = ms(t.elapsed());
    let mut out = json!({"bytes": bytes.len(), "documents": ignored.len().max(values.len()),
        "saphyr_ignored_ms": ignored_ms.round(), "saphyr_value_ms": value_ms.round()});
    drop(values);
    if file.extension().is_some_and(|e| e == "yaml") {
        // The floor of any loader built on serde-saphyr: its event parser
        // alone over the whole stream, on one core, making nothing.
        let t = Instant::now();
        let mut parser = granit_parser::Parser::new_from_str(text);
        let mut events = 0u64;
        while let Some(event) = parser.next_event() {
            event.map_err(|e| anyhow::anyhow!("{e}"))?;
            events += 1;
        }
        out["scanner_events"] = json!(events);
        out["scanner_ms"] = json!(ms(t.elapsed()).round());
        // Close to what the loader does on each core: one document at a
        // time into a `Value` (without its budget report), here all of
        // them on this one.
        let t = Instant::now();
        let mut documents = 0usize;
        for piece in text.split("---\n").filter(|p| !p.is_empty()) {
            let v: Value = serde_saphyr::from_str_with_options(piece, options())?;
            documents += usize::from(!v.is_null());
        }
        out["saphyr_per_document_value_ms"] = json!(ms(t.elapsed()).round());
        out["per_document_documents"] = json!(documents);
    }
    if file.extension().is_some_and(|e| e == "json") {
        let t = Instant::now();
        let v: Value = serde_json::from_slice(&bytes)?;
        out["serde_json_value_ms"] = json!(ms(t.elapsed()).round());
        drop(v);
    }
    println!("{out}");
    Ok(())
}

fn child_edit(
    dir: &Path,
    file: &Path,
    services: usize,
    endpoints: usize,
    edits: usize,
    small: bool,
) -> anyhow::Result<()> {
    let mut reloader = Reloader::new(vec![dir.to_path_buf()], "default".into());
    let (tx, _rx) = watch::channel(SourceState::default());
    let t = Instant::now();
    let first = reloader.reload();
    let first_ms = ms(t.elapsed());
    switchyard_control_plane::source::publish(&tx, "bench", first);
    // Unmeasured: a reload with nothing changed (a file written less than
    // a moment before it was read may be read again once).
    let t = Instant::now();
    let idle = reloader.reload();
    let idle_ms = ms(t.elapsed());
    switchyard_control_plane::source::publish(&tx, "bench", idle);
    let (mut reload, mut published) = (Vec::new(), Vec::new());
    for e in 1..=edits {
        let (key, text) = if small {
            let text = switchyard_integration_tests::service_yaml(
                "small",
                "edit-svc",
                80,
                &[&format!("10.250.{}.{}", e / 250, e % 250 + 1)],
            );
            ("edit-svc".to_owned(), text)
        } else {
            let k = (e * 7_919) % services;
            (
                format!("svc-{k}"),
                compact_file(services, endpoints, Some((k, e))),
            )
        };
        std::fs::write(file, &text)?;
        drop(text);
        let t = Instant::now();
        let state = reloader.reload();
        reload.push(ms(t.elapsed()));
        let changed = switchyard_control_plane::source::publish(&tx, "bench", state);
        published.push(ms(t.elapsed()));
        let (ns, expected) = if small {
            (
                "small".to_owned(),
                format!("10.250.{}.{}", e / 250, e % 250 + 1),
            )
        } else {
            let k: usize = key.trim_start_matches("svc-").parse()?;
            (
                format!("ns-{}", k % 100),
                endpoint_ips(k, endpoints, e)[0].clone(),
            )
        };
        let got = tx
            .borrow()
            .slices
            .get(&(ServiceKey::new("default", &ns, &key), format!("{key}-1")))
            .and_then(|s| s.slice.endpoints.first()?.addresses.first().copied());
        if !changed || got.map(|a| a.to_string()) != Some(expected) {
            bail!("edit {e}: not published ({got:?})");
        }
    }
    let s = tx.borrow();
    println!(
        "{}",
        json!({"first_load_ms": first_ms.round(), "idle_reload_ms": (idle_ms * 100.0).round() / 100.0,
            "reload_ms": p50_p99(reload), "reload_and_publish_ms": p50_p99(published),
            "services": s.services.len(), "errors": s.errors.len(), "peak_mib": peak_mib().round()})
    );
    Ok(())
}

#[allow(
    clippy::too_many_lines,
    clippy::too_many_arguments,
    clippy::fn_params_excessive_bools
)]
async fn scale(
    sizes: &[usize],
    endpoints: usize,
    edited: usize,
    beside: usize,
    edits: usize,
    no_json: bool,
    no_parse: bool,
    no_edits: bool,
) -> anyhow::Result<()> {
    let base = tempfile::tempdir()?;
    let s = |x: &dyn std::fmt::Display| x.to_string();
    println!(
        "## file source at scale: {endpoints} endpoints per slice, one port; load {}\n",
        switchyard_integration_tests::bench::loadavg()
    );
    for &n in sizes {
        let dir = base.path().join(format!("yaml-{n}"));
        std::fs::create_dir(&dir)?;
        let file = dir.join("services.yaml");
        std::fs::write(&file, compact_file(n, endpoints, None))?;
        let load = child(&[s(&"load"), s(&dir.display()), s(&n)])?;
        println!("load, YAML `---` per object, {n} Services: {load}");
        if !no_parse {
            let parse = child(&[s(&"parse"), s(&file.display())])?;
            println!("parse floor, same YAML bytes: {parse}");
        }
        std::fs::remove_dir_all(&dir)?;
        if !no_json {
            let dir = base.path().join(format!("json-{n}"));
            std::fs::create_dir(&dir)?;
            let file = dir.join("services.json");
            std::fs::write(&file, compact_json(n, endpoints))?;
            let load = child(&[s(&"load"), s(&dir.display()), s(&n)])?;
            println!("load, JSON List, {n} Services: {load}");
            if !no_parse {
                let parse = child(&[s(&"parse"), s(&file.display())])?;
                println!("parse floor, same JSON bytes: {parse}");
            }
            std::fs::remove_dir_all(&dir)?;
        }
    }
    if no_edits {
        return Ok(());
    }
    let dir = base.path().join("edited");
    std::fs::create_dir(&dir)?;
    let file = dir.join("services.yaml");
    std::fs::write(&file, compact_file(edited, endpoints, None))?;
    let edit = child(&[
        s(&"edit"),
        s(&dir.display()),
        s(&file.display()),
        s(&edited),
        s(&endpoints),
        s(&edits),
    ])?;
    println!("edit one document of a {edited}-Service file: {edit}");
    std::fs::remove_dir_all(&dir)?;
    let dir = base.path().join("beside");
    std::fs::create_dir(&dir)?;
    std::fs::write(
        dir.join("a-services.yaml"),
        compact_file(beside, endpoints, None),
    )?;
    let file = dir.join("b-small.yaml");
    std::fs::write(
        &file,
        switchyard_integration_tests::service_yaml("small", "edit-svc", 80, &["10.250.0.1"]),
    )?;
    let edit = child(&[
        s(&"edit"),
        s(&dir.display()),
        s(&file.display()),
        s(&1),
        s(&1),
        s(&edits),
        s(&"--small"),
    ])?;
    println!("edit a small file beside a {beside}-Service file: {edit}");
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        None => {}
        Some(Command::Scale {
            sizes,
            endpoints,
            edited,
            beside,
            edits,
            no_json,
            no_parse,
            no_edits,
        }) => {
            return scale(
                &sizes, endpoints, edited, beside, edits, no_json, no_parse, no_edits,
            )
            .await;
        }
        Some(Command::Load { dir, services }) => return child_load(&dir, services).await,
        Some(Command::Parse { file }) => return child_parse(&file),
        Some(Command::Edit {
            dir,
            file,
            services,
            endpoints,
            edits,
            small,
        }) => {
            return child_edit(&dir, &file, services, endpoints, edits, small);
        }
    }
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
