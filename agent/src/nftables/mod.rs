//! `--dataplane nftables`: one `ip` and one `ip6` table of our own
//! (`switchyard`) whose rules never change with the cluster: Services and
//! endpoints are elements of its sets and maps, so every update is element
//! operations in one netlink batch of our own ([`netlink`]), and the
//! kernel never revalidates the table for it.
//!
//! ```text
//!  Change ─▶ full, no table yet? ──▶ elements::skeleton (rules, sets, CIDRs) ─▶ libnftables (one transaction)
//!             │                        then Programmed::full (every element) ─▶ netlink batches of 1 MiB, then the marker
//!             ├ full, a start over our table whose marker is the state's digest ─▶ kept as it is (nothing written)
//!             ├ full, over our table ─▶ Programmed::full_text (table replaced whole, kept affinity, marker) ─▶ libnftables (one transaction)
//!             └ partial ─────────────▶ Programmed::partial (changed Services: element deletes, adds, the marker moved) ─▶ one netlink batch
//!                                         (fw_allow's interval elements: the whole change as text instead)
//!                             ─▶ stale UDP flows (netlink), stale affinity entries
//!                          error (and NACK) ─▶ full sync of the last good state
//! ```
//!
//! Modules: [`layout`] (the fixed rule set, pure), [`elements`] (a
//! Service as elements, the compact record of what is programmed and the
//! diffs, pure; its largest part is [`owners`]), [`netlink`] (elements
//! as nf_tables messages, and the socket), [`kernel`] (the libnftables
//! context and that socket).
//! Endpoint selection, policy and topology come from [`crate::endpoints`],
//! as for iptables; after every sync [`crate::conntrack`] deletes the UDP
//! flows whose endpoint no longer serves them. The table stays when the
//! agent exits. From no table, a full sync writes the skeleton in one
//! transaction and then the elements in batches (nothing in force to keep
//! consistent with). Over our table (a resync, a start with another
//! state) it replaces everything in one libnftables transaction, so that
//! packets see the old table or the new one, at some 2 KiB of libnftables
//! memory per element.
//!
//! A restart keeps the table when it holds what the persisted state makes.
//! Each table has a one-element set, `programmed`, whose element is a
//! 128-bit digest of the skeleton and of every element in force
//! ([`elements::Programmed::digest`]: a sum of per-element hashes, so a
//! partial sync moves it by its own elements, in its own transaction). The
//! first full sync of a start computes the record of the persisted state
//! without writing anything and, when the table is intact and its marker
//! equals that record's digest, keeps the table: at 100,000 Services that
//! is the record's computation instead of a libnftables transaction of 2.3
//! million elements (BENCHMARKS.md, "Scale (issue 28)"). Any difference (a
//! change the agent never saw, another build, a cut-short sync that wrote
//! no marker) rewrites the table as before. Like a running agent, a start
//! does not see elements deleted by hand (`nft delete element`) that
//! leave the marker as it was.
//!
//! A start also removes the iptables data plane's rules, as kube-proxy
//! does when it changes mode (a large iptables-nft table would stay on
//! every commit's path), and the iptables plane's first sync removes
//! these tables. [`cleanup`] removes both tables.
//!
//! Why elements and never rules: on this kernel a commit that adds a rule
//! or a jump element makes nf_tables revalidate every chain reachable from
//! the base chains (about 220 ms at 10,000 Services in kube-proxy's
//! layout); element adds and deletes do not.
//!
//! `maintain` checks that both tables exist (`nft flush ruleset` removes
//! them) and that each one's nat prerouting chain holds its jump (`nft
//! flush table` removes the rules and keeps the sets), and restores them
//! with a full sync. It asks through our netlink socket ([`netlink`]: one
//! `GETTABLE`, one `GETRULE` dump of that chain): libnftables' `list
//! tables` and `list chain` fetch every element of every set first, which
//! at 100,000 Services took longer than the 30 s between two checks, with
//! the data plane locked; a refused transaction leaves the kernel as it
//! was and is followed by a full sync of the last good state, as for
//! iptables.
//!
//! # Session affinity
//!
//! A dynamic map remembers `client . frontend -> endpoint` with the
//! Service's timeout, written after the translation by one rule per
//! distinct timeout (a new timeout value is a full sync). Entries that name
//! an endpoint the frontend no longer balances to are read back and
//! deleted after a change to a sticky Service. A full sync replaces the
//! table whole (nft 1.0.6 cannot add rules that refer to a map it reads
//! back), so it first lists the affinity maps and writes the clients whose
//! endpoint still serves their frontend back into the new table with what
//! is left of their time: like kube-proxy's `recent` lists, affinity
//! survives syncs, a restored flush and agent restarts. Differences from
//! the iptables plane: affinity is per frontend (cluster IP, external IP
//! and node port each remember on their own; kube-proxy shares one list
//! per Service port, so a client that reaches one Service through two
//! frontends may get two endpoints here), and IPv6 Services are not sticky
//! (nft 1.0.6 aborts linearizing an `ip6` map update with data): their IPv6
//! connections are balanced one by one, and the agent logs this once, when
//! the first such Service is programmed.

