//! What we programmed in one family, and the `iptables-restore --noflush`
//! transactions that move it to a new state. Pure: no commands run here.
//!
//! A full sync rewrites every chain we own and deletes our chains the state
//! no longer needs (the caller lists what the kernel holds). A partial sync
//! touches only the changed Services: their own chains, the dispatch
//! buckets their rules live in, and `SWY-NODEPORTS` when a node-port rule
//! changed. Nothing else is read or written, so its cost follows the change.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::conntrack::{Desired, Frontend};
use crate::dataplane::{Family, NodeConfig};
use crate::state::{AgentState, ChangeSet};

use super::rules::{self, BUILTIN_JUMPS, OwnedChain, PREFIX, SERVICES, ServiceRules, Slot, Table};

/// What of ours the kernel holds in one family: our chains, and our jumps
/// from the built-in chains.
#[derive(Debug, Clone, Default)]
pub struct Existing {
    /// Our chains, by table.
    pub chains: BTreeSet<(Table, String)>,
    /// Our rules in built-in chains, exactly as saved: (table, chain, target, rule line).
    pub jumps: Vec<(Table, String, String, String)>,
    /// Tables whose canary rule is in place: nobody flushed them since we
    /// last wrote them.
    pub canaries: BTreeSet<Table>,
}

impl Existing {
    /// Whether every table's canary is in place. Chains are named after
    /// their content, so then a chain of ours that exists holds the rules
    /// its name stands for, and a full sync need not write it again.
    pub fn intact(&self) -> bool {
        Table::ALL.iter().all(|t| self.canaries.contains(t))
    }

    /// Reads the output of `nft list chains ip` (or `ip6`): our chains in
    /// the nat and filter tables.
    pub fn parse_nft_chains(&mut self, listing: &str) {
        let mut table = None;
        for line in listing.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["table", _family, name, ..] => {
                    table = Table::ALL.into_iter().find(|t| t.name() == *name);
                }
                ["chain", name, ..] if name.starts_with(PREFIX) => {
                    if let Some(t) = table {
                        self.chains.insert((t, (*name).to_owned()));
                    }
                }
                _ => {}
            }
        }
    }

    /// Reads the output of `iptables-save -t <table>`, or of
    /// `iptables -t <table> -S <chain>`, for `table`.
    pub fn parse(&mut self, table: Table, saved: &str) {
        for line in saved.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if name.starts_with(PREFIX) {
                    self.chains.insert((table, name.to_owned()));
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or_default();
                if chain == rules::CANARY && rule.contains(rules::CANARY_RULE) {
                    self.canaries.insert(table);
                }
                if chain.starts_with(PREFIX) {
                    continue;
                }
                if let Some(target) = rule
                    .split(" -j ")
                    .nth(1)
                    .and_then(|t| t.split_whitespace().next())
                    .filter(|t| t.starts_with(PREFIX))
                {
                    self.jumps
                        .push((table, chain.to_owned(), target.to_owned(), line.to_owned()));
                }
            }
        }
    }
}

/// What one Service put in the kernel.
#[derive(Debug, Clone, Default)]
struct Programmed {
    chains: Vec<(Table, String)>,
    slots: Vec<(Table, Slot)>,
    udp: Vec<(Frontend, BTreeSet<SocketAddr>)>,
    rules: usize,
}

/// Everything we programmed in one family.
#[derive(Debug, Clone)]
pub struct FamilyTables {
    family: Family,
    services: HashMap<String, Programmed>,
    slots: HashMap<(Table, Slot), BTreeMap<String, Vec<String>>>,
    jumped: HashSet<(Table, u8)>,
    static_rules: usize,
    rules: usize,
}

/// A partial sync for one family's restore tool.
#[derive(Debug, Clone, Default)]
pub struct Transaction {
    /// The `iptables-restore` inputs, to run in order (usually one; none:
    /// nothing to do).
    pub texts: Vec<String>,
}

/// One table's part of a restore input, in the order iptables-restore
/// needs: chain declarations (which create or flush), then rules, then the
/// lines that need both in place (chain deletions, jumps from built-in
/// chains into chains declared above).
#[derive(Debug, Default)]
struct TableText {
    decls: String,
    rules: String,
    tail: String,
}

