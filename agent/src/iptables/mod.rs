//! `--dataplane iptables`: kube-proxy-shaped rules under the `SWY-` prefix,
//! programmed with `iptables-restore --noflush`: one transaction per family
//! and change, and a few in sequence for a full sync.
//!
//! ```text
//!  Change ─▶ full? ──yes──▶ nft list chains + iptables -S (what of ours exists) ─▶ sync::FamilyTables::full ─┐ restores, in order
//!             │no                                                                                         ├─▶ runner::restore ─▶ stale UDP flows (netlink)
//!             └──────────▶ sync::FamilyTables::partial (changed Services, their buckets) ──────────────────┘        │ error
//!                                                                                 full sync of the last good state ◀─┘ (and NACK)
//! ```
//!
//! Modules: [`rules`] (rule text from the backend-neutral
//! [`crate::endpoints`] plans, pure), [`sync`] (what is programmed and the
//! transactions that change it, pure), [`runner`] (every command line,
//! added to the shared [`Runner`]).
//! After every successful sync, full or partial, [`crate::conntrack`]
//! deletes the UDP flows whose endpoint no longer serves them. Rules stay
//! in the kernel when the agent exits; [`cleanup`] removes them (and
//! [`crate::dataplane::cleanup`] when the nftables plane starts).
//!
//! # Full syncs
//!
//! (Timings here are from `docs/benchmarks-history.md`, "iptables data
//! plane"; the current ones are in BENCHMARKS.md.)
//!
//! A full sync (start-up, after a failure, after a missing canary) first
//! learns which `SWY-` chains and built-in jumps exist: `nft list chains
//! ip` (or `ip6`) for the chain names and `iptables -S` of the built-in
//! chains we jump from. It never lists every rule: `iptables-save` of a
//! 10,000-Service table ran for 80 s and then crashed here (iptables 1.8.9
//! inserts each chain it reads into a sorted list). Without `nft`, or with
//! the legacy backend, it falls back to `iptables-save`. It then writes a
//! sequence of `--noflush` transactions per family: the static chains and
//! the Services' own chains in pieces, then the dispatch chains and
//! built-in jumps in one transaction, then the deletion of `SWY-` chains
//! no longer wanted, referrers before the chains they jump to.
//!
//! Chains are named after their content, so over rules whose canaries are
//! in place (an agent restart) a full sync skips every chain that exists
//! and writes only the static and dispatch chains: 2.5 s instead of 36 s at
//! 10,000 Services. After a flush (canary gone) it writes everything; the
//! canaries are written in the dispatch transaction, after every Service
//! chain, so a full sync interrupted before then is not trusted by the
//! next one.
//!
//! The pieces exist because iptables-nft's `--noflush` cost grows with the
//! square of the chains one transaction names: 10,000 Services in one
//! transaction did not finish in 25 minutes, in pieces they take about
//! 10 s. (iptables 1.8.9 records each chain name a `--noflush` line names,
//! its own chain and its jump target, in a list sorted by name, walking it
//! from the smallest name for each insertion; a name smaller than all
//! before it costs nothing. So the dispatch transaction, whose rules name
//! every Service chain as a jump target, writes its rules in descending
//! order of their targets: in random order it alone took 3-5 s at 10,000
//! Services and 17 s at 20,000; see `FamilyTables::slot_entries`.) A plain
//! (flushing) `iptables-restore` is no linear floor either: one
//! transaction of 50,000, 100,000 and 200,000 one-rule chains took 3.4,
//! 13.6 and 53.9 s here. The piece size weighs that against a kernel cost: each nat commit
//! that adds a rule makes nf_tables revalidate every rule reachable from
//! the built-in chains (250 ms at 10,000 Services, 3.5 s at 100,000). While
//! none of our jumps from built-in chains exist (a first full sync) that
//! validation costs nothing, but every commit still walks every chain of
//! the table in the kernel (`nft_table_validate`, `nf_tables_commit`: 82%
//! of iptables-restore's CPU at 500,000 chains), so with fixed pieces a
//! full sync grows with the square of the table (100,000 Services: 658 s
//! in 2,175 pieces of 500). So pieces are [`CHAINS_PER_RESTORE`] (500) up
//! to 25,000 chains in the table and the square root of ten times the
//! chains in the table beyond (`sync::piece_limit`: 323-330 s in 612 pieces at
//! 100,000 Services); once our jumps exist,
//! [`CHAINS_PER_RESTORE_HOOKED`] (1,500: a storm of 1,000 changed Services
//! at 10,000 took 3.15 s in one transaction, 2.66 s in pieces of 4,000,
//! 1.8-1.9 s in pieces of 1,000-1,500). Every prefix of the sequence is
//! consistent (the unit test
//! `batched_full_syncs_keep_every_step_consistent` replays it on a model of
//! the kernel). Nothing is flushed first, so traffic keeps flowing through
//! the old rules until the new ones replace them; that is also why a
//! restarted agent drops no connection.
//!
//! # Partial syncs and failures
//!
//! A partial sync writes, per family, the changed Services' chains whose
//! names are new (an endpoint removed rewrites the balancing chain, not the
//! other endpoints' chains), deletes their chains that are gone, rewrites
//! the buckets (and `SWY-NODEPORTS`) their rules were or are in, inserts a
//! bucket jump when a bucket is used for the first time, and deletes the
//! jump (`-D` on `SWY-SERVICES`, at most 256 rules long) and the chain when
//! a bucket empties. It is one transaction (one revalidation) unless it
//! names more than 1,500 chains; then it is split like a full sync. If the
//! kernel refuses a transaction, that transaction changed nothing
//! (iptables-restore is all or nothing per transaction; a full sync may
//! have applied earlier pieces): the error, with the offending line,
//! becomes the NACK, and the plane immediately runs a full sync of the last
//! good state, because its record had already moved
//! (`crate::dataplane::Transactional`, shared with nftables).
//!
//! The only rules outside our chains are the seven jumps from built-in
//! chains, inserted with `-I ... 1` in the full-sync transaction when
//! `iptables -S` of that chain does not show them, so never twice. They
//! and the canaries stay in the restore transactions rather than going
//! through the `iptables` crate (which the DNS stub uses for its single,
//! idempotent NOTRACK rules): the jumps must land in the same transaction
//! as the dispatch chains they name, and the crate runs the `iptables`
//! binary itself, so it cannot reach the namespace a test's or the
//! benchmark's runner works in (`ip netns exec`).
//!
//! # Upkeep
//!
//! Every `--iptables-sync-period` a task takes the data plane lock and runs
//! `DataPlane::maintain`: `iptables -t nat -S SWY-CANARY` and the same in
//! filter (per family); a missing canary rule means someone flushed us, and
//! the last good state is synced in full. `switchyard-agent cleanup`
//! removes our jumps from built-in chains (deleted by their exact listed
//! text) first, then every `SWY-` chain, in pieces like a full sync, then
//! the DNS stub's NOTRACK rules, its interface and its address
//! (`crate::dns::link`).

