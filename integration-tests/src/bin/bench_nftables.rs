//! Benchmark of the nftables data plane beside the iptables one, in the
//! same run, each in a fresh network namespace it creates and deletes.
//! For each size (Services x 10 endpoints), per data plane:
//! - full sync into the fresh namespace;
//! - one endpoint changed (from `apply` called to the commit returned,
//!   median of many: 101 for nftables, 7 for iptables);
//! - the endpoint count of one Service changed (10 -> 9 -> 10, median);
//! - a tenth of the Services changed in one update (one endpoint each).
//!
//! Run as root: `cargo run --release -p switchyard-integration-tests --bin bench_nftables -- 1000 10000`.

use std::time::{Duration, Instant};

use switchyard_agent::dataplane::{Change, DataPlane};
use switchyard_agent::iptables::{Family, IptablesDataPlane, Runner};
use switchyard_agent::nftables::NftablesDataPlane;
use switchyard_agent::state::{AgentState, ChangeSet};
use switchyard_integration_tests::bench::{Netns, cfg, insert, loadavg, ms, percentile, service};

/// What one data plane did at one size.
struct Row {
    plane: &'static str,
    services: usize,
    full: Duration,
    one: f64,
    count: f64,
    tenth: Duration,
}

fn apply(dp: &mut dyn DataPlane, state: &AgentState, changes: &ChangeSet, full: bool) -> Duration {
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

fn measure(plane: &'static str, n: usize, rounds: u32) -> Row {
    let ns = Netns::new(plane);
    let mut dp: Box<dyn DataPlane> = match plane {
        "nftables" => Box::new(NftablesDataPlane::in_netns(cfg(), vec![Family::V4], &ns.0)),
        _ => Box::new(IptablesDataPlane::with_runner(
            cfg(),
            vec![Family::V4],
            Runner::in_netns(&ns.0),
        )),
    };
    let mut state = AgentState::default();
    let names: Vec<String> = (0..n).map(|i| insert(&mut state, service(i, 0))).collect();
    let full = apply(dp.as_mut(), &state, &changed(names), true);

    // One endpoint changed, each round on another Service.
    let mut one = Vec::new();
    for round in 1..=rounds {
        let i = (round as usize * 7919) % n;
        let name = insert(&mut state, service(i, round));
        one.push(ms(apply(dp.as_mut(), &state, &changed(vec![name]), false)));
    }
    // The endpoint count: 10 -> 9 -> 10 on one Service.
    let mut count = Vec::new();
    for round in 0..rounds {
        let mut s = service(n / 2, 0);
        if round % 2 == 0 {
            s.slices[0].endpoints.pop();
        }
        let name = insert(&mut state, s);
        count.push(ms(apply(dp.as_mut(), &state, &changed(vec![name]), false)));
    }
    // A tenth of the Services, one endpoint each, in one update.
    let tenth: Vec<String> = (0..n / 10)
        .map(|k| insert(&mut state, service(k * 10, 200)))
        .collect();
    let tenth = apply(dp.as_mut(), &state, &changed(tenth), false);
    Row {
        plane,
        services: n,
        full,
        one: median(one),
        count: median(count),
        tenth,
    }
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    println!("load average at start: {}", loadavg());
    let mut rows = Vec::new();
    for &n in &sizes {
        rows.push(measure("nftables", n, 101));
        rows.push(measure("iptables", n, 7));
    }
    println!(
        "| data plane | services x 10 endpoints | full sync | one endpoint changed (median) | endpoint count changed (median) | a tenth of the Services changed in one update |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} s | {:.2} ms | {:.2} ms | {:.0} ms |",
            r.plane,
            r.services,
            r.full.as_secs_f64(),
            r.one,
            r.count,
            ms(r.tenth),
        );
    }
    println!("load average at end: {}", loadavg());
}
