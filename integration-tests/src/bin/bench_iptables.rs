//! Benchmark of the iptables data plane, in network namespaces it creates
//! and deletes. For each size (services x 10 endpoints):
//! - full sync (discovery + generate + batched `--noflush` restores) into a
//!   fresh namespace, beside a plain `iptables-restore` (flushing the
//!   table, one transaction) of the same rules into another fresh
//!   namespace, and, up to 2,000 Services, beside one `--noflush`
//!   transaction of the same rules (minutes at 10,000);
//! - a full sync by a new data plane over the rules already there (an agent
//!   restart);
//! - one endpoint changed (partial sync), median of several, beside the
//!   smallest transaction that adds a rule to the same nat table (the
//!   kernel revalidates the table at each commit) and beside rewriting a
//!   flat dispatch chain as kube-proxy's partial sync does;
//! - a tenth of the Services changed in one update (one endpoint each);
//! - resident memory of the state plus the data plane's record;
//! - `cleanup`.
//!
//! Run as root: `cargo run --release -p switchyard-integration-tests --bin bench_iptables -- 1000 10000`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_agent::dataplane::{Change, DataPlane, Family, Runner};
use switchyard_agent::iptables::sync::{Existing, FamilyTables};
use switchyard_agent::iptables::{CHAINS_PER_RESTORE, IptablesDataPlane, Table, cleanup, rules};
use switchyard_agent::state::{AgentState, ChangeSet};
use switchyard_integration_tests::bench::{Netns, cfg, insert, service};