pub mod rules;
pub mod runner;
pub mod sync;

use std::sync::Arc;
use std::time::Instant;

use crate::config::DataPlaneKind;
use crate::conntrack::Conntrack;
use crate::dataplane::runner::RunError;
use crate::dataplane::{ApplyError, Change, DataPlane, Family, NodeConfig, Runner, Transactional};
use crate::state::AgentState;
use crate::status::Metrics;

pub use rules::Table;
use sync::FamilyTables;

/// How many chains one `iptables-restore --noflush` input may name before a
/// sync is split into pieces. Two costs pull apart: iptables-nft's
/// userspace cost per transaction grows with the square of the chains it
/// names (1,000 Services in one transaction: 5 s), and every nat commit
/// makes the kernel revalidate all rules reachable from the built-in chains
/// (250 ms at 10,000 Services, a few ms while nothing of ours is hooked),
/// and every commit walks every chain of the table in the kernel (about
/// 0.4 µs a chain, hooked or not). So pieces are small while our chains
/// are not hooked (a first full sync) and the table is small, grow with the
/// table beyond 25,000 chains, and are larger once our chains are hooked
/// (BENCHMARKS.md, "iptables data plane").
pub const CHAINS_PER_RESTORE: usize = 500;

/// The piece size once our chains are hooked into the built-in chains.
pub const CHAINS_PER_RESTORE_HOOKED: usize = 1500;