impl TableText {
    fn chain(&mut self, name: &str, rules: &[String]) {
        let _ = writeln!(self.decls, ":{name} - [0:0]");
        rules::write_chain(&mut self.rules, name, rules);
    }

    fn delete(&mut self, name: &str) {
        let _ = writeln!(self.decls, ":{name} - [0:0]");
        let _ = writeln!(self.tail, "-X {name}");
    }

    fn is_empty(&self) -> bool {
        self.decls.is_empty() && self.rules.is_empty() && self.tail.is_empty()
    }
}

fn assemble(tables: BTreeMap<Table, TableText>) -> String {
    let mut out = String::new();
    for (table, t) in tables {
        if t.is_empty() {
            continue;
        }
        let _ = writeln!(out, "*{}", table.name());
        out.push_str(&t.decls);
        out.push_str(&t.rules);
        out.push_str(&t.tail);
        out.push_str("COMMIT\n");
    }
    out
}

/// Restore inputs under construction: chains go into the open input,
/// which is handed to `emit` once it names `limit` chains. After `emit`
/// fails, nothing more is emitted and the error is kept.
struct Batches<'a, E> {
    limit: usize,
    open: BTreeMap<Table, TableText>,
    chains: usize,
    /// Chains of ours in the table, when pieces grow with it
    /// ([`piece_limit`]); counts the chains written.
    in_table: Option<usize>,
    emit: &'a mut dyn FnMut(String) -> Result<(), E>,
    error: Option<E>,
}

impl<'a, E> Batches<'a, E> {
    fn new(limit: usize, emit: &'a mut dyn FnMut(String) -> Result<(), E>) -> Self {
        Self {
            limit: limit.max(1),
            open: BTreeMap::new(),
            chains: 0,
            in_table: None,
            emit,
            error: None,
        }
    }

    fn finish(self) -> Result<(), E> {
        self.error.map_or(Ok(()), Err)
    }

    /// Lets pieces grow with the chains in the table, `in_table` now.
    fn growing(mut self, in_table: usize) -> Self {
        self.in_table = Some(in_table);
        self
    }

    fn chain(&mut self, table: Table, name: &str, rules: &[String]) {
        self.open.entry(table).or_default().chain(name, rules);
        self.chains += 1;
        if let Some(n) = &mut self.in_table {
            *n += 1;
        }
    }

    fn insert_jump(&mut self, table: Table, line: &str) {
        let _ = writeln!(self.open.entry(table).or_default().tail, "{line}");
    }

    fn seal_if_full(&mut self) {
        let limit = self
            .in_table
            .map_or(self.limit, |n| piece_limit(self.limit, n));
        if self.chains >= limit {
            self.seal();
        }
    }

    fn seal(&mut self) {
        let text = assemble(std::mem::take(&mut self.open));
        self.chains = 0;
        if !text.is_empty()
            && self.error.is_none()
            && let Err(e) = (self.emit)(text)
        {
            self.error = Some(e);
        }
    }

    /// Deletes `chains` (each flushed and deleted in one transaction),
    /// referrers first: a chain is deleted only after every chain of ours
    /// that can jump to it (see [`delete_rank`]).
    fn delete(&mut self, chains: &[&(Table, String)]) {
        let mut chains = chains.to_vec();
        chains.sort_by_key(|(table, name)| (delete_rank(name), *table, name.clone()));
        for part in chains.chunks(self.limit) {
            for (table, name) in part {
                self.open.entry(*table).or_default().delete(name);
            }
            self.seal();
        }
    }
}

