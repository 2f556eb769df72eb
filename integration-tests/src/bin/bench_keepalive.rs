//! `bench_keepalive`: what HTTP/2 keepalive costs at fleet scale. A control
//! plane in this process and `--connections` idle client connections to
//! it (one per agent), whose clients ping every `--interval` seconds and
//! give up after `--timeout`, as the agent does; the control plane pings
//! with its own settings. The process's CPU over `--seconds` of idleness
//! is the pings' cost, both ends (nothing else happens). Run it with the
//! agent's old settings (10 s + 20 s) on a build of the old control plane
//! for the baseline.
//!
//! ```text
//! cargo build --release -p switchyard-integration-tests --bin bench_keepalive
//! target/release/bench_keepalive [--connections 5000] [--seconds 30] [--interval 3] [--timeout 5]
//! ```

use std::time::Duration;

use switchyard_integration_tests::bench::{arg, loadavg, proc_status_kib, process_cpu_seconds};
use switchyard_integration_tests::*;

fn main() -> anyhow::Result<()> {
    let connections = arg("--connections", 5000) as usize;
    let seconds = arg("--seconds", 30);
    let interval = arg("--interval", 3);
    let timeout = arg("--timeout", 5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let env = TestEnv::new();
        env.write("web.yaml", &service_yaml("shop", "web", 80, &["10.244.1.10"]));
        let mut args = env.cp_args();
        args.max_connections = 1_000_000;
        args.max_connections_per_address = 1_000_000;
        let cp = start_cp(args).await;
        let url = format!("http://{}", cp.grpc_addr);
        let mut held = Vec::with_capacity(connections);
        for _ in 0..connections {
            let channel = tonic::transport::Endpoint::from_shared(url.clone())?
                .http2_keep_alive_interval(Duration::from_secs(interval))
                .keep_alive_timeout(Duration::from_secs(timeout))
                .keep_alive_while_idle(true)
                .connect()
                .await?;
            held.push(channel);
        }
        // Let the connections' set-up settle first.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let cpu = process_cpu_seconds("self");
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        let used = process_cpu_seconds("self") - cpu;
        let per = used / seconds as f64;
        println!(
            "| {connections} idle connections, agent pings every {interval} s (timeout {timeout} s) | {:.1}% of a core | {:.1} µs per connection per second | RSS {} MiB | load {} |",
            per * 100.0,
            per * 1e6 / connections as f64,
            proc_status_kib("self", "VmRSS") / 1024,
            loadavg()
        );
        drop(held);
        Ok(())
    })
}