/// The iptables data plane.
#[derive(Debug)]
pub struct IptablesDataPlane {
    cfg: NodeConfig,
    families: Vec<Family>,
    tables: Vec<FamilyTables>,
    needs_full: bool,
    last_good: Option<AgentState>,
    metrics: Option<Arc<Metrics>>,
    runner: Runner,
    conntrack: Conntrack,
    /// Whether the nftables data plane's tables were removed (once per start).
    others_removed: bool,
}

impl IptablesDataPlane {
    /// A data plane for this node; IPv6 is programmed when ip6tables works here.
    pub fn new(cfg: NodeConfig) -> Self {
        let runner = Runner::host();
        let families = Family::ALL
            .into_iter()
            .filter(|f| *f == Family::V4 || runner.available(*f))
            .collect();
        Self::with_runner(cfg, families, runner)
    }

    /// A data plane for exactly these families, running its commands through `runner`.
    pub fn with_runner(cfg: NodeConfig, families: Vec<Family>, runner: Runner) -> Self {
        Self {
            cfg,
            families,
            tables: Vec::new(),
            needs_full: true,
            last_good: None,
            metrics: None,
            conntrack: runner.conntrack(),
            runner,
            others_removed: false,
        }
    }

    /// Rules we own, over all families.
    pub fn rule_count(&self) -> usize {
        self.tables.iter().map(FamilyTables::rule_count).sum()
    }

    /// Deletes the UDP conntrack entries whose endpoint no longer serves
    /// their frontend, by comparing the kernel's table with what is
    /// programmed now (so a restart or a failed sync loses nothing). A
    /// failure is logged: the rules are in force either way.
    fn clear_stale_flows(&self) {
        for t in &self.tables {
            self.conntrack.reconcile_after_sync(
                t.family() == Family::V6,
                &t.udp_frontends(),
                &self.cfg.addresses,
            );
        }
    }

    fn failed(&self, e: RunError) -> ApplyError {
        if let Some(m) = &self.metrics {
            m.iptables_restore_failures.inc();
            m.kubeproxy.restore_failures.inc();
        }
        ApplyError::from(e)
    }
}

impl Transactional for IptablesDataPlane {
    const NAME: &'static str = "iptables";
    const KIND: DataPlaneKind = DataPlaneKind::Iptables;

    /// Rewrites everything we own from `state`, deleting leftovers.
    fn full_sync(&mut self, state: &AgentState) -> Result<(), ApplyError> {
        let t = Instant::now();
        self.needs_full = true;
        let mut next = Vec::new();
        for &family in &self.families {
            let existing = self.runner.existing(family).map_err(ApplyError::from)?;
            if family == Family::V4 && self.cfg.localhost_node_ports() {
                // Lets DNATed packets from 127.0.0.1 leave the node.
                if let Err(e) = self.runner.sysctl("net.ipv4.conf.all.route_localnet", "1") {
                    tracing::warn!("node ports on 127.0.0.1 will not work: {e}");
                }
            }
            let runner = &self.runner;
            let tables = FamilyTables::full(
                state,
                &self.cfg,
                &existing,
                family,
                if existing.jumps.is_empty() {
                    CHAINS_PER_RESTORE
                } else {
                    CHAINS_PER_RESTORE_HOOKED
                },
                &mut |text| runner.restore(family, &text),
            )
            .map_err(|e| self.failed(e))?;
            next.push(tables);
        }
        self.tables = next;
        self.needs_full = false;
        if let Some(m) = &self.metrics {
            m.iptables_full_sync_seconds
                .observe(t.elapsed().as_secs_f64());
            m.kubeproxy.synced(true, t.elapsed());
            m.iptables_rules.set(self.rule_count() as i64);
        }
        tracing::info!(
            resources = state.resources.len(),
            rules = self.rule_count(),
            elapsed = ?t.elapsed(),
            "iptables full sync"
        );
        self.clear_stale_flows();
        Ok(())
    }