/// The chains one piece of a full sync names, with `in_table` chains of
/// ours in the table: `base`, and from [`GROW_FROM`] chains on the square
/// root of ten times `in_table` when that is more.
///
/// Each commit costs the kernel a walk over every chain of the table
/// (`nft_table_validate` and `nf_tables_commit`: 82% of iptables-restore's
/// CPU samples at 500,000 chains, during a full sync at 100,000 Services,
/// nothing of ours hooked): about 0.4 µs per chain, so with pieces of a
/// fixed size a full sync grows with the square of the table. iptables-nft's
/// own cost grows with the square of the piece (about 40 ns per pair of
/// chains it names, from 1,000 Services in one transaction taking 5 s). A
/// piece of sqrt(c/q x chains), c/q about 10, balances the two: 1,050
/// chains at 110,000 chains in the table (10,000 Services), 3,300 at 1.1
/// million (100,000). At 100,000 Services this took the full sync from
/// 658 s (2,175 pieces of 500) to 323-330 s (612 pieces); the constant was not
/// swept.
fn piece_limit(base: usize, in_table: usize) -> usize {
    if in_table < GROW_FROM {
        return base;
    }
    base.max(in_table.saturating_mul(10).isqrt())
}

/// Chains in the table from which pieces grow: where the square root of
/// ten times them passes [`super::CHAINS_PER_RESTORE`] (500).
const GROW_FROM: usize = 25_000;

/// The chain a rule spec jumps or goes to, if it is one of ours.
fn jump_target(spec: &str) -> Option<&str> {
    let mut words = spec.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" {
            return words.next().filter(|t| t.starts_with(PREFIX));
        }
    }
    None
}

/// Where a chain comes in a deletion: after the chains that jump to it.
/// Dispatch heads jump to buckets and node ports, those to firewall and
/// external chains, those to Service chains, those to endpoint chains, and
/// all of them to the masquerade chains. Names we do not know go first:
/// nothing of ours jumps to them.
fn delete_rank(name: &str) -> u8 {
    let kind = |k: &str| name.starts_with(k);
    match name {
        _ if name == SERVICES => 1,
        _ if name == rules::NODEPORTS || kind("SWY-SB-") || kind("SWY-FB-") => 2,
        _ if kind("SWY-FW-") => 3,
        _ if kind("SWY-EXT-") => 4,
        _ if kind("SWY-SVC-") || kind("SWY-SVL-") => 5,
        _ if kind("SWY-SEP-") => 6,
        _ if name == rules::OFF_CLUSTER => 7,
        _ if name == rules::MARK_MASQ => 8,
        _ if name == rules::POSTROUTING || name == rules::FORWARD || name == rules::CANARY => 8,
        _ => 0,
    }
}

impl FamilyTables {
    /// Nothing programmed yet.
    pub fn new(family: Family) -> Self {
        Self {
            family,
            services: HashMap::new(),
            slots: HashMap::new(),
            jumped: HashSet::new(),
            static_rules: 0,
            rules: 0,
        }
    }

    /// The family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// Rules we own in this family (for the rule-count metric).
    pub fn rule_count(&self) -> usize {
        self.rules + self.static_rules
    }

    fn record(&mut self, name: &str, r: ServiceRules) -> (Programmed, Vec<OwnedChain>) {
        let mut p = Programmed {
            rules: r.dispatch.len() + r.chains.iter().map(|c| c.rules.len()).sum::<usize>(),
            udp: r.udp,
            ..Programmed::default()
        };
        for c in &r.chains {
            p.chains.push((c.table, c.name.clone()));
        }
        for d in r.dispatch {
            let key = (d.table, d.slot);
            if !p.slots.contains(&key) {
                p.slots.push(key);
            }
            self.slots
                .entry(key)
                .or_default()
                .entry(name.to_owned())
                .or_default()
                .push(d.spec);
        }
        self.rules += p.rules;
        (p, r.chains)
    }

    /// [`FamilyTables::full`], collecting the inputs.
    pub fn full_texts(
        state: &AgentState,
        cfg: &NodeConfig,
        existing: &Existing,
        family: Family,
        chains_per_restore: usize,
    ) -> (Self, Vec<String>) {
        let mut texts = Vec::new();
        let Ok(me) = Self::full(state, cfg, existing, family, chains_per_restore, &mut |t| {
            texts.push(t);
            Ok::<(), Infallible>(())
        });
        (me, texts)
    }