pub mod elements;
pub mod kernel;
pub mod layout;
pub mod netlink;
pub mod owners;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use crate::config::DataPlaneKind;
use crate::conntrack::Conntrack;
use crate::dataplane::{ApplyError, Change, DataPlane, Family, NodeConfig, Runner, Transactional};
use crate::state::{AgentState, ChangeSet};
use crate::status::Metrics;
use elements::{Batch, Programmed};
use kernel::{Kernel, KernelError};
use layout::{Balance, Words};
use netlink::{Encoder, Sealed};

/// A full sync's elements go in batches of about this size: from an empty
/// table nothing needs them in one transaction, and the buffer stays small
/// (2.3 million elements are some 120 MiB of messages).
const FULL_SYNC_BATCH_BYTES: usize = 1 << 20;

/// The nftables data plane.
#[derive(Debug)]
pub struct NftablesDataPlane {
    cfg: NodeConfig,
    families: Vec<Family>,
    netns: Option<String>,
    kernel: Option<Kernel>,
    tables: Vec<Programmed>,
    needs_full: bool,
    /// Whether the iptables data plane's rules were removed (once per start).
    others_removed: bool,
    /// Whether the missing IPv6 session affinity was logged (once per start).
    v6_affinity_logged: bool,
    last_good: Option<AgentState>,
    metrics: Option<Arc<Metrics>>,
    /// Time the last sync spent sending element batches and reading the
    /// kernel's answers (the kernel's own work happens inside `sendmsg`).
    sent: std::time::Duration,
    runner: Runner,
    conntrack: Conntrack,
    /// Partial syncs through libnftables text instead of our netlink
    /// batches: the path before issue 28, kept as the benchmark's anchor.
    partial_as_text: bool,
    /// Whether this start's first full sync has run (only it may keep a
    /// table it finds).
    start_checked: bool,
    /// Whether a start may keep a table whose marker matches (off: the
    /// benchmarks' anchor, a restart that rewrites everything).
    keep_on_start: bool,
    /// Whether the last full sync kept the table in force.
    table_kept: bool,
}

impl From<KernelError> for ApplyError {
    fn from(e: KernelError) -> Self {
        Self::Command(Box::new(e))
    }
}

impl NftablesDataPlane {
    /// A data plane for this node; IPv6 is programmed when the node has it.
    pub fn new(cfg: NodeConfig) -> Self {
        let runner = Runner::host();
        let families = Family::ALL
            .into_iter()
            .filter(|f| *f == Family::V4 || runner.available(*f))
            .collect();
        Self::build(cfg, families, None, runner)
    }

    /// A data plane for exactly these families inside the named network
    /// namespace (tests and benchmarks).
    pub fn in_netns(cfg: NodeConfig, families: Vec<Family>, netns: &str) -> Self {
        Self::build(
            cfg,
            families,
            Some(netns.to_owned()),
            Runner::in_netns(netns),
        )
    }