    fn partial_sync(&mut self, change: &Change<'_>) -> Result<(), ApplyError> {
        let t = Instant::now();
        for i in 0..self.tables.len() {
            let family = self.tables[i].family();
            let tx = self.tables[i].partial(
                change.state,
                change.changes,
                &self.cfg,
                CHAINS_PER_RESTORE_HOOKED,
            );
            for text in &tx.texts {
                self.runner
                    .restore(family, text)
                    .map_err(|e| self.failed(e))?;
            }
        }
        if let Some(m) = &self.metrics {
            m.iptables_partial_sync_seconds
                .observe(t.elapsed().as_secs_f64());
            m.kubeproxy.synced(false, t.elapsed());
            m.iptables_rules.set(self.rule_count() as i64);
        }
        self.clear_stale_flows();
        Ok(())
    }

    fn record(&mut self) -> (&mut bool, &mut Option<AgentState>) {
        (&mut self.needs_full, &mut self.last_good)
    }

    fn runner(&self) -> &Runner {
        &self.runner
    }

    fn others_removed(&mut self) -> &mut bool {
        &mut self.others_removed
    }
}

impl DataPlane for IptablesDataPlane {
    fn name(&self) -> &'static str {
        "iptables"
    }

    fn apply(&mut self, change: &Change<'_>) -> Result<(), ApplyError> {
        self.apply_transaction(change)
    }

    fn maintain(&mut self) -> Result<(), ApplyError> {
        if self.last_good.is_none() {
            return Ok(());
        }
        if !self.needs_full {
            for &family in &self.families {
                for table in Table::ALL {
                    let present = self
                        .runner
                        .canary_present(family, table)
                        .map_err(ApplyError::from)?;
                    if !present {
                        tracing::warn!(
                            ?family,
                            table = table.name(),
                            "canary chain flushed: someone removed our rules; full resync"
                        );
                        if let Some(m) = &self.metrics {
                            m.iptables_canary_resyncs.inc();
                        }
                        self.needs_full = true;
                    }
                }
            }
        }
        if self.needs_full {
            return self.resync();
        }
        Ok(())
    }

    fn attach_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = Some(metrics);
    }

    fn describe(&self, name: &str) -> Option<serde_json::Value> {
        let held = self.last_good.as_ref()?.resources.get(name)?;
        // The rules are a pure function of the state and this node's
        // settings: recomputing them shows exactly what the sync wrote.
        let families: Vec<serde_json::Value> = self
            .families
            .iter()
            .map(|&family| {
                let r = rules::service_rules(&held.state, family, &self.cfg);
                serde_json::json!({
                    "family": format!("{family:?}"),
                    "dispatch": r.dispatch.iter().map(|d| serde_json::json!({
                        "table": d.table.name(),
                        "chain": d.slot.chain(d.table),
                        "rule": d.spec,
                    })).collect::<Vec<_>>(),
                    "chains": r.chains.iter().map(|c| serde_json::json!({
                        "table": c.table.name(),
                        "chain": c.name,
                        "rules": c.rules,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        Some(serde_json::json!({ "zone": self.cfg.zone, "iptables": families }))
    }

    fn set_zone(&mut self, zone: Option<String>) {
        // Topology hints pick endpoints by zone: every Service may change.
        self.cfg.zone = zone;
        self.needs_full = true;
    }
}

/// `switchyard-agent cleanup`: removes every chain and rule of ours, in
/// each family whose tools work: our jumps first, then our chains.
pub fn cleanup(runner: &Runner) -> Result<(), RunError> {
    for family in Family::ALL {
        if family == Family::V6 && !runner.available(family) {
            continue;
        }
        let existing = runner.existing(family)?;
        for text in sync::cleanup(&existing, CHAINS_PER_RESTORE) {
            runner.restore(family, &text)?;
        }
        tracing::info!(
            ?family,
            chains = existing.chains.len(),
            "removed Switchyard's rules"
        );
    }
    Ok(())
}
