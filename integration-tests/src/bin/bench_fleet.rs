//! `bench_fleet`: three clusters behind control planes, direct and through
//! a hub, beside a single cluster measured in the same run. Markdown on
//! stdout, progress on stderr.
//!
//! ```text
//!  this process: 3 API-server stand-ins (east, west, north: S Services each,
//!                a tenth exported) and A agents per cluster (none data plane)
//!  child processes (release switchyard-control-plane, RSS from /proc):
//!    single:  one control plane, --source kube:east=east            (agents of east)
//!    direct:  one control plane, --source kube:C=C for every C      (agents of every C)
//!    relay:   cp-C: --source kube:C=C --source switchyard:HUB=clusterset, for every C,
//!             hub:  --source switchyard:CP-C=C for every C          (agents of C on cp-C)
//! ```
//!
//! Per setup: spawn until every control plane's `/readyz` is 200 (the
//! first merged snapshot), control-plane memory, then N changes of one
//! endpoint of an exported Service of east, each timed from the write to
//! the moment every agent of every cluster holds it (east's agents in
//! east's own Service, every agent in the import). The single cluster also
//! times changes of a Service that is not exported (east's agents only):
//! a change there crosses one source debounce and the index's patch.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use serde_json::{Value, json};
use switchyard_agent::Agent;
use switchyard_agent::dataplane::NoneDataPlane;
use switchyard_integration_tests::apiserver::{FakeApiServer, Kind, ServerConfig, Store};
use switchyard_integration_tests::bench::{
    loadavg, proc_status_kib, reserve_port, summary, wait_ready,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(300);
const CLUSTERS: [&str; 3] = ["east", "west", "north"];

#[derive(Debug, Parser)]
#[command(name = "bench_fleet", about = "Multi-cluster and relay benchmarks")]
struct Cli {
    /// Services per cluster (one EndpointSlice each).
    #[arg(long, default_value_t = 5_000)]
    services: usize,
    /// Endpoints per slice.
    #[arg(long, default_value_t = 3)]
    endpoints: usize,
    /// One Service in this many is exported.
    #[arg(long, default_value_t = 10)]
    export_every: usize,
    /// Agents per cluster.
    #[arg(long, default_value_t = 2)]
    agents: usize,
    /// Endpoint changes timed per setup.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// --debounce of every control plane.
    #[arg(long, default_value = "100ms")]
    debounce: String,
}

fn service(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": format!("ns-{}", i % 20), "name": format!("svc-{i}")},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

/// Slice of Service `i` in cluster number `c`, generation `g`.
fn slice(c: usize, i: usize, g: usize, endpoints: usize) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|e| {
            let n = i * endpoints + e;
            json!({"addresses": [format!("10.{}.{}.{}", 64 + c * 16 + g % 16, (n >> 8) & 255, n & 255)],
                   "conditions": {"ready": true}})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": format!("ns-{}", i % 20), "name": format!("svc-{i}-abcde"),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    })
}

fn export(i: usize) -> Value {
    json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
           "metadata": {"namespace": format!("ns-{}", i % 20), "name": format!("svc-{i}")}})
}

/// A control plane in its own process.
struct Child {
    name: String,
    process: tokio::process::Child,
    grpc: String,
    admin: String,
}

impl Child {
    async fn spawn(
        name: &str,
        args: &[String],
        dir: &std::path::Path,
        debounce: &str,
    ) -> anyhow::Result<Self> {
        Self::spawn_on(reserve_port().await?, name, args, dir, debounce).await
    }

