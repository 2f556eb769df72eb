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
//!
//! Words among the sizes narrow or change what runs:
//! - `full`: only the full sync and the plain restore beside it (and its
//!   peak RSS), no restart, partial syncs, storm or cleanup;
//! - `partial`: the full sync, then the partial syncs and the floor (no
//!   restart, storm, flat chain or plain restore);
//! - `trace`: prints each restore of the full sync (chains, lines, time)
//!   to stderr;
//! - `noplain`: no plain restore (at 100,000 Services it took 74 minutes
//!   beside the full sync's 3.5, and 5 GiB: iptables-nft's chain lookups
//!   are quadratic in one transaction);
//! - `pieces=N`: the full sync writes pieces of N chains instead of the
//!   plane's own size (through the same `FamilyTables::full`).

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    plain_rss_mib: f64,
    one_noflush: Option<Duration>,
    restart: Option<Duration>,
    partial: Option<Duration>,
    floor: Option<Duration>,
    storm_services: usize,
    storm: Option<Duration>,
    flat: Option<Duration>,
    state_mib: f64,
    rss_mib: f64,
    peak_mib: f64,
    cleanup: Option<Duration>,
}

/// What runs (the words among the sizes).
#[derive(Clone, Copy, Default)]
struct Mode {
    full_only: bool,
    partial_only: bool,
    no_plain: bool,
    pieces: Option<usize>,
}

/// Whether `trace` was given: each restore of the full sync is printed.
static TRACE: AtomicBool = AtomicBool::new(false);
/// Restores run by the traced full sync so far.
static TRACED: AtomicUsize = AtomicUsize::new(0);

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

/// Restores `text` in a fresh namespace with `args`, timed, with the
/// restore's peak RSS in MiB (from `/usr/bin/time`, 0 without it).
fn timed_restore(text: &str, args: &[&str]) -> (Duration, f64) {
    let file = std::env::temp_dir().join(format!("swy-bench-{}.rules", std::process::id()));
    std::fs::write(&file, text).expect("writing rules");
    let ns = Netns::new("plain");
    let timer = std::path::Path::new("/usr/bin/time").exists();
    let mut cmd = if timer {
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "%M", "ip"]);
        c
    } else {
        Command::new("ip")
    };
    let t = Instant::now();
    let out = cmd
        .args(["netns", "exec", &ns.0, "iptables-restore", "-w", "5"])
        .args(args)
        .stdin(std::fs::File::open(&file).expect("rules file"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("running iptables-restore");
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "iptables-restore {args:?} failed: {stderr}"
    );
    let _ = std::fs::remove_file(&file);
    let kib: u64 = stderr
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0);
    (took, mib(kib))
}