    /// Rewrites everything: a fresh record of `state`, and the
    /// `iptables-restore --noflush` inputs that replace whatever of ours
    /// `existing` lists, handed to `emit` in the order they must run (each
    /// one as soon as it is complete, so only one is held in memory); the
    /// first error of `emit` stops the sequence and is returned. Each input
    /// holds at most about
    /// `chains_per_restore` chains (one Service's chains are never split):
    /// iptables-nft's `--noflush` cost grows with the square of the chains
    /// one transaction names, so 10,000 Services in one input take minutes
    /// where batches take seconds (BENCHMARKS.md).
    ///
    /// Every prefix of the sequence leaves the kernel consistent: the first
    /// inputs (re)write the static chains and the Services' own chains,
    /// which nothing but the dispatch chains reference; the next one
    /// rewrites the dispatch chains and the jumps from the built-in chains
    /// in one transaction; the last ones delete what is no longer
    /// referenced.
    pub fn full<E>(
        state: &AgentState,
        cfg: &NodeConfig,
        existing: &Existing,
        family: Family,
        chains_per_restore: usize,
        emit: &mut dyn FnMut(String) -> Result<(), E>,
    ) -> Result<Self, E> {
        let mut me = Self::new(family);
        let mut out = Batches::new(chains_per_restore, emit).growing(existing.chains.len());
        let mut wanted: HashSet<(Table, String)> = HashSet::new();
        // The canaries vouch for every chain of ours, so they are written
        // with the dispatch, after the Service chains: a sync interrupted
        // before then leaves them missing, and the next full sync trusts
        // nothing.
        let mut canaries = Vec::new();
        for c in rules::static_chains(family, cfg) {
            me.static_rules += c.rules.len();
            wanted.insert((c.table, c.name.clone()));
            if c.name == rules::CANARY {
                canaries.push(c);
            } else {
                out.chain(c.table, &c.name, &c.rules);
            }
        }
        let trusted = existing.intact();
        for (name, held) in &state.resources {
            let r = rules::service_rules(&held.state, family, cfg);
            let (p, chains) = me.record(name, r);
            for c in chains {
                let key = (c.table, c.name);
                if !(trusted && existing.chains.contains(&key)) {
                    out.chain(key.0, &key.1, &c.rules);
                }
                wanted.insert(key);
            }
            me.services.insert(name.clone(), p);
            out.seal_if_full();
        }
        out.seal();

        // The dispatch and the canaries: one transaction.
        for c in &canaries {
            out.chain(c.table, &c.name, &c.rules);
        }
        let mut slots: Vec<_> = me.slots.keys().copied().collect();
        slots.sort();
        for table in Table::ALL {
            let mut head = Vec::new();
            for &(t, slot) in &slots {
                if let (true, Slot::Bucket(b)) = (t == table, slot) {
                    head.push(rules::bucket_jump(family, table, b));
                    me.jumped.insert((table, b));
                }
            }
            // The dispatch chains' rules, all of them in one descending
            // order of their jump targets ([`FamilyTables::slot_entries`]),
            // each chain's own rules in the order a partial sync writes.
            let mut entries = Vec::new();
            for &(t, slot) in &slots {
                if t == table {
                    let name = slot.chain(table);
                    out.chain(table, &name, &[]);
                    for (key, service, specs) in me.slot_entries(table, slot) {
                        entries.push((key, service, name.clone(), specs));
                    }
                    wanted.insert((table, name));
                }
            }
            if !slots.contains(&(table, Slot::NodePorts)) {
                out.chain(table, rules::NODEPORTS, &[]);
                wanted.insert((table, rules::NODEPORTS.to_owned()));
            }
            entries.sort_by(|a, b| (b.0, b.1).cmp(&(a.0, a.1)));
            let text = out.open.entry(table).or_default();
            for (_, _, chain, specs) in &entries {
                rules::write_chain(&mut text.rules, chain, specs);
            }
            head.extend(rules::services_tail(family, table, cfg));
            me.static_rules += head.len();
            out.chain(table, SERVICES, &head);
            wanted.insert((table, SERVICES.to_owned()));
        }
        for j in BUILTIN_JUMPS {
            let present = existing
                .jumps
                .iter()
                .any(|(t, c, target, _)| *t == j.table && c == j.chain && target == j.target);
            if !present {
                out.insert_jump(j.table, &format!("-I {} 1 {}", j.chain, j.spec));
            }
        }
        me.static_rules += BUILTIN_JUMPS.len();
        out.seal();

        let leftovers: Vec<&(Table, String)> = existing
            .chains
            .iter()
            .filter(|c| !wanted.contains(*c))
            .collect();
        out.delete(&leftovers);
        out.finish().map(|()| me)
    }