    fn build(
        cfg: NodeConfig,
        families: Vec<Family>,
        netns: Option<String>,
        runner: Runner,
    ) -> Self {
        Self {
            cfg,
            families,
            netns,
            kernel: None,
            tables: Vec::new(),
            needs_full: true,
            others_removed: false,
            v6_affinity_logged: false,
            partial_as_text: false,
            start_checked: false,
            keep_on_start: true,
            table_kept: false,
            last_good: None,
            metrics: None,
            sent: std::time::Duration::ZERO,
            conntrack: runner.conntrack(),
            runner,
        }
    }

    /// Sends partial syncs through libnftables text (one `nft -f`-style
    /// transaction) instead of netlink element batches: what the data plane
    /// did before issue 28, for benchmarks to measure beside the default.
    pub fn set_partial_as_text(&mut self, on: bool) {
        self.partial_as_text = on;
    }

    /// Whether a start may keep the table it finds when its marker says it
    /// holds what the persisted state makes (on by default; off, a restart
    /// rewrites the table whole, the benchmark's anchor).
    pub fn set_keep_on_start(&mut self, on: bool) {
        self.keep_on_start = on;
    }

    /// Whether the last full sync kept the table in force instead of
    /// writing it (a restart over the same state).
    pub fn kept_table(&self) -> bool {
        self.table_kept
    }

    /// Time the last sync spent in `sendmsg` of element batches (with
    /// reading the kernel's answers): the kernel's cost of it.
    pub fn last_send(&self) -> std::time::Duration {
        self.sent
    }

    /// Elements in force, over all families.
    pub fn element_count(&self) -> usize {
        self.tables.iter().map(Programmed::element_count).sum()
    }

    fn kernel(&mut self) -> Result<&mut Kernel, KernelError> {
        if self.kernel.is_none() {
            self.kernel = Some(match &self.netns {
                None => Kernel::host()?,
                Some(ns) => Kernel::in_netns(ns)?,
            });
        }
        Ok(self.kernel.as_mut().expect("opened above"))
    }

    /// Runs one transaction, counting a refusal.
    fn commit(&mut self, text: &str) -> Result<(), ApplyError> {
        let r = self.kernel().and_then(|k| k.run(text).map(|_| ()));
        r.map_err(|e| {
            if let Some(m) = &self.metrics {
                m.nftables_transaction_failures.inc();
                m.kubeproxy.restore_failures.inc();
            }
            ApplyError::from(e)
        })
    }

    /// Sends one element batch, counting a refusal.
    fn send(&mut self, batch: &Sealed) -> Result<(), ApplyError> {
        let t = Instant::now();
        let r = self.kernel().and_then(|k| k.send(batch));
        self.sent += t.elapsed();
        r.map_err(|e| {
            if let Some(m) = &self.metrics {
                m.nftables_transaction_failures.inc();
                m.kubeproxy.restore_failures.inc();
            }
            ApplyError::from(e)
        })
    }

    /// Logs once per start that a sticky Service is balanced per connection
    /// over IPv6 (nft 1.0.6 cannot program the map update it needs).
    fn note_v6_affinity(&mut self, names: &[&String]) {
        if self.v6_affinity_logged {
            return;
        }
        let v6 = self.tables.iter().filter(|t| t.family() == Family::V6);
        let sticky = v6
            .flat_map(|t| names.iter().filter_map(|n| Some((*n, t.service(n)?))))
            .find(|(_, s)| s.affinity_unsupported);
        if let Some((name, _)) = sticky {
            tracing::warn!(
                service = %name,
                "sessionAffinity ClientIP is not applied to IPv6 by the nftables data plane \
                 (nft 1.0.6 aborts linearizing an ip6 map update): its IPv6 connections are \
                 balanced one by one; logged once"
            );
            self.v6_affinity_logged = true;
        }
    }