    /// The same, with its gRPC listener on `grpc`.
    async fn spawn_on(
        grpc: String,
        name: &str,
        args: &[String],
        dir: &std::path::Path,
        debounce: &str,
    ) -> anyhow::Result<Self> {
        let bin = std::env::current_exe()?
            .parent()
            .context("bench binary has a directory")?
            .join("switchyard-control-plane");
        let admin = reserve_port().await?;
        let process = tokio::process::Command::new(&bin)
            .args(args)
            .args([
                "--grpc-listen",
                &grpc,
                "--admin-listen",
                &admin,
                "--state-dir",
                &dir.join(name).display().to_string(),
                "--debounce",
                debounce,
                "--relay-name",
                name,
            ])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            name: name.to_owned(),
            process,
            grpc,
            admin,
        })
    }

    fn rss_mib(&self) -> f64 {
        let pid = self.process.id().unwrap_or(0).to_string();
        proc_status_kib(&pid, "VmRSS") as f64 / 1024.0
    }

    fn hwm_mib(&self) -> f64 {
        let pid = self.process.id().unwrap_or(0).to_string();
        proc_status_kib(&pid, "VmHWM") as f64 / 1024.0
    }
}

/// `cluster`'s agents on the control plane at `grpc`.
async fn agents(
    cluster: &str,
    n: usize,
    grpc: &str,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<Agent>> {
    let mut out = Vec::new();
    for a in 0..n {
        let node = format!("{cluster}-node-{a}-{}", grpc.replace([':', '.'], "-"));
        let mut args = switchyard_integration_tests::agent_args(
            &node,
            &format!("http://{grpc}"),
            &dir.join(&node),
        );
        args.cluster = cluster.into();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        out.push(
            switchyard_agent::start_with(
                args,
                listener,
                Box::new(NoneDataPlane::default()),
                CancellationToken::new(),
            )
            .await?,
        );
    }
    Ok(out)
}

/// Whether `agent` holds `address` in resource `name`.
fn holds(agent: &Agent, name: &str, address: &str) -> bool {
    agent.state.borrow().resources.get(name).is_some_and(|r| {
        r.state.slices.iter().any(|s| {
            s.endpoints
                .iter()
                .any(|e| e.addresses.iter().any(|a| a.to_string() == address))
        })
    })
}

async fn wait_holds(agent: &Agent, name: &str, address: &str) -> anyhow::Result<()> {
    let mut rx = agent.state.clone();
    tokio::time::timeout(DEADLINE, async {
        while !holds(agent, name, address) {
            rx.changed().await?;
        }
        Ok::<(), anyhow::Error>(())
    })
    .await
    .with_context(|| format!("{name} never held {address}"))?
}

/// Times `changes` writes to the slice of east's `svc-I` until every agent
/// holds them: east's agents in east's Service, and every agent in the
/// import when the Service is exported (`svc-0` is; `svc-1` is not, unless
/// every Service is).
async fn changes(
    cli: &Cli,
    east: &Store,
    generation: &mut usize,
    fleet: &[(&str, &[Agent])],
    i: usize,
) -> anyhow::Result<Vec<f64>> {
    let exported = i.is_multiple_of(cli.export_every);
    let (own, import) = (
        format!("east/ns-{}/svc-{i}", i % 20),
        format!("clusterset/ns-{}/svc-{i}", i % 20),
    );
    let mut times = Vec::new();
    for _ in 0..cli.changes {
        *generation += 1;
        let s = slice(0, i, *generation, cli.endpoints);
        let address = s["endpoints"][0]["addresses"][0]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let t = Instant::now();
        east.update(Kind::EndpointSlice, s)
            .map_err(|e| anyhow::anyhow!(e.message))?;
        for (cluster, agents) in fleet {
            for agent in agents.iter() {
                if *cluster == "east" {
                    wait_holds(agent, &own, &address).await?;
                }
                if exported {
                    wait_holds(agent, &import, &address).await?;
                }
            }
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
        // A quiet gap, so that changes do not coalesce.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(times)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let dir = tempfile::tempdir()?;
    let load_start = loadavg();

    let mut apis = Vec::new();
    let mut kubeconfig = String::from("apiVersion: v1\nkind: Config\nclusters:\n");
    let mut contexts = String::from("contexts:\n");
    for (c, name) in CLUSTERS.iter().enumerate() {
        eprintln!("populating {name}: {} Services", cli.services);
        let store = Store::new(1_000_000);
        for i in 0..cli.services {
            let e =
                |e: switchyard_integration_tests::apiserver::ApiError| anyhow::anyhow!(e.message);
            store.create(Kind::Service, service(i)).map_err(e)?;
            store
                .create(Kind::EndpointSlice, slice(c, i, 0, cli.endpoints))
                .map_err(e)?;
            if i % cli.export_every == 0 {
                store.create(Kind::ServiceExport, export(i)).map_err(e)?;
            }
        }
        let api = FakeApiServer::start_with(
            TcpListener::bind("127.0.0.1:0").await?,
            store,
            ServerConfig {
                bookmark_interval: Duration::from_secs(60),
                ..ServerConfig::default()
            },
        )?;
        kubeconfig.push_str(&format!(
            "- name: {name}\n  cluster:\n    server: {}\n",
            api.url()
        ));
        contexts.push_str(&format!(
            "- name: {name}\n  context:\n    cluster: {name}\n    user: u\n"
        ));
        apis.push(api);
    }
    kubeconfig.push_str("users:\n- name: u\n  user: {}\n");
    kubeconfig.push_str(&contexts);
    let kubeconfig_path = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig_path, kubeconfig)?;
    // `--source kube:C=C` for each of `clusters`, and the kubeconfig once.
    let kube = |clusters: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = clusters
            .iter()
            .flat_map(|c| ["--source".to_owned(), format!("kube:{c}={c}")])
            .collect();
        args.extend(["--kubeconfig".into(), kubeconfig_path.display().to_string()]);
        args
    };
    let east = apis[0].store().clone();
    let mut generation = 0;
    let mut rows: Vec<String> = Vec::new();

    // Every agent holds its cluster's Services and the imports (east's
    // exports alone make imports too in the single-cluster setup).
    let exported = cli.services.div_ceil(cli.export_every);
    let per_agent = cli.services + exported;

    // Single cluster: the baseline.
    {
        let t = Instant::now();
        let mut cp = Child::spawn("single", &kube(&["east"]), dir.path(), &cli.debounce).await?;
        wait_ready(&cp.admin, &mut cp.process, DEADLINE).await?;
        let ready = t.elapsed();
        let east_agents = agents("east", cli.agents, &cp.grpc, dir.path()).await?;
        let t = Instant::now();
        for a in &east_agents {
            let mut rx = a.state.clone();
            tokio::time::timeout(DEADLINE, rx.wait_for(|s| s.resources.len() == per_agent))
                .await??;
        }
        let synced = t.elapsed();
        let fleet = [("east", east_agents.as_slice())];
        let mut times = changes(&cli, &east, &mut generation, &fleet, 0).await?;
        let s = summary(&mut times);
        eprintln!("single: ready {ready:?}, agents synced {synced:?}, change {s}");
        rows.push(format!(
            "| single cluster (east only): 1 control plane, {} agents | {:.2} s | {:.0} / {:.0} MiB | {} / {} / {} ms |",
            cli.agents, ready.as_secs_f64(), cp.rss_mib(), cp.hwm_mib(), s["p50"], s["p99"], s["max"]
        ));
        // The same, a Service that is not exported: the change crosses the
        // source's one debounce and the index's patch, nothing else.
        let mut times = changes(&cli, &east, &mut generation, &fleet, 1).await?;
        let s = summary(&mut times);
        eprintln!("single, not exported: change {s}");
        rows.push(format!(
            "| single cluster, a Service not exported (`svc-1`) | | | {} / {} / {} ms |",
            s["p50"], s["p99"], s["max"]
        ));
        drop(east_agents);
    }

    // Direct: one control plane watching the three clusters.
    {
        let args = kube(&CLUSTERS);
        let t = Instant::now();
        let mut cp = Child::spawn("direct", &args, dir.path(), &cli.debounce).await?;
        wait_ready(&cp.admin, &mut cp.process, DEADLINE).await?;
        let ready = t.elapsed();
        let mut fleet = Vec::new();
        for c in CLUSTERS {
            fleet.push((c, agents(c, cli.agents, &cp.grpc, dir.path()).await?));
        }
        for (_, list) in &fleet {
            for a in list {
                let mut rx = a.state.clone();
                tokio::time::timeout(DEADLINE, rx.wait_for(|s| s.resources.len() == per_agent))
                    .await??;
            }
        }
        let view: Vec<(&str, &[Agent])> = fleet.iter().map(|(c, a)| (*c, a.as_slice())).collect();
        let mut times = changes(&cli, &east, &mut generation, &view, 0).await?;
        let s = summary(&mut times);
        eprintln!("direct: ready {ready:?}, change {s}");
        rows.push(format!(
            "| direct: 1 control plane over 3 clusters, {} agents | {:.2} s | {:.0} / {:.0} MiB | {} / {} / {} ms |",
            3 * cli.agents, ready.as_secs_f64(), cp.rss_mib(), cp.hwm_mib(), s["p50"], s["p99"], s["max"]
        ));
    }

    // Relay: a control plane per cluster, one hub.
    {
        let hub_grpc = reserve_port().await?;
        let mut cps = Vec::new();
        let t = Instant::now();
        for c in CLUSTERS {
            let mut args = kube(&[c]);
            args.extend([
                "--source".into(),
                format!("switchyard:http://{hub_grpc}=clusterset"),
            ]);
            cps.push(Child::spawn(&format!("cp-{c}"), &args, dir.path(), &cli.debounce).await?);
        }
        let hub_args: Vec<String> = CLUSTERS
            .iter()
            .zip(&cps)
            .flat_map(|(c, cp)| {
                [
                    "--source".to_owned(),
                    format!("switchyard:http://{}={c}", cp.grpc),
                ]
            })
            .collect();
        // The hub on the reserved port the cluster control planes follow.
        let mut hub =
            Child::spawn_on(hub_grpc, "hub", &hub_args, dir.path(), &cli.debounce).await?;
        wait_ready(&hub.admin, &mut hub.process, DEADLINE).await?;
        for cp in &mut cps {
            wait_ready(&cp.admin, &mut cp.process, DEADLINE).await?;
        }
        let ready = t.elapsed();
        let mut fleet = Vec::new();
        for (c, cp) in CLUSTERS.iter().zip(&cps) {
            fleet.push((*c, agents(c, cli.agents, &cp.grpc, dir.path()).await?));
        }
        for (_, list) in &fleet {
            for a in list {
                let mut rx = a.state.clone();
                tokio::time::timeout(DEADLINE, rx.wait_for(|s| s.resources.len() == per_agent))
                    .await??;
            }
        }
        let view: Vec<(&str, &[Agent])> = fleet.iter().map(|(c, a)| (*c, a.as_slice())).collect();
        let mut times = changes(&cli, &east, &mut generation, &view, 0).await?;
        let s = summary(&mut times);
        eprintln!("relay: ready {ready:?}, change {s}");
        let memory: Vec<String> = cps
            .iter()
            .chain(std::iter::once(&hub))
            .map(|c| format!("{} {:.0}", c.name, c.rss_mib()))
            .collect();
        rows.push(format!(
            "| relay: 3 cluster control planes + 1 hub, {} agents | {:.2} s | {} MiB | {} / {} / {} ms |",
            3 * cli.agents, ready.as_secs_f64(), memory.join(", "), s["p50"], s["p99"], s["max"]
        ));
    }

    println!(
        "{} Services per cluster x {} endpoints, one in {} exported ({} imports), debounce {}, load {} -> {}\n",
        cli.services,
        cli.endpoints,
        cli.export_every,
        exported,
        cli.debounce,
        load_start,
        loadavg()
    );
    println!(
        "| setup | spawn to every `/readyz` 200 (first merged snapshot) | control-plane RSS (now / peak) | one endpoint change in east until every agent of every cluster holds it: p50 / p99 / max of {} |",
        cli.changes
    );
    println!("|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(())
}