    /// The Services in one dispatch chain, in the order their rules are
    /// written: by the greatest chain name their rules jump to, descending
    /// (then by Service name, descending), with that name.
    ///
    /// The order is for iptables-nft (1.8.9): in a `--noflush` restore it
    /// records every chain a line names, its own and its jump target, in a
    /// list kept sorted by name, inserting each new name by walking the list
    /// from its smallest name. Names arriving in descending order go in at
    /// the front; in any other order the dispatch transaction of a full sync
    /// costs the square of its jump targets (20,000 jumps to existing chains
    /// in one transaction: 0.33 s of CPU in descending order, 13.9 s in
    /// random and 30.2 s in ascending order; at 100,000 Services the full
    /// sync's dispatch transaction ran for minutes). Matches of different
    /// Services never overlap, so their order in a chain is free.
    fn slot_entries(&self, table: Table, slot: Slot) -> Vec<(&str, &str, &[String])> {
        let mut entries: Vec<(&str, &str, &[String])> = self
            .slots
            .get(&(table, slot))
            .into_iter()
            .flatten()
            .map(|(service, specs)| {
                let key = specs.iter().filter_map(|s| jump_target(s)).max();
                (key.unwrap_or(""), service.as_str(), specs.as_slice())
            })
            .collect();
        entries.sort_by(|a, b| (b.0, b.1).cmp(&(a.0, a.1)));
        entries
    }

    fn slot_rules(&self, table: Table, slot: Slot) -> Vec<String> {
        self.slot_entries(table, slot)
            .into_iter()
            .flat_map(|(_, _, specs)| specs.iter().cloned())
            .collect()
    }