    /// Whether one of the changed Services is sticky in what we hold now.
    fn sticky(&self, changes: &ChangeSet) -> bool {
        let names = changes.changed.iter().chain(&changes.removed);
        names.into_iter().any(|n| {
            self.tables
                .iter()
                .any(|t| t.service(n).is_some_and(|s| s.affinity.is_some()))
        })
    }

    /// The clean-ups that follow a sync: stale UDP flows, and (after a full
    /// sync, or a change to a sticky Service) affinity entries that name an
    /// endpoint no longer serving their frontend. Failures are logged: the
    /// rules are in force either way.
    fn after_sync(&mut self, state: &AgentState, sticky_changed: Option<bool>) {
        for t in &self.tables {
            self.conntrack.reconcile_after_sync(
                t.family() == Family::V6,
                &t.udp_frontends(),
                &self.cfg.addresses,
            );
        }
        if sticky_changed != Some(false) {
            match self.clear_stale_affinity(state) {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "cleared stale affinity entries"),
                Err(e) => tracing::warn!("clearing stale affinity entries: {e}"),
            }
        }
    }

    /// Deletes the clients remembered for an endpoint that their frontend
    /// no longer balances to (or for a frontend no longer sticky): the
    /// kernel adds them, so they are read back, compared and deleted.
    fn clear_stale_affinity(&mut self, state: &AgentState) -> Result<usize, KernelError> {
        let mut deleted = 0;
        for i in 0..self.tables.len() {
            let family = self.tables[i].family();
            let table = Words::of(family).table();
            for (map, node_port) in [("affinity_ip", false), ("affinity_np", true)] {
                let allowed = affinity_endpoints(state, family, &self.cfg, node_port);
                let listing = self.kernel()?.run_with(
                    &format!("list map {table} {map}"),
                    switchyard_libnftables::OUTPUT_JSON,
                )?;
                let stale: Vec<String> = map_entries(&listing)
                    .into_iter()
                    .filter(|r| {
                        let frontend = remembered_frontend(&r.key);
                        !allowed
                            .get(frontend)
                            .is_some_and(|eps| eps.contains(&r.data))
                    })
                    .map(|r| r.key)
                    .collect();
                if stale.is_empty() {
                    continue;
                }
                let all = format!("delete element {table} {map} {{ {} }}", stale.join(", "));
                if self.kernel()?.run(&all).is_ok() {
                    deleted += stale.len();
                    continue;
                }
                // One of them expired meanwhile: delete the others one by one.
                for key in stale {
                    let one = format!("delete element {table} {map} {{ {key} }}");
                    deleted += usize::from(self.kernel()?.run(&one).is_ok());
                }
            }
        }
        Ok(deleted)
    }

    /// The clients affinity map `map` of `table` remembers now; none when
    /// the table is not there (a first start, `nft flush ruleset`).
    fn remembered(&mut self, table: &str, map: &str) -> Vec<Remembered> {
        let listing = self.kernel().and_then(|k| {
            k.run_with(
                &format!("list map {table} {map}"),
                switchyard_libnftables::OUTPUT_JSON,
            )
        });
        listing.map(|l| map_entries(&l)).unwrap_or_default()
    }

    /// Whether one of our tables is in the kernel (a restart, a resync).
    fn table_exists(&mut self) -> bool {
        self.families.clone().into_iter().any(|f| {
            self.kernel()
                .and_then(|k| k.table_exists(f, layout::TABLE))
                .unwrap_or(false)
        })
    }

    /// Whether our tables are in the kernel with their rules: `nft flush
    /// ruleset` removes the tables, `nft flush table` only the rules (the
    /// sets and maps stay, so the elements alone do not tell). The canary
    /// is the jump from each table's nat prerouting hook.
    fn intact(&mut self) -> Result<bool, ApplyError> {
        for family in self.families.clone() {
            // A chain deleted by hand has no rule to list: not intact either.
            let k = self.kernel()?;
            if !k.table_exists(family, layout::TABLE)?
                || !k.jumps_to(family, layout::TABLE, "nat_prerouting", "services")?
            {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// The elements of `remembered` to write back into the new table of
/// `state`: those whose frontend is sticky there and still balances to
/// their endpoint.
fn still_sticky(
    state: &AgentState,
    family: Family,
    cfg: &NodeConfig,
    node_port: bool,
    remembered: Vec<Remembered>,
) -> Vec<String> {
    if remembered.is_empty() {
        return Vec::new();
    }
    let allowed = affinity_endpoints(state, family, cfg, node_port);
    remembered
        .into_iter()
        .filter(|r| r.expires > 0)
        .filter(|r| {
            allowed
                .get(remembered_frontend(&r.key))
                .is_some_and(|eps| eps.contains(&r.data))
        })
        .map(|r| r.element())
        .collect()
}

/// For each sticky frontend key (`ADDR . PROTO . PORT`, or `PROTO . PORT`
/// for node ports) of `state`, the endpoints its balancing maps hold.
fn affinity_endpoints(
    state: &AgentState,
    family: Family,
    cfg: &NodeConfig,
    node_port: bool,
) -> BTreeMap<String, BTreeSet<String>> {
    let maps: Vec<Balance> = if node_port {
        vec![Balance::NpMain, Balance::NpShort]
    } else {
        vec![Balance::IpMain, Balance::IpShort]
    };
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let sticky = state
        .resources
        .values()
        .filter(|h| h.state.service.session_affinity_timeout.is_some());
    for h in sticky {
        let s = elements::service_elements(&h.state, family, cfg);
        if s.affinity.is_none() {
            continue;
        }
        for e in &s.elements {
            if maps.iter().any(|b| e.set == b.map()) {
                let fe = e.key.rsplit_once(" . ").map_or("", |(fe, _slot)| fe);
                out.entry(fe.to_owned()).or_default().insert(e.data.clone());
            }
        }
    }
    out
}

/// One remembered client of an affinity map, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Remembered {
    /// `CLIENT . ADDR . PROTO . PORT` (or `CLIENT . PROTO . PORT`), nft syntax.
    key: String,
    /// The endpoint, `ADDR . PORT`.
    data: String,
    /// The element's timeout and what is left of it, in seconds.
    timeout: u64,
    expires: u64,
}

impl Remembered {
    /// The element as `add element` writes it back, with what is left of its time.
    fn element(&self) -> String {
        format!(
            "{} timeout {}s expires {}s : {}",
            self.key, self.timeout, self.expires, self.data
        )
    }
}

/// The entries of a map listed as JSON, in nft syntax
/// (`10.244.2.9 . 10.96.0.12 . tcp . 80`, `10.244.1.2 . 8080`).
fn map_entries(json: &str) -> Vec<Remembered> {
    fn text(v: &serde_json::Value) -> String {
        match v {
            serde_json::Value::Object(o) if o.contains_key("concat") => o["concat"]
                .as_array()
                .map(|a| a.iter().map(text).collect::<Vec<_>>().join(" . "))
                .unwrap_or_default(),
            serde_json::Value::Object(o) if o.contains_key("elem") => text(&o["elem"]["val"]),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        }
    }
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    doc["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["map"]["elem"].as_array())
        .flatten()
        .filter_map(|pair| {
            let (key, data) = (pair.get(0)?, pair.get(1)?);
            Some(Remembered {
                key: text(key),
                data: text(data),
                timeout: key["elem"]["timeout"].as_u64().unwrap_or(0),
                expires: key["elem"]["expires"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

/// The frontend part of an affinity key (`CLIENT . FE` -> `FE`).
fn remembered_frontend(key: &str) -> &str {
    key.split_once(" . ").map_or("", |(_, fe)| fe)
}

impl NftablesDataPlane {
    /// Writes our tables from `state`: over a table in force (`replacing`)
    /// in one libnftables transaction, from none as the skeleton then
    /// element batches; then the marker. The new records, and how many
    /// affinity entries were written back.
    fn write_tables(
        &mut self,
        state: &AgentState,
        replacing: bool,
    ) -> Result<(Vec<Programmed>, usize), ApplyError> {
        // Over a table already in force (a restart, a resync), everything
        // goes in one libnftables transaction: packets of the instant see
        // the old table or the new one. From no table, the skeleton first,
        // then the elements through netlink in batches (nothing to keep
        // consistent with, and none of libnftables' ~2 KiB per element).
        // The clients the affinity maps remembered go back in with what is
        // left of their time, where their frontend still balances to that
        // endpoint (kube-proxy's `recent` lists survive its syncs and
        // restarts): the table is replaced whole, its affinity maps with it.
        let mut text = String::new();
        let mut kept = 0;
        let mut next = Vec::new();
        for family in self.families.clone() {
            if replacing {
                let (programmed, t) = Programmed::full_text(state, &self.cfg, family);
                text.push_str(&t);
                next.push(programmed);
            } else {
                text.push_str(&elements::skeleton(
                    family,
                    &self.cfg,
                    &elements::timeouts(state, family),
                ));
            }
            let table = Words::of(family).table();
            for (map, node_port) in [("affinity_ip", false), ("affinity_np", true)] {
                let remembered = self.remembered(&table, map);
                let keep = still_sticky(state, family, &self.cfg, node_port, remembered);
                if !keep.is_empty() {
                    kept += keep.len();
                    let _ = writeln!(text, "add element {table} {map} {{ {} }}", keep.join(", "));
                }
            }
        }
        self.commit(&text)?;
        drop(text);
        if !replacing {
            // Every element through netlink, in batches; the interval
            // elements of fw_allow through text (see `netlink::ranged`).
            let mut ranged = Batch::default();
            for family in self.families.clone() {
                let table = layout::TABLE;
                let mut enc = Encoder::new(family, table);
                let cfg = self.cfg.clone();
                let programmed = Programmed::full(state, &cfg, family, |set, key, data| {
                    if netlink::ranged(set) {
                        ranged.add_element(set, key, data);
                        return Ok(());
                    }
                    enc.push(netlink::Op::Add, set, key, data)
                        .map_err(|e| ApplyError::from(KernelError::from(e)))?;
                    if enc.len() >= FULL_SYNC_BATCH_BYTES {
                        let full = std::mem::replace(&mut enc, Encoder::new(family, table));
                        self.send(&full.finish())?;
                    }
                    Ok::<(), ApplyError>(())
                })?;
                self.send(&enc.finish())?;
                if !ranged.is_empty() {
                    let mut t = String::new();
                    ranged.write(&mut t, &Words::of(family).table());
                    self.commit(&t)?;
                    ranged = Batch::default();
                }
                next.push(programmed);
            }
            // The marker last: a table cut short by an error has none, so
            // the next start does not keep it.
            let mut enc = Encoder::new(Family::V4, layout::TABLE);
            for p in &next {
                enc.set_family(p.family());
                enc.push(
                    netlink::Op::Add,
                    layout::DIGEST_SET,
                    &elements::digest_key(p.digest()),
                    "",
                )
                .map_err(|e| ApplyError::from(KernelError::from(e)))?;
            }
            self.send(&enc.finish())?;
        }
        Ok((next, kept))
    }

    /// The records of `state` when the kernel's tables already hold exactly
    /// what they make: each table's marker equals the record's digest and
    /// its rules are there ([`Self::intact`]). Elements changed by hand
    /// leave the marker as it was and are not seen (as during a run).
    fn keep(&mut self, state: &AgentState) -> Option<Vec<Programmed>> {
        if !self.intact().unwrap_or(false) {
            return None;
        }
        let mut next = Vec::new();
        for family in self.families.clone() {
            let p = Programmed::full(state, &self.cfg, family, |_, _, _| {
                Ok::<(), std::convert::Infallible>(())
            })
            .unwrap_or_else(|e| match e {});
            let marker = self.marker(&Words::of(family).table());
            if marker != Some(p.digest()) {
                tracing::info!(
                    family = ?family,
                    "the nftables table in force is not what the persisted state makes: replacing it"
                );
                return None;
            }
            next.push(p);
        }
        Some(next)
    }

    /// The digest the marker set of `table` holds, if it holds exactly one.
    fn marker(&mut self, table: &str) -> Option<u128> {
        let listing = self
            .kernel()
            .ok()?
            .run_with(
                &format!("list set {table} {}", layout::DIGEST_SET),
                switchyard_libnftables::OUTPUT_JSON,
            )
            .ok()?;
        let v: serde_json::Value = serde_json::from_str(&listing).ok()?;
        let set = v["nftables"]
            .as_array()?
            .iter()
            .find_map(|o| o.get("set"))?;
        match set.get("elem")?.as_array()?.as_slice() {
            [one] => one
                .as_str()?
                .parse::<std::net::Ipv6Addr>()
                .ok()
                .map(u128::from),
            _ => None,
        }
    }
}

impl Transactional for NftablesDataPlane {
    const NAME: &'static str = "nftables";
    const KIND: DataPlaneKind = DataPlaneKind::Nftables;

    /// Rewrites our tables from `state` in one transaction.
    fn full_sync(&mut self, state: &AgentState) -> Result<(), ApplyError> {
        let t = Instant::now();
        self.sent = std::time::Duration::ZERO;
        self.needs_full = true;
        if self.families.contains(&Family::V4)
            && self.cfg.localhost_node_ports()
            && let Err(e) = self.runner.sysctl("net.ipv4.conf.all.route_localnet", "1")
        {
            tracing::warn!("node ports on 127.0.0.1 will not work: {e}");
        }
        let replacing = self.table_exists();
        // The first full sync of a start, over a table whose marker says
        // it holds what `state` makes: kept as it is (a restart).
        let first = !std::mem::replace(&mut self.start_checked, true);
        let kept = match replacing && first && self.keep_on_start {
            true => self.keep(state),
            false => None,
        };
        self.table_kept = kept.is_some();
        let (next, affinity_kept) = match kept {
            Some(next) => (next, 0),
            None => self.write_tables(state, replacing)?,
        };
        self.tables = next;
        self.needs_full = false;
        if let Some(m) = &self.metrics {
            m.nftables_full_sync_seconds
                .observe(t.elapsed().as_secs_f64());
            m.kubeproxy.synced(true, t.elapsed());
            m.nftables_elements.set(self.element_count() as i64);
        }
        tracing::info!(
            resources = state.resources.len(),
            elements = self.element_count(),
            affinity_kept,
            table_kept = self.table_kept,
            elapsed = ?t.elapsed(),
            "nftables full sync"
        );
        let all: Vec<&String> = state.resources.keys().collect();
        self.note_v6_affinity(&all);
        self.after_sync(state, None);
        Ok(())
    }

    fn partial_sync(&mut self, change: &Change<'_>) -> Result<(), ApplyError> {
        let t = Instant::now();
        self.sent = std::time::Duration::ZERO;
        let sticky_before = self.sticky(change.changes);
        let Some(old) = self.last_good.clone() else {
            return self.full(change.state);
        };
        let mut batches: Vec<(Family, Batch)> = Vec::new();
        for table in &mut self.tables {
            match table.partial(&old, change.state, change.changes, &self.cfg) {
                Some(b) => batches.push((table.family(), b)),
                // A new affinity timeout: its rules come with a full sync.
                None => return self.full(change.state),
            }
        }
        if self.partial_as_text || batches.iter().any(|(_, b)| b.has_ranged()) {
            // fw_allow's interval elements go through text (see
            // `netlink::ranged`): the whole change with them, one transaction.
            let mut text = String::new();
            for (family, batch) in &batches {
                batch.write(&mut text, &Words::of(*family).table());
            }
            if !text.is_empty() {
                self.commit(&text)?;
            }
        } else {
            // Both families in one batch: one transaction.
            let mut enc = Encoder::new(Family::V4, layout::TABLE);
            for (family, batch) in &batches {
                enc.set_family(*family);
                batch
                    .encode(&mut enc)
                    .map_err(|e| ApplyError::from(KernelError::from(e)))?;
            }
            if !enc.is_empty() {
                self.send(&enc.finish())?;
            }
        }
        if let Some(m) = &self.metrics {
            m.nftables_partial_sync_seconds
                .observe(t.elapsed().as_secs_f64());
            m.kubeproxy.synced(false, t.elapsed());
            m.nftables_elements.set(self.element_count() as i64);
        }
        let names: Vec<&String> = change.changes.changed.iter().collect();
        self.note_v6_affinity(&names);
        self.after_sync(
            change.state,
            Some(sticky_before || self.sticky(change.changes)),
        );
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

impl DataPlane for NftablesDataPlane {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn apply(&mut self, change: &Change<'_>) -> Result<(), ApplyError> {
        self.apply_transaction(change)
    }

    fn maintain(&mut self) -> Result<(), ApplyError> {
        if self.last_good.is_none() {
            return Ok(());
        }
        if !self.needs_full && !self.intact()? {
            tracing::warn!(
                "our nftables table or its rules are gone (nft flush ruleset or flush table?): full resync"
            );
            if let Some(m) = &self.metrics {
                m.nftables_table_resyncs.inc();
            }
            self.needs_full = true;
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
        let families: Vec<serde_json::Value> = self
            .tables
            .iter()
            .filter_map(|t| {
                t.service(name)?;
                let s = elements::service_elements(&held.state, t.family(), &self.cfg);
                Some(serde_json::json!({
                    "family": format!("{:?}", t.family()),
                    "table": Words::of(t.family()).table(),
                    "affinity_seconds": s.affinity,
                    "elements": s.elements.iter().map(|e| serde_json::json!({
                        "set": e.set, "key": e.key, "data": e.data,
                    })).collect::<Vec<_>>(),
                }))
            })
            .collect();
        Some(serde_json::json!({ "zone": self.cfg.zone, "nftables": families }))
    }

    fn set_zone(&mut self, zone: Option<String>) {
        // Topology hints pick endpoints by zone: every Service may change.
        self.cfg.zone = zone;
        self.needs_full = true;
    }
}

/// `switchyard-agent cleanup`, and the iptables data plane's start:
/// removes our nftables tables (both families) in one transaction.
pub fn cleanup(kernel: &mut Kernel) -> Result<usize, KernelError> {
    let mut text = String::new();
    for family in Family::ALL {
        if kernel.table_exists(family, layout::TABLE)? {
            let _ = writeln!(text, "delete table {}", Words::of(family).table());
        }
    }
    if !text.is_empty() {
        kernel.run(&text)?;
    }
    Ok(text.lines().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_entries_are_read_from_json() {
        let json = r#"{"nftables": [{"metainfo": {}}, {"map": {"name": "affinity_ip", "elem": [[{"elem": {"val": {"concat": ["10.244.2.9", "10.96.0.12", "tcp", 80]}, "timeout": 60, "expires": 59}}, {"concat": ["10.244.1.2", 8080]}]]}}]}"#;
        let entries = map_entries(json);
        assert_eq!(
            entries,
            vec![Remembered {
                key: "10.244.2.9 . 10.96.0.12 . tcp . 80".to_owned(),
                data: "10.244.1.2 . 8080".to_owned(),
                timeout: 60,
                expires: 59,
            }]
        );
        assert_eq!(
            remembered_frontend(&entries[0].key),
            "10.96.0.12 . tcp . 80"
        );
        assert_eq!(
            entries[0].element(),
            "10.244.2.9 . 10.96.0.12 . tcp . 80 timeout 60s expires 59s : 10.244.1.2 . 8080"
        );
        assert!(map_entries("not json").is_empty());
    }
}