/// One restore of a traced full sync, timed and printed to stderr.
fn traced(
    runner: &Runner,
    text: &str,
) -> Result<(), switchyard_agent::dataplane::runner::RunError> {
    let t = Instant::now();
    let r = runner.restore(Family::V4, text);
    if TRACE.load(Ordering::Relaxed) {
        let i = TRACED.fetch_add(1, Ordering::Relaxed);
        eprintln!(
            "restore {i}: {} chains, {} lines, {:.1} ms",
            text.lines().filter(|l| l.starts_with(':')).count(),
            text.lines().count(),
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    r
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

fn measure(n: usize, mode: Mode) -> Row {
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
    TRACED.store(0, Ordering::Relaxed);
    let t = Instant::now();
    match mode.pieces {
        // The plane's own full sync.
        None if !TRACE.load(Ordering::Relaxed) => dp
            .apply(&Change {
                state: &state,
                changes: &all,
                full: true,
            })
            .expect("full sync"),
        // The same steps, each restore timed, with the plane's piece size
        // or the one given.
        pieces => {
            let existing = runner.existing(Family::V4).expect("existing");
            let limit = pieces.unwrap_or(if existing.jumps.is_empty() {
                CHAINS_PER_RESTORE
            } else {
                switchyard_agent::iptables::CHAINS_PER_RESTORE_HOOKED
            });
            FamilyTables::full(&state, &cfg(), &existing, Family::V4, limit, &mut |text| {
                traced(&runner, &text)
            })
            .expect("full sync");
            // The plane's record, over the rules just written (skips them).
            if !mode.full_only {
                dp.apply(&Change {
                    state: &state,
                    changes: &all,
                    full: true,
                })
                .expect("full sync over the rules written");
            }
        }
    }
    let full = t.elapsed();
    let rss_mib = mib(status_kib("VmRSS:").saturating_sub(rss0));
    let peak_mib = mib(status_kib("VmHWM:").saturating_sub(rss0));

    let rest = !(mode.full_only || mode.partial_only);
    // An agent restart: a new data plane rewrites what is there.
    let restart = rest.then(|| {
        let mut again = IptablesDataPlane::with_runner(cfg(), vec![Family::V4], runner.clone());
        let t = Instant::now();
        again
            .apply(&Change {
                state: &state,
                changes: &all,
                full: true,
            })
            .expect("full sync over existing rules");
        t.elapsed()
    });

    let mut partials = Vec::new();
    for round in (1..=7u32).filter(|_| !mode.full_only) {
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
    let mut storm_services = 0;
    let storm = rest.then(|| {
        let mut next = state.clone();
        let changed: Vec<String> = (0..n)
            .step_by(10)
            .map(|i| insert(&mut next, service(i, 50)))
            .collect();
        storm_services = changed.len();
        let changes = ChangeSet {
            changed,
            removed: Vec::new(),
        };
        let storm = timed_partial(&mut dp, &next, &changes);
        state = next;
        storm
    });
    // The floor: the smallest transaction that adds a rule to this nat
    // table. The kernel revalidates every rule reachable from the built-in
    // chains at each such commit, so this grows with the table.
    let mut floors = Vec::new();
    for round in (0..7).filter(|_| !mode.full_only) {
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
    drop(dp);
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
    for _ in (0..3).filter(|_| rest) {
        let t = Instant::now();
        runner
            .restore(Family::V4, &flat)
            .expect("flat dispatch transaction");
        flats.push(t.elapsed());
    }
    flats.sort();
    drop(flat);
    let cleanup = rest.then(|| {
        let t = Instant::now();
        cleanup(&runner).expect("cleanup");
        t.elapsed()
    });
    drop(ns);

    // The baselines: the same rules as one text, into fresh namespaces.
    let full_text =
        |limit| FamilyTables::full_texts(&state, &cfg(), &Existing::default(), Family::V4, limit).1;
    let text = one_transaction(&full_text(usize::MAX));
    let lines = text.lines().count();
    let restores = full_text(mode.pieces.unwrap_or(CHAINS_PER_RESTORE)).len();
    let (plain, plain_rss_mib) = if mode.partial_only || mode.no_plain {
        (Duration::ZERO, 0.0)
    } else {
        timed_restore(&text, &[])
    };
    let one_noflush = (n <= 2_000 && rest).then(|| timed_restore(&text, &["--noflush"]).0);
    let mid = |v: &[Duration]| v.get(v.len() / 2).copied();
    Row {
        services: n,
        lines,
        restores,
        full,
        plain,
        plain_rss_mib,
        one_noflush,
        restart,
        partial: mid(&partials),
        floor: mid(&floors),
        storm_services,
        storm,
        flat: mid(&flats),
        state_mib,
        rss_mib,
        peak_mib,
        cleanup,
    }
}

fn main() {
    let mut mode = Mode::default();
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "full" => mode.full_only = true,
            "partial" => mode.partial_only = true,
            "noplain" => mode.no_plain = true,
            "trace" => TRACE.store(true, Ordering::Relaxed),
            _ => {
                if let Some(n) = a.strip_prefix("pieces=") {
                    mode.pieces = Some(n.parse().expect("pieces=N"));
                }
            }
        }
    }
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    let rows: Vec<Row> = sizes.into_iter().map(|n| measure(n, mode)).collect();
    let secs = |d: Option<Duration>| {
        d.map_or("not run".to_owned(), |d| {
            format!("{:.2} s", d.as_secs_f64())
        })
    };
    let ms = |d: Option<Duration>| {
        d.map_or("not run".to_owned(), |d| {
            format!("{:.1} ms", d.as_secs_f64() * 1e3)
        })
    };
    println!(
        "| services x 10 endpoints | rule lines | full sync (restores) | plain iptables-restore, one transaction (its peak RSS) | ratio | one --noflush transaction | full sync over existing rules (restart) | one endpoint changed (median of 7) | smallest nat transaction on that table (median of 7) | rewriting a flat dispatch chain, kube-proxy's way (median of 3) | a tenth of the Services changed in one update | agent RSS: state / after full sync / peak | cleanup |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.2} s ({}) | {:.2} s ({:.0} MiB) | {:.2} | {} | {} | {} | {} | {} | {} ({}) | {:.0} / {:.0} / {:.0} MiB | {} |",
            r.services,
            r.lines,
            r.full.as_secs_f64(),
            r.restores,
            r.plain.as_secs_f64(),
            r.plain_rss_mib,
            r.full.as_secs_f64() / r.plain.as_secs_f64(),
            secs(r.one_noflush),
            secs(r.restart),
            ms(r.partial),
            ms(r.floor),
            ms(r.flat),
            secs(r.storm),
            r.storm_services,
            r.state_mib,
            r.rss_mib,
            r.peak_mib,
            secs(r.cleanup),
        );
    }
}