    /// Moves the record to `state` for the Services `changes` names and
    /// returns the transaction that does the same in the kernel. On failure
    /// the caller must fall back to [`FamilyTables::full`]: the record is
    /// already updated.
    ///
    /// A change is one restore when it names at most `chains_per_restore`
    /// chains (every nat commit costs a revalidation of the whole table, so
    /// a usual change pays it once). A larger one (a storm, a big Service
    /// replaced) is split like a full sync: new chains in pieces, then the
    /// dispatch chains in one transaction, then the deletions.
    pub fn partial(
        &mut self,
        state: &AgentState,
        changes: &ChangeSet,
        cfg: &NodeConfig,
        chains_per_restore: usize,
    ) -> Transaction {
        let family = self.family;
        // New chains, one group per Service: a group never spans two restores.
        let mut fresh: Vec<Vec<OwnedChain>> = Vec::new();
        let mut gone: Vec<(Table, String)> = Vec::new();
        let mut dirty: BTreeSet<(Table, Slot)> = BTreeSet::new();
        let names: BTreeSet<&String> = changes.changed.iter().chain(&changes.removed).collect();
        for name in names {
            let old = self.services.remove(name).unwrap_or_default();
            self.rules -= old.rules;
            let mut was: Vec<((Table, Slot), Vec<String>)> = Vec::new();
            for key in &old.slots {
                if let Some(m) = self.slots.get_mut(key) {
                    was.push((*key, m.remove(name.as_str()).unwrap_or_default()));
                }
            }
            let new = state
                .resources
                .get(name)
                .map(|held| rules::service_rules(&held.state, family, cfg))
                .unwrap_or_default();
            let (p, chains) = self.record(name, new);
            // A shared chain is rewritten only when this Service's rules in
            // it changed (an endpoint change leaves its filter rules alone).
            let rules_in = |me: &Self, key: &(Table, Slot)| {
                me.slots
                    .get(key)
                    .and_then(|m| m.get(name.as_str()))
                    .cloned()
                    .unwrap_or_default()
            };
            for (key, rules) in &was {
                if *rules != rules_in(self, key) {
                    dirty.insert(*key);
                }
            }
            for key in &p.slots {
                if !was.iter().any(|(k, _)| k == key) {
                    dirty.insert(*key);
                }
            }
            let had: HashSet<&(Table, String)> = old.chains.iter().collect();
            let has: HashSet<&(Table, String)> = p.chains.iter().collect();
            // Named after their content: a chain we had holds these rules.
            fresh.push(
                chains
                    .into_iter()
                    .filter(|c| !had.contains(&(c.table, c.name.clone())))
                    .collect(),
            );
            gone.extend(old.chains.iter().filter(|c| !has.contains(c)).cloned());
            if p.chains.is_empty() && p.slots.is_empty() && !state.resources.contains_key(name) {
                continue;
            }
            self.services.insert(name.clone(), p);
        }

        let split = fresh.iter().map(Vec::len).sum::<usize>() + dirty.len() + gone.len()
            > chains_per_restore;
        let texts = collected(chains_per_restore, |out| {
            for group in &fresh {
                for c in group {
                    out.chain(c.table, &c.name, &c.rules);
                }
                if split {
                    out.seal_if_full();
                }
            }
            if split {
                out.seal();
            }
            for (table, slot) in dirty {
                let r = self.slot_rules(table, slot);
                let text = out.open.entry(table).or_default();
                let chain = slot.chain(table);
                match slot {
                    Slot::Bucket(b) if r.is_empty() => {
                        // The bucket's last rule went: its jump and the chain go too.
                        if self.jumped.remove(&(table, b)) {
                            let _ = writeln!(
                                text.rules,
                                "-D {SERVICES} {}",
                                rules::bucket_jump(family, table, b)
                            );
                            self.static_rules -= 1;
                        }
                        text.delete(&chain);
                    }
                    Slot::Bucket(b) if self.jumped.insert((table, b)) => {
                        // A new bucket: one insert, the rest of SWY-SERVICES stays.
                        text.chain(&chain, &r);
                        let _ = writeln!(
                            text.rules,
                            "-I {SERVICES} 1 {}",
                            rules::bucket_jump(family, table, b)
                        );
                        self.static_rules += 1;
                    }
                    _ => text.chain(&chain, &r),
                }
                if r.is_empty() {
                    self.slots.remove(&(table, slot));
                }
            }
            if split {
                out.seal();
                out.delete(&gone.iter().collect::<Vec<_>>());
            } else {
                for (table, chain) in &gone {
                    out.open.entry(*table).or_default().delete(chain);
                }
                out.seal();
            }
        });
        Transaction { texts }
    }

    /// Every UDP frontend programmed, with the endpoints serving it: what
    /// stale-flow clean-up keeps.
    pub fn udp_frontends(&self) -> Desired {
        let mut out = Desired::new();
        for (frontend, serving) in self.services.values().flat_map(|p| &p.udp) {
            out.entry(*frontend).or_default().extend(serving);
        }
        out
    }
}

/// The restore inputs that remove everything of ours `existing` lists, in
/// order: the jumps from the built-in chains first, then our chains.
pub fn cleanup(existing: &Existing, chains_per_restore: usize) -> Vec<String> {
    collected(chains_per_restore, |out| {
        for (table, _chain, _target, line) in &existing.jumps {
            let _ = writeln!(
                out.open.entry(*table).or_default().rules,
                "-D{}",
                &line[2..]
            );
        }
        out.seal();
        let chains: Vec<&(Table, String)> = existing.chains.iter().collect();
        if !chains.is_empty() {
            out.delete(&chains);
        }
    })
}

/// The restore inputs `build` writes, collected.
fn collected(limit: usize, build: impl FnOnce(&mut Batches<'_, Infallible>)) -> Vec<String> {
    let mut texts = Vec::new();
    let mut emit = |t| {
        texts.push(t);
        Ok(())
    };
    build(&mut Batches::new(limit, &mut emit));
    texts
}

#[cfg(test)]
mod tests;