/// A `/proc/self/status` figure in KiB (`VmRSS:`, `VmHWM:`).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Row {
    services: usize,
    lines: usize,
    restores: usize,
    full: Duration,
    plain: Duration,
    one_noflush: Option<Duration>,
    restart: Duration,
    partial: Duration,
    floor: Duration,
    storm_services: usize,
    storm: Duration,
    flat: Duration,
    state_mib: f64,
    rss_mib: f64,
    peak_mib: f64,
    cleanup: Duration,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The restore inputs merged into one transaction per table (a plain
/// restore flushes a table at each of its `*table` lines).
fn one_transaction(restores: &[String]) -> String {
    let mut tables: Vec<(String, String, String)> = Vec::new();
    let mut at = 0;
    for line in restores.iter().flat_map(|r| r.lines()) {
        if let Some(name) = line.strip_prefix('*') {
            at = match tables.iter().position(|t| t.0 == name) {
                Some(i) => i,
                None => {
                    tables.push((name.to_owned(), String::new(), String::new()));
                    tables.len() - 1
                }
            };
        } else if line.starts_with(':') {
            tables[at].1.push_str(line);
            tables[at].1.push('\n');
        } else if line != "COMMIT" {
            tables[at].2.push_str(line);
            tables[at].2.push('\n');
        }
    }
    tables
        .into_iter()
        .map(|(name, decls, rules)| format!("*{name}\n{decls}{rules}COMMIT\n"))
        .collect()
}

/// Restores `text` in a fresh namespace with `args`, timed.
fn timed_restore(text: &str, args: &[&str]) -> Duration {
    let file = std::env::temp_dir().join(format!("swy-bench-{}.rules", std::process::id()));
    std::fs::write(&file, text).expect("writing rules");
    let ns = Netns::new("plain");
    let t = Instant::now();
    let ok = Command::new("ip")
        .args(["netns", "exec", &ns.0, "iptables-restore", "-w", "5"])
        .args(args)
        .stdin(std::fs::File::open(&file).expect("rules file"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let took = t.elapsed();
    assert!(ok, "iptables-restore {args:?} failed");
    let _ = std::fs::remove_file(&file);
    took
}

/// Applies `changes` as a partial sync, timed.
fn timed_partial(dp: &mut IptablesDataPlane, state: &AgentState, changes: &ChangeSet) -> Duration {
    let t = Instant::now();
    dp.apply(&Change {
        state,
        changes,
        full: false,
    })
    .expect("partial sync");
    t.elapsed()
}

fn measure(n: usize) -> Row {
    // The agent's side first, so the baselines' buffers do not sit in the
    // allocator when memory is read.
    let rss0 = status_kib("VmRSS:");
    let mut state = AgentState::default();
    for i in 0..n {
        insert(&mut state, service(i, 0));
    }
    let all = ChangeSet {
        changed: state.resources.keys().cloned().collect(),
        removed: Vec::new(),
    };
    let state_mib = mib(status_kib("VmRSS:").saturating_sub(rss0));

    let ns = Netns::new("dp");
    let runner = Runner::in_netns(&ns.0);
    let mut dp = IptablesDataPlane::with_runner(cfg(), vec![Family::V4], runner.clone());
    let t = Instant::now();
    dp.apply(&Change {
        state: &state,
        changes: &all,
        full: true,
    })
    .expect("full sync");
    let full = t.elapsed();
    let rss_mib = mib(status_kib("VmRSS:").saturating_sub(rss0));
    let peak_mib = mib(status_kib("VmHWM:").saturating_sub(rss0));

    // An agent restart: a new data plane rewrites what is there.
    let mut again = IptablesDataPlane::with_runner(cfg(), vec![Family::V4], runner.clone());
    let t = Instant::now();
    again
        .apply(&Change {
            state: &state,
            changes: &all,
            full: true,
        })
        .expect("full sync over existing rules");
    let restart = t.elapsed();
    drop(again);

    let mut partials = Vec::new();
    for round in 1..=7u32 {
        let i = (round as usize * 7919) % n;
        let mut next = state.clone();
        let name = insert(&mut next, service(i, round));
        let changes = ChangeSet {
            changed: vec![name],
            removed: Vec::new(),
        };
        partials.push(timed_partial(&mut dp, &next, &changes));
        state = next;
    }
    partials.sort();
    // A storm: a tenth of the Services change in one update.
    let mut next = state.clone();
    let changed: Vec<String> = (0..n)
        .step_by(10)
        .map(|i| insert(&mut next, service(i, 50)))
        .collect();
    let storm_services = changed.len();
    let changes = ChangeSet {
        changed,
        removed: Vec::new(),
    };
    let storm = timed_partial(&mut dp, &next, &changes);
    state = next;
    // The floor: the smallest transaction that adds a rule to this nat
    // table. The kernel revalidates every rule reachable from the built-in
    // chains at each such commit, so this grows with the table.
    let mut floors = Vec::new();
    for round in 0..7 {
        let t = Instant::now();
        runner
            .restore(
                Family::V4,
                &format!(
                    "*nat\n:SWY-BENCH-{round} - [0:0]\n-A SWY-BENCH-{round} -j RETURN\nCOMMIT\n"
                ),
            )
            .expect("floor transaction");
        floors.push(t.elapsed());
    }
    floors.sort();
    // kube-proxy's way for the same change: its partial sync rewrites the
    // whole dispatch chain, one rule per Service, in the same transaction.
    let mut flat = String::from("*nat\n:SWY-BENCH-FLAT - [0:0]\n");
    for held in state.resources.values() {
        for d in rules::service_rules(&held.state, Family::V4, &cfg()).dispatch {
            if d.table == Table::Nat {
                flat.push_str(&format!("-A SWY-BENCH-FLAT {}\n", d.spec));
            }
        }
    }
    flat.push_str("COMMIT\n");
    let mut flats = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        runner
            .restore(Family::V4, &flat)
            .expect("flat dispatch transaction");
        flats.push(t.elapsed());
    }
    flats.sort();
    let t = Instant::now();
    cleanup(&runner).expect("cleanup");
    let cleanup = t.elapsed();
    drop(ns);

    // The baselines: the same rules as one text, into fresh namespaces.
    let full_text =
        |limit| FamilyTables::full_texts(&state, &cfg(), &Existing::default(), Family::V4, limit).1;
    let text = one_transaction(&full_text(usize::MAX));
    let lines = text.lines().count();
    let restores = full_text(CHAINS_PER_RESTORE).len();
    let plain = timed_restore(&text, &[]);
    let one_noflush = (n <= 2_000).then(|| timed_restore(&text, &["--noflush"]));
    Row {
        services: n,
        lines,
        restores,
        full,
        plain,
        one_noflush,
        restart,
        partial: partials[partials.len() / 2],
        floor: floors[floors.len() / 2],
        storm_services,
        storm,
        flat: flats[flats.len() / 2],
        state_mib,
        rss_mib,
        peak_mib,
        cleanup,
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
    let rows: Vec<Row> = sizes.into_iter().map(measure).collect();
    println!(
        "| services x 10 endpoints | rule lines | full sync (restores) | plain iptables-restore, one transaction | ratio | one --noflush transaction | full sync over existing rules (restart) | one endpoint changed (median of 7) | smallest nat transaction on that table (median of 7) | rewriting a flat dispatch chain, kube-proxy's way (median of 3) | a tenth of the Services changed in one update | agent RSS: state / after full sync / peak | cleanup |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} s ({}) | {:.2} s | {:.2} | {} | {:.2} s | {:.1} ms | {:.1} ms | {:.1} ms | {:.2} s ({}) | {:.0} / {:.0} / {:.0} MiB | {:.2} s |",
            r.services,
            r.lines,
            r.full.as_secs_f64(),
            r.restores,
            r.plain.as_secs_f64(),
            r.full.as_secs_f64() / r.plain.as_secs_f64(),
            r.one_noflush.map_or("not run".to_owned(), |d| format!(
                "{:.2} s",
                d.as_secs_f64()
            )),
            r.restart.as_secs_f64(),
            r.partial.as_secs_f64() * 1e3,
            r.floor.as_secs_f64() * 1e3,
            r.flat.as_secs_f64() * 1e3,
            r.storm.as_secs_f64(),
            r.storm_services,
            r.state_mib,
            r.rss_mib,
            r.peak_mib,
            r.cleanup.as_secs_f64(),
        );
    }
}
